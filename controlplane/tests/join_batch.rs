//! Cheap joins over real gRPC, on SQLite and (with `DATABASE_URL`) Postgres: the group
//! commit of session rows (every answered join has its row; a failed batch fails its
//! joins and leaves no grid state), the flash-crowd bound (RESOURCE_EXHAUSTED with a
//! `grpc-retry-pushback-ms` trailer) and the join cache (a stop refuses joins at once).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use starling_controlplane::limits::{LimitsConfig, RateLimit};
use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, CommandsRequest, CreateBroadcastRequest, JoinRequest, NodeCommand,
    RegisterNodeRequest,
};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const ADMIN_KEY: &str = "join-batch-test-admin-key-0123456789";
/// Hang guard for things that should happen (not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(30);

struct Harness {
    cp: ControlPlaneHandle,
    channel: Channel,
    /// The fake node's command stream (kept open: the node stays attached).
    _commands: tonic::Streaming<NodeCommand>,
    broadcast: String,
}

impl Harness {
    /// A control plane with one registered node and one LIVE public broadcast; joins
    /// unlimited per address, at most `joins_in_flight` at once; the join cache never
    /// expires (so only this process's invalidation can make it see a change).
    async fn start(store: Store, joins_in_flight: usize) -> Harness {
        let service = ServiceConfig {
            heartbeat_interval: Duration::from_millis(100),
            node_timeout: Duration::from_secs(600),
            liveness_tick: Duration::from_millis(50),
            missed_heartbeats: 6000,
            limits: LimitsConfig {
                join: RateLimit::per_second(0.0, 1),
                joins_in_flight,
                ..LimitsConfig::default()
            },
            trust: starling_controlplane::trust::TrustConfig {
                peer_addr_check: starling_controlplane::trust::PeerAddrCheck::Off,
                ..Default::default()
            },
            join_cache_ttl: Duration::from_secs(3600),
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
            channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        );
        let reg = edge
            .register(RegisterNodeRequest {
                node_name: "n1".into(),
                wire_addr: "n1.test:9000".into(),
                http_addr: "n1.test:9080".into(),
                cores: 2,
                capacity_viewers: 100_000,
                chunk_signing_key: None,
            })
            .await
            .unwrap()
            .into_inner();
        let commands = edge
            .commands(CommandsRequest {
                node_id: reg.node_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut h = Harness {
            cp,
            channel,
            _commands: commands,
            broadcast: String::new(),
        };
        let mut admin = h.admin();
        let id = admin
            .create_broadcast(CreateBroadcastRequest {
                name: "crowd".into(),
                source_url: "http://127.0.0.1:8000/live.ts".into(),
                chunk_duration_ms: 0,
                substreams: 4,
                public: true,
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        let live = admin
            .start_broadcast(BroadcastRef { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(live.node_id, reg.node_id, "the node ingests it");
        h.broadcast = id;
        h
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

    fn join_req(&self, i: usize) -> JoinRequest {
        JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: self.broadcast.clone(),
            client_version: "join-batch-test".into(),
            peer_addr: format!("10.0.{}.{}:7000", i / 200, i % 200 + 1),
            upload_kbps: 4000,
            ..Default::default()
        }
    }

    /// Peers in the broadcast's grid (admin view).
    async fn peers(&self) -> u32 {
        self.admin()
            .get_broadcast(BroadcastRef {
                id: self.broadcast.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .peers
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.cp.shutdown().await.unwrap();
    }
}

/// Runs `sql` (one statement, no result rows) on the store's own pool.
async fn exec(store: &Store, sql: &'static str) {
    match store {
        Store::Postgres(pool) => {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
        Store::Sqlite(pool) => {
            sqlx::query(sql).execute(pool).await.unwrap();
        }
    }
}

async fn concurrent_joins_are_all_answered_and_stored(store: Store) {
    const JOINS: usize = 300;
    const CALLERS: usize = 32;
    let h = Harness::start(store.clone(), 4096).await;
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let reqs: Vec<JoinRequest> = (c..JOINS).step_by(CALLERS).map(|i| h.join_req(i)).collect();
        let mut viewer = h.viewer();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for r in reqs {
                ids.push(viewer.join(r).await.unwrap().into_inner().session_id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap());
    }
    assert_eq!(ids.len(), JOINS);
    for id in &ids {
        let row = store.get_session(id).await.unwrap();
        let row = row.unwrap_or_else(|| panic!("session {id} answered but not stored"));
        assert_eq!(row.broadcast_id, h.broadcast);
        assert_eq!(row.left_at_ms, None);
    }
    assert_eq!(
        store.count_active_sessions(&h.broadcast).await.unwrap(),
        JOINS as u64
    );
    assert_eq!(h.peers().await, JOINS as u32);
    h.shutdown().await;
}

async fn a_failed_batch_fails_its_joins_and_leaves_no_grid_state(store: Store) {
    let h = Harness::start(store.clone(), 4096).await;
    let mut viewer = h.viewer();
    viewer.join(h.join_req(0)).await.unwrap();
    assert_eq!(h.peers().await, 1);
    // Every session insert now fails (inside the batch's transaction).
    match &store {
        Store::Sqlite(_) => {
            exec(
                &store,
                "CREATE TRIGGER refuse_sessions BEFORE INSERT ON sessions \
                 BEGIN SELECT RAISE(ABORT, 'test: sessions refused'); END",
            )
            .await;
        }
        Store::Postgres(_) => {
            exec(
                &store,
                "CREATE FUNCTION refuse_sessions() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'test: sessions refused'; END $$",
            )
            .await;
            exec(
                &store,
                "CREATE TRIGGER refuse_sessions BEFORE INSERT ON sessions \
                 FOR EACH ROW EXECUTE FUNCTION refuse_sessions()",
            )
            .await;
        }
    }
    let mut tasks = Vec::new();
    for i in 1..=40 {
        let mut viewer = h.viewer();
        let req = h.join_req(i);
        tasks.push(tokio::spawn(async move { viewer.join(req).await }));
    }
    for t in tasks {
        let err = tokio::time::timeout(PATIENCE, t)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
    }
    assert_eq!(h.peers().await, 1, "failed joins left the grid");
    assert_eq!(store.count_active_sessions(&h.broadcast).await.unwrap(), 1);
    // `DROP TRIGGER` names the table on Postgres only.
    match &store {
        Store::Sqlite(_) => exec(&store, "DROP TRIGGER refuse_sessions").await,
        Store::Postgres(_) => exec(&store, "DROP TRIGGER refuse_sessions ON sessions").await,
    }
    viewer.join(h.join_req(99)).await.unwrap();
    assert_eq!(h.peers().await, 2);
    h.shutdown().await;
}

async fn a_flash_crowd_gets_resource_exhausted_with_a_retry_delay(store: Store) {
    const BOUND: usize = 2;
    let h = Harness::start(store.clone(), BOUND).await;
    // Warm the join cache so that held joins wait on the session write only.
    h.viewer().join(h.join_req(0)).await.unwrap();
    // Hold the sessions table: the writer's next insert waits for this transaction.
    let held = Hold::take(&store).await;
    let mut blocked = Vec::new();
    let mut refused = None;
    for i in 1..=10 {
        let mut viewer = h.viewer();
        let req = h.join_req(i);
        let mut task = tokio::spawn(async move { viewer.join(req).await });
        // Whether this join was answered at once (refused) or is held: the wait only
        // decides when to send the next one; at most BOUND joins can be held.
        match tokio::time::timeout(Duration::from_millis(300), &mut task).await {
            Ok(result) => {
                refused = Some(result.unwrap().unwrap_err());
                break;
            }
            Err(_) => blocked.push(task),
        }
    }
    let err = refused.expect("no join was refused beyond the bound");
    assert!(blocked.len() <= BOUND, "{} joins held", blocked.len());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let pushback: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a retry pushback trailer")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0);
    held.release().await;
    // The held joins complete once the table is free, and a new one is admitted.
    for t in blocked {
        tokio::time::timeout(PATIENCE, t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    h.viewer().join(h.join_req(50)).await.unwrap();
    h.shutdown().await;
}

/// A transaction holding the write lock of the sessions table.
enum Hold {
    Pg(sqlx::Transaction<'static, sqlx::Postgres>),
    Lite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Hold {
    async fn take(store: &Store) -> Hold {
        match store {
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("LOCK TABLE sessions IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Hold::Pg(tx)
            }
            Store::Sqlite(pool) => {
                let mut tx = pool.begin().await.unwrap();
                // A write statement takes SQLite's single write lock until commit.
                sqlx::query("UPDATE sessions SET last_seen_ms = last_seen_ms WHERE id = ''")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Hold::Lite(tx)
            }
        }
    }

    async fn release(self) {
        match self {
            Hold::Pg(tx) => tx.rollback().await.unwrap(),
            Hold::Lite(tx) => tx.rollback().await.unwrap(),
        }
    }
}

async fn a_stopped_broadcast_refuses_joins_at_once(store: Store) {
    let h = Harness::start(store, 4096).await;
    let mut viewer = h.viewer();
    // Cached as LIVE (the cache never expires in this harness).
    viewer.join(h.join_req(0)).await.unwrap();
    h.admin()
        .stop_broadcast(BroadcastRef {
            id: h.broadcast.clone(),
        })
        .await
        .unwrap();
    let err = viewer.join(h.join_req(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("stopped"), "{err:?}");
    // And started again: joins are accepted at once.
    h.admin()
        .start_broadcast(BroadcastRef {
            id: h.broadcast.clone(),
        })
        .await
        .unwrap();
    viewer.join(h.join_req(2)).await.unwrap();
    h.shutdown().await;
}

/// `Store::create_sessions` directly: a batch larger than SQLite's rows per statement
/// lands whole, and a batch with one bad row (a duplicate id) lands not at all.
async fn create_sessions_is_one_all_or_nothing_transaction(store: Store) {
    use starling_controlplane::store::{NewBroadcast, NewSession};
    store
        .create_broadcast(
            &NewBroadcast {
                id: "b1".into(),
                name: "b".into(),
                source_url: "http://127.0.0.1:1/x.ts".into(),
                chunk_duration_ms: 1000,
                substreams: 4,
                public: true,
            },
            1,
        )
        .await
        .unwrap();
    let row = |i: usize| {
        (
            NewSession {
                id: format!("s{i}"),
                broadcast_id: "b1".into(),
                client_version: "v".into(),
                node_id: i.is_multiple_of(2).then(|| "n".to_string()),
            },
            1_000 + i as i64,
        )
    };
    let rows: Vec<_> = (0..450).map(row).collect();
    store.create_sessions(&rows).await.unwrap();
    assert_eq!(store.count_active_sessions("b1").await.unwrap(), 450);
    let s = store.get_session("s449").await.unwrap().unwrap();
    assert_eq!((s.joined_at_ms, s.last_seen_ms), (1_449, 1_449));
    assert_eq!(s.node_id, None);
    assert_eq!(
        store
            .get_session("s0")
            .await
            .unwrap()
            .unwrap()
            .node_id
            .as_deref(),
        Some("n")
    );
    // s449 exists: the whole batch (its other 299 rows new) is refused.
    let bad: Vec<_> = (449..749).map(row).collect();
    assert!(store.create_sessions(&bad).await.is_err());
    assert_eq!(store.count_active_sessions("b1").await.unwrap(), 450);
    assert!(store.create_sessions(&[]).await.is_ok());
}

on_both_backends!(
    create_sessions_is_one_all_or_nothing_transaction,
    concurrent_joins_are_all_answered_and_stored,
    a_failed_batch_fails_its_joins_and_leaves_no_grid_state,
    a_flash_crowd_gets_resource_exhausted_with_a_retry_delay,
    a_stopped_broadcast_refuses_joins_at_once,
);
