//! The per-peer glue, in one place: what the SDK's relay engine does around its
//! [`Peer`] state machine, minus the sockets. A [`Node`] keeps the link-level view the
//! engine keeps (its parents' links, its children's subscriptions, the requests it has
//! out), turns frames from the network into the `Peer`'s events, and its
//! [`PeerAction`]s into frames for the network. The policies are the `Peer`'s: push
//! pacing per child with announced skips (partial slots), the serve bucket, one
//! re-search per substream at a time, the play clock. As the engine does, a `NOT_FOUND`
//! that answers none of this node's requests and comes from the parent of that chunk's
//! substream is a skipped push ([`Peer::handle_parent_skipped`]).
//!
//! Not modelled here: the SDK's [`crate::peer::UploadEstimator`] (a simulated uplink is
//! what the peer declares, so it never finds it lower), link failures
//! ([`Peer::parent_failed`]), bad-chunk bans and tickets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::Parent;
use crate::peer::{BufferMap, Peer, PeerAction, PeerId, Source};

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
pub enum Frame {
    /// A chunk, by sequence number (its bytes are the host's).
    Chunk(u64),
    /// A neighbour's buffer map.
    BufferMap(BufferMap),
    /// A repair request.
    Request(u64),
    /// A refused request, or a push skipped over the sender's budget.
    NotFound(u64),
    /// The substreams the sender relays on to children of its own (to its parents).
    Relaying(u64),
}

/// What a node asks of the rest of the simulation.
#[derive(Debug, Clone, PartialEq)]
pub enum Upcall {
    /// Put a frame on this node's uplink.
    Send {
        /// Its destination.
        to: Endpoint,
        /// The frame.
        frame: Frame,
    },
    /// Ask the control plane for a new parent.
    ReSearch {
        /// The substream whose parent is lost, late or silent.
        substream: u16,
        /// Parents the control plane must not give again.
        exclude: Vec<PeerId>,
    },
    /// Report a parent that did not deliver.
    Report {
        /// The parent.
        parent: PeerId,
    },
    /// Chunk `seq` was handed to the player (only with [`Node::report_plays`]).
    Play {
        /// The chunk.
        seq: u64,
    },
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Join sent, no assignment yet.
    Joining,
    /// Assigned and running.
    Live,
    /// Connected but sending nothing (a hung process): it still receives.
    Silent,
    /// Left or crashed.
    Gone,
}

/// One simulated peer.
#[derive(Debug, Clone)]
pub struct Node {
    /// The peer's state machine.
    pub peer: Peer,
    /// Where it is in its life.
    pub life: Life,
    /// Declared relay budget, kbit/s.
    pub budget_kbps: u32,
    /// Physical uplink, kbit/s.
    pub uplink_kbps: u32,
    /// Address prefix (locality).
    pub addr_prefix: u32,
    /// Added to everything this node sends ("slow" peer).
    pub extra_latency_us: u64,
    /// When its uplink is free again (frames queue behind each other).
    pub uplink_free_at: u64,
    /// Its parents' links, by substream (`None` before its assignment).
    pub parents: Vec<Option<Parent>>,
    /// Its children's subscriptions (substream masks).
    children: BTreeMap<PeerId, u64>,
    /// Its mesh neighbours.
    pub neighbours: BTreeSet<PeerId>,
    requested: BTreeSet<(Endpoint, u64)>,
    /// Re-searches sent: (when, substream, excluded parents).
    pub research_log: Vec<(Duration, u16, Vec<PeerId>)>,
    /// Deadline-driven ticking: the one tick scheduled.
    pub wake_at: Option<u64>,
    /// Ticks at the current instant (a `next_timeout` that never moves on would spin).
    pub ticks_now: (u64, u32),
    /// Lag of its latest play: play time − the chunk's availability at the source.
    pub lag_us: Option<u64>,
    /// Chunk frame bytes received from peers.
    pub bytes_from_peers: u64,
    /// Chunk frame bytes received from the data plane.
    pub bytes_from_server: u64,
    /// (played, skipped) when the report's measured window began.
    pub due_before_measure: (u64, u64),
    /// Emit [`Upcall::Play`] for every chunk played (a host that checks the output).
    pub report_plays: bool,
    /// Stalls: runs of chunks skipped at their play-out deadline (a run of skips is
    /// one stall, as the SDK counts them).
    pub stalls: u64,
    /// The last chunk due was skipped (a stall is going on).
    skipping: bool,
    /// The cut time (ms, on the node's clock) of the next chunk given to
    /// [`Node::on_frame`], when the host knows it (a real data plane's timestamps);
    /// otherwise a chunk `seq` counts as cut at `(seq + 1)·d`.
    pub next_cut_ms: Option<u64>,
    k: u64,
}

impl Node {
    /// A node around `peer`, joining.
    pub fn new(peer: Peer, budget_kbps: u32, uplink_kbps: u32, addr_prefix: u32) -> Node {
        let k = u64::from(peer.substreams().max(1));
        Node {
            peer,
            life: Life::Joining,
            budget_kbps,
            uplink_kbps,
            addr_prefix,
            extra_latency_us: 0,
            uplink_free_at: 0,
            parents: vec![None; k as usize],
            children: BTreeMap::new(),
            neighbours: BTreeSet::new(),
            requested: BTreeSet::new(),
            research_log: Vec::new(),
            wake_at: None,
            ticks_now: (0, 0),
            lag_us: None,
            bytes_from_peers: 0,
            bytes_from_server: 0,
            due_before_measure: (0, 0),
            report_plays: false,
            stalls: 0,
            skipping: false,
            next_cut_ms: None,
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

    /// The control plane changed this node's parent for `substream`.
    pub fn set_parent(&mut self, substream: u16, parent: Parent, now: Duration) {
        if let Some(slot) = self.parents.get_mut(usize::from(substream))
            && slot.replace(parent) != Some(parent)
        {
            self.peer.set_parent(substream, Some(parent), now);
        }
    }

    /// A child subscribed to `substream` of this node, from `start` (what its
    /// `SUBSCRIBE` says: [`Peer::resume_from`]; the `Peer` takes a child's whole mask: a
    /// changed one is removed and added again, pacing kept).
    pub fn add_child(&mut self, child: PeerId, substream: u16, start: Option<u64>) {
        let m = self.children.entry(child).or_insert(0);
        let old = *m;
        *m |= 1u64 << substream;
        if *m != old {
            let mask = *m;
            if old != 0 {
                self.peer.remove_child(child);
            }
            self.peer.add_child(child, mask, start);
        }
    }

    /// A child unsubscribed from `substream` of this node.
    pub fn remove_child(&mut self, child: PeerId, substream: u16) {
        let Some(m) = self.children.get_mut(&child) else {
            return;
        };
        let old = *m;
        *m &= !(1u64 << substream);
        let mask = *m;
        if mask == old {
            return;
        }
        self.peer.remove_child(child);
        if mask == 0 {
            self.children.remove(&child);
        } else {
            // The same child, fewer substreams: nothing to send it again.
            self.peer.add_child(child, mask, Some(u64::MAX));
        }
    }

    /// The link to `gone` closed: it is no neighbour and no child any more.
    pub fn link_closed(&mut self, gone: PeerId) {
        if self.neighbours.remove(&gone) {
            self.peer.remove_neighbour(gone);
        }
        self.children.remove(&gone);
        self.peer.link_closed(gone);
    }

    /// Distinct peers it has a link with (parents, children, neighbours).
    pub fn peer_links(&self) -> usize {
        let children = self
            .children
            .keys()
            .filter(|c| !self.neighbours.contains(c))
            .count();
        let parents = self
            .parents
            .iter()
            .enumerate()
            .filter(|&(i, p)| match p {
                Some(Parent::Peer(id)) => {
                    !self.neighbours.contains(id)
                        && !self.children.contains_key(id)
                        && !self.parents[..i].contains(p)
                }
                _ => false,
            })
            .count();
        self.neighbours.len() + children + parents
    }

    /// A mesh neighbour was linked.
    pub fn add_neighbour(&mut self, nb: PeerId) {
        if self.neighbours.insert(nb) {
            self.peer.add_neighbour(nb);
        }
    }

    /// Its children in `substream`.
    pub fn children_in(&self, substream: u16) -> Vec<PeerId> {
        self.children
            .iter()
            .filter(|(_, m)| **m & (1u64 << substream) != 0)
            .map(|(&id, _)| id)
            .collect()
    }

    /// A frame of `len` bytes arrived from `from`. `true` for a chunk that is new (the
    /// host keeps its bytes while [`Peer::has`] says so).
    pub fn on_frame(
        &mut self,
        from: Endpoint,
        frame: Frame,
        len: u64,
        chunk_ms: u64,
        now: Duration,
    ) -> bool {
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
                // Cut at its availability at the source (the play clock's rate input),
                // unless the host knows better.
                let cut_ms = self
                    .next_cut_ms
                    .take()
                    .unwrap_or_else(|| (seq + 1).saturating_mul(chunk_ms));
                return self.peer.handle_chunk(seq, src, len, cut_ms, now);
            }
            Frame::BufferMap(map) => {
                if let Endpoint::Peer(id) = from {
                    self.peer.handle_buffer_map(id, map, now);
                }
            }
            Frame::Request(seq) => {
                if let Endpoint::Peer(id) = from {
                    self.peer.handle_request(id, seq, now);
                }
            }
            Frame::NotFound(seq) => {
                let s = (seq % self.k) as u16;
                let from_parent = self.parents[usize::from(s)].map(Endpoint::from) == Some(from);
                if self.requested.remove(&(from, seq)) || !from_parent {
                    if let Endpoint::Peer(id) = from {
                        self.peer.handle_not_found(id, seq, now);
                    }
                } else {
                    self.peer.handle_parent_skipped(seq, now);
                }
            }
            Frame::Relaying(mask) => {
                if let Endpoint::Peer(id) = from {
                    self.peer.set_child_relaying(id, mask);
                }
            }
        }
        false
    }

    /// Runs the `Peer`'s pending actions.
    pub fn drain(&mut self, now_us: u64, chunk_us: u64, sizes: &FrameSizes, out: &mut Vec<Upcall>) {
        let now = Duration::from_micros(now_us);
        while let Some(a) = self.peer.poll_action() {
            match a {
                PeerAction::Send { to, seq, .. } => {
                    let len = sizes.chunk_frame();
                    self.peer.on_uploaded(len);
                    out.push(Upcall::Send {
                        to: Endpoint::Peer(to),
                        frame: Frame::Chunk(seq),
                    });
                }
                PeerAction::NotFound { to, seq } => out.push(Upcall::Send {
                    to: Endpoint::Peer(to),
                    frame: Frame::NotFound(seq),
                }),
                PeerAction::Request { neighbour, seq } => {
                    self.request(Endpoint::Peer(neighbour), seq);
                    out.push(Upcall::Send {
                        to: Endpoint::Peer(neighbour),
                        frame: Frame::Request(seq),
                    });
                }
                PeerAction::RequestFromServer { seq } => {
                    self.request(Endpoint::Server, seq);
                    out.push(Upcall::Send {
                        to: Endpoint::Server,
                        frame: Frame::Request(seq),
                    });
                }
                PeerAction::SendBufferMap { to, map } => out.push(Upcall::Send {
                    to: Endpoint::Peer(to),
                    frame: Frame::BufferMap(map),
                }),
                PeerAction::ReSearch { substream, exclude } => {
                    // One re-search per substream at a time, as the engine does.
                    if let Some(exclude) =
                        self.peer.research(substream, exclude.into_iter().collect())
                    {
                        self.research_log.push((now, substream, exclude.clone()));
                        out.push(Upcall::ReSearch { substream, exclude });
                    }
                }
                PeerAction::ReportParent { parent, .. } => out.push(Upcall::Report { parent }),
                PeerAction::Play { seq } => {
                    self.skipping = false;
                    // Chunk `seq` is available at the source at (seq + 1)·d.
                    let avail = (seq + 1).saturating_mul(chunk_us);
                    self.lag_us = Some(now_us.saturating_sub(avail));
                    if self.report_plays {
                        out.push(Upcall::Play { seq });
                    }
                }
                PeerAction::Skip { .. } => {
                    if !self.skipping {
                        self.stalls += 1;
                    }
                    self.skipping = true;
                }
                PeerAction::Relaying { substreams } => {
                    let mut told = BTreeSet::new();
                    for p in self.parents.iter().flatten() {
                        if let Parent::Peer(id) = *p
                            && told.insert(id)
                        {
                            out.push(Upcall::Send {
                                to: Endpoint::Peer(id),
                                frame: Frame::Relaying(substreams),
                            });
                        }
                    }
                }
            }
        }
    }

    fn request(&mut self, to: Endpoint, seq: u64) {
        if self.requested.len() >= 4096 {
            self.requested.pop_first();
        }
        self.requested.insert((to, seq));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::peer::{PeerConfig, SchedulerConfig};

    #[test]
    fn peer_links_count_each_peer_once() {
        let peer = Peer::new(
            PeerConfig {
                me: 1,
                scheduler: SchedulerConfig::default(),
                upload_kbps: 1000,
                budget_kbps: 1000,
                stream_kbps: 500,
                child_slots: 8,
            },
            Duration::ZERO,
        )
        .unwrap();
        let mut n = Node::new(peer, 1000, 2000, 0);
        assert_eq!(n.peer_links(), 0);
        // Parents 7 (two substreams), 8 and the server; 8 is also a neighbour.
        for (s, p) in [
            (0, Parent::Peer(7)),
            (1, Parent::Peer(7)),
            (2, Parent::Peer(8)),
        ] {
            n.set_parent(s, p, Duration::ZERO);
        }
        n.set_parent(3, Parent::Server, Duration::ZERO);
        n.add_neighbour(8);
        n.add_neighbour(9);
        // Children 9 (also a neighbour) and 10 (two substreams).
        n.add_child(9, 0, None);
        n.add_child(10, 1, None);
        n.add_child(10, 2, None);
        // 7, 8, 9, 10.
        assert_eq!(n.peer_links(), 4);
    }
}
