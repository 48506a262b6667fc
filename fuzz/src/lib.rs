//! What the fuzz targets share: fixed test keys (committed under `keys/`, so a seed
//! signed once stays valid), the broadcast they name, the clock they use, and the
//! chunker invariants.

use std::sync::OnceLock;

use starling_proto::integrity::ChunkSigner;
use starling_proto::token::TokenSigner;

/// The broadcast every seed names.
pub const BROADCAST: &str = "fuzzcast";
/// The targets' "now" (2030-01-01); seeds are valid from 2020 to 2100.
pub const NOW_MS: u64 = 1_893_456_000_000;
/// Token key id of [`token_signer`].
pub const TOKEN_KEY_ID: u32 = 1;
/// Chunk key id of [`chunk_signer`].
pub const CHUNK_KEY_ID: u32 = 2;
/// The broadcast run of the `run` chunk-signature seed.
pub const RUN: u64 = 3;
/// The child and parent peer ids the ticket seeds name.
pub const CHILD: u64 = 0x700;
pub const PARENT: u64 = 0x901;

/// The nonce the fuzzed listener's `HELLO_ACK` carries (`starling_sdk::fuzz_api::NONCE`):
/// the `peer_handshake` seeds hold a `PROOF` over it.
pub const HANDSHAKE_NONCE: [u8; 32] = [0x42; 32];

/// The key the seeds' chunk tokens are bound to (a fixed seed, so seeds stay valid).
pub fn holder() -> &'static starling_proto::holder::HolderKey {
    static K: OnceLock<starling_proto::holder::HolderKey> = OnceLock::new();
    K.get_or_init(
        || match starling_proto::holder::HolderKey::from_seed(&[0x33; 32]) {
            Ok(k) => k,
            Err(e) => panic!("holder key: {e}"),
        },
    )
}

/// The control plane's token key (test key, committed).
pub fn token_signer() -> &'static TokenSigner {
    static S: OnceLock<TokenSigner> = OnceLock::new();
    S.get_or_init(
        || match TokenSigner::new(TOKEN_KEY_ID, include_bytes!("../keys/token.pk8")) {
            Ok(s) => s,
            Err(e) => panic!("fuzz/keys/token.pk8: {e}"),
        },
    )
}

/// The data plane's chunk key (test key, committed).
pub fn chunk_signer() -> &'static ChunkSigner {
    static S: OnceLock<ChunkSigner> = OnceLock::new();
    S.get_or_init(
        || match ChunkSigner::new(CHUNK_KEY_ID, include_bytes!("../keys/chunk.pk8")) {
            Ok(s) => s,
            Err(e) => panic!("fuzz/keys/chunk.pk8: {e}"),
        },
    )
}

/// Checks what every chunker must hold whatever it was fed: consecutive sequence
/// numbers from `first_seq`, no empty chunk, no chunk over the wire's cap, and no
/// more source bytes out than went in (inserted headers aside).
pub fn check_chunks(
    chunks: &[starling_dataplane::chunker::Chunk],
    first_seq: u64,
    bytes_in: usize,
) {
    let mut out = 0usize;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(
            c.seq,
            first_seq + i as u64,
            "sequence numbers are consecutive"
        );
        assert!(!c.payload.is_empty(), "no empty chunk");
        assert!(
            c.payload.len() <= starling_proto::wire::ABSOLUTE_MAX_CHUNK as usize,
            "chunk over the wire's cap"
        );
        assert!(
            c.inserted_len <= c.payload.len(),
            "inserted more than the chunk holds"
        );
        out += c.payload.len() - c.inserted_len;
    }
    assert!(out <= bytes_in, "{out} source bytes out of {bytes_in} in");
}
