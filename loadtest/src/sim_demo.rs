//! `starling-loadtest demo --net sim` (the default): the whole system in one process,
//! as the sockets demo, with simulated viewers instead of SDK instances.
//!
//! A [`Deployment`] (control plane on embedded SQLite, a data-plane node, the synthetic
//! source) serves viewers that run the grid's peer state machine inside the
//! [`crate::simnet`] fabric: each joins and keeps its session over real gRPC, keeps a
//! real wire connection to the data plane, and relays to the others through the
//! in-process network (per-link latency, per-peer upload serialization). Every byte every
//! viewer plays is checked against the source. A progress line every second; a
//! [`SimDemoReport`] at the end.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::bound::{Stay, fluid_bound_bytes};
use crate::deployment::Deployment;
use crate::error::HarnessError;
use crate::report::Percentiles;
use crate::simnet::control::ControlConfig;
use crate::simnet::dataplane::DpShared;
use crate::simnet::dispatch;
use crate::simnet::{Fabric, FabricConfig, ServerMode, SimNetConfig, Snapshot};
use crate::swarm::UploadProfile;
use crate::worker::{PeerRecord, lag_percentile};

/// Verified signature blocks remembered by the viewers' shared cache.
const SIGNATURE_CACHE: usize = 4096;

/// What to run (the deployment's stream shape is the deployment's own).
#[derive(Debug, Clone)]
pub struct SimDemoConfig {
    /// Viewers.
    pub peers: usize,
    /// Stop after this long (`None`: when `stop` resolves).
    pub duration: Option<Duration>,
    /// Upload budgets as multiples of the stream rate, in turn.
    pub upload: UploadProfile,
    /// Joins per second (0: all at once).
    pub join_rate: f64,
    /// Check every played byte against the source.
    pub check_identity: bool,
}

/// The figures of a finished demo.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimDemoReport {
    /// Viewers asked for.
    pub peers: usize,
    /// Viewers playing at the end.
    pub active: usize,
    /// Joins that failed for good.
    pub join_failures: usize,
    /// Seconds from the first join to the end.
    pub window_s: f64,
    /// Stream rate, kbit/s.
    pub stream_kbps: u32,
    /// Payload bytes from peers over all payload bytes received.
    pub peer_share: f64,
    /// Chunks played over chunks due.
    pub continuity: f64,
    /// Chunks played on time.
    pub chunks_played: u64,
    /// Chunks that missed their deadline.
    pub chunks_skipped: u64,
    /// Stalls (the player ran dry).
    pub stalls: u64,
    /// Bytes the data plane sent (its own counter).
    pub server_egress_bytes: u64,
    /// The Kumar–Liu–Ross fluid bound over the viewers' stays and budgets.
    pub fluid_bound_bytes: f64,
    /// Start-up p50 / p95, ms.
    pub startup_ms: [Option<u64>; 2],
    /// Lag behind live p50 / p99 over every viewer-second, ms.
    pub lag_ms: [Option<u64>; 2],
    /// Played bytes checked against the source.
    pub bytes_checked: u64,
    /// Viewers whose output differed from the source (must be 0).
    pub not_identical: usize,
    /// Parent changes (every cause).
    pub parent_changes: u64,
    /// Control-plane sessions and the HTTP/2 connections they shared.
    pub sessions: u64,
    /// HTTP/2 connections to the control plane.
    pub connections: u64,
    /// The control plane's view of the grid just before the viewers left.
    pub grid: Option<GridFigures>,
    /// What went wrong (bounded).
    pub errors: Vec<String>,
}

/// The control plane's figures of the broadcast's grid (`AdminService.GetBroadcast`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GridFigures {
    /// Peers it holds.
    pub peers: u64,
    /// Child slots the viewers need.
    pub demand_slots: u64,
    /// Child slots the viewers offer.
    pub peer_supply_slots: u64,
    /// Slots the data plane fills in.
    pub booster_slots: u64,
    /// The booster's bandwidth, kbit/s.
    pub booster_kbps: u64,
    /// The deepest tree.
    pub max_depth: u64,
}

impl std::fmt::Display for SimDemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        writeln!(
            f,
            "viewers {} (playing at the end {}, join failures {}) over {:.1} s; {} kbps; net sim",
            self.peers, self.active, self.join_failures, self.window_s, self.stream_kbps
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
        let over = if self.fluid_bound_bytes > 0.0 {
            format!(
                "{:.2} x",
                self.server_egress_bytes as f64 / self.fluid_bound_bytes
            )
        } else {
            "n/a x".to_string()
        };
        writeln!(
            f,
            "server egress {} B = {over} the fluid bound {:.0} B",
            self.server_egress_bytes, self.fluid_bound_bytes
        )?;
        writeln!(
            f,
            "start-up ms p50 {} p95 {}; lag ms p50 {} p99 {}",
            ms(self.startup_ms[0]),
            ms(self.startup_ms[1]),
            ms(self.lag_ms[0]),
            ms(self.lag_ms[1])
        )?;
        writeln!(
            f,
            "identity: {} bytes checked, {} viewers not byte-identical; parent changes {}",
            self.bytes_checked, self.not_identical, self.parent_changes
        )?;
        write!(
            f,
            "control plane: {} sessions over {} shared HTTP/2 connections (real gRPC)",
            self.sessions, self.connections
        )?;
        if let Some(g) = &self.grid {
            write!(
                f,
                "\ncontrol plane's grid: peers {}, demand {} slots, peer supply {} slots, booster {} slots ({} kbps), max depth {}",
                g.peers,
                g.demand_slots,
                g.peer_supply_slots,
                g.booster_slots,
                g.booster_kbps,
                g.max_depth
            )?;
        }
        for e in &self.errors {
            write!(f, "\nerror: {e}")?;
        }
        Ok(())
    }
}

/// Runs `cfg.peers` simulated viewers against `dep` until `cfg.duration` has passed
/// or `stop` resolves; calls `progress` with a line every second.
///
/// # Errors
/// The deployment's stream shape cannot be simulated (no chunk duration).
pub async fn run(
    dep: &Deployment,
    cfg: &SimDemoConfig,
    stop: impl Future<Output = ()>,
    mut progress: impl FnMut(&str),
) -> Result<SimDemoReport, HarnessError> {
    let d = dep.config();
    let k = u16::try_from(d.substreams.clamp(1, 64))
        .map_err(|_| HarnessError::Config("substreams".into()))?;
    if d.chunk_ms == 0 {
        return Err(HarnessError::Config("chunk duration 0".into()));
    }
    let mut net = SimNetConfig::new(
        d.bitrate_kbps,
        k,
        Duration::from_millis(u64::from(d.chunk_ms)),
    );
    net.queue = net.queue.max(cfg.peers * 8);
    let (up_tx, up_rx) = mpsc::channel(cfg.peers.saturating_mul(8).max(65_536));
    let fabric = Fabric::spawn(
        FabricConfig {
            net,
            upload: cfg.upload.clone(),
            index_offset: 0,
            pattern: cfg.check_identity.then(|| dep.source().pattern()),
            server: ServerMode::Wire,
        },
        up_tx,
    );
    let dp = Arc::new(DpShared::new(u64::from(d.chunk_ms), SIGNATURE_CACHE));
    let (cc, control) = dispatch::spawn(
        ControlConfig {
            data_plane: Some(dp.clone()),
            ..ControlConfig::new(
                dep.control_url(),
                dep.transport(),
                dep.broadcast_id().to_owned(),
            )
        },
        up_rx,
        fabric.sender(),
    );
    let started = tokio::time::Instant::now();
    let deadline = cfg.duration.map(|t| started + t);
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut added = 0usize;
    let mut last: Option<Snapshot> = None;
    let egress0 = dep.dataplane_egress_bytes().unwrap_or(0);
    loop {
        tokio::select! {
            _ = pace.tick(), if added < cfg.peers => {
                let due = if cfg.join_rate > 0.0 {
                    ((started.elapsed().as_secs_f64() * cfg.join_rate) as usize).min(cfg.peers)
                } else {
                    cfg.peers
                };
                if due > added {
                    fabric.add(due - added).await;
                    added = due;
                }
            }
            _ = tick.tick() => {
                let Some(snap) = fabric.snapshot(false).await else { break };
                progress(&progress_line(&snap, cfg.peers));
                last = Some(snap);
            }
            () = &mut until_deadline => break,
            () = &mut stop => break,
        }
    }
    let snap = fabric.snapshot(true).await.or(last).unwrap_or_default();
    let egress = dep
        .dataplane_egress_bytes()
        .map_or(snap.sample.bytes_from_server, |e| e.saturating_sub(egress0));
    let grid = dep.broadcast().await.ok().map(|b| GridFigures {
        peers: u64::from(b.peers),
        demand_slots: b.demand_slots,
        peer_supply_slots: b.peer_supply_slots,
        booster_slots: b.booster_slots,
        booster_kbps: b.booster_kbps,
        max_depth: u64::from(b.max_depth),
    });
    fabric.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), control).await;
    let mut r = report_of(&snap, cfg.peers, d.bitrate_kbps, egress);
    r.grid = grid;
    r.sessions = cc.sessions.load(Ordering::Relaxed);
    r.connections = cc.connections.load(Ordering::Relaxed);
    if dp.bad_chunks.load(Ordering::Relaxed) > 0 {
        r.errors.push(format!(
            "{} chunks from the data plane failed verification",
            dp.bad_chunks.load(Ordering::Relaxed)
        ));
    }
    Ok(r)
}

/// The progress line of one snapshot.
fn progress_line(snap: &Snapshot, peers: usize) -> String {
    let s = &snap.sample;
    format!(
        "t={:>5.0}s viewers {}/{} (joining {}, failed {}) share {:>5.1}% continuity {:.5} server {:.1} MB stalls {} parent changes {}",
        s.elapsed_s,
        s.active,
        peers,
        s.joining,
        s.join_failures + s.closed,
        snap.peer_share() * 100.0,
        snap.continuity(),
        s.bytes_from_server as f64 / 1e6,
        s.stalls,
        s.parent_changes
    )
}

/// The final figures from the last snapshot (with records).
fn report_of(snap: &Snapshot, peers: usize, stream_kbps: u32, egress: u64) -> SimDemoReport {
    let s = &snap.sample;
    let stays: Vec<Stay> = snap
        .records
        .iter()
        .filter_map(|r: &PeerRecord| {
            Some(Stay {
                joined_s: r.joined_s?,
                left_s: r.left_s,
                upload_kbps: r.upload_kbps,
            })
        })
        .collect();
    let startup = Percentiles::of(snap.records.iter().filter_map(|r| r.startup_ms).collect());
    let lag: BTreeMap<u64, u64> = snap.lag_hist.iter().copied().collect();
    let ms = |v: f64| (v > 0.0).then_some(v as u64);
    let mut errors = snap.errors.clone();
    if snap.played_without_bytes > 0 {
        errors.push(format!(
            "{} chunks played without bytes",
            snap.played_without_bytes
        ));
    }
    SimDemoReport {
        peers,
        active: s.active,
        join_failures: s.join_failures,
        window_s: s.elapsed_s,
        stream_kbps,
        peer_share: snap.peer_share(),
        continuity: snap.continuity(),
        chunks_played: s.chunks_played,
        chunks_skipped: s.chunks_skipped,
        stalls: s.stalls,
        server_egress_bytes: egress,
        fluid_bound_bytes: fluid_bound_bytes(stream_kbps, &stays, s.elapsed_s),
        startup_ms: [ms(startup.p50), ms(startup.p95)],
        lag_ms: [
            ms(lag_percentile(&lag, 0.5)),
            ms(lag_percentile(&lag, 0.99)),
        ],
        bytes_checked: s.output_bytes,
        not_identical: s.not_identical,
        parent_changes: s.parent_changes,
        sessions: 0,
        connections: 0,
        grid: None,
        errors,
    }
}
