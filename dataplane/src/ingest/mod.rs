//! Ingest: HTTP GET of a progressive live stream (tokio + hyper-util legacy client,
//! http/1, no TLS), fed through the [`Chunker`] into the broadcast's ring. Reconnects
//! forever with capped exponential backoff until stopped; never panics on a bad source.
//! A source that is an HLS playlist (URL ending in `.m3u8`, or an HLS content type) is
//! followed by [`hls`] instead: segments are fetched in order and fed to the same
//! chunker as one continuous stream.

mod hls;

use crate::chunker::{Chunker, ChunkerConfig};
use crate::config::Timeouts;
use crate::counters::Metrics;
use crate::error::IngestError;
use crate::ring::{Broadcast, Registry, SourceHealth, StreamParams};
use crate::source_policy::{GuardedConnector, SourcePolicy};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

/// The HTTP client every source fetch goes through (the source policy checks each
/// connection's address).
pub(crate) type SourceClient = Client<GuardedConnector, Empty<Bytes>>;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use starling_proto::integrity::{ChunkMeta, ChunkSigner};
use starling_proto::wire::chunk_flags;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What to ingest (from an `IngestCommand` or a `--static-broadcast`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSpec {
    pub broadcast_id: String,
    pub source_url: String,
    pub chunk_duration_ms: u32,
    pub substreams: u16,
    /// Viewers need no chunk token (`IngestCommand.public`).
    pub public: bool,
    /// The broadcast's run (`IngestCommand.run_epoch`; 0 = none given): every chunk is
    /// signed with it, so viewers can refuse a previous run's chunks.
    pub run_epoch: u64,
}

pub(crate) use starling_proto::time::unix_ms as now_ms;

/// Capped exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    /// Delays start at `min` and double up to `max`; a `min` above `max` is capped.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.min(max);
        Backoff { min, max, cur: min }
    }
    /// The delay to wait now; the next one doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = self.cur.saturating_mul(2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

struct Running {
    spec: IngestSpec,
    cancel: watch::Sender<bool>,
}

/// Starts and stops ingests; must be used from within the tokio runtime.
pub struct IngestManager {
    registry: Arc<Registry>,
    window_ms: u64,
    max_chunk_bytes: usize,
    timeouts: Timeouts,
    running: Mutex<HashMap<String, Running>>,
    client: SourceClient,
    signer: Arc<ChunkSigner>,
}

impl IngestManager {
    pub fn new(
        registry: Arc<Registry>,
        window_ms: u64,
        max_chunk_bytes: usize,
        timeouts: Timeouts,
        signer: Arc<ChunkSigner>,
        policy: SourcePolicy,
    ) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(timeouts.source_connect));
        conn.enforce_http(true);
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(GuardedConnector::new(policy, conn));
        IngestManager {
            registry,
            window_ms,
            max_chunk_bytes,
            timeouts,
            running: Mutex::new(HashMap::new()),
            client,
            signer,
        }
    }

    /// Starts ingesting (idempotent: the same spec again is a no-op; a changed spec
    /// restarts the ingest, keeping the window and the numbering; a change of `public`
    /// alone only updates the broadcast; a new run starts afresh: the previous run's
    /// window and viewers are dropped, as by [`Self::stop`]).
    pub fn start(&self, spec: IngestSpec) {
        let new_run = self
            .running
            .lock()
            .get(&spec.broadcast_id)
            .is_some_and(|r| r.spec.run_epoch != spec.run_epoch);
        if new_run {
            info!(broadcast = %spec.broadcast_id, run = spec.run_epoch, "new run: dropping the previous run's window");
            self.stop(&spec.broadcast_id);
        }
        let mut running = self.running.lock();
        let make = || {
            let b = Broadcast::new(
                &spec.broadcast_id,
                self.window_ms,
                StreamParams {
                    content_type: String::new(),
                    chunk_duration_ms: spec.chunk_duration_ms,
                    substreams: spec.substreams,
                },
            );
            b.set_public(spec.public);
            b
        };
        if let Some(r) = running.get_mut(&spec.broadcast_id) {
            let same_source = IngestSpec {
                public: r.spec.public,
                ..spec.clone()
            } == r.spec;
            if same_source && !r.cancel.is_closed() {
                debug!(broadcast = %spec.broadcast_id, "ingest already running");
                self.registry
                    .get_or_insert(&spec.broadcast_id, make)
                    .set_public(spec.public);
                r.spec.public = spec.public;
                return;
            }
            let _ = r.cancel.send(true);
        }
        let b = self.registry.get_or_insert(&spec.broadcast_id, make);
        b.set_public(spec.public);
        b.set_params(|p| {
            p.chunk_duration_ms = spec.chunk_duration_ms;
            p.substreams = spec.substreams;
        });
        let (tx, rx) = watch::channel(false);
        info!(broadcast = %spec.broadcast_id, url = %spec.source_url, "starting ingest");
        let task = IngestTask {
            spec: spec.clone(),
            broadcast: b,
            metrics: Arc::clone(self.registry.metrics()),
            client: self.client.clone(),
            signer: Arc::clone(&self.signer),
            cfg: ChunkerConfig {
                target_ms: spec.chunk_duration_ms,
                max_bytes: self.max_chunk_bytes,
            },
            timeouts: self.timeouts,
        };
        tokio::spawn(task.run(rx));
        running.insert(spec.broadcast_id.clone(), Running { spec, cancel: tx });
    }

    /// Stops an ingest and ends its viewers with `GOODBYE(BroadcastStopped)`.
    pub fn stop(&self, broadcast_id: &str) {
        let r = {
            let mut running = self.running.lock();
            running.remove(broadcast_id)
        };
        if let Some(r) = r {
            let _ = r.cancel.send(true);
        }
        if self.registry.remove(broadcast_id).is_some() {
            info!(broadcast = %broadcast_id, "broadcast stopped");
        }
    }

    /// Broadcast ids being ingested.
    pub fn ids(&self) -> Vec<String> {
        self.running.lock().keys().cloned().collect()
    }
}

struct IngestTask {
    spec: IngestSpec,
    broadcast: Arc<Broadcast>,
    metrics: Arc<Metrics>,
    client: SourceClient,
    signer: Arc<ChunkSigner>,
    cfg: ChunkerConfig,
    timeouts: Timeouts,
}

impl IngestTask {
    async fn run(self, mut cancel: watch::Receiver<bool>) {
        let mut chunker = Chunker::new(self.cfg, self.broadcast.next_seq());
        if self.broadcast.next_seq() > 0 {
            chunker.mark_discontinuity();
        }
        let mut backoff = Backoff::new(self.timeouts.backoff_min, self.timeouts.backoff_max);
        let id = &self.spec.broadcast_id;
        let mut first = true;
        // Kept across sessions: an HLS reconnect does not fetch a segment twice.
        let mut hls_state = hls::HlsState::new();
        loop {
            if *cancel.borrow() {
                break;
            }
            if !std::mem::take(&mut first) {
                self.broadcast.count_reconnect();
            }
            self.broadcast.set_health(SourceHealth::Connecting, "");
            let started = tokio::time::Instant::now();
            let mut got_data = false;
            let result = tokio::select! {
                r = self.session(&mut chunker, &mut got_data, &mut hls_state) => r,
                _ = cancel.changed() => break,
            };
            let mut out = Vec::new();
            chunker.flush(now_ms(), &mut out);
            for c in out {
                self.push(c);
            }
            let err = match result {
                Ok(()) => IngestError::Eof,
                Err(e) => e,
            };
            warn!(broadcast = %id, error = %err, "source session ended");
            self.broadcast
                .set_health(SourceHealth::Down, err.to_string());
            if got_data && started.elapsed() > self.timeouts.backoff_max {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.changed() => break,
            }
        }
        debug!(broadcast = %id, "ingest task ended");
    }

    fn push(&self, mut c: crate::chunker::Chunk) {
        self.metrics.chunk_ingested(c.payload.len());
        let started = Instant::now();
        match sign_chunk(
            &self.signer,
            &self.spec.broadcast_id,
            self.spec.run_epoch,
            &c,
        ) {
            Ok(sig) => {
                c.signature = sig;
                let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.metrics.chunk_signed(ns);
            }
            Err(e) => {
                self.metrics.chunk_sign_failed();
                warn!(broadcast = %self.spec.broadcast_id, seq = c.seq, error = %e, "cannot sign chunk: served unsigned");
            }
        }
        self.broadcast.push(c);
    }

    async fn session(
        &self,
        chunker: &mut Chunker,
        got_data: &mut bool,
        hls_state: &mut hls::HlsState,
    ) -> Result<(), IngestError> {
        let uri = http_uri(&self.spec.source_url)?;
        if crate::hls::is_hls_url(&self.spec.source_url) {
            return self.hls_session(None, chunker, got_data, hls_state).await;
        }
        let req = hyper::Request::get(uri)
            .header(hyper::header::USER_AGENT, "starling-dataplane/0.1")
            .header(hyper::header::ACCEPT, "*/*")
            .body(Empty::<Bytes>::new())
            .map_err(|e| IngestError::BadUrl(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeouts.source_connect * 2, self.client.request(req))
            .await
            .map_err(|_| IngestError::HeadTimeout)?
            .map_err(|e| IngestError::Request(error_chain(&e)))?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(IngestError::Status(resp.status().as_u16()));
        }
        let ct = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if ct.as_deref().is_some_and(crate::hls::is_hls_content_type) {
            let text = self.read_body(resp, hls::MAX_PLAYLIST, "playlist").await?;
            let first = (self.spec.source_url.clone(), text);
            return self
                .hls_session(Some(first), chunker, got_data, hls_state)
                .await;
        }
        chunker.reset(ct.as_deref());
        let mut body = resp.into_body();
        loop {
            let frame = tokio::time::timeout(self.timeouts.source_idle, body.frame())
                .await
                .map_err(|_| IngestError::Idle(self.timeouts.source_idle))?;
            let Some(frame) = frame else {
                return Ok(());
            };
            let frame = frame.map_err(|e| IngestError::Body(error_chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.feed(chunker, &data, got_data);
        }
    }

    /// Feeds source bytes to the chunker and the chunks it cuts into the ring.
    fn feed(&self, chunker: &mut Chunker, data: &[u8], got_data: &mut bool) {
        if data.is_empty() {
            return;
        }
        if !*got_data {
            *got_data = true;
            self.broadcast.set_health(SourceHealth::Up, "");
        }
        let mut out = Vec::new();
        chunker.push(data, now_ms(), &mut out);
        if let Some(ct) = chunker.content_type()
            && self.broadcast.params().content_type != ct
        {
            self.broadcast.set_params(|p| p.content_type = ct);
        }
        for c in out {
            self.push(c);
        }
    }

    /// Ends a chunker session (buffered bytes go out as a chunk, the next chunk is a
    /// discontinuity) and starts the next with `content_type`.
    fn restart_chunker(&self, chunker: &mut Chunker, content_type: Option<&str>) {
        let mut out = Vec::new();
        chunker.flush(now_ms(), &mut out);
        for c in out {
            self.push(c);
        }
        chunker.reset(content_type);
    }
}

/// An `http://host...` URL as a request URI.
fn http_uri(url: &str) -> Result<hyper::Uri, IngestError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| IngestError::BadUrl(format!("{url}: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(IngestError::BadUrl(format!(
            "{url}: only http:// URLs are supported"
        )));
    }
    Ok(uri)
}

/// The signature block of a chunk of run `run_epoch`, made once when it enters the
/// ring. The signed flags are the chunk's flags without `DISCONTINUITY`, which is
/// receiver-specific (a server sets it for a receiver it skipped chunks for):
/// verifiers clear it too.
pub fn sign_chunk(
    signer: &ChunkSigner,
    broadcast_id: &str,
    run_epoch: u64,
    c: &crate::chunker::Chunk,
) -> Result<Bytes, starling_proto::integrity::IntegrityError> {
    let meta = ChunkMeta {
        seq: c.seq,
        flags: signed_flags(c.flags),
        timestamp_ms: c.timestamp_ms,
        duration_ms: c.duration_ms,
    };
    signer.sign_in_run(broadcast_id, run_epoch, &meta, &c.payload)
}

/// The flags a chunk signature covers: everything but `DISCONTINUITY` (and `SIGNED`,
/// which the codec owns).
pub fn signed_flags(flags: u8) -> u8 {
    flags & !(chunk_flags::DISCONTINUITY | chunk_flags::SIGNED)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn delays(b: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n).map(|_| b.next_delay()).collect()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stays_there() {
        let mut b = Backoff::new(ms(250), ms(5000));
        assert_eq!(
            delays(&mut b, 8),
            [250, 500, 1000, 2000, 4000, 5000, 5000, 5000].map(ms)
        );
    }

    #[test]
    fn backoff_reset_starts_again_from_the_minimum() {
        let mut b = Backoff::new(ms(100), ms(1000));
        assert_eq!(delays(&mut b, 6), [100, 200, 400, 800, 1000, 1000].map(ms));
        b.reset();
        assert_eq!(delays(&mut b, 3), [100, 200, 400].map(ms));
        // A reset in the middle of the sequence as well.
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[test]
    fn backoff_never_exceeds_the_cap_and_never_overflows() {
        // A minimum above the cap is capped from the first delay on.
        let mut b = Backoff::new(ms(9000), ms(2000));
        assert_eq!(delays(&mut b, 3), [2000, 2000, 2000].map(ms));
        b.reset();
        assert_eq!(b.next_delay(), ms(2000));
        // A cap near Duration::MAX: doubling saturates instead of panicking.
        let mut b = Backoff::new(Duration::MAX / 3, Duration::MAX);
        assert_eq!(
            delays(&mut b, 4),
            [
                Duration::MAX / 3,
                (Duration::MAX / 3) * 2,
                Duration::MAX,
                Duration::MAX
            ]
        );
    }
}
