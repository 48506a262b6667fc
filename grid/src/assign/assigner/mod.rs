//! [`GridAssigner`]: per-broadcast parent assignment and booster accounting.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::{
    GridConfig, GridError, GridStats, JoinPlan, Parent, PeerId, PeerInfo, Reassignment,
    ReparentOutcome,
};

/// Internal link value: the data plane.
const SERVER: u32 = u32::MAX;
/// Internal link value: detached (only transiently, inside one operation).
const NONE: u32 = u32::MAX - 1;
/// No home substream (peer without slots).
const NO_HOME: u16 = u16::MAX;
/// Candidates examined per parent search before falling back to the server.
const MAX_SCAN: usize = 64;
/// Candidates of the shallowest depth examined for an address-prefix match.
const PREFIX_SCAN: usize = 8;
/// Server-fed peers tried per substream and booster-release round.
const RELEASE_TRIES: usize = 8;
/// Remembered exclusions per peer.
const MAX_AVOID: usize = 4;

/// Free-slot index key: homed in the substream first, then shallow, high capacity, old.
type FreeKey = (bool, u16, Reverse<u32>, u64, u32);

#[derive(Debug, Clone, Copy)]
struct Avoid {
    substream: u16,
    parent: PeerId,
    until_ms: u64,
}

#[derive(Debug)]
struct Peer {
    id: PeerId,
    cap: u32,
    used: u32,
    joined_ms: u64,
    prefix: u32,
    upload_kbps: u32,
    home: u16,
    bad: bool,
    /// Reachable only by hole punching: a parent of `can_punch` peers only.
    punch_only: bool,
    /// Can dial a `punch_only` parent.
    can_punch: bool,
    /// In the free/leaf indexes (false while being built or torn down).
    indexed: bool,
    live_pos: u32,
    parents: Box<[u32]>,
    depth: Box<[u16]>,
    children: Vec<(u32, u16)>,
    avoid: Vec<Avoid>,
}

impl Peer {
    fn free_eligible(&self) -> bool {
        self.indexed && !self.bad && self.used < self.cap
    }
    fn has_children_in(&self, s: u16) -> bool {
        self.children.iter().any(|&(_, cs)| cs == s)
    }
    fn leaf_eligible(&self, s: u16) -> bool {
        self.indexed && self.home != s && !self.has_children_in(s)
    }
}

/// Per-broadcast parent assignment (see the [module docs](super)).
#[derive(Debug)]
pub struct GridAssigner {
    cfg: GridConfig,
    k: u16,
    substream_kbps: u32,
    slab: Vec<Option<Peer>>,
    vacant: Vec<u32>,
    ids: HashMap<PeerId, u32>,
    live: Vec<u32>,
    /// Per substream: peers with a free slot.
    free_idx: Vec<BTreeSet<FreeKey>>,
    /// Per substream: leaves not homed there, by (depth, idx): displaceable by a joiner.
    leaf_idx: Vec<BTreeSet<(u16, u32)>>,
    /// Per substream: server-fed peers by (has children there, capacity, idx).
    server_fed: Vec<BTreeSet<(bool, u32, u32)>>,
    home_supply: Vec<u64>,
    depth_hist: Vec<u64>,
    free_slots: u64,
    supply: u64,
    used: u64,
    server_used: u64,
    upload_total: u64,
    rng: u64,
    /// Peers marked punch-only (0 in a grid without NAT: the release scan stays short).
    punch_only_peers: u32,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl GridAssigner {
    /// A new, empty grid.
    ///
    /// # Errors
    /// [`GridError::InvalidConfig`] if `substreams` is not in `1..=64` or `stream_kbps` is 0.
    pub fn new(cfg: GridConfig) -> Result<Self, GridError> {
        if cfg.substreams == 0 || cfg.substreams > 64 {
            return Err(GridError::InvalidConfig("substreams must be in 1..=64"));
        }
        if cfg.stream_kbps == 0 {
            return Err(GridError::InvalidConfig("stream_kbps must be > 0"));
        }
        let k = cfg.substreams;
        let substream_kbps = crate::slot_kbps(cfg.stream_kbps, k);
        Ok(GridAssigner {
            cfg,
            k,
            substream_kbps,
            slab: Vec::new(),
            vacant: Vec::new(),
            ids: HashMap::new(),
            live: Vec::new(),
            free_idx: vec![BTreeSet::new(); usize::from(k)],
            leaf_idx: vec![BTreeSet::new(); usize::from(k)],
            server_fed: vec![BTreeSet::new(); usize::from(k)],
            home_supply: vec![0; usize::from(k)],
            depth_hist: vec![0; 2],
            free_slots: 0,
            supply: 0,
            used: 0,
            server_used: 0,
            upload_total: 0,
            rng: cfg.seed ^ 0x9E37_79B9_7F4A_7C15,
            punch_only_peers: 0,
        })
    }

    /// The configuration this grid runs with.
    pub fn config(&self) -> &GridConfig {
        &self.cfg
    }

    /// Child slots a budget of `upload_kbps` buys ([`crate::slots_for`]:
    /// the whole slots `U·K / r`, plus a partly covered one that keeps at least four
    /// fifths of each push), capped.
    pub fn slots_for(&self, upload_kbps: u32) -> u32 {
        crate::slots_for(upload_kbps, self.cfg.stream_kbps, self.k).min(self.cfg.max_slots_per_peer)
    }

    /// Admits a peer and assigns it one parent per substream plus mesh neighbours.
    ///
    /// # Errors
    /// [`GridError::AlreadyJoined`], [`GridError::NoCapacity`] (server slot limit reached
    /// and not enough free peer slots), [`GridError::TooManyPeers`].
    pub fn join(&mut self, peer_id: PeerId, info: PeerInfo) -> Result<JoinPlan, GridError> {
        if self.ids.contains_key(&peer_id) {
            return Err(GridError::AlreadyJoined(peer_id));
        }
        let need_server = u64::from(self.k).saturating_sub(self.free_slots);
        if self.server_used.saturating_add(need_server) > self.cfg.server_slots {
            return Err(GridError::NoCapacity);
        }
        let now_ms = ms(info.now);
        let cap = self.slots_for(info.upload_kbps);
        let home = if cap > 0 {
            self.least_supplied_substream()
        } else {
            NO_HOME
        };
        let idx = match self.vacant.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slab.len()).map_err(|_| GridError::TooManyPeers)?;
                if i >= NONE {
                    return Err(GridError::TooManyPeers);
                }
                self.slab.push(None);
                i
            }
        };
        let k = usize::from(self.k);
        self.slab[idx as usize] = Some(Peer {
            id: peer_id,
            cap,
            used: 0,
            joined_ms: now_ms,
            prefix: info.addr_prefix,
            upload_kbps: info.upload_kbps,
            home,
            bad: false,
            punch_only: false,
            can_punch: info.can_punch,
            indexed: false,
            live_pos: u32::try_from(self.live.len()).unwrap_or(u32::MAX),
            parents: vec![NONE; k].into_boxed_slice(),
            depth: vec![0; k].into_boxed_slice(),
            children: Vec::new(),
            avoid: Vec::new(),
        });
        self.ids.insert(peer_id, idx);
        self.live.push(idx);
        self.depth_hist[0] += u64::from(self.k);
        self.supply += u64::from(cap);
        self.free_slots += u64::from(cap);
        self.upload_total += u64::from(info.upload_kbps);
        if home != NO_HOME {
            self.home_supply[usize::from(home)] += u64::from(cap);
        }

        let mut moved = Vec::new();
        let order = (home != NO_HOME)
            .then_some(home)
            .into_iter()
            .chain((0..self.k).filter(|&s| s != home));
        for s in order {
            if self.root_free(s) {
                self.attach(idx, s, SERVER);
                continue;
            }
            let best = self.best_parent(idx, s, &[], now_ms, false);
            let best_depth = best.map(|b| self.peer(b).depth[usize::from(s)]);
            // Displacement: take the place of the shallowest leaf not homed here and
            // adopt it, if that is no deeper than a free slot.
            if s == home
                && self.peer(idx).used < cap
                && let Some(&(leaf_depth, leaf)) = self.leaf_idx[usize::from(s)].first()
                && best_depth.is_none_or(|d| leaf_depth <= d)
                && self.may_parent(self.peer(leaf).parents[usize::from(s)], idx)
            {
                let leaf_parent = self.peer(leaf).parents[usize::from(s)];
                self.detach(leaf, s);
                self.attach(idx, s, leaf_parent);
                self.attach(leaf, s, idx);
                moved.push(self.reassignment(leaf, s));
                continue;
            }
            self.attach(idx, s, best.unwrap_or(SERVER));
        }
        self.index_peer(idx);
        self.release_booster(now_ms, &mut moved);
        let neighbours = self.sample_neighbours(peer_id, usize::from(self.cfg.neighbours));
        let parents = self.parents(peer_id).unwrap_or_default();
        Ok(JoinPlan {
            parents,
            neighbours,
            moved: finish_moved(moved, Some(peer_id)),
        })
    }

    /// Removes a peer (clean leave or missed heartbeats) and re-parents its children.
    /// Unknown peers are ignored (leave is idempotent).
    pub fn leave(&mut self, peer_id: PeerId, now: Duration) -> Vec<Reassignment> {
        let Some(&idx) = self.ids.get(&peer_id) else {
            return Vec::new();
        };
        let now_ms = ms(now);
        self.unindex_peer(idx);
        for s in 0..self.k {
            self.detach(idx, s);
        }
        let orphans = std::mem::take(&mut self.peer_mut(idx).children);
        for &(c, s) in &orphans {
            // Undo the bookkeeping of the links the `take` above dropped.
            let p = self.peer_mut(idx);
            p.used -= 1;
            if !p.bad {
                self.free_slots += 1;
            }
            self.used -= 1;
            self.peer_mut(c).parents[usize::from(s)] = NONE;
        }
        // Remove the peer itself.
        let p = self.remove_slot(idx);
        if !p.bad {
            self.supply -= u64::from(p.cap);
            self.free_slots -= u64::from(p.cap);
        }
        if p.home != NO_HOME {
            self.home_supply[usize::from(p.home)] -= u64::from(p.cap);
        }
        self.upload_total -= u64::from(p.upload_kbps);
        for &d in p.depth.iter() {
            self.depth_hist[usize::from(d)] -= 1;
        }
        let mut moved = Vec::new();
        for (c, s) in orphans {
            let target = self.pick_parent(c, s, &[], now_ms);
            self.attach(c, s, target);
            moved.push(self.reassignment(c, s));
        }
        self.release_booster(now_ms, &mut moved);
        finish_moved(moved, None)
    }

    /// Finds `child` a new parent for `substream` (quality re-search). Parents in `exclude`
    /// are not chosen, now or by later rebalancing, for [`GridConfig::avoid_ttl`]. The
    /// server is chosen only if no other peer slot is usable.
    ///
    /// # Errors
    /// [`GridError::UnknownPeer`], [`GridError::InvalidSubstream`].
    pub fn reparent(
        &mut self,
        child: PeerId,
        substream: u16,
        exclude: &[PeerId],
        now: Duration,
    ) -> Result<ReparentOutcome, GridError> {
        let idx = *self.ids.get(&child).ok_or(GridError::UnknownPeer(child))?;
        if substream >= self.k {
            return Err(GridError::InvalidSubstream(substream));
        }
        let now_ms = ms(now);
        let until_ms = now_ms.saturating_add(ms(self.cfg.avoid_ttl));
        for &x in exclude {
            let p = self.peer_mut(idx);
            p.avoid
                .retain(|a| a.until_ms > now_ms && !(a.substream == substream && a.parent == x));
            if p.avoid.len() >= MAX_AVOID {
                p.avoid.remove(0);
            }
            p.avoid.push(Avoid {
                substream,
                parent: x,
                until_ms,
            });
        }
        self.detach(idx, substream);
        let target = self.pick_parent(idx, substream, exclude, now_ms);
        self.attach(idx, substream, target);
        let mut moved = Vec::new();
        self.release_booster(now_ms, &mut moved);
        Ok(ReparentOutcome {
            parent: self.link_to_parent(self.peer(idx).parents[usize::from(substream)]),
            moved: finish_moved(moved, None),
        })
    }

    /// A peer's upload budget changed (e.g. its SDK measured a slower uplink than it
    /// offered at join): its child slots become `slots_for(upload_kbps)`. Growing frees
    /// slots (server-fed peers may move onto them, booster release). Shrinking below the
    /// slots in use detaches the excess children (leaves of that substream first, then
    /// the most recent) and re-parents them as [`GridAssigner::leave`] re-parents orphans,
    /// never back under this peer. Returns every reassignment (the children that lost
    /// this parent included). The peer's own parents are unchanged. Unknown peers and
    /// unchanged budgets are ignored.
    pub fn set_upload(
        &mut self,
        peer_id: PeerId,
        upload_kbps: u32,
        now: Duration,
    ) -> Vec<Reassignment> {
        let Some(&idx) = self.ids.get(&peer_id) else {
            return Vec::new();
        };
        if self.peer(idx).upload_kbps == upload_kbps {
            return Vec::new();
        }
        let mut moved = Vec::new();
        self.resize(idx, upload_kbps, ms(now), &mut moved);
        self.release_booster(ms(now), &mut moved);
        finish_moved(moved, None)
    }

    /// The stream's rate as delivered changed (the first measurement replaces the
    /// default a grid is created with): every peer's child slots are recomputed as
    /// [`GridAssigner::set_upload`] does for one. Returns every reassignment. A zero or
    /// unchanged rate is ignored.
    pub fn set_stream_kbps(&mut self, stream_kbps: u32, now: Duration) -> Vec<Reassignment> {
        if stream_kbps == 0 || stream_kbps == self.cfg.stream_kbps {
            return Vec::new();
        }
        self.cfg.stream_kbps = stream_kbps;
        self.substream_kbps = crate::slot_kbps(stream_kbps, self.k);
        let now_ms = ms(now);
        let mut moved = Vec::new();
        let peers: Vec<u32> = self.live.clone();
        for idx in peers {
            let (cap, upload) = {
                let p = self.peer(idx);
                (p.cap, p.upload_kbps)
            };
            if self.slots_for(upload) != cap {
                self.resize(idx, upload, now_ms, &mut moved);
            }
        }
        self.release_booster(now_ms, &mut moved);
        finish_moved(moved, None)
    }

    /// Gives peer `idx` the child slots `upload_kbps` buys at the current rate (see
    /// [`GridAssigner::set_upload`]); its excess children are re-parented into `moved`.
    fn resize(&mut self, idx: u32, upload_kbps: u32, now_ms: u64, moved: &mut Vec<Reassignment>) {
        let peer_id = self.peer(idx).id;
        let new_cap = self.slots_for(upload_kbps);
        // 1. Detach the children beyond the new capacity (the peer stays indexed and
        //    consistent with its old capacity meanwhile).
        let excess = self.peer(idx).used.saturating_sub(new_cap) as usize;
        let mut orphans: Vec<(u32, u16)> = Vec::with_capacity(excess);
        if excess > 0 {
            let mut children: Vec<(bool, usize, u32, u16)> = self
                .peer(idx)
                .children
                .iter()
                .enumerate()
                .map(|(pos, &(c, cs))| (self.peer(c).has_children_in(cs), pos, c, cs))
                .collect();
            // Leaves first (moving them deepens nothing), then the most recent.
            children.sort_unstable_by_key(|&(interior, pos, _, _)| (interior, Reverse(pos)));
            for &(_, _, c, cs) in children.iter().take(excess) {
                self.detach(c, cs);
                orphans.push((c, cs));
            }
        }
        // 2. Change the capacity with the peer out of every index that depends on it.
        self.unindex_peer(idx);
        let fed_by_server: Vec<u16> = (0..self.k)
            .filter(|&s| self.peer(idx).parents[usize::from(s)] == SERVER)
            .collect();
        for &s in &fed_by_server {
            let key = self.sf_key(idx, s);
            self.server_fed[usize::from(s)].remove(&key);
        }
        let (old_cap, used, bad, old_home, old_upload) = {
            let p = self.peer(idx);
            (p.cap, p.used, p.bad, p.home, p.upload_kbps)
        };
        if !bad {
            self.supply = self.supply - u64::from(old_cap) + u64::from(new_cap);
            self.free_slots =
                self.free_slots - u64::from(old_cap - used) + u64::from(new_cap - used);
        }
        if old_home != NO_HOME {
            self.home_supply[usize::from(old_home)] -= u64::from(old_cap);
        }
        self.upload_total = self.upload_total - u64::from(old_upload) + u64::from(upload_kbps);
        let home = if new_cap == 0 {
            NO_HOME
        } else if old_home != NO_HOME {
            old_home
        } else {
            self.least_supplied_substream()
        };
        if home != NO_HOME {
            self.home_supply[usize::from(home)] += u64::from(new_cap);
        }
        {
            let p = self.peer_mut(idx);
            p.cap = new_cap;
            p.upload_kbps = upload_kbps;
            p.home = home;
        }
        for &s in &fed_by_server {
            let key = self.sf_key(idx, s);
            self.server_fed[usize::from(s)].insert(key);
        }
        self.index_peer(idx);
        // 3. Re-parent the orphans elsewhere (never under this peer again right now).
        for (c, cs) in orphans {
            let target = self.pick_parent(c, cs, &[peer_id], now_ms);
            self.attach(c, cs, target);
            moved.push(self.reassignment(c, cs));
        }
    }

    /// Whether a peer is marked bad (demoted); `None` for an unknown peer.
    pub fn is_bad(&self, peer_id: PeerId) -> Option<bool> {
        self.ids.get(&peer_id).map(|&idx| self.peer(idx).bad)
    }

    /// Marks a peer bad, i.e. demotes it (enough distinct reporters said it sent chunks
    /// failing verification or did not deliver its pushes): it is never assigned as a
    /// parent again, whatever its budget becomes, and its current children are
    /// re-parented (returned). It stays a viewer.
    pub fn report_bad_peer(&mut self, peer_id: PeerId, now: Duration) -> Vec<Reassignment> {
        let Some(&idx) = self.ids.get(&peer_id) else {
            return Vec::new();
        };
        if self.peer(idx).bad {
            return Vec::new();
        }
        let now_ms = ms(now);
        self.unindex_peer(idx);
        {
            let p = self.peer_mut(idx);
            p.bad = true;
            let (cap, used) = (u64::from(p.cap), u64::from(p.used));
            self.supply -= cap;
            self.free_slots -= cap - used;
        }
        self.index_peer(idx);
        let children = self.peer(idx).children.clone();
        let mut moved = Vec::new();
        for (c, s) in children {
            self.detach(c, s);
            let target = self.pick_parent(c, s, &[], now_ms);
            self.attach(c, s, target);
            moved.push(self.reassignment(c, s));
        }
        self.release_booster(now_ms, &mut moved);
        finish_moved(moved, None)
    }

    /// Up to `count` distinct random peers other than `peer` (seeded RNG), e.g. to replace
    /// mesh neighbours that left.
    pub fn sample_neighbours(&mut self, peer: PeerId, count: usize) -> Vec<PeerId> {
        let mut out: Vec<PeerId> = Vec::with_capacity(count);
        let n = self.live.len();
        if n <= 1 || count == 0 {
            return out;
        }
        let want = count.min(n - 1);
        let mut tries = 0;
        while out.len() < want && tries < want * 8 {
            tries += 1;
            let r = self.next_rand();
            let pick = self.live[(r % n as u64) as usize];
            let id = self.peer(pick).id;
            if id != peer && !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    /// A peer's parents, indexed by substream (`None` for an unknown peer).
    pub fn parents(&self, peer: PeerId) -> Option<Vec<Parent>> {
        let idx = *self.ids.get(&peer)?;
        Some(
            self.peer(idx)
                .parents
                .iter()
                .map(|&l| self.link_to_parent(l))
                .collect(),
        )
    }

    /// A peer's depth in each substream tree (server-fed = 1).
    pub fn depths(&self, peer: PeerId) -> Option<Vec<u16>> {
        let idx = *self.ids.get(&peer)?;
        Some(self.peer(idx).depth.to_vec())
    }

    /// A peer's children as `(child, substream)` pairs.
    pub fn children(&self, peer: PeerId) -> Option<Vec<(PeerId, u16)>> {
        let idx = *self.ids.get(&peer)?;
        Some(
            self.peer(idx)
                .children
                .iter()
                .map(|&(c, s)| (self.peer(c).id, s))
                .collect(),
        )
    }

    /// Supply, demand, booster and depth figures.
    pub fn stats(&self) -> GridStats {
        let peers = self.live.len() as u64;
        let max_depth = self
            .depth_hist
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |d| u16::try_from(d).unwrap_or(u16::MAX));
        let r = self.roots();
        let roots = self
            .server_fed
            .iter()
            .map(|s| s.len().min(r) as u64)
            .sum::<u64>();
        GridStats {
            peers,
            demand: peers * u64::from(self.k),
            peer_supply: self.supply,
            peer_slots_used: self.used,
            server_slots_used: self.server_used,
            booster_slots: self.server_used - roots,
            max_depth,
            substream_kbps: self.substream_kbps,
            upload_kbps_total: self.upload_total,
            stream_kbps: self.cfg.stream_kbps,
        }
    }

    // ----- internals -------------------------------------------------------------------

    /// The substream with the least relay supply so far (a new relay's home).
    fn least_supplied_substream(&self) -> u16 {
        let mut best = 0u16;
        for s in 1..self.k {
            if self.home_supply[usize::from(s)] < self.home_supply[usize::from(best)] {
                best = s;
            }
        }
        best
    }

    fn peer(&self, idx: u32) -> &Peer {
        match self.slab.get(idx as usize) {
            Some(Some(p)) => p,
            // Internal indexes only ever name live slots; a miss is a bug in this module.
            _ => unreachable!("grid: dangling peer index {idx}"),
        }
    }

    fn peer_mut(&mut self, idx: u32) -> &mut Peer {
        match self.slab.get_mut(idx as usize) {
            Some(Some(p)) => p,
            _ => unreachable!("grid: dangling peer index {idx}"),
        }
    }

    fn remove_slot(&mut self, idx: u32) -> Peer {
        let Some(p) = self.slab.get_mut(idx as usize).and_then(Option::take) else {
            unreachable!("grid: removing vacant slot {idx}");
        };
        self.ids.remove(&p.id);
        if p.punch_only {
            self.punch_only_peers -= 1;
        }
        let pos = p.live_pos as usize;
        self.live.swap_remove(pos);
        if let Some(&moved) = self.live.get(pos) {
            self.peer_mut(moved).live_pos = p.live_pos;
        }
        self.vacant.push(idx);
        p
    }

    fn link_to_parent(&self, link: u32) -> Parent {
        if link >= NONE {
            Parent::Server
        } else {
            Parent::Peer(self.peer(link).id)
        }
    }

    fn reassignment(&self, child: u32, s: u16) -> Reassignment {
        let p = self.peer(child);
        Reassignment {
            child: p.id,
            substream: s,
            parent: self.link_to_parent(p.parents[usize::from(s)]),
        }
    }

    fn next_rand(&mut self) -> u64 {
        // SplitMix64.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn free_key(&self, idx: u32, s: u16) -> FreeKey {
        let p = self.peer(idx);
        (
            p.home != s,
            p.depth[usize::from(s)],
            Reverse(p.cap),
            p.joined_ms,
            idx,
        )
    }

    /// Inserts a peer into every index it qualifies for.
    fn index_peer(&mut self, idx: u32) {
        self.peer_mut(idx).indexed = true;
        let free = self.peer(idx).free_eligible();
        for s in 0..self.k {
            if free {
                let key = self.free_key(idx, s);
                self.free_idx[usize::from(s)].insert(key);
            }
            if self.peer(idx).leaf_eligible(s) {
                let d = self.peer(idx).depth[usize::from(s)];
                self.leaf_idx[usize::from(s)].insert((d, idx));
            }
        }
    }

    /// Removes a peer from every index.
    fn unindex_peer(&mut self, idx: u32) {
        let free = self.peer(idx).free_eligible();
        for s in 0..self.k {
            if free {
                let key = self.free_key(idx, s);
                self.free_idx[usize::from(s)].remove(&key);
            }
            if self.peer(idx).leaf_eligible(s) {
                let d = self.peer(idx).depth[usize::from(s)];
                self.leaf_idx[usize::from(s)].remove(&(d, idx));
            }
        }
        self.peer_mut(idx).indexed = false;
    }

    /// True if `x` lies in `root`'s subtree (or is `root`) in substream `s`.
    fn in_subtree(&self, root: u32, s: u16, mut x: u32) -> bool {
        let mut steps = 0usize;
        loop {
            if x == root {
                return true;
            }
            if x >= NONE {
                return false;
            }
            steps += 1;
            if steps > self.live.len() + 1 {
                // Defensive: a cycle would be a bug; treat as "inside" so it is not used.
                return true;
            }
            x = self.peer(x).parents[usize::from(s)];
        }
    }

    /// The best peer with a free slot to parent `child` in `s`, if any.
    fn best_parent(
        &self,
        child: u32,
        s: u16,
        exclude: &[PeerId],
        now_ms: u64,
        check_cycles: bool,
    ) -> Option<u32> {
        let c = self.peer(child);
        let check_cycles = check_cycles && c.has_children_in(s);
        let mut first: Option<(u32, u16)> = None;
        let mut after_first = 0usize;
        for (scanned, &(_, depth, _, _, x)) in self.free_idx[usize::from(s)].iter().enumerate() {
            if scanned >= MAX_SCAN {
                break;
            }
            if let Some((_, d0)) = first {
                if depth != d0 || after_first >= PREFIX_SCAN {
                    break;
                }
                after_first += 1;
            }
            if x == child {
                continue;
            }
            let cand = self.peer(x);
            if !self.punch_compatible(x, child)
                || exclude.contains(&cand.id)
                || c.avoid
                    .iter()
                    .any(|a| a.substream == s && a.parent == cand.id && a.until_ms > now_ms)
                || (check_cycles && self.in_subtree(child, s, x))
            {
                continue;
            }
            match first {
                None => {
                    // The server-fed backbone is chosen on depth/capacity/age alone.
                    if depth < 2 || cand.prefix == c.prefix {
                        return Some(x);
                    }
                    first = Some((x, depth));
                }
                Some(_) => {
                    if cand.prefix == c.prefix {
                        return Some(x);
                    }
                }
            }
        }
        first.map(|(x, _)| x)
    }

    /// Links `child` under `link` (a peer index or [`SERVER`]) in substream `s`, and
    /// recomputes the depths of `child`'s subtree.
    fn attach(&mut self, child: u32, s: u16, link: u32) {
        let su = usize::from(s);
        let new_depth = if link == SERVER {
            self.server_used += 1;
            let key = self.sf_key(child, s);
            self.server_fed[su].insert(key);
            1
        } else {
            // The parent loses its leaf status and maybe its last free slot.
            let was_free = self.peer(link).free_eligible();
            let was_leaf = self.peer(link).leaf_eligible(s);
            let p = self.peer_mut(link);
            p.used += 1;
            let (full, bad) = (p.used >= p.cap, p.bad);
            if !bad {
                self.free_slots -= 1;
            }
            if was_free && full {
                self.unindex_free(link);
            }
            if was_leaf {
                let d = self.peer(link).depth[su];
                self.leaf_idx[su].remove(&(d, link));
            }
            let sf_rekey = self.peer(link).parents[su] == SERVER;
            if sf_rekey {
                let key = self.sf_key(link, s);
                self.server_fed[su].remove(&key);
            }
            self.peer_mut(link).children.push((child, s));
            if sf_rekey {
                let key = self.sf_key(link, s);
                self.server_fed[su].insert(key);
            }
            self.used += 1;
            self.peer(link).depth[su].saturating_add(1)
        };
        self.peer_mut(child).parents[su] = link;
        self.shift_subtree(child, s, new_depth);
    }

    /// Unlinks `child` from its parent in substream `s` (the child becomes detached).
    fn detach(&mut self, child: u32, s: u16) {
        let su = usize::from(s);
        let link = self.peer(child).parents[su];
        if link == NONE {
            return;
        }
        if link == SERVER {
            self.server_used -= 1;
            let key = self.sf_key(child, s);
            self.server_fed[su].remove(&key);
        } else {
            let was_free = self.peer(link).free_eligible();
            let sf_rekey = self.peer(link).parents[su] == SERVER;
            if sf_rekey {
                let key = self.sf_key(link, s);
                self.server_fed[su].remove(&key);
            }
            {
                let p = self.peer_mut(link);
                if let Some(pos) = p.children.iter().position(|&e| e == (child, s)) {
                    p.children.swap_remove(pos);
                }
                p.used -= 1;
            }
            if sf_rekey {
                let key = self.sf_key(link, s);
                self.server_fed[su].insert(key);
            }
            self.used -= 1;
            if !self.peer(link).bad {
                self.free_slots += 1;
            }
            if !was_free && self.peer(link).free_eligible() {
                self.index_free(link);
            }
            if self.peer(link).leaf_eligible(s) {
                let d = self.peer(link).depth[su];
                self.leaf_idx[su].insert((d, link));
            }
        }
        self.peer_mut(child).parents[su] = NONE;
    }

    fn sf_key(&self, idx: u32, s: u16) -> (bool, u32, u32) {
        let p = self.peer(idx);
        (p.has_children_in(s), p.cap, idx)
    }

    fn index_free(&mut self, idx: u32) {
        for s in 0..self.k {
            let key = self.free_key(idx, s);
            self.free_idx[usize::from(s)].insert(key);
        }
    }

    fn unindex_free(&mut self, idx: u32) {
        for s in 0..self.k {
            let key = self.free_key(idx, s);
            self.free_idx[usize::from(s)].remove(&key);
        }
    }

    /// Sets `root`'s depth in `s` to `depth` and its descendants' accordingly.
    fn shift_subtree(&mut self, root: u32, s: u16, depth: u16) {
        let su = usize::from(s);
        let mut stack = vec![(root, depth)];
        while let Some((x, d)) = stack.pop() {
            let old = self.peer(x).depth[su];
            if old != d {
                let free = self.peer(x).free_eligible();
                let leaf = self.peer(x).leaf_eligible(s);
                if free {
                    let key = self.free_key(x, s);
                    self.free_idx[su].remove(&key);
                }
                if leaf {
                    self.leaf_idx[su].remove(&(old, x));
                }
                self.peer_mut(x).depth[su] = d;
                if free {
                    let key = self.free_key(x, s);
                    self.free_idx[su].insert(key);
                }
                if leaf {
                    self.leaf_idx[su].insert((d, x));
                }
                self.depth_hist[usize::from(old)] -= 1;
                let du = usize::from(d);
                if self.depth_hist.len() <= du {
                    self.depth_hist.resize(du + 1, 0);
                }
                self.depth_hist[du] += 1;
            } else if x != root {
                // Unchanged depth: the rest of this branch is unchanged too.
                continue;
            }
            let next = d.saturating_add(1);
            stack.extend(
                self.peer(x)
                    .children
                    .iter()
                    .filter(|&&(_, cs)| cs == s)
                    .map(|&(c, _)| (c, next)),
            );
        }
    }
}

/// Keeps the last reassignment per (child, substream), drops the caller's own entries.
fn finish_moved(moved: Vec<Reassignment>, skip: Option<PeerId>) -> Vec<Reassignment> {
    let mut out: Vec<Reassignment> = Vec::with_capacity(moved.len());
    for m in moved.into_iter().rev() {
        if Some(m.child) == skip {
            continue;
        }
        if !out
            .iter()
            .any(|o| o.child == m.child && o.substream == m.substream)
        {
            out.push(m);
        }
    }
    out.reverse();
    out
}

#[cfg(test)]
mod invariants;
mod punch;
mod roots;
