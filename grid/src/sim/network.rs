//! The event loop: virtual time, links and uplinks, the source and data plane, and the
//! routing of frames and control messages between [`Node`]s and the [`ControlPlane`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use crate::Parent;
use crate::assign::{GridAssigner, GridConfig, GridError, PeerInfo};
#[cfg(test)]
use crate::peer::PeerAction;
use crate::peer::{Peer, PeerConfig, PeerId, PeerScheduler, SchedulerError};

use super::control::{ControlPlane, ToControl, ToPeer};
use super::node::{Endpoint, Frame, Life, Node, Upcall};
use super::rng::{SimRng, us};
use super::{Drive, FrameSizes, PeerSpec, SimConfig};

/// A simulation could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The scheduler configuration was refused.
    #[error("scheduler: {0}")]
    Scheduler(#[from] SchedulerError),
    /// The assigner configuration was refused.
    #[error("assigner: {0}")]
    Grid(#[from] GridError),
    /// Chunk duration or uplink rates that would stop time or divide by zero.
    #[error("invalid simulation configuration: {0}")]
    InvalidConfig(&'static str),
}

#[derive(Debug, Clone)]
enum Ev {
    Emit(u64),
    Frame {
        to: Endpoint,
        from: Endpoint,
        frame: Frame,
        len: u64,
    },
    Tick(PeerId),
    ToControl(ToControl),
    ToPeer {
        to: PeerId,
        msg: ToPeer,
    },
    /// A child's subscription change reaching its parent.
    Link {
        parent: PeerId,
        child: PeerId,
        substream: u16,
        add: bool,
    },
    Join(PeerId),
    Leave(PeerId),
    Crash(PeerId),
    Silence(PeerId),
    LinkClosed {
        to: PeerId,
        gone: PeerId,
    },
    Sample,
}

/// Figures gathered while running (turned into a [`super::SimReport`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    pub server_pushes: u64,
    pub server_pulls: u64,
    pub server_bytes: u64,
    pub server_bytes_measured: u64,
    pub fluid_kbps_sum: u64,
    pub samples: u64,
    pub max_depth: u16,
    pub max_booster_slots: u64,
    pub lost_frames: u64,
    pub ticks: u64,
    pub early_checks: u64,
    pub control_in_flight: u64,
    pub spins: u64,
}

/// The simulated swarm (see the [module docs](super)).
pub struct Sim {
    pub(crate) cfg: SimConfig,
    sizes: FrameSizes,
    chunk_us: u64,
    k: u16,
    pub(crate) now: u64,
    seq_no: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    pub(crate) nodes: BTreeMap<PeerId, Node>,
    next_id: PeerId,
    server_subs: Vec<BTreeSet<PeerId>>,
    server_free_at: u64,
    pub(crate) control: ControlPlane,
    pub(crate) rng: SimRng,
    pub(crate) counters: Counters,
    upcalls: Vec<Upcall>,
    /// Tests with [`Drive::Deadlines`]: before every event for a peer, check that a
    /// tick then would have done nothing its deadline did not allow (clones the
    /// scheduler per event).
    #[cfg(test)]
    pub(crate) check_early: bool,
}

impl Sim {
    /// An empty swarm; the source starts emitting at once.
    ///
    /// # Errors
    /// A scheduler or assigner configuration they refuse, a zero chunk duration or
    /// server uplink.
    pub fn new(cfg: SimConfig) -> Result<Sim, SimError> {
        PeerScheduler::new(cfg.scheduler)?;
        let chunk_us = us(cfg.scheduler.chunk_duration);
        if chunk_us == 0 {
            return Err(SimError::InvalidConfig("chunk duration is zero"));
        }
        if cfg.server_uplink_kbps == 0 {
            return Err(SimError::InvalidConfig("server uplink is zero"));
        }
        if let Drive::Periodic(p) = cfg.drive
            && us(p) == 0
        {
            return Err(SimError::InvalidConfig("tick period is zero"));
        }
        let k = cfg.scheduler.substreams;
        let assigner = GridAssigner::new(GridConfig {
            substreams: k,
            stream_kbps: cfg.stream_kbps,
            seed: cfg.seed,
            ..cfg.grid
        })?;
        let mut sim = Sim {
            sizes: cfg.frame_sizes(),
            chunk_us,
            k,
            now: 0,
            seq_no: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes: BTreeMap::new(),
            next_id: 1,
            server_subs: vec![BTreeSet::new(); usize::from(k)],
            server_free_at: 0,
            control: ControlPlane::new(assigner, cfg.reporters_to_demote),
            rng: SimRng::new(cfg.seed),
            counters: Counters::default(),
            upcalls: Vec::new(),
            #[cfg(test)]
            check_early: false,
            cfg,
        };
        sim.schedule(chunk_us, Ev::Emit(0));
        sim.schedule(1_000_000, Ev::Sample);
        Ok(sim)
    }

    // ----- scenario API ------------------------------------------------------------

    /// A viewer joins at `at` (its join reaches the control plane one control latency
    /// later). Returns its id (1, 2, … in call order).
    pub fn join_at(&mut self, at: Duration, spec: PeerSpec) -> PeerId {
        let id = self.next_id;
        self.next_id += 1;
        let at = us(at).max(self.now);
        let peer = Peer::new(
            PeerConfig {
                me: id,
                scheduler: self.cfg.scheduler,
                upload_kbps: spec.upload_kbps,
                budget_kbps: spec.upload_kbps,
                stream_kbps: self.cfg.stream_kbps,
                child_slots: self.control.assigner().slots_for(spec.upload_kbps),
            },
            Duration::from_micros(at),
        );
        // The scheduler configuration was checked in `new`.
        let Ok(peer) = peer else {
            unreachable!("a scheduler configuration `Sim::new` accepted was refused")
        };
        self.nodes.insert(
            id,
            Node::new(
                peer,
                spec.upload_kbps,
                spec.uplink_kbps.max(1),
                spec.addr_prefix,
            ),
        );
        self.schedule(at, Ev::Join(id));
        id
    }

    /// A viewer leaves cleanly at `at`: it stops, and tells the control plane.
    pub fn leave_at(&mut self, at: Duration, id: PeerId) {
        self.schedule(us(at).max(self.now), Ev::Leave(id));
    }

    /// A viewer crashes at `at`: it stops; the control plane notices after the
    /// heartbeat timeout, its neighbours after the link-close delay.
    pub fn crash_at(&mut self, at: Duration, id: PeerId) {
        self.schedule(us(at).max(self.now), Ev::Crash(id));
    }

    /// A viewer goes silent at `at`: connected, receiving, sending nothing (the control
    /// plane never hears of it unless its children report it).
    pub fn silence_at(&mut self, at: Duration, id: PeerId) {
        self.schedule(us(at).max(self.now), Ev::Silence(id));
    }

    /// Adds `extra` latency to everything `id` sends, from now on.
    pub fn slow_down(&mut self, id: PeerId, extra: Duration) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.extra_latency_us = us(extra);
        }
    }

    /// Runs every event up to virtual time `until`.
    pub fn run_until(&mut self, until: Duration) {
        let until = us(until);
        while let Some(&Reverse((at, no))) = self.queue.peek() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let Some(ev) = self.events.remove(&no) else {
                continue;
            };
            if matches!(ev, Ev::ToControl(_) | Ev::ToPeer { .. }) {
                self.counters.control_in_flight -= 1;
            }
            let target = match self.cfg.drive {
                Drive::Deadlines => Sim::target(&ev),
                Drive::Periodic(_) => None,
            };
            #[cfg(test)]
            if let Some(id) = target
                && self.check_early
            {
                self.check_early_tick(id);
            }
            self.handle(ev);
            if let Some(id) = target {
                self.rearm(id);
            }
        }
        self.now = self.now.max(until);
    }

    // ----- event loop --------------------------------------------------------------

    fn schedule(&mut self, at: u64, ev: Ev) {
        if matches!(ev, Ev::ToControl(_) | Ev::ToPeer { .. }) {
            self.counters.control_in_flight += 1;
        }
        self.seq_no += 1;
        self.queue.push(Reverse((at, self.seq_no)));
        self.events.insert(self.seq_no, ev);
    }

    /// The peer an event is for.
    fn target(ev: &Ev) -> Option<PeerId> {
        match *ev {
            Ev::Frame {
                to: Endpoint::Peer(id),
                ..
            }
            | Ev::Tick(id)
            | Ev::ToPeer { to: id, .. }
            | Ev::Link { parent: id, .. }
            | Ev::LinkClosed { to: id, .. } => Some(id),
            _ => None,
        }
    }

    /// With [`Sim::check_early`], before an event for `id`: a tick now,
    /// earlier than the deadline, must do nothing (play-out, parent checks and maps are
    /// exact), except repair requests while the scheduler said it ticks periodically.
    #[cfg(test)]
    fn check_early_tick(&mut self, id: PeerId) {
        let now = Duration::from_micros(self.now);
        let Some(n) = self.nodes.get(&id).filter(|n| n.receives()) else {
            return;
        };
        if n.wake_at.is_some_and(|w| w <= self.now) {
            return;
        }
        let mut probe = n.peer.clone();
        let periodic = probe.ticks_periodically(now);
        while probe.poll_action().is_some() {}
        probe.handle_timeout(now);
        let early: Vec<PeerAction> = std::iter::from_fn(|| probe.poll_action())
            .filter(|a| {
                !(periodic
                    && matches!(
                        a,
                        PeerAction::Request { .. } | PeerAction::RequestFromServer { .. }
                    ))
            })
            .collect();
        assert!(
            early.is_empty(),
            "peer {id} at {now:?} (wake at {:?} us, periodic {periodic}): an early tick \
             would act: {early:?}",
            n.wake_at
        );
        self.counters.early_checks += 1;
    }

    /// [`Drive::Deadlines`], after an event for `id`: (re)schedules its one tick.
    fn rearm(&mut self, id: PeerId) {
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&id).filter(|n| n.receives()) else {
            return;
        };
        let Some(t) = n.peer.next_timeout(Duration::from_micros(now)) else {
            n.wake_at = None;
            return;
        };
        let mut t = us(t).max(now);
        if n.ticks_now.0 == now && n.ticks_now.1 >= 50 {
            t = t.max(now + 1000); // a spinning peer waits a millisecond
        }
        if n.wake_at == Some(t) {
            return;
        }
        n.wake_at = Some(t);
        self.schedule(t, Ev::Tick(id));
    }

    fn handle(&mut self, ev: Ev) {
        let now = Duration::from_micros(self.now);
        match ev {
            Ev::Emit(seq) => self.emit(seq),
            Ev::Frame {
                to,
                from,
                frame,
                len,
            } => {
                if let Endpoint::Peer(s) = from
                    && !self.nodes.get(&s).is_some_and(Node::sends)
                {
                    return; // the sender died with the frame in flight
                }
                match to {
                    Endpoint::Server => self.at_server(from, frame, len),
                    Endpoint::Peer(id) => {
                        if let Some(n) = self.nodes.get_mut(&id).filter(|n| n.receives()) {
                            n.on_frame(from, frame, len, self.chunk_us / 1000, now);
                            self.after(id);
                        }
                    }
                }
            }
            Ev::Tick(id) => self.tick(id),
            Ev::ToControl(msg) => {
                for (to, msg) in self.control.handle(msg, now) {
                    let at = self.now + us(self.cfg.control_latency);
                    self.schedule(at, Ev::ToPeer { to, msg });
                }
            }
            Ev::ToPeer { to, msg } => self.at_peer(to, msg),
            Ev::Link {
                parent,
                child,
                substream,
                add,
            } => {
                // The child's SUBSCRIBE says where it starts, and the RELAYING right
                // after it what it relays.
                let start = self.nodes.get(&child).and_then(|c| c.peer.resume_from());
                let relaying = self.nodes.get(&child).map_or(0, |c| c.peer.relaying());
                if let Some(n) = self.nodes.get_mut(&parent).filter(|n| n.receives()) {
                    if add {
                        n.add_child(child, substream, start);
                        n.peer.set_child_relaying(child, relaying);
                    } else {
                        n.remove_child(child, substream);
                    }
                    self.after(parent);
                }
            }
            Ev::Join(id) => {
                let Some(n) = self.nodes.get(&id) else {
                    return;
                };
                let info = PeerInfo {
                    upload_kbps: n.budget_kbps,
                    addr_prefix: n.addr_prefix,
                    now,
                    can_punch: true,
                };
                let at = self.now + us(self.cfg.control_latency);
                self.schedule(at, Ev::ToControl(ToControl::Join { id, info }));
            }
            Ev::Leave(id) => self.stop(id, us(self.cfg.control_latency)),
            Ev::Crash(id) => self.stop(id, us(self.cfg.heartbeat_timeout)),
            Ev::Silence(id) => {
                if let Some(n) = self.nodes.get_mut(&id).filter(|n| n.life == Life::Live) {
                    n.life = Life::Silent;
                }
            }
            Ev::LinkClosed { to, gone } => {
                if let Some(n) = self.nodes.get_mut(&to).filter(|n| n.receives()) {
                    n.link_closed(gone);
                    self.after(to);
                }
            }
            Ev::Sample => self.sample(),
        }
    }

    fn emit(&mut self, seq: u64) {
        let s = (seq % u64::from(self.k)) as usize;
        let subs: Vec<PeerId> = self.server_subs[s].iter().copied().collect();
        for id in subs {
            self.counters.server_pushes += 1;
            self.send(Endpoint::Server, Endpoint::Peer(id), Frame::Chunk(seq));
        }
        let next = self.now + self.chunk_us;
        self.schedule(next, Ev::Emit(seq + 1));
    }

    /// A frame reached the data plane: only requests mean something to it; a chunk not
    /// yet available is served once it is.
    fn at_server(&mut self, from: Endpoint, frame: Frame, len: u64) {
        let Frame::Request(seq) = frame else {
            return;
        };
        let avail = (seq + 1).saturating_mul(self.chunk_us);
        if avail > self.now {
            self.schedule(
                avail,
                Ev::Frame {
                    to: Endpoint::Server,
                    from,
                    frame,
                    len,
                },
            );
            return;
        }
        self.counters.server_pulls += 1;
        self.send(Endpoint::Server, from, Frame::Chunk(seq));
    }

    fn tick(&mut self, id: PeerId) {
        let now = self.now;
        let drive = self.cfg.drive;
        let Some(n) = self.nodes.get_mut(&id).filter(|n| n.receives()) else {
            return;
        };
        match drive {
            Drive::Deadlines => {
                if n.wake_at != Some(now) {
                    return; // superseded
                }
                n.wake_at = None;
                n.ticks_now = if n.ticks_now.0 == now {
                    (now, n.ticks_now.1 + 1)
                } else {
                    (now, 1)
                };
                if n.ticks_now.1 >= 50 {
                    // A `next_timeout` that never moves on: counted, not run again.
                    self.counters.spins += 1;
                    return;
                }
            }
            Drive::Periodic(p) => {
                let at = now + us(p);
                self.schedule(at, Ev::Tick(id));
            }
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.peer.handle_timeout(Duration::from_micros(now));
        }
        self.counters.ticks += 1;
        self.after(id);
    }

    /// Runs a node's pending actions and routes what it asks for.
    fn after(&mut self, id: PeerId) {
        let mut up = std::mem::take(&mut self.upcalls);
        let sends = {
            let Some(n) = self.nodes.get_mut(&id) else {
                return;
            };
            if n.life == Life::Joining {
                return; // its actions wait for its assignment
            }
            n.drain(self.now, self.chunk_us, &self.sizes, &mut up);
            n.sends()
        };
        for u in up.drain(..) {
            if !sends {
                continue;
            }
            match u {
                Upcall::Send { to, frame } => self.send(Endpoint::Peer(id), to, frame),
                Upcall::ReSearch { substream, exclude } => {
                    self.send_to_control(ToControl::ReSearch {
                        child: id,
                        substream,
                        exclude,
                    })
                }
                Upcall::Report { parent } => self.send_to_control(ToControl::Report {
                    reporter: id,
                    parent,
                }),
                Upcall::Play { .. } => {}
            }
        }
        self.upcalls = up;
    }

    fn send_to_control(&mut self, msg: ToControl) {
        let at = self.now + us(self.cfg.control_latency);
        self.schedule(at, Ev::ToControl(msg));
    }

    /// Puts a frame on `from`'s uplink: it leaves when the frames before it have, and
    /// arrives one link latency (plus the sender's extra) after.
    fn send(&mut self, from: Endpoint, to: Endpoint, frame: Frame) {
        let len = match &frame {
            Frame::Chunk(_) => self.sizes.chunk_frame(),
            Frame::BufferMap(m) => self.sizes.buffer_map_frame(m.len()),
            Frame::Request(_) | Frame::NotFound(_) | Frame::Relaying(_) => {
                self.sizes.control_frame()
            }
        };
        let now = self.now;
        let (free_at, kbps, extra) = match from {
            Endpoint::Server => {
                if matches!(frame, Frame::Chunk(_)) {
                    self.counters.server_bytes += len;
                    if now >= us(self.cfg.measure_from) {
                        self.counters.server_bytes_measured += len;
                    }
                }
                (&mut self.server_free_at, self.cfg.server_uplink_kbps, 0)
            }
            Endpoint::Peer(id) => {
                let Some(n) = self.nodes.get_mut(&id) else {
                    return;
                };
                (
                    &mut n.uplink_free_at,
                    u64::from(n.uplink_kbps),
                    n.extra_latency_us,
                )
            }
        };
        // kbit/s = bits per ms: a frame takes len·8·1000 / kbps microseconds. Chunks
        // queue behind each other; the small frames (maps, requests, not-found) do not
        // wait for them (they go on other connections, which the uplink interleaves),
        // but take their share of it.
        let tx = (len * 8 * 1000).div_ceil(kbps.max(1));
        let start = if matches!(frame, Frame::Chunk(_)) {
            (*free_at).max(now)
        } else {
            now
        };
        *free_at = (*free_at).max(now) + tx;
        let arrive = start + tx + extra + self.link_latency(from, to);
        if matches!((from, to), (Endpoint::Peer(_), Endpoint::Peer(_)))
            && self.cfg.loss > 0.0
            && self.rng.unit() < self.cfg.loss
        {
            self.counters.lost_frames += 1;
            return;
        }
        self.schedule(
            arrive,
            Ev::Frame {
                to,
                from,
                frame,
                len,
            },
        );
    }

    fn link_latency(&self, a: Endpoint, b: Endpoint) -> u64 {
        let key = |e: Endpoint| match e {
            Endpoint::Server => u64::MAX,
            Endpoint::Peer(id) => id,
        };
        self.cfg.latency.link_us(self.cfg.seed, key(a), key(b))
    }

    fn at_peer(&mut self, id: PeerId, msg: ToPeer) {
        match msg {
            ToPeer::Joined {
                parents,
                neighbours,
            } => {
                let Some(n) = self.nodes.get_mut(&id).filter(|n| n.life == Life::Joining) else {
                    return;
                };
                n.life = Life::Live;
                for (s, p) in parents.into_iter().enumerate() {
                    self.set_parent(id, s as u16, p);
                }
                for nb in neighbours {
                    self.link_neighbours(id, nb);
                }
                if let Drive::Periodic(p) = self.cfg.drive {
                    let at = self.now + us(p).min(id % us(p).max(1));
                    self.schedule(at, Ev::Tick(id));
                }
                self.after(id);
            }
            ToPeer::Refused => {
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.life = Life::Gone;
                }
            }
            ToPeer::Assign { substream, parent } => {
                if self.nodes.get(&id).is_some_and(Node::receives) {
                    self.set_parent(id, substream, parent);
                    self.after(id);
                }
            }
            ToPeer::ReSearched { substream, parent } => {
                if let Some(n) = self.nodes.get_mut(&id).filter(|n| n.receives()) {
                    n.peer.research_answered(substream);
                    self.set_parent(id, substream, parent);
                    self.after(id);
                }
            }
        }
    }

    fn set_parent(&mut self, child: PeerId, s: u16, parent: Parent) {
        let now = Duration::from_micros(self.now);
        let Some(n) = self.nodes.get_mut(&child) else {
            return;
        };
        let had = n.parents.get(usize::from(s)).copied().flatten();
        if had == Some(parent) {
            return;
        }
        n.set_parent(s, parent, now);
        let lat = |sim: &Sim, p: PeerId| {
            sim.now + sim.link_latency(Endpoint::Peer(child), Endpoint::Peer(p))
        };
        match had {
            Some(Parent::Server) => {
                self.server_subs[usize::from(s)].remove(&child);
            }
            Some(Parent::Peer(o)) => {
                let at = lat(self, o);
                self.schedule(
                    at,
                    Ev::Link {
                        parent: o,
                        child,
                        substream: s,
                        add: false,
                    },
                );
            }
            None => {}
        }
        match parent {
            Parent::Server => {
                self.server_subs[usize::from(s)].insert(child);
            }
            Parent::Peer(p) => {
                let at = lat(self, p);
                self.schedule(
                    at,
                    Ev::Link {
                        parent: p,
                        child,
                        substream: s,
                        add: true,
                    },
                );
            }
        }
    }

    fn link_neighbours(&mut self, a: PeerId, b: PeerId) {
        if a == b || !self.nodes.get(&b).is_some_and(|n| n.life != Life::Gone) {
            return;
        }
        #[cfg(test)]
        if self.check_early {
            self.check_early_tick(b);
        }
        for (x, y) in [(a, b), (b, a)] {
            if let Some(n) = self.nodes.get_mut(&x) {
                n.add_neighbour(y);
            }
        }
        // `b` is not this event's target: run and re-arm it here.
        self.after(b);
        if matches!(self.cfg.drive, Drive::Deadlines) {
            self.rearm(b);
        }
    }

    /// A viewer stops (leave or crash); the control plane hears of it after `notice_us`.
    fn stop(&mut self, id: PeerId, notice_us: u64) {
        let Some(n) = self.nodes.get_mut(&id).filter(|n| n.life != Life::Gone) else {
            return;
        };
        let was_joining = n.life == Life::Joining;
        n.life = Life::Gone;
        let mut linked: BTreeSet<PeerId> = n.neighbours.iter().copied().collect();
        for p in n.parents.iter().flatten() {
            if let Parent::Peer(p) = p {
                linked.insert(*p);
            }
        }
        for subs in &mut self.server_subs {
            subs.remove(&id);
        }
        let close = self.now + us(self.cfg.link_close_delay);
        for to in linked {
            self.schedule(close, Ev::LinkClosed { to, gone: id });
        }
        if !was_joining {
            self.schedule(self.now + notice_us, Ev::ToControl(ToControl::Leave(id)));
        } else {
            // Its join may still be answered: leave after it.
            let at = self.now + notice_us + 2 * us(self.cfg.control_latency);
            self.schedule(at, Ev::ToControl(ToControl::Leave(id)));
        }
    }

    /// Once a second: server egress against the fluid bound, depth, booster.
    fn sample(&mut self) {
        let st = self.control.stats();
        if self.now > us(self.cfg.measure_from) && self.counters.samples == 0 {
            // The start of the measured window: what was due before it.
            for n in self.nodes.values_mut() {
                let s = n.peer.stats();
                n.due_before_measure = (s.played, s.skipped);
            }
        }
        let c = &mut self.counters;
        if self.now > us(self.cfg.measure_from) {
            c.samples += 1;
            c.fluid_kbps_sum += st.fluid_bound_kbps();
        }
        c.max_depth = c.max_depth.max(st.max_depth);
        c.max_booster_slots = c.max_booster_slots.max(st.booster_slots);
        let at = self.now + 1_000_000;
        self.schedule(at, Ev::Sample);
    }
}
