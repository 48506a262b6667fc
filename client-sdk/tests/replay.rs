//! Replays (issue 18, part 3). A broadcast stopped and started again begins at chunk
//! 0 with the same node key, so without a run in the signature a relay could feed the
//! second run the first run's chunks; and a recording replayed long after is authentic
//! too. Here a hostile relay, assigned as a parent and speaking the wire protocol,
//! replays what it recorded: the child must play none of it, drop the relay and
//! report it, and keep playing the current run from elsewhere. A viewer whose clock is
//! far off still plays (the age limit is judged by the control plane's clock). Real
//! loopback sockets and gRPC; timeouts only bound hangs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::live::{LiveServer, Opts, Source};
use common::mini_cp::{self, MiniCp, Plan, Ref};
use starling_proto::integrity::ChunkSigner;
use starling_proto::token::generate_pkcs8;
use starling_proto::v1::PeerReportKind;
use starling_sdk::{RelayConfig, Stats, Viewer, ViewerConfig, WallClock};

const GUARD: Duration = Duration::from_secs(40);
const K: u16 = 4;
const CHUNK_MS: u64 = 100;
const RELAY: u64 = 77;

fn config(broadcast: &str, url: &str) -> ViewerConfig {
    let mut c = ViewerConfig::new(broadcast);
    c.control_url = url.into();
    // The mini control plane of these tests serves plaintext on loopback.
    c.transport = starling_proto::transport::Transport::Plaintext;
    c.http_listen = None;
    c.reconnect_initial = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(200);
    c.target_lag = Duration::from_millis(1500);
    c.relay = RelayConfig::disabled();
    c
}

async fn wait_until(v: &Viewer, what: &str, f: impl Fn(&Stats) -> bool) -> Stats {
    tokio::time::timeout(GUARD, async {
        loop {
            let s = v.stats();
            if f(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}: {}", v.stats()))
}

/// Counts, in what the viewer hands its player, the chunks of run 1 and of run 2
/// (their payloads start with `<run N>`).
#[derive(Default)]
struct Played {
    run1: AtomicU64,
    run2: AtomicU64,
}

fn watch_output(v: &Viewer) -> Arc<Played> {
    let played = Arc::new(Played::default());
    let p = played.clone();
    let mut sub = v.subscribe();
    tokio::spawn(async move {
        while let Some(b) = sub.next_bytes().await {
            let count = |needle: &[u8]| b.windows(needle.len()).filter(|w| *w == needle).count();
            p.run1
                .fetch_add(count(b"<run 1>") as u64, Ordering::Relaxed);
            p.run2
                .fetch_add(count(b"<run 2>") as u64, Ordering::Relaxed);
        }
    });
    played
}

async fn wait_for_report(cp: &MiniCp) -> Vec<(String, u64, i32, String)> {
    tokio::time::timeout(GUARD, async {
        while cp.reports().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the ReportPeer call");
    cp.reports()
}

/// A control plane whose `viewers` viewers each get substream 0 from the relay, the
/// rest from the data plane (its `run_epoch` is set by the test).
fn control(
    broadcast: &str,
    dp: &LiveServer,
    relay: &LiveServer,
    signer: &ChunkSigner,
    viewers: usize,
) -> MiniCp {
    let plan = Plan {
        parents: vec![
            Ref::Fixed(RELAY, relay.addr.to_string()),
            Ref::DataPlane,
            Ref::DataPlane,
            Ref::DataPlane,
        ],
        child_slots: 0,
    };
    mini_cp::new(
        broadcast,
        dp.addr,
        K,
        CHUNK_MS as u32,
        60_000,
        vec![plan; viewers],
        vec![(signer.key_id(), signer.public_key().to_vec())],
    )
}

/// Record run 1, restart (run 2: the data plane starts again at chunk 0 with the same
/// key), and let a relay replay the recording to a run-2 viewer: no run-1 chunk is
/// played, the relay is dropped and reported, run 2 plays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_1_chunks_replayed_by_a_relay_after_a_restart_are_never_played() {
    let node_key = Arc::new(ChunkSigner::new(1, &generate_pkcs8().unwrap()).unwrap());
    // Run 1, recorded by someone who watched it.
    let run1 = Source::signed_in_run(K, CHUNK_MS, "rp1", node_key.clone(), 1);
    run1.wait_for(60).await;
    run1.stop();
    let recording = run1.chunks.lock().clone();
    assert!(recording.len() >= 60);
    // Run 2: the broadcast was restarted, chunk numbers start again at 0.
    let run2 = Source::signed_in_run(K, CHUNK_MS, "rp1", node_key.clone(), 2);
    let dp = LiveServer::start(run2.clone(), Opts::data_plane("rp1")).await;
    let replay = Source::replaying(K, CHUNK_MS, recording);
    let relay = LiveServer::start(replay.clone(), Opts::peer("rp1")).await;
    run2.wait_for(10).await;
    let mut cp = control("rp1", &dp, &relay, &node_key, 1);
    cp.run_epoch = 2;
    let url = mini_cp::start(cp.clone()).await;
    let v = Viewer::join(config("rp1", &url)).await.unwrap();
    let played = watch_output(&v);

    let s = wait_until(&v, "the relay reported", |s| s.peers_reported >= 1).await;
    assert!(s.bad_chunks_from_peers >= 1, "{s}");
    let reports = wait_for_report(&cp).await;
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].1, RELAY);
    assert_eq!(reports[0].2, PeerReportKind::BadChunk as i32);
    assert!(
        reports[0].3.contains("run 1") && reports[0].3.contains("run 2"),
        "the report says why: {reports:?}"
    );
    // The relay's substream is fetched elsewhere: run 2 plays on, run 1 never.
    let s = wait_until(&v, "run 2 played", |s| s.chunks_played >= 60).await;
    assert_eq!(s.chunks_previous_run, 0, "nothing excused: {s}");
    tokio::time::timeout(GUARD, async {
        while played.run2.load(Ordering::Relaxed) < 40 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("run-2 chunks reach the player");
    assert_eq!(
        played.run1.load(Ordering::Relaxed),
        0,
        "a run-1 chunk was played"
    );
    v.leave().await.unwrap();
    run2.stop();
    replay.stop();
}

/// The same key and run, but chunks stamped a minute ago (a recording replayed
/// later): beyond the default age limit, refused and the relay reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_older_than_the_age_limit_are_refused() {
    let node_key = Arc::new(ChunkSigner::new(1, &generate_pkcs8().unwrap()).unwrap());
    let live = Source::signed_in_run(K, CHUNK_MS, "rp2", node_key.clone(), 2);
    let stale = Source::signed_aged(K, CHUNK_MS, "rp2", node_key.clone(), 2, 60_000);
    let dp = LiveServer::start(live.clone(), Opts::data_plane("rp2")).await;
    let relay = LiveServer::start(stale.clone(), Opts::peer("rp2")).await;
    live.wait_for(10).await;
    let mut cp = control("rp2", &dp, &relay, &node_key, 1);
    cp.run_epoch = 2;
    let url = mini_cp::start(cp.clone()).await;
    let v = Viewer::join(config("rp2", &url)).await.unwrap();
    let s = wait_until(&v, "the relay reported", |s| s.peers_reported >= 1).await;
    assert!(s.bad_chunks_from_peers >= 1, "{s}");
    let reports = wait_for_report(&cp).await;
    assert_eq!(reports[0].1, RELAY);
    assert!(reports[0].3.contains("stale"), "{reports:?}");
    wait_until(&v, "the live run played", |s| s.chunks_played >= 40).await;
    v.leave().await.unwrap();
    live.stop();
    stale.stop();
}

/// A device clock ten minutes ahead (or behind): the SDK measures the offset to the
/// control plane's clock at Join and judges ages by it, so fresh chunks play and
/// nothing is refused. The relay here is honest (the current run, fresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_with_a_skewed_clock_still_plays() {
    let node_key = Arc::new(ChunkSigner::new(1, &generate_pkcs8().unwrap()).unwrap());
    let live = Source::signed_in_run(K, CHUNK_MS, "rp3", node_key.clone(), 3);
    let dp = LiveServer::start(live.clone(), Opts::data_plane("rp3")).await;
    let relay = LiveServer::start(live.clone(), Opts::peer("rp3")).await;
    live.wait_for(10).await;
    let mut cp = control("rp3", &dp, &relay, &node_key, 2);
    cp.run_epoch = 3;
    let url = mini_cp::start(cp.clone()).await;
    for skew_ms in [600_000i64, -600_000] {
        let mut c = config("rp3", &url);
        c.clock = WallClock::offset_by(skew_ms);
        let v = Viewer::join(c).await.unwrap();
        let s = wait_until(&v, "played with a skewed clock", |s| {
            s.chunks_played >= 40 && s.bytes_from_peers > 0
        })
        .await;
        assert_eq!(s.bad_chunks_from_peers, 0, "{s}");
        assert_eq!(s.bad_chunks_from_server, 0, "{s}");
        assert_eq!(s.peers_reported, 0, "{s}");
        // The measured offset undoes the skew (to within the loopback round trip).
        assert!(
            (s.clock_offset_ms + skew_ms).abs() < 5_000,
            "offset {} for a skew of {skew_ms}",
            s.clock_offset_ms
        );
        v.leave().await.unwrap();
    }
    assert!(cp.reports().is_empty(), "{:?}", cp.reports());
    live.stop();
}
