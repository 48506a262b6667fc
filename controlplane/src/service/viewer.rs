//! `ViewerService`: heartbeat, leave, re-parent, bad-peer reports and quality reports
//! of viewer sessions, and the tonic service itself (join is in `join`, the session
//! stream in `session_stream`).

use starling_proto::v1::viewer_service_server::ViewerService;
use starling_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse,
    ReparentRequest, ReparentResponse, ReportPeerRequest, ReportPeerResponse, SessionUp,
};
use tonic::{Request, Response, Status};

use super::{Api, ApiError, ApiResult, Core, now_ms, respond};
use crate::live::{self, ReparentRefused, ReportRefused};
use crate::validate;

impl Core {
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
        let view = self
            .record_counters(
                &std::sync::Arc::from(req.session_id.as_str()),
                counters,
                req.upload_kbps,
            )
            .and_then(|_| self.grids.view(&req.session_id));
        if view.is_none() {
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
        // Only the keys of the nodes assigned to the viewer's broadcast.
        let chunk_keys = view
            .as_ref()
            .map(|v| self.chunk_keys_for(&v.broadcast_id))
            .unwrap_or_default();
        let run_epoch = view.as_ref().map_or(0, |v| self.run_epoch(&v.broadcast_id));
        match view {
            Some(view) => {
                let now = now_ms();
                let (chunk_token, expires) = match self.renew_token(
                    &req.session_id,
                    &view.broadcast_id,
                    view.peer_id,
                    view.token,
                    now,
                ) {
                    Some(renewed) => renewed,
                    None => (Vec::new(), view.token.map_or(0, |t| t.expires_at_ms)),
                };
                Ok(HeartbeatResponse {
                    active: true,
                    parents: self.with_tickets(&view.broadcast_id, view.peer_id, view.parents),
                    neighbours: view.neighbours,
                    chunk_token,
                    token_expires_at_unix_ms: expires,
                    revoked_peer_ids: self.revocations.list(&view.broadcast_id, now),
                    token_keys,
                    chunk_keys,
                    ticket_keys: self.ticket_keys(&view.broadcast_id, view.peer_id),
                    run_epoch,
                    server_time_unix_ms: now,
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
                    server_time_unix_ms: now_ms(),
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
        if req.unreachable_peer_ids.len() > live::MAX_EXCLUDE {
            return Err(ApiError::InvalidArgument(format!(
                "unreachable_peer_ids has {} entries, at most {} allowed",
                req.unreachable_peer_ids.len(),
                live::MAX_EXCLUDE
            )));
        }
        // Parents the viewer could not connect to: probed again (each at most every 30 s,
        // only the viewer's own recent parents); one that does not answer loses its
        // children.
        if self.prober.enabled() {
            for &id in req
                .unreachable_peer_ids
                .iter()
                .filter(|id| req.exclude_peer_ids.contains(id))
            {
                match self.grids.reprobe_target(&req.session_id, id) {
                    Some((parent_session, Some(addr))) => self.prober.reprobe(
                        self.grids.clone(),
                        self.metrics.clone(),
                        parent_session.to_string(),
                        addr,
                    ),
                    Some((parent_session, None)) => {
                        if let Some(moved) = self.grids.unreachable(&parent_session) {
                            self.metrics.probed(false);
                            tracing::info!(%parent_session, peer_id = id, moved,
                                "a child could not punch through to its parent: the parent \
                                 relays to nobody from now on");
                        }
                    }
                    None => {}
                }
            }
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
    type SessionStream = super::session_stream::SessionStream;

    async fn session(
        &self,
        request: Request<tonic::Streaming<SessionUp>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let remote = request.remote_addr();
        respond(
            "Session",
            self.core
                .open_session(
                    super::session_route::Inbound::Tonic(Box::new(request.into_inner())),
                    remote,
                )
                .await,
        )
    }

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
