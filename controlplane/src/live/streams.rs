//! Session streams attached to peers of the live grids: the wake handle the grid code
//! pokes (under the grid lock) when it moves or removes a peer (flags and a waker,
//! polled by the stream), the registry through which a rights change wakes every
//! stream, and attaching and detaching a stream (a session with a stream attached never
//! expires by silence; one whose stream ended expires after a grace period unless it is
//! taken up again).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use starling_grid::assign::PeerId;

use super::LiveGrids;

/// [`StreamWake`] flag: the grid moved or removed the peer since the stream last looked.
pub const MOVED: u8 = 1;
/// [`StreamWake`] flag: a newer stream took the session over.
const SUPERSEDED: u8 = 2;
/// [`StreamWake`] flag: the rights version (key sets, revocations, shutdown) changed
/// since the stream last looked ([`LiveGrids::announce_rights`]).
pub const RIGHTS: u8 = 4;

/// The wake handle of one session stream: flags (a wake while the stream is busy is
/// kept, never lost: the grid moved the peer, the rights changed, a newer stream took the
/// session over) and the waker of the task polling the stream. Polled by the stream
/// itself ([`StreamWake::poll_woken`]): no future, no allocation per wait.
#[derive(Debug, Default)]
pub struct StreamWake {
    flags: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl StreamWake {
    /// Wakes the stream (the grid moved or removed its peer): it recomputes its view
    /// and sends what changed.
    pub fn wake(&self) {
        self.raise(MOVED);
    }

    fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
        let waker = self.waker.lock().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready with the flags raised ([`MOVED`], [`RIGHTS`]) since the last ready poll,
    /// cleared; otherwise registers `cx`'s waker.
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<u8> {
        let raised = self.take_raised();
        if raised != 0 {
            return Poll::Ready(raised);
        }
        {
            let mut w = self.waker.lock();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        // A wake between the first look and the registration found no waker.
        match self.take_raised() {
            0 => Poll::Pending,
            raised => Poll::Ready(raised),
        }
    }

    fn take_raised(&self) -> u8 {
        self.flags.fetch_and(!(MOVED | RIGHTS), Ordering::AcqRel) & (MOVED | RIGHTS)
    }

    /// Resolves at the next wake (at once if one came meanwhile).
    pub async fn woken(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx).map(|_| ())).await;
    }

    /// Whether a newer stream took the session over (this one must end).
    pub fn superseded(&self) -> bool {
        self.flags.load(Ordering::Acquire) & SUPERSEDED != 0
    }

    fn supersede(&self) {
        self.flags.fetch_or(SUPERSEDED, Ordering::AcqRel);
        self.wake();
    }
}

/// Every open session stream's wake handle (weak), for rights changes: one list for the
/// process instead of one watch subscription (and its boxed future) per stream.
#[derive(Debug, Default)]
pub(super) struct StreamRegistry {
    wakes: Mutex<Vec<Weak<StreamWake>>>,
    /// The task forwarding rights changes was started ([`LiveGrids::claim_rights_forwarder`]).
    forwarder: AtomicBool,
}

impl LiveGrids {
    /// Registers an open session stream's wake handle for [`LiveGrids::announce_rights`]
    /// (until the stream drops it). Dead entries are dropped when the list would grow,
    /// so it holds at most about twice the streams open.
    pub fn register_stream(&self, wake: &Arc<StreamWake>) {
        let mut wakes = self.streams.wakes.lock();
        if wakes.len() == wakes.capacity() {
            wakes.retain(|w| w.strong_count() > 0);
            if wakes.len() > wakes.capacity() / 2 {
                // Mostly live: grow now, so the next sweep is as far away again.
                let more = wakes.capacity().max(16);
                wakes.reserve(more);
            }
        }
        wakes.push(Arc::downgrade(wake));
    }

    /// Raises [`RIGHTS`] on every open session stream (they compare what they sent with
    /// the current key sets and revocations). Returns how many were woken.
    pub fn announce_rights(&self) -> usize {
        let mut wakes = self.streams.wakes.lock();
        wakes.retain(|w| match w.upgrade() {
            Some(w) => {
                w.raise(RIGHTS);
                true
            }
            None => false,
        });
        wakes.len()
    }

    /// True exactly once per process grid: the caller starts the task that calls
    /// [`LiveGrids::announce_rights`] at every rights change.
    pub fn claim_rights_forwarder(&self) -> bool {
        !self.streams.forwarder.swap(true, Ordering::AcqRel)
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
    pub broadcast_id: Arc<str>,
    /// The session's id (shared with the grid's own copy).
    pub session_id: Arc<str>,
}

impl LiveGrids {
    /// Attaches a session stream: the grid wakes `wake` whenever it moves the peer or
    /// removes it, and the session no longer expires by silence. A previous stream of
    /// the same session is superseded (woken, it ends). `None` when the session is not
    /// in a grid of this process.
    pub fn attach(&self, session_id: &str, wake: &Arc<StreamWake>) -> Option<Attached> {
        let (grid, peer_id, shared_id) = {
            let sessions = self.sessions.lock();
            let (id, e) = sessions.get_key_value(session_id)?;
            (e.grid.clone(), e.peer_id, id.clone())
        };
        let generation = self.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now();
        let old = {
            let mut st = grid.state.lock();
            let slot = st.peers.get_mut(&peer_id)?;
            let old = slot.wake.replace(wake.clone());
            let punch_pending = slot.punch && !slot.punch_failed;
            // Grid → sessions is the allowed nesting.
            let on_probation = {
                let mut sessions = self.sessions.lock();
                match sessions.get_mut(session_id) {
                    Some(e) => {
                        e.stream = generation;
                        e.last_seen = now;
                        e.upload.on_probation_now()
                    }
                    None => return None,
                }
            };
            if punch_pending && on_probation {
                // A relay reachable only by hole punching gets children once it can be
                // told to punch ([`LiveGrids::probed`]).
                let moved = self.grant_locked(&mut st, session_id, peer_id, Vec::new());
                tracing::debug!(
                    session_id,
                    moved,
                    "punch-only relay attached: children granted"
                );
            }
            old
        };
        if let Some(old) = old {
            old.supersede();
        }
        Some(Attached {
            generation,
            peer_id,
            broadcast_id: grid.id.clone(),
            session_id: shared_id,
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
