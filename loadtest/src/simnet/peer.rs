//! One simulated viewer around its grid [`Node`]: the chunk bytes it holds (shared
//! [`Bytes`], never copied), the check of everything it plays, and its figures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use starling_grid::peer::LatencySummary;
use starling_grid::sim::Node;

use crate::pattern::{OutputCheck, Pattern};

use super::msg::SimChunk;
use super::reports::ViewerFigures;

/// Where a simulated viewer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Join sent, no answer yet.
    Joining,
    /// Joined and playing.
    Active,
    /// Left on purpose.
    Left,
    /// Its join failed, or the control plane ended its session.
    Failed,
}

/// One simulated viewer.
#[derive(Debug)]
pub struct SimPeer {
    /// Local index (the fabric's `Vec` position; global index = offset + this).
    pub index: usize,
    /// Declared relay budget, kbit/s.
    pub upload_kbps: u32,
    /// Its node, once joined.
    pub node: Option<Node>,
    /// Phase.
    pub phase: Phase,
    /// Chunks held, by sequence number (exactly those its `Peer` holds).
    pub store: BTreeMap<u64, Arc<SimChunk>>,
    /// The check of its played bytes.
    pub check: OutputCheck,
    /// When the join was sent, fabric time.
    pub join_sent: Duration,
    /// When the join was answered.
    pub joined: Option<Duration>,
    /// When it left.
    pub left: Option<Duration>,
    /// When the join call took (control-plane round trip), ms.
    pub join_rpc_ms: Option<u64>,
    /// First play after the join was sent.
    pub startup: Option<Duration>,
    /// Payload bytes received from the data plane (new chunks only).
    pub payload_from_server: u64,
    /// Payload bytes received from peers (new chunks only).
    pub payload_from_peers: u64,
    /// Payload bytes sent to peers.
    pub payload_uploaded: u64,
    /// Frame bytes sent to peers.
    pub wire_uploaded: u64,
    /// Chunks played without bytes (a fabric bug if ever non-zero).
    pub played_without_bytes: u64,
    /// Lag behind live at each sample.
    pub lag: LatencySummary,
    /// Parent changes received.
    pub parent_changes: u64,
    /// Its session's view of its figures (real control plane only).
    pub bytes: Option<Arc<ViewerFigures>>,
}

impl SimPeer {
    /// A viewer whose join is being sent at `now`.
    pub fn new(index: usize, upload_kbps: u32, now: Duration) -> SimPeer {
        SimPeer {
            index,
            upload_kbps,
            node: None,
            phase: Phase::Joining,
            store: BTreeMap::new(),
            check: OutputCheck::default(),
            join_sent: now,
            joined: None,
            left: None,
            join_rpc_ms: None,
            startup: None,
            payload_from_server: 0,
            payload_from_peers: 0,
            payload_uploaded: 0,
            wire_uploaded: 0,
            played_without_bytes: 0,
            lag: LatencySummary::default(),
            parent_changes: 0,
            bytes: None,
        }
    }

    /// Joined and not gone.
    pub fn active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// Publishes its figures to its session (for its quality reports); `chunk_ms`: the
    /// chunk duration (a skipped chunk is that long a stall).
    pub fn publish(&self, chunk_ms: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let (Some(f), Some(n)) = (&self.bytes, &self.node) else {
            return;
        };
        let st = n.peer.stats();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let buffered = n
            .peer
            .play_next()
            .map_or(0, |p| self.store.range(p..).count() as u64);
        f.startup_ms
            .store(self.startup.map_or(0, |d| ms(d).max(1)), Relaxed);
        f.stalls.store(n.stalls, Relaxed);
        f.stall_ms
            .store(st.skipped.saturating_mul(chunk_ms), Relaxed);
        f.lag_ms.store(n.lag_us.map_or(0, |l| l / 1000), Relaxed);
        f.buffer_ms
            .store(buffered.saturating_mul(chunk_ms), Relaxed);
        f.parent_changes.store(self.parent_changes, Relaxed);
        f.peers.store(n.peer_links() as u64, Relaxed);
        f.chunks_played.store(st.played, Relaxed);
        f.chunks_skipped.store(st.skipped, Relaxed);
    }

    /// Keeps the bytes of a chunk its node took as new.
    pub fn keep(&mut self, chunk: Arc<SimChunk>) {
        self.store.insert(chunk.seq, chunk);
    }

    /// Drops the bytes its `Peer` no longer holds (from the oldest on).
    pub fn prune(&mut self) {
        let Some(node) = &self.node else { return };
        while let Some((&first, _)) = self.store.first_key_value() {
            if node.peer.has(first) {
                break;
            }
            self.store.pop_first();
        }
    }

    /// Chunk `seq` was played at `now`: its bytes go through the check.
    /// Its lag is `now` − the chunk's cut time (`origin_unix_ms` is the fabric's
    /// origin on the chunks' clock).
    pub fn played(
        &mut self,
        seq: u64,
        pattern: Option<&Pattern>,
        origin_unix_ms: u64,
        now: Duration,
    ) {
        if self.startup.is_none() {
            self.startup = Some(now.saturating_sub(self.join_sent));
        }
        if let (Some(c), Some(n)) = (self.store.get(&seq), self.node.as_mut()) {
            let cut = Duration::from_millis(c.cut_ms.saturating_sub(origin_unix_ms));
            n.lag_us = Some(u64::try_from(now.saturating_sub(cut).as_micros()).unwrap_or(u64::MAX));
        }
        match (self.store.get(&seq), pattern) {
            (Some(c), Some(p)) => self.check.feed(p, &c.payload),
            (Some(_), None) => {}
            (None, _) => self.played_without_bytes += 1,
        }
    }
}
