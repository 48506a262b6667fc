//! The in-memory window of recent chunks, per broadcast, shared by every executor.
//!
//! One `Arc<Chunk>` per chunk whose payload is a [`bytes::Bytes`]: however many
//! viewers, the payload exists once; viewers hold a cursor (a sequence number), never a
//! queue of chunks. New chunks are announced through a `tokio::sync::watch` channel,
//! which works from any thread and any executor (glommio included).

use crate::auth::Auth;
use crate::chunker::Chunk;
use crate::config::ConnLimits;
use crate::counters::Metrics;
use crate::limits::ConnTable;
use crate::metrics::{BroadcastSample, Snapshot};
use parking_lot::{Mutex, RwLock};
use starling_proto::wire;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use tokio::sync::watch;

/// Health of a broadcast's source, as reported to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceHealth {
    Connecting,
    Up,
    Down,
}

impl SourceHealth {
    pub fn to_proto(self) -> starling_proto::v1::SourceHealth {
        match self {
            SourceHealth::Connecting => starling_proto::v1::SourceHealth::Connecting,
            SourceHealth::Up => starling_proto::v1::SourceHealth::Up,
            SourceHealth::Down => starling_proto::v1::SourceHealth::Down,
        }
    }

    /// Its `state` label on `/metrics` (one of [`crate::metrics::SOURCE_STATES`]).
    pub fn label(self) -> &'static str {
        match self {
            SourceHealth::Connecting => "connecting",
            SourceHealth::Up => "up",
            SourceHealth::Down => "down",
        }
    }
}

/// Stream parameters announced in `STREAM_INFO` / HTTP headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamParams {
    pub content_type: String,
    pub chunk_duration_ms: u32,
    pub substreams: u16,
}

/// Snapshot of a broadcast's status (health reports, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastStatus {
    pub broadcast_id: String,
    pub health: SourceHealth,
    pub error: String,
    pub last_seq: Option<u64>,
    pub content_type: String,
    pub viewers: u32,
    pub chunks_in_window: usize,
    /// Stream rate over the window, kbps (see [`Broadcast::bitrate_bps`]).
    pub bitrate_kbps: u32,
}

/// Totals over the chunks currently in the window.
#[derive(Debug, Default, Clone, Copy)]
struct WindowTotals {
    duration_ms: u64,
    bytes: u64,
    /// `bytes` plus each chunk's frame header, fixed fields and signature block: what
    /// one receiver of every chunk is sent.
    wire_bytes: u64,
}

/// Bytes a receiver is sent for `chunk`: its `CHUNK` frame (header, fixed fields,
/// signature block if signed, payload).
fn wire_len(chunk: &Chunk) -> u64 {
    wire::chunk_frame_len(chunk.signature.len(), chunk.payload.len()) as u64
}

#[derive(Debug)]
struct HealthState {
    health: SourceHealth,
    error: String,
}

/// One broadcast: its window of chunks and its state.
#[derive(Debug)]
pub struct Broadcast {
    id: String,
    window_ms: u64,
    chunks: RwLock<VecDeque<Arc<Chunk>>>,
    /// Sums over `chunks` (durations for eviction, bytes for the bitrate).
    totals: Mutex<WindowTotals>,
    params: RwLock<StreamParams>,
    /// Mirror of `params.substreams`, read on every pushed chunk.
    substreams: AtomicU16,
    health: Mutex<HealthState>,
    /// Newest sequence + 1 (0 = no chunk yet); bumped on stop as well.
    notify: watch::Sender<u64>,
    stopped: AtomicBool,
    /// Viewers need no chunk token (`IngestCommand.public`); false until told.
    public: AtomicBool,
    viewers: AtomicU32,
    chunks_ingested: AtomicU64,
    bytes_ingested: AtomicU64,
    reconnects: AtomicU64,
}

/// Where a viewer cursor stands.
#[derive(Debug)]
pub enum Next {
    /// Send this chunk; `discontinuity` = chunks were skipped before it.
    Chunk(Arc<Chunk>, bool),
    /// Nothing new yet: wait for a notification.
    Wait,
    /// The broadcast was stopped.
    Stopped,
    /// The viewer fell behind the window too often.
    TooSlow,
}

/// A viewer's position in a broadcast: a sequence number, no buffered chunks.
#[derive(Debug, Clone)]
pub struct Cursor {
    next_seq: Option<u64>,
    pending_disc: bool,
    pub skips: u32,
    max_skips: u32,
    /// Where a live start begins: the newest random-access chunk at least this much
    /// media behind the live edge (0: the newest random-access chunk).
    behind_ms: u64,
}

impl Cursor {
    /// Start at the newest random-access chunk.
    pub fn live(max_skips: u32) -> Self {
        Self::live_behind(max_skips, 0)
    }

    /// Start at the newest random-access chunk that begins at least `behind_ms` of
    /// media behind the live edge (the newest random-access chunk if the window holds
    /// none that old): a start-up burst that lets a player start at once with a buffer
    /// instead of waiting for the live edge to fill it.
    pub fn live_behind(max_skips: u32, behind_ms: u64) -> Self {
        Cursor {
            next_seq: None,
            pending_disc: false,
            skips: 0,
            max_skips,
            behind_ms,
        }
    }

    /// Resume at `seq` if the window still holds it (or it is the next one to come);
    /// otherwise start live with `DISCONTINUITY`.
    pub fn resume(b: &Broadcast, seq: u64, max_skips: u32) -> Self {
        let (front, next) = b.range();
        let ok = matches!((front, next), (Some(f), n) if seq >= f && seq <= n);
        Cursor {
            next_seq: ok.then_some(seq),
            pending_disc: !ok,
            skips: 0,
            max_skips,
            behind_ms: 0,
        }
    }

    /// Sequence the cursor will deliver next, once known.
    pub fn position(&self) -> Option<u64> {
        self.next_seq
    }

    /// The next step for this viewer.
    pub fn next(&mut self, b: &Broadcast) -> Next {
        if b.is_stopped() {
            return Next::Stopped;
        }
        let chunks = b.chunks.read();
        let Some(front) = chunks.front().map(|c| c.seq) else {
            return Next::Wait;
        };
        let mut seq = match self.next_seq {
            Some(s) => s,
            None => match start_rap(&chunks, self.behind_ms) {
                Some(s) => s,
                None => return Next::Wait,
            },
        };
        if seq < front {
            // Fell out of the window: skip to the live edge.
            self.skips += 1;
            if self.skips > self.max_skips {
                return Next::TooSlow;
            }
            self.pending_disc = true;
            match newest_rap(&chunks) {
                Some(s) => seq = s,
                None => {
                    self.next_seq = None;
                    return Next::Wait;
                }
            }
        }
        match find(&chunks, seq) {
            Some(c) => {
                let c = Arc::clone(c);
                self.next_seq = Some(c.seq + 1);
                let disc = std::mem::take(&mut self.pending_disc);
                Next::Chunk(c, disc)
            }
            None => {
                self.next_seq = Some(seq);
                Next::Wait
            }
        }
    }
}

fn start_rap(chunks: &VecDeque<Arc<Chunk>>, behind_ms: u64) -> Option<u64> {
    if behind_ms > 0 {
        let mut span = 0u64;
        for c in chunks.iter().rev() {
            span = span.saturating_add(u64::from(c.duration_ms));
            if span >= behind_ms && c.is_random_access() {
                return Some(c.seq);
            }
        }
    }
    newest_rap(chunks)
}

fn newest_rap(chunks: &VecDeque<Arc<Chunk>>) -> Option<u64> {
    chunks
        .iter()
        .rev()
        .find(|c| c.is_random_access())
        .map(|c| c.seq)
}

fn find(chunks: &VecDeque<Arc<Chunk>>, seq: u64) -> Option<&Arc<Chunk>> {
    let front = chunks.front()?.seq;
    let idx = usize::try_from(seq.checked_sub(front)?).ok()?;
    match chunks.get(idx) {
        Some(c) if c.seq == seq => Some(c),
        // Gaps (should not happen): fall back to a search.
        _ => chunks
            .binary_search_by_key(&seq, |c| c.seq)
            .ok()
            .and_then(|i| chunks.get(i)),
    }
}

impl Broadcast {
    pub fn new(id: &str, window_ms: u64, params: StreamParams) -> Self {
        let (notify, _) = watch::channel(0);
        Broadcast {
            id: id.to_owned(),
            window_ms: window_ms.max(1000),
            chunks: RwLock::new(VecDeque::new()),
            totals: Mutex::new(WindowTotals::default()),
            substreams: AtomicU16::new(params.substreams.clamp(1, 64)),
            params: RwLock::new(params),
            health: Mutex::new(HealthState {
                health: SourceHealth::Connecting,
                error: String::new(),
            }),
            notify,
            stopped: AtomicBool::new(false),
            public: AtomicBool::new(false),
            viewers: AtomicU32::new(0),
            chunks_ingested: AtomicU64::new(0),
            bytes_ingested: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn params(&self) -> StreamParams {
        self.params.read().clone()
    }

    pub fn set_params(&self, f: impl FnOnce(&mut StreamParams)) {
        let mut g = self.params.write();
        f(&mut g);
        self.substreams
            .store(g.substreams.clamp(1, 64), Ordering::Relaxed);
    }

    /// Number of substreams K (chunk `seq` belongs to substream `seq % K`), 1..=64.
    pub fn substreams(&self) -> u16 {
        self.substreams.load(Ordering::Relaxed)
    }

    /// The chunk with sequence `seq`, if the window holds it (answers `REQUEST`).
    pub fn chunk(&self, seq: u64) -> Option<Arc<Chunk>> {
        let chunks = self.chunks.read();
        find(&chunks, seq).cloned()
    }

    /// `bytes(totals)` over the window's duration, in bits per second (0 until the
    /// window holds a chunk with a non-zero duration).
    fn window_bps(&self, bytes: impl Fn(&WindowTotals) -> u64) -> u64 {
        let t = *self.totals.lock();
        if t.duration_ms == 0 {
            return 0;
        }
        let bps = u128::from(bytes(&t)) * 8 * 1000 / u128::from(t.duration_ms);
        u64::try_from(bps).unwrap_or(u64::MAX)
    }

    /// Stream rate in bits per second: payload bytes of the chunks in the window over
    /// the sum of their durations (a moving average over the window; 0 until the window
    /// holds a chunk with a non-zero duration).
    pub fn bitrate_bps(&self) -> u64 {
        self.window_bps(|t| t.bytes)
    }

    /// [`Broadcast::bitrate_bps`] in kbps (rounded).
    pub fn bitrate_kbps(&self) -> u32 {
        u32::try_from(self.bitrate_bps().saturating_add(500) / 1000).unwrap_or(u32::MAX)
    }

    /// The stream rate as delivered, kbps (rounded): payload plus each chunk's frame
    /// header, fixed fields and signature block over the window, i.e. what one viewer of
    /// the whole stream is sent. Reported to the control plane, which sizes the peer
    /// grid's slots with it (the peers' upload budgets are spent in these bytes). 0 when
    /// no chunk with a duration is held.
    pub fn stream_kbps(&self) -> u32 {
        let bps = self.window_bps(|t| t.wire_bytes);
        u32::try_from(bps.saturating_add(500) / 1000).unwrap_or(u32::MAX)
    }

    /// Chunks cut from the source since the broadcast was created.
    pub fn chunks_ingested(&self) -> u64 {
        self.chunks_ingested.load(Ordering::Relaxed)
    }

    /// Payload bytes of those chunks.
    pub fn bytes_ingested(&self) -> u64 {
        self.bytes_ingested.load(Ordering::Relaxed)
    }

    /// Source connection attempts after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Counts a source reconnection attempt.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// (oldest seq in the window, newest seq + 1).
    pub fn range(&self) -> (Option<u64>, u64) {
        let chunks = self.chunks.read();
        (
            chunks.front().map(|c| c.seq),
            chunks.back().map_or(0, |c| c.seq + 1),
        )
    }

    /// Newest sequence number in the window.
    pub fn newest_seq(&self) -> Option<u64> {
        let chunks = self.chunks.read();
        chunks.back().map(|c| c.seq)
    }

    /// Sequence number the next ingested chunk should get (numbering continues when
    /// an ingest is restarted).
    pub fn next_seq(&self) -> u64 {
        self.range().1
    }

    /// Adds a chunk, evicts what left the window, wakes the viewers.
    pub fn push(&self, chunk: Chunk) {
        let seq = chunk.seq;
        {
            let mut chunks = self.chunks.write();
            let mut tot = self.totals.lock();
            let len = chunk.payload.len() as u64;
            tot.duration_ms += u64::from(chunk.duration_ms);
            tot.bytes += len;
            tot.wire_bytes += wire_len(&chunk);
            self.chunks_ingested.fetch_add(1, Ordering::Relaxed);
            self.bytes_ingested.fetch_add(len, Ordering::Relaxed);
            let newest_ts = chunk.timestamp_ms;
            chunks.push_back(Arc::new(chunk));
            while chunks.len() > 1 {
                let Some(front) = chunks.front() else { break };
                let by_duration = tot.duration_ms - u64::from(front.duration_ms) >= self.window_ms;
                let by_age = newest_ts.saturating_sub(front.timestamp_ms) > 2 * self.window_ms;
                if !(by_duration || by_age) {
                    break;
                }
                tot.duration_ms -= u64::from(front.duration_ms);
                tot.bytes -= front.payload.len() as u64;
                tot.wire_bytes -= wire_len(front);
                chunks.pop_front();
            }
        }
        self.notify.send_replace(seq + 1);
    }

    /// A receiver woken on every new chunk and on stop.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.notify.send_modify(|v| *v = v.wrapping_add(0));
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Whether viewers may watch without a chunk token.
    pub fn is_public(&self) -> bool {
        self.public.load(Ordering::SeqCst)
    }

    pub fn set_public(&self, public: bool) {
        self.public.store(public, Ordering::SeqCst);
    }

    /// Wakes every viewer task without a new chunk (they re-check revocations).
    pub fn poke(&self) {
        self.notify.send_modify(|_| {});
    }

    pub fn set_health(&self, health: SourceHealth, error: impl Into<String>) {
        let mut h = self.health.lock();
        h.health = health;
        h.error = error.into();
    }

    pub fn viewers(&self) -> u32 {
        self.viewers.load(Ordering::Relaxed)
    }

    /// Counts a viewer for as long as the guard lives.
    pub fn viewer_guard(self: &Arc<Self>) -> ViewerGuard {
        self.viewers.fetch_add(1, Ordering::Relaxed);
        ViewerGuard(Arc::clone(self))
    }

    pub fn status(&self) -> BroadcastStatus {
        let (health, error) = {
            let h = self.health.lock();
            (h.health, h.error.clone())
        };
        let chunks_in_window = self.chunks.read().len();
        BroadcastStatus {
            broadcast_id: self.id.clone(),
            health,
            error,
            last_seq: self.newest_seq(),
            content_type: self.params().content_type,
            viewers: self.viewers(),
            chunks_in_window,
            bitrate_kbps: self.bitrate_kbps(),
        }
    }
}

/// Decrements the viewer count on drop.
#[derive(Debug)]
pub struct ViewerGuard(Arc<Broadcast>);

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All broadcasts on this node.
#[derive(Debug, Default)]
pub struct Registry {
    map: RwLock<HashMap<String, Arc<Broadcast>>>,
    metrics: Arc<Metrics>,
    auth: Auth,
    conns: Arc<ConnTable>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry checking tokens with `auth`.
    pub fn with_auth(auth: Auth) -> Self {
        Registry {
            auth,
            ..Self::default()
        }
    }

    /// A registry checking tokens with `auth` and counting connections against
    /// `limits`.
    pub fn with_auth_limits(auth: Auth, limits: &ConnLimits) -> Self {
        Registry {
            auth,
            conns: Arc::new(ConnTable::new(limits)),
            ..Self::default()
        }
    }

    /// Open connections per source address and not yet authenticated (node-wide).
    pub fn conns(&self) -> &Arc<ConnTable> {
        &self.conns
    }

    /// Token keys and revocations (node-wide).
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Revokes `peers` on `broadcast`: their connections (on every executor) close with
    /// `GOODBYE(REVOKED)` and their tokens are refused until they expire.
    pub fn revoke(&self, broadcast: &str, peers: &[u64], now_ms: u64) {
        if peers.is_empty() {
            return;
        }
        self.auth.revoke(broadcast, peers, now_ms);
        self.metrics.revoked(peers.len());
        if let Some(b) = self.get(broadcast) {
            b.poke();
        }
    }

    /// Node-wide counters (served on `GET /metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn get(&self, id: &str) -> Option<Arc<Broadcast>> {
        let m = self.map.read();
        m.get(id).cloned()
    }

    /// Returns the broadcast, creating it with `make` when absent.
    pub fn get_or_insert(&self, id: &str, make: impl FnOnce() -> Broadcast) -> Arc<Broadcast> {
        let mut m = self.map.write();
        Arc::clone(m.entry(id.to_owned()).or_insert_with(|| Arc::new(make())))
    }

    /// Removes and stops a broadcast (its viewers get `GOODBYE(BroadcastStopped)`).
    pub fn remove(&self, id: &str) -> Option<Arc<Broadcast>> {
        let b = {
            let mut m = self.map.write();
            m.remove(id)
        };
        if let Some(b) = &b {
            b.stop();
        }
        b
    }

    pub fn all(&self) -> Vec<Arc<Broadcast>> {
        let m = self.map.read();
        m.values().cloned().collect()
    }

    /// Viewers over all broadcasts.
    pub fn total_viewers(&self) -> u32 {
        self.all().iter().map(|b| b.viewers()).sum()
    }

    /// What `GET /metrics` renders ([`crate::metrics::render`]), sampled now.
    pub fn scrape(&self) -> Snapshot<'_> {
        let mut bs = self.all();
        bs.sort_by(|a, b| a.id().cmp(b.id()));
        let broadcasts = bs
            .iter()
            .map(|b| {
                let st = b.status();
                BroadcastSample {
                    id: b.id().to_string(),
                    viewers: st.viewers,
                    chunks_in_window: st.chunks_in_window,
                    source_state: st.health.label(),
                    chunks_ingested: b.chunks_ingested(),
                    bytes_ingested: b.bytes_ingested(),
                    reconnects: b.reconnects(),
                    bitrate_bps: b.bitrate_bps(),
                }
            })
            .collect();
        Snapshot {
            counters: &self.metrics,
            broadcasts,
            unauthenticated: u64::from(self.conns().unauthenticated()),
            addresses: self.conns().addresses() as u64,
            revoked_peers: self.auth().revoked_len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn chunk(seq: u64, bytes: usize, duration_ms: u32) -> Chunk {
        Chunk {
            seq,
            flags: starling_proto::wire::chunk_flags::RANDOM_ACCESS,
            timestamp_ms: 1_000_000 + seq * u64::from(duration_ms),
            duration_ms,
            payload: Bytes::from(vec![0u8; bytes]),
            inserted_len: 0,
            signature: Bytes::new(),
        }
    }

    fn params() -> StreamParams {
        StreamParams {
            content_type: "video/mp2t".into(),
            chunk_duration_ms: 1000,
            substreams: 4,
        }
    }

    #[test]
    fn bitrate_is_window_bytes_over_window_duration() {
        let b = Broadcast::new("b", 5_000, params());
        assert_eq!(b.bitrate_bps(), 0);
        // 1 Mbit/s: 125,000 bytes per 1 s chunk.
        for seq in 0..10 {
            b.push(chunk(seq, 125_000, 1000));
        }
        assert_eq!(b.bitrate_bps(), 1_000_000);
        assert_eq!(b.bitrate_kbps(), 1000);
        // The rate drops to 500 kbit/s: once the 5 s window holds only new chunks, the
        // average is exactly the new rate; in between it is a mix.
        b.push(chunk(10, 62_500, 1000));
        let mixed = b.bitrate_kbps();
        assert!(mixed > 500 && mixed < 1000, "{mixed}");
        for seq in 11..20 {
            b.push(chunk(seq, 62_500, 1000));
        }
        assert_eq!(b.bitrate_kbps(), 500);
        assert_eq!(b.chunks_ingested(), 20);
        assert_eq!(b.bytes_ingested(), 10 * 125_000 + 10 * 62_500);
        // A paced source of uneven chunk sizes (key frames) averages out.
        let b = Broadcast::new("c", 10_000, params());
        for seq in 0..40 {
            let bytes = if seq % 4 == 0 { 40_000 } else { 20_000 };
            b.push(chunk(seq, bytes, 500));
        }
        // 100,000 bytes per 2 s = 400 kbit/s.
        assert_eq!(b.bitrate_kbps(), 400);
        assert_eq!(b.status().bitrate_kbps, 400);
    }

    #[test]
    fn stream_rate_counts_what_a_viewer_is_sent_per_chunk() {
        let b = Broadcast::new("b", 5_000, params());
        assert_eq!(b.stream_kbps(), 0);
        // 250 ms chunks of 2,000 payload bytes (64 kbit/s) with a 100-byte signature
        // block: 8 + 20 + 2 + 100 bytes of framing each, 4 chunks a second.
        for seq in 0..40 {
            let mut c = chunk(seq, 2_000, 250);
            c.signature = Bytes::from(vec![7u8; 100]);
            b.push(c);
        }
        assert_eq!(b.bitrate_kbps(), 64);
        let framed_bits = (2_000 + 8 + 20 + 2 + 100) * 8 * 4;
        assert_eq!(b.stream_kbps(), (framed_bits + 500) / 1000);
        // Unsigned chunks carry no signature block (nor its length field).
        let b = Broadcast::new("c", 5_000, params());
        for seq in 0..8 {
            b.push(chunk(seq, 1_000, 1000));
        }
        assert_eq!(b.stream_kbps(), ((1_000 + 28) * 8 + 500) / 1000);
    }

    #[test]
    fn live_start_goes_back_to_a_random_access_chunk() {
        let b = Broadcast::new("b", 10_000, params());
        // 250 ms chunks; random access every 3rd (seq 0, 3, 6, 9).
        for seq in 0..11 {
            let mut c = chunk(seq, 10, 250);
            if seq % 3 != 0 {
                c.flags = 0;
            }
            b.push(c);
        }
        let first = |behind_ms| match Cursor::live_behind(3, behind_ms).next(&b) {
            Next::Chunk(c, _) => c.seq,
            _ => panic!("no chunk"),
        };
        // Live: the newest random-access chunk (9: 500 ms of media to the edge).
        assert_eq!(first(0), 9);
        assert_eq!(first(500), 9);
        // 1 s back: seq 7 begins 1000 ms behind the edge but is no random-access
        // chunk; seq 6 (1250 ms) is.
        assert_eq!(first(1000), 6);
        assert_eq!(first(1250), 6);
        assert_eq!(first(1300), 3);
        // More than the window holds: the newest random-access chunk.
        assert_eq!(first(60_000), 9);
        // `live` is `live_behind(0)`.
        assert!(matches!(Cursor::live(3).next(&b), Next::Chunk(c, _) if c.seq == 9));
    }

    #[test]
    fn chunk_lookup_and_substreams() {
        let b = Broadcast::new("b", 3_000, params());
        for seq in 0..6 {
            b.push(chunk(seq, 10, 1000));
        }
        assert!(b.chunk(0).is_none(), "evicted");
        assert_eq!(b.chunk(5).map(|c| c.seq), Some(5));
        assert!(b.chunk(6).is_none(), "not cut yet");
        assert!(b.chunk(u64::MAX).is_none());
        assert_eq!(b.substreams(), 4);
        b.set_params(|p| p.substreams = 0);
        assert_eq!(b.substreams(), 1, "clamped");
    }
}
