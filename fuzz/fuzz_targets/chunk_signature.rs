//! Chunk signature blocks: `[payload_len u16 BE][payload][block]` through
//! `parse_block` and `ChunkVerifier::verify` (with an age limit) under the seeds' key,
//! without a run and with run [`RUN`]. An accepted chunk must be the one the block
//! signs, for this broadcast (and, with a run, that run).
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_fuzz::{BROADCAST, CHUNK_KEY_ID, NOW_MS, RUN, chunk_signer};
use starling_proto::integrity::{ChunkVerifier, parse_block, payload_hash};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 2);
    let (payload, block) = data[2..].split_at(n);
    let Ok(fields) = parse_block(block) else {
        return;
    };
    let meta = fields.meta;
    let mut v = ChunkVerifier::new(BROADCAST).with_age_limit(120_000, 10_000);
    if let Err(e) = v.add_key(CHUNK_KEY_ID, &chunk_signer().public_key()) {
        panic!("test key: {e}");
    }
    if v.verify(&meta, payload, block, NOW_MS).is_ok() {
        let f = match v.verify_block(block) {
            Ok(f) => f,
            Err(e) => panic!("verify passed but verify_block failed: {e}"),
        };
        assert_eq!(f.payload_sha256, payload_hash(payload).as_slice());
        assert!(meta.timestamp_ms <= NOW_MS + 10_000);
        assert!(NOW_MS - meta.timestamp_ms.min(NOW_MS) <= 120_000);
    }
    let v = v.with_run(Some(RUN));
    if v.verify(&meta, payload, block, NOW_MS).is_ok() {
        assert_eq!(fields.run_epoch, RUN);
        assert_eq!(fields.version, starling_proto::integrity::BLOCK_VERSION);
    }
});
