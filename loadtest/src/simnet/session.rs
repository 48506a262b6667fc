//! One simulated viewer's control-plane session, the one task it has (as the SDK's
//! control-plane client rules, `client-sdk`'s `viewer::session` and `report`, are
//! mirrored here; the SDK spreads them over two tasks):
//!
//! * `Join` (with the server's retry pushback), then its real data-plane connection
//!   ([`super::dataplane`]) and its node in the fabric;
//! * the `ViewerService.Session` stream: the first `SessionUp` names the key-set version
//!   held (0 at first: the key sets come with the first answer), counters every
//!   `counters_interval_ms`; a stream that breaks (an error, or an end without
//!   `active = false`) is reopened after the SDK's back-off (100 ms doubled up to 5 s,
//!   plus 0..50 % jitter, at least a busy control plane's pushback, restarted once a
//!   stream delivered something) while the viewer plays on, re-parents and reports;
//! * each pushed delta applied: parents and neighbours to the node, new key sets
//!   (`keys_version`) and renewed chunk tokens to the data-plane connection, revoked
//!   peers' links closed ([`Input::Revoked`]); `active = false` (left, expired,
//!   revoked, the broadcast stopped) ends the viewer, as it stops an SDK viewer
//!   (`SessionInactive`);
//! * a chunk from the data plane signed with an unknown key id asks for the current key
//!   sets (`SessionUp.refresh_keys`, at most once a second, the SDK's
//!   `KeyHoldLimits::min_interval`);
//! * quality reports ([`super::reports`]) every report interval, the final one on leave;
//! * `Reparent` and `ReportPeer` when the node asks, `Leave` at the end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use starling_grid::Parent;
use starling_grid::peer::PeerId;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    JoinRequest, LeaveRequest, PeerReportKind, ReparentRequest, ReportPeerRequest, SessionDown,
    SessionUp,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::control::{Cmd, Ctx, full_parents, jittered, join, parent_of, pushback_ms};
use super::dataplane::{self, DpCmd, DpSetup};
use super::msg::Input;
use super::reports::{self, ReportQueue, ViewerFigures};
use crate::swarm::peer_ip;

/// Counters interval when the control plane names none (the SDK's default).
const DEFAULT_COUNTERS_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest counters interval accepted (the SDK's floor).
const MIN_COUNTERS_INTERVAL: Duration = Duration::from_millis(50);
/// Stream reopen back-off: first delay and cap (the SDK's `reconnect_initial` and
/// `reconnect_max` defaults).
const REOPEN_INITIAL: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(5);
/// Key refreshes go out at most this often (the SDK's `KeyHoldLimits::min_interval`).
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// `SessionUp` messages queued on one stream (the SDK's).
const SESSION_UP_QUEUE: usize = 4;
/// The final report's flush on leave is bounded by this (the SDK's).
const LEAVE_FLUSH: Duration = Duration::from_secs(3);
/// The port simulated viewers advertise (nobody dials it).
const SIM_PORT: u16 = 9;

/// The control plane's clock minus ours, from a `Join` answered at `server_ms` after
/// a round trip of `rpc_ms` (0 when the control plane sent no time).
fn clock_offset_ms(server_ms: i64, rpc_ms: impl TryInto<i64>) -> i64 {
    if server_ms <= 0 {
        return 0;
    }
    let half = rpc_ms.try_into().unwrap_or(0) / 2;
    let local = i64::try_from(starling_proto::time::unix_ms()).unwrap_or(i64::MAX);
    server_ms.saturating_add(half).saturating_sub(local)
}

/// One viewer's session: join, the stream, its commands, reports, leave.
pub(super) async fn session(
    ctx: Arc<Ctx>,
    channel: Channel,
    index: usize,
    upload_kbps: u32,
    mut cmds: mpsc::Receiver<Cmd>,
    dp: Option<(mpsc::Sender<DpCmd>, mpsc::Receiver<DpCmd>)>,
) {
    let mut client = ViewerServiceClient::new(channel);
    let global = ctx.cfg.index_offset + index;
    // One holder key per simulated viewer (its chunk tokens are bound to it).
    let holder = match starling_proto::holder::HolderKey::generate() {
        Ok(k) => Arc::new(k),
        Err(e) => {
            ctx.counters.join_failures.fetch_add(1, Ordering::Relaxed);
            let error = format!("holder key: {e}");
            let _ = ctx.fabric.send(Input::Failed { index, error }).await;
            return;
        }
    };
    let req = JoinRequest {
        holder_key: holder.public_key().to_vec(),
        broadcast_id: ctx.cfg.broadcast_id.clone(),
        credential: String::new(),
        client_version: concat!("starling-loadtest-sim/", env!("CARGO_PKG_VERSION")).into(),
        peer_addr: format!("{}:{SIM_PORT}", peer_ip(global)),
        upload_kbps,
        // As the SDK asks: the control plane then makes this peer's children version-2
        // tickets (its cost as in production; simulated links check no tickets).
        mac_tickets: true,
        host_addr: String::new(),
    };
    let (resp, rpc_ms) = match join(&ctx, &mut client, req).await {
        Ok(r) => r,
        Err(error) => {
            ctx.counters.join_failures.fetch_add(1, Ordering::Relaxed);
            let _ = ctx.fabric.send(Input::Failed { index, error }).await;
            return;
        }
    };
    ctx.counters.sessions.fetch_add(1, Ordering::Relaxed);
    let figures = Arc::new(ViewerFigures::default());
    let parents = full_parents(
        &resp.parents,
        resp.params.as_ref().map_or(0, |p| p.substreams),
    );
    let dp_tx = match (dp, &ctx.cfg.data_plane) {
        (Some((tx, rx)), Some(shared)) => {
            let mask = parents
                .iter()
                .enumerate()
                .filter(|(_, p)| **p == Parent::Server)
                .fold(0u64, |m, (s, _)| m | (1u64 << s));
            let setup = DpSetup {
                index,
                addr: resp.dataplane_wire_addr.clone(),
                token: Bytes::from(resp.chunk_token.clone()),
                holder: holder.clone(),
                broadcast_id: ctx.cfg.broadcast_id.clone(),
                mask,
                chunk_keys: resp
                    .chunk_keys
                    .iter()
                    .map(|k| (k.key_id, k.ed25519.clone()))
                    .collect(),
                run_epoch: resp.run_epoch,
                clock_offset_ms: clock_offset_ms(resp.server_time_unix_ms, rpc_ms),
                fabric: ctx.fabric.clone(),
                shared: shared.clone(),
                figures: figures.clone(),
            };
            tokio::spawn(dataplane::connection(setup, rx));
            Some(tx)
        }
        _ => None,
    };
    let joined = Input::Joined {
        index,
        peer_id: resp.peer_id,
        child_slots: resp.child_slots,
        parents,
        neighbours: resp.neighbours.iter().map(|n| n.peer_id).collect(),
        rpc_ms: Some(rpc_ms),
        bytes: Some(figures.clone()),
    };
    if ctx.fabric.send(joined).await.is_err() {
        return;
    }
    let mut s = Session {
        ctx: &ctx,
        client,
        index,
        session_id: resp.session_id,
        figures,
        dp: dp_tx,
        reports: ReportQueue::default(),
        report_every: reports::interval(resp.report_interval_ms),
        neighbours: Vec::new(),
        keys_version: 0,
        interval: DEFAULT_COUNTERS_INTERVAL,
    };
    let end = s.run(&mut cmds).await;
    s.dp = None;
    if let Err(error) = &end {
        let _ = ctx
            .fabric
            .send(Input::Failed {
                index,
                error: error.clone(),
            })
            .await;
    }
    // The final report, then whatever is still queued (bounded in time), then Leave.
    s.queue_report(true);
    let _ = tokio::time::timeout(
        LEAVE_FLUSH,
        s.reports.flush(&ctx, &mut s.client, &s.session_id),
    )
    .await;
    ctx.counters.leaves.fetch_add(1, Ordering::Relaxed);
    let leave = s.client.leave(LeaveRequest {
        session_id: s.session_id.clone(),
    });
    if !matches!(
        tokio::time::timeout(ctx.cfg.call_timeout, leave).await,
        Ok(Ok(_))
    ) {
        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// An open session stream.
struct Open {
    up: mpsc::Sender<SessionUp>,
    down: tonic::Streaming<SessionDown>,
    /// It carried at least one message (the reopen back-off restarts).
    delivered: bool,
}

/// One session's state between its events.
struct Session<'a> {
    ctx: &'a Ctx,
    client: ViewerServiceClient<Channel>,
    index: usize,
    session_id: String,
    figures: Arc<ViewerFigures>,
    dp: Option<mpsc::Sender<DpCmd>>,
    reports: ReportQueue,
    report_every: Duration,
    /// The neighbours last pushed.
    neighbours: Vec<PeerId>,
    /// Of the key sets held (0 = none known by version).
    keys_version: u64,
    /// Counters interval.
    interval: Duration,
}

/// Waits for the next message of an open stream (never, without one).
async fn next_down(open: &mut Option<Open>) -> Option<Result<Option<SessionDown>, tonic::Status>> {
    match open {
        Some(o) => Some(o.down.message().await),
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    /// The counters now (the upload budget never drops below the join's offer: 0 =
    /// unchanged, as the SDK sends it).
    fn counters(&self) -> SessionUp {
        let f = &self.figures;
        SessionUp {
            bytes_from_server: f.from_server.load(Ordering::Relaxed),
            bytes_from_peers: f.from_peers.load(Ordering::Relaxed),
            bytes_uploaded: f.uploaded.load(Ordering::Relaxed),
            upload_kbps: 0,
            ..SessionUp::default()
        }
    }

    fn queue_report(&mut self, final_report: bool) {
        let dropped = self.reports.enqueue(&self.figures, final_report);
        self.ctx
            .counters
            .reports_dropped
            .fetch_add(dropped, Ordering::Relaxed);
    }

    /// Opens the session stream (`Err`: the status and the least wait before the next
    /// try, a busy control plane's pushback).
    async fn open(&mut self) -> Result<Open, (String, Duration, bool)> {
        let (tx, rx) = mpsc::channel::<SessionUp>(SESSION_UP_QUEUE);
        let first = SessionUp {
            session_id: self.session_id.clone(),
            keys_version: self.keys_version,
            ..self.counters()
        };
        // The queue is new and empty.
        let _ = tx.try_send(first);
        let opened = tokio::time::timeout(
            self.ctx.cfg.call_timeout,
            self.client.session(ReceiverStream::new(rx)),
        )
        .await;
        match opened {
            Ok(Ok(r)) => Ok(Open {
                up: tx,
                down: r.into_inner(),
                delivered: false,
            }),
            Ok(Err(s)) => {
                let at_least = if s.code() == tonic::Code::ResourceExhausted {
                    pushback_ms(&s).map_or(Duration::ZERO, Duration::from_millis)
                } else {
                    Duration::ZERO
                };
                let fatal = s.code() == tonic::Code::Unimplemented;
                Err((
                    format!("session: {}: {}", s.code(), s.message()),
                    at_least,
                    fatal,
                ))
            }
            Err(_) => Err(("session: open timed out".into(), Duration::ZERO, false)),
        }
    }

    /// The session until the viewer leaves (`Ok`) or the session is over (`Err`).
    async fn run(&mut self, cmds: &mut mpsc::Receiver<Cmd>) -> Result<(), String> {
        let counters = self.ctx.counters.clone();
        let mut open: Option<Open> = None;
        let mut opened_before = false;
        let mut reopen_at = Instant::now();
        let mut backoff = REOPEN_INITIAL;
        let mut next_counters = Instant::now() + self.interval;
        let mut next_report = Instant::now() + self.report_every;
        let mut refresh_wanted = false;
        let mut last_refresh: Option<Instant> = None;
        let figures = self.figures.clone();
        let result = loop {
            let refresh_at = last_refresh.map_or_else(Instant::now, |t| t + REFRESH_EVERY);
            // Why a stream broke, and the least wait before reopening it.
            let mut broken: Option<(String, Duration)> = None;
            tokio::select! {
                () = tokio::time::sleep_until(reopen_at), if open.is_none() => {
                    match self.open().await {
                        Ok(o) => {
                            counters.streams_open.fetch_add(1, Ordering::Relaxed);
                            if opened_before {
                                counters.streams_reopened.fetch_add(1, Ordering::Relaxed);
                            }
                            opened_before = true;
                            next_counters = Instant::now() + self.interval;
                            open = Some(o);
                        }
                        Err((error, _, true)) => break Err(error),
                        Err((error, at_least, false)) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            broken = Some((error, at_least));
                        }
                    }
                }
                msg = next_down(&mut open) => match msg {
                    Some(Ok(Some(down))) => {
                        counters.downs.fetch_add(1, Ordering::Relaxed);
                        if let Some(o) = open.as_mut() {
                            o.delivered = true;
                        }
                        if !down.active {
                            counters.ended.fetch_add(1, Ordering::Relaxed);
                            break Err("the control plane ended the session".into());
                        }
                        let before = self.interval;
                        if !self.apply(down).await {
                            break Ok(());
                        }
                        if self.interval != before {
                            next_counters = Instant::now() + self.interval;
                        }
                    }
                    Some(Ok(None)) => broken = Some(("ended by the control plane".into(), Duration::ZERO)),
                    Some(Err(s)) => broken = Some((format!("session: {}: {}", s.code(), s.message()), Duration::ZERO)),
                    None => {}
                },
                () = tokio::time::sleep_until(next_counters), if open.is_some() => {
                    next_counters = Instant::now() + self.interval;
                    let up = self.counters();
                    if let Some(o) = &open {
                        match o.up.try_send(up) {
                            Ok(()) => {
                                counters.ups.fetch_add(1, Ordering::Relaxed);
                            }
                            // The stream is not draining: skip this one.
                            Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                broken = Some(("stream closed".into(), Duration::ZERO));
                            }
                        }
                    }
                }
                () = figures.key_refresh.notified(), if !refresh_wanted => {
                    refresh_wanted = true;
                }
                () = tokio::time::sleep_until(refresh_at), if refresh_wanted && open.is_some() => {
                    // A chunk named a key id this viewer lacks: ask for the current keys.
                    let up = SessionUp {
                        refresh_keys: true,
                        ..self.counters()
                    };
                    last_refresh = Some(Instant::now());
                    if let Some(o) = &open {
                        match o.up.try_send(up) {
                            Ok(()) => {
                                refresh_wanted = false;
                                counters.key_refreshes.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                broken = Some(("stream closed".into(), Duration::ZERO));
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(next_report) => {
                    self.queue_report(false);
                    let sid = self.session_id.clone();
                    self.reports.flush(self.ctx, &mut self.client, &sid).await;
                    next_report = (next_report + self.report_every).max(Instant::now());
                }
                cmd = cmds.recv() => match cmd {
                    None | Some(Cmd::Leave) => break Ok(()),
                    Some(Cmd::ReSearch { substream, exclude }) => {
                        self.reparent(substream, exclude).await;
                    }
                    Some(Cmd::Report { parent }) => self.report_peer(parent).await,
                },
            }
            if let Some((error, at_least)) = broken {
                // Reopen after the back-off; the viewer plays on meanwhile.
                if let Some(o) = open.take() {
                    counters.streams_open.fetch_sub(1, Ordering::Relaxed);
                    if o.delivered {
                        backoff = REOPEN_INITIAL;
                    }
                }
                let wait = jittered(backoff.max(at_least));
                tracing::debug!(
                    index = self.index,
                    retry_ms = wait.as_millis(),
                    "session stream lost: {error}"
                );
                backoff = (backoff * 2).min(REOPEN_MAX);
                reopen_at = Instant::now() + wait;
            }
        };
        if open.is_some() {
            counters.streams_open.fetch_sub(1, Ordering::Relaxed);
        }
        result
    }

    /// Applies one `SessionDown`; `false` when the fabric is gone.
    async fn apply(&mut self, down: SessionDown) -> bool {
        let ctx = self.ctx;
        let index = self.index;
        if down.counters_interval_ms > 0 {
            self.interval = Duration::from_millis(u64::from(down.counters_interval_ms))
                .max(MIN_COUNTERS_INTERVAL);
        }
        if down.keys_version != 0 {
            // The new full key sets: chunks are checked with these from now on (token
            // keys check peers' tokens, which simulated links do not carry).
            self.keys_version = down.keys_version;
            ctx.counters.key_sets.fetch_add(1, Ordering::Relaxed);
            if let Some(dp) = &self.dp {
                let keys = down
                    .chunk_keys
                    .iter()
                    .map(|k| (k.key_id, k.ed25519.clone()))
                    .collect();
                // Deltas are not repeated: wait for room.
                let _ = dp.send(DpCmd::Keys(keys)).await;
            }
        }
        if !down.chunk_token.is_empty() {
            ctx.counters.token_renewals.fetch_add(1, Ordering::Relaxed);
            if let Some(dp) = &self.dp {
                let _ = dp.send(DpCmd::Token(Bytes::from(down.chunk_token))).await;
            }
        }
        if !down.revoked_peer_ids.is_empty() {
            let m = Input::Revoked {
                index,
                peers: down.revoked_peer_ids,
            };
            if ctx.fabric.send(m).await.is_err() {
                return false;
            }
        }
        for (substream, parent) in down.parents.iter().filter_map(parent_of) {
            let m = Input::Assign {
                index,
                substream,
                parent,
                research: false,
            };
            if ctx.fabric.send(m).await.is_err() {
                return false;
            }
        }
        if down.neighbours_changed {
            let now: Vec<PeerId> = down.neighbours.iter().map(|n| n.peer_id).collect();
            for &n in now.iter().filter(|n| !self.neighbours.contains(n)) {
                let m = Input::Neighbour {
                    index,
                    neighbour: n,
                };
                if ctx.fabric.send(m).await.is_err() {
                    return false;
                }
            }
            self.neighbours = now;
        }
        true
    }

    async fn reparent(&mut self, substream: u16, exclude: Vec<PeerId>) {
        let ctx = self.ctx;
        let req = ReparentRequest {
            session_id: self.session_id.clone(),
            substream: u32::from(substream),
            exclude_peer_ids: exclude,
            unreachable_peer_ids: vec![],
        };
        let answer = tokio::time::timeout(ctx.cfg.call_timeout, self.client.reparent(req)).await;
        let parent = match answer {
            Ok(Ok(r)) => r
                .into_inner()
                .parent
                .as_ref()
                .and_then(parent_of)
                .map(|(_, p)| p),
            _ => {
                ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        ctx.counters.reparents.fetch_add(1, Ordering::Relaxed);
        let index = self.index;
        let m = match parent {
            Some(parent) => Input::Assign {
                index,
                substream,
                parent,
                research: true,
            },
            None => Input::ResearchFailed { index, substream },
        };
        let _ = ctx.fabric.send(m).await;
    }

    async fn report_peer(&mut self, parent: PeerId) {
        let ctx = self.ctx;
        ctx.counters.peer_reports.fetch_add(1, Ordering::Relaxed);
        let req = ReportPeerRequest {
            session_id: self.session_id.clone(),
            peer_id: parent,
            reason: "non-delivery".into(),
            kind: PeerReportKind::NonDelivery as i32,
        };
        let call = self.client.report_peer(req);
        if !matches!(
            tokio::time::timeout(ctx.cfg.call_timeout, call).await,
            Ok(Ok(_))
        ) {
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
