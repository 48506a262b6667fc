//! Who may take a link on our peer listener, as pure decisions (no sockets, no clock:
//! callers pass `now`).
//!
//! * **Children** (a link whose `SUBSCRIBE` mask is not 0) need a valid chunk token
//!   (checked at `HELLO`, public broadcasts included) and, for every substream of the
//!   mask, a valid parent ticket ([`starling_proto::ticket`]) that the control plane
//!   signed for this child (the token's peer id) and this parent (our peer id). The
//!   child sends its tickets in `TICKET` frames before `SUBSCRIBE` (and before a later
//!   `SUBSCRIBE` that adds substreams; renewed tickets any time). A link whose tickets
//!   expire without renewal is closed. Without rights management (a legacy control
//!   plane that issues neither tokens nor keys) nothing can be checked: children are
//!   then admitted up to the slots only, without the slack ticketed children get.
//! * **Neighbours** (mask 0) need a valid token with `PLAY` (checked at `HELLO`).
//! * At most [`MAX_LINKS_PER_PEER`] incoming link per peer id, and at most
//!   `max_per_ip` connections (handshakes included) per source address
//!   ([`IpLimiter`]): beyond, `ERROR(SERVER_BUSY)`.
//! * `TICKET` frames cost a signature check each: a link may present at most
//!   [`TICKET_BURST`] at once and one more per [`TICKET_REFILL_MS`].
//!
//! The child side keeps the tickets of its own parents in a [`TicketBook`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use starling_grid::peer::admit_limit;
use starling_proto::ticket::TicketClaims;
use starling_proto::wire::ErrorCode;

use crate::control::Ticket;
use crate::rights::Refusal;

/// Most `TICKET` frames accepted during a handshake (one per substream at most).
pub(crate) const MAX_HANDSHAKE_TICKETS: usize = 64;
/// Incoming links one peer id may hold at once (a child or a neighbour: an honest peer
/// uses one link for both).
pub(crate) const MAX_LINKS_PER_PEER: usize = 1;
/// `TICKET` frames a link may send at once (a full mask twice over).
pub(crate) const TICKET_BURST: u32 = 128;
/// One more `TICKET` frame is allowed per this many milliseconds.
pub(crate) const TICKET_REFILL_MS: u64 = 1_000;

fn refusal(code: ErrorCode, message: String) -> Refusal {
    Refusal { code, message }
}

/// The substreams a link's valid tickets cover, and until when.
#[derive(Debug, Clone)]
pub(crate) struct Tickets {
    /// The parent the tickets were checked for (our peer id then).
    parent: u64,
    /// Per substream: expiry (unix ms) of the latest ticket covering it; 0 = none.
    expires: Box<[u64; 64]>,
    /// Rate limit of `TICKET` frames: tokens left and when they were last refilled.
    budget: u32,
    refilled_ms: u64,
}

impl Tickets {
    pub(crate) fn new(parent: u64, now_ms: u64) -> Tickets {
        Tickets {
            parent,
            expires: Box::new([0; 64]),
            budget: TICKET_BURST,
            refilled_ms: now_ms,
        }
    }

    /// The parent these tickets name.
    pub(crate) fn parent(&self) -> u64 {
        self.parent
    }

    /// Takes one `TICKET` frame from the budget; false when the link sends too many.
    pub(crate) fn allow(&mut self, now_ms: u64) -> bool {
        let refill = now_ms.saturating_sub(self.refilled_ms) / TICKET_REFILL_MS;
        if refill > 0 {
            self.budget = self
                .budget
                .saturating_add(u32::try_from(refill).unwrap_or(u32::MAX))
                .min(TICKET_BURST);
            self.refilled_ms = self
                .refilled_ms
                .saturating_add(refill.saturating_mul(TICKET_REFILL_MS));
        }
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        true
    }

    /// Records a verified ticket (the caller checked it names this parent).
    pub(crate) fn add(&mut self, c: &TicketClaims) {
        for (i, e) in self.expires.iter_mut().enumerate() {
            if c.substream_mask & (1u64 << i) != 0 {
                *e = (*e).max(c.expires_at_ms);
            }
        }
    }

    /// The substreams covered at `now_ms` (a ticket counts until its expiry plus skew).
    pub(crate) fn covered(&self, now_ms: u64, skew_ms: u64) -> u64 {
        self.expires
            .iter()
            .enumerate()
            .filter(|&(_, &e)| e != 0 && now_ms < e.saturating_add(skew_ms))
            .fold(0, |m, (i, _)| m | (1u64 << i))
    }
}

/// What the engine knows when a link asks for `mask` (on `SUBSCRIBE`, first or later).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask<'a> {
    /// Peer tokens and tickets are checked (the control plane issues them).
    pub enforced: bool,
    /// Our peer id now.
    pub me: u64,
    /// The substreams asked for (already limited to the stream's K).
    pub mask: u64,
    /// The link's tickets (`None`: it presented none).
    pub tickets: Option<&'a Tickets>,
    pub now_ms: u64,
    pub skew_ms: u64,
    /// Substream subscriptions of our other children.
    pub others_used: u32,
    /// Our child slots.
    pub slots: u32,
}

/// Whether a link may subscribe to `ask.mask`: `Ok` or the refusal to send (then close).
pub(crate) fn check_subscribe(ask: &Ask<'_>) -> Result<(), Refusal> {
    if ask.mask == 0 {
        return Ok(());
    }
    if ask.enforced {
        let covered = match ask.tickets {
            Some(t) if t.parent() == ask.me => t.covered(ask.now_ms, ask.skew_ms),
            _ => 0,
        };
        let missing = ask.mask & !covered;
        if missing != 0 {
            return Err(refusal(
                ErrorCode::Unauthorized,
                format!(
                    "ticket_missing: no valid parent ticket for substreams {:#x}",
                    missing
                ),
            ));
        }
    }
    // Slot accounting is the grid core's policy (twice the slots for ticketed children).
    if ask.others_used.saturating_add(ask.mask.count_ones()) > admit_limit(ask.slots, ask.enforced)
    {
        return Err(refusal(
            ErrorCode::ServerBusy,
            "no free child slot".to_string(),
        ));
    }
    Ok(())
}

/// Whether one more incoming link of `peer` is allowed, given how many it holds.
pub(crate) fn check_peer_links(peer: Option<u64>, held: usize) -> Result<(), Refusal> {
    match peer {
        Some(id) if held >= MAX_LINKS_PER_PEER => Err(refusal(
            ErrorCode::ServerBusy,
            format!("peer {id} already holds a link here"),
        )),
        _ => Ok(()),
    }
}

/// The tickets the control plane gave us for our parents, by substream.
#[derive(Debug, Default)]
pub(crate) struct TicketBook {
    by_substream: HashMap<u32, (u64, Bytes)>,
}

impl TicketBook {
    /// Keeps `t` (replacing the substream's previous ticket); whether it is new.
    pub(crate) fn set(&mut self, t: Ticket) -> bool {
        if t.substream >= 64 {
            return false;
        }
        let new = (t.parent, t.ticket);
        if self.by_substream.get(&t.substream) == Some(&new) {
            return false;
        }
        self.by_substream.insert(t.substream, new);
        true
    }

    /// The tickets naming `parent` for substreams in `mask`.
    pub(crate) fn for_parent(&self, parent: u64, mask: u64) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = Vec::new();
        let mut subs: Vec<_> = self.by_substream.iter().collect();
        subs.sort_by_key(|(s, _)| **s);
        for (s, (p, t)) in subs {
            if *p == parent && mask & (1u64 << s) != 0 && !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }

    /// Forgets every ticket (a re-join: they name our old peer id).
    pub(crate) fn clear(&mut self) {
        self.by_substream.clear();
    }
}

/// Counts accepted connections per source address (handshakes included).
#[derive(Debug)]
pub(crate) struct IpLimiter {
    max: u32,
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's share of its address's count; released when dropped.
#[derive(Debug)]
pub(crate) struct IpPermit {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl IpLimiter {
    /// At most `max` connections per address (0 = unlimited).
    pub(crate) fn new(max: u32) -> Arc<IpLimiter> {
        Arc::new(IpLimiter {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for one more connection from `ip`, or `None` at the cap.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpPermit> {
        let mut c = self.counts.lock();
        let n = c.entry(ip).or_insert(0);
        if self.max != 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections from `ip` now.
    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> u32 {
        self.counts.lock().get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut c = self.limiter.counts.lock();
        if let Some(n) = c.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn claims(mask: u64, exp: u64) -> TicketClaims {
        TicketClaims {
            broadcast_id: "b".into(),
            child_peer_id: 2,
            parent_peer_id: 1,
            substream_mask: mask,
            issued_at_ms: NOW - 1,
            expires_at_ms: exp,
        }
    }

    fn ask(mask: u64, tickets: Option<&Tickets>) -> Ask<'_> {
        Ask {
            enforced: true,
            me: 1,
            mask,
            tickets,
            now_ms: NOW,
            skew_ms: 5,
            others_used: 0,
            slots: 4,
        }
    }

    #[test]
    fn children_need_tickets_for_every_substream() {
        assert_eq!(
            check_subscribe(&ask(0b11, None)).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        let mut t = Tickets::new(1, NOW);
        t.add(&claims(0b01, NOW + 100));
        assert_eq!(
            check_subscribe(&ask(0b11, Some(&t))).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        t.add(&claims(0b10, NOW + 100));
        check_subscribe(&ask(0b11, Some(&t))).unwrap();
        // Neighbours (mask 0) need none.
        check_subscribe(&ask(0, None)).unwrap();
        // Tickets checked for another parent id (we re-joined since) count for nothing.
        let other = Tickets {
            parent: 9,
            ..t.clone()
        };
        assert!(check_subscribe(&ask(0b11, Some(&other))).is_err());
        // Expired (past the skew).
        let late = Ask {
            now_ms: NOW + 105,
            ..ask(0b11, Some(&t))
        };
        assert!(check_subscribe(&late).is_err());
        let in_skew = Ask {
            now_ms: NOW + 104,
            ..ask(0b11, Some(&t))
        };
        check_subscribe(&in_skew).unwrap();
    }

    #[test]
    fn slots_with_slack_for_ticketed_children_only() {
        let mut t = Tickets::new(1, NOW);
        t.add(&claims(u64::MAX, NOW + 100));
        let full = Ask {
            others_used: 7,
            ..ask(0b1, Some(&t))
        };
        check_subscribe(&full).unwrap();
        let over = Ask {
            others_used: 8,
            ..ask(0b1, Some(&t))
        };
        assert_eq!(
            check_subscribe(&over).unwrap_err().code,
            ErrorCode::ServerBusy
        );
        let legacy = Ask {
            enforced: false,
            others_used: 4,
            ..ask(0b1, None)
        };
        assert_eq!(
            check_subscribe(&legacy).unwrap_err().code,
            ErrorCode::ServerBusy
        );
    }

    #[test]
    fn one_link_per_peer() {
        check_peer_links(Some(3), 0).unwrap();
        assert_eq!(
            check_peer_links(Some(3), 1).unwrap_err().code,
            ErrorCode::ServerBusy
        );
        check_peer_links(None, 5).unwrap();
    }

    #[test]
    fn ticket_frames_are_rate_limited() {
        let mut t = Tickets::new(1, NOW);
        for _ in 0..TICKET_BURST {
            assert!(t.allow(NOW));
        }
        assert!(!t.allow(NOW));
        assert!(t.allow(NOW + TICKET_REFILL_MS));
        assert!(!t.allow(NOW + TICKET_REFILL_MS));
    }

    #[test]
    fn ticket_book_hands_out_a_parents_tickets() {
        let mut b = TicketBook::default();
        let t = |s: u32, p: u64, x: &'static [u8]| Ticket {
            substream: s,
            parent: p,
            ticket: Bytes::from_static(x),
        };
        assert!(b.set(t(0, 5, b"a")));
        assert!(!b.set(t(0, 5, b"a")));
        assert!(b.set(t(1, 5, b"b")));
        assert!(b.set(t(2, 6, b"c")));
        assert!(!b.set(t(64, 6, b"d")));
        assert_eq!(
            b.for_parent(5, 0b111),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        assert_eq!(b.for_parent(5, 0b10), vec![Bytes::from_static(b"b")]);
        assert!(b.for_parent(6, 0b11).is_empty());
        b.clear();
        assert!(b.for_parent(5, u64::MAX).is_empty());
    }

    #[test]
    fn addresses_are_capped_and_released() {
        let l = IpLimiter::new(2);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let a = l.try_acquire(ip).unwrap();
        let b = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        assert!(l.try_acquire("127.0.0.3".parse().unwrap()).is_some());
        drop(a);
        let _c = l.try_acquire(ip).unwrap();
        drop(b);
        assert_eq!(l.count(ip), 1);
        let unlimited = IpLimiter::new(0);
        let held: Vec<_> = (0..100)
            .map(|_| unlimited.try_acquire(ip).unwrap())
            .collect();
        assert_eq!(held.len(), 100);
    }
}
