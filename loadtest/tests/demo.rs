//! `starling-loadtest demo --duration 20s` exits 0 and prints its report (issue 6), with
//! simulated viewers (`--net sim`, the default, issue 16) and with SDK viewers on
//! sockets.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

/// Runs the demo with `args`; returns stdout, stderr and the JSON report.
fn demo(args: &[&str]) -> (String, String, serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_starling-loadtest"))
        .args(["demo", "--duration", "20s"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .expect("run starling-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    println!("{stdout}");
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(stdout.contains("=== starling demo report ==="), "{stdout}");
    assert!(stdout.contains("peer share"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json report"))
            .expect("valid JSON");
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
    (stdout, stderr, report)
}

#[test]
fn demo_runs_simulated_viewers_by_default() {
    let (stdout, stderr, report) = demo(&[]);
    // A progress line per second on stderr.
    assert!(stderr.matches("viewers ").count() >= 5, "{stderr}");
    assert_eq!(report["peers"], 200);
    assert_eq!(report["active"], 200, "{report}");
    assert_eq!(report["not_identical"], 0, "{report}");
    assert!(report["bytes_checked"].as_u64().unwrap() > 0, "{report}");
    assert!(report["peer_share"].as_f64().unwrap() > 0.5, "{report}");
    assert_eq!(report["sessions"], 200, "{report}");
    assert_eq!(
        report["errors"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    assert!(stdout.contains("net sim"), "{stdout}");
}

#[test]
fn demo_runs_sdk_viewers_on_sockets() {
    let (_, stderr, report) = demo(&["--net", "sockets"]);
    assert!(stderr.matches("peers ").count() >= 5, "{stderr}");
    assert_eq!(report["peers"], 200);
}
