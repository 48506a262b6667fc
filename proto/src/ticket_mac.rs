//! Parent tickets, version 2: the same claims as [`crate::ticket`], authenticated with an
//! HMAC-SHA256 under a key that only the named parent and the control plane hold.
//!
//! A ticket has exactly one verifier, the parent it names, so it needs no signature that
//! anyone can check: the control plane derives a **ticket key** per (broadcast, parent
//! peer, token-signing key) and hands it to that parent with its key sets (Kerberos'
//! service tickets work the same way). Making a version-2 ticket costs two HMACs (about
//! a microsecond) instead of an Ed25519 signature (15-20 µs); a flash crowd of joins
//! needs a ticket per peer parent of each new viewer and of each viewer moved to it.
//!
//! Derivation (all HMAC-SHA256; `seed` is the token-signing key's 32-byte Ed25519 seed,
//! so every control plane sharing the token keys derives the same keys, and rotating the
//! signing key rotates the ticket keys):
//!
//! ```text
//! master     = HMAC(seed,   "starling/ticket-master/v2\0")
//! ticket_key = HMAC(master, "starling/ticket-key/v2\0" | broadcast_len u8 | broadcast
//!                           | parent_peer_id u64)
//! ```
//!
//! Layout (big endian; the version-1 layout with a 32-byte MAC instead of the signature):
//!
//! ```text
//! version u8 = 2 | key_id u32 | child_peer_id u64 | parent_peer_id u64
//! | substream_mask u64 | issued_at_ms u64 | expires_at_ms u64
//! | broadcast_len u8 (1..=128) | broadcast utf-8
//! | mac [32]      (HMAC(ticket_key, "starling/ticket/v2\0" ++ every byte before it))
//! ```
//!
//! A child cannot make or alter one (it lacks the key); the parent could, but it is the
//! only one that admits on it. The control plane makes version-2 tickets only for
//! parents that said they check them (`JoinRequest.mac_tickets`); others keep getting
//! version 1. Verification never panics and returns a typed [`TicketError`].

use bytes::{BufMut, Bytes, BytesMut};
use ring::hmac;

use crate::ed25519::{be_u32, check_envelope_with_tail};
use crate::ticket::{
    FIXED_LEN, TicketClaims, TicketError, check_claims, check_signable, claims_of, put_body,
};
use crate::token::{MAX_BROADCAST_ID, TokenSigner, TokenVerifier};

/// Version byte of a MAC-authenticated ticket.
pub const TICKET_MAC_VERSION: u8 = 2;
/// Length of the MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Length of a ticket key.
pub const TICKET_KEY_LEN: usize = 32;
/// Longest well-formed version-2 ticket (shorter than version 1's longest).
pub const MAX_TICKET_MAC_LEN: usize = FIXED_LEN + MAX_BROADCAST_ID + MAC_LEN;
/// Domain-separation prefix of the authenticated message (not on the wire).
pub const MAC_CONTEXT: &[u8] = b"starling/ticket/v2\0";
/// Prefix of a ticket key's derivation input.
const KEY_CONTEXT: &[u8] = b"starling/ticket-key/v2\0";
/// Ticket keys a parent holds at once (one per token-signing key in force).
pub const MAX_TICKET_KEYS: usize = 8;

/// A parent's ticket key under one token-signing key.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKey {
    pub key_id: u32,
    pub key: [u8; TICKET_KEY_LEN],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never in logs.
        f.debug_struct("TicketKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// Whether this signer can make version-2 tickets (it came from PKCS#8).
    pub fn makes_mac_tickets(&self) -> bool {
        self.ticket_master().is_some()
    }

    /// The ticket key of `parent_peer_id` in `broadcast_id` under this signing key, to
    /// hand to that parent; `None` when this signer cannot make version-2 tickets or the
    /// broadcast id is empty or over-long.
    pub fn ticket_key(&self, broadcast_id: &str, parent_peer_id: u64) -> Option<TicketKey> {
        let master = self.ticket_master()?;
        let id = broadcast_id.as_bytes();
        if id.is_empty() || id.len() > MAX_BROADCAST_ID {
            return None;
        }
        let mut ctx = hmac::Context::with_key(master);
        ctx.update(KEY_CONTEXT);
        ctx.update(&[id.len() as u8]);
        ctx.update(id);
        ctx.update(&parent_peer_id.to_be_bytes());
        let mut key = [0u8; TICKET_KEY_LEN];
        key.copy_from_slice(ctx.sign().as_ref());
        Some(TicketKey {
            key_id: self.key_id(),
            key,
        })
    }

    /// Encodes and authenticates a version-2 ticket. Fails as
    /// [`TokenSigner::sign_ticket`] does, and with `Encode` when this signer cannot make
    /// version-2 tickets ([`TokenSigner::makes_mac_tickets`]).
    pub fn sign_ticket_mac(&self, claims: &TicketClaims) -> Result<Bytes, TicketError> {
        let id = check_signable(claims)?;
        let key = self
            .ticket_key(&claims.broadcast_id, claims.parent_peer_id)
            .ok_or(TicketError::Encode("signer has no ticket master"))?;
        let mut msg = BytesMut::with_capacity(FIXED_LEN + id.len() + MAC_LEN);
        put_body(&mut msg, TICKET_MAC_VERSION, self.key_id(), claims, id);
        let tag = mac(&hmac::Key::new(hmac::HMAC_SHA256, &key.key), &msg);
        msg.put_slice(tag.as_ref());
        Ok(msg.freeze())
    }
}

fn mac(key: &hmac::Key, body: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(MAC_CONTEXT);
    ctx.update(body);
    ctx.sign()
}

/// What a parent holds to check the version-2 tickets naming it: its ticket key per
/// token-signing key id (at most [`MAX_TICKET_KEYS`]; replaced whole when the control
/// plane sends new key sets).
#[derive(Clone, Default)]
pub struct ParentTicketKeys {
    keys: Vec<(u32, hmac::Key)>,
}

impl std::fmt::Debug for ParentTicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u32> = self.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("ParentTicketKeys")
            .field("key_ids", &ids)
            .finish()
    }
}

impl ParentTicketKeys {
    /// From raw keys (as received); keys of the wrong length are skipped, and only the
    /// first [`MAX_TICKET_KEYS`] kept.
    pub fn from_raw<'a>(keys: impl IntoIterator<Item = (u32, &'a [u8])>) -> ParentTicketKeys {
        let keys = keys
            .into_iter()
            .filter(|(_, k)| k.len() == TICKET_KEY_LEN)
            .take(MAX_TICKET_KEYS)
            .map(|(id, k)| (id, hmac::Key::new(hmac::HMAC_SHA256, k)))
            .collect();
        ParentTicketKeys { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn get(&self, key_id: u32) -> Option<&hmac::Key> {
        self.keys
            .iter()
            .find(|(id, _)| *id == key_id)
            .map(|(_, k)| k)
    }

    /// Checks a version-2 ticket presented by `child_peer_id` to us, `parent_peer_id`,
    /// in the order of [`TokenVerifier::verify_ticket`] (`BadSignature` = a wrong MAC).
    pub fn verify_ticket(
        &self,
        ticket: &[u8],
        expected_broadcast: &str,
        child_peer_id: u64,
        parent_peer_id: u64,
        now_unix_ms: u64,
        skew_ms: u64,
    ) -> Result<TicketClaims, TicketError> {
        let body_len = check_envelope_with_tail(
            ticket,
            MAX_TICKET_MAC_LEN,
            TICKET_MAC_VERSION,
            FIXED_LEN,
            MAX_BROADCAST_ID,
            MAC_LEN,
        )?;
        let key_id = be_u32(ticket, 1);
        let key = self.get(key_id).ok_or(TicketError::UnknownKeyId(key_id))?;
        let (body, tag) = ticket.split_at(body_len);
        // On the stack, as version 1 does (the envelope bounds the body).
        let mut msg = [0u8; MAC_CONTEXT.len() + FIXED_LEN + MAX_BROADCAST_ID];
        let n = MAC_CONTEXT.len() + body.len();
        msg[..MAC_CONTEXT.len()].copy_from_slice(MAC_CONTEXT);
        msg[MAC_CONTEXT.len()..n].copy_from_slice(body);
        hmac::verify(key, &msg[..n], tag).map_err(|_| TicketError::BadSignature)?;
        check_claims(
            claims_of(body),
            &body[FIXED_LEN..],
            expected_broadcast,
            child_peer_id,
            parent_peer_id,
            now_unix_ms,
            skew_ms,
        )
    }
}

/// Checks a parent ticket of either version: version 1 with the token keys
/// (`tokens`), version 2 with our ticket keys (`ours`). Anything else is
/// `UnsupportedVersion` (or `Truncated` when empty).
#[allow(clippy::too_many_arguments)]
pub fn verify_any_ticket(
    ticket: &[u8],
    tokens: &TokenVerifier,
    ours: &ParentTicketKeys,
    expected_broadcast: &str,
    child_peer_id: u64,
    parent_peer_id: u64,
    now_unix_ms: u64,
    skew_ms: u64,
) -> Result<TicketClaims, TicketError> {
    if ticket.first() == Some(&TICKET_MAC_VERSION) {
        ours.verify_ticket(
            ticket,
            expected_broadcast,
            child_peer_id,
            parent_peer_id,
            now_unix_ms,
            skew_ms,
        )
    } else {
        tokens.verify_ticket(
            ticket,
            expected_broadcast,
            child_peer_id,
            parent_peer_id,
            now_unix_ms,
            skew_ms,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ticket::MAX_TICKET_LEN;
    use crate::token::generate_pkcs8;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const NOW: u64 = 1_700_000_000_000;
    const SKEW: u64 = 5_000;

    fn signer() -> &'static TokenSigner {
        static S: OnceLock<TokenSigner> = OnceLock::new();
        S.get_or_init(|| TokenSigner::new(3, &generate_pkcs8().unwrap()).unwrap())
    }

    fn claims() -> TicketClaims {
        TicketClaims {
            broadcast_id: "b-1".into(),
            child_peer_id: 42,
            parent_peer_id: 7,
            substream_mask: 0b101,
            issued_at_ms: NOW,
            expires_at_ms: NOW + 600_000,
        }
    }

    /// The keys parent 7 of "b-1" receives.
    fn parent_keys(s: &TokenSigner) -> ParentTicketKeys {
        let k = s.ticket_key("b-1", 7).unwrap();
        ParentTicketKeys::from_raw([(k.key_id, &k.key[..])])
    }

    fn verifier(s: &TokenSigner) -> TokenVerifier {
        let mut v = TokenVerifier::new();
        v.add_key(s.key_id(), &s.public_key()).unwrap();
        v
    }

    #[test]
    fn round_trip() {
        let s = signer();
        assert!(s.makes_mac_tickets());
        let t = s.sign_ticket_mac(&claims()).unwrap();
        assert_eq!(t[0], TICKET_MAC_VERSION);
        assert_eq!(t.len(), FIXED_LEN + 3 + MAC_LEN);
        const { assert!(MAX_TICKET_MAC_LEN <= MAX_TICKET_LEN) };
        let c = parent_keys(s)
            .verify_ticket(&t, "b-1", 42, 7, NOW + 1, SKEW)
            .unwrap();
        assert_eq!(c, claims());
        // Through the dispatcher too, and version 1 still goes to the public keys.
        let v = verifier(s);
        let any = verify_any_ticket(&t, &v, &parent_keys(s), "b-1", 42, 7, NOW, SKEW);
        assert_eq!(any.unwrap(), claims());
        let v1 = s.sign_ticket(&claims()).unwrap();
        let any = verify_any_ticket(
            &v1,
            &v,
            &ParentTicketKeys::default(),
            "b-1",
            42,
            7,
            NOW,
            SKEW,
        );
        assert_eq!(any.unwrap(), claims());
    }

    #[test]
    fn keys_are_per_parent_broadcast_and_signing_key() {
        let s = signer();
        let k = s.ticket_key("b-1", 7).unwrap();
        assert_eq!(k, s.ticket_key("b-1", 7).unwrap(), "deterministic");
        assert_ne!(k.key, s.ticket_key("b-1", 8).unwrap().key);
        assert_ne!(k.key, s.ticket_key("b-2", 7).unwrap().key);
        let other = TokenSigner::new(3, &generate_pkcs8().unwrap()).unwrap();
        assert_ne!(k.key, other.ticket_key("b-1", 7).unwrap().key);
        assert!(s.ticket_key("", 7).is_none());
        assert_eq!(
            format!("{k:?}"),
            "TicketKey { key_id: 3, .. }",
            "no key in logs"
        );
    }

    #[test]
    fn another_parents_key_or_signer_is_refused() {
        let s = signer();
        let t = s.sign_ticket_mac(&claims()).unwrap();
        // Parent 8's key cannot check a ticket naming 7 (nor could 8 forge one for 7).
        let k8 = s.ticket_key("b-1", 8).unwrap();
        let keys8 = ParentTicketKeys::from_raw([(k8.key_id, &k8.key[..])]);
        assert_eq!(
            keys8.verify_ticket(&t, "b-1", 42, 7, NOW, SKEW),
            Err(TicketError::BadSignature)
        );
        let other = TokenSigner::new(3, &generate_pkcs8().unwrap()).unwrap();
        assert_eq!(
            parent_keys(&other).verify_ticket(&t, "b-1", 42, 7, NOW, SKEW),
            Err(TicketError::BadSignature)
        );
        let other_id = TokenSigner::new(4, &generate_pkcs8().unwrap()).unwrap();
        assert_eq!(
            parent_keys(&other_id).verify_ticket(&t, "b-1", 42, 7, NOW, SKEW),
            Err(TicketError::UnknownKeyId(3))
        );
    }

    #[test]
    fn claims_are_checked_after_the_mac() {
        let s = signer();
        let keys = parent_keys(s);
        let t = s.sign_ticket_mac(&claims()).unwrap();
        let check = |child, parent, now| keys.verify_ticket(&t, "b-1", child, parent, now, SKEW);
        assert_eq!(check(43, 7, NOW), Err(TicketError::WrongChild));
        assert_eq!(check(42, 8, NOW), Err(TicketError::WrongParent));
        assert_eq!(check(42, 7, NOW + 700_000), Err(TicketError::Expired));
        assert_eq!(check(42, 7, NOW - 10_000), Err(TicketError::NotYetValid));
        assert_eq!(
            keys.verify_ticket(&t, "b-2", 42, 7, NOW, SKEW),
            Err(TicketError::WrongBroadcast)
        );
    }

    #[test]
    fn a_signer_without_seed_makes_no_mac_tickets() {
        let pkcs8 = generate_pkcs8().unwrap();
        let pair = crate::token::key_pair_from_pkcs8(&pkcs8).unwrap();
        let s = TokenSigner::from_key_pair(1, pair);
        assert!(!s.makes_mac_tickets());
        assert!(s.ticket_key("b-1", 7).is_none());
        assert!(matches!(
            s.sign_ticket_mac(&claims()),
            Err(TicketError::Encode(_))
        ));
    }

    proptest! {
        /// Any change to any byte of a ticket is refused; nothing panics.
        #[test]
        fn tampering_is_refused(at in 0usize..(FIXED_LEN + 3 + MAC_LEN), bit in 0u8..8) {
            let s = signer();
            let mut t = s.sign_ticket_mac(&claims()).unwrap().to_vec();
            t[at] ^= 1 << bit;
            prop_assert!(parent_keys(s).verify_ticket(&t, "b-1", 42, 7, NOW, SKEW).is_err());
        }

        /// Arbitrary input never panics.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let s = signer();
            let _ = verify_any_ticket(&bytes, &verifier(s), &parent_keys(s), "b-1", 42, 7, NOW, SKEW);
        }
    }
}
