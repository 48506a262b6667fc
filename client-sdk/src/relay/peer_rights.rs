//! Rights of the peers we talk to: our token renewals sent out, the tokens and parent
//! tickets of peers connected to us (renewal and expiry), and revocations.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use starling_proto::wire::{ErrorCode, Frame};

use super::admission::{self, Ask, Tickets};
use super::link::{LinkId, reason};
use super::{Engine, Kind};
use crate::error::SdkError;
use crate::rights::OwnToken;
use starling_grid::PeerId;

/// How often the tokens of incoming links are checked for expiry.
pub(super) const GRANT_CHECK_EVERY: Duration = Duration::from_millis(250);

impl Engine {
    /// A peer we must not use (revoked, or it sent us a bad chunk).
    pub(super) fn excluded(&self, id: PeerId) -> bool {
        self.peer.memory().is_banned(id) || self.shared.rights.is_revoked(id)
    }

    /// The remote peer's id: from the assignment for links we dialled, from its token
    /// for accepted ones (`None` for the data plane, or without rights management).
    pub(super) fn peer_id_of(&self, l: LinkId) -> Option<PeerId> {
        let link = self.links.get(&l)?;
        match &link.kind {
            Kind::DataPlane => None,
            Kind::Out(p) => Some(p.id),
            Kind::In => link.grant.and_then(|g| g.peer_id),
        }
    }

    /// The expiry of held chunks' keys, of the parent tickets of our children and of the
    /// tokens of peers connected to us (every [`GRANT_CHECK_EVERY`]).
    pub(super) fn check_grants(&mut self, now: Instant) {
        self.next_grant_check = now + GRANT_CHECK_EVERY;
        let given_up = self.unknown_keys.expire(&self.key_hold, now);
        if given_up > 0 {
            tracing::warn!(
                given_up,
                "no key refresh came for held chunks: dropped them"
            );
        }
        let now_ms = self.shared.rights.now_ms();
        let unticketed: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.kind == Kind::In
                    && l.mask != 0
                    && admission::check_subscribe(&self.ask(l.mask, l.tickets.as_ref(), 0))
                        .is_err_and(|r| r.code == ErrorCode::Unauthorized)
            })
            .map(|(&id, _)| id)
            .collect();
        for l in unticketed {
            tracing::info!(l, peer = ?self.peer_id_of(l), "child's parent tickets expired: closing its link");
            self.shared.stats_mut().peers_refused += 1;
            self.drop_link(
                l,
                Some(Frame::Error(reason(
                    ErrorCode::Unauthorized,
                    "ticket_expired: parent ticket expired",
                ))),
                None,
            );
        }
        let expired: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.grant
                    .is_some_and(|g| self.shared.rights.expired(&g, now_ms))
            })
            .map(|(&id, _)| id)
            .collect();
        for l in expired {
            tracing::info!(l, peer = ?self.peer_id_of(l), "peer token expired: closing its link");
            self.shared.stats_mut().peers_refused += 1;
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(
                    ErrorCode::TokenExpired,
                    "chunk token expired",
                ))),
                None,
            );
        }
    }

    /// Our token was renewed: every link we dialled (the data plane, parents,
    /// neighbours) gets it; new links say it in `HELLO`.
    pub(super) fn send_token(&mut self, t: OwnToken) {
        if t.token.is_empty() {
            return;
        }
        let f = Frame::Token(t.token);
        let outs: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.kind != Kind::In && l.handle.is_some())
            .map(|(&id, _)| id)
            .collect();
        for l in outs {
            self.send_to(l, &f);
        }
    }

    /// A peer connected to us renews its token: same peer id and holder key only.
    pub(super) fn on_peer_token(&mut self, l: LinkId, token: &[u8]) {
        let Some(old) = self.links.get(&l).and_then(|link| link.grant) else {
            return;
        };
        match self.shared.rights.check_peer_token(token) {
            Ok(g)
                if (old.peer_id.is_none() || g.peer_id == old.peer_id)
                    && g.holder_key == old.holder_key =>
            {
                if let Some(link) = self.links.get_mut(&l) {
                    link.grant = Some(g);
                }
            }
            Ok(_) => {
                self.shared.stats_mut().peers_refused += 1;
                self.drop_link(
                    l,
                    Some(Frame::Error(reason(
                        ErrorCode::Unauthorized,
                        "renewed token names another peer or holder key",
                    ))),
                    None,
                );
            }
            Err(r) => {
                tracing::info!(l, "peer token renewal refused: {}", r.message);
                self.shared.stats_mut().peers_refused += 1;
                self.drop_link(l, Some(Frame::Error(reason(r.code, &r.message))), None);
            }
        }
    }

    /// An admission question for a link asking for `mask` ([`admission::check_subscribe`]).
    pub(super) fn ask<'a>(
        &self,
        mask: u64,
        tickets: Option<&'a Tickets>,
        others_used: u32,
    ) -> Ask<'a> {
        Ask {
            enforced: self.shared.rights.enforced(),
            me: self.me,
            mask,
            tickets,
            now_ms: self.shared.rights.now_ms(),
            skew_ms: self.shared.rights.skew_ms(),
            others_used,
            slots: self.peer.slots().slots(),
        }
    }

    /// A peer connected to us presents a parent ticket (new substreams, or a renewal).
    pub(super) fn on_peer_ticket(&mut self, l: LinkId, ticket: &[u8]) {
        let me = self.me;
        let now = self.shared.rights.now_ms();
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let Some(child) = link.grant.and_then(|g| g.peer_id) else {
            return; // No rights management: nothing to check.
        };
        let t = link.tickets.get_or_insert_with(|| Tickets::new(me, now));
        if t.parent() != me {
            *t = Tickets::new(me, now);
        }
        let refusal = if t.allow(now) {
            match self.shared.rights.check_ticket(ticket, child, me) {
                Ok(c) => {
                    t.add(&c);
                    return;
                }
                Err(r) => r,
            }
        } else {
            crate::rights::Refusal {
                code: ErrorCode::ServerBusy,
                message: "too many tickets".into(),
            }
        };
        tracing::info!(l, child, "peer ticket refused: {}", refusal.message);
        self.shared.stats_mut().peers_refused += 1;
        self.drop_link(
            l,
            Some(Frame::Error(reason(refusal.code, &refusal.message))),
            None,
        );
    }

    /// The control plane revoked these peers: close every link with them.
    pub(super) fn on_revoked(&mut self, ids: &[PeerId]) {
        let ids: HashSet<PeerId> = ids.iter().copied().filter(|&id| id != self.me).collect();
        if ids.is_empty() {
            return;
        }
        let doomed: Vec<LinkId> = self
            .links
            .keys()
            .copied()
            .filter(|&l| self.peer_id_of(l).is_some_and(|id| ids.contains(&id)))
            .collect();
        self.neighbours.retain(|n| !ids.contains(&n.id));
        for l in doomed {
            tracing::info!(l, peer = ?self.peer_id_of(l), "peer revoked: closing its link");
            let err =
                matches!(self.links.get(&l).map(|x| &x.kind), Some(Kind::Out(_))).then(|| {
                    SdkError::Server {
                        code: ErrorCode::Revoked,
                        message: "peer revoked".into(),
                    }
                });
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(ErrorCode::Revoked, "peer revoked"))),
                err,
            );
        }
        self.reconcile();
        self.count_links();
    }
}
