//! Wiring: database, gRPC server (three services + health + reflection; over TLS with
//! [`crate::tls`], or plaintext when the configuration says so), liveness task,
//! graceful shutdown. Usable in-process by tests and the load generator.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use starling_proto::v1::admin_service_server::AdminServiceServer;
use starling_proto::v1::edge_service_server::EdgeServiceServer;
use starling_proto::v1::viewer_service_server::ViewerServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::auth::{AdminInterceptor, AuthConfig, AuthConfigError, Authenticator, NodeInterceptor};
use crate::service::{Api, Core, ServiceConfig, now_ms};
use crate::store::{DatabaseConfig, Store, StoreError};
use crate::tls::{ServerTls, TlsError, TlsServer};
use crate::tokens::{TokenKeyError, TokenKeys};

/// How long graceful shutdown waits for in-flight calls before giving up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long shutdown waits for queued viewer reports to be written.
const REPORT_FLUSH_GRACE: Duration = Duration::from_secs(5);

/// Default most concurrent requests per client connection.
pub const DEFAULT_CONCURRENCY_PER_CONNECTION: usize = 64;
/// Default limit on a request's handling time (to its response headers; a node's
/// command stream, once open, is not cut).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest request message decoded (after decompression), bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Default HTTP/2 keep-alive PING interval (on an idle connection): with the timeout and
/// the session detach grace, a vanished viewer is removed within today's heartbeat
/// bound (docs/PROTOCOL.md, "Session stream").
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Default wait for a keep-alive PING's acknowledgement before closing the connection.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default most concurrent HTTP/2 streams per connection: room for a load generator's
/// ~500 session streams on one connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Limits of the gRPC server itself (issue 13, item 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most requests in progress per client connection (HTTP/2 streams beyond wait).
    pub concurrency_per_connection: usize,
    /// A request not answered within this time fails with CANCELLED
    /// (`grpc-timeout` of the client applies too, whichever is shorter).
    pub request_timeout: Duration,
    /// Largest request message accepted; larger ones fail with OUT_OF_RANGE (tonic).
    pub max_message_bytes: usize,
    /// HTTP/2 PING interval on idle connections (`None`: no keep-alive), so that the
    /// session streams of a silently vanished viewer end.
    pub http2_keepalive_interval: Option<Duration>,
    /// A PING not acknowledged within this time closes the connection.
    pub http2_keepalive_timeout: Duration,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            concurrency_per_connection: DEFAULT_CONCURRENCY_PER_CONNECTION,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            http2_keepalive_interval: Some(DEFAULT_KEEPALIVE_INTERVAL),
            http2_keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// Control-plane configuration (built by the binary from its flags, or by tests).
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (see [`ControlPlane::local_addr`]).
    pub listen: SocketAddr,
    /// Database backend.
    pub database: DatabaseConfig,
    /// Service tunables (heartbeat interval, node timeout, token lifetime...).
    pub service: ServiceConfig,
    /// Credentials: admin key / admin JWT keys, viewer JWT keys, leeway, key rotation.
    pub auth: AuthConfig,
    /// Where to serve Prometheus `GET /metrics` over HTTP; `None` = not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the operator's dashboard ([`crate::dashboard`]); `None` = not
    /// served.
    pub dashboard_listen: Option<SocketAddr>,
    /// gRPC server limits (concurrency per connection, timeout, message size).
    pub server_limits: ServerLimits,
    /// TLS of the gRPC listener; `None`: plaintext (insecure; logged as a warning).
    /// The binary refuses to start without it unless `--insecure-plaintext` is given.
    pub tls: Option<ServerTls>,
}

impl Config {
    /// A configuration with default service tunables and the in-process zero-setup
    /// credentials: a fresh random static admin key (`auth.admin_key`: send it as
    /// `authorization: Bearer <key>`, e.g. with [`crate::auth::BearerInterceptor`]; data-plane
    /// nodes send it too, as their node key), no separate node key and no viewer keys (only
    /// public broadcasts can be joined).
    pub fn new(listen: SocketAddr, database: DatabaseConfig) -> Self {
        Config {
            listen,
            database,
            service: ServiceConfig::default(),
            auth: AuthConfig::with_random_admin_key(),
            metrics_listen: None,
            dashboard_listen: None,
            server_limits: ServerLimits::default(),
            tls: None,
        }
    }
}

/// Errors starting or running the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptor set.
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The credentials configuration is unusable.
    #[error("credentials: {0}")]
    Auth(#[from] AuthConfigError),
    /// The chunk-token signing keys could not be loaded or created.
    #[error("chunk-token keys: {0}")]
    TokenKeys(#[from] TokenKeyError),
    /// The TLS certificate, key or client CA is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// A control plane with its database open and its socket bound, not yet serving.
#[derive(Debug)]
pub struct ControlPlane {
    listener: TcpListener,
    local_addr: SocketAddr,
    core: Arc<Core>,
    /// The bound `/metrics` listener, if any.
    metrics: Option<(TcpListener, SocketAddr)>,
    /// The bound dashboard listener, if any.
    dashboard: Option<(TcpListener, SocketAddr)>,
    limits: ServerLimits,
    tls: Option<TlsServer>,
}

impl ControlPlane {
    /// Opens (and migrates) the database and binds the listen address.
    pub async fn bind(config: Config) -> Result<ControlPlane, ServeError> {
        let store = Store::connect(&config.database).await?;
        let mut cp =
            Self::bind_with_store(config.listen, store, config.service, &config.auth).await?;
        cp.limits = config.server_limits;
        if let Some(tls) = &config.tls {
            cp.set_tls(tls)?;
        }
        if let Some(addr) = config.metrics_listen {
            cp.bind_metrics(addr).await?;
        }
        if let Some(addr) = config.dashboard_listen {
            cp.bind_dashboard(addr).await?;
        }
        Ok(cp)
    }

    /// Binds the dashboard's HTTP listener (served by [`ControlPlane::run`]); returns
    /// its address (with the real port when `addr`'s was 0).
    pub async fn bind_dashboard(&mut self, addr: SocketAddr) -> Result<SocketAddr, ServeError> {
        let bound = crate::dashboard::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let local = bound.1;
        self.dashboard = Some(bound);
        Ok(local)
    }

    /// The bound dashboard address, if any (the page is `http://{addr}/`).
    pub fn dashboard_addr(&self) -> Option<SocketAddr> {
        self.dashboard.as_ref().map(|(_, a)| *a)
    }

    /// Binds the Prometheus `/metrics` HTTP listener (served by [`ControlPlane::run`]);
    /// returns its address (with the real port when `addr`'s was 0).
    pub async fn bind_metrics(&mut self, addr: SocketAddr) -> Result<SocketAddr, ServeError> {
        let bound = crate::metrics::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let local = bound.1;
        self.metrics = Some(bound);
        Ok(local)
    }

    /// Serves gRPC over TLS as `tls` says (instead of plaintext).
    ///
    /// # Errors
    /// The certificate, key or client CA does not load.
    pub fn set_tls(&mut self, tls: &ServerTls) -> Result<(), ServeError> {
        self.tls = Some(TlsServer::new(tls)?);
        Ok(())
    }

    /// The gRPC listener's TLS, if any (e.g. to reload its certificate).
    pub fn tls(&self) -> Option<&TlsServer> {
        self.tls.as_ref()
    }

    /// `https://addr` with TLS, else `http://addr`.
    pub fn url(&self) -> String {
        url(self.tls.is_some(), self.local_addr)
    }

    /// Replaces the gRPC server limits ([`ControlPlane::bind_with_store`] starts with
    /// the defaults).
    pub fn with_server_limits(mut self, limits: ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The bound `/metrics` address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, a)| *a)
    }

    /// Viewer-report recording (e.g. for tests that wait for the queue to drain).
    pub fn reports(&self) -> Arc<crate::reports::Reports> {
        self.core.reports().clone()
    }

    /// Like [`ControlPlane::bind`] with an already connected and migrated store. Loads
    /// (or creates, or rotates) the chunk-token signing keys in that store.
    pub async fn bind_with_store(
        listen: SocketAddr,
        store: Store,
        service: ServiceConfig,
        auth: &AuthConfig,
    ) -> Result<ControlPlane, ServeError> {
        let authenticator = Arc::new(Authenticator::new(auth)?);
        let tokens =
            TokenKeys::load(&store, service.token_ttl, auth.rotate_token_key, now_ms()).await?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
        Ok(ControlPlane {
            listener,
            local_addr,
            core: Core::new(store, service, authenticator, tokens),
            metrics: None,
            dashboard: None,
            limits: ServerLimits::default(),
            tls: None,
        })
    }

    /// The bound address (with the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// "postgres" or "sqlite".
    pub fn backend_name(&self) -> &'static str {
        self.core.store().backend_name()
    }

    /// The store (e.g. for tests that inspect the database).
    pub fn store(&self) -> &Store {
        self.core.store()
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: health turns
    /// NOT_SERVING, node command streams end, in-flight calls get a grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let ControlPlane {
            listener,
            local_addr,
            core,
            metrics,
            dashboard,
            limits,
            tls,
        } = self;
        let report_tasks = core.reports().spawn();
        let metrics_task = metrics.map(|(l, addr)| {
            tracing::info!(%addr, "serving Prometheus metrics on http://{addr}/metrics");
            let core = core.clone();
            tokio::spawn(crate::metrics::serve(l, move || {
                let core = core.clone();
                async move { core.render_metrics().await }
            }))
        });
        let dashboard_task = dashboard.map(|(l, addr)| {
            tracing::info!(%addr, "serving the dashboard on http://{addr}/");
            tokio::spawn(crate::dashboard::serve(
                l,
                core.authenticator().clone(),
                core.clone(),
            ))
        });
        let api = Api::new(core.clone());
        let admin_guard = AdminInterceptor::new(core.authenticator().clone());
        let node_guard = NodeInterceptor::new(core.authenticator().clone()).require_client_cert(
            tls.as_ref()
                .is_some_and(TlsServer::require_node_client_cert),
        );

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<AdminServiceServer<Api>>()
            .await;
        health_reporter
            .set_serving::<ViewerServiceServer<Api>>()
            .await;
        health_reporter
            .set_serving::<EdgeServiceServer<Api>>()
            .await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(starling_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(starling_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let liveness = tokio::spawn(liveness_loop(core.clone()));

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown_core = core.clone();
        let shutdown_health = health_reporter.clone();
        let shutdown_signal = async move {
            shutdown.await;
            tracing::info!("control plane shutting down");
            shutdown_health
                .set_not_serving::<AdminServiceServer<Api>>()
                .await;
            shutdown_health
                .set_not_serving::<ViewerServiceServer<Api>>()
                .await;
            shutdown_health
                .set_not_serving::<EdgeServiceServer<Api>>()
                .await;
            shutdown_health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            shutdown_core.close_streams();
            shutdown_core.end_session_streams();
            let _ = stop_tx.send(true);
        };

        let reloader = tls.as_ref().and_then(TlsServer::spawn_reloader);
        match &tls {
            Some(t) => tracing::info!(
                %local_addr,
                backend = core.store().backend_name(),
                client_certs = t.require_node_client_cert(),
                "control plane serving gRPC over TLS"
            ),
            None => tracing::warn!(
                %local_addr,
                backend = core.store().backend_name(),
                "control plane serving gRPC in PLAINTEXT (insecure): credentials cross the \
                 network in clear"
            ),
        }
        let max_msg = limits.max_message_bytes.max(1024);
        let router = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(limits.concurrency_per_connection.max(1))
            .timeout(limits.request_timeout.max(Duration::from_millis(100)))
            .http2_keepalive_interval(limits.http2_keepalive_interval)
            .http2_keepalive_timeout(Some(
                limits.http2_keepalive_timeout.max(Duration::from_millis(10)),
            ))
            .max_concurrent_streams(limits.max_concurrent_streams.max(1))
            // One span per RPC (exported over OTLP when configured).
            .trace_fn(|req| {
                tracing::info_span!("grpc", otel.name = %req.uri().path(), otel.kind = "server")
            })
            .layer(crate::metrics::RpcMetricsLayer::new(core.metrics().clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(
                AdminServiceServer::new(api.clone()).max_decoding_message_size(max_msg),
                admin_guard,
            ))
            .add_service(api.viewer_service(max_msg))
            // Data-plane nodes: node key or admin credential (see `crate::auth`).
            .add_service(InterceptedService::new(
                EdgeServiceServer::new(api).max_decoding_message_size(max_msg),
                node_guard,
            ));
        let server: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send + '_>,
        > = match &tls {
            Some(t) => {
                Box::pin(router.serve_with_incoming_shutdown(t.incoming(listener), shutdown_signal))
            }
            None => Box::pin(router.serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown_signal,
            )),
        };

        let mut stop_rx_grace = stop_rx.clone();
        let grace = async move {
            // Resolves SHUTDOWN_GRACE after shutdown began; never before.
            while !*stop_rx_grace.borrow_and_update() {
                if stop_rx_grace.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };

        let result = tokio::select! {
            r = server => r.map_err(ServeError::from),
            () = grace => {
                tracing::warn!("graceful shutdown timed out; dropping remaining calls");
                Ok(())
            }
        };
        liveness.abort();
        if let Some(t) = reloader {
            t.abort();
        }
        core.close_streams();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = dashboard_task {
            t.abort();
        }
        // Queued reports get a few seconds to reach the database.
        if !core.reports().flush(REPORT_FLUSH_GRACE).await {
            tracing::warn!(
                queued = core.reports().queue_depth(),
                "shutting down with viewer reports not yet written; they are lost"
            );
        }
        for t in report_tasks {
            t.abort();
        }
        core.store().close().await;
        drop(stop_rx);
        result
    }

    /// Spawns [`ControlPlane::run`] on the current runtime and returns a handle to
    /// stop it.
    pub fn spawn(self) -> ControlPlaneHandle {
        let local_addr = self.local_addr;
        let tls = self.tls.is_some();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            let _ = rx.await;
        }));
        ControlPlaneHandle {
            local_addr,
            tls,
            shutdown: Some(tx),
            task,
        }
    }
}

/// Binds and serves until `shutdown` completes. `on_bound` is called with the bound
/// address before serving starts.
pub async fn serve(
    config: Config,
    on_bound: impl FnOnce(SocketAddr, &'static str),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let cp = ControlPlane::bind(config).await?;
    on_bound(cp.local_addr(), cp.backend_name());
    cp.run(shutdown).await
}

/// A control plane running in a background task.
#[derive(Debug)]
pub struct ControlPlaneHandle {
    local_addr: SocketAddr,
    tls: bool,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl ControlPlaneHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `https://addr` when serving TLS, else `http://addr`, ready for a tonic client.
    pub fn url(&self) -> String {
        url(self.tls, self.local_addr)
    }

    /// Shuts down gracefully and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "control plane task failed");
                Ok(())
            }
        }
    }
}

impl Drop for ControlPlaneHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn url(tls: bool, addr: SocketAddr) -> String {
    if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

async fn liveness_loop(core: Arc<Core>) {
    let mut ticker = tokio::time::interval(core_tick(&core));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rights = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        if last_rights.elapsed() >= core.key_refresh_interval() {
            last_rights = tokio::time::Instant::now();
            if let Err(e) = core.rights_tick(now_ms()).await {
                tracing::error!(error = %e, "chunk-token key refresh failed");
            }
        }
        if let Err(e) = core.liveness_tick(now_ms()).await {
            tracing::error!(error = %e, "liveness check failed");
        }
        if let Err(e) = core.expire_sessions().await {
            tracing::error!(error = %e, "session expiry failed");
        }
        if let Err(e) = core.flush_touches().await {
            tracing::warn!(error = %e, "writing heartbeats to the database failed; retrying");
        }
    }
}

fn core_tick(core: &Core) -> Duration {
    core.liveness_tick_interval().max(Duration::from_millis(10))
}
