//! Starling control plane: the `starling.v1` gRPC services (admin, viewer, edge) over
//! PostgreSQL or embedded SQLite.
//!
//! The control plane is never on the chunk path: it decides which data-plane node
//! ingests which broadcast, hands viewers a node address at join, and tracks node and
//! session liveness. Viewers who have joined keep playing if it goes down.
//!
//! * [`store`]: one storage interface over Postgres and SQLite.
//! * [`assign`]: sans-IO decisions (which node ingests what, which nodes are dead).
//! * [`validate`]: request validation and id generation.
//! * [`grid`]: the peer grid's sans-IO assignment and booster logic ([`grid::GridAssigner`]).
//! * [`live`]: this process's live grids (one assigner per LIVE broadcast, sessions ↔
//!   peers, byte counters).
//! * [`service`]: the tonic service implementations.
//! * [`server`]: wiring and in-process serving ([`ControlPlane`], [`serve`]).

pub mod assign;
pub mod grid;
pub mod live;
pub mod server;
pub mod service;
pub mod store;
pub mod validate;

pub use server::{Config, ControlPlane, ControlPlaneHandle, ServeError, serve};
pub use service::ServiceConfig;
pub use store::{DatabaseConfig, Store, StoreError};
