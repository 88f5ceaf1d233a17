//! The S3 protocol layer: [`Gateway`] answers S3 requests (routed, parsed and signature
//! checked by `s3s`) from a [`Backend`], and [`service`] assembles the `s3s` service with
//! our authentication, bucket-name rules and virtual-hosted-style domains.
//!
//! Object data is never held whole: request bodies stream into `Backend::put_object` (and
//! `upload_part`) through [`body::Upload`] (which verifies checksums at the end of the body,
//! failing the stream so that nothing is stored), and backend streams become response bodies.
//!
//! Multipart uploads are in [`multipart`], bucket versioning and ListObjectVersions in
//! [`versions`], lifecycle configurations in [`lifecycle`]; reads, copies and deletes of one
//! version (`versionId`) are here, beside their unversioned forms. Versioning and lifecycle
//! need a backend that keeps them (the object store does, `MemBackend` answers
//! `NotImplemented`; see [`Backend`]).
//!
//! Every operation names the S3 action it is (`s3:GetObject`…) and asks `permits`
//! whether the caller may do it: the bucket's owner may unless its bucket policy denies
//! it, anyone else (an unsigned request too) only if the policy allows it ([`policy`],
//! [`permissions`]). ACLs are off, as on S3 buckets with "bucket owner enforced"
//! ownership: requests that would grant through them get `AccessControlListNotSupported`.
//!
//! What is refused with `NotImplemented` rather than ignored:
//! conditional writes and deletes (`If-Match`, `If-None-Match` on PUT and on completion),
//! policy conditions, server side encryption, object lock, MFA delete,
//! website redirects, whole-object checksums of multipart uploads (`x-amz-checksum-type:
//! FULL_OBJECT`, checksums on completion; part checksums are verified) and
//! `x-amz-mp-object-size`; in lifecycle rules, transitions, expiration dates, tag and size
//! filters and `NewerNoncurrentVersions`. Storage classes other than STANDARD are refused
//! with `InvalidStorageClass`.

pub mod auth;
pub mod body;
pub mod conditions;
pub mod errors;
pub mod host;
pub mod lifecycle;
pub mod multipart;
pub mod names;
pub mod payload;
pub mod permissions;
pub mod policy;
pub mod tagging;
pub mod versions;

use crate::backend::{
    Account, Backend, Bucket, ByteStream, Deleted, ListPage, ListQuery, ObjectInfo, PutOptions, Versioning,
};
use auth::{Caller, KeyAuth};
use body::{Algorithm, Expected, Upload};
use conditions::{Conditions, Outcome};
use errors::{access_denied, invalid_argument, not_implemented, to_s3, with_status};
use http::{HeaderMap, HeaderValue, StatusCode};
use s3s::dto::{self, Timestamp, TimestampFormat};
use s3s::{S3ErrorCode, S3Request, S3Response, S3Result, S3};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

pub use names::{validate_bucket_name, validate_key};

/// S3's limit for a single PUT and for a CopyObject source.
pub const MAX_PUT_SIZE: u64 = 5 << 30;
/// S3's limit on user metadata (names and values of `x-amz-meta-*`, in bytes).
pub const MAX_USER_META: usize = 2 << 10;
/// Keys plus common prefixes in one listing page, at most.
pub const MAX_LIST_KEYS: usize = 1000;
/// Objects in one DeleteObjects request, at most.
pub const MAX_DELETE_OBJECTS: usize = 1000;

/// Implements the `s3s::S3` operations over a [`Backend`].
pub struct Gateway<B> {
    backend: Arc<B>,
    region: String,
}

/// The `s3s` service for `backend`: requests signed with its access keys, buckets named by
/// path or, under one of `domains`, by host; signed payloads of the bodies `s3s` reads whole
/// checked by [`payload::Service`].
pub fn service<B: Backend>(backend: Arc<B>, region: &str, domains: &[String]) -> payload::Service {
    let auth = KeyAuth::new(Arc::clone(&backend));
    let mut builder = s3s::service::S3ServiceBuilder::new(Gateway::new(backend, region));
    builder.set_auth(auth.clone());
    builder.set_access(auth);
    builder.set_validation(names::BucketNames);
    if !domains.is_empty() {
        builder.set_host(host::Domains::new(domains));
    }
    payload::Service::new(builder.build())
}

impl<B: Backend> Gateway<B> {
    pub fn new(backend: Arc<B>, region: &str) -> Self {
        Gateway { backend, region: region.to_owned() }
    }

    /// The bucket, if `caller` owns it (AccessDenied if someone else does, or if it is not
    /// owned by the `x-amz-expected-bucket-owner` the client named). For what only the
    /// owner may do whatever the bucket policy says: manage that policy.
    async fn owned_bucket(&self, caller: &Requester, name: &str, expected_owner: Option<&String>) -> S3Result<Bucket> {
        let bucket = self.backend.bucket(name).await.map_err(to_s3)?;
        if !is_owner(&bucket, caller) || expected_owner.is_some_and(|o| *o != bucket.owner) {
            return Err(access_denied());
        }
        Ok(bucket)
    }

    /// The bucket, if `caller` may do `action` (`s3:GetObject`…) on it (`key` None) or on
    /// its object `key` (AccessDenied otherwise, and when the bucket is not owned by the
    /// `x-amz-expected-bucket-owner` the client named). See [`permits`].
    async fn authorize(
        &self,
        caller: &Requester,
        name: &str,
        expected_owner: Option<&String>,
        action: &str,
        key: Option<&str>,
    ) -> S3Result<Bucket> {
        let bucket = self.backend.bucket(name).await.map_err(to_s3)?;
        if expected_owner.is_some_and(|o| *o != bucket.owner) || !permits(&bucket, caller, action, key) {
            return Err(access_denied());
        }
        Ok(bucket)
    }

    /// One version of an object (`version`), or its current one.
    async fn head_of(&self, bucket: &str, key: &str, version: Option<&str>) -> crate::backend::Result<ObjectInfo> {
        match version {
            Some(v) => self.backend.head_version(bucket, key, v).await,
            None => self.backend.head_object(bucket, key).await,
        }
    }

    async fn get_of(
        &self,
        bucket: &str,
        key: &str,
        version: Option<&str>,
        range: Option<(u64, u64)>,
    ) -> crate::backend::Result<(ObjectInfo, ByteStream)> {
        match version {
            Some(v) => self.backend.get_version(bucket, key, v, range).await,
            None => self.backend.get_object(bucket, key, range).await,
        }
    }

    /// The object's data (whole, or the part `part` selects) once `conds` hold.
    /// A partial read looks at the object first to find its span, and makes sure the data
    /// read belongs to the same object it looked at.
    async fn read(
        &self,
        bucket: &str,
        key: &str,
        version: Option<&str>,
        part: Option<Part<'_>>,
        conds: &Conditions<'_>,
    ) -> S3Result<(ObjectInfo, Option<std::ops::Range<u64>>, ByteStream)> {
        let Some(part) = part else {
            let (info, stream) = match self.get_of(bucket, key, version, None).await {
                Ok(found) => found,
                Err(e) => return Err(self.read_error(bucket, key, version, e).await),
            };
            check_conditions(conds, &info, false)?;
            return Ok((info, None, stream));
        };
        for _ in 0..3 {
            let head = match self.head_of(bucket, key, version).await {
                Ok(head) => head,
                Err(e) => return Err(self.read_error(bucket, key, version, e).await),
            };
            check_conditions(conds, &head, false)?;
            let span = part.span(&head)?;
            let (info, stream) = match self.get_of(bucket, key, version, span.as_ref().map(|s| (s.start, s.end))).await {
                Ok(found) => found,
                Err(e) => return Err(self.read_error(bucket, key, version, e).await),
            };
            if same_object(&info, &head) {
                return Ok((info, span, stream));
            }
        }
        Err(with_status(
            S3ErrorCode::SlowDown,
            StatusCode::SERVICE_UNAVAILABLE,
            "The object kept changing while it was read; please retry.",
        ))
    }

    /// S3's answer to a read that failed: a delete marker read by its version id is a 405,
    /// and a key whose newest version is a delete marker a 404, that say so in their
    /// headers (`x-amz-delete-marker`, `x-amz-version-id`).
    async fn read_error(&self, bucket: &str, key: &str, version: Option<&str>, e: crate::backend::Error) -> s3s::S3Error {
        use crate::backend::Error;
        match (&e, version) {
            (Error::MethodNotAllowed, Some(v)) => {
                let v = v.to_owned();
                with_marker_headers(to_s3(e), &v)
            }
            (Error::NoSuchKey, None) => {
                let versioned = matches!(self.backend.versioning(bucket).await, Ok(v) if v != Versioning::Unversioned);
                if !versioned {
                    return to_s3(e);
                }
                let q = ListQuery { prefix: key.to_owned(), delimiter: None, start_after: None, max_keys: 1 };
                match self.backend.list_versions(bucket, &q, None, None).await {
                    Ok(page) => match page.versions.first() {
                        Some(v) if v.info.key == key && v.is_latest && v.delete_marker => {
                            with_marker_headers(to_s3(e), &v.version_id)
                        }
                        _ => to_s3(e),
                    },
                    Err(_) => to_s3(e),
                }
            }
            _ => to_s3(e),
        }
    }

    async fn list(
        &self,
        caller: &Requester,
        bucket: &str,
        expected_owner: Option<&String>,
        query: ListQuery,
    ) -> S3Result<(Bucket, ListPage)> {
        let b = self.authorize(caller, bucket, expected_owner, "s3:ListBucket", None).await?;
        if query.max_keys == 0 {
            return Ok((b, ListPage::default()));
        }
        let page = self.backend.list_objects(bucket, &query).await.map_err(to_s3)?;
        Ok((b, page))
    }

    /// DeleteObject of one version, or of the key (a delete marker in a versioned bucket).
    async fn delete(&self, bucket: &str, key: &str, version: Option<&str>) -> crate::backend::Result<Deleted> {
        match version {
            Some(v) => self.backend.delete_version(bucket, key, v).await,
            None => self.backend.delete_object(bucket, key).await,
        }
    }
}

/// `err` with the headers that say a delete marker (`version`) answered.
fn with_marker_headers(mut err: s3s::S3Error, version: &str) -> s3s::S3Error {
    let mut headers = HeaderMap::new();
    headers.insert("x-amz-delete-marker", HeaderValue::from_static("true"));
    if let Ok(v) = HeaderValue::from_str(version) {
        headers.insert("x-amz-version-id", v);
    }
    err.set_headers(headers);
    err
}

fn same_object(a: &ObjectInfo, b: &ObjectInfo) -> bool {
    a.etag == b.etag && a.size == b.size && a.last_modified_ms == b.last_modified_ms && a.version_id == b.version_id
}

/// Who sent a request: the account whose key signed it, or nobody (an unsigned request).
pub type Requester = Option<Account>;

fn requester<T>(req: &S3Request<T>) -> Requester {
    req.extensions.get::<Caller>().and_then(|c| c.0.clone())
}

/// The account that signed the request, for what is never granted to anyone else: listing
/// one's buckets, creating one.
fn caller<T>(req: &S3Request<T>) -> S3Result<Account> {
    requester(req).ok_or_else(access_denied)
}

/// Stands for an unsigned request where an account must be recorded (the initiator of a
/// multipart upload in a bucket whose policy lets anyone write).
fn anonymous() -> Account {
    Account { id: "anonymous".into(), name: "anonymous".into() }
}

fn is_owner(bucket: &Bucket, caller: &Requester) -> bool {
    caller.as_ref().is_some_and(|c| c.id == bucket.owner)
}

/// Whether `caller` may do `action` on `bucket` (`key` None) or on its object `key`: the
/// bucket policy's explicit Deny refuses anyone, its Allow admits anyone it names, and
/// where it says nothing only the owner may act. Buckets have no ACLs (S3's "bucket owner
/// enforced"), so this is the whole rule.
fn permits(bucket: &Bucket, caller: &Requester, action: &str, key: Option<&str>) -> bool {
    let decision = match &bucket.policy {
        None => policy::Decision::Silent,
        Some(text) => match policy::Policy::parse(text, &bucket.name) {
            Ok(p) => p.decide(caller.as_ref().map(|c| c.id.as_str()), action, &policy::resource(&bucket.name, key)),
            Err(e) => {
                // It was checked when it was put; if it no longer parses, only the owner
                // acts, as if there were none (and it can be replaced or deleted).
                tracing::warn!(bucket = %bucket.name, error = %e, "stored bucket policy does not parse; ignored");
                policy::Decision::Silent
            }
        },
    };
    match decision {
        policy::Decision::Allow => true,
        policy::Decision::Deny => false,
        policy::Decision::Silent => is_owner(bucket, caller),
    }
}

/// The owner shown for objects of `bucket` (all its objects are its owner's): its name
/// only to the owner itself.
fn owner_of(bucket: &Bucket, caller: &Requester) -> dto::Owner {
    dto::Owner {
        id: Some(bucket.owner.clone()),
        display_name: caller.as_ref().filter(|c| c.id == bucket.owner).map(|c| c.name.clone()),
    }
}

fn timestamp(ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms))
}

fn http_date(t: &Timestamp) -> Option<String> {
    let mut buf = Vec::new();
    t.format(TimestampFormat::HttpDate, &mut buf).ok()?;
    String::from_utf8(buf).ok()
}

fn parse_http_date(s: &str) -> Option<Timestamp> {
    Timestamp::parse(TimestampFormat::HttpDate, s).ok()
}

fn etag(info: &ObjectInfo) -> dto::ETag {
    dto::ETag::Strong(info.etag.clone())
}

fn owner(account: &Account) -> dto::Owner {
    dto::Owner { id: Some(account.id.clone()), display_name: Some(account.name.clone()) }
}

/// The byte span `range` selects in an object of `size` bytes. An empty span (any range of
/// an empty object: `s3s` answers a suffix range of one with `0..0`) is unsatisfiable too,
/// as S3 answers it.
/// What a GET or HEAD reads of an object when not all of it.
#[derive(Clone, Copy, Debug)]
enum Part<'a> {
    /// A `Range` header.
    Range(&'a dto::Range),
    /// `partNumber`: one part of a multipart object (1 to 10,000; an object stored in one
    /// piece has one part, all of it).
    Number(u32),
}

impl<'a> Part<'a> {
    /// The request's selection: a Range or a part number, not both (as S3).
    fn of_request(range: Option<&'a dto::Range>, part_number: Option<i32>) -> S3Result<Option<Part<'a>>> {
        match (range, part_number) {
            (Some(_), Some(_)) => Err(with_status(
                S3ErrorCode::InvalidRequest,
                StatusCode::BAD_REQUEST,
                "Cannot specify both Range header and partNumber query parameter",
            )),
            (Some(r), None) => Ok(Some(Part::Range(r))),
            (None, Some(n)) => match u32::try_from(n) {
                Ok(n) if (1..=crate::backend::MAX_PART_NUMBER).contains(&n) => Ok(Some(Part::Number(n))),
                _ => Err(invalid_argument("Part number must be an integer between 1 and 10000, inclusive")),
            },
            (None, None) => Ok(None),
        }
    }

    /// The bytes selected of the object `info` describes; None for all of it.
    fn span(self, info: &ObjectInfo) -> S3Result<Option<std::ops::Range<u64>>> {
        match self {
            Part::Range(r) => satisfiable(r, info.size).map(Some),
            Part::Number(n) => {
                let invalid = || {
                    with_status(S3ErrorCode::InvalidPart, StatusCode::BAD_REQUEST, format!("The requested partnumber {n} is not satisfiable"))
                };
                if info.part_sizes.is_empty() {
                    return if n == 1 { Ok(None) } else { Err(invalid()) };
                }
                let i = (n - 1) as usize;
                let size = *info.part_sizes.get(i).ok_or_else(invalid)?;
                let start: u64 = info.part_sizes[..i].iter().sum();
                Ok(Some(start..start + size))
            }
        }
    }
}

/// `Content-Range` of a partial read (none for an empty span, which has no last byte).
fn content_range(span: &std::ops::Range<u64>, size: u64) -> Option<String> {
    (span.end > span.start).then(|| format!("bytes {}-{}/{}", span.start, span.end - 1, size))
}

/// `x-amz-mp-parts-count` of a `partNumber` read: the number of parts of a multipart object.
fn parts_count(info: &ObjectInfo, part: Option<Part<'_>>) -> Option<i32> {
    match part {
        Some(Part::Number(_)) if !info.part_sizes.is_empty() => Some(i32::try_from(info.part_sizes.len()).unwrap_or(i32::MAX)),
        _ => None,
    }
}

fn satisfiable(range: &dto::Range, size: u64) -> S3Result<std::ops::Range<u64>> {
    range.check(size).ok().filter(|span| span.start < span.end).ok_or_else(|| {
        let mut err = with_status(
            S3ErrorCode::InvalidRange,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "The requested range is not satisfiable",
        );
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
            headers.insert(http::header::CONTENT_RANGE, v);
        }
        err.set_headers(headers);
        err
    })
}

/// 304 (or, for a copy source, 412) and 412 as S3 answers them.
fn check_conditions(conds: &Conditions<'_>, info: &ObjectInfo, copy_source: bool) -> S3Result<()> {
    match conds.evaluate(info) {
        Outcome::Proceed => Ok(()),
        Outcome::NotModified if !copy_source => {
            let mut err = with_status(S3ErrorCode::NotModified, StatusCode::NOT_MODIFIED, "Not Modified");
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", info.etag)) {
                headers.insert(http::header::ETAG, v);
            }
            if let Some(v) = http_date(&timestamp(info.last_modified_ms)).and_then(|d| HeaderValue::from_str(&d).ok()) {
                headers.insert(http::header::LAST_MODIFIED, v);
            }
            err.set_headers(headers);
            Err(err)
        }
        Outcome::NotModified | Outcome::PreconditionFailed => Err(with_status(
            S3ErrorCode::PreconditionFailed,
            StatusCode::PRECONDITION_FAILED,
            "At least one of the pre-conditions you specified did not hold",
        )),
    }
}

/// The standard headers S3 keeps with an object, by lowercase name.
fn stored_headers(
    cache_control: Option<String>,
    content_disposition: Option<String>,
    content_encoding: Option<String>,
    content_language: Option<String>,
    expires: Option<&Timestamp>,
) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    let pairs = [
        ("cache-control", cache_control),
        ("content-disposition", content_disposition),
        ("content-encoding", content_encoding),
        ("content-language", content_language),
        ("expires", expires.and_then(http_date)),
    ];
    for (name, value) in pairs {
        if let Some(v) = value {
            headers.insert(name.to_owned(), v);
        }
    }
    headers
}

fn user_meta(metadata: Option<dto::Metadata>) -> S3Result<BTreeMap<String, String>> {
    let meta: BTreeMap<String, String> =
        metadata.unwrap_or_default().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
    let size: usize = meta.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_USER_META {
        return Err(with_status(
            S3ErrorCode::MetadataTooLarge,
            StatusCode::BAD_REQUEST,
            format!("Your metadata headers exceed the maximum allowed metadata size ({size} > {MAX_USER_META} bytes)."),
        ));
    }
    Ok(meta)
}

fn content_md5(value: Option<&str>) -> S3Result<Option<[u8; 16]>> {
    use base64::Engine;
    let Some(value) = value else { return Ok(None) };
    let invalid = || with_status(S3ErrorCode::InvalidDigest, StatusCode::BAD_REQUEST, "The Content-MD5 you specified is not valid.");
    let bytes = base64::engine::general_purpose::STANDARD.decode(value.trim()).map_err(|_| invalid())?;
    let md5: [u8; 16] = bytes.try_into().map_err(|_| invalid())?;
    Ok(Some(md5))
}

fn content_length(len: Option<i64>) -> S3Result<Option<u64>> {
    let Some(len) = len else { return Ok(None) };
    let len = u64::try_from(len).map_err(|_| invalid_argument("negative Content-Length"))?;
    if len > MAX_PUT_SIZE {
        return Err(with_status(
            S3ErrorCode::EntityTooLarge,
            StatusCode::BAD_REQUEST,
            "Your proposed upload exceeds the maximum allowed object size.",
        ));
    }
    Ok(Some(len))
}


fn unsupported_storage_class(class: Option<&dto::StorageClass>) -> S3Result<()> {
    match class.map(dto::StorageClass::as_str) {
        None | Some("STANDARD") => Ok(()),
        Some(other) => Err(with_status(
            S3ErrorCode::InvalidStorageClass,
            StatusCode::BAD_REQUEST,
            format!("The storage class {other} is not supported"),
        )),
    }
}

/// The checksums a PUT must compute: named by a header with its value, announced as a
/// trailer, or only named by `x-amz-sdk-checksum-algorithm`.
/// The checksums given in headers (not trailers), by algorithm name, as stored.
fn known_checksums(expected: &[(Algorithm, Expected)]) -> BTreeMap<String, String> {
    expected
        .iter()
        .filter_map(|(a, e)| match e {
            Expected::Header(v) => Some((a.name().to_owned(), v.clone())),
            _ => None,
        })
        .collect()
}

fn expected_checksums(
    headers: &HeaderMap,
    values: [(Algorithm, Option<String>); 5],
    sdk_algorithm: Option<&dto::ChecksumAlgorithm>,
) -> S3Result<Vec<(Algorithm, Expected)>> {
    let mut expected: Vec<(Algorithm, Expected)> =
        values.into_iter().filter_map(|(a, v)| Some((a, Expected::Header(v?)))).collect();
    for trailer in headers.get_all("x-amz-trailer") {
        let names = trailer.to_str().map_err(|_| invalid_argument("invalid x-amz-trailer"))?;
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let algorithm = Algorithm::from_header(name)
                .ok_or_else(|| invalid_argument(format!("unsupported trailer {name:?}")))?;
            if !expected.iter().any(|(a, _)| *a == algorithm) {
                expected.push((algorithm, Expected::Trailer));
            }
        }
    }
    // PutObject names it `x-amz-sdk-checksum-algorithm`; `s3s` only reads the
    // `x-amz-checksum-algorithm` of other operations.
    let sdk_header = headers.get("x-amz-sdk-checksum-algorithm").and_then(|v| v.to_str().ok());
    if let Some(name) = sdk_algorithm.map(dto::ChecksumAlgorithm::as_str).or(sdk_header) {
        let algorithm = Algorithm::from_name(name)
            .ok_or_else(|| invalid_argument(format!("unsupported checksum algorithm {name:?}")))?;
        if !expected.iter().any(|(a, _)| *a == algorithm) {
            expected.push((algorithm, Expected::Compute));
        }
    }
    if expected.len() > 1 {
        return Err(with_status(
            S3ErrorCode::InvalidRequest,
            StatusCode::BAD_REQUEST,
            "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
        ));
    }
    Ok(expected)
}

/// Checksums of `info` as the response fields S3 uses.
struct Sums {
    crc32: Option<String>,
    crc32c: Option<String>,
    crc64nvme: Option<String>,
    sha1: Option<String>,
    sha256: Option<String>,
    kind: Option<dto::ChecksumType>,
}

fn sums(checksums: &BTreeMap<String, String>) -> Sums {
    let get = |a: Algorithm| checksums.get(a.name()).cloned();
    Sums {
        crc32: get(Algorithm::Crc32),
        crc32c: get(Algorithm::Crc32c),
        crc64nvme: get(Algorithm::Crc64Nvme),
        sha1: get(Algorithm::Sha1),
        sha256: get(Algorithm::Sha256),
        kind: (!checksums.is_empty()).then(|| dto::ChecksumType::from_static(dto::ChecksumType::FULL_OBJECT)),
    }
}

/// Fills the description fields shared by GetObjectOutput and HeadObjectOutput.
macro_rules! describe {
    ($out:expr, $info:expr, $checksums:expr) => {{
        let info: &ObjectInfo = $info;
        $out.e_tag = Some(etag(info));
        $out.last_modified = Some(timestamp(info.last_modified_ms));
        // What S3 answers for objects stored without a type.
        $out.content_type = Some(info.content_type.clone().unwrap_or_else(|| "binary/octet-stream".to_owned()));
        $out.metadata = (!info.user_meta.is_empty())
            .then(|| info.user_meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        $out.cache_control = info.headers.get("cache-control").cloned();
        $out.content_disposition = info.headers.get("content-disposition").cloned();
        $out.content_encoding = info.headers.get("content-encoding").cloned();
        $out.content_language = info.headers.get("content-language").cloned();
        $out.expires = info.headers.get("expires").and_then(|s| parse_http_date(s));
        $out.version_id = info.version_id.clone();
        $out.accept_ranges = Some("bytes".to_owned());
        if $checksums {
            let s = sums(&info.checksums);
            $out.checksum_crc32 = s.crc32;
            $out.checksum_crc32c = s.crc32c;
            $out.checksum_crc64nvme = s.crc64nvme;
            $out.checksum_sha1 = s.sha1;
            $out.checksum_sha256 = s.sha256;
            $out.checksum_type = s.kind;
        }
    }};
}

/// Applies the `response-*` query overrides of GET and HEAD.
macro_rules! overrides {
    ($out:expr, $input:expr) => {{
        if let Some(v) = $input.response_cache_control {
            $out.cache_control = Some(v);
        }
        if let Some(v) = $input.response_content_disposition {
            $out.content_disposition = Some(v);
        }
        if let Some(v) = $input.response_content_encoding {
            $out.content_encoding = Some(v);
        }
        if let Some(v) = $input.response_content_language {
            $out.content_language = Some(v);
        }
        if let Some(v) = $input.response_content_type {
            $out.content_type = Some(v);
        }
        if let Some(v) = $input.response_expires {
            $out.expires = Some(v);
        }
    }};
}

fn checksum_mode_enabled(mode: Option<&dto::ChecksumMode>) -> bool {
    mode.is_some_and(|m| m.as_str().eq_ignore_ascii_case(dto::ChecksumMode::ENABLED))
}

/// `encoding-type=url`: keys and prefixes percent-encoded in listings.
fn url_encoding(encoding: Option<&dto::EncodingType>) -> S3Result<bool> {
    match encoding.map(dto::EncodingType::as_str) {
        None => Ok(false),
        Some(e) if e.eq_ignore_ascii_case(dto::EncodingType::URL) => Ok(true),
        Some(_) => Err(invalid_argument("Invalid Encoding Method specified in Request")),
    }
}

const KEY_ESCAPES: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');

fn encode(url: bool, s: String) -> String {
    if url {
        percent_encoding::utf8_percent_encode(&s, KEY_ESCAPES).to_string()
    } else {
        s
    }
}

fn max_keys(requested: Option<i32>) -> S3Result<usize> {
    match requested {
        None => Ok(MAX_LIST_KEYS),
        Some(n) => usize::try_from(n)
            .map(|n| n.min(MAX_LIST_KEYS))
            .map_err(|_| invalid_argument("max-keys must be a non-negative number")),
    }
}

fn listed_object(info: ObjectInfo, owner: Option<&dto::Owner>, url: bool) -> dto::Object {
    let checksum_algorithm = (!info.checksums.is_empty())
        .then(|| info.checksums.keys().map(|k| dto::ChecksumAlgorithm::from(k.clone())).collect());
    dto::Object {
        e_tag: Some(etag(&info)),
        last_modified: Some(timestamp(info.last_modified_ms)),
        size: Some(i64::try_from(info.size).unwrap_or(i64::MAX)),
        storage_class: Some(dto::ObjectStorageClass::from_static(dto::ObjectStorageClass::STANDARD)),
        owner: owner.cloned(),
        checksum_algorithm,
        key: Some(encode(url, info.key)),
        ..Default::default()
    }
}

fn continuation_token(after: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(after.as_bytes())
}

fn parse_continuation_token(token: &str) -> S3Result<String> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.as_bytes())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| invalid_argument("The continuation token provided is incorrect"))
}

fn opt_nonempty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn empty_body() -> s3s::dto::StreamingBlob {
    s3s::dto::StreamingBlob::wrap(futures::stream::empty::<Result<bytes::Bytes, std::io::Error>>())
}

#[async_trait::async_trait]
impl<B: Backend> S3 for Gateway<B> {
    async fn list_buckets(
        &self,
        req: S3Request<dto::ListBucketsInput>,
    ) -> S3Result<S3Response<dto::ListBucketsOutput>> {
        let caller = caller(&req)?;
        let input = req.input;
        let mut buckets = self.backend.list_buckets(&caller).await.map_err(to_s3)?;
        if let Some(prefix) = &input.prefix {
            buckets.retain(|b| b.name.starts_with(prefix.as_str()));
        }
        if let Some(after) = &input.continuation_token {
            buckets.retain(|b| b.name.as_str() > after.as_str());
        }
        let mut next = None;
        if let Some(max) = input.max_buckets {
            let max = usize::try_from(max)
                .ok()
                .filter(|m| (1..=10_000).contains(m))
                .ok_or_else(|| invalid_argument("max-buckets must be between 1 and 10000"))?;
            if buckets.len() > max {
                buckets.truncate(max);
                next = buckets.last().map(|b| b.name.clone());
            }
        }
        let buckets = buckets
            .into_iter()
            .map(|b| dto::Bucket {
                name: Some(b.name),
                creation_date: Some(timestamp(b.created_ms)),
                bucket_region: Some(b.region),
            })
            .collect();
        Ok(S3Response::new(dto::ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(owner(&caller)),
            continuation_token: next,
            prefix: input.prefix,
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<dto::CreateBucketInput>,
    ) -> S3Result<S3Response<dto::CreateBucketOutput>> {
        let caller = caller(&req)?;
        let input = req.input;
        validate_bucket_name(&input.bucket).map_err(to_s3)?;
        if input.object_lock_enabled_for_bucket == Some(true) {
            return Err(not_implemented("object lock is not supported"));
        }
        // ACLs are off (S3's "bucket owner enforced", its default since 2023): a bucket is
        // made public with a bucket policy, not an ACL.
        let canned = input.acl.as_ref().map(dto::BucketCannedACL::as_str);
        if !matches!(canned, None | Some("private"))
            || input.grant_full_control.is_some()
            || input.grant_read.is_some()
            || input.grant_read_acp.is_some()
            || input.grant_write.is_some()
            || input.grant_write_acp.is_some()
        {
            return Err(with_status(
                S3ErrorCode::InvalidBucketAclWithObjectOwnership,
                StatusCode::BAD_REQUEST,
                "Bucket cannot have ACLs set with ObjectOwnership's BucketOwnerEnforced setting",
            ));
        }
        match input.object_ownership.as_ref().map(dto::ObjectOwnership::as_str) {
            None | Some("BucketOwnerEnforced") => {}
            Some(other) => return Err(not_implemented(format!("object ownership {other:?} is not supported; buckets are BucketOwnerEnforced"))),
        }
        let constraint = input.create_bucket_configuration.and_then(|c| c.location_constraint);
        match constraint.as_ref().map(dto::BucketLocationConstraint::as_str) {
            None | Some("") => {}
            Some(c) if c == self.region => {}
            Some(c) => {
                return Err(with_status(
                    S3ErrorCode::InvalidLocationConstraint,
                    StatusCode::BAD_REQUEST,
                    format!("The specified location-constraint {c:?} is not valid here; this endpoint serves {:?}", self.region),
                ))
            }
        }
        let bucket = self.backend.create_bucket(&caller, &input.bucket, &self.region).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::CreateBucketOutput { location: Some(format!("/{}", bucket.name)) }))
    }

    async fn head_bucket(&self, req: S3Request<dto::HeadBucketInput>) -> S3Result<S3Response<dto::HeadBucketOutput>> {
        let caller = requester(&req);
        let bucket = self.authorize(&caller, &req.input.bucket, req.input.expected_bucket_owner.as_ref(), "s3:ListBucket", None).await?;
        Ok(S3Response::new(dto::HeadBucketOutput { bucket_region: Some(bucket.region), ..Default::default() }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<dto::DeleteBucketInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketOutput>> {
        let caller = requester(&req);
        self.authorize(&caller, &req.input.bucket, req.input.expected_bucket_owner.as_ref(), "s3:DeleteBucket", None).await?;
        self.backend.delete_bucket(&req.input.bucket).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::DeleteBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<dto::GetBucketLocationInput>,
    ) -> S3Result<S3Response<dto::GetBucketLocationOutput>> {
        let caller = requester(&req);
        let bucket = self.authorize(&caller, &req.input.bucket, req.input.expected_bucket_owner.as_ref(), "s3:GetBucketLocation", None).await?;
        // S3 shows the original region, us-east-1, as no constraint at all.
        let location_constraint =
            (bucket.region != "us-east-1").then(|| dto::BucketLocationConstraint::from(bucket.region));
        Ok(S3Response::new(dto::GetBucketLocationOutput { location_constraint }))
    }

    async fn put_object(&self, req: S3Request<dto::PutObjectInput>) -> S3Result<S3Response<dto::PutObjectOutput>> {
        let caller = requester(&req);
        let trailers = req.trailing_headers.clone();
        let input = req.input;
        let bucket =
            self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutObject", Some(&input.key)).await?;
        validate_key(&input.key).map_err(to_s3)?;
        let tags = tagging::from_header(input.tagging.as_deref())?;
        if !tags.is_empty() && !permits(&bucket, &caller, "s3:PutObjectTagging", Some(&input.key)) {
            return Err(access_denied());
        }
        if input.if_match.is_some() || input.if_none_match.is_some() {
            return Err(not_implemented("conditional writes (If-Match, If-None-Match on PUT) are not supported"));
        }
        if input.write_offset_bytes.is_some() {
            return Err(not_implemented("appends (x-amz-write-offset-bytes) are not supported"));
        }
        if input.server_side_encryption.is_some() || input.sse_customer_algorithm.is_some() || input.ssekms_key_id.is_some() {
            return Err(not_implemented("server-side encryption is not supported"));
        }
        if input.object_lock_mode.is_some() || input.object_lock_legal_hold_status.is_some() {
            return Err(not_implemented("object lock is not supported"));
        }
        permissions::object_canned_acl(input.acl.as_ref())?;
        unsupported_storage_class(input.storage_class.as_ref())?;

        let expected = expected_checksums(
            &req.headers,
            [
                (Algorithm::Crc32, input.checksum_crc32),
                (Algorithm::Crc32c, input.checksum_crc32c),
                (Algorithm::Crc64Nvme, input.checksum_crc64nvme),
                (Algorithm::Sha1, input.checksum_sha1),
                (Algorithm::Sha256, input.checksum_sha256),
            ],
            input.checksum_algorithm.as_ref(),
        )?;
        // Values known before the body are stored with the object (the stream fails at its
        // end if they do not match, so nothing unverified is kept).
        let known = known_checksums(&expected);
        let opts = PutOptions {
            content_type: opt_nonempty(input.content_type),
            user_meta: user_meta(input.metadata)?,
            headers: stored_headers(
                input.cache_control,
                input.content_disposition,
                input.content_encoding,
                input.content_language,
                input.expires.as_ref(),
            ),
            content_md5: content_md5(input.content_md5.as_deref())?,
            length: content_length(input.content_length)?,
            checksums: known,
            tags,
        };
        let body = input.body.unwrap_or_else(empty_body);
        let (upload, report) = Upload::new(body, expected, trailers);
        let info = match self.backend.put_object(&input.bucket, &input.key, opts, upload.into_stream()).await {
            Ok(info) => info,
            Err(e) => return Err(report.failure().map_or_else(|| to_s3(e), |f| f.to_s3())),
        };
        let mut checksums = info.checksums.clone();
        checksums.extend(report.checksums());
        let s = sums(&checksums);
        Ok(S3Response::new(dto::PutObjectOutput {
            e_tag: Some(etag(&info)),
            version_id: info.version_id,
            checksum_crc32: s.crc32,
            checksum_crc32c: s.crc32c,
            checksum_crc64nvme: s.crc64nvme,
            checksum_sha1: s.sha1,
            checksum_sha256: s.sha256,
            checksum_type: s.kind,
            ..Default::default()
        }))
    }

    async fn get_object(&self, req: S3Request<dto::GetObjectInput>) -> S3Result<S3Response<dto::GetObjectOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let read = if input.version_id.is_some() { "s3:GetObjectVersion" } else { "s3:GetObject" };
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), read, Some(&input.key)).await?;
        let part = Part::of_request(input.range.as_ref(), input.part_number)?;
        let conds = Conditions {
            if_match: input.if_match.as_ref(),
            if_none_match: input.if_none_match.as_ref(),
            if_modified_since: input.if_modified_since.as_ref(),
            if_unmodified_since: input.if_unmodified_since.as_ref(),
        };
        let version = input.version_id.as_deref();
        let (info, span, stream) = self.read(&input.bucket, &input.key, version, part, &conds).await?;
        let length = span.as_ref().map_or(info.size, |s| s.end - s.start);
        let mut out = dto::GetObjectOutput {
            body: Some(body::download(stream)),
            content_length: Some(i64::try_from(length).unwrap_or(i64::MAX)),
            content_range: span.as_ref().and_then(|s| content_range(s, info.size)),
            parts_count: parts_count(&info, part),
            tag_count: (!info.tags.is_empty()).then(|| i32::try_from(info.tags.len()).unwrap_or(i32::MAX)),
            ..Default::default()
        };
        // A range's checksum is not the object's: S3 returns none for ranged reads.
        describe!(out, &info, span.is_none() && checksum_mode_enabled(input.checksum_mode.as_ref()));
        overrides!(out, input);
        Ok(S3Response::new(out))
    }

    async fn head_object(&self, req: S3Request<dto::HeadObjectInput>) -> S3Result<S3Response<dto::HeadObjectOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let read = if input.version_id.is_some() { "s3:GetObjectVersion" } else { "s3:GetObject" };
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), read, Some(&input.key)).await?;
        let part = Part::of_request(input.range.as_ref(), input.part_number)?;
        let version = input.version_id.as_deref();
        let info = match self.head_of(&input.bucket, &input.key, version).await {
            Ok(info) => info,
            Err(e) => return Err(self.read_error(&input.bucket, &input.key, version, e).await),
        };
        let conds = Conditions {
            if_match: input.if_match.as_ref(),
            if_none_match: input.if_none_match.as_ref(),
            if_modified_since: input.if_modified_since.as_ref(),
            if_unmodified_since: input.if_unmodified_since.as_ref(),
        };
        check_conditions(&conds, &info, false)?;
        let span = part.map(|p| p.span(&info)).transpose()?.flatten();
        let length = span.as_ref().map_or(info.size, |s| s.end - s.start);
        let mut out = dto::HeadObjectOutput {
            content_length: Some(i64::try_from(length).unwrap_or(i64::MAX)),
            content_range: span.as_ref().and_then(|s| content_range(s, info.size)),
            parts_count: parts_count(&info, part),
            ..Default::default()
        };
        describe!(out, &info, span.is_none() && checksum_mode_enabled(input.checksum_mode.as_ref()));
        overrides!(out, input);
        // (`s3s` answers 200 whatever the status asked for here; the server makes a HEAD
        // with Content-Range a 206.)
        let mut response = S3Response::new(out);
        // S3's HEAD output has no field for it, but S3 (and clients checking it) send it.
        if !info.tags.is_empty() {
            response.headers.insert("x-amz-tagging-count", HeaderValue::from(info.tags.len()));
        }
        Ok(response)
    }

    async fn delete_object(
        &self,
        req: S3Request<dto::DeleteObjectInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let action = if input.version_id.is_some() { "s3:DeleteObjectVersion" } else { "s3:DeleteObject" };
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), action, Some(&input.key)).await?;
        if input.if_match.is_some() || input.if_match_last_modified_time.is_some() || input.if_match_size.is_some() {
            return Err(not_implemented("conditional deletes are not supported"));
        }
        if input.bypass_governance_retention.is_some() || input.mfa.is_some() {
            return Err(not_implemented("object lock and MFA delete are not supported"));
        }
        validate_key(&input.key).map_err(to_s3)?;
        let deleted = self.delete(&input.bucket, &input.key, input.version_id.as_deref()).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::DeleteObjectOutput {
            delete_marker: deleted.delete_marker.then_some(true),
            version_id: deleted.version_id,
            ..Default::default()
        }))
    }

    async fn delete_objects(
        &self,
        req: S3Request<dto::DeleteObjectsInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectsOutput>> {
        use futures::StreamExt;
        let caller = requester(&req);
        let input = req.input;
        let b = self.backend.bucket(&input.bucket).await.map_err(to_s3)?;
        if input.expected_bucket_owner.as_ref().is_some_and(|o| *o != b.owner) {
            return Err(access_denied());
        }
        let objects = input.delete.objects;
        if objects.is_empty() || objects.len() > MAX_DELETE_OBJECTS {
            return Err(with_status(
                S3ErrorCode::MalformedXML,
                StatusCode::BAD_REQUEST,
                format!("The XML you provided was not well-formed or did not validate against our published schema (1 to {MAX_DELETE_OBJECTS} objects)"),
            ));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let bucket = input.bucket.as_str();
        let (b, caller) = (&b, &caller);
        if objects.iter().any(|o| o.e_tag.is_some() || o.last_modified_time.is_some() || o.size.is_some()) {
            return Err(not_implemented("conditional deletes are not supported"));
        }
        let results: Vec<(String, Option<String>, S3Result<Deleted>)> = futures::stream::iter(objects)
            .map(|object| async move {
                let result = async {
                    validate_key(&object.key).map_err(to_s3)?;
                    // Each key is allowed or not on its own, as S3 does.
                    let action = if object.version_id.is_some() { "s3:DeleteObjectVersion" } else { "s3:DeleteObject" };
                    if !permits(b, caller, action, Some(&object.key)) {
                        return Err(access_denied());
                    }
                    self.delete(bucket, &object.key, object.version_id.as_deref()).await.map_err(to_s3)
                }
                .await;
                (object.key, object.version_id, result)
            })
            .buffered(8)
            .collect()
            .await;
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for (key, version_id, result) in results {
            match result {
                Ok(_) if quiet => {}
                Ok(d) => deleted.push(match version_id {
                    // One version removed (a delete marker, perhaps).
                    Some(v) => dto::DeletedObject {
                        key: Some(key),
                        version_id: Some(v),
                        delete_marker: d.delete_marker.then_some(true),
                        delete_marker_version_id: None,
                    },
                    // A delete marker put on the key, in a versioned bucket.
                    None => dto::DeletedObject {
                        key: Some(key),
                        version_id: None,
                        delete_marker: d.delete_marker.then_some(true),
                        delete_marker_version_id: d.version_id.filter(|_| d.delete_marker),
                    },
                }),
                Err(e) => errors.push(dto::Error {
                    code: Some(e.code().as_str().to_owned()),
                    message: e.message().map(str::to_owned),
                    key: Some(key),
                    version_id,
                }),
            }
        }
        Ok(S3Response::new(dto::DeleteObjectsOutput {
            deleted: (!deleted.is_empty()).then_some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn get_object_tagging(
        &self,
        req: S3Request<dto::GetObjectTaggingInput>,
    ) -> S3Result<S3Response<dto::GetObjectTaggingOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let action = if input.version_id.is_some() { "s3:GetObjectVersionTagging" } else { "s3:GetObjectTagging" };
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), action, Some(&input.key)).await?;
        validate_key(&input.key).map_err(to_s3)?;
        let version = input.version_id.as_deref();
        let info = match self.head_of(&input.bucket, &input.key, version).await {
            Ok(info) => info,
            Err(e) => return Err(self.read_error(&input.bucket, &input.key, version, e).await),
        };
        Ok(S3Response::new(dto::GetObjectTaggingOutput { tag_set: tagging::tag_set(&info.tags), version_id: info.version_id }))
    }

    async fn put_object_tagging(
        &self,
        req: S3Request<dto::PutObjectTaggingInput>,
    ) -> S3Result<S3Response<dto::PutObjectTaggingOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let action = if input.version_id.is_some() { "s3:PutObjectVersionTagging" } else { "s3:PutObjectTagging" };
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), action, Some(&input.key)).await?;
        validate_key(&input.key).map_err(to_s3)?;
        let tags = tagging::from_xml(input.tagging)?;
        let version = input.version_id.as_deref();
        let version_id = self.backend.set_tags(&input.bucket, &input.key, version, tags).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::PutObjectTaggingOutput { version_id }))
    }

    async fn delete_object_tagging(
        &self,
        req: S3Request<dto::DeleteObjectTaggingInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectTaggingOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let action = if input.version_id.is_some() { "s3:DeleteObjectVersionTagging" } else { "s3:DeleteObjectTagging" };
        self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), action, Some(&input.key)).await?;
        validate_key(&input.key).map_err(to_s3)?;
        let version = input.version_id.as_deref();
        let version_id = self.backend.set_tags(&input.bucket, &input.key, version, Vec::new()).await.map_err(to_s3)?;
        Ok(S3Response::new(dto::DeleteObjectTaggingOutput { version_id }))
    }

    async fn copy_object(&self, req: S3Request<dto::CopyObjectInput>) -> S3Result<S3Response<dto::CopyObjectOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let dto::CopySource::Bucket { bucket: src_bucket, key: src_key, version_id } = &input.copy_source else {
            return Err(not_implemented("copy sources other than bucket/key are not supported"));
        };
        let bucket =
            self.authorize(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), "s3:PutObject", Some(&input.key)).await?;
        let read = if version_id.is_some() { "s3:GetObjectVersion" } else { "s3:GetObject" };
        self.authorize(&caller, src_bucket, input.expected_source_bucket_owner.as_ref(), read, Some(src_key)).await?;
        validate_key(&input.key).map_err(to_s3)?;
        validate_key(src_key).map_err(to_s3)?;
        if input.server_side_encryption.is_some() || input.website_redirect_location.is_some() {
            return Err(not_implemented("encryption and website redirects are not supported"));
        }
        // The copy gets the source's tags (COPY), or those of x-amz-tagging (REPLACE).
        let new_tags = match input.tagging_directive.as_ref().map(dto::TaggingDirective::as_str) {
            None | Some("COPY") => None,
            Some("REPLACE") => Some(tagging::from_header(input.tagging.as_deref())?),
            Some(other) => return Err(invalid_argument(format!("Unknown tagging directive {other:?}"))),
        };
        if new_tags.as_ref().is_some_and(|t| !t.is_empty()) && !permits(&bucket, &caller, "s3:PutObjectTagging", Some(&input.key)) {
            return Err(access_denied());
        }
        permissions::object_canned_acl(input.acl.as_ref())?;
        unsupported_storage_class(input.storage_class.as_ref())?;
        let replace = match input.metadata_directive.as_ref().map(dto::MetadataDirective::as_str) {
            None | Some("COPY") => false,
            Some("REPLACE") => true,
            Some(other) => return Err(invalid_argument(format!("Unknown metadata directive {other:?}"))),
        };
        // Copying an older version onto its own key is how S3 users restore it.
        if !replace && version_id.is_none() && input.bucket.as_str() == &**src_bucket && input.key.as_str() == &**src_key {
            return Err(with_status(
                S3ErrorCode::InvalidRequest,
                StatusCode::BAD_REQUEST,
                "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes.",
            ));
        }
        let conds = Conditions {
            if_match: input.copy_source_if_match.as_ref(),
            if_none_match: input.copy_source_if_none_match.as_ref(),
            if_modified_since: input.copy_source_if_modified_since.as_ref(),
            if_unmodified_since: input.copy_source_if_unmodified_since.as_ref(),
        };
        let version = version_id.as_deref();
        let (source, stream) = match self.get_of(src_bucket, src_key, version, None).await {
            Ok(found) => found,
            Err(e) => return Err(self.read_error(src_bucket, src_key, version, e).await),
        };
        check_conditions(&conds, &source, true)?;
        if source.size > MAX_PUT_SIZE {
            return Err(with_status(
                S3ErrorCode::InvalidRequest,
                StatusCode::BAD_REQUEST,
                format!("The specified copy source is larger than the maximum allowable size for a copy source: {MAX_PUT_SIZE}"),
            ));
        }
        let (content_type, user_meta, headers) = if replace {
            (
                opt_nonempty(input.content_type),
                user_meta(input.metadata)?,
                stored_headers(
                    input.cache_control,
                    input.content_disposition,
                    input.content_encoding,
                    input.content_language,
                    input.expires.as_ref(),
                ),
            )
        } else {
            (source.content_type.clone(), source.user_meta.clone(), source.headers.clone())
        };
        // The source's checksums travel with the data and are verified on the way; a newly
        // requested algorithm is computed.
        let mut expected: Vec<(Algorithm, Expected)> = source
            .checksums
            .iter()
            .filter_map(|(name, v)| Some((Algorithm::from_name(name)?, Expected::Header(v.clone()))))
            .collect();
        if let Some(name) = &input.checksum_algorithm {
            let algorithm = Algorithm::from_name(name.as_str())
                .ok_or_else(|| invalid_argument(format!("unsupported checksum algorithm {:?}", name.as_str())))?;
            if !expected.iter().any(|(a, _)| *a == algorithm) {
                expected.push((algorithm, Expected::Compute));
            }
        }
        let opts = PutOptions {
            content_type,
            user_meta,
            headers,
            content_md5: None,
            length: Some(source.size),
            checksums: source.checksums.clone(),
            tags: new_tags.unwrap_or_else(|| source.tags.clone()),
        };
        let (upload, report) = Upload::from_backend(stream, expected);
        let info = match self.backend.put_object(&input.bucket, &input.key, opts, upload.into_stream()).await {
            Ok(info) => info,
            Err(e) => {
                return Err(match report.failure() {
                    // The stored data no longer matches its own checksum.
                    Some(f) => to_s3(crate::backend::Error::Internal(format!("copy source {src_bucket}/{src_key}: {f:?}"))),
                    None => to_s3(e),
                })
            }
        };
        let mut checksums = info.checksums.clone();
        checksums.extend(report.checksums());
        let s = sums(&checksums);
        Ok(S3Response::new(dto::CopyObjectOutput {
            copy_object_result: Some(dto::CopyObjectResult {
                e_tag: Some(etag(&info)),
                last_modified: Some(timestamp(info.last_modified_ms)),
                checksum_crc32: s.crc32,
                checksum_crc32c: s.crc32c,
                checksum_crc64nvme: s.crc64nvme,
                checksum_sha1: s.sha1,
                checksum_sha256: s.sha256,
                checksum_type: s.kind,
            }),
            version_id: info.version_id,
            copy_source_version_id: source.version_id,
            ..Default::default()
        }))
    }

    async fn list_objects(&self, req: S3Request<dto::ListObjectsInput>) -> S3Result<S3Response<dto::ListObjectsOutput>> {
        let caller = requester(&req);
        let input = req.input;
        let url = url_encoding(input.encoding_type.as_ref())?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.unwrap_or_default();
        let delimiter = opt_nonempty(input.delimiter);
        let marker = opt_nonempty(input.marker);
        let query = ListQuery { prefix: prefix.clone(), delimiter: delimiter.clone(), start_after: marker.clone(), max_keys: max };
        let (bucket, page) = self.list(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), query).await?;
        let owner = owner_of(&bucket, &caller);
        // S3 gives NextMarker only with a delimiter; without one, clients continue after the
        // last key.
        let next_marker = if page.truncated && delimiter.is_some() { page.next_after.clone() } else { None };
        Ok(S3Response::new(dto::ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(encode(url, prefix)),
            marker: Some(encode(url, marker.unwrap_or_default())),
            max_keys: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            is_truncated: Some(page.truncated),
            contents: Some(page.objects.into_iter().map(|o| listed_object(o, Some(&owner), url)).collect()),
            common_prefixes: Some(
                page.common_prefixes.into_iter().map(|p| dto::CommonPrefix { prefix: Some(encode(url, p)) }).collect(),
            ),
            delimiter: delimiter.map(|d| encode(url, d)),
            next_marker: next_marker.map(|m| encode(url, m)),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<dto::ListObjectsV2Input>,
    ) -> S3Result<S3Response<dto::ListObjectsV2Output>> {
        let caller = requester(&req);
        let input = req.input;
        let url = url_encoding(input.encoding_type.as_ref())?;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.unwrap_or_default();
        let delimiter = opt_nonempty(input.delimiter);
        let start_after = opt_nonempty(input.start_after);
        let token = opt_nonempty(input.continuation_token);
        // A continuation token supersedes start-after.
        let after = match &token {
            Some(t) => Some(parse_continuation_token(t)?),
            None => start_after.clone(),
        };
        let query = ListQuery { prefix: prefix.clone(), delimiter: delimiter.clone(), start_after: after, max_keys: max };
        let (bucket, page) = self.list(&caller, &input.bucket, input.expected_bucket_owner.as_ref(), query).await?;
        let owner = owner_of(&bucket, &caller);
        let fetch_owner = input.fetch_owner.unwrap_or(false);
        let key_count = page.objects.len() + page.common_prefixes.len();
        let next = if page.truncated { page.next_after.as_deref().map(continuation_token) } else { None };
        Ok(S3Response::new(dto::ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(encode(url, prefix)),
            max_keys: Some(i32::try_from(max).unwrap_or(i32::MAX)),
            key_count: Some(i32::try_from(key_count).unwrap_or(i32::MAX)),
            continuation_token: token,
            is_truncated: Some(page.truncated),
            next_continuation_token: next,
            contents: Some(
                page.objects.into_iter().map(|o| listed_object(o, fetch_owner.then_some(&owner), url)).collect(),
            ),
            common_prefixes: Some(
                page.common_prefixes.into_iter().map(|p| dto::CommonPrefix { prefix: Some(encode(url, p)) }).collect(),
            ),
            delimiter: delimiter.map(|d| encode(url, d)),
            encoding_type: input.encoding_type,
            start_after: start_after.map(|s| encode(url, s)),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CreateMultipartUploadOutput>> {
        self.create_upload(req).await
    }

    async fn upload_part(&self, req: S3Request<dto::UploadPartInput>) -> S3Result<S3Response<dto::UploadPartOutput>> {
        Gateway::upload_part(self, req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<dto::UploadPartCopyInput>,
    ) -> S3Result<S3Response<dto::UploadPartCopyOutput>> {
        Gateway::upload_part_copy(self, req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<dto::CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CompleteMultipartUploadOutput>> {
        self.complete_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<dto::AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::AbortMultipartUploadOutput>> {
        self.abort_upload(req).await
    }

    async fn list_parts(&self, req: S3Request<dto::ListPartsInput>) -> S3Result<S3Response<dto::ListPartsOutput>> {
        self.list_upload_parts(req).await
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<dto::ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<dto::ListMultipartUploadsOutput>> {
        self.list_uploads(req).await
    }

    async fn put_bucket_policy(
        &self,
        req: S3Request<dto::PutBucketPolicyInput>,
    ) -> S3Result<S3Response<dto::PutBucketPolicyOutput>> {
        self.put_policy(req).await
    }

    async fn get_bucket_policy(
        &self,
        req: S3Request<dto::GetBucketPolicyInput>,
    ) -> S3Result<S3Response<dto::GetBucketPolicyOutput>> {
        self.get_policy(req).await
    }

    async fn delete_bucket_policy(
        &self,
        req: S3Request<dto::DeleteBucketPolicyInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketPolicyOutput>> {
        self.delete_policy(req).await
    }

    async fn get_bucket_policy_status(
        &self,
        req: S3Request<dto::GetBucketPolicyStatusInput>,
    ) -> S3Result<S3Response<dto::GetBucketPolicyStatusOutput>> {
        self.policy_status(req).await
    }

    async fn get_bucket_ownership_controls(
        &self,
        req: S3Request<dto::GetBucketOwnershipControlsInput>,
    ) -> S3Result<S3Response<dto::GetBucketOwnershipControlsOutput>> {
        self.ownership_controls(req).await
    }

    async fn get_bucket_acl(&self, req: S3Request<dto::GetBucketAclInput>) -> S3Result<S3Response<dto::GetBucketAclOutput>> {
        self.bucket_acl(req).await
    }

    async fn put_bucket_acl(&self, req: S3Request<dto::PutBucketAclInput>) -> S3Result<S3Response<dto::PutBucketAclOutput>> {
        self.set_bucket_acl(req).await
    }

    async fn get_object_acl(&self, req: S3Request<dto::GetObjectAclInput>) -> S3Result<S3Response<dto::GetObjectAclOutput>> {
        self.object_acl(req).await
    }

    async fn put_object_acl(&self, req: S3Request<dto::PutObjectAclInput>) -> S3Result<S3Response<dto::PutObjectAclOutput>> {
        self.set_object_acl(req).await
    }

    async fn put_bucket_versioning(
        &self,
        req: S3Request<dto::PutBucketVersioningInput>,
    ) -> S3Result<S3Response<dto::PutBucketVersioningOutput>> {
        self.put_versioning(req).await
    }

    async fn get_bucket_versioning(
        &self,
        req: S3Request<dto::GetBucketVersioningInput>,
    ) -> S3Result<S3Response<dto::GetBucketVersioningOutput>> {
        self.get_versioning(req).await
    }

    async fn list_object_versions(
        &self,
        req: S3Request<dto::ListObjectVersionsInput>,
    ) -> S3Result<S3Response<dto::ListObjectVersionsOutput>> {
        self.list_versions(req).await
    }

    async fn put_bucket_lifecycle_configuration(
        &self,
        req: S3Request<dto::PutBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<dto::PutBucketLifecycleConfigurationOutput>> {
        self.put_lifecycle(req).await
    }

    async fn get_bucket_lifecycle_configuration(
        &self,
        req: S3Request<dto::GetBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<dto::GetBucketLifecycleConfigurationOutput>> {
        self.get_lifecycle(req).await
    }

    async fn delete_bucket_lifecycle(
        &self,
        req: S3Request<dto::DeleteBucketLifecycleInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketLifecycleOutput>> {
        self.delete_lifecycle(req).await
    }
}
