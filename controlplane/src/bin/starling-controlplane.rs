//! `starling-controlplane`: the Starling control-plane server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use starling_controlplane::auth::{self, AuthConfig};
use starling_controlplane::{Config, ControlPlane, DatabaseConfig, ServiceConfig};
use tracing::Instrument as _;

/// Starling control plane: admin, viewer and edge gRPC services (package starling.v1).
///
/// Stores broadcasts, data-plane nodes and viewer sessions in PostgreSQL when
/// --database-url is given, otherwise in an embedded SQLite file
/// (<data-dir>/starling.db, created if missing). Serves gRPC health checking and
/// server reflection, so `grpcurl -plaintext ADDR list` works without the .proto.
///
/// Admin calls need `authorization: Bearer <admin JWT or admin key>`. ZERO-SETUP MODE:
/// with neither --admin-key nor --admin-jwt-key, a random admin key is generated at the
/// first start into <data-dir>/admin.key (mode 0600) and reused afterwards;
/// `starling-admin` run from the same directory finds it. Use admin JWT keys in
/// production. Viewers of non-public broadcasts need a JWT verified with a
/// --viewer-jwt-key. Data-plane nodes (EdgeService) need `authorization: Bearer <node
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

    /// Most viewer reports held in memory while waiting to be written to the database
    /// (e.g. while it is unavailable). Beyond it, Report calls are refused (UNAVAILABLE)
    /// and their reports counted in starling_cp_reports_dropped_total.
    #[arg(long, env = "STARLING_REPORT_QUEUE_MAX", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    report_queue_max: u64,

    /// How long raw viewer reports are kept (per-minute roll-ups are kept forever):
    /// a number with a unit s, m, h or d (e.g. `7d`, `36h`).
    #[arg(long, env = "STARLING_REPORT_RETENTION", default_value = "7d",
          value_parser = parse_duration)]
    report_retention: Duration,

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
}

/// `90s`, `30m`, `36h`, `7d` (or plain seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 36h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("the duration must not be zero".into());
    }
    Ok(Duration::from_secs(secs))
}

fn metrics_addr(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    Ok(Some(s.parse().with_context(|| {
        format!("--metrics-listen {s:?} is not host:port, \"\" or off")
    })?))
}

/// The OTLP endpoint from the flag or the standard OTEL_* variables; `None` when unset,
/// empty or `off`.
fn otlp_endpoint(flag: Option<&str>) -> Option<String> {
    let endpoint = match flag {
        Some(s) => s.to_string(),
        None => std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .ok()?,
    };
    let endpoint = endpoint.trim();
    (!endpoint.is_empty() && !endpoint.eq_ignore_ascii_case("off")).then(|| endpoint.to_string())
}

/// A tracer provider exporting batches of spans over OTLP/gRPC (on the batch
/// processor's own thread; the channel is driven by the current Tokio runtime).
fn otlp_provider(
    endpoint: &str,
    service_name: Option<&str>,
) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    let service_name = service_name
        .map(str::to_string)
        .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
        .unwrap_or_else(|| "starling-controlplane".to_string());
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("--otlp-endpoint {endpoint:?}"))?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name)
                .build(),
        )
        .build())
}

/// Flushes the spans still queued and stops the exporter (bounded: an unreachable
/// collector only costs a warning).
fn otlp_shutdown(provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>) {
    if let Some(provider) = provider
        && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
    {
        tracing::warn!(error = %e, "OTLP trace export: final flush failed");
    }
}

fn init_logging(
    filter: Option<&str>,
    json: bool,
    otlp: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("starling-controlplane: bad log filter {filter:?} ({e}); using `info`");
        tracing_subscriber::EnvFilter::new("info")
    });
    // The exporter's own transport (tonic/h2/hyper) is never traced: at debug level
    // each export would produce spans to export.
    let otel = otlp.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("starling-controlplane"))
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                !["h2", "hyper", "tonic", "tower", "opentelemetry"]
                    .iter()
                    .any(|t| m.target().starts_with(t))
            }))
    });
    let text = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(env_filter)
        .with(text)
        .with(json)
        .with(otel)
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
    let endpoint = otlp_endpoint(args.otlp_endpoint.as_deref());
    let otlp = endpoint
        .as_deref()
        .map(|endpoint| otlp_provider(endpoint, args.otlp_service_name.as_deref()))
        .transpose()?;
    init_logging(
        args.log.as_deref(),
        args.log_format == "json",
        otlp.as_ref(),
    );
    if let Some(endpoint) = &endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP/gRPC");
    }
    let result = run(args).await;
    otlp_shutdown(otlp);
    result
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics_listen = metrics_addr(&args.metrics_listen)?;

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
            ..starling_controlplane::ReportConfig::default()
        },
        token_ttl: Duration::from_secs(args.token_ttl),
        parent_ticket_ttl: Duration::from_secs(args.parent_ticket_ttl),
        ..ServiceConfig::default()
    };
    let auth = auth_config(&args)?;
    let config = Config {
        listen: args.listen,
        database: database.clone(),
        service,
        metrics_listen,
        auth,
    };
    eprintln!("starling-controlplane: database {}", database.describe());
    let failed = || format!("control plane failed ({})", database.describe());
    let cp = ControlPlane::bind(config)
        .instrument(tracing::info_span!("controlplane.start", listen = %args.listen))
        .await
        .with_context(failed)?;
    eprintln!(
        "starling-controlplane: backend {}, listening on {} (gRPC)",
        cp.backend_name(),
        cp.local_addr()
    );
    cp.run(shutdown_signal()).await.with_context(failed)?;
    eprintln!("starling-controlplane: stopped");
    Ok(())
}
