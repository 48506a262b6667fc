//! The data-plane link: its subscription mask, reconnection with back-off, and the
//! re-`Join` after repeated failures.

use starling_proto::wire::{self, ErrorCode, Frame, Role, StreamInfo};

use super::link::{self, LinkId, reason};
use super::{Engine, Ev, Feed, Kind, Link};
use crate::control::JoinInfo;
use crate::error::{JoinState, Recovery, SdkError};

impl Engine {
    pub(super) fn dp_mask(&self) -> u64 {
        let mut m = 0u64;
        for (s, f) in self.feeds.iter().enumerate() {
            if *f == Feed::Server {
                m |= 1u64 << s;
            }
        }
        if m == self.all_mask() {
            wire::ALL_SUBSTREAMS
        } else {
            m
        }
    }

    pub(super) fn dial_dp(&mut self) {
        if self.dp.is_some() {
            return;
        }
        if self.dp_failures >= self.rejoin_after_failures && !self.rejoining {
            self.rejoin();
            return;
        }
        let id = self.new_id();
        let mask = self.dp_mask();
        self.links.insert(id, Link::new(Kind::DataPlane, mask));
        self.dp = Some(id);
        let addr = self.dp_addr.clone();
        tracing::info!(addr, "reconnecting to the data plane");
        let d = self.dial_params(&addr, Role::Viewer, mask, self.resume_at());
        tokio::spawn(link::dial(id, d, self.events.clone(), self.shared.clone()));
    }

    pub(super) fn schedule_dp_retry(&mut self) {
        self.dp_retry_at = Some(tokio::time::Instant::now() + self.dp_backoff);
        self.dp_backoff = (self.dp_backoff * 2).min(self.reconnect_max);
    }

    pub(super) fn on_dp_info(&mut self, info: &StreamInfo) {
        if !info.content_type.is_empty() {
            self.content_type.clone_from(&info.content_type);
            self.shared.hub.set_content_type(&info.content_type);
        }
        if info.substreams != 0 && info.substreams != self.k {
            tracing::warn!(
                data_plane = info.substreams,
                control_plane = self.k,
                "substream counts differ"
            );
        }
        let mut s = self.shared.stats_mut();
        s.connected = true;
        s.live_seq = Some(s.live_seq.map_or(info.live_seq, |l| l.max(info.live_seq)));
    }

    pub(super) fn rejoin(&mut self) {
        self.rejoining = true;
        let control = self.control.clone();
        let offer = self.offer.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let r = control.join(&offer).await;
            let _ = events.send(Ev::Rejoined(r)).await;
        });
    }

    pub(super) fn on_rejoined(&mut self, r: Result<JoinInfo, SdkError>) {
        self.rejoining = false;
        self.dp_failures = 0;
        match r {
            Ok(join) => {
                crate::rejoin::adopt(&self.shared, &self.control, &join);
                self.session_id = join.session_id;
                if join.peer_id != self.me {
                    // A new identity: links dialled with the old token are closed (our
                    // parents would refuse a TOKEN for another peer id); the new
                    // assignment below opens what it needs.
                    let outs: Vec<LinkId> = self
                        .links
                        .iter()
                        .filter(|(_, l)| matches!(l.kind, Kind::Out(_)))
                        .map(|(&id, _)| id)
                        .collect();
                    for l in outs {
                        self.drop_link(
                            l,
                            Some(Frame::Goodbye(reason(ErrorCode::Normal, "re-joined"))),
                            None,
                        );
                    }
                }
                self.me = join.peer_id;
                self.peer.rejoined(join.peer_id, join.child_slots);
                self.book.clear();
                self.dp_addr = join.wire_addr;
                self.fresh_join = true;
                self.shared.stats_mut().peer_id = Some(join.peer_id);
                self.apply_assignment(join.assignment, false);
            }
            Err(e) if e.recovery(JoinState::Fresh) == Recovery::Fatal => {
                self.shared.finish(Err(e));
                return;
            }
            Err(e) => tracing::warn!("re-join failed: {e}"),
        }
        self.schedule_dp_retry();
    }

    /// What follows a lost data-plane link: the SDK's one classification
    /// ([`SdkError::recovery`]) decides between stopping, re-joining and reconnecting.
    pub(super) fn on_dp_error(&mut self, e: SdkError) {
        let join = if self.fresh_join {
            JoinState::Fresh
        } else {
            JoinState::Delivered
        };
        let recovery = e.recovery(join);
        if recovery == Recovery::Fatal {
            tracing::warn!("data-plane link: stopping: {e}");
            self.shared.finish(Err(e.into_final()));
            return;
        }
        tracing::warn!("data-plane link lost: {e}");
        self.dp_failures += 1;
        if recovery == Recovery::Rejoin {
            // The node lost the broadcast or the token expired: a fresh Join can fix it.
            self.dp_failures = self.dp_failures.max(self.rejoin_after_failures);
        }
        self.schedule_dp_retry();
    }
}
