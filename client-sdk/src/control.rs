//! The control-plane side: `ViewerService` Join (retried on `RESOURCE_EXHAUSTED` with
//! the server's pushback plus jitter) / Session (the stream, as typed deltas) /
//! Heartbeat / Leave / Reparent / ReportPeer / Report over gRPC, on one HTTP/2 channel
//! with keep-alive.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    HeartbeatRequest, JoinRequest, LeaveRequest, PeerRef, PeerReportKind, PublicKey,
    ReparentRequest, ReportPeerRequest, ReportRequest, SessionDown, SessionUp, StreamParams,
    SubstreamParent, TicketKey, ViewerReport,
};
use tonic::transport::Channel;

use starling_grid::{Parent, PeerId};

use crate::clock::ServerTime;
use crate::error::SdkError;
use crate::rights::{KeyMaterial, TicketKeys};

/// Heartbeat interval used when the control plane does not say.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// A peer the control plane named (a parent or a neighbour), and where to dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAddr {
    pub id: PeerId,
    pub addr: String,
    /// Reachable only by hole punching (`PeerRef.punch`): dial from the peer
    /// listener's port ([`crate::punch`]).
    pub punch: bool,
}

impl PeerAddr {
    fn from_ref(r: PeerRef) -> Option<PeerAddr> {
        // A peer without an address cannot be connected to: treated as absent.
        (!r.addr.is_empty()).then_some(PeerAddr {
            id: r.peer_id,
            addr: r.addr,
            punch: r.punch,
        })
    }
}

/// The control plane's answer for one substream: who feeds it, and for a peer parent
/// where to dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssignedParent {
    pub parent: Parent,
    /// Where to dial a peer parent (empty for the data plane).
    pub addr: String,
    /// The peer parent is reachable only by hole punching ([`PeerAddr::punch`]).
    pub punch: bool,
}

impl AssignedParent {
    /// From the wire: no peer, or a peer without an address, is the data plane.
    fn from_ref(r: Option<PeerRef>) -> AssignedParent {
        match r.and_then(PeerAddr::from_ref) {
            Some(p) => AssignedParent {
                parent: Parent::Peer(p.id),
                addr: p.addr,
                punch: p.punch,
            },
            None => AssignedParent {
                parent: Parent::Server,
                addr: String::new(),
                punch: false,
            },
        }
    }

    /// The peer parent and its address (`None` for the data plane).
    pub fn peer(&self) -> Option<PeerAddr> {
        match self.parent {
            Parent::Peer(id) => Some(PeerAddr {
                id,
                addr: self.addr.clone(),
                punch: self.punch,
            }),
            Parent::Server => None,
        }
    }
}

/// A parent ticket as the control plane hands it out with an assignment: the child
/// presents it to `parent` in a `TICKET` frame to be admitted for `substream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub substream: u32,
    pub parent: PeerId,
    pub ticket: Bytes,
}

/// The grid assignment carried by `Join` and `Heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Assignment {
    /// `(substream, parent)`, as sent (possibly incomplete or empty).
    pub parents: Vec<(u32, AssignedParent)>,
    pub neighbours: Vec<PeerAddr>,
    /// The tickets of the peer parents (an older control plane sends none).
    pub tickets: Vec<Ticket>,
}

/// The ticket of one `SubstreamParent`, if it names a peer and carries one.
fn ticket_of(p: &SubstreamParent) -> Option<Ticket> {
    let peer = p.peer.as_ref()?;
    (!p.ticket.is_empty()).then(|| Ticket {
        substream: p.substream,
        parent: peer.peer_id,
        ticket: Bytes::from(p.ticket.clone()),
    })
}

pub(crate) fn assignment(parents: Vec<SubstreamParent>, neighbours: Vec<PeerRef>) -> Assignment {
    Assignment {
        tickets: parents.iter().filter_map(ticket_of).collect(),
        parents: parents
            .into_iter()
            .map(|p| (p.substream, AssignedParent::from_ref(p.peer)))
            .collect(),
        neighbours: neighbours
            .into_iter()
            .filter_map(PeerAddr::from_ref)
            .collect(),
    }
}

/// What `Join` gave us.
#[derive(Debug, Clone)]
pub(crate) struct JoinInfo {
    pub session_id: String,
    pub wire_addr: String,
    pub params: Option<StreamParams>,
    pub token: Bytes,
    pub heartbeat: Duration,
    pub peer_id: PeerId,
    pub assignment: Assignment,
    pub stream_kbps: u32,
    pub child_slots: u32,
    /// Expiry of `token` (unix ms; 0 = not said).
    pub token_expires_at_ms: u64,
    pub token_keys: Vec<KeyMaterial>,
    pub chunk_keys: Vec<KeyMaterial>,
    /// Our keys for version-2 parent tickets (secret; see [`Rights::set_ticket_keys`]).
    pub ticket_keys: TicketKeys,
    /// How often to report (`None`: the control plane did not say).
    pub report_interval: Option<Duration>,
    /// Where the control plane saw the `Join` come from (the server-reflexive address
    /// behind a NAT); `None` if it did not say.
    pub observed_addr: Option<std::net::SocketAddr>,
    /// The broadcast's current run (0: not said; no run check).
    pub run_epoch: u64,
    /// The control plane's clock as it answered.
    pub server_time: Option<ServerTime>,
}

fn keys(v: Vec<PublicKey>) -> Vec<KeyMaterial> {
    v.into_iter().map(|k| (k.key_id, k.ed25519)).collect()
}

fn ticket_keys(v: Vec<TicketKey>) -> TicketKeys {
    TicketKeys(v.into_iter().map(|k| (k.key_id, k.key)).collect())
}

fn ms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// What this viewer offers the grid in `Join`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Offer {
    /// `host:port` of the peer listener; empty = does not relay.
    pub peer_addr: String,
    pub upload_kbps: u32,
    /// The peer listener's own `ip:port` (the host candidate, `JoinRequest.host_addr`);
    /// empty without a listener.
    pub host_addr: String,
}

/// Cumulative counters reported in `Heartbeat`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub bytes_from_server: u64,
    pub bytes_from_peers: u64,
    pub bytes_uploaded: u64,
    /// Current upload budget (kbit/s), 0 = unchanged since join.
    pub upload_kbps: u32,
}

/// The answer to `Heartbeat`.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatInfo {
    pub active: bool,
    pub assignment: Assignment,
    /// A renewed chunk token (empty = keep the current one).
    pub token: Bytes,
    pub token_expires_at_ms: u64,
    pub revoked: Vec<PeerId>,
    pub token_keys: Vec<KeyMaterial>,
    pub chunk_keys: Vec<KeyMaterial>,
    /// Our keys for version-2 parent tickets (secret; see [`Rights::set_ticket_keys`]).
    pub ticket_keys: TicketKeys,
    /// The broadcast's current run (0: not said).
    pub run_epoch: u64,
    pub server_time: Option<ServerTime>,
}

/// How the control-plane channel is set up and how `Join` is retried.
#[derive(Debug, Clone)]
pub(crate) struct ControlOptions {
    /// Connect timeout, and the limit for a unary call (or a stream's opening).
    pub timeout: Duration,
    /// Bind the channel's sockets to this IP ([`control_bind_ip`]).
    pub local: Option<IpAddr>,
    /// Connect from this address: the peer listener's, so that the control plane
    /// observes the listener port's public mapping ([`crate::punch::BoundConnector`]).
    /// Overrides `local`.
    pub bind_from: Option<std::net::SocketAddr>,
    /// HTTP/2 PING interval (`None`: no keep-alive).
    pub keep_alive: Option<Duration>,
    /// A PING unanswered this long closes the connection (its streams fail).
    pub keep_alive_timeout: Duration,
    /// Most `Join` attempts when the control plane answers `RESOURCE_EXHAUSTED`.
    pub join_attempts: u32,
    /// No `Join` retry starts later than this after the first attempt.
    pub join_deadline: Duration,
    /// A `Join` answer without chunk keys is an error ([`SdkError::Unverifiable`]).
    pub require_chunk_keys: bool,
    /// Our holder key's public half, sent in every `Join` (`JoinRequest.holder_key`):
    /// the chunk tokens are bound to it, re-joins included.
    pub holder_key: [u8; 32],
    /// TLS or the plaintext opt-in ([`crate::ViewerConfig::transport`]).
    pub transport: starling_proto::transport::Transport,
}

/// First own back-off of a `Join` refused as busy without a pushback; doubled per
/// refusal up to [`JOIN_BACKOFF_MAX`].
const JOIN_BACKOFF_INITIAL: Duration = Duration::from_millis(250);
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(8);

/// `base` plus a uniformly random extra of 0..50 % of it. Never shorter than `base`,
/// so a server's retry pushback is always honoured; the spread de-synchronises a crowd
/// refused in the same instant without doubling anyone's wait (as full jitter
/// between `base` and `2 * base` would at worst).
pub(crate) fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(unit_random() * 0.5)
}

/// A number in `[0, 1)`, random enough for jitter (std's per-process random hash keys
/// over a counter; no RNG dependency).
fn unit_random() -> f64 {
    use std::hash::BuildHasher;
    static N: AtomicU64 = AtomicU64::new(0);
    let h = std::hash::RandomState::new().hash_one(N.fetch_add(1, Ordering::Relaxed));
    // 53 random bits as a fraction.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// One change pushed on the session stream (`SessionDown`), typed. Every field is a
/// delta: empty means unchanged.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionDelta {
    pub active: bool,
    /// The changed parents (and their tickets); `neighbours` is the new full list only
    /// when `neighbours_changed`.
    pub assignment: Assignment,
    pub neighbours_changed: bool,
    pub token: Bytes,
    pub token_expires_at_ms: u64,
    pub revoked: Vec<PeerId>,
    /// Non-zero: `token_keys` and `chunk_keys` are the new full sets.
    pub keys_version: u64,
    pub token_keys: Vec<KeyMaterial>,
    pub chunk_keys: Vec<KeyMaterial>,
    /// Our keys for version-2 parent tickets (secret; see [`Rights::set_ticket_keys`]).
    pub ticket_keys: TicketKeys,
    pub counters_interval: Option<Duration>,
    /// The broadcast's current run (0: unchanged).
    pub run_epoch: u64,
    pub server_time: Option<ServerTime>,
    /// Children to punch towards now (`SessionDown.punch`), each with its reflexive
    /// address.
    pub punch: Vec<PeerAddr>,
    /// Our child slots, re-counted (0: unchanged).
    pub child_slots: u32,
}

impl SessionDelta {
    fn from_wire(d: SessionDown) -> SessionDelta {
        SessionDelta {
            active: d.active,
            assignment: assignment(d.parents, d.neighbours),
            neighbours_changed: d.neighbours_changed,
            token: Bytes::from(d.chunk_token),
            token_expires_at_ms: ms(d.token_expires_at_unix_ms),
            revoked: d.revoked_peer_ids,
            keys_version: d.keys_version,
            token_keys: keys(d.token_keys),
            chunk_keys: keys(d.chunk_keys),
            ticket_keys: ticket_keys(d.ticket_keys),
            counters_interval: (d.counters_interval_ms > 0)
                .then(|| Duration::from_millis(u64::from(d.counters_interval_ms))),
            run_epoch: d.run_epoch,
            server_time: ServerTime::now(d.server_time_unix_ms, Duration::ZERO),
            punch: d.punch.into_iter().filter_map(PeerAddr::from_ref).collect(),
            child_slots: d.child_slots,
        }
    }
}

/// What the viewer sends up the session stream.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SessionUpdate {
    pub counters: Counters,
    /// The key sets' version held (first message only; 0 = none).
    pub keys_version: u64,
    pub refresh_keys: bool,
}

/// Messages queued towards the control plane on one stream (a full queue means the
/// transport is stuck: the update is skipped and the next one carries the counters).
const SESSION_UP_QUEUE: usize = 4;

/// An open session stream.
pub(crate) struct SessionStream {
    up: tokio::sync::mpsc::Sender<SessionUp>,
    down: tonic::Streaming<SessionDown>,
}

/// Why a message could not be queued on the session stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpError {
    /// The queue is full (retry with the next update).
    Full,
    /// The stream is gone.
    Closed,
}

impl SessionStream {
    /// The next change; `Ok(None)` when the control plane ended the stream.
    pub(crate) async fn next(&mut self) -> Result<Option<SessionDelta>, SdkError> {
        match self.down.message().await {
            Ok(m) => Ok(m.map(SessionDelta::from_wire)),
            Err(s) => Err(SdkError::from_status("Session", s)),
        }
    }

    /// Queues an update (never waits).
    pub(crate) fn send(&self, u: SessionUpdate) -> Result<(), UpError> {
        use tokio::sync::mpsc::error::TrySendError;
        self.up
            .try_send(session_up(String::new(), u))
            .map_err(|e| match e {
                TrySendError::Full(_) => UpError::Full,
                TrySendError::Closed(_) => UpError::Closed,
            })
    }
}

fn session_up(session_id: String, u: SessionUpdate) -> SessionUp {
    SessionUp {
        session_id,
        bytes_from_server: u.counters.bytes_from_server,
        bytes_from_peers: u.counters.bytes_from_peers,
        bytes_uploaded: u.counters.bytes_uploaded,
        upload_kbps: u.counters.upload_kbps,
        keys_version: u.keys_version,
        refresh_keys: u.refresh_keys,
    }
}

#[derive(Clone)]
pub(crate) struct Control {
    client: ViewerServiceClient<Channel>,
    broadcast_id: String,
    credential: String,
    client_version: String,
    join_attempts: u32,
    join_deadline: Duration,
    require_chunk_keys: bool,
    holder_key: [u8; 32],
}

/// The local IP the control channel binds to: the relay listener's IP when it is a
/// specific one, so the control plane sees this viewer calling from the address it
/// advertises as `peer_addr` (the control plane checks that, and counts reporters by
/// address). Not when the listener is on loopback and the control plane is not (the
/// connection could not be routed), nor across address families.
pub(crate) fn control_bind_ip(relay_listen: IpAddr, control_url: &str) -> Option<IpAddr> {
    if relay_listen.is_unspecified() {
        return None;
    }
    let authority = crate::control_url::authority(control_url);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let remote: Option<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
        Some(if relay_listen.is_ipv4() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        })
    } else {
        host.parse().ok()
    };
    match remote {
        Some(r) if r.is_ipv4() != relay_listen.is_ipv4() => None,
        Some(r) if relay_listen.is_loopback() && !r.is_loopback() => None,
        // A host name: only a non-loopback listener can reach it.
        None if relay_listen.is_loopback() => None,
        _ => Some(relay_listen),
    }
}

impl Control {
    /// A lazily connected channel to `url`, set up as `opts` says.
    pub(crate) fn new(
        url: &str,
        broadcast_id: &str,
        credential: Option<&str>,
        client_version: &str,
        opts: &ControlOptions,
    ) -> Result<Control, SdkError> {
        let mut endpoint = starling_proto::transport::endpoint(url, &opts.transport)
            .map_err(|e| SdkError::Config(e.to_string()))?
            .connect_timeout(opts.timeout)
            // Bounds a unary call, and a stream's opening (up to its response
            // headers), not the life of a stream.
            .timeout(opts.timeout)
            .local_address(opts.local);
        if let Some(every) = opts.keep_alive {
            // A dead control plane or path fails the session stream within
            // `every + keep_alive_timeout`, and the stream is reopened.
            endpoint = endpoint
                .http2_keep_alive_interval(every)
                .keep_alive_timeout(opts.keep_alive_timeout)
                .keep_alive_while_idle(true);
        }
        // Lazy: the channel (re)connects on use, so a control plane that is down now
        // and back later is picked up by the next heartbeat or re-join.
        let channel = match opts.bind_from {
            Some(local) => {
                endpoint.connect_with_connector_lazy(crate::punch::BoundConnector { local })
            }
            None => endpoint.connect_lazy(),
        };
        Ok(Control {
            client: ViewerServiceClient::new(channel),
            broadcast_id: broadcast_id.to_string(),
            credential: credential.unwrap_or_default().to_string(),
            client_version: client_version.to_string(),
            join_attempts: opts.join_attempts.max(1),
            join_deadline: opts.join_deadline,
            require_chunk_keys: opts.require_chunk_keys,
            holder_key: opts.holder_key,
        })
    }

    /// `Join`, again after a `RESOURCE_EXHAUSTED` (a flash crowd): after the server's
    /// `grpc-retry-pushback-ms` (else an own back-off from 250 ms, doubled up to 8 s),
    /// plus [`jittered`]'s 0..50 %; at most `join_attempts` attempts, none started
    /// later than `join_deadline` after the first. Other errors come back at once.
    pub(crate) async fn join(&self, offer: &Offer) -> Result<JoinInfo, SdkError> {
        let deadline = tokio::time::Instant::now() + self.join_deadline;
        let mut own_backoff = JOIN_BACKOFF_INITIAL;
        let mut attempt = 1;
        loop {
            let e = match self.join_once(offer).await {
                Err(e @ SdkError::ControlBusy { .. }) => e,
                Ok(j) if self.require_chunk_keys && j.chunk_keys.is_empty() => {
                    // Leave the session politely; the error stands whatever happens.
                    let _ = tokio::time::timeout(
                        self.join_deadline.min(Duration::from_secs(3)),
                        self.leave(&j.session_id),
                    )
                    .await;
                    return Err(SdkError::Unverifiable(
                        "the control plane's Join answer carries no chunk keys: nothing could be \
                         verified (set allow_unverified to play anyway)"
                            .into(),
                    ));
                }
                r => return r,
            };
            let SdkError::ControlBusy { retry_after, .. } = &e else {
                return Err(e);
            };
            let wait = jittered(retry_after.unwrap_or(own_backoff));
            own_backoff = (own_backoff * 2).min(JOIN_BACKOFF_MAX);
            if attempt >= self.join_attempts || tokio::time::Instant::now() + wait > deadline {
                return Err(e);
            }
            tracing::info!(
                attempt,
                wait_ms = wait.as_millis(),
                "Join: control plane busy, retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Opens the session stream for `session_id`, `first` as its first message.
    /// `UNIMPLEMENTED` (an older control plane) comes back as
    /// [`SdkError::ControlRejected`] with that code.
    pub(crate) async fn open_session(
        &self,
        session_id: &str,
        first: SessionUpdate,
    ) -> Result<SessionStream, SdkError> {
        let (tx, rx) = tokio::sync::mpsc::channel(SESSION_UP_QUEUE);
        // The queue is new and empty: this cannot fail.
        let _ = tx.try_send(session_up(session_id.to_string(), first));
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        let resp = self
            .client
            .clone()
            .session(outbound)
            .await
            .map_err(|s| SdkError::from_status("Session", s))?;
        Ok(SessionStream {
            up: tx,
            down: resp.into_inner(),
        })
    }

    async fn join_once(&self, offer: &Offer) -> Result<JoinInfo, SdkError> {
        let sent = std::time::Instant::now();
        let resp = self
            .client
            .clone()
            .join(JoinRequest {
                broadcast_id: self.broadcast_id.clone(),
                credential: self.credential.clone(),
                client_version: self.client_version.clone(),
                peer_addr: offer.peer_addr.clone(),
                host_addr: offer.host_addr.clone(),
                upload_kbps: offer.upload_kbps,
                mac_tickets: true,
                holder_key: self.holder_key.to_vec(),
            })
            .await
            .map_err(|s| SdkError::from_status("Join", s))?
            .into_inner();
        let server_time = ServerTime::now(resp.server_time_unix_ms, sent.elapsed());
        if resp.dataplane_wire_addr.is_empty() {
            return Err(SdkError::ControlResponse(
                "Join returned no data-plane wire address".into(),
            ));
        }
        let heartbeat = match resp.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms).max(100)),
        };
        Ok(JoinInfo {
            session_id: resp.session_id,
            wire_addr: resp.dataplane_wire_addr,
            params: resp.params,
            token: Bytes::from(resp.chunk_token),
            heartbeat,
            peer_id: resp.peer_id,
            assignment: assignment(resp.parents, resp.neighbours),
            stream_kbps: resp.stream_kbps,
            child_slots: resp.child_slots,
            token_expires_at_ms: ms(resp.token_expires_at_unix_ms),
            token_keys: keys(resp.token_keys),
            chunk_keys: keys(resp.chunk_keys),
            ticket_keys: ticket_keys(resp.ticket_keys),
            report_interval: (resp.report_interval_ms > 0)
                .then(|| Duration::from_millis(u64::from(resp.report_interval_ms).max(100))),
            observed_addr: resp.observed_addr.parse().ok(),
            run_epoch: resp.run_epoch,
            server_time,
        })
    }

    /// `active == false` when the control plane says the session is over.
    pub(crate) async fn heartbeat(
        &self,
        session_id: &str,
        counters: Counters,
    ) -> Result<HeartbeatInfo, SdkError> {
        let sent = std::time::Instant::now();
        let resp = self
            .client
            .clone()
            .heartbeat(HeartbeatRequest {
                session_id: session_id.to_string(),
                bytes_from_server: counters.bytes_from_server,
                bytes_from_peers: counters.bytes_from_peers,
                bytes_uploaded: counters.bytes_uploaded,
                upload_kbps: counters.upload_kbps,
            })
            .await
            .map_err(|s| SdkError::from_status("Heartbeat", s))?
            .into_inner();
        let server_time = ServerTime::now(resp.server_time_unix_ms, sent.elapsed());
        Ok(HeartbeatInfo {
            active: resp.active,
            assignment: assignment(resp.parents, resp.neighbours),
            token: Bytes::from(resp.chunk_token),
            token_expires_at_ms: ms(resp.token_expires_at_unix_ms),
            revoked: resp.revoked_peer_ids,
            token_keys: keys(resp.token_keys),
            chunk_keys: keys(resp.chunk_keys),
            ticket_keys: ticket_keys(resp.ticket_keys),
            run_epoch: resp.run_epoch,
            server_time,
        })
    }

    /// A new parent for `substream` (`None` = the data plane).
    pub(crate) async fn reparent(
        &self,
        session_id: &str,
        substream: u16,
        exclude: Vec<PeerId>,
        unreachable: Vec<PeerId>,
    ) -> Result<(AssignedParent, Option<Ticket>), SdkError> {
        let resp = self
            .client
            .clone()
            .reparent(ReparentRequest {
                session_id: session_id.to_string(),
                substream: u32::from(substream),
                exclude_peer_ids: exclude,
                unreachable_peer_ids: unreachable,
            })
            .await
            .map_err(|s| SdkError::from_status("Reparent", s))?
            .into_inner();
        let ticket = resp.parent.as_ref().and_then(ticket_of);
        Ok((
            AssignedParent::from_ref(resp.parent.and_then(|p| p.peer)),
            ticket,
        ))
    }

    /// Tells the control plane that `peer_id` sent a chunk that failed its check.
    pub(crate) async fn report_peer(
        &self,
        session_id: &str,
        peer_id: u64,
        kind: PeerReportKind,
        reason: &str,
    ) -> Result<(), SdkError> {
        self.client
            .clone()
            .report_peer(ReportPeerRequest {
                session_id: session_id.to_string(),
                peer_id,
                reason: reason.to_string(),
                kind: kind as i32,
            })
            .await
            .map_err(|s| SdkError::from_status("ReportPeer", s))?;
        Ok(())
    }

    /// Sends quality reports; returns the highest `report_seq` the control plane holds.
    pub(crate) async fn report(
        &self,
        session_id: &str,
        reports: Vec<ViewerReport>,
    ) -> Result<u64, SdkError> {
        let resp = self
            .client
            .clone()
            .report(ReportRequest {
                session_id: session_id.to_string(),
                reports,
            })
            .await
            .map_err(|s| SdkError::from_status("Report", s))?
            .into_inner();
        Ok(resp.acked_seq)
    }

    pub(crate) async fn leave(&self, session_id: &str) -> Result<(), SdkError> {
        self.client
            .clone()
            .leave(LeaveRequest {
                session_id: session_id.to_string(),
            })
            .await
            .map_err(|s| SdkError::from_status("Leave", s))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn control_channel_binds_to_a_specific_relay_ip_that_can_reach_the_control_plane() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lo = ip("127.3.4.5");
        assert_eq!(control_bind_ip(lo, "http://127.0.0.1:7000"), Some(lo));
        assert_eq!(control_bind_ip(lo, "http://localhost:7000/"), Some(lo));
        assert_eq!(control_bind_ip(lo, "http://10.0.0.1:7000"), None);
        assert_eq!(control_bind_ip(lo, "https://cp.example:443"), None);
        assert_eq!(control_bind_ip(ip("0.0.0.0"), "http://127.0.0.1:1"), None);
        let lan = ip("192.168.1.9");
        assert_eq!(control_bind_ip(lan, "https://cp.example:443"), Some(lan));
        assert_eq!(control_bind_ip(lan, "http://10.0.0.1:7000"), Some(lan));
        assert_eq!(control_bind_ip(lan, "http://[2001:db8::1]:7000"), None);
        let v6 = ip("::1");
        assert_eq!(control_bind_ip(v6, "http://[::1]:7000"), Some(v6));
    }

    #[test]
    fn an_assigned_parent_without_an_address_is_the_data_plane() {
        let r = |id, addr: &str| PeerRef {
            peer_id: id,
            addr: addr.into(),
            punch: false,
        };
        let p = AssignedParent::from_ref(Some(r(7, "10.0.0.7:9000")));
        assert_eq!(p.parent, Parent::Peer(7));
        assert_eq!(
            p.peer(),
            Some(PeerAddr {
                id: 7,
                addr: "10.0.0.7:9000".into(),
                punch: false,
            })
        );
        for q in [
            AssignedParent::from_ref(Some(r(7, ""))),
            AssignedParent::from_ref(None),
        ] {
            assert_eq!(q.parent, Parent::Server);
            assert_eq!(q.peer(), None);
        }
    }
}
