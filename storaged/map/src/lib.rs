//! The cluster map: nodes, volumes and chunk replica sets, as replicated by the metadata Raft
//! group, plus the placement and repair planning the Raft leader runs on top of it.
//!
//! Everything here is pure: no I/O, no clock, no async, no randomness other than an explicit
//! `seed`. [`ClusterMap::apply`] is the Raft state machine's transition function; it returns
//! the reply for the proposer and the exact key/value changes the storage layer
//! (`basalt-meta`, RocksDB) must write in the same batch as the applied log id. The key
//! layout is described in [`kv`].
//!
//! Invariants kept by `apply` (and checked by [`ClusterMap::from_kv`]):
//! - volume names are unique and volume ids are never reused (`next_volume_id` only grows);
//! - every chunk belongs to an existing volume, its index is below the volume's chunk count,
//!   and `VolumeInfo::allocated_chunks` equals the number of its chunks;
//! - a chunk's replicas are on distinct nodes, and no disk is both a replica and `stale`.

mod apply;
mod health;
pub mod kv;
mod map;
mod placement;
mod repair;

pub use apply::{
    validate_chunk_size, validate_volume_name, validate_volume_size, MAX_CHUNK_SIZE, MAX_VOLUME_NAME, MIN_CHUNK_SIZE,
    SECTOR_SIZE,
};
pub use kv::{is_map_key, KvChange};
pub use map::ClusterMap;
pub use placement::{place, DiskSpace, Usage};
pub use repair::{plan_repairs, RepairAction};

/// Errors of this crate. `apply` never fails (refusals are [`basalt_types::MetaReply::Error`]
/// replies); only rebuilding a map from persisted state can.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A key that this crate never writes: the caller passed foreign keys to `from_kv`.
    #[error("unknown cluster-map key {key}")]
    UnknownKey { key: String },
    /// A value that does not decode as the type its key says.
    #[error("cannot decode the value of cluster-map key {key}: {source}")]
    Decode {
        key: String,
        #[source]
        source: bincode::error::DecodeError,
    },
    /// The entries decode but break an invariant of the map (see the crate documentation).
    #[error("inconsistent cluster map: {0}")]
    Inconsistent(String),
}

pub type Result<T, E = MapError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;

/// Builders shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::ClusterMap;
    use basalt_types::{DiskId, DiskInfo, MetaCommand, MetaReply};

    pub const TIB: u64 = 1 << 40;

    pub fn disk(node: u64, disk: u32) -> DiskId {
        DiskId { node, disk }
    }

    /// Registers node `id` with disks `(disk, free_bytes, total_bytes)`.
    pub fn register(map: &mut ClusterMap, id: u64, disks: &[(u32, u64, u64)]) {
        let disks = disks
            .iter()
            .map(|&(d, free_bytes, total_bytes)| DiskInfo {
                id: disk(id, d),
                path: format!("/data/{d}"),
                total_bytes,
                free_bytes,
            })
            .collect();
        apply_ok(
            map,
            &MetaCommand::RegisterNode {
                id,
                name: format!("node{id}"),
                rpc_addr: format!("127.0.0.{id}:7000"),
                nbd_addr: format!("127.0.0.{id}:10809"),
                disks,
                now_ms: 1,
            },
        );
    }

    /// Nodes 1..=n, node i with `disks[i-1]` empty 1 TiB disks.
    pub fn cluster(disks: &[u32]) -> ClusterMap {
        let mut map = ClusterMap::new();
        for (i, &n) in disks.iter().enumerate() {
            let d: Vec<(u32, u64, u64)> = (0..n).map(|d| (d, TIB, TIB)).collect();
            register(&mut map, i as u64 + 1, &d);
        }
        map
    }

    /// Applies a command that must succeed.
    pub fn apply_ok(map: &mut ClusterMap, cmd: &MetaCommand) -> MetaReply {
        let (reply, _) = map.apply(cmd);
        assert!(!matches!(reply, MetaReply::Error(_)), "{cmd:?} failed: {reply:?}");
        reply
    }
}
