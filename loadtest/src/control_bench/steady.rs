//! Holding the sessions: one task per session keeps it alive, by the session stream
//! (`ViewerService.Session`: counters at the announced interval, every `SessionDown`
//! read) or by unary `Heartbeat` at the join's interval, and counts what it sees.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{HeartbeatRequest, SessionDown, SessionUp};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::config::Mode;
use super::stats::{CodeCounts, Histogram, code_name};

/// Counters of all keepers (cumulative; phases take differences).
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions whose keeper is running.
    pub held: AtomicU64,
    /// Heartbeats answered.
    pub heartbeats: AtomicU64,
    /// SessionDown messages received (first ones included).
    pub downs: AtomicU64,
    /// SessionDown messages after a stream's first (the pushed updates).
    pub pushes: AtomicU64,
    /// Streams that received their first SessionDown.
    pub streams_started: AtomicU64,
    /// SessionUp counter messages sent after the first.
    pub ups: AtomicU64,
    /// Sessions the control plane ended (`active: false`).
    pub ended_by_server: AtomicU64,
    /// Streams closed or failed, heartbeats given up.
    pub lost: AtomicU64,
    /// The control plane answered UNIMPLEMENTED to Session.
    pub unimplemented: AtomicBool,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    /// See [`Counters`].
    pub held: u64,
    /// See [`Counters`].
    pub heartbeats: u64,
    /// See [`Counters`].
    pub downs: u64,
    /// See [`Counters`].
    pub pushes: u64,
    /// See [`Counters`].
    pub streams_started: u64,
    /// See [`Counters`].
    pub ups: u64,
    /// See [`Counters`].
    pub ended_by_server: u64,
    /// See [`Counters`].
    pub lost: u64,
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            held: self.held.load(Ordering::Relaxed),
            heartbeats: self.heartbeats.load(Ordering::Relaxed),
            downs: self.downs.load(Ordering::Relaxed),
            pushes: self.pushes.load(Ordering::Relaxed),
            streams_started: self.streams_started.load(Ordering::Relaxed),
            ups: self.ups.load(Ordering::Relaxed),
            ended_by_server: self.ended_by_server.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// What every keeper shares.
pub struct Keepers {
    /// Keep-alive mode.
    pub mode: Mode,
    /// Counters.
    pub counters: Counters,
    /// Heartbeat call latency, microseconds.
    pub heartbeat_latency: Mutex<Histogram>,
    /// Heartbeat / stream errors by gRPC code.
    pub errors: Mutex<CodeCounts>,
    /// Stream rate, for plausible byte counters.
    pub stream_kbps: u32,
    /// Longest wait for one call.
    pub call_timeout: Duration,
    stop: watch::Receiver<bool>,
}

/// Decrements `held` when a keeper ends in any way (also when aborted).
struct HeldGuard<'a>(&'a AtomicU64);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Keepers {
    /// Keepers stopped by `stop` turning true.
    pub fn new(
        mode: Mode,
        stream_kbps: u32,
        call_timeout: Duration,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Keepers {
            mode,
            counters: Counters::default(),
            heartbeat_latency: Mutex::new(Histogram::default()),
            errors: Mutex::new(CodeCounts::new()),
            stream_kbps,
            call_timeout,
            stop,
        }
    }

    fn error(&self, code: tonic::Code) {
        *self.errors.lock().entry(code_name(code)).or_default() += 1;
    }

    /// Bytes a viewer would have received from the start, at the stream rate.
    fn bytes_since(&self, start: Instant) -> u64 {
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        ms.saturating_mul(u64::from(self.stream_kbps)) / 8
    }

    /// Starts the keeper of one session.
    pub fn spawn(
        self: &Arc<Self>,
        channel: Channel,
        session_id: String,
        heartbeat_interval_ms: u32,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        self.counters.held.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _held = HeldGuard(&me.counters.held);
            let client = ViewerServiceClient::new(channel);
            match me.mode {
                Mode::Heartbeat => {
                    me.heartbeat(client, session_id, heartbeat_interval_ms)
                        .await
                }
                Mode::Stream => me.stream(client, session_id).await,
            }
        })
    }

    async fn heartbeat(
        &self,
        mut client: ViewerServiceClient<Channel>,
        session_id: String,
        interval_ms: u32,
    ) {
        let mut stop = self.stop.clone();
        let interval = Duration::from_millis(u64::from(interval_ms.clamp(100, 600_000)));
        let start = Instant::now();
        let mut next = tokio::time::Instant::now() + interval;
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            let req = HeartbeatRequest {
                session_id: session_id.clone(),
                bytes_from_server: self.bytes_since(start),
                ..HeartbeatRequest::default()
            };
            let t = Instant::now();
            match tokio::time::timeout(self.call_timeout, client.heartbeat(req)).await {
                Ok(Ok(r)) => {
                    failures = 0;
                    let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.heartbeat_latency.lock().record(us);
                    self.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                    if !r.get_ref().active {
                        self.counters
                            .ended_by_server
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                Ok(Err(s)) => {
                    self.error(s.code());
                    failures += 1;
                }
                Err(_) => {
                    self.error(tonic::Code::DeadlineExceeded);
                    failures += 1;
                }
            }
            if failures >= 10 {
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            next += interval;
            let now = tokio::time::Instant::now();
            if next < now {
                next = now + interval;
            }
        }
    }

    async fn stream(&self, mut client: ViewerServiceClient<Channel>, session_id: String) {
        let mut stop = self.stop.clone();
        let start = Instant::now();
        let (tx, rx) = mpsc::channel::<SessionUp>(4);
        let first = SessionUp {
            session_id,
            ..SessionUp::default()
        };
        if tx.try_send(first).is_err() {
            return;
        }
        let opened =
            tokio::time::timeout(self.call_timeout, client.session(ReceiverStream::new(rx))).await;
        let mut inbound = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => {
                if s.code() == tonic::Code::Unimplemented {
                    self.counters.unimplemented.store(true, Ordering::Relaxed);
                }
                self.error(s.code());
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                self.error(tonic::Code::DeadlineExceeded);
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut interval: Option<Duration> = None;
        let mut next = tokio::time::Instant::now();
        let mut first_seen = false;
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = stop.changed() => return,
                msg = inbound.message() => match msg {
                    Ok(Some(down)) => {
                        self.counters.downs.fetch_add(1, Ordering::Relaxed);
                        if first_seen {
                            self.counters.pushes.fetch_add(1, Ordering::Relaxed);
                        } else {
                            self.counters.streams_started.fetch_add(1, Ordering::Relaxed);
                        }
                        first_seen = true;
                        if interval.is_none() && down.counters_interval_ms > 0 {
                            let d = Duration::from_millis(u64::from(down.counters_interval_ms.max(100)));
                            interval = Some(d);
                            next = tokio::time::Instant::now() + d;
                        }
                        if !is_active(&down) {
                            self.counters.ended_by_server.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    Ok(None) => {
                        self.counters.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(s) => {
                        if s.code() == tonic::Code::Unimplemented {
                            self.counters.unimplemented.store(true, Ordering::Relaxed);
                        }
                        self.error(s.code());
                        self.counters.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                },
                _ = tokio::time::sleep_until(next), if interval.is_some() => {
                    let up = SessionUp {
                        bytes_from_server: self.bytes_since(start),
                        ..SessionUp::default()
                    };
                    // A full queue means the stream is not draining: skip this one.
                    if tx.try_send(up).is_ok() {
                        self.counters.ups.fetch_add(1, Ordering::Relaxed);
                    }
                    let d = interval.unwrap_or(Duration::from_secs(10));
                    next += d;
                    let now = tokio::time::Instant::now();
                    if next < now {
                        next = now + d;
                    }
                }
            }
        }
    }
}

fn is_active(down: &SessionDown) -> bool {
    down.active
}
