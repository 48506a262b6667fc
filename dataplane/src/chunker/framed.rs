//! Chunking for MP3, ADTS AAC, Ogg, WebM and unknown formats: the input is split into
//! units (frames, pages, EBML elements, or raw pieces) and chunks are cut between units.

use super::{Chunk, ChunkerConfig, Format, Numbering};
use bytes::{BufMut, BytesMut};

/// Largest unit accepted before declaring the stream garbage and resyncing.
const MAX_UNIT: usize = 8 * 1024 * 1024;

/// A unit found in the input.
struct Unit {
    len: usize,
    /// A chunk may start (as random access) at this unit.
    rap: bool,
    /// Media duration of this unit in microseconds, if known.
    media_us: Option<u64>,
    /// This unit is a stream header to remember (Ogg header pages, WebM init).
    header: bool,
    /// This unit starts a new header set (Ogg BOS after data: chained stream).
    new_headers: bool,
}

enum Parse {
    Unit(Unit),
    /// Skip n garbage bytes.
    Skip(usize),
    NeedMore,
}

pub struct FramedChunker {
    format: Format,
    cfg: ChunkerConfig,
    inbuf: BytesMut,
    cur: BytesMut,
    cur_inserted: usize,
    cur_rap: bool,
    cur_media_us: u64,
    cur_has_media_clock: bool,
    cut_wall_ms: Option<u64>,
    /// Stored stream headers inserted at the start of random-access chunks.
    headers: BytesMut,
    headers_done: bool,
    /// Ogg: data pages seen (so a BOS means a chained stream).
    ogg_data_seen: bool,
    /// WebM parser state.
    webm: WebmState,
    pub dropped_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WebmState {
    /// Before/inside the init segment.
    Init,
    /// After the first Cluster header.
    Media,
}

impl FramedChunker {
    pub fn new(format: Format, cfg: ChunkerConfig) -> Self {
        FramedChunker {
            format,
            cfg,
            inbuf: BytesMut::new(),
            cur: BytesMut::new(),
            cur_inserted: 0,
            cur_rap: false,
            cur_media_us: 0,
            cur_has_media_clock: false,
            cut_wall_ms: None,
            headers: BytesMut::new(),
            headers_done: false,
            ogg_data_seen: false,
            webm: WebmState::Init,
            dropped_bytes: 0,
        }
    }

    pub(crate) fn push(
        &mut self,
        data: &[u8],
        now_ms: u64,
        num: &mut Numbering,
        out: &mut Vec<Chunk>,
    ) {
        self.cut_wall_ms.get_or_insert(now_ms);
        if self.format == Format::Raw {
            // Units are whatever arrives, split at the size cap.
            for piece in data.chunks(self.cfg.max_bytes.max(1)) {
                let unit = Unit {
                    len: piece.len(),
                    rap: true,
                    media_us: None,
                    header: false,
                    new_headers: false,
                };
                self.unit(unit, piece, now_ms, num, out);
            }
            return;
        }
        self.inbuf.extend_from_slice(data);
        loop {
            let parsed = match self.format {
                Format::Mp3 => parse_mp3(&self.inbuf),
                Format::Adts => parse_adts(&self.inbuf),
                Format::Ogg => self.parse_ogg(),
                Format::WebM => self.parse_webm(),
                Format::MpegTs | Format::Mp4 | Format::Raw => Parse::Skip(self.inbuf.len()),
            };
            match parsed {
                Parse::NeedMore => break,
                Parse::Skip(n) => {
                    let n = n.max(1).min(self.inbuf.len());
                    if n == 0 {
                        break;
                    }
                    self.dropped_bytes += n as u64;
                    let _ = self.inbuf.split_to(n);
                }
                Parse::Unit(u) => {
                    let bytes = self.inbuf.split_to(u.len).freeze();
                    self.unit(u, &bytes, now_ms, num, out);
                }
            }
        }
    }

    fn unit(
        &mut self,
        u: Unit,
        bytes: &[u8],
        now_ms: u64,
        num: &mut Numbering,
        out: &mut Vec<Chunk>,
    ) {
        if u.new_headers {
            self.headers.clear();
            self.headers_done = false;
        }
        if u.header && !self.headers_done {
            let start = self.headers.len();
            self.headers.extend_from_slice(bytes);
            if self.format == Format::WebM {
                unknown_segment_size(&mut self.headers[start..]);
            }
        } else if !u.header {
            self.headers_done = true;
        }
        let target = u64::from(self.cfg.target_ms);
        let wall = now_ms.saturating_sub(self.cut_wall_ms.unwrap_or(now_ms));
        let elapsed = if self.cur_has_media_clock {
            self.cur_media_us / 1000
        } else {
            wall
        };
        let full = self.cur.len() + bytes.len() > self.cfg.max_bytes;
        if !self.cur.is_empty() {
            if u.rap && (elapsed >= target || full) {
                self.cut(true, now_ms, num, out);
            } else if full || elapsed >= target * 3 {
                self.cut(false, now_ms, num, out);
            }
        } else if u.rap {
            self.cur_rap = true;
        }
        if self.cur_rap && self.cur.is_empty() && !u.header && !u.new_headers {
            // Start of a random-access chunk: put the stream headers first.
            if !self.headers.is_empty() && self.headers_done {
                self.cur.extend_from_slice(&self.headers);
                self.cur_inserted = self.headers.len();
            }
        }
        self.cur.put_slice(bytes);
        if let Some(us) = u.media_us {
            self.cur_media_us += us;
            self.cur_has_media_clock = true;
        }
    }

    fn cut(&mut self, next_rap: bool, now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        let wall = now_ms.saturating_sub(self.cut_wall_ms.unwrap_or(now_ms));
        let duration = if self.cur_has_media_clock {
            self.cur_media_us / 1000
        } else {
            wall
        };
        let payload = std::mem::take(&mut self.cur);
        num.emit(
            payload,
            self.cur_inserted,
            self.cur_rap,
            duration,
            now_ms,
            out,
        );
        self.cur_inserted = 0;
        self.cur_media_us = 0;
        self.cur_has_media_clock = false;
        self.cur_rap = next_rap;
        self.cut_wall_ms = Some(now_ms);
    }

    pub(crate) fn flush(&mut self, now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        if !self.cur.is_empty() {
            self.cut(false, now_ms, num, out);
        }
        self.cur_rap = false;
        self.inbuf.clear();
        self.headers.clear();
        self.headers_done = false;
        self.ogg_data_seen = false;
        self.webm = WebmState::Init;
    }

    fn parse_ogg(&mut self) -> Parse {
        let b = &self.inbuf[..];
        if b.len() < 27 {
            return Parse::NeedMore;
        }
        if &b[..4] != b"OggS" || b[4] != 0 {
            return Parse::Skip(find(b, b"OggS", 1).unwrap_or(b.len().saturating_sub(3)));
        }
        let nseg = usize::from(b[26]);
        if b.len() < 27 + nseg {
            return Parse::NeedMore;
        }
        let body: usize = b[27..27 + nseg].iter().map(|&x| usize::from(x)).sum();
        let len = 27 + nseg + body;
        if b.len() < len {
            return Parse::NeedMore;
        }
        let bos = b[5] & 0x02 != 0;
        let granule = u64::from_le_bytes([b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13]]);
        let header_page = bos || (!self.headers_done && (granule == 0 || granule == u64::MAX));
        let new_headers = bos && (self.ogg_data_seen || self.headers_done);
        if !header_page {
            self.ogg_data_seen = true;
        } else if new_headers {
            self.ogg_data_seen = false;
        }
        Parse::Unit(Unit {
            len,
            // Chunks start at data pages (headers inserted) or at a BOS page.
            rap: !header_page || bos,
            media_us: None,
            header: header_page,
            new_headers,
        })
    }

    fn parse_webm(&mut self) -> Parse {
        const CLUSTER: u32 = 0x1F43_B675;
        const SEGMENT: u32 = 0x1853_8067;
        let b = &self.inbuf[..];
        let Some((id, id_len)) = ebml_id(b) else {
            return if b.len() < 4 {
                Parse::NeedMore
            } else {
                self.webm_resync()
            };
        };
        let Some((size, size_len)) = ebml_size(&b[id_len..]) else {
            return if b.len() < id_len + 8 {
                Parse::NeedMore
            } else {
                self.webm_resync()
            };
        };
        let head = id_len + size_len;
        // Master elements we descend into: Segment and Cluster (their header is a unit).
        if id == SEGMENT || id == CLUSTER {
            let cluster = id == CLUSTER;
            if cluster {
                self.webm = WebmState::Media;
            }
            return Parse::Unit(Unit {
                len: head,
                rap: cluster,
                media_us: None,
                header: !cluster && self.webm == WebmState::Init,
                new_headers: false,
            });
        }
        let Some(size) = size else {
            // Unknown size on a non-master element: cannot walk it.
            return self.webm_resync();
        };
        let total = head as u64 + size;
        if total > MAX_UNIT as u64 {
            return self.webm_resync();
        }
        let total = total as usize;
        if b.len() < total {
            return Parse::NeedMore;
        }
        let ebml_header = id == 0x1A45_DFA3;
        if ebml_header {
            self.webm = WebmState::Init;
        }
        Parse::Unit(Unit {
            len: total,
            rap: ebml_header,
            media_us: None,
            header: self.webm == WebmState::Init,
            new_headers: ebml_header,
        })
    }

    fn webm_resync(&self) -> Parse {
        let b = &self.inbuf[..];
        match find(b, &[0x1F, 0x43, 0xB6, 0x75], 1) {
            Some(i) => Parse::Skip(i),
            None => Parse::Skip(b.len().saturating_sub(3).max(1)),
        }
    }
}

/// In the stored init segment, a Segment of known size becomes unknown-size (a viewer
/// joining mid-stream would otherwise see a truncated file).
fn unknown_segment_size(b: &mut [u8]) {
    if b.len() < 5 || b[..4] != [0x18, 0x53, 0x80, 0x67] {
        return;
    }
    let len = b[4].leading_zeros() as usize + 1;
    if len > 8 || b.len() < 4 + len {
        return;
    }
    let marker = if len == 8 { 0x01 } else { 0x80u8 >> (len - 1) };
    b[4] = marker | (marker.wrapping_sub(1));
    for x in &mut b[5..4 + len] {
        *x = 0xFF;
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

/// EBML element id (with its marker bits) and its length.
fn ebml_id(b: &[u8]) -> Option<(u32, usize)> {
    let first = *b.first()?;
    let len = first.leading_zeros() as usize + 1;
    if len > 4 || b.len() < len {
        return None;
    }
    let mut v = 0u32;
    for &x in &b[..len] {
        v = (v << 8) | u32::from(x);
    }
    Some((v, len))
}

/// EBML size (None = unknown size) and its length.
fn ebml_size(b: &[u8]) -> Option<(Option<u64>, usize)> {
    let first = *b.first()?;
    let len = first.leading_zeros() as usize + 1;
    if len > 8 || b.len() < len {
        return None;
    }
    let mask = if len == 8 { 0 } else { 0xFFu8 >> len };
    let mut v = u64::from(first & mask);
    let mut all_ones = first & mask == mask;
    for &x in &b[1..len] {
        v = (v << 8) | u64::from(x);
        all_ones &= x == 0xFF;
    }
    Some((if all_ones { None } else { Some(v) }, len))
}

/// MP3 frame header → (frame length, samples, sample rate).
fn mp3_header(h: &[u8]) -> Option<(usize, u32, u32)> {
    if h.len() < 4 || h[0] != 0xFF || h[1] & 0xE0 != 0xE0 {
        return None;
    }
    let version = (h[1] >> 3) & 0x3; // 0 = 2.5, 2 = 2, 3 = 1
    let layer = (h[1] >> 1) & 0x3; // 1 = III, 2 = II, 3 = I
    if version == 1 || layer == 0 {
        return None;
    }
    let br_idx = usize::from(h[2] >> 4);
    let sr_idx = usize::from((h[2] >> 2) & 0x3);
    let padding = u32::from((h[2] >> 1) & 1);
    if br_idx == 0 || br_idx == 15 || sr_idx == 3 {
        return None;
    }
    const BR_V1: [[u32; 15]; 3] = [
        [
            0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
        ],
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
        ],
        [
            0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
        ],
    ];
    const BR_V2: [[u32; 15]; 2] = [
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
        ],
        [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
    ];
    const SR: [u32; 3] = [44100, 48000, 32000];
    let layer_i = usize::from(3 - layer); // 0 = I, 1 = II, 2 = III
    let bitrate = if version == 3 {
        BR_V1[layer_i][br_idx]
    } else {
        BR_V2[if layer_i == 0 { 0 } else { 1 }][br_idx]
    } * 1000;
    let sr = match version {
        3 => SR[sr_idx],
        2 => SR[sr_idx] / 2,
        _ => SR[sr_idx] / 4,
    };
    let (len, samples) = match layer_i {
        0 => ((12 * bitrate / sr + padding) * 4, 384),
        1 => (144 * bitrate / sr + padding, 1152),
        _ if version == 3 => (144 * bitrate / sr + padding, 1152),
        _ => (72 * bitrate / sr + padding, 576),
    };
    if len < 4 {
        return None;
    }
    Some((len as usize, samples, sr))
}

/// ADTS header → (frame length, samples, sample rate).
fn adts_header(h: &[u8]) -> Option<(usize, u32, u32)> {
    if h.len() < 7 || h[0] != 0xFF || h[1] & 0xF6 != 0xF0 {
        return None;
    }
    const SR: [u32; 13] = [
        96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
    ];
    let sr = *SR.get(usize::from((h[2] >> 2) & 0xF))?;
    let len = (usize::from(h[3] & 0x3) << 11) | (usize::from(h[4]) << 3) | usize::from(h[5] >> 5);
    if len < 7 {
        return None;
    }
    let blocks = u32::from(h[6] & 0x3) + 1;
    Some((len, 1024 * blocks, sr))
}

type HeaderFn = fn(&[u8]) -> Option<(usize, u32, u32)>;

/// Walks frames: a frame is accepted when the next frame's header also parses (or
/// the buffer ends exactly there).
fn parse_frames(b: &[u8], header: HeaderFn) -> Parse {
    if b.len() < 10 {
        return Parse::NeedMore;
    }
    if &b[..3] == b"ID3" {
        // ID3v2 tag: syncsafe size.
        let size = (usize::from(b[6] & 0x7F) << 21)
            | (usize::from(b[7] & 0x7F) << 14)
            | (usize::from(b[8] & 0x7F) << 7)
            | usize::from(b[9] & 0x7F);
        let footer = if b[5] & 0x10 != 0 { 10 } else { 0 };
        let total = 10 + size + footer;
        if total > MAX_UNIT {
            return Parse::Skip(3);
        }
        return if b.len() < total {
            Parse::NeedMore
        } else {
            Parse::Unit(Unit {
                len: total,
                rap: true,
                media_us: None,
                header: false,
                new_headers: false,
            })
        };
    }
    match header(b) {
        Some((len, samples, sr)) => {
            if b.len() < len + 4 {
                return Parse::NeedMore;
            }
            if header(&b[len..]).is_none() && &b[len..len + 3] != b"ID3" {
                return Parse::Skip(1);
            }
            Parse::Unit(Unit {
                len,
                rap: true,
                media_us: Some(u64::from(samples) * 1_000_000 / u64::from(sr.max(1))),
                header: false,
                new_headers: false,
            })
        }
        None => match (1..b.len().saturating_sub(1)).find(|&i| b[i] == 0xFF) {
            Some(i) => Parse::Skip(i),
            None => Parse::Skip(b.len() - 1),
        },
    }
}

fn parse_mp3(b: &[u8]) -> Parse {
    parse_frames(b, mp3_header)
}

fn parse_adts(b: &[u8]) -> Parse {
    parse_frames(b, adts_header)
}
