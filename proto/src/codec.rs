//! The gRPC codec of the generated services and clients: prost encoding (as
//! `tonic_prost::ProstCodec`) with small initial buffers. tonic allocates one encode
//! and one decode buffer per call (per stream for a streaming call) of the codec's
//! `buffer_size`, 8 KiB by default; a control plane holding 100,000 session streams
//! would spend 1.6 GB on buffers that almost never hold more than a few hundred bytes.
//! Buffers grow as needed for larger messages (by `BytesMut`'s usual doubling).

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of each per-call encode and decode buffer, bytes.
pub const BUFFER_SIZE: usize = 256;

/// Yield threshold of streaming encodes (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] buffers (named by the generated code
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
        SmallDecoder(ProstDecoder::new(settings()))
    }
}

/// The encoder of [`SmallBufferCodec`].
#[derive(Debug, Clone)]
pub struct SmallEncoder<T>(ProstEncoder<T>);

impl<T: prost::Message> Encoder for SmallEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
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
        settings()
    }
}
