//! The load test's TLS: a throwaway PKI made at start ([`starling_testpki`]: root CA →
//! intermediate → a `localhost`/`127.0.0.1` server leaf) for in-process control planes,
//! the client [`Transport`] that trusts its root only, and [`channel`], the one way the
//! harness opens a gRPC channel to a control plane (TLS or the explicit plaintext
//! opt-in, as the transport says).

use starling_controlplane::{ServerTls, TlsIdentity};
use starling_proto::transport::{ClientTls, Transport, endpoint, error_chain};
use tonic::transport::Channel;

use crate::error::HarnessError;

/// A throwaway CA and the server certificate of an in-process control plane.
pub struct ThrowawayTls {
    root_pem: String,
    server: starling_testpki::Leaf,
}

impl std::fmt::Debug for ThrowawayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThrowawayTls")
    }
}

impl ThrowawayTls {
    /// Makes a fresh root, intermediate and loopback server leaf.
    ///
    /// # Errors
    /// Certificate generation failed.
    pub fn new() -> Result<ThrowawayTls, HarnessError> {
        let pki = starling_testpki::Pki::new("starling-loadtest")
            .map_err(|e| HarnessError::Start(format!("throwaway CA: {e}")))?;
        let server = pki
            .loopback_server(1)
            .map_err(|e| HarnessError::Start(format!("throwaway server certificate: {e}")))?;
        Ok(ThrowawayTls {
            root_pem: pki.root_pem(),
            server,
        })
    }

    /// The root CA certificate (PEM), the only one clients trust.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The control plane's TLS settings (leaf + intermediate, in memory).
    pub fn server_tls(&self) -> ServerTls {
        ServerTls::new(TlsIdentity::Pem {
            cert: self.server.chain_pem.clone().into_bytes(),
            key: self.server.key_pem.clone().into_bytes(),
        })
    }

    /// The server leaf (chain and key), e.g. to write as files.
    pub fn server_leaf(&self) -> &starling_testpki::Leaf {
        &self.server
    }

    /// A client transport trusting this CA's root only.
    pub fn transport(&self) -> Transport {
        Transport::Tls(ClientTls::with_ca_pem(self.root_pem.clone().into_bytes()))
    }
}

/// A connected channel to the control plane at `url`.
///
/// # Errors
/// The URL does not match the transport, or the connection (or its TLS handshake)
/// failed.
pub async fn channel(url: &str, transport: &Transport) -> Result<Channel, HarnessError> {
    endpoint(url, transport)
        .map_err(|e| HarnessError::Config(e.to_string()))?
        .connect()
        .await
        .map_err(|e| HarnessError::Start(format!("connecting to {url}: {}", error_chain(&e))))
}

/// A lazily connected channel to `url` (connects on first use).
///
/// # Errors
/// The URL does not match the transport.
pub fn lazy_channel(url: &str, transport: &Transport) -> Result<Channel, HarnessError> {
    Ok(endpoint(url, transport)
        .map_err(|e| HarnessError::Config(e.to_string()))?
        .connect_lazy())
}

/// What a worker process is told of the transport: the CA to trust (`None`: the
/// built-in roots) and the plaintext opt-in.
pub fn hello_fields(transport: &Transport) -> (Option<String>, bool) {
    match transport {
        Transport::Plaintext => (None, true),
        Transport::Tls(t) => (
            t.ca_pem
                .as_ref()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            false,
        ),
    }
}

/// The transport a worker process uses, from its hello's `ca_pem` and
/// `insecure_plaintext` (the inverse of [`hello_fields`]).
pub fn hello_transport(ca_pem: Option<&str>, insecure_plaintext: bool) -> Transport {
    if insecure_plaintext {
        Transport::Plaintext
    } else {
        Transport::Tls(ClientTls {
            ca_pem: ca_pem.map(|p| p.as_bytes().to_vec()),
            ..ClientTls::default()
        })
    }
}
