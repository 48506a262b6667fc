//! One wire-protocol session with a data-plane node: connect, `HELLO` / `HELLO_ACK`,
//! `PROOF` (the holder key's signature over the ack's nonce: chunk tokens are bound to
//! it, see `starling_proto::holder`), `SUBSCRIBE` / `STREAM_INFO`, then frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use starling_proto::holder::{HolderKey, Verifier};
use starling_proto::wire::{
    self, Decoder, ErrorCode, Frame, Hello, Limits, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Role,
    StartAt, StreamInfo, Subscribe,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::SdkError;

/// Read buffer grows by at least this much per read (a frame longer than that is
/// reserved whole once its header is in). Small: a peer holds a dozen links, most of
/// them carrying only buffer maps and pings, and a chunk split off the buffer pins the
/// allocation it was read into; 64 KiB per link cost ~1 MiB per peer and a page fault
/// storm in the load test.
const READ_CHUNK: usize = 8 * 1024;

pub(crate) struct WireConn {
    stream: TcpStream,
    decoder: Decoder,
    buf: BytesMut,
    pub(crate) info: StreamInfo,
    pub(crate) addr: String,
    /// The protocol version the handshake chose (0 before it).
    pub(crate) version: u16,
}

/// Parameters of one connection attempt.
pub(crate) struct OpenParams<'a> {
    pub addr: &'a str,
    pub token: &'a Bytes,
    pub broadcast_id: &'a str,
    pub start: StartAt,
    pub limits: Limits,
    pub timeout: Duration,
    /// `Viewer` towards a data-plane node, `Peer` towards another viewer.
    pub role: Role,
    /// Substreams to be pushed ([`wire::ALL_SUBSTREAMS`] = the whole stream).
    pub mask: u64,
    /// Parent tickets sent as `TICKET` frames between `HELLO_ACK` and `SUBSCRIBE`
    /// (peer links to a parent; empty otherwise).
    pub tickets: &'a [Bytes],
    /// The key `token` names: a `PROOF` made with it follows `HELLO_ACK` (none without
    /// a key or a token).
    pub holder: Option<&'a HolderKey>,
    /// Who we are talking to, as the proof names it (the data plane, or the peer id the
    /// control plane gave for `addr`).
    pub verifier: Verifier,
    /// Dial by hole punching from this address (our peer listener's, whose
    /// rendezvous is given): `addr` is reachable only that way
    /// ([`crate::punch::connect_from`]).
    pub punch_from: Option<(std::net::SocketAddr, &'a crate::punch::Rendezvous)>,
}

/// Connects and runs the handshake up to `STREAM_INFO`. Any `ERROR` from the server is
/// returned as [`SdkError::Server`].
pub(crate) async fn open(p: OpenParams<'_>) -> Result<WireConn, SdkError> {
    match tokio::time::timeout(p.timeout, open_inner(&p)).await {
        Ok(r) => r,
        Err(_) => Err(SdkError::Timeout("connecting to the data plane")),
    }
}

async fn open_inner(p: &OpenParams<'_>) -> Result<WireConn, SdkError> {
    let connect_err = |e: std::io::Error| SdkError::Connect {
        addr: p.addr.to_string(),
        source: e.into(),
    };
    let stream = match p.punch_from {
        Some((local, rendezvous)) => {
            let remote = p.addr.parse().map_err(|_| {
                connect_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a punched peer's address must be ip:port",
                ))
            })?;
            crate::punch::connect_from(local, remote, crate::punch::PUNCH_WINDOW, rendezvous)
                .await
                .map_err(connect_err)?
        }
        None => TcpStream::connect(p.addr).await.map_err(connect_err)?,
    };
    let mut conn = WireConn::new(stream, p.limits, p.addr.to_string());
    conn.send(&Frame::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        role: p.role,
        token: p.token.clone(),
    }))
    .await?;
    let nonce = loop {
        match conn.next_frame().await? {
            Frame::HelloAck(ack) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&ack.version) {
                    return Err(SdkError::VersionMismatch(ack.version));
                }
                conn.version = ack.version;
                break ack.nonce;
            }
            Frame::Ping(n) => conn.send(&Frame::Pong(n)).await?,
            other => return Err(unexpected(other, "HELLO_ACK")),
        }
    };
    if let Some(h) = p.holder
        && !p.token.is_empty()
    {
        let proof = h.prove(&nonce, p.token, p.verifier);
        conn.send(&Frame::Proof(Bytes::copy_from_slice(&proof)))
            .await?;
    }
    for t in p.tickets {
        conn.send(&Frame::Ticket(t.clone())).await?;
    }
    conn.send(&Frame::Subscribe(Subscribe {
        broadcast_id: p.broadcast_id.to_string(),
        start: p.start,
        substream_mask: p.mask,
    }))
    .await?;
    loop {
        match conn.next_frame().await? {
            Frame::StreamInfo(info) => {
                if info.broadcast_id != p.broadcast_id {
                    tracing::warn!(
                        expected = p.broadcast_id,
                        got = info.broadcast_id,
                        "STREAM_INFO names another broadcast"
                    );
                }
                conn.info = info;
                return Ok(conn);
            }
            Frame::Ping(n) => conn.send(&Frame::Pong(n)).await?,
            Frame::Pong(_) => {}
            other => return Err(unexpected(other, "STREAM_INFO")),
        }
    }
}

/// Maps a frame that is not the expected one to an error.
fn unexpected(frame: Frame, wanted: &str) -> SdkError {
    match frame {
        Frame::Error(r) => SdkError::Server {
            code: r.code,
            message: r.message,
        },
        Frame::Goodbye(r) => SdkError::goodbye(r),
        other => SdkError::Protocol(format!(
            "expected {wanted}, got frame type 0x{:02x}",
            frame_code(&other)
        )),
    }
}

fn frame_code(f: &Frame) -> u8 {
    f.frame_type()
}

/// Reads one frame from `stream` into `buf`. Cancel-safe: bytes read are kept in the
/// buffer. `chunk_limit`, if given, is read before every decode attempt and replaces
/// the decoder's `CHUNK` limit (a link whose limit is raised while a read is pending
/// decodes the next header with the new one).
async fn read_frame<R: AsyncRead + Unpin>(
    stream: &mut R,
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    chunk_limit: Option<&AtomicU32>,
) -> Result<Frame, SdkError> {
    loop {
        if let Some(limit) = chunk_limit {
            let max = limit.load(Ordering::Relaxed);
            let cur = decoder.limits();
            if cur.max_chunk_payload != max {
                *decoder = Decoder::new(Limits {
                    max_chunk_payload: max,
                    ..cur
                });
            }
        }
        if let Some(f) = decoder.decode(buf)? {
            return Ok(f);
        }
        let need = decoder.bytes_needed(buf).max(READ_CHUNK);
        buf.reserve(need);
        let n = stream.read_buf(buf).await?;
        if n == 0 {
            return Err(SdkError::Closed);
        }
    }
}

/// The receiving half of a split connection.
pub(crate) struct FrameReader {
    stream: OwnedReadHalf,
    decoder: Decoder,
    buf: BytesMut,
    /// See [`FrameReader::with_chunk_limit`].
    chunk_limit: Option<Arc<AtomicU32>>,
}

impl FrameReader {
    /// Reads the next frame. Cancel-safe.
    pub(crate) async fn next_frame(&mut self) -> Result<Frame, SdkError> {
        read_frame(
            &mut self.stream,
            &mut self.decoder,
            &mut self.buf,
            self.chunk_limit.as_deref(),
        )
        .await
    }

    /// From now on the largest `CHUNK` payload accepted is whatever `limit` holds when
    /// a frame is decoded (the engine raises it when it admits an incoming link).
    pub(crate) fn with_chunk_limit(mut self, limit: Arc<AtomicU32>) -> FrameReader {
        self.chunk_limit = Some(limit);
        self
    }
}

impl WireConn {
    /// A connection accepted by the peer listener (the handshake is run by the caller
    /// with [`WireConn::next_frame`] / [`WireConn::send`]).
    pub(crate) fn accepted(stream: TcpStream, limits: Limits, addr: String) -> WireConn {
        WireConn::new(stream, limits, addr)
    }

    /// A connection on `stream` before its handshake (no stream info yet).
    fn new(stream: TcpStream, limits: Limits, addr: String) -> WireConn {
        // Chunks are written whole; small control frames should not wait for Nagle.
        let _ = stream.set_nodelay(true);
        WireConn {
            stream,
            decoder: Decoder::new(limits),
            buf: BytesMut::with_capacity(READ_CHUNK),
            version: 0,
            info: StreamInfo {
                broadcast_id: String::new(),
                content_type: String::new(),
                chunk_duration_ms: 0,
                substreams: 0,
                first_seq: 0,
                live_seq: 0,
            },
            addr,
        }
    }

    /// Splits into a frame reader and the raw write half (bytes already buffered stay
    /// with the reader).
    pub(crate) fn into_split(self) -> (FrameReader, OwnedWriteHalf) {
        let (r, w) = self.stream.into_split();
        (
            FrameReader {
                stream: r,
                decoder: self.decoder,
                buf: self.buf,
                chunk_limit: None,
            },
            w,
        )
    }

    /// Reads the next frame. Cancel-safe: bytes read are kept in the buffer.
    pub(crate) async fn next_frame(&mut self) -> Result<Frame, SdkError> {
        read_frame(&mut self.stream, &mut self.decoder, &mut self.buf, None).await
    }

    pub(crate) async fn send(&mut self, frame: &Frame) -> Result<(), SdkError> {
        let bytes = wire::encode_to_bytes(frame)?;
        self.stream.write_all(&bytes).await?;
        Ok(())
    }

    /// Closes after a refusal so the peer can read it: our side is shut (FIN after the
    /// refusal already written), then whatever the peer still sends is read and dropped
    /// until it closes too, for at most `within` and 64 KiB. Dropping the socket with
    /// its frames unread would answer them with a reset, and a reset can reach the peer
    /// before it has read our `ERROR`: it would see a broken pipe instead of the reason.
    pub(crate) async fn linger(mut self, within: Duration) {
        let _ = self.stream.shutdown().await;
        let mut left = 64 * 1024usize;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(within, async {
            while left > 0 {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// Says goodbye (best effort) and closes.
    pub(crate) async fn close(mut self) {
        let bye = Frame::Goodbye(wire::Reason {
            code: ErrorCode::Normal,
            message: "viewer leaving".into(),
        });
        let _ =
            tokio::time::timeout(Duration::from_millis(500), async { self.send(&bye).await }).await;
        let _ = self.stream.shutdown().await;
    }
}
