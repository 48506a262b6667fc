//! The merged report of a run ([`RunReport`], with its per-process lines and
//! percentiles) and its text form.

use super::perpeer::{JoinGroups, LagHistogram};
use super::rss::RssFigures;
use super::series::Series;
use crate::report::{LatencyFigures, Percentiles};
use crate::worker::{ControlTraffic, FabricLateness};
use serde::Serialize;
use std::collections::BTreeMap;

/// Percentiles as reported.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct P3 {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl From<Percentiles> for P3 {
    fn from(p: Percentiles) -> P3 {
        P3 {
            p50: p.p50,
            p95: p.p95,
            p99: p.p99,
        }
    }
}

/// p50 / p99.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct P2 {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// One process of the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    /// `coordinator` (source + control plane), `dataplane`, `worker-N`.
    pub role: String,
    /// Host name (workers).
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Peers it held (workers).
    pub peers: usize,
    /// CPU seconds (user + system).
    pub cpu_s: f64,
    /// Peak RSS, bytes.
    pub max_rss_bytes: u64,
}

/// The merged report of a run (`--json` writes it as is).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Peers asked for (initial audience).
    pub peers: usize,
    /// Distinct peers whose join succeeded (re-joins after churn included).
    pub peers_joined: usize,
    /// Of the initial audience, peers whose join succeeded.
    pub initial_peers_joined: usize,
    /// Peers playing at the end.
    pub peers_active_at_end: usize,
    /// Peers that left (churn).
    pub peers_left: usize,
    /// Peers whose every join attempt failed.
    pub join_failures: usize,
    /// Viewers that stopped on their own.
    pub peers_closed: usize,
    /// Worker processes.
    pub workers: usize,
    /// The measured window T: from the start of the joins to the stop, seconds.
    pub duration_s: f64,
    /// Of which the join ramp.
    pub ramp_s: f64,
    /// Seconds the ramp was held because this machine was saturated
    /// ([`RunConfig::max_busy`]).
    pub ramp_held_s: f64,
    /// The ramp ended early, with this many active peers, because this machine stayed
    /// saturated ([`RunConfig::max_busy`]); the rest never joined.
    pub admission_closed_at_peers: Option<usize>,
    /// Of which the steady phase.
    pub steady_s: f64,
    /// Stream rate of the source (media payload), kbit/s.
    pub bitrate_kbps: u32,
    /// Stream rate as delivered (payload plus each chunk's frame header and signature
    /// block), kbit/s, as the data plane measured it: the `r` of the upload budgets and
    /// of the fluid bound, since every byte of it must reach every viewer and peers
    /// spend their upload budgets in these bytes. `bitrate_kbps` when not measured.
    pub stream_kbps: u32,
    /// Chunk duration, ms.
    pub chunk_ms: u32,
    /// Substreams.
    pub substreams: u32,
    /// The peers of a worker shared a cache of authentic chunk signatures (false: every
    /// peer checked every signature itself).
    pub shared_signature_cache: bool,
    /// Upload profile (multiples of the stream rate).
    pub upload_profile: Vec<f64>,
    /// Joins per second.
    pub join_rate: f64,
    /// Churn, leaves (and re-joins) per minute.
    pub churn_per_min: f64,
    /// Bytes from peers / all bytes delivered, over all peers and the whole run.
    pub peer_share: f64,
    /// Chunks played on time / chunks due, over all peers and the whole run.
    pub continuity: f64,
    /// Start-up times (join call start to first chunk out), ms.
    pub startup_ms: P3,
    /// Lag behind live (wall clock at play-out minus the time the data plane cut the
    /// chunk, SDK `Stats::lag`), sampled every second for every playing peer, ms
    /// (10 ms buckets, upper edge); `null` when no SDK reported a lag.
    pub lag_ms: Option<P2>,
    /// SDK stalls (runs of consecutive chunks that missed their deadline).
    pub stalls: u64,
    /// Chunks that missed their deadline.
    pub chunks_skipped: u64,
    /// Chunks played on time.
    pub chunks_played: u64,
    /// Bytes the data plane wrote to wire viewers over T (framing included), or the
    /// SDKs' `bytes_from_server` when the data plane's counter is not reachable.
    pub server_egress_bytes: u64,
    /// `dataplane_metrics` or `sdk_bytes_from_server`.
    pub server_egress_source: String,
    /// `∫ max(r, n(t)·r − Σu(t)) dt` over T (0 while nobody is present), from the
    /// upload budgets of the peers present at each moment, bytes.
    pub fluid_bound_bytes: f64,
    /// server_egress_bytes / fluid_bound_bytes.
    pub server_egress_over_bound: f64,
    /// What peers uploaded beyond their budgets over the run: chunk bytes as sent
    /// (frames with signature blocks) less Σ budget × time present:
    /// a relay may push on up to 3 s of debt, so in a scarce swarm, where every budget
    /// is spent, about 3 s of each peer's budget is upload the bound does not grant.
    pub upload_over_budget_bytes: f64,
    /// (server_egress_bytes + upload_over_budget_bytes) / fluid_bound_bytes: the ratio
    /// had the peers kept to their budgets exactly.
    pub server_egress_over_bound_at_budget: f64,
    /// Payload bytes from the data plane (SDK counters).
    pub bytes_from_server: u64,
    /// Payload bytes from peers.
    pub bytes_from_peers: u64,
    /// Payload bytes uploaded.
    pub bytes_uploaded: u64,
    /// Mean upload budget of the peers, multiples of the stream rate.
    pub upload_mean: f64,
    /// Duration of the successful join calls, ms.
    pub join_rpc_ms: P2,
    /// CPU seconds per process (`coordinator`, `dataplane`, `worker-N`) and `total`.
    pub cpu_s: BTreeMap<String, f64>,
    /// Cores of the machine running `run` (`available_parallelism`).
    pub cpu_cores: usize,
    /// CPU seconds of the processes on this machine (workers on other hosts excluded)
    /// over `duration_s × cpu_cores`: near 1, the machine, not the design, limits the
    /// run (everything is late because nothing gets scheduled in time).
    pub cpu_utilization: f64,
    /// `cpu_utilization ≥ 0.85` ([`super::MACHINE_BOUND_BUSY`]), or the admission guard
    /// closed the ramp: the figures describe this machine's limit.
    pub machine_bound: bool,
    /// This machine's busy fraction (all cores, `/proc/stat`), sampled every second by
    /// the coordinator: `[[t_s, busy], ...]` (seconds since the start of the joins; a
    /// point covers the time since the previous one; bounded, long runs average pairs).
    pub machine_busy: Series,
    /// Peak RSS per process and `max`.
    pub max_rss_bytes: BTreeMap<String, u64>,
    /// Per process.
    pub processes: Vec<ProcessReport>,
    /// Interval of the RSS samples, seconds.
    pub rss_every_s: f64,
    /// Per process (the order of `processes`): RSS sampled over the run, after warm-up,
    /// at the end, max, flat after warm-up, and the series.
    pub rss: Vec<RssFigures>,
    /// Active peers whose output is not byte-identical to the source.
    pub not_identical: usize,
    /// Output bytes checked against the source.
    pub output_bytes_checked: u64,
    /// Parent changes.
    pub parent_changes: u64,
    /// Re-parent times over every peer (parent lost or re-searched to the first chunk
    /// from the new parent), ms: count, p50, p99, max (histogram bucket bounds capped at
    /// the max), mean.
    pub reparent_ms: LatencyFigures,
    /// Of those, the time to the control plane's `Reparent` answer, ms.
    pub reparent_answer_ms: LatencyFigures,
    /// The control plane's grid figures at the end, when readable.
    pub grid: Option<serde_json::Value>,
    /// Every peer's stay: `[joined_s, left_s or null, upload_kbps, startup_ms,
    /// lag_p50_ms, lag_p99_ms]` (times from the start of the joins; the last three
    /// null when not measured: no first chunk, or no lag sample).
    /// The first three are the input of `fluid_bound_bytes`.
    pub stays: Vec<Stay6>,
    /// Lag behind live in buckets (<=1 s, 1-2, 2-3, 3-5, >5 s): peers by their lag p99
    /// and every lag sample.
    pub lag_histogram: LagHistogram,
    /// The joined peers split by how busy this machine was when each joined (the
    /// ramp's effect): start-up, lag and continuity of both groups.
    pub join_groups: JoinGroups,
    /// How the sessions reached the control plane: sessions joined and the HTTP/2
    /// connections that carried them (`--net sim` shares connections); `None`: one
    /// connection per SDK viewer.
    pub control_traffic: Option<ControlTraffic>,
    /// `--net sim`: the simulated network's events run late (over
    /// [`FabricLateness::BOUND_SHARE`] of its deadlines: MACHINE-BOUND).
    pub sim_fabric: Option<FabricLateness>,
    /// What went wrong, bounded.
    pub errors: Vec<String>,
    /// How many things went wrong (may exceed `errors.len()`).
    pub error_count: usize,
}

pub(super) const MAX_ERRORS: usize = 100;

/// One peer's stay in the JSON (see [`RunReport::stays`]).
pub type Stay6 = (f64, Option<f64>, u32, Option<f64>, Option<u64>, Option<u64>);

impl RunReport {
    pub(super) fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "peers {} (joined {}, active at end {}, left {}, join failures {}, stopped {}) over {} workers; {} kbps ({} kbps as delivered), chunk {} ms, K={}, upload mean {:.2}x {:?}",
            self.peers,
            self.peers_joined,
            self.peers_active_at_end,
            self.peers_left,
            self.join_failures,
            self.peers_closed,
            self.workers,
            self.bitrate_kbps,
            self.stream_kbps,
            self.chunk_ms,
            self.substreams,
            self.upload_mean,
            self.upload_profile
        )?;
        writeln!(
            f,
            "window {:.1} s (ramp {:.1} s at {}/s, steady {:.1} s, churn {}/min); chunk signatures: {}",
            self.duration_s,
            self.ramp_s,
            self.join_rate,
            self.steady_s,
            self.churn_per_min,
            if self.shared_signature_cache {
                "each checked once per worker process (--no-signature-cache: by every peer)"
            } else {
                "checked by every peer"
            }
        )?;
        writeln!(
            f,
            "peer share {:.2}%  continuity {:.5} (played {}, skipped {}, stalls {})",
            self.peer_share * 100.0,
            self.continuity,
            self.chunks_played,
            self.chunks_skipped,
            self.stalls
        )?;
        writeln!(
            f,
            "server egress {} B ({}) = {:.3} x fluid bound {:.0} B; peers uploaded {:.0} B beyond their budgets (push debt), {:.3} x had they not",
            self.server_egress_bytes,
            self.server_egress_source,
            self.server_egress_over_bound,
            self.fluid_bound_bytes,
            self.upload_over_budget_bytes,
            self.server_egress_over_bound_at_budget
        )?;
        writeln!(
            f,
            "startup ms p50 {:.0} p95 {:.0} p99 {:.0}; lag ms {}; join call ms p50 {:.0} p99 {:.0}",
            self.startup_ms.p50,
            self.startup_ms.p95,
            self.startup_ms.p99,
            match self.lag_ms {
                Some(l) => format!("p50 {:.0} p99 {:.0}", l.p50, l.p99),
                None => "n/a (no SDK reported a lag)".into(),
            },
            self.join_rpc_ms.p50,
            self.join_rpc_ms.p99
        )?;
        writeln!(f, "{}", self.lag_histogram)?;
        writeln!(f, "{}", self.join_groups)?;
        writeln!(
            f,
            "identity: {} bytes checked, {} peers not byte-identical; parent changes {} (all causes, the control plane's own moves included)",
            self.output_bytes_checked, self.not_identical, self.parent_changes
        )?;
        writeln!(
            f,
            "reparent_ms {} (parent lost or re-searched -> first chunk from the new parent); to the Reparent answer {}",
            self.reparent_ms, self.reparent_answer_ms
        )?;
        match self.control_traffic {
            Some(c) => writeln!(
                f,
                "control plane: {} sessions over {} shared HTTP/2 connections (real gRPC: joins, session streams, re-parents, reports, leaves)",
                c.sessions, c.connections
            )?,
            None => writeln!(f, "control plane: one HTTP/2 connection per SDK viewer")?,
        }
        if let Some(l) = self.sim_fabric {
            writeln!(
                f,
                "sim fabric: {} of {} node deadlines' events run more than 50 ms late (the latest by {} ms){}",
                l.late_events,
                l.deadlines,
                l.max_late_ms,
                if l.machine_bound() {
                    ": the simulated network did not keep time"
                } else {
                    ""
                }
            )?;
        }
        for p in &self.processes {
            writeln!(
                f,
                "process {:<12} pid {:>7} peers {:>6} cpu {:>8.1} s  max rss {:>6.1} MiB{}",
                p.role,
                p.pid,
                p.peers,
                p.cpu_s,
                p.max_rss_bytes as f64 / 1048576.0,
                if p.host.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", p.host)
                }
            )?;
        }
        for r in &self.rss {
            writeln!(f, "{r}")?;
        }
        if self.ramp_held_s > 0.0 || self.admission_closed_at_peers.is_some() {
            writeln!(
                f,
                "admission: ramp held {:.0} s while this machine was saturated{}",
                self.ramp_held_s,
                match self.admission_closed_at_peers {
                    Some(n) => format!(
                        "; closed at {n} active peers (the rest never joined: this machine's limit)"
                    ),
                    None => String::new(),
                }
            )?;
        }
        writeln!(
            f,
            "machine: {} cores, {:.0}% busy over the window{}",
            self.cpu_cores,
            self.cpu_utilization * 100.0,
            if self.machine_bound {
                " -- MACHINE-BOUND: these figures are this machine's limit, not the grid's \
                 (run fewer peers here, or add workers on other machines)"
            } else {
                ""
            }
        )?;
        write!(f, "errors: {}", self.error_count)?;
        for e in &self.errors {
            write!(f, "\n  error: {e}")?;
        }
        Ok(())
    }
}
