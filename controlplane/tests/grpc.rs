//! gRPC integration tests: the real server in-process on a loopback socket, real tonic
//! clients, on SQLite and (when `DATABASE_URL` is set) Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::node_command::Command;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, BroadcastState, CommandsRequest, CreateBroadcastRequest, HealthReport,
    HeartbeatRequest, HeartbeatResponse, IngestCommand, IngestHealth, JoinRequest, JoinResponse,
    LeaveRequest, ListBroadcastsRequest, NodeCommand, RegisterNodeRequest, ReparentRequest,
    SourceHealth, SubstreamParent,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The static admin key of the test control planes (admin auth is covered by
/// `tests/rights.rs`).
const ADMIN_KEY: &str = "grpc-test-admin-key-0123456789";

/// Upper bound for waiting on an event that should happen (a hang guard, not a
/// timing assertion).
const PATIENCE: Duration = Duration::from_secs(20);

struct Harness {
    cp: ControlPlaneHandle,
    channel: Channel,
}

impl Harness {
    /// A control plane whose nodes time out after 10 s (tests not about node death,
    /// so a loaded machine cannot make them flaky).
    async fn start(store: Store) -> Harness {
        Self::start_with_node_timeout(store, Duration::from_secs(10)).await
    }

    async fn start_with_node_timeout(store: Store, node_timeout: Duration) -> Harness {
        // Sessions do not expire (600 x 100 ms) during tests not about expiry.
        Self::start_with_timeouts(store, node_timeout, 600).await
    }

    /// Heartbeat interval 100 ms; sessions expire after `missed_heartbeats` of them.
    async fn start_with_timeouts(
        store: Store,
        node_timeout: Duration,
        missed_heartbeats: u32,
    ) -> Harness {
        let service = ServiceConfig {
            heartbeat_interval: Duration::from_millis(100),
            node_timeout,
            liveness_tick: Duration::from_millis(50),
            command_buffer: 64,
            missed_heartbeats,
            // These grid tests join peers that advertise 10.0.0.x addresses from
            // loopback (the nearby preference needs distinct prefixes): the peer address
            // check is covered by `tests/hostile_control.rs`.
            trust: starling_controlplane::trust::TrustConfig {
                peer_addr_check: starling_controlplane::trust::PeerAddrCheck::Off,
                ..Default::default()
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
                .unwrap();
        assert_ne!(cp.local_addr().port(), 0);
        let cp = cp.spawn();
        let channel = Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Harness { cp, channel }
    }

    fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    fn viewer(&self) -> ViewerServiceClient<Channel> {
        ViewerServiceClient::new(self.channel.clone())
    }

    /// EdgeService as a node: the admin key is accepted as a node credential (node
    /// authentication is covered by `tests/node_auth.rs`).
    fn edge(&self) -> EdgeServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        EdgeServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    async fn create(&self, name: &str) -> String {
        self.admin()
            .create_broadcast(CreateBroadcastRequest {
                name: name.into(),
                source_url: "http://127.0.0.1:8000/live.ts".into(),
                chunk_duration_ms: 0,
                substreams: 0,
                public: true,
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.cp.shutdown().await.unwrap();
    }
}

/// A fake data-plane node speaking the real EdgeService.
struct FakeNode {
    id: String,
    commands: tonic::Streaming<NodeCommand>,
}

impl FakeNode {
    async fn register(h: &Harness, name: &str) -> FakeNode {
        let mut edge = h.edge();
        let reg = edge
            .register(RegisterNodeRequest {
                node_name: name.into(),
                wire_addr: format!("{name}.test:9000"),
                http_addr: format!("{name}.test:9080"),
                cores: 2,
                capacity_viewers: 1000,
                chunk_signing_key: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!reg.node_id.is_empty());
        assert_eq!(reg.heartbeat_interval_ms, 100);
        let commands = edge
            .commands(CommandsRequest {
                node_id: reg.node_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        FakeNode {
            id: reg.node_id,
            commands,
        }
    }

    /// The next command other than a `KeysCommand` (every stream starts with one).
    async fn next_command(&mut self) -> Command {
        loop {
            let command = tokio::time::timeout(PATIENCE, self.commands.next())
                .await
                .expect("no command within the patience bound")
                .expect("command stream ended")
                .expect("command stream error")
                .command
                .expect("empty command");
            if !matches!(command, Command::Keys(_)) {
                return command;
            }
        }
    }

    async fn expect_ingest(&mut self) -> IngestCommand {
        match self.next_command().await {
            Command::Ingest(i) => i,
            other => panic!("expected ingest, got {other:?}"),
        }
    }

    /// Reports health every 30 ms in the background until the returned sender drops.
    fn keep_reporting(&self, h: &Harness) -> tokio::sync::oneshot::Sender<()> {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let mut edge = h.edge();
        let node_id = self.id.clone();
        tokio::spawn(async move {
            loop {
                let _ = edge
                    .report_health(HealthReport {
                        node_id: node_id.clone(),
                        ingests: vec![],
                        viewers: 0,
                    })
                    .await;
                tokio::select! {
                    _ = &mut rx => return,
                    () = tokio::time::sleep(Duration::from_millis(30)) => {}
                }
            }
        });
        tx
    }
}

async fn admin_lifecycle(store: Store) {
    let h = Harness::start(store).await;
    let mut admin = h.admin();
    let b = admin
        .create_broadcast(CreateBroadcastRequest {
            name: "  Radio One ".into(),
            source_url: "http://127.0.0.1:8000/live.ts".into(),
            chunk_duration_ms: 0,
            substreams: 0,
            public: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.name, "Radio One");
    assert_eq!(b.chunk_duration_ms, 1000);
    assert_eq!(b.substreams, 8);
    assert_eq!(b.state, BroadcastState::Created as i32);
    assert_eq!(b.source_health, SourceHealth::Unknown as i32);
    assert!(!b.id.is_empty() && b.id.len() <= 128);
    assert!(
        b.id.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    );

    let got = admin
        .get_broadcast(BroadcastRef { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, b);

    let other = h.create("other").await;
    let list = admin
        .list_broadcasts(ListBroadcastsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .broadcasts;
    assert_eq!(
        list.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        vec![b.id.as_str(), other.as_str()]
    );

    // No node: LIVE, unassigned.
    let started = admin
        .start_broadcast(BroadcastRef { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, BroadcastState::Live as i32);
    assert_eq!(started.node_id, "");
    // Idempotent.
    let again = admin
        .start_broadcast(BroadcastRef { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, BroadcastState::Live as i32);

    let stopped = admin
        .stop_broadcast(BroadcastRef { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state, BroadcastState::Stopped as i32);
    let list = admin
        .list_broadcasts(ListBroadcastsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .broadcasts;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, other);
    let all = admin
        .list_broadcasts(ListBroadcastsRequest {
            include_stopped: true,
        })
        .await
        .unwrap()
        .into_inner()
        .broadcasts;
    assert_eq!(all.len(), 2);

    // A stopped broadcast can be restarted.
    let restarted = admin
        .start_broadcast(BroadcastRef { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restarted.state, BroadcastState::Live as i32);
    h.shutdown().await;
}

async fn admin_errors(store: Store) {
    let h = Harness::start(store).await;
    let mut admin = h.admin();
    for call in ["get", "start", "stop"] {
        let r = BroadcastRef { id: "nope".into() };
        let err = match call {
            "get" => admin.get_broadcast(r).await.unwrap_err(),
            "start" => admin.start_broadcast(r).await.unwrap_err(),
            _ => admin.stop_broadcast(r).await.unwrap_err(),
        };
        assert_eq!(err.code(), Code::NotFound, "{call}: {err:?}");
        assert!(err.message().contains("nope"), "{call}: {err:?}");
    }
    let err = admin
        .get_broadcast(BroadcastRef { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let bad = |name: &str, url: &str, ms: u32, subs: u32| CreateBroadcastRequest {
        name: name.into(),
        source_url: url.into(),
        chunk_duration_ms: ms,
        substreams: subs,
        public: false,
    };
    for (req, needle) in [
        (
            bad("x", "https://h/live", 0, 0),
            "https:// is not supported by ingest yet",
        ),
        (bad("x", "rtmp://h/live", 0, 0), "use an http:// URL"),
        (bad("x", "::nonsense", 0, 0), "not a valid URL"),
        (bad("", "http://h/live", 0, 0), "name must not be empty"),
        (bad(&"n".repeat(201), "http://h/live", 0, 0), "at most 200"),
        (
            bad("x", "http://h/live", 50, 0),
            "chunk_duration_ms 50 out of range",
        ),
        (
            bad("x", "http://h/live", 0, 65),
            "substreams 65 out of range",
        ),
    ] {
        let err = admin.create_broadcast(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{needle}: {err:?}");
    }
    h.shutdown().await;
}

async fn join_errors(store: Store) {
    let h = Harness::start(store).await;
    let mut viewer = h.viewer();
    let join = |id: &str| JoinRequest {
        holder_key: vec![7; 32],
        broadcast_id: id.into(),
        credential: "ignored".into(),
        client_version: "test".into(),
        ..Default::default()
    };
    let err = viewer.join(join("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let id = h.create("j").await;
    let err = viewer.join(join(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not started"), "{err:?}");

    h.admin()
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap();
    let err = viewer.join(join(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("retry"), "{err:?}");

    h.admin()
        .stop_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap();
    let err = viewer.join(join(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("stopped"), "{err:?}");

    let err = viewer.join(join("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = viewer
        .join(JoinRequest {
            holder_key: vec![7; 32],
            peer_addr: "no-port".into(),
            upload_kbps: 1000,
            ..join(&id)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("peer_addr"), "{err:?}");

    // Unknown sessions are inactive; leaving is idempotent.
    let hb = viewer
        .heartbeat(HeartbeatRequest {
            session_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!hb.active);
    viewer
        .leave(LeaveRequest {
            session_id: "ghost".into(),
        })
        .await
        .unwrap();
    h.shutdown().await;
}

async fn node_ingests_viewers_join_and_stop(store: Store) {
    let h = Harness::start(store).await;
    let mut node = FakeNode::register(&h, "edge1").await;
    let _reporting = node.keep_reporting(&h);
    let id = h.create("live").await;
    let started = h
        .admin()
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.node_id, node.id);
    assert_eq!(started.node_wire_addr, "edge1.test:9000");
    assert_eq!(started.node_http_addr, "edge1.test:9080");

    let ingest = node.expect_ingest().await;
    assert_eq!(
        ingest,
        IngestCommand {
            broadcast_id: id.clone(),
            source_url: "http://127.0.0.1:8000/live.ts".into(),
            chunk_duration_ms: 1000,
            substreams: 8,
            public: true,
            // The first run.
            run_epoch: 1,
        }
    );
    assert_eq!(started.run_epoch, 1);

    let ack = h
        .edge()
        .report_health(HealthReport {
            node_id: node.id.clone(),
            ingests: vec![IngestHealth {
                broadcast_id: id.clone(),
                health: SourceHealth::Up as i32,
                error: String::new(),
                last_seq: 12,
                content_type: "video/mp2t".into(),
                viewers: 3,
                bitrate_kbps: 0,
            }],
            viewers: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.known);
    let b = h
        .admin()
        .get_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.source_health, SourceHealth::Up as i32);
    assert_eq!(b.last_seq, 12);
    assert_eq!(b.content_type, "video/mp2t");
    assert_eq!(b.viewers_now, 3);

    let mut viewer = h.viewer();
    let joined = viewer
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: id.clone(),
            credential: String::new(),
            client_version: "starling-sdk/test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!joined.session_id.is_empty());
    assert_eq!(joined.dataplane_wire_addr, "edge1.test:9000");
    assert_eq!(joined.dataplane_http_addr, "edge1.test:9080");
    assert_eq!(joined.heartbeat_interval_ms, 100);
    let params = joined.params.unwrap();
    assert_eq!(params.broadcast_id, id);
    assert_eq!(params.content_type, "video/mp2t");
    assert_eq!(params.chunk_duration_ms, 1000);
    assert_eq!(params.substreams, 8);
    let session = joined.session_id;
    assert!(
        viewer
            .heartbeat(HeartbeatRequest {
                session_id: session.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .active
    );

    h.admin()
        .stop_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap();
    match node.next_command().await {
        Command::Stop(s) => assert_eq!(s.broadcast_id, id),
        other => panic!("expected stop, got {other:?}"),
    }
    assert!(
        !viewer
            .heartbeat(HeartbeatRequest {
                session_id: session.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .active,
        "sessions end when the broadcast stops"
    );
    h.shutdown().await;
}

async fn desired_state_is_replayed_when_a_node_arrives(store: Store) {
    let h = Harness::start(store).await;
    let id = h.create("early").await;
    let started = h
        .admin()
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.node_id, "", "no node yet");
    let mut node = FakeNode::register(&h, "late").await;
    let _reporting = node.keep_reporting(&h);
    let ingest = node.expect_ingest().await;
    assert_eq!(ingest.broadcast_id, id);
    let b = h
        .admin()
        .get_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.node_id, node.id);

    // Reopening the stream replays the ingest again.
    let mut again = h
        .edge()
        .commands(CommandsRequest {
            node_id: node.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut replay = Vec::new();
    for _ in 0..2 {
        let cmd = tokio::time::timeout(PATIENCE, again.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        replay.push(cmd.command.unwrap());
    }
    // The replay starts with the token keys, then the desired state.
    assert!(matches!(&replay[0], Command::Keys(k) if !k.token_keys.is_empty()));
    assert_eq!(replay[1], Command::Ingest(ingest));
    // The previous stream of the same node ended.
    let old = tokio::time::timeout(PATIENCE, node.commands.next())
        .await
        .unwrap();
    assert!(old.is_none() || old.is_some_and(|r| r.is_err()));
    h.shutdown().await;
}

async fn stray_ingest_gets_a_stop(store: Store) {
    let h = Harness::start(store).await;
    let mut node = FakeNode::register(&h, "stray").await;
    let ack = h
        .edge()
        .report_health(HealthReport {
            node_id: node.id.clone(),
            ingests: vec![IngestHealth {
                broadcast_id: "not-mine".into(),
                health: SourceHealth::Up as i32,
                ..Default::default()
            }],
            viewers: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.known);
    match node.next_command().await {
        Command::Stop(s) => assert_eq!(s.broadcast_id, "not-mine"),
        other => panic!("expected stop, got {other:?}"),
    }
    // Unknown node ids are told to re-register; bad ones are rejected.
    let ack = h
        .edge()
        .report_health(HealthReport {
            node_id: "n-ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.known);
    let err = h
        .edge()
        .commands(CommandsRequest {
            node_id: "n-ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .edge()
        .register(RegisterNodeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    h.shutdown().await;
}

async fn silent_node_is_declared_dead_and_its_broadcast_moves(store: Store) {
    let h = Harness::start_with_node_timeout(store, Duration::from_millis(300)).await;
    let mut a = FakeNode::register(&h, "a").await;
    let stop_a = a.keep_reporting(&h);
    let id = h.create("moving").await;
    let started = h
        .admin()
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.node_id, a.id);
    assert_eq!(a.expect_ingest().await.broadcast_id, id);

    let mut b = FakeNode::register(&h, "b").await;
    let _reporting_b = b.keep_reporting(&h);
    // A goes silent.
    drop(stop_a);
    let ingest = b.expect_ingest().await;
    assert_eq!(ingest.broadcast_id, id);
    let moved = h
        .admin()
        .get_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.node_id, b.id);
    assert_eq!(moved.node_wire_addr, "b.test:9000");
    assert_eq!(moved.state, BroadcastState::Live as i32);

    // A's stream ended, and A is told to re-register.
    let end = tokio::time::timeout(PATIENCE, a.commands.next())
        .await
        .unwrap();
    assert!(end.is_none() || end.is_some_and(|r| r.is_err()));
    let ack = h
        .edge()
        .report_health(HealthReport {
            node_id: a.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.known);
    h.shutdown().await;
}

async fn last_node_dies_broadcast_waits_unassigned(store: Store) {
    let h = Harness::start_with_node_timeout(store, Duration::from_millis(300)).await;
    let mut a = FakeNode::register(&h, "only").await;
    let stop_a = a.keep_reporting(&h);
    let id = h.create("orphan").await;
    h.admin()
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap();
    a.expect_ingest().await;
    drop(stop_a);
    // Wait for A's stream to end: it is closed when A is declared dead.
    let end = tokio::time::timeout(PATIENCE, a.commands.next())
        .await
        .unwrap();
    assert!(end.is_none() || end.is_some_and(|r| r.is_err()));
    let b = h
        .admin()
        .get_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BroadcastState::Live as i32);
    assert_eq!(b.node_id, "");
    assert_eq!(b.source_health, SourceHealth::Unknown as i32);
    let err = h
        .viewer()
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // A new node picks it up.
    let mut c = FakeNode::register(&h, "new").await;
    let _reporting = c.keep_reporting(&h);
    assert_eq!(c.expect_ingest().await.broadcast_id, id);
    h.shutdown().await;
}

async fn health_and_reflection(store: Store) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let h = Harness::start(store).await;
    let mut health = HealthClient::new(h.channel.clone());
    for service in [
        "",
        "starling.v1.AdminService",
        "starling.v1.ViewerService",
        "starling.v1.EdgeService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(h.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let first = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("unexpected reflection response {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "starling.v1.AdminService",
        "starling.v1.ViewerService",
        "starling.v1.EdgeService",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    // v1alpha too (older grpcurl / grpcio clients).
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut reflection = ServerReflectionClient::new(h.channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "starling.v1.ViewerService".into(),
            )),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let first = responses.next().await.unwrap().unwrap();
        assert!(
            matches!(
                first.message_response,
                Some(MessageResponse::FileDescriptorResponse(_))
            ),
            "{first:?}"
        );
    }
    h.shutdown().await;
}

// ---------------------------------------------------------------------------- peer grid

/// A live broadcast with `substreams` substreams on a fake node that reported a measured
/// stream rate of `kbps` (so one substream slot is `kbps / substreams`).
struct LiveGrid {
    id: String,
    _node: FakeNode,
    _reporting: tokio::sync::oneshot::Sender<()>,
}

async fn live_grid(h: &Harness, substreams: u32, kbps: u32) -> LiveGrid {
    let mut node = FakeNode::register(h, "grid").await;
    let reporting = node.keep_reporting(h);
    let id = h
        .admin()
        .create_broadcast(CreateBroadcastRequest {
            name: "grid".into(),
            source_url: "http://127.0.0.1:8000/live.ts".into(),
            chunk_duration_ms: 0,
            substreams,
            public: true,
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    h.admin()
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(node.expect_ingest().await.broadcast_id, id);
    let ack = h
        .edge()
        .report_health(HealthReport {
            node_id: node.id.clone(),
            ingests: vec![IngestHealth {
                broadcast_id: id.clone(),
                health: SourceHealth::Up as i32,
                bitrate_kbps: kbps,
                ..Default::default()
            }],
            viewers: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.known);
    LiveGrid {
        id,
        _node: node,
        _reporting: reporting,
    }
}

async fn join_peer(h: &Harness, id: &str, peer_addr: &str, upload_kbps: u32) -> JoinResponse {
    h.viewer()
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: id.into(),
            client_version: "grid-test".into(),
            peer_addr: peer_addr.into(),
            upload_kbps,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn heartbeat(h: &Harness, session: &str, counters: [u64; 3]) -> HeartbeatResponse {
    h.viewer()
        .heartbeat(HeartbeatRequest {
            session_id: session.into(),
            bytes_from_server: counters[0],
            bytes_from_peers: counters[1],
            bytes_uploaded: counters[2],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn get(h: &Harness, id: &str) -> starling_proto::v1::Broadcast {
    h.admin()
        .get_broadcast(BroadcastRef { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Parent peer ids of a parent list (data plane = None).
fn parent_ids(parents: &[SubstreamParent]) -> Vec<Option<u64>> {
    parents
        .iter()
        .map(|p| p.peer.as_ref().map(|r| r.peer_id))
        .collect()
}

fn assert_one_per_substream(parents: &[SubstreamParent], k: u32) {
    assert_eq!(
        parents.iter().map(|p| p.substream).collect::<Vec<_>>(),
        (0..k).collect::<Vec<_>>(),
        "{parents:?}"
    );
}

async fn grid_join_assigns_parents_neighbours_and_booster(store: Store) {
    let h = Harness::start(store).await;
    // K = 4 at 1000 kbps: one slot = 250 kbps.
    let g = live_grid(&h, 4, 1000).await;
    let k = 4;

    // The first viewer is fed by the data plane on every substream.
    let a = join_peer(&h, &g.id, "10.0.0.1:7001", 1000).await;
    assert_ne!(a.peer_id, 0);
    assert_eq!(a.stream_kbps, 1000, "the measured rate is used");
    assert_eq!(a.child_slots, 4);
    assert_one_per_substream(&a.parents, k);
    assert!(a.parents.iter().all(|p| p.peer.is_none()), "{a:?}");
    assert!(a.neighbours.is_empty());
    let b0 = get(&h, &g.id).await;
    assert_eq!(b0.peers, 1);
    assert_eq!(b0.stream_kbps, 1000);
    assert_eq!(b0.demand_slots, 4);
    assert_eq!(b0.peer_supply_slots, 4);
    assert_eq!(
        b0.booster_slots,
        u64::from(k),
        "a lone viewer: K data-plane slots"
    );
    assert_eq!(b0.booster_kbps, 1000);
    assert_eq!(b0.fluid_bound_kbps, 1000);
    assert_eq!(b0.max_depth, 1);

    // Once capacity exists, a viewer is fed by peers: all four substreams by A. It
    // reports a 0.0.0.0 bind address: others are told the address it called from.
    let b = join_peer(&h, &g.id, "0.0.0.0:7002", 0).await;
    assert_ne!(b.peer_id, a.peer_id);
    assert_eq!(b.child_slots, 0);
    assert_one_per_substream(&b.parents, k);
    for p in &b.parents {
        let r = p.peer.as_ref().expect("fed by a peer");
        assert_eq!((r.peer_id, r.addr.as_str()), (a.peer_id, "10.0.0.1:7001"));
    }
    assert_eq!(b.neighbours.len(), 1);
    assert_eq!(b.neighbours[0].peer_id, a.peer_id);
    assert_eq!(b.neighbours[0].addr, "10.0.0.1:7001");
    let hb = heartbeat(&h, &a.session_id, [0; 3]).await;
    assert!(hb.active);
    assert_eq!(hb.neighbours.len(), 1);
    assert_eq!(hb.neighbours[0].peer_id, b.peer_id);
    assert_eq!(hb.neighbours[0].addr, "127.0.0.1:7002");
    assert_eq!(get(&h, &g.id).await.booster_slots, u64::from(k));

    // The grid is full: viewers that do not relay (upload claimed without an address
    // counts as 0) are boosted by the data plane.
    let c = join_peer(&h, &g.id, "", 5000).await;
    assert_eq!(c.child_slots, 0);
    assert!(c.parents.iter().all(|p| p.peer.is_none()), "{c:?}");
    let d = join_peer(&h, &g.id, "", 0).await;
    assert!(d.parents.iter().all(|p| p.peer.is_none()), "{d:?}");
    let full = get(&h, &g.id).await;
    assert_eq!(full.peers, 4);
    assert_eq!(full.demand_slots, 16);
    assert_eq!(full.peer_supply_slots, 4);
    assert_eq!(full.booster_slots, 12);
    assert_eq!(full.booster_kbps, 12 * 250);
    assert_eq!(full.fluid_bound_kbps, 3000);

    // A high-capacity relay joins: boosted viewers move under it, the booster drops.
    let e = join_peer(&h, &g.id, "10.0.0.5:7005", 4000).await;
    assert_eq!(e.child_slots, 16);
    let after = get(&h, &g.id).await;
    assert_eq!(after.peers, 5);
    assert_eq!(after.demand_slots, 20);
    assert_eq!(after.peer_supply_slots, 20);
    assert!(
        after.booster_slots < full.booster_slots && after.booster_slots >= u64::from(k),
        "{after:?}"
    );
    assert_eq!(after.booster_kbps, after.booster_slots * 250);
    assert!(after.max_depth >= 2);

    // Everyone learns its current parents by heartbeat; viewers with upload 0 (B, D)
    // or without an address (C) are never anyone's parent, and never a neighbour
    // without an address.
    let never_parents = [b.peer_id, c.peer_id, d.peer_id];
    let mut fed_by_e = 0;
    for s in [&a, &b, &c, &d, &e] {
        let hb = heartbeat(&h, &s.session_id, [0; 3]).await;
        assert!(hb.active);
        assert_one_per_substream(&hb.parents, k);
        for id in parent_ids(&hb.parents).into_iter().flatten() {
            assert!(!never_parents.contains(&id), "{id} is a parent: {hb:?}");
            assert_ne!(id, s.peer_id);
            fed_by_e += usize::from(id == e.peer_id);
        }
        for n in &hb.neighbours {
            assert!(
                ![c.peer_id, d.peer_id, s.peer_id].contains(&n.peer_id),
                "{hb:?}"
            );
            assert!(!n.addr.is_empty());
        }
    }
    assert!(fed_by_e > 0, "the new relay took boosted children");
    let listed = h
        .admin()
        .list_broadcasts(ListBroadcastsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .broadcasts;
    let mine = listed.iter().find(|x| x.id == g.id).unwrap();
    assert_eq!(mine.peers, 5);
    assert_eq!(mine.booster_slots, after.booster_slots);
    h.shutdown().await;
}

async fn grid_leave_of_a_parent_reparents_its_children(store: Store) {
    let h = Harness::start(store).await;
    let g = live_grid(&h, 4, 1000).await;
    let a = join_peer(&h, &g.id, "10.0.0.1:7001", 1000).await;
    let f = join_peer(&h, &g.id, "10.0.0.2:7001", 1000).await;
    let b = join_peer(&h, &g.id, "", 0).await;
    let hb = heartbeat(&h, &b.session_id, [0; 3]).await;
    let parent = parent_ids(&hb.parents)
        .into_iter()
        .flatten()
        .next()
        .expect("B has a peer parent");
    let leaver = [&a, &f].into_iter().find(|s| s.peer_id == parent).unwrap();
    h.viewer()
        .leave(LeaveRequest {
            session_id: leaver.session_id.clone(),
        })
        .await
        .unwrap();
    let hb = heartbeat(&h, &b.session_id, [0; 3]).await;
    assert!(hb.active);
    assert_one_per_substream(&hb.parents, 4);
    assert!(
        !parent_ids(&hb.parents).contains(&Some(parent)),
        "the leaver is still a parent: {hb:?}"
    );
    assert!(!heartbeat(&h, &leaver.session_id, [0; 3]).await.active);
    assert_eq!(get(&h, &g.id).await.peers, 2);
    h.shutdown().await;
}

async fn grid_missed_heartbeats_expire_a_session_and_reparent_its_children(store: Store) {
    // Heartbeat every 100 ms; a session silent for 3 of them (300 ms) expires.
    let h = Harness::start_with_timeouts(store, Duration::from_secs(10), 3).await;
    let g = live_grid(&h, 4, 1000).await;
    let a = join_peer(&h, &g.id, "10.0.0.1:7001", 1000).await;
    let b = join_peer(&h, &g.id, "10.0.0.2:7002", 0).await;
    let first = heartbeat(&h, &b.session_id, [0; 3]).await;
    assert!(parent_ids(&first.parents).contains(&Some(a.peer_id)));
    // B keeps heartbeating; A falls silent.
    let reparented = tokio::time::timeout(PATIENCE, async {
        loop {
            let hb = heartbeat(&h, &b.session_id, [0; 3]).await;
            assert!(hb.active, "B heartbeats and must stay active");
            if !parent_ids(&hb.parents).contains(&Some(a.peer_id)) {
                return hb;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("A's session never expired");
    assert!(reparented.parents.iter().all(|p| p.peer.is_none()));
    assert!(reparented.neighbours.is_empty(), "{reparented:?}");
    assert!(!heartbeat(&h, &a.session_id, [0; 3]).await.active);
    let b_now = get(&h, &g.id).await;
    assert_eq!(b_now.peers, 1);
    let err = h
        .viewer()
        .reparent(ReparentRequest {
            session_id: a.session_id.clone(),
            substream: 0,
            exclude_peer_ids: vec![],
            unreachable_peer_ids: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.shutdown().await;
}

async fn grid_reparent_excludes_the_given_peer(store: Store) {
    let h = Harness::start(store).await;
    let g = live_grid(&h, 4, 1000).await;
    let a = join_peer(&h, &g.id, "10.0.0.1:7001", 2000).await;
    let f = join_peer(&h, &g.id, "10.0.0.2:7001", 2000).await;
    let b = join_peer(&h, &g.id, "", 0).await;
    let hb = heartbeat(&h, &b.session_id, [0; 3]).await;
    let old = hb.parents[2].peer.as_ref().expect("peer-fed").peer_id;
    let other = if old == a.peer_id { &f } else { &a };
    let got = h
        .viewer()
        .reparent(ReparentRequest {
            session_id: b.session_id.clone(),
            substream: 2,
            exclude_peer_ids: vec![old],
            unreachable_peer_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .parent
        .unwrap();
    assert_eq!(got.substream, 2);
    let new = got.peer.expect("another relay has free slots");
    assert_ne!(new.peer_id, old);
    assert_eq!(new.peer_id, other.peer_id);
    assert!(new.addr.starts_with("10.0.0."), "{new:?}");
    let hb = heartbeat(&h, &b.session_id, [0; 3]).await;
    assert_eq!(hb.parents[2].peer.as_ref().unwrap().peer_id, other.peer_id);

    // Excluding every relay leaves the data plane.
    let got = h
        .viewer()
        .reparent(ReparentRequest {
            session_id: b.session_id.clone(),
            substream: 2,
            exclude_peer_ids: vec![a.peer_id, f.peer_id],
            unreachable_peer_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .parent
        .unwrap();
    assert!(got.peer.is_none(), "{got:?}");

    for (req, code, needle) in [
        (
            ReparentRequest {
                session_id: b.session_id.clone(),
                substream: 4,
                exclude_peer_ids: vec![],
                unreachable_peer_ids: vec![],
            },
            Code::InvalidArgument,
            "substream 4 out of range",
        ),
        (
            ReparentRequest {
                session_id: b.session_id.clone(),
                substream: u32::MAX,
                exclude_peer_ids: vec![],
                unreachable_peer_ids: vec![],
            },
            Code::InvalidArgument,
            "out of range",
        ),
        (
            ReparentRequest {
                session_id: b.session_id.clone(),
                substream: 0,
                exclude_peer_ids: vec![1; 65],
                unreachable_peer_ids: vec![],
            },
            Code::InvalidArgument,
            "exclude_peer_ids",
        ),
        (
            ReparentRequest {
                session_id: b.session_id.clone(),
                substream: 0,
                exclude_peer_ids: vec![],
                unreachable_peer_ids: vec![1; 65],
            },
            Code::InvalidArgument,
            "unreachable_peer_ids",
        ),
        (
            ReparentRequest {
                session_id: "s-ghost".into(),
                substream: 0,
                exclude_peer_ids: vec![],
                unreachable_peer_ids: vec![],
            },
            Code::NotFound,
            "s-ghost",
        ),
        (
            ReparentRequest::default(),
            Code::InvalidArgument,
            "session_id",
        ),
    ] {
        let err = h.viewer().reparent(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "{needle}: {err:?}");
    }
    h.shutdown().await;
}

async fn grid_peer_share_from_heartbeats_and_stop_drops_the_grid(store: Store) {
    let h = Harness::start(store).await;
    let g = live_grid(&h, 8, 2000).await;
    let a = join_peer(&h, &g.id, "10.0.0.1:7001", 2000).await;
    assert_eq!(a.stream_kbps, 2000);
    assert_eq!(a.child_slots, 8);
    assert_one_per_substream(&a.parents, 8);
    let b = join_peer(&h, &g.id, "10.0.0.2:7001", 0).await;
    assert_eq!(
        get(&h, &g.id).await.peer_share,
        0.0,
        "nothing delivered yet"
    );
    heartbeat(&h, &a.session_id, [1000, 0, 3000]).await;
    heartbeat(&h, &b.session_id, [0, 3000, 0]).await;
    assert!((get(&h, &g.id).await.peer_share - 0.75).abs() < 1e-9);
    // Counters are cumulative: repeating them adds nothing.
    heartbeat(&h, &b.session_id, [0, 3000, 0]).await;
    assert!((get(&h, &g.id).await.peer_share - 0.75).abs() < 1e-9);
    heartbeat(&h, &b.session_id, [0, 5000, 0]).await;
    let share = get(&h, &g.id).await.peer_share;
    assert!((share - 5000.0 / 6000.0).abs() < 1e-9, "{share}");

    let stopped = h
        .admin()
        .stop_broadcast(BroadcastRef { id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.peers, 0);
    assert_eq!(stopped.demand_slots, 0);
    assert_eq!(stopped.peer_share, 0.0);
    assert!(!heartbeat(&h, &b.session_id, [0; 3]).await.active);
    let err = h
        .viewer()
        .reparent(ReparentRequest {
            session_id: b.session_id.clone(),
            substream: 0,
            exclude_peer_ids: vec![],
            unreachable_peer_ids: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.shutdown().await;
}

on_both_backends!(
    admin_lifecycle,
    admin_errors,
    join_errors,
    node_ingests_viewers_join_and_stop,
    desired_state_is_replayed_when_a_node_arrives,
    stray_ingest_gets_a_stop,
    silent_node_is_declared_dead_and_its_broadcast_moves,
    last_node_dies_broadcast_waits_unassigned,
    health_and_reflection,
    grid_join_assigns_parents_neighbours_and_booster,
    grid_leave_of_a_parent_reparents_its_children,
    grid_missed_heartbeats_expire_a_session_and_reparent_its_children,
    grid_reparent_excludes_the_given_peer,
    grid_peer_share_from_heartbeats_and_stop_drops_the_grid,
);
