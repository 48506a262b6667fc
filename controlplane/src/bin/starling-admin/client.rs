//! How `starling-admin` reaches the control plane: the connection flags, the bearer
//! token (--admin-jwt, else --admin-key, else the key file), the AdminService client,
//! and the failures that decide the exit status.

use std::path::PathBuf;
use std::time::Duration;

use starling_proto::transport::{Transport, endpoint, error_chain};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where the control plane writes its zero-setup admin key by default.
const DEFAULT_ADMIN_KEY_FILE: &str = "./starling-data/admin.key";

/// Connection and authentication flags, shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnArgs {
    /// Control-plane gRPC URL.
    #[arg(
        long,
        env = "STARLING_CONTROL_URL",
        default_value = "https://127.0.0.1:7000",
        global = true
    )]
    pub control_url: String,

    /// Deadline of each gRPC call (e.g. 10s, 500ms).
    #[arg(long, env = "STARLING_ADMIN_CALL_TIMEOUT", default_value = "10s", value_parser = starling_proto::time::parse_duration, global = true)]
    pub call_timeout: Duration,

    /// An admin JWT (`role: "admin"`, signed with a key the control plane trusts via
    /// --admin-jwt-key). Takes precedence over the admin key.
    #[arg(
        long,
        env = "STARLING_ADMIN_JWT",
        hide_env_values = true,
        global = true
    )]
    pub admin_jwt: Option<String>,

    /// The control plane's static admin key (zero-setup mode).
    #[arg(
        long,
        env = "STARLING_ADMIN_KEY",
        hide_env_values = true,
        global = true
    )]
    pub admin_key: Option<String>,

    /// File holding the static admin key [default: ./starling-data/admin.key when it
    /// exists].
    #[arg(long, env = "STARLING_ADMIN_KEY_FILE", global = true)]
    pub admin_key_file: Option<PathBuf>,

    /// CA certificates (PEM) that verify the control plane's TLS certificate, instead
    /// of the built-in web PKI roots.
    #[arg(long, env = "STARLING_CA_FILE", value_name = "FILE", global = true)]
    pub ca_file: Option<PathBuf>,

    /// Allow an http:// --control-url: INSECURE, the admin credential crosses the
    /// network in clear.
    #[arg(long, env = "STARLING_INSECURE_PLAINTEXT", global = true,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_plaintext: bool,
}

/// Why a command failed; `main` maps it to the exit status.
#[derive(Debug)]
pub enum Failure {
    /// A call failed with this gRPC status (exit 1).
    Status(tonic::Status),
    /// No connection, or nothing to authenticate with (exit 1).
    Connect(String),
    /// `wait` gave up (exit 3).
    Timeout(String),
    /// Flags that parse but make no sense together (exit 2, like clap's errors).
    Usage(String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Status(s)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            Failure::Connect(m) | Failure::Timeout(m) | Failure::Usage(m) => f.write_str(m),
        }
    }
}

/// Adds `authorization: Bearer …` to every call (nothing when no token was found: the
/// control plane then answers UNAUTHENTICATED with a hint).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// The AdminService client every subcommand uses.
pub type Client = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// The bearer token: --admin-jwt, else --admin-key, else the key file.
fn bearer(args: &ConnArgs) -> Result<Bearer, Failure> {
    let token = if let Some(jwt) = args.admin_jwt.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(jwt.trim().to_string())
    } else if let Some(key) = args.admin_key.as_deref().filter(|s| !s.trim().is_empty()) {
        Some(key.trim().to_string())
    } else {
        let (path, explicit) = match &args.admin_key_file {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_ADMIN_KEY_FILE), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Failure::Connect(format!(
                    "cannot read admin key file {}: {e}",
                    path.display()
                )));
            }
        }
    };
    match token {
        None => Ok(Bearer(None)),
        Some(t) => {
            let mut v: MetadataValue<Ascii> = format!("Bearer {t}").parse().map_err(|_| {
                Failure::Connect("the admin key/JWT must be printable ASCII".into())
            })?;
            v.set_sensitive(true);
            Ok(Bearer(Some(v)))
        }
    }
}

static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Connects to --control-url (TLS, or plaintext with --insecure-plaintext) with the
/// bearer token.
pub async fn connect(args: &ConnArgs) -> Result<Client, Failure> {
    let bearer = bearer(args)?;
    let transport = Transport::from_flags(
        &args.control_url,
        args.ca_file.as_deref(),
        None,
        None,
        args.insecure_plaintext,
    )
    .map_err(|e| Failure::Connect(e.to_string()))?;
    if transport.is_plaintext() && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "starling-admin: WARNING: plaintext connection to {} (--insecure-plaintext): the \
             admin credential crosses the network in clear",
            args.control_url
        );
    }
    let endpoint = endpoint(&args.control_url, &transport)
        .map_err(|e| Failure::Connect(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(args.call_timeout);
    let channel = endpoint.connect().await.map_err(|e| {
        Failure::Connect(format!(
            "cannot connect to {}: {}",
            args.control_url,
            error_chain(&e)
        ))
    })?;
    Ok(AdminServiceClient::with_interceptor(channel, bearer))
}
