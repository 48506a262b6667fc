//! The peer-grid networking around the sans-IO [`starling_grid::peer::Peer`].
//!
//! One engine task owns the grid core's `PeerAddr` (the scheduler and the peer's policies:
//! play clock, upload budget and pacing, child slots, re-search, failed and banned
//! peers), a chunk store keyed by sequence number (the scheduler's bounded window) and
//! the table of links. Every connection has a reader and a writer task ([`link`]) that
//! talk to the engine over bounded channels. The engine does the I/O only: it turns
//! frames, link events, control-plane answers and timeouts into `PeerAddr` events (with
//! `now`, real time since the engine started), and executes its
//! [`starling_grid::peer::PeerAction`]s: pushes, answers and skip announcements go into
//! the per-link queues, play-out goes to the [`crate::hub::Hub`]. Crypto (tokens,
//! tickets, chunk signatures) stays here: the grid core knows no keys.
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
mod assignment;
mod bans;
mod complaints;
mod convert;
mod data_plane;
mod engine_loop;
mod frames;
pub(crate) mod handshake;
pub(crate) mod keys;
pub(crate) mod link;
mod link_table;
pub(crate) mod listener_limits;
mod peer_rights;
mod reparent;
pub(crate) mod sched_config;
mod upload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use starling_proto::wire::{Chunk, Frame, Limits, StreamInfo, Subscribe};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::control::{AssignedParent, Assignment, Control, JoinInfo, Offer, PeerAddr, Ticket};
use crate::error::SdkError;
use crate::rights::Grant;
use crate::shared::Shared;
use admission::{IpLimiter, TicketBook, Tickets};
use link::{AcceptCtx, LinkHandle, LinkId};
use reparent::ReparentTimer;
pub(crate) use sched_config::scheduler_config;
use starling_grid::peer::{PeerConfig, SchedulerConfig, UploadEstimator, UploadEstimatorConfig};
use starling_grid::{Parent, PeerId};
use starling_proto::integrity::IntegrityError;

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
        /// The protocol version the handshake chose.
        version: u16,
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
    Revoked(Vec<PeerId>),
    /// The control plane's current assignment (from a heartbeat).
    Assignment(Assignment),
    /// Answer to a `Reparent` call.
    Reparented {
        substream: u16,
        excluded: Vec<PeerId>,
        result: Result<AssignedParent, SdkError>,
        /// The new parent's ticket.
        ticket: Option<Ticket>,
    },
    /// Answer to a re-`Join`.
    Rejoined(Result<JoinInfo, SdkError>),
    /// The control plane re-counted our child slots (`SessionDown.child_slots`).
    ChildSlots(u32),
}

/// Who feeds a substream now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Feed {
    Server,
    Peer(PeerAddr),
    /// The parent is gone; a `Reparent` call is under way (mesh repair covers).
    Pending,
}

impl Feed {
    fn from_parent(p: AssignedParent, me: PeerId) -> Feed {
        match p.peer() {
            Some(p) if p.id != me => Feed::Peer(p),
            _ => Feed::Server,
        }
    }
    fn parent(&self) -> Option<Parent> {
        match self {
            Feed::Server => Some(Parent::Server),
            Feed::Peer(p) => Some(Parent::Peer(p.id)),
            Feed::Pending => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    DataPlane,
    /// Dialled by us to a parent and/or neighbour peer.
    Out(PeerAddr),
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
    /// Outgoing: the protocol version the handshake chose (0 while dialling).
    version: u16,
    /// Outgoing: the last `RELAYING` mask sent (`None`: none yet).
    told_relaying: Option<u64>,
    /// Wanted as a mesh neighbour (outgoing) / registered with the scheduler.
    want_neighbour: bool,
    neighbour: bool,
    /// Chunks requested on this link and not answered yet (others are unsolicited).
    requested: BTreeSet<u64>,
    /// Incoming links: what the peer's token grants (peer id, expiry).
    grant: Option<Grant>,
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
            version: 0,
            told_relaying: None,
            want_neighbour: false,
            neighbour: false,
            requested: BTreeSet::new(),
            grant: None,
            request_bucket: None,
            tickets: None,
        }
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
    /// Connections our own punches opened towards children ([`crate::punch::Puncher`]),
    /// handed to the peer listener as if it had accepted them.
    pub punched: Option<mpsc::Receiver<(tokio::net::TcpStream, std::net::SocketAddr)>>,
}

/// Starts the engine (and the peer listener). Returns the event sender (for the
/// heartbeat loop) and the tasks.
pub(crate) fn start(setup: GridSetup) -> Result<(mpsc::Sender<Ev>, Vec<JoinHandle<()>>), SdkError> {
    let cfg = SchedulerConfig {
        parent_window: setup.parent_window,
        parent_max_missed: setup.parent_max_missed,
        ..scheduler_config(setup.k, setup.chunk, setup.lag)
    };
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
    // Punched links to parents leave from the listener's port.
    let rendezvous = Arc::new(crate::punch::Rendezvous::default());
    let punch_from = setup
        .listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| (a, rendezvous.clone()));
    let listener = setup.listener.filter(|_| may_relay);
    let relaying = listener.is_some() && setup.upload_kbps > 0;
    if let Some(l) = listener {
        tasks.push(tokio::spawn(link::listen(
            l,
            setup.punched,
            AcceptCtx {
                shared: setup.shared.clone(),
                limits: setup.limits,
                peer: setup.peer_limits,
                idle: setup.idle,
                events: tx.clone(),
                ids: ids.clone(),
                drained: drained.clone(),
                per_ip: IpLimiter::new(setup.max_links_per_ip),
                rendezvous,
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
    // The grid core's clock: real time since `epoch`.
    let epoch = Instant::now();
    let peer = starling_grid::peer::Peer::new(
        PeerConfig {
            me: setup.join.peer_id,
            scheduler: cfg,
            upload_kbps: setup.upload_kbps,
            budget_kbps,
            stream_kbps: setup.join.stream_kbps,
            child_slots: setup.join.child_slots,
        },
        Duration::ZERO,
    )
    .map_err(|e| SdkError::Config(e.to_string()))?;
    let mut engine = Engine {
        shared: setup.shared,
        control: setup.control,
        session_id: setup.join.session_id.clone(),
        me: setup.join.peer_id,
        offer: setup.offer,
        peer,
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
        reparent_timers: vec![None; usize::from(k)],
        neighbours: Vec::new(),
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
        skipping: false,
        fresh_join: false,
        next_grant_check: Instant::now(),
        estimator: (relaying && setup.estimate_upload)
            .then(|| UploadEstimator::new(budget_kbps, UploadEstimatorConfig::default())),
        drained,
        epoch,
        unreachable: Vec::new(),
        punch_from,
    };
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
    me: PeerId,
    offer: Offer,
    /// The peer's policies and scheduler (sans-IO): the engine maps frames to its
    /// events and its actions to frames.
    peer: starling_grid::peer::Peer,
    store: BTreeMap<u64, Chunk>,
    links: HashMap<LinkId, Link>,
    /// Outgoing peer links by remote peer id.
    peer_links: HashMap<PeerId, LinkId>,
    dp: Option<LinkId>,
    /// Data-plane wire address (our token is in `shared.rights`).
    dp_addr: String,
    dp_retry_at: Option<tokio::time::Instant>,
    dp_backoff: Duration,
    dp_failures: u32,
    rejoining: bool,
    feeds: Vec<Feed>,
    neighbours: Vec<PeerAddr>,
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
    /// The last play-out decision was a skip (one discontinuity per run of skips).
    skipping: bool,
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
    /// The origin of the grid core's clock (and the estimator's).
    epoch: Instant,
    /// Parents whose dial failed at the TCP connect (refused or timed out), told to the
    /// control plane with the next `Reparent` that excludes them (bounded).
    unreachable: Vec<PeerId>,
    /// Our peer listener's address (and its rendezvous): links to punch-only parents
    /// are dialled from it.
    punch_from: Option<(std::net::SocketAddr, Arc<crate::punch::Rendezvous>)>,
}

/// Most parents remembered as unreachable until a `Reparent` carries them.
const MAX_UNREACHABLE: usize = 16;

/// The parent identity a feed stands for (`None` = the data plane; pending = no one).
fn feed_source(f: &Feed) -> Option<Option<PeerId>> {
    match f {
        Feed::Server => Some(None),
        Feed::Peer(p) => Some(Some(p.id)),
        Feed::Pending => None,
    }
}

/// Longest time between two engine wake-ups (grant expiry, the buffer gauge).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

fn popcount(mask: u64) -> u32 {
    mask.count_ones()
}

impl Engine {
    /// Now on the grid core's clock.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

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
}
