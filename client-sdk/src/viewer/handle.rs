//! The public [`Viewer`] handle of a running viewer: subscriptions, addresses,
//! counters, waiting for the end, and leaving (explicitly or on drop). Starting one is
//! [`super::start`]'s concern.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::control::Control;
use crate::error::SdkError;
use crate::hub::Subscription;
use crate::shared::Shared;
use crate::stats::Stats;

/// A joined broadcast. Dropping it stops everything (and leaves, best effort).
pub struct Viewer {
    pub(super) shared: Arc<Shared>,
    pub(super) control: Option<Control>,
    pub(super) local_addr: Option<SocketAddr>,
    pub(super) peer_addr: Option<String>,
    pub(super) tasks: Vec<JoinHandle<()>>,
    /// The router's port forwarding to the peer listener, removed on leave.
    pub(super) port_mapping: Option<crate::portmap::PortMapping>,
    /// `leave` ran (then drop does not `Leave` again).
    pub(super) left: bool,
}

impl std::fmt::Debug for Viewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viewer")
            .field("broadcast_id", &self.shared.broadcast_id)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Viewer {
    /// A new in-order byte stream of the broadcast, starting at the newest random
    /// access chunk held (or the next one). Bounded: see [`Subscription`].
    pub fn subscribe(&self) -> Subscription {
        self.shared.hub.subscribe()
    }

    /// Address of the local HTTP endpoint, if enabled.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// URL any media player can open (`http://127.0.0.1:PORT/live/{broadcast}`), if the
    /// local HTTP endpoint is enabled.
    pub fn local_url(&self) -> Option<String> {
        let mut addr = self.local_addr?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        Some(format!("http://{addr}/live/{}", self.shared.broadcast_id))
    }

    /// `host:port` where this viewer accepts peer connections, as reported to the
    /// control plane (`None` when it does not relay or has no grid assignment).
    pub fn peer_addr(&self) -> Option<&str> {
        self.peer_addr.as_deref()
    }

    /// The public address a router forwards to this viewer's peer listener (UPnP), when
    /// it advertised one ([`crate::portmap`]).
    pub fn port_mapping(&self) -> Option<std::net::SocketAddr> {
        self.port_mapping
            .as_ref()
            .map(crate::portmap::PortMapping::external)
    }

    /// This viewer's id in the peer grid (`None` without a grid assignment).
    pub fn peer_id(&self) -> Option<u64> {
        self.shared.stats_mut().peer_id
    }

    /// The broadcast this viewer plays.
    pub fn broadcast_id(&self) -> &str {
        &self.shared.broadcast_id
    }

    /// MIME type of the stream, once known (e.g. `video/mp2t`).
    pub fn content_type(&self) -> Option<String> {
        self.shared.hub.content_type()
    }

    /// Control-plane session id (`None` for [`Viewer::connect_direct`]).
    pub fn session_id(&self) -> Option<String> {
        self.shared.session_id()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.shared.stats_mut().clone();
        s.consumer_drops = self
            .shared
            .hub
            .consumer_drops
            .load(std::sync::atomic::Ordering::Relaxed);
        s.consumers = self.shared.hub.consumers();
        s.clock_offset_ms = self.shared.rights.clock_offset_ms();
        s
    }

    /// True once the viewer has stopped (or is stopping).
    pub fn is_closed(&self) -> bool {
        self.shared.is_finished()
    }

    /// Waits until the viewer stops on its own: `Ok(())` after [`Viewer::leave`],
    /// otherwise the reason (broadcast ended, session inactive, fatal refusal...).
    pub async fn closed(&self) -> Result<(), SdkError> {
        let mut rx = self.shared.stop_signal();
        match rx.wait_for(|e| e.is_some()).await {
            Ok(end) => end.clone().unwrap_or(Ok(())),
            Err(_) => Ok(()),
        }
    }

    /// Stops receiving, ends every consumer's stream, closes the local endpoint and
    /// tells the control plane (`Leave`), if any.
    pub async fn leave(mut self) -> Result<(), SdkError> {
        self.left = true;
        self.shared.finish(Ok(()));
        let tasks = std::mem::take(&mut self.tasks);
        for t in tasks {
            // The tasks watch the stop signal; give them a moment to finish cleanly.
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        if let Some(m) = self.port_mapping.take() {
            m.remove(Duration::from_secs(1)).await;
        }
        if let Some(c) = &self.control {
            // The final report, then whatever is still queued (bounded in time).
            crate::report::enqueue(&self.shared, true);
            let _ = tokio::time::timeout(
                Duration::from_secs(3),
                crate::report::flush(c, &self.shared),
            )
            .await;
        }
        let session = self.shared.take_session();
        match (&self.control, session) {
            (Some(c), Some(s)) => {
                match tokio::time::timeout(Duration::from_secs(3), c.leave(&s.id)).await {
                    Ok(r) => r,
                    Err(_) => Err(SdkError::Timeout("sending Leave")),
                }
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.shared.finish(Ok(()));
        for t in &self.tasks {
            t.abort();
        }
        if self.left {
            return;
        }
        if let (Some(m), Ok(rt)) = (
            self.port_mapping.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(async move { m.remove(Duration::from_secs(1)).await });
        }
        if let (Some(c), Some(s), Ok(rt)) = (
            self.control.clone(),
            self.shared.take_session(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(3), c.leave(&s.id)).await;
            });
        }
    }
}
