//! Property-style checks of the state machine with seeded pseudo-random command streams:
//! replicas that apply the same log agree, the persisted changes rebuild the same map, a
//! refused command changes nothing, and no input makes `apply` (or the planners) panic.

use basalt_map::{place, plan_repairs, ClusterMap, DiskSpace, Usage};
use basalt_types::{ChunkId, DiskId, DiskInfo, MetaCommand, MetaReply, NodeState};
use std::collections::BTreeMap;

/// xorshift64*: small, seedable, good enough to drive tests.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const MIB: u64 = 1 << 20;
const NAMES: &[&str] = &["a", "b", "c", "d", "", ".x", "bad/name"];

fn disk_id(rng: &mut Rng) -> DiskId {
    DiskId { node: 1 + rng.below(6), disk: rng.below(2) as u32 }
}

/// Usually a chunk of an existing volume, within its size; sometimes anything nearby.
fn chunk_id(rng: &mut Rng, map: &ClusterMap) -> ChunkId {
    let volumes: Vec<(u64, u64)> = map.volumes().map(|v| (v.id, v.size.div_ceil(v.chunk_size))).collect();
    if !volumes.is_empty() && rng.chance(80) {
        let &(volume, chunks) = rng.pick(&volumes);
        return ChunkId { volume, index: rng.below(chunks) };
    }
    ChunkId { volume: 1 + rng.below(6), index: rng.below(9) }
}

/// A version that is usually the chunk's current one, so most chunk commands get through.
fn version(rng: &mut Rng, map: &ClusterMap, chunk: ChunkId) -> u64 {
    match map.chunk(chunk) {
        Some(c) if rng.chance(85) => c.version,
        _ => rng.below(6),
    }
}

/// Plausible commands over a small id space, so that they often succeed and interact.
fn plausible_command(rng: &mut Rng, map: &ClusterMap, now: u64) -> MetaCommand {
    match rng.below(15) {
        0 => {
            let id = 1 + rng.below(6);
            let disks = (0..rng.below(3) as u32)
                .map(|d| DiskInfo {
                    id: DiskId { node: id, disk: d },
                    path: format!("/d{d}"),
                    total_bytes: 1 << 40,
                    free_bytes: rng.below(1 << 40),
                })
                .collect();
            MetaCommand::RegisterNode {
                id,
                name: format!("n{id}"),
                rpc_addr: format!("127.0.0.{id}:1"),
                nbd_addr: String::new(),
                disks,
                now_ms: now,
            }
        }
        1 | 2 => MetaCommand::SetNodeState {
            id: 1 + rng.below(7),
            state: if rng.chance(50) { NodeState::Dead } else { NodeState::Alive },
            now_ms: now,
        },
        3 => MetaCommand::CreateVolume {
            name: rng.pick(NAMES).to_string(),
            size: (1 + rng.below(8)) * MIB / if rng.chance(20) { 3 } else { 1 },
            chunk_size: if rng.chance(90) { MIB } else { rng.below(4) * MIB },
            now_ms: now,
        },
        4 => MetaCommand::DeleteVolume { name: rng.pick(NAMES).to_string() },
        5 => MetaCommand::ResizeVolume { name: rng.pick(NAMES).to_string(), size: rng.below(10) * MIB / 2 },
        6 => MetaCommand::AcquireLease {
            volume: rng.pick(NAMES).to_string(),
            holder: rng.pick(&["h1", "h2", "h3", ""]).to_string(),
            node: 1 + rng.below(6),
            force: rng.chance(30),
            now_ms: now,
        },
        7 => MetaCommand::ReleaseLease {
            volume: rng.pick(NAMES).to_string(),
            holder: rng.pick(&["h1", "h2", "h3"]).to_string(),
        },
        8 | 9 => {
            // Mostly what the leader would propose; sometimes arbitrary disks.
            let disks = if rng.chance(70) {
                place(map, &Usage::new(), 3, &[], rng.next())
            } else {
                (0..rng.below(5)).map(|_| disk_id(rng)).collect()
            };
            MetaCommand::AllocateChunk { chunk: chunk_id(rng, map), disks }
        }
        10 => {
            let chunk = chunk_id(rng, map);
            let disks = (0..1 + rng.below(3)).map(|_| disk_id(rng)).collect();
            MetaCommand::DropReplicas { chunk, version: version(rng, map, chunk), disks, min_replicas: rng.below(4) as u32 }
        }
        11 => {
            let chunk = chunk_id(rng, map);
            MetaCommand::AddReplica { chunk, version: version(rng, map, chunk), disk: disk_id(rng) }
        }
        12 => {
            let chunk = chunk_id(rng, map);
            // Prefer a syncing replica so the command can succeed.
            let syncing = map
                .chunk(chunk)
                .and_then(|c| c.replicas.iter().find(|r| r.state == basalt_types::ReplicaState::Syncing))
                .map(|r| r.disk);
            let disk = match syncing {
                Some(d) if rng.chance(80) => d,
                _ => disk_id(rng),
            };
            MetaCommand::ReplicaSynced { chunk, version: version(rng, map, chunk), disk }
        }
        13 => MetaCommand::ForgetStale { chunk: chunk_id(rng, map), disk: disk_id(rng) },
        _ => MetaCommand::Noop,
    }
}

fn wild_u64(rng: &mut Rng) -> u64 {
    match rng.below(6) {
        0 => 0,
        1 => u64::MAX,
        2 => u64::MAX - rng.below(1024),
        3 => 1 << rng.below(64),
        4 => rng.below(16),
        _ => rng.next(),
    }
}

fn wild_string(rng: &mut Rng) -> String {
    let len = rng.below(200) as usize;
    (0..len).map(|_| char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('?')).collect()
}

fn wild_disk(rng: &mut Rng) -> DiskId {
    DiskId { node: wild_u64(rng), disk: wild_u64(rng) as u32 }
}

/// Anything at all, including values no honest proposer would send.
fn garbage_command(rng: &mut Rng) -> MetaCommand {
    let chunk = ChunkId { volume: wild_u64(rng), index: wild_u64(rng) };
    let disks: Vec<DiskId> = (0..rng.below(6)).map(|_| wild_disk(rng)).collect();
    match rng.below(14) {
        0 => MetaCommand::RegisterNode {
            id: wild_u64(rng),
            name: wild_string(rng),
            rpc_addr: wild_string(rng),
            nbd_addr: wild_string(rng),
            disks: disks
                .iter()
                .map(|&id| DiskInfo { id, path: wild_string(rng), total_bytes: wild_u64(rng), free_bytes: wild_u64(rng) })
                .collect(),
            now_ms: wild_u64(rng),
        },
        1 => MetaCommand::SetNodeState { id: wild_u64(rng), state: NodeState::Dead, now_ms: wild_u64(rng) },
        2 => MetaCommand::CreateVolume {
            name: wild_string(rng),
            size: wild_u64(rng),
            chunk_size: wild_u64(rng),
            now_ms: wild_u64(rng),
        },
        3 => MetaCommand::DeleteVolume { name: wild_string(rng) },
        4 => MetaCommand::ResizeVolume { name: wild_string(rng), size: wild_u64(rng) },
        5 => MetaCommand::AcquireLease {
            volume: wild_string(rng),
            holder: wild_string(rng),
            node: wild_u64(rng),
            force: rng.chance(50),
            now_ms: wild_u64(rng),
        },
        6 => MetaCommand::ReleaseLease { volume: wild_string(rng), holder: wild_string(rng) },
        7 => MetaCommand::AllocateChunk { chunk, disks },
        8 => MetaCommand::DropReplicas { chunk, version: wild_u64(rng), disks, min_replicas: wild_u64(rng) as u32 },
        9 => MetaCommand::AddReplica { chunk, version: wild_u64(rng), disk: wild_disk(rng) },
        10 => MetaCommand::ReplicaSynced { chunk, version: wild_u64(rng), disk: wild_disk(rng) },
        11 => MetaCommand::ForgetStale { chunk, disk: wild_disk(rng) },
        12 => MetaCommand::SetNodeState { id: wild_u64(rng), state: NodeState::Alive, now_ms: wild_u64(rng) },
        _ => MetaCommand::Noop,
    }
}

fn usage_of(map: &ClusterMap, rng: &mut Rng) -> Usage {
    map.nodes()
        .flat_map(|n| n.disks.iter().map(|d| d.id))
        .map(|d| (d, DiskSpace { total_bytes: 1 << 40, free_bytes: rng.below(1 << 40) }))
        .collect()
}

fn write(store: &mut BTreeMap<Vec<u8>, Vec<u8>>, changes: Vec<basalt_map::KvChange>) {
    for ch in changes {
        match ch.value {
            Some(v) => store.insert(ch.key, v),
            None => store.remove(&ch.key),
        };
    }
}

#[test]
fn replicas_applying_the_same_log_agree_with_each_other_and_with_the_store() {
    let mut kinds: BTreeMap<String, u32> = BTreeMap::new();
    for seed in 1..=12u64 {
        let mut rng = Rng::new(seed);
        let mut a = ClusterMap::new();
        let mut b = ClusterMap::new();
        let mut store = BTreeMap::new();
        let mut successes = 0;
        for step in 0..1500u64 {
            let cmd = plausible_command(&mut rng, &a, step);
            let before = a.clone();
            let (ra, ca) = a.apply(&cmd);
            let (rb, cb) = b.apply(&cmd);
            assert_eq!(ra, rb, "seed {seed} step {step}: {cmd:?}");
            assert_eq!(ca, cb, "seed {seed} step {step}: {cmd:?}");
            assert_eq!(a, b, "seed {seed} step {step}: {cmd:?}");
            if matches!(ra, MetaReply::Error(_)) {
                assert!(ca.is_empty(), "refused command returned changes: {cmd:?}");
                assert_eq!(a, before, "refused command changed the map: {cmd:?}");
            } else {
                successes += 1;
                // Count successes that changed a replica set, per kind, to be sure the stream
                // reaches the interesting paths.
                if !ca.is_empty() {
                    let kind = format!("{cmd:?}").split([' ', '{']).next().unwrap_or("").to_owned();
                    *kinds.entry(kind).or_insert(0u32) += 1;
                }
            }
            write(&mut store, ca);
            if step % 100 == 99 {
                let rebuilt = ClusterMap::from_kv(store.clone())
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: store does not load: {e}"));
                assert_eq!(rebuilt, a, "seed {seed} step {step}");
                assert_eq!(a.to_kv(), store.clone().into_iter().collect::<Vec<_>>(), "seed {seed} step {step}");
                // Planners run on whatever the map has become.
                let usage = usage_of(&a, &mut rng);
                let placed = place(&a, &usage, 3, &[], rng.next());
                let mut nodes: Vec<u64> = placed.iter().map(|d| d.node).collect();
                nodes.dedup();
                assert_eq!(nodes.len(), placed.len());
                for action in plan_repairs(&a, &usage, 20, rng.next()) {
                    if let Some(cmd) = action.command() {
                        // Planned against the current map, each one applies on its own.
                        let mut trial = a.clone();
                        let (reply, _) = trial.apply(&cmd);
                        assert!(!matches!(reply, MetaReply::Error(_)), "planned {action:?} refused: {reply:?}");
                    }
                }
            }
        }
        assert!(successes > 300, "seed {seed}: only {successes} commands succeeded; the test exercises too little");
        assert_eq!(ClusterMap::from_kv(a.to_kv()).expect("round trip"), a);
    }
    for kind in [
        "RegisterNode",
        "SetNodeState",
        "CreateVolume",
        "DeleteVolume",
        "ResizeVolume",
        "AcquireLease",
        "ReleaseLease",
        "AllocateChunk",
        "DropReplicas",
        "AddReplica",
        "ReplicaSynced",
        "ForgetStale",
    ] {
        assert!(kinds.get(kind).copied().unwrap_or(0) >= 5, "{kind} rarely succeeded: {kinds:?}");
    }
}

#[test]
fn garbage_commands_never_panic_and_keep_the_map_loadable() {
    for seed in 100..110u64 {
        let mut rng = Rng::new(seed);
        let mut map = ClusterMap::new();
        let mut store = BTreeMap::new();
        for step in 0..3000u64 {
            // Mix garbage with plausible commands so garbage meets a populated map.
            let cmd = if rng.chance(50) { garbage_command(&mut rng) } else { plausible_command(&mut rng, &map, step) };
            let (_, changes) = map.apply(&cmd);
            write(&mut store, changes);
        }
        let rebuilt = ClusterMap::from_kv(store).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(rebuilt, map);
        let usage = usage_of(&map, &mut rng);
        let _ = plan_repairs(&map, &usage, usize::MAX, rng.next());
        let _ = place(&map, &usage, usize::MAX, &[], rng.next());
        let _ = map.chunk_health();
    }
}
