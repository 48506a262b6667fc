//! `ViewerService.Session`, the per-viewer session stream (docs/PROTOCOL.md, "Session
//! stream"): the first `SessionUp` attaches the session, the first `SessionDown` carries
//! its whole state, then only deltas are pushed, when something changed:
//!
//! * parents: the grid wakes the stream ([`StreamWake`]) when it moves the peer; the
//!   stream then computes its view and sends the substreams whose parent changed (and
//!   all of them again, with fresh tickets, when their tickets reach half their life or
//!   the signing key changed);
//! * neighbours: recomputed at every counters message and wake, sent when changed;
//! * the chunk token: renewed by a per-stream timer when less than half its life is left;
//! * revocations and key sets: a process-wide version
//!   ([`crate::tokens::Revocations::subscribe`]), watched by one task per process, wakes
//!   every stream ([`crate::live::LiveGrids::announce_rights`]), which compares with what
//!   it last sent (key sets by fingerprint, the `keys_version`).
//!
//! Each later `SessionUp` records the viewer's counters exactly as a heartbeat does. No
//! task, channel or per-message allocation per stream: the response stream is the
//! [`SessionStream`] state itself, a hand-written [`Stream`](tokio_stream::Stream) that
//! the HTTP/2 connection polls (through `session_route`'s response body); each poll
//! looks at its wake handle (grid moves first), its inbound messages, the wake handle's
//! rights flag and one timer, in that order. Only rarely used parts are boxed: the first
//! message until it is sent, and the database write of a session without grid state
//! while it is in flight. Liveness is the stream: the session is detached when the
//! stream ends (dropped with its connection) and expires after the detach grace unless
//! taken up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use starling_proto::v1::{PeerRef, PublicKey, SessionDown, SessionUp, SubstreamParent};
use tokio_stream::Stream;
use tonic::Status;

use super::session_route::Inbound;
use super::{ApiError, ApiResult, Core, now_ms};
use crate::live::{MOVED, RIGHTS, StreamWake, TokenState};
use crate::metrics::Pushed;
use crate::store::StoreError;
use crate::tickets::Caching;
use crate::validate;

/// How long the first `SessionUp` may take after the stream opened.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// "No time": a deadline that never comes.
const NEVER: i64 = i64::MAX;

/// A database write in flight (the counters of a session without grid state).
type Touch = Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send>>;

/// A session held in this process's grid, as the stream last described it.
struct Attachment {
    generation: u64,
    peer_id: u64,
    broadcast_id: Arc<str>,
    /// The parent last sent per substream (0 = the data plane).
    parents: Box<[u64]>,
    /// Fingerprint of the neighbour list last sent.
    neighbours: u64,
    /// The children last told to punch towards (`SessionDown.punch`), sorted.
    punched: Vec<u64>,
    /// The child slots last sent (the join's, at first).
    child_slots: u32,
    /// The revocation list last sent.
    revoked: Vec<u64>,
    /// The key that signed the tickets last sent.
    signing_key: u32,
    /// Unix ms at which the chunk token needs renewal, and the tickets sent get re-signed.
    token_renew_at: i64,
    tickets_renew_at: i64,
}

/// The response stream of one `Session` call: everything one stream holds between
/// messages (see the module docs).
pub struct SessionStream {
    core: Arc<Core>,
    inbound: Inbound,
    session_id: Arc<str>,
    /// `None`: the session is active in the database but not in this process's grid.
    grid: Option<Attachment>,
    /// Its wake handle: the grid's moves, rights changes ([`crate::live::StreamWake`]).
    wake: Arc<StreamWake>,
    /// Flags taken from the wake handle and not acted on yet ([`MOVED`], [`RIGHTS`]).
    raised: u8,
    /// The key sets' fingerprint last sent.
    keys_version: u64,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The unix ms the timer is set for.
    armed_at: i64,
    /// The first message, sent before anything else.
    first: Option<Box<SessionDown>>,
    /// The database write of a counters message (session without grid state) and
    /// whether that message asked for the key sets.
    touch: Option<(Touch, bool)>,
    /// Unix ms of the last counters message recorded (0 = none yet): a viewer sending
    /// faster than a quarter of the counters interval has the extra messages' counters
    /// skipped (they are cumulative, the next one carries them), so a flood of
    /// `SessionUp`s costs neither grid-lock time nor database writes.
    counters_at_ms: i64,
    /// Counted in the open-streams gauge.
    counted: bool,
    /// The stream ends at the next poll (after an `active = false` or an error).
    done: bool,
    /// The viewer closed its sending side (the stream stays: it still gets pushes).
    inbound_closed: bool,
}

/// What a poll of the stream's sources found.
enum Next {
    Send(Box<SessionDown>),
    Fail(Status),
    End,
}

impl Stream for SessionStream {
    type Item = Result<SessionDown, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<SessionDown, Status>>> {
        let this = self.get_mut();
        if let Some(mut first) = this.first.take() {
            first.server_time_unix_ms = now_ms();
            return Poll::Ready(Some(Ok(*first)));
        }
        if this.done {
            this.finish();
            return Poll::Ready(None);
        }
        match this.poll_sources(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Next::Send(mut down)) => {
                // Every message carries the control plane's clock (the SDK's offset).
                down.server_time_unix_ms = now_ms();
                Poll::Ready(Some(Ok(*down)))
            }
            Poll::Ready(Next::Fail(status)) => {
                this.finish();
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(Next::End) => {
                this.finish();
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        self.finish();
    }
}

impl SessionStream {
    /// Polls the stream's sources until one has something to send, the stream is
    /// over, or none is ready (their wakers registered).
    fn poll_sources(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        loop {
            let down = if let Some((touch, refresh_keys)) = self.touch.as_mut() {
                // The write in flight goes first (as the message that started it).
                let Poll::Ready(result) = touch.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                let refresh_keys = *refresh_keys;
                self.touch = None;
                self.on_touched(result, refresh_keys)
            } else if self.raised == 0
                && let Poll::Ready(raised) = self.wake.poll_woken(cx)
            {
                self.raised = raised;
                continue;
            } else if self.raised & MOVED != 0 {
                self.raised &= !MOVED;
                if self.grid.is_none() {
                    continue;
                }
                if self.wake.superseded() {
                    // Detaching is the newer stream's business now.
                    self.grid = None;
                    return Poll::Ready(Next::Fail(Status::aborted(
                        "another Session stream took this session over",
                    )));
                }
                self.on_wake()
            } else if let Some(up) = self.poll_inbound(cx) {
                match up {
                    Ok(Some(up)) => self.on_up(&up),
                    Ok(None) => {
                        self.inbound_closed = true;
                        None
                    }
                    Err(status) => {
                        tracing::debug!(session_id = %self.session_id, code = ?status.code(), error = status.message(), "session stream broken");
                        return Poll::Ready(Next::End);
                    }
                }
            } else if self.raised & RIGHTS != 0 {
                self.raised &= !RIGHTS;
                if self.core.shutting_down.load(Ordering::SeqCst) {
                    return Poll::Ready(Next::Fail(Status::unavailable(
                        "the control plane is shutting down; open the stream again",
                    )));
                }
                self.on_rights()
            } else if self.timer.as_mut().poll(cx).is_ready() {
                self.on_timer()
            } else {
                return Poll::Pending;
            };
            self.arm_timer();
            if let Some(down) = down {
                if !down.active {
                    self.done = true;
                }
                return Poll::Ready(Next::Send(Box::new(down)));
            }
        }
    }

    /// The next inbound message, `None` when none is ready (or the viewer closed its
    /// side earlier).
    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Option<Result<Option<SessionUp>, Status>> {
        if self.inbound_closed {
            return None;
        }
        match Pin::new(&mut self.inbound).poll_next(cx) {
            Poll::Pending => None,
            Poll::Ready(None) => Some(Ok(None)),
            Poll::Ready(Some(r)) => Some(r.map(Some)),
        }
    }

    /// The stream is over: not counted any more, its session detached (once).
    fn finish(&mut self) {
        self.done = true;
        self.touch = None;
        if std::mem::take(&mut self.counted) {
            self.core.metrics.stream_closed();
        }
        if let Some(a) = self.grid.take() {
            let core = &self.core;
            let detached = core.grids.detach(
                &self.session_id,
                a.generation,
                &self.wake,
                core.session_timeout(),
                core.config.session_detach_grace,
            );
            if detached {
                tracing::debug!(session_id = %self.session_id, peer_id = a.peer_id, "session stream ended; session detached");
            }
        }
    }
}

/// FNV-1a, 64 bit.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The fingerprint of the key sets a viewer holds (`keys_version`): FNV-64 of the key
/// ids and bytes, never 0 (the proto's "none held").
pub(super) fn keys_version(token_keys: &[PublicKey], chunk_keys: &[PublicKey]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for (tag, set) in [(b"t", token_keys), (b"c", chunk_keys)] {
        h = fnv(h, tag);
        for k in set {
            h = fnv(h, &k.key_id.to_le_bytes());
            h = fnv(
                h,
                &u64::try_from(k.ed25519.len()).unwrap_or(0).to_le_bytes(),
            );
            h = fnv(h, &k.ed25519);
        }
    }
    h.max(1)
}

/// Fingerprint of a neighbour list.
fn neighbours_fingerprint(ids: impl Iterator<Item = u64>) -> u64 {
    ids.fold(0xcbf2_9ce4_8422_2325, |h, id| fnv(h, &id.to_le_bytes()))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Core {
    /// Opens a session stream: reads and checks the first `SessionUp` (the errors of a
    /// malformed one are the call's status), attaches the session and prepares the
    /// first `SessionDown`.
    pub(super) async fn open_session(
        self: &Arc<Self>,
        mut inbound: Inbound,
        remote: Option<std::net::SocketAddr>,
    ) -> ApiResult<SessionStream> {
        let first = std::future::poll_fn(|cx| Pin::new(&mut inbound).poll_next(cx));
        let up = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first).await {
            Ok(Some(Ok(up))) => up,
            Ok(None) => {
                return Err(ApiError::InvalidArgument(
                    "the stream ended before its first SessionUp".into(),
                ));
            }
            Ok(Some(Err(status))) => {
                return Err(ApiError::InvalidArgument(format!(
                    "unreadable first SessionUp: {}",
                    status.message()
                )));
            }
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "no SessionUp within {} s of opening the stream",
                    FIRST_MESSAGE_TIMEOUT.as_secs()
                )));
            }
        };
        validate::id("session_id", &up.session_id)?;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable(
                "the control plane is shutting down; retry".into(),
            ));
        }
        let wake = Arc::new(StreamWake::default());
        // Registered before reading the current state: a change from now on wakes us.
        self.forward_rights();
        self.grids.register_stream(&wake);
        let mut state = SessionStream {
            core: self.clone(),
            inbound,
            session_id: Arc::from(up.session_id.as_str()),
            grid: None,
            wake: wake.clone(),
            raised: 0,
            keys_version: up.keys_version,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
            armed_at: NEVER,
            first: None,
            touch: None,
            counters_at_ms: 0,
            counted: false,
            done: false,
            inbound_closed: false,
        };
        let interval_ms =
            u32::try_from(self.config.session_counters_interval.as_millis()).unwrap_or(u32::MAX);
        let first = match self.grids.attach(&up.session_id, &wake) {
            Some(att) => {
                state.open();
                state.session_id = att.session_id;
                state.grid = Some(Attachment {
                    generation: att.generation,
                    peer_id: att.peer_id,
                    broadcast_id: att.broadcast_id,
                    parents: Box::new([]),
                    neighbours: 0,
                    punched: Vec::new(),
                    child_slots: 0,
                    revoked: Vec::new(),
                    signing_key: self.tokens.signing_key_id(),
                    token_renew_at: NEVER,
                    tickets_renew_at: NEVER,
                });
                if up.bytes_from_server | up.bytes_from_peers | up.bytes_uploaded != 0
                    || up.upload_kbps != 0
                {
                    state.record(&up);
                }
                match state.full_view() {
                    Some(mut down) => {
                        down.counters_interval_ms = interval_ms;
                        down
                    }
                    None => state.end(),
                }
            }
            None => {
                // Not in this process's grid: as for a heartbeat, the negative cache,
                // else the database decides.
                if self.cached_unknown(&up.session_id).is_some() {
                    state.end()
                } else {
                    self.allow_lookup(remote)?;
                    if self.store.touch_session(&up.session_id, now_ms()).await? {
                        tracing::debug!(session_id = %up.session_id, "session stream for a session without grid state");
                        state.open();
                        let mut down = SessionDown {
                            active: true,
                            counters_interval_ms: interval_ms,
                            ..Default::default()
                        };
                        state.add_keys(&mut down, false);
                        down
                    } else {
                        tracing::debug!(session_id = %up.session_id, "session stream for an unknown or ended session");
                        self.remember_unknown(&up.session_id, crate::limits::Unknown::Ended);
                        state.end()
                    }
                }
            }
        };
        self.metrics.pushed(Pushed::First);
        state.first = Some(Box::new(first));
        state.arm_timer();
        Ok(state)
    }

    /// Starts (once) the task that wakes every session stream when the rights version
    /// changes ([`crate::tokens::Revocations::subscribe`]: key sets, revocations,
    /// shutdown). It ends with the core.
    fn forward_rights(self: &Arc<Self>) {
        if !self.grids.claim_rights_forwarder() {
            return;
        }
        let mut rights = self.revocations.subscribe();
        let core = Arc::downgrade(self);
        tokio::spawn(async move {
            while rights.changed().await.is_ok() {
                let Some(core) = core.upgrade() else {
                    break;
                };
                let woken = core.grids.announce_rights();
                tracing::debug!(streams = woken, "rights changed; session streams woken");
            }
        });
    }

    /// Ends every session stream (graceful shutdown): each ends with UNAVAILABLE, its
    /// session detached (the SDK reconnects, to this process's successor).
    pub fn end_session_streams(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.revocations.announce();
    }

    /// Renews the chunk token of a session in a grid when it needs it; returns the new
    /// token and its expiry, `None` when no renewal was due or possible.
    pub(super) fn renew_token(
        &self,
        session_id: &str,
        broadcast_id: &str,
        peer_id: u64,
        token: Option<TokenState>,
        now: i64,
    ) -> Option<(Vec<u8>, i64)> {
        let t = token?;
        if !self.tokens.needs_renewal(t.expires_at_ms, now) {
            return None;
        }
        match self
            .tokens
            .issue(broadcast_id, peer_id, t.scopes, t.holder_key, now)
        {
            // Recorded only if the session is still in its grid: a session revoked
            // meanwhile gets nothing.
            Ok(renewed)
                if self.grids.set_token(
                    session_id,
                    TokenState {
                        scopes: t.scopes,
                        expires_at_ms: renewed.expires_at_ms,
                        holder_key: t.holder_key,
                    },
                ) =>
            {
                tracing::debug!(
                    session_id,
                    peer_id,
                    expires_at_ms = renewed.expires_at_ms,
                    "chunk token renewed"
                );
                Some((renewed.token, renewed.expires_at_ms))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(session_id, error = %e, "cannot renew chunk token");
                None
            }
        }
    }

    /// Records a viewer's counters (stream or heartbeat): clamping (logged), a lowered
    /// upload budget, the batched database touch. False when the session is not in a
    /// grid of this process.
    pub(super) fn record_counters(
        &self,
        session_id: &Arc<str>,
        counters: [u64; 3],
        upload_kbps: u32,
    ) -> Option<bool> {
        let clamped = self.grids.record_counters(session_id, counters)?;
        if clamped {
            let n = self.metrics.counters_clamped_heartbeat();
            if n == 1 || n.is_multiple_of(1_000) {
                tracing::warn!(
                    session_id = &**session_id,
                    clamped_total = n,
                    "heartbeat counters beyond what is physically possible; clamped"
                );
            }
        }
        if upload_kbps > 0 {
            // The SDK measured a slower uplink than it offered: resize its slots
            // (children beyond them are re-parented; their streams are woken).
            self.grids.set_upload(session_id, upload_kbps);
        }
        // The stream's own id, shared: a touch costs no allocation.
        self.touches.lock().insert(Arc::clone(session_id), now_ms());
        Some(clamped)
    }
}

impl SessionStream {
    /// Counts the stream as open (gauge).
    fn open(&mut self) {
        self.counted = true;
        self.core.metrics.stream_opened();
    }

    /// The last message: the session is over.
    fn end(&mut self) -> SessionDown {
        self.done = true;
        self.core.metrics.pushed(Pushed::End);
        SessionDown::default()
    }

    fn record(&mut self, up: &SessionUp) -> bool {
        self.core.metrics.counters_received();
        self.core
            .record_counters(
                &self.session_id,
                [up.bytes_from_server, up.bytes_from_peers, up.bytes_uploaded],
                up.upload_kbps,
            )
            .is_some()
    }

    /// Everything: all parents (with tickets), neighbours, the token if due, the whole
    /// revocation list, key sets unless the viewer holds them. `None`: session gone.
    fn full_view(&mut self) -> Option<SessionDown> {
        let core = self.core.clone();
        let view = core.grids.view(&self.session_id)?;
        let now = now_ms();
        let a = self.grid.as_mut()?;
        let mut down = SessionDown {
            active: true,
            neighbours_changed: true,
            ..Default::default()
        };
        a.parents = view
            .parents
            .iter()
            .map(|p| p.peer.as_ref().map_or(0, |r| r.peer_id))
            .collect();
        down.parents = view.parents;
        down.run_epoch = core.run_epoch(&a.broadcast_id);
        a.signing_key = core.tokens.signing_key_id();
        // The tickets the join cached are taken: from now on this stream keeps them current.
        a.tickets_renew_at = core
            .tickets
            .attach_with(
                &core.tokens,
                &a.broadcast_id,
                a.peer_id,
                &mut down.parents,
                now,
                Caching::Take,
            )
            .unwrap_or(NEVER);
        a.neighbours = neighbours_fingerprint(view.neighbours.iter().map(|n| n.peer_id));
        down.neighbours = view.neighbours;
        Self::punch_delta(a, &mut down, view.punch);
        a.child_slots = view.child_slots;
        down.child_slots = view.child_slots;
        a.revoked = core.revocations.list(&a.broadcast_id, now);
        down.revoked_peer_ids.clone_from(&a.revoked);
        down.token_expires_at_unix_ms = view.token.map_or(0, |t| t.expires_at_ms);
        if let Some((token, expires)) = core.renew_token(
            &self.session_id,
            &a.broadcast_id,
            a.peer_id,
            view.token,
            now,
        ) {
            down.chunk_token = token;
            down.token_expires_at_unix_ms = expires;
            self.core.metrics.pushed(Pushed::Token);
        }
        a.token_renew_at = renew_point(down.token_expires_at_unix_ms, core.tokens.ttl());
        self.add_keys(&mut down, false);
        Some(down)
    }

    /// Adds the key sets to `down` when they differ from what the viewer holds (or
    /// always, with `force`).
    fn add_keys(&mut self, down: &mut SessionDown, force: bool) {
        let core = &self.core;
        let token_keys = core.tokens.public_keys();
        let chunk_keys = self
            .grid
            .as_ref()
            .map(|a| core.chunk_keys_for(&a.broadcast_id))
            .unwrap_or_default();
        let version = keys_version(&token_keys, &chunk_keys);
        if force || version != self.keys_version {
            self.keys_version = version;
            down.keys_version = version;
            down.token_keys = token_keys;
            down.chunk_keys = chunk_keys;
            if let Some(a) = &self.grid {
                down.ticket_keys = core.ticket_keys(&a.broadcast_id, a.peer_id);
            }
            core.metrics.pushed(Pushed::Keys);
        }
    }

    /// The grid moved this peer (or removed it): send the parents that changed.
    fn on_wake(&mut self) -> Option<SessionDown> {
        let core = self.core.clone();
        let Some(view) = core.grids.view(&self.session_id) else {
            return Some(self.end());
        };
        let now = now_ms();
        let a = self.grid.as_mut()?;
        let mut down = SessionDown {
            active: true,
            ..Default::default()
        };
        let current: Box<[u64]> = view
            .parents
            .iter()
            .map(|p| p.peer.as_ref().map_or(0, |r| r.peer_id))
            .collect();
        let mut changed: Vec<SubstreamParent> = view
            .parents
            .into_iter()
            .zip(current.iter())
            .enumerate()
            .filter(|(s, (_, id))| a.parents.get(*s) != Some(*id))
            .map(|(_, (p, _))| p)
            .collect();
        a.parents = current;
        if !changed.is_empty() {
            if let Some(r) = core.tickets.attach_with(
                &core.tokens,
                &a.broadcast_id,
                a.peer_id,
                &mut changed,
                now,
                Caching::Bypass,
            ) {
                a.tickets_renew_at = a.tickets_renew_at.min(r);
            }
            down.parents = changed;
            core.metrics.pushed(Pushed::Parents);
        }
        Self::neighbours_delta(a, &mut down, &view.neighbours, &core);
        Self::punch_delta(a, &mut down, view.punch);
        if view.child_slots != a.child_slots {
            a.child_slots = view.child_slots;
            down.child_slots = view.child_slots;
        }
        (down
            != SessionDown {
                active: true,
                ..Default::default()
            })
        .then_some(down)
    }

    /// Children assigned since the last message that need this (punch-only) viewer to
    /// punch towards them: those not told before.
    fn punch_delta(a: &mut Attachment, down: &mut SessionDown, children: Vec<PeerRef>) {
        let ids: Vec<u64> = children.iter().map(|c| c.peer_id).collect();
        down.punch = children
            .into_iter()
            .filter(|c| a.punched.binary_search(&c.peer_id).is_err())
            .collect();
        a.punched = ids;
    }

    fn neighbours_delta(
        a: &mut Attachment,
        down: &mut SessionDown,
        neighbours: &[starling_proto::v1::PeerRef],
        core: &Core,
    ) {
        let fp = neighbours_fingerprint(neighbours.iter().map(|n| n.peer_id));
        if fp != a.neighbours {
            a.neighbours = fp;
            down.neighbours_changed = true;
            down.neighbours = neighbours.to_vec();
            core.metrics.pushed(Pushed::Neighbours);
        }
    }

    /// A counters message: recorded; neighbours recomputed; keys if asked.
    fn on_up(&mut self, up: &SessionUp) -> Option<SessionDown> {
        let core = self.core.clone();
        let now = now_ms();
        let min_gap_ms =
            i64::try_from(core.config.session_counters_interval.as_millis() / 4).unwrap_or(0);
        let mut down = SessionDown {
            active: true,
            ..Default::default()
        };
        if now.saturating_sub(self.counters_at_ms) < min_gap_ms {
            // Too soon after the last counters: only a lowered upload budget and a key
            // refresh are taken (both cheap and idempotent).
            if up.upload_kbps > 0 && self.grid.is_some() {
                core.grids.set_upload(&self.session_id, up.upload_kbps);
            }
        } else if self.grid.is_some() {
            self.counters_at_ms = now;
            if !self.record(up) {
                return Some(self.end());
            }
            let neighbours = core.grids.neighbours(&self.session_id)?;
            if let Some(a) = self.grid.as_mut() {
                Self::neighbours_delta(a, &mut down, &neighbours, &core);
            }
        } else {
            // Without grid state: the database keeps the session alive (one write per
            // counters interval) and says when it is over; the rest of this message
            // waits for the write ([`SessionStream::on_touched`]).
            self.counters_at_ms = now;
            core.metrics.counters_received();
            let id = self.session_id.clone();
            let write: Touch = Box::pin(async move { core.store.touch_session(&id, now).await });
            self.touch = Some((write, up.refresh_keys));
            return None;
        }
        if up.refresh_keys {
            self.add_keys(&mut down, true);
        }
        Self::unless_empty(down)
    }

    /// The database write of a counters message (session without grid state) is done.
    fn on_touched(
        &mut self,
        written: Result<bool, StoreError>,
        refresh_keys: bool,
    ) -> Option<SessionDown> {
        match written {
            Ok(true) => {}
            Ok(false) => return Some(self.end()),
            Err(e) => {
                tracing::warn!(session_id = %self.session_id, error = %e, "cannot record a session stream's counters");
            }
        }
        let mut down = SessionDown {
            active: true,
            ..Default::default()
        };
        if refresh_keys {
            self.add_keys(&mut down, true);
        }
        Self::unless_empty(down)
    }

    /// `down` unless it says nothing (`active` only).
    fn unless_empty(down: SessionDown) -> Option<SessionDown> {
        let empty = SessionDown {
            active: true,
            ..Default::default()
        };
        (down != empty).then_some(down)
    }

    /// The rights version changed: new revocations, changed key sets (then tickets move
    /// to the new signing key too).
    fn on_rights(&mut self) -> Option<SessionDown> {
        let core = self.core.clone();
        let now = now_ms();
        let mut down = SessionDown {
            active: true,
            ..Default::default()
        };
        if let Some(a) = self.grid.as_mut() {
            let list = core.revocations.list(&a.broadcast_id, now);
            let new: Vec<u64> = list
                .iter()
                .copied()
                .filter(|p| !a.revoked.contains(p))
                .collect();
            a.revoked = list;
            if !new.is_empty() {
                down.revoked_peer_ids = new;
                core.metrics.pushed(Pushed::Revocations);
            }
        }
        self.add_keys(&mut down, false);
        let resign = self
            .grid
            .as_ref()
            .is_some_and(|a| a.signing_key != core.tokens.signing_key_id());
        if resign {
            self.resend_parents(&mut down, now);
        }
        let empty = SessionDown {
            active: true,
            ..Default::default()
        };
        (down != empty).then_some(down)
    }

    /// Every parent naming a peer again, with tickets re-signed (half their life gone,
    /// or a new signing key).
    fn resend_parents(&mut self, down: &mut SessionDown, now: i64) {
        let core = self.core.clone();
        let Some(view) = core.grids.view(&self.session_id) else {
            return;
        };
        let Some(a) = self.grid.as_mut() else {
            return;
        };
        let mut parents: Vec<SubstreamParent> = view
            .parents
            .into_iter()
            .filter(|p| p.peer.is_some())
            .collect();
        a.signing_key = core.tokens.signing_key_id();
        a.tickets_renew_at = core
            .tickets
            .attach_with(
                &core.tokens,
                &a.broadcast_id,
                a.peer_id,
                &mut parents,
                now,
                Caching::Bypass,
            )
            .unwrap_or(NEVER);
        for p in &parents {
            if let (Some(slot), Some(r)) =
                (a.parents.get_mut(p.substream as usize), p.peer.as_ref())
            {
                *slot = r.peer_id;
            }
        }
        if !parents.is_empty() {
            down.parents = parents;
            core.metrics.pushed(Pushed::Parents);
        }
    }

    /// The timer: token renewal, ticket renewal.
    fn on_timer(&mut self) -> Option<SessionDown> {
        let core = self.core.clone();
        let now = now_ms();
        let mut down = SessionDown {
            active: true,
            ..Default::default()
        };
        let a = self.grid.as_mut()?;
        if now >= a.token_renew_at {
            a.token_renew_at = NEVER;
            let token = core.grids.view(&self.session_id).and_then(|v| v.token);
            let a = self.grid.as_mut()?;
            if let Some((t, expires)) =
                core.renew_token(&self.session_id, &a.broadcast_id, a.peer_id, token, now)
            {
                down.chunk_token = t;
                down.token_expires_at_unix_ms = expires;
                a.token_renew_at = renew_point(expires, core.tokens.ttl());
                core.metrics.pushed(Pushed::Token);
            } else if let Some(t) = token {
                a.token_renew_at = renew_point(t.expires_at_ms, core.tokens.ttl()).max(now + 1000);
            }
        }
        if let Some(a) = self.grid.as_mut()
            && now >= a.tickets_renew_at
        {
            a.tickets_renew_at = NEVER;
            self.resend_parents(&mut down, now);
        }
        let empty = SessionDown {
            active: true,
            ..Default::default()
        };
        (down != empty).then_some(down)
    }

    /// Sets the timer to the next token or ticket renewal (far away when none: an
    /// elapsed timer would fire again at once).
    fn arm_timer(&mut self) {
        let at = self
            .grid
            .as_ref()
            .map_or(NEVER, |a| a.token_renew_at.min(a.tickets_renew_at));
        if at == self.armed_at && !self.timer.is_elapsed() {
            return;
        }
        self.armed_at = at;
        let day = ms(Duration::from_secs(86_400));
        let wait = if at == NEVER {
            day
        } else {
            at.saturating_sub(now_ms()).clamp(0, day)
        };
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(u64::try_from(wait).unwrap_or(0));
        self.timer.as_mut().reset(deadline);
    }
}

/// When a token expiring at `expires_at_ms` needs renewal ([`crate::tokens::needs_renewal`]
/// becomes true just after it).
fn renew_point(expires_at_ms: i64, ttl: Duration) -> i64 {
    if expires_at_ms == 0 {
        return NEVER;
    }
    expires_at_ms.saturating_sub(ms(ttl) / 2).saturating_add(1)
}
