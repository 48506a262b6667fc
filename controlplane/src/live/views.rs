//! What callers hand the live grids and get back: join input, join/heartbeat views,
//! token state, revocation targets and results, bad-peer reports, expiries and refusals.

use super::MAX_REPORTS_PER_SESSION;
use std::net::IpAddr;

use starling_proto::token::Scopes;
use starling_proto::v1::{PeerRef, SubstreamParent};

use starling_grid::assign::{GridError, GridStats, PeerId};

/// The grid-related answer to a join.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinView {
    /// The new peer's id.
    pub peer_id: PeerId,
    /// One parent per substream.
    pub parents: Vec<SubstreamParent>,
    /// Mesh neighbours (peers that accept connections).
    pub neighbours: Vec<PeerRef>,
    /// Stream rate the grid accounts slots with.
    pub stream_kbps: u32,
    /// Child slots the claimed upload buys (the grid may use fewer until confirmed).
    pub child_slots: u32,
    /// Upload budget the grid counts slots with now (the claim, capped until confirmed).
    pub granted_kbps: u32,
    /// How many other peers were re-parented by this join (they learn it by heartbeat).
    pub moved: usize,
}

/// What a heartbeat learns from the grid.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeartbeatView {
    /// The viewer's current parents.
    pub parents: Vec<SubstreamParent>,
    /// Its current mesh neighbours.
    pub neighbours: Vec<PeerRef>,
    /// The viewer's peer id.
    pub peer_id: PeerId,
    /// Its broadcast.
    pub broadcast_id: String,
    /// The chunk token it holds (scopes, expiry), if one was issued.
    pub token: Option<TokenState>,
    /// A counter of this heartbeat grew beyond its physical bound and was clamped.
    pub clamped: bool,
    /// When this viewer is reachable only by hole punching: its children, each with
    /// the server-reflexive address to punch towards (`SessionDown.punch`).
    pub punch: Vec<PeerRef>,
    /// The child slots its claimed upload buys at the grid's current rate (0 when it
    /// does not relay).
    pub child_slots: u32,
}

/// The chunk token a session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenState {
    /// Its scopes (renewals keep them).
    pub scopes: Scopes,
    /// Its expiry, unix ms.
    pub expires_at_ms: i64,
    /// The session's holder key (`JoinRequest.holder_key`): renewals are bound to it.
    pub holder_key: [u8; 32],
}

/// Which sessions an admin revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeTarget<'a> {
    /// Every session whose credential had this `sub`.
    Subject(&'a str),
    /// One session.
    Session(&'a str),
}

/// A session removed from its grid by a revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Session id.
    pub session_id: String,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Peers re-parented because it left.
    pub moved: usize,
    /// Expiry of the session's credential (unix seconds), if it had one.
    pub credential_expires_at: Option<u64>,
}

/// The outcome of a peer report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPeerReport {
    /// The reporter's broadcast.
    pub broadcast_id: String,
    /// The reporter's peer id.
    pub reporter: PeerId,
    /// Whether the reported peer is (still) in the reporter's grid.
    pub known_peer: bool,
    /// Distinct reporter addresses that complained about it (this kind).
    pub reporters: usize,
    /// Whether this report excluded (demoted) the peer.
    pub excluded: bool,
    /// Peers re-parented away from it (0 unless this report excluded it).
    pub moved: usize,
}

/// Why a bad-peer report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefused {
    /// The reporting session is not in any grid of this process.
    #[error("unknown session")]
    UnknownSession,
    /// A peer reporting itself.
    #[error("a peer cannot report itself")]
    SelfReport,
    /// The session already reported [`MAX_REPORTS_PER_SESSION`] other peers.
    #[error("this session already reported {MAX_REPORTS_PER_SESSION} peers")]
    TooManyReports,
    /// The reported peer is not (and was not recently) one of the session's parents
    /// (NON_DELIVERY) or parents and neighbours (BAD_CHUNK).
    #[error("peer {peer_id} is not one of this session's {role}")]
    NotAssigned {
        /// The reported peer.
        peer_id: PeerId,
        /// "parents" or "parents or neighbours".
        role: &'static str,
    },
}

/// Grid figures of one broadcast, for `GetBroadcast`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GridFigures {
    /// The assigner's statistics.
    pub stats: GridStats,
    /// Bytes from peers / all bytes delivered, from heartbeats (0 when none yet).
    pub peer_share: f64,
}

/// Why a join could not be admitted to the grid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    /// The assigner refused (no capacity, bad config...).
    #[error(transparent)]
    Grid(#[from] GridError),
    /// The broadcast's grid was dropped (stopped) while the join was in flight.
    #[error("the broadcast was stopped")]
    Stopped,
}

/// Why a re-search failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReparentRefused {
    /// The session is not in any grid of this process (unknown, left or expired).
    #[error("unknown session")]
    UnknownSession,
    /// The substream index is not below the broadcast's substream count.
    #[error("substream {substream} out of range: the broadcast has {substreams} substreams")]
    InvalidSubstream {
        /// Requested substream.
        substream: u32,
        /// Substreams of the broadcast.
        substreams: u16,
    },
}

/// Parameters of a join, from the request and the database.
#[derive(Debug, Clone)]
pub struct JoinInput<'a> {
    /// Broadcast joined.
    pub broadcast_id: &'a str,
    /// Its substream count.
    pub substreams: u16,
    /// Data-plane substream slots available (admission limit), `u64::MAX` = unlimited.
    pub server_slots: u64,
    /// The new session's id.
    pub session_id: &'a str,
    /// Where the viewer accepts peer connections (empty = does not relay).
    pub peer_addr: String,
    /// Claimed upload budget (already 0 when `peer_addr` is empty); the grid grants at
    /// most [`TrustConfig::upload_ceiling`] of it until heartbeats confirm more.
    pub upload_kbps: u32,
    /// The caller's IP as this process sees it (distinct reporters are counted by it).
    pub remote_ip: Option<IpAddr>,
    /// Network prefix for the "nearby" preference (see [`addr_prefix`]).
    pub addr_prefix: u32,
    /// The `sub` of the viewer's credential (`None` for public broadcasts), for
    /// revocation by subject.
    pub subject: Option<String>,
    /// Expiry of that credential (unix seconds), to know how long a revocation by
    /// subject must refuse it.
    pub credential_expires_at: Option<u64>,
    /// The viewer checks version-2 parent tickets: its peer id gets
    /// [`crate::tokens::MAC_TICKETS_BIT`].
    pub mac_tickets: bool,
    /// Grant no upload (no children) until [`LiveGrids::probed`] says the viewer's
    /// `peer_addr` is reachable ([`crate::reachability`]).
    pub probe_first: bool,
    /// The viewer's server-reflexive address when its router keeps its listener's port
    /// (`JoinRequest.host_addr`'s port is the port this process observed): it can
    /// reach parents by hole punching, and a parent punches towards this address. With
    /// [`JoinInput::probe_first`], a viewer whose `peer_addr` is unusable or does not
    /// answer becomes a relay reachable by punching at this address
    /// ([`LiveGrids::probed`]).
    pub reflexive: Option<std::net::SocketAddr>,
}

/// A session removed from the grid by expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Session id.
    pub session_id: String,
    /// Its broadcast.
    pub broadcast_id: String,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Peers re-parented because it left.
    pub moved: usize,
}
