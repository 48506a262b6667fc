//! The viewer API's flood guards as the services use them: the join and unknown-session
//! rate limits per caller address, the negative cache of unknown sessions and the
//! flash-crowd admission of joins ([`crate::limits`] holds the pure tables).

use super::{ApiError, ApiResult, Core};

/// The flood limiters' state.
#[derive(Debug)]
pub(super) struct Guards {
    pub(super) join: crate::limits::RateLimiter,
    pub(super) lookups: crate::limits::RateLimiter,
    pub(super) unknown: crate::limits::UnknownSessions,
    pub(super) backlog: crate::limits::JoinBacklog,
}

/// One admitted join; leaves the backlog when dropped (answered or cancelled).
#[derive(Debug)]
pub(super) struct JoinPermit<'a> {
    core: &'a Core,
}

impl Drop for JoinPermit<'_> {
    fn drop(&mut self) {
        let now = self.core.grids.now();
        self.core.guards.lock().backlog.leave(now);
    }
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

    /// Admits one join into the backlog, or refuses it (a flash crowd beyond
    /// [`crate::limits::LimitsConfig::joins_in_flight`]) with the delay after which to
    /// retry, priced from the backlog and the measured join rate.
    pub(super) fn admit_join(&self) -> ApiResult<JoinPermit<'_>> {
        let entered = self.guards.lock().backlog.enter();
        match entered {
            Ok(()) => Ok(JoinPermit { core: self }),
            Err(wait) => {
                self.metrics.refused(crate::metrics::Refusal::JoinsInFlight);
                Err(ApiError::ResourceExhausted(
                    "too many joins in progress; retry later".to_string(),
                    wait,
                ))
            }
        }
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
