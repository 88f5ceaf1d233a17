//! Identifiers of nodes, disks, volumes and chunks.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node (one host) of the cluster. Also its Raft node id when it is a metadata replica.
pub type NodeId = u64;
/// A volume; never reused after deletion.
pub type VolumeId = u64;
/// Version of a chunk's replica set; bumped by the metadata group whenever the set changes.
pub type ChunkVersion = u64;
/// Write-lease epoch of a volume; bumped on every takeover so older holders are fenced.
pub type Epoch = u64;

/// One data disk (data directory) of one node: the unit a replica lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DiskId {
    pub node: NodeId,
    pub disk: u32,
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}d{}", self.node, self.disk)
    }
}

/// A chunk: the `index`-th fixed-size piece of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId {
    pub volume: VolumeId,
    pub index: u64,
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}c{}", self.volume, self.index)
    }
}
