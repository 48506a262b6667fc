//! `starling-admin`: command-line client of the Starling AdminService.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::{
    Broadcast, BroadcastRef, BroadcastState, CreateBroadcastRequest, ListBroadcastsRequest,
    RevokeViewerRequest, SourceHealth,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Where the control plane writes its zero-setup admin key by default.
const DEFAULT_ADMIN_KEY_FILE: &str = "./starling-data/admin.key";

/// Starling admin CLI: create, start, stop, inspect and wait for broadcasts.
///
/// Exit status: 0 on success, 1 when a call fails (the gRPC status is printed on
/// stderr), 2 on bad usage, 3 when `wait` times out.
///
/// Scripting: `id=$(starling-admin create --name radio --source http://host:8000/live --id-only)`
///
/// Authentication: every call carries `authorization: Bearer <token>`, from --admin-jwt,
/// else --admin-key, else the file --admin-key-file (by default
/// ./starling-data/admin.key, which a zero-setup control plane started in the same
/// directory writes).
#[derive(Debug, Parser)]
#[command(name = "starling-admin", version, about, long_about)]
struct Args {
    /// Control-plane gRPC URL.
    #[arg(
        long,
        env = "STARLING_CONTROL_URL",
        default_value = "http://127.0.0.1:7000",
        global = true
    )]
    control_url: String,

    /// Deadline of each gRPC call (e.g. 10s, 500ms).
    #[arg(long, env = "STARLING_ADMIN_CALL_TIMEOUT", default_value = "10s", value_parser = starling_proto::time::parse_duration, global = true)]
    call_timeout: Duration,

    /// An admin JWT (`role: "admin"`, signed with a key the control plane trusts via
    /// --admin-jwt-key). Takes precedence over the admin key.
    #[arg(
        long,
        env = "STARLING_ADMIN_JWT",
        hide_env_values = true,
        global = true
    )]
    admin_jwt: Option<String>,

    /// The control plane's static admin key (zero-setup mode).
    #[arg(
        long,
        env = "STARLING_ADMIN_KEY",
        hide_env_values = true,
        global = true
    )]
    admin_key: Option<String>,

    /// File holding the static admin key [default: ./starling-data/admin.key when it
    /// exists].
    #[arg(long, env = "STARLING_ADMIN_KEY_FILE", global = true)]
    admin_key_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a broadcast. Prints its id alone on the first line of stdout, then the
    /// details (or only the id with --id-only, or JSON with --json).
    Create {
        /// Human-readable name (1..=200 bytes).
        #[arg(long)]
        name: String,
        /// http:// URL of the live source (Icecast mount, HTTP origin...). https:// is
        /// not supported by ingest yet.
        #[arg(long)]
        source: String,
        /// Target chunk duration in ms (100..=10000; default 1000).
        #[arg(long)]
        chunk_ms: Option<u32>,
        /// Number of substreams for the peer grid (1..=64; default 8).
        #[arg(long)]
        substreams: Option<u32>,
        /// Viewers may join without a credential (demos, open streams).
        #[arg(long)]
        public: bool,
        /// Print only the new id.
        #[arg(long, conflicts_with = "json")]
        id_only: bool,
        /// Print the broadcast as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a broadcast (CREATED or STOPPED -> LIVE; no-op when already LIVE).
    Start {
        /// Broadcast id.
        id: String,
        /// Print the broadcast as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a broadcast (-> STOPPED): ingest stops, viewer sessions end.
    Stop {
        /// Broadcast id.
        id: String,
        /// Print the broadcast as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one broadcast.
    Get {
        /// Broadcast id.
        id: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a viewer of a broadcast: by credential subject (every session of that
    /// viewer) or by session id. Its token is no longer renewed, the data plane drops it
    /// at once, peers drop it when told and at the latest when its token expires.
    Revoke {
        /// Broadcast id.
        id: String,
        /// The `sub` claim of the viewer's credential.
        #[arg(long, required_unless_present = "session", conflicts_with = "session")]
        subject: Option<String>,
        /// One session id.
        #[arg(long)]
        session: Option<String>,
    },
    /// List broadcasts (created and live; --all adds stopped ones).
    List {
        /// Include stopped broadcasts.
        #[arg(long)]
        all: bool,
        /// Print as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Poll a broadcast until its source health (and optionally state) matches, e.g.
    /// `wait ID --health up --timeout 30s`. Connection errors are retried until the
    /// timeout. Exits 3 on timeout.
    Wait {
        /// Broadcast id.
        id: String,
        /// Source health to wait for.
        #[arg(long, value_enum, default_value_t = HealthArg::Up)]
        health: HealthArg,
        /// Also require this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Give up after this long (e.g. 30s, 2m, 500ms).
        #[arg(long, default_value = "30s", value_parser = starling_proto::time::parse_duration)]
        timeout: Duration,
        /// Polling interval.
        #[arg(long, default_value = "250ms", value_parser = starling_proto::time::parse_duration)]
        interval: Duration,
        /// Print the broadcast as JSON once it matches.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HealthArg {
    Unknown,
    Connecting,
    Up,
    Down,
}

impl HealthArg {
    fn proto(self) -> SourceHealth {
        match self {
            HealthArg::Unknown => SourceHealth::Unknown,
            HealthArg::Connecting => SourceHealth::Connecting,
            HealthArg::Up => SourceHealth::Up,
            HealthArg::Down => SourceHealth::Down,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StateArg {
    Created,
    Live,
    Stopped,
}

impl StateArg {
    fn proto(self) -> BroadcastState {
        match self {
            StateArg::Created => BroadcastState::Created,
            StateArg::Live => BroadcastState::Live,
            StateArg::Stopped => BroadcastState::Stopped,
        }
    }
}

fn state_str(v: i32) -> &'static str {
    match BroadcastState::try_from(v) {
        Ok(BroadcastState::Created) => "created",
        Ok(BroadcastState::Live) => "live",
        Ok(BroadcastState::Stopped) => "stopped",
        _ => "unspecified",
    }
}

fn health_str(v: i32) -> &'static str {
    match SourceHealth::try_from(v) {
        Ok(SourceHealth::Unknown) => "unknown",
        Ok(SourceHealth::Connecting) => "connecting",
        Ok(SourceHealth::Up) => "up",
        Ok(SourceHealth::Down) => "down",
        _ => "unspecified",
    }
}

fn to_json(b: &Broadcast) -> serde_json::Value {
    serde_json::json!({
        "id": b.id,
        "name": b.name,
        "source_url": b.source_url,
        "chunk_duration_ms": b.chunk_duration_ms,
        "substreams": b.substreams,
        "state": state_str(b.state),
        "source_health": health_str(b.source_health),
        "source_error": b.source_error,
        "node_id": b.node_id,
        "node_wire_addr": b.node_wire_addr,
        "node_http_addr": b.node_http_addr,
        "viewers_now": b.viewers_now,
        "last_seq": b.last_seq,
        "content_type": b.content_type,
        "created_at_unix_ms": b.created_at_unix_ms,
        "updated_at_unix_ms": b.updated_at_unix_ms,
        "stream_kbps": b.stream_kbps,
        "peers": b.peers,
        "demand_slots": b.demand_slots,
        "peer_supply_slots": b.peer_supply_slots,
        "booster_slots": b.booster_slots,
        "booster_kbps": b.booster_kbps,
        "peer_share": b.peer_share,
        "max_depth": b.max_depth,
        "fluid_bound_kbps": b.fluid_bound_kbps,
        "public": b.public,
    })
}

fn print_details(b: &Broadcast) {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    println!("id:            {}", b.id);
    println!("name:          {}", b.name);
    println!("source_url:    {}", b.source_url);
    println!("state:         {}", state_str(b.state));
    println!(
        "public:        {}",
        if b.public {
            "yes"
        } else {
            "no (viewer credential needed)"
        }
    );
    println!("source_health: {}", health_str(b.source_health));
    if !b.source_error.is_empty() {
        println!("source_error:  {}", b.source_error);
    }
    println!("node:          {}", dash(&b.node_id));
    println!("node_wire:     {}", dash(&b.node_wire_addr));
    println!("node_http:     {}", dash(&b.node_http_addr));
    println!("chunk_ms:      {}", b.chunk_duration_ms);
    println!("substreams:    {}", b.substreams);
    println!("viewers_now:   {}", b.viewers_now);
    println!("last_seq:      {}", b.last_seq);
    println!("content_type:  {}", dash(&b.content_type));
    println!("stream_kbps:   {}", b.stream_kbps);
    println!(
        "grid:          {} peers, demand {} slots, peer supply {} slots, booster {} slots ({} kbps, fluid bound {} kbps), max depth {}",
        b.peers,
        b.demand_slots,
        b.peer_supply_slots,
        b.booster_slots,
        b.booster_kbps,
        b.fluid_bound_kbps,
        b.max_depth
    );
    println!("peer_share:    {:.1} %", b.peer_share * 100.0);
}

fn print_broadcast(b: &Broadcast, json: bool) {
    if json {
        println!("{}", to_json(b));
    } else {
        print_details(b);
    }
}

enum Failure {
    Status(tonic::Status),
    Connect(String),
    Timeout(String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Status(s)
    }
}

/// Adds `authorization: Bearer …` to every call (nothing when no token was found: the
/// control plane then answers UNAUTHENTICATED with a hint).
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

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

type Client = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// The bearer token: --admin-jwt, else --admin-key, else the key file.
fn bearer(args: &Args) -> Result<Bearer, Failure> {
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

async fn connect(args: &Args) -> Result<Client, Failure> {
    let bearer = bearer(args)?;
    let endpoint = Endpoint::from_shared(args.control_url.clone())
        .map_err(|e| {
            Failure::Connect(format!("invalid --control-url {:?}: {e}", args.control_url))
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(args.call_timeout);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure::Connect(format!("cannot connect to {}: {e}", args.control_url)))?;
    Ok(AdminServiceClient::with_interceptor(channel, bearer))
}

async fn run(args: Args) -> Result<(), Failure> {
    match &args.command {
        Cmd::Create {
            name,
            source,
            chunk_ms,
            substreams,
            public,
            id_only,
            json,
        } => {
            let mut client = connect(&args).await?;
            let b = client
                .create_broadcast(CreateBroadcastRequest {
                    name: name.clone(),
                    source_url: source.clone(),
                    chunk_duration_ms: chunk_ms.unwrap_or(0),
                    substreams: substreams.unwrap_or(0),
                    public: *public,
                })
                .await?
                .into_inner();
            if *json {
                println!("{}", to_json(&b));
            } else {
                println!("{}", b.id);
                if !*id_only {
                    print_details(&b);
                }
            }
        }
        Cmd::Start { id, json } => {
            let mut client = connect(&args).await?;
            let b = client
                .start_broadcast(BroadcastRef { id: id.clone() })
                .await?
                .into_inner();
            print_broadcast(&b, *json);
        }
        Cmd::Stop { id, json } => {
            let mut client = connect(&args).await?;
            let b = client
                .stop_broadcast(BroadcastRef { id: id.clone() })
                .await?
                .into_inner();
            print_broadcast(&b, *json);
        }
        Cmd::Get { id, json } => {
            let mut client = connect(&args).await?;
            let b = client
                .get_broadcast(BroadcastRef { id: id.clone() })
                .await?
                .into_inner();
            print_broadcast(&b, *json);
        }
        Cmd::Revoke {
            id,
            subject,
            session,
        } => {
            let mut client = connect(&args).await?;
            let r = client
                .revoke_viewer(RevokeViewerRequest {
                    broadcast_id: id.clone(),
                    subject: subject.clone().unwrap_or_default(),
                    session_id: session.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!("revoked {} session(s)", r.revoked_sessions);
        }
        Cmd::List { all, json } => {
            let mut client = connect(&args).await?;
            let list = client
                .list_broadcasts(ListBroadcastsRequest {
                    include_stopped: *all,
                })
                .await?
                .into_inner()
                .broadcasts;
            if *json {
                let arr: Vec<_> = list.iter().map(to_json).collect();
                println!("{}", serde_json::Value::Array(arr));
            } else {
                println!(
                    "{:<18} {:<8} {:<11} {:<20} {:>8}  NAME",
                    "ID", "STATE", "HEALTH", "NODE", "VIEWERS"
                );
                for b in &list {
                    println!(
                        "{:<18} {:<8} {:<11} {:<20} {:>8}  {}",
                        b.id,
                        state_str(b.state),
                        health_str(b.source_health),
                        if b.node_id.is_empty() {
                            "-"
                        } else {
                            &b.node_id
                        },
                        b.viewers_now,
                        b.name
                    );
                }
            }
        }
        Cmd::Wait {
            id,
            health,
            state,
            timeout,
            interval,
            json,
        } => {
            let deadline = Instant::now() + *timeout;
            let mut client: Option<Client> = None;
            let mut last = String::from("no answer yet");
            loop {
                if client.is_none() {
                    match connect(&args).await {
                        Ok(c) => client = Some(c),
                        Err(Failure::Connect(m)) => last = m,
                        Err(other) => return Err(other),
                    }
                }
                if let Some(c) = client.as_mut() {
                    match c.get_broadcast(BroadcastRef { id: id.clone() }).await {
                        Ok(resp) => {
                            let b = resp.into_inner();
                            let health_ok = b.source_health == health.proto() as i32;
                            let state_ok = state.is_none_or(|s| b.state == s.proto() as i32);
                            if health_ok && state_ok {
                                print_broadcast(&b, *json);
                                return Ok(());
                            }
                            last = format!(
                                "state {}, source health {}{}",
                                state_str(b.state),
                                health_str(b.source_health),
                                if b.source_error.is_empty() {
                                    String::new()
                                } else {
                                    format!(" ({})", b.source_error)
                                }
                            );
                        }
                        Err(s)
                            if matches!(
                                s.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::DeadlineExceeded
                                    | tonic::Code::Unknown
                            ) =>
                        {
                            last = format!("{:?}: {}", s.code(), s.message());
                        }
                        Err(s) => return Err(Failure::Status(s)),
                    }
                }
                if Instant::now() + *interval > deadline {
                    return Err(Failure::Timeout(format!(
                        "timed out after {timeout:?} waiting for broadcast {id} to have source health {}; last seen: {last}",
                        health_str(health.proto() as i32)
                    )));
                }
                tokio::time::sleep(*interval).await;
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Status(s)) => {
            eprintln!("starling-admin: {:?}: {}", s.code(), s.message());
            ExitCode::from(1)
        }
        Err(Failure::Connect(m)) => {
            eprintln!("starling-admin: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Timeout(m)) => {
            eprintln!("starling-admin: {m}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
