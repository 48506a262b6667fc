//! `--net sim`: simulated viewers (grid nodes in one process, peer-to-peer frames
//! through the in-process fabric) against the real servers: the fabric with the real
//! control plane, then with the real data plane too, then `starling-loadtest run
//! --net sim` end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use starling_loadtest::pattern::Pattern;
use starling_loadtest::simnet::control::ControlConfig;
use starling_loadtest::simnet::dataplane::DpShared;
use starling_loadtest::simnet::dispatch;
use starling_loadtest::simnet::{Fabric, FabricConfig, ServerMode, SimNetConfig};
use starling_loadtest::{Deployment, DeploymentConfig, UploadProfile};
use tokio::sync::mpsc;

/// 200 simulated viewers join a real control plane over gRPC (sharing one HTTP/2
/// connection), hold their session streams and get their parents and neighbours from
/// it; then 20 leave, and their children get new parents pushed on their streams; the
/// source's chunks are cut in process. Every viewer joins and plays, every played byte
/// is the source's, the grid carries the stream, and every session leaves at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_viewers_hold_real_sessions() {
    common::init_tracing();
    let dep = Deployment::start(DeploymentConfig {
        bitrate_kbps: 64,
        chunk_ms: 250,
        substreams: 4,
        behind_proxy: true,
        ..DeploymentConfig::default()
    })
    .await
    .unwrap();
    let peers = 200;
    let (up_tx, up_rx) = mpsc::channel(65_536);
    let fabric = Fabric::spawn(
        FabricConfig {
            net: SimNetConfig::new(64, 4, Duration::from_millis(250)),
            upload: UploadProfile::mixed(),
            index_offset: 0,
            pattern: Some(Pattern::new(dep.config().seed)),
            server: ServerMode::InProcess,
        },
        up_tx,
    );
    let (cc, control) = dispatch::spawn(
        ControlConfig::new(
            dep.control_url(),
            dep.transport(),
            dep.broadcast_id().to_owned(),
        ),
        up_rx,
        fabric.sender(),
    );
    fabric.add(peers).await;
    // Wait (conditions only, generous bound) until every viewer has been due 40 chunks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let snap = loop {
        let snap = fabric.snapshot(true).await.unwrap();
        let done = snap.sample.active == peers
            && snap
                .records
                .iter()
                .all(|r| r.chunks_played + r.chunks_skipped >= 40);
        if done || tokio::time::Instant::now() > deadline {
            break snap;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let s = &snap.sample;
    eprintln!(
        "active {} played {} skipped {} share {:.3} continuity {:.4} net {:?} control {cc:?} errors {:?}",
        s.active,
        s.chunks_played,
        s.chunks_skipped,
        snap.peer_share(),
        snap.continuity(),
        snap.net,
        snap.errors
    );
    assert_eq!(s.active, peers, "every viewer joined: {:?}", snap.errors);
    assert_eq!(cc.sessions.load(Ordering::Relaxed), peers as u64);
    assert_eq!(
        cc.connections.load(Ordering::Relaxed),
        1,
        "200 sessions per connection"
    );
    assert_eq!(cc.streams_open.load(Ordering::Relaxed), peers as u64);
    assert!(
        cc.downs.load(Ordering::Relaxed) >= peers as u64,
        "every stream said something"
    );
    let worst: Vec<_> = snap
        .records
        .iter()
        .filter(|r| r.chunks_played < 30)
        .take(3)
        .collect();
    assert!(worst.is_empty(), "viewers that hardly played: {worst:?}");
    assert_eq!(s.not_identical, 0, "every played byte is the source's");
    assert_eq!(snap.played_without_bytes, 0);
    assert!(
        snap.continuity() >= 0.99,
        "continuity {}",
        snap.continuity()
    );
    assert!(snap.peer_share() >= 0.9, "peer share {}", snap.peer_share());
    // 20 leave: the control plane re-parents their children over the streams.
    let downs = cc.downs.load(Ordering::Relaxed);
    fabric.leave(20).await;
    let played: u64 = snap.sample.chunks_played;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let snap = loop {
        let snap = fabric.snapshot(false).await.unwrap();
        // 180 viewers, 20 more chunks each.
        if snap.sample.chunks_played >= played + 180 * 20 || tokio::time::Instant::now() > deadline
        {
            break snap;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "after the leaves: active {} continuity {:.4} share {:.3} control {cc:?}",
        snap.sample.active,
        snap.continuity(),
        snap.peer_share()
    );
    assert_eq!(snap.sample.active, peers - 20);
    assert_eq!(snap.sample.left, 20);
    assert!(
        cc.downs.load(Ordering::Relaxed) > downs,
        "deltas were pushed"
    );
    assert_eq!(cc.leaves.load(Ordering::Relaxed), 20);
    assert_eq!(snap.sample.not_identical, 0);
    assert!(
        snap.continuity() >= 0.99,
        "continuity {}",
        snap.continuity()
    );
    fabric.stop().await;
    tokio::time::timeout(Duration::from_secs(120), control)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cc.leaves.load(Ordering::Relaxed), peers as u64);
    assert_eq!(cc.streams_open.load(Ordering::Relaxed), 0);
    dep.shutdown().await;
}

/// 100 simulated viewers against the real control plane and the real data plane: each
/// holds one wire connection to the data plane (its chunk token, a subscription to
/// the substreams the grid gives the server, its last-resort requests), every chunk
/// from it verified; the peers relay the rest through the fabric. Every viewer joins
/// and plays, every played byte is the source's, and the grid carries the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_viewers_use_the_real_data_plane() {
    common::init_tracing();
    let dep = Deployment::start(DeploymentConfig {
        bitrate_kbps: 64,
        chunk_ms: 250,
        substreams: 4,
        behind_proxy: true,
        ..DeploymentConfig::default()
    })
    .await
    .unwrap();
    let peers = 100;
    let (up_tx, up_rx) = mpsc::channel(65_536);
    let fabric = Fabric::spawn(
        FabricConfig {
            net: SimNetConfig::new(64, 4, Duration::from_millis(250)),
            upload: UploadProfile::mixed(),
            index_offset: 0,
            pattern: Some(Pattern::new(dep.config().seed)),
            server: ServerMode::Wire,
        },
        up_tx,
    );
    let dp = Arc::new(DpShared::new(250, 4096));
    let (cc, control) = dispatch::spawn(
        ControlConfig {
            data_plane: Some(dp.clone()),
            ..ControlConfig::new(
                dep.control_url(),
                dep.transport(),
                dep.broadcast_id().to_owned(),
            )
        },
        up_rx,
        fabric.sender(),
    );
    fabric.add(peers).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let snap = loop {
        let snap = fabric.snapshot(true).await.unwrap();
        let done = snap.sample.active == peers
            && snap
                .records
                .iter()
                .all(|r| r.chunks_played + r.chunks_skipped >= 40);
        if done || tokio::time::Instant::now() > deadline {
            break snap;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let s = &snap.sample;
    eprintln!(
        "active {} played {} skipped {} share {:.3} continuity {:.4} server {} B net {:?} control {cc:?} data plane: open {} chunks {} requests {} errors {:?}",
        s.active,
        s.chunks_played,
        s.chunks_skipped,
        snap.peer_share(),
        snap.continuity(),
        s.bytes_from_server,
        snap.net,
        dp.open.load(Ordering::Relaxed),
        dp.chunks.load(Ordering::Relaxed),
        dp.requests.load(Ordering::Relaxed),
        snap.errors
    );
    assert_eq!(s.active, peers, "every viewer joined: {:?}", snap.errors);
    assert_eq!(
        dp.open.load(Ordering::Relaxed),
        peers as u64,
        "one connection each"
    );
    assert_eq!(dp.failed.load(Ordering::Relaxed), 0);
    assert_eq!(dp.bad_chunks.load(Ordering::Relaxed), 0);
    assert!(dp.chunks.load(Ordering::Relaxed) > 0);
    assert!(
        s.bytes_from_server > 0,
        "the server's share came over the wire"
    );
    let worst: Vec<_> = snap
        .records
        .iter()
        .filter(|r| r.chunks_played < 30)
        .take(3)
        .collect();
    assert!(worst.is_empty(), "viewers that hardly played: {worst:?}");
    assert_eq!(s.not_identical, 0, "every played byte is the source's");
    assert_eq!(snap.played_without_bytes, 0);
    assert!(
        snap.continuity() >= 0.99,
        "continuity {}",
        snap.continuity()
    );
    assert!(snap.peer_share() >= 0.9, "peer share {}", snap.peer_share());
    fabric.stop().await;
    tokio::time::timeout(Duration::from_secs(120), control)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cc.leaves.load(Ordering::Relaxed), peers as u64);
    dep.shutdown().await;
}

/// `starling-loadtest run --net sim`: the coordinator, the data plane in its child
/// process, and ONE sim worker process for every peer (the worker line protocol).
/// Asserts conditions only: every peer joined, continuity >= 0.995, peer share >= 0.9,
/// every played byte the source's, one worker. (Measured: continuity 0.9979–0.9985,
/// its skips 1–3 chunks each at the start-up of peers that joined in the ramp's first
/// seconds; the 0.999 is not met yet.) `STARLING_SIM_PEERS` and
/// `STARLING_SIM_SECS` change the size.
#[test]
fn run_net_sim_end_to_end() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let peers = env("STARLING_SIM_PEERS", 300);
    let secs = env("STARLING_SIM_SECS", 20);
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
            &format!("{secs}s"),
            "--join-rate",
            "50",
            // The admission guard is tested on its own (tests/admission.rs).
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
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    println!("stderr (last lines): {tail:#?}");
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(stderr.contains("sim worker:"), "the sim worker's summary");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["workers"], 1);
    assert_eq!(r["peers_joined"], peers, "every peer joined");
    assert_eq!(r["not_identical"], 0, "every played byte is the source's");
    let continuity = r["continuity"].as_f64().unwrap();
    let share = r["peer_share"].as_f64().unwrap();
    assert!(continuity >= 0.995, "continuity {continuity}");
    assert!(share >= 0.9, "peer share {share}");
    assert!(r["output_bytes_checked"].as_u64().unwrap() > 0);
    // The report says how the sessions reached the control plane: shared connections.
    let sessions = r["control_traffic"]["sessions"].as_u64().unwrap();
    let connections = r["control_traffic"]["connections"].as_u64().unwrap();
    assert_eq!(sessions, peers, "sessions joined");
    assert!(
        (1..sessions).contains(&connections),
        "{sessions} sessions over {connections} connections"
    );
    assert!(stdout.contains(&format!(
        "control plane: {sessions} sessions over {connections} shared HTTP/2 connections"
    )));
    // Each peer's stay carries its start-up and lag figures; every peer played, so
    // every one has them, and p99 >= p50.
    let stays = r["stays"].as_array().unwrap();
    assert_eq!(stays.len() as u64, peers);
    for s in stays {
        let startup = s[3].as_f64().expect("startup_ms");
        let (p50, p99) = (
            s[4].as_u64().expect("lag p50"),
            s[5].as_u64().expect("lag p99"),
        );
        assert!(startup > 0.0 && p50 <= p99, "stay {s}");
    }
}
