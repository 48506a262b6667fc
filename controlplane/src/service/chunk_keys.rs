//! The alive nodes' chunk-signing keys handed to viewers (ingesting node first, one per
//! key id, capped) and the node ingesting each live broadcast, as last seen.

use starling_proto::v1::PublicKey;

use super::Core;
use crate::store::NodeRecord;

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

    /// The alive nodes' chunk-signing keys, `first_node`'s first, one per key id (a
    /// verifier indexes keys by id; `Register` refuses a key whose id another alive node
    /// uses with a different key, so a clash here can only come from replicas racing, and
    /// then the first wins), at most
    /// [`starling_proto::integrity::MAX_KEYS`].
    pub(super) fn chunk_keys(&self, first_node: Option<&str>) -> Vec<PublicKey> {
        let all = self.chunk_keys.read();
        let mut out: Vec<PublicKey> = Vec::new();
        let first = all.iter().filter(|(id, _)| Some(id.as_str()) == first_node);
        let rest = all.iter().filter(|(id, _)| Some(id.as_str()) != first_node);
        for (_, k) in first.chain(rest) {
            if out.len() >= starling_proto::integrity::MAX_KEYS {
                break;
            }
            if !out.iter().any(|o| o.key_id == k.key_id) {
                out.push(k.clone());
            }
        }
        out
    }

    /// The node ingesting `broadcast_id`, as last seen (see [`Core::chunk_keys`]).
    pub(super) fn ingest_node(&self, broadcast_id: &str) -> Option<String> {
        self.ingest_nodes.read().get(broadcast_id).cloned()
    }

    pub(super) fn set_ingest_node(&self, broadcast_id: &str, node_id: Option<&str>) {
        let mut m = self.ingest_nodes.write();
        match node_id {
            Some(n) => {
                m.insert(broadcast_id.to_string(), n.to_string());
            }
            None => {
                m.remove(broadcast_id);
            }
        }
    }
}
