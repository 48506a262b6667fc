//! Viewer session bookkeeping outside the RPCs: batched heartbeat writes (touches) and
//! the expiry of silent sessions.

use std::sync::Arc;
use std::time::Duration;

use super::{Core, now_ms};
use crate::store::StoreError;

impl Core {
    /// Writes the heartbeats recorded since the last call to the database in one batch.
    /// On failure they are put back (newer heartbeats win) and retried on the next call.
    /// Returns how many sessions were written.
    pub async fn flush_touches(&self) -> Result<usize, StoreError> {
        let batch: Vec<(Arc<str>, i64)> = std::mem::take(&mut *self.touches.lock())
            .into_iter()
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match self.store.touch_sessions(&batch).await {
            Ok(_) => Ok(batch.len()),
            Err(e) => {
                let mut pending = self.touches.lock();
                for (id, t) in batch {
                    pending.entry(id).or_insert(t);
                }
                Err(e)
            }
        }
    }

    /// How long a viewer session may stay silent before it is expired.
    pub fn session_timeout(&self) -> Duration {
        self.config
            .heartbeat_interval
            .saturating_mul(self.config.missed_heartbeats.max(1))
    }

    /// Ends every session silent for [`Core::session_timeout`]: it leaves the peer grid
    /// (its children are re-parented; they learn it at their next heartbeat) and is ended
    /// in the database. Returns how many sessions expired.
    pub async fn expire_sessions(&self) -> Result<usize, StoreError> {
        let timeout = self.session_timeout();
        let expired = self.grids.expire(timeout);
        let now = now_ms();
        // Ended in memory before the database hears of it: a heartbeat arriving in
        // between (or after a failed write) must not find the row still active and be
        // told the session goes on outside its grid.
        for e in &expired {
            self.remember_unknown(&e.session_id, crate::limits::Unknown::Ended);
        }
        let mut first_error = None;
        for e in &expired {
            tracing::info!(
                session_id = %e.session_id,
                broadcast_id = %e.broadcast_id,
                peer_id = e.peer_id,
                reparented = e.moved,
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "viewer session expired (missed heartbeats)"
            );
            // One failed write does not leave the other expired sessions' rows active.
            if let Err(err) = self.store.end_session(&e.session_id, now).await {
                tracing::warn!(session_id = %e.session_id, "could not record the session's end: {err}");
                first_error.get_or_insert(err);
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(expired.len()),
        }
    }
}
