//! A deterministic discrete-event network in virtual time that drives many
//! [`Peer`](crate::peer::Peer)s and the real
//! [`GridAssigner`](crate::assign::GridAssigner) together, without sockets, clocks or
//! threads. Its one concern: to show what the grid's policies do to a swarm over time
//! ([`SimReport`]); the scheduler's and the assigner's own tests run on it.
//!
//! # What is modelled
//!
//! * **Time**: microseconds of virtual time; events run in (time, insertion) order, so
//!   the same [`SimConfig::seed`] and the same calls give the same [`SimReport`].
//! * **Links**: one-way latency per link, drawn once per link from [`Latency`] (a link
//!   delivers in order); optional independent loss of peer-to-peer frames
//!   ([`SimConfig::loss`]); a peer can be slowed down ([`Sim::slow_down`]).
//! * **Uplinks**: every peer, and the data plane, sends through one uplink of its own
//!   rate; frames queue behind each other on it (serialization delay), whatever their
//!   destination. Frames carry the SDK's wire sizes ([`FrameSizes`]).
//! * **The source**: one chunk per chunk duration, chunk `seq` available at
//!   `(seq + 1)·d`; the data plane pushes it to the peers that subscribed to its
//!   substream from the server and serves server repairs once it is available.
//! * **The control plane**: the real assigner (`control.rs`): joins (with upload and
//!   address prefix), clean leaves, crashes (a leave after
//!   [`SimConfig::heartbeat_timeout`]), re-searches (`reparent`, with the excluded
//!   parent), reports (a peer is demoted after [`SimConfig::reporters_to_demote`]
//!   distinct reporters), and every `moved` reassignment delivered to its peer, each
//!   message after [`SimConfig::control_latency`].
//! * **The peer**: each viewer is a [`crate::peer::Peer`] (the state machine the SDK's
//!   engine drives) behind the engine's link-level glue (`node.rs`): per-child push
//!   pacing with announced skips (partial slots), a serve bucket, one re-search per
//!   substream at a time, ticked either periodically or only at its `next_timeout`
//!   ([`Drive`]).
//!
//! # What is not
//!
//! TCP dynamics (slow start, congestion control, head-of-line blocking beyond the
//! uplink queue), the downlink (unlimited), the control plane's processing time and
//! its heartbeats (a crash is seen after a fixed timeout), mesh neighbours replaced
//! after they leave, parent tickets, chunk signatures' verification (only their bytes),
//! the SDK's upload estimator (an uplink is exactly what the peer declares unless set
//! otherwise), and the data plane's limits (its uplink is a configured rate).

mod control;
mod network;
mod node;
mod observe;
mod report;
mod rng;
mod scenario;
#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::assign::GridConfig;
use crate::peer::SchedulerConfig;

pub use control::{ControlPlane, ToControl, ToPeer};
pub use network::{Sim, SimError};
pub use node::{Endpoint, Frame, Life, Node, Upcall};
pub use report::SimReport;
pub use rng::{Latency, SimRng};
pub use scenario::UploadProfile;

/// Byte sizes of the data-plane frames, as the SDK sends them. The grid crate does not
/// depend on `starling-proto`; the defaults are its numbers: `wire::HEADER_LEN` (8),
/// `wire::CHUNK_FIXED_LEN` (20), a signature block with its 2-byte length field of
/// `integrity::FIXED_LEN + broadcast id + integrity::SIGNATURE_LEN` (63 + 16 + 64)
/// (see `wire::chunk_frame_len`), `REQUEST`/`NOT_FOUND` a header and a `u64`, and a
/// `BUFFER_MAP` a header plus `peer::BUFFER_MAP_HEADER_LEN` (10) and the bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSizes {
    /// Chunk payload bytes (`stream rate × chunk duration`).
    pub payload: u64,
    /// Frame header (`wire::HEADER_LEN`).
    pub header: u64,
    /// A chunk frame's fixed fields (`wire::CHUNK_FIXED_LEN`).
    pub chunk_fixed: u64,
    /// The signature block's bytes (0 = unsigned chunks).
    pub signature: u64,
}

impl FrameSizes {
    /// The SDK's sizes for chunks of `payload` bytes, signed, with a 16-byte broadcast id.
    pub fn signed(payload: u64) -> FrameSizes {
        FrameSizes {
            payload,
            header: 8,
            chunk_fixed: 20,
            signature: 63 + 16 + 64,
        }
    }

    /// A whole `CHUNK` frame (`wire::chunk_frame_len`).
    pub fn chunk_frame(&self) -> u64 {
        let sig = if self.signature == 0 {
            0
        } else {
            2 + self.signature
        };
        self.header + self.chunk_fixed + sig + self.payload
    }

    /// A `REQUEST` or `NOT_FOUND` frame.
    pub fn control_frame(&self) -> u64 {
        self.header + 8
    }

    /// A `BUFFER_MAP` frame of `bits` bits.
    pub fn buffer_map_frame(&self, bits: u16) -> u64 {
        self.header + crate::peer::BUFFER_MAP_HEADER_LEN as u64 + u64::from(bits).div_ceil(8)
    }
}

/// How the peers' schedulers are ticked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Every peer every period, whatever its `next_timeout`.
    Periodic(Duration),
    /// Each peer only at its scheduler's `next_timeout`, as the SDK's engine does.
    Deadlines,
}

/// Everything a simulation runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Every peer's scheduler configuration (`substreams` and `chunk_duration` are the
    /// stream's).
    pub scheduler: SchedulerConfig,
    /// Stream rate `r`, kbit/s.
    pub stream_kbps: u32,
    /// The assigner's configuration; `substreams`, `stream_kbps` and `seed` are taken
    /// from this config.
    pub grid: GridConfig,
    /// One-way latency of peer-to-peer and peer-to-server links.
    pub latency: Latency,
    /// One-way latency between a peer and the control plane.
    pub control_latency: Duration,
    /// How long the control plane takes to notice a crashed peer.
    pub heartbeat_timeout: Duration,
    /// How long a closed link takes to be noticed by the peer at its other end.
    pub link_close_delay: Duration,
    /// Probability that a peer-to-peer frame is lost (0 = none).
    pub loss: f64,
    /// The data plane's uplink, kbit/s.
    pub server_uplink_kbps: u64,
    /// Distinct reporters that get a peer demoted.
    pub reporters_to_demote: usize,
    /// How schedulers are ticked.
    pub drive: Drive,
    /// Figures of the [`SimReport`] that are rates are measured from this time on.
    pub measure_from: Duration,
    /// Override of the chunk frame sizes (`None`: [`FrameSizes::signed`] of the
    /// payload `r × d`).
    pub frames: Option<FrameSizes>,
    /// Seed of every random draw.
    pub seed: u64,
}

impl SimConfig {
    /// A stream of `stream_kbps` in `substreams` substreams of `chunk_duration` chunks,
    /// 30 ms links, 30 ms to the control plane, ticks at deadlines.
    pub fn new(stream_kbps: u32, substreams: u16, chunk_duration: Duration) -> SimConfig {
        SimConfig {
            scheduler: SchedulerConfig {
                substreams,
                chunk_duration,
                ..SchedulerConfig::default()
            },
            stream_kbps,
            grid: GridConfig::default(),
            latency: Latency::Fixed(Duration::from_millis(30)),
            control_latency: Duration::from_millis(30),
            heartbeat_timeout: Duration::from_secs(10),
            link_close_delay: Duration::from_secs(1),
            loss: 0.0,
            server_uplink_kbps: 1_000_000,
            reporters_to_demote: 3,
            drive: Drive::Deadlines,
            measure_from: Duration::ZERO,
            frames: None,
            seed: 1,
        }
    }

    /// The frame sizes in use.
    pub fn frame_sizes(&self) -> FrameSizes {
        self.frames.unwrap_or_else(|| {
            let d_ms = u64::try_from(self.scheduler.chunk_duration.as_millis()).unwrap_or(0);
            FrameSizes::signed(u64::from(self.stream_kbps) * d_ms / 8)
        })
    }
}

/// The uplink of a peer that declares no relay budget, kbit/s.
pub const MIN_UPLINK_KBPS: u32 = 128;

/// One viewer's properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSpec {
    /// Declared relay budget, kbit/s (what the control plane sizes its slots by, and
    /// what its pushes and serves are paced to).
    pub upload_kbps: u32,
    /// Its physical uplink, kbit/s (frames serialize at this rate; ≥ the budget).
    pub uplink_kbps: u32,
    /// Address prefix (for the assigner's locality preference).
    pub addr_prefix: u32,
}

impl PeerSpec {
    /// A peer whose uplink is exactly its budget, or [`MIN_UPLINK_KBPS`] for a peer that
    /// does not relay (it still sends requests and buffer maps).
    pub fn with_upload(upload_kbps: u32) -> PeerSpec {
        PeerSpec {
            upload_kbps,
            uplink_kbps: upload_kbps.max(MIN_UPLINK_KBPS),
            addr_prefix: 0,
        }
    }
}
