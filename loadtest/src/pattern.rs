//! The synthetic stream's bytes, and the check that a peer's output is that stream.
//!
//! Byte `o` of the stream is byte `o % 8` (little-endian) of the 64-bit word
//! `P(seed, o / 8)`, where `P` is a keyed *bijection* on `u64` (two rounds of the
//! splitmix64 finaliser around key XORs). Because `P` can be inverted, any 16
//! consecutive stream bytes tell their own absolute offset: invert the word at each of
//! the 8 possible alignments and accept the one whose next word is `P(k + 1)` (a false
//! match has probability 2^-64). So the checker needs neither a chunk-sequence → offset
//! map nor a copy of the stream: it locates every chunk payload it is handed and
//! compares it byte for byte with the recomputed source.

/// The keyed pattern of one synthetic stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    k0: u64,
    k1: u64,
}

const M1: u64 = 0xbf58_476d_1ce4_e5b9;
const M2: u64 = 0x94d0_49bb_1331_11eb;
const M1_INV: u64 = mod_inverse(M1);
const M2_INV: u64 = mod_inverse(M2);

/// Inverse of an odd `a` modulo 2^64 (Newton iteration).
const fn mod_inverse(a: u64) -> u64 {
    let mut x = a; // correct to 3 bits for odd a
    let mut i = 0;
    while i < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}

fn unxorshift(y: u64, s: u32) -> u64 {
    let mut r = y;
    let mut t = y >> s;
    while t != 0 {
        r ^= t;
        t >>= s;
    }
    r
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(M1);
    x ^= x >> 27;
    x = x.wrapping_mul(M2);
    x ^ (x >> 31)
}

fn unmix(mut x: u64) -> u64 {
    x = unxorshift(x, 31);
    x = x.wrapping_mul(M2_INV);
    x = unxorshift(x, 27);
    x = x.wrapping_mul(M1_INV);
    unxorshift(x, 30)
}

impl Pattern {
    /// The pattern keyed by `seed`.
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            k0: mix(seed ^ 0x5354_4152_4c49_4e47),
            k1: mix(seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// Word `k` (stream bytes `8k..8k+8`, little-endian).
    pub fn word(&self, k: u64) -> u64 {
        mix(mix(k ^ self.k0) ^ self.k1)
    }

    /// The `k` with `word(k) == w`.
    pub fn index_of(&self, w: u64) -> u64 {
        unmix(unmix(w) ^ self.k1) ^ self.k0
    }

    /// Byte at absolute stream offset `offset`.
    pub fn byte(&self, offset: u64) -> u8 {
        self.word(offset / 8).to_le_bytes()[(offset % 8) as usize]
    }

    /// Fills `buf` with the stream bytes starting at `offset`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut k = offset / 8;
        let mut skip = (offset % 8) as usize;
        let mut i = 0;
        while i < buf.len() {
            let w = self.word(k).to_le_bytes();
            let n = (8 - skip).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&w[skip..skip + n]);
            i += n;
            skip = 0;
            k += 1;
        }
    }

    /// `len` stream bytes starting at `offset`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(offset, &mut v);
        v
    }

    /// Whether `data` equals the stream at `offset`.
    pub fn matches(&self, offset: u64, data: &[u8]) -> bool {
        self.first_mismatch(offset, data).is_none()
    }

    /// Index in `data` of the first byte that differs from the stream at `offset`.
    pub fn first_mismatch(&self, offset: u64, data: &[u8]) -> Option<usize> {
        let mut buf = [0u8; 4096];
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(buf.len());
            self.fill(offset + done as u64, &mut buf[..n]);
            if buf[..n] != data[done..done + n] {
                let i = buf[..n]
                    .iter()
                    .zip(&data[done..done + n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Some(done + i);
            }
            done += n;
        }
        None
    }

    /// The absolute stream offset of `data[0]`, found from two consecutive aligned words
    /// in its first 23 bytes; `None` if `data` is too short for that or is not part of
    /// this stream.
    pub fn locate(&self, data: &[u8]) -> Option<u64> {
        for s in 0..8usize {
            let (Some(a), Some(b)) = (data.get(s..s + 8), data.get(s + 8..s + 16)) else {
                return None;
            };
            let (Ok(a), Ok(b)) = (<[u8; 8]>::try_from(a), <[u8; 8]>::try_from(b)) else {
                return None;
            };
            let k = self.index_of(u64::from_le_bytes(a));
            if self.word(k.wrapping_add(1)) == u64::from_le_bytes(b) {
                let start = k.checked_mul(8).and_then(|o| o.checked_sub(s as u64));
                if let Some(o) = start {
                    return Some(o);
                }
            }
        }
        None
    }

    /// Whether a response may start at `offset`: its first byte must not make the data
    /// plane's format sniffer guess a framed format (Ogg `O`, WebM `0x1A`, ID3 `I`,
    /// MPEG-TS `0x47`, MP3/ADTS `0xFF`), so that the stream is always cut as raw bytes.
    pub fn is_raw_start(&self, offset: u64) -> bool {
        !matches!(self.byte(offset), b'O' | 0x1A | b'I' | 0x47 | 0xFF)
    }

    /// The first offset at or after `offset` where a response may start.
    pub fn raw_start_at_or_after(&self, offset: u64) -> u64 {
        let mut o = offset;
        while !self.is_raw_start(o) {
            o += 1;
        }
        o
    }
}

/// What the check of one peer's output found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputCheck {
    /// Chunk payloads checked.
    pub chunks: u64,
    /// Bytes checked (all of them, byte for byte).
    pub bytes: u64,
    /// Stream offset of the first byte of output.
    pub first_offset: Option<u64>,
    /// Stream offset just past the last byte of output.
    pub next_offset: Option<u64>,
    /// Forward jumps between consecutive payloads (chunks skipped).
    pub gaps: u64,
    /// Stream bytes missing in those jumps.
    pub gap_bytes: u64,
    /// Payloads that start before the end of the previous one (duplication or
    /// reordering).
    pub regressions: u64,
    /// Payloads with bytes that are not the source's (wrong bytes, or not locatable).
    pub mismatches: u64,
    /// Description of the first few problems.
    pub problems: Vec<String>,
}

const MAX_PROBLEMS: usize = 8;

impl OutputCheck {
    fn problem(&mut self, s: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(s);
        }
    }

    /// Checks the next payload of the output against `pattern`.
    pub fn feed(&mut self, pattern: &Pattern, data: &[u8]) {
        self.chunks += 1;
        self.bytes += data.len() as u64;
        if data.is_empty() {
            return;
        }
        // Fast path: the payload continues the stream exactly.
        if let Some(e) = self.next_offset
            && pattern.matches(e, data)
        {
            self.next_offset = Some(e + data.len() as u64);
            return;
        }
        let Some(o) = pattern.locate(data) else {
            self.mismatches += 1;
            let n = self.chunks;
            self.problem(format!(
                "payload #{n} ({} bytes) is not part of the source stream",
                data.len()
            ));
            // Whatever comes next is located afresh.
            self.next_offset = None;
            return;
        };
        if let Some(i) = pattern.first_mismatch(o, data) {
            self.mismatches += 1;
            let n = self.chunks;
            self.problem(format!(
                "payload #{n} at offset {o}: byte {i} of {} differs from the source",
                data.len()
            ));
        }
        match self.next_offset {
            None if self.first_offset.is_none() => self.first_offset = Some(o),
            None => {}
            Some(e) if o > e => {
                self.gaps += 1;
                self.gap_bytes += o - e;
            }
            Some(e) => {
                self.regressions += 1;
                let n = self.chunks;
                self.problem(format!(
                    "payload #{n} starts at offset {o}, before the end of the previous one ({e}): duplicated or reordered"
                ));
            }
        }
        self.next_offset = Some(o + data.len() as u64);
    }

    /// Whether every byte was the source's, with no duplication or reordering.
    pub fn identical(&self) -> bool {
        self.mismatches == 0 && self.regressions == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn permutation_inverts() {
        let p = Pattern::new(42);
        for k in [0, 1, 2, 12345, u64::MAX, u64::MAX / 3] {
            assert_eq!(p.index_of(p.word(k)), k);
        }
        assert_eq!(M1.wrapping_mul(M1_INV), 1);
        assert_eq!(M2.wrapping_mul(M2_INV), 1);
    }

    #[test]
    fn fill_matches_byte() {
        let p = Pattern::new(7);
        let v = p.bytes(13, 100);
        for (i, b) in v.iter().enumerate() {
            assert_eq!(*b, p.byte(13 + i as u64));
        }
    }

    #[test]
    fn locate_any_offset() {
        let p = Pattern::new(9);
        for o in [0u64, 1, 7, 8, 9, 1_000_003, 77_777_777] {
            assert_eq!(p.locate(&p.bytes(o, 23)), Some(o), "offset {o}");
            assert_eq!(p.locate(&p.bytes(o, 4000)), Some(o), "offset {o}");
        }
        assert_eq!(p.locate(&p.bytes(5, 15)), None);
        assert_eq!(Pattern::new(10).locate(&p.bytes(5, 64)), None);
        assert_eq!(p.locate(&[0u8; 64]), None);
    }

    #[test]
    fn check_clean_gap_dup_and_corruption() {
        let p = Pattern::new(1);
        let mut c = OutputCheck::default();
        c.feed(&p, &p.bytes(1000, 500));
        c.feed(&p, &p.bytes(1500, 500));
        assert!(c.identical());
        assert_eq!(
            (c.gaps, c.first_offset, c.next_offset),
            (0, Some(1000), Some(2000))
        );
        // A skipped chunk is a gap, not an identity failure.
        c.feed(&p, &p.bytes(2500, 500));
        assert_eq!((c.gaps, c.gap_bytes), (1, 500));
        assert!(c.identical());
        // A repeated chunk is a regression.
        c.feed(&p, &p.bytes(2500, 500));
        assert_eq!(c.regressions, 1);
        assert!(!c.identical());
        // A flipped byte is a mismatch.
        let mut c = OutputCheck::default();
        let mut b = p.bytes(0, 300);
        b[200] ^= 1;
        c.feed(&p, &b);
        assert_eq!(c.mismatches, 1);
        // Garbage is a mismatch.
        c.feed(&p, &[1u8; 300]);
        assert_eq!(c.mismatches, 2);
        assert!(!c.identical());
        assert_eq!(c.problems.len(), 2);
    }

    #[test]
    fn raw_starts_avoid_sniffable_bytes() {
        let p = Pattern::new(3);
        for o in 0..2000 {
            let s = p.raw_start_at_or_after(o);
            assert!(s >= o && p.is_raw_start(s));
            assert!(!matches!(p.byte(s), b'O' | 0x1A | b'I' | 0x47 | 0xFF));
        }
    }
}
