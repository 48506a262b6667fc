//! What a `/metrics` scrape reads of the services' state: the owner fills a
//! [`Snapshot`] (live grids, report queue, alive nodes from the database) and
//! [`crate::metrics`] renders it with its counters, without depending on [`Core`].

use std::time::Duration;

use crate::metrics::{self, Snapshot};

use super::Core;

impl Core {
    /// The state a scrape reads. The alive nodes come from the database, bounded by a
    /// 1 s timeout (`nodes_alive` is `None` when it did not answer).
    pub async fn metrics_snapshot(&self) -> Snapshot {
        let viewers = self.grids.peer_counts();
        let r = &self.reports;
        let report_queue_depth = r.queue_depth();
        let report_queue_capacity = r.queue_capacity();
        let report_sessions = r.tracked_sessions();
        let uploads_confirmed = self.grids.uploads_confirmed();
        let peer_reports = self.grids.bad_peer_reports();
        let peers_demoted = self.grids.peers_demoted();
        let alive =
            tokio::time::timeout(Duration::from_secs(1), self.store.list_alive_nodes()).await;
        Snapshot {
            viewers,
            report_queue_depth,
            report_queue_capacity,
            report_sessions,
            uploads_confirmed,
            peer_reports,
            peers_demoted,
            nodes_alive: match alive {
                Ok(Ok(nodes)) => Some(nodes.len()),
                _ => None,
            },
        }
    }

    /// The Prometheus exposition of one scrape ([`metrics::render`] of this process's
    /// counters and [`Core::metrics_snapshot`]).
    pub async fn render_metrics(&self) -> String {
        metrics::render(&self.metrics, self.metrics_snapshot().await)
    }
}
