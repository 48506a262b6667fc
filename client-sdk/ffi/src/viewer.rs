//! The viewer behind a `StarlingViewer*`: its own tokio runtime, the SDK [`Viewer`], and
//! the one consumer of its stream: either the pull reader ([`ViewerCore::read`]) or
//! the data callback's thread. Safe Rust only; the pointers are handled in `lib.rs`.
//!
//! Locks: `state` (phase, the SDK viewer, the callback) is held briefly: never while
//! joining, reading or leaving, at most 1 s while collecting the reason the stream
//! ended; `reader` is held by a read for at most its timeout (reads take turns).
//! Called from a thread that runs a tokio runtime (a Rust host), the blocking calls
//! fail with `STARLING_ERR_INTERNAL` (a runtime cannot block inside another).

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use starling_sdk::{SdkError, Subscription, Viewer};
use tokio::runtime::Runtime;

use crate::config::Settings;
use crate::stats::StarlingStats;
use crate::status::{Failure, StarlingStatus, status_of};

/// The data callback as C declares it: `user_data`, then the bytes (NULL and 0 once,
/// at the end of the stream).
pub type DataCallback = unsafe extern "C" fn(user_data: *mut c_void, data: *const u8, len: usize);

/// A registered data callback and its `user_data`.
#[derive(Clone, Copy)]
pub struct Callback {
    pub func: DataCallback,
    pub user_data: *mut c_void,
}

// SAFETY: the header's contract: `user_data` is handed to the callback on the
// library's callback thread; the caller registers it knowing that (the library never
// dereferences it).
unsafe impl Send for Callback {}

impl Callback {
    fn deliver(&self, data: &[u8]) {
        // SAFETY: `func` is the caller's callback with the documented signature; `data`
        // is valid for `len` bytes during the call.
        unsafe { (self.func)(self.user_data, data.as_ptr(), data.len()) }
    }

    fn end(&self) {
        // SAFETY: as in `deliver`; NULL and 0 mark the end, as documented.
        unsafe { (self.func)(self.user_data, std::ptr::null(), 0) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Starting,
    Running,
    Stopped,
}

struct State {
    phase: Phase,
    settings: Option<Settings>,
    viewer: Option<Viewer>,
    callback: Option<Callback>,
    callback_thread: Option<(ThreadId, JoinHandle<()>)>,
    /// Counters at stop, so stats keep answering afterwards.
    final_stats: Option<starling_sdk::Stats>,
    /// Why the viewer ended, once known: `Ok` for a normal end.
    end: Option<Result<(), SdkError>>,
}

struct Reader {
    sub: Option<Subscription>,
    pending: Bytes,
}

/// One viewer, as the C API sees it.
pub struct ViewerCore {
    rt: Option<Runtime>,
    state: Mutex<State>,
    reader: Mutex<Reader>,
    /// Bytes handed to the reader or the callback.
    bytes_read: Arc<AtomicU64>,
}

impl ViewerCore {
    /// A viewer that has not joined yet, with its runtime started.
    pub fn new(settings: Settings) -> Result<ViewerCore, Failure> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.worker_threads)
            .thread_name("starling-sdk")
            .enable_all()
            .build()
            .map_err(|e| {
                Failure::new(
                    StarlingStatus::StarlingErrRuntime,
                    format!("cannot start the runtime: {e}"),
                )
            })?;
        Ok(ViewerCore {
            rt: Some(rt),
            state: Mutex::new(State {
                phase: Phase::Created,
                settings: Some(settings),
                viewer: None,
                callback: None,
                callback_thread: None,
                final_stats: None,
                end: None,
            }),
            reader: Mutex::new(Reader {
                sub: None,
                pending: Bytes::new(),
            }),
            bytes_read: Arc::new(AtomicU64::new(0)),
        })
    }

    fn rt(&self) -> Result<&Runtime, Failure> {
        self.rt
            .as_ref()
            .ok_or_else(|| Failure::state("the viewer is being freed"))
    }

    /// Registers the data callback (before start only).
    pub fn set_callback(&self, cb: Option<Callback>) -> Result<(), Failure> {
        let mut st = self.state.lock();
        if st.phase != Phase::Created {
            return Err(Failure::state(
                "the data callback can only be set before starling_viewer_start",
            ));
        }
        st.callback = cb;
        Ok(())
    }

    /// Joins (or connects directly) and starts the consumer. Blocks until joined.
    pub fn start(&self) -> Result<(), Failure> {
        let settings = {
            let mut st = self.state.lock();
            if st.phase != Phase::Created {
                return Err(Failure::state("the viewer was already started"));
            }
            st.phase = Phase::Starting;
            st.settings.take()
        };
        let Some(settings) = settings else {
            return Err(Failure::state("the viewer has no configuration"));
        };
        let rt = self.rt()?;
        let joined = rt.block_on(async move {
            match settings.dataplane {
                Some(addr) => Viewer::connect_direct(addr, settings.viewer).await,
                None => Viewer::join(settings.viewer).await,
            }
        });
        let mut st = self.state.lock();
        let viewer = match joined {
            Ok(v) => v,
            Err(e) => {
                st.phase = Phase::Stopped;
                st.end = Some(Err(e.clone()));
                return Err(e.into());
            }
        };
        // Subscribe at once, so the stream starts at the newest random-access chunk.
        let sub = viewer.subscribe();
        if let Some(cb) = st.callback {
            let handle = rt.handle().clone();
            let count = self.bytes_read.clone();
            let spawned = std::thread::Builder::new()
                .name("starling-callback".into())
                .spawn(move || run_callback(handle, sub, cb, &count));
            match spawned {
                Ok(t) => st.callback_thread = Some((t.thread().id(), t)),
                Err(e) => {
                    st.phase = Phase::Stopped;
                    drop(viewer);
                    return Err(Failure::new(
                        StarlingStatus::StarlingErrRuntime,
                        format!("cannot start the callback thread: {e}"),
                    ));
                }
            }
        } else {
            self.reader.lock().sub = Some(sub);
        }
        st.viewer = Some(viewer);
        st.phase = Phase::Running;
        Ok(())
    }

    /// Copies up to `buf.len()` stream bytes into `buf`, waiting up to `timeout_ms`.
    /// `Ok((STARLING_OK, n))` with `n > 0`, `(STARLING_TIMEOUT, 0)`,
    /// `(STARLING_END_OF_STREAM, 0)`, or the error the viewer stopped with.
    pub fn read(
        &self,
        buf: &mut [u8],
        timeout_ms: u32,
    ) -> Result<(StarlingStatus, usize), Failure> {
        if buf.is_empty() {
            return Err(Failure::invalid("the buffer is empty (cap 0)"));
        }
        let mut r = self.reader.lock();
        if r.pending.is_empty() {
            let Some(sub) = r.sub.as_mut() else {
                drop(r);
                return self.read_without_stream();
            };
            let next = match timeout_ms {
                crate::STARLING_WAIT_FOREVER => Ok(self.rt()?.block_on(sub.next_bytes())),
                // The timer is made inside the runtime (it needs its time driver).
                ms => self.rt()?.block_on(async {
                    tokio::time::timeout(Duration::from_millis(ms.into()), sub.next_bytes()).await
                }),
            };
            match next {
                Err(_elapsed) => return Ok((StarlingStatus::StarlingTimeout, 0)),
                Ok(Some(b)) => r.pending = b,
                Ok(None) => {
                    r.sub = None;
                    drop(r);
                    return self.end_of_stream();
                }
            }
        }
        let n = buf.len().min(r.pending.len());
        buf[..n].copy_from_slice(&r.pending[..n]);
        r.pending.advance(n);
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        Ok((StarlingStatus::StarlingOk, n))
    }

    /// `read` when there is no stream to read from: why.
    fn read_without_stream(&self) -> Result<(StarlingStatus, usize), Failure> {
        let st = self.state.lock();
        match st.phase {
            Phase::Created | Phase::Starting => Err(Failure::state(
                "starling_viewer_read before starling_viewer_start returned",
            )),
            Phase::Running if st.callback.is_some() => Err(Failure::state(
                "a data callback is registered: the stream goes there, not to read",
            )),
            Phase::Running | Phase::Stopped => {
                drop(st);
                self.end_of_stream()
            }
        }
    }

    /// The stream ended: `STARLING_END_OF_STREAM` for a normal end, else the error the
    /// viewer stopped with.
    fn end_of_stream(&self) -> Result<(StarlingStatus, usize), Failure> {
        let end = {
            let mut st = self.state.lock();
            if st.end.is_none()
                && let Some(v) = st.viewer.as_ref()
                && v.is_closed()
            {
                let closed = self.rt()?.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), v.closed()).await
                });
                st.end = Some(closed.unwrap_or(Ok(())));
            }
            st.end.clone()
        };
        match end {
            None | Some(Ok(())) => Ok((StarlingStatus::StarlingEndOfStream, 0)),
            Some(Err(e)) => match status_of(&e) {
                StarlingStatus::StarlingEndOfStream => Ok((StarlingStatus::StarlingEndOfStream, 0)),
                _ => Err(e.into()),
            },
        }
    }

    /// A snapshot of the counters (the last one before stop, after it).
    pub fn stats(&self) -> StarlingStats {
        let st = self.state.lock();
        let sdk = match (&st.viewer, &st.final_stats) {
            (Some(v), _) => v.stats(),
            (None, Some(s)) => s.clone(),
            (None, None) => starling_sdk::Stats::default(),
        };
        StarlingStats::from_sdk(&sdk, self.bytes_read.load(Ordering::Relaxed))
    }

    /// The local HTTP endpoint's URL, once started with one.
    pub fn local_url(&self) -> Option<String> {
        self.state
            .lock()
            .viewer
            .as_ref()
            .and_then(|v| v.local_url())
    }

    /// Leaves the broadcast (best effort, bounded in time), ends the stream for the
    /// reader or callback (which then drain what is queued), and waits for the
    /// callback thread. Idempotent.
    pub fn stop(&self) -> Result<(), Failure> {
        let (viewer, thread) = {
            let mut st = self.state.lock();
            if let Some((id, _)) = &st.callback_thread
                && *id == std::thread::current().id()
            {
                return Err(Failure::state(
                    "starling_viewer_stop called from inside the data callback",
                ));
            }
            match st.phase {
                Phase::Starting => {
                    return Err(Failure::state("starling_viewer_start has not returned yet"));
                }
                Phase::Created | Phase::Stopped => {
                    st.phase = Phase::Stopped;
                    (None, st.callback_thread.take())
                }
                Phase::Running => {
                    st.phase = Phase::Stopped;
                    let v = st.viewer.take();
                    if let Some(v) = &v {
                        st.final_stats = Some(v.stats());
                    }
                    (v, st.callback_thread.take())
                }
            }
        };
        if let Some(v) = viewer {
            let rt = self.rt()?;
            let end = rt.block_on(async {
                let end = match v.is_closed() {
                    true => tokio::time::timeout(Duration::from_secs(1), v.closed())
                        .await
                        .unwrap_or(Ok(())),
                    false => Ok(()),
                };
                // Best effort: an unreachable control plane must not fail the stop.
                let _ = v.leave().await;
                end
            });
            let mut st = self.state.lock();
            if st.end.is_none() {
                st.end = Some(end);
            }
        }
        if let Some((_, t)) = thread {
            // The callback ends when the stream does (the viewer is gone).
            let _ = t.join();
        }
        Ok(())
    }

    /// True when called from inside the data callback.
    pub fn on_callback_thread(&self) -> bool {
        self.state
            .lock()
            .callback_thread
            .as_ref()
            .is_some_and(|(id, _)| *id == std::thread::current().id())
    }
}

impl Drop for ViewerCore {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// The callback thread: every piece of the stream, then the end mark.
fn run_callback(
    rt: tokio::runtime::Handle,
    mut sub: Subscription,
    cb: Callback,
    count: &AtomicU64,
) {
    while let Some(b) = rt.block_on(sub.next_bytes()) {
        count.fetch_add(b.len() as u64, Ordering::Relaxed);
        cb.deliver(&b);
    }
    cb.end();
}
