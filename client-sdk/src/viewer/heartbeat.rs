//! Control-plane session upkeep by unary `Heartbeat` (the fallback of [`super::session`]
//! for a control plane without the session stream, or when configured): the loop (early when a chunk names a key
//! this viewer lacks) that renews the token and keys, passes revocations and new grid
//! assignments to the relay engine, and stops the viewer when its session is inactive.

use std::sync::Arc;
use std::time::Duration;

use crate::control::{Control, Counters};
use crate::error::SdkError;
use crate::rights::OwnToken;
use crate::shared::{Shared, stopped};

/// Beats until the viewer stops or its session is inactive; `grid`: the relay
/// engine's queue, if any; `offered_kbps`: the upload budget offered in `Join`.
pub(super) async fn heartbeat_loop(
    control: Control,
    shared: Arc<Shared>,
    grid: Option<tokio::sync::mpsc::Sender<crate::relay::Ev>>,
    offered_kbps: u32,
    refresh_every: Duration,
) {
    let mut stop = shared.stop_signal();
    let mut last_beat = tokio::time::Instant::now();
    loop {
        let Some(session) = shared.session() else {
            return;
        };
        // A chunk named a key id we do not hold: beat early (at most every
        // `refresh_every`) to get the current keys.
        let early = async {
            shared.rights.key_refresh_asked().await;
            tokio::time::sleep_until(last_beat + refresh_every).await;
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(session.heartbeat) => {}
            () = early => {
                shared.stats_mut().key_refreshes += 1;
                tracing::debug!("early heartbeat for the current keys");
            }
        }
        last_beat = tokio::time::Instant::now();
        // Every key refresh asked for until now is answered by this beat.
        let ticket = shared.rights.key_refresh_tickets();
        let counters = {
            let s = shared.stats_mut();
            Counters {
                bytes_from_server: s.bytes_from_server,
                bytes_from_peers: s.bytes_from_peers,
                bytes_uploaded: s.bytes_uploaded,
                // Only a budget the upload estimate lowered below the join offer is
                // news to the control plane (0 = unchanged, no slot recount).
                upload_kbps: if s.upload_budget_kbps < offered_kbps {
                    s.upload_budget_kbps
                } else {
                    0
                },
            }
        };
        let call = tokio::time::timeout(session.heartbeat.max(Duration::from_secs(1)), async {
            control.heartbeat(&session.id, counters).await
        });
        let r = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = call => r,
        };
        match r {
            Ok(Ok(hb)) if hb.active => {
                let current = shared.session_id();
                if current.as_deref() != Some(session.id.as_str()) {
                    // Answer for a session replaced meanwhile (re-join): stale.
                    continue;
                }
                shared.rights.update_keys(&hb.token_keys, &hb.chunk_keys);
                shared.rights.set_run(hb.run_epoch);
                shared.rights.observe_server_time(hb.server_time);
                shared.rights.set_ticket_keys(&hb.ticket_keys, false);
                shared.rights.keys_refreshed(ticket);
                if !hb.token.is_empty() {
                    shared.rights.set_token(OwnToken {
                        token: hb.token,
                        expires_at_ms: hb.token_expires_at_ms,
                    });
                    shared.stats_mut().token_renewals += 1;
                }
                if !hb.revoked.is_empty() {
                    shared.rights.revoke(&hb.revoked);
                    if let Some(g) = &grid {
                        // Also closes links with them; if the queue is full, the next
                        // beat repeats the list.
                        let _ = g.try_send(crate::relay::Ev::Revoked(hb.revoked));
                    }
                }
                if let Some(g) = &grid
                    && !hb.assignment.parents.is_empty()
                {
                    // A full engine queue only delays the update to the next beat.
                    let _ = g.try_send(crate::relay::Ev::Assignment(hb.assignment));
                }
            }
            Ok(Ok(_)) => {
                // A re-join may have replaced the session meanwhile: only stop if the
                // inactive one is still current.
                let current = shared.session_id();
                if current.as_deref() == Some(session.id.as_str()) {
                    tracing::info!(session = session.id, "control plane: session inactive");
                    shared.finish(Err(SdkError::SessionInactive));
                    return;
                }
            }
            Ok(Err(e)) => tracing::warn!("heartbeat failed (still playing): {e}"),
            Err(_) => tracing::warn!("heartbeat timed out (still playing)"),
        }
    }
}
