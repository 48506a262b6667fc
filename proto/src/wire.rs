//! The chunk wire protocol, as a sans-IO codec.
//!
//! Specified byte by byte in `docs/PROTOCOL.md`. Every frame is an 8-byte header
//! (`type u8 | flags u8 | reserved u16 = 0 | payload_len u32`, big endian) followed by
//! `payload_len` bytes. The decoder checks the declared length against a per-type limit
//! *before* buffering the payload, never panics on any input, and returns a typed
//! [`WireError`] for everything malformed. Chunk payloads are handed out as
//! [`Bytes`] slices of the receive buffer (no copy).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol magic sent in `HELLO`.
pub const MAGIC: [u8; 4] = *b"STRL";
/// The highest protocol version this build speaks. Version 3 added `RELAYING` (peer
/// links only; sent only on a link that negotiated version 3 or more).
pub const PROTOCOL_VERSION: u16 = 3;
/// The first protocol version with `RELAYING`.
pub const RELAYING_VERSION: u16 = 3;
/// The lowest protocol version this build speaks. Version 2 added proof of possession
/// (`HELLO_ACK.nonce`, `PROOF`; see [`crate::holder`]); a version-1 peer is refused with
/// `ERROR(UNSUPPORTED_VERSION)` rather than let in without a proof.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// Length of every frame header.
pub const HEADER_LEN: usize = 8;
/// Length of the fixed part of a `CHUNK` payload (seq, timestamp, duration).
pub const CHUNK_FIXED_LEN: usize = 20;
/// Hard cap on a `CHUNK` payload, whatever the configured limits say.
pub const ABSOLUTE_MAX_CHUNK: u32 = 16 * 1024 * 1024;
/// Longest broadcast id accepted on the wire.
pub const MAX_BROADCAST_ID: usize = 128;
/// Longest token accepted in `HELLO`.
pub const MAX_TOKEN: usize = 4096;
/// Longest parent ticket carried in a `TICKET` frame (see `ticket`).
pub const MAX_TICKET: usize = crate::ticket::MAX_TICKET_LEN;
/// Longest chunk signature block carried in a `CHUNK` (see `integrity`).
pub const MAX_CHUNK_SIGNATURE: usize = 512;
/// Longest human-readable message in `ERROR` / `GOODBYE`.
pub const MAX_MESSAGE: usize = 1024;

/// Frame type codes.
pub mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_ACK: u8 = 0x02;
    pub const SUBSCRIBE: u8 = 0x03;
    pub const STREAM_INFO: u8 = 0x04;
    pub const CHUNK: u8 = 0x05;
    pub const PING: u8 = 0x06;
    pub const PONG: u8 = 0x07;
    pub const ERROR: u8 = 0x08;
    pub const GOODBYE: u8 = 0x09;
    pub const BUFFER_MAP: u8 = 0x0A;
    pub const REQUEST: u8 = 0x0B;
    pub const NOT_FOUND: u8 = 0x0C;
    pub const TOKEN: u8 = 0x0D;
    pub const TICKET: u8 = 0x0E;
    pub const PROOF: u8 = 0x0F;
    pub const RELAYING: u8 = 0x10;
}

/// `substream_mask` value meaning "every substream" (the whole stream).
pub const ALL_SUBSTREAMS: u64 = u64::MAX;
/// Largest number of bits a `BUFFER_MAP` may carry.
pub const MAX_BUFFER_MAP_BITS: u16 = 1024;

/// Chunk flag bits (header `flags` byte of a `CHUNK` frame).
pub mod chunk_flags {
    /// The chunk starts at a random access point (and, for MPEG-TS, with PAT/PMT).
    pub const RANDOM_ACCESS: u8 = 0x01;
    /// Chunks were skipped before this one (slow receiver, source reconnect).
    pub const DISCONTINUITY: u8 = 0x02;
    /// A signature block follows the fixed fields (`sig_len u16 | block`). Set and
    /// cleared by the codec from [`super::Chunk::signature`]; never stored in `flags`.
    pub const SIGNED: u8 = 0x04;
    /// All bits defined by version 1.
    pub const ALL: u8 = RANDOM_ACCESS | DISCONTINUITY | SIGNED;
}

/// Role announced in `HELLO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Edge,
    Peer,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Viewer => 1,
            Role::Edge => 2,
            Role::Peer => 3,
        }
    }
    fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Viewer),
            2 => Some(Role::Edge),
            3 => Some(Role::Peer),
            _ => None,
        }
    }
}

/// Error / goodbye reason codes (u16 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    UnsupportedVersion,
    MalformedFrame,
    FrameTooLarge,
    UnexpectedFrame,
    UnknownBroadcast,
    BroadcastStopped,
    SeqOutOfWindow,
    TooSlow,
    Unauthorized,
    ServerBusy,
    ShuttingDown,
    IdleTimeout,
    /// The session or viewer was revoked by an admin.
    Revoked,
    /// A chunk failed its integrity check (the sender is a polluter or broken).
    BadChunk,
    /// The chunk token expired and was not renewed.
    TokenExpired,
    Normal,
    Internal,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Normal => 0,
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::MalformedFrame => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::UnexpectedFrame => 4,
            ErrorCode::UnknownBroadcast => 5,
            ErrorCode::BroadcastStopped => 6,
            ErrorCode::SeqOutOfWindow => 7,
            ErrorCode::TooSlow => 8,
            ErrorCode::Unauthorized => 9,
            ErrorCode::ServerBusy => 10,
            ErrorCode::ShuttingDown => 11,
            ErrorCode::IdleTimeout => 12,
            ErrorCode::Revoked => 13,
            ErrorCode::BadChunk => 14,
            ErrorCode::TokenExpired => 15,
            ErrorCode::Internal => 255,
            ErrorCode::Other(v) => v,
        }
    }
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            0 => ErrorCode::Normal,
            1 => ErrorCode::UnsupportedVersion,
            2 => ErrorCode::MalformedFrame,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::UnexpectedFrame,
            5 => ErrorCode::UnknownBroadcast,
            6 => ErrorCode::BroadcastStopped,
            7 => ErrorCode::SeqOutOfWindow,
            8 => ErrorCode::TooSlow,
            9 => ErrorCode::Unauthorized,
            10 => ErrorCode::ServerBusy,
            11 => ErrorCode::ShuttingDown,
            12 => ErrorCode::IdleTimeout,
            13 => ErrorCode::Revoked,
            14 => ErrorCode::BadChunk,
            15 => ErrorCode::TokenExpired,
            255 => ErrorCode::Internal,
            other => ErrorCode::Other(other),
        }
    }
}

/// `HELLO`: first frame from the connecting side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub role: Role,
    /// Signed chunk token (opaque here; may be empty).
    pub token: Bytes,
}

/// `HELLO_ACK`: the accepting side's answer, with the chosen version and the nonce the
/// connecting side signs in its `PROOF` (see [`crate::holder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u16,
    /// Fresh random bytes, one per connection.
    pub nonce: [u8; crate::holder::NONCE_LEN],
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The most recent random-access chunk.
    Live,
    /// A given sequence number (resume); if it left the window, the server starts at
    /// the live edge and marks the first chunk `DISCONTINUITY`.
    Seq(u64),
}

/// `SUBSCRIBE`: ask for a broadcast, or for some of its substreams.
///
/// Substream `i` is the chunks with `seq % K == i` (K from `STREAM_INFO.substreams`).
/// Bit `i` of `substream_mask` asks for substream `i` to be pushed; [`ALL_SUBSTREAMS`]
/// asks for the whole stream and `0` for nothing (a link used only for `REQUEST`s and
/// buffer maps). A later `SUBSCRIBE` on the same connection replaces the mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub broadcast_id: String,
    pub start: StartAt,
    pub substream_mask: u64,
}

impl Subscribe {
    /// Whether chunk `seq` belongs to a subscribed substream, with `k` substreams.
    pub fn wants(&self, seq: u64, k: u16) -> bool {
        mask_wants(self.substream_mask, seq, k)
    }
}

/// Whether chunk `seq` is in `mask`, with `k` substreams (`k == 0` is treated as 1).
pub fn mask_wants(mask: u64, seq: u64, k: u16) -> bool {
    let k = u64::from(k.clamp(1, 64));
    mask & (1u64 << (seq % k)) != 0
}

/// `BUFFER_MAP`: which chunks the sender holds: bit `i` (most significant bit of the
/// first byte first) says whether it holds `base + i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferMapFrame {
    pub base: u64,
    /// Number of meaningful bits, at most [`MAX_BUFFER_MAP_BITS`].
    pub len: u16,
    /// `ceil(len / 8)` bytes; padding bits are zero.
    pub bits: Bytes,
}

/// `STREAM_INFO`: sent by the server once per subscription, before the first chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub broadcast_id: String,
    pub content_type: String,
    pub chunk_duration_ms: u32,
    pub substreams: u16,
    /// Sequence of the first chunk the server will send.
    pub first_seq: u64,
    /// Newest sequence in the server's window when the subscription started.
    pub live_seq: u64,
}

/// `CHUNK`: one numbered piece of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub seq: u64,
    /// See [`chunk_flags`].
    pub flags: u8,
    /// Unix time in ms when the data plane cut this chunk.
    pub timestamp_ms: u64,
    /// Media duration (or wall-clock span for formats without timestamps), in ms.
    pub duration_ms: u32,
    /// The data plane's signature block for this chunk (see `integrity`); empty when
    /// the chunk is not signed.
    pub signature: Bytes,
    pub payload: Bytes,
}

impl Chunk {
    pub fn is_random_access(&self) -> bool {
        self.flags & chunk_flags::RANDOM_ACCESS != 0
    }
}

/// `ERROR` (fatal for the connection) and `GOODBYE` (clean close) bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub code: ErrorCode,
    pub message: String,
}

/// Every frame of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Subscribe(Subscribe),
    StreamInfo(StreamInfo),
    Chunk(Chunk),
    Ping(u64),
    Pong(u64),
    Error(Reason),
    Goodbye(Reason),
    BufferMap(BufferMapFrame),
    /// Ask for one chunk by sequence; answered with `CHUNK` or `NOT_FOUND`.
    Request(u64),
    NotFound(u64),
    /// A renewed chunk token for this connection (replaces the one from `HELLO`).
    Token(Bytes),
    /// A parent ticket (see `ticket`), child → parent on peer links: the control
    /// plane's word that the sender may subscribe to the substreams it covers.
    Ticket(Bytes),
    /// Proof of possession of the key the `HELLO` token names: an Ed25519 signature
    /// (exactly 64 bytes) over the `HELLO_ACK` nonce, the token and the verifier
    /// ([`crate::holder`]); connecting side → accepting side, right after `HELLO_ACK`.
    Proof(Bytes),
    /// Child → parent on peer links (version 3+): the substreams (a mask) the sender
    /// relays on to children of its own, so that the parent pushes those to it before
    /// its leaves. Sent after `SUBSCRIBE` and whenever it changes.
    Relaying(u64),
}

impl Frame {
    /// The frame's type code (see [`frame_type`]).
    pub fn frame_type(&self) -> u8 {
        use frame_type::*;
        match self {
            Frame::Hello(_) => HELLO,
            Frame::HelloAck(_) => HELLO_ACK,
            Frame::Subscribe(_) => SUBSCRIBE,
            Frame::StreamInfo(_) => STREAM_INFO,
            Frame::Chunk(_) => CHUNK,
            Frame::Ping(_) => PING,
            Frame::Pong(_) => PONG,
            Frame::Error(_) => ERROR,
            Frame::Goodbye(_) => GOODBYE,
            Frame::BufferMap(_) => BUFFER_MAP,
            Frame::Request(_) => REQUEST,
            Frame::NotFound(_) => NOT_FOUND,
            Frame::Token(_) => TOKEN,
            Frame::Ticket(_) => TICKET,
            Frame::Proof(_) => PROOF,
            Frame::Relaying(_) => RELAYING,
        }
    }
}

/// Everything that can be wrong with bytes on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    #[error("frame type 0x{ty:02x} declares {len} bytes, limit is {max}")]
    FrameTooLarge { ty: u8, len: u32, max: u32 },
    #[error("reserved header bits are not zero")]
    ReservedBits,
    #[error("malformed frame type 0x{ty:02x}: {reason}")]
    Malformed { ty: u8, reason: &'static str },
    #[error("bad magic in HELLO")]
    BadMagic,
    #[error("cannot encode: {0}")]
    Encode(&'static str),
}

impl WireError {
    /// The code to send to the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::BadMagic => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// Per-connection limits for the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of any non-chunk frame.
    pub max_control_payload: u32,
    /// Largest `CHUNK` payload (including its 20-byte fixed part); capped at
    /// [`ABSOLUTE_MAX_CHUNK`].
    pub max_chunk_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_control_payload: 8 * 1024,
            max_chunk_payload: 4 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Limits for a server that never receives chunks from this connection.
    pub fn control_only() -> Self {
        Limits {
            max_control_payload: 8 * 1024,
            max_chunk_payload: 0,
        }
    }
}

/// Sans-IO frame decoder: feed it the receive buffer, take frames out.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    limits: Limits,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: u8,
    pub flags: u8,
    pub len: u32,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Decoder { limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn max_for(&self, ty: u8) -> Result<u32, WireError> {
        use frame_type::*;
        match ty {
            CHUNK => Ok(self.limits.max_chunk_payload.min(ABSOLUTE_MAX_CHUNK)),
            HELLO | HELLO_ACK | SUBSCRIBE | STREAM_INFO | PING | PONG | ERROR | GOODBYE
            | BUFFER_MAP | REQUEST | NOT_FOUND | TOKEN | TICKET | PROOF | RELAYING => {
                Ok(self.limits.max_control_payload)
            }
            other => Err(WireError::UnknownFrameType(other)),
        }
    }

    /// Checks a header without consuming anything. `Ok(None)` = fewer than 8 bytes.
    pub fn peek_header(&self, buf: &[u8]) -> Result<Option<Header>, WireError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let ty = buf[0];
        let flags = buf[1];
        if buf[2] != 0 || buf[3] != 0 {
            return Err(WireError::ReservedBits);
        }
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let max = self.max_for(ty)?;
        if len > max {
            return Err(WireError::FrameTooLarge { ty, len, max });
        }
        Ok(Some(Header { ty, flags, len }))
    }

    /// Bytes still needed before the next frame can be decoded (0 if one is ready or
    /// the header is invalid). Useful to size reads.
    pub fn bytes_needed(&self, buf: &[u8]) -> usize {
        match self.peek_header(buf) {
            Ok(None) => HEADER_LEN - buf.len(),
            Ok(Some(h)) => (HEADER_LEN + h.len as usize).saturating_sub(buf.len()),
            Err(_) => 0,
        }
    }

    /// Decodes one frame from the front of `buf`, consuming it. `Ok(None)` means more
    /// bytes are needed; the buffer is then left untouched. After an `Err` the
    /// connection must be closed: the stream position is lost.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(h) = self.peek_header(buf)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + h.len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(h.len as usize).freeze();
        parse_payload(h, payload).map(Some)
    }
}

struct Reader {
    ty: u8,
    b: Bytes,
}

impl Reader {
    fn err(&self, reason: &'static str) -> WireError {
        WireError::Malformed {
            ty: self.ty,
            reason,
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        if self.b.remaining() < 1 {
            return Err(self.err("truncated"));
        }
        Ok(self.b.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        if self.b.remaining() < 2 {
            return Err(self.err("truncated"));
        }
        Ok(self.b.get_u16())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        if self.b.remaining() < 4 {
            return Err(self.err("truncated"));
        }
        Ok(self.b.get_u32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        if self.b.remaining() < 8 {
            return Err(self.err("truncated"));
        }
        Ok(self.b.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, WireError> {
        if self.b.remaining() < n {
            return Err(self.err("truncated"));
        }
        Ok(self.b.split_to(n))
    }
    fn str8(&mut self, max: usize) -> Result<String, WireError> {
        let n = self.u8()? as usize;
        self.string(n, max)
    }
    fn str16(&mut self, max: usize) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        self.string(n, max)
    }
    fn string(&mut self, n: usize, max: usize) -> Result<String, WireError> {
        if n > max {
            return Err(self.err("string too long"));
        }
        let raw = self.bytes(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn finish(self) -> Result<(), WireError> {
        if self.b.has_remaining() {
            return Err(self.err("trailing bytes"));
        }
        Ok(())
    }
}

fn parse_payload(h: Header, payload: Bytes) -> Result<Frame, WireError> {
    use frame_type::*;
    let mut r = Reader {
        ty: h.ty,
        b: payload,
    };
    let frame = match h.ty {
        HELLO => {
            let magic = r.bytes(4)?;
            if magic.as_ref() != MAGIC {
                return Err(WireError::BadMagic);
            }
            let min_version = r.u16()?;
            let max_version = r.u16()?;
            if min_version > max_version {
                return Err(r.err("min_version > max_version"));
            }
            let role = Role::from_u8(r.u8()?).ok_or_else(|| r.err("unknown role"))?;
            let n = r.u16()? as usize;
            if n > MAX_TOKEN {
                return Err(r.err("token too long"));
            }
            let token = r.bytes(n)?;
            Frame::Hello(Hello {
                min_version,
                max_version,
                role,
                token,
            })
        }
        HELLO_ACK => {
            let version = r.u16()?;
            let raw = r.bytes(crate::holder::NONCE_LEN)?;
            let mut nonce = [0u8; crate::holder::NONCE_LEN];
            nonce.copy_from_slice(&raw);
            Frame::HelloAck(HelloAck { version, nonce })
        }
        PROOF => {
            if r.b.len() != crate::holder::PROOF_LEN {
                return Err(r.err("proof must be 64 bytes"));
            }
            Frame::Proof(r.bytes(crate::holder::PROOF_LEN)?)
        }
        SUBSCRIBE => {
            let broadcast_id = r.str8(MAX_BROADCAST_ID)?;
            if broadcast_id.is_empty() {
                return Err(r.err("empty broadcast id"));
            }
            let mode = r.u8()?;
            let seq = r.u64()?;
            let substream_mask = r.u64()?;
            let start = match mode {
                0 => StartAt::Live,
                1 => StartAt::Seq(seq),
                _ => return Err(r.err("unknown start mode")),
            };
            Frame::Subscribe(Subscribe {
                broadcast_id,
                start,
                substream_mask,
            })
        }
        STREAM_INFO => Frame::StreamInfo(StreamInfo {
            broadcast_id: r.str8(MAX_BROADCAST_ID)?,
            content_type: r.str8(255)?,
            chunk_duration_ms: r.u32()?,
            substreams: r.u16()?,
            first_seq: r.u64()?,
            live_seq: r.u64()?,
        }),
        CHUNK => {
            if h.flags & !chunk_flags::ALL != 0 {
                return Err(r.err("unknown chunk flags"));
            }
            let seq = r.u64()?;
            let timestamp_ms = r.u64()?;
            let duration_ms = r.u32()?;
            let signature = if h.flags & chunk_flags::SIGNED != 0 {
                let n = usize::from(r.u16()?);
                if n == 0 || n > MAX_CHUNK_SIGNATURE {
                    return Err(r.err("bad signature length"));
                }
                r.bytes(n)?
            } else {
                Bytes::new()
            };
            let payload = std::mem::take(&mut r.b);
            Frame::Chunk(Chunk {
                seq,
                flags: h.flags & !chunk_flags::SIGNED,
                timestamp_ms,
                duration_ms,
                signature,
                payload,
            })
        }
        PING => Frame::Ping(r.u64()?),
        REQUEST => Frame::Request(r.u64()?),
        NOT_FOUND => Frame::NotFound(r.u64()?),
        RELAYING => Frame::Relaying(r.u64()?),
        TOKEN => {
            let n = r.b.len();
            if n > MAX_TOKEN {
                return Err(r.err("token too long"));
            }
            Frame::Token(r.bytes(n)?)
        }
        TICKET => {
            let n = r.b.len();
            if n == 0 {
                return Err(r.err("empty ticket"));
            }
            if n > MAX_TICKET {
                return Err(r.err("ticket too long"));
            }
            Frame::Ticket(r.bytes(n)?)
        }
        BUFFER_MAP => {
            let base = r.u64()?;
            let len = r.u16()?;
            if len > MAX_BUFFER_MAP_BITS {
                return Err(r.err("buffer map too long"));
            }
            if base.checked_add(u64::from(len)).is_none() {
                return Err(r.err("buffer map range overflows"));
            }
            let bits = r.bytes(usize::from(len).div_ceil(8))?;
            if let Some(last) = bits.last() {
                let used = len % 8;
                if used != 0 && last & (0xFFu8 >> used) != 0 {
                    return Err(r.err("buffer map padding bits set"));
                }
            }
            Frame::BufferMap(BufferMapFrame { base, len, bits })
        }
        PONG => Frame::Pong(r.u64()?),
        ERROR | GOODBYE => {
            let code = ErrorCode::from_u16(r.u16()?);
            let message = r.str16(MAX_MESSAGE)?;
            let reason = Reason { code, message };
            if h.ty == ERROR {
                Frame::Error(reason)
            } else {
                Frame::Goodbye(reason)
            }
        }
        other => return Err(WireError::UnknownFrameType(other)),
    };
    r.finish()?;
    Ok(frame)
}

fn put_header(dst: &mut BytesMut, ty: u8, flags: u8, len: usize) -> Result<(), WireError> {
    let len = u32::try_from(len).map_err(|_| WireError::Encode("payload too long"))?;
    dst.put_u8(ty);
    dst.put_u8(flags);
    dst.put_u16(0);
    dst.put_u32(len);
    Ok(())
}

fn put_str8(dst: &mut BytesMut, s: &str, max: usize) -> Result<(), WireError> {
    if s.len() > max.min(255) {
        return Err(WireError::Encode("string too long"));
    }
    dst.put_u8(s.len() as u8);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn put_str16(dst: &mut BytesMut, s: &str, max: usize) {
    // Messages are informative: truncate (on a char boundary) rather than fail.
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16(end as u16);
    dst.put_slice(&s.as_bytes()[..end]);
}

/// The header of a `CHUNK` frame plus its fixed fields: write these 28 bytes, then the
/// payload itself, to send a chunk without copying its payload in user space.
pub fn chunk_prefix(
    seq: u64,
    flags: u8,
    timestamp_ms: u64,
    duration_ms: u32,
    payload_len: usize,
) -> Result<[u8; HEADER_LEN + CHUNK_FIXED_LEN], WireError> {
    let body = CHUNK_FIXED_LEN + payload_len;
    if body > ABSOLUTE_MAX_CHUNK as usize {
        return Err(WireError::Encode("chunk too large"));
    }
    if flags & !chunk_flags::ALL != 0 {
        return Err(WireError::Encode("unknown chunk flags"));
    }
    let mut out = [0u8; HEADER_LEN + CHUNK_FIXED_LEN];
    out[0] = frame_type::CHUNK;
    out[1] = flags;
    out[4..8].copy_from_slice(&(body as u32).to_be_bytes());
    out[8..16].copy_from_slice(&seq.to_be_bytes());
    out[16..24].copy_from_slice(&timestamp_ms.to_be_bytes());
    out[24..28].copy_from_slice(&duration_ms.to_be_bytes());
    Ok(out)
}

/// The start of a `CHUNK` frame up to (not including) the payload: header, fixed fields
/// and, for a signed chunk, the signature block. Built on the stack; write
/// [`ChunkPrefix::as_bytes`] and then the shared payload.
#[derive(Clone)]
pub struct ChunkPrefix {
    buf: [u8; HEADER_LEN + CHUNK_FIXED_LEN + 2 + MAX_CHUNK_SIGNATURE],
    len: usize,
}

impl ChunkPrefix {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Debug for ChunkPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkPrefix({} bytes)", self.len)
    }
}

/// Bytes of a whole `CHUNK` frame: header, fixed fields, the signature block with its
/// length field when there is one (`signature_len` 0 = unsigned), and the payload.
pub fn chunk_frame_len(signature_len: usize, payload_len: usize) -> usize {
    let sig = if signature_len == 0 {
        0
    } else {
        2 + signature_len
    };
    HEADER_LEN + CHUNK_FIXED_LEN + sig + payload_len
}

/// Like [`chunk_prefix`], with the chunk's signature block (empty = unsigned).
pub fn chunk_prefix_signed(
    seq: u64,
    flags: u8,
    timestamp_ms: u64,
    duration_ms: u32,
    signature: &[u8],
    payload_len: usize,
) -> Result<ChunkPrefix, WireError> {
    if signature.len() > MAX_CHUNK_SIGNATURE {
        return Err(WireError::Encode("chunk signature too long"));
    }
    let flags = flags & !chunk_flags::SIGNED;
    let (flags, sig_part) = if signature.is_empty() {
        (flags, 0)
    } else {
        (flags | chunk_flags::SIGNED, 2 + signature.len())
    };
    let head = chunk_prefix(
        seq,
        flags,
        timestamp_ms,
        duration_ms,
        sig_part + payload_len,
    )?;
    let mut out = ChunkPrefix {
        buf: [0u8; HEADER_LEN + CHUNK_FIXED_LEN + 2 + MAX_CHUNK_SIGNATURE],
        len: head.len(),
    };
    out.buf[..head.len()].copy_from_slice(&head);
    if !signature.is_empty() {
        let at = head.len();
        out.buf[at..at + 2].copy_from_slice(&(signature.len() as u16).to_be_bytes());
        out.buf[at + 2..at + 2 + signature.len()].copy_from_slice(signature);
        out.len = at + 2 + signature.len();
    }
    Ok(out)
}

/// Appends the encoding of `frame` to `dst`. Fails (without writing a partial frame
/// header) when a field exceeds its wire limit.
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
    use frame_type::*;
    let mut body = BytesMut::new();
    let (ty, flags) = match frame {
        Frame::Hello(h) => {
            if h.token.len() > MAX_TOKEN {
                return Err(WireError::Encode("token too long"));
            }
            body.put_slice(&MAGIC);
            body.put_u16(h.min_version);
            body.put_u16(h.max_version);
            body.put_u8(h.role.to_u8());
            body.put_u16(h.token.len() as u16);
            body.put_slice(&h.token);
            (HELLO, 0)
        }
        Frame::HelloAck(a) => {
            body.put_u16(a.version);
            body.put_slice(&a.nonce);
            (HELLO_ACK, 0)
        }
        Frame::Proof(p) => {
            if p.len() != crate::holder::PROOF_LEN {
                return Err(WireError::Encode("proof must be 64 bytes"));
            }
            body.put_slice(p);
            (PROOF, 0)
        }
        Frame::Subscribe(s) => {
            if s.broadcast_id.is_empty() {
                return Err(WireError::Encode("empty broadcast id"));
            }
            put_str8(&mut body, &s.broadcast_id, MAX_BROADCAST_ID)?;
            match s.start {
                StartAt::Live => {
                    body.put_u8(0);
                    body.put_u64(0);
                }
                StartAt::Seq(seq) => {
                    body.put_u8(1);
                    body.put_u64(seq);
                }
            }
            body.put_u64(s.substream_mask);
            (SUBSCRIBE, 0)
        }
        Frame::StreamInfo(i) => {
            put_str8(&mut body, &i.broadcast_id, MAX_BROADCAST_ID)?;
            put_str8(&mut body, &i.content_type, 255)?;
            body.put_u32(i.chunk_duration_ms);
            body.put_u16(i.substreams);
            body.put_u64(i.first_seq);
            body.put_u64(i.live_seq);
            (STREAM_INFO, 0)
        }
        Frame::Chunk(c) => {
            let prefix = chunk_prefix_signed(
                c.seq,
                c.flags,
                c.timestamp_ms,
                c.duration_ms,
                &c.signature,
                c.payload.len(),
            )?;
            dst.reserve(prefix.as_bytes().len() + c.payload.len());
            dst.put_slice(prefix.as_bytes());
            dst.put_slice(&c.payload);
            return Ok(());
        }
        Frame::Ping(n) => {
            body.put_u64(*n);
            (PING, 0)
        }
        Frame::Pong(n) => {
            body.put_u64(*n);
            (PONG, 0)
        }
        Frame::Request(n) => {
            body.put_u64(*n);
            (REQUEST, 0)
        }
        Frame::Token(t) => {
            if t.len() > MAX_TOKEN {
                return Err(WireError::Encode("token too long"));
            }
            body.put_slice(t);
            (TOKEN, 0)
        }
        Frame::Ticket(t) => {
            if t.is_empty() || t.len() > MAX_TICKET {
                return Err(WireError::Encode("ticket empty or too long"));
            }
            body.put_slice(t);
            (TICKET, 0)
        }
        Frame::NotFound(n) => {
            body.put_u64(*n);
            (NOT_FOUND, 0)
        }
        Frame::Relaying(m) => {
            body.put_u64(*m);
            (RELAYING, 0)
        }
        Frame::BufferMap(m) => {
            if m.len > MAX_BUFFER_MAP_BITS || m.bits.len() != usize::from(m.len).div_ceil(8) {
                return Err(WireError::Encode("buffer map length mismatch"));
            }
            let used = m.len % 8;
            if used != 0 && m.bits.last().is_some_and(|b| b & (0xFFu8 >> used) != 0) {
                return Err(WireError::Encode("buffer map padding bits set"));
            }
            if m.base.checked_add(u64::from(m.len)).is_none() {
                return Err(WireError::Encode("buffer map range overflows"));
            }
            body.put_u64(m.base);
            body.put_u16(m.len);
            body.put_slice(&m.bits);
            (BUFFER_MAP, 0)
        }
        Frame::Error(r) | Frame::Goodbye(r) => {
            body.put_u16(r.code.to_u16());
            put_str16(&mut body, &r.message, MAX_MESSAGE);
            (
                if matches!(frame, Frame::Error(_)) {
                    ERROR
                } else {
                    GOODBYE
                },
                0,
            )
        }
    };
    dst.reserve(HEADER_LEN + body.len());
    put_header(dst, ty, flags, body.len())?;
    dst.put_slice(&body);
    Ok(())
}

/// Convenience: encode into a fresh buffer.
pub fn encode_to_bytes(frame: &Frame) -> Result<Bytes, WireError> {
    let mut b = BytesMut::new();
    encode(frame, &mut b)?;
    Ok(b.freeze())
}

/// Version negotiation: the highest version both sides speak, if any.
pub fn negotiate(min_version: u16, max_version: u16) -> Option<u16> {
    let hi = max_version.min(PROTOCOL_VERSION);
    let lo = min_version.max(MIN_PROTOCOL_VERSION);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests;
