//! [`UploadEstimator`]: the relay upload budget of a peer that was given no
//! `max_upload_kbps`, from what its uplink actually drains. Pure: it takes `now` and
//! byte counters and returns decisions.
//!
//! The peer offers a conservative initial budget. Pushes to children are paced to the
//! budget, so as long as the uplink is faster than the budget the per-child send queues
//! stay (nearly) empty and nothing is learnt: the budget stays. When the uplink is
//! slower, the queues back up; over every window of [`UploadEstimatorConfig::window`]
//! during which the caller saw queued data for its children at **every** sample, the
//! bytes drained per second are the uplink's throughput. Their EWMA is the estimated
//! ceiling; once [`UploadEstimatorConfig::min_windows`] such windows were seen and the
//! ceiling is clearly below the budget, the budget drops to the ceiling times
//! [`UploadEstimatorConfig::headroom`] (so the queues can drain).
//!
//! The estimate only ever lowers the budget: throughput above the budget is never
//! offered, so it cannot be measured.

use std::time::Duration;

/// Tunables of an [`UploadEstimator`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadEstimatorConfig {
    /// Length of one measurement window. Default 2 s (several ticks, several chunks).
    pub window: Duration,
    /// Weight of the newest window in the EWMA (0..=1). Default 0.3.
    pub alpha: f64,
    /// Backlogged windows needed before the budget is lowered. Default 3.
    pub min_windows: u32,
    /// The budget is lowered only when the ceiling is below `budget × (1 − tolerance)`.
    /// Default 0.1 (measurement noise does not shed children).
    pub tolerance: f64,
    /// New budget = ceiling × headroom. Default 0.9.
    pub headroom: f64,
}

impl Default for UploadEstimatorConfig {
    fn default() -> Self {
        UploadEstimatorConfig {
            window: Duration::from_secs(2),
            alpha: 0.3,
            min_windows: 3,
            tolerance: 0.1,
            headroom: 0.9,
        }
    }
}

/// Estimates the achievable relay throughput and lowers the offered budget to it (see
/// the [module docs](self)).
#[derive(Debug, Clone)]
pub struct UploadEstimator {
    cfg: UploadEstimatorConfig,
    budget_kbps: u32,
    /// Start of the current backlogged window: `(now, drained bytes then)`.
    window_start: Option<(Duration, u64)>,
    ewma_kbps: Option<f64>,
    windows: u32,
}

impl UploadEstimator {
    /// Starts at `initial_budget_kbps`.
    pub fn new(initial_budget_kbps: u32, cfg: UploadEstimatorConfig) -> UploadEstimator {
        UploadEstimator {
            cfg,
            budget_kbps: initial_budget_kbps,
            window_start: None,
            ewma_kbps: None,
            windows: 0,
        }
    }

    /// The budget offered now, kbit/s.
    pub fn budget_kbps(&self) -> u32 {
        self.budget_kbps
    }

    /// The measured ceiling (EWMA over backlogged windows), kbit/s; `None` before the
    /// first backlogged window.
    pub fn estimate_kbps(&self) -> Option<u32> {
        self.ewma_kbps.map(|e| e.round() as u32)
    }

    /// Backlogged windows measured so far.
    pub fn windows(&self) -> u32 {
        self.windows
    }

    /// One sample: `drained` is the cumulative count of relay bytes written to the
    /// network so far (monotonic), `backlogged` whether every child link had data
    /// queued at this moment. Returns the new budget when it was lowered.
    pub fn sample(&mut self, now: Duration, drained: u64, backlogged: bool) -> Option<u32> {
        if !backlogged {
            // The window must be backlogged throughout: start over at the next
            // backlogged sample (bytes drained meanwhile do not count).
            self.window_start = None;
            return None;
        }
        let Some((t0, b0)) = self.window_start else {
            self.window_start = Some((now, drained));
            return None;
        };
        let elapsed = now.saturating_sub(t0);
        if elapsed < self.cfg.window || elapsed.is_zero() {
            return None;
        }
        let bits = drained.saturating_sub(b0) as f64 * 8.0;
        let kbps = bits / elapsed.as_secs_f64() / 1000.0;
        self.window_start = Some((now, drained));
        self.windows = self.windows.saturating_add(1);
        let a = self.cfg.alpha.clamp(0.0, 1.0);
        let ewma = match self.ewma_kbps {
            None => kbps,
            Some(e) => a * kbps + (1.0 - a) * e,
        };
        self.ewma_kbps = Some(ewma);
        if self.windows < self.cfg.min_windows {
            return None;
        }
        let budget = f64::from(self.budget_kbps);
        if ewma >= budget * (1.0 - self.cfg.tolerance) {
            return None;
        }
        let lowered = (ewma * self.cfg.headroom).floor().clamp(0.0, budget) as u32;
        if lowered >= self.budget_kbps {
            return None;
        }
        self.budget_kbps = lowered;
        Some(lowered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: u64) -> Duration {
        Duration::from_secs(v)
    }

    /// Bytes per second for a rate in kbit/s.
    fn bps(kbps: u64) -> u64 {
        kbps * 1000 / 8
    }

    #[test]
    fn never_backlogged_keeps_the_budget() {
        let mut e = UploadEstimator::new(2_000, UploadEstimatorConfig::default());
        for t in 0..100 {
            assert_eq!(e.sample(s(t), t * bps(100), false), None);
        }
        assert_eq!(e.budget_kbps(), 2_000);
        assert_eq!(e.estimate_kbps(), None);
        assert_eq!(e.windows(), 0);
    }

    #[test]
    fn a_slow_uplink_lowers_the_budget_after_enough_windows() {
        let cfg = UploadEstimatorConfig::default();
        let mut e = UploadEstimator::new(2_000, cfg);
        let mut lowered = Vec::new();
        // Backlogged throughout, draining 1000 kbps; a sample every second.
        for t in 0..=10 {
            if let Some(b) = e.sample(s(t), t * bps(1_000), true) {
                lowered.push((t, b));
            }
        }
        // Windows end at t = 2, 4, 6: the third one decides, once.
        assert_eq!(lowered, vec![(6, 900)]);
        assert_eq!(e.estimate_kbps(), Some(1_000));
        assert_eq!(e.budget_kbps(), 900);
        // Still backlogged at the same ceiling: 1000 ≥ 900 × 0.9, no further drop.
        for t in 11..=20 {
            assert_eq!(e.sample(s(t), t * bps(1_000), true), None);
        }
    }

    #[test]
    fn a_fast_enough_uplink_keeps_the_budget() {
        let mut e = UploadEstimator::new(2_000, UploadEstimatorConfig::default());
        // Backlogged at 1900 kbps: within the 10 % tolerance.
        for t in 0..=20 {
            assert_eq!(e.sample(s(t), t * bps(1_900), true), None);
        }
        assert_eq!(e.estimate_kbps(), Some(1_900));
        assert_eq!(e.budget_kbps(), 2_000);
    }

    #[test]
    fn bytes_drained_outside_backlog_do_not_count() {
        let mut e = UploadEstimator::new(2_000, UploadEstimatorConfig::default());
        // Backlogged at t = 0 and 1, then idle at t = 2 while 10 MB go out (queues were
        // empty: that is not a ceiling), then backlogged again from t = 3.
        assert_eq!(e.sample(s(0), 0, true), None);
        assert_eq!(e.sample(s(1), bps(500), true), None);
        assert_eq!(e.sample(s(2), 10_000_000, false), None);
        assert_eq!(e.windows(), 0);
        let mut drained = 10_000_000;
        for t in 3..=8 {
            assert_eq!(e.sample(s(t), drained, true), None, "t={t}");
            drained += bps(1_500);
        }
        // Windows [3,5], [5,7], [7,9] at 1500 kbps; 1500 < 1800 after the third.
        assert_eq!(e.sample(s(9), drained, true), Some(1_350));
        assert_eq!(e.estimate_kbps(), Some(1_500));
    }

    #[test]
    fn one_slow_window_is_smoothed_out() {
        let mut e = UploadEstimator::new(2_000, UploadEstimatorConfig::default());
        let mut drained = 0;
        let mut t = 0;
        // Three windows at 2000 kbps, then one at 1500 kbps: the EWMA (1850) stays
        // above budget × 0.9 = 1800, so nothing is shed.
        for rate in [2_000u64, 2_000, 2_000, 1_500] {
            assert_eq!(e.sample(s(t), drained, true), None);
            t += 2;
            drained += 2 * bps(rate);
        }
        assert_eq!(e.sample(s(t), drained, true), None);
        assert_eq!(e.estimate_kbps(), Some(1_850));
        assert_eq!(e.budget_kbps(), 2_000);
    }
}
