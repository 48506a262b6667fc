//! Plain HTTP on the data plane: `GET /live/{id}` (a progressive stream from the ring),
//! `/healthz` and `/metrics`, one request per connection, with the same admission limits
//! and send-buffer cap as wire connections.

use super::*;

/// Longest HTTP request head accepted.
const MAX_HTTP_HEAD: usize = 8 * 1024;

async fn http_reply(s: &mut TcpStream, m: &Metrics, status: &str, ctype: &str, body: &str) {
    http_reply_with(s, m, status, ctype, "", body).await;
}

/// `extra` is inserted as is among the headers (each line ending in CRLF).
async fn http_reply_with(
    s: &mut TcpStream,
    m: &Metrics,
    status: &str,
    ctype: &str,
    extra: &str,
    body: &str,
) {
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-cache\r\n{extra}\r\n{body}",
        body.len()
    );
    let r = with_timeout(Duration::from_secs(2), async {
        s.write_all(resp.as_bytes()).await?;
        Ok(())
    })
    .await;
    if r.is_ok() {
        m.sent(SentKind::Http, resp.len());
    }
}

const TEXT: &str = "text/plain";

/// Serves one plain HTTP connection (one request, then close).
pub(crate) async fn http_conn(mut s: TcpStream, ctx: Arc<ServeCtx>) {
    let m = Arc::clone(ctx.registry.metrics());
    m.accepted(Listener::Http);
    cap_send_buffer(&s, ctx.timeouts.send_buffer_bytes);
    let _ = s.set_write_timeout(Some(ctx.timeouts.write_stall));
    let peer = s.peer_addr().ok();
    let mut slot = match open_slot(&ctx, &m, Listener::Http, peer) {
        Ok(slot) => slot,
        Err(r) => {
            let body = format!("{r}\n");
            http_reply(&mut s, &m, "503 Service Unavailable", TEXT, &body).await;
            m.closed(Listener::Http, CloseReason::ServerBusy);
            let _ = s.close().await;
            return;
        }
    };
    let reason = match http_session(&mut s, &ctx, &m, &mut slot).await {
        Ok(r) => r,
        Err(ConnError::Closed) => CloseReason::PeerClosed,
        Err(ConnError::Timeout) => {
            if let Some(suppressed) = ctx.logs.handshake_timeout.check(now_ms()) {
                info!(peer = ?peer, suppressed, "http request head not complete by the deadline: closing");
            }
            http_reply(&mut s, &m, "408 Request Timeout", TEXT, "timeout\n").await;
            CloseReason::HandshakeTimeout
        }
        Err(ConnError::Io(e)) => {
            debug!(peer = ?peer, error = %e, "http connection ended");
            io_reason(&e)
        }
        Err(e) => {
            debug!(peer = ?peer, error = %e, "http connection ended");
            CloseReason::ProtocolError
        }
    };
    drop(slot);
    m.closed(Listener::Http, reason);
    let _ = s.close().await;
}

#[derive(Debug)]
pub(crate) enum Head {
    Healthz,
    Metrics,
    /// Broadcast id and the chunk token shown (`?token=` or `Authorization: Bearer`):
    /// `None` = no token, `Some(Err)` = not base64url.
    Live(String, Option<Result<Vec<u8>, ()>>),
    Bad(&'static str, &'static str),
}

/// The `token` query parameter, or an `Authorization: Bearer` token, base64url-decoded
/// (standard base64 and padding, also as `%3D`, are accepted).
fn request_token(
    query: Option<&str>,
    headers: &[httparse::Header<'_>],
) -> Option<Result<Vec<u8>, ()>> {
    let from_query = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_owned)
    });
    let from_header = || {
        headers.iter().find_map(|h| {
            if !h.name.eq_ignore_ascii_case("authorization") {
                return None;
            }
            let v = std::str::from_utf8(h.value).ok()?.trim();
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        })
    };
    let raw = from_query.or_else(from_header)?;
    let raw = raw.replace("%3D", "=").replace("%3d", "=");
    if raw.is_empty() {
        return None;
    }
    Some(crate::config::decode_base64(&raw).ok_or(()))
}

pub(crate) fn parse_head(buf: &[u8]) -> Option<Head> {
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
            let (path, query) = match path.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (path, None),
            };
            if path == "/healthz" {
                return Some(Head::Healthz);
            }
            if path == "/metrics" {
                return Some(Head::Metrics);
            }
            match path.strip_prefix("/live/") {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    Some(Head::Live(id.to_owned(), request_token(query, req.headers)))
                }
                _ => Some(Head::Bad("404 Not Found", "not found\n")),
            }
        }
    }
}

async fn http_session(
    s: &mut TcpStream,
    ctx: &ServeCtx,
    m: &Metrics,
    slot: &mut Slot,
) -> Result<CloseReason, ConnError> {
    // One deadline for the whole request head, counted from accept.
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
    let (id, token) = match head {
        Head::Healthz => {
            http_reply(s, m, "200 OK", TEXT, "ok").await;
            return Ok(CloseReason::Normal);
        }
        Head::Metrics => {
            let body = metrics::render(&ctx.registry.scrape());
            http_reply(s, m, "200 OK", metrics::CONTENT_TYPE, &body).await;
            return Ok(CloseReason::Normal);
        }
        Head::Bad(status, body) => {
            http_reply(s, m, status, TEXT, body).await;
            return Ok(CloseReason::ProtocolError);
        }
        Head::Live(id, token) => (id, token),
    };
    let Some(b) = ctx.registry.get(&id) else {
        http_reply(s, m, "404 Not Found", TEXT, "unknown broadcast\n").await;
        return Ok(CloseReason::UnknownBroadcast);
    };
    let auth = ctx.registry.auth();
    let mut auth_gen = auth.generation();
    let admitted = match token {
        None => auth.admit(&[], &Possession::Unproven, b.id(), b.is_public(), now_ms()),
        // A plain GET cannot answer a nonce: bound tokens do not open a non-public
        // broadcast here (`401 no_proof`); public ones are served anonymously.
        Some(Ok(t)) => auth.admit(&t, &Possession::Unproven, b.id(), b.is_public(), now_ms()),
        Some(Err(())) if b.is_public() => {
            auth.admit(&[], &Possession::Unproven, b.id(), true, now_ms())
        }
        Some(Err(())) => Err(Denied::Token(starling_proto::token::TokenError::Malformed(
            "token is not base64url",
        ))),
    };
    let grant = match admitted {
        Ok(g) => g,
        Err(d) => {
            m.token_rejected(&d);
            info!(peer = ?s.peer_addr().ok(), broadcast = %b.id(), reason = d.label(), "http viewer refused");
            let extra = if d.http_status().starts_with("401") {
                "WWW-Authenticate: Bearer realm=\"starling\"\r\n"
            } else {
                ""
            };
            let body = format!("{}\n", d.message());
            http_reply_with(s, m, d.http_status(), TEXT, extra, &body).await;
            return Ok(denied_reason(&d));
        }
    };
    if grant.peer_id.is_some() {
        m.token_accepted();
    }
    if ctx.registry.total_viewers() >= ctx.capacity_viewers {
        http_reply(
            s,
            m,
            "503 Service Unavailable",
            TEXT,
            "node at viewer capacity\n",
        )
        .await;
        return Ok(CloseReason::ServerBusy);
    }
    slot.authenticate();
    let _guard = b.viewer_guard();
    let mut cursor = Cursor::live_behind(ctx.timeouts.max_skips, behind_ms(ctx));
    let mut rx = b.subscribe();
    let mut sent_head = false;
    loop {
        rx.borrow_and_update();
        let now = now_ms();
        if let Some(end) = rights_lapsed(ctx, b.id(), &grant, &mut auth_gen, now) {
            // Mid-body: nothing more can be said than closing.
            return Ok(end);
        }
        loop {
            match cursor.next(&b) {
                Next::Chunk(c, disc) => {
                    let body = if !sent_head {
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
                        m.sent(SentKind::Http, head.len());
                        &c.payload[..]
                    } else if disc {
                        &c.payload[..]
                    } else {
                        // Stream headers the chunker inserted are only needed at the
                        // start: later chunks go out as the source sent them.
                        &c.payload[c.inserted_len.min(c.payload.len())..]
                    };
                    s.write_all(body).await?;
                    m.sent(SentKind::Http, body.len());
                    m.chunk_sent(ChunkKind::Http);
                }
                Next::Wait => break,
                Next::Stopped | Next::TooSlow => {
                    if !sent_head {
                        http_reply(s, m, "410 Gone", TEXT, "broadcast stopped\n").await;
                        return Ok(CloseReason::BroadcastStopped);
                    }
                    return Ok(if b.is_stopped() {
                        CloseReason::BroadcastStopped
                    } else {
                        CloseReason::TooSlow
                    });
                }
            }
        }
        let changed = match expiry_instant(ctx, &grant, now) {
            None => rx.changed().await.is_ok(),
            Some(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                futures_lite::future::or(async { rx.changed().await.is_ok() }, async {
                    glommio::timer::sleep(wait).await;
                    true
                })
                .await
            }
        };
        if !changed {
            return Ok(CloseReason::BroadcastStopped);
        }
    }
}
