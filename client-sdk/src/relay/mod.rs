//! The peer-grid networking around the sans-IO [`PeerScheduler`].
//!
//! One engine task owns the scheduler, a chunk store keyed by sequence number (the
//! scheduler's bounded window) and the table of links. Every connection has a reader
//! and a writer task ([`link`]) that talk to the engine over bounded channels. The
//! engine turns frames, link events, control-plane answers and a periodic tick into
//! scheduler events, and executes the scheduler's [`Action`]s: pushes and answers go
//! into the per-link queues, play-out goes to the [`crate::hub::Hub`].
//!
//! Links:
//! * the **data plane**, always open (reconnected with backoff), subscribed with the
//!   mask of the substreams it feeds (0 = none, then only used for `REQUEST`s);
//! * one **outgoing peer link** per distinct parent or neighbour peer, subscribed with
//!   the mask of the substreams that peer feeds us (0 for a pure neighbour);
//! * **incoming links** from the peer listener: children (mask ≠ 0, admitted only for
//!   substreams a parent ticket covers, up to twice the `child_slots` substream
//!   subscriptions in total; `ERROR(UNAUTHORIZED)` / `ERROR(SERVER_BUSY)` otherwise,
//!   see [`admission`]) and neighbours (mask 0: buffer maps both ways,
//!   `REQUEST`/`NOT_FOUND`). Only a viewer whose token has `RELAY` listens.
//!
//! Misbehaviour (malformed frames, chunks nobody asked for, a wrong broadcast) costs the
//! offending link only.
//!
//! Rights and integrity: every link says `HELLO` with our current chunk token and gets
//! a `TOKEN` frame when a heartbeat renews it. Peers connecting to us are admitted on a
//! valid token (checked by the listener); the engine remembers each one's peer id and
//! expiry, accepts `TOKEN` renewals for the same peer id, and closes a link whose token
//! expired with `GOODBYE(TOKEN_EXPIRED)`. Revoked peers (heartbeat) lose their links
//! with `GOODBYE(REVOKED)`. A peer whose chunk fails verification is closed with
//! `ERROR(BAD_CHUNK)`, reported (`ReportPeer`) and never used again as a parent or
//! neighbour by this viewer; the chunk stays missing for the scheduler, which fetches it
//! elsewhere.

pub(crate) mod admission;
mod complaints;
pub(crate) mod keys;
pub(crate) mod link;
pub(crate) mod listener_limits;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_proto::wire::{
    self, BufferMapFrame, Chunk, ErrorCode, Frame, Limits, Role, StartAt, StreamInfo, Subscribe,
    chunk_flags,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::control::{Assignment, Control, JoinInfo, Offer, Parent, Peer, Ticket};
use crate::error::{SdkError, is_fatal_code};
use crate::rights::{Grant, OwnToken, unix_ms};
use crate::viewer::{Shared, stopped};
use admission::{Ask, IpLimiter, TicketBook, Tickets};
use link::{AcceptCtx, Dial, LinkHandle, LinkId, Out, QueueError, reason};
use starling_grid::Parent as Upstream;
use starling_grid::peer::{
    Action, BufferMap, ChildPace, PeerScheduler, SchedulerConfig, Source, UploadEstimator,
    UploadEstimatorConfig,
};
use starling_proto::integrity::IntegrityError;
use starling_proto::v1::PeerReportKind;

/// Capacity of the engine's event channel (readers wait when it is full).
const EVENTS: usize = 1024;

/// Events for the engine.
pub(crate) enum Ev {
    /// A frame read on a link (`PING`/`PONG` are handled by the reader).
    Frame { link: LinkId, frame: Frame },
    /// A link's reader or writer ended.
    LinkDown { link: LinkId, reason: SdkError },
    /// An outgoing dial completed its handshake.
    Connected {
        link: LinkId,
        handle: LinkHandle,
        info: StreamInfo,
    },
    /// An outgoing dial failed.
    ConnectFailed { link: LinkId, err: SdkError },
    /// The listener accepted a peer that subscribed.
    Incoming {
        link: LinkId,
        sub: Subscribe,
        handle: LinkHandle,
        addr: String,
        grant: Grant,
        /// The parent tickets it presented (verified for it and us).
        tickets: Option<Tickets>,
    },
    /// A chunk read on a link failed verification (it was not forwarded).
    BadChunk {
        link: LinkId,
        seq: u64,
        len: u64,
        error: IntegrityError,
    },
    /// A chunk read on a link is signed with a key id we do not hold (yet): held
    /// while the keys are refreshed ([`keys`]).
    UnknownKey { link: LinkId, chunk: Chunk },
    /// Peers revoked by the control plane (from a heartbeat).
    Revoked(Vec<u64>),
    /// The control plane's current assignment (from a heartbeat).
    Assignment(Assignment),
    /// Answer to a `Reparent` call.
    Reparented {
        substream: u16,
        excluded: Vec<u64>,
        result: Result<Parent, SdkError>,
        /// The new parent's ticket.
        ticket: Option<Ticket>,
    },
    /// Answer to a re-`Join`.
    Rejoined(Result<JoinInfo, SdkError>),
}

/// Who feeds a substream now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Feed {
    Server,
    Peer(Peer),
    /// The parent is gone; a `Reparent` call is under way (mesh repair covers).
    Pending,
}

impl Feed {
    fn from_parent(p: Parent, me: u64) -> Feed {
        match p {
            Some(p) if p.id != me => Feed::Peer(p),
            _ => Feed::Server,
        }
    }
    fn upstream(&self) -> Option<Upstream> {
        match self {
            Feed::Server => Some(Upstream::Server),
            Feed::Peer(p) => Some(Upstream::Peer(p.id)),
            Feed::Pending => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    DataPlane,
    /// Dialled by us to a parent and/or neighbour peer.
    Out(Peer),
    /// Accepted by the listener.
    In,
}

struct Link {
    kind: Kind,
    /// `None` while dialling.
    handle: Option<LinkHandle>,
    /// Outgoing: the mask we want pushed. Incoming: what the remote subscribed to.
    mask: u64,
    /// Outgoing: the mask of the last `SUBSCRIBE` sent.
    sent_mask: u64,
    /// Wanted as a mesh neighbour (outgoing) / registered with the scheduler.
    want_neighbour: bool,
    neighbour: bool,
    /// Chunks requested on this link and not answered yet (others are unsolicited).
    requested: BTreeSet<u64>,
    /// Incoming links: what the peer's token grants (peer id, expiry).
    grant: Option<Grant>,
    /// A child's share of the upload budget for pushes ([`ChildPace`]).
    pace: ChildPace,
    /// The remote's `REQUEST` budget (created at its first request).
    request_bucket: Option<listener_limits::RequestBucket>,
    /// Incoming links: the substreams its parent tickets cover.
    tickets: Option<Tickets>,
}

impl Link {
    fn new(kind: Kind, mask: u64) -> Link {
        Link {
            kind,
            handle: None,
            mask,
            sent_mask: mask,
            want_neighbour: false,
            neighbour: false,
            requested: BTreeSet::new(),
            grant: None,
            pace: ChildPace::default(),
            request_bucket: None,
            tickets: None,
        }
    }
}

/// The play-out clock handed to the scheduler. The scheduler assumes one chunk per
/// nominal chunk duration; a data plane that cuts at key frames produces chunks of a
/// different mean duration. This clock runs at `nominal / measured` (measured from the
/// chunks' cut timestamps over the last few dozen chunks), so the scheduler's
/// timeline stays aligned with the stream. All its durations (lag, timeouts) are then
/// in stream time.
struct PlayClock {
    last: Instant,
    virt: Duration,
    rate: f64,
    nominal_ms: f64,
    stamps: BTreeMap<u64, u64>,
}

impl PlayClock {
    fn new(nominal: Duration) -> PlayClock {
        PlayClock {
            last: Instant::now(),
            virt: Duration::ZERO,
            rate: 1.0,
            nominal_ms: nominal.as_secs_f64() * 1000.0,
            stamps: BTreeMap::new(),
        }
    }

    fn now(&mut self) -> Duration {
        let t = Instant::now();
        self.virt += t.saturating_duration_since(self.last).mul_f64(self.rate);
        self.last = t;
        self.virt
    }

    /// The instant at which this clock reads `t` (at the current rate); `t` already
    /// passed reads as the last instant the clock was read.
    fn instant_at(&self, t: Duration) -> Instant {
        match t.checked_sub(self.virt) {
            Some(ahead) => self.last + ahead.div_f64(self.rate),
            None => self.last,
        }
    }

    /// Chunk `seq` was cut at `timestamp_ms` (data-plane clock; 0 = unknown).
    fn observe(&mut self, seq: u64, timestamp_ms: u64) {
        if timestamp_ms == 0 {
            return;
        }
        self.stamps.insert(seq, timestamp_ms);
        while self.stamps.len() > 64 {
            self.stamps.pop_first();
        }
        let (Some((&s0, &t0)), Some((&s1, &t1))) =
            (self.stamps.first_key_value(), self.stamps.last_key_value())
        else {
            return;
        };
        if s1.saturating_sub(s0) < 16 || t1 <= t0 {
            return;
        }
        let measured = (t1 - t0) as f64 / (s1 - s0) as f64;
        let rate = (self.nominal_ms / measured).clamp(0.25, 4.0);
        // Bring the clock up to date at the old rate before changing it; ignore noise.
        if (rate - self.rate).abs() > 0.02 {
            self.now();
            self.rate = if (rate - 1.0).abs() <= 0.02 {
                1.0
            } else {
                rate
            };
        }
    }
}

/// The scheduler's tunables for a stream and a target lag: the defaults are tuned for a
/// 2 s lag; the lag-relative ones are scaled with it.
pub(crate) fn scheduler_config(k: u16, chunk: Duration, lag: Duration) -> SchedulerConfig {
    let def = SchedulerConfig::default();
    let f = lag.as_secs_f64() / def.target_lag.as_secs_f64();
    let scale = |d: Duration| d.mul_f64(f);
    let chunk_ms = chunk.as_millis().max(1);
    // The held window covers the lag twice over plus slack (for neighbours' repairs).
    let window = (2 * lag.as_millis() / chunk_ms + 16).clamp(64, 1024) as u16;
    SchedulerConfig {
        substreams: k.clamp(1, 64),
        chunk_duration: chunk,
        target_lag: lag,
        repair_lead: scale(def.repair_lead),
        server_lead: scale(def.server_lead),
        request_timeout: def.request_timeout.min(lag / 4),
        skip_server_delay: scale(def.skip_server_delay),
        late_threshold: scale(def.late_threshold),
        silence_timeout: scale(def.silence_timeout),
        window,
        ..def
    }
}

/// Everything the engine starts with.
pub(crate) struct GridSetup {
    pub shared: Arc<Shared>,
    pub control: Control,
    pub join: JoinInfo,
    pub offer: Offer,
    pub first: crate::conn::WireConn,
    pub first_mask: u64,
    pub listener: Option<TcpListener>,
    pub k: u16,
    pub chunk: Duration,
    pub lag: Duration,
    pub upload_kbps: u32,
    /// `max_upload_kbps` was not set: `upload_kbps` is an initial offer, lowered to
    /// what the uplink drains ([`UploadEstimator`]).
    pub estimate_upload: bool,
    pub limits: Limits,
    pub peer_limits: listener_limits::PeerLimits,
    pub key_hold: keys::KeyHoldLimits,
    pub parent_window: u16,
    pub parent_max_missed: u16,
    pub idle: Duration,
    pub connect_timeout: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub rejoin_after_failures: u32,
    /// Most peer connections accepted per source address (0 = unlimited).
    pub max_links_per_ip: u32,
}

/// Starts the engine (and the peer listener). Returns the event sender (for the
/// heartbeat loop) and the tasks.
pub(crate) fn start(setup: GridSetup) -> Result<(mpsc::Sender<Ev>, Vec<JoinHandle<()>>), SdkError> {
    let cfg = SchedulerConfig {
        parent_window: setup.parent_window,
        parent_max_missed: setup.parent_max_missed,
        ..scheduler_config(setup.k, setup.chunk, setup.lag)
    };
    let sched = PeerScheduler::new(cfg).map_err(|e| SdkError::Config(e.to_string()))?;
    let (tx, rx) = mpsc::channel(EVENTS);
    let ids = Arc::new(AtomicU64::new(1));
    let drained = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // A peer whose token lacks RELAY does not serve (the control plane gives RELAY to
    // the peers it may assign as parents).
    let may_relay = setup.shared.rights.may_relay();
    if !may_relay && setup.listener.is_some() {
        tracing::warn!("our chunk token lacks the RELAY scope: not accepting peers");
    }
    let listener = setup.listener.filter(|_| may_relay);
    let relaying = listener.is_some() && setup.upload_kbps > 0;
    if let Some(l) = listener {
        tasks.push(tokio::spawn(link::listen(
            l,
            AcceptCtx {
                shared: setup.shared.clone(),
                limits: setup.limits,
                peer: setup.peer_limits,
                idle: setup.idle,
                events: tx.clone(),
                ids: ids.clone(),
                drained: drained.clone(),
                per_ip: IpLimiter::new(setup.max_links_per_ip),
            },
        )));
    }
    let k = cfg.substreams;
    let content_type = setup
        .join
        .params
        .as_ref()
        .map(|p| p.content_type.clone())
        .unwrap_or_default();
    let budget_kbps = if relaying { setup.upload_kbps } else { 0 };
    setup.shared.stats_mut().upload_budget_kbps = budget_kbps;
    let mut engine = Engine {
        shared: setup.shared,
        control: setup.control,
        session_id: setup.join.session_id.clone(),
        me: setup.join.peer_id,
        offer: setup.offer,
        sched,
        clock: PlayClock::new(setup.chunk),
        store: BTreeMap::new(),
        links: HashMap::new(),
        peer_links: HashMap::new(),
        dp: None,
        dp_addr: setup.join.wire_addr.clone(),
        dp_retry_at: None,
        dp_backoff: setup.reconnect_initial,
        dp_failures: 0,
        rejoining: false,
        feeds: vec![Feed::Server; usize::from(k)],
        reparenting: vec![false; usize::from(k)],
        reparent_timers: vec![None; usize::from(k)],
        neighbours: Vec::new(),
        child_slots: if relaying { setup.join.child_slots } else { 0 },
        used_slots: 0,
        book: TicketBook::default(),
        k,
        chunk_ms: u32::try_from(setup.chunk.as_millis()).unwrap_or(u32::MAX),
        content_type,
        limits: setup.limits,
        peer_limits: setup.peer_limits,
        key_hold: setup.key_hold,
        unknown_keys: keys::UnknownKeys::default(),
        idle: setup.idle,
        connect_timeout: setup.connect_timeout,
        reconnect_initial: setup.reconnect_initial,
        reconnect_max: setup.reconnect_max,
        rejoin_after_failures: setup.rejoin_after_failures.max(1),
        ids,
        events: tx.clone(),
        bucket: UploadBucket::new(setup.upload_kbps),
        last_refill: Instant::now(),
        skipping: false,
        failed: HashMap::new(),
        banned: HashSet::new(),
        fresh_join: false,
        next_grant_check: Instant::now(),
        estimator: (relaying && setup.estimate_upload)
            .then(|| UploadEstimator::new(budget_kbps, UploadEstimatorConfig::default())),
        drained,
        epoch: Instant::now(),
        stream_kbps: setup.join.stream_kbps,
        budget_kbps,
    };
    let now = engine.clock.now();
    for s in 0..k {
        engine
            .sched
            .on_parent_changed(s, Some(Upstream::Server), now);
    }
    // The first data-plane connection is already up.
    let dp = engine.new_id();
    let mut l = Link::new(Kind::DataPlane, setup.first_mask);
    let info = setup.first.info.clone();
    l.handle = Some(link::spawn_link(
        dp,
        setup.first,
        tx.clone(),
        engine.idle,
        None,
        engine.shared.clone(),
        None,
        None,
    ));
    engine.links.insert(dp, l);
    engine.dp = Some(dp);
    engine.on_dp_info(&info);
    engine.apply_assignment(setup.join.assignment, true);
    tasks.push(tokio::spawn(engine.run(rx)));
    Ok((tx, tasks))
}

struct Engine {
    shared: Arc<Shared>,
    control: Control,
    session_id: String,
    me: u64,
    offer: Offer,
    sched: PeerScheduler,
    clock: PlayClock,
    store: BTreeMap<u64, Chunk>,
    links: HashMap<LinkId, Link>,
    /// Outgoing peer links by remote peer id.
    peer_links: HashMap<u64, LinkId>,
    dp: Option<LinkId>,
    /// Data-plane wire address (our token is in `shared.rights`).
    dp_addr: String,
    dp_retry_at: Option<tokio::time::Instant>,
    dp_backoff: Duration,
    dp_failures: u32,
    rejoining: bool,
    feeds: Vec<Feed>,
    reparenting: Vec<bool>,
    neighbours: Vec<Peer>,
    child_slots: u32,
    used_slots: u32,
    /// Our parents' tickets (sent to them before subscribing).
    book: TicketBook,
    k: u16,
    chunk_ms: u32,
    content_type: String,
    limits: Limits,
    peer_limits: listener_limits::PeerLimits,
    key_hold: keys::KeyHoldLimits,
    /// Chunks waiting for a key refresh.
    unknown_keys: keys::UnknownKeys,
    idle: Duration,
    connect_timeout: Duration,
    reconnect_initial: Duration,
    reconnect_max: Duration,
    rejoin_after_failures: u32,
    ids: Arc<AtomicU64>,
    events: mpsc::Sender<Ev>,
    /// Upload pacing.
    bucket: UploadBucket,
    last_refill: Instant,
    /// The last play-out decision was a skip (one discontinuity per run of skips).
    skipping: bool,
    /// Parent peers whose link failed recently: a heartbeat that still names one (the
    /// control plane has not noticed yet) does not make us dial it again.
    failed: HashMap<u64, Instant>,
    /// Peers that sent a bad chunk: never a parent or neighbour of ours again.
    banned: HashSet<u64>,
    /// No chunk came from the data plane since the last re-join: a refusal of our
    /// token now means a re-join does not help.
    fresh_join: bool,
    next_grant_check: Instant,
    /// Per substream: a re-parent being timed (parent lost or re-searched).
    reparent_timers: Vec<Option<ReparentTimer>>,
    /// `Some` when the upload budget is estimated (no `max_upload_kbps`).
    estimator: Option<UploadEstimator>,
    /// Chunk bytes written on accepted links (children and served neighbours).
    drained: Arc<AtomicU64>,
    /// The estimator's clock origin.
    epoch: Instant,
    /// Stream rate from `Join` (0 = not said), to turn a budget into child slots.
    stream_kbps: u32,
    /// Relay upload budget now, kbit/s (0 = not relaying).
    budget_kbps: u32,
}

/// Upload pacing: a token bucket of bytes holding up to `BURST_S` of the budget.
///
/// Pushes are the child slots the control plane sized to the budget, so they stay within
/// it on average; but a chunk goes to every child of its substream at once, so a push may
/// overdraw the bucket by up to `PUSH_DEBT_S` of budget, repaid before any serve. Serves
/// (mesh repair) spend only what pushes leave. (Dropping pushes at an empty bucket
/// instead starved children, whose repairs then drained their neighbours' buckets in
/// turn: 35 % of pushes were dropped with 1 s chunks.)
#[derive(Debug, Clone, Copy)]
struct UploadBucket {
    tokens: f64,
    rate_bytes: f64,
}

impl UploadBucket {
    const BURST_S: f64 = 2.0;
    const PUSH_DEBT_S: f64 = 2.0;

    /// Starts empty: a peer's uplink gives nothing before its budget accrues (a full
    /// bucket at the start would let every peer upload 2 s beyond its budget, which a
    /// short load test would count as upload the budgets do not have).
    fn new(kbps: u32) -> UploadBucket {
        let rate_bytes = f64::from(kbps) * 1000.0 / 8.0;
        UploadBucket {
            tokens: 0.0,
            rate_bytes,
        }
    }

    fn set_rate(&mut self, kbps: u32) {
        self.rate_bytes = f64::from(kbps) * 1000.0 / 8.0;
        self.tokens = self.tokens.min(self.rate_bytes * Self::BURST_S);
    }

    fn refill(&mut self, dt_s: f64) {
        self.tokens = (self.tokens + dt_s * self.rate_bytes).min(self.rate_bytes * Self::BURST_S);
    }

    /// May a chunk of `len` bytes go out now (a push to a child, or a serve)?
    fn allows(&self, push: bool, len: f64) -> bool {
        if push {
            self.tokens > -self.rate_bytes * Self::PUSH_DEBT_S
        } else {
            self.tokens >= len
        }
    }

    fn spend(&mut self, len: f64) {
        self.tokens -= len;
    }
}

/// A re-parent in progress on one substream, timed from the loss or re-search of
/// `from` to the first chunk pushed by another parent.
#[derive(Debug, Clone, Copy)]
struct ReparentTimer {
    since: Instant,
    /// The parent left behind (`None` = the data plane).
    from: Option<u64>,
    /// The `Reparent` answer was recorded.
    answered: bool,
}

/// The parent identity a feed stands for (`None` = the data plane; pending = no one).
fn feed_source(f: &Feed) -> Option<Option<u64>> {
    match f {
        Feed::Server => Some(None),
        Feed::Peer(p) => Some(Some(p.id)),
        Feed::Pending => None,
    }
}

/// Most peers remembered as polluters (a swarm with more is beyond saving anyway).
const MAX_BANNED: usize = 1024;
/// Most excluded peer ids sent in one `Reparent`.
const MAX_EXCLUDE: usize = 32;
/// How often the tokens of incoming links are checked for expiry.
const GRANT_CHECK_EVERY: Duration = Duration::from_millis(250);
/// Longest time between two engine wake-ups (grant expiry, the buffer gauge).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// How long a failed parent is not adopted again from a heartbeat.
const FAILED_PARENT_MEMORY: Duration = Duration::from_secs(10);

fn popcount(mask: u64) -> u32 {
    mask.count_ones()
}

impl Engine {
    fn new_id(&self) -> LinkId {
        self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn all_mask(&self) -> u64 {
        if self.k >= 64 {
            u64::MAX
        } else {
            (1u64 << self.k) - 1
        }
    }

    fn substreams(&self, mask: u64) -> Vec<u16> {
        (0..self.k).filter(|s| mask & (1u64 << s) != 0).collect()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Ev>) {
        let mut stop = self.shared.stop_signal();
        // The scheduler says when it must tick next (play-out deadlines, repairs,
        // parent checks, maps): a steady peer wakes about once per chunk instead of a
        // fixed ticker's four times (the tick was most of an idle peer's CPU). The
        // engine's own housekeeping (grant expiry, buffer gauge) runs at least every
        // `HOUSEKEEPING_EVERY`; the upload estimator, when on, samples every chunk / 4.
        let housekeeping = if self.estimator.is_some() {
            self.sched.tick_interval()
        } else {
            HOUSEKEEPING_EVERY
        };
        let mut next_housekeeping = Instant::now() + housekeeping;
        let wake = tokio::time::sleep_until(next_housekeeping.into());
        tokio::pin!(wake);
        let mut armed = next_housekeeping;
        // Never two ticks within a millisecond, whatever the scheduler asks.
        let mut not_before = Instant::now();
        let mut token = self.shared.rights.watch_token();
        token.mark_unchanged();
        let mut refreshed = self.shared.rights.watch_key_refreshes();
        refreshed.mark_unchanged();
        loop {
            // Re-armed only when the target moves by a millisecond or more (the timer's
            // resolution): the play-out clock's conversion differs by nanoseconds from
            // one event to the next, and each reset costs a timer-wheel removal and
            // insert.
            let target = self.wake_at(next_housekeeping).max(not_before);
            if target.max(armed) - target.min(armed) >= Duration::from_millis(1) {
                wake.as_mut().reset(target.into());
                armed = target;
            }
            let retry = self.dp_retry_at;
            tokio::select! {
                _ = stopped(&mut stop) => break,
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                () = &mut wake => {
                    let now = self.clock.now();
                    self.sched.tick(now);
                    self.on_tick();
                    let t = Instant::now();
                    next_housekeeping = t + housekeeping;
                    not_before = t + Duration::from_millis(1);
                }
                r = token.changed() => {
                    if r.is_ok() {
                        let t = token.borrow_and_update().clone();
                        self.send_token(t);
                    }
                }
                r = refreshed.changed() => {
                    if r.is_ok() {
                        let done = *refreshed.borrow_and_update();
                        self.on_keys_refreshed(done);
                    }
                }
                _ = sleep_until_opt(retry) => {
                    self.dp_retry_at = None;
                    self.dial_dp();
                }
            }
            self.drain_actions();
            if self.shared.is_finished() {
                break;
            }
        }
        for (_, l) in self.links.drain() {
            if let Some(h) = l.handle {
                h.close(Frame::Goodbye(reason(ErrorCode::Normal, "viewer leaving")));
            }
        }
        self.shared.hub.close();
        self.shared.stats_mut().connected = false;
    }

    /// When the engine must wake next: the scheduler's next timeout (on the play-out
    /// clock, converted to an instant), or the housekeeping time if earlier.
    fn wake_at(&mut self, housekeeping: Instant) -> Instant {
        let now = self.clock.now();
        match self.sched.next_timeout(now) {
            Some(t) => self.clock.instant_at(t).min(housekeeping),
            None => housekeeping,
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Frame { link, frame } => self.on_frame(link, frame),
            Ev::LinkDown { link, reason } => {
                if self.links.contains_key(&link) {
                    tracing::debug!(link, "grid link down: {reason}");
                    self.drop_link(link, None, Some(reason));
                }
            }
            Ev::Connected { link, handle, info } => self.on_connected(link, handle, info),
            Ev::ConnectFailed { link, err } => {
                if self.links.contains_key(&link) {
                    tracing::info!(link, "grid dial failed: {err}");
                    self.drop_link(link, None, Some(err));
                }
            }
            Ev::Incoming {
                link,
                sub,
                handle,
                addr,
                grant,
                tickets,
            } => self.on_incoming(link, sub, handle, addr, grant, tickets),
            Ev::BadChunk {
                link,
                seq,
                len,
                error,
            } => self.on_bad_chunk(link, seq, len, error),
            Ev::UnknownKey { link, chunk } => self.on_unknown_key(link, chunk),
            Ev::Revoked(ids) => self.on_revoked(&ids),
            Ev::Assignment(a) => self.apply_assignment(a, false),
            Ev::Reparented {
                substream,
                excluded,
                result,
                ticket,
            } => {
                if let Some(t) = ticket {
                    self.book.set(t);
                }
                self.on_reparented(substream, excluded, result)
            }
            Ev::Rejoined(r) => self.on_rejoined(r),
        }
    }

    // ----- control-plane assignment -----------------------------------------------

    fn apply_assignment(&mut self, a: Assignment, initial: bool) {
        if a.parents.is_empty() {
            // An older control plane: keep what we have.
            return;
        }
        let now = self.clock.now();
        let renewed: Vec<(u32, u64)> = a
            .tickets
            .into_iter()
            .filter_map(|t| {
                let key = (t.substream, t.parent);
                self.book.set(t).then_some(key)
            })
            .collect();
        self.failed
            .retain(|_, t| t.elapsed() < FAILED_PARENT_MEMORY);
        for (s, p) in a.parents {
            let Ok(s) = u16::try_from(s) else { continue };
            if s >= self.k {
                continue;
            }
            let feed = Feed::from_parent(p, self.me);
            if let Feed::Peer(p) = &feed
                && (self.failed.contains_key(&p.id) || self.excluded(p.id))
            {
                if self.feeds[usize::from(s)] != feed {
                    let id = p.id;
                    self.research(s, vec![id]);
                }
                continue;
            }
            self.set_feed(s, feed, now, !initial);
        }
        let mut seen = BTreeSet::new();
        let neighbours: Vec<Peer> = a
            .neighbours
            .into_iter()
            .filter(|n| n.id != self.me && seen.insert(n.id))
            .collect();
        self.neighbours = neighbours
            .into_iter()
            .filter(|n| !self.excluded(n.id))
            .collect();
        self.reconcile();
        self.send_renewed_tickets(&renewed);
    }

    /// New tickets for substreams a parent already pushes to us go to it at once (a
    /// parent closes a child whose tickets expire).
    fn send_renewed_tickets(&mut self, renewed: &[(u32, u64)]) {
        for &(s, parent) in renewed {
            let Some(&l) = self.peer_links.get(&parent) else {
                continue;
            };
            let Some(link) = self.links.get(&l) else {
                continue;
            };
            if link.handle.is_none() || link.sent_mask & (1u64 << s.min(63)) == 0 {
                continue;
            }
            for t in self.book.for_parent(parent, 1u64 << s.min(63)) {
                self.send_to(l, &Frame::Ticket(t));
            }
        }
    }

    fn set_feed(&mut self, s: u16, feed: Feed, now: Duration, count: bool) {
        let i = usize::from(s);
        if self.feeds[i] == feed {
            return;
        }
        tracing::debug!(substream = s, ?feed, "parent changed");
        self.sched.on_parent_changed(s, feed.upstream(), now);
        self.feeds[i] = feed;
        if count {
            self.shared.stats_mut().parent_changes += 1;
        }
        self.cancel_timer_if_back(s);
    }

    // ----- re-parent timing ---------------------------------------------------------

    /// Starts timing a re-parent of `s` away from `from` (no-op if one is timed).
    fn start_reparent_timer(&mut self, s: u16, from: Option<u64>) {
        if let Some(t) = self.reparent_timers.get_mut(usize::from(s))
            && t.is_none()
        {
            *t = Some(ReparentTimer {
                since: Instant::now(),
                from,
                answered: false,
            });
        }
    }

    /// The substream is fed by the parent it was leaving again: not a re-parent.
    fn cancel_timer_if_back(&mut self, s: u16) {
        let i = usize::from(s);
        let back = match (&self.reparent_timers[i], feed_source(&self.feeds[i])) {
            (Some(t), Some(src)) => src == t.from,
            _ => false,
        };
        if back {
            self.reparent_timers[i] = None;
        }
    }

    /// The `Reparent` answer for `s` arrived.
    fn reparent_answered(&mut self, s: u16) {
        if let Some(Some(t)) = self.reparent_timers.get_mut(usize::from(s))
            && !t.answered
        {
            t.answered = true;
            let d = t.since.elapsed();
            self.shared.stats_mut().reparent_answer_time.record(d);
        }
    }

    /// A chunk of `s` came from its current parent: completes a timed re-parent if that
    /// parent is a new one.
    fn reparent_chunk(&mut self, s: u16) {
        let i = usize::from(s);
        let Some(t) = self.reparent_timers[i] else {
            return;
        };
        match feed_source(&self.feeds[i]) {
            Some(src) if src != t.from => {
                self.reparent_timers[i] = None;
                let d = t.since.elapsed();
                tracing::debug!(substream = s, ms = d.as_millis(), "re-parent complete");
                self.shared.stats_mut().reparent_time.record(d);
            }
            _ => {}
        }
    }

    /// Opens, re-subscribes and closes links to match `feeds` and `neighbours`.
    fn reconcile(&mut self) {
        let mut want: BTreeMap<u64, (Peer, u64, bool)> = BTreeMap::new();
        let mut dp_mask = 0u64;
        for (s, f) in self.feeds.iter().enumerate() {
            match f {
                Feed::Server => dp_mask |= 1u64 << s,
                Feed::Peer(p) => {
                    want.entry(p.id).or_insert_with(|| (p.clone(), 0, false)).1 |= 1u64 << s;
                }
                Feed::Pending => {}
            }
        }
        for n in &self.neighbours {
            want.entry(n.id).or_insert_with(|| (n.clone(), 0, false)).2 = true;
        }
        // Whole stream from the data plane: ask for it literally, as before the grid.
        if dp_mask == self.all_mask() {
            dp_mask = wire::ALL_SUBSTREAMS;
        }
        if let Some(dp) = self.dp {
            self.set_out_mask(dp, dp_mask);
        }
        // Close links nobody wants (or whose address changed).
        let stale: Vec<(u64, LinkId)> = self
            .peer_links
            .iter()
            .filter(|(id, l)| {
                want.get(id).is_none_or(|(p, _, _)| {
                    self.links
                        .get(l)
                        .is_some_and(|l| !matches!(&l.kind, Kind::Out(q) if q.addr == p.addr))
                })
            })
            .map(|(&id, &l)| (id, l))
            .collect();
        for (_, l) in stale {
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(ErrorCode::Normal, "re-assigned"))),
                None,
            );
        }
        for (id, (peer, mask, neighbour)) in want {
            match self.peer_links.get(&id).copied() {
                Some(l) => {
                    self.set_out_mask(l, mask);
                    if let Some(link) = self.links.get_mut(&l) {
                        link.want_neighbour = neighbour;
                    }
                    self.sync_neighbour(l);
                }
                None => {
                    let l = self.new_id();
                    let mut link = Link::new(Kind::Out(peer.clone()), mask);
                    link.want_neighbour = neighbour;
                    self.links.insert(l, link);
                    self.peer_links.insert(id, l);
                    let mut d = self.dial_params(&peer.addr, Role::Peer, mask, self.resume_at());
                    d.tickets = self.book.for_parent(id, mask);
                    tokio::spawn(link::dial(l, d, self.events.clone(), self.shared.clone()));
                }
            }
        }
    }

    fn sync_neighbour(&mut self, l: LinkId) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let want = link.want_neighbour && link.handle.is_some();
        if want && !link.neighbour {
            link.neighbour = true;
            self.sched.on_neighbour_added(l);
        } else if !want && link.neighbour {
            link.neighbour = false;
            self.sched.on_neighbour_removed(l);
        }
    }

    fn set_out_mask(&mut self, l: LinkId, mask: u64) {
        let resume = self.resume_at();
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        link.mask = mask;
        if link.sent_mask == mask {
            return;
        }
        if let (Some(h), Kind::Out(peer)) = (&link.handle, &link.kind) {
            // Tickets for the substreams this SUBSCRIBE adds (a full queue is handled
            // below, with the SUBSCRIBE).
            for t in self.book.for_parent(peer.id, mask & !link.sent_mask) {
                let _ = h.send_frame(&Frame::Ticket(t));
            }
        }
        if let Some(h) = &link.handle {
            let f = Frame::Subscribe(Subscribe {
                broadcast_id: self.shared.broadcast_id.clone(),
                start: resume,
                substream_mask: mask,
            });
            match h.send_frame(&f) {
                Ok(()) => link.sent_mask = mask,
                Err(_) => {
                    // Cannot even queue a control frame: the link is useless.
                    self.drop_link(l, None, Some(SdkError::Timeout("link queue full")));
                }
            }
        }
    }

    /// Where a (re)subscription should start: after the newest chunk held.
    fn resume_at(&self) -> StartAt {
        match self.store.last_key_value() {
            Some((&n, _)) => StartAt::Seq(n + 1),
            None => self.sched.play_next().map_or(StartAt::Live, StartAt::Seq),
        }
    }

    fn dial_params(&self, addr: &str, role: Role, mask: u64, start: StartAt) -> Dial {
        Dial {
            addr: addr.to_string(),
            token: self.shared.rights.token(),
            broadcast_id: self.shared.broadcast_id.clone(),
            start,
            limits: self.limits,
            timeout: self.connect_timeout,
            idle: self.idle,
            role,
            mask,
            tickets: Vec::new(),
        }
    }

    fn research(&mut self, s: u16, mut exclude: Vec<u64>) {
        let i = usize::from(s);
        if self.reparenting[i] {
            return;
        }
        // Never offered a polluter again (the control plane is told too, but it may
        // not have acted on the report yet).
        for &b in &self.banned {
            if exclude.len() >= MAX_EXCLUDE {
                break;
            }
            if !exclude.contains(&b) {
                exclude.push(b);
            }
        }
        self.reparenting[i] = true;
        let control = self.control.clone();
        let session = self.session_id.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let (result, ticket) = match control.reparent(&session, s, exclude.clone()).await {
                Ok((p, t)) => (Ok(p), t),
                Err(e) => (Err(e), None),
            };
            let _ = events
                .send(Ev::Reparented {
                    substream: s,
                    excluded: exclude,
                    result,
                    ticket,
                })
                .await;
        });
    }

    fn on_reparented(&mut self, s: u16, excluded: Vec<u64>, result: Result<Parent, SdkError>) {
        let i = usize::from(s);
        if i >= self.feeds.len() {
            return;
        }
        self.reparenting[i] = false;
        self.reparent_answered(s);
        let now = self.clock.now();
        let feed = match result {
            Ok(Some(p)) if excluded.contains(&p.id) || self.excluded(p.id) => Feed::Server,
            Ok(p) => Feed::from_parent(p, self.me),
            Err(e) => {
                tracing::warn!(substream = s, "Reparent failed: {e}");
                if self.feeds[i] == Feed::Pending {
                    // The parent is gone and the control plane cannot help: the data
                    // plane feeds this substream until the next assignment.
                    Feed::Server
                } else {
                    // The old parent keeps feeding: no re-parent to time.
                    self.reparent_timers[i] = None;
                    return;
                }
            }
        };
        tracing::info!(substream = s, ?feed, "re-parented");
        self.set_feed(s, feed, now, true);
        // Answered with the parent it had (e.g. the data plane again): not a re-parent.
        self.cancel_timer_if_back(s);
        self.reconcile();
    }

    /// A parent peer's link failed: every substream it fed is re-searched at once.
    fn parent_lost(&mut self, peer: &Peer) {
        let now = self.clock.now();
        let fed_us = self
            .feeds
            .iter()
            .any(|f| matches!(f, Feed::Peer(p) if p.id == peer.id));
        if fed_us {
            self.failed.insert(peer.id, Instant::now());
        }
        for s in 0..self.k {
            if matches!(&self.feeds[usize::from(s)], Feed::Peer(p) if p.id == peer.id) {
                self.set_feed(s, Feed::Pending, now, false);
                self.start_reparent_timer(s, Some(peer.id));
                self.research(s, vec![peer.id]);
            }
        }
    }

    // ----- data plane ----------------------------------------------------------------

    fn dp_mask(&self) -> u64 {
        let mut m = 0u64;
        for (s, f) in self.feeds.iter().enumerate() {
            if *f == Feed::Server {
                m |= 1u64 << s;
            }
        }
        if m == self.all_mask() {
            wire::ALL_SUBSTREAMS
        } else {
            m
        }
    }

    fn dial_dp(&mut self) {
        if self.dp.is_some() {
            return;
        }
        if self.dp_failures >= self.rejoin_after_failures && !self.rejoining {
            self.rejoin();
            return;
        }
        let id = self.new_id();
        let mask = self.dp_mask();
        self.links.insert(id, Link::new(Kind::DataPlane, mask));
        self.dp = Some(id);
        let addr = self.dp_addr.clone();
        tracing::info!(addr, "reconnecting to the data plane");
        let d = self.dial_params(&addr, Role::Viewer, mask, self.resume_at());
        tokio::spawn(link::dial(id, d, self.events.clone(), self.shared.clone()));
    }

    fn schedule_dp_retry(&mut self) {
        self.dp_retry_at = Some(tokio::time::Instant::now() + self.dp_backoff);
        self.dp_backoff = (self.dp_backoff * 2).min(self.reconnect_max);
    }

    fn on_dp_info(&mut self, info: &StreamInfo) {
        if !info.content_type.is_empty() {
            self.content_type.clone_from(&info.content_type);
            self.shared.hub.set_content_type(&info.content_type);
        }
        if info.substreams != 0 && info.substreams != self.k {
            tracing::warn!(
                data_plane = info.substreams,
                control_plane = self.k,
                "substream counts differ"
            );
        }
        let mut s = self.shared.stats_mut();
        s.connected = true;
        s.live_seq = Some(s.live_seq.map_or(info.live_seq, |l| l.max(info.live_seq)));
    }

    fn rejoin(&mut self) {
        self.rejoining = true;
        let control = self.control.clone();
        let offer = self.offer.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let r = control.join(&offer).await;
            let _ = events.send(Ev::Rejoined(r)).await;
        });
    }

    fn on_rejoined(&mut self, r: Result<JoinInfo, SdkError>) {
        self.rejoining = false;
        self.dp_failures = 0;
        match r {
            Ok(join) => {
                tracing::info!(
                    addr = join.wire_addr,
                    session = join.session_id,
                    "re-joined via the control plane"
                );
                let old = self
                    .shared
                    .replace_session(join.session_id.clone(), join.heartbeat);
                if let Some(old) = old.filter(|o| o.id != join.session_id) {
                    let c = self.control.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(3), c.leave(&old.id)).await;
                    });
                }
                self.session_id = join.session_id;
                if join.peer_id != self.me {
                    // A new identity: links dialled with the old token are closed (our
                    // parents would refuse a TOKEN for another peer id); the new
                    // assignment below opens what it needs.
                    let outs: Vec<LinkId> = self
                        .links
                        .iter()
                        .filter(|(_, l)| matches!(l.kind, Kind::Out(_)))
                        .map(|(&id, _)| id)
                        .collect();
                    for l in outs {
                        self.drop_link(
                            l,
                            Some(Frame::Goodbye(reason(ErrorCode::Normal, "re-joined"))),
                            None,
                        );
                    }
                }
                self.me = join.peer_id;
                self.book.clear();
                if self.budget_kbps > 0 {
                    self.child_slots = join.child_slots;
                }
                self.dp_addr = join.wire_addr;
                self.shared.rights.rejoined(
                    OwnToken {
                        token: join.token,
                        expires_at_ms: join.token_expires_at_ms,
                    },
                    &join.token_keys,
                    &join.chunk_keys,
                );
                self.fresh_join = true;
                {
                    let mut s = self.shared.stats_mut();
                    s.rejoins += 1;
                    s.peer_id = Some(join.peer_id);
                }
                self.apply_assignment(join.assignment, false);
            }
            Err(e) if e.is_fatal() => {
                self.shared.finish(Err(e));
                return;
            }
            Err(e) => tracing::warn!("re-join failed: {e}"),
        }
        self.schedule_dp_retry();
    }

    // ----- links ---------------------------------------------------------------------

    fn on_connected(&mut self, l: LinkId, handle: LinkHandle, info: StreamInfo) {
        let Some(link) = self.links.get_mut(&l) else {
            // Dropped while dialling.
            handle.close(Frame::Goodbye(reason(
                ErrorCode::Normal,
                "not needed any more",
            )));
            return;
        };
        link.handle = Some(handle);
        let kind = link.kind.clone();
        let mask = link.mask;
        if kind == Kind::DataPlane {
            self.dp_failures = 0;
            self.dp_backoff = self.reconnect_initial;
            self.shared.stats_mut().reconnects += 1;
            self.on_dp_info(&info);
        } else if info.substreams != 0 && info.substreams != self.k {
            tracing::warn!(
                l,
                "peer reports {} substreams, not {}",
                info.substreams,
                self.k
            );
        }
        // The wanted mask may have changed while dialling.
        self.set_out_mask(l, mask);
        self.sync_neighbour(l);
        self.count_links();
    }

    fn on_incoming(
        &mut self,
        l: LinkId,
        sub: Subscribe,
        handle: LinkHandle,
        addr: String,
        grant: Grant,
        tickets: Option<Tickets>,
    ) {
        if let Some(id) = grant.peer_id
            && (self.shared.rights.is_revoked(id) || self.banned.contains(&id))
        {
            // Revoked or banned between the handshake and now.
            self.shared.stats_mut().peers_refused += 1;
            handle.close(Frame::Error(reason(ErrorCode::Revoked, "peer revoked")));
            return;
        }
        let mask = sub.substream_mask & self.all_mask();
        let held = grant.peer_id.map_or(0, |id| {
            self.links
                .values()
                .filter(|l| l.kind == Kind::In && l.grant.and_then(|g| g.peer_id) == Some(id))
                .count()
        });
        let checked = admission::check_peer_links(grant.peer_id, held).and_then(|()| {
            admission::check_subscribe(&self.ask(mask, tickets.as_ref(), self.used_slots))
        });
        if let Err(r) = checked {
            tracing::info!(
                addr,
                peer = ?grant.peer_id,
                mask,
                used = self.used_slots,
                slots = self.child_slots,
                "peer link refused: {}",
                r.message
            );
            self.shared.stats_mut().peers_refused += 1;
            handle.close(Frame::Error(reason(r.code, &r.message)));
            return;
        }
        let newest = self.store.last_key_value().map_or(0, |(&n, _)| n);
        let first = self.sched.play_next().unwrap_or(newest);
        let info = link::stream_info(
            &self.shared.broadcast_id,
            &self.content_type,
            self.chunk_ms,
            self.k,
            first,
            newest,
        );
        // Admitted: it may answer our requests with chunks from now on (raised before
        // it can see STREAM_INFO).
        handle.allow_chunks();
        if handle.send_frame(&info).is_err() {
            return;
        }
        let mut link = Link::new(Kind::In, mask);
        link.handle = Some(handle);
        link.grant = Some(grant);
        link.tickets = tickets;
        tracing::debug!(l, addr, mask, "peer link accepted");
        self.links.insert(l, link);
        self.admit(l, mask);
        self.count_links();
    }

    /// Registers an incoming link's (new) mask: a child for `mask ≠ 0`, a neighbour for
    /// `mask == 0`.
    fn admit(&mut self, l: LinkId, mask: u64) {
        let subs = self.substreams(mask);
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        link.mask = mask;
        if mask != 0 {
            self.used_slots += popcount(mask);
            self.sched.on_child_added(l, &subs);
            if link.neighbour {
                link.neighbour = false;
                self.sched.on_neighbour_removed(l);
            }
        } else if !link.neighbour {
            link.neighbour = true;
            self.sched.on_neighbour_added(l);
        }
    }

    fn count_links(&mut self) {
        let mut children = 0;
        let mut neighbours = 0;
        let mut peers = 0;
        for l in self.links.values() {
            if l.kind == Kind::In && l.mask != 0 {
                children += 1;
            }
            if l.neighbour {
                neighbours += 1;
            }
            if l.kind != Kind::DataPlane && l.handle.is_some() {
                peers += 1;
            }
        }
        let mut s = self.shared.stats_mut();
        s.children = children;
        s.neighbours = neighbours;
        s.peer_links = peers;
    }

    /// Removes a link: optionally sends `last` first; `err` says it failed (then a lost
    /// parent is re-searched and a lost data-plane link redialled).
    fn drop_link(&mut self, l: LinkId, last: Option<Frame>, err: Option<SdkError>) {
        let Some(link) = self.links.remove(&l) else {
            return;
        };
        self.unknown_keys.forget(l);
        if link.neighbour {
            self.sched.on_neighbour_removed(l);
        }
        if let Some(h) = link.handle {
            match last {
                Some(f) => h.close(f),
                None => drop(h),
            }
        }
        match &link.kind {
            Kind::In => {
                if link.mask != 0 {
                    self.sched.on_child_removed(l, &[]);
                    self.used_slots = self.used_slots.saturating_sub(popcount(link.mask));
                }
            }
            Kind::Out(peer) => {
                if self.peer_links.get(&peer.id) == Some(&l) {
                    self.peer_links.remove(&peer.id);
                }
                if err.is_some() {
                    self.parent_lost(peer);
                }
            }
            Kind::DataPlane => {
                if self.dp == Some(l) {
                    self.dp = None;
                    self.shared.stats_mut().connected = false;
                    if let Some(e) = err {
                        self.on_dp_error(e);
                    } else {
                        self.schedule_dp_retry();
                    }
                }
            }
        }
        self.count_links();
    }

    fn on_dp_error(&mut self, e: SdkError) {
        let fatal = match &e {
            SdkError::BroadcastEnded(_) => {
                self.shared.finish(Err(e));
                return;
            }
            SdkError::Server { code, .. } if *code == ErrorCode::BroadcastStopped => {
                self.shared
                    .finish(Err(SdkError::BroadcastEnded(e.to_string())));
                return;
            }
            SdkError::Server { code, .. } if *code == ErrorCode::Revoked => {
                tracing::warn!("the data plane says this viewer is revoked: {e}");
                self.shared.finish(Err(e));
                return;
            }
            SdkError::Server { code, .. }
                if matches!(code, ErrorCode::Unauthorized | ErrorCode::TokenExpired)
                    && self.fresh_join =>
            {
                // Refused right after a fresh Join: another Join will not help.
                tracing::warn!("the data plane refuses our fresh token: {e}");
                self.shared.finish(Err(e));
                return;
            }
            SdkError::Server { code, .. } => {
                is_fatal_code(*code) || *code == ErrorCode::ShuttingDown
            }
            _ => false,
        };
        tracing::warn!("data-plane link lost: {e}");
        self.dp_failures += 1;
        if fatal {
            // The node lost the broadcast or the token expired: a fresh Join can fix it.
            self.dp_failures = self.dp_failures.max(self.rejoin_after_failures);
        }
        self.schedule_dp_retry();
    }

    // ----- frames --------------------------------------------------------------------

    fn on_frame(&mut self, l: LinkId, frame: Frame) {
        let Some(link) = self.links.get(&l) else {
            return;
        };
        let kind = link.kind.clone();
        match frame {
            Frame::Chunk(c) => self.on_chunk(l, c),
            Frame::Request(seq) => {
                if kind != Kind::DataPlane {
                    self.on_request(l, seq);
                }
            }
            Frame::NotFound(seq) => {
                let now = self.clock.now();
                let Some(link) = self.links.get_mut(&l) else {
                    return;
                };
                if link.requested.remove(&seq) {
                    self.sched.on_not_found(l, seq, now);
                    return;
                }
                // Unsolicited: a parent skipped a push of its substream (over budget).
                let s = u16::try_from(seq % u64::from(self.k)).unwrap_or(0);
                let from_parent = link.mask & (1u64 << s) != 0
                    && match (&link.kind, &self.feeds[usize::from(s)]) {
                        (Kind::Out(peer), Feed::Peer(p)) => p.id == peer.id,
                        (Kind::DataPlane, Feed::Server) => true,
                        _ => false,
                    };
                if from_parent {
                    self.sched.on_parent_skipped(seq, now);
                } else {
                    self.sched.on_not_found(l, seq, now);
                }
            }
            Frame::BufferMap(m) => match to_buffer_map(&m) {
                Some(map) => {
                    let now = self.clock.now();
                    self.sched.on_buffer_map(l, map, now);
                }
                None => self.misbehaved(l, "malformed buffer map"),
            },
            Frame::Subscribe(sub) => {
                if kind != Kind::In || sub.broadcast_id != self.shared.broadcast_id {
                    self.misbehaved(l, "unexpected SUBSCRIBE");
                    return;
                }
                self.resubscribe(l, sub.substream_mask & self.all_mask());
            }
            Frame::StreamInfo(info) => {
                if info.broadcast_id != self.shared.broadcast_id {
                    self.misbehaved(l, "STREAM_INFO for another broadcast");
                } else if kind == Kind::DataPlane {
                    self.on_dp_info(&info);
                }
            }
            Frame::Error(r) | Frame::Goodbye(r) => {
                let err = if r.code == ErrorCode::BroadcastStopped {
                    SdkError::BroadcastEnded(r.message)
                } else {
                    SdkError::Server {
                        code: r.code,
                        message: r.message,
                    }
                };
                tracing::debug!(l, "link closed by the other side: {err}");
                self.drop_link(l, None, Some(err));
            }
            Frame::Hello(_) | Frame::HelloAck(_) => {
                self.misbehaved(l, "handshake frame mid-stream");
            }
            Frame::Token(t) => {
                if kind == Kind::In {
                    self.on_peer_token(l, &t);
                }
                // On links we dialled we are the client: a TOKEN means nothing.
            }
            Frame::Ticket(t) => {
                if kind == Kind::In {
                    self.on_peer_ticket(l, &t);
                } else {
                    self.misbehaved(l, "TICKET from a parent");
                }
            }
            Frame::Ping(_) | Frame::Pong(_) => {}
        }
    }

    fn misbehaved(&mut self, l: LinkId, what: &str) {
        tracing::info!(l, "closing a grid link: {what}");
        self.drop_link(
            l,
            Some(Frame::Error(reason(ErrorCode::UnexpectedFrame, what))),
            Some(SdkError::Protocol(what.to_string())),
        );
    }

    fn resubscribe(&mut self, l: LinkId, mask: u64) {
        let Some(link) = self.links.get(&l) else {
            return;
        };
        let old = link.mask;
        if old == mask {
            return;
        }
        let others = self.used_slots.saturating_sub(popcount(old));
        let ask = self.ask(mask, link.tickets.as_ref(), others);
        if let Err(r) = admission::check_subscribe(&ask) {
            tracing::info!(l, mask, "re-subscription refused: {}", r.message);
            self.shared.stats_mut().peers_refused += 1;
            self.drop_link(l, Some(Frame::Error(reason(r.code, &r.message))), None);
            return;
        }
        if old != 0 {
            self.sched.on_child_removed(l, &[]);
            self.used_slots = others;
        }
        self.admit(l, mask);
        self.count_links();
    }

    fn on_chunk(&mut self, l: LinkId, c: Chunk) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let len = c.payload.len() as u64;
        let s = u16::try_from(c.seq % u64::from(self.k)).unwrap_or(0);
        let bit = 1u64 << s;
        let feed = &self.feeds[usize::from(s)];
        let src = match &link.kind {
            Kind::DataPlane => {
                if link.mask & bit != 0 && *feed == Feed::Server {
                    Source::Parent(s)
                } else {
                    link.requested.remove(&c.seq);
                    Source::Server
                }
            }
            Kind::Out(peer) => {
                if link.mask & bit != 0 && matches!(feed, Feed::Peer(p) if p.id == peer.id) {
                    Source::Parent(s)
                } else if link.requested.remove(&c.seq) {
                    Source::Neighbour(l)
                } else {
                    // Not asked for (e.g. in flight across a mask change): ignored.
                    return;
                }
            }
            Kind::In => {
                if link.requested.remove(&c.seq) {
                    Source::Neighbour(l)
                } else {
                    // Children and neighbours that connected to us send chunks only
                    // as answers to our requests.
                    self.shared.stats_mut().unsolicited_chunks += 1;
                    self.misbehaved(l, "CHUNK not requested");
                    return;
                }
            }
        };
        {
            let mut st = self.shared.stats_mut();
            st.chunks_received += 1;
            st.bytes_received += len;
            if link.kind == Kind::DataPlane {
                st.bytes_from_server += len;
                self.fresh_join = false;
            } else {
                st.bytes_from_peers += len;
            }
        }
        if src == Source::Parent(s) {
            self.reparent_chunk(s);
        }
        self.clock.observe(c.seq, c.timestamp_ms);
        let now = self.clock.now();
        if self.sched.on_chunk(c.seq, src, now) {
            // A signed chunk already carries the signed flags (set by the link reader)
            // and is relayed byte-identical; for an unsigned one, the
            // receiver-specific DISCONTINUITY flag is not relayed.
            let chunk = if c.signature.is_empty() {
                Chunk {
                    flags: c.flags & chunk_flags::RANDOM_ACCESS,
                    ..c
                }
            } else {
                c
            };
            self.store.insert(chunk.seq, chunk);
            while let Some((&first, _)) = self.store.first_key_value() {
                if self.sched.has(first) {
                    break;
                }
                self.store.pop_first();
            }
            let newest = self.store.last_key_value().map(|(&n, _)| n);
            let mut st = self.shared.stats_mut();
            if let Some(n) = newest
                && st.live_seq.is_none_or(|x| x < n)
            {
                st.live_seq = Some(n);
            }
        } else {
            self.shared.stats_mut().duplicates += 1;
        }
    }

    // ----- rights and integrity ------------------------------------------------------

    /// A peer we must not use (revoked, or it sent us a bad chunk).
    fn excluded(&self, id: u64) -> bool {
        self.banned.contains(&id) || self.shared.rights.is_revoked(id)
    }

    /// The remote peer's id: from the assignment for links we dialled, from its token
    /// for accepted ones (`None` for the data plane, or without rights management).
    fn peer_id_of(&self, l: LinkId) -> Option<u64> {
        let link = self.links.get(&l)?;
        match &link.kind {
            Kind::DataPlane => None,
            Kind::Out(p) => Some(p.id),
            Kind::In => link.grant.and_then(|g| g.peer_id),
        }
    }

    /// Periodic work besides the scheduler's tick: the play-out buffer level, and the
    /// expiry of the tokens of peers connected to us.
    fn on_tick(&mut self) {
        let buffered = self
            .sched
            .play_next()
            .map_or(0, |p| self.store.range(p..).count() as u64);
        self.shared.stats_mut().buffer = Duration::from_millis(buffered * u64::from(self.chunk_ms));
        if self.estimator.is_some() {
            self.sample_upload();
        }
        let now = Instant::now();
        if now < self.next_grant_check {
            return;
        }
        self.next_grant_check = now + GRANT_CHECK_EVERY;
        let given_up = self.unknown_keys.expire(&self.key_hold, now);
        if given_up > 0 {
            tracing::warn!(
                given_up,
                "no key refresh came for held chunks: dropped them"
            );
        }
        let now_ms = unix_ms();
        let unticketed: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.kind == Kind::In
                    && l.mask != 0
                    && admission::check_subscribe(&self.ask(l.mask, l.tickets.as_ref(), 0))
                        .is_err_and(|r| r.code == ErrorCode::Unauthorized)
            })
            .map(|(&id, _)| id)
            .collect();
        for l in unticketed {
            tracing::info!(l, peer = ?self.peer_id_of(l), "child's parent tickets expired: closing its link");
            self.shared.stats_mut().peers_refused += 1;
            self.drop_link(
                l,
                Some(Frame::Error(reason(
                    ErrorCode::Unauthorized,
                    "ticket_expired: parent ticket expired",
                ))),
                None,
            );
        }
        let expired: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.grant
                    .is_some_and(|g| self.shared.rights.expired(&g, now_ms))
            })
            .map(|(&id, _)| id)
            .collect();
        for l in expired {
            tracing::info!(l, peer = ?self.peer_id_of(l), "peer token expired: closing its link");
            self.shared.stats_mut().peers_refused += 1;
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(
                    ErrorCode::TokenExpired,
                    "chunk token expired",
                ))),
                None,
            );
        }
    }

    // ----- upload estimate -----------------------------------------------------------

    /// Feeds the upload estimator: drained relay bytes, and whether every child link
    /// has data queued now (the uplink, not one child, is then what limits us).
    fn sample_upload(&mut self) {
        let mut children = 0usize;
        let mut all_queued = true;
        for l in self.links.values() {
            if l.kind == Kind::In && l.mask != 0 {
                children += 1;
                if l.handle.as_ref().is_none_or(|h| h.queued() == 0) {
                    all_queued = false;
                }
            }
        }
        let now = self.epoch.elapsed();
        let drained = self.drained.load(Ordering::Relaxed);
        let Some(est) = self.estimator.as_mut() else {
            return;
        };
        let lowered = est.sample(now, drained, children > 0 && all_queued);
        let estimate = est.estimate_kbps();
        self.shared.stats_mut().upload_estimate_kbps = estimate;
        if let Some(kbps) = lowered {
            self.lower_budget(kbps, estimate);
        }
    }

    /// Child slots a budget buys, as the control plane counts them
    /// ([`starling_grid::slots_for`]); proportionally to the current slots when the stream rate
    /// is unknown.
    fn slots_for(&self, kbps: u32) -> u32 {
        if self.stream_kbps > 0 {
            starling_grid::slots_for(kbps, self.stream_kbps, self.k)
        } else if self.budget_kbps > 0 {
            let v = u64::from(self.child_slots) * u64::from(kbps) / u64::from(self.budget_kbps);
            u32::try_from(v).unwrap_or(u32::MAX)
        } else {
            0
        }
    }

    /// The uplink drains less than the budget: pace to the new budget, offer it on a
    /// re-join, and close the children beyond the slots it buys (newest first) with
    /// `GOODBYE(SERVER_BUSY)`, so they re-search a parent.
    fn lower_budget(&mut self, kbps: u32, estimate: Option<u32>) {
        let slots = self.slots_for(kbps).min(self.child_slots);
        tracing::info!(
            old_kbps = self.budget_kbps,
            kbps,
            ?estimate,
            old_slots = self.child_slots,
            slots,
            "uplink drains less than the relay budget: budget lowered"
        );
        self.budget_kbps = kbps;
        self.bucket.set_rate(kbps);
        self.offer.upload_kbps = kbps;
        self.child_slots = slots;
        self.shared.stats_mut().upload_budget_kbps = kbps;
        if self.used_slots <= self.child_slots {
            return;
        }
        let mut children: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.kind == Kind::In && l.mask != 0)
            .map(|(&id, _)| id)
            .collect();
        children.sort_unstable_by(|a, b| b.cmp(a));
        for l in children {
            if self.used_slots <= self.child_slots {
                break;
            }
            tracing::info!(l, peer = ?self.peer_id_of(l), "closing a child: upload budget lowered");
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(
                    ErrorCode::ServerBusy,
                    "upload budget lowered",
                ))),
                None,
            );
        }
        self.count_links();
    }

    /// Our token was renewed: every link we dialled (the data plane, parents,
    /// neighbours) gets it; new links say it in `HELLO`.
    fn send_token(&mut self, t: OwnToken) {
        if t.token.is_empty() {
            return;
        }
        let f = Frame::Token(t.token);
        let outs: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.kind != Kind::In && l.handle.is_some())
            .map(|(&id, _)| id)
            .collect();
        for l in outs {
            self.send_to(l, &f);
        }
    }

    /// A peer connected to us renews its token: same peer id only.
    fn on_peer_token(&mut self, l: LinkId, token: &[u8]) {
        let Some(old) = self.links.get(&l).and_then(|link| link.grant) else {
            return;
        };
        match self.shared.rights.check_peer_token(token) {
            Ok(g) if old.peer_id.is_none() || g.peer_id == old.peer_id => {
                if let Some(link) = self.links.get_mut(&l) {
                    link.grant = Some(g);
                }
            }
            Ok(_) => {
                self.shared.stats_mut().peers_refused += 1;
                self.drop_link(
                    l,
                    Some(Frame::Error(reason(
                        ErrorCode::Unauthorized,
                        "renewed token names another peer",
                    ))),
                    None,
                );
            }
            Err(r) => {
                tracing::info!(l, "peer token renewal refused: {}", r.message);
                self.shared.stats_mut().peers_refused += 1;
                self.drop_link(l, Some(Frame::Error(reason(r.code, &r.message))), None);
            }
        }
    }

    /// An admission question for a link asking for `mask` ([`admission::check_subscribe`]).
    fn ask<'a>(&self, mask: u64, tickets: Option<&'a Tickets>, others_used: u32) -> Ask<'a> {
        Ask {
            enforced: self.shared.rights.enforced(),
            me: self.me,
            mask,
            tickets,
            now_ms: unix_ms(),
            skew_ms: self.shared.rights.skew_ms(),
            others_used,
            slots: self.child_slots,
        }
    }

    /// A peer connected to us presents a parent ticket (new substreams, or a renewal).
    fn on_peer_ticket(&mut self, l: LinkId, ticket: &[u8]) {
        let me = self.me;
        let now = unix_ms();
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let Some(child) = link.grant.and_then(|g| g.peer_id) else {
            return; // No rights management: nothing to check.
        };
        let t = link.tickets.get_or_insert_with(|| Tickets::new(me, now));
        if t.parent() != me {
            *t = Tickets::new(me, now);
        }
        let refusal = if t.allow(now) {
            match self.shared.rights.check_ticket(ticket, child, me) {
                Ok(c) => {
                    t.add(&c);
                    return;
                }
                Err(r) => r,
            }
        } else {
            crate::rights::Refusal {
                code: ErrorCode::ServerBusy,
                message: "too many tickets".into(),
            }
        };
        tracing::info!(l, child, "peer ticket refused: {}", refusal.message);
        self.shared.stats_mut().peers_refused += 1;
        self.drop_link(
            l,
            Some(Frame::Error(reason(refusal.code, &refusal.message))),
            None,
        );
    }

    /// A chunk failed verification. From the data plane: dropped, logged and counted.
    /// From a peer: dropped, the link closed with `ERROR(BAD_CHUNK)`, the peer reported
    /// and excluded (re-parenting away from it); the chunk stays missing, so the
    /// scheduler fetches it elsewhere.
    fn on_bad_chunk(&mut self, l: LinkId, seq: u64, len: u64, error: IntegrityError) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        link.requested.remove(&seq);
        {
            let mut st = self.shared.stats_mut();
            st.chunks_received += 1;
            st.bytes_received += len;
            if link.kind == Kind::DataPlane {
                st.bytes_from_server += len;
                st.bad_chunks_from_server += 1;
            } else {
                st.bytes_from_peers += len;
                st.bad_chunks_from_peers += 1;
            }
        }
        if link.kind == Kind::DataPlane {
            tracing::warn!(
                seq,
                "the data plane sent a chunk that fails its check (dropped): {error}"
            );
            // If it was a last-resort request, it is retried after the request timeout.
            return;
        }
        let peer = self.peer_id_of(l);
        tracing::warn!(
            l,
            seq,
            ?peer,
            "peer sent a bad chunk: {error}; disconnecting and reporting it"
        );
        // A request in flight to that link is free to go elsewhere now.
        let now = self.clock.now();
        self.sched.on_not_found(l, seq, now);
        if let Some(id) = peer {
            if self.banned.len() < MAX_BANNED {
                self.banned.insert(id);
            }
            self.neighbours.retain(|n| n.id != id);
            self.shared.stats_mut().peers_reported += 1;
            self.spawn_report(
                id,
                PeerReportKind::BadChunk,
                format!("chunk {seq}: {error}"),
            );
        }
        // As a lost link: a parent's substreams are re-searched excluding it.
        self.drop_link(
            l,
            Some(Frame::Error(reason(
                ErrorCode::BadChunk,
                &format!("chunk {seq} failed its integrity check"),
            ))),
            Some(SdkError::Protocol(format!("bad chunk {seq}: {error}"))),
        );
        self.reconcile();
        self.count_links();
    }

    /// The control plane revoked these peers: close every link with them.
    fn on_revoked(&mut self, ids: &[u64]) {
        let ids: HashSet<u64> = ids.iter().copied().filter(|&id| id != self.me).collect();
        if ids.is_empty() {
            return;
        }
        let doomed: Vec<LinkId> = self
            .links
            .keys()
            .copied()
            .filter(|&l| self.peer_id_of(l).is_some_and(|id| ids.contains(&id)))
            .collect();
        self.neighbours.retain(|n| !ids.contains(&n.id));
        for l in doomed {
            tracing::info!(l, peer = ?self.peer_id_of(l), "peer revoked: closing its link");
            let err =
                matches!(self.links.get(&l).map(|x| &x.kind), Some(Kind::Out(_))).then(|| {
                    SdkError::Server {
                        code: ErrorCode::Revoked,
                        message: "peer revoked".into(),
                    }
                });
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(ErrorCode::Revoked, "peer revoked"))),
                err,
            );
        }
        self.reconcile();
        self.count_links();
    }

    // ----- actions -------------------------------------------------------------------

    fn refill(&mut self) {
        let t = Instant::now();
        let dt = t.saturating_duration_since(self.last_refill).as_secs_f64();
        self.last_refill = t;
        self.bucket.refill(dt);
    }

    fn drain_actions(&mut self) {
        let mut refilled = false;
        while let Some(a) = self.sched.poll_action() {
            if !refilled && matches!(a, Action::Push { .. } | Action::Serve { .. }) {
                self.refill();
                refilled = true;
            }
            self.execute(a);
        }
    }

    fn execute(&mut self, a: Action) {
        match a {
            Action::Push { child, seq } => self.upload(child, seq, true),
            Action::Serve { to, seq } => self.upload(to, seq, false),
            Action::NotFound { to, seq } => self.send_to(to, &Frame::NotFound(seq)),
            Action::Request { neighbour, seq } => {
                if let Some(link) = self.links.get_mut(&neighbour) {
                    if link.requested.len() >= 4096 {
                        link.requested.pop_first();
                    }
                    link.requested.insert(seq);
                }
                self.send_to(neighbour, &Frame::Request(seq));
            }
            Action::RequestFromServer { seq } => {
                if let Some(dp) = self.dp {
                    self.send_to(dp, &Frame::Request(seq));
                }
            }
            Action::SendBufferMap { to, map } => {
                if let Some(f) = from_buffer_map(&map) {
                    self.send_to(to, &Frame::BufferMap(f));
                }
            }
            Action::ReSearch { substream, exclude } => {
                tracing::info!(substream, ?exclude, "parent late or silent: re-searching");
                if let Some(from) = self.feeds.get(usize::from(substream)).and_then(feed_source) {
                    self.start_reparent_timer(substream, from);
                }
                self.research(substream, exclude.into_iter().collect());
            }
            Action::ReportParent {
                substream,
                parent,
                missed,
                window,
            } => self.report_non_delivery(substream, parent, missed, window),
            Action::Play { seq } => self.play(seq),
            Action::Skip { seq } => {
                tracing::debug!(seq, "chunk missed its play-out deadline");
                let mut st = self.shared.stats_mut();
                st.chunks_skipped += 1;
                // The output starves for this chunk's duration; a run of skips is one
                // stall.
                st.stall_time += Duration::from_millis(u64::from(self.chunk_ms));
                if !self.skipping {
                    st.stalls += 1;
                    st.discontinuities += 1;
                    drop(st);
                    self.shared.hub.discontinuity();
                }
                self.skipping = true;
            }
        }
    }

    fn play(&mut self, seq: u64) {
        let Some(c) = self.store.get(&seq).cloned() else {
            // Cannot happen (played chunks are held); count it as a skip.
            self.execute(Action::Skip { seq });
            return;
        };
        self.skipping = false;
        self.shared.played(&c);
        self.shared.hub.publish(c);
    }

    /// Sends a held chunk to a child (push) or a requester (serve).
    fn upload(&mut self, to: LinkId, seq: u64, push: bool) {
        let Some(c) = self.store.get(&seq).cloned() else {
            if !push {
                self.send_to(to, &Frame::NotFound(seq));
            }
            return;
        };
        // The budget is spent in the bytes sent: the chunk's frame with its signature.
        let payload_len = c.payload.len() as u64;
        let len = wire::chunk_frame_len(c.signature.len(), c.payload.len()) as f64;
        let Some(link) = self.links.get_mut(&to) else {
            return;
        };
        // Pushes are paced per child (each its share of the budget, so the skips of a
        // partly covered slot fall evenly on the children); serves spend only what
        // pushes leave of the whole budget.
        let allowed = if push {
            let now = self.epoch.elapsed();
            link.pace.allow(
                self.bucket.rate_bytes,
                popcount(link.mask),
                self.used_slots,
                len,
                now,
            )
        } else {
            self.bucket.allows(false, len)
        };
        if !allowed {
            // Over the upload budget: answers become NOT_FOUND (the requester tries
            // elsewhere); a push is skipped with a NOT_FOUND in its place, so that the
            // child repairs it at once and does not take this parent for a silent one
            // (a partly covered slot, see `starling_grid::slots_for`, is carried this way).
            self.send_to(to, &Frame::NotFound(seq));
            return;
        }
        let Some(h) = &link.handle else {
            return;
        };
        match h.send(Out::Chunk(c)) {
            Ok(()) => {
                self.bucket.spend(len);
                let mut st = self.shared.stats_mut();
                st.bytes_uploaded += payload_len;
                st.wire_bytes_uploaded += len as u64;
            }
            Err(QueueError::Full) if push => {
                tracing::info!(to, "child too slow: closing its link");
                self.drop_link(
                    to,
                    Some(Frame::Goodbye(reason(ErrorCode::TooSlow, "child too slow"))),
                    None,
                );
            }
            Err(QueueError::Full) => {}
            Err(QueueError::Closed) => {
                self.drop_link(to, None, Some(SdkError::Closed));
            }
        }
    }

    fn send_to(&mut self, to: LinkId, f: &Frame) {
        let Some(link) = self.links.get(&to) else {
            return;
        };
        let Some(h) = &link.handle else {
            return;
        };
        if let Err(QueueError::Closed) = h.send_frame(f) {
            self.drop_link(to, None, Some(SdkError::Closed));
        }
    }
}

/// The wire frame for a scheduler buffer map (same bit layout).
fn from_buffer_map(m: &BufferMap) -> Option<BufferMapFrame> {
    let b = m.to_bytes();
    let bits = Bytes::copy_from_slice(b.get(starling_grid::peer::BUFFER_MAP_HEADER_LEN..)?);
    Some(BufferMapFrame {
        base: m.base(),
        len: m.len(),
        bits,
    })
}

/// A received buffer map as the scheduler's type (`None` if inconsistent).
fn to_buffer_map(f: &BufferMapFrame) -> Option<BufferMap> {
    let mut v = Vec::with_capacity(starling_grid::peer::BUFFER_MAP_HEADER_LEN + f.bits.len());
    v.extend_from_slice(&f.base.to_be_bytes());
    v.extend_from_slice(&f.len.to_be_bytes());
    v.extend_from_slice(&f.bits);
    BufferMap::decode(&v).ok()
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn buffer_map_conversion_roundtrips() {
        let mut m = BufferMap::new(100, 13);
        m.set(100);
        m.set(112);
        let f = from_buffer_map(&m).unwrap();
        assert_eq!(f.base, 100);
        assert_eq!(f.len, 13);
        assert_eq!(f.bits.len(), 2);
        // The wire codec accepts it.
        let bytes = wire::encode_to_bytes(&Frame::BufferMap(f.clone())).unwrap();
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let back = wire::Decoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(back, Frame::BufferMap(f.clone()));
        assert_eq!(to_buffer_map(&f).unwrap(), m);
    }

    #[test]
    fn scheduler_config_scales_with_the_lag() {
        let c = scheduler_config(4, Duration::from_millis(200), Duration::from_secs(1));
        assert_eq!(c.target_lag, Duration::from_secs(1));
        assert_eq!(c.repair_lead, Duration::from_millis(500));
        assert_eq!(c.server_lead, Duration::from_millis(200));
        assert!(PeerScheduler::new(c).is_ok());
        let d = scheduler_config(4, Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(d.repair_lead, SchedulerConfig::default().repair_lead);
        assert_eq!(d.window, 64);
    }

    #[test]
    fn pushes_may_overdraw_the_bucket_and_serves_only_use_what_is_left() {
        // 64 kbit/s = 8000 B/s: up to 16,000 B saved, 16,000 B of push debt; empty at
        // the start.
        let mut b = UploadBucket::new(64);
        let chunk = 8000.0;
        assert!(!b.allows(false, 1.0));
        // A burst of pushes to children at once: two go out on debt.
        for _ in 0..2 {
            assert!(b.allows(true, chunk));
            b.spend(chunk);
        }
        // Debt exhausted. (Pushes are paced per child, `ChildPace`, with one more second
        // of debt for a child whose last push was skipped; their bytes still come off
        // the bucket.)
        assert!(!b.allows(true, chunk));
        b.spend(chunk);
        b.refill(1.0);
        // No serve while in debt, nor until a whole chunk's worth is saved.
        b.refill(2.0);
        assert!(b.allows(true, chunk));
        assert!(!b.allows(false, chunk));
        b.refill(1.0);
        assert!(b.allows(false, chunk));
        // The bucket holds at most 2 s of budget.
        b.refill(100.0);
        assert!((b.tokens - 16_000.0).abs() < 1e-9);
        // A lowered budget caps what is saved.
        b.set_rate(32);
        assert!((b.tokens - 8_000.0).abs() < 1e-9);
    }

    #[test]
    fn play_clock_follows_the_measured_chunk_rate() {
        let mut c = PlayClock::new(Duration::from_millis(1000));
        for s in 0..40u64 {
            c.observe(s, 1_000_000 + s * 2000);
        }
        assert!((c.rate - 0.5).abs() < 1e-9, "{}", c.rate);
        let mut d = PlayClock::new(Duration::from_millis(1000));
        for s in 0..40u64 {
            d.observe(s, 1_000_000 + s * 1005);
        }
        assert_eq!(d.rate, 1.0);
    }
}
