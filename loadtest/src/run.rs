//! `starling-loadtest run`: the coordinator of a multi-process load test.
//!
//! One process holds about 20 open files per in-process peer and the per-process limit
//! here is 20,000, so large runs spread their peers over **worker processes**
//! ([`crate::worker`]), as a real load test spreads over machines. The coordinator:
//!
//! 1. starts a deployment — the synthetic source and the control plane (embedded
//!    SQLite) in its own process, the data plane in a child process (`starling-loadtest
//!    dataplane`, so that its one socket per viewer and the control plane's one gRPC
//!    connection per viewer do not share one process's file limit) — or uses an
//!    existing control plane and broadcast ([`External`]);
//! 2. listens for workers on TCP, spawns the local ones (`starling-loadtest worker
//!    --coordinator ADDR`) and waits for the remote ones, gives each its share of the
//!    peers (hello), then starts them all at once;
//! 3. prints a progress line every second from the workers' samples and the data
//!    plane's egress counter, sends churn commands during the steady phase, stops the
//!    workers after `duration`, and merges their final figures into one [`RunReport`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader as StdBufReader, IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Serialize;
use starling_controlplane::{ControlPlane, ControlPlaneHandle, DatabaseConfig, ServiceConfig};
use starling_proto::v1::{BroadcastRef, CreateBroadcastRequest, SourceHealth};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bound::{Stay, fluid_bound_bytes};
use crate::deployment::{AdminClient, admin_client};
use crate::error::HarnessError;
use crate::report::{LatencyFigures, Percentiles};
use crate::source::{SourceConfig, SyntheticSource};
use crate::swarm::UploadProfile;
use crate::worker::{
    ADDRESS_BLOCK, FromWorker, Hello, LAG_BUCKET_MS, PeerRecord, ProcStats, ToWorker, WorkerFinal,
    WorkerSample,
};

/// Peers per worker process by default: ~20 open files per in-process peer under a
/// 20,000-file limit, with headroom.
pub const PEERS_PER_WORKER: usize = 700;

/// An existing deployment to drive instead of starting one.
#[derive(Debug, Clone)]
pub struct External {
    /// The control plane's gRPC URL.
    pub control_url: String,
    /// A live broadcast (created with `public: true`, or viewers cannot join).
    pub broadcast_id: String,
    /// The admin key (`authorization: Bearer`), to read the broadcast's state.
    pub admin_key: Option<String>,
    /// The data plane's HTTP base URL (`http://host:port`), to read its egress counter
    /// from `/metrics`; without it, server egress is the SDKs' `bytes_from_server`.
    pub dataplane_http: Option<String>,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Peers (initial audience).
    pub peers: usize,
    /// Worker processes; 0 = ceil(peers / [`PEERS_PER_WORKER`]).
    pub workers: usize,
    /// Of those, how many connect on their own (other machines); the rest are spawned.
    pub remote_workers: usize,
    /// Steady phase after every peer joined.
    pub duration: Duration,
    /// Stream rate of the synthetic source (or of the external stream), kbit/s.
    pub bitrate_kbps: u32,
    /// Upload budgets.
    pub upload: UploadProfile,
    /// Joins per second over all workers; 0 = all at once.
    pub join_rate: f64,
    /// Leaves (each followed by a new join) per minute during the steady phase.
    pub churn_per_min: f64,
    /// Chunk duration, ms.
    pub chunk_ms: u32,
    /// Substreams (K).
    pub substreams: u32,
    /// SDK heartbeat interval handed out by the control plane.
    pub heartbeat: Duration,
    /// Play-out lag; `None` = the SDK default.
    pub target_lag: Option<Duration>,
    /// Check every peer's output against the source (in-process source only).
    pub check_identity: bool,
    /// The peers of a worker share a cache of authentic chunk signatures
    /// ([`crate::swarm::SwarmConfig::shared_signature_cache`]).
    pub shared_signature_cache: bool,
    /// Admission guard: while this machine is at least this busy (fraction of all cores,
    /// sampled every second from `/proc/stat`), the workers start no join; the hold is
    /// released below `max_busy - 0.15`. Held for [`ADMISSION_CLOSE`] in a row, the ramp
    /// ends with the peers admitted so far (`admission_closed_at_peers`): beyond this
    /// machine's capacity, more peers would only starve everyone's CPU (a saturated
    /// load generator makes every peer late, and late peers fall back to the data
    /// plane). 0 = never hold.
    pub max_busy: f64,
    /// Data-plane executors.
    pub dataplane_cores: usize,
    /// Where workers connect.
    pub listen: SocketAddr,
    /// The executable spawned for workers and the data plane; `None` = this one.
    pub exe: Option<PathBuf>,
    /// Use this deployment instead of starting one.
    pub external: Option<External>,
    /// Print a progress line every second on stderr.
    pub progress: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            peers: 10_000,
            workers: 0,
            remote_workers: 0,
            duration: Duration::from_secs(60),
            bitrate_kbps: 64,
            upload: UploadProfile::mixed(),
            join_rate: 100.0,
            churn_per_min: 0.0,
            chunk_ms: 250,
            substreams: 4,
            heartbeat: Duration::from_secs(2),
            target_lag: None,
            check_identity: true,
            shared_signature_cache: true,
            max_busy: 0.0,
            dataplane_cores: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            exe: None,
            external: None,
            progress: true,
        }
    }
}

impl RunConfig {
    /// Worker processes this config uses.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            self.peers.div_ceil(PEERS_PER_WORKER).max(1)
        }
    }
}

/// Percentiles as reported.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct P3 {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl From<Percentiles> for P3 {
    fn from(p: Percentiles) -> P3 {
        P3 {
            p50: p.p50,
            p95: p.p95,
            p99: p.p99,
        }
    }
}

/// p50 / p99.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct P2 {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// One process of the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    /// `coordinator` (source + control plane), `dataplane`, `worker-N`.
    pub role: String,
    /// Host name (workers).
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Peers it held (workers).
    pub peers: usize,
    /// CPU seconds (user + system).
    pub cpu_s: f64,
    /// Peak RSS, bytes.
    pub max_rss_bytes: u64,
}

/// The merged report of a run (`--json` writes it as is).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Peers asked for (initial audience).
    pub peers: usize,
    /// Distinct peers whose join succeeded (re-joins after churn included).
    pub peers_joined: usize,
    /// Of the initial audience, peers whose join succeeded.
    pub initial_peers_joined: usize,
    /// Peers playing at the end.
    pub peers_active_at_end: usize,
    /// Peers that left (churn).
    pub peers_left: usize,
    /// Peers whose every join attempt failed.
    pub join_failures: usize,
    /// Viewers that stopped on their own.
    pub peers_closed: usize,
    /// Worker processes.
    pub workers: usize,
    /// The measured window T: from the start of the joins to the stop, seconds.
    pub duration_s: f64,
    /// Of which the join ramp.
    pub ramp_s: f64,
    /// Seconds the ramp was held because this machine was saturated
    /// ([`RunConfig::max_busy`]).
    pub ramp_held_s: f64,
    /// The ramp ended early, with this many active peers, because this machine stayed
    /// saturated ([`RunConfig::max_busy`]); the rest never joined.
    pub admission_closed_at_peers: Option<usize>,
    /// Of which the steady phase.
    pub steady_s: f64,
    /// Stream rate of the source (media payload), kbit/s.
    pub bitrate_kbps: u32,
    /// Stream rate as delivered (payload plus each chunk's frame header and signature
    /// block), kbit/s, as the data plane measured it: the `r` of the upload budgets and
    /// of the fluid bound, since every byte of it must reach every viewer and peers
    /// spend their upload budgets in these bytes. `bitrate_kbps` when not measured.
    pub stream_kbps: u32,
    /// Chunk duration, ms.
    pub chunk_ms: u32,
    /// Substreams.
    pub substreams: u32,
    /// The peers of a worker shared a cache of authentic chunk signatures (false: every
    /// peer checked every signature itself).
    pub shared_signature_cache: bool,
    /// Upload profile (multiples of the stream rate).
    pub upload_profile: Vec<f64>,
    /// Joins per second.
    pub join_rate: f64,
    /// Churn, leaves (and re-joins) per minute.
    pub churn_per_min: f64,
    /// Bytes from peers / all bytes delivered, over all peers and the whole run.
    pub peer_share: f64,
    /// Chunks played on time / chunks due, over all peers and the whole run.
    pub continuity: f64,
    /// Start-up times (join call start to first chunk out), ms.
    pub startup_ms: P3,
    /// Lag behind live (wall clock at play-out minus the time the data plane cut the
    /// chunk, SDK `Stats::lag`), sampled every second for every playing peer, ms
    /// (10 ms buckets, upper edge); `null` when no SDK reported a lag.
    pub lag_ms: Option<P2>,
    /// SDK stalls (runs of consecutive chunks that missed their deadline).
    pub stalls: u64,
    /// Chunks that missed their deadline.
    pub chunks_skipped: u64,
    /// Chunks played on time.
    pub chunks_played: u64,
    /// Bytes the data plane wrote to wire viewers over T (framing included), or the
    /// SDKs' `bytes_from_server` when the data plane's counter is not reachable.
    pub server_egress_bytes: u64,
    /// `dataplane_metrics` or `sdk_bytes_from_server`.
    pub server_egress_source: String,
    /// `∫ max(r, n(t)·r − Σu(t)) dt` over T (0 while nobody is present), from the
    /// upload budgets of the peers present at each moment, bytes.
    pub fluid_bound_bytes: f64,
    /// server_egress_bytes / fluid_bound_bytes.
    pub server_egress_over_bound: f64,
    /// What peers uploaded beyond their budgets over the run: chunk bytes as sent
    /// (frames with signature blocks) less Σ budget × time present:
    /// a relay may push on up to 3 s of debt, so in a scarce swarm, where every budget
    /// is spent, about 3 s of each peer's budget is upload the bound does not grant.
    pub upload_over_budget_bytes: f64,
    /// (server_egress_bytes + upload_over_budget_bytes) / fluid_bound_bytes: the ratio
    /// had the peers kept to their budgets exactly.
    pub server_egress_over_bound_at_budget: f64,
    /// Payload bytes from the data plane (SDK counters).
    pub bytes_from_server: u64,
    /// Payload bytes from peers.
    pub bytes_from_peers: u64,
    /// Payload bytes uploaded.
    pub bytes_uploaded: u64,
    /// Mean upload budget of the peers, multiples of the stream rate.
    pub upload_mean: f64,
    /// Duration of the successful join calls, ms.
    pub join_rpc_ms: P2,
    /// CPU seconds per process (`coordinator`, `dataplane`, `worker-N`) and `total`.
    pub cpu_s: BTreeMap<String, f64>,
    /// Cores of the machine running `run` (`available_parallelism`).
    pub cpu_cores: usize,
    /// CPU seconds of the processes on this machine (workers on other hosts excluded)
    /// over `duration_s × cpu_cores`: near 1, the machine, not the design, limits the
    /// run (everything is late because nothing gets scheduled in time).
    pub cpu_utilization: f64,
    /// `cpu_utilization ≥ 0.85`, or the admission guard closed the ramp: the figures
    /// describe this machine's limit.
    pub machine_bound: bool,
    /// Peak RSS per process and `max`.
    pub max_rss_bytes: BTreeMap<String, u64>,
    /// Per process.
    pub processes: Vec<ProcessReport>,
    /// Active peers whose output is not byte-identical to the source.
    pub not_identical: usize,
    /// Output bytes checked against the source.
    pub output_bytes_checked: u64,
    /// Parent changes.
    pub parent_changes: u64,
    /// Re-parent times over every peer (parent lost or re-searched to the first chunk
    /// from the new parent), ms: count, p50, p99, max (histogram bucket bounds capped at
    /// the max), mean.
    pub reparent_ms: LatencyFigures,
    /// Of those, the time to the control plane's `Reparent` answer, ms.
    pub reparent_answer_ms: LatencyFigures,
    /// The control plane's grid figures at the end, when readable.
    pub grid: Option<serde_json::Value>,
    /// Every peer's stay: `[joined_s, left_s or null, upload_kbps]` (times from the
    /// start of the joins), the input of `fluid_bound_bytes`.
    pub stays: Vec<(f64, Option<f64>, u32)>,
    /// What went wrong, bounded.
    pub errors: Vec<String>,
    /// How many things went wrong (may exceed `errors.len()`).
    pub error_count: usize,
}

const MAX_ERRORS: usize = 100;

impl RunReport {
    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "peers {} (joined {}, active at end {}, left {}, join failures {}, stopped {}) over {} workers; {} kbps ({} kbps as delivered), chunk {} ms, K={}, upload mean {:.2}x {:?}",
            self.peers,
            self.peers_joined,
            self.peers_active_at_end,
            self.peers_left,
            self.join_failures,
            self.peers_closed,
            self.workers,
            self.bitrate_kbps,
            self.stream_kbps,
            self.chunk_ms,
            self.substreams,
            self.upload_mean,
            self.upload_profile
        )?;
        writeln!(
            f,
            "window {:.1} s (ramp {:.1} s at {}/s, steady {:.1} s, churn {}/min); chunk signatures: {}",
            self.duration_s,
            self.ramp_s,
            self.join_rate,
            self.steady_s,
            self.churn_per_min,
            if self.shared_signature_cache {
                "each checked once per worker process (--no-signature-cache: by every peer)"
            } else {
                "checked by every peer"
            }
        )?;
        writeln!(
            f,
            "peer share {:.2}%  continuity {:.5} (played {}, skipped {}, stalls {})",
            self.peer_share * 100.0,
            self.continuity,
            self.chunks_played,
            self.chunks_skipped,
            self.stalls
        )?;
        writeln!(
            f,
            "server egress {} B ({}) = {:.3} x fluid bound {:.0} B; peers uploaded {:.0} B beyond their budgets (push debt), {:.3} x had they not",
            self.server_egress_bytes,
            self.server_egress_source,
            self.server_egress_over_bound,
            self.fluid_bound_bytes,
            self.upload_over_budget_bytes,
            self.server_egress_over_bound_at_budget
        )?;
        writeln!(
            f,
            "startup ms p50 {:.0} p95 {:.0} p99 {:.0}; lag ms {}; join call ms p50 {:.0} p99 {:.0}",
            self.startup_ms.p50,
            self.startup_ms.p95,
            self.startup_ms.p99,
            match self.lag_ms {
                Some(l) => format!("p50 {:.0} p99 {:.0}", l.p50, l.p99),
                None => "n/a (no SDK reported a lag)".into(),
            },
            self.join_rpc_ms.p50,
            self.join_rpc_ms.p99
        )?;
        writeln!(
            f,
            "identity: {} bytes checked, {} peers not byte-identical; parent changes {} (all causes, the control plane's own moves included)",
            self.output_bytes_checked, self.not_identical, self.parent_changes
        )?;
        writeln!(
            f,
            "reparent_ms {} (parent lost or re-searched -> first chunk from the new parent); to the Reparent answer {}",
            self.reparent_ms, self.reparent_answer_ms
        )?;
        for p in &self.processes {
            writeln!(
                f,
                "process {:<12} pid {:>7} peers {:>6} cpu {:>8.1} s  max rss {:>6.1} MiB{}",
                p.role,
                p.pid,
                p.peers,
                p.cpu_s,
                p.max_rss_bytes as f64 / 1048576.0,
                if p.host.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", p.host)
                }
            )?;
        }
        if self.ramp_held_s > 0.0 || self.admission_closed_at_peers.is_some() {
            writeln!(
                f,
                "admission: ramp held {:.0} s while this machine was saturated{}",
                self.ramp_held_s,
                match self.admission_closed_at_peers {
                    Some(n) => format!(
                        "; closed at {n} active peers (the rest never joined: this machine's limit)"
                    ),
                    None => String::new(),
                }
            )?;
        }
        writeln!(
            f,
            "machine: {} cores, {:.0}% busy over the window{}",
            self.cpu_cores,
            self.cpu_utilization * 100.0,
            if self.machine_bound {
                " -- MACHINE-BOUND: these figures are this machine's limit, not the grid's \
                 (run fewer peers here, or add workers on other machines)"
            } else {
                ""
            }
        )?;
        write!(f, "errors: {}", self.error_count)?;
        for e in &self.errors {
            write!(f, "\n  error: {e}")?;
        }
        Ok(())
    }
}

/// The deployment a run drives.
struct Stack {
    control_url: String,
    broadcast_id: String,
    /// Delivered stream rate measured by the data plane (see [`RunReport::stream_kbps`]).
    stream_kbps: Option<u32>,
    admin: Option<AdminClient>,
    pattern_seed: Option<u64>,
    metrics_url: Option<(String, String)>,
    local: Option<LocalStack>,
}

struct LocalStack {
    _source: SyntheticSource,
    control: ControlPlaneHandle,
    dataplane: Child,
    _dir: tempfile::TempDir,
}

const SOURCE_SEED: u64 = 0x5eed_0006;

fn exe(cfg: &RunConfig) -> Result<PathBuf, HarnessError> {
    match &cfg.exe {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe()
            .map_err(|e| HarnessError::Start(format!("current executable: {e}"))),
    }
}

/// `http://host:port` → (`host:port`, host).
fn split_http(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let hostport = rest.split('/').next()?.to_owned();
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport.clone(), |(h, _)| h.to_owned());
    Some((hostport, host))
}

impl Stack {
    async fn start(cfg: &RunConfig) -> Result<Stack, HarnessError> {
        if let Some(ext) = &cfg.external {
            let admin = match &ext.admin_key {
                Some(k) => Some(admin_client(&ext.control_url, k).await?),
                None => None,
            };
            return Ok(Stack {
                control_url: ext.control_url.clone(),
                broadcast_id: ext.broadcast_id.clone(),
                stream_kbps: None,
                admin,
                pattern_seed: None,
                metrics_url: ext.dataplane_http.as_deref().and_then(split_http),
                local: None,
            });
        }
        let source = SyntheticSource::start(SourceConfig {
            bitrate_kbps: cfg.bitrate_kbps,
            seed: SOURCE_SEED,
            ..SourceConfig::default()
        })
        .await
        .map_err(|e| HarnessError::Start(format!("synthetic source: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("starling-run-")
            .tempdir()
            .map_err(|e| HarnessError::Start(format!("temporary directory: {e}")))?;
        let mut cp = starling_controlplane::Config::new(
            ([127, 0, 0, 1], 0).into(),
            DatabaseConfig::Sqlite {
                path: dir.path().join("starling.db"),
            },
        );
        let admin_key = cp.auth.admin_key.clone().unwrap_or_default();
        cp.service = ServiceConfig {
            heartbeat_interval: cfg.heartbeat,
            ..ServiceConfig::default()
        };
        let control = ControlPlane::bind(cp)
            .await
            .map_err(|e| HarnessError::Start(format!("control plane: {e}")))?
            .spawn();
        let control_url = control.url();

        // The data plane in a child process of this executable.
        let capacity = (cfg.peers.max(1000) * 2).to_string();
        let mut child = Command::new(exe(cfg)?)
            .args([
                "dataplane",
                "--control",
                &control_url,
                "--cores",
                &cfg.dataplane_cores.max(1).to_string(),
                "--capacity-viewers",
                &capacity,
            ])
            // The node key travels in the environment, not on the command line.
            .env("STARLING_NODE_KEY", &admin_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| HarnessError::Start(format!("data-plane process: {e}")))?;
        let stdout = child.stdout.take();
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = StdBufReader::new(out).read_line(&mut line);
            }
            line
        });
        let line = match tokio::time::timeout(Duration::from_secs(30), ready).await {
            Ok(Ok(l)) => l,
            _ => String::new(),
        };
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .map(str::to_owned);
        let Some(http) = http else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Start(format!(
                "data-plane process did not start (said {line:?})"
            )));
        };
        let local = LocalStack {
            _source: source,
            control,
            dataplane: child,
            _dir: dir,
        };
        let mut admin = admin_client(&control_url, &admin_key).await?;
        let source_url = local._source.url();
        let created = admin
            .create_broadcast(CreateBroadcastRequest {
                name: "loadtest-run".into(),
                source_url,
                chunk_duration_ms: cfg.chunk_ms,
                substreams: cfg.substreams,
                public: true,
            })
            .await
            .map_err(|s| HarnessError::Admin(format!("CreateBroadcast: {}", s.message())))?
            .into_inner();
        // The node registers on its own; StartBroadcast needs an alive node.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin
                .start_broadcast(BroadcastRef {
                    id: created.id.clone(),
                })
                .await
            {
                Ok(_) => break,
                Err(s) if Instant::now() >= deadline => {
                    return Err(HarnessError::Admin(format!(
                        "StartBroadcast: {}",
                        s.message()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let mut stack = Stack {
            control_url,
            broadcast_id: created.id.clone(),
            stream_kbps: None,
            admin: Some(admin),
            pattern_seed: cfg.check_identity.then_some(SOURCE_SEED),
            metrics_url: split_http(&format!("http://{http}")),
            local: Some(local),
        };
        stack.stream_kbps = stack.wait_live().await?;
        Ok(stack)
    }

    /// Waits until the broadcast is live and returns its delivered stream rate once the
    /// data plane has measured it over at least a second of chunks (`None` if it has not
    /// within the wait).
    async fn wait_live(&self) -> Result<Option<u32>, HarnessError> {
        let Some(admin) = &self.admin else {
            return Ok(None);
        };
        let mut live_at: Option<Instant> = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let b = admin
                .clone()
                .get_broadcast(BroadcastRef {
                    id: self.broadcast_id.clone(),
                })
                .await
                .map_err(|s| HarnessError::Admin(format!("GetBroadcast: {}", s.message())))?
                .into_inner();
            if b.source_health == SourceHealth::Up as i32
                && b.last_seq >= 1
                && !b.node_wire_addr.is_empty()
            {
                let since = *live_at.get_or_insert_with(Instant::now);
                // The rate is a window average the data plane reports with its
                // heartbeat: wait for one covering a second of chunks, or give up on
                // it after 5 s (the budgets then use the payload rate).
                if b.stream_kbps > 0 && b.last_seq >= 4 {
                    return Ok(Some(b.stream_kbps));
                }
                if since.elapsed() >= Duration::from_secs(5) {
                    tracing::warn!("no measured stream rate; budgets use the payload bitrate");
                    return Ok(None);
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Start(format!(
                    "broadcast {} not live after 30 s (health {}, error {:?}, last_seq {})",
                    b.id, b.source_health, b.source_error, b.last_seq
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn egress(&self) -> Option<u64> {
        let (hostport, host) = self.metrics_url.as_ref()?;
        scrape_wire_egress(hostport, host).await
    }

    async fn grid(&self) -> Option<serde_json::Value> {
        let admin = self.admin.as_ref()?;
        let b = admin
            .clone()
            .get_broadcast(BroadcastRef {
                id: self.broadcast_id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        Some(serde_json::json!({
            "peers": b.peers,
            "demand_slots": b.demand_slots,
            "peer_supply_slots": b.peer_supply_slots,
            "booster_slots": b.booster_slots,
            "booster_kbps": b.booster_kbps,
            "fluid_bound_kbps": b.fluid_bound_kbps,
            "peer_share": b.peer_share,
            "max_depth": b.max_depth,
        }))
    }

    fn dataplane_pid(&self) -> Option<u32> {
        self.local.as_ref().map(|l| l.dataplane.id())
    }

    async fn shutdown(self) {
        if let Some(mut local) = self.local {
            // Closing its stdin stops the data-plane process.
            drop(local.dataplane.stdin.take());
            let mut child = local.dataplane;
            let waited = tokio::task::spawn_blocking(move || {
                for _ in 0..100 {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            });
            let _ = waited.await;
            let _ = tokio::time::timeout(Duration::from_secs(15), local.control.shutdown()).await;
        }
    }
}

/// Sums `starling_dataplane_sent_bytes_total{kind="wire_*"}` from a data plane's
/// `/metrics`.
pub async fn scrape_wire_egress(hostport: &str, host: &str) -> Option<u64> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()??;
    let mut sum = None;
    for line in text.lines() {
        if let Some(v) = line
            .strip_prefix("starling_dataplane_sent_bytes_total{kind=\"wire_")
            .and_then(|rest| rest.rsplit_once(' '))
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        {
            *sum.get_or_insert(0u64) += v as u64;
        }
    }
    sum
}

/// The data-plane child process (`starling-loadtest dataplane`): starts a node
/// registered with `control_url`, prints `ready wire=ADDR http=ADDR` on stdout, and
/// runs until its stdin closes (the coordinator stopped or died).
pub fn dataplane_child(
    control_url: String,
    cores: usize,
    capacity_viewers: u32,
    node_key: Option<&str>,
) -> Result<(), HarnessError> {
    let node_key = node_key
        .map(starling_dataplane::NodeKey::new)
        .transpose()
        .map_err(|e| HarnessError::Start(format!("node key: {e}")))?;
    let cfg = starling_dataplane::Config {
        node_key,
        control_url: Some(control_url),
        wire_listen: ([127, 0, 0, 1], 0).into(),
        http_listen: ([127, 0, 0, 1], 0).into(),
        advertise_host: "127.0.0.1".into(),
        node_name: "loadtest-run-node".into(),
        cores: cores.max(1),
        io_memory_kib: 512,
        capacity_viewers,
        limits: crate::deployment::loopback_limits(),
        ..starling_dataplane::Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| HarnessError::Start(format!("tokio: {e}")))?;
    let node = rt
        .block_on(async {
            tokio::task::spawn_blocking(move || starling_dataplane::Node::start(cfg)).await
        })
        .map_err(|e| HarnessError::Start(format!("data plane: {e}")))?
        .map_err(|e| HarnessError::Start(format!("data plane: {e}")))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "ready wire={} http={}",
            node.wire_addr(),
            node.http_addr()
        );
        let _ = out.flush();
    }
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    node.shutdown();
    let _ = node.join();
    drop(rt);
    Ok(())
}

struct WorkerLink {
    writer: OwnedWriteHalf,
    pid: u32,
    host: String,
    peers: usize,
    latest: Option<WorkerSample>,
    fin: Option<WorkerFinal>,
    gone: bool,
}

enum Event {
    Msg(usize, Box<FromWorker>),
    Gone(usize),
}

async fn tell(w: &mut WorkerLink, msg: &ToWorker) -> bool {
    let Ok(mut line) = serde_json::to_vec(msg) else {
        return false;
    };
    line.push(b'\n');
    w.writer.write_all(&line).await.is_ok()
}

fn share(peers: usize, workers: usize, w: usize) -> usize {
    peers / workers + usize::from(w < peers % workers)
}

fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn hist_percentile(hist: &BTreeMap<u64, u64>, q: f64) -> f64 {
    let total: u64 = hist.values().sum();
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total.max(1));
    let mut seen = 0;
    for (b, n) in hist {
        seen += n;
        if seen >= rank {
            return ((b + 1) * LAG_BUCKET_MS) as f64;
        }
    }
    0.0
}

/// Runs a whole load test and returns the merged report.
pub async fn run(cfg: RunConfig) -> Result<RunReport, HarnessError> {
    if cfg.peers == 0 {
        return Err(HarnessError::Config("--peers must be at least 1".into()));
    }
    let workers = cfg.worker_count();
    if workers > 254 {
        return Err(HarnessError::Config(
            "at most 254 workers (one 127.x/16 block each)".into(),
        ));
    }
    if cfg.remote_workers > workers {
        return Err(HarnessError::Config(
            "--remote-workers exceeds --workers".into(),
        ));
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| HarnessError::Start(format!("listen {}: {e}", cfg.listen)))?;
    let coord_addr = listener
        .local_addr()
        .map_err(|e| HarnessError::Start(format!("listen: {e}")))?;
    let stack = Stack::start(&cfg).await?;
    let say = |s: String| {
        if cfg.progress {
            eprintln!("{s}");
        }
    };
    say(format!(
        "starling run: control plane {}, broadcast {}, {} peers over {} workers, coordinator {}",
        stack.control_url, stack.broadcast_id, cfg.peers, workers, coord_addr
    ));
    let result = drive(&cfg, &stack, listener, coord_addr, workers).await;
    stack.shutdown().await;
    result
}

async fn drive(
    cfg: &RunConfig,
    stack: &Stack,
    listener: TcpListener,
    coord_addr: SocketAddr,
    workers: usize,
) -> Result<RunReport, HarnessError> {
    // Spawn the local workers.
    let local = workers - cfg.remote_workers;
    let exe = exe(cfg)?;
    let mut children: Vec<Child> = Vec::new();
    let connect_to = if coord_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], coord_addr.port()))
    } else {
        coord_addr
    };
    for _ in 0..local {
        match Command::new(&exe)
            .args(["worker", "--coordinator", &connect_to.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
        {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(children).await;
                return Err(HarnessError::Start(format!("worker process: {e}")));
            }
        }
    }
    if cfg.remote_workers > 0 {
        eprintln!(
            "waiting for {} remote workers: starling-loadtest worker --coordinator {}",
            cfg.remote_workers, coord_addr
        );
    }
    // Accept them all.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut links: Vec<WorkerLink> = Vec::new();
    let accept_for = if cfg.remote_workers > 0 {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(60)
    };
    let accept_deadline = Instant::now() + accept_for;
    while links.len() < workers {
        let accepted = tokio::time::timeout_at(accept_deadline, listener.accept()).await;
        let Ok(Ok((stream, _))) = accepted else {
            kill_all(children).await;
            return Err(HarnessError::Start(format!(
                "only {} of {workers} workers connected",
                links.len()
            )));
        };
        let _ = stream.set_nodelay(true);
        let (rd, writer) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        let Ok(Ok(Some(line))) = ready else { continue };
        let Ok(FromWorker::Ready { pid, host }) = serde_json::from_str(&line) else {
            continue;
        };
        let id = links.len();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<FromWorker>(&line) {
                    Ok(m) => {
                        if tx.send(Event::Msg(id, Box::new(m))).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(worker = id, "bad message: {e}"),
                }
            }
            let _ = tx.send(Event::Gone(id));
        });
        links.push(WorkerLink {
            writer,
            pid,
            host,
            peers: share(cfg.peers, workers, id),
            latest: None,
            fin: None,
            gone: false,
        });
    }
    drop(tx);
    let mut report_errors: Vec<String> = Vec::new();
    for (w, link) in links.iter_mut().enumerate() {
        let hello = Hello {
            worker: w,
            control_url: stack.control_url.clone(),
            broadcast_id: stack.broadcast_id.clone(),
            stream_kbps: stack.stream_kbps.unwrap_or(cfg.bitrate_kbps),
            pattern_seed: stack.pattern_seed,
            peers: link.peers,
            index_offset: w * ADDRESS_BLOCK,
            upload_profile: cfg.upload.multiples.clone(),
            join_rate: cfg.join_rate * link.peers as f64 / cfg.peers as f64,
            target_lag_ms: cfg.target_lag.map(|d| d.as_millis() as u64),
            sample_ms: 1000,
            shared_signature_cache: cfg.shared_signature_cache,
        };
        if !tell(link, &ToWorker::Hello(hello)).await {
            report_errors.push(format!("worker {w}: hello not delivered"));
        }
    }
    let egress0 = stack.egress().await;
    let t0 = Instant::now();
    for link in links.iter_mut() {
        let _ = tell(link, &ToWorker::Start).await;
    }

    // Progress, ramp, steady phase, churn.
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ramp_limit: Instant =
        t0 + Duration::from_secs_f64(if cfg.join_rate > 0.0 {
            cfg.peers as f64 / cfg.join_rate
        } else {
            0.0
        }) + Duration::from_secs(120);
    let mut busy = MachineBusy::new();
    let mut held_since: Option<Instant> = None;
    // What the workers were last told (a closed ramp stays held: no resume is sent).
    let mut holding = false;
    let mut ramp_held = Duration::ZERO;
    let mut admission_closed_at: Option<usize> = None;
    let mut steady_from: Option<Instant> = None;
    let mut churn_due = 0.0;
    // The progress line's current server rate.
    let mut recent = crate::report::RecentRate::default();
    let mut churn_rr = 0usize;
    let mut churn_sent = 0usize;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                report_errors.push("interrupted (Ctrl-C)".into());
                break;
            }
            ev = rx.recv() => {
                match ev {
                    Some(Event::Msg(w, m)) => match *m {
                        FromWorker::Sample(s) => links[w].latest = Some(s),
                        FromWorker::Final(f) => links[w].fin = Some(f),
                        FromWorker::Ready { .. } => {}
                    },
                    Some(Event::Gone(w)) if !links[w].gone => {
                        links[w].gone = true;
                        report_errors.push(format!(
                            "worker {w} (pid {}) disconnected during the run",
                            links[w].pid
                        ));
                    }
                    Some(Event::Gone(_)) | None => {}
                }
                if links.iter().all(|l| l.gone) {
                    break;
                }
                continue;
            }
        }
        let now = Instant::now();
        let samples: Vec<WorkerSample> = links.iter().filter_map(|l| l.latest.clone()).collect();
        let total: usize = samples.iter().map(|s| s.peers_total).sum();
        let joining: usize = samples.iter().map(|s| s.joining).sum();
        let load = busy.sample();
        if steady_from.is_none() && cfg.max_busy > 0.0 {
            match (held_since, load) {
                (None, Some(b)) if b >= cfg.max_busy => held_since = Some(now),
                (Some(since), Some(b)) if b < cfg.max_busy - 0.15 => {
                    held_since = None;
                    ramp_held += now - since;
                }
                _ => {}
            }
            let hold = held_since.is_some();
            if hold != holding {
                holding = hold;
                for link in links.iter_mut().filter(|l| !l.gone) {
                    let _ = tell(link, &ToWorker::Hold { hold }).await;
                }
            }
            if let Some(since) = held_since {
                // A held ramp is not a slow deployment: the deadline moves with it.
                ramp_limit += Duration::from_secs(1);
                if now - since >= ADMISSION_CLOSE {
                    let active: usize = samples.iter().map(|s| s.active).sum();
                    admission_closed_at = Some(active);
                    ramp_held += now - since;
                    held_since = None;
                    steady_from = Some(now);
                }
            }
        }
        if steady_from.is_none() {
            let all_reported = samples.len() == links.iter().filter(|l| !l.gone).count();
            if (all_reported && total >= cfg.peers && joining == 0) || now >= ramp_limit {
                if now >= ramp_limit {
                    report_errors.push(format!(
                        "join ramp did not complete in time ({total} added, {joining} still joining)"
                    ));
                }
                steady_from = Some(now);
            }
        }
        if let Some(s) = steady_from {
            if now >= s + cfg.duration {
                break;
            }
            churn_due += cfg.churn_per_min / 60.0;
            let n = churn_due.floor() as usize;
            churn_due -= n as f64;
            let alive: Vec<usize> = (0..links.len()).filter(|w| !links[*w].gone).collect();
            if !alive.is_empty() {
                let mut per = vec![0usize; links.len()];
                for _ in 0..n {
                    per[alive[churn_rr % alive.len()]] += 1;
                    churn_rr += 1;
                }
                for (w, count) in per.into_iter().enumerate() {
                    if count > 0 && tell(&mut links[w], &ToWorker::Churn { count }).await {
                        churn_sent += count;
                    }
                }
            }
        }
        if cfg.progress {
            let egress = stack.egress().await;
            let egress_b = egress.zip(egress0).map(|(a, b)| a.saturating_sub(b));
            let line = progress_line(
                now - t0,
                cfg,
                stack.stream_kbps.unwrap_or(cfg.bitrate_kbps),
                &samples,
                egress_b,
                &mut recent,
            );
            if tty {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        }
    }
    if cfg.progress && tty {
        eprintln!();
    }
    // Stop: egress and the end of the window first, then the workers' finals.
    let egress1 = stack.egress().await;
    let end = Instant::now();
    let dp_proc = stack.dataplane_pid().map(ProcStats::of_pid);
    for link in links.iter_mut() {
        if !link.gone {
            let _ = tell(link, &ToWorker::Stop).await;
        }
    }
    let fin_deadline = Instant::now() + Duration::from_secs(60);
    while links.iter().any(|l| l.fin.is_none() && !l.gone) {
        match tokio::time::timeout_at(fin_deadline, rx.recv()).await {
            Ok(Some(Event::Msg(w, m))) => match *m {
                FromWorker::Final(f) => links[w].fin = Some(f),
                FromWorker::Sample(s) => links[w].latest = Some(s),
                FromWorker::Ready { .. } => {}
            },
            Ok(Some(Event::Gone(w))) => links[w].gone = true,
            Ok(None) | Err(_) => break,
        }
    }
    let grid = stack.grid().await;
    // Let the workers make their peers leave and exit; then make sure they are gone.
    let wait_children = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        for mut c in children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    });
    let _ = wait_children.await;

    let coordinator = ProcStats::current();
    let mut r = merge(
        cfg,
        stack.stream_kbps.unwrap_or(cfg.bitrate_kbps),
        workers,
        &links,
        (end - t0).as_secs_f64(),
        steady_from.map_or(0.0, |s| (s - t0).as_secs_f64()),
        egress0.zip(egress1).map(|(a, b)| b.saturating_sub(a)),
        coordinator,
        dp_proc,
    );
    r.grid = grid;
    r.ramp_held_s = ramp_held.as_secs_f64();
    r.admission_closed_at_peers = admission_closed_at;
    // The machine, not the grid, capped the audience.
    r.machine_bound |= admission_closed_at.is_some();
    for e in report_errors {
        r.error(e);
    }
    if churn_sent > 0 {
        tracing::info!(churn_sent, "churn commands sent");
    }
    Ok(r)
}

async fn kill_all(children: Vec<Child>) {
    let _ = tokio::task::spawn_blocking(move || {
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    })
    .await;
}

/// A ramp held this long in a row ends ([`RunConfig::max_busy`]).
pub const ADMISSION_CLOSE: Duration = Duration::from_secs(20);

/// This machine's busy fraction over the last sample interval, from `/proc/stat`.
struct MachineBusy {
    last: Option<(u64, u64)>,
}

impl MachineBusy {
    fn new() -> Self {
        MachineBusy { last: Self::read() }
    }

    /// (busy, total) jiffies of all cores.
    fn read() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Some((total.saturating_sub(idle), total))
    }

    /// Busy fraction since the previous call (`None` without `/proc/stat`).
    fn sample(&mut self) -> Option<f64> {
        let now = Self::read()?;
        let prev = self.last.replace(now)?;
        let total = now.1.saturating_sub(prev.1);
        (total > 0).then(|| now.0.saturating_sub(prev.0) as f64 / total as f64)
    }
}

fn progress_line(
    t: Duration,
    cfg: &RunConfig,
    stream_kbps: u32,
    samples: &[WorkerSample],
    egress: Option<u64>,
    recent: &mut crate::report::RecentRate,
) -> String {
    let sum = |f: fn(&WorkerSample) -> u64| samples.iter().map(f).sum::<u64>();
    let active = sum(|s| s.active as u64);
    let joining = sum(|s| s.joining as u64);
    let failed = sum(|s| (s.join_failures + s.closed) as u64);
    let from_peers = sum(|s| s.bytes_from_peers);
    let from_server = sum(|s| s.bytes_from_server);
    let played = sum(|s| s.chunks_played);
    let skipped = sum(|s| s.chunks_skipped);
    let all = from_peers + from_server;
    let share = if all == 0 {
        0.0
    } else {
        from_peers as f64 / all as f64
    };
    let continuity = if played + skipped == 0 {
        1.0
    } else {
        played as f64 / (played + skipped) as f64
    };
    let egress_b = egress.unwrap_or(from_server);
    // Stream copies the server sends now (over the last 5 s), not since the start: the
    // start-up bursts of a ramp would otherwise weigh on it long after.
    let streams = recent.streams(t, egress_b, stream_kbps);
    format!(
        "t={:>5.0}s peers {}/{} (joining {}, failed {}) share {:>5.1}% continuity {:.5} server {} MB ({:.2} streams now) stalls {} workers {}",
        t.as_secs_f64(),
        active,
        cfg.peers,
        joining,
        failed,
        share * 100.0,
        continuity,
        egress_b / 1_000_000,
        streams,
        sum(|s| s.stalls),
        samples.len()
    )
}

#[allow(clippy::too_many_arguments)]
fn merge(
    cfg: &RunConfig,
    stream_kbps: u32,
    workers: usize,
    links: &[WorkerLink],
    duration_s: f64,
    ramp_s: f64,
    dataplane_egress: Option<u64>,
    coordinator: ProcStats,
    dataplane: Option<ProcStats>,
) -> RunReport {
    let mut r = RunReport {
        peers: cfg.peers,
        peers_joined: 0,
        initial_peers_joined: 0,
        peers_active_at_end: 0,
        peers_left: 0,
        join_failures: 0,
        peers_closed: 0,
        workers,
        duration_s,
        ramp_s,
        steady_s: (duration_s - ramp_s).max(0.0),
        ramp_held_s: 0.0,
        admission_closed_at_peers: None,
        bitrate_kbps: cfg.bitrate_kbps,
        stream_kbps,
        chunk_ms: cfg.chunk_ms,
        substreams: cfg.substreams,
        shared_signature_cache: cfg.shared_signature_cache,
        upload_profile: cfg.upload.multiples.clone(),
        join_rate: cfg.join_rate,
        churn_per_min: cfg.churn_per_min,
        peer_share: 0.0,
        continuity: 1.0,
        startup_ms: P3::default(),
        lag_ms: None,
        stalls: 0,
        chunks_skipped: 0,
        chunks_played: 0,
        server_egress_bytes: 0,
        server_egress_source: String::new(),
        fluid_bound_bytes: 0.0,
        server_egress_over_bound: 0.0,
        upload_over_budget_bytes: 0.0,
        server_egress_over_bound_at_budget: 0.0,
        bytes_from_server: 0,
        bytes_from_peers: 0,
        bytes_uploaded: 0,
        upload_mean: 0.0,
        join_rpc_ms: P2::default(),
        cpu_s: BTreeMap::new(),
        cpu_cores: 0,
        cpu_utilization: 0.0,
        machine_bound: false,
        max_rss_bytes: BTreeMap::new(),
        processes: Vec::new(),
        not_identical: 0,
        output_bytes_checked: 0,
        parent_changes: 0,
        reparent_ms: LatencyFigures::default(),
        reparent_answer_ms: LatencyFigures::default(),
        grid: None,
        stays: Vec::new(),
        errors: Vec::new(),
        error_count: 0,
    };
    let mut startups = Vec::new();
    let mut joins: Vec<f64> = Vec::new();
    let mut lag: BTreeMap<u64, u64> = BTreeMap::new();
    let mut records: Vec<&PeerRecord> = Vec::new();
    let mut worker_errors = Vec::new();
    let mut reparent = starling_grid::peer::LatencySummary::default();
    let mut reparent_answer = starling_grid::peer::LatencySummary::default();
    r.processes.push(ProcessReport {
        role: "coordinator".into(),
        host: String::new(),
        pid: coordinator.pid,
        peers: 0,
        cpu_s: coordinator.cpu_s,
        max_rss_bytes: coordinator.max_rss_bytes,
    });
    if let Some(d) = dataplane {
        r.processes.push(ProcessReport {
            role: "dataplane".into(),
            host: String::new(),
            pid: d.pid,
            peers: 0,
            cpu_s: d.cpu_s,
            max_rss_bytes: d.max_rss_bytes,
        });
    }
    for (w, link) in links.iter().enumerate() {
        let Some(fin) = &link.fin else {
            worker_errors.push(format!(
                "worker {w} (pid {}) sent no final report: its peers are missing from the figures",
                link.pid
            ));
            if let Some(s) = &link.latest {
                r.processes.push(ProcessReport {
                    role: format!("worker-{w}"),
                    host: link.host.clone(),
                    pid: link.pid,
                    peers: link.peers,
                    cpu_s: s.process.cpu_s,
                    max_rss_bytes: s.process.max_rss_bytes,
                });
            }
            continue;
        };
        let s = &fin.sample;
        r.peers_active_at_end += s.active;
        r.peers_left += s.left;
        r.join_failures += s.join_failures;
        r.peers_closed += s.closed;
        r.not_identical += s.not_identical;
        r.output_bytes_checked += s.output_bytes;
        r.parent_changes += s.parent_changes;
        reparent.merge(&s.reparent.to_summary());
        reparent_answer.merge(&s.reparent_answer.to_summary());
        r.processes.push(ProcessReport {
            role: format!("worker-{w}"),
            host: link.host.clone(),
            pid: link.pid,
            peers: link.peers,
            cpu_s: s.process.cpu_s,
            max_rss_bytes: s.process.max_rss_bytes,
        });
        for (b, n) in &fin.lag_hist {
            *lag.entry(*b).or_default() += n;
        }
        for p in &fin.peers {
            records.push(p);
            if p.joined_s.is_some() && p.index.saturating_sub(w * ADDRESS_BLOCK) < link.peers {
                r.initial_peers_joined += 1;
            }
        }
        for e in &fin.errors {
            worker_errors.push(format!("worker {w}: {e}"));
        }
    }
    let mut budget_sum = 0.0;
    let mut wire_uploaded = 0u64;
    for p in &records {
        r.bytes_from_server += p.bytes_from_server;
        r.bytes_from_peers += p.bytes_from_peers;
        r.bytes_uploaded += p.bytes_uploaded;
        wire_uploaded += p.wire_bytes_uploaded;
        r.chunks_played += p.chunks_played;
        r.chunks_skipped += p.chunks_skipped;
        r.stalls += p.stalls;
        if let Some(ms) = p.startup_ms {
            startups.push(ms);
        }
        if let Some(ms) = p.join_rpc_ms {
            joins.push(ms as f64);
        }
        if let Some(j) = p.joined_s {
            r.peers_joined += 1;
            budget_sum += f64::from(p.upload_kbps);
            r.stays.push((j, p.left_s, p.upload_kbps));
        }
    }
    let all = r.bytes_from_server + r.bytes_from_peers;
    if all > 0 {
        r.peer_share = r.bytes_from_peers as f64 / all as f64;
    }
    if r.chunks_played + r.chunks_skipped > 0 {
        r.continuity = r.chunks_played as f64 / (r.chunks_played + r.chunks_skipped) as f64;
    }
    if r.peers_joined > 0 && stream_kbps > 0 {
        r.upload_mean = budget_sum / r.peers_joined as f64 / f64::from(stream_kbps);
    }
    r.reparent_ms = LatencyFigures::of(&reparent);
    r.reparent_answer_ms = LatencyFigures::of(&reparent_answer);
    r.startup_ms = Percentiles::of(startups).into();
    joins.sort_by(f64::total_cmp);
    r.join_rpc_ms = P2 {
        p50: nearest_rank(&joins, 0.50),
        p99: nearest_rank(&joins, 0.99),
    };
    if !lag.is_empty() {
        r.lag_ms = Some(P2 {
            p50: hist_percentile(&lag, 0.50),
            p99: hist_percentile(&lag, 0.99),
        });
    }
    match dataplane_egress {
        Some(b) => {
            r.server_egress_bytes = b;
            r.server_egress_source = "dataplane_metrics".into();
        }
        None => {
            r.server_egress_bytes = r.bytes_from_server;
            r.server_egress_source = "sdk_bytes_from_server".into();
        }
    }
    let stays: Vec<Stay> = r
        .stays
        .iter()
        .map(|&(joined_s, left_s, upload_kbps)| Stay {
            joined_s,
            left_s,
            upload_kbps,
        })
        .collect();
    r.fluid_bound_bytes = fluid_bound_bytes(stream_kbps, &stays, duration_s);
    if r.fluid_bound_bytes > 0.0 {
        r.server_egress_over_bound = r.server_egress_bytes as f64 / r.fluid_bound_bytes;
    }
    let budget_bytes: f64 = stays
        .iter()
        .map(|s| {
            let to = s.left_s.unwrap_or(duration_s).min(duration_s);
            f64::from(s.upload_kbps) * 125.0 * (to - s.joined_s.min(to)).max(0.0)
        })
        .sum();
    r.upload_over_budget_bytes = (wire_uploaded as f64 - budget_bytes).max(0.0);
    if r.fluid_bound_bytes > 0.0 {
        r.server_egress_over_bound_at_budget =
            (r.server_egress_bytes as f64 + r.upload_over_budget_bytes) / r.fluid_bound_bytes;
    }
    let mut total_cpu = 0.0;
    let mut local_cpu = 0.0;
    let mut max_rss = 0;
    let here = crate::worker::hostname();
    for p in &r.processes {
        r.cpu_s.insert(p.role.clone(), p.cpu_s);
        r.max_rss_bytes.insert(p.role.clone(), p.max_rss_bytes);
        total_cpu += p.cpu_s;
        if p.host.is_empty() || p.host == here {
            local_cpu += p.cpu_s;
        }
        max_rss = max_rss.max(p.max_rss_bytes);
    }
    r.cpu_s.insert("total".into(), total_cpu);
    r.cpu_cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if duration_s > 0.0 {
        r.cpu_utilization = local_cpu / (duration_s * r.cpu_cores as f64);
    }
    r.machine_bound = r.cpu_utilization >= 0.85;
    r.max_rss_bytes.insert("max".into(), max_rss);
    if r.initial_peers_joined < cfg.peers {
        r.error(format!(
            "{} of {} peers joined",
            r.initial_peers_joined, cfg.peers
        ));
    }
    for e in worker_errors {
        r.error(e);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_the_servers_current_rate_not_the_average_since_the_start() {
        // 80 kbit/s stream; the server sends a 1 MB start-up burst in the first second,
        // then exactly two copies of the stream (20,000 B/s).
        let cfg = RunConfig::default();
        let mut recent = crate::report::RecentRate::default();
        let mut line = String::new();
        for t in 0..=20u64 {
            let egress = 1_000_000 + 20_000 * t;
            line = progress_line(
                Duration::from_secs(t),
                &cfg,
                80,
                &[],
                Some(egress),
                &mut recent,
            );
        }
        assert!(line.contains("(2.00 streams now)"), "{line}");
        assert!(recent.len() <= 7, "{} samples kept", recent.len());
    }

    #[test]
    fn shares_and_percentiles() {
        let s: Vec<usize> = (0..3).map(|w| share(10, 3, w)).collect();
        assert_eq!(s, vec![4, 3, 3]);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            (nearest_rank(&v, 0.5), nearest_rank(&v, 0.99)),
            (50.0, 99.0)
        );
        let mut h = BTreeMap::new();
        h.insert(5, 50); // 50..60 ms
        h.insert(100, 50); // 1000..1010 ms
        assert_eq!(hist_percentile(&h, 0.5), 60.0);
        assert_eq!(hist_percentile(&h, 0.99), 1010.0);
        assert_eq!(
            split_http("http://127.0.0.1:7180/x"),
            Some(("127.0.0.1:7180".into(), "127.0.0.1".into()))
        );
    }

    #[test]
    fn proc_stats_of_self() {
        let p = ProcStats::current();
        assert_eq!(p.pid, std::process::id());
        assert!(p.max_rss_bytes > 0 && p.rss_bytes > 0);
    }
}
