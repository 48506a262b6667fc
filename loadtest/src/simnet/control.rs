//! Real control-plane traffic for the fabric's viewers: the dispatcher that routes the
//! fabric's [`Up`] messages to one task per session ([`super::session`]), fed by a small
//! bounded queue, and what those tasks share: the control plane's address, the
//! HTTP/2 connections (sessions share them, [`ControlConfig::sessions_per_channel`]
//! per `tonic` channel, with the SDK's keep-alive), `Join` with the server's retry
//! pushback, and the counters ([`ControlCounters`]).
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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use starling_grid::Parent;
use starling_grid::peer::PeerId;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{JoinRequest, JoinResponse, PeerRef, SubstreamParent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::dataplane::{DpCmd, DpShared};
use super::msg::{Input, Up};
use super::session::session;

/// Join attempts per viewer.
const JOIN_ATTEMPTS: u32 = 5;
/// A busy control plane that names no pushback: wait this long.
const DEFAULT_PUSHBACK_MS: u64 = 250;
/// Per-session command queue.
const SESSION_QUEUE: usize = 16;
/// Per-viewer data-plane command queue.
const DP_QUEUE: usize = 64;
/// HTTP/2 keep-alive PING interval and timeout (the SDK's defaults: a dead control
/// plane or path fails the session streams, which are reopened).
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The control plane's gRPC URL.
    pub control_url: String,
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
    pub fn new(control_url: String, broadcast_id: String) -> ControlConfig {
        ControlConfig {
            control_url,
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

/// A session's queues, as the dispatcher holds them.
struct Queues {
    cmd: mpsc::Sender<Cmd>,
    dp: Option<mpsc::Sender<DpCmd>>,
}

/// Starts the dispatcher: reads the fabric's `up` until it closes. `Subscribe` and
/// `ServerRequest` go to the viewer's data-plane connection
/// ([`ControlConfig::data_plane`]).
pub fn spawn(
    cfg: ControlConfig,
    mut up: mpsc::Receiver<Up>,
    fabric: mpsc::Sender<Input>,
) -> (Arc<ControlCounters>, JoinHandle<()>) {
    let counters = Arc::new(ControlCounters::default());
    let ctx = Arc::new(Ctx {
        cfg,
        fabric,
        counters: counters.clone(),
    });
    let task = tokio::spawn(async move {
        let mut channels: Vec<Channel> = Vec::new();
        let mut sessions: BTreeMap<usize, Queues> = BTreeMap::new();
        let mut tasks = Vec::new();
        while let Some(m) = up.recv().await {
            let (index, cmd) = match m {
                Up::Join { index, upload_kbps } => {
                    let Some(ch) = channel_for(&ctx, &mut channels, index) else {
                        let _ = ctx
                            .fabric
                            .send(Input::Failed {
                                index,
                                error: "bad control-plane URL".into(),
                            })
                            .await;
                        continue;
                    };
                    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                    let dp = ctx.cfg.data_plane.as_ref().map(|_| mpsc::channel(DP_QUEUE));
                    let dp_tx = dp.as_ref().map(|(t, _)| t.clone());
                    sessions.insert(index, Queues { cmd: tx, dp: dp_tx });
                    tasks.push(tokio::spawn(session(
                        ctx.clone(),
                        ch,
                        index,
                        upload_kbps,
                        rx,
                        dp,
                    )));
                    continue;
                }
                Up::ReSearch {
                    index,
                    substream,
                    exclude,
                } => (index, Cmd::ReSearch { substream, exclude }),
                Up::Report { index, parent } => (index, Cmd::Report { parent }),
                Up::Leave { index } => (index, Cmd::Leave),
                Up::Subscribe {
                    index,
                    mask,
                    resume,
                } => {
                    if let Some(dp) = sessions.get(&index).and_then(|q| q.dp.as_ref()) {
                        let _ = dp.send(DpCmd::Subscribe(mask, resume)).await;
                    }
                    continue;
                }
                Up::ServerRequest { index, seq } => {
                    if let Some(dp) = sessions.get(&index).and_then(|q| q.dp.as_ref()) {
                        let _ = dp.try_send(DpCmd::Request(seq));
                    }
                    continue;
                }
            };
            let leave = matches!(cmd, Cmd::Leave);
            if let Some(tx) = sessions.get(&index).map(|q| &q.cmd) {
                // Leaves wait for room; re-searches and reports are dropped when the
                // session is not keeping up (the node asks again).
                if leave {
                    let _ = tx.send(cmd).await;
                } else {
                    let _ = tx.try_send(cmd);
                }
            }
            if leave {
                sessions.remove(&index);
            }
        }
        drop(sessions);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    });
    (counters, task)
}

fn channel_for(ctx: &Ctx, channels: &mut Vec<Channel>, index: usize) -> Option<Channel> {
    let c = index / ctx.cfg.sessions_per_channel.max(1);
    while channels.len() <= c {
        let ep = tonic::transport::Endpoint::from_shared(ctx.cfg.control_url.clone()).ok()?;
        let ep = ep
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        channels.push(ep.connect_lazy());
        ctx.counters.connections.fetch_add(1, Ordering::Relaxed);
    }
    channels.get(c).cloned()
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
