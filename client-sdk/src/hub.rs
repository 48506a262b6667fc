//! Fan-out of the in-order stream to local consumers (byte-stream subscribers and HTTP
//! clients), with a short history so that a new consumer starts at the newest random
//! access chunk instead of waiting for the next one.
//!
//! Every consumer has its own bounded queue. Publishing never waits: when a consumer's
//! queue is full, that consumer loses chunks until the next random-access chunk that
//! fits (so its output stays decodable) and the drop is counted. A consumer that stops
//! reading therefore holds at most `queue_chunks` chunks and never slows the others.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use parking_lot::Mutex;
use starling_proto::wire::Chunk;
use tokio::sync::mpsc;

/// History and queue bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HubLimits {
    pub history_chunks: usize,
    pub history_bytes: usize,
    pub queue_chunks: usize,
}

struct Consumer {
    tx: mpsc::Sender<Bytes>,
    waiting_rap: bool,
    drops: Arc<AtomicU64>,
}

struct Inner {
    history: VecDeque<Chunk>,
    history_bytes: usize,
    consumers: Vec<Consumer>,
    content_type: Option<String>,
    closed: bool,
}

pub(crate) struct Hub {
    limits: HubLimits,
    inner: Mutex<Inner>,
    /// Chunks a consumer lost because it did not keep up (summed over consumers).
    pub(crate) consumer_drops: AtomicU64,
}

impl Hub {
    pub(crate) fn new(limits: HubLimits) -> Hub {
        Hub {
            limits: HubLimits {
                history_chunks: limits.history_chunks.max(1),
                history_bytes: limits.history_bytes,
                queue_chunks: limits.queue_chunks.max(1),
            },
            inner: Mutex::new(Inner {
                history: VecDeque::new(),
                history_bytes: 0,
                consumers: Vec::new(),
                content_type: None,
                closed: false,
            }),
            consumer_drops: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_content_type(&self, ct: &str) {
        if ct.is_empty() {
            return;
        }
        let mut g = self.inner.lock();
        if g.content_type.as_deref() != Some(ct) {
            g.content_type = Some(ct.to_string());
        }
    }

    pub(crate) fn content_type(&self) -> Option<String> {
        self.inner.lock().content_type.clone()
    }

    /// Adds a consumer. It starts with the history from the newest random-access chunk
    /// (or, if there is none, with the next random-access chunk published).
    pub(crate) fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::channel(self.limits.queue_chunks);
        let drops = Arc::new(AtomicU64::new(0));
        let mut g = self.inner.lock();
        if g.closed {
            drop(tx);
            return Subscription { rx, drops };
        }
        let mut waiting_rap = true;
        if let Some(start) = g.history.iter().rposition(|c| c.is_random_access()) {
            // Keep the newest part if the backlog from the RAP does not fit the queue:
            // then wait for the next RAP instead (a partial GOP would not decode).
            let backlog = g.history.len() - start;
            if backlog <= self.limits.queue_chunks {
                for c in g.history.iter().skip(start) {
                    // Cannot fail: the queue is fresh and large enough.
                    let _ = tx.try_send(c.payload.clone());
                }
                waiting_rap = false;
            }
        }
        g.consumers.push(Consumer {
            tx,
            waiting_rap,
            drops: drops.clone(),
        });
        Subscription { rx, drops }
    }

    /// Publishes the next in-order chunk to every consumer.
    pub(crate) fn publish(&self, chunk: Chunk) {
        let mut g = self.inner.lock();
        if g.closed {
            return;
        }
        let rap = chunk.is_random_access();
        let mut dropped = 0;
        g.consumers.retain_mut(|c| {
            if c.waiting_rap && !rap {
                return !c.tx.is_closed();
            }
            match c.tx.try_send(chunk.payload.clone()) {
                Ok(()) => {
                    c.waiting_rap = false;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if !c.waiting_rap {
                        c.drops.fetch_add(1, Ordering::Relaxed);
                        dropped += 1;
                    }
                    c.waiting_rap = true;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if dropped > 0 {
            self.consumer_drops.fetch_add(dropped, Ordering::Relaxed);
        }
        g.history_bytes += chunk.payload.len();
        g.history.push_back(chunk);
        while g.history.len() > self.limits.history_chunks
            || (g.history_bytes > self.limits.history_bytes && g.history.len() > 1)
        {
            if let Some(old) = g.history.pop_front() {
                g.history_bytes -= old.payload.len();
            }
        }
    }

    /// The stream jumped: consumers resume at the next random-access chunk, and the
    /// history (which would splice both sides of the jump) is dropped.
    pub(crate) fn discontinuity(&self) {
        let mut g = self.inner.lock();
        g.history.clear();
        g.history_bytes = 0;
        for c in &mut g.consumers {
            c.waiting_rap = true;
        }
    }

    /// Ends every consumer's stream (after it drains its queue).
    pub(crate) fn close(&self) {
        let mut g = self.inner.lock();
        g.closed = true;
        g.consumers.clear();
        g.history.clear();
        g.history_bytes = 0;
    }

    pub(crate) fn consumers(&self) -> usize {
        let mut g = self.inner.lock();
        g.consumers.retain(|c| !c.tx.is_closed());
        g.consumers.len()
    }
}

/// An in-order byte stream of the broadcast, starting at a random access chunk.
///
/// Each item is one chunk's payload; concatenated they are the media stream (e.g.
/// MPEG-TS), ready for any demuxer. The stream ends (`None`) when the viewer stops.
/// If this consumer falls more than the queue bound behind, it skips to the next
/// random-access chunk; [`Subscription::dropped`] counts how often.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Bytes>,
    drops: Arc<AtomicU64>,
}

impl Subscription {
    /// The next piece of the stream, or `None` once the viewer has stopped.
    pub async fn next_bytes(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// The next piece if one is queued now (`None` if not, or if the stream ended).
    pub fn try_next_bytes(&mut self) -> Option<Bytes> {
        self.rx.try_recv().ok()
    }

    /// How many times this consumer fell behind and skipped to a random-access chunk.
    pub fn dropped(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
    }

    pub(crate) fn poll_bytes(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.rx.poll_recv(cx)
    }
}

impl futures_util::Stream for Subscription {
    type Item = Bytes;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.get_mut().poll_bytes(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use starling_proto::wire::chunk_flags;

    fn chunk(seq: u64, rap: bool) -> Chunk {
        Chunk {
            seq,
            flags: if rap { chunk_flags::RANDOM_ACCESS } else { 0 },
            timestamp_ms: 0,
            duration_ms: 0,
            signature: Bytes::new(),
            payload: Bytes::from(format!("[{seq}]")),
        }
    }

    fn hub(queue: usize) -> Hub {
        Hub::new(HubLimits {
            history_chunks: 8,
            history_bytes: 1 << 20,
            queue_chunks: queue,
        })
    }

    fn collect(s: &mut Subscription) -> String {
        let mut out = String::new();
        while let Ok(b) = s.rx.try_recv() {
            out.push_str(std::str::from_utf8(&b).unwrap());
        }
        out
    }

    #[test]
    fn late_subscriber_starts_at_newest_rap() {
        let h = hub(16);
        for s in 0..6 {
            h.publish(chunk(s, s % 3 == 0));
        }
        let mut sub = h.subscribe();
        h.publish(chunk(6, true));
        assert_eq!(collect(&mut sub), "[3][4][5][6]");
    }

    #[test]
    fn subscriber_without_rap_waits_for_one() {
        let h = hub(16);
        h.publish(chunk(0, false));
        let mut sub = h.subscribe();
        h.publish(chunk(1, false));
        h.publish(chunk(2, true));
        h.publish(chunk(3, false));
        assert_eq!(collect(&mut sub), "[2][3]");
    }

    #[test]
    fn slow_consumer_drops_to_next_rap_and_does_not_block_others() {
        let h = hub(2);
        let mut slow = h.subscribe();
        let mut fast = h.subscribe();
        let mut fast_out = String::new();
        for s in 0..10 {
            h.publish(chunk(s, s % 4 == 0));
            fast_out.push_str(&collect(&mut fast));
        }
        assert_eq!(fast_out, "[0][1][2][3][4][5][6][7][8][9]");
        // slow got 0,1; lost 2 (counted), waited for RAP 4 (queue still full), then 8.
        assert_eq!(collect(&mut slow), "[0][1]");
        assert_eq!(slow.dropped(), 1);
        for s in 10..14 {
            h.publish(chunk(s, s == 12));
            fast_out.push_str(&collect(&mut fast));
        }
        assert_eq!(collect(&mut slow), "[12][13]");
        assert_eq!(fast.dropped(), 0, "fast");
        assert_eq!(slow.dropped(), 1, "slow");
        assert_eq!(h.consumer_drops.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn discontinuity_and_close() {
        let h = hub(16);
        let mut sub = h.subscribe();
        h.publish(chunk(0, true));
        h.publish(chunk(1, false));
        h.discontinuity();
        h.publish(chunk(7, false));
        h.publish(chunk(8, true));
        assert_eq!(collect(&mut sub), "[0][1][8]");
        h.close();
        assert!(matches!(
            sub.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(h.consumers(), 0);
    }
}
