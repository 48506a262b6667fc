//! The C ABI of the Starling client SDK: `libstarling_sdk_ffi.so` / `.a` and
//! `include/starling.h` (generated from this crate by cbindgen; a test fails when the
//! committed header drifts).
//!
//! A C program fills a [`StarlingConfig`] (from [`starling_config_default`]), creates a
//! viewer ([`starling_viewer_new`]), starts it ([`starling_viewer_start`]: joins the
//! broadcast), and then either pulls the in-order stream ([`starling_viewer_read`],
//! with a timeout) or has it pushed to a callback on a library thread
//! ([`starling_viewer_set_data_callback`]); [`starling_viewer_stats`] fills a plain
//! struct; [`starling_viewer_stop`] leaves and [`starling_viewer_free`] releases
//! everything. Each viewer owns its tokio runtime.
//!
//! Errors are [`StarlingStatus`] codes plus a message in a thread-local
//! ([`starling_last_error`]). No panic crosses the boundary: every entry point runs
//! under `catch_unwind` ([`guard`]) and checks its pointers. The threading and ownership
//! rules are at the top of the header (`cbindgen.toml`) and in the README.

// The workspace denies unsafe code; this crate is the one place where it is the job:
// C pointers in, C strings and structs out. Each unsafe block is small and carries a
// `// SAFETY:` line naming the caller's contract it relies on.
#![allow(unsafe_code)]

pub mod config;
pub mod guard;
pub mod stats;
pub mod status;
pub mod viewer;

use std::ffi::{c_char, c_void};

pub use config::StarlingConfig;
pub use stats::StarlingStats;
pub use status::StarlingStatus;

use guard::{call, call_or, non_null};
use status::Failure;
use viewer::ViewerCore;

/// `timeout_ms` for `starling_viewer_read`: wait until bytes arrive or the stream ends.
pub const STARLING_WAIT_FOREVER: u32 = u32::MAX;

/// A viewer: opaque; created by `starling_viewer_new`, released by
/// `starling_viewer_free`.
pub struct StarlingViewer {
    core: ViewerCore,
}

/// Receives the stream on the library's callback thread: `len` bytes at `data`
/// (valid only during the call; copy what you keep), in order, starting at a
/// random-access point. Called once more with `data` NULL and `len` 0 when the stream
/// ends (after `starling_viewer_stop`, or when the broadcast ends). Must not call
/// `starling_viewer_stop` or `starling_viewer_free` on its own viewer. A callback that
/// blocks delays only this viewer's stream; one that falls more than
/// `read_queue_chunks` behind skips to the next random-access chunk.
pub type StarlingDataCallback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, data: *const u8, len: usize)>;

/// The library's version, e.g. "0.1.0" (static string).
#[unsafe(no_mangle)]
pub extern "C" fn starling_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The name of a status code, e.g. "STARLING_ERR_NETWORK" (static string;
/// "STARLING_UNKNOWN" for a value that is no code).
#[unsafe(no_mangle)]
pub extern "C" fn starling_status_name(status: i32) -> *const c_char {
    call_or("starling_status_name", c"STARLING_UNKNOWN".as_ptr(), || {
        status::ALL
            .iter()
            .find(|s| **s as i32 == status)
            .map_or(c"STARLING_UNKNOWN".as_ptr(), |s| s.name().as_ptr())
    })
}

/// The message of the last call on this thread that returned an error (a negative
/// code), NUL-terminated; "" if none did. Owned by the library and valid until the next
/// call into the library on this thread: copy it to keep it. Successful calls leave
/// it unchanged.
#[unsafe(no_mangle)]
pub extern "C" fn starling_last_error() -> *const c_char {
    call_or("starling_last_error", c"".as_ptr(), status::last_error_ptr)
}

/// The default configuration (see `StarlingConfig`). Its strings are static.
#[unsafe(no_mangle)]
pub extern "C" fn starling_config_default() -> StarlingConfig {
    // `default_config` cannot fail or panic; `call_or` needs a fallback value all the
    // same, and a zeroed config is refused by `starling_viewer_new`.
    call_or(
        "starling_config_default",
        config::zeroed(),
        config::default_config,
    )
}

/// Creates a viewer from `config` (copied: its strings need not outlive the call) and
/// stores it in `*out` (NULL on failure). Starts the viewer's runtime threads; does
/// not connect yet.
///
/// # Safety
/// `config` points to a `StarlingConfig` whose strings are NULL or NUL-terminated;
/// `out` points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_new(
    config: *const StarlingConfig,
    out: *mut *mut StarlingViewer,
) -> StarlingStatus {
    call("starling_viewer_new", || {
        non_null(out, "out")?;
        // SAFETY: `out` is non-NULL and writable (caller's contract).
        unsafe { out.write(std::ptr::null_mut()) };
        non_null(config, "config")?;
        // SAFETY: non-NULL, points to a StarlingConfig (caller's contract).
        let c = unsafe { &*config };
        // SAFETY: its strings are NULL or NUL-terminated (caller's contract).
        let settings = unsafe { config::settings(c) }?;
        let core = ViewerCore::new(settings)?;
        let v = Box::into_raw(Box::new(StarlingViewer { core }));
        // SAFETY: as above.
        unsafe { out.write(v) };
        Ok(StarlingStatus::StarlingOk)
    })
}

/// The viewer behind `v`, or `STARLING_ERR_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `v` is NULL or a viewer from `starling_viewer_new` not yet freed.
unsafe fn viewer<'a>(v: *const StarlingViewer) -> Result<&'a ViewerCore, Failure> {
    non_null(v, "viewer")?;
    // SAFETY: non-NULL and live (caller's contract); only shared references are made.
    Ok(unsafe { &(*v).core })
}

/// Registers `callback` (NULL: none) to receive the stream instead of
/// `starling_viewer_read`. Only before `starling_viewer_start`. `user_data` is passed
/// back untouched, on the library's callback thread.
///
/// # Safety
/// `v` is a live viewer; `callback` is NULL or a function with this signature that
/// stays callable until `starling_viewer_stop` returns; `user_data` may be used on
/// another thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_set_data_callback(
    v: *mut StarlingViewer,
    callback: StarlingDataCallback,
    user_data: *mut c_void,
) -> StarlingStatus {
    call("starling_viewer_set_data_callback", || {
        // SAFETY: caller's contract on `v`.
        let core = unsafe { viewer(v) }?;
        core.set_callback(callback.map(|func| viewer::Callback { func, user_data }))?;
        Ok(StarlingStatus::StarlingOk)
    })
}

/// Joins the broadcast (through the control plane, or straight at
/// `config.dataplane_addr`) and starts receiving. Blocks until joined or failed (Join
/// retries while the control plane is overloaded, up to `join_deadline_ms`). Once per
/// viewer; after a failure, free the viewer and create a new one.
///
/// # Safety
/// `v` is a live viewer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_start(v: *mut StarlingViewer) -> StarlingStatus {
    call("starling_viewer_start", || {
        // SAFETY: caller's contract on `v`.
        unsafe { viewer(v) }?.start()?;
        Ok(StarlingStatus::StarlingOk)
    })
}

/// Copies up to `cap` bytes of the stream into `buf` and stores their number in
/// `*out_len` (0 unless STARLING_OK). Waits up to `timeout_ms` for bytes (0: do not
/// wait; STARLING_WAIT_FOREVER: no limit). Returns STARLING_OK (some bytes),
/// STARLING_TIMEOUT (none yet: call again), STARLING_END_OF_STREAM (the broadcast
/// ended or the viewer was stopped, and everything was read), or the error the viewer
/// stopped with. The bytes concatenated are the media stream (e.g. MPEG-TS), starting
/// at a random-access point. Concurrent reads of one viewer take turns.
///
/// # Safety
/// `v` is a live viewer; `buf` is writable for `cap` bytes; `out_len` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_read(
    v: *mut StarlingViewer,
    buf: *mut u8,
    cap: usize,
    timeout_ms: u32,
    out_len: *mut usize,
) -> StarlingStatus {
    call("starling_viewer_read", || {
        non_null(out_len, "out_len")?;
        // SAFETY: non-NULL and writable (caller's contract).
        unsafe { out_len.write(0) };
        // SAFETY: caller's contract on `v`.
        let core = unsafe { viewer(v) }?;
        non_null(buf, "buf")?;
        // SAFETY: non-NULL and writable for `cap` bytes (caller's contract); the slice
        // lives only for this call.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
        let (status, n) = core.read(buf, timeout_ms)?;
        // SAFETY: as above.
        unsafe { out_len.write(n) };
        Ok(status)
    })
}

/// Fills `*out` with a snapshot of the viewer's counters (zeros before start; the
/// last snapshot after stop).
///
/// # Safety
/// `v` is a live viewer; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_stats(
    v: *const StarlingViewer,
    out: *mut StarlingStats,
) -> StarlingStatus {
    call("starling_viewer_stats", || {
        non_null(out, "out")?;
        // SAFETY: caller's contract on `v`.
        let s = unsafe { viewer(v) }?.stats();
        // SAFETY: non-NULL and writable (caller's contract).
        unsafe { out.write(s) };
        Ok(StarlingStatus::StarlingOk)
    })
}

/// Copies the URL of the viewer's local HTTP endpoint (open it in any media player,
/// e.g. "http://127.0.0.1:PORT/live/ID") into `buf`, NUL-terminated.
/// STARLING_ERR_INVALID_STATE when not running or started without `http_listen`;
/// STARLING_ERR_BUFFER_TOO_SMALL when `cap` is too small (the message says how much
/// is needed).
///
/// # Safety
/// `v` is a live viewer; `buf` is writable for `cap` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_local_url(
    v: *const StarlingViewer,
    buf: *mut c_char,
    cap: usize,
) -> StarlingStatus {
    call("starling_viewer_local_url", || {
        // SAFETY: caller's contract on `v`.
        let core = unsafe { viewer(v) }?;
        non_null(buf, "buf")?;
        let url = core
            .local_url()
            .ok_or_else(|| Failure::state("no local HTTP endpoint (not running, or disabled)"))?;
        if url.len() >= cap {
            return Err(Failure::new(
                StarlingStatus::StarlingErrBufferTooSmall,
                format!("the URL needs {} bytes", url.len() + 1),
            ));
        }
        // SAFETY: `buf` is writable for `cap` > `url.len()` bytes (caller's contract),
        // and cannot overlap the library's own string.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), cap) };
        dst[..url.len()].copy_from_slice(url.as_bytes());
        dst[url.len()] = 0;
        Ok(StarlingStatus::StarlingOk)
    })
}

/// Leaves the broadcast (tells the control plane; bounded to a few seconds when it is
/// unreachable), ends the stream (a pending `starling_viewer_read` returns the rest,
/// then STARLING_END_OF_STREAM; the callback gets its end call), and waits for the
/// callback thread. Idempotent. Not from inside the data callback
/// (STARLING_ERR_INVALID_STATE).
///
/// # Safety
/// `v` is a live viewer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_stop(v: *mut StarlingViewer) -> StarlingStatus {
    call("starling_viewer_stop", || {
        // SAFETY: caller's contract on `v`.
        unsafe { viewer(v) }?.stop()?;
        Ok(StarlingStatus::StarlingOk)
    })
}

/// Stops the viewer if needed and releases it and its runtime. NULL is ignored. No
/// other call on this viewer may be in progress or made afterwards. Called from inside
/// the data callback, it does nothing (and sets the last error): free after
/// `starling_viewer_stop` returns instead.
///
/// # Safety
/// `v` is NULL or a live viewer, freed only once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_viewer_free(v: *mut StarlingViewer) {
    call_or("starling_viewer_free", (), || {
        if v.is_null() {
            return;
        }
        // SAFETY: non-NULL and live (caller's contract).
        if unsafe { &(*v).core }.on_callback_thread() {
            status::set_last_error(
                "starling_viewer_free: called from inside the data callback; not freed",
            );
            return;
        }
        // SAFETY: from `Box::into_raw` in `starling_viewer_new`, freed only once
        // (caller's contract); nothing else uses it now.
        drop(unsafe { Box::from_raw(v) });
    })
}
