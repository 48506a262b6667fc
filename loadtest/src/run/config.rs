//! What a run is told: [`RunConfig`] (peers, workers, ramp, churn, phases) and
//! [`External`], an existing deployment to drive instead of starting one.

use crate::swarm::UploadProfile;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Peers per worker process by default: ~20 open files per in-process peer under a
/// 20,000-file limit, with headroom.
pub const PEERS_PER_WORKER: usize = 700;

/// How the peers are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Net {
    /// Simulated peers ([`crate::simnet`]): grid nodes in ONE worker process, their
    /// peer-to-peer frames through an in-process network; every peer's control-plane
    /// and data-plane traffic is real.
    #[default]
    Sim,
    /// Real SDK peers on loopback sockets, spread over worker processes.
    Sockets,
}

/// An existing deployment to drive instead of starting one.
#[derive(Debug, Clone)]
pub struct External {
    /// The control plane's gRPC URL.
    pub control_url: String,
    /// How it is reached (TLS and the CA to trust, or the plaintext opt-in).
    pub transport: starling_proto::transport::Transport,
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
    /// Simulated or socket peers.
    pub net: Net,
    /// The simulated network's links (`--net sim`).
    pub sim: crate::worker::SimLinks,
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
            net: Net::Sim,
            sim: crate::worker::SimLinks::default(),
        }
    }
}

impl RunConfig {
    /// Worker processes this config uses.
    pub fn worker_count(&self) -> usize {
        if self.net == Net::Sim {
            1
        } else if self.workers > 0 {
            self.workers
        } else {
            self.peers.div_ceil(PEERS_PER_WORKER).max(1)
        }
    }
}
