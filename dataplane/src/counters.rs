//! The data plane's node-wide counters ([`Metrics`]): relaxed atomics shared by every
//! executor and the ingest thread, updated on the chunk path without a lock, and the
//! bounded label sets they are counted by. Rendering them is [`crate::metrics`]'s job.

use crate::auth::Denied;
use crate::limits::Refused;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Wire = 0,
    Http = 1,
}

impl Listener {
    pub(crate) const ALL: [Listener; 2] = [Listener::Wire, Listener::Http];
    pub(crate) fn label(self) -> &'static str {
        match self {
            Listener::Wire => "wire",
            Listener::Http => "http",
        }
    }
}

/// Why a connection ended (a bounded label set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client said GOODBYE, or an HTTP request was answered completely.
    Normal = 0,
    /// The client closed the socket (EOF).
    PeerClosed,
    /// Malformed bytes (wire decoding error, bad HTTP request).
    ProtocolError,
    /// A valid frame at the wrong point of the session.
    UnexpectedFrame,
    /// No common protocol version.
    UnsupportedVersion,
    UnknownBroadcast,
    ServerBusy,
    /// Handshake (or HTTP request head) not complete in time.
    HandshakeTimeout,
    /// Nothing received (not even PONG) for the idle timeout.
    IdleTimeout,
    BroadcastStopped,
    /// Fell out of the window too often, or the socket accepted nothing for too long.
    TooSlow,
    /// The client sent ERROR.
    ClientError,
    /// Any other socket error.
    IoError,
    /// No valid chunk token (wire `ERROR(UNAUTHORIZED)`, HTTP 401/403).
    Unauthorized,
    /// The peer was revoked (`GOODBYE`/`ERROR(REVOKED)`).
    Revoked,
    /// The chunk token expired without renewal (`GOODBYE(TOKEN_EXPIRED)`).
    TokenExpired,
    /// A per-connection rate limit was exceeded (`TOKEN` renewals:
    /// `ERROR(SERVER_BUSY)`).
    RateLimited,
}

impl CloseReason {
    const COUNT: usize = 17;
    pub(crate) const ALL: [CloseReason; Self::COUNT] = [
        CloseReason::Normal,
        CloseReason::PeerClosed,
        CloseReason::ProtocolError,
        CloseReason::UnexpectedFrame,
        CloseReason::UnsupportedVersion,
        CloseReason::UnknownBroadcast,
        CloseReason::ServerBusy,
        CloseReason::HandshakeTimeout,
        CloseReason::IdleTimeout,
        CloseReason::BroadcastStopped,
        CloseReason::TooSlow,
        CloseReason::ClientError,
        CloseReason::IoError,
        CloseReason::Unauthorized,
        CloseReason::Revoked,
        CloseReason::TokenExpired,
        CloseReason::RateLimited,
    ];
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::UnexpectedFrame => "unexpected_frame",
            CloseReason::UnsupportedVersion => "unsupported_version",
            CloseReason::UnknownBroadcast => "unknown_broadcast",
            CloseReason::ServerBusy => "server_busy",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BroadcastStopped => "broadcast_stopped",
            CloseReason::TooSlow => "too_slow",
            CloseReason::ClientError => "client_error",
            CloseReason::IoError => "io_error",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::Revoked => "revoked",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RateLimited => "rate_limited",
        }
    }
}

/// What bytes were sent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentKind {
    /// CHUNK frames pushed to wire subscribers (substream push).
    WirePush = 0,
    /// Answers to REQUEST (CHUNK or NOT_FOUND frames).
    WireRequest,
    /// Other wire frames (HELLO_ACK, STREAM_INFO, PING, PONG, ERROR, GOODBYE).
    WireControl,
    /// Plain HTTP (progressive streams, /metrics, /healthz, errors).
    Http,
}

impl SentKind {
    pub(crate) const ALL: [SentKind; 4] = [
        SentKind::WirePush,
        SentKind::WireRequest,
        SentKind::WireControl,
        SentKind::Http,
    ];
    pub(crate) fn label(self) -> &'static str {
        match self {
            SentKind::WirePush => "wire_push",
            SentKind::WireRequest => "wire_request",
            SentKind::WireControl => "wire_control",
            SentKind::Http => "http",
        }
    }
}

/// Chunks written to viewers, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    WirePush = 0,
    WireRequest,
    Http,
}

impl ChunkKind {
    pub(crate) const ALL: [ChunkKind; 3] =
        [ChunkKind::WirePush, ChunkKind::WireRequest, ChunkKind::Http];
    pub(crate) fn label(self) -> &'static str {
        match self {
            ChunkKind::WirePush => "wire_push",
            ChunkKind::WireRequest => "wire_request",
            ChunkKind::Http => "http",
        }
    }
}

/// Upper bounds (bytes) of the chunk-size histogram buckets (+Inf is implicit).
pub const CHUNK_SIZE_BUCKETS: [u64; 8] = [
    4 << 10,
    16 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    4 << 20,
];

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Node-wide counters, aggregated over executors (relaxed atomics).
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) accepted: [AtomicU64; 2],
    pub(crate) closed: [[AtomicU64; CloseReason::COUNT]; 2],
    pub(crate) bytes_sent: [AtomicU64; 4],
    pub(crate) chunks_sent: [AtomicU64; 3],
    pub(crate) requests_served: AtomicU64,
    pub(crate) requests_not_found: AtomicU64,
    pub(crate) requests_rate_limited: AtomicU64,
    pub(crate) refused: [[AtomicU64; Refused::ALL.len()]; 2],
    pub(crate) pings_sent: AtomicU64,
    pub(crate) mask_updates: AtomicU64,
    pub(crate) chunk_size_buckets: [AtomicU64; CHUNK_SIZE_BUCKETS.len() + 1],
    pub(crate) chunk_size_sum: AtomicU64,
    pub(crate) chunk_size_count: AtomicU64,
    pub(crate) token_rejections: [AtomicU64; Denied::LABELS.len()],
    pub(crate) tokens_accepted: AtomicU64,
    pub(crate) token_renewals: AtomicU64,
    pub(crate) revocations: AtomicU64,
    pub(crate) chunks_signed: AtomicU64,
    pub(crate) chunk_sign_nanos: AtomicU64,
    pub(crate) chunk_sign_failures: AtomicU64,
}

impl Metrics {
    pub fn accepted(&self, l: Listener) {
        add(&self.accepted[l as usize], 1);
    }
    pub fn closed(&self, l: Listener, r: CloseReason) {
        add(&self.closed[l as usize][r as usize], 1);
    }
    pub fn sent(&self, k: SentKind, bytes: usize) {
        add(&self.bytes_sent[k as usize], bytes as u64);
    }
    pub fn chunk_sent(&self, k: ChunkKind) {
        add(&self.chunks_sent[k as usize], 1);
    }
    pub fn request_served(&self) {
        add(&self.requests_served, 1);
    }
    pub fn request_not_found(&self) {
        add(&self.requests_not_found, 1);
    }
    /// A REQUEST beyond the connection's rate was answered `NOT_FOUND`.
    pub fn request_rate_limited(&self) {
        add(&self.requests_rate_limited, 1);
    }
    /// A new connection was refused by a connection cap.
    pub fn refused(&self, l: Listener, r: Refused) {
        add(&self.refused[l as usize][r as usize], 1);
    }
    pub fn ping_sent(&self) {
        add(&self.pings_sent, 1);
    }
    pub fn mask_updated(&self) {
        add(&self.mask_updates, 1);
    }
    /// Records the size of an ingested chunk.
    pub fn chunk_ingested(&self, bytes: usize) {
        let b = bytes as u64;
        let i = CHUNK_SIZE_BUCKETS
            .iter()
            .position(|&le| b <= le)
            .unwrap_or(CHUNK_SIZE_BUCKETS.len());
        add(&self.chunk_size_buckets[i], 1);
        add(&self.chunk_size_sum, b);
        add(&self.chunk_size_count, 1);
    }

    /// A token (or its absence) was refused.
    pub fn token_rejected(&self, d: &Denied) {
        add(&self.token_rejections[d.index()], 1);
    }
    /// A token was accepted when a connection subscribed.
    pub fn token_accepted(&self) {
        add(&self.tokens_accepted, 1);
    }
    /// A `TOKEN` frame renewed a connection's token.
    pub fn token_renewed(&self) {
        add(&self.token_renewals, 1);
    }
    /// Peer ids revoked by `RevokeCommand`s.
    pub fn revoked(&self, peers: usize) {
        add(&self.revocations, peers as u64);
    }
    /// A chunk was hashed and signed in `nanos`.
    pub fn chunk_signed(&self, nanos: u64) {
        add(&self.chunks_signed, 1);
        add(&self.chunk_sign_nanos, nanos);
    }
    /// A chunk could not be signed (it is served unsigned).
    pub fn chunk_sign_failed(&self) {
        add(&self.chunk_sign_failures, 1);
    }

    /// Token refusals so far with this label (see [`Denied::LABELS`]).
    pub fn token_rejections(&self, label: &str) -> u64 {
        Denied::LABELS
            .iter()
            .position(|&l| l == label)
            .map_or(0, |i| get(&self.token_rejections[i]))
    }
    /// `TOKEN` frames that renewed a connection's token so far.
    pub fn token_renewals(&self) -> u64 {
        get(&self.token_renewals)
    }
    /// Chunks signed so far and the total time spent hashing and signing them (ns).
    pub fn chunks_signed(&self) -> (u64, u64) {
        (get(&self.chunks_signed), get(&self.chunk_sign_nanos))
    }

    /// Requests answered with a CHUNK so far.
    pub fn requests_served(&self) -> u64 {
        get(&self.requests_served)
    }
    /// Requests answered with NOT_FOUND so far (the rate-limited ones not included).
    pub fn requests_not_found(&self) -> u64 {
        get(&self.requests_not_found)
    }
    /// Requests answered with NOT_FOUND because of the connection's request rate.
    pub fn requests_rate_limited(&self) -> u64 {
        get(&self.requests_rate_limited)
    }
    /// New connections refused so far by the cap `r` on listener `l`.
    pub fn refusals(&self, l: Listener, r: Refused) -> u64 {
        get(&self.refused[l as usize][r as usize])
    }
    /// Connections closed so far on `l` for `r`.
    pub fn closes(&self, l: Listener, r: CloseReason) -> u64 {
        get(&self.closed[l as usize][r as usize])
    }
    /// Bytes sent so far for `k`.
    pub fn bytes_sent(&self, k: SentKind) -> u64 {
        get(&self.bytes_sent[k as usize])
    }
    /// Keep-alive PINGs sent so far.
    pub fn pings_sent(&self) -> u64 {
        get(&self.pings_sent)
    }
}
