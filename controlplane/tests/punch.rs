//! Hole punching, control-plane side (issue 17, docs/PROTOCOL.md "Hole punching"), over
//! real gRPC on loopback (SQLite and, with `DATABASE_URL`, Postgres). A "NAT'd" viewer
//! advertises a private `peer_addr` (ignored: not its IP) and a `host_addr` whose port is
//! the port its gRPC connection comes from (it binds that connection to its listener's
//! port, as the SDK does): its router keeps ports, so it becomes a punch-only relay once
//! its session stream is attached. A viewer whose connection comes from another port
//! (a symmetric NAT) never gets it as a parent. No wall-clock assertion: waits are
//! bounded only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use starling_controlplane::reachability::ReachabilityConfig;
use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, CommandsRequest, CreateBroadcastRequest, JoinRequest, JoinResponse, NodeCommand,
    RegisterNodeRequest, ReparentRequest, SessionDown, SessionUp,
};
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

const ADMIN_KEY: &str = "punch-test-admin-key-0123456789abc";

/// Connects from a fixed local address (`SO_REUSEADDR`/`SO_REUSEPORT`, like the SDK's
/// peer listener and control connection).
#[derive(Clone, Copy)]
struct From(SocketAddr);

impl tower_service::Service<Uri> for From {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let local = self.0;
        Box::pin(async move {
            let remote: SocketAddr = uri.authority().unwrap().as_str().parse().unwrap();
            let s = reusable(local)?;
            Ok(TokioIo::new(s.connect(remote).await?))
        })
    }
}

fn reusable(local: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(local)?;
    Ok(s)
}

struct Harness {
    cp: ControlPlaneHandle,
    _node: tonic::Streaming<NodeCommand>,
}

impl Harness {
    async fn start(store: Store) -> Harness {
        let service = ServiceConfig {
            heartbeat_interval: Duration::from_millis(100),
            node_timeout: Duration::from_secs(600),
            liveness_tick: Duration::from_millis(50),
            missed_heartbeats: 6000,
            reachability: ReachabilityConfig {
                enabled: true,
                timeout: Duration::from_secs(5),
                ..ReachabilityConfig::default()
            },
            ..ServiceConfig::default()
        };
        let auth = AuthConfig {
            admin_key: Some(ADMIN_KEY.into()),
            ..AuthConfig::default()
        };
        let cp =
            ControlPlane::bind_with_store("127.0.0.1:0".parse().unwrap(), store, service, &auth)
                .await
                .unwrap()
                .spawn();
        let channel = Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut edge = EdgeServiceClient::with_interceptor(
            channel,
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        );
        let reg = edge
            .register(RegisterNodeRequest {
                node_name: "edge".into(),
                wire_addr: "edge.test:9000".into(),
                http_addr: "edge.test:9080".into(),
                cores: 1,
                capacity_viewers: 1000,
                chunk_signing_key: None,
            })
            .await
            .unwrap()
            .into_inner();
        let node = edge
            .commands(CommandsRequest {
                node_id: reg.node_id,
            })
            .await
            .unwrap()
            .into_inner();
        Harness { cp, _node: node }
    }

    async fn admin(
        &self,
    ) -> AdminServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, BearerInterceptor>,
    > {
        let channel = Channel::from_shared(self.cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        AdminServiceClient::with_interceptor(channel, BearerInterceptor::new(ADMIN_KEY).unwrap())
    }

    async fn live_broadcast(&self) -> String {
        let mut admin = self.admin().await;
        let id = admin
            .create_broadcast(CreateBroadcastRequest {
                name: "punch".into(),
                source_url: "http://127.0.0.1:8000/live.ts".into(),
                chunk_duration_ms: 0,
                substreams: 4,
                public: true,
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        admin
            .start_broadcast(BroadcastRef { id: id.clone() })
            .await
            .unwrap();
        id
    }

    async fn peer_supply(&self, id: &str) -> u64 {
        self.admin()
            .await
            .get_broadcast(BroadcastRef { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .peer_supply_slots
    }
}

/// A viewer behind a NAT: `ip` stands for its router's public address. `keeps_ports`:
/// its gRPC connection leaves from its listener's port (else from an ephemeral one).
struct Viewer {
    client: ViewerServiceClient<Channel>,
    /// The listener's port (held bound, as the SDK holds its peer listener).
    _listener: tokio::net::TcpListener,
    port: u16,
}

async fn viewer(h: &Harness, ip: [u8; 4], keeps_ports: bool) -> Viewer {
    let listener = reusable(SocketAddr::from((ip, 0)))
        .unwrap()
        .listen(16)
        .unwrap();
    let local = listener.local_addr().unwrap();
    let endpoint = Endpoint::from_shared(h.cp.url()).unwrap();
    let channel = if keeps_ports {
        endpoint.connect_with_connector(From(local)).await.unwrap()
    } else {
        endpoint
            .local_address(Some(local.ip()))
            .connect()
            .await
            .unwrap()
    };
    Viewer {
        client: ViewerServiceClient::new(channel),
        _listener: listener,
        port: local.port(),
    }
}

async fn join(v: &mut Viewer, b: &str, upload_kbps: u32) -> JoinResponse {
    v.client
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: b.into(),
            client_version: "punch-test".into(),
            // Its private address: not the IP its join comes from, so ignored.
            peer_addr: format!("192.168.1.2:{}", v.port),
            host_addr: format!("192.168.1.2:{}", v.port),
            upload_kbps,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Opens the session stream; returns the sender (keep it) and the responses.
async fn session(
    v: &mut Viewer,
    session_id: &str,
) -> (
    tokio::sync::mpsc::Sender<SessionUp>,
    tonic::Streaming<SessionDown>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SessionUp {
        session_id: session_id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let down = v
        .client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, down)
}

async fn until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_viewer_whose_router_keeps_ports_relays_by_punching(store: Store) {
    let h = Harness::start(store).await;
    let b = h.live_broadcast().await;

    // The relay: behind a router that keeps ports, no mapping.
    let mut relay = viewer(&h, [127, 0, 8, 1], true).await;
    let r = join(&mut relay, &b, 4000).await;
    assert_eq!(r.observed_addr, format!("127.0.8.1:{}", relay.port));
    // Nothing to probe, and its session stream is not attached yet: no children.
    assert_eq!(h.peer_supply(&b).await, 0);
    let (_up, mut down) = session(&mut relay, &r.session_id).await;
    let first = down.message().await.unwrap().unwrap();
    assert!(first.active);
    until("the punch-only relay's slots", async || {
        h.peer_supply(&b).await > 0
    })
    .await;

    // A child whose router keeps ports gets it, flagged: dial it by punching.
    let mut child = viewer(&h, [127, 0, 8, 2], true).await;
    let c = join(&mut child, &b, 0).await;
    let to_relay: Vec<_> = c
        .parents
        .iter()
        .filter_map(|p| p.peer.as_ref())
        .filter(|p| p.peer_id == r.peer_id)
        .collect();
    assert!(!to_relay.is_empty(), "{c:?}");
    for p in &to_relay {
        assert!(p.punch, "{p:?}");
        assert_eq!(p.addr, format!("127.0.8.1:{}", relay.port));
    }
    // The relay is told to punch towards the child's reflexive address.
    let want = format!("127.0.8.2:{}", child.port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = tokio::time::timeout_at(deadline.into(), down.message())
            .await
            .expect("no SessionDown.punch for the child")
            .unwrap()
            .unwrap();
        if d.punch
            .iter()
            .any(|p| p.peer_id == c.peer_id && p.addr == want)
        {
            break;
        }
    }

    // Children behind symmetric NATs (their connection's port is not their
    // listener's) never get the punch-only relay; nor does anyone as a mesh neighbour.
    for i in 3..=10u8 {
        let mut sym = viewer(&h, [127, 0, 8, i], false).await;
        let s = join(&mut sym, &b, 0).await;
        for p in s.parents.iter().filter_map(|p| p.peer.as_ref()) {
            assert_ne!(
                p.peer_id, r.peer_id,
                "a symmetric child under the relay: {s:?}"
            );
        }
        assert!(s.neighbours.iter().all(|n| n.peer_id != r.peer_id), "{s:?}");
    }

    // The child could not punch through: the relay loses its children for good.
    let s = c
        .parents
        .iter()
        .find(|p| p.peer.as_ref().is_some_and(|x| x.peer_id == r.peer_id))
        .unwrap()
        .substream;
    child
        .client
        .reparent(ReparentRequest {
            session_id: c.session_id.clone(),
            substream: s,
            exclude_peer_ids: vec![r.peer_id],
            unreachable_peer_ids: vec![r.peer_id],
        })
        .await
        .unwrap();
    until("the relay's slots taken away", async || {
        h.peer_supply(&b).await == 0
    })
    .await;
    // A new stream of its own does not give them back.
    let (_up2, mut down2) = session(&mut relay, &r.session_id).await;
    assert!(down2.message().await.unwrap().unwrap().active);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.peer_supply(&b).await, 0);
    h.cp.shutdown().await.unwrap();
}

on_both_backends!(a_viewer_whose_router_keeps_ports_relays_by_punching);
