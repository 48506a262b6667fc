//! Prometheus metrics (text exposition format 0.0.4), hand-rolled like the data
//! plane's: relaxed atomics updated on the request path (no lock, no registry), plus
//! gauges read at scrape time (viewers per broadcast from the live grids, report queue
//! depth, alive nodes from the database). Served on a separate HTTP listener
//! (`--metrics-listen`, `GET /metrics`) by [`serve`].
//!
//! RPC metrics come from [`RpcMetricsLayer`], a tower layer around every gRPC service:
//! one counter and one latency histogram per (service, method, status code), over a
//! fixed table of methods so label cardinality is bounded (anything else is
//! `method="other"`). The status code is the `grpc-status` header of the response
//! (trailers-only responses, i.e. errors) and OK otherwise; for server streams the
//! latency is the time to open the stream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use starling_telemetry::prom::{Exposition, Kind};
use tokio::net::TcpListener;
use tonic::codegen::http;

/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = starling_telemetry::prom::CONTENT_TYPE;

/// gRPC methods with their own series: (service as in the path, method).
const METHODS: &[(&str, &str)] = &[
    ("starling.v1.AdminService", "CreateBroadcast"),
    ("starling.v1.AdminService", "StartBroadcast"),
    ("starling.v1.AdminService", "StopBroadcast"),
    ("starling.v1.AdminService", "GetBroadcast"),
    ("starling.v1.AdminService", "ListBroadcasts"),
    ("starling.v1.AdminService", "RevokeViewer"),
    ("starling.v1.AdminService", "GetAudience"),
    ("starling.v1.ViewerService", "Join"),
    ("starling.v1.ViewerService", "Heartbeat"),
    ("starling.v1.ViewerService", "Leave"),
    ("starling.v1.ViewerService", "Reparent"),
    ("starling.v1.ViewerService", "ReportPeer"),
    ("starling.v1.ViewerService", "Report"),
    ("starling.v1.ViewerService", "Session"),
    ("starling.v1.EdgeService", "Register"),
    ("starling.v1.EdgeService", "Commands"),
    ("starling.v1.EdgeService", "ReportHealth"),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    ("other", "other"),
];
const JOIN: usize = 7;
const CODES: usize = 17;
const CODE_NAMES: [&str; CODES] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Upper bounds (seconds) of the latency histograms (+Inf implicit).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        let mut cum = 0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, b)| {
                cum += get(&self.buckets[i]);
                (*b, cum)
            })
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let sum = get(&self.sum_ns) as f64 / 1e9;
        out.histogram(name, labels, &buckets, sum, get(&self.count));
    }
}

/// A refused (or short-cut) viewer call, by reason (issue 13): each has its own series
/// of `starling_cp_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Join` beyond the caller address's rate (RESOURCE_EXHAUSTED).
    JoinRate,
    /// `Join` beyond the bound on joins in flight (flash crowd; RESOURCE_EXHAUSTED).
    JoinsInFlight,
    /// `Join` with a `peer_addr` not on the caller's address (PERMISSION_DENIED).
    PeerAddr,
    /// A call for a session id the negative cache knows is unknown or ended (answered
    /// without the database).
    UnknownSessionCached,
    /// A database look-up of an unknown session beyond the caller address's rate
    /// (RESOURCE_EXHAUSTED).
    UnknownSessionRate,
    /// `ReportPeer` about a peer that is not the reporter's parent or neighbour.
    ReportNotAssigned,
    /// `ReportPeer` about oneself.
    ReportSelf,
    /// `ReportPeer` beyond the per-session cap.
    ReportTooMany,
}

impl Refusal {
    const ALL: [Refusal; 8] = [
        Refusal::JoinRate,
        Refusal::JoinsInFlight,
        Refusal::PeerAddr,
        Refusal::UnknownSessionCached,
        Refusal::UnknownSessionRate,
        Refusal::ReportNotAssigned,
        Refusal::ReportSelf,
        Refusal::ReportTooMany,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::JoinRate => "join_rate",
            Refusal::JoinsInFlight => "joins_in_flight",
            Refusal::PeerAddr => "peer_addr",
            Refusal::UnknownSessionCached => "unknown_session_cached",
            Refusal::UnknownSessionRate => "unknown_session_rate",
            Refusal::ReportNotAssigned => "report_not_assigned",
            Refusal::ReportSelf => "report_self",
            Refusal::ReportTooMany => "report_too_many",
        }
    }
}

/// What a session stream pushed, for `starling_cp_session_pushes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The first message of a stream (everything).
    First,
    /// Changed parents (moves, ticket renewals).
    Parents,
    /// A changed neighbour list.
    Neighbours,
    /// A renewed chunk token.
    Token,
    /// New revocations.
    Revocations,
    /// Changed key sets.
    Keys,
    /// `active = false`: the session is over.
    End,
}

impl Pushed {
    const ALL: [Pushed; 7] = [
        Pushed::First,
        Pushed::Parents,
        Pushed::Neighbours,
        Pushed::Token,
        Pushed::Revocations,
        Pushed::Keys,
        Pushed::End,
    ];

    fn label(self) -> &'static str {
        match self {
            Pushed::First => "first",
            Pushed::Parents => "parents",
            Pushed::Neighbours => "neighbours",
            Pushed::Token => "token",
            Pushed::Revocations => "revocations",
            Pushed::Keys => "keys",
            Pushed::End => "end",
        }
    }
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The control plane's counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    rpc: Vec<Histogram>,
    reports_received: AtomicU64,
    reports_accepted: AtomicU64,
    reports_duplicate: AtomicU64,
    reports_dropped: AtomicU64,
    reports_stored: AtomicU64,
    reports_stored_duplicate: AtomicU64,
    reports_pruned: AtomicU64,
    reports_quarantined: AtomicU64,
    clamped_reports: AtomicU64,
    clamped_heartbeats: AtomicU64,
    bytes_from_server: AtomicU64,
    bytes_from_peers: AtomicU64,
    db_batches: AtomicU64,
    db_batch_errors: AtomicU64,
    db_batch_seconds: Histogram,
    refusals: [AtomicU64; Refusal::ALL.len()],
    unknown_session_lookups: AtomicU64,
    upload_capped_joins: AtomicU64,
    /// Reachability probes of relays' advertised addresses: [reachable, unreachable].
    probes: [AtomicU64; 2],
    /// Session streams open now (a gauge kept by open/close).
    session_streams: AtomicU64,
    /// Parts pushed on session streams, by [`Pushed`] kind.
    session_pushes: [AtomicU64; Pushed::ALL.len()],
    /// Counters messages (`SessionUp` after the first) received.
    session_counters: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero.
    pub fn new() -> Self {
        Metrics {
            rpc: (0..METHODS.len() * CODES)
                .map(|_| Histogram::default())
                .collect(),
            reports_received: AtomicU64::new(0),
            reports_accepted: AtomicU64::new(0),
            reports_duplicate: AtomicU64::new(0),
            reports_dropped: AtomicU64::new(0),
            reports_stored: AtomicU64::new(0),
            reports_stored_duplicate: AtomicU64::new(0),
            reports_pruned: AtomicU64::new(0),
            reports_quarantined: AtomicU64::new(0),
            clamped_reports: AtomicU64::new(0),
            clamped_heartbeats: AtomicU64::new(0),
            bytes_from_server: AtomicU64::new(0),
            bytes_from_peers: AtomicU64::new(0),
            db_batches: AtomicU64::new(0),
            db_batch_errors: AtomicU64::new(0),
            db_batch_seconds: Histogram::default(),
            refusals: Default::default(),
            unknown_session_lookups: AtomicU64::new(0),
            upload_capped_joins: AtomicU64::new(0),
            probes: Default::default(),
            session_streams: AtomicU64::new(0),
            session_pushes: Default::default(),
            session_counters: AtomicU64::new(0),
        }
    }

    /// Counts one refusal.
    pub fn refused(&self, why: Refusal) {
        add(&self.refusals[why as usize], 1);
    }

    /// Refusals of one reason so far.
    pub fn refusals(&self, why: Refusal) -> u64 {
        get(&self.refusals[why as usize])
    }

    /// Counts one database look-up of a session this process does not hold in memory.
    pub fn unknown_session_lookup(&self) {
        add(&self.unknown_session_lookups, 1);
    }

    /// Database look-ups of sessions this process did not hold in memory so far.
    pub fn unknown_session_lookups(&self) -> u64 {
        get(&self.unknown_session_lookups)
    }

    /// Counts a join whose upload claim was capped.
    pub fn upload_capped_join(&self) {
        add(&self.upload_capped_joins, 1);
    }

    /// Joins whose upload claim was capped so far.
    pub fn upload_capped_joins(&self) -> u64 {
        get(&self.upload_capped_joins)
    }

    /// One reachability probe finished ([`crate::reachability`]).
    pub fn probed(&self, reachable: bool) {
        add(&self.probes[usize::from(!reachable)], 1);
    }

    /// Reachability probes so far: (reachable, unreachable).
    pub fn probes(&self) -> (u64, u64) {
        (get(&self.probes[0]), get(&self.probes[1]))
    }

    /// A session stream opened.
    pub fn stream_opened(&self) {
        add(&self.session_streams, 1);
    }

    /// A session stream closed.
    pub fn stream_closed(&self) {
        let _ = self
            .session_streams
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Session streams open now.
    pub fn session_streams(&self) -> u64 {
        get(&self.session_streams)
    }

    /// Counts one part pushed on a session stream.
    pub fn pushed(&self, what: Pushed) {
        add(&self.session_pushes[what as usize], 1);
    }

    /// Parts of one kind pushed on session streams so far.
    pub fn pushes(&self, what: Pushed) -> u64 {
        get(&self.session_pushes[what as usize])
    }

    /// Counts one counters message received on a session stream.
    pub fn counters_received(&self) {
        add(&self.session_counters, 1);
    }

    /// Counters messages received on session streams so far.
    pub fn session_counters(&self) -> u64 {
        get(&self.session_counters)
    }

    fn method_index(path: &str) -> usize {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        METHODS
            .iter()
            .position(|&(s, m)| s == service && m == method)
            .unwrap_or(METHODS.len() - 1)
    }

    /// Records one finished RPC (`path` = `/package.Service/Method`).
    pub fn rpc(&self, path: &str, code: usize, elapsed: Duration) {
        let i = Self::method_index(path) * CODES + code.min(CODES - 1);
        self.rpc[i].observe(elapsed);
    }

    /// Calls of one method with one status code so far (`code` = gRPC code number).
    pub fn rpc_count(&self, service: &str, method: &str, code: usize) -> u64 {
        let m = Self::method_index(&format!("/{service}/{method}"));
        get(&self.rpc[m * CODES + code.min(CODES - 1)].count)
    }

    pub(crate) fn reports_received(&self, n: usize) {
        add(&self.reports_received, n as u64);
    }
    pub(crate) fn reports_accepted(&self, n: usize, from_server: u64, from_peers: u64) {
        add(&self.reports_accepted, n as u64);
        add(&self.bytes_from_server, from_server);
        add(&self.bytes_from_peers, from_peers);
    }
    pub(crate) fn reports_duplicate(&self, n: usize) {
        add(&self.reports_duplicate, n as u64);
    }
    pub(crate) fn reports_dropped(&self, n: usize) -> u64 {
        self.reports_dropped.fetch_add(n as u64, Ordering::Relaxed) + n as u64
    }
    pub(crate) fn batch_written(&self, inserted: usize, duplicates: usize, elapsed: Duration) {
        add(&self.db_batches, 1);
        add(&self.reports_stored, inserted as u64);
        add(&self.reports_stored_duplicate, duplicates as u64);
        self.db_batch_seconds.observe(elapsed);
    }
    pub(crate) fn batch_failed(&self) -> u64 {
        self.db_batch_errors.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(crate) fn pruned(&self, n: u64) {
        add(&self.reports_pruned, n);
    }
    pub(crate) fn reports_quarantined(&self, n: u64) -> u64 {
        self.reports_quarantined.fetch_add(n, Ordering::Relaxed) + n
    }
    pub(crate) fn counters_clamped_report(&self, n: usize) -> u64 {
        self.clamped_reports.fetch_add(n as u64, Ordering::Relaxed) + n as u64
    }
    pub(crate) fn counters_clamped_heartbeat(&self) -> u64 {
        self.clamped_heartbeats.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Report rows the database refused for good (dropped).
    pub fn quarantined_reports(&self) -> u64 {
        get(&self.reports_quarantined)
    }
    /// Reports whose counters were clamped to their physical bound.
    pub fn clamped_reports(&self) -> u64 {
        get(&self.clamped_reports)
    }
    /// Heartbeats whose counters were clamped to their physical bound.
    pub fn clamped_heartbeats(&self) -> u64 {
        get(&self.clamped_heartbeats)
    }

    /// Reports refused because the queue was full.
    pub fn dropped_reports(&self) -> u64 {
        get(&self.reports_dropped)
    }
    /// Reports written to the database.
    pub fn stored_reports(&self) -> u64 {
        get(&self.reports_stored)
    }
    /// Failed batch writes.
    pub fn batch_errors(&self) -> u64 {
        get(&self.db_batch_errors)
    }
}

/// What a scrape reads beyond the counters of [`Metrics`]: gauges and counters owned by
/// other parts of the control plane (live grids, report queue, database), filled by their
/// owner (`service::Core::metrics_snapshot`) so that this module depends on none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `(broadcast id, viewer sessions in this process's grid)` of every grid.
    pub viewers: Vec<(String, usize)>,
    /// Viewer reports waiting to be written to the database.
    pub report_queue_depth: usize,
    /// Bound of the report write queue.
    pub report_queue_capacity: usize,
    /// Sessions whose last report this process remembers.
    pub report_sessions: usize,
    /// Granted upload budgets raised because heartbeats confirmed them.
    pub uploads_confirmed: u64,
    /// `ReportPeer` reports accepted.
    pub peer_reports: u64,
    /// Peers demoted by reports from enough distinct addresses.
    pub peers_demoted: u64,
    /// Data-plane nodes alive, `None` when the database did not answer this scrape.
    pub nodes_alive: Option<usize>,
}

/// Renders every metric of the control plane from its counters `m` and the state `s`
/// read for this scrape (`starling_cp_db_up` says whether the database answered).
pub fn render(m: &Metrics, s: Snapshot) -> String {
    let mut out = Exposition::with_capacity(16 * 1024);

    let name = "starling_cp_grpc_server_handled_total";
    out.family(
        name,
        Kind::Counter,
        "gRPC calls completed, by service, method and status code.",
    );
    for (mi, (svc, meth)) in METHODS.iter().enumerate() {
        for (ci, code) in CODE_NAMES.iter().enumerate() {
            let n = get(&m.rpc[mi * CODES + ci].count);
            if n > 0 {
                out.sample(
                    name,
                    &[
                        ("grpc_service", svc),
                        ("grpc_method", meth),
                        ("grpc_code", code),
                    ],
                    n,
                );
            }
        }
    }
    let name = "starling_cp_grpc_server_handling_seconds";
    out.family(
        name,
        Kind::Histogram,
        "gRPC call latency (to the response headers), by service, method and status code.",
    );
    for (mi, (svc, meth)) in METHODS.iter().enumerate() {
        for (ci, code) in CODE_NAMES.iter().enumerate() {
            let h = &m.rpc[mi * CODES + ci];
            if get(&h.count) > 0 {
                let labels = [
                    ("grpc_service", *svc),
                    ("grpc_method", *meth),
                    ("grpc_code", *code),
                ];
                h.render(&mut out, name, &labels);
            }
        }
    }
    out.counter(
        "starling_cp_joins_total",
        "Successful ViewerService.Join calls.",
        get(&m.rpc[JOIN * CODES].count),
    );

    let name = "starling_cp_viewers";
    out.family(
        name,
        Kind::Gauge,
        "Viewer sessions in this process's peer grid, per broadcast.",
    );
    for (b, n) in s.viewers {
        out.sample(name, &[("broadcast_id", &b)], n);
    }

    let name = "starling_cp_viewer_bytes_total";
    out.family(
        name,
        Kind::Counter,
        "Bytes viewers received, by source, as reported (deltas of accepted reports).",
    );
    out.sample(name, &[("source", "server")], get(&m.bytes_from_server));
    out.sample(name, &[("source", "peers")], get(&m.bytes_from_peers));

    out.counter(
        "starling_cp_reports_received_total",
        "Viewer reports received in Report calls.",
        get(&m.reports_received),
    );
    out.counter(
        "starling_cp_reports_accepted_total",
        "Viewer reports accepted into the write queue.",
        get(&m.reports_accepted),
    );
    out.counter(
        "starling_cp_reports_duplicate_total",
        "Viewer reports ignored because their report_seq was already accepted.",
        get(&m.reports_duplicate),
    );
    out.counter(
        "starling_cp_reports_dropped_total",
        "Viewer reports refused because the write queue was full (--report-queue-max).",
        get(&m.reports_dropped),
    );
    out.counter(
        "starling_cp_reports_stored_total",
        "Viewer reports written to the database.",
        get(&m.reports_stored),
    );
    out.counter(
        "starling_cp_reports_stored_duplicate_total",
        "Rows of retried batches that were already stored.",
        get(&m.reports_stored_duplicate),
    );
    out.counter(
        "starling_cp_reports_quarantined_total",
        "Viewer report rows the database refused (data or constraint errors); dropped so the rest of their batch commits.",
        get(&m.reports_quarantined),
    );
    let name = "starling_cp_counters_clamped_total";
    out.family(
        name,
        Kind::Counter,
        "Viewer reports and heartbeats whose byte or stall counters grew beyond what is physically possible in the time covered, clamped to that bound, by RPC.",
    );
    out.sample(name, &[("rpc", "Report")], get(&m.clamped_reports));
    out.sample(name, &[("rpc", "Heartbeat")], get(&m.clamped_heartbeats));
    out.counter(
        "starling_cp_reports_pruned_total",
        "Raw viewer reports deleted after the retention period.",
        get(&m.reports_pruned),
    );
    out.gauge(
        "starling_cp_report_queue_depth",
        "Viewer reports waiting to be written to the database.",
        s.report_queue_depth as u64,
    );
    out.gauge(
        "starling_cp_report_queue_capacity",
        "Bound of the report write queue.",
        s.report_queue_capacity as u64,
    );
    out.gauge(
        "starling_cp_report_sessions",
        "Sessions whose last report this process remembers.",
        s.report_sessions as u64,
    );
    out.counter(
        "starling_cp_db_write_batches_total",
        "Report batches written to the database.",
        get(&m.db_batches),
    );
    out.counter(
        "starling_cp_db_write_errors_total",
        "Report batch writes that failed (and were retried).",
        get(&m.db_batch_errors),
    );
    let name = "starling_cp_db_write_batch_seconds";
    out.family(
        name,
        Kind::Histogram,
        "Time to write one report batch (one transaction).",
    );
    m.db_batch_seconds.render(&mut out, name, &[]);

    let name = "starling_cp_refusals_total";
    out.family(
        name,
        Kind::Counter,
        "Viewer calls refused or answered without the database by a flood or trust limit, by reason.",
    );
    for r in Refusal::ALL {
        out.sample(name, &[("reason", r.label())], get(&m.refusals[r as usize]));
    }
    out.counter(
        "starling_cp_unknown_session_lookups_total",
        "Database look-ups of sessions not in this process's memory (heartbeat, leave, report).",
        get(&m.unknown_session_lookups),
    );
    out.counter(
        "starling_cp_upload_capped_joins_total",
        "Joins whose claimed upload was capped until heartbeats confirm it.",
        get(&m.upload_capped_joins),
    );
    let name = "starling_cp_reachability_probes_total";
    out.family(
        name,
        Kind::Counter,
        "Probes of the addresses relays advertise (a relay gets children only once reachable), by result.",
    );
    for (i, result) in ["reachable", "unreachable"].into_iter().enumerate() {
        out.sample(name, &[("result", result)], get(&m.probes[i]));
    }
    out.counter(
        "starling_cp_upload_confirmations_total",
        "Granted upload budgets raised because heartbeats confirmed the uploads.",
        s.uploads_confirmed,
    );
    out.counter(
        "starling_cp_peer_reports_total",
        "ReportPeer reports accepted (each counts once per distinct reporter address).",
        s.peer_reports,
    );
    out.counter(
        "starling_cp_peers_demoted_total",
        "Peers demoted (never a parent again) by reports from enough distinct addresses.",
        s.peers_demoted,
    );

    out.gauge(
        "starling_cp_session_streams",
        "ViewerService.Session streams open now.",
        get(&m.session_streams),
    );
    let name = "starling_cp_session_pushes_total";
    out.family(
        name,
        Kind::Counter,
        "Parts pushed on session streams (one SessionDown may carry several), by kind; end = active false.",
    );
    for p in Pushed::ALL {
        out.sample(
            name,
            &[("kind", p.label())],
            get(&m.session_pushes[p as usize]),
        );
    }
    out.counter(
        "starling_cp_session_counters_total",
        "Counters messages (SessionUp after the first) received on session streams.",
        get(&m.session_counters),
    );

    match s.nodes_alive {
        Some(nodes) => {
            out.gauge(
                "starling_cp_db_up",
                "1 when the database answered this scrape.",
                1,
            );
            out.gauge(
                "starling_cp_nodes_alive",
                "Data-plane nodes alive.",
                nodes as u64,
            );
        }
        None => out.gauge(
            "starling_cp_db_up",
            "1 when the database answered this scrape.",
            0,
        ),
    }
    out.finish()
}

/// Serves `GET /metrics` (and `GET /healthz`) over HTTP/1.1 until the task is aborted;
/// `scrape` produces the exposition text of one scrape.
pub async fn serve<F, Fut>(listener: TcpListener, scrape: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let scrape = scrape.clone();
                    async move {
                        let resp = match (req.method(), req.uri().path()) {
                            (&hyper::Method::GET, "/metrics") => Response::builder()
                                .header("content-type", CONTENT_TYPE)
                                .body(Full::new(Bytes::from(scrape().await))),
                            (&hyper::Method::GET, "/healthz") => {
                                Response::builder().body(Full::new(Bytes::from_static(b"ok\n")))
                            }
                            _ => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"not found\n"))),
                        };
                        resp.map_err(|e| std::io::Error::other(e.to_string()))
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// Binds the metrics listener (`None` when disabled).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Tower layer recording every gRPC call in [`Metrics`].
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        RpcMetricsLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

fn grpc_code(headers: &http::HeaderMap) -> usize {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
}

impl<S, ReqB, ResB> tower_service::Service<http::Request<ReqB>> for RpcMetricsService<S>
where
    S: tower_service::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let path = req.uri().path().to_string();
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                Ok(resp) => grpc_code(resp.headers()),
                Err(_) => 2,
            };
            metrics.rpc(&path, code, start.elapsed());
            r
        })
    }
}
