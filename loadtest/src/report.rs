//! Samples of a swarm and the figures computed from them (over the whole run, or over
//! a window between two samples).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use starling_grid::peer::{LATENCY_BUCKETS, LatencySummary};
use starling_sdk::Stats;

use crate::pattern::OutputCheck;

/// Where a peer is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Its join has not completed yet.
    Joining,
    /// Joined and playing.
    Active,
    /// Left on purpose (churn or shutdown).
    Left,
    /// Every join attempt failed (last error).
    JoinFailed(String),
    /// The viewer stopped without being asked to (reason).
    Closed(String),
}

/// The SDK counters the harness uses (a copy of [`Stats`]' fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Payload bytes from the data plane.
    pub bytes_from_server: u64,
    /// Payload bytes from other peers.
    pub bytes_from_peers: u64,
    /// Payload bytes sent to other peers.
    pub bytes_uploaded: u64,
    /// Chunks played on time.
    pub chunks_played: u64,
    /// Chunks that missed their play-out deadline.
    pub chunks_skipped: u64,
    /// Parent changes (re-parenting).
    pub parent_changes: u64,
    /// Data-plane reconnections.
    pub reconnects: u64,
    /// Times the local subscription fell behind (a harness problem, not a grid one).
    pub consumer_drops: u64,
    /// Child links now.
    pub children: u64,
    /// Re-parent times (SDK [`Stats::reparent_time`]).
    pub reparent: LatencySummary,
    /// Times to the `Reparent` answer (SDK [`Stats::reparent_answer_time`]).
    pub reparent_answer: LatencySummary,
}

impl PeerCounters {
    /// From an SDK snapshot.
    pub fn from_stats(s: &Stats) -> PeerCounters {
        PeerCounters {
            bytes_from_server: s.bytes_from_server,
            bytes_from_peers: s.bytes_from_peers,
            bytes_uploaded: s.bytes_uploaded,
            chunks_played: s.chunks_played,
            chunks_skipped: s.chunks_skipped,
            parent_changes: s.parent_changes,
            reconnects: s.reconnects,
            consumer_drops: s.consumer_drops,
            children: s.children as u64,
            reparent: s.reparent_time,
            reparent_answer: s.reparent_answer_time,
        }
    }

    fn minus(&self, b: &PeerCounters) -> PeerCounters {
        PeerCounters {
            bytes_from_server: self.bytes_from_server.saturating_sub(b.bytes_from_server),
            bytes_from_peers: self.bytes_from_peers.saturating_sub(b.bytes_from_peers),
            bytes_uploaded: self.bytes_uploaded.saturating_sub(b.bytes_uploaded),
            chunks_played: self.chunks_played.saturating_sub(b.chunks_played),
            chunks_skipped: self.chunks_skipped.saturating_sub(b.chunks_skipped),
            parent_changes: self.parent_changes.saturating_sub(b.parent_changes),
            reconnects: self.reconnects.saturating_sub(b.reconnects),
            consumer_drops: self.consumer_drops.saturating_sub(b.consumer_drops),
            children: self.children,
            reparent: self.reparent.since(&b.reparent),
            reparent_answer: self.reparent_answer.since(&b.reparent_answer),
        }
    }
}

/// One peer at one moment.
#[derive(Debug, Clone)]
pub struct PeerSample {
    /// Index in the swarm.
    pub index: usize,
    /// Upload budget, kbit/s.
    pub upload_kbps: u32,
    /// State.
    pub state: PeerState,
    /// From the start of the join to the first chunk handed out.
    pub startup: Option<Duration>,
    /// Duration of the successful `Viewer::join` call (Join RPC + data-plane handshake).
    pub join_rpc_ms: Option<u64>,
    /// SDK counters (frozen at leave for peers that left).
    pub counters: PeerCounters,
    /// The identity check of its output so far.
    pub check: OutputCheck,
}

/// Every peer at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the swarm started joining.
    pub elapsed: Duration,
    /// Stream rate, kbit/s.
    pub stream_kbps: u32,
    /// Per peer, by index.
    pub peers: Vec<PeerSample>,
    /// The data plane's own egress counter, when it has one.
    pub dataplane_egress_bytes: Option<u64>,
}

/// One peer's figures over a window.
#[derive(Debug, Clone)]
pub struct PeerReport {
    /// Index in the swarm.
    pub index: usize,
    /// Upload budget, kbit/s.
    pub upload_kbps: u32,
    /// Counter increments over the window.
    pub delta: PeerCounters,
    /// played / (played + skipped) over the window; 0 when nothing was due (a peer
    /// that plays nothing for a whole window is stalled).
    pub continuity: f64,
    /// Output bytes / (output bytes + bytes skipped in the output) over the window,
    /// from the identity check (independent of the SDK's counters).
    pub output_continuity: f64,
    /// Output bytes checked over the window.
    pub output_bytes: u64,
    /// Whether every output byte so far is the source's, without duplication or
    /// reordering.
    pub identical: bool,
    /// What the identity check found wrong, if anything.
    pub problems: Vec<String>,
    /// Start-up time.
    pub startup: Option<Duration>,
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `v` (any order).
    pub fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Percentiles {
            n: v.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Figures of a [`LatencySummary`] merged over peers, ms (`null`/`-` when empty).
/// Quantiles are histogram bucket upper bounds capped at the maximum (see
/// [`LatencySummary`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// Durations recorded.
    pub count: u64,
    /// Median.
    pub p50: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Maximum.
    pub max: Option<u64>,
    /// Mean.
    pub mean: Option<f64>,
}

impl LatencyFigures {
    /// The figures of a summary.
    pub fn of(s: &LatencySummary) -> LatencyFigures {
        LatencyFigures {
            count: s.count,
            p50: s.quantile_ms(0.50),
            p99: s.quantile_ms(0.99),
            max: (s.count > 0).then_some(s.max_ms),
            mean: s.mean_ms(),
        }
    }
}

impl fmt::Display for LatencyFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |x: Option<u64>| x.map_or_else(|| "-".to_string(), |x| x.to_string());
        write!(
            f,
            "{{count {}, p50 {}, p99 {}, max {}}}",
            self.count,
            v(self.p50),
            v(self.p99),
            v(self.max)
        )
    }
}

/// A [`LatencySummary`] as workers send it to the coordinator (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyWire {
    /// Durations recorded.
    pub count: u64,
    /// Their sum, ms.
    pub sum_ms: u64,
    /// The largest, ms.
    pub max_ms: u64,
    /// Bucket counts ([`starling_grid::peer::LATENCY_BOUNDS_MS`], then overflow).
    pub buckets: Vec<u64>,
}

impl From<&LatencySummary> for LatencyWire {
    fn from(s: &LatencySummary) -> LatencyWire {
        LatencyWire {
            count: s.count,
            sum_ms: s.sum_ms,
            max_ms: s.max_ms,
            buckets: s.buckets.to_vec(),
        }
    }
}

impl LatencyWire {
    /// Back to a summary; buckets beyond the known ones (another SDK version) count
    /// in the overflow bucket.
    pub fn to_summary(&self) -> LatencySummary {
        let mut s = LatencySummary {
            count: self.count,
            sum_ms: self.sum_ms,
            max_ms: self.max_ms,
            ..LatencySummary::default()
        };
        for (i, &n) in self.buckets.iter().enumerate() {
            let b = i.min(LATENCY_BUCKETS - 1);
            s.buckets[b] = s.buckets[b].saturating_add(n);
        }
        s
    }
}

/// The figures of a swarm over a window (or the whole run).
#[derive(Debug, Clone)]
pub struct Report {
    /// Length of the window.
    pub window: Duration,
    /// Stream rate, kbit/s.
    pub stream_kbps: u32,
    /// Peers ever added.
    pub peers_total: usize,
    /// Peers playing at the end of the window (the ones the per-peer figures cover).
    pub peers_active: usize,
    /// Peers that left on purpose.
    pub peers_left: usize,
    /// Peers still joining.
    pub peers_joining: usize,
    /// Peers whose join failed.
    pub join_failures: usize,
    /// Peers whose viewer stopped on its own.
    pub peers_closed: usize,
    /// Payload bytes from the data plane, all peers (those that left included).
    pub bytes_from_server: u64,
    /// Payload bytes from peers, all peers.
    pub bytes_from_peers: u64,
    /// Payload bytes uploaded, all peers.
    pub bytes_uploaded: u64,
    /// bytes_from_peers / (bytes_from_server + bytes_from_peers).
    pub peer_share: f64,
    /// The data plane's own egress counter over the window, when it has one.
    pub dataplane_egress_bytes: Option<u64>,
    /// Chunks played / due over all active peers.
    pub continuity: f64,
    /// Lowest per-peer continuity (1.0 with no active peer).
    pub continuity_min: f64,
    /// Mean per-peer continuity.
    pub continuity_mean: f64,
    /// Lowest per-peer output continuity (identity check).
    pub output_continuity_min: f64,
    /// Chunks played / skipped, active peers.
    pub chunks_played: u64,
    /// Chunks skipped, active peers.
    pub chunks_skipped: u64,
    /// Parent changes, all peers.
    pub parent_changes: u64,
    /// Most parent changes of one peer.
    pub parent_changes_max: u64,
    /// Re-parent times merged over all peers (those that left included): parent lost
    /// or re-searched to the first chunk from the new parent.
    pub reparent: LatencySummary,
    /// Of the same re-parents, the time to the `Reparent` answer.
    pub reparent_answer: LatencySummary,
    /// `reparent` as count / p50 / p99 / max, ms.
    pub reparent_ms: LatencyFigures,
    /// Data-plane reconnections, all peers.
    pub reconnects: u64,
    /// Times a harness subscription fell behind (should be 0).
    pub consumer_drops: u64,
    /// Start-up times of the active peers.
    pub startup_ms: Percentiles,
    /// Durations of the successful join calls.
    pub join_ms: Percentiles,
    /// Active peers whose output is not byte-identical to the source.
    pub not_identical: Vec<usize>,
    /// Output bytes checked over the window, active peers.
    pub output_bytes: u64,
    /// Per active peer.
    pub per_peer: Vec<PeerReport>,
    /// Everything that went wrong (join failures, viewers that stopped, identity
    /// problems), one line each, bounded.
    pub errors: Vec<String>,
}

const MAX_ERRORS: usize = 50;

impl Report {
    /// Figures over the whole run up to `now`.
    pub fn of(now: &Sample) -> Report {
        Report::between(None, now)
    }

    /// Figures between `before` (or the start) and `now`. Per-peer figures cover the
    /// peers active in `now` (and, with `before`, present in it); byte totals cover
    /// every peer.
    pub fn between(before: Option<&Sample>, now: &Sample) -> Report {
        let window = now
            .elapsed
            .saturating_sub(before.map_or(Duration::ZERO, |b| b.elapsed));
        let base = |i: usize| before.and_then(|b| b.peers.get(i));
        let mut r = Report {
            window,
            stream_kbps: now.stream_kbps,
            peers_total: now.peers.len(),
            peers_active: 0,
            peers_left: 0,
            peers_joining: 0,
            join_failures: 0,
            peers_closed: 0,
            bytes_from_server: 0,
            bytes_from_peers: 0,
            bytes_uploaded: 0,
            peer_share: 0.0,
            dataplane_egress_bytes: match (
                before.map(|b| b.dataplane_egress_bytes),
                now.dataplane_egress_bytes,
            ) {
                (Some(Some(b)), Some(n)) => Some(n.saturating_sub(b)),
                (None, n) => n,
                _ => None,
            },
            continuity: 1.0,
            continuity_min: 1.0,
            continuity_mean: 1.0,
            output_continuity_min: 1.0,
            chunks_played: 0,
            chunks_skipped: 0,
            parent_changes: 0,
            parent_changes_max: 0,
            reparent: LatencySummary::default(),
            reparent_answer: LatencySummary::default(),
            reparent_ms: LatencyFigures::default(),
            reconnects: 0,
            consumer_drops: 0,
            startup_ms: Percentiles::default(),
            join_ms: Percentiles::default(),
            not_identical: Vec::new(),
            output_bytes: 0,
            per_peer: Vec::new(),
            errors: Vec::new(),
        };
        let mut startups = Vec::new();
        let mut joins = Vec::new();
        for p in &now.peers {
            let b = base(p.index);
            let delta = match b {
                Some(b) => p.counters.minus(&b.counters),
                None => p.counters,
            };
            r.bytes_from_server += delta.bytes_from_server;
            r.bytes_from_peers += delta.bytes_from_peers;
            r.bytes_uploaded += delta.bytes_uploaded;
            r.parent_changes += delta.parent_changes;
            r.parent_changes_max = r.parent_changes_max.max(delta.parent_changes);
            r.reparent.merge(&delta.reparent);
            r.reparent_answer.merge(&delta.reparent_answer);
            r.reconnects += delta.reconnects;
            r.consumer_drops += delta.consumer_drops;
            if let Some(ms) = p.join_rpc_ms {
                joins.push(ms as f64);
            }
            match &p.state {
                PeerState::Joining => {
                    r.peers_joining += 1;
                    continue;
                }
                PeerState::Left => {
                    r.peers_left += 1;
                    continue;
                }
                PeerState::JoinFailed(e) => {
                    r.join_failures += 1;
                    r.error(format!("peer {}: join failed: {e}", p.index));
                    continue;
                }
                PeerState::Closed(e) => {
                    r.peers_closed += 1;
                    r.error(format!("peer {}: {e}", p.index));
                    continue;
                }
                PeerState::Active => {}
            }
            if before.is_some() && !b.is_some_and(|b| b.state == PeerState::Active) {
                // Joined during the window: not part of the window's per-peer figures.
                continue;
            }
            r.peers_active += 1;
            if let Some(s) = p.startup {
                startups.push(s.as_secs_f64() * 1000.0);
            }
            let due = delta.chunks_played + delta.chunks_skipped;
            let continuity = if due == 0 {
                0.0
            } else {
                delta.chunks_played as f64 / due as f64
            };
            let (out_bytes, gap_bytes) = match b {
                Some(b) => (
                    p.check.bytes.saturating_sub(b.check.bytes),
                    p.check.gap_bytes.saturating_sub(b.check.gap_bytes),
                ),
                None => (p.check.bytes, p.check.gap_bytes),
            };
            let output_continuity = if out_bytes + gap_bytes == 0 {
                0.0
            } else {
                out_bytes as f64 / (out_bytes + gap_bytes) as f64
            };
            let identical = p.check.identical();
            if !identical {
                r.not_identical.push(p.index);
                for pr in &p.check.problems {
                    r.error(format!("peer {}: output: {pr}", p.index));
                }
            }
            r.chunks_played += delta.chunks_played;
            r.chunks_skipped += delta.chunks_skipped;
            r.output_bytes += out_bytes;
            r.per_peer.push(PeerReport {
                index: p.index,
                upload_kbps: p.upload_kbps,
                delta,
                continuity,
                output_continuity,
                output_bytes: out_bytes,
                identical,
                problems: p.check.problems.clone(),
                startup: p.startup,
            });
        }
        let all = r.bytes_from_server + r.bytes_from_peers;
        if all > 0 {
            r.peer_share = r.bytes_from_peers as f64 / all as f64;
        }
        let due = r.chunks_played + r.chunks_skipped;
        if due > 0 {
            r.continuity = r.chunks_played as f64 / due as f64;
        }
        if !r.per_peer.is_empty() {
            r.continuity_min = r
                .per_peer
                .iter()
                .map(|p| p.continuity)
                .fold(f64::INFINITY, f64::min);
            r.continuity_mean =
                r.per_peer.iter().map(|p| p.continuity).sum::<f64>() / r.per_peer.len() as f64;
            r.output_continuity_min = r
                .per_peer
                .iter()
                .map(|p| p.output_continuity)
                .fold(f64::INFINITY, f64::min);
        }
        r.startup_ms = Percentiles::of(startups);
        r.join_ms = Percentiles::of(joins);
        r.reparent_ms = LatencyFigures::of(&r.reparent);
        r
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }

    /// Active peers whose continuity is below `min`, worst first.
    pub fn peers_below(&self, min: f64) -> Vec<&PeerReport> {
        let mut v: Vec<&PeerReport> = self
            .per_peer
            .iter()
            .filter(|p| p.continuity < min)
            .collect();
        v.sort_by(|a, b| a.continuity.total_cmp(&b.continuity));
        v
    }

    /// Server egress as a multiple of the stream rate over the window (how many full
    /// copies of the stream the data plane sent, on average).
    pub fn server_streams(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs <= 0.0 || self.stream_kbps == 0 {
            return 0.0;
        }
        let bytes = self
            .dataplane_egress_bytes
            .unwrap_or(self.bytes_from_server) as f64;
        bytes * 8.0 / 1000.0 / secs / f64::from(self.stream_kbps)
    }

    /// One line for a live progress display; `recent` tracks the server's egress over
    /// the last seconds (the line shows the stream copies it sends now).
    pub fn progress_line(&self, recent: &mut RecentRate) -> String {
        let egress = self
            .dataplane_egress_bytes
            .unwrap_or(self.bytes_from_server);
        format!(
            "t={:>5.0}s peers {}/{} share {:>5.1}% continuity {:.4} (min {:.4}) server {:.1} streams now ({} MB) stalls {} parent changes {}",
            self.window.as_secs_f64(),
            self.peers_active,
            self.peers_total,
            self.peer_share * 100.0,
            self.continuity,
            self.continuity_min,
            recent.streams(self.window, egress, self.stream_kbps),
            egress / 1_000_000,
            self.chunks_skipped,
            self.parent_changes,
        )
    }
}

/// A byte counter's rate over the last [`RecentRate::WINDOW`], for progress lines: an
/// average since the start would carry a ramp's start-up bursts for minutes.
#[derive(Debug, Default)]
pub struct RecentRate {
    samples: std::collections::VecDeque<(Duration, u64)>,
}

impl RecentRate {
    /// The span the rate is measured over.
    pub const WINDOW: Duration = Duration::from_secs(5);

    /// Adds the counter's total `bytes` at time `t` and returns bytes per second over
    /// the last [`RecentRate::WINDOW`] (since the first sample, if that is shorter ago;
    /// from zero at time zero for the first sample).
    pub fn push(&mut self, t: Duration, bytes: u64) -> f64 {
        self.samples.push_back((t, bytes));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|&(t1, _)| t.saturating_sub(t1) >= Self::WINDOW)
        {
            self.samples.pop_front();
        }
        let (t0, b0) = match self.samples.front() {
            Some(&(t0, b0)) if t0 < t => (t0, b0),
            _ => (Duration::ZERO, 0),
        };
        let secs = t.saturating_sub(t0).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        bytes.saturating_sub(b0) as f64 / secs
    }

    /// [`RecentRate::push`] of the server's egress, as copies of a `stream_kbps`
    /// stream (0 while the stream rate is unknown).
    pub fn streams(&mut self, t: Duration, bytes: u64, stream_kbps: u32) -> f64 {
        let bps = self.push(t, bytes);
        if stream_kbps == 0 {
            return 0.0;
        }
        bps * 8.0 / 1000.0 / f64::from(stream_kbps)
    }

    /// Samples kept.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True before the first sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "window {:.1} s, stream {} kbps, peers: {} total, {} active, {} left, {} joining, {} join failures, {} stopped on their own",
            self.window.as_secs_f64(),
            self.stream_kbps,
            self.peers_total,
            self.peers_active,
            self.peers_left,
            self.peers_joining,
            self.join_failures,
            self.peers_closed
        )?;
        writeln!(
            f,
            "peer share {:.2}% (from peers {} B, from server {} B, uploaded {} B); server egress {} B{} = {:.2} stream copies",
            self.peer_share * 100.0,
            self.bytes_from_peers,
            self.bytes_from_server,
            self.bytes_uploaded,
            self.dataplane_egress_bytes
                .unwrap_or(self.bytes_from_server),
            if self.dataplane_egress_bytes.is_some() {
                " (data-plane counter)"
            } else {
                " (SDK bytes_from_server)"
            },
            self.server_streams()
        )?;
        writeln!(
            f,
            "continuity overall {:.5}, per peer min {:.5} mean {:.5}; output continuity min {:.5}; played {} skipped {}",
            self.continuity,
            self.continuity_min,
            self.continuity_mean,
            self.output_continuity_min,
            self.chunks_played,
            self.chunks_skipped
        )?;
        writeln!(
            f,
            "parent changes {} (all causes, the control plane's own moves included; max {} per peer), reconnects {}, harness consumer drops {}",
            self.parent_changes, self.parent_changes_max, self.reconnects, self.consumer_drops
        )?;
        writeln!(
            f,
            "reparent_ms {} (parent lost or re-searched -> first chunk from the new parent); to the Reparent answer {}",
            self.reparent_ms,
            LatencyFigures::of(&self.reparent_answer)
        )?;
        writeln!(
            f,
            "startup ms p50 {:.0} p95 {:.0} p99 {:.0} max {:.0} (n={}); join call ms p50 {:.0} p99 {:.0}",
            self.startup_ms.p50,
            self.startup_ms.p95,
            self.startup_ms.p99,
            self.startup_ms.max,
            self.startup_ms.n,
            self.join_ms.p50,
            self.join_ms.p99
        )?;
        write!(
            f,
            "identity: {} output bytes checked, {} active peers not byte-identical{}",
            self.output_bytes,
            self.not_identical.len(),
            if self.not_identical.is_empty() {
                String::new()
            } else {
                format!(" {:?}", self.not_identical)
            }
        )?;
        for e in &self.errors {
            write!(f, "\n  error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (p.p50, p.p95, p.p99, p.max, p.n),
            (50.0, 95.0, 99.0, 100.0, 100)
        );
        assert_eq!(Percentiles::of(vec![]).n, 0);
    }

    fn peer(index: usize, state: PeerState, c: PeerCounters) -> PeerSample {
        PeerSample {
            index,
            upload_kbps: 0,
            state,
            startup: Some(Duration::from_millis(100)),
            join_rpc_ms: Some(5),
            counters: c,
            check: OutputCheck::default(),
        }
    }

    #[test]
    fn window_figures() {
        let c = |srv, peers, played, skipped| PeerCounters {
            bytes_from_server: srv,
            bytes_from_peers: peers,
            chunks_played: played,
            chunks_skipped: skipped,
            ..PeerCounters::default()
        };
        let before = Sample {
            elapsed: Duration::from_secs(10),
            stream_kbps: 500,
            peers: vec![
                peer(0, PeerState::Active, c(100, 0, 10, 0)),
                peer(1, PeerState::Active, c(100, 0, 10, 0)),
            ],
            dataplane_egress_bytes: None,
        };
        let now = Sample {
            elapsed: Duration::from_secs(20),
            stream_kbps: 500,
            peers: vec![
                peer(0, PeerState::Active, c(110, 90, 109, 1)),
                peer(1, PeerState::Left, c(150, 0, 20, 0)),
                peer(2, PeerState::Active, c(10, 0, 5, 0)),
            ],
            dataplane_egress_bytes: None,
        };
        let r = Report::between(Some(&before), &now);
        assert_eq!(r.window, Duration::from_secs(10));
        // Bytes: peer 0 +10 server +90 peers, peer 1 +50 server, peer 2 +10 server.
        assert_eq!((r.bytes_from_server, r.bytes_from_peers), (70, 90));
        assert!((r.peer_share - 90.0 / 160.0).abs() < 1e-9);
        // Only peer 0 was active through the window.
        assert_eq!(r.peers_active, 1);
        assert!((r.continuity_min - 99.0 / 100.0).abs() < 1e-9);
        assert_eq!(r.peers_left, 1);
        // A stalled peer (nothing due) has continuity 0.
        let stalled = Sample {
            elapsed: Duration::from_secs(30),
            peers: vec![peer(0, PeerState::Active, c(110, 90, 109, 1))],
            ..now.clone()
        };
        let r = Report::between(Some(&now), &stalled);
        assert_eq!(r.continuity_min, 0.0);
    }

    #[test]
    fn reparent_times_merge_over_peers_and_windows() {
        let with = |times: &[u64]| {
            let mut s = LatencySummary::default();
            for &t in times {
                s.record(Duration::from_millis(t));
            }
            PeerCounters {
                reparent: s,
                ..PeerCounters::default()
            }
        };
        let before = Sample {
            elapsed: Duration::from_secs(10),
            stream_kbps: 500,
            peers: vec![
                peer(0, PeerState::Active, with(&[100])),
                peer(1, PeerState::Active, with(&[])),
            ],
            dataplane_egress_bytes: None,
        };
        let now = Sample {
            elapsed: Duration::from_secs(20),
            stream_kbps: 500,
            peers: vec![
                peer(0, PeerState::Active, with(&[100, 180, 900])),
                // Left during the window: its parent changes still count.
                peer(1, PeerState::Left, with(&[2_400])),
            ],
            dataplane_egress_bytes: None,
        };
        let whole = Report::of(&now);
        assert_eq!(whole.reparent_ms.count, 4);
        assert_eq!(whole.reparent_ms.max, Some(2_400));
        assert_eq!(whole.reparent_ms.p50, Some(200)); // 180 ms: bucket (150, 200]
        let w = Report::between(Some(&before), &now);
        assert_eq!(w.reparent_ms.count, 3);
        assert_eq!(w.reparent_ms.p99, Some(2_400));
        assert!(
            w.to_string()
                .contains("reparent_ms {count 3, p50 1000, p99 2400, max 2400}")
        );
        let none = Report::between(Some(&now), &now);
        assert_eq!(none.reparent_ms, LatencyFigures::default());
        assert!(
            none.to_string()
                .contains("reparent_ms {count 0, p50 -, p99 -, max -}")
        );
        // Through the workers' wire form and back.
        let wire = LatencyWire::from(&whole.reparent);
        let json = serde_json::to_string(&wire).unwrap_or_default();
        let back: LatencyWire = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back.to_summary(), whole.reparent);
    }
}
