//! `MemBackend`: an in-memory [`Backend`] for tests of the protocol layer.
//!
//! It is a test double, not the product: nothing survives the process, every object is
//! held whole in memory, and there is one lock for everything. It keeps the semantics the
//! protocol layer relies on (ownership errors, `BucketNotEmpty`, Content-MD5 and length
//! checks that store nothing on failure, listings with prefix, delimiter, start-after and
//! truncation in UTF-8 byte order), so tests against it say something about the gateway.

use crate::backend::{
    Account, Backend, Bucket, ByteStream, Error, ListPage, ListQuery, ObjectInfo, PutOptions, Result,
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
        let info =
            Bucket { name: name.to_owned(), owner: owner.id.clone(), created_ms: now_ms(), region: region.to_owned() };
        state.buckets.insert(name.to_owned(), MemBucket { info: info.clone(), objects: BTreeMap::new() });
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

    async fn put_object(&self, bucket: &str, key: &str, opts: PutOptions, mut body: ByteStream) -> Result<ObjectInfo> {
        crate::s3::validate_key(key)?;
        if key.contains('\0') {
            return Err(Error::InvalidArgument("keys may not hold NUL".into()));
        }
        self.bucket(bucket).await?;
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
        let info = opts.into_info(key, data.len() as u64, &digest);
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        b.objects.insert(key.to_owned(), (info.clone(), data.freeze()));
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

    async fn delete_object(&self, bucket: &str, key: &str) -> Result<()> {
        let mut state = self.state();
        let b = state.buckets.get_mut(bucket).ok_or_else(|| Error::NoSuchBucket(bucket.to_owned()))?;
        b.objects.remove(key);
        Ok(())
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
