//! [`ParentMemory`]: which peers this peer will not take as a parent or neighbour:
//! parents whose link failed lately (not re-adopted from a stale assignment), peers
//! banned for a bad chunk; and the exclude list of a re-search built from them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::PeerId;

/// How long a failed parent is not adopted again from a heartbeat.
pub const FAILED_PARENT_MEMORY: Duration = Duration::from_secs(10);
/// Most peers remembered as polluters (a swarm with more is beyond saving anyway).
pub const MAX_BANNED: usize = 1024;
/// Most excluded peer ids sent in one re-search (`Reparent`).
pub const MAX_EXCLUDE: usize = 32;

/// Failed and banned peers.
#[derive(Debug, Clone, Default)]
pub struct ParentMemory {
    /// Parent peers whose link failed, and when: a heartbeat that still names one (the
    /// control plane has not noticed yet) does not make us dial it again.
    failed: HashMap<PeerId, Duration>,
    /// Peers that sent a bad chunk: never a parent or neighbour of ours again.
    banned: HashSet<PeerId>,
}

impl ParentMemory {
    /// The link to parent `id` failed at `now`.
    pub fn failed(&mut self, id: PeerId, now: Duration) {
        self.failed.insert(id, now);
    }

    /// Forgets failures older than [`FAILED_PARENT_MEMORY`] at `now`.
    pub fn forget_old(&mut self, now: Duration) {
        self.failed
            .retain(|_, t| now.saturating_sub(*t) < FAILED_PARENT_MEMORY);
    }

    /// `id`'s link failed within the memory (as of the last [`ParentMemory::forget_old`]).
    pub fn recently_failed(&self, id: PeerId) -> bool {
        self.failed.contains_key(&id)
    }

    /// `id` sent a bad chunk (remembered up to [`MAX_BANNED`] peers).
    pub fn ban(&mut self, id: PeerId) {
        if self.banned.len() < MAX_BANNED {
            self.banned.insert(id);
        }
    }

    /// `id` sent a bad chunk.
    pub fn is_banned(&self, id: PeerId) -> bool {
        self.banned.contains(&id)
    }

    /// A re-search's exclude list: `exclude`, then banned peers (never offered a
    /// polluter again: the control plane is told too, but it may not have acted on the
    /// report yet) up to [`MAX_EXCLUDE`] in all.
    pub fn exclude_list(&self, mut exclude: Vec<PeerId>) -> Vec<PeerId> {
        for &b in &self.banned {
            if exclude.len() >= MAX_EXCLUDE {
                break;
            }
            if !exclude.contains(&b) {
                exclude.push(b);
            }
        }
        exclude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_parent_is_remembered_for_ten_seconds() {
        let mut m = ParentMemory::default();
        m.failed(7, Duration::from_secs(5));
        m.forget_old(Duration::from_secs(14));
        assert!(m.recently_failed(7));
        m.forget_old(Duration::from_secs(15));
        assert!(!m.recently_failed(7));
    }

    #[test]
    fn banned_peers_join_the_exclude_list_up_to_its_cap() {
        let mut m = ParentMemory::default();
        for id in 100..200 {
            m.ban(id);
        }
        let e = m.exclude_list(vec![3, 150]);
        assert_eq!(e.len(), MAX_EXCLUDE);
        assert_eq!(&e[..2], &[3, 150]);
        assert_eq!(e.iter().filter(|&&x| x == 150).count(), 1);
        assert!(e[2..].iter().all(|&x| m.is_banned(x)));
        assert!(!m.is_banned(3));
    }

    #[test]
    fn bans_are_bounded() {
        let mut m = ParentMemory::default();
        for id in 0..(MAX_BANNED as u64 + 10) {
            m.ban(id);
        }
        assert!(m.is_banned(0));
        assert!(!m.is_banned(MAX_BANNED as u64));
    }
}
