//! Chunk integrity: one Ed25519 signature per chunk.
//!
//! The data plane (the node that ingests the broadcast) hashes every chunk payload
//! with SHA-256 and signs a small, self-describing **signature block** naming the
//! broadcast, the chunk's sequence number, its header fields and the payload hash.
//! The block travels with the chunk, unchanged, through edge nodes and every relaying
//! peer. A peer checks the block before it plays or relays the chunk.
//!
//! # Why per-chunk signatures rather than signed manifests
//!
//! Measured on this machine (see `docs/PROTOCOL.md` and the `chunk_cost` test): hashing
//! a 64 KiB payload (≈ 40 µs, needed either way) costs about as much as one Ed25519
//! verification (40–70 µs). With a signature per chunk a viewer pays one verification
//! per chunk (4 chunks/s → ≈ 0.3–0.4 ms of CPU per second of stream, hash included);
//! a manifest could save at most the signature part. In exchange per-chunk gives:
//! - no added latency: a manifest covering N chunks can only be signed once the N-th
//!   chunk exists, which would push the live edge back by N chunk durations (the lag
//!   bar is p99 ≤ 3 s) or force a chunk to wait for a later manifest;
//! - no state: chunks arrive out of order from several parents and from neighbours
//!   (pulls); each is checked on its own, with no buffer of chunks awaiting manifests
//!   or manifests awaiting chunks to bound, and nothing to evict under attack;
//! - a bad chunk is pinned on the peer that sent it, immediately.
//!
//! The price is 135 + broadcast-id bytes per chunk (≈ 0.25 % of a 64 KiB chunk)
//! and one Ed25519 signature per chunk on the ingesting node.
//!
//! # Block layout (big endian, byte by byte in `docs/PROTOCOL.md`)
//!
//! ```text
//! version u8 = 2 | key_id u32 | run_epoch u64 | seq u64 | flags u8 | timestamp_ms u64
//! | duration_ms u32 | payload_len u32 | payload_sha256 [32] | broadcast_len u8 (1..=128)
//! | broadcast utf-8 | signature [64]
//!   (Ed25519 over "starling/chunk/v2\0" ++ every byte before it)
//! ```
//!
//! `run_epoch` names the broadcast's *run* (the control plane counts every
//! `StartBroadcast`; 0 = the node was told none). A stopped and restarted broadcast
//! starts again at sequence 0 with the same node key: the epoch is what tells its
//! chunks from the previous run's, so a verifier that knows the current run
//! ([`ChunkVerifier::with_run`]) refuses the others ([`IntegrityError::WrongRun`]).
//! Version 1 (the same without `run_epoch`, context `starling/chunk/v1\0`) is still
//! parsed, as run 0: only a verifier without a run (a legacy control plane) accepts it.
//!
//! Checks are ordered cheapest first and the payload is hashed last, so a forged block
//! costs a verifier one signature check and no hashing.

use bytes::{BufMut, Bytes, BytesMut};
use ring::digest::{SHA256, digest};
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::ed25519::{EnvelopeError, KeySet, be_u32, be_u64, check_envelope};
use crate::token::key_pair_from_pkcs8;
pub use crate::token::{KeyError, generate_pkcs8};

/// Signature block version produced by this build (version 1 is still parsed).
pub const BLOCK_VERSION: u8 = 2;
/// The previous block version (no run epoch), parsed as run 0.
pub const BLOCK_VERSION_V1: u8 = 1;
/// Longest broadcast id a block may name.
pub const MAX_BROADCAST_ID: usize = 128;
pub const SIGNATURE_LEN: usize = crate::ed25519::SIGNATURE_LEN;
pub const HASH_LEN: usize = 32;
/// Fixed part before the broadcast id (version .. broadcast_len), version 2.
pub const FIXED_LEN: usize = 71;
/// Fixed part of a version-1 block (no run epoch).
pub const FIXED_LEN_V1: usize = 63;
/// Shortest version-2 block (one-byte broadcast id).
pub const MIN_BLOCK_LEN: usize = FIXED_LEN + 1 + SIGNATURE_LEN;
/// Longest block of any version; longer input is rejected before parsing.
pub const MAX_BLOCK_LEN: usize = FIXED_LEN + MAX_BROADCAST_ID + SIGNATURE_LEN;
/// Most public keys a [`ChunkVerifier`] holds at once.
pub const MAX_KEYS: usize = 16;
/// Domain-separation prefix of the signed message (not on the wire), version 2.
pub const SIGNING_CONTEXT: &[u8] = b"starling/chunk/v2\0";
/// The version-1 prefix (same length as [`SIGNING_CONTEXT`]).
pub const SIGNING_CONTEXT_V1: &[u8] = b"starling/chunk/v1\0";
/// Largest payload a block may describe (the wire's `ABSOLUTE_MAX_CHUNK`).
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// The header fields of a chunk that the signature covers (the fields of the wire's
/// `CHUNK` frame other than the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMeta {
    pub seq: u64,
    pub flags: u8,
    pub timestamp_ms: u64,
    pub duration_ms: u32,
}

/// Every reason a chunk is refused. All of them mean: drop the chunk, disconnect and
/// report the peer that sent it, fetch the chunk elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    #[error("signature block truncated")]
    Truncated,
    #[error("signature block longer than {MAX_BLOCK_LEN} bytes")]
    Oversized,
    #[error("unsupported signature block version {0}")]
    UnsupportedVersion(u8),
    #[error("chunk signed with unknown key id {0}")]
    UnknownKeyId(u32),
    /// The block was not signed by the data plane (forged or altered).
    #[error("chunk signature is not valid")]
    BadSignature,
    /// An authentic block for another broadcast.
    #[error("signature is for another broadcast")]
    WrongBroadcast,
    /// An authentic block for another chunk of this broadcast (replay).
    #[error("signature is for chunk {signed}, not {got}")]
    SeqMismatch { signed: u64, got: u64 },
    /// Flags, timestamp or duration differ from the signed ones.
    #[error("chunk header differs from the signed one")]
    HeaderMismatch,
    /// The payload is not the one that was signed (polluted).
    #[error("chunk payload does not match its signed hash")]
    HashMismatch,
    /// Authentic, but signed for another run of the broadcast than the verifier's
    /// current one (a replay of an earlier run after a restart; `signed` is 0 for a
    /// version-1 block or a node that was told no run).
    #[error("chunk is from run {signed} of the broadcast, not the current run {current}")]
    WrongRun { signed: u64, current: u64 },
    /// Authentic but older than the verifier's age limit (replay of an earlier run).
    #[error("chunk is stale ({age_ms} ms old)")]
    Stale { age_ms: u64 },
    /// Authentic but stamped too far in the future for the verifier's clock.
    #[error("chunk timestamp is in the future")]
    FromFuture,
    #[error("malformed signature block: {0}")]
    Malformed(&'static str),
    /// Signing side only.
    #[error("cannot sign chunk: {0}")]
    Encode(&'static str),
}

impl From<EnvelopeError> for IntegrityError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Oversized => IntegrityError::Oversized,
            EnvelopeError::Truncated => IntegrityError::Truncated,
            EnvelopeError::UnsupportedVersion(v) => IntegrityError::UnsupportedVersion(v),
            EnvelopeError::Malformed(m) => IntegrityError::Malformed(m),
        }
    }
}

/// SHA-256 of a payload.
pub fn payload_hash(payload: &[u8]) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(digest(&SHA256, payload).as_ref());
    out
}

/// Data-plane side: signs chunks with one key. Cheap to share (`Arc`) across cores.
#[derive(Debug)]
pub struct ChunkSigner {
    key_id: u32,
    key: Ed25519KeyPair,
}

impl ChunkSigner {
    /// From a PKCS#8 document (see [`generate_pkcs8`]).
    pub fn new(key_id: u32, pkcs8: &[u8]) -> Result<Self, KeyError> {
        Ok(Self::from_key_pair(key_id, key_pair_from_pkcs8(pkcs8)?))
    }

    pub fn from_key_pair(key_id: u32, key: Ed25519KeyPair) -> Self {
        ChunkSigner { key_id, key }
    }

    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The 32-byte public key to distribute (with [`Self::key_id`]) to peers.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key.public_key().as_ref());
        out
    }

    /// Hashes `payload` and returns the signature block for this chunk, in run 0 (no
    /// run: see [`Self::sign_in_run`]).
    pub fn sign(
        &self,
        broadcast_id: &str,
        meta: &ChunkMeta,
        payload: &[u8],
    ) -> Result<Bytes, IntegrityError> {
        self.sign_in_run(broadcast_id, 0, meta, payload)
    }

    /// Hashes `payload` and returns the signature block for this chunk of run
    /// `run_epoch` of the broadcast.
    pub fn sign_in_run(
        &self,
        broadcast_id: &str,
        run_epoch: u64,
        meta: &ChunkMeta,
        payload: &[u8],
    ) -> Result<Bytes, IntegrityError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&n| n <= MAX_PAYLOAD)
            .ok_or(IntegrityError::Encode("payload too large"))?;
        self.sign_hash_in_run(broadcast_id, run_epoch, meta, len, &payload_hash(payload))
    }

    /// Signs a chunk whose SHA-256 was computed elsewhere (e.g. incrementally while
    /// the chunk was being cut), in run 0.
    pub fn sign_hash(
        &self,
        broadcast_id: &str,
        meta: &ChunkMeta,
        payload_len: u32,
        hash: &[u8; HASH_LEN],
    ) -> Result<Bytes, IntegrityError> {
        self.sign_hash_in_run(broadcast_id, 0, meta, payload_len, hash)
    }

    /// [`Self::sign_hash`] for run `run_epoch`.
    pub fn sign_hash_in_run(
        &self,
        broadcast_id: &str,
        run_epoch: u64,
        meta: &ChunkMeta,
        payload_len: u32,
        hash: &[u8; HASH_LEN],
    ) -> Result<Bytes, IntegrityError> {
        let id = broadcast_id.as_bytes();
        if id.is_empty() {
            return Err(IntegrityError::Encode("empty broadcast id"));
        }
        if id.len() > MAX_BROADCAST_ID {
            return Err(IntegrityError::Encode("broadcast id too long"));
        }
        if payload_len > MAX_PAYLOAD {
            return Err(IntegrityError::Encode("payload too large"));
        }
        let mut msg =
            BytesMut::with_capacity(SIGNING_CONTEXT.len() + FIXED_LEN + id.len() + SIGNATURE_LEN);
        msg.put_slice(SIGNING_CONTEXT);
        msg.put_u8(BLOCK_VERSION);
        msg.put_u32(self.key_id);
        msg.put_u64(run_epoch);
        msg.put_u64(meta.seq);
        msg.put_u8(meta.flags);
        msg.put_u64(meta.timestamp_ms);
        msg.put_u32(meta.duration_ms);
        msg.put_u32(payload_len);
        msg.put_slice(hash);
        msg.put_u8(id.len() as u8);
        msg.put_slice(id);
        let sig = self.key.sign(&msg);
        msg.put_slice(sig.as_ref());
        let _context = msg.split_to(SIGNING_CONTEXT.len());
        Ok(msg.freeze())
    }
}

/// A signature block's fields (see [`parse_block`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockFields<'a> {
    /// [`BLOCK_VERSION`] or [`BLOCK_VERSION_V1`].
    pub version: u8,
    pub key_id: u32,
    /// The run the chunk was signed for (0 for a version-1 block).
    pub run_epoch: u64,
    pub meta: ChunkMeta,
    pub payload_len: u32,
    pub payload_sha256: &'a [u8],
    pub broadcast_id: &'a [u8],
    signed: &'a [u8],
    signature: &'a [u8],
}

/// Structural parse of a block (version 2, or version 1 as run 0), WITHOUT checking
/// its signature.
pub fn parse_block(block: &[u8]) -> Result<BlockFields<'_>, IntegrityError> {
    let (version, fixed, max_len, epoch_len) = match block.first() {
        Some(&BLOCK_VERSION_V1) => (
            BLOCK_VERSION_V1,
            FIXED_LEN_V1,
            FIXED_LEN_V1 + MAX_BROADCAST_ID + SIGNATURE_LEN,
            0,
        ),
        _ => (BLOCK_VERSION, FIXED_LEN, MAX_BLOCK_LEN, 8),
    };
    let body_len = check_envelope(block, max_len, version, fixed, MAX_BROADCAST_ID)?;
    // Offsets after the key id shift by the run epoch's 8 bytes in version 2.
    let at = 5 + epoch_len;
    Ok(BlockFields {
        version,
        key_id: be_u32(block, 1),
        run_epoch: if epoch_len == 0 { 0 } else { be_u64(block, 5) },
        meta: ChunkMeta {
            seq: be_u64(block, at),
            flags: block[at + 8],
            timestamp_ms: be_u64(block, at + 9),
            duration_ms: be_u32(block, at + 17),
        },
        payload_len: be_u32(block, at + 21),
        payload_sha256: &block[at + 25..at + 25 + HASH_LEN],
        broadcast_id: &block[fixed..body_len],
        signed: &block[..body_len],
        signature: &block[body_len..],
    })
}

/// Signature blocks already found authentic, shared by the verifiers of one process:
/// several viewers in a process (a load-test worker, a restreamer) receive the same
/// chunks, and the Ed25519 check is most of what checking a chunk costs. An entry is the
/// SHA-256 of (public key, signed bytes, signature), so a hit stands for exactly the
/// check it replaces; everything else (header, payload length and hash, age) is still
/// checked per chunk. Bounded: the oldest entries are forgotten first.
#[derive(Debug)]
pub struct VerifiedSignatures {
    cap: usize,
    inner: std::sync::Mutex<SeenBlocks>,
}

/// The entries of a [`VerifiedSignatures`], and their insertion order.
type SeenBlocks = (
    std::collections::HashSet<[u8; HASH_LEN]>,
    std::collections::VecDeque<[u8; HASH_LEN]>,
);

impl VerifiedSignatures {
    /// A cache of at most `cap` entries (at least 1).
    pub fn new(cap: usize) -> Self {
        VerifiedSignatures {
            cap: cap.max(1),
            inner: std::sync::Mutex::new(Default::default()),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.0.len())
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(public_key: &[u8], msg: &[u8], signature: &[u8]) -> [u8; HASH_LEN] {
        let mut ctx = ring::digest::Context::new(&SHA256);
        ctx.update(public_key);
        ctx.update(msg);
        ctx.update(signature);
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    fn contains(&self, e: &[u8; HASH_LEN]) -> bool {
        self.inner.lock().is_ok_and(|g| g.0.contains(e))
    }

    fn insert(&self, e: [u8; HASH_LEN]) {
        if let Ok(mut g) = self.inner.lock() {
            let (set, order) = &mut *g;
            if set.insert(e) {
                order.push_back(e);
                while order.len() > self.cap {
                    if let Some(old) = order.pop_front() {
                        set.remove(&old);
                    }
                }
            }
        }
    }
}

/// SDK / relay side: the data plane's public keys, for one broadcast. Stateless per
/// chunk: verifying never buffers anything.
#[derive(Debug, Clone)]
pub struct ChunkVerifier {
    broadcast_id: String,
    keys: KeySet,
    run_epoch: Option<u64>,
    max_age_ms: Option<u64>,
    max_future_ms: u64,
    cache: Option<std::sync::Arc<VerifiedSignatures>>,
}

impl ChunkVerifier {
    /// A verifier for chunks of `broadcast_id`, with no key yet, no run and no age
    /// limit.
    pub fn new(broadcast_id: impl Into<String>) -> Self {
        ChunkVerifier {
            broadcast_id: broadcast_id.into(),
            keys: KeySet::default(),
            run_epoch: None,
            max_age_ms: None,
            max_future_ms: 30_000,
            cache: None,
        }
    }

    /// Shares `cache` of authentic signature blocks (see [`VerifiedSignatures`]).
    pub fn with_cache(mut self, cache: std::sync::Arc<VerifiedSignatures>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Refuse authentic chunks whose signed timestamp is more than `max_age_ms` before
    /// `now` ([`IntegrityError::Stale`]) or more than `max_future_ms` after it
    /// ([`IntegrityError::FromFuture`]). Guards against a replay of an earlier run of a
    /// broadcast whose sequence numbers restarted. Off by default (`now` is ignored).
    pub fn with_age_limit(mut self, max_age_ms: u64, max_future_ms: u64) -> Self {
        self.max_age_ms = Some(max_age_ms);
        self.max_future_ms = max_future_ms;
        self
    }

    /// Accept only chunks signed for run `run_epoch` of the broadcast (the control
    /// plane's current run, from `Join`); others are [`IntegrityError::WrongRun`].
    /// `None` (the default): any run, version-1 blocks included.
    pub fn with_run(mut self, run_epoch: Option<u64>) -> Self {
        self.run_epoch = run_epoch;
        self
    }

    /// The run this verifier accepts, if any.
    pub fn run(&self) -> Option<u64> {
        self.run_epoch
    }

    pub fn broadcast_id(&self) -> &str {
        &self.broadcast_id
    }

    /// Trusts `public_key` (32 raw Ed25519 bytes) under `key_id`, replacing any key
    /// with that id.
    pub fn add_key(&mut self, key_id: u32, public_key: &[u8]) -> Result<(), KeyError> {
        self.keys.add(key_id, public_key, MAX_KEYS)
    }

    /// Stops trusting `key_id`; returns whether it was known.
    pub fn remove_key(&mut self, key_id: u32) -> bool {
        self.keys.remove(key_id)
    }

    /// Checks a chunk against its signature block. Order: structure (`Oversized`,
    /// `Truncated`, `UnsupportedVersion`, `Malformed`), `UnknownKeyId`, `BadSignature`,
    /// then, on an authentic block: `WrongBroadcast`, `WrongRun` (with a run),
    /// `SeqMismatch`, `HeaderMismatch`,
    /// `Stale` / `FromFuture` (with an age limit), and last `HashMismatch` (length,
    /// then SHA-256 of the payload).
    pub fn verify(
        &self,
        meta: &ChunkMeta,
        payload: &[u8],
        block: &[u8],
        now_unix_ms: u64,
    ) -> Result<(), IntegrityError> {
        let b = self.verify_block(block)?;
        if b.meta.seq != meta.seq {
            return Err(IntegrityError::SeqMismatch {
                signed: b.meta.seq,
                got: meta.seq,
            });
        }
        if b.meta != *meta {
            return Err(IntegrityError::HeaderMismatch);
        }
        if let Some(max_age) = self.max_age_ms {
            let ts = b.meta.timestamp_ms;
            if ts > now_unix_ms.saturating_add(self.max_future_ms) {
                return Err(IntegrityError::FromFuture);
            }
            let age_ms = now_unix_ms.saturating_sub(ts);
            if age_ms > max_age {
                return Err(IntegrityError::Stale { age_ms });
            }
        }
        if usize::try_from(b.payload_len).ok() != Some(payload.len()) {
            return Err(IntegrityError::HashMismatch);
        }
        // Not secret: a plain comparison is fine.
        if payload_hash(payload).as_slice() != b.payload_sha256 {
            return Err(IntegrityError::HashMismatch);
        }
        Ok(())
    }

    /// Checks that a block is authentic and names this broadcast (and this verifier's
    /// run, if it has one), without a payload. Returns its fields.
    pub fn verify_block<'a>(&self, block: &'a [u8]) -> Result<BlockFields<'a>, IntegrityError> {
        let b = parse_block(block)?;
        let key = self
            .keys
            .get(b.key_id)
            .ok_or(IntegrityError::UnknownKeyId(b.key_id))?;
        let mut msg = [0u8; SIGNING_CONTEXT.len() + FIXED_LEN + MAX_BROADCAST_ID];
        let n = SIGNING_CONTEXT.len() + b.signed.len();
        let context = if b.version == BLOCK_VERSION_V1 {
            SIGNING_CONTEXT_V1
        } else {
            SIGNING_CONTEXT
        };
        msg[..SIGNING_CONTEXT.len()].copy_from_slice(context);
        msg[SIGNING_CONTEXT.len()..n].copy_from_slice(b.signed);
        match &self.cache {
            Some(cache) => {
                let e = VerifiedSignatures::entry(key.as_ref(), &msg[..n], b.signature);
                if !cache.contains(&e) {
                    key.verify(&msg[..n], b.signature)
                        .map_err(|_| IntegrityError::BadSignature)?;
                    cache.insert(e);
                }
            }
            None => key
                .verify(&msg[..n], b.signature)
                .map_err(|_| IntegrityError::BadSignature)?,
        }
        if b.broadcast_id != self.broadcast_id.as_bytes() {
            return Err(IntegrityError::WrongBroadcast);
        }
        if let Some(current) = self.run_epoch
            && b.run_epoch != current
        {
            return Err(IntegrityError::WrongRun {
                signed: b.run_epoch,
                current,
            });
        }
        Ok(b)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const NOW: u64 = 1_700_000_000_000;

    fn pkcs8() -> &'static [u8] {
        static K: OnceLock<Vec<u8>> = OnceLock::new();
        K.get_or_init(|| generate_pkcs8().unwrap())
    }

    fn setup() -> (ChunkSigner, ChunkVerifier) {
        let s = ChunkSigner::new(9, pkcs8()).unwrap();
        let mut v = ChunkVerifier::new("b-1");
        v.add_key(9, &s.public_key()).unwrap();
        (s, v)
    }

    fn meta(seq: u64) -> ChunkMeta {
        ChunkMeta {
            seq,
            flags: 0x01,
            timestamp_ms: NOW.wrapping_add(seq.wrapping_mul(250)),
            duration_ms: 250,
        }
    }

    fn payload(seq: u64) -> Vec<u8> {
        (0..188 * 40).map(|i| (i as u64 ^ seq) as u8).collect()
    }

    #[test]
    fn a_shared_cache_skips_only_the_signature_check_it_has_seen() {
        let (s, v) = setup();
        let cache = std::sync::Arc::new(VerifiedSignatures::new(2));
        let v = v.with_cache(cache.clone());
        let p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap();
        v.verify(&meta(5), &p, &b, NOW).unwrap();
        assert_eq!(cache.len(), 1);
        // A hit still checks the payload and the header.
        let mut bad = p.clone();
        bad[0] ^= 1;
        assert_eq!(
            v.verify(&meta(5), &bad, &b, NOW),
            Err(IntegrityError::HashMismatch)
        );
        assert_eq!(
            v.verify(&meta(6), &p, &b, NOW),
            Err(IntegrityError::SeqMismatch { signed: 5, got: 6 })
        );
        // A forged signature is never cached, and is refused every time.
        let mut forged = b.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        for _ in 0..2 {
            assert_eq!(
                v.verify(&meta(5), &p, &forged, NOW),
                Err(IntegrityError::BadSignature)
            );
        }
        assert_eq!(cache.len(), 1);
        // The same block under another key (same id) is checked again, and refused.
        let other = ChunkSigner::new(9, &generate_pkcs8().unwrap()).unwrap();
        let mut v2 = ChunkVerifier::new("b-1").with_cache(cache.clone());
        v2.add_key(9, &other.public_key()).unwrap();
        assert_eq!(
            v2.verify(&meta(5), &p, &b, NOW),
            Err(IntegrityError::BadSignature)
        );
        // Bounded: the oldest entries go first.
        for seq in 6..9 {
            let p = payload(seq);
            let b = s.sign("b-1", &meta(seq), &p).unwrap();
            v.verify(&meta(seq), &p, &b, NOW).unwrap();
        }
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn valid_chunk_accepted() {
        let (s, v) = setup();
        let p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap();
        assert_eq!(b.len(), MIN_BLOCK_LEN + 2);
        v.verify(&meta(5), &p, &b, NOW).unwrap();
        let f = parse_block(&b).unwrap();
        assert_eq!(f.key_id, 9);
        assert_eq!(f.meta, meta(5));
        assert_eq!(f.payload_sha256, payload_hash(&p).as_slice());
        // Empty payloads are legal too.
        let b = s.sign("b-1", &meta(6), &[]).unwrap();
        v.verify(&meta(6), &[], &b, NOW).unwrap();
        // Same block through sign_hash.
        let b2 = s
            .sign_hash("b-1", &meta(5), p.len() as u32, &payload_hash(&p))
            .unwrap();
        v.verify(&meta(5), &p, &b2, NOW).unwrap();
    }

    #[test]
    fn corrupted_payload_byte_rejected() {
        let (s, v) = setup();
        let mut p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap();
        p[1000] ^= 0x20;
        assert_eq!(
            v.verify(&meta(5), &p, &b, NOW),
            Err(IntegrityError::HashMismatch)
        );
        p[1000] ^= 0x20;
        p.push(0);
        assert_eq!(
            v.verify(&meta(5), &p, &b, NOW),
            Err(IntegrityError::HashMismatch)
        );
    }

    #[test]
    fn forged_signature_rejected() {
        let (_, v) = setup();
        let p = payload(5);
        // Someone else's key under the data plane's key id.
        let forger = ChunkSigner::new(9, &generate_pkcs8().unwrap()).unwrap();
        let b = forger.sign("b-1", &meta(5), &p).unwrap();
        assert_eq!(
            v.verify(&meta(5), &p, &b, NOW),
            Err(IntegrityError::BadSignature)
        );
        // An authentic block whose hash was swapped for the polluted payload's hash.
        let (s, _) = setup();
        let mut b = s.sign("b-1", &meta(5), &p).unwrap().to_vec();
        let mut bad = p.clone();
        bad[0] ^= 1;
        b[38..70].copy_from_slice(&payload_hash(&bad));
        assert_eq!(
            v.verify(&meta(5), &bad, &b, NOW),
            Err(IntegrityError::BadSignature)
        );
    }

    #[test]
    fn replay_of_another_seq_rejected() {
        let (s, v) = setup();
        let p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap();
        // The real chunk 5, offered as chunk 6.
        assert_eq!(
            v.verify(&meta(6), &p, &b, NOW),
            Err(IntegrityError::SeqMismatch { signed: 5, got: 6 })
        );
    }

    #[test]
    fn other_broadcast_rejected() {
        let (s, v) = setup();
        let p = payload(5);
        let b = s.sign("b-2", &meta(5), &p).unwrap();
        assert_eq!(
            v.verify(&meta(5), &p, &b, NOW),
            Err(IntegrityError::WrongBroadcast)
        );
    }

    #[test]
    fn altered_header_rejected() {
        let (s, v) = setup();
        let p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap();
        let mut m = meta(5);
        m.flags = 0x02;
        assert_eq!(
            v.verify(&m, &p, &b, NOW),
            Err(IntegrityError::HeaderMismatch)
        );
        let mut m = meta(5);
        m.timestamp_ms += 1;
        assert_eq!(
            v.verify(&m, &p, &b, NOW),
            Err(IntegrityError::HeaderMismatch)
        );
    }

    #[test]
    fn unknown_key_rejected() {
        let (s, _) = setup();
        let p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap();
        let v = ChunkVerifier::new("b-1");
        assert_eq!(
            v.verify(&meta(5), &p, &b, NOW),
            Err(IntegrityError::UnknownKeyId(9))
        );
    }

    #[test]
    fn stale_and_future_rejected_with_age_limit() {
        let (s, v) = setup();
        let v = v.with_age_limit(60_000, 10_000);
        let p = payload(0);
        let b = s.sign("b-1", &meta(0), &p).unwrap();
        v.verify(&meta(0), &p, &b, NOW + 60_000).unwrap();
        assert_eq!(
            v.verify(&meta(0), &p, &b, NOW + 60_001),
            Err(IntegrityError::Stale { age_ms: 60_001 })
        );
        v.verify(&meta(0), &p, &b, NOW - 10_000).unwrap();
        assert_eq!(
            v.verify(&meta(0), &p, &b, NOW - 10_001),
            Err(IntegrityError::FromFuture)
        );
    }

    #[test]
    fn structural_errors() {
        let (s, v) = setup();
        let p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap();
        for n in [0, 1, FIXED_LEN - 1, FIXED_LEN, b.len() - 1] {
            assert_eq!(
                v.verify(&meta(5), &p, &b[..n], NOW),
                Err(IntegrityError::Truncated),
                "len {n}"
            );
        }
        assert_eq!(
            v.verify(&meta(5), &p, &[1u8; MAX_BLOCK_LEN + 1], NOW),
            Err(IntegrityError::Oversized)
        );
        let mut x = b.to_vec();
        x[0] = 7;
        assert_eq!(
            v.verify(&meta(5), &p, &x, NOW),
            Err(IntegrityError::UnsupportedVersion(7))
        );
        let mut x = b.to_vec();
        x.push(0);
        assert_eq!(
            v.verify(&meta(5), &p, &x, NOW),
            Err(IntegrityError::Malformed("trailing bytes"))
        );
        let mut x = b.to_vec();
        x[FIXED_LEN - 1] = 0;
        assert!(matches!(
            v.verify(&meta(5), &p, &x, NOW),
            Err(IntegrityError::Malformed(_))
        ));
    }

    #[test]
    fn sign_refuses_bad_input() {
        let (s, _) = setup();
        assert!(matches!(
            s.sign("", &meta(1), b"x"),
            Err(IntegrityError::Encode(_))
        ));
        assert!(matches!(
            s.sign(&"x".repeat(MAX_BROADCAST_ID + 1), &meta(1), b"x"),
            Err(IntegrityError::Encode(_))
        ));
        assert!(matches!(
            s.sign_hash("b", &meta(1), MAX_PAYLOAD + 1, &[0; 32]),
            Err(IntegrityError::Encode(_))
        ));
        let b = s
            .sign(&"x".repeat(MAX_BROADCAST_ID), &meta(1), b"x")
            .unwrap();
        assert_eq!(b.len(), MAX_BLOCK_LEN);
    }

    #[test]
    fn key_rotation() {
        let old = ChunkSigner::new(1, pkcs8()).unwrap();
        let new = ChunkSigner::new(2, &generate_pkcs8().unwrap()).unwrap();
        let mut v = ChunkVerifier::new("b-1");
        v.add_key(1, &old.public_key()).unwrap();
        v.add_key(2, &new.public_key()).unwrap();
        let p = payload(1);
        let b_old = old.sign("b-1", &meta(1), &p).unwrap();
        let b_new = new.sign("b-1", &meta(1), &p).unwrap();
        v.verify(&meta(1), &p, &b_old, NOW).unwrap();
        v.verify(&meta(1), &p, &b_new, NOW).unwrap();
        assert!(v.remove_key(1));
        assert_eq!(
            v.verify(&meta(1), &p, &b_old, NOW),
            Err(IntegrityError::UnknownKeyId(1))
        );
        assert_eq!(v.add_key(3, &[0; 5]), Err(KeyError::InvalidPublicKey));
    }

    #[test]
    fn every_single_bit_flip_of_the_block_rejected() {
        let (s, v) = setup();
        let p = payload(5);
        let b = s.sign("b-1", &meta(5), &p).unwrap().to_vec();
        for bit in 0..b.len() * 8 {
            let mut x = b.clone();
            x[bit / 8] ^= 1 << (bit % 8);
            assert!(
                v.verify(&meta(5), &p, &x, NOW).is_err(),
                "bit {bit} accepted"
            );
        }
    }

    /// A version-1 block (no run epoch), as a node of an earlier build signs it.
    fn sign_v1(s: &ChunkSigner, broadcast: &str, m: &ChunkMeta, p: &[u8]) -> Vec<u8> {
        let mut msg = SIGNING_CONTEXT_V1.to_vec();
        msg.push(BLOCK_VERSION_V1);
        msg.extend_from_slice(&s.key_id.to_be_bytes());
        msg.extend_from_slice(&m.seq.to_be_bytes());
        msg.push(m.flags);
        msg.extend_from_slice(&m.timestamp_ms.to_be_bytes());
        msg.extend_from_slice(&m.duration_ms.to_be_bytes());
        msg.extend_from_slice(&(p.len() as u32).to_be_bytes());
        msg.extend_from_slice(&payload_hash(p));
        msg.push(broadcast.len() as u8);
        msg.extend_from_slice(broadcast.as_bytes());
        let sig = s.key.sign(&msg);
        msg.extend_from_slice(sig.as_ref());
        msg.split_off(SIGNING_CONTEXT_V1.len())
    }

    #[test]
    fn block_v2_layout_carries_the_run_epoch() {
        let (s, _) = setup();
        let p = payload(5);
        let b = s
            .sign_in_run("b-1", 0x0102_0304_0506_0708, &meta(5), &p)
            .unwrap();
        assert_eq!(b[0], 2);
        assert_eq!(&b[1..5], &9u32.to_be_bytes());
        assert_eq!(&b[5..13], &0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(&b[13..21], &5u64.to_be_bytes());
        assert_eq!(b[21], 0x01);
        assert_eq!(&b[38..70], payload_hash(&p).as_slice());
        assert_eq!(b[70], 3);
        assert_eq!(&b[71..74], b"b-1");
        assert_eq!(b.len(), FIXED_LEN + 3 + SIGNATURE_LEN);
        let f = parse_block(&b).unwrap();
        assert_eq!(
            (f.version, f.run_epoch, f.meta),
            (2, 0x0102_0304_0506_0708, meta(5))
        );
    }

    #[test]
    fn another_run_is_refused_once_the_verifier_knows_the_run() {
        let (s, v) = setup();
        let p = payload(0);
        let run1 = s.sign_in_run("b-1", 1, &meta(0), &p).unwrap();
        let run2 = s.sign_in_run("b-1", 2, &meta(0), &p).unwrap();
        // No run known (legacy control plane): any run passes.
        v.verify(&meta(0), &p, &run1, NOW).unwrap();
        let v2 = v.clone().with_run(Some(2));
        assert_eq!(v2.run(), Some(2));
        v2.verify(&meta(0), &p, &run2, NOW).unwrap();
        assert_eq!(
            v2.verify(&meta(0), &p, &run1, NOW),
            Err(IntegrityError::WrongRun {
                signed: 1,
                current: 2
            })
        );
        assert!(matches!(
            v2.verify_block(&run1),
            Err(IntegrityError::WrongRun { .. })
        ));
        // A block signed with no run (0) is not the current run either.
        let unnamed = s.sign("b-1", &meta(0), &p).unwrap();
        assert_eq!(
            v2.verify(&meta(0), &p, &unnamed, NOW),
            Err(IntegrityError::WrongRun {
                signed: 0,
                current: 2
            })
        );
        // The epoch is signed: rewriting it breaks the signature.
        let mut forged = run1.to_vec();
        forged[12] = 2;
        assert_eq!(
            v2.verify(&meta(0), &p, &forged, NOW),
            Err(IntegrityError::BadSignature)
        );
    }

    #[test]
    fn version_1_blocks_are_run_0() {
        let (s, v) = setup();
        let p = payload(3);
        let b = sign_v1(&s, "b-1", &meta(3), &p);
        assert_eq!(b.len(), FIXED_LEN_V1 + 3 + SIGNATURE_LEN);
        let f = parse_block(&b).unwrap();
        assert_eq!(
            (f.version, f.run_epoch, f.key_id, f.meta),
            (1, 0, 9, meta(3))
        );
        v.verify(&meta(3), &p, &b, NOW).unwrap();
        assert_eq!(
            v.clone().with_run(Some(1)).verify(&meta(3), &p, &b, NOW),
            Err(IntegrityError::WrongRun {
                signed: 0,
                current: 1
            })
        );
        // A v1 body under the v2 context (or the reverse) does not verify.
        let mut as_v2 = b.clone();
        as_v2[0] = BLOCK_VERSION;
        assert!(v.verify(&meta(3), &p, &as_v2, NOW).is_err());
        let mut too_long = b.clone();
        too_long.extend_from_slice(&[0; 8]);
        assert_eq!(
            v.verify(&meta(3), &p, &too_long, NOW),
            Err(IntegrityError::Malformed("trailing bytes"))
        );
    }

    /// `cargo test --release -- --ignored --nocapture chunk_cost`
    #[test]
    #[ignore]
    fn chunk_cost() {
        let (s, v) = setup();
        let p: Vec<u8> = (0..64 * 1024).map(|i| (i * 7) as u8).collect();
        let m = meta(1);
        let block = s.sign("b-1", &m, &p).unwrap();
        let time = |n: u32, f: &mut dyn FnMut()| {
            for _ in 0..n / 10 {
                f();
            }
            let t = std::time::Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() / u128::from(n)
        };
        let n = 5_000;
        let hash = time(n, &mut || {
            std::hint::black_box(payload_hash(std::hint::black_box(&p)));
        });
        let sign = time(n, &mut || {
            std::hint::black_box(s.sign("b-1", &m, std::hint::black_box(&p)).unwrap());
        });
        let verify = time(n, &mut || {
            v.verify(
                &m,
                std::hint::black_box(&p),
                std::hint::black_box(&block),
                NOW,
            )
            .unwrap();
        });
        let verify_block = time(n, &mut || {
            std::hint::black_box(v.verify_block(std::hint::black_box(&block)).unwrap());
        });
        let ed_sign = time(n, &mut || {
            std::hint::black_box(s.sign_hash("b-1", &m, 65536, &[7; 32]).unwrap());
        });
        println!(
            "64 KiB chunk: sha256 {hash} ns, sign (hash+sign) {sign} ns, verify (sig+hash) {verify} ns"
        );
        println!(
            "  signature only: ed25519 sign+encode {ed_sign} ns, block verify {verify_block} ns"
        );
        println!("  block size {} bytes", block.len());
        for (rate, label) in [
            (4.0f64, "4 chunks/s (64 KiB = 2 Mbit/s)"),
            (8.0, "8 chunks/s (4 Mbit/s)"),
        ] {
            let viewers = 10_000.0;
            let per_viewer = rate * verify as f64 * 1e-9;
            println!(
                "  {label}: per viewer {:.3} ms CPU per stream-second ({:.4} % of a core); 10,000 viewers: {:.2} CPU-s per stream-s in total (spread over their devices); data plane signing: {:.3} ms CPU per stream-s",
                per_viewer * 1e3,
                per_viewer * 100.0,
                per_viewer * viewers,
                rate * sign as f64 * 1e-6
            );
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_blocks(block in proptest::collection::vec(any::<u8>(), 0..400), p in proptest::collection::vec(any::<u8>(), 0..64), seq in any::<u64>()) {
            let (_, v) = setup();
            prop_assert!(v.verify(&meta(seq), &p, &block, NOW).is_err());
            let _ = parse_block(&block);
        }

        #[test]
        fn arbitrary_body_with_valid_prefix(kid in prop_oneof![Just(9u32), any::<u32>()], len in 0usize..=255, rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_, v) = setup();
            let mut b = vec![BLOCK_VERSION];
            b.extend_from_slice(&kid.to_be_bytes());
            b.extend_from_slice(&rest);
            if b.len() >= FIXED_LEN { b[FIXED_LEN - 1] = len as u8; }
            prop_assert!(v.verify(&meta(1), b"x", &b, NOW).is_err());
        }

        #[test]
        fn any_single_bit_flip_is_rejected(bit in 0usize..(MIN_BLOCK_LEN + 3) * 8, in_payload in any::<bool>(), seq in any::<u64>()) {
            let (s, v) = setup();
            let mut p = payload(seq);
            let m = ChunkMeta { seq, flags: 0, timestamp_ms: NOW, duration_ms: 1 };
            let mut b = s.sign("b-1", &m, &p).unwrap().to_vec();
            if in_payload {
                let bit = bit % (p.len() * 8);
                p[bit / 8] ^= 1 << (bit % 8);
            } else {
                let bit = bit % (b.len() * 8);
                b[bit / 8] ^= 1 << (bit % 8);
            }
            prop_assert!(v.verify(&m, &p, &b, NOW).is_err());
        }

        #[test]
        fn sign_verify_roundtrip(seq in any::<u64>(), flags in any::<u8>(), ts in any::<u64>(), d in any::<u32>(), p in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (s, v) = setup();
            let m = ChunkMeta { seq, flags, timestamp_ms: ts, duration_ms: d };
            let b = s.sign("b-1", &m, &p).unwrap();
            prop_assert_eq!(v.verify(&m, &p, &b, 0), Ok(()));
            let b1 = sign_v1(&s, "b-1", &m, &p);
            prop_assert_eq!(v.verify(&m, &p, &b1, 0), Ok(()));
        }

        #[test]
        fn v2_run_roundtrip(run in any::<u64>(), other in any::<u64>(), seq in any::<u64>(), ts in any::<u64>(), p in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (s, v) = setup();
            let m = ChunkMeta { seq, flags: 0, timestamp_ms: ts, duration_ms: 40 };
            let b = s.sign_in_run("b-1", run, &m, &p).unwrap();
            let f = parse_block(&b).unwrap();
            prop_assert_eq!((f.version, f.run_epoch, f.meta), (BLOCK_VERSION, run, m));
            prop_assert_eq!(v.clone().with_run(Some(run)).verify(&m, &p, &b, 0), Ok(()));
            let expect = if other == run { Ok(()) } else { Err(IntegrityError::WrongRun { signed: run, current: other }) };
            prop_assert_eq!(v.with_run(Some(other)).verify(&m, &p, &b, 0), expect);
        }
    }
}
