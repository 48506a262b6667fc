//! Per-peer figures of a run: the lag histogram ([`LagHistogram`], over the peers' lag
//! p99 and over every lag sample) and the join groups ([`JoinGroups`]: peers that joined
//! while this machine was busy versus not), with their lines of the text report.
//! Computed once, at the end, from the workers' peer records.

use super::report::{P2, P3};
use super::series::Series;
use crate::report::Percentiles;
use crate::worker::{LAG_BUCKET_MS, PeerRecord};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// The machine's busy fraction (all cores, `/proc/stat`) at or above which it is
/// saturated: the run is flagged MACHINE-BOUND at this CPU utilization over the window,
/// and a peer that joined in a second this busy is in [`JoinGroups::busy`].
pub const MACHINE_BOUND_BUSY: f64 = 0.85;

/// Upper bounds of the lag histogram's buckets, ms; a last bucket holds the rest.
pub const LAG_BOUNDS_MS: [u64; 4] = [1_000, 2_000, 3_000, 5_000];

const LAG_LABELS: [&str; 5] = ["<=1 s", "1-2 s", "2-3 s", "3-5 s", ">5 s"];

fn lag_bucket(ms: u64) -> usize {
    LAG_BOUNDS_MS.partition_point(|&b| b < ms)
}

/// Lag behind live in buckets ([`LAG_BOUNDS_MS`], upper bounds included: "<=1 s",
/// "1-2 s", "2-3 s", "3-5 s", ">5 s").
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LagHistogram {
    /// The buckets' upper bounds, ms.
    pub bounds_ms: Vec<u64>,
    /// The buckets' names.
    pub labels: Vec<String>,
    /// Peers by their lag p99 over their stay (a histogram bucket's upper bound, as the
    /// stays' `lag_p99_ms`); sums to the peers with a measured lag.
    pub peers_by_p99: Vec<u64>,
    /// Peers with a measured lag p99.
    pub peers: u64,
    /// Every lag sample (every playing peer, every second; the upper edge of its 10 ms
    /// bucket), `--net sockets` too.
    pub samples: Vec<u64>,
    /// Lag samples.
    pub sample_count: u64,
}

impl LagHistogram {
    /// From the peers' records and the merged sample histogram (10 ms buckets).
    pub(super) fn of(records: &[&PeerRecord], samples: &BTreeMap<u64, u64>) -> LagHistogram {
        let mut h = LagHistogram {
            bounds_ms: LAG_BOUNDS_MS.to_vec(),
            labels: LAG_LABELS.iter().map(|s| (*s).to_owned()).collect(),
            peers_by_p99: vec![0; LAG_LABELS.len()],
            samples: vec![0; LAG_LABELS.len()],
            ..LagHistogram::default()
        };
        for p99 in records.iter().filter_map(|p| p.lag_p99_ms) {
            h.peers_by_p99[lag_bucket(p99)] += 1;
            h.peers += 1;
        }
        for (&b, &n) in samples {
            h.samples[lag_bucket((b + 1) * LAG_BUCKET_MS)] += n;
            h.sample_count += n;
        }
        h
    }
}

fn buckets_line(labels: &[String], counts: &[u64], total: u64) -> String {
    labels
        .iter()
        .zip(counts)
        .map(|(l, &n)| {
            format!(
                "{l} {n} ({:.1}%)",
                if total == 0 {
                    0.0
                } else {
                    n as f64 * 100.0 / total as f64
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for LagHistogram {
    /// One line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lag histogram: peers by lag p99 ")?;
        if self.peers == 0 {
            write!(f, "n/a (no per-peer lag)")?;
        } else {
            write!(
                f,
                "{} (n={})",
                buckets_line(&self.labels, &self.peers_by_p99, self.peers),
                self.peers
            )?;
        }
        write!(f, "; all samples ")?;
        if self.sample_count == 0 {
            write!(f, "n/a")
        } else {
            write!(
                f,
                "{}",
                buckets_line(&self.labels, &self.samples, self.sample_count)
            )
        }
    }
}

/// The figures of a group of peers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupFigures {
    /// Peers in the group (joined).
    pub peers: usize,
    /// Start-up times of those that played, ms.
    pub startup_ms: P3,
    /// Of which with a start-up time.
    pub with_startup: usize,
    /// Lag, ms: p50 is the median of the peers' lag p50, p99 the 99th percentile of
    /// their lag p99; `null` when no peer of the group measured a lag.
    pub lag_ms: Option<P2>,
    /// Chunks played on time / chunks due, over the group's peers.
    pub continuity: f64,
    /// Chunks played on time.
    pub chunks_played: u64,
    /// Chunks that missed their deadline.
    pub chunks_skipped: u64,
}

impl GroupFigures {
    fn of(peers: &[&PeerRecord]) -> GroupFigures {
        let startups: Vec<f64> = peers.iter().filter_map(|p| p.startup_ms).collect();
        let p50s: Vec<f64> = peers
            .iter()
            .filter_map(|p| p.lag_p50_ms.map(|v| v as f64))
            .collect();
        let p99s: Vec<f64> = peers
            .iter()
            .filter_map(|p| p.lag_p99_ms.map(|v| v as f64))
            .collect();
        let played: u64 = peers.iter().map(|p| p.chunks_played).sum();
        let skipped: u64 = peers.iter().map(|p| p.chunks_skipped).sum();
        GroupFigures {
            peers: peers.len(),
            with_startup: startups.len(),
            startup_ms: Percentiles::of(startups).into(),
            lag_ms: (!p50s.is_empty() && !p99s.is_empty()).then(|| P2 {
                p50: Percentiles::of(p50s).p50,
                p99: Percentiles::of(p99s).p99,
            }),
            continuity: if played + skipped == 0 {
                1.0
            } else {
                played as f64 / (played + skipped) as f64
            },
            chunks_played: played,
            chunks_skipped: skipped,
        }
    }
}

impl fmt::Display for GroupFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} peers", self.peers)?;
        if self.peers == 0 {
            return Ok(());
        }
        write!(
            f,
            ", startup ms p50 {:.0} p95 {:.0} (n={}), lag ms {}, continuity {:.5}",
            self.startup_ms.p50,
            self.startup_ms.p95,
            self.with_startup,
            match self.lag_ms {
                Some(l) => format!("p50 {:.0} p99 {:.0}", l.p50, l.p99),
                None => "n/a".into(),
            },
            self.continuity
        )
    }
}

/// The ramp's effect: the joined peers split by how busy this machine was in the second
/// each joined (the coordinator's `/proc/stat` samples, one a second).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JoinGroups {
    /// A peer is in `busy` when the machine was at least this busy (fraction of all
    /// cores) over the sample covering its join ([`MACHINE_BOUND_BUSY`]).
    pub busy_threshold: f64,
    /// Joined while the machine was busy.
    pub busy: GroupFigures,
    /// Joined while it was not (or with no sample of it: no `/proc/stat`).
    pub not_busy: GroupFigures,
    /// The busiest second of the run (fraction of all cores; 0 without samples).
    pub busiest: f64,
}

impl JoinGroups {
    /// The joined peers of `records` split by `busy` at their join times.
    pub(super) fn of(records: &[&PeerRecord], busy: &Series, threshold: f64) -> JoinGroups {
        let mut hot = Vec::new();
        let mut calm = Vec::new();
        for p in records {
            let Some(j) = p.joined_s else { continue };
            if busy.at(j).is_some_and(|b| b >= threshold) {
                hot.push(*p);
            } else {
                calm.push(*p);
            }
        }
        JoinGroups {
            busy_threshold: threshold,
            busy: GroupFigures::of(&hot),
            not_busy: GroupFigures::of(&calm),
            busiest: busy.points().iter().map(|p| p.1).fold(0.0, f64::max),
        }
    }
}

impl fmt::Display for JoinGroups {
    /// Two lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "joined while this machine was busy (>= {:.0}% of its cores; busiest second {:.0}%): {}",
            self.busy_threshold * 100.0,
            self.busiest * 100.0,
            self.busy
        )?;
        write!(f, "joined while it was not: {}", self.not_busy)
    }
}

#[cfg(test)]
mod tests {
    use super::super::series::Reduce;
    use super::*;

    fn rec(joined_s: Option<f64>, lag_p99: Option<u64>) -> PeerRecord {
        PeerRecord {
            joined_s,
            startup_ms: joined_s.map(|j| 1000.0 + 2.0 * j),
            chunks_played: 99,
            chunks_skipped: 1,
            lag_p50_ms: lag_p99.map(|v| v / 2),
            lag_p99_ms: lag_p99,
            ..PeerRecord::default()
        }
    }

    #[test]
    fn lag_buckets_include_their_upper_bounds() {
        let v = [0, 1000, 1001, 2000, 2500, 3000, 3001, 5000, 5001, 99_999];
        let b: Vec<usize> = v.iter().map(|&ms| lag_bucket(ms)).collect();
        assert_eq!(b, vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn histogram_counts_peers_with_lag_and_every_sample() {
        let records = [
            rec(Some(1.0), Some(750)),
            rec(Some(1.0), Some(1_000)),
            rec(Some(2.0), Some(2_500)),
            rec(Some(2.0), Some(7_500)),
            rec(Some(3.0), None), // no lag measured
            rec(None, None),      // never joined
        ];
        let refs: Vec<&PeerRecord> = records.iter().collect();
        let mut samples = BTreeMap::new();
        samples.insert(10, 5); // 100..110 ms
        samples.insert(99, 1); // 990..1000 ms: upper edge 1000, still <= 1 s
        samples.insert(100, 2); // 1000..1010 ms
        samples.insert(600, 2); // 6 s
        let h = LagHistogram::of(&refs, &samples);
        assert_eq!(h.peers_by_p99, vec![2, 0, 1, 0, 1]);
        assert_eq!(h.peers, 4);
        assert_eq!(h.peers_by_p99.iter().sum::<u64>(), h.peers);
        assert_eq!(h.samples, vec![6, 2, 0, 0, 2]);
        assert_eq!(h.sample_count, 10);
        let line = h.to_string();
        assert!(
            line.contains("peers by lag p99 <=1 s 2 (50.0%), 1-2 s 0 (0.0%), 2-3 s 1 (25.0%)"),
            "{line}"
        );
        assert!(line.contains("all samples <=1 s 6 (60.0%)"), "{line}");
        let none = LagHistogram::of(&[], &BTreeMap::new());
        assert_eq!(none.peers_by_p99.iter().sum::<u64>(), 0);
        assert!(none.to_string().contains("n/a (no per-peer lag)"));
    }

    #[test]
    fn peers_split_by_how_busy_the_machine_was_when_they_joined() {
        // Busy 0.9 in seconds (0, 2], 0.3 after; one sample a second.
        let mut busy = Series::new(64, Reduce::Mean);
        for t in 1..=6 {
            busy.push(f64::from(t), if t <= 2 { 0.9 } else { 0.3 });
        }
        let records = [
            rec(Some(0.5), Some(3_000)), // busy
            rec(Some(2.0), Some(2_000)), // busy (the sample at 2 s covers it)
            rec(Some(2.1), Some(500)),   // not
            rec(Some(5.5), Some(750)),   // not
            rec(Some(60.0), None),       // after the last sample: the last one, not
            rec(None, Some(1)),          // never joined: in neither
        ];
        let refs: Vec<&PeerRecord> = records.iter().collect();
        let g = JoinGroups::of(&refs, &busy, MACHINE_BOUND_BUSY);
        assert_eq!((g.busy.peers, g.not_busy.peers), (2, 3));
        let joined = records.iter().filter(|r| r.joined_s.is_some()).count();
        assert_eq!(g.busy.peers + g.not_busy.peers, joined);
        assert_eq!(g.busy.startup_ms.p50, 1001.0);
        assert_eq!(g.busy.startup_ms.p95, 1004.0);
        assert_eq!(
            g.busy.lag_ms,
            Some(P2 {
                p50: 1000.0,
                p99: 3000.0
            })
        );
        assert_eq!(g.not_busy.with_startup, 3);
        assert_eq!(g.not_busy.lag_ms.map(|l| l.p99), Some(750.0));
        assert!((g.busy.continuity - 0.99).abs() < 1e-9);
        assert_eq!(g.busiest, 0.9);
        let text = g.to_string();
        assert!(
            text.contains("busy (>= 85% of its cores; busiest second 90%): 2 peers, startup ms p50 1001 p95 1004 (n=2), lag ms p50 1000 p99 3000, continuity 0.99000"),
            "{text}"
        );
        // Without samples every peer is "not busy"; without per-peer lag, lag is n/a.
        let g = JoinGroups::of(&refs, &Series::new(8, Reduce::Mean), 0.85);
        assert_eq!((g.busy.peers, g.not_busy.peers), (0, 5));
        let no_lag = [rec(Some(1.0), None)];
        let g = JoinGroups::of(&[&no_lag[0]], &busy, 0.85);
        assert_eq!(g.busy.lag_ms, None);
        assert!(g.to_string().contains("lag ms n/a"));
    }
}
