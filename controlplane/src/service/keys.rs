//! Chunk-token key rotation: the periodic rights housekeeping that reloads the token
//! keys (a rotation by another replica, retired keys), pushes a changed set to every node
//! and forgets old revocations.

use starling_proto::v1::KeysCommand;
use starling_proto::v1::node_command::Command;

use super::Core;

impl Core {
    /// Periodic rights housekeeping: reloads the token keys (rotation by another replica,
    /// retired keys) and pushes a changed set to every node; forgets old revocations.
    pub async fn rights_tick(&self, now: i64) -> Result<(), crate::tokens::TokenKeyError> {
        self.revocations.prune(now);
        if self.tokens.refresh(&self.store, now).await? {
            // Session streams compare their viewer's keys_version and push the new set.
            self.revocations.announce();
            let keys = self.tokens.public_keys();
            let node_ids: Vec<String> = self.links.lock().keys().cloned().collect();
            for node_id in node_ids {
                self.send(
                    &node_id,
                    Command::Keys(KeysCommand {
                        token_keys: keys.clone(),
                    }),
                );
            }
        }
        Ok(())
    }
}
