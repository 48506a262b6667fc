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
//!   [`crate::grid::GridAssigner`] per LIVE broadcast with viewers, created at the first
//!   join and dropped by `StopBroadcast`. Sessions are written to the database as before
//!   (the record of the audience); parents, neighbours and byte counters live in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use starling_proto::v1::admin_service_server::AdminService;
use starling_proto::v1::edge_service_server::EdgeService;
use starling_proto::v1::node_command::Command;
use starling_proto::v1::viewer_service_server::ViewerService;
use starling_proto::v1::{
    Broadcast, BroadcastRef, BroadcastState, CommandsRequest, CreateBroadcastRequest, HealthReport,
    HealthReportAck, HeartbeatRequest, HeartbeatResponse, IngestCommand, JoinRequest, JoinResponse,
    LeaveRequest, LeaveResponse, ListBroadcastsRequest, ListBroadcastsResponse, NodeCommand,
    RegisterNodeRequest, RegisterNodeResponse, ReparentRequest, ReparentResponse, SourceHealth,
    StopIngestCommand, StreamParams,
};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::assign::{self, CandidateNode, LiveBroadcast, NodeLiveness};
use crate::grid::GridError;
use crate::live::{self, JoinInput, JoinRefused, LiveGrids, ReparentRefused};
use crate::store::{
    BroadcastRecord, IngestReport, NewBroadcast, NewNode, NewSession, NodeRecord, Store, StoreError,
};
use crate::validate::{self, Invalid};

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
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            heartbeat_interval: Duration::from_millis(1000),
            node_timeout: Duration::from_millis(5000),
            liveness_tick: Duration::from_millis(500),
            command_buffer: 64,
            missed_heartbeats: 3,
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
    /// Temporarily impossible; retry later.
    #[error("{0}")]
    Unavailable(String),
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
            ApiError::Storage(e) => {
                tracing::error!(rpc, error = %e, "storage error");
                Status::internal(format!("storage error: {e}"))
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;
type CommandSender = mpsc::Sender<Result<NodeCommand, Status>>;

/// The unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

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
}

impl Core {
    /// Creates the services' state over an already migrated store.
    pub fn new(store: Store, config: ServiceConfig) -> Arc<Core> {
        Arc::new(Core {
            store,
            config,
            links: std::sync::Mutex::new(HashMap::new()),
            assign_lock: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            grids: LiveGrids::new(),
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
        let live = self
            .store
            .list_broadcasts_in_state(BroadcastState::Live)
            .await?;
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
            match (&change.to, updated) {
                (Some(node_id), Some(b)) => {
                    tracing::info!(
                        broadcast_id = %b.id,
                        node_id = %node_id,
                        previous = change.from.as_deref().unwrap_or(""),
                        "broadcast assigned"
                    );
                    self.send(node_id, Self::ingest_command(&b));
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
                    });
                    if link.tx.as_ref().is_some_and(mpsc::Sender::is_closed) {
                        tracing::info!(node_id = %n.id, "node command stream closed");
                        link.tx = None;
                        link.detached_since_ms = Some(now);
                    }
                    NodeLiveness {
                        id: n.id.clone(),
                        last_seen_ms: n.last_seen_ms,
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
        for e in &expired {
            tracing::info!(
                session_id = %e.session_id,
                broadcast_id = %e.broadcast_id,
                peer_id = e.peer_id,
                reparented = e.moved,
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "viewer session expired (missed heartbeats)"
            );
            self.store.end_session(&e.session_id, now).await?;
        }
        Ok(expired.len())
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
            };
            match self.store.create_broadcast(&new, now_ms()).await {
                Ok(b) => {
                    tracing::info!(broadcast_id = %b.id, name = %b.name, source_url = %b.source_url, "broadcast created");
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
        validate::id("broadcast_id", &req.broadcast_id)?;
        validate::short_text("client_version", &req.client_version, false)?;
        validate::peer_addr(&req.peer_addr)?;
        // `req.credential` is accepted and deliberately not checked here: verifying
        // viewer JWTs and minting chunk tokens belongs to the rights-management work,
        // which plugs in at this point.
        let id = req.broadcast_id.as_str();
        let b = self
            .store
            .get_broadcast(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("broadcast {id} not found")))?;
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
            child_slots = grid.child_slots,
            server_parents = grid.parents.iter().filter(|p| p.peer.is_none()).count(),
            reparented = grid.moved,
            "viewer joined"
        );
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
            chunk_token: Vec::new(),
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            peer_id: grid.peer_id,
            parents: grid.parents,
            neighbours: grid.neighbours,
            stream_kbps: grid.stream_kbps,
            child_slots: grid.child_slots,
        })
    }

    async fn heartbeat(&self, req: HeartbeatRequest) -> ApiResult<HeartbeatResponse> {
        validate::id("session_id", &req.session_id)?;
        // Stopping a broadcast ends its sessions, so one update answers both "unknown
        // or ended" and "broadcast stopped".
        let active = self.store.touch_session(&req.session_id, now_ms()).await?;
        if !active {
            tracing::debug!(session_id = %req.session_id, "heartbeat for unknown or ended session");
            return Ok(HeartbeatResponse::default());
        }
        let counters = [
            req.bytes_from_server,
            req.bytes_from_peers,
            req.bytes_uploaded,
        ];
        match self.grids.heartbeat(&req.session_id, counters) {
            Some(view) => Ok(HeartbeatResponse {
                active: true,
                parents: view.parents,
                neighbours: view.neighbours,
            }),
            None => {
                // Active in the database but not in this process's grid (the control
                // plane restarted, or the session expired a moment ago): no news, the
                // viewer keeps its current parents.
                tracing::debug!(session_id = %req.session_id, "heartbeat for a session without grid state");
                Ok(HeartbeatResponse {
                    active: true,
                    ..Default::default()
                })
            }
        }
    }

    async fn leave(&self, req: LeaveRequest) -> ApiResult<LeaveResponse> {
        validate::id("session_id", &req.session_id)?;
        // Idempotent: leaving twice, or leaving an unknown session, is not an error.
        let ended = self.store.end_session(&req.session_id, now_ms()).await?;
        let grid = self.grids.leave(&req.session_id);
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
        Ok(ReparentResponse {
            parent: Some(parent),
        })
    }

    // ------------------------------------------------------------------ edge

    async fn register(&self, req: RegisterNodeRequest) -> ApiResult<RegisterNodeResponse> {
        validate::short_text("node_name", &req.node_name, false)?;
        validate::short_text("wire_addr", &req.wire_addr, true)?;
        validate::short_text("http_addr", &req.http_addr, true)?;
        let now = now_ms();
        let _guard = self.assign_lock.lock().await;
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
                },
                now,
            )
            .await?;
        self.links().insert(
            node.id.clone(),
            NodeLink {
                tx: None,
                detached_since_ms: Some(now),
            },
        );
        tracing::info!(
            node_id = %node.id,
            name = %node.name,
            wire_addr = %node.wire_addr,
            http_addr = %node.http_addr,
            cores = node.cores,
            capacity_viewers = node.capacity_viewers,
            "data-plane node registered"
        );
        self.reconcile_locked().await?;
        Ok(RegisterNodeResponse {
            node_id: node.id,
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
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
        let (tx, rx) = mpsc::channel(self.config.command_buffer.max(1) + replay.len());
        for b in &replay {
            tx.try_send(Ok(NodeCommand {
                command: Some(Self::ingest_command(b)),
            }))
            .map_err(|_| ApiError::Unavailable("command stream closed during replay".into()))?;
        }
        // Replaces (and so ends) any previous stream of this node.
        self.links().insert(
            node_id.to_string(),
            NodeLink {
                tx: Some(tx),
                detached_since_ms: None,
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
        self.core
            .heartbeat(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.into_status("Heartbeat"))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        self.core
            .leave(request.into_inner())
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
