//! The chunk wire decoder: arbitrary bytes, fed in pieces of a fuzzed size, under both
//! limit sets. It must never panic; every frame it returns must encode and decode back
//! to itself, consuming exactly the encoding.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use starling_proto::wire::{Decoder, Frame, Limits, encode_to_bytes};

fn round_trip(f: &Frame, limits: Limits) {
    let enc = match encode_to_bytes(f) {
        Ok(b) => b,
        Err(e) => panic!("a decoded frame does not encode: {e:?}: {f:?}"),
    };
    let mut buf = BytesMut::from(&enc[..]);
    match Decoder::new(limits).decode(&mut buf) {
        Ok(Some(g)) => assert_eq!(f, &g, "round trip changed the frame"),
        other => panic!("re-decoding gave {other:?} for {f:?}"),
    }
    assert!(buf.is_empty(), "re-decoding left {} bytes", buf.len());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let limits = if mode & 1 == 0 {
        Limits::default()
    } else {
        Limits::control_only()
    };
    let step = usize::from(mode >> 1) + 1;
    let mut dec = Decoder::new(limits);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => round_trip(&f, limits),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
