//! Stable error codes. Every public error of every crate maps to one of these; protocol
//! frontends (NBD errno, HTTP status, SCSI sense, S3 code) derive their answer from the
//! code in exactly one place each.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The thing named does not exist.
    NotFound,
    /// The thing already exists.
    AlreadyExists,
    /// The request is malformed or out of range.
    InvalidArgument,
    /// The volume is leased by another holder, or the caller's epoch is older than the
    /// volume's: the caller has been fenced.
    Fenced,
    /// The caller's view of a chunk's replica set is older than the replica's.
    StaleVersion,
    /// The replica is older than the version asked for: it must not serve.
    StaleReplica,
    /// Stored data failed its checksum.
    Corrupt,
    /// Not enough live replicas or space to do this safely now.
    Unavailable,
    /// This metadata replica is not the leader (the message names the leader when known).
    NotLeader,
    /// No space left.
    NoSpace,
    /// A disk or internal failure.
    Internal,
}

/// An error as it travels on the wire: a stable code plus a human message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}
