//! Report assembly: merging the workers' final figures into one [`RunReport`]
//! (percentiles over all peers, the fluid bound, per-process lines).

use super::config::RunConfig;
use super::drive::WorkerLink;
use super::perpeer::{JoinGroups, LagHistogram, MACHINE_BOUND_BUSY};
use super::report::{P2, P3, ProcessReport, RunReport};
use super::rss::RSS_EVERY;
use super::series::{Reduce, Series};
use crate::bound::{Stay, fluid_bound_bytes};
use crate::report::{LatencyFigures, Percentiles};
use crate::worker::{ADDRESS_BLOCK, PeerRecord, ProcStats, lag_percentile};
use std::collections::BTreeMap;

pub(super) fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[allow(clippy::too_many_arguments)]
pub(super) fn merge(
    cfg: &RunConfig,
    stream_kbps: u32,
    workers: usize,
    links: &[WorkerLink],
    duration_s: f64,
    ramp_s: f64,
    dataplane_egress: Option<u64>,
    coordinator: ProcStats,
    dataplane: Option<ProcStats>,
    machine_busy: Series,
) -> RunReport {
    let mut r = RunReport {
        peers: cfg.peers,
        peers_joined: 0,
        initial_peers_joined: 0,
        peers_active_at_end: 0,
        peers_left: 0,
        join_failures: 0,
        peers_closed: 0,
        workers,
        duration_s,
        ramp_s,
        steady_s: (duration_s - ramp_s).max(0.0),
        ramp_held_s: 0.0,
        admission_closed_at_peers: None,
        bitrate_kbps: cfg.bitrate_kbps,
        stream_kbps,
        chunk_ms: cfg.chunk_ms,
        substreams: cfg.substreams,
        shared_signature_cache: cfg.shared_signature_cache,
        upload_profile: cfg.upload.multiples.clone(),
        join_rate: cfg.join_rate,
        churn_per_min: cfg.churn_per_min,
        peer_share: 0.0,
        continuity: 1.0,
        startup_ms: P3::default(),
        lag_ms: None,
        stalls: 0,
        chunks_skipped: 0,
        chunks_played: 0,
        server_egress_bytes: 0,
        server_egress_source: String::new(),
        fluid_bound_bytes: 0.0,
        server_egress_over_bound: 0.0,
        upload_over_budget_bytes: 0.0,
        server_egress_over_bound_at_budget: 0.0,
        bytes_from_server: 0,
        bytes_from_peers: 0,
        bytes_uploaded: 0,
        upload_mean: 0.0,
        join_rpc_ms: P2::default(),
        cpu_s: BTreeMap::new(),
        cpu_cores: 0,
        cpu_utilization: 0.0,
        machine_bound: false,
        machine_busy: Series::new(2, Reduce::Mean),
        max_rss_bytes: BTreeMap::new(),
        processes: Vec::new(),
        rss_every_s: RSS_EVERY.as_secs_f64(),
        rss: Vec::new(),
        not_identical: 0,
        output_bytes_checked: 0,
        parent_changes: 0,
        reparent_ms: LatencyFigures::default(),
        reparent_answer_ms: LatencyFigures::default(),
        grid: None,
        stays: Vec::new(),
        lag_histogram: LagHistogram::default(),
        join_groups: JoinGroups::default(),
        control_traffic: None,
        sim_fabric: None,
        errors: Vec::new(),
        error_count: 0,
    };
    let mut startups = Vec::new();
    let mut joins: Vec<f64> = Vec::new();
    let mut lag: BTreeMap<u64, u64> = BTreeMap::new();
    let mut records: Vec<&PeerRecord> = Vec::new();
    let mut worker_errors = Vec::new();
    let mut reparent = starling_grid::peer::LatencySummary::default();
    let mut reparent_answer = starling_grid::peer::LatencySummary::default();
    r.processes.push(ProcessReport {
        role: "coordinator".into(),
        host: String::new(),
        pid: coordinator.pid,
        peers: 0,
        cpu_s: coordinator.cpu_s,
        max_rss_bytes: coordinator.max_rss_bytes,
    });
    if let Some(d) = dataplane {
        r.processes.push(ProcessReport {
            role: "dataplane".into(),
            host: String::new(),
            pid: d.pid,
            peers: 0,
            cpu_s: d.cpu_s,
            max_rss_bytes: d.max_rss_bytes,
        });
    }
    for (w, link) in links.iter().enumerate() {
        let Some(fin) = &link.fin else {
            worker_errors.push(format!(
                "worker {w} (pid {}) sent no final report: its peers are missing from the figures",
                link.pid
            ));
            if let Some(s) = &link.latest {
                r.processes.push(ProcessReport {
                    role: format!("worker-{w}"),
                    host: link.host.clone(),
                    pid: link.pid,
                    peers: link.peers,
                    cpu_s: s.process.cpu_s,
                    max_rss_bytes: s.process.max_rss_bytes,
                });
            }
            continue;
        };
        let s = &fin.sample;
        r.peers_active_at_end += s.active;
        r.peers_left += s.left;
        r.join_failures += s.join_failures;
        r.peers_closed += s.closed;
        r.not_identical += s.not_identical;
        r.output_bytes_checked += s.output_bytes;
        r.parent_changes += s.parent_changes;
        reparent.merge(&s.reparent.to_summary());
        reparent_answer.merge(&s.reparent_answer.to_summary());
        r.processes.push(ProcessReport {
            role: format!("worker-{w}"),
            host: link.host.clone(),
            pid: link.pid,
            peers: link.peers,
            cpu_s: s.process.cpu_s,
            max_rss_bytes: s.process.max_rss_bytes,
        });
        for (b, n) in &fin.lag_hist {
            *lag.entry(*b).or_default() += n;
        }
        for p in &fin.peers {
            records.push(p);
            if p.joined_s.is_some() && p.index.saturating_sub(w * ADDRESS_BLOCK) < link.peers {
                r.initial_peers_joined += 1;
            }
        }
        for e in &fin.errors {
            worker_errors.push(format!("worker {w}: {e}"));
        }
        if let Some(c) = fin.control {
            let t = r.control_traffic.get_or_insert_default();
            t.sessions += c.sessions;
            t.connections += c.connections;
        }
        if let Some(l) = fin.sim_fabric {
            let t = r.sim_fabric.get_or_insert_default();
            t.late_events += l.late_events;
            t.max_late_ms = t.max_late_ms.max(l.max_late_ms);
            t.deadlines += l.deadlines;
        }
    }
    let mut budget_sum = 0.0;
    let mut wire_uploaded = 0u64;
    for p in &records {
        r.bytes_from_server += p.bytes_from_server;
        r.bytes_from_peers += p.bytes_from_peers;
        r.bytes_uploaded += p.bytes_uploaded;
        wire_uploaded += p.wire_bytes_uploaded;
        r.chunks_played += p.chunks_played;
        r.chunks_skipped += p.chunks_skipped;
        r.stalls += p.stalls;
        if let Some(ms) = p.startup_ms {
            startups.push(ms);
        }
        if let Some(ms) = p.join_rpc_ms {
            joins.push(ms as f64);
        }
        if let Some(j) = p.joined_s {
            r.peers_joined += 1;
            budget_sum += f64::from(p.upload_kbps);
            r.stays.push((
                j,
                p.left_s,
                p.upload_kbps,
                p.startup_ms,
                p.lag_p50_ms,
                p.lag_p99_ms,
            ));
        }
    }
    let all = r.bytes_from_server + r.bytes_from_peers;
    if all > 0 {
        r.peer_share = r.bytes_from_peers as f64 / all as f64;
    }
    if r.chunks_played + r.chunks_skipped > 0 {
        r.continuity = r.chunks_played as f64 / (r.chunks_played + r.chunks_skipped) as f64;
    }
    if r.peers_joined > 0 && stream_kbps > 0 {
        r.upload_mean = budget_sum / r.peers_joined as f64 / f64::from(stream_kbps);
    }
    r.reparent_ms = LatencyFigures::of(&reparent);
    r.reparent_answer_ms = LatencyFigures::of(&reparent_answer);
    r.startup_ms = Percentiles::of(startups).into();
    joins.sort_by(f64::total_cmp);
    r.join_rpc_ms = P2 {
        p50: nearest_rank(&joins, 0.50),
        p99: nearest_rank(&joins, 0.99),
    };
    r.lag_histogram = LagHistogram::of(&records, &lag);
    r.join_groups = JoinGroups::of(&records, &machine_busy, MACHINE_BOUND_BUSY);
    r.machine_busy = machine_busy;
    if !lag.is_empty() {
        r.lag_ms = Some(P2 {
            p50: lag_percentile(&lag, 0.50),
            p99: lag_percentile(&lag, 0.99),
        });
    }
    match dataplane_egress {
        Some(b) => {
            r.server_egress_bytes = b;
            r.server_egress_source = "dataplane_metrics".into();
        }
        None => {
            r.server_egress_bytes = r.bytes_from_server;
            r.server_egress_source = "sdk_bytes_from_server".into();
        }
    }
    let stays: Vec<Stay> = r
        .stays
        .iter()
        .map(|&(joined_s, left_s, upload_kbps, ..)| Stay {
            joined_s,
            left_s,
            upload_kbps,
        })
        .collect();
    r.fluid_bound_bytes = fluid_bound_bytes(stream_kbps, &stays, duration_s);
    if r.fluid_bound_bytes > 0.0 {
        r.server_egress_over_bound = r.server_egress_bytes as f64 / r.fluid_bound_bytes;
    }
    let budget_bytes: f64 = stays
        .iter()
        .map(|s| {
            let to = s.left_s.unwrap_or(duration_s).min(duration_s);
            f64::from(s.upload_kbps) * 125.0 * (to - s.joined_s.min(to)).max(0.0)
        })
        .sum();
    r.upload_over_budget_bytes = (wire_uploaded as f64 - budget_bytes).max(0.0);
    if r.fluid_bound_bytes > 0.0 {
        r.server_egress_over_bound_at_budget =
            (r.server_egress_bytes as f64 + r.upload_over_budget_bytes) / r.fluid_bound_bytes;
    }
    let mut total_cpu = 0.0;
    let mut local_cpu = 0.0;
    let mut max_rss = 0;
    let here = crate::worker::hostname();
    for p in &r.processes {
        r.cpu_s.insert(p.role.clone(), p.cpu_s);
        r.max_rss_bytes.insert(p.role.clone(), p.max_rss_bytes);
        total_cpu += p.cpu_s;
        if p.host.is_empty() || p.host == here {
            local_cpu += p.cpu_s;
        }
        max_rss = max_rss.max(p.max_rss_bytes);
    }
    r.cpu_s.insert("total".into(), total_cpu);
    r.cpu_cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if duration_s > 0.0 {
        r.cpu_utilization = local_cpu / (duration_s * r.cpu_cores as f64);
    }
    // A simulated network that fell behind its schedule measured this machine too.
    r.machine_bound =
        r.cpu_utilization >= MACHINE_BOUND_BUSY || r.sim_fabric.is_some_and(|l| l.machine_bound());
    r.max_rss_bytes.insert("max".into(), max_rss);
    if r.initial_peers_joined < cfg.peers {
        r.error(format!(
            "{} of {} peers joined",
            r.initial_peers_joined, cfg.peers
        ));
    }
    for e in worker_errors {
        r.error(e);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            (nearest_rank(&v, 0.5), nearest_rank(&v, 0.99)),
            (50.0, 99.0)
        );
        let mut h = BTreeMap::new();
        h.insert(5, 50); // 50..60 ms
        h.insert(100, 50); // 1000..1010 ms
        assert_eq!(lag_percentile(&h, 0.5), 60.0);
        assert_eq!(lag_percentile(&h, 0.99), 1010.0);
    }
}
