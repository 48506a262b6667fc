//! Starling protocol definitions.
//!
//! * [`v1`]: the gRPC control API (`starling.v1`: `AdminService`, `ViewerService`,
//!   `EdgeService`), generated at build time from `proto/starling.proto` with protox
//!   (no system `protoc` needed).
//! * [`wire`]: the binary chunk wire protocol spoken between SDKs, data-plane nodes and
//!   (later) peers, as a sans-IO codec that never panics and caps every length. The
//!   format is specified in `docs/PROTOCOL.md`.
//! * [`token`]: signed chunk tokens (Ed25519), issued by the control plane and checked
//!   offline by data-plane nodes and relaying peers.
//! * [`ticket`]: signed parent tickets (same keys as tokens): the control plane's word
//!   that a child may subscribe to some substreams at a given relaying peer.
//! * [`integrity`]: per-chunk signatures made by the data plane and checked by every
//!   viewer before it plays or relays a chunk.
//! * [`holder`]: proof of possession of the key a chunk token names (bound tokens).
//! * [`transport`]: how clients reach the control plane (TLS and its trust, or the
//!   explicit plaintext opt-in).
//! * [`codec`]: the gRPC codec of the generated services and clients (prost, with
//!   small per-call buffers).

pub mod codec;
mod ed25519;
pub mod holder;
pub mod integrity;
pub mod ticket;
pub mod ticket_mac;
pub mod time;
pub mod token;
pub mod transport;
pub mod wire;

/// Generated gRPC types and services for package `starling.v1`.
#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("starling.v1");

    /// Encoded `FileDescriptorSet` of `starling.proto`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/starling_descriptor.bin"));
}
