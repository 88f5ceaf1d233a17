//! The line between the S3 protocol layer (`crate::s3`, built on the `s3s` crate) and the
//! object store (`crate::store`, on Basalt volumes and the metadata index).
//!
//! The protocol layer parses requests, checks signatures and who may do what, and answers
//! in S3's XML; a [`Backend`] keeps accounts, buckets and objects. Everything here is plain
//! data, so the protocol layer can be tested against a memory backend and the store
//! without HTTP.

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use std::collections::BTreeMap;
use std::pin::Pin;

/// Object data as it streams in or out, in pieces of any size.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in the terms S3 answers with (the protocol layer maps each variant to
/// its S3 error code and HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the bucket {0:?} does not exist")]
    NoSuchBucket(String),
    #[error("the key does not exist")]
    NoSuchKey,
    #[error("the bucket name {0:?} is taken by another account")]
    BucketAlreadyExists(String),
    #[error("you already own the bucket {0:?}")]
    BucketAlreadyOwnedByYou(String),
    #[error("the bucket {0:?} is not empty")]
    BucketNotEmpty(String),
    #[error("invalid bucket name {0:?}: {1}")]
    InvalidBucketName(String, &'static str),
    #[error("the key is longer than 1024 bytes")]
    KeyTooLong,
    #[error("the Content-MD5 given does not match the data received")]
    BadDigest,
    #[error("the data received is shorter or longer than Content-Length")]
    IncompleteBody,
    #[error("the requested range is not satisfiable")]
    InvalidRange,
    #[error("the version does not exist")]
    NoSuchVersion,
    /// A GET or HEAD of a delete marker by its version id (S3 answers 405).
    #[error("the version is a delete marker")]
    MethodNotAllowed,
    #[error("the upload does not exist (aborted or completed)")]
    NoSuchUpload,
    #[error("part {0} was not uploaded, or its ETag does not match")]
    InvalidPart(u32),
    #[error("the parts are not in ascending order")]
    InvalidPartOrder,
    #[error("part {0} is smaller than 5 MiB and is not the last part")]
    EntityTooSmall(u32),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the bucket's quota would be exceeded")]
    QuotaExceeded,
    #[error("access denied")]
    AccessDenied,
    #[error("the request body failed: {0}")]
    Body(std::io::Error),
    /// The storage cluster cannot serve right now (no metadata leader, too few replicas):
    /// the client should retry (S3 `ServiceUnavailable`, HTTP 503).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The backend does not offer this operation (S3 `NotImplemented`, HTTP 501): see
    /// [`Backend`] for which backend implements what.
    #[error("not implemented by this backend: {0}")]
    NotImplemented(&'static str),
}

/// A tenant: owns buckets; its access keys sign requests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    /// Stable id (S3's canonical user id).
    pub id: String,
    /// Display name.
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bucket {
    pub name: String,
    /// Owning account id.
    pub owner: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The region (location constraint) it was created in.
    pub region: String,
    /// Its bucket policy (JSON, checked when it was put), if it has one. Kept by the
    /// backend beside the bucket's other settings, not in this encoding.
    #[serde(skip)]
    pub policy: Option<String>,
}

/// The stored description of an object (what HEAD returns).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Without quotes: hex MD5 of the data for a single PUT, `md5-of-md5s-N` for multipart.
    pub etag: String,
    /// Milliseconds since the Unix epoch.
    pub last_modified_ms: u64,
    pub content_type: Option<String>,
    /// `x-amz-meta-*` headers, names lowercased and without the prefix.
    pub user_meta: BTreeMap<String, String>,
    /// Standard headers stored with the object and returned on GET/HEAD, lowercased names:
    /// content-encoding, content-disposition, content-language, cache-control, expires.
    pub headers: BTreeMap<String, String>,
    /// Checksums the client asked for, by algorithm name (`CRC32`, `CRC32C`, `SHA256`,
    /// `SHA1`, `CRC64NVME`), base64 as S3 shows them.
    pub checksums: BTreeMap<String, String>,
    /// The version (`x-amz-version-id`): None in a bucket that never had versioning.
    pub version_id: Option<String>,
    /// The object's tags (at most [`MAX_TAGS`], distinct keys), in the order they were given.
    pub tags: Vec<(String, String)>,
    /// Sizes of the parts a multipart upload was completed from, in order (what a GET of
    /// `partNumber` N reads); empty for an object stored in one piece.
    pub part_sizes: Vec<u64>,
}

/// Tags one object may carry, and the longest tag key and value (in characters), as in S3.
pub const MAX_TAGS: usize = 10;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 256;

/// What a PUT stores besides the data.
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    pub content_type: Option<String>,
    pub user_meta: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    /// Content-MD5 as sent (16 bytes): the data must hash to it or nothing is stored.
    pub content_md5: Option<[u8; 16]>,
    /// The exact length announced (Content-Length or x-amz-decoded-content-length): a body
    /// that ends early or runs over stores nothing.
    pub length: Option<u64>,
    /// Checksums to store (already verified by the protocol layer).
    pub checksums: BTreeMap<String, String>,
    /// Tags to store (already checked by the protocol layer).
    pub tags: Vec<(String, String)>,
}

impl PutOptions {
    /// The description of `key` stored with these options: `size` bytes hashing to `md5`
    /// (its ETag), modified now, no version yet.
    pub fn into_info(self, key: &str, size: u64, md5: &[u8; 16]) -> ObjectInfo {
        ObjectInfo {
            key: key.to_owned(),
            size,
            etag: md5.iter().map(|b| format!("{b:02x}")).collect(),
            last_modified_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            content_type: self.content_type,
            user_meta: self.user_meta,
            headers: self.headers,
            checksums: self.checksums,
            version_id: None,
            tags: self.tags,
            part_sizes: Vec::new(),
        }
    }
}

/// A listing request within one bucket (ListObjects v1 and v2 both map to it).
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub prefix: String,
    pub delimiter: Option<String>,
    /// Only keys (and common prefixes) strictly after this one.
    pub start_after: Option<String>,
    /// Keys plus common prefixes returned at most (S3 caps it at 1000).
    pub max_keys: usize,
}

/// One page of a listing, in UTF-8 byte order of keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// When truncated: the last key or common prefix returned, to continue after.
    pub next_after: Option<String>,
}

/// Accounts, buckets, objects and multipart uploads; versions and lifecycle rules where the
/// backend keeps them. Byte ranges are half-open `[start, end)` and already clipped to the
/// object by the caller.
///
/// Which backend implements what:
///
/// | operations                                   | `ObjectStore` | `MemBackend` |
/// |----------------------------------------------|---------------|--------------|
/// | buckets, objects, listings                   | yes           | yes          |
/// | multipart uploads                            | yes           | yes          |
/// | versioning, versions, ListObjectVersions     | yes           | no: `NotImplemented` (buckets read as never versioned) |
/// | lifecycle rules                              | yes           | no: `NotImplemented` |
/// | quotas (`QuotaExceeded` on writes)           | yes           | no quotas    |
///
/// The versioning and lifecycle methods have default implementations that answer
/// [`Error::NotImplemented`], so a backend without them needs no code for them.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The account owning `access_key` and the key's secret, if the key exists and is enabled.
    async fn access_key(&self, access_key: &str) -> Result<Option<(Account, String)>>;

    async fn create_bucket(&self, owner: &Account, name: &str, region: &str) -> Result<Bucket>;
    async fn bucket(&self, name: &str) -> Result<Bucket>;
    /// Only when empty (`BucketNotEmpty` otherwise).
    async fn delete_bucket(&self, name: &str) -> Result<()>;
    /// The buckets `owner` owns, by name.
    async fn list_buckets(&self, owner: &Account) -> Result<Vec<Bucket>>;
    /// Replaces the bucket's policy (None removes it); the protocol layer has checked it.
    async fn set_policy(&self, bucket: &str, policy: Option<String>) -> Result<()>;

    /// Stores `body` under `key`, replacing any object there (or, in a versioned bucket,
    /// adding a version), once all of it is durable.
    async fn put_object(&self, bucket: &str, key: &str, opts: PutOptions, body: ByteStream) -> Result<ObjectInfo>;
    /// The current version (`NoSuchKey` if it is a delete marker).
    async fn head_object(&self, bucket: &str, key: &str) -> Result<ObjectInfo>;
    /// The object's description and its data (the whole object, or `range`).
    async fn get_object(&self, bucket: &str, key: &str, range: Option<(u64, u64)>) -> Result<(ObjectInfo, ByteStream)>;
    /// Removes the object, or in a versioned bucket puts a delete marker on it; removing a
    /// missing key is not an error (S3 answers 204 either way).
    async fn delete_object(&self, bucket: &str, key: &str) -> Result<Deleted>;
    async fn list_objects(&self, bucket: &str, query: &ListQuery) -> Result<ListPage>;
    /// Replaces the tags of the current version of `key` (`version_id` None) or of one
    /// version, and returns that version's id. Nothing else about the object changes (no
    /// new version, same modification time). A delete marker has no tags: `MethodNotAllowed`
    /// when named by version, `NoSuchKey` when current.
    async fn set_tags(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        tags: Vec<(String, String)>,
    ) -> Result<Option<String>>;

    // ---- multipart uploads ----

    /// Starts a multipart upload of `key`, stored with `opts` (its type, metadata and
    /// headers) on completion.
    async fn create_upload(&self, owner: &Account, bucket: &str, key: &str, opts: PutOptions) -> Result<Upload>;
    /// Stores part `number` (1 to [`MAX_PART_NUMBER`]) of an upload, replacing an earlier
    /// upload of that number; `opts` as for `put_object` (Content-MD5, length).
    async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: u32,
        opts: PutOptions,
        body: ByteStream,
    ) -> Result<PartInfo>;
    /// The upload and its parts numbered after `after`, at most `max`; and whether more follow.
    async fn list_parts(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        after: u32,
        max: usize,
    ) -> Result<(Upload, Vec<PartInfo>, bool)>;
    /// Uploads in progress, by key then by age; and whether more follow.
    async fn list_uploads(&self, bucket: &str, query: &UploadQuery) -> Result<(Vec<Upload>, bool)>;
    /// Makes the object from the listed parts (ascending numbers; every part but the last
    /// at least [`MIN_PART_SIZE`]); its ETag is the MD5 of the parts' MD5s, `-N`. Parts
    /// uploaded but not listed are dropped.
    async fn complete_upload(&self, bucket: &str, key: &str, upload_id: &str, parts: &[CompletedPart]) -> Result<ObjectInfo>;
    /// Drops an upload and its parts (`NoSuchUpload` if it is gone).
    async fn abort_upload(&self, bucket: &str, key: &str, upload_id: &str) -> Result<()>;

    // ---- versioning (ObjectStore only) ----

    async fn set_versioning(&self, bucket: &str, state: Versioning) -> Result<()> {
        let _ = (bucket, state);
        Err(Error::NotImplemented("bucket versioning"))
    }
    /// A backend without versioning has only never-versioned buckets.
    async fn versioning(&self, bucket: &str) -> Result<Versioning> {
        self.bucket(bucket).await.map(|_| Versioning::Unversioned)
    }
    /// One version (`null` names the null version); a delete marker is `MethodNotAllowed`.
    async fn head_version(&self, bucket: &str, key: &str, version_id: &str) -> Result<ObjectInfo> {
        let _ = (bucket, key, version_id);
        Err(Error::NotImplemented("object versions"))
    }
    async fn get_version(
        &self,
        bucket: &str,
        key: &str,
        version_id: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(ObjectInfo, ByteStream)> {
        let _ = (bucket, key, version_id, range);
        Err(Error::NotImplemented("object versions"))
    }
    /// Removes one version for good (the next newest becomes current); a missing version
    /// is not an error.
    async fn delete_version(&self, bucket: &str, key: &str, version_id: &str) -> Result<Deleted> {
        let _ = (bucket, key, version_id);
        Err(Error::NotImplemented("object versions"))
    }
    /// Every version and delete marker, by key then newest first, after the markers
    /// (a key marker alone: after every version of that key).
    async fn list_versions(
        &self,
        bucket: &str,
        query: &ListQuery,
        key_marker: Option<&str>,
        version_marker: Option<&str>,
    ) -> Result<VersionPage> {
        let _ = (bucket, query, key_marker, version_marker);
        Err(Error::NotImplemented("object versions"))
    }

    // ---- lifecycle (ObjectStore only) ----

    /// Replaces the bucket's lifecycle rules (none: no lifecycle).
    async fn set_lifecycle(&self, bucket: &str, rules: Vec<LifecycleRule>) -> Result<()> {
        let _ = (bucket, rules);
        Err(Error::NotImplemented("bucket lifecycle rules"))
    }
    async fn lifecycle(&self, bucket: &str) -> Result<Vec<LifecycleRule>> {
        let _ = bucket;
        Err(Error::NotImplemented("bucket lifecycle rules"))
    }
}

/// A ListMultipartUploads request within one bucket.
#[derive(Clone, Debug, Default)]
pub struct UploadQuery {
    pub prefix: String,
    /// Only uploads of keys after this one, or (with `upload_id_marker`) of this key with
    /// a later upload id.
    pub key_marker: Option<String>,
    pub upload_id_marker: Option<String>,
    pub max_uploads: usize,
}

/// A bucket's versioning state (S3: never back to `Unversioned` once enabled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Versioning {
    #[default]
    Unversioned,
    Enabled,
    Suspended,
}

/// One expiration rule of a bucket's lifecycle (S3's `LifecycleConfiguration`, the
/// expiration actions; storage-class transitions have no meaning here).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LifecycleRule {
    pub id: String,
    pub enabled: bool,
    /// Only keys starting with this.
    pub prefix: String,
    /// Current versions this many days old expire (a delete marker in a versioned bucket).
    pub expiration_days: Option<u32>,
    /// Versions are removed this many days after they stopped being current.
    pub noncurrent_days: Option<u32>,
    /// Multipart uploads started this many days ago are aborted.
    pub abort_multipart_days: Option<u32>,
    /// A delete marker with no version left behind it is removed.
    pub expired_delete_markers: bool,
}

/// A version as listed by ListObjectVersions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionEntry {
    pub info: ObjectInfo,
    pub version_id: String,
    pub is_latest: bool,
    pub delete_marker: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionPage {
    pub versions: Vec<VersionEntry>,
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// When truncated: where to go on (key marker, version id marker; the latter empty
    /// after a common prefix).
    pub next: Option<(String, String)>,
}

/// What a DeleteObject did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// The version removed, or the delete marker's version (None in unversioned buckets).
    pub version_id: Option<String>,
    /// A delete marker was created, or the version removed was one.
    pub delete_marker: bool,
}

/// A multipart upload in progress.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Upload {
    pub id: String,
    pub key: String,
    /// Milliseconds since the Unix epoch.
    pub initiated_ms: u64,
    /// Owning account id (who created it).
    pub initiator: String,
}

/// An uploaded part.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartInfo {
    pub number: u32,
    /// Hex MD5 of the part's data, without quotes.
    pub etag: String,
    pub size: u64,
    pub last_modified_ms: u64,
}

/// One entry of a CompleteMultipartUpload request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedPart {
    pub number: u32,
    /// As the client sent it; quotes are ignored.
    pub etag: String,
}

/// Multipart limits S3 clients rely on.
pub const MIN_PART_SIZE: u64 = 5 << 20;
pub const MAX_PART_NUMBER: u32 = 10_000;
