//! End-to-end tests of the SDK against an in-test data plane (and a fake control
//! plane) on real loopback sockets. Timeouts only guard against hangs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Fixture, Script};
use starling_proto::wire::{ErrorCode, StartAt};
use starling_sdk::{SdkError, Subscription, Viewer, ViewerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const GUARD: Duration = Duration::from_secs(30);

fn config(broadcast: &str) -> ViewerConfig {
    let mut c = ViewerConfig::new(broadcast);
    c.http_listen = None;
    c.reconnect_initial = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(200);
    // The fixture's stream is unsigned and its fake control plane hands out no chunk
    // keys (the default refusal of such a Join is tested in session.rs).
    c.allow_unverified = true;
    c
}

async fn read_n(sub: &mut Subscription, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(GUARD, async {
        while out.len() < n {
            match sub.next_bytes().await {
                Some(b) => out.extend_from_slice(&b),
                None => break,
            }
        }
    })
    .await
    .expect("timed out reading the stream");
    out
}

#[tokio::test]
async fn bytes_out_are_the_chunks_in_order() {
    let script = Script::numbered("b1", 30);
    let expected = script.expected_bytes();
    let fx = Fixture::start(script).await;
    let viewer = Viewer::connect_direct(fx.addr.to_string(), config("b1"))
        .await
        .unwrap();
    let mut sub = viewer.subscribe();
    let got = read_n(&mut sub, expected.len()).await;
    assert_eq!(got, expected);
    let stats = viewer.stats();
    assert_eq!(stats.chunks_out, 30);
    assert_eq!(stats.current_seq, Some(29));
    assert_eq!(stats.bytes_out, expected.len() as u64);
    assert_eq!(stats.reconnects, 0);
    assert_eq!(stats.discontinuities, 0);
    assert!(stats.startup_time.is_some());
    assert_eq!(viewer.content_type().as_deref(), Some("video/mp2t"));
    assert_eq!(fx.subscribes(), vec![StartAt::Live]);
    viewer.leave().await.unwrap();
    // The SDK answered the fixture's PING (the fixture reads after sending).
    tokio::time::timeout(GUARD, async {
        while fx.log.lock().pongs.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no PONG");
    assert_eq!(fx.log.lock().pongs, vec![7]);
}

#[tokio::test]
async fn reconnects_and_resumes_without_gap_or_duplicate() {
    let mut script = Script::numbered("b2", 40);
    script.drop_after = Some(11);
    // The server resends 3 chunks we already have: they must be dropped.
    script.overlap_on_resume = 3;
    let expected = script.expected_bytes();
    let fx = Fixture::start(script).await;
    let viewer = Viewer::connect_direct(fx.addr.to_string(), config("b2"))
        .await
        .unwrap();
    let mut sub = viewer.subscribe();
    let got = read_n(&mut sub, expected.len()).await;
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "output differs from the chunks in order");
    assert_eq!(fx.subscribes(), vec![StartAt::Live, StartAt::Seq(12)]);
    let stats = viewer.stats();
    assert_eq!(stats.reconnects, 1);
    assert_eq!(stats.duplicates, 3);
    assert_eq!(stats.discontinuities, 0);
    assert_eq!(stats.chunks_out, 40);
    // Nothing more arrives later either (no duplicate after the expected end).
    assert!(sub.try_next_bytes().is_none());
    viewer.leave().await.unwrap();
}

#[tokio::test]
async fn unknown_broadcast_is_a_typed_error() {
    let fx = Fixture::start(Script::numbered("exists", 3)).await;
    let err = Viewer::connect_direct(fx.addr.to_string(), config("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SdkError::Server {
                code: ErrorCode::UnknownBroadcast,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.server_code(), Some(ErrorCode::UnknownBroadcast));
    assert!(err.is_fatal());
}

#[tokio::test]
async fn hello_refusal_is_a_typed_error_and_token_is_sent() {
    let mut script = Script::numbered("b", 3);
    script.hello_error = Some(ErrorCode::Unauthorized);
    let fx = Fixture::start(script).await;
    let mut cfg = config("b");
    cfg.chunk_token = bytes::Bytes::from_static(b"tok-123");
    let err = Viewer::connect_direct(fx.addr.to_string(), cfg)
        .await
        .unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::Unauthorized));
    assert_eq!(
        fx.log.lock().tokens,
        vec![bytes::Bytes::from_static(b"tok-123")]
    );
}

#[tokio::test]
async fn connection_refused_is_a_typed_error() {
    // Bind then drop to get a port with (very likely) nobody listening.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let err = Viewer::connect_direct(addr.to_string(), config("b"))
        .await
        .unwrap_err();
    assert!(matches!(err, SdkError::Connect { .. }), "{err:?}");
}

/// Minimal HTTP/1.0 GET: returns (status line, headers, body reader).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String, TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head_end = tokio::time::timeout(GUARD, async {
        loop {
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "connection closed before headers");
            buf.extend_from_slice(&tmp[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
        }
    })
    .await
    .expect("timed out waiting for headers");
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let rest = buf[head_end..].to_vec();
    let (status, headers) = head.split_once("\r\n").unwrap();
    (status.to_string(), headers.to_lowercase(), s, rest)
}

async fn read_body(mut s: TcpStream, mut body: Vec<u8>, n: usize) -> Vec<u8> {
    tokio::time::timeout(GUARD, async {
        while body.len() < n {
            let mut tmp = [0u8; 8192];
            let k = s.read(&mut tmp).await.unwrap();
            if k == 0 {
                break;
            }
            body.extend_from_slice(&tmp[..k]);
        }
    })
    .await
    .expect("timed out reading the body");
    body
}

#[tokio::test]
async fn local_http_endpoint_serves_the_same_bytes_to_several_clients() {
    let script = Script::numbered("b3", 25);
    let expected = script.expected_bytes();
    let fx = Fixture::start(script).await;
    let mut cfg = config("b3");
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let viewer = Viewer::connect_direct(fx.addr.to_string(), cfg)
        .await
        .unwrap();
    let url = viewer.local_url().unwrap();
    let addr = viewer.local_addr().unwrap();
    assert_eq!(url, format!("http://{addr}/live/b3"));

    let mut clients = Vec::new();
    for path in ["/live/b3", "/", "/stream"] {
        let (status, headers, s, body) = http_get(addr, path).await;
        assert!(status.contains("200"), "{path}: {status}");
        assert!(headers.contains("content-type: video/mp2t"), "{headers}");
        clients.push((s, body));
    }
    for (s, body) in clients {
        let body = read_body(s, body, expected.len()).await;
        assert_eq!(body.len(), expected.len());
        assert!(
            body == expected,
            "HTTP body differs from the chunks in order"
        );
    }
    let (status, _, _, _) = http_get(addr, "/live/other").await;
    assert!(status.contains("404"), "{status}");
    let (status, _, _, _) = http_get(addr, "/nope").await;
    assert!(status.contains("404"), "{status}");
    viewer.leave().await.unwrap();
}

#[tokio::test]
async fn non_reading_subscriber_does_not_block_others() {
    let mut script = Script::numbered("b4", 30);
    // Lock-step: the fixture sends one chunk per permit; the reader grants a permit
    // per chunk it got, so it never lags while the idle one overflows.
    let pace = Arc::new(Semaphore::new(0));
    script.pace = Some(pace.clone());
    let expected = script.expected_bytes();
    let fx = Fixture::start(script).await;
    let mut cfg = config("b4");
    cfg.subscriber_queue_chunks = 4;
    let viewer = Viewer::connect_direct(fx.addr.to_string(), cfg)
        .await
        .unwrap();
    let idle = viewer.subscribe();
    let mut reader = viewer.subscribe();
    pace.add_permits(1);
    let mut got = Vec::new();
    tokio::time::timeout(GUARD, async {
        while got.len() < expected.len() {
            let b = reader.next_bytes().await.expect("stream ended");
            got.extend_from_slice(&b);
            pace.add_permits(1);
        }
    })
    .await
    .expect("reader starved");
    assert!(got == expected);
    assert_eq!(reader.dropped(), 0);
    assert_eq!(idle.dropped(), 1);
    assert_eq!(viewer.stats().consumer_drops, 1);
    viewer.leave().await.unwrap();
}

// ---------------------------------------------------------------------------
// Fake control plane
// ---------------------------------------------------------------------------

mod fake_control {
    use super::*;
    use starling_proto::v1::viewer_service_server::{ViewerService, ViewerServiceServer};
    use starling_proto::v1::*;
    use tonic::{Request, Response, Status};

    #[derive(Clone)]
    pub struct Fake {
        pub wire_addr: String,
        pub active: Arc<AtomicBool>,
        pub joins: Arc<Mutex<Vec<JoinRequest>>>,
        pub heartbeats: Arc<Mutex<Vec<String>>>,
        pub leaves: Arc<Mutex<Vec<String>>>,
        /// Every report received (retries included), in order.
        pub reports: Arc<Mutex<Vec<(String, ViewerReport)>>>,
        /// While set, `Report` fails with `UNAVAILABLE` (counted in `report_failures`).
        pub fail_reports: Arc<AtomicBool>,
        pub report_failures: Arc<AtomicUsize>,
        /// `Leave` calls see this many reports already received (final-before-leave).
        pub reports_at_leave: Arc<Mutex<Option<usize>>>,
    }

    #[tonic::async_trait]
    impl ViewerService for Fake {
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

        async fn report_peer(
            &self,
            _req: Request<ReportPeerRequest>,
        ) -> Result<Response<ReportPeerResponse>, Status> {
            Ok(Response::new(ReportPeerResponse {}))
        }
        async fn report(
            &self,
            req: Request<ReportRequest>,
        ) -> Result<Response<ReportResponse>, Status> {
            if self.fail_reports.load(Ordering::SeqCst) {
                self.report_failures.fetch_add(1, Ordering::SeqCst);
                return Err(Status::unavailable("database down"));
            }
            let req = req.into_inner();
            let mut all = self.reports.lock();
            for r in &req.reports {
                all.push((req.session_id.clone(), *r));
            }
            let acked = all.iter().map(|(_, r)| r.report_seq).max().unwrap_or(0);
            Ok(Response::new(ReportResponse { acked_seq: acked }))
        }
        async fn reparent(
            &self,
            _req: Request<starling_proto::v1::ReparentRequest>,
        ) -> Result<Response<starling_proto::v1::ReparentResponse>, Status> {
            Err(Status::unimplemented("not in this fixture"))
        }
        async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
            let req = req.into_inner();
            if req.broadcast_id != "cp" {
                return Err(Status::not_found("no such broadcast"));
            }
            let n = {
                let mut j = self.joins.lock();
                j.push(req.clone());
                j.len()
            };
            Ok(Response::new(JoinResponse {
                session_id: format!("s{n}"),
                params: Some(StreamParams {
                    broadcast_id: req.broadcast_id,
                    content_type: "video/mp2t".into(),
                    chunk_duration_ms: 1000,
                    substreams: 1,
                }),
                dataplane_wire_addr: self.wire_addr.clone(),
                dataplane_http_addr: String::new(),
                chunk_token: b"signed".to_vec(),
                heartbeat_interval_ms: 100,
                report_interval_ms: 100,
                ..Default::default()
            }))
        }
        async fn heartbeat(
            &self,
            req: Request<HeartbeatRequest>,
        ) -> Result<Response<HeartbeatResponse>, Status> {
            self.heartbeats.lock().push(req.into_inner().session_id);
            Ok(Response::new(HeartbeatResponse {
                active: self.active.load(Ordering::SeqCst),
                ..Default::default()
            }))
        }
        async fn leave(
            &self,
            req: Request<LeaveRequest>,
        ) -> Result<Response<LeaveResponse>, Status> {
            *self.reports_at_leave.lock() = Some(self.reports.lock().len());
            self.leaves.lock().push(req.into_inner().session_id);
            Ok(Response::new(LeaveResponse {}))
        }
    }

    pub async fn start(wire_addr: SocketAddr) -> (String, Fake) {
        let fake = Fake {
            wire_addr: wire_addr.to_string(),
            active: Arc::new(AtomicBool::new(true)),
            joins: Default::default(),
            heartbeats: Default::default(),
            leaves: Default::default(),
            reports: Default::default(),
            fail_reports: Default::default(),
            report_failures: Default::default(),
            reports_at_leave: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let svc = ViewerServiceServer::new(fake.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (url, fake)
    }
}

#[tokio::test]
async fn join_via_control_plane_heartbeats_and_leaves() {
    let script = Script::numbered("cp", 20);
    let expected = script.expected_bytes();
    let fx = Fixture::start(script).await;
    let (url, fake) = fake_control::start(fx.addr).await;
    let mut cfg = config("cp");
    cfg.control_url = url;
    cfg.transport = starling_proto::transport::Transport::Plaintext;
    cfg.credential = Some("jwt".into());
    let viewer = Viewer::join(cfg).await.unwrap();
    assert_eq!(viewer.session_id().as_deref(), Some("s1"));
    let mut sub = viewer.subscribe();
    assert_eq!(read_n(&mut sub, expected.len()).await, expected);
    // The chunk token from Join is presented in HELLO.
    assert_eq!(fx.log.lock().tokens[0].as_ref(), b"signed");
    assert_eq!(fake.joins.lock()[0].credential, "jwt");
    tokio::time::timeout(GUARD, async {
        while fake.heartbeats.lock().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no heartbeat");
    assert_eq!(fake.heartbeats.lock()[0], "s1");
    viewer.leave().await.unwrap();
    assert_eq!(*fake.leaves.lock(), vec!["s1".to_string()]);
}

#[tokio::test]
async fn inactive_session_stops_the_viewer() {
    let fx = Fixture::start(Script::numbered("cp", 5)).await;
    let (url, fake) = fake_control::start(fx.addr).await;
    let mut cfg = config("cp");
    cfg.control_url = url;
    cfg.transport = starling_proto::transport::Transport::Plaintext;
    let viewer = Viewer::join(cfg).await.unwrap();
    let mut sub = viewer.subscribe();
    fake.active.store(false, Ordering::SeqCst);
    let r = tokio::time::timeout(GUARD, viewer.closed())
        .await
        .expect("viewer did not stop");
    assert!(matches!(r, Err(SdkError::SessionInactive)), "{r:?}");
    // Consumers see the end of the stream after what was queued.
    tokio::time::timeout(GUARD, async { while sub.next_bytes().await.is_some() {} })
        .await
        .expect("stream did not end");
    assert!(viewer.is_closed());
}

#[tokio::test]
async fn join_errors_are_typed() {
    let fx = Fixture::start(Script::numbered("cp", 1)).await;
    let (url, _fake) = fake_control::start(fx.addr).await;
    let mut cfg = config("missing");
    cfg.control_url = url;
    cfg.transport = starling_proto::transport::Transport::Plaintext;
    let err = Viewer::join(cfg).await.unwrap_err();
    assert!(
        matches!(
            err,
            SdkError::ControlRejected {
                code: tonic::Code::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_fatal());

    // Control plane down.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let mut cfg = config("cp");
    cfg.control_url = dead;
    cfg.transport = starling_proto::transport::Transport::Plaintext;
    let err = Viewer::join(cfg).await.unwrap_err();
    assert!(matches!(err, SdkError::ControlUnavailable(_)), "{err:?}");
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(GUARD, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn reports_are_numbered_retried_without_gaps_and_final_on_leave() {
    let script = Script::numbered("cp", 20);
    let expected = script.expected_bytes();
    let fx = Fixture::start(script).await;
    let (url, fake) = fake_control::start(fx.addr).await;
    let mut cfg = config("cp");
    cfg.control_url = url;
    cfg.transport = starling_proto::transport::Transport::Plaintext;
    // Overrides the 100 ms that Join says.
    cfg.report_interval = Some(Duration::from_millis(30));
    let viewer = Viewer::join(cfg).await.unwrap();
    let mut sub = viewer.subscribe();
    assert_eq!(read_n(&mut sub, expected.len()).await, expected);
    wait_until("3 reports", || fake.reports.lock().len() >= 3).await;

    // The control plane fails for a while: reports are kept and sent afterwards.
    fake.fail_reports.store(true, Ordering::SeqCst);
    let before = fake.reports.lock().len();
    wait_until("3 failed report calls", || {
        fake.report_failures.load(Ordering::SeqCst) >= 3
    })
    .await;
    fake.fail_reports.store(false, Ordering::SeqCst);
    wait_until("reports after the failure", || {
        fake.reports.lock().len() >= before + 4
    })
    .await;

    let stats = viewer.stats();
    assert_eq!(stats.chunks_played, 20, "{stats}");
    assert!(stats.reports_sent >= 7, "{stats:?}");
    assert_eq!(stats.reports_dropped, 0);
    viewer.leave().await.unwrap();

    let reports = fake.reports.lock().clone();
    let seqs: Vec<u64> = reports.iter().map(|(_, r)| r.report_seq).collect();
    assert_eq!(
        seqs,
        (1..=reports.len() as u64).collect::<Vec<_>>(),
        "reports must arrive in order, once each, without gaps"
    );
    assert!(reports.iter().all(|(s, _)| s == "s1"));
    let (last, earlier) = reports.split_last().unwrap();
    assert!(last.1.r#final, "the last report is the final one");
    assert!(earlier.iter().all(|(_, r)| !r.r#final));
    // The final report went out before Leave.
    assert_eq!(*fake.reports_at_leave.lock(), Some(reports.len()));
    // Cumulative counters never go down, and the final one matches the viewer's stats.
    for w in reports.windows(2) {
        assert!(w[1].1.bytes_from_server >= w[0].1.bytes_from_server);
        assert!(w[1].1.chunks_played >= w[0].1.chunks_played);
        assert!(w[1].1.at_unix_ms >= w[0].1.at_unix_ms);
    }
    let r = &last.1;
    assert_eq!(r.bytes_from_server, stats.bytes_from_server);
    assert_eq!(r.bytes_from_peers, 0);
    assert_eq!(r.bytes_uploaded, 0);
    assert_eq!(r.chunks_played, stats.chunks_played);
    assert_eq!(r.chunks_skipped, stats.chunks_skipped);
    assert_eq!(r.stalls as u64, stats.stalls);
    assert_eq!(
        r.startup_ms,
        (stats.startup_time.unwrap().as_millis() as u32).max(1)
    );
    assert_eq!(r.peers, 0);
}

#[tokio::test]
async fn report_queue_is_bounded_while_the_control_plane_fails() {
    let fx = Fixture::start(Script::numbered("cp", 3)).await;
    let (url, fake) = fake_control::start(fx.addr).await;
    fake.fail_reports.store(true, Ordering::SeqCst);
    let mut cfg = config("cp");
    cfg.control_url = url;
    cfg.transport = starling_proto::transport::Transport::Plaintext;
    cfg.report_interval = Some(Duration::from_millis(20));
    cfg.report_queue = 3;
    let viewer = Viewer::join(cfg).await.unwrap();
    wait_until("dropped reports", || viewer.stats().reports_dropped >= 2).await;
    fake.fail_reports.store(false, Ordering::SeqCst);
    wait_until("reports", || !fake.reports.lock().is_empty()).await;
    let dropped = viewer.stats().reports_dropped;
    viewer.leave().await.unwrap();
    let reports = fake.reports.lock().clone();
    // The oldest were dropped: what arrives starts later than 1, then has no gap.
    let seqs: Vec<u64> = reports.iter().map(|(_, r)| r.report_seq).collect();
    assert!(seqs[0] > 1, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(dropped >= seqs[0] - 1, "{dropped} {seqs:?}");
}
