//! Viewer counters.

use std::time::Duration;

use starling_grid::peer::LatencySummary;

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
    /// Chunk payload bytes received from the data plane (pushed or pulled; duplicates
    /// included).
    pub bytes_from_server: u64,
    /// Chunk payload bytes received from other peers (parents and neighbours;
    /// duplicates included).
    pub bytes_from_peers: u64,
    /// Chunk payload bytes sent to other peers (pushes to children, answers to
    /// requests).
    pub bytes_uploaded: u64,
    /// The same chunks as sent: frame header, fixed fields, signature block and payload
    /// (what the upload budget is spent in).
    pub wire_bytes_uploaded: u64,
    /// Chunks handed to the player on time (peer grid) or in order (direct).
    pub chunks_played: u64,
    /// Chunks that missed their play-out deadline (peer grid) or were given up as a
    /// gap (direct). Continuity = played / (played + skipped), see
    /// [`Stats::continuity`].
    pub chunks_skipped: u64,
    /// Times a substream's parent changed (re-search, heartbeat re-assignment, parent
    /// lost).
    pub parent_changes: u64,
    /// Re-parent times: from the moment a substream's parent was declared lost (link
    /// failed) or re-searched (late or silent) to the first chunk of that substream
    /// pushed by the new parent (a peer or the data plane). A re-search that ends with
    /// the same parent, or fails while the old parent still feeds, is not counted.
    pub reparent_time: LatencySummary,
    /// Timed re-parents (same start): time to the control plane's `Reparent` answer,
    /// recorded when the answer arrives (a heartbeat may move the substream first, so
    /// the counts of the two summaries can differ).
    pub reparent_answer_time: LatencySummary,
    /// The relay upload budget offered now, kbit/s (0 = not relaying). With
    /// `max_upload_kbps = None` it starts at the SDK's initial offer and may be lowered
    /// by the upload estimate.
    pub upload_budget_kbps: u32,
    /// The uplink throughput measured while the relay send queues were backlogged
    /// (EWMA), kbit/s; `None` when not estimating or never backlogged.
    pub upload_estimate_kbps: Option<u32>,
    /// Child links relaying from this viewer now.
    pub children: usize,
    /// Mesh neighbour links now (outgoing and incoming).
    pub neighbours: usize,
    /// This viewer's id in the peer grid (`None` without a grid assignment).
    pub peer_id: Option<u64>,
    /// Where the control plane saw this viewer's `Join` come from: behind a NAT, the
    /// router's public address and the port it mapped that connection to.
    pub observed_addr: Option<std::net::SocketAddr>,
    /// Peer links open now (parents, children, neighbours; the data plane excluded).
    pub peer_links: usize,
    /// Stalls: times the output was starved. In the peer grid, each run of consecutive
    /// chunks that missed their play-out deadline (`Skip`) is one stall; on the direct
    /// path, each gap given up in the output is one. See [`Stats::stall_time`].
    pub stalls: u64,
    /// Total duration of the stalls: the skipped chunks times the chunk duration.
    pub stall_time: std::time::Duration,
    /// Lag behind live at the last chunk played: wall clock when it was handed to the
    /// player minus the time the data plane cut it (`None` before the first chunk, or
    /// when the data plane does not stamp chunks).
    pub lag: Option<std::time::Duration>,
    /// Play-out buffer: chunks held ahead of the play-out point times the chunk
    /// duration (peer grid), or chunks waiting in the reorder buffer (direct).
    pub buffer: std::time::Duration,
    /// Chunks whose signature and payload hash were checked and found authentic.
    pub chunks_verified: u64,
    /// Chunks accepted without a check because `Join` returned no chunk keys.
    pub chunks_unverified: u64,
    /// Chunks from peers that failed the check (dropped; the peer was disconnected,
    /// reported and excluded).
    pub bad_chunks_from_peers: u64,
    /// Chunks from the data plane that failed the check (dropped and logged).
    pub bad_chunks_from_server: u64,
    /// `ReportPeer` calls made (peers that sent a bad chunk).
    pub peers_reported: u64,
    /// Peer connections refused or closed for their token (missing, invalid, expired,
    /// revoked).
    pub peers_refused: u64,
    /// Peer connections closed by the listener's caps: beyond
    /// [`PeerLimits::max_incoming`](crate::PeerLimits::max_incoming), or evicted as the
    /// oldest handshake beyond [`PeerLimits::max_handshakes`](crate::PeerLimits::max_handshakes).
    pub peer_connections_refused: u64,
    /// `REQUEST`s from peers answered `NOT_FOUND` unseen, over the link's request rate
    /// ([`PeerLimits::requests_per_s`](crate::PeerLimits::requests_per_s)).
    pub peer_requests_refused: u64,
    /// Peer links closed for a `CHUNK` we never asked for on a link we accepted.
    pub unsolicited_chunks: u64,
    /// Chunks signed with a key id not (yet) in our key set: held while the keys are
    /// refreshed, then played or relayed if the refreshed set has the key, or counted
    /// as bad (the sender dropped and reported) if it still does not.
    pub chunks_unknown_key: u64,
    /// Early heartbeats made to fetch the current keys (a chunk named an unknown key).
    pub key_refreshes: u64,
    /// Chunks of the run this viewer held before a re-join told it of a new run,
    /// dropped without blaming their sender (see `ViewerConfig::chunk_max_age` and
    /// docs/SECURITY.md, "Replays").
    pub chunks_previous_run: u64,
    /// The measured offset of the control plane's clock to this device's, ms (what
    /// chunk ages and token expiries are corrected by).
    pub clock_offset_ms: i64,
    /// Parents reported (`ReportPeer`, `NON_DELIVERY`) and left for skipping or
    /// delaying too many of their pushes.
    pub parents_reported_non_delivery: u64,
    /// Renewed chunk tokens received from the control plane.
    pub token_renewals: u64,
    /// Peer links opened by hole punching: to punch-only parents, and children's links
    /// our own punch opened (`PeerRef.punch`).
    pub punched_links: u64,
    /// Child subscriptions admitted (a peer subscribing to at least one substream).
    pub children_admitted: u64,
    /// Children the control plane told this viewer to punch towards
    /// (`SessionDown.punch`: it is reachable only that way).
    pub punch_requests: u64,
    /// Dials to peers (parents, neighbours) that did not open or handshake.
    pub peer_dials_failed: u64,
    /// The longest dial that could not open a connection at all (refused, timed out,
    /// or a punch that never met), from its start to giving up: how long a child
    /// waited on a parent it could not reach.
    pub peer_dial_fail_max: std::time::Duration,
    /// Quality reports acknowledged by the control plane.
    pub reports_sent: u64,
    /// Quality reports dropped unsent because the queue was full (control plane
    /// unreachable for too long).
    pub reports_dropped: u64,
}

impl Stats {
    /// Chunks played on time over chunks due: `played / (played + skipped)`, 1.0 when
    /// nothing was due yet.
    pub fn continuity(&self) -> f64 {
        let due = self.chunks_played + self.chunks_skipped;
        if due == 0 {
            1.0
        } else {
            self.chunks_played as f64 / due as f64
        }
    }

    /// Share of received bytes that came from peers (0.0 when nothing was received).
    pub fn peer_share(&self) -> f64 {
        let all = self.bytes_from_server + self.bytes_from_peers;
        if all == 0 {
            0.0
        } else {
            self.bytes_from_peers as f64 / all as f64
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {} bytes in {} chunks ({} duplicate), played {} bytes in {} chunks, \
             reconnects {}, rejoins {}, discontinuities {}, consumer drops {}, startup {}, seq {}; \
             from server {} bytes, from peers {} bytes, uploaded {} bytes, played {}, skipped {}, \
             parent changes {}, re-parents timed {} (p50 {}, max {} ms), stalls {} ({} ms); \
             chunks verified {}, unverified {}, \
             bad from peers {}, bad from server {}, peers reported {}, peers refused {}; \
             children admitted {}, punched links {}, punch requests {}, \
             peer dials failed {} (longest {} ms)",
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
            self.bytes_from_server,
            self.bytes_from_peers,
            self.bytes_uploaded,
            self.chunks_played,
            self.chunks_skipped,
            self.parent_changes,
            self.reparent_time.count,
            self.reparent_time
                .quantile_ms(0.5)
                .map_or_else(|| "-".to_string(), |v| format!("{v} ms")),
            self.reparent_time.max_ms,
            self.stalls,
            self.stall_time.as_millis(),
            self.chunks_verified,
            self.chunks_unverified,
            self.bad_chunks_from_peers,
            self.bad_chunks_from_server,
            self.peers_reported,
            self.peers_refused,
            self.children_admitted,
            self.punched_links,
            self.punch_requests,
            self.peer_dials_failed,
            self.peer_dial_fail_max.as_millis(),
        )
    }
}
