//! The viewer's wall clock and its offset to the control plane's clock.
//!
//! Chunk signatures carry the data plane's wall-clock time; the SDK refuses chunks
//! older than [`crate::ViewerConfig::chunk_max_age`] (a replay) or too far in the
//! future. A device's clock can be minutes off, so the SDK never trusts it blindly: the
//! control plane stamps its clock on the `Join` answer and on every session-stream
//! message ([`ServerTime`]), and the SDK reads `local clock + measured offset`
//! ([`ClockOffset`]). The `Join` sample is corrected by half its round trip; stream
//! messages count as received when sent (their one-way delay, well under a second, is
//! the estimate's error, far inside the age limit).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// A wall clock in unix milliseconds. Default: the system clock; tests inject a skewed
/// one ([`WallClock::offset_by`]).
#[derive(Clone)]
pub struct WallClock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl WallClock {
    /// The system clock.
    pub fn system() -> Self {
        WallClock(Arc::new(starling_proto::time::unix_ms))
    }

    /// Any clock.
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        WallClock(Arc::new(f))
    }

    /// The system clock shifted by `ms` (negative: behind).
    pub fn offset_by(ms: i64) -> Self {
        WallClock::from_fn(move || starling_proto::time::unix_ms().saturating_add_signed(ms))
    }

    /// Unix ms now.
    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::system()
    }
}

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WallClock")
    }
}

/// A control-plane clock reading: its unix ms, when it arrived here and the round trip
/// of the call that carried it (zero for a pushed message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerTime {
    pub server_ms: u64,
    pub received: Instant,
    pub rtt: Duration,
}

impl ServerTime {
    /// A reading just received (`server_ms` 0: the control plane sent none).
    pub(crate) fn now(server_ms: i64, rtt: Duration) -> Option<ServerTime> {
        u64::try_from(server_ms)
            .ok()
            .filter(|&ms| ms > 0)
            .map(|server_ms| ServerTime {
                server_ms,
                received: Instant::now(),
                rtt,
            })
    }
}

/// The clock a viewer checks chunk ages with: its own plus the offset last measured.
#[derive(Debug, Default)]
pub(crate) struct ClockOffset {
    clock: WallClock,
    offset_ms: AtomicI64,
    measured: AtomicBool,
}

impl ClockOffset {
    pub(crate) fn new(clock: WallClock) -> Self {
        ClockOffset {
            clock,
            offset_ms: AtomicI64::new(0),
            measured: AtomicBool::new(false),
        }
    }

    /// Adopts the offset a control-plane reading gives.
    pub(crate) fn observe(&self, t: ServerTime) {
        let since = u64::try_from(t.received.elapsed().as_millis()).unwrap_or(u64::MAX);
        let local_at_receipt = self.clock.now_ms().saturating_sub(since);
        let half_rtt = u64::try_from(t.rtt.as_millis() / 2).unwrap_or(0);
        let server_at_receipt = t.server_ms.saturating_add(half_rtt);
        let offset = i64::try_from(i128::from(server_at_receipt) - i128::from(local_at_receipt))
            .unwrap_or(0);
        self.offset_ms.store(offset, Ordering::Relaxed);
        if !self.measured.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                offset_ms = offset,
                "clock offset to the control plane measured"
            );
        }
    }

    /// The offset in force (control plane minus local), ms.
    pub(crate) fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// The control plane's time as estimated here, unix ms.
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms().saturating_add_signed(self.offset_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_is_corrected_by_the_measured_offset() {
        let base = 1_700_000_000_000u64;
        // 10 minutes ahead.
        let c = ClockOffset::new(WallClock::from_fn(move || base + 600_000));
        assert_eq!(c.now_ms(), base + 600_000);
        c.observe(ServerTime {
            server_ms: base - 100,
            received: Instant::now(),
            rtt: Duration::from_millis(200),
        });
        assert_eq!(c.offset_ms(), -600_000);
        assert_eq!(c.now_ms(), base);
        assert!(ServerTime::now(0, Duration::ZERO).is_none());
        assert!(ServerTime::now(-5, Duration::ZERO).is_none());
    }
}
