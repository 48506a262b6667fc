//! Bad-chunk bans: a peer whose chunk fails verification is disconnected, reported
//! and never used again as a parent or neighbour.

use starling_proto::integrity::IntegrityError;
use starling_proto::v1::PeerReportKind;
use starling_proto::wire::{ErrorCode, Frame};

use super::link::{LinkId, reason};
use super::{Engine, Kind};
use crate::error::SdkError;

impl Engine {
    /// A chunk failed verification. From the data plane: dropped, logged and counted.
    /// From a peer: dropped, the link closed with `ERROR(BAD_CHUNK)`, the peer reported
    /// and excluded (re-parenting away from it); the chunk stays missing, so the
    /// scheduler fetches it elsewhere.
    pub(super) fn on_bad_chunk(&mut self, l: LinkId, seq: u64, len: u64, error: IntegrityError) {
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        link.requested.remove(&seq);
        {
            let mut st = self.shared.stats_mut();
            st.chunks_received += 1;
            st.bytes_received += len;
            if link.kind == Kind::DataPlane {
                st.bytes_from_server += len;
                st.bad_chunks_from_server += 1;
            } else {
                st.bytes_from_peers += len;
                st.bad_chunks_from_peers += 1;
            }
        }
        if link.kind == Kind::DataPlane {
            tracing::warn!(
                seq,
                "the data plane sent a chunk that fails its check (dropped): {error}"
            );
            // If it was a last-resort request, it is retried after the request timeout.
            return;
        }
        let peer = self.peer_id_of(l);
        tracing::warn!(
            l,
            seq,
            ?peer,
            "peer sent a bad chunk: {error}; disconnecting and reporting it"
        );
        // A request in flight to that link is free to go elsewhere now.
        let now = self.now();
        self.peer.handle_not_found(l, seq, now);
        if let Some(id) = peer {
            self.peer.ban(id);
            self.neighbours.retain(|n| n.id != id);
            self.shared.stats_mut().peers_reported += 1;
            self.spawn_report(
                id,
                PeerReportKind::BadChunk,
                format!("chunk {seq}: {error}"),
            );
        }
        // As a lost link: a parent's substreams are re-searched excluding it.
        self.drop_link(
            l,
            Some(Frame::Error(reason(
                ErrorCode::BadChunk,
                &format!("chunk {seq} failed its integrity check"),
            ))),
            Some(SdkError::Protocol(format!("bad chunk {seq}: {error}"))),
        );
        self.reconcile();
        self.count_links();
    }
}
