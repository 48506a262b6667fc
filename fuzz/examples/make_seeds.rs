//! Writes the signed seed inputs of the fuzz targets into `corpus/<target>/`: frames of
//! every type, valid tokens, chunk signature blocks, tickets of both versions and
//! handshakes, all under the committed test keys. Media seeds (TS, MP3, AAC, Ogg,
//! WebM) come from ffmpeg in `scripts/fuzz.sh --make-seeds`.
//! Run: `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.

use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use starling_fuzz::{
    BROADCAST, CHILD, HANDSHAKE_NONCE, NOW_MS, PARENT, chunk_signer, holder, token_signer,
};
use starling_proto::holder::Verifier;
use starling_proto::integrity::ChunkMeta;
use starling_proto::ticket::TicketClaims;
use starling_proto::token::{Scopes, TokenClaims};
use starling_proto::wire::{
    self, BufferMapFrame, Chunk, ErrorCode, Frame, Hello, HelloAck, PROTOCOL_VERSION, Reason, Role,
    StartAt, StreamInfo, Subscribe,
};

const Y2020: u64 = 1_577_836_800_000;
const Y2100: u64 = 4_102_444_800_000;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    if let Err(e) =
        std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(name), data))
    {
        panic!("{}: {e}", dir.display());
    }
}

fn token(peer_id: u64, broadcast: &str, exp: u64) -> Bytes {
    token_signer()
        .sign(&TokenClaims {
            broadcast_id: broadcast.into(),
            peer_id,
            session_id: 42,
            scopes: Scopes::PLAY | Scopes::RELAY,
            issued_at_ms: Y2020,
            expires_at_ms: exp,
            holder_key: holder().public_key(),
        })
        .unwrap_or_else(|e| panic!("token: {e}"))
}

fn ticket_claims(mask: u64) -> TicketClaims {
    TicketClaims {
        broadcast_id: BROADCAST.into(),
        child_peer_id: CHILD,
        parent_peer_id: PARENT,
        substream_mask: mask,
        issued_at_ms: Y2020,
        expires_at_ms: Y2100,
    }
}

fn frames(fs: &[Frame]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for f in fs {
        wire::encode(f, &mut b).unwrap_or_else(|e| panic!("encode {f:?}: {e:?}"));
    }
    b.to_vec()
}

fn hello(tok: Bytes) -> Frame {
    Frame::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        role: Role::Peer,
        token: tok,
    })
}

/// The PROOF of the seeds' holder key for `tok` to the fuzzed listener (peer PARENT).
fn proof(tok: &[u8]) -> Frame {
    let p = holder().prove(&HANDSHAKE_NONCE, tok, Verifier::Peer(PARENT));
    Frame::Proof(Bytes::copy_from_slice(&p))
}

fn subscribe(mask: u64) -> Frame {
    Frame::Subscribe(Subscribe {
        broadcast_id: BROADCAST.into(),
        start: StartAt::Live,
        substream_mask: mask,
    })
}

fn main() {
    let tok = token(CHILD, BROADCAST, Y2100);
    write("token", "valid", &tok);
    write(
        "token",
        "other-broadcast",
        &token(CHILD, "elsewhere", Y2100),
    );
    write("token", "expired", &token(CHILD, BROADCAST, Y2020 + 60_000));

    let v1 = token_signer()
        .sign_ticket(&ticket_claims(0b1011))
        .unwrap_or_else(|e| panic!("ticket: {e}"));
    let v2 = token_signer()
        .sign_ticket_mac(&ticket_claims(u64::MAX))
        .unwrap_or_else(|e| panic!("ticket: {e}"));
    write("parent_ticket", "v1", &v1);
    write("parent_ticket", "v2", &v2);

    let payload = vec![0x47u8; 376];
    let meta = ChunkMeta {
        seq: 9,
        flags: wire::chunk_flags::RANDOM_ACCESS,
        timestamp_ms: NOW_MS - 1_000,
        duration_ms: 1000,
    };
    let block = chunk_signer()
        .sign(BROADCAST, &meta, &payload)
        .unwrap_or_else(|e| panic!("sign: {e}"));
    let mut cs = Vec::new();
    cs.put_u16(payload.len() as u16);
    cs.extend_from_slice(&payload);
    cs.extend_from_slice(&block);
    write("chunk_signature", "valid", &cs);
    // A block of run RUN (version 2 with a run epoch); `v1` (committed) is a version-1
    // block from before runs existed.
    let run_block = chunk_signer()
        .sign_in_run(BROADCAST, starling_fuzz::RUN, &meta, &payload)
        .unwrap_or_else(|e| panic!("sign: {e}"));
    let mut cs = Vec::new();
    cs.put_u16(payload.len() as u16);
    cs.extend_from_slice(&payload);
    cs.extend_from_slice(&run_block);
    write("chunk_signature", "run", &cs);

    let chunk = Frame::Chunk(Chunk {
        seq: 9,
        flags: meta.flags,
        timestamp_ms: meta.timestamp_ms,
        duration_ms: meta.duration_ms,
        signature: block,
        payload: Bytes::from(payload),
    });
    let mut all = vec![0u8];
    all.extend(frames(&[
        hello(tok.clone()),
        Frame::HelloAck(HelloAck {
            version: PROTOCOL_VERSION,
            nonce: HANDSHAKE_NONCE,
        }),
        proof(&tok),
        subscribe(0b1),
        Frame::StreamInfo(StreamInfo {
            broadcast_id: BROADCAST.into(),
            content_type: "video/mp2t".into(),
            chunk_duration_ms: 1000,
            substreams: 4,
            first_seq: 9,
            live_seq: 12,
        }),
        chunk,
        Frame::Ping(1),
        Frame::Pong(1),
        Frame::Error(Reason {
            code: ErrorCode::Unauthorized,
            message: "no".into(),
        }),
        Frame::Goodbye(Reason {
            code: ErrorCode::TooSlow,
            message: "slow".into(),
        }),
        Frame::BufferMap(BufferMapFrame {
            base: 8,
            len: 12,
            bits: Bytes::from_static(&[0xF0, 0x30]),
        }),
        Frame::Request(3),
        Frame::NotFound(3),
        Frame::Token(tok.clone()),
        Frame::Ticket(v1.clone()),
    ]));
    write("wire_decoder", "every-frame", &all);
    all[0] = 7; // control-only limits, 4-byte pieces
    write("wire_decoder", "every-frame-control", &all);

    write(
        "peer_handshake",
        "child",
        &frames(&[
            hello(tok.clone()),
            proof(&tok),
            Frame::Ticket(v1),
            Frame::Ticket(v2),
            Frame::Ping(5),
            subscribe(0b1011),
        ]),
    );
    write(
        "peer_handshake",
        "neighbour",
        &frames(&[hello(tok.clone()), proof(&tok), subscribe(0)]),
    );

    for (name, head) in [
        ("live", "GET /live/fuzzcast HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "live-token",
            "GET /live/fuzzcast?token=AAEC HTTP/1.1\r\n\r\n",
        ),
        (
            "bearer",
            "GET /live/fuzzcast HTTP/1.1\r\nAuthorization: Bearer AAEC%3D\r\n\r\n",
        ),
        ("metrics", "GET /metrics HTTP/1.0\r\n\r\n"),
        ("post", "POST /live/x HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
    ] {
        write("http_head", name, head.as_bytes());
    }
    println!("seeds written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
