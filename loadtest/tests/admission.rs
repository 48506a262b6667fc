//! The admission guard of `starling-loadtest run`: while the load generator's machine is
//! at least `--max-busy` percent busy, no new join starts; held 20 s in a row, the ramp
//! ends with the peers admitted so far and the report says so. Driven here with a
//! threshold of 1 %, which any machine running the test exceeds: the ramp is held from
//! the first sample on, and the run must end with fewer peers than asked, the hold and
//! the closing figure in the text and the JSON, and every admitted peer playing.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

#[test]
fn a_saturated_machine_holds_then_closes_the_ramp() {
    let peers = 200usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("run.json");
    let out = Command::new(env!("CARGO_BIN_EXE_starling-loadtest"))
        .args([
            "run",
            "--net",
            "sockets",
            "--peers",
            &peers.to_string(),
            "--workers",
            "1",
            "--duration",
            "5s",
            "--join-rate",
            "5",
            "--max-busy",
            "1",
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .expect("run starling-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        stdout.contains("admission: ramp held") && stdout.contains("closed at"),
        "{stdout}\n{stderr}"
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json report"))
        .expect("valid JSON");
    let closed = r["admission_closed_at_peers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no admission_closed_at_peers: {r}"));
    let joined = r["initial_peers_joined"]
        .as_u64()
        .expect("initial_peers_joined");
    let held = r["ramp_held_s"].as_f64().expect("ramp_held_s");
    // At 5 joins/s, a handful of peers may start before the first sample (none at all
    // when the worker starts late on a loaded machine); none after.
    assert!(
        closed < 40 && joined <= closed + 16,
        "closed at {closed}, joined {joined}"
    );
    assert!(held >= 19.0, "held {held} s");
    assert_eq!(
        r["machine_bound"], true,
        "a closed ramp is this machine's limit"
    );
    // Fewer peers than asked is reported as an error, not hidden (the run itself
    // completes: its report is the product).
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(
        r["errors"].as_array().is_some_and(|e| e
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.contains("peers joined")))),
        "{r}"
    );
    // The admitted peers played (continuity is 1.0 over no peers at all).
    let continuity = r["continuity"].as_f64().expect("continuity");
    assert!(continuity >= 0.99, "continuity {continuity}");
}
