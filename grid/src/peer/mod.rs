//! The peer's side of the relaying grid, as pure (sans-IO) state machines.
//!
//! A broadcast's chunks are split into `K` substreams (`seq mod K`). The control plane
//! gives this peer one parent per substream (another peer or the data plane), a few mesh
//! neighbours, and children that subscribed to some substreams of it.
//! [`PeerScheduler`] decides, from events and `now` only, what the networking layer does:
//!
//! * **push**: every new chunk of a substream goes to that substream's children at once
//!   ([`Action::Push`]), whichever source it came from;
//! * **pull (mesh repair)**: a chunk still missing [`SchedulerConfig::repair_lead`] before
//!   its play-out deadline is requested from a neighbour whose [`BufferMap`] has it,
//!   fewest requests in flight first; unanswered after
//!   [`SchedulerConfig::request_timeout`] or answered not-found, from another one; from
//!   the data plane only when no neighbour has it and the deadline is
//!   [`SchedulerConfig::server_lead`] away;
//! * **play-out**: chunk `seq` is due at `base + seq·d + target_lag`, `base` being the
//!   earliest observed `arrival − seq·d` when playing starts; at its deadline it is played
//!   or skipped ([`Action::Play`] / [`Action::Skip`]);
//! * **quality monitor**: a substream whose parent delivers
//!   [`SchedulerConfig::late_strikes`] chunks in a row later than
//!   [`SchedulerConfig::late_threshold`] after availability, or nothing for
//!   [`SchedulerConfig::silence_timeout`] after a chunk became available, is re-searched
//!   ([`Action::ReSearch`], excluding that parent) while the buffer and mesh repair cover
//!   the gap. A parent is only blamed for a chunk that could be had elsewhere first (held
//!   from a repair, or in a neighbour's buffer map): when everyone is late a new parent
//!   cannot help. Re-searches of one substream are [`SchedulerConfig::research_retry`]
//!   apart and back off (doubling up to [`SchedulerConfig::research_backoff_max`]) while
//!   new parents keep failing;
//! * **lying parents**: over the last [`SchedulerConfig::parent_window`] chunks a peer
//!   parent owed on a substream, more than [`SchedulerConfig::parent_max_missed`]
//!   skipped, late (and available elsewhere) or never sent re-search the substream and
//!   report the parent ([`Action::ReportParent`]): strikes in a row miss a parent that
//!   fails every other push;
//! * **serving**: requests are answered from the held window ([`Action::Serve`] /
//!   [`Action::NotFound`]); buffer maps go to every neighbour when
//!   their prediction from the last one would be wrong (checked every
//!   [`SchedulerConfig::buffer_map_interval`]), and at least every
//!   [`SchedulerConfig::buffer_map_refresh`].
//!
//! [`Peer`] wraps the scheduler with the rest of one peer's policies, as a state machine
//! a driver feeds events and `now` and drains [`PeerAction`]s from: the [`PlayClock`]
//! (stream time at the measured chunk rate), the [`UploadBucket`] and per-child
//! [`ChildPace`] (pushes over the budget become skip announcements, `NOT_FOUND`),
//! [`ChildSlots`] (child admission by slots), the parent per substream, re-search
//! (one at a time per substream) and the [`ParentMemory`] of failed and banned peers.
//!
//! Two more pure pieces: [`UploadEstimator`] lowers the relay budget of a peer without a
//! configured `max_upload_kbps` to what its uplink drains while its send queues are
//! backlogged, and [`LatencySummary`] is the bounded, mergeable histogram the SDK keeps
//! of its re-parent times.
//!
//! Everything is bounded: the held window ([`SchedulerConfig::window`] chunks), requests
//! in flight ([`SchedulerConfig::max_outstanding`]), repair state (seqs between the play
//! point and the live edge), buffer maps ([`MAX_BUFFER_MAP_BITS`]).

mod buffer_map;
mod child_slots;
mod delivery;
mod latency;
#[cfg(test)]
mod lying_parent_tests;
mod machine;
#[cfg(test)]
mod machine_tests;
mod parent_memory;
mod play_clock;
mod push_pacing;
mod scheduler;
mod upload;
mod upload_bucket;

pub use buffer_map::{BUFFER_MAP_HEADER_LEN, BufferMap, BufferMapError, MAX_BUFFER_MAP_BITS};
pub use child_slots::{ChildSlots, admit_limit};
pub use latency::{LATENCY_BOUNDS_MS, LATENCY_BUCKETS, LatencySummary};
pub use machine::{Peer, PeerAction, PeerConfig};
pub use parent_memory::{FAILED_PARENT_MEMORY, MAX_BANNED, MAX_EXCLUDE, ParentMemory};
pub use play_clock::PlayClock;
pub use push_pacing::ChildPace;
pub use scheduler::{
    Action, PeerScheduler, SchedulerConfig, SchedulerError, SchedulerStats, Source,
};
pub use upload::{UploadEstimator, UploadEstimatorConfig};
pub use upload_bucket::UploadBucket;

pub use crate::PeerId;
