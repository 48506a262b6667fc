//! The engine's loop: waits for link events, control-plane answers, renewed tokens,
//! key refreshes and the next timeout, hands them to the handlers, and executes the
//! scheduler's actions (pushes, answers, requests, buffer maps, play-out).

use std::time::{Duration, Instant};

use starling_grid::peer::PeerAction;
use starling_proto::wire::{ErrorCode, Frame};
use tokio::sync::mpsc;

use super::convert::from_buffer_map;
use super::link::{LinkId, QueueError, reason};
use super::{Engine, Ev, HOUSEKEEPING_EVERY, Kind, MAX_UNREACHABLE, feed_source};
use crate::error::SdkError;
use crate::shared::stopped;

impl Engine {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Ev>) {
        let mut stop = self.shared.stop_signal();
        // The scheduler says when it must tick next (play-out deadlines, repairs,
        // parent checks, maps): a steady peer wakes about once per chunk instead of a
        // fixed ticker's four times (the tick was most of an idle peer's CPU). The
        // engine's own housekeeping (grant expiry, buffer gauge) runs at least every
        // `HOUSEKEEPING_EVERY`; the upload estimator, when on, samples every chunk / 4.
        let housekeeping = if self.estimator.is_some() {
            self.peer.tick_interval()
        } else {
            HOUSEKEEPING_EVERY
        };
        let mut next_housekeeping = Instant::now() + housekeeping;
        let wake = tokio::time::sleep_until(next_housekeeping.into());
        tokio::pin!(wake);
        let mut armed = next_housekeeping;
        // Never two ticks within a millisecond, whatever the scheduler asks.
        let mut not_before = Instant::now();
        let mut token = self.shared.rights.watch_token();
        token.mark_unchanged();
        let mut refreshed = self.shared.rights.watch_key_refreshes();
        refreshed.mark_unchanged();
        loop {
            // Re-armed only when the target moves by a millisecond or more (the timer's
            // resolution): the play-out clock's conversion differs by nanoseconds from
            // one event to the next, and each reset costs a timer-wheel removal and
            // insert.
            let target = self.wake_at(next_housekeeping).max(not_before);
            if target.max(armed) - target.min(armed) >= Duration::from_millis(1) {
                wake.as_mut().reset(target.into());
                armed = target;
            }
            let retry = self.dp_retry_at;
            tokio::select! {
                _ = stopped(&mut stop) => break,
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                () = &mut wake => {
                    let now = self.now();
                    self.peer.handle_timeout(now);
                    self.on_tick();
                    let t = Instant::now();
                    next_housekeeping = t + housekeeping;
                    not_before = t + Duration::from_millis(1);
                }
                r = token.changed() => {
                    if r.is_ok() {
                        let t = token.borrow_and_update().clone();
                        self.send_token(t);
                    }
                }
                r = refreshed.changed() => {
                    if r.is_ok() {
                        let done = *refreshed.borrow_and_update();
                        self.on_keys_refreshed(done);
                    }
                }
                _ = sleep_until_opt(retry) => {
                    self.dp_retry_at = None;
                    self.dial_dp();
                }
            }
            self.drain_actions();
            if self.shared.is_finished() {
                break;
            }
        }
        for (_, l) in self.links.drain() {
            if let Some(h) = l.handle {
                h.close(Frame::Goodbye(reason(ErrorCode::Normal, "viewer leaving")));
            }
        }
        self.shared.hub.close();
        self.shared.stats_mut().connected = false;
    }

    /// When the engine must wake next: the scheduler's next timeout (on the play-out
    /// clock, converted to an instant), or the housekeeping time if earlier.
    pub(super) fn wake_at(&mut self, housekeeping: Instant) -> Instant {
        let now = self.now();
        match self.peer.next_timeout(now) {
            Some(t) => (self.epoch + t).min(housekeeping),
            None => housekeeping,
        }
    }

    pub(super) fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Frame { link, frame } => self.on_frame(link, frame),
            Ev::LinkDown { link, reason } => {
                if self.links.contains_key(&link) {
                    tracing::debug!(link, "grid link down: {reason}");
                    self.drop_link(link, None, Some(reason));
                }
            }
            Ev::Connected {
                link,
                handle,
                info,
                version,
            } => self.on_connected(link, handle, info, version),
            Ev::ConnectFailed { link, err } => {
                if let Some(l) = self.links.get(&link) {
                    tracing::info!(link, "grid dial failed: {err}");
                    if let Kind::Out(peer) = &l.kind
                        && matches!(err, SdkError::Connect { .. } | SdkError::Timeout(_))
                        && !self.unreachable.contains(&peer.id)
                    {
                        if self.unreachable.len() >= MAX_UNREACHABLE {
                            self.unreachable.remove(0);
                        }
                        self.unreachable.push(peer.id);
                    }
                    self.drop_link(link, None, Some(err));
                }
            }
            Ev::Incoming {
                link,
                sub,
                handle,
                addr,
                grant,
                tickets,
            } => self.on_incoming(link, sub, handle, addr, grant, tickets),
            Ev::BadChunk {
                link,
                seq,
                len,
                error,
            } => self.on_bad_chunk(link, seq, len, error),
            Ev::UnknownKey { link, chunk } => self.on_unknown_key(link, chunk),
            Ev::Revoked(ids) => self.on_revoked(&ids),
            Ev::Assignment(a) => self.apply_assignment(a, false),
            Ev::Reparented {
                substream,
                excluded,
                result,
                ticket,
            } => {
                if let Some(t) = ticket {
                    self.book.set(t);
                }
                self.on_reparented(substream, excluded, result)
            }
            Ev::Rejoined(r) => self.on_rejoined(r),
            Ev::ChildSlots(n) => {
                tracing::debug!(
                    child_slots = n,
                    "child slots re-counted by the control plane"
                );
                self.peer.set_child_slots(n);
            }
        }
    }

    /// Periodic work besides the scheduler's tick: the play-out buffer level, and the
    /// expiry of the tokens of peers connected to us.
    pub(super) fn on_tick(&mut self) {
        let buffered = self
            .peer
            .play_next()
            .map_or(0, |p| self.store.range(p..).count() as u64);
        self.shared.stats_mut().buffer = Duration::from_millis(buffered * u64::from(self.chunk_ms));
        if self.estimator.is_some() {
            self.sample_upload();
        }
        let now = Instant::now();
        if now < self.next_grant_check {
            return;
        }
        self.check_grants(now);
    }

    pub(super) fn drain_actions(&mut self) {
        while let Some(a) = self.peer.poll_action() {
            self.execute(a);
        }
    }

    pub(super) fn execute(&mut self, a: PeerAction) {
        match a {
            PeerAction::Send { to, seq, push } => self.upload(to, seq, push),
            // A chunk not held, a serve over the budget, or a push skipped over the
            // budget (announced, so that the child repairs it at once and does not
            // take this parent for a silent one; a partly covered slot, see
            // `starling_grid::slots_for`, is carried this way).
            PeerAction::NotFound { to, seq } => self.send_to(to, &Frame::NotFound(seq)),
            PeerAction::Request { neighbour, seq } => {
                if let Some(link) = self.links.get_mut(&neighbour) {
                    if link.requested.len() >= 4096 {
                        link.requested.pop_first();
                    }
                    link.requested.insert(seq);
                }
                self.send_to(neighbour, &Frame::Request(seq));
            }
            PeerAction::RequestFromServer { seq } => {
                if let Some(dp) = self.dp {
                    self.send_to(dp, &Frame::Request(seq));
                }
            }
            PeerAction::SendBufferMap { to, map } => {
                if let Some(f) = from_buffer_map(&map) {
                    self.send_to(to, &Frame::BufferMap(f));
                }
            }
            PeerAction::ReSearch { substream, exclude } => {
                tracing::info!(substream, ?exclude, "parent late or silent: re-searching");
                if let Some(from) = self.feeds.get(usize::from(substream)).and_then(feed_source) {
                    self.start_reparent_timer(substream, from);
                }
                self.research(substream, exclude.into_iter().collect());
            }
            PeerAction::ReportParent {
                substream,
                parent,
                missed,
                window,
            } => self.report_non_delivery(substream, parent, missed, window),
            PeerAction::Play { seq } => self.play(seq),
            PeerAction::Skip { seq } => {
                tracing::debug!(seq, "chunk missed its play-out deadline");
                let mut st = self.shared.stats_mut();
                st.chunks_skipped += 1;
                // The output starves for this chunk's duration; a run of skips is one
                // stall.
                st.stall_time += Duration::from_millis(u64::from(self.chunk_ms));
                if !self.skipping {
                    st.stalls += 1;
                    st.discontinuities += 1;
                    drop(st);
                    self.shared.hub.discontinuity();
                }
                self.skipping = true;
            }
            PeerAction::Relaying { substreams } => self.tell_relaying(substreams),
        }
    }

    pub(super) fn play(&mut self, seq: u64) {
        let Some(c) = self.store.get(&seq).cloned() else {
            // Cannot happen (played chunks are held); count it as a skip.
            self.execute(PeerAction::Skip { seq });
            return;
        };
        self.skipping = false;
        self.shared.played(&c);
        self.shared.hub.publish(c);
    }

    pub(super) fn send_to(&mut self, to: LinkId, f: &Frame) {
        let Some(link) = self.links.get(&to) else {
            return;
        };
        let Some(h) = &link.handle else {
            return;
        };
        if let Err(QueueError::Closed) = h.send_frame(f) {
            self.drop_link(to, None, Some(SdkError::Closed));
        }
    }
}

pub(super) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
