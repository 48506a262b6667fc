//! Upload pacing and budget: the token bucket for pushes and serves, sending a held
//! chunk, and lowering the budget (and child slots) to what the uplink drains.

use std::sync::atomic::Ordering;
use std::time::Instant;

use starling_proto::wire::{self, ErrorCode, Frame};

use super::link::{LinkId, Out, QueueError, reason};
use super::{Engine, Kind, popcount};
use crate::error::SdkError;

/// Upload pacing: a token bucket of bytes holding up to `BURST_S` of the budget.
///
/// Pushes are the child slots the control plane sized to the budget, so they stay within
/// it on average; but a chunk goes to every child of its substream at once, so a push may
/// overdraw the bucket by up to `PUSH_DEBT_S` of budget, repaid before any serve. Serves
/// (mesh repair) spend only what pushes leave. (Dropping pushes at an empty bucket
/// instead starved children, whose repairs then drained their neighbours' buckets in
/// turn: 35 % of pushes were dropped with 1 s chunks.)
#[derive(Debug, Clone, Copy)]
pub(super) struct UploadBucket {
    tokens: f64,
    rate_bytes: f64,
}

impl UploadBucket {
    pub(super) const BURST_S: f64 = 2.0;
    pub(super) const PUSH_DEBT_S: f64 = 2.0;

    /// Starts empty: a peer's uplink gives nothing before its budget accrues (a full
    /// bucket at the start would let every peer upload 2 s beyond its budget, which a
    /// short load test would count as upload the budgets do not have).
    pub(super) fn new(kbps: u32) -> UploadBucket {
        let rate_bytes = f64::from(kbps) * 1000.0 / 8.0;
        UploadBucket {
            tokens: 0.0,
            rate_bytes,
        }
    }

    pub(super) fn set_rate(&mut self, kbps: u32) {
        self.rate_bytes = f64::from(kbps) * 1000.0 / 8.0;
        self.tokens = self.tokens.min(self.rate_bytes * Self::BURST_S);
    }

    pub(super) fn refill(&mut self, dt_s: f64) {
        self.tokens = (self.tokens + dt_s * self.rate_bytes).min(self.rate_bytes * Self::BURST_S);
    }

    /// May a chunk of `len` bytes go out now (a push to a child, or a serve)?
    pub(super) fn allows(&self, push: bool, len: f64) -> bool {
        if push {
            self.tokens > -self.rate_bytes * Self::PUSH_DEBT_S
        } else {
            self.tokens >= len
        }
    }

    pub(super) fn spend(&mut self, len: f64) {
        self.tokens -= len;
    }
}

impl Engine {
    pub(super) fn refill(&mut self) {
        let t = Instant::now();
        let dt = t.saturating_duration_since(self.last_refill).as_secs_f64();
        self.last_refill = t;
        self.bucket.refill(dt);
    }

    /// Sends a held chunk to a child (push) or a requester (serve).
    pub(super) fn upload(&mut self, to: LinkId, seq: u64, push: bool) {
        let Some(c) = self.store.get(&seq).cloned() else {
            if !push {
                self.send_to(to, &Frame::NotFound(seq));
            }
            return;
        };
        // The budget is spent in the bytes sent: the chunk's frame with its signature.
        let payload_len = c.payload.len() as u64;
        let len = wire::chunk_frame_len(c.signature.len(), c.payload.len()) as f64;
        let Some(link) = self.links.get_mut(&to) else {
            return;
        };
        // Pushes are paced per child (each its share of the budget, so the skips of a
        // partly covered slot fall evenly on the children); serves spend only what
        // pushes leave of the whole budget.
        let allowed = if push {
            let now = self.epoch.elapsed();
            link.pace.allow(
                self.bucket.rate_bytes,
                popcount(link.mask),
                self.used_slots,
                len,
                now,
            )
        } else {
            self.bucket.allows(false, len)
        };
        if !allowed {
            // Over the upload budget: answers become NOT_FOUND (the requester tries
            // elsewhere); a push is skipped with a NOT_FOUND in its place, so that the
            // child repairs it at once and does not take this parent for a silent one
            // (a partly covered slot, see `starling_grid::slots_for`, is carried this way).
            self.send_to(to, &Frame::NotFound(seq));
            return;
        }
        let Some(h) = &link.handle else {
            return;
        };
        match h.send(Out::Chunk(c)) {
            Ok(()) => {
                self.bucket.spend(len);
                let mut st = self.shared.stats_mut();
                st.bytes_uploaded += payload_len;
                st.wire_bytes_uploaded += len as u64;
            }
            Err(QueueError::Full) if push => {
                tracing::info!(to, "child too slow: closing its link");
                self.drop_link(
                    to,
                    Some(Frame::Goodbye(reason(ErrorCode::TooSlow, "child too slow"))),
                    None,
                );
            }
            Err(QueueError::Full) => {}
            Err(QueueError::Closed) => {
                self.drop_link(to, None, Some(SdkError::Closed));
            }
        }
    }

    /// Feeds the upload estimator: drained relay bytes, and whether every child link
    /// has data queued now (the uplink, not one child, is then what limits us).
    pub(super) fn sample_upload(&mut self) {
        let mut children = 0usize;
        let mut all_queued = true;
        for l in self.links.values() {
            if l.kind == Kind::In && l.mask != 0 {
                children += 1;
                if l.handle.as_ref().is_none_or(|h| h.queued() == 0) {
                    all_queued = false;
                }
            }
        }
        let now = self.epoch.elapsed();
        let drained = self.drained.load(Ordering::Relaxed);
        let Some(est) = self.estimator.as_mut() else {
            return;
        };
        let lowered = est.sample(now, drained, children > 0 && all_queued);
        let estimate = est.estimate_kbps();
        self.shared.stats_mut().upload_estimate_kbps = estimate;
        if let Some(kbps) = lowered {
            self.lower_budget(kbps, estimate);
        }
    }

    /// Child slots a budget buys, as the control plane counts them
    /// ([`starling_grid::slots_for`]); proportionally to the current slots when the stream rate
    /// is unknown.
    pub(super) fn slots_for(&self, kbps: u32) -> u32 {
        if self.stream_kbps > 0 {
            starling_grid::slots_for(kbps, self.stream_kbps, self.k)
        } else if self.budget_kbps > 0 {
            let v = u64::from(self.child_slots) * u64::from(kbps) / u64::from(self.budget_kbps);
            u32::try_from(v).unwrap_or(u32::MAX)
        } else {
            0
        }
    }

    /// The uplink drains less than the budget: pace to the new budget, offer it on a
    /// re-join, and close the children beyond the slots it buys (newest first) with
    /// `GOODBYE(SERVER_BUSY)`, so they re-search a parent.
    pub(super) fn lower_budget(&mut self, kbps: u32, estimate: Option<u32>) {
        let slots = self.slots_for(kbps).min(self.child_slots);
        tracing::info!(
            old_kbps = self.budget_kbps,
            kbps,
            ?estimate,
            old_slots = self.child_slots,
            slots,
            "uplink drains less than the relay budget: budget lowered"
        );
        self.budget_kbps = kbps;
        self.bucket.set_rate(kbps);
        self.offer.upload_kbps = kbps;
        self.child_slots = slots;
        self.shared.stats_mut().upload_budget_kbps = kbps;
        if self.used_slots <= self.child_slots {
            return;
        }
        let mut children: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.kind == Kind::In && l.mask != 0)
            .map(|(&id, _)| id)
            .collect();
        children.sort_unstable_by(|a, b| b.cmp(a));
        for l in children {
            if self.used_slots <= self.child_slots {
                break;
            }
            tracing::info!(l, peer = ?self.peer_id_of(l), "closing a child: upload budget lowered");
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(
                    ErrorCode::ServerBusy,
                    "upload budget lowered",
                ))),
                None,
            );
        }
        self.count_links();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
        assert!((b.tokens - 16_000.0).abs() < 1e-9);
        // A lowered budget caps what is saved.
        b.set_rate(32);
        assert!((b.tokens - 8_000.0).abs() < 1e-9);
    }
}
