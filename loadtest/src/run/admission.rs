//! When a ramp stops admitting peers: this machine's busy fraction from `/proc/stat`
//! held above [`super::RunConfig::max_busy`] for [`ADMISSION_CLOSE`].

use std::time::Duration;

/// A ramp held this long in a row ends ([`RunConfig::max_busy`]).
pub const ADMISSION_CLOSE: Duration = Duration::from_secs(20);

/// This machine's busy fraction over the last sample interval, from `/proc/stat`.
pub(super) struct MachineBusy {
    last: Option<(u64, u64)>,
}

impl MachineBusy {
    pub(super) fn new() -> Self {
        MachineBusy { last: Self::read() }
    }

    /// (busy, total) jiffies of all cores.
    pub(super) fn read() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Some((total.saturating_sub(idle), total))
    }

    /// Busy fraction since the previous call (`None` without `/proc/stat`).
    pub(super) fn sample(&mut self) -> Option<f64> {
        let now = Self::read()?;
        let prev = self.last.replace(now)?;
        let total = now.1.saturating_sub(prev.1);
        (total > 0).then(|| now.0.saturating_sub(prev.0) as f64 / total as f64)
    }
}
