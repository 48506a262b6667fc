//! Unit tests of the parent module.

#![allow(clippy::unwrap_used, clippy::expect_used)]

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
    println!("  signature only: ed25519 sign+encode {ed_sign} ns, block verify {verify_block} ns");
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
