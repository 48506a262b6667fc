//! Issue 13, item 6: slot squatting. A viewer that holds a valid chunk token (it joined
//! like anyone else) dials a relaying viewer it was not assigned to and subscribes to
//! the whole stream. Before parent tickets it was admitted and took the relay's slots
//! (up to twice its budget); now:
//!
//! * without a ticket, or with another child's ticket, it is refused with
//!   `ERROR(UNAUTHORIZED)`; a ticket for some substreams does not admit more;
//! * with its own genuine tickets (the control plane assigned it there) it is admitted
//!   for exactly those substreams;
//! * a second link of one peer id, and the 9th connection from one address, are
//!   refused with `ERROR(SERVER_BUSY)`;
//! * the relay's real children keep receiving from it throughout.
//!
//! Real control plane, data plane and SDK viewers in-process; the attacker is written
//! here with the raw wire codec. Nothing asserts on wall-clock time: waits poll
//! counters and give up after generous deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a panic

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use common::{DialError, RawConn, init_tracing, raw_holder};
use starling_loadtest::{Deployment, DeploymentConfig, peer_ip};
use starling_proto::holder::Verifier;
use starling_proto::v1::JoinRequest;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::wire::{
    self, ErrorCode, Frame, Hello, Reason, Role, StartAt, StreamInfo, Subscribe,
};
use starling_sdk::{Stats, Viewer, ViewerConfig};

/// Give-up bound for every wait (never a pass/fail threshold).
const GUARD: Duration = Duration::from_secs(60);

fn viewer_config(dep: &Deployment, listen: Option<IpAddr>, upload_kbps: u32) -> ViewerConfig {
    let mut vc = ViewerConfig::new(dep.broadcast_id());
    vc.control_url = dep.control_url();
    vc.transport = dep.transport();
    vc.http_listen = None;
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

/// A viewer joined over raw gRPC: its token, peer id and parent tickets.
struct Joined {
    peer_id: u64,
    token: Bytes,
    /// (substream, parent peer id, ticket)
    tickets: Vec<(u32, u64, Bytes)>,
}

async fn join_raw(dep: &Deployment) -> Joined {
    let mut vs = ViewerServiceClient::new(dep.channel().await.expect("viewer client"));
    let j = vs
        .join(JoinRequest {
            holder_key: raw_holder().public_key().to_vec(),
            broadcast_id: dep.broadcast_id().into(),
            credential: String::new(),
            client_version: "squatting-test".into(),
            peer_addr: String::new(),
            upload_kbps: 0,
            mac_tickets: false,
            host_addr: String::new(),
        })
        .await
        .expect("join")
        .into_inner();
    Joined {
        peer_id: j.peer_id,
        token: Bytes::from(j.chunk_token),
        tickets: j
            .parents
            .into_iter()
            .filter_map(|p| {
                let parent = p.peer?.peer_id;
                Some((p.substream, parent, Bytes::from(p.ticket)))
            })
            .collect(),
    }
}

/// `HELLO(peer)`, `TICKET`s, `SUBSCRIBE(mask)`; `Ok` with the link on `STREAM_INFO`.
async fn dial(
    addr: &str,
    relay_id: u64,
    broadcast: &str,
    token: &Bytes,
    tickets: &[Bytes],
    mask: u64,
) -> Result<(RawConn, StreamInfo), DialError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| DialError::Io(e.to_string()))?;
    let mut c = RawConn::new(stream);
    c.send(&Frame::Hello(Hello {
        min_version: wire::MIN_PROTOCOL_VERSION,
        max_version: wire::PROTOCOL_VERSION,
        role: Role::Peer,
        token: token.clone(),
    }))
    .await
    .map_err(|e| DialError::Io(e.to_string()))?;
    // HELLO_ACK's nonce, answered with the PROOF of the token's key; a refusal of the
    // HELLO itself is the answer.
    let ack = tokio::time::timeout(GUARD, async {
        loop {
            match c.next().await {
                Ok(Some(Frame::Ping(_) | Frame::Pong(_))) => {}
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| DialError::Io("no HELLO_ACK".into()))?;
    let nonce = match ack {
        Ok(Some(Frame::HelloAck(a))) => a.nonce,
        Ok(Some(Frame::Error(r) | Frame::Goodbye(r))) => return Err(DialError::Refused(r)),
        other => return Err(DialError::Protocol(format!("{other:?}"))),
    };
    let proof = raw_holder().prove(&nonce, token, Verifier::Peer(relay_id));
    let mut frames = vec![Frame::Proof(Bytes::copy_from_slice(&proof))];
    frames.extend(tickets.iter().map(|t| Frame::Ticket(t.clone())));
    frames.push(Frame::Subscribe(Subscribe {
        broadcast_id: broadcast.into(),
        start: StartAt::Live,
        substream_mask: mask,
    }));
    for f in &frames {
        // A relay refuses as soon as it knows (on HELLO or on a TICKET) and closes: a
        // later frame may then meet a closed socket. The refusal it wrote first is
        // still ours to read below.
        if c.send(f).await.is_err() {
            break;
        }
    }
    let answer = tokio::time::timeout(GUARD, async {
        loop {
            match c.next().await {
                Ok(Some(Frame::HelloAck(_) | Frame::Ping(_) | Frame::Pong(_))) => {}
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| DialError::Io("no answer".into()))?;
    match answer {
        Ok(Some(Frame::StreamInfo(i))) => Ok((c, i)),
        Ok(Some(Frame::Error(r) | Frame::Goodbye(r))) => Err(DialError::Refused(r)),
        other => Err(DialError::Protocol(format!("{other:?}"))),
    }
}

fn refused(r: Result<(RawConn, StreamInfo), DialError>) -> Reason {
    match r {
        Err(DialError::Refused(r)) => r,
        Ok((_, info)) => panic!("admitted: {info:?}"),
        Err(e) => panic!("not refused with a reason: {e:?}"),
    }
}

/// Reads the link until a chunk arrives (a keep-alive PING is answered).
async fn first_chunk(c: &mut RawConn) -> u64 {
    tokio::time::timeout(GUARD, async {
        loop {
            match c.next().await {
                Ok(Some(Frame::Chunk(ch))) => return ch.seq,
                Ok(Some(Frame::Ping(n))) => c.send(&Frame::Pong(n)).await.unwrap(),
                Ok(Some(Frame::Error(r) | Frame::Goodbye(r))) => panic!("closed: {r:?}"),
                Ok(Some(_)) => {}
                other => panic!("link ended: {other:?}"),
            }
        }
    })
    .await
    .expect("a chunk on the admitted link")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_admits_only_ticketed_children_and_caps_links_per_peer_and_address() {
    init_tracing();
    let dep = Deployment::start(DeploymentConfig::default())
        .await
        .expect("deployment");
    let bid = dep.broadcast_id().to_string();
    let k = dep.config().substreams;
    let full = (1u64 << k) - 1;

    // The relay: room for several whole-stream children. Its real children relay
    // nothing, so the relay is the only peer with slots: their parents.
    let relay = Viewer::join(viewer_config(&dep, Some(IpAddr::V4(peer_ip(10))), 4_000))
        .await
        .expect("relay joins");
    let relay_id = relay.peer_id().expect("relay peer id");
    let relay_addr = relay.peer_addr().expect("relay listens").to_string();
    let mut children = Vec::new();
    for _ in 0..2 {
        children.push(
            Viewer::join(viewer_config(&dep, None, 0))
                .await
                .expect("child joins"),
        );
    }
    wait_for("the relay's two real children", &relay, |s| s.children >= 2).await;
    for c in &children {
        wait_for("a child fed by the relay", c, |s| {
            s.bytes_from_peers > 0 && s.chunks_played > 0
        })
        .await;
    }
    let before = relay.stats();

    // The attackers joined like anyone (valid tokens) but SUBSCRIBE where they please.
    let a = join_raw(&dep).await;
    let b = join_raw(&dep).await;
    println!(
        "relay: peer {relay_id}; attackers A: peer {}, B: peer {}",
        a.peer_id, b.peer_id
    );

    // 1. No ticket: UNAUTHORIZED (before tickets: STREAM_INFO, and the slots taken).
    let r = refused(dial(&relay_addr, relay_id, &bid, &a.token, &[], full).await);
    assert_eq!(r.code, ErrorCode::Unauthorized, "{r:?}");
    assert!(r.message.starts_with("ticket_missing"), "{r:?}");

    // 2. Another child's genuine ticket does not help.
    let b_tickets: Vec<Bytes> = b
        .tickets
        .iter()
        .filter(|(_, p, _)| *p == relay_id)
        .map(|(_, _, t)| t.clone())
        .collect();
    assert!(!b_tickets.is_empty(), "B got no ticket for the relay");
    let r = refused(dial(&relay_addr, relay_id, &bid, &a.token, &b_tickets, full).await);
    assert_eq!(r.code, ErrorCode::Unauthorized, "{r:?}");
    assert!(r.message.starts_with("ticket_wrong_child"), "{r:?}");

    // 3. A's own tickets admit it for exactly the substreams the control plane
    // assigned it at the relay; asking for more than they cover is refused.
    let mine: Vec<(u32, Bytes)> = a
        .tickets
        .iter()
        .filter(|(_, p, _)| *p == relay_id)
        .map(|(s, _, t)| (*s, t.clone()))
        .collect();
    assert!(!mine.is_empty(), "A got no ticket for the relay");
    let mask = mine.iter().fold(0u64, |m, (s, _)| m | (1 << s));
    // One ticket per parent covers every substream it serves the child (the same
    // ticket on each of those substreams' entries): the distinct ones.
    let mut tickets: Vec<Bytes> = Vec::new();
    for (_, t) in &mine {
        if !tickets.contains(t) {
            tickets.push(t.clone());
        }
    }
    // Refusals the relay must count: no ticket, a wrong child's ticket, a second link
    // per peer id, and the ones below that depend on the assignment.
    let mut must_refuse = 3;
    if mask != full {
        must_refuse += 1;
        let r = refused(dial(&relay_addr, relay_id, &bid, &a.token, &tickets, full).await);
        assert_eq!(r.code, ErrorCode::Unauthorized, "{r:?}");
    }
    // Half a ticket set covers only its half (when the control plane signed several).
    if tickets.len() > 1 {
        must_refuse += 1;
        let r = refused(dial(&relay_addr, relay_id, &bid, &a.token, &tickets[..1], mask).await);
        assert_eq!(r.code, ErrorCode::Unauthorized, "{r:?}");
    }
    let (mut genuine, _) = dial(&relay_addr, relay_id, &bid, &a.token, &tickets, mask)
        .await
        .expect("a child with genuine tickets is admitted");
    first_chunk(&mut genuine).await;
    // Its children: the two real ones and A's genuine link, nobody else.
    wait_for("three children at the relay", &relay, |s| s.children == 3).await;

    // 4. One link per peer id: a second one (even as a mere neighbour) is refused.
    let r = refused(dial(&relay_addr, relay_id, &bid, &a.token, &[], 0).await);
    assert_eq!(r.code, ErrorCode::ServerBusy, "{r:?}");
    // B, another peer id, may be a neighbour (mask 0 needs a token, no ticket).
    let (_b_neighbour, _) = dial(&relay_addr, relay_id, &bid, &b.token, &[], 0)
        .await
        .expect("a neighbour with a valid token is admitted");

    // 5. Per address: 8 connections from 127.0.0.2 are accepted (they wait in the
    // handshake), the 9th is refused at once.
    let from: SocketAddr = "127.0.0.2:0".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(from).unwrap();
        held.push(s.connect(relay_addr.parse().unwrap()).await.unwrap());
    }
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(from).unwrap();
    let mut ninth = RawConn::new(s.connect(relay_addr.parse().unwrap()).await.unwrap());
    match tokio::time::timeout(GUARD, ninth.next())
        .await
        .expect("answer")
    {
        Ok(Some(Frame::Error(r))) => assert_eq!(r.code, ErrorCode::ServerBusy, "{r:?}"),
        other => panic!("the 9th connection from one address: {other:?}"),
    }
    // An honest peer from another address still gets in (B's neighbour link above
    // came from 127.0.0.1; so do the real children).

    // The relay's real children kept receiving from it throughout.
    for c in &children {
        let s0 = c.stats();
        wait_for("the children keep receiving from the relay", c, |s| {
            s.chunks_played >= s0.chunks_played + 20 && s.bytes_from_peers > s0.bytes_from_peers
        })
        .await;
    }
    let after = relay.stats();
    println!("relay before the attack: {before}\nrelay after: {after}");
    assert!(after.peers_refused >= must_refuse, "{must_refuse}: {after}");
    // No squatter among them (A's genuine link may have timed out by now: it sent
    // nothing since).
    assert!((2..=3).contains(&after.children), "{after}");

    drop(held);
    drop(genuine);
    for c in children {
        c.leave().await.unwrap();
    }
    relay.leave().await.unwrap();
    dep.shutdown().await;
}
