//! The gRPC services (`AdminService`, `ViewerService`, `EdgeService`) over a [`Store`],
//! plus the in-memory command links to data-plane nodes and the liveness check.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use starling_proto::token::Scopes;
use starling_proto::v1::admin_service_server::AdminService;
use starling_proto::v1::edge_service_server::EdgeService;
use starling_proto::v1::node_command::Command;
use starling_proto::v1::viewer_service_server::ViewerService;
use starling_proto::v1::{
    Broadcast, BroadcastRef, BroadcastState, CommandsRequest, CreateBroadcastRequest, HealthReport,
    HealthReportAck, HeartbeatRequest, HeartbeatResponse, IngestCommand, JoinRequest, JoinResponse,
    KeysCommand, LeaveRequest, LeaveResponse, ListBroadcastsRequest, ListBroadcastsResponse,
    NodeCommand, PublicKey, RegisterNodeRequest, RegisterNodeResponse, ReparentRequest,
    ReparentResponse, ReportPeerRequest, ReportPeerResponse, RevokeCommand, RevokeViewerRequest,
    RevokeViewerResponse, SourceHealth, StopIngestCommand, StreamParams, SubstreamParent,
};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::assign::{self, CandidateNode, LiveBroadcast, NodeLiveness};
use crate::auth::{Authenticator, ViewerIdentity};
use crate::live::{
    self, JoinInput, JoinRefused, LiveGrids, ReparentRefused, ReportRefused, RevokeTarget,
    TokenState,
};
use crate::store::{
    BroadcastRecord, IngestReport, NewBroadcast, NewNode, NewSession, NodeKey, NodeRecord, Store,
    StoreError,
};
use crate::tickets::ParentTickets;
use crate::tokens::{Revocations, SKEW_MARGIN, TokenKeys};
use crate::validate::{self, Invalid};
use starling_grid::assign::GridError;

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
        }
    }
}

/// Why a request failed; converted to a gRPC status (and logged) at the service edge.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown id.
    #[error("{0}")]
    NotFound(String),
    /// The operation is not allowed in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// What the request would create clashes with something that exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// Temporarily impossible; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// No valid credential (`UNAUTHENTICATED`) or not allowed (`PERMISSION_DENIED`): the
    /// status as built by [`crate::auth`], whose message never holds a secret.
    #[error("{}", .0.message())]
    Auth(Status),
    /// Not allowed (not a credential problem: e.g. a `peer_addr` that is not the
    /// caller's).
    #[error("{0}")]
    PermissionDenied(String),
    /// A rate limit: retry after the delay (sent as `grpc-retry-pushback-ms`).
    #[error("{0}")]
    ResourceExhausted(String, Duration),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::InvalidArgument(e.0)
    }
}

impl ApiError {
    fn into_status(self, rpc: &'static str) -> Status {
        match self {
            ApiError::InvalidArgument(m) => {
                tracing::info!(rpc, error = %m, "rejected: invalid argument");
                Status::invalid_argument(m)
            }
            ApiError::NotFound(m) => {
                tracing::info!(rpc, error = %m, "rejected: not found");
                Status::not_found(m)
            }
            ApiError::FailedPrecondition(m) => {
                tracing::info!(rpc, error = %m, "rejected: failed precondition");
                Status::failed_precondition(m)
            }
            ApiError::Unavailable(m) => {
                tracing::info!(rpc, error = %m, "rejected: unavailable");
                Status::unavailable(m)
            }
            ApiError::AlreadyExists(m) => {
                tracing::warn!(rpc, error = %m, "rejected: already exists");
                Status::already_exists(m)
            }
            ApiError::PermissionDenied(m) => {
                tracing::warn!(rpc, error = %m, "rejected: permission denied");
                Status::permission_denied(m)
            }
            ApiError::ResourceExhausted(m, retry) => {
                tracing::info!(rpc, error = %m, retry_ms = retry.as_millis(), "rejected: rate limit");
                let mut status = Status::resource_exhausted(m);
                // The standard gRPC retry pushback (gRFC A6), in the trailers.
                let ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX).max(1);
                if let Ok(v) = ms.to_string().parse() {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", v);
                }
                status
            }
            ApiError::Auth(status) => {
                tracing::info!(rpc, code = ?status.code(), error = status.message(), "rejected: credential");
                status
            }
            ApiError::Storage(e) => {
                tracing::error!(rpc, error = %e, "storage error");
                Status::internal(format!("storage error: {e}"))
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;
type CommandSender = mpsc::Sender<Result<NodeCommand, Status>>;

pub use starling_proto::time::unix_ms_i64 as now_ms;

fn state_name(state: BroadcastState) -> &'static str {
    match state {
        BroadcastState::Unspecified => "in an unknown state",
        BroadcastState::Created => "not started",
        BroadcastState::Live => "live",
        BroadcastState::Stopped => "stopped",
    }
}

#[derive(Debug, Default)]
struct NodeLink {
    tx: Option<CommandSender>,
    detached_since_ms: Option<i64>,
    /// When this process last received the node's health report (before writing it to
    /// the database): liveness counts it even while that write waits for the database,
    /// so a slow database cannot get a healthy node declared dead.
    heard_ms: Option<i64>,
}

/// Shared state behind the three services.
#[derive(Debug)]
pub struct Core {
    store: Store,
    config: ServiceConfig,
    links: std::sync::Mutex<HashMap<String, NodeLink>>,
    assign_lock: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    grids: LiveGrids,
    auth: Arc<Authenticator>,
    tokens: TokenKeys,
    /// Parent tickets for every peer assignment handed out.
    tickets: ParentTickets,
    revocations: Revocations,
    /// Chunk-signing keys of the alive nodes (node id, key), refreshed whenever the alive
    /// nodes are listed (registration, liveness check).
    chunk_keys: std::sync::RwLock<Vec<(String, PublicKey)>>,
    /// The node ingesting each live broadcast (broadcast id → node id), refreshed with
    /// the chunk keys and at every `Join`: heartbeats list that node's chunk key first,
    /// so a viewer's capped key set always holds it, however many nodes there are.
    ingest_nodes: std::sync::RwLock<HashMap<String, String>>,
    /// Viewer reports: write queue, batch writer, roll-ups ([`crate::reports`]).
    reports: Arc<crate::reports::Reports>,
    /// Prometheus counters ([`crate::metrics`]).
    metrics: Arc<crate::metrics::Metrics>,
    /// Heartbeats of sessions in a live grid not yet written to the database (session
    /// id → time): liveness itself is decided in memory (the grid), so the database
    /// only gets `last_seen_ms` in one batch per liveness tick instead of one write per
    /// heartbeat. At most one entry per session in a grid.
    touches: std::sync::Mutex<HashMap<String, i64>>,
    /// Flood limits ([`crate::limits`]), one lock held for one table operation.
    guards: std::sync::Mutex<Guards>,
}

/// The flood limiters' state.
#[derive(Debug)]
struct Guards {
    join: crate::limits::RateLimiter,
    lookups: crate::limits::RateLimiter,
    unknown: crate::limits::UnknownSessions,
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
        let guards = std::sync::Mutex::new(Guards {
            join: crate::limits::RateLimiter::new(l.join, l.max_addresses),
            lookups: crate::limits::RateLimiter::new(l.unknown_session_lookups, l.max_addresses),
            unknown: crate::limits::UnknownSessions::new(
                l.unknown_sessions_max,
                l.unknown_sessions_ttl,
            ),
        });
        let reports =
            crate::reports::Reports::new(config.reports.clone(), store.clone(), metrics.clone());
        let grids = LiveGrids::with_config(config.reports.limits, config.trust);
        Arc::new(Core {
            reports,
            metrics,
            store,
            config,
            links: std::sync::Mutex::new(HashMap::new()),
            assign_lock: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            grids,
            guards,
            touches: std::sync::Mutex::new(HashMap::new()),
            auth,
            tokens,
            tickets,
            revocations: Revocations::new(),
            chunk_keys: std::sync::RwLock::new(Vec::new()),
            ingest_nodes: std::sync::RwLock::new(HashMap::new()),
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

    /// This process's live grids.
    pub(crate) fn grids(&self) -> &LiveGrids {
        &self.grids
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

    fn guards(&self) -> std::sync::MutexGuard<'_, Guards> {
        // Each critical section is one table operation: a poisoned lock is consistent.
        self.guards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the negative cache knows of a session this process does not hold (counted
    /// as a refusal when it answers).
    fn cached_unknown(&self, session_id: &str) -> Option<crate::limits::Unknown> {
        let u = self.guards().unknown.get(session_id, self.grids.now());
        if u.is_some() {
            self.metrics
                .refused(crate::metrics::Refusal::UnknownSessionCached);
        }
        u
    }

    fn remember_unknown(&self, session_id: &str, what: crate::limits::Unknown) {
        let now = self.grids.now();
        self.guards().unknown.insert(session_id, what, now);
    }

    /// Allows one database look-up of a session not in memory for the caller, or
    /// refuses it (rate limit per caller address).
    fn allow_lookup(&self, remote: Option<std::net::SocketAddr>) -> ApiResult<()> {
        if let Some(r) = remote {
            let now = self.grids.now();
            let checked = self.guards().lookups.check(r.ip(), now);
            if let Err(wait) = checked {
                self.metrics
                    .refused(crate::metrics::Refusal::UnknownSessionRate);
                return Err(ApiError::ResourceExhausted(
                    format!(
                        "too many calls for sessions this control plane does not know from {}; \
                         retry later or join again",
                        r.ip()
                    ),
                    wait,
                ));
            }
        }
        self.metrics.unknown_session_lookup();
        Ok(())
    }

    /// Periodic rights housekeeping: reloads the token keys (rotation by another replica,
    /// retired keys) and pushes a changed set to every node; forgets old revocations.
    pub async fn rights_tick(&self, now: i64) -> Result<(), crate::tokens::TokenKeyError> {
        self.revocations.prune(now);
        if self.tokens.refresh(&self.store, now).await? {
            let keys = self.tokens.public_keys();
            let node_ids: Vec<String> = self.links().keys().cloned().collect();
            for node_id in node_ids {
                self.send(
                    &node_id,
                    Command::Keys(KeysCommand {
                        token_keys: keys.clone(),
                    }),
                );
            }
        }
        Ok(())
    }

    fn set_chunk_keys(&self, alive: &[NodeRecord]) {
        let keys: Vec<(String, PublicKey)> = alive
            .iter()
            .filter_map(|n| {
                n.chunk_key.as_ref().map(|k| {
                    (
                        n.id.clone(),
                        PublicKey {
                            key_id: k.key_id,
                            ed25519: k.ed25519.clone(),
                        },
                    )
                })
            })
            .collect();
        *self
            .chunk_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
    }

    /// The alive nodes' chunk-signing keys, `first_node`'s first, one per key id (a
    /// verifier indexes keys by id; `Register` refuses a key whose id another alive node
    /// uses with a different key, so a clash here can only come from replicas racing, and
    /// then the first wins), at most
    /// [`starling_proto::integrity::MAX_KEYS`].
    fn chunk_keys(&self, first_node: Option<&str>) -> Vec<PublicKey> {
        let all = self
            .chunk_keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<PublicKey> = Vec::new();
        let first = all.iter().filter(|(id, _)| Some(id.as_str()) == first_node);
        let rest = all.iter().filter(|(id, _)| Some(id.as_str()) != first_node);
        for (_, k) in first.chain(rest) {
            if out.len() >= starling_proto::integrity::MAX_KEYS {
                break;
            }
            if !out.iter().any(|o| o.key_id == k.key_id) {
                out.push(k.clone());
            }
        }
        out
    }

    /// The node ingesting `broadcast_id`, as last seen (see [`Core::chunk_keys`]).
    fn ingest_node(&self, broadcast_id: &str) -> Option<String> {
        self.ingest_nodes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(broadcast_id)
            .cloned()
    }

    fn set_ingest_node(&self, broadcast_id: &str, node_id: Option<&str>) {
        let mut m = self
            .ingest_nodes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match node_id {
            Some(n) => {
                m.insert(broadcast_id.to_string(), n.to_string());
            }
            None => {
                m.remove(broadcast_id);
            }
        }
    }

    fn revoke_command(&self, broadcast_id: &str, now: i64) -> Option<Command> {
        let peer_ids = self.revocations.list(broadcast_id, now);
        (!peer_ids.is_empty()).then(|| {
            Command::Revoke(RevokeCommand {
                broadcast_id: broadcast_id.to_string(),
                peer_ids,
            })
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Period of the liveness check.
    pub fn liveness_tick_interval(&self) -> Duration {
        self.config.liveness_tick
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeLink>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // critical section is a single insert/remove/field update).
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends every node command stream and refuses new ones (graceful shutdown: the
    /// server cannot finish while streams are open).
    pub fn close_streams(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.links().clear();
    }

    /// Sends a command to a node's stream if it has one open. Never blocks: if the
    /// buffer is full the stream is closed so that the node reconnects and receives a
    /// full replay of its desired state.
    fn send(&self, node_id: &str, command: Command) {
        let mut links = self.links();
        let Some(link) = links.get_mut(node_id) else {
            tracing::debug!(node_id, "no link to node; command will be replayed later");
            return;
        };
        let Some(tx) = &link.tx else {
            tracing::debug!(
                node_id,
                "node has no command stream; command will be replayed"
            );
            return;
        };
        match tx.try_send(Ok(NodeCommand {
            command: Some(command),
        })) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(
                    node_id,
                    "node command buffer full; closing its stream to force a replay"
                );
                link.tx = None;
                link.detached_since_ms = Some(now_ms());
            }
            Err(TrySendError::Closed(_)) => {
                tracing::info!(node_id, "node command stream closed");
                link.tx = None;
                link.detached_since_ms = Some(now_ms());
            }
        }
    }

    fn ingest_command(b: &BroadcastRecord) -> Command {
        Command::Ingest(IngestCommand {
            broadcast_id: b.id.clone(),
            source_url: b.source_url.clone(),
            chunk_duration_ms: b.chunk_duration_ms,
            substreams: b.substreams,
            public: b.public,
        })
    }

    fn stop_command(broadcast_id: &str) -> Command {
        Command::Stop(StopIngestCommand {
            broadcast_id: broadcast_id.to_string(),
        })
    }

    /// Assigns every live broadcast without an alive node. Caller holds `assign_lock`.
    async fn reconcile_locked(&self) -> Result<(), StoreError> {
        let alive = self.store.list_alive_nodes().await?;
        self.set_chunk_keys(&alive);
        let live = self
            .store
            .list_broadcasts_in_state(BroadcastState::Live)
            .await?;
        {
            // Rebuilt from the database's view of the live broadcasts (changes below
            // update it as they are made).
            let mut m = self
                .ingest_nodes
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            m.clear();
            for b in &live {
                if let Some(n) = &b.node_id {
                    m.insert(b.id.clone(), n.clone());
                }
            }
        }
        let live_in: Vec<LiveBroadcast> = live
            .iter()
            .map(|b| LiveBroadcast {
                id: b.id.clone(),
                node_id: b.node_id.clone(),
                viewers: b.viewers_now,
            })
            .collect();
        let nodes_in: Vec<CandidateNode> = alive
            .iter()
            .map(|n| CandidateNode {
                id: n.id.clone(),
                viewers: n.viewers,
            })
            .collect();
        for change in assign::plan_assignments(&live_in, &nodes_in) {
            let now = now_ms();
            let updated = self
                .store
                .set_broadcast_node(&change.broadcast_id, change.to.as_deref(), now)
                .await?;
            if updated.is_some() {
                self.set_ingest_node(&change.broadcast_id, change.to.as_deref());
            }
            match (&change.to, updated) {
                (Some(node_id), Some(b)) => {
                    tracing::info!(
                        broadcast_id = %b.id,
                        node_id = %node_id,
                        previous = change.from.as_deref().unwrap_or(""),
                        "broadcast assigned"
                    );
                    self.send(node_id, Self::ingest_command(&b));
                    // The new node must refuse the broadcast's revoked peers too.
                    if let Some(revoke) = self.revoke_command(&b.id, now) {
                        self.send(node_id, revoke);
                    }
                }
                (None, Some(b)) => tracing::warn!(
                    broadcast_id = %b.id,
                    previous = change.from.as_deref().unwrap_or(""),
                    "no alive data-plane node; broadcast left unassigned until one registers"
                ),
                (_, None) => {}
            }
        }
        Ok(())
    }

    /// Runs one liveness check at `now`: declares overdue nodes dead, reassigns their
    /// broadcasts, and retries assignment of unassigned live broadcasts.
    pub async fn liveness_tick(&self, now: i64) -> Result<(), StoreError> {
        let _guard = self.assign_lock.lock().await;
        let alive = self.store.list_alive_nodes().await?;
        let liveness: Vec<NodeLiveness> = {
            let mut links = self.links();
            alive
                .iter()
                .map(|n| {
                    // A node alive in the database but unknown to this process (e.g. after
                    // a restart) counts as detached from now on.
                    let link = links.entry(n.id.clone()).or_insert_with(|| NodeLink {
                        tx: None,
                        detached_since_ms: Some(now),
                        heard_ms: None,
                    });
                    if link.tx.as_ref().is_some_and(mpsc::Sender::is_closed) {
                        tracing::info!(node_id = %n.id, "node command stream closed");
                        link.tx = None;
                        link.detached_since_ms = Some(now);
                    }
                    NodeLiveness {
                        id: n.id.clone(),
                        last_seen_ms: n.last_seen_ms.max(link.heard_ms.unwrap_or(i64::MIN)),
                        detached_since_ms: link.detached_since_ms,
                    }
                })
                .collect()
        };
        let timeout = i64::try_from(self.config.node_timeout.as_millis()).unwrap_or(i64::MAX);
        let expired = assign::expired_nodes(&liveness, now, timeout);
        for node_id in &expired {
            if self.store.mark_node_dead(node_id).await? {
                tracing::warn!(node_id = %node_id, timeout_ms = timeout, "data-plane node declared dead");
            }
        }
        let result = self.reconcile_locked().await;
        // Close the dead nodes' command streams only once their broadcasts have moved,
        // so whoever sees a stream end also sees the new assignment.
        let mut links = self.links();
        for node_id in &expired {
            links.remove(node_id);
        }
        result
    }

    fn pending_touches(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.touches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the heartbeats recorded since the last call to the database in one batch.
    /// On failure they are put back (newer heartbeats win) and retried on the next call.
    /// Returns how many sessions were written.
    pub async fn flush_touches(&self) -> Result<usize, StoreError> {
        let batch: Vec<(String, i64)> = std::mem::take(&mut *self.pending_touches())
            .into_iter()
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match self.store.touch_sessions(&batch).await {
            Ok(_) => Ok(batch.len()),
            Err(e) => {
                let mut pending = self.pending_touches();
                for (id, t) in batch {
                    pending.entry(id).or_insert(t);
                }
                Err(e)
            }
        }
    }

    /// How long a viewer session may stay silent before it is expired.
    pub fn session_timeout(&self) -> Duration {
        self.config
            .heartbeat_interval
            .saturating_mul(self.config.missed_heartbeats.max(1))
    }

    /// Ends every session silent for [`Core::session_timeout`]: it leaves the peer grid
    /// (its children are re-parented; they learn it at their next heartbeat) and is ended
    /// in the database. Returns how many sessions expired.
    pub async fn expire_sessions(&self) -> Result<usize, StoreError> {
        let timeout = self.session_timeout();
        let expired = self.grids.expire(timeout);
        let now = now_ms();
        // Ended in memory before the database hears of it: a heartbeat arriving in
        // between (or after a failed write) must not find the row still active and be
        // told the session goes on outside its grid.
        for e in &expired {
            self.remember_unknown(&e.session_id, crate::limits::Unknown::Ended);
        }
        let mut first_error = None;
        for e in &expired {
            tracing::info!(
                session_id = %e.session_id,
                broadcast_id = %e.broadcast_id,
                peer_id = e.peer_id,
                reparented = e.moved,
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "viewer session expired (missed heartbeats)"
            );
            // One failed write does not leave the other expired sessions' rows active.
            if let Err(err) = self.store.end_session(&e.session_id, now).await {
                tracing::warn!(session_id = %e.session_id, "could not record the session's end: {err}");
                first_error.get_or_insert(err);
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(expired.len()),
        }
    }

    async fn node_addrs(&self, node_id: Option<&str>) -> Result<Option<NodeRecord>, StoreError> {
        match node_id {
            Some(id) => self.store.get_node(id).await,
            None => Ok(None),
        }
    }

    fn to_proto(b: BroadcastRecord, node: Option<&NodeRecord>) -> Broadcast {
        Broadcast {
            id: b.id,
            name: b.name,
            source_url: b.source_url,
            chunk_duration_ms: b.chunk_duration_ms,
            substreams: b.substreams,
            state: b.state as i32,
            source_health: b.source_health as i32,
            source_error: b.source_error,
            node_id: b.node_id.unwrap_or_default(),
            node_wire_addr: node.map(|n| n.wire_addr.clone()).unwrap_or_default(),
            node_http_addr: node.map(|n| n.http_addr.clone()).unwrap_or_default(),
            viewers_now: b.viewers_now,
            last_seq: b.last_seq,
            content_type: b.content_type,
            created_at_unix_ms: b.created_at_ms,
            updated_at_unix_ms: b.updated_at_ms,
            public: b.public,
            ..Default::default()
        }
    }

    /// Fills the peer-grid figures of a broadcast view from this process's memory.
    ///
    /// `booster_slots`/`booster_kbps` count every substream subscription the data plane
    /// feeds (including the one root per substream that even a lone viewer needs), so
    /// `booster_kbps` is the broadcast's data-plane egress to SDK viewers and compares
    /// directly with `fluid_bound_kbps`. (The assigner's own `GridStats::booster_slots`
    /// excludes the roots.)
    fn with_grid(&self, mut view: Broadcast) -> Broadcast {
        let measured = self.grids.rate(&view.id);
        if view.state == BroadcastState::Live as i32
            && let Some(f) = self.grids.figures(&view.id)
        {
            let st = f.stats;
            view.stream_kbps = measured.unwrap_or(st.stream_kbps);
            view.peers = u32::try_from(st.peers).unwrap_or(u32::MAX);
            view.demand_slots = st.demand;
            view.peer_supply_slots = st.peer_supply;
            view.booster_slots = st.server_slots_used;
            view.booster_kbps = st.server_egress_kbps();
            view.peer_share = f.peer_share;
            view.max_depth = u32::from(st.max_depth);
            view.fluid_bound_kbps = st.fluid_bound_kbps();
        } else {
            view.stream_kbps = measured.unwrap_or(0);
        }
        view.peer_share_last_minute = self.reports.peer_share_last_minute(&view.id, now_ms());
        view
    }

    async fn broadcast_view(&self, b: BroadcastRecord) -> ApiResult<Broadcast> {
        let node = self.node_addrs(b.node_id.as_deref()).await?;
        Ok(self.with_grid(Self::to_proto(b, node.as_ref())))
    }

    async fn require_broadcast(&self, id: &str) -> ApiResult<BroadcastRecord> {
        validate::id("id", id)?;
        self.store
            .get_broadcast(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("broadcast {id} not found")))
    }

    // ------------------------------------------------------------------ admin

    async fn create_broadcast(&self, req: CreateBroadcastRequest) -> ApiResult<Broadcast> {
        let params = validate::create_broadcast(&req)?;
        // Two attempts: a collision of 80 random bits is not expected, but harmless.
        let mut last_err = None;
        for _ in 0..2 {
            let new = NewBroadcast {
                id: validate::new_broadcast_id(),
                name: params.name.clone(),
                source_url: params.source_url.clone(),
                chunk_duration_ms: params.chunk_duration_ms,
                substreams: params.substreams,
                public: req.public,
            };
            match self.store.create_broadcast(&new, now_ms()).await {
                Ok(b) => {
                    tracing::info!(broadcast_id = %b.id, name = %b.name, source_url = %b.source_url, public = b.public, "broadcast created");
                    return Ok(Self::to_proto(b, None));
                }
                Err(e @ StoreError::AlreadyExists { .. }) => last_err = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err
            .map(ApiError::from)
            .unwrap_or_else(|| ApiError::Unavailable("could not allocate an id".into())))
    }

    async fn start_broadcast(&self, id: &str) -> ApiResult<Broadcast> {
        let _guard = self.assign_lock.lock().await;
        let b = self.require_broadcast(id).await?;
        match b.state {
            BroadcastState::Live => return self.broadcast_view(b).await,
            BroadcastState::Created | BroadcastState::Stopped => {}
            BroadcastState::Unspecified => {
                return Err(ApiError::FailedPrecondition(format!(
                    "broadcast {id} is in an unknown state and cannot be started"
                )));
            }
        }
        self.store
            .set_broadcast_state(id, BroadcastState::Live, now_ms())
            .await?;
        // A grid left by a join that raced the last stop would be stale: start afresh.
        self.grids.drop_broadcast(id);
        tracing::info!(broadcast_id = %id, "broadcast started");
        self.reconcile_locked().await?;
        let b = self.require_broadcast(id).await?;
        if b.node_id.is_none() {
            tracing::warn!(broadcast_id = %id, "broadcast is live but no data-plane node is alive; it will be assigned when one registers");
        }
        self.broadcast_view(b).await
    }

    async fn stop_broadcast(&self, id: &str) -> ApiResult<Broadcast> {
        let _guard = self.assign_lock.lock().await;
        let b = self.require_broadcast(id).await?;
        if b.state == BroadcastState::Stopped {
            return self.broadcast_view(b).await;
        }
        let now = now_ms();
        let updated = self
            .store
            .set_broadcast_state(id, BroadcastState::Stopped, now)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("broadcast {id} not found")))?;
        if let Some(node_id) = &b.node_id {
            self.send(node_id, Self::stop_command(id));
        }
        let ended = self.store.end_broadcast_sessions(id, now).await?;
        let grid_peers = self.grids.drop_broadcast(id);
        tracing::info!(broadcast_id = %id, sessions_ended = ended, grid_peers, "broadcast stopped");
        self.broadcast_view(updated).await
    }

    async fn get_broadcast(&self, id: &str) -> ApiResult<Broadcast> {
        let b = self.require_broadcast(id).await?;
        self.broadcast_view(b).await
    }

    async fn list_broadcasts(&self, include_stopped: bool) -> ApiResult<ListBroadcastsResponse> {
        let list = self.store.list_broadcasts(include_stopped).await?;
        let nodes: HashMap<String, NodeRecord> = self
            .store
            .list_alive_nodes()
            .await?
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        let broadcasts = list
            .into_iter()
            .map(|b| {
                let node = b.node_id.as_ref().and_then(|id| nodes.get(id));
                self.with_grid(Self::to_proto(b.clone(), node))
            })
            .collect();
        Ok(ListBroadcastsResponse { broadcasts })
    }

    // ------------------------------------------------------------------ viewer

    async fn join(
        &self,
        req: JoinRequest,
        remote: Option<std::net::SocketAddr>,
    ) -> ApiResult<JoinResponse> {
        if let Some(r) = remote {
            let now = self.grids.now();
            let checked = self.guards().join.check(r.ip(), now);
            if let Err(wait) = checked {
                self.metrics.refused(crate::metrics::Refusal::JoinRate);
                return Err(ApiError::ResourceExhausted(
                    format!("too many joins from {}; retry later", r.ip()),
                    wait,
                ));
            }
        }
        validate::id("broadcast_id", &req.broadcast_id)?;
        validate::short_text("client_version", &req.client_version, false)?;
        validate::peer_addr(&req.peer_addr)?;
        if let Err(e) = crate::trust::check_peer_addr(
            req.peer_addr.trim(),
            remote,
            self.config.trust.peer_addr_check,
        ) {
            self.metrics.refused(crate::metrics::Refusal::PeerAddr);
            return Err(ApiError::PermissionDenied(e.to_string()));
        }
        let id = req.broadcast_id.as_str();
        let b = self
            .store
            .get_broadcast(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("broadcast {id} not found")))?;
        // The credential is checked before anything about the broadcast's state is told.
        let (subject, credential_expires_at) = match self
            .auth
            .check_viewer(id, b.public, &req.credential)
            .map_err(ApiError::Auth)?
        {
            ViewerIdentity::Anonymous => (None, None),
            ViewerIdentity::Credential(c) => {
                let now_s = u64::try_from(now_ms() / 1000).unwrap_or(0);
                if self
                    .revocations
                    .subject_blocked(id, &c.subject, c.issued_at, now_s)
                {
                    return Err(ApiError::Auth(Status::permission_denied(format!(
                        "this viewer was revoked from broadcast {id}; a credential issued \
                         after the revocation is needed"
                    ))));
                }
                (Some(c.subject), Some(c.expires_at))
            }
        };
        if b.state != BroadcastState::Live {
            return Err(ApiError::FailedPrecondition(format!(
                "broadcast {id} is {}",
                state_name(b.state)
            )));
        }
        let unavailable = || {
            ApiError::Unavailable(format!(
                "no data-plane node is serving broadcast {id} yet; retry"
            ))
        };
        let node_id = b.node_id.as_deref().ok_or_else(unavailable)?;
        let node = self
            .store
            .get_node(node_id)
            .await?
            .filter(|n| n.alive)
            .ok_or_else(unavailable)?;
        let substreams = u16::try_from(b.substreams).map_err(|_| {
            ApiError::FailedPrecondition(format!(
                "broadcast {id} has {} substreams, more than the grid supports",
                b.substreams
            ))
        })?;
        // A node's viewer connections each carry up to K substreams; 0 = no declared limit.
        let server_slots = match node.capacity_viewers {
            0 => u64::MAX,
            c => u64::from(c).saturating_mul(u64::from(substreams)),
        };
        let peer_addr = live::dialable_addr(req.peer_addr.trim(), remote);
        let upload_kbps = if peer_addr.is_empty() {
            0
        } else {
            req.upload_kbps
        };
        let session_id = validate::new_session_id();
        let grid = self
            .grids
            .join(JoinInput {
                broadcast_id: id,
                substreams,
                server_slots,
                session_id: &session_id,
                addr_prefix: live::addr_prefix(&peer_addr, remote),
                peer_addr,
                upload_kbps,
                remote_ip: remote.map(|r| r.ip()),
                subject: subject.clone(),
                credential_expires_at,
            })
            .map_err(|e| match e {
                JoinRefused::Grid(GridError::NoCapacity) => ApiError::Unavailable(format!(
                    "broadcast {id}: no free peer slot and the data plane is at capacity; retry"
                )),
                JoinRefused::Grid(GridError::InvalidConfig(why)) => {
                    ApiError::FailedPrecondition(format!("broadcast {id}: peer grid: {why}"))
                }
                JoinRefused::Grid(e) => {
                    ApiError::Unavailable(format!("broadcast {id}: peer grid: {e}; retry"))
                }
                JoinRefused::Stopped => {
                    ApiError::FailedPrecondition(format!("broadcast {id} is stopped"))
                }
            })?;
        if grid.granted_kbps < upload_kbps {
            self.metrics.upload_capped_join();
        }
        let scopes = if upload_kbps > 0 {
            Scopes::PLAY | Scopes::RELAY
        } else {
            Scopes::PLAY
        };
        let token = match self.tokens.issue(id, grid.peer_id, scopes, now_ms()) {
            Ok(t) => t,
            Err(e) => {
                self.grids.leave(&session_id);
                return Err(ApiError::FailedPrecondition(format!(
                    "broadcast {id}: cannot issue a chunk token: {e}"
                )));
            }
        };
        self.grids.set_token(
            &session_id,
            TokenState {
                scopes,
                expires_at_ms: token.expires_at_ms,
            },
        );
        let created = self
            .store
            .create_session(
                &NewSession {
                    id: session_id.clone(),
                    broadcast_id: b.id.clone(),
                    client_version: req.client_version.clone(),
                    node_id: Some(node.id.clone()),
                },
                now_ms(),
            )
            .await;
        if let Err(e) = created {
            // Undo the grid admission: the viewer never learns its session id.
            self.grids.leave(&session_id);
            return Err(e.into());
        }
        tracing::debug!(
            session_id = %session_id,
            broadcast_id = %id,
            node_id = %node.id,
            peer_id = grid.peer_id,
            upload_kbps,
            granted_kbps = grid.granted_kbps,
            child_slots = grid.child_slots,
            server_parents = grid.parents.iter().filter(|p| p.peer.is_none()).count(),
            reparented = grid.moved,
            subject = subject.as_deref().unwrap_or(""),
            token_key_id = self.tokens.signing_key_id(),
            "viewer joined"
        );
        self.set_ingest_node(&b.id, Some(&node.id));
        let chunk_keys = self.chunk_keys(Some(&node.id));
        Ok(JoinResponse {
            session_id,
            params: Some(StreamParams {
                broadcast_id: b.id,
                content_type: b.content_type,
                chunk_duration_ms: b.chunk_duration_ms,
                substreams: b.substreams,
            }),
            dataplane_wire_addr: node.wire_addr,
            dataplane_http_addr: node.http_addr,
            chunk_token: token.token,
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            peer_id: grid.peer_id,
            parents: self.with_tickets(id, grid.peer_id, grid.parents),
            neighbours: grid.neighbours,
            stream_kbps: grid.stream_kbps,
            child_slots: grid.child_slots,
            token_expires_at_unix_ms: token.expires_at_ms,
            token_keys: self.tokens.public_keys(),
            chunk_keys,
            report_interval_ms: u32::try_from(self.config.report_interval.as_millis())
                .unwrap_or(u32::MAX),
        })
    }

    /// `parents` with a parent ticket on each peer entry ([`crate::tickets`]).
    fn with_tickets(
        &self,
        broadcast_id: &str,
        child: u64,
        mut parents: Vec<SubstreamParent>,
    ) -> Vec<SubstreamParent> {
        self.tickets
            .attach(&self.tokens, broadcast_id, child, &mut parents, now_ms());
        parents
    }

    async fn heartbeat(
        &self,
        req: HeartbeatRequest,
        remote: Option<std::net::SocketAddr>,
    ) -> ApiResult<HeartbeatResponse> {
        validate::id("session_id", &req.session_id)?;
        let counters = [
            req.bytes_from_server,
            req.bytes_from_peers,
            req.bytes_uploaded,
        ];
        // A session in a live grid is active (leaving, expiry, revocation and stopping
        // the broadcast all take it out of the grid): its heartbeat is recorded in
        // memory and written to the database in a batch ([`Core::flush_touches`]).
        let view = self.grids.heartbeat(&req.session_id, counters);
        if view.as_ref().is_some_and(|v| v.clamped) {
            let n = self.metrics.counters_clamped_heartbeat();
            if n == 1 || n.is_multiple_of(1_000) {
                tracing::warn!(
                    session_id = %req.session_id,
                    clamped_total = n,
                    "heartbeat counters beyond what is physically possible; clamped"
                );
            }
        }
        if view.is_some() {
            if req.upload_kbps > 0 {
                // The SDK measured a slower uplink than it offered: resize its slots
                // (children beyond them are re-parented; they learn it by heartbeat).
                self.grids.set_upload(&req.session_id, req.upload_kbps);
            }
            self.pending_touches()
                .insert(req.session_id.clone(), now_ms());
        } else {
            // Not in this process's grid: the negative cache, else the database decides
            // (stopping a broadcast ends its sessions, so one update answers both
            // "unknown or ended" and "broadcast stopped"). Either way an unknown session
            // gets the protocol's "session over" answer (`active: false`), which SDKs
            // act on (a NOT_FOUND status would leave them heartbeating a dead session).
            if self.cached_unknown(&req.session_id).is_some() {
                return Ok(HeartbeatResponse::default());
            }
            self.allow_lookup(remote)?;
            let active = self.store.touch_session(&req.session_id, now_ms()).await?;
            if !active {
                tracing::debug!(session_id = %req.session_id, "heartbeat for unknown or ended session");
                self.remember_unknown(&req.session_id, crate::limits::Unknown::Ended);
                return Ok(HeartbeatResponse::default());
            }
        }
        let token_keys = self.tokens.public_keys();
        // The ingesting node's key first: beyond `MAX_KEYS` alive nodes, the others'
        // keys are what a viewer leaves out.
        let ingest = view
            .as_ref()
            .and_then(|v| self.ingest_node(&v.broadcast_id));
        let chunk_keys = self.chunk_keys(ingest.as_deref());
        match view {
            Some(view) => {
                let now = now_ms();
                let mut chunk_token = Vec::new();
                let mut expires = view.token.map_or(0, |t| t.expires_at_ms);
                if let Some(t) = view.token
                    && self.tokens.needs_renewal(t.expires_at_ms, now)
                {
                    match self
                        .tokens
                        .issue(&view.broadcast_id, view.peer_id, t.scopes, now)
                    {
                        // Recorded only if the session is still in its grid: a session
                        // revoked meanwhile gets nothing.
                        Ok(renewed)
                            if self.grids.set_token(
                                &req.session_id,
                                TokenState {
                                    scopes: t.scopes,
                                    expires_at_ms: renewed.expires_at_ms,
                                },
                            ) =>
                        {
                            tracing::debug!(session_id = %req.session_id, peer_id = view.peer_id, expires_at_ms = renewed.expires_at_ms, "chunk token renewed");
                            chunk_token = renewed.token;
                            expires = renewed.expires_at_ms;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(session_id = %req.session_id, error = %e, "cannot renew chunk token");
                        }
                    }
                }
                Ok(HeartbeatResponse {
                    active: true,
                    parents: self.with_tickets(&view.broadcast_id, view.peer_id, view.parents),
                    neighbours: view.neighbours,
                    chunk_token,
                    token_expires_at_unix_ms: expires,
                    revoked_peer_ids: self.revocations.list(&view.broadcast_id, now),
                    token_keys,
                    chunk_keys,
                })
            }
            None => {
                // Active in the database but not in this process's grid (the control
                // plane restarted, or the session expired a moment ago): no news, the
                // viewer keeps its current parents. Its token cannot be renewed here (the
                // peer id is unknown): the SDK joins again before it expires.
                tracing::debug!(session_id = %req.session_id, "heartbeat for a session without grid state");
                Ok(HeartbeatResponse {
                    active: true,
                    token_keys,
                    chunk_keys,
                    ..Default::default()
                })
            }
        }
    }

    async fn leave(
        &self,
        req: LeaveRequest,
        remote: Option<std::net::SocketAddr>,
    ) -> ApiResult<LeaveResponse> {
        validate::id("session_id", &req.session_id)?;
        // Idempotent: leaving twice, or leaving an unknown session, is not an error; a
        // session this process does not hold costs one database write at most (then
        // the negative cache answers).
        let grid = self.grids.leave(&req.session_id);
        if grid.is_none() {
            if self.cached_unknown(&req.session_id).is_some() {
                return Ok(LeaveResponse {});
            }
            self.allow_lookup(remote)?;
        }
        let ended = self.store.end_session(&req.session_id, now_ms()).await?;
        if grid.is_none() {
            self.remember_unknown(&req.session_id, crate::limits::Unknown::Ended);
        }
        tracing::debug!(
            session_id = %req.session_id,
            ended,
            peer_id = grid.map(|(p, _)| p),
            reparented = grid.map_or(0, |(_, m)| m),
            "viewer left"
        );
        Ok(LeaveResponse {})
    }

    async fn reparent(&self, req: ReparentRequest) -> ApiResult<ReparentResponse> {
        validate::id("session_id", &req.session_id)?;
        if req.exclude_peer_ids.len() > live::MAX_EXCLUDE {
            return Err(ApiError::InvalidArgument(format!(
                "exclude_peer_ids has {} entries, at most {} allowed",
                req.exclude_peer_ids.len(),
                live::MAX_EXCLUDE
            )));
        }
        let (parent, moved) = self
            .grids
            .reparent(&req.session_id, req.substream, &req.exclude_peer_ids)
            .map_err(|e| match e {
                ReparentRefused::UnknownSession => ApiError::NotFound(format!(
                    "session {} is unknown, ended or expired; join again",
                    req.session_id
                )),
                e @ ReparentRefused::InvalidSubstream { .. } => {
                    ApiError::InvalidArgument(e.to_string())
                }
            })?;
        tracing::debug!(
            session_id = %req.session_id,
            substream = req.substream,
            excluded = ?req.exclude_peer_ids,
            parent = parent.peer.as_ref().map_or(0, |p| p.peer_id),
            reparented = moved,
            "viewer re-parented"
        );
        let parent = match self.grids.session_peer(&req.session_id) {
            Some((child, broadcast_id)) => self
                .with_tickets(&broadcast_id, child, vec![parent])
                .pop()
                .unwrap_or_default(),
            None => parent,
        };
        Ok(ReparentResponse {
            parent: Some(parent),
        })
    }

    async fn report_peer(&self, req: ReportPeerRequest) -> ApiResult<ReportPeerResponse> {
        validate::id("session_id", &req.session_id)?;
        if req.peer_id == 0 {
            return Err(ApiError::InvalidArgument("peer_id must not be 0".into()));
        }
        let kind = starling_proto::v1::PeerReportKind::try_from(req.kind)
            .map_err(|_| ApiError::InvalidArgument(format!("unknown report kind {}", req.kind)))?;
        let reason = validate::truncate(&req.reason, validate::MAX_SHORT_TEXT_BYTES);
        use crate::metrics::Refusal;
        let report = self
            .grids
            .report_bad_peer(&req.session_id, req.peer_id, kind)
            .map_err(|e| match e {
                ReportRefused::UnknownSession => ApiError::NotFound(format!(
                    "session {} is unknown, ended or expired; join again",
                    req.session_id
                )),
                ReportRefused::SelfReport => {
                    self.metrics.refused(Refusal::ReportSelf);
                    ApiError::InvalidArgument(e.to_string())
                }
                ReportRefused::TooManyReports => {
                    self.metrics.refused(Refusal::ReportTooMany);
                    ApiError::FailedPrecondition(e.to_string())
                }
                ReportRefused::NotAssigned { .. } => {
                    self.metrics.refused(Refusal::ReportNotAssigned);
                    ApiError::FailedPrecondition(e.to_string())
                }
            })?;
        tracing::warn!(
            session_id = %req.session_id,
            broadcast_id = %report.broadcast_id,
            reporter = report.reporter,
            peer_id = req.peer_id,
            kind = kind.as_str_name(),
            known_peer = report.known_peer,
            distinct_reporters = report.reporters,
            demoted = report.excluded,
            reparented = report.moved,
            reason = %reason,
            total_reports = self.grids.bad_peer_reports(),
            "peer reported"
        );
        if report.excluded {
            tracing::warn!(
                broadcast_id = %report.broadcast_id,
                peer_id = req.peer_id,
                kind = kind.as_str_name(),
                distinct_reporters = report.reporters,
                reparented = report.moved,
                "peer demoted by reports from distinct addresses; never a parent again"
            );
        }
        Ok(ReportPeerResponse {})
    }

    // ------------------------------------------------------------------ rights (admin)

    async fn revoke_viewer(&self, req: RevokeViewerRequest) -> ApiResult<RevokeViewerResponse> {
        validate::id("broadcast_id", &req.broadcast_id)?;
        let subject = req.subject.trim();
        let session = req.session_id.trim();
        let target = match (subject.is_empty(), session.is_empty()) {
            (false, true) => {
                if subject.len() > crate::credential::MAX_SUBJECT {
                    return Err(ApiError::InvalidArgument(format!(
                        "subject is {} bytes, at most {} allowed",
                        subject.len(),
                        crate::credential::MAX_SUBJECT
                    )));
                }
                RevokeTarget::Subject(subject)
            }
            (true, false) => {
                validate::id("session_id", session)?;
                RevokeTarget::Session(session)
            }
            _ => {
                return Err(ApiError::InvalidArgument(
                    "give exactly one of subject or session_id".into(),
                ));
            }
        };
        let id = req.broadcast_id.as_str();
        let _guard = self.assign_lock.lock().await;
        let b = self.require_broadcast(id).await?;
        let revoked = self.grids.revoke(id, target);
        let now = now_ms();
        let mut count = 0u32;
        for r in &revoked {
            self.store.end_session(&r.session_id, now).await?;
            count += 1;
        }
        // A session active in the database but not in this process's grid (e.g. joined
        // before a restart): ending it stops its heartbeats (and so its renewals).
        if let RevokeTarget::Session(s) = target
            && revoked.is_empty()
            && let Some(rec) = self.store.get_session(s).await?
            && rec.broadcast_id == id
            && rec.left_at_ms.is_none()
            && self.store.end_session(s, now).await?
        {
            count += 1;
        }
        if count == 0 {
            return Err(ApiError::NotFound(match target {
                RevokeTarget::Subject(_) => {
                    format!("no active session of broadcast {id} has that subject")
                }
                RevokeTarget::Session(s) => {
                    format!("session {s} is not an active session of broadcast {id}")
                }
            }));
        }
        // A revoked subject cannot join again with a credential issued before now.
        if let RevokeTarget::Subject(sub) = target {
            let now_s = u64::try_from(now / 1000).unwrap_or(0);
            let until = revoked
                .iter()
                .filter_map(|r| r.credential_expires_at)
                .max()
                .unwrap_or(now_s)
                .saturating_add(self.auth.leeway_secs());
            self.revocations.block_subject(id, sub, now_s, until);
        }
        let peer_ids: Vec<u64> = revoked.iter().map(|r| r.peer_id).collect();
        let ttl = self.tokens.ttl().saturating_add(SKEW_MARGIN);
        self.revocations.add(
            id,
            &peer_ids,
            now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
        );
        if let Some(node_id) = &b.node_id
            && !peer_ids.is_empty()
        {
            self.send(
                node_id,
                Command::Revoke(RevokeCommand {
                    broadcast_id: id.to_string(),
                    peer_ids: peer_ids.clone(),
                }),
            );
        }
        tracing::warn!(
            broadcast_id = %id,
            by = match target { RevokeTarget::Subject(_) => "subject", RevokeTarget::Session(_) => "session" },
            sessions = count,
            peer_ids = ?peer_ids,
            reparented = revoked.iter().map(|r| r.moved).sum::<usize>(),
            "viewer revoked"
        );
        Ok(RevokeViewerResponse {
            revoked_sessions: count,
        })
    }

    // ------------------------------------------------------------------ edge

    async fn register(&self, req: RegisterNodeRequest) -> ApiResult<RegisterNodeResponse> {
        validate::short_text("node_name", &req.node_name, false)?;
        validate::short_text("wire_addr", &req.wire_addr, true)?;
        validate::short_text("http_addr", &req.http_addr, true)?;
        let chunk_key = match &req.chunk_signing_key {
            None => None,
            Some(k) if k.ed25519.len() == 32 => Some(NodeKey {
                key_id: k.key_id,
                ed25519: k.ed25519.clone(),
            }),
            Some(k) => {
                return Err(ApiError::InvalidArgument(format!(
                    "chunk_signing_key.ed25519 is {} bytes, a raw Ed25519 public key has 32",
                    k.ed25519.len()
                )));
            }
        };
        let now = now_ms();
        let _guard = self.assign_lock.lock().await;
        if let Some(key) = &chunk_key {
            // Viewers index chunk keys by id, so a second key under an id in use would
            // shadow (or be shadowed by) an honest node's key. The same key again (a node
            // re-registering) is fine.
            let alive = self.store.list_alive_nodes().await?;
            if let Some(other) = alive.iter().find(|n| {
                n.chunk_key
                    .as_ref()
                    .is_some_and(|k| k.key_id == key.key_id && k.ed25519 != key.ed25519)
            }) {
                return Err(ApiError::AlreadyExists(format!(
                    "chunk_signing_key: key id {} is already used by alive node {} with a \
                     different public key; sign with another key (a node's key id is the first \
                     4 bytes of its public key)",
                    key.key_id, other.id
                )));
            }
        }
        let node = self
            .store
            .register_node(
                &NewNode {
                    id: validate::new_node_id(),
                    name: req.node_name.clone(),
                    wire_addr: req.wire_addr.clone(),
                    http_addr: req.http_addr.clone(),
                    cores: req.cores,
                    capacity_viewers: req.capacity_viewers,
                    chunk_key,
                },
                now,
            )
            .await?;
        self.links().insert(
            node.id.clone(),
            NodeLink {
                tx: None,
                detached_since_ms: Some(now),
                heard_ms: Some(now),
            },
        );
        tracing::info!(
            node_id = %node.id,
            name = %node.name,
            wire_addr = %node.wire_addr,
            http_addr = %node.http_addr,
            cores = node.cores,
            capacity_viewers = node.capacity_viewers,
            chunk_key_id = node.chunk_key.as_ref().map(|k| k.key_id),
            "data-plane node registered"
        );
        if node.chunk_key.is_none() {
            tracing::warn!(node_id = %node.id, "node declared no chunk-signing key: viewers cannot check its chunks");
        }
        self.reconcile_locked().await?;
        Ok(RegisterNodeResponse {
            node_id: node.id,
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            token_keys: self.tokens.public_keys(),
        })
    }

    async fn commands(
        &self,
        req: CommandsRequest,
    ) -> ApiResult<ReceiverStream<Result<NodeCommand, Status>>> {
        validate::id("node_id", &req.node_id)?;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable(
                "control plane is shutting down".into(),
            ));
        }
        let node_id = req.node_id.as_str();
        let _guard = self.assign_lock.lock().await;
        let node = self.store.get_node(node_id).await?;
        if !node.is_some_and(|n| n.alive) {
            return Err(ApiError::NotFound(format!(
                "node {node_id} is unknown or was declared dead; register again"
            )));
        }
        let replay: Vec<BroadcastRecord> = self
            .store
            .list_broadcasts_in_state(BroadcastState::Live)
            .await?
            .into_iter()
            .filter(|b| b.node_id.as_deref() == Some(node_id))
            .collect();
        // The replay: the current token keys, then every ingest, each followed by the
        // broadcast's recent revocations.
        let now = now_ms();
        let mut commands = vec![Command::Keys(KeysCommand {
            token_keys: self.tokens.public_keys(),
        })];
        for b in &replay {
            commands.push(Self::ingest_command(b));
            commands.extend(self.revoke_command(&b.id, now));
        }
        let (tx, rx) = mpsc::channel(self.config.command_buffer.max(1) + commands.len());
        for command in commands {
            tx.try_send(Ok(NodeCommand {
                command: Some(command),
            }))
            .map_err(|_| ApiError::Unavailable("command stream closed during replay".into()))?;
        }
        // Replaces (and so ends) any previous stream of this node.
        self.links().insert(
            node_id.to_string(),
            NodeLink {
                tx: Some(tx),
                detached_since_ms: None,
                heard_ms: Some(now_ms()),
            },
        );
        tracing::info!(
            node_id,
            replayed = replay.len(),
            "node command stream opened"
        );
        Ok(ReceiverStream::new(rx))
    }

    async fn report_health(&self, req: HealthReport) -> ApiResult<HealthReportAck> {
        validate::id("node_id", &req.node_id)?;
        let node_id = req.node_id.as_str();
        let now = now_ms();
        if let Some(link) = self.links().get_mut(node_id) {
            link.heard_ms = Some(now);
        }
        if !self.store.touch_node(node_id, req.viewers, now).await? {
            tracing::info!(
                node_id,
                "health report from unknown or dead node; it must register again"
            );
            return Ok(HealthReportAck { known: false });
        }
        for ingest in &req.ingests {
            if validate::id("ingests.broadcast_id", &ingest.broadcast_id).is_err() {
                tracing::info!(
                    node_id,
                    "health report with an invalid broadcast id; ignored"
                );
                continue;
            }
            let health = match SourceHealth::try_from(ingest.health) {
                Ok(SourceHealth::Unspecified) | Err(_) => SourceHealth::Unknown,
                Ok(h) => h,
            };
            let report = IngestReport {
                broadcast_id: ingest.broadcast_id.clone(),
                health,
                error: validate::truncate(&ingest.error, validate::MAX_ERROR_BYTES),
                last_seq: ingest.last_seq,
                content_type: validate::truncate(
                    &ingest.content_type,
                    validate::MAX_SHORT_TEXT_BYTES,
                ),
                viewers: ingest.viewers,
            };
            let applied = self
                .store
                .record_ingest_health(node_id, &report, now)
                .await?;
            if applied {
                self.grids
                    .set_rate(&ingest.broadcast_id, ingest.bitrate_kbps);
            } else {
                // Not live on this node (stopped, reassigned, unknown): the node missed
                // a stop command, or never should have ingested it.
                tracing::info!(node_id, broadcast_id = %ingest.broadcast_id, "node reports an ingest it should not run; sending stop");
                self.send(node_id, Self::stop_command(&ingest.broadcast_id));
            }
        }
        Ok(HealthReportAck { known: true })
    }
}

// ---------------------------------------------------------------------- reports (issue 5)

impl Core {
    async fn report(
        &self,
        req: starling_proto::v1::ReportRequest,
        remote: Option<std::net::SocketAddr>,
    ) -> ApiResult<starling_proto::v1::ReportResponse> {
        use crate::reports::SubmitError;
        validate::id("session_id", &req.session_id)?;
        let not_found =
            |id: &str| ApiError::NotFound(format!("session {id} not found; join again"));
        // Ended sessions may still send their final reports; only ids the database
        // does not know at all are answered from the negative cache.
        let known = self.grids.session_peer(&req.session_id).is_some()
            || self.reports.tracks(&req.session_id);
        if !known {
            if self.cached_unknown(&req.session_id) == Some(crate::limits::Unknown::Missing) {
                return Err(not_found(&req.session_id));
            }
            self.allow_lookup(remote)?;
        }
        let acked_seq = self
            .reports
            .submit(&req.session_id, req.reports, now_ms(), |b| {
                self.grids.rate(b)
            })
            .await
            .map_err(|e| match e {
                SubmitError::InvalidArgument(m) => ApiError::InvalidArgument(m),
                SubmitError::NotFound(id) => {
                    self.remember_unknown(&id, crate::limits::Unknown::Missing);
                    not_found(&id)
                }
                e @ (SubmitError::QueueFull(_) | SubmitError::NotDurable(_)) => {
                    ApiError::Unavailable(e.to_string())
                }
                SubmitError::Storage(e) => ApiError::Storage(e),
            })?;
        Ok(starling_proto::v1::ReportResponse { acked_seq })
    }

    async fn get_audience(
        &self,
        req: starling_proto::v1::GetAudienceRequest,
    ) -> ApiResult<starling_proto::v1::GetAudienceResponse> {
        use crate::reports::AudienceError;
        let b = self.require_broadcast(&req.broadcast_id).await?;
        let points = self
            .reports
            .audience(
                &b.id,
                req.from_unix_ms,
                req.to_unix_ms,
                req.step_s,
                now_ms(),
            )
            .await
            .map_err(|e| match e {
                AudienceError::InvalidArgument(m) => ApiError::InvalidArgument(m),
                AudienceError::Storage(e) => ApiError::Storage(e),
            })?;
        Ok(starling_proto::v1::GetAudienceResponse { points })
    }
}

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

#[tonic::async_trait]
impl AdminService for Api {
    async fn create_broadcast(
        &self,
        request: Request<CreateBroadcastRequest>,
    ) -> Result<Response<Broadcast>, Status> {
        self.core
            .create_broadcast(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("CreateBroadcast"))
    }

    async fn start_broadcast(
        &self,
        request: Request<BroadcastRef>,
    ) -> Result<Response<Broadcast>, Status> {
        self.core
            .start_broadcast(&request.into_inner().id)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("StartBroadcast"))
    }

    async fn stop_broadcast(
        &self,
        request: Request<BroadcastRef>,
    ) -> Result<Response<Broadcast>, Status> {
        self.core
            .stop_broadcast(&request.into_inner().id)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("StopBroadcast"))
    }

    async fn get_broadcast(
        &self,
        request: Request<BroadcastRef>,
    ) -> Result<Response<Broadcast>, Status> {
        self.core
            .get_broadcast(&request.into_inner().id)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("GetBroadcast"))
    }

    async fn list_broadcasts(
        &self,
        request: Request<ListBroadcastsRequest>,
    ) -> Result<Response<ListBroadcastsResponse>, Status> {
        self.core
            .list_broadcasts(request.into_inner().include_stopped)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("ListBroadcasts"))
    }

    async fn revoke_viewer(
        &self,
        request: Request<RevokeViewerRequest>,
    ) -> Result<Response<RevokeViewerResponse>, Status> {
        self.core
            .revoke_viewer(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("RevokeViewer"))
    }

    async fn get_audience(
        &self,
        request: Request<starling_proto::v1::GetAudienceRequest>,
    ) -> Result<Response<starling_proto::v1::GetAudienceResponse>, Status> {
        self.core
            .get_audience(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("GetAudience"))
    }
}

#[tonic::async_trait]
impl ViewerService for Api {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let remote = request.remote_addr();
        self.core
            .join(request.into_inner(), remote)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Join"))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let remote = request.remote_addr();
        self.core
            .heartbeat(request.into_inner(), remote)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Heartbeat"))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let remote = request.remote_addr();
        self.core
            .leave(request.into_inner(), remote)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Leave"))
    }

    async fn reparent(
        &self,
        request: Request<ReparentRequest>,
    ) -> Result<Response<ReparentResponse>, Status> {
        self.core
            .reparent(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Reparent"))
    }

    async fn report_peer(
        &self,
        request: Request<ReportPeerRequest>,
    ) -> Result<Response<ReportPeerResponse>, Status> {
        self.core
            .report_peer(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("ReportPeer"))
    }

    async fn report(
        &self,
        request: Request<starling_proto::v1::ReportRequest>,
    ) -> Result<Response<starling_proto::v1::ReportResponse>, Status> {
        let remote = request.remote_addr();
        self.core
            .report(request.into_inner(), remote)
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Report"))
    }
}

#[tonic::async_trait]
impl EdgeService for Api {
    async fn register(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        self.core
            .register(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Register"))
    }

    type CommandsStream = ReceiverStream<Result<NodeCommand, Status>>;

    async fn commands(
        &self,
        request: Request<CommandsRequest>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        self.core
            .commands(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Commands"))
    }

    async fn report_health(
        &self,
        request: Request<HealthReport>,
    ) -> Result<Response<HealthReportAck>, Status> {
        self.core
            .report_health(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("ReportHealth"))
    }
}
