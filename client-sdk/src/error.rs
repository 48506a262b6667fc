//! The SDK's error type.

use std::sync::Arc;

use starling_proto::wire::{ErrorCode, WireError};

/// Everything that can go wrong in the SDK.
///
/// The type is `Clone` (I/O errors are shared behind an [`Arc`]) so that the reason a
/// viewer stopped can be handed to every caller of [`crate::Viewer::closed`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum SdkError {
    /// A configuration value is unusable (bad URL, empty broadcast id...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The control plane could not be reached (transport error).
    #[error("control plane unreachable: {0}")]
    ControlUnavailable(String),
    /// The control plane answered the call with an error status.
    #[error("control plane rejected {call}: {code:?}: {message}")]
    ControlRejected {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// The control plane's answer is unusable (e.g. no data-plane address).
    #[error("bad control plane response: {0}")]
    ControlResponse(String),
    /// The TCP connection to the data plane could not be opened.
    #[error("cannot connect to data plane at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The data plane sent `ERROR` (or a fatal `GOODBYE`).
    #[error("data plane refused: {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The data plane speaks no protocol version this build speaks.
    #[error("no common protocol version (server chose {0})")]
    VersionMismatch(u16),
    /// Malformed bytes on the wire.
    #[error("wire protocol error: {0}")]
    Wire(#[from] WireError),
    /// A well-formed but unexpected frame (e.g. `CHUNK` before `STREAM_INFO`).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// An operation did not complete in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The connection closed (EOF) at a point where the protocol needs more.
    #[error("connection closed by the data plane")]
    Closed,
    /// The broadcast ended (data plane `GOODBYE BroadcastStopped`).
    #[error("broadcast ended: {0}")]
    BroadcastEnded(String),
    /// The control plane reports the session inactive (heartbeat `active = false`).
    #[error("session no longer active (revoked or broadcast stopped)")]
    SessionInactive,
    /// The local HTTP endpoint could not be bound.
    #[error("cannot bind the local HTTP endpoint on {addr}: {source}")]
    HttpBind {
        addr: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The peer listener (for relaying) could not be bound.
    #[error("cannot bind the peer listener on {addr}: {source}")]
    PeerBind {
        addr: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Other I/O error.
    #[error("i/o error: {0}")]
    Io(#[source] Arc<std::io::Error>),
}

impl From<std::io::Error> for SdkError {
    fn from(e: std::io::Error) -> Self {
        SdkError::Io(Arc::new(e))
    }
}

impl SdkError {
    pub(crate) fn from_status(call: &'static str, s: tonic::Status) -> SdkError {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                SdkError::ControlUnavailable(format!("{call}: {}", s.message()))
            }
            code => SdkError::ControlRejected {
                call,
                code,
                message: s.message().to_string(),
            },
        }
    }

    /// The server's error code, when this error is a data-plane refusal.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            SdkError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when retrying the same request cannot succeed (bad broadcast, no rights,
    /// incompatible versions, the broadcast ended...). Transport failures are not fatal.
    pub fn is_fatal(&self) -> bool {
        match self {
            SdkError::Server { code, .. } => is_fatal_code(*code),
            SdkError::Config(_)
            | SdkError::VersionMismatch(_)
            | SdkError::BroadcastEnded(_)
            | SdkError::SessionInactive
            | SdkError::HttpBind { .. }
            | SdkError::PeerBind { .. } => true,
            SdkError::ControlRejected { code, .. } => matches!(
                code,
                tonic::Code::NotFound
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
            ),
            _ => false,
        }
    }
}

/// Wire error codes after which reconnecting to the same node with the same token is
/// pointless (a fresh `Join` may still help, except after [`ErrorCode::Revoked`]).
pub(crate) fn is_fatal_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::UnknownBroadcast
            | ErrorCode::BroadcastStopped
            | ErrorCode::Unauthorized
            | ErrorCode::TokenExpired
            | ErrorCode::Revoked
            | ErrorCode::UnsupportedVersion
    )
}
