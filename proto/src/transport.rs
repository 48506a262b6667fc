//! Client side of gRPC transport security, shared by every client of the control plane
//! (data-plane nodes, the SDK, `starling-admin`, the load test): [`Transport`] says how a
//! control-plane URL is reached (TLS with a trust choice, or plaintext, which must be
//! asked for), and [`endpoint`] builds the tonic `Endpoint` for a URL, refusing a URL
//! whose scheme does not match the transport (`http://` without the plaintext opt-in,
//! `https://` with it).
//!
//! Trust: the PEM CA certificates of [`ClientTls::ca_pem`] (and only those), or, when
//! none are given, the Mozilla root store compiled in through `webpki-roots` (the
//! system's store is not read: see ARCHITECTURE.md, "TLS").

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Environment variable of the binaries' `--insecure-plaintext` flag.
pub const INSECURE_PLAINTEXT_ENV: &str = "STARLING_INSECURE_PLAINTEXT";

/// How a client reaches the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TLS (`https://` URLs only), the server verified as [`ClientTls`] says.
    Tls(ClientTls),
    /// Plain HTTP/2 (`http://` URLs only): the explicit, insecure opt-in. Bearer
    /// credentials and chunk keys cross the network in clear.
    Plaintext,
}

impl Default for Transport {
    /// TLS, trusting the built-in web PKI roots.
    fn default() -> Self {
        Transport::Tls(ClientTls::default())
    }
}

/// TLS settings of a client.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificates to trust instead of the built-in roots (`--ca-file`);
    /// `None`: the built-in web PKI roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate to present (mutual TLS, data-plane nodes).
    pub identity: Option<ClientIdentity>,
    /// Name the server's certificate must carry, when not the URL's host.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("identity", &self.identity)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// Trusting only the CA certificates in `ca_pem` (PEM).
    pub fn with_ca_pem(ca_pem: impl Into<Vec<u8>>) -> ClientTls {
        ClientTls {
            ca_pem: Some(ca_pem.into()),
            ..ClientTls::default()
        }
    }
}

/// A client certificate chain and its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain, leaf first (PEM).
    pub cert_pem: Vec<u8>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity(<redacted>)")
    }
}

/// Why a client endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URL does not parse.
    #[error("control URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// The parser's reason.
        reason: String,
    },
    /// An `http://` URL without the plaintext opt-in.
    #[error(
        "plaintext control URL {url:?} refused: use https://, or opt in to plaintext explicitly \
         (--insecure-plaintext / {INSECURE_PLAINTEXT_ENV}=1; Transport::Plaintext in the library)"
    )]
    PlaintextRefused {
        /// The URL.
        url: String,
    },
    /// An `https://` URL with the plaintext transport.
    #[error("control URL {url:?} is https:// but the transport is plaintext")]
    TlsUrlWithPlaintext {
        /// The URL.
        url: String,
    },
    /// Neither `http://` nor `https://`.
    #[error(
        "control URL {url:?}: the scheme must be https:// (or http:// with the plaintext opt-in)"
    )]
    BadScheme {
        /// The URL.
        url: String,
    },
    /// A certificate or key file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file (`CA file`, `client certificate`, ...).
        what: &'static str,
        /// Its path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Invalid TLS settings (e.g. a client certificate without its key).
    #[error("TLS settings: {0}")]
    Config(String),
    /// tonic refused the TLS configuration.
    #[error("TLS setup for {url:?}: {reason}")]
    Tls {
        /// The URL.
        url: String,
        /// tonic's reason.
        reason: String,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl Transport {
    /// The transport a binary's flags ask for, for `url`: an `https://` URL gets TLS
    /// (trusting `ca_file`, else the built-in roots; presenting `client_cert` and
    /// `client_key` when given); an `http://` URL gets plaintext only when
    /// `insecure_plaintext` is set.
    ///
    /// # Errors
    /// An unreadable file, a certificate without its key (or the reverse), or an
    /// `http://` URL without `insecure_plaintext`.
    pub fn from_flags(
        url: &str,
        ca_file: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
        insecure_plaintext: bool,
    ) -> Result<Transport, TransportError> {
        if url.starts_with("http://") {
            return if insecure_plaintext {
                Ok(Transport::Plaintext)
            } else {
                Err(TransportError::PlaintextRefused { url: url.into() })
            };
        }
        let identity = match (client_cert, client_key) {
            (Some(c), Some(k)) => Some(ClientIdentity {
                cert_pem: read("client certificate", c)?,
                key_pem: read("client key", k)?,
            }),
            (None, None) => None,
            _ => {
                return Err(TransportError::Config(
                    "a client certificate needs its key (and the reverse)".into(),
                ));
            }
        };
        Ok(Transport::Tls(ClientTls {
            ca_pem: ca_file.map(|p| read("CA file", p)).transpose()?,
            identity,
            server_name: None,
        }))
    }

    /// True for [`Transport::Plaintext`].
    pub fn is_plaintext(&self) -> bool {
        matches!(self, Transport::Plaintext)
    }
}

static WARNED_PLAINTEXT: AtomicBool = AtomicBool::new(false);

/// A tonic endpoint for the control plane at `url`, secured as `transport` says (the
/// caller adds its timeouts and keep-alives). Logs a WARN line (once per process) when
/// the transport is plaintext.
///
/// # Errors
/// A URL that does not parse or whose scheme does not match `transport`, or TLS
/// settings tonic refuses.
pub fn endpoint(url: &str, transport: &Transport) -> Result<Endpoint, TransportError> {
    let (scheme, _) = url
        .split_once("://")
        .ok_or_else(|| TransportError::BadScheme { url: url.into() })?;
    let scheme = scheme.to_ascii_lowercase();
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| TransportError::BadUrl {
        url: url.into(),
        reason: e.to_string(),
    })?;
    match (scheme.as_str(), transport) {
        ("http", Transport::Plaintext) => {
            if !WARNED_PLAINTEXT.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    %url,
                    "connecting to the control plane in PLAINTEXT (insecure opt-in): \
                     credentials and chunk keys are not protected"
                );
            }
            Ok(endpoint)
        }
        ("http", Transport::Tls(_)) => Err(TransportError::PlaintextRefused { url: url.into() }),
        ("https", Transport::Plaintext) => {
            Err(TransportError::TlsUrlWithPlaintext { url: url.into() })
        }
        ("https", Transport::Tls(tls)) => {
            let mut config = ClientTlsConfig::new();
            config = match &tls.ca_pem {
                Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
                None => config.with_webpki_roots(),
            };
            if let Some(id) = &tls.identity {
                config = config.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.clone());
            }
            endpoint
                .tls_config(config)
                .map_err(|e| TransportError::Tls {
                    url: url.into(),
                    reason: error_chain(&e),
                })
        }
        _ => Err(TransportError::BadScheme { url: url.into() }),
    }
}

/// `e` and its sources, joined with ": " (tonic's transport errors hide the TLS
/// reason in their source chain).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_must_match_the_transport() {
        let tls = Transport::default();
        assert!(matches!(
            endpoint("http://127.0.0.1:1", &tls),
            Err(TransportError::PlaintextRefused { .. })
        ));
        assert!(matches!(
            endpoint("https://127.0.0.1:1", &Transport::Plaintext),
            Err(TransportError::TlsUrlWithPlaintext { .. })
        ));
        assert!(matches!(
            endpoint("ftp://x", &tls),
            Err(TransportError::BadScheme { .. })
        ));
        assert!(endpoint("http://127.0.0.1:1", &Transport::Plaintext).is_ok());
        assert!(endpoint("https://127.0.0.1:1", &tls).is_ok());
    }

    #[test]
    fn flags_refuse_plaintext_without_the_opt_in() {
        assert!(matches!(
            Transport::from_flags("http://h:1", None, None, None, false),
            Err(TransportError::PlaintextRefused { .. })
        ));
        assert_eq!(
            Transport::from_flags("http://h:1", None, None, None, true).ok(),
            Some(Transport::Plaintext)
        );
        assert_eq!(
            Transport::from_flags("https://h:1", None, None, None, true).ok(),
            Some(Transport::default())
        );
        assert!(matches!(
            Transport::from_flags("https://h:1", None, Some(Path::new("c")), None, false),
            Err(TransportError::Config(_))
        ));
    }
}
