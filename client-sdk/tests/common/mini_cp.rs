//! A small in-test control plane (ViewerService only) for the hostile-peer tests: a
//! fixed parent plan per joiner, chunk keys the test can change at any time (a node
//! that registers or rotates), a heartbeat interval of the test's choosing, and a log
//! of heartbeats and peer reports.
#![allow(dead_code)]

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;

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
    /// If set, what Join returns instead (the keys as they were before a node
    /// registered: the viewer has not heard of the newest one until it beats).
    pub join_chunk_keys: Option<Vec<KeyMaterial>>,
    pub log: Arc<Mutex<Log>>,
}

impl MiniCp {
    pub fn token(&self, peer_id: u64) -> bytes::Bytes {
        let now = now_ms();
        self.tokens
            .sign(&TokenClaims {
                broadcast_id: self.broadcast.clone(),
                peer_id,
                session_id: peer_id,
                scopes: Scopes::PLAY | Scopes::RELAY,
                issued_at_ms: now,
                expires_at_ms: now + 60_000,
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
                    }),
                    Ref::Fixed(id, addr) => Some(PeerRef {
                        peer_id: *id,
                        addr: addr.clone(),
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
        _req: Request<tonic::Streaming<starling_proto::v1::SessionUp>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented(
            "this fake control plane has no session stream",
        ))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
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
            chunk_token: self.token(peer_id).to_vec(),
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
        }))
    }

    async fn leave(&self, _req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
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
    }
}
