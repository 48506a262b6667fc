//! `starling-admin audience ID`: the audience roll-ups of `AdminService.GetAudience` as
//! a table (one row per step, then a total row) or JSON.
//!
//! The total row is a second `GetAudience` call with one step spanning the whole range,
//! so every figure of it is exact (start-up percentiles over all sessions, peak of any
//! minute, viewers averaged over the range), not a sum of rounded rows.

use serde_json::json;
use starling_proto::v1::{AudiencePoint, GetAudienceRequest};

use crate::client::{ConnArgs, Failure, connect};
use crate::table::{self, Align, Table};
use crate::when::{self, When};

/// Flags of `audience`.
#[derive(Debug, Clone, clap::Args)]
pub struct AudienceArgs {
    /// Broadcast id.
    pub id: String,
    /// Start of the range: RFC 3339 (`2025-05-01T12:00:00Z`, `...+02:00`) or relative to
    /// now (`-1h`, `now-90m`) [default: the broadcast's first report].
    #[arg(long, value_parser = when::parse_when, allow_hyphen_values = true)]
    pub from: Option<When>,
    /// End of the range (exclusive; rounded up to a whole minute): RFC 3339 or relative
    /// to now (`now`, `-10m`, `+5m`) [default: now].
    #[arg(long, value_parser = when::parse_when, allow_hyphen_values = true)]
    pub to: Option<When>,
    /// Bucket size: a whole number of minutes (`60s`, `5m`, `1h`, `1d`).
    #[arg(long, default_value = "60s", value_parser = when::parse_step)]
    pub step: u32,
    /// Print JSON (`points` and `total`, times in unix ms and RFC 3339) instead of the
    /// table.
    #[arg(long)]
    pub json: bool,
}

const MINUTE_MS: i64 = 60_000;

/// Runs `audience`.
pub async fn run(conn: &ConnArgs, a: &AudienceArgs) -> Result<(), Failure> {
    let now = starling_proto::time::unix_ms_i64();
    let from = a.from.map(|w| w.resolve(now));
    let to = a.to.map_or(now, |w| w.resolve(now));
    if from.is_some_and(|f| f <= 0) || to <= 0 {
        return Err(Failure::Usage(
            "--from and --to must be after 1970-01-01T00:00:00Z".into(),
        ));
    }
    if let Some(f) = from.filter(|f| *f >= to) {
        return Err(Failure::Usage(format!(
            "empty range: --from {} is not before --to {}",
            when::rfc3339(f),
            when::rfc3339(to)
        )));
    }
    let mut client = connect(conn).await?;
    let points = client
        .get_audience(GetAudienceRequest {
            broadcast_id: a.id.clone(),
            from_unix_ms: from.unwrap_or(0),
            to_unix_ms: to,
            step_s: a.step,
        })
        .await?
        .into_inner()
        .points;
    // The whole range in one step: the first bucket's start to `to` rounded up to a
    // minute, as the server rounds it.
    let total = match points.first() {
        None => None,
        Some(first) => {
            let end = (to - 1).div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS;
            let span_s = u32::try_from((end - first.start_unix_ms).max(MINUTE_MS) / 1000)
                .unwrap_or(u32::MAX / 60 * 60);
            client
                .get_audience(GetAudienceRequest {
                    broadcast_id: a.id.clone(),
                    from_unix_ms: first.start_unix_ms,
                    to_unix_ms: to,
                    step_s: span_s,
                })
                .await?
                .into_inner()
                .points
                .into_iter()
                .next()
        }
    };
    if a.json {
        println!("{}", to_json(&a.id, a.step, to, &points, total.as_ref()));
    } else {
        for line in render(&points, total.as_ref()) {
            println!("{line}");
        }
        if points.is_empty() {
            println!("(no viewer reports in this range)");
        }
    }
    Ok(())
}

fn point_json(p: &AudiencePoint) -> serde_json::Value {
    json!({
        "concurrent_viewers": p.concurrent_viewers,
        "peak_viewers": p.peak_viewers,
        "watch_time_s": p.watch_time_s,
        "peer_share": p.peer_share,
        "server_egress_bytes": p.server_egress_bytes,
        "peer_bytes": p.peer_bytes,
        "rebuffer_ratio": p.rebuffer_ratio,
        "startup_p50_ms": p.startup_p50_ms,
        "startup_p95_ms": p.startup_p95_ms,
    })
}

fn to_json(
    id: &str,
    step_s: u32,
    to_ms: i64,
    points: &[AudiencePoint],
    total: Option<&AudiencePoint>,
) -> serde_json::Value {
    let pts: Vec<_> = points
        .iter()
        .map(|p| {
            let mut v = point_json(p);
            v["start_unix_ms"] = json!(p.start_unix_ms);
            v["start"] = json!(when::rfc3339(p.start_unix_ms));
            v
        })
        .collect();
    json!({
        "broadcast_id": id,
        "step_s": step_s,
        "from_unix_ms": points.first().map(|p| p.start_unix_ms),
        "to_unix_ms": to_ms,
        "points": pts,
        "total": total.map(point_json),
    })
}

fn cells(first: String, p: &AudiencePoint) -> Vec<String> {
    vec![
        first,
        format!("{:.1}", p.concurrent_viewers),
        p.peak_viewers.to_string(),
        table::duration_s(p.watch_time_s),
        table::percent(p.peer_share),
        table::bytes(p.server_egress_bytes),
        table::bytes(p.peer_bytes),
        table::percent2(p.rebuffer_ratio),
        table::ms_or_dash(p.startup_p50_ms),
        table::ms_or_dash(p.startup_p95_ms),
    ]
}

/// The table: one row per point, then `total` (when there is one).
pub fn render(points: &[AudiencePoint], total: Option<&AudiencePoint>) -> Vec<String> {
    let mut t = Table::new(&[
        ("START (UTC)", Align::Left),
        ("VIEWERS", Align::Right),
        ("PEAK", Align::Right),
        ("WATCH", Align::Right),
        ("PEER_SHARE", Align::Right),
        ("SERVER_EGRESS", Align::Right),
        ("PEER_BYTES", Align::Right),
        ("REBUFFER", Align::Right),
        ("STARTUP_P50", Align::Right),
        ("STARTUP_P95", Align::Right),
    ]);
    for p in points {
        t.row(cells(when::rfc3339(p.start_unix_ms), p));
    }
    if let Some(p) = total {
        t.row(cells("total".into(), p));
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_total_line_up() {
        let p = AudiencePoint {
            start_unix_ms: 1_746_100_800_000,
            concurrent_viewers: 2.5,
            peak_viewers: 3,
            watch_time_s: 150.0,
            peer_share: 0.75,
            server_egress_bytes: 1_500_000,
            peer_bytes: 4_500_000,
            rebuffer_ratio: 0.0012,
            startup_p50_ms: 400,
            startup_p95_ms: 500,
        };
        let lines = render(std::slice::from_ref(&p), Some(&p));
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("START (UTC)           VIEWERS  PEAK"));
        assert!(lines[1].starts_with("2025-05-01T12:00:00Z      2.5     3  2m30s"));
        assert!(lines[2].starts_with("total                     2.5     3"));
        assert!(
            lines[1]
                .ends_with("75.0%        1.50 MB     4.50 MB     0.12%       400 ms       500 ms"),
            "{}",
            lines.join("\n")
        );
        let v = to_json("b1", 60, 1_746_100_860_000, &[p], Some(&p));
        assert_eq!(v["points"][0]["start"], "2025-05-01T12:00:00Z");
        assert_eq!(v["total"]["peer_bytes"], 4_500_000);
        assert_eq!(v["from_unix_ms"], 1_746_100_800_000i64);
    }
}
