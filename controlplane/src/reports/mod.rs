//! Viewer quality reports: validation, a bounded write queue, the batch writer, the
//! per-minute roll-ups, retention, and the live peer share of the last minute.
//!
//! # Path of a report
//!
//! 1. `ViewerService.Report` ([`Reports::submit`]) checks the session (this process's
//!    memory, else the `sessions` table: unknown → NOT_FOUND) and drops every report
//!    whose `report_seq` is not above the highest one accepted for the session (retries
//!    are idempotent). For the others it derives, against the session's previous report,
//!    what each contributes to its minute ([`rollup::derive`]: covered time, deltas of the
//!    cumulative counters clamped to what is physically possible ([`clamp`]), first
//!    report of the session in the minute, first start-up). The previous report comes
//!    from memory, or — for a session this process has not seen (restart, evicted
//!    state) — from its last stored row.
//! 2. The rows of the call go into one bounded in-memory FIFO, all or none, and the call
//!    **waits until the writer has committed them** (at most `ack_timeout`, then
//!    UNAVAILABLE: the rows stay queued and a retry of the same seqs waits for them
//!    again). The answer's `acked_seq` is the highest `report_seq` of the session that is
//!    **durable** (or was quarantined, below): a crash of this process after the answer
//!    loses nothing the SDK has deleted. A call whose reports are all already accepted
//!    waits for the session's last queued row the same way.
//! 3. One writer task drains the queue in batches (up to `batch_max` rows, at least every
//!    `flush_interval`: a group commit for every caller waiting): one transaction with
//!    one multi-row `INSERT ... ON CONFLICT DO NOTHING RETURNING` of the raw rows and
//!    one additive upsert of the per-minute roll-ups of exactly the rows inserted
//!    ([`db::insert_batch`]). Rows leave the queue only once committed; a batch that
//!    fails because the database is unavailable is retried with capped exponential
//!    backoff for as long as it is down, so nothing is lost below the bound. A batch the
//!    database *refuses* (a data or constraint error) is bisected until the refused rows
//!    are alone; those are **quarantined** (counted in
//!    `starling_cp_reports_quarantined_total`, logged, dropped) and the rest commit, so
//!    one session's garbage never holds up anyone else's rows (`reports/writer.rs`).
//! 4. **Beyond the bound** (`queue_max` rows) a call is refused whole with UNAVAILABLE
//!    ("drop newest"): its reports are counted in `starling_cp_reports_dropped_total`
//!    and logged, the session's state does not move, so the SDK may retry the same
//!    `report_seq`s later and, if it does, nothing is lost at all. Dropping the oldest
//!    instead would silently break the deltas of sessions whose rows were dropped.
//!
//! # Roll-ups
//!
//! At 10,000 viewers reporting every 5 s (2,000 rows/s, 173 M rows a day), computing
//! time series from raw rows at query time would scan 7 M rows per broadcast-hour, and
//! raw rows are pruned after the retention anyway. So the writer maintains
//! `audience_minutes` (one row per broadcast and minute, additive columns) in the same
//! transaction as the raw rows — the roll-up never disagrees with the raw data — and
//! `viewer_startups` (one row per session) for exact start-up percentiles over any
//! bucket. Everything that is not additive (distinct viewers, "first" start-up) is
//! decided at ingest from the per-session state, which is what makes the roll-up
//! additive. `GetAudience` reads only these tables; it sees what is committed.
//! Definitions are in [`rollup`].

pub mod clamp;
pub mod db;
pub mod rollup;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use starling_proto::v1::{AudiencePoint, ViewerReport};
use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use clamp::{Bounds, CounterLimits};
use db::ReportRow;
use rollup::{MINUTE_MS, Prev};

/// Tunables of report recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportConfig {
    /// Most reports the write queue holds; beyond, calls are refused and counted as
    /// dropped.
    pub queue_max: usize,
    /// Most rows per database batch (capped at [`db::MAX_BATCH_ROWS`]).
    pub batch_max: usize,
    /// A non-full batch is written at least this often.
    pub flush_interval: Duration,
    /// Longest backoff between retries of a failed batch.
    pub retry_max: Duration,
    /// Raw reports older than this are deleted (roll-ups are kept).
    pub retention: Duration,
    /// How often the retention is applied.
    pub prune_interval: Duration,
    /// Most reports in one `Report` call.
    pub max_per_call: usize,
    /// Longest time one report may cover (a longer silence is not watch time).
    pub max_gap: Duration,
    /// A session's state is forgotten after this long without a report (once its rows
    /// are durable); a later report reloads it from the database.
    pub session_idle: Duration,
    /// Longest a `Report` call waits for its rows to be committed before it answers
    /// UNAVAILABLE (the rows stay queued; the SDK retries the same seqs).
    pub ack_timeout: Duration,
    /// Physical bounds on the counters of reports and heartbeats ([`clamp`]).
    pub limits: CounterLimits,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            queue_max: 1_000_000,
            batch_max: 500,
            flush_interval: Duration::from_millis(250),
            retry_max: Duration::from_secs(5),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(600),
            max_per_call: 64,
            max_gap: Duration::from_secs(30),
            session_idle: Duration::from_secs(600),
            ack_timeout: Duration::from_secs(10),
            limits: CounterLimits::default(),
        }
    }
}

/// Why a `Report` call was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Too many reports in one call, or a bad field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The session does not exist.
    #[error("session {0} not found")]
    NotFound(String),
    /// The write queue is full: the reports were dropped (retry later).
    #[error("report queue full ({0} reports queued); reports dropped, retry later")]
    QueueFull(usize),
    /// The reports are queued but were not committed within `ack_timeout` (the
    /// database is slow or unavailable); retry the same reports later.
    #[error("reports queued but not yet durable after {0:?}; retry them later")]
    NotDurable(Duration),
    /// The database failed while loading an unknown session.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// Why `GetAudience` was refused.
#[derive(Debug, thiserror::Error)]
pub enum AudienceError {
    /// Bad range or step.
    #[error("{0}")]
    InvalidArgument(String),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// Most points one `GetAudience` answer may hold.
pub const MAX_POINTS: i64 = 10_000;

#[derive(Debug)]
struct SessionState {
    broadcast_id: Arc<str>,
    session_id: Arc<str>,
    prev: Prev,
    last_report: Instant,
    /// Queue id of its last row (0 = none queued by this process).
    last_row: u64,
}

#[derive(Debug, Default)]
struct Queue {
    rows: VecDeque<ReportRow>,
    /// Rows ever pushed (the id of the last pushed row).
    pushed: u64,
}

/// 10-second slots of (bytes from server, bytes from peers) per broadcast, by receive
/// time, for `peer_share_last_minute`.
const LIVE_SLOT_MS: i64 = 10_000;
const LIVE_SLOTS: usize = 6;

#[derive(Debug, Default, Clone, Copy)]
struct LiveSlot {
    slot: i64,
    server: u64,
    peers: u64,
}

/// Report recording of one control-plane process.
#[derive(Debug)]
pub struct Reports {
    config: ReportConfig,
    store: Store,
    metrics: Arc<Metrics>,
    /// Lock order: `sessions` before `queue` / `live`.
    sessions: Mutex<HashMap<Arc<str>, SessionState>>,
    queue: Mutex<Queue>,
    /// Rows ever committed or quarantined (popped): every row id ≤ this is durable (or
    /// was refused for good). `Report` calls wait on it.
    written: watch::Sender<u64>,
    wake: Notify,
    live: Mutex<HashMap<Arc<str>, [LiveSlot; LIVE_SLOTS]>>,
}

impl Reports {
    /// Report recording over `store` (tasks are started by [`Reports::spawn`]).
    pub fn new(config: ReportConfig, store: Store, metrics: Arc<Metrics>) -> Arc<Reports> {
        Arc::new(Reports {
            config,
            store,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::default()),
            written: watch::Sender::new(0),
            wake: Notify::new(),
            live: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ReportConfig {
        &self.config
    }

    /// Reports waiting to be written.
    pub fn queue_depth(&self) -> usize {
        self.queue.lock().rows.len()
    }

    /// Reports committed to the database by this process so far.
    pub fn stored_total(&self) -> u64 {
        self.metrics.stored_reports()
    }

    /// The queue bound.
    pub fn queue_capacity(&self) -> usize {
        self.config.queue_max
    }

    /// Sessions whose state this process holds.
    pub fn tracked_sessions(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Whether this process holds a session's state (a report for it needs no database
    /// look-up).
    pub fn tracks(&self, session_id: &str) -> bool {
        self.sessions.lock().contains_key(session_id)
    }

    /// Starts the writer and the retention task; abort the handles to stop them (after
    /// [`Reports::flush`] for a clean shutdown).
    pub fn spawn(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().writer_loop()),
            tokio::spawn(self.clone().maintenance_loop()),
        ]
    }

    /// Loads the state of a session this process does not know.
    async fn load_session(&self, session_id: &str) -> Result<SessionState, SubmitError> {
        let Some(s) = self.store.get_session(session_id).await? else {
            return Err(SubmitError::NotFound(session_id.to_string()));
        };
        let prev = db::last_state(&self.store, session_id)
            .await?
            .unwrap_or_else(|| Prev::joined(s.joined_at_ms));
        Ok(SessionState {
            broadcast_id: s.broadcast_id.into(),
            session_id: session_id.into(),
            prev,
            last_report: Instant::now(),
            last_row: 0,
        })
    }

    /// Validates and queues the reports of one `Report` call received at `now_ms` and
    /// waits until they are committed; returns the highest `report_seq` of the session
    /// that is durable. `stream_kbps` gives a broadcast's measured stream rate (the
    /// counters' bound; [`CounterLimits::max_stream_kbps`] when unknown).
    pub async fn submit(
        &self,
        session_id: &str,
        mut reports: Vec<ViewerReport>,
        now_ms: i64,
        stream_kbps: impl Fn(&str) -> Option<u32>,
    ) -> Result<u64, SubmitError> {
        if reports.len() > self.config.max_per_call {
            return Err(SubmitError::InvalidArgument(format!(
                "{} reports in one call, at most {} allowed",
                reports.len(),
                self.config.max_per_call
            )));
        }
        if reports.iter().any(|r| r.report_seq == 0) {
            return Err(SubmitError::InvalidArgument(
                "report_seq must start at 1".into(),
            ));
        }
        self.metrics.reports_received(reports.len());
        reports.sort_by_key(|r| r.report_seq);
        reports.dedup_by_key(|r| r.report_seq);

        let known = self.sessions.lock().contains_key(session_id);
        let loaded = if known {
            None
        } else {
            Some(self.load_session(session_id).await?)
        };
        let (acked, row) = self.enqueue(session_id, reports, loaded, now_ms, stream_kbps)?;
        self.wait_durable(row).await?;
        Ok(acked)
    }

    /// The synchronous part of [`Reports::submit`]: derives and queues the new reports;
    /// returns the session's highest accepted seq and the queue id of its last row.
    fn enqueue(
        &self,
        session_id: &str,
        reports: Vec<ViewerReport>,
        loaded: Option<SessionState>,
        now_ms: i64,
        stream_kbps: impl Fn(&str) -> Option<u32>,
    ) -> Result<(u64, u64), SubmitError> {
        let mut sessions = self.sessions.lock();
        if let Some(st) = loaded {
            // Another call may have loaded it meanwhile: keep the one in the map.
            sessions.entry(st.session_id.clone()).or_insert(st);
        }
        let Some(st) = sessions.get_mut(session_id) else {
            return Err(SubmitError::NotFound(session_id.to_string()));
        };
        let max_gap = u64::try_from(self.config.max_gap.as_millis()).unwrap_or(u64::MAX);
        let bounds = Bounds::new(stream_kbps(&st.broadcast_id), self.config.limits);
        let mut prev = st.prev.clone();
        let mut rows = Vec::with_capacity(reports.len());
        let (mut d_server, mut d_peers) = (0u64, 0u64);
        let mut clamped = 0usize;
        let total = reports.len();
        for r in reports {
            if r.report_seq <= prev.seq {
                continue;
            }
            let (derived, next) = rollup::derive(&prev, &r, now_ms, max_gap, &bounds);
            prev = next;
            d_server = d_server.saturating_add(derived.d_server);
            d_peers = d_peers.saturating_add(derived.d_peers);
            if derived.clamped {
                clamped += 1;
            }
            rows.push(ReportRow {
                broadcast_id: st.broadcast_id.clone(),
                session_id: st.session_id.clone(),
                report: r,
                received_ms: now_ms,
                derived,
            });
        }
        let duplicates = total - rows.len();
        if duplicates > 0 {
            self.metrics.reports_duplicate(duplicates);
        }
        if rows.is_empty() {
            // A retry: answered once what was accepted before is durable.
            return Ok((st.prev.seq, st.last_row));
        }
        let n = rows.len();
        {
            let mut q = self.queue.lock();
            if q.rows.len() + n > self.config.queue_max {
                let queued = q.rows.len();
                drop(q);
                let dropped = self.metrics.reports_dropped(n);
                // Logged at the first drop and then every 10,000 dropped reports.
                if dropped == n as u64 || dropped / 10_000 != (dropped - n as u64) / 10_000 {
                    tracing::warn!(
                        session_id,
                        dropped_now = n,
                        dropped_total = dropped,
                        queued,
                        queue_max = self.config.queue_max,
                        "report queue full: reports dropped (the SDK may retry them)"
                    );
                }
                return Err(SubmitError::QueueFull(queued));
            }
            q.rows.extend(rows);
            q.pushed += n as u64;
            st.last_row = q.pushed;
            if q.rows.len() >= self.config.batch_max {
                self.wake.notify_one();
            }
        }
        st.prev = prev;
        st.last_report = Instant::now();
        self.metrics.reports_accepted(n, d_server, d_peers);
        if clamped > 0 {
            let total_clamped = self.metrics.counters_clamped_report(clamped);
            // Logged at the first clamp and then every 1,000 clamped reports.
            if total_clamped == clamped as u64
                || total_clamped / 1_000 != (total_clamped - clamped as u64) / 1_000
            {
                tracing::warn!(
                    session_id,
                    broadcast_id = %st.broadcast_id,
                    clamped,
                    clamped_total = total_clamped,
                    stream_kbps = bounds.stream_kbps,
                    "report counters beyond what is physically possible; clamped"
                );
            }
        }
        let acked = st.prev.seq;
        let row = st.last_row;
        let broadcast_id = st.broadcast_id.clone();
        drop(sessions);
        self.add_live(&broadcast_id, now_ms, d_server, d_peers);
        Ok((acked, row))
    }

    /// Waits until queue row `row` (0 = none) is committed or quarantined, at most
    /// `ack_timeout`.
    async fn wait_durable(&self, row: u64) -> Result<(), SubmitError> {
        let mut rx = self.written.subscribe();
        match tokio::time::timeout(self.config.ack_timeout, rx.wait_for(|w| *w >= row)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(SubmitError::NotDurable(self.config.ack_timeout)),
        }
    }

    fn add_live(&self, broadcast_id: &Arc<str>, now_ms: i64, server: u64, peers: u64) {
        let slot = now_ms.div_euclid(LIVE_SLOT_MS);
        let i = usize::try_from(slot.rem_euclid(LIVE_SLOTS as i64)).unwrap_or(0);
        let mut live = self.live.lock();
        let ring = live.entry(broadcast_id.clone()).or_default();
        if ring[i].slot != slot {
            ring[i] = LiveSlot {
                slot,
                server: 0,
                peers: 0,
            };
        }
        ring[i].server = ring[i].server.saturating_add(server);
        ring[i].peers = ring[i].peers.saturating_add(peers);
    }

    /// Bytes from peers / all bytes delivered over the last minute (six 10-second slots
    /// by receive time, the current one included), from accepted reports; 0 when none.
    pub fn peer_share_last_minute(&self, broadcast_id: &str, now_ms: i64) -> f64 {
        let now_slot = now_ms.div_euclid(LIVE_SLOT_MS);
        let live = self.live.lock();
        let Some(ring) = live.get(broadcast_id) else {
            return 0.0;
        };
        let (mut server, mut peers) = (0u64, 0u64);
        for s in ring
            .iter()
            .filter(|s| s.slot > now_slot - LIVE_SLOTS as i64 && s.slot <= now_slot)
        {
            server = server.saturating_add(s.server);
            peers = peers.saturating_add(s.peers);
        }
        let total = server.saturating_add(peers);
        #[allow(clippy::cast_precision_loss)]
        if total == 0 {
            0.0
        } else {
            peers as f64 / total as f64
        }
    }

    /// Waits until every queued report is written, or `timeout`; returns whether the
    /// queue is empty.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.queue_depth() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn writer_loop(self: Arc<Self>) {
        let batch_max = self.config.batch_max.clamp(1, db::MAX_BATCH_ROWS);
        let mut backoff = writer::Backoff::new(self.config.retry_max);
        loop {
            let batch: Vec<ReportRow> = {
                let q = self.queue.lock();
                q.rows.iter().take(batch_max).cloned().collect()
            };
            if batch.is_empty() {
                tokio::select! {
                    () = self.wake.notified() => {},
                    () = tokio::time::sleep(self.config.flush_interval) => {},
                }
                continue;
            }
            // Returns only once every row is committed or quarantined.
            self.write(&batch, &mut backoff).await;
            {
                let mut q = self.queue.lock();
                q.rows.drain(..batch.len());
            }
            self.written
                .send_modify(|w| *w = w.saturating_add(batch.len() as u64));
            if batch.len() < batch_max {
                // Not a full batch: let more rows gather (or be woken when a full batch
                // is waiting).
                tokio::select! {
                    () = self.wake.notified() => {},
                    () = tokio::time::sleep(self.config.flush_interval) => {},
                }
            }
        }
    }

    /// Forgets idle sessions whose rows are all durable.
    fn evict_idle(&self) -> usize {
        let written = *self.written.borrow();
        let idle = self.config.session_idle;
        let mut sessions = self.sessions.lock();
        let before = sessions.len();
        sessions.retain(|_, s| s.last_report.elapsed() < idle || s.last_row > written);
        before - sessions.len()
    }

    /// Deletes raw reports older than the retention (relative to `now_ms`).
    pub async fn prune(&self, now_ms: i64) -> Result<u64, StoreError> {
        let keep = i64::try_from(self.config.retention.as_millis()).unwrap_or(i64::MAX);
        let n = db::prune(&self.store, now_ms.saturating_sub(keep)).await?;
        self.metrics.pruned(n);
        Ok(n)
    }

    async fn maintenance_loop(self: Arc<Self>) {
        // Prune at least 4 times per retention period, so a short retention is honoured.
        let every = self
            .config
            .prune_interval
            .min(self.config.retention / 4)
            .max(Duration::from_secs(1));
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let evicted = self.evict_idle();
            match self.prune(starling_proto::time::unix_ms_i64()).await {
                Ok(n) => tracing::debug!(pruned = n, evicted, "report retention applied"),
                Err(e) => tracing::warn!(error = %e, "report retention failed; retried later"),
            }
        }
    }

    /// The audience time series of a broadcast (see [`rollup::points`]): `from_ms` 0 =
    /// its first stored minute, `to_ms` 0 = `now_ms`, `step_s` 0 = 60.
    pub async fn audience(
        &self,
        broadcast_id: &str,
        from_ms: i64,
        to_ms: i64,
        step_s: u32,
        now_ms: i64,
    ) -> Result<Vec<AudiencePoint>, AudienceError> {
        let step_s = if step_s == 0 { 60 } else { step_s };
        if step_s % 60 != 0 {
            return Err(AudienceError::InvalidArgument(format!(
                "step_s {step_s} is not a multiple of 60 (roll-ups are per minute)"
            )));
        }
        if from_ms < 0 || to_ms < 0 {
            return Err(AudienceError::InvalidArgument(
                "from_unix_ms and to_unix_ms must not be negative".into(),
            ));
        }
        let to = if to_ms == 0 { now_ms } else { to_ms };
        let from = if from_ms == 0 {
            match db::first_minute(&self.store, broadcast_id).await? {
                Some(m) => m,
                None => return Ok(Vec::new()),
            }
        } else {
            from_ms
        };
        if from >= to {
            if from_ms == 0 {
                return Ok(Vec::new());
            }
            return Err(AudienceError::InvalidArgument(format!(
                "empty range: from {from} is not before to {to}"
            )));
        }
        let from = rollup::minute_of(from);
        let to = rollup::minute_of(to - 1) + MINUTE_MS;
        let step_ms = i64::from(step_s) * 1000;
        if (to - from + step_ms - 1) / step_ms > MAX_POINTS {
            return Err(AudienceError::InvalidArgument(format!(
                "the range holds more than {MAX_POINTS} steps of {step_s} s; use a larger step"
            )));
        }
        let minutes = db::minutes(&self.store, broadcast_id, from, to).await?;
        let startups = db::startups(&self.store, broadcast_id, from, to).await?;
        Ok(rollup::points(&minutes, &startups, from, to, step_ms))
    }
}
