//! Storage conformance: the same test functions run against SQLite (temp dir) and
//! Postgres (fresh database on `DATABASE_URL`; see `common::postgres` for skipping).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use starling_controlplane::store::{
    IngestReport, NewBroadcast, NewNode, NewSession, NodeKey, Store, StoreError,
};
use starling_proto::v1::{BroadcastState, SourceHealth};

fn new_broadcast(id: &str) -> NewBroadcast {
    NewBroadcast {
        id: id.into(),
        name: format!("name of {id}"),
        source_url: "http://127.0.0.1:8000/live".into(),
        chunk_duration_ms: 1000,
        substreams: 4,
        public: false,
    }
}

fn new_node(id: &str) -> NewNode {
    NewNode {
        id: id.into(),
        name: format!("node {id}"),
        wire_addr: "127.0.0.1:9000".into(),
        http_addr: "127.0.0.1:9080".into(),
        cores: 2,
        capacity_viewers: 10_000,
        chunk_key: None,
    }
}

async fn migrations_are_idempotent(store: Store) {
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
}

async fn broadcast_create_get_list(store: Store) {
    let a = store
        .create_broadcast(&new_broadcast("a"), 1_000)
        .await
        .unwrap();
    assert_eq!(a.id, "a");
    assert_eq!(a.name, "name of a");
    assert_eq!(a.state, BroadcastState::Created);
    assert_eq!(a.source_health, SourceHealth::Unknown);
    assert_eq!(a.node_id, None);
    assert_eq!(a.last_seq, 0);
    assert_eq!(a.created_at_ms, 1_000);
    assert_eq!(a.updated_at_ms, 1_000);
    store
        .create_broadcast(&new_broadcast("b"), 2_000)
        .await
        .unwrap();

    assert_eq!(store.get_broadcast("a").await.unwrap(), Some(a.clone()));
    assert_eq!(store.get_broadcast("nope").await.unwrap(), None);

    let ids: Vec<String> = store
        .list_broadcasts(false)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(ids, vec!["a", "b"]);

    match store.create_broadcast(&new_broadcast("a"), 3_000).await {
        Err(StoreError::AlreadyExists { what, id }) => {
            assert_eq!(what, "broadcast");
            assert_eq!(id, "a");
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
}

async fn broadcast_state_and_assignment(store: Store) {
    store
        .create_broadcast(&new_broadcast("a"), 1_000)
        .await
        .unwrap();
    store
        .create_broadcast(&new_broadcast("b"), 1_001)
        .await
        .unwrap();
    store.register_node(&new_node("n1"), 1_000).await.unwrap();

    let live = store
        .set_broadcast_state("a", BroadcastState::Live, 2_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(live.state, BroadcastState::Live);
    assert_eq!(live.updated_at_ms, 2_000);
    assert_eq!(
        store
            .set_broadcast_state("zz", BroadcastState::Live, 2_000)
            .await
            .unwrap(),
        None
    );

    let assigned = store
        .set_broadcast_node("a", Some("n1"), 2_500)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(assigned.node_id.as_deref(), Some("n1"));

    let in_live: Vec<String> = store
        .list_broadcasts_in_state(BroadcastState::Live)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(in_live, vec!["a"]);

    // Leaving LIVE clears the assignment and ingest-reported fields.
    let reported = IngestReport {
        broadcast_id: "a".into(),
        health: SourceHealth::Up,
        error: String::new(),
        last_seq: 7,
        content_type: "video/mp2t".into(),
        viewers: 3,
    };
    assert!(
        store
            .record_ingest_health("n1", &reported, 2_600)
            .await
            .unwrap()
    );
    let stopped = store
        .set_broadcast_state("a", BroadcastState::Stopped, 3_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped.state, BroadcastState::Stopped);
    assert_eq!(stopped.node_id, None);
    assert_eq!(stopped.source_health, SourceHealth::Unknown);
    assert_eq!(stopped.viewers_now, 0);
    // The last sequence and content type are history, kept.
    assert_eq!(stopped.last_seq, 7);

    let not_stopped: Vec<String> = store
        .list_broadcasts(false)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(not_stopped, vec!["b"]);
    assert_eq!(store.list_broadcasts(true).await.unwrap().len(), 2);
}

async fn ingest_health_only_from_assigned_node(store: Store) {
    store
        .create_broadcast(&new_broadcast("a"), 1_000)
        .await
        .unwrap();
    store.register_node(&new_node("n1"), 1_000).await.unwrap();
    store.register_node(&new_node("n2"), 1_000).await.unwrap();
    let report = IngestReport {
        broadcast_id: "a".into(),
        health: SourceHealth::Down,
        error: "connection refused".into(),
        last_seq: u64::from(u32::MAX) + 5,
        content_type: "audio/mpeg".into(),
        viewers: 42,
    };
    // Not live yet: ignored.
    assert!(
        !store
            .record_ingest_health("n1", &report, 1_500)
            .await
            .unwrap()
    );
    store
        .set_broadcast_state("a", BroadcastState::Live, 2_000)
        .await
        .unwrap();
    store
        .set_broadcast_node("a", Some("n1"), 2_000)
        .await
        .unwrap();
    // From a node it is not assigned to: ignored.
    assert!(
        !store
            .record_ingest_health("n2", &report, 2_100)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .get_broadcast("a")
            .await
            .unwrap()
            .unwrap()
            .source_health,
        SourceHealth::Unknown
    );
    assert!(
        store
            .record_ingest_health("n1", &report, 2_200)
            .await
            .unwrap()
    );
    let b = store.get_broadcast("a").await.unwrap().unwrap();
    assert_eq!(b.source_health, SourceHealth::Down);
    assert_eq!(b.source_error, "connection refused");
    assert_eq!(b.last_seq, u64::from(u32::MAX) + 5);
    assert_eq!(b.content_type, "audio/mpeg");
    assert_eq!(b.viewers_now, 42);
    assert_eq!(b.updated_at_ms, 2_200);
    // Unknown broadcast: ignored, no error.
    let mut other = report.clone();
    other.broadcast_id = "ghost".into();
    assert!(
        !store
            .record_ingest_health("n1", &other, 2_300)
            .await
            .unwrap()
    );
    // Reassignment resets the reported health.
    let moved = store
        .set_broadcast_node("a", Some("n2"), 2_400)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(moved.source_health, SourceHealth::Unknown);
    assert_eq!(moved.source_error, "");
    let unassigned = store
        .set_broadcast_node("a", None, 2_500)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unassigned.node_id, None);
}

async fn nodes_register_touch_and_die(store: Store) {
    let n1 = store.register_node(&new_node("n1"), 1_000).await.unwrap();
    assert!(n1.alive);
    assert_eq!(n1.cores, 2);
    assert_eq!(n1.capacity_viewers, 10_000);
    assert_eq!(n1.last_seen_ms, 1_000);
    assert_eq!(n1.registered_at_ms, 1_000);
    store.register_node(&new_node("n2"), 1_001).await.unwrap();
    assert!(matches!(
        store.register_node(&new_node("n1"), 1_002).await,
        Err(StoreError::AlreadyExists { what: "node", .. })
    ));

    assert!(store.touch_node("n1", 17, 2_000).await.unwrap());
    let n1 = store.get_node("n1").await.unwrap().unwrap();
    assert_eq!(n1.last_seen_ms, 2_000);
    assert_eq!(n1.viewers, 17);
    assert!(!store.touch_node("ghost", 0, 2_000).await.unwrap());
    assert_eq!(store.get_node("ghost").await.unwrap(), None);

    let alive: Vec<String> = store
        .list_alive_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(alive, vec!["n1", "n2"]);

    assert!(store.mark_node_dead("n1").await.unwrap());
    assert!(
        !store.mark_node_dead("n1").await.unwrap(),
        "second call is a no-op"
    );
    assert!(!store.mark_node_dead("ghost").await.unwrap());
    assert!(
        !store.touch_node("n1", 1, 3_000).await.unwrap(),
        "dead nodes stay dead"
    );
    let n1 = store.get_node("n1").await.unwrap().unwrap();
    assert!(!n1.alive);
    let alive: Vec<String> = store
        .list_alive_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(alive, vec!["n2"]);
}

async fn sessions_lifecycle(store: Store) {
    store
        .create_broadcast(&new_broadcast("a"), 1_000)
        .await
        .unwrap();
    store
        .create_broadcast(&new_broadcast("b"), 1_000)
        .await
        .unwrap();
    let s1 = store
        .create_session(
            &NewSession {
                id: "s1".into(),
                broadcast_id: "a".into(),
                client_version: "starling-sdk/0.1.0".into(),
                node_id: Some("n1".into()),
            },
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(s1.joined_at_ms, 2_000);
    assert_eq!(s1.left_at_ms, None);
    assert_eq!(s1.client_version, "starling-sdk/0.1.0");
    for (id, b) in [("s2", "a"), ("s3", "b")] {
        store
            .create_session(
                &NewSession {
                    id: id.into(),
                    broadcast_id: b.into(),
                    client_version: String::new(),
                    node_id: None,
                },
                2_000,
            )
            .await
            .unwrap();
    }
    assert_eq!(store.count_active_sessions("a").await.unwrap(), 2);
    assert_eq!(store.count_active_sessions("b").await.unwrap(), 1);

    assert!(store.touch_session("s1", 2_500).await.unwrap());
    assert_eq!(
        store.get_session("s1").await.unwrap().unwrap().last_seen_ms,
        2_500
    );
    assert!(!store.touch_session("ghost", 2_500).await.unwrap());

    assert!(store.end_session("s1", 3_000).await.unwrap());
    assert!(
        !store.end_session("s1", 3_001).await.unwrap(),
        "already ended"
    );
    assert!(
        !store.touch_session("s1", 3_002).await.unwrap(),
        "ended sessions stay ended"
    );
    assert_eq!(
        store.get_session("s1").await.unwrap().unwrap().left_at_ms,
        Some(3_000)
    );
    assert_eq!(store.count_active_sessions("a").await.unwrap(), 1);

    // Batched heartbeats: ended (s1) and unknown sessions are skipped, and a time older
    // than the recorded one (s3: 1_500 < its join at 2_000) does not win.
    let batch = [
        ("s1".to_string(), 3_500),
        ("s2".to_string(), 3_600),
        ("s3".to_string(), 1_500),
        ("ghost".to_string(), 3_600),
    ];
    assert_eq!(store.touch_sessions(&batch).await.unwrap(), 1);
    for (id, want, why) in [
        ("s2", 3_600, "a batched heartbeat is recorded"),
        ("s3", 2_000, "an older heartbeat does not win"),
        ("s1", 2_500, "an ended session is not touched"),
    ] {
        let got = store.get_session(id).await.unwrap().unwrap().last_seen_ms;
        assert_eq!(got, want, "{why}");
    }
    assert_eq!(store.touch_sessions::<String>(&[]).await.unwrap(), 0);

    assert_eq!(store.end_broadcast_sessions("a", 4_000).await.unwrap(), 1);
    assert_eq!(store.count_active_sessions("a").await.unwrap(), 0);
    assert_eq!(store.count_active_sessions("b").await.unwrap(), 1);

    // A session must reference an existing broadcast.
    let orphan = store
        .create_session(
            &NewSession {
                id: "s4".into(),
                broadcast_id: "ghost".into(),
                client_version: String::new(),
                node_id: None,
            },
            5_000,
        )
        .await;
    assert!(matches!(orphan, Err(StoreError::Database(_))), "{orphan:?}");
    assert!(matches!(
        store
            .create_session(
                &NewSession {
                    id: "s2".into(),
                    broadcast_id: "a".into(),
                    client_version: String::new(),
                    node_id: None,
                },
                5_000
            )
            .await,
        Err(StoreError::AlreadyExists {
            what: "session",
            ..
        })
    ));
}

async fn public_flag_and_node_chunk_keys(store: Store) {
    let mut nb = new_broadcast("pub");
    nb.public = true;
    let b = store.create_broadcast(&nb, 1).await.unwrap();
    assert!(b.public);
    assert!(store.get_broadcast("pub").await.unwrap().unwrap().public);
    let p = store
        .create_broadcast(&new_broadcast("priv"), 1)
        .await
        .unwrap();
    assert!(!p.public);
    let mut n = new_node("keyed");
    n.chunk_key = Some(NodeKey {
        key_id: u32::MAX,
        ed25519: vec![7; 32],
    });
    let rec = store.register_node(&n, 5).await.unwrap();
    assert_eq!(rec.chunk_key, n.chunk_key);
    store.register_node(&new_node("plain"), 6).await.unwrap();
    let alive = store.list_alive_nodes().await.unwrap();
    assert_eq!(alive.len(), 2);
    assert_eq!(alive[0].chunk_key, n.chunk_key);
    assert_eq!(alive[1].chunk_key, None);
}

async fn token_keys_add_and_rotate(store: Store) {
    assert!(store.list_token_keys().await.unwrap().is_empty());
    assert_eq!(store.add_token_key(b"first", 10, 1_000).await.unwrap(), 1);
    let keys = store.list_token_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].pkcs8, b"first");
    assert_eq!(keys[0].created_at_ms, 10);
    assert_eq!(keys[0].retire_at_ms, None);
    // Rotation: the new key gets the next id, the old one a retire time.
    assert_eq!(store.add_token_key(b"second", 20, 2_000).await.unwrap(), 2);
    assert_eq!(store.add_token_key(b"third", 30, 3_000).await.unwrap(), 3);
    let keys = store.list_token_keys().await.unwrap();
    let summary: Vec<(u32, Option<i64>)> =
        keys.iter().map(|k| (k.key_id, k.retire_at_ms)).collect();
    // A key already retiring keeps its earlier time.
    assert_eq!(summary, vec![(1, Some(2_000)), (2, Some(3_000)), (3, None)]);
    assert_eq!(keys[2].pkcs8, b"third");
}

on_both_backends!(
    public_flag_and_node_chunk_keys,
    token_keys_add_and_rotate,
    migrations_are_idempotent,
    broadcast_create_get_list,
    broadcast_state_and_assignment,
    ingest_health_only_from_assigned_node,
    nodes_register_touch_and_die,
    sessions_lifecycle,
);

#[tokio::test]
async fn sqlite_creates_missing_dirs_and_uses_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("starling.db");
    let store =
        Store::connect(&starling_controlplane::DatabaseConfig::Sqlite { path: path.clone() })
            .await
            .unwrap();
    assert!(path.exists());
    let Store::Sqlite(pool) = &store else {
        panic!("expected sqlite")
    };
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(mode.to_lowercase(), "wal");
    store.close().await;
    // Reopening an existing database works (migrations already applied).
    let again = Store::connect(&starling_controlplane::DatabaseConfig::Sqlite { path })
        .await
        .unwrap();
    again.close().await;
}
