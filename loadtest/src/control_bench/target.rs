//! The control plane under test: a child process (or one already running), a live
//! public broadcast on it, and an emulated data-plane node that keeps it joinable.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use starling_controlplane::BearerInterceptor;
use starling_proto::transport::Transport;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, CommandsRequest, CreateBroadcastRequest, HealthReport, IngestHealth, JoinRequest,
    LeaveRequest, NodeCommand, PublicKey, RegisterNodeRequest, SourceHealth,
};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::BenchError;
use super::config::{BenchConfig, Target};

/// The hidden `starling-loadtest` subcommand that runs [`super::embedded`].
pub const EMBEDDED_SUBCOMMAND: &str = "bench-controlplane";

/// Lines of the child's stderr kept for error messages.
const LOG_TAIL: usize = 40;

/// A running control plane and the broadcast the bench joins.
pub struct Running {
    /// gRPC URL.
    pub url: String,
    /// How it is reached (a started one: TLS trusting the throwaway root).
    pub transport: Transport,
    /// Its process id (for /proc).
    pub pid: u32,
    /// The live public broadcast.
    pub broadcast_id: String,
    /// Database backend as described ("sqlite", "postgres", or "external").
    pub backend: String,
    /// Times the emulated node had to register again (the control plane declared it
    /// dead: the figures after it are suspect).
    pub node_reregistrations: Arc<AtomicU64>,
    child: Option<Child>,
    _data_dir: Option<tempfile::TempDir>,
    log_tail: Arc<Mutex<VecDeque<String>>>,
    node_stop: watch::Sender<bool>,
}

impl Running {
    /// The last lines the child wrote on stderr.
    pub fn log_tail(&self) -> String {
        self.log_tail
            .lock()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether the child process is still running (always true for an external one).
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Stops the emulated node and the child process (SIGKILL: nothing of it is
    /// measured any more).
    pub fn shutdown(mut self) {
        let _ = self.node_stop.send(true);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.node_stop.send(true);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn random_key() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// A gRPC channel to `url` (one HTTP/2 connection), secured as `transport` says.
pub async fn connect(url: &str, transport: &Transport) -> Result<Channel, BenchError> {
    starling_proto::transport::endpoint(url, transport)
        .map_err(|e| BenchError::Config(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| {
            BenchError::Setup(format!(
                "connecting to {url}: {}",
                starling_proto::transport::error_chain(&e)
            ))
        })
}

/// Starts (or attaches to) the control plane, creates and starts a public broadcast,
/// registers the emulated node and waits until a join is admitted.
pub async fn start(cfg: &BenchConfig) -> Result<Running, BenchError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let log_tail = Arc::new(Mutex::new(VecDeque::new()));
    let (mut running, admin_key, node_key) = match &cfg.target {
        Target::Spawn {
            bin,
            database_url,
            extra_args,
            show_logs,
        } => {
            let dir = tempfile::tempdir()
                .map_err(|e| BenchError::Setup(format!("temporary directory: {e}")))?;
            let admin_key = random_key();
            // The embedded control plane takes the admin key on EdgeService too.
            let node_key = if bin.is_some() {
                random_key()
            } else {
                admin_key.clone()
            };
            // TLS with a throwaway CA (the bench measures what a deployment runs).
            let tls =
                crate::tls::ThrowawayTls::new().map_err(|e| BenchError::Setup(e.to_string()))?;
            let (cert_file, key_file) = tls
                .server_leaf()
                .write_to(dir.path(), "server")
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            let transport = tls.transport();
            let mut cmd = match bin {
                Some(bin) => {
                    let mut cmd = Command::new(bin);
                    cmd.arg("--metrics-listen")
                        .arg("off")
                        // The bench calls from one address: no per-address limits.
                        .arg("--join-rate-per-addr")
                        .arg("0")
                        .arg("--unknown-session-rate-per-addr")
                        .arg("0")
                        .arg("--peer-addr-check")
                        .arg("off")
                        .arg("--log")
                        .arg("warn")
                        .env("STARLING_NODE_KEY", &node_key);
                    cmd
                }
                None => {
                    let exe = std::env::current_exe()
                        .map_err(|e| BenchError::Setup(format!("current executable: {e}")))?;
                    let mut cmd = Command::new(exe);
                    cmd.arg(EMBEDDED_SUBCOMMAND);
                    cmd
                }
            };
            cmd.arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--data-dir")
                .arg(dir.path())
                .arg("--heartbeat-interval-ms")
                .arg(cfg.heartbeat_interval_ms.to_string())
                .arg("--tls-cert")
                .arg(&cert_file)
                .arg("--tls-key")
                .arg(&key_file)
                .args(extra_args)
                .env("STARLING_ADMIN_KEY", &admin_key)
                .env_remove("DATABASE_URL")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let backend = match database_url {
                Some(url) => {
                    cmd.env("DATABASE_URL", url);
                    "postgres"
                }
                None => "sqlite",
            };
            let mut child = cmd
                .spawn()
                .map_err(|e| BenchError::Setup(format!("starting the control plane: {e}")))?;
            let pid = child.id();
            let stderr = child
                .stderr
                .take()
                .ok_or_else(|| BenchError::Setup("no stderr pipe".into()))?;
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let tail = log_tail.clone();
            let show = *show_logs;
            std::thread::spawn(move || {
                let mut addr_tx = Some(addr_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(tx) = &addr_tx
                        && let Some(rest) = line.split(", listening on ").nth(1)
                        && let Some(addr) = rest.split_whitespace().next()
                    {
                        let _ = tx.send(addr.to_string());
                        addr_tx = None;
                    }
                    if show {
                        eprintln!("[controlplane] {line}");
                    }
                    let mut t = tail.lock();
                    if t.len() == LOG_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
            let running = Running {
                url: String::new(),
                transport,
                pid,
                broadcast_id: String::new(),
                backend: backend.into(),
                node_reregistrations: Arc::default(),
                child: Some(child),
                _data_dir: Some(dir),
                log_tail: log_tail.clone(),
                node_stop: stop_tx,
            };
            let addr = tokio::task::spawn_blocking(move || {
                addr_rx.recv_timeout(Duration::from_secs(120)).ok()
            })
            .await
            .ok()
            .flatten()
            .ok_or_else(|| {
                BenchError::Setup(format!(
                    "the control plane did not report its address; its stderr:\n{}",
                    running.log_tail()
                ))
            })?;
            let mut running = running;
            running.url = format!("https://{addr}");
            (running, admin_key, node_key)
        }
        Target::External {
            url,
            transport,
            pid,
            admin_key,
            node_key,
        } => (
            Running {
                url: url.clone(),
                transport: transport.clone(),
                pid: *pid,
                broadcast_id: String::new(),
                backend: "external".into(),
                node_reregistrations: Arc::default(),
                child: None,
                _data_dir: None,
                log_tail: log_tail.clone(),
                node_stop: stop_tx,
            },
            admin_key.clone(),
            node_key.clone(),
        ),
    };
    let mut admin = crate::deployment::admin_client(&running.url, &admin_key, &running.transport)
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let created = admin
        .create_broadcast(CreateBroadcastRequest {
            name: "control-bench".into(),
            source_url: "http://127.0.0.1:9/control-bench".into(),
            chunk_duration_ms: 250,
            substreams: cfg.substreams,
            public: true,
        })
        .await
        .map_err(|s| BenchError::Setup(format!("CreateBroadcast: {s}")))?
        .into_inner();
    admin
        .start_broadcast(BroadcastRef {
            id: created.id.clone(),
        })
        .await
        .map_err(|s| BenchError::Setup(format!("StartBroadcast: {s}")))?;
    running.broadcast_id = created.id.clone();
    let channel = connect(&running.url, &running.transport).await?;
    emulate_node(
        channel.clone(),
        &node_key,
        created.id.clone(),
        cfg.stream_kbps,
        running.node_reregistrations.clone(),
        stop_rx,
    )
    .await?;
    wait_joinable(&mut running, channel).await?;
    Ok(running)
}

/// Most time between the emulated node's health reports, whatever the announced
/// interval (the control plane's `--heartbeat-interval-ms` is also the viewers'; a long
/// one must not get the node declared dead).
const MAX_NODE_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The emulated node's identity and what it reports.
#[derive(Clone)]
struct NodeSpec {
    key: [u8; 32],
    broadcast_id: String,
    stream_kbps: u32,
}

type EdgeClient =
    EdgeServiceClient<tonic::service::interceptor::InterceptedService<Channel, BearerInterceptor>>;

/// Registers the node and opens its command stream: its id, report interval and
/// command stream.
async fn register(
    edge: &mut EdgeClient,
    spec: &NodeSpec,
) -> Result<(String, Duration, tonic::Streaming<NodeCommand>), tonic::Status> {
    let key = spec.key;
    let reg = edge
        .register(RegisterNodeRequest {
            node_name: "control-bench".into(),
            wire_addr: "127.0.0.1:9".into(),
            http_addr: "127.0.0.1:9".into(),
            cores: 1,
            capacity_viewers: 0,
            chunk_signing_key: Some(PublicKey {
                key_id: u32::from_be_bytes([key[0], key[1], key[2], key[3]]),
                ed25519: key.to_vec(),
            }),
        })
        .await?
        .into_inner();
    let commands = edge
        .commands(CommandsRequest {
            node_id: reg.node_id.clone(),
        })
        .await?
        .into_inner();
    let interval = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.clamp(100, 60_000)))
        .min(MAX_NODE_REPORT_INTERVAL);
    Ok((reg.node_id, interval, commands))
}

/// One registration's life: health reports (UP, at the stream rate) until the
/// control plane forgets the node, its command stream ends or `stop`; `true` = stop.
async fn node_session(
    edge: &mut EdgeClient,
    spec: &NodeSpec,
    node_id: String,
    interval: Duration,
    mut commands: tonic::Streaming<NodeCommand>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return true,
            msg = commands.message() => {
                if !matches!(msg, Ok(Some(_))) {
                    tracing::warn!("control-bench node: command stream ended: {msg:?}");
                    return false;
                }
            }
            _ = tick.tick() => {
                let report = HealthReport {
                    node_id: node_id.clone(),
                    ingests: vec![IngestHealth {
                        broadcast_id: spec.broadcast_id.clone(),
                        health: SourceHealth::Up as i32,
                        error: String::new(),
                        last_seq: 0,
                        content_type: "application/octet-stream".into(),
                        viewers: 0,
                        bitrate_kbps: spec.stream_kbps,
                    }],
                    viewers: 0,
                };
                let call = edge.report_health(report);
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(ack)) if !ack.get_ref().known => {
                        tracing::warn!("control-bench node: the control plane forgot the node");
                        return false;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(s)) => tracing::warn!("control-bench node: health report: {s}"),
                    Err(_) => tracing::warn!("control-bench node: health report timed out"),
                }
            }
        }
    }
}

/// Registers a data-plane node (capacity 0 = unlimited), keeps its command stream
/// open and reports health at the announced interval (at most 1 s apart), in a task
/// that registers again whenever the control plane forgets the node (counted in
/// `reregistrations`) and ends when `stop` turns true.
async fn emulate_node(
    channel: Channel,
    node_key: &str,
    broadcast_id: String,
    stream_kbps: u32,
    reregistrations: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BenchError> {
    let bearer = BearerInterceptor::new(node_key)
        .map_err(|e| BenchError::Config(format!("node key: {e}")))?;
    let mut edge = EdgeServiceClient::with_interceptor(channel, bearer);
    let mut key = [0u8; 32];
    rand::rng().fill(&mut key);
    let spec = NodeSpec {
        key,
        broadcast_id,
        stream_kbps,
    };
    let (node_id, interval, commands) = register(&mut edge, &spec)
        .await
        .map_err(|s| BenchError::Setup(format!("EdgeService.Register / Commands: {s}")))?;
    tokio::spawn(async move {
        let mut session = Some((node_id, interval, commands));
        loop {
            if let Some((id, interval, commands)) = session.take()
                && node_session(&mut edge, &spec, id, interval, commands, &mut stop).await
            {
                return;
            }
            if *stop.borrow() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            match register(&mut edge, &spec).await {
                Ok(s) => {
                    reregistrations.fetch_add(1, Ordering::Relaxed);
                    session = Some(s);
                }
                Err(s) => tracing::warn!("control-bench node: registering again: {s}"),
            }
        }
    });
    Ok(())
}

/// Probes with a join (left at once) until one is admitted (UNAVAILABLE = the node
/// assignment has not happened yet).
async fn wait_joinable(running: &mut Running, channel: Channel) -> Result<(), BenchError> {
    let mut viewer = ViewerServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !running.alive() {
            return Err(BenchError::Setup(format!(
                "the control plane exited; its stderr:\n{}",
                running.log_tail()
            )));
        }
        let probe = viewer
            .join(JoinRequest {
                broadcast_id: running.broadcast_id.clone(),
                client_version: "starling-control-bench/probe".into(),
                holder_key: vec![1; 32],
                ..JoinRequest::default()
            })
            .await;
        match probe {
            Ok(r) => {
                let session_id = r.into_inner().session_id;
                let _ = viewer.leave(LeaveRequest { session_id }).await;
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => {
                return Err(BenchError::Setup(format!(
                    "the broadcast never became joinable: {s}"
                )));
            }
        }
    }
}
