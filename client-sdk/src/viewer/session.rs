//! Control-plane session upkeep over the session stream (`ViewerService.Session`), the
//! default: open it after `Join`, keep a mirror of the session's full state (parents
//! per substream, neighbours, key-set version) and apply each pushed delta to it, then
//! feed the rest of the SDK what the heartbeat loop feeds it (rights: keys, token,
//! revocations; relay engine: the full assignment, revoked peers); send counters every
//! interval, at once when the upload budget drops, and key refreshes when asked;
//! reopen a broken stream with back-off and jitter (the viewer keeps playing). An
//! older control plane (`UNIMPLEMENTED`) gets the unary heartbeat loop instead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::heartbeat::heartbeat_loop;
use crate::control::{
    AssignedParent, Assignment, Control, Counters, PeerAddr, SessionDelta, SessionStream,
    SessionUpdate, Ticket, UpError, jittered,
};
use crate::error::SdkError;
use crate::relay::Ev;
use crate::rights::OwnToken;
use crate::shared::{Shared, stopped};

/// Counters interval when the control plane does not name one.
const DEFAULT_COUNTERS_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest counters interval accepted from the control plane.
const MIN_COUNTERS_INTERVAL: Duration = Duration::from_millis(50);
/// Substreams a broadcast can have (1..=64).
const MAX_SUBSTREAMS: u32 = 64;
/// How often local state is looked at: a re-join's new session, a lowered upload
/// budget (no network traffic).
const LOCAL_CHECK: Duration = Duration::from_secs(1);

type StopRx = watch::Receiver<Option<Result<(), SdkError>>>;

/// What the upkeep task needs.
pub(super) struct Upkeep {
    pub control: Control,
    pub shared: Arc<Shared>,
    /// The relay engine's queue, if any.
    pub grid: Option<mpsc::Sender<Ev>>,
    /// The upload budget offered in `Join` (kbit/s).
    pub offered_kbps: u32,
    /// Key refreshes go out at most this often.
    pub refresh_every: Duration,
    /// Stream reopen back-off: first delay and cap (each plus 0..50 % jitter).
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// `false`: unary heartbeats only.
    pub stream: bool,
    /// Punches towards children when the control plane asks (`SessionDown.punch`).
    pub puncher: Option<crate::punch::Puncher>,
}

/// Runs until the viewer stops or its session is over: the session stream, or the
/// unary heartbeat loop if the control plane has no stream (or `stream` is off).
/// `seed`: `Join`'s assignment (what the relay engine started from).
pub(super) async fn upkeep(u: Upkeep, seed: Assignment) {
    if u.stream && !session_loop(&u, seed).await {
        return;
    }
    tracing::info!("control-plane upkeep by unary heartbeats");
    heartbeat_loop(u.control, u.shared, u.grid, u.offered_kbps, u.refresh_every).await;
}

/// The session's full state as pushed so far.
#[derive(Debug, Default)]
pub(super) struct Mirror {
    parents: BTreeMap<u32, AssignedParent>,
    tickets: BTreeMap<u32, Ticket>,
    /// `None`: not known (a new session whose stream has not said yet).
    neighbours: Option<Vec<PeerAddr>>,
    /// Of the key sets held (0 = none known by version).
    keys_version: u64,
}

impl Mirror {
    pub(super) fn seeded(a: Assignment) -> Mirror {
        let mut m = Mirror::default();
        m.apply(a, true);
        m
    }

    /// Applies a delta's parents (and its neighbours, if changed); true if anything
    /// was given.
    pub(super) fn apply(&mut self, a: Assignment, neighbours_changed: bool) -> bool {
        let changed = !a.parents.is_empty() || neighbours_changed;
        // Substream numbers beyond the most a stream has cannot grow the mirror.
        for (s, p) in a.parents.into_iter().filter(|(s, _)| *s < MAX_SUBSTREAMS) {
            self.tickets.remove(&s);
            self.parents.insert(s, p);
        }
        for t in a.tickets {
            if self
                .parents
                .get(&t.substream)
                .is_some_and(|p| p.peer().is_some_and(|peer| peer.id == t.parent))
            {
                self.tickets.insert(t.substream, t);
            }
        }
        if neighbours_changed {
            self.neighbours = Some(a.neighbours);
        }
        changed
    }

    /// The full current assignment.
    pub(super) fn full(&self) -> Assignment {
        Assignment {
            parents: self.parents.iter().map(|(s, p)| (*s, p.clone())).collect(),
            neighbours: self.neighbours.clone().unwrap_or_default(),
            tickets: self.tickets.values().cloned().collect(),
        }
    }
}

/// How one stream ended.
enum StreamEnd {
    /// The viewer stops (or the session is over): the upkeep ends.
    Stop,
    /// Transport error or end without `active = false`: reopen after the back-off
    /// (at least `at_least`: a busy control plane's retry pushback).
    /// `delivered`: it carried at least one message (the back-off restarts).
    Broken {
        error: String,
        delivered: bool,
        at_least: Duration,
    },
    /// A re-join replaced the session: open the new one's stream now.
    SessionChanged,
}

/// The stream loop. Returns `true` if the control plane has no session stream (use
/// heartbeats), `false` when the upkeep is over.
async fn session_loop(u: &Upkeep, seed: Assignment) -> bool {
    let mut stop = u.shared.stop_signal();
    let mut mirror_of = u.shared.session_id();
    let mut mirror = Mirror::seeded(seed);
    let mut backoff = u.reconnect_initial;
    let mut interval = DEFAULT_COUNTERS_INTERVAL;
    loop {
        let Some(session) = u.shared.session() else {
            return false;
        };
        if mirror_of.as_deref() != Some(session.id.as_str()) {
            // A re-join: the relay engine took the new Join's assignment; the new
            // stream's first message carries all parents; keys are sent afresh.
            mirror = Mirror::default();
            mirror_of = Some(session.id.clone());
        }
        let first = SessionUpdate {
            counters: counters(&u.shared, u.offered_kbps),
            keys_version: mirror.keys_version,
            refresh_keys: false,
        };
        // Asks for keys so far are answered by the key sets a fresh stream sends.
        let ticket = u.shared.rights.key_refresh_tickets();
        let opened = tokio::select! {
            _ = stopped(&mut stop) => return false,
            r = u.control.open_session(&session.id, first) => r,
        };
        let end = match opened {
            Ok(stream) => {
                tracing::debug!(session = session.id, "session stream open");
                let mut run = Run {
                    u,
                    session_id: &session.id,
                    mirror: &mut mirror,
                    interval: &mut interval,
                    stop: &mut stop,
                    pending_refresh: (first.keys_version == 0).then_some(ticket),
                };
                run.run(stream).await
            }
            Err(SdkError::ControlRejected {
                code: tonic::Code::Unimplemented,
                ..
            }) => return true,
            Err(e) => {
                let at_least = match &e {
                    SdkError::ControlBusy {
                        retry_after: Some(d),
                        ..
                    } => *d,
                    _ => Duration::ZERO,
                };
                StreamEnd::Broken {
                    error: e.to_string(),
                    delivered: false,
                    at_least,
                }
            }
        };
        match end {
            StreamEnd::Stop => return false,
            StreamEnd::SessionChanged => {
                backoff = u.reconnect_initial;
                continue;
            }
            StreamEnd::Broken {
                error,
                delivered,
                at_least,
            } => {
                if delivered {
                    backoff = u.reconnect_initial;
                }
                let wait = jittered(backoff.max(at_least));
                tracing::warn!(
                    retry_ms = wait.as_millis(),
                    "session stream lost (still playing): {error}"
                );
                backoff = (backoff * 2).min(u.reconnect_max.max(u.reconnect_initial));
                tokio::select! {
                    _ = stopped(&mut stop) => return false,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// The counters now; the upload budget only when lowered below the join offer.
fn counters(shared: &Shared, offered_kbps: u32) -> Counters {
    let s = shared.stats_mut();
    Counters {
        bytes_from_server: s.bytes_from_server,
        bytes_from_peers: s.bytes_from_peers,
        bytes_uploaded: s.bytes_uploaded,
        // 0 = unchanged (no slot recount at the control plane).
        upload_kbps: if s.upload_budget_kbps < offered_kbps {
            s.upload_budget_kbps
        } else {
            0
        },
    }
}

/// One open stream's state.
struct Run<'a> {
    u: &'a Upkeep,
    session_id: &'a str,
    mirror: &'a mut Mirror,
    interval: &'a mut Duration,
    stop: &'a mut StopRx,
    /// The key-refresh ticket the next key sets answer.
    pending_refresh: Option<u64>,
}

impl Run<'_> {
    async fn run(&mut self, mut stream: SessionStream) -> StreamEnd {
        let u = self.u;
        let mut delivered = false;
        let mut next_counters = Instant::now() + *self.interval;
        let mut check = tokio::time::interval(LOCAL_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The lowered budget last sent (0 = none).
        let mut budget_sent = 0u32;
        let mut refresh_wanted = false;
        let mut last_refresh = Instant::now();
        loop {
            let refresh_at = last_refresh + u.refresh_every;
            tokio::select! {
                _ = stopped(self.stop) => return StreamEnd::Stop,
                m = stream.next() => match m {
                    Ok(Some(d)) => {
                        delivered = true;
                        let interval_before = *self.interval;
                        if let Some(end) = self.apply(d).await {
                            return end;
                        }
                        if *self.interval != interval_before {
                            next_counters = Instant::now() + *self.interval;
                        }
                    }
                    Ok(None) => {
                        return StreamEnd::Broken {
                            error: "ended by the control plane".into(),
                            delivered,
                            at_least: Duration::ZERO,
                        };
                    }
                    Err(e) => {
                        return StreamEnd::Broken {
                            error: e.to_string(),
                            delivered,
                            at_least: Duration::ZERO,
                        };
                    }
                },
                () = tokio::time::sleep_until(next_counters) => {
                    next_counters = Instant::now() + *self.interval;
                    let c = counters(&u.shared, u.offered_kbps);
                    match stream.send(update(c, false)) {
                        Ok(()) => budget_sent = c.upload_kbps,
                        Err(UpError::Full) => {}
                        Err(UpError::Closed) => return closed(delivered),
                    }
                }
                _ = check.tick() => {
                    if u.shared.session_id().as_deref() != Some(self.session_id) {
                        return StreamEnd::SessionChanged;
                    }
                    let c = counters(&u.shared, u.offered_kbps);
                    if c.upload_kbps != 0 && c.upload_kbps != budget_sent {
                        // The upload budget dropped: news for the slot count, now.
                        match stream.send(update(c, false)) {
                            Ok(()) => budget_sent = c.upload_kbps,
                            Err(UpError::Full) => {}
                            Err(UpError::Closed) => return closed(delivered),
                        }
                    }
                }
                () = u.shared.rights.key_refresh_asked(), if !refresh_wanted => {
                    refresh_wanted = true;
                }
                () = tokio::time::sleep_until(refresh_at), if refresh_wanted => {
                    // A chunk named a key id we lack: ask for the current key sets (at
                    // most every `refresh_every`).
                    let ticket = u.shared.rights.key_refresh_tickets();
                    let c = counters(&u.shared, u.offered_kbps);
                    match stream.send(update(c, true)) {
                        Ok(()) => {
                            refresh_wanted = false;
                            last_refresh = Instant::now();
                            self.pending_refresh = Some(ticket);
                            u.shared.stats_mut().key_refreshes += 1;
                            tracing::debug!("asked the session stream for the current keys");
                        }
                        Err(UpError::Full) => last_refresh = Instant::now(),
                        Err(UpError::Closed) => return closed(delivered),
                    }
                }
            }
        }
    }

    /// Applies one pushed delta; `Some` ends the stream.
    async fn apply(&mut self, d: SessionDelta) -> Option<StreamEnd> {
        let shared = &self.u.shared;
        if shared.session_id().as_deref() != Some(self.session_id) {
            // For a session a re-join replaced meanwhile: stale.
            return Some(StreamEnd::SessionChanged);
        }
        if !d.active {
            tracing::info!(session = self.session_id, "control plane: session inactive");
            shared.finish(Err(SdkError::SessionInactive));
            return Some(StreamEnd::Stop);
        }
        shared.rights.observe_server_time(d.server_time);
        shared.rights.set_run(d.run_epoch);
        if d.child_slots != 0 && !self.feed(Ev::ChildSlots(d.child_slots)).await {
            return Some(StreamEnd::Stop);
        }
        if !d.punch.is_empty() {
            shared.stats_mut().punch_requests += d.punch.len() as u64;
            match &self.u.puncher {
                Some(p) => {
                    for child in &d.punch {
                        tracing::debug!(
                            child = child.id,
                            addr = child.addr,
                            "punching towards a child"
                        );
                        p.punch(&child.addr);
                    }
                }
                None => tracing::info!(
                    children = d.punch.len(),
                    "asked to punch towards children, but this viewer has no peer listener"
                ),
            }
        }
        if let Some(i) = d.counters_interval {
            *self.interval = i.max(MIN_COUNTERS_INTERVAL);
        }
        if d.keys_version != 0 {
            shared.rights.update_keys(&d.token_keys, &d.chunk_keys);
            shared.rights.set_ticket_keys(&d.ticket_keys, false);
            self.mirror.keys_version = d.keys_version;
            if let Some(t) = self.pending_refresh.take() {
                shared.rights.keys_refreshed(t);
            }
        }
        if !d.token.is_empty() {
            shared.rights.set_token(OwnToken {
                token: d.token,
                expires_at_ms: d.token_expires_at_ms,
            });
            shared.stats_mut().token_renewals += 1;
        }
        if !d.revoked.is_empty() {
            shared.rights.revoke(&d.revoked);
            // Deltas are not repeated: wait for room in the engine's queue.
            if !self.feed(Ev::Revoked(d.revoked)).await {
                return Some(StreamEnd::Stop);
            }
        }
        if self.mirror.apply(d.assignment, d.neighbours_changed) {
            let full = self.mirror.full();
            if !full.parents.is_empty() && !self.feed(Ev::Assignment(full)).await {
                return Some(StreamEnd::Stop);
            }
        }
        None
    }

    /// Hands `ev` to the relay engine, if any; false if the viewer stopped meanwhile.
    async fn feed(&mut self, ev: Ev) -> bool {
        let Some(g) = &self.u.grid else {
            return true;
        };
        tokio::select! {
            _ = stopped(self.stop) => false,
            r = g.send(ev) => r.is_ok() || !self.u.shared.is_finished(),
        }
    }
}

fn update(counters: Counters, refresh_keys: bool) -> SessionUpdate {
    SessionUpdate {
        counters,
        keys_version: 0,
        refresh_keys,
    }
}

fn closed(delivered: bool) -> StreamEnd {
    StreamEnd::Broken {
        error: "stream closed".into(),
        delivered,
        at_least: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_grid::Parent;

    fn peer(id: u64) -> AssignedParent {
        AssignedParent {
            parent: Parent::Peer(id),
            addr: format!("10.0.0.{id}:9000"),
            punch: false,
        }
    }

    fn ticket(s: u32, parent: u64) -> Ticket {
        Ticket {
            substream: s,
            parent,
            ticket: bytes::Bytes::from(vec![s as u8, parent as u8]),
        }
    }

    fn dp() -> AssignedParent {
        AssignedParent {
            parent: Parent::Server,
            addr: String::new(),
            punch: false,
        }
    }

    #[test]
    fn a_parent_delta_yields_the_full_assignment_with_that_change() {
        let mut m = Mirror::seeded(Assignment {
            parents: vec![(0, peer(1)), (1, peer(2)), (2, dp())],
            neighbours: vec![PeerAddr {
                id: 5,
                addr: "n".into(),
                punch: false,
            }],
            tickets: vec![ticket(0, 1), ticket(1, 2)],
        });
        let changed = m.apply(
            Assignment {
                parents: vec![(1, peer(3))],
                neighbours: vec![],
                tickets: vec![ticket(1, 3)],
            },
            false,
        );
        assert!(changed);
        let full = m.full();
        assert_eq!(full.parents, vec![(0, peer(1)), (1, peer(3)), (2, dp())]);
        assert_eq!(full.tickets, vec![ticket(0, 1), ticket(1, 3)]);
        assert_eq!(full.neighbours.len(), 1, "neighbours unchanged");
        // Back to the data plane: that substream's ticket goes.
        m.apply(
            Assignment {
                parents: vec![(0, dp())],
                ..Assignment::default()
            },
            true,
        );
        let full = m.full();
        assert_eq!(full.parents[0], (0, dp()));
        assert_eq!(full.tickets, vec![ticket(1, 3)]);
        assert!(full.neighbours.is_empty(), "the new full list is empty");
        assert!(!m.apply(Assignment::default(), false), "an empty delta");
        m.apply(
            Assignment {
                parents: (64..10_000).map(|s| (s, dp())).collect(),
                ..Assignment::default()
            },
            false,
        );
        assert_eq!(m.full().parents.len(), 3, "no substream beyond 63 is kept");
    }

    #[test]
    fn a_ticket_for_another_parent_is_not_kept() {
        let mut m = Mirror::seeded(Assignment {
            parents: vec![(0, peer(1))],
            ..Assignment::default()
        });
        m.apply(
            Assignment {
                parents: vec![],
                neighbours: vec![],
                tickets: vec![ticket(0, 9)],
            },
            false,
        );
        assert!(m.full().tickets.is_empty());
    }

    #[test]
    fn jitter_never_shortens_and_adds_at_most_half() {
        let base = Duration::from_millis(400);
        for _ in 0..200 {
            let j = jittered(base);
            assert!(j >= base && j <= base + base / 2, "{j:?}");
        }
    }
}
