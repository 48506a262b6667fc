//! `starling-dataplane`: the Starling data-plane node.

use anyhow::Context;
use clap::Parser;
use starling_dataplane::{Config, Node, StaticBroadcast, Timeouts};
use std::net::SocketAddr;

/// Starling data plane: pulls live streams over HTTP, cuts them into numbered chunks,
/// keeps a window of recent chunks in memory and serves viewers over the Starling wire
/// protocol and plain HTTP (`GET /live/{broadcast}`, `GET /metrics`).
///
/// Runs under a control plane (`--control-url`) and/or standalone with
/// `--static-broadcast ID=URL` broadcasts.
#[derive(Debug, Parser)]
#[command(name = "starling-dataplane", version)]
struct Args {
    /// gRPC URL of the control plane (EdgeService), e.g. http://127.0.0.1:7000.
    #[arg(long, env = "STARLING_CONTROL_URL")]
    control_url: Option<String>,

    /// Broadcast to ingest at startup without a control plane, as ID=URL
    /// (http:// only). Repeatable; comma-separated in the env var.
    #[arg(
        long = "static-broadcast",
        env = "STARLING_STATIC_BROADCASTS",
        value_delimiter = ','
    )]
    static_broadcasts: Vec<StaticBroadcast>,

    /// Target chunk duration (ms) for --static-broadcast broadcasts.
    #[arg(long, env = "STARLING_STATIC_CHUNK_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(100..=10000))]
    static_chunk_ms: u32,

    /// Substreams (K) of --static-broadcast broadcasts: chunk seq % K. Broadcasts from
    /// the control plane carry their own K.
    #[arg(long, env = "STARLING_STATIC_SUBSTREAMS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    static_substreams: u16,

    /// Seconds without anything sent on a wire connection before a keep-alive PING.
    #[arg(long, env = "STARLING_KEEPALIVE_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    keepalive_secs: u64,

    /// Seconds without anything received (not even PONG) before a subscribed wire
    /// connection is closed with ERROR(IDLE_TIMEOUT).
    #[arg(long, env = "STARLING_IDLE_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    idle_timeout_secs: u64,

    /// Wire-protocol listen address (bound on every executor with SO_REUSEPORT).
    #[arg(long, env = "STARLING_WIRE_LISTEN", default_value = "0.0.0.0:7100")]
    wire_listen: SocketAddr,

    /// Plain HTTP listen address (GET /live/{broadcast}, GET /healthz, GET /metrics).
    #[arg(long, env = "STARLING_HTTP_LISTEN", default_value = "0.0.0.0:7180")]
    http_listen: SocketAddr,

    /// Host name or IP advertised to the control plane, with the bound ports.
    #[arg(long, env = "STARLING_ADVERTISE_HOST", default_value = "127.0.0.1")]
    advertise_host: String,

    /// Node name announced to the control plane (default: the host name).
    #[arg(long, env = "STARLING_NODE_NAME")]
    node_name: Option<String>,

    /// glommio executors, one per core; 0 = all available cores.
    #[arg(long, env = "STARLING_CORES", default_value_t = 0)]
    cores: usize,

    /// Seconds of recent chunks kept in memory per broadcast.
    #[arg(long, env = "STARLING_WINDOW_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    window_secs: u32,

    /// Hard cap on a chunk's size in bytes.
    #[arg(long, env = "STARLING_MAX_CHUNK_BYTES", default_value_t = 1024 * 1024)]
    max_chunk_bytes: usize,

    /// io_uring registered memory per executor, KiB (the memlock limit bounds it:
    /// glommio's default of 10 MiB needs a large RLIMIT_MEMLOCK).
    #[arg(long, env = "STARLING_IO_MEMORY_KIB", default_value_t = 512)]
    io_memory_kib: usize,

    /// Viewer connections this node accepts (announced to the control plane).
    #[arg(long, env = "STARLING_CAPACITY_VIEWERS", default_value_t = 10_000)]
    capacity_viewers: u32,

    /// Log filter (tracing EnvFilter syntax), e.g. info or starling_dataplane=debug.
    #[arg(long = "log", env = "STARLING_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("bad --log filter {:?}", args.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let node_name = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "dataplane".into())
    });
    let cfg = Config {
        control_url: args.control_url,
        static_broadcasts: args.static_broadcasts,
        static_chunk_ms: args.static_chunk_ms,
        static_substreams: args.static_substreams,
        wire_listen: args.wire_listen,
        http_listen: args.http_listen,
        advertise_host: args.advertise_host,
        node_name,
        cores: args.cores,
        window_secs: args.window_secs,
        max_chunk_bytes: args.max_chunk_bytes,
        io_memory_kib: args.io_memory_kib,
        capacity_viewers: args.capacity_viewers,
        timeouts: Timeouts {
            keepalive: std::time::Duration::from_secs(args.keepalive_secs),
            idle: std::time::Duration::from_secs(args.idle_timeout_secs),
            ..Timeouts::default()
        },
    };
    let node = Node::start(cfg).context("starting the data plane")?;
    eprintln!(
        "starling-dataplane: wire listening on {}, http listening on {}",
        node.wire_addr(),
        node.http_addr()
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let _signals = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
                    }
                });
            }
            let _ = tx.send(());
        })?;
    let _ = rx.recv();
    eprintln!("starling-dataplane: shutting down");
    node.shutdown();
    node.join()?;
    Ok(())
}
