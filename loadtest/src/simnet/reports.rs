//! Quality reports of a simulated viewer (`ViewerService.Report`), by the SDK's rules
//! (`client-sdk`'s `report` and `report_queue`): every report interval (the one `Join`
//! names, else the SDK's 5 s) a report of the viewer's figures now is queued and the
//! queue is sent; one more (`final`) on leave. A report stays queued until the control
//! plane acknowledges it (`acked_seq`: the highest `report_seq` committed), is sent
//! again with the next tick, and the oldest are dropped (and counted) beyond
//! [`QUEUE`]. A control plane without `Report` (`UNIMPLEMENTED`) gets none.
//!
//! The figures come from the fabric ([`ViewerFigures`], written by the fabric's task as
//! its viewer receives, uploads and plays; read by the session task): the same
//! counters the SDK reports, taken from the grid node (start-up, stalls as runs of
//! skipped chunks, lag behind live, buffer, parent changes, peer links, chunks played
//! and skipped) and the payload bytes it received and sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{ReportRequest, ViewerReport};
use tokio::sync::Notify;
use tonic::transport::Channel;

use super::control::Ctx;

/// Most reports kept unacknowledged (the SDK's `report_queue` default).
pub const QUEUE: usize = 64;
/// Most reports in one call (the SDK's batch).
const BATCH: usize = 32;
/// Limit of one `Report` call (the SDK's).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Report interval when `Join` names none (the SDK's default).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest interval taken from `Join` (the SDK's floor).
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// One viewer's figures as its session reports them. Bytes are written as they move;
/// the rest by the fabric's once-a-second sampler and when the viewer leaves.
#[derive(Debug, Default)]
pub struct ViewerFigures {
    /// Payload bytes from the data plane.
    pub from_server: AtomicU64,
    /// Payload bytes from peers.
    pub from_peers: AtomicU64,
    /// Payload bytes uploaded.
    pub uploaded: AtomicU64,
    /// Join to first chunk played, ms (0 = nothing played yet).
    pub startup_ms: AtomicU64,
    /// Runs of chunks skipped at their play-out deadline.
    pub stalls: AtomicU64,
    /// Play-out time lost to skipped chunks, ms.
    pub stall_ms: AtomicU64,
    /// Lag behind live of the latest chunk played, ms.
    pub lag_ms: AtomicU64,
    /// Chunks held from the next one to play on, as play-out time, ms.
    pub buffer_ms: AtomicU64,
    /// Parent changes.
    pub parent_changes: AtomicU64,
    /// Peers linked now.
    pub peers: AtomicU64,
    /// Chunks played.
    pub chunks_played: AtomicU64,
    /// Chunks skipped.
    pub chunks_skipped: AtomicU64,
    /// Its data-plane connection met a chunk signed with a key id it does not hold: the
    /// session asks for the current key sets.
    pub key_refresh: Notify,
}

/// The report interval: `Join`'s (`report_interval_ms`), else the SDK's default.
pub fn interval(report_interval_ms: u32) -> Duration {
    match report_interval_ms {
        0 => DEFAULT_INTERVAL,
        ms => Duration::from_millis(u64::from(ms)).max(MIN_INTERVAL),
    }
}

fn u32_of(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// A viewer's reports waiting for the control plane's acknowledgement (one session:
/// a simulated viewer never re-joins).
#[derive(Debug)]
pub struct ReportQueue {
    queue: VecDeque<ViewerReport>,
    next_seq: u64,
    disabled: bool,
}

impl Default for ReportQueue {
    fn default() -> Self {
        ReportQueue {
            queue: VecDeque::new(),
            next_seq: 1,
            disabled: false,
        }
    }
}

impl ReportQueue {
    /// Queues a report of `f` now; returns how many old ones were dropped for room.
    pub fn enqueue(&mut self, f: &ViewerFigures, final_report: bool) -> u64 {
        if self.disabled {
            return 0;
        }
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = ViewerReport {
            report_seq: self.next_seq,
            at_unix_ms: i64::try_from(starling_proto::time::unix_ms()).unwrap_or(i64::MAX),
            bytes_from_server: get(&f.from_server),
            bytes_from_peers: get(&f.from_peers),
            bytes_uploaded: get(&f.uploaded),
            startup_ms: u32_of(get(&f.startup_ms)),
            stalls: u32_of(get(&f.stalls)),
            stall_ms: get(&f.stall_ms),
            lag_ms: u32_of(get(&f.lag_ms)),
            buffer_ms: u32_of(get(&f.buffer_ms)),
            parent_changes: u32_of(get(&f.parent_changes)),
            peers: u32_of(get(&f.peers)),
            r#final: final_report,
            chunks_played: get(&f.chunks_played),
            chunks_skipped: get(&f.chunks_skipped),
        };
        self.next_seq += 1;
        self.queue.push_back(r);
        let mut dropped = 0;
        while self.queue.len() > QUEUE {
            self.queue.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// Reports queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The oldest reports, up to [`BATCH`].
    fn batch(&self) -> Vec<ViewerReport> {
        self.queue.iter().take(BATCH).copied().collect()
    }

    /// Removes the reports up to `acked`; returns how many.
    pub fn ack(&mut self, acked: u64) -> u64 {
        let before = self.queue.len();
        self.queue.retain(|r| r.report_seq > acked);
        (before - self.queue.len()) as u64
    }

    /// Sends what is queued until the queue is empty or a call fails (the reports
    /// stay queued). `false` when a call failed.
    pub(super) async fn flush(
        &mut self,
        ctx: &Ctx,
        client: &mut ViewerServiceClient<Channel>,
        session_id: &str,
    ) -> bool {
        loop {
            let reports = self.batch();
            let Some(first) = reports.first().map(|r| r.report_seq) else {
                return true;
            };
            ctx.counters.report_calls.fetch_add(1, Ordering::Relaxed);
            let req = ReportRequest {
                session_id: session_id.to_owned(),
                reports,
            };
            match tokio::time::timeout(CALL_TIMEOUT, client.report(req)).await {
                Ok(Ok(r)) => {
                    let acked = r.into_inner().acked_seq;
                    let n = self.ack(acked);
                    ctx.counters.quality_reports.fetch_add(n, Ordering::Relaxed);
                    if acked < first {
                        // Nothing of this batch is held yet: again next time.
                        return false;
                    }
                }
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                    self.disabled = true;
                    self.queue.clear();
                    return true;
                }
                _ => {
                    ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_numbered_bounded_and_kept_until_acknowledged() {
        let f = ViewerFigures::default();
        f.from_peers.store(1000, Ordering::Relaxed);
        f.startup_ms.store(700, Ordering::Relaxed);
        let mut q = ReportQueue::default();
        for _ in 0..QUEUE + 3 {
            q.enqueue(&f, false);
        }
        assert_eq!(q.len(), QUEUE, "the oldest are dropped beyond the bound");
        let b = q.batch();
        assert_eq!(b.len(), BATCH);
        assert_eq!(b[0].report_seq, 4);
        assert_eq!((b[0].bytes_from_peers, b[0].startup_ms), (1000, 700));
        // The control plane holds nothing yet, then up to 10.
        assert_eq!(q.ack(0), 0);
        assert_eq!(q.ack(10), 7);
        assert_eq!(q.batch()[0].report_seq, 11);
        q.enqueue(&f, true);
        let last = q.queue.back().copied().unwrap_or_default();
        assert!(last.r#final);
        assert_eq!(last.report_seq, QUEUE as u64 + 4);
    }

    #[test]
    fn the_interval_is_joins_else_five_seconds() {
        assert_eq!(interval(0), Duration::from_secs(5));
        assert_eq!(interval(2000), Duration::from_secs(2));
        assert_eq!(interval(1), Duration::from_millis(100));
    }
}
