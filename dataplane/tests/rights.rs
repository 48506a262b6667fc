//! Rights and integrity on a standalone node (real loopback sockets; needs ffmpeg):
//! signed chunks on every path, chunk-token checks on the wire and over HTTP, token
//! renewal and expiry, revocation across executors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Result, bail};
use bytes::Bytes;
use common::*;
use starling_dataplane::{Config, Node, TokenKey};
use starling_proto::token::{Scopes, TokenClaims, TokenSigner, generate_pkcs8};
use starling_proto::wire::{self, ErrorCode, Frame, StartAt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn signer(key_id: u32) -> TokenSigner {
    TokenSigner::new(key_id, &generate_pkcs8().unwrap()).unwrap()
}

/// A node whose static broadcast `test` requires tokens signed by `s`.
fn private_node(cores: usize, s: &TokenSigner, f: impl FnOnce(&mut Config)) -> Node {
    let (node, _src) = node_with(cores, |c| {
        c.static_public = false;
        c.token_keys = vec![TokenKey {
            key_id: s.key_id(),
            ed25519: s.public_key(),
        }];
        f(c);
    });
    wait_for("chunks", || {
        node.status("test").is_some_and(|s| s.chunks_in_window >= 1)
    })
    .unwrap();
    node
}

fn stream_info(c: &mut Client) -> Result<wire::StreamInfo> {
    match c.recv()? {
        Frame::StreamInfo(i) => Ok(i),
        other => bail!("expected STREAM_INFO, got {other:?}"),
    }
}

/// Connects with `token` and expects `ERROR(code)`; returns its message.
fn refused(addr: SocketAddr, token: Bytes, code: ErrorCode) -> Result<String> {
    let mut c = Client::handshake_token(addr, "test", StartAt::Live, wire::ALL_SUBSTREAMS, token)?;
    match c.recv()? {
        Frame::Error(r) if r.code == code => Ok(r.message),
        other => bail!("expected ERROR({code:?}), got {other:?}"),
    }
}

#[test]
fn every_pushed_and_requested_chunk_is_signed() -> Result<()> {
    let (node, _src) = node_with(2, |_| {});
    let v = chunk_verifier(&node, "test");
    let mut c = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    stream_info(&mut c)?;
    let mut pushed = Vec::new();
    for _ in 0..4 {
        let ch = next_chunk(&mut c)?;
        verify_chunk(&v, &ch)?;
        pushed.push(ch);
    }
    // REQUEST answers carry the same signature block (and payload).
    for p in &pushed {
        c.send(&Frame::Request(p.seq))?;
        let answer = loop {
            let ch = next_chunk(&mut c)?;
            verify_chunk(&v, &ch)?;
            if ch.seq == p.seq {
                break ch;
            }
        };
        assert_eq!(answer.signature, p.signature);
        assert_eq!(answer.payload, p.payload);
    }
    // A tampered payload fails (the test's verification is not vacuous).
    let mut bad = pushed[0].clone();
    let mut payload = bad.payload.to_vec();
    payload[200] ^= 1;
    bad.payload = Bytes::from(payload);
    assert!(verify_chunk(&v, &bad).is_err());

    // A receiver-specific DISCONTINUITY (resume outside the window) still verifies once
    // the flag is cleared, as PROTOCOL.md says verifiers do.
    let mut r = Client::handshake(node.wire_addr(), "test", StartAt::Seq(1 << 40))?;
    stream_info(&mut r)?;
    let first = next_chunk(&mut r)?;
    assert!(first.flags & wire::chunk_flags::DISCONTINUITY != 0);
    verify_chunk(&v, &first)?;
    // Substream (masked) pushes are signed too.
    let mut k = Client::handshake_mask(node.wire_addr(), "test", StartAt::Live, 0b0101)?;
    stream_info(&mut k)?;
    for _ in 0..2 {
        verify_chunk(&v, &next_chunk(&mut k)?)?;
    }

    // Cost of signing, from the node's own counters (hash + Ed25519 per chunk).
    let (n, ns) = node.registry().metrics().chunks_signed();
    assert!(n >= 4, "{n} chunks signed");
    let (_, metrics) = http_get(node.http_addr(), "/metrics")?;
    assert!(metrics.contains("starling_dataplane_chunks_signed_total "));
    let bytes: u64 = node
        .registry()
        .get("test")
        .map_or(0, |b| b.bytes_ingested());
    let chunks = node
        .registry()
        .get("test")
        .map_or(1, |b| b.chunks_ingested());
    eprintln!(
        "chunk signing: {n} chunks, {:.1} us per chunk on average (avg chunk {} bytes; this build's opt level)",
        ns as f64 / n as f64 / 1e3,
        bytes / chunks.max(1)
    );
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn private_broadcast_refuses_missing_and_bad_tokens() -> Result<()> {
    let s = signer(7);
    let node = private_node(1, &s, |_| {});
    let addr = node.wire_addr();
    let now = now_ms();

    let msg = refused(addr, Bytes::new(), ErrorCode::Unauthorized)?;
    assert!(msg.starts_with("missing:"), "{msg}");
    // Same key id, another key: forged.
    let forged = play_token(&signer(7), "test", 1, 60_000);
    let msg = refused(addr, forged, ErrorCode::Unauthorized)?;
    assert!(msg.starts_with("bad_signature:"), "{msg}");
    let expired = s.sign(&TokenClaims {
        broadcast_id: "test".into(),
        peer_id: 1,
        session_id: 1,
        scopes: Scopes::PLAY,
        issued_at_ms: now - 60_000,
        expires_at_ms: now - 30_000,
        holder_key: holder().public_key(),
    })?;
    let msg = refused(addr, expired, ErrorCode::Unauthorized)?;
    assert!(msg.starts_with("expired:"), "{msg}");
    let other = play_token(&s, "other", 1, 60_000);
    let msg = refused(addr, other, ErrorCode::Unauthorized)?;
    assert!(msg.starts_with("wrong_broadcast:"), "{msg}");
    let unknown = play_token(&signer(9), "test", 1, 60_000);
    let msg = refused(addr, unknown, ErrorCode::Unauthorized)?;
    assert!(msg.starts_with("unknown_key:"), "{msg}");
    let relay_only = s.sign(&TokenClaims {
        broadcast_id: "test".into(),
        peer_id: 1,
        session_id: 1,
        scopes: Scopes::RELAY,
        issued_at_ms: now - 1000,
        expires_at_ms: now + 60_000,
        holder_key: holder().public_key(),
    })?;
    let msg = refused(addr, relay_only, ErrorCode::Unauthorized)?;
    assert!(msg.starts_with("missing_scope:"), "{msg}");
    let msg = refused(
        addr,
        Bytes::from_static(b"\x02garbage"),
        ErrorCode::Unauthorized,
    )?;
    assert!(msg.starts_with("truncated:"), "{msg}");

    // A valid token gets the stream, signed.
    let v = chunk_verifier(&node, "test");
    let mut c = Client::handshake_token(
        addr,
        "test",
        StartAt::Live,
        wire::ALL_SUBSTREAMS,
        play_token(&s, "test", 1, 60_000),
    )?;
    stream_info(&mut c)?;
    for _ in 0..2 {
        verify_chunk(&v, &next_chunk(&mut c)?)?;
    }
    // A token sent in a TOKEN frame before SUBSCRIBE replaces HELLO's (empty) one; the
    // PROOF covers the token in force at SUBSCRIBE.
    let mut c2 = Client::connect(addr)?;
    c2.send(&Frame::Hello(wire::Hello {
        min_version: wire::PROTOCOL_VERSION,
        max_version: wire::PROTOCOL_VERSION,
        role: wire::Role::Viewer,
        token: Bytes::new(),
    }))?;
    let Frame::HelloAck(ack) = c2.recv()? else {
        anyhow::bail!("expected HELLO_ACK");
    };
    let t2 = play_token(&s, "test", 2, 60_000);
    c2.send(&Frame::Token(t2.clone()))?;
    let proof = holder().prove(&ack.nonce, &t2, starling_proto::holder::Verifier::DataPlane);
    c2.send(&Frame::Proof(Bytes::copy_from_slice(&proof)))?;
    c2.send(&Frame::Subscribe(wire::Subscribe {
        broadcast_id: "test".into(),
        start: StartAt::Live,
        substream_mask: wire::ALL_SUBSTREAMS,
    }))?;
    stream_info(&mut c2)?;
    verify_chunk(&v, &next_chunk(&mut c2)?)?;

    let m = node.registry().metrics();
    for l in [
        "missing",
        "bad_signature",
        "expired",
        "wrong_broadcast",
        "unknown_key",
        "missing_scope",
        "truncated",
    ] {
        assert_eq!(m.token_rejections(l), 1, "{l}");
    }
    let (_, text) = http_get(node.http_addr(), "/metrics")?;
    assert!(
        text.contains("starling_dataplane_token_rejections_total{reason=\"bad_signature\"} 1\n")
    );
    assert!(text.contains(
        "starling_dataplane_connections_closed_total{listener=\"wire\",reason=\"unauthorized\"} 7\n"
    ));
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn token_renewal_keeps_the_connection_and_expiry_ends_it() -> Result<()> {
    let s = signer(7);
    let node = private_node(1, &s, |c| c.token_skew = Duration::from_millis(200));
    let addr = node.wire_addr();
    let ttl = 1500;
    let first_expiry = now_ms() + ttl;
    let mut renewed = Client::handshake_token(
        addr,
        "test",
        StartAt::Live,
        wire::ALL_SUBSTREAMS,
        play_token(&s, "test", 1, ttl),
    )?;
    let mut lapsing = Client::handshake_token(
        addr,
        "test",
        StartAt::Live,
        wire::ALL_SUBSTREAMS,
        play_token(&s, "test", 2, ttl),
    )?;
    stream_info(&mut renewed)?;
    stream_info(&mut lapsing)?;
    renewed.send(&Frame::Token(play_token(&s, "test", 1, 120_000)))?;

    // No renewal: GOODBYE(TOKEN_EXPIRED) once the token (+ skew) is past.
    let (is_error, r) = until_close(&mut lapsing)?;
    assert!(!is_error, "GOODBYE expected, got ERROR {r:?}");
    assert_eq!(r.code, ErrorCode::TokenExpired, "{r:?}");

    // The renewed connection keeps receiving chunks well past the first expiry.
    let mut after = 0;
    while after < 2 {
        let ch = next_chunk(&mut renewed)?;
        if now_ms() > first_expiry + 1500 {
            after += 1;
        }
        let _ = ch;
    }
    // A renewal naming another peer is refused and ends the connection.
    renewed.send(&Frame::Token(play_token(&s, "test", 3, 120_000)))?;
    let (is_error, r) = until_close(&mut renewed)?;
    assert!(is_error);
    assert_eq!(r.code, ErrorCode::Unauthorized);
    assert!(r.message.starts_with("wrong_peer:"), "{r:?}");

    let m = node.registry().metrics();
    assert_eq!(m.token_rejections("wrong_peer"), 1);
    let (_, text) = http_get(node.http_addr(), "/metrics")?;
    assert!(text.contains("starling_dataplane_token_renewals_total 1\n"));
    assert!(text.contains(
        "starling_dataplane_connections_closed_total{listener=\"wire\",reason=\"token_expired\"} 1\n"
    ));
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn revocation_closes_that_peer_everywhere_and_refuses_it() -> Result<()> {
    let s = signer(7);
    // Two executors: the revoked peer's connections are spread over both.
    let node = private_node(2, &s, |_| {});
    let addr = node.wire_addr();
    let tok1 = play_token(&s, "test", 1, 60_000);
    let mut revoked: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = Client::handshake_token(
                addr,
                "test",
                StartAt::Live,
                wire::ALL_SUBSTREAMS,
                tok1.clone(),
            )
            .unwrap();
            stream_info(&mut c).unwrap();
            c
        })
        .collect();
    let mut other = Client::handshake_token(
        addr,
        "test",
        StartAt::Live,
        wire::ALL_SUBSTREAMS,
        play_token(&s, "test", 2, 60_000),
    )?;
    stream_info(&mut other)?;

    node.revoke("test", &[1]);
    for c in &mut revoked {
        let (is_error, r) = until_close(c)?;
        assert!(!is_error);
        assert_eq!(r.code, ErrorCode::Revoked, "{r:?}");
    }
    // Everyone else keeps receiving.
    let v = chunk_verifier(&node, "test");
    for _ in 0..2 {
        verify_chunk(&v, &next_chunk(&mut other)?)?;
    }
    // Reconnecting with the revoked peer's (still valid) token is refused.
    let msg = refused(addr, tok1.clone(), ErrorCode::Revoked)?;
    assert!(msg.starts_with("revoked:"), "{msg}");
    let (head, _) = http_open(
        node.http_addr(),
        &format!("/live/test?token={}", b64(&tok1)),
        "",
    )?;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let (_, text) = http_get(node.http_addr(), "/metrics")?;
    assert!(text.contains("starling_dataplane_revocations_total 1\n"));
    assert!(
        text.contains(
            "starling_dataplane_connections_closed_total{listener=\"wire\",reason=\"revoked\"} 5\n"
        ),
        "{text}"
    );
    node.shutdown();
    node.join()?;
    Ok(())
}

/// An HTTP response body: the bytes read with the head, then the socket.
struct Body(std::io::Chain<std::io::Cursor<Vec<u8>>, TcpStream>);

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Opens `GET path` and reads the response head; returns (head, the open stream
/// positioned at the start of the body).
fn http_open(addr: SocketAddr, path: &str, headers: &str) -> Result<(String, Body)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..i]).into_owned();
            let start = got[i + 4..].to_vec();
            return Ok((head, Body(std::io::Cursor::new(start).chain(s))));
        }
    }
    bail!("no response head: {:?}", String::from_utf8_lossy(&got))
}

/// Plain HTTP cannot answer a nonce, so no chunk token opens a non-public broadcast
/// there: a relay that harvested one gains nothing by going round the wire protocol.
#[test]
fn http_cannot_open_a_private_broadcast_with_a_bound_token() -> Result<()> {
    let s = signer(7);
    let node = private_node(1, &s, |_| {});
    let http = node.http_addr();
    let (head, _) = http_open(http, "/live/test", "")?;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    let (head, _) = http_open(http, "/live/test?token=!!!", "")?;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let forged = play_token(&signer(7), "test", 1, 60_000);
    let (head, _) = http_open(http, &format!("/live/test?token={}", b64(&forged)), "")?;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let other = play_token(&s, "other", 1, 60_000);
    let (head, _) = http_open(http, &format!("/live/test?token={}", b64(&other)), "")?;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // A valid token, in the query or as a bearer token: unproven, refused.
    let tok = play_token(&s, "test", 1, 60_000);
    for (path, header) in [
        (format!("/live/test?x=1&token={}", b64(&tok)), String::new()),
        (
            "/live/test".to_owned(),
            format!("Authorization: Bearer {}\r\n", b64(&tok)),
        ),
    ] {
        let (head, mut body) = http_open(http, &path, &header)?;
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        let mut text = String::new();
        body.read_to_string(&mut text)?;
        assert!(text.contains("no_proof"), "{text}");
    }
    let (_, text) = http_get(http, "/metrics")?;
    assert!(
        text.contains("starling_dataplane_token_rejections_total{reason=\"no_proof\"} 2\n"),
        "{text}"
    );
    node.shutdown();
    node.join()?;
    Ok(())
}

/// A relay that collected a child's token presents it to the data plane: without the
/// child's key it has no valid PROOF, whatever it tries, while the child itself is
/// served. Each refusal is UNAUTHORIZED with its reason, counted by reason.
#[test]
fn a_harvested_token_is_refused_and_its_holder_served() -> Result<()> {
    use starling_proto::holder::{HolderKey, Verifier};
    let s = signer(7);
    let node = private_node(1, &s, |_| {});
    let addr = node.wire_addr();
    let child = holder();
    let token = play_token(&s, "test", 5, 60_000);
    let relay = HolderKey::generate()?;
    let relay_id = 9;

    // What the relay holds: the child's token and the PROOF the child made on its link
    // to the relay (over the relay's nonce, for the relay's peer id).
    let relay_nonce = starling_proto::holder::new_nonce()?;
    let child_proof = child.prove(&relay_nonce, &token, Verifier::Peer(relay_id));

    // The attempts, each on a fresh connection: (what, PROOF to send given the data
    // plane's nonce; None = no PROOF, expected reason).
    type Attempt<'a> = Box<dyn Fn(&[u8; 32]) -> Option<[u8; 64]> + 'a>;
    let attempts: Vec<(&str, Attempt<'_>, &str)> = vec![
        ("no proof", Box::new(|_| None), "no_proof:"),
        (
            "its own key",
            Box::new(|n| Some(relay.prove(n, &token, Verifier::DataPlane))),
            "bad_proof:",
        ),
        (
            "the child's proof to the relay, replayed",
            Box::new(|_| Some(child_proof)),
            "bad_proof:",
        ),
        (
            // The relay passes the data plane's nonce to the child as its own; the
            // child signs it for the relay (its parent), not for the data plane.
            "the data plane's nonce relayed to the child",
            Box::new(|n| Some(child.prove(n, &token, Verifier::Peer(relay_id)))),
            "bad_proof:",
        ),
    ];
    for (what, proof, reason) in &attempts {
        let mut c = Client::connect(addr)?;
        c.send(&Frame::Hello(wire::Hello {
            min_version: wire::PROTOCOL_VERSION,
            max_version: wire::PROTOCOL_VERSION,
            role: wire::Role::Viewer,
            token: token.clone(),
        }))?;
        let Frame::HelloAck(ack) = c.recv()? else {
            bail!("{what}: expected HELLO_ACK");
        };
        if let Some(p) = proof(&ack.nonce) {
            c.send(&Frame::Proof(Bytes::copy_from_slice(&p)))?;
        }
        c.send(&Frame::Subscribe(wire::Subscribe {
            broadcast_id: "test".into(),
            start: StartAt::Live,
            substream_mask: wire::ALL_SUBSTREAMS,
        }))?;
        let (is_error, r) = until_close(&mut c)?;
        assert!(is_error, "{what}: {r:?}");
        assert_eq!(r.code, ErrorCode::Unauthorized, "{what}: {r:?}");
        assert!(r.message.starts_with(reason), "{what}: {r:?}");
    }
    // The child, with its own key, is served; the refusals did not touch it.
    let v = chunk_verifier(&node, "test");
    let mut c = Client::handshake_token(
        addr,
        "test",
        StartAt::Live,
        wire::ALL_SUBSTREAMS,
        token.clone(),
    )?;
    stream_info(&mut c)?;
    verify_chunk(&v, &next_chunk(&mut c)?)?;
    // A renewal naming another holder key is refused on the child's connection...
    let foreign = s.sign(&TokenClaims {
        holder_key: relay.public_key(),
        ..starling_proto::token::peek_unverified(&token)?.1
    })?;
    c.send(&Frame::Token(foreign))?;
    let (is_error, r) = until_close(&mut c)?;
    assert!(is_error, "{r:?}");
    assert_eq!(r.code, ErrorCode::Unauthorized, "{r:?}");
    assert!(r.message.starts_with("wrong_holder:"), "{r:?}");
    // ... and a renewal with the same key keeps a connection going.
    let mut c = Client::handshake_token(
        addr,
        "test",
        StartAt::Live,
        wire::ALL_SUBSTREAMS,
        token.clone(),
    )?;
    stream_info(&mut c)?;
    c.send(&Frame::Token(play_token(&s, "test", 5, 120_000)))?;
    for _ in 0..2 {
        verify_chunk(&v, &next_chunk(&mut c)?)?;
    }

    let (_, text) = http_get(node.http_addr(), "/metrics")?;
    for (reason, n) in [("no_proof", 1), ("bad_proof", 3), ("wrong_holder", 1)] {
        let line =
            format!("starling_dataplane_token_rejections_total{{reason=\"{reason}\"}} {n}\n");
        assert!(text.contains(&line), "{line}{text}");
    }
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn public_broadcast_needs_no_token() -> Result<()> {
    let (node, _src) = node_with(1, |_| {});
    let mut c = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    stream_info(&mut c)?;
    next_chunk(&mut c)?;
    let (head, _) = http_open(node.http_addr(), "/live/test", "")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    node.shutdown();
    node.join()?;
    Ok(())
}
