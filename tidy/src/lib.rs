//! Starling's tidy tests (like rust-analyzer's): `tests/tidy.rs` reads `cargo metadata`
//! and the workspace's sources and fails when an Architecture Invariant breaks (a crate
//! depends on what it must never depend on), a source file grows over the size limit,
//! or a module has no `//!` doc. This library is empty; the crate exists for its test.
