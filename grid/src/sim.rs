//! Test-only deterministic network: virtual clock, per-link latency, per-peer upload
//! serialization, a source emitting one chunk per chunk duration, a hand-made parent
//! topology and a tiny controller answering re-searches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use crate::Parent;
use crate::peer::*;

const SERVER_UPLINK_KBPS: u64 = 1_000_000;

#[derive(Debug, Clone)]
enum Ev {
    Emit(u64),
    Deliver {
        to: PeerId,
        seq: u64,
        src: Source,
        sender: Option<PeerId>,
    },
    Map {
        to: PeerId,
        from: PeerId,
        map: BufferMap,
    },
    Req {
        to: PeerId,
        from: PeerId,
        seq: u64,
    },
    NotFound {
        to: PeerId,
        from: PeerId,
        seq: u64,
    },
    Tick(PeerId),
    Reparent {
        child: PeerId,
        substream: u16,
        exclude: Option<PeerId>,
    },
    Kill(PeerId),
    NeighbourGone {
        to: PeerId,
        gone: PeerId,
    },
}

struct SimPeer {
    sched: PeerScheduler,
    alive: bool,
    upload_kbps: u64,
    upload_free_at: u64,
    extra_latency_ms: u64,
    parents: Vec<Parent>,
    neighbours: Vec<PeerId>,
    research_log: Vec<(u64, u16, Option<PeerId>)>,
    /// Parents this peer's re-searches excluded (the real control plane keeps them
    /// excluded for a while, too).
    excluded: Vec<PeerId>,
    /// Deadline-driven mode: the one tick scheduled, at `next_timeout`.
    wake_at: Option<u64>,
    /// Ticks at the current ms (a `next_timeout` that never moves on would spin).
    ticks_now: (u64, u32),
}

/// The simulated swarm.
pub(super) struct Sim {
    pub now: u64,
    seq_no: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    peers: BTreeMap<PeerId, SimPeer>,
    pub cfg: SchedulerConfig,
    pub latency_ms: u64,
    pub chunk_bytes: u64,
    pub ctrl_rtt_ms: u64,
    pub server_pushes: u64,
    pub server_pulls: u64,
    tick_ms: u64,
    /// Tick each peer only at its scheduler's `next_timeout` (as the SDK's engine does)
    /// instead of every `tick_ms`, checking before every event that an earlier tick
    /// would have done nothing the deadline did not allow.
    deadline_driven: bool,
    /// Early ticks checked (deadline-driven mode).
    pub early_checks: u64,
    /// Scheduler ticks run, all peers.
    pub ticks: u64,
}

impl Sim {
    /// `n` peers (ids 1..=n) with the given uploads; every substream tree is a fan-out-4
    /// tree over a rotation of the peers (interior-disjoint), root fed by the server;
    /// neighbours i±1, i±3 (mod n).
    pub fn new(cfg: SchedulerConfig, n: u64, upload_kbps: u64, stream_kbps: u64) -> Sim {
        let k = u64::from(cfg.substreams);
        let mut peers = BTreeMap::new();
        for id in 1..=n {
            peers.insert(
                id,
                SimPeer {
                    sched: PeerScheduler::new(cfg).unwrap(),
                    alive: true,
                    upload_kbps,
                    upload_free_at: 0,
                    extra_latency_ms: 0,
                    parents: vec![Parent::Server; usize::from(cfg.substreams)],
                    neighbours: Vec::new(),
                    research_log: Vec::new(),
                    excluded: Vec::new(),
                    wake_at: None,
                    ticks_now: (0, 0),
                },
            );
        }
        let chunk_ms = cfg.chunk_duration.as_millis() as u64;
        let mut sim = Sim {
            now: 0,
            seq_no: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            peers,
            cfg,
            latency_ms: 30,
            chunk_bytes: stream_kbps * chunk_ms / 8,
            ctrl_rtt_ms: 60,
            server_pushes: 0,
            server_pulls: 0,
            tick_ms: 50,
            deadline_driven: false,
            early_checks: 0,
            ticks: 0,
        };
        for s in 0..k {
            let order: Vec<u64> = (0..n).map(|i| (i + s * n / k) % n + 1).collect();
            for (i, &p) in order.iter().enumerate() {
                let parent = if i == 0 {
                    Parent::Server
                } else {
                    Parent::Peer(order[(i - 1) / 4])
                };
                sim.set_parent(p, s as u16, parent);
            }
        }
        for id in 1..=n {
            for off in [1, 3] {
                let nb = (id - 1 + off) % n + 1;
                sim.link_neighbours(id, nb);
            }
        }
        sim.schedule(chunk_ms, Ev::Emit(0));
        for id in 1..=n {
            sim.schedule(id % sim.tick_ms, Ev::Tick(id));
        }
        sim
    }

    /// The same swarm, each peer ticked only at its `next_timeout`.
    pub fn new_deadline_driven(
        cfg: SchedulerConfig,
        n: u64,
        upload_kbps: u64,
        stream_kbps: u64,
    ) -> Sim {
        let mut sim = Sim::new(cfg, n, upload_kbps, stream_kbps);
        sim.deadline_driven = true;
        for id in 1..=n {
            sim.rearm(id);
        }
        sim
    }

    /// The peer an event is for.
    fn target(ev: &Ev) -> Option<PeerId> {
        match *ev {
            Ev::Emit(_) | Ev::Kill(_) => None,
            Ev::Deliver { to, .. }
            | Ev::Map { to, .. }
            | Ev::Req { to, .. }
            | Ev::NotFound { to, .. }
            | Ev::NeighbourGone { to, .. } => Some(to),
            Ev::Tick(id) => Some(id),
            Ev::Reparent { child, .. } => Some(child),
        }
    }

    /// Deadline-driven mode, before an event for `id` at `now`: a tick now, earlier
    /// than the deadline, must do nothing (play-out, parent checks and maps are exact),
    /// except repair requests while the scheduler said it ticks periodically.
    fn check_early_tick(&mut self, id: PeerId) {
        let now = self.now;
        let Some(p) = self.peers.get(&id).filter(|p| p.alive) else {
            return;
        };
        if p.wake_at.is_some_and(|w| w <= now) {
            return;
        }
        let periodic = p.sched.ticks_periodically(at(now));
        let mut probe = p.sched.clone();
        while probe.poll_action().is_some() {}
        probe.tick(at(now));
        let early: Vec<Action> = std::iter::from_fn(|| probe.poll_action())
            .filter(|a| {
                !(periodic
                    && matches!(a, Action::Request { .. } | Action::RequestFromServer { .. }))
            })
            .collect();
        assert!(
            early.is_empty(),
            "peer {id} at {now} ms (wake at {:?}, periodic {periodic}): an early tick \
             would act: {early:?}",
            p.wake_at
        );
        self.early_checks += 1;
    }

    /// Deadline-driven mode, after an event for `id`: (re)schedules its one tick.
    fn rearm(&mut self, id: PeerId) {
        let now = self.now;
        let Some(p) = self.peers.get_mut(&id).filter(|p| p.alive) else {
            return;
        };
        let Some(t) = p.sched.next_timeout(at(now)) else {
            p.wake_at = None;
            return;
        };
        let t = (t.as_millis() as u64).max(now);
        if p.wake_at == Some(t) {
            return;
        }
        p.wake_at = Some(t);
        self.schedule(t, Ev::Tick(id));
    }

    fn link_neighbours(&mut self, a: PeerId, b: PeerId) {
        if a == b || self.peers[&a].neighbours.contains(&b) {
            return;
        }
        for (x, y) in [(a, b), (b, a)] {
            let p = self.peers.get_mut(&x).unwrap();
            p.neighbours.push(y);
            p.sched.on_neighbour_added(y);
        }
    }

    fn set_parent(&mut self, child: PeerId, s: u16, parent: Parent) {
        let now = Duration::from_millis(self.now);
        let old = self.peers[&child].parents[usize::from(s)];
        if let Parent::Peer(o) = old
            && let Some(p) = self.peers.get_mut(&o)
        {
            p.sched.on_child_removed(child, &[s]);
        }
        if let Parent::Peer(p) = parent {
            self.peers
                .get_mut(&p)
                .unwrap()
                .sched
                .on_child_added(child, &[s]);
            self.drain(p);
        }
        let c = self.peers.get_mut(&child).unwrap();
        c.parents[usize::from(s)] = parent;
        c.sched.on_parent_changed(s, Some(parent), now);
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq_no += 1;
        self.queue.push(Reverse((at, self.seq_no)));
        self.events.insert(self.seq_no, ev);
    }

    /// Schedules a peer's death.
    pub fn kill_at(&mut self, at: u64, id: PeerId) {
        self.schedule(at, Ev::Kill(id));
    }

    /// Adds latency to everything `id` sends, from now on.
    pub fn slow_down(&mut self, id: PeerId, extra_ms: u64) {
        self.peers.get_mut(&id).unwrap().extra_latency_ms = extra_ms;
    }

    /// The children of `id` in substream `s`.
    pub fn children(&self, id: PeerId, s: u16) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.alive && p.parents[usize::from(s)] == Parent::Peer(id))
            .map(|(&c, _)| c)
            .collect()
    }

    pub fn researches(&self, id: PeerId) -> &[(u64, u16, Option<PeerId>)] {
        &self.peers[&id].research_log
    }

    pub fn stats(&self, id: PeerId) -> SchedulerStats {
        self.peers[&id].sched.stats()
    }

    pub fn alive(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Runs until virtual time `until` ms.
    pub fn run_until(&mut self, until: u64) {
        while let Some(&Reverse((at, no))) = self.queue.peek() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let ev = self.events.remove(&no).unwrap();
            let target = Sim::target(&ev).filter(|_| self.deadline_driven);
            if let Some(id) = target {
                self.check_early_tick(id);
            }
            self.handle(ev);
            if let Some(id) = target {
                self.rearm(id);
            }
        }
        self.now = until;
    }

    fn send_chunk(&mut self, from: PeerId, to: PeerId, seq: u64, src: Source) {
        let bytes = self.chunk_bytes;
        let lat = self.latency_ms;
        let now = self.now;
        let p = self.peers.get_mut(&from).unwrap();
        let tx_ms = bytes * 8 / p.upload_kbps.max(1);
        let start = p.upload_free_at.max(now);
        p.upload_free_at = start + tx_ms;
        let at = start + tx_ms + lat + p.extra_latency_ms;
        self.schedule(
            at,
            Ev::Deliver {
                to,
                seq,
                src,
                sender: Some(from),
            },
        );
    }

    fn drain(&mut self, id: PeerId) {
        let now = self.now;
        let k = u64::from(self.cfg.substreams);
        loop {
            let Some(p) = self.peers.get_mut(&id) else {
                return;
            };
            if !p.alive {
                return;
            }
            let extra = p.extra_latency_ms;
            let Some(a) = p.sched.poll_action() else {
                return;
            };
            let lat = self.latency_ms + extra;
            match a {
                Action::Push { child, seq } => {
                    self.send_chunk(id, child, seq, Source::Parent((seq % k) as u16))
                }
                Action::Serve { to, seq } => self.send_chunk(id, to, seq, Source::Neighbour(id)),
                Action::Request { neighbour, seq } => self.schedule(
                    now + lat,
                    Ev::Req {
                        to: neighbour,
                        from: id,
                        seq,
                    },
                ),
                Action::NotFound { to, seq } => {
                    self.schedule(now + lat, Ev::NotFound { to, from: id, seq })
                }
                Action::RequestFromServer { seq } => {
                    self.server_pulls += 1;
                    let chunk_ms = self.cfg.chunk_duration.as_millis() as u64;
                    // Served once emitted; the server's uplink is ample.
                    let avail = (seq + 1) * chunk_ms;
                    let tx = self.chunk_bytes * 8 / SERVER_UPLINK_KBPS;
                    let at = (now + self.latency_ms).max(avail) + tx + self.latency_ms;
                    self.schedule(
                        at,
                        Ev::Deliver {
                            to: id,
                            seq,
                            src: Source::Server,
                            sender: None,
                        },
                    );
                }
                Action::SendBufferMap { to, map } => {
                    self.schedule(now + lat, Ev::Map { to, from: id, map })
                }
                Action::ReSearch { substream, exclude } => {
                    self.peers
                        .get_mut(&id)
                        .unwrap()
                        .research_log
                        .push((now, substream, exclude));
                    self.schedule(
                        now + self.ctrl_rtt_ms,
                        Ev::Reparent {
                            child: id,
                            substream,
                            exclude,
                        },
                    );
                }
                Action::Play { .. } | Action::Skip { .. } | Action::ReportParent { .. } => {}
            }
        }
    }

    /// The tiny controller: a living peer with a spare slot that the child never excluded
    /// and that is not in the child's subtree, else the server.
    fn choose_parent(&self, child: PeerId, s: u16) -> Parent {
        let excluded = &self.peers[&child].excluded;
        let slot_kbps = self.chunk_bytes * 8 * 1000
            / (self.cfg.chunk_duration.as_millis() as u64)
            / 1000
            / u64::from(self.cfg.substreams);
        for (&id, p) in &self.peers {
            if !p.alive || id == child || excluded.contains(&id) {
                continue;
            }
            let used: usize = (0..self.cfg.substreams)
                .map(|ss| self.children(id, ss).len())
                .sum();
            if (used as u64 + 1) * slot_kbps > p.upload_kbps {
                continue;
            }
            // Not in the child's subtree.
            let mut x = Parent::Peer(id);
            let mut inside = false;
            while let Parent::Peer(y) = x {
                if y == child {
                    inside = true;
                    break;
                }
                x = self.peers[&y].parents[usize::from(s)];
            }
            if !inside {
                return Parent::Peer(id);
            }
        }
        Parent::Server
    }

    fn handle(&mut self, ev: Ev) {
        let now = Duration::from_millis(self.now);
        match ev {
            Ev::Emit(seq) => {
                let k = u64::from(self.cfg.substreams);
                let s = (seq % k) as u16;
                let roots: Vec<PeerId> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.alive && p.parents[usize::from(s)] == Parent::Server)
                    .map(|(&id, _)| id)
                    .collect();
                for id in roots {
                    self.server_pushes += 1;
                    let at = self.now + self.latency_ms;
                    self.schedule(
                        at,
                        Ev::Deliver {
                            to: id,
                            seq,
                            src: Source::Parent(s),
                            sender: None,
                        },
                    );
                }
                let next = self.now + self.cfg.chunk_duration.as_millis() as u64;
                self.schedule(next, Ev::Emit(seq + 1));
            }
            Ev::Deliver {
                to,
                seq,
                src,
                sender,
            } => {
                if sender.is_some_and(|s| !self.peers[&s].alive) {
                    return;
                }
                if let Some(p) = self.peers.get_mut(&to).filter(|p| p.alive) {
                    p.sched.on_chunk(seq, src, now);
                    self.drain(to);
                }
            }
            Ev::Map { to, from, map } => {
                if let Some(p) = self.peers.get_mut(&to).filter(|p| p.alive) {
                    p.sched.on_buffer_map(from, map, now);
                }
            }
            Ev::Req { to, from, seq } => {
                if let Some(p) = self.peers.get_mut(&to).filter(|p| p.alive) {
                    p.sched.on_request(from, seq);
                    self.drain(to);
                }
            }
            Ev::NotFound { to, from, seq } => {
                if let Some(p) = self.peers.get_mut(&to).filter(|p| p.alive) {
                    p.sched.on_not_found(from, seq, now);
                    self.drain(to);
                }
            }
            Ev::Tick(id) if self.deadline_driven => {
                let t = self.now;
                if let Some(p) = self.peers.get_mut(&id).filter(|p| p.alive)
                    && p.wake_at == Some(t)
                {
                    p.wake_at = None;
                    p.ticks_now = if p.ticks_now.0 == t {
                        (t, p.ticks_now.1 + 1)
                    } else {
                        (t, 1)
                    };
                    assert!(p.ticks_now.1 < 50, "peer {id} spins at {t} ms");
                    p.sched.tick(now);
                    self.ticks += 1;
                    self.drain(id);
                }
            }
            Ev::Tick(id) => {
                if let Some(p) = self.peers.get_mut(&id).filter(|p| p.alive) {
                    p.sched.tick(now);
                    self.ticks += 1;
                    self.drain(id);
                    let at = self.now + self.tick_ms;
                    self.schedule(at, Ev::Tick(id));
                }
            }
            Ev::Reparent {
                child,
                substream,
                exclude,
            } => {
                if self.peers[&child].alive {
                    if let Some(x) = exclude
                        && let Some(p) = self.peers.get_mut(&child)
                    {
                        p.excluded.push(x);
                    }
                    let parent = self.choose_parent(child, substream);
                    self.set_parent(child, substream, parent);
                    self.drain(child);
                }
            }
            Ev::Kill(id) => {
                let p = self.peers.get_mut(&id).unwrap();
                p.alive = false;
                for nb in p.neighbours.clone() {
                    self.schedule(self.now + 1000, Ev::NeighbourGone { to: nb, gone: id });
                }
            }
            Ev::NeighbourGone { to, gone } => {
                if let Some(p) = self.peers.get_mut(&to).filter(|p| p.alive) {
                    p.sched.on_neighbour_removed(gone);
                    self.drain(to);
                }
            }
        }
    }
}

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        substreams: 4,
        chunk_duration: Duration::from_millis(250),
        ..SchedulerConfig::default()
    }
}

/// Every listed peer played every chunk from its first one on, skipping none.
fn assert_continuity(sim: &Sim, ids: &[PeerId], min_played: u64) {
    for &id in ids {
        let st = sim.stats(id);
        assert_eq!(
            st.skipped,
            0,
            "peer {id} skipped chunks: {st:?}, re-searches {:?}",
            sim.researches(id)
        );
        assert!(st.played >= min_played, "peer {id} played too few: {st:?}");
    }
}

fn sim(deadline_driven: bool) -> Sim {
    if deadline_driven {
        Sim::new_deadline_driven(cfg(), 16, 2000, 1000)
    } else {
        Sim::new(cfg(), 16, 2000, 1000)
    }
}

#[test]
fn healthy_swarm_has_full_continuity_from_peers() {
    healthy_swarm(false);
}

#[test]
fn healthy_swarm_ticked_at_deadlines_only_has_full_continuity_and_few_ticks() {
    let ticks = healthy_swarm(true);
    let periodic = healthy_swarm(false);
    eprintln!("ticks: {ticks} at deadlines, {periodic} every 50 ms");
    // Play-out deadlines (4 a second) and the map checks, not 20 a second.
    assert!(
        ticks * 3 < periodic,
        "{ticks} deadline-driven ticks against {periodic} periodic"
    );
}

fn healthy_swarm(deadline_driven: bool) -> u64 {
    let mut sim = sim(deadline_driven);
    sim.run_until(60_000);
    let alive = sim.alive();
    assert_continuity(&sim, &alive, 220);
    let peer_chunks: u64 = alive.iter().map(|&id| sim.stats(id).from_parent).sum();
    let researches: usize = alive.iter().map(|&id| sim.researches(id).len()).sum();
    assert_eq!(researches, 0);
    assert_eq!(sim.server_pulls, 0);
    // 4 substream roots: the server sends one copy of the stream.
    assert_eq!(sim.server_pushes, 240);
    eprintln!(
        "healthy: {} chunks pushed by parents, server pushes {}",
        peer_chunks, sim.server_pushes
    );
    if deadline_driven {
        assert!(sim.early_checks > 2_000, "{} checks", sim.early_checks);
    }
    sim.ticks
}

#[test]
fn parent_loss_is_repaired_without_missing_a_deadline() {
    parent_loss(false);
}

#[test]
fn parent_loss_is_repaired_without_missing_a_deadline_when_ticked_at_deadlines() {
    parent_loss(true);
}

fn parent_loss(deadline_driven: bool) {
    let mut sim = sim(deadline_driven);
    sim.run_until(20_000);
    // An interior peer of substream 0's tree (the root's first child).
    let victim = 2;
    let orphans = sim.children(victim, 0);
    assert!(!orphans.is_empty());
    sim.kill_at(20_001, victim);
    sim.run_until(60_000);
    let alive = sim.alive();
    assert_continuity(&sim, &alive, 220);
    for &o in &orphans {
        let rs = sim.researches(o);
        assert!(
            rs.iter()
                .any(|&(t, s, ex)| s == 0 && ex == Some(victim) && t < 23_000),
            "orphan {o} did not re-search promptly: {rs:?}"
        );
        assert_ne!(sim.peers[&o].parents[0], Parent::Peer(victim));
    }
    let repaired: u64 = alive.iter().map(|&id| sim.stats(id).from_neighbour).sum();
    let researches: usize = alive.iter().map(|&id| sim.researches(id).len()).sum();
    let first: Vec<u64> = orphans
        .iter()
        .filter_map(|&o| sim.researches(o).first().map(|r| r.0 - 20_001))
        .collect();
    eprintln!(
        "parent loss: orphans {orphans:?} re-searched after {first:?} ms; {researches} \
         re-searches in all; {repaired} chunks repaired from neighbours, {} from the server",
        sim.server_pulls
    );
}

#[test]
fn slow_parent_is_replaced() {
    slow_parent(false);
}

#[test]
fn slow_parent_is_replaced_when_ticked_at_deadlines() {
    slow_parent(true);
}

fn slow_parent(deadline_driven: bool) {
    let mut sim = sim(deadline_driven);
    sim.run_until(20_000);
    let slow = 2;
    let kids = sim.children(slow, 0);
    assert!(!kids.is_empty());
    sim.slow_down(slow, 1500);
    sim.run_until(60_000);
    let alive = sim.alive();
    assert_continuity(&sim, &alive, 220);
    for &c in &kids {
        assert!(
            sim.researches(c)
                .iter()
                .any(|&(_, s, ex)| s == 0 && ex == Some(slow)),
            "child {c} kept its slow parent"
        );
        assert_ne!(sim.peers[&c].parents[0], Parent::Peer(slow));
    }
}

// ----- scheduler-only unit tests ---------------------------------------------------------

fn at(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn drain(s: &mut PeerScheduler) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// A scheduler that has seen chunks 0..=3 arrive on time (1 s chunks, seq n at n s).
fn started() -> PeerScheduler {
    let mut s = fed(SchedulerConfig::default());
    s.tick(at(3000));
    drain(&mut s);
    s
}

/// A scheduler with `cfg`, every substream fed by the server, chunks 0..=3 received at
/// 0..=3 s.
fn fed(cfg: SchedulerConfig) -> PeerScheduler {
    let mut s = PeerScheduler::new(cfg).unwrap();
    for seq in 0..4u16 {
        s.on_parent_changed(seq, Some(Parent::Server), at(0));
    }
    for seq in 0..4 {
        assert!(s.on_chunk(seq, Source::Parent(seq as u16), at(seq * 1000)));
    }
    s
}

#[test]
fn missing_chunk_comes_from_a_neighbour_that_has_it() {
    let mut s = started();
    s.on_neighbour_added(7);
    s.on_neighbour_added(8);
    let mut map = BufferMap::new(0, 16);
    map.set(4);
    s.on_buffer_map(8, map, at(4100));
    drain(&mut s);
    // seq 4 is due at 4000 + 2000 = 6000; repair starts at 5000.
    s.tick(at(4900));
    assert!(
        !drain(&mut s)
            .iter()
            .any(|a| matches!(a, Action::Request { .. }))
    );
    s.tick(at(5000));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::Request {
        neighbour: 8,
        seq: 4
    }));
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::RequestFromServer { .. }))
    );
    assert!(s.on_chunk(4, Source::Neighbour(8), at(5100)));
    s.tick(at(6000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 4 }));
    assert_eq!(s.stats().skipped, 0);
}

#[test]
fn server_is_asked_only_when_no_neighbour_has_it_and_the_deadline_is_near() {
    let mut s = started();
    s.on_neighbour_added(7);
    s.on_buffer_map(7, BufferMap::new(0, 16), at(4000));
    drain(&mut s);
    s.tick(at(5000));
    assert!(
        drain(&mut s)
            .iter()
            .all(|a| !matches!(a, Action::Request { .. } | Action::RequestFromServer { .. }))
    );
    s.tick(at(5600));
    assert!(drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    assert!(s.on_chunk(4, Source::Server, at(5700)));
    s.tick(at(6000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 4 }));
}

#[test]
fn a_flowing_neighbour_is_predicted_to_hold_chunks_newer_than_its_map() {
    let mut s = started();
    // Neighbour 9's map (at 3100) holds 0..=3, its last K chunks: flowing. Neighbour 8's
    // misses chunk 2: one of its substreams is not flowing, so nothing is predicted.
    s.on_neighbour_added(8);
    s.on_neighbour_added(9);
    let mut full = BufferMap::new(0, 16);
    let mut gap = BufferMap::new(0, 16);
    for seq in 0..4 {
        full.set(seq);
        if seq != 2 {
            gap.set(seq);
        }
    }
    s.on_buffer_map(9, full, at(3100));
    s.on_buffer_map(8, gap, at(3100));
    drain(&mut s);
    // Chunk 4 (due at 6000) is missing at 5000: neighbour 9 should have had it since
    // ~4100, so it is asked; neighbour 8 never is.
    s.tick(at(5000));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::Request {
        neighbour: 9,
        seq: 4
    }));
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::Request { neighbour: 8, .. }))
    );
    // A wrong guess costs one round trip: after NOT_FOUND the server is asked in time.
    s.on_not_found(9, 4, at(5050));
    s.tick(at(5600));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::RequestFromServer { seq: 4 }));
    assert!(!acts.iter().any(|a| matches!(a, Action::Request { .. })));
}

/// The neighbours a round of buffer maps went to (empty: no map this tick).
fn maps_to(acts: &[Action]) -> Vec<PeerId> {
    acts.iter()
        .filter_map(|a| match a {
            Action::SendBufferMap { to, .. } => Some(*to),
            _ => None,
        })
        .collect()
}

#[test]
fn a_flowing_peer_sends_maps_only_when_its_neighbours_would_predict_wrong() {
    // 1 s chunks, checks every 2 s, refresh every 10 s.
    let mut s = fed(SchedulerConfig::default());
    s.on_neighbour_added(7);
    assert_eq!(maps_to(&drain(&mut s)), vec![7]);
    // The first periodic check sends (nothing was sent to all yet), then a flowing peer
    // that holds every chunk since is predicted correctly: no map until the refresh.
    s.tick(at(3000));
    assert_eq!(maps_to(&drain(&mut s)), vec![7]);
    let mut seq = 4;
    let mut sent_at = Vec::new();
    for t in (4000..=16_000).step_by(1000) {
        assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(t)));
        seq += 1;
        s.tick(at(t));
        if !maps_to(&drain(&mut s)).is_empty() {
            sent_at.push(t);
        }
    }
    assert_eq!(sent_at, vec![13_000], "only the 10 s refresh");
    assert_eq!(s.stats().buffer_maps_sent, 2);
    // A chunk that never comes (seq 17) makes the prediction wrong: the next check
    // sends a map without waiting for the refresh, and so does every check while the
    // hole is among the last K chunks (the neighbours then read the map itself). Once
    // flowing again, one map tells them so, and the peer is quiet again.
    seq += 1;
    let mut sent_at = Vec::new();
    for t in (18_000..=24_000).step_by(1000) {
        assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(t)));
        seq += 1;
        s.tick(at(t));
        if !maps_to(&drain(&mut s)).is_empty() {
            sent_at.push(t);
        }
    }
    assert_eq!(sent_at, vec![18_000, 20_000, 22_000]);
    // A neighbour added meanwhile gets a map at once.
    s.on_neighbour_added(8);
    assert_eq!(maps_to(&drain(&mut s)), vec![8]);
    s.tick(at(25_000));
    assert_eq!(maps_to(&drain(&mut s)), Vec::<PeerId>::new());
}

#[test]
fn a_repairing_peer_ticks_every_quarter_chunk_however_busy_its_links() {
    // 1 s chunks (tick interval 250 ms); chunk 4 never comes, so from its repair lead
    // on (deadline 6 s, lead 1 s) the peer repairs and asks to be ticked periodically.
    // Events every 20 ms must not push that tick back: it is due 250 ms after the last
    // one, not 250 ms after the latest event.
    let mut s = started();
    s.on_neighbour_added(7);
    s.tick(at(5000));
    drain(&mut s);
    assert!(s.ticks_periodically(at(5000)));
    for (i, t) in (5020..5400u64).step_by(20).enumerate() {
        if i % 5 == 0 {
            s.on_buffer_map(7, BufferMap::new(0, 16), at(t));
        } else {
            s.on_request(7, 0);
        }
        drain(&mut s);
        let next = s.next_timeout(at(t)).unwrap();
        assert!(
            next <= at(5250).max(at(t)),
            "at {t} ms the next tick is {next:?}"
        );
    }
}

#[test]
fn unanswered_request_is_retried_elsewhere_then_skipped_at_the_deadline() {
    let mut s = started();
    for nb in [7, 8] {
        s.on_neighbour_added(nb);
        let mut map = BufferMap::new(0, 16);
        map.set(4);
        s.on_buffer_map(nb, map, at(4000));
    }
    drain(&mut s);
    s.tick(at(5000));
    assert!(drain(&mut s).contains(&Action::Request {
        neighbour: 7,
        seq: 4
    }));
    s.tick(at(5300));
    assert!(drain(&mut s).contains(&Action::Request {
        neighbour: 8,
        seq: 4
    }));
    s.on_not_found(8, 4, at(5350));
    s.tick(at(5600));
    assert!(drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    s.tick(at(6000));
    assert!(drain(&mut s).contains(&Action::Skip { seq: 4 }));
    assert_eq!(s.stats().skipped, 1);
}

#[test]
fn pushes_to_children_and_answers_requests() {
    let mut s = started();
    s.on_child_added(50, &[0, 2]);
    s.on_child_added(51, &[1]);
    drain(&mut s);
    s.on_chunk(4, Source::Parent(0), at(4020));
    s.on_chunk(5, Source::Parent(1), at(5020));
    s.on_chunk(6, Source::Neighbour(9), at(6020));
    assert_eq!(
        drain(&mut s),
        vec![
            Action::Push { child: 50, seq: 4 },
            Action::Push { child: 51, seq: 5 },
            Action::Push { child: 50, seq: 6 },
        ]
    );
    assert!(!s.on_chunk(4, Source::Neighbour(9), at(6030)));
    s.on_request(9, 5);
    s.on_request(9, 99);
    assert_eq!(
        drain(&mut s),
        vec![
            Action::Serve { to: 9, seq: 5 },
            Action::NotFound { to: 9, seq: 99 }
        ]
    );
    s.on_child_removed(50, &[]);
    s.on_chunk(8, Source::Parent(0), at(8020));
    assert!(drain(&mut s).is_empty());
}

#[test]
fn silent_parent_is_re_searched_once() {
    let mut s = started();
    s.on_parent_changed(0, Some(Parent::Peer(3)), at(3100));
    // seq 4 (substream 0) becomes available at ~4000; silence after 5500, but only once
    // the chunk can be had elsewhere: here, once a neighbour's buffer map has it.
    s.on_neighbour_added(9);
    for t in [4000, 5000, 5400, 5600, 5800] {
        s.tick(at(t));
        assert!(
            !drain(&mut s)
                .iter()
                .any(|a| matches!(a, Action::ReSearch { .. })),
            "re-searched at {t} though no one had the chunk"
        );
    }
    let mut map = BufferMap::new(0, 64);
    map.set(4);
    s.on_buffer_map(9, map, at(5850));
    s.tick(at(5900));
    let acts = drain(&mut s);
    assert!(acts.contains(&Action::ReSearch {
        substream: 0,
        exclude: Some(3)
    }));
    s.tick(at(5700));
    assert!(
        !drain(&mut s)
            .iter()
            .any(|a| matches!(a, Action::ReSearch { .. }))
    );
}

#[test]
fn state_stays_bounded() {
    let mut s = started();
    for seq in 4..10_000u64 {
        s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(seq * 1000 + 20));
        s.tick(at(seq * 1000 + 30));
        drain(&mut s);
    }
    assert!(s.buffer_map().len() <= 64);
    assert!(s.repairs_len() <= 64 && s.held_len() <= 64);
}

#[test]
fn re_searches_back_off_while_new_parents_keep_failing() {
    let mut s = started();
    s.on_neighbour_added(9);
    let mut parent = 3;
    s.on_parent_changed(0, Some(Parent::Peer(parent)), at(3100));
    let mut times = Vec::new();
    // The neighbour has every chunk; no parent ever delivers substream 0.
    for t in (3200..230_000u64).step_by(100) {
        let live = t / 1000;
        let mut map = BufferMap::new(live.saturating_sub(63), 64);
        for q in live.saturating_sub(63)..=live {
            map.set(q);
        }
        s.on_buffer_map(9, map, at(t));
        s.tick(at(t));
        for a in drain(&mut s) {
            if let Action::ReSearch {
                substream: 0,
                exclude,
            } = a
            {
                assert_eq!(exclude, Some(parent));
                times.push(t);
                parent += 1;
                s.on_parent_changed(0, Some(Parent::Peer(parent)), at(t + 50));
            }
        }
    }
    // Doubling from 5 s, capped at 60 s; each re-search waits for the next chunk of the
    // substream to be overdue, so up to one round of K chunks (4 s) later than that.
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let least = [5000, 10_000, 20_000, 40_000, 60_000, 60_000];
    assert_eq!(gaps.len(), least.len(), "re-searches at {times:?}");
    for (g, l) in gaps.iter().zip(least) {
        assert!(
            (l..l + 4000).contains(g),
            "gap {g} ms, expected {l}..{}: re-searches at {times:?}",
            l + 4000
        );
    }
}

#[test]
fn a_start_up_burst_plays_at_once_even_out_of_order() {
    let mut s = PeerScheduler::new(SchedulerConfig::default()).unwrap();
    for sub in 0..4u16 {
        s.on_parent_changed(sub, Some(Parent::Server), at(9_000));
    }
    // The live chunk first (available at 10 000: seq 10 at 1 s chunks, base 0)...
    assert!(s.on_chunk(10, Source::Parent(2), at(10_000)));
    s.tick(at(10_005));
    assert!(
        drain(&mut s)
            .iter()
            .all(|a| !matches!(a, Action::Play { .. }))
    );
    // ...then the start-up burst of older ones: they are still taken, and being past
    // their deadline (seq·1 s + 2 s lag) they play at once, oldest first.
    for seq in 7..10 {
        assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(10_010)));
    }
    s.tick(at(10_020));
    let plays: Vec<u64> = drain(&mut s)
        .into_iter()
        .filter_map(|a| match a {
            Action::Play { seq } => Some(seq),
            _ => None,
        })
        .collect();
    assert_eq!(plays, vec![7, 8]);
    // From the first play on, the schedule is fixed: an older chunk is refused and the
    // next ones play on time (seq 9 at 11 000, seq 10 at 12 000).
    assert!(!s.on_chunk(6, Source::Neighbour(5), at(10_030)));
    s.tick(at(10_999));
    assert!(
        drain(&mut s)
            .iter()
            .all(|a| !matches!(a, Action::Play { .. }))
    );
    s.tick(at(11_000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 9 }));
    s.tick(at(12_000));
    assert!(drain(&mut s).contains(&Action::Play { seq: 10 }));
    assert_eq!(s.stats().skipped, 0);
}

#[test]
fn a_new_parent_is_not_silent_for_chunks_that_came_before_it() {
    // 1 s chunks, K = 4: a substream carries one chunk every 4 s, longer than the 1.5 s
    // silence timeout. A parent assigned at 4500, after chunk 4 (substream 0) became
    // available at 4000, owes chunk 8 first (due ~8000); before it, no re-search, even
    // though chunk 4 (held, and in a neighbour's map) is not played yet (4 s lag).
    let mut s = fed(SchedulerConfig {
        target_lag: Duration::from_secs(4),
        repair_lead: Duration::from_secs(2),
        ..SchedulerConfig::default()
    });
    s.on_chunk(4, Source::Server, at(4000));
    s.on_parent_changed(0, Some(Parent::Peer(3)), at(4500));
    s.on_neighbour_added(9);
    let mut map = BufferMap::new(0, 64);
    map.set(4);
    s.on_buffer_map(9, map.clone(), at(4600));
    for t in [5000, 6000, 6500, 7000, 8000, 9000, 9400] {
        s.tick(at(t));
        let acts = drain(&mut s);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::ReSearch { .. })),
            "re-searched at {t}, before the new parent's first due chunk"
        );
        if t == 7000 {
            assert!(
                !acts.contains(&Action::Play { seq: 4 }),
                "chunk 4 played too early"
            );
        }
    }
    // Chunk 8 is not delivered and a neighbour has it: silent after 8000 + 1.5 s.
    map.set(8);
    s.on_buffer_map(9, map, at(9450));
    s.tick(at(9600));
    assert!(drain(&mut s).contains(&Action::ReSearch {
        substream: 0,
        exclude: Some(3)
    }));
}

#[test]
fn a_parent_that_skips_a_push_is_not_silent_but_one_that_keeps_skipping_is_replaced() {
    // 1 s chunks, K = 4; peer 3 becomes substream 0's parent at 3500 and owes chunk 4
    // (available at 4000) first. It skips it (over its upload budget) and says so.
    let mut s = fed(SchedulerConfig::default());
    s.on_parent_changed(0, Some(Parent::Peer(3)), at(3500));
    drain(&mut s);
    // It is repaired well before the repair lead (1 s before its deadline), so that it
    // can still reach this peer's own children in time: from a neighbour that has it at
    // once, else (here: no neighbour) from the server 500 ms after the skip.
    s.on_parent_skipped(4, at(4000));
    assert_eq!(drain(&mut s), vec![]);
    s.tick(at(4250));
    assert!(!drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    s.tick(at(4500));
    assert!(drain(&mut s).contains(&Action::RequestFromServer { seq: 4 }));
    // The repair arrives: held now, so a silence check would blame the parent.
    assert!(s.on_chunk(4, Source::Server, at(4550)));
    for (t, seq) in [
        (5000, 5),
        (5600, 0),
        (5800, 0),
        (6000, 6),
        (7000, 7),
        (9000, 0),
    ] {
        if seq != 0 {
            assert!(s.on_chunk(seq, Source::Parent((seq % 4) as u16), at(t)));
        }
        s.tick(at(t));
        let acts = drain(&mut s);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::ReSearch { .. })),
            "re-searched at {t}: a skip announced by the parent is not silence"
        );
        if t == 6000 {
            assert!(
                acts.contains(&Action::Play { seq: 4 }),
                "chunk 4 repaired in time"
            );
        }
    }
    assert_eq!(s.stats().parent_skips, 1);
    assert_eq!(s.stats().skipped, 0);
    // A notice for a chunk far beyond the newest held (or already played) is ignored.
    s.on_parent_skipped(1_000_000, at(9000));
    s.on_parent_skipped(1, at(9000));
    assert_eq!(s.stats().parent_skips, 1);
    assert!(drain(&mut s).is_empty());
    // A parent that skips every push of the substream is replaced on the fourth skip in a
    // row (three strikes): 4, 8, 12, 16.
    for seq in [8, 12] {
        s.on_parent_skipped(seq, at(seq * 1000));
        assert!(
            !drain(&mut s)
                .iter()
                .any(|a| matches!(a, Action::ReSearch { .. }))
        );
    }
    s.on_parent_skipped(16, at(16_000));
    assert!(drain(&mut s).contains(&Action::ReSearch {
        substream: 0,
        exclude: Some(3)
    }));
}
