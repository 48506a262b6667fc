//! Control-plane link (tokio + tonic): Register, hold the Commands stream, heartbeat
//! with ReportHealth. Re-registers with capped backoff on `known = false` or any stream
//! failure. The chunk path never depends on this: if the control plane is down,
//! ingests and viewers carry on.
//!
//! Every call carries `authorization: Bearer <node key>` ([`NodeInfo::node_key`]). A
//! control plane that refuses the credential (or the chunk key) is logged as an error
//! naming the fix, and the node keeps retrying with backoff: it never exits over it.

use crate::config::NodeKey;
use crate::ingest::{Backoff, IngestManager, IngestSpec};
use crate::ring::Registry;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::{
    CommandsRequest, HealthReport, IngestHealth, PublicKey, RegisterNodeRequest, node_command,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tracing::{error, info, warn};

/// What the node announces about itself.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_name: String,
    pub wire_addr: String,
    pub http_addr: String,
    pub cores: u32,
    pub capacity_viewers: u32,
    /// The key this node signs chunks with (announced in `Register`).
    pub chunk_key_id: u32,
    pub chunk_public_key: [u8; 32],
    /// Sent as `authorization: Bearer <key>` on every call; `None` = no credential.
    pub node_key: Option<NodeKey>,
    /// TLS (and the client certificate) or plaintext, for the control URL.
    pub transport: starling_proto::transport::Transport,
}

/// Why a control-plane session ended badly.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    /// The control plane refused this node (credential or chunk key): needs the
    /// operator, logged as an error.
    #[error("{0}")]
    Refused(String),
    /// Anything else (unreachable, stream broken...).
    #[error("{0}")]
    Other(String),
}

/// Classifies a failed `Register` / `Commands` call.
fn call_error(call: &str, status: &tonic::Status, node: &NodeInfo) -> LinkError {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            let fix = if status.message().contains("client certificate") {
                "start the node with --tls-client-cert and --tls-client-key (a certificate \
                 issued by the control plane's --tls-client-ca)"
            } else if node.node_key.is_none() {
                "this node has no node key: start it with --node-key or --node-key-file \
                 (env STARLING_NODE_KEY) set to the control plane's node key (zero-setup: \
                 the control plane's <data-dir>/admin.key)"
            } else {
                "check --node-key / --node-key-file (env STARLING_NODE_KEY) against the \
                 control plane's node key"
            };
            LinkError::Refused(format!(
                "{call}: the control plane refused this node's credential ({:?}: {}); {fix}; \
                 retrying",
                status.code(),
                status.message()
            ))
        }
        Code::AlreadyExists | Code::InvalidArgument => LinkError::Refused(format!(
            "{call}: the control plane refused this node ({:?}: {}); retrying",
            status.code(),
            status.message()
        )),
        _ => LinkError::Other(format!("{call}: {status}")),
    }
}

/// The `authorization` value sent with every call, if the node has a key.
fn bearer(node: &NodeInfo) -> Result<Option<MetadataValue<Ascii>>, LinkError> {
    node.node_key
        .as_ref()
        .map(|k| {
            let mut v: MetadataValue<Ascii> =
                format!("Bearer {}", k.expose()).parse().map_err(|_| {
                    LinkError::Refused("the node key cannot be sent in a header".into())
                })?;
            v.set_sensitive(true);
            Ok(v)
        })
        .transpose()
}

/// Builds the health report for every broadcast on this node.
pub fn health_report(node_id: &str, registry: &Registry) -> HealthReport {
    let mut ingests = Vec::new();
    let mut viewers = 0;
    for b in registry.all() {
        let s = b.status();
        viewers += s.viewers;
        ingests.push(IngestHealth {
            broadcast_id: s.broadcast_id,
            health: s.health.to_proto() as i32,
            error: s.error,
            last_seq: s.last_seq.unwrap_or(0),
            content_type: s.content_type,
            viewers: s.viewers,
            bitrate_kbps: b.stream_kbps(),
        });
    }
    HealthReport {
        node_id: node_id.to_owned(),
        ingests,
        viewers,
    }
}

/// Runs the link until `shutdown` flips to true.
pub async fn run(
    url: String,
    node: NodeInfo,
    registry: Arc<Registry>,
    ingest: Arc<IngestManager>,
    backoff_min: Duration,
    backoff_max: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(backoff_min, backoff_max);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let res = tokio::select! {
            r = session(&url, &node, &registry, &ingest) => r,
            _ = shutdown.changed() => return,
        };
        match res {
            Ok(()) => {
                // A session that ran (registered) resets the backoff.
                backoff.reset();
            }
            Err(LinkError::Refused(e)) => {
                error!(control = %url, error = %e, "control plane refused this node");
            }
            Err(LinkError::Other(e)) => {
                warn!(control = %url, error = %e, "control-plane link failed");
            }
        }
        let d = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One registration: returns `Ok` when the session ended in a way that calls for a
/// prompt re-registration (known=false, stream closed), `Err` on failures.
async fn session(
    url: &str,
    node: &NodeInfo,
    registry: &Registry,
    ingest: &IngestManager,
) -> Result<(), LinkError> {
    let endpoint = starling_proto::transport::endpoint(url, &node.transport)
        .map_err(|e| LinkError::Refused(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        LinkError::Other(format!(
            "connect: {}",
            starling_proto::transport::error_chain(&e)
        ))
    })?;
    let authorization = bearer(node)?;
    let mut client =
        EdgeServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(v) = &authorization {
                req.metadata_mut().insert("authorization", v.clone());
            }
            Ok(req)
        });
    let reg = client
        .register(RegisterNodeRequest {
            node_name: node.node_name.clone(),
            wire_addr: node.wire_addr.clone(),
            http_addr: node.http_addr.clone(),
            cores: node.cores,
            capacity_viewers: node.capacity_viewers,
            chunk_signing_key: Some(PublicKey {
                key_id: node.chunk_key_id,
                ed25519: node.chunk_public_key.to_vec(),
            }),
        })
        .await
        .map_err(|s| call_error("register", &s, node))?
        .into_inner();
    let node_id = reg.node_id;
    registry.auth().set_keys(&reg.token_keys);
    info!(token_keys = ?registry.auth().key_ids(), "token keys from the control plane");
    let hb = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.clamp(100, 60_000)));
    info!(node_id = %node_id, heartbeat_ms = hb.as_millis() as u64, "registered with the control plane");
    let mut stream = client
        .commands(CommandsRequest {
            node_id: node_id.clone(),
        })
        .await
        .map_err(|s| call_error("commands", &s, node))?
        .into_inner();
    let mut tick = tokio::time::interval(hb);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed_reports = 0u32;
    loop {
        tokio::select! {
            msg = stream.message() => {
                match msg {
                    Ok(Some(cmd)) => match cmd.command {
                        Some(node_command::Command::Ingest(c)) => {
                            let substreams = u16::try_from(c.substreams.clamp(1, 64)).unwrap_or(1);
                            let chunk_ms = if c.chunk_duration_ms == 0 { 1000 } else { c.chunk_duration_ms.clamp(100, 10_000) };
                            if c.broadcast_id.is_empty() || c.broadcast_id.len() > starling_proto::wire::MAX_BROADCAST_ID {
                                warn!(id = %c.broadcast_id, "ignoring ingest command with a bad broadcast id");
                                continue;
                            }
                            ingest.start(IngestSpec {
                                broadcast_id: c.broadcast_id,
                                source_url: c.source_url,
                                chunk_duration_ms: chunk_ms,
                                substreams,
                                public: c.public,
                                run_epoch: c.run_epoch,
                            });
                        }
                        Some(node_command::Command::Stop(s)) => ingest.stop(&s.broadcast_id),
                        Some(node_command::Command::Revoke(r)) => {
                            info!(broadcast = %r.broadcast_id, peers = ?r.peer_ids, "revoking peers");
                            registry.revoke(&r.broadcast_id, &r.peer_ids, crate::ingest::now_ms());
                        }
                        Some(node_command::Command::Keys(k)) => {
                            registry.auth().set_keys(&k.token_keys);
                            info!(token_keys = ?registry.auth().key_ids(), "token keys rotated");
                        }
                        None => {}
                    },
                    Ok(None) => return Err(LinkError::Other("command stream closed".into())),
                    Err(s) => return Err(call_error("command stream", &s, node)),
                }
            }
            _ = tick.tick() => {
                let report = health_report(&node_id, registry);
                match tokio::time::timeout(hb.max(Duration::from_secs(2)), client.report_health(report)).await {
                    Ok(Ok(ack)) => {
                        failed_reports = 0;
                        if !ack.into_inner().known {
                            info!(node_id = %node_id, "control plane does not know this node: re-registering");
                            return Ok(());
                        }
                    }
                    Ok(Err(s)) => {
                        failed_reports += 1;
                        warn!(error = %s, "health report failed");
                    }
                    Err(_) => {
                        failed_reports += 1;
                        warn!("health report timed out");
                    }
                }
                if failed_reports >= 3 {
                    return Err(LinkError::Other("health reports keep failing".into()));
                }
            }
        }
    }
}
