//! Garbage collection of replicas whose volume is gone.
//!
//! Deleting a volume removes its replicas from every node that is up at the time (best
//! effort, by the client). A node that was down keeps them; this loop finds them later. It
//! lists the local replicas first and the cluster's volumes second: a volume created after
//! the listing cannot have replicas in the earlier scan, so only volumes that existed and
//! were deleted are collected. Volume ids are never reused (the map hands out increasing
//! ids), so "not listed" means "deleted".

use basalt_chunkstore::ChunkStore;
use basalt_storaged_client::StorageClient;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// First pass soon after start (the node may just be back from an outage), then regularly.
const FIRST_PASS: Duration = Duration::from_secs(5);

pub async fn run(store: ChunkStore, client: Arc<StorageClient>, every: Duration, shutdown: CancellationToken) {
    let mut wait = FIRST_PASS;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = every;
        if let Err(e) = pass(&store, &client).await {
            warn!(error = %e, "replica garbage collection skipped");
        }
    }
}

/// One pass; returns the number of volumes whose replicas were removed.
pub async fn pass(store: &ChunkStore, client: &StorageClient) -> Result<usize, String> {
    let local: BTreeSet<u64> = store.list().into_iter().map(|(_, chunk, _)| chunk.volume).collect();
    if local.is_empty() {
        return Ok(0);
    }
    let live: BTreeSet<u64> =
        client.list_volumes().await.map_err(|e| e.to_string())?.into_iter().map(|v| v.id).collect();
    let mut removed = 0;
    for volume in local.difference(&live) {
        match store.delete_volume(*volume).await {
            Ok(()) => {
                info!(volume, "deleted the replicas of a volume that no longer exists");
                removed += 1;
            }
            Err(e) => warn!(volume, error = %e, "could not delete the replicas of a deleted volume"),
        }
    }
    Ok(removed)
}
