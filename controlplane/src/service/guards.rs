//! The viewer API's flood guards as the services use them: the join and unknown-session
//! rate limits per caller address and the negative cache of unknown sessions
//! ([`crate::limits`] holds the pure tables).

use super::{ApiError, ApiResult, Core};

/// The flood limiters' state.
#[derive(Debug)]
pub(super) struct Guards {
    pub(super) join: crate::limits::RateLimiter,
    pub(super) lookups: crate::limits::RateLimiter,
    pub(super) unknown: crate::limits::UnknownSessions,
}

impl Core {
    /// What the negative cache knows of a session this process does not hold (counted
    /// as a refusal when it answers).
    pub(super) fn cached_unknown(&self, session_id: &str) -> Option<crate::limits::Unknown> {
        let u = self.guards.lock().unknown.get(session_id, self.grids.now());
        if u.is_some() {
            self.metrics
                .refused(crate::metrics::Refusal::UnknownSessionCached);
        }
        u
    }

    pub(super) fn remember_unknown(&self, session_id: &str, what: crate::limits::Unknown) {
        let now = self.grids.now();
        self.guards.lock().unknown.insert(session_id, what, now);
    }

    /// Allows one database look-up of a session not in memory for the caller, or
    /// refuses it (rate limit per caller address).
    pub(super) fn allow_lookup(&self, remote: Option<std::net::SocketAddr>) -> ApiResult<()> {
        if let Some(r) = remote {
            let now = self.grids.now();
            let checked = self.guards.lock().lookups.check(r.ip(), now);
            if let Err(wait) = checked {
                self.metrics
                    .refused(crate::metrics::Refusal::UnknownSessionRate);
                return Err(ApiError::ResourceExhausted(
                    format!(
                        "too many calls for sessions this control plane does not know from {}; \
                         retry later or join again",
                        r.ip()
                    ),
                    wait,
                ));
            }
        }
        self.metrics.unknown_session_lookup();
        Ok(())
    }
}
