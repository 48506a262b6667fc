//! The framed chunkers (MP3, ADTS AAC, Ogg, WebM, raw, and sniffing): arbitrary bytes
//! under a fuzzed content type, pushed in pieces with time advancing, a mid-stream
//! reconnect (`reset`) at a fuzzed point, then flushed. Checks the invariants of
//! `starling_fuzz::check_chunks`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_dataplane::chunker::{Chunker, ChunkerConfig};

const TYPES: [Option<&str>; 6] = [
    Some("audio/mpeg"),
    Some("audio/aac"),
    Some("audio/ogg"),
    Some("video/webm"),
    Some("application/octet-stream"),
    None,
];

fuzz_target!(|data: &[u8]| {
    let [kind, cut, knobs, rest @ ..] = data else {
        return;
    };
    let ct = TYPES[usize::from(*kind) % TYPES.len()];
    let cfg = ChunkerConfig {
        target_ms: 50 * u32::from(knobs & 0x0F) + 20,
        max_bytes: 4096 * (usize::from(knobs >> 4) + 1),
    };
    let mut ch = Chunker::new(cfg, 0);
    ch.reset(ct);
    let mut out = Vec::new();
    let mut now = starling_fuzz::NOW_MS;
    let split = (usize::from(*cut) * rest.len()) / 256;
    let (a, b) = rest.split_at(split);
    let step = usize::from(knobs & 0x3F) * 7 + 1;
    for piece in a.chunks(step) {
        ch.push(piece, now, &mut out);
        now += 25;
    }
    ch.flush(now, &mut out);
    ch.reset(ct);
    for piece in b.chunks(step) {
        ch.push(piece, now, &mut out);
        now += 25;
    }
    ch.flush(now, &mut out);
    starling_fuzz::check_chunks(&out, 0, rest.len());
});
