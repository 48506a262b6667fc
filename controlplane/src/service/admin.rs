//! `AdminService`: broadcasts (create, start, stop, get, list, with their live grid
//! figures), viewer revocation and the audience history.

use std::collections::HashMap;

use starling_proto::v1::admin_service_server::AdminService;
use starling_proto::v1::node_command::Command;
use starling_proto::v1::{
    AddNodeCredentialRequest, AddNodeCredentialResponse, Broadcast, BroadcastRef, BroadcastState,
    CreateBroadcastRequest, ListBroadcastsRequest, ListBroadcastsResponse,
    ListNodeCredentialsRequest, ListNodeCredentialsResponse, RevokeCommand,
    RevokeNodeCredentialRequest, RevokeNodeCredentialResponse, RevokeViewerRequest,
    RevokeViewerResponse,
};
use tonic::{Request, Response, Status};

use super::{Api, ApiError, ApiResult, Core, now_ms, respond};
use crate::live::RevokeTarget;
use crate::store::{BroadcastRecord, NewBroadcast, NodeRecord, StoreError};
use crate::tokens::SKEW_MARGIN;
use crate::validate;

impl Core {
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
            run_epoch: b.run_epoch,
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
        let started = self
            .store
            .set_broadcast_state(id, BroadcastState::Live, now_ms())
            .await;
        self.join_cache.forget_broadcast(id);
        started?;
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
            .await;
        self.join_cache.forget_broadcast(id);
        let updated =
            updated?.ok_or_else(|| ApiError::NotFound(format!("broadcast {id} not found")))?;
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

    pub(super) async fn list_broadcasts(
        &self,
        include_stopped: bool,
    ) -> ApiResult<ListBroadcastsResponse> {
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

    pub(super) async fn get_audience(
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

#[tonic::async_trait]
impl AdminService for Api {
    async fn add_node_credential(
        &self,
        request: Request<AddNodeCredentialRequest>,
    ) -> Result<Response<AddNodeCredentialResponse>, Status> {
        respond(
            "AddNodeCredential",
            self.core
                .add_node_credential(&request.into_inner().name)
                .await,
        )
    }

    async fn revoke_node_credential(
        &self,
        request: Request<RevokeNodeCredentialRequest>,
    ) -> Result<Response<RevokeNodeCredentialResponse>, Status> {
        respond(
            "RevokeNodeCredential",
            self.core
                .revoke_node_credential(&request.into_inner().name)
                .await,
        )
    }

    async fn list_node_credentials(
        &self,
        _request: Request<ListNodeCredentialsRequest>,
    ) -> Result<Response<ListNodeCredentialsResponse>, Status> {
        respond(
            "ListNodeCredentials",
            self.core.list_node_credentials().await,
        )
    }

    async fn create_broadcast(
        &self,
        request: Request<CreateBroadcastRequest>,
    ) -> Result<Response<Broadcast>, Status> {
        respond(
            "CreateBroadcast",
            self.core.create_broadcast(request.into_inner()).await,
        )
    }

    async fn start_broadcast(
        &self,
        request: Request<BroadcastRef>,
    ) -> Result<Response<Broadcast>, Status> {
        respond(
            "StartBroadcast",
            self.core.start_broadcast(&request.into_inner().id).await,
        )
    }

    async fn stop_broadcast(
        &self,
        request: Request<BroadcastRef>,
    ) -> Result<Response<Broadcast>, Status> {
        respond(
            "StopBroadcast",
            self.core.stop_broadcast(&request.into_inner().id).await,
        )
    }

    async fn get_broadcast(
        &self,
        request: Request<BroadcastRef>,
    ) -> Result<Response<Broadcast>, Status> {
        respond(
            "GetBroadcast",
            self.core.get_broadcast(&request.into_inner().id).await,
        )
    }

    async fn list_broadcasts(
        &self,
        request: Request<ListBroadcastsRequest>,
    ) -> Result<Response<ListBroadcastsResponse>, Status> {
        respond(
            "ListBroadcasts",
            self.core
                .list_broadcasts(request.into_inner().include_stopped)
                .await,
        )
    }

    async fn revoke_viewer(
        &self,
        request: Request<RevokeViewerRequest>,
    ) -> Result<Response<RevokeViewerResponse>, Status> {
        respond(
            "RevokeViewer",
            self.core.revoke_viewer(request.into_inner()).await,
        )
    }

    async fn get_audience(
        &self,
        request: Request<starling_proto::v1::GetAudienceRequest>,
    ) -> Result<Response<starling_proto::v1::GetAudienceResponse>, Status> {
        respond(
            "GetAudience",
            self.core.get_audience(request.into_inner()).await,
        )
    }
}
