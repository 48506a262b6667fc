//! Session streams attached to peers of the live grids: the wake handle the grid code
//! pokes (under the grid lock) when it moves or removes a peer, and attaching and
//! detaching a stream (a session with a stream attached never expires by silence; one
//! whose stream ended expires after a grace period unless it is taken up again).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use starling_grid::assign::PeerId;

use super::LiveGrids;

/// The wake handle of one session stream: a [`tokio::sync::Notify`] (a wake while the
/// stream is busy is kept as a permit, never lost) and a "superseded" flag set when a
/// newer stream attached to the same session.
#[derive(Debug, Default)]
pub struct StreamWake {
    notify: tokio::sync::Notify,
    superseded: AtomicBool,
}

impl StreamWake {
    /// Wakes the stream: it recomputes its view and sends what changed.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Resolves at the next wake (at once if one came meanwhile).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// Whether a newer stream took the session over (this one must end).
    pub fn superseded(&self) -> bool {
        self.superseded.load(Ordering::Relaxed)
    }

    fn supersede(&self) {
        self.superseded.store(true, Ordering::Relaxed);
        self.wake();
    }
}

/// A stream attached to a session ([`LiveGrids::attach`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// Generation of this attachment (detach names it).
    pub generation: u64,
    /// The session's peer id.
    pub peer_id: PeerId,
    /// Its broadcast.
    pub broadcast_id: String,
}

impl LiveGrids {
    /// Attaches a session stream: the grid wakes `wake` whenever it moves the peer or
    /// removes it, and the session no longer expires by silence. A previous stream of
    /// the same session is superseded (woken, it ends). `None` when the session is not
    /// in a grid of this process.
    pub fn attach(&self, session_id: &str, wake: &Arc<StreamWake>) -> Option<Attached> {
        let (grid, peer_id, broadcast_id) = {
            let sessions = self.sessions.lock();
            let e = sessions.get(session_id)?;
            (e.grid.clone(), e.peer_id, e.broadcast_id.clone())
        };
        let generation = self.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now();
        let old = {
            let mut st = grid.state.lock();
            let slot = st.peers.get_mut(&peer_id)?;
            let old = slot.wake.replace(wake.clone());
            // Grid → sessions is the allowed nesting.
            let mut sessions = self.sessions.lock();
            match sessions.get_mut(session_id) {
                Some(e) => {
                    e.stream = generation;
                    e.last_seen = now;
                }
                None => return None,
            }
            old
        };
        if let Some(old) = old {
            old.supersede();
        }
        Some(Attached {
            generation,
            peer_id,
            broadcast_id,
        })
    }

    /// Detaches the stream `generation` (its `wake`) from a session: the session then
    /// expires `grace` from now (at most the silence timeout `timeout`) unless a new
    /// stream or a heartbeat takes it up. Returns false when the session is gone or a
    /// newer stream is attached.
    pub fn detach(
        &self,
        session_id: &str,
        generation: u64,
        wake: &Arc<StreamWake>,
        timeout: Duration,
        grace: Duration,
    ) -> bool {
        let Some((grid, peer_id)) = self
            .sessions
            .lock()
            .get(session_id)
            .map(|e| (e.grid.clone(), e.peer_id))
        else {
            return false;
        };
        let now = self.now();
        let mut st = grid.state.lock();
        if let Some(slot) = st.peers.get_mut(&peer_id)
            && slot.wake.as_ref().is_some_and(|w| Arc::ptr_eq(w, wake))
        {
            slot.wake = None;
        }
        let mut sessions = self.sessions.lock();
        match sessions.get_mut(session_id) {
            Some(e) if e.stream == generation => {
                e.stream = 0;
                // Expiry removes sessions silent for more than `timeout`: back-date the
                // last sign of life so that this one goes `grace` from now.
                e.last_seen = now.saturating_sub(timeout.saturating_sub(grace));
                true
            }
            _ => false,
        }
    }
}
