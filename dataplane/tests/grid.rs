//! Peer-grid features of the wire server over real loopback sockets: substream masks
//! (and changing them mid-connection), REQUEST / NOT_FOUND, a request flood staying
//! bounded, keep-alive PINGs and the idle timeout. Needs ffmpeg (the test source).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use common::*;
use starling_proto::wire::{
    self, BufferMapFrame, Chunk, ErrorCode, Frame, StartAt, StreamInfo, Subscribe,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

const K: u64 = 4;

fn stream_info(c: &mut Client) -> Result<StreamInfo> {
    match c.recv()? {
        Frame::StreamInfo(i) => Ok(i),
        other => bail!("expected STREAM_INFO, got {other:?}"),
    }
}

fn chunk(c: &mut Client) -> Result<Chunk> {
    match c.recv()? {
        Frame::Chunk(ch) => Ok(ch),
        other => bail!("expected CHUNK, got {other:?}"),
    }
}

fn resubscribe(c: &mut Client, mask: u64) -> Result<()> {
    c.send(&Frame::Subscribe(Subscribe {
        broadcast_id: "test".into(),
        start: StartAt::Live,
        substream_mask: mask,
    }))
}

#[test]
fn mask_subscription_gets_exactly_its_substreams_in_order() -> Result<()> {
    let (node, _src) = node_with(2, |_| {});
    let mut full = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    let mask = 0b0101; // substreams 0 and 2
    let mut part = Client::handshake_mask(node.wire_addr(), "test", StartAt::Live, mask)?;
    let fi = stream_info(&mut full)?;
    let pi = stream_info(&mut part)?;
    assert_eq!(fi.substreams, 4, "static broadcasts default to K = 4");
    assert_eq!(pi.substreams, 4);

    let mut got = Vec::new();
    while got.len() < 6 {
        let ch = chunk(&mut part)?;
        assert!(
            wire::mask_wants(mask, ch.seq, 4),
            "seq {} not in mask",
            ch.seq
        );
        assert!(ch.seq >= pi.first_seq);
        assert_eq!(ch.flags & wire::chunk_flags::DISCONTINUITY, 0);
        if let Some(prev) = got.last().map(|c: &Chunk| c.seq) {
            assert_eq!(
                ch.seq,
                prev + 2,
                "every chunk of substreams 0 and 2, in order"
            );
        }
        got.push(ch);
    }
    // The full subscriber saw the same chunks (and the ones in between).
    let last = got.last().map_or(0, |c| c.seq);
    let mut all = BTreeMap::new();
    loop {
        let ch = chunk(&mut full)?;
        let seq = ch.seq;
        all.insert(seq, ch);
        if seq >= last {
            break;
        }
    }
    // (The two connections may start at different random-access chunks.)
    let lo = got[0]
        .seq
        .max(*all.keys().next().context("full got chunks")?);
    let expected: Vec<u64> = all
        .keys()
        .copied()
        .filter(|s| *s >= lo && wire::mask_wants(mask, *s, 4))
        .collect();
    let got_seqs: Vec<u64> = got.iter().map(|c| c.seq).filter(|s| *s >= lo).collect();
    assert!(!got_seqs.is_empty());
    assert_eq!(expected, got_seqs);
    for c in &got {
        assert_eq!(
            all[&c.seq].payload, c.payload,
            "same bytes for seq {}",
            c.seq
        );
    }
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn mask_change_mid_connection() -> Result<()> {
    let (node, _src) = node_with(1, |_| {});
    let mut c = Client::handshake_mask(node.wire_addr(), "test", StartAt::Live, 0b0001)?;
    stream_info(&mut c)?;
    for _ in 0..2 {
        let ch = chunk(&mut c)?;
        assert_eq!(ch.seq % K, 0);
    }
    // Whole stream from now on: after the switch, every chunk, contiguous.
    resubscribe(&mut c, wire::ALL_SUBSTREAMS)?;
    let mut prev: Option<u64> = None;
    let mut contiguous = 0;
    while contiguous < 4 {
        let ch = chunk(&mut c)?;
        match prev {
            Some(p) if ch.seq == p + 1 => contiguous += 1,
            Some(p) => {
                // Chunks pushed (or skipped) before the SUBSCRIBE was read.
                assert_eq!(contiguous, 0, "gap {p} -> {} after the switch", ch.seq);
            }
            None => {}
        }
        prev = Some(ch.seq);
    }
    // Mask 0: nothing pushed any more, the connection stays open (PING answered).
    resubscribe(&mut c, 0)?;
    c.send(&Frame::Ping(99))?;
    loop {
        match c.recv()? {
            Frame::Pong(99) => break,
            Frame::Chunk(_) => {} // sent before the SUBSCRIBE was read
            other => bail!("unexpected {other:?}"),
        }
    }
    let b = node.registry().get("test").context("broadcast")?;
    let now = b.newest_seq().unwrap_or(0);
    wait_for("two more chunks", || b.newest_seq() >= Some(now + 2))?;
    c.send(&Frame::Ping(100))?;
    match c.recv()? {
        Frame::Pong(100) => {}
        other => bail!("nothing may be pushed with mask 0, got {other:?}"),
    }
    // Changing the broadcast is refused.
    c.send(&Frame::Subscribe(Subscribe {
        broadcast_id: "other".into(),
        start: StartAt::Live,
        substream_mask: 1,
    }))?;
    match c.recv()? {
        Frame::Error(r) => assert_eq!(r.code, ErrorCode::UnexpectedFrame),
        other => bail!("unexpected {other:?}"),
    }
    assert!(c.recv().is_err(), "closed after the error");
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn request_in_window_is_byte_identical_and_out_of_window_not_found() -> Result<()> {
    let (node, _src) = node_with(2, |c| c.window_secs = 3);
    let mut full = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    stream_info(&mut full)?;
    let pushed = chunk(&mut full)?;

    // A request-only link (mask 0).
    let mut r = Client::handshake_mask(node.wire_addr(), "test", StartAt::Live, 0)?;
    // A BUFFER_MAP is accepted and ignored.
    r.send(&Frame::BufferMap(BufferMapFrame {
        base: 10,
        len: 8,
        bits: Bytes::from_static(&[0b1010_0000]),
    }))?;
    r.send(&Frame::Request(pushed.seq))?;
    let answered = loop {
        match r.recv()? {
            Frame::StreamInfo(_) => {}
            Frame::Chunk(ch) => break ch,
            other => bail!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        wire::encode_to_bytes(&Frame::Chunk(answered))?,
        wire::encode_to_bytes(&Frame::Chunk(pushed))?,
        "REQUEST answer is byte-identical to the pushed CHUNK"
    );

    // Not yet cut, and far away.
    for seq in [1_000_000, u64::MAX] {
        r.send(&Frame::Request(seq))?;
        match r.recv()? {
            Frame::NotFound(n) => assert_eq!(n, seq),
            other => bail!("unexpected {other:?}"),
        }
    }
    // Evicted: the 3 s window has moved past seq 0.
    let b = node.registry().get("test").context("broadcast")?;
    wait_for("the window to move", || b.range().0 > Some(0))?;
    r.send(&Frame::Request(0))?;
    match r.recv()? {
        Frame::NotFound(0) => {}
        other => bail!("unexpected {other:?}"),
    }
    let m = node.registry().metrics();
    assert!(m.requests_served() >= 1);
    assert!(m.requests_not_found() >= 3);
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn request_flood_is_bounded_and_answered_in_order() -> Result<()> {
    let (node, _src) = node_with(1, |c| {
        c.timeouts.write_stall = Duration::from_secs(60);
        // Flow control, not the request rate, is what this test is about
        // (tests/hostile.rs floods against the rate limit).
        c.limits.requests = starling_dataplane::RateLimit::per_second(1_000_000, 1_000_000);
    });
    let b = node.registry().get("test").context("broadcast")?;
    wait_for("a chunk", || b.newest_seq().is_some())?;
    let seq = b.newest_seq().context("seq")?;
    let size = b.chunk(seq).context("chunk")?.payload.len() as u64;

    // A client with a small receive buffer (no autotuning) that asks for far more than
    // any buffer holds, and does not read.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_recv_buffer_size(64 * 1024)?;
    sock.connect(&node.wire_addr().into())?;
    let mut c = Client::from_stream(sock.into())?;
    c.send(&Frame::Hello(wire::Hello {
        min_version: wire::PROTOCOL_VERSION,
        max_version: wire::PROTOCOL_VERSION,
        role: wire::Role::Peer,
        token: Bytes::new(),
    }))?;
    assert!(matches!(c.recv()?, Frame::HelloAck(_)));
    resubscribe(&mut c, 0)?;
    let total_bytes: u64 = 64 << 20;
    let n = total_bytes.div_ceil(size).max(64);
    let mut reqs = Vec::new();
    for _ in 0..n {
        reqs.extend_from_slice(&wire::encode_to_bytes(&Frame::Request(seq))?);
    }
    let mut w = c.s.try_clone()?;
    let writer = std::thread::spawn(move || w.write_all(&reqs));

    let m = node.registry().metrics();
    wait_for("requests being served", || m.requests_served() >= 1)?;
    // Meanwhile another viewer is served normally.
    let mut other = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    stream_info(&mut other)?;
    let a = chunk(&mut other)?.seq;
    let b2 = chunk(&mut other)?.seq;
    assert_eq!(b2, a + 1);
    // The server answers only as fast as the client reads: what it wrote is bounded by
    // the socket buffers (server send buffer <= 4 MiB + the client's 64 KiB), not by
    // the number of requests.
    let served = m.requests_served();
    eprintln!(
        "flood: {n} requests of {size} bytes, {served} answered while the client did not read"
    );
    assert!(
        served * size <= 16 << 20,
        "served {served} x {size} bytes without the client reading"
    );
    assert!(served < n, "not everything answered yet");

    // Now read: every request is answered, in order, with the right chunk.
    for i in 0..n {
        match c.recv().with_context(|| format!("answer {i} of {n}"))? {
            Frame::Chunk(ch) => assert_eq!(ch.seq, seq),
            Frame::StreamInfo(_) if i == 0 => match c.recv()? {
                Frame::Chunk(ch) => assert_eq!(ch.seq, seq),
                other => bail!("unexpected {other:?}"),
            },
            other => bail!("unexpected {other:?}"),
        }
    }
    writer.join().ok().context("writer")??;
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn keepalive_ping_when_idle_then_idle_timeout() -> Result<()> {
    let (node, _src) = node_with(1, |c| {
        c.timeouts.keepalive = Duration::from_millis(200);
        c.timeouts.idle = Duration::from_millis(1500);
    });
    // Mask 0: no chunk is ever pushed, so only keep-alives flow.
    let mut c = Client::handshake_mask(node.wire_addr(), "test", StartAt::Live, 0)?;
    let mut pings = 0;
    while pings < 3 {
        match c.recv_raw()? {
            Frame::StreamInfo(_) => {}
            Frame::Ping(n) => {
                pings += 1;
                c.send(&Frame::Pong(n))?;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    assert!(node.registry().metrics().pings_sent() >= 3);
    // Stop answering: the node gives up with ERROR(IDLE_TIMEOUT).
    loop {
        match c.recv_raw()? {
            Frame::Ping(_) | Frame::StreamInfo(_) => {}
            Frame::Error(r) => {
                assert_eq!(r.code, ErrorCode::IdleTimeout);
                break;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    assert!(c.recv_raw().is_err(), "closed after the error");
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn frames_out_of_place_close_only_that_connection() -> Result<()> {
    let (node, _src) = node_with(1, |_| {});
    let mut good = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    stream_info(&mut good)?;
    // REQUEST before SUBSCRIBE.
    let mut c = Client::connect(node.wire_addr())?;
    c.send(&Frame::Hello(wire::Hello {
        min_version: wire::PROTOCOL_VERSION,
        max_version: wire::PROTOCOL_VERSION,
        role: wire::Role::Peer,
        token: Bytes::new(),
    }))?;
    assert!(matches!(c.recv()?, Frame::HelloAck(_)));
    c.send(&Frame::Request(1))?;
    match c.recv()? {
        Frame::Error(r) => assert_eq!(r.code, ErrorCode::UnexpectedFrame),
        other => bail!("unexpected {other:?}"),
    }
    // A BUFFER_MAP with padding bits set after SUBSCRIBE: MALFORMED_FRAME.
    let mut c = Client::handshake_mask(node.wire_addr(), "test", StartAt::Live, 0)?;
    let mut bad = vec![wire::frame_type::BUFFER_MAP, 0, 0, 0, 0, 0, 0, 11];
    bad.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0x0F]);
    c.s.write_all(&bad)?;
    loop {
        match c.recv()? {
            Frame::StreamInfo(_) => {}
            Frame::Error(r) => {
                assert_eq!(r.code, ErrorCode::MalformedFrame);
                break;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    let a = chunk(&mut good)?.seq;
    assert_eq!(chunk(&mut good)?.seq, a + 1);
    node.shutdown();
    node.join()?;
    Ok(())
}
