//! The node's NBD export: every volume is an export of the same name.
//!
//! All connections of this node to one volume share one [`Volume`] (one write lease held as
//! `nbd@<node>`, one chunk cache, one range lock), so QEMU's multi-connection mode works. The
//! lease is released when the last connection closes. A volume leased by another node is
//! refused, unless that node is dead: then the lease is taken over (the epoch bump fences it).

use async_trait::async_trait;
use basalt_nbd::{BackendError, BlockBackend, ExportInfo, ExportProvider, Extent};
use basalt_storaged_client::{Error as ClientError, StorageClient, Volume, VolumeOptions};
use basalt_types::{ErrorCode, NodeId, NodeState};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;
use tracing::{info, warn};

/// The lease holder name of a node's NBD export.
pub fn holder_name(node_name: &str) -> String {
    format!("nbd@{node_name}")
}

pub struct Exports {
    client: Arc<StorageClient>,
    node: NodeId,
    holder: String,
    open: Mutex<HashMap<String, (Arc<Volume>, usize)>>,
}

impl Exports {
    pub fn new(client: Arc<StorageClient>, node: NodeId, node_name: &str) -> Arc<Self> {
        Arc::new(Self { client, node, holder: holder_name(node_name), open: Mutex::new(HashMap::new()) })
    }

    async fn open_volume(&self, name: &str) -> Result<Arc<Volume>, ClientError> {
        let opts = VolumeOptions::writer(self.holder.clone(), self.node);
        match self.client.open_volume(name, opts.clone()).await {
            Err(ClientError::Fenced { .. }) if self.holder_is_dead(name).await => {
                warn!(volume = name, "taking over the lease of a dead node");
                self.client.open_volume(name, VolumeOptions { force: true, ..opts }).await
            }
            other => other,
        }
    }

    async fn holder_is_dead(&self, name: &str) -> bool {
        let Ok(info) = self.client.volume(name).await else { return false };
        let Some(lease) = info.lease else { return false };
        let Ok(nodes) = self.client.list_nodes().await else { return false };
        nodes.iter().any(|n| n.id == lease.node && n.state == NodeState::Dead)
    }

    async fn release(&self, name: &str) {
        let mut open = self.open.lock().await;
        let Some(entry) = open.get_mut(name) else { return };
        entry.1 -= 1;
        if entry.1 == 0 {
            let (vol, _) = entry.clone();
            open.remove(name);
            drop(open);
            if let Err(e) = vol.close().await {
                warn!(volume = name, error = %e, "could not release the lease");
            } else {
                info!(volume = name, "last NBD connection closed; lease released");
            }
        }
    }
}

/// The export provider handed to the NBD server.
pub struct ExportsProvider(pub Arc<Exports>);

#[async_trait]
impl ExportProvider for ExportsProvider {
    async fn list(&self) -> Result<Vec<ExportInfo>, BackendError> {
        let vols = self.0.client.list_volumes().await.map_err(to_backend)?;
        Ok(vols
            .into_iter()
            .map(|v| ExportInfo { name: v.name.clone(), description: format!("Basalt volume {} ({} bytes)", v.name, v.size) })
            .collect())
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn BlockBackend>, BackendError> {
        let exports = &self.0;
        let mut open = exports.open.lock().await;
        let vol = match open.get_mut(name) {
            Some((vol, count)) => {
                *count += 1;
                vol.clone()
            }
            None => {
                let vol = exports.open_volume(name).await.map_err(|e| match e.code() {
                    ErrorCode::NotFound => BackendError::NotFound(format!("no volume named {name:?}")),
                    _ => to_backend(e),
                })?;
                open.insert(name.to_string(), (vol.clone(), 1));
                vol
            }
        };
        Ok(Arc::new(VolumeBackend { size: vol.size(), vol, exports: exports.clone() }))
    }
}

struct VolumeBackend {
    vol: Arc<Volume>,
    /// The size this connection announced: a resize reaches new connections only (the
    /// shared volume itself refuses I/O past a shrunk end).
    size: u64,
    exports: Arc<Exports>,
}

fn to_backend(e: ClientError) -> BackendError {
    match e.code() {
        ErrorCode::InvalidArgument => BackendError::InvalidArgument(e.to_string()),
        ErrorCode::NotFound => BackendError::Io(e.to_string()),
        ErrorCode::Fenced => BackendError::Fenced(e.to_string()),
        ErrorCode::NoSpace => BackendError::NoSpace,
        _ => BackendError::Io(e.to_string()),
    }
}

#[async_trait]
impl BlockBackend for VolumeBackend {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.vol.read(offset, len as u64).await.map_err(to_backend)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BackendError> {
        // Every write is durable on all replicas when acknowledged, so FUA needs nothing more.
        self.vol.write(offset, data).await.map_err(to_backend)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.vol.flush().await.map_err(to_backend)
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        self.vol.trim(offset, len as u64).await.map_err(to_backend)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _may_trim: bool) -> Result<(), BackendError> {
        // Trimmed blocks read as zeros and the volume is thin anyway.
        self.vol.trim(offset, len as u64).await.map_err(to_backend)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BackendError> {
        // Chunk granularity: unallocated chunks are holes.
        let cs = self.vol.chunk_size();
        let end = offset + len as u64;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = ((pos / cs) + 1) * cs;
            let n = next.min(end) - pos;
            let allocated = self.vol.is_allocated(pos / cs).await.map_err(to_backend)?;
            match out.last_mut() {
                Some(Extent { length, allocated: a, .. }) if *a == allocated => *length += n,
                _ => out.push(if allocated { Extent::data(n) } else { Extent::hole(n) }),
            }
            pos += n;
        }
        Ok(out)
    }

    async fn close(&self) -> Result<(), BackendError> {
        self.exports.release(self.vol.name()).await;
        Ok(())
    }
}
