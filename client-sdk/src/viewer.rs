//! The viewer: join, receive, reorder, fan out; reconnect and re-join; heartbeat.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_proto::wire::{ErrorCode, Frame, Limits, MAX_BROADCAST_ID, StartAt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::conn::{self, OpenParams, WireConn};
use crate::control::{Control, Counters, JoinInfo, Offer};
use crate::error::{SdkError, is_fatal_code};
use crate::hub::{Hub, HubLimits, Subscription};
use crate::reorder::{Output, PushOutcome, ReorderBuffer, ReorderConfig};
use crate::report::{Baseline, ReportQueue};
use crate::rights::{ChunkCheck, OwnToken, Rights, unix_ms};
use crate::{http, stats::Stats};

/// Everything a viewer can be tuned with. [`ViewerConfig::new`] gives sane defaults.
#[derive(Debug, Clone)]
pub struct ViewerConfig {
    /// The broadcast to play.
    pub broadcast_id: String,
    /// gRPC URL of the control plane (used by [`Viewer::join`]).
    pub control_url: String,
    /// Viewer credential (JWT from the broadcaster's backend), passed to `Join`.
    pub credential: Option<String>,
    /// Chunk token for [`Viewer::connect_direct`] (`Join` supplies its own).
    pub chunk_token: Bytes,
    /// Where the local HTTP endpoint listens; `None` disables it.
    pub http_listen: Option<SocketAddr>,
    /// Limit for one connection attempt (TCP connect + handshake) and control calls.
    pub connect_timeout: Duration,
    /// A data-plane connection silent for this long is considered dead.
    pub idle_timeout: Duration,
    /// First reconnect delay; doubled after each failure up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Cap of the reconnect delay.
    pub reconnect_max: Duration,
    /// Consecutive failed connection attempts after which `Join` is called again (the
    /// broadcast may have moved to another node). Only with a control plane.
    pub rejoin_after_failures: u32,
    /// Reorder window and gap timeout.
    pub reorder: ReorderConfig,
    /// How many recent chunks are kept so that a new consumer starts at once.
    pub history_chunks: usize,
    /// Byte cap of that history.
    pub history_bytes: usize,
    /// Per-consumer queue bound, in chunks. A consumer that falls further behind skips
    /// to the next random-access chunk.
    pub subscriber_queue_chunks: usize,
    /// Largest chunk accepted from the network.
    pub max_chunk_bytes: u32,
    /// Sent to the control plane in `Join`.
    pub client_version: String,
    /// Peer relaying: where to accept peer connections and how much to upload.
    pub relay: RelayConfig,
    /// Play-out lag behind the live edge in the peer grid: chunk `seq` is handed to the
    /// player at its earliest observed availability plus this much, which leaves time
    /// for tree delivery, mesh repair and a last-resort fetch from the data plane.
    /// Default 2 s (the scheduler's default; the p99 lag bar is 3 s). Viewers without a
    /// grid assignment ([`Viewer::connect_direct`], older control planes) play as soon
    /// as chunks are in order, as before.
    pub target_lag: Duration,
    /// How often to send a quality report (`ViewerService.Report`). `None`: the
    /// interval `Join` returns, or 5 s if it returns none.
    pub report_interval: Option<Duration>,
    /// Most reports kept while the control plane is unreachable; beyond it the oldest
    /// are dropped (and counted in [`Stats::reports_dropped`]).
    pub report_queue: usize,
    /// Clock-skew tolerance when checking the chunk tokens of peers that connect to us
    /// (not yet valid / expired). Default 5 s.
    pub token_skew: Duration,
    /// Signature blocks found authentic, shared with the other viewers of this process
    /// (`None`, the default: this viewer checks every signature itself, as a device
    /// does). Only the Ed25519 check of a block already seen is skipped.
    pub verified_signatures: Option<Arc<starling_proto::integrity::VerifiedSignatures>>,
    /// Limits on the connections other peers open to this viewer's peer listener
    /// (handshake deadline and cap, connection cap, request rate).
    pub peer_limits: crate::PeerLimits,
    /// Chunks signed with a key id this viewer does not hold yet (a node restarted,
    /// took over or rotated its key): how many are held while the keys are refreshed
    /// by an early heartbeat, for how long, and how often such heartbeats may go out.
    pub key_hold: crate::KeyHoldLimits,
    /// A peer parent is judged over the last this many chunks it owed on a substream
    /// (1..=64; default 32), and re-searched and reported (`ReportPeer`, non-delivery)
    /// when more than [`ViewerConfig::parent_max_missed`] of them were skipped, late or
    /// never sent. See [`starling_grid::peer::SchedulerConfig::parent_window`].
    pub parent_window: u16,
    /// Default 10 (of 32).
    pub parent_max_missed: u16,
}

/// Report interval when neither the config nor `Join` says.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Peer relaying settings ([`ViewerConfig::relay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Where the peer listener binds. Default `0.0.0.0:0` (any interface, a free port).
    pub listen: SocketAddr,
    /// Host (name or IP) other peers should connect to; the port is the listener's.
    /// `None`: the local IP of the socket this viewer uses to reach the control plane
    /// (the address the network routes to; behind NAT this is the private address, so
    /// set it explicitly when peers are elsewhere).
    pub advertise_host: Option<String>,
    /// Upload budget offered for relaying, in kbit/s. `Some(0)`: never relay (no
    /// listener, `Join` says `upload_kbps = 0`). `Some(n)`: exactly `n`. `None`
    /// (estimated): the SDK offers [`RelayConfig::DEFAULT_UPLOAD_KBPS`], a conservative
    /// figure for a residential uplink, then measures what its uplink drains while the
    /// send queues of its children are backlogged ([`starling_grid::peer::UploadEstimator`]);
    /// if that is clearly below the budget, it lowers the budget (and closes the
    /// children beyond the slots it buys, who re-search). The estimate never raises the
    /// budget. [`Stats::upload_budget_kbps`](crate::Stats::upload_budget_kbps) shows the
    /// budget now. The control plane turns the offer into child slots; pushes to
    /// children are additionally paced to the budget over a 2 s window.
    pub max_upload_kbps: Option<u32>,
    /// Most peer connections accepted from one source address at once (handshakes
    /// included); beyond, `ERROR(SERVER_BUSY)`. Default
    /// [`RelayConfig::DEFAULT_MAX_LINKS_PER_IP`]; 0 = unlimited (e.g. many peers of one
    /// host on loopback, which all connect from 127.0.0.1).
    pub max_links_per_ip: u32,
}

impl RelayConfig {
    /// Initial upload budget offered when [`RelayConfig::max_upload_kbps`] is `None`
    /// (then only ever lowered by the estimate): 2 Mbit/s, below most residential
    /// uplinks, and two copies of a 1 Mbit/s stream.
    pub const DEFAULT_UPLOAD_KBPS: u32 = 2_000;
    /// Default of [`RelayConfig::max_links_per_ip`]: a household behind one NAT address
    /// runs a few viewers; an attacker with one address cannot take more.
    pub const DEFAULT_MAX_LINKS_PER_IP: u32 = 8;

    /// Defaults: listen on `0.0.0.0:0`, advertise the local IP, estimated budget.
    pub fn new() -> RelayConfig {
        RelayConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            advertise_host: None,
            max_upload_kbps: None,
            max_links_per_ip: Self::DEFAULT_MAX_LINKS_PER_IP,
        }
    }

    /// A configuration that never relays.
    pub fn disabled() -> RelayConfig {
        RelayConfig {
            max_upload_kbps: Some(0),
            ..RelayConfig::new()
        }
    }

    /// The budget offered to the control plane, kbit/s (0 = never relay).
    pub fn upload_kbps(&self) -> u32 {
        self.max_upload_kbps.unwrap_or(Self::DEFAULT_UPLOAD_KBPS)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig::new()
    }
}

impl ViewerConfig {
    /// Defaults for `broadcast_id`: control plane at `http://127.0.0.1:7000`, HTTP
    /// endpoint on `127.0.0.1:0`, reconnect 100 ms .. 5 s.
    pub fn new(broadcast_id: impl Into<String>) -> ViewerConfig {
        ViewerConfig {
            broadcast_id: broadcast_id.into(),
            control_url: "http://127.0.0.1:7000".into(),
            credential: None,
            chunk_token: Bytes::new(),
            http_listen: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            rejoin_after_failures: 3,
            reorder: ReorderConfig::default(),
            history_chunks: 64,
            history_bytes: 32 * 1024 * 1024,
            subscriber_queue_chunks: 64,
            max_chunk_bytes: 4 * 1024 * 1024,
            client_version: concat!("starling-sdk/", env!("CARGO_PKG_VERSION")).into(),
            relay: RelayConfig::new(),
            target_lag: starling_grid::peer::SchedulerConfig::default().target_lag,
            report_interval: None,
            report_queue: 64,
            token_skew: Duration::from_secs(5),
            verified_signatures: None,
            peer_limits: crate::PeerLimits::default(),
            key_hold: crate::KeyHoldLimits::default(),
            parent_window: starling_grid::peer::SchedulerConfig::default().parent_window,
            parent_max_missed: starling_grid::peer::SchedulerConfig::default().parent_max_missed,
        }
    }

    fn validate(&self) -> Result<(), SdkError> {
        if self.broadcast_id.is_empty() || self.broadcast_id.len() > MAX_BROADCAST_ID {
            return Err(SdkError::Config(format!(
                "broadcast id must be 1..={MAX_BROADCAST_ID} bytes"
            )));
        }
        if self.target_lag.is_zero() || self.target_lag > Duration::from_secs(60) {
            return Err(SdkError::Config(
                "target_lag must be in (0, 60 s]".to_string(),
            ));
        }
        self.peer_limits
            .validate()
            .map_err(|e| SdkError::Config(e.to_string()))?;
        if self
            .report_interval
            .is_some_and(|d| d < Duration::from_millis(10))
        {
            return Err(SdkError::Config(
                "report_interval must be at least 10 ms".to_string(),
            ));
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            max_chunk_payload: self.max_chunk_bytes.saturating_add(32),
            ..Limits::default()
        }
    }
}

/// Control-plane session state (changes on re-join).
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) heartbeat: Duration,
    /// The counters when this session started (its reports count from there).
    pub(crate) baseline: Baseline,
}

pub(crate) struct Shared {
    pub(crate) broadcast_id: String,
    pub(crate) hub: Hub,
    stats: Mutex<Stats>,
    pub(crate) started: Instant,
    /// `None` while running; the end result once stopping.
    end: watch::Sender<Option<Result<(), SdkError>>>,
    session: Mutex<Option<Session>>,
    /// Our token, the key sets, revoked peers.
    pub(crate) rights: Rights,
    reports: Mutex<ReportQueue>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// True once the viewer is stopping.
    pub(crate) fn is_finished(&self) -> bool {
        self.end.borrow().is_some()
    }

    /// Replaces the control-plane session (after a re-join); returns the old one. The
    /// new session's reports count from the counters now.
    pub(crate) fn replace_session(&self, id: String, heartbeat: Duration) -> Option<Session> {
        let baseline = Baseline::of(&self.stats_mut());
        lock(&self.session).replace(Session {
            id,
            heartbeat,
            baseline,
        })
    }

    /// The current session and the counters its reports start from.
    pub(crate) fn session_for_report(&self) -> Option<(String, Baseline)> {
        lock(&self.session)
            .as_ref()
            .map(|s| (s.id.clone(), s.baseline))
    }

    pub(crate) fn reports(&self) -> MutexGuard<'_, ReportQueue> {
        lock(&self.reports)
    }

    /// A chunk was handed to the player: counters, start-up time, lag behind live.
    pub(crate) fn played(&self, c: &starling_proto::wire::Chunk) {
        let mut s = self.stats_mut();
        if s.startup_time.is_none() {
            s.startup_time = Some(self.started.elapsed());
        }
        s.chunks_out += 1;
        s.chunks_played += 1;
        s.bytes_out += c.payload.len() as u64;
        s.current_seq = Some(c.seq);
        if c.timestamp_ms > 0 {
            s.lag = Some(Duration::from_millis(
                unix_ms().saturating_sub(c.timestamp_ms),
            ));
        }
    }

    /// Checks a received chunk and counts the outcome (bad chunks are counted by the
    /// caller, which knows where the chunk came from).
    pub(crate) fn check_chunk(&self, c: &starling_proto::wire::Chunk) -> ChunkCheck {
        let r = self.rights.check_chunk(c);
        match &r {
            ChunkCheck::Verified { .. } => self.stats_mut().chunks_verified += 1,
            ChunkCheck::Unverified => self.stats_mut().chunks_unverified += 1,
            ChunkCheck::Bad(_) => {}
        }
        r
    }

    /// Records why the viewer stops (the first reason wins) and tells every task.
    pub(crate) fn finish(&self, result: Result<(), SdkError>) {
        self.end.send_if_modified(|end| {
            if end.is_none() {
                *end = Some(result);
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn stop_signal(&self) -> watch::Receiver<Option<Result<(), SdkError>>> {
        self.end.subscribe()
    }

    pub(crate) fn stats_mut(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }
}

/// Resolves when the viewer is stopping.
pub(crate) async fn stopped(rx: &mut watch::Receiver<Option<Result<(), SdkError>>>) {
    let _ = rx.wait_for(|e| e.is_some()).await;
}

/// A joined broadcast. Dropping it stops everything (and leaves, best effort).
pub struct Viewer {
    shared: Arc<Shared>,
    control: Option<Control>,
    local_addr: Option<SocketAddr>,
    peer_addr: Option<String>,
    tasks: Vec<JoinHandle<()>>,
    left: bool,
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
    /// Joins `config.broadcast_id` through the control plane at `config.control_url`,
    /// connects to the data-plane node it names and subscribes at the live edge.
    /// Returns once the data plane has accepted the subscription (`STREAM_INFO`);
    /// refusals (unknown broadcast, no rights...) come back as typed errors.
    ///
    /// With a grid assignment (a control plane that returns parents), the viewer also
    /// relays: it listens for peer connections ([`ViewerConfig::relay`]), receives each
    /// substream from its assigned parent, repairs gaps from mesh neighbours and plays
    /// out [`ViewerConfig::target_lag`] behind live. Without one (an older control
    /// plane), it receives the whole stream from the data plane as before.
    pub async fn join(config: ViewerConfig) -> Result<Viewer, SdkError> {
        config.validate()?;
        let started = Instant::now();
        let listener = bind_http(&config).await?;
        let control = Control::new(
            &config.control_url,
            &config.broadcast_id,
            config.credential.as_deref(),
            &config.client_version,
            config.connect_timeout,
            crate::control::control_bind_ip(config.relay.listen.ip(), &config.control_url),
        )?;
        let (peer_listener, offer) = prepare_relay(&config).await?;
        let join = control.join(&offer).await?;
        let target = Target {
            wire_addr: join.wire_addr.clone(),
        };
        let grid = !join.assignment.parents.is_empty();
        let k = grid_substreams(&join);
        let first_mask = if grid {
            first_dp_mask(&join, k)
        } else {
            starling_proto::wire::ALL_SUBSTREAMS
        };
        let first = match open_conn(&config, &target, &join.token, StartAt::Live, first_mask).await
        {
            Ok(c) => c,
            Err(e) => {
                let _ =
                    tokio::time::timeout(config.connect_timeout, control.leave(&join.session_id))
                        .await;
                return Err(e);
            }
        };
        if !grid {
            drop(peer_listener);
            return Ok(Viewer::start(
                config,
                started,
                listener,
                Some((control, join)),
                target,
                first,
            ));
        }
        Viewer::start_grid(
            config,
            started,
            listener,
            control,
            join,
            offer,
            peer_listener,
            first,
            first_mask,
            k,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start_grid(
        config: ViewerConfig,
        started: Instant,
        listener: Option<TcpListener>,
        control: Control,
        join: JoinInfo,
        offer: Offer,
        peer_listener: Option<TcpListener>,
        first: WireConn,
        first_mask: u64,
        k: u16,
    ) -> Result<Viewer, SdkError> {
        let shared = new_shared(&config, started, Some(&join));
        shared.stats_mut().peer_id = Some(join.peer_id);
        let report_every = report_interval(&config, &join);
        let mut tasks = Vec::new();
        let local_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = listener {
            tasks.push(tokio::spawn(http::serve(listener, shared.clone())));
        }
        let chunk_ms = join
            .params
            .as_ref()
            .map(|p| p.chunk_duration_ms)
            .filter(|&ms| ms > 0)
            .unwrap_or(if first.info.chunk_duration_ms > 0 {
                first.info.chunk_duration_ms
            } else {
                1000
            });
        tracing::info!(
            peer_id = join.peer_id,
            substreams = k,
            chunk_ms,
            child_slots = join.child_slots,
            stream_kbps = join.stream_kbps,
            peer_addr = offer.peer_addr,
            "joined the peer grid"
        );
        let peer_addr = (!offer.peer_addr.is_empty()).then(|| offer.peer_addr.clone());
        let (events, engine_tasks) = crate::relay::start(crate::relay::GridSetup {
            shared: shared.clone(),
            control: control.clone(),
            join,
            offer,
            first,
            first_mask,
            listener: peer_listener,
            k,
            chunk: Duration::from_millis(u64::from(chunk_ms)),
            lag: config.target_lag,
            upload_kbps: config.relay.upload_kbps(),
            estimate_upload: config.relay.max_upload_kbps.is_none(),
            limits: config.limits(),
            peer_limits: config.peer_limits,
            key_hold: config.key_hold,
            parent_window: config.parent_window,
            parent_max_missed: config.parent_max_missed,
            idle: config.idle_timeout,
            connect_timeout: config.connect_timeout,
            reconnect_initial: config.reconnect_initial,
            reconnect_max: config.reconnect_max,
            rejoin_after_failures: config.rejoin_after_failures,
            max_links_per_ip: config.relay.max_links_per_ip,
        })?;
        tasks.extend(engine_tasks);
        tasks.push(tokio::spawn(heartbeat_loop(
            control.clone(),
            shared.clone(),
            Some(events),
            config.relay.upload_kbps(),
            config.key_hold.min_interval,
        )));
        tasks.push(tokio::spawn(crate::report::report_loop(
            control.clone(),
            shared.clone(),
            report_every,
        )));
        Ok(Viewer {
            shared,
            control: Some(control),
            local_addr,
            peer_addr,
            tasks,
            left: false,
        })
    }

    /// Connects straight to a data-plane wire address (`host:port`), without a control
    /// plane: for standalone data planes and tests. `config.chunk_token` is sent in
    /// `HELLO`.
    pub async fn connect_direct(
        wire_addr: impl Into<String>,
        config: ViewerConfig,
    ) -> Result<Viewer, SdkError> {
        config.validate()?;
        let started = Instant::now();
        let listener = bind_http(&config).await?;
        let target = Target {
            wire_addr: wire_addr.into(),
        };
        let first = open_conn(
            &config,
            &target,
            &config.chunk_token,
            StartAt::Live,
            starling_proto::wire::ALL_SUBSTREAMS,
        )
        .await?;
        Ok(Viewer::start(
            config, started, listener, None, target, first,
        ))
    }

    fn start(
        config: ViewerConfig,
        started: Instant,
        listener: Option<TcpListener>,
        control: Option<(Control, JoinInfo)>,
        target: Target,
        first: WireConn,
    ) -> Viewer {
        let shared = new_shared(&config, started, control.as_ref().map(|(_, j)| j));
        let mut tasks = Vec::new();
        let local_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = listener {
            tasks.push(tokio::spawn(http::serve(listener, shared.clone())));
        }
        let report_every = control.as_ref().map(|(_, j)| report_interval(&config, j));
        let control = control.map(|(c, _)| c);
        if let Some(c) = &control {
            tasks.push(tokio::spawn(heartbeat_loop(
                c.clone(),
                shared.clone(),
                None,
                0,
                config.key_hold.min_interval,
            )));
            if let Some(every) = report_every {
                tasks.push(tokio::spawn(crate::report::report_loop(
                    c.clone(),
                    shared.clone(),
                    every,
                )));
            }
        }
        let receiver = Receiver {
            shared: shared.clone(),
            reorder: ReorderBuffer::new(config.reorder),
            control: control.clone(),
            target,
            config,
            chunk_ms: 1000,
        };
        tasks.push(tokio::spawn(receiver.run(first)));
        Viewer {
            shared,
            control,
            local_addr,
            peer_addr: None,
            tasks,
            left: false,
        }
    }

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
        lock(&self.shared.session).as_ref().map(|s| s.id.clone())
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
        s
    }

    /// True once the viewer has stopped (or is stopping).
    pub fn is_closed(&self) -> bool {
        self.shared.end.borrow().is_some()
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
        if let Some(c) = &self.control {
            // The final report, then whatever is still queued (bounded in time).
            crate::report::enqueue(&self.shared, true);
            let _ = tokio::time::timeout(
                Duration::from_secs(3),
                crate::report::flush(c, &self.shared),
            )
            .await;
        }
        let session = lock(&self.shared.session).take();
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
        if let (Some(c), Some(s), Ok(rt)) = (
            self.control.clone(),
            lock(&self.shared.session).take(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(3), c.leave(&s.id)).await;
            });
        }
    }
}

fn new_shared(config: &ViewerConfig, started: Instant, join: Option<&JoinInfo>) -> Arc<Shared> {
    let hub = Hub::new(HubLimits {
        history_chunks: config.history_chunks,
        history_bytes: config.history_bytes,
        queue_chunks: config.subscriber_queue_chunks,
    });
    if let Some(ct) = join
        .and_then(|j| j.params.as_ref())
        .map(|p| p.content_type.as_str())
    {
        hub.set_content_type(ct);
    }
    let (end, _) = watch::channel(None);
    let rights = match join {
        Some(j) => Rights::new(
            &config.broadcast_id,
            config.token_skew,
            OwnToken {
                token: j.token.clone(),
                expires_at_ms: j.token_expires_at_ms,
            },
            &j.token_keys,
            &j.chunk_keys,
            config.verified_signatures.clone(),
        ),
        None => Rights::new(
            &config.broadcast_id,
            config.token_skew,
            OwnToken {
                token: config.chunk_token.clone(),
                expires_at_ms: 0,
            },
            &[],
            &[],
            None,
        ),
    };
    Arc::new(Shared {
        broadcast_id: config.broadcast_id.clone(),
        hub,
        stats: Mutex::new(Stats::default()),
        started,
        end,
        session: Mutex::new(join.map(|j| Session {
            id: j.session_id.clone(),
            heartbeat: j.heartbeat,
            baseline: Baseline::default(),
        })),
        rights,
        reports: Mutex::new(ReportQueue::new(config.report_queue)),
    })
}

/// The report interval: the config's override, else `Join`'s, else 5 s.
fn report_interval(config: &ViewerConfig, join: &JoinInfo) -> Duration {
    config
        .report_interval
        .or(join.report_interval)
        .unwrap_or(DEFAULT_REPORT_INTERVAL)
}

/// Number of substreams of a grid assignment: the stream parameters', else as many as
/// the parents list covers (1..=64).
fn grid_substreams(join: &JoinInfo) -> u16 {
    let k = join.params.as_ref().map_or(0, |p| p.substreams);
    let k = if k == 0 {
        join.assignment
            .parents
            .iter()
            .map(|(s, _)| s.saturating_add(1))
            .max()
            .unwrap_or(1)
    } else {
        k
    };
    u16::try_from(k.clamp(1, 64)).unwrap_or(64)
}

/// The substreams the data plane feeds in a join's assignment (all = the whole stream).
fn first_dp_mask(join: &JoinInfo, k: u16) -> u64 {
    let all = if k >= 64 { u64::MAX } else { (1u64 << k) - 1 };
    let mut mask = all;
    for (s, p) in &join.assignment.parents {
        if *s < u32::from(k)
            && let Some(p) = p.peer()
            && p.id != join.peer_id
        {
            mask &= !(1u64 << s);
        }
    }
    if mask == all {
        starling_proto::wire::ALL_SUBSTREAMS
    } else {
        mask
    }
}

/// Binds the peer listener (unless relaying is off) and works out what to offer in
/// `Join`.
async fn prepare_relay(config: &ViewerConfig) -> Result<(Option<TcpListener>, Offer), SdkError> {
    let upload = config.relay.upload_kbps();
    if upload == 0 {
        return Ok((None, Offer::default()));
    }
    let listen = config.relay.listen;
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| SdkError::PeerBind {
            addr: listen.to_string(),
            source: e.into(),
        })?;
    let port = l.local_addr()?.port();
    let host = match &config.relay.advertise_host {
        Some(h) if !h.is_empty() => h.clone(),
        _ => local_ip(listen, &config.control_url).await.to_string(),
    };
    let peer_addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((
        Some(l),
        Offer {
            peer_addr,
            upload_kbps: upload,
        },
    ))
}

/// The IP other peers should use: the listener's if it is bound to one, else the local
/// address of a (never used) UDP socket connected towards the control plane, else
/// loopback.
async fn local_ip(listen: SocketAddr, control_url: &str) -> IpAddr {
    if !listen.ip().is_unspecified() {
        return listen.ip();
    }
    let authority = control_url
        .split("://")
        .nth(1)
        .unwrap_or(control_url)
        .split('/')
        .next()
        .unwrap_or_default();
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    if let Ok(Ok(mut addrs)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(authority)).await
        && let Some(a) = addrs.next()
    {
        let bind: SocketAddr = if a.is_ipv4() {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        } else {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0)
        };
        if let Ok(u) = tokio::net::UdpSocket::bind(bind).await
            && u.connect(a).await.is_ok()
            && let Ok(la) = u.local_addr()
            && !la.ip().is_unspecified()
        {
            return la.ip();
        }
    }
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

async fn bind_http(config: &ViewerConfig) -> Result<Option<TcpListener>, SdkError> {
    match config.http_listen {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|e| SdkError::HttpBind {
                addr: addr.to_string(),
                source: e.into(),
            }),
    }
}

#[derive(Debug, Clone)]
struct Target {
    wire_addr: String,
}

async fn open_conn(
    config: &ViewerConfig,
    target: &Target,
    token: &Bytes,
    start: StartAt,
    mask: u64,
) -> Result<WireConn, SdkError> {
    conn::open(OpenParams {
        addr: &target.wire_addr,
        token,
        broadcast_id: &config.broadcast_id,
        start,
        limits: config.limits(),
        timeout: config.connect_timeout,
        role: starling_proto::wire::Role::Viewer,
        mask,
        tickets: &[],
    })
    .await
}

async fn heartbeat_loop(
    control: Control,
    shared: Arc<Shared>,
    grid: Option<tokio::sync::mpsc::Sender<crate::relay::Ev>>,
    offered_kbps: u32,
    refresh_every: Duration,
) {
    let mut stop = shared.stop_signal();
    let mut last_beat = tokio::time::Instant::now();
    loop {
        let Some(session) = lock(&shared.session).clone() else {
            return;
        };
        // A chunk named a key id we do not hold: beat early (at most every
        // `refresh_every`) to get the current keys.
        let early = async {
            shared.rights.key_refresh_asked().await;
            tokio::time::sleep_until(last_beat + refresh_every).await;
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(session.heartbeat) => {}
            () = early => {
                shared.stats_mut().key_refreshes += 1;
                tracing::debug!("early heartbeat for the current keys");
            }
        }
        last_beat = tokio::time::Instant::now();
        // Every key refresh asked for until now is answered by this beat.
        let ticket = shared.rights.key_refresh_tickets();
        let counters = {
            let s = shared.stats_mut();
            Counters {
                bytes_from_server: s.bytes_from_server,
                bytes_from_peers: s.bytes_from_peers,
                bytes_uploaded: s.bytes_uploaded,
                // Only a budget the upload estimate lowered below the join offer is
                // news to the control plane (0 = unchanged, no slot recount).
                upload_kbps: if s.upload_budget_kbps < offered_kbps {
                    s.upload_budget_kbps
                } else {
                    0
                },
            }
        };
        let call = tokio::time::timeout(session.heartbeat.max(Duration::from_secs(1)), async {
            control.heartbeat(&session.id, counters).await
        });
        let r = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = call => r,
        };
        match r {
            Ok(Ok(hb)) if hb.active => {
                let current = lock(&shared.session).as_ref().map(|s| s.id.clone());
                if current.as_deref() != Some(session.id.as_str()) {
                    // Answer for a session replaced meanwhile (re-join): stale.
                    continue;
                }
                shared.rights.update_keys(&hb.token_keys, &hb.chunk_keys);
                shared.rights.keys_refreshed(ticket);
                if !hb.token.is_empty() {
                    shared.rights.set_token(OwnToken {
                        token: hb.token,
                        expires_at_ms: hb.token_expires_at_ms,
                    });
                    shared.stats_mut().token_renewals += 1;
                }
                if !hb.revoked.is_empty() {
                    shared.rights.revoke(&hb.revoked);
                    if let Some(g) = &grid {
                        // Also closes links with them; if the queue is full, the next
                        // beat repeats the list.
                        let _ = g.try_send(crate::relay::Ev::Revoked(hb.revoked));
                    }
                }
                if let Some(g) = &grid
                    && !hb.assignment.parents.is_empty()
                {
                    // A full engine queue only delays the update to the next beat.
                    let _ = g.try_send(crate::relay::Ev::Assignment(hb.assignment));
                }
            }
            Ok(Ok(_)) => {
                // A re-join may have replaced the session meanwhile: only stop if the
                // inactive one is still current.
                let current = lock(&shared.session).as_ref().map(|s| s.id.clone());
                if current.as_deref() == Some(session.id.as_str()) {
                    tracing::info!(session = session.id, "control plane: session inactive");
                    shared.finish(Err(SdkError::SessionInactive));
                    return;
                }
            }
            Ok(Err(e)) => tracing::warn!("heartbeat failed (still playing): {e}"),
            Err(_) => tracing::warn!("heartbeat timed out (still playing)"),
        }
    }
}

/// How a data-plane session ended.
enum SessionEnd {
    /// The viewer is stopping.
    Stop,
    /// Cannot continue with this node/token.
    Fatal(SdkError),
    /// Connection lost or transient refusal: reconnect.
    Lost(SdkError),
}

struct Receiver {
    shared: Arc<Shared>,
    config: ViewerConfig,
    control: Option<Control>,
    target: Target,
    reorder: ReorderBuffer,
    /// Duration of the last chunk received (for stall durations).
    chunk_ms: u64,
}

impl Receiver {
    async fn run(mut self, first: WireConn) {
        let result = self.run_inner(first).await;
        match &result {
            Ok(()) => tracing::debug!("receiver stopped"),
            Err(e) => tracing::warn!("viewer stopped: {e}"),
        }
        self.shared.finish(result);
        self.shared.hub.close();
        self.shared.stats_mut().connected = false;
    }

    async fn run_inner(&mut self, first: WireConn) -> Result<(), SdkError> {
        let mut stop = self.shared.stop_signal();
        let mut conn = Some(first);
        let mut backoff = self.config.reconnect_initial;
        let mut failures: u32 = 0;
        let mut need_rejoin = false;
        // Whether the last fatal refusal came right after a fresh Join (then a re-join
        // cannot help).
        let mut fresh_join = true;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => {
                    tokio::select! {
                        _ = stopped(&mut stop) => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.reconnect_max);
                    if need_rejoin {
                        match self.rejoin(&mut stop).await {
                            Ok(true) => {
                                need_rejoin = false;
                                fresh_join = true;
                                failures = 0;
                            }
                            Ok(false) => return Ok(()),
                            Err(e) if e.is_fatal() => return Err(e),
                            // Control plane down: keep trying the node we know.
                            Err(e) => tracing::warn!("re-join failed: {e}"),
                        }
                    }
                    let start = self
                        .reorder
                        .next_expected()
                        .map_or(StartAt::Live, StartAt::Seq);
                    tracing::info!(addr = self.target.wire_addr, ?start, "reconnecting");
                    let token = self.shared.rights.token();
                    let r = tokio::select! {
                        _ = stopped(&mut stop) => return Ok(()),
                        r = open_conn(&self.config, &self.target, &token, start, starling_proto::wire::ALL_SUBSTREAMS) => r,
                    };
                    match r {
                        Ok(c) => {
                            self.shared.stats_mut().reconnects += 1;
                            c
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(failures, "reconnect failed: {e}");
                            if let Some(err) = self.classify(e, &mut need_rejoin, fresh_join) {
                                return Err(err);
                            }
                            if self.control.is_some()
                                && failures >= self.config.rejoin_after_failures.max(1)
                            {
                                need_rejoin = true;
                            }
                            continue;
                        }
                    }
                }
            };
            let before = self.shared.stats_mut().chunks_received;
            match self.serve(c, &mut stop).await {
                SessionEnd::Stop => return Ok(()),
                SessionEnd::Fatal(e) | SessionEnd::Lost(e) if self.made_progress(before) => {
                    // The session worked for a while: start over with a short delay.
                    failures = 0;
                    fresh_join = false;
                    backoff = self.config.reconnect_initial;
                    tracing::info!("data-plane session ended: {e}");
                    if let Some(err) = self.classify(e, &mut need_rejoin, false) {
                        return Err(err);
                    }
                }
                SessionEnd::Fatal(e) | SessionEnd::Lost(e) => {
                    failures += 1;
                    tracing::warn!("data-plane session ended: {e}");
                    if let Some(err) = self.classify(e, &mut need_rejoin, fresh_join) {
                        return Err(err);
                    }
                }
            }
        }
    }

    fn made_progress(&self, chunks_before: u64) -> bool {
        self.shared.stats_mut().chunks_received > chunks_before
    }

    /// Decides what an error means: `Some(err)` = stop with it; otherwise retry, maybe
    /// after a re-join.
    fn classify(&self, e: SdkError, need_rejoin: &mut bool, fresh_join: bool) -> Option<SdkError> {
        match &e {
            SdkError::BroadcastEnded(_) | SdkError::VersionMismatch(_) | SdkError::Config(_) => {
                Some(e)
            }
            SdkError::Server { code, .. } if *code == ErrorCode::BroadcastStopped => {
                Some(SdkError::BroadcastEnded(e.to_string()))
            }
            // Revoked: no Join will help.
            SdkError::Server { code, .. } if *code == ErrorCode::Revoked => Some(e),
            SdkError::Server { code, .. } if is_fatal_code(*code) => {
                // The node may have lost the broadcast (moved) or the token expired: a
                // fresh Join can fix both, once.
                if self.control.is_some() && !fresh_join {
                    *need_rejoin = true;
                    None
                } else {
                    Some(e)
                }
            }
            SdkError::Server { code, .. } if *code == ErrorCode::ShuttingDown => {
                if self.control.is_some() {
                    *need_rejoin = true;
                }
                None
            }
            _ => None,
        }
    }

    /// Calls `Join` again. `Ok(false)` = the viewer is stopping.
    async fn rejoin(
        &mut self,
        stop: &mut watch::Receiver<Option<Result<(), SdkError>>>,
    ) -> Result<bool, SdkError> {
        let Some(control) = self.control.clone() else {
            return Ok(true);
        };
        let offer = Offer::default();
        let join = tokio::select! {
            _ = stopped(stop) => return Ok(false),
            r = control.join(&offer) => r?,
        };
        tracing::info!(
            addr = join.wire_addr,
            session = join.session_id,
            "re-joined via the control plane"
        );
        let old = self
            .shared
            .replace_session(join.session_id.clone(), join.heartbeat);
        if let Some(old) = old.filter(|o| o.id != join.session_id) {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(3), control.leave(&old.id)).await;
            });
        }
        if let Some(p) = &join.params {
            self.shared.hub.set_content_type(&p.content_type);
        }
        self.shared.rights.rejoined(
            OwnToken {
                token: join.token.clone(),
                expires_at_ms: join.token_expires_at_ms,
            },
            &join.token_keys,
            &join.chunk_keys,
        );
        self.target = Target {
            wire_addr: join.wire_addr,
        };
        self.shared.stats_mut().rejoins += 1;
        Ok(true)
    }

    async fn serve(
        &mut self,
        mut conn: WireConn,
        stop: &mut watch::Receiver<Option<Result<(), SdkError>>>,
    ) -> SessionEnd {
        tracing::debug!(addr = conn.addr, info = ?conn.info, "subscribed");
        self.shared.hub.set_content_type(&conn.info.content_type);
        {
            let mut s = self.shared.stats_mut();
            s.connected = true;
            s.live_seq = Some(conn.info.live_seq);
        }
        if let Some(next) = self.reorder.next_expected()
            && conn.info.first_seq > next
        {
            // The server cannot resume where we are: it starts later.
            self.reorder.skip_before(conn.info.first_seq);
            self.flush();
        }
        let mut token = self.shared.rights.watch_token();
        token.mark_unchanged();
        let end = loop {
            let deadline = self.reorder.deadline();
            let frame = tokio::select! {
                _ = stopped(stop) => {
                    conn.close().await;
                    return SessionEnd::Stop;
                }
                r = token.changed() => {
                    if r.is_ok() {
                        let t = token.borrow_and_update().token.clone();
                        if !t.is_empty()
                            && let Err(e) = conn.send(&Frame::Token(t)).await
                        {
                            break SessionEnd::Lost(e);
                        }
                    }
                    continue;
                }
                _ = sleep_until_opt(deadline) => {
                    self.reorder.handle_timeout(Instant::now());
                    self.flush();
                    continue;
                }
                r = tokio::time::timeout(self.config.idle_timeout, conn.next_frame()) => match r {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => break SessionEnd::Lost(e),
                    Err(_) => break SessionEnd::Lost(SdkError::Timeout("waiting for data")),
                },
            };
            match frame {
                Frame::Chunk(mut c) => {
                    let len = c.payload.len() as u64;
                    {
                        let mut s = self.shared.stats_mut();
                        s.chunks_received += 1;
                        s.bytes_received += len;
                        s.bytes_from_server += len;
                    }
                    match self.shared.check_chunk(&c) {
                        ChunkCheck::Verified { flags } => {
                            // Keep the per-receiver DISCONTINUITY hint for the reorder
                            // buffer; the stored flags are the signed ones otherwise.
                            c.flags = flags
                                | (c.flags & starling_proto::wire::chunk_flags::DISCONTINUITY);
                        }
                        ChunkCheck::Unverified => {}
                        ChunkCheck::Bad(e) => {
                            tracing::warn!(
                                seq = c.seq,
                                "data plane sent a bad chunk (dropped): {e}"
                            );
                            self.shared.stats_mut().bad_chunks_from_server += 1;
                            continue;
                        }
                    }
                    if c.duration_ms > 0 {
                        self.chunk_ms = u64::from(c.duration_ms);
                    }
                    let outcome = self.reorder.push(c, Instant::now());
                    if outcome != PushOutcome::Accepted {
                        self.shared.stats_mut().duplicates += 1;
                    }
                    self.flush();
                }
                // We are the client on this link: a TOKEN or TICKET from the server
                // means nothing.
                Frame::Token(_) | Frame::Ticket(_) => {}
                Frame::Ping(n) => {
                    if let Err(e) = conn.send(&Frame::Pong(n)).await {
                        break SessionEnd::Lost(e);
                    }
                }
                // Peer-grid frames are not used on the data-plane session yet.
                Frame::Pong(_) | Frame::BufferMap(_) | Frame::Request(_) | Frame::NotFound(_) => {}
                Frame::StreamInfo(info) => {
                    self.shared.hub.set_content_type(&info.content_type);
                    self.shared.stats_mut().live_seq = Some(info.live_seq);
                }
                Frame::Error(r) => {
                    let e = SdkError::Server {
                        code: r.code,
                        message: r.message,
                    };
                    break if is_fatal_code(r.code) {
                        SessionEnd::Fatal(e)
                    } else {
                        SessionEnd::Lost(e)
                    };
                }
                Frame::Goodbye(r) => {
                    break if r.code == ErrorCode::BroadcastStopped {
                        SessionEnd::Fatal(SdkError::BroadcastEnded(r.message))
                    } else {
                        SessionEnd::Lost(SdkError::Server {
                            code: r.code,
                            message: r.message,
                        })
                    };
                }
                Frame::Hello(_) | Frame::HelloAck(_) | Frame::Subscribe(_) => {
                    break SessionEnd::Lost(SdkError::Protocol(
                        "unexpected handshake frame mid-stream".into(),
                    ));
                }
            }
        };
        self.shared.stats_mut().connected = false;
        end
    }

    /// Moves everything the reorder buffer has ready to the consumers.
    fn flush(&mut self) {
        while let Some(out) = self.reorder.pop() {
            match out {
                Output::Chunk(c) => {
                    self.shared.played(&c);
                    {
                        let mut s = self.shared.stats_mut();
                        if s.live_seq.is_none_or(|l| l < c.seq) {
                            s.live_seq = Some(c.seq);
                        }
                    }
                    self.shared.hub.publish(c);
                }
                Output::Discontinuity {
                    expected,
                    resumed_at,
                    reason,
                } => {
                    tracing::info!(expected, resumed_at, ?reason, "discontinuity");
                    let skipped = resumed_at.saturating_sub(expected);
                    let mut s = self.shared.stats_mut();
                    s.discontinuities += 1;
                    s.chunks_skipped += skipped;
                    // A gap in the output is a stall of the skipped chunks' duration.
                    if skipped > 0 {
                        s.stalls += 1;
                        s.stall_time +=
                            Duration::from_millis(skipped.saturating_mul(self.chunk_ms));
                    }
                    drop(s);
                    self.shared.hub.discontinuity();
                }
            }
        }
        let waiting = self.reorder.pending_len() as u64;
        self.shared.stats_mut().buffer = Duration::from_millis(waiting * self.chunk_ms);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
