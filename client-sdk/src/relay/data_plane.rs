//! The data-plane link: its subscription mask, reconnection with back-off, and the
//! re-`Join` after repeated failures.

use std::time::Duration;

use starling_proto::wire::{self, ErrorCode, Frame, Role, StreamInfo};

use super::link::{self, LinkId, reason};
use super::{Engine, Ev, Feed, Kind, Link};
use crate::control::JoinInfo;
use crate::error::{SdkError, is_fatal_code};
use crate::rights::OwnToken;

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
                tracing::info!(
                    addr = join.wire_addr,
                    session = join.session_id,
                    "re-joined via the control plane"
                );
                let old = self
                    .shared
                    .replace_session(join.session_id.clone(), join.heartbeat);
                if let Some(old) = old.filter(|o| o.id != join.session_id) {
                    let c = self.control.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(3), c.leave(&old.id)).await;
                    });
                }
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
                self.shared.rights.rejoined(
                    OwnToken {
                        token: join.token,
                        expires_at_ms: join.token_expires_at_ms,
                    },
                    &join.token_keys,
                    &join.chunk_keys,
                );
                self.fresh_join = true;
                {
                    let mut s = self.shared.stats_mut();
                    s.rejoins += 1;
                    s.peer_id = Some(join.peer_id);
                }
                self.apply_assignment(join.assignment, false);
            }
            Err(e) if e.is_fatal() => {
                self.shared.finish(Err(e));
                return;
            }
            Err(e) => tracing::warn!("re-join failed: {e}"),
        }
        self.schedule_dp_retry();
    }

    pub(super) fn on_dp_error(&mut self, e: SdkError) {
        let fatal = match &e {
            SdkError::BroadcastEnded(_) => {
                self.shared.finish(Err(e));
                return;
            }
            SdkError::Server { code, .. } if *code == ErrorCode::BroadcastStopped => {
                self.shared
                    .finish(Err(SdkError::BroadcastEnded(e.to_string())));
                return;
            }
            SdkError::Server { code, .. } if *code == ErrorCode::Revoked => {
                tracing::warn!("the data plane says this viewer is revoked: {e}");
                self.shared.finish(Err(e));
                return;
            }
            SdkError::Server { code, .. }
                if matches!(code, ErrorCode::Unauthorized | ErrorCode::TokenExpired)
                    && self.fresh_join =>
            {
                // Refused right after a fresh Join: another Join will not help.
                tracing::warn!("the data plane refuses our fresh token: {e}");
                self.shared.finish(Err(e));
                return;
            }
            SdkError::Server { code, .. } => {
                is_fatal_code(*code) || *code == ErrorCode::ShuttingDown
            }
            _ => false,
        };
        tracing::warn!("data-plane link lost: {e}");
        self.dp_failures += 1;
        if fatal {
            // The node lost the broadcast or the token expired: a fresh Join can fix it.
            self.dp_failures = self.dp_failures.max(self.rejoin_after_failures);
        }
        self.schedule_dp_retry();
    }
}
