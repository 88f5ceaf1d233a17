//! Behaviour tests of the store, run on real files in temporary directories.

use crate::{ChunkStore, Error, Scrubber};
use basalt_types::{BlockSum, ChunkId, ErrorCode, BLOCK_SIZE};
use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// 1 MiB chunks (256 blocks) keep the tests fast.
const CS: u64 = 1 << 20;
const B: u64 = BLOCK_SIZE;
const VOL: u64 = 7;

fn chunk(index: u64) -> ChunkId {
    ChunkId { volume: VOL, index }
}

fn disk_paths(dir: &TempDir, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| dir.path().join(format!("disk{i}"))).collect()
}

/// Stores with the smallest journal: a new journal is written in full once.
async fn open(dir: &TempDir, n: usize) -> ChunkStore {
    let config = crate::Config { journal_bytes: crate::MIN_JOURNAL_BYTES, ..Default::default() };
    ChunkStore::open_with(disk_paths(dir, n), config).await.expect("open store")
}

/// Deterministic, non-repeating-per-block bytes, different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sum(data: &[u8]) -> BlockSum {
    *blake3::hash(data).as_bytes()
}

fn data_file(dir: &TempDir, disk: usize, c: ChunkId) -> PathBuf {
    dir.path().join(format!("disk{disk}/chunks/{}/{}.data", c.volume, c.index))
}

fn flip_byte(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open data file");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).expect("write byte");
}

/// A write plus the same write applied to an in-memory model of the chunk.
async fn write_model(s: &ChunkStore, model: &mut [u8], c: ChunkId, offset: u64, data: Vec<u8>) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    s.write(0, c, CS, 1, 1, offset, Bytes::from(data)).await.expect("write");
}

#[tokio::test]
async fn round_trip_at_various_offsets_and_alignments() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(0);
    let mut model = vec![0u8; CS as usize];
    let writes: &[(u64, usize)] = &[
        (0, 4096),              // one aligned block
        (8192, 3 * 4096),       // several aligned blocks
        (100, 50),              // inside one block
        (4000, 200),            // across a block boundary
        (20_000, 10_000),       // unaligned both ends, whole blocks in the middle
        (CS - 1, 1),            // last byte
        (CS - 4096 - 10, 4106), // ends at the chunk's end, unaligned start
        (0, CS as usize),       // the whole chunk
        (12_345, 1),            // one byte over written data
        (65_536, 131_072),      // aligned 128 KiB over existing data
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        write_model(&s, &mut model, c, off, pattern(i as u64 + 1, len)).await;
        let all = s.read(0, c, 1, 0, CS).await.expect("read all");
        assert!(all[..] == model[..], "whole chunk differs after write {i} ({off}+{len})");
        let (ro, rl) = (off.saturating_sub(7), (len as u64 + 13).min(CS - off.saturating_sub(7)));
        let part = s.read(0, c, 1, ro, rl).await.expect("read part");
        assert!(part[..] == model[ro as usize..(ro + rl) as usize], "partial read after write {i}");
    }
    assert!(s.read(0, c, 1, 5, 0).await.expect("empty read").is_empty());
}

#[tokio::test]
async fn unwritten_blocks_read_as_zeros_and_missing_replica_is_not_found() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(1);
    let err = s.read(0, c, 0, 0, 10).await.expect_err("no replica yet");
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::NotFound);
    s.write(0, c, CS, 1, 1, 10 * B, Bytes::from(vec![0xab; 4096])).await.expect("write");
    let z = s.read(0, c, 1, 0, 10 * B).await.expect("read unwritten");
    assert!(z.iter().all(|&b| b == 0));
    let (_, sums) = s.block_sums(0, c).await.expect("sums");
    assert_eq!(sums.len(), (CS / B) as usize);
    assert_eq!(sums.iter().filter(|s| **s != [0u8; 32]).count(), 1);
    assert_eq!(sums[10], sum(&[0xab; 4096]));
}

#[tokio::test]
async fn flipped_byte_is_reported_scrubbed_and_repaired() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(2);
    let data = pattern(9, 16 * B as usize);
    s.write(0, c, CS, 1, 1, 0, Bytes::from(data.clone())).await.expect("write");
    flip_byte(&data_file(&dir, 0, c), 3 * B + 17);

    let err = s.read(0, c, 1, 0, 16 * B).await.expect_err("corrupt read");
    match &err {
        Error::Corrupt { chunk: ch, blocks } => {
            assert_eq!(*ch, c);
            assert_eq!(blocks, &vec![3]);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(err.code(), ErrorCode::Corrupt);
    // Untouched blocks still read.
    assert!(s.read(0, c, 1, 4 * B, B).await.expect("good block")[..] == data[4 * B as usize..5 * B as usize]);
    // A partial write cannot merge into the bad block.
    let err = s.write(0, c, CS, 1, 1, 3 * B + 1, Bytes::from_static(b"x")).await.expect_err("rmw on corrupt");
    assert!(matches!(err, Error::Corrupt { ref blocks, .. } if blocks == &vec![3]), "{err}");

    assert_eq!(s.scrub_replica(0, c).await.expect("scrub"), vec![3]);
    let found = Arc::new(Mutex::new(Vec::new()));
    let f2 = found.clone();
    let report = Scrubber::new(s.clone())
        .scrub_all(0, move |d, ch, blocks| f2.lock().expect("lock").push((d, ch, blocks)))
        .await;
    assert_eq!(*found.lock().expect("lock"), vec![(0, c, vec![3])]);
    assert_eq!((report.replicas, report.bad_replicas, report.bad_blocks), (1, 1, 1));

    let (_, sums) = s.block_sums(0, c).await.expect("sums");
    assert_eq!(sums[3], [0u8; 32], "bad block reported as zero so catch-up copies it");
    assert_eq!(sums[2], sum(&data[2 * B as usize..3 * B as usize]));
    assert!(matches!(s.read_blocks(0, c, 1, 2, 3).await, Err(Error::Corrupt { .. })));

    // Repair from a good copy of block 3.
    let good = data[3 * B as usize..4 * B as usize].to_vec();
    let n = s
        .write_blocks(0, c, CS, 1, 3, vec![sum(&good)], Bytes::from(good), &|_| false)
        .await
        .expect("repair");
    assert_eq!(n, 1);
    assert!(s.read(0, c, 1, 0, 16 * B).await.expect("read repaired")[..] == data[..]);
    assert!(s.scrub_replica(0, c).await.expect("scrub").is_empty());
    let (sums, bytes) = s.read_blocks(0, c, 1, 2, 3).await.expect("read_blocks");
    assert!(bytes[..] == data[2 * B as usize..5 * B as usize]);
    assert_eq!(sums[1], sum(&data[3 * B as usize..4 * B as usize]));
}

#[tokio::test]
async fn write_blocks_refuses_data_not_matching_its_sums() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(3);
    let data = pattern(1, 2 * B as usize);
    let sums = vec![sum(&data[..B as usize]), sum(b"something else")];
    let err = s.write_blocks(0, c, CS, 1, 0, sums, Bytes::from(data), &|_| false).await.expect_err("bad sums");
    assert!(matches!(err, Error::Corrupt { ref blocks, .. } if blocks == &vec![1]), "{err}");
    assert!(s.version(0, c).is_none(), "nothing created");
}

#[tokio::test]
async fn stale_versions_are_refused() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(4);
    s.write(0, c, CS, 5, 1, 0, Bytes::from(vec![1; 10])).await.expect("write v5");
    let err = s.write(0, c, CS, 4, 1, 0, Bytes::from(vec![2; 10])).await.expect_err("v4 write");
    assert!(matches!(err, Error::StaleVersion { have: 5, got: 4 }), "{err}");
    let err = s.read(0, c, 6, 0, 10).await.expect_err("read wanting v6");
    assert!(matches!(err, Error::StaleReplica { have: 5, want: 6 }), "{err}");
    s.set_version(0, c, 6).await.expect("raise");
    s.set_version(0, c, 3).await.expect("lower is ignored");
    assert_eq!(s.version(0, c), Some(6));
    assert_eq!(&s.read(0, c, 6, 0, 10).await.expect("read v6")[..], &[1; 10]);
    // A newer writer raises the version.
    s.write(0, c, CS, 8, 1, 0, Bytes::from(vec![3; 10])).await.expect("write v8");
    assert_eq!(s.version(0, c), Some(8));
    let err = s.write_blocks(0, c, CS, 7, 0, vec![[0; 32]], Bytes::from(vec![0; 4096]), &|_| false).await;
    assert!(matches!(err, Err(Error::StaleVersion { have: 8, got: 7 })));
    assert!(matches!(
        s.set_version(0, chunk(99), 1).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn fenced_epochs_are_refused_and_survive_reopen() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(5);
    {
        let s = open(&dir, 2).await;
        s.write(0, c, CS, 1, 3, 0, Bytes::from(vec![1; 10])).await.expect("epoch 3");
        assert_eq!(s.epoch(VOL).await, 3);
        let err = s.write(0, c, CS, 1, 2, 0, Bytes::from(vec![2; 10])).await.expect_err("epoch 2");
        assert!(matches!(err, Error::Fenced { volume: VOL, have: 3, got: 2 }), "{err}");
        assert_eq!(err.code(), ErrorCode::Fenced);
        s.fence(VOL, 10).await.expect("fence");
        s.fence(VOL, 4).await.expect("older fence is a no-op");
        assert_eq!(s.epoch(VOL).await, 10);
        let err = s.write(1, c, CS, 1, 9, 0, Bytes::from(vec![2; 10])).await.expect_err("epoch 9");
        assert!(matches!(err, Error::Fenced { have: 10, got: 9, .. }), "{err}");
        assert_eq!(s.epoch(VOL + 1).await, 0);
    }
    // Losing one disk's record still leaves the other's.
    std::fs::remove_file(dir.path().join(format!("disk0/epochs/{VOL}"))).expect("remove epoch record");
    let s = open(&dir, 2).await;
    assert_eq!(s.epoch(VOL).await, 10);
    assert!(matches!(s.write(0, c, CS, 1, 9, 0, Bytes::from(vec![2; 10])).await, Err(Error::Fenced { .. })));
    s.write(0, c, CS, 1, 10, 0, Bytes::from(vec![4; 10])).await.expect("epoch 10");
    assert_eq!(&s.read(0, c, 1, 0, 10).await.expect("read")[..], &[4; 10]);
}

#[tokio::test]
async fn killed_between_sums_and_data_reads_back_old_data() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(6);
    let old = pattern(1, 4 * B as usize);
    {
        let s = open(&dir, 1).await;
        s.write(0, c, CS, 1, 1, 0, Bytes::from(old.clone())).await.expect("old data");
        // Aligned overwrite of blocks 0..2, and an unaligned one across blocks 2..3, each
        // "killed" after its sums reached the file but before its data did.
        s.inner().hooks.crash_after_sums.store(true, Ordering::SeqCst);
        s.write(0, c, CS, 1, 1, 0, Bytes::from(pattern(2, 2 * B as usize))).await.expect_err("crash 1");
        s.inner().hooks.crash_after_sums.store(true, Ordering::SeqCst);
        s.write(0, c, CS, 1, 1, 2 * B + 100, Bytes::from(pattern(3, 5000))).await.expect_err("crash 2");
        // First write of a block: the previous state is "unwritten".
        s.inner().hooks.crash_after_sums.store(true, Ordering::SeqCst);
        s.write(0, c, CS, 1, 1, 10 * B, Bytes::from(pattern(4, B as usize))).await.expect_err("crash 3");
    }
    let s = open(&dir, 1).await;
    assert!(s.read(0, c, 1, 0, 4 * B).await.expect("read after crash")[..] == old[..]);
    assert!(s.read(0, c, 1, 10 * B, B).await.expect("read fresh block")[..].iter().all(|&b| b == 0));
    assert!(s.scrub_replica(0, c).await.expect("scrub").is_empty());
    let (_, sums) = s.block_sums(0, c).await.expect("sums");
    assert_eq!(sums[0], sum(&old[..B as usize]), "sums describe the data actually there");
    assert_eq!(sums[10], [0; 32]);
    // Writing again works normally, partial writes included.
    let new = pattern(5, 4 * B as usize);
    s.write(0, c, CS, 1, 1, 0, Bytes::from(new.clone())).await.expect("rewrite");
    s.write(0, c, CS, 1, 1, 2 * B + 100, Bytes::from(vec![7; 5000])).await.expect("partial rewrite");
    let mut model = new;
    model[2 * B as usize + 100..2 * B as usize + 5100].fill(7);
    assert!(s.read(0, c, 1, 0, 4 * B).await.expect("read")[..] == model[..]);
}

#[tokio::test]
async fn create_makes_an_empty_replica_that_survives_reopen() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(7);
    {
        let s = open(&dir, 1).await;
        s.create(0, c, CS, 3).await.expect("create");
        assert_eq!(s.version(0, c), Some(3));
        let z = s.read(0, c, 3, 0, 2 * B).await.expect("read empty replica");
        assert!(z.iter().all(|&b| b == 0));
        // Creating again raises the version and keeps the data.
        s.write(0, c, CS, 3, 1, 0, Bytes::from(vec![7u8; 4096])).await.expect("write");
        s.create(0, c, CS, 4).await.expect("create again");
        assert_eq!(s.read(0, c, 4, 0, B).await.expect("read")[..], [7u8; 4096][..]);
        let err = s.create(0, c, CS, 2).await.expect_err("older version refused");
        assert_eq!(err.code(), ErrorCode::StaleVersion);
    }
    let s = open(&dir, 1).await;
    assert_eq!(s.version(0, c), Some(4));
}

#[tokio::test]
async fn reopen_keeps_replicas_versions_and_data() {
    let dir = TempDir::new().expect("tempdir");
    let mut expect = Vec::new();
    {
        let s = open(&dir, 2).await;
        for i in 0..6u64 {
            let disk = (i % 2) as u32;
            let c = ChunkId { volume: 1 + i % 3, index: i };
            let data = pattern(i, 3 * B as usize + 11);
            s.write(disk, c, CS, i + 1, 0, i * 1000, Bytes::from(data.clone())).await.expect("write");
            expect.push((disk, c, i + 1, i * 1000, data));
        }
        let uuids: Vec<String> = s.disks().into_iter().map(|d| d.uuid).collect();
        assert_ne!(uuids[0], uuids[1]);
        // A second store cannot open the same directories.
        let err = ChunkStore::open(disk_paths(&dir, 2)).await.err().expect("second open refused");
        assert!(matches!(err, Error::BadDisk(_)), "{err}");
    }
    // Leftovers of an interrupted creation are cleaned up, not listed.
    let vdir = dir.path().join("disk0/chunks/1");
    std::fs::write(vdir.join("77.data"), b"junk").expect("junk");
    std::fs::write(vdir.join("78.meta.tmp"), b"junk").expect("junk");

    let s = open(&dir, 2).await;
    let mut want: Vec<_> = expect.iter().map(|(d, c, v, _, _)| (*d, *c, *v)).collect();
    want.sort_unstable();
    assert_eq!(s.list(), want);
    for (disk, c, v, off, data) in &expect {
        let got = s.read(*disk, *c, *v, *off, data.len() as u64).await.expect("read after reopen");
        assert!(got[..] == data[..]);
    }
    assert!(!vdir.join("77.data").exists() && !vdir.join("78.meta.tmp").exists());
    let usage = s.usage().await.expect("usage");
    assert_eq!(usage.len(), 2);
    assert_eq!(usage.iter().map(|u| u.chunks).sum::<u64>(), 6);
    assert!(usage.iter().all(|u| u.total_bytes > 0 && u.free_bytes <= u.total_bytes));
    drop(s);

    // Swapping the disks' order is refused.
    let mut swapped = disk_paths(&dir, 2);
    swapped.reverse();
    let err = ChunkStore::open(swapped).await.err().expect("swapped disks refused");
    assert!(matches!(err, Error::BadDisk(ref m) if m.contains("disk 1")), "{err}");
}

#[tokio::test]
async fn catch_up_never_overwrites_blocks_clients_wrote_during_sync() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(8);
    // The target does not exist yet when the sync starts.
    s.begin_sync(0, c).expect("begin");
    let client = pattern(1, B as usize);
    s.write(0, c, CS, 2, 1, 2 * B, Bytes::from(client.clone())).await.expect("client write");
    s.trim(0, c, 2, 1, 4 * B, B).await.expect("client trim");
    // The copy of blocks 0..6 from the source, fetched before the client's write.
    let source = pattern(2, 6 * B as usize);
    let sums: Vec<BlockSum> = source.chunks(B as usize).map(sum).collect();
    let n = s
        .write_blocks(0, c, CS, 2, 0, sums.clone(), Bytes::from(source.clone()), &|b| b == 5)
        .await
        .expect("copy");
    assert_eq!(n, 3, "blocks 0, 1, 3: 2 and 4 written by the client, 5 skipped by the caller");
    let got = s.read(0, c, 2, 0, 6 * B).await.expect("read");
    let blk = |i: u64| (i * B) as usize..((i + 1) * B) as usize;
    assert!(got[blk(0)] == source[blk(0)] && got[blk(1)] == source[blk(1)] && got[blk(3)] == source[blk(3)]);
    assert!(got[blk(2)] == client[..]);
    assert!(got[blk(4)].iter().all(|&b| b == 0) && got[blk(5)].iter().all(|&b| b == 0));
    s.end_sync(0, c);
    // Outside a sync nothing is protected.
    let n = s.write_blocks(0, c, CS, 2, 0, sums, Bytes::from(source.clone()), &|_| false).await.expect("copy");
    assert_eq!(n, 6);
    assert!(s.read(0, c, 2, 0, 6 * B).await.expect("read")[..] == source[..]);
    // A zero sum makes the block unwritten.
    s.write_blocks(0, c, CS, 2, 1, vec![[0; 32]], Bytes::from(vec![0; B as usize]), &|_| false).await.expect("zero");
    assert!(s.read(0, c, 2, B, B).await.expect("read")[..].iter().all(|&b| b == 0));
    assert_eq!(s.block_sums(0, c).await.expect("sums").1[1], [0; 32]);
}

#[tokio::test]
async fn trim_unwrites_whole_blocks_and_zeroes_edges() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(9);
    let data = pattern(3, CS as usize);
    s.write(0, c, CS, 1, 1, 0, Bytes::from(data.clone())).await.expect("fill");
    let path = data_file(&dir, 0, c);
    let allocated_before = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).expect("stat"));

    let (off, len) = (B + 100, 200 * B);
    s.trim(0, c, 1, 1, off, len).await.expect("trim");
    let mut model = data;
    model[off as usize..(off + len) as usize].fill(0);
    assert!(s.read(0, c, 1, 0, CS).await.expect("read")[..] == model[..]);
    let (_, sums) = s.block_sums(0, c).await.expect("sums");
    assert_ne!(sums[1], [0; 32], "partial edge keeps data, so stays written");
    assert_eq!(sums[1], sum(&model[B as usize..2 * B as usize]));
    assert!(sums[2..201].iter().all(|s| *s == [0; 32]), "whole blocks are unwritten");
    assert_ne!(sums[201], [0; 32]);
    let allocated_after = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).expect("stat"));
    assert!(allocated_after < allocated_before, "hole punched: {allocated_after} < {allocated_before}");

    // Whatever the data file holds under an unwritten block, it reads as zeros.
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.write_all_at(&[0xee; 4096], 50 * B).expect("scribble");
    assert!(s.read(0, c, 1, 50 * B, B).await.expect("read")[..].iter().all(|&b| b == 0));
    // And a partial write into it merges with zeros, not with the scribble.
    s.write(0, c, CS, 1, 1, 50 * B + 10, Bytes::from_static(b"abc")).await.expect("partial write");
    let got = s.read(0, c, 1, 50 * B, B).await.expect("read");
    let mut want = vec![0u8; B as usize];
    want[10..13].copy_from_slice(b"abc");
    assert!(got[..] == want[..]);
    assert!(s.scrub_replica(0, c).await.expect("scrub").is_empty());
    // Trimming a missing replica is a no-op.
    s.trim(0, chunk(1000), 1, 1, 0, B).await.expect("trim missing");
    assert!(s.version(0, chunk(1000)).is_none());
    // Trims are fenced and version-checked like writes.
    s.fence(VOL, 5).await.expect("fence");
    assert!(matches!(s.trim(0, c, 1, 4, 0, B).await, Err(Error::Fenced { have: 5, got: 4, .. })));
    s.set_version(0, c, 3).await.expect("raise");
    assert!(matches!(s.trim(0, c, 2, 5, 0, B).await, Err(Error::StaleVersion { have: 3, got: 2 })));
    assert!(s.read(0, c, 3, 0, B).await.expect("read")[..] == model[..B as usize]);
}

#[tokio::test]
async fn concurrent_writes_to_many_replicas_share_journal_commits() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    const CHUNKS: u64 = 8;
    const PER_CHUNK: u64 = 8;
    const WRITES: u64 = CHUNKS * PER_CHUNK;
    // First writes allocate their blocks and sync the data file; overwrites need only the
    // journal, which is what this test is about.
    for k in 0..CHUNKS {
        s.write(0, chunk(10 + k), CS, 1, 1, 0, Bytes::from(vec![1; (PER_CHUNK * B) as usize])).await.expect("fill");
    }
    // A disk whose flush takes 5 ms, so writers overlap as they do on real hardware.
    s.set_sync_latency(Duration::from_millis(5));
    let before = s.stats().fdatasyncs;
    let tasks: Vec<_> = (0..WRITES)
        .map(|i| {
            let s = s.clone();
            let (c, at) = (chunk(10 + i % CHUNKS), (i / CHUNKS) * B);
            tokio::spawn(async move { s.write(0, c, CS, 1, 1, at, Bytes::from(pattern(i, B as usize))).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("write");
    }
    let syncs = s.stats().fdatasyncs - before;
    assert!(syncs < WRITES / 2, "{syncs} fdatasyncs for {WRITES} writes");
    assert!(syncs >= 1);
    for i in 0..WRITES {
        let (c, at) = (chunk(10 + i % CHUNKS), (i / CHUNKS) * B);
        assert!(s.read(0, c, 1, at, B).await.expect("read")[..] == pattern(i, B as usize)[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_chunk_lose_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(11);
    // Each task owns an unaligned 10 000-byte range, so neighbours share edge blocks and race
    // on their read-modify-write.
    const TASKS: u64 = 32;
    const RANGE: u64 = 10_000;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                let base = t * RANGE;
                let mut off = 0;
                let mut step = 0;
                while off < RANGE {
                    let len = [1, 700, 4096, 3000, 5000][(t as usize + step) % 5].min(RANGE - off);
                    let data = pattern(t * 1000 + step as u64, len as usize);
                    s.write(0, c, CS, 1, 1, base + off, Bytes::from(data)).await?;
                    // Readers run alongside and must never see a checksum failure.
                    s.read(0, c, 1, base.saturating_sub(5000), 12_000).await?;
                    off += len;
                    step += 1;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("task");
    }
    let mut model = vec![0u8; CS as usize];
    for t in 0..TASKS {
        let (base, mut off, mut step) = (t * RANGE, 0, 0);
        while off < RANGE {
            let len = [1, 700, 4096, 3000, 5000][(t as usize + step) % 5].min(RANGE - off);
            let at = (base + off) as usize;
            model[at..at + len as usize].copy_from_slice(&pattern(t * 1000 + step as u64, len as usize));
            off += len;
            step += 1;
        }
    }
    assert!(s.read(0, c, 1, 0, CS).await.expect("read")[..] == model[..]);
    assert!(s.scrub_replica(0, c).await.expect("scrub").is_empty());
}

#[tokio::test]
async fn delete_and_delete_volume_remove_replicas() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 2).await;
    let a = ChunkId { volume: 1, index: 0 };
    let b = ChunkId { volume: 1, index: 1 };
    let other = ChunkId { volume: 2, index: 0 };
    for (disk, c) in [(0, a), (1, b), (0, other)] {
        s.write(disk, c, CS, 1, 1, 0, Bytes::from(vec![9; 100])).await.expect("write");
    }
    s.delete(0, a).await.expect("delete");
    s.delete(0, a).await.expect("delete again");
    assert!(matches!(s.read(0, a, 0, 0, 1).await, Err(Error::NotFound { .. })));
    assert!(!data_file(&dir, 0, a).exists());
    assert_eq!(s.list(), vec![(0, other, 1), (1, b, 1)]);
    s.delete_volume(1).await.expect("delete volume");
    assert_eq!(s.list(), vec![(0, other, 1)]);
    assert!(!dir.path().join("disk1/chunks/1").exists());
    // A deleted replica can be written again from scratch.
    s.write(0, a, CS, 1, 1, 0, Bytes::from(vec![5; 10])).await.expect("recreate");
    assert_eq!(&s.read(0, a, 1, 0, 20).await.expect("read")[..], &[[5u8; 10], [0u8; 10]].concat()[..]);
    drop(s);
    let s = open(&dir, 2).await;
    assert_eq!(s.list(), vec![(0, a, 1), (0, other, 1)]);
}

#[tokio::test]
async fn out_of_range_and_bad_arguments_are_refused() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(12);
    let err = s.write(0, c, CS, 1, 1, CS - 1, Bytes::from(vec![0; 2])).await.expect_err("past end");
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    s.write(0, c, CS, 1, 1, 0, Bytes::from(vec![0; 2])).await.expect("write");
    assert!(matches!(s.read(0, c, 1, CS - 1, 2).await, Err(Error::OutOfRange { .. })));
    assert!(matches!(
        s.write(0, c, 2 * CS, 1, 1, 0, Bytes::from(vec![0; 2])).await,
        Err(Error::ChunkSizeMismatch { have: CS, got: _ })
    ));
    assert!(matches!(s.write(3, c, CS, 1, 1, 0, Bytes::from(vec![0; 2])).await, Err(Error::UnknownDisk(3))));
    assert!(matches!(s.read_blocks(0, c, 1, CS / B - 1, 2).await, Err(Error::OutOfRange { .. })));
    assert!(matches!(s.trim(0, c, 1, 1, CS, 1).await, Err(Error::OutOfRange { .. })));
}

#[tokio::test]
async fn scrubber_keeps_to_its_rate_limit() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    for i in 0..2 {
        s.write(0, chunk(20 + i), CS, 1, 1, 0, Bytes::from(pattern(i, CS as usize))).await.expect("fill");
    }
    let rate = 8 << 20; // 8 MiB/s over 2 MiB: at least 250 ms
    let start = Instant::now();
    let report = Scrubber::new(s.clone()).scrub_all(rate, |_, _, _| panic!("no bad blocks")).await;
    let elapsed = start.elapsed();
    assert_eq!(report.bytes_read, 2 * CS);
    assert_eq!(report.replicas, 2);
    assert!(elapsed >= Duration::from_millis(240), "took {elapsed:?}");
}

#[tokio::test]
async fn open_files_are_bounded_and_reopened_on_demand() {
    let dir = TempDir::new().expect("tempdir");
    let s = ChunkStore::open_with(disk_paths(&dir, 1), crate::Config { max_open_replicas: 2, ..Default::default() }).await.expect("open");
    for i in 0..5 {
        s.write(0, chunk(30 + i), CS, 1, 1, i * 100, Bytes::from(pattern(i, 5000))).await.expect("write");
        assert!(s.stats().open_replicas <= 2);
    }
    for i in 0..5 {
        let got = s.read(0, chunk(30 + i), 1, i * 100, 5000).await.expect("read");
        assert!(got[..] == pattern(i, 5000)[..]);
        assert!(s.stats().open_replicas <= 2);
    }
}

fn sums_file(dir: &TempDir, disk: usize, c: ChunkId) -> PathBuf {
    dir.path().join(format!("disk{disk}/chunks/{}/{}.sums", c.volume, c.index))
}

/// What a power loss can leave: the replica's sums file never written back (all zeros).
fn lose_sums(dir: &TempDir, c: ChunkId) {
    let sums = sums_file(dir, 0, c);
    let len = std::fs::metadata(&sums).expect("stat").len();
    std::fs::write(&sums, vec![0u8; len as usize]).expect("wipe sums");
}

/// Reopens the store (replaying its journal) and checks that the replica's first `blocks`
/// blocks read back as `model` and that a scrub finds nothing wrong.
async fn reopen_and_check(dir: &TempDir, c: ChunkId, model: &[u8], blocks: u64, what: &str) {
    let s = open(dir, 1).await;
    let got = s.read(0, c, 1, 0, blocks * B).await.expect("read after replay");
    assert!(got[..] == model[..(blocks * B) as usize], "{what}");
    assert!(s.scrub_replica(0, c).await.expect("scrub").is_empty());
}

/// Power loss before the kernel wrote the sums file back: the journal brings the sums back.
#[tokio::test]
async fn journal_restores_sums_lost_from_the_page_cache() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(30);
    let mut model = vec![0u8; CS as usize];
    {
        let s = open(&dir, 1).await;
        write_model(&s, &mut model, c, 0, pattern(1, 3 * B as usize)).await;
        write_model(&s, &mut model, c, B + 100, pattern(2, 5000)).await;
        s.trim(0, c, 1, 1, 2 * B, B).await.expect("trim");
        model[2 * B as usize..3 * B as usize].fill(0);
    }
    // The data in place, the sums file never written back.
    lose_sums(&dir, c);
    reopen_and_check(&dir, c, &model, 4, "replay did not restore the sums").await;
}

/// A lone overwrite commits its sums itself (no committer thread, no fdatasync) and that
/// commit is what a power loss leaves: the journal still brings the sums back.
#[tokio::test]
async fn lone_overwrites_commit_themselves_and_replay() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(33);
    let mut model = vec![0u8; CS as usize];
    {
        let s = open(&dir, 1).await;
        // The first write allocates the blocks (the blocking path and the thread's commit).
        write_model(&s, &mut model, c, 0, pattern(1, 8 * B as usize)).await;
        let before = s.stats();
        for i in 0..8u64 {
            write_model(&s, &mut model, c, (i * 5 % 8) * B, pattern(10 + i, B as usize)).await;
        }
        let after = s.stats();
        assert_eq!(after.fast_commits - before.fast_commits, 8, "lone overwrites did not commit themselves");
        assert_eq!(after.fdatasyncs, before.fdatasyncs, "a self-committed overwrite fdatasynced");
    }
    lose_sums(&dir, c);
    reopen_and_check(&dir, c, &model, 8, "replay did not restore the fast commits' sums").await;
}

/// A write queued while a lone writer's own commit holds the journal does not wake the
/// committer thread (it could not commit yet); it is committed once that commit is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_queued_behind_a_fast_commit_is_committed_after_it() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(36);
    let s = Arc::new(open(&dir, 1).await);
    s.write(0, c, CS, 1, 1, 0, Bytes::from(pattern(1, 4 * B as usize))).await.expect("allocating write");
    let before = s.stats().fast_commits;
    s.set_sync_latency(Duration::from_millis(300));
    let first = {
        let s = s.clone();
        tokio::spawn(async move { s.write(0, c, CS, 1, 1, B, Bytes::from(pattern(2, B as usize))).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !s.journal_busy() {
        assert!(tokio::time::Instant::now() < deadline, "the lone overwrite never took the journal");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = s.write(0, c, CS, 1, 1, 2 * B, Bytes::from(pattern(3, B as usize)));
    let second = tokio::time::timeout(Duration::from_secs(20), second).await;
    assert!(matches!(second, Ok(Ok(()))), "the queued write was not committed: {second:?}");
    first.await.expect("task").expect("first write");
    assert_eq!(s.stats().fast_commits - before, 1, "only the first write should have committed itself");
    let got = s.read(0, c, 1, B, 2 * B).await.expect("read");
    assert_eq!(&got[..B as usize], &pattern(2, B as usize)[..]);
    assert_eq!(&got[B as usize..], &pattern(3, B as usize)[..]);
}

/// A small lone overwrite carries its data in its commit: after a power loss that kept neither
/// its in-place data nor its sums, replay writes both back.
#[tokio::test]
async fn small_lone_overwrites_carry_their_data_and_replay_it() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(34);
    let mut model = vec![0u8; CS as usize];
    {
        let s = open(&dir, 1).await;
        write_model(&s, &mut model, c, 0, pattern(1, 8 * B as usize)).await;
        let before = s.stats().fast_commits;
        // Block 2 twice (the later data wins at replay), then blocks 5-6.
        write_model(&s, &mut model, c, 2 * B, pattern(2, B as usize)).await;
        write_model(&s, &mut model, c, 2 * B, pattern(3, B as usize)).await;
        write_model(&s, &mut model, c, 5 * B, pattern(4, 2 * B as usize)).await;
        assert_eq!(s.stats().fast_commits - before, 3, "small overwrites did not commit themselves");
    }
    // The in-place writes never reached the disk, nor the sums file.
    let f = std::fs::OpenOptions::new().write(true).open(data_file(&dir, 0, c)).expect("open data");
    f.write_all_at(&pattern(1, 8 * B as usize), 0).expect("old data back");
    lose_sums(&dir, c);
    reopen_and_check(&dir, c, &model, 8, "replay did not restore the journalled data").await;
}

/// Replay never puts a data commit's blocks over a later write of the same blocks (here a
/// partial write, whose record carries sums only and whose data is already in place).
#[tokio::test]
async fn replayed_data_does_not_overwrite_a_later_write() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(35);
    let mut model = vec![0u8; CS as usize];
    {
        let s = open(&dir, 1).await;
        write_model(&s, &mut model, c, 0, pattern(1, 4 * B as usize)).await;
        let before = s.stats().fast_commits;
        write_model(&s, &mut model, c, B, pattern(2, B as usize)).await;
        assert_eq!(s.stats().fast_commits - before, 1);
        write_model(&s, &mut model, c, B + 100, pattern(3, 300)).await;
    }
    reopen_and_check(&dir, c, &model, 4, "replay put older data over a later write").await;
}

/// Many commits through a small ring: it wraps and checkpoints, and a reopen still finds
/// every write (replaying only what came after the last checkpoint).
#[tokio::test]
async fn small_journal_wraps_checkpoints_and_replays() {
    let dir = TempDir::new().expect("tempdir");
    let config = || crate::Config { journal_bytes: crate::journal::MIN_RING, ..Default::default() };
    let c = chunk(31);
    let mut model = vec![0u8; CS as usize];
    {
        let s = ChunkStore::open_with(disk_paths(&dir, 1), config()).await.expect("open");
        // 3000 commits of at least 4 KiB each: several laps of an 8 MiB ring.
        for i in 0..3000u64 {
            let at = (i * 7919 % 64) * B;
            write_model(&s, &mut model, c, at, pattern(i, B as usize)).await;
        }
    }
    let sums = sums_file(&dir, 0, c);
    let before = std::fs::read(&sums).expect("read sums");
    {
        let s = ChunkStore::open_with(disk_paths(&dir, 1), config()).await.expect("reopen");
        let got = s.read(0, c, 1, 0, 64 * B).await.expect("read");
        assert!(got[..] == model[..64 * B as usize]);
    }
    assert_eq!(std::fs::read(&sums).expect("read sums"), before, "replay changed settled sums");
}

/// A journal record of a deleted replica is not replayed onto a new one with the same id.
#[tokio::test]
async fn journal_records_of_a_deleted_replica_are_not_replayed() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(32);
    {
        let s = open(&dir, 1).await;
        s.write(0, c, CS, 1, 1, 0, Bytes::from(pattern(5, B as usize))).await.expect("write");
        s.delete(0, c).await.expect("delete");
        s.create(0, c, CS, 2).await.expect("create again");
    }
    let s = open(&dir, 1).await;
    let got = s.read(0, c, 2, 0, B).await.expect("read");
    assert!(got.iter().all(|&b| b == 0), "old record replayed onto the new replica");
}

/// Sums computed by the writer are used as they are; a count that does not match the whole
/// blocks of the write is refused before anything is written.
#[tokio::test]
async fn writer_computed_sums_are_checked_for_count_and_used() {
    let dir = TempDir::new().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(33);
    let data = pattern(9, 3 * B as usize + 100);
    let offset = B - 50; // partial first block, three whole blocks, partial last block
    let sums = basalt_types::full_block_sums(offset, &data);
    assert_eq!(sums.len(), 3);
    let wrong = vec![sums[0]];
    let refused = s.write_with_sums(0, c, CS, 1, 1, offset, Bytes::from(data.clone()), wrong).await;
    assert!(matches!(refused, Err(Error::BadSums { got: 1, want: 3 })), "{refused:?}");
    assert!(matches!(s.read(0, c, 1, 0, B).await, Err(Error::NotFound { .. })));
    s.write_with_sums(0, c, CS, 1, 1, offset, Bytes::from(data.clone()), sums).await.expect("write");
    let got = s.read(0, c, 1, offset, data.len() as u64).await.expect("read");
    assert!(got[..] == data[..]);
    assert!(s.scrub_replica(0, c).await.expect("scrub").is_empty());
}

/// Reads racing overwrites of the same blocks (the ring path reads data without the replica
/// lock) return one of the written versions of each block, never an error or a mix inside a
/// block, on both the io_uring and the blocking-pool paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_overwrites_see_whole_written_blocks() {
    for io_uring in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::Config { io_uring, ..Default::default() };
        let s = ChunkStore::open_with(disk_paths(&dir, 1), config).await.expect("open store");
        let c = chunk(0);
        let versions: Vec<Vec<u8>> = (0..4).map(|seed| pattern(seed + 100, 4 * B as usize)).collect();
        s.write(0, c, CS, 1, 1, 0, Bytes::from(versions[0].clone())).await.expect("first write");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (s, versions, stop) = (s.clone(), versions.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let v = Bytes::from(versions[i % versions.len()].clone());
                    s.write(0, c, CS, 1, 1, 0, v).await.expect("overwrite");
                }
                i
            })
        };
        let deadline = Instant::now() + Duration::from_millis(700);
        let mut reads = 0;
        while Instant::now() < deadline {
            let got = s.read(0, c, 1, 0, 4 * B).await.expect("read racing a write");
            for (k, block) in got.chunks(B as usize).enumerate() {
                let range = k * B as usize..(k + 1) * B as usize;
                assert!(
                    versions.iter().any(|v| v[range.clone()] == *block),
                    "io_uring={io_uring}: block {k} of read {reads} is no written version"
                );
            }
            // The locked walks (catch-up sums, scrub) wait for in-flight ring writes, so
            // they never take a block between its sums and its data for a corrupt one.
            if reads % 8 == 0 {
                let (_, sums) = s.block_sums(0, c).await.expect("block sums racing a write");
                for (k, got) in sums.iter().take(4).enumerate() {
                    let range = k * B as usize..(k + 1) * B as usize;
                    assert!(
                        versions.iter().any(|v| sum(&v[range.clone()]) == *got),
                        "io_uring={io_uring}: sum of block {k} is no written version"
                    );
                }
            }
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.await.expect("writer");
        assert!(reads > 10 && writes > 10, "io_uring={io_uring}: too little overlap ({reads} reads, {writes} writes)");
    }
}

/// Reads that verify are served by the ring without the locked fallback; a corrupt block is
/// still reported as corrupt (by the fallback, which confirms it under the lock).
#[tokio::test]
async fn ring_reads_need_no_fallback_and_corruption_is_still_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(&dir, 1).await;
    let c = chunk(3);
    let data = pattern(9, 64 * B as usize);
    s.write(0, c, CS, 1, 1, 0, Bytes::from(data.clone())).await.expect("write");
    for k in 0..63u64 {
        let (at, len) = (k * B + 100, 2 * B - 200);
        let got = s.read(0, c, 1, at, len).await.expect("read");
        assert_eq!(&got[..], &data[at as usize..(at + len) as usize], "read at block {k}");
    }
    assert_eq!(s.stats().ring_fallbacks, 0, "clean reads fell back to the locked read");
    flip_byte(&data_file(&dir, 0, c), 5 * B + 7);
    let err = s.read(0, c, 1, 5 * B, B).await.expect_err("corrupt block read");
    assert_eq!(err.code(), ErrorCode::Corrupt);
}

/// A new journal is created whole (ring written, renamed into place, no temporary left), and
/// a file too short to hold a superblock, left by an interrupted creation, is made anew.
#[tokio::test]
async fn a_new_journal_is_written_whole_and_a_truncated_one_is_recreated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("disk0/journal");
    drop(open(&dir, 1).await);
    let len = std::fs::metadata(&journal).expect("journal exists").len();
    assert_eq!(len, 4096 + crate::MIN_JOURNAL_BYTES);
    assert!(!dir.path().join("disk0/journal.new").exists(), "temporary journal left behind");
    // Every byte of the ring is allocated, none left sparse.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&journal).expect("stat"));
    assert!(blocks * 512 >= len, "ring not written: {} of {len} bytes allocated", blocks * 512);
    std::fs::write(&journal, b"short").expect("truncate journal");
    let s = open(&dir, 1).await;
    s.write(0, chunk(0), CS, 1, 1, 0, Bytes::from(pattern(1, B as usize))).await.expect("write after recreate");
    assert_eq!(std::fs::metadata(&journal).expect("journal").len(), len);
}

/// Holds the next deferred in-place write until the returned notify is notified.
fn hold_next_placement(s: &ChunkStore) -> Arc<tokio::sync::Notify> {
    let release = Arc::new(tokio::sync::Notify::new());
    *s.inner().hooks.next_placement.lock().expect("hooks") = Some(crate::store::PlacementHook::Hold(release.clone()));
    release
}

/// Whether `task` is still running after a while in which it would have finished had it not
/// been waiting for something.
async fn still_waiting<T>(task: &tokio::task::JoinHandle<T>) -> bool {
    tokio::time::sleep(Duration::from_millis(300)).await;
    !task.is_finished()
}

/// A small lone overwrite is answered once its commit (which holds its data) is durable and
/// writes its data in place afterwards. Until it has, a read of its blocks waits (the
/// previous data still verifies, against the previous sum, and would be returned), and so
/// does a later write of them (whose data must not land before it); other blocks do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_after_an_answer_wait_for_its_data_in_place() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(37);
    let s = Arc::new(open(&dir, 1).await);
    s.write(0, c, CS, 1, 1, 0, Bytes::from(pattern(1, 4 * B as usize))).await.expect("allocating write");
    let before = s.stats().fast_commits;

    let release = hold_next_placement(&s);
    s.write(0, c, CS, 1, 1, B, Bytes::from(pattern(2, B as usize))).await.expect("answered write");
    assert_eq!(s.stats().fast_commits - before, 1, "the overwrite did not commit itself");
    let read = {
        let s = s.clone();
        tokio::spawn(async move { s.read(0, c, 1, B, B).await })
    };
    assert!(still_waiting(&read).await, "a read returned before an answered write's data was in place");
    release.notify_one();
    let got = tokio::time::timeout(Duration::from_secs(20), read).await.expect("read never ended").expect("task");
    assert_eq!(&got.expect("read")[..], &pattern(2, B as usize)[..]);

    let release = hold_next_placement(&s);
    s.write(0, c, CS, 1, 1, B, Bytes::from(pattern(3, B as usize))).await.expect("answered write");
    // Other blocks of the replica do not wait.
    let other = tokio::time::timeout(Duration::from_secs(20), async {
        s.write(0, c, CS, 1, 1, 2 * B, Bytes::from(pattern(5, B as usize))).await.expect("write of another block");
        s.read(0, c, 1, 2 * B, 2 * B).await.expect("read of other blocks")
    });
    let got = other.await.expect("an access to other blocks waited for the held one");
    assert_eq!(&got[..B as usize], &pattern(5, B as usize)[..]);
    let later = {
        let s = s.clone();
        tokio::spawn(async move { s.write(0, c, CS, 1, 1, B, Bytes::from(pattern(4, B as usize))).await })
    };
    assert!(still_waiting(&later).await, "a write went ahead of an answered write of its block");
    release.notify_one();
    let wrote = tokio::time::timeout(Duration::from_secs(20), later).await.expect("write never ended").expect("task");
    wrote.expect("later write");
    let got = s.read(0, c, 1, B, B).await.expect("read");
    assert_eq!(&got[..], &pattern(4, B as usize)[..], "the earlier write's data landed last");
    assert_eq!(s.stats().fast_commits - before, 4);
}

/// An answered write whose in-place write never happens (it failed, or the ring went away)
/// still has its data in the journal: the replica refuses reads (they would return the
/// previous data), the disk refuses writes (the journal's tail must not move past it), and
/// the next start replays the data into place.
#[tokio::test]
async fn an_answered_write_that_never_lands_in_place_is_replayed() {
    let dir = TempDir::new().expect("tempdir");
    let c = chunk(38);
    let mut model = vec![0u8; CS as usize];
    {
        let s = open(&dir, 1).await;
        write_model(&s, &mut model, c, 0, pattern(1, 4 * B as usize)).await;
        *s.inner().hooks.next_placement.lock().expect("hooks") = Some(crate::store::PlacementHook::Drop);
        write_model(&s, &mut model, c, 2 * B, pattern(2, B as usize)).await;
        s.read(0, c, 1, 2 * B, B).await.expect_err("read of a replica whose answered data is not in place");
        s.write(0, chunk(39), CS, 1, 1, 0, Bytes::from(pattern(3, B as usize)))
            .await
            .expect_err("write to a disk whose journal keeps an answered write's only copy");
    }
    let on_disk = std::fs::read(data_file(&dir, 0, c)).expect("read data file");
    assert_eq!(&on_disk[2 * B as usize..3 * B as usize], &pattern(1, 4 * B as usize)[2 * B as usize..3 * B as usize]);
    reopen_and_check(&dir, c, &model, 4, "replay did not put the answered write in place").await;
}

/// The journal's tail does not move past an answered data commit whose in-place write is
/// not over (its data's only durable copy is in the ring): the checkpoint waits, and runs
/// once the write is in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_waits_for_answered_data_to_be_in_place() {
    let dir = TempDir::new().expect("tempdir");
    let (held, other) = (chunk(40), chunk(41));
    let s = open(&dir, 1).await;
    s.write(0, held, CS, 1, 1, 0, Bytes::from(pattern(1, B as usize))).await.expect("allocating write");
    s.write(0, other, CS, 1, 1, 0, Bytes::from(pattern(2, CS as usize))).await.expect("allocating write");
    let tail = s.journal_tail();
    let release = hold_next_placement(&s);
    s.write(0, held, CS, 1, 1, 0, Bytes::from(pattern(3, B as usize))).await.expect("answered write");
    // Each small overwrite's commit takes 8 KiB: these fill more than half of the smallest
    // ring, when a checkpoint is due.
    let n = crate::MIN_JOURNAL_BYTES / (2 * B) * 3 / 4;
    for i in 0..n {
        let at = (i % (CS / B)) * B;
        s.write(0, other, CS, 1, 1, at, Bytes::from(pattern(10 + i, B as usize))).await.expect("overwrite");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.journal_tail(), tail, "the tail moved past a commit whose data was not in place");
    release.notify_one();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.journal_tail() == tail {
        assert!(Instant::now() < deadline, "no checkpoint once the data was in place");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = s.read(0, held, 1, 0, B).await.expect("read");
    assert_eq!(&got[..], &pattern(3, B as usize)[..]);
}
