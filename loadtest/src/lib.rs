//! Starling load and scale harness: a whole deployment in-process, a swarm of real SDK
//! peers on loopback sockets, and the figures a broadcaster needs.
//!
//! * [`source`]: [`SyntheticSource`], a hyper HTTP/1.1 server streaming a live
//!   `application/octet-stream` at a fixed bitrate whose bytes are a keyed, invertible
//!   function of their stream offset ([`pattern`]).
//! * [`deployment`]: [`Deployment`] starts a control plane (embedded SQLite in a
//!   temporary directory), a data-plane [`starling_dataplane::Node`] and the source,
//!   then creates and starts a broadcast over the admin gRPC API and waits for it.
//! * [`swarm`]: [`Swarm`] joins N [`starling_sdk::Viewer`]s (each relaying on its own
//!   127.x.y.z address with an upload budget from an [`UploadProfile`]), reads each
//!   one's output and checks it byte for byte against the source, and makes a fraction
//!   of them leave at once ([`Swarm::churn`]).
//! * [`run`]: the `starling-loadtest run` coordinator: a deployment (data plane in a
//!   child process), N peers spread over [`worker`] processes driven over TCP, and one
//!   merged [`run::RunReport`] (with the [`bound`] Kumar–Liu–Ross fluid bound integrated
//!   over the peers' actual stays and upload budgets).
//! * [`control_bench`]: `starling-loadtest control-bench`, the control plane's own
//!   benchmark (joins/s, CPU per join and per viewer-second, RSS per session).
//! * [`report`]: [`Sample`]s of every peer's counters and [`Report`]s over a window:
//!   peer share, continuity, start-up times, re-parenting, server egress, identity.
//!
//! ```no_run
//! # async fn demo() -> Result<(), starling_loadtest::HarnessError> {
//! use starling_loadtest::{Deployment, DeploymentConfig, Report, Swarm, SwarmConfig};
//! let dep = Deployment::start(DeploymentConfig::default()).await?;
//! let swarm = Swarm::join(&dep, SwarmConfig { peers: 20, ..SwarmConfig::default() }).await;
//! tokio::time::sleep(std::time::Duration::from_secs(10)).await;
//! println!("{}", Report::of(&swarm.sample()));
//! swarm.shutdown().await;
//! dep.shutdown().await;
//! # Ok(()) }
//! ```

pub mod bound;
pub mod control_bench;
pub mod deployment;
mod error;
pub mod pattern;
pub mod report;
pub mod run;
pub mod sim_demo;
pub mod simnet;
pub mod source;
pub mod swarm;
pub mod tls;
pub mod worker;

pub use deployment::{Deployment, DeploymentConfig};
pub use error::HarnessError;
pub use pattern::{OutputCheck, Pattern};
pub use report::{PeerCounters, PeerReport, PeerSample, PeerState, Percentiles, Report, Sample};
pub use source::{SourceConfig, SyntheticSource};
pub use swarm::{PeerPresence, Swarm, SwarmConfig, UploadProfile, peer_ip};
