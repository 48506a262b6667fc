//! The run report's per-peer figures end to end: a short `starling-loadtest run --net
//! sim` writes a JSON with the lag histogram, the busy / not-busy join groups and an RSS
//! series per process, and prints their lines. Counts and shapes only, no timings (the
//! computations themselves are unit-tested in `run/perpeer.rs`, `run/rss.rs` and
//! `run/series.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn run_report_has_lag_histogram_join_groups_and_rss_series() {
    let peers = 150u64;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_starling-loadtest"))
        .args([
            "run",
            "--net",
            "sim",
            "--peers",
            &peers.to_string(),
            "--duration",
            "15s",
            "--join-rate",
            "50",
            "--max-busy",
            "0",
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let joined = r["peers_joined"].as_u64().unwrap();
    assert!(joined > 0, "peers joined");
    let sum = |v: &serde_json::Value| -> u64 {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum()
    };

    // The histogram over peers counts exactly the peers whose stay has a lag p99.
    let h = &r["lag_histogram"];
    assert_eq!(h["bounds_ms"], serde_json::json!([1000, 2000, 3000, 5000]));
    assert_eq!(h["peers_by_p99"].as_array().unwrap().len(), 5);
    let with_lag = r["stays"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s[5].is_null())
        .count() as u64;
    assert!(with_lag > 0, "--net sim measures every peer's lag");
    assert_eq!(sum(&h["peers_by_p99"]), with_lag);
    assert_eq!(h["peers"].as_u64().unwrap(), with_lag);
    assert_eq!(sum(&h["samples"]), h["sample_count"].as_u64().unwrap());
    assert!(h["sample_count"].as_u64().unwrap() > 0);
    assert!(
        stdout.contains("lag histogram: peers by lag p99 <=1 s"),
        "{stdout}"
    );

    // Both join groups, together every joined peer.
    let g = &r["join_groups"];
    assert_eq!(g["busy_threshold"].as_f64().unwrap(), 0.85);
    let (busy, calm) = (
        g["busy"]["peers"].as_u64().unwrap(),
        g["not_busy"]["peers"].as_u64().unwrap(),
    );
    assert_eq!(busy + calm, joined);
    for k in ["busy", "not_busy"] {
        let c = g[k]["continuity"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&c), "{k} continuity {c}");
        assert!(g[k]["startup_ms"]["p95"].is_number());
    }
    assert!(!r["machine_busy"].as_array().unwrap().is_empty());
    assert!(stdout.contains("joined while this machine was busy (>= 85%"));
    assert!(stdout.contains("joined while it was not: "));

    // An RSS series per process, each with samples.
    let processes: Vec<&str> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["role"].as_str().unwrap())
        .collect();
    assert!(processes.contains(&"coordinator") && processes.contains(&"worker-0"));
    let rss = r["rss"].as_array().unwrap();
    let roles: Vec<&str> = rss.iter().map(|p| p["role"].as_str().unwrap()).collect();
    assert_eq!(roles, processes, "one RSS entry per process");
    for p in rss {
        let series = p["series"].as_array().unwrap();
        assert!(!series.is_empty(), "{p}");
        assert_eq!(p["samples"].as_u64().unwrap() as usize, series.len());
        assert!(series.iter().all(|pt| pt[1].as_f64().unwrap() > 0.0));
        assert!(p["max_bytes"].as_u64().unwrap() > 0);
        assert!(p["end_bytes"].as_u64().unwrap() > 0);
        assert!(
            stdout.contains(&format!(
                "rss {:<12} after warm-up",
                p["role"].as_str().unwrap()
            )),
            "{stdout}"
        );
    }
    assert_eq!(r["rss_every_s"].as_f64().unwrap(), 10.0);
    // The simulated network says whether it kept time.
    let fabric = &r["sim_fabric"];
    assert!(fabric["deadlines"].as_u64().unwrap() > 0, "{fabric}");
    assert!(fabric["late_events"].is_u64(), "{fabric}");
    assert!(stdout.contains("sim fabric: "), "{stdout}");
    // The kernel's peaks are still reported.
    assert!(r["max_rss_bytes"]["max"].as_u64().unwrap() > 0);
}
