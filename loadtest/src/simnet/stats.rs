//! The fabric's figures in the worker protocol's shapes: a [`WorkerSample`] of the
//! whole fabric, a [`PeerRecord`] per viewer and the lag histogram, so that the
//! coordinator's progress, merge and report code show a simulated run unchanged.

use std::time::Duration;

use super::fabric::{Fabric, NetCounters};
use super::peer::Phase;
use crate::worker::{PeerRecord, ProcStats, WorkerSample};

/// The fabric's figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The whole fabric as one worker.
    pub sample: WorkerSample,
    /// Every viewer it ever had (only when asked for).
    pub records: Vec<PeerRecord>,
    /// Lag of every active viewer at every second: `(bucket, count)`, bucket = lag ms
    /// / [`crate::worker::LAG_BUCKET_MS`].
    pub lag_hist: Vec<(u64, u64)>,
    /// The network's own figures.
    pub net: NetCounters,
    /// Chunks played without bytes (must be 0).
    pub played_without_bytes: u64,
    /// Each active viewer's lag p50 and p99, ms (only with records), by index.
    pub lag_ms: Vec<(usize, Option<u64>, Option<u64>)>,
    /// What went wrong (bounded).
    pub errors: Vec<String>,
}

impl Snapshot {
    /// Payload bytes from peers over all payload bytes received.
    pub fn peer_share(&self) -> f64 {
        let s = &self.sample;
        let total = s.bytes_from_peers + s.bytes_from_server;
        if total == 0 {
            0.0
        } else {
            s.bytes_from_peers as f64 / total as f64
        }
    }

    /// Chunks played over chunks due.
    pub fn continuity(&self) -> f64 {
        let s = &self.sample;
        let due = s.chunks_played + s.chunks_skipped;
        if due == 0 {
            0.0
        } else {
            s.chunks_played as f64 / due as f64
        }
    }
}

impl Fabric {
    pub(super) fn snapshot(&self, records: bool) -> Snapshot {
        let mut s = WorkerSample {
            elapsed_s: self.now_us().saturating_sub(self.started_us) as f64 / 1e6,
            peers_total: self.peers.len(),
            process: ProcStats::current(),
            ..WorkerSample::default()
        };
        let mut out = Snapshot {
            net: self.net,
            lag_hist: self.lag_hist.iter().map(|(b, n)| (*b, *n)).collect(),
            errors: self.errors.clone(),
            ..Snapshot::default()
        };
        for p in &self.peers {
            match p.phase {
                Phase::Joining => s.joining += 1,
                Phase::Active => s.active += 1,
                Phase::Left => s.left += 1,
                Phase::Failed => {
                    if p.joined.is_some() {
                        s.closed += 1;
                    } else {
                        s.join_failures += 1;
                    }
                }
            }
            let stats = p.node.as_ref().map(|n| n.peer.stats()).unwrap_or_default();
            s.bytes_from_server += p.payload_from_server;
            s.bytes_from_peers += p.payload_from_peers;
            s.bytes_uploaded += p.payload_uploaded;
            s.chunks_played += stats.played;
            s.chunks_skipped += stats.skipped;
            s.parent_changes += p.parent_changes;
            out.played_without_bytes += p.played_without_bytes;
            if p.active() {
                s.output_bytes += p.check.bytes;
                if !p.check.identical() {
                    s.not_identical += 1;
                }
            }
            if records {
                let base = Duration::from_micros(self.started_us);
                record(p, self.cfg.index_offset, base, &mut out);
            }
        }
        out.sample = s;
        out
    }
}

/// One viewer's record; times since `base` (the fabric's start).
fn record(p: &super::peer::SimPeer, offset: usize, base: Duration, out: &mut Snapshot) {
    let stats = p.node.as_ref().map(|n| n.peer.stats()).unwrap_or_default();
    out.records.push(PeerRecord {
        index: offset + p.index,
        upload_kbps: p.upload_kbps,
        joined_s: p.joined.map(|d| d.saturating_sub(base).as_secs_f64()),
        left_s: p.left.map(|d| d.saturating_sub(base).as_secs_f64()),
        join_rpc_ms: p.join_rpc_ms,
        startup_ms: p.startup.map(|d| d.as_secs_f64() * 1000.0),
        chunks_played: stats.played,
        chunks_skipped: stats.skipped,
        stalls: 0,
        bytes_from_server: p.payload_from_server,
        bytes_from_peers: p.payload_from_peers,
        bytes_uploaded: p.payload_uploaded,
        wire_bytes_uploaded: p.wire_uploaded,
        lag_p50_ms: p.lag.quantile_ms(0.5),
        lag_p99_ms: p.lag.quantile_ms(0.99),
    });
    out.lag_ms
        .push((p.index, p.lag.quantile_ms(0.5), p.lag.quantile_ms(0.99)));
}
