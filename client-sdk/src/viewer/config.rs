//! What a viewer is tuned with: [`ViewerConfig`] and its peer-relaying part
//! [`RelayConfig`], their defaults and validation, and the values derived from them
//! (wire limits, report interval).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use starling_proto::wire::{Limits, MAX_BROADCAST_ID};

use crate::control::{ControlOptions, JoinInfo};
use crate::error::SdkError;
use crate::reorder::ReorderConfig;

/// Everything a viewer can be tuned with. [`ViewerConfig::new`] gives sane defaults.
#[derive(Debug, Clone)]
pub struct ViewerConfig {
    /// The broadcast to play.
    pub broadcast_id: String,
    /// gRPC URL of the control plane (used by [`Viewer::join`](crate::Viewer::join)).
    pub control_url: String,
    /// Viewer credential (JWT from the broadcaster's backend), passed to `Join`.
    pub credential: Option<String>,
    /// Chunk token for [`Viewer::connect_direct`](crate::Viewer::connect_direct) (`Join` supplies its own).
    pub chunk_token: Bytes,
    /// Where the local HTTP endpoint listens; `None` disables it.
    pub http_listen: Option<SocketAddr>,
    /// Limit for one connection attempt (TCP connect + handshake) and control calls.
    pub connect_timeout: Duration,
    /// A data-plane connection silent for this long is considered dead.
    pub idle_timeout: Duration,
    /// First reconnect delay; doubled after each failure up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Cap of the reconnect delay.
    pub reconnect_max: Duration,
    /// Consecutive failed connection attempts after which `Join` is called again (the
    /// broadcast may have moved to another node). Only with a control plane.
    pub rejoin_after_failures: u32,
    /// Reorder window and gap timeout.
    pub reorder: ReorderConfig,
    /// How many recent chunks are kept so that a new consumer starts at once.
    pub history_chunks: usize,
    /// Byte cap of that history.
    pub history_bytes: usize,
    /// Per-consumer queue bound, in chunks. A consumer that falls further behind skips
    /// to the next random-access chunk.
    pub subscriber_queue_chunks: usize,
    /// Largest chunk accepted from the network.
    pub max_chunk_bytes: u32,
    /// Sent to the control plane in `Join`.
    pub client_version: String,
    /// Peer relaying: where to accept peer connections and how much to upload.
    pub relay: RelayConfig,
    /// Play-out lag behind the live edge in the peer grid: chunk `seq` is handed to the
    /// player at its earliest observed availability plus this much, which leaves time
    /// for tree delivery, mesh repair and a last-resort fetch from the data plane.
    /// Default [`crate::DEFAULT_TARGET_LAG`], 1.5 s (the p99 lag bar is 3 s; the
    /// schedule catches up at up to 1.1x speed when the stream arrives sooner,
    /// [`starling_grid::peer::SchedulerConfig::catch_up`]). Viewers without a
    /// grid assignment ([`Viewer::connect_direct`](crate::Viewer::connect_direct), older control planes) play as soon
    /// as chunks are in order, as before.
    pub target_lag: Duration,
    /// How often to send a quality report (`ViewerService.Report`). `None`: the
    /// interval `Join` returns, or 5 s if it returns none.
    pub report_interval: Option<Duration>,
    /// Most reports kept while the control plane is unreachable; beyond it the oldest
    /// are dropped (and counted in [`Stats::reports_dropped`](crate::Stats::reports_dropped)).
    pub report_queue: usize,
    /// Clock-skew tolerance when checking the chunk tokens of peers that connect to us
    /// (not yet valid / expired). Default 5 s.
    pub token_skew: Duration,
    /// Chunks whose signed timestamp is older than this are refused (a replay of an
    /// earlier run or of a recording: a sender is reported like for any bad chunk).
    /// Ages are judged by the control plane's clock as measured from `Join` and the
    /// session stream ([`Self::clock`]), not by the device's own. Default 30 s: ten
    /// times the lag bar, beyond any buffer, key-refresh hold (10 s) and backfill a
    /// chunk spends before it is checked. `None`: no age limit.
    pub chunk_max_age: Option<Duration>,
    /// How far in the future a signed timestamp may be (data-plane clock ahead of the
    /// control plane's). Default 10 s.
    pub chunk_max_future: Duration,
    /// The device clock the SDK corrects ([`crate::WallClock`]; default the system
    /// clock). Tests inject a skewed one.
    pub clock: crate::WallClock,
    /// Signature blocks found authentic, shared with the other viewers of this process
    /// (`None`, the default: this viewer checks every signature itself, as a device
    /// does). Only the Ed25519 check of a block already seen is skipped.
    pub verified_signatures: Option<Arc<starling_proto::integrity::VerifiedSignatures>>,
    /// Insecure mode: play and relay even when `Join`'s answer carries no chunk keys, so
    /// nothing can be verified (a legacy control plane, or a man in the middle who
    /// stripped them). Default false: such a `Join` fails with
    /// [`SdkError::Unverifiable`](crate::SdkError::Unverifiable). Direct connections
    /// ([`Viewer::connect_direct`](crate::Viewer::connect_direct)) have no control plane
    /// and are never verified.
    pub allow_unverified: bool,
    /// The key this viewer's chunk tokens are bound to (`JoinRequest.holder_key`; a
    /// `PROOF` made with it follows every `HELLO_ACK`, see `starling_proto::holder`).
    /// `None`, the default: [`Viewer::join`](crate::Viewer::join) makes a fresh one.
    /// Set it for [`Viewer::connect_direct`](crate::Viewer::connect_direct) with a
    /// token minted for this key.
    pub holder: Option<Arc<starling_proto::holder::HolderKey>>,
    /// How the control plane is reached: TLS (the default, trusting the built-in web
    /// PKI roots; `Transport::Tls(ClientTls::with_ca_pem(..))` trusts a private CA
    /// instead), or `Transport::Plaintext`, the explicit insecure opt-in that alone
    /// allows an `http://` [`ViewerConfig::control_url`] (a WARN line is logged).
    pub transport: starling_proto::transport::Transport,
    /// Limits on the connections other peers open to this viewer's peer listener
    /// (handshake deadline and cap, connection cap, request rate).
    pub peer_limits: crate::PeerLimits,
    /// Chunks signed with a key id this viewer does not hold yet (a node restarted,
    /// took over or rotated its key): how many are held while the keys are refreshed
    /// by an early heartbeat, for how long, and how often such heartbeats may go out.
    pub key_hold: crate::KeyHoldLimits,
    /// A peer parent is judged over the last this many chunks it owed on a substream
    /// (1..=64; default 32), and re-searched and reported (`ReportPeer`, non-delivery)
    /// when more than [`ViewerConfig::parent_max_missed`] of them were skipped, late or
    /// never sent. See [`starling_grid::peer::SchedulerConfig::parent_window`].
    pub parent_window: u16,
    /// Default 10 (of 32).
    pub parent_max_missed: u16,
    /// Keep the control-plane session up with the session stream
    /// (`ViewerService.Session`: changes pushed when they happen, counters sent every
    /// interval the control plane names). Default `true`; a control plane without it
    /// (`UNIMPLEMENTED`) gets unary heartbeats instead, for the rest of the session.
    /// `false`: unary heartbeats only.
    pub session_stream: bool,
    /// HTTP/2 keep-alive PING interval on the control-plane channel, idle or not, so a
    /// dead control plane or path is noticed and the session stream reopened. Default
    /// 15 s; `None`: no keep-alive.
    pub control_keep_alive: Option<Duration>,
    /// A keep-alive PING unanswered this long closes the control-plane connection.
    /// Default 10 s.
    pub control_keep_alive_timeout: Duration,
    /// Most `Join` attempts while the control plane answers `RESOURCE_EXHAUSTED` (a
    /// flash crowd); each retry waits its `grpc-retry-pushback-ms` (or an own
    /// back-off) plus 0..50 % jitter. Default 10.
    pub join_attempts: u32,
    /// No `Join` retry starts later than this after the first attempt. Default 60 s.
    pub join_deadline: Duration,
}

/// Report interval when neither the config nor `Join` says.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Default [`ViewerConfig::chunk_max_age`].
pub const DEFAULT_CHUNK_MAX_AGE: Duration = Duration::from_secs(30);
/// Default [`ViewerConfig::chunk_max_future`].
pub const DEFAULT_CHUNK_MAX_FUTURE: Duration = Duration::from_secs(10);

/// Peer relaying settings ([`ViewerConfig::relay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Where the peer listener binds. Default `0.0.0.0:0` (any interface, a free port).
    pub listen: SocketAddr,
    /// Host (name or IP) other peers should connect to; the port is the listener's.
    /// `None`: the local IP of the socket this viewer uses to reach the control plane
    /// (the address the network routes to; behind NAT this is the private address, so
    /// set it explicitly when peers are elsewhere).
    pub advertise_host: Option<String>,
    /// Upload budget offered for relaying, in kbit/s. `Some(0)`: never relay (no
    /// listener, `Join` says `upload_kbps = 0`). `Some(n)`: exactly `n`. `None`
    /// (estimated): the SDK offers [`RelayConfig::DEFAULT_UPLOAD_KBPS`], a conservative
    /// figure for a residential uplink, then measures what its uplink drains while the
    /// send queues of its children are backlogged ([`starling_grid::peer::UploadEstimator`]);
    /// if that is clearly below the budget, it lowers the budget (and closes the
    /// children beyond the slots it buys, who re-search). The estimate never raises the
    /// budget. [`Stats::upload_budget_kbps`](crate::Stats::upload_budget_kbps) shows the
    /// budget now. The control plane turns the offer into child slots; pushes to
    /// children are additionally paced to the budget over a 2 s window.
    pub max_upload_kbps: Option<u32>,
    /// Most peer connections accepted from one source address at once (handshakes
    /// included); beyond, `ERROR(SERVER_BUSY)`. Default
    /// [`RelayConfig::DEFAULT_MAX_LINKS_PER_IP`]; 0 = unlimited (e.g. many peers of one
    /// host on loopback, which all connect from 127.0.0.1).
    pub max_links_per_ip: u32,
    /// Ask the home router (UPnP-IGD) to forward a public port to the peer listener when
    /// the advertised address would be a private one ([`crate::portmap`]); the viewer
    /// then advertises the router's public address. Not used with `advertise_host`.
    pub port_mapping: crate::portmap::PortMapConfig,
}

impl RelayConfig {
    /// Initial upload budget offered when [`RelayConfig::max_upload_kbps`] is `None`
    /// (then only ever lowered by the estimate): 2 Mbit/s, below most residential
    /// uplinks, and two copies of a 1 Mbit/s stream.
    pub const DEFAULT_UPLOAD_KBPS: u32 = 2_000;
    /// Default of [`RelayConfig::max_links_per_ip`]: a household behind one NAT address
    /// runs a few viewers; an attacker with one address cannot take more.
    pub const DEFAULT_MAX_LINKS_PER_IP: u32 = 8;

    /// Defaults: listen on `0.0.0.0:0`, advertise the local IP, estimated budget.
    pub fn new() -> RelayConfig {
        RelayConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            advertise_host: None,
            max_upload_kbps: None,
            max_links_per_ip: Self::DEFAULT_MAX_LINKS_PER_IP,
            port_mapping: crate::portmap::PortMapConfig::default(),
        }
    }

    /// A configuration that never relays.
    pub fn disabled() -> RelayConfig {
        RelayConfig {
            max_upload_kbps: Some(0),
            ..RelayConfig::new()
        }
    }

    /// The budget offered to the control plane, kbit/s (0 = never relay).
    pub fn upload_kbps(&self) -> u32 {
        self.max_upload_kbps.unwrap_or(Self::DEFAULT_UPLOAD_KBPS)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig::new()
    }
}

impl ViewerConfig {
    /// Defaults for `broadcast_id`: control plane at `http://127.0.0.1:7000`, HTTP
    /// endpoint on `127.0.0.1:0`, reconnect 100 ms .. 5 s.
    pub fn new(broadcast_id: impl Into<String>) -> ViewerConfig {
        ViewerConfig {
            broadcast_id: broadcast_id.into(),
            control_url: "http://127.0.0.1:7000".into(),
            credential: None,
            chunk_token: Bytes::new(),
            http_listen: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            rejoin_after_failures: 3,
            reorder: ReorderConfig::default(),
            history_chunks: 64,
            history_bytes: 32 * 1024 * 1024,
            subscriber_queue_chunks: 64,
            max_chunk_bytes: 4 * 1024 * 1024,
            client_version: concat!("starling-sdk/", env!("CARGO_PKG_VERSION")).into(),
            relay: RelayConfig::new(),
            target_lag: crate::DEFAULT_TARGET_LAG,
            report_interval: None,
            report_queue: 64,
            token_skew: Duration::from_secs(5),
            chunk_max_age: Some(DEFAULT_CHUNK_MAX_AGE),
            chunk_max_future: DEFAULT_CHUNK_MAX_FUTURE,
            clock: crate::WallClock::system(),
            verified_signatures: None,
            allow_unverified: false,
            holder: None,
            transport: starling_proto::transport::Transport::default(),
            peer_limits: crate::PeerLimits::default(),
            key_hold: crate::KeyHoldLimits::default(),
            parent_window: starling_grid::peer::SchedulerConfig::default().parent_window,
            parent_max_missed: starling_grid::peer::SchedulerConfig::default().parent_max_missed,
            session_stream: true,
            control_keep_alive: Some(Duration::from_secs(15)),
            control_keep_alive_timeout: Duration::from_secs(10),
            join_attempts: 10,
            join_deadline: Duration::from_secs(60),
        }
    }

    pub(super) fn validate(&self) -> Result<(), SdkError> {
        if self.broadcast_id.is_empty() || self.broadcast_id.len() > MAX_BROADCAST_ID {
            return Err(SdkError::Config(format!(
                "broadcast id must be 1..={MAX_BROADCAST_ID} bytes"
            )));
        }
        if self.target_lag.is_zero() || self.target_lag > Duration::from_secs(60) {
            return Err(SdkError::Config(
                "target_lag must be in (0, 60 s]".to_string(),
            ));
        }
        self.peer_limits
            .validate()
            .map_err(|e| SdkError::Config(e.to_string()))?;
        if self
            .report_interval
            .is_some_and(|d| d < Duration::from_millis(10))
        {
            return Err(SdkError::Config(
                "report_interval must be at least 10 ms".to_string(),
            ));
        }
        Ok(())
    }

    /// How the control-plane channel is set up (`local`: the IP to bind to).
    pub(super) fn control_options(&self, local: Option<IpAddr>) -> ControlOptions {
        ControlOptions {
            timeout: self.connect_timeout,
            local,
            bind_from: None,
            keep_alive: self.control_keep_alive.filter(|d| !d.is_zero()),
            keep_alive_timeout: self.control_keep_alive_timeout,
            join_attempts: self.join_attempts,
            join_deadline: self.join_deadline,
            require_chunk_keys: !self.allow_unverified,
            holder_key: self
                .holder
                .as_ref()
                .map(|h| h.public_key())
                .unwrap_or_default(),
            transport: self.transport.clone(),
        }
    }

    pub(super) fn limits(&self) -> Limits {
        Limits {
            max_chunk_payload: self.max_chunk_bytes.saturating_add(32),
            ..Limits::default()
        }
    }
}

/// The report interval: the config's override, else `Join`'s, else 5 s.
pub(super) fn report_interval(config: &ViewerConfig, join: &JoinInfo) -> Duration {
    config
        .report_interval
        .or(join.report_interval)
        .unwrap_or(DEFAULT_REPORT_INTERVAL)
}
