//! Behaviour of every command (success and refusal), health, persistence and repair planning.

use crate::kv::MapKey;
use crate::test_support::*;
use crate::{plan_repairs, ClusterMap, MapError, RepairAction, Usage};
use basalt_types::{
    ChunkHealth, ChunkId, ChunkInfo, DiskId, ErrorCode, Lease, MetaCommand, MetaReply, NodeState, ReplicaState,
    VolumeInfo,
};

const MIB: u64 = 1 << 20;

/// Applies a command that must be refused with `code`, and checks it changed nothing.
fn apply_err(map: &mut ClusterMap, cmd: &MetaCommand, code: ErrorCode) -> String {
    let before = map.clone();
    let (reply, changes) = map.apply(cmd);
    match reply {
        MetaReply::Error(e) => {
            assert_eq!(e.code, code, "{cmd:?}: {}", e.message);
            assert!(changes.is_empty(), "refused {cmd:?} returned changes");
            assert_eq!(*map, before, "refused {cmd:?} changed the map");
            e.message
        }
        other => panic!("{cmd:?} should fail with {code:?}, got {other:?}"),
    }
}

fn create(map: &mut ClusterMap, name: &str, size: u64) -> VolumeInfo {
    match apply_ok(map, &MetaCommand::CreateVolume { name: name.into(), size, chunk_size: MIB, now_ms: 10 }) {
        MetaReply::Volume(v) => v,
        other => panic!("{other:?}"),
    }
}

fn cid(volume: u64, index: u64) -> ChunkId {
    ChunkId { volume, index }
}

fn allocate(map: &mut ClusterMap, chunk: ChunkId, disks: &[DiskId]) -> ChunkInfo {
    match apply_ok(map, &MetaCommand::AllocateChunk { chunk, disks: disks.to_vec() }) {
        MetaReply::Chunk(c) => c,
        other => panic!("{other:?}"),
    }
}

fn reply_chunk(reply: MetaReply) -> ChunkInfo {
    match reply {
        MetaReply::Chunk(c) => c,
        other => panic!("expected a chunk, got {other:?}"),
    }
}

fn set_state(map: &mut ClusterMap, id: u64, state: NodeState) {
    apply_ok(map, &MetaCommand::SetNodeState { id, state, now_ms: 100 });
}

fn drop_cmd(chunk: ChunkId, version: u64, disks: &[DiskId], min_replicas: u32) -> MetaCommand {
    MetaCommand::DropReplicas { chunk, version, disks: disks.to_vec(), min_replicas }
}

/// A 4-node cluster with volume 1 (4 chunks of 1 MiB) and chunk 0 on nodes 1, 2, 3.
fn with_chunk() -> (ClusterMap, ChunkId) {
    let mut map = cluster(&[1, 1, 1, 1]);
    create(&mut map, "vol", 4 * MIB);
    let c = cid(1, 0);
    allocate(&mut map, c, &[disk(1, 0), disk(2, 0), disk(3, 0)]);
    (map, c)
}

/// Checks that a snapshot of `map` loads back as the same map.
fn assert_persisted(map: &ClusterMap) {
    let rebuilt = ClusterMap::from_kv(map.to_kv()).expect("from_kv of to_kv");
    assert_eq!(&rebuilt, map);
}

// ---- nodes ----

#[test]
fn register_node_inserts_then_updates_and_revives() {
    let mut map = cluster(&[1]);
    let n = map.node(1).expect("node 1").clone();
    assert_eq!((n.state, n.since_ms, n.disks.len()), (NodeState::Alive, 1, 1));

    set_state(&mut map, 1, NodeState::Dead);
    let reply = apply_ok(
        &mut map,
        &MetaCommand::RegisterNode {
            id: 1,
            name: "renamed".into(),
            rpc_addr: "10.0.0.1:7000".into(),
            nbd_addr: "10.0.0.1:10809".into(),
            disks: vec![],
            now_ms: 500,
        },
    );
    assert_eq!(reply, MetaReply::NodeId(1));
    let n = map.node(1).expect("node 1");
    assert_eq!(n.name, "renamed");
    assert_eq!(n.rpc_addr, "10.0.0.1:7000");
    assert!(n.disks.is_empty());
    assert_eq!((n.state, n.since_ms), (NodeState::Alive, 500));
    assert_eq!(map.nodes().count(), 1);
}

#[test]
fn register_node_refuses_foreign_or_duplicate_disks() {
    let mut map = ClusterMap::new();
    let info = |id: DiskId| basalt_types::DiskInfo { id, path: "/d".into(), total_bytes: 1, free_bytes: 1 };
    let reg = |disks| MetaCommand::RegisterNode {
        id: 1,
        name: "n".into(),
        rpc_addr: String::new(),
        nbd_addr: String::new(),
        disks,
        now_ms: 0,
    };
    apply_err(&mut map, &reg(vec![info(disk(2, 0))]), ErrorCode::InvalidArgument);
    apply_err(&mut map, &reg(vec![info(disk(1, 0)), info(disk(1, 0))]), ErrorCode::InvalidArgument);
}

#[test]
fn set_node_state_changes_state_and_time_once() {
    let mut map = cluster(&[1]);
    apply_err(&mut map, &MetaCommand::SetNodeState { id: 9, state: NodeState::Dead, now_ms: 1 }, ErrorCode::NotFound);
    let (_, changes) = map.apply(&MetaCommand::SetNodeState { id: 1, state: NodeState::Dead, now_ms: 42 });
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].key, MapKey::Node(1).encode());
    let n = map.node(1).expect("node 1");
    assert_eq!((n.state, n.since_ms), (NodeState::Dead, 42));
    // Same state again: `since_ms` keeps the time of the actual change.
    let (reply, changes) = map.apply(&MetaCommand::SetNodeState { id: 1, state: NodeState::Dead, now_ms: 99 });
    assert_eq!(reply, MetaReply::Ok);
    assert!(changes.is_empty());
    assert_eq!(map.node(1).expect("node 1").since_ms, 42);
}

// ---- volumes ----

#[test]
fn create_volume_assigns_fresh_ids_never_reused() {
    let mut map = ClusterMap::new();
    let a = create(&mut map, "a", MIB);
    assert_eq!((a.id, a.epoch, a.lease.clone(), a.allocated_chunks, a.created_ms), (1, 0, None, 0, 10));
    assert_eq!(map.volume_by_name("a"), Some(&a));
    assert_eq!(map.volume(1), Some(&a));
    let b = create(&mut map, "b", MIB);
    assert_eq!(b.id, 2);
    apply_ok(&mut map, &MetaCommand::DeleteVolume { name: "b".into() });
    assert_eq!(create(&mut map, "b", MIB).id, 3);
    assert_eq!(map.volumes().map(|v| v.id).collect::<Vec<_>>(), vec![1, 3]);
    assert_persisted(&map);
}

#[test]
fn create_volume_validates_name_size_and_chunk_size() {
    let mut map = ClusterMap::new();
    let cmd = |name: &str, size: u64, chunk_size: u64| MetaCommand::CreateVolume {
        name: name.into(),
        size,
        chunk_size,
        now_ms: 0,
    };
    for name in ["", ".hidden", "-opt", "a/b", "a b", "é", "x\0"] {
        apply_err(&mut map, &cmd(name, MIB, MIB), ErrorCode::InvalidArgument);
    }
    apply_err(&mut map, &cmd(&"a".repeat(129), MIB, MIB), ErrorCode::InvalidArgument);
    apply_ok(&mut map, &cmd(&"a".repeat(128), MIB, MIB));
    apply_ok(&mut map, &cmd("Az09._-x", MIB, MIB));
    for size in [0, 1, 511, 1000] {
        apply_err(&mut map, &cmd("s", size, MIB), ErrorCode::InvalidArgument);
    }
    for chunk_size in [0, 4096, MIB / 2, 3 * MIB, 2 << 30, u64::MAX] {
        apply_err(&mut map, &cmd("c", MIB, chunk_size), ErrorCode::InvalidArgument);
    }
    apply_ok(&mut map, &cmd("big", u64::MAX - 511, 1 << 30));
    apply_ok(&mut map, &cmd("dup", 512, MIB));
    let msg = apply_err(&mut map, &cmd("dup", 512, MIB), ErrorCode::AlreadyExists);
    assert!(msg.contains("dup"), "{msg}");
}

#[test]
fn delete_volume_removes_its_chunks_even_when_leased() {
    let (mut map, c) = with_chunk();
    allocate(&mut map, cid(1, 3), &[disk(1, 0)]);
    create(&mut map, "other", MIB);
    allocate(&mut map, cid(2, 0), &[disk(4, 0)]);
    apply_ok(&mut map, &MetaCommand::AcquireLease { volume: "vol".into(), holder: "h".into(), node: 1, force: false, now_ms: 1 });
    apply_err(&mut map, &MetaCommand::DeleteVolume { name: "nope".into() }, ErrorCode::NotFound);

    let (reply, changes) = map.apply(&MetaCommand::DeleteVolume { name: "vol".into() });
    assert_eq!(reply, MetaReply::Ok);
    let deleted: Vec<Vec<u8>> = changes.iter().filter(|c| c.value.is_none()).map(|c| c.key.clone()).collect();
    assert_eq!(deleted.len(), 3, "two chunks and the volume");
    assert!(deleted.contains(&MapKey::Chunk(c).encode()));
    assert!(deleted.contains(&MapKey::Volume(1).encode()));
    assert!(map.volume_by_name("vol").is_none() && map.volume(1).is_none());
    assert!(map.chunk(c).is_none());
    assert_eq!(map.chunks().map(|c| c.id).collect::<Vec<_>>(), vec![cid(2, 0)]);
    assert_persisted(&map);
}

#[test]
fn resize_volume_grows_and_shrinks_dropping_whole_chunks_only() {
    let (mut map, _) = with_chunk();
    for i in 1..4 {
        allocate(&mut map, cid(1, i), &[disk(4, 0)]);
    }
    let resize = |size| MetaCommand::ResizeVolume { name: "vol".into(), size };
    apply_err(&mut map, &MetaCommand::ResizeVolume { name: "x".into(), size: MIB }, ErrorCode::NotFound);
    apply_err(&mut map, &resize(0), ErrorCode::InvalidArgument);
    apply_err(&mut map, &resize(MIB + 1), ErrorCode::InvalidArgument);

    // 1.5 MiB: chunk 1 is partly inside and stays; chunks 2 and 3 go.
    let v = match apply_ok(&mut map, &resize(MIB + MIB / 2)) {
        MetaReply::Volume(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!((v.size, v.allocated_chunks), (MIB + MIB / 2, 2));
    assert_eq!(map.chunks_of(1, 0, 10).iter().map(|c| c.id.index).collect::<Vec<_>>(), vec![0, 1]);
    // Now chunk 2 is out of range for allocation; growing brings the range back.
    apply_err(&mut map, &MetaCommand::AllocateChunk { chunk: cid(1, 2), disks: vec![disk(1, 0)] }, ErrorCode::InvalidArgument);
    apply_ok(&mut map, &resize(8 * MIB));
    allocate(&mut map, cid(1, 7), &[disk(1, 0)]);
    assert_eq!(map.volume(1).expect("vol").allocated_chunks, 3);
    // Same size: no change at all.
    let (_, changes) = map.apply(&resize(8 * MIB));
    assert!(changes.is_empty());
    assert_persisted(&map);
}

// ---- leases ----

#[test]
fn lease_epochs_fence_other_holders() {
    let mut map = ClusterMap::new();
    create(&mut map, "vol", MIB);
    let acquire = |holder: &str, force: bool, now_ms: u64| MetaCommand::AcquireLease {
        volume: "vol".into(),
        holder: holder.into(),
        node: 1,
        force,
        now_ms,
    };
    let lease = |reply: MetaReply| match reply {
        MetaReply::Lease(l) => l,
        other => panic!("{other:?}"),
    };
    apply_err(&mut map, &MetaCommand::AcquireLease { volume: "x".into(), holder: "a".into(), node: 1, force: false, now_ms: 0 }, ErrorCode::NotFound);
    apply_err(&mut map, &acquire("", false, 0), ErrorCode::InvalidArgument);

    let l = lease(apply_ok(&mut map, &acquire("a", false, 5)));
    assert_eq!(l, Lease { holder: "a".into(), node: 1, epoch: 1, acquired_ms: 5 });
    // Re-acquiring by the holder keeps the epoch.
    assert_eq!(lease(apply_ok(&mut map, &acquire("a", false, 6))).epoch, 1);
    let msg = apply_err(&mut map, &acquire("b", false, 7), ErrorCode::Fenced);
    assert!(msg.contains("leased by a (epoch 1)"), "{msg}");
    // Takeover bumps the epoch.
    assert_eq!(lease(apply_ok(&mut map, &acquire("b", true, 8))).epoch, 2);
    assert_eq!(map.volume(1).expect("vol").epoch, 2);

    apply_err(&mut map, &MetaCommand::ReleaseLease { volume: "vol".into(), holder: "a".into() }, ErrorCode::Fenced);
    apply_err(&mut map, &MetaCommand::ReleaseLease { volume: "x".into(), holder: "b".into() }, ErrorCode::NotFound);
    assert_eq!(apply_ok(&mut map, &MetaCommand::ReleaseLease { volume: "vol".into(), holder: "b".into() }), MetaReply::Ok);
    let v = map.volume(1).expect("vol");
    assert_eq!((v.lease.clone(), v.epoch), (None, 2));
    // A retried release changes nothing.
    let (reply, changes) = map.apply(&MetaCommand::ReleaseLease { volume: "vol".into(), holder: "b".into() });
    assert_eq!((reply, changes.len()), (MetaReply::Ok, 0));
    // A fresh acquisition of a free volume fences everyone before it.
    assert_eq!(lease(apply_ok(&mut map, &acquire("a", false, 9))).epoch, 3);
    assert_persisted(&map);
}

// ---- chunks ----

#[test]
fn allocate_chunk_creates_once() {
    let (mut map, c) = with_chunk();
    let chunk = map.chunk(c).expect("chunk").clone();
    assert_eq!(chunk.version, 1);
    assert!(chunk.replicas.iter().all(|r| r.state == ReplicaState::Ok));
    assert_eq!(chunk.replicas.len(), 3);
    assert_eq!(map.volume(1).expect("vol").allocated_chunks, 1);
    // Allocating again returns it unchanged, whatever disks are proposed.
    let (reply, changes) = map.apply(&MetaCommand::AllocateChunk { chunk: c, disks: vec![disk(4, 0)] });
    assert_eq!(reply, MetaReply::Chunk(chunk));
    assert!(changes.is_empty());
}

#[test]
fn allocate_chunk_refusals() {
    let (mut map, _) = with_chunk();
    set_state(&mut map, 4, NodeState::Dead);
    let alloc = |index, disks: &[DiskId]| MetaCommand::AllocateChunk { chunk: cid(1, index), disks: disks.to_vec() };
    apply_err(&mut map, &MetaCommand::AllocateChunk { chunk: cid(9, 0), disks: vec![disk(1, 0)] }, ErrorCode::NotFound);
    apply_err(&mut map, &alloc(4, &[disk(1, 0)]), ErrorCode::InvalidArgument); // beyond 4 chunks
    apply_err(&mut map, &alloc(1, &[]), ErrorCode::InvalidArgument);
    apply_err(&mut map, &alloc(1, &[disk(1, 0), disk(2, 0), disk(3, 0), disk(5, 0)]), ErrorCode::InvalidArgument);
    apply_err(&mut map, &alloc(1, &[disk(1, 0), disk(1, 0)]), ErrorCode::InvalidArgument); // same node
    apply_err(&mut map, &alloc(1, &[disk(1, 0), disk(9, 0)]), ErrorCode::InvalidArgument); // unknown node
    apply_err(&mut map, &alloc(1, &[disk(1, 0), disk(4, 0)]), ErrorCode::InvalidArgument); // dead node
    apply_err(&mut map, &alloc(1, &[disk(1, 7)]), ErrorCode::InvalidArgument); // unregistered disk
}

#[test]
fn chunks_of_returns_allocated_chunks_in_range() {
    let (mut map, _) = with_chunk();
    allocate(&mut map, cid(1, 2), &[disk(1, 0)]);
    allocate(&mut map, cid(1, 3), &[disk(1, 0)]);
    let idx = |v: Vec<ChunkInfo>| v.into_iter().map(|c| c.id.index).collect::<Vec<_>>();
    assert_eq!(idx(map.chunks_of(1, 0, 4)), vec![0, 2, 3]);
    assert_eq!(idx(map.chunks_of(1, 1, 2)), vec![2]);
    assert_eq!(idx(map.chunks_of(1, 3, u64::MAX)), vec![3]);
    assert!(map.chunks_of(1, 0, 0).is_empty());
    assert!(map.chunks_of(2, 0, 4).is_empty());
}

#[test]
fn drop_replicas_checks_version_and_readable_minimum() {
    let (mut map, c) = with_chunk();
    apply_err(&mut map, &drop_cmd(cid(1, 1), 1, &[disk(1, 0)], 0), ErrorCode::NotFound);
    let msg = apply_err(&mut map, &drop_cmd(c, 7, &[disk(1, 0)], 0), ErrorCode::StaleVersion);
    assert!(msg.contains("version 1"), "{msg}");
    // Absent disks are ignored; nothing present means no change and no bump.
    let (reply, changes) = map.apply(&drop_cmd(c, 1, &[disk(4, 0)], 2));
    assert_eq!(reply_chunk(reply).version, 1);
    assert!(changes.is_empty());
    // Two of three would leave 1 < 2.
    apply_err(&mut map, &drop_cmd(c, 1, &[disk(1, 0), disk(2, 0)], 2), ErrorCode::Unavailable);

    let after = reply_chunk(apply_ok(&mut map, &drop_cmd(c, 1, &[disk(1, 0), disk(4, 0)], 2)));
    assert_eq!(after.version, 2);
    assert_eq!(after.replicas.iter().map(|r| r.disk).collect::<Vec<_>>(), vec![disk(2, 0), disk(3, 0)]);
    assert_eq!(after.stale, vec![disk(1, 0)]);
    assert_eq!(map.chunk(c), Some(&after));
}

#[test]
fn drop_replicas_counts_only_readable_replicas_toward_the_minimum() {
    let (mut map, c) = with_chunk();
    // Replace 3 by 4 (syncing): readable are 1 and 2.
    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(3, 0)], 2));
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(4, 0) });
    // Dropping 2 leaves readable {1} plus syncing {4}: 1 < 2 → refused.
    apply_err(&mut map, &drop_cmd(c, 3, &[disk(2, 0)], 2), ErrorCode::Unavailable);
    // Dropped disks accumulate in `stale`; a re-added one leaves it.
    apply_ok(&mut map, &drop_cmd(c, 3, &[disk(4, 0)], 2));
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c, version: 4, disk: disk(3, 0) });
    assert_eq!(map.chunk(c).expect("chunk").stale, vec![disk(4, 0)]);
    apply_ok(&mut map, &drop_cmd(c, 5, &[disk(3, 0)], 2));
    let stale = &map.chunk(c).expect("chunk").stale;
    assert_eq!(stale, &vec![disk(4, 0), disk(3, 0)]);
}

#[test]
fn dropping_replicas_of_dead_nodes_is_always_allowed() {
    let (mut map, c) = with_chunk();
    set_state(&mut map, 2, NodeState::Dead);
    set_state(&mut map, 3, NodeState::Dead);
    // Would leave 1 readable < 3, but both dropped disks are on dead nodes.
    let after = reply_chunk(apply_ok(&mut map, &drop_cmd(c, 1, &[disk(2, 0), disk(3, 0)], 3)));
    assert_eq!(after.replicas.len(), 1);
    // But not the last readable copy: all three on dead nodes stay until one comes back.
    let (mut map, c) = with_chunk();
    for n in 1..=3 {
        set_state(&mut map, n, NodeState::Dead);
    }
    apply_err(&mut map, &drop_cmd(c, 1, &[disk(1, 0), disk(2, 0), disk(3, 0)], 2), ErrorCode::Unavailable);
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty(), "nothing to repair from");
    // Mixing in a live node's replica loses the exemption.
    let (mut map, c) = with_chunk();
    set_state(&mut map, 2, NodeState::Dead);
    apply_err(&mut map, &drop_cmd(c, 1, &[disk(2, 0), disk(3, 0)], 2), ErrorCode::Unavailable);
}

#[test]
fn add_replica_adds_a_syncing_copy_on_a_new_live_host() {
    let (mut map, c) = with_chunk();
    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(3, 0)], 2));
    apply_err(&mut map, &MetaCommand::AddReplica { chunk: cid(1, 2), version: 2, disk: disk(4, 0) }, ErrorCode::NotFound);
    apply_err(&mut map, &MetaCommand::AddReplica { chunk: c, version: 1, disk: disk(4, 0) }, ErrorCode::StaleVersion);
    apply_err(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(9, 0) }, ErrorCode::InvalidArgument);
    apply_err(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(1, 0) }, ErrorCode::InvalidArgument);
    apply_err(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(4, 3) }, ErrorCode::InvalidArgument);
    set_state(&mut map, 4, NodeState::Dead);
    apply_err(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(4, 0) }, ErrorCode::InvalidArgument);
    set_state(&mut map, 4, NodeState::Alive);

    // Re-adding the stale disk takes it out of `stale`.
    let after = reply_chunk(apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(3, 0) }));
    assert_eq!(after.version, 3);
    assert!(after.stale.is_empty());
    assert_eq!(after.replicas.last().map(|r| (r.disk, r.state)), Some((disk(3, 0), ReplicaState::Syncing)));
}

#[test]
fn replica_synced_makes_a_syncing_replica_readable_without_bump() {
    let (mut map, c) = with_chunk();
    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(3, 0)], 2));
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(4, 0) });
    let synced = |version, disk| MetaCommand::ReplicaSynced { chunk: c, version, disk };
    apply_err(&mut map, &MetaCommand::ReplicaSynced { chunk: cid(1, 3), version: 3, disk: disk(4, 0) }, ErrorCode::NotFound);
    apply_err(&mut map, &synced(2, disk(4, 0)), ErrorCode::StaleVersion);
    apply_err(&mut map, &synced(3, disk(1, 0)), ErrorCode::InvalidArgument); // already Ok
    apply_err(&mut map, &synced(3, disk(3, 0)), ErrorCode::InvalidArgument); // not a replica
    let after = reply_chunk(apply_ok(&mut map, &synced(3, disk(4, 0))));
    assert_eq!(after.version, 3);
    assert!(after.replicas.iter().all(|r| r.state == ReplicaState::Ok));
    assert_eq!(after.readable().count(), 3);
}

#[test]
fn forget_stale_is_idempotent() {
    let (mut map, c) = with_chunk();
    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(3, 0)], 2));
    let forget = |chunk, disk| MetaCommand::ForgetStale { chunk, disk };
    let (reply, changes) = map.apply(&forget(c, disk(3, 0)));
    assert_eq!((reply, changes.len()), (MetaReply::Ok, 1));
    let chunk = map.chunk(c).expect("chunk");
    assert!(chunk.stale.is_empty());
    assert_eq!(chunk.version, 2, "forgetting a stale copy does not change the replica set");
    for cmd in [forget(c, disk(3, 0)), forget(cid(1, 2), disk(1, 0)), MetaCommand::Noop] {
        let (reply, changes) = map.apply(&cmd);
        assert_eq!((reply, changes.len()), (MetaReply::Ok, 0), "{cmd:?}");
    }
}

// ---- health ----

#[test]
fn chunk_health_counts_degraded_syncing_and_unavailable() {
    let (mut map, c0) = with_chunk();
    let c1 = allocate(&mut map, cid(1, 1), &[disk(1, 0), disk(2, 0)]).id;
    let c2 = allocate(&mut map, cid(1, 2), &[disk(4, 0)]).id;
    assert_eq!(map.chunk_health(), ChunkHealth { total: 3, degraded: 2, syncing: 0, unavailable: 0 });
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c1, version: 1, disk: disk(3, 0) });
    assert_eq!(map.chunk_health(), ChunkHealth { total: 3, degraded: 2, syncing: 1, unavailable: 0 });
    // Node 4 dies: chunk 2 has no live copy; chunk 0 (on 1,2,3) is untouched.
    set_state(&mut map, 4, NodeState::Dead);
    assert_eq!(map.chunk_health(), ChunkHealth { total: 3, degraded: 2, syncing: 1, unavailable: 1 });
    let _ = (c0, c2);

    // In a two-node cluster, two copies is as healthy as it gets.
    let mut small = cluster(&[1, 1]);
    create(&mut small, "v", MIB);
    allocate(&mut small, cid(1, 0), &[disk(1, 0), disk(2, 0)]);
    assert_eq!(small.target_replicas(), 2);
    assert_eq!(small.chunk_health(), ChunkHealth { total: 1, degraded: 0, syncing: 0, unavailable: 0 });
}

// ---- persistence ----

#[test]
fn to_kv_round_trips_and_matches_applied_changes() {
    let (mut map, c) = with_chunk();
    let mut store = std::collections::BTreeMap::new();
    // Replay a history into a store from scratch, the way the state machine persists it.
    let mut replay = ClusterMap::new();
    let history = [
        MetaCommand::RegisterNode { id: 7, name: "n7".into(), rpc_addr: "a".into(), nbd_addr: "b".into(), disks: vec![], now_ms: 3 },
        MetaCommand::CreateVolume { name: "x".into(), size: 2 * MIB, chunk_size: MIB, now_ms: 4 },
        MetaCommand::AcquireLease { volume: "x".into(), holder: "h".into(), node: 7, force: false, now_ms: 5 },
        MetaCommand::DeleteVolume { name: "x".into() },
        MetaCommand::CreateVolume { name: "y".into(), size: 2 * MIB, chunk_size: MIB, now_ms: 6 },
    ];
    for cmd in &history {
        let (_, changes) = replay.apply(cmd);
        for ch in changes {
            match ch.value {
                Some(v) => store.insert(ch.key, v),
                None => store.remove(&ch.key),
            };
        }
    }
    assert_eq!(ClusterMap::from_kv(store.clone()).expect("from_kv"), replay);
    assert_eq!(replay.to_kv(), store.into_iter().collect::<Vec<_>>());

    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(3, 0)], 2));
    apply_ok(&mut map, &MetaCommand::AcquireLease { volume: "vol".into(), holder: "h".into(), node: 1, force: false, now_ms: 1 });
    assert_persisted(&map);
    assert_persisted(&ClusterMap::new());
    assert_eq!(ClusterMap::from_kv(Vec::new()).expect("empty"), ClusterMap::new());
}

#[test]
fn from_kv_refuses_foreign_keys_garbage_and_inconsistency() {
    let (map, c) = with_chunk();
    let kv = map.to_kv();

    let mut foreign = kv.clone();
    foreign.push((b"\xffapplied".to_vec(), vec![1]));
    assert!(matches!(ClusterMap::from_kv(foreign), Err(MapError::UnknownKey { .. })));

    let mut garbage = kv.clone();
    garbage.push((MapKey::Node(9).encode(), vec![0xff; 3]));
    assert!(matches!(ClusterMap::from_kv(garbage), Err(MapError::Decode { .. })));

    // A chunk whose volume is missing.
    let orphan: Vec<_> = kv.iter().filter(|(k, _)| *k != MapKey::Volume(1).encode()).cloned().collect();
    assert!(matches!(ClusterMap::from_kv(orphan), Err(MapError::Inconsistent(_))));

    // A chunk stored under another chunk's key.
    let chunk_value = kv.iter().find(|(k, _)| *k == MapKey::Chunk(c).encode()).expect("chunk key").1.clone();
    let mut misfiled = kv.clone();
    misfiled.push((MapKey::Chunk(cid(1, 1)).encode(), chunk_value));
    assert!(matches!(ClusterMap::from_kv(misfiled), Err(MapError::Inconsistent(_))));

    // A volume id at or above the counter.
    let mut counter = kv.clone();
    counter.retain(|(k, _)| *k != MapKey::NextVolumeId.encode());
    counter.push((MapKey::NextVolumeId.encode(), crate::kv::encode_value(&1u64).expect("encode")));
    assert!(matches!(ClusterMap::from_kv(counter), Err(MapError::Inconsistent(_))));
}

// ---- repair planning ----

#[test]
fn dead_node_replicas_are_dropped_then_replaced_on_the_fourth_node() {
    let (mut map, c) = with_chunk();
    // A node that is merely late (still Alive in the map) triggers nothing.
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty());

    set_state(&mut map, 2, NodeState::Dead);
    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert_eq!(plan, vec![RepairAction::DropDead { chunk: c, version: 1, disks: vec![disk(2, 0)] }]);
    let cmd = plan[0].command().expect("DropDead has a command");
    apply_ok(&mut map, &cmd);

    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert_eq!(plan.len(), 1, "{plan:?}");
    match &plan[0] {
        RepairAction::AddReplica { chunk, version, disk: d, source, incremental } => {
            assert_eq!((*chunk, *version, *d, *incremental), (c, 2, disk(4, 0), false));
            assert!([disk(1, 0), disk(3, 0)].contains(source), "source {source}");
        }
        other => panic!("{other:?}"),
    }
    apply_ok(&mut map, &plan[0].command().expect("AddReplica has a command"));
    // One catch-up at a time: nothing more while node 4 is syncing.
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty());
    apply_ok(&mut map, &MetaCommand::ReplicaSynced { chunk: c, version: 3, disk: disk(4, 0) });
    assert_eq!(map.chunk_health().degraded, 0);
    // Node 2 is dead: its stale copy is not deletable now.
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty());
    // It comes back: the stale copy goes.
    set_state(&mut map, 2, NodeState::Alive);
    assert_eq!(plan_repairs(&map, &Usage::new(), 10, 0), vec![RepairAction::DeleteStale { chunk: c, disk: disk(2, 0) }]);
}

#[test]
fn stale_disk_on_a_returning_node_gets_an_incremental_catch_up() {
    let (mut map, c) = with_chunk();
    // Node 3 missed a write: the writer dropped it, it is stale but its node is Alive.
    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(3, 0)], 2));
    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert_eq!(plan.len(), 1, "{plan:?}");
    match &plan[0] {
        RepairAction::AddReplica { disk: d, incremental, version, .. } => {
            assert_eq!((*d, *incremental, *version), (disk(3, 0), true, 2));
        }
        other => panic!("{other:?}"),
    }
    apply_ok(&mut map, &plan[0].command().expect("command"));
    assert!(map.chunk(c).expect("chunk").stale.is_empty());
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty(), "no second catch-up while syncing");
}

#[test]
fn stale_copies_are_deleted_only_once_healthy() {
    let (mut map, c) = with_chunk();
    // 3 dropped; 4 gets the new copy instead (as if node 3 had been full).
    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(3, 0)], 2));
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(4, 0) });
    // Syncing: not healthy yet, stale copy on 3 kept (it might still be needed).
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty());
    apply_ok(&mut map, &MetaCommand::ReplicaSynced { chunk: c, version: 3, disk: disk(4, 0) });
    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert_eq!(plan, vec![RepairAction::DeleteStale { chunk: c, disk: disk(3, 0) }]);
    assert_eq!(plan[0].command(), None);
    apply_ok(&mut map, &MetaCommand::ForgetStale { chunk: c, disk: disk(3, 0) });
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty());
}

#[test]
fn repairs_are_ordered_by_urgency_and_capped() {
    let mut map = cluster(&[1, 1, 1, 1, 1]);
    create(&mut map, "vol", 4 * MIB);
    let two = allocate(&mut map, cid(1, 0), &[disk(1, 0), disk(2, 0)]).id;
    let one = allocate(&mut map, cid(1, 1), &[disk(3, 0)]).id;
    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert_eq!(plan.iter().map(RepairAction::chunk).collect::<Vec<_>>(), vec![one, two]);
    let plan = plan_repairs(&map, &Usage::new(), 1, 0);
    assert_eq!(plan.iter().map(RepairAction::chunk).collect::<Vec<_>>(), vec![one]);
    assert!(plan_repairs(&map, &Usage::new(), 0, 0).is_empty());
    // Each plan action applies cleanly as planned.
    for a in plan_repairs(&map, &Usage::new(), 10, 0) {
        apply_ok(&mut map, &a.command().expect("command"));
    }
}

#[test]
fn one_plan_spreads_new_replicas_over_equally_free_disks() {
    // Many one-copy chunks, six candidate hosts with equal free space: deducting planned
    // chunks keeps the plan from stacking everything on one disk.
    let mut map = cluster(&[1, 1, 1, 1, 1, 1, 1]);
    map.apply(&MetaCommand::CreateVolume { name: "v".into(), size: 64 << 30, chunk_size: 1 << 30, now_ms: 0 });
    for i in 0..30 {
        allocate(&mut map, cid(1, i), &[disk(7, 0)]);
    }
    let usage: Usage = (1..=7u64)
        .map(|n| (disk(n, 0), crate::DiskSpace { total_bytes: 10 << 30, free_bytes: 10 << 30 }))
        .collect();
    let plan = plan_repairs(&map, &usage, 100, 42);
    assert_eq!(plan.len(), 30);
    let mut per_node = std::collections::BTreeMap::<u64, usize>::new();
    for a in &plan {
        if let RepairAction::AddReplica { disk, .. } = a {
            *per_node.entry(disk.node).or_default() += 1;
        }
    }
    assert_eq!(per_node.len(), 6, "{per_node:?}");
    assert!(per_node.values().all(|&n| n <= 7), "{per_node:?}");
}

#[test]
fn chunks_whose_every_copy_is_on_dead_nodes_are_left_alone_until_one_returns() {
    let (mut map, c) = with_chunk();
    for n in 1..=3 {
        set_state(&mut map, n, NodeState::Dead);
    }
    // No readable source anywhere: nothing to copy from, and nothing to drop.
    assert!(plan_repairs(&map, &Usage::new(), 10, 0).is_empty());
    assert_eq!(map.chunk_health().unavailable, 1);
    // One node comes back: its copy is current, so the chunk is readable again and the
    // other two dead copies can go.
    set_state(&mut map, 2, NodeState::Alive);
    assert_eq!(map.chunk_health().unavailable, 0);
    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert_eq!(plan, vec![RepairAction::DropDead { chunk: c, version: 1, disks: vec![disk(1, 0), disk(3, 0)] }]);
}

#[test]
fn small_cluster_chunk_as_healthy_as_it_can_be_drops_its_stale_copies() {
    // Two hosts: two copies is the target, there is nowhere to add a third.
    let mut map = cluster(&[2, 1]);
    create(&mut map, "v", MIB);
    let c = allocate(&mut map, cid(1, 0), &[disk(1, 1), disk(2, 0)]).id;
    // Disk 1/1 misses a write; the copy moves to disk 1/0 of the same host.
    apply_ok(&mut map, &drop_cmd(c, 1, &[disk(1, 1)], 1));
    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert!(
        matches!(plan.as_slice(), [RepairAction::AddReplica { disk: d, incremental: true, .. }] if *d == disk(1, 1)),
        "{plan:?}"
    );
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c, version: 2, disk: disk(1, 0) });
    assert_eq!(map.chunk_health(), ChunkHealth { total: 1, degraded: 1, syncing: 1, unavailable: 0 });
    apply_ok(&mut map, &MetaCommand::ReplicaSynced { chunk: c, version: 3, disk: disk(1, 0) });
    assert_eq!(map.chunk_health().degraded, 0);
    assert_eq!(plan_repairs(&map, &Usage::new(), 10, 0), vec![RepairAction::DeleteStale { chunk: c, disk: disk(1, 1) }]);
}

#[test]
fn the_last_readable_copies_are_never_dropped_even_with_min_zero() {
    let (mut map, c) = with_chunk();
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c, version: 1, disk: disk(4, 0) });
    // Only a syncing copy would be left: refused, whatever the minimum.
    apply_err(&mut map, &drop_cmd(c, 2, &[disk(1, 0), disk(2, 0), disk(3, 0)], 0), ErrorCode::Unavailable);
    let after = reply_chunk(apply_ok(&mut map, &drop_cmd(c, 2, &[disk(1, 0), disk(2, 0)], 0)));
    assert_eq!(after.readable().count(), 1);
    assert_eq!(map.chunk_health(), ChunkHealth { total: 1, degraded: 1, syncing: 1, unavailable: 0 });
}

#[test]
fn clean_ups_come_after_every_repair() {
    let mut map = cluster(&[1, 1, 1, 1, 1]);
    create(&mut map, "vol", 4 * MIB);
    // Chunk 0: healthy with a stale copy on node 4. Chunk 1: three copies, one on a node
    // about to die (same readable count as chunk 0 until then).
    let c0 = allocate(&mut map, cid(1, 0), &[disk(1, 0), disk(2, 0), disk(4, 0)]).id;
    apply_ok(&mut map, &drop_cmd(c0, 1, &[disk(4, 0)], 2));
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c0, version: 2, disk: disk(3, 0) });
    apply_ok(&mut map, &MetaCommand::ReplicaSynced { chunk: c0, version: 3, disk: disk(3, 0) });
    let c1 = allocate(&mut map, cid(1, 1), &[disk(1, 0), disk(2, 0), disk(3, 0)]).id;
    apply_ok(&mut map, &MetaCommand::AddReplica { chunk: c1, version: 1, disk: disk(5, 0) });
    apply_ok(&mut map, &MetaCommand::ReplicaSynced { chunk: c1, version: 2, disk: disk(5, 0) });
    set_state(&mut map, 5, NodeState::Dead);
    let plan = plan_repairs(&map, &Usage::new(), 10, 0);
    assert_eq!(
        plan,
        vec![
            RepairAction::DropDead { chunk: c1, version: 2, disks: vec![disk(5, 0)] },
            RepairAction::DeleteStale { chunk: c0, disk: disk(4, 0) },
        ]
    );
    assert_eq!(plan_repairs(&map, &Usage::new(), 1, 0), plan[..1].to_vec());
}

fn put_record(key: &str, value: Option<&[u8]>, expected: Option<u64>) -> MetaCommand {
    MetaCommand::PutRecord { key: key.into(), value: value.map(<[u8]>::to_vec), expected }
}

fn record_of(reply: MetaReply) -> Option<basalt_types::Record> {
    match reply {
        MetaReply::Record(r) => r,
        other => panic!("expected a record, got {other:?}"),
    }
}

#[test]
fn records_are_compare_and_swap_with_versions_never_reused() {
    let mut map = ClusterMap::new();
    // Create only if absent.
    let a = record_of(apply_ok(&mut map, &put_record("iscsi/t/a", Some(b"one"), Some(0)))).expect("record");
    assert_eq!((a.value.as_slice(), a.version), (&b"one"[..], 1));
    apply_err(&mut map, &put_record("iscsi/t/a", Some(b"again"), Some(0)), ErrorCode::StaleVersion);
    // Update at the right version only.
    apply_err(&mut map, &put_record("iscsi/t/a", Some(b"two"), Some(7)), ErrorCode::StaleVersion);
    let a2 = record_of(apply_ok(&mut map, &put_record("iscsi/t/a", Some(b"two"), Some(1)))).expect("record");
    assert_eq!(a2.version, 2);
    apply_ok(&mut map, &put_record("iscsi/t/b", Some(b"b"), None));
    apply_ok(&mut map, &put_record("iscsi/u", Some(b"u"), None));
    let listed: Vec<&str> = map.records_with_prefix("iscsi/t/").map(|r| r.key.as_str()).collect();
    assert_eq!(listed, vec!["iscsi/t/a", "iscsi/t/b"]);
    // Delete, then re-create: the version does not start over (no ABA for a stale CAS).
    assert_eq!(record_of(apply_ok(&mut map, &put_record("iscsi/t/a", None, Some(2)))), None);
    assert!(map.record("iscsi/t/a").is_none());
    let again = record_of(apply_ok(&mut map, &put_record("iscsi/t/a", Some(b"new"), Some(0)))).expect("record");
    assert!(again.version > 2, "version {} reused", again.version);
    apply_err(&mut map, &put_record("iscsi/t/a", Some(b"stale"), Some(2)), ErrorCode::StaleVersion);
    // Bad keys and oversized values are refused.
    apply_err(&mut map, &put_record("", Some(b"x"), None), ErrorCode::InvalidArgument);
    apply_err(&mut map, &put_record("has space", Some(b"x"), None), ErrorCode::InvalidArgument);
    apply_err(&mut map, &put_record(&"k".repeat(300), Some(b"x"), None), ErrorCode::InvalidArgument);
    let big = vec![0u8; basalt_types::MAX_RECORD_VALUE + 1];
    apply_err(&mut map, &put_record("big", Some(&big), None), ErrorCode::InvalidArgument);
    // Records survive the round trip through the store.
    let back = ClusterMap::from_kv(map.to_kv()).expect("from_kv");
    assert_eq!(back, map);
}
