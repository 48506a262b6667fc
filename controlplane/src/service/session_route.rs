//! The `ViewerService` as served: the generated `ViewerServiceServer`, except that
//! `ViewerService.Session` is routed to [`Core::open_session`] here, with its own
//! response body ([`SessionBody`]). tonic's response body encodes every message into one
//! per-stream buffer that keeps the size of the largest message sent (a session
//! stream's first message, with every parent and its ticket, is ten times a delta's
//! size) for the life of the stream; [`SessionBody`] frames each `SessionDown` in an
//! allocation of its own size ([`starling_proto::codec::grpc_frame`]), freed once
//! HTTP/2 has written it, so a held stream keeps no encode buffer at all. The request
//! side ([`Inbound`]) reads the `SessionUp` frames straight off the request body
//! ([`starling_proto::codec::FrameReader`]: bytes are held only while a frame is
//! incomplete) instead of `tonic::Streaming` (some 400 bytes of state and a buffer per
//! stream).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Bytes, Frame};
use starling_proto::codec::{FrameReader, grpc_frame};
use starling_proto::v1::SessionUp;
use starling_proto::v1::viewer_service_server::ViewerServiceServer;
use tokio_stream::Stream;
use tonic::Status;
use tonic::codegen::http;
use tonic::server::NamedService;

use super::session_stream::SessionStream;
use super::{Api, Core};

/// The path of `ViewerService.Session`.
const SESSION_PATH: &str = "/starling.v1.ViewerService/Session";

/// The served `ViewerService` ([`Api::viewer_service`]; see the module docs).
#[derive(Debug, Clone)]
pub struct ViewerRoutes {
    generated: ViewerServiceServer<Api>,
    core: Arc<Core>,
    max_decoding: usize,
}

impl Api {
    /// The `ViewerService` to serve: requests larger than `max_decoding` bytes are
    /// refused.
    pub fn viewer_service(&self, max_decoding: usize) -> ViewerRoutes {
        ViewerRoutes {
            generated: ViewerServiceServer::new(self.clone())
                .max_decoding_message_size(max_decoding),
            core: self.core.clone(),
            max_decoding,
        }
    }
}

impl NamedService for ViewerRoutes {
    const NAME: &'static str = <ViewerServiceServer<Api> as NamedService>::NAME;
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl tower_service::Service<http::Request<tonic::body::Body>> for ViewerRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> ResponseFuture {
        if req.uri().path() != SESSION_PATH {
            return tower_service::Service::call(&mut self.generated, req);
        }
        let core = self.core.clone();
        let max_decoding = self.max_decoding;
        Box::pin(async move { Ok(session(core, req, max_decoding).await) })
    }
}

/// Opens a session stream: the stream's response, or a trailers-only error response.
async fn session(
    core: Arc<Core>,
    req: http::Request<tonic::body::Body>,
    max_decoding: usize,
) -> http::Response<tonic::body::Body> {
    let req = tonic::Request::from_http(req.map(|body| Inbound::Raw {
        body,
        frames: FrameReader::new(max_decoding),
        ended: false,
    }));
    let remote = req.remote_addr();
    match core.open_session(req.into_inner(), remote).await {
        Ok(stream) => {
            let mut response = http::Response::new(tonic::body::Body::new(SessionBody {
                stream,
                ended: false,
            }));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(e) => e.into_status("Session").into_http(),
    }
}

/// The response body of a session stream: one exact-size data frame per `SessionDown`,
/// then the trailers with the stream's status.
struct SessionBody {
    stream: SessionStream,
    /// The trailers were sent.
    ended: bool,
}

impl tonic::codegen::Body for SessionBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let status = match Pin::new(&mut this.stream).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(down))) => match grpc_frame(&down) {
                Ok(frame) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(frame))))),
                Err(status) => status,
            },
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        this.ended = true;
        let mut trailers = http::HeaderMap::with_capacity(3);
        Poll::Ready(Some(
            status
                .add_header(&mut trailers)
                .map(|()| Frame::trailers(trailers)),
        ))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// The viewer's side of a session stream: its `SessionUp` messages.
pub(super) enum Inbound {
    /// Read off the request body here (the served route).
    Raw {
        body: tonic::body::Body,
        frames: FrameReader,
        /// The body ended (or failed): only buffered frames are left.
        ended: bool,
    },
    /// Decoded by tonic (the generated `ViewerService::session`, not served).
    Tonic(Box<tonic::Streaming<SessionUp>>),
}

impl Stream for Inbound {
    type Item = Result<SessionUp, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<SessionUp, Status>>> {
        let (body, frames, ended) = match self.get_mut() {
            Inbound::Tonic(streaming) => return Pin::new(&mut **streaming).poll_next(cx),
            Inbound::Raw {
                body,
                frames,
                ended,
            } => (body, frames, ended),
        };
        loop {
            if let Some(message) = frames.next_message::<SessionUp>() {
                if message.is_err() {
                    *ended = true;
                }
                return Poll::Ready(Some(message));
            }
            if *ended {
                return Poll::Ready(if frames.is_empty() {
                    None
                } else {
                    *frames = FrameReader::new(0);
                    Some(Err(Status::internal("the stream ended inside a message")))
                });
            }
            match tonic::codegen::Body::poll_frame(Pin::new(&mut *body), cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => *ended = true,
                Poll::Ready(Some(Err(status))) => {
                    *ended = true;
                    *frames = FrameReader::new(0);
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers carry nothing a request needs.
                    if let Some(data) = frame.data_ref() {
                        frames.push(data);
                    }
                }
            }
        }
    }
}
