//! Which chunk-signing keys a broadcast's viewers trust, and each broadcast's run.
//!
//! A node's chunk key is trusted **only for the broadcasts the control plane assigned
//! to it** (issue 18, part 4): the keys handed to the viewers of broadcast B (`Join`,
//! session-stream key sets, heartbeats) are those of the alive nodes assigned to B in
//! its current run, the ingesting node first. Another node, even one with a valid
//! credential, cannot sign chunks B's viewers accept. The record of a broadcast's
//! assignments is kept per run: a new run (a `StartBroadcast`) starts it afresh.

use std::collections::HashMap;

use starling_proto::v1::PublicKey;

use super::Core;
use crate::store::NodeRecord;

/// Most nodes remembered as assigned to one broadcast in one run (the current one and
/// the ones it took over from, most recent first).
const MAX_RUN_NODES: usize = 4;

/// One broadcast's current run, as this process last saw it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct BroadcastRun {
    /// `broadcasts.run_epoch`.
    pub(super) epoch: u64,
    /// Nodes assigned to it in this run, the current ingesting node first.
    pub(super) nodes: Vec<String>,
}

/// Broadcast id → its run.
pub(super) type Runs = HashMap<String, BroadcastRun>;

impl Core {
    pub(super) fn set_chunk_keys(&self, alive: &[NodeRecord]) {
        let keys: Vec<(String, PublicKey)> = alive
            .iter()
            .filter_map(|n| {
                n.chunk_key.as_ref().map(|k| {
                    (
                        n.id.clone(),
                        PublicKey {
                            key_id: k.key_id,
                            ed25519: k.ed25519.clone(),
                        },
                    )
                })
            })
            .collect();
        let changed = {
            let mut current = self.chunk_keys.write();
            let changed = *current != keys;
            *current = keys;
            changed
        };
        if changed {
            // Session streams push the new key sets.
            self.revocations.announce();
        }
    }

    /// The chunk-signing keys the viewers of `broadcast_id` trust: those of the alive
    /// nodes assigned to it in its current run, the ingesting node's first, one per key
    /// id (a verifier indexes keys by id; `Register` refuses a key whose id another
    /// alive node uses with a different key), at most
    /// [`starling_proto::integrity::MAX_KEYS`]. Empty when this process knows of no
    /// assignment (the viewer keeps the keys it has).
    pub(super) fn chunk_keys_for(&self, broadcast_id: &str) -> Vec<PublicKey> {
        let nodes = match self.runs.read().get(broadcast_id) {
            Some(r) => r.nodes.clone(),
            None => return Vec::new(),
        };
        let all = self.chunk_keys.read();
        let mut out: Vec<PublicKey> = Vec::new();
        for node in &nodes {
            for (_, k) in all.iter().filter(|(id, _)| id == node) {
                if out.len() >= starling_proto::integrity::MAX_KEYS {
                    break;
                }
                if !out.iter().any(|o| o.key_id == k.key_id) {
                    out.push(k.clone());
                }
            }
        }
        out
    }

    /// The current run of `broadcast_id` as this process knows it (0 = unknown).
    pub(super) fn run_epoch(&self, broadcast_id: &str) -> u64 {
        self.runs.read().get(broadcast_id).map_or(0, |r| r.epoch)
    }

    /// The node ingesting `broadcast_id`, as last seen.
    pub(super) fn ingest_node(&self, broadcast_id: &str) -> Option<String> {
        self.runs
            .read()
            .get(broadcast_id)
            .and_then(|r| r.nodes.first().cloned())
    }

    /// Records that `node_id` ingests run `epoch` of `broadcast_id` (`None`: no node
    /// now; the nodes of the run stay remembered). A new epoch forgets the previous
    /// run's nodes. Session streams are told when the trusted set changes.
    pub(super) fn set_ingest_node(&self, broadcast_id: &str, epoch: u64, node_id: Option<&str>) {
        let changed = {
            let mut m = self.runs.write();
            let r = m.entry(broadcast_id.to_string()).or_default();
            let before = r.clone();
            if r.epoch != epoch {
                r.epoch = epoch;
                r.nodes.clear();
            }
            if let Some(n) = node_id {
                r.nodes.retain(|x| x != n);
                r.nodes.insert(0, n.to_string());
                r.nodes.truncate(MAX_RUN_NODES);
            }
            *r != before
        };
        if changed {
            self.revocations.announce();
        }
    }

    /// Forgets broadcasts that are no longer live (`live`: the live ones' ids).
    pub(super) fn retain_runs(&self, live: &[&str]) {
        self.runs
            .write()
            .retain(|id, _| live.contains(&id.as_str()));
    }
}
