//! Physical bounds on the cumulative counters viewers report (`ViewerService.Report`
//! and `Heartbeat`), as pure arithmetic (no I/O, no clock).
//!
//! A viewer's counters are taken on trust, so every delta the control plane derives
//! from them is clamped to what a viewer can physically receive (or upload, or stall)
//! in the time the report covers:
//!
//! * **Bytes received** (from the data plane and from peers together) grow by at most
//!   `margin` × the stream rate × the covered time, plus a start-up burst of `burst` of
//!   stream: the broadcast's measured rate (`IngestHealth.bitrate_kbps`), or
//!   `max_stream_kbps` while none is known. When the sum is clamped, bytes from the
//!   data plane are kept first, so a forged claim cannot raise the peer share.
//! * **Bytes uploaded** likewise, at `max_upload_kbps`.
//! * **Stall time** by `margin` × the covered time, plus `burst`.
//!
//! The allowance is a per-session [`Credit`]: it starts at the burst, refills with
//! covered time at the margin, and holds at most the burst plus [`BANK`] of refill, so
//! sending many tiny reports earns no extra burst and an idle session cannot save up.
//! A counter that goes *down* contributes 0 and becomes the new baseline (never a
//! negative or wrapped delta); all arithmetic saturates; every value fits `i64`.

use std::time::Duration;

/// How much covered time's allowance a session's credit can hold beyond the burst
/// (at the margin): a report covers at most `ReportConfig::max_gap` (30 s by default).
pub const BANK: Duration = Duration::from_secs(30);

/// Largest counter value kept as a baseline or delta (the database stores `BIGINT`).
pub const MAX_COUNTER: u64 = i64::MAX as u64;

/// Bounds on what a viewer's cumulative counters may grow by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterLimits {
    /// Stream rate assumed while a broadcast has no measured rate, kbit/s.
    pub max_stream_kbps: u32,
    /// Most a viewer can upload, kbit/s.
    pub max_upload_kbps: u32,
    /// Factor over the stream rate (repairs, duplicates, jitter of report times).
    pub margin: u32,
    /// Start-up burst allowance, in time of stream (the data plane's live start sends
    /// a second or more of the window at once).
    pub burst: Duration,
}

impl Default for CounterLimits {
    fn default() -> Self {
        CounterLimits {
            max_stream_kbps: 20_000,
            max_upload_kbps: 100_000,
            margin: 2,
            burst: Duration::from_secs(5),
        }
    }
}

/// Bytes per second of a rate in kbit/s.
pub fn bytes_per_s(kbps: u32) -> u64 {
    u64::from(kbps) * 125
}

fn ms_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `per_s` units per second over `ms` milliseconds, saturating.
fn amount(per_s: u64, ms: u64) -> u64 {
    u64::try_from(u128::from(per_s) * u128::from(ms) / 1000).unwrap_or(u64::MAX)
}

/// The unused allowance of one counter of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit(pub u64);

impl Credit {
    /// A new session's credit: the burst.
    pub fn start(per_s: u64, lim: &CounterLimits) -> Credit {
        Credit(amount(per_s, ms_of(lim.burst)).min(MAX_COUNTER))
    }

    /// Refills for `covered_ms` at `per_s` × the margin, then grants at most the credit
    /// of `want`; returns what is granted (≤ `want`).
    pub fn grant(&mut self, want: u64, covered_ms: u64, per_s: u64, lim: &CounterLimits) -> u64 {
        let margin = u64::from(lim.margin.max(1));
        let cap = amount(
            per_s,
            ms_of(lim.burst).saturating_add(ms_of(BANK).saturating_mul(margin)),
        )
        .min(MAX_COUNTER);
        let refill = amount(per_s, covered_ms.saturating_mul(margin));
        let available = self.0.saturating_add(refill).min(cap);
        let granted = want.min(available);
        self.0 = available - granted;
        granted
    }
}

/// The credits of one session: bytes received, bytes uploaded, stall ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits {
    /// Bytes received (data plane and peers together).
    pub received: Credit,
    /// Bytes uploaded.
    pub uploaded: Credit,
    /// Stall time, ms.
    pub stall: Credit,
}

/// The rates one session's counters are bounded by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Stream rate (measured, else the ceiling), kbit/s.
    pub stream_kbps: u32,
    /// The limits.
    pub limits: CounterLimits,
}

impl Bounds {
    /// Bounds for a broadcast whose measured rate is `measured_kbps` (if any).
    pub fn new(measured_kbps: Option<u32>, limits: CounterLimits) -> Bounds {
        Bounds {
            stream_kbps: measured_kbps
                .filter(|&k| k > 0)
                .unwrap_or(limits.max_stream_kbps),
            limits,
        }
    }

    fn received_per_s(&self) -> u64 {
        bytes_per_s(self.stream_kbps)
    }

    fn uploaded_per_s(&self) -> u64 {
        bytes_per_s(self.limits.max_upload_kbps)
    }

    /// A new session's credits.
    pub fn start(&self) -> Credits {
        Credits {
            received: Credit::start(self.received_per_s(), &self.limits),
            uploaded: Credit::start(self.uploaded_per_s(), &self.limits),
            stall: Credit::start(1000, &self.limits),
        }
    }
}

/// What a counter grew by since its baseline: 0 when it went down (a new baseline,
/// never a wrapped value), at most [`MAX_COUNTER`].
pub fn raw_delta(cur: u64, prev: u64) -> u64 {
    cur.saturating_sub(prev).min(MAX_COUNTER)
}

/// A counter as kept as the next baseline (it must fit the database's `BIGINT`).
pub fn baseline(cur: u64) -> u64 {
    cur.min(MAX_COUNTER)
}

/// The clamped deltas of one report or heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clamped {
    /// Bytes from the data plane.
    pub from_server: u64,
    /// Bytes from peers.
    pub from_peers: u64,
    /// Bytes uploaded.
    pub uploaded: u64,
    /// Stall time, ms.
    pub stall_ms: u64,
    /// Some delta was cut to its bound.
    pub clamped: bool,
}

/// Clamps raw deltas (`[from server, from peers, uploaded, stall ms]`, already
/// non-negative) covering `covered_ms`, spending `credits`.
pub fn clamp(raw: [u64; 4], covered_ms: u64, credits: &mut Credits, b: &Bounds) -> Clamped {
    let [server, peers, uploaded, stall] = raw;
    let want = server.saturating_add(peers);
    let rx = credits
        .received
        .grant(want, covered_ms, b.received_per_s(), &b.limits);
    // The data plane's bytes first: a clamped claim never raises the peer share.
    let from_server = server.min(rx);
    let from_peers = peers.min(rx - from_server);
    let up = credits
        .uploaded
        .grant(uploaded, covered_ms, b.uploaded_per_s(), &b.limits);
    let st = credits.stall.grant(stall, covered_ms, 1000, &b.limits);
    Clamped {
        from_server,
        from_peers,
        uploaded: up,
        stall_ms: st,
        clamped: rx < want || up < uploaded || st < stall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(kbps: u32) -> Bounds {
        Bounds::new(Some(kbps), CounterLimits::default())
    }

    #[test]
    fn honest_counters_pass_untouched() {
        let b = bounds(2000); // 250,000 B/s
        let mut c = b.start();
        // A first report 5 s after join with the start-up burst: 5 s + 3 s of stream.
        let r = clamp([1_000_000, 1_000_000, 500_000, 300], 5_000, &mut c, &b);
        assert!(!r.clamped);
        assert_eq!((r.from_server, r.from_peers), (1_000_000, 1_000_000));
        // Then steady 5 s reports at the stream rate, forever.
        for _ in 0..1000 {
            let r = clamp([250_000, 1_000_000, 0, 0], 5_000, &mut c, &b);
            assert!(!r.clamped);
        }
    }

    #[test]
    fn forged_counters_are_bounded_by_covered_time() {
        let b = bounds(2000);
        let mut c = b.start();
        let max = u64::MAX;
        let r = clamp([0, max, max, max], 5_000, &mut c, &b);
        assert!(r.clamped);
        // Burst (5 s) + 2 × 5 s of stream.
        assert_eq!(r.from_peers, 15 * 250_000);
        assert_eq!(r.stall_ms, 15_000);
        // Many tiny reports earn no more than the margin over their covered time.
        let mut total = 0u64;
        for _ in 0..10_000 {
            total += clamp([0, max, 0, 0], 1, &mut c, &b).from_peers;
        }
        assert_eq!(total, 2 * 10 * 250_000);
        // The server's bytes are granted first.
        let r = clamp([max, max, 0, 0], 1_000, &mut c, &b);
        assert_eq!((r.from_server, r.from_peers), (500_000, 0));
        // Idle time banks at most BANK at the margin (plus the burst).
        let r = clamp([0, max, 0, 0], 3_600_000, &mut c, &b);
        assert_eq!(r.from_peers, (5 + 2 * 30) * 250_000);
    }

    #[test]
    fn backwards_counters_are_zero_and_values_fit_i64() {
        assert_eq!(raw_delta(5, 10), 0);
        assert_eq!(raw_delta(u64::MAX, 0), MAX_COUNTER);
        assert_eq!(baseline(u64::MAX), MAX_COUNTER);
        // Absurd limits still saturate instead of overflowing.
        let b = Bounds::new(
            Some(u32::MAX),
            CounterLimits {
                max_upload_kbps: u32::MAX,
                margin: u32::MAX,
                burst: Duration::MAX,
                ..CounterLimits::default()
            },
        );
        let mut c = b.start();
        let r = clamp([u64::MAX; 4], u64::MAX, &mut c, &b);
        assert!(r.from_server <= MAX_COUNTER && r.uploaded <= MAX_COUNTER);
        assert!(c.received.0 <= MAX_COUNTER);
    }
}
