//! The metadata service: one openraft group whose log and state machine live in RocksDB.
//!
//! The group replicates the cluster map (`basalt-map`): every change is a
//! [`MetaCommand`](basalt_types::MetaCommand) in the Raft log, applied by
//! [`ClusterMap::apply`](basalt_map::ClusterMap::apply). This crate owns
//! - the Raft type configuration ([`raft`]),
//! - the RocksDB log store and persisted state machine ([`store`]),
//! - the metadata index, an ordered key/value space on disk only ([`index`]),
//! - the Raft transport over the node-to-node RPC endpoint ([`network`]),
//! - and [`MetaService`], which turns client [`MetaRequest`](basalt_types::MetaRequest)s into
//!   proposals and reads, forwards them to the leader when this node is not, keeps the
//!   heartbeat table and marks silent nodes dead.
//!
//! It serves no RPC itself: `storaged` dispatches `NodeRequest::Raft` to
//! [`MetaService::handle_raft`] and `NodeRequest::Meta` to [`MetaService::handle`].

pub mod index;
pub mod network;
pub mod raft;
pub mod read_barrier;
mod service;
pub mod store;

pub use raft::TypeConfig;
pub use service::{MetaConfig, MetaService};

use basalt_types::{ErrorCode, RemoteError};

/// Errors of the metadata service at its boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metadata store (RocksDB): {0}")]
    Db(#[from] rocksdb::Error),
    /// Persisted Raft or map state that does not decode or is inconsistent.
    #[error("corrupt metadata store: {0}")]
    Corrupt(String),
    #[error("invalid metadata configuration: {0}")]
    Config(String),
    /// Openraft refused or failed an operation (initialisation, shutdown, storage).
    #[error("raft: {0}")]
    Raft(String),
    /// A request failed with a stable error code.
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Db(_) | Error::Corrupt(_) | Error::Raft(_) => ErrorCode::Internal,
            Error::Config(_) => ErrorCode::InvalidArgument,
            Error::Remote(e) => e.code,
        }
    }
}

impl From<Error> for RemoteError {
    fn from(e: Error) -> Self {
        match e {
            Error::Remote(r) => r,
            other => RemoteError::new(other.code(), other.to_string()),
        }
    }
}

/// The one encoding used for everything this crate persists or sends: serde through
/// bincode 2 with the standard configuration (the same as `basalt-map`'s values).
pub(crate) mod codec {
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
        bincode::serde::encode_to_vec(value, bincode::config::standard())
    }

    /// Decodes a whole buffer; trailing bytes mean the buffer is not what we think it is.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .map_err(|e| e.to_string())?;
        if used != bytes.len() {
            return Err(format!("{} trailing bytes", bytes.len() - used));
        }
        Ok(value)
    }
}
