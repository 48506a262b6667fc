//! MPEG-TS chunking: packet sync, PAT/PMT tracking, PCR/PTS clock, random access
//! detection and header insertion. See the module docs of [`super`].

use super::{ChunkerConfig, Numbering};
use crate::chunker::Chunk;
use bytes::{BufMut, BytesMut};

pub const PACKET: usize = 188;
const SYNC: u8 = 0x47;
/// PCR/PTS clock wraps at 2^33 ticks of 90 kHz (times 300 for 27 MHz).
const CLOCK_WRAP: u64 = (1u64 << 33) * 300;
/// Jumps larger than this are clock discontinuities, not elapsed time.
const MAX_CLOCK_STEP: u64 = 27_000_000 * 60;

/// True when `data` starts with three TS sync bytes 188 bytes apart (or fewer bytes
/// are available but all present sync positions match and there are at least two).
pub fn looks_like_ts(data: &[u8]) -> bool {
    data.len() > PACKET * 2 && data[0] == SYNC && data[PACKET] == SYNC && data[PACKET * 2] == SYNC
}

fn pid_of(p: &[u8]) -> u16 {
    (u16::from(p[1] & 0x1F) << 8) | u16::from(p[2])
}

fn pusi(p: &[u8]) -> bool {
    p[1] & 0x40 != 0
}

/// (adaptation field slice, payload offset) of a packet.
fn split_packet(p: &[u8]) -> (Option<&[u8]>, Option<usize>) {
    let afc = (p[3] >> 4) & 0x3;
    let mut off = 4;
    let mut af = None;
    if afc & 0x2 != 0 {
        let len = usize::from(p[4]);
        if 5 + len > PACKET {
            return (None, None);
        }
        af = Some(&p[5..5 + len]);
        off = 5 + len;
    }
    let payload = if afc & 0x1 != 0 && off < PACKET {
        Some(off)
    } else {
        None
    };
    (af, payload)
}

fn pcr_of(af: &[u8]) -> Option<u64> {
    if af.len() >= 7 && af[0] & 0x10 != 0 {
        let base = (u64::from(af[1]) << 25)
            | (u64::from(af[2]) << 17)
            | (u64::from(af[3]) << 9)
            | (u64::from(af[4]) << 1)
            | (u64::from(af[5]) >> 7);
        let ext = (u64::from(af[5] & 1) << 8) | u64::from(af[6]);
        Some(base * 300 + ext)
    } else {
        None
    }
}

fn random_access_indicator(af: &[u8]) -> bool {
    !af.is_empty() && af[0] & 0x40 != 0
}

/// PTS (in 27 MHz units) of a PES starting in `payload`, if present.
fn pes_pts(payload: &[u8]) -> Option<u64> {
    if payload.len() < 14 || payload[..3] != [0, 0, 1] {
        return None;
    }
    if payload[7] & 0x80 == 0 {
        return None;
    }
    let b = &payload[9..14];
    let pts = (u64::from(b[0] >> 1) & 0x07) << 30
        | u64::from(b[1]) << 22
        | (u64::from(b[2]) >> 1) << 15
        | u64::from(b[3]) << 7
        | u64::from(b[4]) >> 1;
    Some(pts * 300)
}

/// Elementary stream payload after the PES header.
fn pes_es(payload: &[u8]) -> Option<&[u8]> {
    if payload.len() < 9 || payload[..3] != [0, 0, 1] {
        return None;
    }
    let start = 9 + usize::from(payload[8]);
    payload.get(start..)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    H264,
    Hevc,
    Mpeg2,
    OtherVideo,
    Audio,
}

/// Whether the ES bytes at the start of a video PES contain a key frame marker.
fn es_has_keyframe(codec: Codec, es: &[u8]) -> bool {
    let mut i = 0;
    while i + 3 < es.len() {
        if es[i] == 0 && es[i + 1] == 0 && es[i + 2] == 1 {
            let b = es[i + 3];
            let key = match codec {
                Codec::H264 => matches!(b & 0x1F, 5 | 7),
                Codec::Hevc => matches!((b >> 1) & 0x3F, 16..=21 | 32..=34),
                Codec::Mpeg2 => b == 0xB3,
                Codec::OtherVideo | Codec::Audio => false,
            };
            if key {
                return true;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    false
}

/// A PSI section that fits in this packet: returns the section bytes (from table_id).
fn psi_section(p: &[u8]) -> Option<&[u8]> {
    if !pusi(p) {
        return None;
    }
    let (_, off) = split_packet(p);
    let off = off?;
    let pointer = usize::from(p[off]);
    let start = off + 1 + pointer;
    let sec = p.get(start..)?;
    if sec.len() < 3 {
        return None;
    }
    let len = (usize::from(sec[1] & 0x0F) << 8) | usize::from(sec[2]);
    sec.get(..3 + len)
}

fn parse_pat(p: &[u8]) -> Option<u16> {
    let sec = psi_section(p)?;
    if sec[0] != 0x00 || sec.len() < 12 {
        return None;
    }
    let body = &sec[8..sec.len() - 4];
    body.chunks_exact(4).find_map(|e| {
        let program = u16::from_be_bytes([e[0], e[1]]);
        (program != 0).then(|| (u16::from(e[2] & 0x1F) << 8) | u16::from(e[3]))
    })
}

struct PmtInfo {
    pcr_pid: u16,
    rap: Option<(u16, Codec)>,
}

fn parse_pmt(p: &[u8]) -> Option<PmtInfo> {
    let sec = psi_section(p)?;
    if sec[0] != 0x02 || sec.len() < 16 {
        return None;
    }
    let pcr_pid = (u16::from(sec[8] & 0x1F) << 8) | u16::from(sec[9]);
    let pil = (usize::from(sec[10] & 0x0F) << 8) | usize::from(sec[11]);
    let end = sec.len() - 4;
    let mut i = 12 + pil;
    let mut video = None;
    let mut audio = None;
    while i + 5 <= end {
        let st = sec[i];
        let pid = (u16::from(sec[i + 1] & 0x1F) << 8) | u16::from(sec[i + 2]);
        let esl = (usize::from(sec[i + 3] & 0x0F) << 8) | usize::from(sec[i + 4]);
        let codec = match st {
            0x1B => Some(Codec::H264),
            0x24 => Some(Codec::Hevc),
            0x01 | 0x02 => Some(Codec::Mpeg2),
            0x10 | 0x42 | 0xEA | 0xD1 | 0x33 => Some(Codec::OtherVideo),
            _ => None,
        };
        if let Some(c) = codec {
            video.get_or_insert((pid, c));
        } else if matches!(st, 0x03 | 0x04 | 0x0F | 0x11 | 0x06 | 0x81 | 0x87) {
            audio.get_or_insert((pid, Codec::Audio));
        }
        i += 5 + esl;
    }
    Some(PmtInfo {
        pcr_pid,
        rap: video.or(audio),
    })
}

/// The MPEG-TS chunker.
pub struct TsChunker {
    cfg: ChunkerConfig,
    /// Unparsed input (partial packets, bytes waiting for sync confirmation).
    inbuf: Vec<u8>,
    synced: bool,
    /// Bytes dropped while searching for sync.
    pub dropped_bytes: u64,
    cur: BytesMut,
    cur_inserted: usize,
    cur_rap: bool,
    /// A PES start on the random-access PID has been appended to `cur`.
    cur_has_rap_pid: bool,
    /// Offset in `cur` of a PAT packet immediately followed by a PMT packet within
    /// the trailing run of PSI/null packets.
    run_pat_pmt: Option<usize>,
    /// Offset of the last PAT in the trailing PSI run.
    run_last_pat: Option<usize>,
    pat: Option<[u8; PACKET]>,
    pmt: Option<[u8; PACKET]>,
    pmt_pid: Option<u16>,
    pcr_pid: Option<u16>,
    rap: Option<(u16, Codec)>,
    pcr_seen: bool,
    last_clock: Option<u64>,
    cut_clock: Option<u64>,
    cut_wall_ms: Option<u64>,
}

impl TsChunker {
    pub fn new(cfg: ChunkerConfig) -> Self {
        TsChunker {
            cfg,
            inbuf: Vec::with_capacity(PACKET * 8),
            synced: false,
            dropped_bytes: 0,
            cur: BytesMut::new(),
            cur_inserted: 0,
            cur_rap: false,
            cur_has_rap_pid: false,
            run_pat_pmt: None,
            run_last_pat: None,
            pat: None,
            pmt: None,
            pmt_pid: None,
            pcr_pid: None,
            rap: None,
            pcr_seen: false,
            last_clock: None,
            cut_clock: None,
            cut_wall_ms: None,
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
        let mut pos = 0;
        loop {
            if !self.synced {
                // Find three sync bytes 188 apart.
                let buf = &self.inbuf[pos..];
                let mut found = None;
                let mut i = 0;
                while i + PACKET * 2 < buf.len() {
                    if buf[i] == SYNC && buf[i + PACKET] == SYNC && buf[i + PACKET * 2] == SYNC {
                        found = Some(i);
                        break;
                    }
                    i += 1;
                }
                match found {
                    Some(i) => {
                        self.dropped_bytes += i as u64;
                        pos += i;
                        self.synced = true;
                    }
                    None => {
                        // Keep only what could still hold the start of a sync run.
                        let keep = (PACKET * 2).min(buf.len());
                        let drop = buf.len() - keep;
                        self.dropped_bytes += drop as u64;
                        pos += drop;
                        break;
                    }
                }
            }
            if self.inbuf.len() - pos < PACKET {
                break;
            }
            if self.inbuf[pos] != SYNC {
                self.synced = false;
                continue;
            }
            let mut pkt = [0u8; PACKET];
            pkt.copy_from_slice(&self.inbuf[pos..pos + PACKET]);
            pos += PACKET;
            self.packet(&pkt, now_ms, num, out);
        }
        self.inbuf.drain(..pos);
    }

    fn elapsed_clock_ms(&self) -> Option<u64> {
        let (a, b) = (self.cut_clock?, self.last_clock?);
        Some(((b + CLOCK_WRAP - a) % CLOCK_WRAP) / 27_000)
    }

    fn update_clock(&mut self, c: u64) {
        // A PCR extension above 299 (invalid, but on the wire) puts the clock past the
        // wrap; reduce it so every difference below stays in range.
        let c = c % CLOCK_WRAP;
        if let Some(prev) = self.last_clock {
            let step = (c + CLOCK_WRAP - prev) % CLOCK_WRAP;
            if step > MAX_CLOCK_STEP {
                // Discontinuity (or PTS reordering going backwards): restart timing.
                if (prev + CLOCK_WRAP - c) % CLOCK_WRAP > MAX_CLOCK_STEP {
                    self.cut_clock = Some(c);
                    self.last_clock = Some(c);
                }
                return;
            }
        }
        self.last_clock = Some(c);
        self.cut_clock.get_or_insert(c);
    }

    fn packet(&mut self, p: &[u8; PACKET], now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        let pid = pid_of(p);
        let (af, payload_off) = split_packet(p);
        let is_pusi = pusi(p);

        // Program tables.
        let mut is_psi = pid < 0x20 || pid == 0x1FFF;
        if pid == 0 {
            if let Some(pmt_pid) = parse_pat(p) {
                self.pat = Some(*p);
                if self.pmt_pid != Some(pmt_pid) {
                    self.pmt_pid = Some(pmt_pid);
                    self.pmt = None;
                }
            }
        } else if Some(pid) == self.pmt_pid {
            is_psi = true;
            if let Some(info) = parse_pmt(p) {
                self.pmt = Some(*p);
                self.pcr_pid = Some(info.pcr_pid);
                self.rap = info.rap;
            }
        }

        // Clock.
        if let Some(pcr) = af.and_then(pcr_of)
            && Some(pid) == self.pcr_pid
        {
            if !self.pcr_seen {
                self.pcr_seen = true;
                self.cut_clock = None;
                self.last_clock = None;
            }
            self.update_clock(pcr);
        } else if !self.pcr_seen
            && is_pusi
            && self.rap.map(|r| r.0) == Some(pid)
            && let Some(pts) = payload_off.and_then(|o| pes_pts(&p[o..]))
        {
            self.update_clock(pts);
        }

        // Random access point?
        let mut rap_here = false;
        if let Some((rpid, codec)) = self.rap
            && rpid == pid
            && is_pusi
        {
            rap_here = match codec {
                Codec::Audio => true,
                _ => {
                    af.is_some_and(random_access_indicator)
                        || payload_off
                            .and_then(|o| pes_es(&p[o..]))
                            .is_some_and(|es| es_has_keyframe(codec, es))
                }
            } && self.pat.is_some()
                && self.pmt.is_some();
        }

        // Cut decisions, before appending this packet.
        let target = u64::from(self.cfg.target_ms);
        let wall = now_ms.saturating_sub(self.cut_wall_ms.unwrap_or(now_ms));
        let elapsed = self.elapsed_clock_ms().unwrap_or(wall);
        if rap_here {
            if !self.cur_has_rap_pid && !self.cur_rap {
                // Nothing decodable cut yet in this chunk: it becomes random access.
                self.cur_rap = true;
            } else if elapsed >= target {
                self.cut_rap(now_ms, num, out);
            }
        } else if !self.cur.is_empty()
            && (self.cur.len() + PACKET > self.limit()
                || elapsed >= target * 3
                || wall >= target * 3 + 2000)
        {
            self.cut_at(self.cur.len(), false, now_ms, num, out);
        }

        // Append.
        if !self.cur.is_empty() && self.cur.len() + PACKET > self.limit() {
            // A random access point arrived on a full chunk: force-cut.
            self.cut_at(self.cur.len(), rap_here, now_ms, num, out);
        }
        let off = self.cur.len();
        self.cur.put_slice(p);
        if pid == 0 {
            self.run_last_pat = Some(off);
        } else if Some(pid) == self.pmt_pid {
            if self.run_last_pat.is_some_and(|o| o + PACKET == off) {
                self.run_pat_pmt = self.run_last_pat;
            }
        } else if !is_psi {
            self.run_last_pat = None;
            self.run_pat_pmt = None;
        }
        if self.rap.map(|r| r.0) == Some(pid) && is_pusi {
            self.cur_has_rap_pid = true;
        }
    }

    /// Size cap for `cur`, leaving room for PAT+PMT copies inserted at emit time.
    fn limit(&self) -> usize {
        if self.cur_rap {
            self.cfg.max_bytes - 2 * PACKET
        } else {
            self.cfg.max_bytes
        }
    }

    /// Cut before the current packet, at the trailing PAT+PMT if there is one.
    fn cut_rap(&mut self, now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        let at = self.run_pat_pmt.unwrap_or(self.cur.len());
        self.cut_at(at, true, now_ms, num, out);
    }

    fn cut_at(
        &mut self,
        at: usize,
        next_rap: bool,
        now_ms: u64,
        num: &mut Numbering,
        out: &mut Vec<Chunk>,
    ) {
        let tail = self.cur.split_off(at.min(self.cur.len()));
        self.emit_cur(now_ms, num, out);
        self.cur_has_rap_pid = false;
        self.run_last_pat = None;
        self.run_pat_pmt = None;
        self.cur_rap = next_rap;
        self.cur_inserted = 0;
        self.cur = tail;
        if !self.cur.is_empty() {
            // The tail is the PSI run [PAT, PMT, ...]: re-establish its offsets.
            self.run_last_pat = Some(0);
            self.run_pat_pmt = Some(0);
        }
    }

    fn emit_cur(&mut self, now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        let duration = self
            .elapsed_clock_ms()
            .unwrap_or_else(|| now_ms.saturating_sub(self.cut_wall_ms.unwrap_or(now_ms)));
        self.cut_clock = self.last_clock;
        self.cut_wall_ms = Some(now_ms);
        let mut payload = std::mem::take(&mut self.cur);
        let mut inserted = self.cur_inserted;
        let rap = self.cur_rap;
        if rap
            && !self.starts_with_pat_pmt(&payload)
            && let (Some(pat), Some(pmt)) = (&self.pat, &self.pmt)
        {
            let mut b = BytesMut::with_capacity(payload.len() + 2 * PACKET);
            b.put_slice(pat);
            b.put_slice(pmt);
            b.put_slice(&payload);
            payload = b;
            inserted += 2 * PACKET;
        }
        let rap = rap && self.starts_with_pat_pmt(&payload);
        num.emit(payload, inserted, rap, duration, now_ms, out);
    }

    fn starts_with_pat_pmt(&self, b: &[u8]) -> bool {
        b.len() >= 2 * PACKET
            && b[0] == SYNC
            && pid_of(&b[..PACKET]) == 0
            && b[PACKET] == SYNC
            && Some(pid_of(&b[PACKET..2 * PACKET])) == self.pmt_pid
    }

    /// End of session: emit what is buffered (whole packets only).
    pub(crate) fn flush(&mut self, now_ms: u64, num: &mut Numbering, out: &mut Vec<Chunk>) {
        self.emit_cur(now_ms, num, out);
        self.inbuf.clear();
        self.synced = false;
        self.cur_rap = false;
        self.cur_has_rap_pid = false;
        self.run_last_pat = None;
        self.run_pat_pmt = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `ts_chunker` fuzz target: a PCR with an out-of-range extension
    /// (511 > 299) at the top of the base range is past the clock's wrap, and the next
    /// clock's step was computed with an overflowing subtraction.
    #[test]
    fn a_clock_past_the_wrap_is_reduced() {
        let mut c = TsChunker::new(ChunkerConfig::default());
        let past = ((1u64 << 33) - 1) * 300 + 511;
        assert!(past >= CLOCK_WRAP);
        c.update_clock(past);
        assert_eq!(c.last_clock, Some(past - CLOCK_WRAP));
        c.update_clock(0);
        c.update_clock(past);
        c.update_clock(27_000);
        assert!(c.last_clock.is_some_and(|v| v < CLOCK_WRAP));
        assert!(c.elapsed_clock_ms().is_some_and(|ms| ms < 60_000));
    }
}
