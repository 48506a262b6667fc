//! The control-plane link against a fake EdgeService: register, ingest command,
//! health reports, re-register on known=false, stop, viewers surviving the control
//! plane's death, token keys (register, rotation) and revocation. Needs ffmpeg.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Result, bail};
use starling_dataplane::{Config, Node, NodeKey, SourceHealth};
use starling_proto::token::{TokenSigner, generate_pkcs8};
use starling_proto::v1::edge_service_server::{EdgeService, EdgeServiceServer};
use starling_proto::v1::{
    CommandsRequest, HealthReport, HealthReportAck, IngestCommand, KeysCommand, NodeCommand,
    PublicKey, RegisterNodeRequest, RegisterNodeResponse, RevokeCommand, StopIngestCommand,
    node_command,
};
use starling_proto::wire::{self, ErrorCode, Frame, StartAt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The run the fake control plane names in its ingest command.
const RUN: u64 = 7;

#[derive(Default)]
struct Fake {
    registers: AtomicU32,
    known: AtomicBool,
    source_url: String,
    reports: Mutex<Vec<HealthReport>>,
    registrations: Mutex<Vec<RegisterNodeRequest>>,
    streams: Mutex<Vec<mpsc::Sender<Result<NodeCommand, Status>>>>,
    /// Token keys answered in RegisterNodeResponse.
    token_keys: Vec<PublicKey>,
    /// Broadcast `cp` requires tokens.
    private: bool,
    /// Refuse every call without `authorization: Bearer <this>` (UNAUTHENTICATED).
    require_key: Option<String>,
    /// Calls refused for a missing or wrong key.
    refused: AtomicU32,
    /// (call, authorization value) of every call.
    auth_seen: Mutex<Vec<(&'static str, Option<String>)>>,
}

impl Fake {
    /// Records the call's credential and enforces `require_key`.
    fn check<T>(&self, call: &'static str, r: &Request<T>) -> Result<(), Status> {
        let got = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.auth_seen.lock().unwrap().push((call, got.clone()));
        match &self.require_key {
            Some(key) if got.as_deref() != Some(format!("Bearer {key}").as_str()) => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                Err(Status::unauthenticated("node credential rejected"))
            }
            _ => Ok(()),
        }
    }
}

struct Svc(Arc<Fake>);

#[tonic::async_trait]
impl EdgeService for Svc {
    async fn register(
        &self,
        r: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        self.0.check("register", &r)?;
        let n = self.0.registers.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.known.store(true, Ordering::SeqCst);
        self.0.registrations.lock().unwrap().push(r.into_inner());
        Ok(Response::new(RegisterNodeResponse {
            node_id: format!("node-{n}"),
            heartbeat_interval_ms: 200,
            token_keys: self.0.token_keys.clone(),
        }))
    }
    type CommandsStream = ReceiverStream<Result<NodeCommand, Status>>;
    async fn commands(
        &self,
        r: Request<CommandsRequest>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        self.0.check("commands", &r)?;
        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(NodeCommand {
                command: Some(node_command::Command::Ingest(IngestCommand {
                    broadcast_id: "cp".into(),
                    source_url: self.0.source_url.clone(),
                    chunk_duration_ms: 1000,
                    substreams: 4,
                    public: !self.0.private,
                    run_epoch: RUN,
                })),
            }))
            .await;
        self.0.streams.lock().unwrap().push(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn report_health(
        &self,
        r: Request<HealthReport>,
    ) -> Result<Response<HealthReportAck>, Status> {
        self.0.check("report_health", &r)?;
        self.0.reports.lock().unwrap().push(r.into_inner());
        Ok(Response::new(HealthReportAck {
            known: self.0.known.load(Ordering::SeqCst),
        }))
    }
}

/// Endless paced MPEG-TS-ish source: ffmpeg-free, TS null packets with a PAT/PMT are
/// enough for the control test (health, last_seq), so use real TS from ffmpeg.
fn start_source() -> SocketAddr {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.ts");
    let ok = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"])
        .args([
            "-i",
            "testsrc=size=160x120:rate=25",
            "-c:v",
            "libx264",
            "-g",
            "25",
        ])
        .args(["-t", "30", "-f", "mpegts"])
        .arg(&out)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let ts = std::fs::read(out).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let ts = ts.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let mut b = [0u8; 2048];
                let _ = c.read(&mut b);
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\n\r\n");
                let per = ts.len() / 30 / 10;
                for piece in ts.chunks(per.max(188)) {
                    if c.write_all(piece).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    a
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("gave up waiting for {what}")
}

#[test]
fn control_plane_link() -> Result<()> {
    let src = start_source();
    let fake = Arc::new(Fake {
        source_url: format!("http://{src}/live.ts"),
        ..Fake::default()
    });
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let cp_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let svc = EdgeServiceServer::new(Svc(Arc::clone(&fake)));
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve(cp_addr)
            .await;
    });

    let node = Node::start(Config {
        control_url: Some(format!("http://{cp_addr}")),
        control_transport: starling_proto::transport::Transport::Plaintext,
        wire_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        source_policy: starling_dataplane::source_policy::SourcePolicy::with_loopback(),
        advertise_host: "10.1.2.3".into(),
        node_name: "test-node".into(),
        cores: 1,
        io_memory_kib: 256,
        ..Config::default()
    })?;
    wait_for("registration", || {
        fake.registers.load(Ordering::SeqCst) >= 1
    })?;
    {
        let regs = fake.registrations.lock().unwrap();
        assert_eq!(regs[0].node_name, "test-node");
        assert_eq!(
            regs[0].wire_addr,
            format!("10.1.2.3:{}", node.wire_addr().port())
        );
        assert_eq!(
            regs[0].http_addr,
            format!("10.1.2.3:{}", node.http_addr().port())
        );
        assert_eq!(regs[0].cores, 1);
    }
    wait_for("an UP report with chunks", || {
        fake.reports.lock().unwrap().iter().any(|r| {
            r.ingests.iter().any(|i| {
                i.broadcast_id == "cp"
                    && i.health == starling_proto::v1::SourceHealth::Up as i32
                    && i.last_seq > 0
                    && i.content_type == "video/mp2t"
                    && i.bitrate_kbps > 0
            })
        })
    })?;
    assert_eq!(node.status("cp").map(|s| s.health), Some(SourceHealth::Up));

    // known=false: the node registers again (and the replayed ingest is idempotent).
    fake.known.store(false, Ordering::SeqCst);
    wait_for("re-registration", || {
        fake.registers.load(Ordering::SeqCst) >= 2
    })?;
    let seq_before = node.status("cp").and_then(|s| s.last_seq);

    // A viewer connected over HTTP keeps receiving while the control plane dies.
    let mut viewer = TcpStream::connect(node.http_addr())?;
    viewer.set_read_timeout(Some(Duration::from_secs(30)))?;
    viewer.write_all(b"GET /live/cp HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = vec![0u8; 65536];
    let n = viewer.read(&mut buf)?;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    rt.shutdown_background();
    let mut got = 0usize;
    let start_seq = node.status("cp").and_then(|s| s.last_seq);
    wait_for("chunks after the control plane died", || {
        if let Ok(n) = viewer.read(&mut buf) {
            got += n;
        }
        got > 50_000 && node.status("cp").and_then(|s| s.last_seq) > start_seq
    })?;
    assert!(node.status("cp").and_then(|s| s.last_seq) > seq_before);
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn stop_command_removes_broadcast() -> Result<()> {
    let src = start_source();
    let fake = Arc::new(Fake {
        source_url: format!("http://{src}/live.ts"),
        ..Fake::default()
    });
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let cp_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let svc = EdgeServiceServer::new(Svc(Arc::clone(&fake)));
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve(cp_addr)
            .await;
    });
    let node = Node::start(Config {
        control_url: Some(format!("http://{cp_addr}")),
        control_transport: starling_proto::transport::Transport::Plaintext,
        wire_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        source_policy: starling_dataplane::source_policy::SourcePolicy::with_loopback(),
        cores: 1,
        io_memory_kib: 256,
        ..Config::default()
    })?;
    wait_for("ingest", || node.status("cp").is_some())?;
    let tx = fake.streams.lock().unwrap().last().cloned().unwrap();
    rt.block_on(tx.send(Ok(NodeCommand {
        command: Some(node_command::Command::Stop(StopIngestCommand {
            broadcast_id: "cp".into(),
        })),
    })))?;
    wait_for("stop", || node.status("cp").is_none())?;
    node.shutdown();
    node.join()?;
    rt.shutdown_background();
    Ok(())
}

fn public_key(s: &TokenSigner) -> PublicKey {
    PublicKey {
        key_id: s.key_id(),
        ed25519: s.public_key().to_vec(),
    }
}

/// A wire viewer of `cp` with `token`, past STREAM_INFO and one chunk.
fn cp_viewer(addr: SocketAddr, token: bytes::Bytes) -> Result<common::Client> {
    let mut c =
        common::Client::handshake_token(addr, "cp", StartAt::Live, wire::ALL_SUBSTREAMS, token)?;
    match c.recv()? {
        Frame::StreamInfo(_) => {}
        other => bail!("expected STREAM_INFO, got {other:?}"),
    }
    common::next_chunk(&mut c)?;
    Ok(c)
}

fn refusal(addr: SocketAddr, token: bytes::Bytes) -> Result<wire::Reason> {
    let mut c =
        common::Client::handshake_token(addr, "cp", StartAt::Live, wire::ALL_SUBSTREAMS, token)?;
    match c.recv()? {
        Frame::Error(r) => Ok(r),
        other => bail!("expected ERROR, got {other:?}"),
    }
}

#[test]
fn revoke_and_key_rotation_from_the_control_plane() -> Result<()> {
    let src = start_source();
    let k7 = TokenSigner::new(7, &generate_pkcs8().unwrap()).unwrap();
    let k8 = TokenSigner::new(8, &generate_pkcs8().unwrap()).unwrap();
    let fake = Arc::new(Fake {
        source_url: format!("http://{src}/live.ts"),
        token_keys: vec![public_key(&k7)],
        private: true,
        ..Fake::default()
    });
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let cp_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let svc = EdgeServiceServer::new(Svc(Arc::clone(&fake)));
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve(cp_addr)
            .await;
    });
    let node = Node::start(Config {
        control_url: Some(format!("http://{cp_addr}")),
        control_transport: starling_proto::transport::Transport::Plaintext,
        wire_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        source_policy: starling_dataplane::source_policy::SourcePolicy::with_loopback(),
        cores: 2,
        io_memory_kib: 256,
        ..Config::default()
    })?;
    wait_for("chunks", || {
        node.status("cp").is_some_and(|s| s.chunks_in_window >= 1)
    })?;
    {
        let regs = fake.registrations.lock().unwrap();
        let key = regs[0]
            .chunk_signing_key
            .clone()
            .expect("chunk_signing_key");
        assert_eq!(key.key_id, node.chunk_key_id());
        assert_eq!(key.ed25519, node.chunk_public_key().to_vec());
    }
    let addr = node.wire_addr();
    // IngestCommand.public = false: no token, no stream.
    let r = refusal(addr, bytes::Bytes::new())?;
    assert_eq!(r.code, ErrorCode::Unauthorized);
    let tok1 = common::play_token(&k7, "cp", 1, 60_000);
    let mut a = cp_viewer(addr, tok1.clone())?;
    let mut b = cp_viewer(addr, common::play_token(&k7, "cp", 2, 60_000))?;

    let tx = fake.streams.lock().unwrap().last().cloned().unwrap();
    rt.block_on(tx.send(Ok(NodeCommand {
        command: Some(node_command::Command::Revoke(RevokeCommand {
            broadcast_id: "cp".into(),
            peer_ids: vec![1],
        })),
    })))?;
    let (is_error, r) = common::until_close(&mut a)?;
    assert!(!is_error, "{r:?}");
    assert_eq!(r.code, ErrorCode::Revoked);
    // The other viewer keeps receiving, chunks signed for the run the command named
    // (another run is refused).
    let v = common::chunk_verifier(&node, "cp").with_run(Some(RUN));
    let c = common::next_chunk(&mut b)?;
    common::verify_chunk(&v, &c)?;
    let other_run = common::chunk_verifier(&node, "cp").with_run(Some(RUN + 1));
    assert!(common::verify_chunk(&other_run, &c).is_err());
    for _ in 0..2 {
        common::verify_chunk(&v, &common::next_chunk(&mut b)?)?;
    }
    // The revoked peer cannot come back with its token.
    let r = refusal(addr, tok1)?;
    assert_eq!(r.code, ErrorCode::Revoked, "{r:?}");

    // Key rotation (KeysCommand): key 7 is replaced by key 8; connected viewers stay.
    rt.block_on(tx.send(Ok(NodeCommand {
        command: Some(node_command::Command::Keys(KeysCommand {
            token_keys: vec![public_key(&k8)],
        })),
    })))?;
    wait_for("rotation", || {
        refusal(addr, common::play_token(&k7, "cp", 3, 60_000))
            .is_ok_and(|r| r.message.starts_with("unknown_key:"))
    })?;
    cp_viewer(addr, common::play_token(&k8, "cp", 3, 60_000))?;
    common::verify_chunk(&v, &common::next_chunk(&mut b)?)?;
    node.shutdown();
    node.join()?;
    rt.shutdown_background();
    Ok(())
}

/// The node sends its node key on every EdgeService call; without one it is refused,
/// keeps retrying and keeps running.
#[test]
fn node_key_is_sent_and_a_refusal_is_retried() -> Result<()> {
    const KEY: &str = "dataplane-test-node-key-0123456789";
    let fake = Arc::new(Fake {
        // Nothing listens there: the ingest fails, which this test ignores.
        source_url: "http://127.0.0.1:1/live.ts".into(),
        require_key: Some(KEY.into()),
        ..Fake::default()
    });
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let cp_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let svc = EdgeServiceServer::new(Svc(Arc::clone(&fake)));
    rt.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve(cp_addr)
            .await;
    });
    let config = |node_key: Option<&str>| -> Result<Config> {
        Ok(Config {
            control_url: Some(format!("http://{cp_addr}")),
            control_transport: starling_proto::transport::Transport::Plaintext,
            node_key: node_key.map(NodeKey::new).transpose()?,
            wire_listen: "127.0.0.1:0".parse()?,
            http_listen: "127.0.0.1:0".parse()?,
            source_policy: starling_dataplane::source_policy::SourcePolicy::with_loopback(),
            node_name: "keyed".into(),
            cores: 1,
            io_memory_kib: 256,
            ..Config::default()
        })
    };

    // No key: refused, retried (with backoff), and the node stays up.
    let anon = Node::start(config(None)?)?;
    wait_for("two refused registrations", || {
        fake.refused.load(Ordering::SeqCst) >= 2
    })?;
    assert_eq!(fake.registers.load(Ordering::SeqCst), 0);
    let mut c = TcpStream::connect(anon.http_addr())?;
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    anon.shutdown();
    anon.join()?;
    assert!(
        fake.auth_seen
            .lock()
            .unwrap()
            .iter()
            .all(|(_, auth)| auth.is_none())
    );

    // With the key: registered, and every call carries it.
    fake.auth_seen.lock().unwrap().clear();
    let refused_before = fake.refused.load(Ordering::SeqCst);
    let node = Node::start(config(Some(KEY))?)?;
    wait_for("registration and two health reports", || {
        fake.registers.load(Ordering::SeqCst) >= 1 && fake.reports.lock().unwrap().len() >= 2
    })?;
    node.shutdown();
    node.join()?;
    assert_eq!(fake.refused.load(Ordering::SeqCst), refused_before);
    let seen = fake.auth_seen.lock().unwrap().clone();
    for call in ["register", "commands", "report_health"] {
        assert!(
            seen.iter().any(|(c, _)| *c == call),
            "no {call} in {seen:?}"
        );
    }
    let want = format!("Bearer {KEY}");
    assert!(
        seen.iter()
            .all(|(_, auth)| auth.as_deref() == Some(want.as_str())),
        "{:?}",
        seen.iter()
            .map(|(c, a)| (c, a.is_some()))
            .collect::<Vec<_>>()
    );
    Ok(())
}
