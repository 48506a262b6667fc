//! The data-plane side of a run: the `starling-loadtest dataplane` child process and
//! its egress counter read from `/metrics`.

use crate::error::HarnessError;
use std::io::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sums `starling_dataplane_sent_bytes_total{kind="wire_*"}` from a data plane's
/// `/metrics`.
pub async fn scrape_wire_egress(hostport: &str, host: &str) -> Option<u64> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()??;
    let mut sum = None;
    for line in text.lines() {
        if let Some(v) = line
            .strip_prefix("starling_dataplane_sent_bytes_total{kind=\"wire_")
            .and_then(|rest| rest.rsplit_once(' '))
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        {
            *sum.get_or_insert(0u64) += v as u64;
        }
    }
    sum
}

/// The data-plane child process (`starling-loadtest dataplane`): starts a node
/// registered with `control_url` (reached as `transport` says), prints `ready wire=ADDR http=ADDR` on stdout, and
/// runs until its stdin closes (the coordinator stopped or died).
pub fn dataplane_child(
    control_url: String,
    transport: starling_proto::transport::Transport,
    cores: usize,
    capacity_viewers: u32,
    node_key: Option<&str>,
) -> Result<(), HarnessError> {
    let node_key = node_key
        .map(starling_dataplane::NodeKey::new)
        .transpose()
        .map_err(|e| HarnessError::Start(format!("node key: {e}")))?;
    let cfg = starling_dataplane::Config {
        node_key,
        control_url: Some(control_url),
        control_transport: transport,
        wire_listen: ([127, 0, 0, 1], 0).into(),
        http_listen: ([127, 0, 0, 1], 0).into(),
        advertise_host: "127.0.0.1".into(),
        node_name: "loadtest-run-node".into(),
        cores: cores.max(1),
        io_memory_kib: 512,
        capacity_viewers,
        limits: crate::deployment::loopback_limits(),
        // The run's synthetic source is on loopback.
        source_policy: starling_dataplane::source_policy::SourcePolicy::with_loopback(),
        ..starling_dataplane::Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| HarnessError::Start(format!("tokio: {e}")))?;
    let node = rt
        .block_on(async {
            tokio::task::spawn_blocking(move || starling_dataplane::Node::start(cfg)).await
        })
        .map_err(|e| HarnessError::Start(format!("data plane: {e}")))?
        .map_err(|e| HarnessError::Start(format!("data plane: {e}")))?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "ready wire={} http={}",
            node.wire_addr(),
            node.http_addr()
        );
        let _ = out.flush();
    }
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    node.shutdown();
    let _ = node.join();
    drop(rt);
    Ok(())
}
