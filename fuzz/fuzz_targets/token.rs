//! Chunk tokens: arbitrary bytes through `peek_unverified` and `TokenVerifier::verify`
//! with the seeds' key. A token that verifies must name the broadcast, be in force and
//! carry the scope asked for, and re-signing its claims must give the same claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_fuzz::{BROADCAST, NOW_MS, TOKEN_KEY_ID, token_signer};
use starling_proto::token::{Scopes, TokenVerifier, peek_unverified};

const SKEW_MS: u64 = 5_000;

fuzz_target!(|data: &[u8]| {
    let _ = peek_unverified(data);
    let mut v = TokenVerifier::new();
    if let Err(e) = v.add_key(TOKEN_KEY_ID, &token_signer().public_key()) {
        panic!("test key: {e}");
    }
    if let Ok(c) = v.verify(data, BROADCAST, Scopes::PLAY, NOW_MS, SKEW_MS) {
        assert_eq!(c.broadcast_id, BROADCAST);
        assert!(c.scopes.contains(Scopes::PLAY));
        assert!(NOW_MS < c.expires_at_ms + SKEW_MS, "expired token accepted");
        assert!(c.issued_at_ms <= NOW_MS + SKEW_MS, "future token accepted");
        let again = match token_signer().sign(&c) {
            Ok(t) => t,
            Err(e) => panic!("accepted claims do not sign: {e}: {c:?}"),
        };
        let c2 = v.verify(&again, BROADCAST, Scopes::PLAY, NOW_MS, SKEW_MS);
        assert_eq!(c2.as_ref(), Ok(&c));
    }
});
