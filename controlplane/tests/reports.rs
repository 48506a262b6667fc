//! Viewer reports end to end: real gRPC `Report` calls from fake sessions into SQLite
//! and (when `DATABASE_URL` is set) Postgres; `GetAudience` roll-ups against values this
//! test computes on its own from the same reports; duplicates; the queue bound; a
//! Postgres outage under load (its own throwaway cluster); `/metrics` through
//! `promtool check metrics`. Hostile counters, quarantined rows and kill -9 are in
//! `tests/hostile_reports.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use starling_controlplane::reports::{ReportConfig, db};
use starling_controlplane::store::{NewBroadcast, NewSession};
use starling_controlplane::{AuthConfig, BearerInterceptor, ControlPlane, ServiceConfig, Store};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    AudiencePoint, BroadcastRef, GetAudienceRequest, ReportRequest, ViewerReport,
};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Upper bound for waiting on something that should happen (a hang guard, not a timing
/// assertion).
const PATIENCE: Duration = Duration::from_secs(60);
const MINUTE: i64 = 60_000;
/// `ReportConfig::max_gap` used by these tests.
const MAX_GAP_MS: i64 = 30_000;

fn now_ms() -> i64 {
    starling_controlplane::service::now_ms()
}

struct Cp {
    handle: starling_controlplane::ControlPlaneHandle,
    channel: Channel,
    admin_key: String,
    metrics: Option<SocketAddr>,
    reports: std::sync::Arc<starling_controlplane::reports::Reports>,
}

impl Cp {
    async fn start(store: Store, reports: ReportConfig, metrics: bool) -> Cp {
        let service = ServiceConfig {
            reports,
            ..ServiceConfig::default()
        };
        let auth = AuthConfig::with_random_admin_key();
        let mut cp =
            ControlPlane::bind_with_store("127.0.0.1:0".parse().unwrap(), store, service, &auth)
                .await
                .unwrap();
        let metrics = if metrics {
            Some(
                cp.bind_metrics("127.0.0.1:0".parse().unwrap())
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let reports = cp.reports();
        let handle = cp.spawn();
        let channel = Channel::from_shared(handle.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Cp {
            handle,
            channel,
            admin_key: auth.admin_key.unwrap(),
            metrics,
            reports,
        }
    }

    fn viewer(&self) -> ViewerServiceClient<Channel> {
        ViewerServiceClient::new(self.channel.clone())
    }

    fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(&self.admin_key).unwrap(),
        )
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.handle.shutdown().await.unwrap();
    }
}

fn test_config() -> ReportConfig {
    ReportConfig {
        batch_max: 50,
        flush_interval: Duration::from_millis(20),
        retry_max: Duration::from_millis(500),
        max_gap: Duration::from_millis(u64::try_from(MAX_GAP_MS).unwrap()),
        ..ReportConfig::default()
    }
}

/// A broadcast and `n` sessions created directly in the database (the join path is
/// tested elsewhere); returns the broadcast id and `(session id, joined_at_ms)`.
async fn fake_sessions(store: &Store, n: usize) -> (String, Vec<(String, i64)>) {
    let bid = format!("b{}", uuid::Uuid::new_v4().simple());
    store
        .create_broadcast(
            &NewBroadcast {
                id: bid.clone(),
                name: "reports test".into(),
                source_url: "http://127.0.0.1:1/live.ts".into(),
                chunk_duration_ms: 1000,
                substreams: 8,
                public: true,
            },
            now_ms(),
        )
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for i in 0..n {
        let id = format!("s{i}-{}", uuid::Uuid::new_v4().simple());
        let s = store
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
        sessions.push((id, s.joined_at_ms));
    }
    (bid, sessions)
}

/// The reports session `i` sends: every 7 s after its join (+ i × 0.5 s), cumulative
/// counters growing at per-session rates, start-up known from the 3rd report on (never
/// for the last session), a stall every 3rd report.
fn scripted_reports(i: usize, joined_at: i64, count: u64, last_session: bool) -> Vec<ViewerReport> {
    let iu = i as u64;
    (1..=count)
        .map(|k| ViewerReport {
            report_seq: k,
            at_unix_ms: joined_at
                + i64::try_from(k).unwrap() * 7_000
                + i64::try_from(i).unwrap() * 500,
            bytes_from_server: k * (1_000 + 100 * iu),
            bytes_from_peers: k * (5_000 + 700 * iu) + k * k,
            bytes_uploaded: k * 4_000,
            startup_ms: if k >= 3 && !last_session {
                300 + 100 * u32::try_from(i).unwrap()
            } else {
                0
            },
            stalls: u32::try_from(k / 3).unwrap(),
            stall_ms: (k / 3) * (10 * iu + 5),
            lag_ms: 1_500,
            buffer_ms: 2_000,
            parent_changes: 1,
            peers: 3,
            r#final: k == count,
            chunks_played: k * 7,
            chunks_skipped: 0,
        })
        .collect()
}

/// Sends `reports` in calls of 1, 3, 2, 1, 3, 2... reports; every 4th call also re-sends
/// the previous call's reports (a retry), which must be ignored. Checks `acked_seq`.
async fn send_scripted(
    mut client: ViewerServiceClient<Channel>,
    session: String,
    reports: Vec<ViewerReport>,
) {
    let sizes = [1usize, 3, 2];
    let mut pos = 0;
    let mut call = 0;
    let mut prev: Vec<ViewerReport> = Vec::new();
    while pos < reports.len() {
        let n = sizes[call % sizes.len()].min(reports.len() - pos);
        let new: Vec<ViewerReport> = reports[pos..pos + n].to_vec();
        let mut batch = new.clone();
        if call % 4 == 3 {
            batch.extend(prev.iter().cloned());
        }
        let resp = client
            .report(ReportRequest {
                session_id: session.clone(),
                reports: batch,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.acked_seq, new.last().unwrap().report_seq);
        prev = new;
        pos += n;
        call += 1;
    }
    // A pure retry of the last call: nothing new, same ack.
    let resp = client
        .report(ReportRequest {
            session_id: session.clone(),
            reports: prev.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.acked_seq, prev.last().unwrap().report_seq);
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

/// The roll-up definitions of `reports::rollup`, re-derived here from what the test
/// sent: per minute (of each report's time) distinct sessions, covered time (since the
/// previous report or the join, capped at 30 s), counter deltas; first start-ups.
#[derive(Debug, Default, Clone)]
struct ExpMinute {
    sessions: BTreeSet<String>,
    watch_ms: i64,
    server: u64,
    peers: u64,
    stall: u64,
}

fn expected_points(
    sent: &[(String, i64, Vec<ViewerReport>)],
    from: i64,
    to: i64,
    step_ms: i64,
) -> Vec<AudiencePoint> {
    let mut minutes: BTreeMap<i64, ExpMinute> = BTreeMap::new();
    let mut startups: Vec<(i64, u32)> = Vec::new();
    for (sid, joined, reps) in sent {
        let (mut prev_at, mut ps, mut pp, mut pst, mut started) = (*joined, 0, 0, 0, false);
        for r in reps {
            let m = minutes
                .entry(r.at_unix_ms.div_euclid(MINUTE) * MINUTE)
                .or_default();
            m.sessions.insert(sid.clone());
            m.watch_ms += (r.at_unix_ms - prev_at).clamp(0, MAX_GAP_MS);
            m.server += r.bytes_from_server - ps;
            m.peers += r.bytes_from_peers - pp;
            m.stall += r.stall_ms - pst;
            if !started && r.startup_ms > 0 {
                started = true;
                startups.push((r.at_unix_ms, r.startup_ms));
            }
            (prev_at, ps, pp, pst) = (
                r.at_unix_ms,
                r.bytes_from_server,
                r.bytes_from_peers,
                r.stall_ms,
            );
        }
    }
    let from = from.div_euclid(MINUTE) * MINUTE;
    let to = (to - 1).div_euclid(MINUTE) * MINUTE + MINUTE;
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + step_ms).min(to);
        let mut tot = ExpMinute::default();
        let (mut viewer_minutes, mut peak) = (0usize, 0usize);
        for (_, m) in minutes.range(start..end) {
            viewer_minutes += m.sessions.len();
            peak = peak.max(m.sessions.len());
            tot.watch_ms += m.watch_ms;
            tot.server += m.server;
            tot.peers += m.peers;
            tot.stall += m.stall;
        }
        let mut su: Vec<u32> = startups
            .iter()
            .filter(|(at, _)| *at >= start && *at < end)
            .map(|(_, s)| *s)
            .collect();
        su.sort_unstable();
        let pct = |p: f64| -> u32 {
            if su.is_empty() {
                0
            } else {
                let rank = (p * su.len() as f64).ceil() as usize;
                su[rank.max(1) - 1]
            }
        };
        out.push(AudiencePoint {
            start_unix_ms: start,
            concurrent_viewers: viewer_minutes as f64 / ((end - start) / MINUTE) as f64,
            peak_viewers: u32::try_from(peak).unwrap(),
            watch_time_s: tot.watch_ms as f64 / 1000.0,
            peer_share: if tot.server + tot.peers == 0 {
                0.0
            } else {
                tot.peers as f64 / (tot.server + tot.peers) as f64
            },
            server_egress_bytes: tot.server,
            peer_bytes: tot.peers,
            rebuffer_ratio: if tot.watch_ms == 0 {
                0.0
            } else {
                tot.stall as f64 / tot.watch_ms as f64
            },
            startup_p50_ms: pct(0.5),
            startup_p95_ms: pct(0.95),
        });
        start = end;
    }
    out
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

async fn audience(cp: &Cp, bid: &str, from: i64, to: i64, step_s: u32) -> Vec<AudiencePoint> {
    cp.admin()
        .get_audience(GetAudienceRequest {
            broadcast_id: bid.into(),
            from_unix_ms: from,
            to_unix_ms: to,
            step_s,
        })
        .await
        .unwrap()
        .into_inner()
        .points
}

/// Six sessions, 20 reports each over ~2.5 minutes of report time, sent concurrently
/// over gRPC with retries mixed in: every report stored exactly once, and GetAudience's
/// points (1- and 2-minute steps) equal the independent computation; GetBroadcast's
/// last-minute peer share; retention prunes raw rows and keeps roll-ups.
async fn reports_roll_up(store: Store) {
    let cp = Cp::start(store.clone(), test_config(), false).await;
    let (bid, sessions) = fake_sessions(&store, 6).await;
    let count = 20;
    let sent: Vec<(String, i64, Vec<ViewerReport>)> = sessions
        .iter()
        .enumerate()
        .map(|(i, (sid, joined))| {
            (
                sid.clone(),
                *joined,
                scripted_reports(i, *joined, count, i == sessions.len() - 1),
            )
        })
        .collect();
    let tasks: Vec<_> = sent
        .iter()
        .map(|(sid, _, reps)| tokio::spawn(send_scripted(cp.viewer(), sid.clone(), reps.clone())))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let total = sessions.len() * usize::try_from(count).unwrap();
    let keys = wait_stored(&store, &bid, total).await;
    let want_keys: Vec<(String, u64)> = {
        let mut v: Vec<_> = sent
            .iter()
            .flat_map(|(sid, _, reps)| reps.iter().map(|r| (sid.clone(), r.report_seq)))
            .collect();
        v.sort();
        v
    };
    assert_eq!(keys, want_keys, "every report stored exactly once");

    let min_at = sent.iter().map(|s| s.2[0].at_unix_ms).min().unwrap();
    let max_at = sent
        .iter()
        .map(|s| s.2.last().unwrap().at_unix_ms)
        .max()
        .unwrap();
    for step_s in [60u32, 120] {
        let got = audience(&cp, &bid, min_at, max_at + 1, step_s).await;
        let want = expected_points(&sent, min_at, max_at + 1, i64::from(step_s) * 1000);
        assert_points_eq(&got, &want);
        assert!(got.iter().map(|p| p.peak_viewers).max().unwrap() == 6);
    }
    // from = 0: from the first stored minute.
    let got = audience(&cp, &bid, 0, max_at + 1, 60).await;
    assert_points_eq(&got, &expected_points(&sent, min_at, max_at + 1, 60_000));

    // All reports were received within the last minute: the live peer share is the
    // share over everything sent.
    let (server, peers) = sent.iter().fold((0u64, 0u64), |(s, p), (_, _, reps)| {
        let last = reps.last().unwrap();
        (s + last.bytes_from_server, p + last.bytes_from_peers)
    });
    let b = cp
        .admin()
        .get_broadcast(BroadcastRef { id: bid.clone() })
        .await
        .unwrap()
        .into_inner();
    let want_share = peers as f64 / (server + peers) as f64;
    assert!(
        (b.peer_share_last_minute - want_share).abs() < 1e-9,
        "{} vs {want_share}",
        b.peer_share_last_minute
    );

    // Retention: raw rows go, roll-ups stay.
    let pruned = cp
        .reports
        .prune(max_at + 8 * 24 * 3600 * 1000)
        .await
        .unwrap();
    assert_eq!(pruned, u64::try_from(total).unwrap());
    assert!(db::stored_keys(&store, &bid).await.unwrap().is_empty());
    let got = audience(&cp, &bid, min_at, max_at + 1, 60).await;
    assert_points_eq(&got, &expected_points(&sent, min_at, max_at + 1, 60_000));
    cp.shutdown().await;
}

/// Unknown sessions, bad calls, duplicates, and GetAudience's argument checks.
async fn report_validation(store: Store) {
    let cp = Cp::start(store.clone(), test_config(), false).await;
    let (bid, sessions) = fake_sessions(&store, 1).await;
    let sid = sessions[0].0.clone();
    let mut v = cp.viewer();
    let rep = |seq: u64| ViewerReport {
        report_seq: seq,
        at_unix_ms: now_ms(),
        bytes_from_server: seq * 10,
        ..Default::default()
    };
    let err = v
        .report(ReportRequest {
            session_id: "nope".into(),
            reports: vec![rep(1)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = v
        .report(ReportRequest {
            session_id: sid.clone(),
            reports: vec![rep(0)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = v
        .report(ReportRequest {
            session_id: sid.clone(),
            reports: (1..=65).map(rep).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Empty call: just the ack.
    let ack = v
        .report(ReportRequest {
            session_id: sid.clone(),
            reports: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .acked_seq;
    assert_eq!(ack, 0);
    let ack = |r: Result<tonic::Response<starling_proto::v1::ReportResponse>, tonic::Status>| {
        r.unwrap().into_inner().acked_seq
    };
    assert_eq!(
        ack(v
            .report(ReportRequest {
                session_id: sid.clone(),
                reports: vec![rep(2), rep(1)]
            })
            .await),
        2
    );
    assert_eq!(
        ack(v
            .report(ReportRequest {
                session_id: sid.clone(),
                reports: vec![rep(1), rep(2)]
            })
            .await),
        2
    );
    assert_eq!(
        ack(v
            .report(ReportRequest {
                session_id: sid.clone(),
                reports: vec![rep(5), rep(5)]
            })
            .await),
        5
    );
    // A lower seq after a higher one is a duplicate (gaps are allowed).
    assert_eq!(
        ack(v
            .report(ReportRequest {
                session_id: sid.clone(),
                reports: vec![rep(4)]
            })
            .await),
        5
    );
    let keys = wait_stored(&store, &bid, 3).await;
    let seqs: Vec<u64> = keys.iter().map(|k| k.1).collect();
    assert_eq!(seqs, vec![1, 2, 5]);

    // A fresh control plane (no memory, e.g. restarted) learns the last stored seq from
    // the database. (Started next to the first one: shutting one down closes the pool.)
    let first = cp;
    let cp = Cp::start(store.clone(), test_config(), false).await;
    let mut v = cp.viewer();
    assert_eq!(
        ack(v
            .report(ReportRequest {
                session_id: sid.clone(),
                reports: vec![rep(5)]
            })
            .await),
        5
    );
    assert_eq!(
        ack(v
            .report(ReportRequest {
                session_id: sid.clone(),
                reports: vec![rep(6)]
            })
            .await),
        6
    );
    let keys = wait_stored(&store, &bid, 4).await;
    assert_eq!(keys.len(), 4);

    let mut admin = cp.admin();
    let req = |b: &str, from: i64, to: i64, step_s: u32| GetAudienceRequest {
        broadcast_id: b.into(),
        from_unix_ms: from,
        to_unix_ms: to,
        step_s,
    };
    let code = |r: Result<
        tonic::Response<starling_proto::v1::GetAudienceResponse>,
        tonic::Status,
    >| { r.unwrap_err().code() };
    assert_eq!(
        code(admin.get_audience(req("unknown", 0, 0, 60)).await),
        Code::NotFound
    );
    assert_eq!(
        code(admin.get_audience(req(&bid, 0, 0, 90)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(admin.get_audience(req(&bid, 120_000, 60_000, 60)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(admin.get_audience(req(&bid, -1, 60_000, 60)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(admin.get_audience(req(&bid, 1, 60_000 * 20_000, 60)).await),
        Code::InvalidArgument
    );
    // Defaults: from its first report to now, 1-minute steps.
    let points = admin
        .get_audience(req(&bid, 0, 0, 0))
        .await
        .unwrap()
        .into_inner()
        .points;
    assert!(!points.is_empty());
    assert_eq!(points.iter().map(|p| p.peak_viewers).max(), Some(1));
    cp.shutdown().await;
    first.shutdown().await;
}

on_both_backends!(reports_roll_up, report_validation);

/// The queue bound: with the writer held back, calls wait for their commit (nothing is
/// acknowledged while only queued), calls beyond `queue_max` are refused (UNAVAILABLE)
/// at once and counted as dropped, the session's ack does not move, and once the queue
/// drains the waiting calls are acknowledged and the SDK's retry of the refused reports
/// succeeds: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bound_drops_are_counted() {
    let db = common::sqlite().await;
    let config = ReportConfig {
        queue_max: 10,
        // The writer only wakes for a full batch, which a 10-row queue never holds, or
        // after an hour, or when flushed.
        batch_max: 500,
        flush_interval: Duration::from_secs(3600),
        ack_timeout: PATIENCE,
        ..test_config()
    };
    let cp = Cp::start(db.store.clone(), config, true).await;
    let (bid, sessions) = fake_sessions(&db.store, 2).await;
    let rep = |seq: u64| ViewerReport {
        report_seq: seq,
        at_unix_ms: now_ms(),
        ..Default::default()
    };
    let wait_depth = |n: usize| {
        let reports = cp.reports.clone();
        async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while reports.queue_depth() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "queue never reached {n}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let mut waiting = Vec::new();
    for seq in 1..=10u64 {
        let mut v = cp.viewer();
        let sid = sessions[seq as usize % 2].0.clone();
        waiting.push(tokio::spawn(async move {
            v.report(ReportRequest {
                session_id: sid,
                reports: vec![rep(seq)],
            })
            .await
            .unwrap()
            .into_inner()
            .acked_seq
        }));
        // One at a time, so each session's seqs arrive in order.
        wait_depth(usize::try_from(seq).unwrap()).await;
    }
    assert_eq!(cp.reports.queue_depth(), 10);
    let mut v = cp.viewer();
    let refused = v
        .report(ReportRequest {
            session_id: sessions[0].0.clone(),
            reports: vec![rep(11), rep(12)],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    let text = scrape(cp.metrics.unwrap()).await;
    assert_eq!(metric(&text, "starling_cp_reports_dropped_total"), 2.0);
    assert_eq!(metric(&text, "starling_cp_report_queue_depth"), 10.0);
    // Nothing is committed, so nothing is acknowledged: the writer sleeps for an hour.
    assert!(waiting.iter().all(|t| !t.is_finished()));
    assert!(cp.reports.flush(PATIENCE).await);
    for (seq, t) in (1..=10u64).zip(waiting) {
        assert_eq!(t.await.unwrap(), seq);
    }
    let retry = {
        let mut v = cp.viewer();
        let sid = sessions[0].0.clone();
        tokio::spawn(async move {
            v.report(ReportRequest {
                session_id: sid,
                reports: vec![rep(11), rep(12)],
            })
            .await
            .unwrap()
            .into_inner()
            .acked_seq
        })
    };
    wait_depth(2).await;
    assert!(cp.reports.flush(PATIENCE).await);
    assert_eq!(retry.await.unwrap(), 12);
    assert_eq!(wait_stored(&db.store, &bid, 12).await.len(), 12);
    cp.shutdown().await;
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
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4")
    );
    body.to_string()
}

/// The value of an unlabelled series (or the first series starting with `name{...`
/// when `name` contains a `{`).
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
        "promtool: {said}\n---\n{text}"
    );
}

/// `/metrics` passes `promtool check metrics` with no output, before and after traffic,
/// and its values move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_move() {
    let db = common::sqlite().await;
    let cp = Cp::start(db.store.clone(), test_config(), true).await;
    let addr = cp.metrics.unwrap();
    let before = scrape(addr).await;
    promtool_check(&before);
    assert_eq!(metric(&before, "starling_cp_reports_stored_total"), 0.0);
    assert_eq!(metric(&before, "starling_cp_db_up"), 1.0);

    let (bid, sessions) = fake_sessions(&db.store, 3).await;
    for (i, (sid, joined)) in sessions.iter().enumerate() {
        send_scripted(
            cp.viewer(),
            sid.clone(),
            scripted_reports(i, *joined, 5, false),
        )
        .await;
    }
    let _ = cp
        .viewer()
        .report(ReportRequest {
            session_id: "nope".into(),
            reports: vec![],
        })
        .await;
    let _ = cp
        .admin()
        .get_audience(GetAudienceRequest {
            broadcast_id: bid.clone(),
            ..Default::default()
        })
        .await;
    assert!(cp.reports.flush(PATIENCE).await);
    wait_stored(&db.store, &bid, 15).await;

    let after = scrape(addr).await;
    promtool_check(&after);
    assert_eq!(metric(&after, "starling_cp_reports_stored_total"), 15.0);
    assert_eq!(metric(&after, "starling_cp_reports_accepted_total"), 15.0);
    assert!(metric(&after, "starling_cp_reports_duplicate_total") > 0.0);
    assert!(metric(&after, "starling_cp_db_write_batches_total") >= 1.0);
    assert!(metric(&after, "starling_cp_viewer_bytes_total{source=\"peers\"}") > 0.0);
    let report_ok = "starling_cp_grpc_server_handled_total{grpc_service=\"starling.v1.ViewerService\",grpc_method=\"Report\",grpc_code=\"OK\"}";
    assert!(metric(&after, report_ok) >= 15.0 / 3.0);
    let report_nf = "starling_cp_grpc_server_handled_total{grpc_service=\"starling.v1.ViewerService\",grpc_method=\"Report\",grpc_code=\"NotFound\"}";
    assert_eq!(metric(&after, report_nf), 1.0);
    assert!(after.contains("starling_cp_grpc_server_handling_seconds_bucket{grpc_service=\"starling.v1.AdminService\",grpc_method=\"GetAudience\",grpc_code=\"OK\",le=\"+Inf\"} 1"));
    cp.shutdown().await;
}

// ------------------------------------------------------------------ Postgres outage

/// A throwaway Postgres cluster of this test's own (so stopping it cannot disturb other
/// tests), run as the `postgres` user when we are root, like scripts/pg-throwaway.sh.
struct OwnCluster {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnCluster {
    fn bin_dir() -> Option<std::path::PathBuf> {
        if let Ok(b) = std::env::var("STARLING_PG_BIN") {
            return Some(b.into());
        }
        let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .collect();
        dirs.sort();
        dirs.pop()
    }

    fn run(&self, prog: &str, args: &[&str]) {
        let prog = self.bin.join(prog);
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .unwrap()
            .stdout
            == b"0\n";
        let mut cmd = if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&prog);
            c
        } else {
            std::process::Command::new(&prog)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?}: {}{}",
            prog.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn create() -> Option<OwnCluster> {
        let Some(bin) = Self::bin_dir() else {
            assert!(
                std::env::var("STARLING_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "STARLING_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries were found"
            );
            eprintln!("SKIPPING postgres_outage_loses_no_report: no PostgreSQL server binaries");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("starling-pg-outage")
            .tempdir()
            .unwrap();
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .unwrap()
            .stdout
            == b"0\n";
        if root {
            let st = std::process::Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = OwnCluster { bin, dir, port };
        c.run(
            "initdb",
            &[
                "-D",
                &c.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        c.start();
        Some(c)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let data = self.data();
        let prog = self.bin.join("pg_ctl");
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let _ = if root {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&prog)
                .args(["-D", &data, "-m", "immediate", "stop"])
                .output()
        } else {
            std::process::Command::new(&prog)
                .args(["-D", &data, "-m", "immediate", "stop"])
                .output()
        };
    }
}

/// Postgres is stopped for 20 s while 20 sessions keep reporting about every 200 ms
/// (100 ms pause + a call refused after the 100 ms ack timeout: about 2,000 reports
/// queued during the outage, none acknowledged), then started again: every report is
/// stored exactly once (raw rows and the roll-up's report count), and the failed writes
/// were counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_loses_no_report() {
    let Some(cluster) = OwnCluster::create() else {
        return;
    };
    let store =
        Store::connect(&starling_controlplane::DatabaseConfig::Postgres { url: cluster.url() })
            .await
            .unwrap();
    let config = ReportConfig {
        // Calls answer UNAVAILABLE soon while the database is down (rows stay queued).
        ack_timeout: Duration::from_millis(100),
        ..test_config()
    };
    let cp = Cp::start(store.clone(), config, true).await;
    let (bid, sessions) = fake_sessions(&store, 20).await;

    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut tasks = Vec::new();
    for (sid, _) in &sessions {
        let mut v = cp.viewer();
        let sid = sid.clone();
        let running = running.clone();
        // Like the SDK: a new report every tick, every unacknowledged report (the
        // newest 64) sent again until acknowledged.
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut unacked: Vec<ViewerReport> = Vec::new();
            let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
            loop {
                if running.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    unacked.push(ViewerReport {
                        report_seq: seq,
                        at_unix_ms: now_ms(),
                        bytes_from_server: seq * 100,
                        bytes_from_peers: seq * 900,
                        ..Default::default()
                    });
                } else if unacked.is_empty() {
                    return seq;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "reports never acked"
                );
                let batch = unacked[unacked.len().saturating_sub(64)..].to_vec();
                let call = v.report(ReportRequest {
                    session_id: sid.clone(),
                    reports: batch,
                });
                if let Ok(Ok(r)) = tokio::time::timeout(PATIENCE, call).await {
                    let ack = r.into_inner().acked_seq;
                    unacked.retain(|r| r.report_seq > ack);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = cp.reports.queue_depth();
    cluster.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut want = Vec::new();
    for (t, (sid, _)) in tasks.into_iter().zip(&sessions) {
        let n = t.await.unwrap();
        want.extend((1..=n).map(|q| (sid.clone(), q)));
    }
    want.sort();
    assert!(
        during > 500,
        "reports should have queued up during the outage ({during})"
    );
    assert!(
        cp.reports.flush(PATIENCE).await,
        "queue did not drain after the restart"
    );
    let keys = wait_stored(&store, &bid, want.len()).await;
    assert_eq!(keys.len(), want.len());
    assert_eq!(keys, want, "every report stored exactly once");
    let minutes = db::minutes(&store, &bid, 0, i64::MAX).await.unwrap();
    let rolled: u64 = minutes.iter().map(|m| m.reports).sum();
    assert_eq!(
        rolled,
        u64::try_from(want.len()).unwrap(),
        "roll-ups count every report once"
    );
    let text = scrape(cp.metrics.unwrap()).await;
    assert!(metric(&text, "starling_cp_db_write_errors_total") >= 1.0);
    assert_eq!(metric(&text, "starling_cp_reports_dropped_total"), 0.0);
    assert_eq!(metric(&text, "starling_cp_reports_quarantined_total"), 0.0);
    cp.shutdown().await;
    store.close().await;
}
