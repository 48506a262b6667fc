//! The handshake of a link on our peer listener, as a sans-IO state machine: frames in
//! (with `now`), steps out. No socket and no clock: [`super::link`] reads frames and
//! carries out the steps; the fuzz target `peer_handshake` drives the same machine.
//!
//! `HELLO(peer)` with a valid chunk token → `HELLO_ACK` with a fresh nonce (given by
//! the caller: the machine draws no randomness), then `PROOF`: the peer's signature,
//! with the key its token names, over that nonce, its token and our peer id
//! (`starling_proto::holder`; a token harvested by another relay has no such proof:
//! `ERROR(UNAUTHORIZED)` `bad_proof` / `no_proof`, counted), then any `TICKET`s (each
//! checked at once), then `SUBSCRIBE` for our broadcast. `PING` is answered, `PONG`
//! ignored; anything else is refused. Which substreams the tickets must cover is the
//! engine's decision ([`super::admission`]). Without rights management (no token
//! keys) no proof is asked for and a `PROOF` sent anyway is ignored.

use bytes::Bytes;
use starling_proto::holder::{self, NONCE_LEN, Verifier};
use starling_proto::wire::{self, ErrorCode, Frame, HelloAck, Role, Subscribe};

use super::admission::{MAX_HANDSHAKE_TICKETS, Tickets};
use crate::rights::{Grant, Refusal, Rights};

/// What the caller does next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send this frame and read the next one.
    Send(Frame),
    /// Read the next frame.
    Read,
    /// Send `ERROR(code, message)` and close. `counted`: a refusal of the peer's
    /// rights (token, tickets, too many tickets), which the stats count and the log
    /// names; the others are protocol misuse.
    Refuse { refusal: Refusal, counted: bool },
    /// The link is subscribed.
    Done {
        sub: Subscribe,
        grant: Grant,
        tickets: Option<Tickets>,
    },
}

#[derive(Debug)]
enum State {
    AwaitHello,
    /// The token was valid; its holder must prove it holds `holder_key`.
    AwaitProof {
        grant: Grant,
        holder_key: [u8; 32],
        /// The `HELLO` token (the proof covers it).
        token: Bytes,
    },
    AwaitSubscribe {
        grant: Grant,
        tickets: Option<Tickets>,
        presented: usize,
    },
    Ended,
}

/// One handshake. After a `Refuse` or `Done` step, every later frame is refused.
#[derive(Debug)]
pub(crate) struct PeerHandshake {
    state: State,
    /// Sent in `HELLO_ACK`; the peer's `PROOF` must cover it.
    nonce: [u8; NONCE_LEN],
}

impl PeerHandshake {
    /// A handshake whose `HELLO_ACK` carries `nonce` (fresh random bytes:
    /// [`holder::new_nonce`]).
    pub(crate) fn new(nonce: [u8; NONCE_LEN]) -> Self {
        PeerHandshake {
            state: State::AwaitHello,
            nonce,
        }
    }
}

fn refuse(code: ErrorCode, message: &str, counted: bool) -> Step {
    Step::Refuse {
        refusal: Refusal {
            code,
            message: message.to_string(),
        },
        counted,
    }
}

/// What the handshake needs to know about us.
#[derive(Clone, Copy)]
pub(crate) struct Us<'a> {
    pub rights: &'a Rights,
    /// Our peer id (from `Join`); `None` without rights management.
    pub me: Option<u64>,
    pub broadcast_id: &'a str,
}

impl PeerHandshake {
    /// Takes the next frame the peer sent.
    pub(crate) fn on_frame(&mut self, frame: Frame, us: Us<'_>, now_ms: u64) -> Step {
        match std::mem::replace(&mut self.state, State::Ended) {
            State::AwaitHello => Self::on_hello(&mut self.state, frame, us, self.nonce),
            State::AwaitProof {
                grant,
                holder_key,
                token,
            } => match frame {
                Frame::Proof(p) => {
                    let me = Verifier::Peer(us.me.unwrap_or(0));
                    match holder::verify(&holder_key, &self.nonce, &token, me, &p) {
                        Ok(()) => {
                            self.state = State::AwaitSubscribe {
                                grant,
                                tickets: None,
                                presented: 0,
                            };
                            Step::Read
                        }
                        Err(e) => refuse(ErrorCode::Unauthorized, &format!("bad_proof: {e}"), true),
                    }
                }
                Frame::Ping(n) => {
                    self.state = State::AwaitProof {
                        grant,
                        holder_key,
                        token,
                    };
                    Step::Send(Frame::Pong(n))
                }
                Frame::Pong(_) => {
                    self.state = State::AwaitProof {
                        grant,
                        holder_key,
                        token,
                    };
                    Step::Read
                }
                _ => refuse(
                    ErrorCode::Unauthorized,
                    "no_proof: send PROOF (the token holder's signature over the HELLO_ACK \
                     nonce) before TICKET or SUBSCRIBE",
                    true,
                ),
            },
            State::AwaitSubscribe {
                grant,
                tickets,
                presented,
            } => Self::on_subscribing(
                &mut self.state,
                frame,
                us,
                now_ms,
                grant,
                tickets,
                presented,
            ),
            State::Ended => refuse(ErrorCode::UnexpectedFrame, "handshake over", false),
        }
    }

    fn on_hello(state: &mut State, frame: Frame, us: Us<'_>, nonce: [u8; NONCE_LEN]) -> Step {
        let Frame::Hello(hello) = frame else {
            return refuse(ErrorCode::UnexpectedFrame, "expected HELLO", false);
        };
        if hello.role != Role::Peer {
            return refuse(ErrorCode::UnexpectedFrame, "peer links only", false);
        }
        let Some(version) = wire::negotiate(hello.min_version, hello.max_version) else {
            return refuse(ErrorCode::UnsupportedVersion, "no common version", false);
        };
        match us.rights.check_peer_token(&hello.token) {
            Ok(grant) => {
                *state = match grant.holder_key {
                    Some(holder_key) => State::AwaitProof {
                        grant,
                        holder_key,
                        token: hello.token,
                    },
                    None => State::AwaitSubscribe {
                        grant,
                        tickets: None,
                        presented: 0,
                    },
                };
                Step::Send(Frame::HelloAck(HelloAck { version, nonce }))
            }
            Err(refusal) => Step::Refuse {
                refusal,
                counted: true,
            },
        }
    }

    fn on_subscribing(
        state: &mut State,
        frame: Frame,
        us: Us<'_>,
        now_ms: u64,
        grant: Grant,
        mut tickets: Option<Tickets>,
        mut presented: usize,
    ) -> Step {
        let step = match frame {
            Frame::Subscribe(sub) => {
                if sub.broadcast_id != us.broadcast_id {
                    return refuse(
                        ErrorCode::UnknownBroadcast,
                        "not relaying that broadcast",
                        false,
                    );
                }
                return Step::Done {
                    sub,
                    grant,
                    tickets,
                };
            }
            Frame::Ticket(t) => {
                presented += 1;
                if presented > MAX_HANDSHAKE_TICKETS {
                    return refuse(ErrorCode::ServerBusy, "too many tickets", true);
                }
                // Without rights management (no peer id) tickets cannot be checked.
                if let (Some(child), Some(me)) = (grant.peer_id, us.me) {
                    match us.rights.check_ticket(&t, child, me) {
                        Ok(c) => tickets
                            .get_or_insert_with(|| Tickets::new(me, now_ms))
                            .add(&c),
                        Err(refusal) => {
                            return Step::Refuse {
                                refusal,
                                counted: true,
                            };
                        }
                    }
                }
                Step::Read
            }
            Frame::Ping(n) => Step::Send(Frame::Pong(n)),
            Frame::Pong(_) => Step::Read,
            // Without rights management nothing is proven (the first PROOF of an
            // enforced handshake was taken in `AwaitProof`).
            Frame::Proof(_) if grant.holder_key.is_none() => Step::Read,
            _ => return refuse(ErrorCode::UnexpectedFrame, "expected SUBSCRIBE", false),
        };
        *state = State::AwaitSubscribe {
            grant,
            tickets,
            presented,
        };
        step
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rights::{OwnToken, unix_ms};
    use starling_proto::holder::HolderKey;
    use starling_proto::token::{Scopes, TokenClaims, TokenSigner, generate_pkcs8};
    use starling_proto::wire::{Hello, PROTOCOL_VERSION, StartAt};
    use std::time::Duration;

    const NONCE: [u8; NONCE_LEN] = [0x5A; NONCE_LEN];

    struct World {
        signer: TokenSigner,
        rights: Rights,
        /// The connecting peer's key (its tokens name it).
        key: HolderKey,
    }

    impl World {
        fn new() -> World {
            let signer = TokenSigner::new(1, &generate_pkcs8().unwrap()).unwrap();
            let own = OwnToken {
                token: Bytes::from_static(b"ours"),
                expires_at_ms: 0,
            };
            let keys = [(1, signer.public_key().to_vec())];
            let rights = Rights::new("b", Duration::from_secs(1), own, &keys, &[], None);
            World {
                signer,
                rights,
                key: HolderKey::generate().unwrap(),
            }
        }
        fn us(&self) -> Us<'_> {
            Us {
                rights: &self.rights,
                me: Some(9),
                broadcast_id: "b",
            }
        }
        fn hello(&self, peer_id: u64) -> Frame {
            Frame::Hello(Hello {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                role: Role::Peer,
                token: self.token(peer_id),
            })
        }
        /// The PROOF of `key` for `token` on a link to `verifier` that sent `nonce`.
        fn proof(
            key: &HolderKey,
            nonce: &[u8; NONCE_LEN],
            token: &[u8],
            verifier: Verifier,
        ) -> Frame {
            Frame::Proof(Bytes::copy_from_slice(&key.prove(nonce, token, verifier)))
        }
        /// The right proof for `token` to us (peer 9).
        fn good_proof(&self, token: &[u8]) -> Frame {
            Self::proof(&self.key, &NONCE, token, Verifier::Peer(9))
        }
        /// A handshake past HELLO_ACK for peer 7's token; returns the token.
        fn past_hello(&self, hs: &mut PeerHandshake, now: u64) -> Bytes {
            let token = self.token(7);
            let hello = Frame::Hello(Hello {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                role: Role::Peer,
                token: token.clone(),
            });
            match hs.on_frame(hello, self.us(), now) {
                Step::Send(Frame::HelloAck(a)) => assert_eq!(a.nonce, NONCE),
                other => panic!("expected HELLO_ACK, got {other:?}"),
            }
            token
        }
        fn token(&self, peer_id: u64) -> Bytes {
            let now = unix_ms();
            self.signer
                .sign(&TokenClaims {
                    broadcast_id: "b".into(),
                    peer_id,
                    session_id: 1,
                    scopes: Scopes::PLAY,
                    issued_at_ms: now - 1_000,
                    expires_at_ms: now + 60_000,
                    holder_key: self.key.public_key(),
                })
                .unwrap()
        }
    }

    fn subscribe(id: &str) -> Frame {
        Frame::Subscribe(Subscribe {
            broadcast_id: id.into(),
            start: StartAt::Live,
            substream_mask: 0,
        })
    }

    fn refused(step: Step) -> (ErrorCode, bool) {
        match step {
            Step::Refuse { refusal, counted } => (refusal.code, counted),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_handshake_ends_subscribed_with_the_peers_grant() {
        let w = World::new();
        let mut hs = PeerHandshake::new(NONCE);
        let now = unix_ms();
        let token = w.past_hello(&mut hs, now);
        assert!(matches!(
            hs.on_frame(Frame::Ping(4), w.us(), now),
            Step::Send(Frame::Pong(4))
        ));
        assert!(matches!(
            hs.on_frame(w.good_proof(&token), w.us(), now),
            Step::Read
        ));
        assert!(matches!(
            hs.on_frame(Frame::Ping(3), w.us(), now),
            Step::Send(Frame::Pong(3))
        ));
        assert!(matches!(
            hs.on_frame(Frame::Pong(1), w.us(), now),
            Step::Read
        ));
        match hs.on_frame(subscribe("b"), w.us(), now) {
            Step::Done { grant, tickets, .. } => {
                assert_eq!(grant.peer_id, Some(7));
                assert!(tickets.is_none());
            }
            other => panic!("expected Done, got {other:?}"),
        }
        // Nothing more is taken once it is over.
        assert_eq!(
            refused(hs.on_frame(Frame::Ping(1), w.us(), now)),
            (ErrorCode::UnexpectedFrame, false)
        );
    }

    #[test]
    fn bad_tokens_tickets_and_frames_are_refused() {
        let w = World::new();
        let now = unix_ms();
        // Not a HELLO first.
        let mut hs = PeerHandshake::new(NONCE);
        assert_eq!(
            refused(hs.on_frame(subscribe("b"), w.us(), now)),
            (ErrorCode::UnexpectedFrame, false)
        );
        // A HELLO without a valid token: a counted refusal.
        let mut hs = PeerHandshake::new(NONCE);
        let Frame::Hello(mut h) = w.hello(7) else {
            unreachable!()
        };
        h.token = Bytes::from_static(b"forged");
        assert_eq!(
            refused(hs.on_frame(Frame::Hello(h), w.us(), now)),
            (ErrorCode::Unauthorized, true)
        );
        // A forged ticket after a good HELLO and PROOF.
        let mut hs = PeerHandshake::new(NONCE);
        let token = w.past_hello(&mut hs, now);
        hs.on_frame(w.good_proof(&token), w.us(), now);
        let (code, counted) =
            refused(hs.on_frame(Frame::Ticket(Bytes::from_static(b"x")), w.us(), now));
        assert_eq!((code, counted), (ErrorCode::Unauthorized, true));
        // Another broadcast.
        let mut hs = PeerHandshake::new(NONCE);
        let token = w.past_hello(&mut hs, now);
        hs.on_frame(w.good_proof(&token), w.us(), now);
        assert_eq!(
            refused(hs.on_frame(subscribe("other"), w.us(), now)),
            (ErrorCode::UnknownBroadcast, false)
        );
    }

    /// A relay that harvested peer 7's token has no proof to go with it: whatever it
    /// sends instead is a counted UNAUTHORIZED.
    #[test]
    fn a_token_without_its_holders_proof_is_refused() {
        let w = World::new();
        let now = unix_ms();
        let thief = HolderKey::generate().unwrap();
        type Attempt = fn(&World, &HolderKey, &Bytes) -> Frame;
        let cases: [(&str, Attempt); 5] = [
            ("another key", |_, thief, t| {
                World::proof(thief, &NONCE, t, Verifier::Peer(9))
            }),
            ("another nonce", |w, _, t| {
                World::proof(&w.key, &[1; NONCE_LEN], t, Verifier::Peer(9))
            }),
            // The child's proof to its relay (peer 10), replayed to us.
            ("another verifier", |w, _, t| {
                World::proof(&w.key, &NONCE, t, Verifier::Peer(10))
            }),
            ("made for the data plane", |w, _, t| {
                World::proof(&w.key, &NONCE, t, Verifier::DataPlane)
            }),
            ("no proof at all", |_, _, _| subscribe("b")),
        ];
        for (what, frame) in cases {
            let mut hs = PeerHandshake::new(NONCE);
            let token = w.past_hello(&mut hs, now);
            let step = hs.on_frame(frame(&w, &thief, &token), w.us(), now);
            match step {
                Step::Refuse { refusal, counted } => {
                    assert_eq!(refusal.code, ErrorCode::Unauthorized, "{what}");
                    assert!(counted, "{what}");
                    assert!(
                        refusal.message.contains("proof"),
                        "{what}: {}",
                        refusal.message
                    );
                }
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
        }
        // A TICKET before the PROOF is refused too.
        let mut hs = PeerHandshake::new(NONCE);
        w.past_hello(&mut hs, now);
        assert_eq!(
            refused(hs.on_frame(Frame::Ticket(Bytes::from_static(b"t")), w.us(), now)),
            (ErrorCode::Unauthorized, true)
        );
    }

    #[test]
    fn tickets_are_counted_even_without_rights_management() {
        // A legacy relay checks no tickets but still caps how many it reads.
        let rights = Rights::new("b", Duration::ZERO, OwnToken::default(), &[], &[], None);
        let us = Us {
            rights: &rights,
            me: None,
            broadcast_id: "b",
        };
        let mut hs = PeerHandshake::new(NONCE);
        let w = World::new();
        assert!(matches!(
            hs.on_frame(w.hello(7), us, 0),
            Step::Send(Frame::HelloAck(_))
        ));
        // No proof is asked for; one sent anyway is ignored.
        assert!(matches!(hs.on_frame(w.good_proof(b"x"), us, 0), Step::Read));
        for _ in 0..MAX_HANDSHAKE_TICKETS {
            assert!(matches!(
                hs.on_frame(Frame::Ticket(Bytes::from_static(b"t")), us, 0),
                Step::Read
            ));
        }
        assert_eq!(
            refused(hs.on_frame(Frame::Ticket(Bytes::from_static(b"t")), us, 0)),
            (ErrorCode::ServerBusy, true)
        );
    }
}
