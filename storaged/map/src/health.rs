//! Chunk health counters for `Status`, derived from the map alone.

use crate::map::ClusterMap;
use basalt_types::{ChunkHealth, ChunkInfo, ReplicaState};

impl ClusterMap {
    /// Readable (`Ok`) replicas of `chunk` on Alive nodes: the copies a read can use now.
    pub fn live_readable(&self, chunk: &ChunkInfo) -> usize {
        chunk.readable().filter(|r| self.is_alive(r.disk.node)).count()
    }

    /// Counts every chunk as: degraded when it has fewer live readable replicas than
    /// [`ClusterMap::target_replicas`]; syncing when a replica is being filled; unavailable
    /// when no live replica can serve a read. A chunk may be in several classes.
    pub fn chunk_health(&self) -> ChunkHealth {
        let target = self.target_replicas();
        let mut h = ChunkHealth::default();
        for chunk in self.chunks.values() {
            h.total += 1;
            let live = self.live_readable(chunk);
            if live < target {
                h.degraded += 1;
            }
            if live == 0 {
                h.unavailable += 1;
            }
            if chunk.replicas.iter().any(|r| r.state == ReplicaState::Syncing) {
                h.syncing += 1;
            }
        }
        h
    }
}
