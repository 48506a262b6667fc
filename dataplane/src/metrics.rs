//! Prometheus metrics of the data plane (text exposition format 0.0.4), rendered on
//! `GET /metrics` of the HTTP listener by the shared writer
//! ([`starling_telemetry::prom`]). This module only renders: it reads a [`Snapshot`]
//! (the node-wide [`Metrics`] counters of [`crate::counters`] plus per-broadcast values
//! sampled at scrape time by [`Registry::scrape`](crate::ring::Registry::scrape)), so
//! label cardinality is bounded by the broadcasts this node serves and their series
//! disappear with them. It knows nothing of the ring.

use crate::auth::Denied;
use crate::limits::Refused;
use starling_telemetry::prom::{Exposition, Kind};

use crate::counters::get;
pub use crate::counters::{
    CHUNK_SIZE_BUCKETS, ChunkKind, CloseReason, Listener, Metrics, SentKind,
};

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = starling_telemetry::prom::CONTENT_TYPE;

/// The `state` labels of `starling_dataplane_source_health`, in exposition order.
pub const SOURCE_STATES: [&str; 3] = ["connecting", "up", "down"];

/// What one scrape renders: the node-wide counters and values sampled now.
#[derive(Debug)]
pub struct Snapshot<'a> {
    pub counters: &'a Metrics,
    /// One entry per broadcast, sorted by id.
    pub broadcasts: Vec<BroadcastSample>,
    /// Open connections not yet authenticated.
    pub unauthenticated: u64,
    /// Source addresses with at least one open connection.
    pub addresses: u64,
    /// (broadcast, peer) pairs remembered as revoked.
    pub revoked_peers: u64,
}

/// One broadcast's values at scrape time.
#[derive(Debug, Clone)]
pub struct BroadcastSample {
    pub id: String,
    pub viewers: u32,
    pub chunks_in_window: usize,
    /// One of [`SOURCE_STATES`].
    pub source_state: &'static str,
    pub chunks_ingested: u64,
    pub bytes_ingested: u64,
    pub reconnects: u64,
    pub bitrate_bps: u64,
}

/// Renders every metric in the text exposition format 0.0.4.
pub fn render(s: &Snapshot<'_>) -> String {
    let m = s.counters;
    let mut o = Exposition::with_capacity(8 * 1024);
    let per_broadcast = |o: &mut Exposition, n: &str, v: &dyn Fn(&BroadcastSample) -> String| {
        for b in &s.broadcasts {
            o.sample(n, &[("broadcast", &b.id)], v(b));
        }
    };

    let n = "starling_dataplane_viewers";
    o.family(
        n,
        Kind::Gauge,
        "Viewers subscribed to a broadcast (wire and HTTP).",
    );
    per_broadcast(&mut o, n, &|b| b.viewers.to_string());

    let n = "starling_dataplane_open_connections";
    o.family(
        n,
        Kind::Gauge,
        "Open connections by listener (including ones not subscribed yet).",
    );
    for l in Listener::ALL {
        let acc = get(&m.accepted[l as usize]);
        let closed: u64 = m.closed[l as usize].iter().map(get).sum();
        o.sample(n, &[("listener", l.label())], acc.saturating_sub(closed));
    }

    let n = "starling_dataplane_connections_accepted_total";
    o.family(n, Kind::Counter, "Connections accepted by listener.");
    for l in Listener::ALL {
        o.sample(n, &[("listener", l.label())], get(&m.accepted[l as usize]));
    }

    let n = "starling_dataplane_connections_refused_total";
    o.family(
        n,
        Kind::Counter,
        "New connections refused (ERROR(SERVER_BUSY) or HTTP 503) by listener and cap: unauthenticated (node-wide cap on connections not yet subscribed), address_unauthenticated (the same cap per source address), address (open connections per source address).",
    );
    for l in Listener::ALL {
        for r in Refused::ALL {
            o.sample(
                n,
                &[("listener", l.label()), ("reason", r.label())],
                get(&m.refused[l as usize][r as usize]),
            );
        }
    }

    o.gauge(
        "starling_dataplane_unauthenticated_connections",
        "Open connections not yet authenticated (wire: not yet subscribed; HTTP: request not yet admitted).",
        s.unauthenticated,
    );
    o.gauge(
        "starling_dataplane_connection_addresses",
        "Source addresses (IPv4, or IPv6 /64) with at least one open connection.",
        s.addresses,
    );

    let n = "starling_dataplane_connections_closed_total";
    o.family(
        n,
        Kind::Counter,
        "Connections closed by listener and reason.",
    );
    for l in Listener::ALL {
        for r in CloseReason::ALL {
            o.sample(
                n,
                &[("listener", l.label()), ("reason", r.label())],
                get(&m.closed[l as usize][r as usize]),
            );
        }
    }

    let n = "starling_dataplane_sent_bytes_total";
    o.family(
        n,
        Kind::Counter,
        "Bytes written to viewer sockets by kind (wire_push: pushed CHUNK frames; wire_request: answers to REQUEST; wire_control: other wire frames; http: plain HTTP).",
    );
    for k in SentKind::ALL {
        o.sample(n, &[("kind", k.label())], get(&m.bytes_sent[k as usize]));
    }

    let n = "starling_dataplane_chunks_sent_total";
    o.family(n, Kind::Counter, "Chunks written to viewers by path.");
    for k in ChunkKind::ALL {
        o.sample(n, &[("kind", k.label())], get(&m.chunks_sent[k as usize]));
    }

    let n = "starling_dataplane_requests_total";
    o.family(
        n,
        Kind::Counter,
        "REQUEST frames answered, by result (served: CHUNK, not_found: NOT_FOUND, rate_limited: NOT_FOUND beyond the connection's request rate).",
    );
    o.sample(n, &[("result", "served")], get(&m.requests_served));
    o.sample(n, &[("result", "not_found")], get(&m.requests_not_found));
    o.sample(
        n,
        &[("result", "rate_limited")],
        get(&m.requests_rate_limited),
    );

    o.counter(
        "starling_dataplane_keepalive_pings_total",
        "Keep-alive PINGs sent to idle wire connections.",
        get(&m.pings_sent),
    );
    o.counter(
        "starling_dataplane_substream_mask_updates_total",
        "SUBSCRIBE frames that replaced the substream mask of a live connection.",
        get(&m.mask_updates),
    );

    let n = "starling_dataplane_token_rejections_total";
    o.family(
        n,
        Kind::Counter,
        "Chunk tokens refused (wire SUBSCRIBE or TOKEN, HTTP), by reason.",
    );
    for (i, l) in Denied::LABELS.iter().enumerate() {
        o.sample(n, &[("reason", l)], get(&m.token_rejections[i]));
    }

    o.counter(
        "starling_dataplane_tokens_accepted_total",
        "Chunk tokens accepted when a connection subscribed.",
        get(&m.tokens_accepted),
    );
    o.counter(
        "starling_dataplane_token_renewals_total",
        "TOKEN frames that renewed a connection's chunk token.",
        get(&m.token_renewals),
    );
    o.counter(
        "starling_dataplane_revocations_total",
        "Peer ids revoked by the control plane (RevokeCommand).",
        get(&m.revocations),
    );
    o.gauge(
        "starling_dataplane_revoked_peers",
        "(broadcast, peer) pairs remembered as revoked until their tokens expire.",
        s.revoked_peers,
    );
    o.counter(
        "starling_dataplane_chunks_signed_total",
        "Chunks hashed and signed when cut (one Ed25519 signature each).",
        get(&m.chunks_signed),
    );
    o.counter(
        "starling_dataplane_chunk_signing_seconds_total",
        "CPU time spent hashing and signing chunks.",
        get(&m.chunk_sign_nanos) as f64 / 1e9,
    );
    o.counter(
        "starling_dataplane_chunk_signing_failures_total",
        "Chunks that could not be signed (served unsigned).",
        get(&m.chunk_sign_failures),
    );

    let n = "starling_dataplane_ingested_chunks_total";
    o.family(n, Kind::Counter, "Chunks cut from a broadcast's source.");
    per_broadcast(&mut o, n, &|b| b.chunks_ingested.to_string());

    let n = "starling_dataplane_ingested_bytes_total";
    o.family(
        n,
        Kind::Counter,
        "Chunk payload bytes ingested from a broadcast's source.",
    );
    per_broadcast(&mut o, n, &|b| b.bytes_ingested.to_string());

    let n = "starling_dataplane_ingest_reconnects_total";
    o.family(
        n,
        Kind::Counter,
        "Source (re)connection attempts after the first one.",
    );
    per_broadcast(&mut o, n, &|b| b.reconnects.to_string());

    let n = "starling_dataplane_source_health";
    o.family(
        n,
        Kind::Gauge,
        "Source state of a broadcast: 1 for the current state, 0 for the others.",
    );
    for b in &s.broadcasts {
        for state in SOURCE_STATES {
            o.sample(
                n,
                &[("broadcast", &b.id), ("state", state)],
                u8::from(b.source_state == state),
            );
        }
    }

    let n = "starling_dataplane_stream_bytes_per_second";
    o.family(
        n,
        Kind::Gauge,
        "Stream rate: payload bytes of the chunks in the window over their summed duration.",
    );
    per_broadcast(&mut o, n, &|b| (b.bitrate_bps as f64 / 8.0).to_string());

    let n = "starling_dataplane_window_chunks";
    o.family(
        n,
        Kind::Gauge,
        "Chunks held in a broadcast's in-memory window.",
    );
    per_broadcast(&mut o, n, &|b| b.chunks_in_window.to_string());

    let n = "starling_dataplane_chunk_size_bytes";
    o.family(
        n,
        Kind::Histogram,
        "Sizes of ingested chunks (payload bytes).",
    );
    let mut cum = 0u64;
    let buckets: Vec<(u64, u64)> = CHUNK_SIZE_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, le)| {
            cum += get(&m.chunk_size_buckets[i]);
            (*le, cum)
        })
        .collect();
    cum += get(&m.chunk_size_buckets[CHUNK_SIZE_BUCKETS.len()]);
    // The count is the +Inf bucket (read once, so the exposition is consistent).
    o.histogram(n, &[], &buckets, get(&m.chunk_size_sum), cum);
    o.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Registry;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let r = Registry::new();
        let m = r.metrics();
        m.chunk_ingested(100);
        m.chunk_ingested(5000);
        m.chunk_ingested(10 << 20);
        let text = render(&r.scrape());
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"4096\"} 1\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"16384\"} 2\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"4194304\"} 2\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("starling_dataplane_chunk_size_bytes_count 3\n"));
    }
}
