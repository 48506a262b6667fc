//! The benchmark's result: a serialisable report (`--json`) and its table (stdout).

use std::fmt;

use super::stats::CodeCounts;

/// Everything measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// `stream` or `heartbeat`.
    pub mode: String,
    /// `sqlite`, `postgres` or `external`.
    pub backend: String,
    /// Sessions asked for.
    pub sessions: u64,
    /// Joins in flight at once.
    pub concurrency: u64,
    /// HTTP/2 connections of the join phase.
    pub join_connections: u64,
    /// HTTP/2 connections of the steady phase, and sessions per connection.
    pub steady_connections: u64,
    /// Sessions sharing one HTTP/2 connection in the steady phase.
    pub sessions_per_connection: u64,
    /// Times the emulated data-plane node had to register again during the run (the
    /// control plane declared it dead; joins in between answer UNAVAILABLE).
    pub node_reregistrations: u64,
    /// Join phase.
    pub join: JoinReport,
    /// Steady phase (absent when no session was joined).
    pub steady: Option<SteadyReport>,
}

/// Join-phase figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JoinReport {
    /// Joins admitted / given up.
    pub joined: u64,
    /// Joins given up.
    pub failed: u64,
    /// Phase wall time, seconds.
    pub wall_s: f64,
    /// Admitted joins per second of wall time.
    pub joins_per_s: f64,
    /// Latency of admitted Join calls, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
    /// Error answers by gRPC code (retried ones included).
    pub errors: CodeCounts,
    /// RESOURCE_EXHAUSTED answers honoured (waited on and retried).
    pub pushbacks: u64,
    /// Control-plane CPU over the phase, seconds.
    pub cp_cpu_s: f64,
    /// Control-plane CPU per admitted join, microseconds (includes the keep-alive of
    /// the sessions already joined during the phase).
    pub cp_cpu_per_join_us: f64,
    /// The same minus the steady phase's keep-alive cost for the viewer-seconds held
    /// during the join phase (0 when unknown).
    pub cp_cpu_per_join_net_us: f64,
    /// Control-plane RSS before and after the phase, KiB.
    pub rss_before_kib: u64,
    /// RSS after the join phase, KiB.
    pub rss_after_kib: u64,
    /// The bench client's own CPU over the phase, seconds.
    pub bench_cpu_s: f64,
}

/// Steady-phase figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SteadyReport {
    /// Measured window, seconds (after a settling period).
    pub wall_s: f64,
    /// Sessions held at the start, the fewest seen, and at the end.
    pub held_start: u64,
    /// Fewest sessions held at any progress tick.
    pub held_min: u64,
    /// Sessions held at the end.
    pub held_end: u64,
    /// Sessions the control plane ended (`active: false`) during the window.
    pub ended_by_server: u64,
    /// Streams closed or failed / heartbeats given up during the window.
    pub lost: u64,
    /// Control-plane CPU over the window, seconds.
    pub cp_cpu_s: f64,
    /// Control-plane CPU per viewer-second, microseconds.
    pub cp_cpu_per_viewer_s_us: f64,
    /// Control-plane RSS at the end of the window, KiB.
    pub rss_kib: u64,
    /// (RSS at the end - RSS before the join phase) / sessions, KiB.
    pub rss_per_session_kib: f64,
    /// Heartbeats answered per second.
    pub heartbeats_per_s: f64,
    /// Heartbeat call latency, ms.
    pub heartbeat_p50_ms: f64,
    /// 99th percentile, ms.
    pub heartbeat_p99_ms: f64,
    /// Streams that received their first SessionDown, over the whole run (stream mode).
    pub streams_started: u64,
    /// SessionDown messages received per second (all).
    pub downs_per_s: f64,
    /// SessionDown messages after each stream's first (pushed updates) per second.
    pub pushes_per_s: f64,
    /// SessionUp counter messages sent per second.
    pub ups_per_s: f64,
    /// Errors by gRPC code during the whole run's keep-alive.
    pub errors: CodeCounts,
    /// Churn asked for (leaves + joins per second).
    pub churn_per_s: f64,
    /// Leaves / replacement joins done during the window.
    pub churn_leaves: u64,
    /// Replacement joins admitted.
    pub churn_joins: u64,
    /// The bench client's own CPU over the window, seconds.
    pub bench_cpu_s: f64,
}

fn codes(c: &CodeCounts) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let j = &self.join;
        writeln!(
            f,
            "control-bench: {} sessions, mode {}, backend {}",
            self.sessions, self.mode, self.backend
        )?;
        if self.node_reregistrations > 0 {
            writeln!(
                f,
                "  WARNING: the emulated node was declared dead and registered again {} times",
                self.node_reregistrations
            )?;
        }
        writeln!(
            f,
            "  join phase   concurrency {} over {} connections",
            self.concurrency, self.join_connections
        )?;
        writeln!(
            f,
            "    joined             {} ({} failed)",
            j.joined, j.failed
        )?;
        writeln!(f, "    joins/s            {:.0}", j.joins_per_s)?;
        writeln!(
            f,
            "    latency ms         p50 {:.2}  p99 {:.2}  max {:.2}",
            j.p50_ms, j.p99_ms, j.max_ms
        )?;
        writeln!(
            f,
            "    errors             {} (pushbacks honoured: {})",
            codes(&j.errors),
            j.pushbacks
        )?;
        writeln!(
            f,
            "    CP CPU per join    {:.0} us (net of keep-alive: {:.0} us)",
            j.cp_cpu_per_join_us, j.cp_cpu_per_join_net_us
        )?;
        writeln!(
            f,
            "    CP RSS             {} -> {} KiB",
            j.rss_before_kib, j.rss_after_kib
        )?;
        writeln!(f, "    bench CPU          {:.1} s", j.bench_cpu_s)?;
        if let Some(s) = &self.steady {
            writeln!(
                f,
                "  steady phase {:.1} s, {} connections x {} sessions",
                s.wall_s, self.steady_connections, self.sessions_per_connection
            )?;
            writeln!(
                f,
                "    held               start {}  min {}  end {}  (ended by server {}, lost {})",
                s.held_start, s.held_min, s.held_end, s.ended_by_server, s.lost
            )?;
            writeln!(
                f,
                "    CP CPU/viewer-s    {:.2} us ({:.2} s CPU)",
                s.cp_cpu_per_viewer_s_us, s.cp_cpu_s
            )?;
            writeln!(
                f,
                "    CP RSS/session     {:.2} KiB (RSS {} KiB)",
                s.rss_per_session_kib, s.rss_kib
            )?;
            writeln!(
                f,
                "    heartbeats/s       {:.0} (p50 {:.2} ms, p99 {:.2} ms)",
                s.heartbeats_per_s, s.heartbeat_p50_ms, s.heartbeat_p99_ms
            )?;
            writeln!(
                f,
                "    SessionDown/s      {:.0} (pushed updates {:.0}/s); SessionUp/s {:.0}; \
                 streams started {}",
                s.downs_per_s, s.pushes_per_s, s.ups_per_s, s.streams_started
            )?;
            if s.churn_per_s > 0.0 {
                writeln!(
                    f,
                    "    churn              {:.1}/s asked: {} leaves, {} joins",
                    s.churn_per_s, s.churn_leaves, s.churn_joins
                )?;
            }
            writeln!(f, "    errors             {}", codes(&s.errors))?;
            writeln!(f, "    bench CPU          {:.1} s", s.bench_cpu_s)?;
        }
        Ok(())
    }
}
