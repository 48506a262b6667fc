//! `starling-controlplane`: the Starling control-plane server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use starling_controlplane::auth::{self, AuthConfig};
use starling_controlplane::credential::JwtPolicy;
use starling_controlplane::limits::{LimitsConfig, RateLimit};
use starling_controlplane::trust::{PeerAddrCheck, TrustConfig};
use starling_controlplane::{
    Config, ControlPlane, DatabaseConfig, ServerLimits, ServerTls, ServiceConfig, TlsIdentity,
};
use starling_telemetry::logging::{Guard, LogConfig, LoggingError};
use tracing::Instrument as _;

/// Starling control plane: admin, viewer and edge gRPC services (package starling.v1).
///
/// Stores broadcasts, data-plane nodes and viewer sessions in PostgreSQL when
/// --database-url is given, otherwise in an embedded SQLite file
/// (<data-dir>/starling.db, created if missing). Serves gRPC health checking and
/// server reflection, so `grpcurl -cacert CA ADDR list` works without the .proto.
///
/// gRPC is served over TLS (--tls-cert, --tls-key; reloaded on SIGHUP or when either file
/// changes); plaintext only with --insecure-plaintext.
///
/// Admin calls need `authorization: Bearer <admin JWT or admin key>`. ZERO-SETUP MODE:
/// with neither --admin-key nor --admin-jwt-key, a random admin key is generated at the
/// first start into <data-dir>/admin.key (mode 0600) and reused afterwards;
/// `starling-admin` run from the same directory finds it. Use admin JWT keys in
/// production (with --admin-jwt-audience and --admin-jwt-issuer). Viewers of non-public
/// broadcasts need a JWT verified with a --viewer-jwt-key, carrying the configured
/// --viewer-jwt-audience and --viewer-jwt-issuer and living at most
/// --viewer-jwt-max-lifetime. Data-plane nodes (EdgeService) need `authorization: Bearer <node
/// key>` (--node-key / --node-key-file; by default the static admin key, so in
/// zero-setup mode give nodes `--node-key-file <data-dir>/admin.key`). Whoever holds
/// the node key can register a node and sign chunks that viewers accept.
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

    /// Static admin key accepted as `authorization: Bearer <key>` (at least 16 printable
    /// characters). Anyone holding it is an admin. Unset, with no --admin-jwt-key:
    /// zero-setup mode (<data-dir>/admin.key).
    #[arg(long, env = "STARLING_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,

    /// Node key: data-plane nodes send it as `authorization: Bearer <key>` on every
    /// EdgeService call (at least 16 printable characters, compared in constant time).
    /// Whoever holds it can register a node, whose chunk-signing key every viewer then
    /// trusts. Admin credentials are accepted too. Unset, with no --node-key-file: the
    /// static admin key (zero-setup: nodes use <data-dir>/admin.key), or, with only
    /// --admin-jwt-key, a random key in <data-dir>/node.key (mode 0600).
    #[arg(
        long,
        env = "STARLING_NODE_KEY",
        hide_env_values = true,
        conflicts_with = "node_key_file"
    )]
    node_key: Option<String>,

    /// File holding the node key (see --node-key); created with a random key (mode
    /// 0600) when missing.
    #[arg(long, env = "STARLING_NODE_KEY_FILE", value_name = "PATH")]
    node_key_file: Option<PathBuf>,

    /// PEM public key (Ed25519 or RSA) that verifies admin JWTs (`sub`, `exp`,
    /// `role: "admin"`). Repeatable; the env var takes a comma-separated list.
    #[arg(
        long = "admin-jwt-key",
        env = "STARLING_ADMIN_JWT_KEYS",
        value_name = "PATH",
        value_delimiter = ','
    )]
    admin_jwt_keys: Vec<PathBuf>,

    /// PEM public key (Ed25519 → EdDSA, RSA → RS256) of a broadcaster's backend that
    /// verifies viewer JWTs (`sub`, `exp`, `broadcast`: an id or "*"). Repeatable; the
    /// env var takes a comma-separated list. Without one, only public broadcasts can be
    /// joined.
    #[arg(
        long = "viewer-jwt-key",
        env = "STARLING_VIEWER_JWT_KEYS",
        value_name = "PATH",
        value_delimiter = ','
    )]
    viewer_jwt_keys: Vec<PathBuf>,

    /// The `aud` every viewer JWT must carry (a string, or an array holding it).
    /// Required with --viewer-jwt-key: the control plane refuses to start without it.
    #[arg(long, env = "STARLING_VIEWER_JWT_AUDIENCE", value_name = "AUD")]
    viewer_jwt_audience: Option<String>,

    /// The `iss` every viewer JWT must carry. Required with --viewer-jwt-key.
    #[arg(long, env = "STARLING_VIEWER_JWT_ISSUER", value_name = "ISS")]
    viewer_jwt_issuer: Option<String>,

    /// Longest viewer JWT accepted: `exp - iat` (or `exp - now` without `iat`), e.g.
    /// `24h`, `90m`. A longer-lived credential is refused (UNAUTHENTICATED).
    #[arg(long, env = "STARLING_VIEWER_JWT_MAX_LIFETIME", default_value = "24h",
          value_name = "DURATION", value_parser = starling_proto::time::parse_nonzero_duration)]
    viewer_jwt_max_lifetime: Duration,

    /// The `aud` every admin JWT must carry. Required with --admin-jwt-key.
    #[arg(long, env = "STARLING_ADMIN_JWT_AUDIENCE", value_name = "AUD")]
    admin_jwt_audience: Option<String>,

    /// The `iss` every admin JWT must carry. Required with --admin-jwt-key.
    #[arg(long, env = "STARLING_ADMIN_JWT_ISSUER", value_name = "ISS")]
    admin_jwt_issuer: Option<String>,

    /// Longest admin JWT accepted (`exp - iat`, or `exp - now` without `iat`).
    #[arg(long, env = "STARLING_ADMIN_JWT_MAX_LIFETIME", default_value = "1h",
          value_name = "DURATION", value_parser = starling_proto::time::parse_nonzero_duration)]
    admin_jwt_max_lifetime: Duration,

    /// Clock skew tolerated on JWT `exp`/`nbf`/`iat`, in seconds.
    #[arg(long, env = "STARLING_JWT_LEEWAY_S", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    jwt_leeway_s: u64,

    /// Lifetime of the signed chunk tokens, in seconds (renewed by heartbeats when half
    /// of it is left). A revoked viewer is cut off by peers within this long.
    #[arg(long, env = "STARLING_TOKEN_TTL_S", default_value_t = 120, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=120))]
    token_ttl: u64,

    /// Lifetime of the parent tickets attached to every peer assignment, in seconds
    /// (re-signed when half of it is left). A relaying peer admits a child only with a
    /// valid ticket, so a child moved away keeps its old parent's slot at most this long.
    #[arg(long, env = "STARLING_PARENT_TICKET_TTL_S", default_value_t = 600, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(10..=3600))]
    parent_ticket_ttl: u64,

    /// Start with a new chunk-token signing key (stored in the database). It is
    /// published at once and signs 20 s later, when every node and viewer knows it; the
    /// previous keys stay valid for one maximum token lifetime after that, so nobody is
    /// dropped. With several replicas, run it on one; the others pick it up within seconds.
    #[arg(long, env = "STARLING_ROTATE_TOKEN_KEY")]
    rotate_token_key: bool,

    /// Log format: `text` (human-readable) or `json` (one JSON object per line, with
    /// the span fields, for log shippers).
    #[arg(long, env = "STARLING_LOG_FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    log_format: String,

    /// Address of the Prometheus metrics listener (`GET /metrics`); "" or `off`
    /// disables it.
    #[arg(
        long,
        env = "STARLING_METRICS_LISTEN",
        default_value = "127.0.0.1:9100"
    )]
    metrics_listen: String,

    /// Address of the operator's dashboard (a web page with live charts of every
    /// broadcast, and its JSON API under /api/), e.g. `127.0.0.1:9180`; "" or `off` (the
    /// default) disables it. The page asks for the admin key or an admin JWT (or takes
    /// it from the URL fragment, `http://ADDR/#key=KEY`); every API call needs it. Plain
    /// HTTP: keep it on loopback or put it behind a TLS proxy.
    #[arg(long, env = "STARLING_DASHBOARD_LISTEN", default_value = "")]
    dashboard_listen: String,

    /// Most viewer reports held in memory while waiting to be written to the database
    /// (e.g. while it is unavailable). Beyond it, Report calls are refused (UNAVAILABLE)
    /// and their reports counted in starling_cp_reports_dropped_total.
    #[arg(long, env = "STARLING_REPORT_QUEUE_MAX", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    report_queue_max: u64,

    /// How long raw viewer reports are kept (per-minute roll-ups are kept forever):
    /// a number with a unit s, m, h or d (e.g. `7d`, `36h`).
    #[arg(long, env = "STARLING_REPORT_RETENTION", default_value = "7d",
          value_parser = starling_proto::time::parse_nonzero_duration)]
    report_retention: Duration,

    /// How often the report writer commits what is queued (a group commit: Report
    /// calls answer once their rows are committed, so this is their added latency), in
    /// milliseconds. Keep it well below the SDK's 3 s call timeout.
    #[arg(long, env = "STARLING_REPORT_FLUSH_INTERVAL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..=2_000))]
    report_flush_interval_ms: u64,

    /// Longest a Report call waits for its reports to be committed before answering
    /// UNAVAILABLE (they stay queued; the SDK retries them), in milliseconds.
    #[arg(long, env = "STARLING_REPORT_ACK_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    report_ack_timeout_ms: u64,

    /// Stream rate assumed, when bounding viewers' reported byte counters, for a
    /// broadcast whose data-plane node has not reported a measured rate yet (kbit/s).
    /// Counters that grow faster than the stream rate x --report-counter-margin (plus
    /// --report-burst-ms of stream) are clamped and counted in
    /// starling_cp_counters_clamped_total.
    #[arg(long, env = "STARLING_MAX_STREAM_KBPS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_stream_kbps: u32,

    /// Most a viewer can upload (kbit/s): the bound of its reported uploaded bytes.
    #[arg(long, env = "STARLING_MAX_UPLOAD_KBPS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_upload_kbps: u32,

    /// Factor over the stream rate (and the upload ceiling, and real time for stall
    /// time) that viewers' counters may grow by in the time a report covers.
    #[arg(long, env = "STARLING_REPORT_COUNTER_MARGIN", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    report_counter_margin: u32,

    /// Start-up burst allowance of viewers' counters, in milliseconds of stream, on
    /// top of the margin (the data plane's live start sends a second or more at once).
    #[arg(long, env = "STARLING_REPORT_BURST_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    report_burst_ms: u64,

    /// Export OpenTelemetry traces over OTLP/gRPC to this collector, e.g.
    /// http://127.0.0.1:4317 (plain http only: no TLS). Off by default; falls back to
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT; `off`
    /// disables it. Spans are sent in batches (OTEL_BSP_* tune them); an unreachable
    /// collector is logged and never stops the server.
    #[arg(long, env = "STARLING_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// service.name of the exported traces (default: OTEL_SERVICE_NAME, then
    /// starling-controlplane).
    #[arg(long, env = "STARLING_OTLP_SERVICE_NAME", value_name = "NAME")]
    otlp_service_name: Option<String>,

    /// Joins accepted per second from one address (IPv4 address or IPv6 /64), sustained;
    /// beyond, Join fails with RESOURCE_EXHAUSTED and a `grpc-retry-pushback-ms`
    /// trailer. 0 = no limit.
    #[arg(
        long,
        env = "STARLING_JOIN_RATE_PER_ADDR",
        default_value_t = 20.0,
        value_name = "PER_SECOND",
        value_parser = parse_rate
    )]
    join_rate_per_addr: f64,

    /// Joins accepted at once from one address after a quiet period (token-bucket burst).
    #[arg(long, env = "STARLING_JOIN_BURST_PER_ADDR", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    join_burst_per_addr: u32,

    /// Most joins in flight at once (admitted, not yet answered: waiting for the grid,
    /// signatures or their session row's commit); beyond, a join is answered at once with
    /// RESOURCE_EXHAUSTED and a retry delay (`grpc-retry-pushback-ms`) priced from the
    /// backlog and the measured join rate (a flash crowd retries instead of timing out).
    /// 0 = no bound.
    #[arg(long, env = "STARLING_JOINS_IN_FLIGHT", default_value_t = 2048)]
    joins_in_flight: u32,

    /// Most session rows written by one group commit (one INSERT and one transaction for
    /// every join waiting on the database).
    #[arg(long, env = "STARLING_SESSION_BATCH_MAX", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    session_batch_max: u32,

    /// How long a join trusts its in-memory copy of a broadcast or node row. Changes made
    /// through this process are seen at once; this bounds how long a change made by
    /// another replica on the same database can go unseen by joins.
    #[arg(long, env = "STARLING_JOIN_CACHE_TTL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    join_cache_ttl_ms: u64,

    /// Database look-ups per second, per address, for sessions this process does not
    /// hold in memory (heartbeat, leave, report after a restart or for made-up ids);
    /// beyond, RESOURCE_EXHAUSTED. 0 = no limit.
    #[arg(
        long,
        env = "STARLING_UNKNOWN_SESSION_RATE_PER_ADDR",
        default_value_t = 20.0,
        value_name = "PER_SECOND",
        value_parser = parse_rate
    )]
    unknown_session_rate_per_addr: f64,

    /// Burst of those look-ups per address.
    #[arg(long, env = "STARLING_UNKNOWN_SESSION_BURST_PER_ADDR", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    unknown_session_burst_per_addr: u32,

    /// Addresses tracked by each rate limiter (least recently seen evicted beyond).
    #[arg(long, env = "STARLING_RATE_LIMIT_ADDRS", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    rate_limit_addrs: u64,

    /// Session ids remembered as unknown or ended (answered without the database).
    #[arg(long, env = "STARLING_UNKNOWN_SESSIONS_MAX", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    unknown_sessions_max: u64,

    /// Whether Join's `peer_addr` must be on the caller's IP (IPv6: its /64): `strict`,
    /// or `off` behind NAT or a proxy where this process does not see viewers' addresses.
    #[arg(long, env = "STARLING_PEER_ADDR_CHECK", default_value = "strict",
          value_parser = ["strict", "off"])]
    peer_addr_check: String,

    /// Give a relaying viewer children only once a TCP connection to the address it
    /// advertised opens (reachability before responsibility: a viewer behind a NAT
    /// without a port mapping plays, but nobody is told to connect to it). `false` for
    /// deployments whose control plane cannot reach viewers the way viewers reach each
    /// other.
    #[arg(long, env = "STARLING_REACHABILITY_PROBE", default_value_t = true,
          action = clap::ArgAction::Set)]
    reachability_probe: bool,

    /// A reachability probe that has not connected by then failed (e.g. 3s).
    #[arg(long, env = "STARLING_REACHABILITY_PROBE_TIMEOUT", default_value = "3s",
          value_parser = starling_proto::time::parse_duration)]
    reachability_probe_timeout: Duration,

    /// Most upload a join's claim buys until the viewer's heartbeats confirm it, in
    /// copies of the stream rate (0 = no ceiling). Confirmation: over each 10 s window,
    /// the upload rate the heartbeats report (counted at most at 5/4 of what the
    /// viewer's current children can take) lets the granted budget grow to twice that.
    #[arg(long, env = "STARLING_UNCONFIRMED_UPLOAD_COPIES", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    unconfirmed_upload_copies: u32,

    /// Distinct reporter addresses whose BAD_CHUNK reports exclude a peer as a parent.
    #[arg(long, env = "STARLING_REPORT_THRESHOLD", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    report_threshold: u64,

    /// Distinct children's addresses whose NON_DELIVERY reports demote a parent.
    #[arg(long, env = "STARLING_DEMOTE_THRESHOLD", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    demote_threshold: u64,

    /// Seconds a BAD_CHUNK or NON_DELIVERY report counts towards those thresholds
    /// (0: for the reported peer's whole session). A withholding parent is reported by
    /// its children within seconds; an honest one that is late now and then collects a
    /// report every few minutes, which must not add up to a demotion.
    #[arg(long, env = "STARLING_REPORT_WINDOW_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    report_window_secs: u64,

    /// One server-fed root per this many viewers in each substream's tree (at least
    /// one, at most --grid-max-roots); 0: one root per substream. Every hop a chunk is
    /// stored and forwarded on a viewer's uplink adds to the lag of everyone below it:
    /// more roots make the trees shallower, at roots x the substream rate of data-plane
    /// egress (0.5 % of the audience's stream at the default).
    #[arg(long, env = "STARLING_GRID_PEERS_PER_ROOT", default_value_t = 200)]
    grid_peers_per_root: u32,

    /// Most server-fed roots per substream (see --grid-peers-per-root).
    #[arg(long, env = "STARLING_GRID_MAX_ROOTS", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    grid_max_roots: u16,

    /// Most requests in progress per client connection.
    #[arg(long, env = "STARLING_GRPC_CONCURRENCY_PER_CONNECTION", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    grpc_concurrency_per_connection: u64,

    /// A request not answered within this time fails (CANCELLED), e.g. `30s`.
    #[arg(long, env = "STARLING_GRPC_REQUEST_TIMEOUT", default_value = "30s",
          value_parser = starling_proto::time::parse_nonzero_duration)]
    grpc_request_timeout: Duration,

    /// Largest gRPC request message accepted, in bytes (larger: OUT_OF_RANGE).
    #[arg(long, env = "STARLING_GRPC_MAX_MESSAGE_BYTES", default_value_t = 262_144,
          value_parser = clap::value_parser!(u64).range(1024..=67_108_864))]
    grpc_max_message_bytes: u64,

    /// How often viewers send their counters on the session stream
    /// (ViewerService.Session), e.g. `10s`. Liveness does not depend on it (the stream
    /// and its HTTP/2 keep-alive are the liveness signal).
    #[arg(long, env = "STARLING_SESSION_COUNTERS_INTERVAL", default_value = "10s",
          value_parser = starling_proto::time::parse_nonzero_duration)]
    session_counters_interval: Duration,

    /// A session whose stream ended without Leave (viewer gone, connection reset or
    /// keep-alive timeout) expires this long after, unless a new stream or a heartbeat
    /// takes it up (at most the heartbeat silence timeout), e.g. `1s`.
    #[arg(long, env = "STARLING_SESSION_DETACH_GRACE", default_value = "1s",
          value_parser = starling_proto::time::parse_duration)]
    session_detach_grace: Duration,

    /// HTTP/2 keep-alive: a PING is sent on a client connection idle for this long, so
    /// that a silently vanished viewer's session stream is noticed; `0s` = no PINGs.
    /// Vanish to removal is at most interval + timeout + detach grace + liveness tick.
    #[arg(long, env = "STARLING_GRPC_KEEPALIVE_INTERVAL", default_value = "1s",
          value_parser = starling_proto::time::parse_duration)]
    grpc_keepalive_interval: Duration,

    /// HTTP/2 keep-alive: a connection whose PING is not acknowledged within this time
    /// is closed (its session streams end), e.g. `1s`.
    #[arg(long, env = "STARLING_GRPC_KEEPALIVE_TIMEOUT", default_value = "1s",
          value_parser = starling_proto::time::parse_nonzero_duration)]
    grpc_keepalive_timeout: Duration,

    /// Most concurrent HTTP/2 streams (calls, session streams) per client connection.
    #[arg(long, env = "STARLING_GRPC_MAX_CONCURRENT_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    grpc_max_concurrent_streams: u32,

    /// TLS certificate chain of the gRPC listener (PEM, leaf first). Reloaded on SIGHUP
    /// and when the file changes; a new pair that does not load is logged and the old
    /// one kept.
    #[arg(
        long,
        env = "STARLING_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "STARLING_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that verify client certificates: the server then asks
    /// every client for one (mutual TLS for data-plane nodes; viewers send none).
    #[arg(
        long,
        env = "STARLING_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,

    /// Refuse EdgeService calls (data-plane nodes) that came without a client
    /// certificate verified against --tls-client-ca (UNAUTHENTICATED).
    #[arg(long, env = "STARLING_REQUIRE_NODE_CLIENT_CERT", requires = "tls_client_ca",
          value_parser = clap::builder::BoolishValueParser::new())]
    require_node_client_cert: bool,

    /// Serve gRPC in plaintext (no --tls-cert): INSECURE, admin keys, node keys and
    /// chunk keys cross the network in clear. Without it, the server refuses to start
    /// without a certificate.
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
}

/// The gRPC listener's TLS from the flags: `None` only with --insecure-plaintext.
fn server_tls(args: &Args) -> anyhow::Result<Option<ServerTls>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        if args.insecure_plaintext {
            tracing::warn!("--insecure-plaintext: serving gRPC WITHOUT TLS");
            return Ok(None);
        }
        anyhow::bail!(
            "no TLS certificate: give --tls-cert FILE --tls-key FILE (STARLING_TLS_CERT, \
             STARLING_TLS_KEY), or --insecure-plaintext (STARLING_INSECURE_PLAINTEXT=1) to serve \
             plaintext gRPC"
        );
    };
    let client_ca_pem = match &args.tls_client_ca {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("reading --tls-client-ca {}", p.display()))?,
        ),
        None => None,
    };
    Ok(Some(ServerTls {
        client_ca_pem,
        require_node_client_cert: args.require_node_client_cert,
        ..ServerTls::new(TlsIdentity::Files {
            cert: cert.clone(),
            key: key.clone(),
        })
    }))
}

/// A rate per second: a finite number, 0 or more (0 = no limit).
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate per second (a number, 0 or more)"
        )),
    }
}

/// An optional listener address: `host:port`, or "" / `off` for none.
fn listen_addr(flag: &str, s: &str) -> anyhow::Result<Option<SocketAddr>> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    Ok(Some(s.parse().with_context(|| {
        format!("--{flag} {s:?} is not host:port, \"\" or off")
    })?))
}

/// The logging setup of `args`; the filter is `--log`, else `RUST_LOG`, else `info`.
fn log_config(args: &Args, filter: Option<String>) -> LogConfig {
    LogConfig {
        filter: filter
            .or_else(|| args.log.clone())
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_string()),
        json: args.log_format == "json",
        otlp_endpoint: starling_telemetry::logging::otlp_endpoint(args.otlp_endpoint.as_deref()),
        otlp_service_name: args.otlp_service_name.clone(),
        default_service_name: "starling-controlplane",
    }
}

/// Installs logging; a bad filter is reported on stderr and replaced by `info`.
fn init_logging(args: &Args) -> anyhow::Result<Guard> {
    match starling_telemetry::logging::init(&log_config(args, None)) {
        Err(LoggingError::Filter { filter, source }) => {
            eprintln!("starling-controlplane: bad log filter {filter:?} ({source}); using `info`");
            Ok(starling_telemetry::logging::init(&log_config(
                args,
                Some("info".to_string()),
            ))?)
        }
        r => Ok(r?),
    }
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

/// Builds the credentials config from the flags; zero-setup admin key when no admin
/// credential is configured.
fn auth_config(args: &Args) -> anyhow::Result<AuthConfig> {
    let load = |paths: &[PathBuf]| -> anyhow::Result<Vec<_>> {
        paths
            .iter()
            .map(|p| auth::read_jwt_key_pem(p).map_err(anyhow::Error::from))
            .collect()
    };
    let admin_jwt_keys = load(&args.admin_jwt_keys)?;
    let viewer_jwt_keys = load(&args.viewer_jwt_keys)?;
    let mut admin_key = args
        .admin_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    if admin_key.is_none() && admin_jwt_keys.is_empty() {
        let path = args.data_dir.join("admin.key");
        let (key, created) = auth::load_or_create_admin_key(&path)
            .with_context(|| format!("zero-setup admin key {}", path.display()))?;
        tracing::warn!(
            path = %path.display(),
            created,
            "ZERO-SETUP MODE: admin calls use the static admin key stored in this file \
             (send `authorization: Bearer <key>`); configure --admin-jwt-key for production"
        );
        eprintln!(
            "starling-controlplane: zero-setup mode: admin key in {}{}",
            path.display(),
            if created { " (new)" } else { "" }
        );
        admin_key = Some(key);
    }
    if viewer_jwt_keys.is_empty() {
        tracing::info!("no --viewer-jwt-key: only public broadcasts can be joined");
    }
    let node_key = node_key(args, admin_key.as_deref())?;
    Ok(AuthConfig {
        admin_key,
        admin_jwt_keys,
        viewer_jwt_keys,
        leeway: Duration::from_secs(args.jwt_leeway_s),
        viewer_jwt: JwtPolicy {
            audience: args.viewer_jwt_audience.clone(),
            issuer: args.viewer_jwt_issuer.clone(),
            max_lifetime_secs: args.viewer_jwt_max_lifetime.as_secs(),
        },
        admin_jwt: JwtPolicy {
            audience: args.admin_jwt_audience.clone(),
            issuer: args.admin_jwt_issuer.clone(),
            max_lifetime_secs: args.admin_jwt_max_lifetime.as_secs(),
        },
        rotate_token_key: args.rotate_token_key,
        node_key: Some(node_key),
    })
}

/// The node key: --node-key, else --node-key-file (created when missing), else the static
/// admin key, else (admin JWTs only) the zero-setup `<data-dir>/node.key`.
fn node_key(args: &Args, admin_key: Option<&str>) -> anyhow::Result<String> {
    if let Some(key) = args
        .node_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        return Ok(key.to_string());
    }
    let (path, what) = match (&args.node_key_file, admin_key) {
        (Some(path), _) => (path.clone(), "--node-key-file"),
        (None, Some(admin_key)) => {
            tracing::warn!(
                "no --node-key: data-plane nodes authenticate with the admin key (give them \
                 --node-key-file pointing to it); set a separate --node-key in production so \
                 nodes do not hold admin rights"
            );
            return Ok(admin_key.to_string());
        }
        (None, None) => (args.data_dir.join("node.key"), "zero-setup node key"),
    };
    // The file holds a key like an admin key does; only the error names differ.
    let (key, created) = auth::load_or_create_admin_key(&path)
        .map_err(|e| match e {
            auth::AuthConfigError::WeakAdminKey => auth::AuthConfigError::WeakNodeKey,
            auth::AuthConfigError::BadAdminKey => auth::AuthConfigError::BadNodeKey,
            e => e,
        })
        .with_context(|| format!("{what} {}", path.display()))?;
    tracing::info!(
        path = %path.display(),
        created,
        "data-plane nodes authenticate with the node key stored in this file"
    );
    Ok(key)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logging = init_logging(&args)?;
    let result = run(args).await;
    logging.shutdown();
    result
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics_listen = listen_addr("metrics-listen", &args.metrics_listen)?;
    let dashboard_listen = listen_addr("dashboard-listen", &args.dashboard_listen)?;
    let tls = server_tls(&args)?;

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
        reports: starling_controlplane::ReportConfig {
            queue_max: usize::try_from(args.report_queue_max).unwrap_or(usize::MAX),
            retention: args.report_retention,
            flush_interval: Duration::from_millis(args.report_flush_interval_ms),
            ack_timeout: Duration::from_millis(args.report_ack_timeout_ms),
            limits: starling_controlplane::reports::clamp::CounterLimits {
                max_stream_kbps: args.max_stream_kbps,
                max_upload_kbps: args.max_upload_kbps,
                margin: args.report_counter_margin,
                burst: Duration::from_millis(args.report_burst_ms),
            },
            ..starling_controlplane::ReportConfig::default()
        },
        token_ttl: Duration::from_secs(args.token_ttl),
        limits: LimitsConfig {
            join: RateLimit::per_second(args.join_rate_per_addr, args.join_burst_per_addr),
            unknown_session_lookups: RateLimit::per_second(
                args.unknown_session_rate_per_addr,
                args.unknown_session_burst_per_addr,
            ),
            max_addresses: usize::try_from(args.rate_limit_addrs).unwrap_or(usize::MAX),
            unknown_sessions_max: usize::try_from(args.unknown_sessions_max).unwrap_or(usize::MAX),
            joins_in_flight: usize::try_from(args.joins_in_flight).unwrap_or(usize::MAX),
            ..LimitsConfig::default()
        },
        session_batch_max: usize::try_from(args.session_batch_max).unwrap_or(usize::MAX),
        join_cache_ttl: Duration::from_millis(args.join_cache_ttl_ms),
        trust: TrustConfig {
            peer_addr_check: if args.peer_addr_check == "off" {
                PeerAddrCheck::Off
            } else {
                PeerAddrCheck::Strict
            },
            unconfirmed_upload_copies: args.unconfirmed_upload_copies,
            report_threshold: usize::try_from(args.report_threshold).unwrap_or(3),
            demote_threshold: usize::try_from(args.demote_threshold).unwrap_or(3),
            report_window: Duration::from_secs(args.report_window_secs),
            ..TrustConfig::default()
        },
        grid_roots: starling_controlplane::live::GridRoots {
            peers_per_root: args.grid_peers_per_root,
            max_roots: args.grid_max_roots,
        },
        reachability: starling_controlplane::reachability::ReachabilityConfig {
            enabled: args.reachability_probe,
            timeout: args.reachability_probe_timeout,
            ..Default::default()
        },
        parent_ticket_ttl: Duration::from_secs(args.parent_ticket_ttl),
        session_counters_interval: args.session_counters_interval,
        session_detach_grace: args.session_detach_grace,
        ..ServiceConfig::default()
    };
    let auth = auth_config(&args)?;
    let config = Config {
        listen: args.listen,
        database: database.clone(),
        service,
        metrics_listen,
        dashboard_listen,
        auth,
        server_limits: ServerLimits {
            concurrency_per_connection: usize::try_from(args.grpc_concurrency_per_connection)
                .unwrap_or(usize::MAX),
            request_timeout: args.grpc_request_timeout,
            max_message_bytes: usize::try_from(args.grpc_max_message_bytes).unwrap_or(usize::MAX),
            http2_keepalive_interval: (!args.grpc_keepalive_interval.is_zero())
                .then_some(args.grpc_keepalive_interval),
            http2_keepalive_timeout: args.grpc_keepalive_timeout,
            max_concurrent_streams: args.grpc_max_concurrent_streams,
        },
        tls,
    };
    eprintln!("starling-controlplane: database {}", database.describe());
    let failed = || format!("control plane failed ({})", database.describe());
    let cp = ControlPlane::bind(config)
        .instrument(tracing::info_span!("controlplane.start", listen = %args.listen))
        .await
        .with_context(failed)?;
    eprintln!(
        "starling-controlplane: backend {}, listening on {} (gRPC{})",
        cp.backend_name(),
        cp.local_addr(),
        if cp.tls().is_some() {
            " over TLS"
        } else {
            ", PLAINTEXT"
        }
    );
    if let Some(addr) = cp.dashboard_addr() {
        eprintln!(
            "starling-controlplane: dashboard on http://{addr}/ (sign in with the admin key or \
             an admin JWT, or open http://{addr}/#key=KEY)"
        );
    }
    cp.run(shutdown_signal()).await.with_context(failed)?;
    eprintln!("starling-controlplane: stopped");
    Ok(())
}
