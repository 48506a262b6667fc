//! The data-plane-only receive loop of a viewer without a grid assignment: one
//! connection to its node at a time, reorder and fan out, answer pings, pass on token
//! renewals; reconnect with back-off and re-join through the control plane when the
//! error says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_proto::wire::{Frame, StartAt};
use tokio::sync::watch;

use super::config::ViewerConfig;
use crate::conn::{self, OpenParams, WireConn};
use crate::control::{Control, Offer};
use crate::error::{JoinState, Recovery, SdkError};
use crate::reorder::{Output, PushOutcome, ReorderBuffer};
use crate::rights::ChunkCheck;
use crate::shared::{Shared, stopped};

/// The data-plane node this viewer receives from (changes on re-join).
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) wire_addr: String,
}

/// Opens a data-plane connection to `target` and subscribes to `mask` from `start`.
pub(super) async fn open_conn(
    config: &ViewerConfig,
    target: &Target,
    token: &Bytes,
    start: StartAt,
    mask: u64,
) -> Result<WireConn, SdkError> {
    conn::open(OpenParams {
        addr: &target.wire_addr,
        token,
        broadcast_id: &config.broadcast_id,
        start,
        limits: config.limits(),
        timeout: config.connect_timeout,
        role: starling_proto::wire::Role::Viewer,
        mask,
        tickets: &[],
        holder: config.holder.as_deref(),
        verifier: starling_proto::holder::Verifier::DataPlane,
        punch_from: None,
    })
    .await
}

/// How a data-plane session ended.
enum SessionEnd {
    /// The viewer is stopping.
    Stop,
    /// The connection failed or was refused: what next is [`SdkError::recovery`]'s.
    Ended(SdkError),
}

/// The receive loop's state (one task).
pub(super) struct Receiver {
    pub(super) shared: Arc<Shared>,
    pub(super) config: ViewerConfig,
    pub(super) control: Option<Control>,
    pub(super) target: Target,
    pub(super) reorder: ReorderBuffer,
    /// Duration of the last chunk received (for stall durations).
    pub(super) chunk_ms: u64,
}

impl Receiver {
    /// Receives until the viewer stops or an error is fatal; then records why.
    pub(super) async fn run(mut self, first: WireConn) {
        let result = self.run_inner(first).await;
        match &result {
            Ok(()) => tracing::debug!("receiver stopped"),
            Err(e) => tracing::warn!("viewer stopped: {e}"),
        }
        self.shared.finish(result);
        self.shared.hub.close();
        self.shared.stats_mut().connected = false;
    }

    async fn run_inner(&mut self, first: WireConn) -> Result<(), SdkError> {
        let mut stop = self.shared.stop_signal();
        let mut conn = Some(first);
        let mut backoff = self.config.reconnect_initial;
        let mut failures: u32 = 0;
        let mut need_rejoin = false;
        // Whether the last fatal refusal came right after a fresh Join (then a re-join
        // cannot help).
        let mut fresh_join = true;
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => {
                    tokio::select! {
                        _ = stopped(&mut stop) => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.reconnect_max);
                    if need_rejoin {
                        match self.rejoin(&mut stop).await {
                            Ok(true) => {
                                need_rejoin = false;
                                fresh_join = true;
                                failures = 0;
                            }
                            Ok(false) => return Ok(()),
                            Err(e)
                                if e.recovery(self.join_state(fresh_join)) == Recovery::Fatal =>
                            {
                                return Err(e);
                            }
                            // Control plane down: keep trying the node we know.
                            Err(e) => tracing::warn!("re-join failed: {e}"),
                        }
                    }
                    let start = self
                        .reorder
                        .next_expected()
                        .map_or(StartAt::Live, StartAt::Seq);
                    tracing::info!(addr = self.target.wire_addr, ?start, "reconnecting");
                    let token = self.shared.rights.token();
                    let r = tokio::select! {
                        _ = stopped(&mut stop) => return Ok(()),
                        r = open_conn(&self.config, &self.target, &token, start, starling_proto::wire::ALL_SUBSTREAMS) => r,
                    };
                    match r {
                        Ok(c) => {
                            self.shared.stats_mut().reconnects += 1;
                            c
                        }
                        Err(e) => {
                            failures += 1;
                            tracing::warn!(failures, "reconnect failed: {e}");
                            if let Some(err) = self.classify(e, &mut need_rejoin, fresh_join) {
                                return Err(err);
                            }
                            if self.control.is_some()
                                && failures >= self.config.rejoin_after_failures.max(1)
                            {
                                need_rejoin = true;
                            }
                            continue;
                        }
                    }
                }
            };
            let before = self.shared.stats_mut().chunks_received;
            match self.serve(c, &mut stop).await {
                SessionEnd::Stop => return Ok(()),
                SessionEnd::Ended(e) if self.made_progress(before) => {
                    // The session worked for a while: start over with a short delay.
                    failures = 0;
                    fresh_join = false;
                    backoff = self.config.reconnect_initial;
                    tracing::info!("data-plane session ended: {e}");
                    if let Some(err) = self.classify(e, &mut need_rejoin, false) {
                        return Err(err);
                    }
                }
                SessionEnd::Ended(e) => {
                    failures += 1;
                    tracing::warn!("data-plane session ended: {e}");
                    if let Some(err) = self.classify(e, &mut need_rejoin, fresh_join) {
                        return Err(err);
                    }
                }
            }
        }
    }

    fn made_progress(&self, chunks_before: u64) -> bool {
        self.shared.stats_mut().chunks_received > chunks_before
    }

    /// What the last `Join` has shown (see [`JoinState`]).
    fn join_state(&self, fresh_join: bool) -> JoinState {
        match (&self.control, fresh_join) {
            (None, _) => JoinState::NoControlPlane,
            (Some(_), true) => JoinState::Fresh,
            (Some(_), false) => JoinState::Delivered,
        }
    }

    /// Applies [`SdkError::recovery`]: `Some(err)` = stop with it; otherwise retry,
    /// after a re-join if `need_rejoin` is set.
    fn classify(&self, e: SdkError, need_rejoin: &mut bool, fresh_join: bool) -> Option<SdkError> {
        match e.recovery(self.join_state(fresh_join)) {
            Recovery::Fatal => Some(e.into_final()),
            Recovery::Rejoin => {
                *need_rejoin = true;
                None
            }
            Recovery::Reconnect => None,
        }
    }

    /// Calls `Join` again. `Ok(false)` = the viewer is stopping.
    async fn rejoin(
        &mut self,
        stop: &mut watch::Receiver<Option<Result<(), SdkError>>>,
    ) -> Result<bool, SdkError> {
        let Some(control) = self.control.clone() else {
            return Ok(true);
        };
        let offer = Offer::default();
        let join = tokio::select! {
            _ = stopped(stop) => return Ok(false),
            r = control.join(&offer) => r?,
        };
        crate::rejoin::adopt(&self.shared, &control, &join);
        if let Some(p) = &join.params {
            self.shared.hub.set_content_type(&p.content_type);
        }
        self.target = Target {
            wire_addr: join.wire_addr,
        };
        Ok(true)
    }

    async fn serve(
        &mut self,
        mut conn: WireConn,
        stop: &mut watch::Receiver<Option<Result<(), SdkError>>>,
    ) -> SessionEnd {
        tracing::debug!(addr = conn.addr, info = ?conn.info, "subscribed");
        self.shared.hub.set_content_type(&conn.info.content_type);
        {
            let mut s = self.shared.stats_mut();
            s.connected = true;
            s.live_seq = Some(conn.info.live_seq);
        }
        if let Some(next) = self.reorder.next_expected()
            && conn.info.first_seq > next
        {
            // The server cannot resume where we are: it starts later.
            self.reorder.skip_before(conn.info.first_seq);
            self.flush();
        }
        let mut token = self.shared.rights.watch_token();
        token.mark_unchanged();
        let end = loop {
            let deadline = self.reorder.deadline();
            let frame = tokio::select! {
                _ = stopped(stop) => {
                    conn.close().await;
                    return SessionEnd::Stop;
                }
                r = token.changed() => {
                    if r.is_ok() {
                        let t = token.borrow_and_update().token.clone();
                        if !t.is_empty()
                            && let Err(e) = conn.send(&Frame::Token(t)).await
                        {
                            break SessionEnd::Ended(e);
                        }
                    }
                    continue;
                }
                _ = sleep_until_opt(deadline) => {
                    self.reorder.handle_timeout(Instant::now());
                    self.flush();
                    continue;
                }
                r = tokio::time::timeout(self.config.idle_timeout, conn.next_frame()) => match r {
                    Ok(Ok(f)) => f,
                    Ok(Err(e)) => break SessionEnd::Ended(e),
                    Err(_) => break SessionEnd::Ended(SdkError::Timeout("waiting for data")),
                },
            };
            match frame {
                Frame::Chunk(mut c) => {
                    let len = c.payload.len() as u64;
                    {
                        let mut s = self.shared.stats_mut();
                        s.chunks_received += 1;
                        s.bytes_received += len;
                        s.bytes_from_server += len;
                    }
                    match self.shared.check_chunk(&c) {
                        ChunkCheck::Verified { flags } => {
                            // Keep the per-receiver DISCONTINUITY hint for the reorder
                            // buffer; the stored flags are the signed ones otherwise.
                            c.flags = flags
                                | (c.flags & starling_proto::wire::chunk_flags::DISCONTINUITY);
                        }
                        ChunkCheck::Unverified => {}
                        ChunkCheck::Excused(_) => continue,
                        ChunkCheck::Bad(e) => {
                            tracing::warn!(
                                seq = c.seq,
                                "data plane sent a bad chunk (dropped): {e}"
                            );
                            self.shared.stats_mut().bad_chunks_from_server += 1;
                            continue;
                        }
                    }
                    if c.duration_ms > 0 {
                        self.chunk_ms = u64::from(c.duration_ms);
                    }
                    let outcome = self.reorder.push(c, Instant::now());
                    if outcome != PushOutcome::Accepted {
                        self.shared.stats_mut().duplicates += 1;
                    }
                    self.flush();
                }
                // We are the client on this link: a TOKEN, TICKET or RELAYING from the
                // server means nothing.
                Frame::Token(_) | Frame::Ticket(_) | Frame::Relaying(_) => {}
                Frame::Ping(n) => {
                    if let Err(e) = conn.send(&Frame::Pong(n)).await {
                        break SessionEnd::Ended(e);
                    }
                }
                // Peer-grid frames are not used on the data-plane session yet.
                Frame::Pong(_) | Frame::BufferMap(_) | Frame::Request(_) | Frame::NotFound(_) => {}
                Frame::StreamInfo(info) => {
                    self.shared.hub.set_content_type(&info.content_type);
                    self.shared.stats_mut().live_seq = Some(info.live_seq);
                }
                Frame::Error(r) => {
                    break SessionEnd::Ended(SdkError::Server {
                        code: r.code,
                        message: r.message,
                    });
                }
                Frame::Goodbye(r) => break SessionEnd::Ended(SdkError::goodbye(r)),
                Frame::Hello(_) | Frame::HelloAck(_) | Frame::Subscribe(_) | Frame::Proof(_) => {
                    break SessionEnd::Ended(SdkError::Protocol(
                        "unexpected handshake frame mid-stream".into(),
                    ));
                }
            }
        };
        self.shared.stats_mut().connected = false;
        end
    }

    /// Moves everything the reorder buffer has ready to the consumers.
    fn flush(&mut self) {
        while let Some(out) = self.reorder.pop() {
            match out {
                Output::Chunk(c) => {
                    self.shared.played(&c);
                    {
                        let mut s = self.shared.stats_mut();
                        if s.live_seq.is_none_or(|l| l < c.seq) {
                            s.live_seq = Some(c.seq);
                        }
                    }
                    self.shared.hub.publish(c);
                }
                Output::Discontinuity {
                    expected,
                    resumed_at,
                    reason,
                } => {
                    tracing::info!(expected, resumed_at, ?reason, "discontinuity");
                    let skipped = resumed_at.saturating_sub(expected);
                    let mut s = self.shared.stats_mut();
                    s.discontinuities += 1;
                    s.chunks_skipped += skipped;
                    // A gap in the output is a stall of the skipped chunks' duration.
                    if skipped > 0 {
                        s.stalls += 1;
                        s.stall_time +=
                            Duration::from_millis(skipped.saturating_mul(self.chunk_ms));
                    }
                    drop(s);
                    self.shared.hub.discontinuity();
                }
            }
        }
        let waiting = self.reorder.pending_len() as u64;
        self.shared.stats_mut().buffer = Duration::from_millis(waiting * self.chunk_ms);
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
