//! `starling-loadtest`: drives real SDK peers against a Starling deployment.
//!
//! `demo` runs everything in-process (embedded SQLite, synthetic source, one data-plane
//! node, N peers on loopback) until Ctrl-C or `--duration`, with a progress line on
//! stderr every second and a short report at the end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use starling_loadtest::{Deployment, DeploymentConfig, Report, Swarm, SwarmConfig, UploadProfile};

#[derive(Debug, Parser)]
#[command(
    name = "starling-loadtest",
    version,
    about = "Starling load test and demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in-process: control plane (embedded SQLite), data plane, synthetic
    /// source and a swarm of SDK peers; runs until Ctrl-C or --duration.
    Demo(DemoArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Number of peers.
    #[arg(long, env = "STARLING_LOADTEST_PEERS", default_value_t = 200)]
    peers: usize,
    /// Stop after this long (e.g. `20s`, `5m`, `90`); default: until Ctrl-C.
    #[arg(long, env = "STARLING_LOADTEST_DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stream rate of the synthetic source, kbit/s.
    #[arg(long, env = "STARLING_LOADTEST_BITRATE_KBPS", default_value_t = 500)]
    bitrate_kbps: u32,
    /// Upload budgets as multiples of the stream rate, assigned to peers in turn
    /// (0 = never relays).
    #[arg(
        long,
        env = "STARLING_LOADTEST_UPLOAD_PROFILE",
        default_value = "0,1,2,0,1.5,3"
    )]
    upload_profile: String,
    /// Joins per second (0 = all at once).
    #[arg(long, env = "STARLING_LOADTEST_JOIN_RATE", default_value_t = 50.0)]
    join_rate: f64,
    /// Chunk duration, ms.
    #[arg(long, env = "STARLING_LOADTEST_CHUNK_MS", default_value_t = 250)]
    chunk_ms: u32,
    /// Substreams (K).
    #[arg(long, env = "STARLING_LOADTEST_SUBSTREAMS", default_value_t = 4)]
    substreams: u32,
    /// Skip the byte-identity check of every peer's output (saves CPU).
    #[arg(long, env = "STARLING_LOADTEST_NO_IDENTITY_CHECK")]
    no_identity_check: bool,
    /// Also write the final report as JSON to this file.
    #[arg(long, env = "STARLING_LOADTEST_JSON")]
    json: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (e.g. 20s, 5m)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("not a duration: {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(args) => rt.block_on(demo(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    let upload = UploadProfile::parse(&args.upload_profile)?;
    let dep = Deployment::start(DeploymentConfig {
        bitrate_kbps: args.bitrate_kbps,
        chunk_ms: args.chunk_ms,
        substreams: args.substreams,
        ..DeploymentConfig::default()
    })
    .await?;
    eprintln!(
        "starling demo: control plane {}, data plane {}, source {} ({} kbps), broadcast {}",
        dep.control_url(),
        dep.node()
            .map(|n| n.wire_addr().to_string())
            .unwrap_or_default(),
        dep.source().url(),
        args.bitrate_kbps,
        dep.broadcast_id()
    );
    eprintln!(
        "joining {} peers at {}/s, upload profile {:?} x stream rate (mean {:.2}x); Ctrl-C to stop",
        args.peers,
        args.join_rate,
        upload.multiples,
        upload.mean()
    );
    let config = SwarmConfig {
        peers: args.peers,
        upload,
        join_rate: args.join_rate,
        check_identity: !args.no_identity_check,
        ..SwarmConfig::default()
    };
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let swarm = Swarm::new(&dep);
    // Joins run in the background so the progress display starts at once.
    let joining = {
        let swarm = swarm.clone();
        tokio::spawn(async move { swarm.add_peers(&config).await })
    };
    let tty = std::io::stderr().is_terminal();
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    loop {
        tokio::select! {
            _ = progress.tick() => {}
            _ = &mut ctrl_c => break,
            () = &mut until_deadline => break,
        }
        let line = Report::of(&swarm.sample()).progress_line();
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
    joining.abort();
    if tty {
        eprintln!();
    }
    let report = Report::of(&swarm.sample());
    let grid = dep.broadcast().await.ok();
    println!("=== starling demo report ===\n{report}");
    if let Some(b) = &grid {
        println!(
            "control plane: peers {}, demand {} slots, peer supply {} slots, booster {} slots ({} kbps), max depth {}",
            b.peers,
            b.demand_slots,
            b.peer_supply_slots,
            b.booster_slots,
            b.booster_kbps,
            b.max_depth
        );
    }
    if let Some(path) = &args.json {
        let json = report_json(&report, args.bitrate_kbps);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        eprintln!("report written to {}", path.display());
    }
    swarm.shutdown().await;
    dep.shutdown().await;
    Ok(())
}

fn report_json(r: &Report, bitrate_kbps: u32) -> serde_json::Value {
    serde_json::json!({
        "peers": r.peers_total,
        "peers_active": r.peers_active,
        "duration_s": r.window.as_secs_f64(),
        "bitrate_kbps": bitrate_kbps,
        "peer_share": r.peer_share,
        "continuity": r.continuity,
        "continuity_min": r.continuity_min,
        "startup_ms": {"p50": r.startup_ms.p50, "p95": r.startup_ms.p95, "p99": r.startup_ms.p99},
        "join_rpc_ms": {"p50": r.join_ms.p50, "p99": r.join_ms.p99},
        "stalls": r.chunks_skipped,
        "parent_changes": r.parent_changes,
        "server_egress_bytes": r.dataplane_egress_bytes.unwrap_or(r.bytes_from_server),
        "bytes_from_peers": r.bytes_from_peers,
        "bytes_uploaded": r.bytes_uploaded,
        "not_identical": r.not_identical,
        "errors": r.errors,
    })
}
