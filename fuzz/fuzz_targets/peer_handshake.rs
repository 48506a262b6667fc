//! The SDK's peer-link handshake on a relay's listener (`HELLO` with a chunk token,
//! `PROOF` of the token's holder key over the listener's nonce, `TICKET`s,
//! `SUBSCRIBE`): arbitrary bytes decoded into frames and run through the same state
//! machine the listener runs. A subscribed link must carry a verified token's peer id
//! (tokens and proofs are enforced here).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use starling_fuzz::{BROADCAST, HANDSHAKE_NONCE, NOW_MS, PARENT, TOKEN_KEY_ID, token_signer};
use starling_sdk::fuzz_api::{NONCE, Outcome, PeerListener};

fn listener() -> &'static PeerListener {
    static L: OnceLock<PeerListener> = OnceLock::new();
    L.get_or_init(|| {
        assert_eq!(
            NONCE, HANDSHAKE_NONCE,
            "the seeds' PROOFs are over this nonce"
        );
        PeerListener::new(
            BROADCAST,
            PARENT,
            (TOKEN_KEY_ID, token_signer().public_key()),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    if let Outcome::Subscribed { peer_id } = listener().handshake(data, NOW_MS) {
        assert!(peer_id.is_some(), "subscribed without a verified token");
    }
});
