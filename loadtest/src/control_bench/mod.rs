//! `starling-loadtest control-bench`: the control plane's own benchmark. It drives a
//! real control plane (a child process, so its CPU and RSS come from /proc) over real
//! gRPC with cheap raw tonic clients (not the SDK): N joins at a given concurrency,
//! then a steady phase with every session held by the session stream or by unary
//! heartbeats, and reports joins/s, latency, control-plane CPU per join and per
//! viewer-second, and RSS per session.
//!
//! * [`config`]: [`BenchConfig`] (typed; the binary parses the flags).
//! * [`target`]: the control plane under test, its broadcast and an emulated
//!   data-plane node (so no data plane's CPU pollutes the figures).
//! * [`embedded`]: the library control plane in a child process (when the binary is
//!   absent, e.g. in tests).
//! * [`join`]: the join phase (RESOURCE_EXHAUSTED pushback honoured with jitter).
//! * [`steady`]: one keeper task per session (stream or heartbeat).
//! * [`stats`]: latency histogram, /proc readings.
//! * [`report`]: [`BenchReport`], its table and JSON.

pub mod config;
pub mod embedded;
pub mod join;
pub mod report;
pub mod stats;
pub mod steady;
pub mod target;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use starling_proto::v1::LeaveRequest;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use tokio::sync::watch;
use tonic::transport::Channel;

pub use config::{BenchConfig, Mode, PeerAddrs, Target};
pub use report::{BenchReport, JoinReport, SteadyReport};

use stats::{ProcSample, proc_sample};
use steady::Keepers;

/// Settling time between the join phase and the measured steady window (the last
/// joins' first keep-alive exchanges).
const SETTLE: Duration = Duration::from_secs(2);

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The control plane, its broadcast or the emulated node could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// `--mode stream` against a control plane without the session stream.
    #[error(
        "the control plane answered UNIMPLEMENTED to ViewerService.Session (no session \
         stream); use --mode heartbeat"
    )]
    StreamUnimplemented,
    /// The control plane exited during the run.
    #[error("the control plane exited during the run; its stderr:\n{0}")]
    Exited(String),
    /// Stopped by a signal.
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    /// /proc could not be read for the control plane's process.
    #[error("cannot read /proc/{0}/stat and status (is the control plane on this machine?)")]
    Proc(u32),
}

/// One held session (for churn).
struct Slot {
    session_id: String,
    keeper: tokio::task::JoinHandle<()>,
    joined_at: Instant,
}

type Slots = Arc<Vec<Mutex<Option<Slot>>>>;

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

fn sample(pid: u32) -> Result<ProcSample, BenchError> {
    proc_sample(pid).ok_or(BenchError::Proc(pid))
}

fn own() -> ProcSample {
    proc_sample(std::process::id()).unwrap_or_default()
}

/// What the progress line shows.
struct Progress {
    phase: Mutex<&'static str>,
    done: Arc<AtomicU64>,
    total: AtomicU64,
    held_min: AtomicU64,
}

fn spawn_progress(
    progress: Arc<Progress>,
    keepers: Arc<Keepers>,
    print: bool,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_done = 0;
        let mut last = keepers.counters.snapshot();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            let now = keepers.counters.snapshot();
            let phase = *progress.phase.lock();
            if phase == "steady" {
                progress.held_min.fetch_min(now.held, Ordering::Relaxed);
            }
            let done = progress.done.load(Ordering::Relaxed);
            if print {
                let head = if phase == "join" {
                    format!(
                        "{done}/{} joins ({}/s)",
                        progress.total.load(Ordering::Relaxed),
                        done.saturating_sub(last_done)
                    )
                } else {
                    format!("{done}/{} s", progress.total.load(Ordering::Relaxed))
                };
                eprintln!(
                    "control-bench [{phase}] {head}  held {}  heartbeats {}/s  \
                     SessionDown {}/s  ended {}",
                    now.held,
                    now.heartbeats - last.heartbeats,
                    now.downs - last.downs,
                    now.lost + now.ended_by_server,
                );
            }
            last_done = done;
            last = now;
        }
    });
}

/// Runs the benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> Result<BenchReport, BenchError> {
    if cfg.sessions == 0 || cfg.concurrency == 0 || cfg.join_connections == 0 {
        return Err(BenchError::Config(
            "--sessions, --concurrency and --connections must be at least 1".into(),
        ));
    }
    if cfg.sessions_per_connection == 0 {
        return Err(BenchError::Config(
            "--sessions-per-connection must be at least 1".into(),
        ));
    }
    let mut running = target::start(&cfg).await?;
    let pid = running.pid;
    let mut join_channels = Vec::new();
    for _ in 0..cfg.join_connections {
        join_channels.push(target::connect(&running.url, &running.transport).await?);
    }
    let mut steady_channels = Vec::new();
    for _ in 0..cfg.steady_connections() {
        steady_channels.push(target::connect(&running.url, &running.transport).await?);
    }
    let steady_channels: Arc<Vec<Channel>> = Arc::new(steady_channels);
    let (stop_tx, stop_rx) = watch::channel(false);
    let keepers = Arc::new(Keepers::new(
        cfg.mode,
        cfg.stream_kbps,
        cfg.call_timeout,
        stop_rx.clone(),
    ));
    let slots: Slots = Arc::new((0..cfg.sessions).map(|_| Mutex::new(None)).collect());
    let abort = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress {
        phase: Mutex::new("join"),
        done: Arc::new(AtomicU64::new(0)),
        total: AtomicU64::new(cfg.sessions as u64),
        held_min: AtomicU64::new(u64::MAX),
    });
    spawn_progress(
        progress.clone(),
        keepers.clone(),
        cfg.progress,
        stop_rx.clone(),
    );

    // ---------------------------------------------------------------- join phase
    let on_joined = {
        let keepers = keepers.clone();
        let slots = slots.clone();
        let channels = steady_channels.clone();
        let abort = abort.clone();
        let per_conn = cfg.sessions_per_connection;
        let n = cfg.sessions;
        Arc::new(move |i: usize, resp: starling_proto::v1::JoinResponse| {
            let slot = i % n;
            let channel = channels[(slot / per_conn) % channels.len()].clone();
            let keeper =
                keepers.spawn(channel, resp.session_id.clone(), resp.heartbeat_interval_ms);
            if keepers.counters.unimplemented.load(Ordering::Relaxed) {
                abort.store(true, Ordering::Relaxed);
            }
            *slots[slot].lock() = Some(Slot {
                session_id: resp.session_id,
                keeper,
                joined_at: Instant::now(),
            });
        })
    };
    let cp0 = sample(pid)?;
    let own0 = own();
    let joins = join::run(
        &cfg,
        &running.broadcast_id,
        &join_channels,
        cfg.sessions,
        progress.done.clone(),
        abort.clone(),
        on_joined,
    )
    .await;
    let join_end = Instant::now();
    let cp1 = sample(pid)?;
    let own1 = own();
    if keepers.counters.unimplemented.load(Ordering::Relaxed) {
        return Err(BenchError::StreamUnimplemented);
    }
    if !running.alive() {
        return Err(BenchError::Exited(running.log_tail()));
    }
    let join_viewer_s: f64 = slots
        .iter()
        .filter_map(|s| {
            s.lock()
                .as_ref()
                .map(|s| join_end.duration_since(s.joined_at).as_secs_f64())
        })
        .sum();
    let join_cpu = cp1.cpu_us.saturating_sub(cp0.cpu_us);
    let per_join = |cpu_us: f64| {
        if joins.joined == 0 {
            0.0
        } else {
            cpu_us / joins.joined as f64
        }
    };
    let mut join_report = JoinReport {
        joined: joins.joined,
        failed: joins.failed,
        wall_s: joins.wall.as_secs_f64(),
        joins_per_s: joins.joined as f64 / joins.wall.as_secs_f64().max(1e-9),
        p50_ms: ms(joins.latency.quantile(0.5)),
        p99_ms: ms(joins.latency.quantile(0.99)),
        max_ms: ms(joins.latency.max()),
        errors: joins.errors.clone(),
        pushbacks: joins.pushbacks,
        cp_cpu_s: secs(join_cpu),
        cp_cpu_per_join_us: per_join(join_cpu as f64),
        cp_cpu_per_join_net_us: 0.0,
        rss_before_kib: cp0.rss_kib,
        rss_after_kib: cp1.rss_kib,
        bench_cpu_s: secs(own1.cpu_us.saturating_sub(own0.cpu_us)),
    };
    let mut report = BenchReport {
        mode: cfg.mode.name().into(),
        backend: running.backend.clone(),
        sessions: cfg.sessions as u64,
        concurrency: cfg.concurrency as u64,
        join_connections: cfg.join_connections as u64,
        steady_connections: steady_channels.len() as u64,
        sessions_per_connection: cfg.sessions_per_connection as u64,
        node_reregistrations: 0,
        join: join_report.clone(),
        steady: None,
    };
    if joins.joined == 0 {
        report.node_reregistrations = running.node_reregistrations.load(Ordering::Relaxed);
        let _ = stop_tx.send(true);
        running.shutdown();
        return Ok(report);
    }

    // ---------------------------------------------------------------- steady phase
    progress.done.store(0, Ordering::Relaxed);
    progress.total.store(SETTLE.as_secs(), Ordering::Relaxed);
    *progress.phase.lock() = "settle";
    tokio::time::sleep(SETTLE).await;
    let held_start = keepers.counters.snapshot();
    progress.held_min.store(held_start.held, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    progress
        .total
        .store(cfg.steady.as_secs().max(1), Ordering::Relaxed);
    *progress.phase.lock() = "steady";
    let cp2 = sample(pid)?;
    let own2 = own();
    let t0 = Instant::now();
    let churn = Arc::new(ChurnCounts::default());
    let (churn_stop, churn_stop_rx) = watch::channel(false);
    let churn_task = (cfg.churn_per_s > 0.0).then(|| {
        tokio::spawn(churn_loop(Churn {
            cfg: cfg.clone(),
            broadcast_id: running.broadcast_id.clone(),
            join_channels: join_channels.clone(),
            steady_channels: steady_channels.clone(),
            keepers: keepers.clone(),
            slots: slots.clone(),
            counts: churn.clone(),
            stop: churn_stop_rx,
        }))
    });
    while t0.elapsed() < cfg.steady {
        let left = cfg.steady.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        progress
            .done
            .store(t0.elapsed().as_secs(), Ordering::Relaxed);
    }
    if let Some(t) = churn_task {
        // The leave-and-join in progress completes: every slot is held again.
        let _ = churn_stop.send(true);
        let _ = t.await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cp3 = sample(pid)?;
    let own3 = own();
    let end = keepers.counters.snapshot();
    progress.held_min.fetch_min(end.held, Ordering::Relaxed);
    if !running.alive() {
        return Err(BenchError::Exited(running.log_tail()));
    }
    let steady_cpu = cp3.cpu_us.saturating_sub(cp2.cpu_us);
    let viewer_s = (held_start.held + end.held) as f64 / 2.0 * wall;
    let per_viewer_s = if viewer_s > 0.0 {
        steady_cpu as f64 / viewer_s
    } else {
        0.0
    };
    join_report.cp_cpu_per_join_net_us =
        per_join((join_cpu as f64 - per_viewer_s * join_viewer_s).max(0.0));
    let hb = keepers.heartbeat_latency.lock().clone();
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / wall.max(1e-9);
    report.join = join_report;
    report.node_reregistrations = running.node_reregistrations.load(Ordering::Relaxed);
    report.steady = Some(SteadyReport {
        wall_s: wall,
        held_start: held_start.held,
        held_min: progress.held_min.load(Ordering::Relaxed),
        held_end: end.held,
        ended_by_server: end.ended_by_server - held_start.ended_by_server,
        lost: end.lost - held_start.lost,
        cp_cpu_s: secs(steady_cpu),
        cp_cpu_per_viewer_s_us: per_viewer_s,
        rss_kib: cp3.rss_kib,
        rss_per_session_kib: cp3.rss_kib.saturating_sub(cp0.rss_kib) as f64
            / end.held.max(1) as f64,
        heartbeats_per_s: rate(held_start.heartbeats, end.heartbeats),
        heartbeat_p50_ms: ms(hb.quantile(0.5)),
        heartbeat_p99_ms: ms(hb.quantile(0.99)),
        streams_started: end.streams_started,
        downs_per_s: rate(held_start.downs, end.downs),
        pushes_per_s: rate(held_start.pushes, end.pushes),
        ups_per_s: rate(held_start.ups, end.ups),
        errors: keepers.errors.lock().clone(),
        churn_per_s: cfg.churn_per_s,
        churn_leaves: churn.leaves.load(Ordering::Relaxed),
        churn_joins: churn.joins.load(Ordering::Relaxed),
        bench_cpu_s: secs(own3.cpu_us.saturating_sub(own2.cpu_us)),
    });
    let _ = stop_tx.send(true);
    running.shutdown();
    Ok(report)
}

#[derive(Default)]
struct ChurnCounts {
    leaves: AtomicU64,
    joins: AtomicU64,
}

/// Leaves a random held session and joins a new one in its slot, `churn_per_s`
/// times a second (one at a time: a slow control plane slows the churn).
/// What the churn task works on.
struct Churn {
    cfg: BenchConfig,
    broadcast_id: String,
    join_channels: Vec<Channel>,
    steady_channels: Arc<Vec<Channel>>,
    keepers: Arc<Keepers>,
    slots: Slots,
    counts: Arc<ChurnCounts>,
    stop: watch::Receiver<bool>,
}

async fn churn_loop(churn: Churn) {
    let Churn {
        cfg,
        broadcast_id,
        join_channels,
        steady_channels,
        keepers,
        slots,
        counts,
        mut stop,
    } = churn;
    let Some(channel) = join_channels.first().cloned() else {
        return;
    };
    let mut client = ViewerServiceClient::new(channel);
    let period = Duration::from_secs_f64(1.0 / cfg.churn_per_s.clamp(0.01, 100_000.0));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stats = Mutex::new(join::JoinStats::default());
    let never = AtomicBool::new(false);
    let mut next_index = cfg.sessions;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let j = rand::rng().random_range(0..slots.len());
        let Some(old) = slots[j].lock().take() else {
            continue;
        };
        old.keeper.abort();
        let _ = tokio::time::timeout(
            cfg.call_timeout,
            client.leave(LeaveRequest {
                session_id: old.session_id,
            }),
        )
        .await;
        counts.leaves.fetch_add(1, Ordering::Relaxed);
        let req = join::join_request(&cfg, &broadcast_id, next_index);
        next_index += 1;
        if let Some(resp) = join::join_one(&cfg, &mut client, req, &stats, &never).await {
            counts.joins.fetch_add(1, Ordering::Relaxed);
            let ch = steady_channels
                [(j / cfg.sessions_per_connection.max(1)) % steady_channels.len()]
            .clone();
            let keeper = keepers.spawn(ch, resp.session_id.clone(), resp.heartbeat_interval_ms);
            *slots[j].lock() = Some(Slot {
                session_id: resp.session_id,
                keeper,
                joined_at: Instant::now(),
            });
        }
    }
}

/// Runs the benchmark and prints the report: the table on stdout, or with `json` the
/// JSON object on stdout and the table on stderr.
/// Ctrl-C or SIGTERM stop the run (and so the child control plane, killed on drop).
pub async fn run_and_print(cfg: BenchConfig, json: bool) -> Result<(), BenchError> {
    let report = tokio::select! {
        r = run(cfg) => r?,
        s = interrupted() => return Err(BenchError::Interrupted(s)),
    };
    if json {
        eprint!("{report}");
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| BenchError::Config(format!("JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{report}");
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (never when they cannot be watched).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}
