//! Taking peers out of a grid on someone's word: revocation of viewers (by subject or
//! session) and bad-peer reports that demote a peer reported from distinct addresses.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use starling_proto::v1::PeerReportKind;

use super::{
    BadPeerReport, LiveGrids, MAX_REPORTS_PER_SESSION, ReportRefused, RevokeTarget, Revoked,
};
use starling_grid::assign::PeerId;

impl LiveGrids {
    /// Removes the sessions of `broadcast_id` matching `target` from the grid (their
    /// children are re-parented) and returns them, for the caller to end in the database
    /// and announce.
    pub fn revoke(&self, broadcast_id: &str, target: RevokeTarget<'_>) -> Vec<Revoked> {
        let now = self.now();
        let removed = self.take_sessions(|id, e| {
            &**e.broadcast_id() == broadcast_id
                && match target {
                    RevokeTarget::Subject(sub) => e.subject.as_deref() == Some(sub),
                    RevokeTarget::Session(s) => id == s,
                }
        });
        removed
            .into_iter()
            .map(|(session_id, e)| Revoked {
                moved: e.grid.state.lock().remove_peer(e.peer_id, now),
                session_id: session_id.to_string(),
                peer_id: e.peer_id,
                credential_expires_at: e.credential_expires_at,
            })
            .collect()
    }

    /// A viewer reports `peer_id`: it sent a chunk failing verification
    /// ([`PeerReportKind::BadChunk`]; the peer must be one of the session's recent
    /// parents or neighbours) or did not deliver its pushes
    /// ([`PeerReportKind::NonDelivery`]; it must be one of the session's recent
    /// parents). A report counts once per distinct reporter address
    /// ([`crate::limits::addr_key`] of the IP the reporter joined from); at
    /// [`TrustConfig::report_threshold`] (bad chunks) or
    /// [`TrustConfig::demote_threshold`] (non-delivery) distinct addresses within
    /// [`TrustConfig::report_window`] the peer is
    /// demoted: never assigned as a parent again in that broadcast, its children
    /// re-parented (they learn it at their next heartbeat).
    ///
    /// # Errors
    /// [`ReportRefused`] for an unknown session, a self-report, a peer that is not the
    /// session's to report, or too many reports.
    pub fn report_bad_peer(
        &self,
        session_id: &str,
        peer_id: PeerId,
        kind: PeerReportKind,
    ) -> Result<BadPeerReport, ReportRefused> {
        let now = self.now();
        let as_parent = kind == PeerReportKind::NonDelivery;
        let (grid, reporter, broadcast_id, addr) = {
            let mut sessions = self.sessions.lock();
            let e = sessions
                .get_mut(session_id)
                .ok_or(ReportRefused::UnknownSession)?;
            if e.peer_id == peer_id {
                return Err(ReportRefused::SelfReport);
            }
            if !e.may_report(peer_id, as_parent, now) {
                return Err(ReportRefused::NotAssigned {
                    peer_id,
                    role: if as_parent {
                        "parents"
                    } else {
                        "parents or neighbours"
                    },
                });
            }
            if !e.reported.contains(&peer_id) {
                if e.reported.len() >= MAX_REPORTS_PER_SESSION {
                    return Err(ReportRefused::TooManyReports);
                }
                e.reported.push(peer_id);
            }
            (
                e.grid.clone(),
                e.peer_id,
                e.broadcast_id().to_string(),
                e.addr
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            )
        };
        self.bad_peer_reports.fetch_add(1, Ordering::Relaxed);
        let mut st = grid.state.lock();
        let known_peer = st.peers.contains_key(&peer_id);
        if !known_peer {
            return Ok(BadPeerReport {
                broadcast_id,
                reporter,
                known_peer,
                reporters: 0,
                excluded: false,
                moved: 0,
            });
        }
        let (reporters, threshold) = if as_parent {
            let t = self.trust.demote_threshold;
            let w = self.trust.report_window;
            (st.non_delivery.add(peer_id, addr, t, w, now), t)
        } else {
            let t = self.trust.report_threshold;
            let w = self.trust.report_window;
            (st.bad_chunk.add(peer_id, addr, t, w, now), t)
        };
        let excluded = reporters >= threshold.max(1) && st.assigner.is_bad(peer_id) == Some(false);
        let moved = if excluded {
            self.peers_demoted.fetch_add(1, Ordering::Relaxed);
            let moved = st.assigner.report_bad_peer(peer_id, now);
            st.wake_moved(&moved)
        } else {
            0
        };
        Ok(BadPeerReport {
            broadcast_id,
            reporter,
            known_peer,
            reporters,
            excluded,
            moved,
        })
    }

    /// Peers demoted (excluded as parents) by reports since start.
    pub fn peers_demoted(&self) -> u64 {
        self.peers_demoted.load(Ordering::Relaxed)
    }

    /// Upload budgets raised by confirming heartbeats since start.
    pub fn uploads_confirmed(&self) -> u64 {
        self.uploads_confirmed.load(Ordering::Relaxed)
    }

    /// Whether a peer of a broadcast's grid is demoted (`None`: no such peer).
    pub fn is_demoted(&self, broadcast_id: &str, peer_id: PeerId) -> Option<bool> {
        let grid = self.broadcasts.lock().get(broadcast_id).cloned()?;
        grid.state.lock().assigner.is_bad(peer_id)
    }

    /// Bad-peer reports accepted since start.
    pub fn bad_peer_reports(&self) -> u64 {
        self.bad_peer_reports.load(Ordering::Relaxed)
    }
}
