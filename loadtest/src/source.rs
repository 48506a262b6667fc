//! The synthetic live source: a hyper HTTP/1.1 server whose `GET /live` is an endless
//! `application/octet-stream` body at a fixed bitrate, paced in small writes.
//!
//! The bytes are [`Pattern`] bytes at their absolute stream offset, and the stream
//! offset advances with wall-clock time from the moment the source started (offset =
//! elapsed × byte rate), like a live encoder's output. A client that connects (or
//! reconnects) gets the live position, not offset 0 (moved forward by at most a few
//! bytes so that the data plane's sniffer always sees raw bytes, see
//! [`Pattern::is_raw_start`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::pattern::Pattern;

/// Configuration of a [`SyntheticSource`].
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Stream rate in kbit/s (1000 bits).
    pub bitrate_kbps: u32,
    /// Key of the byte pattern.
    pub seed: u64,
    /// Interval between writes.
    pub write_interval: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bitrate_kbps: 500,
            seed: 0x5eed,
            write_interval: Duration::from_millis(20),
        }
    }
}

/// Largest body frame; a client that fell behind catches up in pieces of this size.
const MAX_WRITE: usize = 64 * 1024;

struct Clock {
    start: Instant,
    bytes_per_sec: u64,
    pattern: Pattern,
    bytes_sent: AtomicU64,
    connections: AtomicU64,
}

impl Clock {
    fn live_offset(&self, now: Instant) -> u64 {
        let us = now.saturating_duration_since(self.start).as_micros();
        u64::try_from(us * u128::from(self.bytes_per_sec) / 1_000_000).unwrap_or(u64::MAX)
    }
}

/// A running synthetic source. Dropping it stops the server.
pub struct SyntheticSource {
    addr: SocketAddr,
    clock: Arc<Clock>,
    bitrate_kbps: u32,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SyntheticSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticSource")
            .field("addr", &self.addr)
            .field("bitrate_kbps", &self.bitrate_kbps)
            .finish_non_exhaustive()
    }
}

impl SyntheticSource {
    /// Binds and starts serving on the current tokio runtime.
    pub async fn start(cfg: SourceConfig) -> std::io::Result<SyntheticSource> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let clock = Arc::new(Clock {
            start: Instant::now(),
            bytes_per_sec: u64::from(cfg.bitrate_kbps.max(1)) * 1000 / 8,
            pattern: Pattern::new(cfg.seed),
            bytes_sent: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            clock.clone(),
            cfg.write_interval.max(Duration::from_millis(1)),
            stop_rx,
        ));
        Ok(SyntheticSource {
            addr,
            clock,
            bitrate_kbps: cfg.bitrate_kbps,
            stop,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr/live`.
    pub fn url(&self) -> String {
        format!("http://{}/live", self.addr)
    }

    /// The byte pattern (to check outputs against).
    pub fn pattern(&self) -> Pattern {
        self.clock.pattern
    }

    /// The stream rate, kbit/s.
    pub fn bitrate_kbps(&self) -> u32 {
        self.bitrate_kbps
    }

    /// Stream offset of the live edge now.
    pub fn live_offset(&self) -> u64 {
        self.clock.live_offset(Instant::now())
    }

    /// Body bytes sent to all clients so far.
    pub fn bytes_sent(&self) -> u64 {
        self.clock.bytes_sent.load(Ordering::Relaxed)
    }

    /// `GET /live` requests served so far.
    pub fn connections(&self) -> u64 {
        self.clock.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting and ends every response.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = (&mut { self }.task).await;
    }
}

impl Drop for SyntheticSource {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    clock: Arc<Clock>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "synthetic source: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let clock = clock.clone();
        let mut stop = stop.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| handle(req, clock.clone(), interval));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "synthetic source: connection ended");
                },
                _ = stop.wait_for(|s| *s) => {}
            }
        });
        // Reap finished connections.
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}

async fn handle(
    req: Request<Incoming>,
    clock: Arc<Clock>,
    interval: Duration,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let plain = |status: StatusCode, msg: &'static str| {
        let mut r =
            Response::new(http_body_util::Full::new(Bytes::from_static(msg.as_bytes())).boxed());
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/live" {
        return Ok(plain(StatusCode::NOT_FOUND, "not found\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    clock.connections.fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    let cursor = clock.pattern.raw_start_at_or_after(clock.live_offset(now));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let body = LiveBody {
        clock,
        cursor,
        ticker,
    };
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    Ok(r)
}

/// The endless body: at every tick, the bytes from the cursor up to the live edge.
struct LiveBody {
    clock: Arc<Clock>,
    cursor: u64,
    ticker: Interval,
}

impl Body for LiveBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            let live = this.clock.live_offset(Instant::now());
            if live > this.cursor {
                let n = usize::try_from(live - this.cursor)
                    .unwrap_or(MAX_WRITE)
                    .min(MAX_WRITE);
                let data = this.clock.pattern.bytes(this.cursor, n);
                this.cursor += n as u64;
                this.clock.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))));
            }
            match this.ticker.poll_tick(cx) {
                Poll::Ready(_) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_some(addr: SocketAddr, want: usize) -> (String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&b[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut body = buf.split_off(head_end);
        // Chunked transfer encoding: decode it.
        let mut out = Vec::new();
        loop {
            while let Some(i) = body.windows(2).position(|w| w == b"\r\n") {
                let len =
                    usize::from_str_radix(std::str::from_utf8(&body[..i]).unwrap(), 16).unwrap();
                if body.len() < i + 2 + len + 2 {
                    break;
                }
                out.extend_from_slice(&body[i + 2..i + 2 + len]);
                body.drain(..i + 2 + len + 2);
            }
            if out.len() >= want {
                return (head, out);
            }
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0);
            body.extend_from_slice(&b[..n]);
        }
    }

    #[tokio::test]
    async fn serves_live_pattern_and_rejoins_at_live_edge() {
        let src = SyntheticSource::start(SourceConfig {
            bitrate_kbps: 800,
            ..SourceConfig::default()
        })
        .await
        .unwrap();
        let p = src.pattern();
        let (head, body) = read_some(src.addr(), 4000).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("application/octet-stream")
        );
        let o1 = p.locate(&body).unwrap();
        assert!(p.matches(o1, &body));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, body2) = read_some(src.addr(), 1000).await;
        let o2 = p.locate(&body2).unwrap();
        assert!(p.matches(o2, &body2));
        // The second client starts at the live edge, ~300 ms (10 KB at 800 kbps) later.
        assert!(o2 > o1 + 5_000, "o1 {o1} o2 {o2}");
        assert!(o2 <= src.live_offset());
        assert_eq!(src.connections(), 2);
        src.shutdown().await;
    }
}
