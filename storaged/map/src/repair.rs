//! Repair planning: what the leader should do next to bring chunks back to [`REPLICAS`]
//! readable copies on distinct hosts, and to clean up stale copies afterwards.
//!
//! A plan is a snapshot: every action carries the chunk version it was planned against, and
//! a chunk gets at most one version-changing action per plan, so actions can be executed in
//! any order or concurrently; one whose version went stale is refused by `apply`
//! (`StaleVersion`) and the next plan reconsiders the chunk. Hence a dead node's chunk
//! needs two plans: `DropDead`, then `AddReplica`.

use crate::map::ClusterMap;
use crate::placement::{mix, place, space_of, Usage};
use basalt_types::{ChunkId, ChunkInfo, ChunkVersion, DiskId, MetaCommand, NodeState, ReplicaState, REPLICAS};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepairAction {
    /// Replicas (readable or syncing) on Dead nodes: drop them, recording what already
    /// happened. Propose as `DropReplicas` with `min_replicas: 0` (see [`RepairAction::command`]).
    DropDead { chunk: ChunkId, version: ChunkVersion, disks: Vec<DiskId> },
    /// Add a replica on `disk`, filled from `source` (a readable replica on an Alive node).
    /// `incremental`: `disk` holds a stale copy, so only the blocks that differ need copying
    /// (catch-up after a short outage). Propose `AddReplica`, then have the target
    /// `SyncFrom` the source, then propose `ReplicaSynced`.
    AddReplica { chunk: ChunkId, version: ChunkVersion, disk: DiskId, source: DiskId, incremental: bool },
    /// The chunk is healthy (its target of readable copies on live hosts, none syncing):
    /// delete the stale copy on `disk` (an Alive node), then propose `ForgetStale`.
    DeleteStale { chunk: ChunkId, disk: DiskId },
}

impl RepairAction {
    pub fn chunk(&self) -> ChunkId {
        match self {
            RepairAction::DropDead { chunk, .. }
            | RepairAction::AddReplica { chunk, .. }
            | RepairAction::DeleteStale { chunk, .. } => *chunk,
        }
    }

    /// The command that starts this action in the metadata group. `DeleteStale` has none: the
    /// copy is deleted on the chunk server first and `ForgetStale` proposed afterwards, so a
    /// crash in between leaves a record of a copy that may still exist, never the reverse.
    pub fn command(&self) -> Option<MetaCommand> {
        match self {
            RepairAction::DropDead { chunk, version, disks } => Some(MetaCommand::DropReplicas {
                chunk: *chunk,
                version: *version,
                disks: disks.clone(),
                min_replicas: 0,
            }),
            RepairAction::AddReplica { chunk, version, disk, .. } => {
                Some(MetaCommand::AddReplica { chunk: *chunk, version: *version, disk: *disk })
            }
            RepairAction::DeleteStale { .. } => None,
        }
    }
}

/// Plans at most `max` repair actions, most urgent first: chunks are taken in order of how
/// few readable replicas they have on live hosts (1 before 2), then by id; stale-copy
/// deletions of healthy chunks come last.
///
/// Per chunk:
/// - replicas on Dead nodes → `DropDead` (nothing else for that chunk in this plan), unless
///   no readable replica is left on a live node: then the chunk waits for its nodes;
/// - else, with no replica syncing (one catch-up at a time per chunk) and fewer than
///   [`REPLICAS`] replicas → `AddReplica`: to the most recently dropped stale disk on an
///   Alive node not already holding a replica (incremental), else to a placed disk. Nodes
///   that are down but not yet Dead are still Alive in the map, so their replicas stay in the
///   set and nothing is re-replicated until the dead timeout;
/// - else, when healthy → one `DeleteStale` per stale copy on an Alive node.
///
/// Placement within one plan deducts each chosen disk's chunk size from a working copy of
/// `usage`, so one plan does not pile every new replica onto the same freest disk.
pub fn plan_repairs(map: &ClusterMap, usage: &Usage, max: usize, seed: u64) -> Vec<RepairAction> {
    let mut actions = Vec::new();
    if max == 0 {
        return actions;
    }
    let target = map.target_replicas();
    // (cleanup only, live readable replicas, chunk): repairs before clean-ups, then the
    // chunks closest to losing data first.
    let mut work: Vec<(bool, usize, &ChunkInfo)> = map
        .chunks()
        .filter_map(|c| {
            let live = map.live_readable(c);
            let dead = c.replicas.iter().any(|r| is_dead(map, r.disk.node));
            let syncing = c.replicas.iter().any(|r| r.state == ReplicaState::Syncing);
            let needs_add = !syncing && c.replicas.len() < REPLICAS && live > 0;
            let healthy = !dead && !syncing && live >= target;
            let has_stale = c.stale.iter().any(|d| map.is_alive(d.node));
            let repair = dead || needs_add;
            (repair || (healthy && has_stale)).then_some((!repair, live, c))
        })
        .collect();
    // Stable sort keeps the id order among equally urgent chunks.
    work.sort_by_key(|&(cleanup, live, _)| (cleanup, live));

    let mut working = usage.clone();
    for (_, live, chunk) in work {
        if actions.len() >= max {
            break;
        }
        let dead: Vec<DiskId> =
            chunk.replicas.iter().filter(|r| is_dead(map, r.disk.node)).map(|r| r.disk).collect();
        if !dead.is_empty() {
            if live == 0 {
                // Every readable copy is on a dead node: nothing to copy from, and dropping
                // them would lose the chunk. It comes back with its node.
                continue;
            }
            actions.push(RepairAction::DropDead { chunk: chunk.id, version: chunk.version, disks: dead });
            continue;
        }
        let syncing = chunk.replicas.iter().any(|r| r.state == ReplicaState::Syncing);
        if syncing {
            continue;
        }
        if chunk.replicas.len() < REPLICAS {
            if let Some(action) = plan_add(map, &mut working, chunk, seed) {
                actions.push(action);
                continue;
            }
            // No host can take another copy (small cluster): the chunk may still be as
            // healthy as this cluster allows, so its stale copies can go.
        }
        if live >= target {
            for &disk in chunk.stale.iter().filter(|d| map.is_alive(d.node)) {
                if actions.len() >= max {
                    break;
                }
                actions.push(RepairAction::DeleteStale { chunk: chunk.id, disk });
            }
        }
    }
    actions
}

fn is_dead(map: &ClusterMap, node: u64) -> bool {
    map.node(node).is_some_and(|n| n.state == NodeState::Dead)
}

fn plan_add(map: &ClusterMap, working: &mut Usage, chunk: &ChunkInfo, seed: u64) -> Option<RepairAction> {
    let chunk_seed = mix(seed, chunk.id.volume, chunk.id.index);
    let sources: Vec<DiskId> = chunk.readable().filter(|r| map.is_alive(r.disk.node)).map(|r| r.disk).collect();
    if sources.is_empty() {
        return None;
    }
    // Spread copy traffic over the readable replicas.
    let source = sources[(chunk_seed % sources.len() as u64) as usize];
    let holders: Vec<u64> = chunk.replicas.iter().map(|r| r.disk.node).collect();
    // The most recently dropped copy missed the fewest writes.
    let stale = chunk
        .stale
        .iter()
        .rev()
        .find(|d| !holders.contains(&d.node) && map.check_replica_target(**d).is_ok());
    let (disk, incremental) = match stale {
        Some(&d) => (d, true),
        None => {
            let d = *place(map, working, 1, &holders, chunk_seed).first()?;
            let chunk_size = map.volume(chunk.id.volume).map_or(0, |v| v.chunk_size);
            if let Some(mut space) = space_of(map, working, d) {
                space.free_bytes = space.free_bytes.saturating_sub(chunk_size);
                working.insert(d, space);
            }
            (d, false)
        }
    };
    Some(RepairAction::AddReplica { chunk: chunk.id, version: chunk.version, disk, source, incremental })
}
