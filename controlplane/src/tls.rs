//! gRPC over TLS: the control plane's own rustls acceptor (ring backend, ALPN `h2`),
//! fed to tonic's `serve_with_incoming`.
//!
//! * The certificate is chosen per handshake by [`ReloadingResolver`], whose chain and key
//!   can be swapped while serving: [`TlsServer::reload`] re-reads the PEM files; the
//!   reload task calls it on SIGHUP and when either file's modification time or size
//!   changes (polled every [`ServerTls::reload_poll`]). A pair that does not load (bad
//!   PEM, key not matching the certificate) is logged and the old one is kept.
//!   Established connections keep the certificate they were made with.
//! * Optional client certificates (mutual TLS for data-plane nodes): with
//!   [`ServerTls::client_ca_pem`] the server asks every client for a certificate and
//!   verifies one that is sent against that CA (a bad one fails the handshake); a client
//!   without one is still accepted (viewers), and `EdgeService` refuses it when
//!   [`ServerTls::require_node_client_cert`] is set (see `crate::auth::NodeInterceptor`).
//! * Handshakes run in their own tasks (at most [`MAX_HANDSHAKES`] at once, each bounded
//!   by [`HANDSHAKE_TIMEOUT`]), so a slow client holds up no one; a failed handshake is
//!   logged at debug level and never reaches tonic.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Most TLS handshakes in progress at once (more connections wait in the accept queue).
pub const MAX_HANDSHAKES: usize = 256;
/// A handshake not done within this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval of the certificate files' change check.
pub const DEFAULT_RELOAD_POLL: Duration = Duration::from_secs(2);

/// Where the server's certificate chain and key come from.
#[derive(Clone)]
pub enum TlsIdentity {
    /// PEM files (`--tls-cert`, `--tls-key`), reloaded on SIGHUP or change.
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// PEM in memory (in-process servers: tests, the load test); never reloaded.
    Pem {
        /// Certificate chain, leaf first.
        cert: Vec<u8>,
        /// Private key.
        key: Vec<u8>,
    },
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsIdentity::Files { cert, key } => f
                .debug_struct("Files")
                .field("cert", cert)
                .field("key", key)
                .finish(),
            TlsIdentity::Pem { .. } => f.write_str("Pem(<redacted>)"),
        }
    }
}

/// TLS settings of the gRPC listener.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's certificate and key.
    pub identity: TlsIdentity,
    /// CA certificates (PEM) that verify client certificates (`--tls-client-ca`);
    /// `None`: no client certificates are asked for.
    pub client_ca_pem: Option<Vec<u8>>,
    /// `EdgeService` calls without a verified client certificate are refused
    /// (UNAUTHENTICATED). Needs [`ServerTls::client_ca_pem`].
    pub require_node_client_cert: bool,
    /// How often the certificate files are checked for a change.
    pub reload_poll: Duration,
}

impl ServerTls {
    /// TLS with `identity`, no client certificates.
    pub fn new(identity: TlsIdentity) -> ServerTls {
        ServerTls {
            identity,
            client_ca_pem: None,
            require_node_client_cert: false,
            reload_poll: DEFAULT_RELOAD_POLL,
        }
    }
}

/// Why TLS could not be set up (or a new certificate could not be loaded).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No certificate in the PEM.
    #[error("no certificate found in the TLS certificate PEM{0}")]
    NoCertificate(String),
    /// No usable private key in the PEM.
    #[error("no private key found in the TLS key PEM{0}")]
    NoKey(String),
    /// The key does not load or does not match the certificate.
    #[error("TLS certificate and key: {0}")]
    Key(rustls::Error),
    /// The client CA PEM has no usable certificate.
    #[error("client CA: {0}")]
    ClientCa(String),
    /// `require_node_client_cert` without a client CA.
    #[error("requiring node client certificates needs a client CA (--tls-client-ca)")]
    RequireWithoutCa,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn where_(path: Option<&Path>) -> String {
    path.map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

/// Parses a PEM chain and key into a key rustls can serve (checked to match).
fn certified_key(
    provider: &CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
    paths: Option<(&Path, &Path)>,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(where_(paths.map(|p| p.0))));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::NoKey(format!("{}: {e}", where_(paths.map(|p| p.1)))))?;
    CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Key)
}

/// The server certificate in use, swappable while serving.
#[derive(Debug)]
pub struct ReloadingResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingResolver {
    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().clone()
    }

    fn set(&self, key: CertifiedKey) {
        *self.current.write() = Arc::new(key);
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The gRPC listener's TLS: acceptor, certificate resolver and reload source.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: TlsAcceptor,
    resolver: Arc<ReloadingResolver>,
    provider: Arc<CryptoProvider>,
    files: Option<(PathBuf, PathBuf)>,
    reload_poll: Duration,
    require_node_client_cert: bool,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("files", &self.files)
            .field("require_node_client_cert", &self.require_node_client_cert)
            .finish()
    }
}

impl TlsServer {
    /// Loads the certificate (and the client CA) and builds the acceptor.
    ///
    /// # Errors
    /// Unreadable or unusable PEM, a key that does not match, or
    /// `require_node_client_cert` without a client CA.
    pub fn new(config: &ServerTls) -> Result<TlsServer, TlsError> {
        let provider = provider();
        let (key, files) = match &config.identity {
            TlsIdentity::Files { cert, key } => (
                certified_key(&provider, &read(cert)?, &read(key)?, Some((cert, key)))?,
                Some((cert.clone(), key.clone())),
            ),
            TlsIdentity::Pem { cert, key } => (certified_key(&provider, cert, key, None)?, None),
        };
        let resolver = Arc::new(ReloadingResolver {
            current: RwLock::new(Arc::new(key)),
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = match &config.client_ca_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| TlsError::ClientCa(e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(TlsError::ClientCa("no certificate in the PEM".into()));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        // Viewers have no certificate; EdgeService checks for one.
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None if config.require_node_client_cert => return Err(TlsError::RequireWithoutCa),
            None => builder.with_no_client_auth(),
        };
        let mut server_config = builder.with_cert_resolver(resolver.clone());
        server_config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsServer {
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            resolver,
            provider,
            files,
            reload_poll: config.reload_poll.max(Duration::from_millis(100)),
            require_node_client_cert: config.require_node_client_cert,
        })
    }

    /// Whether `EdgeService` requires a verified client certificate.
    pub fn require_node_client_cert(&self) -> bool {
        self.require_node_client_cert
    }

    /// The certificate chain served now (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.resolver.current().cert.clone()
    }

    /// Re-reads the certificate files and serves the new pair to new connections.
    /// Returns `false` for an in-memory identity (nothing to reload).
    ///
    /// # Errors
    /// The new pair does not load; the old one stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some((cert, key)) = &self.files else {
            return Ok(false);
        };
        let new = certified_key(&self.provider, &read(cert)?, &read(key)?, Some((cert, key)))?;
        self.resolver.set(new);
        Ok(true)
    }

    /// Spawns the reload task (SIGHUP and file changes); `None` for an in-memory
    /// identity.
    pub(crate) fn spawn_reloader(&self) -> Option<tokio::task::JoinHandle<()>> {
        let (cert, key) = self.files.clone()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            reload_loop(this, cert, key).await;
        }))
    }

    /// Accepts TCP connections on `listener` and hands the completed TLS streams to the
    /// returned stream (for tonic's `serve_with_incoming`); the accept task ends when
    /// the stream is dropped.
    pub(crate) fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        tokio::spawn(accept_loop(listener, acceptor, tx));
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

type Handoff = tokio::sync::mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>;

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, tx: Handoff) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let acquired = tokio::select! {
            () = tx.closed() => return,
            p = permits.clone().acquire_owned() => p,
        };
        let Ok(permit) = acquired else {
            return;
        };
        let accepted = tokio::select! {
            () = tx.closed() => return,
            a = listener.accept() => a,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // E.g. out of file descriptors: back off a little.
                tracing::warn!(error = %e, "accepting a gRPC connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(stream)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        });
    }
}

/// Modification time and size of both files (`None` where unreadable).
type Stamp = [Option<(SystemTime, u64)>; 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    [one(cert), one(key)]
}

async fn reload_loop(server: TlsServer, cert: PathBuf, key: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still polled");
            None
        }
    };
    let mut last = stamp(&cert, &key);
    loop {
        let why = tokio::select! {
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            () = tokio::time::sleep(server.reload_poll) => {
                let now = stamp(&cert, &key);
                if now == last {
                    continue;
                }
                "file change"
            }
        };
        last = stamp(&cert, &key);
        match server.reload() {
            Ok(_) => tracing::info!(
                trigger = why,
                cert = %cert.display(),
                "TLS certificate reloaded; new connections use it"
            ),
            Err(e) => tracing::error!(
                trigger = why,
                error = %e,
                "new TLS certificate refused; still serving the previous one"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused() {
        let p = provider();
        assert!(matches!(
            certified_key(&p, b"nothing", b"nothing", None),
            Err(TlsError::NoCertificate(_))
        ));
    }
}
