//! A small in-process peer grid on real loopback sockets: a live in-test data plane
//! that honours substream masks and `REQUEST`, an in-test control plane with a fixed
//! tree, and real SDK viewers relaying to each other. Timeouts only guard against
//! hangs; nothing asserts on wall-clock durations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use common::live::{LiveServer, Opts, RAP_EVERY, Source};
use common::payload;
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
    use starling_proto::v1::viewer_service_server::{ViewerService, ViewerServiceServer};
    use starling_proto::v1::*;
    use tonic::{Request, Response, Status};

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
    }

    #[derive(Clone)]
    pub struct Fake {
        pub broadcast: String,
        pub wire_addr: String,
        pub plans: Arc<Vec<Plan>>,
        pub state: Arc<Mutex<State>>,
    }

    fn resolve(st: &State, r: &Ref) -> Option<PeerRef> {
        match r {
            Ref::DataPlane => None,
            Ref::Joiner(i) => Some(PeerRef {
                peer_id: *i as u64 + 1,
                addr: st.joins[*i].peer_addr.clone(),
            }),
            Ref::Fixed(id, addr) => Some(PeerRef {
                peer_id: *id,
                addr: addr.clone(),
            }),
        }
    }

    fn parents(v: &[Option<PeerRef>]) -> Vec<SubstreamParent> {
        v.iter()
            .enumerate()
            .map(|(s, p)| SubstreamParent {
                substream: s as u32,
                peer: p.clone(),
            })
            .collect()
    }

    #[tonic::async_trait]
    impl ViewerService for Fake {
        async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
            let req = req.into_inner();
            if req.broadcast_id != self.broadcast {
                return Err(Status::not_found("no such broadcast"));
            }
            let mut st = self.state.lock().unwrap();
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
                chunk_token: b"token".to_vec(),
                heartbeat_interval_ms: 200,
                peer_id: i as u64 + 1,
                parents: parents(&ps),
                neighbours: ns,
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
            let mut st = self.state.lock().unwrap();
            let ps = st.parents.get(&req.session_id).cloned().unwrap_or_default();
            let ns = st
                .neighbours
                .get(&req.session_id)
                .cloned()
                .unwrap_or_default();
            let active = !st.leaves.contains(&req.session_id);
            st.heartbeats.push(req);
            Ok(Response::new(HeartbeatResponse {
                active,
                parents: parents(&ps),
                neighbours: ns,
            }))
        }

        async fn leave(
            &self,
            req: Request<LeaveRequest>,
        ) -> Result<Response<LeaveResponse>, Status> {
            self.state
                .lock()
                .unwrap()
                .leaves
                .push(req.into_inner().session_id);
            Ok(Response::new(LeaveResponse {}))
        }

        /// Always answers the data plane.
        async fn reparent(
            &self,
            req: Request<ReparentRequest>,
        ) -> Result<Response<ReparentResponse>, Status> {
            let req = req.into_inner();
            let mut st = self.state.lock().unwrap();
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
                }),
            }))
        }
    }

    pub async fn start(broadcast: &str, wire_addr: SocketAddr, plans: Vec<Plan>) -> (String, Fake) {
        let fake = Fake {
            broadcast: broadcast.into(),
            wire_addr: wire_addr.to_string(),
            plans: Arc::new(plans),
            state: Default::default(),
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

use fake_grid::{Plan, Ref};

fn config(broadcast: &str, control_url: &str, upload_kbps: u32) -> ViewerConfig {
    let mut c = ViewerConfig::new(broadcast);
    c.control_url = control_url.into();
    c.http_listen = None;
    c.reconnect_initial = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(200);
    c.target_lag = Duration::from_millis(1500);
    c.relay = RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_host: None,
        max_upload_kbps: Some(upload_kbps),
    };
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

/// A raw peer connection: HELLO(peer), SUBSCRIBE(mask); returns the first frame.
async fn raw_subscribe(addr: &str, broadcast: &str, mask: u64) -> Frame {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    wire::encode(
        &Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Peer,
            token: Default::default(),
        }),
        &mut out,
    )
    .unwrap();
    wire::encode(
        &Frame::Subscribe(Subscribe {
            broadcast_id: broadcast.into(),
            start: StartAt::Live,
            substream_mask: mask,
        }),
        &mut out,
    )
    .unwrap();
    s.write_all(&out).await.unwrap();
    let mut dec = Decoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    tokio::time::timeout(GUARD, async {
        while frames.len() < 2 {
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                frames.push(f);
            }
            if frames.len() >= 2 || s.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(frames.first(), Some(Frame::HelloAck(_))),
        "{frames:?}"
    );
    frames.into_iter().nth(1).expect("no answer to SUBSCRIBE")
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

    // A has no slot left: a third child is refused, a neighbour link is not.
    let refused = raw_subscribe(a.peer_addr().unwrap(), "g1", 0b1).await;
    assert!(
        matches!(&refused, Frame::Error(r) if r.code == ErrorCode::ServerBusy),
        "{refused:?}"
    );
    let neighbour = raw_subscribe(a.peer_addr().unwrap(), "g1", 0).await;
    assert!(matches!(neighbour, Frame::StreamInfo(_)), "{neighbour:?}");
    // A wrong broadcast is refused too.
    let wrong = raw_subscribe(a.peer_addr().unwrap(), "other", 0b1).await;
    assert!(
        matches!(&wrong, Frame::Error(r) if r.code == ErrorCode::UnknownBroadcast),
        "{wrong:?}"
    );

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
        let st = cp.state.lock().unwrap();
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
            .unwrap()
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
            broadcast: "g2".into(),
            role: Role::Peer,
            drop: lossy_drop.clone(),
            window: 300,
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
        cp.state.lock().unwrap().reparents.is_empty(),
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
