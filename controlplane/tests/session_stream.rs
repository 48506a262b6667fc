//! `ViewerService.Session` over real gRPC on loopback (SQLite and, with `DATABASE_URL`,
//! Postgres): the first message, pushes on grid changes, token renewal, revocation, key
//! rotation and `keys_version` resume, unknown sessions, liveness by the stream
//! (a dropped stream expires its session and re-parents its children), Heartbeat side by
//! side, malformed first messages. No wall-clock assertion: every wait is for a
//! condition, bounded by `PATIENCE` only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use starling_controlplane::tokens::TokenKeys;
use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, CommandsRequest, CreateBroadcastRequest, HealthReport, HeartbeatRequest,
    IngestHealth, JoinRequest, JoinResponse, LeaveRequest, NodeCommand, RegisterNodeRequest,
    RevokeViewerRequest, SessionDown, SessionUp, SourceHealth, SubstreamParent,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

const ADMIN_KEY: &str = "stream-test-admin-key-0123456789";
/// Upper bound for waiting on an event that should happen (a hang guard).
const PATIENCE: Duration = Duration::from_secs(20);

struct Harness {
    cp: ControlPlaneHandle,
    channel: Channel,
}

/// Test tunables: heartbeat 100 ms; sessions silent for `missed` heartbeats expire.
fn service(missed: u32, token_ttl: Duration) -> ServiceConfig {
    ServiceConfig {
        heartbeat_interval: Duration::from_millis(100),
        node_timeout: Duration::from_secs(10),
        liveness_tick: Duration::from_millis(50),
        missed_heartbeats: missed,
        token_ttl,
        key_refresh: Duration::from_millis(100),
        session_detach_grace: Duration::from_millis(100),
        // Long: counters sent sooner than a quarter of it are skipped (flood test).
        session_counters_interval: Duration::from_secs(3600),
        trust: starling_controlplane::trust::TrustConfig {
            peer_addr_check: starling_controlplane::trust::PeerAddrCheck::Off,
            ..Default::default()
        },
        ..ServiceConfig::default()
    }
}

impl Harness {
    async fn start(store: Store) -> Harness {
        // Sessions without a stream do not expire (600 x 100 ms) unless a test says so.
        Self::start_with(store, service(600, Duration::from_secs(120))).await
    }

    async fn start_with(store: Store, service: ServiceConfig) -> Harness {
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
        Harness { cp, channel }
    }

    fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    fn edge(&self) -> EdgeServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        EdgeServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    fn viewer(&self) -> ViewerServiceClient<Channel> {
        ViewerServiceClient::new(self.channel.clone())
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.cp.shutdown().await.unwrap();
    }
}

/// A live broadcast served by a fake node (registered, ingesting, reporting its rate).
struct LiveGrid {
    id: String,
    _commands: tonic::Streaming<NodeCommand>,
}

async fn live_grid(h: &Harness, substreams: u32) -> LiveGrid {
    let mut edge = h.edge();
    let node_id = edge
        .register(RegisterNodeRequest {
            node_name: "grid".into(),
            wire_addr: "grid.test:9000".into(),
            http_addr: "grid.test:9080".into(),
            cores: 2,
            capacity_viewers: 0,
            chunk_signing_key: None,
        })
        .await
        .unwrap()
        .into_inner()
        .node_id;
    let commands = edge
        .commands(CommandsRequest {
            node_id: node_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
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
    edge.report_health(HealthReport {
        node_id,
        ingests: vec![IngestHealth {
            broadcast_id: id.clone(),
            health: SourceHealth::Up as i32,
            bitrate_kbps: 1000,
            ..Default::default()
        }],
        viewers: 0,
    })
    .await
    .unwrap();
    LiveGrid {
        id,
        _commands: commands,
    }
}

async fn join(h: &Harness, id: &str, peer_addr: &str, upload_kbps: u32) -> JoinResponse {
    h.viewer()
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: id.into(),
            client_version: "stream-test".into(),
            peer_addr: peer_addr.into(),
            upload_kbps,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// One viewer's session stream.
struct Stream {
    tx: mpsc::Sender<SessionUp>,
    rx: tonic::Streaming<SessionDown>,
}

impl Stream {
    async fn open(h: &Harness, first: SessionUp) -> Result<Stream, Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let rx = h
            .viewer()
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream { tx, rx })
    }

    async fn attach(h: &Harness, session_id: &str, keys_version: u64) -> Stream {
        Self::open(
            h,
            SessionUp {
                session_id: session_id.into(),
                keys_version,
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }

    /// The next message (`None`: the stream ended).
    async fn next(&mut self) -> Option<Result<SessionDown, Status>> {
        tokio::time::timeout(PATIENCE, self.rx.next())
            .await
            .expect("nothing on the session stream within the patience bound")
    }

    async fn message(&mut self) -> SessionDown {
        self.next()
            .await
            .expect("stream ended")
            .expect("stream error")
    }

    /// Messages until one satisfies `pred` (all of them are returned).
    async fn until(&mut self, pred: impl Fn(&SessionDown) -> bool) -> Vec<SessionDown> {
        let mut seen = Vec::new();
        loop {
            let m = self.message().await;
            let done = pred(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
}

fn peer_of(p: &SubstreamParent) -> Option<u64> {
    p.peer.as_ref().map(|r| r.peer_id)
}

/// A relay A and a viewer B fed by A (4 substreams).
async fn two(h: &Harness, g: &LiveGrid) -> (JoinResponse, JoinResponse) {
    let a = join(h, &g.id, "10.0.0.1:7001", 1000).await;
    let b = join(h, &g.id, "", 0).await;
    assert!(
        b.parents.iter().all(|p| peer_of(p) == Some(a.peer_id)),
        "{b:?}"
    );
    (a, b)
}

async fn first_message_is_complete_and_keys_version_resumes(store: Store) {
    let h = Harness::start(store).await;
    let g = live_grid(&h, 4).await;
    let (a, b) = two(&h, &g).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    let first = sb.message().await;
    assert!(first.active);
    assert_eq!(
        first
            .parents
            .iter()
            .map(|p| p.substream)
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    for p in &first.parents {
        assert_eq!(peer_of(p), Some(a.peer_id));
        assert!(!p.ticket.is_empty(), "a peer parent carries its ticket");
    }
    assert!(first.neighbours_changed);
    assert_eq!(first.neighbours.len(), 1);
    assert_eq!(first.neighbours[0].peer_id, a.peer_id);
    assert!(first.revoked_peer_ids.is_empty());
    assert!(first.chunk_token.is_empty(), "a fresh token is not renewed");
    assert_eq!(first.token_expires_at_unix_ms, b.token_expires_at_unix_ms);
    assert_ne!(first.keys_version, 0);
    assert_eq!(first.token_keys, b.token_keys);
    assert_eq!(first.counters_interval_ms, 3_600_000);

    // A second stream of the same session takes over (the first ends with ABORTED);
    // holding the current keys_version, it gets no key sets.
    let mut again = Stream::attach(&h, &b.session_id, first.keys_version).await;
    let resumed = again.message().await;
    assert!(resumed.active);
    assert_eq!(resumed.keys_version, 0);
    assert!(resumed.token_keys.is_empty() && resumed.chunk_keys.is_empty());
    assert_eq!(resumed.parents.len(), 4);
    let err = sb.next().await.expect("an error status").unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    h.shutdown().await;
}

async fn parent_leaving_pushes_only_the_changed_substreams(store: Store) {
    let h = Harness::start(store).await;
    let g = live_grid(&h, 4).await;
    let a = join(&h, &g.id, "10.0.0.1:7001", 1000).await;
    let f = join(&h, &g.id, "10.0.0.2:7001", 1000).await;
    let b = join(&h, &g.id, "", 0).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    let first = sb.message().await;
    let leaver = peer_of(
        first
            .parents
            .iter()
            .find(|p| peer_of(p).is_some())
            .expect("B has a peer parent"),
    )
    .unwrap();
    let fed: Vec<u32> = first
        .parents
        .iter()
        .filter(|p| peer_of(p) == Some(leaver))
        .map(|p| p.substream)
        .collect();
    let session = if leaver == a.peer_id { &a } else { &f };
    h.viewer()
        .leave(LeaveRequest {
            session_id: session.session_id.clone(),
        })
        .await
        .unwrap();
    let pushed = sb.until(|m| !m.parents.is_empty()).await;
    let moved = &pushed.last().unwrap().parents;
    let mut substreams: Vec<u32> = moved.iter().map(|p| p.substream).collect();
    substreams.sort_unstable();
    assert_eq!(substreams, fed, "only the leaver's substreams: {moved:?}");
    for p in moved {
        assert_ne!(peer_of(p), Some(leaver));
        assert_eq!(peer_of(p).is_some(), !p.ticket.is_empty());
    }
    h.shutdown().await;
}

async fn token_renewal_is_pushed(store: Store) {
    // 2 s tokens: renewed once less than 1 s is left.
    let h = Harness::start_with(store, service(600, Duration::from_secs(2))).await;
    let g = live_grid(&h, 4).await;
    let (_a, b) = two(&h, &g).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    let pushed = sb.until(|m| !m.chunk_token.is_empty()).await;
    let renewed = pushed.last().unwrap();
    assert!(renewed.active);
    assert!(renewed.token_expires_at_unix_ms > b.token_expires_at_unix_ms);
    assert_ne!(renewed.chunk_token, b.chunk_token);
    // The session stream's renewals keep the key the session joined with.
    let holder = |t: &[u8]| {
        starling_proto::token::peek_unverified(t)
            .unwrap()
            .1
            .holder_key
    };
    assert_eq!(holder(&renewed.chunk_token), holder(&b.chunk_token));
    assert_eq!(holder(&b.chunk_token), [7; 32]);
    // And again: the timer follows the new expiry.
    let again = sb.until(|m| !m.chunk_token.is_empty()).await;
    assert!(again.last().unwrap().token_expires_at_unix_ms > renewed.token_expires_at_unix_ms);
    h.shutdown().await;
}

async fn revocation_is_pushed_and_ends_the_revoked_stream(store: Store) {
    let h = Harness::start(store).await;
    let g = live_grid(&h, 4).await;
    let (a, b) = two(&h, &g).await;
    let mut sa = Stream::attach(&h, &a.session_id, 0).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    assert!(sa.message().await.active);
    assert!(sb.message().await.active);
    h.admin()
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: g.id.clone(),
            session_id: a.session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A: "session over", then the stream ends.
    let over = sa.until(|m| !m.active).await;
    assert!(!over.last().unwrap().active);
    assert!(
        sa.next().await.is_none(),
        "the stream ends after active=false"
    );
    // B: the revoked peer, and new parents (not A).
    let mut revoked = false;
    let mut reparented = false;
    while !(revoked && reparented) {
        let m = sb.message().await;
        assert!(m.active);
        revoked |= m.revoked_peer_ids.contains(&a.peer_id);
        if !m.parents.is_empty() {
            assert!(m.parents.iter().all(|p| peer_of(p) != Some(a.peer_id)));
            reparented = true;
        }
    }
    h.shutdown().await;
}

async fn key_rotation_is_pushed(store: Store) {
    let replica = store.clone();
    let h = Harness::start(store).await;
    let g = live_grid(&h, 4).await;
    let (_a, b) = two(&h, &g).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    let first = sb.message().await;
    assert_eq!(first.token_keys.len(), 1);
    // Another replica rotates: this control plane reloads the keys within its key
    // refresh period and the stream pushes the new sets.
    let now = starling_proto::time::unix_ms_i64();
    TokenKeys::load(&replica, Duration::from_secs(120), true, now)
        .await
        .unwrap();
    let pushed = sb.until(|m| m.keys_version != 0).await;
    let keys = pushed.last().unwrap();
    assert_ne!(keys.keys_version, first.keys_version);
    assert_eq!(keys.token_keys.len(), 2);
    // A stream resuming with that version gets no key sets; one with the old gets them.
    drop(sb);
    let mut resumed = Stream::attach(&h, &b.session_id, keys.keys_version).await;
    let m = resumed.message().await;
    assert!(m.active);
    assert_eq!(m.keys_version, 0);
    assert!(m.token_keys.is_empty());
    drop(resumed);
    let mut stale = Stream::attach(&h, &b.session_id, first.keys_version).await;
    assert_eq!(stale.message().await.keys_version, keys.keys_version);
    // refresh_keys: the sets again, at once.
    stale
        .tx
        .send(SessionUp {
            refresh_keys: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = stale.until(|m| m.keys_version != 0).await;
    assert_eq!(again.last().unwrap().token_keys, keys.token_keys);
    h.shutdown().await;
}

async fn unknown_session_is_over_and_the_stream_ends(store: Store) {
    let h = Harness::start(store).await;
    let mut s = Stream::attach(&h, "00000000-0000-4000-8000-000000000000", 0).await;
    let m = s.message().await;
    assert!(!m.active);
    assert!(s.next().await.is_none());
    // A left session too.
    let g = live_grid(&h, 4).await;
    let (_a, b) = two(&h, &g).await;
    h.viewer()
        .leave(LeaveRequest {
            session_id: b.session_id.clone(),
        })
        .await
        .unwrap();
    let mut s = Stream::attach(&h, &b.session_id, 0).await;
    assert!(!s.message().await.active);
    assert!(s.next().await.is_none());
    h.shutdown().await;
}

async fn dropped_stream_expires_and_children_get_new_parents(store: Store) {
    // Silent sessions (and detached ones, after 100 ms of grace) expire after 300 ms.
    let h = Harness::start_with(store, service(3, Duration::from_secs(120))).await;
    let g = live_grid(&h, 4).await;
    let (a, b) = two(&h, &g).await;
    let mut sa = Stream::attach(&h, &a.session_id, 0).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    assert!(sa.message().await.active);
    assert!(sb.message().await.active);
    // Streams keep their sessions alive without any heartbeat: B's view is unchanged
    // after several session timeouts' worth of the grid working (A is still its parent
    // when A's stream goes).
    let viewers_before = h
        .admin()
        .get_broadcast(BroadcastRef { id: g.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert_eq!(viewers_before, 2);
    // A vanishes: its stream is dropped (the connection resets it).
    drop(sa);
    let pushed = sb
        .until(|m| !m.parents.is_empty() && m.parents.iter().all(|p| peer_of(p) != Some(a.peer_id)))
        .await;
    assert!(pushed.iter().all(|m| m.active));
    let hb = h
        .viewer()
        .heartbeat(HeartbeatRequest {
            session_id: a.session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!hb.active, "A's session expired");
    // B, attached, never expired.
    let hb = h
        .viewer()
        .heartbeat(HeartbeatRequest {
            session_id: b.session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(hb.active);
    h.shutdown().await;
}

async fn attached_sessions_outlive_the_silence_timeout(store: Store) {
    let h = Harness::start_with(store, service(3, Duration::from_secs(120))).await;
    let g = live_grid(&h, 4).await;
    let (a, b) = two(&h, &g).await;
    let mut sa = Stream::attach(&h, &a.session_id, 0).await;
    assert!(sa.message().await.active);
    // B heartbeats, A only has its stream; B's heartbeats see A as parent for many
    // session timeouts (waiting for B's own heartbeats, not for the clock).
    for _ in 0..20 {
        let hb = h
            .viewer()
            .heartbeat(HeartbeatRequest {
                session_id: b.session_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(hb.active);
        assert!(hb.parents.iter().all(|p| peer_of(p) == Some(a.peer_id)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sa);
    h.shutdown().await;
}

async fn counters_on_the_stream_and_heartbeat_side_by_side(store: Store) {
    let h = Harness::start(store).await;
    let g = live_grid(&h, 4).await;
    let (a, b) = two(&h, &g).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    assert!(sb.message().await.active);
    // Counters over the stream count like a heartbeat's: peer share 3/4.
    sb.tx
        .send(SessionUp {
            bytes_from_server: 1000,
            bytes_from_peers: 3000,
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let b = h
                .admin()
                .get_broadcast(BroadcastRef { id: g.id.clone() })
                .await
                .unwrap()
                .into_inner();
            if (b.peer_share - 0.75).abs() < 1e-9 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stream's counters were never recorded");
    // A flood of counters within a quarter of the interval is not recorded (only
    // a key refresh is answered): the share stays 3/4.
    for i in 1..=50u64 {
        sb.tx
            .send(SessionUp {
                bytes_from_server: 1000,
                bytes_from_peers: 3000 + i * 1000,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    sb.tx
        .send(SessionUp {
            refresh_keys: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Messages are handled in order: the refresh's answer comes after the flood.
    loop {
        let down = sb.message().await;
        if down.keys_version != 0 {
            break;
        }
    }
    let share = h
        .admin()
        .get_broadcast(BroadcastRef { id: g.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .peer_share;
    assert!((share - 0.75).abs() < 1e-9, "flood recorded: share {share}");
    // Heartbeat keeps working, for the streaming session and for A (no stream).
    for s in [&a, &b] {
        let hb = h
            .viewer()
            .heartbeat(HeartbeatRequest {
                session_id: s.session_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(hb.active);
        assert_eq!(hb.parents.len(), 4);
        assert!(!hb.token_keys.is_empty());
    }
    h.shutdown().await;
}

async fn malformed_first_messages_get_a_status(store: Store) {
    let h = Harness::start(store).await;
    for bad in ["", &"x".repeat(4096)] {
        let err = Stream::open(
            &h,
            SessionUp {
                session_id: bad.into(),
                ..Default::default()
            },
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    // A stream closed before its first message.
    let (tx, rx) = mpsc::channel::<SessionUp>(1);
    drop(tx);
    let err = h
        .viewer()
        .session(ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    // The server keeps serving.
    let g = live_grid(&h, 4).await;
    let (_a, b) = two(&h, &g).await;
    let mut sb = Stream::attach(&h, &b.session_id, 0).await;
    assert!(sb.message().await.active);
    h.shutdown().await;
}

/// A relay that asks for version-2 tickets (as the SDK does) gets its ticket keys with
/// its join, its heartbeats and its stream's key sets, and the tickets naming it are
/// version 2, checked with those keys only; a relay that does not ask keeps version 1.
async fn mac_tickets_for_relays_that_ask(store: Store) {
    use starling_proto::ticket_mac::{ParentTicketKeys, TICKET_MAC_VERSION, verify_any_ticket};
    use starling_proto::token::TokenVerifier;
    let h = Harness::start(store).await;
    let join_as = |id: String, addr: &'static str, upload: u32, mac: bool| {
        let mut v = h.viewer();
        async move {
            v.join(JoinRequest {
                holder_key: vec![7; 32],
                broadcast_id: id,
                client_version: "stream-test".into(),
                peer_addr: addr.into(),
                upload_kbps: upload,
                mac_tickets: mac,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let now = starling_proto::time::unix_ms();
    let g = live_grid(&h, 4).await;
    let a = join_as(g.id.clone(), "10.0.0.1:7001", 1000, true).await;
    assert_eq!(a.peer_id & 1, 1, "the peer id says: version 2");
    assert_eq!(a.ticket_keys.len(), 1, "{:?}", a.ticket_keys.len());
    assert_eq!(a.ticket_keys[0].key.len(), 32);
    assert_eq!(a.ticket_keys[0].key_id, a.token_keys[0].key_id);
    let ours = ParentTicketKeys::from_raw(a.ticket_keys.iter().map(|k| (k.key_id, &k.key[..])));
    let mut public = TokenVerifier::new();
    for k in &a.token_keys {
        public.add_key(k.key_id, &k.ed25519).unwrap();
    }
    let b = join_as(g.id.clone(), "", 0, false).await;
    assert_eq!(b.peer_id & 1, 0);
    assert!(b.ticket_keys.is_empty(), "only for those who ask");
    for p in &b.parents {
        assert_eq!(peer_of(p), Some(a.peer_id));
        assert_eq!(p.ticket[0], TICKET_MAC_VERSION);
        let c = ours
            .verify_ticket(&p.ticket, &g.id, b.peer_id, a.peer_id, now, 5_000)
            .unwrap();
        assert_ne!(c.substream_mask & (1 << p.substream), 0);
        // The public keys cannot check it: it is for A alone.
        let refused = verify_any_ticket(
            &p.ticket,
            &public,
            &ParentTicketKeys::default(),
            &g.id,
            b.peer_id,
            a.peer_id,
            now,
            5_000,
        );
        assert!(refused.is_err());
    }
    // The heartbeat and the stream's first message carry A's keys again.
    let hb = h
        .viewer()
        .heartbeat(HeartbeatRequest {
            session_id: a.session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.ticket_keys, a.ticket_keys);
    let mut sa = Stream::attach(&h, &a.session_id, 0).await;
    assert_eq!(sa.message().await.ticket_keys, a.ticket_keys);

    // A relay that does not ask: version-1 tickets, checked with the public keys.
    let g2 = live_grid(&h, 4).await;
    let r = join_as(g2.id.clone(), "10.0.0.2:7001", 1000, false).await;
    assert!(r.ticket_keys.is_empty());
    let v = join_as(g2.id.clone(), "", 0, true).await;
    for p in &v.parents {
        assert_eq!(peer_of(p), Some(r.peer_id));
        assert_eq!(p.ticket[0], starling_proto::ticket::TICKET_VERSION);
        public
            .verify_ticket(&p.ticket, &g2.id, v.peer_id, r.peer_id, now, 5_000)
            .unwrap();
    }
    drop(sa);
    h.shutdown().await;
}

on_both_backends!(
    mac_tickets_for_relays_that_ask,
    first_message_is_complete_and_keys_version_resumes,
    parent_leaving_pushes_only_the_changed_substreams,
    token_renewal_is_pushed,
    revocation_is_pushed_and_ends_the_revoked_stream,
    key_rotation_is_pushed,
    unknown_session_is_over_and_the_stream_ends,
    dropped_stream_expires_and_children_get_new_parents,
    attached_sessions_outlive_the_silence_timeout,
    counters_on_the_stream_and_heartbeat_side_by_side,
    malformed_first_messages_get_a_status,
);

/// Memory experiment (not a test of a bar; run by hand, release build advised):
/// `cargo test -p starling-controlplane --test session_stream -- --ignored --nocapture
/// rss_per_stream`. Joins `STREAMS` sessions (default 5,000), then opens one session
/// stream each (500 per HTTP/2 connection) and prints the growth of this process's
/// VmRSS per stream: server and client side together, in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn rss_per_stream() {
    let n: usize = std::env::var("STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let db = common::sqlite().await;
    let mut svc = service(600, Duration::from_secs(120));
    svc.limits.join = starling_controlplane::limits::RateLimit::per_second(0.0, 0);
    let h = Harness::start_with(db.store.clone(), svc).await;
    let g = live_grid(&h, 4).await;
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        sessions.push(join(&h, &g.id, "", 0).await.session_id);
    }
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let mut channels = Vec::new();
    let mut streams = Vec::with_capacity(n);
    let before = rss();
    for (i, s) in sessions.iter().enumerate() {
        if i % 500 == 0 {
            channels.push(
                Channel::from_shared(h.cp.url())
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
        }
        let (tx, rx) = mpsc::channel(1);
        tx.send(SessionUp {
            session_id: s.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut client = ViewerServiceClient::new(channels.last().unwrap().clone());
        let mut down = client
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert!(down.next().await.unwrap().unwrap().active);
        streams.push((tx, down));
    }
    let after = rss();
    #[allow(clippy::cast_precision_loss)]
    let per = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    println!(
        "{n} session streams: VmRSS {before} kB -> {after} kB, {per:.0} bytes per stream (server + client)"
    );
    drop(streams);
    h.shutdown().await;
    db.store.close().await;
}
