//! The link table: opening, re-subscribing and closing links to match the wanted
//! parents and neighbours (`reconcile`), accepting and admitting incoming peers, and
//! dropping links.

use std::collections::BTreeMap;

use starling_proto::holder::Verifier;
use starling_proto::wire::{self, ErrorCode, Frame, Role, StartAt, StreamInfo, Subscribe};

use super::admission::{self, Tickets};
use super::link::{self, Dial, LinkHandle, LinkId, reason};
use super::{Engine, Feed, Kind, Link, popcount};
use crate::control::PeerAddr;
use crate::error::SdkError;
use crate::rights::Grant;

impl Engine {
    /// Opens, re-subscribes and closes links to match `feeds` and `neighbours`.
    pub(super) fn reconcile(&mut self) {
        let mut want: BTreeMap<u64, (PeerAddr, u64, bool)> = BTreeMap::new();
        let mut dp_mask = 0u64;
        for (s, f) in self.feeds.iter().enumerate() {
            match f {
                Feed::Server => dp_mask |= 1u64 << s,
                Feed::Peer(p) => {
                    want.entry(p.id).or_insert_with(|| (p.clone(), 0, false)).1 |= 1u64 << s;
                }
                Feed::Pending => {}
            }
        }
        for n in &self.neighbours {
            want.entry(n.id).or_insert_with(|| (n.clone(), 0, false)).2 = true;
        }
        // Whole stream from the data plane: ask for it literally, as before the grid.
        if dp_mask == self.all_mask() {
            dp_mask = wire::ALL_SUBSTREAMS;
        }
        if let Some(dp) = self.dp {
            self.set_out_mask(dp, dp_mask);
        }
        // Close links nobody wants (or whose address changed).
        let stale: Vec<(u64, LinkId)> = self
            .peer_links
            .iter()
            .filter(|(id, l)| {
                want.get(id).is_none_or(|(p, _, _)| {
                    self.links
                        .get(l)
                        .is_some_and(|l| !matches!(&l.kind, Kind::Out(q) if q.addr == p.addr))
                })
            })
            .map(|(&id, &l)| (id, l))
            .collect();
        for (_, l) in stale {
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(ErrorCode::Normal, "re-assigned"))),
                None,
            );
        }
        for (id, (peer, mask, neighbour)) in want {
            match self.peer_links.get(&id).copied() {
                Some(l) => {
                    self.set_out_mask(l, mask);
                    if let Some(link) = self.links.get_mut(&l) {
                        link.want_neighbour = neighbour;
                    }
                    self.sync_neighbour(l);
                }
                None => {
                    let l = self.new_id();
                    let mut link = Link::new(Kind::Out(peer.clone()), mask);
                    link.want_neighbour = neighbour;
                    self.links.insert(l, link);
                    self.peer_links.insert(id, l);
                    let mut d = self.dial_params(&peer.addr, Role::Peer, mask, self.peer_start());
                    d.tickets = self.book.for_parent(id, mask);
                    d.verifier = Verifier::Peer(id);
                    if peer.punch {
                        d.punch_from.clone_from(&self.punch_from);
                    }
                    tokio::spawn(link::dial(l, d, self.events.clone(), self.shared.clone()));
                }
            }
        }
    }

    pub(super) fn sync_neighbour(&mut self, l: LinkId) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let want = link.want_neighbour && link.handle.is_some();
        if want && !link.neighbour {
            link.neighbour = true;
            self.peer.add_neighbour(l);
        } else if !want && link.neighbour {
            link.neighbour = false;
            self.peer.remove_neighbour(l);
        }
    }

    pub(super) fn set_out_mask(&mut self, l: LinkId, mask: u64) {
        let resume = self.peer_start();
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        link.mask = mask;
        if link.sent_mask == mask {
            return;
        }
        if let (Some(h), Kind::Out(peer)) = (&link.handle, &link.kind) {
            // Tickets for the substreams this SUBSCRIBE adds (a full queue is handled
            // below, with the SUBSCRIBE).
            for t in self.book.for_parent(peer.id, mask & !link.sent_mask) {
                let _ = h.send_frame(&Frame::Ticket(t));
            }
        }
        if let Some(h) = &link.handle {
            let f = Frame::Subscribe(Subscribe {
                broadcast_id: self.shared.broadcast_id.clone(),
                start: resume,
                substream_mask: mask,
            });
            match h.send_frame(&f) {
                Ok(()) => link.sent_mask = mask,
                Err(_) => {
                    // Cannot even queue a control frame: the link is useless.
                    self.drop_link(l, None, Some(SdkError::Timeout("link queue full")));
                    return;
                }
            }
        }
        self.sync_relaying(l, self.peer.relaying());
    }

    /// Our children changed what we relay (`PeerAction::Relaying`): every parent link
    /// is told.
    pub(super) fn tell_relaying(&mut self, relaying: u64) {
        let outs: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| matches!(l.kind, Kind::Out(_)) && l.sent_mask != 0)
            .map(|(&id, _)| id)
            .collect();
        for l in outs {
            self.sync_relaying(l, relaying);
        }
    }

    /// Tells parent link `l` that we relay `relaying` (a `RELAYING` frame), if it
    /// speaks version 3, feeds us something and was not told this already: it then
    /// pushes to us before its leaves.
    fn sync_relaying(&mut self, l: LinkId, relaying: u64) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let parent = matches!(link.kind, Kind::Out(_)) && link.sent_mask != 0;
        if !parent
            || link.version < wire::RELAYING_VERSION
            || link.told_relaying.unwrap_or(0) == relaying
        {
            return;
        }
        let Some(h) = &link.handle else {
            return;
        };
        if h.send_frame(&Frame::Relaying(relaying)).is_ok() {
            link.told_relaying = Some(relaying);
        }
    }

    /// Where a (re)subscription to a peer parent starts: at the next chunk to play once
    /// playing, else live (the parent then sends its start-up back-fill); see
    /// `Peer::resume_from`.
    pub(super) fn peer_start(&self) -> StartAt {
        self.peer.resume_from().map_or(StartAt::Live, StartAt::Seq)
    }

    /// Where a (re)subscription to the data plane should start: after the newest chunk
    /// held.
    pub(super) fn resume_at(&self) -> StartAt {
        match self.store.last_key_value() {
            Some((&n, _)) => StartAt::Seq(n + 1),
            None => self.peer.play_next().map_or(StartAt::Live, StartAt::Seq),
        }
    }

    pub(super) fn dial_params(&self, addr: &str, role: Role, mask: u64, start: StartAt) -> Dial {
        Dial {
            addr: addr.to_string(),
            token: self.shared.rights.token(),
            broadcast_id: self.shared.broadcast_id.clone(),
            start,
            limits: self.limits,
            timeout: self.connect_timeout,
            idle: self.idle,
            role,
            mask,
            tickets: Vec::new(),
            holder: self.shared.rights.holder(),
            verifier: Verifier::DataPlane,
            punch_from: None,
        }
    }

    pub(super) fn on_connected(
        &mut self,
        l: LinkId,
        handle: LinkHandle,
        info: StreamInfo,
        version: u16,
    ) {
        let Some(link) = self.links.get_mut(&l) else {
            // Dropped while dialling.
            handle.close(Frame::Goodbye(reason(
                ErrorCode::Normal,
                "not needed any more",
            )));
            return;
        };
        link.handle = Some(handle);
        link.version = version;
        let kind = link.kind.clone();
        let mask = link.mask;
        if kind == Kind::DataPlane {
            self.dp_failures = 0;
            self.dp_backoff = self.reconnect_initial;
            self.shared.stats_mut().reconnects += 1;
            self.on_dp_info(&info);
        } else if info.substreams != 0 && info.substreams != self.k {
            tracing::warn!(
                l,
                "peer reports {} substreams, not {}",
                info.substreams,
                self.k
            );
        }
        // The wanted mask may have changed while dialling.
        self.set_out_mask(l, mask);
        self.sync_relaying(l, self.peer.relaying());
        self.sync_neighbour(l);
        self.count_links();
    }

    pub(super) fn on_incoming(
        &mut self,
        l: LinkId,
        sub: Subscribe,
        handle: LinkHandle,
        addr: String,
        grant: Grant,
        tickets: Option<Tickets>,
    ) {
        if let Some(id) = grant.peer_id
            && (self.shared.rights.is_revoked(id) || self.peer.memory().is_banned(id))
        {
            // Revoked or banned between the handshake and now.
            self.shared.stats_mut().peers_refused += 1;
            handle.close(Frame::Error(reason(ErrorCode::Revoked, "peer revoked")));
            return;
        }
        let mask = sub.substream_mask & self.all_mask();
        let held = grant.peer_id.map_or(0, |id| {
            self.links
                .values()
                .filter(|l| l.kind == Kind::In && l.grant.and_then(|g| g.peer_id) == Some(id))
                .count()
        });
        let checked = admission::check_peer_links(grant.peer_id, held).and_then(|()| {
            admission::check_subscribe(&self.ask(mask, tickets.as_ref(), self.peer.slots().used()))
        });
        if let Err(r) = checked {
            tracing::info!(
                addr,
                peer = ?grant.peer_id,
                mask,
                used = self.peer.slots().used(),
                slots = self.peer.slots().slots(),
                "peer link refused: {}",
                r.message
            );
            self.shared.stats_mut().peers_refused += 1;
            handle.close(Frame::Error(reason(r.code, &r.message)));
            return;
        }
        let newest = self.store.last_key_value().map_or(0, |(&n, _)| n);
        let first = self.peer.play_next().unwrap_or(newest);
        let info = link::stream_info(
            &self.shared.broadcast_id,
            &self.content_type,
            self.chunk_ms,
            self.k,
            first,
            newest,
        );
        // Admitted: it may answer our requests with chunks from now on (raised before
        // it can see STREAM_INFO).
        handle.allow_chunks();
        if handle.send_frame(&info).is_err() {
            return;
        }
        let mut link = Link::new(Kind::In, mask);
        link.handle = Some(handle);
        link.grant = Some(grant);
        link.tickets = tickets;
        tracing::debug!(l, addr, mask, "peer link accepted");
        self.links.insert(l, link);
        self.admit(l, mask, start_of(sub.start));
        self.count_links();
    }

    /// Registers an incoming link's (new) mask, subscribed from `start` (`None`: live):
    /// a child for `mask ≠ 0`, a neighbour for `mask == 0`.
    pub(super) fn admit(&mut self, l: LinkId, mask: u64, start: Option<u64>) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        link.mask = mask;
        if mask != 0 {
            self.shared.stats_mut().children_admitted += 1;
            self.peer.add_child(l, mask, start);
            if link.neighbour {
                link.neighbour = false;
                self.peer.remove_neighbour(l);
            }
        } else if !link.neighbour {
            link.neighbour = true;
            self.peer.add_neighbour(l);
        }
    }

    pub(super) fn count_links(&mut self) {
        let mut children = 0;
        let mut neighbours = 0;
        let mut peers = 0;
        for l in self.links.values() {
            if l.kind == Kind::In && l.mask != 0 {
                children += 1;
            }
            if l.neighbour {
                neighbours += 1;
            }
            if l.kind != Kind::DataPlane && l.handle.is_some() {
                peers += 1;
            }
        }
        let mut s = self.shared.stats_mut();
        s.children = children;
        s.neighbours = neighbours;
        s.peer_links = peers;
    }

    /// Removes a link: optionally sends `last` first; `err` says it failed (then a lost
    /// parent is re-searched and a lost data-plane link redialled).
    pub(super) fn drop_link(&mut self, l: LinkId, last: Option<Frame>, err: Option<SdkError>) {
        let Some(link) = self.links.remove(&l) else {
            return;
        };
        self.unknown_keys.forget(l);
        if link.neighbour {
            self.peer.remove_neighbour(l);
        }
        if let Some(h) = link.handle {
            match last {
                Some(f) => h.close(f),
                None => drop(h),
            }
        }
        match &link.kind {
            Kind::In => {
                // Forgets its subscriptions and its push pacing.
                self.peer.link_closed(l);
            }
            Kind::Out(peer) => {
                if self.peer_links.get(&peer.id) == Some(&l) {
                    self.peer_links.remove(&peer.id);
                }
                if err.is_some() {
                    self.parent_lost(peer);
                }
            }
            Kind::DataPlane => {
                if self.dp == Some(l) {
                    self.dp = None;
                    self.shared.stats_mut().connected = false;
                    if let Some(e) = err {
                        self.on_dp_error(e);
                    } else {
                        self.schedule_dp_retry();
                    }
                }
            }
        }
        self.count_links();
    }

    pub(super) fn resubscribe(&mut self, l: LinkId, mask: u64, start: StartAt) {
        let Some(link) = self.links.get(&l) else {
            return;
        };
        let old = link.mask;
        if old == mask {
            return;
        }
        let others = self.peer.slots().used().saturating_sub(popcount(old));
        let ask = self.ask(mask, link.tickets.as_ref(), others);
        if let Err(r) = admission::check_subscribe(&ask) {
            tracing::info!(l, mask, "re-subscription refused: {}", r.message);
            self.shared.stats_mut().peers_refused += 1;
            self.drop_link(l, Some(Frame::Error(reason(r.code, &r.message))), None);
            return;
        }
        if old != 0 {
            self.peer.remove_child(l);
        }
        self.admit(l, mask, start_of(start));
        self.count_links();
    }
}

/// A `SUBSCRIBE`'s start as the grid's peer takes it (`None`: live).
fn start_of(start: StartAt) -> Option<u64> {
    match start {
        StartAt::Live => None,
        StartAt::Seq(s) => Some(s),
    }
}
