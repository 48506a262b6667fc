//! [`DeliveryWindow`]: what a substream's parent did with the last chunks it owed.
//!
//! Strikes in a row (four announced skips, three late chunks) miss a parent that fails
//! every other push forever. The window counts, over the last
//! [`SchedulerConfig::parent_window`](super::SchedulerConfig::parent_window) chunks of
//! the substream that became available after the parent was assigned, those it
//! skipped (`NOT_FOUND` in the push's place), delivered late while the chunk could be
//! had elsewhere, or never sent at all (a later chunk of the substream came first).
//! Sans-IO: outcomes in, a count out.

/// The outcomes of the last (up to 64) chunks owed on one substream, newest in bit 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeliveryWindow {
    /// Bit i set: the i-th newest owed chunk was missed (skipped, late or never sent).
    bits: u64,
    /// Outcomes recorded (saturating at 64).
    len: u32,
    /// The newest sequence number recorded.
    upto: Option<u64>,
}

impl DeliveryWindow {
    /// Records the outcome for chunk `seq` of a substream with `k` substreams; chunks
    /// of the substream between the previous one recorded and `seq` were never sent
    /// (neither pushed nor announced as skipped) and count as missed. An outcome for a
    /// chunk at or before the newest recorded is ignored (a parent cannot take back a
    /// skip by sending the chunk after all, nor count twice by repeating a notice).
    pub(crate) fn record(&mut self, seq: u64, missed: bool, k: u64) {
        if self.upto.is_some_and(|u| seq <= u) {
            return;
        }
        if let Some(u) = self.upto {
            let never_sent = ((seq - u) / k.max(1)).saturating_sub(1).min(64);
            for _ in 0..never_sent {
                self.push(true);
            }
        }
        self.upto = Some(seq);
        self.push(missed);
    }

    fn push(&mut self, missed: bool) {
        self.bits = (self.bits << 1) | u64::from(missed);
        self.len = (self.len + 1).min(64);
    }

    /// Missed chunks among the last `window` (at most 64) outcomes, if that many were
    /// recorded (`None` before: a new parent is not judged on a few chunks).
    pub(crate) fn missed(&self, window: u32) -> Option<u32> {
        let window = window.clamp(1, 64);
        if self.len < window {
            return None;
        }
        let mask = if window == 64 {
            u64::MAX
        } else {
            (1u64 << window) - 1
        };
        Some((self.bits & mask).count_ones())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_skips_late_and_never_sent_over_the_window() {
        let mut w = DeliveryWindow::default();
        // Substream 1 of 4: chunks 1, 5, 9, ...
        for i in 0..31u64 {
            w.record(1 + 4 * i, i % 2 == 1, 4);
        }
        assert_eq!(w.missed(32), None, "not judged before the window is full");
        w.record(1 + 4 * 31, true, 4);
        assert_eq!(w.missed(32), Some(16));
        // A repeated or older notice changes nothing.
        w.record(1 + 4 * 31, true, 4);
        w.record(5, true, 4);
        assert_eq!(w.missed(32), Some(16));
        // Three chunks never sent, then one delivered: four outcomes, three missed.
        let before = w;
        w.record(1 + 4 * 35, false, 4);
        assert_eq!(w.missed(4), Some(3));
        assert_eq!(w.missed(36), before.missed(32).map(|m| m + 3));
    }
}
