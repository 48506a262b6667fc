//! `ViewerService.Join`: admission checks, the grid assignment, the chunk token and the
//! session row.
//!
//! The critical path makes no database read (broadcast and node rows come from
//! `join_cache`) and one shared write: the session row, group-committed with the other
//! joins in flight (`join_batch`). The row is queued right after the grid admission and
//! the signatures (token, parent tickets) are made while it commits; the answer waits
//! for the commit (a viewer never holds a session id the database does not know). No
//! signature is made under a shared lock. A flash crowd beyond the bound on joins in
//! flight is refused at once with a retry delay (`guards`).

use starling_proto::token::Scopes;
use starling_proto::v1::{
    BroadcastState, JoinRequest, JoinResponse, StreamParams, SubstreamParent, TicketKey,
};

use tonic::Status;

use super::join_batch::{WriteError, committed};
use super::{ApiError, ApiResult, Core, now_ms};
use crate::auth::ViewerIdentity;
use crate::live::{self, JoinInput, JoinRefused, TokenState};
use crate::store::NewSession;
use crate::tokens::takes_mac_tickets;
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

    pub(super) async fn join(
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
        let _permit = self.admit_join()?;
        validate::id("broadcast_id", &req.broadcast_id)?;
        validate::short_text("client_version", &req.client_version, false)?;
        validate::peer_addr(&req.peer_addr)?;
        let host_addr = validate::host_addr(&req.host_addr)?;
        let holder_key: [u8; 32] = req
            .holder_key
            .as_slice()
            .try_into()
            .ok()
            .filter(|k| *k != [0u8; 32])
            .ok_or_else(|| {
                ApiError::InvalidArgument(
                    "holder_key: a 32-byte Ed25519 public key is required (chunk tokens are \
                     bound to it: docs/PROTOCOL.md, proof of possession; is the SDK too old?)"
                        .into(),
                )
            })?;
        // An address the caller cannot have (not on its IP: behind a NAT it advertises
        // its private address; or someone else's) is never handed to other viewers: the
        // viewer joins as one that relays to nobody.
        let advertised = match crate::trust::check_peer_addr(
            req.peer_addr.trim(),
            remote,
            self.config.trust.peer_addr_check,
        ) {
            Ok(()) => req.peer_addr.trim(),
            Err(e) => {
                self.metrics.refused(crate::metrics::Refusal::PeerAddr);
                tracing::debug!(error = %e, "peer_addr ignored: the viewer joins without relaying");
                ""
            }
        };
        let id = req.broadcast_id.as_str();
        let b = self
            .join_cache
            .broadcast(&self.store, id, self.grids.now())
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
            .join_cache
            .node(&self.store, node_id, self.grids.now())
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
        let peer_addr = live::dialable_addr(advertised, remote);
        // Server-reflexive candidate: the SDK opens this connection from its peer
        // listener's port; observed with that same port, its router keeps ports (an
        // endpoint-independent mapping, or no NAT) and it can be punched to.
        let reflexive = remote.filter(|r| {
            host_addr.is_some_and(|h| h.port() == r.port() && h.is_ipv4() == r.is_ipv4())
        });
        // Behind a NAT without a usable address, a viewer whose router keeps ports may
        // still relay: by hole punching (decided right after the join, below).
        let punch_only = self.prober.enabled() && peer_addr.is_empty() && reflexive.is_some();
        let upload_kbps = if peer_addr.is_empty() && !punch_only {
            0
        } else {
            req.upload_kbps
        };
        let session_id = validate::new_session_id();
        let probe_addr = (self.prober.enabled() && upload_kbps > 0 && !punch_only)
            .then(|| peer_addr.parse::<std::net::SocketAddr>().ok())
            .flatten();
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
                mac_tickets: req.mac_tickets,
                probe_first: self.prober.enabled(),
                reflexive,
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
        if punch_only && upload_kbps > 0 {
            // Nothing to probe: the address it can be reached at opens only to hole
            // punching, and its router keeps ports, so it relays that way.
            if let Some(moved) = self.grids.probed(&session_id, false) {
                tracing::debug!(%session_id, moved, "relay reachable by hole punching only");
            }
        } else if let Some(addr) = probe_addr {
            self.prober.probe(
                self.grids.clone(),
                self.metrics.clone(),
                session_id.clone(),
                addr,
            );
        } else if grid.granted_kbps < upload_kbps {
            self.metrics.upload_capped_join();
        }
        // The row goes into the next group commit now; the signatures below overlap it.
        let queued = self
            .session_writer
            .enqueue(
                NewSession {
                    id: session_id.clone(),
                    broadcast_id: b.id.clone(),
                    client_version: req.client_version.clone(),
                    node_id: Some(node.id.clone()),
                },
                now_ms(),
            )
            .await;
        let answer = match queued {
            Ok(a) => a,
            Err(e) => {
                // Undo the grid admission: the viewer never learns its session id.
                self.grids.leave(&session_id);
                return Err(write_error(e));
            }
        };
        let scopes = if upload_kbps > 0 {
            Scopes::PLAY | Scopes::RELAY
        } else {
            Scopes::PLAY
        };
        let token = match self
            .tokens
            .issue(id, grid.peer_id, scopes, holder_key, now_ms())
        {
            Ok(t) => t,
            Err(e) => {
                self.grids.leave(&session_id);
                // The row is (being) written: end it, the viewer never learns its id.
                if committed(answer).await.is_ok()
                    && let Err(e) = self.store.end_session(&session_id, now_ms()).await
                {
                    tracing::warn!(session_id = %session_id, error = %e, "cannot end the session of a failed join");
                }
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
                holder_key,
            },
        );
        let parents = self.with_tickets(id, grid.peer_id, grid.parents);
        if let Err(e) = committed(answer).await {
            // Undo the grid admission: the viewer never learns its session id.
            self.grids.leave(&session_id);
            return Err(write_error(e));
        }
        tracing::debug!(
            session_id = %session_id,
            broadcast_id = %id,
            node_id = %node.id,
            peer_id = grid.peer_id,
            upload_kbps,
            granted_kbps = grid.granted_kbps,
            child_slots = grid.child_slots,
            server_parents = parents.iter().filter(|p| p.peer.is_none()).count(),
            reparented = grid.moved,
            subject = subject.as_deref().unwrap_or(""),
            token_key_id = self.tokens.signing_key_id(),
            "viewer joined"
        );
        if self.ingest_node(&b.id).as_deref() != Some(node.id.as_str())
            || self.run_epoch(&b.id) != b.run_epoch
        {
            self.set_ingest_node(&b.id, b.run_epoch, Some(&node.id));
        }
        let chunk_keys = self.chunk_keys_for(&b.id);
        Ok(JoinResponse {
            session_id,
            params: Some(StreamParams {
                broadcast_id: b.id.clone(),
                content_type: b.content_type.clone(),
                chunk_duration_ms: b.chunk_duration_ms,
                substreams: b.substreams,
            }),
            dataplane_wire_addr: node.wire_addr.clone(),
            dataplane_http_addr: node.http_addr.clone(),
            chunk_token: token.token,
            heartbeat_interval_ms: u32::try_from(self.config.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            peer_id: grid.peer_id,
            parents,
            neighbours: grid.neighbours,
            stream_kbps: grid.stream_kbps,
            child_slots: grid.child_slots,
            token_expires_at_unix_ms: token.expires_at_ms,
            token_keys: self.tokens.public_keys(),
            ticket_keys: self.ticket_keys(&b.id, grid.peer_id),
            observed_addr: remote.map(|r| r.to_string()).unwrap_or_default(),
            chunk_keys,
            report_interval_ms: u32::try_from(self.config.report_interval.as_millis())
                .unwrap_or(u32::MAX),
            run_epoch: b.run_epoch,
            server_time_unix_ms: now_ms(),
        })
    }

    /// Viewer `peer_id`'s keys for the version-2 tickets naming it, if it asked for them
    /// (its peer id says so: [`crate::tokens::MAC_TICKETS_BIT`]).
    pub(super) fn ticket_keys(&self, broadcast_id: &str, peer_id: u64) -> Vec<TicketKey> {
        if takes_mac_tickets(peer_id) {
            self.tokens.ticket_keys(broadcast_id, peer_id)
        } else {
            Vec::new()
        }
    }

    /// `parents` with a parent ticket on each peer entry ([`crate::tickets`]).
    pub(super) fn with_tickets(
        &self,
        broadcast_id: &str,
        child: u64,
        mut parents: Vec<SubstreamParent>,
    ) -> Vec<SubstreamParent> {
        self.tickets
            .attach(&self.tokens, broadcast_id, child, &mut parents, now_ms());
        parents
    }
}

/// A failed session-row write as the join's error.
fn write_error(e: WriteError) -> ApiError {
    match e {
        WriteError::Store(e) => ApiError::Storage(e),
        WriteError::Stopped => {
            ApiError::Unavailable("the control plane is shutting down; retry".to_string())
        }
    }
}
