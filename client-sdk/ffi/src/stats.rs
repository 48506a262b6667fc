//! The C view of a viewer's counters ([`StarlingStats`]), a plain struct filled from
//! [`starling_sdk::Stats`].

use std::time::Duration;

use starling_sdk::Stats;

/// A snapshot of a viewer's counters (`starling_viewer_stats`). Times are in
/// milliseconds; -1 means "not known yet".
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StarlingStats {
    /// Chunk payload bytes received from the network (duplicates included).
    pub bytes_received: u64,
    /// Chunks received from the network (duplicates included).
    pub chunks_received: u64,
    /// Payload bytes handed out in order (to every local consumer).
    pub bytes_out: u64,
    /// Chunks handed out in order.
    pub chunks_out: u64,
    /// Bytes this viewer's reader got from `starling_viewer_read` or the data callback.
    pub bytes_read: u64,
    /// Chunk payload bytes received from the data plane.
    pub bytes_from_server: u64,
    /// Chunk payload bytes received from other viewers.
    pub bytes_from_peers: u64,
    /// Chunk payload bytes relayed to other viewers.
    pub bytes_uploaded: u64,
    /// Chunks played on time (peer grid) or in order (direct).
    pub chunks_played: u64,
    /// Chunks that missed their play-out deadline or were given up as a gap.
    pub chunks_skipped: u64,
    /// Times the output was starved.
    pub stalls: u64,
    /// Total duration of the stalls, ms.
    pub stall_time_ms: u64,
    /// Reconnections to the data plane after a lost connection.
    pub reconnects: u64,
    /// Times Join was called again.
    pub rejoins: u64,
    /// Jumps in the output (gaps given up, server skips).
    pub discontinuities: u64,
    /// Times a local consumer fell behind and skipped to the next random-access chunk.
    pub consumer_drops: u64,
    /// Times a substream's parent changed.
    pub parent_changes: u64,
    /// Chunks whose signature was checked and found authentic.
    pub chunks_verified: u64,
    /// Chunks that failed the check (from peers and from the data plane).
    pub bad_chunks: u64,
    /// From the start to the first chunk handed out, ms; -1 before it.
    pub startup_ms: i64,
    /// Lag behind live at the last chunk played, ms; -1 when unknown.
    pub lag_ms: i64,
    /// Play-out buffer ahead of the play-out point, ms.
    pub buffer_ms: u64,
    /// Sequence number of the last chunk handed out; -1 before the first.
    pub current_seq: i64,
    /// Relay upload budget offered now, kbit/s (0 = not relaying).
    pub upload_budget_kbps: u32,
    /// Child links relaying from this viewer now.
    pub children: u32,
    /// Peer links open now (parents, children, neighbours).
    pub peer_links: u32,
    /// Whether a data-plane session is up now.
    pub connected: bool,
    /// Chunks played on time over chunks due (1.0 when none was due yet).
    pub continuity: f64,
    /// Share of received bytes that came from other viewers (0.0..=1.0).
    pub peer_share: f64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ms_or_unknown(d: Option<Duration>) -> i64 {
    d.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl StarlingStats {
    /// The C snapshot of `s`, with `bytes_read` from the reader.
    pub fn from_sdk(s: &Stats, bytes_read: u64) -> StarlingStats {
        StarlingStats {
            bytes_received: s.bytes_received,
            chunks_received: s.chunks_received,
            bytes_out: s.bytes_out,
            chunks_out: s.chunks_out,
            bytes_read,
            bytes_from_server: s.bytes_from_server,
            bytes_from_peers: s.bytes_from_peers,
            bytes_uploaded: s.bytes_uploaded,
            chunks_played: s.chunks_played,
            chunks_skipped: s.chunks_skipped,
            stalls: s.stalls,
            stall_time_ms: ms(s.stall_time),
            reconnects: s.reconnects,
            rejoins: s.rejoins,
            discontinuities: s.discontinuities,
            consumer_drops: s.consumer_drops,
            parent_changes: s.parent_changes,
            chunks_verified: s.chunks_verified,
            bad_chunks: s.bad_chunks_from_peers + s.bad_chunks_from_server,
            startup_ms: ms_or_unknown(s.startup_time),
            lag_ms: ms_or_unknown(s.lag),
            buffer_ms: ms(s.buffer),
            current_seq: s
                .current_seq
                .map_or(-1, |q| i64::try_from(q).unwrap_or(i64::MAX)),
            upload_budget_kbps: s.upload_budget_kbps,
            children: count(s.children),
            peer_links: count(s.peer_links),
            connected: s.connected,
            continuity: s.continuity(),
            peer_share: s.peer_share(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn unknown_times_are_minus_one() {
        let c = StarlingStats::from_sdk(&Stats::default(), 5);
        assert_eq!((c.startup_ms, c.lag_ms, c.current_seq), (-1, -1, -1));
        assert_eq!(c.bytes_read, 5);
        assert_eq!(c.continuity, 1.0);
        let s = Stats {
            startup_time: Some(Duration::from_millis(1500)),
            current_seq: Some(42),
            bytes_from_server: 30,
            bytes_from_peers: 10,
            bad_chunks_from_peers: 1,
            bad_chunks_from_server: 2,
            ..Stats::default()
        };
        let c = StarlingStats::from_sdk(&s, 0);
        assert_eq!((c.startup_ms, c.current_seq, c.bad_chunks), (1500, 42, 3));
        assert_eq!(c.peer_share, 0.25);
    }
}
