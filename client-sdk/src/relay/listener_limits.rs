//! Limits of the peer listener and of the links it accepts ([`PeerLimits`]), and the
//! small state machines that enforce them: the table of handshakes in progress
//! ([`Handshakes`], a cap with eviction of the oldest) and the per-link budget of
//! `REQUEST`s a remote peer may send ([`RequestBucket`]).
//!
//! What a peer that connects to us can make us hold before we admit it (a valid token
//! in `HELLO`, then `SUBSCRIBE` for our broadcast, accepted by the engine): only control
//! frames (8 KiB each: a `CHUNK` header of any length closes the link with
//! `ERROR(FRAME_TOO_LARGE)` before its payload is read), for at most
//! [`PeerLimits::handshake_timeout`], on at most [`PeerLimits::max_handshakes`]
//! connections at once. A handshake beyond that cap evicts the oldest one: an honest
//! peer's handshake takes one round trip, so stalled connections cannot keep honest
//! children out (they would if new connections were refused instead).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use starling_proto::wire::Frame;
use tokio::sync::oneshot;

use super::Engine;
use super::link::LinkId;

/// Limits on the connections other peers open to this viewer's peer listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerLimits {
    /// From accepting a connection to its `SUBSCRIBE`: a connection that has not
    /// completed `HELLO` and `SUBSCRIBE` by then gets `ERROR(IDLE_TIMEOUT)` and is
    /// closed (pings do not extend it). Default 10 s (as the data plane's).
    pub handshake_timeout: Duration,
    /// Most connections in their handshake at once; one more evicts the oldest (it gets
    /// `ERROR(SERVER_BUSY)`). Default 16.
    pub max_handshakes: usize,
    /// Most accepted connections alive at once (children, neighbours and handshakes);
    /// beyond it new connections are closed at once. Default 256.
    pub max_incoming: usize,
    /// `REQUEST`s a peer may send on one link per second, on average; requests beyond
    /// the budget are answered `NOT_FOUND` without looking (the requester asks
    /// elsewhere). Default 16/s: a neighbour asks for chunks it misses near their
    /// deadline, a few per second at most.
    pub requests_per_s: f64,
    /// Requests a link may send in a burst on top of the rate. Default 64 (a neighbour
    /// that just lost its parents repairs a window's worth at once).
    pub request_burst: f64,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 16,
            max_incoming: 256,
            requests_per_s: 16.0,
            request_burst: 64.0,
        }
    }
}

impl PeerLimits {
    /// Checks the values (zero caps and timeouts would refuse every peer).
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.handshake_timeout.is_zero() {
            return Err("peer handshake timeout must be > 0");
        }
        if self.max_handshakes == 0 || self.max_incoming == 0 {
            return Err("peer connection caps must be > 0");
        }
        let rate_ok = self.requests_per_s.is_finite() && self.requests_per_s >= 0.0;
        let burst_ok = self.request_burst.is_finite() && self.request_burst >= 1.0;
        if !(rate_ok && burst_ok) {
            return Err("peer request rate must be >= 0 and the burst >= 1");
        }
        Ok(())
    }
}

/// Handshakes in progress, oldest first, each with the sender whose drop cancels it.
#[derive(Debug)]
pub(crate) struct Handshakes {
    max: usize,
    next_id: u64,
    live: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Handshakes {
    pub(crate) fn new(max: usize) -> Handshakes {
        Handshakes {
            max: max.max(1),
            next_id: 0,
            live: VecDeque::new(),
        }
    }

    /// Registers a new handshake: its id and the receiver that resolves when it is
    /// evicted. Evicts (cancels) the oldest ones beyond the cap; returns how many.
    pub(crate) fn start(&mut self) -> (u64, oneshot::Receiver<()>, usize) {
        let mut evicted = 0;
        while self.live.len() >= self.max {
            // Dropping the sender wakes that handshake's receiver: it closes.
            self.live.pop_front();
            evicted += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.live.push_back((id, tx));
        (id, rx, evicted)
    }

    /// The handshake `id` ended (either way).
    pub(crate) fn finish(&mut self, id: u64) {
        self.live.retain(|(i, _)| *i != id);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }
}

/// A token bucket of `REQUEST`s for one link (sans-IO: the caller passes `now`).
#[derive(Debug, Clone)]
pub(crate) struct RequestBucket {
    tokens: f64,
    last: Option<Instant>,
}

impl RequestBucket {
    /// Starts full.
    pub(crate) fn new(limits: &PeerLimits) -> RequestBucket {
        RequestBucket {
            tokens: limits.request_burst,
            last: None,
        }
    }

    /// Whether one more request at `now` is within the budget (then it is spent).
    pub(crate) fn allow(&mut self, limits: &PeerLimits, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * limits.requests_per_s).min(limits.request_burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Engine {
    /// A peer's `REQUEST`: answered by the scheduler within the link's request budget,
    /// with `NOT_FOUND` unseen beyond it.
    pub(super) fn on_request(&mut self, l: LinkId, seq: u64) {
        let limits = self.peer_limits;
        let Some(link) = self.links.get_mut(&l) else {
            return;
        };
        let allowed = link
            .request_bucket
            .get_or_insert_with(|| RequestBucket::new(&limits))
            .allow(&limits, Instant::now());
        if allowed {
            let now = self.now();
            self.peer.handle_request(l, seq, now);
        } else {
            self.shared.stats_mut().peer_requests_refused += 1;
            self.send_to(l, &Frame::NotFound(seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_handshake_is_evicted_beyond_the_cap() {
        let mut h = Handshakes::new(2);
        let (a, mut ra, e) = h.start();
        assert_eq!(e, 0);
        let (_b, mut rb, _) = h.start();
        assert!(
            ra.try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        let (_c, _rc, e) = h.start();
        assert_eq!(e, 1);
        assert_eq!(
            ra.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the oldest is cancelled"
        );
        assert_eq!(rb.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        h.finish(a);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn requests_beyond_the_burst_wait_for_the_rate() {
        let limits = PeerLimits {
            requests_per_s: 2.0,
            request_burst: 3.0,
            ..PeerLimits::default()
        };
        let mut b = RequestBucket::new(&limits);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.allow(&limits, t0)));
        assert!(!b.allow(&limits, t0));
        assert!(b.allow(&limits, t0 + Duration::from_millis(500)));
        assert!(!b.allow(&limits, t0 + Duration::from_millis(500)));
        // Refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.allow(&limits, later)));
        assert!(!b.allow(&limits, later));
    }

    #[test]
    fn defaults_are_valid_and_zero_caps_are_not() {
        assert!(PeerLimits::default().validate().is_ok());
        let bad = PeerLimits {
            max_handshakes: 0,
            ..PeerLimits::default()
        };
        assert!(bad.validate().is_err());
    }
}
