//! [`PlayClock`]: the scheduler's clock in stream time, run at the stream's measured
//! chunk rate. Fed the caller's `now`; no clock inside.

use std::collections::BTreeMap;
use std::time::Duration;

/// The play-out clock handed to the scheduler. The scheduler assumes one chunk per
/// nominal chunk duration; a data plane that cuts at key frames produces chunks of a
/// different mean duration. This clock runs at `nominal / measured` (measured from the
/// chunks' cut timestamps over the last few dozen chunks), so the scheduler's
/// timeline stays aligned with the stream. All its durations (lag, timeouts) are then
/// in stream time.
///
/// `now` arguments are the caller's (real) time since an origin it picks; the clock's
/// reading (stream time) starts at zero when it is created.
#[derive(Debug, Clone, PartialEq)]
pub struct PlayClock {
    /// Real time of the last reading.
    last: Duration,
    /// Stream time at `last`.
    virt: Duration,
    rate: f64,
    nominal_ms: f64,
    stamps: BTreeMap<u64, u64>,
    /// Real time at creation, until the first correction of the rate (then `None`).
    born: Option<Duration>,
}

impl PlayClock {
    /// Chunk timestamps over this many chunks set the rate.
    const STAMPS: usize = 64;
    /// The shortest span of sequence numbers that sets a rate at all.
    const FIRST_SPAN: u64 = 4;
    /// From this span on, the rate follows changes above 2 %.
    const FULL_SPAN: u64 = 16;

    /// A clock for chunks of `nominal` duration, reading zero at `now`.
    pub fn new(nominal: Duration, now: Duration) -> PlayClock {
        PlayClock {
            last: now,
            virt: Duration::ZERO,
            rate: 1.0,
            nominal_ms: nominal.as_secs_f64() * 1000.0,
            stamps: BTreeMap::new(),
            born: Some(now),
        }
    }

    /// The stream time at `now` (a `now` before the last reading reads as the last).
    pub fn read(&mut self, now: Duration) -> Duration {
        self.virt += now.saturating_sub(self.last).mul_f64(self.rate);
        self.last = self.last.max(now);
        self.virt
    }

    /// The rate of stream time to real time (1 = nominal chunks).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The real time at which this clock reads `t` (at the current rate); `t` already
    /// passed reads as the last real time the clock was read.
    pub fn real_at(&self, t: Duration) -> Duration {
        match t.checked_sub(self.virt) {
            Some(ahead) => self.last + ahead.div_f64(self.rate),
            None => self.last,
        }
    }

    /// Chunk `seq` was cut at `timestamp_ms` (data-plane clock; 0 = unknown), seen at
    /// `now`. Returns, at the clock's first correction to a slower rate, how much stream
    /// time it counted too much since it was created: a schedule set on it came that
    /// much too early (chunks longer than nominal, e.g. cut at key frames twice as far
    /// apart), and the caller moves it later by as much ([`PeerScheduler::delay_schedule`]).
    ///
    /// [`PeerScheduler::delay_schedule`]: super::PeerScheduler::delay_schedule
    pub fn observe(&mut self, seq: u64, timestamp_ms: u64, now: Duration) -> Option<Duration> {
        if timestamp_ms == 0 {
            return None;
        }
        self.stamps.insert(seq, timestamp_ms);
        while self.stamps.len() > Self::STAMPS {
            self.stamps.pop_first();
        }
        let (Some((&s0, &t0)), Some((&s1, &t1))) =
            (self.stamps.first_key_value(), self.stamps.last_key_value())
        else {
            return None;
        };
        let span = s1.saturating_sub(s0);
        if span < Self::FIRST_SPAN || t1 <= t0 {
            return None;
        }
        let measured = (t1 - t0) as f64 / span as f64;
        let rate = (self.nominal_ms / measured).clamp(0.25, 4.0);
        // Over a short span only a gross mismatch (a broadcast configured with another
        // chunk duration than its key-frame interval cuts) moves the clock; from
        // `FULL_SPAN` chunks on, anything above the noise does.
        let noise = if span < Self::FULL_SPAN { 0.2 } else { 0.02 };
        // Bring the clock up to date at the old rate before changing it; ignore noise.
        if (rate - self.rate).abs() <= noise {
            return None;
        }
        self.read(now);
        let old = self.rate;
        self.rate = if (rate - 1.0).abs() <= 0.02 {
            1.0
        } else {
            rate
        };
        let born = self.born.take()?;
        (self.rate < old).then(|| now.saturating_sub(born).mul_f64(old - self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn play_clock_follows_the_measured_chunk_rate() {
        let mut c = PlayClock::new(MS(1000), Duration::ZERO);
        for s in 0..40u64 {
            c.observe(s, 1_000_000 + s * 2000, Duration::ZERO);
        }
        assert!((c.rate() - 0.5).abs() < 1e-9, "{}", c.rate());
        let mut d = PlayClock::new(MS(1000), Duration::ZERO);
        for s in 0..40u64 {
            d.observe(s, 1_000_000 + s * 1005, Duration::ZERO);
        }
        assert_eq!(d.rate(), 1.0);
    }

    #[test]
    fn a_gross_mismatch_is_followed_within_a_few_chunks_noise_is_not() {
        // Configured 500 ms, cut every 1 s (the key-frame interval): half speed after
        // five chunks, before the clock has run far ahead of the stream.
        let mut c = PlayClock::new(MS(500), Duration::ZERO);
        for s in 0..4u64 {
            c.observe(s, 1_000_000 + s * 1000, Duration::ZERO);
            assert_eq!(c.rate(), 1.0, "after {} chunks", s + 1);
        }
        c.observe(4, 1_004_000, Duration::ZERO);
        assert!((c.rate() - 0.5).abs() < 1e-9, "{}", c.rate());
        // 10 % off over a short span is noise; over 16+ chunks it is the rate.
        let mut d = PlayClock::new(MS(1000), Duration::ZERO);
        for s in 0..10u64 {
            d.observe(s, 1_000_000 + s * 1100, Duration::ZERO);
        }
        assert_eq!(d.rate(), 1.0);
        for s in 10..20u64 {
            d.observe(s, 1_000_000 + s * 1100, Duration::ZERO);
        }
        assert!((d.rate() - 1.0 / 1.1).abs() < 1e-9, "{}", d.rate());
    }

    #[test]
    fn stream_time_runs_at_the_rate_from_the_rate_change_on() {
        let mut c = PlayClock::new(MS(1000), MS(500));
        assert_eq!(c.read(MS(1500)), MS(1000));
        // Chunks cut every 2 s seen at real 3.5 s: from then on, half speed.
        for s in 0..40u64 {
            c.observe(s, 1_000_000 + s * 2000, MS(3500));
        }
        assert_eq!(c.read(MS(3500)), MS(3000));
        assert_eq!(c.read(MS(5500)), MS(4000));
        // Stream time 5 s is reached 2 s of real time later; the past reads as now.
        assert_eq!(c.real_at(MS(5000)), MS(7500));
        assert_eq!(c.real_at(MS(1000)), MS(5500));
        // Time never runs backwards.
        assert_eq!(c.read(MS(100)), MS(4000));
    }

    #[test]
    fn the_first_correction_to_a_slower_rate_says_how_far_the_clock_ran_ahead() {
        // Nominal 500 ms chunks, cut every 1000 ms (key frames twice as far apart).
        let mut c = PlayClock::new(MS(500), MS(0));
        let mut ahead = Vec::new();
        for s in 0..12u64 {
            ahead.push(c.observe(s, 1_000_000 + s * 1000, MS(s * 1000)));
        }
        // At chunk 4 (the first span that sets a rate) the clock had read 4 s where 2 s
        // of stream had passed.
        assert_eq!(ahead[4], Some(MS(2000)), "{ahead:?}");
        assert!(
            ahead.iter().enumerate().all(|(i, a)| i == 4 || a.is_none()),
            "{ahead:?}"
        );
        assert!((c.rate() - 0.5).abs() < 1e-9);
        // Faster chunks than nominal: the schedule was late, not early; nothing to undo.
        let mut d = PlayClock::new(MS(1000), MS(0));
        for s in 0..12u64 {
            assert_eq!(d.observe(s, 1_000_000 + s * 500, MS(s * 500)), None);
        }
    }
}
