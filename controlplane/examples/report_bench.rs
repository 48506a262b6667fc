//! How many viewer reports per second the control plane sustains: an in-process control
//! plane (Postgres when `DATABASE_URL` is set, else SQLite in a temp dir), N fake
//! sessions, and C concurrent gRPC clients sending `ViewerService.Report` calls (one
//! report per call, like the SDK) as fast as they are answered for D seconds; then the
//! queue is drained. Prints accepted reports/s, stored (committed) reports/s during the
//! run and end to end, call latency percentiles and the peak queue depth.
//!
//! ```text
//! eval "$(scripts/pg-throwaway.sh start)"
//! cargo run -p starling-controlplane --example report_bench -- [sessions] [seconds] [concurrency] [reports-per-call]
//! ```
//!
//! Client and server share this machine's cores, so the figure is a lower bound for a
//! control plane running alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use starling_controlplane::store::{NewBroadcast, NewSession};
use starling_controlplane::{AuthConfig, ControlPlane, DatabaseConfig, ServiceConfig, Store};
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{ReportRequest, ViewerReport};
use tonic::transport::Channel;

fn now_ms() -> i64 {
    starling_controlplane::service::now_ms()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("numeric arguments: sessions seconds concurrency")
        })
        .collect();
    let sessions_n = args.first().copied().unwrap_or(10_000);
    let seconds = args.get(1).copied().unwrap_or(15);
    let concurrency = args.get(2).copied().unwrap_or(64);
    let per_call = args.get(3).copied().unwrap_or(1).max(1) as u64;

    let dir = tempfile::tempdir()?;
    let db = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => DatabaseConfig::Postgres { url },
        _ => DatabaseConfig::Sqlite {
            path: dir.path().join("bench.db"),
        },
    };
    let store = Store::connect(&db).await?;
    eprintln!(
        "report_bench: {} ({} sessions, {seconds} s, {concurrency} clients)",
        db.describe(),
        sessions_n
    );

    let bid = format!("bench{}", uuid::Uuid::new_v4().simple());
    store
        .create_broadcast(
            &NewBroadcast {
                id: bid.clone(),
                name: "bench".into(),
                source_url: "http://127.0.0.1:1/x".into(),
                chunk_duration_ms: 1000,
                substreams: 8,
                public: true,
            },
            now_ms(),
        )
        .await?;
    let mut sessions = Vec::with_capacity(sessions_n);
    for i in 0..sessions_n {
        let id = format!("bs{i}-{}", uuid::Uuid::new_v4().simple());
        store
            .create_session(
                &NewSession {
                    id: id.clone(),
                    broadcast_id: bid.clone(),
                    client_version: "bench".into(),
                    node_id: None,
                },
                now_ms(),
            )
            .await?;
        sessions.push(id);
    }

    let cp = ControlPlane::bind_with_store(
        "127.0.0.1:0".parse()?,
        store.clone(),
        ServiceConfig::default(),
        &AuthConfig::with_random_admin_key(),
    )
    .await?;
    let reports = cp.reports();
    let cp = cp.spawn();
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(Channel::from_shared(cp.url())?.connect().await?);
    }

    let running = Arc::new(AtomicBool::new(true));
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let sessions = Arc::new(sessions);
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let mut client = ViewerServiceClient::new(channels[c % channels.len()].clone());
        let (running, accepted, refused, sessions) = (
            running.clone(),
            accepted.clone(),
            refused.clone(),
            sessions.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mine: Vec<&String> = sessions.iter().skip(c).step_by(concurrency).collect();
            let mut seqs = vec![0u64; mine.len()];
            let mut lat = Vec::new();
            let mut i = 0;
            while running.load(Ordering::Relaxed) && !mine.is_empty() {
                let first = seqs[i] + 1;
                seqs[i] += per_call;
                let batch: Vec<ViewerReport> = (first..=seqs[i])
                    .map(|k| ViewerReport {
                        report_seq: k,
                        at_unix_ms: now_ms(),
                        bytes_from_server: k * 10_000,
                        bytes_from_peers: k * 90_000,
                        bytes_uploaded: k * 80_000,
                        startup_ms: 400,
                        lag_ms: 1500,
                        buffer_ms: 2000,
                        peers: 4,
                        chunks_played: k * 5,
                        ..Default::default()
                    })
                    .collect();
                let t = Instant::now();
                match client
                    .report(ReportRequest {
                        session_id: mine[i].clone(),
                        reports: batch,
                    })
                    .await
                {
                    Ok(_) => {
                        accepted.fetch_add(per_call, Ordering::Relaxed);
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        seqs[i] -= per_call;
                    }
                }
                lat.push(t.elapsed());
                i = (i + 1) % mine.len();
            }
            lat
        }));
    }

    // Warm-up (first contact loads each session from the database), then measure.
    let warm = Duration::from_secs(3);
    tokio::time::sleep(warm).await;
    let m = cp_metrics(&reports);
    let (a0, s0, t0) = (accepted.load(Ordering::Relaxed), m, Instant::now());
    let mut peak_queue = 0;
    while t0.elapsed() < Duration::from_secs(seconds as u64) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak_queue = peak_queue.max(reports.queue_depth());
    }
    let run = t0.elapsed().as_secs_f64();
    let (a1, s1) = (accepted.load(Ordering::Relaxed), cp_metrics(&reports));
    running.store(false, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let drain_start = Instant::now();
    assert!(reports.flush(Duration::from_secs(600)).await);
    let drain = drain_start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((p * lat.len() as f64) as usize).min(lat.len() - 1)];
    let accepted_rate = (a1 - a0) as f64 / run;
    let stored_rate = (s1 - s0) as f64 / run;
    let e2e = (a1 - a0) as f64 / (run + drain);
    println!(
        "report_bench: backend {}: accepted {accepted_rate:.0} reports/s, stored {stored_rate:.0} reports/s \
         during the run ({:.0} s), {e2e:.0} reports/s end to end incl. {drain:.1} s drain; \
         call latency p50 {:?} p99 {:?}; peak queue {peak_queue}; refused {}",
        store.backend_name(),
        run,
        pct(0.50),
        pct(0.99),
        refused.load(Ordering::Relaxed),
    );
    drop(channels);
    cp.shutdown().await?;
    Ok(())
}

fn cp_metrics(r: &starling_controlplane::reports::Reports) -> u64 {
    r.stored_total()
}
