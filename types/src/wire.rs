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
    /// Tells a node's frontends that something they cache changed (answered `Done`).
    Notice(Notice),
}

/// Cache invalidations between the frontends of different nodes. Best effort: a node that
/// misses one sees the change when its cache expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The persistent reservations of a volume changed (iSCSI PERSISTENT RESERVE OUT).
    ReservationsChanged { volume: crate::VolumeId },
    /// A volume's write lease moved to another iSCSI path (ALUA states changed).
    PathMoved { volume: crate::VolumeId },
    /// An initiator reset the logical unit of a volume (LUN or target reset): every other
    /// nexus gets a reset unit attention, whatever node it is logged in through.
    UnitReset { volume: crate::VolumeId },
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
    /// A notice was taken into account.
    Done,
}
