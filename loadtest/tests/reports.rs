//! Issue 5's acceptance test: audience reports from a small swarm end up in the
//! database (SQLite, and Postgres when `DATABASE_URL` is set) and `GetAudience`'s
//! roll-ups equal what the SDKs reported, computed independently here.
//!
//! The SDKs talk to the control plane through a transparent gRPC proxy written here
//! that records every `Join` (with the times the request went out and the answer came
//! back) and every acknowledged `ViewerReport`. From those the test recomputes the
//! per-minute figures by the documented definitions (a report covers the time since
//! the session's previous report, or since its join; its counter deltas and covered
//! time go to the minute of its `at_unix_ms`; viewers of a minute = distinct sessions
//! reporting in it; start-up = each session's first non-zero `startup_ms`, in the
//! minute of the report carrying it), and compares with `GetAudience(step 60)`:
//!
//! * exact: bytes from the data plane and from peers (per minute and in total, and the
//!   total equals the sum of the SDKs' final cumulative counters), viewers and peak per
//!   minute, start-up p50/p95;
//! * bounded: watch time (and so the rebuffer ratio). The only thing the test cannot
//!   know exactly is when the control plane recorded each join, which lies between the
//!   moment the proxy forwarded the `Join` and the moment the answer came back; each
//!   session's first report's covered time is therefore bracketed by those two times,
//!   and the stored watch time must lie inside the bracket.
//!
//! The reports themselves are checked against the SDKs' own counters: every session
//! ends with a `final` report whose start-up equals the SDK's, and whose byte counters
//! are at least the SDK's snapshot taken just before `leave()` and at most what the
//! stream can deliver in the few seconds `leave()` takes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a panic

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{env_or, init_tracing, unix_ms};
use starling_loadtest::{Deployment, DeploymentConfig, Swarm, SwarmConfig, UploadProfile};
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::viewer_service_server::{ViewerService, ViewerServiceServer};
use starling_proto::v1::{
    GetAudienceRequest, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse,
    LeaveRequest, LeaveResponse, ReparentRequest, ReparentResponse, ReportPeerRequest,
    ReportPeerResponse, ReportRequest, ReportResponse, ViewerReport,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Both variants share the machine: run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct Log {
    /// session → (Join forwarded, Join answered), unix ms.
    joins: HashMap<String, (i64, i64)>,
    /// session → acknowledged reports by seq.
    reports: HashMap<String, BTreeMap<u64, ViewerReport>>,
}

#[derive(Clone)]
struct Proxy {
    up: ViewerServiceClient<Channel>,
    log: Arc<Mutex<Log>>,
}

#[tonic::async_trait]
impl ViewerService for Proxy {
    type SessionStream = std::pin::Pin<
        Box<
            dyn tonic::codegen::tokio_stream::Stream<
                    Item = Result<starling_proto::v1::SessionDown, Status>,
                > + Send
                + 'static,
        >,
    >;

    async fn session(
        &self,
        _req: Request<tonic::Streaming<starling_proto::v1::SessionUp>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented(
            "this fake control plane has no session stream",
        ))
    }

    async fn join(&self, r: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let t0 = unix_ms() as i64;
        let resp = self.up.clone().join(r.into_inner()).await?;
        let t1 = unix_ms() as i64;
        self.log
            .lock()
            .unwrap()
            .joins
            .insert(resp.get_ref().session_id.clone(), (t0, t1));
        Ok(resp)
    }
    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.up.clone().heartbeat(r.into_inner()).await
    }
    async fn leave(&self, r: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        self.up.clone().leave(r.into_inner()).await
    }
    async fn reparent(
        &self,
        r: Request<ReparentRequest>,
    ) -> Result<Response<ReparentResponse>, Status> {
        self.up.clone().reparent(r.into_inner()).await
    }
    async fn report_peer(
        &self,
        r: Request<ReportPeerRequest>,
    ) -> Result<Response<ReportPeerResponse>, Status> {
        self.up.clone().report_peer(r.into_inner()).await
    }
    async fn report(&self, r: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        let req = r.into_inner();
        let resp = self.up.clone().report(req.clone()).await?;
        let acked = resp.get_ref().acked_seq;
        let mut log = self.log.lock().unwrap();
        let e = log.reports.entry(req.session_id.clone()).or_default();
        for rep in req.reports.into_iter().filter(|x| x.report_seq <= acked) {
            e.entry(rep.report_seq).or_insert(rep);
        }
        Ok(resp)
    }
}

const MINUTE_MS: i64 = 60_000;
const MAX_GAP_MS: i64 = 30_000; // ReportConfig::default().max_gap

fn minute_of(t: i64) -> i64 {
    t - t.rem_euclid(MINUTE_MS)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One minute as recomputed from the recorded reports.
#[derive(Debug, Default, Clone)]
struct Expected {
    viewers: u64,
    server: u64,
    peers: u64,
    stall_ms: u64,
    /// Watch time bounds (the first report of each session is bracketed).
    watch_lo: i64,
    watch_hi: i64,
    startups: Vec<u32>,
}

fn expected(log: &Log) -> BTreeMap<i64, Expected> {
    let mut out: BTreeMap<i64, Expected> = BTreeMap::new();
    for (session, reports) in &log.reports {
        let Some(&(join_lo, join_hi)) = log.joins.get(session) else {
            continue;
        };
        // The control plane's join time is somewhere in [join_lo, join_hi].
        let (mut prev_lo, mut prev_hi) = (join_lo, join_hi);
        let (mut s, mut p, mut st) = (0u64, 0u64, 0u64);
        let mut minute = None;
        let mut startup_seen = false;
        for r in reports.values() {
            let at_hi = r.at_unix_ms.max(prev_lo);
            let at_lo = r.at_unix_ms.max(prev_hi);
            // Equal except when a first report is stamped inside the join bracket.
            let at = at_lo;
            let m = minute_of(at);
            let e = out.entry(m).or_default();
            e.watch_lo += (at_lo - prev_hi).clamp(0, MAX_GAP_MS);
            e.watch_hi += (at_hi - prev_lo).clamp(0, MAX_GAP_MS);
            let d = |cur: u64, prev: u64| if cur >= prev { cur - prev } else { cur };
            e.server += d(r.bytes_from_server, s);
            e.peers += d(r.bytes_from_peers, p);
            e.stall_ms += d(r.stall_ms, st);
            if minute != Some(m) {
                e.viewers += 1;
            }
            if !startup_seen && r.startup_ms > 0 {
                startup_seen = true;
                e.startups.push(r.startup_ms);
            }
            (s, p, st) = (r.bytes_from_server, r.bytes_from_peers, r.stall_ms);
            minute = Some(m);
            (prev_lo, prev_hi) = (at, at);
        }
    }
    for e in out.values_mut() {
        e.startups.sort_unstable();
    }
    out
}

fn check(failures: &mut Vec<String>, ok: bool, what: String) {
    if !ok {
        eprintln!("FAIL: {what}");
        failures.push(what);
    }
}

async fn reports_end_up_in_the_database(database_url: Option<String>) {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let peers = env_or("STARLING_REPORT_PEERS", 10) as usize;
    let run = Duration::from_secs(env_or("STARLING_REPORT_SECS", 20));
    let dep = Deployment::start(DeploymentConfig {
        report_interval: Some(Duration::from_secs(1)),
        database_url,
        // Every viewer call goes through the proxy below (one address).
        behind_proxy: true,
        ..DeploymentConfig::default()
    })
    .await
    .expect("deployment");
    println!("database: {}", dep.database_backend());

    // The proxy in front of the control plane's ViewerService.
    let log = Arc::new(Mutex::new(Log::default()));
    let proxy = Proxy {
        up: ViewerServiceClient::new(dep.channel().await.expect("upstream")),
        log: log.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy_url = format!("http://{}", listener.local_addr().expect("addr"));
    let proxy_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ViewerServiceServer::new(proxy))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    // The in-test proxy serves plaintext (its upstream hop is TLS).
    let swarm = Swarm::for_broadcast(
        proxy_url,
        starling_proto::transport::Transport::Plaintext,
        dep.broadcast_id().to_string(),
        dep.source().bitrate_kbps(),
        dep.source().pattern(),
    );
    swarm
        .add_peers(&SwarmConfig {
            peers,
            upload: UploadProfile::mixed(),
            ..SwarmConfig::default()
        })
        .await;
    tokio::time::sleep(run).await;
    let sessions: Vec<Option<String>> = (0..peers).map(|i| swarm.session_id(i)).collect();
    swarm.shutdown().await; // every peer leaves: final report, then Leave
    let presence = swarm.presence();
    let flushed = dep.reports().flush(Duration::from_secs(30)).await;
    let mut failures = Vec::new();
    check(&mut failures, flushed, "report queue did not drain".into());

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
    let log = std::mem::take(&mut *log.lock().unwrap());
    proxy_task.abort();

    // 1. The reports against the SDKs' own counters.
    let mut final_server = 0u64;
    let mut final_peers = 0u64;
    let slack = u64::from(dep.source().bitrate_kbps()) * 1000 / 8 * 4; // 4 s of stream
    for (i, p) in presence.iter().enumerate() {
        let Some(session) = sessions.get(i).cloned().flatten() else {
            failures.push(format!("peer {i} had no session"));
            continue;
        };
        let stats = p.stats.clone().unwrap_or_default();
        let Some(reports) = log.reports.get(&session) else {
            failures.push(format!("peer {i}: no acknowledged report"));
            continue;
        };
        let last = reports.values().next_back().cloned().unwrap_or_default();
        let seqs: Vec<u64> = reports.keys().copied().collect();
        let contiguous = seqs.iter().enumerate().all(|(k, s)| *s == k as u64 + 1);
        let startup = stats
            .startup_time
            .map_or(0, |d| (d.as_millis() as u32).max(1));
        let ok = last.r#final
            && contiguous
            && stats.rejoins == 0
            && last.startup_ms == startup
            && last.bytes_from_server >= stats.bytes_from_server
            && last.bytes_from_server <= stats.bytes_from_server + slack
            && last.bytes_from_peers >= stats.bytes_from_peers
            && last.bytes_from_peers <= stats.bytes_from_peers + slack;
        check(
            &mut failures,
            ok,
            format!(
                "peer {i}: {} reports (contiguous {contiguous}), last {last:?} vs SDK {stats}",
                seqs.len()
            ),
        );
        final_server += last.bytes_from_server;
        final_peers += last.bytes_from_peers;
    }

    // 2. GetAudience against the roll-up recomputed from the reports.
    let exp = expected(&log);
    println!("GetAudience (step 60 s):");
    for pt in &points {
        println!(
            "  {}: viewers {:.1} (peak {}), watch {:.3} s, server {} B, peers {} B, peer share {:.4}, rebuffer {:.5}, start-up p50 {} ms p95 {} ms",
            pt.start_unix_ms,
            pt.concurrent_viewers,
            pt.peak_viewers,
            pt.watch_time_s,
            pt.server_egress_bytes,
            pt.peer_bytes,
            pt.peer_share,
            pt.rebuffer_ratio,
            pt.startup_p50_ms,
            pt.startup_p95_ms
        );
    }
    for (m, e) in &exp {
        println!(
            "  expected {m}: viewers {}, watch {:.3}..{:.3} s, server {} B, peers {} B, stall {} ms, start-ups {:?}",
            e.viewers,
            e.watch_lo as f64 / 1000.0,
            e.watch_hi as f64 / 1000.0,
            e.server,
            e.peers,
            e.stall_ms,
            e.startups
        );
    }
    let by_minute: HashMap<i64, _> = points.iter().map(|p| (p.start_unix_ms, p)).collect();
    for (m, e) in &exp {
        let Some(pt) = by_minute.get(m) else {
            failures.push(format!("GetAudience has no point for minute {m}"));
            continue;
        };
        check(
            &mut failures,
            pt.server_egress_bytes == e.server && pt.peer_bytes == e.peers,
            format!(
                "minute {m}: bytes server {} / peers {} != expected {} / {}",
                pt.server_egress_bytes, pt.peer_bytes, e.server, e.peers
            ),
        );
        check(
            &mut failures,
            u64::from(pt.peak_viewers) == e.viewers
                && (pt.concurrent_viewers - e.viewers as f64).abs() < 1e-9,
            format!(
                "minute {m}: viewers {} / peak {} != expected {}",
                pt.concurrent_viewers, pt.peak_viewers, e.viewers
            ),
        );
        check(
            &mut failures,
            pt.startup_p50_ms == percentile(&e.startups, 0.5)
                && pt.startup_p95_ms == percentile(&e.startups, 0.95),
            format!(
                "minute {m}: start-up p50/p95 {}/{} != expected {}/{} from {:?}",
                pt.startup_p50_ms,
                pt.startup_p95_ms,
                percentile(&e.startups, 0.5),
                percentile(&e.startups, 0.95),
                e.startups
            ),
        );
        let watch_ms = (pt.watch_time_s * 1000.0).round() as i64;
        check(
            &mut failures,
            watch_ms >= e.watch_lo && watch_ms <= e.watch_hi,
            format!(
                "minute {m}: watch {watch_ms} ms outside [{}, {}]",
                e.watch_lo, e.watch_hi
            ),
        );
        let stall_ms = pt.rebuffer_ratio * pt.watch_time_s * 1000.0;
        check(
            &mut failures,
            (stall_ms - e.stall_ms as f64).abs() < 1.0,
            format!(
                "minute {m}: stall {stall_ms:.1} ms != expected {} ms",
                e.stall_ms
            ),
        );
        let share = if e.server + e.peers == 0 {
            0.0
        } else {
            e.peers as f64 / (e.server + e.peers) as f64
        };
        check(
            &mut failures,
            (pt.peer_share - share).abs() < 1e-9,
            format!(
                "minute {m}: peer share {} != expected {share}",
                pt.peer_share
            ),
        );
    }
    for pt in &points {
        if !exp.contains_key(&pt.start_unix_ms) {
            check(
                &mut failures,
                pt.server_egress_bytes == 0 && pt.peer_bytes == 0 && pt.peak_viewers == 0,
                format!("unexpected figures in minute {}", pt.start_unix_ms),
            );
        }
    }
    // Totals: the roll-up's bytes are the SDKs' final cumulative counters, exactly.
    let total_server: u64 = points.iter().map(|p| p.server_egress_bytes).sum();
    let total_peers: u64 = points.iter().map(|p| p.peer_bytes).sum();
    let total_watch: f64 = points.iter().map(|p| p.watch_time_s).sum();
    let stays: f64 = presence
        .iter()
        .filter_map(|p| Some((p.left_at? - p.joined_at?).as_secs_f64()))
        .sum();
    println!(
        "totals: server {total_server} B (final reports {final_server}), peers {total_peers} B (final reports {final_peers}), watch {total_watch:.1} s (harness-measured stays {stays:.1} s)"
    );
    check(
        &mut failures,
        total_server == final_server && total_peers == final_peers && total_server > 0,
        "total bytes differ from the SDKs' final reports".into(),
    );
    check(
        &mut failures,
        points.iter().map(|p| p.peak_viewers).max() == Some(peers as u32),
        format!("peak viewers != {peers}"),
    );
    swarm.shutdown().await;
    dep.shutdown().await;
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_roll_up_sqlite() {
    reports_end_up_in_the_database(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_roll_up_postgres() {
    let Some(url) = common::postgres_url() else {
        return;
    };
    reports_end_up_in_the_database(Some(url)).await;
}
