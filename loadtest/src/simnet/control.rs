//! Real control-plane traffic for the fabric's viewers: what the dispatcher
//! ([`super::dispatch`]) and the session tasks ([`super::session`]) share: the control
//! plane's address and how sessions share HTTP/2 connections ([`ControlConfig`]),
//! `Join` with the server's retry pushback, the counters ([`ControlCounters`]).
//!
//! Each session mirrors the SDK's control-plane client rules (`client-sdk`'s
//! `viewer::session`, `report`): it joins, holds its `ViewerService.Session` stream
//! (counters every `counters_interval_ms`, reopened with the SDK's back-off when it
//! breaks), applies every pushed delta (parents, neighbours, key sets, chunk tokens,
//! revocations, the end of the session), sends quality reports (`ViewerService.Report`,
//! [`super::reports`]) at the interval `Join` names, and calls `Reparent`, `ReportPeer`
//! and `Leave` when its node asks. Not done here: the SDK's fall-back to unary
//! heartbeats for a control plane without session streams (a stream refused as
//! `UNIMPLEMENTED` ends the viewer), and parent tickets and peer tokens on peer links
//! (peer links are simulated and carry none).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use starling_grid::Parent;
use starling_grid::peer::PeerId;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{JoinRequest, JoinResponse, PeerRef, SubstreamParent};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::dataplane::DpShared;
use super::msg::Input;

/// Join attempts per viewer.
const JOIN_ATTEMPTS: u32 = 5;
/// A busy control plane that names no pushback: wait this long.
const DEFAULT_PUSHBACK_MS: u64 = 250;

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The control plane's gRPC URL.
    pub control_url: String,
    /// How it is reached (TLS and the CA to trust, or the plaintext opt-in).
    pub transport: starling_proto::transport::Transport,
    /// The broadcast.
    pub broadcast_id: String,
    /// Sessions per HTTP/2 connection.
    pub sessions_per_channel: usize,
    /// Added to local indices for advertised addresses.
    pub index_offset: usize,
    /// Per-call timeout of unary calls.
    pub call_timeout: Duration,
    /// Real data-plane connections, one per viewer (`None`: the fabric's in-process
    /// server plays the data plane).
    pub data_plane: Option<Arc<DpShared>>,
}

impl ControlConfig {
    /// 200 sessions per connection, 30 s call timeout.
    pub fn new(
        control_url: String,
        transport: starling_proto::transport::Transport,
        broadcast_id: String,
    ) -> ControlConfig {
        ControlConfig {
            control_url,
            transport,
            broadcast_id,
            sessions_per_channel: 200,
            index_offset: 0,
            call_timeout: Duration::from_secs(30),
            data_plane: None,
        }
    }
}

/// What the control traffic did.
#[derive(Debug, Default)]
pub struct ControlCounters {
    /// HTTP/2 connections opened.
    pub connections: AtomicU64,
    /// Sessions joined.
    pub sessions: AtomicU64,
    /// Session streams open now.
    pub streams_open: AtomicU64,
    /// Joins that failed for good.
    pub join_failures: AtomicU64,
    /// `SessionDown` messages received.
    pub downs: AtomicU64,
    /// `SessionUp` messages sent.
    pub ups: AtomicU64,
    /// `Reparent` calls answered.
    pub reparents: AtomicU64,
    /// `ReportPeer` calls made (bad peers).
    pub peer_reports: AtomicU64,
    /// `Report` calls made (quality reports, in batches).
    pub report_calls: AtomicU64,
    /// Quality reports the control plane acknowledged (committed).
    pub quality_reports: AtomicU64,
    /// Quality reports dropped unsent (queue full while the control plane was away).
    pub reports_dropped: AtomicU64,
    /// Session streams opened again after one broke.
    pub streams_reopened: AtomicU64,
    /// Key sets applied (`SessionDown.keys_version` non-zero).
    pub key_sets: AtomicU64,
    /// Key refreshes asked for (`SessionUp.refresh_keys`: a chunk named an unknown key).
    pub key_refreshes: AtomicU64,
    /// Renewed chunk tokens received.
    pub token_renewals: AtomicU64,
    /// Sessions the control plane ended (`active = false`: left, expired, revoked, the
    /// broadcast stopped).
    pub ended: AtomicU64,
    /// `Leave` calls made.
    pub leaves: AtomicU64,
    /// Calls that failed (any RPC).
    pub errors: AtomicU64,
}

/// What the dispatcher hands a session.
pub(super) enum Cmd {
    ReSearch {
        substream: u16,
        exclude: Vec<PeerId>,
    },
    Report {
        parent: PeerId,
    },
    Leave,
}

/// What every session task shares.
pub(super) struct Ctx {
    pub(super) cfg: ControlConfig,
    pub(super) fabric: mpsc::Sender<Input>,
    pub(super) counters: Arc<ControlCounters>,
}

pub(super) fn pushback_ms(status: &tonic::Status) -> Option<u64> {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Jitter of up to half of `ms`, from the clock's low bits (not for anything secret).
fn jitter(ms: u64) -> u64 {
    let n = u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    );
    n % (ms / 2 + 1)
}

/// `base` plus a random extra of 0..50 % of it (the SDK's `jittered`: never shorter
/// than `base`, so a pushback is honoured, and a crowd refused together spreads out).
pub(super) fn jittered(base: Duration) -> Duration {
    use std::hash::BuildHasher;
    static N: AtomicU64 = AtomicU64::new(0);
    let h = std::hash::RandomState::new().hash_one(N.fetch_add(1, Ordering::Relaxed));
    // 53 random bits as a fraction.
    base + base.mul_f64((h >> 11) as f64 / (1u64 << 53) as f64 * 0.5)
}

pub(super) async fn join(
    ctx: &Ctx,
    client: &mut ViewerServiceClient<Channel>,
    req: JoinRequest,
) -> Result<(JoinResponse, u64), String> {
    let mut last = String::new();
    for _ in 0..JOIN_ATTEMPTS {
        let t = Instant::now();
        let status =
            match tokio::time::timeout(ctx.cfg.call_timeout, client.join(req.clone())).await {
                Ok(Ok(r)) => {
                    let ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
                    return Ok((r.into_inner(), ms));
                }
                Ok(Err(s)) => s,
                Err(_) => tonic::Status::deadline_exceeded("join timed out"),
            };
        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
        last = format!("join: {}: {}", status.code(), status.message());
        let wait = match status.code() {
            tonic::Code::ResourceExhausted | tonic::Code::Unavailable => {
                pushback_ms(&status).unwrap_or(DEFAULT_PUSHBACK_MS)
            }
            tonic::Code::DeadlineExceeded => DEFAULT_PUSHBACK_MS,
            _ => break,
        };
        tokio::time::sleep(Duration::from_millis(wait + jitter(wait))).await;
    }
    Err(last)
}

/// A wire `SubstreamParent` as a grid parent: no peer is the data plane.
pub(super) fn parent_of(p: &SubstreamParent) -> Option<(u16, Parent)> {
    let s = u16::try_from(p.substream).ok().filter(|s| *s < 64)?;
    let parent = match &p.peer {
        Some(PeerRef { peer_id, .. }) if *peer_id != 0 => Parent::Peer(*peer_id),
        _ => Parent::Server,
    };
    Some((s, parent))
}

/// Parents of every substream (the data plane where `Join` names none).
pub(super) fn full_parents(parents: &[SubstreamParent], k: u32) -> Vec<Parent> {
    let k = usize::try_from(k.clamp(1, 64)).unwrap_or(1);
    let mut out = vec![Parent::Server; k];
    for (s, p) in parents.iter().filter_map(parent_of) {
        if let Some(slot) = out.get_mut(usize::from(s)) {
            *slot = p;
        }
    }
    out
}
