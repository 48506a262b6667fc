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
//! [`LiveGrids::drop_broadcast`] cannot miss the new session). No lock is held across an
//! `.await` (this module has no async code).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use starling_proto::token::Scopes;
use starling_proto::v1::{PeerRef, SubstreamParent};

use crate::grid::{GridAssigner, GridConfig, GridError, GridStats, Parent, PeerId, PeerInfo};

/// Stream rate assumed for slot accounting when the ingesting node has not reported a
/// measured rate yet at the first join of a broadcast. The grid keeps the rate it was
/// created with for its whole life (a [`GridAssigner`] cannot be re-rated).
pub const DEFAULT_STREAM_KBPS: u32 = 1000;

/// Longest `exclude_peer_ids` list a re-search may carry.
pub const MAX_EXCLUDE: usize = 64;

/// Most distinct peers one session may report bad (`ReportPeer`): an honest viewer meets
/// few polluters, and a malicious one cannot exclude the whole grid from relaying.
pub const MAX_REPORTS_PER_SESSION: usize = 16;

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
    /// Child slots this peer may serve.
    pub child_slots: u32,
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

/// The outcome of a bad-peer report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPeerReport {
    /// The reporter's broadcast.
    pub broadcast_id: String,
    /// The reporter's peer id.
    pub reporter: PeerId,
    /// Whether the reported peer is (still) in the reporter's grid.
    pub known_peer: bool,
    /// Peers re-parented away from it (0 when it was already marked bad).
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
    /// Upload budget (already 0 when `peer_addr` is empty).
    pub upload_kbps: u32,
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
        self.assigner.leave(id, now).len()
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
    /// The credential's subject.
    subject: Option<String>,
    /// The credential's expiry, unix seconds.
    credential_expires_at: Option<u64>,
    /// The chunk token last issued.
    token: Option<TokenState>,
    /// Peers this session reported bad.
    reported: Vec<PeerId>,
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
    next_peer: AtomicU64,
    broadcasts: Mutex<HashMap<String, Arc<BroadcastGrid>>>,
    sessions: Mutex<HashMap<String, SessionEntry>>,
    rates: Mutex<HashMap<String, u32>>,
    bad_peer_reports: AtomicU64,
}

impl Default for LiveGrids {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveGrids {
    /// No grids yet.
    pub fn new() -> Self {
        LiveGrids {
            epoch: Instant::now(),
            // 0 is never a peer id (proto default = "absent").
            next_peer: AtomicU64::new(1),
            broadcasts: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            bad_peer_reports: AtomicU64::new(0),
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
        let peer_id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&grid.state);
        if st.closed {
            return Err(JoinRefused::Stopped);
        }
        let plan = st.assigner.join(
            peer_id,
            PeerInfo {
                upload_kbps: input.upload_kbps,
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
            child_slots: st.assigner.slots_for(input.upload_kbps),
            moved: plan.moved.len(),
        };
        // Still under the grid lock: `drop_broadcast` sees either no peer or both maps.
        lock(&self.sessions).insert(
            input.session_id.to_string(),
            SessionEntry {
                broadcast_id: input.broadcast_id.to_string(),
                grid: grid.clone(),
                peer_id,
                last_seen: now,
                counters: [0; 3],
                subject: input.subject,
                credential_expires_at: input.credential_expires_at,
                token: None,
                reported: Vec::new(),
            },
        );
        Ok(view)
    }

    /// Records a heartbeat (liveness and cumulative byte counters) and returns the
    /// viewer's current parents and neighbours; `None` when the session is not in a grid
    /// of this process.
    pub fn heartbeat(&self, session_id: &str, counters: [u64; 3]) -> Option<HeartbeatView> {
        let now = self.now();
        let (grid, peer_id, delta, broadcast_id, token) = {
            let mut sessions = lock(&self.sessions);
            let e = sessions.get_mut(session_id)?;
            e.last_seen = now;
            let delta: [u64; 3] =
                std::array::from_fn(|i| counters[i].saturating_sub(e.counters[i]));
            e.counters = counters;
            (
                e.grid.clone(),
                e.peer_id,
                delta,
                e.broadcast_id.clone(),
                e.token,
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
        Some(HeartbeatView {
            parents: st.parents_of(peer_id),
            neighbours: neighbours.iter().map(|&n| st.peer_ref(n)).collect(),
            peer_id,
            broadcast_id,
            token,
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
        let (grid, peer_id) = {
            let sessions = lock(&self.sessions);
            let e = sessions.get(session_id)?;
            (e.grid.clone(), e.peer_id)
        };
        let mut st = lock(&grid.state);
        if st.peers.get(&peer_id).is_none_or(|p| p.addr.is_empty()) {
            return Some(0);
        }
        let moved = st.assigner.set_upload(peer_id, upload_kbps, now).len();
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

    /// A viewer reports that `peer_id` sent it a chunk failing verification: the peer is
    /// never assigned as a parent again in that broadcast and its children are
    /// re-parented (they learn it at their next heartbeat).
    ///
    /// # Errors
    /// [`ReportRefused`] for an unknown session, a self-report, or too many reports.
    pub fn report_bad_peer(
        &self,
        session_id: &str,
        peer_id: PeerId,
    ) -> Result<BadPeerReport, ReportRefused> {
        let now = self.now();
        let (grid, reporter, broadcast_id) = {
            let mut sessions = lock(&self.sessions);
            let e = sessions
                .get_mut(session_id)
                .ok_or(ReportRefused::UnknownSession)?;
            if e.peer_id == peer_id {
                return Err(ReportRefused::SelfReport);
            }
            if !e.reported.contains(&peer_id) {
                if e.reported.len() >= MAX_REPORTS_PER_SESSION {
                    return Err(ReportRefused::TooManyReports);
                }
                e.reported.push(peer_id);
            }
            (e.grid.clone(), e.peer_id, e.broadcast_id.clone())
        };
        self.bad_peer_reports.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&grid.state);
        let known_peer = st.peers.contains_key(&peer_id);
        let moved = if known_peer {
            st.assigner.report_bad_peer(peer_id, now).len()
        } else {
            0
        };
        Ok(BadPeerReport {
            broadcast_id,
            reporter,
            known_peer,
            moved,
        })
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
            Ok(out) => Ok((st.parent_ref(usize::from(s), out.parent), out.moved.len())),
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
            addr_prefix: 0,
            subject: None,
            credential_expires_at: None,
        }
    }

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

        // Reports: not oneself, unknown sessions refused; a report re-parents children.
        assert_eq!(
            g.report_bad_peer("sb", b.peer_id),
            Err(ReportRefused::SelfReport)
        );
        assert_eq!(
            g.report_bad_peer("nope", a.peer_id),
            Err(ReportRefused::UnknownSession)
        );
        let r = g.report_bad_peer("sb", a.peer_id).unwrap();
        assert!(r.known_peer);
        assert_eq!(r.reporter, b.peer_id);
        assert!(r.moved > 0);
        assert_eq!(g.bad_peer_reports(), 1);
        for s in ["sb", "sc"] {
            let hb = g.heartbeat(s, [0; 3]).unwrap();
            assert!(hb.parents.iter().all(|p| p.peer.is_none()), "{s}");
        }
        let d = g.join(input("sd", "", 0)).unwrap();
        assert!(d.parents.iter().all(|p| p.peer.is_none()));
        // A peer id that never existed: accepted, no effect.
        assert!(!g.report_bad_peer("sb", 9_999).unwrap().known_peer);
        // Bounded per session.
        for id in 10_000..10_000 + MAX_REPORTS_PER_SESSION as u64 {
            let _ = g.report_bad_peer("sc", id);
        }
        assert_eq!(
            g.report_bad_peer("sc", 1),
            Err(ReportRefused::TooManyReports)
        );

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
        assert_eq!(g.figures("b").unwrap().stats.peers, 2);
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
    fn measured_rate_is_used_at_grid_creation() {
        let g = LiveGrids::new();
        g.set_rate("b", 2000);
        let a = g.join(input("sa", "10.0.0.1:1", 1000)).unwrap();
        assert_eq!(a.stream_kbps, 2000);
        assert_eq!(a.child_slots, 2);
    }
}
