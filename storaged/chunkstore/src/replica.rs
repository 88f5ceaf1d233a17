//! One replica in memory: its open files, its lock, the two-slot checksum entries and how a
//! block is judged against them, and which blocks of its data file are durably allocated.

use basalt_iobuf::AlignedBuf;
use crate::disk::ReplicaPaths;
use crate::error::{Error, IoContext, Result};
use basalt_types::{BlockSum, ChunkId, ChunkVersion, BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub(crate) const BS: usize = BLOCK_SIZE as usize;
/// Bytes of one slot (a blake3 hash).
pub(crate) const SLOT: usize = 32;
/// Bytes of one block's entry in the sums file: current slot, then previous slot.
pub(crate) const ENTRY: usize = 2 * SLOT;
pub(crate) const ZERO_SUM: BlockSum = [0u8; 32];

pub(crate) fn blocks_of(chunk_size: u64) -> u64 {
    chunk_size.div_ceil(BLOCK_SIZE)
}

/// Locks a std mutex, carrying on after a panic elsewhere: every structure guarded here is
/// kept consistent at each step, so a poisoned lock holds nothing half-done.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn sum_at(entries: &[u8], i: usize, slot: usize) -> BlockSum {
    let mut s = ZERO_SUM;
    let at = i * ENTRY + slot * SLOT;
    s.copy_from_slice(&entries[at..at + SLOT]);
    s
}

pub(crate) fn set_entry(entries: &mut [u8], i: usize, current: &BlockSum, previous: &BlockSum) {
    let at = i * ENTRY;
    entries[at..at + SLOT].copy_from_slice(current);
    entries[at + SLOT..at + ENTRY].copy_from_slice(previous);
}

/// What a block's data turned out to be, judged against its two slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// Never written (or trimmed): reads as zeros whatever the data file holds.
    Unwritten,
    /// Matches the current slot.
    Current,
    /// Matches the previous slot: a write was interrupted between its sums and its data.
    Previous,
    /// Matches neither.
    Corrupt,
}

/// Judges one block. Returns the state and the sum that describes what a reader gets (zero for
/// unwritten and corrupt blocks).
pub(crate) fn classify(entries: &[u8], i: usize, data: &[u8]) -> (BlockState, BlockSum) {
    judge(entries, i, data, || *blake3::hash(data).as_bytes())
}

/// [`classify`] of every block of `data`. Multi-block reads verify every block, so hashing
/// them all at once (`basalt_types::block_sums`, SIMD across blocks) is cheaper than hashing
/// only the written ones one by one.
pub(crate) fn classify_all<'a>(entries: &'a [u8], data: &'a mut [u8]) -> impl Iterator<Item = (usize, BlockState, &'a mut [u8])> + 'a {
    let sums = basalt_types::block_sums(data);
    data.chunks_exact_mut(BS).zip(sums).enumerate().map(move |(i, (block, h))| {
        let state = judge(entries, i, block, || h).0;
        (i, state, block)
    })
}

fn judge(entries: &[u8], i: usize, data: &[u8], hash: impl FnOnce() -> BlockSum) -> (BlockState, BlockSum) {
    let cur = sum_at(entries, i, 0);
    let prev = sum_at(entries, i, 1);
    if cur == ZERO_SUM && prev == ZERO_SUM {
        return (BlockState::Unwritten, ZERO_SUM);
    }
    let h = hash();
    if cur != ZERO_SUM && h == cur {
        return (BlockState::Current, cur);
    }
    if prev != ZERO_SUM && h == prev {
        return (BlockState::Previous, prev);
    }
    // The first write of a block was interrupted after its sums: the block was unwritten
    // before, and its data is still the hole (zeros) it was. Any other content is corruption.
    if prev == ZERO_SUM && data.iter().all(|&b| b == 0) {
        return (BlockState::Unwritten, ZERO_SUM);
    }
    (BlockState::Corrupt, ZERO_SUM)
}

/// Mutable state of a replica, guarded by `Replica::io`. Holding the lock for writing excludes
/// readers, so a reader never sees new sums with old data (which would look corrupt).
pub(crate) struct ReplicaState {
    pub chunk_size: u64,
    pub version: ChunkVersion,
    /// Set by delete; whoever still holds the `Arc` must look the replica up again.
    pub deleted: bool,
}

pub(crate) struct Replica {
    pub disk: u32,
    pub chunk: ChunkId,
    /// Random per creation: journal records of an earlier replica with the same id (deleted
    /// since) are not replayed onto this one.
    pub nonce: u64,
    pub paths: ReplicaPaths,
    pub io: RwLock<ReplicaState>,
    /// Mirror of `ReplicaState::version` for lock-free `version()` and `list()`.
    pub version: AtomicU64,
    /// Open file handles; `None` when closed to bound the number of open files.
    pub files: Mutex<Option<Arc<Files>>>,
    /// Blocks whose place in the data file is durably allocated. See [`Allocated`].
    pub allocated: Mutex<Allocated>,
    /// After a failed fdatasync the kernel may have dropped dirty state, and a later sync can
    /// report success for something that never reached the disk, so a failure is permanent for
    /// this replica (until the process restarts and the replica is verified again).
    pub failed: Mutex<Option<(io::ErrorKind, String)>>,
    /// Data writes submitted to the ring after their sums were updated and the lock released
    /// (see `ChunkStore::write_with_sums`), answered or not (see `deferred`). While any is in
    /// flight a block may hold neither
    /// of its listed sums, so the verifying paths wait for zero under the lock
    /// ([`read_state`](Self::read_state), [`write_state`](Self::write_state)); a writer
    /// raises it only under the write lock, so zero seen under the lock stays zero.
    pub in_flight: AtomicU32,
    /// Lock waiters waiting for `in_flight` to drain.
    pub settling: AtomicU32,
    /// The blocks (first, count) of acknowledged writes whose data is in the journal but not
    /// yet in place (a small fast commit writes its data in place after its answer:
    /// `FastCommit::commit_alone`). Until it is, the data file may hold the previous contents
    /// of an acknowledged block, which verify (against the previous slot): the lock-free
    /// paths (the ring read, the ring write's sums update) wait for the blocks they touch
    /// first ([`placed`](Self::placed)); the locked paths wait for `in_flight`, which these
    /// writes also hold.
    deferred: Mutex<Vec<(u64, u64)>>,
    /// `deferred.len()`, checked without the lock.
    deferred_count: AtomicU32,
    /// Woken when a deferred write is in place.
    placed_now: tokio::sync::Notify,
}

/// Decrements a replica's in-flight ring writes when the operation is over (it lives in the
/// ring's pending table, so even a caller that stopped waiting does not end it early).
pub(crate) struct InFlight(pub Arc<Replica>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Which blocks of the data file are known to be durably allocated.
///
/// `O_DIRECT` data is made durable by the journal's fdatasync, which flushes the device cache;
/// but a write into a hole also allocates, and the file system's record of that allocation is
/// made durable only by an fdatasync of the data file itself. So a write that touches a block
/// not in this set fdatasyncs the data file before it is acknowledged, then adds its blocks.
/// Not persistent: after a restart every block's first write syncs once (which also covers a
/// block whose allocation a power loss undid). Trims clear their blocks (their holes are
/// punched) and bump `trims`, so a sync that started before a trim cannot mark its blocks.
#[derive(Default)]
pub(crate) struct Allocated {
    pub blocks: BlockSet,
    pub trims: u64,
}

pub(crate) struct Files {
    pub data: File,
    pub sums: File,
    /// The sums file mapped shared, when it could be: entries are then read and written with
    /// memory copies into its page-cache pages instead of a `pread`/`pwrite` each, two
    /// system calls per replica write (one per read) that cost more than the copy, most of
    /// all under a hypervisor. The pages are the same page cache `pread`/`pwrite` use, so
    /// everything said of the sums file holds unchanged: what is copied in survives the
    /// process, and the journal's checkpoint fdatasyncs it. The file's blocks are allocated
    /// before it is mapped, so a write through the map never needs space (no SIGBUS on a full
    /// disk). What remains is a read error of the disk under a page not yet in memory: the
    /// process gets SIGBUS and dies, like an OSD whose metadata store hits EIO; its replicas
    /// are re-replicated by the others. Callers hold the replica's lock, as for the file.
    sums_map: Option<memmap2::MmapRaw>,
    /// Whether `data` was opened with `O_DIRECT` (false on file systems without it: then data
    /// goes through the page cache and the journal fdatasyncs the data file too).
    pub direct: bool,
    pub data_path: PathBuf,
    pub sums_path: PathBuf,
}

impl Replica {
    pub fn new(
        disk: u32,
        chunk: ChunkId,
        nonce: u64,
        paths: ReplicaPaths,
        chunk_size: u64,
        version: ChunkVersion,
    ) -> Replica {
        Replica {
            disk,
            chunk,
            nonce,
            paths,
            io: RwLock::new(ReplicaState { chunk_size, version, deleted: false }),
            version: AtomicU64::new(version),
            files: Mutex::new(None),
            allocated: Mutex::new(Allocated::default()),
            failed: Mutex::new(None),
            in_flight: AtomicU32::new(0),
            settling: AtomicU32::new(0),
            deferred: Mutex::new(Vec::new()),
            deferred_count: AtomicU32::new(0),
            placed_now: tokio::sync::Notify::new(),
        }
    }

    /// Counts an acknowledged write of `count` blocks from `first` as not yet in place.
    pub fn defer(&self, first: u64, count: u64) {
        lock(&self.deferred).push((first, count));
        self.deferred_count.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether an acknowledged write of any of these blocks is not in place yet.
    pub fn unplaced(&self, first: u64, count: u64) -> bool {
        if self.deferred_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        lock(&self.deferred).iter().any(|&(f, n)| f < first + count && first < f + n)
    }

    /// Waits until every acknowledged write of these blocks is in place.
    pub async fn placed(&self, first: u64, count: u64) {
        loop {
            let notified = self.placed_now.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a placement right after it still wakes us.
            notified.as_mut().enable();
            if !self.unplaced(first, count) {
                return;
            }
            notified.await;
        }
    }

    /// The deferred write of [`defer`](Self::defer)`(first, count)` is over.
    pub fn place_done(&self, first: u64, count: u64) {
        {
            let mut d = lock(&self.deferred);
            if let Some(i) = d.iter().position(|&r| r == (first, count)) {
                d.swap_remove(i);
                self.deferred_count.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.placed_now.notify_waiters();
    }

    /// Refuses every further read and write of this replica (until the process restarts and
    /// the replica is verified again).
    pub fn fail(&self, kind: io::ErrorKind, message: String) {
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some((kind, message));
        }
    }

    /// The read lock, once no ring data write is in flight: sums and data agree. Blocking
    /// threads only (it may wait).
    pub fn read_state(&self) -> std::sync::RwLockReadGuard<'_, ReplicaState> {
        self.settled(|| self.read_state_now())
    }

    /// The write lock, once no ring data write is in flight. Blocking threads only.
    pub fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, ReplicaState> {
        self.settled(|| self.write_state_now())
    }

    /// Takes a lock with `take` until no ring write is in flight. While it waits, new writes
    /// stay off the ring (`settling`), so a stream of them cannot starve it.
    fn settled<G>(&self, take: impl Fn() -> G) -> G {
        let g = take();
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return g;
        }
        drop(g);
        self.settling.fetch_add(1, Ordering::AcqRel);
        let g = loop {
            std::thread::sleep(std::time::Duration::from_micros(50));
            let g = take();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                break g;
            }
        };
        self.settling.fetch_sub(1, Ordering::AcqRel);
        g
    }

    /// Whether a new data write may go through the ring: no lock waiter is waiting for the
    /// ring writes to drain. Caller holds the write lock.
    pub fn ring_open(&self) -> bool {
        self.settling.load(Ordering::Acquire) == 0
    }

    fn read_state_now(&self) -> std::sync::RwLockReadGuard<'_, ReplicaState> {
        self.io.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state_now(&self) -> std::sync::RwLockWriteGuard<'_, ReplicaState> {
        self.io.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The read lock if free now, without waiting for ring writes: for the async readers,
    /// which tolerate a block matching neither sum (they fall back) and must not block a
    /// worker thread on a lock held across disk I/O.
    pub fn try_read_state(&self) -> Option<std::sync::RwLockReadGuard<'_, ReplicaState>> {
        match self.io.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The write lock if free now, for the async (ring) writer.
    pub fn try_write_state(&self) -> Option<std::sync::RwLockWriteGuard<'_, ReplicaState>> {
        match self.io.try_write() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Whether every block of `[first, first+count)` is known to be durably allocated.
    pub fn is_allocated(&self, first: u64, count: u64) -> bool {
        let a = lock(&self.allocated);
        (first..first + count).all(|b| a.blocks.contains(b))
    }

    /// Refuses I/O on a replica whose fdatasync failed.
    pub fn check(&self) -> Result<()> {
        match &*lock(&self.failed) {
            Some((kind, msg)) => Err(Error::io(&self.paths.data, io::Error::new(*kind, msg.clone()))),
            None => Ok(()),
        }
    }

    /// Makes the data file's allocation of the blocks in `runs` (first, count) durable, if
    /// not known to be already; called after their data was written.
    pub fn sync_allocation(&self, files: &Files, runs: &[(u64, u64)], fdatasyncs: &AtomicU64) -> Result<()> {
        let trims = {
            let a = lock(&self.allocated);
            if runs.iter().all(|&(first, count)| (first..first + count).all(|b| a.blocks.contains(b))) {
                return Ok(());
            }
            a.trims
        };
        fdatasyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = files.data.sync_data() {
            tracing::error!(path = %files.data_path.display(), error = %e, "fdatasync failed; replica refuses further I/O");
            *lock(&self.failed) = Some((e.kind(), format!("fdatasync of {} failed: {e}", files.data_path.display())));
            return Err(Error::io(&files.data_path, e));
        }
        let mut a = lock(&self.allocated);
        if a.trims == trims {
            for &(first, count) in runs {
                a.blocks.insert_range(first, count);
            }
        }
        Ok(())
    }

    /// Forgets the allocation of blocks whose holes are being punched. Caller holds the
    /// replica's write lock.
    pub fn forget_allocation(&self, first: u64, count: u64) {
        let mut a = lock(&self.allocated);
        a.trims += 1;
        a.blocks.remove_range(first, count);
    }

    /// Opens both files, checking that their sizes fit the chunk size (a mismatch means the
    /// files are not what the metadata says).
    pub fn open_files(&self, chunk_size: u64) -> Result<Files> {
        let p = &self.paths;
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        let (data, direct) = match o.clone().custom_flags(libc::O_DIRECT).open(&p.data) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (o.open(&p.data).at(&p.data)?, false),
            Err(e) => return Err(Error::io(&p.data, e)),
        };
        let sums = o.open(&p.sums).at(&p.sums)?;
        let nblocks = blocks_of(chunk_size);
        let sums_len = sums.metadata().at(&p.sums)?.len();
        let data_len = data.metadata().at(&p.data)?.len();
        if sums_len != nblocks * ENTRY as u64 || data_len != nblocks * BLOCK_SIZE {
            return Err(Error::BadDisk(format!(
                "replica {} on disk {}: files have {data_len}/{sums_len} bytes, expected {}/{} for a chunk of {chunk_size}",
                self.chunk,
                self.disk,
                nblocks * BLOCK_SIZE,
                nblocks * ENTRY as u64
            )));
        }
        let sums_map = map_sums(&sums, sums_len, &p.sums);
        Ok(Files { data, sums, sums_map, direct, data_path: p.data.clone(), sums_path: p.sums.clone() })
    }
}

impl Files {
    /// Small scratch files (one block, page cache only) in `dir`, for journal tests.
    #[cfg(test)]
    pub fn scratch(dir: &std::path::Path) -> Files {
        let (data_path, sums_path) = (dir.join("scratch.data"), dir.join("scratch.sums"));
        let open = |p: &PathBuf, len: u64| {
            let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(p).expect("scratch file");
            f.set_len(len).expect("scratch size");
            f
        };
        let (data, sums) = (open(&data_path, BLOCK_SIZE), open(&sums_path, ENTRY as u64));
        Files { data, sums, sums_map: None, direct: false, data_path, sums_path }
    }

    pub fn read_entries(&self, first: u64, count: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; count as usize * ENTRY];
        let at = first * ENTRY as u64;
        if let Some(map) = self.mapped(at, buf.len()) {
            #[allow(unsafe_code)]
            // SAFETY: `mapped` checked the range lies inside the mapping, which lives as
            // long as `self`; the replica's lock, held by every caller, keeps writers of
            // these entries out while we copy.
            unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(at as usize), buf.as_mut_ptr(), buf.len()) };
            return Ok(buf);
        }
        self.sums.read_exact_at(&mut buf, at).at(&self.sums_path)?;
        Ok(buf)
    }

    pub fn write_entries(&self, first: u64, entries: &[u8]) -> Result<()> {
        let at = first * ENTRY as u64;
        if let Some(map) = self.mapped(at, entries.len()) {
            // SAFETY: as in `read_entries`; the caller holds the replica's write lock.
            #[allow(unsafe_code)]
            unsafe { std::ptr::copy_nonoverlapping(entries.as_ptr(), map.as_mut_ptr().add(at as usize), entries.len()) };
            return Ok(());
        }
        self.sums.write_all_at(entries, at).at(&self.sums_path)
    }

    /// The mapping, if there is one and `[at, at+len)` lies inside it. A range outside it
    /// goes to the file, which reports the error.
    fn mapped(&self, at: u64, len: usize) -> Option<&memmap2::MmapRaw> {
        let map = self.sums_map.as_ref()?;
        let end = at.checked_add(len as u64)?;
        (end <= map.len() as u64).then_some(map)
    }

    /// Reads whole blocks at a block-aligned `offset` into a fresh buffer, aligned for
    /// `O_DIRECT`.
    pub fn read_blocks(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::filled_later(len);
        self.data.read_exact_at(buf.as_mut(), offset).at(&self.data_path)?;
        Ok(buf)
    }

    /// Writes whole blocks at a block-aligned `offset` (copying them into an aligned buffer
    /// first when `O_DIRECT` needs it).
    pub fn write_data(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.direct && !AlignedBuf::is_aligned(buf) {
            let copy = AlignedBuf::copy_of(buf);
            return self.data.write_all_at(copy.as_ref(), offset).at(&self.data_path);
        }
        self.data.write_all_at(buf, offset).at(&self.data_path)
    }

    /// Makes `[offset, offset+len)` of the data file read as zeros, freeing the space where the
    /// file system can.
    pub fn zero_data(&self, offset: u64, len: u64) -> Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.data), flags, offset as libc::off_t, len as libc::off_t) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                // No hole punching here: write the zeros. The sums already say "unwritten",
                // which is what readers go by; zeros keep the data consistent with that.
                let zeros = AlignedBuf::zeroed((len as usize).min(1 << 20));
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeros.as_ref().len() as u64) as usize;
                    self.write_data(offset + done, &zeros.as_ref()[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(Error::io(&self.data_path, io::Error::from(e))),
        }
    }
}

/// A growable set of block indices: the blocks clients wrote to a replica while it was being
/// filled by re-replication.
#[derive(Default, Debug)]
pub(crate) struct BlockSet {
    words: Vec<u64>,
}

impl BlockSet {
    pub fn insert_range(&mut self, first: u64, count: u64) {
        for b in first..first + count {
            let (w, bit) = ((b / 64) as usize, b % 64);
            if w >= self.words.len() {
                self.words.resize(w + 1, 0);
            }
            self.words[w] |= 1 << bit;
        }
    }

    pub fn remove_range(&mut self, first: u64, count: u64) {
        for b in first..first + count {
            if let Some(w) = self.words.get_mut((b / 64) as usize) {
                *w &= !(1 << (b % 64));
            }
        }
    }

    pub fn contains(&self, b: u64) -> bool {
        self.words.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
    }
}

/// Maps a sums file of `len` bytes for [`Files::read_entries`] and [`Files::write_entries`],
/// after allocating all its blocks. None (the file is used with `pread`/`pwrite`) where the
/// file system cannot allocate ahead or map, or the file is empty.
fn map_sums(sums: &File, len: u64, path: &std::path::Path) -> Option<memmap2::MmapRaw> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return None;
    }
    // No flags: allocate without changing the size; blocks already allocated stay as they are.
    let flags = nix::fcntl::FallocateFlags::empty();
    if let Err(e) = nix::fcntl::fallocate(sums.as_raw_fd(), flags, 0, len as libc::off_t) {
        tracing::debug!(path = %path.display(), error = %e, "cannot allocate the sums file ahead; not mapping it");
        return None;
    }
    match memmap2::MmapOptions::new().len(len as usize).map_raw(sums) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot map the sums file");
            None
        }
    }
}
