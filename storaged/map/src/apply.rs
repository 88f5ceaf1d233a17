//! The state machine's transition function: [`ClusterMap::apply`].
//!
//! Each command is first checked against the current map without touching it and turned
//! into a list of [`Mutation`]s; only when every mutation has been encoded are they applied.
//! So a refused command changes nothing, and the returned changes are exactly the keys
//! written. Nothing here reads a clock: times come inside the commands.

use crate::kv::{encode_value, KvChange, MapKey};
use crate::map::ClusterMap;
use basalt_types::{
    ChunkId, ChunkInfo, ChunkVersion, DiskId, DiskInfo, ErrorCode, Lease, MetaCommand, MetaReply,
    NodeId, NodeInfo, NodeState, Record, RemoteError, Replica, ReplicaState, VolumeId, VolumeInfo,
    BLOCK_SIZE, MAX_RECORD_KEY, MAX_RECORD_VALUE, REPLICAS,
};

/// Longest volume name, in bytes (names are ASCII).
pub const MAX_VOLUME_NAME: usize = 128;
/// Volume sizes are whole 512-byte sectors (the smallest block size an initiator may use).
pub const SECTOR_SIZE: u64 = 512;
pub const MIN_CHUNK_SIZE: u64 = 1 << 20;
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// One planned change of the map.
enum Mutation {
    NextVolumeId(VolumeId),
    PutNode(NodeInfo),
    PutVolume(VolumeInfo),
    DeleteVolume(VolumeId),
    PutChunk(ChunkInfo),
    DeleteChunk(ChunkId),
    RecordSeq(u64),
    PutRecord(Record),
    DeleteRecord(String),
}

type Outcome = Result<(MetaReply, Vec<Mutation>), RemoteError>;

fn err(code: ErrorCode, message: impl Into<String>) -> RemoteError {
    RemoteError::new(code, message)
}

fn invalid(message: impl Into<String>) -> RemoteError {
    err(ErrorCode::InvalidArgument, message)
}

/// Number of chunks of a volume of `size` bytes (the last one may be partial).
pub(crate) fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    size.div_ceil(chunk_size)
}

/// The naming rule of `CreateVolume`; frontends may check early with it.
pub fn validate_volume_name(name: &str) -> Result<(), RemoteError> {
    if name.is_empty() || name.len() > MAX_VOLUME_NAME {
        return Err(invalid(format!(
            "volume name must be 1 to {MAX_VOLUME_NAME} characters, got {}",
            name.len()
        )));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(invalid(format!(
            "volume name {name:?} contains {bad:?}; allowed are A-Z a-z 0-9 . _ -"
        )));
    }
    if name.starts_with(['.', '-']) {
        return Err(invalid(format!("volume name {name:?} must not start with '.' or '-'")));
    }
    Ok(())
}

/// The key rule of records: 1 to [`MAX_RECORD_KEY`] bytes of printable ASCII, `/`-separated.
pub fn validate_record_key(key: &str) -> Result<(), RemoteError> {
    if key.is_empty() || key.len() > MAX_RECORD_KEY {
        return Err(invalid(format!("record key must be 1 to {MAX_RECORD_KEY} bytes, got {}", key.len())));
    }
    if let Some(bad) = key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(format!("record key {key:?} contains {bad:?}; only printable ASCII is allowed")));
    }
    Ok(())
}

/// The size rule of `CreateVolume` and `ResizeVolume`; frontends may check early with it.
pub fn validate_volume_size(size: u64) -> Result<(), RemoteError> {
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(invalid(format!(
            "volume size must be a positive multiple of {SECTOR_SIZE} bytes, got {size}"
        )));
    }
    Ok(())
}

/// The chunk-size rule of `CreateVolume`; frontends may check early with it.
pub fn validate_chunk_size(chunk_size: u64) -> Result<(), RemoteError> {
    if !chunk_size.is_power_of_two()
        || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        || chunk_size % BLOCK_SIZE != 0
    {
        return Err(invalid(format!(
            "chunk size must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes, got {chunk_size}"
        )));
    }
    Ok(())
}

fn check_version(chunk: &ChunkInfo, version: ChunkVersion) -> Result<(), RemoteError> {
    if chunk.version != version {
        return Err(err(
            ErrorCode::StaleVersion,
            format!("chunk {} is at version {}, not {version}", chunk.id, chunk.version),
        ));
    }
    Ok(())
}

fn bump(chunk: &mut ChunkInfo) -> Result<(), RemoteError> {
    chunk.version = chunk
        .version
        .checked_add(1)
        .ok_or_else(|| err(ErrorCode::Internal, format!("chunk {} version overflows", chunk.id)))?;
    Ok(())
}

impl ClusterMap {
    /// Applies one committed Raft log entry. Deterministic: the same map and command give the
    /// same reply, the same changes and the same new map on every replica. Never panics;
    /// a refusal is a [`MetaReply::Error`] and changes nothing (empty change list).
    pub fn apply(&mut self, cmd: &MetaCommand) -> (MetaReply, Vec<KvChange>) {
        let outcome = match cmd {
            MetaCommand::Noop => Ok((MetaReply::Ok, Vec::new())),
            MetaCommand::RegisterNode { id, name, rpc_addr, nbd_addr, disks, now_ms } => {
                self.register_node(*id, name, rpc_addr, nbd_addr, disks, *now_ms)
            }
            MetaCommand::SetNodeState { id, state, now_ms } => self.set_node_state(*id, *state, *now_ms),
            MetaCommand::CreateVolume { name, size, chunk_size, now_ms } => {
                self.create_volume(name, *size, *chunk_size, *now_ms)
            }
            MetaCommand::DeleteVolume { name } => self.delete_volume(name),
            MetaCommand::ResizeVolume { name, size } => self.resize_volume(name, *size),
            MetaCommand::AcquireLease { volume, holder, node, force, now_ms } => {
                self.acquire_lease(volume, holder, *node, *force, *now_ms)
            }
            MetaCommand::ReleaseLease { volume, holder } => self.release_lease(volume, holder),
            MetaCommand::AllocateChunk { chunk, disks } => self.allocate_chunk(*chunk, disks),
            MetaCommand::DropReplicas { chunk, version, disks, min_replicas } => {
                self.drop_replicas(*chunk, *version, disks, *min_replicas)
            }
            MetaCommand::AddReplica { chunk, version, disk } => self.add_replica(*chunk, *version, *disk),
            MetaCommand::ReplicaSynced { chunk, version, disk } => {
                self.replica_synced(*chunk, *version, *disk)
            }
            MetaCommand::ForgetStale { chunk, disk } => self.forget_stale(*chunk, *disk),
            MetaCommand::PutRecord { key, value, expected } => self.put_record(key, value.as_deref(), *expected),
            // The index is not part of the map: the metadata store applies these against its
            // on-disk index before the map ever sees them.
            MetaCommand::IndexTxn(_) => Err(err(ErrorCode::Internal, "index transactions are applied by the metadata store")),
        };
        let (reply, mutations) = match outcome {
            Ok(ok) => ok,
            Err(e) => return (MetaReply::Error(e), Vec::new()),
        };
        match encode_all(&mutations) {
            Ok(changes) => {
                self.commit(mutations);
                (reply, changes)
            }
            Err(e) => {
                // Cannot happen for these plain structs; refusing keeps every replica identical
                // (they all fail the same way) instead of diverging from the store.
                tracing::error!(error = %e, "cannot encode cluster-map change; command refused");
                (MetaReply::Error(err(ErrorCode::Internal, format!("cannot encode change: {e}"))), Vec::new())
            }
        }
    }

    fn commit(&mut self, mutations: Vec<Mutation>) {
        for m in mutations {
            match m {
                Mutation::NextVolumeId(id) => self.next_volume_id = id,
                Mutation::PutNode(n) => {
                    self.nodes.insert(n.id, n);
                }
                Mutation::PutVolume(v) => {
                    if let Some(old) = self.volumes.get(&v.id) {
                        if old.name != v.name {
                            self.volume_names.remove(&old.name);
                        }
                    }
                    self.volume_names.insert(v.name.clone(), v.id);
                    self.volumes.insert(v.id, v);
                }
                Mutation::DeleteVolume(id) => {
                    if let Some(old) = self.volumes.remove(&id) {
                        self.volume_names.remove(&old.name);
                    }
                }
                Mutation::PutChunk(c) => {
                    self.chunks.insert(c.id, c);
                }
                Mutation::DeleteChunk(id) => {
                    self.chunks.remove(&id);
                }
                Mutation::RecordSeq(seq) => self.record_seq = seq,
                Mutation::PutRecord(r) => {
                    self.records.insert(r.key.clone(), r);
                }
                Mutation::DeleteRecord(key) => {
                    self.records.remove(&key);
                }
            }
        }
    }

    fn volume_named(&self, name: &str) -> Result<&VolumeInfo, RemoteError> {
        self.volume_by_name(name)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("volume {name:?} does not exist")))
    }

    fn chunk_info(&self, id: ChunkId) -> Result<&ChunkInfo, RemoteError> {
        self.chunk(id)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("chunk {id} is not allocated")))
    }

    /// Whether a new replica may be put on `disk`: its node exists and is Alive and the disk
    /// is one the node registered.
    pub(crate) fn check_replica_target(&self, disk: DiskId) -> Result<(), RemoteError> {
        let node = self
            .node(disk.node)
            .ok_or_else(|| invalid(format!("disk {disk}: node {} is not registered", disk.node)))?;
        if node.state != NodeState::Alive {
            return Err(invalid(format!("disk {disk}: node {} is {:?}", node.id, node.state)));
        }
        if !node.disks.iter().any(|d| d.id == disk) {
            return Err(invalid(format!("disk {disk} is not registered on node {}", node.id)));
        }
        Ok(())
    }

    fn register_node(
        &self,
        id: NodeId,
        name: &str,
        rpc_addr: &str,
        nbd_addr: &str,
        disks: &[DiskInfo],
        now_ms: u64,
    ) -> Outcome {
        for (i, d) in disks.iter().enumerate() {
            if d.id.node != id {
                return Err(invalid(format!("node {id} registers disk {} of another node", d.id)));
            }
            if disks[..i].iter().any(|o| o.id == d.id) {
                return Err(invalid(format!("node {id} registers disk {} twice", d.id)));
            }
        }
        let node = NodeInfo {
            id,
            name: name.to_owned(),
            rpc_addr: rpc_addr.to_owned(),
            nbd_addr: nbd_addr.to_owned(),
            disks: disks.to_vec(),
            state: NodeState::Alive,
            since_ms: now_ms,
        };
        let changes = if self.node(id) == Some(&node) { Vec::new() } else { vec![Mutation::PutNode(node)] };
        Ok((MetaReply::NodeId(id), changes))
    }

    /// `since_ms` records when the state last changed, so setting the current state again
    /// changes nothing.
    fn set_node_state(&self, id: NodeId, state: NodeState, now_ms: u64) -> Outcome {
        let node = self
            .node(id)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("node {id} is not registered")))?;
        if node.state == state {
            return Ok((MetaReply::Ok, Vec::new()));
        }
        let node = NodeInfo { state, since_ms: now_ms, ..node.clone() };
        Ok((MetaReply::Ok, vec![Mutation::PutNode(node)]))
    }

    fn create_volume(&self, name: &str, size: u64, chunk_size: u64, now_ms: u64) -> Outcome {
        validate_volume_name(name)?;
        validate_volume_size(size)?;
        validate_chunk_size(chunk_size)?;
        if self.volume_by_name(name).is_some() {
            return Err(err(ErrorCode::AlreadyExists, format!("volume {name:?} already exists")));
        }
        let id = self.next_volume_id;
        let next = id
            .checked_add(1)
            .ok_or_else(|| err(ErrorCode::Internal, "volume ids are exhausted"))?;
        let vol = VolumeInfo {
            id,
            name: name.to_owned(),
            size,
            chunk_size,
            created_ms: now_ms,
            epoch: 0,
            lease: None,
            allocated_chunks: 0,
        };
        Ok((MetaReply::Volume(vol.clone()), vec![Mutation::NextVolumeId(next), Mutation::PutVolume(vol)]))
    }

    /// Deleting a leased volume is allowed: the lease goes with it, and the holder's next
    /// request fails with NotFound. Deleting the replicas on the chunk servers is the caller's
    /// job (it knows them from the chunks it read before proposing).
    fn delete_volume(&self, name: &str) -> Outcome {
        let vol = self.volume_named(name)?;
        let mut changes: Vec<Mutation> = self
            .chunks_of(vol.id, 0, u64::MAX)
            .into_iter()
            .map(|c| Mutation::DeleteChunk(c.id))
            .collect();
        changes.push(Mutation::DeleteVolume(vol.id));
        Ok((MetaReply::Ok, changes))
    }

    /// Shrinking forgets the chunks that lie wholly beyond the new end; a partial last chunk
    /// is kept (its tail is simply never addressed).
    fn resize_volume(&self, name: &str, size: u64) -> Outcome {
        let vol = self.volume_named(name)?;
        validate_volume_size(size)?;
        if size == vol.size {
            return Ok((MetaReply::Volume(vol.clone()), Vec::new()));
        }
        let keep = chunk_count(size, vol.chunk_size);
        let mut changes: Vec<Mutation> = self
            .chunks_of(vol.id, keep, u64::MAX)
            .into_iter()
            .map(|c| Mutation::DeleteChunk(c.id))
            .collect();
        let removed = changes.len() as u64;
        let vol = VolumeInfo { size, allocated_chunks: vol.allocated_chunks.saturating_sub(removed), ..vol.clone() };
        changes.push(Mutation::PutVolume(vol.clone()));
        Ok((MetaReply::Volume(vol), changes))
    }

    /// The holder that has the lease keeps its epoch when it acquires again (a renewal or a
    /// retried request). Anyone else who gets the lease, including the first holder of a
    /// free volume, bumps the epoch, so every writer from before is fenced.
    fn acquire_lease(&self, volume: &str, holder: &str, node: NodeId, force: bool, now_ms: u64) -> Outcome {
        let vol = self.volume_named(volume)?;
        if holder.is_empty() {
            return Err(invalid("lease holder must not be empty"));
        }
        let epoch = match &vol.lease {
            Some(l) if l.holder == holder => vol.epoch,
            Some(l) if !force => {
                return Err(err(
                    ErrorCode::Fenced,
                    format!("volume {volume} is leased by {} (epoch {})", l.holder, vol.epoch),
                ))
            }
            _ => vol
                .epoch
                .checked_add(1)
                .ok_or_else(|| err(ErrorCode::Internal, format!("volume {volume}: epoch overflows")))?,
        };
        let lease = Lease { holder: holder.to_owned(), node, epoch, acquired_ms: now_ms };
        let vol = VolumeInfo { epoch, lease: Some(lease.clone()), ..vol.clone() };
        Ok((MetaReply::Lease(lease), vec![Mutation::PutVolume(vol)]))
    }

    /// Releasing a volume nobody holds succeeds (a retried release must not fail).
    fn release_lease(&self, volume: &str, holder: &str) -> Outcome {
        let vol = self.volume_named(volume)?;
        match &vol.lease {
            None => Ok((MetaReply::Ok, Vec::new())),
            Some(l) if l.holder != holder => Err(err(
                ErrorCode::Fenced,
                format!("volume {volume} is leased by {} (epoch {}), not {holder}", l.holder, vol.epoch),
            )),
            Some(_) => {
                let vol = VolumeInfo { lease: None, ..vol.clone() };
                Ok((MetaReply::Ok, vec![Mutation::PutVolume(vol)]))
            }
        }
    }

    /// Besides the distinct-hosts rule, every disk must be a registered disk of an Alive
    /// node: a chunk born with a replica on a dead node would start degraded.
    fn allocate_chunk(&self, id: ChunkId, disks: &[DiskId]) -> Outcome {
        let vol = self
            .volume(id.volume)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("volume {} does not exist", id.volume)))?;
        let count = chunk_count(vol.size, vol.chunk_size);
        if id.index >= count {
            return Err(invalid(format!(
                "chunk {id} is beyond the end of volume {} ({count} chunks)",
                vol.name
            )));
        }
        if let Some(existing) = self.chunk(id) {
            return Ok((MetaReply::Chunk(existing.clone()), Vec::new()));
        }
        if disks.is_empty() || disks.len() > REPLICAS {
            return Err(invalid(format!("chunk {id} needs 1 to {REPLICAS} disks, got {}", disks.len())));
        }
        for (i, d) in disks.iter().enumerate() {
            if disks[..i].iter().any(|o| o.node == d.node) {
                return Err(invalid(format!("chunk {id}: two disks on node {}", d.node)));
            }
            self.check_replica_target(*d)?;
        }
        let chunk = ChunkInfo {
            id,
            version: 1,
            replicas: disks.iter().map(|&disk| Replica { disk, state: ReplicaState::Ok }).collect(),
            stale: Vec::new(),
        };
        let vol = VolumeInfo { allocated_chunks: vol.allocated_chunks.saturating_add(1), ..vol.clone() };
        Ok((MetaReply::Chunk(chunk.clone()), vec![Mutation::PutChunk(chunk), Mutation::PutVolume(vol)]))
    }

    fn drop_replicas(&self, id: ChunkId, version: ChunkVersion, disks: &[DiskId], min_replicas: u32) -> Outcome {
        let chunk = self.chunk_info(id)?;
        check_version(chunk, version)?;
        let (dropped, kept): (Vec<Replica>, Vec<Replica>) =
            chunk.replicas.iter().partition(|r| disks.contains(&r.disk));
        if dropped.is_empty() {
            return Ok((MetaReply::Chunk(chunk.clone()), Vec::new()));
        }
        // Dropping replicas of dead nodes only records what already happened, so it must
        // succeed even when it leaves too few copies; otherwise re-replication would wait on it.
        let only_dead = dropped
            .iter()
            .all(|r| self.node(r.disk.node).is_some_and(|n| n.state == NodeState::Dead));
        let readable_left = kept.iter().filter(|r| r.state == ReplicaState::Ok).count();
        // But never the last readable copies: when every current replica sits on dead
        // nodes, the chunk is down, not lost; it waits for one of them to come back.
        if readable_left == 0 {
            return Err(err(
                ErrorCode::Unavailable,
                format!("chunk {id} has no readable replica outside the ones being dropped; keeping them"),
            ));
        }
        if !only_dead && readable_left < min_replicas as usize {
            return Err(err(
                ErrorCode::Unavailable,
                format!(
                    "dropping {} from chunk {id} would leave {readable_left} readable replicas, fewer than {min_replicas}",
                    dropped.iter().map(|r| r.disk.to_string()).collect::<Vec<_>>().join(",")
                ),
            ));
        }
        let mut chunk = chunk.clone();
        chunk.replicas = kept;
        for r in dropped {
            if !chunk.stale.contains(&r.disk) {
                chunk.stale.push(r.disk);
            }
        }
        bump(&mut chunk)?;
        Ok((MetaReply::Chunk(chunk.clone()), vec![Mutation::PutChunk(chunk)]))
    }

    fn put_record(&self, key: &str, value: Option<&[u8]>, expected: Option<u64>) -> Outcome {
        validate_record_key(key)?;
        if let Some(v) = value {
            if v.len() > MAX_RECORD_VALUE {
                return Err(invalid(format!("record value is {} bytes, more than {MAX_RECORD_VALUE}", v.len())));
            }
        }
        let current = self.records.get(key).map_or(0, |r| r.version);
        if let Some(want) = expected {
            if want != current {
                return Err(err(
                    ErrorCode::StaleVersion,
                    format!("record {key:?} is at version {current}, not {want}"),
                ));
            }
        }
        match value {
            None if current == 0 => Ok((MetaReply::Record(None), Vec::new())),
            None => Ok((MetaReply::Record(None), vec![Mutation::DeleteRecord(key.to_owned())])),
            Some(v) => {
                let seq = self
                    .record_seq
                    .checked_add(1)
                    .ok_or_else(|| err(ErrorCode::Internal, "record versions exhausted"))?;
                let record = Record { key: key.to_owned(), value: v.to_vec(), version: seq };
                Ok((MetaReply::Record(Some(record.clone())), vec![Mutation::RecordSeq(seq), Mutation::PutRecord(record)]))
            }
        }
    }

    fn add_replica(&self, id: ChunkId, version: ChunkVersion, disk: DiskId) -> Outcome {
        let chunk = self.chunk_info(id)?;
        check_version(chunk, version)?;
        self.check_replica_target(disk)?;
        if let Some(r) = chunk.replicas.iter().find(|r| r.disk.node == disk.node) {
            return Err(invalid(format!("chunk {id} already has replica {} on node {}", r.disk, disk.node)));
        }
        let mut chunk = chunk.clone();
        chunk.replicas.push(Replica { disk, state: ReplicaState::Syncing });
        chunk.stale.retain(|d| *d != disk);
        bump(&mut chunk)?;
        Ok((MetaReply::Chunk(chunk.clone()), vec![Mutation::PutChunk(chunk)]))
    }

    fn replica_synced(&self, id: ChunkId, version: ChunkVersion, disk: DiskId) -> Outcome {
        let chunk = self.chunk_info(id)?;
        check_version(chunk, version)?;
        let mut chunk = chunk.clone();
        match chunk.replicas.iter_mut().find(|r| r.disk == disk) {
            Some(r) if r.state == ReplicaState::Syncing => r.state = ReplicaState::Ok,
            Some(_) => return Err(invalid(format!("replica {disk} of chunk {id} is not syncing"))),
            None => return Err(invalid(format!("disk {disk} holds no replica of chunk {id}"))),
        }
        Ok((MetaReply::Chunk(chunk.clone()), vec![Mutation::PutChunk(chunk)]))
    }

    /// Idempotent: forgetting a copy that is not recorded (or of a chunk that is gone, e.g.
    /// its volume was deleted) succeeds.
    fn forget_stale(&self, id: ChunkId, disk: DiskId) -> Outcome {
        match self.chunk(id) {
            Some(chunk) if chunk.stale.contains(&disk) => {
                let mut chunk = chunk.clone();
                chunk.stale.retain(|d| *d != disk);
                Ok((MetaReply::Ok, vec![Mutation::PutChunk(chunk)]))
            }
            _ => Ok((MetaReply::Ok, Vec::new())),
        }
    }
}

fn encode_all(mutations: &[Mutation]) -> Result<Vec<KvChange>, bincode::error::EncodeError> {
    mutations
        .iter()
        .map(|m| {
            Ok(match m {
                Mutation::NextVolumeId(id) => {
                    KvChange { key: MapKey::NextVolumeId.encode(), value: Some(encode_value(id)?) }
                }
                Mutation::PutNode(n) => KvChange { key: MapKey::Node(n.id).encode(), value: Some(encode_value(n)?) },
                Mutation::PutVolume(v) => {
                    KvChange { key: MapKey::Volume(v.id).encode(), value: Some(encode_value(v)?) }
                }
                Mutation::DeleteVolume(id) => KvChange { key: MapKey::Volume(*id).encode(), value: None },
                Mutation::PutChunk(c) => KvChange { key: MapKey::Chunk(c.id).encode(), value: Some(encode_value(c)?) },
                Mutation::DeleteChunk(id) => KvChange { key: MapKey::Chunk(*id).encode(), value: None },
                Mutation::RecordSeq(seq) => KvChange { key: MapKey::RecordSeq.encode(), value: Some(encode_value(seq)?) },
                Mutation::PutRecord(r) => {
                    KvChange { key: MapKey::Record(r.key.clone()).encode(), value: Some(encode_value(r)?) }
                }
                Mutation::DeleteRecord(k) => KvChange { key: MapKey::Record(k.clone()).encode(), value: None },
            })
        })
        .collect()
}
