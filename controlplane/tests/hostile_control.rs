//! Hostile viewers against the control plane, over real gRPC on loopback (SQLite and,
//! with `DATABASE_URL`, Postgres) — issue 13, items 3, 4 and 8. Each test plays the
//! attack and checks what the other viewers see. Distinct caller addresses come from
//! client channels bound to 127.x.y.z. No wall-clock assertion: the rate limits are
//! set so that nothing refills while a test runs, and waits are bounded only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use starling_controlplane::limits::{LimitsConfig, RateLimit};
use starling_controlplane::reachability::ReachabilityConfig;
use starling_controlplane::trust::{PeerAddrCheck, TrustConfig};
use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServerLimits, ServiceConfig,
    Store,
};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    Broadcast, BroadcastRef, CommandsRequest, CreateBroadcastRequest, HeartbeatRequest,
    JoinRequest, JoinResponse, LeaveRequest, NodeCommand, PeerReportKind, RegisterNodeRequest,
    ReparentRequest, ReportPeerRequest, ReportRequest, SubstreamParent,
};
use tonic::Code;
use tonic::transport::Channel;

const ADMIN_KEY: &str = "hostile-test-admin-key-0123456789";

struct Harness {
    cp: ControlPlaneHandle,
    metrics: SocketAddr,
    _node: tonic::Streaming<NodeCommand>,
}

/// A token every hour: nothing refills while a test runs.
const NO_REFILL: Duration = Duration::from_secs(3600);

fn service(trust: TrustConfig, limits: LimitsConfig) -> ServiceConfig {
    ServiceConfig {
        heartbeat_interval: Duration::from_millis(100),
        // Nodes and sessions never time out during these tests.
        node_timeout: Duration::from_secs(600),
        liveness_tick: Duration::from_millis(50),
        missed_heartbeats: 6000,
        trust,
        limits,
        ..ServiceConfig::default()
    }
}

impl Harness {
    async fn start(store: Store) -> Harness {
        Self::start_with(
            store,
            service(TrustConfig::default(), LimitsConfig::default()),
        )
        .await
    }

    async fn start_with(store: Store, service: ServiceConfig) -> Harness {
        Self::start_full(store, service, ServerLimits::default()).await
    }

    async fn start_full(store: Store, service: ServiceConfig, limits: ServerLimits) -> Harness {
        let auth = AuthConfig {
            admin_key: Some(ADMIN_KEY.into()),
            ..AuthConfig::default()
        };
        let mut cp =
            ControlPlane::bind_with_store("127.0.0.1:0".parse().unwrap(), store, service, &auth)
                .await
                .unwrap()
                .with_server_limits(limits);
        let metrics = cp
            .bind_metrics("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let cp = cp.spawn();
        let node = register_node(&cp.url()).await;
        Harness {
            cp,
            metrics,
            _node: node,
        }
    }

    async fn channel(&self, from: [u8; 4]) -> Channel {
        channel(&self.cp.url(), from).await
    }

    /// A viewer client calling from `from`.
    async fn viewer(&self, from: [u8; 4]) -> ViewerServiceClient<Channel> {
        ViewerServiceClient::new(self.channel(from).await)
    }

    async fn admin(
        &self,
    ) -> AdminServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, BearerInterceptor>,
    > {
        AdminServiceClient::with_interceptor(
            self.channel([127, 0, 0, 1]).await,
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    /// A public broadcast with K = 4, live (stream rate: the 1000 kbit/s default).
    async fn live_broadcast(&self, name: &str) -> String {
        let mut admin = self.admin().await;
        let id = admin
            .create_broadcast(CreateBroadcastRequest {
                name: name.into(),
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

    async fn get(&self, id: &str) -> Broadcast {
        self.admin()
            .await
            .get_broadcast(BroadcastRef { id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn shutdown(self) {
        drop(self._node);
        self.cp.shutdown().await.unwrap();
    }
}

/// A channel to `url` whose connections come from `from`.
async fn channel(url: &str, from: [u8; 4]) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .local_address(Some(IpAddr::from(from)))
        .connect()
        .await
        .unwrap()
}

/// Registers a fake data-plane node and holds its command stream (it stays alive).
async fn register_node(url: &str) -> tonic::Streaming<NodeCommand> {
    let mut edge = EdgeServiceClient::with_interceptor(
        channel(url, [127, 0, 0, 1]).await,
        BearerInterceptor::new(ADMIN_KEY).unwrap(),
    );
    let reg = edge
        .register(RegisterNodeRequest {
            node_name: "edge".into(),
            wire_addr: "edge.test:9000".into(),
            http_addr: "edge.test:9080".into(),
            cores: 1,
            capacity_viewers: 1000,
            chunk_signing_key: Some(starling_proto::v1::PublicKey {
                key_id: 7,
                ed25519: vec![7; 32],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    edge.commands(CommandsRequest {
        node_id: reg.node_id,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn join_from(
    h: &Harness,
    b: &str,
    from: [u8; 4],
    peer_addr: &str,
    upload_kbps: u32,
) -> Result<JoinResponse, tonic::Status> {
    h.viewer(from)
        .await
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: b.into(),
            client_version: "hostile-test".into(),
            peer_addr: peer_addr.into(),
            upload_kbps,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn parents_now(h: &Harness, session: &str) -> Vec<SubstreamParent> {
    let hb = h
        .viewer([127, 0, 0, 1])
        .await
        .heartbeat(HeartbeatRequest {
            session_id: session.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(hb.active);
    hb.parents
}

/// Substream subscriptions fed by peers: demand minus the data plane's
/// (`GetBroadcast.booster_slots` counts every data-plane-fed subscription).
fn peer_slots_used(g: &Broadcast) -> u64 {
    g.demand_slots - g.booster_slots
}

fn fed_by(p: &SubstreamParent, peer: u64) -> bool {
    p.peer.as_ref().is_some_and(|r| r.peer_id == peer)
}

fn has_parent(parents: &[SubstreamParent], peer: u64) -> bool {
    parents.iter().any(|p| fed_by(p, peer))
}

async fn report(
    client: &mut ViewerServiceClient<Channel>,
    session: &str,
    peer: u64,
    kind: PeerReportKind,
) -> Result<(), tonic::Status> {
    client
        .report_peer(ReportPeerRequest {
            session_id: session.into(),
            peer_id: peer,
            reason: "hostile test".into(),
            kind: kind as i32,
        })
        .await
        .map(|_| ())
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_string()
}

async fn metric(h: &Harness, series: &str) -> u64 {
    let text = scrape(h.metrics).await;
    text.lines()
        .find(|l| !l.starts_with('#') && l.rsplit_once(' ').is_some_and(|(n, _)| n == series))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

fn refusals(reason: &str) -> String {
    format!("starling_cp_refusals_total{{reason=\"{reason}\"}}")
}

// ---------------------------------------------------------------------------
// Item 4: ReportPeer as a weapon.

async fn free_sessions_cannot_exclude_relays(store: Store) {
    let h = Harness::start(store).await;
    let b = h.live_broadcast("reported").await;
    // Three relays (8 slots each at 1000 kbit/s, K = 4) and two honest viewers.
    let mut relays = Vec::new();
    for i in 1..=3u8 {
        let addr = format!("127.0.1.{i}:700{i}");
        relays.push(
            join_from(&h, &b, [127, 0, 1, i], &addr, 2000)
                .await
                .unwrap(),
        );
    }
    let mut honest = Vec::new();
    for ip in [[127, 0, 2, 1], [127, 0, 2, 2]] {
        honest.push(join_from(&h, &b, ip, "", 0).await.unwrap());
    }
    let supply = h.get(&b).await.peer_supply_slots;
    assert_eq!(supply, 24);

    // The attack: four free sessions from one address report every relay, and a
    // sweep of guessed ids, with both kinds.
    let mut attacker = h.viewer([127, 0, 3, 1]).await;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(join_from(&h, &b, [127, 0, 3, 1], "", 0).await.unwrap());
    }
    let before: Vec<Vec<SubstreamParent>> = {
        let mut v = Vec::new();
        for s in &honest {
            v.push(parents_now(&h, &s.session_id).await);
        }
        v
    };
    let mut refused = 0u64;
    for s in &sessions {
        let guessed = (1..=20u64).chain(relays.iter().map(|r| r.peer_id));
        for peer in guessed {
            for kind in [PeerReportKind::BadChunk, PeerReportKind::NonDelivery] {
                match report(&mut attacker, &s.session_id, peer, kind).await {
                    Ok(()) => {}
                    Err(e) => {
                        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                        refused += 1;
                    }
                }
            }
        }
    }
    assert!(refused > 0, "guessed ids must be refused");
    assert_eq!(metric(&h, &refusals("report_not_assigned")).await, refused);
    // Nothing excluded: the relays keep all their slots, the honest viewers their
    // parents.
    assert_eq!(h.get(&b).await.peer_supply_slots, supply);
    assert_eq!(metric(&h, "starling_cp_peers_demoted_total").await, 0);
    for (s, was) in honest.iter().zip(&before) {
        assert_eq!(&parents_now(&h, &s.session_id).await, was);
    }

    // A real polluter, reported by three victims on three addresses, is still
    // excluded (a fresh broadcast so that the victims' parents are all the polluter).
    let b2 = h.live_broadcast("polluted").await;
    let polluter = join_from(&h, &b2, [127, 0, 4, 1], "127.0.4.1:7100", 4000)
        .await
        .unwrap();
    let mut victims = Vec::new();
    for i in 1..=3u8 {
        let j = join_from(&h, &b2, [127, 0, 5, i], "", 0).await.unwrap();
        assert!(j.parents.iter().all(|p| fed_by(p, polluter.peer_id)));
        victims.push((h.viewer([127, 0, 5, i]).await, j));
    }
    for (n, (client, v)) in victims.iter_mut().enumerate() {
        report(
            client,
            &v.session_id,
            polluter.peer_id,
            PeerReportKind::BadChunk,
        )
        .await
        .unwrap();
        let demoted = metric(&h, "starling_cp_peers_demoted_total").await;
        assert_eq!(demoted, u64::from(n == 2), "after {} reporters", n + 1);
    }
    for (_, v) in &victims {
        assert!(!has_parent(
            &parents_now(&h, &v.session_id).await,
            polluter.peer_id
        ));
    }
    assert_eq!(h.get(&b2).await.peer_supply_slots, 0);
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Item 3: lying parents.

async fn sybil_upload_is_capped_and_peer_addr_must_be_the_callers(store: Store) {
    let h = Harness::start(store).await;
    let b = h.live_broadcast("sybil").await;
    // The Sybil claims 10^6 kbit/s: the claim buys 256 slots (the per-peer maximum),
    // the grid grants it 4 stream copies = 16 slots until its heartbeats confirm more.
    let sybil = join_from(&h, &b, [127, 0, 6, 1], "127.0.6.1:7000", 1_000_000)
        .await
        .unwrap();
    assert_eq!(sybil.child_slots, 256);
    let g = h.get(&b).await;
    assert_eq!(g.peer_supply_slots, 16);
    assert_eq!(metric(&h, "starling_cp_upload_capped_joins_total").await, 1);
    // Twenty viewers: only 16 of their 80 substream subscriptions go to the Sybil.
    let mut on_sybil = 0;
    for i in 1..=20u8 {
        let j = join_from(&h, &b, [127, 0, 7, i], "", 0).await.unwrap();
        on_sybil += j
            .parents
            .iter()
            .filter(|p| fed_by(p, sybil.peer_id))
            .count();
    }
    assert_eq!(on_sybil, 16);
    let g = h.get(&b).await;
    assert_eq!(peer_slots_used(&g), 16);
    assert!(g.booster_slots >= 64, "{g:?}");

    // peer_addr on someone else's address, or a name, is refused and counted; the
    // viewer still plays (behind a NAT its own private address looks just like this),
    // as one that relays to nobody, and nobody is ever pointed at that address.
    let supply = h.get(&b).await.peer_supply_slots;
    for addr in ["127.0.9.9:7000", "victim.example:7000"] {
        let j = join_from(&h, &b, [127, 0, 6, 2], addr, 2000)
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e:?}"));
        assert_eq!(j.child_slots, 0, "{addr}");
    }
    assert_eq!(metric(&h, &refusals("peer_addr")).await, 2);
    assert_eq!(h.get(&b).await.peer_supply_slots, supply);
    for i in 1..=10u8 {
        let j = join_from(&h, &b, [127, 0, 8, i], "", 0).await.unwrap();
        let addrs = j
            .parents
            .iter()
            .filter_map(|p| p.peer.as_ref())
            .chain(&j.neighbours);
        for r in addrs {
            assert!(
                !r.addr.contains("127.0.9.9") && !r.addr.contains("victim"),
                "{r:?}"
            );
        }
    }
    // Its own address, or an unspecified one (replaced by the caller's), is fine.
    join_from(&h, &b, [127, 0, 6, 2], "127.0.6.2:7000", 2000)
        .await
        .unwrap();
    join_from(&h, &b, [127, 0, 6, 3], "0.0.0.0:7000", 2000)
        .await
        .unwrap();
    h.shutdown().await;
}

/// Reachability before responsibility: with probes on, a relay gets children only once
/// a TCP connection to its advertised address opens; one whose address does not answer
/// (a NAT without a port mapping) plays but is nobody's parent.
async fn relays_get_children_only_once_reachable(store: Store) {
    let mut cfg = service(TrustConfig::default(), LimitsConfig::default());
    cfg.reachability = ReachabilityConfig {
        enabled: true,
        timeout: Duration::from_secs(5),
        ..ReachabilityConfig::default()
    };
    let h = Harness::start_with(store, cfg).await;
    let b = h.live_broadcast("probed").await;
    let listening = tokio::net::TcpListener::bind("127.0.6.1:0").await.unwrap();
    let open = listening.local_addr().unwrap().to_string();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.6.2:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let reachable = join_from(&h, &b, [127, 0, 6, 1], &open, 2000)
        .await
        .unwrap();
    let unreachable = join_from(&h, &b, [127, 0, 6, 2], &closed, 2000)
        .await
        .unwrap();
    // Each learns the address its join came from (its server-reflexive address).
    assert!(
        reachable.observed_addr.starts_with("127.0.6.1:"),
        "{reachable:?}"
    );
    assert!(
        unreachable.observed_addr.starts_with("127.0.6.2:"),
        "{unreachable:?}"
    );
    // Both are told what their claim buys; the grid counts neither until probed.
    assert_eq!(reachable.child_slots, 8);
    assert_eq!(unreachable.child_slots, 8);
    let series = |r: &str| format!("starling_cp_reachability_probes_total{{result=\"{r}\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(&h, &series("reachable")).await + metric(&h, &series("unreachable")).await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the probes never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&h, &series("reachable")).await, 1);
    assert_eq!(metric(&h, &series("unreachable")).await, 1);
    // Only the reachable one's 8 slots are supply; viewers land under it, never under
    // the other.
    assert_eq!(h.get(&b).await.peer_supply_slots, 8);
    let mut under_reachable = 0;
    for i in 1..=4u8 {
        let j = join_from(&h, &b, [127, 0, 7, i], "", 0).await.unwrap();
        assert!(!has_parent(&j.parents, unreachable.peer_id), "{j:?}");
        under_reachable += j
            .parents
            .iter()
            .filter(|p| fed_by(p, reachable.peer_id))
            .count();
    }
    assert!(under_reachable > 0);
    drop(listening);
    h.shutdown().await;
}

/// A child that cannot connect to its parent says so in `Reparent`: the parent is
/// probed again and, unreachable now, loses its children. A session that never had it
/// as a parent cannot trigger that.
async fn a_parent_children_cannot_reach_is_probed_again_and_loses_them(store: Store) {
    let mut cfg = service(TrustConfig::default(), LimitsConfig::default());
    cfg.reachability = ReachabilityConfig {
        enabled: true,
        timeout: Duration::from_secs(5),
        ..ReachabilityConfig::default()
    };
    let h = Harness::start_with(store, cfg).await;
    let b = h.live_broadcast("reprobed").await;
    let listening = tokio::net::TcpListener::bind("127.0.6.1:0").await.unwrap();
    let addr = listening.local_addr().unwrap().to_string();
    let relay = join_from(&h, &b, [127, 0, 6, 1], &addr, 2000)
        .await
        .unwrap();
    let series = |r: &str| format!("starling_cp_reachability_probes_total{{result=\"{r}\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while h.get(&b).await.peer_supply_slots == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never got its slots"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let child = join_from(&h, &b, [127, 0, 7, 1], "", 0).await.unwrap();
    let s = child
        .parents
        .iter()
        .find(|p| fed_by(p, relay.peer_id))
        .map(|p| p.substream)
        .expect("the child has a substream under the relay");
    let stranger = join_from(&h, &b, [127, 0, 7, 2], "", 0).await.unwrap();
    // The relay's listener goes away (its router dropped the mapping, say).
    drop(listening);
    let complain = |session: String| ReparentRequest {
        session_id: session,
        substream: s,
        exclude_peer_ids: vec![relay.peer_id],
        unreachable_peer_ids: vec![relay.peer_id],
    };
    if !has_parent(&stranger.parents, relay.peer_id) {
        h.viewer([127, 0, 7, 2])
            .await
            .reparent(complain(stranger.session_id.clone()))
            .await
            .unwrap();
    }
    h.viewer([127, 0, 7, 1])
        .await
        .reparent(complain(child.session_id.clone()))
        .await
        .unwrap();
    while h.get(&b).await.peer_supply_slots != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay kept its slots"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&h, &series("reachable")).await, 1);
    assert_eq!(metric(&h, &series("unreachable")).await, 1);
    for p in parents_now(&h, &child.session_id).await {
        assert!(!fed_by(&p, relay.peer_id), "{p:?}");
    }
    h.shutdown().await;
}

async fn peer_addr_check_off_accepts_any_address(store: Store) {
    let trust = TrustConfig {
        peer_addr_check: PeerAddrCheck::Off,
        ..TrustConfig::default()
    };
    let h = Harness::start_with(store, service(trust, LimitsConfig::default())).await;
    let b = h.live_broadcast("nat").await;
    let j = join_from(&h, &b, [127, 0, 6, 2], "192.0.2.9:7000", 2000)
        .await
        .unwrap();
    let v = join_from(&h, &b, [127, 0, 6, 3], "", 0).await.unwrap();
    assert!(v.parents.iter().any(|p| {
        p.peer
            .as_ref()
            .is_some_and(|r| r.addr == "192.0.2.9:7000" && r.peer_id == j.peer_id)
    }));
    assert_eq!(metric(&h, &refusals("peer_addr")).await, 0);
    h.shutdown().await;
}

async fn non_delivery_from_three_children_demotes_the_parent(store: Store) {
    let h = Harness::start(store).await;
    let b = h.live_broadcast("silent").await;
    // The parent takes 16 slots (4 copies); four children fill them.
    let parent = join_from(&h, &b, [127, 0, 8, 1], "127.0.8.1:7000", 4000)
        .await
        .unwrap();
    let mut kids = Vec::new();
    for i in 11..=14u8 {
        let j = join_from(&h, &b, [127, 0, 8, i], "", 0).await.unwrap();
        assert!(j.parents.iter().all(|p| fed_by(p, parent.peer_id)));
        kids.push((h.viewer([127, 0, 8, i]).await, j));
    }
    assert_eq!(peer_slots_used(&h.get(&b).await), 16);
    // A viewer it is not a parent of cannot complain about it.
    let other = join_from(&h, &b, [127, 0, 8, 20], "", 0).await.unwrap();
    assert!(!has_parent(&other.parents, parent.peer_id));
    let mut c = h.viewer([127, 0, 8, 20]).await;
    let e = report(
        &mut c,
        &other.session_id,
        parent.peer_id,
        PeerReportKind::NonDelivery,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // One child complaining (even repeatedly) does not demote it.
    let (c1, k1) = &mut kids[0];
    for _ in 0..3 {
        report(
            c1,
            &k1.session_id,
            parent.peer_id,
            PeerReportKind::NonDelivery,
        )
        .await
        .unwrap();
    }
    assert_eq!(metric(&h, "starling_cp_peers_demoted_total").await, 0);
    for (_, k) in &kids {
        assert!(
            parents_now(&h, &k.session_id)
                .await
                .iter()
                .all(|p| fed_by(p, parent.peer_id))
        );
    }
    // A second and third distinct child: demoted, children re-parented, no new ones.
    for (c, k) in kids.iter_mut().skip(1).take(2) {
        report(
            c,
            &k.session_id,
            parent.peer_id,
            PeerReportKind::NonDelivery,
        )
        .await
        .unwrap();
    }
    assert_eq!(metric(&h, "starling_cp_peers_demoted_total").await, 1);
    for (_, k) in &kids {
        assert!(!has_parent(
            &parents_now(&h, &k.session_id).await,
            parent.peer_id
        ));
    }
    let late = join_from(&h, &b, [127, 0, 8, 30], "", 0).await.unwrap();
    assert!(!has_parent(&late.parents, parent.peer_id));
    let g = h.get(&b).await;
    assert_eq!((g.peer_supply_slots, peer_slots_used(&g)), (0, 0));
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Item 8: floods.

async fn floods_are_limited_per_address_and_cost_no_database_writes(store: Store) {
    let limits = LimitsConfig {
        join: RateLimit {
            interval: NO_REFILL,
            burst: 5,
        },
        unknown_session_lookups: RateLimit {
            interval: NO_REFILL,
            burst: 10,
        },
        ..LimitsConfig::default()
    };
    let server = ServerLimits {
        max_message_bytes: 16 * 1024,
        ..ServerLimits::default()
    };
    let h = Harness::start_full(store, service(TrustConfig::default(), limits), server).await;
    let b = h.live_broadcast("flood").await;

    // Join flood from one address: the burst passes, then RESOURCE_EXHAUSTED with a
    // retry delay; other addresses are not affected.
    for _ in 0..5 {
        join_from(&h, &b, [127, 0, 10, 1], "", 0).await.unwrap();
    }
    let e = join_from(&h, &b, [127, 0, 10, 1], "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let pushback: u64 = e
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("retry pushback")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0);
    assert_eq!(metric(&h, &refusals("join_rate")).await, 1);
    let other = join_from(&h, &b, [127, 0, 10, 2], "", 0).await.unwrap();
    assert_eq!(h.get(&b).await.peers, 6);

    // Heartbeat / Leave / Report flood for one unknown session: one database look-up,
    // then answered from the negative cache.
    let mut v = h.viewer([127, 0, 11, 1]).await;
    let lookups = "starling_cp_unknown_session_lookups_total";
    for _ in 0..50 {
        let hb = v
            .heartbeat(HeartbeatRequest {
                session_id: "s-ghost".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!hb.active);
        v.leave(LeaveRequest {
            session_id: "s-ghost".into(),
        })
        .await
        .unwrap();
    }
    assert_eq!(metric(&h, lookups).await, 1);
    assert!(metric(&h, &refusals("unknown_session_cached")).await >= 99);
    for _ in 0..5 {
        let e = v
            .report(ReportRequest {
                session_id: "s-nobody".into(),
                reports: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    assert_eq!(metric(&h, lookups).await, 2);
    // Made-up ids, all different: look-ups are limited per address.
    let mut exhausted = 0;
    for i in 0..30 {
        match v
            .heartbeat(HeartbeatRequest {
                session_id: format!("s-made-up-{i}"),
                ..Default::default()
            })
            .await
        {
            Ok(r) => assert!(!r.into_inner().active),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                exhausted += 1;
            }
        }
    }
    assert_eq!(metric(&h, lookups).await, 10);
    assert_eq!(exhausted, 22);
    assert_eq!(metric(&h, &refusals("unknown_session_rate")).await, 22);
    // Real sessions are not affected (in memory, no look-up).
    let hb = h
        .viewer([127, 0, 11, 1])
        .await
        .heartbeat(HeartbeatRequest {
            session_id: other.session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(hb.active);

    // An oversized message is refused before it is decoded into a request.
    let e = h
        .viewer([127, 0, 12, 1])
        .await
        .join(JoinRequest {
            holder_key: vec![7; 32],
            broadcast_id: b.clone(),
            credential: "x".repeat(64 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    h.shutdown().await;
}

on_both_backends!(
    free_sessions_cannot_exclude_relays,
    sybil_upload_is_capped_and_peer_addr_must_be_the_callers,
    peer_addr_check_off_accepts_any_address,
    relays_get_children_only_once_reachable,
    a_parent_children_cannot_reach_is_probed_again_and_loses_them,
    non_delivery_from_three_children_demotes_the_parent,
    floods_are_limited_per_address_and_cost_no_database_writes,
);
