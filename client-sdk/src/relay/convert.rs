//! Conversions between wire frames and the grid core's types (buffer maps).

use bytes::Bytes;
use starling_grid::peer::BufferMap;
use starling_proto::wire::BufferMapFrame;

/// The wire frame for a scheduler buffer map (same bit layout).
pub(super) fn from_buffer_map(m: &BufferMap) -> Option<BufferMapFrame> {
    let b = m.to_bytes();
    let bits = Bytes::copy_from_slice(b.get(starling_grid::peer::BUFFER_MAP_HEADER_LEN..)?);
    Some(BufferMapFrame {
        base: m.base(),
        len: m.len(),
        bits,
    })
}

/// A received buffer map as the scheduler's type (`None` if inconsistent).
pub(super) fn to_buffer_map(f: &BufferMapFrame) -> Option<BufferMap> {
    let mut v = Vec::with_capacity(starling_grid::peer::BUFFER_MAP_HEADER_LEN + f.bits.len());
    v.extend_from_slice(&f.base.to_be_bytes());
    v.extend_from_slice(&f.len.to_be_bytes());
    v.extend_from_slice(&f.bits);
    BufferMap::decode(&v).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use starling_proto::wire::{self, Frame};

    #[test]
    fn buffer_map_conversion_roundtrips() {
        let mut m = BufferMap::new(100, 13);
        m.set(100);
        m.set(112);
        let f = from_buffer_map(&m).unwrap();
        assert_eq!(f.base, 100);
        assert_eq!(f.len, 13);
        assert_eq!(f.bits.len(), 2);
        // The wire codec accepts it.
        let bytes = wire::encode_to_bytes(&Frame::BufferMap(f.clone())).unwrap();
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let back = wire::Decoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(back, Frame::BufferMap(f.clone()));
        assert_eq!(to_buffer_map(&f).unwrap(), m);
    }
}
