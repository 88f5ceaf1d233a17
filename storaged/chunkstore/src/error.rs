//! The crate's error type and its mapping to the stable wire codes.

use basalt_types::{ChunkId, ChunkVersion, Epoch, ErrorCode, RemoteError, VolumeId};
use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("replica of {chunk} not found on disk {disk}")]
    NotFound { disk: u32, chunk: ChunkId },
    #[error("no disk with index {0} in this store")]
    UnknownDisk(u32),
    #[error("volume {volume} is fenced: have epoch {have}, request carries {got}")]
    Fenced { volume: VolumeId, have: Epoch, got: Epoch },
    #[error("stale version: replica has {have}, request carries {got}")]
    StaleVersion { have: ChunkVersion, got: ChunkVersion },
    #[error("stale replica: replica has version {have}, reader wants {want}")]
    StaleReplica { have: ChunkVersion, want: ChunkVersion },
    #[error("replica of {chunk} failed verification in blocks {blocks:?}")]
    Corrupt { chunk: ChunkId, blocks: Vec<u64> },
    #[error("range {offset}+{len} is outside the chunk of {chunk_size} bytes")]
    OutOfRange { offset: u64, len: u64, chunk_size: u64 },
    #[error("write carries {got} block sums, but covers {want} whole blocks")]
    BadSums { got: usize, want: u64 },
    #[error("chunk size mismatch: replica has {have} bytes, request says {got}")]
    ChunkSizeMismatch { have: u64, got: u64 },
    #[error("no space left on {path}")]
    NoSpace { path: PathBuf },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bad disk: {0}")]
    BadDisk(String),
}

impl Error {
    /// The stable code this error travels under.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotFound { .. } => ErrorCode::NotFound,
            Error::UnknownDisk(_) => ErrorCode::InvalidArgument,
            Error::Fenced { .. } => ErrorCode::Fenced,
            Error::StaleVersion { .. } => ErrorCode::StaleVersion,
            Error::StaleReplica { .. } => ErrorCode::StaleReplica,
            Error::Corrupt { .. } => ErrorCode::Corrupt,
            Error::OutOfRange { .. } | Error::ChunkSizeMismatch { .. } | Error::BadSums { .. } => {
                ErrorCode::InvalidArgument
            }
            Error::NoSpace { .. } => ErrorCode::NoSpace,
            Error::Io { .. } | Error::BadDisk(_) => ErrorCode::Internal,
        }
    }

    /// Wraps an I/O error with the path it happened on; ENOSPC becomes `NoSpace` so callers can
    /// tell a full disk from a failing one.
    pub(crate) fn io(path: &Path, source: io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
            Error::NoSpace { path: path.to_path_buf() }
        } else {
            Error::Io { path: path.to_path_buf(), source }
        }
    }
}

impl From<&Error> for RemoteError {
    fn from(e: &Error) -> Self {
        RemoteError::new(e.code(), e.to_string())
    }
}

impl From<Error> for RemoteError {
    fn from(e: Error) -> Self {
        RemoteError::from(&e)
    }
}

/// Adds the path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
