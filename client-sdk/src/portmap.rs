//! Port mapping: a relaying viewer behind a home router asks the router (UPnP-IGD,
//! through `igd-next`) to forward a public port to its peer listener, and advertises
//! the router's public address with that port instead of its private one. The control
//! plane then finds it reachable (its probe goes through the mapping) and gives it
//! children.
//!
//! Only tried when the address the viewer would advertise is a private one (RFC 1918,
//! CGNAT, unique-local IPv6): a public or loopback address needs no mapping, so tests on
//! loopback and viewers on public addresses never wait for a gateway. The search is
//! bounded ([`PortMapConfig::timeout`], a few hundred ms: a gateway on the LAN answers
//! in milliseconds), so a network without UPnP delays the start by at most that. The
//! mapping has a lease ([`PortMapConfig::lease`]) renewed at half of it by
//! [`renew_loop`], and is removed when the viewer leaves ([`PortMapping::remove`]); a
//! crashed viewer's mapping lapses with its lease.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use igd_next::PortMappingProtocol;
use igd_next::aio::Gateway;
use igd_next::aio::tokio::Tokio;

/// How the SDK maps its peer listener's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapConfig {
    /// Try at all (default true).
    pub enabled: bool,
    /// The whole attempt (search, external address, mapping) gives up after this.
    pub timeout: Duration,
    /// Lease asked for; renewed at half of it.
    pub lease: Duration,
}

impl Default for PortMapConfig {
    fn default() -> Self {
        PortMapConfig {
            enabled: true,
            timeout: Duration::from_millis(500),
            lease: Duration::from_secs(3600),
        }
    }
}

/// Why no mapping was made (logged; the viewer goes on without one).
#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    #[error("no UPnP gateway answered: {0}")]
    Search(String),
    #[error("the gateway has no external address: {0}")]
    ExternalIp(String),
    #[error("the gateway refused the mapping: {0}")]
    Add(String),
    #[error("no answer from the gateway within {0:?}")]
    Timeout(Duration),
}

/// A port the router forwards to this viewer's listener.
#[derive(Debug, Clone)]
pub struct PortMapping {
    gateway: Gateway<Tokio>,
    /// The router's public address and the mapped port.
    external: SocketAddr,
    /// The listener's LAN address the router forwards to.
    local: SocketAddr,
    lease: Duration,
}

/// True for addresses a router would have to map: RFC 1918, CGNAT (100.64/10), IPv6
/// unique-local.
pub fn needs_mapping(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || (o[0] == 100 && (o[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xFE00) == 0xFC00,
    }
}

impl PortMapping {
    /// Asks the LAN's UPnP gateway to forward a TCP port to `local` (the listener's LAN
    /// address): the same port number if free, else any.
    ///
    /// # Errors
    /// [`PortMapError`] when no gateway answers in time or it refuses.
    pub async fn map(local: SocketAddr, config: &PortMapConfig) -> Result<Self, PortMapError> {
        match tokio::time::timeout(config.timeout, Self::map_inner(local, config)).await {
            Ok(r) => r,
            Err(_) => Err(PortMapError::Timeout(config.timeout)),
        }
    }

    async fn map_inner(local: SocketAddr, config: &PortMapConfig) -> Result<Self, PortMapError> {
        let mut options = igd_next::SearchOptions::default();
        options.timeout = Some(config.timeout);
        options.single_search_timeout = Some(config.timeout);
        let gateway = igd_next::aio::tokio::search_gateway(options)
            .await
            .map_err(|e| PortMapError::Search(e.to_string()))?;
        let ip = gateway
            .get_external_ip()
            .await
            .map_err(|e| PortMapError::ExternalIp(e.to_string()))?;
        let lease = lease_secs(config.lease);
        let port = match gateway
            .add_port(
                PortMappingProtocol::TCP,
                local.port(),
                local,
                lease,
                DESCRIPTION,
            )
            .await
        {
            Ok(()) => local.port(),
            Err(_) => gateway
                .add_any_port(PortMappingProtocol::TCP, local, lease, DESCRIPTION)
                .await
                .map_err(|e| PortMapError::Add(e.to_string()))?,
        };
        Ok(PortMapping {
            gateway,
            external: SocketAddr::new(ip, port),
            local,
            lease: config.lease,
        })
    }

    /// The router's public address and the mapped port: what to advertise.
    pub fn external(&self) -> SocketAddr {
        self.external
    }

    /// Asks for the lease again.
    ///
    /// # Errors
    /// [`PortMapError::Add`] when the gateway refuses.
    pub async fn renew(&self) -> Result<(), PortMapError> {
        self.gateway
            .add_port(
                PortMappingProtocol::TCP,
                self.external.port(),
                self.local,
                lease_secs(self.lease),
                DESCRIPTION,
            )
            .await
            .map_err(|e| PortMapError::Add(e.to_string()))
    }

    /// Removes the mapping (best effort, bounded by `timeout`).
    pub async fn remove(&self, timeout: Duration) {
        let r = tokio::time::timeout(
            timeout,
            self.gateway
                .remove_port(PortMappingProtocol::TCP, self.external.port()),
        )
        .await;
        match r {
            Ok(Ok(())) => tracing::debug!(external = %self.external, "port mapping removed"),
            Ok(Err(e)) => {
                tracing::debug!(external = %self.external, error = %e, "port mapping not removed")
            }
            Err(_) => tracing::debug!(external = %self.external, "port mapping removal timed out"),
        }
    }
}

/// Renews `mapping` at half its lease, for as long as the task runs.
pub async fn renew_loop(mapping: PortMapping) {
    let every = (mapping.lease / 2).max(Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = mapping.renew().await {
            tracing::warn!(external = %mapping.external, error = %e, "port mapping renewal failed");
        }
    }
}

const DESCRIPTION: &str = "starling peer";

fn lease_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_addresses_are_mapped() {
        for (ip, want) in [
            ("192.168.1.2", true),
            ("10.0.0.7", true),
            ("172.16.3.4", true),
            ("100.64.0.9", true),
            ("100.128.0.9", false),
            ("127.0.0.1", false),
            ("198.18.1.1", false),
            ("8.8.8.8", false),
            ("fd00::1", true),
            ("2001:db8::1", false),
            ("::1", false),
        ] {
            let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
            assert_eq!(needs_mapping(ip), want, "{ip}");
        }
    }
}
