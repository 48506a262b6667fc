//! The operator's dashboard: one web page and the JSON it polls, on an HTTP/1.1
//! listener of its own (`--dashboard-listen`, off unless configured).
//!
//! * The page (`assets/`: HTML, CSS and vanilla JavaScript, no external library, font or
//!   CDN) is compiled into the binary (`include_str!`) and served to anyone: it holds no
//!   data, only the code that asks for it. It draws its charts itself (SVG).
//! * The data (`/api/...`, [`routes`]) is behind the admin credential, checked exactly as
//!   the admin gRPC service checks it ([`Authenticator::check_admin`]): an
//!   `Authorization: Bearer <admin key or admin JWT>` header, else 401 (403 for an
//!   authentic JWT without the admin role). The page asks for the key (kept in the
//!   tab's `sessionStorage`) or reads it from the URL fragment (`#key=...`, never sent to
//!   a server; removed from the address bar once read).
//! * The figures come from a [`Source`] (the admin service's `ListBroadcasts` and
//!   `GetAudience`, implemented in `service`): this module knows nothing of the grid or
//!   the database.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (more are closed at accept),
//! request headers within [`HEADER_READ_TIMEOUT`], request bodies never read, and every
//! answer's size bounded by what `ListBroadcasts` and `GetAudience` (at most
//! `reports::MAX_POINTS` points) return.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use starling_proto::v1::{AudiencePoint, Broadcast, GetAudienceRequest};
use tokio::net::TcpListener;

use crate::auth::Authenticator;

mod json;
pub mod routes;

/// Most dashboard connections open at once; beyond, new ones are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that has not sent a request's headers within this time is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the dashboard's figures come from (the admin service, in `service`).
pub trait Source: Send + Sync + 'static {
    /// Broadcasts (created and live; stopped ones too with `include_stopped`), with
    /// their live grid figures: `AdminService.ListBroadcasts`.
    fn broadcasts(
        &self,
        include_stopped: bool,
    ) -> impl Future<Output = Result<Vec<Broadcast>, SourceError>> + Send;

    /// A broadcast's per-minute audience roll-ups: `AdminService.GetAudience`.
    fn audience(
        &self,
        request: GetAudienceRequest,
    ) -> impl Future<Output = Result<Vec<AudiencePoint>, SourceError>> + Send;
}

/// Why a [`Source`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Bad request (answered 400).
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown broadcast (answered 404).
    #[error("{0}")]
    NotFound(String),
    /// Temporarily impossible, e.g. the database is down (answered 503).
    #[error("{0}")]
    Unavailable(String),
}

/// Binds the dashboard's listener; returns it with its address (the real port when
/// `addr`'s was 0).
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Serves the dashboard on `listener` until the task is dropped or aborted.
pub async fn serve<S: Source>(listener: TcpListener, auth: Arc<Authenticator>, source: Arc<S>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "dashboard listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "dashboard connection refused: too many open");
            drop(stream);
            continue;
        };
        let auth = auth.clone();
        let source = source.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let auth = auth.clone();
                    let source = source.clone();
                    async move {
                        let (parts, _body) = req.into_parts();
                        Ok::<_, std::convert::Infallible>(
                            routes::handle(&parts, &auth, &*source, remote).await,
                        )
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "dashboard connection ended with an error");
            }
            drop(permit);
        });
    }
}
