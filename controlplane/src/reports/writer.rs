//! The batch writer's handling of failures: a batch that fails because the database is
//! unavailable is retried whole with capped backoff; a batch the database *refuses*
//! (a data or constraint error, i.e. something in the rows) is bisected until each
//! refused row is alone, and that row is quarantined: counted in
//! `starling_cp_reports_quarantined_total`, logged and dropped, while every other row
//! commits. So a row the database will never take cannot hold up the queue.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::Reports;
use super::db::{self, ReportRow};
use crate::store::StoreError;

/// Capped exponential backoff between retries of a batch while the database is down.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
    failing: bool,
}

const FIRST: Duration = Duration::from_millis(100);

impl Backoff {
    pub(super) fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST,
            max: max.max(FIRST),
            failing: false,
        }
    }

    async fn wait(&mut self) {
        self.failing = true;
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// Resets after a success; true when it ends a run of failures.
    fn reset(&mut self) -> bool {
        self.next = FIRST;
        std::mem::replace(&mut self.failing, false)
    }
}

/// Whether the database refused the rows themselves (retrying the same rows would fail
/// the same way), as opposed to being unavailable, overloaded or misconfigured (retry
/// later). Only errors known to be about the data count as refusals, so an outage can
/// never make the writer drop rows.
pub fn is_refusal(e: &StoreError) -> bool {
    let StoreError::Database(e) = e else {
        return false;
    };
    match e {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(d) => {
            let Some(code) = d.code() else {
                return false;
            };
            if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                // SQLSTATE: data exception (22, e.g. bigint out of range), integrity
                // constraint violation (23), raise_exception (P0001).
                code.starts_with("22") || code.starts_with("23") || code == "P0001"
            } else if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // Extended result code; the primary code is its low byte: CONSTRAINT
                // (incl. a trigger's RAISE), TOOBIG, MISMATCH, RANGE.
                code.parse::<u32>()
                    .is_ok_and(|n| matches!(n & 0xff, 18 | 19 | 20 | 25))
            } else {
                false
            }
        }
        _ => false,
    }
}

impl Reports {
    /// Writes `batch` until every row is committed or quarantined.
    pub(super) async fn write(&self, batch: &[ReportRow], backoff: &mut Backoff) {
        let mut pending: Vec<Range<usize>> = Vec::with_capacity(16);
        pending.push(0..batch.len());
        while let Some(range) = pending.pop() {
            let rows = &batch[range.clone()];
            let start = Instant::now();
            match db::insert_batch(&self.store, rows).await {
                Ok(outcome) => {
                    self.metrics.batch_written(
                        outcome.inserted,
                        outcome.duplicates,
                        start.elapsed(),
                    );
                    if backoff.reset() {
                        tracing::info!(queued = self.queue_depth(), "report writes recovered");
                    }
                }
                Err(e) if is_refusal(&e) => {
                    let errors = self.metrics.batch_failed();
                    if let [row] = rows {
                        let quarantined = self.metrics.reports_quarantined(1);
                        tracing::warn!(
                            error = %e,
                            session_id = %row.session_id,
                            broadcast_id = %row.broadcast_id,
                            report_seq = row.report.report_seq,
                            quarantined_total = quarantined,
                            "the database refused a report row; quarantined (dropped)"
                        );
                    } else {
                        tracing::debug!(
                            error = %e,
                            rows = rows.len(),
                            errors,
                            "the database refused a report batch; bisecting it"
                        );
                        let mid = range.start + range.len() / 2;
                        // The first half is written first (stack order).
                        pending.push(mid..range.end);
                        pending.push(range.start..mid);
                    }
                }
                Err(e) => {
                    let errors = self.metrics.batch_failed();
                    tracing::warn!(
                        error = %e,
                        rows = rows.len(),
                        queued = self.queue_depth(),
                        errors,
                        retry_in_ms = u64::try_from(backoff.next.as_millis()).unwrap_or(u64::MAX),
                        "report batch write failed; keeping the rows and retrying"
                    );
                    pending.push(range);
                    backoff.wait().await;
                }
            }
        }
    }
}
