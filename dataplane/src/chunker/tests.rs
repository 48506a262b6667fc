//! Chunker tests on real ffmpeg-made streams (ffmpeg must be installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn ffmpeg(args: &[&str], ext: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("out.{ext}"));
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args)
        .arg(&out)
        .status()
        .expect("ffmpeg must be installed");
    assert!(status.success(), "ffmpeg failed");
    std::fs::read(out).unwrap()
}

/// 6 s of H.264 (GOP 25 at 25 fps) + AAC in MPEG-TS, made once per test binary.
pub(crate) fn test_ts() -> &'static [u8] {
    static TS: OnceLock<Vec<u8>> = OnceLock::new();
    TS.get_or_init(|| {
        ffmpeg(
            &[
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=320x240:rate=25",
                "-f",
                "lavfi",
                "-i",
                "sine",
                "-c:v",
                "libx264",
                "-g",
                "25",
                "-c:a",
                "aac",
                "-t",
                "6",
                "-f",
                "mpegts",
            ],
            "ts",
        )
    })
}

/// Decodes `data` with `ffmpeg -v error`; returns stderr.
pub(crate) fn ffmpeg_decode_errors(data: &[u8]) -> String {
    let mut child = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i", "-", "-f", "null", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ffmpeg must be installed");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let mut err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        err.push_str(&format!("\n(exit status {})", out.status));
    }
    err
}

fn chunk_all(data: &[u8], cfg: ChunkerConfig, ct: Option<&str>) -> Vec<Chunk> {
    let mut c = Chunker::new(cfg, 100);
    c.reset(ct);
    let mut out = Vec::new();
    // Odd-sized pieces; the clock advances slowly (faster-than-real-time feed).
    let sizes = [1, 7, 1000, 13_331, 188, 4096, 65_537, 3];
    let mut pos = 0;
    let mut i = 0;
    let mut now = 1_700_000_000_000u64;
    while pos < data.len() {
        let n = sizes[i % sizes.len()].min(data.len() - pos);
        c.push(&data[pos..pos + n], now, &mut out);
        pos += n;
        i += 1;
        now += 1;
    }
    c.flush(now, &mut out);
    out
}

fn pid(p: &[u8]) -> u16 {
    (u16::from(p[1] & 0x1F) << 8) | u16::from(p[2])
}

fn pmt_pid_of(data: &[u8]) -> u16 {
    let pat = data.chunks(188).find(|p| pid(p) == 0).unwrap();
    let sec = &pat[5..];
    (u16::from(sec[10] & 0x1F) << 8) | u16::from(sec[11])
}

#[test]
fn ts_chunks_are_packet_aligned_contiguous_and_lossless() {
    let ts = test_ts();
    let pmt_pid = pmt_pid_of(ts);
    let cfg = ChunkerConfig {
        target_ms: 1000,
        max_bytes: 1024 * 1024,
    };
    let chunks = chunk_all(ts, cfg, Some("video/mp2t"));
    assert!(chunks.len() >= 5, "only {} chunks", chunks.len());
    let mut rebuilt = Vec::new();
    let mut total_ms = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.seq, 100 + i as u64, "seq contiguous");
        assert_eq!(
            c.payload.len() % 188,
            0,
            "chunk {} not packet aligned",
            c.seq
        );
        assert!(c.payload.chunks(188).all(|p| p[0] == 0x47));
        if c.is_random_access() {
            assert_eq!(pid(&c.payload[..188]), 0, "RAP chunk starts with PAT");
            assert_eq!(pid(&c.payload[188..376]), pmt_pid, "then PMT");
        }
        assert_eq!(c.flags & chunk_flags::DISCONTINUITY, 0);
        rebuilt.extend_from_slice(&c.payload[c.inserted_len..]);
        total_ms += u64::from(c.duration_ms);
    }
    assert_eq!(rebuilt, ts, "payloads minus inserted headers == input");
    // Every chunk but the last starts at a key frame (GOP = 1 s = target).
    let raps = chunks.iter().filter(|c| c.is_random_access()).count();
    assert!(
        raps >= chunks.len() - 1,
        "{raps} RAP chunks of {}",
        chunks.len()
    );
    for c in &chunks[..chunks.len() - 1] {
        assert!(
            (900..=2100).contains(&c.duration_ms),
            "chunk {} duration {} ms",
            c.seq,
            c.duration_ms
        );
    }
    assert!((5000..=6500).contains(&total_ms), "total {total_ms} ms");
}

#[test]
fn ts_rap_chunk_suffix_decodes_without_errors() {
    let ts = test_ts();
    let chunks = chunk_all(ts, ChunkerConfig::default(), None);
    // Start on the third random-access chunk, as a joining viewer would.
    let start = chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_random_access())
        .nth(2)
        .map(|(i, _)| i)
        .unwrap();
    assert!(start > 0);
    let suffix: Vec<u8> = chunks[start..]
        .iter()
        .flat_map(|c| c.payload.iter().copied())
        .collect();
    let errors = ffmpeg_decode_errors(&suffix);
    assert!(errors.trim().is_empty(), "ffmpeg errors: {errors}");
    // Each single RAP chunk also decodes on its own.
    for c in chunks.iter().filter(|c| c.is_random_access()) {
        let errors = ffmpeg_decode_errors(&c.payload);
        assert!(errors.trim().is_empty(), "chunk {}: {errors}", c.seq);
    }
}

#[test]
fn ts_force_cut_at_max_bytes() {
    let ts = test_ts();
    let max = 188 * 40;
    let chunks = chunk_all(
        ts,
        ChunkerConfig {
            target_ms: 1000,
            max_bytes: max,
        },
        Some("video/mp2t"),
    );
    let mut rebuilt = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        assert!(
            c.payload.len() <= max,
            "chunk {} is {} bytes",
            c.seq,
            c.payload.len()
        );
        assert_eq!(c.payload.len() % 188, 0);
        if i > 0 {
            assert_eq!(c.seq, chunks[i - 1].seq + 1);
        }
        if c.is_random_access() {
            assert_eq!(pid(&c.payload[..188]), 0);
        }
        rebuilt.extend_from_slice(&c.payload[c.inserted_len..]);
    }
    assert_eq!(rebuilt, ts);
    let forced = chunks.iter().filter(|c| !c.is_random_access()).count();
    assert!(forced > chunks.len() / 2);
}

#[test]
fn ts_resyncs_after_garbage_and_survives_noise() {
    let ts = test_ts();
    let mut data = vec![0x47u8, 1, 2, 3, 0x47, 9, 9];
    data.extend((0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let garbage_len = data.len();
    data.extend_from_slice(ts);
    let chunks = chunk_all(&data, ChunkerConfig::default(), Some("video/mp2t"));
    let rebuilt: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.payload[c.inserted_len..].iter().copied())
        .collect();
    assert!(rebuilt.len() <= data.len());
    assert!(rebuilt.ends_with(&ts[ts.len() - 188 * 100..]));
    assert!(rebuilt.len() >= ts.len() && rebuilt.len() <= ts.len() + garbage_len);
    for c in &chunks {
        assert_eq!(c.payload.len() % 188, 0);
    }
    // Pure noise in every format: no panic, bounded output.
    for ct in [
        Some("video/mp2t"),
        Some("audio/mpeg"),
        Some("audio/aac"),
        Some("application/ogg"),
        Some("video/webm"),
        None,
    ] {
        let noise: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_246_822_519).rotate_left(7) ^ i) as u8)
            .collect();
        let _ = chunk_all(&noise, ChunkerConfig::default(), ct);
    }
}

#[test]
fn reconnect_continues_numbering_with_discontinuity() {
    let ts = test_ts();
    let mut c = Chunker::new(ChunkerConfig::default(), 0);
    let mut out = Vec::new();
    c.reset(Some("video/mp2t"));
    c.push(&ts[..ts.len() / 376 * 188], 1, &mut out);
    c.flush(2, &mut out);
    let n = out.len();
    assert!(n >= 1);
    c.reset(Some("video/mp2t"));
    c.push(ts, 3, &mut out);
    c.flush(4, &mut out);
    for (i, ch) in out.iter().enumerate() {
        assert_eq!(ch.seq, i as u64);
    }
    assert_ne!(out[n].flags & chunk_flags::DISCONTINUITY, 0);
    assert!(
        out[n].is_random_access(),
        "a clean restart begins with a RAP chunk"
    );
    assert!(
        out[n + 1..]
            .iter()
            .all(|c| c.flags & chunk_flags::DISCONTINUITY == 0)
    );
    assert!(
        out[..n]
            .iter()
            .all(|c| c.flags & chunk_flags::DISCONTINUITY == 0)
    );
}

#[test]
fn sniffs_ts_without_content_type() {
    let ts = test_ts();
    let mut c = Chunker::new(ChunkerConfig::default(), 0);
    c.reset(Some("application/octet-stream"));
    let mut out = Vec::new();
    c.push(&ts[..10_000], 0, &mut out);
    assert_eq!(c.format(), Some(Format::MpegTs));
    assert_eq!(c.content_type().as_deref(), Some("video/mp2t"));
}

#[test]
fn mp3_and_adts_cut_on_frames_with_media_durations() {
    for (codec, fmt, ct, ext) in [
        ("libmp3lame", "mp3", "audio/mpeg", "mp3"),
        ("aac", "adts", "audio/aac", "aac"),
    ] {
        let data = ffmpeg(
            &[
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440",
                "-t",
                "5",
                "-c:a",
                codec,
                "-f",
                fmt,
            ],
            ext,
        );
        let chunks = chunk_all(&data, ChunkerConfig::default(), Some(ct));
        assert!(chunks.len() >= 4, "{fmt}: {} chunks", chunks.len());
        let rebuilt: Vec<u8> = chunks
            .iter()
            .flat_map(|c| c.payload.iter().copied())
            .collect();
        // Everything but a possible trailing partial frame is kept.
        assert!(data.starts_with(&rebuilt[..rebuilt.len().min(data.len())]));
        for c in &chunks[1..chunks.len() - 1] {
            assert_eq!(
                c.payload[0], 0xFF,
                "{fmt}: chunk {} starts on a frame",
                c.seq
            );
            assert!(c.is_random_access());
            assert!(
                (950..=1100).contains(&c.duration_ms),
                "{fmt}: {} ms",
                c.duration_ms
            );
        }
        let start = chunks.len() / 2;
        let suffix: Vec<u8> = chunks[start..]
            .iter()
            .flat_map(|c| c.payload.iter().copied())
            .collect();
        let errors = ffmpeg_decode_errors(&suffix);
        assert!(errors.trim().is_empty(), "{fmt}: {errors}");
    }
}

#[test]
fn ogg_and_webm_rap_chunks_start_with_stream_headers() {
    for (args, ct, ext, magic) in [
        (
            vec![
                "-f", "lavfi", "-i", "sine", "-t", "5", "-c:a", "libopus", "-f", "ogg",
            ],
            "audio/ogg",
            "ogg",
            &b"OggS"[..],
        ),
        (
            vec![
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=160x120:rate=25",
                "-t",
                "5",
                "-c:v",
                "libvpx",
                "-g",
                "25",
                "-deadline",
                "realtime",
                "-cluster_time_limit",
                "1000",
                "-f",
                "webm",
            ],
            "video/webm",
            "webm",
            &[0x1A, 0x45, 0xDF, 0xA3][..],
        ),
    ] {
        let data = ffmpeg(&args, ext);
        // Wall clock drives Ogg/WebM durations: advance 100 ms per piece.
        let mut c = Chunker::new(ChunkerConfig::default(), 0);
        c.reset(Some(ct));
        let mut out = Vec::new();
        let mut now = 0;
        for piece in data.chunks(1000) {
            c.push(piece, now, &mut out);
            now += 100;
        }
        c.flush(now, &mut out);
        assert!(out.len() >= 2, "{ext}: {} chunks", out.len());
        let rebuilt: Vec<u8> = out
            .iter()
            .flat_map(|c| c.payload[c.inserted_len..].iter().copied())
            .collect();
        assert_eq!(rebuilt, data, "{ext}: lossless");
        let raps: Vec<&Chunk> = out.iter().filter(|c| c.is_random_access()).collect();
        assert!(raps.len() >= 2, "{ext}: {} RAP chunks", raps.len());
        for r in &raps {
            assert!(
                r.payload.starts_with(magic),
                "{ext}: RAP chunk {} starts with headers",
                r.seq
            );
        }
        // A viewer joining at a RAP chunk gets it whole, then the following chunks
        // without their inserted headers (what the HTTP server sends).
        let start = out.iter().position(|c| c.seq == raps[1].seq).unwrap();
        let mut suffix = out[start].payload.to_vec();
        for c in &out[start + 1..] {
            suffix.extend_from_slice(&c.payload[c.inserted_len..]);
        }
        let errors = ffmpeg_decode_errors(&suffix);
        assert!(errors.trim().is_empty(), "{ext}: {errors}");
        let errors = ffmpeg_decode_errors(&raps[raps.len() - 1].payload);
        assert!(errors.trim().is_empty(), "{ext} single chunk: {errors}");
    }
}
