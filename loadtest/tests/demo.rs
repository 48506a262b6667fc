//! `starling-loadtest demo --duration 20s` exits 0 and prints its report (issue 6).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

#[test]
fn demo_runs_for_its_duration_and_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_starling-loadtest"))
        .args(["demo", "--duration", "20s", "--json"])
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .expect("run starling-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(stdout.contains("=== starling demo report ==="), "{stdout}");
    assert!(stdout.contains("peer share"), "{stdout}");
    // A progress line per second on stderr.
    assert!(stderr.matches("peers ").count() >= 5, "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json report"))
            .expect("valid JSON");
    assert_eq!(report["peers"], 200);
    for key in [
        "peer_share",
        "continuity",
        "startup_ms",
        "stalls",
        "server_egress_bytes",
        "errors",
    ] {
        assert!(report.get(key).is_some(), "missing {key} in {report}");
    }
}
