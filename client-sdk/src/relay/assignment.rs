//! Applying the control plane's assignment (from `Join`, heartbeats and re-joins):
//! parents per substream, mesh neighbours, parent tickets.

use std::collections::BTreeSet;
use std::time::Duration;

use starling_proto::wire::Frame;

use super::{Engine, Feed};
use crate::control::{Assignment, PeerAddr};

impl Engine {
    pub(super) fn apply_assignment(&mut self, a: Assignment, initial: bool) {
        if a.parents.is_empty() {
            // An older control plane: keep what we have.
            return;
        }
        let now = self.now();
        let renewed: Vec<(u32, u64)> = a
            .tickets
            .into_iter()
            .filter_map(|t| {
                let key = (t.substream, t.parent);
                self.book.set(t).then_some(key)
            })
            .collect();
        self.peer.forget_old_failures(now);
        for (s, p) in a.parents {
            let Ok(s) = u16::try_from(s) else { continue };
            if s >= self.k {
                continue;
            }
            let feed = Feed::from_parent(p, self.me);
            if let Feed::Peer(p) = &feed
                && (self.peer.memory().recently_failed(p.id) || self.excluded(p.id))
            {
                if self.feeds[usize::from(s)] != feed {
                    let id = p.id;
                    self.research(s, vec![id]);
                }
                continue;
            }
            self.set_feed(s, feed, now, !initial);
        }
        let mut seen = BTreeSet::new();
        let neighbours: Vec<PeerAddr> = a
            .neighbours
            .into_iter()
            .filter(|n| n.id != self.me && seen.insert(n.id))
            .collect();
        self.neighbours = neighbours
            .into_iter()
            .filter(|n| !self.excluded(n.id))
            .collect();
        self.reconcile();
        self.send_renewed_tickets(&renewed);
    }

    /// New tickets for substreams a parent already pushes to us go to it at once (a
    /// parent closes a child whose tickets expire).
    pub(super) fn send_renewed_tickets(&mut self, renewed: &[(u32, u64)]) {
        for &(s, parent) in renewed {
            let Some(&l) = self.peer_links.get(&parent) else {
                continue;
            };
            let Some(link) = self.links.get(&l) else {
                continue;
            };
            if link.handle.is_none() || link.sent_mask & (1u64 << s.min(63)) == 0 {
                continue;
            }
            for t in self.book.for_parent(parent, 1u64 << s.min(63)) {
                self.send_to(l, &Frame::Ticket(t));
            }
        }
    }

    pub(super) fn set_feed(&mut self, s: u16, feed: Feed, now: Duration, count: bool) {
        let i = usize::from(s);
        if self.feeds[i] == feed {
            return;
        }
        tracing::debug!(substream = s, ?feed, "parent changed");
        self.peer.set_parent(s, feed.parent(), now);
        self.feeds[i] = feed;
        if count {
            self.shared.stats_mut().parent_changes += 1;
        }
        self.cancel_timer_if_back(s);
    }
}
