//! Starling data plane (the ICD server).
//!
//! * [`chunker`]: sans-IO chunking of progressive live streams (MPEG-TS, MP3, ADTS,
//!   Ogg, WebM, fragmented MP4, raw) into numbered chunks.
//! * [`ring`]: per-broadcast window of recent chunks shared by all executors, viewer
//!   cursors, source health.
//! * [`ingest`]: HTTP ingest with reconnect/backoff (tokio, hyper-util): progressive
//!   streams, and live HLS playlists (MPEG-TS or fMP4 segments) followed with [`hls`].
//! * [`hls`]: sans-IO HLS playlist parsing and the live playlist follower.
//! * [`control`]: control-plane link (tonic `EdgeService`).
//! * [`auth`]: chunk-token checks (offline, Ed25519) and revocations.
//! * [`limits`]: connection caps per node and per source address, per-connection
//!   token buckets, rate-limited logging (pure, `now` passed in).
//! * [`counters`]: node-wide counters (relaxed atomics) shared by executors and ingest.
//! * [`metrics`]: renders a snapshot of the counters and broadcasts on `GET /metrics`
//!   (Prometheus text, through `starling-telemetry`).
//! * [`node`]: wiring: glommio executors (one per core, SO_REUSEPORT listeners for
//!   the wire protocol and plain HTTP) plus one tokio thread.
//! * `serve`: the wire protocol (substream masks, REQUEST/NOT_FOUND, keep-alive) and
//!   plain HTTP (`/live/{id}`, `/healthz`, `/metrics`) on the executors.
//!
//! In-process use (tests, load tests):
//!
//! ```no_run
//! use starling_dataplane::{Config, Node, StaticBroadcast};
//! let cfg = Config {
//!     static_broadcasts: vec!["demo=http://127.0.0.1:8000/live.ts".parse().unwrap()],
//!     wire_listen: "127.0.0.1:0".parse().unwrap(),
//!     http_listen: "127.0.0.1:0".parse().unwrap(),
//!     cores: 1,
//!     ..Config::default()
//! };
//! let node = Node::start(cfg).unwrap();
//! println!("wire {} http {}", node.wire_addr(), node.http_addr());
//! node.shutdown();
//! node.join().unwrap();
//! ```
//!
//! Invariants: the data plane never talks to the database; the control plane is not on
//! the chunk path (viewers keep being served when it is down); each chunk payload
//! exists once in memory however many viewers read it.

pub mod auth;
pub mod chunker;
pub mod config;
pub mod control;
pub mod counters;
pub mod error;
pub mod hls;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod ring;
mod serve;
pub mod source_policy;

/// Entry points for the fuzz targets in `fuzz/` (only with `--cfg fuzzing`, which
/// `cargo fuzz` sets).
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz_api {
    /// Parses an HTTP request head as the plain-HTTP listener does: `None` while
    /// incomplete, else what the listener would do with it.
    pub fn http_head(buf: &[u8]) -> Option<String> {
        crate::serve::http::parse_head(buf).map(|h| format!("{h:?}"))
    }
}

pub use config::{
    ChunkKey, Config, ConnLimits, NodeKey, RateLimit, StaticBroadcast, Timeouts, TokenKey,
};
pub use error::{Error, IngestError};
pub use ingest::IngestSpec;
pub use node::Node;
pub use ring::{BroadcastStatus, SourceHealth};
