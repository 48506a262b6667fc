//! The play-out clock handed to the scheduler (stream time from the chunks' cut
//! timestamps).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The play-out clock handed to the scheduler. The scheduler assumes one chunk per
/// nominal chunk duration; a data plane that cuts at key frames produces chunks of a
/// different mean duration. This clock runs at `nominal / measured` (measured from the
/// chunks' cut timestamps over the last few dozen chunks), so the scheduler's
/// timeline stays aligned with the stream. All its durations (lag, timeouts) are then
/// in stream time.
pub(super) struct PlayClock {
    last: Instant,
    virt: Duration,
    rate: f64,
    nominal_ms: f64,
    stamps: BTreeMap<u64, u64>,
}

impl PlayClock {
    pub(super) fn new(nominal: Duration) -> PlayClock {
        PlayClock {
            last: Instant::now(),
            virt: Duration::ZERO,
            rate: 1.0,
            nominal_ms: nominal.as_secs_f64() * 1000.0,
            stamps: BTreeMap::new(),
        }
    }

    pub(super) fn now(&mut self) -> Duration {
        let t = Instant::now();
        self.virt += t.saturating_duration_since(self.last).mul_f64(self.rate);
        self.last = t;
        self.virt
    }

    /// The instant at which this clock reads `t` (at the current rate); `t` already
    /// passed reads as the last instant the clock was read.
    pub(super) fn instant_at(&self, t: Duration) -> Instant {
        match t.checked_sub(self.virt) {
            Some(ahead) => self.last + ahead.div_f64(self.rate),
            None => self.last,
        }
    }

    /// Chunk `seq` was cut at `timestamp_ms` (data-plane clock; 0 = unknown).
    pub(super) fn observe(&mut self, seq: u64, timestamp_ms: u64) {
        if timestamp_ms == 0 {
            return;
        }
        self.stamps.insert(seq, timestamp_ms);
        while self.stamps.len() > 64 {
            self.stamps.pop_first();
        }
        let (Some((&s0, &t0)), Some((&s1, &t1))) =
            (self.stamps.first_key_value(), self.stamps.last_key_value())
        else {
            return;
        };
        if s1.saturating_sub(s0) < 16 || t1 <= t0 {
            return;
        }
        let measured = (t1 - t0) as f64 / (s1 - s0) as f64;
        let rate = (self.nominal_ms / measured).clamp(0.25, 4.0);
        // Bring the clock up to date at the old rate before changing it; ignore noise.
        if (rate - self.rate).abs() > 0.02 {
            self.now();
            self.rate = if (rate - 1.0).abs() <= 0.02 {
                1.0
            } else {
                rate
            };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn play_clock_follows_the_measured_chunk_rate() {
        let mut c = PlayClock::new(Duration::from_millis(1000));
        for s in 0..40u64 {
            c.observe(s, 1_000_000 + s * 2000);
        }
        assert!((c.rate - 0.5).abs() < 1e-9, "{}", c.rate);
        let mut d = PlayClock::new(Duration::from_millis(1000));
        for s in 0..40u64 {
            d.observe(s, 1_000_000 + s * 1005);
        }
        assert_eq!(d.rate, 1.0);
    }
}
