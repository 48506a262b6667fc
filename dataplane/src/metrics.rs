//! Prometheus metrics (text exposition format 0.0.4), hand-rolled: a handful of
//! relaxed atomics shared by every executor and the ingest thread, rendered on
//! `GET /metrics` of the HTTP listener. No dependency, no per-executor registry, no
//! lock on the chunk path.
//!
//! Node-wide counters live in [`Metrics`] (owned by the [`Registry`]); per-broadcast
//! series (viewers, ingest counters, source health, bitrate) are read from each
//! [`Broadcast`](crate::ring::Broadcast) at scrape time, so label cardinality is bounded
//! by the broadcasts this node serves and their series disappear with them.

use crate::auth::Denied;
use crate::limits::Refused;
use crate::ring::{Registry, SourceHealth};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Wire = 0,
    Http = 1,
}

impl Listener {
    const ALL: [Listener; 2] = [Listener::Wire, Listener::Http];
    fn label(self) -> &'static str {
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
    const ALL: [CloseReason; Self::COUNT] = [
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
    const ALL: [SentKind; 4] = [
        SentKind::WirePush,
        SentKind::WireRequest,
        SentKind::WireControl,
        SentKind::Http,
    ];
    fn label(self) -> &'static str {
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
    const ALL: [ChunkKind; 3] = [ChunkKind::WirePush, ChunkKind::WireRequest, ChunkKind::Http];
    fn label(self) -> &'static str {
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

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Node-wide counters, aggregated over executors (relaxed atomics).
#[derive(Debug, Default)]
pub struct Metrics {
    accepted: [AtomicU64; 2],
    closed: [[AtomicU64; CloseReason::COUNT]; 2],
    bytes_sent: [AtomicU64; 4],
    chunks_sent: [AtomicU64; 3],
    requests_served: AtomicU64,
    requests_not_found: AtomicU64,
    requests_rate_limited: AtomicU64,
    refused: [[AtomicU64; Refused::ALL.len()]; 2],
    pings_sent: AtomicU64,
    mask_updates: AtomicU64,
    chunk_size_buckets: [AtomicU64; CHUNK_SIZE_BUCKETS.len() + 1],
    chunk_size_sum: AtomicU64,
    chunk_size_count: AtomicU64,
    token_rejections: [AtomicU64; Denied::LABELS.len()],
    tokens_accepted: AtomicU64,
    token_renewals: AtomicU64,
    revocations: AtomicU64,
    chunks_signed: AtomicU64,
    chunk_sign_nanos: AtomicU64,
    chunk_sign_failures: AtomicU64,
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

/// Escapes a label value (backslash, double quote, line feed).
fn esc(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn head(out: &mut String, name: &str, ty: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {ty}");
}

/// Renders every metric in the text exposition format 0.0.4.
pub fn render(registry: &Registry) -> String {
    let m = registry.metrics();
    let mut o = String::with_capacity(8 * 1024);
    let mut bs = registry.all();
    bs.sort_by(|a, b| a.id().cmp(b.id()));
    let statuses: Vec<_> = bs.iter().map(|b| (esc(b.id()), b.status(), b)).collect();

    let n = "starling_dataplane_viewers";
    head(
        &mut o,
        n,
        "gauge",
        "Viewers subscribed to a broadcast (wire and HTTP).",
    );
    for (id, st, _) in &statuses {
        let _ = writeln!(o, "{n}{{broadcast=\"{id}\"}} {}", st.viewers);
    }

    let n = "starling_dataplane_open_connections";
    head(
        &mut o,
        n,
        "gauge",
        "Open connections by listener (including ones not subscribed yet).",
    );
    for l in Listener::ALL {
        let acc = get(&m.accepted[l as usize]);
        let closed: u64 = m.closed[l as usize].iter().map(get).sum();
        let _ = writeln!(
            o,
            "{n}{{listener=\"{}\"}} {}",
            l.label(),
            acc.saturating_sub(closed)
        );
    }

    let n = "starling_dataplane_connections_accepted_total";
    head(&mut o, n, "counter", "Connections accepted by listener.");
    for l in Listener::ALL {
        let _ = writeln!(
            o,
            "{n}{{listener=\"{}\"}} {}",
            l.label(),
            get(&m.accepted[l as usize])
        );
    }

    let n = "starling_dataplane_connections_refused_total";
    head(
        &mut o,
        n,
        "counter",
        "New connections refused (ERROR(SERVER_BUSY) or HTTP 503) by listener and cap: unauthenticated (node-wide cap on connections not yet subscribed), address_unauthenticated (the same cap per source address), address (open connections per source address).",
    );
    for l in Listener::ALL {
        for r in Refused::ALL {
            let _ = writeln!(
                o,
                "{n}{{listener=\"{}\",reason=\"{}\"}} {}",
                l.label(),
                r.label(),
                get(&m.refused[l as usize][r as usize])
            );
        }
    }

    let n = "starling_dataplane_unauthenticated_connections";
    head(
        &mut o,
        n,
        "gauge",
        "Open connections not yet authenticated (wire: not yet subscribed; HTTP: request not yet admitted).",
    );
    let _ = writeln!(o, "{n} {}", registry.conns().unauthenticated());

    let n = "starling_dataplane_connection_addresses";
    head(
        &mut o,
        n,
        "gauge",
        "Source addresses (IPv4, or IPv6 /64) with at least one open connection.",
    );
    let _ = writeln!(o, "{n} {}", registry.conns().addresses());

    let n = "starling_dataplane_connections_closed_total";
    head(
        &mut o,
        n,
        "counter",
        "Connections closed by listener and reason.",
    );
    for l in Listener::ALL {
        for r in CloseReason::ALL {
            let _ = writeln!(
                o,
                "{n}{{listener=\"{}\",reason=\"{}\"}} {}",
                l.label(),
                r.label(),
                get(&m.closed[l as usize][r as usize])
            );
        }
    }

    let n = "starling_dataplane_sent_bytes_total";
    head(
        &mut o,
        n,
        "counter",
        "Bytes written to viewer sockets by kind (wire_push: pushed CHUNK frames; wire_request: answers to REQUEST; wire_control: other wire frames; http: plain HTTP).",
    );
    for k in SentKind::ALL {
        let _ = writeln!(
            o,
            "{n}{{kind=\"{}\"}} {}",
            k.label(),
            get(&m.bytes_sent[k as usize])
        );
    }

    let n = "starling_dataplane_chunks_sent_total";
    head(&mut o, n, "counter", "Chunks written to viewers by path.");
    for k in ChunkKind::ALL {
        let _ = writeln!(
            o,
            "{n}{{kind=\"{}\"}} {}",
            k.label(),
            get(&m.chunks_sent[k as usize])
        );
    }

    let n = "starling_dataplane_requests_total";
    head(
        &mut o,
        n,
        "counter",
        "REQUEST frames answered, by result (served: CHUNK, not_found: NOT_FOUND, rate_limited: NOT_FOUND beyond the connection's request rate).",
    );
    let _ = writeln!(o, "{n}{{result=\"served\"}} {}", get(&m.requests_served));
    let _ = writeln!(
        o,
        "{n}{{result=\"not_found\"}} {}",
        get(&m.requests_not_found)
    );
    let _ = writeln!(
        o,
        "{n}{{result=\"rate_limited\"}} {}",
        get(&m.requests_rate_limited)
    );

    let n = "starling_dataplane_keepalive_pings_total";
    head(
        &mut o,
        n,
        "counter",
        "Keep-alive PINGs sent to idle wire connections.",
    );
    let _ = writeln!(o, "{n} {}", get(&m.pings_sent));

    let n = "starling_dataplane_substream_mask_updates_total";
    head(
        &mut o,
        n,
        "counter",
        "SUBSCRIBE frames that replaced the substream mask of a live connection.",
    );
    let _ = writeln!(o, "{n} {}", get(&m.mask_updates));

    let n = "starling_dataplane_token_rejections_total";
    head(
        &mut o,
        n,
        "counter",
        "Chunk tokens refused (wire SUBSCRIBE or TOKEN, HTTP), by reason.",
    );
    for (i, l) in Denied::LABELS.iter().enumerate() {
        let _ = writeln!(o, "{n}{{reason=\"{l}\"}} {}", get(&m.token_rejections[i]));
    }

    let n = "starling_dataplane_tokens_accepted_total";
    head(
        &mut o,
        n,
        "counter",
        "Chunk tokens accepted when a connection subscribed.",
    );
    let _ = writeln!(o, "{n} {}", get(&m.tokens_accepted));

    let n = "starling_dataplane_token_renewals_total";
    head(
        &mut o,
        n,
        "counter",
        "TOKEN frames that renewed a connection's chunk token.",
    );
    let _ = writeln!(o, "{n} {}", get(&m.token_renewals));

    let n = "starling_dataplane_revocations_total";
    head(
        &mut o,
        n,
        "counter",
        "Peer ids revoked by the control plane (RevokeCommand).",
    );
    let _ = writeln!(o, "{n} {}", get(&m.revocations));

    let n = "starling_dataplane_revoked_peers";
    head(
        &mut o,
        n,
        "gauge",
        "(broadcast, peer) pairs remembered as revoked until their tokens expire.",
    );
    let _ = writeln!(o, "{n} {}", registry.auth().revoked_len());

    let n = "starling_dataplane_chunks_signed_total";
    head(
        &mut o,
        n,
        "counter",
        "Chunks hashed and signed when cut (one Ed25519 signature each).",
    );
    let _ = writeln!(o, "{n} {}", get(&m.chunks_signed));

    let n = "starling_dataplane_chunk_signing_seconds_total";
    head(
        &mut o,
        n,
        "counter",
        "CPU time spent hashing and signing chunks.",
    );
    let _ = writeln!(o, "{n} {}", get(&m.chunk_sign_nanos) as f64 / 1e9);

    let n = "starling_dataplane_chunk_signing_failures_total";
    head(
        &mut o,
        n,
        "counter",
        "Chunks that could not be signed (served unsigned).",
    );
    let _ = writeln!(o, "{n} {}", get(&m.chunk_sign_failures));

    let n = "starling_dataplane_ingested_chunks_total";
    head(
        &mut o,
        n,
        "counter",
        "Chunks cut from a broadcast's source.",
    );
    for (id, _, b) in &statuses {
        let _ = writeln!(o, "{n}{{broadcast=\"{id}\"}} {}", b.chunks_ingested());
    }

    let n = "starling_dataplane_ingested_bytes_total";
    head(
        &mut o,
        n,
        "counter",
        "Chunk payload bytes ingested from a broadcast's source.",
    );
    for (id, _, b) in &statuses {
        let _ = writeln!(o, "{n}{{broadcast=\"{id}\"}} {}", b.bytes_ingested());
    }

    let n = "starling_dataplane_ingest_reconnects_total";
    head(
        &mut o,
        n,
        "counter",
        "Source (re)connection attempts after the first one.",
    );
    for (id, _, b) in &statuses {
        let _ = writeln!(o, "{n}{{broadcast=\"{id}\"}} {}", b.reconnects());
    }

    let n = "starling_dataplane_source_health";
    head(
        &mut o,
        n,
        "gauge",
        "Source state of a broadcast: 1 for the current state, 0 for the others.",
    );
    for (id, st, _) in &statuses {
        for (state, label) in [
            (SourceHealth::Connecting, "connecting"),
            (SourceHealth::Up, "up"),
            (SourceHealth::Down, "down"),
        ] {
            let _ = writeln!(
                o,
                "{n}{{broadcast=\"{id}\",state=\"{label}\"}} {}",
                u8::from(st.health == state)
            );
        }
    }

    let n = "starling_dataplane_stream_bytes_per_second";
    head(
        &mut o,
        n,
        "gauge",
        "Stream rate: payload bytes of the chunks in the window over their summed duration.",
    );
    for (id, _, b) in &statuses {
        let _ = writeln!(
            o,
            "{n}{{broadcast=\"{id}\"}} {}",
            b.bitrate_bps() as f64 / 8.0
        );
    }

    let n = "starling_dataplane_window_chunks";
    head(
        &mut o,
        n,
        "gauge",
        "Chunks held in a broadcast's in-memory window.",
    );
    for (id, st, _) in &statuses {
        let _ = writeln!(o, "{n}{{broadcast=\"{id}\"}} {}", st.chunks_in_window);
    }

    let n = "starling_dataplane_chunk_size_bytes";
    head(
        &mut o,
        n,
        "histogram",
        "Sizes of ingested chunks (payload bytes).",
    );
    let mut cum = 0u64;
    for (i, le) in CHUNK_SIZE_BUCKETS.iter().enumerate() {
        cum += get(&m.chunk_size_buckets[i]);
        let _ = writeln!(o, "{n}_bucket{{le=\"{le}\"}} {cum}");
    }
    cum += get(&m.chunk_size_buckets[CHUNK_SIZE_BUCKETS.len()]);
    let _ = writeln!(o, "{n}_bucket{{le=\"+Inf\"}} {cum}");
    let _ = writeln!(o, "{n}_sum {}", get(&m.chunk_size_sum));
    // The count is the +Inf bucket (read once, so the exposition is consistent).
    let _ = writeln!(o, "{n}_count {cum}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let r = Registry::new();
        let m = r.metrics();
        m.chunk_ingested(100);
        m.chunk_ingested(5000);
        m.chunk_ingested(10 << 20);
        let text = render(&r);
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"4096\"} 1\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"16384\"} 2\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"4194304\"} 2\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_count 3\n"));
    }
}
