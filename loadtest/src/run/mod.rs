//! `starling-loadtest run`: the coordinator of a multi-process load test.
//!
//! One process holds about 20 open files per in-process peer and the per-process limit
//! here is 20,000, so large runs spread their peers over **worker processes**
//! ([`crate::worker`]), as a real load test spreads over machines. The coordinator:
//!
//! 1. starts a deployment — the synthetic source and the control plane (embedded
//!    SQLite) in its own process, the data plane in a child process (`starling-loadtest
//!    dataplane`, so that its one socket per viewer and the control plane's one gRPC
//!    connection per viewer do not share one process's file limit) — or uses an
//!    existing control plane and broadcast ([`External`]);
//! 2. listens for workers on TCP, spawns the local ones (`starling-loadtest worker
//!    --coordinator ADDR`) and waits for the remote ones, gives each its share of the
//!    peers (hello), then starts them all at once;
//! 3. prints a progress line every second from the workers' samples and the data
//!    plane's egress counter, sends churn commands during the steady phase, stops the
//!    workers after `duration`, and merges their final figures into one [`RunReport`];
//!    meanwhile it samples this machine's busy fraction every second and every
//!    process's RSS every [`RSS_EVERY`] (`rss.rs`), for the per-peer join groups and
//!    lag histogram (`perpeer.rs`) and the RSS lines of the report.

mod admission;
mod config;
mod dataplane;
mod drive;
mod merge;
mod perpeer;
mod progress;
mod report;
mod rss;
mod series;
mod stack;

pub use admission::ADMISSION_CLOSE;
pub use config::{External, Net, PEERS_PER_WORKER, RunConfig};
pub use dataplane::{dataplane_child, scrape_wire_egress};
pub use perpeer::{GroupFigures, JoinGroups, LAG_BOUNDS_MS, LagHistogram, MACHINE_BOUND_BUSY};
pub use report::{P2, P3, ProcessReport, RunReport};
pub use rss::{RSS_EVERY, RSS_FLAT_WITHIN, RSS_POINTS, RssFigures};
pub use series::Series;

use crate::error::HarnessError;
use drive::drive;
use stack::Stack;
use tokio::net::TcpListener;

/// Runs a whole load test and returns the merged report.
pub async fn run(cfg: RunConfig) -> Result<RunReport, HarnessError> {
    if cfg.peers == 0 {
        return Err(HarnessError::Config("--peers must be at least 1".into()));
    }
    let workers = cfg.worker_count();
    if workers > 254 {
        return Err(HarnessError::Config(
            "at most 254 workers (one 127.x/16 block each)".into(),
        ));
    }
    if cfg.remote_workers > workers {
        return Err(HarnessError::Config(
            "--remote-workers exceeds --workers".into(),
        ));
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| HarnessError::Start(format!("listen {}: {e}", cfg.listen)))?;
    let coord_addr = listener
        .local_addr()
        .map_err(|e| HarnessError::Start(format!("listen: {e}")))?;
    let stack = Stack::start(&cfg).await?;
    let say = |s: String| {
        if cfg.progress {
            eprintln!("{s}");
        }
    };
    say(format!(
        "starling run: control plane {}, broadcast {}, {} peers over {} workers, coordinator {}",
        stack.control_url, stack.broadcast_id, cfg.peers, workers, coord_addr
    ));
    let result = drive(&cfg, &stack, listener, coord_addr, workers).await;
    stack.shutdown().await;
    result
}
