//! `GET /metrics`: valid exposition format (checked by `promtool check metrics`), values
//! that move with traffic, and the measured stream rate. Needs ffmpeg and promtool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use common::*;
use starling_proto::wire::{Frame, StartAt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

fn scrape(addr: SocketAddr) -> Result<String> {
    let (head, body) = http_get(addr, "/metrics")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    Ok(body)
}

/// Value of the sample `series` (name plus labels exactly as rendered).
fn value(text: &str, series: &str) -> Result<f64> {
    for line in text.lines() {
        if let Some(v) = line.strip_prefix(series).and_then(|r| r.strip_prefix(' ')) {
            return Ok(v.trim().parse()?);
        }
    }
    bail!("no sample {series} in\n{text}")
}

fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool must be installed (Debian package prometheus)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool failed: {msg}\n{text}");
    assert!(msg.trim().is_empty(), "promtool found problems: {msg}");
    Ok(())
}

#[test]
fn metrics_pass_promtool_and_move_with_traffic() -> Result<()> {
    let (node, _src) = node_with(2, |_| {});
    wait_for("a chunk", || {
        node.status("test").is_some_and(|s| s.last_seq.is_some())
    })?;
    let before = scrape(node.http_addr())?;
    eprintln!("{before}");
    promtool_check(&before)?;
    let push = "starling_dataplane_sent_bytes_total{kind=\"wire_push\"}";
    let push0 = value(&before, push)?;
    assert!(
        value(
            &before,
            "starling_dataplane_ingested_chunks_total{broadcast=\"test\"}"
        )? >= 1.0
    );
    assert!(value(&before, "starling_dataplane_chunk_size_bytes_count")? >= 1.0);

    // One wire viewer receiving, one request, one HTTP viewer.
    let mut c = Client::handshake(node.wire_addr(), "test", StartAt::Live)?;
    assert!(matches!(c.recv()?, Frame::StreamInfo(_)));
    let Frame::Chunk(ch) = c.recv()? else {
        bail!("no chunk")
    };
    c.send(&Frame::Request(ch.seq))?;
    c.send(&Frame::Request(u64::MAX))?;
    let mut answers = 0;
    while answers < 2 {
        match c.recv()? {
            Frame::Chunk(x) if x.seq == ch.seq => answers += 1,
            Frame::NotFound(_) => answers += 1,
            Frame::Chunk(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    let mut http = TcpStream::connect(node.http_addr())?;
    http.set_read_timeout(Some(Duration::from_secs(30)))?;
    http.write_all(b"GET /live/test HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = vec![0u8; 65536];
    let mut got = 0;
    while got < 10_000 {
        let n = http.read(&mut buf)?;
        if n == 0 {
            bail!("http stream ended");
        }
        got += n;
    }

    let after = scrape(node.http_addr())?;
    promtool_check(&after)?;
    assert!(value(&after, push)? > push0, "wire push bytes grew");
    assert!(
        value(
            &after,
            "starling_dataplane_sent_bytes_total{kind=\"wire_request\"}"
        )? > 0.0
    );
    assert!(value(&after, "starling_dataplane_sent_bytes_total{kind=\"http\"}")? >= 10_000.0);
    assert_eq!(
        value(
            &after,
            "starling_dataplane_requests_total{result=\"served\"}"
        )?,
        1.0
    );
    assert_eq!(
        value(
            &after,
            "starling_dataplane_requests_total{result=\"not_found\"}"
        )?,
        1.0
    );
    assert!(
        value(
            &after,
            "starling_dataplane_chunks_sent_total{kind=\"wire_push\"}"
        )? >= 1.0
    );
    assert_eq!(
        value(&after, "starling_dataplane_viewers{broadcast=\"test\"}")?,
        2.0
    );
    assert_eq!(
        value(
            &after,
            "starling_dataplane_source_health{broadcast=\"test\",state=\"up\"}"
        )?,
        1.0
    );
    assert_eq!(
        value(
            &after,
            "starling_dataplane_source_health{broadcast=\"test\",state=\"down\"}"
        )?,
        0.0
    );
    assert!(
        value(
            &after,
            "starling_dataplane_connections_accepted_total{listener=\"wire\"}"
        )? >= 1.0
    );
    assert!(
        value(
            &after,
            "starling_dataplane_open_connections{listener=\"http\"}"
        )? >= 2.0
    );

    // Closing the wire viewer is counted by reason.
    c.send(&Frame::Goodbye(starling_proto::wire::Reason {
        code: starling_proto::wire::ErrorCode::Normal,
        message: String::new(),
    }))?;
    wait_for("the goodbye to be counted", || {
        scrape(node.http_addr()).is_ok_and(|t| {
            value(
                &t,
                "starling_dataplane_connections_closed_total{listener=\"wire\",reason=\"normal\"}",
            )
            .is_ok_and(|v| v >= 1.0)
        })
    })?;
    node.shutdown();
    node.join()?;
    Ok(())
}

#[test]
fn bitrate_is_close_to_the_source_rate() -> Result<()> {
    let (node, _src) = node_with(1, |_| {});
    // The source sends the file at real time: its rate is its size over its duration.
    let source_kbps = test_ts().len() as f64 * 8.0 / TS_SECS / 1000.0;
    wait_for("a few seconds of window", || {
        node.status("test").is_some_and(|s| s.chunks_in_window >= 5)
    })?;
    let st = node.status("test").context("status")?;
    let measured = f64::from(st.bitrate_kbps);
    eprintln!("bitrate: measured {measured} kbps, source {source_kbps:.1} kbps");
    assert!(
        (measured - source_kbps).abs() <= source_kbps * 0.2,
        "measured {measured} kbps, source {source_kbps:.0} kbps"
    );
    let text = scrape(node.http_addr())?;
    let rate = value(
        &text,
        "starling_dataplane_stream_bytes_per_second{broadcast=\"test\"}",
    )?;
    let kbps = rate * 8.0 / 1000.0;
    assert!(
        (kbps - measured).abs() <= measured * 0.2 + 1.0,
        "{kbps} vs {measured}"
    );
    node.shutdown();
    node.join()?;
    Ok(())
}
