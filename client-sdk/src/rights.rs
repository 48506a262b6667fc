//! Rights and integrity on the SDK side: this viewer's own chunk token (sent in `HELLO`
//! on every link, renewed with `TOKEN` frames) and the holder key it is bound to (a
//! `PROOF` made with it follows every `HELLO_ACK`), the checks of the tokens of peers that
//! connect to us, the revoked peers, and the verification of every chunk against the
//! data plane's signature block.
//!
//! Key sets come from `Join` and are replaced by heartbeats (rotation). They are held as
//! an immutable snapshot behind an `Arc`, so that link readers verify chunks without
//! holding a lock.
//!
//! Replays (issue 18, part 3): the verifier accepts only the broadcast's current run
//! (from `Join`, [`Rights::set_run`]) and, with an age limit, only chunks signed
//! recently by the control plane's clock as measured here ([`crate::clock`]). A chunk
//! of another run is a bad chunk (its sender is dropped and reported), except one of
//! the run this viewer itself held until it learned of the new one less than
//! [`RUN_CHANGE_GRACE`] ago ([`ChunkCheck::Excused`]): links opened before a re-join
//! may still carry it honestly.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use starling_proto::holder::HolderKey;
use starling_proto::integrity::{
    self, ChunkMeta, ChunkVerifier, IntegrityError, VerifiedSignatures,
};
use starling_proto::ticket::TicketClaims;
use starling_proto::ticket_mac::{ParentTicketKeys, verify_any_ticket};
use starling_proto::token::{Scopes, TokenError, TokenVerifier};
use starling_proto::wire::{Chunk, ErrorCode, chunk_flags};
use tokio::sync::{Notify, watch};

use crate::clock::{ClockOffset, ServerTime, WallClock};

/// How long after this viewer learned of a new run chunks of the run it held before
/// are dropped without blaming their sender.
pub(crate) const RUN_CHANGE_GRACE: Duration = Duration::from_secs(30);

/// Most revoked peer ids remembered (oldest forgotten first; their tokens expire soon
/// after revocation anyway, since the control plane stops renewing them).
const MAX_REVOKED: usize = 4096;

/// A public key as the control plane sends it: `(key_id, raw Ed25519 key)`.
pub(crate) type KeyMaterial = (u32, Vec<u8>);

/// Our secret keys for version-2 parent tickets, `(key_id, 32 bytes)`, as the control
/// plane sends them; `Debug` shows only the key ids.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct TicketKeys(pub Vec<KeyMaterial>);

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(id, _)| id))
            .finish()
    }
}

pub(crate) use starling_proto::time::unix_ms;

/// The key sets in force (replaced as a whole).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    tokens: TokenVerifier,
    /// Whether peers must present a valid token. False only when `Join` returned
    /// neither a chunk token nor token keys (a control plane without rights
    /// management, kept working for backward compatibility).
    enforce_tokens: bool,
    /// `None`: `Join` returned no chunk keys (legacy data plane or test fixture):
    /// chunks are not verified (and counted as such).
    chunks: Option<ChunkVerifier>,
    /// Our keys for the version-2 parent tickets naming us (empty: we only admit on
    /// version-1 tickets).
    tickets: ParentTicketKeys,
}

/// What a peer's token grants on a link we accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    /// `None` when tokens are not enforced (legacy control plane).
    pub peer_id: Option<u64>,
    /// Unix ms after which (plus the skew) the link is closed unless renewed.
    pub expires_at_ms: Option<u64>,
    /// The key the token names: the peer must prove it holds it (`PROOF`), and its
    /// renewals must name the same key. `None` when tokens are not enforced.
    pub holder_key: Option<[u8; 32]>,
}

/// Why a peer is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// The outcome of checking one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChunkCheck {
    /// Authentic; the flags to store and relay are the signed ones (a receiver-specific
    /// `DISCONTINUITY` added by the sender is removed).
    Verified { flags: u8 },
    /// No chunk keys: accepted without a check.
    Unverified,
    /// Drop it, without blaming its sender: a chunk of the run this viewer held until
    /// it learned of the current one, less than [`RUN_CHANGE_GRACE`] ago.
    Excused(IntegrityError),
    /// Drop it (and the link it came from, unless that is the data plane).
    Bad(IntegrityError),
}

/// This viewer's own chunk token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OwnToken {
    pub token: Bytes,
    /// Unix ms; 0 = unknown.
    pub expires_at_ms: u64,
}

pub(crate) struct Rights {
    broadcast_id: String,
    skew_ms: u64,
    keys: RwLock<Arc<Keys>>,
    revoked: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    token: watch::Sender<OwnToken>,
    /// The key our token names (set once the viewer has one; a session keeps it across
    /// renewals and re-joins).
    holder: Mutex<Option<Arc<HolderKey>>>,
    /// Shared with the process's other viewers (see [`VerifiedSignatures`]).
    cache: Option<Arc<VerifiedSignatures>>,
    /// The key id of the first chunk key `Join` returned: the control plane lists the
    /// broadcast's ingesting node first. It stays first in every later set that has it,
    /// so the capped set never drops it for other nodes' keys.
    pinned: Mutex<Option<u32>>,
    /// Key refreshes asked for (a chunk named a key id we do not hold) and done.
    refresh: KeyRefresh,
    /// This viewer's clock, corrected to the control plane's.
    clock: ClockOffset,
    /// `(max age, max future)` of a chunk's signed timestamp, ms; `None`: no limit.
    age_limit: Option<(u64, u64)>,
    /// The broadcast's run, and the one held before with when it was left.
    run: Mutex<RunState>,
}

/// The run chunks must be signed for.
#[derive(Debug, Clone, Copy, Default)]
struct RunState {
    /// `None`: not known (no run check).
    current: Option<u64>,
    previous: Option<(u64, std::time::Instant)>,
}

/// Early key refreshes: the engine asks ([`Rights::ask_key_refresh`]), the heartbeat
/// loop beats early and says which asks its answer covers ([`Rights::keys_refreshed`]).
#[derive(Debug)]
struct KeyRefresh {
    /// Asks so far (a ticket is the count after one's own ask).
    asked: AtomicU64,
    /// The highest ticket covered by a heartbeat answer (a beat started after the ask).
    done: watch::Sender<u64>,
    wake: Notify,
}

fn build_tokens(keys: &[KeyMaterial]) -> TokenVerifier {
    let mut v = TokenVerifier::new();
    for (id, k) in keys {
        if let Err(e) = v.add_key(*id, k) {
            tracing::warn!(key_id = id, "ignoring a token key: {e}");
        }
    }
    v
}

/// The verifier for `keys`, in the control plane's order except that the `pinned` key
/// id (the ingesting node's) goes first; one key per id (the first listed wins), at
/// most [`integrity::MAX_KEYS`]: the keys beyond are left out (never the pinned one).
fn build_chunks(
    broadcast_id: &str,
    keys: &[KeyMaterial],
    pinned: Option<u32>,
    cache: Option<&Arc<VerifiedSignatures>>,
    (age_limit, run): (Option<(u64, u64)>, Option<u64>),
) -> ChunkVerifier {
    let mut v = ChunkVerifier::new(broadcast_id).with_run(run);
    if let Some((max_age, max_future)) = age_limit {
        v = v.with_age_limit(max_age, max_future);
    }
    if let Some(c) = cache {
        v = v.with_cache(c.clone());
    }
    let first = keys.iter().filter(|(id, _)| Some(*id) == pinned).take(1);
    let rest = keys.iter().filter(|(id, _)| Some(*id) != pinned);
    let mut added: Vec<u32> = Vec::new();
    let mut left_out = 0usize;
    for (id, k) in first.chain(rest) {
        if added.contains(id) {
            continue;
        }
        if added.len() >= integrity::MAX_KEYS {
            left_out += 1;
            continue;
        }
        match v.add_key(*id, k) {
            Ok(()) => added.push(*id),
            Err(e) => tracing::warn!(key_id = id, "ignoring a chunk key: {e}"),
        }
    }
    if left_out > 0 {
        tracing::warn!(
            left_out,
            max = integrity::MAX_KEYS,
            "more chunk keys than a verifier holds: the last ones are left out"
        );
    }
    v
}

impl Rights {
    /// `token`: our chunk token (from `Join`, or the configured one for direct
    /// connections); empty key lists mean "no rights management" as described on
    /// [`Keys`].
    pub(crate) fn new(
        broadcast_id: &str,
        skew: Duration,
        token: OwnToken,
        token_keys: &[KeyMaterial],
        chunk_keys: &[KeyMaterial],
        cache: Option<Arc<VerifiedSignatures>>,
    ) -> Rights {
        let pinned = chunk_keys.first().map(|(id, _)| *id);
        let keys = Keys {
            tokens: build_tokens(token_keys),
            enforce_tokens: !token.token.is_empty() || !token_keys.is_empty(),
            chunks: (!chunk_keys.is_empty()).then(|| {
                build_chunks(
                    broadcast_id,
                    chunk_keys,
                    pinned,
                    cache.as_ref(),
                    (None, None),
                )
            }),
            tickets: ParentTicketKeys::default(),
        };
        let (tx, _) = watch::channel(token);
        Rights {
            broadcast_id: broadcast_id.to_string(),
            skew_ms: u64::try_from(skew.as_millis()).unwrap_or(u64::MAX),
            keys: RwLock::new(Arc::new(keys)),
            revoked: Mutex::new((HashSet::new(), VecDeque::new())),
            token: tx,
            holder: Mutex::new(None),
            cache,
            pinned: Mutex::new(pinned),
            refresh: KeyRefresh {
                asked: AtomicU64::new(0),
                done: watch::channel(0).0,
                wake: Notify::new(),
            },
            clock: ClockOffset::new(WallClock::system()),
            age_limit: None,
            run: Mutex::new(RunState::default()),
        }
    }

    /// The clock this viewer reads and the chunk age limit (`max_age`: `None` = none;
    /// `max_future`: how far ahead a signed timestamp may be).
    pub(crate) fn with_chunk_clock(
        mut self,
        clock: WallClock,
        max_age: Option<Duration>,
        max_future: Duration,
    ) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.clock = ClockOffset::new(clock);
        self.age_limit = max_age.map(|a| (ms(a), ms(max_future)));
        self.rebuild_chunks();
        self
    }

    fn checks(&self) -> (Option<(u64, u64)>, Option<u64>) {
        (self.age_limit, self.run.lock().current)
    }

    /// Rebuilds the chunk verifier with the current age limit and run.
    fn rebuild_chunks(&self) {
        let checks = self.checks();
        let mut guard = self.keys.write();
        if let Some(v) = &guard.chunks {
            let mut v = v.clone().with_run(checks.1);
            if let Some((max_age, max_future)) = checks.0 {
                v = v.with_age_limit(max_age, max_future);
            }
            let mut k = Keys::clone(&guard);
            k.chunks = Some(v);
            *guard = Arc::new(k);
        }
    }

    /// The broadcast's current run, from `Join` or the session stream (0: not said,
    /// nothing changes). A change remembers the run held before for
    /// [`RUN_CHANGE_GRACE`].
    pub(crate) fn set_run(&self, epoch: u64) {
        if epoch == 0 {
            return;
        }
        {
            let mut r = self.run.lock();
            if r.current == Some(epoch) {
                return;
            }
            tracing::info!(run = epoch, previous = ?r.current, "broadcast run");
            r.previous = r.current.map(|c| (c, std::time::Instant::now()));
            r.current = Some(epoch);
        }
        self.rebuild_chunks();
    }

    /// The run chunks must be signed for, if known.
    #[cfg(test)]
    pub(crate) fn run(&self) -> Option<u64> {
        self.run.lock().current
    }

    /// A control-plane clock reading: adopts the offset it gives.
    pub(crate) fn observe_server_time(&self, t: Option<ServerTime>) {
        if let Some(t) = t {
            self.clock.observe(t);
        }
    }

    /// The control plane's time as estimated here (unix ms): chunk ages, token and
    /// ticket expiries are judged by it.
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The measured offset to the control plane's clock, ms.
    pub(crate) fn clock_offset_ms(&self) -> i64 {
        self.clock.offset_ms()
    }

    fn pinned(&self) -> Option<u32> {
        *self.pinned.lock()
    }

    // ----- early key refreshes -----------------------------------------------------

    /// Asks the heartbeat loop for the current keys now (a chunk named a key id we do
    /// not hold). Returns the ticket a later [`Rights::keys_refreshed`] covers.
    pub(crate) fn ask_key_refresh(&self) -> u64 {
        let ticket = self.refresh.asked.fetch_add(1, Ordering::Relaxed) + 1;
        self.refresh.wake.notify_one();
        ticket
    }

    /// Resolves when a key refresh has been asked for (and not yet waited for).
    pub(crate) async fn key_refresh_asked(&self) {
        self.refresh.wake.notified().await;
    }

    /// The asks so far: a heartbeat started now covers them all.
    pub(crate) fn key_refresh_tickets(&self) -> u64 {
        self.refresh.asked.load(Ordering::Relaxed)
    }

    /// A heartbeat that started when [`Rights::key_refresh_tickets`] was `ticket`
    /// delivered the current keys (already applied).
    pub(crate) fn keys_refreshed(&self, ticket: u64) {
        self.refresh.done.send_if_modified(|d| {
            if ticket > *d {
                *d = ticket;
                true
            } else {
                false
            }
        });
    }

    /// The highest ticket covered by a key refresh, as it changes.
    pub(crate) fn watch_key_refreshes(&self) -> watch::Receiver<u64> {
        self.refresh.done.subscribe()
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys.read().clone()
    }

    /// Replaces the key sets that are given (an empty list keeps the current set).
    pub(crate) fn update_keys(&self, token_keys: &[KeyMaterial], chunk_keys: &[KeyMaterial]) {
        if token_keys.is_empty() && chunk_keys.is_empty() {
            return;
        }
        let mut guard = self.keys.write();
        let mut k = Keys::clone(&guard);
        if !token_keys.is_empty() {
            k.tokens = build_tokens(token_keys);
            k.enforce_tokens = true;
        }
        if !chunk_keys.is_empty() {
            k.chunks = Some(build_chunks(
                &self.broadcast_id,
                chunk_keys,
                self.pinned(),
                self.cache.as_ref(),
                self.checks(),
            ));
        }
        *guard = Arc::new(k);
    }

    /// Replaces our ticket keys (from `Join`, or with new key sets): kept when `keys` is
    /// empty unless `always` (a re-join: a new peer id, so the old keys name nobody).
    pub(crate) fn set_ticket_keys(&self, keys: &TicketKeys, always: bool) {
        if keys.0.is_empty() && !always {
            return;
        }
        let tickets = ParentTicketKeys::from_raw(keys.0.iter().map(|(id, k)| (*id, k.as_slice())));
        let mut guard = self.keys.write();
        let mut k = Keys::clone(&guard);
        k.tickets = tickets;
        *guard = Arc::new(k);
    }

    /// After a re-join: its token decides enforcement again, its key sets replace ours.
    pub(crate) fn rejoined(
        &self,
        token: OwnToken,
        token_keys: &[KeyMaterial],
        chunk_keys: &[KeyMaterial],
        run: u64,
    ) {
        self.set_run(run);
        {
            let mut guard = self.keys.write();
            let mut k = Keys::clone(&guard);
            if !token_keys.is_empty() {
                k.tokens = build_tokens(token_keys);
            }
            k.enforce_tokens = k.enforce_tokens || !token.token.is_empty();
            if let Some((id, _)) = chunk_keys.first() {
                // The node this Join sent us to ingests the broadcast now.
                *self.pinned.lock() = Some(*id);
            }
            if !chunk_keys.is_empty() {
                k.chunks = Some(build_chunks(
                    &self.broadcast_id,
                    chunk_keys,
                    self.pinned(),
                    self.cache.as_ref(),
                    self.checks(),
                ));
            }
            *guard = Arc::new(k);
        }
        self.set_token(token);
    }

    // ----- our own token -----------------------------------------------------------

    pub(crate) fn token(&self) -> Bytes {
        self.token.borrow().token.clone()
    }

    /// Replaces our token; links are told through [`Rights::watch_token`].
    pub(crate) fn set_token(&self, t: OwnToken) {
        self.token.send_if_modified(|cur| {
            if *cur == t {
                false
            } else {
                *cur = t;
                true
            }
        });
    }

    pub(crate) fn watch_token(&self) -> watch::Receiver<OwnToken> {
        self.token.subscribe()
    }

    /// The key our token names (`None`: not set, no `PROOF` is sent).
    pub(crate) fn holder(&self) -> Option<Arc<HolderKey>> {
        self.holder.lock().clone()
    }

    pub(crate) fn set_holder(&self, key: Option<Arc<HolderKey>>) {
        *self.holder.lock() = key;
    }

    // ----- peers' tokens and revocation --------------------------------------------

    /// Checks the token a peer presents (in `HELLO` or a `TOKEN` frame).
    pub(crate) fn check_peer_token(&self, token: &[u8]) -> Result<Grant, Refusal> {
        let keys = self.keys();
        if !keys.enforce_tokens {
            return Ok(Grant {
                peer_id: None,
                expires_at_ms: None,
                holder_key: None,
            });
        }
        if token.is_empty() {
            return Err(Refusal {
                code: ErrorCode::Unauthorized,
                message: "chunk token required".into(),
            });
        }
        let claims = keys
            .tokens
            .verify(
                token,
                &self.broadcast_id,
                Scopes::PLAY,
                self.now_ms(),
                self.skew_ms,
            )
            .map_err(|e: TokenError| Refusal {
                code: ErrorCode::Unauthorized,
                message: e.to_string(),
            })?;
        if self.is_revoked(claims.peer_id) {
            return Err(Refusal {
                code: ErrorCode::Revoked,
                message: "peer revoked".into(),
            });
        }
        Ok(Grant {
            peer_id: Some(claims.peer_id),
            expires_at_ms: Some(claims.expires_at_ms),
            holder_key: Some(claims.holder_key),
        })
    }

    /// Whether peers' tokens and tickets are checked (the control plane issues them).
    pub(crate) fn enforced(&self) -> bool {
        self.keys().enforce_tokens
    }

    /// Clock-skew tolerance for peers' tokens and tickets, ms.
    pub(crate) fn skew_ms(&self) -> u64 {
        self.skew_ms
    }

    /// Whether our own token lets us serve other peers (scope `RELAY`). True without a
    /// token (no rights management: nothing to go by).
    pub(crate) fn may_relay(&self) -> bool {
        let t = self.token();
        t.is_empty()
            || starling_proto::token::peek_unverified(&t)
                .is_ok_and(|(_, c)| c.scopes.contains(Scopes::RELAY))
    }

    /// Checks a parent ticket presented by peer `child` (its token's id) to us,
    /// `parent`: authentic, in force, this broadcast, naming both of us.
    pub(crate) fn check_ticket(
        &self,
        ticket: &[u8],
        child: u64,
        parent: u64,
    ) -> Result<TicketClaims, Refusal> {
        let keys = self.keys();
        verify_any_ticket(
            ticket,
            &keys.tokens,
            &keys.tickets,
            &self.broadcast_id,
            child,
            parent,
            self.now_ms(),
            self.skew_ms,
        )
        .map_err(|e| Refusal {
            code: ErrorCode::Unauthorized,
            message: format!("ticket_{}: {e}", e.reason()),
        })
    }

    /// True once `grant` has expired (past its expiry plus the clock-skew tolerance).
    pub(crate) fn expired(&self, grant: &Grant, now_ms: u64) -> bool {
        grant
            .expires_at_ms
            .is_some_and(|e| now_ms >= e.saturating_add(self.skew_ms))
    }

    pub(crate) fn revoke(&self, ids: &[u64]) {
        let mut g = self.revoked.lock();
        let (set, order) = &mut *g;
        for &id in ids {
            if set.insert(id) {
                order.push_back(id);
                if order.len() > MAX_REVOKED
                    && let Some(old) = order.pop_front()
                {
                    set.remove(&old);
                }
            }
        }
    }

    pub(crate) fn is_revoked(&self, id: u64) -> bool {
        self.revoked.lock().0.contains(&id)
    }

    // ----- chunks ------------------------------------------------------------------

    /// Checks a chunk against its signature block (SHA-256 of the payload included).
    pub(crate) fn check_chunk(&self, c: &Chunk) -> ChunkCheck {
        let keys = self.keys();
        let Some(v) = &keys.chunks else {
            return ChunkCheck::Unverified;
        };
        let mut meta = ChunkMeta {
            seq: c.seq,
            flags: c.flags,
            timestamp_ms: c.timestamp_ms,
            duration_ms: c.duration_ms,
        };
        // A sender sets DISCONTINUITY for its own receiver (it skipped chunks for it);
        // that bit is not part of what was signed when the chunk was cut.
        if c.flags & chunk_flags::DISCONTINUITY != 0
            && let Ok(b) = integrity::parse_block(&c.signature)
            && b.meta.flags == c.flags & !chunk_flags::DISCONTINUITY
        {
            meta.flags = b.meta.flags;
        }
        match v.verify(&meta, &c.payload, &c.signature, self.now_ms()) {
            Ok(()) => ChunkCheck::Verified { flags: meta.flags },
            // An authentic chunk of a later run than ours: only a node the control
            // plane assigned to the broadcast signs one, and only once that run
            // started, so a replay can never bring it. Our run is out of date (a `Join`
            // answered from a replica's cache just after a restart): adopt it.
            Err(IntegrityError::WrongRun { signed, current }) if signed > current => {
                tracing::info!(
                    run = signed,
                    previous = current,
                    "a newer run of the broadcast"
                );
                self.set_run(signed);
                let keys = self.keys();
                match keys
                    .chunks
                    .as_ref()
                    .map(|v| v.verify(&meta, &c.payload, &c.signature, self.now_ms()))
                {
                    Some(Ok(())) => ChunkCheck::Verified { flags: meta.flags },
                    Some(Err(e)) => ChunkCheck::Bad(e),
                    None => ChunkCheck::Unverified,
                }
            }
            Err(e @ IntegrityError::WrongRun { signed, .. }) => {
                let excused =
                    self.run.lock().previous.is_some_and(|(p, since)| {
                        p == signed && since.elapsed() < RUN_CHANGE_GRACE
                    });
                if excused {
                    ChunkCheck::Excused(e)
                } else {
                    ChunkCheck::Bad(e)
                }
            }
            Err(e) => ChunkCheck::Bad(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use starling_proto::integrity::ChunkSigner;
    use starling_proto::token::{TokenClaims, TokenSigner, generate_pkcs8};

    fn chunk(seq: u64, flags: u8, signer: &ChunkSigner) -> Chunk {
        let payload = Bytes::from(vec![seq as u8; 300]);
        let meta = ChunkMeta {
            seq,
            flags,
            timestamp_ms: 1_700_000_000_000,
            duration_ms: 100,
        };
        Chunk {
            seq,
            flags,
            timestamp_ms: meta.timestamp_ms,
            duration_ms: 100,
            signature: signer.sign("b", &meta, &payload).unwrap(),
            payload,
        }
    }

    fn chunk_at(seq: u64, run: u64, ts: u64, signer: &ChunkSigner) -> Chunk {
        let payload = Bytes::from(vec![seq as u8; 100]);
        let meta = ChunkMeta {
            seq,
            flags: 0,
            timestamp_ms: ts,
            duration_ms: 100,
        };
        Chunk {
            seq,
            flags: 0,
            timestamp_ms: ts,
            duration_ms: 100,
            signature: signer.sign_in_run("b", run, &meta, &payload).unwrap(),
            payload,
        }
    }

    #[test]
    fn runs_ages_and_the_device_clock() {
        const NOW: u64 = 1_700_000_000_000;
        let signer = ChunkSigner::new(4, &generate_pkcs8().unwrap()).unwrap();
        // The device is an hour ahead; the control plane says it is NOW.
        let r = Rights::new(
            "b",
            Duration::from_secs(5),
            OwnToken::default(),
            &[],
            &[(4, signer.public_key().to_vec())],
            None,
        )
        .with_chunk_clock(
            WallClock::from_fn(|| NOW + 3_600_000),
            Some(Duration::from_secs(30)),
            Duration::from_secs(10),
        );
        let fresh = chunk_at(1, 1, NOW, &signer);
        // Without the offset the chunk looks an hour old.
        assert!(matches!(
            r.check_chunk(&fresh),
            ChunkCheck::Bad(IntegrityError::Stale { .. })
        ));
        r.observe_server_time(Some(ServerTime {
            server_ms: NOW,
            received: std::time::Instant::now(),
            rtt: Duration::ZERO,
        }));
        assert!(matches!(r.check_chunk(&fresh), ChunkCheck::Verified { .. }));
        let old = chunk_at(2, 1, NOW - 31_000, &signer);
        assert!(matches!(
            r.check_chunk(&old),
            ChunkCheck::Bad(IntegrityError::Stale { .. })
        ));
        // No run known yet: any run passes; once known, only it.
        assert_eq!(r.run(), None);
        r.set_run(1);
        assert!(matches!(r.check_chunk(&fresh), ChunkCheck::Verified { .. }));
        r.set_run(0);
        assert_eq!(r.run(), Some(1), "0 changes nothing");
        // An older run is refused; a newer one (authentic: only an assigned node signs
        // it, once it started) is adopted, as a re-join would learn it.
        let run2 = chunk_at(1, 2, NOW, &signer);
        r.set_run(3);
        assert_eq!(
            r.check_chunk(&run2),
            ChunkCheck::Bad(IntegrityError::WrongRun {
                signed: 2,
                current: 3
            })
        );
        r.set_run(1);
        assert!(matches!(r.check_chunk(&run2), ChunkCheck::Verified { .. }));
        assert_eq!(r.run(), Some(2));
        // A re-join learns run 2 (here already adopted): run 1 is excused for a while,
        // run 0 never.
        r.rejoined(OwnToken::default(), &[], &[], 2);
        assert!(matches!(r.check_chunk(&run2), ChunkCheck::Verified { .. }));
        assert_eq!(
            r.check_chunk(&fresh),
            ChunkCheck::Excused(IntegrityError::WrongRun {
                signed: 1,
                current: 2
            })
        );
        let run0 = chunk_at(1, 0, NOW, &signer);
        assert!(matches!(
            r.check_chunk(&run0),
            ChunkCheck::Bad(IntegrityError::WrongRun { signed: 0, .. })
        ));
        // New keys keep the run and the age limit.
        r.update_keys(&[], &[(4, signer.public_key().to_vec())]);
        assert!(matches!(r.check_chunk(&run0), ChunkCheck::Bad(_)));
        assert!(matches!(
            r.check_chunk(&chunk_at(3, 2, NOW - 31_000, &signer)),
            ChunkCheck::Bad(IntegrityError::Stale { .. })
        ));
    }

    #[test]
    fn chunks_are_verified_and_the_receiver_discontinuity_is_tolerated() {
        let signer = ChunkSigner::new(4, &generate_pkcs8().unwrap()).unwrap();
        let r = Rights::new(
            "b",
            Duration::from_secs(5),
            OwnToken::default(),
            &[],
            &[(4, signer.public_key().to_vec())],
            None,
        );
        let c = chunk(1, chunk_flags::RANDOM_ACCESS, &signer);
        assert_eq!(
            r.check_chunk(&c),
            ChunkCheck::Verified {
                flags: chunk_flags::RANDOM_ACCESS
            }
        );
        let mut d = c.clone();
        d.flags |= chunk_flags::DISCONTINUITY;
        assert_eq!(
            r.check_chunk(&d),
            ChunkCheck::Verified {
                flags: chunk_flags::RANDOM_ACCESS
            }
        );
        // A DISCONTINUITY that was signed stays.
        let s = chunk(2, chunk_flags::DISCONTINUITY, &signer);
        assert_eq!(
            r.check_chunk(&s),
            ChunkCheck::Verified {
                flags: chunk_flags::DISCONTINUITY
            }
        );
        let mut bad = c.clone();
        let mut p = bad.payload.to_vec();
        p[10] ^= 1;
        bad.payload = Bytes::from(p);
        assert_eq!(
            r.check_chunk(&bad),
            ChunkCheck::Bad(IntegrityError::HashMismatch)
        );
        let mut unsigned = c.clone();
        unsigned.signature = Bytes::new();
        assert!(matches!(r.check_chunk(&unsigned), ChunkCheck::Bad(_)));
        // Other header flags are not tolerated.
        let mut hdr = c;
        hdr.flags = 0;
        assert_eq!(
            r.check_chunk(&hdr),
            ChunkCheck::Bad(IntegrityError::HeaderMismatch)
        );
        // Without keys: unverified.
        let legacy = Rights::new("b", Duration::ZERO, OwnToken::default(), &[], &[], None);
        assert_eq!(legacy.check_chunk(&s), ChunkCheck::Unverified);
    }

    /// Version-2 tickets are checked with our ticket keys, version 1 with the token
    /// keys; a re-join's (empty) keys replace ours.
    #[test]
    fn tickets_of_both_versions() {
        use starling_proto::ticket::TicketClaims;
        let signer = TokenSigner::new(1, &generate_pkcs8().unwrap()).unwrap();
        let now = unix_ms();
        let claims = TicketClaims {
            broadcast_id: "b".into(),
            child_peer_id: 42,
            parent_peer_id: 7,
            substream_mask: 1,
            issued_at_ms: now - 1_000,
            expires_at_ms: now + 60_000,
        };
        let r = Rights::new(
            "b",
            Duration::ZERO,
            OwnToken::default(),
            &[(1, signer.public_key().to_vec())],
            &[],
            None,
        );
        let v1 = signer.sign_ticket(&claims).unwrap();
        let v2 = signer.sign_ticket_mac(&claims).unwrap();
        assert_eq!(r.check_ticket(&v1, 42, 7).unwrap(), claims);
        let refused = r.check_ticket(&v2, 42, 7).unwrap_err();
        assert!(
            refused.message.starts_with("ticket_unknown_key"),
            "{refused:?}"
        );
        let k = signer.ticket_key("b", 7).unwrap();
        r.set_ticket_keys(&TicketKeys(vec![(k.key_id, k.key.to_vec())]), false);
        assert_eq!(r.check_ticket(&v2, 42, 7).unwrap(), claims);
        assert!(r.check_ticket(&v2, 43, 7).is_err());
        // Empty keys keep ours, except after a re-join.
        r.set_ticket_keys(&TicketKeys::default(), false);
        assert!(r.check_ticket(&v2, 42, 7).is_ok());
        r.set_ticket_keys(&TicketKeys::default(), true);
        assert!(r.check_ticket(&v2, 42, 7).is_err());
        assert_eq!(
            format!("{:?}", TicketKeys(vec![(1, k.key.to_vec())])),
            "[1]"
        );
    }

    #[test]
    fn peer_tokens() {
        let signer = TokenSigner::new(1, &generate_pkcs8().unwrap()).unwrap();
        let now = unix_ms();
        let sign = |peer_id: u64, exp: u64| {
            signer
                .sign(&TokenClaims {
                    broadcast_id: "b".into(),
                    peer_id,
                    session_id: 1,
                    scopes: Scopes::PLAY | Scopes::RELAY,
                    issued_at_ms: now - 60_000,
                    expires_at_ms: exp,
                    holder_key: [3; 32],
                })
                .unwrap()
        };
        let own = OwnToken {
            token: sign(1, now + 60_000),
            expires_at_ms: now + 60_000,
        };
        let r = Rights::new(
            "b",
            Duration::from_secs(1),
            own,
            &[(1, signer.public_key().to_vec())],
            &[],
            None,
        );
        let g = r.check_peer_token(&sign(7, now + 60_000)).unwrap();
        assert_eq!(g.peer_id, Some(7));
        assert!(!r.expired(&g, now));
        assert!(r.expired(&g, now + 61_000));
        assert_eq!(
            r.check_peer_token(b"").unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(
            r.check_peer_token(&sign(7, now - 2_000)).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        r.revoke(&[7]);
        assert_eq!(
            r.check_peer_token(&sign(7, now + 60_000)).unwrap_err().code,
            ErrorCode::Revoked
        );
        // Legacy: no token, no keys.
        let legacy = Rights::new("b", Duration::ZERO, OwnToken::default(), &[], &[], None);
        assert_eq!(legacy.check_peer_token(b"").unwrap().peer_id, None);
        // A token but no keys: enforced (everyone refused until keys arrive).
        let strict = Rights::new(
            "b",
            Duration::ZERO,
            OwnToken {
                token: Bytes::from_static(b"t"),
                expires_at_ms: 0,
            },
            &[],
            &[],
            None,
        );
        assert!(strict.check_peer_token(&sign(7, now + 60_000)).is_err());
        strict.update_keys(&[(1, signer.public_key().to_vec())], &[]);
        assert!(strict.check_peer_token(&sign(7, now + 60_000)).is_ok());
    }
}
