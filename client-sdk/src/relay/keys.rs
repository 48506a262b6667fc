//! Chunks signed with a key id this viewer does not hold yet.
//!
//! A node that restarts, takes over a broadcast or rotates its key signs with a key id
//! the control plane publishes at once, but viewers hear of it only at their next
//! heartbeat; a relay that heard first forwards chunks the child cannot check yet.
//! Such a chunk costs its sender nothing at first: it is held here (a few per link,
//! bounded in bytes) and the heartbeat loop is asked for the current keys at once
//! ([`crate::rights::Rights::ask_key_refresh`]). When a heartbeat that started after
//! the ask has answered, each held chunk is checked again: authentic ones are taken
//! as if they had just arrived, a key id still unknown (a forger's) or any other
//! failure drops and reports the sender as for any bad chunk. A chunk whose refresh
//! never comes (control plane unreachable) is dropped after
//! [`KeyHoldLimits::max_wait`] without blaming anyone. Meanwhile the scheduler
//! repairs the chunk elsewhere like any missing one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use starling_proto::integrity::IntegrityError;
use starling_proto::wire::{Chunk, Frame};

use super::Engine;
use super::link::LinkId;
use crate::rights::ChunkCheck;

/// Bounds on the chunks held for a key refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHoldLimits {
    /// Chunks held per link (more are dropped unseen: the scheduler repairs them).
    /// Default 4.
    pub per_link: usize,
    /// Payload bytes held in total. Default 8 MiB.
    pub max_bytes: usize,
    /// A held chunk whose refresh has not come after this long is dropped (nobody is
    /// blamed). Default 10 s.
    pub max_wait: Duration,
    /// Least time between two early heartbeats made for a refresh (the normal
    /// heartbeats are not delayed). Default 1 s.
    pub min_interval: Duration,
}

impl Default for KeyHoldLimits {
    fn default() -> Self {
        KeyHoldLimits {
            per_link: 4,
            max_bytes: 8 * 1024 * 1024,
            max_wait: Duration::from_secs(10),
            min_interval: Duration::from_secs(1),
        }
    }
}

/// One held chunk.
#[derive(Debug)]
pub(crate) struct Held {
    pub link: LinkId,
    pub chunk: Chunk,
    /// The refresh ticket that must be covered before its key id is declared unknown.
    pub ticket: u64,
    pub since: Instant,
}

/// The chunks held for a key refresh, oldest first.
#[derive(Debug, Default)]
pub(crate) struct UnknownKeys {
    held: VecDeque<Held>,
    bytes: usize,
}

impl UnknownKeys {
    /// Holds `chunk` from `link` until `ticket` is covered. False (the chunk is
    /// dropped) when the link or the byte budget is full.
    pub(crate) fn hold(
        &mut self,
        limits: &KeyHoldLimits,
        link: LinkId,
        chunk: Chunk,
        ticket: u64,
        now: Instant,
    ) -> bool {
        let len = chunk.payload.len();
        let per_link = self.held.iter().filter(|h| h.link == link).count();
        if per_link >= limits.per_link || self.bytes.saturating_add(len) > limits.max_bytes {
            return false;
        }
        self.bytes += len;
        self.held.push_back(Held {
            link,
            chunk,
            ticket,
            since: now,
        });
        true
    }

    /// Takes every held chunk out (to be checked again after a refresh; the caller
    /// puts back those still waiting with [`UnknownKeys::put_back`]).
    pub(crate) fn take_all(&mut self) -> Vec<Held> {
        self.bytes = 0;
        self.held.drain(..).collect()
    }

    /// Puts back a chunk taken out by [`UnknownKeys::take_all`], as it was.
    pub(crate) fn put_back(&mut self, h: Held) {
        self.bytes += h.chunk.payload.len();
        self.held.push_back(h);
    }

    /// Drops the chunks held longer than `max_wait`; returns how many.
    pub(crate) fn expire(&mut self, limits: &KeyHoldLimits, now: Instant) -> usize {
        let before = self.held.len();
        let mut bytes = 0;
        self.held.retain(|h| {
            let keep = now.saturating_duration_since(h.since) < limits.max_wait;
            if keep {
                bytes += h.chunk.payload.len();
            }
            keep
        });
        self.bytes = bytes;
        before - self.held.len()
    }

    /// Forgets a link's chunks (it is gone).
    pub(crate) fn forget(&mut self, link: LinkId) {
        let mut bytes = 0;
        self.held.retain(|h| {
            let keep = h.link != link;
            if keep {
                bytes += h.chunk.payload.len();
            }
            keep
        });
        self.bytes = bytes;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Engine {
    /// A chunk signed with a key id we do not hold: held, and the keys refreshed
    /// (see [`keys`]); its sender is blamed only if the refreshed keys still lack it.
    pub(super) fn on_unknown_key(&mut self, l: LinkId, c: Chunk) {
        if !self.links.contains_key(&l) {
            return;
        }
        self.shared.stats_mut().chunks_unknown_key += 1;
        let ticket = self.shared.rights.ask_key_refresh();
        let seq = c.seq;
        if self
            .unknown_keys
            .hold(&self.key_hold, l, c, ticket, Instant::now())
        {
            tracing::info!(
                l,
                seq,
                "chunk signed with an unknown key id: refreshing the keys"
            );
        } else {
            tracing::debug!(
                l,
                seq,
                "chunk signed with an unknown key id dropped (hold full)"
            );
        }
    }

    /// A heartbeat answered the key refreshes up to ticket `done`: held chunks are
    /// checked again.
    pub(super) fn on_keys_refreshed(&mut self, done: u64) {
        if self.unknown_keys.is_empty() {
            return;
        }
        for h in self.unknown_keys.take_all() {
            if !self.links.contains_key(&h.link) {
                continue;
            }
            let mut c = h.chunk;
            match self.shared.check_chunk(&c) {
                ChunkCheck::Verified { flags } => {
                    c.flags = flags;
                    tracing::debug!(
                        l = h.link,
                        seq = c.seq,
                        "held chunk verified after a key refresh"
                    );
                    self.on_frame(h.link, Frame::Chunk(c));
                }
                ChunkCheck::Unverified => self.on_frame(h.link, Frame::Chunk(c)),
                ChunkCheck::Excused(_) => {}
                ChunkCheck::Bad(IntegrityError::UnknownKeyId(_)) if h.ticket > done => {
                    self.unknown_keys.put_back(Held { chunk: c, ..h });
                }
                ChunkCheck::Bad(error) => {
                    let len = c.payload.len() as u64;
                    self.on_bad_chunk(h.link, c.seq, len, error);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn chunk(seq: u64, len: usize) -> Chunk {
        Chunk {
            seq,
            flags: 0,
            timestamp_ms: 0,
            duration_ms: 100,
            signature: Bytes::new(),
            payload: Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn holding_is_bounded_per_link_and_in_bytes_and_expires() {
        let limits = KeyHoldLimits {
            per_link: 2,
            max_bytes: 250,
            max_wait: Duration::from_secs(10),
            min_interval: Duration::from_secs(1),
        };
        let mut u = UnknownKeys::default();
        let t0 = Instant::now();
        assert!(u.hold(&limits, 1, chunk(1, 100), 1, t0));
        assert!(u.hold(&limits, 1, chunk(2, 100), 2, t0));
        assert!(!u.hold(&limits, 1, chunk(3, 10), 3, t0), "per link");
        assert!(!u.hold(&limits, 2, chunk(4, 100), 4, t0), "bytes");
        assert!(u.hold(&limits, 2, chunk(5, 50), 5, t0));
        u.forget(1);
        assert!(u.hold(&limits, 2, chunk(6, 100), 6, t0 + Duration::from_secs(5)));
        let all = u.take_all();
        assert_eq!(all.len(), 2);
        for h in all {
            u.put_back(h);
        }
        assert_eq!(u.expire(&limits, t0 + Duration::from_secs(11)), 1);
        assert!(!u.is_empty());
        assert_eq!(u.expire(&limits, t0 + Duration::from_secs(16)), 1);
        assert!(u.is_empty());
    }
}
