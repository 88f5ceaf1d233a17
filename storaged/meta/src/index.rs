//! The metadata index (see [`IndexEntry`]): an ordered key/value space kept only in the
//! `index` column family, changed by [`IndexTxn`] log entries and read by the leader after
//! a linearizable check.
//!
//! Stored value: the entry's version (8 bytes big-endian, the log index that wrote it)
//! followed by the value bytes.
//!
//! Unlike the cluster map, nothing of the index is held in memory, so it can grow with the
//! number of objects. Snapshots still copy it whole (see `store`); an index too large for
//! that is the point where it moves to its own sharded groups (see ARCHITECTURE.md).

use crate::store::Db;
use basalt_types::{
    ErrorCode, IndexEntry, IndexOutcome, IndexTxn, RemoteError, MAX_INDEX_KEY, MAX_INDEX_OPS, MAX_INDEX_PAGE,
    MAX_INDEX_VALUE,
};
use rocksdb::{ColumnFamily, Direction, IteratorMode, WriteBatch, DB};
use std::collections::HashMap;
use std::sync::Arc;

pub(crate) const CF_INDEX: &str = "index";

fn invalid(message: String) -> RemoteError {
    RemoteError::new(ErrorCode::InvalidArgument, message)
}

/// The limits of a transaction; pure, so the proposer and every replica's apply agree.
pub fn validate(txn: &IndexTxn) -> Result<(), RemoteError> {
    let ops = txn.checks.len() + txn.puts.len() + txn.adds.len();
    if ops == 0 || ops > MAX_INDEX_OPS {
        return Err(invalid(format!("an index transaction has 1 to {MAX_INDEX_OPS} checks and writes, not {ops}")));
    }
    let keys = txn.checks.iter().map(|(k, _)| k).chain(txn.puts.iter().map(|(k, _)| k)).chain(txn.adds.iter().map(|(k, _)| k));
    for key in keys {
        if key.is_empty() || key.len() > MAX_INDEX_KEY {
            return Err(invalid(format!("index keys are 1 to {MAX_INDEX_KEY} bytes, not {}", key.len())));
        }
    }
    if txn.adds.iter().any(|(k, _)| txn.puts.iter().any(|(p, _)| p == k)) {
        return Err(invalid("an index transaction may not both write and add to one key".into()));
    }
    for (_, value) in &txn.puts {
        if let Some(v) = value {
            if v.len() > MAX_INDEX_VALUE {
                return Err(invalid(format!("index values are at most {MAX_INDEX_VALUE} bytes, not {}", v.len())));
            }
        }
    }
    Ok(())
}

pub(crate) fn encode(version: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(value);
    out
}

pub(crate) fn decode(key: &[u8], stored: &[u8]) -> Result<IndexEntry, String> {
    let (version, value) = stored
        .split_first_chunk::<8>()
        .ok_or_else(|| format!("index entry {} is {} bytes, too short", key.escape_ascii(), stored.len()))?;
    Ok(IndexEntry { key: key.to_vec(), value: value.to_vec(), version: u64::from_be_bytes(*version) })
}

/// What the same batch already wrote to a key, which the database does not show yet:
/// its version and value (`None`: deleted).
pub(crate) type Written = HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>;

/// The version and value of `key` as of this point of the batch.
fn current(db: &DB, cf: &ColumnFamily, written: &Written, key: &[u8]) -> Result<Result<(u64, Option<Vec<u8>>), RemoteError>, rocksdb::Error> {
    if let Some((v, value)) = written.get(key) {
        return Ok(Ok((*v, value.clone())));
    }
    Ok(match db.get_pinned_cf(cf, key)? {
        Some(stored) => match stored.split_first_chunk::<8>() {
            Some((v, value)) => Ok((u64::from_be_bytes(*v), Some(value.to_vec()))),
            None => Err(RemoteError::new(ErrorCode::Internal, format!("index entry {} is corrupt", key.escape_ascii()))),
        },
        None => Ok((0, None)),
    })
}

/// Applies `txn` at log index `version` into `batch`; `written` carries what earlier
/// entries of the batch wrote.
pub(crate) fn apply(
    db: &DB,
    cf: &ColumnFamily,
    batch: &mut WriteBatch,
    written: &mut Written,
    txn: &IndexTxn,
    version: u64,
) -> Result<Result<IndexOutcome, RemoteError>, rocksdb::Error> {
    if let Err(e) = validate(txn) {
        return Ok(Err(e));
    }
    for (key, want) in &txn.checks {
        let have = match current(db, cf, written, key)? {
            Ok((v, _)) => v,
            Err(e) => return Ok(Err(e)),
        };
        if have != *want {
            return Ok(Ok(IndexOutcome::Conflict { key: key.clone(), version: have }));
        }
    }
    // Counters are read before anything is written, so a bad one refuses the whole txn.
    let mut sums = Vec::with_capacity(txn.adds.len());
    for (key, delta) in &txn.adds {
        let value = match current(db, cf, written, key)? {
            Ok((_, value)) => value,
            Err(e) => return Ok(Err(e)),
        };
        let now = match value.as_deref() {
            None => 0,
            Some(bytes) => match <[u8; 8]>::try_from(bytes) {
                Ok(b) => i64::from_be_bytes(b),
                Err(_) => return Ok(Err(RemoteError::new(ErrorCode::InvalidArgument, format!("index entry {} is not a counter", key.escape_ascii())))),
            },
        };
        sums.push((key, now.saturating_add(*delta)));
    }
    for (key, value) in &txn.puts {
        match value {
            Some(v) => {
                batch.put_cf(cf, key, encode(version, v));
                written.insert(key.clone(), (version, Some(v.clone())));
            }
            None => {
                batch.delete_cf(cf, key);
                written.insert(key.clone(), (0, None));
            }
        }
    }
    for (key, sum) in sums {
        let v = sum.to_be_bytes().to_vec();
        batch.put_cf(cf, key, encode(version, &v));
        written.insert(key.clone(), (version, Some(v)));
    }
    Ok(Ok(IndexOutcome::Committed { version }))
}

/// Reads the index of this replica (the caller makes reads linearizable first).
#[derive(Clone)]
pub struct IndexReader {
    db: Arc<Db>,
}

impl IndexReader {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        Self { db }
    }

    pub async fn get(&self, key: Vec<u8>) -> Result<Option<IndexEntry>, RemoteError> {
        let db = self.db.clone();
        blocking(move || {
            let cf = db.cf_handle(CF_INDEX).ok_or_else(|| internal("the index column family is missing"))?;
            match db.get_pinned_cf(cf, &key).map_err(|e| internal(&e))? {
                Some(stored) => decode(&key, &stored).map(Some).map_err(internal),
                None => Ok(None),
            }
        })
        .await
    }

    /// Entries with `prefix` from `start` on (see `MetaRequest::IndexList`).
    pub async fn list(&self, prefix: Vec<u8>, start: Vec<u8>, limit: u32) -> Result<(Vec<IndexEntry>, bool), RemoteError> {
        let db = self.db.clone();
        let limit = limit.clamp(1, MAX_INDEX_PAGE) as usize;
        blocking(move || {
            let cf = db.cf_handle(CF_INDEX).ok_or_else(|| internal("the index column family is missing"))?;
            let from = if start.as_slice() > prefix.as_slice() { start } else { prefix.clone() };
            let mut entries = Vec::new();
            for item in db.iterator_cf(cf, IteratorMode::From(&from, Direction::Forward)) {
                let (key, stored) = item.map_err(|e| internal(&e))?;
                if !key.starts_with(&prefix) {
                    break;
                }
                if entries.len() == limit {
                    return Ok((entries, true));
                }
                entries.push(decode(&key, &stored).map_err(internal)?);
            }
            Ok((entries, false))
        })
        .await
    }
}

fn internal(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::new(ErrorCode::Internal, format!("metadata index: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RemoteError> + Send + 'static,
) -> Result<T, RemoteError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| internal(format!("reader task failed: {e}")))?
}
