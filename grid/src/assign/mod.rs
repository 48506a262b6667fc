//! The peer grid's assignment and booster logic, as a pure (sans-IO) state machine.
//!
//! One [`GridAssigner`] per broadcast decides, for every viewer and every substream
//! (chunk `seq mod K`), who pushes that substream to it: another viewer with a free
//! child slot ([`Parent::Peer`]) or the data plane ([`Parent::Server`], a *booster* slot
//! beyond the one root slot per substream). Nothing here reads a clock, opens a socket or
//! draws unseeded randomness: every input carries `now`, every decision is returned as
//! data, so the gRPC handlers and the discrete-event load simulator drive the same code.
//!
//! # Model
//!
//! A peer declaring an upload budget of `U` kbps owns [`crate::slots_for`]`(U, r, K)` child
//! slots (`r` the stream rate as delivered): the whole slots `U·K / r`, plus a partly covered
//! one when the fraction is large enough (see there), pooled over all substreams: it relays
//! "a portion or the whole stream". Each substream forms a tree rooted at the data plane;
//! a peer's *depth* in a substream is its hop count from the server (server-fed peers have
//! depth 1).
//!
//! # Policy
//!
//! * **Shallow trees.** A parent is chosen per substream from an ordered index of peers
//!   with free slots, keyed by `(depth, larger capacity first, older first, id)`; past the
//!   server-fed backbone (candidate depth ≥ 2) a candidate in the child's address prefix is
//!   preferred among the first few of the shallowest depth.
//! * **Home substream (SplitStream-style interior-disjointness).** Each relaying peer gets
//!   a home substream (the one with the least relay supply so far). On join, a peer takes
//!   the place of the shallowest *leaf that is not homed in that substream* if that puts it
//!   no deeper than a free slot would, adopting the displaced leaf. This keeps relays near
//!   the source and prevents the caterpillar trees a purely greedy filler builds when
//!   upload ≈ stream rate (depth stays logarithmic instead of linear).
//! * **No cycles.** A candidate inside the child's own subtree (in that substream) is never
//!   chosen; the check walks the candidate's ancestor chain (O(depth)).
//! * **Booster exactly on shortfall.** The server is chosen only when no peer slot is free.
//!   After every operation, while peer slots are free, server-fed peers beyond the first
//!   root of a substream are moved (lowest capacity first) under peers with free slots, so
//!   `server_slots_used` tracks the true shortfall `max(K, n·K − Σ slots)`.
//! * **Re-search and bad peers.** A re-search excludes the named parents for
//!   [`GridConfig::avoid_ttl`]; a peer reported bad never gets children again and its current
//!   children are re-parented.
//! * **Reachability.** A peer reachable only by hole punching
//!   ([`GridAssigner::set_punch_only`]) is a parent only of peers that
//!   [`PeerInfo::can_punch`]; the others look further down the free-slot index (within
//!   the scan bound) or take the server.
//! * **Server slot limit.** [`GridConfig::server_slots`] is an admission limit: a join that
//!   would need more server slots than remain fails with [`GridError::NoCapacity`].
//!   Re-parenting already admitted viewers may exceed it (a viewer never stalls while the
//!   data plane is reachable); [`GridStats::server_slots_used`] shows the overshoot.
//!
//! # Cost
//!
//! Join, leave, re-parent: O(K · log n) index updates plus O(subtree) for depth updates of
//! a moved subtree and O(depth) per cycle check. Per-peer state is a few dozen bytes plus
//! `6·K` bytes of parents/depths and its child list.

mod assigner;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use assigner::GridAssigner;

pub use crate::{Parent, PeerId};

/// What the control plane knows about a joining peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Declared (measured, user-capped) upload budget in kbps; 0 = never relays.
    pub upload_kbps: u32,
    /// Network prefix of the peer's address (e.g. the IPv4 /24 as `u32`, or a hash of
    /// an IPv6 /48); peers in the same prefix are preferred as parents past the backbone.
    pub addr_prefix: u32,
    /// Time of the join, on the caller's monotonic clock.
    pub now: Duration,
    /// The peer can open a link to a parent that is reachable only by hole punching
    /// ([`GridAssigner::set_punch_only`]): its NAT keeps its listener's port, or it has
    /// none. A peer behind a symmetric NAT cannot, and never gets such a parent.
    pub can_punch: bool,
}

/// The answer to a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinPlan {
    /// One parent per substream, indexed by substream.
    pub parents: Vec<Parent>,
    /// A few mesh neighbours to exchange buffer maps with.
    pub neighbours: Vec<PeerId>,
    /// Other peers whose parent changed as a side effect (a displaced leaf adopted by the
    /// joiner, server-fed peers moved onto the joiner's free slots). Each must be told.
    pub moved: Vec<Reassignment>,
}

/// A peer's new parent for one substream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reassignment {
    /// The peer whose parent changed.
    pub child: PeerId,
    /// The substream concerned.
    pub substream: u16,
    /// Its new parent.
    pub parent: Parent,
}

/// The answer to a re-search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReparentOutcome {
    /// The child's new parent for the substream.
    pub parent: Parent,
    /// Other peers whose parent changed as a side effect (booster release).
    pub moved: Vec<Reassignment>,
}

/// Supply, demand and booster figures of one broadcast's grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GridStats {
    /// Connected peers.
    pub peers: u64,
    /// Substream subscriptions needed: `peers × K`.
    pub demand: u64,
    /// Peer child slots (free + used) of peers not reported bad.
    pub peer_supply: u64,
    /// Peer child slots in use.
    pub peer_slots_used: u64,
    /// Substream subscriptions fed by the data plane (roots + booster).
    pub server_slots_used: u64,
    /// Server slots beyond the roots of each substream ([`GridConfig::peers_per_root`]): the booster.
    pub booster_slots: u64,
    /// Deepest peer over all substream trees (server-fed = 1).
    pub max_depth: u16,
    /// Rate of one substream, kbps (`r / K`, rounded up).
    pub substream_kbps: u32,
    /// Sum of the declared upload budgets of connected peers, kbps.
    pub upload_kbps_total: u64,
    /// Stream rate `r`, kbps.
    pub stream_kbps: u32,
}

impl GridStats {
    /// Data-plane egress to this broadcast's peers, kbps (`server_slots_used × r/K`).
    pub fn server_egress_kbps(&self) -> u64 {
        self.server_slots_used * u64::from(self.substream_kbps)
    }

    /// Booster bandwidth, kbps (`booster_slots × r/K`).
    pub fn booster_kbps(&self) -> u64 {
        self.booster_slots * u64::from(self.substream_kbps)
    }

    /// The Kumar–Liu–Ross lower bound on server egress, kbps: `max(r, n·r − Σu)`
    /// (0 without peers).
    pub fn fluid_bound_kbps(&self) -> u64 {
        if self.peers == 0 {
            return 0;
        }
        let r = u64::from(self.stream_kbps);
        (self.peers * r)
            .saturating_sub(self.upload_kbps_total)
            .max(r)
    }
}

/// Tunables of a [`GridAssigner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridConfig {
    /// Number of substreams `K` (1..=64). Default 4 (broadcasts default to
    /// `starling_controlplane::validate::DEFAULT_SUBSTREAMS`, 8): few parents per viewer; larger `K`
    /// lowers the slot-rounding loss (on average `r/2K` per relaying peer) at the cost of
    /// more connections.
    pub substreams: u16,
    /// Stream rate `r` in kbps (> 0).
    pub stream_kbps: u32,
    /// Data-plane slots available to this broadcast (admission limit for joins).
    pub server_slots: u64,
    /// Mesh neighbours handed out at join. Default 4.
    pub neighbours: u16,
    /// Most child slots one peer may own, whatever its budget. Default 256.
    pub max_slots_per_peer: u32,
    /// How long a re-search's excluded parents stay excluded for that child. Default 60 s.
    pub avoid_ttl: Duration,
    /// Seed of the neighbour-sampling RNG.
    pub seed: u64,
    /// One root per this many peers: each substream's tree may have that many
    /// server-fed peers (at least one, at most [`GridConfig::max_roots`]) before the
    /// server counts as a booster. More roots make every tree shallower, and each hop
    /// a chunk is stored and forwarded on a relay's uplink adds to every viewer's lag
    /// below it; they cost the data plane `roots·r` while peers would carry it.
    /// Joiners (then re-parented peers) take a free root first; relays homed in a
    /// substream displace leaves from its roots. 0: one root per substream. Default 0.
    pub peers_per_root: u32,
    /// Most roots per substream. Default 64.
    pub max_roots: u16,
}

impl Default for GridConfig {
    fn default() -> Self {
        GridConfig {
            substreams: 4,
            stream_kbps: 1000,
            server_slots: u64::MAX,
            neighbours: 4,
            max_slots_per_peer: 256,
            avoid_ttl: Duration::from_secs(60),
            seed: 0x5EED,
            peers_per_root: 0,
            max_roots: 64,
        }
    }
}

/// Why an assigner operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GridError {
    /// The configuration is unusable.
    #[error("invalid grid configuration: {0}")]
    InvalidConfig(&'static str),
    /// The peer is already in the grid.
    #[error("peer {0} already joined")]
    AlreadyJoined(PeerId),
    /// The peer is not in the grid.
    #[error("unknown peer {0}")]
    UnknownPeer(PeerId),
    /// The substream index is not below `K`.
    #[error("substream {0} out of range")]
    InvalidSubstream(u16),
    /// Neither peer slots nor server slots are left for a new viewer.
    #[error("no capacity: peer slots and server slots exhausted")]
    NoCapacity,
    /// The grid holds `u32::MAX - 2` peers already.
    #[error("too many peers")]
    TooManyPeers,
}
