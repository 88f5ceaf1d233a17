//! The envelope of every node-to-node RPC.

use crate::chunk::{ChunkRequest, ChunkResponse};
use crate::error::RemoteError;
use crate::meta::{MetaRequest, MetaResponse};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NodeRequest {
    Meta(MetaRequest),
    Chunk(ChunkRequest),
    /// An openraft message, encoded by `storaged` (clients never see Raft types).
    Raft(RaftKind, Vec<u8>),
    /// A metadata request forwarded by a node that is not the leader: served only by the
    /// leader, never forwarded again (a stale leader view cannot bounce it around).
    MetaForwarded(MetaRequest),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NodeResponse {
    Meta(Result<MetaResponse, RemoteError>),
    Chunk(Result<ChunkResponse, RemoteError>),
    Raft(Result<Vec<u8>, RemoteError>),
    /// The request could not be decoded or is not served by this node.
    Error(RemoteError),
}
