//! Starling control plane: the `starling.v1` gRPC services (admin, viewer, edge) over
//! PostgreSQL or embedded SQLite.
//!
//! The control plane is never on the chunk path: it decides which data-plane node
//! ingests which broadcast, hands viewers a node address at join, and tracks node and
//! session liveness. Viewers who have joined keep playing if it goes down.
//!
//! * [`store`]: one storage interface over Postgres and SQLite.
//! * [`credential`]: viewer and admin JWT verification (EdDSA, RS256...).
//! * [`auth`]: the admin and node (`EdgeService`) interceptors, the viewer credential
//!   check and their config ([`AuthConfig`]).
//! * [`tokens`]: chunk-token signing keys (persisted, rotated), issuing, revocations.
//! * [`tickets`]: parent tickets attached to every peer assignment (signed, cached).
//! * [`assign`]: sans-IO decisions (which node ingests what, which nodes are dead).
//! * [`validate`]: request validation and id generation.
//! * `starling_grid::assign`: the peer grid's sans-IO assignment and booster logic (`GridAssigner`), in its own crate.
//! * [`live`]: this process's live grids (one assigner per LIVE broadcast, sessions ↔
//!   peers, byte counters).
//! * [`limits`]: flood limits of the viewer API (per-address token buckets, negative
//!   cache of unknown sessions), pure.
//! * [`trust`]: what the control plane believes of a peer's claims: the upload cap until
//!   confirmed, distinct-address report ledgers (pure).
//! * [`service`]: the tonic service implementations.
//! * [`reports`]: viewer reports: bounded write queue, batch writer, per-minute roll-ups,
//!   retention ([`ReportConfig`]).
//! * [`metrics`]: Prometheus metrics (`/metrics` on a separate listener), gRPC metrics
//!   layer.
//! * [`dashboard`]: the operator's web page (embedded) and its JSON API, behind the
//!   admin credential, on its own listener.
//! * [`tls`]: gRPC over TLS (rustls acceptor, hot-reloadable certificate, optional
//!   client certificates for data-plane nodes).
//! * [`server`]: wiring and in-process serving ([`ControlPlane`], [`serve`]).

pub mod assign;
pub mod auth;
pub mod credential;
pub mod dashboard;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod reachability;
pub mod reports;
pub mod server;
pub mod service;
pub mod store;
pub mod tickets;
pub mod tls;
pub mod tokens;
pub mod trust;
pub mod validate;

pub use auth::{AuthConfig, BearerInterceptor};
pub use reports::ReportConfig;
pub use server::{Config, ControlPlane, ControlPlaneHandle, ServeError, ServerLimits, serve};
pub use service::ServiceConfig;
pub use store::{DatabaseConfig, Store, StoreError};
pub use tls::{ServerTls, TlsIdentity};
