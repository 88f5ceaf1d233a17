//! The per-disk journal: makes the block sums of every write durable with one group-committed
//! write and one fdatasync per batch, shared by every replica on the disk.
//!
//! A write updates its replica's `.sums` file through the page cache (so a killed process
//! leaves it visible to the next one) and writes its data in place with `O_DIRECT`; it hands
//! the new sum entries to this journal and waits. A ring write hands them over as it submits
//! its data, so the commit's journal write runs beside the data write; the commit's fdatasync
//! waits for that data write (`DataWrite`). The committer thread takes every record
//! queued meanwhile, writes them as one *commit* with `O_DIRECT`, and hands it to the syncer
//! thread, which fdatasyncs the journal and answers it (meanwhile the committer writes the
//! next commit; see `Syncing`).
//! That fdatasync also flushes the device's write cache, which makes the `O_DIRECT` data writes
//! that completed before it durable too. A lone ring write on an idle journal skips the thread
//! and writes its own commit (see [`Journal::begin_fast`]); a small one puts its data in that
//! commit, is answered when the commit is durable and writes its data in place afterwards
//! ([`FastCommit::commit_alone`]). The `.sums` files themselves are fdatasynced only at
//! a *checkpoint*, when half of the ring is in use: after it, their records are no longer
//! needed (a checkpoint waits for answered data still to be written in place first).
//!
//! # File layout (`journal` in the disk's directory)
//!
//! - bytes `0..4096`: the superblock — magic, format, ring size, and the *tail*: the log
//!   position from which replay starts. Rewritten (and fdatasynced) by each checkpoint.
//! - bytes `4096..4096 + ring`: the ring. Log positions (LSNs) grow forever; position `p` lives
//!   at `4096 + p % ring`. Every commit starts at a multiple of 4 KiB and is padded to one.
//!
//! A commit: a 32-byte header (magic, kind, LSN, length, record count, CRC32C of the whole
//! padded commit with the CRC field zero), then its records. A commit that would cross the end
//! of the ring is preceded by a *wrap* commit (header only) that skips to the ring's start.
//! Record: volume, chunk index, replica nonce, first block, entry count, then the entries
//! (64 bytes per block: current sum, previous sum). A *data* commit (written by a small lone
//! write, see [`MAX_DATA_BLOCKS`]) holds one record and, from the next 4 KiB boundary, the new
//! contents of its blocks; the CRC covers them too. (Journals holding data commits cannot be
//! replayed by builds from before them: such a build stops at the first one.)
//!
//! # Replay
//!
//! At open, commits are read from the tail while they are valid (right magic and LSN, CRC
//! matches); the first invalid one is the end (a commit from an older lap has another LSN; a
//! torn one fails its CRC; it was never acknowledged). Records are re-applied to the `.sums`
//! files of replicas that still exist with the same nonce (a replica deleted and created again
//! gets a new one), and data commits' blocks to their data files, newest first, each block only
//! from the last record that touched it (a later write's data is already in place); those files
//! are fdatasynced, and the tail moves to the end.

use basalt_iobuf::{AlignedBuf, ALIGN};
use crate::error::{Error, IoContext, Result};
use crate::replica::{lock, Files};
use crate::uring::WriteOp;
use basalt_types::VolumeId;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const SUPER_MAGIC: &[u8; 8] = b"BSLTJRN1";
const COMMIT_MAGIC: u32 = 0x4a43_4231; // "1BCJ"
const KIND_RECORDS: u32 = 1;
const KIND_WRAP: u32 = 2;
/// A commit of one record followed by its blocks' data (see [`MAX_DATA_BLOCKS`]).
const KIND_DATA: u32 = 3;
const HEADER: usize = 32;
const RECORD_HEADER: usize = 40;
const ENTRY: usize = crate::replica::ENTRY;
const AREA: u64 = ALIGN as u64;

/// Smallest ring accepted: a few maximal commits must fit.
pub const MIN_RING: u64 = 8 << 20;
/// Largest ring accepted (a wrap record's length field is 32 bits).
pub const MAX_RING: u64 = 1 << 30;
/// Default ring size per disk.
pub const DEFAULT_RING: u64 = 128 << 20;
/// A lone write of at most this many blocks carries its data in its own commit, so its in-place
/// data write needs no flush of its own: one durable write instead of two. (Measured on the
/// development VM's disk: two concurrent `RWF_DSYNC` 4 KiB writes take ~185 µs, one ~130 µs.)
/// Larger writes would fill the ring with data for little gain.
pub const MAX_DATA_BLOCKS: u64 = 16;

/// The new sum entries of a run of blocks of one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub volume: VolumeId,
    pub index: u64,
    pub nonce: u64,
    pub first: u64,
    pub entries: Vec<u8>,
    /// The blocks' new contents, in a data commit read back at replay (never set on the
    /// write path: the data travels beside the record there).
    pub data: Option<bytes::Bytes>,
}

impl Record {
    fn encoded_len(&self) -> usize {
        RECORD_HEADER + self.entries.len()
    }
}

/// Why the journal stopped; every later write on the disk fails with it. After a failed
/// fdatasync the kernel may have dropped dirty pages, so carrying on would risk acknowledging
/// data that is not on the disk.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    path: PathBuf,
    kind: io::ErrorKind,
    message: String,
}

impl Failure {
    fn new(path: &Path, e: &io::Error) -> Failure {
        Failure { path: path.to_path_buf(), kind: e.kind(), message: e.to_string() }
    }

    pub fn to_error(&self) -> Error {
        Error::io(&self.path, io::Error::new(self.kind, self.message.clone()))
    }
}

/// Where the outcome of a commit goes.
pub(crate) type Done = tokio::sync::oneshot::Sender<Result<()>>;

struct Pending {
    record: Record,
    files: Arc<Files>,
    done: Done,
    /// The record's data write, when it runs alongside the commit's journal write.
    data: Option<Arc<DataWrite>>,
}

/// A data write that a commit holding its record must see completed before its fdatasync,
/// so that the fdatasync makes the data durable too. The journal write itself need not wait:
/// a commit on the disk whose data write did not land leaves each block matching its previous
/// slot, as a crash between a write's sums and its data does, and was never acknowledged.
#[derive(Default)]
pub(crate) struct DataWrite {
    state: Mutex<DataState>,
    cv: Condvar,
}

#[derive(Default)]
struct DataState {
    done: bool,
    /// Someone sleeps on `cv`. Completion notifies only then: std's condvar makes a
    /// futex system call on every notify, waiter or not, and most data writes are over
    /// long before their commit looks (strace at QD32: one such call per write, the bulk
    /// of a storage node's futex calls).
    waiting: bool,
}

impl DataWrite {
    fn wait(&self) {
        let mut st = lock(&self.state);
        while !st.done {
            st.waiting = true;
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Marks its data write over when dropped: it travels with the write's buffer, which the
/// ring drops when the kernel is done with it (completed or failed), whether or not anyone
/// still waits for the write.
pub(crate) struct DataWritten(pub Arc<DataWrite>);

impl Drop for DataWritten {
    fn drop(&mut self) {
        let waiting = {
            let mut st = lock(&self.0.state);
            st.done = true;
            std::mem::take(&mut st.waiting)
        };
        if waiting {
            self.0.cv.notify_all();
        }
    }
}

struct Queue {
    pending: Vec<Pending>,
    stop: bool,
    failed: Option<Failure>,
    /// Whoever writes a commit holds this (the committer thread or a writer's fast commit):
    /// commits are written one at a time, in log order, so replay (which stops at the first
    /// invalid commit) never skips an acknowledged one.
    busy: bool,
    /// Where the next commit goes, and where replay starts: owned by the holder of `busy`.
    head: u64,
    tail: u64,
    /// Files whose sums were journalled since the last checkpoint, by address.
    dirty: HashMap<usize, Arc<Files>>,
    /// The last commit held one record and nothing arrived while it was written: writers
    /// are not overlapping, and a lone writer may write its own commit. Under load the
    /// thread's group commits share one flush among many writes, where fast commits would
    /// cost two each (and hold the token the next group commit waits for).
    lone: bool,
    /// The committer thread sleeps on `wake` for records: writers notify only then (a
    /// notification is a system call even when nobody waits).
    sleeping: bool,
    /// Acknowledged data commits whose in-place write is not over ([`Placement`]). The tail
    /// may not move past them (their data's only durable copy is in the ring), so a
    /// checkpoint waits for zero.
    placing: u32,
    /// The committer waits for `placing` to reach zero (and is notified then).
    awaiting_placed: bool,
}

impl Queue {
    /// Answers every queued record with `f` (the journal failed: none will be committed).
    fn answer_pending(&mut self, f: &Failure) {
        for p in self.pending.drain(..) {
            let _ = p.done.send(Err(f.to_error()));
        }
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Group commits written and waiting for the fdatasync that makes them durable (the
    /// syncer thread's work), and its notifications both ways.
    syncing: Mutex<Syncing>,
    sync_wake: Condvar,
    path: PathBuf,
    file: Arc<File>,
    ring: u64,
    fdatasyncs: Arc<AtomicU64>,
    /// Commits written by the writer's own task (see [`Journal::begin_fast`]).
    fast_commits: AtomicU64,
    /// Extra latency per commit, used by tests to stand in for a slow disk.
    latency: Mutex<Duration>,
    /// Extra latency per fdatasync of the syncer, for tests.
    #[cfg(test)]
    sync_latency: Mutex<Duration>,
}

/// Handle to one disk's journal and its committer thread; the thread stops when this is
/// dropped (after committing what was queued).
pub(crate) struct Journal {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The journal file as found at open, before replay.
pub(crate) struct Opened {
    file: File,
    path: PathBuf,
    ring: u64,
    /// Where the next commit goes (the end of what replay found).
    head: u64,
    /// Records to re-apply, oldest first.
    pub records: Vec<Record>,
}

fn crc(buf: &[u8]) -> u32 {
    crc32c::crc32c(buf)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn open_direct(path: &Path, create: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(create).truncate(false);
    match o.clone().custom_flags(libc::O_DIRECT).open(path) {
        // File systems without O_DIRECT (older tmpfs) refuse it at open with EINVAL: use the
        // page cache; the fdatasync after each commit keeps it correct.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => o.open(path),
        other => other,
    }
}

/// Zeros written per write while a new ring is filled.
const FILL_CHUNK: usize = 4 << 20;

/// Creates a journal with a zero-filled ring, under a temporary name renamed into place once
/// it is complete and durable (a crash half-way leaves no half-made journal behind).
///
/// Zero-filled rather than fallocated: on ext4 a write into a fallocated (unwritten) extent
/// converts it, which dirties the inode, and the following fdatasync must then write the
/// inode too (synchronously, without a journal). Every commit of the first lap of the ring
/// paid for that; a written ring costs the commits nothing but their own write.
/// PostgreSQL zero-fills its WAL segments for the same reason.
fn create(path: &Path, ring: u64) -> Result<File> {
    let tmp = path.with_extension("new");
    let file = {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(true);
        match o.clone().custom_flags(libc::O_DIRECT).open(&tmp) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => o.open(&tmp),
            other => other,
        }
        .at(&tmp)?
    };
    let zeros = AlignedBuf::zeroed(FILL_CHUNK);
    let mut at = AREA;
    while at < AREA + ring {
        let n = (AREA + ring - at).min(FILL_CHUNK as u64) as usize;
        file.write_all_at(&zeros.as_ref()[..n], at).at(&tmp)?;
        at += n as u64;
    }
    write_super(&file, &tmp, ring, 0)?;
    file.sync_all().at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)?;
    if let Some(dir) = path.parent() {
        crate::disk::fsync_dir(dir)?;
    }
    Ok(file)
}

impl Opened {
    /// Opens (creating if needed) the journal at `path` with a ring of `ring` bytes, and reads
    /// the records to replay. A journal created with another ring size keeps its own.
    pub fn open(path: &Path, ring: u64) -> Result<Opened> {
        let ring = ring.clamp(MIN_RING, MAX_RING).next_multiple_of(AREA);
        // A file too short for a superblock can only be left by an interrupted creation from
        // before creations were renamed into place: nothing was ever committed to it.
        let usable = std::fs::metadata(path).is_ok_and(|m| m.len() >= AREA);
        if !usable {
            let file = create(path, ring)?;
            return Ok(Opened { file, path: path.to_path_buf(), ring, head: 0, records: Vec::new() });
        }
        let file = open_direct(path, false).at(path)?;
        let mut sb = AlignedBuf::zeroed(ALIGN);
        file.read_exact_at(sb.as_mut(), 0).at(path)?;
        let b = sb.as_ref();
        if &b[0..8] != SUPER_MAGIC || crc(&b[..28]) != u32_at(b, 28) {
            return Err(Error::BadDisk(format!("{}: not a Basalt journal (bad superblock)", path.display())));
        }
        let ring = u64_at(b, 8);
        let tail = u64_at(b, 16);
        if !(MIN_RING..=MAX_RING).contains(&ring) || ring % AREA != 0 || tail % AREA != 0 {
            return Err(Error::BadDisk(format!("{}: corrupt superblock (ring {ring}, tail {tail})", path.display())));
        }
        let mut opened = Opened { file, path: path.to_path_buf(), ring, head: tail, records: Vec::new() };
        opened.scan()?;
        Ok(opened)
    }

    /// Reads valid commits from `head` on, collecting their records.
    fn scan(&mut self) -> Result<()> {
        let mut header = AlignedBuf::zeroed(ALIGN);
        loop {
            let lsn = self.head;
            let phys = AREA + lsn % self.ring;
            self.file.read_exact_at(header.as_mut(), phys).at(&self.path)?;
            let h = header.as_ref();
            if u32_at(h, 0) != COMMIT_MAGIC || u64_at(h, 8) != lsn {
                return Ok(());
            }
            let kind = u32_at(h, 4);
            let len = u32_at(h, 16) as u64;
            let count = u32_at(h, 20);
            if len < AREA || len % AREA != 0 || lsn % self.ring + len > self.ring {
                return Ok(());
            }
            if kind == KIND_WRAP {
                // Its CRC covers its own 4 KiB; its length is the distance to the ring's end.
                let want = u32_at(header.as_ref(), 24);
                header.as_mut()[24..28].fill(0);
                if crc(header.as_ref()) != want || lsn % self.ring + len != self.ring {
                    return Ok(());
                }
                self.head = lsn + len;
                continue;
            }
            if kind != KIND_RECORDS && kind != KIND_DATA {
                return Ok(());
            }
            let mut body = AlignedBuf::zeroed(len as usize);
            self.file.read_exact_at(body.as_mut(), phys).at(&self.path)?;
            let want = u32_at(body.as_ref(), 24);
            body.as_mut()[24..28].fill(0);
            if crc(body.as_ref()) != want {
                tracing::info!(path = %self.path.display(), lsn, "journal ends with a torn commit (never acknowledged)");
                return Ok(());
            }
            let decoded = match kind {
                KIND_DATA => decode_data_commit(body.as_ref(), count),
                _ => decode_records(&body.as_ref()[HEADER..], count),
            };
            match decoded {
                Some(records) => self.records.extend(records),
                None => {
                    return Err(Error::BadDisk(format!(
                        "{}: commit at {lsn} passes its checksum but does not decode",
                        self.path.display()
                    )))
                }
            }
            self.head = lsn + len;
        }
    }

    /// Starts the committer. Call after the records were re-applied and their files synced:
    /// this moves the tail past them.
    pub fn start(self, fdatasyncs: Arc<AtomicU64>) -> Result<Journal> {
        write_super(&self.file, &self.path, self.ring, self.head)?;
        self.file.sync_data().at(&self.path)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                stop: false,
                failed: None,
                busy: false,
                head: self.head,
                tail: self.head,
                dirty: HashMap::new(),
                lone: true,
                sleeping: false,
                placing: 0,
                awaiting_placed: false,
            }),
            wake: Condvar::new(),
            syncing: Mutex::new(Syncing::default()),
            sync_wake: Condvar::new(),
            path: self.path.clone(),
            file: Arc::new(self.file),
            ring: self.ring,
            fdatasyncs,
            fast_commits: AtomicU64::new(0),
            latency: Mutex::new(Duration::ZERO),
            #[cfg(test)]
            sync_latency: Mutex::new(Duration::ZERO),
        });
        let syncer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("journal-sync".into())
                .spawn(move || sync_loop(&shared))
                .map_err(|e| Error::BadDisk(format!("cannot start the journal sync thread: {e}")))?
        };
        let committer = Committer {
            shared: shared.clone(),
            head: 0,
            tail: 0,
            dirty: HashMap::new(),
            syncer: Some(syncer),
        };
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || committer.run())
            .map_err(|e| Error::BadDisk(format!("cannot start the journal thread: {e}")))?;
        Ok(Journal { shared, thread: Some(thread) })
    }
}

fn write_super(file: &File, path: &Path, ring: u64, tail: u64) -> Result<()> {
    let mut sb = AlignedBuf::zeroed(ALIGN);
    let b = sb.as_mut();
    b[0..8].copy_from_slice(SUPER_MAGIC);
    b[8..16].copy_from_slice(&ring.to_le_bytes());
    b[16..24].copy_from_slice(&tail.to_le_bytes());
    let c = crc(&b[..28]);
    b[28..32].copy_from_slice(&c.to_le_bytes());
    file.write_all_at(sb.as_ref(), 0).at(path)
}

fn decode_records(mut b: &[u8], count: u32) -> Option<Vec<Record>> {
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if b.len() < RECORD_HEADER {
            return None;
        }
        let n = u32_at(b, 32) as usize;
        let len = RECORD_HEADER.checked_add(n.checked_mul(ENTRY)?)?;
        if b.len() < len {
            return None;
        }
        out.push(Record {
            volume: u64_at(b, 0),
            index: u64_at(b, 8),
            nonce: u64_at(b, 16),
            first: u64_at(b, 24),
            entries: b[RECORD_HEADER..len].to_vec(),
            data: None,
        });
        b = &b[len..];
    }
    Some(out)
}

/// A data commit: its one record, then the record's blocks from the next 4 KiB boundary on,
/// filling the rest of the commit exactly.
fn decode_data_commit(body: &[u8], count: u32) -> Option<Vec<Record>> {
    let mut records = decode_records(&body[HEADER..], count)?;
    let [record] = &mut records[..] else { return None };
    let at = data_offset(record);
    let len = (record.entries.len() / ENTRY).checked_mul(ALIGN)?;
    if at.checked_add(len)? != body.len() {
        return None;
    }
    record.data = Some(bytes::Bytes::copy_from_slice(&body[at..]));
    Some(records)
}

/// Where a data commit's blocks start: after its header and record, at a 4 KiB boundary.
fn data_offset(record: &Record) -> usize {
    (HEADER + record.encoded_len()).next_multiple_of(ALIGN)
}

fn encode_commit(kind: u32, lsn: u64, records: &[&Record]) -> AlignedBuf {
    encode(kind, lsn, records, &[])
}

/// A commit of `records`, then `data` (whole blocks) from the next 4 KiB boundary when given.
fn encode(kind: u32, lsn: u64, records: &[&Record], data: &[u8]) -> AlignedBuf {
    let body: usize = records.iter().map(|r| r.encoded_len()).sum();
    let data_at = (HEADER + body).next_multiple_of(ALIGN);
    let len = if data.is_empty() { data_at } else { data_at + data.len().next_multiple_of(ALIGN) };
    // Only what the data does not cover is zeroed (the header's padding and the data's
    // tail): a small commit carries a whole block of data, which need not be cleared first.
    let mut buf = AlignedBuf::filled_later(len);
    let b = buf.as_mut();
    b[..data_at].fill(0);
    b[data_at + data.len()..].fill(0);
    b[0..4].copy_from_slice(&COMMIT_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&kind.to_le_bytes());
    b[8..16].copy_from_slice(&lsn.to_le_bytes());
    b[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    b[20..24].copy_from_slice(&(records.len() as u32).to_le_bytes());
    let mut at = HEADER;
    for r in records {
        b[at..at + 8].copy_from_slice(&r.volume.to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&r.index.to_le_bytes());
        b[at + 16..at + 24].copy_from_slice(&r.nonce.to_le_bytes());
        b[at + 24..at + 32].copy_from_slice(&r.first.to_le_bytes());
        b[at + 32..at + 36].copy_from_slice(&((r.entries.len() / ENTRY) as u32).to_le_bytes());
        at += RECORD_HEADER;
        b[at..at + r.entries.len()].copy_from_slice(&r.entries);
        at += r.entries.len();
    }
    b[data_at..data_at + data.len()].copy_from_slice(data);
    let c = crc(b);
    b[24..28].copy_from_slice(&c.to_le_bytes());
    buf
}

impl Journal {
    /// Queues `record` (whose entries are already in `files`' sums file) and returns once it
    /// is durable, together with every `O_DIRECT` write that completed before this call.
    pub async fn commit(&self, record: Record, files: Arc<Files>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(record, files, tx);
        rx.await.unwrap_or_else(|_| Err(self.stopped()))
    }

    /// Queues `record` and sends the outcome to `done` once it is durable (or failed). Lets a
    /// blocking-pool task hand its record over without a trip back through the async worker.
    pub fn enqueue(&self, record: Record, files: Arc<Files>, done: Done) {
        self.push(Pending { record, files, done, data: None });
    }

    /// Queues `record` now, while its data write (`data`) is still running: the journal write
    /// goes alongside it, and the commit's fdatasync waits for it. The receiver gets the
    /// commit's outcome.
    pub fn enqueue_beside(
        &self,
        record: Record,
        files: Arc<Files>,
        data: Arc<DataWrite>,
    ) -> tokio::sync::oneshot::Receiver<Result<()>> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.push(Pending { record, files, done, data: Some(data) });
        rx
    }

    /// Starts a commit of `record` alone, to be written by the caller's task through the
    /// ring ([`FastCommit::run`]), if the journal is idle: the last commit held one record,
    /// nothing is queued for the committer thread, no commit is being written, no checkpoint
    /// is due and no wrap needed. `None` means "queue it for the thread instead".
    ///
    /// Why: handing a record to the committer thread and its answer back costs two thread
    /// wake-ups, each on the path of a lone write (tens of microseconds apiece on a small
    /// virtual machine, more than a quarter of a 4 KiB write's time). A writer alone does
    /// better writing its commit itself, beside its data write. The thread stays for
    /// everything that blocks or batches: group commits under load, checkpoints, wraps,
    /// data files without `O_DIRECT`.
    pub fn begin_fast(&self, record: &Record, files: &Arc<Files>, data: &[u8]) -> Result<Option<FastCommit>> {
        if !files.direct {
            return Ok(None);
        }
        let ring = self.shared.ring;
        let blocks = (record.entries.len() / ENTRY) as u64;
        let with_data = blocks <= MAX_DATA_BLOCKS
            && data.len() as u64 == blocks * ALIGN as u64
            && HEADER + record.encoded_len() <= ALIGN;
        let len = if with_data { (ALIGN + data.len()) as u64 } else { data_offset(record) as u64 };
        let lsn = {
            let mut q = lock(&self.shared.queue);
            if let Some(f) = &q.failed {
                return Err(f.to_error());
            }
            let idle = q.lone && !q.busy && !q.stop && q.pending.is_empty() && q.head - q.tail <= ring / 2;
            if !idle || q.head % ring + len > ring || q.head + len - q.tail > ring {
                return Ok(None);
            }
            q.busy = true;
            q.head
        };
        let buf = if with_data { encode(KIND_DATA, lsn, &[record], data) } else { encode_commit(KIND_RECORDS, lsn, &[record]) };
        debug_assert_eq!(buf.len() as u64, len);
        Ok(Some(FastCommit { shared: self.shared.clone(), files: files.clone(), lsn, buf: Some(buf), with_data }))
    }

    /// Commits written by writers themselves, for the store's statistics.
    pub fn fast_commits(&self) -> u64 {
        self.shared.fast_commits.load(Ordering::Relaxed)
    }

    fn push(&self, p: Pending) {
        let notify = {
            let mut q = lock(&self.shared.queue);
            if let Some(f) = &q.failed {
                let _ = p.done.send(Err(f.to_error()));
                return;
            }
            q.pending.push(p);
            // While a fast commit holds the token the thread could not commit anyway: the
            // fast commit wakes it when it gives the token back with records queued.
            q.sleeping && !q.busy
        };
        if notify {
            self.shared.wake.notify_one();
        }
    }

    /// The error for a commit whose committer went away.
    pub fn stopped(&self) -> Error {
        Error::BadDisk(format!("journal {} stopped", self.shared.path.display()))
    }

    /// Refuses new writes if the journal failed.
    pub fn check(&self) -> Result<()> {
        match &lock(&self.shared.queue).failed {
            Some(f) => Err(f.to_error()),
            None => Ok(()),
        }
    }

    /// A commit (the thread's or a fast one) holds the token.
    #[cfg(test)]
    pub fn busy(&self) -> bool {
        lock(&self.shared.queue).busy
    }

    #[cfg(test)]
    pub fn head(&self) -> u64 {
        lock(&self.shared.queue).head
    }

    #[cfg(test)]
    pub fn tail(&self) -> u64 {
        lock(&self.shared.queue).tail
    }

    #[cfg(test)]
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.shared.latency) = latency;
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A commit of one record that its writer writes itself, holding the journal's token
/// (`Queue::busy`) from [`Journal::begin_fast`] until its commit is over.
///
/// The commit is written with `RWF_DSYNC`: it is durable when it completes, with no
/// fdatasync. When it carries the write's data (`with_data`, small writes), the write is
/// durable with it ([`commit_alone`](Self::commit_alone)): it is answered then, and its
/// in-place data write runs afterwards and needs no durability of its own. Replay writes the
/// data again, and the tail only moves past the commit at a checkpoint, which first waits
/// for every such in-place write to be over (`Queue::placing`), so its flush makes them
/// durable before the commit stops being replayed. Otherwise ([`run`](Self::run)) the data
/// write goes beside the commit, as a `RWF_DSYNC` write of its own (on a device with FUA,
/// the commit's write flushes nothing else), and the token is held until both are over.
pub(crate) struct FastCommit {
    shared: Arc<Shared>,
    files: Arc<Files>,
    lsn: u64,
    /// Taken when written.
    buf: Option<AlignedBuf>,
    with_data: bool,
}

/// What became of a fast commit's two writes.
pub(crate) struct FastOutcome {
    pub committed: Result<()>,
    pub wrote: std::result::Result<io::Result<usize>, crate::uring::Unavailable>,
}

impl FastCommit {
    /// Whether the commit carries the write's data: then [`commit_alone`](Self::commit_alone)
    /// may leave the in-place write until after the answer.
    pub fn with_data(&self) -> bool {
        self.with_data
    }

    /// Writes the commit and the data in place (one submission), and gives the token back
    /// once both are over. `in_place`'s flags are set here (whether it must be durable by
    /// itself depends on the commit). Run it to the end (under `uring::RunToEnd`): dropping
    /// it half-way would leave the journal busy for ever.
    pub async fn run(mut self, ring: &crate::uring::Uring, mut in_place: WriteOp) -> FastOutcome {
        let (buf, at) = self.prepare().await;
        in_place.flags = if self.with_data { 0 } else { libc::RWF_DSYNC };
        let file: Arc<dyn std::os::fd::AsRawFd + Send + Sync> = self.shared.file.clone();
        let len = buf.len() as u64;
        // Both writes go to the kernel in one submission.
        let written = ring
            .write_two(
                WriteOp { file, data: buf.into_bytes(), offset: at, keep: Box::new(()), flags: libc::RWF_DSYNC },
                in_place,
            )
            .await;
        let (journal, wrote) = match written {
            Ok((journal, wrote)) => (Ok(journal), Ok(wrote)),
            Err(u) => (Err(u), Err(u)),
        };
        let committed = self.finish(journal, len, false);
        FastOutcome { committed, wrote }
    }

    /// Writes the commit alone, with the write's data in it (only for a commit
    /// [`with_data`](Self::with_data)), and gives the token back once it is durable. The
    /// write is then acknowledged, and its in-place data write is left to the returned
    /// [`Placement`], to be submitted after the answer went out.
    ///
    /// Why: at queue depth 1 the in-place write only delays the answer. Beside the commit it
    /// shares the device with it (the commit's flush waits for the device cache, which holds
    /// it), and its completion, which comes before the commit's, wakes the writer once more
    /// for nothing. After the answer it runs while the initiator prepares its next command.
    /// Measured on the development VM's disk (4000 writes each): the commit alone 141 to 148
    /// µs at the median, beside its data write 156 to 170 µs.
    pub async fn commit_alone(
        mut self,
        ring: &crate::uring::Uring,
        replica: Arc<crate::replica::Replica>,
        blocks: (u64, u64),
    ) -> Result<Placement> {
        debug_assert!(self.with_data);
        let (buf, at) = self.prepare().await;
        let file: Arc<dyn std::os::fd::AsRawFd + Send + Sync> = self.shared.file.clone();
        let len = buf.len() as u64;
        let written = ring.write_at_flags(file, buf.into_bytes(), at, Box::new(()), libc::RWF_DSYNC).await;
        self.finish(written, len, true)?;
        // Counted before anyone can learn the write was acknowledged: a read or write of the
        // replica that starts after the answer waits for this placement (`Replica::placed`).
        replica.defer(blocks.0, blocks.1);
        Ok(Placement { shared: self.shared.clone(), replica, blocks, written: false })
    }

    /// The commit's bytes and where they go, after the test latency if any.
    async fn prepare(&mut self) -> (AlignedBuf, u64) {
        let latency = *lock(&self.shared.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let buf = self.buf.take().unwrap_or_else(|| unreachable!("a fast commit is written once (run and commit_alone take it)"));
        (buf, AREA + self.lsn % self.shared.ring)
    }

    /// Takes the commit write's outcome: moves the head past a durable commit (counting its
    /// in-place write as outstanding if `placing`), fails the journal otherwise, and gives
    /// the token back.
    fn finish(
        &self,
        written: std::result::Result<io::Result<usize>, crate::uring::Unavailable>,
        len: u64,
        placing: bool,
    ) -> Result<()> {
        let outcome = match written {
            Ok(Ok(n)) if n as u64 == len => Ok(()),
            Ok(Ok(n)) => Err(io::Error::new(io::ErrorKind::WriteZero, format!("wrote {n} of {len} bytes"))),
            Ok(Err(e)) => Err(e),
            // The ring stopped under us (the runtime is going away): the write's fate is
            // unknown, so nothing may be committed after it.
            Err(_) => Err(io::Error::other("replica I/O ring stopped")),
        };
        let shared = &self.shared;
        let mut q = lock(&shared.queue);
        q.busy = false;
        let committed = match outcome {
            Ok(()) => {
                q.head = self.lsn + len;
                q.dirty.entry(Arc::as_ptr(&self.files) as usize).or_insert_with(|| self.files.clone());
                if placing {
                    q.placing += 1;
                }
                shared.fast_commits.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let f = Failure::new(&shared.path, &e);
                tracing::error!(path = %f.path.display(), error = %f.message, "journal write failed; the disk refuses further writes");
                q.failed = Some(f.clone());
                q.answer_pending(&f);
                Err(f.to_error())
            }
        };
        // Records queued meanwhile, a checkpoint now due, or a failure are the thread's; a
        // lone writer's commit leaves it asleep.
        let wake = !q.pending.is_empty() || q.head - q.tail > shared.ring / 2 || q.failed.is_some();
        drop(q);
        if wake {
            shared.wake.notify_one();
        }
        committed
    }
}

/// The in-place write of an acknowledged data commit ([`FastCommit::commit_alone`]), still
/// to be done. Until it is over the replica lists its blocks as deferred and the journal counts it in
/// `placing`. If it fails, or never runs (the ring went away), the acknowledged data is
/// only in the journal: the replica refuses reads (they could return the previous data) and
/// the journal refuses writes, so its tail never moves past the commit and the next start
/// replays it into place.
pub(crate) struct Placement {
    shared: Arc<Shared>,
    replica: Arc<crate::replica::Replica>,
    /// First block and count.
    blocks: (u64, u64),
    written: bool,
}

impl Placement {
    /// Queues the in-place write (`op`, whose `keep` ends with it) on the ring, submitted
    /// by the ring's driver task (see `Uring::write_detached`); returns at once.
    pub async fn submit(self, ring: &crate::uring::Uring, op: WriteOp) -> Result<()> {
        let len = op.data.len();
        let done = Box::new(move |res: i32| self.written(res, len));
        ring.write_detached(op, done).await.map_err(|_| Error::BadDisk("replica I/O ring stopped".into()))
    }

    fn written(mut self, res: i32, len: usize) {
        match usize::try_from(res) {
            Ok(n) if n == len => self.written = true,
            Ok(n) => self.fail(&io::Error::new(io::ErrorKind::WriteZero, format!("wrote {n} of {len} bytes"))),
            Err(_) => self.fail(&io::Error::from_raw_os_error(-res)),
        }
    }

    fn fail(&self, e: &io::Error) {
        let rep = &self.replica;
        tracing::error!(
            disk = rep.disk, chunk = %rep.chunk, error = %e,
            "in-place write of an acknowledged write failed; its data stays in the journal, the disk refuses further writes"
        );
        rep.fail(e.kind(), format!("in-place write of {} failed: {e}", rep.paths.data.display()));
        let mut q = lock(&self.shared.queue);
        let f = q.failed.get_or_insert_with(|| Failure::new(&rep.paths.data, e)).clone();
        q.answer_pending(&f);
        drop(q);
        self.shared.wake.notify_all();
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if !self.written {
            self.fail(&io::Error::other("the in-place write did not run (the replica I/O ring stopped)"));
        }
        // Failure first, so whoever the release wakes finds it.
        self.replica.place_done(self.blocks.0, self.blocks.1);
        let mut q = lock(&self.shared.queue);
        q.placing -= 1;
        let wake = q.placing == 0 && (q.awaiting_placed || q.head - q.tail > self.shared.ring / 2);
        drop(q);
        if wake {
            self.shared.wake.notify_all();
        }
    }
}

struct Committer {
    shared: Arc<Shared>,
    head: u64,
    tail: u64,
    /// Files whose sums were journalled since the last checkpoint, by address.
    dirty: HashMap<usize, Arc<Files>>,
    /// The syncer thread, stopped and joined when this thread ends.
    syncer: Option<JoinHandle<()>>,
}

/// The syncer's queue. Why a second thread: a group commit is two device round trips, its
/// journal write (beside its data writes) and the fdatasync; done one commit after the
/// other, writes arriving during a commit wait for both before theirs even starts. With the
/// fdatasync on its own thread, the next commit's write runs during this one's fdatasync,
/// and one fdatasync serves every commit written meanwhile. A commit is still answered only
/// after an fdatasync that began after its journal write completed, in log order.
#[derive(Default)]
struct Syncing {
    /// Written commits (each a batch of records), oldest first.
    written: VecDeque<Vec<Pending>>,
    /// The syncer holds commits taken from `written` and not answered yet.
    busy: bool,
    stop: bool,
}

impl Drop for Committer {
    fn drop(&mut self) {
        lock(&self.shared.syncing).stop = true;
        self.shared.sync_wake.notify_all();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

/// The syncer thread: fdatasyncs the journal for every commit written, and answers them.
fn sync_loop(shared: &Shared) {
    loop {
        let batches: Vec<Vec<Pending>> = {
            let mut s = lock(&shared.syncing);
            while s.written.is_empty() {
                if s.stop {
                    return;
                }
                s = shared.sync_wake.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.busy = true;
            s.written.drain(..).collect()
        };
        sync_and_answer(shared, batches);
        lock(&shared.syncing).busy = false;
        shared.sync_wake.notify_all();
    }
}

/// Fdatasyncs the journal, then answers `batches` (written before) with the outcome.
fn sync_and_answer(shared: &Shared, batches: Vec<Vec<Pending>>) {
    // After a failure no later sync can be trusted (the kernel may have dropped dirty
    // state): nothing more is answered as durable.
    let failed = lock(&shared.queue).failed.clone();
    let result = match failed {
        Some(f) => Err(f),
        None => {
            #[cfg(test)]
            std::thread::sleep(*lock(&shared.sync_latency));
            let r = shared.file.sync_data().map_err(|e| Failure::new(&shared.path, &e));
            shared.fdatasyncs.fetch_add(1, Ordering::Relaxed);
            r
        }
    };
    if let Err(f) = &result {
        let mut q = lock(&shared.queue);
        if q.failed.is_none() {
            tracing::error!(path = %f.path.display(), error = %f.message, "journal fdatasync failed; the disk refuses further writes");
            q.failed = Some(f.clone());
        }
        q.answer_pending(f);
        drop(q);
        shared.wake.notify_all();
    }
    for p in batches.into_iter().flatten() {
        let _ = p.done.send(result.clone().map_err(|f| f.to_error()));
    }
}

/// Bytes of records taken into one commit (a single bigger record still goes alone).
fn max_commit(ring: u64) -> usize {
    (ring / 8).min(16 << 20) as usize
}

impl Committer {
    fn run(mut self) {
        loop {
            let batch = {
                let mut q = lock(&self.shared.queue);
                loop {
                    if q.failed.is_some() {
                        // A fast commit failed: answer whatever arrives until the store drops us.
                        drop(q);
                        self.drain_failed();
                        return;
                    }
                    // A checkpoint waits for the in-place writes of acknowledged data
                    // commits; the last one to end wakes us (`Placement`).
                    let due = q.head - q.tail > self.shared.ring / 2 && q.placing == 0;
                    if !q.busy && (!q.pending.is_empty() || due) {
                        break;
                    }
                    // Stopping with nothing left to commit. (A fast commit cannot be in
                    // flight once the store is dropping us: it holds the store until it is
                    // over.)
                    if q.stop && q.pending.is_empty() {
                        return;
                    }
                    q.sleeping = true;
                    q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                    q.sleeping = false;
                }
                // Take the token and the log position with it, and as much as one commit
                // holds, oldest first.
                q.busy = true;
                self.head = q.head;
                self.tail = q.tail;
                self.dirty = std::mem::take(&mut q.dirty);
                let limit = max_commit(self.shared.ring);
                let mut size = 0usize;
                let mut n = 0;
                for p in &q.pending {
                    if n > 0 && size + p.record.encoded_len() > limit {
                        break;
                    }
                    size += p.record.encoded_len();
                    n += 1;
                }
                q.pending.drain(..n).collect::<Vec<_>>()
            };
            let lone = batch.len() <= 1;
            let result = if batch.is_empty() { Ok(()) } else { self.commit(&batch) };
            if let Err(f) = &result {
                tracing::error!(path = %f.path.display(), error = %f.message, "journal write failed; the disk refuses further writes");
                let mut q = lock(&self.shared.queue);
                q.failed = Some(f.clone());
                q.answer_pending(f);
            }
            if result.is_ok() {
                for p in &batch {
                    self.dirty.entry(Arc::as_ptr(&p.files) as usize).or_insert_with(|| p.files.clone());
                }
            }
            // With in-place writes outstanding, the checkpoint waits for the round that finds
            // none (the last one to end wakes the thread); fast commits stop meanwhile
            // (`begin_fast`), so it comes soon.
            if result.is_ok() && self.head - self.tail > self.shared.ring / 2 && lock(&self.shared.queue).placing == 0 {
                if let Err(f) = self.checkpoint() {
                    tracing::error!(path = %f.path.display(), error = %f.message, "journal checkpoint failed; the disk refuses further writes");
                    lock(&self.shared.queue).failed = Some(f);
                }
            }
            {
                let mut q = lock(&self.shared.queue);
                q.head = self.head;
                q.tail = self.tail;
                q.dirty = std::mem::take(&mut self.dirty);
                // Records that arrived during this commit mean writers overlap, whatever
                // this batch held: fast commits would then hold up the next group commit.
                q.lone = lone && q.pending.is_empty();
                q.busy = false;
            }
            // Handed to the syncer (answered by it once durable) after the token is back, so a
            // writer answered and writing again at once finds the journal idle.
            match result {
                Ok(()) if !batch.is_empty() => {
                    // Always handed over, even with nothing else waiting: syncing here when
                    // idle saves the syncer's wake-up at low load, but measured 5% fewer 4 KiB
                    // writes at queue depth 32 (records arriving during that sync wait for it).
                    lock(&self.shared.syncing).written.push_back(batch);
                    self.shared.sync_wake.notify_all();
                }
                Ok(()) => {}
                Err(f) => {
                    for p in batch {
                        let _ = p.done.send(Err(f.to_error()));
                    }
                }
            }
        }
    }

    /// Waits until the syncer has answered every commit handed to it: they are durable.
    fn await_synced(&self) {
        let mut s = lock(&self.shared.syncing);
        while !s.written.is_empty() || s.busy {
            s = self.shared.sync_wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn drain_failed(&self) {
        let mut q = lock(&self.shared.queue);
        loop {
            let failure = q.failed.clone();
            for p in q.pending.drain(..) {
                if let Some(f) = &failure {
                    let _ = p.done.send(Err(f.to_error()));
                }
            }
            if q.stop {
                return;
            }
            q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until every acknowledged data commit's in-place write is over: their data must
    /// be in the data files (and flushed with them by the fdatasync below) before the tail
    /// moves past their commits. The token is held, so no new one starts meanwhile. Gives up
    /// if the journal failed (a failed in-place write fails it), or when the store is
    /// stopping: the write that needed this checkpoint's room was not acknowledged.
    fn await_placed(&self) -> std::result::Result<(), Failure> {
        let mut q = lock(&self.shared.queue);
        loop {
            if let Some(f) = &q.failed {
                return Err(f.clone());
            }
            if q.placing == 0 {
                q.awaiting_placed = false;
                return Ok(());
            }
            if q.stop {
                q.awaiting_placed = false;
                return Err(self.fail(&io::Error::other("store closing with in-place writes outstanding")));
            }
            q.awaiting_placed = true;
            q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn fail(&self, e: &io::Error) -> Failure {
        Failure::new(&self.shared.path, e)
    }

    fn commit(&mut self, batch: &[Pending]) -> std::result::Result<(), Failure> {
        let latency = *lock(&self.shared.latency);
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        let records: Vec<&Record> = batch.iter().map(|p| &p.record).collect();
        let mut lsn = self.head;
        let mut buf = encode_commit(KIND_RECORDS, lsn, &records);
        let len = buf.as_ref().len() as u64;
        let wrap = lsn % self.shared.ring + len > self.shared.ring;
        let end = if wrap { lsn.next_multiple_of(self.shared.ring) + len } else { lsn + len };
        if end - self.tail > self.shared.ring {
            self.checkpoint()?;
        }
        if wrap {
            let skip = self.shared.ring - lsn % self.shared.ring;
            let mut w = encode_commit(KIND_WRAP, lsn, &[]);
            // The wrap header says how far to skip; its CRC covers only its own 4 KiB.
            w.as_mut()[16..20].copy_from_slice(&(skip as u32).to_le_bytes());
            seal_wrap(&mut w);
            self.shared.file.write_all_at(w.as_ref(), AREA + lsn % self.shared.ring).map_err(|e| self.fail(&e))?;
            lsn += skip;
            buf = encode_commit(KIND_RECORDS, lsn, &records);
        }
        self.shared.file.write_all_at(buf.as_ref(), AREA + lsn % self.shared.ring).map_err(|e| self.fail(&e))?;
        // The data writes that ran beside this journal write must be over before the
        // fdatasync that makes them durable.
        for d in batch.iter().filter_map(|p| p.data.as_ref()) {
            d.wait();
        }
        // Data files on file systems without O_DIRECT are in the page cache: sync them.
        let mut synced: Vec<usize> = Vec::new();
        for p in batch.iter().filter(|p| !p.files.direct) {
            let key = Arc::as_ptr(&p.files) as usize;
            if !synced.contains(&key) {
                synced.push(key);
                p.files.data.sync_data().map_err(|e| Failure::new(&p.files.data_path, &e))?;
                self.shared.fdatasyncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The journal's fdatasync is the syncer's (`sync_loop`), which answers the batch.
        self.head = lsn + len;
        Ok(())
    }

    /// Makes every journalled sums file durable, then moves the tail to the head.
    fn checkpoint(&mut self) -> std::result::Result<(), Failure> {
        self.await_placed()?;
        // The tail moves to the head: every commit before it must be durable (and answered
        // in order) first.
        self.await_synced();
        if let Some(f) = &lock(&self.shared.queue).failed {
            return Err(f.clone());
        }
        for (_, f) in self.dirty.drain() {
            f.sums.sync_data().map_err(|e| Failure::new(&f.sums_path, &e))?;
            self.shared.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        }
        write_super(&self.shared.file, &self.shared.path, self.shared.ring, self.head).map_err(|e| Failure {
            path: self.shared.path.clone(),
            kind: io::ErrorKind::Other,
            message: e.to_string(),
        })?;
        self.shared.file.sync_data().map_err(|e| self.fail(&e))?;
        self.shared.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(path = %self.shared.path.display(), from = self.tail, to = self.head, "journal checkpoint");
        self.tail = self.head;
        Ok(())
    }
}

/// A wrap commit's length field is the distance to the ring's end, not its 4 KiB buffer: the
/// CRC is recomputed over the buffer with that field set.
fn seal_wrap(w: &mut AlignedBuf) {
    let b = w.as_mut();
    b[24..28].fill(0);
    let c = crc(b);
    b[24..28].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fdatasync that makes a commit durable must come after the data write that ran
    /// beside it: the commit is not answered while that write is still running.
    #[tokio::test]
    async fn a_commit_waits_for_the_data_write_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = Opened::open(&dir.path().join("journal"), MIN_RING).expect("journal");
        let journal = opened.start(Arc::new(AtomicU64::new(0))).expect("committer");
        let files = Arc::new(Files::scratch(dir.path()));
        let record = Record { volume: 1, index: 0, nonce: 7, first: 0, entries: vec![3u8; ENTRY], data: None };
        let data = Arc::new(DataWrite::default());
        let mut committed = journal.enqueue_beside(record, files, data.clone());
        // Unanswered while the data write runs (a commit takes milliseconds here; this waits
        // far longer for one that must not come).
        let early = tokio::time::timeout(Duration::from_millis(500), &mut committed).await;
        assert!(early.is_err(), "the commit was answered before its data write was over: {early:?}");
        drop(DataWritten(data));
        let answer = tokio::time::timeout(Duration::from_secs(30), committed).await;
        assert!(matches!(answer, Ok(Ok(Ok(())))), "the commit was not answered after its data write: {answer:?}");
    }

    /// Under load (a record already waiting when a commit is written) the next commit's
    /// journal write does not wait for the previous commit's fdatasync, and neither commit is
    /// answered before an fdatasync that followed its write.
    #[tokio::test]
    async fn the_next_commit_is_written_during_the_previous_ones_fdatasync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = Opened::open(&dir.path().join("journal"), MIN_RING).expect("journal");
        let journal = opened.start(Arc::new(AtomicU64::new(0))).expect("committer");
        journal.set_latency(Duration::from_millis(300));
        *lock(&journal.shared.sync_latency) = Duration::from_millis(1500);
        let files = Arc::new(Files::scratch(dir.path()));
        let record = |first| Record { volume: 1, index: 0, nonce: 7, first, entries: vec![3u8; ENTRY], data: None };
        async fn written_past(j: &Journal, head: u64) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while j.head() <= head {
                assert!(tokio::time::Instant::now() < deadline, "a commit was never written");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let start = journal.head();
        let (tx, mut first) = tokio::sync::oneshot::channel();
        journal.enqueue(record(0), files.clone(), tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !journal.busy() {
            assert!(tokio::time::Instant::now() < deadline, "the first commit never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Queued while the first commit is being written.
        let (tx, second) = tokio::sync::oneshot::channel();
        journal.enqueue(record(1), files.clone(), tx);
        written_past(&journal, start).await;
        let after_first = journal.head();
        written_past(&journal, after_first).await;
        assert!(first.try_recv().is_err(), "the second commit was written only after the first one's fdatasync");
        let first = tokio::time::timeout(Duration::from_secs(30), first).await;
        assert!(matches!(first, Ok(Ok(Ok(())))), "first commit: {first:?}");
        let second = tokio::time::timeout(Duration::from_secs(30), second).await;
        assert!(matches!(second, Ok(Ok(Ok(())))), "second commit: {second:?}");
    }
}
