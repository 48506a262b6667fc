//! The MPEG-TS chunker: arbitrary bytes as a `video/mp2t` source, pushed in pieces of
//! a fuzzed size with time advancing, then flushed, under a fuzzed target duration and
//! size cap. Checks the invariants of `starling_fuzz::check_chunks`, and that every
//! chunk is whole 188-byte packets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_dataplane::chunker::{Chunker, ChunkerConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else {
        return;
    };
    let cfg = ChunkerConfig {
        target_ms: 100 * u32::from(knobs & 0x0F) + 20,
        max_bytes: 188 * 16 * (usize::from(knobs >> 4) + 1),
    };
    let mut ch = Chunker::new(cfg, 5);
    ch.reset(Some("video/mp2t"));
    let mut out = Vec::new();
    let mut now = starling_fuzz::NOW_MS;
    let step = 188 * (usize::from(knobs & 0x07) + 1) - usize::from(knobs >> 5);
    for piece in rest.chunks(step.max(1)) {
        ch.push(piece, now, &mut out);
        now += 40;
    }
    ch.flush(now, &mut out);
    starling_fuzz::check_chunks(&out, 5, rest.len());
    for c in &out {
        assert_eq!(
            c.payload.len() % 188,
            0,
            "a TS chunk of {} bytes",
            c.payload.len()
        );
    }
});
