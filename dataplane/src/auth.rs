//! Rights on the data plane: chunk-token checks and revocation, shared by every
//! executor (one [`Auth`] per node, owned by the [`Registry`](crate::ring::Registry)).
//!
//! * Tokens (`starling_proto::token`) are checked offline with the control plane's
//!   Ed25519 public keys: the keys configured statically (`Config::token_keys`) plus the
//!   set last received from the control plane (`RegisterNodeResponse.token_keys`,
//!   replaced by every `KeysCommand`). A token is checked when a connection subscribes
//!   (wire) or requests a stream (HTTP) and when a `TOKEN` frame renews it: never per
//!   chunk.
//! * Revocation (`RevokeCommand`): the (broadcast, peer id) pairs are remembered until
//!   the tokens they may hold have expired (`revocation_hold`, extended to the expiry of
//!   any token of theirs this node has seen), and a node-wide generation counter is
//!   bumped. Every connection task compares the counter with the value it last saw when
//!   it wakes up (one relaxed atomic load) and looks itself up only when it changed.

use parking_lot::{Mutex, RwLock};
use starling_proto::holder::{self, NONCE_LEN, ProofError, Verifier};
use starling_proto::token::{self, Scopes, TokenClaims, TokenError, TokenVerifier};
use starling_proto::v1::PublicKey;
use starling_proto::wire::ErrorCode;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::warn;

/// Why a connection (or a renewal) was refused. A bounded label set (metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// A non-public broadcast and no token.
    Missing,
    /// The token failed verification.
    Token(TokenError),
    /// A renewal (`TOKEN`) names another peer than the connection's token.
    WrongPeer,
    /// The token's peer was revoked on this broadcast.
    Revoked,
    /// The connection did not prove it holds the key the token names
    /// ([`starling_proto::holder`]): no `PROOF`, or a bad one (a harvested token).
    Proof(ProofError),
    /// A renewal (`TOKEN`) names another holder key than the connection proved.
    WrongHolder,
}

impl Denied {
    /// Metric label and the first word of the `ERROR` message (stable, machine-readable).
    pub fn label(&self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::WrongPeer => "wrong_peer",
            Denied::Revoked => "revoked",
            Denied::WrongHolder => "wrong_holder",
            Denied::Proof(ProofError::Missing) => "no_proof",
            Denied::Proof(_) => "bad_proof",
            Denied::Token(e) => match e {
                TokenError::Truncated => "truncated",
                TokenError::Oversized => "oversized",
                TokenError::UnsupportedVersion(_) => "unsupported_version",
                TokenError::UnknownKeyId(_) => "unknown_key",
                TokenError::BadSignature => "bad_signature",
                TokenError::Expired => "expired",
                TokenError::NotYetValid => "not_yet_valid",
                TokenError::WrongBroadcast => "wrong_broadcast",
                TokenError::MissingScope => "missing_scope",
                TokenError::Malformed(_) | TokenError::Encode(_) => "malformed",
            },
        }
    }

    /// Every label, in metric order.
    pub const LABELS: [&'static str; 16] = [
        "missing",
        "truncated",
        "oversized",
        "unsupported_version",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_broadcast",
        "missing_scope",
        "malformed",
        "wrong_peer",
        "revoked",
        "no_proof",
        "bad_proof",
        "wrong_holder",
    ];

    /// Index of [`Self::label`] in [`Self::LABELS`].
    pub fn index(&self) -> usize {
        let l = self.label();
        Self::LABELS.iter().position(|&x| x == l).unwrap_or(0)
    }

    /// Wire code: `REVOKED` for a revoked peer, `UNAUTHORIZED` otherwise.
    pub fn code(&self) -> ErrorCode {
        match self {
            Denied::Revoked => ErrorCode::Revoked,
            _ => ErrorCode::Unauthorized,
        }
    }

    /// `ERROR` message / HTTP body: `"<label>: <explanation>"`.
    pub fn message(&self) -> String {
        let why = match self {
            Denied::Missing => "a chunk token is required for this broadcast".to_owned(),
            Denied::WrongPeer => "the renewed token is for another peer".to_owned(),
            Denied::Revoked => "this viewer was revoked".to_owned(),
            Denied::WrongHolder => "the renewed token names another holder key".to_owned(),
            Denied::Proof(ProofError::Missing) => "the chunk token is bound to its holder's \
                key: send PROOF after HELLO_ACK (wire protocol version 2); HTTP cannot \
                prove it and serves public broadcasts only"
                .to_owned(),
            Denied::Proof(e) => e.to_string(),
            Denied::Token(e) => e.to_string(),
        };
        format!("{}: {why}", self.label())
    }

    /// HTTP status: 401 when no valid credential was shown, 403 when a valid one does not
    /// allow this (other broadcast, missing scope, revoked).
    pub fn http_status(&self) -> &'static str {
        match self {
            Denied::Token(TokenError::WrongBroadcast | TokenError::MissingScope)
            | Denied::WrongPeer
            | Denied::WrongHolder
            | Denied::Revoked => "403 Forbidden",
            _ => "401 Unauthorized",
        }
    }
}

/// What a connection holds after a successful check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The token's peer id (`None`: anonymous viewer of a public broadcast).
    pub peer_id: Option<u64>,
    /// The connection is closed with `GOODBYE(TOKEN_EXPIRED)` at `expires_at_ms + skew`
    /// unless renewed (`None`: public broadcast, nothing to renew).
    pub expires_at_ms: Option<u64>,
    /// The holder key the connection proved it holds (`None`: anonymous); renewals
    /// must name it.
    pub holder_key: Option<[u8; 32]>,
}

impl Grant {
    /// An anonymous viewer of a public broadcast.
    pub const ANONYMOUS: Grant = Grant {
        peer_id: None,
        expires_at_ms: None,
        holder_key: None,
    };
}

/// What a connection's handshake established about its key ([`starling_proto::holder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Possession {
    /// No `PROOF` was sent.
    Unproven,
    /// A `PROOF` valid for the holder key of the `HELLO` token: that key. The token is
    /// verified later (at `SUBSCRIBE`) and must name the same key.
    Proven([u8; 32]),
    /// A `PROOF` that did not verify.
    Failed(ProofError),
}

impl Possession {
    /// Checks a `PROOF` made for this data plane over `nonce` (ours, from `HELLO_ACK`)
    /// and `token` (the one to be admitted), against the holder key the token names
    /// (read unverified here; [`Auth::admit`] verifies the token and compares keys).
    pub fn check(nonce: &[u8; NONCE_LEN], token: &[u8], proof: &[u8]) -> Possession {
        let Ok((_, claims)) = token::peek_unverified(token) else {
            return Possession::Failed(ProofError::BadProof);
        };
        match holder::verify(&claims.holder_key, nonce, token, Verifier::DataPlane, proof) {
            Ok(()) => Possession::Proven(claims.holder_key),
            Err(e) => Possession::Failed(e),
        }
    }

    /// Whether this proves the holder of `claims`.
    fn binds(&self, claims: &TokenClaims) -> Result<(), Denied> {
        match self {
            Possession::Proven(k) if *k == claims.holder_key => Ok(()),
            Possession::Proven(_) => Err(Denied::Proof(ProofError::BadProof)),
            Possession::Unproven => Err(Denied::Proof(ProofError::Missing)),
            Possession::Failed(e) => Err(Denied::Proof(e.clone())),
        }
    }
}

/// Token keys, revocations and the clock-skew tolerance of one node.
#[derive(Debug)]
pub struct Auth {
    verifier: RwLock<TokenVerifier>,
    static_keys: Vec<(u32, [u8; 32])>,
    skew_ms: u64,
    revocation_hold_ms: u64,
    /// (broadcast, peer id) -> unix ms until which its tokens are refused.
    revoked: Mutex<HashMap<(String, u64), u64>>,
    generation: AtomicU64,
}

impl Default for Auth {
    fn default() -> Self {
        Auth::new(Vec::new(), 5_000, 300_000)
    }
}

impl Auth {
    /// `static_keys` are always trusted (standalone mode); `skew_ms` is the clock skew
    /// tolerated on `issued_at` / `expires_at`; a revocation is remembered for at least
    /// `revocation_hold_ms` (make it at least the longest token lifetime issued).
    pub fn new(static_keys: Vec<(u32, [u8; 32])>, skew_ms: u64, revocation_hold_ms: u64) -> Self {
        let auth = Auth {
            verifier: RwLock::new(TokenVerifier::new()),
            static_keys,
            skew_ms,
            revocation_hold_ms,
            revoked: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        };
        auth.set_keys(&[]);
        auth
    }

    pub fn skew_ms(&self) -> u64 {
        self.skew_ms
    }

    /// Replaces the control plane's key set (static keys stay). Keys that are not 32
    /// bytes, and keys beyond the verifier's capacity, are skipped with a warning.
    pub fn set_keys(&self, keys: &[PublicKey]) {
        let mut v = TokenVerifier::new();
        let all = self
            .static_keys
            .iter()
            .map(|(id, k)| (*id, &k[..]))
            .chain(keys.iter().map(|k| (k.key_id, &k.ed25519[..])));
        for (id, key) in all {
            if let Err(e) = v.add_key(id, key) {
                warn!(key_id = id, error = %e, "ignoring token key");
            }
        }
        let mut g = self.verifier.write();
        *g = v;
    }

    /// Key ids currently trusted.
    pub fn key_ids(&self) -> Vec<u32> {
        let g = self.verifier.read();
        let mut ids: Vec<u32> = g.key_ids().collect();
        ids.sort_unstable();
        ids
    }

    /// Checks a token for `broadcast` (scope PLAY) at `now_ms`, and that its peer is
    /// not revoked there.
    pub fn verify(
        &self,
        token: &[u8],
        broadcast: &str,
        now_ms: u64,
    ) -> Result<TokenClaims, Denied> {
        if token.is_empty() {
            return Err(Denied::Missing);
        }
        let claims = {
            let g = self.verifier.read();
            g.verify(token, broadcast, Scopes::PLAY, now_ms, self.skew_ms)
                .map_err(Denied::Token)?
        };
        if self.is_revoked(broadcast, claims.peer_id, now_ms) {
            return Err(Denied::Revoked);
        }
        Ok(claims)
    }

    /// The check made when a connection subscribes: public broadcasts accept anyone
    /// (a valid token with a valid proof still identifies the peer, for revocation; an
    /// invalid or unproven one is ignored, but a revoked peer's valid token is
    /// refused); others need a valid token and `possession` of the key it names.
    pub fn admit(
        &self,
        token: &[u8],
        possession: &Possession,
        broadcast: &str,
        public: bool,
        now_ms: u64,
    ) -> Result<Grant, Denied> {
        match self
            .verify(token, broadcast, now_ms)
            .and_then(|c| possession.binds(&c).map(|()| c))
        {
            Ok(c) => Ok(Grant {
                peer_id: Some(c.peer_id),
                expires_at_ms: (!public).then_some(c.expires_at_ms),
                holder_key: Some(c.holder_key),
            }),
            Err(Denied::Revoked) => Err(Denied::Revoked),
            Err(_) if public => Ok(Grant::ANONYMOUS),
            Err(e) => Err(e),
        }
    }

    /// A `TOKEN` frame on a connection holding `current`: the new token must be valid,
    /// name the holder key the connection proved (renewals keep the session's key; an
    /// anonymous connection cannot become someone by a `TOKEN`) and, when the
    /// connection already has a peer id, the same peer.
    pub fn renew(
        &self,
        current: Grant,
        token: &[u8],
        broadcast: &str,
        public: bool,
        now_ms: u64,
    ) -> Result<Grant, Denied> {
        let c = self.verify(token, broadcast, now_ms)?;
        if current.holder_key != Some(c.holder_key) {
            return Err(Denied::WrongHolder);
        }
        if current.peer_id.is_some_and(|p| p != c.peer_id) {
            return Err(Denied::WrongPeer);
        }
        Ok(Grant {
            peer_id: Some(c.peer_id),
            expires_at_ms: (!public).then_some(c.expires_at_ms),
            holder_key: Some(c.holder_key),
        })
    }

    /// Revokes `peers` on `broadcast`: their connections close at once (every
    /// connection task sees the new generation) and their tokens are refused until
    /// they would have expired.
    pub fn revoke(&self, broadcast: &str, peers: &[u64], now_ms: u64) {
        {
            let mut r = self.revoked.lock();
            r.retain(|_, until| *until > now_ms);
            let until = now_ms.saturating_add(self.revocation_hold_ms);
            for &p in peers {
                let e = r.entry((broadcast.to_owned(), p)).or_insert(until);
                *e = (*e).max(until);
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Keeps refusing `peer` on `broadcast` at least until a token expiring at
    /// `expires_at_ms` is dead (called when a revoked connection is closed).
    pub fn extend_revocation(&self, broadcast: &str, peer: u64, expires_at_ms: u64) {
        let mut r = self.revoked.lock();
        if let Some(until) = r.get_mut(&(broadcast.to_owned(), peer)) {
            *until = (*until).max(expires_at_ms.saturating_add(self.skew_ms));
        }
    }

    pub fn is_revoked(&self, broadcast: &str, peer: u64, now_ms: u64) -> bool {
        let r = self.revoked.lock();
        if r.is_empty() {
            return false;
        }
        r.get(&(broadcast.to_owned(), peer))
            .is_some_and(|&until| until > now_ms)
    }

    /// Bumped by every revocation: connection tasks re-check themselves when it moved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// (broadcast, peer) pairs currently remembered as revoked.
    pub fn revoked_len(&self) -> usize {
        self.revoked.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use starling_proto::token::{TokenSigner, generate_pkcs8};

    const NOW: u64 = 1_700_000_000_000;
    const HOLDER: [u8; 32] = [4; 32];
    const P: Possession = Possession::Proven(HOLDER);

    fn setup() -> (TokenSigner, Auth) {
        let s = TokenSigner::new(7, &generate_pkcs8().unwrap()).unwrap();
        let a = Auth::new(vec![(7, s.public_key())], 1_000, 60_000);
        (s, a)
    }

    fn token(s: &TokenSigner, b: &str, peer: u64, exp: u64) -> bytes::Bytes {
        s.sign(&TokenClaims {
            broadcast_id: b.into(),
            peer_id: peer,
            session_id: 1,
            scopes: Scopes::PLAY,
            issued_at_ms: NOW - 1000,
            expires_at_ms: exp,
            holder_key: HOLDER,
        })
        .unwrap()
    }

    #[test]
    fn admit_public_and_private() {
        let (s, a) = setup();
        let t = token(&s, "b", 5, NOW + 10_000);
        assert_eq!(a.admit(b"", &P, "b", false, NOW), Err(Denied::Missing));
        assert_eq!(a.admit(b"", &P, "b", true, NOW), Ok(Grant::ANONYMOUS));
        assert_eq!(
            a.admit(&t, &P, "b", false, NOW),
            Ok(Grant {
                peer_id: Some(5),
                expires_at_ms: Some(NOW + 10_000),
                holder_key: Some(HOLDER),
            })
        );
        assert_eq!(
            a.admit(&t, &P, "b", true, NOW).unwrap().expires_at_ms,
            None,
            "public: no expiry enforced"
        );
        let e = a.admit(&t, &P, "c", false, NOW).unwrap_err();
        assert_eq!(e.label(), "wrong_broadcast");
        assert_eq!(e.http_status(), "403 Forbidden");
        assert!(
            a.admit(&t, &P, "c", true, NOW).is_ok(),
            "public ignores bad tokens"
        );
        let e = a.admit(&t, &P, "b", false, NOW + 11_000).unwrap_err();
        assert_eq!(e.label(), "expired");
        assert!(e.message().starts_with("expired: "));
        assert_eq!(Denied::LABELS[e.index()], "expired");
    }

    #[test]
    fn a_token_is_good_only_with_a_proof_of_its_holder_key() {
        let (s, a) = setup();
        let t = token(&s, "b", 5, NOW + 10_000);
        let harvested = Possession::Proven([5; 32]);
        let e = a.admit(&t, &harvested, "b", false, NOW).unwrap_err();
        assert_eq!(
            (e.label(), e.code()),
            ("bad_proof", ErrorCode::Unauthorized)
        );
        let e = a
            .admit(&t, &Possession::Unproven, "b", false, NOW)
            .unwrap_err();
        assert_eq!(e.label(), "no_proof");
        assert_eq!(e.http_status(), "401 Unauthorized");
        let failed = Possession::Failed(ProofError::BadProof);
        assert_eq!(
            a.admit(&t, &failed, "b", false, NOW).unwrap_err().label(),
            "bad_proof"
        );
        // Public: the unproven token is ignored, not refused.
        assert_eq!(
            a.admit(&t, &harvested, "b", true, NOW),
            Ok(Grant::ANONYMOUS)
        );
        // The real PROOF check, end to end.
        let k = holder::HolderKey::generate().unwrap();
        let t = s
            .sign(&TokenClaims {
                holder_key: k.public_key(),
                ..token_claims(5)
            })
            .unwrap();
        let nonce = [9u8; NONCE_LEN];
        let proof = k.prove(&nonce, &t, Verifier::DataPlane);
        let ok = Possession::check(&nonce, &t, &proof);
        assert_eq!(ok, Possession::Proven(k.public_key()));
        assert!(a.admit(&t, &ok, "b", false, NOW).is_ok());
        assert_eq!(
            Possession::check(&[8; NONCE_LEN], &t, &proof),
            Possession::Failed(ProofError::BadProof)
        );
        let for_a_peer = k.prove(&nonce, &t, Verifier::Peer(3));
        assert_eq!(
            Possession::check(&nonce, &t, &for_a_peer),
            Possession::Failed(ProofError::BadProof)
        );
        assert_eq!(
            Possession::check(&nonce, b"junk", &proof),
            Possession::Failed(ProofError::BadProof)
        );
        for l in Denied::LABELS {
            assert!(!l.is_empty());
        }
    }

    fn token_claims(peer: u64) -> TokenClaims {
        TokenClaims {
            broadcast_id: "b".into(),
            peer_id: peer,
            session_id: 1,
            scopes: Scopes::PLAY,
            issued_at_ms: NOW - 1000,
            expires_at_ms: NOW + 10_000,
            holder_key: HOLDER,
        }
    }

    #[test]
    fn renew_same_peer_only() {
        let (s, a) = setup();
        let g = a
            .admit(&token(&s, "b", 5, NOW + 1000), &P, "b", false, NOW)
            .unwrap();
        let g2 = a
            .renew(g, &token(&s, "b", 5, NOW + 50_000), "b", false, NOW)
            .unwrap();
        assert_eq!(g2.expires_at_ms, Some(NOW + 50_000));
        assert_eq!(
            a.renew(g, &token(&s, "b", 6, NOW + 50_000), "b", false, NOW),
            Err(Denied::WrongPeer)
        );
        // Renewals keep the session's holder key.
        let other_key = s
            .sign(&TokenClaims {
                holder_key: [6; 32],
                ..token_claims(5)
            })
            .unwrap();
        assert_eq!(
            a.renew(g, &other_key, "b", false, NOW),
            Err(Denied::WrongHolder)
        );
        assert_eq!(
            a.renew(
                Grant::ANONYMOUS,
                &token(&s, "b", 5, NOW + 50_000),
                "b",
                true,
                NOW
            ),
            Err(Denied::WrongHolder)
        );
    }

    #[test]
    fn revocation_is_bounded_by_time() {
        let (s, a) = setup();
        let t = token(&s, "b", 5, NOW + 10_000);
        let g0 = a.generation();
        a.revoke("b", &[5], NOW);
        assert!(a.generation() > g0);
        assert_eq!(a.admit(&t, &P, "b", false, NOW), Err(Denied::Revoked));
        assert_eq!(a.admit(&t, &P, "b", true, NOW), Err(Denied::Revoked));
        assert!(
            a.admit(&token(&s, "b", 6, NOW + 10_000), &P, "b", false, NOW)
                .is_ok()
        );
        assert!(
            a.admit(&token(&s, "c", 5, NOW + 10_000), &P, "c", false, NOW)
                .is_ok()
        );
        assert!(a.is_revoked("b", 5, NOW + 59_999));
        assert!(!a.is_revoked("b", 5, NOW + 60_000));
        a.extend_revocation("b", 5, NOW + 100_000);
        assert!(a.is_revoked("b", 5, NOW + 100_999));
        // A later revocation sweeps what has expired.
        a.revoke("b", &[9], NOW + 200_000);
        assert_eq!(a.revoked_len(), 1);
    }

    #[test]
    fn key_sets_replace_but_keep_static_keys() {
        let (s, a) = setup();
        let s2 = TokenSigner::new(8, &generate_pkcs8().unwrap()).unwrap();
        let t2 = s2
            .sign(&TokenClaims {
                broadcast_id: "b".into(),
                peer_id: 1,
                session_id: 1,
                scopes: Scopes::PLAY,
                issued_at_ms: NOW,
                expires_at_ms: NOW + 1000,
                holder_key: HOLDER,
            })
            .unwrap();
        assert_eq!(
            a.admit(&t2, &P, "b", false, NOW).unwrap_err().label(),
            "unknown_key"
        );
        a.set_keys(&[
            PublicKey {
                key_id: 8,
                ed25519: s2.public_key().to_vec(),
            },
            PublicKey {
                key_id: 9,
                ed25519: vec![1, 2, 3],
            },
        ]);
        assert_eq!(a.key_ids(), vec![7, 8]);
        assert!(a.admit(&t2, &P, "b", false, NOW).is_ok());
        assert!(
            a.admit(&token(&s, "b", 1, NOW + 1000), &P, "b", false, NOW)
                .is_ok()
        );
        a.set_keys(&[]);
        assert_eq!(a.key_ids(), vec![7]);
    }
}
