//! `starling-admin top`: the live broadcasts and their peer-grid figures
//! (`ListBroadcasts`), refreshed every `--interval`.
//!
//! On a terminal it takes the screen (alternate screen, cursor hidden, each frame drawn
//! over the previous one) and gives it back on Ctrl-C, on an error and at the end of
//! `--iterations`; when stdout is not a terminal (a pipe, a file, a test) it prints one
//! plain table per refresh, separated by blank lines. `--once` prints one table and
//! exits; `--json` prints one JSON object per refresh (newline-delimited).
//!
//! The figures are the control plane's: `PEERS` (SDK sessions in the grid), `VIEWERS`
//! (the data plane's connected viewers, SDK and plain HTTP), `PEER_SHARE` (bytes from
//! peers over all bytes delivered, from heartbeats) and `SHARE_1M` (the same over the
//! last minute, from viewer reports), `BOOSTER_KBPS` (what the data plane sends SDK
//! viewers: booster slots times the slot rate) against `BOUND_KBPS` (the
//! Kumar–Liu–Ross fluid bound of the current grid: no tree can need less), `DEPTH` (the
//! deepest substream tree), the source's health and the measured stream rate.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use serde_json::json;
use starling_proto::v1::{Broadcast, BroadcastState, ListBroadcastsRequest};

use crate::client::{Client, ConnArgs, Failure, connect};
use crate::show::{health_str, to_json};
use crate::table::{self, Align, Table};
use crate::when;

/// Flags of `top`.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// Time between refreshes (e.g. 1s, 500ms, 5s).
    #[arg(long, default_value = "1s", value_parser = starling_proto::time::parse_nonzero_duration)]
    pub interval: Duration,
    /// Print one table and exit (never full screen).
    #[arg(long, conflicts_with = "iterations")]
    pub once: bool,
    /// Stop after this many refreshes (a failed call then exits 1 instead of being
    /// retried).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
    /// One JSON object per refresh, newline-delimited (`at_unix_ms`, `broadcasts` as
    /// `get --json` prints them); never full screen.
    #[arg(long)]
    pub json: bool,
}

/// Escape sequences of the full-screen mode (VT100/xterm).
const ENTER: &str = "\x1b[?1049h\x1b[?25l";
const LEAVE: &str = "\x1b[?25h\x1b[?1049l";
const HOME: &str = "\x1b[H";
const CLEAR_LINE_END: &str = "\x1b[K";
const CLEAR_SCREEN_END: &str = "\x1b[J";

/// Holds the terminal in full-screen mode; gives it back when dropped (also on an error
/// or a panic).
struct Screen;

impl Screen {
    fn enter() -> Screen {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(ENTER.as_bytes());
        let _ = out.flush();
        Screen
    }

    fn draw(&self, lines: &[String]) {
        let mut s = String::from(HOME);
        for l in lines {
            s.push_str(l);
            s.push_str(CLEAR_LINE_END);
            s.push('\n');
        }
        s.push_str(CLEAR_SCREEN_END);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(LEAVE.as_bytes());
        let _ = out.flush();
    }
}

/// Runs `top`.
pub async fn run(conn: &ConnArgs, a: &TopArgs) -> Result<(), Failure> {
    let limit = if a.once { Some(1) } else { a.iterations };
    // Ctrl-C ends the loop (the screen is given back); if no handler can be installed,
    // the default action (the process ends) stays.
    // The handler is installed here, before the first frame, not on first poll.
    let sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    let ctrl_c = async move {
        match sigint {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(ctrl_c);
    let screen = (std::io::stdout().is_terminal() && !a.once && !a.json).then(Screen::enter);
    let mut ticks = tokio::time::interval(a.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    let mut done = 0u64;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = ticks.tick() => {}
        }
        let fetched = tokio::select! {
            _ = &mut ctrl_c => break,
            r = fetch(&mut client, conn) => r,
        };
        let now = starling_proto::time::unix_ms_i64();
        let lines = match fetched {
            Ok(list) if a.json => {
                let arr: Vec<_> = list.iter().map(to_json).collect();
                vec![json!({"at_unix_ms": now, "broadcasts": arr}).to_string()]
            }
            Ok(list) => frame(&conn.control_url, a.interval, now, &list),
            Err(e) => {
                // Retried only when running until Ctrl-C and the failure may pass.
                let transient = match &e {
                    Failure::Connect(_) => true,
                    Failure::Status(s) => matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                    ),
                    Failure::Timeout(_) | Failure::Usage(_) => false,
                };
                if limit.is_some() || !transient {
                    return Err(e);
                }
                client = None;
                vec![
                    format!("starling top  {}  {}", when::rfc3339(now), conn.control_url),
                    String::new(),
                    format!("error: {e}; retrying every {:?}", a.interval),
                ]
            }
        };
        match &screen {
            Some(s) => s.draw(&lines),
            None => {
                let mut out = std::io::stdout().lock();
                for l in &lines {
                    let _ = writeln!(out, "{l}");
                }
                if !a.json {
                    let _ = writeln!(out);
                }
                let _ = out.flush();
            }
        }
        done += 1;
        if limit.is_some_and(|n| done >= n) {
            break;
        }
    }
    drop(screen);
    Ok(())
}

/// The live broadcasts, busiest first.
async fn fetch(client: &mut Option<Client>, conn: &ConnArgs) -> Result<Vec<Broadcast>, Failure> {
    let c = match client {
        Some(c) => c,
        None => client.insert(connect(conn).await?),
    };
    let mut list: Vec<Broadcast> = c
        .list_broadcasts(ListBroadcastsRequest {
            include_stopped: false,
        })
        .await?
        .into_inner()
        .broadcasts
        .into_iter()
        .filter(|b| b.state == BroadcastState::Live as i32)
        .collect();
    list.sort_by(|x, y| {
        (y.peers, y.viewers_now)
            .cmp(&(x.peers, x.viewers_now))
            .then_with(|| x.id.cmp(&y.id))
    });
    Ok(list)
}

/// One screenful: a title, the totals, the table.
pub fn frame(url: &str, interval: Duration, now_ms: i64, list: &[Broadcast]) -> Vec<String> {
    let sum = |f: fn(&Broadcast) -> u64| list.iter().map(f).sum::<u64>();
    let mut lines = vec![
        format!(
            "starling top  {}  {url}  every {:?}",
            when::rfc3339(now_ms),
            interval
        ),
        format!(
            "{} live broadcast{}: {} peers, {} viewers, booster {} kbps (fluid bound {} kbps)",
            list.len(),
            if list.len() == 1 { "" } else { "s" },
            sum(|b| u64::from(b.peers)),
            sum(|b| u64::from(b.viewers_now)),
            sum(|b| b.booster_kbps),
            sum(|b| b.fluid_bound_kbps),
        ),
        String::new(),
    ];
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("HEALTH", Align::Left),
        ("STREAM_KBPS", Align::Right),
        ("VIEWERS", Align::Right),
        ("PEERS", Align::Right),
        ("PEER_SHARE", Align::Right),
        ("SHARE_1M", Align::Right),
        ("BOOSTER_KBPS", Align::Right),
        ("BOUND_KBPS", Align::Right),
        ("DEPTH", Align::Right),
        ("NAME", Align::Left),
    ]);
    for b in list {
        t.row(vec![
            b.id.clone(),
            health_str(b.source_health).to_string(),
            b.stream_kbps.to_string(),
            b.viewers_now.to_string(),
            b.peers.to_string(),
            table::percent(b.peer_share),
            table::percent(b.peer_share_last_minute),
            b.booster_kbps.to_string(),
            b.fluid_bound_kbps.to_string(),
            b.max_depth.to_string(),
            table::cut(&b.name, 32),
        ]);
    }
    lines.extend(t.render());
    if list.is_empty() {
        lines.push("(no live broadcasts)".into());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::v1::SourceHealth;

    #[test]
    fn frame_shows_totals_and_one_row_per_broadcast() {
        let b = Broadcast {
            id: "b1".into(),
            name: "radio".into(),
            state: BroadcastState::Live as i32,
            source_health: SourceHealth::Up as i32,
            stream_kbps: 1000,
            viewers_now: 4,
            peers: 3,
            peer_share: 0.5,
            booster_kbps: 1500,
            fluid_bound_kbps: 1000,
            max_depth: 2,
            ..Default::default()
        };
        let lines = frame("http://cp", Duration::from_secs(1), 1_746_100_800_000, &[b]);
        assert_eq!(
            lines[0],
            "starling top  2025-05-01T12:00:00Z  http://cp  every 1s"
        );
        assert_eq!(
            lines[1],
            "1 live broadcast: 3 peers, 4 viewers, booster 1500 kbps (fluid bound 1000 kbps)"
        );
        assert!(
            lines[3].starts_with("ID  HEALTH  STREAM_KBPS"),
            "{}",
            lines[3]
        );
        assert_eq!(
            lines[4],
            "b1  up             1000        4      3       50.0%      0.0%          1500        1000      2  radio"
        );
        let empty = frame("http://cp", Duration::from_secs(1), 0, &[]);
        assert_eq!(
            empty.last().map(String::as_str),
            Some("(no live broadcasts)")
        );
    }
}
