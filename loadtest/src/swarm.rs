//! A swarm of real SDK viewers on loopback sockets, joined to one [`Deployment`], with
//! per-peer counters and a byte-identity check of every peer's output.

use parking_lot::Mutex;
use starling_proto::transport::Transport;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use starling_proto::integrity::VerifiedSignatures;
use starling_sdk::{RelayConfig, SdkError, Stats, Viewer, ViewerConfig};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::deployment::Deployment;
use crate::error::HarnessError;
use crate::pattern::{OutputCheck, Pattern};
use crate::report::{PeerCounters, PeerSample, PeerState, Sample};

/// Upload budgets of the peers, as multiples of the stream rate, assigned in turn
/// (peer `i` gets `multiples[i % len]`). 0 = the peer never relays.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadProfile {
    /// Multiples of the stream rate.
    pub multiples: Vec<f64>,
}

impl UploadProfile {
    /// A third of the peers never relay, the rest offer 1× to 3× the stream rate
    /// (`0, 1, 2, 0, 1.5, 3`; mean 1.25×).
    pub fn mixed() -> UploadProfile {
        UploadProfile {
            multiples: vec![0.0, 1.0, 2.0, 0.0, 1.5, 3.0],
        }
    }

    /// Every peer offers `multiple` × the stream rate.
    pub fn uniform(multiple: f64) -> UploadProfile {
        UploadProfile {
            multiples: vec![multiple],
        }
    }

    /// Parses a comma-separated list of multiples, e.g. `0,1,2,0,1.5,3`.
    pub fn parse(s: &str) -> Result<UploadProfile, HarnessError> {
        let multiples = s
            .split(',')
            .map(|p| {
                p.trim()
                    .trim_end_matches('x')
                    .parse::<f64>()
                    .ok()
                    .filter(|m| m.is_finite() && *m >= 0.0)
                    .ok_or_else(|| {
                        HarnessError::Config(format!(
                            "upload profile: {p:?} is not a non-negative number"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if multiples.is_empty() {
            return Err(HarnessError::Config("upload profile is empty".into()));
        }
        Ok(UploadProfile { multiples })
    }

    /// Upload budget of peer `index`, kbit/s.
    pub fn upload_kbps(&self, index: usize, stream_kbps: u32) -> u32 {
        let m = self
            .multiples
            .get(index % self.multiples.len().max(1))
            .copied()
            .unwrap_or(0.0);
        (m * f64::from(stream_kbps)).round() as u32
    }

    /// Mean multiple.
    pub fn mean(&self) -> f64 {
        if self.multiples.is_empty() {
            0.0
        } else {
            self.multiples.iter().sum::<f64>() / self.multiples.len() as f64
        }
    }
}

/// How to build the swarm.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Number of peers.
    pub peers: usize,
    /// Upload budgets.
    pub upload: UploadProfile,
    /// Joins started per second; 0 = all at once.
    pub join_rate: f64,
    /// Most peers joining at once (first call to the control plane until the viewer
    /// plays, retries included). A deployment that cannot keep up slows the ramp down
    /// instead of receiving an ever-growing pile of joins. Default 16.
    pub max_joining: usize,
    /// Play-out lag behind live; `None` = the SDK default.
    pub target_lag: Option<Duration>,
    /// Attempts per peer before its join counts as failed.
    pub join_attempts: u32,
    /// Check every peer's output against the source (costs one pass over every byte).
    pub check_identity: bool,
    /// Added to a peer's index to pick its address ([`peer_ip`]) and its upload budget
    /// ([`UploadProfile::upload_kbps`]), so that swarms in several processes (the
    /// `run` workers) use disjoint addresses. 0 for a single swarm.
    pub index_offset: usize,
    /// Share one cache of authentic chunk signatures among this process's peers
    /// ([`VerifiedSignatures`]): each peer still checks every chunk's header and hash,
    /// but a signature another peer here already checked is not checked again. On a
    /// real audience every device checks its own (the per-device cost is measured by
    /// `cargo test --release -p starling-proto -- --ignored`). Default on.
    pub shared_signature_cache: bool,
    /// While this says `true`, no new join starts (the load generator's machine is
    /// saturated). `None`: never held.
    pub hold: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            peers: 100,
            upload: UploadProfile::mixed(),
            join_rate: 50.0,
            max_joining: 16,
            target_lag: None,
            join_attempts: 3,
            check_identity: true,
            index_offset: 0,
            shared_signature_cache: true,
            hold: None,
        }
    }
}

/// The loopback address of peer `index`: 127.1.0.1, 127.1.0.2, … (250 per /24), so that
/// every peer listens on its own address and ports never run out.
pub fn peer_ip(index: usize) -> Ipv4Addr {
    let i = u32::try_from(index).unwrap_or(u32::MAX);
    let b = 1 + (i / 62_500) % 254;
    let c = (i / 250) % 250;
    let d = i % 250 + 1;
    Ipv4Addr::new(127, b as u8, c as u8, d as u8)
}

struct PeerShared {
    index: usize,
    upload_kbps: u32,
    ip: Ipv4Addr,
    state: Mutex<PeerState>,
    viewer: Mutex<Option<Viewer>>,
    /// Counters frozen when the peer left (its viewer is gone then).
    final_stats: Mutex<Option<Stats>>,
    check: Mutex<OutputCheck>,
    reader: Mutex<Option<JoinHandle<()>>>,
    join_ms: Mutex<Option<u64>>,
    /// Since the swarm started: when its join succeeded, when it left.
    joined_at: Mutex<Option<Duration>>,
    left_at: Mutex<Option<Duration>>,
}

/// When a peer was in the swarm, with its budget and its latest SDK [`Stats`] (see
/// [`Swarm::presence`]).
#[derive(Debug, Clone)]
pub struct PeerPresence {
    /// Index in the swarm.
    pub index: usize,
    /// Upload budget, kbit/s.
    pub upload_kbps: u32,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Since the swarm started: when its join succeeded (`None`: not joined).
    pub joined_at: Option<Duration>,
    /// Since the swarm started: when it left (`None`: still there, or never joined).
    pub left_at: Option<Duration>,
    /// The SDK's counters now (frozen at leave; `None` before the join succeeded).
    pub stats: Option<Stats>,
}

impl PeerShared {
    fn sample(&self) -> PeerSample {
        let mut state = self.state.lock().clone();
        let stats = match self.viewer.lock().as_ref() {
            Some(v) => {
                if v.is_closed() && state == PeerState::Active {
                    state = PeerState::Closed("the viewer stopped on its own".into());
                }
                Some(v.stats())
            }
            None => self.final_stats.lock().clone(),
        };
        PeerSample {
            index: self.index,
            upload_kbps: self.upload_kbps,
            state,
            startup: stats.as_ref().and_then(|s| s.startup_time),
            join_rpc_ms: *self.join_ms.lock(),
            counters: stats
                .as_ref()
                .map(PeerCounters::from_stats)
                .unwrap_or_default(),
            check: self.check.lock().clone(),
        }
    }
}

/// A running swarm. Cheap to clone (clones share the peers), so peers can be added
/// from one task while another samples.
#[derive(Clone)]
pub struct Swarm {
    inner: Arc<Inner>,
}

struct Inner {
    peers: Mutex<Vec<Arc<PeerShared>>>,
    pattern: Pattern,
    stream_kbps: u32,
    control_url: String,
    transport: Transport,
    broadcast_id: String,
    started: Instant,
    egress: Mutex<Option<EgressProbe>>,
    credentials: Mutex<Option<CredentialFn>>,
    /// Authentic chunk signatures seen by this process's peers (with
    /// [`SwarmConfig::shared_signature_cache`]).
    signatures: Arc<VerifiedSignatures>,
}

/// Signature blocks remembered per process: a few seconds of stream at any chunk size.
const SIGNATURE_CACHE: usize = 4096;

type EgressProbe = Arc<dyn Fn() -> Option<u64> + Send + Sync>;
type CredentialFn = Arc<dyn Fn(usize) -> Option<String> + Send + Sync>;

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("peers", &self.len())
            .field("stream_kbps", &self.inner.stream_kbps)
            .finish_non_exhaustive()
    }
}

impl Swarm {
    /// An empty swarm for `deployment`'s broadcast; add peers with
    /// [`Swarm::add_peers`].
    pub fn new(deployment: &Deployment) -> Swarm {
        // Budgets are multiples of the stream rate as delivered (payload plus each
        // chunk's frame and signature block), as the in-process data plane measures it
        // and reports it to the control plane, which sizes slots with it; the payload
        // rate until it has measured one.
        let stream_kbps = deployment
            .node()
            .and_then(|n| n.registry().get(deployment.broadcast_id()))
            .map(|b| b.stream_kbps())
            .filter(|&r| r > 0)
            .unwrap_or_else(|| deployment.source().bitrate_kbps());
        let swarm = Swarm::for_broadcast(
            deployment.control_url(),
            deployment.transport(),
            deployment.broadcast_id().to_owned(),
            stream_kbps,
            deployment.source().pattern(),
        );
        if let Some(probe) = deployment.egress_probe() {
            swarm.set_egress_probe(probe);
        }
        swarm
    }

    /// An empty swarm for broadcast `broadcast_id` of the control plane at
    /// `control_url` (reached as `transport` says), streamed at `stream_kbps` from a synthetic source with `pattern`
    /// (used only when [`SwarmConfig::check_identity`] is set): a deployment elsewhere,
    /// e.g. in another process.
    pub fn for_broadcast(
        control_url: String,
        transport: Transport,
        broadcast_id: String,
        stream_kbps: u32,
        pattern: Pattern,
    ) -> Swarm {
        Swarm {
            inner: Arc::new(Inner {
                peers: Mutex::new(Vec::new()),
                pattern,
                stream_kbps,
                control_url,
                transport,
                broadcast_id,
                started: Instant::now(),
                egress: Mutex::new(None),
                credentials: Mutex::new(None),
                signatures: Arc::new(VerifiedSignatures::new(SIGNATURE_CACHE)),
            }),
        }
    }

    /// Joins `config.peers` viewers to `deployment`'s broadcast at `config.join_rate`,
    /// and returns once every join has succeeded or failed (failures are reported in
    /// the samples, not returned).
    pub async fn join(deployment: &Deployment, config: SwarmConfig) -> Swarm {
        let swarm = Swarm::new(deployment);
        swarm.add_peers(&config).await;
        swarm
    }

    /// Sets a probe of the data plane's egress counter, sampled with the peers.
    pub fn set_egress_probe(&self, probe: impl Fn() -> Option<u64> + Send + Sync + 'static) {
        *self.inner.egress.lock() = Some(Arc::new(probe));
    }

    /// Sets the viewer credential (JWT) of the peers joined from now on: `f(index)`
    /// for peer `index` (`None` = no credential).
    pub fn set_credentials(&self, f: impl Fn(usize) -> Option<String> + Send + Sync + 'static) {
        *self.inner.credentials.lock() = Some(Arc::new(f));
    }

    /// Peer `index`'s SDK counters now (frozen at leave).
    pub fn stats(&self, index: usize) -> Option<Stats> {
        let p = self.peers().get(index).cloned()?;
        let v = p.viewer.lock();
        match v.as_ref() {
            Some(v) => Some(v.stats()),
            None => p.final_stats.lock().clone(),
        }
    }

    /// Peer `index`'s control-plane session id (`None` when not joined or gone).
    pub fn session_id(&self, index: usize) -> Option<String> {
        let p = self.peers().get(index).cloned()?;
        p.viewer.lock().as_ref().and_then(Viewer::session_id)
    }

    /// Why peer `index`'s viewer stopped on its own (`Viewer::closed`): `None` while
    /// it runs (or when it is not joined or has left), `Some(Err(reason))` after a
    /// refusal, revocation, end of broadcast...
    pub fn end_reason(&self, index: usize) -> Option<Result<(), SdkError>> {
        let p = self.peers().get(index).cloned()?;
        let v = p.viewer.lock();
        let v = v.as_ref()?;
        if !v.is_closed() {
            return None;
        }
        // Once closed, `closed()` is ready at its first poll.
        let mut fut = std::pin::pin!(v.closed());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        }
    }

    fn peers(&self) -> Vec<Arc<PeerShared>> {
        self.inner.peers.lock().clone()
    }

    /// Joins `config.peers` more peers (indices continue after the existing ones) at
    /// `config.join_rate`; returns once every join has succeeded or failed.
    pub async fn add_peers(&self, config: &SwarmConfig) {
        let gap = (config.join_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / config.join_rate));
        let joining = Arc::new(tokio::sync::Semaphore::new(config.max_joining.max(1)));
        let mut next = tokio::time::Instant::now();
        let mut joins = Vec::with_capacity(config.peers);
        for _ in 0..config.peers {
            if let Some(gap) = gap {
                tokio::time::sleep_until(next).await;
                next = next.max(tokio::time::Instant::now()) + gap;
            }
            if let Some(h) = &config.hold {
                // A dropped sender (worker shutting down) releases the hold.
                let _ = h.clone().wait_for(|held| !*held).await;
                next = next.max(tokio::time::Instant::now());
            }
            // Never closed: only fails if it were.
            let Ok(permit) = joining.clone().acquire_owned().await else {
                break;
            };
            let peer = {
                let mut peers = self.inner.peers.lock();
                let index = peers.len();
                let global = index + config.index_offset;
                let peer = Arc::new(PeerShared {
                    index,
                    upload_kbps: config.upload.upload_kbps(global, self.inner.stream_kbps),
                    ip: peer_ip(global),
                    state: Mutex::new(PeerState::Joining),
                    viewer: Mutex::new(None),
                    final_stats: Mutex::new(None),
                    check: Mutex::new(OutputCheck::default()),
                    reader: Mutex::new(None),
                    join_ms: Mutex::new(None),
                    joined_at: Mutex::new(None),
                    left_at: Mutex::new(None),
                });
                peers.push(peer.clone());
                peer
            };
            let vc = self.viewer_config(&peer, config);
            let (started, attempts, pattern) = (
                self.inner.started,
                config.join_attempts.max(1),
                config.check_identity.then_some(self.inner.pattern),
            );
            joins.push(tokio::spawn(async move {
                join_peer(started, peer, vc, attempts, pattern).await;
                drop(permit);
            }));
        }
        for j in joins {
            let _ = j.await;
        }
    }

    fn viewer_config(&self, peer: &PeerShared, config: &SwarmConfig) -> ViewerConfig {
        let mut vc = ViewerConfig::new(self.inner.broadcast_id.clone());
        vc.control_url = self.inner.control_url.clone();
        vc.transport = self.inner.transport.clone();
        // No local HTTP endpoint: the harness reads a subscription (one socket less).
        vc.http_listen = None;
        vc.client_version = concat!("starling-loadtest/", env!("CARGO_PKG_VERSION")).into();
        vc.relay = RelayConfig {
            listen: SocketAddr::new(IpAddr::V4(peer.ip), 0),
            advertise_host: Some(peer.ip.to_string()),
            max_upload_kbps: Some(peer.upload_kbps),
            // Every in-process peer connects from 127.0.0.1: no per-address cap.
            max_links_per_ip: 0,
            ..RelayConfig::new()
        };
        if let Some(lag) = config.target_lag {
            vc.target_lag = lag;
        }
        if config.shared_signature_cache {
            vc.verified_signatures = Some(self.inner.signatures.clone());
        }
        if let Some(f) = self.inner.credentials.lock().clone() {
            vc.credential = f(peer.index);
        }
        vc
    }

    /// Number of peers ever added.
    pub fn len(&self) -> usize {
        self.inner.peers.lock().len()
    }

    /// Whether no peer was ever added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stream rate, kbit/s.
    pub fn stream_kbps(&self) -> u32 {
        self.inner.stream_kbps
    }

    /// Indices of the peers playing now.
    pub fn active(&self) -> Vec<usize> {
        self.peers()
            .iter()
            .filter(|p| *p.state.lock() == PeerState::Active)
            .map(|p| p.index)
            .collect()
    }

    /// A snapshot of every peer's counters and output check.
    pub fn sample(&self) -> Sample {
        let probe = self.inner.egress.lock().clone();
        Sample {
            elapsed: self.inner.started.elapsed(),
            stream_kbps: self.inner.stream_kbps,
            peers: self.peers().iter().map(|p| p.sample()).collect(),
            dataplane_egress_bytes: probe.and_then(|f| f()),
        }
    }

    /// Every peer's presence interval, upload budget and SDK stats.
    pub fn presence(&self) -> Vec<PeerPresence> {
        self.peers()
            .iter()
            .map(|p| PeerPresence {
                index: p.index,
                upload_kbps: p.upload_kbps,
                ip: p.ip,
                joined_at: *p.joined_at.lock(),
                left_at: *p.left_at.lock(),
                stats: match p.viewer.lock().as_ref() {
                    Some(v) => Some(v.stats()),
                    None => p.final_stats.lock().clone(),
                },
            })
            .collect()
    }

    /// Makes `fraction` of the active peers leave at once (cleanly, with `Leave`),
    /// chosen by a seeded shuffle; returns their indices once they have all left.
    pub async fn churn(&self, fraction: f64, seed: u64) -> Vec<usize> {
        let mut active = self.active();
        let n = ((active.len() as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
        let key = Pattern::new(seed);
        active.sort_by_key(|i| key.word(*i as u64));
        let chosen: Vec<usize> = active.into_iter().take(n).collect();
        let peers = self.peers();
        let leaves: Vec<_> = chosen
            .iter()
            .filter_map(|i| peers.get(*i).cloned())
            .map(|p| {
                let started = self.inner.started;
                tokio::spawn(async move { leave_peer(started, &p).await })
            })
            .collect();
        for l in leaves {
            let _ = l.await;
        }
        let mut chosen = chosen;
        chosen.sort_unstable();
        chosen
    }

    /// Makes every remaining peer leave.
    pub async fn shutdown(&self) {
        let leaves: Vec<_> = self
            .peers()
            .into_iter()
            .map(|p| {
                let started = self.inner.started;
                tokio::spawn(async move { leave_peer(started, &p).await })
            })
            .collect();
        for l in leaves {
            let _ = l.await;
        }
    }
}

async fn join_peer(
    started: Instant,
    peer: Arc<PeerShared>,
    vc: ViewerConfig,
    attempts: u32,
    pattern: Option<Pattern>,
) {
    let mut last_err = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
        }
        let t0 = Instant::now();
        match Viewer::join(vc.clone()).await {
            Ok(viewer) => {
                *peer.join_ms.lock() = Some(t0.elapsed().as_millis() as u64);
                let reader = pattern.map(|pattern| {
                    let mut sub = viewer.subscribe();
                    let p = peer.clone();
                    tokio::spawn(async move {
                        while let Some(bytes) = sub.next_bytes().await {
                            p.check.lock().feed(&pattern, &bytes);
                        }
                    })
                });
                *peer.reader.lock() = reader;
                *peer.viewer.lock() = Some(viewer);
                *peer.joined_at.lock() = Some(started.elapsed());
                *peer.state.lock() = PeerState::Active;
                return;
            }
            Err(e) => {
                tracing::warn!(peer = peer.index, attempt, "join failed: {e}");
                last_err = e.to_string();
            }
        }
    }
    *peer.state.lock() = PeerState::JoinFailed(last_err);
}

async fn leave_peer(started: Instant, peer: &PeerShared) {
    let viewer = peer.viewer.lock().take();
    let Some(viewer) = viewer else { return };
    *peer.final_stats.lock() = Some(viewer.stats());
    *peer.left_at.lock() = Some(started.elapsed());
    {
        let mut st = peer.state.lock();
        if *st == PeerState::Active {
            *st = PeerState::Left;
        }
    }
    if let Err(e) = viewer.leave().await {
        tracing::debug!(peer = peer.index, "leave: {e}");
    }
    if let Some(r) = peer.reader.lock().take() {
        r.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ips_are_distinct_loopback() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000 {
            let ip = peer_ip(i);
            assert!(ip.is_loopback());
            assert_ne!(ip.octets()[3], 0);
            assert!(seen.insert(ip), "duplicate {ip} at {i}");
        }
    }

    #[test]
    fn profile() {
        let p = UploadProfile::mixed();
        let budgets: Vec<u32> = (0..6).map(|i| p.upload_kbps(i, 500)).collect();
        assert_eq!(budgets, vec![0, 500, 1000, 0, 750, 1500]);
        assert!((p.mean() - 1.25).abs() < 1e-9);
        assert_eq!(
            UploadProfile::parse("0, 1x,2.5").ok(),
            Some(UploadProfile {
                multiples: vec![0.0, 1.0, 2.5]
            })
        );
        assert!(UploadProfile::parse("a").is_err());
        assert!(UploadProfile::parse("-1").is_err());
    }
}
