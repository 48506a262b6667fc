//! Node authentication on `EdgeService` (every call needs the node key or an admin
//! credential) and chunk-key id clashes at `Register`, over real gRPC on loopback
//! (SQLite and, with `DATABASE_URL`, Postgres).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use starling_controlplane::auth::NEEDS_NODE_BEARER;
use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, CommandsRequest, CreateBroadcastRequest, HealthReport, JoinRequest,
    ListBroadcastsRequest, PublicKey, RegisterNodeRequest, RegisterNodeResponse,
};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ADMIN_KEY: &str = "node-auth-test-admin-key-0123456789";
const NODE_KEY: &str = "node-auth-test-node-key-9876543210";

struct Harness {
    cp: ControlPlaneHandle,
    channel: Channel,
}

type Edge = EdgeServiceClient<InterceptedService<Channel, BearerInterceptor>>;

impl Harness {
    async fn start(store: Store) -> Harness {
        let service = ServiceConfig {
            heartbeat_interval: Duration::from_millis(100),
            node_timeout: Duration::from_secs(600),
            liveness_tick: Duration::from_millis(50),
            ..ServiceConfig::default()
        };
        let auth = AuthConfig {
            admin_key: Some(ADMIN_KEY.into()),
            node_key: Some(NODE_KEY.into()),
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
        Harness { cp, channel }
    }

    /// EdgeService with `authorization: Bearer <token>`.
    fn edge_with(&self, token: &str) -> Edge {
        EdgeServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(token).unwrap(),
        )
    }

    fn edge(&self) -> Edge {
        self.edge_with(NODE_KEY)
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.cp.shutdown().await.unwrap();
    }
}

fn registration(name: &str, key: Option<(u32, u8)>) -> RegisterNodeRequest {
    RegisterNodeRequest {
        node_name: name.into(),
        wire_addr: format!("{name}.test:9000"),
        http_addr: format!("{name}.test:9080"),
        cores: 1,
        capacity_viewers: 100,
        chunk_signing_key: key.map(|(key_id, byte)| PublicKey {
            key_id,
            ed25519: vec![byte; 32],
        }),
    }
}

fn assert_no_secret(status: &tonic::Status) {
    for secret in [ADMIN_KEY, NODE_KEY, "not-the-node-key-at-all-0000"] {
        assert!(!status.message().contains(secret), "{status:?}");
    }
}

async fn edge_calls_need_the_node_key(store: Store) {
    let h = Harness::start(store).await;
    let mut bare = EdgeServiceClient::new(h.channel.clone());

    // No credential: UNAUTHENTICATED on every EdgeService call, saying what to send.
    let e = bare
        .register(registration("anon", Some((1, 1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(e.message(), NEEDS_NODE_BEARER);
    assert!(e.message().contains("--node-key"));
    let e = bare
        .commands(CommandsRequest {
            node_id: "n-anything".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = bare
        .report_health(HealthReport {
            node_id: "n-anything".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A wrong key (and a near miss): refused, without echoing anything secret.
    for wrong in ["not-the-node-key-at-all-0000", &format!("{NODE_KEY}x")] {
        let e = h
            .edge_with(wrong)
            .register(registration("rogue", Some((2, 2))))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("node key"), "{e:?}");
        assert_no_secret(&e);
    }

    // Nothing refused was registered: no node, no chunk key for viewers.
    let mut admin = AdminServiceClient::with_interceptor(
        h.channel.clone(),
        BearerInterceptor::new(ADMIN_KEY).unwrap(),
    );
    let id = admin
        .create_broadcast(CreateBroadcastRequest {
            name: "auth".into(),
            source_url: "http://127.0.0.1:8000/live.ts".into(),
            chunk_duration_ms: 0,
            substreams: 0,
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
    let b = admin
        .get_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        b.node_id.is_empty(),
        "a refused node got the broadcast: {b:?}"
    );

    // The node key: accepted on every call.
    let mut edge = h.edge();
    let reg: RegisterNodeResponse = edge
        .register(registration("honest", Some((3, 3))))
        .await
        .unwrap()
        .into_inner();
    assert!(!reg.node_id.is_empty());
    assert!(!reg.token_keys.is_empty());
    edge.commands(CommandsRequest {
        node_id: reg.node_id.clone(),
    })
    .await
    .unwrap();
    let ack = edge
        .report_health(HealthReport {
            node_id: reg.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.known);

    // Viewers get the authenticated node's chunk key only.
    let joined = ViewerServiceClient::new(h.channel.clone())
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: id.clone(),
            client_version: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        joined.chunk_keys,
        vec![PublicKey {
            key_id: 3,
            ed25519: vec![3; 32]
        }]
    );

    // An admin credential may act as a node...
    h.edge_with(ADMIN_KEY)
        .register(registration("by-admin", None))
        .await
        .unwrap();
    // ...but the node key is no admin credential.
    let e = AdminServiceClient::with_interceptor(
        h.channel.clone(),
        BearerInterceptor::new(NODE_KEY).unwrap(),
    )
    .list_broadcasts(ListBroadcastsRequest::default())
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    h.shutdown().await;
}

async fn chunk_key_id_clash_is_refused(store: Store) {
    let h = Harness::start(store).await;
    let mut edge = h.edge();
    let first = edge
        .register(registration("first", Some((7, 1))))
        .await
        .unwrap()
        .into_inner();

    // Same key id, another public key: refused, naming the clash.
    let e = edge
        .register(registration("shadow", Some((7, 2))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("key id 7"), "{e:?}");
    assert!(e.message().contains(&first.node_id), "{e:?}");

    // The same key again (a node re-registering) is fine, and so is the other key
    // under its own id.
    let again = edge
        .register(registration("first", Some((7, 1))))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.node_id, first.node_id);
    let other = edge
        .register(registration("other", Some((8, 2))))
        .await
        .unwrap()
        .into_inner();

    // Viewers see the first key under id 7, never the shadow.
    let mut admin = AdminServiceClient::with_interceptor(
        h.channel.clone(),
        BearerInterceptor::new(ADMIN_KEY).unwrap(),
    );
    let id = admin
        .create_broadcast(CreateBroadcastRequest {
            name: "clash".into(),
            source_url: "http://127.0.0.1:8000/live.ts".into(),
            chunk_duration_ms: 0,
            substreams: 0,
            public: true,
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let started = admin
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let joined = ViewerServiceClient::new(h.channel.clone())
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: id,
            client_version: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut keys: Vec<(u32, Vec<u8>)> = joined
        .chunk_keys
        .into_iter()
        .map(|k| (k.key_id, k.ed25519))
        .collect();
    keys.sort();
    // Only the ingesting node's key (issue 18: a node's key is trusted only for the
    // broadcasts assigned to it), and never the shadow.
    let want = if started.node_id == other.node_id {
        (8, vec![2; 32])
    } else {
        (7, vec![1; 32])
    };
    assert_eq!(keys, vec![want]);
    h.shutdown().await;
}

on_both_backends!(edge_calls_need_the_node_key, chunk_key_id_clash_is_refused);
