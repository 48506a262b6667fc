//! Who may call what: the admin interceptor on `AdminService`, the node interceptor on
//! `EdgeService` and the viewer credential check of `ViewerService.Join`.
//!
//! * **Admin calls** need `authorization: Bearer <token>` where the token is either an
//!   admin JWT (`role: "admin"`, verified with the configured admin public keys, see
//!   [`crate::credential`]) or the static admin key (compared in constant time). The
//!   static key is the **zero-setup mode**: the binary generates one at first start
//!   (`<data-dir>/admin.key`, mode 0600) when no admin credential is configured.
//!   Missing or bad → `UNAUTHENTICATED`; an authentic JWT without the admin role →
//!   `PERMISSION_DENIED`. Messages never echo the token or the key.
//! * **Data-plane nodes** (every `EdgeService` call: `Register`, `Commands`,
//!   `ReportHealth`) need `authorization: Bearer <credential>`. Preferably a **per-node
//!   credential** (`stn1.NAME.SECRET`, made by `starling-admin node add NAME`, stored as
//!   a SHA-256 of the secret, revocable): this interceptor only parses it
//!   ([`NodeIdentity::Credential`]); the service checks it against the database and
//!   binds it to the node named NAME (`crate::service`). **Legacy / zero-setup mode**:
//!   the static node key
//!   ([`AuthConfig::node_key`], compared in constant time) or any admin credential (an
//!   admin can already point a broadcast at any source, so it loses nothing by being
//!   allowed to act as a node). The binary falls back to the static admin key as the node
//!   key when none is configured (zero-setup: nodes then hold the admin key). A node
//!   registered this way publishes a chunk-signing key that every viewer trusts, so the
//!   node key is as sensitive as the chunk-signing keys themselves.
//! * **Viewers** of a non-public broadcast present a JWT minted by the broadcaster's
//!   backend (`JoinRequest.credential`), verified with the configured viewer keys
//!   (EdDSA, RS256...). Public broadcasts need none (a credential is then ignored).
//!   `ViewerService` is not authenticated at the gRPC layer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::credential::{
    AuthStatus, CredentialError, CredentialKey, CredentialVerifier, DEFAULT_LEEWAY_SECS, JwtPolicy,
    KeyConfigError, ViewerClaims,
};

/// Bytes of randomness in a generated admin key (encoded as 43 base64url characters).
pub const ADMIN_KEY_BYTES: usize = 32;
/// Shortest static admin key accepted.
pub const MIN_ADMIN_KEY_LEN: usize = 16;
/// The message of a missing or non-bearer `authorization` header.
pub const NEEDS_BEARER: &str =
    "admin call needs `authorization: Bearer …` (an admin JWT or the admin key)";
/// The message of an `EdgeService` call without a bearer `authorization` header.
pub const NEEDS_NODE_BEARER: &str = "data-plane node call needs `authorization: Bearer <node key>` \
     (start the data plane with --node-key or --node-key-file, env STARLING_NODE_KEY)";

/// Credentials configuration of the control plane (built by the binary from its flags,
/// or by tests and the load generator).
#[derive(Clone)]
pub struct AuthConfig {
    /// The static admin key accepted as a bearer token. **Zero-setup mode**: anyone who
    /// holds it is an admin; prefer admin JWT keys in production. `None` = only admin
    /// JWTs (and no admin access at all when `admin_jwt_keys` is empty too).
    pub admin_key: Option<String>,
    /// Public keys that verify admin JWTs (`role: "admin"` required).
    pub admin_jwt_keys: Vec<CredentialKey>,
    /// Public keys that verify viewer JWTs (the broadcaster's backend keys). Empty: only
    /// public broadcasts can be joined.
    pub viewer_jwt_keys: Vec<CredentialKey>,
    /// Clock skew tolerated on `exp`/`nbf`/`iat` of JWTs.
    pub leeway: Duration,
    /// The `aud`, `iss` and longest lifetime viewer JWTs must have (audience and issuer
    /// required when `viewer_jwt_keys` is not empty).
    pub viewer_jwt: JwtPolicy,
    /// The same for admin JWTs (required when `admin_jwt_keys` is not empty).
    pub admin_jwt: JwtPolicy,
    /// Start by adding a new chunk-token signing key (the previous ones stay valid for one
    /// token lifetime); see [`crate::tokens`].
    pub rotate_token_key: bool,
    /// The static node key that data-plane nodes send as a bearer on every
    /// `EdgeService` call (at least 16 printable characters). Whoever holds it can
    /// register a node and so sign chunks viewers accept. Admin credentials are accepted
    /// too; `None` = only admin credentials (in-process deployments give their nodes the
    /// admin key).
    pub node_key: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<redacted>"))
            .field("admin_jwt_keys", &self.admin_jwt_keys)
            .field("viewer_jwt_keys", &self.viewer_jwt_keys)
            .field("leeway", &self.leeway)
            .field("viewer_jwt", &self.viewer_jwt)
            .field("admin_jwt", &self.admin_jwt)
            .field("rotate_token_key", &self.rotate_token_key)
            .field("node_key", &self.node_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for AuthConfig {
    /// No admin credential at all (every admin call is refused), no viewer keys (only
    /// public broadcasts), default leeway.
    fn default() -> Self {
        AuthConfig {
            admin_key: None,
            admin_jwt_keys: Vec::new(),
            viewer_jwt_keys: Vec::new(),
            leeway: Duration::from_secs(DEFAULT_LEEWAY_SECS),
            viewer_jwt: JwtPolicy::viewer_default(),
            admin_jwt: JwtPolicy::admin_default(),
            rotate_token_key: false,
            node_key: None,
        }
    }
}

impl AuthConfig {
    /// Zero-setup: a fresh random static admin key (read it back from `admin_key` to
    /// call the admin API), no JWT keys.
    pub fn with_random_admin_key() -> Self {
        AuthConfig {
            admin_key: Some(generate_admin_key()),
            ..AuthConfig::default()
        }
    }
}

/// Problems with the credentials configuration.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// A configured key is unusable.
    #[error(transparent)]
    Key(#[from] KeyConfigError),
    /// The static admin key is too short.
    #[error("the admin key must be at least {MIN_ADMIN_KEY_LEN} characters")]
    WeakAdminKey,
    /// JWT keys of a kind are configured, but not the audience or issuer its JWTs must
    /// name: a credential minted for any other service would be accepted.
    #[error(
        "{kind} JWT keys are configured but no {claim} is: set {flag} (the `{claim}` every \
         {kind} JWT must carry)"
    )]
    JwtClaimUnset {
        kind: &'static str,
        claim: &'static str,
        flag: &'static str,
    },
    /// The static admin key cannot travel in an HTTP header.
    #[error("the admin key must be printable ASCII without spaces")]
    BadAdminKey,
    /// The static node key is too short.
    #[error("the node key must be at least {MIN_ADMIN_KEY_LEN} characters")]
    WeakNodeKey,
    /// The static node key cannot travel in an HTTP header.
    #[error("the node key must be printable ASCII without spaces")]
    BadNodeKey,
    /// The admin key file could not be read or written.
    #[error("admin key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM key file could not be parsed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
}

/// A fresh random admin key: 32 random bytes, base64url (43 characters).
pub fn generate_admin_key() -> String {
    let mut bytes = [0u8; ADMIN_KEY_BYTES];
    // SystemRandom fails only without an OS RNG; fall back to a UUIDv4 pair (also OS
    // randomness via getrandom) rather than panicking.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    URL_SAFE_NO_PAD.encode(bytes)
}

fn check_admin_key(key: &str) -> Result<(), AuthConfigError> {
    if key.len() < MIN_ADMIN_KEY_LEN {
        return Err(AuthConfigError::WeakAdminKey);
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthConfigError::BadAdminKey);
    }
    Ok(())
}

/// Zero-setup mode: reads the admin key from `path`, or generates one and writes it there
/// (mode 0600, directory created). Returns the key and whether it was created.
///
/// # Errors
/// The file cannot be read or written, or holds an unusable key.
pub fn load_or_create_admin_key(path: &Path) -> Result<(String, bool), AuthConfigError> {
    let io = |source| AuthConfigError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let key = s.trim().to_string();
            check_admin_key(&key)?;
            return Ok((key, false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let key = generate_admin_key();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut f) => {
            use std::io::Write as _;
            f.write_all(format!("{key}\n").as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((key, true))
        }
        // Someone else created it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let key = std::fs::read_to_string(path)
                .map_err(io)?
                .trim()
                .to_string();
            check_admin_key(&key)?;
            Ok((key, false))
        }
        Err(e) => Err(io(e)),
    }
}

/// Reads a PEM public key file for JWT verification: Ed25519 (EdDSA) or RSA (RS256).
///
/// # Errors
/// The file cannot be read, or is neither an Ed25519 nor an RSA public key.
pub fn read_jwt_key_pem(path: &Path) -> Result<CredentialKey, AuthConfigError> {
    let pem = std::fs::read(path).map_err(|source| AuthConfigError::KeyFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jwt_key_pem(&pem).map_err(|reason| AuthConfigError::Pem {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses a PEM public key: Ed25519 → EdDSA, RSA → RS256.
///
/// # Errors
/// Neither an Ed25519 nor an RSA public key.
pub fn parse_jwt_key_pem(pem: &[u8]) -> Result<CredentialKey, String> {
    if let Ok(k) = CredentialKey::ed25519_pem(pem) {
        return Ok(k);
    }
    CredentialKey::rsa_pem(jsonwebtoken::Algorithm::RS256, pem).map_err(|_| {
        "not an Ed25519 or RSA public key in PEM (`-----BEGIN PUBLIC KEY-----`)".to_string()
    })
}

/// Compares two secrets without leaking where they differ (or their lengths): both are
/// hashed, and the digests compared with a branch-free fold.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (digest(&SHA256, a), digest(&SHA256, b));
    let diff = da
        .as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The verified credentials configuration shared by the interceptors and the services.
#[derive(Debug)]
pub struct Authenticator {
    admin_key_digest: Option<Vec<u8>>,
    node_key_digest: Option<Vec<u8>>,
    verifier: CredentialVerifier,
    has_admin_jwt_keys: bool,
    has_viewer_keys: bool,
}

/// Who made an admin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminIdentity {
    /// The static admin key (zero-setup mode).
    StaticKey,
    /// An admin JWT with this subject.
    Jwt(String),
}

/// Prefix of a per-node credential: `stn1.NAME.SECRET` (SECRET: 32 random bytes,
/// base64url).
pub const NODE_CREDENTIAL_PREFIX: &str = "stn1.";
/// Longest node name a credential may carry.
pub const MAX_NODE_NAME: usize = 64;

/// A per-node credential as presented: the node name it claims and the SHA-256 of its
/// secret. Not checked yet: the service compares it with the stored hash.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeClaim {
    /// The node name the credential was made for.
    pub name: String,
    /// SHA-256 of the secret part.
    pub secret_sha256: [u8; 32],
}

impl std::fmt::Debug for NodeClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClaim")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Whether `name` can name a node credential: 1..=[`MAX_NODE_NAME`] of
/// `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A new credential for node `name` and the SHA-256 of its secret (what the database
/// keeps). `None` for an invalid name.
pub fn new_node_credential(name: &str) -> Option<(String, [u8; 32])> {
    if !valid_node_name(name) {
        return None;
    }
    let secret = generate_admin_key();
    let mut h = [0u8; 32];
    h.copy_from_slice(digest(&SHA256, secret.as_bytes()).as_ref());
    Some((format!("{NODE_CREDENTIAL_PREFIX}{name}.{secret}"), h))
}

/// Parses a presented per-node credential (`None`: not one).
pub fn parse_node_credential(token: &str) -> Option<NodeClaim> {
    let rest = token.strip_prefix(NODE_CREDENTIAL_PREFIX)?;
    let (name, secret) = rest.rsplit_once('.')?;
    if !valid_node_name(name) || secret.len() < MIN_ADMIN_KEY_LEN {
        return None;
    }
    let mut h = [0u8; 32];
    h.copy_from_slice(digest(&SHA256, secret.as_bytes()).as_ref());
    Some(NodeClaim {
        name: name.to_string(),
        secret_sha256: h,
    })
}

/// Who made an `EdgeService` call (the node interceptor adds it to the request's
/// extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdentity {
    /// A per-node credential, to be checked against the database by the service.
    Credential(NodeClaim),
    /// The static node key (legacy / zero-setup mode).
    NodeKey,
    /// An admin credential.
    Admin(AdminIdentity),
}

/// What [`Authenticator::check_viewer`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewerIdentity {
    /// A public broadcast: no credential needed (any given one is ignored).
    Anonymous,
    /// A verified credential.
    Credential(ViewerClaims),
}

use starling_proto::time::unix_secs as now_secs;

impl Authenticator {
    /// Validates the configuration.
    ///
    /// # Errors
    /// A weak or unprintable admin key, or too many keys.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, AuthConfigError> {
        let mut verifier = CredentialVerifier::new(config.leeway.as_secs());
        for (kind, keys, policy, flags) in [
            (
                "viewer",
                &config.viewer_jwt_keys,
                &config.viewer_jwt,
                ["--viewer-jwt-audience", "--viewer-jwt-issuer"],
            ),
            (
                "admin",
                &config.admin_jwt_keys,
                &config.admin_jwt,
                ["--admin-jwt-audience", "--admin-jwt-issuer"],
            ),
        ] {
            if keys.is_empty() {
                continue;
            }
            let unset = |v: &Option<String>| v.as_deref().is_none_or(|s| s.trim().is_empty());
            if unset(&policy.audience) {
                return Err(AuthConfigError::JwtClaimUnset {
                    kind,
                    claim: "aud",
                    flag: flags[0],
                });
            }
            if unset(&policy.issuer) {
                return Err(AuthConfigError::JwtClaimUnset {
                    kind,
                    claim: "iss",
                    flag: flags[1],
                });
            }
        }
        verifier.set_viewer_policy(config.viewer_jwt.clone());
        verifier.set_admin_policy(config.admin_jwt.clone());
        for k in &config.admin_jwt_keys {
            verifier.add_admin_key(k.clone())?;
        }
        for k in &config.viewer_jwt_keys {
            verifier.add_viewer_key(k.clone())?;
        }
        let admin_key_digest = match &config.admin_key {
            Some(k) => {
                check_admin_key(k)?;
                Some(digest(&SHA256, k.as_bytes()).as_ref().to_vec())
            }
            None => None,
        };
        if admin_key_digest.is_none() && config.admin_jwt_keys.is_empty() {
            tracing::warn!(
                "no admin key and no admin JWT key configured: every admin call will be refused"
            );
        }
        let node_key_digest = match &config.node_key {
            Some(k) => {
                check_admin_key(k).map_err(|e| match e {
                    AuthConfigError::WeakAdminKey => AuthConfigError::WeakNodeKey,
                    _ => AuthConfigError::BadNodeKey,
                })?;
                Some(digest(&SHA256, k.as_bytes()).as_ref().to_vec())
            }
            None => None,
        };
        if node_key_digest.is_none()
            && admin_key_digest.is_none()
            && config.admin_jwt_keys.is_empty()
        {
            tracing::warn!(
                "no node key and no admin credential configured: every data-plane node will be \
                 refused"
            );
        }
        Ok(Authenticator {
            admin_key_digest,
            node_key_digest,
            verifier,
            has_admin_jwt_keys: !config.admin_jwt_keys.is_empty(),
            has_viewer_keys: !config.viewer_jwt_keys.is_empty(),
        })
    }

    /// Clock skew tolerated on JWT times, seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.verifier.leeway_secs()
    }

    /// Checks the `authorization` metadata of an admin call.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` (missing, malformed or bad token) or `PERMISSION_DENIED` (an
    /// authentic JWT without the admin role).
    pub fn check_admin(&self, authorization: Option<&[u8]>) -> Result<AdminIdentity, Status> {
        let token =
            bearer_token(authorization).ok_or_else(|| Status::unauthenticated(NEEDS_BEARER))?;
        if let Some(want) = &self.admin_key_digest {
            let got = digest(&SHA256, token.as_bytes());
            if constant_time_eq(got.as_ref(), want) {
                return Ok(AdminIdentity::StaticKey);
            }
        }
        let looks_like_jwt = token.bytes().filter(|&b| b == b'.').count() == 2;
        if !self.has_admin_jwt_keys || !looks_like_jwt {
            return Err(Status::unauthenticated(
                if self.admin_key_digest.is_none() && !self.has_admin_jwt_keys {
                    "admin token rejected: this control plane has no admin credential configured"
                } else {
                    "admin token rejected: not the admin key nor a valid admin JWT"
                },
            ));
        }
        match self.verifier.verify_admin(token, now_secs()) {
            Ok(c) => Ok(AdminIdentity::Jwt(c.subject)),
            Err(e) => Err(status_of(&e, "admin token rejected")),
        }
    }

    /// Checks the `authorization` metadata of an `EdgeService` call: the node key, or
    /// any admin credential ([`Authenticator::check_admin`]).
    ///
    /// # Errors
    /// `UNAUTHENTICATED` (missing, malformed or bad token) or `PERMISSION_DENIED` (an
    /// authentic JWT without the admin role). Messages never echo the token or a key.
    pub fn check_node(&self, authorization: Option<&[u8]>) -> Result<NodeIdentity, Status> {
        let token = bearer_token(authorization)
            .ok_or_else(|| Status::unauthenticated(NEEDS_NODE_BEARER))?;
        if token.starts_with(NODE_CREDENTIAL_PREFIX) {
            return parse_node_credential(token)
                .map(NodeIdentity::Credential)
                .ok_or_else(|| {
                    Status::unauthenticated(
                        "node credential rejected: malformed `stn1.` credential",
                    )
                });
        }
        if let Some(want) = &self.node_key_digest {
            let got = digest(&SHA256, token.as_bytes());
            if constant_time_eq(got.as_ref(), want) {
                return Ok(NodeIdentity::NodeKey);
            }
        }
        match self.check_admin(authorization) {
            Ok(admin) => Ok(NodeIdentity::Admin(admin)),
            Err(e) if e.code() == tonic::Code::PermissionDenied => Err(Status::permission_denied(
                format!("node credential rejected: {}", e.message()),
            )),
            Err(_) => Err(Status::unauthenticated(
                if self.node_key_digest.is_none()
                    && self.admin_key_digest.is_none()
                    && !self.has_admin_jwt_keys
                {
                    "node credential rejected: this control plane has no node key configured"
                } else {
                    "node credential rejected: not the control plane's node key (check the data \
                     plane's --node-key / --node-key-file)"
                },
            )),
        }
    }

    /// Checks a viewer's credential for `broadcast_id` (`public`: none needed).
    ///
    /// # Errors
    /// `UNAUTHENTICATED` (missing or bad credential) or `PERMISSION_DENIED` (a valid
    /// credential for another broadcast).
    pub fn check_viewer(
        &self,
        broadcast_id: &str,
        public: bool,
        credential: &str,
    ) -> Result<ViewerIdentity, Status> {
        if public {
            return Ok(ViewerIdentity::Anonymous);
        }
        if credential.trim().is_empty() {
            return Err(Status::unauthenticated(format!(
                "broadcast {broadcast_id} needs a viewer credential (a JWT from the broadcaster)"
            )));
        }
        if !self.has_viewer_keys {
            return Err(Status::unauthenticated(format!(
                "broadcast {broadcast_id} needs a viewer credential, and this control plane \
                 has no viewer key configured to verify one"
            )));
        }
        self.verifier
            .verify_viewer(credential, broadcast_id, now_secs())
            .map(ViewerIdentity::Credential)
            .map_err(|e| status_of(&e, "viewer credential rejected"))
    }
}

/// The token of an `authorization: Bearer <token>` header value, if any.
fn bearer_token(authorization: Option<&[u8]>) -> Option<&str> {
    authorization
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
}

fn status_of(e: &CredentialError, what: &str) -> Status {
    let msg = format!("{what}: {e}");
    match e.status() {
        AuthStatus::Unauthenticated => Status::unauthenticated(msg),
        AuthStatus::PermissionDenied => Status::permission_denied(msg),
    }
}

/// The tonic interceptor guarding `AdminService`.
#[derive(Debug, Clone)]
pub struct AdminInterceptor {
    auth: Arc<Authenticator>,
}

impl AdminInterceptor {
    /// Guards with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        AdminInterceptor { auth }
    }
}

impl tonic::service::Interceptor for AdminInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(MetadataValue::as_bytes);
        match self.auth.check_admin(header) {
            Ok(who) => {
                tracing::debug!(admin = ?who, "admin call authenticated");
                Ok(request)
            }
            Err(status) => {
                tracing::info!(
                    code = ?status.code(),
                    reason = status.message(),
                    remote = ?request.remote_addr(),
                    "admin call refused"
                );
                Err(status)
            }
        }
    }
}

/// The tonic interceptor guarding `EdgeService` (data-plane nodes): see
/// [`Authenticator::check_node`].
#[derive(Debug, Clone)]
pub struct NodeInterceptor {
    auth: Arc<Authenticator>,
    require_client_cert: bool,
}

impl NodeInterceptor {
    /// Guards with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        NodeInterceptor {
            auth,
            require_client_cert: false,
        }
    }

    /// Also refuses calls that came without a verified TLS client certificate
    /// (`--require-node-client-cert`; the handshake verified any certificate sent).
    pub fn require_client_cert(mut self, require: bool) -> Self {
        self.require_client_cert = require;
        self
    }
}

/// Message of the UNAUTHENTICATED status of a node call without a client certificate.
pub const NODE_CLIENT_CERT_REQUIRED: &str =
    "a verified TLS client certificate is required for data-plane nodes (mutual TLS)";

impl tonic::service::Interceptor for NodeInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if self.require_client_cert && request.peer_certs().is_none_or(|c| c.is_empty()) {
            tracing::warn!(
                remote = ?request.remote_addr(),
                "data-plane node call refused: no verified TLS client certificate"
            );
            return Err(Status::unauthenticated(NODE_CLIENT_CERT_REQUIRED));
        }
        let header = request
            .metadata()
            .get("authorization")
            .map(MetadataValue::as_bytes);
        match self.auth.check_node(header) {
            Ok(who) => {
                tracing::debug!(node = ?who, "node call authenticated");
                // The service checks a per-node credential and binds it to the node.
                request.extensions_mut().insert(who);
                Ok(request)
            }
            Err(status) => {
                tracing::warn!(
                    code = ?status.code(),
                    reason = status.message(),
                    remote = ?request.remote_addr(),
                    "data-plane node call refused"
                );
                Err(status)
            }
        }
    }
}

/// Client side: a tonic interceptor that adds `authorization: Bearer <token>` (an admin
/// key or an admin JWT), e.g. `AdminServiceClient::with_interceptor(channel, bearer)`.
#[derive(Clone)]
pub struct BearerInterceptor {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl std::fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerInterceptor(<redacted>)")
    }
}

impl BearerInterceptor {
    /// For `token` (printable ASCII).
    ///
    /// # Errors
    /// The token cannot travel in a header.
    pub fn new(token: &str) -> Result<Self, AuthConfigError> {
        let mut value: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| AuthConfigError::BadAdminKey)?;
        value.set_sensitive(true);
        Ok(BearerInterceptor { value })
    }
}

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.value.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tonic::Code;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn admin_key_checks() {
        let key = generate_admin_key();
        assert_eq!(key.len(), 43);
        let auth = Authenticator::new(&AuthConfig {
            admin_key: Some(key.clone()),
            ..AuthConfig::default()
        })
        .unwrap();
        let bearer = format!("Bearer {key}");
        assert_eq!(
            auth.check_admin(Some(bearer.as_bytes())).unwrap(),
            AdminIdentity::StaticKey
        );
        assert_eq!(
            auth.check_admin(Some(format!("bearer  {key} ").as_bytes()))
                .unwrap(),
            AdminIdentity::StaticKey
        );
        for bad in [None, Some(&b""[..]), Some(b"Basic abc"), Some(b"Bearer ")] {
            let e = auth.check_admin(bad).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            assert_eq!(e.message(), NEEDS_BEARER);
        }
        let e = auth
            .check_admin(Some(format!("Bearer {key}x").as_bytes()))
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(!e.message().contains(&key));
        // Nothing configured: refused with a clear reason.
        let none = Authenticator::new(&AuthConfig::default()).unwrap();
        let e = none.check_admin(Some(bearer.as_bytes())).unwrap_err();
        assert!(e.message().contains("no admin credential configured"));
        assert!(matches!(
            Authenticator::new(&AuthConfig {
                admin_key: Some("short".into()),
                ..AuthConfig::default()
            }),
            Err(AuthConfigError::WeakAdminKey)
        ));
    }

    #[test]
    fn node_key_checks() {
        let admin = generate_admin_key();
        let node = generate_admin_key();
        let auth = Authenticator::new(&AuthConfig {
            admin_key: Some(admin.clone()),
            node_key: Some(node.clone()),
            ..AuthConfig::default()
        })
        .unwrap();
        assert_eq!(
            auth.check_node(Some(format!("Bearer {node}").as_bytes()))
                .unwrap(),
            NodeIdentity::NodeKey
        );
        // An admin may act as a node.
        assert_eq!(
            auth.check_node(Some(format!("Bearer {admin}").as_bytes()))
                .unwrap(),
            NodeIdentity::Admin(AdminIdentity::StaticKey)
        );
        // ...but the node key is no admin credential.
        let e = auth
            .check_admin(Some(format!("Bearer {node}").as_bytes()))
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        for bad in [None, Some(&b""[..]), Some(b"Basic abc"), Some(b"Bearer ")] {
            let e = auth.check_node(bad).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            assert_eq!(e.message(), NEEDS_NODE_BEARER);
        }
        let e = auth
            .check_node(Some(format!("Bearer {node}x").as_bytes()))
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("node key"), "{}", e.message());
        assert!(!e.message().contains(&node) && !e.message().contains(&admin));
        // Nothing configured: every node refused, with a clear reason.
        let none = Authenticator::new(&AuthConfig::default()).unwrap();
        let e = none
            .check_node(Some(format!("Bearer {node}").as_bytes()))
            .unwrap_err();
        assert!(e.message().contains("no node key configured"));
        for (key, want) in [
            ("short", "at least"),
            ("has a space in it, long enough", "printable"),
        ] {
            let e = Authenticator::new(&AuthConfig {
                node_key: Some(key.into()),
                ..AuthConfig::default()
            })
            .unwrap_err();
            assert!(matches!(
                e,
                AuthConfigError::WeakNodeKey | AuthConfigError::BadNodeKey
            ));
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn admin_key_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("admin.key");
        let (k1, created) = load_or_create_admin_key(&path).unwrap();
        assert!(created);
        let (k2, created) = load_or_create_admin_key(&path).unwrap();
        assert!(!created);
        assert_eq!(k1, k2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn public_broadcast_ignores_credentials_and_private_needs_one() {
        let auth = Authenticator::new(&AuthConfig::default()).unwrap();
        assert_eq!(
            auth.check_viewer("b", true, "garbage").unwrap(),
            ViewerIdentity::Anonymous
        );
        let e = auth.check_viewer("b", false, "").unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(
            e.message()
                .contains("broadcast b needs a viewer credential")
        );
        let e = auth.check_viewer("b", false, "a.b.c").unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }

    #[test]
    fn bearer_interceptor_redacts() {
        let b = BearerInterceptor::new("secret-secret-secret").unwrap();
        assert!(!format!("{b:?}").contains("secret"));
        assert!(BearerInterceptor::new("bad\nkey").is_err());
    }
}
