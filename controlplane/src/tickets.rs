//! Parent tickets on the control-plane side: every `SubstreamParent` naming a peer that
//! the control plane hands out (`Join`, `Heartbeat`, `Reparent`) carries a ticket,
//! signed with the chunk-token signing key ([`TokenKeys::sign_ticket`]), that names
//! the broadcast, the viewer (child), the parent peer and that one substream. A relaying
//! peer admits a child only for substreams that such a ticket covers (format:
//! [`starling_proto::ticket`]; admission: the SDK's `relay/admission.rs`).
//!
//! One ticket per parent peer: when a parent serves the child several substreams, their
//! tickets are one signature whose mask holds all of them (a relay admits a substream
//! when its bit is in a valid ticket's mask), so a join costs one signature per distinct
//! peer parent, not per substream.
//!
//! Heartbeats answer every viewer's parents each interval, so tickets are cached per
//! (child, parent peer), with the mask they cover, and re-signed only when a substream
//! moves to a parent outside the cached mask, when less than half of the lifetime is
//! left, or when the signing key changed (a rotation: the old key is unpublished
//! [`crate::tokens::RETIRE_AFTER`] later, long before a ticket it signed would expire,
//! so a ticket must move to the new key at once). A steady viewer thus costs one
//! signature per parent per half lifetime; a viewer moved to a new parent gets its
//! ticket in the same answer that names the parent.
//!
//! Session streams do not need the cache (they push tickets only when parents change,
//! and re-sign at half the lifetime on their own timer): a stream's first message takes
//! the tickets its join cached out of the cache ([`Caching::Take`]), later ones are
//! signed without touching it ([`Caching::Bypass`]), so a held stream costs no cache
//! entry.

use crate::tokens::takes_mac_tickets;
use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;

use starling_proto::ticket::TicketClaims;
use starling_proto::v1::SubstreamParent;

use crate::tokens::TokenKeys;

/// Default ticket lifetime: long enough that a steady assignment is re-signed only
/// every 5 minutes, short enough that a ticket kept after the assignment ended (a
/// child moved elsewhere that keeps its link) holds a slot for at most this long.
pub const DEFAULT_TICKET_TTL: Duration = Duration::from_secs(600);
/// Shortest ticket lifetime accepted (several heartbeats).
pub const MIN_TICKET_TTL: Duration = Duration::from_secs(10);
/// Longest ticket lifetime accepted.
pub const MAX_TICKET_TTL: Duration = Duration::from_secs(3600);
/// Most cached tickets; beyond it tickets are signed without being cached (each
/// costs one signature per heartbeat until expired entries are pruned).
const MAX_CACHED: usize = 1 << 20;
/// Expired entries are pruned after this many insertions.
const PRUNE_EVERY: u32 = 4096;

/// How [`ParentTickets::attach_with`] uses the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// Look up, and store what was signed (`Join`, `Heartbeat`, `Reparent`).
    Keep,
    /// Look up and remove what was found; store nothing (a session stream's first
    /// message: from then on the stream keeps its tickets current itself).
    Take,
    /// Neither look up nor store (a session stream's later messages).
    Bypass,
}

/// One cached ticket: `ticket` covers the substreams in `mask` of one (child, parent).
#[derive(Debug)]
struct Cached {
    /// FNV-32 of the broadcast id (peer ids are random 63-bit numbers: a child id shared
    /// by two broadcasts is already unlikely; this makes a mix-up impossible in practice).
    broadcast: u32,
    key_id: u32,
    mask: u64,
    /// Unix ms after which the ticket is re-signed (half its lifetime).
    renew_at_ms: i64,
    expires_at_ms: i64,
    ticket: Box<[u8]>,
}

#[derive(Debug, Default)]
struct Cache {
    /// By (child, parent).
    entries: HashMap<(u64, u64), Cached>,
    inserts: u32,
}

/// Signs and caches parent tickets.
#[derive(Debug)]
pub struct ParentTickets {
    ttl: Duration,
    cache: Mutex<Cache>,
}

impl Default for ParentTickets {
    fn default() -> Self {
        ParentTickets::new(DEFAULT_TICKET_TTL)
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// FNV-1a, 32 bit.
fn fnv32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl ParentTickets {
    /// `ttl` is clamped to [`MIN_TICKET_TTL`]..=[`MAX_TICKET_TTL`].
    pub fn new(ttl: Duration) -> ParentTickets {
        ParentTickets {
            ttl: ttl.clamp(MIN_TICKET_TTL, MAX_TICKET_TTL),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The ticket lifetime.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// [`ParentTickets::attach_with`], caching ([`Caching::Keep`]).
    pub fn attach(
        &self,
        keys: &TokenKeys,
        broadcast_id: &str,
        child: u64,
        parents: &mut [SubstreamParent],
        now_ms: i64,
    ) -> Option<i64> {
        self.attach_with(keys, broadcast_id, child, parents, now_ms, Caching::Keep)
    }

    /// Fills in `ticket` of every entry of `parents` that names a peer (the data plane
    /// needs none), for `child` of `broadcast_id`. A ticket that cannot be signed (an
    /// over-long broadcast id: refused at creation anyway) is left empty and logged.
    /// Returns the earliest time (unix ms) one of these tickets will be re-signed (half
    /// its lifetime), `None` when no entry names a peer.
    /// The cache's lock is held only to look up and to store: signatures (a flash crowd
    /// of joins needs one per parent each) are made outside it.
    pub fn attach_with(
        &self,
        keys: &TokenKeys,
        broadcast_id: &str,
        child: u64,
        parents: &mut [SubstreamParent],
        now_ms: i64,
        caching: Caching,
    ) -> Option<i64> {
        let key_id = keys.signing_key_id();
        let broadcast = fnv32(broadcast_id);
        // The earliest time (unix ms) one of the tickets handed out here gets re-signed:
        // a session stream re-sends its parents then ([`crate::service`]).
        let mut renew_at: Option<i64> = None;
        // (index in `parents`, parent peer) of the entries the cache cannot answer.
        let mut misses: Vec<(usize, u64)> = Vec::new();
        if caching == Caching::Bypass {
            for (i, p) in parents.iter_mut().enumerate() {
                p.ticket.clear();
                if let Some(r) = p.peer.as_ref() {
                    misses.push((i, r.peer_id));
                }
            }
        } else {
            let mut cache = self.cache.lock();
            // Per parent peer named: whether the cache answers all its substreams here.
            let mut answered: Vec<(u64, bool)> = Vec::new();
            for p in parents.iter() {
                let Some(parent) = p.peer.as_ref().map(|r| r.peer_id) else {
                    continue;
                };
                let bit = 1u64.checked_shl(p.substream).unwrap_or(0);
                let hit = cache.entries.get(&(child, parent)).is_some_and(|c| {
                    c.mask & bit != 0
                        && c.key_id == key_id
                        && c.broadcast == broadcast
                        && now_ms < c.renew_at_ms
                });
                match answered.iter_mut().find(|(q, _)| *q == parent) {
                    Some((_, all)) => *all &= hit,
                    None => answered.push((parent, hit)),
                }
            }
            // A parent with one substream the cache cannot answer is signed again for
            // all its substreams here, so its one entry keeps covering all of them.
            for (i, p) in parents.iter_mut().enumerate() {
                p.ticket.clear();
                let Some(parent) = p.peer.as_ref().map(|r| r.peer_id) else {
                    continue;
                };
                let cached = answered
                    .iter()
                    .any(|&(q, all)| q == parent && all)
                    .then(|| cache.entries.get(&(child, parent)))
                    .flatten();
                match cached {
                    Some(c) => {
                        p.ticket.extend_from_slice(&c.ticket);
                        renew_at = Some(renew_at.map_or(c.renew_at_ms, |r| r.min(c.renew_at_ms)));
                    }
                    None => misses.push((i, parent)),
                }
            }
            if caching == Caching::Take {
                for (parent, _) in answered.iter().filter(|(_, all)| *all) {
                    cache.entries.remove(&(child, *parent));
                }
            }
        }
        if misses.is_empty() {
            return renew_at;
        }
        let issued = u64::try_from(now_ms).unwrap_or(0);
        let expires = issued.saturating_add(u64::try_from(self.ttl.as_millis()).unwrap_or(0));
        // One signature per parent peer: its ticket covers every substream (of those to
        // sign) that this parent serves to `child`, the same rights as one ticket per
        // substream (a relay checks its substream's bit in the mask).
        let mut by_parent: Vec<(u64, u64, Vec<usize>)> = Vec::new();
        for (i, parent) in misses {
            let Some(p) = parents.get(i) else {
                continue;
            };
            let Some(bit) = 1u64.checked_shl(p.substream) else {
                continue;
            };
            match by_parent.iter_mut().find(|(q, _, _)| *q == parent) {
                Some((_, mask, at)) => {
                    *mask |= bit;
                    at.push(i);
                }
                None => by_parent.push((parent, bit, vec![i])),
            }
        }
        let mut signed: Vec<((u64, u64), Cached)> = Vec::new();
        for (parent, mask, at) in by_parent {
            let claims = TicketClaims {
                broadcast_id: broadcast_id.to_string(),
                child_peer_id: child,
                parent_peer_id: parent,
                substream_mask: mask,
                issued_at_ms: issued,
                expires_at_ms: expires,
            };
            match keys.sign_ticket(&claims, takes_mac_tickets(parent)) {
                Ok((key_id, t)) => {
                    let renew = now_ms.saturating_add(ms(self.ttl) / 2);
                    renew_at = Some(renew_at.map_or(renew, |r| r.min(renew)));
                    for i in at {
                        if let Some(p) = parents.get_mut(i) {
                            p.ticket.clone_from(&t);
                        }
                    }
                    if caching == Caching::Keep {
                        signed.push((
                            (child, parent),
                            Cached {
                                broadcast,
                                key_id,
                                mask,
                                renew_at_ms: renew,
                                expires_at_ms: i64::try_from(expires).unwrap_or(i64::MAX),
                                ticket: t.into_boxed_slice(),
                            },
                        ));
                    }
                }
                Err(e) => {
                    tracing::error!(broadcast_id, child, parent, error = %e, "cannot sign a parent ticket");
                }
            }
        }
        if signed.is_empty() {
            return renew_at;
        }
        let mut cache = self.cache.lock();
        for (k, c) in signed {
            if cache.entries.len() < MAX_CACHED || cache.entries.contains_key(&k) {
                cache.entries.insert(k, c);
            }
            cache.inserts = cache.inserts.wrapping_add(1);
            if cache.inserts.is_multiple_of(PRUNE_EVERY) {
                cache.entries.retain(|_, c| c.expires_at_ms > now_ms);
            }
        }
        renew_at
    }

    /// Tickets cached now (one per child and parent peer).
    pub fn cached(&self) -> usize {
        self.cache.lock().entries.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use starling_proto::token::TokenVerifier;
    use starling_proto::v1::PeerRef;

    fn keys() -> TokenKeys {
        TokenKeys::for_tests(Duration::from_secs(60))
    }

    fn parents() -> Vec<SubstreamParent> {
        vec![
            SubstreamParent {
                substream: 0,
                peer: None,
                ticket: Vec::new(),
            },
            SubstreamParent {
                substream: 1,
                peer: Some(PeerRef {
                    peer_id: 8,
                    addr: "127.0.0.9:1".into(),
                    punch: false,
                }),
                ticket: Vec::new(),
            },
        ]
    }

    // Even peer ids: parents that check version-1 (Ed25519) tickets.
    #[test]
    fn tickets_name_child_parent_and_substream_and_are_cached() {
        let keys = keys();
        let mut v = TokenVerifier::new();
        for k in keys.public_keys() {
            v.add_key(k.key_id, &k.ed25519).unwrap();
        }
        let t = ParentTickets::new(Duration::from_secs(600));
        let mut p = parents();
        t.attach(&keys, "b", 5, &mut p, 1_000);
        assert!(p[0].ticket.is_empty(), "the data plane needs no ticket");
        let c = v.verify_ticket(&p[1].ticket, "b", 5, 8, 1_000, 0).unwrap();
        assert_eq!(c.substream_mask, 0b10);
        assert_eq!(c.expires_at_ms, 601_000);
        // Cached until half the lifetime is left.
        let first = p[1].ticket.clone();
        let mut again = parents();
        t.attach(&keys, "b", 5, &mut again, 300_999);
        assert_eq!(again[1].ticket, first);
        t.attach(&keys, "b", 5, &mut again, 301_000);
        assert_ne!(again[1].ticket, first);
        // A new parent gets a new ticket at once.
        let mut moved = parents();
        moved[1].peer.as_mut().unwrap().peer_id = 10;
        t.attach(&keys, "b", 5, &mut moved, 301_001);
        v.verify_ticket(&moved[1].ticket, "b", 5, 10, 301_001, 0)
            .unwrap();
        // One entry per (child, parent): the former parent's stays until it expires.
        assert_eq!(t.cached(), 2);
    }

    #[test]
    fn one_signature_per_parent_covers_its_substreams() {
        let keys = keys();
        let mut v = TokenVerifier::new();
        for k in keys.public_keys() {
            v.add_key(k.key_id, &k.ed25519).unwrap();
        }
        let peer = |id| {
            Some(PeerRef {
                peer_id: id,
                addr: "127.0.0.9:1".into(),
                punch: false,
            })
        };
        let mut p: Vec<SubstreamParent> = [(0, 8), (1, 8), (2, 6), (3, 8)]
            .into_iter()
            .map(|(s, id)| SubstreamParent {
                substream: s,
                peer: peer(id),
                ticket: Vec::new(),
            })
            .collect();
        let t = ParentTickets::new(Duration::from_secs(600));
        t.attach(&keys, "b", 5, &mut p, 1_000);
        assert_eq!(p[0].ticket, p[1].ticket);
        assert_eq!(p[0].ticket, p[3].ticket);
        let c = v.verify_ticket(&p[0].ticket, "b", 5, 8, 1_000, 0).unwrap();
        assert_eq!(c.substream_mask, 0b1011);
        let c = v.verify_ticket(&p[2].ticket, "b", 5, 6, 1_000, 0).unwrap();
        assert_eq!(c.substream_mask, 0b0100);
        assert_eq!(t.cached(), 2, "one entry per parent peer");
        // Substream 1 moves to parent 6: only parent 6's ticket is re-signed, for both
        // its substreams (its one cache entry covers both).
        p[1].peer = peer(6);
        let before = p[0].ticket.clone();
        t.attach(&keys, "b", 5, &mut p, 2_000);
        assert_eq!(p[0].ticket, before);
        assert_eq!(p[1].ticket, p[2].ticket);
        let c = v.verify_ticket(&p[1].ticket, "b", 5, 6, 2_000, 0).unwrap();
        assert_eq!(c.substream_mask, 0b0110);
        assert_eq!(t.cached(), 2);
        // Answered from the cache from now on.
        let again = p[1].ticket.clone();
        t.attach(&keys, "b", 5, &mut p, 3_000);
        assert_eq!(p[1].ticket, again);
    }

    #[test]
    fn a_stream_takes_its_joins_tickets_and_caches_nothing() {
        let keys = keys();
        let t = ParentTickets::new(Duration::from_secs(600));
        let mut joined = parents();
        t.attach(&keys, "b", 5, &mut joined, 1_000);
        assert_eq!(t.cached(), 1);
        // The stream's first message: the join's ticket, taken out of the cache.
        let mut first = parents();
        let renew = t.attach_with(&keys, "b", 5, &mut first, 2_000, Caching::Take);
        assert_eq!(first[1].ticket, joined[1].ticket);
        assert_eq!(renew, Some(301_000));
        assert_eq!(t.cached(), 0);
        // Later messages: signed, never cached.
        let mut later = parents();
        let renew = t.attach_with(&keys, "b", 5, &mut later, 3_000, Caching::Bypass);
        assert!(!later[1].ticket.is_empty());
        assert_ne!(later[1].ticket, joined[1].ticket);
        assert_eq!(renew, Some(303_000));
        assert_eq!(t.cached(), 0);
        // Another broadcast's cached ticket for the same peer ids is not handed out.
        t.attach(&keys, "b", 5, &mut joined, 4_000);
        let mut other = parents();
        t.attach(&keys, "c", 5, &mut other, 4_000);
        assert_ne!(other[1].ticket, joined[1].ticket);
    }
}
