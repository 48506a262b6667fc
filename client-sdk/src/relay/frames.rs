//! Frames read on links, dispatched by kind; chunks are classified by source (parent
//! push, requested repair, unsolicited) before the scheduler sees them.

use starling_grid::peer::Source;
use starling_proto::wire::{self, Chunk, ErrorCode, Frame, chunk_flags};

use super::convert::to_buffer_map;
use super::link::{LinkId, reason};
use super::{Engine, Feed, Kind};
use crate::error::SdkError;

impl Engine {
    pub(super) fn on_frame(&mut self, l: LinkId, frame: Frame) {
        let Some(link) = self.links.get(&l) else {
            return;
        };
        let kind = link.kind.clone();
        match frame {
            Frame::Chunk(c) => self.on_chunk(l, c),
            Frame::Request(seq) => {
                if kind != Kind::DataPlane {
                    self.on_request(l, seq);
                }
            }
            Frame::NotFound(seq) => {
                let now = self.now();
                let Some(link) = self.links.get_mut(&l) else {
                    return;
                };
                if link.requested.remove(&seq) {
                    self.peer.handle_not_found(l, seq, now);
                    return;
                }
                // Unsolicited: a parent skipped a push of its substream (over budget).
                let s = u16::try_from(seq % u64::from(self.k)).unwrap_or(0);
                let from_parent = link.mask & (1u64 << s) != 0
                    && match (&link.kind, &self.feeds[usize::from(s)]) {
                        (Kind::Out(peer), Feed::Peer(p)) => p.id == peer.id,
                        (Kind::DataPlane, Feed::Server) => true,
                        _ => false,
                    };
                if from_parent {
                    self.peer.handle_parent_skipped(seq, now);
                } else {
                    self.peer.handle_not_found(l, seq, now);
                }
            }
            Frame::BufferMap(m) => match to_buffer_map(&m) {
                Some(map) => {
                    let now = self.now();
                    self.peer.handle_buffer_map(l, map, now);
                }
                None => self.misbehaved(l, "malformed buffer map"),
            },
            Frame::Subscribe(sub) => {
                if kind != Kind::In || sub.broadcast_id != self.shared.broadcast_id {
                    self.misbehaved(l, "unexpected SUBSCRIBE");
                    return;
                }
                self.resubscribe(l, sub.substream_mask & self.all_mask(), sub.start);
            }
            Frame::StreamInfo(info) => {
                if info.broadcast_id != self.shared.broadcast_id {
                    self.misbehaved(l, "STREAM_INFO for another broadcast");
                } else if kind == Kind::DataPlane {
                    self.on_dp_info(&info);
                }
            }
            Frame::Error(r) | Frame::Goodbye(r) => {
                let err = if r.code == ErrorCode::BroadcastStopped {
                    SdkError::BroadcastEnded(r.message)
                } else {
                    SdkError::Server {
                        code: r.code,
                        message: r.message,
                    }
                };
                tracing::debug!(l, "link closed by the other side: {err}");
                self.drop_link(l, None, Some(err));
            }
            Frame::Hello(_) | Frame::HelloAck(_) | Frame::Proof(_) => {
                self.misbehaved(l, "handshake frame mid-stream");
            }
            Frame::Token(t) => {
                if kind == Kind::In {
                    self.on_peer_token(l, &t);
                }
                // On links we dialled we are the client: a TOKEN means nothing.
            }
            Frame::Ticket(t) => {
                if kind == Kind::In {
                    self.on_peer_ticket(l, &t);
                } else {
                    self.misbehaved(l, "TICKET from a parent");
                }
            }
            // A child's word on what it relays: its pushes go out first.
            Frame::Relaying(m) => {
                if kind == Kind::In {
                    self.peer.set_child_relaying(l, m & self.all_mask());
                } else {
                    self.misbehaved(l, "RELAYING from a parent");
                }
            }
            Frame::Ping(_) | Frame::Pong(_) => {}
        }
    }

    pub(super) fn misbehaved(&mut self, l: LinkId, what: &str) {
        tracing::info!(l, "closing a grid link: {what}");
        self.drop_link(
            l,
            Some(Frame::Error(reason(ErrorCode::UnexpectedFrame, what))),
            Some(SdkError::Protocol(what.to_string())),
        );
    }

    pub(super) fn on_chunk(&mut self, l: LinkId, c: Chunk) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let len = c.payload.len() as u64;
        let s = u16::try_from(c.seq % u64::from(self.k)).unwrap_or(0);
        let bit = 1u64 << s;
        let feed = &self.feeds[usize::from(s)];
        let src = match &link.kind {
            Kind::DataPlane => {
                if link.mask & bit != 0 && *feed == Feed::Server {
                    Source::Parent(s)
                } else {
                    link.requested.remove(&c.seq);
                    Source::Server
                }
            }
            Kind::Out(peer) => {
                if link.mask & bit != 0 && matches!(feed, Feed::Peer(p) if p.id == peer.id) {
                    Source::Parent(s)
                } else if link.requested.remove(&c.seq) {
                    Source::Neighbour(l)
                } else {
                    // Not asked for (e.g. in flight across a mask change): ignored.
                    return;
                }
            }
            Kind::In => {
                if link.requested.remove(&c.seq) {
                    Source::Neighbour(l)
                } else {
                    // Children and neighbours that connected to us send chunks only
                    // as answers to our requests.
                    self.shared.stats_mut().unsolicited_chunks += 1;
                    self.misbehaved(l, "CHUNK not requested");
                    return;
                }
            }
        };
        {
            let mut st = self.shared.stats_mut();
            st.chunks_received += 1;
            st.bytes_received += len;
            if link.kind == Kind::DataPlane {
                st.bytes_from_server += len;
                self.fresh_join = false;
            } else {
                st.bytes_from_peers += len;
            }
        }
        if src == Source::Parent(s) {
            self.reparent_chunk(s);
        }
        let now = self.now();
        let wire_len = wire::chunk_frame_len(c.signature.len(), c.payload.len()) as u64;
        if self
            .peer
            .handle_chunk(c.seq, src, wire_len, c.timestamp_ms, now)
        {
            // A signed chunk already carries the signed flags (set by the link reader)
            // and is relayed byte-identical; for an unsigned one, the
            // receiver-specific DISCONTINUITY flag is not relayed.
            let chunk = if c.signature.is_empty() {
                Chunk {
                    flags: c.flags & chunk_flags::RANDOM_ACCESS,
                    ..c
                }
            } else {
                c
            };
            self.store.insert(chunk.seq, chunk);
            while let Some((&first, _)) = self.store.first_key_value() {
                if self.peer.has(first) {
                    break;
                }
                self.store.pop_first();
            }
            let newest = self.store.last_key_value().map(|(&n, _)| n);
            let mut st = self.shared.stats_mut();
            if let Some(n) = newest
                && st.live_seq.is_none_or(|x| x < n)
            {
                st.live_seq = Some(n);
            }
        } else {
            self.shared.stats_mut().duplicates += 1;
        }
    }
}
