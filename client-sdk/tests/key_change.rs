//! A parent relays chunks signed by a node key the child has not heard of yet (a node
//! registered, took over or rotated after the child joined). The child must not ban
//! or report that parent: it holds the chunks, fetches the current keys with an early
//! heartbeat, and plays them. A parent whose key id stays unknown after the refresh
//! (a forger's) is still dropped and reported as a bad-chunk sender. Real loopback
//! sockets; timeouts only bound hangs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::live::{LiveServer, Opts, RAP_EVERY, Source};
use common::mini_cp::{self, Plan, Ref};
use starling_proto::integrity::ChunkSigner;
use starling_proto::token::generate_pkcs8;
use starling_proto::v1::PeerReportKind;
use starling_sdk::{RelayConfig, Stats, Viewer, ViewerConfig};

const GUARD: Duration = Duration::from_secs(40);
const K: u16 = 4;
const CHUNK_MS: u64 = 100;
const PARENT: u64 = 99;

fn signer(key_id: u32) -> Arc<ChunkSigner> {
    Arc::new(ChunkSigner::new(key_id, &generate_pkcs8().unwrap()).unwrap())
}

fn key(s: &ChunkSigner) -> (u32, Vec<u8>) {
    (s.key_id(), s.public_key().to_vec())
}

fn config(broadcast: &str, url: &str) -> ViewerConfig {
    let mut c = ViewerConfig::new(broadcast);
    c.control_url = url.into();
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

/// The data plane signs with key 1; the parent relays chunks signed with key 2, which
/// the control plane published after the child joined (its Join listed key 1 only;
/// heartbeats list both). Heartbeats are a minute apart: only an early one brings key
/// 2. Before the fix the child banned and reported the parent on its first chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_forwarding_a_new_nodes_chunks_is_not_banned() {
    let (a, b) = (signer(1), signer(2));
    let src_a = Source::signed(K, CHUNK_MS, "kc1", a.clone());
    let src_b = Source::signed(K, CHUNK_MS, "kc1", b.clone());
    let dp = LiveServer::start(src_a.clone(), Opts::data_plane("kc1")).await;
    let parent = LiveServer::start(src_b.clone(), Opts::peer("kc1")).await;
    src_a.wait_for(2 * RAP_EVERY).await;
    let mut cp = mini_cp::new(
        "kc1",
        dp.addr,
        K,
        CHUNK_MS as u32,
        60_000,
        vec![Plan {
            parents: vec![
                Ref::Fixed(PARENT, parent.addr.to_string()),
                Ref::Fixed(PARENT, parent.addr.to_string()),
                Ref::DataPlane,
                Ref::DataPlane,
            ],
            child_slots: 0,
        }],
        vec![key(&a), key(&b)],
    );
    cp.join_chunk_keys = Some(vec![key(&a)]);
    let url = mini_cp::start(cp.clone()).await;
    let v = Viewer::join(config("kc1", &url)).await.unwrap();
    let s = wait_until(&v, "chunks from the parent, played", |s| {
        s.bytes_from_peers > 0 && s.chunks_played >= 40
    })
    .await;
    assert!(s.chunks_unknown_key >= 1, "{s}");
    assert!(s.key_refreshes >= 1, "{s}");
    assert_eq!(s.bad_chunks_from_peers, 0, "{s}");
    assert_eq!(s.peers_reported, 0, "{s}");
    assert!(
        cp.heartbeats() + cp.key_refreshes_asked() >= 1,
        "the keys came from an early heartbeat or stream refresh"
    );
    assert!(cp.reports().is_empty(), "{:?}", cp.reports());
    assert!(
        cp.log.lock().reparents.is_empty(),
        "the parent was not left"
    );
    // The parent keeps feeding its substreams.
    let before = v.stats().bytes_from_peers;
    wait_until(&v, "more from the parent", |s| s.bytes_from_peers > before).await;
    v.leave().await.unwrap();
    src_a.stop();
    src_b.stop();
}

/// A parent whose chunks name a key id the control plane never published: after the
/// refresh the key is still unknown, so the parent is dropped and reported as a
/// bad-chunk sender, and the substreams come from elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_id_still_unknown_after_the_refresh_bans_and_reports() {
    let (a, forger) = (signer(1), signer(7));
    let src_a = Source::signed(K, CHUNK_MS, "kc2", a.clone());
    let src_f = Source::signed(K, CHUNK_MS, "kc2", forger);
    let dp = LiveServer::start(src_a.clone(), Opts::data_plane("kc2")).await;
    let parent = LiveServer::start(src_f.clone(), Opts::peer("kc2")).await;
    src_a.wait_for(2 * RAP_EVERY).await;
    let cp = mini_cp::new(
        "kc2",
        dp.addr,
        K,
        CHUNK_MS as u32,
        60_000,
        vec![Plan {
            parents: vec![
                Ref::Fixed(PARENT, parent.addr.to_string()),
                Ref::DataPlane,
                Ref::DataPlane,
                Ref::DataPlane,
            ],
            child_slots: 0,
        }],
        vec![key(&a)],
    );
    let url = mini_cp::start(cp.clone()).await;
    let v = Viewer::join(config("kc2", &url)).await.unwrap();
    let s = wait_until(&v, "the forger reported", |s| s.peers_reported >= 1).await;
    assert!(s.key_refreshes >= 1, "refreshed before judging: {s}");
    assert!(s.chunks_unknown_key >= 1, "held first: {s}");
    assert!(s.bad_chunks_from_peers >= 1, "then judged bad: {s}");
    // The stats count the report when its `ReportPeer` call is spawned: wait for it.
    tokio::time::timeout(GUARD, async {
        while cp.reports().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the ReportPeer call");
    let reports = cp.reports();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].1, PARENT);
    assert_eq!(reports[0].2, PeerReportKind::BadChunk as i32);
    // Playing goes on from the data plane.
    let played = s.chunks_played;
    wait_until(&v, "more played", |s| s.chunks_played >= played + 20).await;
    v.leave().await.unwrap();
    src_a.stop();
    src_f.stop();
}
