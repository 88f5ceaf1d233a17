//! One replica in memory: its open files, its lock, the two-slot checksum entries and how a
//! block is judged against them, and the group commit of its fdatasyncs.

use crate::disk::ReplicaPaths;
use crate::error::{Error, IoContext, Result};
use basalt_types::{BlockSum, ChunkId, ChunkVersion, BLOCK_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

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
    let cur = sum_at(entries, i, 0);
    let prev = sum_at(entries, i, 1);
    if cur == ZERO_SUM && prev == ZERO_SUM {
        return (BlockState::Unwritten, ZERO_SUM);
    }
    let h: BlockSum = *blake3::hash(data).as_bytes();
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
    pub paths: ReplicaPaths,
    pub io: RwLock<ReplicaState>,
    /// Mirror of `ReplicaState::version` for lock-free `version()` and `list()`.
    pub version: AtomicU64,
    /// Open file handles; `None` when closed to bound the number of open files.
    pub files: Mutex<Option<Arc<Files>>>,
    pub sync: GroupSync,
}

pub(crate) struct Files {
    pub data: File,
    pub sums: File,
}

impl Replica {
    pub fn new(disk: u32, chunk: ChunkId, paths: ReplicaPaths, chunk_size: u64, version: ChunkVersion) -> Replica {
        Replica {
            disk,
            chunk,
            paths,
            io: RwLock::new(ReplicaState { chunk_size, version, deleted: false }),
            version: AtomicU64::new(version),
            files: Mutex::new(None),
            sync: GroupSync::default(),
        }
    }

    pub fn read_state(&self) -> std::sync::RwLockReadGuard<'_, ReplicaState> {
        self.io.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, ReplicaState> {
        self.io.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens both files, checking that their sizes fit the chunk size (a mismatch means the
    /// files are not what the metadata says).
    pub fn open_files(&self, chunk_size: u64) -> Result<Files> {
        let open = |p: &std::path::Path| OpenOptions::new().read(true).write(true).open(p).at(p);
        let data = open(&self.paths.data)?;
        let sums = open(&self.paths.sums)?;
        let nblocks = blocks_of(chunk_size);
        let sums_len = sums.metadata().at(&self.paths.sums)?.len();
        let data_len = data.metadata().at(&self.paths.data)?.len();
        if sums_len != nblocks * ENTRY as u64 || data_len != nblocks * BLOCK_SIZE {
            return Err(Error::BadDisk(format!(
                "replica {} on disk {}: files have {data_len}/{sums_len} bytes, expected {}/{} for a chunk of {chunk_size}",
                self.chunk,
                self.disk,
                nblocks * BLOCK_SIZE,
                nblocks * ENTRY as u64
            )));
        }
        Ok(Files { data, sums })
    }
}

impl Files {
    pub fn read_entries(&self, paths: &ReplicaPaths, first: u64, count: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; count as usize * ENTRY];
        self.sums.read_exact_at(&mut buf, first * ENTRY as u64).at(&paths.sums)?;
        Ok(buf)
    }

    pub fn write_entries(&self, paths: &ReplicaPaths, first: u64, entries: &[u8]) -> Result<()> {
        self.sums.write_all_at(entries, first * ENTRY as u64).at(&paths.sums)
    }

    pub fn read_data(&self, paths: &ReplicaPaths, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.data.read_exact_at(buf, offset).at(&paths.data)
    }

    pub fn write_data(&self, paths: &ReplicaPaths, offset: u64, buf: &[u8]) -> Result<()> {
        self.data.write_all_at(buf, offset).at(&paths.data)
    }

    /// Makes `[offset, offset+len)` of the data file read as zeros, freeing the space where the
    /// file system can.
    pub fn zero_data(&self, paths: &ReplicaPaths, offset: u64, len: u64) -> Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.data.as_raw_fd(), flags, offset as libc::off_t, len as libc::off_t) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                // No hole punching here: write the zeros. The sums already say "unwritten",
                // which is what readers go by; zeros keep the data consistent with that.
                let zeros = vec![0u8; (len as usize).min(1 << 20)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.write_data(paths, offset + done, &zeros[..n])?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(Error::io(&paths.data, io::Error::from(e))),
        }
    }
}

/// Group commit of a replica's fdatasyncs. A writer takes a ticket after its pwrites; the first
/// writer to find no sync running syncs on behalf of every ticket issued so far, and writers
/// arriving meanwhile wait for the next round, which covers all of them at once. Thus with N
/// concurrent writers the disk sees about two syncs per flush round instead of 2N in a row.
#[derive(Default)]
pub(crate) struct GroupSync {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    issued: u64,
    synced: u64,
    in_flight: bool,
    /// After a failed fdatasync the kernel may have dropped the dirty pages and a later sync
    /// can report success for data that never reached the disk, so a failure is permanent
    /// for this replica (until the process restarts and the replica is verified again).
    failed: Option<(io::ErrorKind, String)>,
}

pub(crate) struct SyncCounters<'a> {
    pub fdatasyncs: &'a AtomicU64,
    /// Extra latency per flush, used by tests to stand in for a slow disk.
    pub latency: Duration,
}

impl GroupSync {
    pub fn check(&self, paths: &ReplicaPaths) -> Result<()> {
        match &lock(&self.state).failed {
            Some((kind, msg)) => Err(Error::io(&paths.data, io::Error::new(*kind, msg.clone()))),
            None => Ok(()),
        }
    }

    /// Returns once everything written to `files` before the call is durable.
    pub fn sync(&self, files: &Files, paths: &ReplicaPaths, counters: &SyncCounters<'_>) -> Result<()> {
        let mut st = lock(&self.state);
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if let Some((kind, msg)) = &st.failed {
                return Err(Error::io(&paths.data, io::Error::new(*kind, msg.clone())));
            }
            if st.synced >= ticket {
                return Ok(());
            }
            if st.in_flight {
                st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Lead a round for every ticket issued so far (their pwrites are all done).
            let target = st.issued;
            st.in_flight = true;
            drop(st);
            if !counters.latency.is_zero() {
                std::thread::sleep(counters.latency);
            }
            counters.fdatasyncs.fetch_add(2, Ordering::Relaxed);
            let res = files
                .sums
                .sync_data()
                .map_err(|e| (e, &paths.sums))
                .and_then(|()| files.data.sync_data().map_err(|e| (e, &paths.data)));
            st = lock(&self.state);
            st.in_flight = false;
            match res {
                Ok(()) => st.synced = st.synced.max(target),
                Err((e, path)) => {
                    tracing::error!(path = %path.display(), error = %e, "fdatasync failed; replica refuses further I/O");
                    st.failed = Some((e.kind(), format!("fdatasync of {} failed: {e}", path.display())));
                }
            }
            self.done.notify_all();
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

    pub fn contains(&self, b: u64) -> bool {
        self.words.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
    }
}
