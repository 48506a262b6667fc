//! What the control plane believes of a viewer's claims (issue 13, items 3 and 4), as
//! pure state taking `now`:
//!
//! * [`check_peer_addr`]: a relaying viewer's `peer_addr` must be on the address it
//!   calls from, so no one can point children at someone else's machine.
//! * [`UploadTrust`]: a claimed upload budget buys slots only up to a ceiling
//!   ([`TrustConfig::unconfirmed_upload_copies`] stream copies) until the viewer's own
//!   heartbeats show it actually uploads: every [`TrustConfig::confirm_window`] the
//!   upload rate it reported over the window, counted at most at 5/4 of what its current
//!   children can take, *confirms* twice that rate (slow start: the granted budget at
//!   most doubles per window, never beyond the claim).
//! * [`ReportLedger`]: complaints about a peer count once per distinct reporter address
//!   ([`crate::limits::addr_key`]) and only for [`TrustConfig::report_window`]; the peer
//!   is excluded or demoted when a threshold of distinct addresses complained within
//!   the window. A parent that withholds fails all its children at once and is reported
//!   by them within seconds; an honest one that is now and then late collects one
//!   complaint every few minutes, which without the window would add up over a long
//!   broadcast until every good relay is demoted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::limits::addr_key;
use starling_grid::assign::PeerId;

/// Default ceiling of an unconfirmed upload claim, in stream copies.
pub const DEFAULT_UNCONFIRMED_UPLOAD_COPIES: u32 = 4;
/// Default window over which heartbeats confirm an upload rate.
pub const DEFAULT_CONFIRM_WINDOW: Duration = Duration::from_secs(10);
/// Default distinct reporter addresses that exclude a peer (BAD_CHUNK reports).
pub const DEFAULT_REPORT_THRESHOLD: usize = 3;
/// Default distinct children's addresses that demote a parent (NON_DELIVERY reports).
pub const DEFAULT_DEMOTE_THRESHOLD: usize = 3;
/// Default time a complaint counts towards a threshold.
pub const DEFAULT_REPORT_WINDOW: Duration = Duration::from_secs(60);

/// Whether `Join.peer_addr` must be on the caller's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PeerAddrCheck {
    /// The IP of `peer_addr` must be the caller's (IPv6: same /64), or unspecified
    /// (`0.0.0.0`, `[::]`: replaced by the caller's); host names are refused.
    #[default]
    Strict,
    /// No check (deployments behind NAT or a proxy, where the control plane does not
    /// see the viewers' own addresses).
    Off,
}

/// Why a `peer_addr` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAddrRefused {
    /// Not an IP literal (a name cannot be checked).
    #[error("peer_addr {0:?} is not IP:port; with the peer address check on, it must be")]
    NotAnIp(String),
    /// The IP is not the caller's.
    #[error("peer_addr {addr:?} is not on the address this call comes from ({caller})")]
    NotCaller {
        /// The claimed address.
        addr: String,
        /// The caller's IP.
        caller: IpAddr,
    },
}

/// Checks a (trimmed, already syntax-checked) `peer_addr` against the caller's address.
///
/// # Errors
/// [`PeerAddrRefused`] under [`PeerAddrCheck::Strict`].
pub fn check_peer_addr(
    peer_addr: &str,
    remote: Option<SocketAddr>,
    mode: PeerAddrCheck,
) -> Result<(), PeerAddrRefused> {
    if mode == PeerAddrCheck::Off || peer_addr.is_empty() {
        return Ok(());
    }
    let Some(remote) = remote else {
        // Only transports without a peer address (none the server uses) end up here.
        return Ok(());
    };
    let Ok(addr) = peer_addr.parse::<SocketAddr>() else {
        return Err(PeerAddrRefused::NotAnIp(peer_addr.to_string()));
    };
    if addr.ip().is_unspecified() || addr_key(addr.ip()) == addr_key(remote.ip()) {
        Ok(())
    } else {
        Err(PeerAddrRefused::NotCaller {
            addr: peer_addr.to_string(),
            caller: remote.ip(),
        })
    }
}

/// Tunables of the trust rules (flags of the binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustConfig {
    /// `peer_addr` check.
    pub peer_addr_check: PeerAddrCheck,
    /// Most upload a join's claim buys before heartbeats confirm it, in stream copies
    /// (0 = no ceiling).
    pub unconfirmed_upload_copies: u32,
    /// Window over which heartbeats confirm an upload rate.
    pub confirm_window: Duration,
    /// Distinct reporter addresses whose BAD_CHUNK reports exclude a peer as a parent.
    pub report_threshold: usize,
    /// Distinct children's addresses whose NON_DELIVERY reports demote a parent.
    pub demote_threshold: usize,
    /// How long a complaint counts towards [`TrustConfig::report_threshold`] and
    /// [`TrustConfig::demote_threshold`] (`ZERO`: for the peer's whole session).
    pub report_window: Duration,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            peer_addr_check: PeerAddrCheck::Strict,
            unconfirmed_upload_copies: DEFAULT_UNCONFIRMED_UPLOAD_COPIES,
            confirm_window: DEFAULT_CONFIRM_WINDOW,
            report_threshold: DEFAULT_REPORT_THRESHOLD,
            demote_threshold: DEFAULT_DEMOTE_THRESHOLD,
            report_window: DEFAULT_REPORT_WINDOW,
        }
    }
}

impl TrustConfig {
    /// The ceiling of an unconfirmed claim for a stream of `stream_kbps`.
    pub fn upload_ceiling(&self, stream_kbps: u32) -> u32 {
        match self.unconfirmed_upload_copies {
            0 => u32::MAX,
            n => stream_kbps.saturating_mul(n),
        }
    }
}

/// One session's claimed and granted upload budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadTrust {
    claimed: u32,
    granted: u32,
    /// Not yet known to be reachable at its advertised address: nothing is granted
    /// ([`UploadTrust::on_probation`], [`UploadTrust::reachable`]).
    probation: bool,
    /// Start of the current confirmation window: time and cumulative bytes uploaded.
    window: Option<(Duration, u64)>,
}

impl UploadTrust {
    /// A join claiming `claimed` kbit/s, granted at most `ceiling`.
    pub fn new(claimed: u32, ceiling: u32) -> Self {
        UploadTrust {
            claimed,
            granted: claimed.min(ceiling),
            probation: false,
            window: None,
        }
    }

    /// A join claiming `claimed` kbit/s from an address not yet probed: nothing is
    /// granted until [`UploadTrust::reachable`].
    pub fn on_probation(claimed: u32) -> Self {
        UploadTrust {
            claimed,
            granted: 0,
            probation: true,
            window: None,
        }
    }

    /// A probe found the address unreachable after all (children could not connect to
    /// it): nothing is granted any more.
    pub fn back_on_probation(&mut self) {
        self.probation = true;
        self.granted = 0;
        self.window = None;
    }

    /// True while the address has not been found reachable.
    pub fn on_probation_now(&self) -> bool {
        self.probation
    }

    /// The advertised address answered: the claim is granted up to `ceiling`, as at a
    /// join without probation. Returns the new granted budget when it changed.
    pub fn reachable(&mut self, ceiling: u32) -> Option<u32> {
        if !self.probation {
            return None;
        }
        self.probation = false;
        let g = self.claimed.min(ceiling);
        (g != self.granted).then(|| {
            self.granted = g;
            g
        })
    }

    /// The budget the grid counts slots with.
    pub fn granted(&self) -> u32 {
        self.granted
    }

    /// The budget the viewer claims.
    pub fn claimed(&self) -> u32 {
        self.claimed
    }

    /// The viewer's SDK lowered its budget (`Heartbeat.upload_kbps`, > 0). Returns the
    /// new granted budget when it changed.
    pub fn lower(&mut self, kbps: u32) -> Option<u32> {
        self.claimed = self.claimed.min(kbps);
        let g = self.granted.min(self.claimed);
        (g != self.granted).then(|| {
            self.granted = g;
            g
        })
    }

    /// A heartbeat with the cumulative `uploaded` bytes; `carried_kbps` is what the
    /// viewer's current children can take (used slots × substream rate). Returns the
    /// new granted budget when a finished window confirmed more.
    pub fn on_heartbeat(
        &mut self,
        now: Duration,
        uploaded: u64,
        window: Duration,
        carried_kbps: impl FnOnce() -> u64,
    ) -> Option<u32> {
        if self.probation {
            return None;
        }
        let Some((start, start_bytes)) = self.window else {
            self.window = Some((now, uploaded));
            return None;
        };
        if uploaded < start_bytes {
            // Counters went backwards (a new SDK session state): start over.
            self.window = Some((now, uploaded));
            return None;
        }
        let elapsed = now.saturating_sub(start);
        if elapsed < window.max(Duration::from_millis(1)) {
            return None;
        }
        self.window = Some((now, uploaded));
        let ms = u64::try_from(elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        // bytes × 8 / ms = kbit/s.
        let rate = (uploaded - start_bytes).saturating_mul(8) / ms;
        let credited = rate.min(carried_kbps().saturating_mul(5) / 4);
        let confirmed = credited.saturating_mul(2);
        if self.granted < self.claimed && confirmed > u64::from(self.granted) {
            let g = u32::try_from(confirmed)
                .unwrap_or(u32::MAX)
                .min(self.claimed);
            self.granted = g;
            return Some(g);
        }
        None
    }
}

/// Complaints of one kind about peers of one grid, by distinct reporter address, each
/// counted for a window.
#[derive(Debug, Default)]
pub struct ReportLedger {
    /// Per peer: each complaining address and when it last complained.
    by_peer: HashMap<PeerId, Vec<(IpAddr, Duration)>>,
}

impl ReportLedger {
    /// Records a complaint about `peer` from `reporter` at `now`; returns how many
    /// distinct addresses have complained within `window` of `now` (`ZERO`: ever), at
    /// most `threshold` (no more are remembered).
    pub fn add(
        &mut self,
        peer: PeerId,
        reporter: IpAddr,
        threshold: usize,
        window: Duration,
        now: Duration,
    ) -> usize {
        let key = addr_key(reporter);
        let v = self.by_peer.entry(peer).or_default();
        if !window.is_zero() {
            v.retain(|&(_, at)| now.saturating_sub(at) < window);
        }
        if let Some(e) = v.iter_mut().find(|(a, _)| *a == key) {
            e.1 = now;
        } else if v.len() < threshold.max(1) {
            v.push((key, now));
        }
        v.len()
    }

    /// Distinct addresses whose complaints about `peer` are remembered (as of the last
    /// [`ReportLedger::add`] about it).
    pub fn count(&self, peer: PeerId) -> usize {
        self.by_peer.get(&peer).map_or(0, Vec::len)
    }

    /// Forgets a peer (it left).
    pub fn forget(&mut self, peer: PeerId) {
        self.by_peer.remove(&peer);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn s(v: u64) -> Duration {
        Duration::from_secs(v)
    }

    #[test]
    fn peer_addr_must_be_the_callers() {
        let remote: SocketAddr = "203.0.113.5:40000".parse().unwrap();
        let strict = PeerAddrCheck::Strict;
        assert!(check_peer_addr("", Some(remote), strict).is_ok());
        assert!(check_peer_addr("203.0.113.5:7000", Some(remote), strict).is_ok());
        assert!(check_peer_addr("0.0.0.0:7000", Some(remote), strict).is_ok());
        assert!(matches!(
            check_peer_addr("198.51.100.7:7000", Some(remote), strict),
            Err(PeerAddrRefused::NotCaller { .. })
        ));
        assert!(matches!(
            check_peer_addr("victim.example:7000", Some(remote), strict),
            Err(PeerAddrRefused::NotAnIp(_))
        ));
        assert!(check_peer_addr("198.51.100.7:7000", Some(remote), PeerAddrCheck::Off).is_ok());
        let v6: SocketAddr = "[2001:db8:1:2::5]:1".parse().unwrap();
        assert!(check_peer_addr("[2001:db8:1:2::99]:7000", Some(v6), strict).is_ok());
        assert!(check_peer_addr("[2001:db8:1:3::5]:7000", Some(v6), strict).is_err());
        let mapped: SocketAddr = "[::ffff:203.0.113.5]:1".parse().unwrap();
        assert!(check_peer_addr("203.0.113.5:7000", Some(mapped), strict).is_ok());
    }

    #[test]
    fn a_huge_claim_is_capped_until_uploads_confirm_it() {
        let cfg = TrustConfig::default();
        let ceiling = cfg.upload_ceiling(1000);
        assert_eq!(ceiling, 4000);
        let mut t = UploadTrust::new(1_000_000, ceiling);
        assert_eq!(t.granted(), 4000);
        let w = cfg.confirm_window;
        assert_eq!(t.on_heartbeat(s(0), 0, w, || 4000), None);
        // Claims uploads but its children could take only 1000 kbit/s: nothing confirmed.
        assert_eq!(t.on_heartbeat(s(10), 10 * 1_000_000, w, || 1000), None);
        assert_eq!(t.granted(), 4000);
        // Uploads 4000 kbit/s for a window with children taking that: doubles.
        assert_eq!(
            t.on_heartbeat(s(15), 15 * 1_000_000, w, || 4000),
            None,
            "window open"
        );
        // 5,000,000 B in 10 s = 4000 kbit/s.
        assert_eq!(
            t.on_heartbeat(s(20), 15 * 1_000_000, w, || 4000),
            Some(8000)
        );
        assert_eq!(t.granted(), 8000);
        // Never beyond the claim; lowering the claim lowers the grant.
        let mut small = UploadTrust::new(5000, ceiling);
        small.on_heartbeat(s(0), 0, w, || 10_000);
        assert_eq!(
            small.on_heartbeat(s(10), 10 * 500_000, w, || 10_000),
            Some(5000)
        );
        assert_eq!(small.lower(3000), Some(3000));
        assert_eq!(small.lower(3500), None);
        assert_eq!(small.claimed(), 3000);
        // A claim under the ceiling is granted at once; counters going back restart.
        let mut honest = UploadTrust::new(2000, ceiling);
        assert_eq!(honest.granted(), 2000);
        honest.on_heartbeat(s(0), 100, w, || 0);
        assert_eq!(honest.on_heartbeat(s(20), 50, w, || 0), None);
    }

    #[test]
    fn ledger_counts_distinct_addresses_only() {
        let mut l = ReportLedger::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let w = DEFAULT_REPORT_WINDOW;
        let t = s(1);
        assert_eq!(l.add(7, a, 3, w, t), 1);
        assert_eq!(l.add(7, a, 3, w, t), 1);
        assert_eq!(l.add(7, "::ffff:10.0.0.1".parse().unwrap(), 3, w, t), 1);
        assert_eq!(l.add(7, b, 3, w, t), 2);
        assert_eq!(l.add(7, "10.0.0.3".parse().unwrap(), 3, w, t), 3);
        assert_eq!(l.add(7, "10.0.0.4".parse().unwrap(), 3, w, t), 3, "bounded");
        assert_eq!(l.count(8), 0);
        l.forget(7);
        assert_eq!(l.count(7), 0);
    }

    #[test]
    fn complaints_count_only_within_the_window() {
        let mut l = ReportLedger::default();
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let w = Duration::from_secs(60);
        // An honest relay, late now and then: one complaint every 40 s never adds up.
        for i in 0..30u8 {
            let n = l.add(7, ip(i), 3, w, s(40 * u64::from(i)));
            assert!(n <= 2, "complaint {i}: {n} within the window");
        }
        // A withholding one: its children complain within seconds.
        assert_eq!(l.add(8, ip(1), 3, w, s(100)), 1);
        assert_eq!(l.add(8, ip(2), 3, w, s(103)), 2);
        assert_eq!(l.add(8, ip(3), 3, w, s(105)), 3);
        // The same address complaining again keeps its complaint fresh.
        assert_eq!(l.add(9, ip(1), 3, w, s(0)), 1);
        assert_eq!(l.add(9, ip(1), 3, w, s(50)), 1);
        assert_eq!(
            l.add(9, ip(2), 3, w, s(100)),
            2,
            "ip 1's complaint of 50 s ago counts"
        );
        assert_eq!(
            l.add(9, ip(3), 3, w, s(155)),
            2,
            "ip 1's has expired, ip 2's not"
        );
        // Window ZERO: complaints count for the whole session (the old behaviour).
        for i in 0..3u8 {
            l.add(10, ip(i), 3, Duration::ZERO, s(1000 * u64::from(i)));
        }
        assert_eq!(l.count(10), 3);
    }
}
