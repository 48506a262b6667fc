//! Memory per connected viewer: runs the `starling-dataplane` binary (1 executor) on the
//! test source, connects N wire viewers that keep reading, and reports the growth of
//! the process's RSS per viewer. Ignored by default (it opens 2N sockets);
//! run with `cargo test -p starling-dataplane --test memory -- --ignored --nocapture`
//! (`STARLING_MEM_VIEWERS` sets N, default 1000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use common::*;
use starling_proto::wire::{self, Frame, StartAt};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Reads whatever is there on every viewer socket (non-blocking), for `rounds` rounds.
fn drain(viewers: &mut [Client], rounds: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..rounds {
        for v in viewers.iter_mut() {
            while let Ok(n) = v.s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect_viewers(wire_addr: SocketAddr, n: usize, mask: u64) -> Result<Vec<Client>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = Client::handshake_mask(wire_addr, "test", StartAt::Live, mask)?;
        match c.recv()? {
            Frame::StreamInfo(_) => {}
            other => bail!("unexpected {other:?}"),
        }
        if mask != 0 {
            match c.recv()? {
                Frame::Chunk(_) => {}
                other => bail!("unexpected {other:?}"),
            }
        }
        c.s.set_nonblocking(true)?;
        out.push(c);
    }
    Ok(out)
}

#[test]
#[ignore = "opens thousands of sockets; run explicitly to measure"]
fn rss_per_connected_viewer() -> Result<()> {
    let n: usize = std::env::var("STARLING_MEM_VIEWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let src = start_source();
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling-dataplane"))
        .args(["--static-broadcast", &format!("test=http://{src}/live.ts")])
        .args(["--cores", "1", "--io-memory-kib", "256", "--log", "warn"])
        // Every viewer here connects from 127.0.0.1.
        .args(["--max-conns-per-address", "1000000"])
        .args([
            "--wire-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let node = Kill(child);
    let pid = node.0.id();
    let mut lines = BufReader::new(stderr).lines();
    let (wire_addr, http_addr) = loop {
        let line = lines.next().context("node exited")??;
        if let Some(rest) = line.strip_prefix("starling-dataplane: wire listening on ") {
            let (w, h) = rest
                .split_once(", http listening on ")
                .context("listen line")?;
            break (w.parse::<SocketAddr>()?, h.parse::<SocketAddr>()?);
        }
    };
    std::thread::spawn(move || for _ in lines {});
    wait_for("chunks", || {
        http_get(http_addr, "/metrics").is_ok_and(|(_, b)| {
            b.contains("starling_dataplane_window_chunks{broadcast=\"test\"} 3")
        })
    })?;
    // Warm up (first connection, allocator arenas), then measure.
    let mut warm = connect_viewers(wire_addr, 10, wire::ALL_SUBSTREAMS)?;
    drain(&mut warm, 50);
    let before = rss_kib(pid)?;
    let mut viewers = connect_viewers(wire_addr, n, wire::ALL_SUBSTREAMS)?;
    // Keep everyone reading across a few chunks (steady state).
    drain(&mut viewers, 150);
    drain(&mut warm, 1);
    let after = rss_kib(pid)?;
    let per_viewer = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    eprintln!(
        "RSS: {before} KiB before, {after} KiB with {n} more viewers: {per_viewer:.0} bytes per viewer"
    );
    let (_, metrics) = http_get(http_addr, "/metrics")?;
    assert!(metrics.contains(&format!(
        "starling_dataplane_viewers{{broadcast=\"test\"}} {}",
        n + 10
    )));
    // Request-only links (mask 0) cost no more than full subscribers.
    let before2 = rss_kib(pid)?;
    let mut idle = connect_viewers(wire_addr, n, 0)?;
    drain(&mut idle, 50);
    let after2 = rss_kib(pid)?;
    let per_idle = (after2.saturating_sub(before2)) as f64 * 1024.0 / n as f64;
    eprintln!("RSS: {n} mask-0 connections: {per_idle:.0} bytes per connection");
    assert!(per_viewer <= 16.0 * 1024.0, "{per_viewer} bytes per viewer");
    drop(viewers);
    drop(idle);
    Ok(())
}
