//! The join phase: `--sessions` joins at `--concurrency` over shared HTTP/2
//! connections, with RESOURCE_EXHAUSTED pushback honoured (plus jitter) and every
//! successful call's latency in a histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{JoinRequest, JoinResponse};
use tonic::transport::Channel;

use super::config::{BenchConfig, PeerAddrs};
use super::stats::{CodeCounts, Histogram, code_name};

/// Attempts per join before it counts as failed (pushback and UNAVAILABLE retries).
const MAX_ATTEMPTS: u32 = 100;
/// Pushback assumed when a RESOURCE_EXHAUSTED answer carries none.
const DEFAULT_PUSHBACK_MS: u64 = 100;

/// What the join phase measured.
#[derive(Debug, Default)]
pub struct JoinStats {
    /// Joins admitted.
    pub joined: u64,
    /// Joins given up (a non-retryable error, or too many attempts).
    pub failed: u64,
    /// Latency of every admitted call, microseconds.
    pub latency: Histogram,
    /// Error answers by gRPC code (retried ones included).
    pub errors: CodeCounts,
    /// RESOURCE_EXHAUSTED answers honoured by waiting and retrying.
    pub pushbacks: u64,
    /// Total time waited on pushback, ms.
    pub pushback_wait_ms: u64,
    /// Phase wall time.
    pub wall: Duration,
}

/// One join's request parameters: the `i`th viewer of the upload profile.
pub fn join_request(cfg: &BenchConfig, broadcast_id: &str, i: usize) -> JoinRequest {
    let profile = &cfg.upload_profile;
    let copies = if profile.is_empty() {
        0.0
    } else {
        profile[i % profile.len()]
    };
    let upload_kbps = (copies * f64::from(cfg.stream_kbps)).round() as u32;
    let peer_addr = if upload_kbps == 0 {
        String::new()
    } else {
        match cfg.peer_addrs {
            PeerAddrs::Diverse => {
                let n = i + 1;
                format!("10.{}.{}.{}:7000", (n >> 16) & 255, (n >> 8) & 255, n & 255)
            }
            PeerAddrs::Loopback => format!("127.0.0.1:{}", 1024 + i % 64_000),
        }
    };
    JoinRequest {
        broadcast_id: broadcast_id.to_string(),
        credential: String::new(),
        client_version: "starling-control-bench/0".into(),
        peer_addr,
        upload_kbps,
        // As the SDK does: version-2 (MAC) parent tickets.
        mac_tickets: true,
        // Any non-zero 32 bytes: the control plane only copies it into the token.
        holder_key: vec![(i % 255) as u8 + 1; 32],
        host_addr: String::new(),
    }
}

/// The `grpc-retry-pushback-ms` trailer of `status`, if any.
fn pushback_ms(status: &tonic::Status) -> Option<u64> {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Shared between the join workers.
struct Shared {
    next: AtomicUsize,
    stats: Mutex<JoinStats>,
}

/// Joins `count` sessions (indices `0..count`) at `cfg.concurrency`,
/// round-robin over `channels`; each admitted join is handed to `on_joined(index,
/// response)` at once (so its keep-alive starts). `done` counts finished joins (for
/// progress); `abort` stops the phase early.
pub async fn run<F>(
    cfg: &BenchConfig,
    broadcast_id: &str,
    channels: &[Channel],
    count: usize,
    done: Arc<AtomicU64>,
    abort: Arc<AtomicBool>,
    on_joined: Arc<F>,
) -> JoinStats
where
    F: Fn(usize, JoinResponse) + Send + Sync + 'static,
{
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        stats: Mutex::new(JoinStats::default()),
    });
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..cfg.concurrency.max(1).min(count.max(1)) {
        let Some(channel) = channels.get(w % channels.len().max(1)).cloned() else {
            break;
        };
        let shared = shared.clone();
        let cfg = cfg.clone();
        let broadcast_id = broadcast_id.to_string();
        let done = done.clone();
        let abort = abort.clone();
        let on_joined = on_joined.clone();
        workers.push(tokio::spawn(async move {
            let mut client = ViewerServiceClient::new(channel);
            loop {
                let k = shared.next.fetch_add(1, Ordering::Relaxed);
                if k >= count || abort.load(Ordering::Relaxed) {
                    return;
                }
                let i = k;
                let req = join_request(&cfg, &broadcast_id, i);
                if let Some(resp) = join_one(&cfg, &mut client, req, &shared.stats, &abort).await {
                    on_joined(i, resp);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let mut stats = std::mem::take(&mut *shared.stats.lock());
    stats.wall = started.elapsed();
    stats
}

/// One join with its retries; `None` when it failed for good.
pub async fn join_one(
    cfg: &BenchConfig,
    client: &mut ViewerServiceClient<Channel>,
    req: JoinRequest,
    stats: &Mutex<JoinStats>,
    abort: &AtomicBool,
) -> Option<JoinResponse> {
    for _ in 0..MAX_ATTEMPTS {
        if abort.load(Ordering::Relaxed) {
            return None;
        }
        let t = Instant::now();
        let answer = tokio::time::timeout(cfg.call_timeout, client.join(req.clone())).await;
        let status = match answer {
            Ok(Ok(resp)) => {
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut s = stats.lock();
                s.latency.record(us);
                s.joined += 1;
                return Some(resp.into_inner());
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded("bench call timeout"),
        };
        *stats
            .lock()
            .errors
            .entry(code_name(status.code()))
            .or_default() += 1;
        let wait_ms = match status.code() {
            tonic::Code::ResourceExhausted => {
                let ms = pushback_ms(&status).unwrap_or(DEFAULT_PUSHBACK_MS);
                let jitter = rand::rng().random_range(0..=ms / 2 + 10);
                let mut s = stats.lock();
                s.pushbacks += 1;
                s.pushback_wait_ms += ms + jitter;
                ms + jitter
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                100 + rand::rng().random_range(0..100)
            }
            _ => break,
        };
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
    stats.lock().failed += 1;
    None
}
