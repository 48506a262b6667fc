//! Flood limits of the viewer API, as pure state machines taking `now` (issue 13,
//! item 8): per-address token buckets ([`RateLimiter`], for `Join` and for database
//! look-ups of sessions this process does not know) and a bounded negative cache of
//! unknown session ids ([`UnknownSessions`]), and the flash-crowd admission of joins
//! ([`JoinBacklog`]). All tables are bounded; nothing here reads a clock or does I/O.
//!
//! Addresses are keyed by [`addr_key`]: an IPv4 address (IPv4-mapped IPv6 included)
//! as itself, an IPv6 address by its /64 (one subscriber's usual allocation), so a
//! client with a whole IPv6 prefix is still one address here.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

/// Default sustained `Join` rate per address (joins per second).
pub const DEFAULT_JOIN_RATE: f64 = 20.0;
/// Default `Join` burst per address.
pub const DEFAULT_JOIN_BURST: u32 = 200;
/// Default sustained rate of database look-ups for sessions this process does not know
/// (heartbeats, leaves, reports after a restart), per address and second.
pub const DEFAULT_UNKNOWN_SESSION_RATE: f64 = 20.0;
/// Default burst of such look-ups per address.
pub const DEFAULT_UNKNOWN_SESSION_BURST: u32 = 100;
/// Default most addresses tracked by one limiter.
pub const DEFAULT_MAX_ADDRESSES: usize = 65_536;
/// Default most session ids in the negative cache.
pub const DEFAULT_UNKNOWN_SESSIONS_MAX: usize = 65_536;
/// Default time a session id stays in the negative cache.
pub const DEFAULT_UNKNOWN_SESSIONS_TTL: Duration = Duration::from_secs(600);
/// Default most joins in flight (queued for or being processed) before new ones are
/// refused: far above what 64 concurrent callers can hold, far below what would make a
/// flash crowd wait for seconds.
pub const DEFAULT_JOINS_IN_FLIGHT: usize = 2048;
/// Shortest retry delay told to a join refused for the backlog.
pub const MIN_JOIN_RETRY: Duration = Duration::from_millis(100);
/// Longest retry delay told to a join refused for the backlog.
pub const MAX_JOIN_RETRY: Duration = Duration::from_secs(10);
/// Join rate assumed before any was measured (and the floor of the estimate), per s.
const MIN_JOIN_RATE: f64 = 200.0;

/// The address a limit is kept for: IPv4 (also when IPv4-mapped) as is, IPv6 by /64.
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

/// A token-bucket limit: one token every `interval`, at most `burst` banked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Time to earn one token (`ZERO` turns the limit off).
    pub interval: Duration,
    /// Most requests accepted at once after a quiet period (≥ 1).
    pub burst: u32,
}

impl RateLimit {
    /// `rate` requests per second sustained (0, negative or not finite: no limit).
    pub fn per_second(rate: f64, burst: u32) -> Self {
        let interval = if rate > 0.0 && rate.is_finite() {
            Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX)
        } else {
            Duration::ZERO
        };
        RateLimit { interval, burst }
    }

    /// Whether the limit is on.
    pub fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    /// Tokens earned per second.
    fn rate(&self) -> f64 {
        1.0 / self.interval.as_secs_f64()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Duration,
}

/// Per-address token buckets, at most `max_addresses` of them. When the table is full,
/// buckets that refilled completely (equivalent to no entry) are dropped first, then
/// the least recently used one.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    max_addresses: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// An empty limiter (`max_addresses` at least 1).
    pub fn new(limit: RateLimit, max_addresses: usize) -> Self {
        RateLimiter {
            limit,
            max_addresses: max_addresses.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn refill(&self, b: &mut Bucket, now: Duration) {
        let dt = now.saturating_sub(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * self.limit.rate()).min(f64::from(self.limit.burst.max(1)));
        b.last = now.max(b.last);
    }

    /// Takes one token for `ip` at `now`. `Err(wait)`: refused; a token will be there
    /// after `wait` (the retry delay to announce).
    pub fn check(&mut self, ip: IpAddr, now: Duration) -> Result<(), Duration> {
        if !self.limit.enabled() {
            return Ok(());
        }
        let key = addr_key(ip);
        let burst = f64::from(self.limit.burst.max(1));
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_addresses {
            self.evict(now);
        }
        let mut b = self.buckets.get(&key).copied().unwrap_or(Bucket {
            tokens: burst,
            last: now,
        });
        self.refill(&mut b, now);
        let out = if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let secs = (1.0 - b.tokens) / self.limit.rate();
            Err(Duration::from_secs_f64(secs.clamp(0.001, 3600.0)))
        };
        self.buckets.insert(key, b);
        out
    }

    fn evict(&mut self, now: Duration) {
        let burst = f64::from(self.limit.burst.max(1));
        let rate = self.limit.rate();
        self.buckets.retain(|_, b| {
            let dt = now.saturating_sub(b.last).as_secs_f64();
            b.tokens + dt * rate < burst
        });
        if self.buckets.len() >= self.max_addresses
            && let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| *k)
        {
            self.buckets.remove(&oldest);
        }
    }
}

/// What the control plane learnt about a session id it does not hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// No such session in the database at all.
    Missing,
    /// The session exists but is over (left, expired, revoked, broadcast stopped).
    Ended,
}

/// A bounded negative cache of session ids the database said are unknown or ended, so
/// that repeated calls for them (`Heartbeat`, `Leave`, `Report`, ...) are answered
/// without a database round trip. Oldest entries go first when full; entries expire
/// after `ttl`.
#[derive(Debug)]
pub struct UnknownSessions {
    max: usize,
    ttl: Duration,
    map: HashMap<String, (Unknown, Duration)>,
    order: VecDeque<(String, Duration)>,
}

impl UnknownSessions {
    /// An empty cache (`max` at least 1).
    pub fn new(max: usize, ttl: Duration) -> Self {
        UnknownSessions {
            max: max.max(1),
            ttl,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// What is known about `id`, if it is cached and not expired.
    pub fn get(&self, id: &str, now: Duration) -> Option<Unknown> {
        self.map
            .get(id)
            .filter(|(_, at)| now.saturating_sub(*at) < self.ttl)
            .map(|(u, _)| *u)
    }

    /// Records `id` (a later, more precise answer replaces an earlier one).
    pub fn insert(&mut self, id: &str, what: Unknown, now: Duration) {
        while let Some((old, at)) = self.order.front() {
            let expired = now.saturating_sub(*at) >= self.ttl;
            if !expired && self.order.len() < self.max {
                break;
            }
            // Drop the map entry only if it is the one this queue slot recorded.
            if self.map.get(old).is_some_and(|(_, t)| t == at) {
                self.map.remove(old);
            }
            self.order.pop_front();
        }
        self.map.insert(id.to_string(), (what, now));
        self.order.push_back((id.to_string(), now));
    }
}

/// Flash-crowd admission: the joins in flight (admitted, not yet answered) against a
/// bound, and the measured rate at which joins complete, which prices the retry delay
/// told to a refused join (the backlog divided by the rate, within
/// [`MIN_JOIN_RETRY`]..=[`MAX_JOIN_RETRY`]).
#[derive(Debug, Clone)]
pub struct JoinBacklog {
    max: usize,
    in_flight: usize,
    window_start: Duration,
    window_count: u64,
    /// Completed joins per second (0 until measured).
    rate: f64,
}

impl JoinBacklog {
    /// At most `max` joins in flight; 0 = no bound.
    pub fn new(max: usize) -> JoinBacklog {
        JoinBacklog {
            max,
            in_flight: 0,
            window_start: Duration::ZERO,
            window_count: 0,
            rate: 0.0,
        }
    }

    /// Admits one more join, or refuses it with the delay after which to retry.
    pub fn enter(&mut self) -> Result<(), Duration> {
        if self.max != 0 && self.in_flight >= self.max {
            return Err(self.retry_delay());
        }
        self.in_flight += 1;
        Ok(())
    }

    /// An admitted join finished (answered, whatever the outcome) at `now`.
    pub fn leave(&mut self, now: Duration) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let elapsed = now.saturating_sub(self.window_start);
        if elapsed >= Duration::from_secs(1) {
            // A long window is an idle gap, not a measure of what the process can do.
            if elapsed <= Duration::from_secs(2) {
                let sample = self.window_count as f64 / elapsed.as_secs_f64();
                self.rate = if self.rate == 0.0 {
                    sample
                } else {
                    (self.rate + sample) / 2.0
                };
            }
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count += 1;
    }

    /// Joins in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How long the current backlog takes to drain at the measured rate, bounded.
    pub fn retry_delay(&self) -> Duration {
        let rate = self.rate.max(MIN_JOIN_RATE);
        Duration::from_secs_f64(self.in_flight as f64 / rate).clamp(MIN_JOIN_RETRY, MAX_JOIN_RETRY)
    }
}

/// The flood limits' configuration (flags of the binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `Join` calls per caller address.
    pub join: RateLimit,
    /// Database look-ups of sessions not in this process's memory, per caller address.
    pub unknown_session_lookups: RateLimit,
    /// Most addresses each limiter tracks.
    pub max_addresses: usize,
    /// Most session ids in the negative cache.
    pub unknown_sessions_max: usize,
    /// How long a session id stays in the negative cache.
    pub unknown_sessions_ttl: Duration,
    /// Most joins in flight before new ones get RESOURCE_EXHAUSTED with a retry delay
    /// ([`JoinBacklog`]); 0 = no bound.
    pub joins_in_flight: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            join: RateLimit::per_second(DEFAULT_JOIN_RATE, DEFAULT_JOIN_BURST),
            unknown_session_lookups: RateLimit::per_second(
                DEFAULT_UNKNOWN_SESSION_RATE,
                DEFAULT_UNKNOWN_SESSION_BURST,
            ),
            max_addresses: DEFAULT_MAX_ADDRESSES,
            unknown_sessions_max: DEFAULT_UNKNOWN_SESSIONS_MAX,
            unknown_sessions_ttl: DEFAULT_UNKNOWN_SESSIONS_TTL,
            joins_in_flight: DEFAULT_JOINS_IN_FLIGHT,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn join_backlog_refuses_beyond_the_bound_with_a_priced_delay() {
        let mut b = JoinBacklog::new(3);
        for _ in 0..3 {
            assert!(b.enter().is_ok());
        }
        // Nothing measured yet: the floor rate prices the wait, within the bounds.
        assert_eq!(b.enter().unwrap_err(), MIN_JOIN_RETRY);
        // 1,000 joins completed over one second: 1,000 joins/s.
        let mut big = JoinBacklog::new(2000);
        for _ in 0..2000 {
            big.enter().unwrap();
        }
        for i in 0..1000u64 {
            big.leave(ms(i));
        }
        big.leave(ms(1000));
        assert_eq!(big.in_flight(), 999);
        for _ in 0..1001 {
            big.enter().unwrap();
        }
        let wait = big.enter().unwrap_err();
        assert!(wait > ms(1900) && wait < ms(2100), "{wait:?}");
        // A leave frees a place at once.
        b.leave(ms(5));
        assert!(b.enter().is_ok());
        // 0 = no bound.
        let mut free = JoinBacklog::new(0);
        for _ in 0..10_000 {
            assert!(free.enter().is_ok());
        }
        // Never beyond the longest delay.
        let mut slow = JoinBacklog::new(1_000_000);
        for _ in 0..1_000_000 {
            slow.enter().unwrap();
        }
        assert_eq!(slow.retry_delay(), MAX_JOIN_RETRY);
    }

    #[test]
    fn bucket_allows_burst_then_rate_and_says_when() {
        let mut l = RateLimiter::new(RateLimit::per_second(10.0, 5), 16);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..5 {
            assert!(l.check(a, ms(0)).is_ok());
        }
        let wait = l.check(a, ms(0)).unwrap_err();
        assert!(wait > ms(99) && wait <= ms(101), "{wait:?}");
        // Another address is not affected.
        assert!(l.check(b, ms(0)).is_ok());
        // 50 ms later still refused, with the rest of the wait.
        let wait = l.check(a, ms(50)).unwrap_err();
        assert!(wait > ms(40) && wait <= ms(50), "{wait:?}");
        // After the wait one more passes, then refused again.
        assert!(l.check(a, ms(110)).is_ok());
        assert!(l.check(a, ms(110)).is_err());
        // A long pause refills to the burst, never more.
        for _ in 0..5 {
            assert!(l.check(a, ms(100_000)).is_ok());
        }
        assert!(l.check(a, ms(100_000)).is_err());
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_v4_as_v4() {
        let mut l = RateLimiter::new(RateLimit::per_second(1.0, 1), 16);
        assert!(l.check("2001:db8:1:2::1".parse().unwrap(), ms(0)).is_ok());
        assert!(
            l.check("2001:db8:1:2:ffff::9".parse().unwrap(), ms(0))
                .is_err()
        );
        assert!(l.check("2001:db8:1:3::1".parse().unwrap(), ms(0)).is_ok());
        assert!(l.check("10.1.1.1".parse().unwrap(), ms(0)).is_ok());
        assert!(l.check("::ffff:10.1.1.1".parse().unwrap(), ms(0)).is_err());
    }

    #[test]
    fn table_is_bounded_and_evicts_refilled_then_oldest() {
        let mut l = RateLimiter::new(RateLimit::per_second(1.0, 2), 4);
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        for i in 0..4 {
            l.check(ip(i), ms(u64::from(i))).unwrap();
        }
        assert_eq!(l.len(), 4);
        // Full, nobody refilled: the least recently used (ip 0) goes.
        l.check(ip(9), ms(10)).unwrap();
        assert_eq!(l.len(), 4);
        // ip 1 kept its (nearly empty) bucket: one call passes, the next is refused.
        l.check(ip(1), ms(10)).unwrap();
        assert!(l.check(ip(1), ms(10)).is_err());
        // ip 0 was forgotten: it starts with a full bucket again.
        l.check(ip(0), ms(11)).unwrap();
        l.check(ip(0), ms(11)).unwrap();
        assert!(l.len() <= 4);
        // Much later everyone refilled: one sweep drops them all.
        for i in 20..30 {
            l.check(ip(i), ms(1_000_000)).unwrap();
            assert!(l.len() <= 4);
        }
    }

    #[test]
    fn disabled_limit_accepts_everything_and_keeps_nothing() {
        let mut l = RateLimiter::new(RateLimit::per_second(0.0, 1), 4);
        for _ in 0..1000 {
            assert!(l.check("10.0.0.1".parse().unwrap(), ms(0)).is_ok());
        }
        assert!(l.is_empty());
    }

    #[test]
    fn negative_cache_is_bounded_and_expires() {
        let mut c = UnknownSessions::new(3, ms(1000));
        c.insert("a", Unknown::Missing, ms(0));
        c.insert("b", Unknown::Ended, ms(1));
        assert_eq!(c.get("a", ms(2)), Some(Unknown::Missing));
        assert_eq!(c.get("b", ms(2)), Some(Unknown::Ended));
        assert_eq!(c.get("z", ms(2)), None);
        c.insert("c", Unknown::Missing, ms(3));
        c.insert("d", Unknown::Missing, ms(4));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("a", ms(5)), None, "oldest evicted");
        // Re-inserting refreshes and replaces.
        c.insert("b", Unknown::Missing, ms(6));
        assert_eq!(c.get("b", ms(7)), Some(Unknown::Missing));
        assert!(c.len() <= 3);
        // Expiry.
        assert_eq!(c.get("c", ms(1003)), None);
        assert_eq!(c.get("b", ms(1005)), Some(Unknown::Missing));
        c.insert("e", Unknown::Ended, ms(2000));
        assert!(c.len() <= 3);
        for i in 0..100 {
            c.insert(&format!("x{i}"), Unknown::Missing, ms(3000 + i));
            assert!(c.len() <= 3 && c.order.len() <= 3 + 1);
        }
    }
}
