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
//! - `chunks/<volume>/<index>.meta` — `{version, chunk_size}` of the replica. Its existence is
//!   what makes the replica exist: it is written last on creation and removed first on
//!   deletion; `.data`/`.sums` files without it are removed at open.
//! - `chunks/<volume>/<index>.data` — sparse, `ceil(chunk_size / 4 KiB)` blocks long; the
//!   chunk's bytes at their offsets.
//! - `chunks/<volume>/<index>.sums` — 64 bytes per block: the *current* blake3 hash, then the
//!   *previous* one. Both zero means the block was never written (or was trimmed) and reads as
//!   zeros whatever the data file holds.
//!
//! `.meta`, `disk.json` and epoch files are replaced atomically (write a temporary, fsync,
//! rename, fsync the directory).
//!
//! # Writes and crash safety
//!
//! A write, under the replica's lock: reads the entries of the blocks it touches (one pread),
//! reads and verifies partial edge blocks (a corrupt edge is an error: we cannot merge into
//! bytes we cannot trust), computes the new hashes, pwrites the entries with *new → current,
//! old → previous* (one pwrite, the entries being contiguous), then pwrites the data; after
//! the lock is released, fdatasyncs both files before returning.
//!
//! A reader accepts a block whose data matches either slot. So if the process is killed
//! (SIGKILL, panic) at any instant, the page cache still holds whatever pwrites completed,
//! and every block reads back as its old or its new contents: killed before the sums pwrite,
//! nothing changed; between the two pwrites, the data still matches the previous slot;
//! during or after the data pwrite, each 4 KiB page holds old or new data, matching one slot.
//! A block written for the first time has an empty previous slot; while its data is still
//! the hole (all zeros) it reads as unwritten.
//!
//! Remaining window, on **power loss** (or kernel crash) only: the kernel does not order
//! writeback across the two files, nor within one, so before the fdatasyncs complete the data
//! of an in-flight write may reach the disk while its sums do not (a block then matches
//! neither slot), or a block may be torn where the device does not write 4 KiB atomically.
//! Such blocks belong to writes that were never acknowledged; they fail verification, read
//! as `Corrupt`, and are repaired from another replica (`block_sums` reports them as zero so
//! a catch-up copies them). Likewise, if a block's data was left matching the *previous* slot
//! by a crash and a second crash interrupts the next write of that same block between its two
//! pwrites, the block matches neither slot and is repaired the same way. Closing this window
//! would need an fdatasync between the two pwrites, doubling the latency of every write.
//!
//! An fdatasync error marks the replica failed until restart: after such an error Linux may
//! drop the dirty pages, and a later fdatasync would report success for lost data.
//!
//! # Concurrency
//!
//! Reads take the replica's lock shared and writes exclusive, but only for the preads and
//! pwrites (page-cache copies); hashing of whole blocks and the fdatasyncs happen outside it.
//! fdatasyncs are group-committed per replica: writers arriving while a sync runs share the
//! next one. Writes hold the volume epoch table shared for their whole duration, so a `fence`
//! returns only after every admitted older-epoch write has finished.

mod disk;
mod error;
mod replica;
mod scrub;
mod store;

#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use scrub::{ScrubReport, Scrubber};
pub use store::{ChunkStore, Config, DiskIdentity, Stats};
