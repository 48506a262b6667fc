//! Moving the play-out schedule after start-up: catching up with a stream that arrives
//! sooner ([`super::SchedulerConfig::catch_up`]) and delaying it when the play clock counted
//! too much stream time.

use std::time::Duration;

use super::{ARRIVALS, PeerScheduler, Substream, ms};

impl PeerScheduler {
    /// Moves the play-out schedule (and the live estimate it is set from) `by` later:
    /// the play clock found it had counted that much stream time too much (see
    /// [`super::PlayClock::observe`]), so every deadline set on it came too early.
    pub fn delay_schedule(&mut self, by: Duration) {
        let by = ms(by);
        self.live_base = self.live_base.map(|b| b.saturating_add(by));
        self.play_base = self.play_base.map(|b| b.saturating_add(by));
        for sub in &mut self.subs {
            sub.arrivals_len = 0;
        }
    }

    /// Where the play-out base may move to: no earlier than the fastest substream
    /// (the target lag stays behind it), and no earlier than leaves the slowest one's
    /// chunks within half the [`super::SchedulerConfig::late_threshold`] (catching up never
    /// makes a steady parent late, nor sends its chunks to repair). `None` until every substream has a parent and
    /// [`ARRIVALS`] in-order chunks from it since it was assigned.
    pub(super) fn catch_up_target(&self) -> Option<i64> {
        let late = ms(self.cfg.late_threshold);
        let (mut fastest, mut slowest) = (i64::MAX, i64::MIN);
        for sub in &self.subs {
            sub.parent?;
            let at = sub.settled_arrival()?;
            fastest = fastest.min(at);
            slowest = slowest.max(at);
        }
        Some(fastest.max(slowest.saturating_sub(late / 2)))
    }

    /// Moves the play-out schedule earlier, by at most [`super::SchedulerConfig::catch_up`]
    /// per second, while it is later than [`PeerScheduler::catch_up_target`]: the
    /// start-up base is taken from the first chunks, before the fastest substream's
    /// pace is known, and a parent change can bring the stream in sooner.
    pub(super) fn catch_up(&mut self, now_ms: i64) {
        let per_s = ms(self.cfg.catch_up);
        let Some(base) = self.play_base.filter(|_| self.started && per_s > 0) else {
            return;
        };
        let since = *self.caught_up_at.get_or_insert(now_ms);
        let excess = self.catch_up_target().map_or(0, |t| base.saturating_sub(t));
        if excess <= 0 {
            self.caught_up_at = Some(now_ms);
            return;
        }
        let step = now_ms.saturating_sub(since).saturating_mul(per_s) / 1000;
        if step > 0 {
            self.play_base = Some(base - step.min(excess));
            self.caught_up_at = Some(now_ms);
            self.stats.caught_up_ms = self
                .stats
                .caught_up_ms
                .saturating_add(step.min(excess) as u64);
        }
    }
}

impl Substream {
    pub(super) fn record_arrival(&mut self, avail: i64) {
        self.arrivals[usize::from(self.arrivals_next)] = avail;
        self.arrivals_next = (self.arrivals_next + 1) % ARRIVALS as u8;
        self.arrivals_len = (self.arrivals_len + 1).min(ARRIVALS as u8);
    }

    /// The latest of the recent arrivals, once the ring is full.
    fn settled_arrival(&self) -> Option<i64> {
        (usize::from(self.arrivals_len) == ARRIVALS)
            .then(|| self.arrivals.iter().copied().max())
            .flatten()
    }
}
