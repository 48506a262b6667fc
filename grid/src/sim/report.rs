//! [`SimReport`]: the figures of one simulation run, gathered from the nodes, the data
//! plane and the control plane.

use super::Sim;
use super::rng::us;

/// What a run did to the swarm. Two runs with the same seed and the same calls give
/// equal reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Viewers that ever joined (refused ones included).
    pub peers_joined: u64,
    /// Viewers connected at the end.
    pub peers_alive: u64,
    /// Joins the control plane refused.
    pub joins_refused: u64,
    /// Chunks played, all viewers.
    pub played: u64,
    /// Chunks skipped at their deadline, all viewers.
    pub skipped: u64,
    /// `played / (played + skipped)` (1 when nothing was due).
    pub continuity: f64,
    /// Continuity from `measure_from` on (a flash crowd's start-up excluded).
    pub continuity_measured: f64,
    /// The lowest continuity of a viewer that had at least 20 chunks due.
    pub worst_continuity: f64,
    /// Chunk bytes received from peers / all chunk bytes received.
    pub peer_share: f64,
    /// Data-plane chunk egress, kbit/s, averaged from `measure_from` on (pushes and
    /// repairs, frame bytes).
    pub server_egress_kbps: f64,
    /// The fluid bound `max(r, n·r − Σu)` over the same window (mean of one sample a
    /// second), kbit/s.
    pub fluid_bound_kbps: f64,
    /// Chunks the data plane pushed.
    pub server_pushes: u64,
    /// Repairs the data plane served.
    pub server_pulls: u64,
    /// Re-searches the control plane handled.
    pub researches: u64,
    /// Peers demoted after reports.
    pub demoted: u64,
    /// Pushes parents skipped and announced, as their children counted them.
    pub parent_skips: u64,
    /// Chunks repaired from neighbours.
    pub from_neighbours: u64,
    /// Play-out lag (play time − availability at the source) over viewers, ms.
    pub lag_p50_ms: u64,
    /// 95th percentile of the lag, ms.
    pub lag_p95_ms: u64,
    /// Largest lag, ms.
    pub lag_max_ms: u64,
    /// Deepest tree position seen (server-fed = 1), sampled once a second.
    pub max_depth: u16,
    /// Most booster slots seen at once.
    pub max_booster_slots: u64,
    /// Peer-to-peer frames lost.
    pub lost_frames: u64,
}

impl SimReport {
    pub(crate) fn collect(sim: &Sim) -> SimReport {
        let mut played = 0;
        let mut skipped = 0;
        let mut worst = 1.0f64;
        let (mut m_played, mut m_skipped) = (0, 0);
        let mut parent_skips = 0;
        let mut from_neighbours = 0;
        let (mut from_peers, mut from_server) = (0u64, 0u64);
        let mut lags = Vec::new();
        for n in sim.nodes.values() {
            let st = n.peer.stats();
            played += st.played;
            skipped += st.skipped;
            parent_skips += st.parent_skips;
            from_neighbours += st.from_neighbour;
            m_played += st.played - n.due_before_measure.0;
            m_skipped += st.skipped - n.due_before_measure.1;
            let due = st.played + st.skipped;
            if due >= 20 {
                worst = worst.min(st.played as f64 / due as f64);
            }
            from_peers += n.bytes_from_peers;
            from_server += n.bytes_from_server;
            if n.receives()
                && let Some(l) = n.lag_us
            {
                lags.push(l / 1000);
            }
        }
        lags.sort_unstable();
        let pct = |p: usize| -> u64 {
            if lags.is_empty() {
                0
            } else {
                lags[(lags.len() - 1) * p / 100]
            }
        };
        let c = &sim.counters;
        let measured_s = sim.now.saturating_sub(us(sim.cfg.measure_from)) as f64 / 1e6;
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        SimReport {
            peers_joined: sim.nodes.len() as u64,
            peers_alive: sim.alive().len() as u64,
            joins_refused: sim.control.refused,
            played,
            skipped,
            continuity: ratio(played, played + skipped),
            continuity_measured: ratio(m_played, m_played + m_skipped),
            worst_continuity: worst,
            peer_share: ratio(from_peers, from_peers + from_server),
            server_egress_kbps: if measured_s > 0.0 {
                c.server_bytes_measured as f64 * 8.0 / 1000.0 / measured_s
            } else {
                0.0
            },
            fluid_bound_kbps: if c.samples > 0 {
                c.fluid_kbps_sum as f64 / c.samples as f64
            } else {
                0.0
            },
            server_pushes: c.server_pushes,
            server_pulls: c.server_pulls,
            researches: sim.control.researches,
            demoted: sim.control.demoted,
            parent_skips,
            from_neighbours,
            lag_p50_ms: pct(50),
            lag_p95_ms: pct(95),
            lag_max_ms: lags.last().copied().unwrap_or(0),
            max_depth: c.max_depth,
            max_booster_slots: c.max_booster_slots,
            lost_frames: c.lost_frames,
        }
    }
}
