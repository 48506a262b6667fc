//! Status codes ([`StarlingStatus`]), the mapping of [`SdkError`] onto them, and the
//! thread-local last-error message that goes with every code other than `STARLING_OK`.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};

use starling_sdk::{ErrorCode, SdkError};

/// What a call returned. `STARLING_OK` (0) is success; the two positive codes are
/// outcomes of `starling_viewer_read`, not failures; every negative code is an error,
/// and its message is then available from `starling_last_error()` on the same thread.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StarlingStatus {
    /// Success.
    StarlingOk = 0,
    /// `starling_viewer_read`: no stream bytes arrived within the timeout. Not an error:
    /// call again.
    StarlingTimeout = 1,
    /// `starling_viewer_read`: the stream ended normally (the broadcast ended, or the
    /// viewer was stopped) and every byte has been read.
    StarlingEndOfStream = 2,
    /// A required pointer was NULL, a string was not UTF-8, or a value is out of range.
    StarlingErrInvalidArgument = -1,
    /// The call does not fit the viewer's state (e.g. read before start, start twice,
    /// read while a data callback is registered, stop from inside the data callback).
    StarlingErrInvalidState = -2,
    /// The configuration was refused (bad URL or address, empty broadcast id...).
    StarlingErrConfig = -3,
    /// No such broadcast (unknown to the control plane or the data plane).
    StarlingErrNotFound = -4,
    /// The credential or chunk token was refused, expired or revoked.
    StarlingErrUnauthorized = -5,
    /// The control plane is unreachable, overloaded, or its answer is unusable.
    StarlingErrControlPlane = -6,
    /// The data plane is unreachable, or the connection was lost or timed out.
    StarlingErrNetwork = -7,
    /// The data plane refused the session or broke the protocol (version mismatch,
    /// malformed frames).
    StarlingErrProtocol = -8,
    /// The local HTTP endpoint or the peer listener could not bind its address.
    StarlingErrBind = -9,
    /// The library's runtime or one of its threads could not be started.
    StarlingErrRuntime = -10,
    /// A bug in the library (a Rust panic, caught at the boundary). The viewer may be
    /// unusable; stop and free it.
    StarlingErrInternal = -11,
    /// The caller's buffer is too small; the message says how many bytes are needed.
    StarlingErrBufferTooSmall = -12,
    /// The stream cannot be verified (the control plane's `Join` answer carried no chunk
    /// keys) and `allow_unverified` is false.
    StarlingErrUnverified = -13,
}

/// Every code, for `starling_status_name` and the tests.
pub(crate) const ALL: [StarlingStatus; 16] = [
    StarlingStatus::StarlingOk,
    StarlingStatus::StarlingTimeout,
    StarlingStatus::StarlingEndOfStream,
    StarlingStatus::StarlingErrInvalidArgument,
    StarlingStatus::StarlingErrInvalidState,
    StarlingStatus::StarlingErrConfig,
    StarlingStatus::StarlingErrNotFound,
    StarlingStatus::StarlingErrUnauthorized,
    StarlingStatus::StarlingErrControlPlane,
    StarlingStatus::StarlingErrNetwork,
    StarlingStatus::StarlingErrProtocol,
    StarlingStatus::StarlingErrBind,
    StarlingStatus::StarlingErrRuntime,
    StarlingStatus::StarlingErrInternal,
    StarlingStatus::StarlingErrBufferTooSmall,
    StarlingStatus::StarlingErrUnverified,
];

impl StarlingStatus {
    /// The code's name as in the header, NUL-terminated.
    pub fn name(self) -> &'static CStr {
        match self {
            StarlingStatus::StarlingOk => c"STARLING_OK",
            StarlingStatus::StarlingTimeout => c"STARLING_TIMEOUT",
            StarlingStatus::StarlingEndOfStream => c"STARLING_END_OF_STREAM",
            StarlingStatus::StarlingErrInvalidArgument => c"STARLING_ERR_INVALID_ARGUMENT",
            StarlingStatus::StarlingErrInvalidState => c"STARLING_ERR_INVALID_STATE",
            StarlingStatus::StarlingErrConfig => c"STARLING_ERR_CONFIG",
            StarlingStatus::StarlingErrNotFound => c"STARLING_ERR_NOT_FOUND",
            StarlingStatus::StarlingErrUnauthorized => c"STARLING_ERR_UNAUTHORIZED",
            StarlingStatus::StarlingErrControlPlane => c"STARLING_ERR_CONTROL_PLANE",
            StarlingStatus::StarlingErrNetwork => c"STARLING_ERR_NETWORK",
            StarlingStatus::StarlingErrProtocol => c"STARLING_ERR_PROTOCOL",
            StarlingStatus::StarlingErrBind => c"STARLING_ERR_BIND",
            StarlingStatus::StarlingErrRuntime => c"STARLING_ERR_RUNTIME",
            StarlingStatus::StarlingErrInternal => c"STARLING_ERR_INTERNAL",
            StarlingStatus::StarlingErrBufferTooSmall => c"STARLING_ERR_BUFFER_TOO_SMALL",
            StarlingStatus::StarlingErrUnverified => c"STARLING_ERR_UNVERIFIED",
        }
    }
}

/// A failed call: its code and message, turned into the return value and the
/// thread-local message by the entry point ([`crate::guard`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: StarlingStatus,
    pub message: String,
}

impl Failure {
    pub fn new(status: StarlingStatus, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(StarlingStatus::StarlingErrInvalidArgument, message)
    }

    pub fn state(message: impl Into<String>) -> Failure {
        Failure::new(StarlingStatus::StarlingErrInvalidState, message)
    }
}

impl From<SdkError> for Failure {
    fn from(e: SdkError) -> Failure {
        Failure::new(status_of(&e), e.to_string())
    }
}

/// The code an SDK error is reported with.
pub fn status_of(e: &SdkError) -> StarlingStatus {
    use StarlingStatus as S;
    match e {
        SdkError::Config(_) => S::StarlingErrConfig,
        SdkError::ControlRejected { code, .. } => match code {
            tonic::Code::NotFound => S::StarlingErrNotFound,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                S::StarlingErrUnauthorized
            }
            _ => S::StarlingErrControlPlane,
        },
        SdkError::ControlUnavailable(_)
        | SdkError::ControlBusy { .. }
        | SdkError::ControlResponse(_) => S::StarlingErrControlPlane,
        SdkError::Server { code, .. } => match code {
            ErrorCode::UnknownBroadcast => S::StarlingErrNotFound,
            ErrorCode::Unauthorized | ErrorCode::TokenExpired | ErrorCode::Revoked => {
                S::StarlingErrUnauthorized
            }
            ErrorCode::BroadcastStopped => S::StarlingEndOfStream,
            _ => S::StarlingErrProtocol,
        },
        SdkError::BroadcastEnded(_) => S::StarlingEndOfStream,
        SdkError::SessionInactive => S::StarlingErrUnauthorized,
        SdkError::VersionMismatch(_) | SdkError::Wire(_) | SdkError::Protocol(_) => {
            S::StarlingErrProtocol
        }
        SdkError::Connect { .. } | SdkError::Timeout(_) | SdkError::Closed | SdkError::Io(_) => {
            S::StarlingErrNetwork
        }
        SdkError::HttpBind { .. } | SdkError::PeerBind { .. } => S::StarlingErrBind,
        SdkError::Unverifiable(_) => S::StarlingErrUnverified,
    }
}

thread_local! {
    /// The message of the last failed call on this thread (with its NUL).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error (interior NULs are replaced).
pub fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "?")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A pointer to this thread's last error message; valid until the next call into the
/// library on this thread.
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_header_name() {
        let mut names: Vec<_> = ALL.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for s in ALL {
            let n = s.name().to_str().unwrap_or_default();
            assert!(n.starts_with("STARLING_"), "{n}");
            // Errors are negative, outcomes are not.
            assert_eq!(n.starts_with("STARLING_ERR_"), (s as i32) < 0, "{n}");
        }
    }

    #[test]
    fn sdk_errors_map_to_codes() {
        use StarlingStatus as S;
        let cases = [
            (SdkError::Config("x".into()), S::StarlingErrConfig),
            (
                SdkError::BroadcastEnded("bye".into()),
                S::StarlingEndOfStream,
            ),
            (
                SdkError::Server {
                    code: ErrorCode::UnknownBroadcast,
                    message: String::new(),
                },
                S::StarlingErrNotFound,
            ),
            (
                SdkError::Server {
                    code: ErrorCode::Revoked,
                    message: String::new(),
                },
                S::StarlingErrUnauthorized,
            ),
            (
                SdkError::ControlRejected {
                    call: "Join",
                    code: tonic::Code::NotFound,
                    message: String::new(),
                },
                S::StarlingErrNotFound,
            ),
            (
                SdkError::ControlUnavailable("down".into()),
                S::StarlingErrControlPlane,
            ),
            (SdkError::Closed, S::StarlingErrNetwork),
            (SdkError::VersionMismatch(9), S::StarlingErrProtocol),
        ];
        for (e, want) in cases {
            assert_eq!(status_of(&e), want, "{e}");
        }
    }

    #[test]
    fn last_error_is_per_thread_and_nul_safe() {
        set_last_error("boom\0tail");
        let read = || LAST_ERROR.with(|e| e.borrow().to_string_lossy().into_owned());
        assert_eq!(read(), "boom?tail");
        let other = std::thread::spawn(move || LAST_ERROR.with(|e| e.borrow().is_empty()))
            .join()
            .unwrap_or(false);
        assert!(other, "another thread sees its own (empty) message");
    }
}
