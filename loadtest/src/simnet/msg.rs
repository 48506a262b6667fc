//! The fabric's messages and setup: what its nodes ask of the servers ([`Up`]), what
//! it is told ([`Input`]), the chunks it carries ([`SimChunk`]) and its configuration.

use std::sync::Arc;

use bytes::Bytes;
use starling_grid::Parent;
use starling_grid::peer::PeerId;
use tokio::sync::oneshot;

use super::SimNetConfig;
use super::reports::ViewerFigures;
use super::stats::Snapshot;
use crate::pattern::Pattern;
use crate::swarm::UploadProfile;

/// One chunk: its sequence number and payload, shared by every holder.
#[derive(Debug)]
pub struct SimChunk {
    /// Sequence number.
    pub seq: u64,
    /// When it was cut, ms: unix ms for the data plane's chunks, fabric ms for the
    /// in-process server's.
    pub cut_ms: u64,
    /// Payload (shared, never copied per hop).
    pub payload: Bytes,
}

/// What a node asks of the servers (the control plane, or the data plane under
/// [`ServerMode::Wire`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Up {
    /// Join with this relay budget.
    Join {
        /// Local peer index.
        index: usize,
        /// Relay budget, kbit/s.
        upload_kbps: u32,
    },
    /// A new parent for `substream`, not one of `exclude`.
    ReSearch {
        /// Local peer index.
        index: usize,
        /// The substream.
        substream: u16,
        /// Parents not to give again.
        exclude: Vec<PeerId>,
    },
    /// `parent` did not deliver.
    Report {
        /// Local peer index.
        index: usize,
        /// The parent reported.
        parent: PeerId,
    },
    /// The viewer leaves.
    Leave {
        /// Local peer index.
        index: usize,
    },
    /// The substreams the data plane must push to this viewer now (wire server).
    Subscribe {
        /// Local peer index.
        index: usize,
        /// Substream mask.
        mask: u64,
        /// Where the pushes resume, as the SDK's engine does: after the newest chunk
        /// held, else at the next chunk to play (`None`: the live edge).
        resume: Option<u64>,
    },
    /// A last-resort request to the data plane (wire server).
    ServerRequest {
        /// Local peer index.
        index: usize,
        /// The chunk.
        seq: u64,
    },
}

/// What the fabric is told.
#[derive(Debug)]
pub enum Input {
    /// A join's answer.
    Joined {
        /// Local peer index.
        index: usize,
        /// Its id in the grid.
        peer_id: PeerId,
        /// Child slots the control plane gave it.
        child_slots: u32,
        /// One parent per substream.
        parents: Vec<Parent>,
        /// Mesh neighbours.
        neighbours: Vec<PeerId>,
        /// The join call's duration, ms.
        rpc_ms: Option<u64>,
        /// Where its session reads its figures (`None`: no session).
        bytes: Option<Arc<ViewerFigures>>,
    },
    /// A re-search went unanswered (the node may ask again).
    ResearchFailed {
        /// Local peer index.
        index: usize,
        /// The substream.
        substream: u16,
    },
    /// A join failed for good, or the session ended.
    Failed {
        /// Local peer index.
        index: usize,
        /// Why.
        error: String,
    },
    /// A new parent for one substream (someone else's operation, or this viewer's
    /// re-search when `research`).
    Assign {
        /// Local peer index.
        index: usize,
        /// The substream.
        substream: u16,
        /// The parent.
        parent: Parent,
        /// The answer to this viewer's own re-search.
        research: bool,
    },
    /// Peers the control plane revoked: the viewer closes its links to them (as the
    /// SDK does; the control plane moves its substreams elsewhere).
    Revoked {
        /// Local peer index.
        index: usize,
        /// The revoked peers.
        peers: Vec<PeerId>,
    },
    /// A new mesh neighbour.
    Neighbour {
        /// Local peer index.
        index: usize,
        /// The neighbour.
        neighbour: PeerId,
    },
    /// A chunk from the data plane for one viewer (wire server), signature checked.
    ServerChunk {
        /// Local peer index.
        index: usize,
        /// The chunk.
        chunk: Arc<SimChunk>,
    },
    /// The data plane's `NOT_FOUND` for one viewer's request (wire server).
    ServerNotFound {
        /// Local peer index.
        index: usize,
        /// The chunk.
        seq: u64,
    },
    /// When the data plane's chunk 0 was due (unix ms; chunk `seq` is due at
    /// `(seq + 1)·d` after it). Under [`ServerMode::Wire`] the fabric holds every
    /// viewer's join answer until it knows this, so that its nodes' clocks are the
    /// stream's.
    Origin {
        /// Unix ms.
        unix_ms: u64,
    },
    /// `count` more viewers join.
    Add {
        /// How many.
        count: usize,
    },
    /// `count` active viewers (chosen at random) leave.
    Leave {
        /// How many.
        count: usize,
    },
    /// The figures now (every viewer's record when `records`).
    Snapshot {
        /// With per-viewer records.
        records: bool,
        /// Where to answer.
        reply: oneshot::Sender<Snapshot>,
    },
    /// Every viewer leaves; the task ends.
    Stop,
}

/// Who plays the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMode {
    /// The fabric cuts the source's chunks itself (the pattern's bytes) at the stream
    /// rate, pushes them to subscribers and answers requests after
    /// [`SimNetConfig::server_latency`].
    InProcess,
    /// A real data plane: subscriptions and requests leave as [`Up`], chunks come in as
    /// [`Input::ServerChunk`].
    Wire,
}

/// A fabric's setup.
#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// The network.
    pub net: SimNetConfig,
    /// Upload budgets as multiples of the stream rate.
    pub upload: UploadProfile,
    /// Added to local indices for upload budgets and records.
    pub index_offset: usize,
    /// The source's pattern: every played byte is checked against it (`None`: no
    /// check; the in-process server then cuts zeros).
    pub pattern: Option<Pattern>,
    /// Who plays the data plane.
    pub server: ServerMode,
}
