//! End-to-end storage tests on real multi-node clusters (separate `storaged` processes),
//! with real NBD clients (libnbd's `nbdcopy`).

use anyhow::{bail, Result};
use basalt_storaged_client::{Error as ClientError, VolumeOptions};
use basalt_tests::*;
use basalt_types::*;
use bytes::Bytes;
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1 << 20;

async fn chunk_health(c: &TestCluster) -> Result<ChunkHealth> {
    Ok(c.client()?.status().await?.chunks)
}

async fn all_chunks(c: &TestCluster, volume: &str) -> Result<Vec<ChunkInfo>> {
    let client = c.client()?;
    let v = client.volume(volume).await?;
    match client.meta(MetaRequest::GetChunks { volume: v.id, first: 0, count: u64::MAX / 2 }).await? {
        MetaResponse::Chunks(chunks) => Ok(chunks),
        other => bail!("unexpected {other:?}"),
    }
}

/// Start `nbdcopy src dst` in the background.
fn spawn_nbdcopy(src: &str, dst: &str) -> Result<std::process::Child> {
    Ok(Command::new("nbdcopy").arg(src).arg(dst).stderr(std::process::Stdio::piped()).spawn()?)
}

fn finish(child: std::process::Child, what: &str) -> Result<()> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Wait until the volume has at least `n` chunks allocated (the writer is that far along).
async fn wait_allocated(c: &TestCluster, volume: &str, n: u64) -> Result<()> {
    let client = c.client()?;
    wait_for("writes to progress", Duration::from_secs(120), || {
        let client = client.clone();
        async move { Ok((client.volume(volume).await?.allocated_chunks >= n).then_some(())) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_during_writes_loses_nothing_and_chunks_rereplicate_to_the_fourth_host() -> Result<()> {
    require("nbdcopy")?;
    let mut c = TestCluster::start(4, Duration::from_secs(8)).await?;
    let client = c.client()?;
    client.create_volume("data", 256 << 20, Some(16 << 20)).await?;
    let src = c.dir().join("src.img");
    random_file(&src, 256 * MIB, 1)?;

    let writer = spawn_nbdcopy(src.to_str().unwrap_or_default(), &c.nbd_uri("node1", "data")?)?;
    wait_allocated(&c, "data", 4).await?;
    c.kill("node3")?;
    finish(writer, "writing through NBD while node3 died")?;

    let back = c.dir().join("back.img");
    nbdcopy(&c.nbd_uri("node1", "data")?, back.to_str().unwrap_or_default())?;
    assert_same_file(&src, &back)?;

    // node3 is declared dead, its replicas are dropped and re-created on the others.
    wait_for("chunk health to return to 0 degraded", Duration::from_secs(180), || async {
        let h = chunk_health(&c).await?;
        Ok((h.total == 16 && h.degraded == 0 && h.syncing == 0).then_some(()))
    })
    .await?;
    for chunk in all_chunks(&c, "data").await? {
        let nodes: Vec<u64> = chunk.readable().map(|r| r.disk.node).collect();
        assert_eq!(nodes.len(), 3, "{} has replicas {:?}", chunk.id, chunk.replicas);
        assert!(!nodes.contains(&3), "{} still on the dead node: {nodes:?}", chunk.id);
    }
    // Read again through another node: the new replicas hold the same data.
    let again = c.dir().join("again.img");
    nbdcopy(&c.nbd_uri("node4", "data")?, again.to_str().unwrap_or_default())?;
    assert_same_file(&src, &again)?;
    c.passed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_incrementally() -> Result<()> {
    require("nbdcopy")?;
    // Dead timeout longer than the outage: the node's replicas are caught up, not replaced.
    let mut c = TestCluster::start(3, Duration::from_secs(120)).await?;
    let client = c.client()?;
    client.create_volume("inc", 128 << 20, Some(16 << 20)).await?;
    let first = c.dir().join("first.img");
    random_file(&first, 128 * MIB, 2)?;
    nbdcopy(first.to_str().unwrap_or_default(), &c.nbd_uri("node1", "inc")?)?;

    // Overwrite the first 4 MiB (a quarter of chunk 0) while node3 is down, once node1's
    // export has let go of the lease (it does so after nbdcopy's connections close).
    c.kill("node3")?;
    wait_for("node1's NBD export to release the lease", Duration::from_secs(30), || async {
        Ok(client.volume("inc").await?.lease.is_none().then_some(()))
    })
    .await?;
    let vol = client.open_volume("inc", VolumeOptions::writer("test", 0)).await?;
    let patch = Bytes::from(vec![0x5a; 4 * MIB]);
    vol.write(0, patch.clone()).await?;
    vol.close().await?;
    assert!(chunk_health(&c).await?.degraded >= 1, "the chunk written during the outage must be degraded");

    c.start_node("node3")?;
    wait_for("chunk health to return to 0 degraded", Duration::from_secs(120), || async {
        let h = chunk_health(&c).await?;
        Ok((h.degraded == 0 && h.syncing == 0).then_some(()))
    })
    .await?;
    // node3 copied only what it missed.
    let log = c.log("node3")?;
    let synced: Vec<&str> = log.lines().filter(|l| l.contains("replica synced")).collect();
    assert!(!synced.is_empty(), "node3 never caught up: no 'replica synced' in its log");
    assert!(
        synced.iter().all(|l| !l.contains("skipped=0")),
        "catch-up copied whole chunks: {synced:?}"
    );
    // Data is right on every replica: read through node3 (it prefers its own replicas).
    let back = c.dir().join("back.img");
    nbdcopy(&c.nbd_uri("node3", "inc")?, back.to_str().unwrap_or_default())?;
    let mut expected = std::fs::read(&first)?;
    expected[..4 * MIB].copy_from_slice(&patch);
    let got = std::fs::read(&back)?;
    assert!(got == expected, "data read through node3 differs after catch-up");
    c.passed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_leader_killed_during_writes_loses_nothing() -> Result<()> {
    require("nbdcopy")?;
    let mut c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let client = c.client()?;
    client.create_volume("lead", 128 << 20, Some(8 << 20)).await?;
    let leader = client.status().await?.leader.ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let leader_name = c.name_of(leader)?;
    // Write through a node that is not the leader, so the writer survives.
    let via = c.file.nodes.iter().find(|n| n.id != leader).map(|n| n.name.clone()).unwrap_or_default();
    let src = c.dir().join("src.img");
    random_file(&src, 128 * MIB, 3)?;
    let writer = spawn_nbdcopy(src.to_str().unwrap_or_default(), &c.nbd_uri(&via, "lead")?)?;
    wait_allocated(&c, "lead", 3).await?;
    c.kill(&leader_name)?;
    finish(writer, "writing while the metadata leader died")?;
    let new_leader = client.status().await?.leader;
    assert!(new_leader.is_some() && new_leader != Some(leader), "no new leader: {new_leader:?}");
    let back = c.dir().join("back.img");
    nbdcopy(&c.nbd_uri(&via, "lead")?, back.to_str().unwrap_or_default())?;
    assert_same_file(&src, &back)?;
    c.passed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_a_replica_are_detected_and_repaired() -> Result<()> {
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let client = c.client()?;
    client.create_volume("rot", 8 << 20, Some(4 << 20)).await?;
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    let vol = client.open_volume("rot", VolumeOptions::writer("test", 0)).await?;
    vol.write(0, Bytes::from(data.clone())).await?;
    vol.close().await?;

    // Corrupt block 5 of chunk 0 in node1's replica file.
    let replica = c.file.node("node1")?.data_dirs[0].join(format!("chunks/{}/0.data", vol.id()));
    let mut bytes = std::fs::read(&replica)?;
    let off = 5 * 4096 + 100;
    let good = bytes[off];
    bytes[off] ^= 0xff;
    std::fs::write(&replica, &bytes)?;

    // node1 prefers its local replica: the read must still be correct.
    let back = c.dir().join("back.img");
    require("nbdcopy")?;
    nbdcopy(&c.nbd_uri("node1", "rot")?, back.to_str().unwrap_or_default())?;
    let got = std::fs::read(&back)?;
    assert!(got == data, "read returned corrupted data");
    // And the bad copy is repaired from a good one.
    wait_for("the corrupt block to be rewritten", Duration::from_secs(30), || {
        let replica = replica.clone();
        async move { Ok((std::fs::read(&replica)?.get(off) == Some(&good)).then_some(())) }
    })
    .await?;
    c.passed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_writer_cannot_write() -> Result<()> {
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let client = c.client()?;
    client.create_volume("fence", 8 << 20, Some(4 << 20)).await?;
    let old = client.open_volume("fence", VolumeOptions::writer("old-holder", 1)).await?;
    old.write(0, Bytes::from(vec![1u8; 4096])).await?;
    // A second writer without force is refused.
    let refused = client.open_volume("fence", VolumeOptions::writer("new-holder", 2)).await;
    assert!(matches!(refused, Err(ClientError::Fenced { .. })), "second writer got {:?}", refused.err());
    // With force it takes over and bumps the epoch.
    let new = client
        .open_volume("fence", VolumeOptions { force: true, ..VolumeOptions::writer("new-holder", 2) })
        .await?;
    assert!(new.epoch() > old.epoch());
    new.write(0, Bytes::from(vec![2u8; 4096])).await?;
    // The old holder is fenced: its writes fail, on an existing chunk and on a new one.
    let e = old.write(0, Bytes::from(vec![3u8; 4096])).await.expect_err("old holder wrote");
    assert_eq!(e.code(), ErrorCode::Fenced, "{e}");
    let e = old.write(4 << 20, Bytes::from(vec![3u8; 4096])).await.expect_err("old holder allocated");
    assert_eq!(e.code(), ErrorCode::Fenced, "{e}");
    assert_eq!(&new.read(0, 4096).await?[..], &[2u8; 4096][..]);
    c.passed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_sigkill_keeps_every_acknowledged_write() -> Result<()> {
    require("nbdcopy")?;
    let mut c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let client = c.client()?;
    client.create_volume("crash", 64 << 20, Some(8 << 20)).await?;
    let src = c.dir().join("src.img");
    random_file(&src, 64 * MIB, 4)?;
    nbdcopy(src.to_str().unwrap_or_default(), &c.nbd_uri("node2", "crash")?)?;
    c.kill_all()?;
    c.restart_all().await?;
    let back = c.dir().join("back.img");
    nbdcopy(&c.nbd_uri("node1", "crash")?, back.to_str().unwrap_or_default())?;
    assert_same_file(&src, &back)?;
    c.passed()
}

/// Files under a node's data directories that hold replicas of `volume`.
fn replica_files(c: &TestCluster, node: &str, volume: u64) -> Result<usize> {
    let mut n = 0;
    for dir in &c.file.node(node)?.data_dirs {
        let vdir = dir.join("chunks").join(volume.to_string());
        if let Ok(entries) = std::fs::read_dir(&vdir) {
            n += entries.count();
        }
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_volume_deleted_while_a_node_was_down_are_collected_when_it_returns() -> Result<()> {
    let mut c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let client = c.client()?;
    let gone = client.create_volume("gone", 8 << 20, Some(4 << 20)).await?;
    let kept = client.create_volume("kept", 4 << 20, Some(4 << 20)).await?;
    for name in ["gone", "kept"] {
        let vol = client.open_volume(name, VolumeOptions::writer("test", 0)).await?;
        vol.write(0, Bytes::from(vec![9u8; 4 * MIB])).await?;
        vol.close().await?;
    }
    assert!(replica_files(&c, "node3", gone.id)? > 0, "node3 holds no replica of the volume");
    c.kill("node3")?;
    client.delete_volume("gone").await?;
    assert_eq!(replica_files(&c, "node1", gone.id)?, 0, "a live node kept replicas of the deleted volume");
    assert!(replica_files(&c, "node3", gone.id)? > 0);
    c.start_node("node3")?;
    wait_for("node3 to collect the deleted volume's replicas", Duration::from_secs(60), || async {
        Ok((replica_files(&c, "node3", gone.id)? == 0).then_some(()))
    })
    .await?;
    // Nothing else was touched.
    assert!(replica_files(&c, "node3", kept.id)? > 0, "the other volume's replica was collected too");
    let vol = client.open_volume("kept", VolumeOptions::reader()).await?;
    assert_eq!(&vol.read(0, 4096).await?[..], &[9u8; 4096][..]);
    c.passed()
}

/// `basalt volume resize` while the volume is exported: an NBD connection that is open keeps
/// the size it announced and cannot reach past a shrunk end, a new connection to the same
/// (still open) export announces the new size, and a `Volume` open in the resizing client
/// follows at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_reaches_new_nbd_connections_while_open_ones_keep_their_size() -> Result<()> {
    require("qemu-io")?;
    require("nbdinfo")?;
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let client = c.client()?;
    let (big, small) = (32 << 20, 16 << 20);
    client.create_volume("shrink", big, Some(8 << 20)).await?;
    let uri = c.nbd_uri("node1", "shrink")?;
    // One connection held open across the resize: its size, a pause, its size again, then a
    // write past the end the resize will set.
    let held = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "length", "-c", "sleep 3000", "-c", "length", "-c", "write 24M 4k", &uri])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    wait_for("node1 to open the export", Duration::from_secs(30), || async {
        Ok(c.log("node1")?.lines().any(|l| l.contains("volume opened") && l.contains("nbd@node1")).then_some(()))
    })
    .await?;
    let reader = client.open_volume("shrink", VolumeOptions::reader()).await?;
    client.resize_volume("shrink", small).await?;
    assert_eq!(reader.size(), small);
    let e = reader.read(small, 4096).await.expect_err("read past the new end");
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");

    let info = Command::new("nbdinfo").args(["--size", &uri]).output()?;
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), small.to_string(), "a new connection's size");
    let mut held = held;
    if held.try_wait()?.is_some() {
        bail!("qemu-io ended before the resize was done: too slow a machine for this check");
    }
    let out = held.wait_with_output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("32 MiB").count(), 2, "the open connection's size changed: {text}");
    assert!(text.contains("write failed"), "a write past the new end succeeded: {text}");
    c.passed()
}
