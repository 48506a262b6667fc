//! Issue 6's `run` acceptance test: `starling-loadtest run` with 500 peers for 60 s over
//! 2 worker processes (a real multi-process run: the data plane in a child process, the
//! peers in two worker processes driven over TCP).
//!
//! Asserts: every peer joined, peer share ≥ 90 %, continuity ≥ 99.5 %, the JSON report
//! has every key of the issue with sane values, and `fluid_bound_bytes` matches an
//! independent computation from the per-peer stays in the JSON (a time-stepped sum,
//! not the event sweep of `bound.rs`), whose upload budgets in turn match the upload
//! profile. No assertion on wall-clock time. `STARLING_RUN_PEERS` and `STARLING_RUN_SECS`
//! shrink the run for local iteration.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .unwrap_or_else(|| panic!("missing key {path:?} in report"));
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number: {cur}"))
}

/// The bound recomputed independently: the window cut into 1 ms steps, at each step
/// the present peers counted from the stays.
fn bound_by_steps(stays: &[(f64, Option<f64>, f64)], r_kbps: f64, end_s: f64) -> f64 {
    // Per-millisecond deltas of n and Σu (a difference array), then a running sum.
    let steps = (end_s * 1000.0).ceil() as usize;
    let mut dn = vec![0i64; steps + 1];
    let mut du = vec![0f64; steps + 1];
    let ms = |t: f64| ((t * 1000.0).round().max(0.0) as usize).min(steps);
    for &(j, l, u) in stays {
        let (a, b) = (ms(j), ms(l.unwrap_or(end_s)));
        if b > a {
            dn[a] += 1;
            dn[b] -= 1;
            du[a] += u;
            du[b] -= u;
        }
    }
    let (mut n, mut su, mut kbit) = (0i64, 0f64, 0f64);
    for i in 0..steps {
        n += dn[i];
        su += du[i];
        let dt = ((i + 1) as f64 / 1000.0).min(end_s) - i as f64 / 1000.0;
        if n > 0 {
            kbit += (r_kbps).max(n as f64 * r_kbps - su) * dt;
        }
    }
    kbit * 1000.0 / 8.0
}

#[test]
fn run_500_peers_over_2_workers() {
    let peers = env_or("STARLING_RUN_PEERS", 500) as usize;
    let secs = env_or("STARLING_RUN_SECS", 60);
    let workers = 2usize;
    let profile = [0.0, 1.0, 2.0, 0.0, 1.5, 3.0];
    let bitrate = 64u32;
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
            &workers.to_string(),
            "--duration",
            &format!("{secs}s"),
            "--join-rate",
            "50",
            "--bitrate-kbps",
            &bitrate.to_string(),
            "--upload-profile",
            "0,1,2,0,1.5,3",
            // The admission guard is tested on its own (tests/admission.rs); a CI machine
            // building in debug may be busy enough to hold this ramp.
            "--max-busy",
            "0",
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .expect("run starling-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    println!("stderr (last lines): {tail:#?}");
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(stdout.contains("=== starling run report ==="), "{stdout}");
    // A progress line per second on stderr.
    assert!(stderr.matches("share ").count() >= 10, "{stderr}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json report"))
        .expect("valid JSON");

    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };

    // Every key of the issue.
    for key in [
        "peers",
        "duration_s",
        "bitrate_kbps",
        "stream_kbps",
        "peer_share",
        "continuity",
        "startup_ms",
        "lag_ms",
        "stalls",
        "server_egress_bytes",
        "fluid_bound_bytes",
        "server_egress_over_bound",
        "join_rpc_ms",
        "cpu_s",
        "max_rss_bytes",
        "errors",
    ] {
        check(r.get(key).is_some(), format!("missing key {key}"));
    }
    check(
        r["peers"] == peers && r["bitrate_kbps"] == bitrate && r["workers"] == workers,
        format!(
            "peers {} bitrate {} workers {}",
            r["peers"], r["bitrate_kbps"], r["workers"]
        ),
    );

    // All peers joined, none failed or stopped.
    check(
        r["initial_peers_joined"] == peers
            && r["peers_active_at_end"] == peers
            && r["join_failures"] == 0
            && r["peers_closed"] == 0,
        format!(
            "joined {} active at end {} join failures {} stopped {}",
            r["initial_peers_joined"],
            r["peers_active_at_end"],
            r["join_failures"],
            r["peers_closed"]
        ),
    );
    let share = num(&r, &["peer_share"]);
    check(share >= 0.90, format!("peer share {share:.4} < 0.90"));
    let continuity = num(&r, &["continuity"]);
    check(
        continuity >= 0.995,
        format!("continuity {continuity:.5} < 0.995"),
    );
    check(
        r["not_identical"] == 0 && num(&r, &["output_bytes_checked"]) > 0.0,
        format!(
            "identity: {} not identical, {} bytes checked",
            r["not_identical"], r["output_bytes_checked"]
        ),
    );

    // Sane values.
    let duration = num(&r, &["duration_s"]);
    check(
        duration >= secs as f64 && num(&r, &["steady_s"]) >= secs as f64,
        format!(
            "duration_s {duration} / steady_s {} < {secs}",
            r["steady_s"]
        ),
    );
    let (s50, s95, s99) = (
        num(&r, &["startup_ms", "p50"]),
        num(&r, &["startup_ms", "p95"]),
        num(&r, &["startup_ms", "p99"]),
    );
    check(
        0.0 < s50 && s50 <= s95 && s95 <= s99 && s99 < 30_000.0,
        format!("startup_ms {}", r["startup_ms"]),
    );
    if r["lag_ms"].is_null() {
        println!("lag_ms is null: no SDK reported a lag");
    } else {
        let (l50, l99) = (num(&r, &["lag_ms", "p50"]), num(&r, &["lag_ms", "p99"]));
        check(
            0.0 < l50 && l50 <= l99 && l99 < 30_000.0,
            format!("lag_ms {}", r["lag_ms"]),
        );
    }
    let (j50, j99) = (
        num(&r, &["join_rpc_ms", "p50"]),
        num(&r, &["join_rpc_ms", "p99"]),
    );
    check(
        0.0 < j50 && j50 <= j99,
        format!("join_rpc_ms {}", r["join_rpc_ms"]),
    );
    check(num(&r, &["stalls"]) >= 0.0, "stalls".into());
    let egress = num(&r, &["server_egress_bytes"]);
    // The data plane sent at least one copy of the stream over the run, and less than
    // every peer receiving everything from it.
    let one_copy = f64::from(bitrate) * 125.0 * num(&r, &["steady_s"]);
    check(
        egress >= one_copy && egress < peers as f64 * f64::from(bitrate) * 125.0 * duration,
        format!("server_egress_bytes {egress} (one stream copy over the steady phase {one_copy})"),
    );
    check(
        r["server_egress_source"] == "dataplane_metrics",
        format!("server_egress_source {}", r["server_egress_source"]),
    );
    for role in ["coordinator", "dataplane", "worker-0", "worker-1"] {
        let cpu = r["cpu_s"][role].as_f64().unwrap_or(-1.0);
        let rss = r["max_rss_bytes"][role].as_u64().unwrap_or(0);
        check(
            cpu > 0.0 && rss > 1_000_000,
            format!("process {role}: cpu_s {cpu}, max_rss_bytes {rss}"),
        );
    }
    // The machine load: every process of this run is on this machine here.
    let total_cpu = num(&r, &["cpu_s", "total"]);
    let cores = num(&r, &["cpu_cores"]);
    let util = num(&r, &["cpu_utilization"]);
    let expect_util = total_cpu / (duration * cores);
    check(
        cores >= 1.0 && (util - expect_util).abs() < 1e-6 && util > 0.0,
        format!(
            "cpu_utilization {util} (cpu_s.total {total_cpu} / ({duration} s x {cores} cores) = {expect_util})"
        ),
    );
    check(
        r["machine_bound"].as_bool() == Some(util >= 0.85),
        format!("machine_bound {} at utilization {util}", r["machine_bound"]),
    );
    check(
        r["errors"].as_array().is_some_and(Vec::is_empty),
        format!("errors: {}", r["errors"]),
    );

    // The delivered rate (the bound's r and the budgets' unit) is the payload rate plus
    // each 250 ms chunk's framing: frame header 8 + fixed fields 20 + signature length 2
    // + signature block 63 + broadcast id (1..=128) + 64 bytes, on 2,000 payload bytes.
    let stream = r["stream_kbps"].as_u64().expect("stream_kbps") as u32;
    let framing_kbps = |id: u32| (8 + 20 + 2 + 63 + id + 64) * 8 * 4 / 1000;
    check(
        stream >= bitrate + framing_kbps(1) && stream <= bitrate + framing_kbps(128) + 1,
        format!("stream_kbps {stream} for a {bitrate} kbit/s payload"),
    );

    // Upload beyond the budgets (push debt) is at most a few seconds of every budget,
    // and counting it as server egress only raises the ratio.
    let over = num(&r, &["upload_over_budget_bytes"]);
    let budgets_per_s: f64 = r["stays"]
        .as_array()
        .expect("stays")
        .iter()
        .map(|s| s[2].as_f64().unwrap_or(0.0) * 125.0)
        .sum();
    check(
        (0.0..=budgets_per_s * 5.0).contains(&over),
        format!("upload_over_budget_bytes {over} (budgets {budgets_per_s} B/s)"),
    );
    check(
        num(&r, &["server_egress_over_bound_at_budget"]) >= num(&r, &["server_egress_over_bound"]),
        "server_egress_over_bound_at_budget below server_egress_over_bound".into(),
    );

    // The fluid bound, recomputed independently from the stays in the JSON.
    let stays: Vec<(f64, Option<f64>, f64)> = r["stays"]
        .as_array()
        .expect("stays")
        .iter()
        .map(|s| {
            (
                s[0].as_f64().expect("joined_s"),
                s[1].as_f64(),
                s[2].as_f64().expect("upload_kbps"),
            )
        })
        .collect();
    check(stays.len() == peers, format!("{} stays", stays.len()));
    check(
        stays
            .iter()
            .all(|s| s.0 >= 0.0 && s.0 <= duration && s.1.is_none()),
        "stays outside the window (or peers that left without churn)".into(),
    );
    // The budgets are those of the profile: worker w's i-th peer gets
    // profile[(w * 62_500 + i) % 6] × the (delivered) stream rate.
    let mut expected: Vec<u64> = (0..workers)
        .flat_map(|w| {
            let n = peers / workers + usize::from(w < peers % workers);
            (0..n).map(move |i| {
                (profile[(w * 62_500 + i) % profile.len()] * f64::from(stream)).round() as u64
            })
        })
        .collect();
    let mut got: Vec<u64> = stays.iter().map(|s| s.2 as u64).collect();
    expected.sort_unstable();
    got.sort_unstable();
    check(
        got == expected,
        "upload budgets differ from the profile".into(),
    );
    let bound = num(&r, &["fluid_bound_bytes"]);
    let independent = bound_by_steps(&stays, f64::from(stream), duration);
    check(
        (bound - independent).abs() <= independent * 0.002 + 1000.0,
        format!("fluid_bound_bytes {bound} vs independent {independent}"),
    );
    // Upload averages ≥ r here, so the bound is r·(time anyone is present).
    let first = stays.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let rich_bound = f64::from(stream) * 125.0 * (duration - first);
    check(
        (independent - rich_bound).abs() <= rich_bound * 0.05,
        format!("independent bound {independent} vs r·T {rich_bound}"),
    );
    let over = num(&r, &["server_egress_over_bound"]);
    check(
        (over - egress / bound).abs() < 1e-6 && over >= 0.95,
        format!("server_egress_over_bound {over} (egress {egress}, bound {bound})"),
    );

    let mut shown = r.clone();
    if let Some(o) = shown.as_object_mut() {
        o.insert(
            "stays".into(),
            Value::String(format!("<{} stays>", stays.len())),
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&shown).unwrap_or_default()
    );
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}
