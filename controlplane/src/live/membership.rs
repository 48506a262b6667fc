//! Sessions entering, living in and leaving a broadcast's grid: join (creating the
//! grid), heartbeat (counters, upload budget), token state, re-search, leave and expiry.

use crate::tokens::peer_id_with_ticket_version;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use starling_proto::v1::{PeerRef, SubstreamParent};

use super::{
    BroadcastGrid, DEFAULT_STREAM_KBPS, Expired, GridState, HeartbeatView, JoinInput, JoinRefused,
    JoinView, LiveGrids, PeerSlot, REPROBE_EVERY, ReparentRefused, SessionEntry, TokenState,
    assigned, random_peer_id, seed_of,
};
use crate::reports::clamp::{self, Bounds};
use crate::trust::{ReportLedger, UploadTrust};
use starling_grid::assign::{GridAssigner, GridConfig, GridError, Parent, PeerId, PeerInfo};

impl LiveGrids {
    fn grid_for(&self, input: &JoinInput<'_>) -> Result<Arc<BroadcastGrid>, GridError> {
        let mut map = self.broadcasts.lock();
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
            peers_per_root: self.roots.peers_per_root,
            max_roots: self.roots.max_roots,
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
            id: Arc::from(input.broadcast_id),
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
        let mut st = grid.state.lock();
        if st.closed {
            return Err(JoinRefused::Stopped);
        }
        let fresh = || peer_id_with_ticket_version(random_peer_id(), input.mac_tickets);
        let mut peer_id = fresh();
        while peer_id == 0 || st.peers.contains_key(&peer_id) {
            peer_id = fresh();
        }
        let upload = if input.probe_first && input.upload_kbps > 0 {
            UploadTrust::on_probation(input.upload_kbps)
        } else {
            UploadTrust::new(
                input.upload_kbps,
                self.trust.upload_ceiling(st.assigner.config().stream_kbps),
            )
        };
        let plan = st.assigner.join(
            peer_id,
            PeerInfo {
                upload_kbps: upload.granted(),
                addr_prefix: input.addr_prefix,
                now,
                can_punch: input.reflexive.is_some(),
            },
        )?;
        let session_id: Arc<str> = Arc::from(input.session_id);
        st.peers.insert(
            peer_id,
            PeerSlot {
                session_id: session_id.clone(),
                addr: input.peer_addr.into_boxed_str(),
                punch: false,
                punch_failed: false,
                reflexive: input
                    .reflexive
                    .map(|a| a.to_string().into_boxed_str())
                    .unwrap_or_default(),
                neighbours: Box::new([]),
                wake: None,
            },
        );
        for &p in &plan.parents {
            st.wake_punch_parent(p);
        }
        let mut neighbours: Vec<PeerId> = plan
            .neighbours
            .iter()
            .copied()
            .filter(|&n| st.dialable(n))
            .collect();
        st.top_up_neighbours(peer_id, &mut neighbours);
        if let Some(slot) = st.peers.get_mut(&peer_id) {
            slot.neighbours = neighbours.as_slice().into();
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
            moved: st.wake_moved(&plan.moved),
        };
        let mut entry = SessionEntry {
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
            stream: 0,
            last_reprobe: None,
        };
        entry.remember(assigned(&view.parents, &view.neighbours), now);
        // Still under the grid lock: `drop_broadcast` sees either no peer or both maps.
        self.sessions.lock().insert(session_id, Box::new(entry));
        Ok(view)
    }

    /// Records a heartbeat (liveness and cumulative byte counters) and returns the
    /// viewer's current parents and neighbours; `None` when the session is not in a grid
    /// of this process. [`LiveGrids::record_counters`] then [`LiveGrids::view`].
    pub fn heartbeat(&self, session_id: &str, counters: [u64; 3]) -> Option<HeartbeatView> {
        let clamped = self.record_counters(session_id, counters)?;
        let mut view = self.view(session_id)?;
        view.clamped = clamped;
        Some(view)
    }

    /// Records a session's liveness and cumulative byte counters (clamped to what is
    /// physically possible; an upload the counters confirm raises its grant, see
    /// [`UploadTrust::on_heartbeat`]) without computing its view. Returns whether a
    /// counter was clamped; `None` when the session is not in a grid of this process.
    pub fn record_counters(&self, session_id: &str, counters: [u64; 3]) -> Option<bool> {
        let now = self.now();
        let (grid, peer_id, delta, clamped) = {
            let mut sessions = self.sessions.lock();
            let e = sessions.get_mut(session_id)?;
            let covered_ms =
                u64::try_from(now.saturating_sub(e.last_seen).as_millis()).unwrap_or(u64::MAX);
            e.last_seen = now;
            let bounds = Bounds::new(self.rate(e.broadcast_id()), self.limits);
            let credits = e.credits.get_or_insert_with(|| bounds.start());
            let raw: [u64; 3] =
                std::array::from_fn(|i| clamp::raw_delta(counters[i], e.counters[i]));
            let c = clamp::clamp([raw[0], raw[1], raw[2], 0], covered_ms, credits, &bounds);
            let delta = [c.from_server, c.from_peers, c.uploaded];
            e.counters = counters.map(clamp::baseline);
            (e.grid.clone(), e.peer_id, delta, c.clamped)
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
        let mut st = grid.state.lock();
        // Grid → sessions is the allowed nesting.
        let grant = self.sessions.lock().get_mut(session_id).and_then(|e| {
            e.upload
                .on_heartbeat(now, counters[2], self.trust.confirm_window, || {
                    st.carried_kbps(peer_id)
                })
        });
        if let Some(granted) = grant {
            let moved = st.assigner.set_upload(peer_id, granted, now);
            let moved = st.wake_moved(&moved);
            self.uploads_confirmed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                peer_id,
                granted_kbps = granted,
                moved,
                "peer's upload confirmed by its heartbeats: more child slots"
            );
        }
        Some(clamped)
    }

    /// The viewer's current parents and neighbours (neighbours that left are dropped and
    /// the list topped up); `None` when the session is not in a grid of this process.
    pub fn view(&self, session_id: &str) -> Option<HeartbeatView> {
        let (grid, peer_id, broadcast_id, token, claimed) = {
            let sessions = self.sessions.lock();
            let e = sessions.get(session_id)?;
            (
                e.grid.clone(),
                e.peer_id,
                e.broadcast_id().to_string(),
                e.token,
                e.upload.claimed(),
            )
        };
        let (parents, neighbours) = self.refresh(session_id, &grid, peer_id, true)?;
        let (punch, child_slots) = {
            let st = grid.state.lock();
            let relays = st
                .peers
                .get(&peer_id)
                .is_some_and(|p| !p.addr.is_empty() || !p.reflexive.is_empty());
            let slots = if relays {
                st.assigner.slots_for(claimed)
            } else {
                0
            };
            (st.punch_children(peer_id), slots)
        };
        Some(HeartbeatView {
            parents,
            neighbours,
            peer_id,
            broadcast_id,
            token,
            clamped: false,
            punch,
            child_slots,
        })
    }

    /// The viewer's current neighbours only (see [`LiveGrids::view`]).
    pub fn neighbours(&self, session_id: &str) -> Option<Vec<PeerRef>> {
        let (grid, peer_id) = {
            let sessions = self.sessions.lock();
            let e = sessions.get(session_id)?;
            (e.grid.clone(), e.peer_id)
        };
        self.refresh(session_id, &grid, peer_id, false)
            .map(|(_, n)| n)
    }

    /// Under the grid lock: the peer's neighbours refreshed (and stored), its parents
    /// when `parents`, both remembered as reportable by the session. `None` when the
    /// peer left meanwhile.
    fn refresh(
        &self,
        session_id: &str,
        grid: &BroadcastGrid,
        peer_id: PeerId,
        parents: bool,
    ) -> Option<(Vec<SubstreamParent>, Vec<PeerRef>)> {
        let now = self.now();
        let mut st = grid.state.lock();
        let mut neighbours = st.peers.get(&peer_id)?.neighbours.to_vec();
        let before = neighbours.len();
        neighbours.retain(|n| st.peers.contains_key(n));
        st.top_up_neighbours(peer_id, &mut neighbours);
        if neighbours.len() != before
            && let Some(slot) = st.peers.get_mut(&peer_id)
        {
            slot.neighbours = neighbours.as_slice().into();
        }
        let parents = if parents {
            st.parents_of(peer_id)
        } else {
            Vec::new()
        };
        let neighbours: Vec<PeerRef> = neighbours.iter().map(|&n| st.peer_ref(n)).collect();
        // Grid → sessions is the allowed nesting.
        if let Some(e) = self.sessions.lock().get_mut(session_id) {
            e.remember(assigned(&parents, &neighbours), now);
        }
        Some((parents, neighbours))
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
            let mut sessions = self.sessions.lock();
            let e = sessions.get_mut(session_id)?;
            // A report can only lower the claim (and the grant with it).
            match e.upload.lower(upload_kbps) {
                Some(g) => (e.grid.clone(), e.peer_id, g),
                None => return Some(0),
            }
        };
        let mut st = grid.state.lock();
        if st.peers.get(&peer_id).is_none_or(|p| p.addr.is_empty()) {
            return Some(0);
        }
        let moved = st.assigner.set_upload(peer_id, granted, now);
        let moved = st.wake_moved(&moved);
        if moved > 0 {
            tracing::info!(peer_id, upload_kbps, moved, "peer upload budget changed");
        }
        Some(moved)
    }

    /// The result of probing a session's `peer_addr` ([`crate::reachability`]).
    /// Reachable: its claimed upload is granted as at a join without probation, and the
    /// grid may give it children (server-fed peers move under it). Unreachable: when its
    /// router keeps ports (it joined with a [`JoinInput::reflexive`] address), it becomes
    /// a relay reachable by hole punching at that address, a parent only of peers that
    /// can punch ([`GridAssigner::set_punch_only`]); otherwise it stays a viewer that
    /// relays to nobody. Returns how many assignments moved; `None` when the session is
    /// gone or was not on probation.
    pub fn probed(&self, session_id: &str, reachable: bool) -> Option<usize> {
        let now = self.now();
        let (grid, peer_id) = {
            let sessions = self.sessions.lock();
            let e = sessions.get(session_id)?;
            if !e.upload.on_probation_now() {
                return None;
            }
            (e.grid.clone(), e.peer_id)
        };
        let mut st = grid.state.lock();
        let mut moved = Vec::new();
        if !reachable {
            let Some(slot) = st.peers.get_mut(&peer_id) else {
                return Some(0);
            };
            if slot.reflexive.is_empty() || slot.punch_failed {
                return Some(0);
            }
            slot.addr = slot.reflexive.clone();
            slot.punch = true;
            let attached = slot.wake.is_some();
            moved = st.assigner.set_punch_only(peer_id, true, now);
            if !attached {
                // Children only once it can be told to punch: when its session stream
                // is attached ([`LiveGrids::attach`] grants it then).
                return Some(st.wake_moved(&moved));
            }
        } else if let Some(slot) = st.peers.get_mut(&peer_id)
            && slot.punch
        {
            slot.punch = false;
            moved = st.assigner.set_punch_only(peer_id, false, now);
        }
        Some(self.grant_locked(&mut st, session_id, peer_id, moved))
    }

    /// Grants a session on probation its claimed upload (capped by the trust
    /// ceiling), under its grid's lock; `moved` are earlier reassignments to wake with
    /// those this makes. Returns how many assignments moved.
    pub(super) fn grant_locked(
        &self,
        st: &mut GridState,
        session_id: &str,
        peer_id: PeerId,
        mut moved: Vec<starling_grid::assign::Reassignment>,
    ) -> usize {
        let now = self.now();
        let ceiling = self.trust.upload_ceiling(st.assigner.config().stream_kbps);
        // Under the grid lock, as `join` and `set_upload` change budgets.
        let granted = self
            .sessions
            .lock()
            .get_mut(session_id)
            .and_then(|e| e.upload.reachable(ceiling));
        if let Some(granted) = granted
            && st.peers.get(&peer_id).is_some_and(|p| !p.addr.is_empty())
        {
            moved.extend(st.assigner.set_upload(peer_id, granted, now));
        }
        st.wake_moved(&moved)
    }

    /// A child could not connect to `peer_id`, one of its parents of the last minute:
    /// that parent's session id and address to probe again, unless it is not a relay
    /// (on probation, no address) or was probed again less than [`REPROBE_EVERY`] ago.
    /// The address is `None` for a parent reachable only by hole punching: a probe
    /// cannot tell (its router lets in only what it dialled), so the failed punch is the
    /// verdict and the caller takes its children away ([`LiveGrids::unreachable`]).
    pub fn reprobe_target(
        &self,
        child_session: &str,
        peer_id: PeerId,
    ) -> Option<(Arc<str>, Option<std::net::SocketAddr>)> {
        let now = self.now();
        let grid = {
            let sessions = self.sessions.lock();
            let e = sessions.get(child_session)?;
            if e.peer_id == peer_id || !e.may_report(peer_id, true, now) {
                return None;
            }
            e.grid.clone()
        };
        let (parent_session, addr) = {
            let st = grid.state.lock();
            let slot = st.peers.get(&peer_id)?;
            let addr = if slot.punch {
                None
            } else {
                Some(slot.addr.parse().ok()?)
            };
            (slot.session_id.clone(), addr)
        };
        let mut sessions = self.sessions.lock();
        let p = sessions.get_mut(&parent_session)?;
        if p.upload.on_probation_now()
            || p.last_reprobe
                .is_some_and(|t| now.saturating_sub(t) < REPROBE_EVERY)
        {
            return None;
        }
        p.last_reprobe = Some(now);
        Some((parent_session, addr))
    }

    /// A second probe of a relay's address failed (after a child could not connect):
    /// its upload goes back on probation and its children are re-parented. Returns how
    /// many assignments moved; `None` for an unknown session.
    pub fn unreachable(&self, session_id: &str) -> Option<usize> {
        let now = self.now();
        let (grid, peer_id) = {
            let mut sessions = self.sessions.lock();
            let e = sessions.get_mut(session_id)?;
            e.upload.back_on_probation();
            (e.grid.clone(), e.peer_id)
        };
        let mut st = grid.state.lock();
        if let Some(slot) = st.peers.get_mut(&peer_id)
            && slot.punch
        {
            // A failed punch is the verdict: not granted again until it joins again.
            slot.punch_failed = true;
        }
        let moved = st.assigner.set_upload(peer_id, 0, now);
        Some(st.wake_moved(&moved))
    }

    /// Records the chunk token issued to a session (join or renewal). Returns false when
    /// the session is no longer in a grid (left, expired or revoked meanwhile).
    pub fn set_token(&self, session_id: &str, token: TokenState) -> bool {
        match self.sessions.lock().get_mut(session_id) {
            Some(e) => {
                e.token = Some(token);
                true
            }
            None => false,
        }
    }

    /// The peer id and broadcast of a session in a grid of this process.
    pub fn session_peer(&self, session_id: &str) -> Option<(PeerId, String)> {
        self.sessions
            .lock()
            .get(session_id)
            .map(|e| (e.peer_id, e.broadcast_id().to_string()))
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
            let sessions = self.sessions.lock();
            let e = sessions
                .get(session_id)
                .ok_or(ReparentRefused::UnknownSession)?;
            (e.grid.clone(), e.peer_id)
        };
        let mut st = grid.state.lock();
        let substreams = st.assigner.config().substreams;
        let invalid = ReparentRefused::InvalidSubstream {
            substream,
            substreams,
        };
        let s = u16::try_from(substream).map_err(|_| invalid.clone())?;
        match st.assigner.reparent(peer_id, s, exclude, now) {
            Ok(out) => {
                if let (Parent::Peer(p), Some(e)) =
                    (out.parent, self.sessions.lock().get_mut(session_id))
                {
                    e.remember([(p, true)], now);
                }
                let moved = st.wake_moved(&out.moved);
                // The requester's own stream too: its mirror of the session then holds
                // the new parent at once, like every other parent change.
                if let Some(w) = st.peers.get(&peer_id).and_then(|p| p.wake.as_ref()) {
                    w.wake();
                }
                Ok((st.parent_ref(usize::from(s), out.parent), moved))
            }
            Err(GridError::InvalidSubstream(_)) => Err(invalid),
            Err(_) => Err(ReparentRefused::UnknownSession),
        }
    }

    /// Removes a session from its grid (clean leave) and re-parents its children. Returns
    /// `(peer id, peers moved)` when the session was in a grid.
    pub fn leave(&self, session_id: &str) -> Option<(PeerId, usize)> {
        let e = self.sessions.lock().remove(session_id)?;
        let now = self.now();
        let moved = e.grid.state.lock().remove_peer(e.peer_id, now);
        Some((e.peer_id, moved))
    }

    /// Removes every session without a stream ([`LiveGrids::attach`]) not heard from
    /// for longer than `timeout` from its grid
    /// (re-parenting its children) and returns them, for the caller to end in the
    /// database.
    pub fn expire(&self, timeout: Duration) -> Vec<Expired> {
        let now = self.now();
        // A session with a stream attached is alive as long as the stream is.
        let stale =
            self.take_sessions(|_, e| e.stream == 0 && now.saturating_sub(e.last_seen) > timeout);
        stale
            .into_iter()
            .map(|(session_id, e)| {
                let moved = e.grid.state.lock().remove_peer(e.peer_id, now);
                Expired {
                    session_id: session_id.to_string(),
                    broadcast_id: e.broadcast_id().to_string(),
                    peer_id: e.peer_id,
                    moved,
                }
            })
            .collect()
    }
}
