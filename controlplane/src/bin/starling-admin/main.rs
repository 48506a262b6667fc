//! `starling-admin`: command-line client of the Starling AdminService.

mod audience;
mod client;
mod node;
mod show;
mod table;
mod top;
mod when;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use starling_proto::v1::{
    BroadcastRef, BroadcastState, CreateBroadcastRequest, ListBroadcastsRequest,
    RevokeViewerRequest, SourceHealth,
};

use client::{Client, ConnArgs, Failure, connect};
use show::{health_str, print_broadcast, print_details, state_str, to_json};

/// Starling admin CLI: create, start, stop, inspect and wait for broadcasts; watch them
/// live (`top`) and read their audience (`audience`).
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
    #[command(flatten)]
    conn: ConnArgs,

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
    /// Per-node credentials of data-plane nodes: `node add NAME` prints a new one,
    /// `node revoke NAME`, `node list`.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Audience roll-ups of a broadcast from viewer reports, per step: viewers (average
    /// and peak), watch time, peer share, server egress, peer bytes, rebuffer ratio,
    /// start-up p50/p95, then a total row over the whole range. Times are printed in UTC.
    Audience(audience::AudienceArgs),
    /// Live broadcasts and their peer-grid figures, refreshed every --interval: full
    /// screen on a terminal (Ctrl-C quits), repeated tables otherwise.
    Top(top::TopArgs),
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
            let mut client = connect(&args.conn).await?;
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
            let mut client = connect(&args.conn).await?;
            let b = client
                .start_broadcast(BroadcastRef { id: id.clone() })
                .await?
                .into_inner();
            print_broadcast(&b, *json);
        }
        Cmd::Stop { id, json } => {
            let mut client = connect(&args.conn).await?;
            let b = client
                .stop_broadcast(BroadcastRef { id: id.clone() })
                .await?
                .into_inner();
            print_broadcast(&b, *json);
        }
        Cmd::Get { id, json } => {
            let mut client = connect(&args.conn).await?;
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
            let mut client = connect(&args.conn).await?;
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
            let mut client = connect(&args.conn).await?;
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
        Cmd::Audience(a) => audience::run(&args.conn, a).await?,
        Cmd::Node(n) => node::run(&args.conn, n).await?,
        Cmd::Top(t) => top::run(&args.conn, t).await?,
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
                    match connect(&args.conn).await {
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
        Err(f) => {
            eprintln!("starling-admin: {f}");
            ExitCode::from(match f {
                Failure::Status(_) | Failure::Connect(_) => 1,
                Failure::Usage(_) => 2,
                Failure::Timeout(_) => 3,
            })
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
