//! The RocksDB-backed Raft log and persisted state machine (openraft storage v2).
//!
//! One database per node, with one column family per concern:
//!
//! | column family | keys                                   | values (bincode)            |
//! |---------------|----------------------------------------|-----------------------------|
//! | `log`         | log index, 8 bytes big-endian          | `Entry<TypeConfig>`         |
//! | `raft`        | `vote`, `committed`, `last_purged`     | `Vote`, `Option<LogId>`, `LogId` |
//! | `sm_meta`     | `applied`, `membership`                | `Option<LogId>`, `StoredMembership` |
//! | `sm`          | the cluster map's own keys (`basalt_map::kv`) | the map's values      |
//! | `snapshot`    | `current`                              | [`StoredSnapshot`]          |
//! | `index`       | index keys (`crate::index`)            | version (8 bytes BE) + value |
//!
//! The state machine is persisted on apply: the map's key/value changes, the last applied
//! log id and the last membership of one `apply` call go into one `WriteBatch`, so after a
//! crash the map on disk is exactly the state after some applied log id, and a restart loads
//! it with `ClusterMap::from_kv` instead of replaying the log. Writes that openraft relies
//! on for safety (log append, vote, truncation, state-machine batches, snapshots) are synced
//! to the WAL before they are reported done.

use crate::codec;
use crate::raft::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote};
use crate::Error;
use basalt_map::ClusterMap;
use basalt_types::{MetaCommand, MetaReply};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

const CF_LOG: &str = "log";
const CF_RAFT: &str = "raft";
const CF_SM_META: &str = "sm_meta";
const CF_SM: &str = "sm";
const CF_SNAPSHOT: &str = "snapshot";
const CF_INDEX: &str = crate::index::CF_INDEX;
const ALL_CFS: [&str; 6] = [CF_LOG, CF_RAFT, CF_SM_META, CF_SM, CF_SNAPSHOT, CF_INDEX];

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_SNAPSHOT: &[u8] = b"current";

/// The open metadata database. Openraft's tasks hold handles to it and drop them a little
/// after the Raft node stops; [`Db::closed`] tells when the last one is gone and RocksDB has
/// released the directory, so it can be reopened in the same process.
pub struct Db {
    // Field order matters: `db` is closed before `closed` is dropped and wakes waiters.
    db: DB,
    closed: tokio::sync::watch::Sender<()>,
}

impl std::ops::Deref for Db {
    type Target = DB;
    fn deref(&self) -> &DB {
        &self.db
    }
}

impl Db {
    /// A receiver whose `changed()` fails once the database has been closed.
    pub fn closed(&self) -> tokio::sync::watch::Receiver<()> {
        self.closed.subscribe()
    }
}

/// Opens (creating if needed) the metadata database at `path` with all column families.
pub fn open_db(path: &Path) -> Result<Arc<Db>, Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let cfs = ALL_CFS.iter().map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    let db = DB::open_cf_descriptors(&opts, path, cfs)?;
    let (closed, _) = tokio::sync::watch::channel(());
    Ok(Arc::new(Db { db, closed }))
}

/// Opens the log store and the state machine over one database. The state machine's map is
/// loaded from the `sm` column family.
pub fn open_stores(db: Arc<Db>) -> Result<(LogStore, StateMachineStore), Error> {
    let sm = StateMachineStore::load(db.clone())?;
    let (flush, requests) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(flush_log(Arc::downgrade(&db), requests));
    Ok((LogStore { db, flush }, sm))
}

/// Makes appended log entries durable, one WAL sync for every append queued meanwhile (a
/// group commit), and tells openraft in append order. Ends when the log store is gone.
/// It holds the database only while it syncs, so that dropping the stores closes it.
async fn flush_log(db: std::sync::Weak<Db>, mut requests: tokio::sync::mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>) {
    while let Some(first) = requests.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        let Some(db) = db.upgrade() else {
            for callback in waiting {
                callback.log_io_completed(Err(std::io::Error::other("the metadata store is closed")));
            }
            continue;
        };
        let synced = match tokio::task::spawn_blocking(move || db.flush_wal(true)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("WAL sync task failed: {e}")),
        };
        if let Err(e) = &synced {
            tracing::error!(error = %e, "syncing the raft log failed");
        }
        for callback in waiting {
            callback.log_io_completed(synced.clone().map_err(std::io::Error::other));
        }
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, AnyError> {
    db.cf_handle(name).ok_or_else(|| AnyError::error(format!("column family {name} is missing")))
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e)
}

fn get<T: serde::de::DeserializeOwned>(db: &DB, cf_name: &str, key: &[u8]) -> Result<Option<T>, AnyError> {
    match db.get_cf(cf(db, cf_name)?, key).map_err(|e| any(&e))? {
        None => Ok(None),
        Some(bytes) => codec::decode(&bytes)
            .map(Some)
            .map_err(|e| any(format!("{cf_name}/{}: {e}", key.escape_ascii()))),
    }
}

fn enc<T: Serialize>(value: &T) -> Result<Vec<u8>, AnyError> {
    codec::encode(value).map_err(|e| any(&e))
}

/// Runs a synced batch write off the async worker threads: an fsync can take milliseconds.
async fn write_synced(db: &Arc<Db>, batch: WriteBatch) -> Result<(), AnyError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.write_opt(batch, &sync_opts()))
        .await
        .map_err(|e| any(format!("storage write task failed: {e}")))?
        .map_err(|e| any(&e))
}

/// A batch write that is in the database (readable, in the WAL) but not yet synced: it
/// becomes durable with the next synced write or WAL sync. The log and the state machine
/// share one WAL, so a write is never durable while an earlier one is not.
async fn write_unsynced(db: &Arc<Db>, batch: WriteBatch) -> Result<(), AnyError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.write(batch))
        .await
        .map_err(|e| any(format!("storage write task failed: {e}")))?
        .map_err(|e| any(&e))
}

// ---------------------------------------------------------------------------------------
// Log store

/// The Raft log and vote. Cloning shares the database; openraft uses clones as log readers.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
    /// Appends waiting for their WAL sync ([`flush_log`]).
    flush: tokio::sync::mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        get(&self.db, CF_RAFT, KEY_LAST_PURGED).map_err(|e| StorageIOError::read_logs(e).into())
    }

    fn last_entry(&self) -> Result<Option<Entry>, StorageError> {
        let cf = cf(&self.db, CF_LOG).map_err(StorageIOError::read_logs)?;
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(Err(e)) => Err(StorageIOError::read_logs(&e).into()),
            Some(Ok((_, v))) => codec::decode::<Entry>(&v).map(Some).map_err(|e| StorageIOError::read_logs(any(e)).into()),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = cf(&self.db, CF_LOG).map_err(StorageIOError::read_logs)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(&log_key(start), Direction::Forward)) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = u64::from_be_bytes(
                k.as_ref().try_into().map_err(|_| StorageIOError::read_logs(any("log key is not 8 bytes")))?,
            );
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = codec::decode(&v).map_err(|e| StorageIOError::read_log_at_index(index, any(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last_log_id = match self.last_entry()? {
            Some(e) => Some(e.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let write = async {
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&self.db, CF_RAFT)?, KEY_VOTE, enc(vote)?);
            write_synced(&self.db, batch).await
        };
        write.await.map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        get(&self.db, CF_RAFT, KEY_VOTE).map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: a lost `committed` only means fewer entries are re-applied at
        // startup (the rest come from the leader); it is never a safety issue.
        let res = (|| {
            self.db.put_cf(cf(&self.db, CF_RAFT)?, KEY_COMMITTED, enc(&committed)?).map_err(|e| any(&e))
        })();
        res.map_err(|e| StorageError::IO { source: StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, e) })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let c: Option<Option<LogId>> = get(&self.db, CF_RAFT, KEY_COMMITTED)
            .map_err(|e| StorageError::IO { source: StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, e) })?;
        Ok(c.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = async {
            let log_cf = cf(&self.db, CF_LOG)?;
            let mut batch = WriteBatch::default();
            for entry in entries {
                batch.put_cf(log_cf, log_key(entry.log_id.index), enc(&entry)?);
            }
            write_unsynced(&self.db, batch).await
        };
        // The entries are readable when this returns, and openraft hears they are durable
        // once the WAL is synced: Raft goes on (replicating, answering heartbeats) during
        // the sync, and appends queued meanwhile share it.
        match write.await {
            Ok(()) => {
                if let Err(unsent) = self.flush.send(callback) {
                    unsent.0.log_io_completed(Err(std::io::Error::other("the raft log flusher stopped")));
                }
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating the raft log");
        let write = async {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf(&self.db, CF_LOG)?, log_key(log_id.index), log_key(u64::MAX));
            // delete_range's end is exclusive; an entry at u64::MAX cannot exist in practice
            // but is removed anyway so the log can never keep a hole.
            batch.delete_cf(cf(&self.db, CF_LOG)?, log_key(u64::MAX));
            write_synced(&self.db, batch).await
        };
        write.await.map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging the raft log");
        let write = async {
            // The purge pointer and the deletion are one batch, so the log never looks
            // shorter than `last_purged` says.
            let mut batch = WriteBatch::default();
            batch.put_cf(cf(&self.db, CF_RAFT)?, KEY_LAST_PURGED, enc(&log_id)?);
            batch.delete_range_cf(cf(&self.db, CF_LOG)?, log_key(0), log_key(log_id.index.saturating_add(1)));
            write_synced(&self.db, batch).await
        };
        write.await.map_err(|e| StorageIOError::write_logs(e).into())
    }
}

// ---------------------------------------------------------------------------------------
// State machine

/// What the `snapshot` column family keeps: the snapshot's metadata and its data (the
/// bincode-encoded map key/values, [`SnapshotData`]).
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The bytes of a snapshot as sent to followers: the full persisted form of the map.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    kv: Vec<(Vec<u8>, Vec<u8>)>,
    /// The `index` column family, key and stored value.
    index: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The persisted state machine: the cluster map in memory (shared with the service for
/// reads) and on disk in the `sm` column family.
pub struct StateMachineStore {
    db: Arc<Db>,
    map: Arc<RwLock<ClusterMap>>,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// Serialises writers of the current snapshot (builders run in their own tasks) so an
    /// older snapshot never replaces a newer one.
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
}

impl StateMachineStore {
    fn load(db: Arc<Db>) -> Result<Self, Error> {
        let corrupt = |e: AnyError| Error::Corrupt(e.to_string());
        let applied: Option<LogId> = get::<Option<LogId>>(&db, CF_SM_META, KEY_APPLIED).map_err(corrupt)?.flatten();
        let membership: StoredMembership =
            get(&db, CF_SM_META, KEY_MEMBERSHIP).map_err(corrupt)?.unwrap_or_default();
        let sm_cf = cf(&db, CF_SM).map_err(corrupt)?;
        let mut kv = Vec::new();
        for item in db.iterator_cf(sm_cf, IteratorMode::Start) {
            let (k, v) = item?;
            kv.push((k.into_vec(), v.into_vec()));
        }
        let map = ClusterMap::from_kv(kv).map_err(|e| Error::Corrupt(format!("cluster map: {e}")))?;
        tracing::info!(applied = ?applied, "metadata state machine loaded");
        Ok(Self {
            db,
            map: Arc::new(RwLock::new(map)),
            applied,
            membership,
            snapshot_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Reads the on-disk index, as of the last applied entry on this node.
    pub fn index_reader(&self) -> crate::index::IndexReader {
        crate::index::IndexReader::new(self.db.clone())
    }

    /// The in-memory map, as of the last applied entry on this node.
    pub fn map(&self) -> Arc<RwLock<ClusterMap>> {
        self.map.clone()
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, ClusterMap> {
        // A poisoned lock means a panic inside `ClusterMap::apply`; the map itself is only
        // replaced wholesale or changed by apply, so continuing with it is no worse than the
        // panic that already happened.
        self.map.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Writes `snap` as the current snapshot unless a newer one is already stored.
async fn store_snapshot(
    db: &Arc<Db>,
    lock: &tokio::sync::Mutex<()>,
    snap: &StoredSnapshot,
) -> Result<(), AnyError> {
    let _guard = lock.lock().await;
    let current: Option<StoredSnapshot> = get(db, CF_SNAPSHOT, KEY_SNAPSHOT)?;
    if let Some(cur) = current {
        if cur.meta.last_log_id > snap.meta.last_log_id {
            tracing::debug!(
                current = ?cur.meta.last_log_id,
                built = ?snap.meta.last_log_id,
                "not replacing a newer snapshot"
            );
            return Ok(());
        }
    }
    let mut batch = WriteBatch::default();
    batch.put_cf(cf(db, CF_SNAPSHOT)?, KEY_SNAPSHOT, enc(snap)?);
    write_synced(db, batch).await
}

/// A point-in-time copy of the state machine, taken by `get_snapshot_builder` while no
/// entry is being applied, so its map and its applied log id agree.
pub struct SnapshotBuilder {
    db: Arc<Db>,
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    kv: Vec<(Vec<u8>, Vec<u8>)>,
    index: Result<Vec<(Vec<u8>, Vec<u8>)>, String>,
    applied: Option<LogId>,
    membership: StoredMembership,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let index = std::mem::replace(&mut self.index, Ok(Vec::new()))
            .map_err(|e| StorageIOError::read_state_machine(AnyError::error(e)))?;
        let data = enc(&SnapshotData { kv: std::mem::take(&mut self.kv), index })
            .map_err(|e| StorageIOError::write_snapshot(None, e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let snapshot_id = match &self.applied {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id, l.index),
            None => format!("none-{nanos}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot { meta: meta.clone(), data };
        store_snapshot(&self.db, &self.snapshot_lock, &stored)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = stored.data.len(), "built metadata snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaReply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let sm_cf = cf(&self.db, CF_SM).map_err(StorageIOError::write_state_machine)?;
        let meta_cf = cf(&self.db, CF_SM_META).map_err(StorageIOError::write_state_machine)?;
        let index_cf = cf(&self.db, CF_INDEX).map_err(StorageIOError::write_state_machine)?;
        let mut batch = WriteBatch::default();
        let mut replies = Vec::new();
        let mut applied = self.applied;
        let mut membership = None;
        let mut index_written = std::collections::HashMap::new();
        {
            let mut map = self.write_map();
            for entry in entries {
                applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => replies.push(MetaReply::Ok),
                    EntryPayload::Normal(MetaCommand::IndexTxn(txn)) => {
                        let outcome = crate::index::apply(
                            &self.db,
                            index_cf,
                            &mut batch,
                            &mut index_written,
                            &txn,
                            entry.log_id.index,
                        )
                        .map_err(|e| StorageIOError::read_state_machine(any(&e)))?;
                        replies.push(match outcome {
                            Ok(outcome) => MetaReply::Index(outcome),
                            Err(e) => MetaReply::Error(e),
                        });
                    }
                    EntryPayload::Normal(cmd) => {
                        let (reply, changes) = map.apply(&cmd);
                        for change in changes {
                            match change.value {
                                Some(v) => batch.put_cf(sm_cf, change.key, v),
                                None => batch.delete_cf(sm_cf, change.key),
                            }
                        }
                        replies.push(reply);
                    }
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(entry.log_id), m));
                        replies.push(MetaReply::Ok);
                    }
                }
            }
        }
        let last_membership = membership.as_ref().unwrap_or(&self.membership);
        let meta = enc(&applied).and_then(|a| Ok((a, enc(last_membership)?)));
        let (applied_bytes, membership_bytes) = meta.map_err(StorageIOError::write_state_machine)?;
        batch.put_cf(meta_cf, KEY_APPLIED, applied_bytes);
        batch.put_cf(meta_cf, KEY_MEMBERSHIP, membership_bytes);
        // The map in memory is already ahead of the disk here; if this write fails openraft
        // stops the node on the storage error, so nobody keeps serving the unpersisted state.
        // Not synced: the entries applied were written to the same WAL before this batch
        // (appended here, or replicated here before their commit was known), so a crash
        // can lose this batch only with everything after it, and the state and `applied`
        // it holds go back together; the entries are then applied again from the log (or
        // from the leader), to the same result.
        write_unsynced(&self.db, batch).await.map_err(StorageIOError::write_state_machine)?;
        self.applied = applied;
        if let Some(m) = membership {
            self.membership = m;
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let kv = self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner).to_kv();
        // Read now, while no entry is being applied, so it matches `kv` and `applied`.
        let index = read_index(&self.db);
        SnapshotBuilder {
            db: self.db.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
            kv,
            index,
            applied: self.applied,
            membership: self.membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let read_err = |e: AnyError| StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), e));
        let payload: SnapshotData = codec::decode(&data).map_err(|e| read_err(any(e)))?;
        // Validate before touching the disk: a snapshot that does not load must not replace
        // a working state machine.
        let new_map = ClusterMap::from_kv(payload.kv.clone()).map_err(|e| read_err(any(&e)))?;

        let write_err = |e: AnyError| StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), e));
        let _guard = self.snapshot_lock.lock().await;
        let mut batch = WriteBatch::default();
        let build = (|| -> Result<(), AnyError> {
            let sm_cf = cf(&self.db, CF_SM)?;
            for item in self.db.iterator_cf(sm_cf, IteratorMode::Start) {
                let (k, _) = item.map_err(|e| any(&e))?;
                batch.delete_cf(sm_cf, k);
            }
            for (k, v) in &payload.kv {
                batch.put_cf(sm_cf, k, v);
            }
            let index_cf = cf(&self.db, CF_INDEX)?;
            for item in self.db.iterator_cf(index_cf, IteratorMode::Start) {
                let (k, _) = item.map_err(|e| any(&e))?;
                batch.delete_cf(index_cf, k);
            }
            for (k, v) in &payload.index {
                batch.put_cf(index_cf, k, v);
            }
            let meta_cf = cf(&self.db, CF_SM_META)?;
            batch.put_cf(meta_cf, KEY_APPLIED, enc(&meta.last_log_id)?);
            batch.put_cf(meta_cf, KEY_MEMBERSHIP, enc(&meta.last_membership)?);
            let stored = StoredSnapshot { meta: meta.clone(), data };
            batch.put_cf(cf(&self.db, CF_SNAPSHOT)?, KEY_SNAPSHOT, enc(&stored)?);
            Ok(())
        })();
        build.map_err(write_err)?;
        // State machine content, its pointers and the current snapshot change atomically.
        write_synced(&self.db, batch).await.map_err(write_err)?;
        *self.write_map() = new_map;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        tracing::info!(last_log_id = ?meta.last_log_id, "installed metadata snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let stored: Option<StoredSnapshot> =
            get(&self.db, CF_SNAPSHOT, KEY_SNAPSHOT).map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

/// Every entry of the `index` column family, as stored.
fn read_index(db: &DB) -> Result<Vec<(Vec<u8>, Vec<u8>)>, String> {
    let index_cf = db.cf_handle(CF_INDEX).ok_or_else(|| "the index column family is missing".to_string())?;
    let mut out = Vec::new();
    for item in db.iterator_cf(index_cf, IteratorMode::Start) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        out.push((k.into_vec(), v.into_vec()));
    }
    Ok(out)
}
