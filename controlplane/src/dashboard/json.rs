//! The dashboard API's JSON: the admin service's messages under their proto field names,
//! enums as short lower-case words (`live`, `up`).

use serde_json::{Value, json};
use starling_proto::v1::{AudiencePoint, Broadcast, BroadcastState, SourceHealth};

/// `{"now_unix_ms", "broadcasts": [...]}`.
pub(super) fn broadcasts(list: &[Broadcast], now_ms: i64) -> Value {
    json!({
        "now_unix_ms": now_ms,
        "broadcasts": list.iter().map(broadcast).collect::<Vec<_>>(),
    })
}

/// `{"broadcast_id", "step_s", "points": [...]}`.
pub(super) fn audience(id: &str, step_s: u32, points: &[AudiencePoint]) -> Value {
    json!({
        "broadcast_id": id,
        "step_s": step_s,
        "points": points.iter().map(point).collect::<Vec<_>>(),
    })
}

fn broadcast(b: &Broadcast) -> Value {
    json!({
        "id": b.id,
        "name": b.name,
        "state": state(b.state),
        "source_health": health(b.source_health),
        "source_error": b.source_error,
        "node_id": b.node_id,
        "content_type": b.content_type,
        "public": b.public,
        "chunk_duration_ms": b.chunk_duration_ms,
        "substreams": b.substreams,
        "last_seq": b.last_seq,
        "created_at_unix_ms": b.created_at_unix_ms,
        "updated_at_unix_ms": b.updated_at_unix_ms,
        "viewers_now": b.viewers_now,
        "stream_kbps": b.stream_kbps,
        "peers": b.peers,
        "demand_slots": b.demand_slots,
        "peer_supply_slots": b.peer_supply_slots,
        "booster_slots": b.booster_slots,
        "booster_kbps": b.booster_kbps,
        "fluid_bound_kbps": b.fluid_bound_kbps,
        "peer_share": finite(b.peer_share),
        "peer_share_last_minute": finite(b.peer_share_last_minute),
        "max_depth": b.max_depth,
    })
}

fn point(p: &AudiencePoint) -> Value {
    json!({
        "start_unix_ms": p.start_unix_ms,
        "concurrent_viewers": finite(p.concurrent_viewers),
        "peak_viewers": p.peak_viewers,
        "watch_time_s": finite(p.watch_time_s),
        "peer_share": finite(p.peer_share),
        "server_egress_bytes": p.server_egress_bytes,
        "peer_bytes": p.peer_bytes,
        "rebuffer_ratio": finite(p.rebuffer_ratio),
        "startup_p50_ms": p.startup_p50_ms,
        "startup_p95_ms": p.startup_p95_ms,
    })
}

/// JSON has no NaN or infinity.
fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

fn state(s: i32) -> &'static str {
    match BroadcastState::try_from(s) {
        Ok(BroadcastState::Created) => "created",
        Ok(BroadcastState::Live) => "live",
        Ok(BroadcastState::Stopped) => "stopped",
        _ => "unknown",
    }
}

fn health(h: i32) -> &'static str {
    match SourceHealth::try_from(h) {
        Ok(SourceHealth::Unknown) => "unknown",
        Ok(SourceHealth::Connecting) => "connecting",
        Ok(SourceHealth::Up) => "up",
        Ok(SourceHealth::Down) => "down",
        _ => "unspecified",
    }
}
