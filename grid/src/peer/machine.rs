//! [`Peer`]: one peer's policies as a sans-IO state machine around the
//! [`PeerScheduler`]: play clock, upload budget and push pacing (with skip
//! announcements), child slots, parents per substream, re-search and the memory of
//! failed and banned peers.
//!
//! The driver (the SDK's relay engine, or [`crate`]'s simulator) owns the links and the
//! chunk bytes. It turns what happens into `handle_*` / `on_*` calls, each with `now`
//! (its real time since an origin it picks), drains [`Peer::poll_action`] after every
//! call and executes the [`PeerAction`]s, and wakes up at [`Peer::next_timeout`] to call
//! [`Peer::handle_timeout`]. Ids of children and neighbours are the driver's keys for
//! them (the SDK uses its link ids, a simulator may use peer ids): the machine only
//! compares them.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::buffer_map::BufferMap;
use super::child_slots::ChildSlots;
use super::parent_memory::ParentMemory;
use super::play_clock::PlayClock;
use super::push_pacing::ChildPace;
use super::scheduler::{
    Action, PeerScheduler, SchedulerConfig, SchedulerError, SchedulerStats, Source,
};
use super::upload_bucket::UploadBucket;
use crate::{Parent, PeerId};

/// Everything a [`Peer`] starts with (typed; the driver parses its own configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerConfig {
    /// Our own peer id (a parent naming us is the data plane).
    pub me: PeerId,
    /// The scheduler's tunables (its durations are in stream time).
    pub scheduler: SchedulerConfig,
    /// Upload offered, kbit/s: the pacing rate of the upload bucket.
    pub upload_kbps: u32,
    /// Relay budget, kbit/s (0 = not relaying: no child slots).
    pub budget_kbps: u32,
    /// The stream's rate, kbit/s (0 = unknown), to turn a budget into child slots.
    pub stream_kbps: u32,
    /// Child slots the control plane gave us.
    pub child_slots: u32,
}

/// A decision for the driver (drain with [`Peer::poll_action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAction {
    /// Send held chunk `seq` to `to`: a push to a child (`push`) or an answer to a
    /// request, within the upload budget. Report bytes queued with
    /// [`Peer::on_uploaded`].
    Send { to: PeerId, seq: u64, push: bool },
    /// Send `NOT_FOUND(seq)` to `to`: an answer for a chunk not held or over the
    /// budget, or a push skipped over the budget (a skip announcement, so that the
    /// child repairs it at once and does not take us for a silent parent).
    NotFound { to: PeerId, seq: u64 },
    /// Ask neighbour `neighbour` for chunk `seq`.
    Request { neighbour: PeerId, seq: u64 },
    /// Ask the data plane for chunk `seq`.
    RequestFromServer { seq: u64 },
    /// Send this buffer map to neighbour `to`.
    SendBufferMap { to: PeerId, map: BufferMap },
    /// The parent of `substream` is late or silent: re-search it excluding `exclude`
    /// (ask [`Peer::research`] for the exclude list to send).
    ReSearch {
        substream: u16,
        exclude: Option<PeerId>,
    },
    /// Complain about `parent` (non-delivery of `missed` of the last `window` chunks
    /// it owed on `substream`).
    ReportParent {
        substream: u16,
        parent: PeerId,
        missed: u32,
        window: u32,
    },
    /// Hand chunk `seq` (held) to the player now.
    Play { seq: u64 },
    /// Chunk `seq` missed its play-out deadline.
    Skip { seq: u64 },
    /// The substreams this peer relays on to children of its own changed: tell every
    /// peer parent (a `RELAYING` frame), so that it pushes to us before its leaves. A
    /// link to a new parent is told [`Peer::relaying`] right after its `SUBSCRIBE`.
    Relaying { substreams: u64 },
}

/// A child of ours: what it subscribed to and its share of the pushes.
#[derive(Debug, Clone, Copy, Default)]
struct Child {
    mask: u64,
    pace: ChildPace,
}

/// One peer's policies (see the module docs).
#[derive(Debug, Clone)]
pub struct Peer {
    me: PeerId,
    k: u16,
    sched: PeerScheduler,
    clock: PlayClock,
    bucket: UploadBucket,
    /// The bucket is refilled before the first push or serve of each drain.
    refill_due: bool,
    last_refill: Duration,
    /// The last `now` the driver gave.
    now: Duration,
    slots: ChildSlots,
    /// Push pacing and subscriptions per child key (pacing outlives a
    /// re-subscription; forgotten at [`Peer::link_closed`]).
    children: HashMap<PeerId, Child>,
    /// Wire length of each held chunk (the chunks the scheduler holds).
    held: BTreeMap<u64, u64>,
    /// Who feeds each substream (`None`: the parent is gone, a re-search is under way).
    parents: Vec<Option<Parent>>,
    /// A re-search of the substream is under way.
    researching: Vec<bool>,
    memory: ParentMemory,
    /// What our parents were last told we relay ([`PeerAction::Relaying`]).
    told_relaying: u64,
    /// Children changed since [`Peer::told_relaying`] was compared.
    children_changed: bool,
}

impl Peer {
    /// A peer at `now`, fed by the data plane on every substream.
    pub fn new(cfg: PeerConfig, now: Duration) -> Result<Peer, SchedulerError> {
        let mut sched = PeerScheduler::new(cfg.scheduler)?;
        let k = cfg.scheduler.substreams;
        let mut clock = PlayClock::new(cfg.scheduler.chunk_duration, now);
        let t = clock.read(now);
        for s in 0..k {
            sched.on_parent_changed(s, Some(Parent::Server), t);
        }
        Ok(Peer {
            me: cfg.me,
            k,
            sched,
            clock,
            bucket: UploadBucket::new(cfg.upload_kbps),
            refill_due: true,
            last_refill: now,
            now,
            slots: ChildSlots::new(cfg.child_slots, cfg.budget_kbps, cfg.stream_kbps, k),
            children: HashMap::new(),
            told_relaying: 0,
            children_changed: false,
            held: BTreeMap::new(),
            parents: vec![Some(Parent::Server); usize::from(k)],
            researching: vec![false; usize::from(k)],
            memory: ParentMemory::default(),
        })
    }

    fn read(&mut self, now: Duration) -> Duration {
        self.now = self.now.max(now);
        self.clock.read(now)
    }

    // ----- queries -------------------------------------------------------------------

    /// Our peer id.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// Substreams `K`.
    pub fn substreams(&self) -> u16 {
        self.k
    }

    /// The scheduler's counters.
    pub fn stats(&self) -> SchedulerStats {
        self.sched.stats()
    }

    /// Whether chunk `seq` is held.
    pub fn has(&self, seq: u64) -> bool {
        self.sched.has(seq)
    }

    /// The next chunk to play, once playing.
    pub fn play_next(&self) -> Option<u64> {
        self.sched.play_next()
    }

    /// Where a subscription to a new parent starts (what a child's `SUBSCRIBE` to a
    /// peer says): at the next chunk to play once playing (what came before is of no
    /// use; what comes after may be missing on the new parent's substreams, whatever
    /// the other substreams brought), else live (`None`: the parent sends a starting
    /// viewer its back-fill).
    pub fn resume_from(&self) -> Option<u64> {
        self.sched.play_next()
    }

    /// Our buffer map now.
    pub fn buffer_map(&self) -> BufferMap {
        self.sched.buffer_map()
    }

    /// The shortest interval between two of the scheduler's periodic checks (real time
    /// at the nominal rate).
    pub fn tick_interval(&self) -> Duration {
        self.sched.tick_interval()
    }

    /// Who feeds `substream` now (`None`: a re-search is under way, or out of range).
    pub fn parent(&self, substream: u16) -> Option<Parent> {
        self.parents.get(usize::from(substream)).copied().flatten()
    }

    /// Child-slot accounting.
    pub fn slots(&self) -> &ChildSlots {
        &self.slots
    }

    /// Failed and banned peers.
    pub fn memory(&self) -> &ParentMemory {
        &self.memory
    }

    /// The upload bucket.
    pub fn bucket(&self) -> &UploadBucket {
        &self.bucket
    }

    /// The play clock's rate (stream time over real time).
    pub fn clock_rate(&self) -> f64 {
        self.clock.rate()
    }

    /// When [`Peer::handle_timeout`] must be called next (real time), if ever.
    pub fn next_timeout(&mut self, now: Duration) -> Option<Duration> {
        let t = self.read(now);
        self.sched.next_timeout(t).map(|t| self.clock.real_at(t))
    }

    // ----- events --------------------------------------------------------------------

    /// The timeout passed (or any periodic wake-up).
    pub fn handle_timeout(&mut self, now: Duration) {
        let t = self.read(now);
        self.sched.tick(t);
    }

    /// Chunk `seq` arrived from `from`; `wire_len` bytes go out when it is sent on,
    /// `timestamp_ms` is its cut time (0 = unknown). `true` if it is new (the driver
    /// keeps its bytes while [`Peer::has`] says so).
    pub fn handle_chunk(
        &mut self,
        seq: u64,
        from: Source,
        wire_len: u64,
        timestamp_ms: u64,
        now: Duration,
    ) -> bool {
        self.now = self.now.max(now);
        let ahead = self.clock.observe(seq, timestamp_ms, now);
        let t = self.read(now);
        if let Some(ahead) = ahead {
            self.sched.delay_schedule(ahead);
        }
        if !self.sched.on_chunk(seq, from, t) {
            return false;
        }
        self.held.insert(seq, wire_len);
        while let Some((&first, _)) = self.held.first_key_value() {
            if self.sched.has(first) {
                break;
            }
            self.held.pop_first();
        }
        true
    }

    /// A neighbour's buffer map.
    pub fn handle_buffer_map(&mut self, from: PeerId, map: BufferMap, now: Duration) {
        let t = self.read(now);
        self.sched.on_buffer_map(from, map, t);
    }

    /// `from` asks for chunk `seq`.
    pub fn handle_request(&mut self, from: PeerId, seq: u64, now: Duration) {
        self.now = self.now.max(now);
        self.sched.on_request(from, seq);
    }

    /// `from` does not have `seq` (an answer to our request, or a chunk that failed
    /// its check: the request is free to go elsewhere).
    pub fn handle_not_found(&mut self, from: PeerId, seq: u64, now: Duration) {
        let t = self.read(now);
        self.sched.on_not_found(from, seq, t);
    }

    /// The parent of `seq`'s substream announced it skipped that push.
    pub fn handle_parent_skipped(&mut self, seq: u64, now: Duration) {
        let t = self.read(now);
        self.sched.on_parent_skipped(seq, t);
    }

    /// `substream` is fed by `parent` from now on (`None`: it is gone, a re-search is
    /// under way). A parent naming us is the data plane. The driver calls this when its
    /// view of the parent changed (also to the same peer at a new address: the
    /// scheduler's checks of the parent restart).
    pub fn set_parent(&mut self, substream: u16, parent: Option<Parent>, now: Duration) {
        let i = usize::from(substream);
        let parent = match parent {
            Some(Parent::Peer(id)) if id == self.me => Some(Parent::Server),
            p => p,
        };
        if i >= self.parents.len() {
            return;
        }
        let t = self.read(now);
        self.sched.on_parent_changed(substream, parent, t);
        self.parents[i] = parent;
    }

    /// Whether a child asking for `mask` fits our slots when the other children hold
    /// `others_used` subscriptions (`ticketed`: tickets were checked, twice the slots).
    pub fn child_fits(&self, mask: u64, others_used: u32, ticketed: bool) -> bool {
        self.slots.fits(mask, others_used, ticketed)
    }

    /// Child `child` subscribed to `mask` (≠ 0), from `start` (`None`: live, a viewer
    /// starting up; see [`PeerScheduler::on_child_added`] for what it is sent at once).
    pub fn add_child(&mut self, child: PeerId, mask: u64, start: Option<u64>) {
        let subs: Vec<u16> = (0..self.k).filter(|s| mask & (1u64 << s) != 0).collect();
        // A new mask replaces the old one in the slot count too.
        if let Some(old) = self.children.get(&child) {
            self.slots.remove(old.mask);
        }
        self.slots.add(mask);
        self.sched.on_child_added(child, &subs, start);
        self.children.entry(child).or_default().mask = mask;
        self.children_changed = true;
    }

    /// Child `child` let go of all its substreams (its pacing is kept until
    /// [`Peer::link_closed`]).
    pub fn remove_child(&mut self, child: PeerId) {
        if let Some(c) = self.children.get_mut(&child) {
            self.slots.remove(c.mask);
            c.mask = 0;
            self.children_changed = true;
        }
        self.sched.on_child_removed(child, &[]);
    }

    /// `neighbour` joined our mesh.
    pub fn add_neighbour(&mut self, neighbour: PeerId) {
        self.sched.on_neighbour_added(neighbour);
    }

    /// `neighbour` left our mesh.
    pub fn remove_neighbour(&mut self, neighbour: PeerId) {
        self.sched.on_neighbour_removed(neighbour);
    }

    /// Child `child` relays `substreams` (a mask, from its `RELAYING` frame) on to
    /// children of its own: it is pushed those before children that do not.
    pub fn set_child_relaying(&mut self, child: PeerId, substreams: u64) {
        self.sched.on_child_relaying(child, substreams);
    }

    /// The substreams this peer relays on to children of its own (what its parents
    /// are told, so that they push to it first).
    pub fn relaying(&self) -> u64 {
        self.children.values().fold(0, |m, c| m | c.mask)
    }

    /// The link keyed `key` is gone for good: forget its pacing.
    pub fn link_closed(&mut self, key: PeerId) {
        self.sched.on_link_closed(key);
        self.children_changed = true;
        if let Some(c) = self.children.remove(&key)
            && c.mask != 0
        {
            self.slots.remove(c.mask);
            self.sched.on_child_removed(key, &[]);
        }
    }

    /// `len` bytes of a [`PeerAction::Send`] were queued.
    pub fn on_uploaded(&mut self, len: u64) {
        self.bucket.spend(len as f64);
    }

    /// New child slots from a (re-)join (ignored when not relaying).
    pub fn set_child_slots(&mut self, slots: u32) {
        self.slots.set_slots(slots);
    }

    /// The uplink drains only `kbps`: pacing, budget and slots are lowered. Returns
    /// the new slots; while [`ChildSlots::over`], the driver closes children (newest
    /// first) and reports each with [`Peer::link_closed`].
    pub fn lower_budget(&mut self, kbps: u32) -> u32 {
        self.bucket.set_rate(kbps);
        self.slots.lower_budget(kbps)
    }

    /// The link to parent `id` failed at `now`: it is not re-adopted from an
    /// assignment for [`super::FAILED_PARENT_MEMORY`].
    pub fn parent_failed(&mut self, id: PeerId, now: Duration) {
        self.now = self.now.max(now);
        self.memory.failed(id, now);
    }

    /// Forgets parent failures older than [`super::FAILED_PARENT_MEMORY`] (call before
    /// applying an assignment).
    pub fn forget_old_failures(&mut self, now: Duration) {
        self.now = self.now.max(now);
        self.memory.forget_old(now);
    }

    /// `id` sent a bad chunk: never a parent or neighbour again.
    pub fn ban(&mut self, id: PeerId) {
        self.memory.ban(id);
    }

    /// Re-search `substream` excluding `exclude`: the exclude list to send (banned
    /// peers added), or `None` when a re-search of it is already under way.
    pub fn research(&mut self, substream: u16, exclude: Vec<PeerId>) -> Option<Vec<PeerId>> {
        let r = self.researching.get_mut(usize::from(substream))?;
        if *r {
            return None;
        }
        *r = true;
        Some(self.memory.exclude_list(exclude))
    }

    /// The re-search of `substream` was answered (whatever the answer).
    pub fn research_answered(&mut self, substream: u16) {
        if let Some(r) = self.researching.get_mut(usize::from(substream)) {
            *r = false;
        }
    }

    /// A re-join: our id may have changed, and our old parents' tickets are void.
    pub fn rejoined(&mut self, me: PeerId, child_slots: u32) {
        self.me = me;
        self.set_child_slots(child_slots);
    }

    // ----- actions -------------------------------------------------------------------

    fn refill(&mut self) {
        if self.refill_due {
            let dt = self.now.saturating_sub(self.last_refill).as_secs_f64();
            self.last_refill = self.now;
            self.bucket.refill(dt);
            self.refill_due = false;
        }
    }

    /// The next decision, if any.
    pub fn poll_action(&mut self) -> Option<PeerAction> {
        if self.children_changed {
            self.children_changed = false;
            let relaying = self.relaying();
            if relaying != self.told_relaying {
                self.told_relaying = relaying;
                return Some(PeerAction::Relaying {
                    substreams: relaying,
                });
            }
        }
        loop {
            let Some(a) = self.sched.poll_action() else {
                self.refill_due = true;
                return None;
            };
            let out = match a {
                Action::Push { child, seq } => {
                    self.refill();
                    let Some(&len) = self.held.get(&seq) else {
                        continue;
                    };
                    let Some(c) = self.children.get_mut(&child) else {
                        continue;
                    };
                    // Pushes are paced per child (each its share of the budget, so the
                    // skips of a partly covered slot fall evenly on the children).
                    let allowed = c.pace.allow(
                        self.bucket.rate_bytes(),
                        c.mask.count_ones(),
                        self.slots.used(),
                        len as f64,
                        self.now,
                    );
                    if allowed {
                        PeerAction::Send {
                            to: child,
                            seq,
                            push: true,
                        }
                    } else {
                        PeerAction::NotFound { to: child, seq }
                    }
                }
                Action::Serve { to, seq } => {
                    self.refill();
                    match self.held.get(&seq) {
                        // Serves spend only what pushes leave of the whole budget.
                        Some(&len) if self.bucket.allows(false, len as f64) => PeerAction::Send {
                            to,
                            seq,
                            push: false,
                        },
                        _ => PeerAction::NotFound { to, seq },
                    }
                }
                Action::NotFound { to, seq } => PeerAction::NotFound { to, seq },
                Action::Request { neighbour, seq } => PeerAction::Request { neighbour, seq },
                Action::RequestFromServer { seq } => PeerAction::RequestFromServer { seq },
                Action::SendBufferMap { to, map } => PeerAction::SendBufferMap { to, map },
                Action::ReSearch { substream, exclude } => {
                    PeerAction::ReSearch { substream, exclude }
                }
                Action::ReportParent {
                    substream,
                    parent,
                    missed,
                    window,
                } => PeerAction::ReportParent {
                    substream,
                    parent,
                    missed,
                    window,
                },
                Action::Play { seq } => PeerAction::Play { seq },
                Action::Skip { seq } => PeerAction::Skip { seq },
            };
            return Some(out);
        }
    }
}

#[cfg(test)]
impl Peer {
    /// Test hook (the simulator's deadline checks): whether the scheduler's
    /// `next_timeout` is its periodic fallback at `now`.
    pub(crate) fn ticks_periodically(&mut self, now: Duration) -> bool {
        let t = self.read(now);
        self.sched.ticks_periodically(t)
    }
}
