//! [`BufferMap`]: which chunks of a window a peer holds, as a compact bitmap.

/// Most sequence numbers one buffer map may describe.
pub const MAX_BUFFER_MAP_BITS: u16 = 1024;
/// Length of the fixed part of an encoded buffer map (`base u64 | len u16`).
pub const BUFFER_MAP_HEADER_LEN: usize = 10;

/// A malformed encoded buffer map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufferMapError {
    /// Fewer bytes than the header and declared bitmap need.
    #[error("buffer map truncated")]
    Truncated,
    /// More bytes than the declared bitmap needs.
    #[error("buffer map has trailing bytes")]
    TrailingBytes,
    /// The declared length exceeds [`MAX_BUFFER_MAP_BITS`].
    #[error("buffer map declares {0} bits, more than the limit")]
    TooLong(u16),
    /// Bits past the declared length are set.
    #[error("buffer map padding bits set")]
    Padding,
    /// `base + len` overflows the sequence space.
    #[error("buffer map range overflows")]
    Overflow,
}

/// The chunks a peer holds among `base .. base + len`, one bit per sequence number.
///
/// Encoded as `base u64 BE | len u16 BE | ceil(len/8) bytes`, bit `i` (MSB first) meaning
/// `base + i` is held: at most 138 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BufferMap {
    base: u64,
    len: u16,
    bits: Vec<u8>,
}

impl BufferMap {
    /// An empty map of `len` sequence numbers from `base` (`len` capped at
    /// [`MAX_BUFFER_MAP_BITS`] and so that `base + len` does not overflow).
    pub fn new(base: u64, len: u16) -> Self {
        let room = u64::MAX - base;
        let len = len
            .min(MAX_BUFFER_MAP_BITS)
            .min(u16::try_from(room).unwrap_or(u16::MAX));
        BufferMap {
            base,
            len,
            bits: vec![0; usize::from(len).div_ceil(8)],
        }
    }

    /// First sequence number described.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Number of sequence numbers described.
    pub fn len(&self) -> u16 {
        self.len
    }

    /// True if the map describes no sequence number.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks `seq` held; returns false (and does nothing) outside the window.
    pub fn set(&mut self, seq: u64) -> bool {
        match self.bit(seq) {
            Some((byte, mask)) => {
                self.bits[byte] |= mask;
                true
            }
            None => false,
        }
    }

    /// True if `seq` is inside the window and held.
    pub fn contains(&self, seq: u64) -> bool {
        self.bit(seq)
            .is_some_and(|(byte, mask)| self.bits[byte] & mask != 0)
    }

    /// Held sequence numbers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..u64::from(self.len))
            .map(|i| self.base + i)
            .filter(|&s| self.contains(s))
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.base.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.bits);
    }

    /// The encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(BUFFER_MAP_HEADER_LEN + self.bits.len());
        self.encode(&mut v);
        v
    }

    /// Decodes exactly one map from `b`. Never panics.
    ///
    /// # Errors
    /// A [`BufferMapError`] for any malformed input.
    pub fn decode(b: &[u8]) -> Result<Self, BufferMapError> {
        let (Some(base), Some(len)) = (b.get(0..8), b.get(8..10)) else {
            return Err(BufferMapError::Truncated);
        };
        let mut base8 = [0u8; 8];
        base8.copy_from_slice(base);
        let base = u64::from_be_bytes(base8);
        let len = u16::from_be_bytes([len[0], len[1]]);
        if len > MAX_BUFFER_MAP_BITS {
            return Err(BufferMapError::TooLong(len));
        }
        if base.checked_add(u64::from(len)).is_none() {
            return Err(BufferMapError::Overflow);
        }
        let nbytes = usize::from(len).div_ceil(8);
        let rest = &b[BUFFER_MAP_HEADER_LEN..];
        if rest.len() < nbytes {
            return Err(BufferMapError::Truncated);
        }
        if rest.len() > nbytes {
            return Err(BufferMapError::TrailingBytes);
        }
        let used_in_last = usize::from(len) % 8;
        if used_in_last != 0 {
            let pad_mask = 0xFFu8 >> used_in_last;
            if rest.last().is_some_and(|&last| last & pad_mask != 0) {
                return Err(BufferMapError::Padding);
            }
        }
        Ok(BufferMap {
            base,
            len,
            bits: rest.to_vec(),
        })
    }

    fn bit(&self, seq: u64) -> Option<(usize, u8)> {
        let off = seq.checked_sub(self.base)?;
        if off >= u64::from(self.len) {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        Some((off / 8, 0x80u8 >> (off % 8)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_contains_roundtrip() {
        let mut m = BufferMap::new(100, 20);
        assert!(m.set(100));
        assert!(m.set(119));
        assert!(!m.set(120));
        assert!(!m.set(99));
        assert!(m.contains(119) && !m.contains(101));
        let bytes = m.to_bytes();
        assert_eq!(bytes.len(), 10 + 3);
        assert_eq!(BufferMap::decode(&bytes).unwrap(), m);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![100, 119]);
    }

    #[test]
    fn decode_rejects_malformed() {
        let m = BufferMap::new(5, 9);
        let mut b = m.to_bytes();
        assert_eq!(BufferMap::decode(&b[..11]), Err(BufferMapError::Truncated));
        b.push(0);
        assert_eq!(BufferMap::decode(&b), Err(BufferMapError::TrailingBytes));
        b.pop();
        *b.last_mut().unwrap() = 0x01;
        assert_eq!(BufferMap::decode(&b), Err(BufferMapError::Padding));
        let mut big = u64::MAX.to_be_bytes().to_vec();
        big.extend_from_slice(&8u16.to_be_bytes());
        big.push(0);
        assert_eq!(BufferMap::decode(&big), Err(BufferMapError::Overflow));
        let mut long = 0u64.to_be_bytes().to_vec();
        long.extend_from_slice(&2000u16.to_be_bytes());
        assert_eq!(BufferMap::decode(&long), Err(BufferMapError::TooLong(2000)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(m) = BufferMap::decode(&b) {
                prop_assert_eq!(m.to_bytes(), b);
            }
        }

        #[test]
        fn roundtrip(base in any::<u64>(), len in 0u16..1100, seqs in proptest::collection::vec(any::<u16>(), 0..64)) {
            let mut m = BufferMap::new(base, len);
            for s in seqs {
                m.set(base.wrapping_add(u64::from(s)));
            }
            prop_assert!(m.len() <= MAX_BUFFER_MAP_BITS);
            prop_assert_eq!(BufferMap::decode(&m.to_bytes()).unwrap(), m);
        }
    }
}
