//! The state every task of one viewer shares: the broadcast id, the fan-out hub, the
//! counters, the rights (token, keys, revocations), the control-plane session, the
//! report queue and the stop signal. It depends on nothing that uses it: the viewer,
//! the relay engine, the HTTP endpoint and the report task all read and write it here.

use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::watch;

use crate::error::SdkError;
use crate::hub::Hub;
use crate::report_queue::{Baseline, ReportQueue};
use crate::rights::{ChunkCheck, Rights, unix_ms};
use crate::stats::Stats;

/// Control-plane session state (changes on re-join).
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) heartbeat: Duration,
    /// The counters when this session started (its reports count from there).
    pub(crate) baseline: Baseline,
}

/// One viewer's shared state (behind an `Arc`).
pub(crate) struct Shared {
    pub(crate) broadcast_id: String,
    pub(crate) hub: Hub,
    stats: Mutex<Stats>,
    pub(crate) started: Instant,
    /// `None` while running; the end result once stopping.
    end: watch::Sender<Option<Result<(), SdkError>>>,
    session: Mutex<Option<Session>>,
    /// Our token, the key sets, revoked peers.
    pub(crate) rights: Rights,
    reports: Mutex<ReportQueue>,
}

impl Shared {
    /// A running viewer's state: no counters yet, `session` from `Join` (if any), a
    /// report queue of at most `report_queue` reports.
    pub(crate) fn new(
        broadcast_id: String,
        hub: Hub,
        started: Instant,
        rights: Rights,
        session: Option<Session>,
        report_queue: usize,
    ) -> Shared {
        let (end, _) = watch::channel(None);
        Shared {
            broadcast_id,
            hub,
            stats: Mutex::new(Stats::default()),
            started,
            end,
            session: Mutex::new(session),
            rights,
            reports: Mutex::new(ReportQueue::new(report_queue)),
        }
    }

    /// True once the viewer is stopping.
    pub(crate) fn is_finished(&self) -> bool {
        self.end.borrow().is_some()
    }

    /// Replaces the control-plane session (after a re-join); returns the old one. The
    /// new session's reports count from the counters now.
    pub(crate) fn replace_session(&self, id: String, heartbeat: Duration) -> Option<Session> {
        let baseline = Baseline::of(&self.stats_mut());
        self.session.lock().replace(Session {
            id,
            heartbeat,
            baseline,
        })
    }

    /// The current session and the counters its reports start from.
    pub(crate) fn session_for_report(&self) -> Option<(String, Baseline)> {
        self.session
            .lock()
            .as_ref()
            .map(|s| (s.id.clone(), s.baseline))
    }

    /// The current control-plane session, if any.
    pub(crate) fn session(&self) -> Option<Session> {
        self.session.lock().clone()
    }

    /// The current control-plane session's id, if any.
    pub(crate) fn session_id(&self) -> Option<String> {
        self.session.lock().as_ref().map(|s| s.id.clone())
    }

    /// Ends the control-plane session here (the caller sends `Leave`).
    pub(crate) fn take_session(&self) -> Option<Session> {
        self.session.lock().take()
    }

    pub(crate) fn reports(&self) -> MutexGuard<'_, ReportQueue> {
        self.reports.lock()
    }

    /// A chunk was handed to the player: counters, start-up time, lag behind live.
    pub(crate) fn played(&self, c: &starling_proto::wire::Chunk) {
        let mut s = self.stats_mut();
        if s.startup_time.is_none() {
            s.startup_time = Some(self.started.elapsed());
        }
        s.chunks_out += 1;
        s.chunks_played += 1;
        s.bytes_out += c.payload.len() as u64;
        s.current_seq = Some(c.seq);
        if c.timestamp_ms > 0 {
            s.lag = Some(Duration::from_millis(
                unix_ms().saturating_sub(c.timestamp_ms),
            ));
        }
    }

    /// Checks a received chunk and counts the outcome (bad chunks are counted by the
    /// caller, which knows where the chunk came from).
    pub(crate) fn check_chunk(&self, c: &starling_proto::wire::Chunk) -> ChunkCheck {
        let r = self.rights.check_chunk(c);
        match &r {
            ChunkCheck::Verified { .. } => self.stats_mut().chunks_verified += 1,
            ChunkCheck::Unverified => self.stats_mut().chunks_unverified += 1,
            ChunkCheck::Excused(e) => {
                tracing::debug!(seq = c.seq, "dropped a chunk of the previous run: {e}");
                self.stats_mut().chunks_previous_run += 1;
            }
            ChunkCheck::Bad(_) => {}
        }
        r
    }

    /// Records why the viewer stops (the first reason wins) and tells every task.
    pub(crate) fn finish(&self, result: Result<(), SdkError>) {
        self.end.send_if_modified(|end| {
            if end.is_none() {
                *end = Some(result);
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn stop_signal(&self) -> watch::Receiver<Option<Result<(), SdkError>>> {
        self.end.subscribe()
    }

    pub(crate) fn stats_mut(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock()
    }
}

/// Resolves when the viewer is stopping.
pub(crate) async fn stopped(rx: &mut watch::Receiver<Option<Result<(), SdkError>>>) {
    let _ = rx.wait_for(|e| e.is_some()).await;
}
