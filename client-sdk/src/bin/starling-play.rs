//! `starling-play`: join a Starling broadcast and play it.
//!
//! Serves the stream on a local HTTP URL for any media player and, with `-o`, writes
//! the in-order stream to a file or to stdout (`starling-play --broadcast X -o - | ffplay -`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use starling_sdk::{Viewer, ViewerConfig};

/// Play a Starling broadcast: join it through the control plane (or straight at a data
/// plane with --dataplane), serve it on a local HTTP URL for any media player, and
/// optionally write the stream to a file or stdout.
///
/// Examples:
///   starling-play --broadcast demo                 # then open the printed URL in VLC/ffplay
///   starling-play --broadcast demo -o - | ffplay -
///   starling-play --broadcast demo --dataplane 127.0.0.1:7100 -o out.ts --duration 20s
#[derive(Debug, Parser)]
#[command(name = "starling-play", version, verbatim_doc_comment)]
struct Args {
    /// gRPC URL of the control plane (https://; http:// only with --insecure-plaintext).
    #[arg(
        long,
        env = "STARLING_CONTROL_URL",
        default_value = "https://127.0.0.1:7000"
    )]
    control_url: String,

    /// Broadcast id to play.
    #[arg(long = "broadcast", env = "STARLING_BROADCAST", value_name = "ID")]
    broadcast: String,

    /// Connect straight to this data-plane wire address (host:port), bypassing the
    /// control plane.
    #[arg(long, env = "STARLING_DATAPLANE", value_name = "ADDR")]
    dataplane: Option<String>,

    /// Viewer credential (JWT) passed to Join.
    #[arg(long, env = "STARLING_CREDENTIAL", hide_env_values = true)]
    credential: Option<String>,

    /// Insecure: play even when the control plane hands out no chunk keys, so nothing
    /// can be verified (by default such a Join is an error).
    #[arg(long, env = "STARLING_ALLOW_UNVERIFIED")]
    allow_unverified: bool,

    /// Refuse chunks whose signature is older than this (a replay; judged by the
    /// control plane's clock as measured at Join, not this machine's). 0 = no limit.
    #[arg(long, env = "STARLING_CHUNK_MAX_AGE", default_value = "30s", value_parser = starling_proto::time::parse_duration)]
    chunk_max_age: std::time::Duration,

    /// Refuse chunks whose signed timestamp is further ahead than this.
    #[arg(long, env = "STARLING_CHUNK_MAX_FUTURE", default_value = "10s", value_parser = starling_proto::time::parse_duration)]
    chunk_max_future: std::time::Duration,
    /// CA certificates (PEM) that verify the control plane's TLS certificate, instead
    /// of the built-in web PKI roots.
    #[arg(long, env = "STARLING_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,

    /// Allow an http:// --control-url: INSECURE, the credential and the chunk keys
    /// cross the network in clear (a man in the middle can replace them).
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,

    /// Address of the local HTTP endpoint for media players (port 0 = any free port).
    #[arg(long, env = "STARLING_HTTP_LISTEN", default_value = "127.0.0.1:0")]
    http_listen: SocketAddr,

    /// Write the in-order stream to this file, or to stdout with "-" (stdout then
    /// carries only media bytes; messages go to stderr).
    #[arg(short = 'o', long, env = "STARLING_OUTPUT", value_name = "PATH|-")]
    output: Option<PathBuf>,

    /// Stop after this long (e.g. 20s, 1500ms, 2m, 1h; a bare number is seconds).
    #[arg(long, env = "STARLING_DURATION", value_parser = starling_proto::time::parse_duration)]
    duration: Option<Duration>,

    /// Upload budget for relaying to other viewers, kbit/s (0 = don't relay). Default:
    /// the SDK's estimate (a fixed conservative figure; see RelayConfig).
    #[arg(long, env = "STARLING_UPLOAD_KBPS", value_name = "KBPS")]
    upload_kbps: Option<u32>,

    /// Where to accept peer connections (relaying).
    #[arg(
        long,
        env = "STARLING_PEER_LISTEN",
        default_value = "0.0.0.0:0",
        value_name = "ADDR"
    )]
    peer_listen: SocketAddr,

    /// Host other peers should connect to (default: the local IP towards the control
    /// plane).
    #[arg(long, env = "STARLING_ADVERTISE_HOST", value_name = "HOST")]
    advertise_host: Option<String>,

    /// Do not ask the home router (UPnP-IGD) to forward a public port to the peer
    /// listener. By default a relaying viewer whose address is a private one asks, and
    /// advertises the router's public address (the search gives up after 500 ms).
    #[arg(long, env = "STARLING_NO_PORT_MAPPING")]
    no_port_mapping: bool,

    /// Most peer connections accepted from one source address at once (0 = unlimited);
    /// beyond, they are refused with SERVER_BUSY.
    #[arg(
        long,
        env = "STARLING_MAX_PEER_LINKS_PER_IP",
        default_value_t = 8,
        value_name = "N"
    )]
    max_peer_links_per_ip: u32,

    /// Play-out lag behind live in the peer grid (e.g. 2s, 1500ms; default 1.5 s).
    #[arg(long, env = "STARLING_TARGET_LAG", value_parser = starling_proto::time::parse_duration)]
    target_lag: Option<Duration>,

    /// How often to send quality reports to the control plane (e.g. 5s, 500ms).
    /// Default: the interval the control plane asks for in Join (5 s if none).
    #[arg(long, env = "STARLING_REPORT_INTERVAL", value_parser = starling_proto::time::parse_duration)]
    report_interval: Option<Duration>,

    /// Peers connecting to us must complete HELLO and SUBSCRIBE within this long.
    #[arg(long, env = "STARLING_PEER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = starling_proto::time::parse_duration)]
    peer_handshake_timeout: Duration,

    /// Most peer connections in their handshake at once (one more evicts the oldest).
    #[arg(long, env = "STARLING_PEER_MAX_HANDSHAKES", default_value_t = 16)]
    peer_max_handshakes: usize,

    /// Most peer connections accepted at once (children, neighbours, handshakes).
    #[arg(long, env = "STARLING_PEER_MAX_CONNECTIONS", default_value_t = 256)]
    peer_max_connections: usize,

    /// REQUESTs a peer may send per second on one link (beyond: NOT_FOUND unseen).
    #[arg(long, env = "STARLING_PEER_REQUESTS_PER_S", default_value_t = 16.0)]
    peer_requests_per_s: f64,

    /// REQUESTs a peer may send in a burst on one link.
    #[arg(long, env = "STARLING_PEER_REQUEST_BURST", default_value_t = 64.0)]
    peer_request_burst: f64,

    /// Chunks held per link while the keys are refreshed (their key id is unknown).
    #[arg(long, env = "STARLING_UNKNOWN_KEY_HOLD_CHUNKS", default_value_t = 4)]
    unknown_key_hold_chunks: usize,

    /// Payload bytes held in total while the keys are refreshed.
    #[arg(long, env = "STARLING_UNKNOWN_KEY_HOLD_BYTES", default_value_t = 8 * 1024 * 1024)]
    unknown_key_hold_bytes: usize,

    /// Held chunks whose key refresh has not come after this long are dropped.
    #[arg(long, env = "STARLING_UNKNOWN_KEY_MAX_WAIT", default_value = "10s", value_parser = starling_proto::time::parse_duration)]
    unknown_key_max_wait: Duration,

    /// Least time between two early heartbeats made to refresh the keys.
    #[arg(long, env = "STARLING_KEY_REFRESH_MIN_INTERVAL", default_value = "1s", value_parser = starling_proto::time::parse_duration)]
    key_refresh_min_interval: Duration,

    /// A peer parent is judged over the last this many chunks it owed (1..=64).
    #[arg(long, env = "STARLING_PARENT_WINDOW", default_value_t = 32)]
    parent_window: u16,

    /// More than this many of them skipped, late or never sent: re-search and report it.
    #[arg(long, env = "STARLING_PARENT_MAX_MISSED", default_value_t = 10)]
    parent_max_missed: u16,

    /// Keep the control-plane session up with unary heartbeats only (no session
    /// stream). By default the stream is used, and heartbeats only when the control
    /// plane has no stream.
    #[arg(long, env = "STARLING_NO_SESSION_STREAM")]
    no_session_stream: bool,

    /// HTTP/2 keep-alive PING interval on the control-plane connection, so a dead
    /// control plane is noticed and the session stream reopened ("0s" = off).
    #[arg(long, env = "STARLING_CONTROL_KEEPALIVE", default_value = "15s", value_parser = starling_proto::time::parse_duration)]
    control_keepalive: Duration,

    /// A keep-alive PING unanswered this long closes the control-plane connection.
    #[arg(long, env = "STARLING_CONTROL_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = starling_proto::time::parse_duration)]
    control_keepalive_timeout: Duration,

    /// Most Join attempts while the control plane answers RESOURCE_EXHAUSTED (each
    /// retry after its retry pushback plus 0..50 % jitter).
    #[arg(long, env = "STARLING_JOIN_ATTEMPTS", default_value_t = 10)]
    join_attempts: u32,

    /// No Join retry starts later than this after the first attempt.
    #[arg(long, env = "STARLING_JOIN_DEADLINE", default_value = "60s", value_parser = starling_proto::time::parse_duration)]
    join_deadline: Duration,

    /// Log filter (tracing env-filter syntax, e.g. "info" or "starling_sdk=debug").
    #[arg(long, env = "STARLING_LOG", default_value = "warn")]
    log: String,
}

/// Writes the output on a plain thread (blocking file/pipe writes, no async
/// runtime features needed). Dropping the sender ends it; it ends on its own (and drops
/// its receiver) when a write fails, e.g. when the player at the end of a pipe exits.
fn spawn_writer(
    path: &std::path::Path,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<bytes::Bytes>,
    std::thread::JoinHandle<std::io::Result<()>>,
)> {
    use std::io::Write;
    let mut out: Box<dyn Write + Send> = if path.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ))
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    let handle = std::thread::Builder::new()
        .name("starling-play-output".into())
        .spawn(move || {
            while let Some(b) = rx.blocking_recv() {
                out.write_all(&b)?;
                out.flush()?;
            }
            out.flush()
        })
        .context("cannot start the output thread")?;
    Ok((tx, handle))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("bad --log filter {:?}", args.log))?,
        )
        .init();

    let mut cfg = ViewerConfig::new(args.broadcast.clone());
    cfg.control_url = args.control_url.clone();
    cfg.credential = args.credential.clone();
    cfg.allow_unverified = args.allow_unverified;
    cfg.chunk_max_age = (!args.chunk_max_age.is_zero()).then_some(args.chunk_max_age);
    cfg.chunk_max_future = args.chunk_max_future;
    if args.dataplane.is_none() {
        cfg.transport = starling_proto::transport::Transport::from_flags(
            &args.control_url,
            args.ca_file.as_deref(),
            None,
            None,
            args.insecure_plaintext,
        )?;
    }
    cfg.http_listen = Some(args.http_listen);
    cfg.relay.listen = args.peer_listen;
    cfg.relay.advertise_host = args.advertise_host.clone();
    cfg.relay.port_mapping.enabled = !args.no_port_mapping;
    cfg.relay.max_upload_kbps = args.upload_kbps;
    cfg.relay.max_links_per_ip = args.max_peer_links_per_ip;
    if let Some(lag) = args.target_lag {
        cfg.target_lag = lag;
    }
    cfg.report_interval = args.report_interval;
    cfg.peer_limits = starling_sdk::PeerLimits {
        handshake_timeout: args.peer_handshake_timeout,
        max_handshakes: args.peer_max_handshakes,
        max_incoming: args.peer_max_connections,
        requests_per_s: args.peer_requests_per_s,
        request_burst: args.peer_request_burst,
    };
    cfg.key_hold = starling_sdk::KeyHoldLimits {
        per_link: args.unknown_key_hold_chunks,
        max_bytes: args.unknown_key_hold_bytes,
        max_wait: args.unknown_key_max_wait,
        min_interval: args.key_refresh_min_interval,
    };
    cfg.parent_window = args.parent_window;
    cfg.parent_max_missed = args.parent_max_missed;
    cfg.session_stream = !args.no_session_stream;
    cfg.control_keep_alive = (!args.control_keepalive.is_zero()).then_some(args.control_keepalive);
    cfg.control_keep_alive_timeout = args.control_keepalive_timeout;
    cfg.join_attempts = args.join_attempts;
    cfg.join_deadline = args.join_deadline;

    let mut sink = match &args.output {
        None => None,
        Some(p) => Some(spawn_writer(p)?),
    };

    let viewer = match &args.dataplane {
        Some(addr) => Viewer::connect_direct(addr.clone(), cfg).await,
        None => Viewer::join(cfg).await,
    }
    .with_context(|| format!("cannot play broadcast {:?}", args.broadcast))?;
    // Subscribe at once so the output starts at the first random access chunk.
    let mut sub = sink.as_ref().map(|_| viewer.subscribe());
    if let Some(url) = viewer.local_url() {
        eprintln!(
            "starling-play: playing broadcast {} at {url}",
            viewer.broadcast_id()
        );
    }
    if let Some(seen) = viewer.stats().observed_addr {
        eprintln!("starling-play: the control plane sees this viewer at {seen}");
    }
    if let Some(addr) = viewer.peer_addr() {
        match viewer.port_mapping() {
            Some(_) => eprintln!(
                "starling-play: relaying to other viewers from {addr} (mapped by the router, UPnP)"
            ),
            None => eprintln!("starling-play: relaying to other viewers from {addr}"),
        }
    }

    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut outcome: anyhow::Result<()> = Ok(());
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                eprintln!("starling-play: interrupted");
                break;
            }
            _ = &mut deadline => break,
            r = viewer.closed() => {
                outcome = end_outcome(r);
                // Drain what is still queued for the output.
                if let (Some(s), Some((tx, _))) = (sub.as_mut(), sink.as_ref()) {
                    while let Some(b) = s.next_bytes().await {
                        if tx.send(b).await.is_err() { break; }
                    }
                }
                break;
            }
            b = next_output(&mut sub) => {
                let Some(b) = b else {
                    // The stream ended: the viewer stopped.
                    outcome = end_outcome(viewer.closed().await);
                    break;
                };
                if let Some((tx, _)) = sink.as_ref()
                    && tx.send(b).await.is_err()
                {
                    // The writer stopped: its error is collected below.
                    break;
                }
            }
        }
    }
    if let Some((tx, handle)) = sink.take() {
        drop(tx);
        let r = tokio::task::spawn_blocking(move || handle.join()).await;
        match r {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                // The player at the end of the pipe went away: a normal way to stop.
            }
            Ok(Ok(Err(e))) => {
                if outcome.is_ok() {
                    outcome = Err(anyhow::Error::new(e).context("writing the output"));
                }
            }
            _ => {
                if outcome.is_ok() {
                    outcome = Err(anyhow::anyhow!("the output thread failed"));
                }
            }
        }
    }
    let stats = viewer.stats();
    if let Err(e) = viewer.leave().await {
        tracing::debug!("leave: {e}");
    }
    eprintln!("starling-play: {stats}");
    eprintln!(
        "starling-play: integrity: {} chunks verified, {} unverified (no keys from the control plane), \
         bad chunks: {} from peers ({} peers reported), {} from the data plane; \
         stalls {} ({} ms); reports sent {}, dropped {}",
        stats.chunks_verified,
        stats.chunks_unverified,
        stats.bad_chunks_from_peers,
        stats.peers_reported,
        stats.bad_chunks_from_server,
        stats.stalls,
        stats.stall_time.as_millis(),
        stats.reports_sent,
        stats.reports_dropped,
    );
    if let Err(e) = outcome {
        bail!("{e:#}");
    }
    Ok(())
}

/// How the viewer stopping maps to the exit status: the broadcast ending is a normal
/// end of playback.
fn end_outcome(r: Result<(), starling_sdk::SdkError>) -> anyhow::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(starling_sdk::SdkError::BroadcastEnded(msg)) => {
            eprintln!("starling-play: broadcast ended {msg}");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context("playback stopped")),
    }
}

/// The next output bytes; never resolves when there is no output.
async fn next_output(sub: &mut Option<starling_sdk::Subscription>) -> Option<bytes::Bytes> {
    match sub {
        Some(s) => s.next_bytes().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
