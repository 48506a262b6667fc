//! A `run` worker: one process holding a share of the peers, driven by the coordinator
//! ([`crate::run`]) over one TCP connection that carries newline-delimited JSON.
//!
//! The exchange, one JSON object per line:
//!
//! ```text
//! worker -> coordinator  {"type":"ready","pid":..,"host":..}
//! coordinator -> worker  {"type":"hello","worker":0,"control_url":..,"broadcast_id":..,"peers":..,..}
//! coordinator -> worker  {"type":"start"}
//! worker -> coordinator  {"type":"sample",..}              every `sample_ms`
//! coordinator -> worker  {"type":"churn","count":3}         3 peers leave, 3 new ones join
//! coordinator -> worker  {"type":"stop"}
//! worker -> coordinator  {"type":"final",..}               then the worker's peers leave
//! ```
//!
//! A worker that loses its coordinator makes its peers leave and exits. Each worker's
//! peers use their own block of 62,500 loopback addresses (`127.(1+w).x.y`), so
//! workers never contend for ports.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use crate::error::HarnessError;
use crate::pattern::Pattern;
use crate::report::{LatencyWire, PeerState, Report};
use crate::swarm::{Swarm, SwarmConfig, UploadProfile};

/// Peers per worker address block: worker `w`'s peers are `peer_ip(w * 62_500 + i)`,
/// i.e. `127.(1+w).x.y`.
pub const ADDRESS_BLOCK: usize = 62_500;

/// Lag histogram bucket width, ms.
pub const LAG_BUCKET_MS: u64 = 10;

/// The `q` quantile (nearest rank) of a lag histogram (`bucket → count`, bucket = lag
/// ms / [`LAG_BUCKET_MS`]), ms: the bucket's upper end; 0 when empty.
pub fn lag_percentile(hist: &BTreeMap<u64, u64>, q: f64) -> f64 {
    let total: u64 = hist.values().sum();
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total.max(1));
    let mut seen = 0;
    for (b, n) in hist {
        seen += n;
        if seen >= rank {
            return ((b + 1) * LAG_BUCKET_MS) as f64;
        }
    }
    0.0
}

/// What the coordinator tells a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// A handful of messages per run: the size of `Hello` does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ToWorker {
    /// The worker's share and where the broadcast is.
    Hello(Hello),
    /// Start joining.
    Start,
    /// Pause (`true`) or resume (`false`) starting joins: the coordinator's machine is
    /// saturated (see `RunConfig::max_busy`).
    Hold {
        /// Pause.
        hold: bool,
    },
    /// Make `count` peers leave and as many new ones join.
    Churn {
        /// Leaves (and re-joins).
        count: usize,
    },
    /// Send the final figures, make every peer leave, exit.
    Stop,
}

/// A worker's assignment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Worker number (connection order).
    pub worker: usize,
    /// The control plane's gRPC URL.
    pub control_url: String,
    /// The CA certificate (PEM) that verifies the control plane's TLS certificate;
    /// `None`: the built-in web PKI roots.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// The coordinator's explicit plaintext opt-in (an `http://` control URL).
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// The broadcast to join.
    pub broadcast_id: String,
    /// Stream rate, kbit/s.
    pub stream_kbps: u32,
    /// Key of the synthetic source's pattern; `None` = no identity check (unknown
    /// source).
    pub pattern_seed: Option<u64>,
    /// Peers to join.
    pub peers: usize,
    /// Added to local peer indices for addresses and upload budgets.
    pub index_offset: usize,
    /// Upload budgets as multiples of the stream rate.
    pub upload_profile: Vec<f64>,
    /// This worker's joins per second (0 = all at once).
    pub join_rate: f64,
    /// Play-out lag behind live, ms; `None` = the SDK default.
    pub target_lag_ms: Option<u64>,
    /// Interval between samples, ms.
    pub sample_ms: u64,
    /// Peers of a worker share a cache of authentic chunk signatures
    /// ([`SwarmConfig::shared_signature_cache`]).
    #[serde(default = "yes")]
    pub shared_signature_cache: bool,
    /// Chunk duration, ms (simulated peers need it before their joins).
    #[serde(default)]
    pub chunk_ms: Option<u32>,
    /// Substreams (K), likewise.
    #[serde(default)]
    pub substreams: Option<u32>,
    /// The simulated network (`--net sim` only; `None`: its defaults).
    #[serde(default)]
    pub sim: Option<SimLinks>,
}

/// The simulated network's links, as `run --net sim` is told them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SimLinks {
    /// Shortest one-way peer-to-peer latency, ms (each link draws once, uniformly).
    pub latency_min_ms: u64,
    /// Longest, ms.
    pub latency_max_ms: u64,
    /// Extra delay per frame, uniform in `[0, jitter]`, ms.
    pub jitter_ms: u64,
    /// Probability that a peer-to-peer frame is lost.
    pub loss: f64,
    /// A peer's physical uplink as a multiple of its relay budget.
    pub uplink_factor: f64,
}

impl Default for SimLinks {
    /// One country: 5–40 ms, no jitter or loss, uplinks twice the budget.
    fn default() -> SimLinks {
        SimLinks {
            latency_min_ms: 5,
            latency_max_ms: 40,
            jitter_ms: 0,
            loss: 0.0,
            uplink_factor: 2.0,
        }
    }
}

fn yes() -> bool {
    true
}

/// What a worker tells the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// Connected.
    Ready {
        /// Process id.
        pid: u32,
        /// Host name (for reports of remote workers).
        host: String,
    },
    /// Periodic figures.
    Sample(WorkerSample),
    /// Figures at stop, with every peer's record.
    Final(WorkerFinal),
}

/// CPU and memory of one process.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcStats {
    /// Process id.
    pub pid: u32,
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
    /// Resident set size now, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size, bytes.
    pub max_rss_bytes: u64,
}

impl ProcStats {
    /// This process, from `/proc/self` (zeros where unavailable).
    pub fn current() -> ProcStats {
        ProcStats::of_pid(std::process::id())
    }

    /// Process `pid`, from `/proc/<pid>/stat` (utime + stime at USER_HZ = 100) and
    /// `/proc/<pid>/status` (VmRSS, VmHWM).
    pub fn of_pid(pid: u32) -> ProcStats {
        let mut p = ProcStats {
            pid,
            ..ProcStats::default()
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name (which may contain spaces): state is the
            // 3rd field of the line, utime the 14th, stime the 15th.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                p.cpu_s = (ticks(11) + ticks(12)) as f64 / 100.0;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status.lines() {
                let kib = |l: &str| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                        * 1024
                };
                if line.starts_with("VmRSS:") {
                    p.rss_bytes = kib(line);
                } else if line.starts_with("VmHWM:") {
                    p.max_rss_bytes = kib(line);
                }
            }
        }
        p
    }
}

/// A worker's figures at one moment (byte and chunk counters cover every peer it ever
/// had, those that left included).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerSample {
    /// Worker number.
    pub worker: usize,
    /// Seconds since the worker started joining.
    pub elapsed_s: f64,
    /// Peers ever added (re-joins included).
    pub peers_total: usize,
    /// Playing now.
    pub active: usize,
    /// Join in progress.
    pub joining: usize,
    /// Left on purpose (churn).
    pub left: usize,
    /// Every join attempt failed.
    pub join_failures: usize,
    /// Viewers that stopped on their own.
    pub closed: usize,
    /// Payload bytes from the data plane.
    pub bytes_from_server: u64,
    /// Payload bytes from peers.
    pub bytes_from_peers: u64,
    /// Payload bytes uploaded.
    pub bytes_uploaded: u64,
    /// Chunks played on time.
    pub chunks_played: u64,
    /// Chunks that missed their deadline.
    pub chunks_skipped: u64,
    /// SDK stalls (runs of skipped chunks).
    pub stalls: u64,
    /// Parent changes.
    pub parent_changes: u64,
    /// Re-parent times of every peer it ever had, merged (SDK `Stats::reparent_time`).
    #[serde(default)]
    pub reparent: LatencyWire,
    /// Times to the `Reparent` answer, merged.
    #[serde(default)]
    pub reparent_answer: LatencyWire,
    /// Active peers whose output is not byte-identical to the source.
    pub not_identical: usize,
    /// Output bytes checked against the source, active peers.
    pub output_bytes: u64,
    /// Times the harness's own readers fell behind.
    pub consumer_drops: u64,
    /// The worker process.
    pub process: ProcStats,
}

/// One peer over the run, as the final report needs it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Global index (worker offset + local index).
    pub index: usize,
    /// Upload budget, kbit/s.
    pub upload_kbps: u32,
    /// Seconds since the worker started when its join succeeded.
    pub joined_s: Option<f64>,
    /// Seconds since the worker started when it left (`None`: still there at stop).
    pub left_s: Option<f64>,
    /// Duration of the successful join call.
    pub join_rpc_ms: Option<u64>,
    /// Start-up time.
    pub startup_ms: Option<f64>,
    /// Chunks played on time.
    pub chunks_played: u64,
    /// Chunks that missed their deadline.
    pub chunks_skipped: u64,
    /// SDK stalls.
    pub stalls: u64,
    /// Payload bytes from the data plane.
    pub bytes_from_server: u64,
    /// Payload bytes from peers.
    pub bytes_from_peers: u64,
    /// Payload bytes uploaded.
    pub bytes_uploaded: u64,
    /// The same as sent (frames with their signature blocks).
    #[serde(default)]
    pub wire_bytes_uploaded: u64,
    /// Lag behind live over the peer's stay, p50 and p99, ms (sampled once a second
    /// while it played; histogram bucket bounds capped at the max; `None` when never
    /// sampled).
    #[serde(default)]
    pub lag_p50_ms: Option<u64>,
    #[serde(default)]
    pub lag_p99_ms: Option<u64>,
}

/// A worker's figures at stop.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerFinal {
    /// The last sample.
    pub sample: WorkerSample,
    /// Every peer the worker ever had.
    pub peers: Vec<PeerRecord>,
    /// Lag behind live of every present peer at every sample:
    /// `(bucket, count)`, bucket = lag ms / [`LAG_BUCKET_MS`].
    pub lag_hist: Vec<(u64, u64)>,
    /// What went wrong (bounded).
    pub errors: Vec<String>,
    /// How the worker's sessions reached the control plane (`None`: one HTTP/2
    /// connection per SDK viewer, `--net sockets`).
    #[serde(default)]
    pub control: Option<ControlTraffic>,
    /// `--net sim`: how far the simulated network fell behind its own schedule.
    #[serde(default)]
    pub sim_fabric: Option<FabricLateness>,
}

/// A simulated network's events run behind their due time (`--net sim`): the process
/// was short of CPU, so the network it simulated was slower than the one configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricLateness {
    /// Events run more than 50 ms after they were due.
    pub late_events: u64,
    /// The latest of them, ms.
    pub max_late_ms: u64,
    /// Node deadlines run in all (the scale `late_events` is read against).
    pub deadlines: u64,
}

impl FabricLateness {
    /// Beyond this share of late events among the deadlines run, a run measured the
    /// machine, not the grid.
    pub const BOUND_SHARE: f64 = 0.01;

    /// The simulated network did not keep time.
    pub fn machine_bound(&self) -> bool {
        self.late_events as f64 > Self::BOUND_SHARE * self.deadlines.max(1) as f64
    }
}

/// A worker's traffic to the control plane (`--net sim`: sessions share connections).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlTraffic {
    /// Sessions joined (re-joins included).
    pub sessions: u64,
    /// HTTP/2 connections that carried them.
    pub connections: u64,
}

/// Where a worker connects.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator's `HOST:PORT`.
    pub coordinator: String,
    /// How long to keep trying to connect.
    pub connect_timeout: Duration,
}

pub(crate) async fn send(w: &mut OwnedWriteHalf, msg: &FromWorker) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

struct Sampler {
    worker: usize,
    offset: usize,
    lag: BTreeMap<u64, u64>,
    /// Each peer's lag samples, by local index (a few hundred bytes a peer).
    peer_lag: Vec<starling_grid::peer::LatencySummary>,
}

impl Sampler {
    fn sample(&mut self, swarm: &Swarm, with_records: bool) -> (WorkerSample, Vec<PeerRecord>) {
        let snap = swarm.sample();
        let report = Report::of(&snap);
        let mut s = WorkerSample {
            worker: self.worker,
            elapsed_s: snap.elapsed.as_secs_f64(),
            peers_total: report.peers_total,
            active: report.peers_active,
            joining: report.peers_joining,
            left: report.peers_left,
            join_failures: report.join_failures,
            closed: report.peers_closed,
            not_identical: report.not_identical.len(),
            output_bytes: report.output_bytes,
            consumer_drops: report.consumer_drops,
            process: ProcStats::current(),
            ..WorkerSample::default()
        };
        let mut records = Vec::new();
        let mut reparent = starling_grid::peer::LatencySummary::default();
        let mut reparent_answer = starling_grid::peer::LatencySummary::default();
        for (p, ps) in swarm.presence().into_iter().zip(snap.peers.iter()) {
            let Some(st) = &p.stats else { continue };
            s.bytes_from_server += st.bytes_from_server;
            s.bytes_from_peers += st.bytes_from_peers;
            s.bytes_uploaded += st.bytes_uploaded;
            s.chunks_played += st.chunks_played;
            s.chunks_skipped += st.chunks_skipped;
            s.stalls += st.stalls;
            s.parent_changes += st.parent_changes;
            reparent.merge(&st.reparent_time);
            reparent_answer.merge(&st.reparent_answer_time);
            let present = p.joined_at.is_some() && p.left_at.is_none();
            if let (true, Some(lag)) = (present && ps.state == PeerState::Active, st.lag) {
                let b = lag.as_millis() as u64 / LAG_BUCKET_MS;
                *self.lag.entry(b).or_default() += 1;
                if self.peer_lag.len() <= ps.index {
                    self.peer_lag.resize(ps.index + 1, Default::default());
                }
                if let Some(l) = self.peer_lag.get_mut(ps.index) {
                    l.record(lag);
                }
            }
            if with_records {
                records.push(PeerRecord {
                    index: self.offset + ps.index,
                    upload_kbps: p.upload_kbps,
                    joined_s: p.joined_at.map(|d| d.as_secs_f64()),
                    left_s: p.left_at.map(|d| d.as_secs_f64()),
                    join_rpc_ms: ps.join_rpc_ms,
                    startup_ms: st.startup_time.map(|d| d.as_secs_f64() * 1000.0),
                    chunks_played: st.chunks_played,
                    chunks_skipped: st.chunks_skipped,
                    stalls: st.stalls,
                    bytes_from_server: st.bytes_from_server,
                    bytes_from_peers: st.bytes_from_peers,
                    bytes_uploaded: st.bytes_uploaded,
                    wire_bytes_uploaded: st.wire_bytes_uploaded,
                    lag_p50_ms: self.peer_lag.get(ps.index).and_then(|l| l.quantile_ms(0.5)),
                    lag_p99_ms: self
                        .peer_lag
                        .get(ps.index)
                        .and_then(|l| l.quantile_ms(0.99)),
                });
            }
        }
        s.reparent = LatencyWire::from(&reparent);
        s.reparent_answer = LatencyWire::from(&reparent_answer);
        (s, records)
    }
}

/// Connects to the coordinator, waits for its hello and start, joins the assigned
/// peers, reports samples, obeys churn and stop. Returns when stopped or when the
/// coordinator goes away.
pub async fn run_worker(config: WorkerConfig) -> Result<(), HarnessError> {
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
    let host = hostname();
    send(
        &mut wr,
        &FromWorker::Ready {
            pid: std::process::id(),
            host,
        },
    )
    .await
    .map_err(io)?;

    let mut hello: Option<Hello> = None;
    loop {
        let Some(line) = lines.next_line().await.map_err(io)? else {
            return Ok(()); // the coordinator went away before the start
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
    let Some(hello) = hello else {
        return Err(HarnessError::Config("no hello".into()));
    };
    let upload = if hello.upload_profile.is_empty() {
        UploadProfile::mixed()
    } else {
        UploadProfile {
            multiples: hello.upload_profile.clone(),
        }
    };
    let swarm = Swarm::for_broadcast(
        hello.control_url.clone(),
        crate::tls::hello_transport(hello.ca_pem.as_deref(), hello.insecure_plaintext),
        hello.broadcast_id.clone(),
        hello.stream_kbps,
        Pattern::new(hello.pattern_seed.unwrap_or(0)),
    );
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    let swarm_config = SwarmConfig {
        peers: hello.peers,
        upload,
        join_rate: hello.join_rate,
        target_lag: hello.target_lag_ms.map(Duration::from_millis),
        join_attempts: 3,
        check_identity: hello.pattern_seed.is_some(),
        index_offset: hello.index_offset,
        shared_signature_cache: hello.shared_signature_cache,
        hold: Some(hold_rx),
        ..SwarmConfig::default()
    };
    let joining = {
        let swarm = swarm.clone();
        let cfg = swarm_config.clone();
        tokio::spawn(async move { swarm.add_peers(&cfg).await })
    };
    let mut sampler = Sampler {
        worker: hello.worker,
        offset: hello.index_offset,
        lag: BTreeMap::new(),
        peer_lag: Vec::new(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(hello.sample_ms.max(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut churns = Vec::new();
    let mut churn_seed = hello.index_offset as u64;
    let mut stopped = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (s, _) = sampler.sample(&swarm, false);
                if send(&mut wr, &FromWorker::Sample(s)).await.is_err() {
                    break;
                }
            }
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { break };
                match serde_json::from_str::<ToWorker>(&line) {
                    Ok(ToWorker::Churn { count }) => {
                        churn_seed += 1;
                        let swarm = swarm.clone();
                        let cfg = swarm_config.clone();
                        let seed = churn_seed;
                        churns.push(tokio::spawn(async move {
                            let active = swarm.active().len();
                            if active == 0 || count == 0 {
                                return;
                            }
                            let fraction = count.min(active) as f64 / active as f64;
                            let left = swarm.churn(fraction, seed).await;
                            swarm.add_peers(&SwarmConfig { peers: left.len(), ..cfg }).await;
                        }));
                    }
                    Ok(ToWorker::Hold { hold }) => {
                        let _ = hold_tx.send(hold);
                    }
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
    joining.abort();
    for c in churns {
        c.abort();
    }
    if stopped {
        let (sample, peers) = sampler.sample(&swarm, true);
        let report = Report::of(&swarm.sample());
        let fin = WorkerFinal {
            sample,
            peers,
            lag_hist: sampler.lag.iter().map(|(b, n)| (*b, *n)).collect(),
            errors: report.errors,
            control: None,
            sim_fabric: None,
        };
        send(&mut wr, &FromWorker::Final(fin)).await.map_err(io)?;
        let _ = wr.flush().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), swarm.shutdown()).await;
    Ok(())
}

/// This machine's host name ("" if unreadable).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stats_of_self() {
        let p = ProcStats::current();
        assert_eq!(p.pid, std::process::id());
        assert!(p.max_rss_bytes > 0 && p.rss_bytes > 0);
    }

    #[test]
    fn a_fabric_that_ran_late_more_than_rarely_is_machine_bound() {
        let l = |late_events, deadlines| FabricLateness {
            late_events,
            max_late_ms: 60,
            deadlines,
        };
        assert!(!l(0, 0).machine_bound());
        assert!(!l(10, 1000).machine_bound(), "1 % is noise");
        assert!(l(11, 1000).machine_bound());
        assert!(
            l(2_689_142, 15_682_696).machine_bound(),
            "the 10,000-peer scarce run"
        );
    }
}
