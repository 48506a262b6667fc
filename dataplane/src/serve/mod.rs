//! Viewer-facing servers, running on the glommio executors: the chunk wire protocol
//! (`starling_proto::wire`) and plain HTTP progressive streaming.
//!
//! Each connection is one local task holding a socket, a small receive buffer and a
//! [`Cursor`] into the shared ring: no per-viewer chunk queue, no payload copy (the
//! 28-byte chunk prefix is written, then the shared payload `Bytes`).
//!
//! Wire sessions after `SUBSCRIBE`:
//! * the cursor walks every chunk; only those whose substream (`seq % K`, K from the
//!   broadcast) is in the connection's `substream_mask` are pushed. A later `SUBSCRIBE`
//!   for the same broadcast replaces the mask for the chunks pushed after it is read
//!   (its `start` is ignored, no second `STREAM_INFO`); another broadcast is
//!   `ERROR(UNEXPECTED_FRAME)`.
//! * `REQUEST(seq)` is answered inline, in order, with the chunk from the window (the
//!   same prefix + shared payload, flags as cut, never `DISCONTINUITY` from the cursor)
//!   or `NOT_FOUND(seq)`. Frames are read 64 bytes at a time and the next read only
//!   happens once every answer is in the socket, so at most 4 requests are ever
//!   decoded but unanswered and a client that does not read stalls only itself (and is
//!   dropped after `write_stall`). `BUFFER_MAP`, `PONG` and `NOT_FOUND` are ignored.
//! * keep-alive: after `keepalive` (5 s) with nothing written, a `PING`; if nothing at
//!   all is received within `idle` (30 s) of the first unanswered `PING`, the node
//!   closes with `ERROR(IDLE_TIMEOUT)`.
//!
//! Limits ([`crate::limits`]): every connection takes a [`Slot`] of the node-wide
//! [`ConnTable`](crate::limits::ConnTable) when accepted, or is refused at once
//! (`ERROR(SERVER_BUSY)`, HTTP 503) when its source address or the node holds too many;
//! the slot counts as unauthenticated until the connection subscribes (HTTP: until
//! `GET /live/{id}` is admitted). One deadline (`handshake`) covers everything from
//! accept to that point, however many frames arrive meanwhile (`ERROR(IDLE_TIMEOUT)`).
//! Once subscribed, `REQUEST`s beyond the connection's token bucket are answered
//! `NOT_FOUND(seq)` and `TOKEN` renewals beyond theirs close it with
//! `ERROR(SERVER_BUSY)`. Refusals an attacker can cause en masse are logged through a
//! [`LogGate`] (one line per second per kind, with the count suppressed).
//!
//! Rights ([`crate::auth`]): `HELLO_ACK` carries a fresh random nonce; the client
//! sends `PROOF` before `SUBSCRIBE`: its signature, with the key its token names, over
//! that nonce, the token and "data plane" ([`starling_proto::holder`]). The token of
//! `HELLO` (or of a `TOKEN` frame sent before `SUBSCRIBE`) and the proof of it are
//! checked when the connection subscribes (`ERROR(UNAUTHORIZED)` `no_proof` /
//! `bad_proof` for a token without its holder's proof); a `TOKEN` frame later replaces
//! it (same peer and holder key only). A connection whose token expired (+ skew) gets
//! `GOODBYE(TOKEN_EXPIRED)`; one whose peer is revoked gets `GOODBYE(REVOKED)`, noticed
//! when the task wakes up and the node's revocation generation has moved. Chunks go
//! out with their signature block (`chunk_prefix_signed`: prefix + signature from the
//! ring, then the shared payload).

use crate::auth::{Denied, Grant, Possession};
use crate::chunker::Chunk;
use crate::config::{RateLimit, Timeouts};
use crate::counters::{ChunkKind, CloseReason, Listener, Metrics, SentKind};
use crate::ingest::now_ms;
use crate::limits::{LogGate, Refused, Slot, TokenBucket};
use crate::metrics;
use crate::ring::{Broadcast, Cursor, Next, Registry};
use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use starling_proto::wire::{
    self, Decoder, ErrorCode, Frame, HelloAck, Limits, Reason, StartAt, StreamInfo,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

pub(crate) mod http;
pub(crate) use http::http_conn;

/// What every connection handler needs.
pub(crate) struct ServeCtx {
    pub registry: Arc<Registry>,
    pub timeouts: Timeouts,
    pub capacity_viewers: u32,
    /// `REQUEST`s per subscribed wire connection.
    pub requests: RateLimit,
    /// `TOKEN` renewals per subscribed wire connection.
    pub token_renewals: RateLimit,
    pub logs: LogGates,
}

/// Node-wide log rate limits for refusals a client can cause en masse.
#[derive(Debug)]
pub(crate) struct LogGates {
    /// New connections refused by a connection cap.
    pub refused: LogGate,
    /// Handshakes (and HTTP request heads) not complete by the deadline.
    pub handshake_timeout: LogGate,
    /// Connections whose `REQUEST`s or `TOKEN` renewals went beyond their rate.
    pub rate_limited: LogGate,
}

impl Default for LogGates {
    fn default() -> Self {
        let second = Duration::from_secs(1);
        LogGates {
            refused: LogGate::new(second),
            handshake_timeout: LogGate::new(second),
            rate_limited: LogGate::new(second),
        }
    }
}

/// Takes a connection slot for `peer`, or logs (rate-limited) and counts the refusal.
fn open_slot(
    ctx: &ServeCtx,
    m: &Metrics,
    l: Listener,
    peer: Option<std::net::SocketAddr>,
) -> Result<Slot, Refused> {
    // A socket whose peer address cannot be read is already gone: count it under the
    // unspecified address (it closes at once anyway).
    let ip = peer.map_or(std::net::IpAddr::from([0u8, 0, 0, 0]), |a| a.ip());
    ctx.registry.conns().open(ip).inspect_err(|&r| {
        m.refused(l, r);
        if let Some(suppressed) = ctx.logs.refused.check(now_ms()) {
            warn!(peer = ?peer, listener = ?l, cap = r.label(), suppressed, "connection refused: {r}");
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Wire(#[from] wire::WireError),
    #[error("timed out")]
    Timeout,
    #[error("peer closed the connection")]
    Closed,
}

/// Read buffer granularity during the handshake.
const READ_STEP: usize = 256;
/// Read granularity once subscribed (kept small: per-viewer memory, and it bounds the
/// REQUESTs decoded but not yet answered to 4).
const STREAM_READ_STEP: usize = 64;

async fn with_timeout<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(d).await;
        Err(ConnError::Timeout)
    })
    .await
}

async fn send(s: &mut TcpStream, m: &Metrics, kind: SentKind, f: &Frame) -> Result<(), ConnError> {
    let mut b = BytesMut::new();
    wire::encode(f, &mut b)?;
    s.write_all(&b).await?;
    m.sent(kind, b.len());
    Ok(())
}

async fn send_reason(s: &mut TcpStream, m: &Metrics, error: bool, code: ErrorCode, msg: &str) {
    let r = Reason {
        code,
        message: msg.to_owned(),
    };
    let f = if error {
        Frame::Error(r)
    } else {
        Frame::Goodbye(r)
    };
    // Best effort, bounded: the peer may be gone or stalled.
    let _ = with_timeout(
        Duration::from_secs(1),
        send(s, m, SentKind::WireControl, &f),
    )
    .await;
}

/// Reads until one frame is decoded.
async fn read_frame(
    s: &mut TcpStream,
    buf: &mut BytesMut,
    dec: &mut Decoder,
) -> Result<Frame, ConnError> {
    loop {
        if let Some(f) = dec.decode(buf)? {
            return Ok(f);
        }
        let mut tmp = [0u8; READ_STEP];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(ConnError::Closed);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Caps the kernel send buffer of a viewer connection (`bytes` = 0: leave autotuning),
/// so a viewer that stops reading is noticed by `write_stall` and the skip-ahead policy
/// after a bounded backlog instead of after `tcp_wmem` max.
#[allow(unsafe_code)]
fn cap_send_buffer(s: &TcpStream, bytes: usize) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    if bytes == 0 {
        return;
    }
    // SAFETY: the descriptor belongs to `s`, which is borrowed for this whole call, so
    // it stays open while `fd` (which lives only inside this function) is used.
    let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    if let Err(e) = socket2::SockRef::from(&fd).set_send_buffer_size(bytes) {
        debug!(error = %e, "cannot set SO_SNDBUF; the kernel's autotuning stays");
    }
}

/// Serves one wire-protocol connection until it ends; never panics.
pub(crate) async fn wire_conn(mut s: TcpStream, ctx: Arc<ServeCtx>) {
    let m = Arc::clone(ctx.registry.metrics());
    m.accepted(Listener::Wire);
    let peer = s.peer_addr().ok();
    let _ = s.set_nodelay(true);
    cap_send_buffer(&s, ctx.timeouts.send_buffer_bytes);
    let _ = s.set_write_timeout(Some(ctx.timeouts.write_stall));
    let mut slot = match open_slot(&ctx, &m, Listener::Wire, peer) {
        Ok(slot) => slot,
        Err(r) => {
            send_reason(&mut s, &m, true, ErrorCode::ServerBusy, &r.to_string()).await;
            m.closed(Listener::Wire, CloseReason::ServerBusy);
            let _ = s.close().await;
            return;
        }
    };
    let reason = match wire_session(&mut s, &ctx, &m, &mut slot).await {
        Ok(r) => r,
        Err(ConnError::Closed) => CloseReason::PeerClosed,
        Err(ConnError::Wire(e)) => {
            info!(peer = ?peer, error = %e, "wire protocol error: closing connection");
            send_reason(&mut s, &m, true, e.code(), &e.to_string()).await;
            CloseReason::ProtocolError
        }
        Err(ConnError::Timeout) => {
            if let Some(suppressed) = ctx.logs.handshake_timeout.check(now_ms()) {
                info!(peer = ?peer, suppressed, "wire handshake not complete by the deadline: closing");
            }
            send_reason(
                &mut s,
                &m,
                true,
                ErrorCode::IdleTimeout,
                "handshake timeout",
            )
            .await;
            CloseReason::HandshakeTimeout
        }
        Err(ConnError::Io(e)) => {
            debug!(peer = ?peer, error = %e, "wire connection i/o error");
            io_reason(&e)
        }
    };
    drop(slot);
    m.closed(Listener::Wire, reason);
    let _ = s.close().await;
}

/// A write that timed out (`write_stall`) is a receiver that accepts nothing.
fn behind_ms(ctx: &ServeCtx) -> u64 {
    u64::try_from(ctx.timeouts.live_start_behind.as_millis()).unwrap_or(u64::MAX)
}

fn io_reason(e: &std::io::Error) -> CloseReason {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => CloseReason::TooSlow,
        _ => CloseReason::IoError,
    }
}

/// The handshake's outcome: the token, whether the client holds its key and
/// `SUBSCRIBE` to check, or the end.
enum Handshake {
    Subscribe(bytes::Bytes, Possession, wire::Subscribe),
    End(CloseReason),
}

/// `HELLO` … `SUBSCRIBE` (the caller bounds it with one deadline).
async fn handshake(
    s: &mut TcpStream,
    m: &Metrics,
    buf: &mut BytesMut,
    dec: &mut Decoder,
) -> Result<Handshake, ConnError> {
    // HELLO. Every role (viewer, edge node, peer) is served alike.
    let mut hello = match read_frame(s, buf, dec).await? {
        Frame::Hello(h) => h,
        other => {
            let msg = unexpected(&other, "HELLO");
            send_reason(s, m, true, ErrorCode::UnexpectedFrame, &msg).await;
            return Ok(Handshake::End(CloseReason::UnexpectedFrame));
        }
    };
    let Some(version) = wire::negotiate(hello.min_version, hello.max_version) else {
        let msg = format!(
            "this server speaks versions {}..={}",
            wire::MIN_PROTOCOL_VERSION,
            wire::PROTOCOL_VERSION
        );
        send_reason(s, m, true, ErrorCode::UnsupportedVersion, &msg).await;
        return Ok(Handshake::End(CloseReason::UnsupportedVersion));
    };
    let Ok(nonce) = starling_proto::holder::new_nonce() else {
        send_reason(s, m, true, ErrorCode::Internal, "no randomness for a nonce").await;
        return Ok(Handshake::End(CloseReason::IoError));
    };
    send(
        s,
        m,
        SentKind::WireControl,
        &Frame::HelloAck(HelloAck { version, nonce }),
    )
    .await?;

    // PROOF (optional for anonymous viewers of public broadcasts) and SUBSCRIBE (PING
    // answered, PONG and BUFFER_MAP ignored meanwhile). The proof is checked against
    // the token in force at SUBSCRIBE.
    let mut proof: Option<bytes::Bytes> = None;
    loop {
        match read_frame(s, buf, dec).await? {
            Frame::Subscribe(sub) => {
                let possession = match &proof {
                    Some(p) => Possession::check(&nonce, &hello.token, p),
                    None => Possession::Unproven,
                };
                return Ok(Handshake::Subscribe(hello.token, possession, sub));
            }
            Frame::Proof(p) if proof.is_none() => proof = Some(p),
            // A renewed token before SUBSCRIBE replaces the one from HELLO (checked
            // only once, at SUBSCRIBE).
            Frame::Token(t) => hello.token = t,
            Frame::Ping(n) => send(s, m, SentKind::WireControl, &Frame::Pong(n)).await?,
            Frame::Pong(_) | Frame::BufferMap(_) => {}
            Frame::Goodbye(_) => return Ok(Handshake::End(CloseReason::Normal)),
            Frame::Error(r) => {
                debug!(code = ?r.code, message = %r.message, "client sent ERROR");
                return Ok(Handshake::End(CloseReason::ClientError));
            }
            other => {
                let msg = unexpected(&other, "SUBSCRIBE");
                send_reason(s, m, true, ErrorCode::UnexpectedFrame, &msg).await;
                return Ok(Handshake::End(CloseReason::UnexpectedFrame));
            }
        }
    }
}

async fn wire_session(
    s: &mut TcpStream,
    ctx: &ServeCtx,
    m: &Metrics,
    slot: &mut Slot,
) -> Result<CloseReason, ConnError> {
    let mut dec = Decoder::new(Limits::control_only());
    let mut buf = BytesMut::new();
    // One deadline from accept to subscribed: PINGs, TOKENs or a trickle of bytes do
    // not extend it.
    let hs = handshake(s, m, &mut buf, &mut dec);
    let (token, possession, sub) = match with_timeout(ctx.timeouts.handshake, hs).await? {
        Handshake::Subscribe(token, possession, sub) => (token, possession, sub),
        Handshake::End(r) => return Ok(r),
    };
    let Some(b) = ctx.registry.get(&sub.broadcast_id) else {
        let msg = format!("unknown broadcast {:?}", sub.broadcast_id);
        send_reason(s, m, true, ErrorCode::UnknownBroadcast, &msg).await;
        return Ok(CloseReason::UnknownBroadcast);
    };
    let auth = ctx.registry.auth();
    // Read before the check: a revocation racing with it is seen by the stream loop.
    let auth_gen = auth.generation();
    let grant = match auth.admit(&token, &possession, b.id(), b.is_public(), now_ms()) {
        Ok(g) => g,
        Err(d) => {
            m.token_rejected(&d);
            info!(peer = ?s.peer_addr().ok(), broadcast = %b.id(), reason = d.label(), "wire viewer refused");
            send_reason(s, m, true, d.code(), &d.message()).await;
            return Ok(denied_reason(&d));
        }
    };
    if grant.peer_id.is_some() {
        m.token_accepted();
    }
    // The token is not kept (it may share the receive buffer's allocation).
    drop(token);
    if ctx.registry.total_viewers() >= ctx.capacity_viewers {
        send_reason(s, m, true, ErrorCode::ServerBusy, "node at viewer capacity").await;
        return Ok(CloseReason::ServerBusy);
    }
    slot.authenticate();
    let _guard = b.viewer_guard();
    let max_skips = ctx.timeouts.max_skips;
    let cursor = match sub.start {
        StartAt::Live => Cursor::live_behind(max_skips, behind_ms(ctx)),
        StartAt::Seq(n) => Cursor::resume(&b, n, max_skips),
    };
    let mut st = Stream {
        b: &b,
        m,
        ctx,
        cursor,
        mask: sub.substream_mask,
        sent_info: false,
        carry_disc: false,
        last_tx: Instant::now(),
        unanswered_since: None,
        ping_nonce: 0,
        grant,
        auth_gen,
        requests: TokenBucket::new(ctx.requests, Instant::now()),
        renewals: TokenBucket::new(ctx.token_renewals, Instant::now()),
        requests_limited: false,
    };
    st.run(s, &mut buf, &mut dec).await
}

fn denied_reason(d: &Denied) -> CloseReason {
    match d {
        Denied::Revoked => CloseReason::Revoked,
        _ => CloseReason::Unauthorized,
    }
}

/// Whether a connection holding `grant` must end now: its peer was revoked (checked
/// only when the revocation generation moved since `seen_gen`) or its token expired.
fn rights_lapsed(
    ctx: &ServeCtx,
    broadcast: &str,
    grant: &Grant,
    seen_gen: &mut u64,
    now_ms: u64,
) -> Option<CloseReason> {
    let auth = ctx.registry.auth();
    let gen_now = auth.generation();
    if gen_now != *seen_gen {
        *seen_gen = gen_now;
        if let Some(p) = grant.peer_id
            && auth.is_revoked(broadcast, p, now_ms)
        {
            if let Some(exp) = grant.expires_at_ms {
                auth.extend_revocation(broadcast, p, exp);
            }
            return Some(CloseReason::Revoked);
        }
    }
    if let Some(exp) = grant.expires_at_ms
        && now_ms >= exp.saturating_add(auth.skew_ms())
    {
        return Some(CloseReason::TokenExpired);
    }
    None
}

/// When the token of `grant` stops being valid (`None`: never), as an `Instant`.
fn expiry_instant(ctx: &ServeCtx, grant: &Grant, now_ms: u64) -> Option<Instant> {
    let deadline = grant
        .expires_at_ms?
        .saturating_add(ctx.registry.auth().skew_ms());
    // One extra millisecond: the check is `now >= deadline`.
    let ms = deadline.saturating_sub(now_ms).saturating_add(1);
    Instant::now().checked_add(Duration::from_millis(ms))
}

fn unexpected(f: &Frame, wanted: &str) -> String {
    let name = match f {
        Frame::Hello(_) => "HELLO",
        Frame::HelloAck(_) => "HELLO_ACK",
        Frame::Subscribe(_) => "SUBSCRIBE",
        Frame::StreamInfo(_) => "STREAM_INFO",
        Frame::Chunk(_) => "CHUNK",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::Error(_) => "ERROR",
        Frame::Goodbye(_) => "GOODBYE",
        Frame::BufferMap(_) => "BUFFER_MAP",
        Frame::Request(_) => "REQUEST",
        Frame::NotFound(_) => "NOT_FOUND",
        Frame::Token(_) => "TOKEN",
        Frame::Ticket(_) => "TICKET",
        Frame::Proof(_) => "PROOF",
        Frame::Relaying(_) => "RELAYING",
    };
    format!("expected {wanted}, got {name}")
}

enum Event {
    Read(std::io::Result<usize>),
    Ring,
    Timer,
}

/// What a frame from the client asks for once the session streams.
enum After {
    Continue,
    End(CloseReason),
}

/// A subscribed wire connection: cursor, substream mask and keep-alive state. No
/// chunk queue: the cursor points into the shared ring.
struct Stream<'a> {
    b: &'a Arc<Broadcast>,
    m: &'a Metrics,
    ctx: &'a ServeCtx,
    cursor: Cursor,
    /// Substreams pushed (bit i = chunks with seq % K == i).
    mask: u64,
    sent_info: bool,
    /// A cursor skip happened on a chunk outside the mask: flag the next pushed one.
    carry_disc: bool,
    /// When something was last written (keep-alive PING after `keepalive` of silence).
    last_tx: Instant,
    /// First keep-alive PING sent since the client last sent anything.
    unanswered_since: Option<Instant>,
    ping_nonce: u64,
    /// Peer id and token expiry of this connection.
    grant: Grant,
    /// Revocation generation last checked.
    auth_gen: u64,
    /// `REQUEST`s: one beyond the rate is answered `NOT_FOUND`.
    requests: TokenBucket,
    /// `TOKEN` renewals: one beyond the rate closes the connection.
    renewals: TokenBucket,
    /// Whether this connection's requests were rate-limited already (logged once).
    requests_limited: bool,
}

impl Stream<'_> {
    async fn run(
        &mut self,
        s: &mut TcpStream,
        buf: &mut BytesMut,
        dec: &mut Decoder,
    ) -> Result<CloseReason, ConnError> {
        let mut rx = self.b.subscribe();
        let mut tmp = [0u8; STREAM_READ_STEP];
        let keepalive = self.ctx.timeouts.keepalive;
        let idle = self.ctx.timeouts.idle;
        loop {
            rx.borrow_and_update();
            let now = now_ms();
            if let Some(end) =
                rights_lapsed(self.ctx, self.b.id(), &self.grant, &mut self.auth_gen, now)
            {
                let (code, msg) = match end {
                    CloseReason::Revoked => {
                        (ErrorCode::Revoked, "revoked: this viewer was revoked")
                    }
                    _ => (
                        ErrorCode::TokenExpired,
                        "token_expired: the chunk token expired without renewal",
                    ),
                };
                send_reason(s, self.m, false, code, msg).await;
                return Ok(end);
            }
            if let Some(end) = self.push_available(s).await? {
                return Ok(end);
            }
            let mut wake_at = self.last_tx + keepalive;
            if let Some(t) = self.unanswered_since {
                wake_at = wake_at.min(t + idle);
            }
            if let Some(t) = expiry_instant(self.ctx, &self.grant, now) {
                wake_at = wake_at.min(t);
            }
            let wait = wake_at.saturating_duration_since(Instant::now());
            let ev = futures_lite::future::or(
                async { Event::Read(s.read(&mut tmp).await) },
                futures_lite::future::or(
                    async {
                        let _ = rx.changed().await;
                        Event::Ring
                    },
                    async {
                        glommio::timer::sleep(wait).await;
                        Event::Timer
                    },
                ),
            )
            .await;
            match ev {
                Event::Ring => {}
                Event::Timer => {
                    let now = Instant::now();
                    if self.unanswered_since.is_some_and(|t| now >= t + idle) {
                        let msg = "no answer to keep-alive PINGs";
                        send_reason(s, self.m, true, ErrorCode::IdleTimeout, msg).await;
                        return Ok(CloseReason::IdleTimeout);
                    }
                    if now >= self.last_tx + keepalive {
                        self.ping_nonce = self.ping_nonce.wrapping_add(1);
                        let ping = Frame::Ping(self.ping_nonce);
                        self.m.ping_sent();
                        send(s, self.m, SentKind::WireControl, &ping).await?;
                        self.last_tx = now;
                        self.unanswered_since.get_or_insert(now);
                    }
                }
                Event::Read(Ok(0)) => return Err(ConnError::Closed),
                Event::Read(Err(e)) => return Err(e.into()),
                Event::Read(Ok(n)) => {
                    self.unanswered_since = None;
                    buf.extend_from_slice(&tmp[..n]);
                    // Frames are handled inline, in order: at most one read's worth
                    // (READ_STEP bytes, i.e. a few REQUESTs) is ever pending, and the
                    // next read only happens once every answer is in the socket.
                    while let Some(f) = dec.decode(buf)? {
                        if let After::End(r) = self.on_frame(s, f).await? {
                            return Ok(r);
                        }
                    }
                    if buf.is_empty() && buf.capacity() > 4096 {
                        *buf = BytesMut::new();
                    }
                }
            }
        }
    }

    /// Pushes every chunk the cursor can deliver now (those in the mask).
    async fn push_available(
        &mut self,
        s: &mut TcpStream,
    ) -> Result<Option<CloseReason>, ConnError> {
        loop {
            match self.cursor.next(self.b) {
                Next::Chunk(c, disc) => {
                    if !self.sent_info {
                        self.sent_info = true;
                        let p = self.b.params();
                        let info = StreamInfo {
                            broadcast_id: self.b.id().to_owned(),
                            content_type: p.content_type,
                            chunk_duration_ms: p.chunk_duration_ms,
                            substreams: p.substreams,
                            first_seq: c.seq,
                            live_seq: self.b.newest_seq().unwrap_or(c.seq),
                        };
                        send(s, self.m, SentKind::WireControl, &Frame::StreamInfo(info)).await?;
                        self.last_tx = Instant::now();
                    }
                    let disc = disc || self.carry_disc;
                    if !wire::mask_wants(self.mask, c.seq, self.b.substreams()) {
                        self.carry_disc = disc;
                        continue;
                    }
                    self.carry_disc = false;
                    let mut flags = c.flags;
                    if disc {
                        flags |= wire::chunk_flags::DISCONTINUITY;
                    }
                    write_chunk(s, self.m, &c, flags, SentKind::WirePush).await?;
                    self.m.chunk_sent(ChunkKind::WirePush);
                    self.last_tx = Instant::now();
                }
                Next::Wait => return Ok(None),
                Next::Stopped => {
                    let msg = "broadcast stopped";
                    send_reason(s, self.m, false, ErrorCode::BroadcastStopped, msg).await;
                    return Ok(Some(CloseReason::BroadcastStopped));
                }
                Next::TooSlow => {
                    send_reason(s, self.m, false, ErrorCode::TooSlow, "viewer too slow").await;
                    return Ok(Some(CloseReason::TooSlow));
                }
            }
        }
    }

    async fn on_frame(&mut self, s: &mut TcpStream, f: Frame) -> Result<After, ConnError> {
        match f {
            Frame::Ping(n) => {
                send(s, self.m, SentKind::WireControl, &Frame::Pong(n)).await?;
                self.last_tx = Instant::now();
            }
            Frame::Pong(_) | Frame::BufferMap(_) | Frame::NotFound(_) => {}
            Frame::Request(seq) if !self.requests.try_take(Instant::now()) => {
                self.m.request_rate_limited();
                if !self.requests_limited {
                    self.requests_limited = true;
                    if let Some(suppressed) = self.ctx.logs.rate_limited.check(now_ms()) {
                        info!(
                            peer = ?s.peer_addr().ok(), broadcast = %self.b.id(), suppressed,
                            "REQUESTs beyond the connection's rate: answering NOT_FOUND"
                        );
                    }
                }
                send(s, self.m, SentKind::WireRequest, &Frame::NotFound(seq)).await?;
                self.last_tx = Instant::now();
                glommio::yield_if_needed().await;
            }
            Frame::Request(seq) => {
                match self.b.chunk(seq) {
                    Some(c) => {
                        self.m.request_served();
                        self.m.chunk_sent(ChunkKind::WireRequest);
                        write_chunk(s, self.m, &c, c.flags, SentKind::WireRequest).await?;
                    }
                    None => {
                        self.m.request_not_found();
                        send(s, self.m, SentKind::WireRequest, &Frame::NotFound(seq)).await?;
                    }
                }
                self.last_tx = Instant::now();
                glommio::yield_if_needed().await;
            }
            Frame::Subscribe(sub) => {
                if sub.broadcast_id != self.b.id() {
                    let msg = "a later SUBSCRIBE may not change the broadcast";
                    send_reason(s, self.m, true, ErrorCode::UnexpectedFrame, msg).await;
                    return Ok(After::End(CloseReason::UnexpectedFrame));
                }
                // Only the mask changes; the cursor (and `start`) stay as they are.
                self.mask = sub.substream_mask;
                self.m.mask_updated();
            }
            Frame::Token(_) if !self.renewals.try_take(Instant::now()) => {
                if let Some(suppressed) = self.ctx.logs.rate_limited.check(now_ms()) {
                    info!(
                        peer = ?s.peer_addr().ok(), broadcast = %self.b.id(), suppressed,
                        "TOKEN renewals beyond the connection's rate: closing"
                    );
                }
                let msg = "token_renewal_rate: too many TOKEN renewals on this connection";
                send_reason(s, self.m, true, ErrorCode::ServerBusy, msg).await;
                return Ok(After::End(CloseReason::RateLimited));
            }
            Frame::Token(t) => {
                let auth = self.ctx.registry.auth();
                match auth.renew(self.grant, &t, self.b.id(), self.b.is_public(), now_ms()) {
                    Ok(g) => {
                        self.grant = g;
                        self.m.token_renewed();
                    }
                    Err(d) => {
                        self.m.token_rejected(&d);
                        info!(broadcast = %self.b.id(), reason = d.label(), "token renewal refused");
                        send_reason(s, self.m, true, d.code(), &d.message()).await;
                        return Ok(After::End(denied_reason(&d)));
                    }
                }
            }
            Frame::Goodbye(_) => return Ok(After::End(CloseReason::Normal)),
            Frame::Error(r) => {
                debug!(code = ?r.code, message = %r.message, "client sent ERROR");
                return Ok(After::End(CloseReason::ClientError));
            }
            other @ (Frame::Hello(_)
            | Frame::HelloAck(_)
            | Frame::StreamInfo(_)
            | Frame::Chunk(_)
            | Frame::Ticket(_)
            | Frame::Proof(_)
            | Frame::Relaying(_)) => {
                let msg = unexpected(&other, "PING, PONG, SUBSCRIBE, REQUEST or BUFFER_MAP");
                send_reason(s, self.m, true, ErrorCode::UnexpectedFrame, &msg).await;
                return Ok(After::End(CloseReason::UnexpectedFrame));
            }
        }
        Ok(After::Continue)
    }
}

/// Writes a CHUNK frame: the 28-byte prefix and the chunk's signature block (built on
/// the stack from the ring's copy), then the shared payload (no copy).
async fn write_chunk(
    s: &mut TcpStream,
    m: &Metrics,
    c: &Chunk,
    flags: u8,
    kind: SentKind,
) -> Result<(), ConnError> {
    let prefix = wire::chunk_prefix_signed(
        c.seq,
        flags,
        c.timestamp_ms,
        c.duration_ms,
        &c.signature,
        c.payload.len(),
    )?;
    let head = prefix.as_bytes();
    s.write_all(head).await?;
    s.write_all(&c.payload).await?;
    m.sent(kind, head.len() + c.payload.len());
    Ok(())
}
