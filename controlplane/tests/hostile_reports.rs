//! Hostile viewers' reports cannot hurt anyone else (issue 13, items 1 and 2), on SQLite
//! and (with `DATABASE_URL`) Postgres:
//!
//! * `hostile_counters_hurt_nobody`: an attacker in broadcast Y sends reports and
//!   heartbeats with `u64::MAX` counters, counters going backwards and alternating
//!   0 / huge, while an honest viewer reports in broadcast X. X's audience is exactly
//!   what an independent computation says and none of X's `Report` calls is refused;
//!   Y's roll-ups hold only physically possible values; `GetBroadcast.peer_share` stays
//!   far from the attacker's claim; the clamps are counted.
//! * `refused_rows_are_quarantined`: rows the database refuses (a trigger here) are
//!   dropped and counted, and every other row of their batches commits.
//! * `kill_9_loses_no_acknowledged_report`: the real binary is killed with SIGKILL right
//!   after each acknowledged `Report` and restarted on the same database: every
//!   acknowledged report is stored.
//!
//! No wall-clock assertion: waits are bounded by `PATIENCE` only, and the one bound that
//! depends on elapsed time (the heartbeat allowance) uses an upper bound of that time
//! measured by the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sqlx::AssertSqlSafe;
use starling_controlplane::reports::{ReportConfig, db};
use starling_controlplane::store::{NewBroadcast, NewSession};
use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    AudiencePoint, BroadcastRef, CommandsRequest, CreateBroadcastRequest, GetAudienceRequest,
    HealthReport, HeartbeatRequest, IngestHealth, JoinRequest, RegisterNodeRequest, ReportRequest,
    SourceHealth, ViewerReport,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const PATIENCE: Duration = Duration::from_secs(60);
const ADMIN_KEY: &str = "hostile-reports-admin-key-0123456789";
const MINUTE: i64 = 60_000;
const MAX_GAP_MS: i64 = 30_000;
/// The measured stream rate the fake node reports: 100,000 bytes/s.
const STREAM_KBPS: u32 = 800;
const STREAM_BPS: u64 = 100_000;
/// The documented default bounds: margin 2, burst 5 s of stream.
const MARGIN: u64 = 2;
const BURST_S: u64 = 5;

fn now_ms() -> i64 {
    starling_controlplane::service::now_ms()
}

struct Harness {
    cp: ControlPlaneHandle,
    channel: Channel,
    metrics: SocketAddr,
}

impl Harness {
    async fn start(store: Store, reports: ReportConfig) -> Harness {
        let service = ServiceConfig {
            heartbeat_interval: Duration::from_millis(100),
            // Nodes and sessions never time out during these tests.
            node_timeout: Duration::from_secs(600),
            missed_heartbeats: 6_000,
            reports,
            ..ServiceConfig::default()
        };
        let auth = AuthConfig {
            admin_key: Some(ADMIN_KEY.into()),
            ..AuthConfig::default()
        };
        let mut cp =
            ControlPlane::bind_with_store("127.0.0.1:0".parse().unwrap(), store, service, &auth)
                .await
                .unwrap();
        let metrics = cp
            .bind_metrics("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let cp = cp.spawn();
        let channel = Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Harness {
            cp,
            channel,
            metrics,
        }
    }

    fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    fn edge(
        &self,
    ) -> starling_proto::v1::edge_service_client::EdgeServiceClient<
        InterceptedService<Channel, BearerInterceptor>,
    > {
        EdgeServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    fn viewer(&self) -> ViewerServiceClient<Channel> {
        ViewerServiceClient::new(self.channel.clone())
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.cp.shutdown().await.unwrap();
    }
}

fn test_reports() -> ReportConfig {
    ReportConfig {
        // Small: a writer that stops writing shows as refused calls quickly.
        queue_max: 300,
        batch_max: 50,
        flush_interval: Duration::from_millis(20),
        retry_max: Duration::from_millis(500),
        max_gap: Duration::from_millis(u64::try_from(MAX_GAP_MS).unwrap()),
        ..ReportConfig::default()
    }
}

/// A fake data-plane node that registered and holds its command stream.
struct FakeNode {
    id: String,
    _commands: tonic::Streaming<starling_proto::v1::NodeCommand>,
}

async fn fake_node(h: &Harness) -> FakeNode {
    let mut edge = h.edge();
    let reg = edge
        .register(RegisterNodeRequest {
            node_name: "hostile".into(),
            wire_addr: "hostile.test:9000".into(),
            http_addr: "hostile.test:9080".into(),
            cores: 2,
            capacity_viewers: 1000,
            chunk_signing_key: None,
        })
        .await
        .unwrap()
        .into_inner();
    let commands = edge
        .commands(CommandsRequest {
            node_id: reg.node_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    FakeNode {
        id: reg.node_id,
        _commands: commands,
    }
}

/// A public broadcast, started on `node`, whose measured stream rate is `STREAM_KBPS`.
async fn live_broadcast(h: &Harness, node: &FakeNode, name: &str) -> String {
    let id = h
        .admin()
        .create_broadcast(CreateBroadcastRequest {
            name: name.into(),
            source_url: "http://127.0.0.1:8000/live.ts".into(),
            chunk_duration_ms: 0,
            substreams: 4,
            public: true,
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    h.admin()
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap();
    // The broadcast is assigned to the only node; its health report sets the rate.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ack = h
            .edge()
            .report_health(HealthReport {
                node_id: node.id.clone(),
                ingests: vec![IngestHealth {
                    broadcast_id: id.clone(),
                    health: SourceHealth::Up as i32,
                    bitrate_kbps: STREAM_KBPS,
                    ..Default::default()
                }],
                viewers: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(ack.known);
        let b = h
            .admin()
            .get_broadcast(BroadcastRef { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if b.stream_kbps == STREAM_KBPS {
            return id;
        }
        assert!(Instant::now() < deadline, "the stream rate never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn join(h: &Harness, broadcast: &str) -> String {
    h.viewer()
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: broadcast.into(),
            client_version: "hostile-test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session_id
}

async fn audience(h: &Harness, bid: &str, from: i64, to: i64) -> Vec<AudiencePoint> {
    h.admin()
        .get_audience(GetAudienceRequest {
            broadcast_id: bid.into(),
            from_unix_ms: from,
            to_unix_ms: to,
            step_s: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .points
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| !l.starts_with('#') && l.split_once(' ').is_some_and(|(n, _)| n == name))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no series {name} in\n{text}"))
}

fn promtool_check(text: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

/// The honest viewer's report `k` (1-based): every 2 s from `base`, 10,000 B/s from the
/// data plane and 30,000 B/s from peers (below the 100,000 B/s stream), a 10 ms stall
/// per report, start-up known from the 2nd report on.
fn honest(k: u64, base: i64) -> ViewerReport {
    ViewerReport {
        report_seq: k,
        at_unix_ms: base + i64::try_from(k - 1).unwrap() * 2_000,
        bytes_from_server: k * 20_000,
        bytes_from_peers: k * 60_000,
        bytes_uploaded: k * 50_000,
        startup_ms: if k >= 2 { 350 } else { 0 },
        stall_ms: k * 10,
        stalls: u32::try_from(k).unwrap(),
        chunks_played: k * 5,
        ..Default::default()
    }
}

/// The attacker's counter values, cycled: huge, zero (backwards), huge again, small...
const HOSTILE: [u64; 6] = [u64::MAX, 0, i64::MAX as u64 + 7, 3, u64::MAX - 1, 1 << 63];

fn hostile(j: u64, base: i64) -> ViewerReport {
    let v = HOSTILE[usize::try_from(j % 6).unwrap()];
    ViewerReport {
        report_seq: j,
        at_unix_ms: base + i64::try_from(j).unwrap() * 1_000,
        bytes_from_server: v / 2,
        bytes_from_peers: v,
        bytes_uploaded: v,
        startup_ms: u32::MAX,
        stall_ms: v,
        stalls: u32::MAX,
        lag_ms: u32::MAX,
        buffer_ms: u32::MAX,
        parent_changes: u32::MAX,
        peers: u32::MAX,
        chunks_played: v,
        chunks_skipped: v,
        ..Default::default()
    }
}

/// The roll-up definitions, recomputed for one session whose first report covers
/// `first_covered` ms: per minute of each report's time its covered time and counter
/// deltas; start-up at the first non-zero one.
fn expected_points(
    reps: &[ViewerReport],
    first_covered: i64,
    from: i64,
    to: i64,
) -> Vec<AudiencePoint> {
    #[derive(Default)]
    struct M {
        watch: i64,
        server: u64,
        peers: u64,
        stall: u64,
    }
    let mut minutes: BTreeMap<i64, M> = BTreeMap::new();
    let mut startup: Option<(i64, u32)> = None;
    let (mut prev_at, mut ps, mut pp, mut pst) = (None::<i64>, 0, 0, 0);
    for r in reps {
        let m = minutes
            .entry(r.at_unix_ms.div_euclid(MINUTE) * MINUTE)
            .or_default();
        m.watch += prev_at.map_or(first_covered, |p| (r.at_unix_ms - p).clamp(0, MAX_GAP_MS));
        m.server += r.bytes_from_server - ps;
        m.peers += r.bytes_from_peers - pp;
        m.stall += r.stall_ms - pst;
        if startup.is_none() && r.startup_ms > 0 {
            startup = Some((r.at_unix_ms, r.startup_ms));
        }
        (prev_at, ps, pp, pst) = (
            Some(r.at_unix_ms),
            r.bytes_from_server,
            r.bytes_from_peers,
            r.stall_ms,
        );
    }
    let from = from.div_euclid(MINUTE) * MINUTE;
    let to = (to - 1).div_euclid(MINUTE) * MINUTE + MINUTE;
    (0..(to - from) / MINUTE)
        .map(|i| {
            let start = from + i * MINUTE;
            let m = minutes.get(&start);
            let su = startup.filter(|(at, _)| *at >= start && *at < start + MINUTE);
            let (server, peers) = m.map_or((0, 0), |m| (m.server, m.peers));
            AudiencePoint {
                start_unix_ms: start,
                concurrent_viewers: if m.is_some() { 1.0 } else { 0.0 },
                peak_viewers: u32::from(m.is_some()),
                watch_time_s: m.map_or(0.0, |m| m.watch as f64 / 1000.0),
                peer_share: if server + peers == 0 {
                    0.0
                } else {
                    peers as f64 / (server + peers) as f64
                },
                server_egress_bytes: server,
                peer_bytes: peers,
                rebuffer_ratio: m.map_or(0.0, |m| {
                    if m.watch == 0 {
                        0.0
                    } else {
                        m.stall as f64 / m.watch as f64
                    }
                }),
                startup_p50_ms: su.map_or(0, |s| s.1),
                startup_p95_ms: su.map_or(0, |s| s.1),
            }
        })
        .collect()
}

fn assert_points_eq(got: &[AudiencePoint], want: &[AudiencePoint]) {
    assert_eq!(got.len(), want.len(), "got {got:#?}\nwant {want:#?}");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.start_unix_ms, w.start_unix_ms);
        assert!(
            close(g.concurrent_viewers, w.concurrent_viewers),
            "{g:?} vs {w:?}"
        );
        assert_eq!(g.peak_viewers, w.peak_viewers, "{g:?} vs {w:?}");
        assert!(close(g.watch_time_s, w.watch_time_s), "{g:?} vs {w:?}");
        assert!(close(g.peer_share, w.peer_share), "{g:?} vs {w:?}");
        assert_eq!(
            g.server_egress_bytes, w.server_egress_bytes,
            "{g:?} vs {w:?}"
        );
        assert_eq!(g.peer_bytes, w.peer_bytes, "{g:?} vs {w:?}");
        assert!(close(g.rebuffer_ratio, w.rebuffer_ratio), "{g:?} vs {w:?}");
        assert_eq!(g.startup_p50_ms, w.startup_p50_ms, "{g:?} vs {w:?}");
        assert_eq!(g.startup_p95_ms, w.startup_p95_ms, "{g:?} vs {w:?}");
    }
}

async fn wait_stored(store: &Store, bid: &str, n: usize) -> Vec<(String, u64)> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let keys = db::stored_keys(store, bid).await.unwrap();
        if keys.len() >= n || tokio::time::Instant::now() > deadline {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Item 1: extreme counters in broadcast Y hurt neither X nor the roll-ups.
async fn hostile_counters_hurt_nobody(store: Store) {
    let h = Harness::start(store.clone(), test_reports()).await;
    let node = fake_node(&h).await;
    let x = live_broadcast(&h, &node, "x").await;
    let y = live_broadcast(&h, &node, "y").await;
    let honest_x = join(&h, &x).await;
    let joined_by = now_ms();
    let y_started = Instant::now();
    let honest_y = join(&h, &y).await;
    let attacker = join(&h, &y).await;

    // Reports: the honest viewer's first report is 30 s (the largest gap) or more after
    // its join, so its covered time is known exactly (30 s).
    let base_x = joined_by + MAX_GAP_MS;
    let base_y = now_ms();
    let n = 100u64;
    let mut sent_x = Vec::new();
    let (mut v_x, mut v_y) = (h.viewer(), h.viewer());
    for k in 1..=n {
        // Three hostile reports, one per call like an SDK, then one honest report.
        for j in 3 * k - 2..=3 * k {
            let _ = v_y
                .report(ReportRequest {
                    session_id: attacker.clone(),
                    reports: vec![hostile(j, base_y)],
                })
                .await;
        }
        let r = honest(k, base_x);
        let resp = v_x
            .report(ReportRequest {
                session_id: honest_x.clone(),
                reports: vec![r],
            })
            .await;
        match resp {
            Ok(resp) => assert_eq!(resp.into_inner().acked_seq, k),
            Err(e) => panic!("the honest viewer's report {k} was refused: {e:?}"),
        }
        sent_x.push(r);
    }

    // X: every report stored, roll-ups exactly as computed independently.
    let keys = wait_stored(&store, &x, usize::try_from(n).unwrap()).await;
    assert_eq!(
        keys.len(),
        usize::try_from(n).unwrap(),
        "X's reports all stored"
    );
    let (from, to) = (sent_x[0].at_unix_ms, sent_x.last().unwrap().at_unix_ms + 1);
    assert_points_eq(
        &audience(&h, &x, from, to).await,
        &expected_points(&sent_x, MAX_GAP_MS, from, to),
    );

    // Y: what the attacker's reports added is physically possible: bytes at most the
    // burst + margin × the covered (watch) time of the stream, stall likewise in time.
    let keys = wait_stored(&store, &y, usize::try_from(3 * n).unwrap()).await;
    assert_eq!(
        keys.len(),
        usize::try_from(3 * n).unwrap(),
        "Y's reports all stored"
    );
    let points = audience(
        &h,
        &y,
        0,
        base_y + i64::try_from(3 * n + 1).unwrap() * 1_000,
    )
    .await;
    let watch_s: f64 = points.iter().map(|p| p.watch_time_s).sum();
    let bytes: u64 = points
        .iter()
        .map(|p| p.server_egress_bytes + p.peer_bytes)
        .sum();
    let bound = STREAM_BPS as f64 * (BURST_S as f64 + MARGIN as f64 * watch_s);
    assert!(
        watch_s <= 3.0 * n as f64 + 1.0,
        "watch time {watch_s} s beyond the reports' times"
    );
    assert!(
        bytes as f64 <= bound + 1.0,
        "Y's bytes {bytes} beyond the physical bound {bound} ({watch_s} s watched)"
    );
    assert!(bytes > 0, "the attacker's plausible part still counts");
    for p in &points {
        assert!((0.0..=1.0).contains(&p.peer_share), "{p:?}");
        assert!(
            p.rebuffer_ratio <= (MARGIN + BURST_S) as f64 + 1e-9 || p.watch_time_s < 1.0,
            "{p:?}"
        );
    }

    // Heartbeats: the honest viewer of Y received 400,000 bytes from the data plane;
    // the attacker claims everything from peers, alternating with zeros.
    let mut v = h.viewer();
    let hb = |session: &str, c: [u64; 3]| HeartbeatRequest {
        session_id: session.to_string(),
        bytes_from_server: c[0],
        bytes_from_peers: c[1],
        bytes_uploaded: c[2],
        ..Default::default()
    };
    v.heartbeat(hb(&honest_y, [400_000, 0, 0])).await.unwrap();
    for i in 0..50 {
        let c = if i % 2 == 0 {
            [0, u64::MAX, u64::MAX]
        } else {
            [0; 3]
        };
        v.heartbeat(hb(&attacker, c)).await.unwrap();
    }
    let b = h
        .admin()
        .get_broadcast(BroadcastRef { id: y.clone() })
        .await
        .unwrap()
        .into_inner();
    // The attacker's bytes are bounded by the burst + margin × the time since its join
    // (at most `elapsed`, measured here): the share stays below what that allows.
    let elapsed = y_started.elapsed().as_secs_f64();
    let a_max = STREAM_BPS as f64 * (BURST_S as f64 + MARGIN as f64 * elapsed);
    let share_max = a_max / (400_000.0 + a_max);
    assert!(
        (0.0..=1.0).contains(&b.peer_share) && b.peer_share <= share_max + 1e-9,
        "peer share {} beyond {share_max} ({elapsed} s)",
        b.peer_share
    );
    assert!(b.peer_share < 0.99, "driven to the attacker's claim");
    assert!((0.0..=1.0).contains(&b.peer_share_last_minute));
    let bx = h
        .admin()
        .get_broadcast(BroadcastRef { id: x.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (bx.peer_share_last_minute - 0.75).abs() < 1e-9,
        "X's live share is the honest viewer's: {}",
        bx.peer_share_last_minute
    );

    let text = scrape(h.metrics).await;
    promtool_check(&text);
    assert!(metric(&text, "starling_cp_counters_clamped_total{rpc=\"Report\"}") >= 1.0);
    assert!(
        metric(
            &text,
            "starling_cp_counters_clamped_total{rpc=\"Heartbeat\"}"
        ) >= 1.0
    );
    assert_eq!(metric(&text, "starling_cp_reports_dropped_total"), 0.0);
    assert_eq!(metric(&text, "starling_cp_reports_quarantined_total"), 0.0);
    drop(node);
    h.shutdown().await;
}

/// A broadcast with sessions whose ids start with `prefix`, created in the database.
async fn db_sessions(store: &Store, prefix: &str, n: usize) -> (String, Vec<String>) {
    let bid = format!("b{}", uuid::Uuid::new_v4().simple());
    store
        .create_broadcast(
            &NewBroadcast {
                id: bid.clone(),
                name: "hostile".into(),
                source_url: "http://127.0.0.1:1/live.ts".into(),
                chunk_duration_ms: 1000,
                substreams: 8,
                public: true,
            },
            now_ms(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}{i}-{}", uuid::Uuid::new_v4().simple());
        store
            .create_session(
                &NewSession {
                    id: id.clone(),
                    broadcast_id: bid.clone(),
                    client_version: "test".into(),
                    node_id: None,
                },
                now_ms(),
            )
            .await
            .unwrap();
        ids.push(id);
    }
    (bid, ids)
}

/// Makes the database refuse every report row of a session whose id starts with
/// "poison" (a data error the writer cannot retry its way out of).
async fn install_poison_trigger(store: &Store) {
    match store {
        Store::Postgres(pool) => {
            for sql in [
                "CREATE FUNCTION starling_test_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.session_id LIKE 'poison%' THEN RAISE EXCEPTION 'poisoned row'; \
                 END IF; RETURN NEW; END $$",
                "CREATE TRIGGER starling_test_poison BEFORE INSERT ON viewer_reports \
                 FOR EACH ROW EXECUTE FUNCTION starling_test_poison()",
            ] {
                sqlx::query(AssertSqlSafe(sql)).execute(pool).await.unwrap();
            }
        }
        Store::Sqlite(pool) => {
            sqlx::query(
                "CREATE TRIGGER starling_test_poison BEFORE INSERT ON viewer_reports \
                 WHEN NEW.session_id LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
            )
            .execute(pool)
            .await
            .unwrap();
        }
    }
}

/// Rows the database refuses are quarantined (dropped, counted); every other row of
/// their batches commits and every call is answered.
async fn refused_rows_are_quarantined(store: Store) {
    install_poison_trigger(&store).await;
    let h = Harness::start(store.clone(), test_reports()).await;
    let (good_b, good) = db_sessions(&store, "good", 3).await;
    let (_bad_b, bad) = db_sessions(&store, "poison", 1).await;
    let per_session = 30u64;
    let mut tasks = Vec::new();
    for sid in good.iter().chain(&bad) {
        let mut v = h.viewer();
        let sid = sid.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 1..=per_session {
                let r = ViewerReport {
                    report_seq: seq,
                    at_unix_ms: now_ms(),
                    bytes_from_server: seq * 1_000,
                    ..Default::default()
                };
                let ack = v
                    .report(ReportRequest {
                        session_id: sid.clone(),
                        reports: vec![r],
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .acked_seq;
                assert_eq!(ack, seq);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let want = good.len() * usize::try_from(per_session).unwrap();
    let keys = wait_stored(&store, &good_b, want).await;
    assert_eq!(keys.len(), want, "every good row committed");
    let minutes = db::minutes(&store, &good_b, 0, i64::MAX).await.unwrap();
    assert_eq!(
        minutes.iter().map(|m| m.reports).sum::<u64>(),
        u64::try_from(want).unwrap()
    );
    let text = scrape(h.metrics).await;
    assert_eq!(
        metric(&text, "starling_cp_reports_quarantined_total"),
        per_session as f64,
        "each refused row quarantined once"
    );
    h.shutdown().await;
}

on_both_backends!(hostile_counters_hurt_nobody, refused_rows_are_quarantined);

// ----------------------------------------------------------------- kill -9 (item 2)

/// The real binary, on `database` (a SQLite file under `dir`, or a Postgres URL).
struct Binary {
    child: std::process::Child,
    addr: SocketAddr,
}

fn start_binary(dir: &std::path::Path, database_url: Option<&str>) -> Binary {
    use std::io::BufRead as _;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_starling-controlplane"));
    cmd.env("STARLING_INSECURE_PLAINTEXT", "1");
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--log",
        "warn",
    ])
    .arg("--data-dir")
    .arg(dir)
    // Rows stay queued for up to 2 s: an acknowledgement before the commit would be
    // lost by the kill below (almost) every time.
    .args(["--report-flush-interval-ms", "2000"])
    .env_remove("DATABASE_URL")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    if let Some(url) = database_url {
        cmd.args(["--database-url", url]);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if let Some(rest) = line.split_once("listening on ").map(|(_, r)| r) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(PATIENCE)
        .expect("the control plane did not say where it listens")
        .parse()
        .unwrap();
    Binary { child, addr }
}

async fn kill_9_run(store: Store, dir: &std::path::Path, database_url: Option<&str>) {
    let (bid, sessions) = db_sessions(&store, "k", 1).await;
    let sid = sessions[0].clone();
    let mut acked_all = Vec::new();
    let mut seq = 0u64;
    for round in 0..3 {
        let mut bin = start_binary(dir, database_url);
        let channel = Channel::from_shared(format!("http://{}", bin.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut v = ViewerServiceClient::new(channel);
        let reports: Vec<ViewerReport> = (seq + 1..=seq + 3)
            .map(|s| ViewerReport {
                report_seq: s,
                at_unix_ms: now_ms(),
                bytes_from_server: s * 1_000,
                ..Default::default()
            })
            .collect();
        let acked = v
            .report(ReportRequest {
                session_id: sid.clone(),
                reports,
            })
            .await
            .unwrap()
            .into_inner()
            .acked_seq;
        // SIGKILL at once: whatever is only queued is gone.
        bin.child.kill().unwrap();
        bin.child.wait().unwrap();
        assert_eq!(acked, seq + 3, "round {round}");
        acked_all.extend(seq + 1..=acked);
        seq = acked;
        let stored: Vec<u64> = db::stored_keys(&store, &bid)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, q)| q)
            .collect();
        assert_eq!(
            stored, acked_all,
            "round {round}: every acknowledged report survives kill -9"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_report_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let config = starling_controlplane::DatabaseConfig::Sqlite {
        path: dir.path().join("starling.db"),
    };
    let store = Store::connect(&config).await.unwrap();
    kill_9_run(store.clone(), dir.path(), None).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_report_postgres() {
    let Some(db) = common::postgres("kill_9_loses_no_acknowledged_report").await else {
        return;
    };
    let starling_controlplane::DatabaseConfig::Postgres { url } = db.config.clone() else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    kill_9_run(db.store.clone(), dir.path(), Some(&url)).await;
    db.store.close().await;
}
