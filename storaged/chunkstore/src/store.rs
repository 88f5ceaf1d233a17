//! `ChunkStore`: the replicas of every data disk of this node, their versions, and the volume
//! epochs. Replica data reads and whole-block overwrites go through io_uring (see `uring`);
//! the rest of the async methods run their file I/O on tokio's blocking pool.

use basalt_iobuf::AlignedBuf;
use crate::disk::{fsync_dir, write_meta, Disk, ReplicaMeta};
use crate::error::{Error, IoContext, Result};
use crate::journal::{self, DataWrite, DataWritten, FastOutcome, Journal, Record};
use crate::uring::{RunToEnd, Uring, WriteOp};
use crate::replica::{
    blocks_of, classify, classify_all, lock, set_entry, sum_at, BlockSet, BlockState, Files, InFlight, Replica, ReplicaState, BS, ENTRY,
    ZERO_SUM,
};
use basalt_types::{BlockSum, ChunkId, ChunkVersion, DiskUsage, Epoch, VolumeId, BLOCK_SIZE};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
#[cfg(test)]
use std::time::Duration;

/// Blocks verified per step by whole-replica walks (sums, scrub), so writers to the same
/// replica wait at most one step for the lock.
pub(crate) const WALK_BLOCKS: u64 = 256;

/// Tunables of a store.
#[derive(Clone, Debug)]
pub struct Config {
    /// Replicas whose two files stay open at once; older ones are closed (and reopened on the
    /// next access) beyond this. Default 4096 (8192 descriptors).
    pub max_open_replicas: usize,
    /// Size of each disk's journal ring (see the `journal` module). Default 128 MiB; a
    /// journal keeps the size it was created with.
    pub journal_bytes: u64,
    /// Read replica data through io_uring (see the `uring` module) rather than the blocking
    /// pool. Default true; the store falls back to the pool when the kernel refuses a ring.
    pub io_uring: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_open_replicas: 4096, journal_bytes: journal::DEFAULT_RING, io_uring: true }
    }
}

/// Identity of one data directory of the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskIdentity {
    pub disk: u32,
    pub path: PathBuf,
    pub uuid: String,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// fdatasync calls made on replica and journal files.
    pub fdatasyncs: u64,
    pub open_replicas: u64,
    /// io_uring reads redone under the replica lock (racing a write, corruption, or the ring
    /// stopped).
    pub ring_fallbacks: u64,
    /// Journal commits written by a lone writer itself rather than the committer thread.
    pub fast_commits: u64,
}

/// The replica store of one node. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    disks: Vec<Disk>,
    /// Highest epoch seen per volume. Writes hold the read side for their whole duration, so
    /// once `fence` returns no write with an older epoch is still in progress.
    epochs: tokio::sync::RwLock<HashMap<VolumeId, Epoch>>,
    replicas: Mutex<HashMap<(u32, ChunkId), Arc<Replica>>>,
    /// Serialises creating and removing replicas (map entry and files together).
    create_lock: Mutex<()>,
    open_lru: Mutex<VecDeque<Weak<Replica>>>,
    max_open: usize,
    /// Replicas being filled by re-replication, with the blocks clients wrote since
    /// `begin_sync`. Updated under the replica's write lock by client writes, read under it by
    /// `write_blocks`, so a copied block never lands on top of a newer client write.
    syncing: Mutex<HashMap<(u32, ChunkId), BlockSet>>,
    /// One per disk, same order as `disks`. Declared after `replicas` so that, on drop, the
    /// committers finish before the files they sync are closed.
    journals: Vec<Journal>,
    fdatasyncs: Arc<AtomicU64>,
    /// The ring replica reads go through, if the kernel gave us one.
    uring: Option<Arc<Uring>>,
    /// Ring reads redone under the replica lock (a block did not verify, or the ring stopped).
    ring_fallbacks: AtomicU64,
    #[cfg(test)]
    pub(crate) hooks: TestHooks,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(ring) = &self.uring {
            ring.stop();
            // What is still in flight now is the in-place writes of answered writes (every
            // other operation holds the store): they land before the disks are unlocked, so
            // a store opened again after this cannot see one land over a newer write.
            ring.finish_pending();
        }
    }
}

#[cfg(test)]
#[derive(Default)]
pub(crate) struct TestHooks {
    /// Makes the next write stop right after its sums pwrite, as if the process were killed.
    pub crash_after_sums: std::sync::atomic::AtomicBool,
    /// What happens to the next deferred in-place write (`FastCommit::commit_alone`).
    pub next_placement: Mutex<Option<PlacementHook>>,
}

#[cfg(test)]
pub(crate) enum PlacementHook {
    /// Submitted only once this is notified.
    Hold(Arc<tokio::sync::Notify>),
    /// Never submitted, as if the ring had stopped.
    Drop,
}

/// Reads up to this size are verified (and ring writes without the writer's sums hashed) on
/// the async worker; larger ones on the blocking pool (blake3 takes about a microsecond per
/// 4 KiB block).
const VERIFY_INLINE_MAX: usize = 256 << 10;

/// The data file of a replica's open files, for the ring (which keeps it open while an
/// operation on it is in flight).
struct DataFd(Arc<Files>);

impl std::os::fd::AsRawFd for DataFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0.data)
    }
}

enum ReadPlan {
    Empty,
    /// An acknowledged write of these blocks (first, count) is not in place yet: wait for
    /// it, then plan again.
    Placing(Arc<Replica>, u64, u64),
    /// The lock is taken (by a writer on the blocking pool): read there, waiting for it.
    Blocking,
    /// Read `entries.len() / ENTRY` blocks from `first` through the ring.
    Ring { files: Arc<Files>, first: u64, entries: Vec<u8> },
}

/// A ring write between its sums update and its data write.
struct RingWrite {
    files: Arc<Files>,
    record: Record,
    guard: InFlight,
}

/// What [`Inner::plan_ring_write`] decided.
enum RingPlan {
    /// Sums updated: write the data through the ring.
    Ring(RingWrite),
    /// Not for the ring: take the blocking path.
    Blocking,
    /// An acknowledged write of these blocks (first, count) is not in place yet: wait for
    /// it, then plan again (so this write's data cannot land before it).
    Placing(Arc<Replica>, u64, u64),
}

/// What a mutation leaves for the journal: the sum entries it wrote, to be made durable.
type Journalled = Option<(Arc<Files>, Record)>;

fn check_range(offset: u64, len: u64, chunk_size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= chunk_size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, chunk_size }),
    }
}

/// Whether block `b` is entirely covered by `[offset, offset+len)`.
fn is_full(b: u64, offset: u64, len: u64) -> bool {
    b * BLOCK_SIZE >= offset && (b + 1) * BLOCK_SIZE <= offset + len
}

/// First block and number of blocks touched by `[offset, offset+len)`, `len > 0`.
fn block_span(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / BLOCK_SIZE;
    (first, (offset + len).div_ceil(BLOCK_SIZE) - first)
}

impl ChunkStore {
    /// Opens the store on `disks` (disk index = position), creating and labelling new
    /// directories, and loads the replica inventory and the volume epochs.
    pub async fn open(disks: Vec<PathBuf>) -> Result<ChunkStore> {
        Self::open_with(disks, Config::default()).await
    }

    pub async fn open_with(disks: Vec<PathBuf>, config: Config) -> Result<ChunkStore> {
        let uring = if config.io_uring {
            match Uring::start() {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable; replica reads use the blocking pool");
                    None
                }
            }
        } else {
            None
        };
        tokio::task::spawn_blocking(move || Inner::open(disks, config, uring))
            .await
            .map_err(|e| Error::BadDisk(format!("open task failed: {e}")))?
            .map(|inner| ChunkStore { inner: Arc::new(inner) })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::BadDisk(format!("I/O task failed: {e}")))?
    }

    pub fn disks(&self) -> Vec<DiskIdentity> {
        self.inner
            .disks
            .iter()
            .map(|d| DiskIdentity { disk: d.index, path: d.root.clone(), uuid: d.uuid.clone() })
            .collect()
    }

    /// Waits until `rec` (already in `files`' sums file) is durable in the disk's journal.
    async fn journal(&self, disk: u32, pending: Journalled) -> Result<()> {
        match pending {
            Some((files, rec)) => self.inner.journal(disk)?.commit(rec, files).await,
            None => Ok(()),
        }
    }

    pub fn stats(&self) -> Stats {
        let open = lock(&self.inner.replicas).values().filter(|r| lock(&r.files).is_some()).count();
        Stats {
            fdatasyncs: self.inner.fdatasyncs.load(Ordering::Relaxed),
            open_replicas: open as u64,
            ring_fallbacks: self.inner.ring_fallbacks.load(Ordering::Relaxed),
            fast_commits: self.inner.journals.iter().map(|j| j.fast_commits()).sum(),
        }
    }

    /// Refuses `epoch` if older than the volume's; records (durably) a newer one. The returned
    /// guard keeps a concurrent `fence` waiting until the caller's write is done.
    async fn admit(
        &self,
        volume: VolumeId,
        epoch: Epoch,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, HashMap<VolumeId, Epoch>>> {
        {
            let epochs = self.inner.epochs.read().await;
            let have = epochs.get(&volume).copied().unwrap_or(0);
            if epoch < have {
                return Err(Error::Fenced { volume, have, got: epoch });
            }
            if epoch == have {
                return Ok(epochs);
            }
        }
        let mut epochs = self.inner.epochs.write().await;
        let have = epochs.get(&volume).copied().unwrap_or(0);
        if epoch < have {
            return Err(Error::Fenced { volume, have, got: epoch });
        }
        if epoch > have {
            self.blocking(move |inner| inner.persist_epoch(volume, epoch)).await?;
            epochs.insert(volume, epoch);
        }
        Ok(epochs.downgrade())
    }

    /// Writes `data` at `offset` of the replica, durably. See the crate docs for the checks.
    ///
    /// Takes `Bytes` rather than a slice so the data reaches the blocking pool without a copy.
    #[allow(clippy::too_many_arguments)]
    pub async fn write(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        epoch: Epoch,
        offset: u64,
        data: Bytes,
    ) -> Result<()> {
        self.write_with_sums(disk, chunk, chunk_size, version, epoch, offset, data, Vec::new()).await
    }

    /// [`write`](Self::write) with the sums of the whole blocks already computed by the caller
    /// (`basalt_types::full_block_sums`); an empty `sums` means "compute them here".
    #[allow(clippy::too_many_arguments)]
    pub async fn write_with_sums(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        epoch: Epoch,
        offset: u64,
        data: Bytes,
        sums: Vec<BlockSum>,
    ) -> Result<()> {
        check_range(offset, data.len() as u64, chunk_size)?;
        let want = basalt_types::full_blocks(offset, data.len() as u64);
        if !sums.is_empty() && sums.len() as u64 != want {
            return Err(Error::BadSums { got: sums.len(), want });
        }
        let _epoch = self.admit(chunk.volume, epoch).await?;
        if let Some(ring) = &self.inner.uring {
            loop {
                match self.inner.plan_ring_write(disk, chunk, chunk_size, version, offset, &data, &sums)? {
                    RingPlan::Ring(plan) => return self.ring_write(ring, disk, plan, data).await,
                    RingPlan::Placing(rep, first, n) => rep.placed(first, n).await,
                    RingPlan::Blocking => break,
                }
            }
        }
        // The blocking task hands its record straight to the journal and the outcome comes
        // back on one channel: one wake-up of this task instead of two.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = self.inner.clone();
        let task = tokio::task::spawn_blocking(move || {
            match inner.write(disk, chunk, chunk_size, version, offset, &data, sums) {
                Ok(Some((files, rec))) => match inner.journal(disk) {
                    Ok(j) => j.enqueue(rec, files, tx),
                    Err(e) => drop(tx.send(Err(e))),
                },
                Ok(None) => drop(tx.send(Ok(()))),
                Err(e) => drop(tx.send(Err(e))),
            }
        });
        let outcome = rx.await.unwrap_or_else(|_| Err(Error::BadDisk("write task failed".into())));
        // The task has normally finished long before its commit did, so this does not wait;
        // but it must have dropped its handle on the store before we return, or a caller that
        // drops the store and reopens it could find the disks still locked.
        let _ = task.await;
        outcome
    }

    /// Reads `len` bytes at `offset`, every touched block verified.
    pub async fn read(&self, disk: u32, chunk: ChunkId, version: ChunkVersion, offset: u64, len: u64) -> Result<Bytes> {
        if let Some(ring) = &self.inner.uring {
            if let Some(data) = self.read_ring(ring, disk, chunk, version, offset, len).await? {
                return Ok(data);
            }
            self.inner.ring_fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(disk, %chunk, offset, len, "ring read fell back to the locked read");
        }
        self.blocking(move |inner| inner.read(disk, chunk, version, offset, len)).await
    }

    /// The data write of [`plan_ring_write`](Inner::plan_ring_write) through the ring, and
    /// the journal commit that makes sums and data durable.
    async fn ring_write(&self, ring: &Arc<Uring>, disk: u32, plan: RingWrite, data: Bytes) -> Result<()> {
        let RingWrite { files, record, guard } = plan;
        let data = if files.direct && !AlignedBuf::is_aligned(&data) { AlignedBuf::copy_of(&data).into_bytes() } else { data };
        let at = record.first * BLOCK_SIZE;
        let len = data.len();
        let fd = Arc::new(DataFd(files.clone()));
        let journal = self.inner.journal(disk)?;
        let check = |wrote: std::result::Result<std::io::Result<usize>, crate::uring::Unavailable>| match wrote {
            Ok(Ok(n)) if n == len => Ok(()),
            Ok(Ok(n)) => Err(Error::io(
                &files.data_path,
                std::io::Error::new(std::io::ErrorKind::WriteZero, format!("wrote {n} of {len} bytes")),
            )),
            Ok(Err(e)) => Err(Error::io(&files.data_path, e)),
            // The ring stopped (the store is going away): the sums are updated (and their
            // record may be committed) but the data is not written, and the block still
            // verifies against its previous sum.
            Err(_) => Err(Error::BadDisk("replica I/O ring stopped".into())),
        };
        if let Some(fast) = journal.begin_fast(&record, &files, &data)? {
            // The journal is idle: this write writes its own commit, and nothing else has to
            // wake up for it (see `Journal::begin_fast`). It must end (and free the journal)
            // even if our caller stops waiting: it runs here, and moves to a task of its own
            // only if this future is dropped first (`RunToEnd`), keeping the store open until
            // then.
            let (inner, commit_ring) = (self.inner.clone(), ring.clone());
            let (replica, blocks) = (guard.0.clone(), (record.first, (record.entries.len() / ENTRY) as u64));
            let in_place = WriteOp { file: fd, data, offset: at, keep: Box::new(guard), flags: 0 };
            if fast.with_data() {
                // The commit holds the data: the write is answered once the commit is
                // durable, and its in-place write goes after the answer
                // (`FastCommit::commit_alone`).
                #[cfg(test)]
                let hook = lock(&self.inner.hooks.next_placement).take();
                return RunToEnd::new(async move {
                    let placed = async {
                        let placement = fast.commit_alone(&commit_ring, replica, blocks).await?;
                        #[cfg(test)]
                        match hook {
                            Some(PlacementHook::Hold(release)) => {
                                let ring = commit_ring.clone();
                                tokio::spawn(async move {
                                    release.notified().await;
                                    let _ = placement.submit(&ring, in_place).await;
                                });
                                return Ok(());
                            }
                            Some(PlacementHook::Drop) => {
                                drop((placement, in_place));
                                return Ok(());
                            }
                            None => {}
                        }
                        placement.submit(&commit_ring, in_place).await
                    }
                    .await;
                    drop(inner);
                    placed
                })
                .await;
            }
            // Both writes go in one submission, the in-place one `RWF_DSYNC` itself.
            let FastOutcome { committed, wrote } = RunToEnd::new(async move {
                let outcome = fast.run(&commit_ring, in_place).await;
                drop(inner);
                outcome
            })
            .await;
            return check(wrote).and(committed);
        }
        // The record goes to the journal now, so its journal write runs beside the data
        // write; the commit's fdatasync waits for the data write (whose buffer carries the
        // signal), so it is durable when the commit is.
        let data_write = Arc::new(DataWrite::default());
        let committed = journal.enqueue_beside(record, files.clone(), data_write.clone());
        let keep = Box::new((guard, DataWritten(data_write)));
        check(ring.write_at(fd, data, at, keep).await)?;
        committed.await.unwrap_or_else(|_| Err(journal.stopped()))
    }

    /// The read through io_uring, without the replica lock: the sums are read under it, the
    /// data after it is released. A concurrent write writes its new sums before its data, and
    /// entries keep the previous sum too, so a block that verifies is one that was written
    /// (old or new data, as a read racing a write may return). A block that does not verify
    /// may be a torn race, so `None` sends the caller to the locked read, which tells real
    /// corruption from a race. `None` also when the ring has stopped.
    async fn read_ring(
        &self,
        ring: &Uring,
        disk: u32,
        chunk: ChunkId,
        version: ChunkVersion,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>> {
        let (files, first, entries) = loop {
            match self.inner.plan_read(disk, chunk, version, offset, len)? {
                ReadPlan::Empty => return Ok(Some(Bytes::new())),
                ReadPlan::Placing(rep, first, n) => rep.placed(first, n).await,
                ReadPlan::Blocking => return Ok(None),
                ReadPlan::Ring { files, first, entries } => break (files, first, entries),
            }
        };
        let n = entries.len() / ENTRY;
        let size = n * BS;
        let start = (offset - first * BLOCK_SIZE) as usize;
        if entries.iter().all(|&b| b == 0) {
            // Nothing written there yet: no I/O at all.
            return Ok(Some(Bytes::from(vec![0u8; len as usize])));
        }
        let fd = Arc::new(DataFd(files.clone()));
        let (res, buf) = match ring.read_at(fd, AlignedBuf::filled_later(size), first * BLOCK_SIZE).await {
            Ok(done) => done,
            Err(_) => return Ok(None),
        };
        match res {
            Ok(got) if got == size => {}
            Ok(got) => {
                return Err(Error::io(
                    &files.data_path,
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("read {got} of {size} bytes")),
                ))
            }
            Err(e) => return Err(Error::io(&files.data_path, e)),
        }
        let verify = move |mut buf: AlignedBuf| {
            for (_, state, block) in classify_all(&entries, buf.as_mut()) {
                match state {
                    BlockState::Unwritten => block.fill(0),
                    BlockState::Corrupt => return None,
                    BlockState::Current | BlockState::Previous => {}
                }
            }
            Some(buf)
        };
        let verified = if size > VERIFY_INLINE_MAX {
            tokio::task::spawn_blocking(move || verify(buf))
                .await
                .map_err(|e| Error::BadDisk(format!("verification task failed: {e}")))?
        } else {
            verify(buf)
        };
        Ok(verified.map(|buf| buf.into_bytes().slice(start..start + len as usize)))
    }

    /// Raises the replica's version (never lowers it).
    pub async fn set_version(&self, disk: u32, chunk: ChunkId, version: ChunkVersion) -> Result<()> {
        self.blocking(move |inner| {
            let rep = inner.lookup(disk, chunk)?;
            let mut st = rep.write_state();
            if st.deleted {
                return Err(Error::NotFound { disk, chunk });
            }
            if version > st.version {
                Inner::raise_version(&rep, &mut st, version)?;
            }
            Ok(())
        })
        .await
    }

    pub fn version(&self, disk: u32, chunk: ChunkId) -> Option<ChunkVersion> {
        lock(&self.inner.replicas).get(&(disk, chunk)).map(|r| r.version.load(Ordering::Acquire))
    }

    /// Records that `volume` is at `epoch` (keeps the maximum). When this returns, writes with
    /// an older epoch are refused and none is still in progress.
    pub async fn fence(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        let mut epochs = self.inner.epochs.write().await;
        if epoch > epochs.get(&volume).copied().unwrap_or(0) {
            self.blocking(move |inner| inner.persist_epoch(volume, epoch)).await?;
            epochs.insert(volume, epoch);
        }
        Ok(())
    }

    /// Highest epoch seen for `volume` (0 if none).
    pub async fn epoch(&self, volume: VolumeId) -> Epoch {
        self.inner.epochs.read().await.get(&volume).copied().unwrap_or(0)
    }

    /// The replica's version and, per block, the sum of what a reader gets: zero for unwritten
    /// blocks and for blocks that fail verification (so a catch-up copies them).
    pub async fn block_sums(&self, disk: u32, chunk: ChunkId) -> Result<(ChunkVersion, Vec<BlockSum>)> {
        self.blocking(move |inner| {
            let rep = inner.lookup(disk, chunk)?;
            let (version, nblocks) = {
                let st = rep.read_state();
                (st.version, blocks_of(st.chunk_size))
            };
            let mut sums = Vec::with_capacity(nblocks as usize);
            let mut first = 0;
            while first < nblocks {
                let count = WALK_BLOCKS.min(nblocks - first);
                sums.extend(inner.check_batch(&rep, first, count, false)?.sums);
                first += count;
            }
            Ok((version, sums))
        })
        .await
    }

    /// Verified blocks `first..first+count` with their sums, for re-replication. Refused with
    /// `StaleReplica` if the replica is older than `min_version`.
    pub async fn read_blocks(
        &self,
        disk: u32,
        chunk: ChunkId,
        min_version: ChunkVersion,
        first: u64,
        count: u64,
    ) -> Result<(Vec<BlockSum>, Bytes)> {
        self.blocking(move |inner| {
            let rep = inner.lookup(disk, chunk)?;
            {
                let st = rep.read_state();
                if st.version < min_version {
                    return Err(Error::StaleReplica { have: st.version, want: min_version });
                }
                let nblocks = blocks_of(st.chunk_size);
                if first.checked_add(count).is_none_or(|end| end > nblocks) {
                    return Err(Error::OutOfRange {
                        offset: first.saturating_mul(BLOCK_SIZE),
                        len: count.saturating_mul(BLOCK_SIZE),
                        chunk_size: st.chunk_size,
                    });
                }
            }
            let batch = inner.check_batch(&rep, first, count, true)?;
            if !batch.bad.is_empty() {
                return Err(Error::Corrupt { chunk, blocks: batch.bad });
            }
            Ok((batch.sums, batch.data.unwrap_or_default()))
        })
        .await
    }

    /// Writes consecutive blocks from `first_block` with their sums (catch-up and repair): no
    /// epoch check, creates the replica if absent. A zero sum makes the block unwritten. Blocks
    /// for which `skip` says true, and blocks clients wrote since `begin_sync`, are left alone.
    /// Returns how many blocks were written.
    #[allow(clippy::too_many_arguments)]
    pub async fn write_blocks(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        first_block: u64,
        sums: Vec<BlockSum>,
        data: Bytes,
        skip: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<u64> {
        let wanted: Vec<bool> = (0..sums.len() as u64).map(|i| !skip(first_block + i)).collect();
        let (written, pending) = self
            .blocking(move |inner| {
                inner.write_blocks(disk, chunk, chunk_size, version, first_block, &sums, &data, &wanted)
            })
            .await?;
        self.journal(disk, pending).await?;
        Ok(written)
    }

    /// Creates an empty replica (every block unwritten) at `version`, or raises an existing
    /// one to it: a re-replication target before its copy starts.
    pub async fn create(&self, disk: u32, chunk: ChunkId, chunk_size: u64, version: ChunkVersion) -> Result<()> {
        self.blocking(move |inner| inner.for_update(disk, chunk, chunk_size, version, |_, _| Ok(())).map(|_| ()))
            .await
    }

    /// Starts recording which blocks client writes touch on this (re-replication target)
    /// replica, so `write_blocks` does not overwrite them. Not persistent: after a restart the
    /// sync starts over.
    pub fn begin_sync(&self, disk: u32, chunk: ChunkId) -> Result<()> {
        self.inner.disk(disk)?;
        lock(&self.inner.syncing).insert((disk, chunk), BlockSet::default());
        Ok(())
    }

    pub fn end_sync(&self, disk: u32, chunk: ChunkId) {
        lock(&self.inner.syncing).remove(&(disk, chunk));
    }

    /// Makes `[offset, offset+len)` read as zeros: whole blocks become unwritten (and their
    /// space is freed), partial edge blocks get zeros written. Durable on return. Discarding
    /// data is a write, so it is fenced and version-checked like one; a missing replica has
    /// nothing to trim and is not created.
    pub async fn trim(
        &self,
        disk: u32,
        chunk: ChunkId,
        version: ChunkVersion,
        epoch: Epoch,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let _epoch = self.admit(chunk.volume, epoch).await?;
        let pending = self.blocking(move |inner| inner.trim(disk, chunk, version, offset, len)).await?;
        self.journal(disk, pending).await
    }

    /// Deletes a replica; succeeds if it does not exist.
    pub async fn delete(&self, disk: u32, chunk: ChunkId) -> Result<()> {
        self.blocking(move |inner| inner.delete(disk, chunk)).await
    }

    /// Deletes every replica of `volume` on every disk. The volume's epoch record is kept, so
    /// a fenced holder still cannot write to it.
    pub async fn delete_volume(&self, volume: VolumeId) -> Result<()> {
        self.blocking(move |inner| {
            let keys: Vec<(u32, ChunkId)> =
                lock(&inner.replicas).keys().filter(|(_, c)| c.volume == volume).copied().collect();
            for (disk, chunk) in keys {
                inner.delete(disk, chunk)?;
            }
            let _g = lock(&inner.create_lock);
            for d in &inner.disks {
                let dir = d.volume_dir(volume);
                match fs::remove_dir(&dir) {
                    Ok(()) => fsync_dir(&d.chunks_dir())?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(path = %dir.display(), error = %e, "volume directory not removed"),
                }
            }
            Ok(())
        })
        .await
    }

    /// Every replica: disk index, chunk, version. Sorted.
    pub fn list(&self) -> Vec<(u32, ChunkId, ChunkVersion)> {
        let mut v: Vec<_> = lock(&self.inner.replicas)
            .values()
            .map(|r| (r.disk, r.chunk, r.version.load(Ordering::Acquire)))
            .collect();
        v.sort_unstable();
        v
    }

    /// Size, free space and replica count of each disk.
    pub async fn usage(&self) -> Result<Vec<DiskUsage>> {
        self.blocking(|inner| {
            let mut counts: HashMap<u32, u64> = HashMap::new();
            for (disk, _) in lock(&inner.replicas).keys() {
                *counts.entry(*disk).or_default() += 1;
            }
            inner
                .disks
                .iter()
                .map(|d| {
                    let st = nix::sys::statvfs::statvfs(&d.root)
                        .map_err(|e| Error::io(&d.root, std::io::Error::from(e)))?;
                    let frsize = st.fragment_size() as u64;
                    Ok(DiskUsage {
                        disk: d.index,
                        total_bytes: st.blocks() as u64 * frsize,
                        free_bytes: st.blocks_available() as u64 * frsize,
                        chunks: counts.get(&d.index).copied().unwrap_or(0),
                    })
                })
                .collect()
        })
        .await
    }

    /// Verifies every block of a replica; returns the indices of bad ones.
    pub async fn scrub_replica(&self, disk: u32, chunk: ChunkId) -> Result<Vec<u64>> {
        let mut bad = Vec::new();
        let mut first = 0;
        loop {
            let step = self.scrub_step(disk, chunk, first).await?;
            bad.extend(step.bad);
            match step.next {
                Some(n) => first = n,
                None => return Ok(bad),
            }
        }
    }

    /// Verifies one walk step of a replica starting at block `first`.
    pub(crate) async fn scrub_step(&self, disk: u32, chunk: ChunkId, first: u64) -> Result<ScrubStep> {
        self.blocking(move |inner| {
            let rep = inner.lookup(disk, chunk)?;
            let nblocks = blocks_of(rep.read_state().chunk_size);
            if first >= nblocks {
                return Ok(ScrubStep { bad: Vec::new(), bytes_read: 0, next: None });
            }
            let count = WALK_BLOCKS.min(nblocks - first);
            let batch = inner.check_batch(&rep, first, count, false)?;
            let next = (first + count < nblocks).then_some(first + count);
            Ok(ScrubStep { bad: batch.bad, bytes_read: batch.bytes_read, next })
        })
        .await
    }

    #[cfg(test)]
    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// Whether a commit holds the first disk's journal token.
    #[cfg(test)]
    pub(crate) fn journal_busy(&self) -> bool {
        self.inner.journals.first().is_some_and(Journal::busy)
    }

    /// The first disk's journal tail (where replay would start).
    #[cfg(test)]
    pub(crate) fn journal_tail(&self) -> u64 {
        self.inner.journals.first().map_or(0, Journal::tail)
    }

    /// Makes every journal commit take `latency` longer, standing in for a slow disk.
    #[cfg(test)]
    pub(crate) fn set_sync_latency(&self, latency: Duration) {
        for j in &self.inner.journals {
            j.set_latency(latency);
        }
    }
}

pub(crate) struct ScrubStep {
    pub bad: Vec<u64>,
    pub bytes_read: u64,
    pub next: Option<u64>,
}

/// Result of verifying a run of blocks.
struct Batch {
    /// What a reader gets per block (zero when unwritten or bad).
    sums: Vec<BlockSum>,
    bad: Vec<u64>,
    /// The blocks' data (unwritten blocks zeroed), when asked for.
    data: Option<Bytes>,
    bytes_read: u64,
}

impl Inner {
    fn open(paths: Vec<PathBuf>, config: Config, uring: Option<Arc<Uring>>) -> Result<Inner> {
        if paths.is_empty() {
            return Err(Error::BadDisk("no data directories given".into()));
        }
        let disks = paths
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let index = u32::try_from(i).map_err(|_| Error::BadDisk("too many disks".into()))?;
                Disk::open(index, p)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut epochs: HashMap<VolumeId, Epoch> = HashMap::new();
        let mut replicas = HashMap::new();
        let mut journals = Vec::with_capacity(disks.len());
        let fdatasyncs = Arc::new(AtomicU64::new(0));
        for d in &disks {
            // Every disk keeps every epoch, so losing a disk loses no fencing record.
            for (volume, epoch) in d.load_epochs()? {
                let e = epochs.entry(volume).or_default();
                *e = (*e).max(epoch);
            }
            for found in d.scan()? {
                let paths = d.replica_paths(found.chunk);
                let m = found.meta;
                let rep = Replica::new(d.index, found.chunk, m.nonce, paths, m.chunk_size, m.version);
                replicas.insert((d.index, found.chunk), Arc::new(rep));
            }
            let opened = journal::Opened::open(&d.journal_path(), config.journal_bytes)?;
            replay(d, &opened.records, &replicas)?;
            journals.push(opened.start(fdatasyncs.clone())?);
        }
        tracing::info!(disks = disks.len(), replicas = replicas.len(), volumes = epochs.len(), "chunk store opened");
        Ok(Inner {
            disks,
            epochs: tokio::sync::RwLock::new(epochs),
            replicas: Mutex::new(replicas),
            create_lock: Mutex::new(()),
            open_lru: Mutex::new(VecDeque::new()),
            max_open: config.max_open_replicas.max(1),
            syncing: Mutex::new(HashMap::new()),
            journals,
            fdatasyncs,
            uring,
            ring_fallbacks: AtomicU64::new(0),
            #[cfg(test)]
            hooks: TestHooks::default(),
        })
    }

    fn disk(&self, disk: u32) -> Result<&Disk> {
        self.disks.get(disk as usize).ok_or(Error::UnknownDisk(disk))
    }

    fn persist_epoch(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        for d in &self.disks {
            d.store_epoch(volume, epoch)?;
        }
        Ok(())
    }

    fn journal(&self, disk: u32) -> Result<&Journal> {
        self.journals.get(disk as usize).ok_or(Error::UnknownDisk(disk))
    }

    fn lookup(&self, disk: u32, chunk: ChunkId) -> Result<Arc<Replica>> {
        self.disk(disk)?;
        lock(&self.replicas).get(&(disk, chunk)).cloned().ok_or(Error::NotFound { disk, chunk })
    }

    fn get_or_create(&self, disk: u32, chunk: ChunkId, chunk_size: u64, version: ChunkVersion) -> Result<Arc<Replica>> {
        if let Ok(rep) = self.lookup(disk, chunk) {
            return Ok(rep);
        }
        let _g = lock(&self.create_lock);
        if let Some(rep) = lock(&self.replicas).get(&(disk, chunk)) {
            return Ok(rep.clone());
        }
        if chunk_size == 0 {
            return Err(Error::OutOfRange { offset: 0, len: 0, chunk_size });
        }
        let d = self.disk(disk)?;
        d.ensure_volume_dir(chunk.volume)?;
        let paths = d.replica_paths(chunk);
        let nblocks = blocks_of(chunk_size);
        // Data and sums first, sized and synced; the metadata file last, because its existence
        // is what makes the replica exist (see `Disk::scan`).
        for (path, len) in [(&paths.data, nblocks * BLOCK_SIZE), (&paths.sums, nblocks * crate::replica::ENTRY as u64)] {
            let f = File::create(path).at(path)?;
            f.set_len(len).at(path)?;
            f.sync_all().at(path)?;
        }
        let nonce = rand::random::<u64>().max(1);
        write_meta(&paths, &ReplicaMeta { version, chunk_size, nonce })?;
        tracing::debug!(disk, %chunk, chunk_size, version, "replica created");
        let rep = Arc::new(Replica::new(disk, chunk, nonce, paths, chunk_size, version));
        lock(&self.replicas).insert((disk, chunk), rep.clone());
        Ok(rep)
    }

    /// The replica's open files, opening them (and closing the oldest others) if needed.
    fn files(&self, rep: &Arc<Replica>, chunk_size: u64) -> Result<Arc<Files>> {
        {
            let mut slot = lock(&rep.files);
            if let Some(f) = &*slot {
                return Ok(f.clone());
            }
            let f = Arc::new(rep.open_files(chunk_size)?);
            *slot = Some(f.clone());
            drop(slot);
            let mut lru = lock(&self.open_lru);
            lru.push_back(Arc::downgrade(rep));
            while lru.len() > self.max_open {
                if let Some(old) = lru.pop_front().and_then(|w| w.upgrade()) {
                    if !Arc::ptr_eq(&old, rep) {
                        // In-flight operations keep their own `Arc<Files>`; this only stops
                        // new ones from reusing the handles.
                        *lock(&old.files) = None;
                    }
                }
            }
            Ok(f)
        }
    }

    fn raise_version(rep: &Replica, st: &mut ReplicaState, version: ChunkVersion) -> Result<()> {
        write_meta(&rep.paths, &ReplicaMeta { version, chunk_size: st.chunk_size, nonce: rep.nonce })?;
        st.version = version;
        rep.version.store(version, Ordering::Release);
        tracing::debug!(disk = rep.disk, chunk = %rep.chunk, version, "replica version raised");
        Ok(())
    }

    /// Records client writes for a replica being re-replicated. Caller holds the replica's
    /// write lock (or the create lock when the replica does not exist yet).
    fn mark_client_write(&self, disk: u32, chunk: ChunkId, first: u64, count: u64) {
        let mut syncing = lock(&self.syncing);
        if let Some(set) = syncing.get_mut(&(disk, chunk)) {
            set.insert_range(first, count);
        }
    }

    /// Gets the replica for a mutation, creating it if absent, with its state locked and its
    /// version checked (and raised if `version` is newer).
    fn for_update<T>(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        f: impl FnOnce(&Arc<Replica>, &Arc<Files>) -> Result<T>,
    ) -> Result<(Arc<Replica>, Arc<Files>, T)> {
        let mut f = Some(f);
        // A delete racing with us leaves `deleted` set; look up (and create) again.
        for _ in 0..3 {
            let rep = self.get_or_create(disk, chunk, chunk_size, version)?;
            rep.check()?;
            self.journal(disk)?.check()?;
            let mut st = rep.write_state();
            if st.deleted {
                continue;
            }
            if st.chunk_size != chunk_size {
                return Err(Error::ChunkSizeMismatch { have: st.chunk_size, got: chunk_size });
            }
            if version < st.version {
                return Err(Error::StaleVersion { have: st.version, got: version });
            }
            let files = self.files(&rep, st.chunk_size)?;
            if version > st.version {
                Self::raise_version(&rep, &mut st, version)?;
            }
            let Some(f) = f.take() else { break };
            let out = f(&rep, &files)?;
            drop(st);
            return Ok((rep, files, out));
        }
        Err(Error::NotFound { disk, chunk })
    }

    fn write(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        offset: u64,
        data: &[u8],
        sums: Vec<BlockSum>,
    ) -> Result<Journalled> {
        let len = data.len() as u64;
        // Hash the whole blocks before taking the lock (unless the writer did); only edge
        // blocks need the old data.
        let full = if sums.is_empty() { basalt_types::full_block_sums(offset, data) } else { sums };
        let (rep, files, entries) = self.for_update(disk, chunk, chunk_size, version, |rep, files| {
            if len == 0 {
                return Ok(None);
            }
            let entries = self.write_locked(rep, files, offset, data, &full)?;
            let (first, n) = block_span(offset, len);
            self.mark_client_write(disk, chunk, first, n);
            Ok(Some(entries))
        })?;
        let Some(entries) = entries else { return Ok(None) };
        let (first, n) = block_span(offset, len);
        rep.sync_allocation(&files, &[(first, n)], &self.fdatasyncs)?;
        Ok(Some((files, Record { volume: chunk.volume, index: chunk.index, nonce: rep.nonce, first, entries, data: None })))
    }

    /// Reads block `b` (entry `i` of `entries`) for a read-modify-write: its verified contents
    /// and the sum describing them.
    fn load_block(rep: &Replica, files: &Files, entries: &[u8], i: usize, b: u64) -> Result<(AlignedBuf, BlockSum)> {
        if sum_at(entries, i, 0) == ZERO_SUM && sum_at(entries, i, 1) == ZERO_SUM {
            return Ok((AlignedBuf::zeroed(BS), ZERO_SUM));
        }
        let block = files.read_blocks(b * BLOCK_SIZE, BS)?;
        match classify(entries, i, block.as_ref()) {
            (BlockState::Corrupt, _) => {
                tracing::warn!(disk = rep.disk, chunk = %rep.chunk, block = b, "corrupt block under a partial write");
                Err(Error::Corrupt { chunk: rep.chunk, blocks: vec![b] })
            }
            (BlockState::Unwritten, _) => Ok((AlignedBuf::zeroed(BS), ZERO_SUM)),
            (_, sum) => Ok((block, sum)),
        }
    }

    /// The write proper, under the replica's write lock: new sums first (page cache), then the
    /// data (in place). Returns the new entries of the touched blocks, for the journal.
    fn write_locked(
        &self,
        rep: &Replica,
        files: &Files,
        offset: u64,
        data: &[u8],
        full: &[BlockSum],
    ) -> Result<Vec<u8>> {
        let len = data.len() as u64;
        let (first, n) = block_span(offset, len);
        let mut entries = files.read_entries(first, n)?;
        let mut edges: Vec<(u64, AlignedBuf)> = Vec::new();
        let mut full_sums = full.iter();
        for i in 0..n as usize {
            let b = first + i as u64;
            let (new_sum, prev) = if is_full(b, offset, len) {
                let sum = full_sums.next().copied().ok_or_else(|| Error::BadDisk("block plan mismatch".into()))?;
                (sum, sum_at(&entries, i, 0))
            } else {
                let (mut block, old) = Self::load_block(rep, files, &entries, i, b)?;
                let start = b * BLOCK_SIZE;
                let lo = offset.max(start);
                let hi = (offset + len).min(start + BLOCK_SIZE);
                block.as_mut()[(lo - start) as usize..(hi - start) as usize]
                    .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                let sum = *blake3::hash(block.as_ref()).as_bytes();
                edges.push((b, block));
                // The sum of what is on disk now, so an interrupted write still verifies.
                (sum, old)
            };
            set_entry(&mut entries, i, &new_sum, &prev);
        }
        files.write_entries(first, &entries)?;
        #[cfg(test)]
        if self.hooks.crash_after_sums.swap(false, Ordering::SeqCst) {
            return Err(Error::BadDisk("simulated crash after the sums pwrite".into()));
        }
        // Whole blocks go straight from the caller's buffer; edges from their merged copies.
        let full_first = (first..first + n).find(|&b| is_full(b, offset, len));
        if let Some(ff) = full_first {
            let count = full.len() as u64;
            let at = (ff * BLOCK_SIZE - offset) as usize;
            files.write_data(ff * BLOCK_SIZE, &data[at..at + (count * BLOCK_SIZE) as usize])?;
        }
        for (b, block) in &edges {
            files.write_data(b * BLOCK_SIZE, block.as_ref())?;
        }
        Ok(entries)
    }

    /// The part of a ring write done under the replica's write lock, on the async worker: the
    /// checks, and the new sums written (to the page cache). `None` when the write is not for
    /// the ring and takes the blocking path: not whole blocks, large and without sums, a
    /// replica to create or a version to raise (durable metadata writes), blocks whose
    /// allocation is not yet durable (an fdatasync), or a lock waiter draining the ring.
    #[allow(clippy::too_many_arguments)]
    fn plan_ring_write(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        offset: u64,
        data: &[u8],
        sums: &[BlockSum],
    ) -> Result<RingPlan> {
        let len = data.len() as u64;
        if len == 0 || offset % BLOCK_SIZE != 0 || len % BLOCK_SIZE != 0 {
            return Ok(RingPlan::Blocking);
        }
        let computed;
        let sums = if sums.is_empty() && data.len() <= VERIFY_INLINE_MAX {
            computed = basalt_types::full_block_sums(offset, data);
            &computed[..]
        } else {
            sums
        };
        if sums.len() as u64 != len / BLOCK_SIZE {
            return Ok(RingPlan::Blocking);
        }
        let Ok(rep) = self.lookup(disk, chunk) else { return Ok(RingPlan::Blocking) };
        rep.check()?;
        let (first, n) = block_span(offset, len);
        // Checked before the sums change: every write of these blocks answered before this
        // one began is listed until its data is in place (one answered since is concurrent
        // with this one, and may land before or after it).
        if rep.unplaced(first, n) {
            return Ok(RingPlan::Placing(rep, first, n));
        }
        self.journal(disk)?.check()?;
        let Some(st) = rep.try_write_state() else { return Ok(RingPlan::Blocking) };
        if st.deleted || version > st.version || !rep.ring_open() || !rep.is_allocated(first, n) {
            return Ok(RingPlan::Blocking);
        }
        if st.chunk_size != chunk_size {
            return Err(Error::ChunkSizeMismatch { have: st.chunk_size, got: chunk_size });
        }
        if version < st.version {
            return Err(Error::StaleVersion { have: st.version, got: version });
        }
        let files = self.files(&rep, st.chunk_size)?;
        let mut entries = files.read_entries(first, n)?;
        for (i, sum) in sums.iter().enumerate() {
            let prev = sum_at(&entries, i, 0);
            set_entry(&mut entries, i, sum, &prev);
        }
        files.write_entries(first, &entries)?;
        #[cfg(test)]
        if self.hooks.crash_after_sums.swap(false, Ordering::SeqCst) {
            return Err(Error::BadDisk("simulated crash after the sums pwrite".into()));
        }
        self.mark_client_write(disk, chunk, first, n);
        rep.in_flight.fetch_add(1, Ordering::AcqRel);
        drop(st);
        let record = Record { volume: chunk.volume, index: chunk.index, nonce: rep.nonce, first, entries, data: None };
        Ok(RingPlan::Ring(RingWrite { files, record, guard: InFlight(rep) }))
    }

    /// The checks of a read and the sum entries of its blocks, read under the replica's lock
    /// if it is free right now.
    fn plan_read(
        &self,
        disk: u32,
        chunk: ChunkId,
        version: ChunkVersion,
        offset: u64,
        len: u64,
    ) -> Result<ReadPlan> {
        let rep = self.lookup(disk, chunk)?;
        rep.check()?;
        // Every write of these blocks answered before this read began is in place once none
        // is listed (the locked read waits for `in_flight`, which those writes also hold).
        let (first, n) = block_span(offset, len);
        if rep.unplaced(first, n) {
            return Ok(ReadPlan::Placing(rep, first, n));
        }
        let Some(st) = rep.try_read_state() else { return Ok(ReadPlan::Blocking) };
        if st.deleted {
            return Err(Error::NotFound { disk, chunk });
        }
        if st.version < version {
            return Err(Error::StaleReplica { have: st.version, want: version });
        }
        check_range(offset, len, st.chunk_size)?;
        if len == 0 {
            return Ok(ReadPlan::Empty);
        }
        let files = self.files(&rep, st.chunk_size)?;
        let entries = files.read_entries(first, n)?;
        Ok(ReadPlan::Ring { files, first, entries })
    }

    fn read(&self, disk: u32, chunk: ChunkId, version: ChunkVersion, offset: u64, len: u64) -> Result<Bytes> {
        let rep = self.lookup(disk, chunk)?;
        rep.check()?;
        let st = rep.read_state();
        if st.deleted {
            return Err(Error::NotFound { disk, chunk });
        }
        if st.version < version {
            return Err(Error::StaleReplica { have: st.version, want: version });
        }
        check_range(offset, len, st.chunk_size)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let files = self.files(&rep, st.chunk_size)?;
        let (first, n) = block_span(offset, len);
        let entries = files.read_entries(first, n)?;
        let mut buf = files.read_blocks(first * BLOCK_SIZE, (n * BLOCK_SIZE) as usize)?;
        drop(st);
        // Verify outside the lock: the sums and data read under it are consistent.
        let mut bad = Vec::new();
        for (i, state, block) in classify_all(&entries, buf.as_mut()) {
            match state {
                BlockState::Unwritten => block.fill(0),
                BlockState::Corrupt => bad.push(first + i as u64),
                BlockState::Current | BlockState::Previous => {}
            }
        }
        if !bad.is_empty() {
            tracing::warn!(disk, %chunk, blocks = ?bad, "read found corrupt blocks");
            return Err(Error::Corrupt { chunk, blocks: bad });
        }
        let start = (offset - first * BLOCK_SIZE) as usize;
        Ok(buf.into_bytes().slice(start..start + len as usize))
    }

    fn check_batch(&self, rep: &Arc<Replica>, first: u64, count: u64, keep_data: bool) -> Result<Batch> {
        let st = rep.read_state();
        if st.deleted {
            return Err(Error::NotFound { disk: rep.disk, chunk: rep.chunk });
        }
        let files = self.files(rep, st.chunk_size)?;
        let entries = files.read_entries(first, count)?;
        let any_written = entries.iter().any(|&b| b != 0);
        let size = (count * BLOCK_SIZE) as usize;
        let mut bytes_read = 0;
        let mut data = if any_written {
            bytes_read = size as u64;
            files.read_blocks(first * BLOCK_SIZE, size)?
        } else {
            AlignedBuf::zeroed(size)
        };
        drop(st);
        let mut sums = Vec::with_capacity(count as usize);
        let mut bad = Vec::new();
        for (i, block) in data.as_mut().chunks_exact_mut(BS).enumerate() {
            let (state, sum) = classify(&entries, i, block);
            match state {
                BlockState::Unwritten => block.fill(0),
                BlockState::Corrupt => bad.push(first + i as u64),
                BlockState::Current | BlockState::Previous => {}
            }
            sums.push(sum);
        }
        if !bad.is_empty() {
            tracing::warn!(disk = rep.disk, chunk = %rep.chunk, blocks = ?bad, "verification found corrupt blocks");
        }
        Ok(Batch { sums, bad, data: keep_data.then(|| data.into_bytes()), bytes_read })
    }

    #[allow(clippy::too_many_arguments)]
    fn write_blocks(
        &self,
        disk: u32,
        chunk: ChunkId,
        chunk_size: u64,
        version: ChunkVersion,
        first: u64,
        sums: &[BlockSum],
        data: &[u8],
        wanted: &[bool],
    ) -> Result<(u64, Journalled)> {
        let n = sums.len() as u64;
        if data.len() as u64 != n * BLOCK_SIZE || first.checked_add(n).is_none_or(|end| end > blocks_of(chunk_size)) {
            return Err(Error::OutOfRange {
                offset: first.saturating_mul(BLOCK_SIZE),
                len: data.len() as u64,
                chunk_size,
            });
        }
        if n == 0 {
            return Ok((0, None));
        }
        // The copy must be what its source verified; refuse blocks damaged on the way.
        let bad: Vec<u64> = (0..n as usize)
            .filter(|&i| wanted[i] && sums[i] != ZERO_SUM && *blake3::hash(&data[i * BS..(i + 1) * BS]).as_bytes() != sums[i])
            .map(|i| first + i as u64)
            .collect();
        if !bad.is_empty() {
            return Err(Error::Corrupt { chunk, blocks: bad });
        }
        let (rep, files, done) = self.for_update(disk, chunk, chunk_size, version, |rep, files| {
            let write: Vec<bool> = {
                let syncing = lock(&self.syncing);
                let dirty = syncing.get(&(disk, chunk));
                (0..n).map(|i| wanted[i as usize] && !dirty.is_some_and(|d| d.contains(first + i))).collect()
            };
            let written = write.iter().filter(|&&w| w).count() as u64;
            if written == 0 {
                return Ok(None);
            }
            let mut entries = files.read_entries(first, n)?;
            for i in (0..n as usize).filter(|&i| write[i]) {
                if sums[i] == ZERO_SUM {
                    set_entry(&mut entries, i, &ZERO_SUM, &ZERO_SUM);
                } else {
                    let cur = sum_at(&entries, i, 0);
                    set_entry(&mut entries, i, &sums[i], &cur);
                }
            }
            files.write_entries(first, &entries)?;
            // Runs of blocks to write, each one pwrite (or one hole punch for unwritten ones).
            let mut runs = Vec::new();
            let mut i = 0usize;
            while i < n as usize {
                if !write[i] {
                    i += 1;
                    continue;
                }
                let zero = sums[i] == ZERO_SUM;
                let mut j = i + 1;
                while j < n as usize && write[j] && (sums[j] == ZERO_SUM) == zero {
                    j += 1;
                }
                let at = (first + i as u64) * BLOCK_SIZE;
                if zero {
                    rep.forget_allocation(first + i as u64, (j - i) as u64);
                    files.zero_data(at, ((j - i) * BS) as u64)?;
                } else {
                    files.write_data(at, &data[i * BS..j * BS])?;
                    runs.push((first + i as u64, (j - i) as u64));
                }
                i = j;
            }
            Ok(Some((written, entries, runs)))
        })?;
        let Some((written, entries, runs)) = done else { return Ok((0, None)) };
        rep.sync_allocation(&files, &runs, &self.fdatasyncs)?;
        let rec = Record { volume: chunk.volume, index: chunk.index, nonce: rep.nonce, first, entries, data: None };
        Ok((written, Some((files, rec))))
    }

    fn trim(&self, disk: u32, chunk: ChunkId, version: ChunkVersion, offset: u64, len: u64) -> Result<Journalled> {
        let rep = match self.lookup(disk, chunk) {
            Ok(rep) => rep,
            Err(Error::NotFound { .. }) => {
                // Nothing stored, so nothing to trim; but a re-replication copy must not bring
                // back what the client just discarded.
                let _g = lock(&self.create_lock);
                match lock(&self.replicas).get(&(disk, chunk)).cloned() {
                    Some(rep) => rep,
                    None => {
                        if len > 0 {
                            let (first, n) = block_span(offset, len);
                            self.mark_client_write(disk, chunk, first, n);
                        }
                        return Ok(None);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        rep.check()?;
        self.journal(disk)?.check()?;
        let mut st = rep.write_state();
        if st.deleted {
            return Ok(None);
        }
        if version < st.version {
            return Err(Error::StaleVersion { have: st.version, got: version });
        }
        check_range(offset, len, st.chunk_size)?;
        if version > st.version {
            Self::raise_version(&rep, &mut st, version)?;
        }
        if len == 0 {
            return Ok(None);
        }
        let files = self.files(&rep, st.chunk_size)?;
        let (first, n) = block_span(offset, len);
        let mut entries = files.read_entries(first, n)?;
        let mut edges: Vec<(u64, AlignedBuf)> = Vec::new();
        let mut full: Option<(u64, u64)> = None;
        for i in 0..n as usize {
            let b = first + i as u64;
            if is_full(b, offset, len) {
                set_entry(&mut entries, i, &ZERO_SUM, &ZERO_SUM);
                full = Some(full.map_or((b, b + 1), |(s, _)| (s, b + 1)));
                continue;
            }
            if sum_at(&entries, i, 0) == ZERO_SUM && sum_at(&entries, i, 1) == ZERO_SUM {
                continue;
            }
            let (mut block, old) = Self::load_block(&rep, &files, &entries, i, b)?;
            let start = b * BLOCK_SIZE;
            let lo = offset.max(start);
            let hi = (offset + len).min(start + BLOCK_SIZE);
            block.as_mut()[(lo - start) as usize..(hi - start) as usize].fill(0);
            set_entry(&mut entries, i, blake3::hash(block.as_ref()).as_bytes(), &old);
            edges.push((b, block));
        }
        files.write_entries(first, &entries)?;
        if let Some((s, e)) = full {
            rep.forget_allocation(s, e - s);
            files.zero_data(s * BLOCK_SIZE, (e - s) * BLOCK_SIZE)?;
        }
        for (b, block) in &edges {
            files.write_data(b * BLOCK_SIZE, block.as_ref())?;
        }
        self.mark_client_write(disk, chunk, first, n);
        drop(st);
        let runs: Vec<(u64, u64)> = edges.iter().map(|(b, _)| (*b, 1)).collect();
        rep.sync_allocation(&files, &runs, &self.fdatasyncs)?;
        Ok(Some((files, Record { volume: chunk.volume, index: chunk.index, nonce: rep.nonce, first, entries, data: None })))
    }

    fn delete(&self, disk: u32, chunk: ChunkId) -> Result<()> {
        self.disk(disk)?;
        let _g = lock(&self.create_lock);
        let Some(rep) = lock(&self.replicas).remove(&(disk, chunk)) else {
            return Ok(());
        };
        let mut st = rep.write_state();
        st.deleted = true;
        *lock(&rep.files) = None;
        // Metadata first: without it the replica no longer exists, and a crash before the
        // other two files are gone leaves garbage that the next scan removes.
        let meta = rep.paths.dir.join(&rep.paths.meta_name);
        for path in [&meta, &rep.paths.data, &rep.paths.sums] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            if path == &meta {
                fsync_dir(&rep.paths.dir)?;
            }
        }
        tracing::debug!(disk, %chunk, "replica deleted");
        Ok(())
    }
}

/// Re-applies journal records to the sums files of the replicas they belong to (and the data
/// that data commits carry to their data files), and makes those files durable, before the
/// journal's tail moves past the records.
fn replay(d: &Disk, records: &[Record], replicas: &HashMap<(u32, ChunkId), Arc<Replica>>) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    // The replica a record applies to, if it still exists (same nonce) and the record fits it.
    let target = |r: &Record| -> Option<&Arc<Replica>> {
        let chunk = ChunkId { volume: r.volume, index: r.index };
        let rep = replicas.get(&(d.index, chunk)).filter(|rep| rep.nonce == r.nonce)?;
        let nblocks = blocks_of(rep.read_state().chunk_size);
        let count = (r.entries.len() / ENTRY) as u64;
        if r.first.checked_add(count).is_none_or(|end| end > nblocks) {
            tracing::warn!(disk = d.index, %chunk, first = r.first, count, "journal record past the end of its replica; ignored");
            return None;
        }
        Some(rep)
    };
    // Files written so far, each opened once and synced at the end.
    let mut touched: HashMap<PathBuf, File> = HashMap::new();
    fn open<'a>(touched: &'a mut HashMap<PathBuf, File>, path: &PathBuf) -> Result<&'a File> {
        Ok(match touched.entry(path.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(OpenOptions::new().write(true).open(path).at(path)?),
        })
    }
    let targets: Vec<Option<&Arc<Replica>>> = records.iter().map(target).collect();
    let mut applied = 0usize;
    for (r, rep) in records.iter().zip(&targets) {
        let Some(rep) = rep else { continue };
        let path = &rep.paths.sums;
        open(&mut touched, path)?.write_all_at(&r.entries, r.first * ENTRY as u64).at(path)?;
        applied += 1;
    }
    // Data is written newest first, each block only by the last record that touched it: an
    // older record's data must not land on top of a later write, whose data is already in
    // place (its record carries sums only) or comes with its own, newer, record.
    let mut claimed: HashSet<(VolumeId, u64, u64, u64)> = HashSet::new();
    for (r, rep) in records.iter().zip(&targets).rev() {
        let Some(rep) = rep else { continue };
        let count = (r.entries.len() / ENTRY) as u64;
        if let Some(data) = &r.data {
            let path = &rep.paths.data;
            let file = open(&mut touched, path)?;
            for i in 0..count {
                let b = r.first + i;
                if !claimed.contains(&(r.volume, r.index, r.nonce, b)) {
                    let block = &data[(i * BLOCK_SIZE) as usize..((i + 1) * BLOCK_SIZE) as usize];
                    file.write_all_at(block, b * BLOCK_SIZE).at(path)?;
                }
            }
        }
        claimed.extend((r.first..r.first + count).map(|b| (r.volume, r.index, r.nonce, b)));
    }
    for (path, file) in &touched {
        file.sync_data().at(path)?;
    }
    tracing::info!(disk = d.index, records = records.len(), applied, files = touched.len(), "journal replayed");
    Ok(())
}
