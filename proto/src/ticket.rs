//! Signed parent tickets.
//!
//! The control plane assigns each viewer a parent per substream. A ticket is its
//! signed word for one such assignment: "peer `child` may subscribe to the substreams
//! in `substream_mask` at peer `parent`, until `expires_at`". The child presents it to
//! the parent in a `TICKET` frame; a relaying peer admits a child only for substreams
//! that a valid ticket naming both of them covers, so nobody can squat a relay's slots
//! without an assignment.
//!
//! Tickets are signed with the same Ed25519 keys (key ids, rotation) as chunk tokens
//! ([`crate::token`]), under their own domain-separation prefix, so a token can never
//! pass as a ticket nor the other way round.
//!
//! Layout (big endian, specified byte by byte in `docs/PROTOCOL.md`):
//!
//! ```text
//! version u8 = 1 | key_id u32 | child_peer_id u64 | parent_peer_id u64
//! | substream_mask u64 | issued_at_ms u64 | expires_at_ms u64
//! | broadcast_len u8 (1..=128) | broadcast utf-8
//! | signature [64]      (Ed25519 over "starling/ticket/v1\0" ++ every byte before it)
//! ```
//!
//! 111 to 238 bytes; anything longer than [`MAX_TICKET_LEN`] is rejected before parsing.
//! Verification never panics and returns a typed [`TicketError`] for every failure.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ed25519::{EnvelopeError, be_u32, be_u64, check_envelope};
use crate::token::{MAX_BROADCAST_ID, SIGNATURE_LEN, TokenSigner, TokenVerifier};

/// Ticket format version produced and accepted by this build.
pub const TICKET_VERSION: u8 = 1;
/// Length of the fixed part before the broadcast id (version .. broadcast_len).
pub const FIXED_LEN: usize = 46;
/// Shortest well-formed ticket (one-byte broadcast id).
pub const MIN_TICKET_LEN: usize = FIXED_LEN + 1 + SIGNATURE_LEN;
/// Longest well-formed ticket; longer input is [`TicketError::Oversized`]. Also the
/// payload cap of the wire's `TICKET` frame.
pub const MAX_TICKET_LEN: usize = FIXED_LEN + MAX_BROADCAST_ID + SIGNATURE_LEN;
/// Domain-separation prefix of the signed message (not on the wire).
pub const SIGNING_CONTEXT: &[u8] = b"starling/ticket/v1\0";

/// What a ticket says. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketClaims {
    pub broadcast_id: String,
    /// The peer allowed to subscribe (the `peer_id` of its chunk token).
    pub child_peer_id: u64,
    /// The relaying peer it may subscribe at.
    pub parent_peer_id: u64,
    /// Substreams covered (bit `i` = substream `i`); never 0.
    pub substream_mask: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Every reason a ticket is refused (or cannot be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket truncated")]
    Truncated,
    #[error("ticket longer than {MAX_TICKET_LEN} bytes")]
    Oversized,
    #[error("unsupported ticket version {0}")]
    UnsupportedVersion(u8),
    #[error("ticket signed with unknown key id {0}")]
    UnknownKeyId(u32),
    #[error("ticket signature is not valid")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
    #[error("ticket not yet valid")]
    NotYetValid,
    #[error("ticket is for another broadcast")]
    WrongBroadcast,
    #[error("ticket names another child")]
    WrongChild,
    #[error("ticket names another parent")]
    WrongParent,
    #[error("malformed ticket: {0}")]
    Malformed(&'static str),
    /// Signing side only: the claims cannot be encoded.
    #[error("cannot sign ticket: {0}")]
    Encode(&'static str),
}

impl TicketError {
    /// A short machine-readable reason (the first word of an `ERROR` message).
    pub fn reason(&self) -> &'static str {
        match self {
            TicketError::Truncated => "truncated",
            TicketError::Oversized => "oversized",
            TicketError::UnsupportedVersion(_) => "unsupported_version",
            TicketError::UnknownKeyId(_) => "unknown_key",
            TicketError::BadSignature => "bad_signature",
            TicketError::Expired => "expired",
            TicketError::NotYetValid => "not_yet_valid",
            TicketError::WrongBroadcast => "wrong_broadcast",
            TicketError::WrongChild => "wrong_child",
            TicketError::WrongParent => "wrong_parent",
            TicketError::Malformed(_) | TicketError::Encode(_) => "malformed",
        }
    }
}

impl From<EnvelopeError> for TicketError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Oversized => TicketError::Oversized,
            EnvelopeError::Truncated => TicketError::Truncated,
            EnvelopeError::UnsupportedVersion(v) => TicketError::UnsupportedVersion(v),
            EnvelopeError::Malformed(m) => TicketError::Malformed(m),
        }
    }
}

impl TokenSigner {
    /// Encodes and signs a parent ticket with this token-signing key. Fails on an empty
    /// or over-long broadcast id, an empty mask, or `expires_at_ms <= issued_at_ms`.
    pub fn sign_ticket(&self, claims: &TicketClaims) -> Result<Bytes, TicketError> {
        let id = check_signable(claims)?;
        let body_len = FIXED_LEN + id.len();
        let mut msg = BytesMut::with_capacity(SIGNING_CONTEXT.len() + body_len + SIGNATURE_LEN);
        msg.put_slice(SIGNING_CONTEXT);
        put_body(&mut msg, TICKET_VERSION, self.key_id(), claims, id);
        let sig = self.sign_bytes(&msg);
        msg.put_slice(sig.as_ref());
        let _context = msg.split_to(SIGNING_CONTEXT.len());
        Ok(msg.freeze())
    }
}

/// The claims' broadcast id bytes, once the claims can be encoded: a non-empty id of at
/// most [`MAX_BROADCAST_ID`] bytes, a non-empty mask, `expires_at_ms > issued_at_ms`.
pub(crate) fn check_signable(claims: &TicketClaims) -> Result<&[u8], TicketError> {
    let id = claims.broadcast_id.as_bytes();
    if id.is_empty() {
        return Err(TicketError::Encode("empty broadcast id"));
    }
    if id.len() > MAX_BROADCAST_ID {
        return Err(TicketError::Encode("broadcast id too long"));
    }
    if claims.substream_mask == 0 {
        return Err(TicketError::Encode("empty substream mask"));
    }
    if claims.expires_at_ms <= claims.issued_at_ms {
        return Err(TicketError::Encode(
            "expires_at_ms must be after issued_at_ms",
        ));
    }
    Ok(id)
}

/// The parsed but not yet verified parts of a ticket.
struct Parsed<'a> {
    key_id: u32,
    claims: TicketClaims,
    signed: &'a [u8],
    signature: &'a [u8],
}

/// Structural parse; lengths are checked before every read.
fn parse(ticket: &[u8]) -> Result<Parsed<'_>, TicketError> {
    let body_len = check_envelope(
        ticket,
        MAX_TICKET_LEN,
        TICKET_VERSION,
        FIXED_LEN,
        MAX_BROADCAST_ID,
    )?;
    Ok(Parsed {
        key_id: be_u32(ticket, 1),
        claims: claims_of(&ticket[..body_len]),
        signed: &ticket[..body_len],
        signature: &ticket[body_len..],
    })
}

/// Writes the part both ticket versions share (everything before the signature or
/// MAC): `version`, `key_id`, the claims and the broadcast id `id` (checked by
/// [`check_signable`]).
pub(crate) fn put_body(msg: &mut BytesMut, version: u8, key_id: u32, c: &TicketClaims, id: &[u8]) {
    msg.put_u8(version);
    msg.put_u32(key_id);
    msg.put_u64(c.child_peer_id);
    msg.put_u64(c.parent_peer_id);
    msg.put_u64(c.substream_mask);
    msg.put_u64(c.issued_at_ms);
    msg.put_u64(c.expires_at_ms);
    msg.put_u8(id.len() as u8);
    msg.put_slice(id);
}

/// The claims of a ticket body whose envelope is checked (at least [`FIXED_LEN`]
/// bytes); the broadcast id is checked (UTF-8) only once the ticket is authentic, lossy
/// here.
pub(crate) fn claims_of(body: &[u8]) -> TicketClaims {
    TicketClaims {
        broadcast_id: String::from_utf8_lossy(&body[FIXED_LEN..]).into_owned(),
        child_peer_id: be_u64(body, 5),
        parent_peer_id: be_u64(body, 13),
        substream_mask: be_u64(body, 21),
        issued_at_ms: be_u64(body, 29),
        expires_at_ms: be_u64(body, 37),
    }
}

impl TokenVerifier {
    /// Checks a parent ticket with the token keys, in this order: size and structure
    /// (`Oversized`, `Truncated`, `UnsupportedVersion`, `Malformed`), `UnknownKeyId`,
    /// `BadSignature`, then — only for authentic tickets — field sanity (`Malformed`:
    /// empty mask, `expires_at_ms <= issued_at_ms`, non-UTF-8 id), `NotYetValid`,
    /// `Expired` (`now_unix_ms >= expires_at_ms + skew_ms`), `WrongBroadcast`,
    /// `WrongChild`, `WrongParent`. Which substreams it covers is the caller's check.
    pub fn verify_ticket(
        &self,
        ticket: &[u8],
        expected_broadcast: &str,
        child_peer_id: u64,
        parent_peer_id: u64,
        now_unix_ms: u64,
        skew_ms: u64,
    ) -> Result<TicketClaims, TicketError> {
        let p = parse(ticket)?;
        let key = self
            .key_set()
            .get(p.key_id)
            .ok_or(TicketError::UnknownKeyId(p.key_id))?;
        let mut msg = [0u8; SIGNING_CONTEXT.len() + FIXED_LEN + MAX_BROADCAST_ID];
        let n = SIGNING_CONTEXT.len() + p.signed.len();
        msg[..SIGNING_CONTEXT.len()].copy_from_slice(SIGNING_CONTEXT);
        msg[SIGNING_CONTEXT.len()..n].copy_from_slice(p.signed);
        key.verify(&msg[..n], p.signature)
            .map_err(|_| TicketError::BadSignature)?;
        check_claims(
            p.claims,
            &p.signed[FIXED_LEN..],
            expected_broadcast,
            child_peer_id,
            parent_peer_id,
            now_unix_ms,
            skew_ms,
        )
    }
}

/// The checks after authentication, shared by both ticket versions: field sanity
/// (`Malformed`), `NotYetValid`, `Expired`, `WrongBroadcast`, `WrongChild`,
/// `WrongParent`. `broadcast` is the id's raw bytes.
pub(crate) fn check_claims(
    c: TicketClaims,
    broadcast: &[u8],
    expected_broadcast: &str,
    child_peer_id: u64,
    parent_peer_id: u64,
    now_unix_ms: u64,
    skew_ms: u64,
) -> Result<TicketClaims, TicketError> {
    if c.substream_mask == 0 {
        return Err(TicketError::Malformed("empty substream mask"));
    }
    if c.expires_at_ms <= c.issued_at_ms {
        return Err(TicketError::Malformed(
            "expires_at_ms not after issued_at_ms",
        ));
    }
    if std::str::from_utf8(broadcast).is_err() {
        return Err(TicketError::Malformed("broadcast id is not UTF-8"));
    }
    if c.issued_at_ms > now_unix_ms.saturating_add(skew_ms) {
        return Err(TicketError::NotYetValid);
    }
    if now_unix_ms >= c.expires_at_ms.saturating_add(skew_ms) {
        return Err(TicketError::Expired);
    }
    if c.broadcast_id != expected_broadcast {
        return Err(TicketError::WrongBroadcast);
    }
    if c.child_peer_id != child_peer_id {
        return Err(TicketError::WrongChild);
    }
    if c.parent_peer_id != parent_peer_id {
        return Err(TicketError::WrongParent);
    }
    Ok(c)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::token::{Scopes, TokenClaims, generate_pkcs8};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const NOW: u64 = 1_700_000_000_000;
    const SKEW: u64 = 5_000;

    fn pkcs8() -> &'static [u8] {
        static K: OnceLock<Vec<u8>> = OnceLock::new();
        K.get_or_init(|| generate_pkcs8().unwrap())
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

    fn setup() -> (TokenSigner, TokenVerifier) {
        let s = TokenSigner::new(3, pkcs8()).unwrap();
        let mut v = TokenVerifier::new();
        v.add_key(3, &s.public_key()).unwrap();
        (s, v)
    }

    fn check(v: &TokenVerifier, t: &[u8]) -> Result<TicketClaims, TicketError> {
        v.verify_ticket(t, "b-1", 42, 7, NOW + 1000, SKEW)
    }

    #[test]
    fn valid_ticket_roundtrips() {
        let (s, v) = setup();
        let t = s.sign_ticket(&claims()).unwrap();
        assert_eq!(t.len(), MIN_TICKET_LEN + 2);
        assert_eq!(check(&v, &t).unwrap(), claims());
        let mut c = claims();
        c.broadcast_id = "x".repeat(MAX_BROADCAST_ID);
        let t = s.sign_ticket(&c).unwrap();
        assert_eq!(t.len(), MAX_TICKET_LEN);
        v.verify_ticket(&t, &c.broadcast_id, 42, 7, NOW, 0).unwrap();
    }

    #[test]
    fn wrong_child_or_parent_rejected() {
        let (s, v) = setup();
        let t = s.sign_ticket(&claims()).unwrap();
        assert_eq!(
            v.verify_ticket(&t, "b-1", 43, 7, NOW, SKEW),
            Err(TicketError::WrongChild)
        );
        assert_eq!(
            v.verify_ticket(&t, "b-1", 42, 8, NOW, SKEW),
            Err(TicketError::WrongParent)
        );
        // Child and parent swapped.
        assert_eq!(
            v.verify_ticket(&t, "b-1", 7, 42, NOW, SKEW),
            Err(TicketError::WrongChild)
        );
        assert_eq!(
            v.verify_ticket(&t, "b-2", 42, 7, NOW, SKEW),
            Err(TicketError::WrongBroadcast)
        );
    }

    #[test]
    fn expired_and_not_yet_valid_rejected() {
        let (s, v) = setup();
        let t = s.sign_ticket(&claims()).unwrap();
        let exp = claims().expires_at_ms;
        assert!(
            v.verify_ticket(&t, "b-1", 42, 7, exp + SKEW - 1, SKEW)
                .is_ok()
        );
        assert_eq!(
            v.verify_ticket(&t, "b-1", 42, 7, exp + SKEW, SKEW),
            Err(TicketError::Expired)
        );
        assert!(v.verify_ticket(&t, "b-1", 42, 7, NOW - SKEW, SKEW).is_ok());
        assert_eq!(
            v.verify_ticket(&t, "b-1", 42, 7, NOW - SKEW - 1, SKEW),
            Err(TicketError::NotYetValid)
        );
    }

    #[test]
    fn wrong_key_rejected() {
        let (s, v) = setup();
        // Same key id, another key.
        let other = TokenSigner::new(3, &generate_pkcs8().unwrap()).unwrap();
        let t = other.sign_ticket(&claims()).unwrap();
        assert_eq!(check(&v, &t), Err(TicketError::BadSignature));
        // A key id the verifier does not hold.
        let t = s.sign_ticket(&claims()).unwrap();
        let mut v4 = TokenVerifier::new();
        v4.add_key(4, &s.public_key()).unwrap();
        assert_eq!(check(&v4, &t), Err(TicketError::UnknownKeyId(3)));
    }

    #[test]
    fn a_token_is_not_a_ticket() {
        // Same key, other format and context: refused, whatever the bytes line up to.
        let (s, v) = setup();
        let token = s
            .sign(&TokenClaims {
                broadcast_id: "b-1".into(),
                peer_id: 42,
                session_id: 7,
                scopes: Scopes::PLAY | Scopes::RELAY,
                issued_at_ms: NOW,
                expires_at_ms: NOW + 120_000,
                holder_key: [1; 32],
            })
            .unwrap();
        assert!(check(&v, &token).is_err());
        // A ticket's bytes are not a token either.
        let t = s.sign_ticket(&claims()).unwrap();
        assert!(v.verify(&t, "b-1", Scopes::PLAY, NOW, SKEW).is_err());
    }

    #[test]
    fn structure_rejected() {
        let (s, v) = setup();
        let t = s.sign_ticket(&claims()).unwrap();
        for n in [0, 1, FIXED_LEN - 1, FIXED_LEN, t.len() - 1] {
            assert_eq!(check(&v, &t[..n]), Err(TicketError::Truncated), "len {n}");
        }
        let mut long = t.to_vec();
        long.resize(MAX_TICKET_LEN + 1, 0);
        assert_eq!(check(&v, &long), Err(TicketError::Oversized));
        let mut trailing = t.to_vec();
        trailing.push(0);
        assert_eq!(
            check(&v, &trailing),
            Err(TicketError::Malformed("trailing bytes"))
        );
        let mut ver = t.to_vec();
        ver[0] = 2;
        assert_eq!(check(&v, &ver), Err(TicketError::UnsupportedVersion(2)));
    }

    #[test]
    fn sign_refuses_bad_claims() {
        let (s, _) = setup();
        for c in [
            TicketClaims {
                broadcast_id: String::new(),
                ..claims()
            },
            TicketClaims {
                broadcast_id: "x".repeat(MAX_BROADCAST_ID + 1),
                ..claims()
            },
            TicketClaims {
                substream_mask: 0,
                ..claims()
            },
            TicketClaims {
                expires_at_ms: NOW,
                ..claims()
            },
        ] {
            assert!(matches!(s.sign_ticket(&c), Err(TicketError::Encode(_))));
        }
    }

    #[test]
    fn every_single_bit_flip_rejected() {
        let (s, v) = setup();
        let t = s.sign_ticket(&claims()).unwrap().to_vec();
        for bit in 0..t.len() * 8 {
            let mut x = t.clone();
            x[bit / 8] ^= 1 << (bit % 8);
            assert!(check(&v, &x).is_err(), "bit {bit} accepted");
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (_, v) = setup();
            prop_assert!(check(&v, &data).is_err());
        }

        #[test]
        fn arbitrary_body_with_valid_prefix(kid in prop_oneof![Just(3u32), any::<u32>()], len in 0usize..=255, rest in proptest::collection::vec(any::<u8>(), 0..400)) {
            let (_, v) = setup();
            let mut t = vec![TICKET_VERSION];
            t.extend_from_slice(&kid.to_be_bytes());
            t.extend_from_slice(&rest);
            if t.len() >= FIXED_LEN { t[FIXED_LEN - 1] = len as u8; }
            prop_assert!(check(&v, &t).is_err());
        }

        #[test]
        fn any_single_bit_flip_is_rejected(bit in 0usize..(MIN_TICKET_LEN + 20) * 8, id in "[a-z0-9-]{1,21}") {
            let (s, v) = setup();
            let c = TicketClaims { broadcast_id: id.clone(), ..claims() };
            let mut t = s.sign_ticket(&c).unwrap().to_vec();
            let bit = bit % (t.len() * 8);
            t[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(v.verify_ticket(&t, &id, 42, 7, NOW, SKEW).is_err());
        }

        #[test]
        fn sign_verify_roundtrip(id in "\\PC{1,32}", child in any::<u64>(), parent in any::<u64>(), mask in 1u64.., iat in 0u64..u64::MAX / 2, life in 1u64..1_000_000) {
            prop_assume!(id.len() <= MAX_BROADCAST_ID);
            let (s, v) = setup();
            let c = TicketClaims { broadcast_id: id.clone(), child_peer_id: child, parent_peer_id: parent, substream_mask: mask, issued_at_ms: iat, expires_at_ms: iat + life };
            let t = s.sign_ticket(&c).unwrap();
            prop_assert_eq!(v.verify_ticket(&t, &id, child, parent, iat, 0).unwrap(), c);
        }
    }
}
