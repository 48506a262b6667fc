//! Chunk tokens on the control-plane side: the signing keys (persisted in the database,
//! rotated at start-up on request), issuing and renewal decisions, and the recent
//! revocations that viewers and nodes are told about.
//!
//! Token format and verification: [`starling_proto::token`].
//!
//! # Keys
//!
//! The Ed25519 signing keys live in the `token_keys` table (PKCS#8), for SQLite and
//! Postgres alike: every replica on one Postgres database signs with the same key, and a
//! restarted control plane keeps it, so tokens already handed out stay valid. Whoever can
//! read that table can mint chunk tokens (see the trust model in ARCHITECTURE.md).
//!
//! A rotation ([`TokenKeys::load`] with `rotate`, the binary's `--rotate-token-key`)
//! inserts a new key and marks every older one to retire [`RETIRE_AFTER`] later. The new
//! key is published at once but signs only [`SIGN_LEAD`] after its creation: by then every
//! data-plane node (a `KeysCommand` at the next key refresh) and every viewer (its next
//! heartbeat) knows it, so a peer that presents a freshly renewed token to a parent or
//! neighbour is never refused for an unknown key id. The signing key is the newest one
//! past that lead (the oldest one when none is, e.g. a new deployment's first key). Old
//! keys stay published until they retire (the longest token lifetime plus the lead and
//! a clock-skew margin), so tokens they signed keep verifying and nobody is dropped. [`TokenKeys::refresh`] (run periodically) reloads the table, so
//! other replicas pick up a rotation and retired keys stop being published; nodes get
//! every change as a `KeysCommand`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use starling_proto::ticket::{TicketClaims, TicketError};
use starling_proto::token::{KeyError, Scopes, TokenClaims, TokenError, TokenSigner};
use starling_proto::v1::{PublicKey, TicketKey};

use crate::store::{Store, StoreError, TokenKeyRecord};

/// Default chunk-token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(120);
/// Longest chunk-token lifetime accepted (the design's "≤ 120 s").
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(120);
/// Shortest chunk-token lifetime accepted (renewal happens at half of it, and must fit
/// a few heartbeats).
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(1);
/// Clock-skew margin added to every "one token lifetime" (retiring keys, forgetting
/// revocations): verifiers accept a token up to their own skew after its expiry.
pub const SKEW_MARGIN: Duration = Duration::from_secs(30);
/// A new signing key is published this long before it signs: at least the key refresh
/// period (5 s by default: nodes and other replicas pick it up) plus a viewer heartbeat
/// interval (1–5 s), with margin.
pub const SIGN_LEAD: Duration = Duration::from_secs(20);
/// How long a replaced signing key stays published: it may sign for [`SIGN_LEAD`] after
/// the rotation, and any token it signed has expired one maximum lifetime later, whatever
/// TTL the process that issued it used.
pub const RETIRE_AFTER: Duration =
    Duration::from_secs(MAX_TOKEN_TTL.as_secs() + SKEW_MARGIN.as_secs() + SIGN_LEAD.as_secs());

/// The lowest bit of a peer id says which parent tickets that peer checks: set = it
/// asked for version 2 (`JoinRequest.mac_tickets`). The control plane picks peer ids at
/// random with this bit fixed, so whoever signs a ticket naming a parent knows the
/// version to make from the id alone: no lookup, no memory per peer, the same answer in
/// every replica.
pub const MAC_TICKETS_BIT: u64 = 1;

/// `random` (a random peer id) with [`MAC_TICKETS_BIT`] set as `mac` says.
pub fn peer_id_with_ticket_version(random: u64, mac: bool) -> u64 {
    if mac {
        random | MAC_TICKETS_BIT
    } else {
        random & !MAC_TICKETS_BIT
    }
}

/// Whether parent `peer_id` checks version-2 tickets (see [`MAC_TICKETS_BIT`]).
pub fn takes_mac_tickets(peer_id: u64) -> bool {
    peer_id & MAC_TICKETS_BIT != 0
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Errors loading or rotating the signing keys.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored key is not a valid Ed25519 PKCS#8 key, or key generation failed.
    #[error("chunk-token key {key_id}: {source}")]
    Key {
        /// The key id (0 for a key not stored yet).
        key_id: u32,
        /// Cause.
        source: KeyError,
    },
    /// The table holds no usable key (should not happen after [`TokenKeys::load`]).
    #[error("no chunk-token signing key")]
    NoKey,
}

/// A token as handed to a viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The encoded, signed token.
    pub token: Vec<u8>,
    /// Its expiry, unix ms.
    pub expires_at_ms: i64,
}

/// The current key set: the signer plus the public keys to publish.
#[derive(Debug)]
struct KeySet {
    signer: Arc<TokenSigner>,
    /// Published keys (signer first), with the retire time of each (`None` = current).
    published: Vec<(PublicKey, Option<i64>)>,
    /// The signers of the published keys, in the same order: a relaying viewer gets its
    /// version-2 ticket key under each ([`TokenKeys::ticket_keys`]), so it admits on
    /// tickets made before a rotation and right after it.
    all: Vec<Arc<TokenSigner>>,
}

/// The chunk-token signing keys and the token lifetime.
#[derive(Debug)]
pub struct TokenKeys {
    ttl: Duration,
    set: RwLock<Arc<KeySet>>,
}

impl TokenKeys {
    /// Loads the keys from the database, creating the first one if there is none, or a
    /// new one (retiring the others after [`RETIRE_AFTER`]) when `rotate` is set.
    ///
    /// # Errors
    /// The database failed, or a stored key is unusable.
    pub async fn load(
        store: &Store,
        ttl: Duration,
        rotate: bool,
        now_ms: i64,
    ) -> Result<TokenKeys, TokenKeyError> {
        let ttl = ttl.clamp(MIN_TOKEN_TTL, MAX_TOKEN_TTL);
        let mut records = store.list_token_keys().await?;
        if records.is_empty() || rotate {
            let pkcs8 = starling_proto::token::generate_pkcs8()
                .map_err(|source| TokenKeyError::Key { key_id: 0, source })?;
            // Two replicas creating the first key at once: one insert fails on the key
            // id; the loser uses the winner's key (or, rotating, tries once more).
            let mut attempt = 0;
            loop {
                match store
                    .add_token_key(&pkcs8, now_ms, now_ms.saturating_add(ms(RETIRE_AFTER)))
                    .await
                {
                    Ok(key_id) => {
                        tracing::info!(
                            key_id,
                            rotated = !records.is_empty(),
                            retire_previous_after_s = RETIRE_AFTER.as_secs(),
                            "new chunk-token signing key"
                        );
                        break;
                    }
                    Err(StoreError::AlreadyExists { .. }) if attempt == 0 => {
                        attempt += 1;
                        if !rotate {
                            break;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            records = store.list_token_keys().await?;
        }
        let set = build_set(&records, now_ms, None)?;
        tracing::info!(
            signing_key_id = set.signer.key_id(),
            published = set.published.len(),
            ttl_ms = ms(ttl),
            "chunk-token keys loaded"
        );
        Ok(TokenKeys {
            ttl,
            set: RwLock::new(Arc::new(set)),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        self.set.read().clone()
    }

    /// Reloads the key table (a rotation by another replica, keys whose retire time
    /// passed). Returns whether the published key set changed (then tell the nodes).
    ///
    /// # Errors
    /// The database failed, or a stored key is unusable (the current set is kept).
    pub async fn refresh(&self, store: &Store, now_ms: i64) -> Result<bool, TokenKeyError> {
        let records = store.list_token_keys().await?;
        let old = self.current();
        let set = build_set(&records, now_ms, Some(&old.signer))?;
        let changed = set.signer.key_id() != old.signer.key_id()
            || set
                .published
                .iter()
                .map(|(k, _)| k)
                .ne(old.published.iter().map(|(k, _)| k));
        if changed {
            tracing::info!(
                signing_key_id = set.signer.key_id(),
                published = ?set.published.iter().map(|(k, _)| k.key_id).collect::<Vec<_>>(),
                "chunk-token key set changed"
            );
            *self.set.write() = Arc::new(set);
        }
        Ok(changed)
    }

    /// Token lifetime.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The id of the key that signs.
    pub fn signing_key_id(&self) -> u32 {
        self.current().signer.key_id()
    }

    /// Every public key a verifier must accept now (the signing key first).
    pub fn public_keys(&self) -> Vec<PublicKey> {
        self.current()
            .published
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Signs a token for `peer_id` of `broadcast_id`, valid from `now_ms` for the TTL,
    /// bound to the session's `holder_key` (`JoinRequest.holder_key`; renewals keep it).
    /// The token's `session_id` is the peer id (unique per session, never reused).
    ///
    /// # Errors
    /// The claims cannot be encoded (e.g. an over-long broadcast id).
    pub fn issue(
        &self,
        broadcast_id: &str,
        peer_id: u64,
        scopes: Scopes,
        holder_key: [u8; 32],
        now_ms: i64,
    ) -> Result<IssuedToken, TokenError> {
        let issued = u64::try_from(now_ms).unwrap_or(0);
        let expires =
            issued.saturating_add(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX));
        let token = self.current().signer.sign(&TokenClaims {
            broadcast_id: broadcast_id.to_string(),
            peer_id,
            session_id: peer_id,
            scopes,
            issued_at_ms: issued,
            expires_at_ms: expires,
            holder_key,
        })?;
        Ok(IssuedToken {
            token: token.to_vec(),
            expires_at_ms: i64::try_from(expires).unwrap_or(i64::MAX),
        })
    }

    /// Signs a parent ticket (see [`crate::tickets`]) with the current signing key;
    /// returns that key's id with the ticket.
    ///
    /// # Errors
    /// The claims cannot be encoded (e.g. an over-long broadcast id).
    /// `mac`: the parent checks version-2 tickets (`JoinRequest.mac_tickets`), made
    /// with two HMACs instead of an Ed25519 signature ([`starling_proto::ticket_mac`]);
    /// version 1 otherwise, or when the key cannot make version 2.
    pub fn sign_ticket(
        &self,
        claims: &TicketClaims,
        mac: bool,
    ) -> Result<(u32, Vec<u8>), TicketError> {
        let set = self.current();
        let ticket = if mac && set.signer.makes_mac_tickets() {
            set.signer.sign_ticket_mac(claims)?
        } else {
            set.signer.sign_ticket(claims)?
        };
        Ok((set.signer.key_id(), ticket.to_vec()))
    }

    /// The keys `peer_id` of `broadcast_id` checks version-2 tickets naming it with: one
    /// per published key that can make them (the signing key first). Secret: for that
    /// viewer only.
    pub fn ticket_keys(&self, broadcast_id: &str, peer_id: u64) -> Vec<TicketKey> {
        self.current()
            .all
            .iter()
            .filter_map(|s| s.ticket_key(broadcast_id, peer_id))
            .map(|k| TicketKey {
                key_id: k.key_id,
                key: k.key.to_vec(),
            })
            .collect()
    }

    /// A key set of one fresh key (tests that need no database).
    #[cfg(test)]
    #[allow(clippy::expect_used)]
    pub(crate) fn for_tests(ttl: Duration) -> TokenKeys {
        let pkcs8 = starling_proto::token::generate_pkcs8().expect("key generation");
        let signer = Arc::new(TokenSigner::new(1, &pkcs8).expect("fresh key"));
        let published = vec![(
            PublicKey {
                key_id: 1,
                ed25519: signer.public_key().to_vec(),
            },
            None,
        )];
        TokenKeys {
            ttl,
            set: RwLock::new(Arc::new(KeySet {
                all: vec![signer.clone()],
                signer,
                published,
            })),
        }
    }

    /// Whether a token expiring at `expires_at_ms` should be replaced at `now_ms`: when
    /// less than half of its lifetime remains.
    pub fn needs_renewal(&self, expires_at_ms: i64, now_ms: i64) -> bool {
        needs_renewal(expires_at_ms, self.ttl, now_ms)
    }
}

/// Whether a token expiring at `expires_at_ms` with lifetime `ttl` should be renewed at
/// `now_ms` (less than half of its lifetime left).
pub fn needs_renewal(expires_at_ms: i64, ttl: Duration, now_ms: i64) -> bool {
    expires_at_ms.saturating_sub(now_ms) < ms(ttl) / 2
}

/// The published set from the stored rows: keys not retired at `now_ms`; the newest one
/// created at least [`SIGN_LEAD`] ago signs (the oldest one when none is). `previous` is
/// reused when it is still the signer (no re-parse).
fn build_set(
    records: &[TokenKeyRecord],
    now_ms: i64,
    previous: Option<&Arc<TokenSigner>>,
) -> Result<KeySet, TokenKeyError> {
    let live: Vec<&TokenKeyRecord> = records
        .iter()
        .filter(|r| r.retire_at_ms.is_none_or(|t| t > now_ms))
        .collect();
    // Every key retired (a clock jump): keep signing with the newest rather than none.
    let pool: Vec<&TokenKeyRecord> = if live.is_empty() {
        records
            .iter()
            .max_by_key(|r| r.key_id)
            .into_iter()
            .collect()
    } else {
        live
    };
    let chosen = pool
        .iter()
        .filter(|r| r.created_at_ms.saturating_add(ms(SIGN_LEAD)) <= now_ms)
        .max_by_key(|r| r.key_id)
        .or_else(|| pool.iter().min_by_key(|r| r.key_id))
        .ok_or(TokenKeyError::NoKey)?;
    let signer = match previous {
        Some(s) if s.key_id() == chosen.key_id => s.clone(),
        _ => Arc::new(
            TokenSigner::new(chosen.key_id, &chosen.pkcs8).map_err(|source| {
                TokenKeyError::Key {
                    key_id: chosen.key_id,
                    source,
                }
            })?,
        ),
    };
    let mut published = vec![(
        PublicKey {
            key_id: signer.key_id(),
            ed25519: signer.public_key().to_vec(),
        },
        chosen.retire_at_ms,
    )];
    let mut all = vec![signer.clone()];
    let mut others: Vec<&TokenKeyRecord> = pool
        .iter()
        .copied()
        .filter(|r| r.key_id != chosen.key_id)
        .collect();
    others.sort_by_key(|r| std::cmp::Reverse(r.key_id));
    // A verifier holds at most MAX_KEYS keys; the newest ones matter.
    for r in others
        .into_iter()
        .take(starling_proto::token::MAX_KEYS.saturating_sub(1))
    {
        match TokenSigner::new(r.key_id, &r.pkcs8) {
            Ok(s) => {
                published.push((
                    PublicKey {
                        key_id: r.key_id,
                        ed25519: s.public_key().to_vec(),
                    },
                    r.retire_at_ms,
                ));
                all.push(Arc::new(s));
            }
            Err(e) => {
                tracing::error!(key_id = r.key_id, error = %e, "unusable chunk-token key; not published");
            }
        }
    }
    Ok(KeySet {
        signer,
        published,
        all,
    })
}

/// Peers revoked recently, per broadcast: told to viewers (heartbeat) and nodes (replay)
/// until every token they could still hold has expired. Also the subjects revoked per
/// broadcast: a credential of theirs issued at or before the revocation (or without
/// `iat`) is refused at join until the revoked credentials expire, so a revoked viewer
/// cannot simply join again; one minted by the broadcaster after it is accepted.
#[derive(Debug)]
pub struct Revocations {
    by_broadcast: Mutex<HashMap<String, Vec<(u64, i64)>>>,
    /// (broadcast, subject) → (revoked at, refused until), unix seconds.
    subjects: Mutex<HashMap<(String, String), (u64, u64)>>,
    /// Bumped at every change a viewer's session stream must hear of: a revocation
    /// ([`Revocations::add`]) or a changed key set ([`Revocations::announce`]).
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            by_broadcast: Mutex::new(HashMap::new()),
            subjects: Mutex::new(HashMap::new()),
            version: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Revocations {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Watches the rights version: it changes at every revocation and at every
    /// [`Revocations::announce`] (session streams compare what they sent with the
    /// current state when it does).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Announces a change of the key sets viewers hold (token keys reloaded, chunk keys
    /// of the alive nodes changed).
    pub fn announce(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Records `peer_ids` of `broadcast_id` as revoked until `until_ms`.
    pub fn add(&self, broadcast_id: &str, peer_ids: &[u64], until_ms: i64) {
        if peer_ids.is_empty() {
            return;
        }
        {
            let mut map = self.by_broadcast.lock();
            let list = map.entry(broadcast_id.to_string()).or_default();
            for &p in peer_ids {
                match list.iter_mut().find(|(q, _)| *q == p) {
                    Some(e) => e.1 = e.1.max(until_ms),
                    None => list.push((p, until_ms)),
                }
            }
        }
        self.announce();
    }

    /// The peers of `broadcast_id` still revoked at `now_ms` (forgetting older ones).
    pub fn list(&self, broadcast_id: &str, now_ms: i64) -> Vec<u64> {
        let mut map = self.by_broadcast.lock();
        let Some(list) = map.get_mut(broadcast_id) else {
            return Vec::new();
        };
        list.retain(|&(_, until)| until > now_ms);
        let out: Vec<u64> = list.iter().map(|&(p, _)| p).collect();
        if list.is_empty() {
            map.remove(broadcast_id);
        }
        out
    }

    /// Forgets every expired entry (periodic housekeeping).
    pub fn prune(&self, now_ms: i64) {
        let mut map = self.by_broadcast.lock();
        map.retain(|_, list| {
            list.retain(|&(_, until)| until > now_ms);
            !list.is_empty()
        });
        drop(map);
        let now_s = u64::try_from(now_ms / 1000).unwrap_or(0);
        self.subjects
            .lock()
            .retain(|_, &mut (_, until)| until > now_s);
    }

    /// Refuses `subject`'s credentials for `broadcast_id` issued at or before
    /// `revoked_at_s`, until `until_s` (unix seconds).
    pub fn block_subject(
        &self,
        broadcast_id: &str,
        subject: &str,
        revoked_at_s: u64,
        until_s: u64,
    ) {
        let mut map = self.subjects.lock();
        let e = map
            .entry((broadcast_id.to_string(), subject.to_string()))
            .or_insert((revoked_at_s, until_s));
        e.0 = e.0.max(revoked_at_s);
        e.1 = e.1.max(until_s);
    }

    /// Whether a credential of `subject` issued at `issued_at_s` (`None`: no `iat`) is
    /// refused for `broadcast_id` at `now_s`.
    pub fn subject_blocked(
        &self,
        broadcast_id: &str,
        subject: &str,
        issued_at_s: Option<u64>,
        now_s: u64,
    ) -> bool {
        let map = self.subjects.lock();
        match map.get(&(broadcast_id.to_string(), subject.to_string())) {
            Some(&(revoked_at, until)) if until > now_s => {
                issued_at_s.is_none_or(|iat| iat <= revoked_at)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn renewal_at_half_lifetime() {
        let ttl = Duration::from_secs(120);
        assert!(!needs_renewal(120_000, ttl, 0));
        assert!(!needs_renewal(120_000, ttl, 60_000));
        assert!(needs_renewal(120_000, ttl, 60_001));
        assert!(needs_renewal(120_000, ttl, 200_000));
    }

    #[test]
    fn revocations_expire() {
        let r = Revocations::new();
        r.add("b", &[1, 2], 100);
        r.add("b", &[2], 300);
        r.add("c", &[9], 100);
        assert_eq!(r.list("b", 50), vec![1, 2]);
        assert_eq!(r.list("b", 100), vec![2]);
        assert!(r.list("x", 0).is_empty());
        r.prune(150);
        assert!(r.list("c", 0).is_empty());
        r.block_subject("b", "alice", 1_000, 2_000);
        assert!(r.subject_blocked("b", "alice", None, 1_500));
        assert!(r.subject_blocked("b", "alice", Some(1_000), 1_500));
        assert!(!r.subject_blocked("b", "alice", Some(1_001), 1_500));
        assert!(!r.subject_blocked("b", "bob", None, 1_500));
        assert!(!r.subject_blocked("c", "alice", None, 1_500));
        assert!(!r.subject_blocked("b", "alice", None, 2_000));
        assert_eq!(r.list("b", 299), vec![2]);
        assert!(r.list("b", 300).is_empty());
        r.prune(2_000_000);
        assert!(!r.subject_blocked("b", "alice", None, 0));
    }

    fn record(key_id: u32, created_at_ms: i64, retire_at_ms: Option<i64>) -> TokenKeyRecord {
        TokenKeyRecord {
            key_id,
            pkcs8: starling_proto::token::generate_pkcs8().unwrap(),
            created_at_ms,
            retire_at_ms,
        }
    }

    fn ids(set: &KeySet) -> Vec<u32> {
        set.published.iter().map(|(k, _)| k.key_id).collect()
    }

    #[test]
    fn newest_key_past_the_lead_signs_and_retired_keys_go() {
        let lead = ms(SIGN_LEAD);
        let rows = vec![
            record(1, 0, Some(1_000)),
            record(2, 0, Some(lead + 5_000)),
            record(3, 0, None),
        ];
        let set = build_set(&rows, lead + 2_000, None).unwrap();
        assert_eq!(set.signer.key_id(), 3);
        assert_eq!(ids(&set), vec![3, 2]);
        assert!(set.published.iter().all(|(k, _)| k.ed25519.len() == 32));
        let later = build_set(&rows, lead + 5_000, Some(&set.signer)).unwrap();
        assert!(Arc::ptr_eq(&later.signer, &set.signer));
        assert_eq!(ids(&later), vec![3]);
        assert!(matches!(build_set(&[], 0, None), Err(TokenKeyError::NoKey)));
    }

    #[test]
    fn a_new_key_is_published_before_it_signs() {
        let lead = ms(SIGN_LEAD);
        let rotated = 1_000_000;
        let rows = vec![
            record(1, 0, Some(rotated + ms(RETIRE_AFTER))),
            record(2, rotated, None),
        ];
        // Right after the rotation: both published, the old key still signs.
        let set = build_set(&rows, rotated, None).unwrap();
        assert_eq!(set.signer.key_id(), 1);
        assert_eq!(ids(&set), vec![1, 2]);
        let set = build_set(&rows, rotated + lead - 1, Some(&set.signer)).unwrap();
        assert_eq!(set.signer.key_id(), 1);
        // After the lead the new key signs; the old one stays published until it retires.
        let set = build_set(&rows, rotated + lead, Some(&set.signer)).unwrap();
        assert_eq!(set.signer.key_id(), 2);
        assert_eq!(ids(&set), vec![2, 1]);
        let set = build_set(&rows, rotated + ms(RETIRE_AFTER), Some(&set.signer)).unwrap();
        assert_eq!(ids(&set), vec![2]);
        // A deployment's first key signs at once.
        let first = build_set(&[record(7, rotated, None)], rotated, None).unwrap();
        assert_eq!(first.signer.key_id(), 7);
        // Every key retired (clock jump): the newest still signs.
        let all_gone = vec![record(1, 0, Some(10)), record(2, 0, Some(20))];
        assert_eq!(
            build_set(&all_gone, lead * 2, None)
                .unwrap()
                .signer
                .key_id(),
            2
        );
    }
}
