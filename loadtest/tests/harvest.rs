//! Issue 18, part 4: harvested chunk tokens are worthless. A malicious relay (written
//! here with the raw wire codec; it joined a non-public broadcast like anyone, with a
//! large upload budget) is a real SDK child's parent: the child dials it and shows it
//! its chunk token and a `PROOF` of the token's key. The relay then presents that token
//! to the data plane and to an honest relaying viewer:
//!
//! * with the child's own `PROOF` (made over a nonce the relay relayed from the data
//!   plane, so it is over the right nonce, but names the relay as verifier);
//! * with a `PROOF` made with its own key;
//! * with no `PROOF` at all;
//!
//! and every attempt is `ERROR(UNAUTHORIZED)` with a `bad_proof` / `no_proof` reason,
//! counted (`starling_dataplane_token_rejections_total`, the relay's `peers_refused`).
//! Meanwhile the child itself, with its own key, plays on (from the data plane or the
//! honest relay, once it gave up on the malicious parent).
//!
//! Real control plane, data plane and SDK viewers in-process. Nothing asserts on
//! wall-clock time: waits poll counters and give up after generous deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a panic

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use common::{Issuer, RawConn, init_tracing};
use starling_loadtest::{Deployment, DeploymentConfig, peer_ip};
use starling_proto::holder::{HolderKey, Verifier};
use starling_proto::v1::JoinRequest;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::wire::{
    self, ErrorCode, Frame, Hello, HelloAck, Reason, Role, StartAt, Subscribe,
};
use starling_sdk::{Stats, Viewer, ViewerConfig};

/// Give-up bound for every wait (never a pass/fail threshold).
const GUARD: Duration = Duration::from_secs(60);

fn viewer_config(
    dep: &Deployment,
    credential: String,
    listen: Option<IpAddr>,
    upload_kbps: u32,
) -> ViewerConfig {
    let mut vc = ViewerConfig::new(dep.broadcast_id());
    vc.control_url = dep.control_url();
    vc.transport = dep.transport();
    vc.http_listen = None;
    vc.credential = Some(credential);
    if let Some(ip) = listen {
        vc.relay.listen = SocketAddr::new(ip, 0);
        vc.relay.advertise_host = Some(ip.to_string());
    }
    vc.relay.max_upload_kbps = Some(upload_kbps);
    vc
}

async fn wait_for(what: &str, v: &Viewer, ok: impl Fn(&Stats) -> bool) -> Stats {
    tokio::time::timeout(GUARD, async {
        loop {
            let s = v.stats();
            if ok(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("gave up waiting for {what}: {}", v.stats()))
}

/// The next frame that is not a keep-alive.
async fn next(c: &mut RawConn) -> Option<Frame> {
    tokio::time::timeout(GUARD, async {
        loop {
            match c.next().await {
                Ok(Some(Frame::Ping(_) | Frame::Pong(_))) => {}
                Ok(f) => return f,
                Err(_) => return None,
            }
        }
    })
    .await
    .expect("no frame")
}

/// `HELLO(role, token)` to `addr`; returns the link and the verifier's nonce.
async fn hello(addr: &str, role: Role, token: &Bytes) -> (RawConn, [u8; 32]) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c = RawConn::new(s);
    c.send(&Frame::Hello(Hello {
        min_version: wire::PROTOCOL_VERSION,
        max_version: wire::PROTOCOL_VERSION,
        role,
        token: token.clone(),
    }))
    .await
    .expect("send HELLO");
    match next(&mut c).await {
        Some(Frame::HelloAck(a)) => (c, a.nonce),
        other => panic!("{addr}: expected HELLO_ACK, got {other:?}"),
    }
}

/// Sends `proof` (if any) and `SUBSCRIBE`; returns how the verifier answered.
async fn present(mut c: RawConn, bid: &str, proof: Option<[u8; 64]>) -> Reason {
    if let Some(p) = proof {
        let _ = c.send(&Frame::Proof(Bytes::copy_from_slice(&p))).await;
    }
    let _ = c
        .send(&Frame::Subscribe(Subscribe {
            broadcast_id: bid.into(),
            start: StartAt::Live,
            substream_mask: 0,
        }))
        .await;
    match next(&mut c).await {
        Some(Frame::Error(r)) => r,
        other => panic!("a harvested token was not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harvested_tokens_are_refused_and_their_holder_plays_on() {
    init_tracing();
    let issuer = Issuer::generate();
    let dep = Deployment::start(DeploymentConfig {
        public: false,
        viewer_jwt_keys: vec![issuer.credential_key()],
        ..DeploymentConfig::default()
    })
    .await
    .expect("deployment");
    let bid = dep.broadcast_id().to_string();
    let stream_kbps = dep.source().bitrate_kbps();

    // The malicious relay joins first (the only peer with slots when the child joins),
    // with a key of its own, calling from its relay address as the SDK does.
    let ip = peer_ip(249);
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let listen_addr = listener.local_addr().expect("addr");
    let channel = starling_proto::transport::endpoint(&dep.control_url(), &dep.transport())
        .expect("control URL")
        .local_address(Some(IpAddr::V4(ip)))
        .connect()
        .await
        .expect("viewer channel");
    let own_key = HolderKey::generate().expect("key");
    let thief = ViewerServiceClient::new(channel)
        .join(JoinRequest {
            holder_key: own_key.public_key().to_vec(),
            broadcast_id: bid.clone(),
            credential: issuer.viewer("thief", &bid),
            client_version: "harvest-test-relay".into(),
            peer_addr: listen_addr.to_string(),
            upload_kbps: 8 * stream_kbps,
            mac_tickets: false,
            host_addr: String::new(),
        })
        .await
        .expect("malicious relay joins")
        .into_inner();
    let dp_addr = thief.dataplane_wire_addr.clone();
    println!("malicious relay: peer {} at {listen_addr}", thief.peer_id);

    // The child: a real SDK viewer that relays nothing; its parent is the thief.
    let child = tokio::spawn({
        let vc = viewer_config(&dep, issuer.viewer("child", &bid), None, 0);
        async move { Viewer::join(vc).await }
    });
    // The thief takes the child's link: its HELLO token, then (over the data plane's
    // nonce, relayed as the thief's own) the child's PROOF.
    let (s, _) = tokio::time::timeout(GUARD, listener.accept())
        .await
        .expect("the child never dialled its parent")
        .expect("accept");
    let mut from_child = RawConn::new(s);
    let harvested = match next(&mut from_child).await {
        Some(Frame::Hello(h)) => h.token,
        other => panic!("expected the child's HELLO, got {other:?}"),
    };
    let (to_dp, dp_nonce) = hello(&dp_addr, Role::Viewer, &harvested).await;
    from_child
        .send(&Frame::HelloAck(HelloAck {
            version: wire::PROTOCOL_VERSION,
            nonce: dp_nonce,
        }))
        .await
        .expect("HELLO_ACK to the child");
    let child_proof: [u8; 64] = match next(&mut from_child).await {
        Some(Frame::Proof(p)) => p.as_ref().try_into().expect("64 bytes"),
        other => panic!("expected the child's PROOF, got {other:?}"),
    };
    // The thief drops the child (who re-searches and plays on without it).
    let _ = from_child
        .send(&Frame::Error(Reason {
            code: ErrorCode::ServerBusy,
            message: "gone".into(),
        }))
        .await;
    drop(from_child);
    drop(listener);

    let child = child.await.expect("join task").expect("child joins");
    let child_id = child.peer_id().expect("child peer id");
    let claims = starling_proto::token::peek_unverified(&harvested)
        .expect("a token")
        .1;
    assert_eq!(
        claims.peer_id, child_id,
        "the thief holds the child's token"
    );

    // 1. The data plane: the child's proof (right nonce, wrong verifier), the thief's
    //    own key, no proof.
    let r = present(to_dp, &bid, Some(child_proof)).await;
    assert_eq!(r.code, ErrorCode::Unauthorized, "{r:?}");
    assert!(r.message.starts_with("bad_proof"), "{r:?}");
    let (c, n) = hello(&dp_addr, Role::Viewer, &harvested).await;
    let own = own_key.prove(&n, &harvested, Verifier::DataPlane);
    let r = present(c, &bid, Some(own)).await;
    assert!(
        r.code == ErrorCode::Unauthorized && r.message.starts_with("bad_proof"),
        "{r:?}"
    );
    let (c, _) = hello(&dp_addr, Role::Viewer, &harvested).await;
    let r = present(c, &bid, None).await;
    assert!(
        r.code == ErrorCode::Unauthorized && r.message.starts_with("no_proof"),
        "{r:?}"
    );

    // 2. An honest relaying viewer: the child's proof replayed, the thief's own key
    //    (for that relay's peer id), no proof.
    let relay = Viewer::join(viewer_config(
        &dep,
        issuer.viewer("relay", &bid),
        Some(IpAddr::V4(peer_ip(10))),
        4_000,
    ))
    .await
    .expect("honest relay joins");
    let relay_id = relay.peer_id().expect("relay peer id");
    let relay_addr = relay.peer_addr().expect("relay listens").to_string();
    let refused_before = relay.stats().peers_refused;
    let (c, _) = hello(&relay_addr, Role::Peer, &harvested).await;
    let r = present(c, &bid, Some(child_proof)).await;
    assert!(
        r.code == ErrorCode::Unauthorized && r.message.starts_with("bad_proof"),
        "{r:?}"
    );
    let (c, n) = hello(&relay_addr, Role::Peer, &harvested).await;
    let own = own_key.prove(&n, &harvested, Verifier::Peer(relay_id));
    let r = present(c, &bid, Some(own)).await;
    assert!(
        r.code == ErrorCode::Unauthorized && r.message.starts_with("bad_proof"),
        "{r:?}"
    );
    let (c, _) = hello(&relay_addr, Role::Peer, &harvested).await;
    let r = present(c, &bid, None).await;
    assert!(
        r.code == ErrorCode::Unauthorized && r.message.starts_with("no_proof"),
        "{r:?}"
    );
    let s = wait_for("the relay to count the refusals", &relay, |s| {
        s.peers_refused >= refused_before + 3
    })
    .await;
    println!("honest relay: {s}");

    // 3. The child plays on, and keeps doing so.
    let s = wait_for("the child to play", &child, |s| s.chunks_played >= 5).await;
    let played = s.chunks_played;
    wait_for("the child to keep playing", &child, |s| {
        s.chunks_played >= played + 5
    })
    .await;
    let s = relay.stats();
    assert!(s.chunks_played > 0, "the honest relay plays: {s}");

    // The data plane counted every refusal by reason
    // (`starling_dataplane_token_rejections_total{reason}`).
    let m = dep
        .node()
        .expect("in-process data plane")
        .registry()
        .metrics();
    assert_eq!(m.token_rejections("bad_proof"), 2);
    assert_eq!(m.token_rejections("no_proof"), 1);

    child.leave().await.expect("child leaves");
    relay.leave().await.expect("relay leaves");
    dep.shutdown().await;
}
