//! The `--net sim` worker: ONE process holding every simulated viewer of a run, driven
//! by the coordinator over the worker line protocol ([`crate::worker`]: hello, start,
//! hold, churn, stop; samples and a final report in the same shapes as a socket
//! worker's). It starts the fabric with a real data plane ([`ServerMode::Wire`]), the
//! gRPC control traffic, joins at the hello's rate (paused while held), and prints on
//! stderr, at the end, how many HTTP/2 connections carried how many sessions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::control::ControlConfig;
use super::dataplane::DpShared;
use super::dispatch;
use super::fabric::Fabric;
use super::msg::{FabricConfig, ServerMode};
use super::{SimNetConfig, Snapshot};
use crate::error::HarnessError;
use crate::pattern::Pattern;
use crate::swarm::UploadProfile;
use crate::worker::{
    ControlTraffic, FabricLateness, FromWorker, Hello, ToWorker, WorkerConfig, WorkerFinal, send,
};

/// Verified signature blocks remembered (a few minutes of stream).
const SIGNATURE_CACHE: usize = 4096;

/// Connects to the coordinator, waits for its hello and start, runs the simulated
/// viewers, reports samples, obeys hold, churn and stop.
pub async fn run_sim_worker(config: WorkerConfig) -> Result<(), HarnessError> {
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let stream = loop {
        match TcpStream::connect(&config.coordinator).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(HarnessError::Start(format!(
                    "coordinator {}: {e}",
                    config.coordinator
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let io = |e: std::io::Error| HarnessError::Start(format!("coordinator link: {e}"));
    let ready = FromWorker::Ready {
        pid: std::process::id(),
        host: crate::worker::hostname(),
    };
    send(&mut wr, &ready).await.map_err(io)?;
    let mut hello: Option<Hello> = None;
    loop {
        let Some(line) = lines.next_line().await.map_err(io)? else {
            return Ok(());
        };
        match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Hello(h)) => hello = Some(h),
            Ok(ToWorker::Start) if hello.is_some() => break,
            Ok(ToWorker::Stop) => return Ok(()),
            Ok(other) => tracing::warn!("unexpected before start: {other:?}"),
            Err(e) => {
                return Err(HarnessError::Config(format!(
                    "bad message from the coordinator: {e}"
                )));
            }
        }
    }
    let Some(h) = hello else {
        return Err(HarnessError::Config("no hello".into()));
    };
    let chunk_ms = h.chunk_ms.unwrap_or(250).max(1);
    let k = u16::try_from(h.substreams.unwrap_or(4).clamp(1, 64)).unwrap_or(4);
    let mut net = SimNetConfig::new(h.stream_kbps, k, Duration::from_millis(u64::from(chunk_ms)));
    net.target_lag = h.target_lag_ms.map(Duration::from_millis);
    if let Some(l) = h.sim {
        net.latency = starling_grid::sim::Latency::Uniform {
            min: Duration::from_millis(l.latency_min_ms),
            max: Duration::from_millis(l.latency_max_ms.max(l.latency_min_ms)),
        };
        net.jitter = Duration::from_millis(l.jitter_ms);
        net.loss = l.loss.clamp(0.0, 1.0);
        net.uplink_factor = l.uplink_factor.max(1.0);
    }
    net.queue = net.queue.max(h.peers * 8);
    let upload = if h.upload_profile.is_empty() {
        UploadProfile::mixed()
    } else {
        UploadProfile {
            multiples: h.upload_profile.clone(),
        }
    };
    let (up_tx, up_rx) = mpsc::channel(h.peers.saturating_mul(8).max(65_536));
    let fabric = Fabric::spawn(
        FabricConfig {
            net,
            upload,
            index_offset: h.index_offset,
            pattern: h.pattern_seed.map(Pattern::new),
            server: ServerMode::Wire,
        },
        up_tx,
    );
    let dp = Arc::new(DpShared::new(u64::from(chunk_ms), SIGNATURE_CACHE));
    let (cc, control) = dispatch::spawn(
        ControlConfig {
            index_offset: h.index_offset,
            data_plane: Some(dp.clone()),
            ..ControlConfig::new(
                h.control_url.clone(),
                crate::tls::hello_transport(h.ca_pem.as_deref(), h.insecure_plaintext),
                h.broadcast_id.clone(),
            )
        },
        up_rx,
        fabric.sender(),
    );
    let mut tick = tokio::time::interval(Duration::from_millis(h.sample_ms.max(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    let (mut added, mut held, mut stopped) = (0usize, false, false);
    let mut last: Option<Snapshot> = None;
    loop {
        tokio::select! {
            _ = pace.tick(), if added < h.peers && !held => {
                let due = if h.join_rate > 0.0 {
                    ((started.elapsed().as_secs_f64() * h.join_rate) as usize).min(h.peers)
                } else {
                    h.peers
                };
                if due > added {
                    fabric.add(due - added).await;
                    added = due;
                }
            }
            _ = tick.tick() => {
                let Some(snap) = fabric.snapshot(false).await else { break };
                let mut s = snap.sample.clone();
                s.worker = h.worker;
                last = Some(snap);
                if send(&mut wr, &FromWorker::Sample(s)).await.is_err() {
                    break;
                }
            }
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { break };
                match serde_json::from_str::<ToWorker>(&line) {
                    Ok(ToWorker::Churn { count }) => {
                        fabric.leave(count).await;
                        fabric.add(count).await;
                    }
                    Ok(ToWorker::Hold { hold }) => held = hold,
                    Ok(ToWorker::Stop) => {
                        stopped = true;
                        break;
                    }
                    Ok(other) => tracing::warn!("unexpected: {other:?}"),
                    Err(e) => tracing::warn!("bad message from the coordinator: {e}"),
                }
            }
        }
    }
    if stopped && let Some(snap) = fabric.snapshot(true).await.or(last) {
        let mut sample = snap.sample;
        sample.worker = h.worker;
        let mut errors = snap.errors;
        if snap.played_without_bytes > 0 {
            errors.push(format!(
                "{} chunks played without bytes",
                snap.played_without_bytes
            ));
        }
        let fin = WorkerFinal {
            sample,
            peers: snap.records,
            lag_hist: snap.lag_hist,
            errors,
            control: Some(ControlTraffic {
                sessions: cc.sessions.load(Ordering::Relaxed),
                connections: cc.connections.load(Ordering::Relaxed),
            }),
            sim_fabric: Some(FabricLateness {
                late_events: snap.net.late_events,
                max_late_ms: snap.net.max_late_us / 1000,
                deadlines: snap.net.ticks,
            }),
        };
        send(&mut wr, &FromWorker::Final(fin)).await.map_err(io)?;
        let _ = wr.flush().await;
    }
    fabric.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(60), control).await;
    eprintln!(
        "sim worker: {} sessions over {} HTTP/2 connections to the control plane \
         ({} session messages down, {} up, {} streams reopened, {} key sets, {} token \
         renewals, {} re-parents, {} bad-peer reports, {} quality reports acknowledged \
         in {} Report calls ({} dropped), {} leaves, {} failed calls); {} data-plane \
         connections failed, {} chunks from the data plane verified ({} refused, {} held \
         for a key), {} requests to it",
        cc.sessions.load(Ordering::Relaxed),
        cc.connections.load(Ordering::Relaxed),
        cc.downs.load(Ordering::Relaxed),
        cc.ups.load(Ordering::Relaxed),
        cc.streams_reopened.load(Ordering::Relaxed),
        cc.key_sets.load(Ordering::Relaxed),
        cc.token_renewals.load(Ordering::Relaxed),
        cc.reparents.load(Ordering::Relaxed),
        cc.peer_reports.load(Ordering::Relaxed),
        cc.quality_reports.load(Ordering::Relaxed),
        cc.report_calls.load(Ordering::Relaxed),
        cc.reports_dropped.load(Ordering::Relaxed),
        cc.leaves.load(Ordering::Relaxed),
        cc.errors.load(Ordering::Relaxed),
        dp.failed.load(Ordering::Relaxed),
        dp.chunks.load(Ordering::Relaxed),
        dp.bad_chunks.load(Ordering::Relaxed),
        dp.held.load(Ordering::Relaxed),
        dp.requests.load(Ordering::Relaxed),
    );
    Ok(())
}
