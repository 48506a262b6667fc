//! Fragmented MP4 (ISO BMFF: fMP4 HLS segments, CMAF, `movflags=frag_keyframe`) chunking.
//!
//! The stream is walked box by box at the top level. The init segment (`ftyp`, `moov`)
//! is kept and inserted at the start of every `RANDOM_ACCESS` chunk; `moov` also gives
//! each track's id, timescale, handler (`vide`?) and `trex` defaults. Chunks are cut in
//! front of a fragment: the `moof` plus the `styp` / `sidx` / `prft` / `emsg` boxes just
//! before it. A fragment is a random access point when the first sample of its video
//! track's first `trun` is a sync sample (`trun` first-sample flags, else per-sample
//! flags, else the `tfhd` then `trex` default flags); in an audio-only stream every
//! fragment is; when the flags cannot be found the fragment counts as one (the fMP4 HLS
//! case: a segment starts with a key frame). Durations are media time from the `trun`
//! sample durations and the track's timescale (wall clock when unknown). `mdat` and any
//! other box are streamed through without being buffered whole, so a chunk may end
//! inside one (only a chunk's start matters to a joining viewer). Boxes buffered whole
//! (`ftyp`, `moov`, `moof`, the prefix boxes) are capped; garbage resynchronises on the
//! next `moof` / `ftyp` / `styp`.

use super::{Chunk, ChunkerConfig, Numbering};
use bytes::BytesMut;

/// Largest box buffered whole (`ftyp`, `moov`, `moof`, `styp`, `sidx`, ...).
const MAX_BOX: u64 = 8 * 1024 * 1024;
/// Prefix boxes (`styp`, `sidx`, ...) held for the next `moof` at most.
const MAX_PREFIX: usize = 1024 * 1024;
/// `sample_is_non_sync_sample` in ISO BMFF sample flags.
const NON_SYNC: u32 = 0x0001_0000;

#[derive(Debug, Clone, Copy, Default)]
struct Track {
    id: u32,
    timescale: u32,
    video: bool,
    default_duration: Option<u32>,
    default_flags: Option<u32>,
}

pub struct Mp4Chunker {
    cfg: ChunkerConfig,
    inbuf: BytesMut,
    /// Bytes of the current pass-through box still to come (`u64::MAX`: to the end).
    streaming: u64,
    cur: BytesMut,
    cur_inserted: usize,
    cur_rap: bool,
    /// `cur` holds media (anything but the init boxes).
    cur_media: bool,
    cur_media_us: u64,
    cur_has_media_clock: bool,
    /// `cur` began inside a fragment (a size cut): the next sync fragment starts a
    /// chunk whatever the duration.
    cur_split: bool,
    cut_wall_ms: Option<u64>,
    headers: BytesMut,
    headers_done: bool,
    prefix: BytesMut,
    tracks: Vec<Track>,
    pub dropped_bytes: u64,
}

impl Mp4Chunker {
    pub fn new(cfg: ChunkerConfig) -> Self {
        Mp4Chunker {
            cfg,
            inbuf: BytesMut::new(),
            streaming: 0,
            cur: BytesMut::new(),
            cur_inserted: 0,
            cur_rap: false,
            cur_media: false,
            cur_media_us: 0,
            cur_has_media_clock: false,
            cur_split: false,
            cut_wall_ms: None,
            headers: BytesMut::new(),
            headers_done: false,
            prefix: BytesMut::new(),
            tracks: Vec::new(),
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
        self.inbuf.extend_from_slice(data);
        loop {
            if self.streaming > 0 {
                if self.inbuf.is_empty() {
                    break;
                }
                let n = usize::try_from(self.streaming)
                    .unwrap_or(usize::MAX)
                    .min(self.inbuf.len());
                let piece = self.inbuf.split_to(n);
                if self.streaming != u64::MAX {
                    self.streaming -= n as u64;
                }
                self.media_bytes(&piece, now_ms, num, out);
                continue;
            }
            let Some((typ, hdr, size)) = box_header(&self.inbuf) else {
                if self.inbuf.len() >= 16 {
                    self.resync();
                    continue;
                }
                break;
            };
            match &typ {
                b"ftyp" | b"moov" | b"moof" | b"styp" | b"sidx" | b"prft" | b"emsg" | b"ssix" => {
                    let Some(size) = size.filter(|&s| s <= MAX_BOX) else {
                        self.resync();
                        continue;
                    };
                    let size = size as usize;
                    if self.inbuf.len() < size {
                        break;
                    }
                    let b = self.inbuf.split_to(size);
                    match &typ {
                        b"ftyp" | b"moov" => self.init_box(&typ, &b, hdr, now_ms, num, out),
                        b"moof" => self.moof(&b, hdr, now_ms, num, out),
                        _ => {
                            if self.prefix.len() + b.len() > MAX_PREFIX {
                                let p = std::mem::take(&mut self.prefix);
                                self.media_bytes(&p, now_ms, num, out);
                            }
                            self.prefix.extend_from_slice(&b);
                        }
                    }
                }
                _ => {
                    // mdat and anything else: streamed through.
                    if !self.prefix.is_empty() {
                        let p = std::mem::take(&mut self.prefix);
                        self.media_bytes(&p, now_ms, num, out);
                    }
                    let head = self.inbuf.split_to(hdr);
                    self.streaming = match size {
                        Some(s) => s - hdr as u64,
                        None => u64::MAX,
                    };
                    self.media_bytes(&head, now_ms, num, out);
                }
            }
        }
    }

    fn init_box(
        &mut self,
        typ: &[u8; 4],
        b: &[u8],
        hdr: usize,
        now_ms: u64,
        num: &mut Numbering,
        out: &mut Vec<Chunk>,
    ) {
        if self.headers_done {
            // A new init segment mid-stream: new headers, and a cut before them.
            self.headers.clear();
            self.tracks.clear();
            self.headers_done = false;
            if self.cur_media {
                self.cut(false, now_ms, num, out);
            }
        }
        if typ == b"moov" {
            self.tracks = parse_moov(&b[hdr..]);
        }
        self.headers.extend_from_slice(b);
        self.cur.extend_from_slice(b);
    }

    fn moof(
        &mut self,
        b: &[u8],
        hdr: usize,
        now_ms: u64,
        num: &mut Numbering,
        out: &mut Vec<Chunk>,
    ) {
        self.headers_done = true;
        let (rap, media_us) = fragment_info(&b[hdr..], &self.tracks);
        let prefix = std::mem::take(&mut self.prefix);
        if self.cur_media {
            let target = u64::from(self.cfg.target_ms);
            let elapsed = self.elapsed_ms(now_ms);
            let full = self.cur.len() + prefix.len() + b.len() > self.cfg.max_bytes;
            if rap && (elapsed >= target || full || self.cur_split) {
                self.cut(true, now_ms, num, out);
            } else if full || elapsed >= target * 3 {
                self.cut(false, now_ms, num, out);
            }
        } else {
            self.cur_rap = rap;
        }
        if self.cur.is_empty()
            && self.cur_rap
            && !self.headers.is_empty()
            && self.headers.len() <= self.cfg.max_bytes / 2
        {
            self.cur.extend_from_slice(&self.headers);
            self.cur_inserted = self.headers.len();
        }
        self.cur.extend_from_slice(&prefix);
        self.cur.extend_from_slice(b);
        self.cur_media = true;
        if let Some(us) = media_us {
            self.cur_media_us += us;
            self.cur_has_media_clock = true;
        }
    }

    /// Bytes that are no cut point: appended, cutting (not random access) at the cap.
    fn media_bytes(
        &mut self,
        mut piece: &[u8],
        now_ms: u64,
        num: &mut Numbering,
        out: &mut Vec<Chunk>,
    ) {
        while !piece.is_empty() {
            let room = self.cfg.max_bytes.saturating_sub(self.cur.len());
            if room == 0 {
                self.cut(false, now_ms, num, out);
                self.cur_split = true;
                continue;
            }
            let take = room.min(piece.len());
            self.cur.extend_from_slice(&piece[..take]);
            self.cur_media = true;
            piece = &piece[take..];
        }
    }

    fn elapsed_ms(&self, now_ms: u64) -> u64 {
        if self.cur_has_media_clock {
            self.cur_media_us / 1000
        } else {
            now_ms.saturating_sub(self.cut_wall_ms.unwrap_or(now_ms))
        }
    }

    fn cut(&mut self, next_rap: bool, now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        let duration = self.elapsed_ms(now_ms);
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
        self.cur_media = false;
        self.cur_media_us = 0;
        self.cur_has_media_clock = false;
        self.cur_split = false;
        self.cur_rap = next_rap;
        self.cut_wall_ms = Some(now_ms);
    }

    /// Skips garbage up to the next plausible `moof` / `ftyp` / `styp` box.
    fn resync(&mut self) {
        let b = &self.inbuf[..];
        let found = (5..b.len().saturating_sub(3))
            .find(|&i| matches!(&b[i..i + 4], b"moof" | b"ftyp" | b"styp"))
            .map(|i| i - 4);
        let n = found
            .unwrap_or(b.len().saturating_sub(7))
            .max(1)
            .min(b.len());
        self.dropped_bytes += n as u64;
        let _ = self.inbuf.split_to(n);
    }

    pub(crate) fn flush(&mut self, now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        if !self.prefix.is_empty() {
            let p = std::mem::take(&mut self.prefix);
            self.media_bytes(&p, now_ms, num, out);
        }
        if !self.cur.is_empty() {
            self.cut(false, now_ms, num, out);
        }
        self.cur_rap = false;
        // An incomplete box at the end of a session is lost.
        self.dropped_bytes += self.inbuf.len() as u64;
        self.inbuf.clear();
        self.streaming = 0;
        self.headers.clear();
        self.headers_done = false;
        self.tracks.clear();
    }
}

/// (type, header length, total size; `None` = to the end of the stream) of the box at
/// the start of `b`; `None` when more bytes are needed or the header is garbage (the
/// caller resyncs once 16 bytes are buffered).
fn box_header(b: &[u8]) -> Option<([u8; 4], usize, Option<u64>)> {
    if b.len() < 8 {
        return None;
    }
    let size = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let typ = [b[4], b[5], b[6], b[7]];
    if !typ.iter().all(|c| (0x20..0x7F).contains(c)) {
        return None;
    }
    match size {
        0 => Some((typ, 8, None)),
        1 => {
            if b.len() < 16 {
                return None;
            }
            let large = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
            (large >= 16).then_some((typ, 16, Some(large)))
        }
        s if s >= 8 => Some((typ, 8, Some(u64::from(s)))),
        _ => None,
    }
}

/// The child boxes of a box body: (type, body). Stops at the first malformed one.
fn children(mut b: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    std::iter::from_fn(move || {
        let (typ, hdr, size) = box_header(b)?;
        let size = usize::try_from(size.unwrap_or(b.len() as u64)).ok()?;
        if size < hdr || size > b.len() {
            return None;
        }
        let body = &b[hdr..size];
        b = &b[size..];
        Some((typ, body))
    })
}

fn child<'a>(b: &'a [u8], want: &[u8; 4]) -> Option<&'a [u8]> {
    children(b).find(|(t, _)| t == want).map(|(_, body)| body)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Tracks from a `moov` body: id, timescale, video or not, `trex` defaults.
fn parse_moov(moov: &[u8]) -> Vec<Track> {
    let mut tracks = Vec::new();
    for (typ, body) in children(moov) {
        if &typ != b"trak" || tracks.len() >= 64 {
            continue;
        }
        let Some(tkhd) = child(body, b"tkhd") else {
            continue;
        };
        let id_at = if tkhd.first() == Some(&1) { 20 } else { 12 };
        let Some(id) = be32(tkhd, id_at) else {
            continue;
        };
        let mdia = child(body, b"mdia").unwrap_or(&[]);
        let timescale = child(mdia, b"mdhd")
            .and_then(|m| be32(m, if m.first() == Some(&1) { 20 } else { 12 }))
            .unwrap_or(0);
        let video = child(mdia, b"hdlr").and_then(|h| h.get(8..12)) == Some(b"vide");
        tracks.push(Track {
            id,
            timescale,
            video,
            ..Track::default()
        });
    }
    if let Some(mvex) = child(moov, b"mvex") {
        for (typ, trex) in children(mvex) {
            if &typ != b"trex" {
                continue;
            }
            let id = be32(trex, 4);
            if let Some(t) = tracks.iter_mut().find(|t| Some(t.id) == id) {
                t.default_duration = be32(trex, 12);
                t.default_flags = be32(trex, 20);
            }
        }
    }
    tracks
}

/// (random access, media duration in µs) of a `moof` body.
fn fragment_info(moof: &[u8], tracks: &[Track]) -> (bool, Option<u64>) {
    let has_video = tracks.iter().any(|t| t.video);
    let mut chosen = None;
    for (typ, traf) in children(moof) {
        if &typ != b"traf" {
            continue;
        }
        let Some(tfhd) = child(traf, b"tfhd") else {
            continue;
        };
        let Some(id) = be32(tfhd, 4) else { continue };
        let track = tracks.iter().find(|t| t.id == id).copied();
        let is_video = track.is_some_and(|t| t.video);
        if (has_video && is_video) || (!has_video && chosen.is_none()) {
            chosen = Some((traf, tfhd, track.unwrap_or_default()));
            if is_video {
                break;
            }
        }
    }
    let Some((traf, tfhd, track)) = chosen else {
        // A fragment without the video track (or without any track fragment).
        return (!has_video, None);
    };
    let tf_flags = be32(tfhd, 0).unwrap_or(0) & 0x00FF_FFFF;
    let mut at = 8;
    if tf_flags & 0x1 != 0 {
        at += 8;
    }
    if tf_flags & 0x2 != 0 {
        at += 4;
    }
    let mut default_duration = track.default_duration;
    if tf_flags & 0x8 != 0 {
        default_duration = be32(tfhd, at);
        at += 4;
    }
    if tf_flags & 0x10 != 0 {
        at += 4;
    }
    let default_flags = if tf_flags & 0x20 != 0 {
        be32(tfhd, at)
    } else {
        track.default_flags
    };
    let mut first_flags: Option<Option<u32>> = None;
    let mut total: u64 = 0;
    let mut duration_known = true;
    for (typ, trun) in children(traf) {
        if &typ != b"trun" {
            continue;
        }
        let (Some(vf), Some(count)) = (be32(trun, 0), be32(trun, 4)) else {
            continue;
        };
        let f = vf & 0x00FF_FFFF;
        let mut at = 8;
        if f & 0x1 != 0 {
            at += 4;
        }
        let first_sample_flags = if f & 0x4 != 0 {
            at += 4;
            be32(trun, at - 4)
        } else {
            None
        };
        let entry = [0x100, 0x200, 0x400, 0x800]
            .iter()
            .filter(|&&bit| f & bit != 0)
            .count()
            * 4;
        // Never trust the count beyond what the box holds.
        let count = match trun.len().saturating_sub(at).checked_div(entry) {
            Some(fits) => (count as usize).min(fits),
            None => count as usize,
        };
        if count > 0 && first_flags.is_none() {
            first_flags = Some(first_sample_flags.or_else(|| {
                if f & 0x400 != 0 {
                    let off = at
                        + if f & 0x100 != 0 { 4 } else { 0 }
                        + if f & 0x200 != 0 { 4 } else { 0 };
                    be32(trun, off)
                } else {
                    default_flags
                }
            }));
        }
        if f & 0x100 != 0 {
            for i in 0..count {
                total += u64::from(be32(trun, at + i * entry).unwrap_or(0));
            }
        } else if let Some(d) = default_duration {
            total += u64::from(d) * count as u64;
        } else {
            duration_known = false;
        }
    }
    let rap = match first_flags {
        Some(Some(flags)) => flags & NON_SYNC == 0,
        // No flags anywhere: assume the fragment starts with a sync sample.
        Some(None) | None => true,
    };
    let media_us = (duration_known && track.timescale > 0)
        .then(|| total.saturating_mul(1_000_000) / u64::from(track.timescale));
    (rap, media_us)
}
