//! Entry points for the fuzz targets in `fuzz/` (compiled only with `--cfg fuzzing`,
//! which `cargo fuzz` sets): the peer-link handshake of our listener, fed with the
//! frames the wire decoder makes of arbitrary bytes, exactly as `relay::link` does.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use starling_proto::wire::{Decoder, Limits};

use crate::relay::handshake::{PeerHandshake, Step, Us};
use crate::rights::{OwnToken, Rights};

/// The nonce every fuzzed handshake's `HELLO_ACK` carries (fixed, so that seeds can
/// hold a valid `PROOF`).
pub const NONCE: [u8; starling_proto::holder::NONCE_LEN] = [0x42; 32];

/// A relay's listener for broadcast `broadcast_id`, trusting one token key.
pub struct PeerListener {
    rights: Rights,
    me: u64,
    broadcast_id: String,
}

/// How a fuzzed handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes ran out (or failed to decode) before the handshake ended.
    Incomplete,
    Refused,
    /// Subscribed, with the peer id its token named.
    Subscribed {
        peer_id: Option<u64>,
    },
}

impl PeerListener {
    /// `token_key`: (key id, Ed25519 public key) of the control plane's token key.
    pub fn new(broadcast_id: &str, me: u64, token_key: (u32, [u8; 32])) -> PeerListener {
        let own = OwnToken {
            token: Bytes::from_static(b"own token"),
            expires_at_ms: 0,
        };
        let keys = [(token_key.0, token_key.1.to_vec())];
        PeerListener {
            rights: Rights::new(broadcast_id, Duration::from_secs(5), own, &keys, &[], None),
            me,
            broadcast_id: broadcast_id.to_string(),
        }
    }

    /// Decodes `data` into frames and runs them through one handshake at `now_ms`.
    pub fn handshake(&self, data: &[u8], now_ms: u64) -> Outcome {
        let mut dec = Decoder::new(Limits::control_only());
        let mut buf = BytesMut::from(data);
        let mut hs = PeerHandshake::new(NONCE);
        let us = Us {
            rights: &self.rights,
            me: Some(self.me),
            broadcast_id: &self.broadcast_id,
        };
        while let Ok(Some(frame)) = dec.decode(&mut buf) {
            match hs.on_frame(frame, us, now_ms) {
                Step::Send(_) | Step::Read => {}
                Step::Refuse { .. } => return Outcome::Refused,
                Step::Done { sub, grant, .. } => {
                    assert_eq!(sub.broadcast_id, self.broadcast_id, "subscribed elsewhere");
                    return Outcome::Subscribed {
                        peer_id: grant.peer_id,
                    };
                }
            }
        }
        Outcome::Incomplete
    }
}
