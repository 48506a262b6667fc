//! The gRPC codec of the generated services and clients: prost encoding (as
//! `tonic_prost::ProstCodec`) with small initial buffers. tonic allocates one encode
//! and one decode buffer per call (per stream for a streaming call) of the codec's
//! `buffer_size`, 8 KiB by default; a control plane holding 100,000 session streams
//! would spend 1.6 GB on buffers that almost never hold more than a few hundred bytes.
//!
//! A buffer grows for a larger message and keeps that size for the life of the call
//! (tonic reuses it), so the encoder reserves exactly the message's length before
//! encoding: a session stream's large first message leaves a buffer of its own size,
//! not the next power of two that byte-by-byte growth would reach.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of each per-call encode buffer, bytes.
pub const BUFFER_SIZE: usize = 256;

/// Initial size of each per-call decode buffer, bytes: the messages a held stream
/// receives (`SessionUp`: an id and a few counters) fit; larger ones grow it.
pub const DECODE_BUFFER_SIZE: usize = 128;

/// Yield threshold of streaming encodes (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

fn decode_settings() -> BufferSettings {
    BufferSettings::new(DECODE_BUFFER_SIZE, YIELD_THRESHOLD)
}

/// One gRPC message frame (gRPC over HTTP/2's "Length-Prefixed-Message": an uncompressed flag
/// byte, the length as big-endian u32, the prost encoding) in an allocation of exactly
/// its size, for a response body written without tonic's per-call encode buffer (the
/// control plane's session streams: a buffer that grew for one large message would be
/// kept for the life of the stream).
///
/// # Errors
/// A message longer than `u32::MAX` bytes (gRPC cannot frame it).
pub fn grpc_frame<T: prost::Message>(msg: &T) -> Result<Vec<u8>, Status> {
    let len = msg.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!("a {len}-byte message cannot be framed"))
    })?;
    let mut frame = Vec::with_capacity(5 + len);
    frame.push(0);
    frame.extend_from_slice(&prefix.to_be_bytes());
    msg.encode(&mut frame)
        .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))?;
    Ok(frame)
}

/// Reassembles the gRPC message frames of a request body from its data chunks, for a
/// stream read without tonic's per-call decoder (the control plane's session streams:
/// `tonic::Streaming` holds some 400 bytes of state and a buffer for the life of the
/// stream). Bytes are buffered only while a frame is incomplete: between messages the
/// reader holds no allocation. Compressed frames are refused (no compression is
/// negotiated).
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max_message: usize,
}

impl FrameReader {
    /// A reader refusing messages longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            max_message,
        }
    }

    /// Appends a data chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Whether no byte of an incomplete frame is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next whole message, `None` until one is buffered.
    ///
    /// # Errors
    /// A compressed frame (`UNIMPLEMENTED`), a message longer than the limit
    /// (`RESOURCE_EXHAUSTED`) or one that does not decode (`INTERNAL`, as tonic): the
    /// stream cannot go on after it (the buffer is dropped).
    pub fn next_message<T: prost::Message + Default>(&mut self) -> Option<Result<T, Status>> {
        let header: [u8; 5] = self.buf.get(..5)?.try_into().ok()?;
        let fail = |reader: &mut Self, status: Status| {
            reader.buf = Vec::new();
            Some(Err(status))
        };
        if header[0] != 0 {
            return fail(
                self,
                Status::unimplemented("compressed messages are not accepted"),
            );
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_message {
            return fail(
                self,
                Status::resource_exhausted(format!(
                    "a {len}-byte message is beyond the limit of {} bytes",
                    self.max_message
                )),
            );
        }
        let end = len.checked_add(5)?;
        let body = self.buf.get(5..end)?;
        let decoded = T::decode(body);
        if end == self.buf.len() {
            // Nothing left: the buffer's memory goes back.
            self.buf = Vec::new();
        } else {
            self.buf.drain(..end);
        }
        match decoded {
            Ok(msg) => Some(Ok(msg)),
            Err(e) => fail(
                self,
                Status::internal(format!("cannot decode a message: {e}")),
            ),
        }
    }
}

/// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] and [`DECODE_BUFFER_SIZE`] buffers (named by the generated code
/// through `codec_path` in `build.rs`).
#[derive(Debug, Clone)]
pub struct SmallBufferCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SmallEncoder<T>;
    type Decoder = SmallDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SmallEncoder(ProstEncoder::new(settings()))
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallDecoder(ProstDecoder::new(decode_settings()))
    }
}

/// The encoder of [`SmallBufferCodec`].
#[derive(Debug, Clone)]
pub struct SmallEncoder<T>(ProstEncoder<T>);

impl<T: prost::Message> Encoder for SmallEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // One exact growth (when needed) instead of doubling as the bytes come.
        buf.reserve(item.encoded_len());
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

/// The decoder of [`SmallBufferCodec`].
#[derive(Debug, Clone)]
pub struct SmallDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for SmallDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        decode_settings()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::v1::SessionUp;

    fn up(id: &str) -> SessionUp {
        SessionUp {
            session_id: id.into(),
            bytes_from_server: 123_456,
            ..Default::default()
        }
    }

    #[test]
    fn frames_split_and_joined_across_chunks_are_read_back() {
        let mut bytes = grpc_frame(&up("a")).unwrap();
        bytes.extend(grpc_frame(&up("bb")).unwrap());
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(1024);
            r.push(&bytes[..cut]);
            let mut got = Vec::new();
            while let Some(m) = r.next_message::<SessionUp>() {
                got.push(m.unwrap());
            }
            r.push(&bytes[cut..]);
            while let Some(m) = r.next_message::<SessionUp>() {
                got.push(m.unwrap());
            }
            assert_eq!(got, vec![up("a"), up("bb")], "cut at {cut}");
            assert!(r.is_empty());
            assert_eq!(r.buf.capacity(), 0, "no memory held between messages");
        }
    }

    #[test]
    fn compressed_oversized_and_garbage_frames_are_refused() {
        let mut r = FrameReader::new(1024);
        r.push(&[1, 0, 0, 0, 1, 0]);
        let e = r.next_message::<SessionUp>().unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        assert!(r.is_empty());

        let mut r = FrameReader::new(16);
        r.push(&[0, 0, 0, 0, 17]);
        let e = r.next_message::<SessionUp>().unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);

        let mut r = FrameReader::new(16);
        r.push(&[0, 0, 0, 0, 2, 0xff, 0xff]);
        let e = r.next_message::<SessionUp>().unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(r.next_message::<SessionUp>().is_none());
    }
}
