//! The reports' SQL, written once for both backends (`$N` placeholders), like
//! [`crate::store`]. Tables: `viewer_reports` (raw, pruned), `audience_minutes` and
//! `viewer_startups` (roll-ups, kept); see `migrations/*/0002_reports.sql`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use sqlx::{AssertSqlSafe, Row};
use starling_proto::v1::ViewerReport;

use super::rollup::{Derived, Minute, Prev, minute_of};
use crate::store::{Store, StoreError};

macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

/// One accepted report, queued for the batch writer.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// Broadcast of the session.
    pub broadcast_id: Arc<str>,
    /// Session.
    pub session_id: Arc<str>,
    /// What the SDK sent.
    pub report: ViewerReport,
    /// When the control plane received it, unix ms.
    pub received_ms: i64,
    /// What the control plane derived at ingest.
    pub derived: Derived,
}

/// Columns of `viewer_reports`, in bind order.
const REPORT_COLS: &str = "session_id, report_seq, broadcast_id, at_ms, received_ms, \
     bytes_from_server, bytes_from_peers, bytes_uploaded, startup_ms, stalls, stall_ms, \
     lag_ms, buffer_ms, parent_changes, peers, is_final, chunks_played, chunks_skipped, \
     covered_ms, d_server_bytes, d_peer_bytes, d_stall_ms, first_in_minute, first_startup";
const REPORT_NCOLS: usize = 24;

/// Most rows one batch may carry (`REPORT_NCOLS` binds each; SQLite allows 32,766).
pub const MAX_BATCH_ROWS: usize = 1000;

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `rows` tuples of `cols` placeholders: `$1, $2, ...` for Postgres; anonymous `?` for
/// SQLite, whose lookup of a numbered parameter scans the statement's parameter list
/// (a 500-row batch of 24 columns spent most of the control plane's CPU binding).
fn values_sql(store: &Store, rows: usize, cols: usize) -> String {
    let anonymous = matches!(store, Store::Sqlite(_));
    let mut s = String::with_capacity(rows * cols * 5);
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            n += 1;
            if anonymous {
                s.push('?');
            } else {
                s.push('$');
                s.push_str(&n.to_string());
            }
        }
        s.push(')');
    }
    s
}

/// Outcome of [`insert_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Rows inserted.
    pub inserted: usize,
    /// Rows already stored (a retried batch whose earlier commit did succeed).
    pub duplicates: usize,
}

/// Writes a batch in one transaction: one multi-row `INSERT` of the raw rows (`ON
/// CONFLICT DO NOTHING`, returning the rows actually inserted), then the additive
/// roll-up upsert of exactly those rows and their first start-ups. A batch retried after
/// an ambiguous failure therefore never counts a report twice.
pub async fn insert_batch(store: &Store, rows: &[ReportRow]) -> Result<BatchOutcome, StoreError> {
    if rows.is_empty() {
        return Ok(BatchOutcome::default());
    }
    let raw_sql = format!(
        "INSERT INTO viewer_reports ({REPORT_COLS}) VALUES {} \
         ON CONFLICT (session_id, report_seq) DO NOTHING RETURNING session_id, report_seq",
        values_sql(store, rows.len(), REPORT_NCOLS)
    );
    on_pool!(store, pool => {
        let mut tx = pool.begin().await?;
        let mut q = sqlx::query(AssertSqlSafe(raw_sql));
        for row in rows {
            let r = &row.report;
            let d = &row.derived;
            q = q
                .bind(&*row.session_id)
                .bind(i64_of(r.report_seq))
                .bind(&*row.broadcast_id)
                .bind(d.at_ms)
                .bind(row.received_ms)
                .bind(i64_of(r.bytes_from_server))
                .bind(i64_of(r.bytes_from_peers))
                .bind(i64_of(r.bytes_uploaded))
                .bind(i64::from(r.startup_ms))
                .bind(i64::from(r.stalls))
                .bind(i64_of(r.stall_ms))
                .bind(i64::from(r.lag_ms))
                .bind(i64::from(r.buffer_ms))
                .bind(i64::from(r.parent_changes))
                .bind(i64::from(r.peers))
                .bind(r.r#final)
                .bind(i64_of(r.chunks_played))
                .bind(i64_of(r.chunks_skipped))
                .bind(i64_of(d.covered_ms))
                .bind(i64_of(d.d_server))
                .bind(i64_of(d.d_peers))
                .bind(i64_of(d.d_stall_ms))
                .bind(d.first_in_minute)
                .bind(d.first_startup);
        }
        let returned = q.fetch_all(&mut *tx).await?;
        let mut inserted: HashSet<(String, i64)> = HashSet::with_capacity(returned.len());
        for r in &returned {
            let s: String = r.try_get("session_id")?;
            let q: i64 = r.try_get("report_seq")?;
            inserted.insert((s, q));
        }
        let mut minutes: BTreeMap<(&str, i64), Minute> = BTreeMap::new();
        let mut startups: Vec<&ReportRow> = Vec::new();
        for row in rows {
            if !inserted.contains(&(row.session_id.to_string(), i64_of(row.report.report_seq))) {
                continue;
            }
            let m = Minute::of(&row.derived);
            minutes
                .entry((&row.broadcast_id, m.minute_ms))
                .or_insert(Minute { minute_ms: m.minute_ms, ..Minute::default() })
                .add(&m);
            if row.derived.first_startup {
                startups.push(row);
            }
        }
        if !minutes.is_empty() {
            let sql = format!(
                "INSERT INTO audience_minutes (broadcast_id, minute_ms, viewers, reports, \
                 watch_ms, server_bytes, peer_bytes, stall_ms) VALUES {} \
                 ON CONFLICT (broadcast_id, minute_ms) DO UPDATE SET \
                 viewers = audience_minutes.viewers + excluded.viewers, \
                 reports = audience_minutes.reports + excluded.reports, \
                 watch_ms = audience_minutes.watch_ms + excluded.watch_ms, \
                 server_bytes = audience_minutes.server_bytes + excluded.server_bytes, \
                 peer_bytes = audience_minutes.peer_bytes + excluded.peer_bytes, \
                 stall_ms = audience_minutes.stall_ms + excluded.stall_ms",
                values_sql(store, minutes.len(), 8)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for ((b, minute_ms), m) in &minutes {
                q = q
                    .bind(*b)
                    .bind(*minute_ms)
                    .bind(i64_of(m.viewers))
                    .bind(i64_of(m.reports))
                    .bind(i64_of(m.watch_ms))
                    .bind(i64_of(m.server_bytes))
                    .bind(i64_of(m.peer_bytes))
                    .bind(i64_of(m.stall_ms));
            }
            q.execute(&mut *tx).await?;
        }
        if !startups.is_empty() {
            let sql = format!(
                "INSERT INTO viewer_startups (session_id, broadcast_id, at_ms, startup_ms) \
                 VALUES {} ON CONFLICT (session_id) DO NOTHING",
                values_sql(store, startups.len(), 4)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for row in &startups {
                q = q
                    .bind(&*row.session_id)
                    .bind(&*row.broadcast_id)
                    .bind(row.derived.at_ms)
                    .bind(i64::from(row.report.startup_ms));
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(BatchOutcome { inserted: inserted.len(), duplicates: rows.len() - inserted.len() })
    })
}

/// The state after a session's last stored report (`None` when it has none), for a
/// session this process has no memory of (restart, or state evicted).
pub async fn last_state(store: &Store, session_id: &str) -> Result<Option<Prev>, StoreError> {
    const LAST: &str = "SELECT report_seq, at_ms, bytes_from_server, bytes_from_peers, \
         stall_ms FROM viewer_reports WHERE session_id = $1 ORDER BY report_seq DESC LIMIT 1";
    const STARTUP: &str = "SELECT COUNT(*) AS n FROM viewer_startups WHERE session_id = $1";
    on_pool!(store, pool => {
        let Some(row) = sqlx::query(LAST).bind(session_id).fetch_optional(pool).await? else {
            return Ok(None);
        };
        let n: i64 = sqlx::query(STARTUP).bind(session_id).fetch_one(pool).await?.try_get("n")?;
        let at_ms: i64 = row.try_get("at_ms")?;
        Ok(Some(Prev {
            seq: u64_of(row.try_get("report_seq")?),
            at_ms,
            from_server: u64_of(row.try_get("bytes_from_server")?),
            from_peers: u64_of(row.try_get("bytes_from_peers")?),
            stall_ms: u64_of(row.try_get("stall_ms")?),
            startup_seen: n > 0,
            minute: Some(minute_of(at_ms)),
            // A fresh allowance (the burst) after a restart or an eviction.
            credits: None,
        }))
    })
}

/// Deletes raw reports older than `cutoff_ms`; returns how many.
pub async fn prune(store: &Store, cutoff_ms: i64) -> Result<u64, StoreError> {
    const SQL: &str = "DELETE FROM viewer_reports WHERE at_ms < $1";
    on_pool!(store, pool => {
        Ok(sqlx::query(SQL).bind(cutoff_ms).execute(pool).await?.rows_affected())
    })
}

/// The stored roll-up minutes of a broadcast in `[from_ms, to_ms)`, oldest first.
pub async fn minutes(
    store: &Store,
    broadcast_id: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Minute>, StoreError> {
    const SQL: &str = "SELECT minute_ms, viewers, reports, watch_ms, server_bytes, peer_bytes, \
         stall_ms FROM audience_minutes WHERE broadcast_id = $1 AND minute_ms >= $2 \
         AND minute_ms < $3 ORDER BY minute_ms";
    on_pool!(store, pool => {
        let rows = sqlx::query(SQL)
            .bind(broadcast_id)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Minute {
                    minute_ms: r.try_get("minute_ms")?,
                    viewers: u64_of(r.try_get("viewers")?),
                    reports: u64_of(r.try_get("reports")?),
                    watch_ms: u64_of(r.try_get("watch_ms")?),
                    server_bytes: u64_of(r.try_get("server_bytes")?),
                    peer_bytes: u64_of(r.try_get("peer_bytes")?),
                    stall_ms: u64_of(r.try_get("stall_ms")?),
                })
            })
            .collect()
    })
}

/// First start-up times `(at_ms, startup_ms)` of a broadcast's sessions in `[from, to)`.
pub async fn startups(
    store: &Store,
    broadcast_id: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<(i64, u32)>, StoreError> {
    const SQL: &str = "SELECT at_ms, startup_ms FROM viewer_startups WHERE broadcast_id = $1 \
         AND at_ms >= $2 AND at_ms < $3";
    on_pool!(store, pool => {
        let rows = sqlx::query(SQL)
            .bind(broadcast_id)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(pool)
            .await?;
        rows.iter()
            .map(|r| {
                let s: i64 = r.try_get("startup_ms")?;
                Ok((r.try_get("at_ms")?, u32::try_from(s).unwrap_or(u32::MAX)))
            })
            .collect()
    })
}

/// Start of the first stored minute of a broadcast, if any.
pub async fn first_minute(store: &Store, broadcast_id: &str) -> Result<Option<i64>, StoreError> {
    const SQL: &str = "SELECT MIN(minute_ms) AS m FROM audience_minutes WHERE broadcast_id = $1";
    on_pool!(store, pool => {
        let row = sqlx::query(SQL).bind(broadcast_id).fetch_one(pool).await?;
        Ok(row.try_get::<Option<i64>, _>("m")?)
    })
}

/// `(session_id, report_seq)` of every stored raw report of a broadcast, sorted (for
/// tests and audits).
pub async fn stored_keys(
    store: &Store,
    broadcast_id: &str,
) -> Result<Vec<(String, u64)>, StoreError> {
    const SQL: &str = "SELECT session_id, report_seq FROM viewer_reports \
         WHERE broadcast_id = $1 ORDER BY session_id, report_seq";
    on_pool!(store, pool => {
        let rows = sqlx::query(SQL).bind(broadcast_id).fetch_all(pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("session_id")?, u64_of(r.try_get("report_seq")?))))
            .collect()
    })
}
