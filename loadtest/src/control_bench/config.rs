//! The benchmark's typed configuration (parsed from flags by the binary).

use std::path::PathBuf;
use std::time::Duration;

/// How the sessions stay alive during the steady phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `ViewerService.Session`: one stream per session, counters every
    /// `counters_interval_ms`, every `SessionDown` read.
    Stream,
    /// Unary `Heartbeat` every `heartbeat_interval_ms` of the join (the pre-stream SDK).
    Heartbeat,
}

impl Mode {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Stream => "stream",
            Mode::Heartbeat => "heartbeat",
        }
    }
}

/// The `peer_addr` each join announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddrs {
    /// Distinct addresses in 10.0.0.0/8 (like viewers spread over the Internet); needs a
    /// control plane with `--peer-addr-check off` (the spawned one has it).
    Diverse,
    /// 127.0.0.1 with distinct ports: passes the strict peer-addr check from loopback.
    Loopback,
}

/// Which control plane to measure.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start `bin` as a child process (so its CPU and RSS are read from /proc).
    Spawn {
        /// The `starling-controlplane` executable; `None` = this executable's hidden
        /// `bench-controlplane` subcommand (the library control plane, [`super::embedded`]).
        bin: Option<PathBuf>,
        /// PostgreSQL URL; `None` = a fresh SQLite file in a temporary directory.
        database_url: Option<String>,
        /// Extra flags passed to the control plane as they are.
        extra_args: Vec<String>,
        /// Forward the control plane's stderr to ours (otherwise only its last lines are
        /// kept, for error messages).
        show_logs: bool,
    },
    /// An already running control plane.
    External {
        /// Its gRPC URL (https://HOST:PORT; http:// with the plaintext transport).
        url: String,
        /// How it is reached (TLS and the CA to trust, or the plaintext opt-in).
        transport: starling_proto::transport::Transport,
        /// Its process id, for /proc (must be on this machine).
        pid: u32,
        /// Admin key (bearer) for AdminService.
        admin_key: String,
        /// Node key (bearer) for EdgeService (the emulated data-plane node).
        node_key: String,
    },
}

/// Everything `control-bench` needs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The control plane to measure.
    pub target: Target,
    /// Sessions joined and then held.
    pub sessions: usize,
    /// Joins in flight at once.
    pub concurrency: usize,
    /// HTTP/2 connections the join calls share.
    pub join_connections: usize,
    /// Sessions per HTTP/2 connection in the steady phase.
    pub sessions_per_connection: usize,
    /// Steady-state keep-alive mode.
    pub mode: Mode,
    /// Steady phase length.
    pub steady: Duration,
    /// Leaves per second during the steady phase, each followed by a new join.
    pub churn_per_s: f64,
    /// Heartbeat interval the spawned control plane announces (ms).
    pub heartbeat_interval_ms: u64,
    /// Stream rate the emulated node reports (kbit/s): sizes the grid's child slots.
    pub stream_kbps: u32,
    /// Upload budgets, in multiples of the stream rate, given to joins in turn (0 =
    /// does not relay: no peer_addr).
    pub upload_profile: Vec<f64>,
    /// Substreams of the broadcast.
    pub substreams: u32,
    /// Peer addresses announced.
    pub peer_addrs: PeerAddrs,
    /// Longest wait for one call.
    pub call_timeout: Duration,
    /// One progress line per second on stderr.
    pub progress: bool,
}

impl BenchConfig {
    /// Defaults for `target` (the binary's defaults).
    pub fn new(target: Target) -> Self {
        BenchConfig {
            target,
            sessions: 10_000,
            concurrency: 64,
            join_connections: 8,
            sessions_per_connection: 200,
            mode: Mode::Stream,
            steady: Duration::from_secs(30),
            churn_per_s: 0.0,
            heartbeat_interval_ms: 1000,
            stream_kbps: 1000,
            upload_profile: vec![0.0, 1.0, 2.0, 0.0, 1.5, 3.0],
            substreams: 4,
            peer_addrs: PeerAddrs::Diverse,
            call_timeout: Duration::from_secs(30),
            progress: true,
        }
    }

    /// HTTP/2 connections of the steady phase.
    pub fn steady_connections(&self) -> usize {
        self.sessions
            .div_ceil(self.sessions_per_connection.max(1))
            .max(1)
    }
}
