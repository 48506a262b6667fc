//! Typed configuration of a data-plane node (the binary maps its flags onto this).

use std::net::SocketAddr;
use std::time::Duration;

/// A broadcast ingested at startup without a control plane (`--static-broadcast`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBroadcast {
    pub id: String,
    pub url: String,
}

impl std::str::FromStr for StaticBroadcast {
    type Err = String;
    /// `ID=URL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, url) = s
            .split_once('=')
            .ok_or_else(|| format!("expected ID=URL, got {s:?}"))?;
        let id = id.trim();
        if id.is_empty() || id.len() > starling_proto::wire::MAX_BROADCAST_ID {
            return Err(format!("broadcast id must be 1..=128 bytes, got {id:?}"));
        }
        if !url.starts_with("http://") {
            return Err(format!("only http:// sources are supported, got {url:?}"));
        }
        Ok(StaticBroadcast {
            id: id.to_owned(),
            url: url.trim().to_owned(),
        })
    }
}

/// Timeouts and slow-viewer policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// HELLO and SUBSCRIBE (and a whole HTTP request head) must arrive within this.
    pub handshake: Duration,
    /// A viewer whose socket accepts nothing for this long is dropped.
    pub write_stall: Duration,
    /// A source that sends nothing for this long is reconnected.
    pub source_idle: Duration,
    /// Connect + response-head timeout for sources.
    pub source_connect: Duration,
    /// A wire connection to which nothing was sent for this long gets a `PING`.
    pub keepalive: Duration,
    /// A subscribed wire connection from which nothing (not even `PONG`) was received
    /// for this long is closed with `ERROR(IDLE_TIMEOUT)`.
    pub idle: Duration,
    /// Skips to the live edge allowed before `GOODBYE(TooSlow)`.
    pub max_skips: u32,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            write_stall: Duration::from_secs(10),
            source_idle: Duration::from_secs(10),
            source_connect: Duration::from_secs(5),
            keepalive: Duration::from_secs(5),
            idle: Duration::from_secs(30),
            max_skips: 3,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC URL of the control plane (`http://host:port`); `None` = standalone.
    pub control_url: Option<String>,
    /// Broadcasts ingested at startup.
    pub static_broadcasts: Vec<StaticBroadcast>,
    /// Target chunk duration of static broadcasts.
    pub static_chunk_ms: u32,
    /// Substreams K of static broadcasts (1..=64; the control plane sends its own K).
    pub static_substreams: u16,
    pub wire_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Host advertised to the control plane (with the bound ports).
    pub advertise_host: String,
    pub node_name: String,
    /// glommio executors (one per core); 0 = all available cores.
    pub cores: usize,
    pub window_secs: u32,
    pub max_chunk_bytes: usize,
    /// io_uring registered memory per executor (memlock-bound).
    pub io_memory_kib: usize,
    pub capacity_viewers: u32,
    pub timeouts: Timeouts,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            control_url: None,
            static_broadcasts: Vec::new(),
            static_chunk_ms: 1000,
            static_substreams: 4,
            wire_listen: SocketAddr::from(([0, 0, 0, 0], 7100)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 7180)),
            advertise_host: "127.0.0.1".into(),
            node_name: "dataplane".into(),
            cores: 0,
            window_secs: 30,
            max_chunk_bytes: 1024 * 1024,
            io_memory_kib: 512,
            capacity_viewers: 10_000,
            timeouts: Timeouts::default(),
        }
    }
}

impl Config {
    /// Executors to start.
    pub fn executor_count(&self) -> usize {
        if self.cores == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.cores
        }
    }
}
