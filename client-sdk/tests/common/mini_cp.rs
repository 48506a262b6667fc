//! A small in-test control plane (ViewerService only) for the hostile-peer and
//! session-stream tests: a fixed parent plan per joiner, chunk keys the test can change
//! at any time (a node that registers or rotates), a heartbeat interval of the test's
//! choosing, a real session stream (first message with the full state, then deltas the
//! test pushes; versioned keys; counters logged), `Join` refusals with a retry
//! pushback, and a log of joins, heartbeats, stream messages and peer reports.
#![allow(dead_code)]

use parking_lot::Mutex;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use starling_proto::ticket::TicketClaims;
use starling_proto::token::{Scopes, TokenClaims, TokenSigner};
use starling_proto::v1::viewer_service_server::{ViewerService, ViewerServiceServer};
use starling_proto::v1::*;
use tonic::{Request, Response, Status};

/// A chunk key as the test hands it out: (key id, raw Ed25519 public key).
pub type KeyMaterial = (u32, Vec<u8>);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Who feeds a substream in a plan.
#[derive(Clone, Debug)]
pub enum Ref {
    DataPlane,
    /// The i-th viewer to join (0-based; it must have joined before).
    Joiner(usize),
    /// A peer run by the test.
    Fixed(u64, String),
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub parents: Vec<Ref>,
    pub child_slots: u32,
}

#[derive(Default, Debug)]
pub struct Log {
    pub joins: Vec<JoinRequest>,
    pub heartbeats: Vec<String>,
    /// (session, peer, kind, reason) of every ReportPeer.
    pub reports: Vec<(String, u64, i32, String)>,
    /// (session, substream, excluded) of every Reparent.
    pub reparents: Vec<(String, u32, Vec<u64>)>,
    /// When each Join call arrived (refused ones included).
    pub join_attempts: Vec<Instant>,
    /// The session id of every Leave.
    pub leaves: Vec<String>,
}

/// A push queue of one open session stream.
type Pusher = mpsc::Sender<Result<SessionDown, Status>>;

/// The session stream's side of the fake.
#[derive(Default)]
pub struct SessionFake {
    /// Answer Session with UNIMPLEMENTED (an older control plane).
    pub unimplemented: bool,
    /// Announced in every stream's first message (0 = not said).
    pub counters_interval_ms: u32,
    /// Version of the current key sets (bumped by [`MiniCp::set_chunk_keys`]).
    pub keys_version: u64,
    /// Revoked peers: whole in a first message, as deltas after.
    pub revoked: Vec<u64>,
    /// Sessions that are over (a stream for them answers active = false).
    pub ended: HashSet<String>,
    /// (session, keys_version) of every stream opened.
    pub opens: Vec<(String, u64)>,
    /// Every SessionUp after the first, with its session.
    pub ups: Vec<(String, SessionUp)>,
    streams: Vec<(String, Pusher)>,
}

#[derive(Clone)]
pub struct MiniCp {
    pub broadcast: String,
    pub wire_addr: String,
    pub k: u16,
    pub chunk_ms: u32,
    pub heartbeat_ms: u32,
    pub plans: Arc<Vec<Plan>>,
    pub tokens: Arc<TokenSigner>,
    /// The chunk keys every Join and Heartbeat returns (changeable by the test).
    pub chunk_keys: Arc<Mutex<Vec<KeyMaterial>>>,
    /// If set, what Join and a stream's first message return instead (the keys as they
    /// were before a node registered: the viewer has not heard of the newest one until
    /// it beats or asks the stream for a refresh).
    pub join_chunk_keys: Option<Vec<KeyMaterial>>,
    pub log: Arc<Mutex<Log>>,
    pub session: Arc<Mutex<SessionFake>>,
    /// (Join calls still to refuse with RESOURCE_EXHAUSTED, pushback ms; 0 = none).
    pub join_busy: Arc<Mutex<(u32, u64)>>,
    /// The broadcast's run in Join, Heartbeat and a stream's first message (0: none).
    pub run_epoch: u64,
}

/// The key of the raw test peers (tokens for peers that never joined name it).
pub fn test_holder() -> &'static starling_proto::holder::HolderKey {
    static K: std::sync::OnceLock<starling_proto::holder::HolderKey> = std::sync::OnceLock::new();
    K.get_or_init(|| starling_proto::holder::HolderKey::from_seed(&[9; 32]).unwrap())
}

impl MiniCp {
    /// A token for `peer_id`, bound to the holder key its join sent, or for a peer
    /// that never joined (a raw test peer) to [`test_holder`].
    pub fn token(&self, peer_id: u64) -> bytes::Bytes {
        let holder = self
            .log
            .lock()
            .joins
            .get((peer_id as usize).wrapping_sub(1))
            .map(|j| j.holder_key.clone())
            .unwrap_or_else(|| test_holder().public_key().to_vec());
        self.token_for(peer_id, &holder)
    }

    /// A token for `peer_id` bound to `holder` (`[1; 32]` if that is not a key).
    pub fn token_for(&self, peer_id: u64, holder: &[u8]) -> bytes::Bytes {
        let now = now_ms();
        self.tokens
            .sign(&TokenClaims {
                broadcast_id: self.broadcast.clone(),
                peer_id,
                session_id: peer_id,
                scopes: Scopes::PLAY | Scopes::RELAY,
                issued_at_ms: now,
                expires_at_ms: now + 60_000,
                holder_key: holder.try_into().unwrap_or([1; 32]),
            })
            .unwrap()
    }

    fn token_keys(&self) -> Vec<PublicKey> {
        vec![PublicKey {
            key_id: self.tokens.key_id(),
            ed25519: self.tokens.public_key().to_vec(),
        }]
    }

    fn chunk_keys(&self) -> Vec<PublicKey> {
        self.chunk_keys
            .lock()
            .iter()
            .map(|(id, k)| PublicKey {
                key_id: *id,
                ed25519: k.clone(),
            })
            .collect()
    }

    pub fn reports(&self) -> Vec<(String, u64, i32, String)> {
        self.log.lock().reports.clone()
    }

    pub fn heartbeats(&self) -> usize {
        self.log.lock().heartbeats.len()
    }

    /// Leave calls so far.
    pub fn leaves(&self) -> usize {
        self.log.lock().leaves.len()
    }

    /// SessionUps (after the first of a stream) that asked for the current keys.
    pub fn key_refreshes_asked(&self) -> usize {
        self.session
            .lock()
            .ups
            .iter()
            .filter(|(_, u)| u.refresh_keys)
            .count()
    }

    /// SessionUps of `session` after its streams' first messages.
    pub fn ups_of(&self, session: &str) -> usize {
        self.session
            .lock()
            .ups
            .iter()
            .filter(|(s, _)| s == session)
            .count()
    }

    /// (session, keys_version) of every stream opened.
    pub fn opens(&self) -> Vec<(String, u64)> {
        self.session.lock().opens.clone()
    }

    /// Pushes `down` on every open stream of `session`; returns how many took it.
    pub fn push(&self, session: &str, down: SessionDown) -> usize {
        let mut st = self.session.lock();
        st.streams.retain(|(_, tx)| !tx.is_closed());
        st.streams
            .iter()
            .filter(|(s, _)| s == session)
            .filter(|(_, tx)| tx.try_send(Ok(down.clone())).is_ok())
            .count()
    }

    /// Breaks every open stream (a transport error at the viewer).
    pub fn break_streams(&self) -> usize {
        let streams = std::mem::take(&mut self.session.lock().streams);
        let n = streams.len();
        for (_, tx) in streams {
            let _ = tx.try_send(Err(Status::unavailable("the fake broke the stream")));
        }
        n
    }

    /// New chunk key set: a new version, pushed to every open stream.
    pub fn set_chunk_keys(&self, keys: Vec<KeyMaterial>) {
        *self.chunk_keys.lock() = keys;
        let version = {
            let mut st = self.session.lock();
            st.keys_version += 1;
            st.keys_version
        };
        let down = self.keys_down(version);
        let sessions: Vec<String> = self
            .session
            .lock()
            .streams
            .iter()
            .map(|(s, _)| s.clone())
            .collect();
        for s in sessions {
            self.push(&s, down.clone());
        }
    }

    /// Revokes `ids`: pushed as a delta to every open stream.
    pub fn revoke(&self, ids: &[u64]) {
        let sessions: Vec<String> = {
            let mut st = self.session.lock();
            st.revoked.extend_from_slice(ids);
            st.streams.iter().map(|(s, _)| s.clone()).collect()
        };
        for s in sessions {
            self.push(
                &s,
                SessionDown {
                    active: true,
                    revoked_peer_ids: ids.to_vec(),
                    ..SessionDown::default()
                },
            );
        }
    }

    /// Ends `session`: its streams get active = false (and later ones too).
    pub fn end_session(&self, session: &str) -> usize {
        self.session.lock().ended.insert(session.to_string());
        self.push(session, SessionDown::default())
    }

    fn keys_down(&self, version: u64) -> SessionDown {
        SessionDown {
            active: true,
            keys_version: version,
            token_keys: self.token_keys(),
            chunk_keys: self.chunk_keys(),
            ..SessionDown::default()
        }
    }

    /// A parent ticket for (child, parent, substream), issued at a fixed time for the
    /// whole test process: the same bytes at every heartbeat, as the real control
    /// plane's cache hands out between renewals.
    pub fn ticket(&self, child: u64, parent: u64, substream: usize) -> Vec<u8> {
        static ISSUED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let issued = *ISSUED.get_or_init(now_ms);
        self.tokens
            .sign_ticket(&TicketClaims {
                broadcast_id: self.broadcast.clone(),
                child_peer_id: child,
                parent_peer_id: parent,
                substream_mask: 1 << substream,
                issued_at_ms: issued,
                expires_at_ms: issued + 3_600_000,
            })
            .map(|b| b.to_vec())
            .unwrap_or_default()
    }

    /// The parents of `child` (peer id) as `plan` says, each peer parent with its ticket.
    fn parents(&self, child: u64, joins: &[JoinRequest], plan: &Plan) -> Vec<SubstreamParent> {
        plan.parents
            .iter()
            .enumerate()
            .map(|(s, r)| {
                let peer = match r {
                    Ref::DataPlane => None,
                    Ref::Joiner(i) => Some(PeerRef {
                        peer_id: *i as u64 + 1,
                        addr: joins[*i].peer_addr.clone(),
                        punch: false,
                    }),
                    Ref::Fixed(id, addr) => Some(PeerRef {
                        peer_id: *id,
                        addr: addr.clone(),
                        punch: false,
                    }),
                };
                SubstreamParent {
                    substream: s as u32,
                    ticket: peer
                        .as_ref()
                        .map_or_else(Vec::new, |p| self.ticket(child, p.peer_id, s)),
                    peer,
                }
            })
            .collect()
    }
}

fn session_index(session: &str) -> usize {
    session
        .trim_start_matches('s')
        .parse::<usize>()
        .unwrap_or(1)
        .saturating_sub(1)
}

#[tonic::async_trait]
impl ViewerService for MiniCp {
    type SessionStream = std::pin::Pin<
        Box<
            dyn tonic::codegen::tokio_stream::Stream<
                    Item = Result<starling_proto::v1::SessionDown, Status>,
                > + Send
                + 'static,
        >,
    >;

    async fn session(
        &self,
        req: Request<tonic::Streaming<starling_proto::v1::SessionUp>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if self.session.lock().unimplemented {
            return Err(Status::unimplemented(
                "this fake control plane has no session stream",
            ));
        }
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no first SessionUp"))?;
        let sid = first.session_id.clone();
        let (tx, rx) = mpsc::channel::<Result<SessionDown, Status>>(64);
        let down = {
            let log = self.log.lock();
            let i = session_index(&sid);
            let mut st = self.session.lock();
            st.opens.push((sid.clone(), first.keys_version));
            let known = i < log.joins.len() && !st.ended.contains(&sid);
            if known {
                let parents = match self.plans.get(i) {
                    Some(p) => self.parents(i as u64 + 1, &log.joins, p),
                    None => vec![],
                };
                let mut d = SessionDown {
                    active: true,
                    parents,
                    neighbours_changed: true,
                    neighbours: vec![],
                    revoked_peer_ids: st.revoked.clone(),
                    counters_interval_ms: st.counters_interval_ms,
                    run_epoch: self.run_epoch,
                    server_time_unix_ms: now_ms() as i64,
                    ..SessionDown::default()
                };
                if first.keys_version != st.keys_version {
                    let k = self.keys_down(st.keys_version);
                    d.keys_version = k.keys_version;
                    d.token_keys = k.token_keys;
                    d.chunk_keys = match &self.join_chunk_keys {
                        // The keys as they were when the viewer joined (and opened the
                        // stream): only a refresh brings the newer ones.
                        Some(keys) => keys
                            .iter()
                            .map(|(id, k)| PublicKey {
                                key_id: *id,
                                ed25519: k.clone(),
                            })
                            .collect(),
                        None => k.chunk_keys,
                    };
                }
                st.streams.push((sid.clone(), tx.clone()));
                d
            } else {
                SessionDown::default()
            }
        };
        let _ = tx.try_send(Ok(down));
        let cp = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(up)) = inbound.message().await {
                let refresh = up.refresh_keys;
                cp.session.lock().ups.push((sid.clone(), up));
                if refresh {
                    let v = cp.session.lock().keys_version;
                    let _ = tx.try_send(Ok(cp.keys_down(v)));
                }
            }
        });
        let out =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        Ok(Response::new(Box::pin(out)))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
        self.log.lock().join_attempts.push(Instant::now());
        {
            let mut busy = self.join_busy.lock();
            if busy.0 > 0 {
                busy.0 -= 1;
                let mut st = Status::resource_exhausted("the fake is in a flash crowd");
                if busy.1 > 0
                    && let Ok(v) = busy.1.to_string().parse()
                {
                    st.metadata_mut().insert("grpc-retry-pushback-ms", v);
                }
                return Err(st);
            }
        }
        let mut log = self.log.lock();
        let i = log.joins.len();
        let plan = self
            .plans
            .get(i)
            .cloned()
            .ok_or_else(|| Status::resource_exhausted("no plan"))?;
        log.joins.push(req.clone());
        let peer_id = i as u64 + 1;
        let parents = self.parents(peer_id, &log.joins, &plan);
        let chunk_token = self.token_for(peer_id, &req.holder_key).to_vec();
        Ok(Response::new(JoinResponse {
            session_id: format!("s{}", i + 1),
            params: Some(StreamParams {
                broadcast_id: req.broadcast_id,
                content_type: "video/mp2t".into(),
                chunk_duration_ms: self.chunk_ms,
                substreams: u32::from(self.k),
            }),
            dataplane_wire_addr: self.wire_addr.clone(),
            dataplane_http_addr: String::new(),
            chunk_token,
            token_expires_at_unix_ms: (now_ms() + 60_000) as i64,
            token_keys: self.token_keys(),
            chunk_keys: match &self.join_chunk_keys {
                Some(keys) => keys
                    .iter()
                    .map(|(id, k)| PublicKey {
                        key_id: *id,
                        ed25519: k.clone(),
                    })
                    .collect(),
                None => self.chunk_keys(),
            },
            report_interval_ms: 0,
            heartbeat_interval_ms: self.heartbeat_ms,
            peer_id,
            parents,
            neighbours: vec![],
            stream_kbps: 250,
            child_slots: if req.upload_kbps == 0 {
                0
            } else {
                plan.child_slots
            },
            ticket_keys: Vec::new(),
            observed_addr: String::new(),
            run_epoch: self.run_epoch,
            server_time_unix_ms: now_ms() as i64,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let mut log = self.log.lock();
        let i = session_index(&req.session_id);
        let parents = match self.plans.get(i) {
            Some(p) => self.parents(i as u64 + 1, &log.joins, p),
            None => vec![],
        };
        log.heartbeats.push(req.session_id);
        Ok(Response::new(HeartbeatResponse {
            active: true,
            parents,
            neighbours: vec![],
            chunk_token: vec![],
            token_expires_at_unix_ms: 0,
            revoked_peer_ids: vec![],
            token_keys: self.token_keys(),
            chunk_keys: self.chunk_keys(),
            ticket_keys: Vec::new(),
            run_epoch: self.run_epoch,
            server_time_unix_ms: now_ms() as i64,
        }))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        self.log.lock().leaves.push(req.into_inner().session_id);
        Ok(Response::new(LeaveResponse {}))
    }

    async fn report_peer(
        &self,
        req: Request<ReportPeerRequest>,
    ) -> Result<Response<ReportPeerResponse>, Status> {
        let req = req.into_inner();
        self.log
            .lock()
            .reports
            .push((req.session_id, req.peer_id, req.kind, req.reason));
        Ok(Response::new(ReportPeerResponse {}))
    }

    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(ReportResponse {
            acked_seq: req.reports.iter().map(|r| r.report_seq).max().unwrap_or(0),
        }))
    }

    /// Always answers the data plane.
    async fn reparent(
        &self,
        req: Request<ReparentRequest>,
    ) -> Result<Response<ReparentResponse>, Status> {
        let req = req.into_inner();
        self.log
            .lock()
            .reparents
            .push((req.session_id, req.substream, req.exclude_peer_ids));
        Ok(Response::new(ReparentResponse {
            parent: Some(SubstreamParent {
                substream: req.substream,
                peer: None,
                ticket: Vec::new(),
            }),
        }))
    }
}

/// Starts the control plane; returns its URL.
pub async fn start(cp: MiniCp) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ViewerServiceServer::new(cp))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    url
}

/// A control plane for `broadcast` served by the data plane at `wire_addr`.
pub fn new(
    broadcast: &str,
    wire_addr: SocketAddr,
    k: u16,
    chunk_ms: u32,
    heartbeat_ms: u32,
    plans: Vec<Plan>,
    chunk_keys: Vec<KeyMaterial>,
) -> MiniCp {
    let pkcs8 = starling_proto::token::generate_pkcs8().unwrap();
    MiniCp {
        broadcast: broadcast.into(),
        wire_addr: wire_addr.to_string(),
        k,
        chunk_ms,
        heartbeat_ms,
        plans: Arc::new(plans),
        tokens: Arc::new(TokenSigner::new(1, &pkcs8).unwrap()),
        chunk_keys: Arc::new(Mutex::new(chunk_keys)),
        join_chunk_keys: None,
        log: Arc::new(Mutex::new(Log::default())),
        session: Arc::new(Mutex::new(SessionFake {
            keys_version: 1,
            ..SessionFake::default()
        })),
        join_busy: Arc::new(Mutex::new((0, 0))),
        run_epoch: 0,
    }
}
