//! Per-node credentials and the scope of a node's chunk key (issue 18, part 4), over
//! real gRPC on loopback (SQLite and, with `DATABASE_URL`, Postgres):
//!
//! * `starling-admin node add` (AdminService.AddNodeCredential) makes a credential a
//!   node registers with, under its own name only; a wrong secret, another node's name
//!   or another node's id is refused; a revoked credential cannot register or report,
//!   and its node is declared dead at once; the shared node key cannot take a name
//!   that has a credential.
//! * A node's chunk key is trusted only for the broadcasts assigned to it: a second
//!   node with a valid credential, not assigned to broadcast B, is not in B's key sets
//!   (Join, Heartbeat, session stream), so B's viewers refuse what it signs; runs are
//!   counted per start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::integrity::{ChunkMeta, ChunkSigner, ChunkVerifier, IntegrityError};
use starling_proto::token::generate_pkcs8;
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    AddNodeCredentialRequest, BroadcastRef, CommandsRequest, CreateBroadcastRequest, HealthReport,
    HeartbeatRequest, JoinRequest, ListNodeCredentialsRequest, PublicKey, RegisterNodeRequest,
    RevokeNodeCredentialRequest, SessionUp, node_command::Command,
};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ADMIN_KEY: &str = "node-cred-test-admin-key-0123456789";
const NODE_KEY: &str = "node-cred-test-node-key-9876543210";
const GUARD: Duration = Duration::from_secs(30);

type Edge = EdgeServiceClient<InterceptedService<Channel, BearerInterceptor>>;
type Admin = AdminServiceClient<InterceptedService<Channel, BearerInterceptor>>;

struct Harness {
    cp: ControlPlaneHandle,
    channel: Channel,
}

impl Harness {
    async fn start(store: Store) -> Harness {
        let service = ServiceConfig {
            heartbeat_interval: Duration::from_millis(100),
            node_timeout: Duration::from_secs(600),
            liveness_tick: Duration::from_millis(50),
            missed_heartbeats: 6000,
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

    fn edge_with(&self, token: &str) -> Edge {
        EdgeServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(token).unwrap(),
        )
    }

    fn admin(&self) -> Admin {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    async fn add(&self, name: &str) -> String {
        let r = self
            .admin()
            .add_node_credential(AddNodeCredentialRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.name, name);
        assert!(r.credential.starts_with(&format!("stn1.{name}.")), "{r:?}");
        r.credential
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.cp.shutdown().await.unwrap();
    }
}

fn registration(name: &str, key: &ChunkSigner) -> RegisterNodeRequest {
    RegisterNodeRequest {
        node_name: name.into(),
        wire_addr: format!("{name}.test:9000"),
        http_addr: format!("{name}.test:9080"),
        cores: 1,
        capacity_viewers: 100,
        chunk_signing_key: Some(PublicKey {
            key_id: key.key_id(),
            ed25519: key.public_key().to_vec(),
        }),
    }
}

fn signer(key_id: u32) -> ChunkSigner {
    ChunkSigner::new(key_id, &generate_pkcs8().unwrap()).unwrap()
}

async fn node_credentials_bind_a_node_and_can_be_revoked(store: Store) {
    let h = Harness::start(store).await;
    let cred_a = h.add("edge-a").await;
    let cred_b = h.add("edge-b").await;
    // A name is taken once; a bad name is refused.
    let e = h
        .admin()
        .add_node_credential(AddNodeCredentialRequest {
            name: "edge-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = h
        .admin()
        .add_node_credential(AddNodeCredentialRequest {
            name: "bad name".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Only admins make credentials.
    let e = AdminServiceClient::with_interceptor(
        h.channel.clone(),
        BearerInterceptor::new(&cred_a).unwrap(),
    )
    .add_node_credential(AddNodeCredentialRequest { name: "x".into() })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let (ka, kb) = (signer(1), signer(2));
    let mut a = h.edge_with(&cred_a);
    // Its own name (or none: the credential's), never another's.
    let e = a.register(registration("edge-b", &ka)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut unnamed = registration("", &ka);
    unnamed.node_name.clear();
    let reg_a = a.register(unnamed).await.unwrap().into_inner();
    // A wrong secret under a real name is refused, without echoing it.
    let forged = format!("stn1.edge-a.{}", "A".repeat(43));
    let e = h
        .edge_with(&forged)
        .register(registration("edge-a", &ka))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(!e.message().contains(&forged), "{e:?}");
    // The shared node key cannot take a name that has a credential.
    let e = h
        .edge_with(NODE_KEY)
        .register(registration("edge-a", &ka))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let mut b = h.edge_with(&cred_b);
    let reg_b = b
        .register(registration("edge-b", &kb))
        .await
        .unwrap()
        .into_inner();
    // B cannot act for A's registration.
    let e = b
        .commands(CommandsRequest {
            node_id: reg_a.node_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = b
        .report_health(HealthReport {
            node_id: reg_a.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Its own: fine.
    let mut b_stream = b
        .commands(CommandsRequest {
            node_id: reg_b.node_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let ack = b
        .report_health(HealthReport {
            node_id: reg_b.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.known);

    // Revoked: refused at once, its node is dead (its command stream ends).
    let r = h
        .admin()
        .revoke_node_credential(RevokeNodeCredentialRequest {
            name: "edge-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.revoked);
    let again = h
        .admin()
        .revoke_node_credential(RevokeNodeCredentialRequest {
            name: "edge-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.revoked);
    let e = b.register(registration("edge-b", &kb)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = b
        .report_health(HealthReport {
            node_id: reg_b.node_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    tokio::time::timeout(GUARD, async {
        // The replayed commands, then the end of the stream.
        while let Ok(Some(_)) = b_stream.message().await {}
    })
    .await
    .expect("the revoked node's command stream ends");
    // A still works; the list shows both, never a secret.
    a.report_health(HealthReport {
        node_id: reg_a.node_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let list = h
        .admin()
        .list_node_credentials(ListNodeCredentialsRequest {})
        .await
        .unwrap()
        .into_inner()
        .credentials;
    let names: Vec<(&str, bool)> = list
        .iter()
        .map(|c| (c.name.as_str(), c.revoked_at_unix_ms != 0))
        .collect();
    assert_eq!(names, vec![("edge-a", false), ("edge-b", true)]);
    assert!(!format!("{list:?}").contains(&cred_a[12..]));
    h.shutdown().await;
}

/// Chunk `seq` of `broadcast`, run `run`, signed by `key`, checked as a viewer does
/// with the keys and run its control plane gave it.
fn check(
    keys: &[PublicKey],
    run: u64,
    broadcast: &str,
    key: &ChunkSigner,
    signed_run: u64,
) -> Result<(), IntegrityError> {
    let mut v = ChunkVerifier::new(broadcast).with_run(Some(run));
    for k in keys {
        v.add_key(k.key_id, &k.ed25519).unwrap();
    }
    let meta = ChunkMeta {
        seq: 3,
        flags: 0,
        timestamp_ms: 1,
        duration_ms: 100,
    };
    let block = key
        .sign_in_run(broadcast, signed_run, &meta, b"data")
        .unwrap();
    v.verify(&meta, b"data", &block, 1)
}

async fn an_unassigned_nodes_key_is_not_trusted(store: Store) {
    let h = Harness::start(store).await;
    let (cred_a, cred_b) = (h.add("edge-a").await, h.add("edge-b").await);
    let (ka, kb) = (signer(1), signer(2));
    let mut a = h.edge_with(&cred_a);
    let reg_a = a
        .register(registration("edge-a", &ka))
        .await
        .unwrap()
        .into_inner();
    let mut a_stream = a
        .commands(CommandsRequest {
            node_id: reg_a.node_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut admin = h.admin();
    let id = admin
        .create_broadcast(CreateBroadcastRequest {
            name: "scoped".into(),
            source_url: "http://127.0.0.1:8000/live.ts".into(),
            public: true,
            ..Default::default()
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
    assert_eq!(started.node_id, reg_a.node_id);
    assert_eq!(started.run_epoch, 1);
    // The node is told the run with the ingest.
    let ingest = tokio::time::timeout(GUARD, async {
        loop {
            if let Some(Command::Ingest(i)) = a_stream.message().await.unwrap().unwrap().command {
                return i;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        (ingest.broadcast_id.as_str(), ingest.run_epoch),
        (id.as_str(), 1)
    );

    // A second node with a valid credential registers, not assigned to the broadcast.
    let mut b = h.edge_with(&cred_b);
    let reg_b = b
        .register(registration("edge-b", &kb))
        .await
        .unwrap()
        .into_inner();
    let _b_stream = b
        .commands(CommandsRequest {
            node_id: reg_b.node_id.clone(),
        })
        .await
        .unwrap();

    let mut viewer = ViewerServiceClient::new(h.channel.clone());
    let joined = viewer
        .join(JoinRequest {
            broadcast_id: id.clone(),
            holder_key: vec![7; 32],
            client_version: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.run_epoch, 1);
    assert!(joined.server_time_unix_ms > 0);
    let ids: Vec<u32> = joined.chunk_keys.iter().map(|k| k.key_id).collect();
    assert_eq!(ids, vec![1], "only the assigned node's key");
    // What a viewer of the broadcast concludes: A's chunks pass, B's are refused.
    check(&joined.chunk_keys, joined.run_epoch, &id, &ka, 1).unwrap();
    assert_eq!(
        check(&joined.chunk_keys, joined.run_epoch, &id, &kb, 1),
        Err(IntegrityError::UnknownKeyId(2))
    );
    // Nor does a heartbeat or the session stream (the key-refresh paths) give it.
    let hb = viewer
        .heartbeat(HeartbeatRequest {
            session_id: joined.session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(hb.active);
    assert_eq!(hb.run_epoch, 1);
    assert_eq!(
        hb.chunk_keys.iter().map(|k| k.key_id).collect::<Vec<_>>(),
        vec![1]
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SessionUp {
        session_id: joined.session_id.clone(),
        refresh_keys: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut down = viewer
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(GUARD, down.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.active);
    assert_eq!(first.run_epoch, 1);
    assert!(first.server_time_unix_ms > 0);
    assert_eq!(
        first
            .chunk_keys
            .iter()
            .map(|k| k.key_id)
            .collect::<Vec<_>>(),
        vec![1]
    );
    drop(tx);

    // Restarted: run 2. Run-1 chunks (same node, same key) are refused by the new run.
    admin
        .stop_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap();
    let restarted = admin
        .start_broadcast(BroadcastRef { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restarted.run_epoch, 2);
    let rejoined = viewer
        .join(JoinRequest {
            broadcast_id: id.clone(),
            holder_key: vec![7; 32],
            client_version: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejoined.run_epoch, 2);
    let node = if restarted.node_id == reg_a.node_id {
        &ka
    } else {
        &kb
    };
    check(&rejoined.chunk_keys, 2, &id, node, 2).unwrap();
    assert_eq!(
        check(&rejoined.chunk_keys, 2, &id, node, 1),
        Err(IntegrityError::WrongRun {
            signed: 1,
            current: 2
        })
    );
    assert_eq!(rejoined.chunk_keys.len(), 1, "{:?}", rejoined.chunk_keys);
    h.shutdown().await;
}

on_both_backends!(
    node_credentials_bind_a_node_and_can_be_revoked,
    an_unassigned_nodes_key_is_not_trusted
);
