//! `ViewerService`: join, heartbeat, leave, re-parent, bad-peer reports and quality
//! reports of viewer sessions.

use starling_proto::token::Scopes;
use starling_proto::v1::viewer_service_server::ViewerService;
use starling_proto::v1::{
    BroadcastState, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaveRequest,
    LeaveResponse, ReparentRequest, ReparentResponse, ReportPeerRequest, ReportPeerResponse,
    StreamParams, SubstreamParent,
};
use tonic::{Request, Response, Status};

use super::{Api, ApiError, ApiResult, Core, now_ms, respond};
use crate::auth::ViewerIdentity;
use crate::live::{self, JoinInput, JoinRefused, ReparentRefused, ReportRefused, TokenState};
use crate::store::NewSession;
use crate::validate;
use starling_grid::assign::GridError;

fn state_name(state: BroadcastState) -> &'static str {
    match state {
        BroadcastState::Unspecified => "in an unknown state",
        BroadcastState::Created => "not started",
        BroadcastState::Live => "live",
        BroadcastState::Stopped => "stopped",
    }
}

impl Core {
    // ------------------------------------------------------------------ viewer

    async fn join(
        &self,
        req: JoinRequest,
        remote: Option<std::net::SocketAddr>,
    ) -> ApiResult<JoinResponse> {
        if let Some(r) = remote {
            let now = self.grids.now();
            let checked = self.guards.lock().join.check(r.ip(), now);
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
            self.touches.lock().insert(req.session_id.clone(), now_ms());
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
}

#[tonic::async_trait]
impl ViewerService for Api {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let remote = request.remote_addr();
        respond("Join", self.core.join(request.into_inner(), remote).await)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let remote = request.remote_addr();
        respond(
            "Heartbeat",
            self.core.heartbeat(request.into_inner(), remote).await,
        )
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let remote = request.remote_addr();
        respond("Leave", self.core.leave(request.into_inner(), remote).await)
    }

    async fn reparent(
        &self,
        request: Request<ReparentRequest>,
    ) -> Result<Response<ReparentResponse>, Status> {
        respond("Reparent", self.core.reparent(request.into_inner()).await)
    }

    async fn report_peer(
        &self,
        request: Request<ReportPeerRequest>,
    ) -> Result<Response<ReportPeerResponse>, Status> {
        respond(
            "ReportPeer",
            self.core.report_peer(request.into_inner()).await,
        )
    }

    async fn report(
        &self,
        request: Request<starling_proto::v1::ReportRequest>,
    ) -> Result<Response<starling_proto::v1::ReportResponse>, Status> {
        let remote = request.remote_addr();
        respond(
            "Report",
            self.core.report(request.into_inner(), remote).await,
        )
    }
}
