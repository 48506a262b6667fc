//! Quality reports (`ViewerService.Report`): what this viewer experienced, every
//! report interval and once more (`final`) on leave.
//!
//! Reports are built from [`crate::Stats`] into a bounded queue and sent by their own
//! task, so a slow or absent control plane never touches the chunk path. A report stays
//! queued until the control plane acknowledges it: `acked_seq` is the highest
//! `report_seq` it has **committed** (the call answers after the commit), so a crash of
//! the control plane loses nothing this queue has let go. Unacknowledged reports are
//! sent again with the next tick (oldest dropped and counted once the queue is full),
//! and on `leave` after the final one; the control plane ignores a `report_seq` it
//! already has, so retries are idempotent.

use std::sync::Arc;
use std::time::Duration;

use starling_proto::v1::ViewerReport;

use crate::control::Control;
use crate::error::SdkError;
use crate::rights::unix_ms;
use crate::shared::{Shared, stopped};

/// Limit of one `Report` call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Builds a report from the current counters and queues it.
pub(crate) fn enqueue(shared: &Shared, final_report: bool) {
    let Some((session, baseline)) = shared.session_for_report() else {
        return;
    };
    let (report, dropped) = {
        let mut st = shared.stats_mut();
        let sub = |a: u64, b: u64| a.saturating_sub(b);
        let r = ViewerReport {
            report_seq: 0,
            at_unix_ms: i64::try_from(unix_ms()).unwrap_or(i64::MAX),
            bytes_from_server: sub(st.bytes_from_server, baseline.bytes_from_server),
            bytes_from_peers: sub(st.bytes_from_peers, baseline.bytes_from_peers),
            bytes_uploaded: sub(st.bytes_uploaded, baseline.bytes_uploaded),
            startup_ms: st.startup_time.map_or(0, |d| {
                u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
            }),
            stalls: u32::try_from(sub(st.stalls, baseline.stalls)).unwrap_or(u32::MAX),
            stall_ms: sub(
                u64::try_from(st.stall_time.as_millis()).unwrap_or(u64::MAX),
                baseline.stall_ms,
            ),
            lag_ms: st
                .lag
                .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
            buffer_ms: u32::try_from(st.buffer.as_millis()).unwrap_or(u32::MAX),
            parent_changes: u32::try_from(sub(st.parent_changes, baseline.parent_changes))
                .unwrap_or(u32::MAX),
            peers: u32::try_from(st.peer_links).unwrap_or(u32::MAX),
            r#final: final_report,
            chunks_played: sub(st.chunks_played, baseline.chunks_played),
            chunks_skipped: sub(st.chunks_skipped, baseline.chunks_skipped),
        };
        let dropped = shared.reports().push(&session, r);
        st.reports_dropped += dropped;
        (r, dropped)
    };
    if dropped > 0 {
        tracing::warn!(dropped, "report queue full: oldest reports dropped");
    }
    tracing::trace!(?report, "report queued");
}

/// Sends queued reports until the queue is empty or a call fails. Returns false when a
/// call failed (the reports stay queued).
pub(crate) async fn flush(control: &Control, shared: &Shared) -> bool {
    loop {
        let Some((session, reports)) = shared.reports().batch() else {
            return true;
        };
        let first = reports.first().map_or(0, |r| r.report_seq);
        match tokio::time::timeout(CALL_TIMEOUT, control.report(&session, reports)).await {
            Ok(Ok(acked)) => {
                let n = shared.reports().ack(&session, acked);
                shared.stats_mut().reports_sent += n;
                if acked < first {
                    // Nothing of this batch is held yet: try again next time.
                    return false;
                }
            }
            Ok(Err(SdkError::ControlRejected {
                code: tonic::Code::Unimplemented,
                ..
            })) => {
                tracing::info!("control plane does not take reports: not reporting");
                shared.reports().disable();
                return true;
            }
            Ok(Err(e)) => {
                tracing::debug!("report failed (kept for retry): {e}");
                return false;
            }
            Err(_) => {
                tracing::debug!("report timed out (kept for retry)");
                return false;
            }
        }
    }
}

/// Queues a report every `interval` and sends what is queued.
pub(crate) async fn report_loop(control: Control, shared: Arc<Shared>, interval: Duration) {
    let mut stop = shared.stop_signal();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => {}
        }
        enqueue(&shared, false);
        // A flush in flight is not abandoned on stop: the control plane may already
        // have taken its reports, and `leave`'s final flush would send them again.
        // `leave` waits up to 2 s for this task (a call ends within CALL_TIMEOUT; a
        // control plane slower than that may see a report twice, which it ignores).
        flush(&control, &shared).await;
    }
}
