//! `MemBackend`: an in-memory [`Backend`] for tests of the protocol layer.
//!
//! It is a test double, not the product: nothing survives the process, every object is
//! held whole in memory, and there is one lock for everything. It keeps the semantics the
//! protocol layer relies on (ownership errors, `BucketNotEmpty`, Content-MD5 and length
//! checks that store nothing on failure, listings with prefix, delimiter, start-after and
//! truncation in UTF-8 byte order, multipart uploads with S3's part rules and ETags), so
//! tests against it say something about the gateway. It has no versioning, lifecycle or
//! quotas: those operations answer `NotImplemented` (the trait's defaults).

use crate::backend::{
    Account, Backend, Bucket, ByteStream, CompletedPart, Deleted, Error, ListPage, ListQuery, ObjectInfo, PartInfo,
    PutOptions, Result, Upload, UploadQuery, MAX_PART_NUMBER, MIN_PART_SIZE,
};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use md5::{Digest, Md5};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Pieces a GET streams in, so readers see more than one.
const PIECE: usize = 64 << 10;

#[derive(Default)]
pub struct MemBackend {
    state: Mutex<State>,
    /// Numbers upload ids.
    uploads_started: AtomicUsize,
    /// PUTs reading their body right now (tests wait on it instead of sleeping).
    puts_in_progress: AtomicUsize,
}

struct InProgress<'a>(&'a AtomicUsize);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct State {
    /// access key → (account, secret)
    keys: HashMap<String, (Account, String)>,
    buckets: BTreeMap<String, MemBucket>,
}

struct MemBucket {
    info: Bucket,
    objects: BTreeMap<String, (ObjectInfo, Bytes)>,
    /// (key, upload id) → upload; ids start with a counter, so a key's uploads are in the
    /// order they were started.
    uploads: BTreeMap<(String, String), MemUpload>,
}

struct MemUpload {
    upload: Upload,
    opts: PutOptions,
    parts: BTreeMap<u32, (PartInfo, Bytes)>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an access key (and so its account) signing requests with `secret`.
    pub fn add_key(&self, account: &Account, access_key: &str, secret: &str) {
        self.state().keys.insert(access_key.to_owned(), (account.clone(), secret.to_owned()));
    }

    /// Removes an access key; requests signed with it are refused from then on.
    pub fn remove_key(&self, access_key: &str) {
        self.state().keys.remove(access_key);
    }

    /// How many PUTs are reading their body right now.
    pub fn puts_in_progress(&self) -> usize {
        self.puts_in_progress.load(Ordering::SeqCst)
    }

    /// How many objects `bucket` holds (for tests that check nothing was stored).
    pub fn object_count(&self, bucket: &str) -> usize {
        self.state().buckets.get(bucket).map_or(0, |b| b.objects.len())
    }

    /// How many parts the uploads in progress in `bucket` hold (for tests that check
    /// nothing was stored).
    pub fn part_count(&self, bucket: &str) -> usize {
        self.state().buckets.get(bucket).map_or(0, |b| b.uploads.values().map(|u| u.parts.len()).sum())
    }

    /// Reads a whole body, checking its length and Content-MD5 as `opts` ask.
    async fn read_body(&self, opts: &PutOptions, mut body: ByteStream) -> Result<(Bytes, [u8; 16])> {
        self.puts_in_progress.fetch_add(1, Ordering::SeqCst);
        let _in_progress = InProgress(&self.puts_in_progress);
        let mut data = BytesMut::new();
        let mut md5 = Md5::new();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(Error::Body)?;
            md5.update(&piece);
            data.extend_from_slice(&piece);
            if opts.length.is_some_and(|len| data.len() as u64 > len) {
                return Err(Error::IncompleteBody);
            }
        }
        if opts.length.is_some_and(|len| data.len() as u64 != len) {
            return Err(Error::IncompleteBody);
        }
        let digest: [u8; 16] = md5.finalize().into();
        if opts.content_md5.is_some_and(|want| want != digest) {
            return Err(Error::BadDigest);
        }
        Ok((data.freeze(), digest))
    }

    /// Runs `f` on an upload in progress (`NoSuchBucket`, `NoSuchUpload` if there is none).
    fn with_upload<T>(&self, bucket: &str, key: &str, id: &str, f: impl FnOnce(&mut MemBucket) -> Result<T>) -> Result<T> {
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        if !b.uploads.contains_key(&(key.to_owned(), id.to_owned())) {
            return Err(Error::NoSuchUpload);
        }
        f(b)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl Backend for MemBackend {
    async fn access_key(&self, access_key: &str) -> Result<Option<(Account, String)>> {
        Ok(self.state().keys.get(access_key).cloned())
    }

    async fn create_bucket(&self, owner: &Account, name: &str, region: &str) -> Result<Bucket> {
        crate::s3::validate_bucket_name(name)?;
        let mut state = self.state();
        if let Some(existing) = state.buckets.get(name) {
            return Err(if existing.info.owner == owner.id {
                Error::BucketAlreadyOwnedByYou(name.to_owned())
            } else {
                Error::BucketAlreadyExists(name.to_owned())
            });
        }
        let info = Bucket {
            name: name.to_owned(),
            owner: owner.id.clone(),
            created_ms: now_ms(),
            region: region.to_owned(),
            policy: None,
        };
        let bucket = MemBucket { info: info.clone(), objects: BTreeMap::new(), uploads: BTreeMap::new() };
        state.buckets.insert(name.to_owned(), bucket);
        Ok(info)
    }

    async fn bucket(&self, name: &str) -> Result<Bucket> {
        self.state().buckets.get(name).map(|b| b.info.clone()).ok_or_else(|| Error::NoSuchBucket(name.to_owned()))
    }

    async fn delete_bucket(&self, name: &str) -> Result<()> {
        let mut state = self.state();
        let bucket = state.buckets.get(name).ok_or_else(|| Error::NoSuchBucket(name.to_owned()))?;
        if !bucket.objects.is_empty() {
            return Err(Error::BucketNotEmpty(name.to_owned()));
        }
        state.buckets.remove(name);
        Ok(())
    }

    async fn list_buckets(&self, owner: &Account) -> Result<Vec<Bucket>> {
        Ok(self.state().buckets.values().filter(|b| b.info.owner == owner.id).map(|b| b.info.clone()).collect())
    }

    async fn set_policy(&self, bucket: &str, policy: Option<String>) -> Result<()> {
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        b.info.policy = policy;
        Ok(())
    }

    async fn put_object(&self, bucket: &str, key: &str, opts: PutOptions, body: ByteStream) -> Result<ObjectInfo> {
        crate::s3::validate_key(key)?;
        if key.contains('\0') {
            return Err(Error::InvalidArgument("keys may not hold NUL".into()));
        }
        self.bucket(bucket).await?;
        let (data, digest) = self.read_body(&opts, body).await?;
        let info = opts.into_info(key, data.len() as u64, &digest);
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        b.objects.insert(key.to_owned(), (info.clone(), data));
        Ok(info)
    }

    async fn head_object(&self, bucket: &str, key: &str) -> Result<ObjectInfo> {
        let state = self.state();
        let b = state.buckets.get(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        b.objects.get(key).map(|(info, _)| info.clone()).ok_or(Error::NoSuchKey)
    }

    async fn get_object(&self, bucket: &str, key: &str, range: Option<(u64, u64)>) -> Result<(ObjectInfo, ByteStream)> {
        let (info, data) = {
            let state = self.state();
            let b = state.buckets.get(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
            b.objects.get(key).cloned().ok_or(Error::NoSuchKey)?
        };
        let (start, end) = range.unwrap_or((0, info.size));
        if start > end || end > info.size {
            return Err(Error::InvalidRange);
        }
        let (start, end) = (usize::try_from(start).map_err(|_| Error::InvalidRange)?, usize::try_from(end).map_err(|_| Error::InvalidRange)?);
        let data = data.slice(start..end);
        let pieces: Vec<std::io::Result<Bytes>> =
            (0..data.len()).step_by(PIECE).map(|at| Ok(data.slice(at..(at + PIECE).min(data.len())))).collect();
        Ok((info, Box::pin(futures::stream::iter(pieces))))
    }

    async fn set_tags(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        tags: Vec<(String, String)>,
    ) -> Result<Option<String>> {
        if version_id.is_some() {
            return Err(Error::NotImplemented("object versions"));
        }
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        let (info, _) = b.objects.get_mut(key).ok_or(Error::NoSuchKey)?;
        info.tags = tags;
        Ok(None)
    }

    async fn delete_object(&self, bucket: &str, key: &str) -> Result<Deleted> {
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        b.objects.remove(key);
        Ok(Deleted::default())
    }

    async fn create_upload(&self, owner: &Account, bucket: &str, key: &str, opts: PutOptions) -> Result<Upload> {
        crate::s3::validate_key(key)?;
        if key.contains('\0') {
            return Err(Error::InvalidArgument("keys may not hold NUL".into()));
        }
        let n = self.uploads_started.fetch_add(1, Ordering::SeqCst);
        let id = format!("{n:016x}{:016x}", rand::random::<u64>());
        let upload = Upload { id: id.clone(), key: key.to_owned(), initiated_ms: now_ms(), initiator: owner.id.clone() };
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        let opts = PutOptions { content_md5: None, length: None, ..opts };
        b.uploads.insert((key.to_owned(), id), MemUpload { upload: upload.clone(), opts, parts: BTreeMap::new() });
        Ok(upload)
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
        if !(1..=MAX_PART_NUMBER).contains(&number) {
            return Err(Error::InvalidArgument(format!("part numbers are 1 to {MAX_PART_NUMBER}, not {number}")));
        }
        self.with_upload(bucket, key, upload_id, |_| Ok(()))?;
        let (data, digest) = self.read_body(&opts, body).await?;
        let info = PartInfo { number, etag: hex(&digest), size: data.len() as u64, last_modified_ms: now_ms() };
        // The upload may have been completed or aborted meanwhile: then the part goes too.
        self.with_upload(bucket, key, upload_id, |b| {
            if let Some(u) = b.uploads.get_mut(&(key.to_owned(), upload_id.to_owned())) {
                u.parts.insert(number, (info.clone(), data));
            }
            Ok(info)
        })
    }

    async fn list_parts(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        after: u32,
        max: usize,
    ) -> Result<(Upload, Vec<PartInfo>, bool)> {
        self.with_upload(bucket, key, upload_id, |b| {
            let u = b.uploads.get(&(key.to_owned(), upload_id.to_owned())).ok_or(Error::NoSuchUpload)?;
            let mut parts: Vec<PartInfo> =
                u.parts.range(after.saturating_add(1)..).take(max.saturating_add(1)).map(|(_, (p, _))| p.clone()).collect();
            let more = parts.len() > max;
            parts.truncate(max);
            Ok((u.upload.clone(), parts, more))
        })
    }

    async fn list_uploads(&self, bucket: &str, q: &UploadQuery) -> Result<(Vec<Upload>, bool)> {
        let state = self.state();
        let b = state.buckets.get(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        let after = |k: &String, id: &String| match (&q.key_marker, &q.upload_id_marker) {
            (None, _) => true,
            (Some(mk), Some(mid)) if !mid.is_empty() => k > mk || (k == mk && id > mid),
            (Some(mk), _) => k > mk,
        };
        let mut uploads: Vec<Upload> = b
            .uploads
            .iter()
            .filter(|((k, id), _)| k.starts_with(q.prefix.as_str()) && after(k, id))
            .take(q.max_uploads.saturating_add(1))
            .map(|(_, u)| u.upload.clone())
            .collect();
        let more = uploads.len() > q.max_uploads;
        uploads.truncate(q.max_uploads);
        Ok((uploads, more))
    }

    async fn complete_upload(&self, bucket: &str, key: &str, upload_id: &str, list: &[CompletedPart]) -> Result<ObjectInfo> {
        self.with_upload(bucket, key, upload_id, |b| {
            let id = (key.to_owned(), upload_id.to_owned());
            let u = b.uploads.get(&id).ok_or(Error::NoSuchUpload)?;
            if list.is_empty() {
                return Err(Error::InvalidArgument("a multipart upload needs at least one part".into()));
            }
            if list.windows(2).any(|w| w[0].number >= w[1].number) {
                return Err(Error::InvalidPartOrder);
            }
            let mut data = BytesMut::new();
            let mut md5s = Md5::new();
            let mut part_sizes = Vec::with_capacity(list.len());
            for (i, want) in list.iter().enumerate() {
                let (part, bytes) = u.parts.get(&want.number).ok_or(Error::InvalidPart(want.number))?;
                if want.etag.trim_matches('"') != part.etag {
                    return Err(Error::InvalidPart(want.number));
                }
                if i + 1 < list.len() && part.size < MIN_PART_SIZE {
                    return Err(Error::EntityTooSmall(want.number));
                }
                let digest: [u8; 16] = Md5::digest(bytes).into();
                md5s.update(digest);
                data.extend_from_slice(bytes);
                part_sizes.push(part.size);
            }
            let mut info = u.opts.clone().into_info(key, data.len() as u64, &[0; 16]);
            info.etag = format!("{}-{}", hex(&md5s.finalize()), list.len());
            info.checksums.clear();
            info.part_sizes = part_sizes;
            b.uploads.remove(&id);
            b.objects.insert(key.to_owned(), (info.clone(), data.freeze()));
            Ok(info)
        })
    }

    async fn abort_upload(&self, bucket: &str, key: &str, upload_id: &str) -> Result<()> {
        self.with_upload(bucket, key, upload_id, |b| {
            b.uploads.remove(&(key.to_owned(), upload_id.to_owned()));
            Ok(())
        })
    }

    async fn list_objects(&self, bucket: &str, query: &ListQuery) -> Result<ListPage> {
        let state = self.state();
        let b = state.buckets.get(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        let after = query.start_after.as_deref().unwrap_or("");
        let lower = if after >= query.prefix.as_str() && !after.is_empty() {
            Bound::Excluded(after.to_owned())
        } else {
            Bound::Included(query.prefix.clone())
        };
        let mut page = ListPage::default();
        let mut returned = 0usize;
        for (key, (info, _)) in b.objects.range((lower, Bound::Unbounded)) {
            if !key.starts_with(query.prefix.as_str()) {
                break;
            }
            let rest = &key[query.prefix.len()..];
            let common = query
                .delimiter
                .as_deref()
                .filter(|d| !d.is_empty())
                .and_then(|d| rest.find(d).map(|at| format!("{}{}", query.prefix, &rest[..at + d.len()])));
            let entry = match &common {
                Some(cp) => {
                    // Keys under a common prefix at or before start-after were listed already.
                    if cp.as_str() <= after || page.common_prefixes.last() == Some(cp) {
                        continue;
                    }
                    cp.as_str()
                }
                None => key.as_str(),
            };
            if returned == query.max_keys {
                page.truncated = true;
                break;
            }
            returned += 1;
            page.next_after = Some(entry.to_owned());
            match common {
                Some(cp) => page.common_prefixes.push(cp),
                None => page.objects.push(info.clone()),
            }
        }
        if !page.truncated {
            page.next_after = None;
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account { id: "a1".into(), name: "alice".into() }
    }

    async fn put(m: &MemBackend, key: &str) {
        let body: ByteStream = Box::pin(futures::stream::iter(vec![Ok(Bytes::from_static(b"x"))]));
        m.put_object("bkt", key, PutOptions::default(), body).await.expect("put");
    }

    fn q(prefix: &str, delimiter: Option<&str>, after: Option<&str>, max: usize) -> ListQuery {
        ListQuery {
            prefix: prefix.into(),
            delimiter: delimiter.map(Into::into),
            start_after: after.map(Into::into),
            max_keys: max,
        }
    }

    fn names(p: &ListPage) -> (Vec<String>, Vec<String>) {
        (p.objects.iter().map(|o| o.key.clone()).collect(), p.common_prefixes.clone())
    }

    #[tokio::test]
    async fn listing_pages_through_keys_and_common_prefixes() {
        let m = MemBackend::new();
        m.create_bucket(&account(), "bkt", "r").await.expect("bucket");
        for k in ["a", "b/1", "b/2", "c/x/1", "c/y", "d", "é", "z"] {
            put(&m, k).await;
        }
        let p = m.list_objects("bkt", &q("", Some("/"), None, 3)).await.expect("list");
        assert_eq!(names(&p), (vec!["a".into()], vec!["b/".into(), "c/".into()]));
        assert!(p.truncated);
        assert_eq!(p.next_after.as_deref(), Some("c/"));
        let p = m.list_objects("bkt", &q("", Some("/"), Some("c/"), 3)).await.expect("list");
        // UTF-8 byte order: "z" (0x7a) sorts before "é" (0xc3 0xa9).
        assert_eq!(names(&p), (vec!["d".into(), "z".into(), "é".into()], vec![]));
        assert!(!p.truncated);
        let p = m.list_objects("bkt", &q("c/", Some("/"), None, 10)).await.expect("list");
        assert_eq!(names(&p), (vec!["c/y".into()], vec!["c/x/".into()]));
        let p = m.list_objects("bkt", &q("b/", None, Some("b/1"), 10)).await.expect("list");
        assert_eq!(names(&p), (vec!["b/2".into()], vec![]));
        // Exactly max_keys entries left: not truncated.
        let p = m.list_objects("bkt", &q("b/", None, None, 2)).await.expect("list");
        assert!(!p.truncated && p.next_after.is_none());
    }

    #[tokio::test]
    async fn buckets_refuse_deletion_while_they_hold_objects() {
        let m = MemBackend::new();
        m.create_bucket(&account(), "bkt", "r").await.expect("bucket");
        put(&m, "k").await;
        assert!(matches!(m.delete_bucket("bkt").await, Err(Error::BucketNotEmpty(_))));
        m.delete_object("bkt", "k").await.expect("delete");
        m.delete_bucket("bkt").await.expect("delete bucket");
        assert!(matches!(m.bucket("bkt").await, Err(Error::NoSuchBucket(_))));
    }

    #[tokio::test]
    async fn a_wrong_md5_or_length_stores_nothing() {
        let m = MemBackend::new();
        m.create_bucket(&account(), "bkt", "r").await.expect("bucket");
        let body = || -> ByteStream { Box::pin(futures::stream::iter(vec![Ok(Bytes::from_static(b"data"))])) };
        let opts = PutOptions { content_md5: Some([0; 16]), ..Default::default() };
        assert!(matches!(m.put_object("bkt", "k", opts, body()).await, Err(Error::BadDigest)));
        let opts = PutOptions { length: Some(5), ..Default::default() };
        assert!(matches!(m.put_object("bkt", "k", opts, body()).await, Err(Error::IncompleteBody)));
        assert_eq!(m.object_count("bkt"), 0);
    }
}
