//! The C API called as C would call it (through the `extern "C"` functions): NULL
//! pointers and bad configurations are error codes with messages, never crashes;
//! state errors; a failed start; and against a live in-process deployment, one viewer
//! pulling with `starling_viewer_read` (unblocked by a stop from another thread) and
//! one fed by the data callback (which gets its end call).
// Calling the C ABI from Rust is unsafe by nature; the workspace denies it elsewhere.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::{CStr, CString, c_void};
use std::ptr::{null, null_mut};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use starling_loadtest::{Deployment, DeploymentConfig};
use starling_sdk_ffi::*;

const GUARD: Duration = Duration::from_secs(90);

fn last_error() -> String {
    // SAFETY: the library's thread-local message, read before the next call.
    unsafe { CStr::from_ptr(starling_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn name(s: StarlingStatus) -> String {
    // SAFETY: static string.
    unsafe { CStr::from_ptr(starling_status_name(s as i32)) }
        .to_string_lossy()
        .into_owned()
}

/// A viewer of `broadcast` at `control_url` (an https:// one verified with the PEM
/// file `ca_file`; an http:// one with the plaintext opt-in); panics when creation
/// fails.
fn new_viewer(
    control_url: &CStr,
    ca_file: Option<&CStr>,
    broadcast: &CStr,
    relay: bool,
) -> *mut StarlingViewer {
    let config = StarlingConfig {
        control_url: control_url.as_ptr(),
        ca_file: ca_file.map_or(std::ptr::null(), CStr::as_ptr),
        insecure_plaintext: control_url.to_bytes().starts_with(b"http://"),
        broadcast_id: broadcast.as_ptr(),
        relay,
        worker_threads: 1,
        ..starling_config_default()
    };
    let mut v = null_mut();
    // SAFETY: a valid config with live strings, a valid out pointer.
    let s = unsafe { starling_viewer_new(&config, &mut v) };
    assert_eq!(s, StarlingStatus::StarlingOk, "{}", last_error());
    assert!(!v.is_null());
    v
}

fn stats(v: *mut StarlingViewer) -> StarlingStats {
    let mut st = StarlingStats::default();
    // SAFETY: a live viewer, a writable struct.
    let s = unsafe { starling_viewer_stats(v, &mut st) };
    assert_eq!(s, StarlingStatus::StarlingOk);
    st
}

#[test]
fn null_pointers_and_bad_configs_are_errors_with_messages() {
    let mut v = null_mut();
    // SAFETY (this test): every pointer is NULL or valid; NULLs are what is tested.
    let s = unsafe { starling_viewer_new(null(), &mut v) };
    assert_eq!(s, StarlingStatus::StarlingErrInvalidArgument);
    assert!(last_error().contains("config is NULL"), "{}", last_error());
    assert!(v.is_null());
    let config = starling_config_default();
    assert_eq!(
        unsafe { starling_viewer_new(&config, null_mut()) },
        StarlingStatus::StarlingErrInvalidArgument
    );
    // The default has no broadcast id.
    assert_eq!(
        unsafe { starling_viewer_new(&config, &mut v) },
        StarlingStatus::StarlingErrConfig
    );
    assert!(last_error().contains("broadcast_id"), "{}", last_error());
    let bad = StarlingConfig {
        broadcast_id: c"b".as_ptr(),
        peer_listen: c"not an address".as_ptr(),
        ..config
    };
    assert_eq!(
        unsafe { starling_viewer_new(&bad, &mut v) },
        StarlingStatus::StarlingErrConfig
    );
    assert!(last_error().contains("peer_listen"), "{}", last_error());
    // An http:// control URL without the plaintext opt-in.
    let plain = StarlingConfig {
        broadcast_id: c"b".as_ptr(),
        control_url: c"http://127.0.0.1:7000".as_ptr(),
        ..config
    };
    assert_eq!(
        unsafe { starling_viewer_new(&plain, &mut v) },
        StarlingStatus::StarlingErrConfig
    );
    assert!(last_error().contains("plaintext"), "{}", last_error());

    let mut n = 7usize;
    let mut buf = [0u8; 16];
    assert_eq!(
        unsafe { starling_viewer_read(null_mut(), buf.as_mut_ptr(), 16, 0, &mut n) },
        StarlingStatus::StarlingErrInvalidArgument
    );
    assert_eq!(n, 0, "out_len is cleared");
    let mut st = StarlingStats::default();
    assert_eq!(
        unsafe { starling_viewer_stats(null(), &mut st) },
        StarlingStatus::StarlingErrInvalidArgument
    );
    assert_eq!(
        unsafe { starling_viewer_start(null_mut()) },
        StarlingStatus::StarlingErrInvalidArgument
    );
    assert_eq!(
        unsafe { starling_viewer_stop(null_mut()) },
        StarlingStatus::StarlingErrInvalidArgument
    );
    unsafe { starling_viewer_free(null_mut()) };

    assert_eq!(
        name(StarlingStatus::StarlingErrNetwork),
        "STARLING_ERR_NETWORK"
    );
    // SAFETY: static strings.
    let unknown = unsafe { CStr::from_ptr(starling_status_name(99)) };
    assert_eq!(unknown.to_str().unwrap(), "STARLING_UNKNOWN");
    let version = unsafe { CStr::from_ptr(starling_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn an_unreachable_control_plane_fails_start_and_state_errors_are_reported() {
    // Port 1 on loopback: nothing listens there.
    let v = new_viewer(c"http://127.0.0.1:1", None, c"nope", false);
    let mut buf = [0u8; 16];
    let mut n = 0usize;
    // SAFETY (this test): `v` is live until freed at the end; buffers are valid.
    assert_eq!(
        unsafe { starling_viewer_read(v, buf.as_mut_ptr(), buf.len(), 0, &mut n) },
        StarlingStatus::StarlingErrInvalidState
    );
    assert!(
        last_error().contains("before starling_viewer_start"),
        "{}",
        last_error()
    );
    let mut url = [0 as std::ffi::c_char; 64];
    assert_eq!(
        unsafe { starling_viewer_local_url(v, url.as_mut_ptr(), url.len()) },
        StarlingStatus::StarlingErrInvalidState
    );
    let s = unsafe { starling_viewer_start(v) };
    assert_eq!(
        s,
        StarlingStatus::StarlingErrControlPlane,
        "{}: {}",
        name(s),
        last_error()
    );
    assert!(!last_error().is_empty());
    assert_eq!(
        unsafe { starling_viewer_start(v) },
        StarlingStatus::StarlingErrInvalidState,
        "start is once per viewer"
    );
    assert_eq!(
        unsafe { starling_viewer_stop(v) },
        StarlingStatus::StarlingOk
    );
    unsafe { starling_viewer_free(v) };
}

/// What the data callback collected.
#[derive(Default)]
struct Collected {
    bytes: u64,
    calls: u64,
    ended: bool,
    after_end: bool,
}

unsafe extern "C" fn on_data(user: *mut c_void, data: *const u8, len: usize) {
    // SAFETY: `user` is the `Mutex<Collected>` the test registered, alive until after
    // stop returns.
    let c = unsafe { &*(user as *const Mutex<Collected>) };
    let mut c = c.lock().unwrap();
    if c.ended {
        c.after_end = true;
    }
    if data.is_null() {
        assert_eq!(len, 0);
        c.ended = true;
    } else {
        c.bytes += len as u64;
        c.calls += 1;
    }
}

#[test]
fn pull_and_callback_viewers_play_a_live_broadcast_and_stop_cleanly() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dep = rt
        .block_on(Deployment::start(DeploymentConfig::default()))
        .expect("deployment");
    let control = CString::new(dep.control_url()).unwrap();
    let broadcast = CString::new(dep.broadcast_id()).unwrap();
    // TLS with the deployment's throwaway CA.
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca_dir.path().join("ca.pem");
    std::fs::write(&ca_path, dep.ca_pem().unwrap()).unwrap();
    let ca = CString::new(ca_path.to_str().unwrap()).unwrap();

    // The callback viewer.
    let collected = Box::new(Mutex::new(Collected::default()));
    let user = &*collected as *const Mutex<Collected> as *mut c_void;
    let cbv = new_viewer(&control, Some(&ca), &broadcast, true);
    // SAFETY (this test): the viewers are live until freed at the end; `user` outlives
    // them; buffers are valid.
    let s = unsafe { starling_viewer_set_data_callback(cbv, Some(on_data), user) };
    assert_eq!(s, StarlingStatus::StarlingOk);
    assert_eq!(
        unsafe { starling_viewer_start(cbv) },
        StarlingStatus::StarlingOk,
        "{}",
        last_error()
    );
    assert_eq!(
        unsafe { starling_viewer_set_data_callback(cbv, None, null_mut()) },
        StarlingStatus::StarlingErrInvalidState,
        "only before start"
    );
    let mut buf = [0u8; 4096];
    let mut n = 0usize;
    assert_eq!(
        unsafe { starling_viewer_read(cbv, buf.as_mut_ptr(), buf.len(), 0, &mut n) },
        StarlingStatus::StarlingErrInvalidState,
        "the stream goes to the callback"
    );

    // The pulling viewer, read on another thread with no time limit.
    let pull = new_viewer(&control, Some(&ca), &broadcast, true);
    assert_eq!(
        unsafe { starling_viewer_start(pull) },
        StarlingStatus::StarlingOk,
        "{}",
        last_error()
    );
    let mut url = [0 as std::ffi::c_char; 256];
    assert_eq!(
        unsafe { starling_viewer_local_url(pull, url.as_mut_ptr(), url.len()) },
        StarlingStatus::StarlingOk
    );
    let url = unsafe { CStr::from_ptr(url.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with(dep.broadcast_id()),
        "{url}"
    );
    let mut tiny = [0 as std::ffi::c_char; 8];
    assert_eq!(
        unsafe { starling_viewer_local_url(pull, tiny.as_mut_ptr(), tiny.len()) },
        StarlingStatus::StarlingErrBufferTooSmall
    );
    let pull_addr = pull as usize;
    let reader = std::thread::spawn(move || {
        let v = pull_addr as *mut StarlingViewer;
        let mut buf = vec![0u8; 1000];
        let (mut total, mut reads) = (0u64, 0u64);
        loop {
            let mut n = 0usize;
            // SAFETY: the viewer is freed only after this thread is joined.
            let s = unsafe {
                starling_viewer_read(
                    v,
                    buf.as_mut_ptr(),
                    buf.len(),
                    STARLING_WAIT_FOREVER,
                    &mut n,
                )
            };
            match s {
                StarlingStatus::StarlingOk => {
                    assert!(n > 0 && n <= buf.len());
                    total += n as u64;
                    reads += 1;
                }
                other => return (other, total, reads),
            }
        }
    });

    // Both get the stream.
    let deadline = Instant::now() + GUARD;
    while stats(pull).bytes_read < 50_000 || collected.lock().unwrap().bytes < 50_000 {
        assert!(
            Instant::now() < deadline,
            "no stream: pull {:?}, callback {} bytes",
            stats(pull),
            collected.lock().unwrap().bytes
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Stopping from this thread ends the other thread's endless read.
    assert_eq!(
        unsafe { starling_viewer_stop(pull) },
        StarlingStatus::StarlingOk
    );
    let (end, total, reads) = reader.join().unwrap();
    assert_eq!(end, StarlingStatus::StarlingEndOfStream, "{}", name(end));
    let st = stats(pull);
    assert_eq!(st.bytes_read, total, "stats count what was read");
    assert!(
        reads > total / 1000,
        "reads are cut to the buffer: {reads} reads of {total} bytes"
    );
    assert!(st.chunks_verified > 0 && st.bad_chunks == 0, "{st:?}");
    assert!(st.startup_ms >= 0, "{st:?}");
    assert_eq!(
        unsafe { starling_viewer_read(pull, buf.as_mut_ptr(), buf.len(), 0, &mut n) },
        StarlingStatus::StarlingEndOfStream,
        "and stays ended"
    );
    assert_eq!(
        unsafe { starling_viewer_stop(pull) },
        StarlingStatus::StarlingOk,
        "idempotent"
    );

    assert_eq!(
        unsafe { starling_viewer_stop(cbv) },
        StarlingStatus::StarlingOk
    );
    {
        let c = collected.lock().unwrap();
        assert!(c.ended, "the callback got its end call");
        assert!(!c.after_end, "nothing after the end call");
        assert_eq!(stats(cbv).bytes_read, c.bytes);
        assert!(c.calls > 0);
    }
    unsafe {
        starling_viewer_free(pull);
        starling_viewer_free(cbv);
    }
    drop(collected);
    rt.block_on(dep.shutdown());
}
