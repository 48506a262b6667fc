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
mod tests;
