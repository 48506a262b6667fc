//! Viewer and admin credentials: JWTs minted by the broadcaster's own backend.
//!
//! The control plane verifies them with the broadcaster's configured public key(s):
//! EdDSA (Ed25519), RS256/384/512, PS256/384/512, ES256/ES384 from PEM, and HS256 from
//! a shared secret for the zero-setup default only ([`CredentialKey::static_hmac_secret`]:
//! whoever knows the secret can mint any credential).
//!
//! Claims:
//! - viewer: `sub` (string), `broadcast` (a broadcast id, or `"*"` for every
//!   broadcast), `exp`; optional `nbf`, `iat`.
//! - admin: `sub`, `role: "admin"`, `exp`; optional `nbf`, `iat`. Admin tokens are
//!   checked against the admin key set only (which may hold the same key as the
//!   viewer set: the `role` claim is always required).
//! - both, per kind ([`JwtPolicy`]): `aud` (a string, or an array holding it) and `iss`
//!   equal to the configured audience and issuer (required once configured; the
//!   control plane refuses to start with keys but no audience or issuer), and a bounded
//!   lifetime: `exp - iat` (or `exp - now` without `iat`) at most `max_lifetime`
//!   (default 24 h for viewers, 1 h for admins). A credential minted for another
//!   service, by another issuer, or for ever, is refused.
//!
//! `jsonwebtoken` checks the JWS structure, the algorithm and the signature; time and
//! claim checks are done here against an explicit `now` (testable, and each failure
//! gets its own [`CredentialError`]). Error messages never contain the token, the key
//! or the secret.
//!
//! Crypto backend: the workspace builds `jsonwebtoken` with exactly one backend,
//! `rust_crypto` (RustCrypto's ed25519-dalek, rsa, p256/p384, hmac), which it selects
//! by itself; nothing needs to be installed at start-up.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

mod policy;
pub use policy::JwtPolicy;
use policy::check_policy;

/// Longest credential accepted (bytes); longer input is refused before decoding.
pub const MAX_JWT_LEN: usize = 8 * 1024;
/// Most keys per key set.
pub const MAX_KEYS: usize = 16;
/// Longest `sub` accepted.
pub const MAX_SUBJECT: usize = 256;
/// Longest broadcast id (the wire's `MAX_BROADCAST_ID`).
pub const MAX_BROADCAST_ID: usize = 128;
/// `broadcast` claim value granting every broadcast.
pub const ANY_BROADCAST: &str = "*";
/// Default clock-skew leeway, seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 60;
/// Default longest lifetime (`exp - iat`) of a viewer credential: 24 h.
pub const DEFAULT_VIEWER_MAX_LIFETIME_SECS: u64 = 24 * 3600;
/// Default longest lifetime of an admin credential: 1 h.
pub const DEFAULT_ADMIN_MAX_LIFETIME_SECS: u64 = 3600;

/// How a failure should be reported to the caller (gRPC status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStatus {
    /// No valid credential: gRPC `UNAUTHENTICATED`.
    Unauthenticated,
    /// A valid credential that does not allow this: gRPC `PERMISSION_DENIED`.
    PermissionDenied,
}

/// Why a credential is refused. Messages help the caller and never include the token,
/// the key or the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("no credential given")]
    Missing,
    #[error("credential longer than {MAX_JWT_LEN} bytes")]
    TooLarge,
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
    /// The `alg` is not one this deployment accepts (or `none`).
    #[error("credential algorithm {alg:?} is not accepted here (accepted: {accepted})")]
    UnsupportedAlgorithm { alg: String, accepted: String },
    /// The `kid` names no configured key.
    #[error("credential names an unknown key id")]
    UnknownKey,
    #[error("credential signature is not valid for the configured key")]
    BadSignature,
    #[error("credential expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired { exp: u64, now: u64, leeway: u64 },
    #[error("credential not valid before {not_before} (now {now}, leeway {leeway}s)")]
    NotYetValid {
        not_before: u64,
        now: u64,
        leeway: u64,
    },
    #[error("credential lacks the {0:?} claim")]
    MissingClaim(&'static str),
    #[error("credential claim {claim:?} is invalid: {reason}")]
    InvalidClaim {
        claim: &'static str,
        reason: &'static str,
    },
    #[error("credential is not for this broadcast")]
    WrongBroadcast,
    #[error("credential does not carry role \"admin\"")]
    NotAdmin,
    /// `aud` does not name this service's configured audience.
    #[error("credential is for another audience (aud must be the configured audience)")]
    WrongAudience,
    /// `iss` is not the configured issuer.
    #[error("credential is from another issuer (iss must be the configured issuer)")]
    WrongIssuer,
    /// `exp - iat` (or `exp - now`) is beyond the configured maximum.
    #[error("credential lives {lifetime}s, longer than the {max}s allowed")]
    LifetimeTooLong { lifetime: u64, max: u64 },
    #[error("no key is configured for this kind of credential")]
    NoKeyConfigured,
}

impl CredentialError {
    pub fn status(&self) -> AuthStatus {
        match self {
            CredentialError::WrongBroadcast | CredentialError::NotAdmin => {
                AuthStatus::PermissionDenied
            }
            _ => AuthStatus::Unauthenticated,
        }
    }
}

/// Configuration-time problems (never shown to viewers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyConfigError {
    #[error("not a valid {0} public key PEM")]
    InvalidPem(&'static str),
    #[error("algorithm {0:?} does not fit this kind of key")]
    AlgorithmMismatch(Algorithm),
    #[error("HMAC secret must be at least 32 bytes")]
    WeakSecret,
    #[error("too many keys (at most {MAX_KEYS})")]
    TooManyKeys,
}

/// One trusted verification key, with its algorithm and optional key id.
#[derive(Clone)]
pub struct CredentialKey {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

impl std::fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl CredentialKey {
    /// An Ed25519 public key in PEM (`-----BEGIN PUBLIC KEY-----`, SPKI).
    pub fn ed25519_pem(pem: &[u8]) -> Result<Self, KeyConfigError> {
        let key =
            DecodingKey::from_ed_pem(pem).map_err(|_| KeyConfigError::InvalidPem("Ed25519"))?;
        if key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(32) {
            return Err(KeyConfigError::InvalidPem("Ed25519"));
        }
        Ok(CredentialKey {
            alg: Algorithm::EdDSA,
            kid: None,
            key,
        })
    }

    /// An Ed25519 public key as its 32 raw bytes.
    pub fn ed25519_raw(public_key: &[u8]) -> Result<Self, KeyConfigError> {
        if public_key.len() != 32 {
            return Err(KeyConfigError::InvalidPem("Ed25519"));
        }
        Ok(CredentialKey {
            alg: Algorithm::EdDSA,
            kid: None,
            key: DecodingKey::from_ed_der(public_key),
        })
    }

    /// An RSA public key in PEM (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`), for
    /// `alg` in RS256/384/512 or PS256/384/512 (the `rsa` crate accepts moduli up to 4096 bits).
    pub fn rsa_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, KeyConfigError> {
        if alg.family() != AlgorithmFamily::Rsa {
            return Err(KeyConfigError::AlgorithmMismatch(alg));
        }
        let key = DecodingKey::from_rsa_pem(pem).map_err(|_| KeyConfigError::InvalidPem("RSA"))?;
        Ok(CredentialKey {
            alg,
            kid: None,
            key,
        })
    }

    /// An EC public key in PEM, for ES256 (P-256) or ES384 (P-384).
    pub fn ec_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, KeyConfigError> {
        if alg.family() != AlgorithmFamily::Ec {
            return Err(KeyConfigError::AlgorithmMismatch(alg));
        }
        let key = DecodingKey::from_ec_pem(pem).map_err(|_| KeyConfigError::InvalidPem("EC"))?;
        Ok(CredentialKey {
            alg,
            kid: None,
            key,
        })
    }

    /// ZERO-SETUP DEFAULT ONLY: an HS256 shared secret (≥ 32 bytes). Anyone who holds
    /// it can mint any credential; use a broadcaster public key in production.
    pub fn static_hmac_secret(secret: &[u8]) -> Result<Self, KeyConfigError> {
        if secret.len() < 32 {
            return Err(KeyConfigError::WeakSecret);
        }
        Ok(CredentialKey {
            alg: Algorithm::HS256,
            kid: None,
            key: DecodingKey::from_secret(secret),
        })
    }

    /// Only tokens whose header `kid` equals `kid` (or that carry no `kid`) are tried
    /// against this key.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// What a viewer credential grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastGrant {
    Any,
    One(String),
}

/// A verified viewer credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerClaims {
    pub subject: String,
    pub broadcast: BroadcastGrant,
    /// Unix seconds.
    pub expires_at: u64,
    pub not_before: Option<u64>,
    pub issued_at: Option<u64>,
    pub key_id: Option<String>,
    pub algorithm: Algorithm,
}

/// A verified admin credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminClaims {
    pub subject: String,
    pub expires_at: u64,
    pub not_before: Option<u64>,
    pub issued_at: Option<u64>,
    pub key_id: Option<String>,
    pub algorithm: Algorithm,
}

/// Verifies viewer and admin JWTs against configured keys.
#[derive(Debug, Clone)]
pub struct CredentialVerifier {
    viewer_keys: Vec<CredentialKey>,
    admin_keys: Vec<CredentialKey>,
    leeway_secs: u64,
    viewer_policy: JwtPolicy,
    admin_policy: JwtPolicy,
}

impl Default for CredentialVerifier {
    fn default() -> Self {
        Self::new(DEFAULT_LEEWAY_SECS)
    }
}

struct Verified {
    claims: Map<String, Value>,
    kid: Option<String>,
    alg: Algorithm,
    subject: String,
    expires_at: u64,
    not_before: Option<u64>,
    issued_at: Option<u64>,
}

impl CredentialVerifier {
    /// No keys yet; `leeway_secs` of clock skew tolerated on `exp`, `nbf` and `iat`.
    pub fn new(leeway_secs: u64) -> Self {
        CredentialVerifier {
            viewer_keys: Vec::new(),
            admin_keys: Vec::new(),
            leeway_secs,
            viewer_policy: JwtPolicy::viewer_default(),
            admin_policy: JwtPolicy::admin_default(),
        }
    }

    /// What viewer credentials must say about audience, issuer and lifetime.
    pub fn set_viewer_policy(&mut self, policy: JwtPolicy) {
        self.viewer_policy = policy;
    }

    /// What admin credentials must say about audience, issuer and lifetime.
    pub fn set_admin_policy(&mut self, policy: JwtPolicy) {
        self.admin_policy = policy;
    }

    pub fn add_viewer_key(&mut self, key: CredentialKey) -> Result<(), KeyConfigError> {
        if self.viewer_keys.len() >= MAX_KEYS {
            return Err(KeyConfigError::TooManyKeys);
        }
        self.viewer_keys.push(key);
        Ok(())
    }

    pub fn add_admin_key(&mut self, key: CredentialKey) -> Result<(), KeyConfigError> {
        if self.admin_keys.len() >= MAX_KEYS {
            return Err(KeyConfigError::TooManyKeys);
        }
        self.admin_keys.push(key);
        Ok(())
    }

    /// Removes every viewer / admin key with this `kid`; returns how many went.
    pub fn remove_kid(&mut self, kid: &str) -> usize {
        let before = self.viewer_keys.len() + self.admin_keys.len();
        self.viewer_keys.retain(|k| k.kid.as_deref() != Some(kid));
        self.admin_keys.retain(|k| k.kid.as_deref() != Some(kid));
        before - self.viewer_keys.len() - self.admin_keys.len()
    }

    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Verifies a viewer credential for `broadcast_id` at `now_unix_secs`.
    pub fn verify_viewer(
        &self,
        jwt: &str,
        broadcast_id: &str,
        now_unix_secs: u64,
    ) -> Result<ViewerClaims, CredentialError> {
        let v = self.verify(jwt, &self.viewer_keys, &self.viewer_policy, now_unix_secs)?;
        let grant = match v.claims.get("broadcast") {
            None | Some(Value::Null) => return Err(CredentialError::MissingClaim("broadcast")),
            Some(Value::String(s)) if s == ANY_BROADCAST => BroadcastGrant::Any,
            Some(Value::String(s)) if s.is_empty() || s.len() > MAX_BROADCAST_ID => {
                return Err(CredentialError::InvalidClaim {
                    claim: "broadcast",
                    reason: "must be a broadcast id of 1 to 128 bytes or \"*\"",
                });
            }
            Some(Value::String(s)) => BroadcastGrant::One(s.clone()),
            Some(_) => {
                return Err(CredentialError::InvalidClaim {
                    claim: "broadcast",
                    reason: "must be a string",
                });
            }
        };
        if let BroadcastGrant::One(b) = &grant
            && b != broadcast_id
        {
            return Err(CredentialError::WrongBroadcast);
        }
        Ok(ViewerClaims {
            subject: v.subject,
            broadcast: grant,
            expires_at: v.expires_at,
            not_before: v.not_before,
            issued_at: v.issued_at,
            key_id: v.kid,
            algorithm: v.alg,
        })
    }

    /// Verifies an admin credential (admin key set, `role: "admin"` required).
    pub fn verify_admin(
        &self,
        jwt: &str,
        now_unix_secs: u64,
    ) -> Result<AdminClaims, CredentialError> {
        let v = self.verify(jwt, &self.admin_keys, &self.admin_policy, now_unix_secs)?;
        match v.claims.get("role") {
            Some(Value::String(r)) if r == "admin" => {}
            _ => return Err(CredentialError::NotAdmin),
        }
        Ok(AdminClaims {
            subject: v.subject,
            expires_at: v.expires_at,
            not_before: v.not_before,
            issued_at: v.issued_at,
            key_id: v.kid,
            algorithm: v.alg,
        })
    }

    fn verify(
        &self,
        jwt: &str,
        keys: &[CredentialKey],
        policy: &JwtPolicy,
        now: u64,
    ) -> Result<Verified, CredentialError> {
        let jwt = jwt.trim();
        if jwt.is_empty() {
            return Err(CredentialError::Missing);
        }
        if jwt.len() > MAX_JWT_LEN {
            return Err(CredentialError::TooLarge);
        }
        if keys.is_empty() {
            return Err(CredentialError::NoKeyConfigured);
        }
        let (alg, kid) = parse_header(jwt, keys)?;
        let candidates: Vec<&CredentialKey> = keys
            .iter()
            .filter(|k| k.alg == alg)
            .filter(|k| match (&k.kid, &kid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(CredentialError::UnknownKey);
        }
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let mut claims = None;
        for key in candidates {
            match jsonwebtoken::decode::<Value>(jwt, &key.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => continue,
                    ErrorKind::Base64(_) => {
                        return Err(CredentialError::Malformed("invalid base64url"));
                    }
                    ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                        return Err(CredentialError::Malformed("payload is not a JSON object"));
                    }
                    ErrorKind::InvalidToken => {
                        return Err(CredentialError::Malformed(
                            "expected header.payload.signature",
                        ));
                    }
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::UnsupportedAlgorithm
                    | ErrorKind::MissingAlgorithm => {
                        return Err(CredentialError::UnsupportedAlgorithm {
                            alg: alg_name(alg).to_owned(),
                            accepted: accepted(keys),
                        });
                    }
                    // Key material the backend rejected at verification time (e.g. an
                    // RSA modulus over 4096 bits) or a provider failure: not verified.
                    _ => continue,
                },
            }
        }
        let Some(Value::Object(claims)) = claims else {
            return Err(match claims {
                None => CredentialError::BadSignature,
                Some(_) => CredentialError::Malformed("payload is not a JSON object"),
            });
        };
        let leeway = self.leeway_secs;
        let expires_at =
            numeric_date(&claims, "exp")?.ok_or(CredentialError::MissingClaim("exp"))?;
        let not_before = numeric_date(&claims, "nbf")?;
        let issued_at = numeric_date(&claims, "iat")?;
        if now >= expires_at.saturating_add(leeway) {
            return Err(CredentialError::Expired {
                exp: expires_at,
                now,
                leeway,
            });
        }
        for t in [not_before, issued_at].into_iter().flatten() {
            if t > now.saturating_add(leeway) {
                return Err(CredentialError::NotYetValid {
                    not_before: t,
                    now,
                    leeway,
                });
            }
        }
        check_policy(&claims, policy, expires_at, issued_at, now)?;
        let subject = match claims.get("sub") {
            None | Some(Value::Null) => return Err(CredentialError::MissingClaim("sub")),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_SUBJECT => s.clone(),
            Some(_) => {
                return Err(CredentialError::InvalidClaim {
                    claim: "sub",
                    reason: "must be a string of 1 to 256 bytes",
                });
            }
        };
        Ok(Verified {
            claims,
            kid,
            alg,
            subject,
            expires_at,
            not_before,
            issued_at,
        })
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
        _ => "unknown",
    }
}

fn accepted(keys: &[CredentialKey]) -> String {
    let mut names: Vec<&str> = keys.iter().map(|k| alg_name(k.alg)).collect();
    names.sort_unstable();
    names.dedup();
    names.join(", ")
}

/// Reads `alg` and `kid` from the header ourselves, so that `none`, unknown and
/// unconfigured algorithms get a precise error.
fn parse_header(
    jwt: &str,
    keys: &[CredentialKey],
) -> Result<(Algorithm, Option<String>), CredentialError> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CredentialError::Malformed(
            "expected header.payload.signature",
        ));
    };
    let raw = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| CredentialError::Malformed("header is not base64url"))?;
    let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&raw) else {
        return Err(CredentialError::Malformed("header is not a JSON object"));
    };
    let alg_str = match header.get("alg") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(CredentialError::Malformed("header has no \"alg\"")),
    };
    let unsupported = || CredentialError::UnsupportedAlgorithm {
        // Attacker-chosen text: keep it short and printable.
        alg: alg_str
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(16)
            .collect(),
        accepted: accepted(keys),
    };
    let alg: Algorithm = alg_str.parse().map_err(|_| unsupported())?;
    if !keys.iter().any(|k| k.alg == alg) {
        return Err(unsupported());
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 256 => Some(s.clone()),
        Some(_) => {
            return Err(CredentialError::Malformed(
                "header \"kid\" is not a short string",
            ));
        }
    };
    Ok((alg, kid))
}

/// A NumericDate claim: a non-negative JSON number of seconds (fractions dropped).
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, CredentialError> {
    let invalid = CredentialError::InvalidClaim {
        claim: name,
        reason: "must be a non-negative number of seconds",
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if (0.0..1.8e19).contains(&f) => Ok(Some(f as u64)),
                    _ => Err(invalid),
                }
            }
        }
        Some(_) => Err(invalid),
    }
}

#[cfg(test)]
mod tests;
