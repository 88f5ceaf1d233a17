//! Errors of the client library.

use basalt_types::{ErrorCode, RemoteError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cluster address configured")]
    NoSeeds,
    #[error("metadata service unavailable: {0}")]
    MetaUnavailable(String),
    #[error("{0}")]
    Remote(RemoteError),
    #[error("transport: {0}")]
    Transport(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("unknown node {0}")]
    UnknownNode(u64),
    #[error("request out of range: {0}")]
    OutOfRange(String),
    #[error("volume {volume} was taken over (our epoch {ours}): {message}")]
    Fenced { volume: String, ours: u64, message: String },
    #[error("not enough replicas reachable: {0}")]
    Unavailable(String),
    #[error("every replica failed: {0}")]
    Io(String),
    #[error("volume is closed")]
    Closed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable code of this error (see `basalt_types::ErrorCode`).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Remote(e) => e.code,
            Error::NoSeeds | Error::OutOfRange(_) => ErrorCode::InvalidArgument,
            Error::MetaUnavailable(_) | Error::Unavailable(_) | Error::Transport(_) => ErrorCode::Unavailable,
            Error::Fenced { .. } => ErrorCode::Fenced,
            Error::UnknownNode(_) => ErrorCode::NotFound,
            Error::Protocol(_) | Error::Io(_) | Error::Closed => ErrorCode::Internal,
        }
    }

    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}
