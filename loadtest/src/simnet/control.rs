//! Real control-plane traffic for the fabric's viewers: every viewer joins over gRPC
//! (`ViewerService.Join`, honouring the server's retry pushback), holds its
//! `ViewerService.Session` stream (counters every `counters_interval_ms`, the SDK's
//! production default), applies every pushed delta (parents per substream, neighbours,
//! the end of the session) to its node, and calls `Reparent`, `ReportPeer` and `Leave`
//! when its node asks. Sessions share HTTP/2 connections
//! ([`ControlConfig::sessions_per_channel`] per `tonic` channel).
//!
//! One task per session (as the SDK has), fed by a small bounded queue; the dispatcher
//! routes the fabric's [`Up`] messages to them. Not done here (the SDK does it):
//! key refreshes, chunk-token renewal on peer links and revocations (peer links are
//! simulated and carry no tokens), re-opening a broken stream, quality reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use starling_grid::Parent;
use starling_grid::peer::PeerId;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    JoinRequest, JoinResponse, LeaveRequest, PeerRef, PeerReportKind, ReparentRequest,
    ReportPeerRequest, SessionDown, SessionUp, SubstreamParent,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::dataplane::{self, DpCmd, DpSetup, DpShared};
use super::msg::{Input, Up};
use crate::swarm::peer_ip;

/// Counters interval when the control plane names none (the SDK's default).
const DEFAULT_COUNTERS_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest counters interval accepted (the SDK's floor).
const MIN_COUNTERS_INTERVAL: Duration = Duration::from_millis(50);
/// Join attempts per viewer.
const JOIN_ATTEMPTS: u32 = 5;
/// A busy control plane that names no pushback: wait this long.
const DEFAULT_PUSHBACK_MS: u64 = 250;
/// Per-session command queue.
const SESSION_QUEUE: usize = 16;
/// Per-viewer data-plane command queue.
const DP_QUEUE: usize = 64;
/// The port simulated viewers advertise (nobody dials it).
const SIM_PORT: u16 = 9;

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
    /// `ReportPeer` calls made.
    pub reports: AtomicU64,
    /// `Leave` calls made.
    pub leaves: AtomicU64,
    /// Calls that failed (any RPC).
    pub errors: AtomicU64,
}

/// One viewer's byte counters as its session reports them (written by the fabric).
#[derive(Debug, Default)]
pub struct ViewerBytes {
    /// Payload bytes from the data plane.
    pub from_server: AtomicU64,
    /// Payload bytes from peers.
    pub from_peers: AtomicU64,
    /// Payload bytes uploaded.
    pub uploaded: AtomicU64,
}

enum Cmd {
    ReSearch {
        substream: u16,
        exclude: Vec<PeerId>,
    },
    Report {
        parent: PeerId,
    },
    Leave,
}

struct Ctx {
    cfg: ControlConfig,
    fabric: mpsc::Sender<Input>,
    counters: Arc<ControlCounters>,
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
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        channels.push(ep.connect_lazy());
        ctx.counters.connections.fetch_add(1, Ordering::Relaxed);
    }
    channels.get(c).cloned()
}

fn pushback_ms(status: &tonic::Status) -> Option<u64> {
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

async fn join(
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
fn parent_of(p: &SubstreamParent) -> Option<(u16, Parent)> {
    let s = u16::try_from(p.substream).ok().filter(|s| *s < 64)?;
    let parent = match &p.peer {
        Some(PeerRef { peer_id, .. }) if *peer_id != 0 => Parent::Peer(*peer_id),
        _ => Parent::Server,
    };
    Some((s, parent))
}

/// One viewer's session: join, the stream, its commands, leave.
async fn session(
    ctx: Arc<Ctx>,
    channel: Channel,
    index: usize,
    upload_kbps: u32,
    mut cmds: mpsc::Receiver<Cmd>,
    dp: Option<(mpsc::Sender<DpCmd>, mpsc::Receiver<DpCmd>)>,
) {
    let mut client = ViewerServiceClient::new(channel);
    let global = ctx.cfg.index_offset + index;
    let req = JoinRequest {
        broadcast_id: ctx.cfg.broadcast_id.clone(),
        credential: String::new(),
        client_version: concat!("starling-loadtest-sim/", env!("CARGO_PKG_VERSION")).into(),
        peer_addr: format!("{}:{SIM_PORT}", peer_ip(global)),
        upload_kbps,
        // As the SDK asks: the control plane then makes this peer's children version-2
        // tickets (its cost as in production; simulated links check no tickets).
        mac_tickets: true,
    };
    let (resp, rpc_ms) = match join(&ctx, &mut client, req).await {
        Ok(r) => r,
        Err(error) => {
            ctx.counters.join_failures.fetch_add(1, Ordering::Relaxed);
            let _ = ctx.fabric.send(Input::Failed { index, error }).await;
            return;
        }
    };
    ctx.counters.sessions.fetch_add(1, Ordering::Relaxed);
    let session_id = resp.session_id.clone();
    let bytes = Arc::new(ViewerBytes::default());
    let parents = full_parents(
        &resp.parents,
        resp.params.as_ref().map_or(0, |p| p.substreams),
    );
    let dp_tx = match (dp, &ctx.cfg.data_plane) {
        (Some((tx, rx)), Some(shared)) => {
            let mask = parents
                .iter()
                .enumerate()
                .filter(|(_, p)| **p == Parent::Server)
                .fold(0u64, |m, (s, _)| m | (1u64 << s));
            let setup = DpSetup {
                index,
                addr: resp.dataplane_wire_addr.clone(),
                token: Bytes::from(resp.chunk_token.clone()),
                broadcast_id: ctx.cfg.broadcast_id.clone(),
                mask,
                chunk_keys: resp
                    .chunk_keys
                    .iter()
                    .map(|k| (k.key_id, k.ed25519.clone()))
                    .collect(),
                fabric: ctx.fabric.clone(),
                shared: shared.clone(),
            };
            tokio::spawn(dataplane::connection(setup, rx));
            Some(tx)
        }
        _ => None,
    };
    let joined = Input::Joined {
        index,
        peer_id: resp.peer_id,
        child_slots: resp.child_slots,
        parents,
        neighbours: resp.neighbours.iter().map(|n| n.peer_id).collect(),
        rpc_ms: Some(rpc_ms),
        bytes: Some(bytes.clone()),
    };
    if ctx.fabric.send(joined).await.is_err() {
        return;
    }
    let end = stream(
        &ctx,
        &mut client,
        index,
        &session_id,
        upload_kbps,
        &bytes,
        &mut cmds,
        dp_tx.as_ref(),
    )
    .await;
    drop(dp_tx);
    if let Err(error) = &end {
        let _ = ctx
            .fabric
            .send(Input::Failed {
                index,
                error: error.clone(),
            })
            .await;
    }
    ctx.counters.leaves.fetch_add(1, Ordering::Relaxed);
    let leave = client.leave(LeaveRequest { session_id });
    if !matches!(
        tokio::time::timeout(ctx.cfg.call_timeout, leave).await,
        Ok(Ok(_))
    ) {
        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Parents of every substream (the data plane where `Join` names none).
fn full_parents(parents: &[SubstreamParent], k: u32) -> Vec<Parent> {
    let k = usize::try_from(k.clamp(1, 64)).unwrap_or(1);
    let mut out = vec![Parent::Server; k];
    for (s, p) in parents.iter().filter_map(parent_of) {
        if let Some(slot) = out.get_mut(usize::from(s)) {
            *slot = p;
        }
    }
    out
}

/// The session stream until the viewer leaves (`Ok`) or the session ends (`Err`).
#[allow(clippy::too_many_arguments)]
async fn stream(
    ctx: &Ctx,
    client: &mut ViewerServiceClient<Channel>,
    index: usize,
    session_id: &str,
    upload_kbps: u32,
    bytes: &ViewerBytes,
    cmds: &mut mpsc::Receiver<Cmd>,
    dp: Option<&mpsc::Sender<DpCmd>>,
) -> Result<(), String> {
    let counters = |b: &ViewerBytes| SessionUp {
        bytes_from_server: b.from_server.load(Ordering::Relaxed),
        bytes_from_peers: b.from_peers.load(Ordering::Relaxed),
        bytes_uploaded: b.uploaded.load(Ordering::Relaxed),
        upload_kbps,
        ..SessionUp::default()
    };
    let (tx, rx) = mpsc::channel::<SessionUp>(4);
    let first = SessionUp {
        session_id: session_id.to_owned(),
        ..counters(bytes)
    };
    if tx.try_send(first).is_err() {
        return Err("session queue".into());
    }
    let opened = tokio::time::timeout(
        ctx.cfg.call_timeout,
        client.session(ReceiverStream::new(rx)),
    )
    .await;
    let mut inbound = match opened {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return Err(format!("session: {}: {}", s.code(), s.message())),
        Err(_) => return Err("session: open timed out".into()),
    };
    ctx.counters.streams_open.fetch_add(1, Ordering::Relaxed);
    let mut interval = DEFAULT_COUNTERS_INTERVAL;
    let mut next = Instant::now() + interval;
    let mut neighbours: Vec<PeerId> = Vec::new();
    let result = loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(down)) => {
                    ctx.counters.downs.fetch_add(1, Ordering::Relaxed);
                    if down.counters_interval_ms > 0 {
                        let d = Duration::from_millis(u64::from(down.counters_interval_ms))
                            .max(MIN_COUNTERS_INTERVAL);
                        if d != interval {
                            interval = d;
                            next = Instant::now() + d;
                        }
                    }
                    if !down.active {
                        break Err("the control plane ended the session".into());
                    }
                    if !down.chunk_token.is_empty()
                        && let Some(dp) = dp
                    {
                        let _ = dp.try_send(DpCmd::Token(Bytes::from(down.chunk_token.clone())));
                    }
                    if !apply(ctx, index, &down, &mut neighbours).await {
                        break Ok(());
                    }
                }
                Ok(None) => break Err("session stream ended".into()),
                Err(s) => break Err(format!("session: {}: {}", s.code(), s.message())),
            },
            () = tokio::time::sleep_until(next) => {
                // A full queue means the stream is not draining: skip this one.
                if tx.try_send(counters(bytes)).is_ok() {
                    ctx.counters.ups.fetch_add(1, Ordering::Relaxed);
                }
                next += interval;
                let now = Instant::now();
                if next < now {
                    next = now + interval;
                }
            }
            cmd = cmds.recv() => match cmd {
                None | Some(Cmd::Leave) => break Ok(()),
                Some(Cmd::ReSearch { substream, exclude }) => {
                    reparent(ctx, client, index, session_id, substream, exclude).await;
                }
                Some(Cmd::Report { parent }) => {
                    ctx.counters.reports.fetch_add(1, Ordering::Relaxed);
                    let req = ReportPeerRequest {
                        session_id: session_id.to_owned(),
                        peer_id: parent,
                        reason: "non-delivery".into(),
                        kind: PeerReportKind::NonDelivery as i32,
                    };
                    let call = client.report_peer(req);
                    if !matches!(tokio::time::timeout(ctx.cfg.call_timeout, call).await, Ok(Ok(_))) {
                        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        }
    };
    ctx.counters.streams_open.fetch_sub(1, Ordering::Relaxed);
    result
}

/// Applies one `SessionDown` to the viewer's node; `false` when the fabric is gone.
async fn apply(ctx: &Ctx, index: usize, down: &SessionDown, neighbours: &mut Vec<PeerId>) -> bool {
    for (substream, parent) in down.parents.iter().filter_map(parent_of) {
        let m = Input::Assign {
            index,
            substream,
            parent,
            research: false,
        };
        if ctx.fabric.send(m).await.is_err() {
            return false;
        }
    }
    if down.neighbours_changed {
        let now: Vec<PeerId> = down.neighbours.iter().map(|n| n.peer_id).collect();
        for &n in now.iter().filter(|n| !neighbours.contains(n)) {
            let m = Input::Neighbour {
                index,
                neighbour: n,
            };
            if ctx.fabric.send(m).await.is_err() {
                return false;
            }
        }
        *neighbours = now;
    }
    true
}

async fn reparent(
    ctx: &Ctx,
    client: &mut ViewerServiceClient<Channel>,
    index: usize,
    session_id: &str,
    substream: u16,
    exclude: Vec<PeerId>,
) {
    let req = ReparentRequest {
        session_id: session_id.to_owned(),
        substream: u32::from(substream),
        exclude_peer_ids: exclude,
    };
    let answer = tokio::time::timeout(ctx.cfg.call_timeout, client.reparent(req)).await;
    let parent = match answer {
        Ok(Ok(r)) => r
            .into_inner()
            .parent
            .as_ref()
            .and_then(parent_of)
            .map(|(_, p)| p),
        _ => {
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            None
        }
    };
    ctx.counters.reparents.fetch_add(1, Ordering::Relaxed);
    let m = match parent {
        Some(parent) => Input::Assign {
            index,
            substream,
            parent,
            research: true,
        },
        None => Input::ResearchFailed { index, substream },
    };
    let _ = ctx.fabric.send(m).await;
}
