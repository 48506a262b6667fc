//! The control plane as a child of the bench without its binary: the library's
//! [`starling_controlplane::ControlPlane`] in its own process, configured like the
//! spawned `starling-controlplane` (no per-address limits, no peer-addr check), for
//! tests and builds where the binary is absent. It prints the same "listening on"
//! line on stderr.

use std::path::PathBuf;
use std::time::Duration;

use starling_controlplane::limits::RateLimit;
use starling_controlplane::trust::PeerAddrCheck;
use starling_controlplane::{ControlPlane, DatabaseConfig};

use super::BenchError;

/// Flags of the embedded child (the subset the bench passes).
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Address to listen on.
    pub listen: std::net::SocketAddr,
    /// SQLite directory (when no `database_url`).
    pub data_dir: PathBuf,
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// Admin key (also accepted on EdgeService).
    pub admin_key: String,
    /// Viewer heartbeat / node report interval.
    pub heartbeat_interval: Duration,
    /// TLS certificate chain and key files (PEM); `None`: plaintext (the bench's
    /// explicit opt-in).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Serves until the process is killed.
pub async fn serve(cfg: EmbeddedConfig) -> Result<(), BenchError> {
    let mut config = starling_controlplane::Config::new(
        cfg.listen,
        DatabaseConfig::from_url_or_data_dir(cfg.database_url.as_deref(), &cfg.data_dir),
    );
    config.auth.admin_key = Some(cfg.admin_key.clone());
    config.auth.node_key = Some(cfg.admin_key);
    config.service.heartbeat_interval = cfg.heartbeat_interval;
    config.service.trust.peer_addr_check = PeerAddrCheck::Off;
    config.service.limits.join = RateLimit::per_second(0.0, 1);
    config.service.limits.unknown_session_lookups = RateLimit::per_second(0.0, 1);
    config.tls = cfg.tls.map(|(cert, key)| {
        starling_controlplane::ServerTls::new(starling_controlplane::TlsIdentity::Files {
            cert,
            key,
        })
    });
    let cp = ControlPlane::bind(config)
        .await
        .map_err(|e| BenchError::Setup(format!("control plane: {e}")))?;
    eprintln!(
        "starling-controlplane (embedded): backend {}, listening on {} (gRPC)",
        cp.backend_name(),
        cp.local_addr()
    );
    cp.run(std::future::pending::<()>())
        .await
        .map_err(|e| BenchError::Setup(format!("control plane: {e}")))
}
