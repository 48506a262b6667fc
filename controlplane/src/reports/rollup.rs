//! Pure roll-up arithmetic (no I/O, no clock): what each accepted report contributes to
//! its minute, and how stored minutes become [`AudiencePoint`]s.
//!
//! Definitions (the contract `GetAudience` answers with, and what the tests recompute
//! independently):
//!
//! * A report *covers* the time since the session's previous report (for the first
//!   report: since the session joined), capped at `max_gap_ms` so a viewer that went
//!   silent is not counted as watching. Its covered time and the deltas of its cumulative
//!   counters (bytes from the data plane, bytes from peers, stall time) are attributed to
//!   the minute that contains the report's time `at_ms`.
//! * A counter that went *down* contributes 0 and becomes the new baseline (an honest
//!   SDK's counters never go down within a session). Every delta is clamped to what is
//!   physically possible in the covered time ([`super::clamp`]): bytes received to the
//!   stream rate × margin (+ a start-up burst), stall time to the covered time × margin
//!   (+ the burst); a clamped report is counted (`starling_cp_counters_clamped_total`).
//! * Viewers of a minute = distinct sessions with a report in it; a bucket's
//!   `concurrent_viewers` is the mean over its minutes, `peak_viewers` the maximum.
//! * Start-up percentiles use each session's first non-zero `startup_ms`, in the bucket
//!   that contains the report that carried it (nearest-rank percentiles).

use starling_proto::v1::{AudiencePoint, ViewerReport};

use super::clamp::{self, Bounds, Credits};

/// One minute in milliseconds.
pub const MINUTE_MS: i64 = 60_000;

/// Start of the minute containing `t` (unix ms).
pub fn minute_of(t: i64) -> i64 {
    t - t.rem_euclid(MINUTE_MS)
}

/// What the control plane remembers of a session's last accepted report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prev {
    /// Highest accepted `report_seq` (0 = none yet).
    pub seq: u64,
    /// Time of the last report, or the join time before the first one (unix ms).
    pub at_ms: i64,
    /// Cumulative bytes from the data plane at the last report.
    pub from_server: u64,
    /// Cumulative bytes from peers at the last report.
    pub from_peers: u64,
    /// Cumulative stall time at the last report.
    pub stall_ms: u64,
    /// A non-zero start-up time was already recorded.
    pub startup_seen: bool,
    /// Minute of the last report (`None` before the first one).
    pub minute: Option<i64>,
    /// Unused counter allowance ([`super::clamp`]); `None`: a fresh start (the burst).
    pub credits: Option<Credits>,
}

impl Prev {
    /// State of a session that joined at `joined_at_ms` and has not reported yet.
    pub fn joined(joined_at_ms: i64) -> Prev {
        Prev {
            seq: 0,
            at_ms: joined_at_ms,
            from_server: 0,
            from_peers: 0,
            stall_ms: 0,
            startup_seen: false,
            minute: None,
            credits: None,
        }
    }
}

/// What one report contributes, derived at ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Derived {
    /// The report's time as stored (client time if plausible, else receive time; never
    /// before the previous report).
    pub at_ms: i64,
    /// Time covered since the previous report (capped).
    pub covered_ms: u64,
    /// Bytes from the data plane since the previous report.
    pub d_server: u64,
    /// Bytes from peers since the previous report.
    pub d_peers: u64,
    /// Stall time since the previous report.
    pub d_stall_ms: u64,
    /// First report of this session in its minute (counts the session as a viewer).
    pub first_in_minute: bool,
    /// Carries the session's first non-zero start-up time.
    pub first_startup: bool,
    /// A counter delta was cut to its physical bound.
    pub clamped: bool,
}

/// How far a client's clock may be behind the control plane's (reports delayed by
/// retries) before its timestamp is replaced by the receive time.
pub const MAX_PAST_SKEW_MS: i64 = 3_600_000;
/// How far ahead a client's clock may be.
pub const MAX_FUTURE_SKEW_MS: i64 = 300_000;

/// Derives what `r` contributes after `prev`, received at `now_ms`, with its counter
/// deltas clamped to `bounds`; returns it with the session's new state.
pub fn derive(
    prev: &Prev,
    r: &ViewerReport,
    now_ms: i64,
    max_gap_ms: u64,
    bounds: &Bounds,
) -> (Derived, Prev) {
    let plausible = r.at_unix_ms >= now_ms.saturating_sub(MAX_PAST_SKEW_MS)
        && r.at_unix_ms <= now_ms.saturating_add(MAX_FUTURE_SKEW_MS);
    let at_ms = if plausible { r.at_unix_ms } else { now_ms }.max(prev.at_ms);
    let covered_ms = u64::try_from(at_ms.saturating_sub(prev.at_ms))
        .unwrap_or(0)
        .min(max_gap_ms);
    let minute = minute_of(at_ms);
    let first_startup = !prev.startup_seen && r.startup_ms > 0;
    let mut credits = prev.credits.unwrap_or_else(|| bounds.start());
    let c = clamp::clamp(
        [
            clamp::raw_delta(r.bytes_from_server, prev.from_server),
            clamp::raw_delta(r.bytes_from_peers, prev.from_peers),
            0,
            clamp::raw_delta(r.stall_ms, prev.stall_ms),
        ],
        covered_ms,
        &mut credits,
        bounds,
    );
    let d = Derived {
        at_ms,
        covered_ms,
        d_server: c.from_server,
        d_peers: c.from_peers,
        d_stall_ms: c.stall_ms,
        first_in_minute: prev.minute != Some(minute),
        first_startup,
        clamped: c.clamped,
    };
    let next = Prev {
        seq: r.report_seq,
        at_ms,
        from_server: clamp::baseline(r.bytes_from_server),
        from_peers: clamp::baseline(r.bytes_from_peers),
        stall_ms: clamp::baseline(r.stall_ms),
        startup_seen: prev.startup_seen || first_startup,
        minute: Some(minute),
        credits: Some(credits),
    };
    (d, next)
}

/// One stored roll-up minute of a broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Minute {
    /// Start of the minute, unix ms.
    pub minute_ms: i64,
    /// Distinct sessions reporting in the minute.
    pub viewers: u64,
    /// Reports in the minute.
    pub reports: u64,
    /// Covered (watch) time.
    pub watch_ms: u64,
    /// Bytes from the data plane.
    pub server_bytes: u64,
    /// Bytes from peers.
    pub peer_bytes: u64,
    /// Stall time.
    pub stall_ms: u64,
}

impl Minute {
    /// Adds another contribution to the same minute.
    pub fn add(&mut self, o: &Minute) {
        self.viewers = self.viewers.saturating_add(o.viewers);
        self.reports = self.reports.saturating_add(o.reports);
        self.watch_ms = self.watch_ms.saturating_add(o.watch_ms);
        self.server_bytes = self.server_bytes.saturating_add(o.server_bytes);
        self.peer_bytes = self.peer_bytes.saturating_add(o.peer_bytes);
        self.stall_ms = self.stall_ms.saturating_add(o.stall_ms);
    }

    /// What one derived report contributes to its minute.
    pub fn of(d: &Derived) -> Minute {
        Minute {
            minute_ms: minute_of(d.at_ms),
            viewers: u64::from(d.first_in_minute),
            reports: 1,
            watch_ms: d.covered_ms,
            server_bytes: d.d_server,
            peer_bytes: d.d_peers,
            stall_ms: d.d_stall_ms,
        }
    }
}

/// Nearest-rank percentile of sorted values (`p` in (0, 1]); 0 when empty.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[allow(clippy::cast_precision_loss)] // ratios and averages of counts
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Builds the points of `[from_ms, to_ms)` (both minute-aligned, `to_ms > from_ms`) in
/// buckets of `step_ms` (a multiple of a minute) from stored minutes and start-ups
/// (`(at_ms, startup_ms)`). Every bucket is present, empty ones with zeros; the last
/// bucket is cut at `to_ms`.
pub fn points(
    minutes: &[Minute],
    startups: &[(i64, u32)],
    from_ms: i64,
    to_ms: i64,
    step_ms: i64,
) -> Vec<AudiencePoint> {
    let mut out = Vec::new();
    let mut start = from_ms;
    while start < to_ms {
        let end = (start + step_ms).min(to_ms);
        let mut sum = Minute::default();
        let mut peak = 0u64;
        for m in minutes
            .iter()
            .filter(|m| m.minute_ms >= start && m.minute_ms < end)
        {
            sum.add(m);
            peak = peak.max(m.viewers);
        }
        let n_minutes = u64::try_from((end - start) / MINUTE_MS).unwrap_or(1).max(1);
        let mut su: Vec<u32> = startups
            .iter()
            .filter(|(at, _)| *at >= start && *at < end)
            .map(|&(_, s)| s)
            .collect();
        su.sort_unstable();
        out.push(AudiencePoint {
            start_unix_ms: start,
            concurrent_viewers: ratio(sum.viewers, n_minutes),
            peak_viewers: u32::try_from(peak).unwrap_or(u32::MAX),
            #[allow(clippy::cast_precision_loss)]
            watch_time_s: sum.watch_ms as f64 / 1000.0,
            peer_share: ratio(
                sum.peer_bytes,
                sum.peer_bytes.saturating_add(sum.server_bytes),
            ),
            server_egress_bytes: sum.server_bytes,
            peer_bytes: sum.peer_bytes,
            rebuffer_ratio: ratio(sum.stall_ms, sum.watch_ms),
            startup_p50_ms: percentile(&su, 0.50),
            startup_p95_ms: percentile(&su, 0.95),
        });
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(seq: u64, at: i64, server: u64, peers: u64, stall: u64, startup: u32) -> ViewerReport {
        ViewerReport {
            report_seq: seq,
            at_unix_ms: at,
            bytes_from_server: server,
            bytes_from_peers: peers,
            stall_ms: stall,
            startup_ms: startup,
            ..Default::default()
        }
    }

    const NOW: i64 = 1_700_000_080_000; // 40 s into a minute
    const B: Bounds = Bounds {
        stream_kbps: 2000,
        limits: clamp::CounterLimits {
            max_stream_kbps: 20_000,
            max_upload_kbps: 100_000,
            margin: 2,
            burst: std::time::Duration::from_secs(5),
        },
    };

    #[test]
    fn first_report_covers_since_join_and_counts_startup() {
        let p = Prev::joined(NOW - 5_000);
        let (d, n) = derive(&p, &rep(1, NOW, 100, 50, 0, 300), NOW, 30_000, &B);
        assert_eq!(d.covered_ms, 5_000);
        assert_eq!((d.d_server, d.d_peers, d.d_stall_ms), (100, 50, 0));
        assert!(d.first_in_minute && d.first_startup);
        assert_eq!(n.seq, 1);
        let (d2, _) = derive(&n, &rep(2, NOW + 5_000, 150, 250, 40, 300), NOW, 30_000, &B);
        assert_eq!(d2.covered_ms, 5_000);
        assert_eq!((d2.d_server, d2.d_peers, d2.d_stall_ms), (50, 200, 40));
        assert!(!d2.first_in_minute && !d2.first_startup);
        // Next minute.
        let (d3, _) = derive(
            &n,
            &rep(2, NOW + 25_000, 150, 250, 40, 300),
            NOW,
            30_000,
            &B,
        );
        assert!(d3.first_in_minute);
    }

    #[test]
    fn gaps_are_capped_resets_and_bad_clocks_handled() {
        let p = Prev::joined(NOW - 600_000);
        let (d, n) = derive(&p, &rep(1, NOW, 1000, 0, 0, 0), NOW, 30_000, &B);
        assert_eq!(d.covered_ms, 30_000);
        // A counter that went down: 0, and the new baseline.
        let (d, n) = derive(&n, &rep(2, NOW + 1_000, 10, 0, 0, 0), NOW, 30_000, &B);
        assert_eq!(d.d_server, 0);
        assert!(!d.clamped);
        assert_eq!(n.from_server, 10);
        // Implausible client time: receive time, never before the previous report.
        let (d, _) = derive(&n, &rep(3, 5, 20, 0, 0, 0), NOW, 30_000, &B);
        assert_eq!(d.at_ms, NOW + 1_000);
        assert_eq!(d.covered_ms, 0);
        assert_eq!(d.d_server, 10);
    }

    #[test]
    fn extreme_counters_are_clamped_and_alternation_earns_nothing_more() {
        let p = Prev::joined(NOW - 5_000);
        let max = u64::MAX;
        // u64::MAX on the first report: at most the burst + 2 × 5 s of stream.
        let (d, mut n) = derive(&p, &rep(1, NOW, 0, max, max, 0), NOW, 30_000, &B);
        assert!(d.clamped);
        assert_eq!(d.d_peers, 15 * 250_000);
        assert_eq!(d.d_stall_ms, 15_000);
        assert_eq!(n.from_peers, i64::MAX as u64);
        // Alternating 0 / huge every second: the margin × 100 s of stream, no more.
        let mut peers = 0u64;
        for k in 0..100i64 {
            let v = if k % 2 == 0 { 0 } else { max };
            let seq = k.unsigned_abs() + 2;
            let (d, next) = derive(
                &n,
                &rep(seq, NOW + 1_000 * (k + 1), 0, v, 0, 0),
                NOW,
                30_000,
                &B,
            );
            peers += d.d_peers;
            n = next;
        }
        assert_eq!(peers, 2 * 100 * 250_000);
    }

    #[test]
    fn percentiles_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.95), 7);
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.95), 95);
    }

    #[test]
    fn buckets_average_peak_and_ratios() {
        let m = |k: i64, viewers, watch, server, peer, stall| Minute {
            minute_ms: k * MINUTE_MS,
            viewers,
            reports: viewers,
            watch_ms: watch,
            server_bytes: server,
            peer_bytes: peer,
            stall_ms: stall,
        };
        let minutes = [m(0, 2, 60_000, 10, 30, 600), m(1, 4, 120_000, 0, 40, 0)];
        let startups = [(1_000, 100), (61_000, 300), (130_000, 50)];
        let p = points(&minutes, &startups, 0, 3 * MINUTE_MS, 2 * MINUTE_MS);
        assert_eq!(p.len(), 2);
        assert!((p[0].concurrent_viewers - 3.0).abs() < 1e-9);
        assert_eq!(p[0].peak_viewers, 4);
        assert!((p[0].watch_time_s - 180.0).abs() < 1e-9);
        assert!((p[0].peer_share - 70.0 / 80.0).abs() < 1e-9);
        assert_eq!((p[0].server_egress_bytes, p[0].peer_bytes), (10, 70));
        assert!((p[0].rebuffer_ratio - 600.0 / 180_000.0).abs() < 1e-12);
        assert_eq!((p[0].startup_p50_ms, p[0].startup_p95_ms), (100, 300));
        assert_eq!(p[1].start_unix_ms, 2 * MINUTE_MS);
        assert_eq!(p[1].peak_viewers, 0);
        assert_eq!(p[1].startup_p50_ms, 50);
    }
}
