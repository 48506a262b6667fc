//! Viewer-facing servers, running on the glommio executors: the chunk wire protocol
//! (`starling_proto::wire`) and plain HTTP progressive streaming.
//!
//! Each connection is one local task holding a socket, a small receive buffer and a
//! [`Cursor`] into the shared ring: no per-viewer chunk queue, no payload copy (the
//! 28-byte chunk prefix is written, then the shared payload `Bytes`).

use crate::config::Timeouts;
use crate::ring::{Broadcast, Cursor, Next, Registry};
use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use starling_proto::wire::{
    self, Decoder, ErrorCode, Frame, HelloAck, Limits, Reason, StartAt, StreamInfo,
};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info};

/// What every connection handler needs.
pub(crate) struct ServeCtx {
    pub registry: Arc<Registry>,
    pub timeouts: Timeouts,
    pub capacity_viewers: u32,
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

/// Read buffer granularity (kept small: per-viewer memory).
const READ_STEP: usize = 256;

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

async fn send(s: &mut TcpStream, f: &Frame) -> Result<(), ConnError> {
    let mut b = BytesMut::new();
    wire::encode(f, &mut b)?;
    s.write_all(&b).await?;
    Ok(())
}

async fn send_reason(s: &mut TcpStream, error: bool, code: ErrorCode, msg: &str) {
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
    let _ = with_timeout(Duration::from_secs(1), send(s, &f)).await;
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

/// Serves one wire-protocol connection until it ends; never panics.
pub(crate) async fn wire_conn(mut s: TcpStream, ctx: Arc<ServeCtx>) {
    let peer = s.peer_addr().ok();
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(ctx.timeouts.write_stall));
    match wire_session(&mut s, &ctx).await {
        Ok(()) | Err(ConnError::Closed) => {}
        Err(ConnError::Wire(e)) => {
            info!(peer = ?peer, error = %e, "wire protocol error: closing connection");
            send_reason(&mut s, true, e.code(), &e.to_string()).await;
        }
        Err(ConnError::Timeout) => {
            info!(peer = ?peer, "wire handshake timed out");
            send_reason(&mut s, true, ErrorCode::IdleTimeout, "handshake timeout").await;
        }
        Err(ConnError::Io(e)) => debug!(peer = ?peer, error = %e, "wire connection i/o error"),
    }
    let _ = s.close().await;
}

async fn wire_session(s: &mut TcpStream, ctx: &ServeCtx) -> Result<(), ConnError> {
    let mut dec = Decoder::new(Limits::control_only());
    let mut buf = BytesMut::new();
    let hs = ctx.timeouts.handshake;

    // HELLO.
    let hello = match with_timeout(hs, read_frame(s, &mut buf, &mut dec)).await? {
        Frame::Hello(h) => h,
        other => {
            send_reason(
                s,
                true,
                ErrorCode::UnexpectedFrame,
                &unexpected(&other, "HELLO"),
            )
            .await;
            return Ok(());
        }
    };
    // hello.token: hook for chunk-token verification (accepted as is for now).
    let Some(version) = wire::negotiate(hello.min_version, hello.max_version) else {
        send_reason(
            s,
            true,
            ErrorCode::UnsupportedVersion,
            &format!(
                "this server speaks versions {}..={}",
                wire::MIN_PROTOCOL_VERSION,
                wire::PROTOCOL_VERSION
            ),
        )
        .await;
        return Ok(());
    };
    send(s, &Frame::HelloAck(HelloAck { version })).await?;

    // SUBSCRIBE (PINGs allowed meanwhile).
    let sub = loop {
        match with_timeout(hs, read_frame(s, &mut buf, &mut dec)).await? {
            Frame::Subscribe(sub) => break sub,
            Frame::Ping(n) => send(s, &Frame::Pong(n)).await?,
            Frame::Goodbye(_) => return Ok(()),
            other => {
                send_reason(
                    s,
                    true,
                    ErrorCode::UnexpectedFrame,
                    &unexpected(&other, "SUBSCRIBE"),
                )
                .await;
                return Ok(());
            }
        }
    };
    let Some(b) = ctx.registry.get(&sub.broadcast_id) else {
        send_reason(
            s,
            true,
            ErrorCode::UnknownBroadcast,
            &format!("unknown broadcast {:?}", sub.broadcast_id),
        )
        .await;
        return Ok(());
    };
    if ctx.registry.total_viewers() >= ctx.capacity_viewers {
        send_reason(s, true, ErrorCode::ServerBusy, "node at viewer capacity").await;
        return Ok(());
    }
    let _guard = b.viewer_guard();
    let max_skips = ctx.timeouts.max_skips;
    let mut cursor = match sub.start {
        StartAt::Live => Cursor::live(max_skips),
        StartAt::Seq(n) => Cursor::resume(&b, n, max_skips),
    };
    stream_chunks(s, &b, &mut cursor, &mut buf, &mut dec).await
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
    };
    format!("expected {wanted}, got {name}")
}

enum Event {
    Read(std::io::Result<usize>),
    Ring,
}

async fn stream_chunks(
    s: &mut TcpStream,
    b: &Arc<Broadcast>,
    cursor: &mut Cursor,
    buf: &mut BytesMut,
    dec: &mut Decoder,
) -> Result<(), ConnError> {
    let mut rx = b.subscribe();
    let mut sent_info = false;
    let mut tmp = [0u8; 64];
    loop {
        rx.borrow_and_update();
        loop {
            match cursor.next(b) {
                Next::Chunk(c, disc) => {
                    if !sent_info {
                        sent_info = true;
                        let p = b.params();
                        let info = StreamInfo {
                            broadcast_id: b.id().to_owned(),
                            content_type: p.content_type,
                            chunk_duration_ms: p.chunk_duration_ms,
                            substreams: p.substreams,
                            first_seq: c.seq,
                            live_seq: b.newest_seq().unwrap_or(c.seq),
                        };
                        send(s, &Frame::StreamInfo(info)).await?;
                    }
                    let mut flags = c.flags;
                    if disc {
                        flags |= wire::chunk_flags::DISCONTINUITY;
                    }
                    let prefix = wire::chunk_prefix(
                        c.seq,
                        flags,
                        c.timestamp_ms,
                        c.duration_ms,
                        c.payload.len(),
                    )?;
                    s.write_all(&prefix).await?;
                    s.write_all(&c.payload).await?;
                }
                Next::Wait => break,
                Next::Stopped => {
                    send_reason(s, false, ErrorCode::BroadcastStopped, "broadcast stopped").await;
                    return Ok(());
                }
                Next::TooSlow => {
                    send_reason(s, false, ErrorCode::TooSlow, "viewer too slow").await;
                    return Ok(());
                }
            }
        }
        let ev = futures_lite::future::or(async { Event::Read(s.read(&mut tmp).await) }, async {
            let _ = rx.changed().await;
            Event::Ring
        })
        .await;
        match ev {
            Event::Ring => {}
            Event::Read(Ok(0)) => return Err(ConnError::Closed),
            Event::Read(Err(e)) => return Err(e.into()),
            Event::Read(Ok(n)) => {
                buf.extend_from_slice(&tmp[..n]);
                while let Some(f) = dec.decode(buf)? {
                    match f {
                        Frame::Ping(n) => send(s, &Frame::Pong(n)).await?,
                        Frame::Pong(_) => {}
                        Frame::Goodbye(_) => return Ok(()),
                        other => {
                            send_reason(
                                s,
                                true,
                                ErrorCode::UnexpectedFrame,
                                &unexpected(&other, "PING"),
                            )
                            .await;
                            return Ok(());
                        }
                    }
                }
                if buf.is_empty() && buf.capacity() > 4096 {
                    *buf = BytesMut::new();
                }
            }
        }
    }
}

/// Longest HTTP request head accepted.
const MAX_HTTP_HEAD: usize = 8 * 1024;

async fn http_reply(s: &mut TcpStream, status: &str, body: &str) {
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = with_timeout(Duration::from_secs(2), async {
        s.write_all(resp.as_bytes()).await?;
        Ok(())
    })
    .await;
}

/// Serves one plain HTTP connection (one request, then close).
pub(crate) async fn http_conn(mut s: TcpStream, ctx: Arc<ServeCtx>) {
    let _ = s.set_write_timeout(Some(ctx.timeouts.write_stall));
    let peer = s.peer_addr().ok();
    match http_session(&mut s, &ctx).await {
        Ok(()) | Err(ConnError::Closed) => {}
        Err(ConnError::Timeout) => http_reply(&mut s, "408 Request Timeout", "timeout\n").await,
        Err(e) => debug!(peer = ?peer, error = %e, "http connection ended"),
    }
    let _ = s.close().await;
}

enum Head {
    Healthz,
    Live(String),
    Bad(&'static str, &'static str),
}

fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Head::Bad("400 Bad Request", "malformed request\n")),
        Ok(httparse::Status::Complete(_)) => {
            let (Some(method), Some(path)) = (req.method, req.path) else {
                return Some(Head::Bad("400 Bad Request", "malformed request\n"));
            };
            if method != "GET" {
                return Some(Head::Bad("405 Method Not Allowed", "only GET\n"));
            }
            let path = path.split('?').next().unwrap_or("");
            if path == "/healthz" {
                return Some(Head::Healthz);
            }
            match path.strip_prefix("/live/") {
                Some(id) if !id.is_empty() && !id.contains('/') => Some(Head::Live(id.to_owned())),
                _ => Some(Head::Bad("404 Not Found", "not found\n")),
            }
        }
    }
}

async fn http_session(s: &mut TcpStream, ctx: &ServeCtx) -> Result<(), ConnError> {
    let head = with_timeout(ctx.timeouts.handshake, async {
        let mut buf = Vec::with_capacity(512);
        loop {
            let mut tmp = [0u8; 512];
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
            buf.extend_from_slice(&tmp[..n]);
            if let Some(h) = parse_head(&buf) {
                return Ok(h);
            }
            if buf.len() > MAX_HTTP_HEAD {
                return Ok(Head::Bad(
                    "431 Request Header Fields Too Large",
                    "request head too large\n",
                ));
            }
        }
    })
    .await?;
    let id = match head {
        Head::Healthz => {
            http_reply(s, "200 OK", "ok").await;
            return Ok(());
        }
        Head::Bad(status, body) => {
            http_reply(s, status, body).await;
            return Ok(());
        }
        Head::Live(id) => id,
    };
    let Some(b) = ctx.registry.get(&id) else {
        http_reply(s, "404 Not Found", "unknown broadcast\n").await;
        return Ok(());
    };
    if ctx.registry.total_viewers() >= ctx.capacity_viewers {
        http_reply(s, "503 Service Unavailable", "node at viewer capacity\n").await;
        return Ok(());
    }
    let _guard = b.viewer_guard();
    let mut cursor = Cursor::live(ctx.timeouts.max_skips);
    let mut rx = b.subscribe();
    let mut sent_head = false;
    loop {
        rx.borrow_and_update();
        loop {
            match cursor.next(&b) {
                Next::Chunk(c, disc) => {
                    if !sent_head {
                        sent_head = true;
                        let mut ct = b.params().content_type;
                        if ct.is_empty() || ct.contains(['\r', '\n']) {
                            ct = "application/octet-stream".into();
                        }
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\nX-Starling-First-Seq: {}\r\n\r\n",
                            c.seq
                        );
                        s.write_all(head.as_bytes()).await?;
                        s.write_all(&c.payload).await?;
                    } else if disc {
                        s.write_all(&c.payload).await?;
                    } else {
                        // Stream headers the chunker inserted are only needed at the
                        // start: later chunks go out as the source sent them.
                        s.write_all(&c.payload[c.inserted_len.min(c.payload.len())..])
                            .await?;
                    }
                }
                Next::Wait => break,
                Next::Stopped | Next::TooSlow => {
                    if !sent_head {
                        http_reply(s, "410 Gone", "broadcast stopped\n").await;
                    }
                    return Ok(());
                }
            }
        }
        if rx.changed().await.is_err() {
            return Ok(());
        }
    }
}
