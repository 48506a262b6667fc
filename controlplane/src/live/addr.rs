//! Peer addresses as the grid uses them: the network prefix of the "nearby" preference
//! and the address other peers should dial.

use std::net::{IpAddr, SocketAddr};

/// The network prefix used for the "nearby" preference: the /24 of an IPv4 address
/// (`ip >> 8`, below 2^24), or a 31-bit hash of the /48 of an IPv6 address with the top
/// bit set (so it never equals an IPv4 prefix). IPv4-mapped IPv6 counts as IPv4.
pub fn ip_prefix(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) >> 8,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u32::from(v4) >> 8,
            None => {
                let h = v6.octets()[..6].iter().fold(0x811c_9dc5_u32, |h, &b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                h | 0x8000_0000
            }
        },
    }
}

/// The address prefix of a joining viewer: from the IP of its `peer_addr` when that is a
/// literal, non-unspecified IP, else from the IP it called from, else 0.
pub fn addr_prefix(peer_addr: &str, remote: Option<SocketAddr>) -> u32 {
    peer_addr
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .or(remote.map(|r| r.ip()))
        .map_or(0, ip_prefix)
}

/// The address other peers should dial: `peer_addr` as given, except that an unspecified
/// IP (a viewer reporting its `0.0.0.0`/`[::]` bind address) is replaced by the IP the
/// viewer called from.
pub fn dialable_addr(peer_addr: &str, remote: Option<SocketAddr>) -> String {
    match (peer_addr.parse::<SocketAddr>(), remote) {
        (Ok(a), Some(r)) if a.ip().is_unspecified() => {
            SocketAddr::new(r.ip(), a.port()).to_string()
        }
        _ => peer_addr.to_string(),
    }
}
