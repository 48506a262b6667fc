//! Request failures of the three services ([`ApiError`]) and their mapping to gRPC
//! statuses (logged once, at the service edge).

use std::time::Duration;

use tonic::Status;

use crate::store::StoreError;
use crate::validate::Invalid;

/// Why a request failed; converted to a gRPC status (and logged) at the service edge.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown id.
    #[error("{0}")]
    NotFound(String),
    /// The operation is not allowed in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// What the request would create clashes with something that exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// Temporarily impossible; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// No valid credential (`UNAUTHENTICATED`) or not allowed (`PERMISSION_DENIED`): the
    /// status as built by [`crate::auth`], whose message never holds a secret.
    #[error("{}", .0.message())]
    Auth(Status),
    /// Not allowed (not a credential problem: e.g. a `peer_addr` that is not the
    /// caller's).
    #[error("{0}")]
    PermissionDenied(String),
    /// A rate limit: retry after the delay (sent as `grpc-retry-pushback-ms`).
    #[error("{0}")]
    ResourceExhausted(String, Duration),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::InvalidArgument(e.0)
    }
}

impl ApiError {
    pub(super) fn into_status(self, rpc: &'static str) -> Status {
        match self {
            ApiError::InvalidArgument(m) => {
                tracing::info!(rpc, error = %m, "rejected: invalid argument");
                Status::invalid_argument(m)
            }
            ApiError::NotFound(m) => {
                tracing::info!(rpc, error = %m, "rejected: not found");
                Status::not_found(m)
            }
            ApiError::FailedPrecondition(m) => {
                tracing::info!(rpc, error = %m, "rejected: failed precondition");
                Status::failed_precondition(m)
            }
            ApiError::Unavailable(m) => {
                tracing::info!(rpc, error = %m, "rejected: unavailable");
                Status::unavailable(m)
            }
            ApiError::AlreadyExists(m) => {
                tracing::warn!(rpc, error = %m, "rejected: already exists");
                Status::already_exists(m)
            }
            ApiError::PermissionDenied(m) => {
                tracing::warn!(rpc, error = %m, "rejected: permission denied");
                Status::permission_denied(m)
            }
            ApiError::ResourceExhausted(m, retry) => {
                tracing::info!(rpc, error = %m, retry_ms = retry.as_millis(), "rejected: rate limit");
                let mut status = Status::resource_exhausted(m);
                // The standard gRPC retry pushback (gRFC A6), in the trailers.
                let ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX).max(1);
                if let Ok(v) = ms.to_string().parse() {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", v);
                }
                status
            }
            ApiError::Auth(status) => {
                tracing::info!(rpc, code = ?status.code(), error = status.message(), "rejected: credential");
                status
            }
            ApiError::Storage(e) => {
                tracing::error!(rpc, error = %e, "storage error");
                Status::internal(format!("storage error: {e}"))
            }
        }
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;
