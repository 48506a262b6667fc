//! [`UploadBucket`]: the relay's upload budget as a token bucket of bytes, with push
//! debt (pushes may overdraw it, serves only spend what pushes leave).

/// Upload pacing: a token bucket of bytes holding up to [`UploadBucket::BURST_S`] of
/// the budget.
///
/// Pushes are the child slots the control plane sized to the budget, so they stay within
/// it on average; but a chunk goes to every child of its substream at once, so a push may
/// overdraw the bucket by up to [`UploadBucket::PUSH_DEBT_S`] of budget, repaid before
/// any serve. Serves (mesh repair) spend only what pushes leave. (Dropping pushes at an
/// empty bucket instead starved children, whose repairs then drained their neighbours'
/// buckets in turn: 35 % of pushes were dropped with 1 s chunks.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadBucket {
    tokens: f64,
    rate_bytes: f64,
}

impl UploadBucket {
    /// Seconds of budget the bucket saves at most.
    pub const BURST_S: f64 = 2.0;
    /// Seconds of budget pushes may overdraw.
    pub const PUSH_DEBT_S: f64 = 2.0;

    /// Starts empty: a peer's uplink gives nothing before its budget accrues (a full
    /// bucket at the start would let every peer upload 2 s beyond its budget, which a
    /// short load test would count as upload the budgets do not have).
    pub fn new(kbps: u32) -> UploadBucket {
        let rate_bytes = f64::from(kbps) * 1000.0 / 8.0;
        UploadBucket {
            tokens: 0.0,
            rate_bytes,
        }
    }

    /// The budget in bytes per second.
    pub fn rate_bytes(&self) -> f64 {
        self.rate_bytes
    }

    /// Bytes saved now (negative: push debt).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    /// A new budget (what is saved is capped to its burst).
    pub fn set_rate(&mut self, kbps: u32) {
        self.rate_bytes = f64::from(kbps) * 1000.0 / 8.0;
        self.tokens = self.tokens.min(self.rate_bytes * Self::BURST_S);
    }

    /// `dt_s` seconds of budget accrue.
    pub fn refill(&mut self, dt_s: f64) {
        self.tokens = (self.tokens + dt_s * self.rate_bytes).min(self.rate_bytes * Self::BURST_S);
    }

    /// May a chunk of `len` bytes go out now (a push to a child, or a serve)?
    pub fn allows(&self, push: bool, len: f64) -> bool {
        if push {
            self.tokens > -self.rate_bytes * Self::PUSH_DEBT_S
        } else {
            self.tokens >= len
        }
    }

    /// `len` bytes went out.
    pub fn spend(&mut self, len: f64) {
        self.tokens -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_may_overdraw_the_bucket_and_serves_only_use_what_is_left() {
        // 64 kbit/s = 8000 B/s: up to 16,000 B saved, 16,000 B of push debt; empty at
        // the start.
        let mut b = UploadBucket::new(64);
        let chunk = 8000.0;
        assert!(!b.allows(false, 1.0));
        // A burst of pushes to children at once: two go out on debt.
        for _ in 0..2 {
            assert!(b.allows(true, chunk));
            b.spend(chunk);
        }
        // Debt exhausted. (Pushes are paced per child, `ChildPace`, with one more second
        // of debt for a child whose last push was skipped; their bytes still come off
        // the bucket.)
        assert!(!b.allows(true, chunk));
        b.spend(chunk);
        b.refill(1.0);
        // No serve while in debt, nor until a whole chunk's worth is saved.
        b.refill(2.0);
        assert!(b.allows(true, chunk));
        assert!(!b.allows(false, chunk));
        b.refill(1.0);
        assert!(b.allows(false, chunk));
        // The bucket holds at most 2 s of budget.
        b.refill(100.0);
        assert!((b.tokens() - 16_000.0).abs() < 1e-9);
        // A lowered budget caps what is saved.
        b.set_rate(32);
        assert!((b.tokens() - 8_000.0).abs() < 1e-9);
    }
}
