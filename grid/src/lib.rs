//! Starling's peer-grid core, sans-IO.
//!
//! Everything here takes `now` (a [`std::time::Duration`] since an origin the caller
//! picks) and events, and returns decisions as data: no sockets, no clocks, no tasks.
//! The control plane drives [`assign::GridAssigner`]; the SDK's relay engine drives
//! [`peer::Peer`] (around [`peer::PeerScheduler`]); [`sim`] drives both together over a
//! virtual-time network.
//!
//! * [`assign`]: who feeds whom: one assigner per broadcast.
//! * [`peer`]: one peer: the [`peer::Peer`] state machine (policies around the scheduler),
//!   the scheduler, buffer maps, upload estimator, pacing and latency
//!   summary.
//! * [`slots_for`] / [`slot_kbps`]: the slot arithmetic both sides count alike.

pub mod assign;
pub mod peer;
pub mod sim;
mod slots;

pub use slots::{slot_kbps, slots_for};

/// A viewer's identity within one broadcast (the control plane's session number).
pub type PeerId = u64;

/// Who feeds one substream to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Parent {
    /// The data plane (a seed slot for the first root, otherwise a booster slot).
    Server,
    /// Another viewer.
    Peer(PeerId),
}
