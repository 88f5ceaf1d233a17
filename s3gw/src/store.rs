//! The object store: a [`Backend`] on Basalt storage.
//!
//! # Where things live
//! - **Metadata** goes in the metadata index (`StorageClient::index_*`), under `s3/`:
//!
//!   | key                              | value                                     |
//!   |----------------------------------|-------------------------------------------|
//!   | `s3/U/` account id               | [`Account`]                               |
//!   | `s3/A/` access key id            | [`AccessKey`]                             |
//!   | `s3/B/` bucket                   | [`BucketRecord`]                          |
//!   | `s3/O/` bucket `/` object key    | [`KeyRecord`]: the current version        |
//!   | `s3/W/` bucket `/` key `\0` !seq | [`ObjectRecord`]: every version, newest first |
//!   | `s3/V/` data volume name         | [`Reservation`] (2 × `u64` BE)            |
//!   | `s3/I/` data volume name         | random: rewritten by each gateway start   |
//!   | `s3/Q/` bucket `/b`, `/n`        | counters: bytes and versions stored       |
//!   | `s3/G/` volume id, offset (BE)   | [`Garbage`]: an extent to trim            |
//!   | `s3/M/` bucket `/` key `\0` upload id | [`UploadRecord`]: a multipart upload  |
//!   | `s3/P/` upload id `/` part (u32 BE) | [`PartRecord`]                          |
//!
//!   Bucket names never hold `/`, so `s3/O/<bucket>/` is exactly one bucket's objects, in
//!   the byte order of their keys (S3's listing order).
//!
//!   Values are bincode. Those whose layout grew (object, key and upload records: tags and
//!   part sizes came later) start with a layout mark and number, a byte no first-layout
//!   value starts with, and entries of the first layout still decode ([`Grown`]).
//! - **Data** goes in one *data volume* per gateway node (`s3data-<node>`), a thin 1 PiB
//!   Basalt volume used as an append-only log: every object's data is written at fresh,
//!   4 KiB-aligned offsets, so small objects share chunks instead of taking one each, and a
//!   large object is a list of extents of up to [`PIECE`] bytes. The volume's replication,
//!   repair and fencing are the storage core's. Any gateway reads any data volume; only
//!   its own node's gateway writes it (under the volume's write lease).
//!
//! # Durability and order
//! A PUT writes all its data (each write is acknowledged only once every live replica has
//! it durably), then commits the object's record with one index transaction, which is when
//! the object exists. The transaction checks the bucket's version (a bucket being deleted
//! refuses new objects) and the version of the object record it replaces, whose extents it
//! queues as garbage in the same transaction.
//!
//! Garbage is trimmed by the writer of its volume after [`GARBAGE_GRACE`], so a GET that
//! is still streaming an object replaced meanwhile keeps reading intact data. Data written
//! by a PUT that failed before its commit is queued as garbage too. Data of a gateway that
//! died mid-PUT is found by the next start of that gateway: it writes a new *incarnation*
//! entry (every commit of data the gateway wrote checks the version of that entry, so a
//! commit of the dead run still in flight can no longer succeed), then trims whatever in
//! the space the dead run had reserved is referenced by no object, part or garbage entry.

use crate::backend::{
    Account, Backend, Bucket, ByteStream, CompletedPart, Error, ListPage, ListQuery, ObjectInfo, PartInfo, PutOptions,
    Result, Upload, UploadQuery, MAX_PART_NUMBER, MIN_PART_SIZE,
};
// Versions and lifecycle rules are the backend's vocabulary; they are also this store's.
pub use crate::backend::{Deleted, LifecycleRule, VersionEntry, VersionPage, Versioning};
use async_trait::async_trait;
use basalt_storaged_client::{StorageClient, Volume, VolumeOptions};
use basalt_types::{ErrorCode, IndexEntry, IndexOutcome, IndexTxn, NodeId, VolumeId};
use bytes::BytesMut;
use futures::stream::StreamExt;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn, Instrument};

/// Largest piece of object data written or read in one volume call.
pub const PIECE: u64 = 4 << 20;
/// Pieces of one PUT being written at once (the PUT's memory is about this many pieces).
const WRITES_IN_FLIGHT: usize = 4;
/// Object data this gateway has in flight to storage at most, over all its PUTs, in units
/// of [`WRITE_UNIT`]. Without a bound, many large uploads at once queue so much on the disks
/// that replica writes time out (and replicas are dropped) instead of waiting their turn;
/// with it, uploads beyond it wait here, and TCP slows their clients.
const WRITE_BUDGET: u64 = 64 << 20;
const WRITE_UNIT: u64 = 4 << 10;
/// Pieces of one GET read ahead of the client.
const READ_AHEAD: usize = 2;
/// Data volumes are thin: this is address space, not capacity.
const DATA_VOLUME_SIZE: u64 = 1 << 50;
/// Space of the data volume reserved per index write: a restarted gateway goes on after
/// the last reservation, never over data it may have written.
const RESERVE_STEP: u64 = 1 << 30;
const ALIGN: u64 = 4096;
/// How long replaced or deleted data stays readable before it is trimmed, by default.
pub const GARBAGE_GRACE: Duration = Duration::from_secs(15 * 60);
/// Access keys are cached this long: a disabled key stops working within this time.
const KEY_CACHE: Duration = Duration::from_secs(10);
/// Longest object key S3 allows, in bytes.
pub const MAX_KEY: usize = 1024;
/// Index listing page size used internally.
const LIST_PAGE: u32 = 1000;

const P_ACCOUNT: &[u8] = b"s3/U/";
const P_KEY: &[u8] = b"s3/A/";
const P_BUCKET: &[u8] = b"s3/B/";
const P_OBJECT: &[u8] = b"s3/O/";
const P_VERSION: &[u8] = b"s3/W/";
const P_VOLUME: &[u8] = b"s3/V/";
const P_GARBAGE: &[u8] = b"s3/G/";
const P_INCARNATION: &[u8] = b"s3/I/";
const P_USAGE: &[u8] = b"s3/Q/";
const P_UPLOAD: &[u8] = b"s3/M/";
const P_PART: &[u8] = b"s3/P/";

/// An access key of an account.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccessKey {
    pub id: String,
    pub account: String,
    pub secret: String,
    pub enabled: bool,
    pub created_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BucketRecord {
    pub bucket: Bucket,
    /// Set while a delete checks that the bucket is empty: new objects are refused.
    pub deleting: bool,
    pub versioning: Versioning,
    pub quota: Quota,
    pub lifecycle: Vec<LifecycleRule>,
    /// The bucket policy as the owner put it (JSON), checked when it was put.
    pub policy: Option<String>,
}

/// A bucket entry written before bucket policies existed (decoded as having none).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct BucketRecordV1 {
    bucket: Bucket,
    deleting: bool,
    versioning: Versioning,
    quota: Quota,
    lifecycle: Vec<LifecycleRule>,
}

impl BucketRecord {
    /// Decodes an `s3/B/` entry, of this layout or of the one before it.
    fn decode(k: &[u8], v: &[u8]) -> Result<BucketRecord> {
        dec::<BucketRecord>(k, v).or_else(|e| match dec::<BucketRecordV1>(k, v) {
            Ok(old) => Ok(BucketRecord {
                bucket: old.bucket,
                deleting: old.deleting,
                versioning: old.versioning,
                quota: old.quota,
                lifecycle: old.lifecycle,
                policy: None,
            }),
            Err(_) => Err(e),
        })
    }

    /// The bucket as the protocol layer sees it (its policy included).
    fn to_bucket(&self) -> Bucket {
        Bucket { policy: self.policy.clone(), ..self.bucket.clone() }
    }
}

/// What one lifecycle pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifecycleReport {
    pub expired: usize,
    pub noncurrent_removed: usize,
    pub markers_removed: usize,
    pub uploads_aborted: usize,
}

/// Limits of a bucket; every stored version counts, delete markers do not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub max_bytes: Option<u64>,
    pub max_objects: Option<u64>,
}

/// What a bucket holds: every version's bytes and the number of versions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: i64,
    pub objects: i64,
}

/// A run of object data in a data volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub volume: VolumeId,
    pub offset: u64,
    pub len: u64,
}

/// One version of an object (the `s3/W/` entries; the current one is also in `s3/O/`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub info: ObjectInfo,
    pub extents: Vec<Extent>,
    /// Random id of the PUT that wrote it: a retried commit recognises its own write.
    pub write_id: u64,
    /// `null`, or the 16 hex digits of `seq`.
    pub version_id: String,
    /// Orders the versions of a key (newest highest); microseconds since the epoch, raised
    /// past the key's newest version if the clock is behind.
    pub seq: u64,
    pub delete_marker: bool,
}

impl ObjectRecord {
    fn new(info: ObjectInfo, extents: Vec<Extent>) -> Self {
        Self { info, extents, write_id: rand::random(), version_id: NULL_VERSION.into(), seq: 0, delete_marker: false }
    }
}

/// The `s3/O/` entry of a key: its current version (the newest), and where its `null`
/// version is. Every change to a key's versions rewrites it, so its entry version guards
/// them all.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub current: ObjectRecord,
    pub null_seq: Option<u64>,
}

impl Grown for ObjectRecord {
    const LAYOUT: u8 = 2;
    type First = ObjectRecordV1;
}

impl Grown for KeyRecord {
    const LAYOUT: u8 = 2;
    type First = KeyRecordV1;
}

impl Grown for UploadRecord {
    const LAYOUT: u8 = 2;
    type First = UploadRecordV1;
}

/// [`ObjectInfo`] as stored before objects had tags and part sizes.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ObjectInfoV1 {
    key: String,
    size: u64,
    etag: String,
    last_modified_ms: u64,
    content_type: Option<String>,
    user_meta: std::collections::BTreeMap<String, String>,
    headers: std::collections::BTreeMap<String, String>,
    checksums: std::collections::BTreeMap<String, String>,
    version_id: Option<String>,
}

/// [`ObjectRecord`] in its first layout.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ObjectRecordV1 {
    info: ObjectInfoV1,
    extents: Vec<Extent>,
    write_id: u64,
    version_id: String,
    seq: u64,
    delete_marker: bool,
}

/// [`KeyRecord`] in its first layout.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct KeyRecordV1 {
    current: ObjectRecordV1,
    null_seq: Option<u64>,
}

/// [`UploadRecord`] in its first layout.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct UploadRecordV1 {
    upload: Upload,
    content_type: Option<String>,
    user_meta: std::collections::BTreeMap<String, String>,
    headers: std::collections::BTreeMap<String, String>,
}

impl From<ObjectRecordV1> for ObjectRecord {
    fn from(v: ObjectRecordV1) -> Self {
        let i = v.info;
        ObjectRecord {
            info: ObjectInfo {
                key: i.key,
                size: i.size,
                etag: i.etag,
                last_modified_ms: i.last_modified_ms,
                content_type: i.content_type,
                user_meta: i.user_meta,
                headers: i.headers,
                checksums: i.checksums,
                version_id: i.version_id,
                tags: Default::default(),
                part_sizes: Vec::new(),
            },
            extents: v.extents,
            write_id: v.write_id,
            version_id: v.version_id,
            seq: v.seq,
            delete_marker: v.delete_marker,
        }
    }
}

impl From<KeyRecordV1> for KeyRecord {
    fn from(v: KeyRecordV1) -> Self {
        KeyRecord { current: v.current.into(), null_seq: v.null_seq }
    }
}

impl From<UploadRecordV1> for UploadRecord {
    fn from(v: UploadRecordV1) -> Self {
        UploadRecord {
            upload: v.upload,
            content_type: v.content_type,
            user_meta: v.user_meta,
            headers: v.headers,
            tags: Default::default(),
        }
    }
}

pub const NULL_VERSION: &str = "null";

/// A multipart upload: what the object will be stored with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadRecord {
    pub upload: Upload,
    pub content_type: Option<String>,
    pub user_meta: std::collections::BTreeMap<String, String>,
    pub headers: std::collections::BTreeMap<String, String>,
    pub tags: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartRecord {
    pub info: PartInfo,
    pub extents: Vec<Extent>,
}

/// An extent to trim once `after_ms` has passed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Garbage {
    pub len: u64,
    pub after_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn key(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + rest.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(rest);
    k
}

fn object_key(bucket: &str, name: &str) -> Vec<u8> {
    let mut k = key(P_OBJECT, bucket.as_bytes());
    k.push(b'/');
    k.extend_from_slice(name.as_bytes());
    k
}

/// Versions of a key sort newest first: the sequence number is stored inverted.
fn usage_keys(bucket: &str) -> (Vec<u8>, Vec<u8>) {
    let base = key(P_USAGE, bucket.as_bytes());
    (key(&base, b"/b"), key(&base, b"/n"))
}

/// Counter changes for versions added (`sign` 1) or removed (-1).
fn usage_adds(bucket: &str, versions: &[(&ObjectRecord, i64)]) -> Vec<(Vec<u8>, i64)> {
    let (bytes, objects) = versions
        .iter()
        .filter(|(v, _)| !v.delete_marker)
        .fold((0i64, 0i64), |(b, n), (v, sign)| (b + sign * v.info.size as i64, n + sign));
    let (bk, nk) = usage_keys(bucket);
    let mut adds = Vec::new();
    if bytes != 0 {
        adds.push((bk, bytes));
    }
    if objects != 0 {
        adds.push((nk, objects));
    }
    adds
}

fn version_key(bucket: &str, name: &str, seq: u64) -> Vec<u8> {
    let mut k = version_prefix(bucket, name);
    k.extend_from_slice(&(u64::MAX - seq).to_be_bytes());
    k
}

fn version_prefix(bucket: &str, name: &str) -> Vec<u8> {
    let mut k = version_base(bucket);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

fn version_base(bucket: &str) -> Vec<u8> {
    let mut k = key(P_VERSION, bucket.as_bytes());
    k.push(b'/');
    k
}

/// The key name and sequence number of a version entry's key (after `base`).
fn parse_version_key(base: &[u8], k: &[u8]) -> Option<(String, u64)> {
    let rest = k.get(base.len()..)?;
    let (name, tail) = rest.split_at(rest.len().checked_sub(9)?);
    let (&sep, rev) = tail.split_first()?;
    if sep != 0 {
        return None;
    }
    let rev = u64::from_be_bytes(rev.try_into().ok()?);
    Some((String::from_utf8(name.to_vec()).ok()?, u64::MAX - rev))
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The sequence number a version id names (`null` is looked up separately).
fn parse_version_id(id: &str) -> Result<u64> {
    if id.len() != 16 {
        return Err(Error::InvalidArgument(format!("invalid version id {id:?}")));
    }
    u64::from_str_radix(id, 16).map_err(|_| Error::InvalidArgument(format!("invalid version id {id:?}")))
}

fn upload_key(bucket: &str, name: &str, id: &str) -> Vec<u8> {
    let mut k = key(P_UPLOAD, bucket.as_bytes());
    k.push(b'/');
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn part_prefix(upload: &str) -> Vec<u8> {
    let mut k = key(P_PART, upload.as_bytes());
    k.push(b'/');
    k
}

fn part_key(upload: &str, number: u32) -> Vec<u8> {
    key(&part_prefix(upload), &number.to_be_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The offset a garbage key names, after its volume's `prefix`.
fn garbage_offset(prefix: &[u8], k: &[u8]) -> Option<u64> {
    k.get(prefix.len()..).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}

fn garbage_key(e: &Extent) -> Vec<u8> {
    let mut k = key(P_GARBAGE, &e.volume.to_be_bytes());
    k.extend_from_slice(&e.offset.to_be_bytes());
    k
}

/// Index values stored as plain bincode, in the one layout they ever had. Values whose
/// layout grew ([`Grown`]) are encoded with a layout mark instead; this bound keeps them out
/// of [`enc`] and [`dec`].
trait Plain {}
impl Plain for Account {}
impl Plain for AccessKey {}
impl Plain for BucketRecord {}
impl Plain for BucketRecordV1 {}
impl Plain for PartRecord {}
impl Plain for Garbage {}
impl Plain for ObjectRecordV1 {}
impl Plain for KeyRecordV1 {}
impl Plain for UploadRecordV1 {}

fn enc<T: Serialize + Plain>(value: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| Error::Internal(format!("encoding: {e}")))
}

fn dec<T: serde::de::DeserializeOwned + Plain>(what: &[u8], bytes: &[u8]) -> Result<T> {
    dec_any(what, bytes)
}

fn dec_any<T: serde::de::DeserializeOwned>(what: &[u8], bytes: &[u8]) -> Result<T> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| Error::Internal(format!("index entry {} does not decode: {e}", what.escape_ascii())))
}

/// First byte of a value in a later layout: no value of a first layout begins with it (they
/// all begin with a string's length, and bincode 2's varint prefixes stop at 254). The
/// layout number follows it.
const LAYOUT_MARK: u8 = 0xFF;

/// An index value whose layout grew since records were first written: encoded as
/// [`LAYOUT_MARK`], [`Grown::LAYOUT`], bincode; decoded from that, or from the first layout
/// (plain bincode of [`Grown::First`]), so entries written by older gateways still read.
trait Grown: Serialize + serde::de::DeserializeOwned + Sized {
    const LAYOUT: u8;
    type First: serde::de::DeserializeOwned + Plain + Into<Self>;

    fn encode(&self) -> Result<Vec<u8>> {
        let mut out = vec![LAYOUT_MARK, Self::LAYOUT];
        bincode::serde::encode_into_std_write(self, &mut out, bincode::config::standard())
            .map_err(|e| Error::Internal(format!("encoding: {e}")))?;
        Ok(out)
    }

    fn decode(what: &[u8], bytes: &[u8]) -> Result<Self> {
        match bytes {
            [LAYOUT_MARK, layout, rest @ ..] if *layout == Self::LAYOUT => dec_any(what, rest),
            [LAYOUT_MARK, layout, ..] => Err(Error::Internal(format!(
                "index entry {} has layout {layout}, which this gateway does not know (it knows up to {})",
                what.escape_ascii(),
                Self::LAYOUT
            ))),
            _ => dec::<Self::First>(what, bytes).map(Into::into),
        }
    }
}

fn storage(e: basalt_storaged_client::Error) -> Error {
    match e.code() {
        ErrorCode::Unavailable | ErrorCode::NotLeader | ErrorCode::Fenced => Error::Unavailable(e.to_string()),
        _ => Error::Internal(e.to_string()),
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Who runs this store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The node this gateway runs on: its data volume is `s3data-<node_name>`.
    pub node: NodeId,
    pub node_name: String,
    /// How long replaced or deleted data stays readable before it is trimmed
    /// ([`GARBAGE_GRACE`] unless a test wants it shorter).
    pub garbage_grace: Duration,
    /// The length of a "day" in lifecycle rules (a day, unless a test wants it shorter).
    pub lifecycle_day: Duration,
}

impl StoreConfig {
    pub fn new(node: NodeId, node_name: impl Into<String>) -> Self {
        Self {
            node,
            node_name: node_name.into(),
            garbage_grace: GARBAGE_GRACE,
            lifecycle_day: Duration::from_secs(24 * 3600),
        }
    }
}

/// The data volume this gateway appends to, and how far it has got.
struct DataLog {
    volume: Arc<Volume>,
    name: String,
    /// (next free offset, end of the space reserved in the index)
    cursor: tokio::sync::Mutex<(u64, u64)>,
    /// Where this run's space starts (all below was reserved by earlier runs).
    start: u64,
    /// Version of this run's incarnation entry: commits of data written here check it.
    incarnation: u64,
    /// Space an earlier run reserved and may have left unreferenced data in, until swept.
    orphan_window: Mutex<Option<(u64, u64)>>,
}

impl DataLog {
    fn incarnation_check(&self) -> (Vec<u8>, u64) {
        (key(P_INCARNATION, self.name.as_bytes()), self.incarnation)
    }
}

/// The `s3/V/` entry of a data volume: the end of the space handed out so far, and where
/// the current run of its gateway started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    pub end: u64,
    pub run_start: u64,
}

impl Reservation {
    fn encode(self) -> Vec<u8> {
        let mut v = self.end.to_be_bytes().to_vec();
        v.extend_from_slice(&self.run_start.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Reservation {
        let word = |i: usize| v.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let end = word(0).unwrap_or(0);
        Reservation { end, run_start: word(1).unwrap_or(end).min(end) }
    }
}

pub struct ObjectStore {
    client: Arc<StorageClient>,
    cfg: StoreConfig,
    log: OnceCell<Arc<DataLog>>,
    readers: Mutex<HashMap<VolumeId, Arc<Volume>>>,
    keys: Mutex<HashMap<String, (Instant, Option<(Account, String)>)>>,
    /// Bounds the data in flight to storage ([`WRITE_BUDGET`]).
    write_budget: Arc<tokio::sync::Semaphore>,
}

impl ObjectStore {
    pub fn new(client: Arc<StorageClient>, cfg: StoreConfig) -> Arc<Self> {
        Arc::new(Self {
            client,
            cfg,
            log: OnceCell::new(),
            readers: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
            write_budget: Arc::new(tokio::sync::Semaphore::new((WRITE_BUDGET / WRITE_UNIT) as usize)),
        })
    }

    // ---- accounts and keys (used by `basalt s3 ...` and the gateway) ----

    /// Creates an account and its first access key; returns both.
    pub async fn create_account(&self, name: &str) -> Result<(Account, AccessKey)> {
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Internal(format!("account names are 1 to 64 printable ASCII characters, not {name:?}")));
        }
        let accounts = self.list_accounts().await?;
        if accounts.iter().any(|a| a.name == name) {
            return Err(Error::Internal(format!("an account named {name:?} exists already")));
        }
        let account = Account { id: random_hex(16), name: name.to_string() };
        let ak = new_access_key(&account.id);
        let txn = IndexTxn {
            checks: vec![(key(P_ACCOUNT, account.id.as_bytes()), 0), (key(P_KEY, ak.id.as_bytes()), 0)],
            puts: vec![
                (key(P_ACCOUNT, account.id.as_bytes()), Some(enc(&account)?)),
                (key(P_KEY, ak.id.as_bytes()), Some(enc(&ak)?)),
            ],
            adds: Vec::new(),
        };
        self.commit(txn).await?;
        Ok((account, ak))
    }

    pub async fn list_accounts(&self) -> Result<Vec<Account>> {
        self.list_all(P_ACCOUNT).await?.iter().map(|(k, v)| dec(k, v)).collect()
    }

    pub async fn account_by_name(&self, name: &str) -> Result<Account> {
        self.list_accounts()
            .await?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| Error::Internal(format!("no account named {name:?}")))
    }

    /// A new access key for `account`.
    pub async fn create_key(&self, account: &Account) -> Result<AccessKey> {
        let ak = new_access_key(&account.id);
        let k = key(P_KEY, ak.id.as_bytes());
        self.commit(IndexTxn { checks: vec![(k.clone(), 0)], puts: vec![(k, Some(enc(&ak)?))], adds: Vec::new() }).await?;
        Ok(ak)
    }

    pub async fn list_keys(&self, account: Option<&Account>) -> Result<Vec<AccessKey>> {
        let keys: Vec<AccessKey> = self.list_all(P_KEY).await?.iter().map(|(k, v)| dec(k, v)).collect::<Result<_>>()?;
        Ok(keys.into_iter().filter(|k| account.is_none_or(|a| a.id == k.account)).collect())
    }

    /// Deletes an access key (requests signed with it fail within [`KEY_CACHE`]).
    pub async fn delete_key(&self, id: &str) -> Result<()> {
        let k = key(P_KEY, id.as_bytes());
        match self.client.index_get(&k).await.map_err(storage)? {
            None => Err(Error::Internal(format!("no access key {id:?}"))),
            Some(e) => self.commit(IndexTxn { checks: vec![(k.clone(), e.version)], puts: vec![(k, None)], adds: Vec::new() }).await,
        }
    }

    // ---- multipart uploads ----

    /// Starts a multipart upload of `name`; the object appears only on completion.
    pub async fn create_upload(&self, owner: &Account, bucket: &str, name: &str, opts: PutOptions) -> Result<Upload> {
        validate_key(name)?;
        let (record, _) = self.bucket_record(bucket).await?;
        if record.deleting {
            return Err(Error::NoSuchBucket(bucket.to_string()));
        }
        // Time first, so one key's uploads list in the order they were started.
        let id = format!("{:016x}{}", now_ms(), random_hex(12));
        let upload = Upload { id: id.clone(), key: name.to_string(), initiated_ms: now_ms(), initiator: owner.id.clone() };
        let rec = UploadRecord {
            upload: upload.clone(),
            content_type: opts.content_type,
            user_meta: opts.user_meta,
            headers: opts.headers,
            tags: opts.tags,
        };
        let k = upload_key(bucket, name, &id);
        self.commit(IndexTxn { checks: vec![(k.clone(), 0)], puts: vec![(k, Some(rec.encode()?))], adds: Vec::new() }).await?;
        Ok(upload)
    }

    async fn upload_record(&self, bucket: &str, name: &str, id: &str) -> Result<(UploadRecord, u64)> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::NoSuchUpload);
        }
        let k = upload_key(bucket, name, id);
        match self.client.index_get(&k).await.map_err(storage)? {
            Some(e) => Ok((UploadRecord::decode(&k, &e.value)?, e.version)),
            None => {
                self.bucket_record(bucket).await?;
                Err(Error::NoSuchUpload)
            }
        }
    }

    /// Stores one part (replacing an earlier upload of the same number).
    pub async fn upload_part(
        &self,
        bucket: &str,
        name: &str,
        id: &str,
        number: u32,
        opts: PutOptions,
        body: ByteStream,
    ) -> Result<PartInfo> {
        if !(1..=MAX_PART_NUMBER).contains(&number) {
            return Err(Error::InvalidArgument(format!("part numbers are 1 to {MAX_PART_NUMBER}, not {number}")));
        }
        self.upload_record(bucket, name, id).await?;
        let log = self.log().await?;
        let (written, size, md5) = self.write_body(body, &opts).await?;
        let info = PartInfo { number, etag: hex(&md5), size, last_modified_ms: now_ms() };
        let record = PartRecord { info: info.clone(), extents: written.extents.clone() };
        let pk = part_key(id, number);
        let value = enc(&record)?;
        for _ in 0..16 {
            // The upload must still exist when the part is recorded: a part recorded after
            // a completion or an abort would never be cleaned up.
            let (_, uversion) = self.upload_record(bucket, name, id).await?;
            let old = self.client.index_get(&pk).await.map_err(storage)?;
            let mut txn = IndexTxn {
                checks: vec![
                    (upload_key(bucket, name, id), uversion),
                    (pk.clone(), old.as_ref().map_or(0, |e| e.version)),
                    log.incarnation_check(),
                ],
                puts: vec![(pk.clone(), Some(value.clone()))],
                adds: Vec::new(),
            };
            if let Some(old) = &old {
                let old: PartRecord = dec(&pk, &old.value)?;
                for e in &old.extents {
                    txn.puts.push(garbage_entry(e, self.cfg.garbage_grace.as_millis() as u64)?);
                }
            }
            match self.client.index_txn(txn).await.map_err(storage)? {
                IndexOutcome::Committed { .. } => {
                    written.keep();
                    return Ok(info);
                }
                IndexOutcome::Conflict { key, .. } if key == log.incarnation_check().0 => return Err(superseded()),
                IndexOutcome::Conflict { .. } => continue,
            }
        }
        Err(Error::Unavailable("the part kept changing; retry".into()))
    }

    /// Every part of an upload, by number.
    async fn parts(&self, id: &str) -> Result<Vec<(PartRecord, Vec<u8>)>> {
        self.list_all(&part_prefix(id)).await?.into_iter().map(|(k, v)| Ok((dec::<PartRecord>(&k, &v)?, k))).collect()
    }

    /// Parts after `after`, at most `max`; and whether more follow.
    pub async fn list_parts(&self, bucket: &str, name: &str, id: &str, after: u32, max: usize) -> Result<(Upload, Vec<PartInfo>, bool)> {
        let (upload, _) = self.upload_record(bucket, name, id).await?;
        let prefix = part_prefix(id);
        let start = part_key(id, after.saturating_add(1));
        let (entries, more) = self.client.index_list(&prefix, &start, (max.clamp(1, 1000)) as u32).await.map_err(storage)?;
        let parts = entries.iter().map(|e| dec::<PartRecord>(&e.key, &e.value).map(|p| p.info)).collect::<Result<_>>()?;
        Ok((upload.upload, parts, more))
    }

    /// Uploads in progress in `bucket` whose key starts with `prefix`, by key then age,
    /// after the (key, upload id) marker (an empty upload id: after every upload of the
    /// key); at most `max`, and whether more follow.
    pub async fn list_uploads(&self, bucket: &str, prefix: &str, after: Option<(&str, &str)>, max: usize) -> Result<(Vec<Upload>, bool)> {
        self.bucket_record(bucket).await?;
        let mut base = key(P_UPLOAD, bucket.as_bytes());
        base.push(b'/');
        let full = key(&base, prefix.as_bytes());
        let start = match after {
            Some((k, "")) => after_prefix(&upload_key(bucket, k, "")),
            Some((k, id)) => {
                let mut s = upload_key(bucket, k, id);
                s.push(0);
                s
            }
            None => full.clone(),
        };
        let start = start.max(full.clone());
        let (entries, more) = self.client.index_list(&full, &start, (max.clamp(1, 1000)) as u32).await.map_err(storage)?;
        let uploads = entries.iter().map(|e| UploadRecord::decode(&e.key, &e.value).map(|u| u.upload)).collect::<Result<_>>()?;
        Ok((uploads, more))
    }

    /// Makes the object from the listed parts. Parts uploaded but not listed are dropped.
    pub async fn complete_upload(&self, bucket: &str, name: &str, id: &str, list: &[CompletedPart]) -> Result<ObjectInfo> {
        let (upload, uversion) = self.upload_record(bucket, name, id).await?;
        if list.is_empty() {
            return Err(Error::InvalidArgument("a multipart upload needs at least one part".into()));
        }
        if list.windows(2).any(|w| w[0].number >= w[1].number) {
            return Err(Error::InvalidPartOrder);
        }
        let stored = self.parts(id).await?;
        let by_number: HashMap<u32, &PartRecord> = stored.iter().map(|(p, _)| (p.info.number, p)).collect();
        let mut extents = Vec::new();
        let mut md5s = Md5::new();
        let mut size = 0u64;
        let mut part_sizes = Vec::with_capacity(list.len());
        for (i, want) in list.iter().enumerate() {
            let part = by_number.get(&want.number).ok_or(Error::InvalidPart(want.number))?;
            if want.etag.trim_matches('"') != part.info.etag {
                return Err(Error::InvalidPart(want.number));
            }
            if i + 1 < list.len() && part.info.size < MIN_PART_SIZE {
                return Err(Error::EntityTooSmall(want.number));
            }
            let digest: Vec<u8> = (0..part.info.etag.len() / 2)
                .filter_map(|j| u8::from_str_radix(part.info.etag.get(2 * j..2 * j + 2)?, 16).ok())
                .collect();
            md5s.update(&digest);
            size += part.info.size;
            part_sizes.push(part.info.size);
            for e in &part.extents {
                push_extent(&mut extents, *e);
            }
        }
        let info = ObjectInfo {
            key: name.to_string(),
            size,
            etag: format!("{}-{}", hex(&md5s.finalize()), list.len()),
            last_modified_ms: now_ms(),
            content_type: upload.content_type.clone(),
            user_meta: upload.user_meta.clone(),
            headers: upload.headers.clone(),
            checksums: Default::default(),
            version_id: None,
            tags: upload.tags.clone(),
            part_sizes,
        };
        self.check_quota(bucket, self.bucket_record(bucket).await?.0.quota, size).await?;
        let rec = ObjectRecord::new(info, extents);
        if rec.encode()?.len() > basalt_types::MAX_INDEX_VALUE {
            return Err(Error::InvalidArgument(format!("an object of {} parts is more than this store can describe", list.len())));
        }
        let used: std::collections::HashSet<u32> = list.iter().map(|p| p.number).collect();
        let uk = upload_key(bucket, name, id);
        let write_id = rec.write_id;
        let info = match self.commit_version(bucket, name, rec, None, (vec![(uk.clone(), uversion)], vec![(uk, None)]), None).await? {
            Some(rec) => rec.info,
            // The upload went away: completed by our own earlier attempt, or aborted.
            None => match self.key_record(bucket, name).await? {
                Some((k, _)) if k.current.write_id == write_id => k.current.info,
                _ => return Err(Error::NoSuchUpload),
            },
        };
        // The upload is gone: drop its part records, queuing the data of unused parts.
        let mut puts = Vec::new();
        for (part, k) in &stored {
            if !used.contains(&part.info.number) {
                for e in &part.extents {
                    puts.push(garbage_entry(e, 0)?);
                }
            }
            puts.push((k.clone(), None));
        }
        self.delete_in_batches(puts).await;
        Ok(info)
    }

    /// Drops an upload and its parts' data.
    pub async fn abort_upload(&self, bucket: &str, name: &str, id: &str) -> Result<()> {
        let (_, uversion) = self.upload_record(bucket, name, id).await?;
        let uk = upload_key(bucket, name, id);
        match self.client.index_txn(IndexTxn { checks: vec![(uk.clone(), uversion)], puts: vec![(uk, None)], adds: Vec::new() }).await.map_err(storage)? {
            IndexOutcome::Committed { .. } => {}
            IndexOutcome::Conflict { .. } => return Err(Error::NoSuchUpload),
        }
        let mut puts = Vec::new();
        for (part, k) in self.parts(id).await? {
            for e in &part.extents {
                puts.push(garbage_entry(e, 0)?);
            }
            puts.push((k, None));
        }
        self.delete_in_batches(puts).await;
        Ok(())
    }

    /// Applies unconditional index writes in transactions of bounded size; best effort
    /// (what fails stays as dead records, logged).
    async fn delete_in_batches(&self, puts: Vec<(Vec<u8>, Option<Vec<u8>>)>) {
        for batch in puts.chunks(1000) {
            if let Err(e) = self.client.index_txn(IndexTxn { checks: vec![], puts: batch.to_vec(), adds: Vec::new() }).await {
                warn!(error = %e, entries = batch.len(), "could not clean up after a multipart upload");
            }
        }
    }

    // ---- lifecycle ----

    pub async fn set_lifecycle(&self, bucket: &str, rules: Vec<LifecycleRule>) -> Result<()> {
        for r in &rules {
            if r.id.len() > 255 {
                return Err(Error::InvalidArgument("a lifecycle rule id is at most 255 characters".into()));
            }
            if [r.expiration_days, r.noncurrent_days, r.abort_multipart_days].iter().any(|d| *d == Some(0)) {
                return Err(Error::InvalidArgument("lifecycle days must be positive".into()));
            }
        }
        self.update_bucket(bucket, |record| {
            record.lifecycle = rules.clone();
            Ok(())
        })
        .await
    }

    pub async fn lifecycle(&self, bucket: &str) -> Result<Vec<LifecycleRule>> {
        Ok(self.bucket_record(bucket).await?.0.lifecycle)
    }

    /// Applies the lifecycle rules of the buckets `mine` selects, as of `now_ms`.
    pub async fn run_lifecycle(&self, now_ms: u64, mine: impl Fn(&str) -> bool) -> Result<LifecycleReport> {
        let mut report = LifecycleReport::default();
        for b in self.all_buckets().await? {
            if b.deleting || !mine(&b.bucket.name) {
                continue;
            }
            for rule in b.lifecycle.iter().filter(|r| r.enabled) {
                self.apply_rule(&b.bucket.name, rule, now_ms, &mut report).await?;
            }
        }
        Ok(report)
    }

    fn days_ms(&self, days: u32) -> u64 {
        (self.cfg.lifecycle_day.as_millis() as u64).saturating_mul(u64::from(days))
    }

    async fn apply_rule(&self, bucket: &str, rule: &LifecycleRule, now_ms: u64, report: &mut LifecycleReport) -> Result<()> {
        if let Some(days) = rule.expiration_days {
            let cutoff = now_ms.saturating_sub(self.days_ms(days));
            let mut after = None;
            loop {
                let q = ListQuery { prefix: rule.prefix.clone(), delimiter: None, start_after: after.clone(), max_keys: 1000 };
                let page = self.list_objects(bucket, &q).await?;
                for o in page.objects.iter().filter(|o| o.last_modified_ms < cutoff) {
                    self.delete_current(bucket, &o.key).await?;
                    report.expired += 1;
                }
                match page.next_after {
                    Some(next) if page.truncated => after = Some(next),
                    _ => break,
                }
            }
        }
        if rule.noncurrent_days.is_some() || rule.expired_delete_markers {
            let cutoff = rule.noncurrent_days.map(|d| now_ms.saturating_sub(self.days_ms(d)));
            let (mut km, mut vm): (Option<String>, Option<String>) = (None, None);
            // The newer neighbour of each version: when it was written is when the version
            // stopped being current.
            let mut newer: Option<(String, u64)> = None;
            // Current delete markers: removed below if no version is left behind them.
            let mut lone_markers = Vec::new();
            let mut removals = Vec::new();
            loop {
                let q = ListQuery { prefix: rule.prefix.clone(), delimiter: None, start_after: None, max_keys: 1000 };
                let page = self.list_versions(bucket, &q, km.as_deref(), vm.as_deref()).await?;
                for v in &page.versions {
                    let key = v.info.key.clone();
                    let successor = newer.as_ref().filter(|(k, _)| *k == key).map(|(_, t)| *t);
                    match successor {
                        Some(since) if cutoff.is_some_and(|c| since < c) => removals.push((key.clone(), v.version_id.clone())),
                        _ => {}
                    }
                    if v.is_latest && v.delete_marker {
                        lone_markers.push((key.clone(), v.version_id.clone()));
                    }
                    newer = Some((key, v.info.last_modified_ms));
                }
                match page.next {
                    Some((k, v)) if page.truncated => (km, vm) = (Some(k), Some(v)),
                    _ => break,
                }
            }
            for (k, v) in removals {
                self.delete_version(bucket, &k, &v).await?;
                report.noncurrent_removed += 1;
            }
            if rule.expired_delete_markers {
                // A marker is "expired" once no version is left behind it: check again, as
                // the removals above may have made it so.
                for (k, v) in lone_markers {
                    let q = ListQuery { prefix: k.clone(), delimiter: None, start_after: None, max_keys: 2 };
                    let page = self.list_versions(bucket, &q, None, None).await?;
                    let behind = page.versions.iter().filter(|x| x.info.key == k).count();
                    if behind == 1 {
                        self.delete_version(bucket, &k, &v).await?;
                        report.markers_removed += 1;
                    }
                }
            }
        }
        if let Some(days) = rule.abort_multipart_days {
            let cutoff = now_ms.saturating_sub(self.days_ms(days));
            let mut after: Option<(String, String)> = None;
            loop {
                let marker = after.as_ref().map(|(k, u)| (k.as_str(), u.as_str()));
                let (uploads, more) = self.list_uploads(bucket, &rule.prefix, marker, 1000).await?;
                for u in uploads.iter().filter(|u| u.initiated_ms < cutoff) {
                    self.abort_upload(bucket, &u.key, &u.id).await?;
                    report.uploads_aborted += 1;
                }
                match uploads.last() {
                    Some(u) if more => after = Some((u.key.clone(), u.id.clone())),
                    _ => break,
                }
            }
        }
        Ok(())
    }

    /// Runs the lifecycle rules every `every` for the buckets this gateway is responsible
    /// for: bucket names are spread over the live nodes by hash, so each bucket is looked
    /// after by one gateway (while membership is stable).
    pub async fn lifecycle_loop(self: Arc<Self>, every: Duration, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let nodes = match self.client.list_nodes().await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "lifecycle: cannot list nodes; will retry");
                    continue;
                }
            };
            let mut alive: Vec<NodeId> =
                nodes.iter().filter(|n| n.state == basalt_types::NodeState::Alive).map(|n| n.id).collect();
            alive.sort_unstable();
            let Some(me) = alive.iter().position(|&n| n == self.cfg.node) else { continue };
            let n = alive.len() as u64;
            let mine = |bucket: &str| bucket_hash(bucket) % n == me as u64;
            match self.run_lifecycle(now_ms(), mine).await {
                Ok(r) if r == LifecycleReport::default() => {}
                Ok(r) => info!(?r, "lifecycle pass"),
                Err(e) => warn!(error = %e, "lifecycle pass failed; will retry"),
            }
        }
    }

    // ---- internals ----

    async fn commit(&self, txn: IndexTxn) -> Result<()> {
        match self.client.index_txn(txn).await.map_err(storage)? {
            IndexOutcome::Committed { .. } => Ok(()),
            IndexOutcome::Conflict { key, .. } => {
                Err(Error::Unavailable(format!("{} changed meanwhile; retry", key.escape_ascii())))
            }
        }
    }

    async fn list_all(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut start = prefix.to_vec();
        loop {
            let (entries, more) = self.client.index_list(prefix, &start, LIST_PAGE).await.map_err(storage)?;
            if let Some(last) = entries.last() {
                start = last.key.clone();
                start.push(0);
            }
            out.extend(entries.into_iter().map(|e| (e.key, e.value)));
            if !more {
                return Ok(out);
            }
        }
    }

    async fn bucket_record(&self, name: &str) -> Result<(BucketRecord, u64)> {
        let k = key(P_BUCKET, name.as_bytes());
        match self.client.index_get(&k).await.map_err(storage)? {
            Some(e) => Ok((BucketRecord::decode(&k, &e.value)?, e.version)),
            None => Err(Error::NoSuchBucket(name.to_string())),
        }
    }

    async fn key_record(&self, bucket: &str, name: &str) -> Result<Option<(KeyRecord, u64)>> {
        let k = object_key(bucket, name);
        match self.client.index_get(&k).await.map_err(storage)? {
            Some(e) => Ok(Some((KeyRecord::decode(&k, &e.value)?, e.version))),
            None => Ok(None),
        }
    }

    /// Commits `rec` as the newest version of `name`: as a new version when the bucket's
    /// versioning is enabled, else as the `null` version, replacing (and queuing as garbage)
    /// the key's previous `null` version. `extra` checks and writes go into the same
    /// transaction; a conflict on one of `extra`'s checks is returned as `Ok(None)`.
    /// `known` is the bucket's entry as the caller read it, used for the first attempt
    /// (the transaction checks its version, so a stale one only costs a retry).
    async fn commit_version(
        &self,
        bucket: &str,
        name: &str,
        mut rec: ObjectRecord,
        incarnation: Option<(Vec<u8>, u64)>,
        extra: (Vec<(Vec<u8>, u64)>, Vec<(Vec<u8>, Option<Vec<u8>>)>),
        mut known: Option<(BucketRecord, u64)>,
    ) -> Result<Option<ObjectRecord>> {
        let ok = object_key(bucket, name);
        let bk = key(P_BUCKET, bucket.as_bytes());
        let grace = self.cfg.garbage_grace.as_millis() as u64;
        for _ in 0..16 {
            let (brecord, bversion) = match known.take() {
                Some(b) => b,
                None => self.bucket_record(bucket).await?,
            };
            if brecord.deleting {
                return Err(Error::NoSuchBucket(bucket.to_string()));
            }
            let old = self.key_record(bucket, name).await?;
            if let Some((o, _)) = &old {
                if o.current.write_id == rec.write_id {
                    return Ok(Some(o.current.clone())); // our own commit, retried by the transport
                }
            }
            let newest = old.as_ref().map_or(0, |(o, _)| o.current.seq);
            rec.seq = now_us().max(newest + 1);
            let null = brecord.versioning != Versioning::Enabled;
            rec.version_id = if null { NULL_VERSION.into() } else { format!("{:016x}", rec.seq) };
            rec.info.version_id = (brecord.versioning != Versioning::Unversioned).then(|| rec.version_id.clone());
            let mut txn = IndexTxn {
                checks: vec![(bk.clone(), bversion), (ok.clone(), old.as_ref().map_or(0, |(_, v)| *v))],
                puts: vec![(version_key(bucket, name, rec.seq), Some(rec.encode()?))],
                adds: Vec::new(),
            };
            let mut null_seq = old.as_ref().and_then(|(o, _)| o.null_seq);
            let mut gone: Option<ObjectRecord> = None;
            if null {
                if let Some(ns) = null_seq {
                    // The null version is replaced: its data goes.
                    let replaced = match &old {
                        Some((o, _)) if o.current.seq == ns => Some(o.current.clone()),
                        _ => {
                            let vk = version_key(bucket, name, ns);
                            match self.client.index_get(&vk).await.map_err(storage)? {
                                Some(e) => Some(ObjectRecord::decode(&vk, &e.value)?),
                                None => None,
                            }
                        }
                    };
                    txn.puts.push((version_key(bucket, name, ns), None));
                    for e in replaced.iter().flat_map(|r| r.extents.iter()) {
                        txn.puts.push(garbage_entry(e, grace)?);
                    }
                    gone = replaced;
                }
                null_seq = Some(rec.seq);
            }
            txn.puts.push((ok.clone(), Some(KeyRecord { current: rec.clone(), null_seq }.encode()?)));
            let mut changes = vec![(&rec, 1)];
            changes.extend(gone.as_ref().map(|g| (g, -1)));
            txn.adds = usage_adds(bucket, &changes);
            if let Some(check) = &incarnation {
                txn.checks.push(check.clone());
            }
            txn.checks.extend(extra.0.iter().cloned());
            txn.puts.extend(extra.1.iter().cloned());
            match self.client.index_txn(txn).await.map_err(storage)? {
                IndexOutcome::Committed { .. } => return Ok(Some(rec)),
                IndexOutcome::Conflict { key, .. } if incarnation.as_ref().is_some_and(|(k, _)| *k == key) => {
                    return Err(superseded())
                }
                IndexOutcome::Conflict { key, .. } if extra.0.iter().any(|(k, _)| *k == key) => return Ok(None),
                IndexOutcome::Conflict { .. } => continue,
            }
        }
        Err(Error::Unavailable("the object kept changing; retry".into()))
    }

    /// Sets a bucket's versioning (`Unversioned` is refused: S3 only suspends).
    pub async fn set_versioning(&self, bucket: &str, state: Versioning) -> Result<()> {
        if state == Versioning::Unversioned {
            return Err(Error::InvalidArgument("versioning can be enabled or suspended, not removed".into()));
        }
        self.update_bucket(bucket, |record| {
            if record.deleting {
                return Err(Error::NoSuchBucket(bucket.to_string()));
            }
            record.versioning = state;
            Ok(())
        })
        .await
    }

    /// Changes a bucket's record with `change`, retried while other writers change it too.
    async fn update_bucket(&self, bucket: &str, mut change: impl FnMut(&mut BucketRecord) -> Result<()>) -> Result<()> {
        let k = key(P_BUCKET, bucket.as_bytes());
        for _ in 0..16 {
            let (mut record, version) = self.bucket_record(bucket).await?;
            change(&mut record)?;
            let txn = IndexTxn { checks: vec![(k.clone(), version)], puts: vec![(k.clone(), Some(enc(&record)?))], adds: Vec::new() };
            if let IndexOutcome::Committed { .. } = self.client.index_txn(txn).await.map_err(storage)? {
                return Ok(());
            }
        }
        Err(Error::Unavailable("the bucket kept changing; retry".into()))
    }

    /// Sets a bucket's limits (writes that would pass them fail with `QuotaExceeded`).
    pub async fn set_quota(&self, bucket: &str, quota: Quota) -> Result<()> {
        self.update_bucket(bucket, |record| {
            record.quota = quota;
            Ok(())
        })
        .await
    }

    /// Every bucket of every account (for administrators).
    pub async fn all_buckets(&self) -> Result<Vec<BucketRecord>> {
        self.list_all(P_BUCKET).await?.iter().map(|(k, v)| BucketRecord::decode(k, v)).collect()
    }

    pub async fn quota(&self, bucket: &str) -> Result<Quota> {
        Ok(self.bucket_record(bucket).await?.0.quota)
    }

    /// What the bucket holds now.
    pub async fn usage(&self, bucket: &str) -> Result<Usage> {
        let base = key(P_USAGE, bucket.as_bytes());
        let (entries, _) = self.client.index_list(&base, &base, 4).await.map_err(storage)?;
        let (bk, nk) = usage_keys(bucket);
        let mut usage = Usage::default();
        for e in entries {
            let v = e.value.as_slice().try_into().map(i64::from_be_bytes).unwrap_or(0);
            if e.key == bk {
                usage.bytes = v;
            } else if e.key == nk {
                usage.objects = v;
            }
        }
        Ok(usage)
    }

    /// Refuses a write of `bytes` more (and one more version) past the bucket's quota. The
    /// check is not atomic with the commit: writers racing at the limit may pass it together.
    async fn check_quota(&self, bucket: &str, quota: Quota, bytes: u64) -> Result<()> {
        if quota.max_bytes.is_none() && quota.max_objects.is_none() {
            return Ok(());
        }
        let usage = self.usage(bucket).await?;
        let over_bytes = quota.max_bytes.is_some_and(|max| usage.bytes.max(0) as u64 + bytes > max);
        let over_objects = quota.max_objects.is_some_and(|max| usage.objects.max(0) as u64 + 1 > max);
        if over_bytes || over_objects {
            return Err(Error::QuotaExceeded);
        }
        Ok(())
    }

    pub async fn versioning(&self, bucket: &str) -> Result<Versioning> {
        Ok(self.bucket_record(bucket).await?.0.versioning)
    }

    /// One version of an object (`null` for the null version).
    async fn version(&self, bucket: &str, name: &str, version_id: &str) -> Result<ObjectRecord> {
        let seq = if version_id == NULL_VERSION {
            match self.key_record(bucket, name).await?.and_then(|(k, _)| k.null_seq) {
                Some(seq) => seq,
                None => {
                    self.bucket_record(bucket).await?;
                    return Err(Error::NoSuchVersion);
                }
            }
        } else {
            parse_version_id(version_id)?
        };
        let vk = version_key(bucket, name, seq);
        match self.client.index_get(&vk).await.map_err(storage)? {
            Some(e) => ObjectRecord::decode(&vk, &e.value),
            None => {
                self.bucket_record(bucket).await?;
                Err(Error::NoSuchVersion)
            }
        }
    }

    /// HEAD of a given version; a delete marker is `MethodNotAllowed` as in S3.
    pub async fn head_version(&self, bucket: &str, name: &str, version_id: &str) -> Result<ObjectInfo> {
        let v = self.version(bucket, name, version_id).await?;
        if v.delete_marker {
            return Err(Error::MethodNotAllowed);
        }
        Ok(v.info)
    }

    pub async fn get_version(&self, bucket: &str, name: &str, version_id: &str, range: Option<(u64, u64)>) -> Result<(ObjectInfo, ByteStream)> {
        let v = self.version(bucket, name, version_id).await?;
        if v.delete_marker {
            return Err(Error::MethodNotAllowed);
        }
        self.stream(v, range).await
    }

    /// DeleteObject without a version: removes the object of an unversioned bucket, or
    /// puts a delete marker on top of a versioned key.
    pub async fn delete_current(&self, bucket: &str, name: &str) -> Result<Deleted> {
        let (brecord, _) = self.bucket_record(bucket).await?;
        if brecord.versioning == Versioning::Unversioned {
            let ok = object_key(bucket, name);
            for _ in 0..16 {
                let Some((old, version)) = self.key_record(bucket, name).await? else {
                    return Ok(Deleted::default());
                };
                let mut txn = IndexTxn {
                    checks: vec![(ok.clone(), version)],
                    puts: vec![(ok.clone(), None), (version_key(bucket, name, old.current.seq), None)],
                    adds: Vec::new(),
                };
                for e in &old.current.extents {
                    txn.puts.push(garbage_entry(e, self.cfg.garbage_grace.as_millis() as u64)?);
                }
                txn.adds = usage_adds(bucket, &[(&old.current, -1)]);
                if let IndexOutcome::Committed { .. } = self.client.index_txn(txn).await.map_err(storage)? {
                    return Ok(Deleted::default());
                }
            }
            return Err(Error::Unavailable("the object kept changing; retry".into()));
        }
        let info = ObjectInfo { key: name.to_string(), last_modified_ms: now_ms(), ..Default::default() };
        let mut marker = ObjectRecord::new(info, Vec::new());
        marker.delete_marker = true;
        let rec = self
            .commit_version(bucket, name, marker, None, (Vec::new(), Vec::new()), None)
            .await?
            .ok_or_else(|| Error::Internal("no extra checks, yet an extra conflict".into()))?;
        Ok(Deleted { version_id: Some(rec.version_id), delete_marker: true })
    }

    /// DeleteObject of one version: gone for good; the next newest becomes current.
    pub async fn delete_version(&self, bucket: &str, name: &str, version_id: &str) -> Result<Deleted> {
        let wanted = if version_id == NULL_VERSION { None } else { Some(parse_version_id(version_id)?) };
        let ok = object_key(bucket, name);
        for _ in 0..16 {
            let Some((old, version)) = self.key_record(bucket, name).await? else {
                self.bucket_record(bucket).await?;
                return Ok(Deleted { version_id: Some(version_id.to_string()), delete_marker: false });
            };
            let Some(seq) = wanted.or(old.null_seq) else {
                return Ok(Deleted { version_id: Some(version_id.to_string()), delete_marker: false });
            };
            let vk = version_key(bucket, name, seq);
            let Some(entry) = self.client.index_get(&vk).await.map_err(storage)? else {
                return Ok(Deleted { version_id: Some(version_id.to_string()), delete_marker: false });
            };
            let target = ObjectRecord::decode(&vk, &entry.value)?;
            let null_seq = old.null_seq.filter(|&ns| ns != seq);
            let mut txn = IndexTxn { checks: vec![(ok.clone(), version)], puts: vec![(vk.clone(), None)], adds: Vec::new() };
            for e in &target.extents {
                txn.puts.push(garbage_entry(e, self.cfg.garbage_grace.as_millis() as u64)?);
            }
            txn.adds = usage_adds(bucket, &[(&target, -1)]);
            let current = if seq == old.current.seq {
                let prefix = version_prefix(bucket, name);
                let mut after = vk.clone();
                after.push(0);
                let (next, _) = self.client.index_list(&prefix, &after, 1).await.map_err(storage)?;
                match next.first() {
                    Some(e) => Some(ObjectRecord::decode(&e.key, &e.value)?),
                    None => None,
                }
            } else {
                Some(old.current.clone())
            };
            match current {
                Some(current) => txn.puts.push((ok.clone(), Some(KeyRecord { current, null_seq }.encode()?))),
                None => txn.puts.push((ok.clone(), None)),
            }
            if let IndexOutcome::Committed { .. } = self.client.index_txn(txn).await.map_err(storage)? {
                return Ok(Deleted { version_id: Some(target.version_id), delete_marker: target.delete_marker });
            }
        }
        Err(Error::Unavailable("the object kept changing; retry".into()))
    }

    /// Replaces the tags of the current version (`version_id` None) or of one version, in
    /// place (see [`Backend::set_tags`]). The key's entry is rewritten in the same
    /// transaction, checked against its entry version, so the change cannot cross a new
    /// version or a delete unseen.
    pub async fn set_tags(
        &self,
        bucket: &str,
        name: &str,
        version_id: Option<&str>,
        tags: Vec<(String, String)>,
    ) -> Result<Option<String>> {
        // None: the current version; Some(None): the null version; Some(Some(seq)): that one.
        let wanted = match version_id {
            None => None,
            Some(NULL_VERSION) => Some(None),
            Some(v) => Some(Some(parse_version_id(v)?)),
        };
        let missing = || if version_id.is_some() { Error::NoSuchVersion } else { Error::NoSuchKey };
        let ok = object_key(bucket, name);
        for _ in 0..16 {
            let Some((mut keyrec, version)) = self.key_record(bucket, name).await? else {
                self.bucket_record(bucket).await?;
                return Err(missing());
            };
            let seq = match wanted {
                None => keyrec.current.seq,
                Some(None) => keyrec.null_seq.ok_or_else(missing)?,
                Some(Some(seq)) => seq,
            };
            let vk = version_key(bucket, name, seq);
            let mut target = if seq == keyrec.current.seq {
                keyrec.current.clone()
            } else {
                match self.client.index_get(&vk).await.map_err(storage)? {
                    Some(e) => ObjectRecord::decode(&vk, &e.value)?,
                    None => return Err(missing()),
                }
            };
            if target.delete_marker {
                return Err(if version_id.is_some() { Error::MethodNotAllowed } else { Error::NoSuchKey });
            }
            target.info.tags = tags.clone();
            if seq == keyrec.current.seq {
                keyrec.current = target.clone();
            }
            let txn = IndexTxn {
                checks: vec![(ok.clone(), version)],
                puts: vec![(vk, Some(target.encode()?)), (ok.clone(), Some(keyrec.encode()?))],
                adds: Vec::new(),
            };
            if let IndexOutcome::Committed { .. } = self.client.index_txn(txn).await.map_err(storage)? {
                return Ok(target.info.version_id);
            }
        }
        Err(Error::Unavailable("the object kept changing; retry".into()))
    }

    /// ListObjectVersions: every version and delete marker, by key then newest first.
    pub async fn list_versions(
        &self,
        bucket: &str,
        q: &ListQuery,
        key_marker: Option<&str>,
        version_marker: Option<&str>,
    ) -> Result<VersionPage> {
        self.bucket_record(bucket).await?;
        let base = version_base(bucket);
        let prefix = key(&base, q.prefix.as_bytes());
        let mut page = VersionPage::default();
        // The key whose versions started before this page (so its first one here is not the latest).
        let mut last_name: Option<String> = None;
        let mut start = match (key_marker, version_marker) {
            (Some(k), Some(v)) if !v.is_empty() => {
                let seq = if v == NULL_VERSION {
                    self.key_record(bucket, k).await?.and_then(|(r, _)| r.null_seq)
                } else {
                    Some(parse_version_id(v)?)
                };
                last_name = Some(k.to_string());
                match seq {
                    Some(seq) => {
                        let mut s = version_key(bucket, k, seq);
                        s.push(0);
                        s
                    }
                    None => after_prefix(&version_prefix(bucket, k)),
                }
            }
            (Some(k), _) => after_prefix(&version_prefix(bucket, k)),
            _ => prefix.clone(),
        };
        // A key marker that is a common prefix (or inside one): that prefix was listed already.
        if let (Some(d), Some(k)) = (q.delimiter.as_deref().filter(|d| !d.is_empty()), key_marker) {
            if let Some(rest) = k.strip_prefix(q.prefix.as_str()) {
                if let Some(pos) = rest.find(d) {
                    let cp = &k[..q.prefix.len() + pos + d.len()];
                    start = start.max(after_prefix(&key(&base, cp.as_bytes())));
                }
            }
        }
        if start < prefix {
            start = prefix;
        }
        let name_of = |e: &IndexEntry| {
            let name = parse_version_key(&base, &e.key);
            if name.is_none() {
                warn!(key = %e.key.escape_ascii(), "malformed version key");
            }
            Ok(name.map(|(name, _)| name))
        };
        page.truncated = self
            .walk(&base, q, start, name_of, |item| match item {
                Walked::Prefix(cp) => {
                    page.next = Some((cp.clone(), String::new()));
                    page.common_prefixes.push(cp);
                    Ok(true)
                }
                Walked::Entry(name, e) => {
                    let v = ObjectRecord::decode(&e.key, &e.value)?;
                    let is_latest = last_name.as_deref() != Some(name.as_str());
                    last_name = Some(name.clone());
                    page.next = Some((name.clone(), v.version_id.clone()));
                    let mut info = v.info;
                    info.key = name;
                    page.versions.push(VersionEntry { info, version_id: v.version_id, is_latest, delete_marker: v.delete_marker });
                    Ok(true)
                }
            })
            .await?;
        if !page.truncated {
            page.next = None;
        }
        Ok(page)
    }

    /// Walks the index entries under `base` + `q.prefix` from `start`, in key order, until
    /// `q.max_keys` items are taken, and says whether more follow. `name_of` gives an
    /// entry's object key (`None`: skip the entry). With a delimiter, the names sharing a
    /// common prefix are one item, skipped past at once. `take` gets each item in turn and
    /// says whether it counts toward `max_keys` (an entry it leaves out does not).
    async fn walk(
        &self,
        base: &[u8],
        q: &ListQuery,
        mut start: Vec<u8>,
        name_of: impl Fn(&IndexEntry) -> Result<Option<String>>,
        mut take: impl FnMut(Walked<'_>) -> Result<bool>,
    ) -> Result<bool> {
        if q.max_keys == 0 {
            return Ok(false);
        }
        let prefix = key(base, q.prefix.as_bytes());
        let delimiter = q.delimiter.as_deref().filter(|d| !d.is_empty());
        let mut count = 0usize;
        'outer: loop {
            let want = (q.max_keys - count + 1).min(LIST_PAGE as usize) as u32;
            let (entries, more) = self.client.index_list(&prefix, &start, want).await.map_err(storage)?;
            if entries.is_empty() {
                return Ok(false);
            }
            for e in &entries {
                let Some(name) = name_of(e)? else {
                    start = e.key.clone();
                    start.push(0);
                    continue;
                };
                if count == q.max_keys {
                    return Ok(true);
                }
                if let Some(d) = delimiter {
                    if let Some(pos) = name[q.prefix.len()..].find(d) {
                        let cp = name[..q.prefix.len() + pos + d.len()].to_string();
                        start = after_prefix(&key(base, cp.as_bytes()));
                        take(Walked::Prefix(cp))?;
                        count += 1;
                        continue 'outer;
                    }
                }
                start = e.key.clone();
                start.push(0);
                if take(Walked::Entry(name, e))? {
                    count += 1;
                }
            }
            if !more {
                return Ok(false);
            }
        }
    }

    /// The data of one version, or `range` of it.
    async fn stream(&self, object: ObjectRecord, range: Option<(u64, u64)>) -> Result<(ObjectInfo, ByteStream)> {
        let (start, end) = range.unwrap_or((0, object.info.size));
        if start > end || end > object.info.size {
            return Err(Error::InvalidRange);
        }
        let pieces = read_pieces(slice_extents(&object.extents, start, end));
        let mut volumes = HashMap::new();
        for p in &pieces {
            if let std::collections::hash_map::Entry::Vacant(v) = volumes.entry(p.volume) {
                v.insert(self.reader(p.volume).await?);
            }
        }
        let stream = futures::stream::iter(pieces)
            .map(move |p| {
                let vol = volumes.get(&p.volume).cloned();
                async move {
                    let vol = vol.ok_or_else(|| std::io::Error::other("data volume not open"))?;
                    vol.read(p.offset, p.len).await.map_err(|e| std::io::Error::other(e.to_string()))
                }
            })
            .buffered(READ_AHEAD);
        Ok((object.info, Box::pin(stream)))
    }

    /// The data volume of this node, created and opened (lease taken over from an earlier
    /// run of this gateway) on first use.
    async fn log(&self) -> Result<Arc<DataLog>> {
        self.log
            .get_or_try_init(|| async {
                let name = format!("s3data-{}", self.cfg.node_name);
                let info = match self.client.volume(&name).await {
                    Ok(info) => info,
                    Err(e) if e.remote_code() == Some(ErrorCode::NotFound) => {
                        match self.client.create_volume(&name, DATA_VOLUME_SIZE, None).await {
                            Ok(info) => info,
                            Err(e) if e.remote_code() == Some(ErrorCode::AlreadyExists) => {
                                self.client.volume(&name).await.map_err(storage)?
                            }
                            Err(e) => return Err(storage(e)),
                        }
                    }
                    Err(e) => return Err(storage(e)),
                };
                let opts = VolumeOptions {
                    holder: format!("s3gw@{}", self.cfg.node_name),
                    node: self.cfg.node,
                    force: true,
                    read_only: false,
                };
                let volume = self.client.open_volume_with(info, opts).await.map_err(storage)?;
                // A new incarnation first: from its commit on, no commit of an earlier run
                // (its data writes are fenced by the lease just taken) can succeed.
                let ik = key(P_INCARNATION, name.as_bytes());
                let nonce = rand::random::<u64>().to_be_bytes().to_vec();
                let incarnation = match self
                    .client
                    .index_txn(IndexTxn { checks: vec![], puts: vec![(ik, Some(nonce))], adds: Vec::new() })
                    .await
                    .map_err(storage)?
                {
                    IndexOutcome::Committed { version } => version,
                    IndexOutcome::Conflict { .. } => return Err(Error::Internal("unconditional write conflicted".into())),
                };
                let vk = key(P_VOLUME, name.as_bytes());
                let current = self.client.index_get(&vk).await.map_err(storage)?;
                let old = current.as_ref().map(|e| Reservation::decode(&e.value)).unwrap_or_default();
                let mine = Reservation { end: old.end, run_start: old.end };
                let txn = IndexTxn {
                    checks: vec![(vk.clone(), current.map_or(0, |e| e.version))],
                    puts: vec![(vk, Some(mine.encode()))],
                    adds: Vec::new(),
                };
                self.commit(txn).await?;
                let window = (old.run_start < old.end).then_some((old.run_start, old.end));
                info!(volume = %name, from = old.end, incarnation, unswept = ?window, "S3 data volume open");
                Ok(Arc::new(DataLog {
                    volume,
                    name,
                    cursor: tokio::sync::Mutex::new((old.end, old.end)),
                    start: old.end,
                    incarnation,
                    orphan_window: Mutex::new(window),
                }))
            })
            .await
            .cloned()
    }

    /// `len` bytes (4 KiB aligned) of fresh space in our data volume.
    async fn allocate(&self, log: &DataLog, len: u64) -> Result<u64> {
        let mut cursor = log.cursor.lock().await;
        let (next, reserved) = *cursor;
        if next + len > reserved {
            let new_end = (next + len).div_ceil(RESERVE_STEP) * RESERVE_STEP;
            if new_end > DATA_VOLUME_SIZE {
                return Err(Error::Internal(format!("data volume {} is full", log.name)));
            }
            let k = key(P_VOLUME, log.name.as_bytes());
            let current = self.client.index_get(&k).await.map_err(storage)?;
            let version = current.map_or(0, |e| e.version);
            let value = Reservation { end: new_end, run_start: log.start }.encode();
            let txn = IndexTxn { checks: vec![(k.clone(), version), log.incarnation_check()], puts: vec![(k, Some(value))], adds: Vec::new() };
            self.commit(txn).await?;
            cursor.1 = new_end;
        }
        cursor.0 = next + len;
        Ok(next)
    }

    async fn reader(&self, volume: VolumeId) -> Result<Arc<Volume>> {
        if let Some(log) = self.log.get() {
            if log.volume.id() == volume {
                return Ok(log.volume.clone());
            }
        }
        if let Some(v) = self.lock_readers().get(&volume) {
            return Ok(v.clone());
        }
        let vols = self.client.list_volumes().await.map_err(storage)?;
        let info = vols
            .into_iter()
            .find(|v| v.id == volume)
            .ok_or_else(|| Error::Internal(format!("data volume {volume} is gone")))?;
        let vol = self.client.open_volume_with(info, VolumeOptions::reader()).await.map_err(storage)?;
        Ok(self.lock_readers().entry(volume).or_insert(vol).clone())
    }

    fn lock_readers(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, Arc<Volume>>> {
        self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the body into fresh extents; returns them, the length and the MD5.
    async fn write_body(&self, mut body: ByteStream, opts: &PutOptions) -> Result<(Written, u64, [u8; 16])> {
        let mut md5 = Md5::new();
        let mut total = 0u64;
        let mut written = Written { client: self.client.clone(), extents: Vec::new(), kept: false };
        let mut buf = BytesMut::new();
        // Tasks, so the writes go on while the next piece is being received.
        let mut writes = tokio::task::JoinSet::new();
        let mut failed: Option<Error> = None;
        let log = self.log().await?;
        loop {
            let next = match body.next().await {
                Some(Ok(b)) => Some(b),
                Some(Err(e)) => {
                    failed = Some(Error::Body(e));
                    None
                }
                None => None,
            };
            let done = next.is_none();
            if let Some(b) = next {
                total += b.len() as u64;
                if opts.length.is_some_and(|want| total > want) {
                    failed = Some(Error::IncompleteBody);
                } else {
                    md5.update(&b);
                    buf.extend_from_slice(&b);
                }
            }
            if failed.is_some() {
                break;
            }
            while buf.len() as u64 >= PIECE || (done && !buf.is_empty()) {
                let n = (buf.len() as u64).min(PIECE) as usize;
                let piece = buf.split_to(n);
                let len = piece.len() as u64;
                let mut padded = piece;
                padded.resize(align_up(len) as usize, 0);
                let offset = match self.allocate(&log, align_up(len)).await {
                    Ok(o) => o,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                push_extent(&mut written.extents, Extent { volume: log.volume.id(), offset, len });
                let vol = log.volume.clone();
                let data = padded.freeze();
                let units = u32::try_from(align_up(len).div_ceil(WRITE_UNIT)).unwrap_or(u32::MAX);
                let permit = match Arc::clone(&self.write_budget).acquire_many_owned(units).await {
                    Ok(p) => p,
                    Err(_) => {
                        failed = Some(Error::Internal("the write budget is closed".into()));
                        break;
                    }
                };
                writes.spawn(
                    async move {
                        let r = vol.write(offset, data).await;
                        drop(permit);
                        r
                    }
                    .in_current_span(),
                );
                while writes.len() >= WRITES_IN_FLIGHT {
                    if let Some(r) = writes.join_next().await {
                        if let Err(e) = flatten(r) {
                            failed = Some(e);
                        }
                    }
                }
                if failed.is_some() {
                    break;
                }
            }
            if done || failed.is_some() {
                break;
            }
        }
        while let Some(r) = writes.join_next().await {
            if let Err(e) = flatten(r) {
                failed.get_or_insert(e);
            }
        }
        if failed.is_none() && opts.length.is_some_and(|want| total != want) {
            failed = Some(Error::IncompleteBody);
        }
        let digest: [u8; 16] = md5.finalize().into();
        if failed.is_none() && opts.content_md5.is_some_and(|want| want != digest) {
            failed = Some(Error::BadDigest);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((written, total, digest))
    }

    /// Trims what an earlier run of this gateway left unreferenced in `window` of the data
    /// volume; returns the bytes trimmed.
    async fn sweep(&self, log: &DataLog, window: (u64, u64)) -> Result<u64> {
        let vol = log.volume.id();
        let mut used: Vec<(u64, u64)> = Vec::new();
        let mut note = |e: &Extent| {
            if e.volume == vol && e.offset < window.1 && e.offset + e.len > window.0 {
                used.push((e.offset, e.offset + align_up(e.len)));
            }
        };
        for (k, v) in self.list_all(P_VERSION).await? {
            ObjectRecord::decode(&k, &v)?.extents.iter().for_each(&mut note);
        }
        for (k, v) in self.list_all(P_PART).await? {
            dec::<PartRecord>(&k, &v)?.extents.iter().for_each(&mut note);
        }
        let gprefix = key(P_GARBAGE, &vol.to_be_bytes());
        for (k, v) in self.list_all(&gprefix).await? {
            let g: Garbage = dec(&k, &v)?;
            if let Some(offset) = garbage_offset(&gprefix, &k) {
                note(&Extent { volume: vol, offset, len: g.len });
            }
        }
        used.sort_unstable();
        let mut at = window.0;
        let mut trimmed = 0;
        for (lo, hi) in used.into_iter().chain(std::iter::once((window.1, window.1))) {
            if lo > at {
                let end = lo.min(window.1);
                let mut pos = at;
                while pos < end {
                    let n = (end - pos).min(RESERVE_STEP);
                    log.volume.trim(pos, n).await.map_err(storage)?;
                    pos += n;
                }
                trimmed += end.saturating_sub(at);
            }
            at = at.max(hi);
        }
        Ok(trimmed)
    }

    /// Trims this gateway's garbage whose grace period is over; returns how many extents.
    /// The first call after a restart also sweeps what the previous run left behind.
    pub async fn collect_garbage(&self) -> Result<usize> {
        let log = self.log().await?;
        let window = *log.orphan_window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(window) = window {
            let bytes = self.sweep(&log, window).await?;
            info!(from = window.0, to = window.1, bytes, "swept the space an earlier gateway run left unreferenced");
            *log.orphan_window.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        let prefix = key(P_GARBAGE, &log.volume.id().to_be_bytes());
        let now = now_ms();
        let mut trimmed = 0;
        for (k, v) in self.list_all(&prefix).await? {
            let g: Garbage = dec(&k, &v)?;
            if g.after_ms > now {
                continue;
            }
            let Some(offset) = garbage_offset(&prefix, &k) else {
                warn!(key = %k.escape_ascii(), "malformed garbage key");
                continue;
            };
            log.volume.trim(offset, align_up(g.len)).await.map_err(storage)?;
            self.client.index_txn(IndexTxn { checks: vec![], puts: vec![(k, None)], adds: Vec::new() }).await.map_err(storage)?;
            trimmed += 1;
        }
        Ok(trimmed)
    }

    /// Runs [`collect_garbage`](Self::collect_garbage) every `every` until `shutdown`.
    pub async fn garbage_loop(self: Arc<Self>, every: Duration, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.collect_garbage().await {
                Ok(0) => {}
                Ok(n) => debug!(extents = n, "trimmed S3 garbage"),
                Err(e) => warn!(error = %e, "S3 garbage collection failed; will retry"),
            }
        }
    }
}

/// Data written for an object or a part that is not (yet) referenced by a committed
/// record. Dropped without [`Written::keep`] — the PUT failed, or its request was dropped
/// half-way — it queues its extents as garbage, so nothing stays allocated for nothing.
struct Written {
    client: Arc<StorageClient>,
    extents: Vec<Extent>,
    kept: bool,
}

impl Written {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if self.kept || self.extents.is_empty() {
            return;
        }
        let puts: Vec<_> = self.extents.iter().filter_map(|e| garbage_entry(e, 0).ok()).collect();
        let client = self.client.clone();
        let n = puts.len();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = client.index_txn(IndexTxn { checks: vec![], puts, adds: Vec::new() }).await {
                        warn!(error = %e, extents = n, "could not queue unused data for trimming; the next restart sweeps it");
                    }
                });
            }
            Err(_) => warn!(extents = n, "no runtime to queue unused data for trimming; the next restart sweeps it"),
        }
    }
}

fn flatten(r: std::result::Result<basalt_storaged_client::Result<()>, tokio::task::JoinError>) -> Result<()> {
    match r {
        Ok(r) => r.map_err(storage),
        Err(e) => Err(Error::Internal(format!("write task failed: {e}"))),
    }
}

/// Object keys: 1 to 1024 bytes of UTF-8 without NUL (the index separates a key from its
/// version and upload ids with a NUL byte).
fn validate_key(name: &str) -> Result<()> {
    if name.len() > MAX_KEY {
        return Err(Error::KeyTooLong);
    }
    if name.is_empty() || name.contains('\0') {
        return Err(Error::InvalidArgument("object keys are 1 to 1024 bytes without NUL characters".into()));
    }
    Ok(())
}

/// Another run of this gateway took the data volume over: this one must stop writing.
fn superseded() -> Error {
    Error::Unavailable("this gateway was restarted elsewhere; retry".into())
}

/// One item of a listing walk: a common prefix, or an entry with its object key.
enum Walked<'a> {
    Prefix(String),
    Entry(String, &'a IndexEntry),
}

/// A stable hash of a bucket name (FNV-1a), to spread buckets over gateways.
fn bucket_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn new_access_key(account: &str) -> AccessKey {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let id: String = "BK".chars().chain((0..18).map(|_| ALNUM[rand::random_range(0..ALNUM.len())] as char)).collect();
    const SECRET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let secret: String = (0..40).map(|_| SECRET[rand::random_range(0..SECRET.len())] as char).collect();
    AccessKey { id, account: account.to_string(), secret, enabled: true, created_ms: now_ms() }
}

fn push_extent(extents: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = extents.last_mut() {
        // Only a piece that filled its 4 KiB slots exactly can be continued by the next.
        if last.volume == e.volume && last.len % ALIGN == 0 && last.offset + last.len == e.offset {
            last.len += e.len;
            return;
        }
    }
    extents.push(e);
}

fn garbage_entry(e: &Extent, grace_ms: u64) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    Ok((garbage_key(e), Some(enc(&Garbage { len: e.len, after_ms: now_ms() + grace_ms })?)))
}

/// The part of `extents` covering bytes `[start, end)` of the object, in order.
fn slice_extents(extents: &[Extent], start: u64, end: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    for e in extents {
        let (lo, hi) = (pos, pos + e.len);
        pos = hi;
        if hi <= start || lo >= end {
            continue;
        }
        let from = start.max(lo) - lo;
        let to = end.min(hi) - lo;
        out.push(Extent { volume: e.volume, offset: e.offset + from, len: to - from });
    }
    out
}

/// `ext` cut into reads of at most [`PIECE`] bytes.
fn read_pieces(extents: Vec<Extent>) -> Vec<Extent> {
    let mut out = Vec::new();
    for e in extents {
        let mut done = 0;
        while done < e.len {
            let n = (e.len - done).min(PIECE);
            out.push(Extent { volume: e.volume, offset: e.offset + done, len: n });
            done += n;
        }
    }
    out
}

/// The first key after every key starting with `prefix` (keys are UTF-8: never 0xff).
fn after_prefix(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.push(0xff);
    k
}

#[async_trait]
impl Backend for ObjectStore {
    async fn access_key(&self, access_key: &str) -> Result<Option<(Account, String)>> {
        if let Some((at, found)) = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(access_key) {
            if at.elapsed() < KEY_CACHE {
                return Ok(found.clone());
            }
        }
        let k = key(P_KEY, access_key.as_bytes());
        let found = match self.client.index_get(&k).await.map_err(storage)? {
            None => None,
            Some(e) => {
                let ak: AccessKey = dec(&k, &e.value)?;
                let ak_account = key(P_ACCOUNT, ak.account.as_bytes());
                match self.client.index_get(&ak_account).await.map_err(storage)? {
                    Some(a) if ak.enabled => Some((dec::<Account>(&ak_account, &a.value)?, ak.secret)),
                    _ => None,
                }
            }
        };
        let mut keys = self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if keys.len() > 10_000 {
            keys.clear();
        }
        keys.insert(access_key.to_string(), (Instant::now(), found.clone()));
        Ok(found)
    }

    async fn create_bucket(&self, owner: &Account, name: &str, region: &str) -> Result<Bucket> {
        let k = key(P_BUCKET, name.as_bytes());
        let bucket = Bucket {
            name: name.to_string(),
            owner: owner.id.clone(),
            created_ms: now_ms(),
            region: region.to_string(),
            policy: None,
        };
        let record = BucketRecord {
            bucket: bucket.clone(),
            deleting: false,
            versioning: Versioning::Unversioned,
            quota: Quota::default(),
            lifecycle: Vec::new(),
            policy: None,
        };
        let txn = IndexTxn { checks: vec![(k.clone(), 0)], puts: vec![(k, Some(enc(&record)?))], adds: Vec::new() };
        match self.client.index_txn(txn).await.map_err(storage)? {
            IndexOutcome::Committed { .. } => Ok(bucket),
            IndexOutcome::Conflict { .. } => {
                let (existing, _) = self.bucket_record(name).await?;
                if existing.bucket.owner == owner.id {
                    Err(Error::BucketAlreadyOwnedByYou(name.to_string()))
                } else {
                    Err(Error::BucketAlreadyExists(name.to_string()))
                }
            }
        }
    }

    async fn bucket(&self, name: &str) -> Result<Bucket> {
        let (record, _) = self.bucket_record(name).await?;
        Ok(record.to_bucket())
    }

    async fn set_policy(&self, bucket: &str, policy: Option<String>) -> Result<()> {
        self.update_bucket(bucket, |record| {
            if record.deleting {
                return Err(Error::NoSuchBucket(bucket.to_string()));
            }
            record.policy = policy.clone();
            Ok(())
        })
        .await
    }

    async fn delete_bucket(&self, name: &str) -> Result<()> {
        let k = key(P_BUCKET, name.as_bytes());
        let (mut record, version) = self.bucket_record(name).await?;
        // Mark it first: a PUT committing from now on sees another bucket version and
        // fails, so the emptiness seen below stays true until the delete.
        record.deleting = true;
        let marked = match self
            .client
            .index_txn(IndexTxn { checks: vec![(k.clone(), version)], puts: vec![(k.clone(), Some(enc(&record)?))], adds: Vec::new() })
            .await
            .map_err(storage)?
        {
            IndexOutcome::Committed { version } => version,
            IndexOutcome::Conflict { version: 0, .. } => return Err(Error::NoSuchBucket(name.to_string())),
            IndexOutcome::Conflict { .. } => return Err(Error::Unavailable("the bucket changed meanwhile; retry".into())),
        };
        // Empty means no version at all, delete markers included.
        let prefix = version_base(name);
        let (objects, _) = self.client.index_list(&prefix, &prefix, 1).await.map_err(storage)?;
        if !objects.is_empty() {
            record.deleting = false;
            let undo = IndexTxn { checks: vec![(k.clone(), marked)], puts: vec![(k, Some(enc(&record)?))], adds: Vec::new() };
            if let Err(e) = self.commit(undo).await {
                warn!(bucket = name, error = %e, "could not clear the deleting mark of a non-empty bucket");
            }
            return Err(Error::BucketNotEmpty(name.to_string()));
        }
        let (ub, un) = usage_keys(name);
        self.commit(IndexTxn { checks: vec![(k.clone(), marked)], puts: vec![(k, None), (ub, None), (un, None)], adds: Vec::new() })
            .await?;
        // Uploads still in progress go with the bucket (as in S3): their parts become garbage.
        let mut uploads = key(P_UPLOAD, name.as_bytes());
        uploads.push(b'/');
        for (uk, v) in self.list_all(&uploads).await? {
            let Ok(u) = UploadRecord::decode(&uk, &v) else { continue };
            if let Err(e) = self.abort_upload(name, &u.upload.key, &u.upload.id).await {
                warn!(bucket = name, upload = %u.upload.id, error = %e, "could not abort an upload of a deleted bucket");
            }
        }
        Ok(())
    }

    async fn list_buckets(&self, owner: &Account) -> Result<Vec<Bucket>> {
        let mut out = Vec::new();
        for (k, v) in self.list_all(P_BUCKET).await? {
            let r = BucketRecord::decode(&k, &v)?;
            if r.bucket.owner == owner.id && !r.deleting {
                out.push(r.to_bucket());
            }
        }
        Ok(out)
    }

    async fn put_object(&self, bucket: &str, name: &str, opts: PutOptions, body: ByteStream) -> Result<ObjectInfo> {
        validate_key(name)?;
        let (record, bversion) = self.bucket_record(bucket).await?;
        if record.deleting {
            return Err(Error::NoSuchBucket(bucket.to_string()));
        }
        let quota = record.quota;
        self.check_quota(bucket, quota, opts.length.unwrap_or(0)).await?;
        let log = self.log().await?;
        let (written, size, md5) = self.write_body(body, &opts).await?;
        if opts.length.is_none() {
            self.check_quota(bucket, quota, size).await?;
        }
        let info = opts.into_info(name, size, &md5);
        let rec = ObjectRecord::new(info, written.extents.clone());
        let committed = self
            .commit_version(bucket, name, rec, Some(log.incarnation_check()), (Vec::new(), Vec::new()), Some((record, bversion)))
            .await?
            .ok_or_else(|| Error::Internal("no extra checks, yet an extra conflict".into()))?;
        written.keep();
        Ok(committed.info)
    }

    async fn head_object(&self, bucket: &str, name: &str) -> Result<ObjectInfo> {
        match self.key_record(bucket, name).await? {
            Some((k, _)) if !k.current.delete_marker => Ok(k.current.info),
            _ => {
                self.bucket_record(bucket).await?;
                Err(Error::NoSuchKey)
            }
        }
    }

    async fn get_object(&self, bucket: &str, name: &str, range: Option<(u64, u64)>) -> Result<(ObjectInfo, ByteStream)> {
        match self.key_record(bucket, name).await? {
            Some((k, _)) if !k.current.delete_marker => self.stream(k.current, range).await,
            _ => {
                self.bucket_record(bucket).await?;
                Err(Error::NoSuchKey)
            }
        }
    }

    async fn delete_object(&self, bucket: &str, name: &str) -> Result<Deleted> {
        self.delete_current(bucket, name).await
    }

    async fn set_tags(
        &self,
        bucket: &str,
        name: &str,
        version_id: Option<&str>,
        tags: Vec<(String, String)>,
    ) -> Result<Option<String>> {
        ObjectStore::set_tags(self, bucket, name, version_id, tags).await
    }

    async fn list_objects(&self, bucket: &str, q: &ListQuery) -> Result<ListPage> {
        self.bucket_record(bucket).await?;
        let base = object_key(bucket, "");
        let prefix = key(&base, q.prefix.as_bytes());
        let mut start = match &q.start_after {
            Some(after) if after.as_bytes() >= q.prefix.as_bytes() => {
                let mut s = key(&base, after.as_bytes());
                s.push(0);
                s
            }
            _ => prefix.clone(),
        };
        // A start-after inside a common prefix: that prefix was returned already.
        if let (Some(d), Some(after)) = (&q.delimiter, &q.start_after) {
            if let Some(rest) = after.strip_prefix(q.prefix.as_str()) {
                if let Some(pos) = rest.find(d.as_str()).filter(|_| !d.is_empty()) {
                    let cp = &after[..q.prefix.len() + pos + d.len()];
                    start = after_prefix(&key(&base, cp.as_bytes()));
                }
            }
        }
        let mut page = ListPage::default();
        let name_of = |e: &IndexEntry| match std::str::from_utf8(&e.key[base.len()..]) {
            Ok(name) => Ok(Some(name.to_string())),
            Err(_) => Err(Error::Internal(format!("object key {} is not UTF-8", e.key.escape_ascii()))),
        };
        page.truncated = self
            .walk(&base, q, start, name_of, |item| match item {
                Walked::Prefix(cp) => {
                    page.next_after = Some(cp.clone());
                    page.common_prefixes.push(cp);
                    Ok(true)
                }
                Walked::Entry(name, e) => {
                    let object = KeyRecord::decode(&e.key, &e.value)?;
                    if object.current.delete_marker {
                        return Ok(false);
                    }
                    page.next_after = Some(name);
                    page.objects.push(object.current.info);
                    Ok(true)
                }
            })
            .await?;
        if !page.truncated {
            page.next_after = None;
        }
        Ok(page)
    }

    // The trait's multipart, versioning and lifecycle operations are the inherent methods
    // above (which the CLI and the cluster tests also call directly).

    async fn create_upload(&self, owner: &Account, bucket: &str, key: &str, opts: PutOptions) -> Result<Upload> {
        ObjectStore::create_upload(self, owner, bucket, key, opts).await
    }

    async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: u32,
        opts: PutOptions,
        body: ByteStream,
    ) -> Result<PartInfo> {
        ObjectStore::upload_part(self, bucket, key, upload_id, number, opts, body).await
    }

    async fn list_parts(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        after: u32,
        max: usize,
    ) -> Result<(Upload, Vec<PartInfo>, bool)> {
        ObjectStore::list_parts(self, bucket, key, upload_id, after, max).await
    }

    async fn list_uploads(&self, bucket: &str, q: &UploadQuery) -> Result<(Vec<Upload>, bool)> {
        let after = q.key_marker.as_deref().map(|k| (k, q.upload_id_marker.as_deref().unwrap_or("")));
        ObjectStore::list_uploads(self, bucket, &q.prefix, after, q.max_uploads).await
    }

    async fn complete_upload(&self, bucket: &str, key: &str, upload_id: &str, parts: &[CompletedPart]) -> Result<ObjectInfo> {
        ObjectStore::complete_upload(self, bucket, key, upload_id, parts).await
    }

    async fn abort_upload(&self, bucket: &str, key: &str, upload_id: &str) -> Result<()> {
        ObjectStore::abort_upload(self, bucket, key, upload_id).await
    }

    async fn set_versioning(&self, bucket: &str, state: Versioning) -> Result<()> {
        ObjectStore::set_versioning(self, bucket, state).await
    }

    async fn versioning(&self, bucket: &str) -> Result<Versioning> {
        ObjectStore::versioning(self, bucket).await
    }

    async fn head_version(&self, bucket: &str, key: &str, version_id: &str) -> Result<ObjectInfo> {
        ObjectStore::head_version(self, bucket, key, version_id).await
    }

    async fn get_version(
        &self,
        bucket: &str,
        key: &str,
        version_id: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(ObjectInfo, ByteStream)> {
        ObjectStore::get_version(self, bucket, key, version_id, range).await
    }

    async fn delete_version(&self, bucket: &str, key: &str, version_id: &str) -> Result<Deleted> {
        ObjectStore::delete_version(self, bucket, key, version_id).await
    }

    async fn list_versions(
        &self,
        bucket: &str,
        q: &ListQuery,
        key_marker: Option<&str>,
        version_marker: Option<&str>,
    ) -> Result<VersionPage> {
        ObjectStore::list_versions(self, bucket, q, key_marker, version_marker).await
    }

    async fn set_lifecycle(&self, bucket: &str, rules: Vec<LifecycleRule>) -> Result<()> {
        ObjectStore::set_lifecycle(self, bucket, rules).await
    }

    async fn lifecycle(&self, bucket: &str) -> Result<Vec<LifecycleRule>> {
        ObjectStore::lifecycle(self, bucket).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_entries_written_before_policies_still_decode() {
        let bucket = Bucket { name: "b".into(), owner: "o".into(), created_ms: 7, region: "r".into(), policy: None };
        let rule = LifecycleRule { id: "r1".into(), enabled: true, expiration_days: Some(3), ..Default::default() };
        let old = BucketRecordV1 {
            bucket: bucket.clone(),
            deleting: false,
            versioning: Versioning::Suspended,
            quota: Quota { max_bytes: Some(10), max_objects: None },
            lifecycle: vec![rule.clone()],
        };
        let r = BucketRecord::decode(b"k", &enc(&old).expect("encodes")).expect("old layout decodes");
        assert_eq!((r.bucket, r.versioning, r.lifecycle, r.policy), (bucket.clone(), Versioning::Suspended, vec![rule], None));
        let new = BucketRecord {
            bucket,
            deleting: true,
            versioning: Versioning::Enabled,
            quota: Quota::default(),
            lifecycle: Vec::new(),
            policy: Some("{}".into()),
        };
        let r = BucketRecord::decode(b"k", &enc(&new).expect("encodes")).expect("new layout decodes");
        assert!(r.deleting);
        assert_eq!(r.to_bucket().policy.as_deref(), Some("{}"));
        assert!(BucketRecord::decode(b"k", b"\xff\xff").is_err());
    }

    #[test]
    fn object_and_upload_entries_of_the_first_layout_still_decode() {
        let info = ObjectInfoV1 {
            key: "k".into(),
            size: 5,
            etag: "e".into(),
            last_modified_ms: 9,
            content_type: Some("t".into()),
            user_meta: [("m".to_string(), "1".to_string())].into(),
            headers: Default::default(),
            checksums: Default::default(),
            version_id: Some("v".into()),
        };
        let extents = vec![Extent { volume: 1, offset: 4096, len: 5 }];
        let old = ObjectRecordV1 { info, extents: extents.clone(), write_id: 3, version_id: "v".into(), seq: 4, delete_marker: false };
        let r = ObjectRecord::decode(b"k", &enc(&old).expect("encodes")).expect("old object decodes");
        assert_eq!((r.info.key.as_str(), r.info.size, r.info.user_meta.len(), r.seq, r.write_id), ("k", 5, 1, 4, 3));
        assert_eq!(r.extents, extents);
        assert!(r.info.tags.is_empty() && r.info.part_sizes.is_empty());
        let key = KeyRecordV1 { current: old, null_seq: Some(4) };
        let k = KeyRecord::decode(b"k", &enc(&key).expect("encodes")).expect("old key decodes");
        assert_eq!((k.current.info.etag.as_str(), k.null_seq), ("e", Some(4)));
        let upload = Upload { id: "ab".into(), key: "k".into(), initiated_ms: 1, initiator: "a".into() };
        let old = UploadRecordV1 { upload: upload.clone(), content_type: None, user_meta: Default::default(), headers: Default::default() };
        let u = UploadRecord::decode(b"k", &enc(&old).expect("encodes")).expect("old upload decodes");
        assert_eq!((u.upload, u.tags.len()), (upload, 0));

        // The current layout round-trips with what the first could not hold...
        let mut r = r;
        r.info.tags = vec![("z".into(), "1".into()), ("a".into(), String::new())];
        r.info.part_sizes = vec![5 << 20, 7];
        let bytes = r.encode().expect("encodes");
        assert_eq!(bytes[0], LAYOUT_MARK);
        let back = ObjectRecord::decode(b"k", &bytes).expect("decodes");
        assert_eq!((back.info.tags, back.info.part_sizes), (r.info.tags.clone(), r.info.part_sizes.clone()));
        let k = KeyRecord { current: r, null_seq: None };
        assert_eq!(KeyRecord::decode(b"k", &k.encode().expect("encodes")).expect("decodes").current.info.part_sizes.len(), 2);
        // ...and a layout from a newer gateway is an error, not a guess.
        let mut newer = bytes;
        newer[1] = ObjectRecord::LAYOUT + 1;
        assert!(ObjectRecord::decode(b"k", &newer).is_err());
    }

    #[test]
    fn extents_slice_by_object_range() {
        let ext = vec![
            Extent { volume: 1, offset: 0, len: 10 },
            Extent { volume: 1, offset: 4096, len: 5 },
            Extent { volume: 2, offset: 8192, len: 7 },
        ];
        assert_eq!(slice_extents(&ext, 0, 22), ext);
        assert_eq!(
            slice_extents(&ext, 8, 13),
            vec![Extent { volume: 1, offset: 8, len: 2 }, Extent { volume: 1, offset: 4096, len: 3 }]
        );
        assert_eq!(slice_extents(&ext, 15, 16), vec![Extent { volume: 2, offset: 8192, len: 1 }]);
        assert_eq!(slice_extents(&ext, 22, 22), vec![]);
    }

    #[test]
    fn pieces_are_bounded_and_extents_merge_only_when_contiguous_and_full() {
        let big = Extent { volume: 3, offset: 0, len: 2 * PIECE + 5 };
        let p = read_pieces(vec![big]);
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], Extent { volume: 3, offset: 2 * PIECE, len: 5 });
        let mut ext = vec![];
        push_extent(&mut ext, Extent { volume: 1, offset: 0, len: PIECE });
        push_extent(&mut ext, Extent { volume: 1, offset: PIECE, len: 100 });
        push_extent(&mut ext, Extent { volume: 1, offset: PIECE + 4096, len: 100 });
        assert_eq!(ext, vec![Extent { volume: 1, offset: 0, len: PIECE + 100 }, Extent { volume: 1, offset: PIECE + 4096, len: 100 }]);
    }

    #[test]
    fn keys_order_like_s3() {
        assert!(object_key("b", "a/b") < object_key("b", "a0"));
        assert!(after_prefix(&object_key("b", "a/")) > object_key("b", "a/\u{10ffff}"));
        assert!(after_prefix(&object_key("b", "a/")) < object_key("b", "a0"));
        // One bucket's keys never run into another's.
        assert!(!object_key("ab", "x").starts_with(&object_key("a", "")));
    }

    #[test]
    fn access_keys_look_like_aws_ones() {
        let k = new_access_key("acct");
        assert_eq!(k.id.len(), 20);
        assert_eq!(k.secret.len(), 40);
        assert!(k.id.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
