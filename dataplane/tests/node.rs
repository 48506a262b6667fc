//! End-to-end tests of a node in standalone mode: a tiny paced HTTP source serving an
//! ffmpeg-made MPEG-TS file, wire-protocol and HTTP viewers. Needs ffmpeg.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use common::*;
use starling_dataplane::{IngestSpec, Node, SourceHealth, StaticBroadcast};
use starling_proto::wire::{self, ErrorCode, Frame, Hello, Role, StartAt};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn wire_viewer_gets_stream_info_and_contiguous_chunks() -> Result<()> {
    let (node, _src) = node_with_source(2);
    let mut c = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    let info = match c.recv()? {
        Frame::StreamInfo(i) => i,
        other => bail!("expected STREAM_INFO, got {other:?}"),
    };
    assert_eq!(info.broadcast_id, "test");
    assert_eq!(info.content_type, "video/mp2t");
    assert_eq!(info.chunk_duration_ms, 1000);
    let mut prev = None;
    for i in 0..4 {
        let Frame::Chunk(ch) = c.recv()? else {
            bail!("expected CHUNK")
        };
        if i == 0 {
            assert_eq!(ch.seq, info.first_seq);
            assert!(ch.is_random_access(), "first chunk is a RAP");
            assert_eq!(pid(&ch.payload[..188]), 0, "first chunk starts with PAT");
        }
        assert_eq!(ch.payload.len() % 188, 0);
        if let Some(p) = prev {
            assert_eq!(ch.seq, p + 1, "contiguous");
        }
        prev = Some(ch.seq);
    }
    // PING is answered while chunks flow.
    c.send(&Frame::Ping(77))?;
    loop {
        match c.recv()? {
            Frame::Pong(77) => break,
            Frame::Chunk(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    let st = node.status("test").context("status")?;
    assert_eq!(st.health, SourceHealth::Up);
    assert_eq!(st.viewers, 1);
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn http_viewer_decodes_without_errors() -> Result<()> {
    let (node, _src) = node_with_source(1);
    let base = format!("http://{}", node.http_addr());
    wait_for("a first chunk", || {
        node.status("test").is_some_and(|s| s.chunks_in_window >= 2)
    })?;
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-t", "4", "-i"])
        .arg(format!("{base}/live/test"))
        .args(["-f", "null", "-"])
        .stdout(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ffmpeg failed: {stderr}");
    assert!(stderr.trim().is_empty(), "ffmpeg errors: {stderr}");

    let get = |path: &str| -> Result<String> {
        let mut s = TcpStream::connect(node.http_addr())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut head = vec![0u8; 512];
        let n = s.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    assert!(get("/healthz")?.starts_with("HTTP/1.1 200"));
    assert!(get("/live/nope")?.starts_with("HTTP/1.1 404"));
    let live = get("/live/test")?;
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    assert!(live.contains("Content-Type: video/mp2t"));
    // Malformed request line.
    let mut s = TcpStream::connect(node.http_addr())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"\x01\x02garbage\r\n\r\n")?;
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn bad_clients_are_dropped_while_others_keep_receiving() -> Result<()> {
    let (node, _src) = node_with_source(1);
    let mut good = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    assert!(matches!(good.recv()?, Frame::StreamInfo(_)));
    assert!(matches!(good.recv()?, Frame::Chunk(_)));

    // Random bytes.
    let mut bad = Client::connect(node.wire_addr())?;
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    let _ = bad.s.write_all(&noise);
    match bad.recv() {
        Ok(Frame::Error(r)) => assert!(matches!(
            r.code,
            ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge | ErrorCode::UnsupportedVersion
        )),
        Ok(other) => bail!("unexpected {other:?}"),
        Err(_) => {} // closed without a frame: acceptable
    }
    // Oversized frame header.
    let mut big = Client::connect(node.wire_addr())?;
    big.s
        .write_all(&[wire::frame_type::HELLO, 0, 0, 0, 0x40, 0, 0, 0])?;
    match big.recv()? {
        Frame::Error(r) => assert_eq!(r.code, ErrorCode::FrameTooLarge),
        other => bail!("unexpected {other:?}"),
    }
    assert!(big.recv().is_err(), "connection closed after the error");

    // The good viewer keeps receiving contiguous chunks.
    let mut last = None;
    for _ in 0..3 {
        match good.recv()? {
            Frame::Chunk(c) => {
                if let Some(l) = last {
                    assert_eq!(c.seq, l + 1);
                }
                last = Some(c.seq);
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn unknown_broadcast_and_stop() -> Result<()> {
    let (node, _src) = node_with_source(1);
    let mut c = Client::handshake(node.wire_addr(), "nope", StartAt::Live)?;
    match c.recv()? {
        Frame::Error(r) => assert_eq!(r.code, ErrorCode::UnknownBroadcast),
        other => bail!("unexpected {other:?}"),
    }
    // Version mismatch.
    let mut v = Client::connect(node.wire_addr())?;
    v.send(&Frame::Hello(Hello {
        min_version: 7,
        max_version: 9,
        role: Role::Viewer,
        token: bytes::Bytes::new(),
    }))?;
    match v.recv()? {
        Frame::Error(r) => assert_eq!(r.code, ErrorCode::UnsupportedVersion),
        other => bail!("unexpected {other:?}"),
    }
    // Stop: the viewer gets GOODBYE(BroadcastStopped).
    let mut viewer = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    assert!(matches!(viewer.recv()?, Frame::StreamInfo(_)));
    node.stop_ingest("test");
    loop {
        match viewer.recv()? {
            Frame::Chunk(_) => {}
            Frame::Goodbye(r) => {
                assert_eq!(r.code, ErrorCode::BroadcastStopped);
                break;
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    wait_for("the broadcast to be gone", || node.status("test").is_none())?;
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn resume_from_seq_and_out_of_window() -> Result<()> {
    let (node, _src) = node_with_source(1);
    wait_for("three chunks", || {
        node.status("test").is_some_and(|s| s.chunks_in_window >= 3)
    })?;
    let b = node.registry().get("test").context("broadcast")?;
    let (front, _) = b.range();
    let front = front.context("front")?;
    let mut c = Client::handshake(node.wire_addr(), "test", StartAt::Seq(front + 1))?;
    let Frame::StreamInfo(info) = c.recv()? else {
        bail!("no STREAM_INFO")
    };
    assert_eq!(info.first_seq, front + 1);
    let Frame::Chunk(ch) = c.recv()? else {
        bail!("no chunk")
    };
    assert_eq!(ch.seq, front + 1);
    assert_eq!(ch.flags & wire::chunk_flags::DISCONTINUITY, 0);
    // Far future: live edge with DISCONTINUITY.
    let mut c = Client::handshake(node.wire_addr(), "test", StartAt::Seq(1_000_000))?;
    assert!(matches!(c.recv()?, Frame::StreamInfo(_)));
    let Frame::Chunk(ch) = c.recv()? else {
        bail!("no chunk")
    };
    assert!(ch.is_random_access());
    assert_ne!(ch.flags & wire::chunk_flags::DISCONTINUITY, 0);
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn unreachable_source_goes_down_then_up() -> Result<()> {
    // A port with nothing listening (yet).
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    drop(l);
    let sb: StaticBroadcast = format!("late=http://127.0.0.1:{port}/live.ts")
        .parse()
        .unwrap();
    let node = Node::start(config(vec![sb], 1))?;
    wait_for("DOWN with an error", || {
        node.status("late")
            .is_some_and(|s| s.health == SourceHealth::Down && !s.error.is_empty())
    })?;
    let l = TcpListener::bind(("127.0.0.1", port))?;
    serve_source(l);
    wait_for("UP", || {
        node.status("late")
            .is_some_and(|s| s.health == SourceHealth::Up)
    })?;
    wait_for("chunks", || {
        node.status("late").is_some_and(|s| s.last_seq.is_some())
    })?;
    // A source answering 404 is DOWN with the status in the error.
    let l404 = TcpListener::bind("127.0.0.1:0")?;
    let a404 = l404.local_addr()?;
    std::thread::spawn(move || {
        for c in l404.incoming().flatten() {
            let mut c = c;
            let mut b = [0u8; 1024];
            let _ = c.read(&mut b);
            let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    });
    node.start_ingest(IngestSpec {
        broadcast_id: "missing".into(),
        source_url: format!("http://{a404}/nope"),
        chunk_duration_ms: 1000,
        substreams: 1,
        public: true,
        run_epoch: 0,
    });
    wait_for("404 reported", || {
        node.status("missing")
            .is_some_and(|s| s.health == SourceHealth::Down && s.error.contains("404"))
    })?;
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn config_without_work_is_an_error() {
    let err = Node::start(config(vec![], 1)).err().map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("--static-broadcast"));
}
