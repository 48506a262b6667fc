//! Viewer counters.

use std::time::Duration;

/// A snapshot of a viewer's counters ([`crate::Viewer::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Chunk payload bytes received from the network (duplicates included).
    pub bytes_received: u64,
    /// Chunks received from the network (duplicates included).
    pub chunks_received: u64,
    /// Chunks dropped as duplicates or already played/skipped.
    pub duplicates: u64,
    /// Payload bytes handed out in order.
    pub bytes_out: u64,
    /// Chunks handed out in order.
    pub chunks_out: u64,
    /// Successful reconnections to the data plane after a lost session.
    pub reconnects: u64,
    /// Times `Join` was called again (node change, expired token...).
    pub rejoins: u64,
    /// Jumps in the output (gaps given up, server skips).
    pub discontinuities: u64,
    /// Times a local consumer fell behind and skipped to the next random access chunk.
    pub consumer_drops: u64,
    /// Local consumers (subscriptions and HTTP clients) attached now.
    pub consumers: usize,
    /// From the start of `join`/`connect_direct` to the first chunk handed out.
    pub startup_time: Option<Duration>,
    /// Sequence number of the last chunk handed out.
    pub current_seq: Option<u64>,
    /// Newest sequence number known to exist at the data plane.
    pub live_seq: Option<u64>,
    /// Whether a data-plane session is up now.
    pub connected: bool,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {} bytes in {} chunks ({} duplicate), played {} bytes in {} chunks, \
             reconnects {}, rejoins {}, discontinuities {}, consumer drops {}, startup {}, seq {}",
            self.bytes_received,
            self.chunks_received,
            self.duplicates,
            self.bytes_out,
            self.chunks_out,
            self.reconnects,
            self.rejoins,
            self.discontinuities,
            self.consumer_drops,
            self.startup_time
                .map_or_else(|| "-".to_string(), |d| format!("{} ms", d.as_millis())),
            self.current_seq
                .map_or_else(|| "-".to_string(), |s| s.to_string()),
        )
    }
}
