//! Simulated peers against the real servers (`--net sim`): one process holds every
//! viewer as a grid [`Node`](starling_grid::sim::Node) (the `Peer` state machine and
//! the engine's link-level glue, the same code the grid's simulator runs) in real time,
//! and carries their peer-to-peer frames through an in-process network instead of
//! loopback sockets.
//!
//! * [`fabric`]: the one task that owns every node: a timer heap of frame deliveries
//!   and node deadlines in real time, per-link latency, per-peer uplink serialization,
//!   loss and jitter, wire-sized frames carrying shared [`bytes::Bytes`] payloads; every
//!   played byte checked against the source's pattern.
//! * [`dispatch`]: real control-plane traffic: the dispatcher, many sessions per
//!   HTTP/2 connection; [`control`]: what the sessions share (config, counters, `Join`);
//!   [`session`]: one task per viewer's session (join, the session stream
//!   reopened as the SDK does, pushed parents, neighbours, key sets, tokens and
//!   revocations applied, re-parents, bad-peer reports, leave); [`reports`]: its
//!   quality reports (`ViewerService.Report`) at the SDK's cadence.
//! * [`msg`]: the fabric's messages ([`Up`], [`Input`]) and setup.
//! * [`links`]: uplinks, link latency, the in-process server, parent and neighbour
//!   links.
//! * [`dataplane`]: real data-plane traffic: one wire connection per viewer (token,
//!   subscription to the server's substreams, requests), every chunk verified.
//! * [`local`]: the in-process stand-in for the control plane (the grid's own
//!   [`ControlPlane`](starling_grid::sim::ControlPlane) around the real assigner), for
//!   tests of the fabric alone.
//! * [`peer`]: one simulated viewer's bytes and figures around its node.
//! * [`worker`]: the `--net sim` worker process of `starling-loadtest run`.
//! * [`stats`]: the fabric's figures in the worker protocol's shapes
//!   ([`crate::worker::WorkerSample`], [`crate::worker::PeerRecord`]).
//!
//! What is not modelled: TCP dynamics between peers, downlinks (unlimited), parent
//! tickets and peer tokens on peer links (the control plane still issues them).

pub mod control;
pub mod dataplane;
pub mod dispatch;
pub mod fabric;
pub mod links;
pub mod local;
pub mod msg;
pub mod peer;
pub mod reports;
pub mod session;
pub mod stats;
#[cfg(test)]
mod tests;
pub mod worker;

use std::time::Duration;

use starling_grid::sim::Latency;

pub use fabric::{Fabric, FabricHandle};
pub use msg::{FabricConfig, Input, ServerMode, SimChunk, Up};
pub use stats::Snapshot;

/// How the simulated network and its peers behave.
#[derive(Debug, Clone)]
pub struct SimNetConfig {
    /// Stream rate, kbit/s.
    pub stream_kbps: u32,
    /// Substreams (K).
    pub substreams: u16,
    /// Chunk duration.
    pub chunk_duration: Duration,
    /// Play-out lag behind live (the SDK's default when `None`).
    pub target_lag: Option<Duration>,
    /// One-way latency of peer-to-peer links (drawn once per link).
    pub latency: Latency,
    /// One-way latency between a peer and the data plane (in-process server only).
    pub server_latency: Duration,
    /// Extra delay per frame, uniform in `[0, jitter]` (0 = none).
    pub jitter: Duration,
    /// Probability that a peer-to-peer frame is lost (0 = none).
    pub loss: f64,
    /// How long a closed link takes to be noticed at its other end.
    pub link_close_delay: Duration,
    /// A viewer's physical uplink as a multiple of its relay budget (frames serialize
    /// at this rate; a viewer without a budget still has 128 kbit/s for requests and
    /// buffer maps).
    pub uplink_factor: f64,
    /// Seed of the link latencies, jitter and loss.
    pub seed: u64,
    /// Bound of the fabric's input queue.
    pub queue: usize,
}

impl SimNetConfig {
    /// A stream of `stream_kbps` in `substreams` substreams of `chunk_duration` chunks,
    /// links of 5–40 ms (one country), uplinks twice the relay budget, no loss or
    /// jitter.
    pub fn new(stream_kbps: u32, substreams: u16, chunk_duration: Duration) -> SimNetConfig {
        SimNetConfig {
            stream_kbps,
            substreams,
            chunk_duration,
            target_lag: None,
            latency: Latency::Uniform {
                min: Duration::from_millis(5),
                max: Duration::from_millis(40),
            },
            server_latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            link_close_delay: Duration::from_millis(500),
            uplink_factor: 2.0,
            seed: 1,
            queue: 65_536,
        }
    }

    /// Chunk payload bytes (`stream rate × chunk duration`).
    pub fn payload_len(&self) -> usize {
        let ms = u64::try_from(self.chunk_duration.as_millis()).unwrap_or(u64::MAX);
        usize::try_from(u64::from(self.stream_kbps).saturating_mul(ms) / 8).unwrap_or(0)
    }
}
