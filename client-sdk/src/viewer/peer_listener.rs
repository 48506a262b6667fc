//! The peer listener a relaying viewer binds before `Join`, and the address and upload
//! budget it offers there (the advertised host is found out when not configured; a
//! private one is replaced by a router's port mapping when the router grants one,
//! [`crate::portmap`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpListener;

use super::config::ViewerConfig;
use crate::control::Offer;
use crate::error::SdkError;
use crate::portmap::{PortMapping, needs_mapping};

/// What a relaying viewer prepared before `Join`.
pub(super) struct RelayPrep {
    pub listener: Option<TcpListener>,
    pub offer: Offer,
    /// The router forwards [`PortMapping::external`] to the listener.
    pub mapping: Option<PortMapping>,
}

/// Binds the peer listener (unless relaying is off) and works out what to offer in
/// `Join`.
pub(super) async fn prepare_relay(config: &ViewerConfig) -> Result<RelayPrep, SdkError> {
    let upload = config.relay.upload_kbps();
    if upload == 0 {
        return Ok(RelayPrep {
            listener: None,
            offer: Offer::default(),
            mapping: None,
        });
    }
    let listen = config.relay.listen;
    // Bound for port reuse: the control-plane connection and punched links leave from
    // this port ([`crate::punch`]).
    let l = crate::punch::bind_listener(listen).map_err(|e| SdkError::PeerBind {
        addr: listen.to_string(),
        source: e.into(),
    })?;
    let port = l.local_addr()?.port();
    let mut mapping = None;
    let ip = local_ip(listen, &config.control_url).await;
    let host = match &config.relay.advertise_host {
        Some(h) if !h.is_empty() => h.clone(),
        _ => {
            let pm = &config.relay.port_mapping;
            if pm.enabled && needs_mapping(ip) {
                match PortMapping::map(SocketAddr::new(ip, port), pm).await {
                    Ok(m) => {
                        tracing::info!(local = %SocketAddr::new(ip, port), external = %m.external(),
                            "the router maps a public port to the peer listener (UPnP)");
                        mapping = Some(m);
                    }
                    Err(e) => tracing::info!(local = %ip, error = %e,
                        "no port mapping: peers outside this network may not reach this viewer"),
                }
            }
            ip.to_string()
        }
    };
    let peer_addr = match &mapping {
        Some(m) => m.external().to_string(),
        None if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    };
    Ok(RelayPrep {
        listener: Some(l),
        offer: Offer {
            peer_addr,
            upload_kbps: upload,
            host_addr: SocketAddr::new(ip, port).to_string(),
        },
        mapping,
    })
}

/// The IP other peers should use: the listener's if it is bound to one, else the local
/// address of a (never used) UDP socket connected towards the control plane, else
/// loopback.
async fn local_ip(listen: SocketAddr, control_url: &str) -> IpAddr {
    if !listen.ip().is_unspecified() {
        return listen.ip();
    }
    let authority = crate::control_url::authority(control_url);
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    if let Ok(Ok(mut addrs)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(authority)).await
        && let Some(a) = addrs.next()
    {
        let bind: SocketAddr = if a.is_ipv4() {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        } else {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0)
        };
        if let Ok(u) = tokio::net::UdpSocket::bind(bind).await
            && u.connect(a).await.is_ok()
            && let Ok(la) = u.local_addr()
            && !la.ip().is_unspecified()
        {
            return la.ip();
        }
    }
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
