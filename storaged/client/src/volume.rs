//! Replicated I/O on one volume.
//!
//! A write goes to every replica of each chunk it touches (readable and syncing ones) in
//! parallel and is acknowledged only when all of them made it durable. A replica that fails
//! is dropped from the chunk's set at the metadata group (which bumps the chunk version and
//! refuses to go below the minimum replica count); only then is the write acknowledged, so
//! an acknowledged write is on every replica the metadata group still lists. Reads go to one
//! readable replica, preferring this node's.

use crate::error::{Error, Result};
use crate::rangelock::RangeLock;
use crate::{unexpected, StorageClient};
use basalt_types::*;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Timeout of one chunk I/O request to one replica.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Writes up to this size are hashed on the async worker; larger ones on the blocking pool
/// (hashing 1 MiB takes a few hundred microseconds, too long to hold a worker).
const HASH_INLINE_MAX: usize = 256 << 10;
/// How many chunk descriptors to fetch on a cache miss.
const CHUNK_WINDOW: u64 = 64;

#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// Lease holder name, e.g. `nbd@node2`.
    pub holder: String,
    /// Node the holder runs on (0 if none).
    pub node: NodeId,
    /// Take the lease over from another holder (fences it).
    pub force: bool,
    /// Open without a lease; writes are refused.
    pub read_only: bool,
}

impl VolumeOptions {
    pub fn writer(holder: impl Into<String>, node: NodeId) -> Self {
        Self { holder: holder.into(), node, force: false, read_only: false }
    }

    /// Open without a lease, for reading only.
    pub fn reader() -> Self {
        Self { holder: String::new(), node: 0, force: false, read_only: true }
    }
}

pub struct Volume {
    client: Arc<StorageClient>,
    name: String,
    id: VolumeId,
    /// Bytes, as the metadata group last told us: read at open, changed by
    /// [`Volume::set_size`] when the client learns of a resize.
    size: AtomicU64,
    chunk_size: u64,
    epoch: Epoch,
    opts: VolumeOptions,
    /// Allocated chunks by index, as last seen from the metadata group.
    chunks: RwLock<HashMap<u64, ChunkInfo>>,
    /// Indices known to be unallocated (valid only for the lease holder, the sole allocator).
    absent: RwLock<HashSet<u64>>,
    /// Nodes that could not be told our epoch: their replicas are dropped before we use a
    /// chunk, so a cut-off old holder can never have written something we then read.
    unfenced: Mutex<HashSet<NodeId>>,
    /// Nodes that failed recently: treated as failed without waiting for a timeout again.
    suspect: Mutex<HashMap<NodeId, Instant>>,
    writes: RangeLock,
    read_rr: AtomicUsize,
    closed: AtomicBool,
}

/// The outcome of sending one request to one replica.
enum ReplicaOutcome {
    Ok,
    Fenced(String),
    StaleVersion,
    Failed(String),
}

impl Volume {
    pub(crate) async fn open(client: Arc<StorageClient>, info: VolumeInfo, opts: VolumeOptions) -> Result<Arc<Self>> {
        let name = info.name.as_str();
        let epoch = if opts.read_only {
            info.epoch
        } else {
            let req = MetaRequest::AcquireLease {
                volume: name.to_string(),
                holder: opts.holder.clone(),
                node: opts.node,
                force: opts.force,
            };
            match client.meta(req).await {
                Ok(MetaResponse::Lease(l)) => l.epoch,
                Ok(other) => return Err(unexpected(other)),
                Err(e) if e.remote_code() == Some(ErrorCode::Fenced) => {
                    return Err(Error::Fenced { volume: name.to_string(), ours: info.epoch, message: e.to_string() })
                }
                Err(e) => return Err(e),
            }
        };
        let vol = Arc::new(Self {
            client: client.clone(),
            name: name.to_string(),
            id: info.id,
            size: AtomicU64::new(info.size),
            chunk_size: info.chunk_size,
            epoch,
            opts,
            chunks: RwLock::new(HashMap::new()),
            absent: RwLock::new(HashSet::new()),
            unfenced: Mutex::new(HashSet::new()),
            suspect: Mutex::new(HashMap::new()),
            writes: RangeLock::default(),
            read_rr: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        if !vol.opts.read_only {
            vol.fence_all().await?;
        }
        client.register_open(&vol).await;
        info!(volume = %vol.name, epoch, holder = %vol.opts.holder, "volume opened");
        Ok(vol)
    }

    /// Tell every node our epoch. Nodes we cannot reach are remembered, and their replicas
    /// are dropped before we touch a chunk.
    async fn fence_all(&self) -> Result<()> {
        let nodes = self.client.list_nodes().await?;
        let calls = nodes.iter().map(|n| {
            let node = n.id;
            let addr = n.rpc_addr.parse::<SocketAddr>().ok();
            async move {
                let Some(addr) = addr else { return (node, false) };
                let req = ChunkRequest::Fence { volume: self.id, epoch: self.epoch };
                let ok = self.client.chunk_call(addr, req, Bytes::new(), IO_TIMEOUT).await.is_ok();
                (node, ok)
            }
        });
        let results = futures::future::join_all(calls).await;
        let mut unfenced = self.unfenced.lock().unwrap_or_else(|p| p.into_inner());
        for (node, ok) in results {
            if !ok {
                warn!(volume = %self.name, node, "could not fence node; its replicas will be dropped");
                unfenced.insert(node);
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn id(&self) -> VolumeId {
        self.id
    }
    /// Current size in bytes; it changes when the volume is resized (see
    /// [`StorageClient::refresh_volume_sizes`]), so a frontend that must announce a fixed
    /// size (NBD) keeps its own copy.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Adopts `size`, the volume's size in the metadata group now. When it differs, or when
    /// `resized` (a resize was announced: sizes may have gone down and back up since we
    /// looked), the cached chunk descriptors are forgotten: a shrink deleted the chunks past
    /// its end, and a chunk allocated again at one of those indices is a new chunk, so no
    /// cached descriptor of them may be used again. Returns whether the size changed.
    pub(crate) fn set_size(&self, size: u64, resized: bool) -> bool {
        let old = self.size.swap(size, Ordering::SeqCst);
        if old != size || resized {
            self.chunks.write().unwrap_or_else(|p| p.into_inner()).clear();
            self.absent.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
        if old != size {
            info!(volume = %self.name, old, new = size, "volume size changed");
        }
        old != size
    }
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange(format!(
                "offset {offset} + length {len} is past the end of volume {} ({size} bytes)",
                self.name
            ))),
        }
    }

    /// Split `[offset, offset+len)` into (chunk index, offset in chunk, length) pieces.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let index = pos / self.chunk_size;
            let in_chunk = pos % self.chunk_size;
            let n = (self.chunk_size - in_chunk).min(end - pos);
            out.push((index, in_chunk, n));
            pos += n;
        }
        out
    }

    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        let pieces = self.pieces(offset, len);
        if pieces.len() == 1 {
            let (index, off, n) = pieces[0];
            return self.read_piece(index, off, n).await;
        }
        let parts = futures::future::try_join_all(
            pieces.iter().map(|&(index, off, n)| self.read_piece(index, off, n)),
        )
        .await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    async fn read_piece(&self, index: u64, off: u64, len: u64) -> Result<Bytes> {
        let deadline = Instant::now() + self.client.config.io_deadline;
        let mut refresh = false;
        let mut last_error = String::new();
        loop {
            let Some(chunk) = self.chunk(index, false, refresh).await? else {
                return Ok(Bytes::from(vec![0u8; len as usize]));
            };
            let mut stale = false;
            // Reads do not drop unfenced replicas (only writers must): they just try them
            // last, like suspects.
            let mut replicas: Vec<Replica> = chunk.readable().copied().collect();
            // Prefer our own node, then rotate so reads spread over replicas; suspects last.
            let rr = self.read_rr.fetch_add(1, Ordering::Relaxed);
            if !replicas.is_empty() {
                let k = rr % replicas.len();
                replicas.rotate_left(k);
            }
            let local = self.client.config.local_node;
            replicas.sort_by_key(|r| {
                let n = r.disk.node;
                (self.is_suspect(n) || self.is_unfenced(n), Some(n) != local)
            });
            for (i, r) in replicas.iter().enumerate() {
                let Ok(addr) = self.client.node_addr(r.disk.node).await else { continue };
                let req = ChunkRequest::Read { disk: r.disk.disk, chunk: chunk.id, version: chunk.version, offset: off, len };
                match self.client.chunk_call(addr, req, Bytes::new(), IO_TIMEOUT).await {
                    Ok((ChunkResponse::Data, data)) if data.len() as u64 == len => return Ok(data),
                    Ok((other, data)) => {
                        last_error = format!("replica {} answered {other:?} with {} bytes", r.disk, data.len());
                    }
                    Err(Error::Remote(e)) if e.code == ErrorCode::StaleVersion => {
                        // Our descriptor is old (a replica was dropped or added): refresh.
                        last_error = e.to_string();
                        stale = true;
                    }
                    Err(Error::Remote(e)) if e.code == ErrorCode::Corrupt => {
                        warn!(chunk = %chunk.id, replica = %r.disk, "corrupt block on read; repairing from another replica");
                        if let Some(source) = replicas.iter().enumerate().find(|(j, _)| *j != i).map(|(_, s)| *s) {
                            self.spawn_repair(&chunk, *r, source, &e.message);
                        }
                        last_error = e.to_string();
                    }
                    Err(e) => {
                        if matches!(e, Error::Transport(_)) {
                            self.mark_suspect(r.disk.node);
                        }
                        debug!(chunk = %chunk.id, replica = %r.disk, error = %e, "read from replica failed");
                        last_error = e.to_string();
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Io(format!("read of chunk {index} of {}: {last_error}", self.name)));
            }
            refresh = true;
            let pause = if stale { Duration::from_millis(20) } else { Duration::from_millis(200) };
            tokio::time::sleep(pause).await;
        }
    }

    /// Ask the chunk server of a replica with bad blocks to fetch them again from `source`.
    fn spawn_repair(&self, chunk: &ChunkInfo, bad: Replica, source: Replica, message: &str) {
        // An empty list asks the server to verify the whole replica and fetch every bad
        // block: it knows better than our error message which ones they are.
        let _ = message;
        let blocks = Vec::new();
        let client = self.client.clone();
        let chunk_id = chunk.id;
        tokio::spawn(async move {
            let (Ok(bad_addr), Ok(src_addr)) = (client.node_addr(bad.disk.node).await, client.node_addr(source.disk.node).await) else {
                return;
            };
            let req = ChunkRequest::RepairBlocks {
                disk: bad.disk.disk,
                chunk: chunk_id,
                blocks,
                source: ReplicaAddr { rpc_addr: src_addr.to_string(), disk: source.disk },
            };
            match client.chunk_call(bad_addr, req, Bytes::new(), Duration::from_secs(60)).await {
                Ok(_) => info!(chunk = %chunk_id, replica = %bad.disk, "corrupt blocks repaired"),
                Err(e) => warn!(chunk = %chunk_id, replica = %bad.disk, error = %e, "repair failed"),
            }
        });
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        let _guard = self.writes.lock(align_down(offset), align_up(offset + len)).await;
        let pieces = self.pieces(offset, len);
        futures::future::try_join_all(pieces.into_iter().map(|(index, off, n)| {
            let start = (index * self.chunk_size + off - offset) as usize;
            let slice = data.slice(start..start + n as usize);
            self.replicated(index, off, n, Some(slice))
        }))
        .await?;
        Ok(())
    }

    /// Make the range read as zeros, deallocating whole blocks.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _guard = self.writes.lock(align_down(offset), align_up(offset + len)).await;
        let pieces = self.pieces(offset, len);
        futures::future::try_join_all(
            pieces.into_iter().map(|(index, off, n)| self.replicated(index, off, n, None)),
        )
        .await?;
        Ok(())
    }

    /// Every acknowledged write is already durable on every listed replica, so a flush has
    /// nothing left to do; it still checks that we hold the volume.
    pub async fn flush(&self) -> Result<()> {
        self.check_writable()
    }

    fn check_writable(&self) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        if self.opts.read_only {
            return Err(Error::Remote(RemoteError::new(ErrorCode::InvalidArgument, "volume opened read-only")));
        }
        Ok(())
    }

    /// Write (`data` = Some) or trim (None) one piece of one chunk on all its replicas.
    async fn replicated(&self, index: u64, off: u64, len: u64, data: Option<Bytes>) -> Result<()> {
        let deadline = Instant::now() + self.client.config.io_deadline;
        // The block sums are computed once here rather than by each of the replicas.
        let sums: Vec<BlockSum> = match &data {
            Some(d) if d.len() > HASH_INLINE_MAX => {
                let d = d.clone();
                tokio::task::spawn_blocking(move || full_block_sums(off, &d))
                    .await
                    .map_err(|e| Error::Io(format!("hashing task failed: {e}")))?
            }
            Some(d) => full_block_sums(off, d),
            None => Vec::new(),
        };
        let mut refresh = false;
        loop {
            let chunk = match self.chunk(index, data.is_some(), refresh).await? {
                Some(c) => c,
                // Trimming a chunk that was never written: nothing to do.
                None => return Ok(()),
            };
            let chunk = self.drop_unfenced(chunk).await?;
            let outcomes = futures::future::join_all(chunk.replicas.iter().map(|r| {
                let data = data.clone();
                let chunk = &chunk;
                let sums = &sums;
                async move {
                    let req = match &data {
                        Some(_) => ChunkRequest::Write {
                            disk: r.disk.disk,
                            chunk: chunk.id,
                            chunk_size: self.chunk_size,
                            version: chunk.version,
                            epoch: self.epoch,
                            offset: off,
                            sums: sums.clone(),
                        },
                        None => ChunkRequest::Trim {
                            disk: r.disk.disk,
                            chunk: chunk.id,
                            chunk_size: self.chunk_size,
                            version: chunk.version,
                            epoch: self.epoch,
                            offset: off,
                            len,
                        },
                    };
                    (r.disk, self.send_to_replica(r.disk.node, req, data.unwrap_or_default()).await)
                }
            }))
            .await;
            let mut failed = Vec::new();
            let mut stale = false;
            for (disk, outcome) in outcomes {
                match outcome {
                    ReplicaOutcome::Ok => {}
                    ReplicaOutcome::Fenced(message) => {
                        return Err(Error::Fenced { volume: self.name.clone(), ours: self.epoch, message })
                    }
                    ReplicaOutcome::StaleVersion => stale = true,
                    ReplicaOutcome::Failed(why) => {
                        warn!(chunk = %chunk.id, replica = %disk, error = %why, "replica write failed");
                        failed.push(disk);
                    }
                }
            }
            if stale && failed.is_empty() {
                // The replica set changed under us (re-replication): redo with the new set.
                refresh = true;
                continue;
            }
            if failed.is_empty() {
                return Ok(());
            }
            // Drop the failed replicas; the survivors hold the write.
            let req = MetaRequest::DropReplicas { chunk: chunk.id, version: chunk.version, disks: failed.clone() };
            match self.client.meta(req).await {
                Ok(MetaResponse::Chunk(newer)) => {
                    info!(chunk = %chunk.id, dropped = ?failed, version = newer.version, "replicas dropped");
                    self.set_version_on(&newer).await;
                    self.cache_chunk(newer);
                    if !stale {
                        return Ok(());
                    }
                    // Some survivor refused our (old) version: write again to be sure.
                    refresh = false;
                }
                Ok(other) => return Err(unexpected(other)),
                Err(e) => {
                    let code = e.remote_code();
                    if code == Some(ErrorCode::Fenced) {
                        return Err(Error::Fenced { volume: self.name.clone(), ours: self.epoch, message: e.to_string() });
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::Unavailable(format!("chunk {} of {}: {e}", index, self.name)));
                    }
                    debug!(chunk = %chunk.id, error = %e, "cannot drop replicas yet; retrying the write");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    refresh = true;
                }
            }
        }
    }

    async fn send_to_replica(&self, node: NodeId, req: ChunkRequest, data: Bytes) -> ReplicaOutcome {
        if self.is_suspect(node) {
            return ReplicaOutcome::Failed(format!("node {node} failed recently"));
        }
        let addr = match self.client.node_addr(node).await {
            Ok(a) => a,
            Err(e) => return ReplicaOutcome::Failed(e.to_string()),
        };
        match self.client.chunk_call(addr, req, data, IO_TIMEOUT).await {
            Ok(_) => ReplicaOutcome::Ok,
            Err(Error::Remote(e)) => match e.code {
                ErrorCode::Fenced => ReplicaOutcome::Fenced(e.message),
                ErrorCode::StaleVersion => ReplicaOutcome::StaleVersion,
                _ => ReplicaOutcome::Failed(e.to_string()),
            },
            Err(e) => {
                if matches!(e, Error::Transport(_)) {
                    self.mark_suspect(node);
                }
                ReplicaOutcome::Failed(e.to_string())
            }
        }
    }

    /// Tell the replicas of a chunk its new version (best effort: a replica that misses it
    /// is raised by the next write, which carries the version).
    async fn set_version_on(&self, chunk: &ChunkInfo) {
        let calls = chunk.replicas.iter().map(|r| async move {
            if let Ok(addr) = self.client.node_addr(r.disk.node).await {
                let req = ChunkRequest::SetVersion { disk: r.disk.disk, chunk: chunk.id, version: chunk.version };
                let _ = self.client.chunk_call(addr, req, Bytes::new(), IO_TIMEOUT).await;
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Before writing a chunk, drop its replicas on nodes we could not fence: a writer with
    /// an older epoch may still reach them. Races with other droppers (a concurrent write,
    /// the repair manager) show up as a stale version: refresh and look again.
    async fn drop_unfenced(&self, mut chunk: ChunkInfo) -> Result<ChunkInfo> {
        if self.opts.read_only {
            return Ok(chunk);
        }
        let deadline = Instant::now() + self.client.config.io_deadline;
        loop {
            let unfenced: Vec<DiskId> = {
                let set = self.unfenced.lock().unwrap_or_else(|p| p.into_inner());
                chunk.replicas.iter().filter(|r| set.contains(&r.disk.node)).map(|r| r.disk).collect()
            };
            if unfenced.is_empty() {
                return Ok(chunk);
            }
            let req = MetaRequest::DropReplicas { chunk: chunk.id, version: chunk.version, disks: unfenced };
            match self.client.meta(req).await {
                Ok(MetaResponse::Chunk(newer)) => {
                    self.set_version_on(&newer).await;
                    self.cache_chunk(newer.clone());
                    return Ok(newer);
                }
                Ok(other) => return Err(unexpected(other)),
                Err(e) => {
                    let retry = matches!(e.remote_code(), Some(ErrorCode::StaleVersion | ErrorCode::Unavailable));
                    if !retry || Instant::now() >= deadline {
                        return Err(e);
                    }
                    if e.remote_code() == Some(ErrorCode::Unavailable) {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    chunk = match self.chunk(chunk.id.index, false, true).await? {
                        Some(c) => c,
                        None => return Err(Error::Protocol(format!("chunk {} vanished", chunk.id))),
                    };
                }
            }
        }
    }

    fn is_unfenced(&self, node: NodeId) -> bool {
        self.unfenced.lock().unwrap_or_else(|p| p.into_inner()).contains(&node)
    }

    /// The chunk descriptor for `index`: from the cache, or from the metadata group
    /// (`refresh` forces that), allocating it if `allocate` and it does not exist.
    async fn chunk(&self, index: u64, allocate: bool, refresh: bool) -> Result<Option<ChunkInfo>> {
        if !refresh {
            if let Some(c) = self.chunks.read().unwrap_or_else(|p| p.into_inner()).get(&index) {
                return Ok(Some(c.clone()));
            }
            let known_absent = !self.opts.read_only
                && self.absent.read().unwrap_or_else(|p| p.into_inner()).contains(&index);
            if known_absent && !allocate {
                return Ok(None);
            }
        }
        let first = index - index % CHUNK_WINDOW;
        let req = MetaRequest::GetChunks { volume: self.id, first, count: CHUNK_WINDOW };
        let chunks = match self.client.meta(req).await? {
            MetaResponse::Chunks(c) => c,
            other => return Err(unexpected(other)),
        };
        {
            let mut absent = self.absent.write().unwrap_or_else(|p| p.into_inner());
            absent.extend(first..first + CHUNK_WINDOW);
        }
        for c in chunks {
            self.cache_chunk(c);
        }
        if let Some(c) = self.chunks.read().unwrap_or_else(|p| p.into_inner()).get(&index) {
            return Ok(Some(c.clone()));
        }
        if !allocate {
            return Ok(None);
        }
        let req = MetaRequest::AllocateChunk { chunk: ChunkId { volume: self.id, index }, epoch: self.epoch };
        match self.client.meta(req).await {
            Ok(MetaResponse::Chunk(c)) => {
                debug!(chunk = %c.id, replicas = ?c.replicas, "chunk allocated");
                self.cache_chunk(c.clone());
                Ok(Some(c))
            }
            Ok(other) => Err(unexpected(other)),
            Err(e) if e.remote_code() == Some(ErrorCode::Fenced) => {
                Err(Error::Fenced { volume: self.name.clone(), ours: self.epoch, message: e.to_string() })
            }
            Err(e) => Err(e),
        }
    }

    fn cache_chunk(&self, c: ChunkInfo) {
        let index = c.id.index;
        let mut cache = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        // Never replace a newer descriptor by an older one (concurrent refreshes).
        if cache.get(&index).is_some_and(|old| old.version > c.version) {
            return;
        }
        cache.insert(index, c);
        drop(cache);
        self.absent.write().unwrap_or_else(|p| p.into_inner()).remove(&index);
    }

    fn is_suspect(&self, node: NodeId) -> bool {
        let suspect = self.suspect.lock().unwrap_or_else(|p| p.into_inner());
        suspect.get(&node).is_some_and(|until| Instant::now() < *until)
    }

    fn mark_suspect(&self, node: NodeId) {
        let mut suspect = self.suspect.lock().unwrap_or_else(|p| p.into_inner());
        suspect.insert(node, Instant::now() + Duration::from_secs(3));
    }

    /// Whether chunk `index` has been written (allocated) yet.
    pub async fn is_allocated(&self, index: u64) -> Result<bool> {
        Ok(self.chunk(index, false, false).await?.is_some())
    }

    /// Release the write lease. Further I/O fails with `Closed`.
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::Relaxed) || self.opts.read_only {
            return Ok(());
        }
        let req = MetaRequest::ReleaseLease { volume: self.name.clone(), holder: self.opts.holder.clone() };
        match self.client.meta(req).await {
            Ok(_) => Ok(()),
            // Someone took it over or deleted the volume: nothing of ours to release.
            Err(e) if matches!(e.remote_code(), Some(ErrorCode::Fenced | ErrorCode::NotFound)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn align_down(x: u64) -> u64 {
    x - x % BLOCK_SIZE
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers_round_to_blocks() {
        assert_eq!(align_down(4097), 4096);
        assert_eq!(align_up(4097), 8192);
        assert_eq!(align_up(4096), 4096);
    }
}
