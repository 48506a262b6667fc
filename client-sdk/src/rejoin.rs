//! What a successful re-`Join` changes in the shared state, whichever receive path
//! called it (the plain receiver or the relay engine): the new control-plane session
//! (the old one is left in the background), the new token and keys, the counter.

use std::time::Duration;

use crate::control::{Control, JoinInfo};
use crate::rights::OwnToken;
use crate::shared::Shared;

/// Adopts the session, token and keys of `join` (a re-`Join`'s answer); sends `Leave`
/// for the session it replaces, in the background (at most 3 s).
pub(crate) fn adopt(shared: &Shared, control: &Control, join: &JoinInfo) {
    tracing::info!(
        addr = join.wire_addr,
        session = join.session_id,
        "re-joined via the control plane"
    );
    let old = shared.replace_session(join.session_id.clone(), join.heartbeat);
    if let Some(old) = old.filter(|o| o.id != join.session_id) {
        let control = control.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(3), control.leave(&old.id)).await;
        });
    }
    shared.rights.rejoined(
        OwnToken {
            token: join.token.clone(),
            expires_at_ms: join.token_expires_at_ms,
        },
        &join.token_keys,
        &join.chunk_keys,
        join.run_epoch,
    );
    shared.rights.observe_server_time(join.server_time);
    shared.rights.set_ticket_keys(&join.ticket_keys, true);
    shared.stats_mut().rejoins += 1;
}
