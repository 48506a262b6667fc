//! The one-line progress report printed every second during a run.

use super::config::RunConfig;
use crate::worker::WorkerSample;
use std::time::Duration;

pub(super) fn progress_line(
    t: Duration,
    cfg: &RunConfig,
    stream_kbps: u32,
    samples: &[WorkerSample],
    egress: Option<u64>,
    recent: &mut crate::report::RecentRate,
) -> String {
    let sum = |f: fn(&WorkerSample) -> u64| samples.iter().map(f).sum::<u64>();
    let active = sum(|s| s.active as u64);
    let joining = sum(|s| s.joining as u64);
    let failed = sum(|s| (s.join_failures + s.closed) as u64);
    let from_peers = sum(|s| s.bytes_from_peers);
    let from_server = sum(|s| s.bytes_from_server);
    let played = sum(|s| s.chunks_played);
    let skipped = sum(|s| s.chunks_skipped);
    let all = from_peers + from_server;
    let share = if all == 0 {
        0.0
    } else {
        from_peers as f64 / all as f64
    };
    let continuity = if played + skipped == 0 {
        1.0
    } else {
        played as f64 / (played + skipped) as f64
    };
    let egress_b = egress.unwrap_or(from_server);
    // Stream copies the server sends now (over the last 5 s), not since the start: the
    // start-up bursts of a ramp would otherwise weigh on it long after.
    let streams = recent.streams(t, egress_b, stream_kbps);
    format!(
        "t={:>5.0}s peers {}/{} (joining {}, failed {}) share {:>5.1}% continuity {:.5} server {} MB ({:.2} streams now) stalls {} workers {}",
        t.as_secs_f64(),
        active,
        cfg.peers,
        joining,
        failed,
        share * 100.0,
        continuity,
        egress_b / 1_000_000,
        streams,
        sum(|s| s.stalls),
        samples.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_the_servers_current_rate_not_the_average_since_the_start() {
        // 80 kbit/s stream; the server sends a 1 MB start-up burst in the first second,
        // then exactly two copies of the stream (20,000 B/s).
        let cfg = RunConfig::default();
        let mut recent = crate::report::RecentRate::default();
        let mut line = String::new();
        for t in 0..=20u64 {
            let egress = 1_000_000 + 20_000 * t;
            line = progress_line(
                Duration::from_secs(t),
                &cfg,
                80,
                &[],
                Some(egress),
                &mut recent,
            );
        }
        assert!(line.contains("(2.00 streams now)"), "{line}");
        assert!(recent.len() <= 7, "{} samples kept", recent.len());
    }
}
