//! The viewer: join (or connect directly), receive, reorder, fan out; reconnect and
//! re-join; heartbeat. One submodule per concern: [`config`] (what it is tuned with),
//! [`start`] (join/connect and spawn the tasks), [`handle`] (the public [`Viewer`]),
//! [`receiver`] (the data-plane-only receive loop), [`session`] (control-plane session
//! upkeep over the session stream), [`heartbeat`] (the unary heartbeat loop it falls
//! back to), [`peer_listener`] (what a relaying viewer offers in `Join`). With a grid
//! assignment the receiving is the relay engine's ([`crate::relay`]).

mod config;
mod handle;
mod heartbeat;
mod peer_listener;
mod receiver;
mod session;
mod start;

/// Kept for [`crate::relay`], which still imports these from here; the state lives in
/// [`crate::shared`] (the relay's imports switch there at merge, then this goes).
pub use config::{RelayConfig, ViewerConfig};
pub use handle::Viewer;
