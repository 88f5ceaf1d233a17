//! Node-to-node transport: QUIC (quinn) with mutual TLS from the cluster CA.
//!
//! - [`tls`]: the cluster CA, node identities (certificate + key) and their files.
//! - [`RpcEndpoint`]: one QUIC endpoint per process; serves a [`Service`] and calls peers,
//!   one request/response pair per stream, connections cached per peer address.
//! - [`frame`]: the frame format; bulk data travels beside the bincode header, never
//!   through serde.

mod endpoint;
mod error;
mod link;
mod outbox;

pub mod frame;
pub mod tls;

#[cfg(test)]
mod tests;

pub use endpoint::{PeerInfo, RpcEndpoint, Service};
pub use error::{code, Error, Result, RpcError};
pub use tls::{ClusterCa, Identity, SERVER_NAME};

// Service implementors need these; re-exported so they match the versions used here.
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use tokio_util::sync::CancellationToken;
