//! The SDK's error type, and the one classification of what the SDK does after an
//! error on a viewer's data-plane connection ([`SdkError::recovery`]).

use std::sync::Arc;

use starling_proto::wire::{ErrorCode, Reason, WireError};

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
    /// The control plane is overloaded (`RESOURCE_EXHAUSTED`, e.g. a flash crowd of
    /// joins) and asked to be called again after `retry_after` (its
    /// `grpc-retry-pushback-ms` trailer; `None`: it did not say).
    #[error("control plane busy ({call}): {message}")]
    ControlBusy {
        call: &'static str,
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    /// The stream could not be verified (e.g. `Join` returned no chunk keys) and
    /// [`ViewerConfig::allow_unverified`](crate::ViewerConfig::allow_unverified) is off.
    #[error("refusing to play unverified: {0}")]
    Unverifiable(String),
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
                // A transport failure's reason (e.g. the server's certificate is not
                // trusted) is in the status's source chain, not its message.
                let why = std::error::Error::source(&s)
                    .map(|e| format!(" ({})", starling_proto::transport::error_chain(e)))
                    .unwrap_or_default();
                SdkError::ControlUnavailable(format!("{call}: {}{why}", s.message()))
            }
            tonic::Code::ResourceExhausted => SdkError::ControlBusy {
                call,
                message: s.message().to_string(),
                retry_after: retry_pushback(s.metadata()),
            },
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
            | SdkError::Unverifiable(_)
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

/// What the SDK does after an error on a viewer's data-plane connection (or a failed
/// re-`Join`). The one classification the plain receiver and the relay engine share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Stop the viewer with [`SdkError::into_final`] of the error: no reconnect and no
    /// `Join` can help (the broadcast ended, this viewer is revoked, the node of a
    /// fresh `Join` refused it again, the configuration or the control plane's answer
    /// to `Join` rules it out).
    Fatal,
    /// Call `Join` again before the next connection attempt: this node or this token
    /// cannot serve the viewer any more (the node lost the broadcast, is shutting down
    /// or speaks no version of ours; the token expired or is refused), while a fresh
    /// `Join` names the broadcast's node now and issues a new token.
    Rejoin,
    /// Reconnect to the same node after the back-off: a transport failure or a
    /// transient refusal. Counted as a failure: after `rejoin_after_failures` in a row
    /// the viewer re-joins anyway (with a control plane; the broadcast may have moved).
    Reconnect,
}

/// What the viewer's last `Join` has shown, which decides whether another one can fix
/// a refusal ([`SdkError::recovery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinState {
    /// No control plane ([`crate::Viewer::connect_direct`]): there is nothing to re-join.
    NoControlPlane,
    /// `Join` answered and the data plane has delivered no chunk since: a refusal now
    /// comes from the node and token that `Join` just gave, so another `Join` would
    /// be refused alike.
    Fresh,
    /// The data plane has delivered since the last `Join`: the node or the token may
    /// have changed since, so one more `Join` may fix a refusal.
    Delivered,
}

impl SdkError {
    /// What to do after this error on a data-plane connection (or a re-`Join`), given
    /// what the last `Join` has shown:
    ///
    /// - [`Recovery::Fatal`]: the broadcast ended ([`SdkError::BroadcastEnded`],
    ///   `BROADCAST_STOPPED`); `REVOKED` (no `Join` will help); a refusal of this node
    ///   or token (`UNKNOWN_BROADCAST`, `UNAUTHORIZED`, `TOKEN_EXPIRED`,
    ///   `UNSUPPORTED_VERSION`, or [`SdkError::VersionMismatch`] found by the SDK) right
    ///   after a fresh `Join` or without a control plane; errors no retry changes
    ///   ([`SdkError::Config`], [`SdkError::SessionInactive`], binds); a control-plane
    ///   rejection [`SdkError::is_fatal`] calls fatal (`NOT_FOUND`, `PERMISSION_DENIED`...).
    /// - [`Recovery::Rejoin`]: that refusal of this node or token after the data plane
    ///   delivered (once: the `Join` makes the state [`JoinState::Fresh`]);
    ///   `SHUTTING_DOWN` with a control plane (the broadcast moves to another node).
    /// - [`Recovery::Reconnect`]: everything else: transport errors (connect, I/O,
    ///   EOF, time-outs, malformed or unexpected frames), transient refusals
    ///   (`SERVER_BUSY`, `TOO_SLOW`, `IDLE_TIMEOUT`, unknown codes...), `SHUTTING_DOWN`
    ///   without a control plane, and a control plane that is unreachable or answers
    ///   unusably.
    pub(crate) fn recovery(&self, join: JoinState) -> Recovery {
        // A refusal of this node or token: a `Join` may fix it once, not twice.
        let rejoin_once = match join {
            JoinState::Delivered => Recovery::Rejoin,
            JoinState::Fresh | JoinState::NoControlPlane => Recovery::Fatal,
        };
        match self {
            SdkError::Server {
                code: ErrorCode::BroadcastStopped | ErrorCode::Revoked,
                ..
            } => Recovery::Fatal,
            SdkError::Server { code, .. } if is_fatal_code(*code) => rejoin_once,
            SdkError::Server { code, .. } if *code == ErrorCode::ShuttingDown => match join {
                JoinState::NoControlPlane => Recovery::Reconnect,
                JoinState::Fresh | JoinState::Delivered => Recovery::Rejoin,
            },
            SdkError::Server { .. } => Recovery::Reconnect,
            // The same fact as `UNSUPPORTED_VERSION`, found on our side of the handshake.
            SdkError::VersionMismatch(_) => rejoin_once,
            SdkError::BroadcastEnded(_)
            | SdkError::Config(_)
            | SdkError::SessionInactive
            | SdkError::Unverifiable(_)
            | SdkError::HttpBind { .. }
            | SdkError::PeerBind { .. } => Recovery::Fatal,
            SdkError::ControlRejected { .. } if self.is_fatal() => Recovery::Fatal,
            SdkError::ControlRejected { .. }
            | SdkError::ControlBusy { .. }
            | SdkError::ControlUnavailable(_)
            | SdkError::ControlResponse(_)
            | SdkError::Connect { .. }
            | SdkError::Wire(_)
            | SdkError::Protocol(_)
            | SdkError::Timeout(_)
            | SdkError::Closed
            | SdkError::Io(_) => Recovery::Reconnect,
        }
    }

    /// The error a viewer stops with after [`Recovery::Fatal`]: a data-plane refusal
    /// because the broadcast stopped reads as [`SdkError::BroadcastEnded`].
    pub(crate) fn into_final(self) -> SdkError {
        match self {
            SdkError::Server {
                code: ErrorCode::BroadcastStopped,
                ..
            } => SdkError::BroadcastEnded(self.to_string()),
            e => e,
        }
    }

    /// A data-plane `GOODBYE` as an error: `BROADCAST_STOPPED` reads as
    /// [`SdkError::BroadcastEnded`], any other reason as [`SdkError::Server`].
    pub(crate) fn goodbye(reason: Reason) -> SdkError {
        if reason.code == ErrorCode::BroadcastStopped {
            SdkError::BroadcastEnded(reason.message)
        } else {
            SdkError::Server {
                code: reason.code,
                message: reason.message,
            }
        }
    }
}

/// The standard gRPC retry pushback (gRFC A6): `grpc-retry-pushback-ms`, a
/// non-negative decimal number of milliseconds; absent or malformed = `None`. Capped
/// at 10 minutes so a broken server cannot park the SDK forever.
pub(crate) fn retry_pushback(md: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    const CAP_MS: u64 = 600_000;
    let v = md.get("grpc-retry-pushback-ms")?.to_str().ok()?;
    let ms: u64 = v.trim().parse().ok()?;
    Some(std::time::Duration::from_millis(ms.min(CAP_MS)))
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

#[cfg(test)]
mod tests {
    use super::*;

    use JoinState::{Delivered, Fresh, NoControlPlane};
    use Recovery::{Fatal, Reconnect, Rejoin};

    const ALL: [JoinState; 3] = [NoControlPlane, Fresh, Delivered];

    fn refused(code: ErrorCode) -> SdkError {
        SdkError::Server {
            code,
            message: "no".into(),
        }
    }

    /// The recovery in each join state, in the order of [`ALL`].
    fn recoveries(e: &SdkError) -> [Recovery; 3] {
        ALL.map(|j| e.recovery(j))
    }

    #[test]
    fn version_mismatch_rejoins_once_then_stops() {
        // Changed for the relay engine, which reconnected (and re-joined) forever.
        let e = SdkError::VersionMismatch(9);
        assert_eq!(recoveries(&e), [Fatal, Fatal, Rejoin]);
        // Found by the SDK or by the server: the same answer.
        let e = refused(ErrorCode::UnsupportedVersion);
        assert_eq!(recoveries(&e), [Fatal, Fatal, Rejoin]);
    }

    #[test]
    fn refusals_of_node_or_token_rejoin_once_then_stop() {
        // UNKNOWN_BROADCAST after a fresh Join: the relay engine re-joined forever.
        for code in [
            ErrorCode::UnknownBroadcast,
            ErrorCode::Unauthorized,
            ErrorCode::TokenExpired,
        ] {
            assert_eq!(
                recoveries(&refused(code)),
                [Fatal, Fatal, Rejoin],
                "{code:?}"
            );
        }
    }

    #[test]
    fn broadcast_stopped_is_fatal_and_reads_as_ended() {
        let e = refused(ErrorCode::BroadcastStopped);
        assert_eq!(recoveries(&e), [Fatal; 3]);
        assert!(matches!(e.into_final(), SdkError::BroadcastEnded(_)));
        let e = SdkError::BroadcastEnded("bye".into());
        assert_eq!(recoveries(&e), [Fatal; 3]);
        assert!(matches!(e.into_final(), SdkError::BroadcastEnded(m) if m == "bye"));
    }

    #[test]
    fn revoked_is_fatal_even_after_delivery() {
        let e = refused(ErrorCode::Revoked);
        assert_eq!(recoveries(&e), [Fatal; 3]);
        assert_eq!(e.into_final().server_code(), Some(ErrorCode::Revoked));
    }

    #[test]
    fn shutting_down_rejoins_with_a_control_plane() {
        let e = refused(ErrorCode::ShuttingDown);
        assert_eq!(recoveries(&e), [Reconnect, Rejoin, Rejoin]);
    }

    #[test]
    fn transient_refusals_reconnect() {
        for code in [
            ErrorCode::ServerBusy,
            ErrorCode::TooSlow,
            ErrorCode::IdleTimeout,
            ErrorCode::SeqOutOfWindow,
            ErrorCode::MalformedFrame,
            ErrorCode::UnexpectedFrame,
            ErrorCode::BadChunk,
            ErrorCode::Normal,
            ErrorCode::Internal,
            ErrorCode::Other(999),
        ] {
            assert_eq!(recoveries(&refused(code)), [Reconnect; 3], "{code:?}");
        }
    }

    #[test]
    fn transport_errors_reconnect() {
        let io = || Arc::new(std::io::Error::other("reset"));
        for e in [
            SdkError::Connect {
                addr: "a:1".into(),
                source: io(),
            },
            SdkError::Io(io()),
            SdkError::Closed,
            SdkError::Timeout("waiting for data"),
            SdkError::Protocol("unexpected frame".into()),
            SdkError::Wire(WireError::UnknownFrameType(0x7f)),
        ] {
            assert_eq!(recoveries(&e), [Reconnect; 3], "{e}");
        }
    }

    #[test]
    fn errors_no_retry_changes_are_fatal() {
        // Changed for the relay engine, which reconnected after a `Config` error (the
        // data-plane path produces none today).
        let io = || Arc::new(std::io::Error::other("in use"));
        for e in [
            SdkError::Config("bad".into()),
            SdkError::SessionInactive,
            SdkError::HttpBind {
                addr: "a:1".into(),
                source: io(),
            },
            SdkError::PeerBind {
                addr: "a:1".into(),
                source: io(),
            },
        ] {
            assert_eq!(recoveries(&e), [Fatal; 3], "{e}");
        }
    }

    #[test]
    fn failed_rejoins_stop_only_on_a_final_rejection() {
        let rejected = |code| SdkError::ControlRejected {
            call: "Join",
            code,
            message: "no".into(),
        };
        for code in [
            tonic::Code::NotFound,
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
            tonic::Code::FailedPrecondition,
            tonic::Code::InvalidArgument,
        ] {
            assert_eq!(recoveries(&rejected(code)), [Fatal; 3], "{code:?}");
        }
        for e in [
            rejected(tonic::Code::Internal),
            rejected(tonic::Code::ResourceExhausted),
            SdkError::ControlUnavailable("down".into()),
            SdkError::ControlResponse("no address".into()),
            SdkError::ControlBusy {
                call: "Join",
                message: "busy".into(),
                retry_after: None,
            },
        ] {
            assert_eq!(recoveries(&e), [Reconnect; 3], "{e}");
        }
    }

    #[test]
    fn resource_exhausted_reads_its_retry_pushback() {
        let status = |v: Option<&'static str>| {
            let mut s = tonic::Status::resource_exhausted("crowd");
            if let Some(v) = v {
                s.metadata_mut().insert(
                    "grpc-retry-pushback-ms",
                    tonic::metadata::MetadataValue::from_static(v),
                );
            }
            SdkError::from_status("Join", s)
        };
        let retry = |e: SdkError| match e {
            SdkError::ControlBusy { retry_after, .. } => retry_after,
            other => panic!("not busy: {other}"),
        };
        assert_eq!(
            retry(status(Some("250"))),
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(retry(status(None)), None);
        assert_eq!(retry(status(Some("soon"))), None);
        assert_eq!(retry(status(Some("-5"))), None);
        assert_eq!(
            retry(status(Some("99999999999"))),
            Some(std::time::Duration::from_secs(600))
        );
        assert!(!status(None).is_fatal());
    }

    #[test]
    fn goodbye_maps_broadcast_stopped_to_ended() {
        let r = |code| Reason {
            code,
            message: "m".into(),
        };
        assert!(matches!(
            SdkError::goodbye(r(ErrorCode::BroadcastStopped)),
            SdkError::BroadcastEnded(m) if m == "m"
        ));
        assert_eq!(
            SdkError::goodbye(r(ErrorCode::ShuttingDown)).server_code(),
            Some(ErrorCode::ShuttingDown)
        );
    }
}
