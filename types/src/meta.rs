//! The cluster map kept by the metadata group, and the requests that read or change it.

use crate::error::RemoteError;
use crate::ids::*;
use serde::{Deserialize, Serialize};

/// Default chunk size of a new volume: 64 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
/// Checksum block: every `BLOCK_SIZE` bytes of a replica carry one blake3 hash.
pub const BLOCK_SIZE: u64 = 4096;
/// Replicas per chunk when the cluster has enough hosts.
pub const REPLICAS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Heartbeats arrive.
    Alive,
    /// Missed heartbeats for longer than the dead timeout: its replicas are re-replicated.
    Dead,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: DiskId,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: String,
    /// QUIC address for node-to-node RPC.
    pub rpc_addr: String,
    /// NBD TCP address of this node's block export.
    pub nbd_addr: String,
    pub disks: Vec<DiskInfo>,
    pub state: NodeState,
    /// Leader clock when `state` last changed (ms since the Unix epoch).
    pub since_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds the write lease (e.g. `nbd@node2`).
    pub holder: String,
    pub node: NodeId,
    pub epoch: Epoch,
    pub acquired_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub chunk_size: u64,
    pub created_ms: u64,
    /// Current epoch; bumped by every lease takeover. Chunk servers refuse older epochs.
    pub epoch: Epoch,
    pub lease: Option<Lease>,
    /// Number of chunks allocated so far (thin provisioning).
    pub allocated_chunks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Up to date: receives writes and serves reads.
    Ok,
    /// Being filled by re-replication: receives writes, never serves reads.
    Syncing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub disk: DiskId,
    pub state: ReplicaState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub id: ChunkId,
    /// Bumped on every change of `replicas`; a replica holding an older version is stale.
    pub version: ChunkVersion,
    pub replicas: Vec<Replica>,
    /// Disks that hold an out-of-date copy (dropped from the set). They are preferred as
    /// re-replication targets (incremental catch-up) and deleted once the chunk is healthy.
    pub stale: Vec<DiskId>,
}

impl ChunkInfo {
    pub fn readable(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.state == ReplicaState::Ok)
    }
}

/// Changes to the cluster map. These are the entries of the Raft log; applying one reads no
/// clock and no network: every input (time, placement) is decided by the proposer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    #[default]
    Noop,
    RegisterNode {
        id: NodeId,
        name: String,
        rpc_addr: String,
        nbd_addr: String,
        disks: Vec<DiskInfo>,
        now_ms: u64,
    },
    SetNodeState { id: NodeId, state: NodeState, now_ms: u64 },
    CreateVolume { name: String, size: u64, chunk_size: u64, now_ms: u64 },
    DeleteVolume { name: String },
    ResizeVolume { name: String, size: u64 },
    /// Take the volume's write lease. Fails with `Fenced` if another holder has it, unless
    /// `force` (takeover), which bumps the epoch.
    AcquireLease { volume: String, holder: String, node: NodeId, force: bool, now_ms: u64 },
    ReleaseLease { volume: String, holder: String },
    /// Create a chunk's replica set (placement chosen by the proposer). A no-op returning
    /// the existing chunk if it was allocated already.
    AllocateChunk { chunk: ChunkId, disks: Vec<DiskId> },
    /// Remove replicas from a chunk (failed mid-write, or on a dead node). Bumps the version.
    /// Refused if it would leave fewer than `min_replicas` readable replicas.
    DropReplicas { chunk: ChunkId, version: ChunkVersion, disks: Vec<DiskId>, min_replicas: u32 },
    /// Add a re-replication target in `Syncing` state. Bumps the version.
    AddReplica { chunk: ChunkId, version: ChunkVersion, disk: DiskId },
    /// A syncing replica caught up: it may serve reads now.
    ReplicaSynced { chunk: ChunkId, version: ChunkVersion, disk: DiskId },
    /// The stale copy on `disk` was deleted.
    ForgetStale { chunk: ChunkId, disk: DiskId },
    /// Write (`value` Some) or delete (None) a record, if its version is `expected`
    /// (`Some(0)`: it must not exist; `None`: whatever it is).
    PutRecord { key: String, value: Option<Vec<u8>>, expected: Option<u64> },
    /// A conditional multi-key write to the metadata index (see [`IndexTxn`]). Applied by
    /// the metadata store against its on-disk index, not by the in-memory cluster map.
    IndexTxn(IndexTxn),
}

/// The metadata *index*: an ordered key/value space for frontend metadata that grows with
/// users (the S3 object index first). Unlike records it lives only on disk (RocksDB) on
/// each metadata replica, keys are arbitrary bytes, and one transaction changes several keys
/// at once. Every entry carries the version at which it was last written: the Raft log
/// index of that write, so versions grow and never repeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub version: u64,
}

/// Writes to the index, all or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexTxn {
    /// Each key must be at this version (0: absent) for anything to be written.
    pub checks: Vec<(Vec<u8>, u64)>,
    /// Writes (`Some`) and deletes (`None`), applied in order.
    pub puts: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Counters: each key's value is an `i64` (8 bytes big-endian, absent = 0) to which the
    /// amount is added, saturating (never to a key this transaction also writes). Adds never conflict with each other, so
    /// a hot counter (a bucket's usage) does not serialise the writers that change it.
    pub adds: Vec<(Vec<u8>, i64)>,
}

/// What became of an [`IndexTxn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexOutcome {
    /// Written; the keys written now have this version.
    Committed { version: u64 },
    /// A check failed (the first one, with the key's actual version); nothing was written.
    Conflict { key: Vec<u8>, version: u64 },
}

/// Longest index key, in bytes.
pub const MAX_INDEX_KEY: usize = 4096;
/// Largest index value, in bytes.
pub const MAX_INDEX_VALUE: usize = 256 * 1024;
/// Most checks plus writes in one index transaction.
pub const MAX_INDEX_OPS: usize = 2048;
/// Most entries one index listing returns.
pub const MAX_INDEX_PAGE: u32 = 10_000;

/// A small versioned value kept by the metadata group for the frontends (iSCSI targets and
/// reservations, later S3 accounts...): configuration, never data. Versions come from one
/// cluster-wide counter, so a deleted and re-created record never repeats a version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub value: Vec<u8>,
    pub version: u64,
}

/// Longest record key, in bytes.
pub const MAX_RECORD_KEY: usize = 256;
/// Largest record value, in bytes: records are configuration, not data.
pub const MAX_RECORD_VALUE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    Ok,
    NodeId(NodeId),
    Volume(VolumeInfo),
    Lease(Lease),
    Chunk(ChunkInfo),
    /// The record after a put (None after a delete).
    Record(Option<Record>),
    Index(IndexOutcome),
    Error(RemoteError),
}

/// Disk usage a node reports with each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub disk: u32,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub chunks: u64,
}

/// Requests to the metadata service; any node accepts them and forwards to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MetaRequest {
    Heartbeat { node: NodeId, disks: Vec<DiskUsage> },
    RegisterNode { id: NodeId, name: String, rpc_addr: String, nbd_addr: String, disks: Vec<DiskInfo> },
    CreateVolume { name: String, size: u64, chunk_size: Option<u64> },
    DeleteVolume { name: String },
    ResizeVolume { name: String, size: u64 },
    GetVolume { name: String },
    ListVolumes,
    AcquireLease { volume: String, holder: String, node: NodeId, force: bool },
    ReleaseLease { volume: String, holder: String },
    /// Chunks `first..first+count` of a volume that are allocated.
    GetChunks { volume: VolumeId, first: u64, count: u64 },
    /// Allocate a chunk on first write; the leader picks 3 disks on distinct hosts.
    AllocateChunk { chunk: ChunkId, epoch: Epoch },
    DropReplicas { chunk: ChunkId, version: ChunkVersion, disks: Vec<DiskId> },
    Status,
    /// Every registered node (addresses, state); cheap, unlike `Status`.
    ListNodes,
    /// Make a registered node a Raft voter (membership change, online).
    AddVoter { node: NodeId },
    /// Remove a node from the Raft voters (replace a dead voter).
    RemoveVoter { node: NodeId },
    /// Compare-and-swap a record (see [`MetaCommand::PutRecord`]).
    PutRecord { key: String, value: Option<Vec<u8>>, expected: Option<u64> },
    GetRecord { key: String },
    /// Every record whose key starts with `prefix`, in key order.
    ListRecords { prefix: String },
    /// A conditional write to the metadata index.
    IndexTxn(IndexTxn),
    /// One index entry (linearizable read).
    IndexGet { key: Vec<u8> },
    /// Index entries whose key starts with `prefix` and is at least `start`, in byte order,
    /// at most `limit` (capped at [`MAX_INDEX_PAGE`]); `more` in the answer says whether
    /// further matching entries exist.
    IndexList { prefix: Vec<u8>, start: Vec<u8>, limit: u32 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MetaResponse {
    Ok,
    NodeId(NodeId),
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Lease(Lease),
    Chunk(ChunkInfo),
    Chunks(Vec<ChunkInfo>),
    Status(ClusterStatus),
    Nodes(Vec<NodeInfo>),
    /// Sent to a heartbeating node: stale copies it may delete.
    HeartbeatAck { delete: Vec<(ChunkId, DiskId)> },
    Record(Option<Record>),
    Records(Vec<Record>),
    Index(IndexOutcome),
    IndexEntry(Option<IndexEntry>),
    IndexPage { entries: Vec<IndexEntry>, more: bool },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHealth {
    pub total: u64,
    /// Fewer than the wanted number of readable replicas.
    pub degraded: u64,
    /// A re-replication target is being filled.
    pub syncing: u64,
    /// No readable replica on a live node.
    pub unavailable: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub info: NodeInfo,
    pub voter: bool,
    /// Milliseconds since the leader last heard from this node (None: never, since it led).
    pub last_seen_ms_ago: Option<u64>,
    pub disks: Vec<DiskUsage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<NodeId>,
    pub term: u64,
    pub nodes: Vec<NodeStatus>,
    pub volumes: u64,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub chunks: ChunkHealth,
}
