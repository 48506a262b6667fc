//! A small in-process peer grid on real loopback sockets: a live in-test data plane
//! that honours substream masks and `REQUEST`, an in-test control plane with a fixed
//! tree, and real SDK viewers relaying to each other. Timeouts only guard against
//! hangs; nothing asserts on wall-clock durations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::live::{LiveServer, Opts, RAP_EVERY, Source};
use common::payload;
use starling_proto::holder::Verifier;
use starling_proto::wire::{
    self, Decoder, ErrorCode, Frame, Hello, Limits, Role, StartAt, Subscribe,
};
use starling_sdk::{RelayConfig, Stats, Viewer, ViewerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GUARD: Duration = Duration::from_secs(40);
const K: u16 = 4;
const CHUNK_MS: u64 = 100;

mod fake_grid {
    use super::*;
    use starling_proto::ticket::TicketClaims;
    use starling_proto::token::{Scopes, TokenClaims, TokenSigner};
    use starling_proto::v1::viewer_service_server::{ViewerService, ViewerServiceServer};
    use starling_proto::v1::*;
    use tonic::{Request, Response, Status};

    /// The key of the raw peers the tests drive by hand.
    pub fn holder() -> &'static starling_proto::holder::HolderKey {
        static K: std::sync::OnceLock<starling_proto::holder::HolderKey> =
            std::sync::OnceLock::new();
        K.get_or_init(|| starling_proto::holder::HolderKey::from_seed(&[7; 32]).unwrap())
    }

    pub fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    /// The fake control plane's keys: it signs chunk tokens (key id 1) and hands out
    /// the data plane's chunk key, if any.
    #[derive(Clone)]
    pub struct Keys {
        pub tokens: Arc<TokenSigner>,
        pub chunk_key: Option<(u32, Vec<u8>)>,
        /// Lifetime of the tokens issued (and renewed in every heartbeat).
        pub token_ms: u64,
        /// When the keys were made (the issue time of every ticket).
        pub created_ms: u64,
    }

    impl Keys {
        pub fn new(chunk_key: Option<(u32, Vec<u8>)>) -> Keys {
            let pkcs8 = starling_proto::token::generate_pkcs8().unwrap();
            Keys {
                tokens: Arc::new(TokenSigner::new(1, &pkcs8).unwrap()),
                chunk_key,
                token_ms: 60_000,
                created_ms: now_ms(),
            }
        }

        /// A token bound to the test's raw peers' key ([`holder`]).
        pub fn token(&self, broadcast: &str, peer_id: u64, iat: u64, exp: u64) -> bytes::Bytes {
            self.token_for(broadcast, peer_id, iat, exp, &holder().public_key())
        }

        /// A token bound to `holder_key` (a viewer's, from its join).
        pub fn token_for(
            &self,
            broadcast: &str,
            peer_id: u64,
            iat: u64,
            exp: u64,
            holder_key: &[u8],
        ) -> bytes::Bytes {
            self.tokens
                .sign(&TokenClaims {
                    broadcast_id: broadcast.into(),
                    peer_id,
                    session_id: peer_id,
                    scopes: Scopes::PLAY | Scopes::RELAY,
                    issued_at_ms: iat,
                    expires_at_ms: exp,
                    holder_key: holder_key.try_into().unwrap_or([1; 32]),
                })
                .unwrap()
        }

        /// A parent ticket, valid for an hour from the keys' creation: the same bytes
        /// for the same claims (Ed25519 signatures are deterministic), as the real control
        /// plane's cache hands out between renewals.
        pub fn ticket(&self, broadcast: &str, child: u64, parent: u64, mask: u64) -> bytes::Bytes {
            let now = self.created_ms;
            self.tokens
                .sign_ticket(&TicketClaims {
                    broadcast_id: broadcast.into(),
                    child_peer_id: child,
                    parent_peer_id: parent,
                    substream_mask: mask,
                    issued_at_ms: now,
                    expires_at_ms: now + 3_600_000,
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
            self.chunk_key
                .iter()
                .map(|(id, k)| PublicKey {
                    key_id: *id,
                    ed25519: k.clone(),
                })
                .collect()
        }
    }

    /// Who feeds a substream / who is a neighbour, in a plan.
    #[derive(Clone, Debug)]
    pub enum Ref {
        DataPlane,
        /// The i-th viewer to join (0-based; it must have joined before).
        Joiner(usize),
        /// A fixed peer (e.g. a fake one run by the test).
        Fixed(u64, String),
    }

    #[derive(Clone, Debug)]
    pub struct Plan {
        pub parents: Vec<Ref>,
        pub neighbours: Vec<Ref>,
        pub child_slots: u32,
    }

    #[derive(Default)]
    pub struct State {
        pub joins: Vec<JoinRequest>,
        pub parents: HashMap<String, Vec<Option<PeerRef>>>,
        pub neighbours: HashMap<String, Vec<PeerRef>>,
        /// (session, substream, excluded)
        pub reparents: Vec<(String, u32, Vec<u64>)>,
        pub heartbeats: Vec<HeartbeatRequest>,
        pub leaves: Vec<String>,
        /// (session, peer, reason) of every ReportPeer.
        pub report_peers: Vec<(String, u64, String)>,
        /// Peers revoked: sent in every heartbeat.
        pub revoked: Vec<u64>,
    }

    #[derive(Clone)]
    pub struct Fake {
        pub broadcast: String,
        pub wire_addr: String,
        pub plans: Arc<Vec<Plan>>,
        pub state: Arc<Mutex<State>>,
        pub keys: Keys,
    }

    fn session_peer(session: &str) -> u64 {
        session.trim_start_matches('s').parse().unwrap_or(0)
    }

    fn resolve(st: &State, r: &Ref) -> Option<PeerRef> {
        match r {
            Ref::DataPlane => None,
            Ref::Joiner(i) => Some(PeerRef {
                peer_id: *i as u64 + 1,
                addr: st.joins[*i].peer_addr.clone(),
                punch: false,
            }),
            Ref::Fixed(id, addr) => Some(PeerRef {
                peer_id: *id,
                addr: addr.clone(),
                punch: false,
            }),
        }
    }

    /// The parents of `child`, each peer parent with its ticket (as the control plane).
    fn parents(f: &Fake, child: u64, v: &[Option<PeerRef>]) -> Vec<SubstreamParent> {
        v.iter()
            .enumerate()
            .map(|(s, p)| SubstreamParent {
                substream: s as u32,
                peer: p.clone(),
                ticket: p.as_ref().map_or_else(Vec::new, |p| {
                    f.keys
                        .ticket(&f.broadcast, child, p.peer_id, 1 << s)
                        .to_vec()
                }),
            })
            .collect()
    }

    #[tonic::async_trait]
    impl ViewerService for Fake {
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
            if req.broadcast_id != self.broadcast {
                return Err(Status::not_found("no such broadcast"));
            }
            let mut st = self.state.lock();
            let i = st.joins.len();
            let plan = self
                .plans
                .get(i)
                .cloned()
                .ok_or_else(|| Status::resource_exhausted("no plan"))?;
            st.joins.push(req.clone());
            let session = format!("s{}", i + 1);
            let ps: Vec<_> = plan.parents.iter().map(|r| resolve(&st, r)).collect();
            let ns: Vec<_> = plan
                .neighbours
                .iter()
                .filter_map(|r| resolve(&st, r))
                .collect();
            st.parents.insert(session.clone(), ps.clone());
            st.neighbours.insert(session.clone(), ns.clone());
            let now = now_ms();
            let exp = now + self.keys.token_ms;
            let token =
                self.keys
                    .token_for(&self.broadcast, i as u64 + 1, now, exp, &req.holder_key);
            Ok(Response::new(JoinResponse {
                session_id: session,
                params: Some(StreamParams {
                    broadcast_id: req.broadcast_id,
                    content_type: "video/mp2t".into(),
                    chunk_duration_ms: CHUNK_MS as u32,
                    substreams: u32::from(K),
                }),
                dataplane_wire_addr: self.wire_addr.clone(),
                dataplane_http_addr: String::new(),
                chunk_token: token.to_vec(),
                token_expires_at_unix_ms: exp as i64,
                token_keys: self.keys.token_keys(),
                chunk_keys: self.keys.chunk_keys(),
                report_interval_ms: 0,
                heartbeat_interval_ms: 200,
                peer_id: i as u64 + 1,
                parents: parents(self, i as u64 + 1, &ps),
                neighbours: ns,
                stream_kbps: 250,
                child_slots: if req.upload_kbps == 0 {
                    0
                } else {
                    plan.child_slots
                },
                ticket_keys: Vec::new(),
                observed_addr: String::new(),
                run_epoch: 0,
                server_time_unix_ms: 0,
            }))
        }

        async fn heartbeat(
            &self,
            req: Request<HeartbeatRequest>,
        ) -> Result<Response<HeartbeatResponse>, Status> {
            let req = req.into_inner();
            let mut st = self.state.lock();
            let ps = st.parents.get(&req.session_id).cloned().unwrap_or_default();
            let ns = st
                .neighbours
                .get(&req.session_id)
                .cloned()
                .unwrap_or_default();
            let active = !st.leaves.contains(&req.session_id);
            let now = now_ms();
            let exp = now + self.keys.token_ms;
            let peer = session_peer(&req.session_id);
            let holder_key = st
                .joins
                .get((peer as usize).wrapping_sub(1))
                .map(|j| j.holder_key.clone())
                .unwrap_or_default();
            let token = self
                .keys
                .token_for(&self.broadcast, peer, now, exp, &holder_key);
            let revoked = st.revoked.clone();
            let child = session_peer(&req.session_id);
            st.heartbeats.push(req);
            Ok(Response::new(HeartbeatResponse {
                active,
                parents: parents(self, child, &ps),
                neighbours: ns,
                chunk_token: token.to_vec(),
                token_expires_at_unix_ms: exp as i64,
                revoked_peer_ids: revoked,
                token_keys: self.keys.token_keys(),
                chunk_keys: self.keys.chunk_keys(),
                ticket_keys: Vec::new(),
                run_epoch: 0,
                server_time_unix_ms: 0,
            }))
        }

        async fn leave(
            &self,
            req: Request<LeaveRequest>,
        ) -> Result<Response<LeaveResponse>, Status> {
            self.state.lock().leaves.push(req.into_inner().session_id);
            Ok(Response::new(LeaveResponse {}))
        }

        async fn report_peer(
            &self,
            req: Request<ReportPeerRequest>,
        ) -> Result<Response<ReportPeerResponse>, Status> {
            let req = req.into_inner();
            self.state
                .lock()
                .report_peers
                .push((req.session_id, req.peer_id, req.reason));
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
            let mut st = self.state.lock();
            if let Some(ps) = st.parents.get_mut(&req.session_id)
                && let Some(p) = ps.get_mut(req.substream as usize)
            {
                *p = None;
            }
            st.reparents
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

    pub async fn start(broadcast: &str, wire_addr: SocketAddr, plans: Vec<Plan>) -> (String, Fake) {
        start_with(broadcast, wire_addr, plans, Keys::new(None)).await
    }

    pub async fn start_with(
        broadcast: &str,
        wire_addr: SocketAddr,
        plans: Vec<Plan>,
        keys: Keys,
    ) -> (String, Fake) {
        let fake = Fake {
            broadcast: broadcast.into(),
            wire_addr: wire_addr.to_string(),
            plans: Arc::new(plans),
            state: Default::default(),
            keys,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ViewerServiceServer::new(fake.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (url, fake)
    }
}

use fake_grid::{Keys, Plan, Ref, now_ms};

fn config(broadcast: &str, control_url: &str, upload_kbps: u32) -> ViewerConfig {
    let mut c = ViewerConfig::new(broadcast);
    c.control_url = control_url.into();
    c.transport = starling_proto::transport::Transport::Plaintext;
    c.http_listen = None;
    c.reconnect_initial = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(200);
    c.target_lag = Duration::from_millis(1500);
    c.relay = RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_host: None,
        max_upload_kbps: Some(upload_kbps),
        max_links_per_ip: 0,
        ..RelayConfig::new()
    };
    // Several of these grid tests run unsigned sources behind a fake control plane that
    // hands out no chunk keys; where it does, this changes nothing. The refusal of such
    // a Join by default is tested in session.rs.
    c.allow_unverified = true;
    c
}

/// Collects a viewer's output until its stream ends.
fn collect(viewer: &Viewer) -> tokio::task::JoinHandle<Vec<u8>> {
    let mut sub = viewer.subscribe();
    tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(b) = sub.next_bytes().await {
            out.extend_from_slice(&b);
        }
        out
    })
}

/// The output must be the source's payloads, in order, from a random access chunk on,
/// each exactly once. Returns the first and last sequence numbers.
fn assert_identical(out: &[u8], who: &str) -> (u64, u64) {
    assert!(
        out.starts_with(b"<chunk "),
        "{who}: output does not start at a chunk"
    );
    let end = out.iter().position(|&b| b == b'>').unwrap();
    let first: u64 = std::str::from_utf8(&out[7..end]).unwrap().parse().unwrap();
    assert_eq!(
        first % RAP_EVERY,
        0,
        "{who}: output starts at a non-RAP chunk"
    );
    let mut pos = 0;
    let mut seq = first;
    while pos < out.len() {
        let p = payload(seq);
        assert!(
            out.len() >= pos + p.len() && out[pos..pos + p.len()] == p[..],
            "{who}: output differs from the source at chunk {seq}"
        );
        pos += p.len();
        seq += 1;
    }
    (first, seq - 1)
}

async fn wait_played(v: &Viewer, n: u64) -> Stats {
    tokio::time::timeout(GUARD, async {
        loop {
            let s = v.stats();
            if s.chunks_played >= n {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {n} chunks: {}", v.stats()))
}

/// A raw peer connection: HELLO(peer), TICKET(s), SUBSCRIBE(mask); returns the first
/// frame.
async fn raw_subscribe(
    addr: &str,
    broadcast: &str,
    mask: u64,
    token: bytes::Bytes,
    tickets: &[bytes::Bytes],
) -> Frame {
    raw_subscribe_held(addr, broadcast, mask, token, tickets)
        .await
        .0
}

/// [`raw_subscribe`], keeping the link open (its slots stay taken).
async fn raw_subscribe_held(
    addr: &str,
    broadcast: &str,
    mask: u64,
    token: bytes::Bytes,
    tickets: &[bytes::Bytes],
) -> (Frame, tokio::net::TcpStream) {
    let (f, s, _, _) = raw_subscribe_stream(addr, broadcast, mask, token, tickets).await;
    (f, s)
}

/// [`raw_subscribe_held`], also returning the decoder and the bytes read past the
/// answer, to go on reading the link's frames.
async fn raw_subscribe_stream(
    addr: &str,
    broadcast: &str,
    mask: u64,
    token: bytes::Bytes,
    tickets: &[bytes::Bytes],
) -> (Frame, tokio::net::TcpStream, Decoder, BytesMut) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut p = RawPeer {
        s,
        dec: Decoder::new(Limits::default()),
        buf: BytesMut::new(),
        pending: None,
    };
    p.handshake(broadcast, mask, token, tickets).await;
    let ack = p.next().await;
    assert!(matches!(ack, Some(Frame::HelloAck(_))), "{ack:?}");
    // The link's keep-alive PING may come before the answer.
    let answer = loop {
        match p.next().await {
            Some(Frame::Ping(_)) => {}
            Some(f) => break f,
            None => panic!("no answer to SUBSCRIBE"),
        }
    };
    (answer, p.s, p.dec, p.buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_relays_refuses_beyond_slots_and_survives_parent_leaving() {
    let src = Source::start(K, CHUNK_MS);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("g1")).await;
    src.wait_for(2 * RAP_EVERY).await;
    let all_dp = vec![Ref::DataPlane; K as usize];
    let from_a = vec![Ref::Joiner(0); K as usize];
    let plans = vec![
        // A: fed by the data plane; 8 substream slots = B and C with the whole stream.
        Plan {
            parents: all_dp.clone(),
            neighbours: vec![],
            child_slots: 8,
        },
        // D: fed by the data plane, a mesh neighbour of B and C.
        Plan {
            parents: all_dp.clone(),
            neighbours: vec![],
            child_slots: 0,
        },
        // B, C: every substream from A.
        Plan {
            parents: from_a.clone(),
            neighbours: vec![Ref::Joiner(1)],
            child_slots: 0,
        },
        Plan {
            parents: from_a,
            neighbours: vec![Ref::Joiner(1)],
            child_slots: 0,
        },
    ];
    let (url, cp) = fake_grid::start("g1", dp.addr, plans).await;
    let a = Viewer::join(config("g1", &url, 10_000)).await.unwrap();
    let d = Viewer::join(config("g1", &url, 10_000)).await.unwrap();
    let b = Viewer::join(config("g1", &url, 0)).await.unwrap();
    let c = Viewer::join(config("g1", &url, 0)).await.unwrap();
    let outs: Vec<_> = [&b, &c].iter().map(|v| collect(v)).collect();
    assert!(a.peer_addr().is_some() && b.peer_addr().is_none());
    assert_eq!(b.peer_id(), Some(3));

    // Phase 1: B and C are fed by A.
    let sb = wait_played(&b, 40).await;
    let sc = wait_played(&c, 40).await;
    for (who, s) in [("B", &sb), ("C", &sc)] {
        assert!(
            s.peer_share() >= 0.9,
            "{who}: only {:.1} % of bytes from peers: {s}",
            100.0 * s.peer_share()
        );
        assert_eq!(s.chunks_skipped, 0, "{who}: {s}");
    }
    let sa = a.stats();
    assert_eq!(sa.children, 2, "{sa:?}");
    assert!(sa.bytes_uploaded > 0);
    assert_eq!(sa.peer_share(), 0.0);

    // A has no slot left, but accepts as many again (from ticketed children) while the
    // control plane's moves settle (children it was sent ahead of the ones moving
    // away); beyond that a child is refused, a neighbour link is not.
    let tok = |peer: u64| {
        cp.keys.token(
            "g1",
            peer,
            fake_grid::now_ms(),
            fake_grid::now_ms() + 60_000,
        )
    };
    let mut held = Vec::new();
    for peer in [77, 78] {
        let ticket = cp.keys.ticket("g1", peer, 1, 0b1111);
        let (f, s) =
            raw_subscribe_held(a.peer_addr().unwrap(), "g1", 0b1111, tok(peer), &[ticket]).await;
        assert!(matches!(f, Frame::StreamInfo(_)), "{f:?}");
        held.push(s);
    }
    let ticket = cp.keys.ticket("g1", 79, 1, 0b1);
    let refused = raw_subscribe(a.peer_addr().unwrap(), "g1", 0b1, tok(79), &[ticket]).await;
    assert!(
        matches!(&refused, Frame::Error(r) if r.code == ErrorCode::ServerBusy),
        "{refused:?}"
    );
    let neighbour = raw_subscribe(a.peer_addr().unwrap(), "g1", 0, tok(80), &[]).await;
    assert!(matches!(neighbour, Frame::StreamInfo(_)), "{neighbour:?}");
    // A wrong broadcast is refused too.
    let wrong = raw_subscribe(a.peer_addr().unwrap(), "other", 0b1, tok(81), &[]).await;
    assert!(
        matches!(&wrong, Frame::Error(r) if r.code == ErrorCode::UnknownBroadcast),
        "{wrong:?}"
    );

    drop(held);

    // Phase 2: A leaves; B and C re-parent to the data plane and keep playing.
    a.leave().await.unwrap();
    let sb2 = wait_played(&b, sb.chunks_played + 40).await;
    let sc2 = wait_played(&c, sc.chunks_played + 40).await;
    for (who, s) in [("B", &sb2), ("C", &sc2)] {
        assert_eq!(s.chunks_skipped, 0, "{who} missed a deadline: {s}");
        assert!(s.parent_changes >= u64::from(K), "{who}: {s}");
        assert!(s.bytes_from_server > sb.bytes_from_server.min(sc.bytes_from_server));
    }
    {
        let st = cp.state.lock();
        for session in ["s3", "s4"] {
            let subs: BTreeSet<u32> = st
                .reparents
                .iter()
                .filter(|(s, _, ex)| s == session && ex.contains(&1))
                .map(|(_, sub, _)| *sub)
                .collect();
            assert_eq!(subs.len(), usize::from(K), "{session}: {:?}", st.reparents);
        }
        // Heartbeats carry the counters.
        assert!(
            st.heartbeats
                .iter()
                .any(|h| h.session_id == "s1" && h.bytes_uploaded > 0)
        );
    }
    // The data plane now pushes every substream to B and C.
    assert!(
        dp.log
            .lock()
            .subscribes
            .iter()
            .filter(|(_, m)| *m != 0)
            .count()
            >= 4
    );

    b.leave().await.unwrap();
    c.leave().await.unwrap();
    d.leave().await.unwrap();
    for (who, o) in ["B", "C"].iter().zip(outs) {
        let out = o.await.unwrap();
        let (first, last) = assert_identical(&out, who);
        assert!(last >= first + 70, "{who}: {first}..{last}");
    }
    src.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_missing_from_the_parent_is_pulled_from_a_neighbour() {
    let src = Source::start(K, CHUNK_MS);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("g2")).await;
    let lossy_drop: BTreeSet<u64> = [30, 31, 37].into();
    let lossy = LiveServer::start(
        src.clone(),
        Opts {
            drop: lossy_drop.clone(),
            ..Opts::peer("g2")
        },
    )
    .await;
    src.wait_for(RAP_EVERY).await;
    let plans = vec![
        // D: fed by the data plane.
        Plan {
            parents: vec![Ref::DataPlane; K as usize],
            neighbours: vec![],
            child_slots: 0,
        },
        // E: fed by a lossy parent, D as its neighbour.
        Plan {
            parents: vec![Ref::Fixed(99, lossy.addr.to_string()); K as usize],
            neighbours: vec![Ref::Joiner(0)],
            child_slots: 0,
        },
    ];
    let (url, cp) = fake_grid::start("g2", dp.addr, plans).await;
    let d = Viewer::join(config("g2", &url, 10_000)).await.unwrap();
    let e = Viewer::join(config("g2", &url, 0)).await.unwrap();
    let out = collect(&e);
    src.wait_for(50).await;
    let se = wait_played(&e, 25).await;
    tokio::time::timeout(GUARD, async {
        while e.stats().current_seq.is_none_or(|s| s < 45) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let se = e.stats().max_by_played(se);
    assert_eq!(se.chunks_skipped, 0, "{se}");
    assert!(se.neighbours >= 1, "{se:?}");
    let sd = d.stats();
    assert!(sd.bytes_uploaded > 0, "D served nothing: {sd}");
    let from_server: BTreeSet<u64> = dp.requests().into_iter().collect();
    assert!(
        from_server.is_disjoint(&lossy_drop),
        "pulled from the data plane instead of the neighbour: {from_server:?}"
    );
    assert!(
        cp.state.lock().reparents.is_empty(),
        "a few lost chunks are not a reason to re-parent"
    );
    e.leave().await.unwrap();
    d.leave().await.unwrap();
    let out = out.await.unwrap();
    let (first, last) = assert_identical(&out, "E");
    assert!(first < 30 && last >= 45, "{first}..{last}");
    src.stop();
}

trait MaxByPlayed {
    fn max_by_played(self, other: Stats) -> Stats;
}
impl MaxByPlayed for Stats {
    fn max_by_played(self, other: Stats) -> Stats {
        if self.chunks_played >= other.chunks_played {
            self
        } else {
            other
        }
    }
}

// ---------------------------------------------------------------------------------
// Rights and integrity
// ---------------------------------------------------------------------------------

use bytes::Bytes;
use starling_proto::integrity::{ChunkSigner, generate_pkcs8};

/// A chunk signer (the data plane's key, id 7) and the fake control plane's keys that
/// hand it out.
fn signing() -> (Arc<ChunkSigner>, Keys) {
    let signer = Arc::new(ChunkSigner::new(7, &generate_pkcs8().unwrap()).unwrap());
    let keys = Keys::new(Some((7, signer.public_key().to_vec())));
    (signer, keys)
}

/// A raw peer connection to a viewer's peer listener.
struct RawPeer {
    s: tokio::net::TcpStream,
    dec: Decoder,
    buf: BytesMut,
    /// A frame read during the handshake, to be returned by the next `next()`.
    pending: Option<Frame>,
}

impl RawPeer {
    /// Connects and sends HELLO(peer, token), then (once HELLO_ACK names its nonce) the
    /// PROOF of the test holder key for peer 1 (the viewer under test) and
    /// SUBSCRIBE(mask). A refusal of the HELLO is left for `next()`.
    async fn connect(addr: &str, broadcast: &str, mask: u64, token: Bytes) -> RawPeer {
        let mut p = RawPeer {
            s: tokio::net::TcpStream::connect(addr).await.unwrap(),
            dec: Decoder::new(Limits::default()),
            buf: BytesMut::new(),
            pending: None,
        };
        p.handshake(broadcast, mask, token, &[]).await;
        p
    }

    /// HELLO; on HELLO_ACK (kept for `next()`): PROOF, TICKETs, SUBSCRIBE.
    async fn handshake(&mut self, broadcast: &str, mask: u64, token: Bytes, tickets: &[Bytes]) {
        self.send(&Frame::Hello(Hello {
            min_version: wire::PROTOCOL_VERSION,
            max_version: wire::PROTOCOL_VERSION,
            role: Role::Peer,
            token: token.clone(),
        }))
        .await;
        let first = self.next().await;
        let nonce = match &first {
            Some(Frame::HelloAck(a)) => Some(a.nonce),
            _ => None,
        };
        self.pending = first;
        let Some(nonce) = nonce else {
            return;
        };
        let proof = fake_grid::holder().prove(&nonce, &token, Verifier::Peer(1));
        self.send(&Frame::Proof(Bytes::copy_from_slice(&proof)))
            .await;
        for t in tickets {
            self.send(&Frame::Ticket(t.clone())).await;
        }
        self.send(&Frame::Subscribe(Subscribe {
            broadcast_id: broadcast.into(),
            start: StartAt::Live,
            substream_mask: mask,
        }))
        .await;
    }

    /// Connects and sends HELLO(peer, token), TICKET and SUBSCRIBE(mask) at once.
    async fn connect_ticketed(
        addr: &str,
        broadcast: &str,
        mask: u64,
        token: Bytes,
        ticket: Bytes,
    ) -> RawPeer {
        let mut p = RawPeer {
            s: tokio::net::TcpStream::connect(addr).await.unwrap(),
            dec: Decoder::new(Limits::default()),
            buf: BytesMut::new(),
            pending: None,
        };
        p.handshake(broadcast, mask, token, &[ticket]).await;
        p
    }

    async fn send(&mut self, f: &Frame) {
        let b = wire::encode_to_bytes(f).unwrap();
        let _ = self.s.write_all(&b).await;
    }

    /// The next frame; `None` at EOF or on a reset.
    async fn next(&mut self) -> Option<Frame> {
        if let Some(f) = self.pending.take() {
            return Some(f);
        }
        tokio::time::timeout(GUARD, async {
            loop {
                if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                    return Some(f);
                }
                match self.s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no frame")
    }

    /// HELLO_ACK then STREAM_INFO (accepted).
    async fn expect_accepted(&mut self, who: &str) {
        let f = self.next().await;
        assert!(matches!(f, Some(Frame::HelloAck(_))), "{who}: {f:?}");
        // The link's keep-alive PING may come first.
        let f = loop {
            match self.next().await {
                Some(Frame::Ping(n)) => self.send(&Frame::Pong(n)).await,
                f => break f,
            }
        };
        assert!(matches!(f, Some(Frame::StreamInfo(_))), "{who}: {f:?}");
    }

    /// Reads until an ERROR or GOODBYE (answering pings); returns its code.
    async fn closed_with(&mut self) -> Option<ErrorCode> {
        loop {
            match self.next().await? {
                Frame::Error(r) | Frame::Goodbye(r) => return Some(r.code),
                Frame::Ping(n) => self.send(&Frame::Pong(n)).await,
                _ => {}
            }
        }
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(GUARD, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_chunks_verify_play_and_relay_with_tokens_renewed() {
    let (signer, keys) = signing();
    let src = Source::signed(K, CHUNK_MS, "s1", signer);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("s1")).await;
    src.wait_for(RAP_EVERY).await;
    let plans = vec![
        Plan {
            parents: vec![Ref::DataPlane; K as usize],
            neighbours: vec![],
            child_slots: 8,
        },
        Plan {
            parents: vec![Ref::Joiner(0); K as usize],
            neighbours: vec![],
            child_slots: 0,
        },
    ];
    let (url, cp) = fake_grid::start_with("s1", dp.addr, plans, keys).await;
    let a = Viewer::join(config("s1", &url, 10_000)).await.unwrap();
    let b = Viewer::join(config("s1", &url, 0)).await.unwrap();
    let out = collect(&b);
    let sb = wait_played(&b, 30).await;
    // Heartbeats renew the token every 200 ms: the data plane gets TOKEN frames, and
    // A keeps B (its renewals are accepted).
    wait_until("TOKEN frames at the data plane", || {
        dp.log.lock().token_frames.len() >= 2
    })
    .await;
    let sb = wait_played(&b, sb.chunks_played + 10).await;
    let sa = a.stats();
    for (who, s) in [("A", &sa), ("B", &sb)] {
        assert!(s.chunks_verified > 0, "{who}: {s}");
        assert_eq!(s.chunks_unverified, 0, "{who}: {s}");
        assert_eq!(
            s.bad_chunks_from_peers + s.bad_chunks_from_server,
            0,
            "{who}: {s}"
        );
        assert!(s.token_renewals > 0, "{who}: {s:?}");
    }
    assert_eq!(sb.chunks_skipped, 0, "{sb}");
    assert!(sb.peer_share() >= 0.9, "B is fed by A: {sb}");
    assert_eq!(sa.children, 1, "{sa:?}");
    assert_eq!(sa.peers_refused, 0, "{sa:?}");
    // Every HELLO to the data plane carried a token of the fake control plane.
    for t in dp.log.lock().hello_tokens.iter() {
        let (_, claims) = starling_proto::token::peek_unverified(t).unwrap();
        assert_eq!(claims.broadcast_id, "s1");
    }
    assert!(cp.state.lock().report_peers.is_empty());
    b.leave().await.unwrap();
    a.leave().await.unwrap();
    assert_identical(&out.await.unwrap(), "B");
    src.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polluting_parents_are_dropped_reported_and_replaced_without_a_gap() {
    let (signer, keys) = signing();
    let src = Source::signed(K, CHUNK_MS, "p1", signer);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("p1")).await;
    // 98 feeds substreams 0 and 1 and corrupts one payload byte of chunk 33; 99 feeds
    // 2 and 3 and re-signs chunk 38 with its own key.
    let (corrupt, forge) = (33u64, 38u64);
    let m1 = LiveServer::start(
        src.clone(),
        Opts {
            corrupt: [corrupt].into(),
            ..Opts::peer("p1")
        },
    )
    .await;
    let m2 = LiveServer::start(
        src.clone(),
        Opts {
            forge: [forge].into(),
            ..Opts::peer("p1")
        },
    )
    .await;
    src.wait_for(RAP_EVERY).await;
    let p98 = Ref::Fixed(98, m1.addr.to_string());
    let p99 = Ref::Fixed(99, m2.addr.to_string());
    let plans = vec![
        // D: fed by the data plane, E's neighbour.
        Plan {
            parents: vec![Ref::DataPlane; K as usize],
            neighbours: vec![],
            child_slots: 0,
        },
        // E: fed by the two polluters.
        Plan {
            parents: vec![p98.clone(), p98, p99.clone(), p99],
            neighbours: vec![Ref::Joiner(0)],
            child_slots: 0,
        },
    ];
    let (url, cp) = fake_grid::start_with("p1", dp.addr, plans, keys).await;
    let d = Viewer::join(config("p1", &url, 10_000)).await.unwrap();
    let e = Viewer::join(config("p1", &url, 0)).await.unwrap();
    let out = collect(&e);
    tokio::time::timeout(GUARD, async {
        while e.stats().current_seq.is_none_or(|s| s < 50) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("E stalled: {}", e.stats()));
    let se = e.stats();
    assert_eq!(se.bad_chunks_from_peers, 2, "{se}");
    assert_eq!(se.peers_reported, 2, "{se}");
    assert_eq!(se.chunks_skipped, 0, "continuity lost: {se}");
    assert_eq!(se.stalls, 0, "{se}");
    assert!(se.chunks_verified > 0 && se.chunks_unverified == 0, "{se}");
    // Both polluters were told why and disconnected, and never dialled again.
    for (who, m, bad) in [("98", &m1, corrupt), ("99", &m2, forge)] {
        let log = m.log.lock();
        assert_eq!(log.bad_sent, vec![bad], "{who}");
        assert_eq!(log.closes, vec![ErrorCode::BadChunk], "{who}");
        assert_eq!(log.connections, 1, "{who} was dialled again");
    }
    {
        let st = cp.state.lock();
        let mut reported: Vec<u64> = st
            .report_peers
            .iter()
            .filter(|(s, _, _)| s == "s2")
            .map(|(_, p, _)| *p)
            .collect();
        reported.sort_unstable();
        assert_eq!(reported, vec![98, 99], "{:?}", st.report_peers);
        for (peer, subs) in [(98u64, [0u32, 1]), (99, [2, 3])] {
            for sub in subs {
                assert!(
                    st.reparents
                        .iter()
                        .any(|(s, x, ex)| s == "s2" && *x == sub && ex.contains(&peer)),
                    "substream {sub} not re-parented away from {peer}: {:?}",
                    st.reparents
                );
            }
        }
    }
    e.leave().await.unwrap();
    d.leave().await.unwrap();
    let (first, last) = assert_identical(&out.await.unwrap(), "E");
    assert!(first < corrupt && last > forge, "{first}..{last}");
    src.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_tokens_are_checked_renewed_and_expire() {
    let (signer, keys) = signing();
    let src = Source::signed(K, CHUNK_MS, "t1", signer);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("t1")).await;
    src.wait_for(RAP_EVERY).await;
    let plans = vec![Plan {
        parents: vec![Ref::DataPlane; K as usize],
        neighbours: vec![],
        child_slots: 8,
    }];
    let (url, cp) = fake_grid::start_with("t1", dp.addr, plans, keys).await;
    let mut cfg = config("t1", &url, 10_000);
    cfg.token_skew = Duration::from_millis(200);
    let a = Viewer::join(cfg).await.unwrap();
    let addr = a.peer_addr().unwrap().to_string();
    let k = &cp.keys;
    let now = now_ms();
    let refused = [
        ("no token", Bytes::new()),
        ("garbage", Bytes::from_static(b"not a token")),
        ("expired", k.token("t1", 50, now - 120_000, now - 60_000)),
        ("other broadcast", k.token("t2", 50, now, now + 60_000)),
        (
            "unknown key",
            Keys::new(None).token("t1", 50, now, now + 60_000),
        ),
    ];
    for (what, token) in refused {
        let mut p = RawPeer::connect(&addr, "t1", 0, token).await;
        let f = p.next().await;
        assert!(
            matches!(&f, Some(Frame::Error(r)) if r.code == ErrorCode::Unauthorized),
            "{what}: {f:?}"
        );
    }
    // A valid token and a parent ticket: accepted as a child.
    let mut ok = RawPeer::connect_ticketed(
        &addr,
        "t1",
        0b1,
        k.token("t1", 50, now, now + 60_000),
        k.ticket("t1", 50, 1, 0b1),
    )
    .await;
    ok.expect_accepted("valid").await;
    // Short-lived tokens: one is never renewed, one is renewed, one is "renewed" with
    // another peer's token.
    let short = |peer| k.token("t1", peer, now - 1_000, now_ms() + 800);
    let mut lapsing = RawPeer::connect(&addr, "t1", 0, short(51)).await;
    lapsing.expect_accepted("lapsing").await;
    let mut renewed = RawPeer::connect(&addr, "t1", 0, short(52)).await;
    renewed.expect_accepted("renewed").await;
    renewed
        .send(&Frame::Token(k.token("t1", 52, now, now + 60_000)))
        .await;
    let mut impostor = RawPeer::connect(&addr, "t1", 0, short(53)).await;
    impostor.expect_accepted("impostor").await;
    impostor
        .send(&Frame::Token(k.token("t1", 54, now, now + 60_000)))
        .await;
    assert_eq!(impostor.closed_with().await, Some(ErrorCode::Unauthorized));
    assert_eq!(lapsing.closed_with().await, Some(ErrorCode::TokenExpired));
    // The renewed link outlives the lapsed one (same original expiry) for a while.
    let more = tokio::time::timeout(Duration::from_secs(1), renewed.closed_with()).await;
    assert!(more.is_err(), "renewed link closed: {more:?}");
    let more = tokio::time::timeout(Duration::from_millis(100), ok.closed_with()).await;
    assert!(more.is_err(), "valid link closed: {more:?}");
    let sa = a.stats();
    assert_eq!(sa.peers_refused, 5 + 2, "{sa:?}");
    assert_eq!(sa.children, 1, "{sa:?}");
    a.leave().await.unwrap();
    src.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peers_lose_their_links_and_are_refused() {
    let (signer, keys) = signing();
    let src = Source::signed(K, CHUNK_MS, "r1", signer);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("r1")).await;
    src.wait_for(RAP_EVERY).await;
    let plans = vec![
        // A (peer 1): fed by the data plane, relays.
        Plan {
            parents: vec![Ref::DataPlane; K as usize],
            neighbours: vec![],
            child_slots: 8,
        },
        // B (peer 2): every substream from A.
        Plan {
            parents: vec![Ref::Joiner(0); K as usize],
            neighbours: vec![],
            child_slots: 0,
        },
    ];
    let (url, cp) = fake_grid::start_with("r1", dp.addr, plans, keys).await;
    let a = Viewer::join(config("r1", &url, 10_000)).await.unwrap();
    let b = Viewer::join(config("r1", &url, 0)).await.unwrap();
    let sb = wait_played(&b, 20).await;
    assert!(sb.peer_share() > 0.5, "{sb}");
    let addr = a.peer_addr().unwrap().to_string();
    let now = now_ms();
    let token77 = cp.keys.token("r1", 77, now, now + 60_000);
    let mut p = RawPeer::connect(&addr, "r1", 0, token77.clone()).await;
    p.expect_accepted("77").await;

    // The control plane revokes peer 77 and A (peer 1).
    cp.state.lock().revoked = vec![77, 1];
    // A closes its link with 77...
    assert_eq!(p.closed_with().await, Some(ErrorCode::Revoked));
    // ... and refuses it from now on.
    let mut again = RawPeer::connect(&addr, "r1", 0, token77).await;
    let f = again.next().await;
    assert!(
        matches!(&f, Some(Frame::Error(r)) if r.code == ErrorCode::Revoked),
        "{f:?}"
    );
    // B drops A and re-parents every substream away from it.
    wait_until("B re-parenting away from A", || {
        let st = cp.state.lock();
        let subs: BTreeSet<u32> = st
            .reparents
            .iter()
            .filter(|(s, _, ex)| s == "s2" && ex.contains(&1))
            .map(|(_, sub, _)| *sub)
            .collect();
        subs.len() == usize::from(K)
    })
    .await;
    wait_until("A without children", || a.stats().children == 0).await;
    let sb2 = wait_played(&b, sb.chunks_played + 20).await;
    assert_eq!(sb2.peer_links, 0, "{sb2:?}");
    assert!(sb2.bytes_from_server > sb.bytes_from_server, "{sb2}");
    b.leave().await.unwrap();
    a.leave().await.unwrap();
    src.stop();
}

// ---------------------------------------------------------------------------------
// Re-parent times
// ---------------------------------------------------------------------------------

/// A parent leaves: each of the child's K substreams is timed from the loss to the
/// first chunk pushed by its new parent (the data plane here), and to the `Reparent`
/// answer. Only counts are asserted; the durations are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reparent_times_are_measured_when_a_parent_leaves() {
    let src = Source::start(K, CHUNK_MS);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("rt1")).await;
    src.wait_for(2 * RAP_EVERY).await;
    let plans = vec![
        Plan {
            parents: vec![Ref::DataPlane; K as usize],
            neighbours: vec![],
            child_slots: 4,
        },
        Plan {
            parents: vec![Ref::Joiner(0); K as usize],
            neighbours: vec![],
            child_slots: 0,
        },
    ];
    let (url, _cp) = fake_grid::start("rt1", dp.addr, plans).await;
    let a = Viewer::join(config("rt1", &url, 10_000)).await.unwrap();
    let b = Viewer::join(config("rt1", &url, 0)).await.unwrap();
    let before = wait_played(&b, 30).await;
    assert!(before.bytes_from_peers > 0, "{before}");
    // Nothing was lost or re-searched yet.
    assert_eq!(before.reparent_time.count, 0, "{before:?}");
    // Fixed budget: nothing estimated.
    let sa = a.stats();
    assert_eq!(
        (sa.upload_budget_kbps, sa.upload_estimate_kbps),
        (10_000, None)
    );
    assert_eq!(before.upload_budget_kbps, 0);

    a.leave().await.unwrap();
    let after = tokio::time::timeout(GUARD, async {
        loop {
            let s = b.stats();
            if s.reparent_time.count >= u64::from(K) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("re-parents not timed: {:?}", b.stats()));
    let t = after.reparent_time;
    let answer = after.reparent_answer_time;
    println!(
        "re-parent ms: n={} p50 {:?} max {}; to the answer: n={} p50 {:?} max {}",
        t.count,
        t.quantile_ms(0.5),
        t.max_ms,
        answer.count,
        answer.quantile_ms(0.5),
        answer.max_ms
    );
    assert_eq!(t.count, u64::from(K), "{after:?}");
    assert_eq!(answer.count, u64::from(K), "{after:?}");
    assert_eq!(t.buckets.iter().sum::<u64>(), t.count);
    // The first chunk from the new parent comes after the answer that named it.
    assert!(t.sum_ms >= answer.sum_ms, "{t:?} vs {answer:?}");
    b.leave().await.unwrap();
    src.stop();
}

/// A relay whose budget carries about 80 % of what its child subscribed to skips the
/// rest of the pushes and announces each skip with `NOT_FOUND(seq)` in the chunk's
/// place (so the child repairs at once and does not take the parent for a silent one),
/// never twice in a row to one child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_over_its_budget_announces_the_pushes_it_skips() {
    let src = Source::start(K, CHUNK_MS);
    let dp = LiveServer::start(src.clone(), Opts::data_plane("g9")).await;
    src.wait_for(2 * RAP_EVERY).await;
    let plans = vec![Plan {
        parents: vec![Ref::DataPlane; K as usize],
        neighbours: vec![],
        child_slots: 4,
    }];
    let (url, cp) = fake_grid::start("g9", dp.addr, plans).await;
    // The stream is about 130 kbit/s as sent (1,600-byte chunks on average every
    // 100 ms, plus 28 bytes of framing each): a budget of 80 kbit/s carries ~60 %.
    let a = Viewer::join(config("g9", &url, 80)).await.unwrap();
    wait_played(&a, 10).await;
    let tok = cp.keys.token("g9", 77, now_ms(), now_ms() + 60_000);
    let ticket = cp.keys.ticket("g9", 77, 1, 0b1111);
    let (first, s, mut dec, mut buf) =
        raw_subscribe_stream(a.peer_addr().unwrap(), "g9", 0b1111, tok, &[ticket]).await;
    assert!(matches!(first, Frame::StreamInfo(_)), "{first:?}");
    let (mut s, mut w) = s.into_split();
    // A child that sends nothing else pings, or its parent would time it out.
    let pinger = tokio::spawn(async move {
        for n in 0u64.. {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut out = BytesMut::new();
            wire::encode(&Frame::Ping(n), &mut out).unwrap();
            if w.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    // Every chunk after the subscription arrives either pushed or announced as skipped.
    let mut events: Vec<(u64, bool)> = Vec::new();
    tokio::time::timeout(GUARD, async {
        while events.len() < 150 {
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                match f {
                    Frame::Chunk(c) => events.push((c.seq, true)),
                    Frame::NotFound(seq) => events.push((seq, false)),
                    _ => {}
                }
            }
            if s.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
    })
    .await
    .expect("the relay kept pushing or announcing");
    // Past the subscription's start (the newest chunks pushed at once, and the bucket's
    // first 2 s of debt), the sequence is complete and in order.
    assert_eq!(events.len(), 150, "the relay closed the link: {events:?}");
    let tail = &events[50..];
    for w in tail.windows(2) {
        assert_eq!(
            w[1].0,
            w[0].0 + 1,
            "a chunk neither pushed nor announced: {w:?}"
        );
        assert!(w[0].1 || w[1].1, "skipped twice in a row: {w:?}");
    }
    let skipped = tail.iter().filter(|e| !e.1).count();
    assert!(
        skipped * 5 >= tail.len() && skipped * 2 <= tail.len(),
        "{skipped} of {} skipped for a budget of ~60 % of the stream",
        tail.len()
    );
    pinger.abort();
    drop(s);
    a.leave().await.unwrap();
    src.stop();
}

/// A relay tells each parent link what it relays (`RELAYING`, protocol version 3) once
/// it has a child, so that the parent pushes to it before its leaves; a parent that
/// chose version 2 is never sent the frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_tells_its_parents_what_it_relays_on_version_3_links_only() {
    for version in [3u16, 2] {
        let b = format!("rl{version}");
        let src = Source::start(K, CHUNK_MS);
        let dp = LiveServer::start(src.clone(), Opts::data_plane(&b)).await;
        let parent = LiveServer::start(
            src.clone(),
            Opts {
                version,
                ..Opts::peer(&b)
            },
        )
        .await;
        src.wait_for(2 * RAP_EVERY).await;
        let p = Ref::Fixed(98, parent.addr.to_string());
        let plans = vec![Plan {
            parents: vec![p; K as usize],
            neighbours: vec![],
            child_slots: 8,
        }];
        let (url, cp) = fake_grid::start(&b, dp.addr, plans).await;
        let a = Viewer::join(config(&b, &url, 10_000)).await.unwrap();
        wait_played(&a, 10).await;
        assert!(
            parent.log.lock().relaying.is_empty(),
            "nothing to tell before a child"
        );
        // A child on substreams 0 and 1.
        let tok = cp.keys.token(&b, 77, now_ms(), now_ms() + 60_000);
        let ticket = cp.keys.ticket(&b, 77, 1, 0b0011);
        let (first, s, mut dec, mut buf) =
            raw_subscribe_stream(a.peer_addr().unwrap(), &b, 0b0011, tok, &[ticket]).await;
        assert!(matches!(first, Frame::StreamInfo(_)), "{first:?}");
        let (mut s, _w) = s.into_split();
        // Wait until the relay pushes it 20 chunks: it has taken the child.
        let mut pushed = 0;
        tokio::time::timeout(GUARD, async {
            while pushed < 20 {
                while let Some(f) = dec.decode(&mut buf).unwrap() {
                    if matches!(f, Frame::Chunk(_)) {
                        pushed += 1;
                    }
                }
                if s.read_buf(&mut buf).await.unwrap() == 0 {
                    break;
                }
            }
        })
        .await
        .expect("the relay pushed to its child");
        assert_eq!(pushed, 20, "the relay closed the child's link");
        if version >= wire::RELAYING_VERSION {
            wait_until("RELAYING at the parent", || {
                !parent.log.lock().relaying.is_empty()
            })
            .await;
            let masks: Vec<u64> = parent.log.lock().relaying.iter().map(|r| r.1).collect();
            assert_eq!(masks, vec![0b0011], "version {version}");
        } else {
            let relaying = parent.log.lock().relaying.clone();
            assert!(relaying.is_empty(), "version {version}: {relaying:?}");
        }
        drop(s);
        a.leave().await.unwrap();
        src.stop();
    }
}
