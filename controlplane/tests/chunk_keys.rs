//! The chunk keys viewers get, with more alive nodes than a verifier holds
//! (`integrity::MAX_KEYS`): the broadcast's ingesting node's key must come first at
//! `Join` and in every `Heartbeat`, or a viewer's capped key set could leave it out and
//! refuse every chunk of its own broadcast. Over real gRPC on loopback (SQLite and,
//! with `DATABASE_URL`, Postgres); no wall-clock assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use starling_controlplane::{AuthConfig, BearerInterceptor, ControlPlane, ServiceConfig, Store};
use starling_proto::integrity::MAX_KEYS;
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, CommandsRequest, CreateBroadcastRequest, HealthReport, HeartbeatRequest,
    JoinRequest, PublicKey, RegisterNodeRequest,
};
use tonic::transport::Channel;

const ADMIN_KEY: &str = "chunk-keys-test-admin-key-0123456789";
/// One more alive node than a verifier holds keys, and a few more.
const NODES: u32 = MAX_KEYS as u32 + 4;

fn key(key_id: u32) -> PublicKey {
    PublicKey {
        key_id,
        ed25519: vec![u8::try_from(key_id % 251).unwrap(); 32],
    }
}

async fn ingesting_node_key_is_always_in_the_viewers_key_set(store: Store) {
    let service = ServiceConfig {
        heartbeat_interval: Duration::from_millis(100),
        node_timeout: Duration::from_secs(600),
        liveness_tick: Duration::from_millis(50),
        missed_heartbeats: 6000,
        ..ServiceConfig::default()
    };
    let auth = AuthConfig {
        admin_key: Some(ADMIN_KEY.into()),
        ..AuthConfig::default()
    };
    let cp = ControlPlane::bind_with_store("127.0.0.1:0".parse().unwrap(), store, service, &auth)
        .await
        .unwrap()
        .spawn();
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = || BearerInterceptor::new(ADMIN_KEY).unwrap();
    let mut edge = EdgeServiceClient::with_interceptor(channel.clone(), bearer());
    let mut admin = AdminServiceClient::with_interceptor(channel.clone(), bearer());
    let mut viewer = ViewerServiceClient::new(channel.clone());

    // NODES nodes, registered one after the other (the alive list is in registration
    // order); all but the last are busy, so the broadcast goes to the last one, whose
    // key is beyond the first MAX_KEYS of that list.
    let mut streams = Vec::new();
    let mut ids = Vec::new();
    for i in 1..=NODES {
        let reg = edge
            .register(RegisterNodeRequest {
                node_name: format!("edge{i}"),
                wire_addr: format!("edge{i}.test:9000"),
                http_addr: format!("edge{i}.test:9080"),
                cores: 1,
                capacity_viewers: 1000,
                chunk_signing_key: Some(key(i)),
            })
            .await
            .unwrap()
            .into_inner();
        streams.push(
            edge.commands(CommandsRequest {
                node_id: reg.node_id.clone(),
            })
            .await
            .unwrap()
            .into_inner(),
        );
        let viewers = if i == NODES { 0 } else { 100 };
        edge.report_health(HealthReport {
            node_id: reg.node_id.clone(),
            ingests: vec![],
            viewers,
        })
        .await
        .unwrap();
        ids.push(reg.node_id);
        // Distinct registration times, so the list order is the registration order.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let ingest_id = ids.last().unwrap().clone();
    let ingest_key = key(NODES);

    let b = admin
        .create_broadcast(CreateBroadcastRequest {
            name: "many-nodes".into(),
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
        .start_broadcast(BroadcastRef { id: b.clone() })
        .await
        .unwrap();
    let assigned = admin
        .get_broadcast(BroadcastRef { id: b.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        assigned.node_id, ingest_id,
        "the least-loaded (last registered) node ingests"
    );

    let j = viewer
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: b.clone(),
            credential: String::new(),
            client_version: "chunk-keys-test".into(),
            peer_addr: String::new(),
            upload_kbps: 0,
            mac_tickets: false,
            host_addr: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(j.chunk_keys.len() <= MAX_KEYS, "{}", j.chunk_keys.len());
    assert_eq!(
        j.chunk_keys.first(),
        Some(&ingest_key),
        "Join: ingesting node first"
    );

    // Before the fix, heartbeats listed the first MAX_KEYS alive nodes' keys in
    // registration order: the ingesting node's was not among them.
    for _ in 0..3 {
        let hb = viewer
            .heartbeat(HeartbeatRequest {
                session_id: j.session_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(hb.active);
        assert!(hb.chunk_keys.len() <= MAX_KEYS, "{}", hb.chunk_keys.len());
        assert_eq!(
            hb.chunk_keys.first(),
            Some(&ingest_key),
            "Heartbeat: ingesting node first, got key ids {:?}",
            hb.chunk_keys.iter().map(|k| k.key_id).collect::<Vec<_>>()
        );
    }
    drop(streams);
    drop(channel);
    cp.shutdown().await.unwrap();
}

on_both_backends!(ingesting_node_key_is_always_in_the_viewers_key_set);
