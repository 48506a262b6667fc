//! Each process's resident memory over a run: the coordinator samples the RSS of every
//! process of the run ([`RssSampler`]: `/proc/PID/status` VmRSS of the local ones, the
//! workers' own reports for remote ones) every [`RSS_EVERY`], keeps a bounded series
//! per process, and reports RSS after warm-up, at the end, the max and whether it stayed
//! flat after warm-up ([`RssFigures`], the [`RSS_FLAT_WITHIN`] rule of issue 16).

use super::series::{Reduce, Series};
use crate::worker::ProcStats;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Interval between RSS samples (a few file reads per sample: cheap at any size).
pub const RSS_EVERY: Duration = Duration::from_secs(10);

/// Points kept per process (decimated past that, keeping the peaks): 2048 × 10 s is
/// over 5 hours.
pub const RSS_POINTS: usize = 2048;

/// RSS is flat after warm-up when no later sample exceeds the warm-up one by more than
/// this fraction.
pub const RSS_FLAT_WITHIN: f64 = 0.10;

/// Where a process's RSS is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RssSource {
    /// `/proc/PID/status` on this machine.
    Local,
    /// The latest sample of worker `w` (on another machine).
    Worker(usize),
}

#[derive(Debug)]
struct Track {
    role: String,
    pid: u32,
    source: RssSource,
    series: Series,
    samples: usize,
    warm: Option<u64>,
    after_warm: usize,
    max_after_warm: u64,
    last: Option<u64>,
    max: u64,
}

impl Track {
    fn new(role: String, pid: u32, source: RssSource) -> Track {
        Track {
            role,
            pid,
            source,
            series: Series::new(RSS_POINTS, Reduce::Max),
            samples: 0,
            warm: None,
            after_warm: 0,
            max_after_warm: 0,
            last: None,
            max: 0,
        }
    }
}

impl Track {
    fn record(&mut self, t_s: f64, bytes: u64, warmed_up: bool) {
        self.series.push(t_s, bytes as f64);
        self.samples += 1;
        self.last = Some(bytes);
        self.max = self.max.max(bytes);
        if self.warm.is_none() {
            if warmed_up {
                self.warm = Some(bytes);
                self.max_after_warm = bytes;
            }
        } else {
            self.after_warm += 1;
            self.max_after_warm = self.max_after_warm.max(bytes);
        }
    }

    fn figures(&self) -> RssFigures {
        let growth = self
            .warm
            .filter(|&w| w > 0 && self.after_warm > 0)
            .map(|w| self.max_after_warm as f64 / w as f64 - 1.0);
        RssFigures {
            role: self.role.clone(),
            pid: self.pid,
            samples: self.samples,
            after_warmup_bytes: self.warm,
            end_bytes: self.last,
            max_bytes: self.max,
            growth_after_warmup: growth,
            // (A hair of tolerance: 110 / 100 - 1 is a little over 0.10 in floating point.)
            flat_after_warmup: growth.map(|g| g <= RSS_FLAT_WITHIN + 1e-9),
            series: self.series.clone(),
        }
    }
}

/// Samples the RSS of the run's processes every [`RSS_EVERY`].
#[derive(Debug)]
pub(super) struct RssSampler {
    every_s: f64,
    next_s: f64,
    tracks: Vec<Track>,
}

impl RssSampler {
    pub(super) fn new(every: Duration) -> RssSampler {
        RssSampler {
            every_s: every.as_secs_f64().max(0.001),
            next_s: 0.0,
            tracks: Vec::new(),
        }
    }

    /// Samples process `pid` as `role` from now on.
    pub(super) fn track(&mut self, role: String, pid: u32, source: RssSource) {
        self.tracks.push(Track::new(role, pid, source));
    }

    /// Whether a sample is due at `t_s` (seconds since the start of the joins).
    pub(super) fn due(&self, t_s: f64) -> bool {
        t_s >= self.next_s
    }

    /// Samples every process at `t_s`; `warmed_up`: the ramp has ended (the first such
    /// sample is the warm-up reference). `remote(w)` is worker `w`'s latest reported
    /// RSS. A process that cannot be read (gone) is skipped.
    pub(super) fn sample(
        &mut self,
        t_s: f64,
        warmed_up: bool,
        remote: impl Fn(usize) -> Option<u64>,
    ) {
        while self.next_s <= t_s {
            self.next_s += self.every_s;
        }
        for t in &mut self.tracks {
            let bytes = match t.source {
                RssSource::Local => Some(ProcStats::of_pid(t.pid).rss_bytes),
                RssSource::Worker(w) => remote(w),
            };
            if let Some(b) = bytes.filter(|&b| b > 0) {
                t.record(t_s, b, warmed_up);
            }
        }
    }

    /// The figures of every process, in the order tracked.
    pub(super) fn figures(&self) -> Vec<RssFigures> {
        self.tracks.iter().map(Track::figures).collect()
    }
}

/// One process's RSS over the run.
#[derive(Debug, Clone, Serialize)]
pub struct RssFigures {
    /// `coordinator`, `dataplane`, `worker-N` (as in `processes`).
    pub role: String,
    /// Process id.
    pub pid: u32,
    /// Samples taken.
    pub samples: usize,
    /// RSS at the first sample after the join ramp ended, bytes.
    pub after_warmup_bytes: Option<u64>,
    /// RSS at the last sample (the end of the window), bytes.
    pub end_bytes: Option<u64>,
    /// The largest sampled RSS, bytes (`max_rss_bytes` is the kernel's peak).
    pub max_bytes: u64,
    /// The largest RSS after warm-up over the warm-up one, less 1 (`null` without a
    /// sample after the warm-up one).
    pub growth_after_warmup: Option<f64>,
    /// `growth_after_warmup <= 0.10` ([`RSS_FLAT_WITHIN`]).
    pub flat_after_warmup: Option<bool>,
    /// `[[t_s, rss_bytes], ...]` (seconds since the start of the joins), at most
    /// [`RSS_POINTS`] points: past that, pairs merge into their larger value.
    pub series: Series,
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

impl fmt::Display for RssFigures {
    /// One line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |b: Option<u64>| b.map_or_else(|| "-".into(), |b| format!("{:.1}", mib(b)));
        write!(
            f,
            "rss {:<12} after warm-up {:>7} MiB, end {:>7} MiB, max {:>7.1} MiB; flat after warm-up: {} ({} samples)",
            self.role,
            v(self.after_warmup_bytes),
            v(self.end_bytes),
            mib(self.max_bytes),
            match (self.flat_after_warmup, self.growth_after_warmup) {
                (Some(flat), Some(g)) =>
                    format!("{} ({:+.1} %)", if flat { "yes" } else { "NO" }, g * 100.0),
                _ => "n/a (no sample after it)".into(),
            },
            self.samples
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track() -> Track {
        Track::new("worker-0".into(), 1, RssSource::Worker(0))
    }

    const MIB: u64 = 1_048_576;

    #[test]
    fn flat_within_ten_percent_of_the_warm_up_sample() {
        // Grows during the ramp (not counted), then within 10 %: flat.
        let mut t = track();
        for (i, mib) in [10, 50, 100, 104, 110, 108].iter().enumerate() {
            t.record(i as f64 * 10.0, mib * MIB, i >= 2);
        }
        let f = t.figures();
        assert_eq!(f.after_warmup_bytes, Some(100 * MIB));
        assert_eq!(f.end_bytes, Some(108 * MIB));
        assert_eq!(f.max_bytes, 110 * MIB);
        assert_eq!(f.flat_after_warmup, Some(true));
        assert!((f.growth_after_warmup.unwrap_or(0.0) - 0.10).abs() < 1e-9);
        assert!(
            f.to_string().contains("flat after warm-up: yes (+10.0 %)"),
            "{f}"
        );
        // 11 % above it: not flat, even if it came down again by the end.
        t.record(60.0, 111 * MIB, true);
        t.record(70.0, 100 * MIB, true);
        let f = t.figures();
        assert_eq!(f.flat_after_warmup, Some(false));
        assert!(
            f.to_string().contains("flat after warm-up: NO (+11.0 %)"),
            "{f}"
        );
        assert_eq!(f.series.points().len(), 8);
    }

    #[test]
    fn no_verdict_without_a_sample_after_warm_up() {
        let mut t = track();
        t.record(0.0, 10 * MIB, false);
        assert_eq!(t.figures().after_warmup_bytes, None);
        t.record(10.0, 20 * MIB, true);
        let f = t.figures();
        assert_eq!(f.after_warmup_bytes, Some(20 * MIB));
        assert_eq!(f.flat_after_warmup, None);
        assert!(f.to_string().contains("n/a (no sample after it)"));
    }

    #[test]
    fn sampler_reads_local_and_remote_processes_on_its_interval() {
        let mut s = RssSampler::new(Duration::from_secs(10));
        s.track("coordinator".into(), std::process::id(), RssSource::Local);
        s.track("worker-0".into(), 0, RssSource::Worker(0));
        s.track("worker-1".into(), 0, RssSource::Worker(1)); // never reported
        assert!(s.due(0.0));
        s.sample(0.0, false, |w| (w == 0).then_some(5 * MIB));
        assert!(!s.due(9.9) && s.due(10.0));
        s.sample(10.5, true, |w| (w == 0).then_some(6 * MIB));
        assert!(!s.due(19.9) && s.due(20.0));
        let f = s.figures();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].samples, 2);
        assert!(f[0].max_bytes > 0);
        assert_eq!((f[1].samples, f[1].after_warmup_bytes), (2, Some(6 * MIB)));
        assert_eq!(f[2].samples, 0);
    }
}
