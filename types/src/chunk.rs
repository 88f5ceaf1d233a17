//! Requests to a node's chunk service. Bulk data travels beside the message (the RPC
//! frame's data part), never inside it and never through the Raft log.

use crate::ids::*;
use serde::{Deserialize, Serialize};

/// A blake3 hash of one checksum block; all zeros for a block never written.
pub type BlockSum = [u8; 32];

/// How many blocks of `BLOCK_SIZE` bytes `[offset, offset+len)` covers entirely.
pub fn full_blocks(offset: u64, len: u64) -> u64 {
    let bs = crate::BLOCK_SIZE;
    ((offset + len) / bs).saturating_sub(offset.div_ceil(bs))
}

/// The blake3 of each block of `BLOCK_SIZE` bytes entirely covered by `data` written at
/// `offset` (chunk-relative), in order. Partial blocks at either edge are left out: only the
/// replica knows the rest of their bytes.
pub fn full_block_sums(offset: u64, data: &[u8]) -> Vec<BlockSum> {
    let skip = ((offset.next_multiple_of(crate::BLOCK_SIZE) - offset) as usize).min(data.len());
    crate::blocksum::block_sums(&data[skip..])
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ChunkRequest {
    /// Write `data` at `offset` in the chunk, durably. Refused with `Fenced` if `epoch` is
    /// older than the newest epoch this server has seen for the volume, and with
    /// `StaleVersion` if `version` is older than the replica's. Creates the replica if absent.
    /// `sums` is empty, or the blake3 of each whole block the write covers
    /// ([`full_block_sums`]), computed once by the writer instead of by every replica (the
    /// transport authenticates the data, so they describe what arrives).
    Write {
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        epoch: Epoch,
        offset: u64,
        sums: Vec<BlockSum>,
    },
    /// Read `len` bytes at `offset`, checksums verified. Refused with `StaleReplica` if the
    /// replica's version is older than `version`.
    Read { disk: u32, chunk: ChunkId, version: ChunkVersion, offset: u64, len: u64 },
    /// Make whole blocks in the range unwritten (they read as zeros) and zero partial edges.
    /// Same epoch and version rules as `Write`.
    Trim { disk: u32, chunk: ChunkId, chunk_size: u64, version: ChunkVersion, epoch: Epoch, offset: u64, len: u64 },
    /// Raise the replica's version (the metadata group changed the replica set and this
    /// replica stays in it).
    SetVersion { disk: u32, chunk: ChunkId, version: ChunkVersion },
    /// Remember that `volume` is now at `epoch`; older writers are refused from now on.
    Fence { volume: VolumeId, epoch: Epoch },
    /// Per-block checksums of a replica (used for incremental catch-up).
    BlockSums { disk: u32, chunk: ChunkId },
    /// Raw verified blocks `first..first+count` for re-replication (no version check
    /// beyond `min_version`).
    ReadBlocks { disk: u32, chunk: ChunkId, min_version: ChunkVersion, first: u64, count: u64 },
    /// Get ready to become a re-replication target: create the replica if absent, raise its
    /// version to `version`, and from now on remember which blocks client writes touch, so
    /// that the copy made by `SyncFrom` never overwrites them. Sent before the metadata group
    /// adds the replica to the set.
    PrepareSync { disk: u32, chunk: ChunkId, chunk_size: u64, version: ChunkVersion },
    /// Make this replica (a `Syncing` target) a copy of `source`, fetching only the blocks
    /// whose checksums differ; blocks written by clients meanwhile are kept.
    SyncFrom { disk: u32, chunk: ChunkId, chunk_size: u64, version: ChunkVersion, source: ReplicaAddr },
    /// Re-fetch the given blocks from `source` because they failed verification here.
    RepairBlocks { disk: u32, chunk: ChunkId, blocks: Vec<u64>, source: ReplicaAddr },
    /// Delete a replica (stale copy, or deleted volume).
    Delete { disk: u32, chunk: ChunkId },
    /// Delete every replica of a volume on this node.
    DeleteVolume { volume: VolumeId },
}

/// Where a replica lives: the node's RPC address and the disk on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaAddr {
    pub rpc_addr: String,
    pub disk: DiskId,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ChunkResponse {
    Ok,
    /// Answer to `Read`/`ReadBlocks`: the bytes are in the frame's data part.
    Data,
    Sums { version: ChunkVersion, sums: Vec<BlockSum> },
    /// Answer to `SyncFrom`: how many blocks were copied and how many were already equal.
    Synced { copied: u64, skipped: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_block_sums_cover_only_whole_blocks() {
        let bs = crate::BLOCK_SIZE as usize;
        let data: Vec<u8> = (0..4 * bs).map(|i| (i % 251) as u8).collect();
        assert_eq!(full_block_sums(0, &data).len(), 4);
        let sums = full_block_sums(100, &data);
        // Blocks 1..=3 of the chunk are whole; block 0 and block 4 are partial.
        assert_eq!(sums.len(), 3);
        assert_eq!(sums[0], *blake3::hash(&data[bs - 100..2 * bs - 100]).as_bytes());
        assert!(full_block_sums(10, &data[..100]).is_empty());
        assert!(full_block_sums(0, &[]).is_empty());
        assert_eq!(full_blocks(100, 4 * bs as u64), 3);
        assert_eq!(full_blocks(10, 100), 0);
    }
}
