//! Sans-IO chunker: feed it the bytes of a progressive live stream plus the current
//! time, take numbered chunks out. No I/O, no clock reads: fully deterministic.
//!
//! * MPEG-TS ([`ts`]): cut on 188-byte packet boundaries, at random access points of the
//!   video PID (adaptation-field `random_access_indicator`, or H.264/HEVC/MPEG-2 key
//!   frame sniffing) once the target duration is reached; durations from PCR (or PTS).
//!   Every `RANDOM_ACCESS` chunk starts with the latest PAT then PMT packets (copies are
//!   inserted when the cut point does not already carry them).
//! * MP3 / ADTS AAC ([`framed`]): cut on frame boundaries, durations from the frame
//!   sample counts; every chunk is a random access point.
//! * Ogg ([`framed`]): cut on page boundaries; the stream header pages (BOS pages and
//!   the granule-0 header pages after them) are kept and inserted at the start of every
//!   `RANDOM_ACCESS` chunk. Durations are wall clock. Chained streams (a new BOS
//!   mid-stream) replace the stored headers.
//! * WebM / Matroska ([`framed`]): the init segment (EBML header, Segment header,
//!   everything before the first Cluster) is kept and inserted at the start of every
//!   `RANDOM_ACCESS` chunk, which begin at Cluster boundaries. Not verified: that the
//!   Cluster starts with a key frame (live muxers such as ffmpeg's start clusters at
//!   video key frames). Durations are wall clock.
//! * Fragmented MP4 ([`mp4`]): the init segment (`ftyp` + `moov`) is kept and inserted at
//!   the start of every `RANDOM_ACCESS` chunk, which begin at a fragment (`moof`, with the
//!   `styp`/`sidx` boxes before it) whose video track starts with a sync sample;
//!   durations from the `trun` sample durations.
//! * Anything else: cut by wall-clock duration and size; every chunk is marked
//!   `RANDOM_ACCESS` since nothing better is known.
//!
//! Sequence numbers increase by one and continue across [`Chunker::reset`] (a source
//! reconnect), whose first chunk carries `DISCONTINUITY`.

pub mod framed;
pub mod mp4;
pub mod ts;

use bytes::{Bytes, BytesMut};
use starling_proto::wire::chunk_flags;

/// One chunk cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub seq: u64,
    /// [`chunk_flags`] bits.
    pub flags: u8,
    /// Unix time (ms) when the chunk was cut.
    pub timestamp_ms: u64,
    /// Media duration (wall-clock span for formats without usable timestamps).
    pub duration_ms: u32,
    pub payload: Bytes,
    /// Bytes at the front of `payload` that the chunker inserted (stream headers) and
    /// that were not at this position in the input.
    pub inserted_len: usize,
    /// The data plane's signature block (`starling_proto::integrity`), made once when
    /// the chunk enters the ring; empty when unsigned (the chunker never signs).
    pub signature: Bytes,
}

impl Chunk {
    pub fn is_random_access(&self) -> bool {
        self.flags & chunk_flags::RANDOM_ACCESS != 0
    }
}

/// Container formats the chunker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    MpegTs,
    Mp3,
    Adts,
    Ogg,
    WebM,
    /// Fragmented MP4 (fMP4 HLS segments, CMAF).
    Mp4,
    Raw,
}

impl Format {
    /// From a `Content-Type` value; `None` for generic or missing types (sniff then).
    pub fn from_content_type(ct: &str) -> Option<Format> {
        let ct = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match ct.as_str() {
            "video/mp2t" | "video/mpeg-ts" | "video/mpegts" | "video/mpeg2-ts" => {
                Some(Format::MpegTs)
            }
            "audio/mpeg" | "audio/mp3" | "audio/mpeg3" | "audio/x-mpeg" => Some(Format::Mp3),
            "audio/aac" | "audio/aacp" | "audio/x-aac" | "audio/x-aacp" => Some(Format::Adts),
            "application/ogg" | "audio/ogg" | "video/ogg" | "audio/opus" | "audio/vorbis" => {
                Some(Format::Ogg)
            }
            "video/webm" | "audio/webm" | "video/x-matroska" | "audio/x-matroska" => {
                Some(Format::WebM)
            }
            "video/mp4" | "audio/mp4" | "application/mp4" | "video/iso.segment"
            | "audio/iso.segment" => Some(Format::Mp4),
            _ => None,
        }
    }

    /// Guesses from the first bytes. `None` when more bytes are needed to decide.
    pub fn sniff(data: &[u8]) -> Option<Format> {
        if data.len() >= 4 && &data[..4] == b"OggS" {
            return Some(Format::Ogg);
        }
        if data.len() >= 4 && data[..4] == [0x1A, 0x45, 0xDF, 0xA3] {
            return Some(Format::WebM);
        }
        if data.len() >= 8 && matches!(&data[4..8], b"ftyp" | b"styp" | b"moof") {
            return Some(Format::Mp4);
        }
        if data.len() >= 3 && &data[..3] == b"ID3" {
            return Some(Format::Mp3);
        }
        if ts::looks_like_ts(data) {
            return Some(Format::MpegTs);
        }
        if data.len() < 188 * 3 + 1 {
            return None;
        }
        if data.len() >= 2 && data[0] == 0xFF && data[1] & 0xF6 == 0xF0 {
            return Some(Format::Adts);
        }
        if data.len() >= 2 && data[0] == 0xFF && data[1] & 0xE0 == 0xE0 {
            return Some(Format::Mp3);
        }
        Some(Format::Raw)
    }

    /// The MIME type reported for a sniffed format.
    pub fn mime(self) -> &'static str {
        match self {
            Format::MpegTs => "video/mp2t",
            Format::Mp3 => "audio/mpeg",
            Format::Adts => "audio/aac",
            Format::Ogg => "application/ogg",
            Format::WebM => "video/webm",
            Format::Mp4 => "video/mp4",
            Format::Raw => "application/octet-stream",
        }
    }
}

/// Chunking limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerConfig {
    /// Target chunk duration in ms (cut at the first random access point after it).
    pub target_ms: u32,
    /// Hard cap on a chunk payload (force-cut, not marked random access).
    pub max_bytes: usize,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        ChunkerConfig {
            target_ms: 1000,
            max_bytes: 1024 * 1024,
        }
    }
}

impl ChunkerConfig {
    fn sane(self) -> Self {
        ChunkerConfig {
            target_ms: self.target_ms.clamp(20, 60_000),
            // At least a handful of TS packets, at most what the wire protocol carries.
            max_bytes: self.max_bytes.clamp(
                188 * 16,
                (starling_proto::wire::ABSOLUTE_MAX_CHUNK as usize) - 64,
            ),
        }
    }
}

/// Sequence numbering and flag bookkeeping shared by every format.
#[derive(Debug)]
pub(crate) struct Numbering {
    next_seq: u64,
    discontinuity: bool,
    emitted_any: bool,
}

impl Numbering {
    pub(crate) fn emit(
        &mut self,
        payload: BytesMut,
        inserted_len: usize,
        random_access: bool,
        duration_ms: u64,
        now_ms: u64,
        out: &mut Vec<Chunk>,
    ) {
        if payload.is_empty() {
            return;
        }
        let mut flags = 0;
        if random_access {
            flags |= chunk_flags::RANDOM_ACCESS;
        }
        if self.discontinuity {
            flags |= chunk_flags::DISCONTINUITY;
            self.discontinuity = false;
        }
        out.push(Chunk {
            seq: self.next_seq,
            flags,
            timestamp_ms: now_ms,
            duration_ms: u32::try_from(duration_ms).unwrap_or(u32::MAX),
            payload: payload.freeze(),
            inserted_len,
            signature: Bytes::new(),
        });
        self.next_seq += 1;
        self.emitted_any = true;
    }
}

enum Inner {
    /// Format not known yet: buffering the first bytes to sniff.
    Undecided(Vec<u8>),
    Ts(Box<ts::TsChunker>),
    Framed(Box<framed::FramedChunker>),
    Mp4(Box<mp4::Mp4Chunker>),
}

/// The chunker for one broadcast. Feed with [`Chunker::push`].
pub struct Chunker {
    cfg: ChunkerConfig,
    numbering: Numbering,
    content_type: Option<String>,
    format: Option<Format>,
    inner: Inner,
}

/// Bytes buffered at most before giving up sniffing (falls back to raw).
const SNIFF_LIMIT: usize = 4096;

impl Chunker {
    /// `first_seq` is the sequence number of the first chunk.
    pub fn new(cfg: ChunkerConfig, first_seq: u64) -> Self {
        Chunker {
            cfg: cfg.sane(),
            numbering: Numbering {
                next_seq: first_seq,
                discontinuity: false,
                emitted_any: false,
            },
            content_type: None,
            format: None,
            inner: Inner::Undecided(Vec::new()),
        }
    }

    /// Starts a new source session (after a (re)connect): the parser state is reset,
    /// numbering continues, and if any chunk was emitted before, the next chunk carries
    /// `DISCONTINUITY`. Buffered bytes of the previous session must be flushed first
    /// with [`Chunker::flush`].
    pub fn reset(&mut self, content_type: Option<&str>) {
        self.content_type = content_type.map(str::to_owned);
        self.format = content_type.and_then(Format::from_content_type);
        self.inner = match self.format {
            Some(f) => self.make(f),
            None => Inner::Undecided(Vec::new()),
        };
    }

    /// Marks the next chunk `DISCONTINUITY` (the caller knows data was lost).
    pub fn mark_discontinuity(&mut self) {
        self.numbering.discontinuity = true;
    }

    fn make(&self, f: Format) -> Inner {
        match f {
            Format::MpegTs => Inner::Ts(Box::new(ts::TsChunker::new(self.cfg))),
            Format::Mp4 => Inner::Mp4(Box::new(mp4::Mp4Chunker::new(self.cfg))),
            other => Inner::Framed(Box::new(framed::FramedChunker::new(other, self.cfg))),
        }
    }

    /// The format in use, once known.
    pub fn format(&self) -> Option<Format> {
        self.format
    }

    /// The content type to advertise: the source's header, else the sniffed format's.
    pub fn content_type(&self) -> Option<String> {
        match (&self.content_type, self.format) {
            (Some(ct), Some(_)) if !is_generic(ct) => Some(ct.clone()),
            (Some(ct), None) if !is_generic(ct) => Some(ct.clone()),
            (_, Some(f)) => Some(f.mime().to_owned()),
            _ => None,
        }
    }

    /// Sequence number the next chunk will get.
    pub fn next_seq(&self) -> u64 {
        self.numbering.next_seq
    }

    /// Feeds bytes received at `now_ms` (unix ms); appends finished chunks to `out`.
    pub fn push(&mut self, data: &[u8], now_ms: u64, out: &mut Vec<Chunk>) {
        if let Inner::Undecided(buf) = &mut self.inner {
            buf.extend_from_slice(data);
            let guess = Format::sniff(buf).or(if buf.len() >= SNIFF_LIMIT {
                Some(Format::Raw)
            } else {
                None
            });
            let Some(f) = guess else { return };
            let pending = std::mem::take(buf);
            self.format = Some(f);
            self.inner = self.make(f);
            return self.push(&pending, now_ms, out);
        }
        match &mut self.inner {
            Inner::Ts(t) => t.push(data, now_ms, &mut self.numbering, out),
            Inner::Framed(f) => f.push(data, now_ms, &mut self.numbering, out),
            Inner::Mp4(m) => m.push(data, now_ms, &mut self.numbering, out),
            Inner::Undecided(_) => {}
        }
    }

    /// End of a source session: emits whatever is buffered as a last chunk and marks
    /// the next chunk `DISCONTINUITY`.
    pub fn flush(&mut self, now_ms: u64, out: &mut Vec<Chunk>) {
        match &mut self.inner {
            Inner::Ts(t) => t.flush(now_ms, &mut self.numbering, out),
            Inner::Framed(f) => f.flush(now_ms, &mut self.numbering, out),
            Inner::Mp4(m) => m.flush(now_ms, &mut self.numbering, out),
            Inner::Undecided(buf) => {
                if !buf.is_empty() {
                    let b = BytesMut::from(&buf[..]);
                    buf.clear();
                    self.numbering.emit(b, 0, false, 0, now_ms, out);
                }
            }
        }
        if self.numbering.emitted_any {
            self.numbering.discontinuity = true;
        }
    }
}

fn is_generic(ct: &str) -> bool {
    let ct = ct.trim().to_ascii_lowercase();
    ct.is_empty() || ct.starts_with("application/octet-stream") || ct.starts_with("text/")
}

#[cfg(test)]
mod mp4_tests;
#[cfg(test)]
mod tests;
