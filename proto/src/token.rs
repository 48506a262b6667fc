//! Signed chunk tokens.
//!
//! The control plane issues a short-lived token on `Join` (and renews it over the
//! viewer's session). The data plane checks it when a viewer connects (`HELLO.token`)
//! and every relaying peer checks the token of a peer that asks it for chunks. Checks
//! are offline: the verifier holds the control plane's Ed25519 public keys by key id,
//! several at once so that keys rotate without dropping anyone.
//!
//! Layout (big endian, specified byte by byte in `docs/PROTOCOL.md`):
//!
//! ```text
//! version u8 = 2 | key_id u32 | scopes u8 | peer_id u64 | session_id u64
//! | issued_at_ms u64 | expires_at_ms u64 | holder_key [32] | broadcast_len u8 (1..=128)
//! | broadcast utf-8
//! | signature [64]      (Ed25519 over "starling/token/v2\0" ++ every byte before it)
//! ```
//!
//! `holder_key` is the viewer's per-session Ed25519 public key: the token is only good
//! on a link together with a proof made with its private half ([`crate::holder`]).
//! Version-1 tokens (no holder key) are refused as `UnsupportedVersion(1)`.
//!
//! 136 to 263 bytes; anything longer than [`MAX_TOKEN_LEN`] is rejected before parsing.
//! Verification never panics and returns a typed [`TokenError`] for every failure.

use bytes::{BufMut, Bytes, BytesMut};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::ed25519::{EnvelopeError, KeySet, be_u32, be_u64, check_envelope};

/// Token format version produced and accepted by this build.
pub const TOKEN_VERSION: u8 = 2;
/// Longest broadcast id a token may name (same as the wire's `MAX_BROADCAST_ID`).
pub const MAX_BROADCAST_ID: usize = 128;
/// Length of the Ed25519 signature that ends every token.
pub const SIGNATURE_LEN: usize = crate::ed25519::SIGNATURE_LEN;
/// Length of the fixed part before the broadcast id (version .. broadcast_len).
pub const FIXED_LEN: usize = 71;
/// Shortest well-formed token (one-byte broadcast id).
pub const MIN_TOKEN_LEN: usize = FIXED_LEN + 1 + SIGNATURE_LEN;
/// Longest well-formed token; longer input is [`TokenError::Oversized`]. Well under the
/// 4096-byte `HELLO` token cap.
pub const MAX_TOKEN_LEN: usize = FIXED_LEN + MAX_BROADCAST_ID + SIGNATURE_LEN;
/// Most public keys a [`TokenVerifier`] holds at once (rotation needs two or three).
pub const MAX_KEYS: usize = 16;
/// Domain-separation prefix of the signed message (not on the wire).
pub const SIGNING_CONTEXT: &[u8] = b"starling/token/v2\0";

/// What a token allows. Unknown bits are rejected on both sign and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// No permission at all (a token with no scope is refused by `sign`).
    pub const NONE: Scopes = Scopes(0);
    /// Receive chunks (from the data plane or from a parent).
    pub const PLAY: Scopes = Scopes(0x01);
    /// Relay chunks to children (and ask neighbours for chunks as a relay).
    pub const RELAY: Scopes = Scopes(0x02);
    /// Every bit defined by version 1.
    pub const ALL: Scopes = Scopes(0x03);

    /// From raw bits; `None` when an undefined bit is set.
    pub fn from_bits(bits: u8) -> Option<Scopes> {
        (bits & !Self::ALL.0 == 0).then_some(Scopes(bits))
    }
    pub fn bits(self) -> u8 {
        self.0
    }
    /// Whether every bit of `required` is present.
    pub fn contains(self, required: Scopes) -> bool {
        self.0 & required.0 == required.0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Scopes {
    type Output = Scopes;
    fn bitor(self, rhs: Scopes) -> Scopes {
        Scopes(self.0 | rhs.0)
    }
}

/// What a token says. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub broadcast_id: String,
    /// The peer the token was issued to (its id in the control plane's assignment).
    pub peer_id: u64,
    /// The viewer session (revocation by session targets this).
    pub session_id: u64,
    pub scopes: Scopes,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// The holder's public key ([`crate::holder`]): links accept the token only with a
    /// proof made with its private half.
    pub holder_key: [u8; 32],
}

/// Every reason a token is refused (or cannot be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token truncated")]
    Truncated,
    #[error("token longer than {MAX_TOKEN_LEN} bytes")]
    Oversized,
    #[error("unsupported token version {0}")]
    UnsupportedVersion(u8),
    #[error("token signed with unknown key id {0}")]
    UnknownKeyId(u32),
    #[error("token signature is not valid")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token is for another broadcast")]
    WrongBroadcast,
    #[error("token lacks the required scope")]
    MissingScope,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// Signing side only: the claims cannot be encoded.
    #[error("cannot sign token: {0}")]
    Encode(&'static str),
}

impl From<EnvelopeError> for TokenError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Oversized => TokenError::Oversized,
            EnvelopeError::Truncated => TokenError::Truncated,
            EnvelopeError::UnsupportedVersion(v) => TokenError::UnsupportedVersion(v),
            EnvelopeError::Malformed(m) => TokenError::Malformed(m),
        }
    }
}

pub use crate::ed25519::KeyError;

/// A fresh Ed25519 key pair as PKCS#8 v2 DER (store it; feed it to the signers).
pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| KeyError::Generation)
}

/// Parses PKCS#8 (v1 as written by OpenSSL, or v2 as written by ring).
pub(crate) fn key_pair_from_pkcs8(pkcs8: &[u8]) -> Result<Ed25519KeyPair, KeyError> {
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| KeyError::InvalidPrivateKey)
}

/// Control-plane side: signs tokens with one key.
#[derive(Debug)]
pub struct TokenSigner {
    key_id: u32,
    key: Ed25519KeyPair,
    /// The same key for `ed25519-dalek`, which signs in about two thirds of ring's time
    /// (its precomputed base-point tables); present when the key came as PKCS#8 and the
    /// two agree on its public half. The control plane signs a token and a ticket per
    /// parent on every join, so this is its hottest code under a flash crowd.
    #[cfg(feature = "fast-signing")]
    fast: Option<ed25519_dalek::SigningKey>,
    /// The key version-2 parent tickets' keys are derived from
    /// ([`crate::ticket_mac`]); present when the key came as PKCS#8.
    ticket_master: Option<ring::hmac::Key>,
}

/// The 32-byte seed of an Ed25519 PKCS#8 document (v1 as written by OpenSSL, v2 as
/// written by ring: both put it at the same place), `None` for any other layout.
fn pkcs8_seed(pkcs8: &[u8]) -> Option<[u8; 32]> {
    // SEQUENCE { INTEGER 0|1, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } ...
    const ALGORITHM_AND_KEY: [u8; 11] = [
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let version = pkcs8.get(2..5)?;
    if pkcs8.first() != Some(&0x30) || version[..2] != [0x02, 0x01] || version[2] > 1 {
        return None;
    }
    if pkcs8.get(5..16)? != ALGORITHM_AND_KEY {
        return None;
    }
    pkcs8.get(16..48)?.try_into().ok()
}

impl TokenSigner {
    /// From a PKCS#8 document (see [`generate_pkcs8`]).
    pub fn new(key_id: u32, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let mut signer = Self::from_key_pair(key_id, key_pair_from_pkcs8(pkcs8)?);
        let Some(seed) = pkcs8_seed(pkcs8) else {
            return Ok(signer);
        };
        #[cfg(feature = "fast-signing")]
        {
            let fast = ed25519_dalek::SigningKey::from_bytes(&seed);
            if fast.verifying_key().as_bytes() == signer.key.public_key().as_ref() {
                signer.fast = Some(fast);
            }
        }
        signer.ticket_master = Some(ticket_master_from_seed(&seed));
        Ok(signer)
    }

    /// From a ring key pair: signs with ring (see [`TokenSigner::new`] for the faster path).
    pub fn from_key_pair(key_id: u32, key: Ed25519KeyPair) -> Self {
        TokenSigner {
            key_id,
            key,
            #[cfg(feature = "fast-signing")]
            fast: None,
            ticket_master: None,
        }
    }

    /// Ed25519 signature of `msg` (the same bytes whichever implementation makes it:
    /// Ed25519 signing is deterministic).
    pub(crate) fn sign_bytes(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        #[cfg(feature = "fast-signing")]
        if let Some(fast) = &self.fast {
            use ed25519_dalek::Signer;
            return fast.sign(msg).to_bytes();
        }
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.key.sign(msg).as_ref());
        out
    }

    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The derivation key of version-2 parent tickets, `None` for a signer made from a
    /// bare ring key pair ([`TokenSigner::from_key_pair`]).
    pub(crate) fn ticket_master(&self) -> Option<&ring::hmac::Key> {
        self.ticket_master.as_ref()
    }

    /// The 32-byte public key to distribute (with [`Self::key_id`]) to verifiers.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key.public_key().as_ref());
        out
    }

    /// Encodes and signs `claims`. Fails on an empty or over-long broadcast id, an empty
    /// or unknown scope set, or `expires_at_ms <= issued_at_ms`.
    pub fn sign(&self, claims: &TokenClaims) -> Result<Bytes, TokenError> {
        let id = claims.broadcast_id.as_bytes();
        if id.is_empty() {
            return Err(TokenError::Encode("empty broadcast id"));
        }
        if id.len() > MAX_BROADCAST_ID {
            return Err(TokenError::Encode("broadcast id too long"));
        }
        if claims.scopes.is_empty() || Scopes::from_bits(claims.scopes.bits()).is_none() {
            return Err(TokenError::Encode("empty or unknown scopes"));
        }
        if claims.holder_key == [0u8; 32] {
            return Err(TokenError::Encode("no holder key"));
        }
        if claims.expires_at_ms <= claims.issued_at_ms {
            return Err(TokenError::Encode(
                "expires_at_ms must be after issued_at_ms",
            ));
        }
        let body_len = FIXED_LEN + id.len();
        let mut msg = BytesMut::with_capacity(SIGNING_CONTEXT.len() + body_len + SIGNATURE_LEN);
        msg.put_slice(SIGNING_CONTEXT);
        msg.put_u8(TOKEN_VERSION);
        msg.put_u32(self.key_id);
        msg.put_u8(claims.scopes.bits());
        msg.put_u64(claims.peer_id);
        msg.put_u64(claims.session_id);
        msg.put_u64(claims.issued_at_ms);
        msg.put_u64(claims.expires_at_ms);
        msg.put_slice(&claims.holder_key);
        msg.put_u8(id.len() as u8);
        msg.put_slice(id);
        let sig = self.sign_bytes(&msg);
        msg.put_slice(sig.as_ref());
        let _context = msg.split_to(SIGNING_CONTEXT.len());
        Ok(msg.freeze())
    }
}

/// Data-plane / peer side: the control plane's public keys by key id.
#[derive(Debug, Clone, Default)]
pub struct TokenVerifier {
    keys: KeySet,
}

/// The parsed but not yet verified parts of a token.
struct Parsed<'a> {
    key_id: u32,
    scopes_bits: u8,
    peer_id: u64,
    session_id: u64,
    issued_at_ms: u64,
    expires_at_ms: u64,
    holder_key: [u8; 32],
    broadcast: &'a [u8],
    signed: &'a [u8],
    signature: &'a [u8],
}

/// Structural parse; lengths are checked before every read.
fn parse(token: &[u8]) -> Result<Parsed<'_>, TokenError> {
    let body_len = check_envelope(
        token,
        MAX_TOKEN_LEN,
        TOKEN_VERSION,
        FIXED_LEN,
        MAX_BROADCAST_ID,
    )?;
    Ok(Parsed {
        key_id: be_u32(token, 1),
        scopes_bits: token[5],
        peer_id: be_u64(token, 6),
        session_id: be_u64(token, 14),
        issued_at_ms: be_u64(token, 22),
        expires_at_ms: be_u64(token, 30),
        holder_key: holder_at(token, 38),
        broadcast: &token[FIXED_LEN..body_len],
        signed: &token[..body_len],
        signature: &token[body_len..],
    })
}

/// Reads the key id and claims of a token WITHOUT checking its signature or times
/// (e.g. for the holder of a token to know when to renew it). Never use this to
/// authorize anything.
pub fn peek_unverified(token: &[u8]) -> Result<(u32, TokenClaims), TokenError> {
    let p = parse(token)?;
    Ok((p.key_id, claims_of(&p)?))
}

fn claims_of(p: &Parsed<'_>) -> Result<TokenClaims, TokenError> {
    let scopes =
        Scopes::from_bits(p.scopes_bits).ok_or(TokenError::Malformed("unknown scope bits"))?;
    if scopes.is_empty() {
        return Err(TokenError::Malformed("no scope"));
    }
    if p.holder_key == [0u8; 32] {
        return Err(TokenError::Malformed("no holder key"));
    }
    if p.expires_at_ms <= p.issued_at_ms {
        return Err(TokenError::Malformed(
            "expires_at_ms not after issued_at_ms",
        ));
    }
    let broadcast_id = std::str::from_utf8(p.broadcast)
        .map_err(|_| TokenError::Malformed("broadcast id is not UTF-8"))?
        .to_owned();
    Ok(TokenClaims {
        broadcast_id,
        peer_id: p.peer_id,
        session_id: p.session_id,
        scopes,
        issued_at_ms: p.issued_at_ms,
        expires_at_ms: p.expires_at_ms,
        holder_key: p.holder_key,
    })
}

/// The 32 bytes at `at`; the caller has checked the length.
fn holder_at(b: &[u8], at: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k.copy_from_slice(&b[at..at + 32]);
    k
}

impl TokenVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `public_key` (32 raw Ed25519 bytes) under `key_id`, replacing any key
    /// with that id. Several keys are valid at once: add the new key everywhere, start
    /// signing with it, remove the old one after the longest token lifetime.
    pub fn add_key(&mut self, key_id: u32, public_key: &[u8]) -> Result<(), KeyError> {
        self.keys.add(key_id, public_key, MAX_KEYS)
    }

    /// Stops trusting `key_id`; returns whether it was known.
    pub fn remove_key(&mut self, key_id: u32) -> bool {
        self.keys.remove(key_id)
    }

    pub fn key_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.ids()
    }

    /// The trusted keys (for the other formats signed with token keys: tickets).
    pub(crate) fn key_set(&self) -> &KeySet {
        &self.keys
    }

    /// Checks, in this order: size and structure (`Oversized`, `Truncated`,
    /// `UnsupportedVersion`, `Malformed`), `UnknownKeyId`, `BadSignature`, then — only
    /// for authentic tokens — field sanity (`Malformed`), `NotYetValid` (issued more than
    /// `skew_ms` in the future), `Expired` (`now_unix_ms >= expires_at_ms + skew_ms`),
    /// `WrongBroadcast`, `MissingScope` (every bit of `required_scope` must be present).
    pub fn verify(
        &self,
        token: &[u8],
        expected_broadcast: &str,
        required_scope: Scopes,
        now_unix_ms: u64,
        skew_ms: u64,
    ) -> Result<TokenClaims, TokenError> {
        let p = parse(token)?;
        let key = self
            .keys
            .get(p.key_id)
            .ok_or(TokenError::UnknownKeyId(p.key_id))?;
        // The signed message is short (< 256 bytes): a stack buffer avoids allocating.
        let mut msg = [0u8; SIGNING_CONTEXT.len() + FIXED_LEN + MAX_BROADCAST_ID];
        let n = SIGNING_CONTEXT.len() + p.signed.len();
        msg[..SIGNING_CONTEXT.len()].copy_from_slice(SIGNING_CONTEXT);
        msg[SIGNING_CONTEXT.len()..n].copy_from_slice(p.signed);
        key.verify(&msg[..n], p.signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims = claims_of(&p)?;
        if claims.issued_at_ms > now_unix_ms.saturating_add(skew_ms) {
            return Err(TokenError::NotYetValid);
        }
        if now_unix_ms >= claims.expires_at_ms.saturating_add(skew_ms) {
            return Err(TokenError::Expired);
        }
        if claims.broadcast_id != expected_broadcast {
            return Err(TokenError::WrongBroadcast);
        }
        if !claims.scopes.contains(required_scope) {
            return Err(TokenError::MissingScope);
        }
        Ok(claims)
    }
}

/// Input of the ticket master's derivation from a signing key's seed
/// ([`crate::ticket_mac`]; here so that this module needs nothing from that one).
const TICKET_MASTER_CONTEXT: &[u8] = b"starling/ticket-master/v2\0";

/// The master key of a token-signing key's ticket keys.
fn ticket_master_from_seed(seed: &[u8; 32]) -> ring::hmac::Key {
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed),
        TICKET_MASTER_CONTEXT,
    );
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, tag.as_ref())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const NOW: u64 = 1_700_000_000_000;
    const SKEW: u64 = 5_000;

    fn pkcs8() -> &'static [u8] {
        static K: OnceLock<Vec<u8>> = OnceLock::new();
        K.get_or_init(|| generate_pkcs8().unwrap())
    }

    /// The fast signer is used for ring's and OpenSSL's PKCS#8 and makes the very bytes
    /// ring makes (Ed25519 is deterministic).
    #[cfg(feature = "fast-signing")]
    #[test]
    fn fast_signer_signs_as_ring_does() {
        let fast = TokenSigner::new(3, pkcs8()).unwrap();
        assert!(fast.fast.is_some(), "ring's PKCS#8 v2 gives the fast path");
        let slow = TokenSigner::from_key_pair(3, key_pair_from_pkcs8(pkcs8()).unwrap());
        assert!(slow.fast.is_none());
        assert_eq!(fast.sign(&claims()).unwrap(), slow.sign(&claims()).unwrap());
        // OpenSSL's PKCS#8 v1 (`openssl genpkey -algorithm ed25519`): the same seed.
        let seed = pkcs8_seed(pkcs8()).unwrap();
        let mut v1 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        v1.extend_from_slice(&seed);
        let openssl = TokenSigner::new(3, &v1).unwrap();
        assert!(openssl.fast.is_some());
        assert_eq!(
            openssl.sign(&claims()).unwrap(),
            slow.sign(&claims()).unwrap()
        );
        assert_eq!(pkcs8_seed(b"not a key"), None);
        assert_eq!(pkcs8_seed(&v1[..40]), None);
    }

    fn claims() -> TokenClaims {
        TokenClaims {
            broadcast_id: "b-1".into(),
            peer_id: 42,
            session_id: 7,
            scopes: Scopes::PLAY | Scopes::RELAY,
            issued_at_ms: NOW,
            expires_at_ms: NOW + 120_000,
            holder_key: [9; 32],
        }
    }

    fn setup() -> (TokenSigner, TokenVerifier) {
        let s = TokenSigner::new(3, pkcs8()).unwrap();
        let mut v = TokenVerifier::new();
        v.add_key(3, &s.public_key()).unwrap();
        (s, v)
    }

    fn check(v: &TokenVerifier, t: &[u8]) -> Result<TokenClaims, TokenError> {
        v.verify(t, "b-1", Scopes::PLAY, NOW + 1000, SKEW)
    }

    #[test]
    fn valid_token_roundtrips() {
        let (s, v) = setup();
        let t = s.sign(&claims()).unwrap();
        assert_eq!(t.len(), MIN_TOKEN_LEN + 2);
        assert_eq!(check(&v, &t).unwrap(), claims());
        assert_eq!(peek_unverified(&t).unwrap(), (3, claims()));
        // Longest broadcast id still fits well under the HELLO cap.
        let mut c = claims();
        c.broadcast_id = "x".repeat(MAX_BROADCAST_ID);
        let t = s.sign(&c).unwrap();
        assert_eq!(t.len(), MAX_TOKEN_LEN);
        const { assert!(MAX_TOKEN_LEN < 4096) };
        v.verify(&t, &c.broadcast_id, Scopes::RELAY, NOW, 0)
            .unwrap();
    }

    #[test]
    fn forged_signature_rejected() {
        let (s, v) = setup();
        let mut t = s.sign(&claims()).unwrap().to_vec();
        let last = t.len() - 1;
        t[last] ^= 0x01;
        assert_eq!(check(&v, &t), Err(TokenError::BadSignature));
        // Signed by a key that is not the one registered under this id.
        let other = TokenSigner::new(3, &generate_pkcs8().unwrap()).unwrap();
        let t = other.sign(&claims()).unwrap();
        assert_eq!(check(&v, &t), Err(TokenError::BadSignature));
        // Claims edited after signing (peer id).
        let mut t = s.sign(&claims()).unwrap().to_vec();
        t[13] ^= 0x80;
        assert_eq!(check(&v, &t), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired_rejected() {
        let (s, v) = setup();
        let t = s.sign(&claims()).unwrap();
        let exp = claims().expires_at_ms;
        assert!(
            v.verify(&t, "b-1", Scopes::PLAY, exp + SKEW - 1, SKEW)
                .is_ok()
        );
        assert_eq!(
            v.verify(&t, "b-1", Scopes::PLAY, exp + SKEW, SKEW),
            Err(TokenError::Expired)
        );
        assert_eq!(
            v.verify(&t, "b-1", Scopes::PLAY, exp, 0),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn not_yet_valid_rejected() {
        let (s, v) = setup();
        let t = s.sign(&claims()).unwrap();
        assert!(v.verify(&t, "b-1", Scopes::PLAY, NOW - SKEW, SKEW).is_ok());
        assert_eq!(
            v.verify(&t, "b-1", Scopes::PLAY, NOW - SKEW - 1, SKEW),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn wrong_broadcast_rejected() {
        let (s, v) = setup();
        let t = s.sign(&claims()).unwrap();
        assert_eq!(
            v.verify(&t, "b-2", Scopes::PLAY, NOW, SKEW),
            Err(TokenError::WrongBroadcast)
        );
        assert_eq!(
            v.verify(&t, "b-1x", Scopes::PLAY, NOW, SKEW),
            Err(TokenError::WrongBroadcast)
        );
    }

    #[test]
    fn missing_scope_rejected() {
        let (s, v) = setup();
        let mut c = claims();
        c.scopes = Scopes::PLAY;
        let t = s.sign(&c).unwrap();
        assert!(v.verify(&t, "b-1", Scopes::PLAY, NOW, SKEW).is_ok());
        assert_eq!(
            v.verify(&t, "b-1", Scopes::RELAY, NOW, SKEW),
            Err(TokenError::MissingScope)
        );
        assert_eq!(
            v.verify(&t, "b-1", Scopes::PLAY | Scopes::RELAY, NOW, SKEW),
            Err(TokenError::MissingScope)
        );
    }

    #[test]
    fn unknown_key_id_rejected() {
        let (s, _) = setup();
        let t = s.sign(&claims()).unwrap();
        let mut v = TokenVerifier::new();
        v.add_key(4, &s.public_key()).unwrap();
        assert_eq!(check(&v, &t), Err(TokenError::UnknownKeyId(3)));
    }

    #[test]
    fn truncated_rejected() {
        let (s, v) = setup();
        let t = s.sign(&claims()).unwrap();
        for n in [0, 1, 10, FIXED_LEN - 1, FIXED_LEN, t.len() - 1] {
            assert_eq!(check(&v, &t[..n]), Err(TokenError::Truncated), "len {n}");
        }
    }

    #[test]
    fn oversized_rejected() {
        let (s, v) = setup();
        let mut t = s.sign(&claims()).unwrap().to_vec();
        t.resize(MAX_TOKEN_LEN + 1, 0);
        assert_eq!(check(&v, &t), Err(TokenError::Oversized));
        assert_eq!(check(&v, &vec![1u8; 4096]), Err(TokenError::Oversized));
        // Within the cap, but longer than its own length byte says.
        let mut t = s.sign(&claims()).unwrap().to_vec();
        t.push(0);
        assert_eq!(check(&v, &t), Err(TokenError::Malformed("trailing bytes")));
    }

    #[test]
    fn unsupported_version_rejected() {
        let (s, v) = setup();
        let mut t = s.sign(&claims()).unwrap().to_vec();
        t[0] = 1;
        assert_eq!(check(&v, &t), Err(TokenError::UnsupportedVersion(1)));
        t[0] = 3;
        assert_eq!(check(&v, &t), Err(TokenError::UnsupportedVersion(3)));
    }

    #[test]
    fn malformed_rejected() {
        let (s, v) = setup();
        let mut t = s.sign(&claims()).unwrap().to_vec();
        t[FIXED_LEN - 1] = 0;
        assert_eq!(
            check(&v, &t),
            Err(TokenError::Malformed("empty broadcast id"))
        );
        t[FIXED_LEN - 1] = 200;
        assert_eq!(
            check(&v, &t),
            Err(TokenError::Malformed("broadcast id too long"))
        );
    }

    #[test]
    fn sign_refuses_bad_claims() {
        let (s, _) = setup();
        let mut c = claims();
        c.broadcast_id.clear();
        assert!(matches!(s.sign(&c), Err(TokenError::Encode(_))));
        let mut c = claims();
        c.broadcast_id = "x".repeat(MAX_BROADCAST_ID + 1);
        assert!(matches!(s.sign(&c), Err(TokenError::Encode(_))));
        let mut c = claims();
        c.scopes = Scopes::NONE;
        assert!(matches!(s.sign(&c), Err(TokenError::Encode(_))));
        let mut c = claims();
        c.expires_at_ms = c.issued_at_ms;
        assert!(matches!(s.sign(&c), Err(TokenError::Encode(_))));
        let mut c = claims();
        c.holder_key = [0; 32];
        assert!(matches!(s.sign(&c), Err(TokenError::Encode(_))));
        assert_eq!(Scopes::from_bits(0x04), None);
    }

    #[test]
    fn key_rotation() {
        let old = TokenSigner::new(1, pkcs8()).unwrap();
        let new = TokenSigner::new(2, &generate_pkcs8().unwrap()).unwrap();
        let mut v = TokenVerifier::new();
        v.add_key(1, &old.public_key()).unwrap();
        v.add_key(2, &new.public_key()).unwrap();
        let t_old = old.sign(&claims()).unwrap();
        let t_new = new.sign(&claims()).unwrap();
        assert!(check(&v, &t_old).is_ok());
        assert!(check(&v, &t_new).is_ok());
        assert!(v.remove_key(1));
        assert_eq!(check(&v, &t_old), Err(TokenError::UnknownKeyId(1)));
        assert!(check(&v, &t_new).is_ok());
        assert!(!v.remove_key(1));
    }

    #[test]
    fn key_set_is_bounded_and_checked() {
        let mut v = TokenVerifier::new();
        assert_eq!(v.add_key(0, &[0u8; 31]), Err(KeyError::InvalidPublicKey));
        for i in 0..MAX_KEYS as u32 {
            v.add_key(i, &[i as u8; 32]).unwrap();
        }
        assert_eq!(
            v.add_key(999, &[0u8; 32]),
            Err(KeyError::TooManyKeys(MAX_KEYS))
        );
        // Replacing an existing id is fine.
        v.add_key(0, &[9u8; 32]).unwrap();
        assert_eq!(v.key_ids().count(), MAX_KEYS);
        assert!(matches!(
            TokenSigner::new(1, b"not a key"),
            Err(KeyError::InvalidPrivateKey)
        ));
    }

    #[test]
    fn every_single_bit_flip_rejected() {
        let (s, v) = setup();
        let t = s.sign(&claims()).unwrap().to_vec();
        for bit in 0..t.len() * 8 {
            let mut x = t.clone();
            x[bit / 8] ^= 1 << (bit % 8);
            assert!(check(&v, &x).is_err(), "bit {bit} accepted");
        }
    }

    /// Prints the cost of one verification (release: `cargo test --release -- --ignored
    /// --nocapture token_verify_cost`).
    #[test]
    #[ignore]
    fn token_verify_cost() {
        let (s, v) = setup();
        let t = s.sign(&claims()).unwrap();
        let n = 20_000u32;
        for _ in 0..1000 {
            check(&v, &t).unwrap();
        }
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(check(&v, std::hint::black_box(&t)).unwrap());
        }
        let verify_ns = start.elapsed().as_nanos() / u128::from(n);
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(s.sign(std::hint::black_box(&claims())).unwrap());
        }
        let sign_ns = start.elapsed().as_nanos() / u128::from(n);
        println!(
            "token: {} bytes, verify {verify_ns} ns, sign {sign_ns} ns",
            t.len()
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (_, v) = setup();
            prop_assert!(check(&v, &data).is_err());
            let _ = peek_unverified(&data);
        }

        #[test]
        fn arbitrary_body_with_valid_prefix(kid in prop_oneof![Just(3u32), any::<u32>()], len in 0usize..=255, rest in proptest::collection::vec(any::<u8>(), 0..400)) {
            let (_, v) = setup();
            let mut t = vec![TOKEN_VERSION];
            t.extend_from_slice(&kid.to_be_bytes());
            t.extend_from_slice(&rest);
            if t.len() >= FIXED_LEN { t[FIXED_LEN - 1] = len as u8; }
            prop_assert!(check(&v, &t).is_err());
        }

        #[test]
        fn any_single_bit_flip_is_rejected(bit in 0usize..(MIN_TOKEN_LEN + 20) * 8, id in "[a-z0-9-]{1,21}") {
            let (s, v) = setup();
            let mut c = claims();
            c.broadcast_id = id.clone();
            let mut t = s.sign(&c).unwrap().to_vec();
            let bit = bit % (t.len() * 8);
            t[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(v.verify(&t, &id, Scopes::PLAY, NOW, SKEW).is_err());
        }

        #[test]
        fn sign_verify_roundtrip(id in "\\PC{1,32}", peer in any::<u64>(), session in any::<u64>(), scopes in 1u8..=3, iat in 0u64..u64::MAX / 2, life in 1u64..1_000_000) {
            prop_assume!(id.len() <= MAX_BROADCAST_ID);
            let (s, v) = setup();
            let c = TokenClaims { broadcast_id: id.clone(), peer_id: peer, session_id: session, scopes: Scopes::from_bits(scopes).unwrap(), issued_at_ms: iat, expires_at_ms: iat + life, holder_key: [peer as u8 | 1; 32] };
            let t = s.sign(&c).unwrap();
            prop_assert_eq!(v.verify(&t, &id, Scopes::from_bits(scopes).unwrap(), iat, 0).unwrap(), c);
        }
    }
}
