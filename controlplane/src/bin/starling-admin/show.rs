//! How `starling-admin` shows one broadcast: the names of its state and source health,
//! its JSON object (`--json` of get, list, create, start, stop, wait, top) and the
//! human-readable details.

use starling_proto::v1::{Broadcast, BroadcastState, SourceHealth};

pub fn state_str(v: i32) -> &'static str {
    match BroadcastState::try_from(v) {
        Ok(BroadcastState::Created) => "created",
        Ok(BroadcastState::Live) => "live",
        Ok(BroadcastState::Stopped) => "stopped",
        _ => "unspecified",
    }
}

pub fn health_str(v: i32) -> &'static str {
    match SourceHealth::try_from(v) {
        Ok(SourceHealth::Unknown) => "unknown",
        Ok(SourceHealth::Connecting) => "connecting",
        Ok(SourceHealth::Up) => "up",
        Ok(SourceHealth::Down) => "down",
        _ => "unspecified",
    }
}

pub fn to_json(b: &Broadcast) -> serde_json::Value {
    serde_json::json!({
        "id": b.id,
        "name": b.name,
        "source_url": b.source_url,
        "chunk_duration_ms": b.chunk_duration_ms,
        "substreams": b.substreams,
        "state": state_str(b.state),
        "source_health": health_str(b.source_health),
        "source_error": b.source_error,
        "node_id": b.node_id,
        "node_wire_addr": b.node_wire_addr,
        "node_http_addr": b.node_http_addr,
        "viewers_now": b.viewers_now,
        "last_seq": b.last_seq,
        "run_epoch": b.run_epoch,
        "content_type": b.content_type,
        "created_at_unix_ms": b.created_at_unix_ms,
        "updated_at_unix_ms": b.updated_at_unix_ms,
        "stream_kbps": b.stream_kbps,
        "peers": b.peers,
        "demand_slots": b.demand_slots,
        "peer_supply_slots": b.peer_supply_slots,
        "booster_slots": b.booster_slots,
        "booster_kbps": b.booster_kbps,
        "peer_share": b.peer_share,
        "max_depth": b.max_depth,
        "fluid_bound_kbps": b.fluid_bound_kbps,
        "public": b.public,
    })
}

pub fn print_details(b: &Broadcast) {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    println!("id:            {}", b.id);
    println!("name:          {}", b.name);
    println!("source_url:    {}", b.source_url);
    println!("state:         {}", state_str(b.state));
    println!(
        "public:        {}",
        if b.public {
            "yes"
        } else {
            "no (viewer credential needed)"
        }
    );
    println!("source_health: {}", health_str(b.source_health));
    if !b.source_error.is_empty() {
        println!("source_error:  {}", b.source_error);
    }
    println!("node:          {}", dash(&b.node_id));
    println!("node_wire:     {}", dash(&b.node_wire_addr));
    println!("node_http:     {}", dash(&b.node_http_addr));
    println!("chunk_ms:      {}", b.chunk_duration_ms);
    println!("substreams:    {}", b.substreams);
    println!("viewers_now:   {}", b.viewers_now);
    println!("last_seq:      {}", b.last_seq);
    println!("run_epoch:     {}", b.run_epoch);
    println!("content_type:  {}", dash(&b.content_type));
    println!("stream_kbps:   {}", b.stream_kbps);
    println!(
        "grid:          {} peers, demand {} slots, peer supply {} slots, booster {} slots ({} kbps, fluid bound {} kbps), max depth {}",
        b.peers,
        b.demand_slots,
        b.peer_supply_slots,
        b.booster_slots,
        b.booster_kbps,
        b.fluid_bound_kbps,
        b.max_depth
    );
    println!("peer_share:    {:.1} %", b.peer_share * 100.0);
}

pub fn print_broadcast(b: &Broadcast, json: bool) {
    if json {
        println!("{}", to_json(b));
    } else {
        print_details(b);
    }
}
