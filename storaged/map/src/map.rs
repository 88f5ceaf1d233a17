//! The in-memory cluster map and its read-only queries; loading it from, and dumping it to,
//! persisted key/values.

use crate::kv::{decode_value, encode_value, show_raw_key, MapKey};
use crate::{MapError, Result};
use basalt_types::{
    ChunkId, ChunkInfo, NodeId, NodeInfo, NodeState, Record, VolumeId, VolumeInfo, REPLICAS,
};
use std::collections::BTreeMap;
use std::ops::Bound;

/// The first volume id handed out; 0 is never a volume, so it can mean "none" elsewhere.
pub(crate) const FIRST_VOLUME_ID: VolumeId = 1;

/// Nodes, volumes and chunks as the metadata group agrees on them. Changed only through
/// [`ClusterMap::apply`]; every container is ordered so iteration (and thus every answer)
/// is the same on every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMap {
    pub(crate) nodes: BTreeMap<NodeId, NodeInfo>,
    pub(crate) volumes: BTreeMap<VolumeId, VolumeInfo>,
    /// Derived from `volumes`; never persisted.
    pub(crate) volume_names: BTreeMap<String, VolumeId>,
    pub(crate) chunks: BTreeMap<ChunkId, ChunkInfo>,
    pub(crate) next_volume_id: VolumeId,
    pub(crate) records: BTreeMap<String, Record>,
    /// Version given to the last record written (0: none yet).
    pub(crate) record_seq: u64,
}

impl Default for ClusterMap {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterMap {
    pub fn new() -> Self {
        Self {
            nodes: BTreeMap::new(),
            volumes: BTreeMap::new(),
            volume_names: BTreeMap::new(),
            chunks: BTreeMap::new(),
            next_volume_id: FIRST_VOLUME_ID,
            records: BTreeMap::new(),
            record_seq: 0,
        }
    }

    pub fn record(&self, key: &str) -> Option<&Record> {
        self.records.get(key)
    }

    /// Records whose key starts with `prefix`, in key order.
    pub fn records_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.records.range(prefix.to_owned()..).take_while(move |(k, _)| k.starts_with(prefix)).map(|(_, r)| r)
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(&id)
    }

    /// Every registered node, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> + '_ {
        self.nodes.values()
    }

    pub fn is_alive(&self, node: NodeId) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.state == NodeState::Alive)
    }

    pub fn volume(&self, id: VolumeId) -> Option<&VolumeInfo> {
        self.volumes.get(&id)
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeInfo> {
        self.volume_names.get(name).and_then(|id| self.volumes.get(id))
    }

    /// Every volume, by id.
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeInfo> + '_ {
        self.volumes.values()
    }

    /// The id the next created volume gets.
    pub fn next_volume_id(&self) -> VolumeId {
        self.next_volume_id
    }

    pub fn chunk(&self, id: ChunkId) -> Option<&ChunkInfo> {
        self.chunks.get(&id)
    }

    /// The allocated chunks among `first..first + count` of `volume`, by index.
    pub fn chunks_of(&self, volume: VolumeId, first: u64, count: u64) -> Vec<ChunkInfo> {
        if count == 0 {
            return Vec::new();
        }
        let start = Bound::Included(ChunkId { volume, index: first });
        let end = match first.checked_add(count) {
            Some(end) => Bound::Excluded(ChunkId { volume, index: end }),
            None => Bound::Included(ChunkId { volume, index: u64::MAX }),
        };
        self.chunks.range((start, end)).map(|(_, c)| c.clone()).collect()
    }

    /// Every chunk, by (volume, index).
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkInfo> + '_ {
        self.chunks.values()
    }

    /// How many readable replicas a chunk should have: [`REPLICAS`], or the number of
    /// registered nodes when the cluster is smaller than that (one replica per host).
    pub fn target_replicas(&self) -> usize {
        REPLICAS.min(self.nodes.len())
    }

    /// Every key/value of the map, in key order (a full snapshot).
    /// `ClusterMap::from_kv(map.to_kv())` equals `map`.
    pub fn to_kv(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::with_capacity(1 + self.nodes.len() + self.volumes.len() + self.chunks.len());
        let mut put = |key: MapKey, value: std::result::Result<Vec<u8>, bincode::error::EncodeError>| {
            match value {
                Ok(v) => out.push((key.encode(), v)),
                // Unreachable for these plain structs: bincode's serde encoder only fails on
                // types without a known length, and a Vec writer cannot fail.
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "cannot encode cluster-map value");
                    debug_assert!(false, "encoding {key}: {e}");
                }
            }
        };
        put(MapKey::NextVolumeId, encode_value(&self.next_volume_id));
        for (id, n) in &self.nodes {
            put(MapKey::Node(*id), encode_value(n));
        }
        for (id, v) in &self.volumes {
            put(MapKey::Volume(*id), encode_value(v));
        }
        for (id, c) in &self.chunks {
            put(MapKey::Chunk(*id), encode_value(c));
        }
        if self.record_seq > 0 {
            put(MapKey::RecordSeq, encode_value(&self.record_seq));
        }
        for (k, r) in &self.records {
            put(MapKey::Record(k.clone()), encode_value(r));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Rebuilds the map from persisted key/values (a snapshot from [`ClusterMap::to_kv`], or
    /// a store that received every [`KvChange`](crate::KvChange) returned by `apply`).
    /// Fails on foreign keys, undecodable values and broken invariants rather than serving
    /// a map that disagrees with the other replicas.
    pub fn from_kv(entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Self> {
        let mut map = ClusterMap::new();
        let mut next_volume_id = None;
        for (key, value) in entries {
            let parsed =
                MapKey::parse(&key).ok_or_else(|| MapError::UnknownKey { key: show_raw_key(&key) })?;
            match parsed {
                MapKey::NextVolumeId => next_volume_id = Some(decode_value::<VolumeId>(&parsed, &value)?),
                MapKey::Node(id) => {
                    let node: NodeInfo = decode_value(&parsed, &value)?;
                    if node.id != id {
                        return Err(MapError::Inconsistent(format!("{parsed} holds node {}", node.id)));
                    }
                    map.nodes.insert(id, node);
                }
                MapKey::Volume(id) => {
                    let vol: VolumeInfo = decode_value(&parsed, &value)?;
                    if vol.id != id {
                        return Err(MapError::Inconsistent(format!("{parsed} holds volume {}", vol.id)));
                    }
                    map.volumes.insert(id, vol);
                }
                MapKey::Chunk(id) => {
                    let chunk: ChunkInfo = decode_value(&parsed, &value)?;
                    if chunk.id != id {
                        return Err(MapError::Inconsistent(format!("{parsed} holds chunk {}", chunk.id)));
                    }
                    map.chunks.insert(id, chunk);
                }
                MapKey::RecordSeq => map.record_seq = decode_value(&parsed, &value)?,
                MapKey::Record(ref key) => {
                    let record: Record = decode_value(&parsed, &value)?;
                    if &record.key != key {
                        return Err(MapError::Inconsistent(format!("{parsed} holds record {:?}", record.key)));
                    }
                    map.records.insert(key.clone(), record);
                }
            }
        }
        // A store that never created a volume never wrote the counter.
        map.next_volume_id = next_volume_id.unwrap_or(FIRST_VOLUME_ID);
        map.rebuild_and_check()?;
        Ok(map)
    }

    /// Derives the name index and checks the invariants listed in the crate documentation.
    fn rebuild_and_check(&mut self) -> Result<()> {
        let inconsistent = |m: String| Err(MapError::Inconsistent(m));
        if let Some((&max, _)) = self.volumes.last_key_value() {
            if max >= self.next_volume_id {
                return inconsistent(format!(
                    "volume {max} exists but the next volume id is {}",
                    self.next_volume_id
                ));
            }
        }
        let mut per_volume: BTreeMap<VolumeId, u64> = BTreeMap::new();
        for chunk in self.chunks.values() {
            let Some(vol) = self.volumes.get(&chunk.id.volume) else {
                return inconsistent(format!("chunk {} of a missing volume", chunk.id));
            };
            if chunk.id.index >= crate::apply::chunk_count(vol.size, vol.chunk_size) {
                return inconsistent(format!("chunk {} beyond the end of volume {}", chunk.id, vol.name));
            }
            for (i, r) in chunk.replicas.iter().enumerate() {
                if chunk.replicas[..i].iter().any(|o| o.disk.node == r.disk.node) {
                    return inconsistent(format!("chunk {} has two replicas on node {}", chunk.id, r.disk.node));
                }
                if chunk.stale.contains(&r.disk) {
                    return inconsistent(format!("chunk {}: disk {} is both replica and stale", chunk.id, r.disk));
                }
            }
            *per_volume.entry(chunk.id.volume).or_default() += 1;
        }
        for vol in self.volumes.values() {
            let have = per_volume.get(&vol.id).copied().unwrap_or(0);
            if have != vol.allocated_chunks {
                return inconsistent(format!(
                    "volume {} counts {} allocated chunks but has {have}",
                    vol.name, vol.allocated_chunks
                ));
            }
            if self.volume_names.insert(vol.name.clone(), vol.id).is_some() {
                return inconsistent(format!("two volumes are named {:?}", vol.name));
            }
        }
        Ok(())
    }
}
