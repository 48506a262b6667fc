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
    })?;
    let msg = refused(addr, relay_only, ErrorCode::Unauthorized)?;
    assert!(msg.starts_with("missing_scope:"), "{msg}");
    let msg = refused(
        addr,
        Bytes::from_static(b"\x01garbage"),
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
    // A token sent in a TOKEN frame before SUBSCRIBE replaces HELLO's (empty) one.
    let mut c2 = Client::connect(addr)?;
    c2.send(&Frame::Hello(wire::Hello {
        min_version: 1,
        max_version: 1,
        role: wire::Role::Viewer,
        token: Bytes::new(),
    }))?;
    assert!(matches!(c2.recv()?, Frame::HelloAck(_)));
    c2.send(&Frame::Token(play_token(&s, "test", 2, 60_000)))?;
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
    let mut http = http_open(
        node.http_addr(),
        &format!("/live/test?token={}", b64(&tok1)),
        "",
    )?;
    assert!(http.0.starts_with("HTTP/1.1 200"), "{}", http.0);

    node.revoke("test", &[1]);
    for c in &mut revoked {
        let (is_error, r) = until_close(c)?;
        assert!(!is_error);
        assert_eq!(r.code, ErrorCode::Revoked, "{r:?}");
    }
    // The HTTP stream of peer 1 ends too.
    let mut rest = Vec::new();
    http.1.read_to_end(&mut rest)?;
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

#[test]
fn http_needs_a_token_on_private_broadcasts() -> Result<()> {
    let s = signer(7);
    let node = private_node(1, &s, |c| c.token_skew = Duration::from_millis(100));
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

    // Valid: in the query (padded standard base64 works too) or as a bearer token.
    let tok = play_token(&s, "test", 1, 60_000);
    let (head, mut st) = http_open(http, &format!("/live/test?x=1&token={}", b64(&tok)), "")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buf = [0u8; 188];
    st.read_exact(&mut buf)?;
    assert_eq!(buf[0], 0x47, "raw MPEG-TS, as without tokens");
    let padded = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&tok[..])
    };
    let (head, _) = http_open(
        http,
        &format!("/live/test?token={}", padded.replace('=', "%3D")),
        "",
    )?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = http_open(
        http,
        "/live/test",
        &format!("Authorization: Bearer {}\r\n", b64(&tok)),
    )?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // An HTTP stream ends when its token expires (plain players cannot renew).
    let short = play_token(&s, "test", 2, 1500);
    let (head, mut st) = http_open(http, &format!("/live/test?token={}", b64(&short)), "")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = Vec::new();
    st.read_to_end(&mut rest)?;
    let (_, text) = http_get(http, "/metrics")?;
    assert!(text.contains(
        "starling_dataplane_connections_closed_total{listener=\"http\",reason=\"token_expired\"} 1\n"
    ), "{text}");
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
