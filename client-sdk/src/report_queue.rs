//! The queue of quality reports waiting for the control plane's acknowledgement, and
//! the counters a session's reports count from ([`Baseline`]). Pure data: building the
//! reports and sending them is [`crate::report`]'s concern.

use std::collections::VecDeque;

use starling_proto::v1::ViewerReport;

use crate::stats::Stats;

/// Most reports sent in one call.
const BATCH: usize = 32;

/// The counters a session's reports start from (a re-join starts a new session).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Baseline {
    pub bytes_from_server: u64,
    pub bytes_from_peers: u64,
    pub bytes_uploaded: u64,
    pub stalls: u64,
    pub stall_ms: u64,
    pub parent_changes: u64,
    pub chunks_played: u64,
    pub chunks_skipped: u64,
}

impl Baseline {
    pub(crate) fn of(s: &Stats) -> Baseline {
        Baseline {
            bytes_from_server: s.bytes_from_server,
            bytes_from_peers: s.bytes_from_peers,
            bytes_uploaded: s.bytes_uploaded,
            stalls: s.stalls,
            stall_ms: u64::try_from(s.stall_time.as_millis()).unwrap_or(u64::MAX),
            parent_changes: s.parent_changes,
            chunks_played: s.chunks_played,
            chunks_skipped: s.chunks_skipped,
        }
    }
}

/// Reports waiting to be sent, each with its session.
#[derive(Debug)]
pub(crate) struct ReportQueue {
    queue: VecDeque<(String, ViewerReport)>,
    cap: usize,
    /// The session `next_seq` counts for.
    session: String,
    next_seq: u64,
    /// The control plane does not implement `Report`: nothing is queued any more.
    disabled: bool,
}

impl ReportQueue {
    pub(crate) fn new(cap: usize) -> ReportQueue {
        ReportQueue {
            queue: VecDeque::new(),
            cap: cap.max(1),
            session: String::new(),
            next_seq: 1,
            disabled: false,
        }
    }

    /// Appends a report; returns how many old ones were dropped to make room.
    pub(crate) fn push(&mut self, session: &str, mut r: ViewerReport) -> u64 {
        if self.disabled {
            return 0;
        }
        if self.session != session {
            self.session = session.to_string();
            self.next_seq = 1;
        }
        r.report_seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back((session.to_string(), r));
        let mut dropped = 0;
        while self.queue.len() > self.cap {
            self.queue.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// The oldest reports of the oldest session, up to [`BATCH`].
    pub(crate) fn batch(&self) -> Option<(String, Vec<ViewerReport>)> {
        let (session, _) = self.queue.front()?;
        let reports = self
            .queue
            .iter()
            .take_while(|(s, _)| s == session)
            .take(BATCH)
            .map(|(_, r)| *r)
            .collect();
        Some((session.clone(), reports))
    }

    /// Removes `session`'s reports up to `acked`; returns how many.
    pub(crate) fn ack(&mut self, session: &str, acked: u64) -> u64 {
        let before = self.queue.len();
        self.queue
            .retain(|(s, r)| !(s == session && r.report_seq <= acked));
        (before - self.queue.len()) as u64
    }

    /// The control plane does not implement `Report`: drops what is queued and queues
    /// nothing any more.
    pub(crate) fn disable(&mut self) {
        self.disabled = true;
        self.queue.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queue_numbers_bounds_and_acks() {
        let mut q = ReportQueue::new(3);
        for _ in 0..4 {
            q.push("s1", ViewerReport::default());
        }
        assert_eq!(q.len(), 3);
        let (s, b) = q.batch().unwrap();
        assert_eq!(s, "s1");
        assert_eq!(
            b.iter().map(|r| r.report_seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(q.ack("s1", 3), 2);
        // A new session numbers from 1 again; batches never mix sessions.
        q.push("s2", ViewerReport::default());
        let (s, b) = q.batch().unwrap();
        assert_eq!((s.as_str(), b.len()), ("s1", 1));
        q.ack("s1", 4);
        let (s, b) = q.batch().unwrap();
        assert_eq!((s.as_str(), b[0].report_seq), ("s2", 1));
    }

    #[test]
    fn unacknowledged_reports_stay_until_acked() {
        let mut q = ReportQueue::new(8);
        for _ in 0..3 {
            q.push("s1", ViewerReport::default());
        }
        // The control plane has committed only up to 1 (or nothing: ack 0).
        assert_eq!(q.ack("s1", 0), 0);
        assert_eq!(q.ack("s1", 1), 1);
        // The rest is sent again, in order, together with what is queued later.
        q.push("s1", ViewerReport::default());
        let (_, b) = q.batch().unwrap();
        assert_eq!(
            b.iter().map(|r| r.report_seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(q.ack("s1", 4), 3);
        assert!(q.batch().is_none());
    }
}
