//! `starling-loadtest`: drives real SDK peers against a Starling deployment.
//!
//! `run` is the load test: a deployment (source and control plane in this process, the
//! data plane in a child process) and `--peers` SDK peers spread over worker processes
//! (`worker`, spawned from this executable, or started by hand on other machines with
//! `starling-loadtest worker --coordinator HOST:PORT`), merged into one report.
//!
//! `demo` runs everything in-process (embedded SQLite, synthetic source, one data-plane
//! node, N peers on loopback) until Ctrl-C or `--duration`, with a progress line on
//! stderr every second and a short report at the end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use starling_loadtest::run::{External, RunConfig};
use starling_loadtest::worker::WorkerConfig;
use starling_loadtest::{Deployment, DeploymentConfig, Report, Swarm, SwarmConfig, UploadProfile};
use starling_telemetry::logging::LogConfig;

#[derive(Debug, Parser)]
#[command(
    name = "starling-loadtest",
    version,
    about = "Starling load test and demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in-process: control plane (embedded SQLite), data plane, synthetic
    /// source and a swarm of SDK peers; runs until Ctrl-C or --duration.
    Demo(DemoArgs),
    /// The load test: a deployment (or --control), --peers SDK peers spread over
    /// worker processes, a progress line every second, and a merged report (text on
    /// stdout, JSON with --json).
    Run(Box<RunArgs>),
    /// A worker process of `run`: connects to the coordinator, joins its share of the
    /// peers, reports samples, obeys start/stop/churn. `run` spawns these itself; start
    /// one by hand on another machine to add it to a run started with
    /// `--remote-workers` and `--listen 0.0.0.0:PORT`.
    Worker(WorkerArgs),
    /// The data-plane child process of `run` (internal).
    #[command(hide = true)]
    Dataplane(DataplaneArgs),
    /// The control plane's benchmark: starts `starling-controlplane` as a child (or
    /// uses --control), joins --sessions viewers over raw gRPC at --concurrency, then
    /// holds them for --steady seconds by the session stream (--mode stream) or unary
    /// heartbeats (--mode heartbeat); prints joins/s, latency, control-plane CPU per
    /// join and per viewer-second, RSS per session (a table, or JSON with --json).
    ControlBench(Box<ControlBenchArgs>),
    /// The library control plane as control-bench's child process (internal).
    #[command(name = "bench-controlplane", hide = true)]
    BenchControlplane(BenchControlplaneArgs),
    /// Writes a THROWAWAY certificate authority and certificates into DIR, to try TLS
    /// without a real CA: ca.pem (what clients trust: --ca-file), server.crt and
    /// server.key (--tls-cert, --tls-key: leaf and intermediate, for --name), node.crt
    /// and node.key (a data-plane client certificate: --tls-client-cert/--tls-client-key;
    /// the control plane's --tls-client-ca is ca.pem). Never for production.
    TlsCerts(TlsCertsArgs),
}

#[derive(Debug, clap::Args)]
struct TlsCertsArgs {
    /// Directory to write the files into (created if missing).
    dir: PathBuf,
    /// Names (DNS names or IP addresses) the server certificate is valid for.
    #[arg(long = "name", default_values = ["localhost", "127.0.0.1", "::1"])]
    names: Vec<String>,
}

fn tls_certs(a: &TlsCertsArgs) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&a.dir)?;
    let pki = starling_testpki::Pki::new("starling throwaway")?;
    let names: Vec<&str> = a.names.iter().map(String::as_str).collect();
    pki.server(&names, 1)?.write_to(&a.dir, "server")?;
    pki.client("starling-node", 2)?.write_to(&a.dir, "node")?;
    starling_testpki::write(&a.dir.join("ca.pem"), &pki.root_pem())?;
    eprintln!(
        "wrote {}/{{ca.pem,server.crt,server.key,node.crt,node.key}} (server names {:?}); \
         THROWAWAY, never for production",
        a.dir.display(),
        a.names
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
struct ControlBenchArgs {
    /// Sessions joined, then held through the steady phase.
    #[arg(long, env = "STARLING_BENCH_SESSIONS", default_value_t = 10_000)]
    sessions: usize,
    /// Join calls in flight at once.
    #[arg(long, env = "STARLING_BENCH_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the join calls share.
    #[arg(long, env = "STARLING_BENCH_CONNECTIONS", default_value_t = 8)]
    connections: usize,
    /// Sessions sharing one HTTP/2 connection in the steady phase (keep it at or below
    /// the control plane's concurrent-streams limit; 100,000 sessions at 200 = 500
    /// connections, well within 20,000 open files).
    #[arg(
        long,
        env = "STARLING_BENCH_SESSIONS_PER_CONNECTION",
        default_value_t = 200
    )]
    sessions_per_connection: usize,
    /// How sessions stay alive: `stream` (ViewerService.Session) or `heartbeat` (unary
    /// Heartbeat every heartbeat_interval_ms, the pre-stream SDK).
    #[arg(long, env = "STARLING_BENCH_MODE", default_value = "stream", value_parser = ["stream", "heartbeat"])]
    mode: String,
    /// Steady phase length, seconds (measured after a 2 s settling period).
    #[arg(long, env = "STARLING_BENCH_STEADY_S", default_value_t = 30)]
    steady: u64,
    /// Leaves per second during the steady phase, each followed by a new join (so
    /// updates get pushed); 0 = none.
    #[arg(long, env = "STARLING_BENCH_CHURN", default_value_t = 0.0)]
    churn: f64,
    /// The control-plane executable to start (default: `starling-controlplane` next to
    /// this executable).
    #[arg(
        long,
        env = "STARLING_BENCH_CONTROLPLANE_BIN",
        conflicts_with = "control"
    )]
    controlplane_bin: Option<std::path::PathBuf>,
    /// Start the library control plane in a child process of this executable instead
    /// of the binary (tests; builds without the binary).
    #[arg(long, env = "STARLING_BENCH_EMBEDDED", conflicts_with_all = ["controlplane_bin", "control"])]
    embedded_controlplane: bool,
    /// Database of the started control plane: a postgres:// URL (use a fresh database:
    /// the control plane migrates it and the bench adds one broadcast and its
    /// sessions). Default: a fresh SQLite file in a temporary directory.
    #[arg(long, env = "STARLING_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// An extra flag for the started control plane (repeatable), e.g.
    /// `--cp-arg=--grpc-concurrency-per-connection=256` (the env var: space-separated).
    #[arg(
        long = "cp-arg",
        env = "STARLING_BENCH_CP_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    cp_args: Vec<String>,
    /// Forward the started control plane's stderr.
    #[arg(long, env = "STARLING_BENCH_CP_LOGS")]
    cp_logs: bool,
    /// Heartbeat interval the started control plane announces, ms.
    #[arg(long, env = "STARLING_BENCH_HEARTBEAT_MS", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Measure this already running control plane (https://HOST:PORT; needs
    /// --controlplane-pid and the admin and node keys). A started one serves TLS with
    /// a throwaway CA.
    #[arg(long, env = "STARLING_BENCH_CONTROL", requires_all = ["controlplane_pid", "admin_key"])]
    control: Option<String>,
    /// With --control: CA certificates (PEM) that verify its TLS certificate.
    #[arg(long, env = "STARLING_CA_FILE", requires = "control")]
    ca_file: Option<PathBuf>,
    /// With --control: allow an http:// URL (INSECURE: plaintext gRPC).
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
    /// With --control: its process id (CPU and RSS are read from /proc).
    #[arg(long, env = "STARLING_BENCH_CONTROLPLANE_PID")]
    controlplane_pid: Option<u32>,
    /// With --control: the admin key.
    #[arg(long, env = "STARLING_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// With --control: the node key (default: the admin key).
    #[arg(long, env = "STARLING_NODE_KEY", hide_env_values = true)]
    node_key: Option<String>,
    /// Stream rate the emulated data-plane node reports, kbit/s (sizes child slots).
    #[arg(long, env = "STARLING_BENCH_STREAM_KBPS", default_value_t = 1000)]
    stream_kbps: u32,
    /// Upload budgets as multiples of the stream rate, given to joins in turn (0 =
    /// does not relay).
    #[arg(
        long,
        env = "STARLING_BENCH_UPLOAD_PROFILE",
        default_value = "0,1,2,0,1.5,3"
    )]
    upload_profile: String,
    /// Substreams of the benchmark's broadcast.
    #[arg(long, env = "STARLING_BENCH_SUBSTREAMS", default_value_t = 4)]
    substreams: u32,
    /// Announce 127.0.0.1 peer addresses (passes a strict peer-addr check) instead of
    /// distinct 10.x.y.z ones.
    #[arg(long, env = "STARLING_BENCH_LOOPBACK_ADDRS")]
    loopback_addrs: bool,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long, env = "STARLING_BENCH_JSON")]
    json: bool,
    /// No progress line on stderr.
    #[arg(long, env = "STARLING_BENCH_QUIET")]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct BenchControlplaneArgs {
    #[arg(long)]
    listen: std::net::SocketAddr,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    heartbeat_interval_ms: u64,
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    #[arg(long, env = "STARLING_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accepted for the spawned binary's flag set; plaintext is what no --tls-cert means.
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
}

fn control_bench_config(
    a: ControlBenchArgs,
) -> Result<(starling_loadtest::control_bench::BenchConfig, bool), Box<dyn std::error::Error>> {
    use starling_loadtest::control_bench::{BenchConfig, Mode, PeerAddrs, Target};
    let target = match a.control {
        Some(url) => Target::External {
            transport: starling_proto::transport::Transport::from_flags(
                &url,
                a.ca_file.as_deref(),
                None,
                None,
                a.insecure_plaintext,
            )?,
            url,
            pid: a
                .controlplane_pid
                .ok_or("--control needs --controlplane-pid")?,
            node_key: a.node_key.or(a.admin_key.clone()).unwrap_or_default(),
            admin_key: a.admin_key.ok_or("--control needs --admin-key")?,
        },
        None => Target::Spawn {
            bin: if a.embedded_controlplane {
                None
            } else {
                Some(match a.controlplane_bin {
                    Some(b) => b,
                    None => std::env::current_exe()?.with_file_name("starling-controlplane"),
                })
            },
            database_url: a.database_url,
            extra_args: a.cp_args,
            show_logs: a.cp_logs,
        },
    };
    let mut cfg = BenchConfig::new(target);
    cfg.sessions = a.sessions;
    cfg.concurrency = a.concurrency;
    cfg.join_connections = a.connections;
    cfg.sessions_per_connection = a.sessions_per_connection;
    cfg.mode = if a.mode == "heartbeat" {
        Mode::Heartbeat
    } else {
        Mode::Stream
    };
    cfg.steady = Duration::from_secs(a.steady);
    cfg.churn_per_s = a.churn;
    cfg.heartbeat_interval_ms = a.heartbeat_ms;
    cfg.stream_kbps = a.stream_kbps;
    cfg.upload_profile = UploadProfile::parse(&a.upload_profile)?.multiples;
    cfg.substreams = a.substreams;
    cfg.peer_addrs = if a.loopback_addrs {
        PeerAddrs::Loopback
    } else {
        PeerAddrs::Diverse
    };
    cfg.progress = !a.quiet;
    Ok((cfg, a.json))
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Number of peers.
    #[arg(long, env = "STARLING_LOADTEST_PEERS", default_value_t = 10_000)]
    peers: usize,
    /// How peers run: `sim` (simulated peers in one worker process: the grid's peer
    /// logic per peer, real control-plane and data-plane traffic per peer, peer-to-peer
    /// frames through an in-process network with per-link latency and per-peer upload
    /// serialization) or `sockets` (real SDK peers on loopback, over --workers
    /// processes).
    #[arg(long, env = "STARLING_LOADTEST_NET", default_value = "sim",
          value_parser = ["sim", "sockets"])]
    net: String,
    /// `--net sim`: one-way peer-to-peer latency, ms, as MIN-MAX (each link draws once,
    /// uniformly; the default is one country).
    #[arg(long, env = "STARLING_LOADTEST_SIM_LATENCY_MS", default_value = "5-40")]
    sim_latency_ms: String,
    /// `--net sim`: extra delay per frame, uniform in [0, this], ms.
    #[arg(long, env = "STARLING_LOADTEST_SIM_JITTER_MS", default_value_t = 0)]
    sim_jitter_ms: u64,
    /// `--net sim`: probability that a peer-to-peer frame is lost.
    #[arg(long, env = "STARLING_LOADTEST_SIM_LOSS", default_value_t = 0.0)]
    sim_loss: f64,
    /// `--net sim`: a peer's physical uplink as a multiple of its relay budget (frames
    /// queue on it; at least 1).
    #[arg(
        long,
        env = "STARLING_LOADTEST_SIM_UPLINK_FACTOR",
        default_value_t = 2.0
    )]
    sim_uplink_factor: f64,
    /// Worker processes (default: ceil(peers / 700); a process holds ~20 open files
    /// per peer and the open-file limit is 20,000).
    #[arg(long, env = "STARLING_LOADTEST_WORKERS")]
    workers: Option<usize>,
    /// Of --workers, how many connect on their own from other machines
    /// (`starling-loadtest worker --coordinator HOST:PORT`); the rest are spawned here.
    #[arg(long, env = "STARLING_LOADTEST_REMOTE_WORKERS", default_value_t = 0)]
    remote_workers: usize,
    /// Where workers connect (use 0.0.0.0:PORT for remote workers).
    #[arg(long, env = "STARLING_LOADTEST_LISTEN", default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Steady phase after every peer has joined (e.g. `60s`, `10m`).
    #[arg(long, env = "STARLING_LOADTEST_DURATION", value_parser = starling_proto::time::parse_duration, default_value = "60s")]
    duration: Duration,
    /// Stream rate of the synthetic source, kbit/s. 64 by default (an audio-rate
    /// stream): a peer's CPU goes mostly to per-chunk work, not bytes, so a low rate
    /// buys little; about 2,000-2,500 peers fit on a 2-core machine (README).
    #[arg(long, env = "STARLING_LOADTEST_BITRATE_KBPS", default_value_t = 64)]
    bitrate_kbps: u32,
    /// Upload budgets as multiples of the stream rate as delivered (payload plus each
    /// chunk's framing and signature, as the data plane measures it), assigned to peers
    /// in turn (0 = never relays). Default mean 1.25x.
    #[arg(
        long,
        env = "STARLING_LOADTEST_UPLOAD_PROFILE",
        default_value = "0,1,2,0,1.5,3"
    )]
    upload_profile: String,
    /// Joins per second over all workers (0 = no pacing). A ceiling: each worker has at
    /// most 16 joins in flight, so a deployment that cannot keep up slows the ramp (the
    /// report's `ramp_s` shows by how much) instead of drowning in joins.
    #[arg(long, env = "STARLING_LOADTEST_JOIN_RATE", default_value_t = 100.0)]
    join_rate: f64,
    /// Leaves per minute during the steady phase, each followed by a new join.
    #[arg(long, env = "STARLING_LOADTEST_CHURN", default_value_t = 0.0)]
    churn: f64,
    /// Chunk duration, ms. (250: the SDK's scheduler is tuned for it; 500 ms chunks
    /// with the default 2 s play-out lag collapse the grid into server fetches.)
    #[arg(long, env = "STARLING_LOADTEST_CHUNK_MS", default_value_t = 250)]
    chunk_ms: u32,
    /// Substreams (K). Broadcasts default to 8 (controlplane validate.rs weighs peer
    /// share against tree depth); the load test defaults to 4, half the parent links
    /// per peer, for single-machine runs that are CPU-bound. Pass 8 to test the default.
    #[arg(long, env = "STARLING_LOADTEST_SUBSTREAMS", default_value_t = 4)]
    substreams: u32,
    /// SDK heartbeat interval, ms.
    #[arg(long, env = "STARLING_LOADTEST_HEARTBEAT_MS", default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Play-out lag behind live, ms (default: the SDK's, 1.5 s).
    #[arg(long, env = "STARLING_LOADTEST_TARGET_LAG_MS")]
    target_lag_ms: Option<u64>,
    /// Data-plane executors.
    #[arg(long, env = "STARLING_LOADTEST_DATAPLANE_CORES", default_value_t = 1)]
    dataplane_cores: usize,
    /// Skip the byte-identity check of every peer's output.
    #[arg(long, env = "STARLING_LOADTEST_NO_IDENTITY_CHECK")]
    no_identity_check: bool,
    /// Every peer checks every chunk signature itself, as a device does, instead of the
    /// peers of a process sharing a cache of signatures already found authentic.
    #[arg(long, env = "STARLING_LOADTEST_NO_SIGNATURE_CACHE")]
    no_signature_cache: bool,
    /// Admission guard, percent: while this machine is at least this busy (all cores),
    /// no new join starts; below this minus 15 the ramp resumes. Held 20 s in a row, the
    /// ramp ends with the peers admitted so far, and the report says at how many: past
    /// the load generator's own capacity every peer would starve. 0 = never hold.
    #[arg(long, env = "STARLING_LOADTEST_MAX_BUSY", default_value_t = 85.0)]
    max_busy: f64,
    /// Use this control plane instead of starting a deployment (needs --broadcast):
    /// https://HOST:PORT (http:// only with --insecure-plaintext).
    #[arg(long, env = "STARLING_LOADTEST_CONTROL")]
    control: Option<String>,
    /// With --control: CA certificates (PEM) that verify its TLS certificate, instead
    /// of the built-in web PKI roots (handed to the worker processes too).
    #[arg(long, env = "STARLING_CA_FILE", requires = "control")]
    ca_file: Option<PathBuf>,
    /// With --control: allow an http:// URL (INSECURE: plaintext gRPC).
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
    /// With --control: the live, public broadcast to join.
    #[arg(long, env = "STARLING_LOADTEST_BROADCAST", requires = "control")]
    broadcast: Option<String>,
    /// With --control: the admin key (sent as `authorization: Bearer`).
    #[arg(
        long,
        env = "STARLING_ADMIN_KEY",
        requires = "control",
        hide_env_values = true
    )]
    admin_key: Option<String>,
    /// With --control: the data plane's HTTP URL, to read its egress from /metrics.
    #[arg(long, env = "STARLING_LOADTEST_DATAPLANE_HTTP", requires = "control")]
    dataplane_http: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long, env = "STARLING_LOADTEST_JSON")]
    json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// The coordinator's HOST:PORT (printed by `run`).
    #[arg(long, env = "STARLING_LOADTEST_COORDINATOR")]
    coordinator: String,
    /// `sockets`: real SDK peers; `sim`: the simulated peers of `run --net sim` (the
    /// coordinator passes it to the worker it spawns).
    #[arg(long, env = "STARLING_LOADTEST_WORKER_NET", default_value = "sockets",
          value_parser = ["sim", "sockets"])]
    net: String,
    /// How long to keep trying to connect, seconds.
    #[arg(
        long,
        env = "STARLING_LOADTEST_CONNECT_TIMEOUT_S",
        default_value_t = 30
    )]
    connect_timeout_s: u64,
}

#[derive(Debug, clap::Args)]
struct DataplaneArgs {
    #[arg(long)]
    control: String,
    /// CA certificates (PEM) that verify the control plane's certificate.
    #[arg(long, env = "STARLING_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Allow an http:// --control (INSECURE).
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
    #[arg(long, default_value_t = 1)]
    cores: usize,
    #[arg(long, default_value_t = 20_000)]
    capacity_viewers: u32,
    /// Credential the node presents to the control plane's EdgeService.
    #[arg(long, env = "STARLING_NODE_KEY", hide_env_values = true)]
    node_key: Option<String>,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Number of peers.
    #[arg(long, env = "STARLING_LOADTEST_PEERS", default_value_t = 200)]
    peers: usize,
    /// How viewers run: `sim` (the grid's peer logic per viewer, real control-plane and
    /// data-plane traffic per viewer, peer-to-peer frames through an in-process network
    /// with per-link latency and per-peer upload serialization) or `sockets` (real SDK
    /// viewers relaying to each other over loopback sockets).
    #[arg(long, env = "STARLING_LOADTEST_NET", default_value = "sim",
          value_parser = ["sim", "sockets"])]
    net: String,
    /// Stop after this long (e.g. `20s`, `5m`, `90`); default: until Ctrl-C.
    #[arg(long, env = "STARLING_LOADTEST_DURATION", value_parser = starling_proto::time::parse_duration)]
    duration: Option<Duration>,
    /// Stream rate of the synthetic source, kbit/s.
    #[arg(long, env = "STARLING_LOADTEST_BITRATE_KBPS", default_value_t = 500)]
    bitrate_kbps: u32,
    /// Upload budgets as multiples of the stream rate as delivered (payload plus each
    /// chunk's framing and signature, as the data plane measures it), assigned to peers
    /// in turn (0 = never relays).
    #[arg(
        long,
        env = "STARLING_LOADTEST_UPLOAD_PROFILE",
        default_value = "0,1,2,0,1.5,3"
    )]
    upload_profile: String,
    /// Joins per second (0 = no pacing); at most 16 joins are in flight at once.
    #[arg(long, env = "STARLING_LOADTEST_JOIN_RATE", default_value_t = 50.0)]
    join_rate: f64,
    /// Chunk duration, ms.
    #[arg(long, env = "STARLING_LOADTEST_CHUNK_MS", default_value_t = 250)]
    chunk_ms: u32,
    /// Substreams (K). Broadcasts default to 8 (controlplane validate.rs weighs peer
    /// share against tree depth); the load test defaults to 4, half the parent links
    /// per peer, for single-machine runs that are CPU-bound. Pass 8 to test the default.
    #[arg(long, env = "STARLING_LOADTEST_SUBSTREAMS", default_value_t = 4)]
    substreams: u32,
    /// Skip the byte-identity check of every peer's output (saves CPU).
    #[arg(long, env = "STARLING_LOADTEST_NO_IDENTITY_CHECK")]
    no_identity_check: bool,
    /// `--net sockets` only: every peer checks every chunk signature itself, as a device
    /// does. By default the peers share a cache of signatures already found authentic
    /// (each still checks every chunk's header and SHA-256): the Ed25519 check is the
    /// largest per-chunk cost and, on a real audience, is spread over the devices.
    /// Simulated viewers always share one cache (they verify what the data plane sends).
    #[arg(long, env = "STARLING_LOADTEST_NO_SIGNATURE_CACHE")]
    no_signature_cache: bool,
    /// Also write the final report as JSON to this file.
    #[arg(long, env = "STARLING_LOADTEST_JSON")]
    json: Option<PathBuf>,
    /// Where the control plane serves its dashboard (live charts of the broadcast;
    /// the URL to open, admin key included, is printed at start); port 0 picks a free
    /// one; "" or `off` disables it.
    #[arg(
        long,
        env = "STARLING_LOADTEST_DASHBOARD_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    dashboard_listen: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // RUST_LOG, else (unset or not a valid filter) errors only.
    let log = |filter: String| {
        starling_telemetry::logging::init(&LogConfig {
            filter,
            json: false,
            otlp_endpoint: None,
            otlp_service_name: None,
            default_service_name: "starling-loadtest",
        })
    };
    let _logging = match std::env::var("RUST_LOG").map(log) {
        Ok(Ok(guard)) => guard,
        _ => match log("error".to_string()) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("starling-loadtest: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    // A worker is one of several processes sharing the machine's cores: one thread
    // each spares the cross-thread wake-ups of a work-stealing runtime (its peers are
    // many small tasks that mostly wait on sockets and timers).
    let mut builder = if matches!(&cli.command, Command::Worker(w) if w.net == "sim") {
        // The `--net sim` worker holds every simulated viewer: the fabric (one task
        // that owns every node) on one thread, their gRPC sessions, quality reports
        // and data-plane connections on another. On one thread, 10,000 viewers'
        // reports at the SDK's cadence left the fabric's timers late (a worker at
        // 100 % of its thread while the machine looked 60 % busy) and the grid spiralled
        // into re-searches after 6 minutes.
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else if matches!(cli.command, Command::Worker(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::ControlBench(args) => match control_bench_config(*args) {
            Ok((cfg, json)) => rt
                .block_on(starling_loadtest::control_bench::run_and_print(cfg, json))
                .map_err(Into::into),
            Err(e) => Err(e),
        },
        Command::BenchControlplane(a) => rt
            .block_on(starling_loadtest::control_bench::embedded::serve(
                starling_loadtest::control_bench::embedded::EmbeddedConfig {
                    listen: a.listen,
                    data_dir: a.data_dir,
                    database_url: a.database_url,
                    admin_key: a.admin_key,
                    heartbeat_interval: Duration::from_millis(a.heartbeat_interval_ms),
                    tls: a.tls_cert.zip(a.tls_key),
                },
            ))
            .map_err(Into::into),
        Command::Demo(args) => rt.block_on(demo(args)),
        Command::Run(args) => rt.block_on(run(*args)),
        Command::Worker(args) => {
            let cfg = WorkerConfig {
                coordinator: args.coordinator,
                connect_timeout: Duration::from_secs(args.connect_timeout_s),
            };
            if args.net == "sim" {
                rt.block_on(starling_loadtest::simnet::worker::run_sim_worker(cfg))
                    .map_err(Into::into)
            } else {
                rt.block_on(starling_loadtest::worker::run_worker(cfg))
                    .map_err(Into::into)
            }
        }
        Command::TlsCerts(args) => tls_certs(&args),
        Command::Dataplane(args) => {
            drop(rt);
            let transport = match starling_proto::transport::Transport::from_flags(
                &args.control,
                args.ca_file.as_deref(),
                None,
                None,
                args.insecure_plaintext,
            ) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            starling_loadtest::run::dataplane_child(
                args.control,
                transport,
                args.cores,
                args.capacity_viewers,
                args.node_key.as_deref(),
            )
            .map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    let upload = UploadProfile::parse(&args.upload_profile)?;
    let sim = args.net == "sim";
    if sim && args.no_signature_cache {
        return Err(
            "--no-signature-cache needs --net sockets (simulated viewers share one \
                    cache of verified signatures)"
                .into(),
        );
    }
    let dashboard_listen = match args.dashboard_listen.trim() {
        "" | "off" => None,
        a => Some(
            a.parse::<std::net::SocketAddr>()
                .map_err(|_| format!("--dashboard-listen {a:?} is not host:port, \"\" or off"))?,
        ),
    };
    let dep = Deployment::start(DeploymentConfig {
        bitrate_kbps: args.bitrate_kbps,
        chunk_ms: args.chunk_ms,
        substreams: args.substreams,
        dashboard_listen,
        // Simulated viewers all reach the servers from 127.0.0.1 and say who they are
        // in the addresses they advertise: per-address limits cannot hold.
        behind_proxy: sim,
        ..DeploymentConfig::default()
    })
    .await?;
    eprintln!(
        "starling demo: control plane {}, data plane {}, source {} ({} kbps), broadcast {}",
        dep.control_url(),
        dep.node()
            .map(|n| n.wire_addr().to_string())
            .unwrap_or_default(),
        dep.source().url(),
        args.bitrate_kbps,
        dep.broadcast_id()
    );
    if let Some(url) = dep.dashboard_url() {
        eprintln!("dashboard: {url}#key={}", dep.admin_key());
    }
    eprintln!(
        "joining {} {} at {}/s, upload profile {:?} x stream rate (mean {:.2}x); Ctrl-C to stop",
        args.peers,
        if sim {
            "simulated viewers"
        } else {
            "SDK viewers"
        },
        args.join_rate,
        upload.multiples,
        upload.mean()
    );
    if sim {
        return demo_sim(args, upload, dep).await;
    }
    let config = SwarmConfig {
        peers: args.peers,
        upload,
        join_rate: args.join_rate,
        check_identity: !args.no_identity_check,
        shared_signature_cache: !args.no_signature_cache,
        ..SwarmConfig::default()
    };
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    // Budgets are multiples of the stream rate as delivered, as the in-process data
    // plane measures it (see `Swarm::new`).
    let swarm = Swarm::new(&dep);
    // Joins run in the background so the progress display starts at once.
    let joining = {
        let swarm = swarm.clone();
        tokio::spawn(async move { swarm.add_peers(&config).await })
    };
    let tty = std::io::stderr().is_terminal();
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let mut recent = starling_loadtest::report::RecentRate::default();
    loop {
        tokio::select! {
            _ = progress.tick() => {}
            _ = &mut ctrl_c => break,
            () = &mut until_deadline => break,
        }
        let line = Report::of(&swarm.sample()).progress_line(&mut recent);
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
    joining.abort();
    if tty {
        eprintln!();
    }
    let report = Report::of(&swarm.sample());
    let grid = dep.broadcast().await.ok();
    println!("=== starling demo report ===\n{report}");
    if let Some(b) = &grid {
        println!(
            "control plane: peers {}, demand {} slots, peer supply {} slots, booster {} slots ({} kbps), max depth {}",
            b.peers,
            b.demand_slots,
            b.peer_supply_slots,
            b.booster_slots,
            b.booster_kbps,
            b.max_depth
        );
    }
    if let Some(path) = &args.json {
        let json = report_json(&report, args.bitrate_kbps);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        eprintln!("report written to {}", path.display());
    }
    swarm.shutdown().await;
    dep.shutdown().await;
    Ok(())
}

/// `demo --net sim`: simulated viewers against the in-process deployment.
async fn demo_sim(
    args: DemoArgs,
    upload: UploadProfile,
    dep: Deployment,
) -> Result<(), Box<dyn std::error::Error>> {
    use starling_loadtest::sim_demo::{self, SimDemoConfig};
    let cfg = SimDemoConfig {
        peers: args.peers,
        duration: args.duration,
        upload,
        join_rate: args.join_rate,
        check_identity: !args.no_identity_check,
    };
    let tty = std::io::stderr().is_terminal();
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = sim_demo::run(&dep, &cfg, stop, |line| {
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    })
    .await;
    if tty {
        eprintln!();
    }
    dep.shutdown().await;
    let report = report?;
    println!("=== starling demo report ===\n{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("report written to {}", path.display());
    }
    if !report.errors.is_empty() || report.not_identical > 0 {
        return Err("the demo saw errors (see the report)".into());
    }
    Ok(())
}

/// The `--sim-*` flags.
fn sim_links(
    args: &RunArgs,
) -> Result<starling_loadtest::worker::SimLinks, Box<dyn std::error::Error>> {
    let (lo, hi) = match args.sim_latency_ms.split_once('-') {
        Some((a, b)) => (a.trim().parse::<u64>()?, b.trim().parse::<u64>()?),
        None => {
            let v = args.sim_latency_ms.trim().parse::<u64>()?;
            (v, v)
        }
    };
    if hi < lo {
        return Err("--sim-latency-ms: MIN-MAX with MIN <= MAX".into());
    }
    if !(0.0..=1.0).contains(&args.sim_loss) {
        return Err("--sim-loss: a probability in [0, 1]".into());
    }
    if args.sim_uplink_factor.is_nan() || args.sim_uplink_factor < 1.0 {
        return Err("--sim-uplink-factor: at least 1".into());
    }
    Ok(starling_loadtest::worker::SimLinks {
        latency_min_ms: lo,
        latency_max_ms: hi,
        jitter_ms: args.sim_jitter_ms,
        loss: args.sim_loss,
        uplink_factor: args.sim_uplink_factor,
    })
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let upload = UploadProfile::parse(&args.upload_profile)?;
    let sim = sim_links(&args)?;
    let external = match (args.control, args.broadcast) {
        (Some(control_url), Some(broadcast_id)) => Some(External {
            transport: starling_proto::transport::Transport::from_flags(
                &control_url,
                args.ca_file.as_deref(),
                None,
                None,
                args.insecure_plaintext,
            )?,
            control_url,
            broadcast_id,
            admin_key: args.admin_key,
            dataplane_http: args.dataplane_http,
        }),
        (Some(_), None) => return Err("--control needs --broadcast".into()),
        _ => None,
    };
    let cfg = RunConfig {
        peers: args.peers,
        workers: args.workers.unwrap_or(0),
        remote_workers: args.remote_workers,
        duration: args.duration,
        bitrate_kbps: args.bitrate_kbps,
        upload,
        join_rate: args.join_rate,
        churn_per_min: args.churn,
        chunk_ms: args.chunk_ms,
        substreams: args.substreams,
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        target_lag: args.target_lag_ms.map(Duration::from_millis),
        check_identity: !args.no_identity_check,
        shared_signature_cache: !args.no_signature_cache,
        max_busy: (args.max_busy / 100.0).clamp(0.0, 1.0),
        dataplane_cores: args.dataplane_cores,
        listen: args.listen,
        exe: None,
        external,
        progress: true,
        net: if args.net == "sockets" {
            starling_loadtest::run::Net::Sockets
        } else {
            starling_loadtest::run::Net::Sim
        },
        sim,
    };
    let report = starling_loadtest::run::run(cfg).await?;
    println!("=== starling run report ===\n{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

fn report_json(r: &Report, bitrate_kbps: u32) -> serde_json::Value {
    serde_json::json!({
        "peers": r.peers_total,
        "peers_active": r.peers_active,
        "duration_s": r.window.as_secs_f64(),
        "bitrate_kbps": bitrate_kbps,
        "peer_share": r.peer_share,
        "continuity": r.continuity,
        "continuity_min": r.continuity_min,
        "startup_ms": {"p50": r.startup_ms.p50, "p95": r.startup_ms.p95, "p99": r.startup_ms.p99},
        "join_rpc_ms": {"p50": r.join_ms.p50, "p99": r.join_ms.p99},
        "stalls": r.chunks_skipped,
        "parent_changes": r.parent_changes,
        "reparent_ms": {"count": r.reparent_ms.count, "p50": r.reparent_ms.p50, "p99": r.reparent_ms.p99, "max": r.reparent_ms.max},
        "server_egress_bytes": r.dataplane_egress_bytes.unwrap_or(r.bytes_from_server),
        "bytes_from_peers": r.bytes_from_peers,
        "bytes_uploaded": r.bytes_uploaded,
        "not_identical": r.not_identical,
        "errors": r.errors,
    })
}
