//! Upload: sending a held chunk the grid core allowed ([`starling_grid::peer::Peer`]
//! paces pushes and serves to the budget), and lowering the budget (and child slots)
//! to what the uplink drains.

use std::sync::atomic::Ordering;

use starling_proto::wire::{self, ErrorCode, Frame};

use super::link::{LinkId, Out, QueueError, reason};
use super::{Engine, Kind};
use crate::error::SdkError;

impl Engine {
    /// Sends a held chunk to a child (push) or a requester (serve).
    pub(super) fn upload(&mut self, to: LinkId, seq: u64, push: bool) {
        let Some(c) = self.store.get(&seq).cloned() else {
            // Cannot happen (the grid core sends only held chunks).
            return;
        };
        // The budget is spent in the bytes sent: the chunk's frame with its signature.
        let payload_len = c.payload.len() as u64;
        let len = wire::chunk_frame_len(c.signature.len(), c.payload.len()) as u64;
        let Some(link) = self.links.get(&to) else {
            return;
        };
        let Some(h) = &link.handle else {
            return;
        };
        match h.send(Out::Chunk(c)) {
            Ok(()) => {
                self.peer.on_uploaded(len);
                let mut st = self.shared.stats_mut();
                st.bytes_uploaded += payload_len;
                st.wire_bytes_uploaded += len;
            }
            Err(QueueError::Full) if push => {
                tracing::info!(to, "child too slow: closing its link");
                self.drop_link(
                    to,
                    Some(Frame::Goodbye(reason(ErrorCode::TooSlow, "child too slow"))),
                    None,
                );
            }
            Err(QueueError::Full) => {}
            Err(QueueError::Closed) => {
                self.drop_link(to, None, Some(SdkError::Closed));
            }
        }
    }

    /// Feeds the upload estimator: drained relay bytes, and whether every child link
    /// has data queued now (the uplink, not one child, is then what limits us).
    pub(super) fn sample_upload(&mut self) {
        let mut children = 0usize;
        let mut all_queued = true;
        for l in self.links.values() {
            if l.kind == Kind::In && l.mask != 0 {
                children += 1;
                if l.handle.as_ref().is_none_or(|h| h.queued() == 0) {
                    all_queued = false;
                }
            }
        }
        let now = self.epoch.elapsed();
        let drained = self.drained.load(Ordering::Relaxed);
        let Some(est) = self.estimator.as_mut() else {
            return;
        };
        let lowered = est.sample(now, drained, children > 0 && all_queued);
        let estimate = est.estimate_kbps();
        self.shared.stats_mut().upload_estimate_kbps = estimate;
        if let Some(kbps) = lowered {
            self.lower_budget(kbps, estimate);
        }
    }

    /// The uplink drains less than the budget: pace to the new budget, offer it on a
    /// re-join, and close the children beyond the slots it buys (newest first) with
    /// `GOODBYE(SERVER_BUSY)`, so they re-search a parent.
    pub(super) fn lower_budget(&mut self, kbps: u32, estimate: Option<u32>) {
        let (old_kbps, old_slots) = (self.peer.slots().budget_kbps(), self.peer.slots().slots());
        let slots = self.peer.lower_budget(kbps);
        tracing::info!(
            old_kbps,
            kbps,
            ?estimate,
            old_slots,
            slots,
            "uplink drains less than the relay budget: budget lowered"
        );
        self.offer.upload_kbps = kbps;
        self.shared.stats_mut().upload_budget_kbps = kbps;
        if !self.peer.slots().over() {
            return;
        }
        let mut children: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.kind == Kind::In && l.mask != 0)
            .map(|(&id, _)| id)
            .collect();
        children.sort_unstable_by(|a, b| b.cmp(a));
        for l in children {
            if !self.peer.slots().over() {
                break;
            }
            tracing::info!(l, peer = ?self.peer_id_of(l), "closing a child: upload budget lowered");
            self.drop_link(
                l,
                Some(Frame::Goodbye(reason(
                    ErrorCode::ServerBusy,
                    "upload budget lowered",
                ))),
                None,
            );
        }
        self.count_links();
    }
}
