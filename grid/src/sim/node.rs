//! The per-peer glue, in one place: what the SDK's relay engine does around its
//! [`PeerScheduler`], minus the sockets. A [`Node`] turns frames from the network into
//! scheduler events, and the scheduler's actions into frames for the network, under the
//! relay's upload policy:
//!
//! * pushes are paced per child ([`ChildPace`], each child its share of the budget in
//!   proportion to the substreams it takes); a push beyond the share is skipped and
//!   announced with a `NOT_FOUND`, which the child reads as its parent skipping
//!   ([`PeerScheduler::on_parent_skipped`]) and repairs;
//! * serves (mesh repair) spend only what pushes leave of the budget (a token bucket of
//!   the whole budget, starting empty, holding at most two seconds of it);
//! * an unsolicited `NOT_FOUND` from the parent of that chunk's substream is a skipped
//!   push, any other one answers a request.
//!
//! Not modelled here: the SDK's [`crate::peer::UploadEstimator`] (the simulated uplink
//! is what the peer declares, so it never finds it lower), bad-chunk bans and tickets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::Parent;
use crate::peer::{Action, BufferMap, ChildPace, PeerId, PeerScheduler, Source};

use super::FrameSizes;

/// One end of a simulated link: the data plane or a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// The data plane (the source's server).
    Server,
    /// A viewer.
    Peer(PeerId),
}

impl From<Parent> for Endpoint {
    fn from(p: Parent) -> Endpoint {
        match p {
            Parent::Server => Endpoint::Server,
            Parent::Peer(id) => Endpoint::Peer(id),
        }
    }
}

/// A data-plane frame between peers (or a peer and the server), by kind.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Frame {
    Chunk(u64),
    BufferMap(BufferMap),
    Request(u64),
    NotFound(u64),
}

/// What a node asks of the rest of the simulation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Upcall {
    /// Put a frame on this node's uplink.
    Send { to: Endpoint, frame: Frame },
    /// Ask the control plane for a new parent.
    ReSearch {
        substream: u16,
        exclude: Option<PeerId>,
    },
    /// Report a parent that did not deliver.
    Report { parent: PeerId },
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    /// Join sent, no assignment yet.
    Joining,
    /// Assigned and running.
    Live,
    /// Connected but sending nothing (a hung process): it still receives.
    Silent,
    /// Left or crashed.
    Gone,
}

/// The SDK's upload bucket (serves spend only what pushes leave).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    rate_bytes: f64,
    at_us: u64,
}

impl Bucket {
    const BURST_S: f64 = 2.0;

    fn refill(&mut self, now_us: u64) {
        let dt = now_us.saturating_sub(self.at_us) as f64 / 1e6;
        self.at_us = now_us;
        self.tokens = (self.tokens + dt * self.rate_bytes).min(self.rate_bytes * Self::BURST_S);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Child {
    mask: u64,
    pace: ChildPace,
}

/// One simulated peer.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub sched: PeerScheduler,
    pub life: Life,
    pub budget_kbps: u32,
    pub uplink_kbps: u32,
    pub addr_prefix: u32,
    /// Added to everything this node sends ("slow" peer).
    pub extra_latency_us: u64,
    /// When its uplink is free again (frames queue behind each other).
    pub uplink_free_at: u64,
    /// Its view of its parents, by substream.
    pub parents: Vec<Option<Parent>>,
    children: BTreeMap<PeerId, Child>,
    used_slots: u32,
    pub neighbours: BTreeSet<PeerId>,
    requested: BTreeSet<(Endpoint, u64)>,
    bucket: Bucket,
    /// Re-searches: (when, substream, excluded parent).
    pub research_log: Vec<(Duration, u16, Option<PeerId>)>,
    /// Deadline-driven ticking: the one tick scheduled.
    pub wake_at: Option<u64>,
    /// Ticks at the current instant (a `next_timeout` that never moves on would spin).
    pub ticks_now: (u64, u32),
    /// Lag of its latest play: play time − the chunk's availability at the source.
    pub lag_us: Option<u64>,
    pub bytes_from_peers: u64,
    pub bytes_from_server: u64,
    /// (played, skipped) when the report's measured window began.
    pub due_before_measure: (u64, u64),
    k: u64,
}

impl Node {
    pub fn new(
        sched: PeerScheduler,
        budget_kbps: u32,
        uplink_kbps: u32,
        addr_prefix: u32,
        substreams: u16,
        now_us: u64,
    ) -> Node {
        let k = u64::from(substreams.max(1));
        Node {
            sched,
            life: Life::Joining,
            budget_kbps,
            uplink_kbps,
            addr_prefix,
            extra_latency_us: 0,
            uplink_free_at: 0,
            parents: vec![None; k as usize],
            children: BTreeMap::new(),
            used_slots: 0,
            neighbours: BTreeSet::new(),
            requested: BTreeSet::new(),
            bucket: Bucket {
                tokens: 0.0,
                rate_bytes: f64::from(budget_kbps) * 1000.0 / 8.0,
                at_us: now_us,
            },
            research_log: Vec::new(),
            wake_at: None,
            ticks_now: (0, 0),
            lag_us: None,
            bytes_from_peers: 0,
            bytes_from_server: 0,
            due_before_measure: (0, 0),
            k,
        }
    }

    /// Alive and sending.
    pub fn sends(&self) -> bool {
        self.life == Life::Live
    }

    /// Alive (receiving), whether or not it sends.
    pub fn receives(&self) -> bool {
        matches!(self.life, Life::Live | Life::Silent)
    }

    /// The control plane changed this node's parent for `substream`. Returns the old
    /// parent (to unsubscribe from) when it changed.
    pub fn set_parent(&mut self, substream: u16, parent: Parent, now: Duration) -> Option<Parent> {
        let slot = self.parents.get_mut(usize::from(substream))?;
        let old = slot.replace(parent);
        if old == Some(parent) {
            return None;
        }
        self.sched.on_parent_changed(substream, Some(parent), now);
        old
    }

    /// A child subscribed to `substream` of this node (child admission).
    pub fn add_child(&mut self, child: PeerId, substream: u16) {
        let bit = 1u64 << substream;
        let c = self.children.entry(child).or_default();
        if c.mask & bit == 0 {
            c.mask |= bit;
            self.used_slots += 1;
        }
        self.sched.on_child_added(child, &[substream]);
    }

    /// A child unsubscribed from `substream` of this node.
    pub fn remove_child(&mut self, child: PeerId, substream: u16) {
        let bit = 1u64 << substream;
        if let Some(c) = self.children.get_mut(&child)
            && c.mask & bit != 0
        {
            c.mask &= !bit;
            self.used_slots -= 1;
            if c.mask == 0 {
                self.children.remove(&child);
            }
        }
        self.sched.on_child_removed(child, &[substream]);
    }

    /// Its children in `substream`.
    pub fn children_in(&self, substream: u16) -> Vec<PeerId> {
        self.children
            .iter()
            .filter(|(_, c)| c.mask & (1u64 << substream) != 0)
            .map(|(&id, _)| id)
            .collect()
    }

    /// A frame of `len` bytes arrived from `from`.
    pub fn on_frame(&mut self, from: Endpoint, frame: Frame, len: u64, now: Duration) {
        match frame {
            Frame::Chunk(seq) => {
                let s = (seq % self.k) as u16;
                self.requested.remove(&(from, seq));
                let parent = self.parents[usize::from(s)].map(Endpoint::from);
                let src = match from {
                    _ if parent == Some(from) => Source::Parent(s),
                    Endpoint::Server => Source::Server,
                    Endpoint::Peer(id) => Source::Neighbour(id),
                };
                match from {
                    Endpoint::Server => self.bytes_from_server += len,
                    Endpoint::Peer(_) => self.bytes_from_peers += len,
                }
                self.sched.on_chunk(seq, src, now);
            }
            Frame::BufferMap(map) => {
                if let Endpoint::Peer(id) = from {
                    self.sched.on_buffer_map(id, map, now);
                }
            }
            Frame::Request(seq) => {
                if let Endpoint::Peer(id) = from {
                    self.sched.on_request(id, seq);
                }
            }
            Frame::NotFound(seq) => {
                let s = (seq % self.k) as u16;
                let from_parent = self.parents[usize::from(s)].map(Endpoint::from) == Some(from);
                if self.requested.remove(&(from, seq)) || !from_parent {
                    if let Endpoint::Peer(id) = from {
                        self.sched.on_not_found(id, seq, now);
                    }
                } else {
                    self.sched.on_parent_skipped(seq, now);
                }
            }
        }
    }

    /// Runs the scheduler's pending actions under the upload policy.
    pub fn drain(&mut self, now_us: u64, chunk_us: u64, sizes: &FrameSizes, out: &mut Vec<Upcall>) {
        let now = Duration::from_micros(now_us);
        while let Some(a) = self.sched.poll_action() {
            match a {
                Action::Push { child, seq } => self.upload(child, seq, true, now_us, sizes, out),
                Action::Serve { to, seq } => self.upload(to, seq, false, now_us, sizes, out),
                Action::NotFound { to, seq } => out.push(Upcall::Send {
                    to: Endpoint::Peer(to),
                    frame: Frame::NotFound(seq),
                }),
                Action::Request { neighbour, seq } => {
                    self.request(Endpoint::Peer(neighbour), seq);
                    out.push(Upcall::Send {
                        to: Endpoint::Peer(neighbour),
                        frame: Frame::Request(seq),
                    });
                }
                Action::RequestFromServer { seq } => {
                    self.request(Endpoint::Server, seq);
                    out.push(Upcall::Send {
                        to: Endpoint::Server,
                        frame: Frame::Request(seq),
                    });
                }
                Action::SendBufferMap { to, map } => out.push(Upcall::Send {
                    to: Endpoint::Peer(to),
                    frame: Frame::BufferMap(map),
                }),
                Action::ReSearch { substream, exclude } => {
                    self.research_log.push((now, substream, exclude));
                    out.push(Upcall::ReSearch { substream, exclude });
                }
                Action::ReportParent { parent, .. } => out.push(Upcall::Report { parent }),
                Action::Play { seq } => {
                    // Chunk `seq` is available at the source at (seq + 1)·d.
                    let avail = (seq + 1).saturating_mul(chunk_us);
                    self.lag_us = Some(now_us.saturating_sub(avail));
                }
                Action::Skip { .. } => {}
            }
        }
    }

    fn request(&mut self, to: Endpoint, seq: u64) {
        if self.requested.len() >= 4096 {
            self.requested.pop_first();
        }
        self.requested.insert((to, seq));
    }

    /// Sends a held chunk to a child (push) or a requester (serve), as the SDK's
    /// `upload` does.
    fn upload(
        &mut self,
        to: PeerId,
        seq: u64,
        push: bool,
        now_us: u64,
        sizes: &FrameSizes,
        out: &mut Vec<Upcall>,
    ) {
        let not_found = Upcall::Send {
            to: Endpoint::Peer(to),
            frame: Frame::NotFound(seq),
        };
        if !self.sched.has(seq) {
            if !push {
                out.push(not_found);
            }
            return;
        }
        let len = sizes.chunk_frame() as f64;
        self.bucket.refill(now_us);
        let allowed = if push {
            let Some(c) = self.children.get_mut(&to) else {
                return;
            };
            c.pace.allow(
                self.bucket.rate_bytes,
                c.mask.count_ones(),
                self.used_slots,
                len,
                Duration::from_micros(now_us),
            )
        } else {
            self.bucket.tokens >= len
        };
        if !allowed {
            out.push(not_found);
            return;
        }
        self.bucket.tokens -= len;
        out.push(Upcall::Send {
            to: Endpoint::Peer(to),
            frame: Frame::Chunk(seq),
        });
    }
}
