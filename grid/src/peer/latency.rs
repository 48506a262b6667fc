//! [`LatencySummary`]: a bounded, mergeable summary of durations (count, sum, max and a
//! fixed log-spaced histogram), e.g. re-parent times. Pure data: no clock.

use std::time::Duration;

/// Upper bounds (inclusive, ms) of the histogram buckets; one more bucket holds
/// everything above the last bound. Roughly 1-1.5-2-3-5 steps from 10 ms to 10 s.
pub const LATENCY_BOUNDS_MS: [u64; 24] = [
    10, 20, 30, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 750, 1_000, 1_250, 1_500, 2_000,
    2_500, 3_000, 4_000, 5_000, 7_500, 10_000,
];

/// Number of histogram buckets (the bounds plus the overflow bucket).
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Count, sum, max and a fixed histogram of durations, in whole milliseconds.
///
/// Fixed size (a few hundred bytes), `Copy`, and additive: summaries of many viewers
/// [`merge`](LatencySummary::merge) into one, and the difference of two snapshots of one
/// viewer ([`since`](LatencySummary::since)) summarises a window. Quantiles are read
/// from the histogram: the upper bound of the bucket holding the rank, capped at the
/// maximum, so they are over-estimates by at most one bucket width (≤ 50 % above
/// 10 ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Durations recorded.
    pub count: u64,
    /// Their sum, ms.
    pub sum_ms: u64,
    /// The largest, ms (0 when none).
    pub max_ms: u64,
    /// Counts per bucket ([`LATENCY_BOUNDS_MS`], then the overflow bucket).
    pub buckets: [u64; LATENCY_BUCKETS],
}

fn bucket_of(ms: u64) -> usize {
    LATENCY_BOUNDS_MS.partition_point(|&b| b < ms)
}

impl LatencySummary {
    /// Records one duration (sub-millisecond parts are truncated).
    pub fn record(&mut self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.count = self.count.saturating_add(1);
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.max_ms = self.max_ms.max(ms);
        let b = bucket_of(ms);
        self.buckets[b] = self.buckets[b].saturating_add(1);
    }

    /// Adds another summary (e.g. another viewer's).
    pub fn merge(&mut self, other: &LatencySummary) {
        self.count = self.count.saturating_add(other.count);
        self.sum_ms = self.sum_ms.saturating_add(other.sum_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// What was recorded after `earlier`, a previous snapshot of the same summary.
    /// The window's maximum is exact when it exceeds `earlier`'s; otherwise it is the
    /// upper bound of the highest bucket the window used, capped at the maximum.
    pub fn since(&self, earlier: &LatencySummary) -> LatencySummary {
        let mut d = LatencySummary {
            count: self.count.saturating_sub(earlier.count),
            sum_ms: self.sum_ms.saturating_sub(earlier.sum_ms),
            max_ms: 0,
            buckets: [0; LATENCY_BUCKETS],
        };
        for (i, b) in d.buckets.iter_mut().enumerate() {
            *b = self.buckets[i].saturating_sub(earlier.buckets[i]);
        }
        if d.count > 0 {
            d.max_ms = if self.max_ms > earlier.max_ms {
                self.max_ms
            } else {
                let top = d.buckets.iter().rposition(|&n| n > 0).unwrap_or(0);
                LATENCY_BOUNDS_MS
                    .get(top)
                    .copied()
                    .unwrap_or(self.max_ms)
                    .min(self.max_ms)
            };
        }
        d
    }

    /// Nearest-rank quantile `q` (0..=1) in ms, from the histogram (see the type's
    /// docs); `None` when nothing was recorded.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let upper = LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(self.max_ms);
                return Some(upper.min(self.max_ms));
            }
        }
        Some(self.max_ms)
    }

    /// Mean in ms; `None` when nothing was recorded.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ms as f64 / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn records_into_the_right_buckets() {
        let mut s = LatencySummary::default();
        assert_eq!(s.quantile_ms(0.5), None);
        assert_eq!(s.mean_ms(), None);
        for v in [0, 10, 11, 10_000, 10_001, 60_000] {
            s.record(ms(v));
        }
        assert_eq!(s.buckets[0], 2); // 0 and 10
        assert_eq!(s.buckets[1], 1); // 11
        assert_eq!(s.buckets[LATENCY_BUCKETS - 2], 1); // 10 000
        assert_eq!(s.buckets[LATENCY_BUCKETS - 1], 2); // overflow
        assert_eq!((s.count, s.max_ms), (6, 60_000));
        assert_eq!(s.sum_ms, 10 + 11 + 10_000 + 10_001 + 60_000);
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds_capped_at_the_max() {
        let mut s = LatencySummary::default();
        for v in 1..=100u64 {
            s.record(ms(v * 10)); // 10 .. 1000 ms
        }
        // Rank 50 is 500 ms: bucket (400, 500].
        assert_eq!(s.quantile_ms(0.5), Some(500));
        // Rank 99 is 990 ms: bucket (750, 1000].
        assert_eq!(s.quantile_ms(0.99), Some(1_000));
        assert_eq!(s.quantile_ms(1.0), Some(1_000));
        let mut one = LatencySummary::default();
        one.record(ms(420));
        // The bucket bound (500) is capped at the max.
        assert_eq!(one.quantile_ms(0.99), Some(420));
        let mut big = LatencySummary::default();
        big.record(ms(20_000));
        assert_eq!(big.quantile_ms(0.5), Some(20_000));
    }

    #[test]
    fn merge_and_since_are_inverse() {
        let mut a = LatencySummary::default();
        a.record(ms(100));
        a.record(ms(3_000));
        let mut b = LatencySummary::default();
        b.record(ms(40));
        let mut m = a;
        m.merge(&b);
        assert_eq!((m.count, m.sum_ms, m.max_ms), (3, 3_140, 3_000));
        let d = m.since(&a);
        assert_eq!((d.count, d.sum_ms), (1, 40));
        assert_eq!(d.buckets, b.buckets);
        // The window's max is not above the old max: bounded by its bucket (50 ms).
        assert_eq!(d.max_ms, 50);
        // A new maximum in the window is exact.
        let mut later = m;
        later.record(ms(5_500));
        assert_eq!(later.since(&m).max_ms, 5_500);
        assert_eq!(m.since(&m), LatencySummary::default());
    }
}
