//! fMP4 chunker tests on real ffmpeg-made streams (ffmpeg must be installed): fMP4 HLS
//! segments and a progressive fragmented MP4, plus hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::tests::ffmpeg_decode_errors;
use super::*;
use proptest::prelude::*;
use std::process::Command;
use std::sync::OnceLock;

const AV_INPUT: [&str; 8] = [
    "-f",
    "lavfi",
    "-i",
    "testsrc=size=320x240:rate=25",
    "-f",
    "lavfi",
    "-i",
    "sine",
];
const AV_CODECS: [&str; 10] = [
    "-c:v", "libx264", "-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac", "-t", "6",
];

/// 6 s of H.264 (GOP 1 s) + AAC as an fMP4 HLS stream (1 s segments): the init segment
/// and the segments in playlist order, made once per test binary.
fn hls_fmp4() -> &'static (Vec<u8>, Vec<Vec<u8>>) {
    static S: OnceLock<(Vec<u8>, Vec<Vec<u8>>)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pl = dir.path().join("live.m3u8");
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(AV_INPUT)
            .args(AV_CODECS)
            .args(["-f", "hls", "-hls_time", "1", "-hls_list_size", "0"])
            .args(["-hls_segment_type", "fmp4"])
            .arg(&pl)
            .status()
            .expect("ffmpeg must be installed");
        assert!(status.success(), "ffmpeg failed");
        let text = std::fs::read_to_string(&pl).unwrap();
        let init = std::fs::read(dir.path().join("init.mp4")).unwrap();
        let segs = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| std::fs::read(dir.path().join(l)).unwrap())
            .collect();
        (init, segs)
    })
}

/// The same content as a progressive fragmented MP4 (a fragment per key frame).
fn progressive_fmp4() -> &'static [u8] {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.mp4");
        let status = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y"])
            .args(AV_INPUT)
            .args(AV_CODECS)
            .args(["-movflags", "frag_keyframe+empty_moov+default_base_moof"])
            .args(["-f", "mp4"])
            .arg(&out)
            .status()
            .expect("ffmpeg must be installed");
        assert!(status.success(), "ffmpeg failed");
        std::fs::read(out).unwrap()
    })
}

fn feed(c: &mut Chunker, data: &[u8], now: &mut u64, out: &mut Vec<Chunk>) {
    for piece in data.chunks(1000) {
        c.push(piece, *now, out);
        *now += 1;
    }
}

fn check_stream(chunks: &[Chunk], input: &[u8], init_len: usize, min_raps: usize) {
    let mut rebuilt = Vec::new();
    let mut with_inserted = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.seq, 7 + i as u64);
        if c.is_random_access() {
            assert_eq!(
                &c.payload[4..8],
                b"ftyp",
                "RAP chunk {} starts with the init",
                c.seq
            );
            assert!(c.inserted_len == init_len || (i == 0 && c.inserted_len == 0));
        } else {
            assert_eq!(c.inserted_len, 0);
        }
        rebuilt.extend_from_slice(&c.payload[c.inserted_len..]);
        with_inserted.extend_from_slice(&c.payload);
    }
    assert_eq!(rebuilt, input, "payloads minus inserted init == input");
    let raps: Vec<usize> = (0..chunks.len())
        .filter(|&i| chunks[i].is_random_access())
        .collect();
    assert!(
        raps.len() >= min_raps,
        "{} RAP chunks of {}",
        raps.len(),
        chunks.len()
    );
    assert_eq!(raps[0], 0, "the first chunk is a random access point");
    // What an SDK viewer gets (inits repeated), and a viewer joining at each RAP chunk.
    let errs = ffmpeg_decode_errors(&with_inserted);
    assert!(errs.is_empty(), "whole stream: {errs}");
    for &r in &raps[1..] {
        let tail: Vec<u8> = chunks[r..]
            .iter()
            .flat_map(|c| c.payload.iter().copied())
            .collect();
        let errs = ffmpeg_decode_errors(&tail);
        assert!(
            errs.is_empty(),
            "joining at chunk {}: {errs}",
            chunks[r].seq
        );
    }
}

#[test]
fn fmp4_hls_segments_cut_at_key_frame_fragments_with_the_init_in_front() {
    let (init, segs) = hls_fmp4();
    assert!(segs.len() >= 5);
    let mut c = Chunker::new(ChunkerConfig::default(), 7);
    c.reset(Some("video/mp4"));
    let mut out = Vec::new();
    let mut now = 1_700_000_000_000;
    let mut input = init.clone();
    feed(&mut c, init, &mut now, &mut out);
    for s in segs {
        feed(&mut c, s, &mut now, &mut out);
        input.extend_from_slice(s);
    }
    c.flush(now, &mut out);
    assert_eq!(c.content_type().as_deref(), Some("video/mp4"));
    check_stream(&out, &input, init.len(), 5);
    // Durations are media time (the feed took a few ms of wall clock).
    let total: u64 = out.iter().map(|c| u64::from(c.duration_ms)).sum();
    assert!((5800..=6200).contains(&total), "total duration {total} ms");
    for c in &out[..out.len() - 1] {
        assert!(
            (900..=1100).contains(&c.duration_ms),
            "chunk {} lasts {} ms",
            c.seq,
            c.duration_ms
        );
    }
}

#[test]
fn progressive_fragmented_mp4_is_sniffed_and_cut_at_sync_fragments() {
    let data = progressive_fmp4();
    assert_eq!(Format::sniff(data), Some(Format::Mp4));
    let mut c = Chunker::new(
        ChunkerConfig {
            target_ms: 2000,
            max_bytes: 1024 * 1024,
        },
        7,
    );
    c.reset(None);
    let mut out = Vec::new();
    let mut now = 1_700_000_000_000;
    feed(&mut c, data, &mut now, &mut out);
    c.flush(now, &mut out);
    assert_eq!(c.format(), Some(Format::Mp4));
    let moov_end = {
        let ftyp = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        ftyp + u32::from_be_bytes(data[ftyp..ftyp + 4].try_into().unwrap()) as usize
    };
    check_stream(&out, data, moov_end, 2);
    // 2 s target, 1 s key frames: most chunks hold two fragments.
    assert!(out.len() <= 4, "{} chunks", out.len());
}

#[test]
fn small_size_cap_cuts_inside_mdat_and_stays_lossless() {
    let (init, segs) = hls_fmp4();
    let cfg = ChunkerConfig {
        target_ms: 1000,
        max_bytes: 8192,
    };
    let mut c = Chunker::new(cfg, 0);
    c.reset(Some("video/mp4"));
    let mut out = Vec::new();
    let mut now = 0;
    let mut input = init.clone();
    feed(&mut c, init, &mut now, &mut out);
    for s in &segs[..3] {
        feed(&mut c, s, &mut now, &mut out);
        input.extend_from_slice(s);
    }
    c.flush(now, &mut out);
    let rebuilt: Vec<u8> = out
        .iter()
        .flat_map(|c| c.payload[c.inserted_len..].iter().copied())
        .collect();
    assert_eq!(rebuilt, input);
    assert!(
        out.len() > input.len() / cfg.max_bytes,
        "{} chunks for {} bytes",
        out.len(),
        input.len()
    );
    for c in &out {
        assert!(
            c.payload.len() <= cfg.max_bytes + init.len() + 1024,
            "chunk {} has {} bytes",
            c.seq,
            c.payload.len()
        );
    }
    assert!(out.iter().filter(|c| c.is_random_access()).count() >= 3);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Corrupted real streams and random bytes: no panic, bounded buffers.
    #[test]
    fn hostile_input_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..40),
        garbage in proptest::collection::vec(any::<u8>(), 0..2000),
        piece in 1usize..5000,
    ) {
        let (init, segs) = hls_fmp4();
        let mut data = init.clone();
        data.extend_from_slice(&segs[0]);
        data.extend_from_slice(&garbage);
        data.extend_from_slice(&segs[1]);
        for (i, b) in flips {
            let i = i.index(data.len());
            data[i] = b;
        }
        let mut c = mp4::Mp4Chunker::new(ChunkerConfig::default().sane());
        let mut num = Numbering { next_seq: 0, discontinuity: false, emitted_any: false };
        let mut out = Vec::new();
        for (k, p) in data.chunks(piece).enumerate() {
            c.push(p, k as u64, &mut num, &mut out);
        }
        c.flush(1_000_000, &mut num, &mut out);
        let total: usize = out.iter().map(|c| c.payload.len() - c.inserted_len).sum();
        prop_assert_eq!(total as u64 + c.dropped_bytes, data.len() as u64);
    }
}
