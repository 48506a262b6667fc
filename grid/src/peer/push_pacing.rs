//! [`ChildPace`]: one child's share of a relay's upload budget for pushes.
//!
//! A relay whose budget covers part of a slot (`wire::slots_for`: 3.2 slots buy 4
//! children) skips some pushes. With one bucket for all children the skips fell on
//! whichever child's chunk came when the bucket was lowest: in a steady cycle the same
//! children every time, up to every other push of theirs (40 % of two children's
//! pushes for 3.2 slots and 4 one-substream children), which a child cannot tell from a
//! parent that fails it on purpose. Each child therefore gets its own share of the
//! budget, in proportion to the substreams it takes (`rate × its substreams / all
//! children's substreams`), with the same burst and debt as the relay's bucket, so every
//! child loses the same fraction of its pushes, the uncovered fraction of the slots
//! (at most a fifth by the slot arithmetic), and no child two in a row while its
//! share allows one more second of debt. Sans-IO: the caller passes `now`.

use std::time::Duration;

/// Seconds of its share a child's credit may hold.
const BURST_S: f64 = 2.0;
/// Seconds of its share a push may overdraw (a chunk goes to all of a substream's
/// children at once).
const DEBT_S: f64 = 2.0;
/// One more second for a child whose previous push was skipped.
const OWED_S: f64 = 1.0;

/// The push pacing state of one child link.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChildPace {
    /// Bytes of credit (negative: debt).
    credit: f64,
    at: Option<Duration>,
    /// The last push was skipped.
    skipped_last: bool,
}

impl ChildPace {
    /// Whether a push of `len` bytes to this child may go out at `now`, given the
    /// relay's budget `rate_bytes` per second and the child's `subs` substreams out of
    /// `total_subs` subscribed by all children. Spends the credit when it may; else the
    /// push is skipped (announced with `NOT_FOUND` by the caller).
    pub fn allow(
        &mut self,
        rate_bytes: f64,
        subs: u32,
        total_subs: u32,
        len: f64,
        now: Duration,
    ) -> bool {
        let share = rate_bytes * f64::from(subs) / f64::from(total_subs.max(subs).max(1));
        if let Some(at) = self.at {
            let dt = now.saturating_sub(at).as_secs_f64();
            self.credit = (self.credit + dt * share).min(share * BURST_S);
        }
        self.at = Some(now);
        let floor = if self.skipped_last {
            -share * (DEBT_S + OWED_S)
        } else {
            -share * DEBT_S
        };
        if self.credit > floor {
            self.credit -= len;
            self.skipped_last = false;
            true
        } else {
            self.skipped_last = true;
            false
        }
    }

    /// The last push to this child was skipped.
    pub fn skipped_last(&self) -> bool {
        self.skipped_last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skips per child, after a warm-up, for children on one substream each of `k`,
    /// with a budget of `slots` slots.
    fn skips(k: u64, children: &[u64], slots: f64, chunks: u64) -> Vec<(u64, u64)> {
        let chunk_ms = 100u64;
        let len = 1000.0;
        // One slot carries one substream: len bytes every k chunks.
        let rate = slots * len / (k as f64 * chunk_ms as f64 / 1000.0);
        let mut pace = vec![ChildPace::default(); children.len()];
        let mut out = vec![(0u64, 0u64); children.len()];
        for seq in 0..chunks {
            let now = Duration::from_millis(seq * chunk_ms);
            for (i, &s) in children.iter().enumerate() {
                if seq % k == s {
                    let ok = pace[i].allow(rate, 1, children.len() as u32, len, now);
                    if seq >= chunks / 4 {
                        out[i].0 += 1;
                        out[i].1 += u64::from(!ok);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_partly_covered_slot_spreads_its_skips_evenly() {
        // 3.2 slots, 4 children on consecutive substreams: one bucket skipped two of
        // them 40 % of the time; each child now loses its fifth.
        for (pushes, skipped) in skips(8, &[0, 1, 2, 3], 3.2, 8000) {
            let ratio = skipped as f64 / pushes as f64;
            assert!((0.15..=0.25).contains(&ratio), "{skipped} of {pushes}");
        }
        // Enough budget: nothing skipped.
        for (_, skipped) in skips(8, &[0, 1, 2, 3], 4.0, 8000) {
            assert_eq!(skipped, 0);
        }
    }

    #[test]
    fn no_child_is_skipped_twice_in_a_row_while_the_debt_allows() {
        let mut p = ChildPace::default();
        let rate = 1000.0;
        let mut last_skipped = false;
        // Pushes of 750 bytes every 0.5 s against 1,000 bytes/s: a third must go.
        let mut skipped = 0;
        for i in 0..200u64 {
            let ok = p.allow(rate, 1, 1, 750.0, Duration::from_millis(i * 500));
            skipped += u32::from(!ok);
            assert!(ok || !last_skipped, "two skips in a row at push {i}");
            last_skipped = !ok;
        }
        assert!((50..=80).contains(&skipped), "{skipped}");
    }
}
