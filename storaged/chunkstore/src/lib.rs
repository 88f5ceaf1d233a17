//! Chunk replicas on the local data disks of one node: their bytes, a blake3 checksum per
//! 4 KiB block, their versions, and the epochs that fence old writers of a volume. No
//! networking: the chunk service of `storaged` calls this library.
//!
//! # On-disk layout
//!
//! Each data directory ("disk", index = position in the list given to [`ChunkStore::open`]):
//!
//! - `disk.json` — `{format, disk, uuid}`. A directory labelled with another index is refused,
//!   so reordering the disks in the config cannot mix up replicas.
//! - `lock` — `flock`ed while a store has the directory open.
//! - `epochs/<volume>` — highest epoch seen for the volume, decimal. Every disk keeps every
//!   epoch (the store loads the maximum), so losing a disk loses no fencing record.
//! - `chunks/<volume>/<index>.meta` — `{version, chunk_size, nonce}` of the replica. Its
//!   existence is what makes the replica exist: it is written last on creation and removed
//!   first on deletion; `.data`/`.sums` files without it are removed at open. The nonce is
//!   random per creation, so journal records of a deleted replica never apply to a new one.
//! - `chunks/<volume>/<index>.data` — sparse, `ceil(chunk_size / 4 KiB)` blocks long; the
//!   chunk's bytes at their offsets. Read and written with `O_DIRECT` in whole blocks (the
//!   page cache is not used for replica data; file systems without `O_DIRECT` fall back to it).
//! - `chunks/<volume>/<index>.sums` — 64 bytes per block: the *current* blake3 hash, then the
//!   *previous* one. Both zero means the block was never written (or was trimmed) and reads as
//!   zeros whatever the data file holds.
//! - `journal` — the disk's journal of sum entries (see the `journal` module): what makes the
//!   `.sums` files durable between checkpoints, with one group commit for the whole disk.
//!
//! `.meta`, `disk.json` and epoch files are replaced atomically (write a temporary, fsync,
//! rename, fsync the directory).
//!
//! # Writes and crash safety
//!
//! A write, under the replica's lock: reads the entries of the blocks it touches (one pread),
//! reads and verifies partial edge blocks (a corrupt edge is an error: we cannot merge into
//! bytes we cannot trust), computes the new hashes, pwrites the entries with *new → current,
//! old → previous* into the `.sums` file (page cache), then writes the data in place with
//! `O_DIRECT`. After the lock is released it hands the entries to the disk's journal and
//! returns once that commit is durable: the commit's fdatasync flushes the device's write
//! cache, which also makes the data (written before it) durable. (A lone overwrite on an
//! idle journal writes its one-record commit itself with `RWF_DSYNC`; a small one puts its
//! data in that commit, a larger one writes its data with `RWF_DSYNC` too.) A write into blocks whose
//! allocation in the data file is not known to be durable fdatasyncs the data file first (see
//! `replica::Allocated`).
//!
//! A reader accepts a block whose data matches either slot. So if the process is killed
//! (SIGKILL, panic) at any instant, the page cache still holds the entries pwrite if it
//! completed, and every block reads back as its old or its new contents: killed before the
//! entries pwrite, nothing changed; between it and the data write, the data still matches the
//! previous slot; during or after the data write, each 4 KiB block holds old or new data (a
//! block is one sector-aligned 4 KiB write), matching one slot. A block written for the first
//! time has an empty previous slot; while its data is still the hole (all zeros) it reads as
//! unwritten.
//!
//! On **power loss** (or kernel crash), every acknowledged write is in the journal, and
//! replay at open rewrites those entries into the `.sums` files. What remains is the window of
//! writes that were never acknowledged: the kernel may have written their data but not their
//! entries (a block then matches neither slot), or a device may tear a 4 KiB write. Such
//! blocks fail verification, read as `Corrupt`, and are repaired from another replica
//! (`block_sums` reports them as zero so a catch-up copies them).
//!
//! An fdatasync error marks the replica (data file) or the whole disk (journal) failed until
//! restart: after such an error Linux may drop dirty state, and a later fdatasync would report
//! success for lost data.
//!
//! # Concurrency
//!
//! Reads take the replica's lock shared and writes exclusive, but only for the preads and
//! writes; hashing of whole blocks and the fdatasyncs happen outside it. Journal commits are
//! shared by every write on the disk that arrives while one is in flight. Writes hold the
//! volume epoch table shared for their whole duration, so a `fence` returns only after every
//! admitted older-epoch write has finished.

mod disk;
mod error;
mod journal;
mod replica;
mod scrub;
mod store;
mod uring;

#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use journal::{DEFAULT_RING as DEFAULT_JOURNAL_BYTES, MAX_RING as MAX_JOURNAL_BYTES, MIN_RING as MIN_JOURNAL_BYTES};
pub use scrub::{ScrubReport, Scrubber};
pub use store::{ChunkStore, Config, DiskIdentity, Stats};
