//! Re-parenting: `Reparent` calls to the control plane (re-search of a substream
//! whose parent was lost or is late), their answers, and the timing of each re-parent
//! for the stats.

use std::time::Instant;

use super::{Engine, Ev, Feed, feed_source};
use crate::control::{AssignedParent, PeerAddr};
use crate::error::SdkError;
use starling_grid::PeerId;

/// A re-parent in progress on one substream, timed from the loss or re-search of
/// `from` to the first chunk pushed by another parent.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReparentTimer {
    since: Instant,
    /// The parent left behind (`None` = the data plane).
    from: Option<u64>,
    /// The `Reparent` answer was recorded.
    answered: bool,
}

impl Engine {
    /// Starts timing a re-parent of `s` away from `from` (no-op if one is timed).
    pub(super) fn start_reparent_timer(&mut self, s: u16, from: Option<u64>) {
        if let Some(t) = self.reparent_timers.get_mut(usize::from(s))
            && t.is_none()
        {
            *t = Some(ReparentTimer {
                since: Instant::now(),
                from,
                answered: false,
            });
        }
    }

    /// The substream is fed by the parent it was leaving again: not a re-parent.
    pub(super) fn cancel_timer_if_back(&mut self, s: u16) {
        let i = usize::from(s);
        let back = match (&self.reparent_timers[i], feed_source(&self.feeds[i])) {
            (Some(t), Some(src)) => src == t.from,
            _ => false,
        };
        if back {
            self.reparent_timers[i] = None;
        }
    }

    /// The `Reparent` answer for `s` arrived.
    pub(super) fn reparent_answered(&mut self, s: u16) {
        if let Some(Some(t)) = self.reparent_timers.get_mut(usize::from(s))
            && !t.answered
        {
            t.answered = true;
            let d = t.since.elapsed();
            self.shared.stats_mut().reparent_answer_time.record(d);
        }
    }

    /// A chunk of `s` came from its current parent: completes a timed re-parent if that
    /// parent is a new one.
    pub(super) fn reparent_chunk(&mut self, s: u16) {
        let i = usize::from(s);
        let Some(t) = self.reparent_timers[i] else {
            return;
        };
        match feed_source(&self.feeds[i]) {
            Some(src) if src != t.from => {
                self.reparent_timers[i] = None;
                let d = t.since.elapsed();
                tracing::debug!(substream = s, ms = d.as_millis(), "re-parent complete");
                self.shared.stats_mut().reparent_time.record(d);
            }
            _ => {}
        }
    }

    pub(super) fn research(&mut self, s: u16, exclude: Vec<PeerId>) {
        // Banned peers are added: never offered a polluter again (the control plane is
        // told too, but it may not have acted on the report yet).
        let Some(exclude) = self.peer.research(s, exclude) else {
            return;
        };
        let control = self.control.clone();
        let session = self.session_id.clone();
        let events = self.events.clone();
        // The excluded parents we could not even connect to: the control plane probes
        // them again.
        let unreachable: Vec<PeerId> = exclude
            .iter()
            .copied()
            .filter(|id| self.unreachable.contains(id))
            .collect();
        self.unreachable.retain(|id| !unreachable.contains(id));
        tokio::spawn(async move {
            let (result, ticket) = match control
                .reparent(&session, s, exclude.clone(), unreachable)
                .await
            {
                Ok((p, t)) => (Ok(p), t),
                Err(e) => (Err(e), None),
            };
            let _ = events
                .send(Ev::Reparented {
                    substream: s,
                    excluded: exclude,
                    result,
                    ticket,
                })
                .await;
        });
    }

    pub(super) fn on_reparented(
        &mut self,
        s: u16,
        excluded: Vec<PeerId>,
        result: Result<AssignedParent, SdkError>,
    ) {
        let i = usize::from(s);
        if i >= self.feeds.len() {
            return;
        }
        self.peer.research_answered(s);
        self.reparent_answered(s);
        let now = self.now();
        let feed = match result {
            Ok(p)
                if p.peer()
                    .is_some_and(|q| excluded.contains(&q.id) || self.excluded(q.id)) =>
            {
                Feed::Server
            }
            Ok(p) => Feed::from_parent(p, self.me),
            Err(e) => {
                tracing::warn!(substream = s, "Reparent failed: {e}");
                if self.feeds[i] == Feed::Pending {
                    // The parent is gone and the control plane cannot help: the data
                    // plane feeds this substream until the next assignment.
                    Feed::Server
                } else {
                    // The old parent keeps feeding: no re-parent to time.
                    self.reparent_timers[i] = None;
                    return;
                }
            }
        };
        tracing::info!(substream = s, ?feed, "re-parented");
        self.set_feed(s, feed, now, true);
        // Answered with the parent it had (e.g. the data plane again): not a re-parent.
        self.cancel_timer_if_back(s);
        self.reconcile();
    }

    /// A parent peer's link failed: every substream it fed is re-searched at once.
    pub(super) fn parent_lost(&mut self, peer: &PeerAddr) {
        let now = self.now();
        let fed_us = self
            .feeds
            .iter()
            .any(|f| matches!(f, Feed::Peer(p) if p.id == peer.id));
        if fed_us {
            self.peer.parent_failed(peer.id, now);
        }
        for s in 0..self.k {
            if matches!(&self.feeds[usize::from(s)], Feed::Peer(p) if p.id == peer.id) {
                self.set_feed(s, Feed::Pending, now, false);
                self.start_reparent_timer(s, Some(peer.id));
                self.research(s, vec![peer.id]);
            }
        }
    }
}
