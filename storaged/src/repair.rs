//! Re-replication, catch-up and stale-copy cleanup, driven by the metadata leader.
//!
//! Every few seconds the leader plans repairs from the cluster map (`basalt_map::plan_repairs`)
//! and carries out a bounded number at once. Adding a replica is ordered so no acknowledged
//! write can be missed by the new copy:
//!
//! 1. the target is told to `PrepareSync` (it records every client write from now on);
//! 2. `AddReplica` is committed (version v → v+1; clients now write to the target too);
//! 3. the existing replicas are raised to v+1, so writers still using v are refused and
//!    refresh, and every write accepted at v has landed before the copy starts;
//! 4. the target copies the blocks that differ from the source, skipping blocks clients
//!    wrote meanwhile (`SyncFrom`);
//! 5. `ReplicaSynced` makes it readable. On any failure the target is dropped again.

use basalt_map::{plan_repairs, RepairAction};
use basalt_meta::MetaService;
use basalt_storaged_client::StorageClient;
use basalt_types::*;
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// Chunks repaired at once by the leader.
const MAX_CONCURRENT: usize = 4;
const PLAN_INTERVAL: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A full 64 MiB copy at the default repair rate takes well under this.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);

pub struct RepairManager {
    meta: Arc<MetaService>,
    client: Arc<StorageClient>,
    in_flight: Mutex<HashSet<ChunkId>>,
}

impl RepairManager {
    pub fn new(meta: Arc<MetaService>, client: Arc<StorageClient>) -> Arc<Self> {
        Arc::new(Self { meta, client, in_flight: Mutex::new(HashSet::new()) })
    }

    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut seed = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PLAN_INTERVAL) => {}
            }
            if !self.meta.is_leader() {
                continue;
            }
            seed = seed.wrapping_add(1);
            let free = MAX_CONCURRENT.saturating_sub(self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len());
            if free == 0 {
                continue;
            }
            let actions = {
                let usage = self.meta.usage();
                let map = self.meta.map();
                let map = map.read().unwrap_or_else(|p| p.into_inner());
                plan_repairs(&map, &usage, MAX_CONCURRENT * 4, seed)
            };
            let mut started = 0;
            for action in actions {
                if started == free {
                    break;
                }
                let chunk = action_chunk(&action);
                if !self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(chunk) {
                    continue;
                }
                started += 1;
                let me = self.clone();
                let span = tracing::info_span!("repair", chunk = %chunk);
                tokio::spawn(
                    async move {
                        if let Err(e) = me.execute(&action).await {
                            warn!(?action, error = %e, "repair step failed; will replan");
                        }
                        me.in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&chunk);
                    }
                    .instrument(span),
                );
            }
        }
    }

    async fn execute(&self, action: &RepairAction) -> Result<(), RemoteError> {
        match action {
            RepairAction::DropDead { chunk, disks, .. } => {
                let newer = self.propose_chunk(action.command()).await?;
                info!(%chunk, dropped = ?disks, version = newer.version, "replicas on dead nodes dropped");
                self.raise_versions(&newer).await;
                Ok(())
            }
            RepairAction::AddReplica { chunk, version, disk, source, incremental } => {
                self.add_replica(*chunk, *version, *disk, *source, *incremental).await
            }
            RepairAction::DeleteStale { chunk, disk } => {
                let addr = self.addr(disk.node).await?;
                self.chunk_call(addr, ChunkRequest::Delete { disk: disk.disk, chunk: *chunk }, CALL_TIMEOUT).await?;
                self.propose(MetaCommand::ForgetStale { chunk: *chunk, disk: *disk }).await?;
                info!(%chunk, %disk, "stale copy deleted");
                Ok(())
            }
        }
    }

    async fn add_replica(
        &self,
        chunk: ChunkId,
        version: ChunkVersion,
        disk: DiskId,
        source: DiskId,
        incremental: bool,
    ) -> Result<(), RemoteError> {
        let chunk_size = {
            let map = self.meta.map();
            let map = map.read().unwrap_or_else(|p| p.into_inner());
            map.volume(chunk.volume).map(|v| v.chunk_size)
        }
        .ok_or_else(|| RemoteError::new(ErrorCode::NotFound, "volume gone"))?;
        let target = self.addr(disk.node).await?;
        let prepare = ChunkRequest::PrepareSync { disk: disk.disk, chunk, chunk_size, version: version + 1 };
        self.chunk_call(target, prepare, CALL_TIMEOUT).await?;
        let added = self.propose_chunk(Some(MetaCommand::AddReplica { chunk, version, disk })).await?;
        info!(%chunk, target = %disk, %source, incremental, version = added.version, "re-replication started");
        let result = self.fill(&added, disk, source, chunk_size, target).await;
        match result {
            Ok((copied, skipped)) => {
                let current = self.current_chunk(chunk)?;
                self.propose(MetaCommand::ReplicaSynced { chunk, version: current.version, disk }).await?;
                info!(%chunk, target = %disk, copied, skipped, "re-replication done");
                Ok(())
            }
            Err(e) => {
                warn!(%chunk, target = %disk, error = %e, "re-replication failed; dropping the target");
                if let Ok(current) = self.current_chunk(chunk) {
                    let drop = MetaCommand::DropReplicas { chunk, version: current.version, disks: vec![disk], min_replicas: 0 };
                    let _ = self.propose(drop).await;
                }
                Err(e)
            }
        }
    }

    async fn fill(
        &self,
        added: &ChunkInfo,
        disk: DiskId,
        source: DiskId,
        chunk_size: u64,
        target: std::net::SocketAddr,
    ) -> Result<(u64, u64), RemoteError> {
        // Step 3: the source, at least, must be at the new version before the copy starts.
        let source_addr = self.addr(source.node).await?;
        let raise = ChunkRequest::SetVersion { disk: source.disk, chunk: added.id, version: added.version };
        self.chunk_call(source_addr, raise, CALL_TIMEOUT).await?;
        self.raise_versions(added).await;
        let sync = ChunkRequest::SyncFrom {
            disk: disk.disk,
            chunk: added.id,
            chunk_size,
            version: added.version,
            source: ReplicaAddr { rpc_addr: source_addr.to_string(), disk: source },
        };
        match self.chunk_call(target, sync, SYNC_TIMEOUT).await? {
            ChunkResponse::Synced { copied, skipped } => Ok((copied, skipped)),
            other => Err(RemoteError::new(ErrorCode::Internal, format!("unexpected {other:?}"))),
        }
    }

    /// Tell every replica of the chunk its current version (best effort).
    async fn raise_versions(&self, chunk: &ChunkInfo) {
        let calls = chunk.replicas.iter().map(|r| async move {
            if let Ok(addr) = self.addr(r.disk.node).await {
                let req = ChunkRequest::SetVersion { disk: r.disk.disk, chunk: chunk.id, version: chunk.version };
                let _ = self.chunk_call(addr, req, CALL_TIMEOUT).await;
            }
        });
        futures::future::join_all(calls).await;
    }

    fn current_chunk(&self, chunk: ChunkId) -> Result<ChunkInfo, RemoteError> {
        let map = self.meta.map();
        let map = map.read().unwrap_or_else(|p| p.into_inner());
        map.chunk(chunk).cloned().ok_or_else(|| RemoteError::new(ErrorCode::NotFound, format!("{chunk} is gone")))
    }

    async fn addr(&self, node: NodeId) -> Result<std::net::SocketAddr, RemoteError> {
        let addr = {
            let map = self.meta.map();
            let map = map.read().unwrap_or_else(|p| p.into_inner());
            map.node(node).map(|n| n.rpc_addr.clone())
        };
        addr.and_then(|a| a.parse().ok())
            .ok_or_else(|| RemoteError::new(ErrorCode::NotFound, format!("node {node} has no address")))
    }

    async fn chunk_call(
        &self,
        addr: std::net::SocketAddr,
        req: ChunkRequest,
        timeout: Duration,
    ) -> Result<ChunkResponse, RemoteError> {
        self.client
            .chunk_call(addr, req, Bytes::new(), timeout)
            .await
            .map(|(r, _)| r)
            .map_err(|e| RemoteError::new(e.code(), e.to_string()))
    }

    async fn propose(&self, cmd: MetaCommand) -> Result<MetaReply, RemoteError> {
        match self.meta.propose(cmd).await? {
            MetaReply::Error(e) => Err(e),
            reply => Ok(reply),
        }
    }

    async fn propose_chunk(&self, cmd: Option<MetaCommand>) -> Result<ChunkInfo, RemoteError> {
        let cmd = cmd.ok_or_else(|| RemoteError::new(ErrorCode::Internal, "no command"))?;
        match self.propose(cmd).await? {
            MetaReply::Chunk(c) => Ok(c),
            other => Err(RemoteError::new(ErrorCode::Internal, format!("unexpected {other:?}"))),
        }
    }
}

fn action_chunk(action: &RepairAction) -> ChunkId {
    match action {
        RepairAction::DropDead { chunk, .. }
        | RepairAction::AddReplica { chunk, .. }
        | RepairAction::DeleteStale { chunk, .. } => *chunk,
    }
}
