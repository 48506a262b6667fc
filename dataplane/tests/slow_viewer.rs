//! Slow wire viewers are bounded: a subscriber that stops reading is dropped after
//! `write_stall` (too_slow), one that reads slower than the stream is skipped ahead to
//! the live edge (`DISCONTINUITY`) and, after `max_skips`, dropped with
//! `GOODBYE(TOO_SLOW)`; meanwhile a healthy viewer on the same executor receives every
//! chunk in order.
//!
//! The node writes straight into the kernel's socket buffer, which it caps per viewer
//! connection (`Timeouts::send_buffer_bytes`, `SO_SNDBUF`; without the cap Linux
//! autotunes it up to `net.ipv4.tcp_wmem[2]`, 4 MiB, even for a receiver with a 4 KiB
//! window): a slow viewer is noticed once that buffer is full. The source here is a
//! fast (8 Mbit/s) raw `application/octet-stream` stream, so the buffer fills at once;
//! no ffmpeg needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use common::*;
use starling_dataplane::{Config, Node, StaticBroadcast};
use starling_proto::wire::{self, Decoder, ErrorCode, Frame, Hello, Limits, Role, StartAt};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Source rate, bytes per second (8 Mbit/s).
const RATE: usize = 1 << 20;

/// The node's send buffer per viewer connection in these tests (the kernel doubles it).
const SEND_BUFFER: usize = 128 << 10;

/// Serves an endless `application/octet-stream` of `.` bytes at [`RATE`] to every
/// connection (the chunker cuts it by time: ~1 MiB chunks, each a random-access point).
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
                let piece = vec![b'.'; 16 * 1024];
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

/// A one-executor node (the slow sockets and the healthy one share it) ingesting the
/// raw source as `test`, 2 s window, with `f` applied to its config.
fn raw_node(f: impl FnOnce(&mut Config)) -> Result<Node> {
    let src = start_raw_source()?;
    let sb: StaticBroadcast = format!("test=http://{src}/live").parse().unwrap();
    let mut cfg = config(vec![sb], 1);
    cfg.window_secs = 2;
    cfg.max_chunk_bytes = 2 << 20;
    cfg.timeouts.send_buffer_bytes = SEND_BUFFER;
    f(&mut cfg);
    let node = Node::start(cfg)?;
    wait_for("a chunk", || {
        node.status("test").is_some_and(|s| s.last_seq.is_some())
    })?;
    Ok(node)
}

/// `net.ipv4.tcp_wmem[2]`: the most the kernel buffers for one socket's sends.
fn wmem_max() -> Result<usize> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")?;
    s.split_whitespace()
        .nth(2)
        .context("tcp_wmem")?
        .parse()
        .context("tcp_wmem")
}

/// `starling_dataplane_connections_closed_total{listener="wire",reason=REASON}`.
fn wire_closed(node: &Node, reason: &str) -> Result<u64> {
    let (head, body) = http_get(node.http_addr(), "/metrics")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let series = format!(
        "starling_dataplane_connections_closed_total{{listener=\"wire\",reason=\"{reason}\"}} "
    );
    for line in body.lines() {
        if let Some(v) = line.strip_prefix(&series) {
            return Ok(v.trim().parse()?);
        }
    }
    bail!("no sample {series} in\n{body}")
}

fn viewers(node: &Node) -> u32 {
    node.status("test").map_or(0, |s| s.viewers)
}

/// A live, whole-stream viewer past STREAM_INFO, reading every chunk ([`Healthy`]).
fn healthy_viewer(addr: SocketAddr) -> Result<Healthy> {
    let mut c = Client::handshake(addr, "test", StartAt::Live)?;
    match c.recv()? {
        Frame::StreamInfo(_) => {}
        other => bail!("expected STREAM_INFO, got {other:?}"),
    }
    Ok(Healthy::reading(c))
}

/// A raw socket with a small receive buffer (4 KiB asked: no autotuning), past
/// HELLO/HELLO_ACK and SUBSCRIBE (live, every substream).
fn small_buffer_subscriber(addr: SocketAddr) -> Result<std::net::TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_recv_buffer_size(4096)?;
    sock.connect(&addr.into())?;
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&wire::encode_to_bytes(&Frame::Hello(Hello {
        min_version: wire::PROTOCOL_VERSION,
        max_version: wire::PROTOCOL_VERSION,
        role: Role::Viewer,
        token: bytes::Bytes::new(),
    }))?)?;
    // HELLO_ACK is 1 frame of a few bytes: read exactly up to it.
    let mut dec = Decoder::new(Limits::default());
    let mut buf = BytesMut::new();
    loop {
        if let Some(f) = dec.decode(&mut buf)? {
            match f {
                Frame::HelloAck(_) => break,
                other => bail!("expected HELLO_ACK, got {other:?}"),
            }
        }
        let mut b = [0u8; 1];
        if s.read(&mut b)? == 0 {
            bail!("closed before HELLO_ACK");
        }
        buf.extend_from_slice(&b);
    }
    s.write_all(&wire::encode_to_bytes(&Frame::Subscribe(
        wire::Subscribe {
            broadcast_id: "test".into(),
            start: StartAt::Live,
            substream_mask: wire::ALL_SUBSTREAMS,
        },
    ))?)?;
    Ok(s)
}

#[test]
fn stalled_viewer_is_dropped_while_healthy_viewer_gets_contiguous_chunks() -> Result<()> {
    let node = raw_node(|c| c.timeouts.write_stall = Duration::from_secs(1))?;
    let healthy = healthy_viewer(node.wire_addr())?;
    assert_eq!(wire_closed(&node, "too_slow")?, 0);

    // Subscribes, then never reads.
    let mut stalled = small_buffer_subscriber(node.wire_addr())?;
    wait_for("the stalled viewer to be dropped as too slow", || {
        wire_closed(&node, "too_slow").is_ok_and(|n| n >= 1)
    })?;
    // Its connection is gone (nothing of it is kept), the healthy one is still there.
    wait_for("the viewer count to drop to 1", || viewers(&node) == 1)?;

    // What the stalled viewer can still read is what sat in the socket buffers, then
    // the connection ends (EOF or reset), instead of staying open.
    stalled.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut got = 0usize;
    let mut tmp = vec![0u8; 64 * 1024];
    loop {
        match stalled.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("the stalled viewer's connection is still open after {got} bytes")
            }
            Err(_) => break, // reset
        }
    }
    // The node kept nothing of it in user space, and the kernel only what the capped
    // send buffer allows (SO_SNDBUF, doubled by Linux, plus one 64 KiB segment of
    // slack) and the 4 KiB receive window: far less than one 1 MiB chunk, and far less
    // than the 4 MiB the kernel would autotune to (`tcp_wmem[2]`).
    let bound = 2 * SEND_BUFFER + (64 << 10) + (8 << 10);
    assert!(
        bound < wmem_max()?,
        "the test needs tcp_wmem[2] above its bound"
    );
    eprintln!("stalled viewer: {got} bytes were buffered when it was dropped (bound {bound})");
    assert!(
        got <= bound,
        "{got} bytes written to a viewer that never read"
    );

    let n = healthy.finish(3)?;
    assert!(n >= 3, "the healthy viewer received {n} chunks");
    wait_for("no viewer left", || viewers(&node) == 0)?;
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn slow_reader_is_skipped_ahead_then_dropped_too_slow() -> Result<()> {
    let node = raw_node(|c| {
        // Writes make progress (the reader reads every 2 s): only the cursor policy acts.
        c.timeouts.write_stall = Duration::from_secs(20);
        c.timeouts.max_skips = 1;
    })?;
    let b = node.registry().get("test").context("broadcast")?;
    let healthy = healthy_viewer(node.wire_addr())?;
    let ingested_before = b.chunks_ingested();

    // Reads in 4 KiB steps, one chunk every 2 s (the stream makes one per second), and
    // never answers PINGs (nothing unread on the node's side when it closes).
    let mut s = small_buffer_subscriber(node.wire_addr())?;
    let mut dec = Decoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut chunks: Vec<(u64, bool)> = Vec::new();
    let mut received = 0usize;
    let end = loop {
        if chunks.len() > 60 {
            bail!("not dropped after {} chunks: {chunks:?}", chunks.len());
        }
        match dec.decode(&mut buf) {
            Ok(Some(Frame::Chunk(ch))) => {
                let disc = ch.flags & wire::chunk_flags::DISCONTINUITY != 0;
                chunks.push((ch.seq, disc));
                std::thread::sleep(Duration::from_secs(2));
                continue;
            }
            Ok(Some(Frame::StreamInfo(_) | Frame::Ping(_))) => continue,
            Ok(Some(Frame::Goodbye(r))) => break format!("GOODBYE({:?})", r.code),
            Ok(Some(other)) => bail!("unexpected {other:?}"),
            Ok(None) => {}
            Err(e) => bail!("undecodable stream: {e}"),
        }
        let mut tmp = [0u8; 4096];
        match s.read(&mut tmp) {
            Ok(0) => break "closed".to_owned(),
            Ok(n) => {
                received += n;
                buf.extend_from_slice(&tmp[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("slow reader: nothing for 30 s")
            }
            Err(_) => break "reset".to_owned(),
        }
    };
    let produced = b.chunks_ingested() - ingested_before;
    eprintln!(
        "slow reader: {end} after {} chunks ({received} bytes) while {produced} were cut: {chunks:?}",
        chunks.len()
    );
    assert!(
        end == format!("GOODBYE({:?})", ErrorCode::TooSlow) || end == "closed",
        "slow reader ended with {end}"
    );
    // It was skipped ahead: a jump in sequence, flagged DISCONTINUITY on the chunk after it.
    let jump = chunks
        .windows(2)
        .find(|w| w[1].0 > w[0].0 + 1)
        .with_context(|| format!("no skip ahead in {chunks:?}"))?;
    assert!(
        jump[1].1,
        "the chunk after a skip carries DISCONTINUITY: {chunks:?}"
    );
    // Skipped chunks were never queued for it: it received fewer than were cut.
    assert!((chunks.len() as u64) < produced, "{chunks:?} of {produced}");
    wait_for("the slow reader's close to be counted", || {
        wire_closed(&node, "too_slow").is_ok_and(|n| n >= 1)
    })?;
    wait_for("the viewer count to drop to 1", || viewers(&node) == 1)?;

    let n = healthy.finish(3)?;
    assert!(
        n >= chunks.len() as u64,
        "healthy {n} chunks, slow {}",
        chunks.len()
    );
    node.shutdown();
    node.join()?;
    Ok(())
}
