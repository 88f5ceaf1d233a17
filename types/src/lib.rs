//! Ids, wire messages and error codes shared by every Basalt crate.
//!
//! This crate is the bottom of the dependency ladder: plain data, serde derives, no I/O and
//! no async. Anything that crosses a process boundary is defined here, so the server, the
//! client library and the CLI agree on one shape.

pub mod blocksum;
pub mod chunk;
pub mod error;
pub mod ids;
pub mod meta;
pub mod wire;

pub use blocksum::block_sums;
pub use chunk::*;
pub use error::{ErrorCode, RemoteError};
pub use ids::*;
pub use meta::*;
pub use wire::*;
