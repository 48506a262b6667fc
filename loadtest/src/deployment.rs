//! A whole Starling deployment in-process: control plane (embedded SQLite in a temporary
//! directory, or Postgres with [`DeploymentConfig::database_url`]), one data-plane node,
//! the synthetic source, and one started broadcast (public by default; non-public with
//! the broadcaster's [`DeploymentConfig::viewer_jwt_keys`]). Admin calls carry the
//! control plane's static admin key as a bearer ([`AdminClient`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use starling_controlplane::credential::CredentialKey;
use starling_controlplane::reports::Reports;
use starling_controlplane::{
    BearerInterceptor, ControlPlane, ControlPlaneHandle, DatabaseConfig, ServiceConfig,
};
use starling_proto::transport::Transport;
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::{Broadcast, BroadcastRef, CreateBroadcastRequest, SourceHealth};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// An admin API client that sends the admin key as `authorization: Bearer <key>`.
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, BearerInterceptor>>;

/// The `aud` viewer JWTs must carry in a deployment with viewer keys.
pub const VIEWER_JWT_AUDIENCE: &str = "starling-loadtest";
/// The `iss` viewer JWTs must carry in a deployment with viewer keys.
pub const VIEWER_JWT_ISSUER: &str = "starling-loadtest-backend";

/// Connects an [`AdminClient`] to `control_url` (secured as `transport` says) with
/// `admin_key`.
pub async fn admin_client(
    control_url: &str,
    admin_key: &str,
    transport: &Transport,
) -> Result<AdminClient, HarnessError> {
    let bearer = BearerInterceptor::new(admin_key)
        .map_err(|e| HarnessError::Config(format!("admin key: {e}")))?;
    let channel = crate::tls::channel(control_url, transport)
        .await
        .map_err(|e| HarnessError::Start(format!("admin client: {e}")))?;
    Ok(AdminServiceClient::with_interceptor(channel, bearer))
}

use crate::error::HarnessError;
use crate::source::{SourceConfig, SyntheticSource};

fn wire_bytes_sent(registry: &starling_dataplane::ring::Registry) -> u64 {
    use starling_dataplane::metrics::SentKind;
    let m = registry.metrics();
    m.bytes_sent(SentKind::WirePush)
        + m.bytes_sent(SentKind::WireRequest)
        + m.bytes_sent(SentKind::WireControl)
}

/// The data plane's connection caps for a swarm on this machine: every SDK peer's
/// data-plane link comes from 127.0.0.1 (only its relay listener has its own 127.x.y.z
/// address), so the per-address caps, 1,000 open and 64 not yet subscribed by
/// default, are raised to the node's whole capacity; the node-wide cap on connections
/// not yet subscribed and the per-connection rates keep their defaults.
pub fn loopback_limits() -> starling_dataplane::ConnLimits {
    let d = starling_dataplane::ConnLimits::default();
    starling_dataplane::ConnLimits {
        max_per_address: u32::MAX,
        max_unauthenticated_per_address: d.max_unauthenticated,
        ..d
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct DeploymentConfig {
    /// Stream rate of the synthetic source, kbit/s.
    pub bitrate_kbps: u32,
    /// Key of the source's byte pattern.
    pub seed: u64,
    /// Target chunk duration. Peers relay whole chunks, so shorter chunks mean less
    /// delay per hop (and more frames).
    pub chunk_ms: u32,
    /// Substreams of the peer grid (K); 0 = the control plane's default.
    pub substreams: u32,
    /// SDK heartbeat / node health interval handed out by the control plane.
    pub heartbeat_interval: Duration,
    /// Data-plane executors.
    pub dataplane_cores: usize,
    /// io_uring registered memory per executor, KiB.
    pub io_memory_kib: usize,
    /// Directory for the SQLite database; `None` = a fresh temporary directory.
    pub data_dir: Option<PathBuf>,
    /// How long to wait for the broadcast's source to be UP.
    pub ready_timeout: Duration,
    /// Create the broadcast public (joined without a credential). `false` needs
    /// [`DeploymentConfig::viewer_jwt_keys`] for anyone to join.
    pub public: bool,
    /// Keys that verify viewer JWTs (the broadcaster's backend's public keys). Their
    /// JWTs must carry `aud` [`VIEWER_JWT_AUDIENCE`] and `iss` [`VIEWER_JWT_ISSUER`].
    pub viewer_jwt_keys: Vec<CredentialKey>,
    /// PostgreSQL URL for the control plane; `None` = embedded SQLite in
    /// [`DeploymentConfig::data_dir`].
    pub database_url: Option<String>,
    /// Chunk-token lifetime handed out by the control plane; `None` = its default.
    pub token_ttl: Option<Duration>,
    /// Viewer report interval handed out by the control plane; `None` = its default.
    pub report_interval: Option<Duration>,
    /// Serve the control plane's Prometheus `/metrics` on a loopback port
    /// ([`Deployment::control_metrics_url`]).
    pub control_metrics: bool,
    /// Serve the control plane's dashboard on this address (port 0: a free one;
    /// [`Deployment::dashboard_url`]); `None` = not served.
    pub dashboard_listen: Option<SocketAddr>,
    /// Viewers reach the control plane through a proxy (`tests/reports.rs`), so every
    /// call comes from the proxy's address: the control plane's peer address check and
    /// its per-address rate limits are turned off (they cannot hold behind a proxy).
    /// Otherwise SDK peers call from their own 127.x.y.z relay address and both stay on.
    pub behind_proxy: bool,
    /// Serve gRPC over TLS with a throwaway CA made at start (default); `false`:
    /// plaintext (insecure opt-in; every client then uses `Transport::Plaintext`).
    pub tls: bool,
}

impl Default for DeploymentConfig {
    fn default() -> Self {
        DeploymentConfig {
            bitrate_kbps: 500,
            seed: 0x5eed_0001,
            chunk_ms: 250,
            substreams: 4,
            heartbeat_interval: Duration::from_millis(500),
            dataplane_cores: 1,
            io_memory_kib: 512,
            data_dir: None,
            ready_timeout: Duration::from_secs(30),
            public: true,
            viewer_jwt_keys: Vec::new(),
            database_url: None,
            token_ttl: None,
            report_interval: None,
            control_metrics: false,
            dashboard_listen: None,
            behind_proxy: false,
            tls: true,
        }
    }
}

/// A running in-process deployment. Stop it with [`Deployment::shutdown`] (dropping it
/// stops everything too, without waiting).
pub struct Deployment {
    config: DeploymentConfig,
    source: SyntheticSource,
    control: Option<ControlPlaneHandle>,
    node: Option<starling_dataplane::Node>,
    admin: AdminClient,
    admin_key: String,
    transport: Transport,
    broadcast: Broadcast,
    reports: Arc<Reports>,
    control_metrics: Option<SocketAddr>,
    dashboard: Option<SocketAddr>,
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("broadcast_id", &self.broadcast.id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Deployment {
    /// Starts the source, the control plane and the data plane, creates and starts a
    /// broadcast of the source over the admin API, and waits until the data plane
    /// reports the source UP and has cut a chunk.
    pub async fn start(config: DeploymentConfig) -> Result<Deployment, HarnessError> {
        let source = SyntheticSource::start(SourceConfig {
            bitrate_kbps: config.bitrate_kbps,
            seed: config.seed,
            ..SourceConfig::default()
        })
        .await
        .map_err(|e| HarnessError::Start(format!("synthetic source: {e}")))?;

        let (dir, data_dir) = match &config.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("starling-loadtest-")
                    .tempdir()
                    .map_err(|e| HarnessError::Start(format!("temporary directory: {e}")))?;
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
        };
        let mut cp_config = starling_controlplane::Config::new(
            ([127, 0, 0, 1], 0).into(),
            DatabaseConfig::from_url_or_data_dir(config.database_url.as_deref(), &data_dir),
        );
        let admin_key = cp_config.auth.admin_key.clone().unwrap_or_default();
        cp_config.auth.viewer_jwt_keys = config.viewer_jwt_keys.clone();
        cp_config.auth.viewer_jwt = starling_controlplane::credential::JwtPolicy::new(
            VIEWER_JWT_AUDIENCE,
            VIEWER_JWT_ISSUER,
            starling_controlplane::credential::DEFAULT_VIEWER_MAX_LIFETIME_SECS,
        );
        let defaults = ServiceConfig::default();
        cp_config.service = ServiceConfig {
            heartbeat_interval: config.heartbeat_interval,
            token_ttl: config.token_ttl.unwrap_or(defaults.token_ttl),
            report_interval: config.report_interval.unwrap_or(defaults.report_interval),
            ..defaults
        };
        if config.behind_proxy {
            use starling_controlplane::limits::RateLimit;
            cp_config.service.trust.peer_addr_check =
                starling_controlplane::trust::PeerAddrCheck::Off;
            cp_config.service.limits.join = RateLimit::per_second(0.0, 1);
            cp_config.service.limits.unknown_session_lookups = RateLimit::per_second(0.0, 1);
        }
        if config.control_metrics {
            cp_config.metrics_listen = Some(([127, 0, 0, 1], 0).into());
        }
        cp_config.dashboard_listen = config.dashboard_listen;
        let transport = if config.tls {
            let tls = crate::tls::ThrowawayTls::new()?;
            cp_config.tls = Some(tls.server_tls());
            tls.transport()
        } else {
            Transport::Plaintext
        };
        let cp = ControlPlane::bind(cp_config)
            .await
            .map_err(|e| HarnessError::Start(format!("control plane: {e}")))?;
        let reports = cp.reports();
        let control_metrics = cp.metrics_addr();
        let dashboard = cp.dashboard_addr();
        let control = cp.spawn();
        let control_url = control.url();

        // The in-process control plane has no separate node key: its nodes send the
        // admin key (an admin credential is accepted on EdgeService).
        let node_key = starling_dataplane::NodeKey::new(&admin_key)
            .map_err(|e| HarnessError::Start(format!("node key: {e}")))?;
        let node_cfg = starling_dataplane::Config {
            control_url: Some(control_url.clone()),
            control_transport: transport.clone(),
            node_key: Some(node_key),
            wire_listen: ([127, 0, 0, 1], 0).into(),
            http_listen: ([127, 0, 0, 1], 0).into(),
            advertise_host: "127.0.0.1".into(),
            node_name: "loadtest-node".into(),
            cores: config.dataplane_cores.max(1),
            io_memory_kib: config.io_memory_kib,
            limits: loopback_limits(),
            // The synthetic source (and any test's own) is on loopback.
            source_policy: starling_dataplane::source_policy::SourcePolicy::with_loopback(),
            ..starling_dataplane::Config::default()
        };
        let node = tokio::task::spawn_blocking(move || starling_dataplane::Node::start(node_cfg))
            .await
            .map_err(|e| HarnessError::Start(format!("data plane: {e}")))?
            .map_err(|e| HarnessError::Start(format!("data plane: {e}")))?;

        let mut admin = admin_client(&control_url, &admin_key, &transport).await?;
        let created = admin
            .create_broadcast(CreateBroadcastRequest {
                name: "loadtest".into(),
                source_url: source.url(),
                chunk_duration_ms: config.chunk_ms,
                substreams: config.substreams,
                public: config.public,
            })
            .await
            .map_err(|s| HarnessError::Admin(format!("CreateBroadcast: {}", s.message())))?
            .into_inner();
        admin
            .start_broadcast(BroadcastRef {
                id: created.id.clone(),
            })
            .await
            .map_err(|s| HarnessError::Admin(format!("StartBroadcast: {}", s.message())))?;

        let mut dep = Deployment {
            config,
            source,
            control: Some(control),
            node: Some(node),
            admin,
            admin_key,
            transport,
            broadcast: created,
            reports,
            control_metrics,
            dashboard,
            _dir: dir,
        };
        dep.wait_ready().await?;
        Ok(dep)
    }

    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let deadline = tokio::time::Instant::now() + self.config.ready_timeout;
        loop {
            let b = self.broadcast().await?;
            let up = b.source_health == SourceHealth::Up as i32;
            if up && b.last_seq >= 1 && !b.node_wire_addr.is_empty() {
                self.broadcast = b;
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::Start(format!(
                    "broadcast not live after {:?}: health {:?}, error {:?}, node {:?}, last_seq {}",
                    self.config.ready_timeout,
                    SourceHealth::try_from(b.source_health).unwrap_or(SourceHealth::Unspecified),
                    b.source_error,
                    b.node_id,
                    b.last_seq
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &DeploymentConfig {
        &self.config
    }

    /// The broadcast's id.
    pub fn broadcast_id(&self) -> &str {
        &self.broadcast.id
    }

    /// The control plane's gRPC URL (for SDK viewers): `https://` unless
    /// [`DeploymentConfig::tls`] is off.
    pub fn control_url(&self) -> String {
        self.control.as_ref().map(|c| c.url()).unwrap_or_default()
    }

    /// How clients reach the control plane: TLS trusting the throwaway root CA only
    /// (or plaintext when [`DeploymentConfig::tls`] is off).
    pub fn transport(&self) -> Transport {
        self.transport.clone()
    }

    /// The throwaway root CA (PEM) clients trust, when serving TLS.
    pub fn ca_pem(&self) -> Option<String> {
        match &self.transport {
            Transport::Tls(t) => t
                .ca_pem
                .as_ref()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            Transport::Plaintext => None,
        }
    }

    /// A connected gRPC channel to the control plane.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn channel(&self) -> Result<Channel, HarnessError> {
        crate::tls::channel(&self.control_url(), &self.transport).await
    }

    /// The synthetic source.
    pub fn source(&self) -> &SyntheticSource {
        &self.source
    }

    /// The data-plane node.
    pub fn node(&self) -> Option<&starling_dataplane::Node> {
        self.node.as_ref()
    }

    /// An admin API client.
    pub fn admin(&self) -> AdminClient {
        self.admin.clone()
    }

    /// The control plane's admin key (send as `authorization: Bearer <key>`).
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    /// The control plane's viewer-report recording (queue depth, [`Reports::flush`]
    /// before reading `GetAudience`).
    pub fn reports(&self) -> Arc<Reports> {
        self.reports.clone()
    }

    /// `http://addr/metrics` of the control plane, when
    /// [`DeploymentConfig::control_metrics`] is set.
    pub fn control_metrics_url(&self) -> Option<String> {
        self.control_metrics.map(|a| format!("http://{a}/metrics"))
    }

    /// `http://addr/`, the control plane's dashboard, when
    /// [`DeploymentConfig::dashboard_listen`] is set (sign in with
    /// [`Deployment::admin_key`], or append `#key=` and the key).
    pub fn dashboard_url(&self) -> Option<String> {
        self.dashboard.map(|a| format!("http://{a}/"))
    }

    /// "postgres" or "sqlite".
    pub fn database_backend(&self) -> &'static str {
        if self
            .config
            .database_url
            .as_deref()
            .is_some_and(|u| !u.trim().is_empty())
        {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// The broadcast as the admin API reports it now (`GetBroadcast`: health, viewers,
    /// grid figures).
    pub async fn broadcast(&self) -> Result<Broadcast, HarnessError> {
        self.admin
            .clone()
            .get_broadcast(BroadcastRef {
                id: self.broadcast.id.clone(),
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| HarnessError::Admin(format!("GetBroadcast: {}", s.message())))
    }

    /// Bytes the data plane has written to wire-protocol viewers (chunk pushes,
    /// answers to REQUEST and control frames, framing included), from its metrics.
    pub fn dataplane_egress_bytes(&self) -> Option<u64> {
        self.node.as_ref().map(|n| wire_bytes_sent(n.registry()))
    }

    /// A probe of [`Deployment::dataplane_egress_bytes`] that outlives the borrow.
    pub fn egress_probe(&self) -> Option<impl Fn() -> Option<u64> + Send + Sync + 'static> {
        let registry = self.node.as_ref()?.registry().clone();
        Some(move || Some(wire_bytes_sent(&registry)))
    }

    /// Stops the data plane, the control plane and the source, and waits for them.
    pub async fn shutdown(mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown();
            let _ = tokio::task::spawn_blocking(move || node.join()).await;
        }
        if let Some(cp) = self.control.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), cp.shutdown()).await;
        }
    }
}
