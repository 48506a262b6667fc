//! The wire codec's tests: round trips, limits, and arbitrary bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;

fn roundtrip(f: Frame) {
    let mut buf = BytesMut::new();
    encode(&f, &mut buf).unwrap();
    let mut dec = Decoder::new(Limits::default());
    // Byte-by-byte feeding must give the same frame.
    let all = buf.clone();
    let mut partial = BytesMut::new();
    let mut out = None;
    for b in all.iter() {
        assert!(out.is_none(), "frame decoded before its last byte");
        partial.put_u8(*b);
        out = dec.decode(&mut partial).unwrap();
    }
    assert_eq!(out.as_ref(), Some(&f));
    assert!(partial.is_empty());
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(f));
}

#[test]
fn roundtrip_every_frame() {
    roundtrip(Frame::Hello(Hello {
        min_version: 1,
        max_version: 3,
        role: Role::Viewer,
        token: Bytes::from_static(b"tok"),
    }));
    roundtrip(Frame::HelloAck(HelloAck {
        version: 2,
        nonce: [0xA5; 32],
    }));
    roundtrip(Frame::Proof(Bytes::from(vec![3u8; 64])));
    roundtrip(Frame::Subscribe(Subscribe {
        broadcast_id: "b-1".into(),
        start: StartAt::Live,
        substream_mask: ALL_SUBSTREAMS,
    }));
    roundtrip(Frame::Subscribe(Subscribe {
        broadcast_id: "b-1".into(),
        start: StartAt::Seq(u64::MAX),
        substream_mask: 0b1010,
    }));
    roundtrip(Frame::Request(17));
    roundtrip(Frame::NotFound(18));
    roundtrip(Frame::Relaying(0b1010));
    roundtrip(Frame::Relaying(u64::MAX));
    roundtrip(Frame::BufferMap(BufferMapFrame {
        base: 100,
        len: 12,
        bits: Bytes::from_static(&[0xFF, 0xF0]),
    }));
    roundtrip(Frame::StreamInfo(StreamInfo {
        broadcast_id: "x".into(),
        content_type: "video/mp2t".into(),
        chunk_duration_ms: 1000,
        substreams: 4,
        first_seq: 7,
        live_seq: 9,
    }));
    roundtrip(Frame::Chunk(Chunk {
        seq: 42,
        flags: chunk_flags::RANDOM_ACCESS,
        timestamp_ms: 1_700_000_000_000,
        duration_ms: 1000,
        signature: Bytes::new(),
        payload: Bytes::from(vec![0x47; 188 * 3]),
    }));
    roundtrip(Frame::Chunk(Chunk {
        seq: 43,
        flags: chunk_flags::DISCONTINUITY,
        timestamp_ms: 1,
        duration_ms: 2,
        signature: Bytes::from(vec![7u8; 130]),
        payload: Bytes::from_static(b"payload"),
    }));
    roundtrip(Frame::Token(Bytes::from_static(b"renewed token")));
    roundtrip(Frame::Ticket(Bytes::from_static(b"a parent ticket")));
    roundtrip(Frame::Ticket(Bytes::from(vec![9u8; MAX_TICKET])));
    roundtrip(Frame::Ping(5));
    roundtrip(Frame::Pong(6));
    roundtrip(Frame::Error(Reason {
        code: ErrorCode::UnknownBroadcast,
        message: "no such broadcast".into(),
    }));
    roundtrip(Frame::Goodbye(Reason {
        code: ErrorCode::Other(999),
        message: String::new(),
    }));
}

#[test]
fn oversized_frame_rejected_before_buffering() {
    let mut dec = Decoder::new(Limits::default());
    let mut buf = BytesMut::new();
    buf.put_u8(frame_type::CHUNK);
    buf.put_u8(0);
    buf.put_u16(0);
    buf.put_u32(u32::MAX);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(WireError::FrameTooLarge { .. })
    ));
    let mut dec = Decoder::new(Limits::control_only());
    let mut buf = BytesMut::from(
        &encode_to_bytes(&Frame::Chunk(Chunk {
            seq: 1,
            flags: 0,
            timestamp_ms: 0,
            duration_ms: 0,
            signature: Bytes::new(),
            payload: Bytes::from_static(b"x"),
        }))
        .unwrap()[..],
    );
    assert_eq!(
        dec.decode(&mut buf).unwrap_err().code(),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn malformed_frames_rejected() {
    let mut dec = Decoder::default();
    // Unknown type.
    let mut b = BytesMut::from(&[0x7f, 0, 0, 0, 0, 0, 0, 0][..]);
    assert_eq!(dec.decode(&mut b), Err(WireError::UnknownFrameType(0x7f)));
    // Reserved bits.
    let mut b = BytesMut::from(&[frame_type::PING, 0, 1, 0, 0, 0, 0, 8][..]);
    assert_eq!(dec.decode(&mut b), Err(WireError::ReservedBits));
    // Truncated ping body.
    let mut b = BytesMut::from(&[frame_type::PING, 0, 0, 0, 0, 0, 0, 2, 1, 2][..]);
    assert!(matches!(
        dec.decode(&mut b),
        Err(WireError::Malformed { .. })
    ));
    // Trailing bytes.
    let mut b = BytesMut::from(&[frame_type::HELLO_ACK, 0, 0, 0, 0, 0, 0, 3, 0, 1, 9][..]);
    assert!(matches!(
        dec.decode(&mut b),
        Err(WireError::Malformed { .. })
    ));
    // Bad magic.
    let mut b = BytesMut::from(
        &[
            frame_type::HELLO,
            0,
            0,
            0,
            0,
            0,
            0,
            11,
            b'H',
            b'T',
            b'T',
            b'P',
            0,
            1,
            0,
            1,
            1,
            0,
            0,
        ][..],
    );
    assert_eq!(dec.decode(&mut b), Err(WireError::BadMagic));
    // Unknown chunk flag.
    let mut b = BytesMut::new();
    b.put_slice(&chunk_prefix(1, 0, 0, 0, 0).unwrap());
    b[1] = 0x80;
    assert!(matches!(
        dec.decode(&mut b),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn buffer_map_validation() {
    let mut dec = Decoder::default();
    // Padding bit set: len 4 uses the top 4 bits only.
    let mut b = BytesMut::new();
    b.put_slice(&[frame_type::BUFFER_MAP, 0, 0, 0, 0, 0, 0, 11]);
    b.put_u64(0);
    b.put_u16(4);
    b.put_u8(0x0F);
    assert!(matches!(
        dec.decode(&mut b),
        Err(WireError::Malformed { .. })
    ));
    // Too long.
    let mut b = BytesMut::new();
    b.put_slice(&[frame_type::BUFFER_MAP, 0, 0, 0, 0, 0, 0, 10]);
    b.put_u64(0);
    b.put_u16(MAX_BUFFER_MAP_BITS + 1);
    assert!(matches!(
        dec.decode(&mut b),
        Err(WireError::Malformed { .. })
    ));
    // Encoder refuses inconsistent maps.
    let bad = Frame::BufferMap(BufferMapFrame {
        base: 0,
        len: 9,
        bits: Bytes::from_static(&[0xFF]),
    });
    assert!(encode_to_bytes(&bad).is_err());
}

#[test]
fn substream_masks() {
    assert!(mask_wants(ALL_SUBSTREAMS, 12345, 4));
    assert!(!mask_wants(0, 0, 4));
    assert!(mask_wants(0b0100, 6, 4));
    assert!(!mask_wants(0b0100, 7, 4));
    assert!(mask_wants(1, 99, 0));
}

#[test]
fn version_negotiation() {
    // Version 1 (no proof of possession) is no longer spoken.
    assert_eq!(negotiate(1, 1), None);
    assert_eq!(negotiate(1, 2), Some(2));
    assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
    // Version 3 added RELAYING; a version-2 peer still meets a version-3 one at 2.
    assert_eq!(negotiate(2, 3), Some(3));
    assert_eq!(negotiate(3, 3), Some(3));
    assert_eq!(negotiate(4, 9), None);
    assert_eq!(negotiate(0, 0), None);
}

#[test]
fn proof_and_ack_lengths_are_exact() {
    let mut dec = Decoder::default();
    for n in [0usize, 63, 65] {
        let mut b = BytesMut::new();
        b.put_slice(&[frame_type::PROOF, 0, 0, 0, 0, 0, 0, n as u8]);
        b.put_slice(&vec![1u8; n]);
        assert!(
            matches!(dec.decode(&mut b), Err(WireError::Malformed { .. })),
            "{n}"
        );
    }
    assert!(encode_to_bytes(&Frame::Proof(Bytes::from_static(b"short"))).is_err());
    // A version-1 HELLO_ACK (no nonce) is malformed.
    let mut b = BytesMut::new();
    b.put_slice(&[frame_type::HELLO_ACK, 0, 0, 0, 0, 0, 0, 2, 0, 1]);
    assert!(matches!(
        dec.decode(&mut b),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn long_messages_truncated_on_char_boundary() {
    let msg = "é".repeat(MAX_MESSAGE);
    let f = Frame::Error(Reason {
        code: ErrorCode::Internal,
        message: msg,
    });
    let mut b = BytesMut::from(&encode_to_bytes(&f).unwrap()[..]);
    match Decoder::default().decode(&mut b).unwrap() {
        Some(Frame::Error(r)) => assert_eq!(r.message.len(), MAX_MESSAGE),
        other => panic!("unexpected {other:?}"),
    }
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut dec = Decoder::new(Limits::default());
        let mut buf = BytesMut::from(&data[..]);
        // Keep decoding until an error or a need for more bytes.
        for _ in 0..1000 {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn arbitrary_body_after_valid_header(ty in 1u8..=14, flags in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::new();
        buf.put_u8(ty);
        buf.put_u8(flags);
        buf.put_u16(0);
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        let _ = Decoder::default().decode(&mut buf);
    }

    #[test]
    fn chunk_roundtrip(seq in any::<u64>(), ts in any::<u64>(), d in any::<u32>(), ra in any::<bool>(), sig in proptest::collection::vec(any::<u8>(), 0..=MAX_CHUNK_SIGNATURE), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let f = Frame::Chunk(Chunk { seq, flags: if ra { chunk_flags::RANDOM_ACCESS } else { 0 }, timestamp_ms: ts, duration_ms: d, signature: Bytes::from(sig), payload: Bytes::from(payload) });
        let mut buf = BytesMut::from(&encode_to_bytes(&f).unwrap()[..]);
        prop_assert_eq!(Decoder::default().decode(&mut buf).unwrap(), Some(f));
    }

    #[test]
    fn ticket_roundtrip(t in proptest::collection::vec(any::<u8>(), 1..=MAX_TICKET)) {
        let f = Frame::Ticket(Bytes::from(t));
        let mut buf = BytesMut::from(&encode_to_bytes(&f).unwrap()[..]);
        prop_assert_eq!(Decoder::default().decode(&mut buf).unwrap(), Some(f));
    }

    #[test]
    fn ticket_frame_bounds(n in prop_oneof![Just(0usize), (MAX_TICKET + 1)..2048]) {
        let body = vec![1u8; n];
        let mut buf = BytesMut::new();
        buf.put_u8(frame_type::TICKET);
        buf.put_u8(0);
        buf.put_u16(0);
        buf.put_u32(n as u32);
        buf.put_slice(&body);
        let e = Decoder::default().decode(&mut buf).unwrap_err();
        prop_assert_eq!(e.code(), ErrorCode::MalformedFrame);
        prop_assert!(encode_to_bytes(&Frame::Ticket(Bytes::from(body))).is_err());
    }

    #[test]
    fn subscribe_roundtrip(id in "[a-zA-Z0-9_-]{1,128}", seq in proptest::option::of(any::<u64>()), mask in any::<u64>()) {
        let f = Frame::Subscribe(Subscribe { broadcast_id: id, start: seq.map_or(StartAt::Live, StartAt::Seq), substream_mask: mask });
        let mut buf = BytesMut::from(&encode_to_bytes(&f).unwrap()[..]);
        prop_assert_eq!(Decoder::default().decode(&mut buf).unwrap(), Some(f));
    }
}
