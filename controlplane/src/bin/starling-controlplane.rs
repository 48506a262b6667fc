//! `starling-controlplane`: the Starling control-plane server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use starling_controlplane::{Config, DatabaseConfig, ServiceConfig};

/// Starling control plane: admin, viewer and edge gRPC services (package starling.v1).
///
/// Stores broadcasts, data-plane nodes and viewer sessions in PostgreSQL when
/// --database-url is given, otherwise in an embedded SQLite file
/// (<data-dir>/starling.db, created if missing). Serves gRPC health checking and
/// server reflection, so `grpcurl -plaintext ADDR list` works without the .proto.
#[derive(Debug, Parser)]
#[command(name = "starling-controlplane", version, about, long_about)]
struct Args {
    /// Address to listen on for gRPC (port 0 picks a free port; the bound address is
    /// printed on stderr).
    #[arg(
        long,
        env = "STARLING_CONTROL_LISTEN",
        default_value = "127.0.0.1:7000"
    )]
    listen: SocketAddr,

    /// PostgreSQL URL (postgres://user:pass@host:port/db). Unset: embedded SQLite
    /// under --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// Directory of the embedded SQLite database (used when no --database-url).
    #[arg(long, env = "STARLING_DATA_DIR", default_value = "./starling-data")]
    data_dir: PathBuf,

    /// Interval at which viewers heartbeat their session and data-plane nodes report
    /// health, in milliseconds.
    #[arg(long, env = "STARLING_HEARTBEAT_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(50..=600_000))]
    heartbeat_interval_ms: u64,

    /// A data-plane node silent for this long (no health report, or no command stream)
    /// is declared dead and its broadcasts move to another node, in milliseconds.
    #[arg(long, env = "STARLING_NODE_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    node_timeout_ms: u64,

    /// Log filter (tracing EnvFilter syntax, e.g. `info` or
    /// `starling_controlplane=debug,info`). Falls back to RUST_LOG, then `info`.
    #[arg(long, env = "STARLING_LOG")]
    log: Option<String>,
}

fn init_logging(filter: Option<&str>) {
    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("starling-controlplane: bad log filter {filter:?} ({e}); using `info`");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log.as_deref());

    let database =
        DatabaseConfig::from_url_or_data_dir(args.database_url.as_deref(), &args.data_dir);
    let node_timeout = Duration::from_millis(args.node_timeout_ms);
    let heartbeat_interval = Duration::from_millis(args.heartbeat_interval_ms);
    if node_timeout < heartbeat_interval * 2 {
        tracing::warn!(
            node_timeout_ms = args.node_timeout_ms,
            heartbeat_interval_ms = args.heartbeat_interval_ms,
            "node timeout is less than two heartbeat intervals; healthy nodes may be declared dead"
        );
    }
    let service = ServiceConfig {
        heartbeat_interval,
        node_timeout,
        liveness_tick: (node_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(500)),
        ..ServiceConfig::default()
    };
    let config = Config {
        listen: args.listen,
        database: database.clone(),
        service,
    };
    eprintln!("starling-controlplane: database {}", database.describe());
    starling_controlplane::serve(
        config,
        |addr, backend| {
            eprintln!("starling-controlplane: backend {backend}, listening on {addr} (gRPC)");
        },
        shutdown_signal(),
    )
    .await
    .with_context(|| format!("control plane failed ({})", database.describe()))?;
    eprintln!("starling-controlplane: stopped");
    Ok(())
}
