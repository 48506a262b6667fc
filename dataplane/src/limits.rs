//! Limits that keep one hostile client from hurting everyone else, as pure state: no
//! sockets and no clock inside (`now` is passed in), so they are tested
//! deterministically.
//!
//! * [`ConnTable`]: the node-wide count of open connections (wire and HTTP) per source
//!   address ([`addr_key`]: an IPv4 address, or an IPv6 /64) and of connections not yet
//!   authenticated (a wire connection until its `SUBSCRIBE` and token are accepted, an
//!   HTTP connection until its `GET /live/{id}` is admitted). One mutex shared by every
//!   executor, taken only when a connection opens, authenticates and closes.
//!   [`Slot`] is the RAII share of one connection.
//! * [`TokenBucket`]: a per-connection rate limit (`REQUEST`s, `TOKEN` renewals), as
//!   GCRA: one theoretical arrival time, integer arithmetic.
//! * [`LogGate`]: at most one log line per interval for refusals an attacker can cause
//!   en masse, with the count of lines suppressed since the last one.

use crate::config::{ConnLimits, RateLimit};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a new connection was refused (the wire answers `ERROR(SERVER_BUSY)`, HTTP
/// `503`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The node holds `max_unauthenticated` connections not yet authenticated.
    #[error("too many connections not yet subscribed on this node")]
    Unauthenticated,
    /// This address holds `max_unauthenticated_per_address` of them.
    #[error("too many connections not yet subscribed from this address")]
    AddressUnauthenticated,
    /// This address holds `max_per_address` connections.
    #[error("too many connections from this address")]
    Address,
}

impl Refused {
    /// Every refusal, in metric order.
    pub const ALL: [Refused; 3] = [
        Refused::Unauthenticated,
        Refused::AddressUnauthenticated,
        Refused::Address,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Unauthenticated => "unauthenticated",
            Refused::AddressUnauthenticated => "address_unauthenticated",
            Refused::Address => "address",
        }
    }
}

/// The address a connection is counted under: IPv4 addresses as they are (IPv4-mapped
/// IPv6 included), IPv6 addresses by their /64 (one subscriber line usually holds a
/// whole /64).
pub fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct AddrCount {
    open: u32,
    unauthenticated: u32,
}

#[derive(Debug, Default)]
struct TableState {
    unauthenticated: u32,
    by_addr: HashMap<IpAddr, AddrCount>,
}

/// Node-wide connection counts (see the module docs). Entries of addresses without
/// connections are removed, so the map never holds more than the open connections.
#[derive(Debug)]
pub struct ConnTable {
    max_unauthenticated: u32,
    max_unauthenticated_per_address: u32,
    max_per_address: u32,
    state: Mutex<TableState>,
}

impl Default for ConnTable {
    fn default() -> Self {
        ConnTable::new(&ConnLimits::default())
    }
}

impl ConnTable {
    pub fn new(limits: &ConnLimits) -> ConnTable {
        ConnTable {
            max_unauthenticated: limits.max_unauthenticated,
            max_unauthenticated_per_address: limits.max_unauthenticated_per_address,
            max_per_address: limits.max_per_address,
            state: Mutex::new(TableState::default()),
        }
    }

    /// Counts a new, not yet authenticated connection from `ip`, or says why it must be
    /// refused (then nothing is counted).
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let key = addr_key(ip);
        let mut st = self.state.lock();
        let c = st.by_addr.get(&key).copied().unwrap_or_default();
        if c.open >= self.max_per_address {
            return Err(Refused::Address);
        }
        if c.unauthenticated >= self.max_unauthenticated_per_address {
            return Err(Refused::AddressUnauthenticated);
        }
        if st.unauthenticated >= self.max_unauthenticated {
            return Err(Refused::Unauthenticated);
        }
        st.unauthenticated += 1;
        let e = st.by_addr.entry(key).or_default();
        e.open += 1;
        e.unauthenticated += 1;
        Ok(Slot {
            table: Arc::clone(self),
            key,
            authenticated: false,
        })
    }

    fn authenticate(&self, key: IpAddr) {
        let mut st = self.state.lock();
        st.unauthenticated = st.unauthenticated.saturating_sub(1);
        if let Some(e) = st.by_addr.get_mut(&key) {
            e.unauthenticated = e.unauthenticated.saturating_sub(1);
        }
    }

    fn close(&self, key: IpAddr, authenticated: bool) {
        let mut st = self.state.lock();
        if !authenticated {
            st.unauthenticated = st.unauthenticated.saturating_sub(1);
        }
        if let Some(e) = st.by_addr.get_mut(&key) {
            e.open = e.open.saturating_sub(1);
            if !authenticated {
                e.unauthenticated = e.unauthenticated.saturating_sub(1);
            }
            if e.open == 0 {
                st.by_addr.remove(&key);
            }
        }
    }

    /// Connections not yet authenticated, node-wide.
    pub fn unauthenticated(&self) -> u32 {
        self.state.lock().unauthenticated
    }

    /// Source addresses (keys) with at least one open connection.
    pub fn addresses(&self) -> usize {
        self.state.lock().by_addr.len()
    }

    /// Open connections counted under `ip`'s key.
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.state
            .lock()
            .by_addr
            .get(&addr_key(ip))
            .map_or(0, |c| c.open)
    }
}

/// One open connection's share of the [`ConnTable`]; released when dropped.
#[derive(Debug)]
pub struct Slot {
    table: Arc<ConnTable>,
    key: IpAddr,
    authenticated: bool,
}

impl Slot {
    /// The connection is authenticated (subscribed, token accepted): it no longer counts
    /// against the unauthenticated caps. Idempotent.
    pub fn authenticate(&mut self) {
        if !self.authenticated {
            self.authenticated = true;
            self.table.authenticate(self.key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.close(self.key, self.authenticated);
    }
}

/// A per-connection rate limit: up to `burst` events at once, then one per `interval`
/// (GCRA: `tat` is when the bucket would be full again).
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    interval: Duration,
    /// `burst × interval`: how far `tat` may run ahead of `now`.
    tolerance: Duration,
    tat: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`. A burst of 0 is taken as 1.
    pub fn new(rate: RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            interval: rate.interval,
            tolerance: rate.interval.saturating_mul(rate.burst.max(1)),
            tat: now,
        }
    }

    /// Takes one token at `now`; `false` (and nothing taken) when the bucket is empty.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let start = self.tat.max(now);
        let Some(next) = start.checked_add(self.interval) else {
            return false;
        };
        if next.saturating_duration_since(now) > self.tolerance {
            return false;
        }
        self.tat = next;
        true
    }
}

/// At most one log line per `interval` (node-wide, lock-free) for one kind of refusal.
#[derive(Debug)]
pub struct LogGate {
    interval_ms: u64,
    /// Unix ms from which the next line may be logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogGate {
    pub const fn new(interval: Duration) -> LogGate {
        LogGate {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log an event at `now_ms`: `Some(n)` with the events not logged since
    /// the last line, or `None` (counted as suppressed).
    pub fn check(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(unauth: u32, unauth_addr: u32, addr: u32) -> ConnLimits {
        ConnLimits {
            max_unauthenticated: unauth,
            max_unauthenticated_per_address: unauth_addr,
            max_per_address: addr,
            ..ConnLimits::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unauthenticated_cap_per_address_then_node_wide() {
        let t = Arc::new(ConnTable::new(&limits(5, 3, 100)));
        let a: Vec<_> = (0..3).map(|_| t.open(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(
            t.open(ip("10.0.0.1")).unwrap_err(),
            Refused::AddressUnauthenticated
        );
        let b: Vec<_> = (0..2).map(|_| t.open(ip("10.0.0.2")).unwrap()).collect();
        assert_eq!(t.unauthenticated(), 5);
        assert_eq!(
            t.open(ip("10.0.0.3")).unwrap_err(),
            Refused::Unauthenticated
        );
        // Authenticating frees an unauthenticated place (node-wide and per address).
        let mut a = a;
        a[0].authenticate();
        a[0].authenticate();
        assert_eq!(t.unauthenticated(), 4);
        let c = t.open(ip("10.0.0.1")).unwrap();
        assert_eq!(t.open_from(ip("10.0.0.1")), 4);
        drop(c);
        drop(a);
        drop(b);
        assert_eq!(t.unauthenticated(), 0);
        assert_eq!(t.addresses(), 0, "entries of closed addresses are removed");
    }

    #[test]
    fn per_address_cap_counts_authenticated_connections_too() {
        let t = Arc::new(ConnTable::new(&limits(100, 100, 3)));
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = t.open(ip("10.0.0.1")).unwrap();
            s.authenticate();
            held.push(s);
        }
        assert_eq!(t.open(ip("10.0.0.1")).unwrap_err(), Refused::Address);
        assert!(
            t.open(ip("10.0.0.2")).is_ok(),
            "other addresses are not affected"
        );
        held.pop();
        assert!(
            t.open(ip("10.0.0.1")).is_ok(),
            "a closed one frees its place"
        );
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(addr_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(addr_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        let t = Arc::new(ConnTable::new(&limits(100, 100, 2)));
        let _a = t.open(ip("2001:db8:1:2::1")).unwrap();
        let _b = t.open(ip("2001:db8:1:2::ffff")).unwrap();
        assert_eq!(
            t.open(ip("2001:db8:1:2:ab::1")).unwrap_err(),
            Refused::Address
        );
        assert!(t.open(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn token_bucket_burst_then_rate() {
        let t0 = Instant::now();
        let rate = RateLimit {
            burst: 4,
            interval: Duration::from_millis(100),
        };
        let mut b = TokenBucket::new(rate, t0);
        for _ in 0..4 {
            assert!(b.try_take(t0));
        }
        assert!(!b.try_take(t0), "burst exhausted");
        assert!(!b.try_take(t0 + Duration::from_millis(99)));
        assert!(
            b.try_take(t0 + Duration::from_millis(100)),
            "one per interval"
        );
        assert!(!b.try_take(t0 + Duration::from_millis(150)));
        // Refused attempts cost nothing; a long pause refills up to the burst only.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..4 {
            assert!(b.try_take(later));
        }
        assert!(!b.try_take(later));
        // Steady flow at the rate is always allowed.
        let mut now = later;
        for _ in 0..1000 {
            now += Duration::from_millis(100);
            assert!(b.try_take(now));
        }
    }

    #[test]
    fn token_bucket_zero_burst_allows_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            RateLimit {
                burst: 0,
                interval: Duration::from_secs(1),
            },
            t0,
        );
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
    }

    #[test]
    fn log_gate_one_line_per_interval_with_suppressed_count() {
        let g = LogGate::new(Duration::from_secs(1));
        assert_eq!(g.check(10_000), Some(0));
        assert_eq!(g.check(10_001), None);
        assert_eq!(g.check(10_999), None);
        assert_eq!(g.check(11_000), Some(2));
        assert_eq!(g.check(11_500), None);
        assert_eq!(g.check(20_000), Some(1));
    }
}
