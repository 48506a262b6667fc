//! Hostile clients on the wire and HTTP ports cannot hurt anyone else (real loopback
//! sockets; the source is a raw byte stream, no ffmpeg needed): one handshake deadline from accept to subscribed, caps on
//! connections not yet subscribed (node-wide and per source address) and on all
//! connections per source address, `REQUEST`s and `TOKEN` renewals rate-limited per
//! connection. Each test plays the attack while an honest viewer from another
//! loopback address (127.0.0.x: every 127/8 address is local on Linux) keeps receiving
//! every chunk in order.
//!
//! No wall-clock assertion: deadlines are only "give up" bounds, and a close is checked
//! to have happened after the configured deadline, never how soon after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use common::*;
use starling_dataplane::limits::Refused;
use starling_dataplane::metrics::{CloseReason, Listener};
use starling_dataplane::{Config, Node, RateLimit, StaticBroadcast, TokenKey};
use starling_proto::token::{TokenSigner, generate_pkcs8};
use starling_proto::wire::{self, ErrorCode, Frame, Hello, Role, StartAt, Subscribe};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Give-up bound for anything the node must do "at once" or "at the deadline".
const GIVE_UP: Duration = Duration::from_secs(60);

/// Source rate, bytes per second (1 Mbit/s).
const RATE: usize = 128 << 10;

/// Serves an endless `application/octet-stream` at [`RATE`] to every connection (the
/// chunker cuts it by time: every chunk is a random-access point).
fn start_raw_source() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = l.local_addr()?;
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut req = [0u8; 2048];
                let _ = conn.read(&mut req);
                let head = b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n";
                if conn.write_all(head).is_err() {
                    return;
                }
                let piece = vec![b'.'; 4 * 1024];
                let start = Instant::now();
                let mut sent = 0usize;
                loop {
                    if conn.write_all(&piece).is_err() {
                        return;
                    }
                    sent += piece.len();
                    let due = Duration::from_secs_f64(sent as f64 / RATE as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            });
        }
    });
    Ok(a)
}

/// A node with `cores` executors ingesting the raw source as `test` (500 ms chunks),
/// with `f` applied to its config; returns once chunks are in the window.
fn raw_node(cores: usize, f: impl FnOnce(&mut Config)) -> Result<Node> {
    let src = start_raw_source()?;
    let sb: StaticBroadcast = format!("test=http://{src}/live")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let mut cfg = config(vec![sb], cores);
    cfg.static_chunk_ms = 500;
    f(&mut cfg);
    let node = Node::start(cfg)?;
    wait_for("chunks", || {
        node.status("test").is_some_and(|s| s.chunks_in_window >= 2)
    })?;
    Ok(node)
}

fn lo(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, d))
}

/// A TCP connection to `addr` from the local address `from` (any port).
fn connect_from(from: IpAddr, addr: SocketAddr) -> Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(from, 0).into())?;
    sock.connect(&addr.into())?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

fn hello(token: Bytes) -> Frame {
    Frame::Hello(Hello {
        min_version: wire::PROTOCOL_VERSION,
        max_version: wire::PROTOCOL_VERSION,
        role: Role::Viewer,
        token,
    })
}

fn subscribe(mask: u64) -> Frame {
    Frame::Subscribe(Subscribe {
        broadcast_id: "test".into(),
        start: StartAt::Live,
        substream_mask: mask,
    })
}

/// HELLO (with `token`) and SUBSCRIBE from `from`, up to STREAM_INFO.
fn viewer_from(from: IpAddr, addr: SocketAddr, mask: u64, token: Bytes) -> Result<Client> {
    let mut c = Client::from_stream(connect_from(from, addr)?)?;
    c.send(&hello(token.clone()))?;
    match c.recv()? {
        Frame::HelloAck(a) if !token.is_empty() => {
            let v = starling_proto::holder::Verifier::DataPlane;
            let proof = holder().prove(&a.nonce, &token, v);
            c.send(&Frame::Proof(Bytes::copy_from_slice(&proof)))?;
        }
        Frame::HelloAck(_) => {}
        other => bail!("expected HELLO_ACK, got {other:?}"),
    }
    c.send(&subscribe(mask))?;
    match c.recv()? {
        Frame::StreamInfo(_) => Ok(c),
        other => bail!("expected STREAM_INFO, got {other:?}"),
    }
}

/// Reads a connection the node refuses at accept (the client sent nothing, so the node
/// closes with FIN, never RST): expects `ERROR(SERVER_BUSY)`, then EOF; returns the
/// message.
fn refused_at_accept(mut s: TcpStream) -> Result<String> {
    let mut c = Client::from_stream(s.try_clone()?)?;
    let msg = match c.recv_raw()? {
        Frame::Error(r) if r.code == ErrorCode::ServerBusy => r.message,
        other => bail!("expected ERROR(SERVER_BUSY), got {other:?}"),
    };
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => Ok(msg),
        other => bail!("expected EOF after the refusal, got {other:?}"),
    }
}

/// `name{labels} value` from the node's `/metrics`.
fn sample(node: &Node, series: &str) -> Result<u64> {
    let (_, body) = http_get(node.http_addr(), "/metrics")?;
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .with_context(|| format!("no sample {series}"))?
        .trim()
        .parse()
        .context("sample value")
}

/// Attack (a): HELLO, then a PING every second, never SUBSCRIBE. Before the fix each
/// frame restarted the handshake timer, so this held a connection (and its memory)
/// forever without a token; now the whole handshake has one deadline.
#[test]
fn hello_then_pings_is_closed_at_the_handshake_deadline() -> Result<()> {
    let deadline = Duration::from_secs(3);
    let node = raw_node(1, |c| c.timeouts.handshake = deadline)?;
    let healthy = Healthy::reading(viewer_from(
        lo(2),
        node.wire_addr(),
        wire::ALL_SUBSTREAMS,
        Bytes::new(),
    )?);

    let started = Instant::now();
    let mut c = Client::from_stream(connect_from(lo(1), node.wire_addr())?)?;
    c.send(&hello(Bytes::new()))?;
    match c.recv_raw()? {
        Frame::HelloAck(_) => {}
        other => bail!("expected HELLO_ACK, got {other:?}"),
    }
    c.s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut nonce = 0u64;
    let closed_with = 'session: loop {
        if started.elapsed() > GIVE_UP {
            bail!(
                "a connection that only PINGs is still open after {GIVE_UP:?} (deadline {deadline:?})"
            );
        }
        nonce += 1;
        if c.send(&Frame::Ping(nonce)).is_err() {
            break 'session None;
        }
        // Read what comes within a second (PONGs), then PING again.
        loop {
            if let Some(f) = c.dec.decode(&mut c.buf)? {
                match f {
                    Frame::Pong(_) => continue,
                    Frame::Error(r) => break 'session Some(r),
                    other => bail!("unexpected {other:?}"),
                }
            }
            let mut tmp = [0u8; 4096];
            match c.s.read(&mut tmp) {
                Ok(0) => break 'session None,
                Ok(n) => c.buf.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break;
                }
                Err(e) => bail!("read: {e}"),
            }
        }
    };
    let elapsed = started.elapsed();
    let r = closed_with.context("closed without ERROR")?;
    assert_eq!(r.code, ErrorCode::IdleTimeout, "{r:?}");
    assert!(
        elapsed >= deadline,
        "closed after {elapsed:?}, before the {deadline:?} deadline"
    );
    eprintln!("PINGing connection closed after {elapsed:?}: {r:?}, {nonce} PINGs sent");
    let mut b = [0u8; 1];
    c.s.set_read_timeout(Some(Duration::from_secs(30)))?;
    assert!(
        matches!(c.s.read(&mut b), Ok(0) | Err(_)),
        "closed after ERROR"
    );
    let m = node.registry().metrics();
    wait_for("the close to be counted", || {
        m.closes(Listener::Wire, CloseReason::HandshakeTimeout) >= 1
    })?;
    assert_eq!(node.registry().conns().open_from(lo(1)), 0);

    // Plain HTTP: a request head trickled one header line a second is cut at the same
    // deadline with 408.
    let started = Instant::now();
    let mut h = connect_from(lo(1), node.http_addr())?;
    h.set_read_timeout(Some(Duration::from_millis(500)))?;
    h.write_all(b"GET /live/test HTTP/1.1\r\n")?;
    let mut resp = Vec::new();
    let mut i = 0;
    loop {
        if started.elapsed() > GIVE_UP {
            bail!("a trickled HTTP request head is still open after {GIVE_UP:?}");
        }
        let mut tmp = [0u8; 1024];
        match h.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&tmp[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                i += 1;
                if h.write_all(format!("X-Trickle-{i}: 1\r\n").as_bytes())
                    .is_err()
                {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= deadline);

    let n = healthy.finish(2)?;
    assert!(n >= 2, "the honest viewer received {n} chunks");
    node.shutdown();
    node.join()?;
    Ok(())
}

/// Opens `n` connections from `from`, one after the other, each sending HELLO: returns
/// those answered HELLO_ACK (held open, not subscribed) and the number refused (no
/// HELLO_ACK: `ERROR(SERVER_BUSY)` or a reset, depending on whether the HELLO reached
/// the node before it closed).
fn open_unsubscribed(from: IpAddr, addr: SocketAddr, n: usize) -> Result<(Vec<Client>, usize)> {
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        let mut c = Client::from_stream(connect_from(from, addr)?)?;
        let r = c.send(&hello(Bytes::new())).and_then(|()| c.recv_raw());
        match r {
            Ok(Frame::HelloAck(_)) => held.push(c),
            Ok(Frame::Error(e)) if e.code == ErrorCode::ServerBusy => refused += 1,
            Ok(other) => bail!("unexpected {other:?}"),
            Err(_) => refused += 1,
        }
    }
    Ok((held, refused))
}

/// Attack (b): many connections that say HELLO and never subscribe. Before the fix
/// every one was accepted and held (up to the handshake timeout, forever with PINGs);
/// now one address holds at most `max_unauthenticated_per_address` of them and the
/// node at most `max_unauthenticated`, the excess is refused at accept with
/// `ERROR(SERVER_BUSY)`, and honest viewers from other addresses connect, subscribe
/// and receive every chunk.
#[test]
fn unsubscribed_connections_are_capped_per_address_and_per_node() -> Result<()> {
    let node = raw_node(2, |c| {
        // Long enough that the held connections stay for the whole test.
        c.timeouts.handshake = Duration::from_secs(600);
        c.limits.max_unauthenticated = 6;
        c.limits.max_unauthenticated_per_address = 4;
    })?;
    let m = node.registry().metrics();
    let healthy = Healthy::reading(viewer_from(
        lo(2),
        node.wire_addr(),
        wire::ALL_SUBSTREAMS,
        Bytes::new(),
    )?);

    // One address: 4 held, the other 6 refused.
    let (held_a, refused_a) = open_unsubscribed(lo(1), node.wire_addr(), 10)?;
    assert_eq!(
        (held_a.len(), refused_a),
        (4, 6),
        "one address holds at most 4 unsubscribed connections"
    );
    assert_eq!(
        m.refusals(Listener::Wire, Refused::AddressUnauthenticated),
        6
    );
    // What a refused client sees: ERROR(SERVER_BUSY), then a clean close.
    let msg = refused_at_accept(connect_from(lo(1), node.wire_addr())?)?;
    assert!(msg.contains("from this address"), "{msg}");

    // An honest viewer from another address still gets in and is served.
    let honest = Healthy::reading(viewer_from(
        lo(4),
        node.wire_addr(),
        wire::ALL_SUBSTREAMS,
        Bytes::new(),
    )?);

    // A second address fills the node-wide cap: 2 more held (6 in all), 8 refused.
    let (held_b, refused_b) = open_unsubscribed(lo(3), node.wire_addr(), 10)?;
    assert_eq!((held_b.len(), refused_b), (2, 8), "node-wide cap of 6");
    assert!(m.refusals(Listener::Wire, Refused::Unauthenticated) >= 8);
    assert_eq!(node.registry().conns().unauthenticated(), 6);
    let msg = refused_at_accept(connect_from(lo(5), node.wire_addr())?)?;
    assert!(msg.contains("on this node"), "{msg}");

    // The subscribed viewers never noticed.
    let n = healthy.finish(2)?;
    assert!(n >= 2);
    let n = honest.finish(2)?;
    assert!(n >= 2);

    // Closing the held connections frees their places.
    drop(held_a);
    drop(held_b);
    wait_for("the held connections to be released", || {
        node.registry().conns().unauthenticated() == 0
    })?;
    // (A scrape is an unauthenticated HTTP connection too: it had to wait until now,
    // and it counts itself.)
    assert_eq!(
        sample(&node, "starling_dataplane_unauthenticated_connections")?,
        1
    );
    assert_eq!(
        sample(
            &node,
            "starling_dataplane_connections_refused_total{listener=\"wire\",reason=\"unauthenticated\"}"
        )?,
        m.refusals(Listener::Wire, Refused::Unauthenticated)
    );
    let (held, refused) = open_unsubscribed(lo(1), node.wire_addr(), 4)?;
    assert_eq!((held.len(), refused), (4, 0));
    node.shutdown();
    node.join()?;
    Ok(())
}

/// Attack (c): one address opening more connections than the per-address cap, even
/// subscribed ones (public broadcast: no token needed). Before the fix there was no
/// such cap (the extra connection was accepted and, sending nothing, waited for its
/// handshake timeout); now it is refused at accept on both ports.
#[test]
fn connections_per_address_are_capped() -> Result<()> {
    let node = raw_node(1, |c| c.limits.max_per_address = 3)?;
    let healthy = Healthy::reading(viewer_from(
        lo(2),
        node.wire_addr(),
        wire::ALL_SUBSTREAMS,
        Bytes::new(),
    )?);

    let mut mine: Vec<Client> = (0..3)
        .map(|_| viewer_from(lo(5), node.wire_addr(), wire::ALL_SUBSTREAMS, Bytes::new()))
        .collect::<Result<_>>()?;
    let msg = refused_at_accept(connect_from(lo(5), node.wire_addr())?)?;
    assert!(msg.contains("from this address"), "{msg}");
    // The HTTP port counts against the same cap.
    let mut h = connect_from(lo(5), node.http_addr())?;
    h.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut resp = String::new();
    let _ = h.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    let m = node.registry().metrics();
    assert_eq!(m.refusals(Listener::Wire, Refused::Address), 1);
    assert_eq!(m.refusals(Listener::Http, Refused::Address), 1);

    // The address's own viewers are served, and so is everyone else.
    for c in &mut mine {
        next_chunk(c)?;
    }
    let other = viewer_from(lo(6), node.wire_addr(), wire::ALL_SUBSTREAMS, Bytes::new())?;
    drop(other);

    // One of them leaves: the address may connect again.
    mine.pop();
    wait_for("the closed connection to be released", || {
        node.registry().conns().open_from(lo(5)) == 2
    })?;
    let mut again = viewer_from(lo(5), node.wire_addr(), wire::ALL_SUBSTREAMS, Bytes::new())?;
    next_chunk(&mut again)?;

    let n = healthy.finish(2)?;
    assert!(n >= 2);
    node.shutdown();
    node.join()?;
    Ok(())
}

/// Attack (d1): a subscribed connection flooding REQUESTs for chunks in the window
/// (16 bytes in, a whole chunk out). Before the fix every one was answered with the
/// chunk; now beyond the connection's bucket (burst 20, then 10/s here) they are
/// answered `NOT_FOUND(seq)`, in order, and the flooder's served chunks are bounded by
/// the rate over the time it took, while an honest viewer receives every chunk.
#[test]
fn request_flood_is_rate_limited() -> Result<()> {
    let (burst, per_sec) = (20u64, 10u64);
    let node = raw_node(1, |c| {
        c.limits.requests = RateLimit::per_second(per_sec as u32, burst as u32);
        c.timeouts.write_stall = Duration::from_secs(60);
    })?;
    let healthy = Healthy::reading(viewer_from(
        lo(2),
        node.wire_addr(),
        wire::ALL_SUBSTREAMS,
        Bytes::new(),
    )?);
    let b = node.registry().get("test").context("broadcast")?;

    // A request-only link (mask 0) asking for the newest chunk 400 times.
    let mut c = viewer_from(lo(1), node.wire_addr(), 0, Bytes::new())?;
    let seq = b.newest_seq().context("a chunk")?;
    let n = 400u64;
    let mut reqs = Vec::new();
    for _ in 0..n {
        reqs.extend_from_slice(&wire::encode_to_bytes(&Frame::Request(seq))?);
    }
    let started = Instant::now();
    c.s.write_all(&reqs)?;
    let (mut served, mut not_found) = (0u64, 0u64);
    while served + not_found < n {
        match c.recv()? {
            Frame::Chunk(ch) => {
                assert_eq!(ch.seq, seq);
                served += 1;
            }
            Frame::NotFound(s) => {
                assert_eq!(s, seq);
                not_found += 1;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!("request flood: {served} served, {not_found} NOT_FOUND in {elapsed:?}");
    // The node's bucket ran within the client's measured interval.
    let bound = burst + per_sec * elapsed.as_secs() + per_sec;
    assert!(
        served <= bound,
        "{served} of {n} requests served in {elapsed:?} (bound {bound})"
    );
    assert!(not_found >= 1);
    let m = node.registry().metrics();
    assert_eq!(
        m.requests_rate_limited() + m.requests_not_found(),
        not_found
    );
    assert!(m.requests_rate_limited() >= 1);
    assert_eq!(
        sample(
            &node,
            "starling_dataplane_requests_total{result=\"rate_limited\"}"
        )?,
        m.requests_rate_limited()
    );
    // The flooder is not cut off: at the rate it is served again.
    c.send(&Frame::Ping(7))?;
    loop {
        if let Frame::Pong(7) = c.recv_raw()? {
            break;
        }
    }

    let got = healthy.finish(2)?;
    assert!(got >= 2);
    node.shutdown();
    node.join()?;
    Ok(())
}

fn signer(key_id: u32) -> TokenSigner {
    TokenSigner::new(key_id, &generate_pkcs8().unwrap()).unwrap()
}

/// Attack (d2): a subscribed connection flooding valid `TOKEN` renewals (one Ed25519
/// check each). Before the fix every one was verified and the connection stayed;
/// now beyond its bucket (burst 4, then 6 a minute here) it is closed with
/// `ERROR(SERVER_BUSY)`, while an honest viewer receives every chunk.
#[test]
fn token_renewal_flood_closes_the_connection() -> Result<()> {
    let s = signer(7);
    let node = raw_node(1, |c| {
        c.static_public = false;
        c.token_keys = vec![TokenKey {
            key_id: s.key_id(),
            ed25519: s.public_key(),
        }];
        c.limits.token_renewals = RateLimit::per_minute(6, 4);
    })?;
    let healthy = Healthy::reading(viewer_from(
        lo(2),
        node.wire_addr(),
        wire::ALL_SUBSTREAMS,
        play_token(&s, "test", 1, 600_000),
    )?);
    let m = node.registry().metrics();

    let mut c = viewer_from(
        lo(1),
        node.wire_addr(),
        0,
        play_token(&s, "test", 2, 600_000),
    )?;
    let started = Instant::now();
    let mut sent = 0u64;
    // One TOKEN at a time, each processed before the next is sent (so the node's
    // receive queue is empty when it closes: FIN, not RST, and the ERROR is readable).
    let closed = loop {
        if sent >= 50 {
            break false;
        }
        let before = m.token_renewals();
        c.send(&Frame::Token(play_token(&s, "test", 2, 600_000)))?;
        sent += 1;
        wait_for("the renewal to be processed", || {
            m.token_renewals() > before || m.closes(Listener::Wire, CloseReason::RateLimited) >= 1
        })?;
        if m.closes(Listener::Wire, CloseReason::RateLimited) >= 1 {
            break true;
        }
    };
    let elapsed = started.elapsed();
    assert!(
        closed,
        "{sent} TOKEN renewals in {elapsed:?} accepted without closing the connection"
    );
    let renewed = m.token_renewals();
    eprintln!("token flood: closed after {sent} TOKENs ({renewed} renewed) in {elapsed:?}");
    assert!(
        renewed <= 4 + elapsed.as_secs() / 10 + 1,
        "{renewed} renewals"
    );
    match c.recv()? {
        Frame::Error(r) => {
            assert_eq!(r.code, ErrorCode::ServerBusy);
            assert!(r.message.starts_with("token_renewal_rate"), "{}", r.message);
        }
        other => bail!("expected ERROR(SERVER_BUSY), got {other:?}"),
    }
    assert!(c.recv_raw().is_err(), "closed after the ERROR");
    assert_eq!(
        sample(
            &node,
            "starling_dataplane_connections_closed_total{listener=\"wire\",reason=\"rate_limited\"}"
        )?,
        1
    );

    let got = healthy.finish(2)?;
    assert!(got >= 2);
    node.shutdown();
    node.join()?;
    Ok(())
}
