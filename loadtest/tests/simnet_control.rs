//! `--net sim`'s control-plane traffic against the real control plane, as the SDK's:
//! simulated viewers' quality reports reach the control plane's audience roll-up; a
//! change of the chunk key sets pushed on the session streams is followed by every
//! viewer's real data-plane connection (and nobody stops playing); session streams cut
//! on the server's side are reopened (and the sessions carry on).
//!
//! Waits are conditions with generous bounds (hang guards); nothing is timed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use starling_controlplane::BearerInterceptor;
use starling_loadtest::pattern::Pattern;
use starling_loadtest::simnet::control::{ControlConfig, ControlCounters};
use starling_loadtest::simnet::dataplane::DpShared;
use starling_loadtest::simnet::dispatch;
use starling_loadtest::simnet::{
    Fabric, FabricConfig, FabricHandle, ServerMode, SimNetConfig, Snapshot, Up,
};
use starling_loadtest::{Deployment, DeploymentConfig, UploadProfile};
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::{GetAudienceRequest, PublicKey, RegisterNodeRequest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const GUARD: Duration = Duration::from_secs(180);

async fn deployment() -> Deployment {
    Deployment::start(DeploymentConfig {
        bitrate_kbps: 64,
        chunk_ms: 250,
        substreams: 4,
        behind_proxy: true,
        // Shorter than the SDK's 5 s default (the control plane names it in `Join`),
        // so that a short run sends several.
        report_interval: Some(Duration::from_secs(1)),
        ..DeploymentConfig::default()
    })
    .await
    .unwrap()
}

/// A fabric of simulated viewers and their control-plane sessions at `control_url`.
fn start(
    dep: &Deployment,
    control_url: String,
    server: ServerMode,
    dp: Option<Arc<DpShared>>,
) -> (FabricHandle, Arc<ControlCounters>, JoinHandle<()>) {
    let (up_tx, up_rx) = mpsc::channel::<Up>(65_536);
    let fabric = Fabric::spawn(
        FabricConfig {
            net: SimNetConfig::new(64, 4, Duration::from_millis(250)),
            upload: UploadProfile::mixed(),
            index_offset: 0,
            pattern: Some(Pattern::new(dep.config().seed)),
            server,
        },
        up_tx,
    );
    let (cc, control) = dispatch::spawn(
        ControlConfig {
            data_plane: dp,
            ..ControlConfig::new(control_url, dep.transport(), dep.broadcast_id().to_owned())
        },
        up_rx,
        fabric.sender(),
    );
    (fabric, cc, control)
}

/// Waits (bounded) until `peers` viewers are active, each viewer that has not left
/// has been due `chunks` more chunks than in `since`, and `more` holds.
async fn wait_playing(
    fabric: &FabricHandle,
    peers: usize,
    chunks: u64,
    since: Option<&Snapshot>,
    more: impl Fn() -> bool,
) -> Snapshot {
    let before = |i: usize| {
        since
            .and_then(|s| s.records.iter().find(|r| r.index == i))
            .map_or(0, |r| r.chunks_played + r.chunks_skipped)
    };
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let snap = fabric.snapshot(true).await.unwrap();
        let done = snap.sample.active == peers
            && snap
                .records
                .iter()
                .filter(|r| r.left_s.is_none())
                .all(|r| r.chunks_played + r.chunks_skipped >= before(r.index) + chunks)
            && more();
        if done || tokio::time::Instant::now() > deadline {
            return snap;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Every viewer active, playing the source's bytes, with the stream flowing.
fn assert_playing(snap: &Snapshot, peers: usize, what: &str) {
    let s = &snap.sample;
    eprintln!(
        "{what}: active {} played {} skipped {} share {:.3} continuity {:.4} errors {:?}",
        s.active,
        s.chunks_played,
        s.chunks_skipped,
        snap.peer_share(),
        snap.continuity(),
        snap.errors
    );
    assert_eq!(
        s.active, peers,
        "{what}: every viewer plays: {:?}",
        snap.errors
    );
    assert_eq!(
        s.not_identical, 0,
        "{what}: every played byte is the source's"
    );
    assert_eq!(snap.played_without_bytes, 0);
    assert!(
        snap.continuity() >= 0.99,
        "{what}: continuity {}",
        snap.continuity()
    );
}

/// 60 simulated viewers report their quality (`ViewerService.Report`) at the interval
/// the control plane names, and once more on leave: every report is acknowledged, and
/// the control plane's audience roll-up (`GetAudience`) counts the 60 viewers with
/// their bytes from the data plane and from peers and their start-ups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_viewers_quality_reports_reach_the_control_plane() {
    common::init_tracing();
    let dep = deployment().await;
    let peers = 60;
    let (fabric, cc, control) = start(&dep, dep.control_url(), ServerMode::InProcess, None);
    fabric.add(peers).await;
    let min_reports = 3 * peers as u64;
    let snap = wait_playing(&fabric, peers, 40, None, || {
        load(&cc.quality_reports) >= min_reports
    })
    .await;
    assert_playing(&snap, peers, "reporting");
    assert!(
        load(&cc.quality_reports) >= min_reports,
        "reports acknowledged: {cc:?}"
    );
    fabric.stop().await;
    tokio::time::timeout(GUARD, control).await.unwrap().unwrap();
    eprintln!("control {cc:?}");
    assert_eq!(load(&cc.leaves), peers as u64);
    assert_eq!(load(&cc.reports_dropped), 0);
    assert!(dep.reports().flush(Duration::from_secs(60)).await);
    let points = dep
        .admin()
        .get_audience(GetAudienceRequest {
            broadcast_id: dep.broadcast_id().to_string(),
            from_unix_ms: 0,
            to_unix_ms: 0,
            step_s: 60,
        })
        .await
        .expect("GetAudience")
        .into_inner()
        .points;
    eprintln!("GetAudience: {points:?}");
    let peak = points.iter().map(|p| p.peak_viewers).max().unwrap_or(0);
    let peer_bytes: u64 = points.iter().map(|p| p.peer_bytes).sum();
    let server_bytes: u64 = points.iter().map(|p| p.server_egress_bytes).sum();
    let watch: f64 = points.iter().map(|p| p.watch_time_s).sum();
    assert_eq!(peak, peers as u32, "every simulated viewer reported");
    assert!(peer_bytes > 0 && server_bytes > 0, "{points:?}");
    assert!(
        peer_bytes > server_bytes,
        "the grid carries most of the stream: {points:?}"
    );
    assert!(watch > 0.0, "{points:?}");
    assert!(
        points.iter().any(|p| p.startup_p50_ms > 0),
        "start-ups recorded: {points:?}"
    );
    dep.shutdown().await;
}

/// 40 simulated viewers with real data-plane connections, each checking chunks with
/// the key set, run and age limit of its `Join` and session stream. While they play,
/// another node registers with its own chunk-signing key: it is not assigned to the
/// broadcast, so its key is not trusted for it (issue 18) and no new key set is pushed;
/// nobody refuses a chunk or stops playing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_viewers_keep_their_keys_when_an_unassigned_node_registers() {
    common::init_tracing();
    let dep = deployment().await;
    let peers = 40;
    let dp = Arc::new(DpShared::new(250, 4096));
    let (fabric, cc, control) = start(&dep, dep.control_url(), ServerMode::Wire, Some(dp.clone()));
    fabric.add(peers).await;
    let snap = wait_playing(&fabric, peers, 20, None, || {
        load(&dp.key_sets) >= peers as u64
    })
    .await;
    assert_playing(&snap, peers, "before the change");
    // Each stream's first message carried the key sets.
    assert_eq!(load(&cc.key_sets), peers as u64, "{cc:?}");
    assert_eq!(load(&dp.key_sets), peers as u64);

    let channel = dep.channel().await.unwrap();
    let mut edge = EdgeServiceClient::with_interceptor(
        channel,
        BearerInterceptor::new(dep.admin_key()).unwrap(),
    );
    edge.register(RegisterNodeRequest {
        node_name: "edge-key-change".into(),
        wire_addr: "edge-key-change.test:9000".into(),
        http_addr: "edge-key-change.test:9080".into(),
        cores: 1,
        capacity_viewers: 10,
        chunk_signing_key: Some(PublicKey {
            key_id: 0x7e57_0002,
            ed25519: vec![7; 32],
        }),
    })
    .await
    .unwrap();
    let snap = wait_playing(&fabric, peers, 20, Some(&snap), || true).await;
    eprintln!(
        "after the change: control {cc:?}; data plane: {} key sets, {} chunks verified, {} refused, {} held, {} failed",
        load(&dp.key_sets),
        load(&dp.chunks),
        load(&dp.bad_chunks),
        load(&dp.held),
        load(&dp.failed)
    );
    assert_eq!(
        load(&cc.key_sets),
        peers as u64,
        "the unassigned node's key reached no session: {cc:?}"
    );
    assert_eq!(load(&dp.key_sets), peers as u64);
    assert_playing(&snap, peers, "after the change");
    assert_eq!(load(&dp.bad_chunks), 0, "no chunk refused");
    assert_eq!(load(&dp.failed), 0, "no data-plane connection lost");
    assert_eq!(load(&dp.open), peers as u64);
    assert_eq!(load(&cc.ended), 0);
    fabric.stop().await;
    tokio::time::timeout(GUARD, control).await.unwrap().unwrap();
    dep.shutdown().await;
}

/// A TCP proxy whose connections can be cut (both sockets closed at once).
struct Proxy {
    url: String,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A TCP proxy: TLS passes through it end to end.
        let url = format!("https://{}", l.local_addr().unwrap());
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let c = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut a, _)) = l.accept().await {
                let target = target.clone();
                let t = tokio::spawn(async move {
                    if let Ok(mut b) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                c.lock().unwrap().push(t);
            }
        });
        Proxy { url, conns, task }
    }

    /// Closes every connection open now; returns how many.
    fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        let n = conns.iter().filter(|t| !t.is_finished()).count();
        for t in conns {
            t.abort();
        }
        n
    }
}

/// 60 simulated viewers reach the control plane through a proxy (two HTTP/2
/// connections, 30 sessions each); the proxy closes both connections, which breaks
/// every session stream on the server's side. Every viewer reopens its stream (with
/// the SDK's back-off) in the same session, plays on meanwhile, and its session goes on
/// afterwards: counters, pushes and quality reports, then its leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_viewers_reopen_broken_session_streams() {
    common::init_tracing();
    let dep = deployment().await;
    let target = dep
        .control_url()
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = Proxy::start(target).await;
    let peers = 60;
    let (up_tx, up_rx) = mpsc::channel::<Up>(65_536);
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
        ControlConfig {
            sessions_per_channel: 30,
            ..ControlConfig::new(
                proxy.url.clone(),
                dep.transport(),
                dep.broadcast_id().to_owned(),
            )
        },
        up_rx,
        fabric.sender(),
    );
    fabric.add(peers).await;
    let snap = wait_playing(&fabric, peers, 20, None, || {
        load(&cc.streams_open) == peers as u64
    })
    .await;
    assert_playing(&snap, peers, "before the cut");
    assert_eq!(load(&cc.streams_open), peers as u64);
    assert_eq!(load(&cc.streams_reopened), 0);
    let cut = proxy.cut();
    assert_eq!(cut, 2, "two HTTP/2 connections carried the sessions");
    let reports = load(&cc.quality_reports);
    let snap = wait_playing(&fabric, peers, 20, Some(&snap), || {
        load(&cc.streams_reopened) >= peers as u64
            && load(&cc.streams_open) == peers as u64
            && load(&cc.quality_reports) >= reports + 2 * peers as u64
    })
    .await;
    eprintln!("after the cut: control {cc:?}");
    assert!(
        load(&cc.streams_reopened) >= peers as u64,
        "every stream reopened: {cc:?}"
    );
    assert_eq!(load(&cc.streams_open), peers as u64);
    assert_eq!(load(&cc.ended), 0, "no session ended");
    assert_eq!(load(&cc.sessions), peers as u64, "the same sessions");
    assert!(
        load(&cc.quality_reports) >= reports + 2 * peers as u64,
        "reports acknowledged after the cut: {cc:?}"
    );
    assert_playing(&snap, peers, "after the cut");
    // The reopened streams carry the sessions on: 10 leave, and their children get
    // new parents pushed.
    let downs = load(&cc.downs);
    fabric.leave(10).await;
    let snap = wait_playing(&fabric, peers - 10, 20, Some(&snap), || {
        load(&cc.downs) > downs
    })
    .await;
    assert!(load(&cc.downs) > downs, "deltas pushed after the cut");
    assert_eq!(snap.sample.left, 10);
    fabric.stop().await;
    tokio::time::timeout(GUARD, control).await.unwrap().unwrap();
    assert_eq!(load(&cc.leaves), peers as u64);
    assert_eq!(load(&cc.streams_open), 0);
    proxy.task.abort();
    dep.shutdown().await;
}
