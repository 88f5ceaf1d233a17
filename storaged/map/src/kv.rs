//! How the cluster map is persisted: one key per node, volume and chunk, plus system keys.
//!
//! Keys start with one ASCII tag byte; ids follow as big-endian `u64`s so that RocksDB's
//! byte order is the ids' numeric order, and the chunks of one volume are one contiguous
//! range (`c` + volume id is their common prefix):
//!
//! | key                                     | value                          |
//! |-----------------------------------------|--------------------------------|
//! | `s` `next_volume_id`                    | `u64`                          |
//! | `n` node id (8 bytes BE)                | [`NodeInfo`](basalt_types::NodeInfo)     |
//! | `v` volume id (8 bytes BE)              | [`VolumeInfo`](basalt_types::VolumeInfo) |
//! | `c` volume id (8 BE), chunk index (8 BE) | [`ChunkInfo`](basalt_types::ChunkInfo)   |
//! | `s` `record_seq`                        | `u64` (last record version)    |
//! | `r` record key (UTF-8)                  | [`Record`](basalt_types::Record)         |
//!
//! The volume-name index is not persisted: it is derived from the volumes when loading, so
//! it can never disagree with them. Values are the `basalt-types` values encoded with
//! serde through bincode 2 (`config::standard()`); changing those structs changes the
//! on-disk format.
//!
//! Every key this crate writes satisfies [`is_map_key`]; a storage layer that shares the
//! column family with its own keys (applied log id, membership) must give them a first byte
//! outside `s`, `n`, `v`, `c` and filter with `is_map_key` before calling
//! [`ClusterMap::from_kv`](crate::ClusterMap::from_kv).

use crate::MapError;
use basalt_types::{ChunkId, NodeId, VolumeId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;

/// One change to the persisted map: `value: None` deletes `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvChange {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

const TAG_SYS: u8 = b's';
const TAG_NODE: u8 = b'n';
const TAG_VOLUME: u8 = b'v';
const TAG_CHUNK: u8 = b'c';
const TAG_RECORD: u8 = b'r';
const SYS_NEXT_VOLUME_ID: &[u8] = b"next_volume_id";
const SYS_RECORD_SEQ: &[u8] = b"record_seq";

/// A parsed cluster-map key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MapKey {
    NextVolumeId,
    Node(NodeId),
    Volume(VolumeId),
    Chunk(ChunkId),
    RecordSeq,
    Record(String),
}

impl MapKey {
    pub fn encode(&self) -> Vec<u8> {
        let with = |tag: u8, rest: &[u8]| {
            let mut k = Vec::with_capacity(1 + rest.len());
            k.push(tag);
            k.extend_from_slice(rest);
            k
        };
        match self {
            MapKey::NextVolumeId => with(TAG_SYS, SYS_NEXT_VOLUME_ID),
            MapKey::Node(id) => tagged(TAG_NODE, &[*id]),
            MapKey::Volume(id) => tagged(TAG_VOLUME, &[*id]),
            MapKey::Chunk(c) => tagged(TAG_CHUNK, &[c.volume, c.index]),
            MapKey::RecordSeq => with(TAG_SYS, SYS_RECORD_SEQ),
            MapKey::Record(key) => with(TAG_RECORD, key.as_bytes()),
        }
    }

    /// `None` for a key this crate never writes.
    pub fn parse(key: &[u8]) -> Option<MapKey> {
        let (&tag, rest) = key.split_first()?;
        match tag {
            TAG_SYS if rest == SYS_NEXT_VOLUME_ID => Some(MapKey::NextVolumeId),
            TAG_SYS if rest == SYS_RECORD_SEQ => Some(MapKey::RecordSeq),
            TAG_RECORD => std::str::from_utf8(rest).ok().map(|k| MapKey::Record(k.to_owned())),
            TAG_NODE => Some(MapKey::Node(be_u64(rest)?)),
            TAG_VOLUME => Some(MapKey::Volume(be_u64(rest)?)),
            TAG_CHUNK if rest.len() == 16 => {
                let (v, i) = rest.split_at(8);
                Some(MapKey::Chunk(ChunkId { volume: be_u64(v)?, index: be_u64(i)? }))
            }
            _ => None,
        }
    }
}

impl fmt::Display for MapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapKey::NextVolumeId => write!(f, "sys/next_volume_id"),
            MapKey::Node(id) => write!(f, "node/{id}"),
            MapKey::Volume(id) => write!(f, "volume/{id}"),
            MapKey::Chunk(c) => write!(f, "chunk/{c}"),
            MapKey::RecordSeq => write!(f, "sys/record_seq"),
            MapKey::Record(k) => write!(f, "record/{k}"),
        }
    }
}

/// The key prefix shared by every chunk of `volume` (for range scans in the store).
pub fn chunk_prefix(volume: VolumeId) -> Vec<u8> {
    tagged(TAG_CHUNK, &[volume])
}

/// Whether `key` belongs to the cluster map (see the module documentation).
pub fn is_map_key(key: &[u8]) -> bool {
    MapKey::parse(key).is_some()
}

fn tagged(tag: u8, ids: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * ids.len());
    k.push(tag);
    for id in ids {
        k.extend_from_slice(&id.to_be_bytes());
    }
    k
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
}

pub(crate) fn decode_value<T: DeserializeOwned>(key: &MapKey, bytes: &[u8]) -> Result<T, MapError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|source| MapError::Decode { key: key.to_string(), source })?;
    if used != bytes.len() {
        return Err(MapError::Inconsistent(format!(
            "value of {key} has {} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Printable form of a key that did not parse: ASCII kept, other bytes escaped.
pub(crate) fn show_raw_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_numerically() {
        let keys = [
            MapKey::NextVolumeId,
            MapKey::Node(0),
            MapKey::Node(u64::MAX),
            MapKey::Volume(7),
            MapKey::Chunk(ChunkId { volume: 3, index: 255 }),
            MapKey::Chunk(ChunkId { volume: 3, index: 256 }),
            MapKey::Chunk(ChunkId { volume: 4, index: 0 }),
            MapKey::RecordSeq,
            MapKey::Record("iscsi/target/iqn.2026-11.io.basalt:a".into()),
        ];
        for k in keys {
            assert!(is_map_key(&k.encode()));
            assert_eq!(MapKey::parse(&k.encode()), Some(k));
        }
        // Byte order of encoded chunk keys is (volume, index) order.
        let a = MapKey::Chunk(ChunkId { volume: 3, index: 255 }).encode();
        let b = MapKey::Chunk(ChunkId { volume: 3, index: 256 }).encode();
        let c = MapKey::Chunk(ChunkId { volume: 4, index: 0 }).encode();
        assert!(a < b && b < c);
        assert!(a.starts_with(&chunk_prefix(3)) && !c.starts_with(&chunk_prefix(3)));
    }

    #[test]
    fn foreign_keys_are_not_map_keys() {
        for k in [&b""[..], b"x", b"n", b"n1234567", b"n123456789", b"sother", b"c12345678", b"\xffapplied"] {
            assert!(!is_map_key(k), "{}", show_raw_key(k));
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_value(&5u64).expect("encode u64");
        bytes.push(0);
        assert!(matches!(
            decode_value::<u64>(&MapKey::NextVolumeId, &bytes),
            Err(MapError::Inconsistent(_))
        ));
    }
}
