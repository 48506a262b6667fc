//! Starling client SDK (the ICD client).
//!
//! Join a broadcast through the control plane ([`Viewer::join`]) or straight at a
//! data-plane node ([`Viewer::connect_direct`]); the SDK speaks the chunk wire protocol
//! ([`starling_proto::wire`]), answers pings, reorders and de-duplicates chunks by
//! sequence number ([`reorder`]), reconnects with capped exponential backoff and
//! resumes where it left off, heartbeats the control plane, and hands the in-order
//! stream to
//!
//! * async consumers: [`Viewer::subscribe`] returns a bounded [`Subscription`]
//!   (a `Stream` of [`bytes::Bytes`]) that starts at a random access chunk;
//! * media players: a local HTTP endpoint at [`Viewer::local_url`]
//!   (`ffplay http://127.0.0.1:PORT/live/{broadcast}`).
//!
//! When the control plane assigns a peer grid (parents per substream, neighbours,
//! child slots), the viewer also relays: it accepts peer connections
//! ([`RelayConfig`]), receives each substream from its parent, repairs gaps from mesh
//! neighbours (the data plane as last resort), re-parents when a parent is lost, late
//! or silent, and plays out [`ViewerConfig::target_lag`] behind live. [`Stats`] counts
//! bytes from the server and from peers, bytes uploaded, and chunks played and skipped.
//!
//! Rights and integrity: the chunk token from `Join` is presented in `HELLO` on every
//! link and renewed with `TOKEN` frames when a heartbeat renews it; peers connecting to
//! this viewer must present a valid token (checked offline with the control plane's
//! keys; expired, renewed and revoked tokens are tracked per link). Every chunk, from
//! the data plane or a peer, is checked against the data plane's signature before it
//! is stored, played or relayed; a peer that sends a bad chunk is disconnected,
//! reported (`ReportPeer`) and never used again. Quality reports
//! (`ViewerService.Report`) go out every [`ViewerConfig::report_interval`] from a
//! bounded queue, with a final one on [`Viewer::leave`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), starling_sdk::SdkError> {
//! use starling_sdk::{Viewer, ViewerConfig};
//! let mut cfg = ViewerConfig::new("my-broadcast");
//! cfg.control_url = "http://127.0.0.1:7000".into();
//! let viewer = Viewer::join(cfg).await?;
//! println!("open {:?} in a player", viewer.local_url());
//! let mut sub = viewer.subscribe();
//! while let Some(bytes) = sub.next_bytes().await {
//!     // feed a demuxer
//! #   let _ = bytes;
//! }
//! viewer.leave().await
//! # }
//! ```

mod clock;
mod conn;
mod control;
mod control_url;
mod error;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz_api;
mod http;
mod hub;
pub mod portmap;
mod punch;
mod rejoin;
mod relay;
pub mod reorder;
mod report;
mod report_queue;
mod rights;
mod shared;
mod stats;
mod viewer;

pub use clock::WallClock;
pub use error::SdkError;
pub use hub::Subscription;
pub use relay::keys::KeyHoldLimits;
pub use relay::listener_limits::PeerLimits;
pub use relay::sched_config::{DEFAULT_TARGET_LAG, scheduler_config};
pub use reorder::ReorderConfig;
pub use starling_proto::transport::{ClientIdentity, ClientTls, Transport, TransportError};
pub use starling_proto::wire::ErrorCode;
pub use stats::Stats;
pub use viewer::{RelayConfig, Viewer, ViewerConfig};
