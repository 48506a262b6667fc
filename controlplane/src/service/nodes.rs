//! Data-plane node command links: one command stream per node, the commands sent on it,
//! the assignment of live broadcasts to alive nodes and the node liveness check.

use std::sync::atomic::Ordering;

use starling_proto::v1::node_command::Command;
use starling_proto::v1::{
    BroadcastState, IngestCommand, NodeCommand, RevokeCommand, StopIngestCommand,
};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tonic::Status;

use super::{Core, now_ms};
use crate::assign::{self, CandidateNode, LiveBroadcast, NodeLiveness};
use crate::store::{BroadcastRecord, StoreError};

pub(super) type CommandSender = mpsc::Sender<Result<NodeCommand, Status>>;

#[derive(Debug, Default)]
pub(super) struct NodeLink {
    pub(super) tx: Option<CommandSender>,
    pub(super) detached_since_ms: Option<i64>,
    /// When this process last received the node's health report (before writing it to
    /// the database): liveness counts it even while that write waits for the database,
    /// so a slow database cannot get a healthy node declared dead.
    pub(super) heard_ms: Option<i64>,
}

impl Core {
    pub(super) fn revoke_command(&self, broadcast_id: &str, now: i64) -> Option<Command> {
        let peer_ids = self.revocations.list(broadcast_id, now);
        (!peer_ids.is_empty()).then(|| {
            Command::Revoke(RevokeCommand {
                broadcast_id: broadcast_id.to_string(),
                peer_ids,
            })
        })
    }

    /// Ends every node command stream and refuses new ones (graceful shutdown: the
    /// server cannot finish while streams are open).
    pub fn close_streams(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.links.lock().clear();
    }

    /// Sends a command to a node's stream if it has one open. Never blocks: if the
    /// buffer is full the stream is closed so that the node reconnects and receives a
    /// full replay of its desired state.
    pub(super) fn send(&self, node_id: &str, command: Command) {
        let mut links = self.links.lock();
        let Some(link) = links.get_mut(node_id) else {
            tracing::debug!(node_id, "no link to node; command will be replayed later");
            return;
        };
        let Some(tx) = &link.tx else {
            tracing::debug!(
                node_id,
                "node has no command stream; command will be replayed"
            );
            return;
        };
        match tx.try_send(Ok(NodeCommand {
            command: Some(command),
        })) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(
                    node_id,
                    "node command buffer full; closing its stream to force a replay"
                );
                link.tx = None;
                link.detached_since_ms = Some(now_ms());
            }
            Err(TrySendError::Closed(_)) => {
                tracing::info!(node_id, "node command stream closed");
                link.tx = None;
                link.detached_since_ms = Some(now_ms());
            }
        }
    }

    pub(super) fn ingest_command(b: &BroadcastRecord) -> Command {
        Command::Ingest(IngestCommand {
            broadcast_id: b.id.clone(),
            source_url: b.source_url.clone(),
            chunk_duration_ms: b.chunk_duration_ms,
            substreams: b.substreams,
            public: b.public,
            run_epoch: b.run_epoch,
        })
    }

    pub(super) fn stop_command(broadcast_id: &str) -> Command {
        Command::Stop(StopIngestCommand {
            broadcast_id: broadcast_id.to_string(),
        })
    }

    /// Assigns every live broadcast without an alive node. Caller holds `assign_lock`.
    pub(super) async fn reconcile_locked(&self) -> Result<(), StoreError> {
        let alive = self.store.list_alive_nodes().await?;
        self.set_chunk_keys(&alive);
        let live = self
            .store
            .list_broadcasts_in_state(BroadcastState::Live)
            .await?;
        // Refreshed from the database's view of the live broadcasts (changes below
        // update it as they are made).
        self.retain_runs(&live.iter().map(|b| b.id.as_str()).collect::<Vec<_>>());
        for b in &live {
            self.set_ingest_node(&b.id, b.run_epoch, b.node_id.as_deref());
        }
        let live_in: Vec<LiveBroadcast> = live
            .iter()
            .map(|b| LiveBroadcast {
                id: b.id.clone(),
                node_id: b.node_id.clone(),
                viewers: b.viewers_now,
            })
            .collect();
        let nodes_in: Vec<CandidateNode> = alive
            .iter()
            .map(|n| CandidateNode {
                id: n.id.clone(),
                viewers: n.viewers,
            })
            .collect();
        for change in assign::plan_assignments(&live_in, &nodes_in) {
            let now = now_ms();
            let updated = self
                .store
                .set_broadcast_node(&change.broadcast_id, change.to.as_deref(), now)
                .await;
            self.join_cache.forget_broadcast(&change.broadcast_id);
            let updated = updated?;
            if let Some(b) = &updated {
                self.set_ingest_node(&b.id, b.run_epoch, change.to.as_deref());
            }
            match (&change.to, updated) {
                (Some(node_id), Some(b)) => {
                    tracing::info!(
                        broadcast_id = %b.id,
                        node_id = %node_id,
                        previous = change.from.as_deref().unwrap_or(""),
                        "broadcast assigned"
                    );
                    self.send(node_id, Self::ingest_command(&b));
                    // The new node must refuse the broadcast's revoked peers too.
                    if let Some(revoke) = self.revoke_command(&b.id, now) {
                        self.send(node_id, revoke);
                    }
                }
                (None, Some(b)) => tracing::warn!(
                    broadcast_id = %b.id,
                    previous = change.from.as_deref().unwrap_or(""),
                    "no alive data-plane node; broadcast left unassigned until one registers"
                ),
                (_, None) => {}
            }
        }
        Ok(())
    }

    /// Runs one liveness check at `now`: declares overdue nodes dead, reassigns their
    /// broadcasts, and retries assignment of unassigned live broadcasts.
    pub async fn liveness_tick(&self, now: i64) -> Result<(), StoreError> {
        let _guard = self.assign_lock.lock().await;
        let alive = self.store.list_alive_nodes().await?;
        let liveness: Vec<NodeLiveness> = {
            let mut links = self.links.lock();
            alive
                .iter()
                .map(|n| {
                    // A node alive in the database but unknown to this process (e.g. after
                    // a restart) counts as detached from now on.
                    let link = links.entry(n.id.clone()).or_insert_with(|| NodeLink {
                        tx: None,
                        detached_since_ms: Some(now),
                        heard_ms: None,
                    });
                    if link.tx.as_ref().is_some_and(mpsc::Sender::is_closed) {
                        tracing::info!(node_id = %n.id, "node command stream closed");
                        link.tx = None;
                        link.detached_since_ms = Some(now);
                    }
                    NodeLiveness {
                        id: n.id.clone(),
                        last_seen_ms: n.last_seen_ms.max(link.heard_ms.unwrap_or(i64::MIN)),
                        detached_since_ms: link.detached_since_ms,
                    }
                })
                .collect()
        };
        let timeout = i64::try_from(self.config.node_timeout.as_millis()).unwrap_or(i64::MAX);
        let expired = assign::expired_nodes(&liveness, now, timeout);
        for node_id in &expired {
            let marked = self.store.mark_node_dead(node_id).await;
            self.join_cache.forget_node(node_id);
            if marked? {
                tracing::warn!(node_id = %node_id, timeout_ms = timeout, "data-plane node declared dead");
            }
        }
        let result = self.reconcile_locked().await;
        // Close the dead nodes' command streams only once their broadcasts have moved,
        // so whoever sees a stream end also sees the new assignment.
        let mut links = self.links.lock();
        for node_id in &expired {
            links.remove(node_id);
        }
        result
    }
}
