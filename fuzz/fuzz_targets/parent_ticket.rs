//! Parent tickets of both versions (Ed25519 under the token key, HMAC under the
//! parent's ticket key) through `verify_any_ticket`. An accepted ticket must name this
//! broadcast, this child and this parent, cover at least one substream and be in force.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_fuzz::{BROADCAST, CHILD, NOW_MS, PARENT, TOKEN_KEY_ID, token_signer};
use starling_proto::ticket_mac::{ParentTicketKeys, verify_any_ticket};
use starling_proto::token::TokenVerifier;

const SKEW_MS: u64 = 5_000;

fuzz_target!(|data: &[u8]| {
    let mut tokens = TokenVerifier::new();
    if let Err(e) = tokens.add_key(TOKEN_KEY_ID, &token_signer().public_key()) {
        panic!("test key: {e}");
    }
    let Some(k) = token_signer().ticket_key(BROADCAST, PARENT) else {
        panic!("the test key makes no version-2 tickets");
    };
    let ours = ParentTicketKeys::from_raw([(k.key_id, &k.key[..])]);
    if let Ok(c) = verify_any_ticket(
        data, &tokens, &ours, BROADCAST, CHILD, PARENT, NOW_MS, SKEW_MS,
    ) {
        assert_eq!(c.broadcast_id, BROADCAST);
        assert_eq!((c.child_peer_id, c.parent_peer_id), (CHILD, PARENT));
        assert_ne!(c.substream_mask, 0);
        assert!(
            NOW_MS < c.expires_at_ms + SKEW_MS,
            "expired ticket accepted"
        );
    }
});
