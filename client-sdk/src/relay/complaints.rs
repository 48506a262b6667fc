//! Complaints about peers to the control plane (`ViewerService.ReportPeer`), made off
//! the engine: a bad chunk ([`PeerReportKind::BadChunk`], from the link that sent it)
//! and a parent that withholds its pushes ([`PeerReportKind::NonDelivery`], from the
//! scheduler's [`starling_grid::peer::Action::ReportParent`]).

use std::time::Duration;

use starling_proto::v1::PeerReportKind;

use super::Engine;
use starling_grid::PeerId;

impl Engine {
    /// A parent failed too many of the pushes it owed (the scheduler re-searches the
    /// substream without it): complain to the control plane.
    pub(super) fn report_non_delivery(&mut self, s: u16, parent: PeerId, missed: u32, window: u32) {
        tracing::warn!(
            substream = s,
            parent,
            missed,
            window,
            "parent skipped, delayed or never sent too many pushes: re-searching and reporting it"
        );
        self.shared.stats_mut().parents_reported_non_delivery += 1;
        let why = format!(
            "substream {s}: {missed} of the last {window} chunks owed were skipped, late or never sent"
        );
        self.spawn_report(parent, PeerReportKind::NonDelivery, why);
    }

    /// `ReportPeer`, off the engine (bounded by a timeout; failures are only logged).
    pub(super) fn spawn_report(&self, id: PeerId, kind: PeerReportKind, why: String) {
        let control = self.control.clone();
        let session = self.session_id.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(
                Duration::from_secs(5),
                control.report_peer(&session, id, kind, &why),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::info!(peer = id, "ReportPeer failed: {e}"),
                Err(_) => tracing::info!(peer = id, "ReportPeer timed out"),
            }
        });
    }
}
