//! Reachability before responsibility: a viewer that offers to relay is given children
//! only once the control plane has opened a TCP connection to the address it advertised
//! (`Join.peer_addr`), the way its children will connect. Until then its upload is on
//! probation ([`crate::trust::UploadTrust::on_probation`]): it plays, it is nobody's
//! parent. An address behind a NAT without a port mapping does not answer, and such a
//! viewer stays a leaf instead of collecting children that can never connect.
//!
//! The probe is a bare TCP connect, closed at once: it proves that something accepts
//! connections there, not that it is this viewer's SDK (the address is on the caller's
//! own IP already, see [`crate::trust::check_peer_addr`]; a child's parent ticket still
//! names the parent). A child that cannot connect to its parent says so in `Reparent`
//! (`unreachable_peer_ids`): the parent is probed again (at most every 30 s) and loses
//! its children if that fails too, until it joins again. Probes run off the join path, at most
//! [`ReachabilityConfig::concurrency`] at once; each ends after
//! [`ReachabilityConfig::timeout`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::live::LiveGrids;
use crate::metrics::Metrics;

/// Whether and how relays' addresses are probed (flags of the binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReachabilityConfig {
    /// Probe before granting upload. Off: every claim is granted at join (tests and
    /// harnesses whose peers are simulated and listen nowhere).
    pub enabled: bool,
    /// A probe that has not connected by then failed.
    pub timeout: Duration,
    /// Probes in flight at once; more wait for a free one.
    pub concurrency: usize,
}

impl Default for ReachabilityConfig {
    fn default() -> Self {
        ReachabilityConfig {
            enabled: false,
            timeout: Duration::from_secs(3),
            concurrency: 256,
        }
    }
}

/// Runs the probes of one control-plane process.
#[derive(Debug)]
pub struct Prober {
    config: ReachabilityConfig,
    permits: Arc<Semaphore>,
}

impl Prober {
    pub fn new(config: ReachabilityConfig) -> Self {
        Prober {
            config,
            permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
        }
    }

    /// True when joins put relays on probation.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Probes `addr` for `session_id` in the background and hands the result to
    /// `grids` ([`LiveGrids::probed`]). Must be called within a tokio runtime.
    pub fn probe(
        &self,
        grids: Arc<LiveGrids>,
        metrics: Arc<Metrics>,
        session_id: String,
        addr: SocketAddr,
    ) {
        self.spawn(addr, metrics, move |reachable| {
            match grids.probed(&session_id, reachable) {
                Some(moved) if reachable => {
                    tracing::debug!(%session_id, %addr, moved, "relay reachable: upload granted");
                }
                Some(_) => {
                    tracing::info!(%session_id, %addr,
                        "relay address unreachable: it gets children only by hole punching, \
                         if its router keeps ports");
                }
                None => {}
            }
        });
    }

    /// Probes a relay's address again after a child could not connect to it
    /// ([`LiveGrids::reprobe_target`]); unreachable, it loses its children and its
    /// upload goes back on probation ([`LiveGrids::unreachable`]).
    pub fn reprobe(
        &self,
        grids: Arc<LiveGrids>,
        metrics: Arc<Metrics>,
        session_id: String,
        addr: SocketAddr,
    ) {
        self.spawn(addr, metrics, move |reachable| {
            if reachable {
                tracing::debug!(%session_id, %addr, "relay reachable again on a child's complaint");
            } else if let Some(moved) = grids.unreachable(&session_id) {
                tracing::info!(%session_id, %addr, moved,
                    "relay no longer reachable: its children were re-parented");
            }
        });
    }

    fn spawn(
        &self,
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        then: impl FnOnce(bool) + Send + 'static,
    ) {
        let permits = self.permits.clone();
        let timeout = self.config.timeout;
        tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let reachable = connects(addr, timeout).await;
            metrics.probed(reachable);
            then(reachable);
        });
    }
}

/// True when a TCP connection to `addr` opens within `timeout`.
pub async fn connects(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listening_address_connects_a_closed_one_does_not() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap();
        assert!(connects(open, Duration::from_secs(10)).await);
        drop(l);
        assert!(!connects(open, Duration::from_secs(10)).await);
    }
}
