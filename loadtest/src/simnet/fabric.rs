//! The in-process peer-to-peer network, in real time. One task owns every simulated
//! viewer ([`SimPeer`], a `Vec` indexed by local peer index: no lock on the hot path)
//! and a timer heap of what is due: frame deliveries, node deadlines, link changes, the
//! in-process source's chunks; it sleeps until the earliest (one `sleep_until`).
//!
//! Frames between peers take the link's one-way latency ([`Latency`], drawn once per
//! link), queue on the sender's uplink at its rate (serialization, as the grid's
//! simulator does), plus optional jitter and loss; their sizes are the wire's
//! ([`FrameSizes`]), and chunk frames carry the sender's shared [`Bytes`]. What the
//! nodes ask of the control plane and of the data plane leaves as [`Up`] messages; the
//! answers come back as [`Input`]s. With the in-process server ([`ServerMode::InProcess`])
//! the fabric cuts the source's chunks itself and serves subscriptions and requests.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use starling_grid::Parent;
use starling_grid::peer::{Peer, PeerConfig, PeerId, SchedulerConfig};
use starling_grid::sim::{Endpoint, Frame, FrameSizes, Life, Node, SimRng, Upcall};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::msg::{FabricConfig, Input, ServerMode, SimChunk, Up};
use super::peer::{Phase, SimPeer};
use super::stats::Snapshot;

/// The uplink of a peer that declares no relay budget, kbit/s (it still sends
/// requests and buffer maps).
const MIN_UPLINK_KBPS: u32 = 128;
/// Ticks of one node at one instant before it is made to wait (a `next_timeout` that
/// never moves on would spin).
const MAX_TICKS_AT_ONCE: u32 = 50;
/// Server requests waiting for a chunk not yet cut (in-process server).
pub(super) const MAX_WAITING: usize = 100_000;
/// Links waiting for a viewer's join answer to reach the fabric.
pub(super) const MAX_PENDING: usize = 100_000;
/// Chunks the in-process server keeps.
pub(super) const SERVER_WINDOW: usize = 256;

/// A link to a viewer the fabric does not know yet.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pending {
    /// Viewer (index) takes substream `s` from it.
    Child(usize, u16),
    /// Viewer (index) has it as a mesh neighbour.
    Neighbour(usize),
}

#[derive(Debug)]
pub(super) enum Ev {
    Frame {
        to: usize,
        from: Endpoint,
        frame: Frame,
        chunk: Option<Arc<SimChunk>>,
        len: u64,
    },
    Tick(usize),
    Link {
        parent: usize,
        child: PeerId,
        substream: u16,
        add: bool,
    },
    LinkClosed {
        to: usize,
        gone: PeerId,
    },
    Emit(u64),
    Sample,
}

#[derive(Debug)]
struct Timed {
    at: u64,
    no: u64,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Timed) -> bool {
        (self.at, self.no) == (o.at, o.no)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Timed) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Timed) -> Ordering {
        (self.at, self.no).cmp(&(o.at, o.no))
    }
}

/// The network's own figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetCounters {
    /// Frames carried between peers.
    pub frames: u64,
    /// Their bytes.
    pub frame_bytes: u64,
    /// Frames lost on purpose ([`SimNetConfig::loss`]).
    pub lost: u64,
    /// Chunk frames from the server (pushes and answers).
    pub server_chunks: u64,
    /// [`Up`] messages dropped because the servers' queue was full.
    pub up_dropped: u64,
    /// Frames a node sent of a chunk whose bytes it no longer had.
    pub missing_bytes: u64,
    /// Node deadlines run.
    pub ticks: u64,
    /// Times a node was made to wait after ticking at one instant too often.
    pub spins: u64,
    /// Events run later than due by more than 50 ms (the fabric falling behind).
    pub late_events: u64,
    /// The largest such delay, µs.
    pub max_late_us: u64,
}

/// The fabric (see the module docs); run it with [`Fabric::spawn`].
pub struct Fabric {
    pub(super) cfg: FabricConfig,
    pub(super) sched: SchedulerConfig,
    pub(super) sizes: FrameSizes,
    pub(super) chunk_us: u64,
    pub(super) k: u16,
    pub(super) origin: Instant,
    heap: BinaryHeap<Reverse<Timed>>,
    pub(super) no: u64,
    pub(super) peers: Vec<SimPeer>,
    pub(super) ids: HashMap<PeerId, usize>,
    pub(super) server_subs: Vec<BTreeSet<usize>>,
    pub(super) window: BTreeMap<u64, Arc<SimChunk>>,
    pub(super) waiting: BTreeMap<u64, Vec<usize>>,
    pub(super) waiting_len: usize,
    pub(super) pending: HashMap<PeerId, Vec<Pending>>,
    pub(super) pending_len: usize,
    /// Under [`ServerMode::Wire`], whether [`Input::Origin`] came.
    origin_known: bool,
    /// The origin in unix ms (0: the in-process server's chunks carry fabric times).
    pub(super) origin_unix_ms: u64,
    /// What waits for the origin.
    held: Vec<Input>,
    /// Fabric time at its start (moved with the origin).
    pub(super) started_us: u64,
    pub(super) up: mpsc::Sender<Up>,
    pub(super) rng: SimRng,
    pub(super) upcalls: Vec<Upcall>,
    pub(super) net: NetCounters,
    pub(super) lag_hist: BTreeMap<u64, u64>,
    pub(super) errors: Vec<String>,
}

/// A running fabric.
#[derive(Debug)]
pub struct FabricHandle {
    tx: mpsc::Sender<Input>,
    task: JoinHandle<()>,
}

pub(super) fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Fabric {
    /// Starts the fabric's task; what its nodes ask of the servers goes to `up`.
    pub fn spawn(cfg: FabricConfig, up: mpsc::Sender<Up>) -> FabricHandle {
        let (tx, rx) = mpsc::channel(cfg.net.queue.max(16));
        let fabric = Fabric::new(cfg, up);
        let task = tokio::spawn(fabric.run(rx));
        FabricHandle { tx, task }
    }

    fn new(cfg: FabricConfig, up: mpsc::Sender<Up>) -> Fabric {
        let net = &cfg.net;
        let k = net.substreams.clamp(1, 64);
        let lag = net.target_lag.unwrap_or(starling_sdk::DEFAULT_TARGET_LAG);
        let sched = starling_sdk::scheduler_config(k, net.chunk_duration, lag);
        let sizes = FrameSizes::signed(net.payload_len() as u64);
        let chunk_us = us(net.chunk_duration).max(1);
        let rng = SimRng::new(net.seed);
        let mut f = Fabric {
            sched,
            sizes,
            chunk_us,
            k,
            origin: Instant::now(),
            heap: BinaryHeap::new(),
            no: 0,
            peers: Vec::new(),
            ids: HashMap::new(),
            server_subs: vec![BTreeSet::new(); usize::from(k)],
            window: BTreeMap::new(),
            waiting: BTreeMap::new(),
            waiting_len: 0,
            pending: HashMap::new(),
            pending_len: 0,
            origin_known: cfg.server == ServerMode::InProcess,
            held: Vec::new(),
            origin_unix_ms: 0,
            started_us: 0,
            up,
            rng,
            upcalls: Vec::new(),
            net: NetCounters::default(),
            lag_hist: BTreeMap::new(),
            errors: Vec::new(),
            cfg,
        };
        if f.cfg.server == ServerMode::InProcess {
            f.schedule(chunk_us, Ev::Emit(0));
        }
        f.schedule(1_000_000, Ev::Sample);
        f
    }

    /// Moves the origin to the stream's chunk 0 (see [`Input::Origin`]): fabric times
    /// taken so far shift with it.
    fn set_origin(&mut self, unix_ms: u64) {
        self.origin_known = true;
        self.origin_unix_ms = unix_ms;
        let behind = starling_proto::time::unix_ms().saturating_sub(unix_ms);
        let Some(origin) = Instant::now().checked_sub(Duration::from_millis(behind)) else {
            return;
        };
        let shift = us(self.origin.saturating_duration_since(origin));
        self.origin = origin;
        self.started_us += shift;
        for p in &mut self.peers {
            p.join_sent += Duration::from_micros(shift);
        }
        // Only the sampler is scheduled before any node exists.
        self.heap.clear();
        let at = self.now_us() + 1_000_000;
        self.schedule(at, Ev::Sample);
    }

    /// Fabric time now, µs since its start.
    pub(super) fn now_us(&self) -> u64 {
        us(self.origin.elapsed())
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        'outer: loop {
            let next = self.heap.peek().map(|Reverse(t)| t.at);
            let origin = self.origin;
            let sleep = async move {
                match next {
                    Some(at) => tokio::time::sleep_until(origin + Duration::from_micros(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    if !self.input(m) {
                        break;
                    }
                    // Take what else is queued before looking at the clock again.
                    for _ in 0..1024 {
                        match rx.try_recv() {
                            Ok(m) => {
                                if !self.input(m) {
                                    break 'outer;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                () = sleep => {}
            }
            self.run_due();
        }
        let now = Duration::from_micros(self.now_us());
        for i in 0..self.peers.len() {
            let active = self.peers.get(i).is_some_and(SimPeer::active);
            if active && let Some(p) = self.peers.get(i) {
                p.publish(self.chunk_us / 1000);
            }
            self.stop_peer(i);
            if active {
                if let Some(p) = self.peers.get_mut(i) {
                    p.phase = Phase::Left;
                    p.left = Some(now);
                }
                self.send_up(Up::Leave { index: i });
            }
        }
    }

    pub(super) fn schedule(&mut self, at: u64, ev: Ev) {
        self.no += 1;
        self.heap.push(Reverse(Timed {
            at,
            no: self.no,
            ev,
        }));
    }

    pub(super) fn send_up(&mut self, m: Up) {
        if self.up.try_send(m).is_err() {
            self.net.up_dropped += 1;
        }
    }

    fn run_due(&mut self) {
        let now = self.now_us();
        while let Some(Reverse(t)) = self.heap.peek() {
            if t.at > now {
                break;
            }
            let Some(Reverse(t)) = self.heap.pop() else {
                break;
            };
            let late = now - t.at;
            if late > 50_000 {
                self.net.late_events += 1;
                self.net.max_late_us = self.net.max_late_us.max(late);
            }
            self.handle(t.at, t.ev, now);
        }
    }

    /// `false`: stop.
    fn input(&mut self, m: Input) -> bool {
        let now = self.now_us();
        if !self.origin_known {
            match m {
                Input::Origin { unix_ms } => {
                    self.set_origin(unix_ms);
                    for m in std::mem::take(&mut self.held) {
                        if !self.input(m) {
                            return false;
                        }
                    }
                    return true;
                }
                m @ (Input::Joined { .. }
                | Input::Failed { .. }
                | Input::Assign { .. }
                | Input::ResearchFailed { .. }
                | Input::Neighbour { .. }) => {
                    self.held.push(m);
                    return true;
                }
                // Nothing can be held before the origin is known.
                Input::ServerChunk { .. } | Input::ServerNotFound { .. } => return true,
                _ => {}
            }
        }
        match m {
            Input::Origin { .. } => {}
            Input::ServerNotFound { index, seq } => {
                let len = self.sizes.control_frame();
                self.deliver(
                    index,
                    Endpoint::Server,
                    Frame::NotFound(seq),
                    None,
                    len,
                    now,
                );
            }
            Input::Joined {
                index,
                peer_id,
                child_slots,
                parents,
                neighbours,
                rpc_ms,
                bytes,
            } => {
                if let Some(p) = self.peers.get_mut(index) {
                    p.bytes = bytes;
                }
                self.joined(
                    index,
                    peer_id,
                    child_slots,
                    parents,
                    neighbours,
                    rpc_ms,
                    now,
                );
            }
            Input::ResearchFailed { index, substream } => {
                if let Some(n) = self.node_mut(index) {
                    n.peer.research_answered(substream);
                }
                self.rearm(index, now);
            }
            Input::Failed { index, error } => {
                if self.errors.len() < 32 {
                    self.errors.push(format!("peer {index}: {error}"));
                }
                self.stop_peer(index);
                if let Some(p) = self.peers.get_mut(index) {
                    p.phase = Phase::Failed;
                }
            }
            Input::Assign {
                index,
                substream,
                parent,
                research,
            } => {
                let Some(n) = self.node_mut(index) else {
                    return true;
                };
                if research {
                    n.peer.research_answered(substream);
                }
                self.set_parent(index, substream, parent, now);
                self.after(index, now);
            }
            Input::Revoked { index, peers } => {
                let Some(n) = self.node_mut(index) else {
                    return true;
                };
                let me = n.peer.me();
                for p in peers.into_iter().filter(|&p| p != me) {
                    n.link_closed(p);
                }
                self.after(index, now);
            }
            Input::Neighbour { index, neighbour } => match self.ids.get(&neighbour) {
                Some(&b) => self.link_neighbours(index, b, now),
                None => self.pending_link(neighbour, Pending::Neighbour(index)),
            },
            Input::ServerChunk { index, chunk } => {
                let len =
                    self.sizes.chunk_frame() - self.sizes.payload + chunk.payload.len() as u64;
                self.deliver(
                    index,
                    Endpoint::Server,
                    Frame::Chunk(chunk.seq),
                    Some(chunk),
                    len,
                    now,
                );
            }
            Input::Add { count } => {
                for _ in 0..count {
                    let index = self.peers.len();
                    let upload = self
                        .cfg
                        .upload
                        .upload_kbps(self.cfg.index_offset + index, self.cfg.net.stream_kbps);
                    self.peers
                        .push(SimPeer::new(index, upload, Duration::from_micros(now)));
                    self.send_up(Up::Join {
                        index,
                        upload_kbps: upload,
                    });
                }
            }
            Input::Leave { count } => {
                let mut active: Vec<usize> = self
                    .peers
                    .iter()
                    .filter(|p| p.active())
                    .map(|p| p.index)
                    .collect();
                for _ in 0..count.min(active.len()) {
                    let i = self.rng.below(active.len() as u64) as usize;
                    let index = active.swap_remove(i);
                    if let Some(p) = self.peers.get(index) {
                        p.publish(self.chunk_us / 1000);
                    }
                    self.stop_peer(index);
                    if let Some(p) = self.peers.get_mut(index) {
                        p.phase = Phase::Left;
                        p.left = Some(Duration::from_micros(now));
                    }
                    self.send_up(Up::Leave { index });
                }
            }
            Input::Snapshot { records, reply } => {
                let _ = reply.send(self.snapshot(records));
            }
            Input::Stop => return false,
        }
        true
    }

    pub(super) fn node_mut(&mut self, index: usize) -> Option<&mut Node> {
        self.peers
            .get_mut(index)
            .and_then(|p| p.node.as_mut())
            .filter(|n| n.receives())
    }

    #[allow(clippy::too_many_arguments)]
    fn joined(
        &mut self,
        index: usize,
        peer_id: PeerId,
        child_slots: u32,
        parents: Vec<Parent>,
        neighbours: Vec<PeerId>,
        rpc_ms: Option<u64>,
        now: u64,
    ) {
        let stream_kbps = self.cfg.net.stream_kbps;
        let sched = self.sched;
        let Some(p) = self
            .peers
            .get_mut(index)
            .filter(|p| p.phase == Phase::Joining)
        else {
            return;
        };
        let upload = p.upload_kbps;
        let peer = Peer::new(
            PeerConfig {
                me: peer_id,
                scheduler: sched,
                upload_kbps: upload,
                budget_kbps: upload,
                stream_kbps,
                child_slots,
            },
            Duration::from_micros(now),
        );
        let peer = match peer {
            Ok(peer) => peer,
            Err(e) => {
                p.phase = Phase::Failed;
                if self.errors.len() < 32 {
                    self.errors.push(format!("peer {index}: scheduler: {e}"));
                }
                return;
            }
        };
        let uplink = (f64::from(upload) * self.cfg.net.uplink_factor.max(1.0)).round() as u32;
        let mut node = Node::new(peer, upload, uplink.max(MIN_UPLINK_KBPS), 0);
        node.life = Life::Live;
        node.report_plays = true;
        p.node = Some(node);
        p.phase = Phase::Active;
        p.joined = Some(Duration::from_micros(now));
        p.join_rpc_ms = rpc_ms;
        self.ids.insert(peer_id, index);
        for (s, parent) in parents.into_iter().enumerate() {
            self.set_parent(index, s as u16, parent, now);
        }
        for nb in neighbours {
            match self.ids.get(&nb) {
                Some(&b) => self.link_neighbours(index, b, now),
                None => self.pending_link(nb, Pending::Neighbour(index)),
            }
        }
        self.take_pending(peer_id, index, now);
        self.after(index, now);
    }

    fn handle(&mut self, at: u64, ev: Ev, now: u64) {
        match ev {
            Ev::Frame {
                to,
                from,
                frame,
                chunk,
                len,
            } => {
                if let Endpoint::Peer(s) = from
                    && !self
                        .ids
                        .get(&s)
                        .and_then(|&i| self.peers.get(i))
                        .and_then(|p| p.node.as_ref())
                        .is_some_and(Node::sends)
                {
                    return; // the sender died with the frame in flight
                }
                self.deliver(to, from, frame, chunk, len, now);
            }
            Ev::Tick(i) => self.tick(i, at, now),
            Ev::Link {
                parent,
                child,
                substream,
                add,
            } => {
                // The child's SUBSCRIBE says where it starts, and the RELAYING right
                // after it what it relays.
                let c = self
                    .ids
                    .get(&child)
                    .and_then(|&i| self.peers.get(i))
                    .and_then(|p| p.node.as_ref());
                let start = c.and_then(|c| c.peer.resume_from());
                let relaying = c.map_or(0, |c| c.peer.relaying());
                let Some(n) = self.node_mut(parent) else {
                    return;
                };
                if add {
                    n.add_child(child, substream, start);
                    n.peer.set_child_relaying(child, relaying);
                } else {
                    n.remove_child(child, substream);
                }
                self.after(parent, now);
            }
            Ev::LinkClosed { to, gone } => {
                let Some(n) = self.node_mut(to) else { return };
                n.link_closed(gone);
                self.after(to, now);
            }
            Ev::Emit(seq) => self.emit(seq, at),
            Ev::Sample => {
                self.sample_lag();
                self.schedule(at + 1_000_000, Ev::Sample);
            }
        }
    }

    /// A frame reaches viewer `to` (or, from a viewer, the in-process server).
    pub(super) fn deliver(
        &mut self,
        to: usize,
        from: Endpoint,
        frame: Frame,
        chunk: Option<Arc<SimChunk>>,
        len: u64,
        now: u64,
    ) {
        let chunk_ms = self.chunk_us / 1000;
        let payload = chunk.as_ref().map_or(0, |c| c.payload.len() as u64);
        let Some(p) = self.peers.get_mut(to).filter(|p| p.active()) else {
            return;
        };
        let Some(n) = p.node.as_mut().filter(|n| n.receives()) else {
            return;
        };
        n.next_cut_ms = chunk
            .as_ref()
            .map(|c| c.cut_ms.saturating_sub(self.origin_unix_ms));
        let is_new = n.on_frame(from, frame, len, chunk_ms, Duration::from_micros(now));
        if is_new && let Some(c) = chunk {
            match from {
                Endpoint::Server => p.payload_from_server += payload,
                Endpoint::Peer(_) => p.payload_from_peers += payload,
            }
            if let Some(b) = &p.bytes {
                let c = match from {
                    Endpoint::Server => &b.from_server,
                    Endpoint::Peer(_) => &b.from_peers,
                };
                c.fetch_add(payload, std::sync::atomic::Ordering::Relaxed);
            }
            p.keep(c);
        }
        self.after(to, now);
    }

    fn tick(&mut self, i: usize, at: u64, now: u64) {
        let Some(n) = self.node_mut(i) else { return };
        if n.wake_at != Some(at) {
            return; // superseded
        }
        n.wake_at = None;
        n.ticks_now = if n.ticks_now.0 == at {
            (at, n.ticks_now.1 + 1)
        } else {
            (at, 1)
        };
        if n.ticks_now.1 >= MAX_TICKS_AT_ONCE {
            self.net.spins += 1;
        } else {
            n.peer.handle_timeout(Duration::from_micros(now));
            self.net.ticks += 1;
        }
        self.after(i, now);
    }

    /// Runs a node's pending actions, routes what it asks for, re-arms its deadline.
    pub(super) fn after(&mut self, i: usize, now: u64) {
        let mut up = std::mem::take(&mut self.upcalls);
        let chunk_us = self.chunk_us;
        let sizes = self.sizes;
        let Some(p) = self.peers.get_mut(i) else {
            self.upcalls = up;
            return;
        };
        let Some(n) = p.node.as_mut().filter(|n| n.sends()) else {
            self.upcalls = up;
            return;
        };
        n.drain(now, chunk_us, &sizes, &mut up);
        let pattern = self.cfg.pattern;
        for u in up.drain(..) {
            match u {
                Upcall::Send { to, frame } => self.send(i, to, frame, now),
                Upcall::ReSearch { substream, exclude } => self.send_up(Up::ReSearch {
                    index: i,
                    substream,
                    exclude,
                }),
                Upcall::Report { parent } => self.send_up(Up::Report { index: i, parent }),
                Upcall::Play { seq } => {
                    let origin = self.origin_unix_ms;
                    if let Some(p) = self.peers.get_mut(i) {
                        p.played(seq, pattern.as_ref(), origin, Duration::from_micros(now));
                    }
                }
            }
        }
        self.upcalls = up;
        if let Some(p) = self.peers.get_mut(i) {
            p.prune();
        }
        self.rearm(i, now);
    }

    pub(super) fn rearm(&mut self, i: usize, now: u64) {
        let Some(n) = self.node_mut(i) else { return };
        let Some(t) = n.peer.next_timeout(Duration::from_micros(now)) else {
            n.wake_at = None;
            return;
        };
        let mut t = us(t).max(now);
        if n.ticks_now.0 == now && n.ticks_now.1 >= MAX_TICKS_AT_ONCE {
            t = t.max(now + 1000);
        }
        if n.wake_at == Some(t) {
            return;
        }
        n.wake_at = Some(t);
        self.schedule(t, Ev::Tick(i));
    }

    /// Once a second: every active viewer's lag behind live, and its figures for its
    /// session's quality reports.
    fn sample_lag(&mut self) {
        let chunk_ms = self.chunk_us / 1000;
        for p in &mut self.peers {
            if !p.active() {
                continue;
            }
            p.publish(chunk_ms);
            if let Some(lag) = p.node.as_ref().and_then(|n| n.lag_us) {
                let d = Duration::from_micros(lag);
                p.lag.record(d);
                let b = lag / 1000 / crate::worker::LAG_BUCKET_MS;
                *self.lag_hist.entry(b).or_default() += 1;
            }
        }
    }
}

impl FabricHandle {
    /// Where the servers' answers go.
    pub fn sender(&self) -> mpsc::Sender<Input> {
        self.tx.clone()
    }

    /// `count` more viewers join.
    pub async fn add(&self, count: usize) {
        let _ = self.tx.send(Input::Add { count }).await;
    }

    /// `count` viewers leave.
    pub async fn leave(&self, count: usize) {
        let _ = self.tx.send(Input::Leave { count }).await;
    }

    /// The figures now (`None`: the fabric has stopped).
    pub async fn snapshot(&self, records: bool) -> Option<Snapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Snapshot { records, reply })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Every viewer leaves; waits for the task to end.
    pub async fn stop(self) {
        let _ = self.tx.send(Input::Stop).await;
        let _ = self.task.await;
    }
}
