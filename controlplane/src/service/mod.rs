//! The gRPC services (`AdminService`, `ViewerService`, `EdgeService`) over a [`Store`]:
//! their shared state ([`Core`], its configuration and construction) and the tonic
//! wrapper ([`Api`]). One concern per submodule, each adding its part of `impl Core`:
//!
//! * `admin`, `viewer`, `edge`: the RPCs of each service and its tonic trait impl;
//! * `errors`: [`ApiError`] and its mapping to a gRPC status;
//! * `nodes`: node command links, broadcast assignment, node liveness;
//! * `node_auth`: per-node credentials (admin RPCs, the check binding a caller to its
//!   node);
//! * `keys`: chunk-token key rotation (rights housekeeping);
//! * `chunk_keys`: the alive nodes' chunk-signing keys, each broadcast's run and the
//!   nodes assigned to it (whose keys only its viewers trust);
//! * `sessions`: batched heartbeat writes and session expiry;
//! * `guards`: the viewer API's flood limits, negative cache and join admission;
//! * `join`: `ViewerService.Join`; `join_cache`: the broadcast and node rows it reads,
//!   in memory; `join_batch`: group commit of its session rows;
//! * `session_stream`: `ViewerService.Session`, the per-viewer stream of pushed deltas;
//!   `session_route`: the served `ViewerService`, with `Session`'s own response body;
//! * `scrape`: the state a `/metrics` scrape reads ([`crate::metrics::Snapshot`]);
//! * `dashboard`: the figures the dashboard polls ([`crate::dashboard::Source`]).
//!
//! Invariants:
//! * Every change of a broadcast's state or node assignment happens while holding
//!   `Core::assign_lock`, and so does the replay at the start of a node's command
//!   stream; a node therefore never misses an ingest command nor receives an ingest
//!   for a broadcast that was stopped meanwhile.
//! * The database is the source of truth; the in-memory links only carry commands.
//!   A command that cannot be delivered (no stream, full buffer) is not lost: the
//!   desired state is replayed when the node reopens its stream, and stray ingests
//!   reported by a node are answered with a stop command.
//! * The peer grid ([`crate::live`]) is live state of this process only: one
//!   [`starling_grid::assign::GridAssigner`] per LIVE broadcast with viewers, created at the first
//!   join and dropped by `StopBroadcast`. Sessions are written to the database as before
//!   (the record of the audience); parents, neighbours and byte counters live in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use starling_proto::v1::PublicKey;

use tonic::{Response, Status};

use crate::auth::Authenticator;
use crate::live::LiveGrids;
use crate::store::Store;
use crate::tickets::ParentTickets;
use crate::tokens::{Revocations, TokenKeys};

mod admin;
mod chunk_keys;
mod dashboard;
mod edge;
mod errors;
mod guards;
mod join;
mod join_batch;
mod join_cache;
mod keys;
mod node_auth;
mod nodes;
mod scrape;
mod session_route;
mod session_stream;
mod sessions;
mod viewer;

pub use errors::ApiError;
use errors::ApiResult;
use guards::Guards;
use nodes::NodeLink;

/// Tunables of the services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Interval at which SDKs heartbeat their session and nodes report health.
    pub heartbeat_interval: Duration,
    /// A node that has not reported for this long (or has had no command stream for
    /// this long) is declared dead and its broadcasts are reassigned.
    pub node_timeout: Duration,
    /// Period of the liveness check.
    pub liveness_tick: Duration,
    /// Commands buffered per node stream before it is considered stuck and closed (the
    /// node then reconnects and gets a full replay).
    pub command_buffer: usize,
    /// A viewer session silent (no heartbeat) for this many heartbeat intervals is ended
    /// and leaves the peer grid (its children are re-parented). Default 3. Relative to
    /// `heartbeat_interval` so that changing the interval alone stays safe.
    pub missed_heartbeats: u32,
    /// Lifetime of the chunk tokens issued at join and renewed by heartbeats (renewed
    /// when less than half remains). Clamped to 1 s..=120 s. Default 120 s.
    pub token_ttl: Duration,
    /// Lifetime of the parent tickets attached to every peer assignment (re-signed when
    /// half is left, [`crate::tickets`]). Clamped to 10 s..=1 h. Default 10 min.
    pub parent_ticket_ttl: Duration,
    /// How often viewers send `ViewerService.Report` (`JoinResponse.report_interval_ms`).
    /// Default 5 s.
    pub report_interval: Duration,
    /// How often the chunk-token keys are reloaded from the database (a rotation by
    /// another replica, keys whose retire time passed; nodes get a changed set as a
    /// `KeysCommand`) and old revocations forgotten. Default 5 s.
    pub key_refresh: Duration,
    /// Report recording: write queue bound, batching, retention ([`crate::reports`]).
    pub reports: crate::reports::ReportConfig,
    /// Flood limits of the viewer API ([`crate::limits`]).
    pub limits: crate::limits::LimitsConfig,
    /// Trust rules: peer address check, upload cap, report thresholds
    /// ([`crate::trust`]).
    pub trust: crate::trust::TrustConfig,
    /// Server-fed roots per substream of each broadcast's grid ([`crate::live::GridRoots`]).
    pub grid_roots: crate::live::GridRoots,
    /// Relays get children only once their advertised address answers
    /// ([`crate::reachability`]).
    pub reachability: crate::reachability::ReachabilityConfig,
    /// Most session rows written by one group commit of joins (`join_batch`).
    pub session_batch_max: usize,
    /// How long the join path trusts its in-memory copy of a broadcast or node row
    /// (`join_cache`; writes by this process update it at once, this bounds how long
    /// another replica's write can go unseen). Default 2 s.
    pub join_cache_ttl: Duration,
    /// How often viewers send their counters on the session stream
    /// (`SessionDown.counters_interval_ms`). Default 10 s.
    pub session_counters_interval: Duration,
    /// A session whose stream ended without Leave expires this long after (at most the
    /// silence timeout) unless a new stream or a heartbeat takes it up. Default 1 s: with
    /// the default HTTP/2 keep-alive (1 s + 1 s) a vanished viewer is removed within
    /// today's bound (docs/PROTOCOL.md, "Session stream").
    pub session_detach_grace: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            heartbeat_interval: Duration::from_millis(1000),
            node_timeout: Duration::from_millis(5000),
            liveness_tick: Duration::from_millis(500),
            command_buffer: 64,
            missed_heartbeats: 3,
            token_ttl: crate::tokens::DEFAULT_TOKEN_TTL,
            parent_ticket_ttl: crate::tickets::DEFAULT_TICKET_TTL,
            report_interval: Duration::from_millis(5000),
            key_refresh: Duration::from_secs(5),
            reports: crate::reports::ReportConfig::default(),
            limits: crate::limits::LimitsConfig::default(),
            trust: crate::trust::TrustConfig::default(),
            grid_roots: crate::live::GridRoots::default(),
            reachability: crate::reachability::ReachabilityConfig::default(),
            session_batch_max: join_batch::DEFAULT_SESSION_BATCH_MAX,
            join_cache_ttl: Duration::from_secs(2),
            session_counters_interval: Duration::from_secs(10),
            session_detach_grace: Duration::from_secs(1),
        }
    }
}

pub use starling_proto::time::unix_ms_i64 as now_ms;

/// Shared state behind the three services.
#[derive(Debug)]
pub struct Core {
    store: Store,
    config: ServiceConfig,
    links: parking_lot::Mutex<HashMap<String, NodeLink>>,
    assign_lock: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    grids: Arc<LiveGrids>,
    /// Reachability probes of relays' addresses ([`crate::reachability`]).
    prober: crate::reachability::Prober,
    auth: Arc<Authenticator>,
    tokens: TokenKeys,
    /// Parent tickets for every peer assignment handed out.
    tickets: ParentTickets,
    revocations: Revocations,
    /// Chunk-signing keys of the alive nodes (node id, key), refreshed whenever the alive
    /// nodes are listed (registration, liveness check).
    chunk_keys: parking_lot::RwLock<Vec<(String, PublicKey)>>,
    /// Each live broadcast's run and the nodes assigned to it in that run (the
    /// ingesting node first), refreshed with the chunk keys and at every `Join`: the
    /// chunk keys a broadcast's viewers trust are those nodes' only.
    runs: parking_lot::RwLock<chunk_keys::Runs>,
    /// The node credentials table, cached ([`node_auth::CREDENTIAL_CACHE_TTL`]).
    node_credentials: node_auth::CredentialCache,
    /// Viewer reports: write queue, batch writer, roll-ups ([`crate::reports`]).
    reports: Arc<crate::reports::Reports>,
    /// Prometheus counters ([`crate::metrics`]).
    metrics: Arc<crate::metrics::Metrics>,
    /// Heartbeats of sessions in a live grid not yet written to the database (session
    /// id → time): liveness itself is decided in memory (the grid), so the database
    /// only gets `last_seen_ms` in one batch per liveness tick instead of one write per
    /// heartbeat. At most one entry per session in a grid.
    touches: parking_lot::Mutex<HashMap<Arc<str>, i64>>,
    /// Flood limits ([`crate::limits`]), one lock held for one table operation.
    guards: parking_lot::Mutex<Guards>,
    /// Broadcast and node rows for `Join`, kept exact by this process's writes.
    join_cache: join_cache::JoinCache,
    /// Group commit of the joins' session rows.
    session_writer: join_batch::SessionWriter,
}

impl Core {
    /// Creates the services' state over an already migrated store, with the credential
    /// checks and the chunk-token keys (see [`TokenKeys::load`]).
    pub fn new(
        store: Store,
        config: ServiceConfig,
        auth: Arc<Authenticator>,
        tokens: TokenKeys,
    ) -> Arc<Core> {
        let tickets = ParentTickets::new(config.parent_ticket_ttl);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let l = config.limits;
        let guards = parking_lot::Mutex::new(Guards {
            join: crate::limits::RateLimiter::new(l.join, l.max_addresses),
            lookups: crate::limits::RateLimiter::new(l.unknown_session_lookups, l.max_addresses),
            unknown: crate::limits::UnknownSessions::new(
                l.unknown_sessions_max,
                l.unknown_sessions_ttl,
            ),
            backlog: crate::limits::JoinBacklog::new(l.joins_in_flight),
        });
        let join_cache = join_cache::JoinCache::new(config.join_cache_ttl);
        let session_writer = join_batch::SessionWriter::new(
            store.clone(),
            config.session_batch_max,
            l.joins_in_flight.max(config.session_batch_max),
        );
        let reports =
            crate::reports::Reports::new(config.reports.clone(), store.clone(), metrics.clone());
        let grids = Arc::new(
            LiveGrids::with_config(config.reports.limits, config.trust)
                .with_roots(config.grid_roots),
        );
        let prober = crate::reachability::Prober::new(config.reachability);
        Arc::new(Core {
            reports,
            metrics,
            store,
            config,
            links: parking_lot::Mutex::new(HashMap::new()),
            assign_lock: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            grids,
            prober,
            guards,
            touches: parking_lot::Mutex::new(HashMap::new()),
            join_cache,
            session_writer,
            auth,
            tokens,
            tickets,
            revocations: Revocations::new(),
            chunk_keys: parking_lot::RwLock::new(Vec::new()),
            runs: parking_lot::RwLock::new(HashMap::new()),
            node_credentials: parking_lot::Mutex::new(None),
        })
    }

    /// Viewer-report recording (its tasks are started by the server).
    pub fn reports(&self) -> &Arc<crate::reports::Reports> {
        &self.reports
    }

    /// The Prometheus counters.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The credential checks (shared with the admin interceptor).
    pub fn authenticator(&self) -> &Arc<Authenticator> {
        &self.auth
    }

    /// The chunk-token keys.
    pub fn token_keys(&self) -> &TokenKeys {
        &self.tokens
    }

    /// Period of the rights housekeeping ([`Core::rights_tick`]).
    pub fn key_refresh_interval(&self) -> Duration {
        self.config.key_refresh
    }

    /// Bad-peer reports (`ReportPeer`) accepted since start.
    pub fn bad_peer_reports(&self) -> u64 {
        self.grids.bad_peer_reports()
    }
    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Period of the liveness check.
    pub fn liveness_tick_interval(&self) -> Duration {
        self.config.liveness_tick
    }
}

/// The answer of an RPC: its result as a response, or its error as the status of `rpc`
/// ([`ApiError`]'s mapping, logged once).
fn respond<T>(rpc: &'static str, result: ApiResult<T>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|e| e.into_status(rpc))
}

pub use session_route::ViewerRoutes;

/// The tonic service implementation (all three services share one [`Core`]).
#[derive(Debug, Clone)]
pub struct Api {
    core: Arc<Core>,
}

impl Api {
    /// Wraps the shared state.
    pub fn new(core: Arc<Core>) -> Self {
        Api { core }
    }
}
