//! Sans-IO reorder buffer: chunks in (any order, duplicates allowed), chunks out in
//! sequence order exactly once, with explicit discontinuities when a gap is given up.
//!
//! Used on the direct path (one data-plane connection: in order, except for the overlap
//! after a reconnect); in the peer grid, the [`starling_grid::peer::PeerScheduler`]'s play-out
//! orders chunks from several sources instead. The buffer holds at most [`ReorderConfig::window`] chunks ahead of the next
//! expected sequence number; a gap is given up when a later chunk has waited
//! [`ReorderConfig::gap_timeout`], when a chunk arrives too far ahead to fit in the
//! window, or when the server marks a chunk `DISCONTINUITY`. No clock is read here:
//! every input carries `now`, so behaviour is deterministic and testable.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use starling_proto::wire::{Chunk, chunk_flags};

/// Reorder buffer parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReorderConfig {
    /// How many sequence numbers ahead of the next expected one may be held. A chunk
    /// at `next + window` or beyond forces the oldest gaps to be skipped.
    pub window: u64,
    /// How long a later chunk may wait for a missing earlier one before the gap is
    /// skipped.
    pub gap_timeout: Duration,
}

impl Default for ReorderConfig {
    fn default() -> Self {
        ReorderConfig {
            window: 64,
            gap_timeout: Duration::from_secs(2),
        }
    }
}

/// Why a discontinuity happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A later chunk waited longer than the gap timeout.
    Timeout,
    /// A chunk arrived beyond the window; the oldest gaps were given up to make room.
    Overflow,
    /// The server flagged a chunk `DISCONTINUITY` (it skipped chunks itself, or its
    /// numbering restarted).
    Server,
}

/// What the buffer hands out, in play order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The next chunk to play.
    Chunk(Chunk),
    /// The stream does not continue at `expected`: it continues at `resumed_at`
    /// (greater for a gap, smaller when the server's numbering restarted). Chunks in
    /// between will never be output.
    Discontinuity {
        expected: u64,
        resumed_at: u64,
        reason: SkipReason,
    },
}

/// What happened to a pushed chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Stored (or output at once).
    Accepted,
    /// Already held: dropped.
    Duplicate,
    /// Older than the next expected sequence (already played or skipped): dropped.
    Stale,
}

/// The reorder buffer. See the module documentation.
#[derive(Debug)]
pub struct ReorderBuffer {
    cfg: ReorderConfig,
    next: Option<u64>,
    pending: BTreeMap<u64, (Chunk, Instant)>,
    out: VecDeque<Output>,
}

impl ReorderBuffer {
    /// A buffer whose first output will be the first chunk pushed (or the sequence
    /// given to [`ReorderBuffer::reset`]).
    pub fn new(cfg: ReorderConfig) -> Self {
        ReorderBuffer {
            cfg: ReorderConfig {
                window: cfg.window.max(1),
                gap_timeout: cfg.gap_timeout,
            },
            next: None,
            pending: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }

    /// A buffer that expects `seq` first.
    pub fn starting_at(cfg: ReorderConfig, seq: u64) -> Self {
        let mut b = ReorderBuffer::new(cfg);
        b.next = Some(seq);
        b
    }

    /// The next sequence number to output (the first missing one), if known. This is
    /// where a resumed subscription should start.
    pub fn next_expected(&self) -> Option<u64> {
        self.next
    }

    /// Number of chunks held, waiting for an earlier one.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Forget everything held and expect `seq` next (nothing is output).
    pub fn reset(&mut self, seq: u64) {
        self.pending.clear();
        self.next = Some(seq);
    }

    /// Offers one chunk received at `now`.
    pub fn push(&mut self, chunk: Chunk, now: Instant) -> PushOutcome {
        let seq = chunk.seq;
        let next = match self.next {
            Some(n) => n,
            None => {
                self.next = Some(seq);
                seq
            }
        };
        if chunk.flags & chunk_flags::DISCONTINUITY != 0 && seq != next {
            if seq < next {
                // The server's numbering went backwards (e.g. a restarted node): what
                // we hold belongs to the old numbering.
                self.pending.clear();
                self.skip_to(seq, SkipReason::Server);
            } else if !self.pending.contains_key(&seq) {
                // The server jumped: nothing before `seq` will come from it.
                self.advance_to(seq, SkipReason::Server);
            }
        }
        let next = self.next.unwrap_or(seq);
        if seq < next {
            return PushOutcome::Stale;
        }
        if self.pending.contains_key(&seq) {
            return PushOutcome::Duplicate;
        }
        if seq - next >= self.cfg.window {
            let min_next = seq - (self.cfg.window - 1);
            self.advance_to(min_next, SkipReason::Overflow);
        }
        self.pending.insert(seq, (chunk, now));
        self.drain_ready();
        PushOutcome::Accepted
    }

    /// Nothing before `seq` will arrive (the source cannot serve it): outputs held
    /// chunks below `seq` in order, with a discontinuity for each hole.
    pub fn skip_before(&mut self, seq: u64) {
        if self.next.is_none() {
            self.next = Some(seq);
            return;
        }
        self.advance_to(seq, SkipReason::Server);
        self.drain_ready();
    }

    /// Gives up gaps whose deadline passed at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(deadline) = self.deadline() {
            if now < deadline {
                break;
            }
            let Some((&first, _)) = self.pending.iter().next() else {
                break;
            };
            self.skip_to(first, SkipReason::Timeout);
            self.drain_ready();
        }
    }

    /// When [`ReorderBuffer::handle_timeout`] next has something to do, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|(_, at)| *at)
            .min()
            .map(|at| at + self.cfg.gap_timeout)
    }

    /// Takes the next output, in play order.
    pub fn pop(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn skip_to(&mut self, seq: u64, reason: SkipReason) {
        if let Some(expected) = self.next
            && expected != seq
        {
            self.out.push_back(Output::Discontinuity {
                expected,
                resumed_at: seq,
                reason,
            });
        }
        self.next = Some(seq);
    }

    /// Moves `next` forward to at least `target`, outputting held chunks below it in
    /// order and a discontinuity for every hole.
    fn advance_to(&mut self, target: u64, reason: SkipReason) {
        loop {
            let Some(next) = self.next else { return };
            if next >= target {
                return;
            }
            match self.pending.iter().next().map(|(s, _)| *s) {
                Some(first) if first < target => {
                    if first != next {
                        self.skip_to(first, reason);
                    }
                    self.drain_ready();
                }
                _ => {
                    self.skip_to(target, reason);
                    return;
                }
            }
        }
    }

    fn drain_ready(&mut self) {
        while let Some(next) = self.next {
            match self.pending.first_key_value() {
                Some((&s, _)) if s == next => {
                    if let Some((_, (chunk, _))) = self.pending.pop_first() {
                        self.out.push_back(Output::Chunk(chunk));
                    }
                    match next.checked_add(1) {
                        Some(n) => self.next = Some(n),
                        None => {
                            // u64 exhausted: nothing can follow.
                            self.pending.clear();
                            return;
                        }
                    }
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn chunk(seq: u64) -> Chunk {
        Chunk {
            seq,
            flags: 0,
            timestamp_ms: 0,
            duration_ms: 1000,
            signature: Bytes::new(),
            payload: Bytes::from(seq.to_be_bytes().to_vec()),
        }
    }

    fn flagged(seq: u64, flags: u8) -> Chunk {
        Chunk {
            flags,
            ..chunk(seq)
        }
    }

    fn cfg(window: u64, gap_ms: u64) -> ReorderConfig {
        ReorderConfig {
            window,
            gap_timeout: Duration::from_millis(gap_ms),
        }
    }

    fn drain(b: &mut ReorderBuffer) -> Vec<Output> {
        std::iter::from_fn(|| b.pop()).collect()
    }

    fn seqs(out: &[Output]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Output::Chunk(c) => Some(c.seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn in_order_passes_straight_through() {
        let t = Instant::now();
        let mut b = ReorderBuffer::new(cfg(8, 100));
        for s in 10..20 {
            assert_eq!(b.push(chunk(s), t), PushOutcome::Accepted);
        }
        assert_eq!(seqs(&drain(&mut b)), (10..20).collect::<Vec<_>>());
        assert_eq!(b.next_expected(), Some(20));
        assert_eq!(b.pending_len(), 0);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn out_of_order_is_reordered_and_duplicates_dropped() {
        let t = Instant::now();
        let mut b = ReorderBuffer::starting_at(cfg(8, 100), 0);
        assert_eq!(b.push(chunk(2), t), PushOutcome::Accepted);
        assert_eq!(b.push(chunk(1), t), PushOutcome::Accepted);
        assert_eq!(b.push(chunk(2), t), PushOutcome::Duplicate);
        assert!(drain(&mut b).is_empty());
        assert_eq!(b.push(chunk(0), t), PushOutcome::Accepted);
        assert_eq!(seqs(&drain(&mut b)), vec![0, 1, 2]);
        assert_eq!(b.push(chunk(1), t), PushOutcome::Stale);
        assert!(drain(&mut b).is_empty());
    }

    #[test]
    fn gap_is_skipped_after_timeout_only() {
        let t0 = Instant::now();
        let mut b = ReorderBuffer::starting_at(cfg(8, 100), 0);
        b.push(chunk(0), t0);
        b.push(chunk(2), t0 + Duration::from_millis(10));
        b.push(chunk(3), t0 + Duration::from_millis(20));
        assert_eq!(seqs(&drain(&mut b)), vec![0]);
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(110)));
        b.handle_timeout(t0 + Duration::from_millis(109));
        assert!(drain(&mut b).is_empty());
        b.handle_timeout(t0 + Duration::from_millis(110));
        let out = drain(&mut b);
        assert_eq!(
            out[0],
            Output::Discontinuity {
                expected: 1,
                resumed_at: 2,
                reason: SkipReason::Timeout
            }
        );
        assert_eq!(seqs(&out), vec![2, 3]);
        // The skipped chunk arriving late is stale.
        assert_eq!(b.push(chunk(1), t0), PushOutcome::Stale);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn second_gap_gets_deadline_from_its_own_chunks() {
        let t0 = Instant::now();
        let mut b = ReorderBuffer::starting_at(cfg(16, 100), 0);
        b.push(chunk(1), t0);
        b.push(chunk(3), t0 + Duration::from_millis(50));
        b.handle_timeout(t0 + Duration::from_millis(100));
        assert_eq!(seqs(&drain(&mut b)), vec![1]);
        assert_eq!(b.next_expected(), Some(2));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(150)));
        b.handle_timeout(t0 + Duration::from_millis(150));
        assert_eq!(seqs(&drain(&mut b)), vec![3]);
    }

    #[test]
    fn overflow_skips_oldest_gaps() {
        let t = Instant::now();
        let mut b = ReorderBuffer::starting_at(cfg(4, 1000), 0);
        b.push(chunk(2), t);
        // 0 and 1 missing; 7 needs next >= 4.
        b.push(chunk(7), t);
        let out = drain(&mut b);
        assert_eq!(
            out,
            vec![
                Output::Discontinuity {
                    expected: 0,
                    resumed_at: 2,
                    reason: SkipReason::Overflow
                },
                Output::Chunk(chunk(2)),
                Output::Discontinuity {
                    expected: 3,
                    resumed_at: 4,
                    reason: SkipReason::Overflow
                },
            ]
        );
        assert_eq!(b.next_expected(), Some(4));
        assert_eq!(b.pending_len(), 1);
    }

    #[test]
    fn server_discontinuity_jumps_forward_and_backward() {
        let t = Instant::now();
        let mut b = ReorderBuffer::starting_at(cfg(8, 1000), 5);
        b.push(chunk(5), t);
        b.push(
            flagged(40, chunk_flags::DISCONTINUITY | chunk_flags::RANDOM_ACCESS),
            t,
        );
        let out = drain(&mut b);
        assert_eq!(seqs(&out), vec![5, 40]);
        assert_eq!(
            out[1],
            Output::Discontinuity {
                expected: 6,
                resumed_at: 40,
                reason: SkipReason::Server
            }
        );
        // Numbering restarted on the server.
        b.push(chunk(43), t);
        b.push(flagged(0, chunk_flags::DISCONTINUITY), t);
        let out = drain(&mut b);
        assert_eq!(seqs(&out), vec![0]);
        assert_eq!(b.pending_len(), 0);
        // A flagged chunk that is exactly the next one is no discontinuity.
        b.push(flagged(1, chunk_flags::DISCONTINUITY), t);
        assert_eq!(seqs(&drain(&mut b)), vec![1]);
    }

    #[test]
    fn first_chunk_defines_start_and_reset_works() {
        let t = Instant::now();
        let mut b = ReorderBuffer::new(ReorderConfig::default());
        assert_eq!(b.next_expected(), None);
        b.push(chunk(100), t);
        assert_eq!(b.next_expected(), Some(101));
        b.push(chunk(105), t);
        b.reset(200);
        assert_eq!(b.pending_len(), 0);
        b.push(chunk(200), t);
        assert_eq!(seqs(&drain(&mut b)), vec![100, 200]);
    }

    #[test]
    fn no_overflow_at_u64_max() {
        let t = Instant::now();
        let mut b = ReorderBuffer::starting_at(cfg(4, 10), u64::MAX - 1);
        b.push(chunk(u64::MAX), t);
        b.push(chunk(u64::MAX - 1), t);
        assert_eq!(seqs(&drain(&mut b)), vec![u64::MAX - 1, u64::MAX]);
    }

    /// A shuffle of `0..n` with some indices repeated.
    fn shuffled_with_dups(max_n: u64) -> impl Strategy<Value = (u64, Vec<u64>)> {
        (1..=max_n).prop_flat_map(|n| {
            let base: Vec<u64> = (0..n).collect();
            (
                Just(n),
                proptest::collection::vec(0..n, 0..(n as usize * 2)),
                Just(base).prop_shuffle(),
            )
                .prop_flat_map(|(n, dups, perm)| {
                    let mut all = perm;
                    all.extend(dups);
                    (Just(n), Just(all).prop_shuffle())
                })
        })
    }

    proptest! {
        #[test]
        fn any_permutation_with_duplicates_within_window_comes_out_once_in_order(
            window in 1u64..48,
            start in prop_oneof![0u64..1000, (u64::MAX - 200)..(u64::MAX - 100)],
            (n, order) in shuffled_with_dups(48),
        ) {
            let n = n.min(window);
            let order: Vec<u64> = order.into_iter().filter(|i| *i < n).collect();
            let t = Instant::now();
            let mut b = ReorderBuffer::starting_at(cfg(window, 1000), start);
            let mut out = Vec::new();
            for i in order {
                b.push(chunk(start + i), t);
                out.extend(drain(&mut b));
                prop_assert!(b.pending_len() as u64 <= window);
            }
            // Any missing index was filtered away with `i < n`: make sure all are there.
            let expected: Vec<u64> = (start..start + n).collect();
            prop_assert!(out.iter().all(|o| matches!(o, Output::Chunk(_))), "unexpected discontinuity: {:?}", out);
            prop_assert_eq!(seqs(&out), expected);
            prop_assert_eq!(b.pending_len(), 0);
        }

        #[test]
        fn arbitrary_input_output_is_strictly_increasing_and_bounded(
            window in 1u64..32,
            events in proptest::collection::vec((0u64..200, 0u64..50, any::<bool>()), 0..300),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = ReorderBuffer::starting_at(cfg(window, 100), 0);
            let mut last: Option<u64> = None;
            let mut out = Vec::new();
            for (seq, dt, tick) in events {
                now += Duration::from_millis(dt);
                if tick { b.handle_timeout(now); } else { b.push(chunk(seq), now); }
                prop_assert!(b.pending_len() as u64 <= window);
                out.extend(drain(&mut b));
            }
            b.handle_timeout(now + Duration::from_secs(3600));
            out.extend(drain(&mut b));
            prop_assert_eq!(b.pending_len(), 0);
            let mut expected_next = 0u64;
            for o in out {
                match o {
                    Output::Chunk(c) => {
                        prop_assert!(last.is_none_or(|l| c.seq > l));
                        prop_assert_eq!(c.seq, expected_next);
                        last = Some(c.seq);
                        expected_next = c.seq + 1;
                    }
                    Output::Discontinuity { expected, resumed_at, .. } => {
                        prop_assert_eq!(expected, expected_next);
                        prop_assert!(resumed_at > expected);
                        expected_next = resumed_at;
                    }
                }
            }
        }
    }
}
