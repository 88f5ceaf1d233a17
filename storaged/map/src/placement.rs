//! Choosing disks for new replicas: one per host, Alive hosts only, freest first.
//!
//! Runs on the Raft leader with the disk usage it collects from heartbeats; the result goes
//! into a command (`AllocateChunk`, `AddReplica`), so `apply` itself never places anything.

use crate::map::ClusterMap;
use basalt_types::{DiskId, DiskUsage, NodeId, NodeState};
use std::collections::BTreeMap;

/// Space of one disk as last reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskSpace {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

impl From<&DiskUsage> for DiskSpace {
    fn from(u: &DiskUsage) -> Self {
        DiskSpace { total_bytes: u.total_bytes, free_bytes: u.free_bytes }
    }
}

/// Latest known space per disk (a heartbeat's `DiskUsage { disk, .. }` from node `n` is the
/// entry for `DiskId { node: n, disk }`). Disks missing here fall back to the sizes they
/// registered with.
pub type Usage = BTreeMap<DiskId, DiskSpace>;

/// Disks whose free fraction is within the same whole percent count as equally free, and the
/// seed decides between them. Without this, every allocation made between two heartbeats
/// (usage only changes when they arrive) would pick the very same disks.
const FREE_BUCKETS: u128 = 100;

/// The space known for `disk`: the heartbeat's figure, else the registration's.
pub(crate) fn space_of(map: &ClusterMap, usage: &Usage, disk: DiskId) -> Option<DiskSpace> {
    if let Some(s) = usage.get(&disk) {
        return Some(*s);
    }
    let info = map.node(disk.node)?.disks.iter().find(|d| d.id == disk)?;
    Some(DiskSpace { total_bytes: info.total_bytes, free_bytes: info.free_bytes })
}

/// Picks up to `want` disks on distinct Alive nodes outside `exclude_nodes`.
///
/// Disks are ranked by their *fraction* of free space (so disks of different sizes fill up
/// at the same rate), quantised to whole percents; within a percent `seed` orders them, so
/// equally free disks share the load when callers vary the seed. Disks with no free space or
/// an unknown size are never picked. Returns fewer disks (possibly none) when there are not
/// enough eligible hosts; the result is in rank order.
pub fn place(map: &ClusterMap, usage: &Usage, want: usize, exclude_nodes: &[NodeId], seed: u64) -> Vec<DiskId> {
    if want == 0 {
        return Vec::new();
    }
    // (percent free, descending via Reverse; seeded tie-break; disk)
    let mut candidates: Vec<(std::cmp::Reverse<u128>, u64, DiskId)> = map
        .nodes()
        .filter(|n| n.state == NodeState::Alive && !exclude_nodes.contains(&n.id))
        .flat_map(|n| n.disks.iter().map(|d| d.id))
        .filter_map(|disk| {
            let s = space_of(map, usage, disk)?;
            if s.total_bytes == 0 || s.free_bytes == 0 {
                return None;
            }
            let free = u128::from(s.free_bytes.min(s.total_bytes));
            let bucket = free * FREE_BUCKETS / u128::from(s.total_bytes);
            Some((std::cmp::Reverse(bucket), mix(seed, disk.node, u64::from(disk.disk)), disk))
        })
        .collect();
    candidates.sort_unstable();
    let mut picked: Vec<DiskId> = Vec::with_capacity(want.min(candidates.len()));
    for (_, _, disk) in candidates {
        if picked.len() == want {
            break;
        }
        if !picked.iter().any(|p| p.node == disk.node) {
            picked.push(disk);
        }
    }
    picked
}

/// A well-spread 64-bit hash of three words (splitmix64 finaliser), for seeded tie-breaks.
pub(crate) fn mix(seed: u64, a: u64, b: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    splitmix(seed ^ splitmix(a ^ splitmix(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use basalt_types::{MetaCommand, NodeState};
    use std::collections::BTreeSet;

    fn usage(entries: &[(u64, u32, u64, u64)]) -> Usage {
        entries
            .iter()
            .map(|&(node, disk, free, total)| (DiskId { node, disk }, DiskSpace { free_bytes: free, total_bytes: total }))
            .collect()
    }

    #[test]
    fn picks_distinct_hosts_freest_first() {
        // Node 1 has two disks; its emptier one must win over node 3, and node 1 appears once.
        let map = cluster(&[2, 1, 1, 1]);
        let u = usage(&[
            (1, 0, 10, 100),
            (1, 1, 95, 100),
            (2, 0, 90, 100),
            (3, 0, 50, 100),
            (4, 0, 70, 100),
        ]);
        for seed in 0..20 {
            let got = place(&map, &u, 3, &[], seed);
            assert_eq!(got, vec![disk(1, 1), disk(2, 0), disk(4, 0)], "seed {seed}");
        }
    }

    #[test]
    fn ranks_by_fraction_not_absolute_bytes() {
        let map = cluster(&[1, 1]);
        // Node 1: 400 of 1000 free (40%); node 2: 90 of 100 free (90%).
        let u = usage(&[(1, 0, 400, 1000), (2, 0, 90, 100)]);
        assert_eq!(place(&map, &u, 1, &[], 7), vec![disk(2, 0)]);
    }

    #[test]
    fn skips_dead_excluded_and_full_disks() {
        let mut map = cluster(&[1, 1, 1, 1, 1]);
        apply_ok(&mut map, &MetaCommand::SetNodeState { id: 2, state: NodeState::Dead, now_ms: 5 });
        let u = usage(&[
            (1, 0, 100, 100),
            (2, 0, 100, 100),
            (3, 0, 100, 100),
            (4, 0, 0, 100),
            (5, 0, 100, 100),
        ]);
        let got = place(&map, &u, 3, &[3], 1);
        let nodes: BTreeSet<u64> = got.iter().map(|d| d.node).collect();
        assert_eq!(nodes, BTreeSet::from([1, 5]), "dead 2, excluded 3 and full 4 must be skipped");
    }

    #[test]
    fn returns_fewer_when_not_enough_hosts() {
        let map = cluster(&[3, 2]);
        let got = place(&map, &Usage::new(), 3, &[], 0);
        assert_eq!(got.len(), 2);
        assert_ne!(got[0].node, got[1].node);
        assert!(place(&map, &Usage::new(), 3, &[1, 2], 0).is_empty());
        assert!(place(&map, &Usage::new(), 0, &[], 0).is_empty());
    }

    #[test]
    fn falls_back_to_registered_space() {
        // No heartbeat yet: registration says node 2 is the emptier one.
        let mut map = ClusterMap::new();
        register(&mut map, 1, &[(0, 100, 1000)]);
        register(&mut map, 2, &[(0, 900, 1000)]);
        assert_eq!(place(&map, &Usage::new(), 1, &[], 3), vec![disk(2, 0)]);
    }

    #[test]
    fn seed_spreads_equally_free_disks() {
        let map = cluster(&[1, 1, 1, 1, 1, 1]);
        let firsts: BTreeSet<DiskId> = (0..64).map(|seed| place(&map, &Usage::new(), 1, &[], seed)[0]).collect();
        assert!(firsts.len() >= 4, "equal disks should be spread by the seed, got {firsts:?}");
    }
}
