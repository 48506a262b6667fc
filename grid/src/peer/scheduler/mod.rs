//! [`PeerScheduler`]: one peer's push, pull, play-out and quality decisions.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::buffer_map::{BufferMap, MAX_BUFFER_MAP_BITS};
use super::delivery::DeliveryWindow;
use crate::{Parent, PeerId};

mod api;
mod catch_up;
pub use api::{Action, SchedulerConfig, SchedulerError, SchedulerStats, Source};

#[derive(Debug, Default, Clone)]
struct Repair {
    tried: Vec<PeerId>,
    server_tries: u8,
    /// Neighbours asked within the server lead.
    late_tries: u8,
    /// In flight: to a neighbour (`Some`) or the server (`None`), until the deadline.
    outstanding: Option<(Option<PeerId>, i64)>,
}

#[derive(Debug, Default, Clone)]
struct Neighbour {
    map: Option<BufferMap>,
    /// When `map` arrived, and the newest chunk it held if its last `K` chunks were
    /// all held (a neighbour whose every substream was flowing): from these, chunks
    /// newer than the map are predicted (see [`Neighbour::predicts`]).
    map_at_ms: i64,
    flowing_newest: Option<u64>,
    outstanding: usize,
}

impl Neighbour {
    /// True if this neighbour's last map holds `seq`, or if `seq` is newer than the map
    /// and the neighbour, flowing when it sent the map, has most likely received it
    /// since: one chunk per chunk duration after the map's newest. Buffer maps can then
    /// go out every few chunks instead of every chunk (they were most of an idle peer's
    /// messages); a wrong guess costs one NOT_FOUND round trip.
    fn predicts(&self, seq: u64, now_ms: i64, d_ms: i64) -> (bool, bool) {
        let actual = self.map.as_ref().is_some_and(|m| m.contains(seq));
        let predicted = !actual
            && self.flowing_newest.is_some_and(|n| {
                seq > n
                    && i64::try_from(seq - n)
                        .ok()
                        .and_then(|ahead| ahead.checked_mul(d_ms))
                        .is_some_and(|due| self.map_at_ms.saturating_add(due) <= now_ms)
            });
        (actual, predicted)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Substream {
    parent: Option<Parent>,
    strikes: u32,
    last_seq: Option<u64>,
    since_ms: i64,
    research_at: Option<i64>,
    /// Re-searches in a row, each within `FLAP_WINDOW_RETRIES` retries of the previous.
    flaps: u32,
    /// The parent's last word on this substream was a skipped push.
    skipped_last: bool,
    /// What the parent did with the chunks it owed (since it was assigned).
    delivery: DeliveryWindow,
    /// This parent was reported for non-delivery.
    reported: bool,
    /// `arrival − seq·d` of the parent's last [`ARRIVALS`] in-order chunks (a ring):
    /// how far behind the source this substream runs (see
    /// [`PeerScheduler::catch_up_target`]).
    arrivals: [i64; ARRIVALS],
    arrivals_len: u8,
    arrivals_next: u8,
}

/// Recent parent arrivals per substream that say where it runs (see
/// [`PeerScheduler::catch_up_target`]).
const ARRIVALS: usize = 6;

/// A re-search this many [`SchedulerConfig::research_retry`]s after the previous one
/// starts the back-off afresh.
const FLAP_WINDOW_RETRIES: i64 = 6;

/// One peer's scheduling state machine (sans-IO): feed it events with `now`, drain
/// [`Action`]s. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct PeerScheduler {
    cfg: SchedulerConfig,
    k: u64,
    d_ms: i64,
    /// Earliest observed `arrival − seq·d`: when seq 0 would have become available.
    live_base: Option<i64>,
    /// The play-out schedule, fixed when playing starts.
    play_base: Option<i64>,
    play_next: Option<u64>,
    /// A chunk was played or skipped: the schedule is fixed from then on. Until then it
    /// follows the live estimate, and older chunks (a start-up burst arriving out of
    /// order from the data plane and parents) can still become the first one played.
    started: bool,
    newest: Option<u64>,
    have: BTreeSet<u64>,
    repairs: BTreeMap<u64, Repair>,
    /// Chunks a parent skipped, and when: repaired at once rather than at the repair
    /// lead, so that the repair reaches this peer's own subtree (by push) well before
    /// its deadline.
    urgent: BTreeMap<u64, i64>,
    outstanding: usize,
    neighbours: BTreeMap<PeerId, Neighbour>,
    children: BTreeMap<PeerId, u64>,
    /// Per child: the substreams it relays on to children of its own (what it last
    /// said; pushed to first, see [`PeerScheduler::on_child_relaying`]).
    relaying: BTreeMap<PeerId, u64>,
    subs: Vec<Substream>,
    next_map_at: i64,
    /// When the neighbours were last sent a map, and the newest chunk of that map if
    /// this peer was flowing then (its last `K` chunks held): what they predict from.
    map_sent_at: i64,
    map_sent_flowing: Option<u64>,
    /// When the play-out schedule last moved earlier, or found nothing to catch up.
    caught_up_at: Option<i64>,
    /// When `tick` last ran: the periodic fallback of `next_timeout` counts from it
    /// (counting from each event instead would let a busy link postpone it forever).
    last_tick_ms: Option<i64>,
    actions: VecDeque<Action>,
    stats: SchedulerStats,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl PeerScheduler {
    /// A scheduler with no parents, children or neighbours yet.
    ///
    /// # Errors
    /// [`SchedulerError::InvalidConfig`] for `substreams` outside 1..=64, a zero chunk
    /// duration, a window outside 1..=1024 or `server_lead > repair_lead`.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, SchedulerError> {
        if cfg.substreams == 0 || cfg.substreams > 64 {
            return Err(SchedulerError::InvalidConfig(
                "substreams must be in 1..=64",
            ));
        }
        if cfg.chunk_duration.is_zero() {
            return Err(SchedulerError::InvalidConfig("chunk_duration must be > 0"));
        }
        if cfg.window == 0 || cfg.window > MAX_BUFFER_MAP_BITS {
            return Err(SchedulerError::InvalidConfig("window must be in 1..=1024"));
        }
        if cfg.server_lead > cfg.repair_lead {
            return Err(SchedulerError::InvalidConfig(
                "server_lead must not exceed repair_lead",
            ));
        }
        if cfg.parent_window == 0 || cfg.parent_window > 64 {
            return Err(SchedulerError::InvalidConfig(
                "parent_window must be in 1..=64",
            ));
        }
        Ok(PeerScheduler {
            k: u64::from(cfg.substreams),
            d_ms: ms(cfg.chunk_duration).max(1),
            cfg,
            live_base: None,
            play_base: None,
            play_next: None,
            started: false,
            newest: None,
            have: BTreeSet::new(),
            repairs: BTreeMap::new(),
            urgent: BTreeMap::new(),
            outstanding: 0,
            neighbours: BTreeMap::new(),
            children: BTreeMap::new(),
            relaying: BTreeMap::new(),
            subs: vec![Substream::default(); usize::from(cfg.substreams)],
            next_map_at: 0,
            map_sent_at: 0,
            map_sent_flowing: None,
            last_tick_ms: None,
            caught_up_at: None,
            actions: VecDeque::new(),
            stats: SchedulerStats::default(),
        })
    }

    /// The next decision, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Counters so far.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// True if chunk `seq` is held (its payload must be kept by the caller).
    pub fn has(&self, seq: u64) -> bool {
        self.have.contains(&seq)
    }

    /// The newest chunk held.
    pub fn newest(&self) -> Option<u64> {
        self.newest
    }

    /// The next sequence number to be played, once playing has started.
    pub fn play_next(&self) -> Option<u64> {
        self.play_next
    }

    /// The current buffer map (the window behind the newest chunk held).
    pub fn buffer_map(&self) -> BufferMap {
        let window = u64::from(self.cfg.window);
        let base = self
            .newest
            .map_or(0, |n| n.saturating_sub(window.saturating_sub(1)));
        let mut map = BufferMap::new(base, self.cfg.window);
        for &s in self.have.range(base..) {
            map.set(s);
        }
        map
    }

    /// A chunk arrived (already verified). Returns true if it is new, i.e. the caller
    /// must store its payload; false for a duplicate or a chunk too late to play.
    pub fn on_chunk(&mut self, seq: u64, from: Source, now: Duration) -> bool {
        let now_ms = ms(now);
        let seq_ms = i64::try_from(seq)
            .unwrap_or(i64::MAX)
            .saturating_mul(self.d_ms);
        let avail = now_ms.saturating_sub(seq_ms);
        self.live_base = Some(self.live_base.map_or(avail, |b| b.min(avail)));
        if let Source::Parent(s) = from
            && u64::from(s) == seq % self.k
        {
            self.monitor_parent(s, seq, now_ms);
        }
        let too_far = self
            .newest
            .is_some_and(|n| seq > n.saturating_add(4 * u64::from(self.cfg.window)));
        let behind_window = self
            .newest
            .is_some_and(|n| seq.saturating_add(u64::from(self.cfg.window)) <= n);
        let passed = if self.started {
            self.play_next.is_some_and(|p| seq < p)
        } else {
            behind_window
        };
        if passed || self.have.contains(&seq) || too_far {
            self.stats.duplicates += 1;
            return false;
        }
        self.have.insert(seq);
        if self.newest.is_none_or(|n| seq > n) {
            self.newest = Some(seq);
        }
        let floor = self
            .newest
            .map_or(0, |n| n.saturating_sub(u64::from(self.cfg.window) - 1));
        while self.have.first().is_some_and(|&f| f < floor) {
            self.have.pop_first();
        }
        if let Some(r) = self.repairs.remove(&seq) {
            self.cancel(r);
        }
        match from {
            Source::Parent(_) => self.stats.from_parent += 1,
            Source::Neighbour(_) => self.stats.from_neighbour += 1,
            Source::Server => self.stats.from_server += 1,
        }
        // Children that relay this substream on first: on an uplink that sends one copy
        // after another, the chunk then reaches their subtrees a few copies earlier,
        // and every hop's wait adds up down the tree; a leaf waits the same either way.
        let bit = 1u64 << (seq % self.k);
        for first in [true, false] {
            for (&child, &mask) in &self.children {
                let relays = self.relaying.get(&child).is_some_and(|r| r & bit != 0);
                if mask & bit != 0 && relays == first {
                    self.actions.push_back(Action::Push { child, seq });
                    self.stats.pushed += 1;
                }
            }
        }
        true
    }

    /// A neighbour's buffer map arrived. Maps from peers that are not neighbours are
    /// ignored.
    pub fn on_buffer_map(&mut self, neighbour: PeerId, map: BufferMap, now: Duration) {
        let flowing = self.flowing_newest(&map);
        if let Some(n) = self.neighbours.get_mut(&neighbour) {
            n.flowing_newest = flowing;
            n.map_at_ms = ms(now);
            n.map = Some(map);
        }
    }

    /// The control plane assigned `parent` to `substream` (`None`: no parent).
    pub fn on_parent_changed(&mut self, substream: u16, parent: Option<Parent>, now: Duration) {
        if let Some(sub) = self.subs.get_mut(usize::from(substream)) {
            sub.parent = parent;
            sub.strikes = 0;
            sub.skipped_last = false;
            sub.delivery = DeliveryWindow::default();
            sub.reported = false;
            sub.since_ms = ms(now);
            sub.arrivals_len = 0;
            // `research_at` is kept: the next re-search of this substream waits out the
            // back-off from the last one (mesh repair covers the gap meanwhile).
        }
    }

    /// A child subscribed to `substreams`, from `start` (`None`: live, a viewer
    /// starting up). What it lacks of the last [`SchedulerConfig::start_backfill`] (at
    /// least the newest held chunk of each of its substreams) is pushed to it at once:
    /// a starting viewer's first second or so of stream, or what a re-parented child
    /// missed meanwhile. Older gaps are left to its mesh repair, so as not to flood this
    /// peer's uplink.
    pub fn on_child_added(&mut self, child: PeerId, substreams: &[u16], start: Option<u64>) {
        let mask = self.mask(substreams);
        *self.children.entry(child).or_insert(0) |= mask;
        let backfill = u64::try_from(ms(self.cfg.start_backfill).div_euclid(self.d_ms.max(1)))
            .unwrap_or(0)
            .min(u64::from(self.cfg.window));
        let span = backfill.max(self.k);
        let oldest = self
            .newest
            .map_or(0, |n| n.saturating_sub(span - 1))
            .max(self.play_next.unwrap_or(0));
        let from = start.map_or(oldest, |s| s.max(oldest));
        for &seq in self.have.range(from..) {
            if mask & (1u64 << (seq % self.k)) != 0 {
                self.actions.push_back(Action::Push { child, seq });
                self.stats.pushed += 1;
            }
        }
    }

    /// A child unsubscribed from `substreams` (an empty slice: from all; it is gone).
    pub fn on_child_removed(&mut self, child: PeerId, substreams: &[u16]) {
        let mask = if substreams.is_empty() {
            u64::MAX
        } else {
            self.mask(substreams)
        };
        if let Some(m) = self.children.get_mut(&child) {
            *m &= !mask;
            if *m == 0 {
                self.children.remove(&child);
            }
        }
    }

    /// Child `child` says it relays `substreams` (a mask) on to children of its own:
    /// its pushes of those go out before those of children that do not. Bits of
    /// substreams it is no child in are kept but unused (a child that changes its mask
    /// is removed and added again, and keeps them) until
    /// [`PeerScheduler::on_link_closed`].
    pub fn on_child_relaying(&mut self, child: PeerId, substreams: u64) {
        if !self.children.contains_key(&child) {
            return;
        }
        if substreams == 0 {
            self.relaying.remove(&child);
        } else {
            self.relaying.insert(child, substreams);
        }
    }

    /// The link keyed `key` is gone for good: what it said it relays is forgotten.
    pub fn on_link_closed(&mut self, key: PeerId) {
        self.relaying.remove(&key);
    }

    /// A mesh neighbour was added; it is sent a buffer map at once.
    pub fn on_neighbour_added(&mut self, neighbour: PeerId) {
        self.neighbours.entry(neighbour).or_default();
        // A map that shows this peer not flowing predicts nothing, but then the next
        // periodic check sends to all anyway.
        let map = self.buffer_map();
        self.actions
            .push_back(Action::SendBufferMap { to: neighbour, map });
    }

    /// A mesh neighbour is gone; requests in flight to it are retried elsewhere.
    pub fn on_neighbour_removed(&mut self, neighbour: PeerId) {
        if self.neighbours.remove(&neighbour).is_none() {
            return;
        }
        for r in self.repairs.values_mut() {
            if matches!(r.outstanding, Some((Some(n), _)) if n == neighbour) {
                r.outstanding = None;
                r.tried.push(neighbour);
                self.outstanding -= 1;
            }
        }
    }

    /// A peer asked for chunk `seq`: answered with [`Action::Serve`] or
    /// [`Action::NotFound`].
    pub fn on_request(&mut self, from_peer: PeerId, seq: u64) {
        self.actions.push_back(if self.have.contains(&seq) {
            Action::Serve { to: from_peer, seq }
        } else {
            Action::NotFound { to: from_peer, seq }
        });
    }

    /// The parent of `seq`'s substream skipped its push (it is over its upload budget:
    /// a partly covered slot). The parent is not silent for it; the chunk is repaired
    /// like any missing one. Two skips in a row count as a late chunk against the
    /// parent (a parent sharing its budget fairly skips a child at most every other
    /// push).
    pub fn on_parent_skipped(&mut self, seq: u64, now: Duration) {
        let now_ms = ms(now);
        // A notice for a chunk already played or skipped, or beyond the window ahead of
        // the newest held, is not about a push this parent owes (a peer could send any
        // seq): it must not move the silence check or queue a repair.
        let passed = self.play_next.is_some_and(|p| seq < p);
        let too_far = self
            .newest
            .is_some_and(|n| seq > n.saturating_add(u64::from(self.cfg.window)));
        if passed || too_far {
            return;
        }
        let s = usize::try_from(seq % self.k).unwrap_or(0);
        let Some(sub) = self.subs.get_mut(s) else {
            return;
        };
        if sub.parent.is_none() {
            return;
        }
        self.stats.parent_skips += 1;
        if sub.last_seq.is_none_or(|l| seq > l) {
            sub.last_seq = Some(seq);
        }
        if sub.skipped_last {
            sub.strikes += 1;
        }
        sub.skipped_last = true;
        let strikes = sub.strikes;
        self.record_delivery(s as u16, seq, true, now_ms);
        if strikes >= self.cfg.late_strikes {
            self.research(s as u16, now_ms);
        }
        if !self.have.contains(&seq) && self.urgent.len() < usize::from(self.cfg.window) {
            self.urgent.entry(seq).or_insert(now_ms);
            self.request_urgent(now_ms);
        }
    }

    /// A neighbour answered a request with not-found: it is retried elsewhere.
    pub fn on_not_found(&mut self, from_peer: PeerId, seq: u64, _now: Duration) {
        if let Some(r) = self.repairs.get_mut(&seq)
            && matches!(r.outstanding, Some((Some(n), _)) if n == from_peer)
        {
            r.outstanding = None;
            r.tried.push(from_peer);
            self.outstanding -= 1;
            if let Some(n) = self.neighbours.get_mut(&from_peer) {
                n.outstanding = n.outstanding.saturating_sub(1);
            }
        }
    }

    /// Advances time: play-out decisions, parent quality checks, request timeouts and
    /// new requests, periodic buffer maps. Call it by [`PeerScheduler::next_timeout`]
    /// (or at least every [`PeerScheduler::tick_interval`]).
    pub fn tick(&mut self, now: Duration) {
        let now_ms = ms(now);
        self.last_tick_ms = Some(now_ms);
        self.play_out(now_ms);
        self.check_parents(now_ms);
        self.expire_requests(now_ms);
        self.request_missing(now_ms);
        self.request_urgent(now_ms);
        if now_ms >= self.next_map_at && !self.neighbours.is_empty() {
            self.next_map_at = now_ms.saturating_add(ms(self.cfg.buffer_map_interval));
            let map = self.buffer_map();
            let flowing = self.flowing_newest(&map);
            let refresh = self
                .map_sent_at
                .saturating_add(ms(self.cfg.buffer_map_refresh));
            if now_ms >= refresh || !self.predicted_since(flowing) {
                for &to in self.neighbours.keys() {
                    self.actions.push_back(Action::SendBufferMap {
                        to,
                        map: map.clone(),
                    });
                }
                self.stats.buffer_maps_sent += 1;
                self.map_sent_at = now_ms;
                self.map_sent_flowing = flowing;
            }
        }
    }

    /// When [`PeerScheduler::tick`] must be called next (on the caller's clock), given
    /// that it was last called, or an event handled, at `now`; `None` while there is
    /// nothing to wait for (no chunk yet). Ticking earlier or more often is harmless;
    /// ticking later delays play-out, repairs and parent checks.
    ///
    /// Exact for what a steady peer waits on: the next play-out deadline, the moment
    /// the first missing chunk enters the repair lead, a parent's silence and the
    /// buffer-map check. Until the first chunk is played, and while repairs are in
    /// progress (requests in flight, skipped chunks, a missing chunk inside the repair
    /// lead), it asks for a tick every
    /// [`PeerScheduler::tick_interval`], as a fixed ticker would. Call it again after
    /// every event: a chunk or a map can make a deadline earlier.
    pub fn next_timeout(&self, now: Duration) -> Option<Duration> {
        self.wake(ms(now))
            .0
            .map(|t| Duration::from_millis(u64::try_from(t).unwrap_or(0)))
    }

    /// [`PeerScheduler::next_timeout`] in ms, and whether it is the periodic fallback
    /// (start-up, or repairs in progress) rather than exact.
    fn wake(&self, now_ms: i64) -> (Option<i64>, bool) {
        let step = self
            .last_tick_ms
            .map_or(now_ms, |t| t.saturating_add(self.tick_interval_ms()))
            .max(now_ms);
        let mut at: Option<i64> = None;
        let mut consider = |t: i64| at = Some(at.map_or(t, |a: i64| a.min(t)));
        if !self.neighbours.is_empty() {
            consider(self.next_map_at);
        }
        let (Some(base), Some(start), true) = (self.judge_base(), self.play_next, self.started)
        else {
            // Start-up: the schedule follows the live estimate until the first chunk is
            // played; tick as a fixed ticker would (gaps in the start-up burst are
            // repaired before the first deadline).
            if let (Some(b), Some(&first)) = (self.live_base, self.have.first()) {
                consider(step);
                consider(
                    b.saturating_add(self.seq_ms(first))
                        .saturating_add(ms(self.cfg.target_lag)),
                );
                return (at, true);
            }
            return (at, false);
        };
        let periodic = !self.repairs.is_empty() || !self.urgent.is_empty();
        if periodic {
            consider(step);
        }
        // Play-out: the next deadline.
        if let Some(d) = self.deadline(start) {
            consider(d);
        }
        // Repair: the first chunk not held enters the repair lead.
        let mut first_missing = start;
        for &h in self.have.range(start..) {
            if h != first_missing {
                break;
            }
            first_missing += 1;
        }
        let mut open_now = false;
        if let Some(d) = self.deadline(first_missing) {
            let open = d.saturating_sub(ms(self.cfg.repair_lead));
            open_now = open <= now_ms;
            consider(if open_now { step } else { open });
        }
        // Parents: the silence check of each substream (as `check_parents`).
        let silence = ms(self.cfg.silence_timeout);
        for (s, sub) in self.subs.iter().enumerate() {
            if sub.parent.is_none() {
                continue;
            }
            let (next, expected) = self.owed(s as u64, sub, base, start);
            let gate = sub.research_at.map_or(i64::MIN, |t| {
                t.saturating_add(self.research_wait(sub.flaps))
            });
            let t = expected.saturating_add(silence).saturating_add(1).max(gate);
            if t > now_ms {
                consider(t);
            } else if self.available_elsewhere(next) {
                consider(now_ms);
            }
        }
        (at, periodic || open_now)
    }

    /// The fallback tick period while repairs are in progress: a quarter chunk, 10 to
    /// 250 ms.
    pub fn tick_interval(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.tick_interval_ms()).unwrap_or(10))
    }

    fn tick_interval_ms(&self) -> i64 {
        (self.d_ms / 4).clamp(10, 250)
    }

    /// The newest chunk of `map` if its last `K` chunks are all held (the rule
    /// neighbours apply in [`PeerScheduler::on_buffer_map`]).
    fn flowing_newest(&self, map: &BufferMap) -> Option<u64> {
        let k = self.k;
        map.iter().last().filter(|&top| {
            top.checked_sub(k - 1)
                .is_some_and(|lo| (lo..=top).all(|s| map.contains(s)))
        })
    }

    /// True if what the neighbours predict from the last map sent (every chunk after
    /// its newest, this peer being flowing) is still true: this peer is flowing now
    /// (`flowing`) and holds every chunk since that map. Chunks it repaired since are
    /// then unknown to them, which only makes them ask elsewhere.
    fn predicted_since(&self, flowing: Option<u64>) -> bool {
        match (self.map_sent_flowing, flowing) {
            (Some(sent), Some(now)) if now >= sent => {
                let from = sent
                    .saturating_add(1)
                    .max(now.saturating_sub(u64::from(self.cfg.window).saturating_sub(1)));
                (from..=now).all(|s| self.have.contains(&s))
            }
            _ => false,
        }
    }

    // ----- internals -------------------------------------------------------------------

    fn mask(&self, substreams: &[u16]) -> u64 {
        substreams
            .iter()
            .filter(|&&s| u64::from(s) < self.k)
            .fold(0, |m, &s| m | (1u64 << s))
    }

    /// Where parents are judged from (a chunk's lateness, a substream's silence): the
    /// play-out base once playing, the live base before. Not the live base for good:
    /// that is the earliest `arrival − seq·d` ever seen, and one chunk that comes
    /// straight from the source (a repair from the data plane, a neighbour high in its
    /// tree) moves it for the rest of the session. Every parent in a deep tree would
    /// then look late, be re-searched and reported, its children fall back on repairs
    /// from the data plane, which bring more such early chunks to more peers: the
    /// server's share crept up for minutes before this (issue 16's ten-minute run).
    fn judge_base(&self) -> Option<i64> {
        self.play_base.or(self.live_base)
    }

    fn seq_ms(&self, seq: u64) -> i64 {
        i64::try_from(seq)
            .unwrap_or(i64::MAX)
            .saturating_mul(self.d_ms)
    }

    fn deadline(&self, seq: u64) -> Option<i64> {
        Some(
            self.play_base?
                .saturating_add(self.seq_ms(seq))
                .saturating_add(ms(self.cfg.target_lag)),
        )
    }

    fn cancel(&mut self, r: Repair) {
        if let Some((who, _)) = r.outstanding {
            self.outstanding -= 1;
            if let Some(n) = who.and_then(|w| self.neighbours.get_mut(&w)) {
                n.outstanding = n.outstanding.saturating_sub(1);
            }
        }
    }

    fn monitor_parent(&mut self, s: u16, seq: u64, now_ms: i64) {
        let late_ms = ms(self.cfg.late_threshold);
        let lateness = self.judge_base().map_or(0, |b| {
            now_ms.saturating_sub(b.saturating_add(self.seq_ms(seq)))
        });
        let strikes_needed = self.cfg.late_strikes;
        // Late only counts against the parent if the chunk could be had elsewhere first
        // (already held from a repair, or in a neighbour's buffer map): when the whole
        // grid is late (the source, the data plane or this machine's CPU), changing
        // parents cannot help and would only add load.
        let elsewhere = lateness > late_ms && self.available_elsewhere(seq);
        let avail = now_ms.saturating_sub(self.seq_ms(seq));
        let sub = &mut self.subs[usize::from(s)];
        if sub.last_seq.is_none_or(|l| seq > l) {
            sub.last_seq = Some(seq);
            sub.record_arrival(avail);
        }
        sub.skipped_last = false;
        if elsewhere {
            sub.strikes += 1;
        } else {
            sub.strikes = 0;
        }
        let strikes = sub.strikes;
        self.record_delivery(s, seq, elsewhere, now_ms);
        if strikes >= strikes_needed {
            self.research(s, now_ms);
        }
    }

    /// Records what substream `s`'s peer parent did with chunk `seq` (`missed`: skipped
    /// or late), if it owed it; re-searches and reports the parent when the window
    /// holds more misses than allowed.
    fn record_delivery(&mut self, s: u16, seq: u64, missed: bool, now_ms: i64) {
        let since_seq = self.judge_base().map(|base| {
            let sub = &self.subs[usize::from(s)];
            u64::try_from((sub.since_ms.saturating_sub(base) + self.d_ms - 1).div_euclid(self.d_ms))
                .unwrap_or(0)
        });
        let (k, window, max) = (
            self.k,
            u32::from(self.cfg.parent_window),
            u32::from(self.cfg.parent_max_missed),
        );
        let sub = &mut self.subs[usize::from(s)];
        let Some(Parent::Peer(parent)) = sub.parent else {
            return;
        };
        // Chunks available before the parent was assigned are a bonus, not owed.
        if since_seq.is_none_or(|f| seq < f) {
            return;
        }
        sub.delivery.record(seq, missed, k);
        let Some(m) = sub.delivery.missed(window).filter(|&m| m > max) else {
            return;
        };
        if !sub.reported {
            sub.reported = true;
            self.actions.push_back(Action::ReportParent {
                substream: s,
                parent,
                missed: m,
                window,
            });
        }
        self.research(s, now_ms);
    }

    /// True if chunk `seq` is held already or some neighbour's buffer map has it.
    fn available_elsewhere(&self, seq: u64) -> bool {
        self.have.contains(&seq)
            || self
                .neighbours
                .values()
                .any(|n| n.map.as_ref().is_some_and(|m| m.contains(seq)))
    }

    /// How long after a re-search the next one of a substream with `flaps` may follow.
    fn research_wait(&self, flaps: u32) -> i64 {
        let retry = ms(self.cfg.research_retry);
        let max = ms(self.cfg.research_backoff_max).max(retry);
        retry.saturating_mul(1i64 << flaps.min(16)).min(max)
    }

    fn research(&mut self, s: u16, now_ms: i64) {
        let retry = ms(self.cfg.research_retry);
        let wait = self.research_wait(self.subs[usize::from(s)].flaps);
        let sub = &mut self.subs[usize::from(s)];
        if sub
            .research_at
            .is_some_and(|t| now_ms < t.saturating_add(wait))
        {
            return;
        }
        let flapping = sub.research_at.is_some_and(|t| {
            now_ms
                < t.saturating_add(retry.saturating_mul(FLAP_WINDOW_RETRIES))
                    .saturating_add(wait)
        });
        sub.flaps = if flapping {
            sub.flaps.saturating_add(1)
        } else {
            0
        };
        sub.research_at = Some(now_ms);
        let exclude = match sub.parent {
            Some(Parent::Peer(p)) => Some(p),
            _ => None,
        };
        self.actions.push_back(Action::ReSearch {
            substream: s,
            exclude,
        });
        self.stats.researches += 1;
    }

    fn play_out(&mut self, now_ms: i64) {
        self.catch_up(now_ms);
        if !self.started {
            // Until the first deadline the schedule follows the best estimate: the live
            // base only moves earlier as fresher chunks arrive, and the first chunk
            // played is the oldest held. So a start-up burst of the last second of
            // stream plays at once instead of waiting a whole target lag.
            match (self.live_base, self.have.first()) {
                (Some(b), Some(&first)) => {
                    self.play_base = Some(b);
                    self.play_next = Some(first);
                }
                _ => return,
            }
        }
        let Some(mut next) = self.play_next else {
            return;
        };
        let mut budget = 4 * u32::from(self.cfg.window);
        while budget > 0 && self.deadline(next).is_some_and(|d| d <= now_ms) {
            budget -= 1;
            self.actions.push_back(if self.have.contains(&next) {
                self.stats.played += 1;
                Action::Play { seq: next }
            } else {
                self.stats.skipped += 1;
                Action::Skip { seq: next }
            });
            next += 1;
            self.started = true;
        }
        self.play_next = Some(next);
        while let Some(entry) = self.repairs.first_entry() {
            if *entry.key() >= next {
                break;
            }
            let r = entry.remove();
            self.cancel(r);
        }
    }

    fn check_parents(&mut self, now_ms: i64) {
        let (Some(base), Some(start)) = (self.judge_base(), self.play_next) else {
            return;
        };
        let silence = ms(self.cfg.silence_timeout);
        for s in 0..self.subs.len() {
            let sub = self.subs[s];
            if sub.parent.is_none() {
                continue;
            }
            let (next, expected) = self.owed(s as u64, &sub, base, start);
            // Silent only if the chunk could be had elsewhere (see `monitor_parent`).
            if now_ms > expected.saturating_add(silence) && self.available_elsewhere(next) {
                self.research(s as u16, now_ms);
            }
        }
    }

    /// The next chunk substream `s`'s parent owes, and when it became available.
    fn owed(&self, s: u64, sub: &Substream, base: i64, start: u64) -> (u64, i64) {
        // The parent owes the chunks of its substream that became available after it
        // was assigned; older ones (a newest-chunk push on subscribe) are a bonus.
        // With K·chunk longer than the silence timeout, counting an older chunk
        // would call every new parent silent before its first due chunk.
        let since_seq = u64::try_from(
            (sub.since_ms.saturating_sub(base) + self.d_ms - 1).div_euclid(self.d_ms),
        )
        .unwrap_or(0);
        let from = sub
            .last_seq
            .map_or(start, |l| l + 1)
            .max(start)
            .max(since_seq);
        let next = from + (s + self.k - from % self.k) % self.k;
        let expected = base.saturating_add(self.seq_ms(next)).max(sub.since_ms);
        (next, expected)
    }

    fn expire_requests(&mut self, now_ms: i64) {
        for r in self.repairs.values_mut() {
            if let Some((who, until)) = r.outstanding
                && until <= now_ms
            {
                r.outstanding = None;
                self.outstanding -= 1;
                if let Some(w) = who {
                    r.tried.push(w);
                    if let Some(n) = self.neighbours.get_mut(&w) {
                        n.outstanding = n.outstanding.saturating_sub(1);
                    }
                }
            }
        }
    }

    fn request_missing(&mut self, now_ms: i64) {
        let (Some(base), Some(start)) = (self.live_base, self.play_next) else {
            return;
        };
        let live = u64::try_from(now_ms.saturating_sub(base) / self.d_ms).unwrap_or(0);
        let end = live.min(start.saturating_add(u64::from(self.cfg.window)));
        let repair_lead = ms(self.cfg.repair_lead);
        let server_lead = ms(self.cfg.server_lead);
        let mut seq = start;
        while seq <= end && self.outstanding < self.cfg.max_outstanding {
            let Some(deadline) = self.deadline(seq) else {
                return;
            };
            let lead = deadline.saturating_sub(now_ms);
            if lead > repair_lead {
                break;
            }
            if self.have.contains(&seq) {
                seq += 1;
                continue;
            }
            self.repair(seq, now_ms, lead <= server_lead);
            seq += 1;
        }
    }

    /// Requests missing chunk `seq` unless a request is in flight: from a neighbour
    /// whose map holds it first, then one predicted to hold it. Once `server` (within
    /// the server lead): one more neighbour whose map holds it, then the server (at
    /// most three times). At the last moment a prediction is not worth a request
    /// timeout, nor is a second neighbour: a neighbour holding the chunk still answers
    /// `NOT_FOUND` when its upload budget is spent, and the siblings of a failed
    /// parent, predicted to hold what none of them got, are often all of a peer's
    /// neighbours (a viewer then asked one after the other until the deadline passed).
    fn repair(&mut self, seq: u64, now_ms: i64, server: bool) {
        let timeout = ms(self.cfg.request_timeout);
        let (d_ms, max_per) = (self.d_ms, self.cfg.max_per_neighbour);
        let r = self.repairs.entry(seq).or_default();
        if r.outstanding.is_some() {
            return;
        }
        let late = server && r.late_tries > 0;
        let pick = if late {
            None
        } else {
            self.neighbours
                .iter()
                .filter(|(id, n)| n.outstanding < max_per && !r.tried.contains(id))
                .filter_map(|(id, n)| {
                    let (actual, predicted) = n.predicts(seq, now_ms, d_ms);
                    (actual || (predicted && !server)).then_some((!actual, n.outstanding, *id))
                })
                .min()
                .map(|(_, _, id)| id)
        };
        if let Some(nb) = pick {
            if server {
                r.late_tries += 1;
            }
            r.outstanding = Some((Some(nb), now_ms.saturating_add(timeout)));
            self.outstanding += 1;
            if let Some(n) = self.neighbours.get_mut(&nb) {
                n.outstanding += 1;
            }
            self.actions
                .push_back(Action::Request { neighbour: nb, seq });
            self.stats.neighbour_requests += 1;
        } else if server && r.server_tries < 3 {
            r.server_tries += 1;
            r.outstanding = Some((None, now_ms.saturating_add(timeout)));
            self.outstanding += 1;
            self.actions.push_back(Action::RequestFromServer { seq });
            self.stats.server_requests += 1;
        }
    }
}

impl PeerScheduler {
    /// Requests the chunks parents skipped, without waiting for the repair lead: from a
    /// neighbour whose map holds (or is predicted to hold) the chunk, else from the
    /// server once [`SchedulerConfig::skip_server_delay`] has passed since the skip (by
    /// then flowing neighbours are predicted to hold it).
    fn request_urgent(&mut self, now_ms: i64) {
        let start = self.play_next.unwrap_or(0);
        let have = &self.have;
        self.urgent.retain(|&s, _| s >= start && !have.contains(&s));
        let delay = ms(self.cfg.skip_server_delay);
        let urgent: Vec<(u64, i64)> = self.urgent.iter().map(|(&s, &t)| (s, t)).collect();
        for (seq, at) in urgent {
            if self.outstanding >= self.cfg.max_outstanding {
                return;
            }
            self.repair(seq, now_ms, now_ms >= at.saturating_add(delay));
        }
    }
}

#[cfg(test)]
impl PeerScheduler {
    /// True if [`PeerScheduler::next_timeout`] is the periodic fallback at `now`.
    pub(crate) fn ticks_periodically(&self, now: Duration) -> bool {
        self.wake(ms(now)).1
    }
    pub(crate) fn repairs_len(&self) -> usize {
        self.repairs.len()
    }
    pub(crate) fn held_len(&self) -> usize {
        self.have.len()
    }
}
