//! The live peer-grid state of this control-plane process: one [`GridAssigner`](starling_grid::assign::GridAssigner) per LIVE
//! broadcast that has viewers, the session ↔ peer id ↔ peer address maps, heartbeat byte
//! counters and the stream rate each ingesting node last reported.
//!
//! Everything here is in memory and per process. The database stays the record of the
//! audience (sessions, joins, leaves); the grid is live state rebuilt from joins. Several
//! control-plane replicas would each hold a different grid for the same broadcast, so a
//! multi-replica deployment must route all viewer calls of one broadcast to one replica
//! (shard by broadcast id) — see ARCHITECTURE.md.
//!
//! Submodules, one concern each: `views` (what callers pass in and get back), `state`
//! (per-broadcast grid and per-session entries), `membership` (join, heartbeat, re-search,
//! leave, expiry), `moderation` (revocation, bad-peer reports), `streams` (session
//! streams attached to peers: wake handles, attach/detach), `addr` (address prefixes,
//! dialable addresses). This module holds [`LiveGrids`] itself, its clock, the measured
//! rates, dropping a broadcast and the figures read by the services and metrics.
//!
//! Locking: `broadcasts`, `sessions` and `rates` are `parking_lot` mutexes held for a map lookup
//! or update only; each broadcast's [`GridState`] has its own mutex, held for one
//! assigner operation. The only nesting is grid → `sessions` (join, so that a concurrent
//! [`LiveGrids::drop_broadcast`] cannot miss the new session) and `sessions` → `rates`
//! (a heartbeat's counter bound; `rates` is a leaf). No lock is held across an `.await`
//! (this module has no async code).
//!
//! Push on change: every grid operation that re-parents peers (join, leave, re-search,
//! upload change, demotion, expiry, revocation, stopping) wakes the session stream of
//! each moved or removed peer ([`StreamWake`], stored in its peer slot) while it holds
//! the grid lock; the stream computes its view later, outside the lock.
//!
//! Heartbeat byte counters are clamped like reports' ([`crate::reports::clamp`]): each
//! delta is bounded by the stream rate (or upload ceiling) × margin × the time since
//! the session's previous heartbeat (its join), plus a burst, so a forged counter moves
//! `GetBroadcast.peer_share` no more than a viewer physically can.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::reports::clamp::CounterLimits;
use crate::trust::TrustConfig;

mod addr;
mod membership;
mod moderation;
mod state;
mod streams;
#[cfg(test)]
mod tests;
mod views;

pub use addr::{addr_prefix, dialable_addr, ip_prefix};
pub use state::BroadcastGrid;
use state::{GridState, PeerSlot, SessionEntry, assigned, random_peer_id, seed_of};
use streams::StreamRegistry;
pub use streams::{Attached, MOVED, RIGHTS, StreamWake};
pub use views::*;

/// Stream rate assumed for slot accounting when the ingesting node has not reported a
/// measured rate yet at the first join of a broadcast. The grid keeps the rate it was
/// created with for its whole life (a [`GridAssigner`](starling_grid::assign::GridAssigner) cannot be re-rated).
pub const DEFAULT_STREAM_KBPS: u32 = 1000;

/// Longest `exclude_peer_ids` list a re-search may carry.
pub const MAX_EXCLUDE: usize = 64;
/// A measured stream rate this far (percent) from the one a grid counts slots with
/// re-rates the grid ([`LiveGrids::set_rate`]); smaller drifts are left alone.
pub const RERATE_BEYOND_PERCENT: u32 = 20;
/// A relay's address is probed again on a child's complaint at most this often
/// ([`LiveGrids::reprobe_target`]).
pub const REPROBE_EVERY: Duration = Duration::from_secs(30);

/// Most distinct peers one session may report bad (`ReportPeer`): an honest viewer meets
/// few polluters, and a malicious one cannot exclude the whole grid from relaying.
pub const MAX_REPORTS_PER_SESSION: usize = 16;

/// How long a peer handed to a session (as a parent or neighbour, at join, heartbeat or
/// re-search) stays one the session may report.
pub const REPORTABLE_FOR: Duration = Duration::from_secs(60);

/// Most peers remembered per session as reportable.
const MAX_REPORTABLE: usize = 64;

/// All live grids of this process.
#[derive(Debug)]
pub struct LiveGrids {
    epoch: Instant,
    trust: TrustConfig,
    broadcasts: Mutex<HashMap<String, Arc<BroadcastGrid>>>,
    /// Sessions in a grid, by id (the key is shared with the session's peer slot).
    /// Boxed: the table's slots stay small (a hash table is up to half empty).
    sessions: Mutex<HashMap<Arc<str>, Box<SessionEntry>>>,
    rates: Mutex<HashMap<String, u32>>,
    bad_peer_reports: AtomicU64,
    limits: CounterLimits,
    peers_demoted: AtomicU64,
    uploads_confirmed: AtomicU64,
    /// Generation of the last session stream attached ([`LiveGrids::attach`]).
    next_stream: AtomicU64,
    /// Every open session stream, for rights changes.
    streams: StreamRegistry,
    /// Server-fed roots per substream of every new grid.
    roots: GridRoots,
}

/// How many server-fed roots each substream's tree of a grid gets
/// ([`starling_grid::assign::GridConfig::peers_per_root`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridRoots {
    /// One root per this many viewers (0: one root per substream). Default 200.
    pub peers_per_root: u32,
    /// Most roots per substream. Default 64.
    pub max_roots: u16,
}

impl Default for GridRoots {
    fn default() -> Self {
        GridRoots {
            peers_per_root: 200,
            max_roots: 64,
        }
    }
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
            next_stream: AtomicU64::new(0),
            streams: StreamRegistry::default(),
            roots: GridRoots::default(),
        }
    }

    /// Grids created from now on get `roots` server-fed roots per substream.
    #[must_use]
    pub fn with_roots(mut self, roots: GridRoots) -> Self {
        self.roots = roots;
        self
    }

    /// Monotonic time of this process, the grids' clock.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Records the stream rate the ingesting node measured (ignored when 0). A grid
    /// whose slots were counted with a rate more than [`RERATE_BEYOND_PERCENT`] off
    /// (the default, before the first measurement) is re-rated: every peer's child
    /// slots are recomputed, the peers moved are woken, and so is every session
    /// stream of the broadcast, which then pushes the new `child_slots`.
    pub fn set_rate(&self, broadcast_id: &str, kbps: u32) {
        if kbps == 0 {
            return;
        }
        let grid = self.broadcasts.lock().get(broadcast_id).cloned();
        if let Some(grid) = grid {
            let now = self.now();
            let mut st = grid.state.lock();
            let current = st.assigner.config().stream_kbps;
            if u64::from(current.abs_diff(kbps)) * 100
                > u64::from(current) * u64::from(RERATE_BEYOND_PERCENT)
            {
                let moved = st.assigner.set_stream_kbps(kbps, now);
                let moved = st.wake_moved(&moved);
                for w in st.peers.values().filter_map(|p| p.wake.as_ref()) {
                    w.wake();
                }
                tracing::info!(
                    broadcast_id,
                    from_kbps = current,
                    to_kbps = kbps,
                    moved,
                    "peer grid re-rated with the measured stream rate"
                );
            }
        }
        self.rates.lock().insert(broadcast_id.to_string(), kbps);
    }

    /// The latest measured stream rate of a broadcast, if any.
    pub fn rate(&self, broadcast_id: &str) -> Option<u32> {
        self.rates.lock().get(broadcast_id).copied()
    }

    /// Removes the sessions `pick` selects (session id, entry) from the session map, in
    /// one critical section, and returns them (their grids are left to the caller).
    fn take_sessions(
        &self,
        pick: impl Fn(&str, &SessionEntry) -> bool,
    ) -> Vec<(Arc<str>, SessionEntry)> {
        let mut sessions = self.sessions.lock();
        let ids: Vec<Arc<str>> = sessions
            .iter()
            .filter(|(id, e)| pick(id, e))
            .map(|(id, _)| id.clone())
            .collect();
        ids.into_iter()
            .filter_map(|id| sessions.remove(&id).map(|e| (id, *e)))
            .collect()
    }

    /// Drops a broadcast's grid, its sessions and its measured rate (StopBroadcast).
    /// Returns how many peers it held.
    pub fn drop_broadcast(&self, broadcast_id: &str) -> usize {
        self.rates.lock().remove(broadcast_id);
        let Some(grid) = self.broadcasts.lock().remove(broadcast_id) else {
            return 0;
        };
        let session_ids: Vec<Arc<str>> = {
            let mut st = grid.state.lock();
            st.closed = true;
            // Their streams learn that the sessions are over.
            for w in st.peers.values().filter_map(|p| p.wake.as_ref()) {
                w.wake();
            }
            st.peers.values().map(|p| p.session_id.clone()).collect()
        };
        let mut sessions = self.sessions.lock();
        for id in &session_ids {
            sessions.remove(id);
        }
        session_ids.len()
    }

    /// The grid figures of a broadcast, `None` when it has no grid (no viewer joined
    /// since it went live on this process).
    pub fn figures(&self, broadcast_id: &str) -> Option<GridFigures> {
        let grid = self.broadcasts.lock().get(broadcast_id).cloned()?;
        let stats = grid.state.lock().assigner.stats();
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

// Metrics (issue 5): read at scrape time.
impl LiveGrids {
    /// `(broadcast id, peers in its grid)` of every grid of this process.
    pub fn peer_counts(&self) -> Vec<(String, usize)> {
        let grids: Vec<(String, Arc<BroadcastGrid>)> = self
            .broadcasts
            .lock()
            .iter()
            .map(|(id, g)| (id.clone(), g.clone()))
            .collect();
        grids
            .into_iter()
            .map(|(id, g)| {
                let n = g.state.lock().peers.len();
                (id, n)
            })
            .collect()
    }
}
