//! Throwaway public-key infrastructure for the demo and the tests: a root CA, an
//! intermediate CA signed by it, and leaves signed by the intermediate (server
//! certificates for `localhost`/`127.0.0.1`, client certificates for mutual TLS), all
//! made in memory at start with rcgen (ring backend, ECDSA P-256) and written as PEM
//! files on demand. A client trusts [`Pki::root_pem`] only; a server presents
//! [`Leaf::chain_pem`] (leaf, then intermediate), so every handshake verifies a real
//! chain. Nothing here is meant for production certificates.

use std::path::{Path, PathBuf};

use base64::Engine as _;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen failed (a bad name, a key generation failure).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A root CA and an intermediate CA under it.
pub struct Pki {
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki(<throwaway CA>)")
    }
}

/// A leaf certificate with its chain and private key.
#[derive(Clone)]
pub struct Leaf {
    /// The leaf, then the intermediate CA (PEM).
    pub chain_pem: String,
    /// The leaf's private key (PKCS#8 PEM).
    pub key_pem: String,
    /// The leaf alone (DER), e.g. to compare with the certificate a server presented.
    pub der: Vec<u8>,
    /// The leaf's serial number.
    pub serial: u64,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Leaf(serial {})", self.serial)
    }
}

fn ca_params(name: &str, path_len: Option<u8>) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Starling throwaway CA");
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl Pki {
    /// A fresh root ("`name` root CA") and intermediate ("`name` intermediate CA").
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn new(name: &str) -> Result<Pki, PkiError> {
        let root = CertifiedIssuer::self_signed(
            ca_params(&format!("{name} root CA"), None)?,
            KeyPair::generate()?,
        )?;
        let intermediate = CertifiedIssuer::signed_by(
            ca_params(&format!("{name} intermediate CA"), Some(0))?,
            KeyPair::generate()?,
            &root,
        )?;
        Ok(Pki { root, intermediate })
    }

    /// The root CA certificate (PEM): what clients trust (`--ca-file`).
    pub fn root_pem(&self) -> String {
        pem("CERTIFICATE", self.root.der())
    }

    /// The intermediate CA certificate (PEM).
    pub fn intermediate_pem(&self) -> String {
        pem("CERTIFICATE", self.intermediate.der())
    }

    fn leaf(
        &self,
        names: &[&str],
        serial: u64,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Leaf, PkiError> {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.intermediate)?;
        Ok(Leaf {
            chain_pem: format!(
                "{}{}",
                pem("CERTIFICATE", cert.der()),
                self.intermediate_pem()
            ),
            key_pem: pem("PRIVATE KEY", &key.serialize_der()),
            der: cert.der().to_vec(),
            serial,
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by the
    /// intermediate, with serial number `serial`.
    ///
    /// # Errors
    /// A name that is not a valid DNS name, or a signing failure.
    pub fn server(&self, names: &[&str], serial: u64) -> Result<Leaf, PkiError> {
        self.leaf(names, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A server certificate for this machine's loopback names (`localhost`,
    /// `127.0.0.1`, `::1`).
    ///
    /// # Errors
    /// As [`Pki::server`].
    pub fn loopback_server(&self, serial: u64) -> Result<Leaf, PkiError> {
        self.server(&["localhost", "127.0.0.1", "::1"], serial)
    }

    /// A client certificate (mutual TLS) named `name`, signed by the intermediate.
    ///
    /// # Errors
    /// As [`Pki::server`].
    pub fn client(&self, name: &str, serial: u64) -> Result<Leaf, PkiError> {
        self.leaf(&[name], serial, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// `der` as a PEM block with `label` (RFC 7468: base64 in 64-character lines).
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `text` to `path`.
///
/// # Errors
/// The file could not be written.
pub fn write(path: &Path, text: &str) -> Result<(), PkiError> {
    std::fs::write(path, text).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}

impl Leaf {
    /// Writes `{dir}/{stem}.crt` (the chain) and `{dir}/{stem}.key`; returns both paths.
    ///
    /// # Errors
    /// A file could not be written.
    pub fn write_to(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write(&cert, &self.chain_pem)?;
        write(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_intermediate() {
        let pki = Pki::new("test").unwrap_or_else(|e| panic!("{e}"));
        let leaf = pki.loopback_server(7).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(leaf.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(leaf.chain_pem.ends_with(&pki.intermediate_pem()));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
        assert_ne!(pki.root_pem(), pki.intermediate_pem());
        assert!(!leaf.der.is_empty());
    }
}
