//! Request validation and id generation (pure, unit-tested).

use starling_proto::v1::CreateBroadcastRequest;

/// Default chunk duration when the request says 0.
pub const DEFAULT_CHUNK_DURATION_MS: u32 = 1000;
/// Accepted chunk durations.
pub const CHUNK_DURATION_RANGE_MS: std::ops::RangeInclusive<u32> = 100..=10_000;
/// Default number of substreams `K` when the request says 0.
///
/// A peer owns `floor(U / (r/K))` child slots, so on average `r/2K` of every relaying
/// peer's upload is lost to slot rounding; the booster pays for it. Measured with the
/// `GridAssigner` (2,000 peers, r = 1000 kbps, upload uniform with mean r): K = 4 leaves
/// peer share at 86 %, K = 8 at 92 %, K = 16 at 95 %; with a third of the peers at 0 and
/// the same mean: 90 / 94 / 95 %. At mean 1.2 r all three reach the fluid bound, but
/// K = 4 builds trees 89 hops deep against 16 for K = 8. K = 8 takes most of the gain
/// while keeping a viewer's parent connections, its per-heartbeat parent list and the
/// assigner's O(K log n) work small; large audiences with scarce upload can ask for 16.
pub const DEFAULT_SUBSTREAMS: u32 = 8;
/// Accepted numbers of substreams.
pub const SUBSTREAMS_RANGE: std::ops::RangeInclusive<u32> = 1..=64;
/// Maximum broadcast name length in bytes.
pub const MAX_NAME_BYTES: usize = 200;
/// Maximum source URL length in bytes.
pub const MAX_SOURCE_URL_BYTES: usize = 2048;
/// Maximum length of any id (broadcast, node, session) in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Maximum length of short free-form strings sent by nodes/clients (names, addresses,
/// content types, client versions).
pub const MAX_SHORT_TEXT_BYTES: usize = 256;
/// Maximum length of a source error message kept from a health report.
pub const MAX_ERROR_BYTES: usize = 1024;

/// A request field is invalid; the message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// A validated `CreateBroadcastRequest`, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastParams {
    /// Name, 1..=200 bytes.
    pub name: String,
    /// Normalised http:// URL.
    pub source_url: String,
    /// Chunk duration in ms.
    pub chunk_duration_ms: u32,
    /// Substreams.
    pub substreams: u32,
}

/// Validates a create request and applies defaults.
pub fn create_broadcast(req: &CreateBroadcastRequest) -> Result<BroadcastParams, Invalid> {
    let name = req.name.trim();
    if name.is_empty() {
        return Err(Invalid("name must not be empty".into()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Invalid(format!(
            "name is {} bytes, at most {MAX_NAME_BYTES} allowed",
            name.len()
        )));
    }
    let source_url = source_url(&req.source_url)?;
    let chunk_duration_ms = match req.chunk_duration_ms {
        0 => DEFAULT_CHUNK_DURATION_MS,
        ms if CHUNK_DURATION_RANGE_MS.contains(&ms) => ms,
        ms => {
            return Err(Invalid(format!(
                "chunk_duration_ms {ms} out of range {}..={} (0 = default {DEFAULT_CHUNK_DURATION_MS})",
                CHUNK_DURATION_RANGE_MS.start(),
                CHUNK_DURATION_RANGE_MS.end()
            )));
        }
    };
    let substreams = match req.substreams {
        0 => DEFAULT_SUBSTREAMS,
        n if SUBSTREAMS_RANGE.contains(&n) => n,
        n => {
            return Err(Invalid(format!(
                "substreams {n} out of range {}..={} (0 = default {DEFAULT_SUBSTREAMS})",
                SUBSTREAMS_RANGE.start(),
                SUBSTREAMS_RANGE.end()
            )));
        }
    };
    Ok(BroadcastParams {
        name: name.to_string(),
        source_url,
        chunk_duration_ms,
        substreams,
    })
}

/// Validates a source URL: absolute `http://` URL with a host.
pub fn source_url(raw: &str) -> Result<String, Invalid> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(Invalid("source_url must not be empty".into()));
    }
    if raw.len() > MAX_SOURCE_URL_BYTES {
        return Err(Invalid(format!(
            "source_url is {} bytes, at most {MAX_SOURCE_URL_BYTES} allowed",
            raw.len()
        )));
    }
    let url = url::Url::parse(raw)
        .map_err(|e| Invalid(format!("source_url {raw:?} is not a valid URL: {e}")))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(Invalid(format!(
                "source_url {raw:?}: https:// is not supported by ingest yet; use an http:// URL"
            )));
        }
        other => {
            return Err(Invalid(format!(
                "source_url {raw:?}: scheme {other:?} is not supported; use an http:// URL"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Invalid(format!("source_url {raw:?} has no host")));
    }
    Ok(url.to_string())
}

/// Validates an id field (broadcast, node or session id) sent by a client.
pub fn id(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid(format!("{field} must not be empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Invalid(format!(
            "{field} is {} bytes, at most {MAX_ID_BYTES} allowed",
            value.len()
        )));
    }
    Ok(())
}

/// Validates a short free-form text field.
pub fn short_text(field: &str, value: &str, required: bool) -> Result<(), Invalid> {
    if required && value.trim().is_empty() {
        return Err(Invalid(format!("{field} must not be empty")));
    }
    if value.len() > MAX_SHORT_TEXT_BYTES {
        return Err(Invalid(format!(
            "{field} is {} bytes, at most {MAX_SHORT_TEXT_BYTES} allowed",
            value.len()
        )));
    }
    Ok(())
}

/// Validates a viewer's `peer_addr`: empty (does not relay) or `host:port` with a
/// non-empty host (name, IPv4, or bracketed IPv6) and a port in 1..=65535.
/// `JoinRequest.host_addr`: empty, or an IP socket address (the listener's bound
/// address; only its port is used). Returns the parsed address.
pub fn host_addr(value: &str) -> Result<Option<std::net::SocketAddr>, Invalid> {
    short_text("host_addr", value, false)?;
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        Invalid(format!(
            "host_addr {value:?} is not ip:port (e.g. 192.168.1.20:7000 or [2001:db8::1]:7000)"
        ))
    })
}

pub fn peer_addr(value: &str) -> Result<(), Invalid> {
    short_text("peer_addr", value, false)?;
    let value = value.trim();
    if value.is_empty() {
        return Ok(());
    }
    let bad = || {
        Invalid(format!(
            "peer_addr {value:?} is not host:port (e.g. 203.0.113.7:7000 or [2001:db8::1]:7000)"
        ))
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && !host.contains(':')
            && !host.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";

/// A short random url-safe id: 16 characters from a 32-letter alphabet without
/// look-alikes (80 random bits).
pub fn short_id() -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    // Skip the version/variant nibbles (bytes 6 and 8) by taking bytes 9..16 plus 0..3.
    let mut bits: u128 = 0;
    for b in bytes[9..16].iter().chain(bytes[0..3].iter()) {
        bits = (bits << 8) | u128::from(*b);
    }
    (0..16)
        .map(|i| {
            let idx = ((bits >> (i * 5)) & 31) as usize;
            char::from(ALPHABET[idx])
        })
        .collect()
}

/// A new broadcast id.
pub fn new_broadcast_id() -> String {
    short_id()
}

/// A new node id (`n-` + short id).
pub fn new_node_id() -> String {
    format!("n-{}", short_id())
}

/// A new session id (`s-` + short id).
pub fn new_session_id() -> String {
    format!("s-{}", short_id())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn req(name: &str, url: &str, ms: u32, subs: u32) -> CreateBroadcastRequest {
        CreateBroadcastRequest {
            name: name.into(),
            source_url: url.into(),
            chunk_duration_ms: ms,
            substreams: subs,
            public: false,
        }
    }

    #[test]
    fn defaults_are_applied() {
        let p = create_broadcast(&req("radio", "http://example.com:8000/live", 0, 0)).unwrap();
        assert_eq!(p.chunk_duration_ms, 1000);
        assert_eq!(p.substreams, DEFAULT_SUBSTREAMS);
        assert_eq!(p.source_url, "http://example.com:8000/live");
    }

    #[test]
    fn ranges_are_enforced() {
        assert!(create_broadcast(&req("x", "http://h/", 100, 1)).is_ok());
        assert!(create_broadcast(&req("x", "http://h/", 10_000, 64)).is_ok());
        let e = create_broadcast(&req("x", "http://h/", 99, 0)).unwrap_err();
        assert!(e.0.contains("chunk_duration_ms 99"), "{e}");
        assert!(create_broadcast(&req("x", "http://h/", 10_001, 0)).is_err());
        let e = create_broadcast(&req("x", "http://h/", 0, 65)).unwrap_err();
        assert!(e.0.contains("substreams 65"), "{e}");
    }

    #[test]
    fn name_length() {
        assert!(create_broadcast(&req("", "http://h/", 0, 0)).is_err());
        assert!(create_broadcast(&req("   ", "http://h/", 0, 0)).is_err());
        assert!(create_broadcast(&req(&"a".repeat(200), "http://h/", 0, 0)).is_ok());
        let e = create_broadcast(&req(&"a".repeat(201), "http://h/", 0, 0)).unwrap_err();
        assert!(e.0.contains("201 bytes"), "{e}");
    }

    #[test]
    fn only_http_urls() {
        let e = source_url("https://h/live").unwrap_err();
        assert!(
            e.0.contains("https:// is not supported by ingest yet"),
            "{e}"
        );
        assert!(source_url("ftp://h/x").unwrap_err().0.contains("\"ftp\""));
        assert!(source_url("not a url").is_err());
        assert!(source_url("").is_err());
        assert!(source_url("http://").is_err());
        assert!(source_url("http://127.0.0.1:8000/stream.ts").is_ok());
    }

    #[test]
    fn ids_are_short_url_safe_and_distinct() {
        let a = short_id();
        let b = short_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert!(new_node_id().len() <= MAX_ID_BYTES);
    }

    #[test]
    fn peer_addrs() {
        for ok in [
            "",
            "  ",
            "10.0.0.1:7000",
            "peer.example:1",
            "[2001:db8::1]:7000",
        ] {
            assert!(peer_addr(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "10.0.0.1",
            ":7000",
            "10.0.0.1:0",
            "10.0.0.1:70000",
            "2001:db8::1:7000",
            "[nonsense]:1",
            "a b:1",
        ] {
            let e = peer_addr(bad).unwrap_err();
            assert!(e.0.contains("peer_addr"), "{bad:?}: {e}");
        }
        assert!(peer_addr(&format!("{}:1", "h".repeat(300))).is_err());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
