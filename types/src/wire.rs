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
    /// The iSCSI sessions logged in through the node's portal (answered `IscsiSessions`).
    IscsiSessions,
}

/// Cache invalidations and events between the frontends of different nodes. Best effort: a
/// node that misses one sees the change when its cache expires or its next periodic check
/// runs; the unit attentions a missed notice carried are lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The persistent reservations of a volume changed (iSCSI PERSISTENT RESERVE OUT), with
    /// the unit attentions the change raised for I_T nexuses (each is posted by the node
    /// whose target port it names).
    ReservationsChanged { volume: crate::VolumeId, attentions: Vec<NexusAttention> },
    /// A volume's write lease moved to another iSCSI path (ALUA states changed).
    PathMoved { volume: crate::VolumeId },
    /// An initiator reset the logical unit of a volume (LUN or target reset): every other
    /// nexus gets a reset unit attention, whatever node it is logged in through.
    UnitReset { volume: crate::VolumeId },
    /// A MODE SELECT changed the mode parameters of a volume's logical unit (its software
    /// write protection, kept with its reservations): nodes drop their cached copy and
    /// every other nexus gets MODE PARAMETERS CHANGED.
    ModeParametersChanged { volume: crate::VolumeId },
    /// A volume's size changed (`ResizeVolume`): nodes reread the size of the volume where
    /// they have it open; iSCSI units report CAPACITY DATA HAS CHANGED.
    VolumeResized { volume: crate::VolumeId },
    /// An iSCSI target's definition changed or it was deleted (`basalt iscsi ...`): nodes
    /// close the sessions that may no longer use it (ACL, CHAP, LUNs).
    TargetChanged { name: String },
}

/// A SCSI unit attention for one I_T nexus of a logical unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NexusAttention {
    /// iSCSI initiator port name (`<initiator name>,i,0x<ISID>`).
    pub initiator_port: String,
    /// Relative target port identifier of the nexus (the node whose portal it uses).
    pub relative_port: u16,
    pub sense_key: u8,
    pub asc: u8,
    pub ascq: u8,
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
    IscsiSessions(Vec<IscsiSession>),
}

/// A normal iSCSI session as the node serving it sees it (`basalt iscsi sessions`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiSession {
    pub target: String,
    pub initiator: String,
    /// Initiator session id: with the name, the initiator port.
    pub isid: [u8; 6],
    pub tsih: u16,
    /// The initiator's address, when the connection is TCP.
    pub peer: Option<String>,
    /// Login time (ms since the Unix epoch).
    pub since_ms: u64,
    /// The login passed CHAP (the target required it).
    pub chap: bool,
    pub header_digest: bool,
    pub data_digest: bool,
}
