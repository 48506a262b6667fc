//! The C configuration struct ([`StarlingConfig`]), its defaults, and its translation
//! into the SDK's [`ViewerConfig`] (strings copied, addresses parsed, ranges checked).

use std::ffi::{CStr, c_char};
use std::net::SocketAddr;
use std::time::Duration;

use starling_sdk::{RelayConfig, ViewerConfig};

use crate::status::{Failure, StarlingStatus};

/// How a viewer is set up. Get one from `starling_config_default()`, change the fields
/// you need, and pass it to `starling_viewer_new()`, which copies everything: the
/// strings need only live until that call returns. A NULL string means "none" where a
/// field says so, and the default value elsewhere.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StarlingConfig {
    /// gRPC URL of the control plane. Default "http://127.0.0.1:7000"; NULL = default.
    pub control_url: *const c_char,
    /// The broadcast to play. Required (default NULL: `starling_viewer_new` refuses it).
    pub broadcast_id: *const c_char,
    /// Viewer credential (a JWT from the broadcaster's backend) passed to Join; NULL =
    /// none (public broadcasts).
    pub credential: *const c_char,
    /// "host:port" of a data-plane wire port to connect to directly, bypassing the
    /// control plane (no relaying then); NULL (default) = join through the control
    /// plane.
    pub dataplane_addr: *const c_char,
    /// Where the local HTTP endpoint for media players listens ("127.0.0.1:0" by
    /// default, port 0 = any free port); NULL = no endpoint.
    pub http_listen: *const c_char,
    /// Relay the stream to other viewers (peer-assisted delivery). Default true.
    pub relay: bool,
    /// Upload budget offered for relaying, kbit/s; 0 (default) = the SDK's estimate
    /// (starts at 2,000 and is only ever lowered by measuring the uplink). Ignored when
    /// `relay` is false.
    pub upload_kbps: u32,
    /// Insecure: play (and relay) even when the control plane hands out no chunk keys,
    /// so nothing can be verified. Default false: `starling_viewer_start` then fails
    /// with `STARLING_ERR_UNVERIFIED`.
    pub allow_unverified: bool,
    /// PEM file of the CA certificates that verify the control plane's TLS certificate;
    /// NULL (default) = the built-in web PKI roots.
    pub ca_file: *const c_char,
    /// Insecure: allow an http:// `control_url` (plaintext gRPC: the credential and the
    /// chunk keys cross the network in clear). Default false: such a URL is refused.
    pub insecure_plaintext: bool,
    /// Where to accept peer connections. Default "0.0.0.0:0"; NULL = default.
    pub peer_listen: *const c_char,
    /// Host (name or IP) other peers should connect to; NULL (default) = the local IP
    /// of the route to the control plane (set it when peers are behind another NAT).
    pub advertise_host: *const c_char,
    /// Most peer connections accepted from one source address at once; 0 = unlimited.
    /// Default 8.
    pub max_peer_links_per_ip: u32,
    /// Play-out lag behind live in the peer grid, ms (1..=60000). Default 1500.
    pub target_lag_ms: u32,
    /// Chunks queued for this viewer's reader (or data callback) before a slow reader
    /// skips to the next random-access chunk (1..=4096). Default 64.
    pub read_queue_chunks: u32,
    /// Limit of one connection attempt and of control-plane calls, ms. Default 5000.
    pub connect_timeout_ms: u32,
    /// Quality-report interval, ms (at least 10); 0 (default) = what the control plane
    /// asks for.
    pub report_interval_ms: u32,
    /// Most Join attempts while the control plane is overloaded. Default 10.
    pub join_attempts: u32,
    /// No Join retry starts later than this after the first attempt, ms. Default 60000.
    pub join_deadline_ms: u32,
    /// Threads of the viewer's own runtime (1..=64). Default 2.
    pub worker_threads: u32,
}

/// The defaults of [`StarlingConfig`].
pub fn default_config() -> StarlingConfig {
    let sdk = ViewerConfig::new("");
    StarlingConfig {
        control_url: c"https://127.0.0.1:7000".as_ptr(),
        broadcast_id: std::ptr::null(),
        credential: std::ptr::null(),
        dataplane_addr: std::ptr::null(),
        http_listen: c"127.0.0.1:0".as_ptr(),
        relay: true,
        upload_kbps: 0,
        allow_unverified: false,
        ca_file: std::ptr::null(),
        insecure_plaintext: false,
        peer_listen: c"0.0.0.0:0".as_ptr(),
        advertise_host: std::ptr::null(),
        max_peer_links_per_ip: RelayConfig::DEFAULT_MAX_LINKS_PER_IP,
        target_lag_ms: millis(sdk.target_lag),
        read_queue_chunks: u32::try_from(sdk.subscriber_queue_chunks).unwrap_or(64),
        connect_timeout_ms: millis(sdk.connect_timeout),
        report_interval_ms: 0,
        join_attempts: sdk.join_attempts,
        join_deadline_ms: millis(sdk.join_deadline),
        worker_threads: 2,
    }
}

/// All NULL and zero (refused by `starling_viewer_new`: no broadcast).
pub fn zeroed() -> StarlingConfig {
    StarlingConfig {
        control_url: std::ptr::null(),
        broadcast_id: std::ptr::null(),
        credential: std::ptr::null(),
        dataplane_addr: std::ptr::null(),
        http_listen: std::ptr::null(),
        relay: false,
        upload_kbps: 0,
        allow_unverified: false,
        ca_file: std::ptr::null(),
        insecure_plaintext: false,
        peer_listen: std::ptr::null(),
        advertise_host: std::ptr::null(),
        max_peer_links_per_ip: 0,
        target_lag_ms: 0,
        read_queue_chunks: 0,
        connect_timeout_ms: 0,
        report_interval_ms: 0,
        join_attempts: 0,
        join_deadline_ms: 0,
        worker_threads: 0,
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// What `starling_viewer_new` made of a [`StarlingConfig`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub viewer: ViewerConfig,
    /// Connect straight to this data-plane address instead of joining.
    pub dataplane: Option<String>,
    pub worker_threads: usize,
}

/// Reads a C string field: `None` for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string alive for the call.
unsafe fn opt_str(p: *const c_char, field: &str) -> Result<Option<String>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL, and the caller guarantees a live NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| Failure::invalid(format!("config.{field} is not UTF-8")))
}

fn config_error(message: String) -> Failure {
    Failure::new(StarlingStatus::StarlingErrConfig, message)
}

fn addr(s: &str, field: &str) -> Result<SocketAddr, Failure> {
    s.parse()
        .map_err(|_| config_error(format!("config.{field} {s:?} is not an IP:port address")))
}

fn in_range(v: u32, lo: u32, hi: u32, field: &str) -> Result<u32, Failure> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(config_error(format!(
            "config.{field} = {v} is outside {lo}..={hi}"
        )))
    }
}

/// Translates `c` into [`Settings`].
///
/// # Safety
/// Every string field of `c` is NULL or a live NUL-terminated string.
pub unsafe fn settings(c: &StarlingConfig) -> Result<Settings, Failure> {
    // SAFETY (all the `opt_str` calls): the caller's guarantee on `c`'s fields.
    let broadcast = unsafe { opt_str(c.broadcast_id, "broadcast_id") }?
        .filter(|b| !b.is_empty())
        .ok_or_else(|| config_error("config.broadcast_id is required".into()))?;
    let mut v = ViewerConfig::new(broadcast);
    if let Some(url) = unsafe { opt_str(c.control_url, "control_url") }? {
        v.control_url = url;
    }
    v.credential = unsafe { opt_str(c.credential, "credential") }?;
    let dataplane = unsafe { opt_str(c.dataplane_addr, "dataplane_addr") }?;
    v.http_listen = match unsafe { opt_str(c.http_listen, "http_listen") }? {
        Some(s) => Some(addr(&s, "http_listen")?),
        None => None,
    };
    v.allow_unverified = c.allow_unverified;
    let ca_file = unsafe { opt_str(c.ca_file, "ca_file") }?;
    if dataplane.is_none() {
        v.transport = starling_sdk::Transport::from_flags(
            &v.control_url,
            ca_file.as_deref().map(std::path::Path::new),
            None,
            None,
            c.insecure_plaintext,
        )
        .map_err(|e| config_error(format!("config: {e}")))?;
    }
    if !c.relay {
        v.relay = RelayConfig::disabled();
    } else {
        v.relay.max_upload_kbps = (c.upload_kbps > 0).then_some(c.upload_kbps);
    }
    if let Some(s) = unsafe { opt_str(c.peer_listen, "peer_listen") }? {
        v.relay.listen = addr(&s, "peer_listen")?;
    }
    v.relay.advertise_host = unsafe { opt_str(c.advertise_host, "advertise_host") }?;
    v.relay.max_links_per_ip = c.max_peer_links_per_ip;
    v.target_lag =
        Duration::from_millis(in_range(c.target_lag_ms, 1, 60_000, "target_lag_ms")?.into());
    v.subscriber_queue_chunks =
        in_range(c.read_queue_chunks, 1, 4096, "read_queue_chunks")? as usize;
    v.connect_timeout = Duration::from_millis(
        in_range(c.connect_timeout_ms, 1, u32::MAX, "connect_timeout_ms")?.into(),
    );
    v.report_interval = match c.report_interval_ms {
        0 => None,
        ms => Some(Duration::from_millis(
            in_range(ms, 10, u32::MAX, "report_interval_ms")?.into(),
        )),
    };
    v.join_attempts = in_range(c.join_attempts, 1, u32::MAX, "join_attempts")?;
    v.join_deadline = Duration::from_millis(c.join_deadline_ms.into());
    let worker_threads = in_range(c.worker_threads, 1, 64, "worker_threads")? as usize;
    Ok(Settings {
        viewer: v,
        dataplane,
        worker_threads,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_mirror_the_sdk_and_need_a_broadcast() {
        let c = default_config();
        assert_eq!(c.target_lag_ms, 1500);
        assert_eq!(c.read_queue_chunks, 64);
        assert!(c.relay);
        // SAFETY: the defaults' strings are static.
        let err = unsafe { settings(&c) }.err().map(|f| f.status);
        assert_eq!(err, Some(StarlingStatus::StarlingErrConfig));
        let c = StarlingConfig {
            broadcast_id: c"demo".as_ptr(),
            ..c
        };
        // SAFETY: static strings.
        let s = match unsafe { settings(&c) } {
            Ok(s) => s,
            Err(f) => panic!("{f:?}"),
        };
        assert_eq!(s.viewer.broadcast_id, "demo");
        assert_eq!(s.viewer.control_url, "https://127.0.0.1:7000");
        assert_eq!(
            s.viewer.http_listen,
            Some("127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(s.viewer.relay.max_upload_kbps, None);
        assert_eq!(s.dataplane, None);
        assert_eq!(s.worker_threads, 2);
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        let base = StarlingConfig {
            broadcast_id: c"demo".as_ptr(),
            ..default_config()
        };
        let refused = |c: StarlingConfig| {
            // SAFETY: static strings only.
            match unsafe { settings(&c) } {
                Ok(_) => panic!("accepted"),
                Err(f) => f,
            }
        };
        let f = refused(StarlingConfig {
            http_listen: c"localhost".as_ptr(),
            ..base
        });
        assert!(f.message.contains("http_listen"), "{f:?}");
        let f = refused(StarlingConfig {
            target_lag_ms: 0,
            ..base
        });
        assert!(f.message.contains("target_lag_ms"), "{f:?}");
        let bad_utf8 = [0xffu8, 0];
        let f = refused(StarlingConfig {
            credential: bad_utf8.as_ptr().cast(),
            ..base
        });
        assert_eq!(f.status, StarlingStatus::StarlingErrInvalidArgument);
        // Relay off: the SDK never offers upload.
        let c = StarlingConfig {
            relay: false,
            upload_kbps: 500,
            http_listen: std::ptr::null(),
            ..base
        };
        // SAFETY: static strings.
        let s = unsafe { settings(&c) }.unwrap_or_else(|f| panic!("{f:?}"));
        assert_eq!(s.viewer.relay.upload_kbps(), 0);
        assert_eq!(s.viewer.http_listen, None);
    }
}
