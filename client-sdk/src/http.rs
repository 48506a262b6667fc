//! The local HTTP endpoint: `GET /live/{broadcast}` (also `/` and `/stream`) serves the
//! in-order stream to any media player, starting at the newest random access chunk.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::hub::Subscription;
use crate::shared::{Shared, stopped};

type HttpBody = UnsyncBoxBody<Bytes, Infallible>;

/// Accepts connections until the viewer stops.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.stop_signal();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!("local HTTP accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(%peer, "local HTTP client");
        let shared = shared.clone();
        let mut stop = shared.stop_signal();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, "local HTTP connection: {e}");
                },
                _ = stopped(&mut stop) => {}
            }
        });
    }
}

fn plain(status: StatusCode, msg: &'static str) -> Response<HttpBody> {
    let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Response<HttpBody> {
    let path = req.uri().path();
    let ours = match path {
        "/" | "/stream" => true,
        _ => path
            .strip_prefix("/live/")
            .is_some_and(|id| id == shared.broadcast_id),
    };
    if !ours {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
    };
    let content_type = |shared: &Shared| {
        shared
            .hub
            .content_type()
            .and_then(|ct| HeaderValue::from_str(&ct).ok())
            .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"))
    };
    let body = if head {
        Full::new(Bytes::new()).boxed_unsync()
    } else {
        let mut sub = shared.hub.subscribe();
        // Wait for the first bytes, so that the content type is known and the player
        // gets data with the headers.
        let Some(first) = sub.next_bytes().await else {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "stream ended\n");
        };
        MediaBody {
            first: Some(first),
            sub,
        }
        .boxed_unsync()
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, content_type(&shared));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    if head {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Streams a subscription as a response body.
struct MediaBody {
    first: Option<Bytes>,
    sub: Subscription,
}

impl Body for MediaBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(b) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        this.sub
            .poll_bytes(cx)
            .map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
