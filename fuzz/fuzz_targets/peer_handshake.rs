//! The SDK's peer-link handshake on a relay's listener (`HELLO` with a chunk token,
//! `TICKET`s, `SUBSCRIBE`): arbitrary bytes decoded into frames and run through the
//! same state machine the listener runs. A subscribed link must carry a verified
//! token's peer id (tokens are enforced here).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use starling_fuzz::{BROADCAST, NOW_MS, PARENT, TOKEN_KEY_ID, token_signer};
use starling_sdk::fuzz_api::{Outcome, PeerListener};

fn listener() -> &'static PeerListener {
    static L: OnceLock<PeerListener> = OnceLock::new();
    L.get_or_init(|| {
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
