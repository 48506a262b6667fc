//! The live peer-grid state of this control-plane process: one [`GridAssigner`] per LIVE
//! broadcast that has viewers, the session ↔ peer id ↔ peer address maps, heartbeat byte
//! counters and the stream rate each ingesting node last reported.
//!
//! Everything here is in memory and per process. The database stays the record of the
//! audience (sessions, joins, leaves); the grid is live state rebuilt from joins. Several
//! control-plane replicas would each hold a different grid for the same broadcast, so a
//! multi-replica deployment must route all viewer calls of one broadcast to one replica
//! (shard by broadcast id) — see ARCHITECTURE.md.
//!
//! Locking: `broadcasts`, `sessions` and `rates` are `std` mutexes held for a map lookup
//! or update only; each broadcast's [`GridState`] has its own mutex, held for one
//! assigner operation. The only nesting is grid → `sessions` (join, so that a concurrent
//! [`LiveGrids::drop_broadcast`] cannot miss the new session) and `sessions` → `rates`
//! (a heartbeat's counter bound; `rates` is a leaf). No lock is held across an `.await`
//! (this module has no async code).
//!
//! Heartbeat byte counters are clamped like reports' ([`crate::reports::clamp`]): each
//! delta is bounded by the stream rate (or upload ceiling) × margin × the time since
//! the session's previous heartbeat (its join), plus a burst, so a forged counter moves
//! `GetBroadcast.peer_share` no more than a viewer physically can.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use starling_proto::token::Scopes;
use starling_proto::v1::{PeerRef, PeerReportKind, SubstreamParent};

use crate::reports::clamp::{self, Bounds, CounterLimits, Credits};
use crate::trust::{ReportLedger, TrustConfig, UploadTrust};
use starling_grid::assign::{
    GridAssigner, GridConfig, GridError, GridStats, Parent, PeerId, PeerInfo,
};

/// Stream rate assumed for slot accounting when the ingesting node has not reported a
/// measured rate yet at the first join of a broadcast. The grid keeps the rate it was
/// created with for its whole life (a [`GridAssigner`] cannot be re-rated).
pub const DEFAULT_STREAM_KBPS: u32 = 1000;

/// Longest `exclude_peer_ids` list a re-search may carry.
pub const MAX_EXCLUDE: usize = 64;

/// Most distinct peers one session may report bad (`ReportPeer`): an honest viewer meets
/// few polluters, and a malicious one cannot exclude the whole grid from relaying.
pub const MAX_REPORTS_PER_SESSION: usize = 16;

/// How long a peer handed to a session (as a parent or neighbour, at join, heartbeat or
/// re-search) stays one the session may report.
pub const REPORTABLE_FOR: Duration = Duration::from_secs(60);

/// Most peers remembered per session as reportable.
const MAX_REPORTABLE: usize = 64;

/// A peer id: random in `1..=i64::MAX` (never 0, the proto's "absent"; fits a signed
/// 64-bit column), so ids cannot be guessed from one's own and a restarted control
/// plane does not hand out ids that revocation lists of the previous run still name.
fn random_peer_id() -> PeerId {
    loop {
        let b = uuid::Uuid::new_v4().into_bytes();
        let mut v = [0u8; 8];
        // Bytes 6 and 8 carry the UUID version and variant: skip them.
        v[..6].copy_from_slice(&b[..6]);
        v[6..].copy_from_slice(&b[9..11]);
        let id = u64::from_le_bytes(v) & (i64::MAX as u64);
        if id != 0 {
            return id;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its map consistent before anything can panic (the
    // assigner's own invariants are checked by its tests), so a poisoned lock is usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The grid-related answer to a join.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinView {
    /// The new peer's id.
    pub peer_id: PeerId,
    /// One parent per substream.
    pub parents: Vec<SubstreamParent>,
    /// Mesh neighbours (peers that accept connections).
    pub neighbours: Vec<PeerRef>,
    /// Stream rate the grid accounts slots with.
    pub stream_kbps: u32,
    /// Child slots the claimed upload buys (the grid may use fewer until confirmed).
    pub child_slots: u32,
    /// Upload budget the grid counts slots with now (the claim, capped until confirmed).
    pub granted_kbps: u32,
    /// How many other peers were re-parented by this join (they learn it by heartbeat).
    pub moved: usize,
}

/// What a heartbeat learns from the grid.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeartbeatView {
    /// The viewer's current parents.
    pub parents: Vec<SubstreamParent>,
    /// Its current mesh neighbours.
    pub neighbours: Vec<PeerRef>,
    /// The viewer's peer id.
    pub peer_id: PeerId,
    /// Its broadcast.
    pub broadcast_id: String,
    /// The chunk token it holds (scopes, expiry), if one was issued.
    pub token: Option<TokenState>,
    /// A counter of this heartbeat grew beyond its physical bound and was clamped.
    pub clamped: bool,
}

/// The chunk token a session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenState {
    /// Its scopes (renewals keep them).
    pub scopes: Scopes,
    /// Its expiry, unix ms.
    pub expires_at_ms: i64,
}

/// Which sessions an admin revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeTarget<'a> {
    /// Every session whose credential had this `sub`.
    Subject(&'a str),
    /// One session.
    Session(&'a str),
}

/// A session removed from its grid by a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Session id.
    pub session_id: String,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Peers re-parented because it left.
    pub moved: usize,
    /// Expiry of the session's credential (unix seconds), if it had one.
    pub credential_expires_at: Option<u64>,
}

/// The outcome of a peer report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPeerReport {
    /// The reporter's broadcast.
    pub broadcast_id: String,
    /// The reporter's peer id.
    pub reporter: PeerId,
    /// Whether the reported peer is (still) in the reporter's grid.
    pub known_peer: bool,
    /// Distinct reporter addresses that complained about it (this kind).
    pub reporters: usize,
    /// Whether this report excluded (demoted) the peer.
    pub excluded: bool,
    /// Peers re-parented away from it (0 unless this report excluded it).
    pub moved: usize,
}

/// Why a bad-peer report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefused {
    /// The reporting session is not in any grid of this process.
    #[error("unknown session")]
    UnknownSession,
    /// A peer reporting itself.
    #[error("a peer cannot report itself")]
    SelfReport,
    /// The session already reported [`MAX_REPORTS_PER_SESSION`] other peers.
    #[error("this session already reported {MAX_REPORTS_PER_SESSION} peers")]
    TooManyReports,
    /// The reported peer is not (and was not recently) one of the session's parents
    /// (NON_DELIVERY) or parents and neighbours (BAD_CHUNK).
    #[error("peer {peer_id} is not one of this session's {role}")]
    NotAssigned {
        /// The reported peer.
        peer_id: PeerId,
        /// "parents" or "parents or neighbours".
        role: &'static str,
    },
}

/// Grid figures of one broadcast, for `GetBroadcast`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GridFigures {
    /// The assigner's statistics.
    pub stats: GridStats,
    /// Bytes from peers / all bytes delivered, from heartbeats (0 when none yet).
    pub peer_share: f64,
}

/// Why a join could not be admitted to the grid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    /// The assigner refused (no capacity, bad config...).
    #[error(transparent)]
    Grid(#[from] GridError),
    /// The broadcast's grid was dropped (stopped) while the join was in flight.
    #[error("the broadcast was stopped")]
    Stopped,
}

/// Why a re-search failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReparentRefused {
    /// The session is not in any grid of this process (unknown, left or expired).
    #[error("unknown session")]
    UnknownSession,
    /// The substream index is not below the broadcast's substream count.
    #[error("substream {substream} out of range: the broadcast has {substreams} substreams")]
    InvalidSubstream {
        /// Requested substream.
        substream: u32,
        /// Substreams of the broadcast.
        substreams: u16,
    },
}

/// Parameters of a join, from the request and the database.
#[derive(Debug, Clone)]
pub struct JoinInput<'a> {
    /// Broadcast joined.
    pub broadcast_id: &'a str,
    /// Its substream count.
    pub substreams: u16,
    /// Data-plane substream slots available (admission limit), `u64::MAX` = unlimited.
    pub server_slots: u64,
    /// The new session's id.
    pub session_id: &'a str,
    /// Where the viewer accepts peer connections (empty = does not relay).
    pub peer_addr: String,
    /// Claimed upload budget (already 0 when `peer_addr` is empty); the grid grants at
    /// most [`TrustConfig::upload_ceiling`] of it until heartbeats confirm more.
    pub upload_kbps: u32,
    /// The caller's IP as this process sees it (distinct reporters are counted by it).
    pub remote_ip: Option<IpAddr>,
    /// Network prefix for the "nearby" preference (see [`addr_prefix`]).
    pub addr_prefix: u32,
    /// The `sub` of the viewer's credential (`None` for public broadcasts), for
    /// revocation by subject.
    pub subject: Option<String>,
    /// Expiry of that credential (unix seconds), to know how long a revocation by
    /// subject must refuse it.
    pub credential_expires_at: Option<u64>,
}

#[derive(Debug)]
struct PeerSlot {
    session_id: String,
    addr: String,
    neighbours: Vec<PeerId>,
}

#[derive(Debug)]
struct GridState {
    assigner: GridAssigner,
    peers: HashMap<PeerId, PeerSlot>,
    /// Set when the broadcast's grid is dropped; late joins are refused.
    closed: bool,
    /// BAD_CHUNK reports by distinct reporter address.
    bad_chunk: ReportLedger,
    /// NON_DELIVERY reports by distinct child address.
    non_delivery: ReportLedger,
}

impl GridState {
    fn parent_ref(&self, s: usize, p: Parent) -> SubstreamParent {
        SubstreamParent {
            substream: u32::try_from(s).unwrap_or(u32::MAX),
            peer: match p {
                Parent::Server => None,
                Parent::Peer(id) => Some(self.peer_ref(id)),
            },
            // Signed by the service when it hands the assignment out.
            ticket: Vec::new(),
        }
    }

    fn peer_ref(&self, id: PeerId) -> PeerRef {
        PeerRef {
            peer_id: id,
            addr: self
                .peers
                .get(&id)
                .map(|p| p.addr.clone())
                .unwrap_or_default(),
        }
    }

    fn parents_of(&self, id: PeerId) -> Vec<SubstreamParent> {
        self.assigner
            .parents(id)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(s, p)| self.parent_ref(s, p))
            .collect()
    }

    /// Tops `current` up to the configured neighbour count with random peers that accept
    /// connections (a peer without an address cannot be dialled).
    fn top_up_neighbours(&mut self, id: PeerId, current: &mut Vec<PeerId>) {
        let want = usize::from(self.assigner.config().neighbours);
        if current.len() >= want {
            return;
        }
        let sample = self.assigner.sample_neighbours(id, want * 2);
        for n in sample {
            if current.len() >= want {
                break;
            }
            let dialable = self.peers.get(&n).is_some_and(|p| !p.addr.is_empty());
            if dialable && !current.contains(&n) {
                current.push(n);
            }
        }
    }

    fn remove_peer(&mut self, id: PeerId, now: Duration) -> usize {
        self.peers.remove(&id);
        self.bad_chunk.forget(id);
        self.non_delivery.forget(id);
        self.assigner.leave(id, now).len()
    }

    /// Slots in use by `id` × the substream rate: what its children can take, kbit/s.
    fn carried_kbps(&self, id: PeerId) -> u64 {
        let used = self.assigner.children(id).map_or(0, |c| c.len());
        (used as u64).saturating_mul(u64::from(self.assigner.stats().substream_kbps))
    }
}

/// One broadcast's grid plus its delivered-byte totals.
#[derive(Debug)]
pub struct BroadcastGrid {
    state: Mutex<GridState>,
    from_server: AtomicU64,
    from_peers: AtomicU64,
    uploaded: AtomicU64,
}

#[derive(Debug, Clone)]
struct SessionEntry {
    broadcast_id: String,
    grid: Arc<BroadcastGrid>,
    peer_id: PeerId,
    last_seen: Duration,
    /// Last cumulative counters reported: from server, from peers, uploaded.
    counters: [u64; 3],
    /// Unused counter allowance (`None`: the start-up burst, not spent yet).
    credits: Option<Credits>,
    /// The credential's subject.
    subject: Option<String>,
    /// The credential's expiry, unix seconds.
    credential_expires_at: Option<u64>,
    /// The chunk token last issued.
    token: Option<TokenState>,
    /// Peers this session reported.
    reported: Vec<PeerId>,
    /// The caller's IP at join.
    addr: Option<IpAddr>,
    /// Claimed and granted upload budget.
    upload: UploadTrust,
    /// Peers handed to this session recently: (peer, last time as a parent, last time
    /// as a parent or neighbour).
    reportable: Vec<(PeerId, Option<Duration>, Duration)>,
}

impl SessionEntry {
    fn remember(&mut self, peers: impl IntoIterator<Item = (PeerId, bool)>, now: Duration) {
        for (id, parent) in peers {
            let as_parent = parent.then_some(now);
            match self.reportable.iter_mut().find(|(p, _, _)| *p == id) {
                Some(e) => {
                    e.1 = as_parent.or(e.1);
                    e.2 = now;
                }
                None => self.reportable.push((id, as_parent, now)),
            }
        }
        self.reportable
            .retain(|(_, _, t)| now.saturating_sub(*t) <= REPORTABLE_FOR);
        if self.reportable.len() > MAX_REPORTABLE {
            self.reportable
                .sort_by_key(|&(_, _, t)| std::cmp::Reverse(t));
            self.reportable.truncate(MAX_REPORTABLE);
        }
    }

    fn may_report(&self, id: PeerId, as_parent: bool, now: Duration) -> bool {
        let recent = |t: Duration| now.saturating_sub(t) <= REPORTABLE_FOR;
        self.reportable.iter().any(|&(p, parent_at, seen_at)| {
            p == id
                && if as_parent {
                    parent_at.is_some_and(recent)
                } else {
                    recent(seen_at)
                }
        })
    }
}

fn assigned(parents: &[SubstreamParent], neighbours: &[PeerRef]) -> Vec<(PeerId, bool)> {
    parents
        .iter()
        .filter_map(|p| p.peer.as_ref().map(|r| (r.peer_id, true)))
        .chain(neighbours.iter().map(|n| (n.peer_id, false)))
        .collect()
}

/// A session removed from the grid by expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Session id.
    pub session_id: String,
    /// Its broadcast.
    pub broadcast_id: String,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Peers re-parented because it left.
    pub moved: usize,
}

/// All live grids of this process.
#[derive(Debug)]
pub struct LiveGrids {
    epoch: Instant,
    trust: TrustConfig,
    broadcasts: Mutex<HashMap<String, Arc<BroadcastGrid>>>,
    sessions: Mutex<HashMap<String, SessionEntry>>,
    rates: Mutex<HashMap<String, u32>>,
    bad_peer_reports: AtomicU64,
    limits: CounterLimits,
    peers_demoted: AtomicU64,
    uploads_confirmed: AtomicU64,
}

impl Default for LiveGrids {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveGrids {
    /// No grids yet; default counter limits and trust rules.
    pub fn new() -> Self {
        Self::with_config(CounterLimits::default(), TrustConfig::default())
    }

    /// No grids yet; heartbeat counters bounded by `limits`, trust rules `trust`.
    pub fn with_config(limits: CounterLimits, trust: TrustConfig) -> Self {
        LiveGrids {
            limits,
            epoch: Instant::now(),
            trust,
            broadcasts: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            bad_peer_reports: AtomicU64::new(0),
            peers_demoted: AtomicU64::new(0),
            uploads_confirmed: AtomicU64::new(0),
        }
    }

    /// Monotonic time of this process, the grids' clock.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Records the stream rate the ingesting node measured (ignored when 0).
    pub fn set_rate(&self, broadcast_id: &str, kbps: u32) {
        if kbps > 0 {
            lock(&self.rates).insert(broadcast_id.to_string(), kbps);
        }
    }

    /// The latest measured stream rate of a broadcast, if any.
    pub fn rate(&self, broadcast_id: &str) -> Option<u32> {
        lock(&self.rates).get(broadcast_id).copied()
    }

    fn grid_for(&self, input: &JoinInput<'_>) -> Result<Arc<BroadcastGrid>, GridError> {
        let mut map = lock(&self.broadcasts);
        if let Some(g) = map.get(input.broadcast_id) {
            return Ok(g.clone());
        }
        let stream_kbps = match self.rate(input.broadcast_id) {
            Some(r) => r,
            None => {
                tracing::info!(
                    broadcast_id = input.broadcast_id,
                    default_kbps = DEFAULT_STREAM_KBPS,
                    "no measured stream rate yet; the grid accounts slots with the default rate"
                );
                DEFAULT_STREAM_KBPS
            }
        };
        let cfg = GridConfig {
            substreams: input.substreams,
            stream_kbps,
            server_slots: input.server_slots,
            seed: seed_of(input.broadcast_id),
            ..GridConfig::default()
        };
        let assigner = GridAssigner::new(cfg)?;
        tracing::info!(
            broadcast_id = input.broadcast_id,
            substreams = input.substreams,
            stream_kbps,
            server_slots = input.server_slots,
            "peer grid created"
        );
        let grid = Arc::new(BroadcastGrid {
            state: Mutex::new(GridState {
                assigner,
                peers: HashMap::new(),
                closed: false,
                bad_chunk: ReportLedger::default(),
                non_delivery: ReportLedger::default(),
            }),
            from_server: AtomicU64::new(0),
            from_peers: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
        });
        map.insert(input.broadcast_id.to_string(), grid.clone());
        Ok(grid)
    }

    /// Admits a viewer to its broadcast's grid (creating the grid at the first join).
    ///
    /// # Errors
    /// [`JoinRefused`] when the assigner refuses or the broadcast was just stopped.
    pub fn join(&self, input: JoinInput<'_>) -> Result<JoinView, JoinRefused> {
        let grid = self.grid_for(&input)?;
        let now = self.now();
        let mut st = lock(&grid.state);
        if st.closed {
            return Err(JoinRefused::Stopped);
        }
        let mut peer_id = random_peer_id();
        while st.peers.contains_key(&peer_id) {
            peer_id = random_peer_id();
        }
        let upload = UploadTrust::new(
            input.upload_kbps,
            self.trust.upload_ceiling(st.assigner.config().stream_kbps),
        );
        let plan = st.assigner.join(
            peer_id,
            PeerInfo {
                upload_kbps: upload.granted(),
                addr_prefix: input.addr_prefix,
                now,
            },
        )?;
        st.peers.insert(
            peer_id,
            PeerSlot {
                session_id: input.session_id.to_string(),
                addr: input.peer_addr,
                neighbours: Vec::new(),
            },
        );
        let mut neighbours: Vec<PeerId> = plan
            .neighbours
            .iter()
            .copied()
            .filter(|n| st.peers.get(n).is_some_and(|p| !p.addr.is_empty()))
            .collect();
        st.top_up_neighbours(peer_id, &mut neighbours);
        if let Some(slot) = st.peers.get_mut(&peer_id) {
            slot.neighbours.clone_from(&neighbours);
        }
        let view = JoinView {
            peer_id,
            parents: plan
                .parents
                .iter()
                .enumerate()
                .map(|(s, &p)| st.parent_ref(s, p))
                .collect(),
            neighbours: neighbours.iter().map(|&n| st.peer_ref(n)).collect(),
            stream_kbps: st.assigner.config().stream_kbps,
            // The slots the claim buys once confirmed (the SDK admits children up to
            // twice this); the grid assigns children only up to the granted budget.
            child_slots: st.assigner.slots_for(input.upload_kbps),
            granted_kbps: upload.granted(),
            moved: plan.moved.len(),
        };
        let mut entry = SessionEntry {
            broadcast_id: input.broadcast_id.to_string(),
            grid: grid.clone(),
            peer_id,
            last_seen: now,
            counters: [0; 3],
            credits: None,
            subject: input.subject,
            credential_expires_at: input.credential_expires_at,
            token: None,
            reported: Vec::new(),
            addr: input.remote_ip,
            upload,
            reportable: Vec::new(),
        };
        entry.remember(assigned(&view.parents, &view.neighbours), now);
        // Still under the grid lock: `drop_broadcast` sees either no peer or both maps.
        lock(&self.sessions).insert(input.session_id.to_string(), entry);
        Ok(view)
    }

    /// Records a heartbeat (liveness and cumulative byte counters) and returns the
    /// viewer's current parents and neighbours; `None` when the session is not in a grid
    /// of this process.
    pub fn heartbeat(&self, session_id: &str, counters: [u64; 3]) -> Option<HeartbeatView> {
        let now = self.now();
        let (grid, peer_id, delta, broadcast_id, token, clamped) = {
            let mut sessions = lock(&self.sessions);
            let e = sessions.get_mut(session_id)?;
            let covered_ms =
                u64::try_from(now.saturating_sub(e.last_seen).as_millis()).unwrap_or(u64::MAX);
            e.last_seen = now;
            let bounds = Bounds::new(self.rate(&e.broadcast_id), self.limits);
            let credits = e.credits.get_or_insert_with(|| bounds.start());
            let raw: [u64; 3] =
                std::array::from_fn(|i| clamp::raw_delta(counters[i], e.counters[i]));
            let c = clamp::clamp([raw[0], raw[1], raw[2], 0], covered_ms, credits, &bounds);
            let delta = [c.from_server, c.from_peers, c.uploaded];
            e.counters = counters.map(clamp::baseline);
            (
                e.grid.clone(),
                e.peer_id,
                delta,
                e.broadcast_id.clone(),
                e.token,
                c.clamped,
            )
        };
        for (total, d) in [&grid.from_server, &grid.from_peers, &grid.uploaded]
            .into_iter()
            .zip(delta)
        {
            if d > 0 {
                // Saturating add on an atomic: a CAS loop (fetch_update never fails here).
                let _ = total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_add(d))
                });
            }
        }
        let mut st = lock(&grid.state);
        let mut neighbours = st
            .peers
            .get(&peer_id)
            .map(|p| p.neighbours.clone())
            .unwrap_or_default();
        let before = neighbours.len();
        neighbours.retain(|n| st.peers.contains_key(n));
        st.top_up_neighbours(peer_id, &mut neighbours);
        if neighbours.len() != before
            && let Some(slot) = st.peers.get_mut(&peer_id)
        {
            slot.neighbours.clone_from(&neighbours);
        }
        let parents = st.parents_of(peer_id);
        let neighbours: Vec<PeerRef> = neighbours.iter().map(|&n| st.peer_ref(n)).collect();
        // Grid → sessions is the allowed nesting.
        let grant = lock(&self.sessions).get_mut(session_id).and_then(|e| {
            e.remember(assigned(&parents, &neighbours), now);
            e.upload
                .on_heartbeat(now, counters[2], self.trust.confirm_window, || {
                    st.carried_kbps(peer_id)
                })
        });
        if let Some(granted) = grant {
            let moved = st.assigner.set_upload(peer_id, granted, now).len();
            self.uploads_confirmed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                peer_id,
                granted_kbps = granted,
                moved,
                "peer's upload confirmed by its heartbeats: more child slots"
            );
        }
        Some(HeartbeatView {
            parents,
            neighbours,
            peer_id,
            broadcast_id,
            token,
            clamped,
        })
    }

    /// A session's relay upload budget changed (its SDK measured a slower uplink than
    /// it offered, reported in `Heartbeat.upload_kbps`; 0 = unchanged): the peer's child
    /// slots follow ([`GridAssigner::set_upload`]) and the children it can no longer
    /// carry are re-parented (they learn it at their next heartbeat, or re-search when
    /// the peer closes their link). Peers that do not accept connections (no
    /// `peer_addr` at join) never get slots. Returns the peers moved, `None` when the
    /// session is not in a grid of this process.
    pub fn set_upload(&self, session_id: &str, upload_kbps: u32) -> Option<usize> {
        if upload_kbps == 0 {
            return Some(0);
        }
        let now = self.now();
        let (grid, peer_id, granted) = {
            let mut sessions = lock(&self.sessions);
            let e = sessions.get_mut(session_id)?;
            // A report can only lower the claim (and the grant with it).
            match e.upload.lower(upload_kbps) {
                Some(g) => (e.grid.clone(), e.peer_id, g),
                None => return Some(0),
            }
        };
        let mut st = lock(&grid.state);
        if st.peers.get(&peer_id).is_none_or(|p| p.addr.is_empty()) {
            return Some(0);
        }
        let moved = st.assigner.set_upload(peer_id, granted, now).len();
        if moved > 0 {
            tracing::info!(peer_id, upload_kbps, moved, "peer upload budget changed");
        }
        Some(moved)
    }

    /// Records the chunk token issued to a session (join or renewal). Returns false when
    /// the session is no longer in a grid (left, expired or revoked meanwhile).
    pub fn set_token(&self, session_id: &str, token: TokenState) -> bool {
        match lock(&self.sessions).get_mut(session_id) {
            Some(e) => {
                e.token = Some(token);
                true
            }
            None => false,
        }
    }

    /// The peer id and broadcast of a session in a grid of this process.
    pub fn session_peer(&self, session_id: &str) -> Option<(PeerId, String)> {
        lock(&self.sessions)
            .get(session_id)
            .map(|e| (e.peer_id, e.broadcast_id.clone()))
    }

    /// Removes the sessions of `broadcast_id` matching `target` from the grid (their
    /// children are re-parented) and returns them, for the caller to end in the database
    /// and announce.
    pub fn revoke(&self, broadcast_id: &str, target: RevokeTarget<'_>) -> Vec<Revoked> {
        let now = self.now();
        let removed: Vec<(String, SessionEntry)> = {
            let mut sessions = lock(&self.sessions);
            let ids: Vec<String> = sessions
                .iter()
                .filter(|(id, e)| {
                    e.broadcast_id == broadcast_id
                        && match target {
                            RevokeTarget::Subject(sub) => e.subject.as_deref() == Some(sub),
                            RevokeTarget::Session(s) => id.as_str() == s,
                        }
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| sessions.remove(&id).map(|e| (id, e)))
                .collect()
        };
        removed
            .into_iter()
            .map(|(session_id, e)| Revoked {
                moved: lock(&e.grid.state).remove_peer(e.peer_id, now),
                session_id,
                peer_id: e.peer_id,
                credential_expires_at: e.credential_expires_at,
            })
            .collect()
    }

    /// A viewer reports `peer_id`: it sent a chunk failing verification
    /// ([`PeerReportKind::BadChunk`]; the peer must be one of the session's recent
    /// parents or neighbours) or did not deliver its pushes
    /// ([`PeerReportKind::NonDelivery`]; it must be one of the session's recent
    /// parents). A report counts once per distinct reporter address
    /// ([`crate::limits::addr_key`] of the IP the reporter joined from); at
    /// [`TrustConfig::report_threshold`] (bad chunks) or
    /// [`TrustConfig::demote_threshold`] (non-delivery) distinct addresses the peer is
    /// demoted: never assigned as a parent again in that broadcast, its children
    /// re-parented (they learn it at their next heartbeat).
    ///
    /// # Errors
    /// [`ReportRefused`] for an unknown session, a self-report, a peer that is not the
    /// session's to report, or too many reports.
    pub fn report_bad_peer(
        &self,
        session_id: &str,
        peer_id: PeerId,
        kind: PeerReportKind,
    ) -> Result<BadPeerReport, ReportRefused> {
        let now = self.now();
        let as_parent = kind == PeerReportKind::NonDelivery;
        let (grid, reporter, broadcast_id, addr) = {
            let mut sessions = lock(&self.sessions);
            let e = sessions
                .get_mut(session_id)
                .ok_or(ReportRefused::UnknownSession)?;
            if e.peer_id == peer_id {
                return Err(ReportRefused::SelfReport);
            }
            if !e.may_report(peer_id, as_parent, now) {
                return Err(ReportRefused::NotAssigned {
                    peer_id,
                    role: if as_parent {
                        "parents"
                    } else {
                        "parents or neighbours"
                    },
                });
            }
            if !e.reported.contains(&peer_id) {
                if e.reported.len() >= MAX_REPORTS_PER_SESSION {
                    return Err(ReportRefused::TooManyReports);
                }
                e.reported.push(peer_id);
            }
            (
                e.grid.clone(),
                e.peer_id,
                e.broadcast_id.clone(),
                e.addr
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            )
        };
        self.bad_peer_reports.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&grid.state);
        let known_peer = st.peers.contains_key(&peer_id);
        if !known_peer {
            return Ok(BadPeerReport {
                broadcast_id,
                reporter,
                known_peer,
                reporters: 0,
                excluded: false,
                moved: 0,
            });
        }
        let (reporters, threshold) = if as_parent {
            let t = self.trust.demote_threshold;
            (st.non_delivery.add(peer_id, addr, t), t)
        } else {
            let t = self.trust.report_threshold;
            (st.bad_chunk.add(peer_id, addr, t), t)
        };
        let excluded = reporters >= threshold.max(1) && st.assigner.is_bad(peer_id) == Some(false);
        let moved = if excluded {
            self.peers_demoted.fetch_add(1, Ordering::Relaxed);
            st.assigner.report_bad_peer(peer_id, now).len()
        } else {
            0
        };
        Ok(BadPeerReport {
            broadcast_id,
            reporter,
            known_peer,
            reporters,
            excluded,
            moved,
        })
    }

    /// Peers demoted (excluded as parents) by reports since start.
    pub fn peers_demoted(&self) -> u64 {
        self.peers_demoted.load(Ordering::Relaxed)
    }

    /// Upload budgets raised by confirming heartbeats since start.
    pub fn uploads_confirmed(&self) -> u64 {
        self.uploads_confirmed.load(Ordering::Relaxed)
    }

    /// Whether a peer of a broadcast's grid is demoted (`None`: no such peer).
    pub fn is_demoted(&self, broadcast_id: &str, peer_id: PeerId) -> Option<bool> {
        let grid = lock(&self.broadcasts).get(broadcast_id).cloned()?;
        lock(&grid.state).assigner.is_bad(peer_id)
    }

    /// Bad-peer reports accepted since start.
    pub fn bad_peer_reports(&self) -> u64 {
        self.bad_peer_reports.load(Ordering::Relaxed)
    }

    /// A new parent for one substream of a session (quality re-search).
    ///
    /// # Errors
    /// [`ReparentRefused`] for an unknown session or a substream out of range.
    pub fn reparent(
        &self,
        session_id: &str,
        substream: u32,
        exclude: &[PeerId],
    ) -> Result<(SubstreamParent, usize), ReparentRefused> {
        let now = self.now();
        let (grid, peer_id) = {
            let sessions = lock(&self.sessions);
            let e = sessions
                .get(session_id)
                .ok_or(ReparentRefused::UnknownSession)?;
            (e.grid.clone(), e.peer_id)
        };
        let mut st = lock(&grid.state);
        let substreams = st.assigner.config().substreams;
        let invalid = ReparentRefused::InvalidSubstream {
            substream,
            substreams,
        };
        let s = u16::try_from(substream).map_err(|_| invalid.clone())?;
        match st.assigner.reparent(peer_id, s, exclude, now) {
            Ok(out) => {
                if let (Parent::Peer(p), Some(e)) =
                    (out.parent, lock(&self.sessions).get_mut(session_id))
                {
                    e.remember([(p, true)], now);
                }
                Ok((st.parent_ref(usize::from(s), out.parent), out.moved.len()))
            }
            Err(GridError::InvalidSubstream(_)) => Err(invalid),
            Err(_) => Err(ReparentRefused::UnknownSession),
        }
    }

    /// Removes a session from its grid (clean leave) and re-parents its children. Returns
    /// `(peer id, peers moved)` when the session was in a grid.
    pub fn leave(&self, session_id: &str) -> Option<(PeerId, usize)> {
        let e = lock(&self.sessions).remove(session_id)?;
        let now = self.now();
        let moved = lock(&e.grid.state).remove_peer(e.peer_id, now);
        Some((e.peer_id, moved))
    }

    /// Removes every session not heard from for longer than `timeout` from its grid
    /// (re-parenting its children) and returns them, for the caller to end in the
    /// database.
    pub fn expire(&self, timeout: Duration) -> Vec<Expired> {
        let now = self.now();
        let stale: Vec<(String, SessionEntry)> = {
            let mut sessions = lock(&self.sessions);
            let ids: Vec<String> = sessions
                .iter()
                .filter(|(_, e)| now.saturating_sub(e.last_seen) > timeout)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| sessions.remove(&id).map(|e| (id, e)))
                .collect()
        };
        stale
            .into_iter()
            .map(|(session_id, e)| {
                let moved = lock(&e.grid.state).remove_peer(e.peer_id, now);
                Expired {
                    session_id,
                    broadcast_id: e.broadcast_id,
                    peer_id: e.peer_id,
                    moved,
                }
            })
            .collect()
    }

    /// Drops a broadcast's grid, its sessions and its measured rate (StopBroadcast).
    /// Returns how many peers it held.
    pub fn drop_broadcast(&self, broadcast_id: &str) -> usize {
        lock(&self.rates).remove(broadcast_id);
        let Some(grid) = lock(&self.broadcasts).remove(broadcast_id) else {
            return 0;
        };
        let session_ids: Vec<String> = {
            let mut st = lock(&grid.state);
            st.closed = true;
            st.peers.values().map(|p| p.session_id.clone()).collect()
        };
        let mut sessions = lock(&self.sessions);
        for id in &session_ids {
            sessions.remove(id);
        }
        session_ids.len()
    }

    /// The grid figures of a broadcast, `None` when it has no grid (no viewer joined
    /// since it went live on this process).
    pub fn figures(&self, broadcast_id: &str) -> Option<GridFigures> {
        let grid = lock(&self.broadcasts).get(broadcast_id).cloned()?;
        let stats = lock(&grid.state).assigner.stats();
        let server = grid.from_server.load(Ordering::Relaxed);
        let peers = grid.from_peers.load(Ordering::Relaxed);
        let total = server.saturating_add(peers);
        #[allow(clippy::cast_precision_loss)] // a ratio; 2^53 bytes is plenty
        let peer_share = if total == 0 {
            0.0
        } else {
            peers as f64 / total as f64
        };
        Some(GridFigures { stats, peer_share })
    }
}

/// A per-broadcast RNG seed (FNV-1a of the id), so neighbour sampling differs between
/// broadcasts but is reproducible.
fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The network prefix used for the "nearby" preference: the /24 of an IPv4 address
/// (`ip >> 8`, below 2^24), or a 31-bit hash of the /48 of an IPv6 address with the top
/// bit set (so it never equals an IPv4 prefix). IPv4-mapped IPv6 counts as IPv4.
pub fn ip_prefix(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) >> 8,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u32::from(v4) >> 8,
            None => {
                let h = v6.octets()[..6].iter().fold(0x811c_9dc5_u32, |h, &b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                h | 0x8000_0000
            }
        },
    }
}

/// The address prefix of a joining viewer: from the IP of its `peer_addr` when that is a
/// literal, non-unspecified IP, else from the IP it called from, else 0.
pub fn addr_prefix(peer_addr: &str, remote: Option<SocketAddr>) -> u32 {
    peer_addr
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .or(remote.map(|r| r.ip()))
        .map_or(0, ip_prefix)
}

/// The address other peers should dial: `peer_addr` as given, except that an unspecified
/// IP (a viewer reporting its `0.0.0.0`/`[::]` bind address) is replaced by the IP the
/// viewer called from.
pub fn dialable_addr(peer_addr: &str, remote: Option<SocketAddr>) -> String {
    match (peer_addr.parse::<SocketAddr>(), remote) {
        (Ok(a), Some(r)) if a.ip().is_unspecified() => {
            SocketAddr::new(r.ip(), a.port()).to_string()
        }
        _ => peer_addr.to_string(),
    }
}

// Metrics (issue 5): read at scrape time.
impl LiveGrids {
    /// `(broadcast id, peers in its grid)` of every grid of this process.
    pub fn peer_counts(&self) -> Vec<(String, usize)> {
        let grids: Vec<(String, Arc<BroadcastGrid>)> = lock(&self.broadcasts)
            .iter()
            .map(|(id, g)| (id.clone(), g.clone()))
            .collect();
        grids
            .into_iter()
            .map(|(id, g)| {
                let n = lock(&g.state).peers.len();
                (id, n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn input<'a>(session: &'a str, addr: &str, upload: u32) -> JoinInput<'a> {
        JoinInput {
            broadcast_id: "b",
            substreams: 4,
            server_slots: u64::MAX,
            session_id: session,
            peer_addr: addr.to_string(),
            upload_kbps: upload,
            remote_ip: addr
                .parse::<SocketAddr>()
                .ok()
                .map(|a| a.ip())
                .or(Some(IpAddr::from([10, 9, 9, 9]))),
            addr_prefix: 0,
            subject: None,
            credential_expires_at: None,
        }
    }

    fn from(mut i: JoinInput<'_>, ip: [u8; 4]) -> JoinInput<'_> {
        i.remote_ip = Some(IpAddr::from(ip));
        i
    }

    const BAD: PeerReportKind = PeerReportKind::BadChunk;
    const SILENT: PeerReportKind = PeerReportKind::NonDelivery;

    #[test]
    fn prefixes() {
        let a = ip_prefix("10.1.2.3".parse().unwrap());
        assert_eq!(a, ip_prefix("10.1.2.200".parse().unwrap()));
        assert_ne!(a, ip_prefix("10.1.3.3".parse().unwrap()));
        assert_eq!(a, ip_prefix("::ffff:10.1.2.9".parse().unwrap()));
        let v6 = ip_prefix("2001:db8:1::1".parse().unwrap());
        assert_eq!(v6, ip_prefix("2001:db8:1:ffff::2".parse().unwrap()));
        assert_ne!(v6, ip_prefix("2001:db8:2::1".parse().unwrap()));
        assert!(v6 >= 0x8000_0000 && a < (1 << 24));
        let remote: SocketAddr = "192.168.7.9:5555".parse().unwrap();
        assert_eq!(addr_prefix("", Some(remote)), ip_prefix(remote.ip()));
        assert_eq!(
            addr_prefix("0.0.0.0:7000", Some(remote)),
            ip_prefix(remote.ip())
        );
        assert_eq!(addr_prefix("peer.example:7000", None), 0);
        assert_eq!(addr_prefix("10.1.2.3:7000", Some(remote)), a);
        assert_eq!(
            dialable_addr("0.0.0.0:7000", Some(remote)),
            "192.168.7.9:7000"
        );
        assert_eq!(
            dialable_addr("10.0.0.1:7000", Some(remote)),
            "10.0.0.1:7000"
        );
        assert_eq!(dialable_addr("host:7000", Some(remote)), "host:7000");
    }

    #[test]
    fn join_heartbeat_leave_expire_and_drop() {
        let g = LiveGrids::new();
        g.set_rate("b", 0);
        assert_eq!(g.rate("b"), None);
        let a = g.join(input("sa", "10.0.0.1:1", 4000)).unwrap();
        assert_eq!(a.stream_kbps, DEFAULT_STREAM_KBPS);
        assert_eq!(a.child_slots, 16);
        assert!(a.parents.iter().all(|p| p.peer.is_none()));
        assert_eq!(
            a.parents.iter().map(|p| p.substream).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        let b = g.join(input("sb", "", 0)).unwrap();
        assert_ne!(a.peer_id, b.peer_id);
        assert!(b.parents.iter().all(|p| {
            p.peer
                .as_ref()
                .is_some_and(|r| r.peer_id == a.peer_id && r.addr == "10.0.0.1:1")
        }));
        assert_eq!(b.neighbours.len(), 1);
        // A never gets B (no address) as a neighbour.
        let hb = g.heartbeat("sa", [100, 0, 50]).unwrap();
        assert!(hb.neighbours.is_empty());
        g.heartbeat("sb", [0, 300, 0]).unwrap();
        let f = g.figures("b").unwrap();
        assert_eq!(f.stats.peers, 2);
        assert!((f.peer_share - 0.75).abs() < 1e-9);
        // Counters are cumulative: the same values add nothing.
        g.heartbeat("sb", [0, 300, 0]).unwrap();
        assert!((g.figures("b").unwrap().peer_share - 0.75).abs() < 1e-9);

        let err = g.reparent("sb", 4, &[]).unwrap_err();
        assert!(matches!(err, ReparentRefused::InvalidSubstream { .. }));
        assert_eq!(
            g.reparent("nope", 0, &[]).unwrap_err(),
            ReparentRefused::UnknownSession
        );
        let (p, _) = g.reparent("sb", 1, &[a.peer_id]).unwrap();
        assert_eq!(p.substream, 1);
        assert!(p.peer.is_none(), "A excluded: the server");

        assert_eq!(g.leave("sa").map(|(id, _)| id), Some(a.peer_id));
        assert!(g.leave("sa").is_none());
        let hb = g.heartbeat("sb", [0, 300, 0]).unwrap();
        assert!(hb.parents.iter().all(|p| p.peer.is_none()));
        assert!(hb.neighbours.is_empty());

        assert!(g.expire(Duration::from_secs(3600)).is_empty());
        let gone = g.expire(Duration::ZERO);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].session_id, "sb");
        assert!(g.heartbeat("sb", [0; 3]).is_none());
        assert_eq!(g.figures("b").unwrap().stats.peers, 0);

        g.join(input("sc", "", 0)).unwrap();
        assert_eq!(g.drop_broadcast("b"), 1);
        assert!(g.figures("b").is_none());
        assert!(g.heartbeat("sc", [0; 3]).is_none());
    }

    #[test]
    fn revoke_by_subject_or_session_and_report_bad_peer() {
        let g = LiveGrids::new();
        let mut a = input("sa", "10.0.0.1:1", 100_000);
        a.subject = Some("alice".into());
        let a = g.join(a).unwrap();
        let mut b_in = input("sb", "", 0);
        b_in.subject = Some("bob".into());
        let b = g.join(b_in).unwrap();
        let c = g.join(input("sc", "", 0)).unwrap();
        assert!(g.set_token(
            "sb",
            TokenState {
                scopes: Scopes::PLAY,
                expires_at_ms: 5
            }
        ));
        let hb = g.heartbeat("sb", [0; 3]).unwrap();
        assert_eq!(hb.peer_id, b.peer_id);
        assert_eq!(hb.broadcast_id, "b");
        assert_eq!(hb.token.map(|t| t.expires_at_ms), Some(5));
        assert_eq!(g.session_peer("sc"), Some((c.peer_id, "b".to_string())));

        // Reports: not oneself, unknown sessions, peers not assigned refused.
        assert_eq!(
            g.report_bad_peer("sb", b.peer_id, BAD),
            Err(ReportRefused::SelfReport)
        );
        assert_eq!(
            g.report_bad_peer("nope", a.peer_id, BAD),
            Err(ReportRefused::UnknownSession)
        );
        assert!(matches!(
            g.report_bad_peer("sa", c.peer_id, BAD),
            Err(ReportRefused::NotAssigned { .. })
        ));
        // Two distinct addresses are not enough (the test input's default address is
        // shared by sb and sc)...
        let r = g.report_bad_peer("sb", a.peer_id, BAD).unwrap();
        assert!(r.known_peer && !r.excluded);
        assert_eq!((r.reporter, r.reporters, r.moved), (b.peer_id, 1, 0));
        let r = g.report_bad_peer("sc", a.peer_id, BAD).unwrap();
        assert_eq!((r.reporters, r.excluded), (1, false), "same address");
        let d = g.join(from(input("sd", "", 0), [10, 0, 0, 4])).unwrap();
        assert!(!g.report_bad_peer("sd", a.peer_id, BAD).unwrap().excluded);
        assert_eq!(g.is_demoted("b", a.peer_id), Some(false));
        // ...a third distinct address demotes A: its children are re-parented.
        let e = g.join(from(input("se", "", 0), [10, 0, 0, 5])).unwrap();
        let r = g.report_bad_peer("se", a.peer_id, BAD).unwrap();
        assert_eq!((r.reporters, r.excluded), (3, true));
        assert!(r.moved > 0);
        assert_eq!(g.bad_peer_reports(), 4);
        assert_eq!(g.peers_demoted(), 1);
        assert_eq!(g.is_demoted("b", a.peer_id), Some(true));
        for s in ["sb", "sc", "sd", "se"] {
            let hb = g.heartbeat(s, [0; 3]).unwrap();
            assert!(hb.parents.iter().all(|p| p.peer.is_none()), "{s}");
        }
        let f = g.join(input("sf", "", 0)).unwrap();
        assert!(f.parents.iter().all(|p| p.peer.is_none()));
        // More reports change nothing.
        assert!(!g.report_bad_peer("sd", a.peer_id, BAD).unwrap().excluded);
        // A peer id that never existed is not the session's to report.
        assert!(matches!(
            g.report_bad_peer("sb", 9_999, BAD),
            Err(ReportRefused::NotAssigned { .. })
        ));
        let _ = (d, e);

        // Revocation by subject, in the right broadcast only.
        assert!(g.revoke("other", RevokeTarget::Subject("alice")).is_empty());
        let gone = g.revoke("b", RevokeTarget::Subject("alice"));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].peer_id, a.peer_id);
        assert!(g.heartbeat("sa", [0; 3]).is_none());
        assert!(!g.set_token(
            "sa",
            TokenState {
                scopes: Scopes::PLAY,
                expires_at_ms: 9
            }
        ));
        let gone = g.revoke("b", RevokeTarget::Session("sc"));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].session_id, "sc");
        assert!(g.revoke("b", RevokeTarget::Session("sc")).is_empty());
        assert_eq!(g.figures("b").unwrap().stats.peers, 4);
    }

    #[test]
    fn upload_budget_changes_move_children_through_heartbeats() {
        let g = LiveGrids::new();
        let a = g.join(input("sa", "10.0.0.1:1", 4000)).unwrap(); // 16 slots
        let b = g.join(input("sb", "", 0)).unwrap();
        let on_a = |hb: &HeartbeatView| {
            hb.parents
                .iter()
                .filter(|p| p.peer.as_ref().is_some_and(|r| r.peer_id == a.peer_id))
                .count()
        };
        assert_eq!(on_a(&g.heartbeat("sb", [0; 3]).unwrap()), 4);
        // A's SDK measured one copy's worth of uplink: 4 slots; still enough for B.
        assert_eq!(g.set_upload("sa", 1000), Some(0));
        assert_eq!(g.figures("b").unwrap().stats.peer_supply, 4);
        // Half a copy: 2 slots, B's other two substreams move (to the data plane).
        assert_eq!(g.set_upload("sa", 500), Some(2));
        assert_eq!(on_a(&g.heartbeat("sb", [0; 3]).unwrap()), 2);
        // 0 = unchanged; a peer without an address never gets slots; unknown sessions.
        assert_eq!(g.set_upload("sa", 0), Some(0));
        assert_eq!(g.figures("b").unwrap().stats.peer_supply, 2);
        assert_eq!(g.set_upload("sb", 9000), Some(0));
        assert_eq!(g.figures("b").unwrap().stats.peer_supply, 2);
        assert_eq!(g.set_upload("nope", 1000), None);
        let _ = b;
    }

    #[test]
    fn non_delivery_demotes_only_on_three_distinct_children() {
        let g = LiveGrids::new();
        let p = g.join(input("sp", "10.0.0.1:1", 4000)).unwrap();
        let n = g.join(input("sn", "10.0.0.2:1", 0)).unwrap();
        let kids: Vec<JoinView> = (1..=3u8)
            .map(|i| {
                let s = ["k1", "k2", "k3"][usize::from(i - 1)];
                g.join(from(input(s, "", 0), [10, 1, 0, i])).unwrap()
            })
            .collect();
        assert!(kids.iter().all(|k| {
            k.parents
                .iter()
                .all(|x| x.peer.as_ref().is_some_and(|r| r.peer_id == p.peer_id))
        }));
        // A neighbour is not a parent: NON_DELIVERY about it is refused, BAD_CHUNK not.
        let hb = g.heartbeat("k1", [0; 3]).unwrap();
        if let Some(nb) = hb.neighbours.iter().find(|r| r.peer_id == n.peer_id) {
            assert!(matches!(
                g.report_bad_peer("k1", nb.peer_id, SILENT),
                Err(ReportRefused::NotAssigned { .. })
            ));
        }
        let r = g.report_bad_peer("k1", p.peer_id, SILENT).unwrap();
        assert!(!r.excluded && r.reporters == 1);
        // The same child again, and a BAD_CHUNK from another, do not add up.
        assert_eq!(
            g.report_bad_peer("k1", p.peer_id, SILENT)
                .unwrap()
                .reporters,
            1
        );
        assert_eq!(
            g.report_bad_peer("k2", p.peer_id, BAD).unwrap().reporters,
            1
        );
        assert_eq!(g.is_demoted("b", p.peer_id), Some(false));
        assert!(!g.report_bad_peer("k2", p.peer_id, SILENT).unwrap().excluded);
        let r = g.report_bad_peer("k3", p.peer_id, SILENT).unwrap();
        assert!(r.excluded && r.moved > 0);
        for k in ["k1", "k2", "k3"] {
            let hb = g.heartbeat(k, [0; 3]).unwrap();
            assert!(
                !hb.parents
                    .iter()
                    .any(|x| x.peer.as_ref().is_some_and(|r| r.peer_id == p.peer_id)),
                "{k}"
            );
        }
    }

    #[test]
    fn a_huge_claim_gets_the_capped_slots_and_ids_are_random() {
        let g = LiveGrids::new();
        // 1000 kbit/s default rate, 4 substreams, ceiling 4 copies: 16 slots.
        let s = g.join(input("sy", "10.0.0.1:1", 1_000_000)).unwrap();
        assert_eq!(s.granted_kbps, 4000);
        assert_eq!(g.figures("b").unwrap().stats.peer_supply, 16);
        assert_eq!(
            s.child_slots, 256,
            "the claim's slots, for the SDK's admission"
        );
        let h = g.join(input("sh", "10.0.0.2:1", 2000)).unwrap();
        assert_eq!(h.granted_kbps, 2000);
        assert_eq!(g.figures("b").unwrap().stats.peer_supply, 24);
        for id in [s.peer_id, h.peer_id] {
            assert!(id > 0 && id <= i64::MAX as u64);
        }
        assert_ne!(s.peer_id + 1, h.peer_id);
        // Heartbeats claiming uploads confirm nothing while it carries no child.
        g.heartbeat("sy", [0, 0, 0]);
        assert_eq!(g.uploads_confirmed(), 0);
    }

    #[test]
    fn measured_rate_is_used_at_grid_creation() {
        let g = LiveGrids::new();
        g.set_rate("b", 2000);
        let a = g.join(input("sa", "10.0.0.1:1", 1000)).unwrap();
        assert_eq!(a.stream_kbps, 2000);
        assert_eq!(a.child_slots, 2);
    }
}
