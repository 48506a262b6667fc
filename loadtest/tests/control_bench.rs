//! `starling-loadtest control-bench`, short CI version: the bench binary against the
//! library control plane in a child process (`--embedded-controlplane`, SQLite), 300
//! sessions and a few seconds of steady state, `--json`. Asserts correctness only
//! (every session joined and held through the steady phase, the JSON report complete
//! and sane), never speeds.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

const SESSIONS: u64 = 300;

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .unwrap_or_else(|| panic!("missing key {path:?} in report: {v}"));
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number: {cur}"))
}

/// Runs the bench; `None` when it reports that the control plane has no session
/// stream.
fn bench(mode: &str) -> Option<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_starling-loadtest"))
        .args([
            "control-bench",
            "--embedded-controlplane",
            "--sessions",
            &SESSIONS.to_string(),
            "--concurrency",
            "16",
            "--connections",
            "2",
            "--sessions-per-connection",
            "100",
            "--steady",
            "4",
            "--mode",
            mode,
            "--json",
        ])
        .env_remove("STARLING_BENCH_DATABASE_URL")
        .output()
        .expect("run starling-loadtest control-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("UNIMPLEMENTED to ViewerService.Session") {
        return None;
    }
    assert!(
        out.status.success(),
        "control-bench --mode {mode} failed: {}\n{stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    Some(serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("control-bench --json printed no JSON ({e}):\n{stdout}\n{stderr}")
    }))
}

/// The checks common to both modes.
fn check_common(r: &Value, mode: &str) {
    assert_eq!(r["mode"], mode);
    assert_eq!(r["backend"], "sqlite");
    assert_eq!(num(r, &["sessions"]), SESSIONS as f64);
    assert_eq!(num(r, &["join", "joined"]), SESSIONS as f64, "{r}");
    assert_eq!(num(r, &["join", "failed"]), 0.0, "{r}");
    assert!(num(r, &["join", "joins_per_s"]) > 0.0);
    let (p50, p99, max) = (
        num(r, &["join", "p50_ms"]),
        num(r, &["join", "p99_ms"]),
        num(r, &["join", "max_ms"]),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{r}");
    assert!(num(r, &["join", "cp_cpu_s"]) > 0.0, "{r}");
    assert!(num(r, &["join", "cp_cpu_per_join_us"]) > 0.0, "{r}");
    assert!(num(r, &["join", "rss_after_kib"]) > 0.0, "{r}");
    assert!(r["join"]["errors"].is_object());
    // 300 sessions at 100 per connection.
    assert_eq!(num(r, &["steady_connections"]), 3.0);
    let s = &r["steady"];
    assert!(s.is_object(), "no steady phase: {r}");
    for key in ["held_start", "held_min", "held_end"] {
        assert_eq!(num(s, &[key]), SESSIONS as f64, "{key}: {r}");
    }
    assert_eq!(num(s, &["lost"]), 0.0, "{r}");
    assert_eq!(num(s, &["ended_by_server"]), 0.0, "{r}");
    assert!(num(s, &["wall_s"]) >= 4.0);
    // Idle sessions on streams may cost the control plane less than one clock tick
    // over a short steady phase: only the sign is checked.
    assert!(num(s, &["cp_cpu_s"]) >= 0.0, "{r}");
    assert!(num(s, &["cp_cpu_per_viewer_s_us"]) >= 0.0, "{r}");
    assert!(num(s, &["rss_kib"]) > 0.0);
    assert!(num(s, &["rss_per_session_kib"]) >= 0.0);
}

#[test]
fn heartbeat_mode_holds_every_session() {
    let r = bench("heartbeat").expect("heartbeat mode needs no session stream");
    check_common(&r, "heartbeat");
    let s = &r["steady"];
    // 1 s heartbeats over >= 4 s: every session heartbeat several times.
    assert!(num(s, &["heartbeats_per_s"]) > 0.0, "{r}");
    assert!(num(s, &["heartbeat_p99_ms"]) > 0.0, "{r}");
    assert_eq!(num(s, &["downs_per_s"]), 0.0, "{r}");
    assert_eq!(num(s, &["streams_started"]), 0.0, "{r}");
}

#[test]
fn stream_mode_holds_every_session() {
    let r = bench("stream").expect("the control plane serves ViewerService.Session");
    check_common(&r, "stream");
    let s = &r["steady"];
    assert_eq!(num(s, &["heartbeats_per_s"]), 0.0, "{r}");
    // Every stream got its first SessionDown (parents, keys, counters interval).
    assert_eq!(num(s, &["streams_started"]), SESSIONS as f64, "{r}");
}
