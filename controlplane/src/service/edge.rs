//! `EdgeService`: data-plane node registration, command streams (with the replay of the
//! desired state) and health reports.

use std::sync::atomic::Ordering;

use starling_proto::v1::edge_service_server::EdgeService;
use starling_proto::v1::node_command::Command;
use starling_proto::v1::{
    BroadcastState, CommandsRequest, HealthReport, HealthReportAck, KeysCommand, NodeCommand,
    RegisterNodeRequest, RegisterNodeResponse, SourceHealth,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Api, ApiError, ApiResult, Core, NodeLink, now_ms, respond};
use crate::auth::NodeIdentity;
use crate::store::{BroadcastRecord, IngestReport, NewNode, NodeKey};
use crate::validate;

impl Core {
    // ------------------------------------------------------------------ edge

    async fn register(
        &self,
        req: RegisterNodeRequest,
        who: Option<&NodeIdentity>,
    ) -> ApiResult<RegisterNodeResponse> {
        let auth = self.authorize_node(who).await?;
        validate::short_text("node_name", &req.node_name, false)?;
        let node_name = self.registered_name(&auth, &req.node_name).await?;
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
                    name: node_name,
                    wire_addr: req.wire_addr.clone(),
                    http_addr: req.http_addr.clone(),
                    cores: req.cores,
                    capacity_viewers: req.capacity_viewers,
                    chunk_key,
                },
                now,
            )
            .await?;
        self.links.lock().insert(
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
        who: Option<&NodeIdentity>,
    ) -> ApiResult<ReceiverStream<Result<NodeCommand, Status>>> {
        validate::id("node_id", &req.node_id)?;
        let auth = self.authorize_node(who).await?;
        self.check_node_binding(&auth, &req.node_id).await?;
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
        self.links.lock().insert(
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

    async fn report_health(
        &self,
        req: HealthReport,
        who: Option<&NodeIdentity>,
    ) -> ApiResult<HealthReportAck> {
        validate::id("node_id", &req.node_id)?;
        let auth = self.authorize_node(who).await?;
        self.check_node_binding(&auth, &req.node_id).await?;
        let node_id = req.node_id.as_str();
        let now = now_ms();
        if let Some(link) = self.links.lock().get_mut(node_id) {
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
                self.join_cache
                    .ingest_reported(&report.broadcast_id, &report.content_type);
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

#[tonic::async_trait]
impl EdgeService for Api {
    async fn register(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let who = request.extensions().get::<NodeIdentity>().cloned();
        respond(
            "Register",
            self.core.register(request.into_inner(), who.as_ref()).await,
        )
    }

    type CommandsStream = ReceiverStream<Result<NodeCommand, Status>>;

    async fn commands(
        &self,
        request: Request<CommandsRequest>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        let who = request.extensions().get::<NodeIdentity>().cloned();
        respond(
            "Commands",
            self.core.commands(request.into_inner(), who.as_ref()).await,
        )
    }

    async fn report_health(
        &self,
        request: Request<HealthReport>,
    ) -> Result<Response<HealthReportAck>, Status> {
        let who = request.extensions().get::<NodeIdentity>().cloned();
        respond(
            "ReportHealth",
            self.core
                .report_health(request.into_inner(), who.as_ref())
                .await,
        )
    }
}
