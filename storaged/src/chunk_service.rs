//! The chunk service: answers [`ChunkRequest`]s from the node's [`ChunkStore`], and pulls
//! blocks from other nodes for re-replication, catch-up and repair (throttled, so client
//! I/O keeps going).

use crate::throttle::Throttle;
use basalt_chunkstore::ChunkStore;
use basalt_rpc::RpcEndpoint;
use basalt_types::*;
use bytes::Bytes;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, instrument, warn};

/// Blocks fetched per request during a copy (1 MiB).
const COPY_BATCH: u64 = 256;
const COPY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ChunkService {
    store: ChunkStore,
    rpc: Arc<RpcEndpoint>,
    throttle: Throttle,
    /// Replicas currently being filled by `SyncFrom`: one copy at a time per replica.
    syncing: Mutex<HashSet<(u32, ChunkId)>>,
}

type Reply = (Result<ChunkResponse, RemoteError>, Bytes);

fn store_err(e: basalt_chunkstore::Error) -> RemoteError {
    RemoteError::new(e.code(), e.to_string())
}

impl ChunkService {
    pub fn new(store: ChunkStore, rpc: Arc<RpcEndpoint>, repair_bytes_per_sec: u64) -> Arc<Self> {
        Arc::new(Self { store, rpc, throttle: Throttle::new(repair_bytes_per_sec), syncing: Mutex::new(HashSet::new()) })
    }

    pub fn store(&self) -> &ChunkStore {
        &self.store
    }

    pub async fn handle(&self, req: ChunkRequest, data: Bytes) -> Reply {
        let ok = |r: Result<(), basalt_chunkstore::Error>| (r.map(|_| ChunkResponse::Ok).map_err(store_err), Bytes::new());
        match req {
            ChunkRequest::Write { disk, chunk, chunk_size, version, epoch, offset, sums } => {
                ok(self.store.write_with_sums(disk, chunk, chunk_size, version, epoch, offset, data, sums).await)
            }
            ChunkRequest::Read { disk, chunk, version, offset, len } => {
                match self.store.read(disk, chunk, version, offset, len).await {
                    Ok(bytes) => (Ok(ChunkResponse::Data), bytes),
                    Err(e) => (Err(store_err(e)), Bytes::new()),
                }
            }
            ChunkRequest::Trim { disk, chunk, chunk_size: _, version, epoch, offset, len } => {
                ok(self.store.trim(disk, chunk, version, epoch, offset, len).await)
            }
            ChunkRequest::SetVersion { disk, chunk, version } => ok(self.store.set_version(disk, chunk, version).await),
            ChunkRequest::Fence { volume, epoch } => ok(self.store.fence(volume, epoch).await),
            ChunkRequest::BlockSums { disk, chunk } => match self.store.block_sums(disk, chunk).await {
                Ok((version, sums)) => (Ok(ChunkResponse::Sums { version, sums }), Bytes::new()),
                Err(e) => (Err(store_err(e)), Bytes::new()),
            },
            ChunkRequest::ReadBlocks { disk, chunk, min_version, first, count } => {
                match self.store.read_blocks(disk, chunk, min_version, first, count).await {
                    Ok((sums, bytes)) => (Ok(ChunkResponse::Sums { version: min_version, sums }), bytes),
                    Err(e) => (Err(store_err(e)), Bytes::new()),
                }
            }
            ChunkRequest::PrepareSync { disk, chunk, chunk_size, version } => {
                (self.prepare_sync(disk, chunk, chunk_size, version).await.map(|_| ChunkResponse::Ok), Bytes::new())
            }
            ChunkRequest::SyncFrom { disk, chunk, chunk_size, version, source } => {
                (self.sync_from(disk, chunk, chunk_size, version, source).await, Bytes::new())
            }
            ChunkRequest::RepairBlocks { disk, chunk, blocks, source } => {
                (self.repair_blocks(disk, chunk, blocks, source).await, Bytes::new())
            }
            ChunkRequest::Delete { disk, chunk } => ok(self.store.delete(disk, chunk).await),
            ChunkRequest::DeleteVolume { volume } => ok(self.store.delete_volume(volume).await),
        }
    }

    /// Create the target replica if needed, raise its version, and start recording client
    /// writes so the copy does not overwrite them.
    async fn prepare_sync(&self, disk: u32, chunk: ChunkId, chunk_size: u64, version: ChunkVersion) -> Result<(), RemoteError> {
        self.store.create(disk, chunk, chunk_size, version).await.map_err(store_err)?;
        self.store.begin_sync(disk, chunk).map_err(store_err)?;
        Ok(())
    }

    #[instrument(skip(self, source), fields(chunk = %chunk, disk, source = %source.disk))]
    async fn sync_from(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        source: ReplicaAddr,
    ) -> Result<ChunkResponse, RemoteError> {
        {
            let mut syncing = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
            if !syncing.insert((disk, chunk)) {
                return Err(RemoteError::new(ErrorCode::Unavailable, format!("{chunk} is already being synced")));
            }
        }
        let result = self.copy_differing(disk, chunk, chunk_size, version, &source).await;
        self.syncing.lock().unwrap_or_else(|p| p.into_inner()).remove(&(disk, chunk));
        self.store.end_sync(disk, chunk);
        let (copied, skipped) = result?;
        info!(copied, skipped, "replica synced");
        Ok(ChunkResponse::Synced { copied, skipped })
    }

    /// Compare per-block checksums with the source and fetch only the blocks that differ.
    async fn copy_differing(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        source: &ReplicaAddr,
    ) -> Result<(u64, u64), RemoteError> {
        let addr = parse_addr(&source.rpc_addr)?;
        let (_, theirs) = self.remote_sums(addr, source.disk.disk, chunk).await?;
        let (_, ours) = self.store.block_sums(disk, chunk).await.map_err(store_err)?;
        let differing: Vec<u64> = theirs
            .iter()
            .enumerate()
            .filter(|(i, s)| ours.get(*i) != Some(*s))
            .map(|(i, _)| i as u64)
            .collect();
        let skipped = theirs.len() as u64 - differing.len() as u64;
        let copied = self.copy_blocks(disk, chunk, chunk_size, version, addr, source.disk.disk, &differing, version).await?;
        Ok((copied, skipped))
    }

    /// Copy the given blocks from a source replica, in runs of consecutive blocks.
    #[allow(clippy::too_many_arguments)]
    async fn copy_blocks(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        addr: SocketAddr,
        source_disk: u32,
        blocks: &[u64],
        min_version: ChunkVersion,
    ) -> Result<u64, RemoteError> {
        let mut copied = 0;
        for (first, count) in runs(blocks, COPY_BATCH) {
            self.throttle.take(count * BLOCK_SIZE).await;
            let req = ChunkRequest::ReadBlocks { disk: source_disk, chunk, min_version, first, count };
            let (sums, data) = match self.call(addr, req).await? {
                (ChunkResponse::Sums { sums, .. }, data) => (sums, data),
                (other, _) => return Err(RemoteError::new(ErrorCode::Internal, format!("unexpected {other:?}"))),
            };
            if sums.len() as u64 != count {
                return Err(RemoteError::new(ErrorCode::Internal, "source returned a short block list"));
            }
            let n = self
                .store
                .write_blocks(disk, chunk, chunk_size, version, first, sums, data, &|_| false)
                .await
                .map_err(store_err)?;
            copied += n;
        }
        Ok(copied)
    }

    /// Re-fetch bad blocks of a local replica from `source`; an empty list means "verify
    /// the whole replica and fix whatever is bad".
    #[instrument(skip(self, blocks, source), fields(chunk = %chunk, disk, source = %source.disk))]
    async fn repair_blocks(
        &self,
        disk: u32,
        chunk: ChunkId,
        blocks: Vec<u64>,
        source: ReplicaAddr,
    ) -> Result<ChunkResponse, RemoteError> {
        let blocks = if blocks.is_empty() {
            self.store.scrub_replica(disk, chunk).await.map_err(store_err)?
        } else {
            blocks
        };
        if blocks.is_empty() {
            return Ok(ChunkResponse::Synced { copied: 0, skipped: 0 });
        }
        let version = self.store.version(disk, chunk).unwrap_or(0);
        let addr = parse_addr(&source.rpc_addr)?;
        let chunk_size = self.chunk_size_of(disk, chunk).await?;
        let mut sorted = blocks;
        sorted.sort_unstable();
        sorted.dedup();
        let copied = self.copy_blocks(disk, chunk, chunk_size, version, addr, source.disk.disk, &sorted, 0).await?;
        info!(copied, "bad blocks repaired");
        Ok(ChunkResponse::Synced { copied, skipped: 0 })
    }

    async fn chunk_size_of(&self, disk: u32, chunk: ChunkId) -> Result<u64, RemoteError> {
        let (_, sums) = self.store.block_sums(disk, chunk).await.map_err(store_err)?;
        Ok(sums.len() as u64 * BLOCK_SIZE)
    }

    async fn remote_sums(&self, addr: SocketAddr, disk: u32, chunk: ChunkId) -> Result<(ChunkVersion, Vec<BlockSum>), RemoteError> {
        match self.call(addr, ChunkRequest::BlockSums { disk, chunk }).await? {
            (ChunkResponse::Sums { version, sums }, _) => Ok((version, sums)),
            (other, _) => Err(RemoteError::new(ErrorCode::Internal, format!("unexpected {other:?}"))),
        }
    }

    async fn call(&self, addr: SocketAddr, req: ChunkRequest) -> Result<(ChunkResponse, Bytes), RemoteError> {
        let out = self
            .rpc
            .call::<NodeRequest, NodeResponse>(addr, &NodeRequest::Chunk(req), Bytes::new(), COPY_TIMEOUT)
            .await
            .map_err(|e| RemoteError::new(ErrorCode::Unavailable, format!("{addr}: {e}")))?;
        match out {
            (NodeResponse::Chunk(Ok(r)), data) => Ok((r, data)),
            (NodeResponse::Chunk(Err(e)), _) | (NodeResponse::Error(e), _) => Err(e),
            (other, _) => Err(RemoteError::new(ErrorCode::Internal, format!("unexpected {other:?}"))),
        }
    }

    /// Scrub every local replica at the configured rate; repair bad blocks from another
    /// replica found through the metadata service.
    pub async fn scrub_pass(self: &Arc<Self>, rate: u64, client: &basalt_storaged_client::StorageClient, me: NodeId) {
        let scrubber = basalt_chunkstore::Scrubber::new(self.store.clone());
        let bad = Mutex::new(Vec::new());
        let report = scrubber
            .scrub_all(rate, |disk, chunk, blocks| {
                bad.lock().unwrap_or_else(|p| p.into_inner()).push((disk, chunk, blocks));
            })
            .await;
        debug!(?report, "scrub pass done");
        let bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        for (disk, chunk, blocks) in bad {
            warn!(%chunk, disk, ?blocks, "scrub found corrupt blocks");
            let Ok(MetaResponse::Chunks(infos)) = client
                .meta(MetaRequest::GetChunks { volume: chunk.volume, first: chunk.index, count: 1 })
                .await
            else {
                continue;
            };
            let Some(info) = infos.into_iter().find(|c| c.id == chunk) else { continue };
            let Some(source) = info.readable().find(|r| r.disk.node != me) else { continue };
            let Ok(addr) = client.node_addr(source.disk.node).await else { continue };
            let source = ReplicaAddr { rpc_addr: addr.to_string(), disk: source.disk };
            if let Err(e) = self.repair_blocks(disk, chunk, blocks, source).await {
                warn!(%chunk, disk, error = %e, "scrub repair failed");
            }
        }
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, RemoteError> {
    s.parse().map_err(|_| RemoteError::new(ErrorCode::InvalidArgument, format!("bad address {s:?}")))
}

/// Group sorted block numbers into runs of consecutive blocks, each at most `max` long.
fn runs(blocks: &[u64], max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((first, count)) if *first + *count == b && *count < max => *count += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_split_at_gaps_and_at_the_batch_size() {
        assert_eq!(runs(&[1, 2, 3, 7, 8, 20], 256), vec![(1, 3), (7, 2), (20, 1)]);
        assert_eq!(runs(&[0, 1, 2, 3, 4], 2), vec![(0, 2), (2, 2), (4, 1)]);
        assert!(runs(&[], 4).is_empty());
    }
}
