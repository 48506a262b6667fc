//! Which addresses the data plane may pull a source from: a guard against server-side
//! request forgery (a broadcaster, or anyone who can create a broadcast, pointing the
//! data plane at `http://127.0.0.1:…/`, a cloud metadata endpoint or a private LAN).
//!
//! [`SourcePolicy`] refuses loopback, private (RFC 1918, IPv6 unique-local), link-local,
//! shared (CGNAT), unspecified, broadcast, multicast and documentation addresses, in
//! IPv4 or IPv4-mapped IPv6 form, unless an allow-list entry (`--allow-source-net`)
//! covers the address. [`GuardedConnector`] applies it where it counts: to the address
//! a connection is really made to, after DNS resolution, on every request (a playlist's
//! segment URLs and any redirect target included, since each is a new request through
//! the same connector).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// An IP network (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// A malformed `--allow-source-net` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP network (e.g. 127.0.0.0/8, 10.1.2.3, fd00::/8)")]
pub struct BadNet(pub String);

impl FromStr for IpNet {
    type Err = BadNet;

    fn from_str(s: &str) -> Result<Self, BadNet> {
        let bad = || BadNet(s.to_string());
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses match IPv4 nets).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is anything but a public unicast address.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => v4_internal(a),
        IpAddr::V6(a) => v6_internal(a),
    }
}

fn v4_internal(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xC0) == 64) // shared address space (CGNAT), 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xFE) == 18) // benchmarking, 198.18/15
        || o[0] >= 240 // reserved
}

fn v6_internal(a: Ipv6Addr) -> bool {
    let s = a.segments();
    a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xFE00) == 0xFC00 // unique local, fc00::/7
        || (s[0] & 0xFFC0) == 0xFE80 // link local, fe80::/10
        || (s[0] & 0xFFC0) == 0xFEC0 // site local (deprecated), fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0DB8) // documentation
        || (s[0] == 0x0064 && s[1] == 0xFF9B) // NAT64: may reach internal IPv4
        || a.to_ipv4().is_some_and(|v4| a.segments()[..6] == [0; 6] && v4_internal(v4)) // IPv4-compatible
}

/// Which source addresses are allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    allow: Vec<IpNet>,
}

impl SourcePolicy {
    /// Public addresses, plus those in `allow`.
    pub fn new(allow: Vec<IpNet>) -> Self {
        SourcePolicy { allow }
    }

    /// Public addresses and loopback (127.0.0.0/8, ::1): for demos and tests on one
    /// machine.
    pub fn with_loopback() -> Self {
        let v4 = IpNet {
            addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
            prefix: 8,
        };
        let v6 = IpNet {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            prefix: 128,
        };
        SourcePolicy::new(vec![v4, v6])
    }

    /// Public addresses and anything in `allow`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allow.iter().any(|n| n.contains(ip))
    }

    /// The allow-list.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }
}

/// An HTTP connector that resolves the host itself and connects only to addresses the
/// policy permits (trying them in the resolver's order); otherwise the connection
/// fails with `PermissionDenied`, naming the host and the flag that would allow it.
#[derive(Clone)]
pub struct GuardedConnector {
    policy: Arc<SourcePolicy>,
    inner: HttpConnector,
}

impl GuardedConnector {
    /// `inner` makes the TCP connection (its timeouts and socket options apply).
    pub fn new(policy: SourcePolicy, inner: HttpConnector) -> Self {
        GuardedConnector {
            policy: Arc::new(policy),
            inner,
        }
    }
}

fn refused(host: &str, addrs: &[SocketAddr]) -> io::Error {
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "source host {host} resolves only to internal addresses ({}): refused; \
             allow them with --allow-source-net",
            list.join(", ")
        ),
    )
}

/// The permitted addresses of `host:port` (an IP literal or a name to resolve).
pub async fn permitted_addrs(
    policy: &SourcePolicy,
    host: &str,
    port: u16,
) -> io::Result<Vec<SocketAddr>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let all: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port)).await?.collect(),
    };
    let ok: Vec<SocketAddr> = all
        .iter()
        .copied()
        .filter(|a| policy.permits(a.ip()))
        .collect();
    if ok.is_empty() {
        return Err(refused(bare, &all));
    }
    Ok(ok)
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.inner, cx).map_err(io::Error::other)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let policy = self.policy.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL without a host"))?
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let addrs = permitted_addrs(&policy, &host, port).await?;
            let mut last = None;
            for a in addrs {
                let target = match Uri::builder()
                    .scheme("http")
                    .authority(a.to_string())
                    .path_and_query("/")
                    .build()
                {
                    Ok(t) => t,
                    Err(e) => return Err(io::Error::other(e)),
                };
                match tower_service::Service::call(&mut inner, target).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = Some(io::Error::other(e)),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("no address to connect to")))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_and_public_ones_permitted() {
        let p = SourcePolicy::default();
        for s in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(!p.permits(ip(s)), "{s} permitted");
        }
        for s in [
            "8.8.8.8",
            "93.184.216.34",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(p.permits(ip(s)), "{s} refused");
        }
    }

    #[test]
    fn the_allow_list_opens_exactly_its_networks() {
        let p = SourcePolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.1.2.3".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]);
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("::ffff:127.0.0.1")));
        assert!(p.permits(ip("10.1.2.3")));
        assert!(!p.permits(ip("10.1.2.4")));
        assert!(p.permits(ip("fd12::1")));
        assert!(!p.permits(ip("fe80::1")));
        assert!(!p.permits(ip("::1")));
        for bad in ["", "127.0.0.0/33", "::/129", "host/8", "1.2.3.4/x"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad:?} parsed");
        }
        assert!(
            "0.0.0.0/0"
                .parse::<IpNet>()
                .unwrap()
                .contains(ip("1.2.3.4"))
        );
    }

    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let p = SourcePolicy::default();
        let e = permitted_addrs(&p, "localhost", 80).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("--allow-source-net"), "{e}");
        let e = permitted_addrs(&p, "[::1]", 80).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let open = SourcePolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]);
        let ok = permitted_addrs(&open, "localhost", 8000).await.unwrap();
        assert!(ok.iter().all(|a| a.port() == 8000 && a.ip().is_loopback()));
    }
}
