//! The scheduler's vocabulary: its configuration (tunables and their defaults), the
//! actions it returns, where a chunk came from, its counters and errors.

use std::time::Duration;

use crate::PeerId;
use crate::peer::buffer_map::BufferMap;

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Pushed by this peer's parent for the given substream (a peer or the data plane).
    Parent(u16),
    /// Pulled from a mesh neighbour.
    Neighbour(PeerId),
    /// Pulled from the data plane (last resort).
    Server,
}

/// A decision for the networking layer (drain with [`PeerScheduler::poll_action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send chunk `seq` (held) to child `child`.
    Push { child: PeerId, seq: u64 },
    /// Ask neighbour `neighbour` for chunk `seq`.
    Request { neighbour: PeerId, seq: u64 },
    /// Ask the data plane for chunk `seq`.
    RequestFromServer { seq: u64 },
    /// Send this buffer map to neighbour `to`.
    SendBufferMap { to: PeerId, map: BufferMap },
    /// Ask the control plane for a new parent for `substream`, excluding `exclude`.
    ReSearch {
        substream: u16,
        exclude: Option<PeerId>,
    },
    /// Hand chunk `seq` (held) to the player now.
    Play { seq: u64 },
    /// Chunk `seq` missed its play-out deadline: the player continues without it.
    Skip { seq: u64 },
    /// Answer a request: send chunk `seq` (held) to `to`.
    Serve { to: PeerId, seq: u64 },
    /// Answer a request: chunk `seq` is not held.
    NotFound { to: PeerId, seq: u64 },
    /// Complain to the control plane about `parent` (`ReportPeer`, non-delivery): of
    /// the last `window` chunks it owed on `substream`, it skipped, delayed or never
    /// sent `missed`. Comes with a [`Action::ReSearch`] excluding it (once the
    /// re-search back-off allows); at most once per parent assignment.
    ReportParent {
        substream: u16,
        parent: PeerId,
        missed: u32,
        window: u32,
    },
}

/// Tunables of a [`PeerScheduler`]. All durations are on the caller's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Number of substreams `K` (1..=64); chunk `seq` belongs to substream `seq mod K`.
    pub substreams: u16,
    /// Duration of one chunk (the live timeline advances one seq per chunk duration).
    pub chunk_duration: Duration,
    /// Play-out point behind the earliest observed arrival of each chunk. Default 2 s:
    /// the p99 lag bar is 3 s; this leaves ~1 s for tree delivery, then mesh repair and
    /// a server fetch before the deadline, and ~1 s of margin for the estimate.
    pub target_lag: Duration,
    /// A missing chunk is pulled from a neighbour once its deadline is this close.
    /// Default 1 s (half the lag: healthy tree delivery is not pre-empted).
    pub repair_lead: Duration,
    /// A missing chunk no neighbour has is pulled from the server once its deadline is
    /// this close. Default 400 ms (one data-plane round trip plus the chunk).
    pub server_lead: Duration,
    /// A request unanswered this long is abandoned and retried elsewhere. Default 300 ms.
    pub request_timeout: Duration,
    /// A chunk a parent skipped is asked of neighbours at once, and of the server once
    /// this long has passed without a neighbour that has it. Default 500 ms.
    pub skip_server_delay: Duration,
    /// Most requests in flight. Default 16.
    pub max_outstanding: usize,
    /// Most requests in flight to one neighbour. Default 4.
    pub max_per_neighbour: usize,
    /// A parent's chunk is late if it arrives this long after the chunk's earliest
    /// observed availability. Default 1 s.
    pub late_threshold: Duration,
    /// Consecutive late chunks from a substream's parent before a re-search. Default 3.
    pub late_strikes: u32,
    /// A parent that has not delivered a chunk this long after it became available is
    /// replaced. Default 1.5 s.
    pub silence_timeout: Duration,
    /// Least time between two re-searches of one substream (a re-search not answered by
    /// [`PeerScheduler::on_parent_changed`] is repeated after this long). Each re-search
    /// that follows the previous one within six of these (plus the wait) doubles the
    /// wait, up to [`SchedulerConfig::research_backoff_max`]: a peer whose new parents
    /// keep failing (more likely its own link or CPU than every parent) stops asking the
    /// control plane every few seconds and leaves the gaps to mesh repair. Default 5 s.
    pub research_retry: Duration,
    /// Longest wait between re-searches of one substream under back-off. Default 60 s.
    pub research_backoff_max: Duration,
    /// How often the scheduler considers sending its buffer map to its neighbours.
    /// Default 2 s. A map goes out only when the neighbours' prediction from the last
    /// one would now be wrong (this peer stopped flowing, or missed a chunk since), or
    /// when [`SchedulerConfig::buffer_map_refresh`] has passed: between maps, a flowing
    /// peer is predicted to hold every chunk that came since.
    pub buffer_map_interval: Duration,
    /// Longest time between two buffer maps to the neighbours, predicted or not.
    /// Default 10 s.
    pub buffer_map_refresh: Duration,
    /// Chunks held (and described in buffer maps) behind the newest; the networking layer
    /// keeps the same number of payloads. Default 64, at most 1024.
    pub window: u16,
    /// A peer parent is judged over the last this many chunks it owed on a substream
    /// (those that became available after it was assigned). Default 32, 1..=64.
    pub parent_window: u16,
    /// More than this many of them skipped (announced), late (see
    /// [`SchedulerConfig::late_threshold`]; only when the chunk could be had elsewhere)
    /// or never sent re-search the substream and report the parent. Default 10 (31 %):
    /// an honest parent carrying a partly covered slot skips at most a fifth of each
    /// child's pushes (`wire::slots_for`), which the relay spreads evenly over its
    /// children; a parent that fails every other push (16 of 32) is caught.
    pub parent_max_missed: u16,
    /// What a parent pushes a new child at once: the chunks it holds of the child's
    /// substreams from this far behind its newest (at least the newest of each). A
    /// viewer starting up plays its oldest chunk once that chunk's deadline comes, a
    /// target lag after the earliest arrival: with more of the stream already there it
    /// starts sooner. A child re-subscribing from a sequence number (it plays from
    /// there) gets only what it lacks within the same span. Default 1 s. (1.5 s cut
    /// the start-up p50 of 2,000 simulated viewers from 1.33 to 0.96 s but not its
    /// p95, and raised their lag p99 from 3.5 to 4.2 s: the back-fill queues on the
    /// parents' uplinks ahead of live chunks.)
    pub start_backfill: Duration,
    /// How much earlier the play-out schedule may move per second of play when the
    /// stream arrives sooner than it was set for (a player catching up at up to
    /// `1 + catch_up/1 s` speed, as low-latency players do). The start-up schedule
    /// follows the first chunks, which come in behind a parent's back-fill; the
    /// fastest substream's own pace shows only seconds later. It moves no earlier
    /// than the fastest substream's recent arrivals, nor than would put the slowest
    /// substream's beyond [`SchedulerConfig::late_threshold`]. Default 100 ms
    /// (1.1x); zero keeps the start-up schedule for good.
    pub catch_up: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            substreams: 4,
            chunk_duration: Duration::from_secs(1),
            target_lag: Duration::from_secs(2),
            repair_lead: Duration::from_millis(1000),
            server_lead: Duration::from_millis(400),
            request_timeout: Duration::from_millis(300),
            skip_server_delay: Duration::from_millis(500),
            max_outstanding: 16,
            max_per_neighbour: 4,
            late_threshold: Duration::from_millis(1000),
            late_strikes: 3,
            silence_timeout: Duration::from_millis(1500),
            research_retry: Duration::from_secs(5),
            research_backoff_max: Duration::from_secs(60),
            buffer_map_interval: Duration::from_secs(2),
            buffer_map_refresh: Duration::from_secs(10),
            window: 64,
            parent_window: 32,
            parent_max_missed: 10,
            start_backfill: Duration::from_millis(1000),
            catch_up: Duration::from_millis(100),
        }
    }
}

/// A scheduler configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// The configuration is unusable.
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(&'static str),
}

/// Counters for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedulerStats {
    /// Chunks played on time.
    pub played: u64,
    /// Chunks that missed their deadline.
    pub skipped: u64,
    /// New chunks pushed by parents.
    pub from_parent: u64,
    /// New chunks pulled from neighbours.
    pub from_neighbour: u64,
    /// New chunks pulled from the data plane.
    pub from_server: u64,
    /// Chunks received again, too late or out of range.
    pub duplicates: u64,
    /// Requests sent to neighbours.
    pub neighbour_requests: u64,
    /// Requests sent to the data plane.
    pub server_requests: u64,
    /// Re-searches emitted.
    pub researches: u64,
    /// Chunks pushed to children.
    pub pushed: u64,
    /// Periodic rounds of buffer maps sent (one map to every neighbour).
    pub buffer_maps_sent: u64,
    /// Pushes a parent skipped (over its upload budget).
    pub parent_skips: u64,
    /// How much earlier the play-out schedule moved after start-up
    /// ([`SchedulerConfig::catch_up`]), ms.
    pub caught_up_ms: u64,
}
