//! `starling-dataplane`: the Starling data-plane node.

use anyhow::Context;
use clap::Parser;
use starling_dataplane::{
    ChunkKey, Config, ConnLimits, Node, NodeKey, RateLimit, StaticBroadcast, Timeouts, TokenKey,
};
use starling_telemetry::logging::{LogConfig, LoggingError};
use std::net::SocketAddr;

/// Starling data plane: pulls live streams over HTTP, cuts them into numbered chunks,
/// keeps a window of recent chunks in memory and serves viewers over the Starling wire
/// protocol and plain HTTP (`GET /live/{broadcast}`, `GET /metrics`).
///
/// Runs under a control plane (`--control-url`, authenticated with `--node-key` or
/// `--node-key-file`) and/or standalone with `--static-broadcast ID=URL` broadcasts.
#[derive(Debug, Parser)]
#[command(name = "starling-dataplane", version)]
struct Args {
    /// gRPC URL of the control plane (EdgeService), e.g. https://cp.example:7000
    /// (http:// only with --insecure-plaintext).
    #[arg(long, env = "STARLING_CONTROL_URL")]
    control_url: Option<String>,

    /// File holding this node's own credential (`stn1.NAME.SECRET`, printed by
    /// `starling-admin node add NAME`), sent as `authorization: Bearer <credential>` on
    /// every EdgeService call. The node registers under NAME (the default --node-name)
    /// and can act for no other node; revoking the credential shuts it out. Preferred
    /// over the shared --node-key.
    #[arg(
        long,
        env = "STARLING_NODE_CREDENTIAL_FILE",
        value_name = "PATH",
        conflicts_with_all = ["node_key", "node_key_file"]
    )]
    node_credential_file: Option<std::path::PathBuf>,

    /// CA certificates (PEM) that verify the control plane's TLS certificate, instead
    /// of the built-in web PKI roots.
    #[arg(long, env = "STARLING_CA_FILE", value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,

    /// Client certificate chain (PEM) presented to the control plane (mutual TLS; the
    /// control plane's --tls-client-ca must have issued it).
    #[arg(
        long,
        env = "STARLING_TLS_CLIENT_CERT",
        value_name = "FILE",
        requires = "tls_client_key"
    )]
    tls_client_cert: Option<std::path::PathBuf>,

    /// Private key of --tls-client-cert (PEM).
    #[arg(
        long,
        env = "STARLING_TLS_CLIENT_KEY",
        value_name = "FILE",
        requires = "tls_client_cert"
    )]
    tls_client_key: Option<std::path::PathBuf>,

    /// Allow an http:// --control-url: INSECURE, the node key and the chunk-token keys
    /// cross the network in clear.
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,

    /// Legacy / zero-setup mode: the control plane's shared node key, sent as
    /// `authorization: Bearer <key>` on every EdgeService call (the control plane
    /// refuses nodes without a credential). Whoever holds it can register any node and
    /// sign chunks for the broadcasts assigned to it: keep it secret, prefer
    /// --node-credential-file. Zero-setup control planes use their admin key
    /// (<data-dir>/admin.key) as the node key. Unset: the node is refused, logs an error
    /// and keeps retrying.
    #[arg(
        long,
        env = "STARLING_NODE_KEY",
        hide_env_values = true,
        conflicts_with = "node_key_file"
    )]
    node_key: Option<String>,

    /// File holding the node key (see --node-key; surrounding whitespace ignored), e.g.
    /// a zero-setup control plane's <data-dir>/admin.key.
    #[arg(long, env = "STARLING_NODE_KEY_FILE", value_name = "PATH")]
    node_key_file: Option<std::path::PathBuf>,

    /// Broadcast to ingest at startup without a control plane, as ID=URL
    /// (http:// only). Repeatable; comma-separated in the env var.
    #[arg(
        long = "static-broadcast",
        env = "STARLING_STATIC_BROADCASTS",
        value_delimiter = ','
    )]
    static_broadcasts: Vec<StaticBroadcast>,

    /// Networks sources may be pulled from besides public addresses, e.g. 127.0.0.0/8
    /// or 10.0.0.0/8 (a bare address is one host). Without it, loopback, private,
    /// link-local, CGNAT, multicast and reserved addresses are refused: checked after DNS
    /// resolution, on every request and redirect. Repeatable; comma-separated in the
    /// env var.
    #[arg(
        long = "allow-source-net",
        env = "STARLING_ALLOW_SOURCE_NET",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    allow_source_nets: Vec<starling_dataplane::source_policy::IpNet>,

    /// Target chunk duration (ms) for --static-broadcast broadcasts.
    #[arg(long, env = "STARLING_STATIC_CHUNK_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(100..=10000))]
    static_chunk_ms: u32,

    /// Substreams (K) of --static-broadcast broadcasts: chunk seq % K. Broadcasts from
    /// the control plane carry their own K.
    #[arg(long, env = "STARLING_STATIC_SUBSTREAMS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    static_substreams: u16,

    /// Kernel send buffer per viewer connection, KiB (SO_SNDBUF; Linux doubles it).
    /// Bounds what a viewer that stops reading can hold before it is skipped ahead or
    /// dropped; 0 = the kernel's autotuning (up to net.ipv4.tcp_wmem max, 4 MiB).
    #[arg(long, env = "STARLING_SEND_BUFFER_KIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(0..=65_536))]
    send_buffer_kib: u64,

    /// Seconds without anything sent on a wire connection before a keep-alive PING.
    #[arg(long, env = "STARLING_KEEPALIVE_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    keepalive_secs: u64,

    /// Seconds without anything received (not even PONG) before a subscribed wire
    /// connection is closed with ERROR(IDLE_TIMEOUT).
    #[arg(long, env = "STARLING_IDLE_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    idle_timeout_secs: u64,
    /// Seconds from accept within which a wire connection must be subscribed (HELLO …
    /// SUBSCRIBE, token accepted) and an HTTP request head complete; one deadline for
    /// the whole handshake, whatever arrives meanwhile (ERROR(IDLE_TIMEOUT), HTTP 408).
    #[arg(long, env = "STARLING_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    handshake_timeout_secs: u64,

    /// Connections not yet authenticated (wire: not yet subscribed; HTTP: request not
    /// yet admitted) on this node, all executors together; beyond it new connections
    /// get ERROR(SERVER_BUSY) (HTTP 503).
    #[arg(long, env = "STARLING_MAX_UNAUTHENTICATED", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_unauthenticated: u32,

    /// Connections not yet authenticated from one source address (IPv4 address or IPv6
    /// /64, loopback included).
    #[arg(long, env = "STARLING_MAX_UNAUTHENTICATED_PER_ADDRESS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_unauthenticated_per_address: u32,

    /// Open connections (wire and HTTP) from one source address (IPv4 address or IPv6
    /// /64, loopback included: raise it for load tests whose viewers all connect from
    /// 127.0.0.1).
    #[arg(long, env = "STARLING_MAX_CONNS_PER_ADDRESS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_conns_per_address: u32,

    /// REQUESTs per second per wire connection on average; one beyond the rate (and
    /// --request-burst) is answered NOT_FOUND.
    #[arg(long, env = "STARLING_REQUEST_RATE", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    request_rate: u32,

    /// REQUESTs a wire connection may send at once before --request-rate applies.
    #[arg(long, env = "STARLING_REQUEST_BURST", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    request_burst: u32,

    /// TOKEN renewals per minute per wire connection on average; one beyond the rate
    /// (and --token-renewal-burst) closes the connection with ERROR(SERVER_BUSY). An
    /// honest viewer renews once per half token lifetime.
    #[arg(long, env = "STARLING_TOKEN_RENEWALS_PER_MIN", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    token_renewals_per_min: u32,

    /// TOKEN renewals a wire connection may send at once before
    /// --token-renewals-per-min applies.
    #[arg(long, env = "STARLING_TOKEN_RENEWAL_BURST", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    token_renewal_burst: u32,

    /// A viewer starting live (SDK or plain HTTP) gets the stream from the newest
    /// random-access chunk at least this many ms behind the live edge, at once, so its
    /// player starts with a buffer instead of waiting for one (0: start at the newest
    /// random-access chunk).
    #[arg(long, env = "STARLING_LIVE_START_BEHIND_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    live_start_behind_ms: u64,

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

    /// File holding this node's chunk-signing key (Ed25519, PKCS#8 DER); created (mode
    /// 0600) when missing. Without it, a fresh key is made at every start (its key id
    /// and public key are logged at info level and announced to the control plane).
    #[arg(long, env = "STARLING_CHUNK_KEY_FILE")]
    chunk_key_file: Option<std::path::PathBuf>,

    /// Chunk-token public key trusted without a control plane, as KEY_ID=BASE64 (raw
    /// 32-byte Ed25519 key). Repeatable; comma-separated in the env var. Keys from the
    /// control plane are trusted in addition.
    #[arg(long = "token-key", env = "STARLING_TOKEN_KEYS", value_delimiter = ',')]
    token_keys: Vec<TokenKey>,

    /// Make --static-broadcast broadcasts require a valid chunk token (default: public).
    #[arg(long, env = "STARLING_STATIC_REQUIRE_TOKEN")]
    static_require_token: bool,

    /// Clock skew tolerated on chunk-token validity times, ms.
    #[arg(long, env = "STARLING_TOKEN_SKEW_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    token_skew_ms: u64,

    /// Seconds a revoked peer's tokens stay refused (at least the longest chunk-token
    /// lifetime the control plane issues).
    #[arg(long, env = "STARLING_REVOCATION_HOLD_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    revocation_hold_secs: u64,

    /// Log filter (tracing EnvFilter syntax), e.g. info or starling_dataplane=debug.
    #[arg(long = "log", env = "STARLING_LOG", default_value = "info")]
    log: String,

    /// Export OpenTelemetry traces over OTLP/gRPC to this collector, e.g.
    /// http://127.0.0.1:4317 (plain http only: no TLS). Off by default; falls back to
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT; `off`
    /// disables it. Spans are sent in batches (OTEL_BSP_* tune them); an unreachable
    /// collector is logged and never stops the node.
    #[arg(long, env = "STARLING_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// service.name of the exported traces (default: OTEL_SERVICE_NAME, then
    /// starling-dataplane).
    #[arg(long, env = "STARLING_OTLP_SERVICE_NAME", value_name = "NAME")]
    otlp_service_name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logging = starling_telemetry::logging::init(&LogConfig {
        filter: args.log.clone(),
        json: false,
        otlp_endpoint: starling_telemetry::logging::otlp_endpoint(args.otlp_endpoint.as_deref()),
        otlp_service_name: args.otlp_service_name.clone(),
        default_service_name: "starling-dataplane",
    })
    .map_err(|e| match e {
        LoggingError::Filter { filter, source } => {
            anyhow::Error::new(source).context(format!("bad --log filter {filter:?}"))
        }
        e => e.into(),
    })?;
    let result = run(args);
    logging.shutdown();
    result
}

fn run(args: Args) -> anyhow::Result<()> {
    let credential = match &args.node_credential_file {
        Some(p) => Some(NodeKey::read_file(p)?),
        None => None,
    };
    // A per-node credential names its node: `stn1.NAME.SECRET`.
    let credential_name = credential.as_ref().and_then(|c| {
        c.expose()
            .strip_prefix("stn1.")
            .and_then(|r| r.rsplit_once('.'))
            .map(|(name, _)| name.to_owned())
    });
    if credential.is_some() && credential_name.is_none() {
        anyhow::bail!("--node-credential-file: not a node credential (stn1.NAME.SECRET)");
    }
    if let (Some(n), Some(asked)) = (&credential_name, &args.node_name)
        && n != asked
    {
        anyhow::bail!("--node-name {asked:?} differs from the credential's node name {n:?}");
    }
    let node_name = args
        .node_name
        .clone()
        .or(credential_name)
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "dataplane".into())
        });
    let chunk_key = match &args.chunk_key_file {
        Some(p) => Some(ChunkKey::load_or_create(p)?),
        None => None,
    };
    let node_key = match (&args.node_key, &args.node_key_file, credential) {
        (_, _, Some(c)) => Some(c),
        (Some(k), _, None) => Some(NodeKey::new(k).context("--node-key")?),
        (None, Some(p), None) => Some(NodeKey::read_file(p)?),
        (None, None, None) => None,
    };
    if args.control_url.is_some() && node_key.is_none() {
        tracing::warn!(
            "no --node-credential-file / --node-key / --node-key-file: the control plane \
             will refuse this node until one is given"
        );
    } else if args.node_credential_file.is_none() && args.control_url.is_some() {
        tracing::warn!(
            "authenticating with the shared node key (legacy / zero-setup mode): prefer a \
             per-node credential (starling-admin node add NAME, --node-credential-file)"
        );
    }
    let control_transport = match &args.control_url {
        Some(url) => starling_proto::transport::Transport::from_flags(
            url,
            args.ca_file.as_deref(),
            args.tls_client_cert.as_deref(),
            args.tls_client_key.as_deref(),
            args.insecure_plaintext,
        )?,
        None => starling_proto::transport::Transport::default(),
    };
    if control_transport.is_plaintext() {
        tracing::warn!(
            "--insecure-plaintext: talking to the control plane WITHOUT TLS; the node key and \
             chunk-token keys cross the network in clear"
        );
    }
    let cfg = Config {
        control_url: args.control_url,
        control_transport,
        node_key,
        static_broadcasts: args.static_broadcasts,
        source_policy: starling_dataplane::source_policy::SourcePolicy::new(args.allow_source_nets),
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
            handshake: std::time::Duration::from_secs(args.handshake_timeout_secs),
            keepalive: std::time::Duration::from_secs(args.keepalive_secs),
            idle: std::time::Duration::from_secs(args.idle_timeout_secs),
            live_start_behind: std::time::Duration::from_millis(args.live_start_behind_ms),
            send_buffer_bytes: usize::try_from(args.send_buffer_kib * 1024).unwrap_or(usize::MAX),
            ..Timeouts::default()
        },
        limits: ConnLimits {
            max_unauthenticated: args.max_unauthenticated,
            max_unauthenticated_per_address: args.max_unauthenticated_per_address,
            max_per_address: args.max_conns_per_address,
            requests: RateLimit::per_second(args.request_rate, args.request_burst),
            token_renewals: RateLimit::per_minute(
                args.token_renewals_per_min,
                args.token_renewal_burst,
            ),
        },
        chunk_key,
        token_keys: args.token_keys,
        static_public: !args.static_require_token,
        token_skew: std::time::Duration::from_millis(args.token_skew_ms),
        revocation_hold: std::time::Duration::from_secs(args.revocation_hold_secs),
    };
    let node = tracing::info_span!("dataplane.start", node = %cfg.node_name)
        .in_scope(|| Node::start(cfg))
        .context("starting the data plane")?;
    // SIGTERM/SIGINT are caught from before the "listening" line on (a supervisor may
    // stop the node as soon as it sees it).
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    let _signals = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            use tokio::signal::unix::{Signal, SignalKind, signal};
            async fn recv(s: Option<&mut Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let mut term = signal(SignalKind::terminate()).ok();
                    let mut int = signal(SignalKind::interrupt()).ok();
                    let _ = ready_tx.send(());
                    tokio::select! {
                        _ = recv(term.as_mut()) => {}
                        _ = recv(int.as_mut()) => {}
                    }
                });
            }
            let _ = tx.send(());
        })?;
    let _ = ready_rx.recv();
    eprintln!(
        "starling-dataplane: wire listening on {}, http listening on {}",
        node.wire_addr(),
        node.http_addr()
    );
    {
        use base64::Engine as _;
        eprintln!(
            "starling-dataplane: chunk signing key id {} public key {}",
            node.chunk_key_id(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(node.chunk_public_key())
        );
    }
    let _ = rx.recv();
    eprintln!("starling-dataplane: shutting down");
    let _span = tracing::info_span!("dataplane.shutdown").entered();
    node.shutdown();
    node.join()?;
    Ok(())
}
