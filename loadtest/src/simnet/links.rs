//! The fabric's links: a viewer's frames onto its uplink (serialization at its rate,
//! the link's latency, jitter, loss), the in-process server (cutting the source's
//! chunks, pushes to subscribers, answers to requests), parent and neighbour links,
//! and a viewer's links closing when it stops.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use starling_grid::Parent;
use starling_grid::peer::PeerId;
use starling_grid::sim::{Endpoint, Frame, Life};
use std::time::Duration;

use super::fabric::{Ev, Fabric, MAX_PENDING, MAX_WAITING, Pending, SERVER_WINDOW, us};
use super::msg::{ServerMode, SimChunk, Up};

impl Fabric {
    /// Puts a frame from viewer `i` on its uplink.
    pub(super) fn send(&mut self, i: usize, to: Endpoint, frame: Frame, now: u64) {
        let to = match to {
            Endpoint::Server => {
                if let Frame::Request(seq) = frame {
                    self.server_request(i, seq, now);
                }
                return;
            }
            Endpoint::Peer(id) => match self.ids.get(&id) {
                Some(&t) => t,
                None => return,
            },
        };
        let chunk = match frame {
            Frame::Chunk(seq) => {
                let c = self.peers.get(i).and_then(|p| p.store.get(&seq)).cloned();
                if c.is_none() {
                    self.net.missing_bytes += 1;
                    return;
                }
                c
            }
            _ => None,
        };
        let len = match &frame {
            // The wire's frame for this chunk's actual payload.
            Frame::Chunk(_) => {
                let payload = chunk
                    .as_ref()
                    .map_or(self.sizes.payload, |c| c.payload.len() as u64);
                self.sizes.chunk_frame() - self.sizes.payload + payload
            }
            Frame::BufferMap(m) => self.sizes.buffer_map_frame(m.len()),
            Frame::Request(_) | Frame::NotFound(_) | Frame::Relaying(_) => {
                self.sizes.control_frame()
            }
        };
        let Some(p) = self.peers.get_mut(i) else {
            return;
        };
        let Some(n) = p.node.as_mut() else { return };
        let me = n.peer.me();
        // kbit/s = bits per ms. Chunks queue behind each other; small frames do not
        // wait for them but take their share of the uplink.
        let tx = (len * 8 * 1000).div_ceil(u64::from(n.uplink_kbps.max(1)));
        let start = if chunk.is_some() {
            n.uplink_free_at.max(now)
        } else {
            now
        };
        n.uplink_free_at = n.uplink_free_at.max(now) + tx;
        if let Some(c) = &chunk {
            p.payload_uploaded += c.payload.len() as u64;
            if let Some(b) = &p.bytes {
                b.uploaded
                    .fetch_add(c.payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            p.wire_uploaded += len;
        }
        let target_id = self
            .peers
            .get(to)
            .and_then(|p| p.node.as_ref())
            .map_or(0, |n| n.peer.me());
        let net = &self.cfg.net;
        let mut arrive = start + tx + net.latency.link_us(net.seed, me, target_id);
        if !net.jitter.is_zero() {
            arrive += self.rng.below(us(net.jitter) + 1);
        }
        if net.loss > 0.0 && self.rng.unit() < net.loss {
            self.net.lost += 1;
            return;
        }
        self.net.frames += 1;
        self.net.frame_bytes += len;
        self.schedule(
            arrive,
            Ev::Frame {
                to,
                from: Endpoint::Peer(me),
                frame,
                chunk,
                len,
            },
        );
    }

    /// A last-resort request from viewer `i` to the data plane.
    pub(super) fn server_request(&mut self, i: usize, seq: u64, now: u64) {
        if self.cfg.server == ServerMode::Wire {
            self.send_up(Up::ServerRequest { index: i, seq });
            return;
        }
        if let Some(c) = self.window.get(&seq).cloned() {
            let at = now + 2 * us(self.cfg.net.server_latency);
            self.server_send(i, c, at);
        } else if self
            .window
            .last_key_value()
            .is_none_or(|(&last, _)| seq > last)
        {
            if self.waiting_len < MAX_WAITING {
                self.waiting.entry(seq).or_default().push(i);
                self.waiting_len += 1;
            }
        } else {
            let at = now + 2 * us(self.cfg.net.server_latency);
            let len = self.sizes.control_frame();
            self.schedule(
                at,
                Ev::Frame {
                    to: i,
                    from: Endpoint::Server,
                    frame: Frame::NotFound(seq),
                    chunk: None,
                    len,
                },
            );
        }
    }

    pub(super) fn server_send(&mut self, to: usize, c: Arc<SimChunk>, at: u64) {
        self.net.server_chunks += 1;
        let len = self.sizes.chunk_frame();
        self.schedule(
            at,
            Ev::Frame {
                to,
                from: Endpoint::Server,
                frame: Frame::Chunk(c.seq),
                chunk: Some(c),
                len,
            },
        );
    }

    /// The in-process server cuts chunk `seq` (due at `(seq + 1)·d`).
    pub(super) fn emit(&mut self, seq: u64, at: u64) {
        let len = self.cfg.net.payload_len();
        let payload = match &self.cfg.pattern {
            Some(p) => Bytes::from(p.bytes(seq * len as u64, len)),
            None => Bytes::from(vec![0u8; len]),
        };
        let c = Arc::new(SimChunk {
            seq,
            cut_ms: at / 1000,
            payload,
        });
        self.window.insert(seq, c.clone());
        while self.window.len() > SERVER_WINDOW {
            self.window.pop_first();
        }
        let lat = us(self.cfg.net.server_latency);
        let s = (seq % u64::from(self.k)) as usize;
        let subs: Vec<usize> = self.server_subs[s].iter().copied().collect();
        for to in subs {
            self.server_send(to, c.clone(), at + lat);
        }
        while let Some(e) = self.waiting.first_entry() {
            if *e.key() > seq {
                break;
            }
            let (wseq, list) = e.remove_entry();
            self.waiting_len -= list.len();
            if wseq == seq {
                for to in list {
                    self.server_send(to, c.clone(), at + lat);
                }
            }
        }
        self.schedule(at + self.chunk_us, Ev::Emit(seq + 1));
    }

    pub(super) fn set_parent(&mut self, child: usize, s: u16, parent: Parent, now: u64) {
        let Some(p) = self.peers.get_mut(child) else {
            return;
        };
        let Some(n) = p.node.as_mut().filter(|n| n.receives()) else {
            return;
        };
        let had = n.parents.get(usize::from(s)).copied().flatten();
        if had == Some(parent) {
            return;
        }
        if had.is_some() {
            p.parent_changes += 1;
        }
        n.set_parent(s, parent, Duration::from_micros(now));
        let me = n.peer.me();
        let net = self.cfg.net.clone();
        let mut server_changed = false;
        for (p, add) in [(had, false), (Some(parent), true)] {
            match p {
                Some(Parent::Server) => {
                    if let Some(subs) = self.server_subs.get_mut(usize::from(s)) {
                        if add {
                            subs.insert(child);
                        } else {
                            subs.remove(&child);
                        }
                    }
                    server_changed = true;
                }
                Some(Parent::Peer(id)) => {
                    if let Some(&pi) = self.ids.get(&id) {
                        let at = now + net.latency.link_us(net.seed, me, id);
                        self.schedule(
                            at,
                            Ev::Link {
                                parent: pi,
                                child: me,
                                substream: s,
                                add,
                            },
                        );
                    } else if add {
                        // Its join's answer has not reached the fabric yet.
                        self.pending_link(id, Pending::Child(child, s));
                    }
                }
                None => {}
            }
        }
        if server_changed && self.cfg.server == ServerMode::Wire {
            let mask = self.server_mask(child);
            let resume = self.peers.get(child).and_then(|p| {
                p.store
                    .last_key_value()
                    .map(|(&n, _)| n + 1)
                    .or_else(|| p.node.as_ref().and_then(|n| n.peer.play_next()))
            });
            self.send_up(Up::Subscribe {
                index: child,
                mask,
                resume,
            });
        }
    }

    /// The substreams viewer `i` takes from the data plane.
    pub(super) fn server_mask(&self, i: usize) -> u64 {
        self.server_subs
            .iter()
            .enumerate()
            .filter(|(_, subs)| subs.contains(&i))
            .fold(0, |m, (s, _)| m | (1u64 << s))
    }

    /// Remembers a link to `id`, a viewer whose join the control plane answered but
    /// whose answer has not reached the fabric yet (bounded; dropped beyond).
    pub(super) fn pending_link(&mut self, id: PeerId, p: Pending) {
        if self.pending_len < MAX_PENDING {
            self.pending.entry(id).or_default().push(p);
            self.pending_len += 1;
        }
    }

    /// `id` (viewer `index`) joined: the links others wait to make to it.
    pub(super) fn take_pending(&mut self, id: PeerId, index: usize, now: u64) {
        let Some(list) = self.pending.remove(&id) else {
            return;
        };
        self.pending_len -= list.len();
        let net = self.cfg.net.clone();
        for p in list {
            match p {
                Pending::Child(child, s) => {
                    let Some(n) = self.node_mut(child) else {
                        continue;
                    };
                    if n.parents.get(usize::from(s)).copied().flatten() != Some(Parent::Peer(id)) {
                        continue;
                    }
                    let me = n.peer.me();
                    let at = now + net.latency.link_us(net.seed, me, id);
                    self.schedule(
                        at,
                        Ev::Link {
                            parent: index,
                            child: me,
                            substream: s,
                            add: true,
                        },
                    );
                }
                Pending::Neighbour(other) => self.link_neighbours(other, index, now),
            }
        }
    }

    pub(super) fn link_neighbours(&mut self, a: usize, b: usize, now: u64) {
        if a == b {
            return;
        }
        let id = |f: &Fabric, i: usize| {
            f.peers
                .get(i)
                .and_then(|p| p.node.as_ref())
                .filter(|n| n.receives())
                .map(|n| n.peer.me())
        };
        let (Some(ida), Some(idb)) = (id(self, a), id(self, b)) else {
            return;
        };
        for (x, y) in [(a, idb), (b, ida)] {
            if let Some(n) = self.node_mut(x) {
                n.add_neighbour(y);
            }
        }
        self.after(b, now);
    }

    /// Viewer `i` stops: its links close at the other ends after the close delay.
    pub(super) fn stop_peer(&mut self, i: usize) {
        let now = self.now_us();
        let close = now + us(self.cfg.net.link_close_delay);
        let k = self.k;
        let Some(n) = self.peers.get_mut(i).and_then(|p| p.node.as_mut()) else {
            return;
        };
        if n.life == Life::Gone {
            return;
        }
        n.life = Life::Gone;
        let me = n.peer.me();
        let mut linked: BTreeSet<PeerId> = n.neighbours.iter().copied().collect();
        for p in n.parents.iter().flatten() {
            if let Parent::Peer(p) = p {
                linked.insert(*p);
            }
        }
        for s in 0..k {
            linked.extend(n.children_in(s));
        }
        for subs in &mut self.server_subs {
            subs.remove(&i);
        }
        for to in linked {
            if let Some(&t) = self.ids.get(&to) {
                self.schedule(close, Ev::LinkClosed { to: t, gone: me });
            }
        }
        self.ids.remove(&me);
    }
}
