//! The control-plane side: `ViewerService` Join / Heartbeat / Leave / Reparent /
//! ReportPeer / Report over gRPC.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    HeartbeatRequest, JoinRequest, LeaveRequest, PeerRef, PeerReportKind, PublicKey,
    ReparentRequest, ReportPeerRequest, ReportRequest, StreamParams, SubstreamParent, ViewerReport,
};
use tonic::transport::{Channel, Endpoint};

use starling_grid::{Parent, PeerId};

use crate::error::SdkError;
use crate::rights::KeyMaterial;

/// Heartbeat interval used when the control plane does not say.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// A peer the control plane named (a parent or a neighbour), and where to dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAddr {
    pub id: PeerId,
    pub addr: String,
}

impl PeerAddr {
    fn from_ref(r: PeerRef) -> Option<PeerAddr> {
        // A peer without an address cannot be connected to: treated as absent.
        (!r.addr.is_empty()).then_some(PeerAddr {
            id: r.peer_id,
            addr: r.addr,
        })
    }
}

/// The control plane's answer for one substream: who feeds it, and for a peer parent
/// where to dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssignedParent {
    pub parent: Parent,
    /// Where to dial a peer parent (empty for the data plane).
    pub addr: String,
}

impl AssignedParent {
    /// From the wire: no peer, or a peer without an address, is the data plane.
    fn from_ref(r: Option<PeerRef>) -> AssignedParent {
        match r.and_then(PeerAddr::from_ref) {
            Some(p) => AssignedParent {
                parent: Parent::Peer(p.id),
                addr: p.addr,
            },
            None => AssignedParent {
                parent: Parent::Server,
                addr: String::new(),
            },
        }
    }

    /// The peer parent and its address (`None` for the data plane).
    pub fn peer(&self) -> Option<PeerAddr> {
        match self.parent {
            Parent::Peer(id) => Some(PeerAddr {
                id,
                addr: self.addr.clone(),
            }),
            Parent::Server => None,
        }
    }
}

/// A parent ticket as the control plane hands it out with an assignment: the child
/// presents it to `parent` in a `TICKET` frame to be admitted for `substream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub substream: u32,
    pub parent: PeerId,
    pub ticket: Bytes,
}

/// The grid assignment carried by `Join` and `Heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Assignment {
    /// `(substream, parent)`, as sent (possibly incomplete or empty).
    pub parents: Vec<(u32, AssignedParent)>,
    pub neighbours: Vec<PeerAddr>,
    /// The tickets of the peer parents (an older control plane sends none).
    pub tickets: Vec<Ticket>,
}

/// The ticket of one `SubstreamParent`, if it names a peer and carries one.
fn ticket_of(p: &SubstreamParent) -> Option<Ticket> {
    let peer = p.peer.as_ref()?;
    (!p.ticket.is_empty()).then(|| Ticket {
        substream: p.substream,
        parent: peer.peer_id,
        ticket: Bytes::from(p.ticket.clone()),
    })
}

fn assignment(parents: Vec<SubstreamParent>, neighbours: Vec<PeerRef>) -> Assignment {
    Assignment {
        tickets: parents.iter().filter_map(ticket_of).collect(),
        parents: parents
            .into_iter()
            .map(|p| (p.substream, AssignedParent::from_ref(p.peer)))
            .collect(),
        neighbours: neighbours
            .into_iter()
            .filter_map(PeerAddr::from_ref)
            .collect(),
    }
}

/// What `Join` gave us.
#[derive(Debug, Clone)]
pub(crate) struct JoinInfo {
    pub session_id: String,
    pub wire_addr: String,
    pub params: Option<StreamParams>,
    pub token: Bytes,
    pub heartbeat: Duration,
    pub peer_id: PeerId,
    pub assignment: Assignment,
    pub stream_kbps: u32,
    pub child_slots: u32,
    /// Expiry of `token` (unix ms; 0 = not said).
    pub token_expires_at_ms: u64,
    pub token_keys: Vec<KeyMaterial>,
    pub chunk_keys: Vec<KeyMaterial>,
    /// How often to report (`None`: the control plane did not say).
    pub report_interval: Option<Duration>,
}

fn keys(v: Vec<PublicKey>) -> Vec<KeyMaterial> {
    v.into_iter().map(|k| (k.key_id, k.ed25519)).collect()
}

fn ms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// What this viewer offers the grid in `Join`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Offer {
    /// `host:port` of the peer listener; empty = does not relay.
    pub peer_addr: String,
    pub upload_kbps: u32,
}

/// Cumulative counters reported in `Heartbeat`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub bytes_from_server: u64,
    pub bytes_from_peers: u64,
    pub bytes_uploaded: u64,
    /// Current upload budget (kbit/s), 0 = unchanged since join.
    pub upload_kbps: u32,
}

/// The answer to `Heartbeat`.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatInfo {
    pub active: bool,
    pub assignment: Assignment,
    /// A renewed chunk token (empty = keep the current one).
    pub token: Bytes,
    pub token_expires_at_ms: u64,
    pub revoked: Vec<PeerId>,
    pub token_keys: Vec<KeyMaterial>,
    pub chunk_keys: Vec<KeyMaterial>,
}

#[derive(Clone)]
pub(crate) struct Control {
    client: ViewerServiceClient<Channel>,
    broadcast_id: String,
    credential: String,
    client_version: String,
}

/// The local IP the control channel binds to: the relay listener's IP when it is a
/// specific one, so the control plane sees this viewer calling from the address it
/// advertises as `peer_addr` (the control plane checks that, and counts reporters by
/// address). Not when the listener is on loopback and the control plane is not (the
/// connection could not be routed), nor across address families.
pub(crate) fn control_bind_ip(relay_listen: IpAddr, control_url: &str) -> Option<IpAddr> {
    if relay_listen.is_unspecified() {
        return None;
    }
    let authority = crate::control_url::authority(control_url);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let remote: Option<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
        Some(if relay_listen.is_ipv4() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        })
    } else {
        host.parse().ok()
    };
    match remote {
        Some(r) if r.is_ipv4() != relay_listen.is_ipv4() => None,
        Some(r) if relay_listen.is_loopback() && !r.is_loopback() => None,
        // A host name: only a non-loopback listener can reach it.
        None if relay_listen.is_loopback() => None,
        _ => Some(relay_listen),
    }
}

impl Control {
    /// `local`: bind the channel's sockets to this IP ([`control_bind_ip`]).
    pub(crate) fn new(
        url: &str,
        broadcast_id: &str,
        credential: Option<&str>,
        client_version: &str,
        timeout: Duration,
        local: Option<IpAddr>,
    ) -> Result<Control, SdkError> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| SdkError::Config(format!("control URL {url:?}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .local_address(local);
        // Lazy: the channel (re)connects on use, so a control plane that is down now
        // and back later is picked up by the next heartbeat or re-join.
        let channel = endpoint.connect_lazy();
        Ok(Control {
            client: ViewerServiceClient::new(channel),
            broadcast_id: broadcast_id.to_string(),
            credential: credential.unwrap_or_default().to_string(),
            client_version: client_version.to_string(),
        })
    }

    pub(crate) async fn join(&self, offer: &Offer) -> Result<JoinInfo, SdkError> {
        let resp = self
            .client
            .clone()
            .join(JoinRequest {
                broadcast_id: self.broadcast_id.clone(),
                credential: self.credential.clone(),
                client_version: self.client_version.clone(),
                peer_addr: offer.peer_addr.clone(),
                upload_kbps: offer.upload_kbps,
            })
            .await
            .map_err(|s| SdkError::from_status("Join", s))?
            .into_inner();
        if resp.dataplane_wire_addr.is_empty() {
            return Err(SdkError::ControlResponse(
                "Join returned no data-plane wire address".into(),
            ));
        }
        let heartbeat = match resp.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms).max(100)),
        };
        Ok(JoinInfo {
            session_id: resp.session_id,
            wire_addr: resp.dataplane_wire_addr,
            params: resp.params,
            token: Bytes::from(resp.chunk_token),
            heartbeat,
            peer_id: resp.peer_id,
            assignment: assignment(resp.parents, resp.neighbours),
            stream_kbps: resp.stream_kbps,
            child_slots: resp.child_slots,
            token_expires_at_ms: ms(resp.token_expires_at_unix_ms),
            token_keys: keys(resp.token_keys),
            chunk_keys: keys(resp.chunk_keys),
            report_interval: (resp.report_interval_ms > 0)
                .then(|| Duration::from_millis(u64::from(resp.report_interval_ms).max(100))),
        })
    }

    /// `active == false` when the control plane says the session is over.
    pub(crate) async fn heartbeat(
        &self,
        session_id: &str,
        counters: Counters,
    ) -> Result<HeartbeatInfo, SdkError> {
        let resp = self
            .client
            .clone()
            .heartbeat(HeartbeatRequest {
                session_id: session_id.to_string(),
                bytes_from_server: counters.bytes_from_server,
                bytes_from_peers: counters.bytes_from_peers,
                bytes_uploaded: counters.bytes_uploaded,
                upload_kbps: counters.upload_kbps,
            })
            .await
            .map_err(|s| SdkError::from_status("Heartbeat", s))?
            .into_inner();
        Ok(HeartbeatInfo {
            active: resp.active,
            assignment: assignment(resp.parents, resp.neighbours),
            token: Bytes::from(resp.chunk_token),
            token_expires_at_ms: ms(resp.token_expires_at_unix_ms),
            revoked: resp.revoked_peer_ids,
            token_keys: keys(resp.token_keys),
            chunk_keys: keys(resp.chunk_keys),
        })
    }

    /// A new parent for `substream` (`None` = the data plane).
    pub(crate) async fn reparent(
        &self,
        session_id: &str,
        substream: u16,
        exclude: Vec<PeerId>,
    ) -> Result<(AssignedParent, Option<Ticket>), SdkError> {
        let resp = self
            .client
            .clone()
            .reparent(ReparentRequest {
                session_id: session_id.to_string(),
                substream: u32::from(substream),
                exclude_peer_ids: exclude,
            })
            .await
            .map_err(|s| SdkError::from_status("Reparent", s))?
            .into_inner();
        let ticket = resp.parent.as_ref().and_then(ticket_of);
        Ok((
            AssignedParent::from_ref(resp.parent.and_then(|p| p.peer)),
            ticket,
        ))
    }

    /// Tells the control plane that `peer_id` sent a chunk that failed its check.
    pub(crate) async fn report_peer(
        &self,
        session_id: &str,
        peer_id: u64,
        kind: PeerReportKind,
        reason: &str,
    ) -> Result<(), SdkError> {
        self.client
            .clone()
            .report_peer(ReportPeerRequest {
                session_id: session_id.to_string(),
                peer_id,
                reason: reason.to_string(),
                kind: kind as i32,
            })
            .await
            .map_err(|s| SdkError::from_status("ReportPeer", s))?;
        Ok(())
    }

    /// Sends quality reports; returns the highest `report_seq` the control plane holds.
    pub(crate) async fn report(
        &self,
        session_id: &str,
        reports: Vec<ViewerReport>,
    ) -> Result<u64, SdkError> {
        let resp = self
            .client
            .clone()
            .report(ReportRequest {
                session_id: session_id.to_string(),
                reports,
            })
            .await
            .map_err(|s| SdkError::from_status("Report", s))?
            .into_inner();
        Ok(resp.acked_seq)
    }

    pub(crate) async fn leave(&self, session_id: &str) -> Result<(), SdkError> {
        self.client
            .clone()
            .leave(LeaveRequest {
                session_id: session_id.to_string(),
            })
            .await
            .map_err(|s| SdkError::from_status("Leave", s))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn control_channel_binds_to_a_specific_relay_ip_that_can_reach_the_control_plane() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lo = ip("127.3.4.5");
        assert_eq!(control_bind_ip(lo, "http://127.0.0.1:7000"), Some(lo));
        assert_eq!(control_bind_ip(lo, "http://localhost:7000/"), Some(lo));
        assert_eq!(control_bind_ip(lo, "http://10.0.0.1:7000"), None);
        assert_eq!(control_bind_ip(lo, "https://cp.example:443"), None);
        assert_eq!(control_bind_ip(ip("0.0.0.0"), "http://127.0.0.1:1"), None);
        let lan = ip("192.168.1.9");
        assert_eq!(control_bind_ip(lan, "https://cp.example:443"), Some(lan));
        assert_eq!(control_bind_ip(lan, "http://10.0.0.1:7000"), Some(lan));
        assert_eq!(control_bind_ip(lan, "http://[2001:db8::1]:7000"), None);
        let v6 = ip("::1");
        assert_eq!(control_bind_ip(v6, "http://[::1]:7000"), Some(v6));
    }

    #[test]
    fn an_assigned_parent_without_an_address_is_the_data_plane() {
        let r = |id, addr: &str| PeerRef {
            peer_id: id,
            addr: addr.into(),
        };
        let p = AssignedParent::from_ref(Some(r(7, "10.0.0.7:9000")));
        assert_eq!(p.parent, Parent::Peer(7));
        assert_eq!(
            p.peer(),
            Some(PeerAddr {
                id: 7,
                addr: "10.0.0.7:9000".into()
            })
        );
        for q in [
            AssignedParent::from_ref(Some(r(7, ""))),
            AssignedParent::from_ref(None),
        ] {
            assert_eq!(q.parent, Parent::Server);
            assert_eq!(q.peer(), None);
        }
    }
}
