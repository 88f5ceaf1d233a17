//! The S3 object store on a real cluster: accounts, buckets, objects in data volumes,
//! listings, garbage, and two gateways sharing one cluster.

use anyhow::{bail, Context, Result};
use basalt_s3gw::backend::{Backend, ByteStream, Error, ListQuery, PutOptions};
use basalt_s3gw::store::{LifecycleRule, ObjectStore, Quota, StoreConfig, Usage, Versioning};
use std::sync::Arc;
use basalt_tests::*;
use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use std::time::Duration;

fn body(data: &[u8], piece: usize) -> ByteStream {
    let pieces: Vec<std::io::Result<Bytes>> = data.chunks(piece.max(1)).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    Box::pin(futures::stream::iter(pieces))
}

async fn read_all(mut s: ByteStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(piece) = s.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out)
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

async fn listing(store: &ObjectStore, bucket: &str, prefix: &str, delimiter: Option<&str>, page: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..1000 {
        let q = ListQuery { prefix: prefix.into(), delimiter: delimiter.map(Into::into), start_after: after.clone(), max_keys: page };
        let p = store.list_objects(bucket, &q).await?;
        if p.objects.len() + p.common_prefixes.len() > page {
            bail!("a page of {page} returned {} entries", p.objects.len() + p.common_prefixes.len());
        }
        let mut names: Vec<String> = p.objects.iter().map(|o| o.key.clone()).chain(p.common_prefixes.iter().cloned()).collect();
        names.sort();
        out.extend(names);
        if !p.truncated {
            return Ok(out);
        }
        after = Some(p.next_after.context("a truncated page names where to go on")?);
    }
    bail!("the listing never ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_live_in_data_volumes_and_list_like_s3() -> Result<()> {
    init_tracing();
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let mut cfg = StoreConfig::new(1, "node1");
    cfg.garbage_grace = Duration::ZERO;
    let store = ObjectStore::new(c.client()?, cfg);

    // Accounts and keys.
    let (alice, key) = store.create_account("alice").await?;
    let (found, secret) = store.access_key(&key.id).await?.context("alice's key")?;
    assert_eq!((found, secret), (alice.clone(), key.secret.clone()));
    assert!(store.access_key("BKNOSUCHKEY").await?.is_none());
    let (bob, _) = store.create_account("bob").await?;
    assert!(store.create_account("alice").await.is_err(), "account names are unique");

    // Buckets.
    store.create_bucket(&alice, "photos", "basalt").await?;
    assert!(matches!(store.create_bucket(&alice, "photos", "basalt").await, Err(Error::BucketAlreadyOwnedByYou(_))));
    assert!(matches!(store.create_bucket(&bob, "photos", "basalt").await, Err(Error::BucketAlreadyExists(_))));
    assert_eq!(store.list_buckets(&alice).await?.len(), 1);
    assert!(store.list_buckets(&bob).await?.is_empty());
    assert!(matches!(store.head_object("nope", "k").await, Err(Error::NoSuchBucket(_))));

    // A small object, its MD5 ETag and a refused wrong Content-MD5.
    let small = b"hello basalt".to_vec();
    let md5: [u8; 16] = Md5::digest(&small).into();
    let opts = PutOptions { content_md5: Some(md5), content_type: Some("text/plain".into()), ..Default::default() };
    let info = store.put_object("photos", "greeting", opts, body(&small, 5)).await?;
    assert_eq!(info.etag, md5.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let bad = PutOptions { content_md5: Some([0; 16]), ..Default::default() };
    assert!(matches!(store.put_object("photos", "bad", bad, body(&small, 5)).await, Err(Error::BadDigest)));
    assert!(matches!(store.head_object("photos", "bad").await, Err(Error::NoSuchKey)));
    let short = PutOptions { length: Some(100), ..Default::default() };
    assert!(matches!(store.put_object("photos", "short", short, body(&small, 5)).await, Err(Error::IncompleteBody)));
    let (head, data) = store.get_object("photos", "greeting", None).await?;
    assert_eq!((read_all(data).await?, head.content_type.as_deref()), (small.clone(), Some("text/plain")));

    // A large object over several pieces, whole and ranged, through another gateway too.
    let big = random(10 * (1 << 20) + 123, 7);
    store.put_object("photos", "big", PutOptions::default(), body(&big, 300_000)).await?;
    let (_, data) = store.get_object("photos", "big", None).await?;
    assert!(read_all(data).await? == big, "the large object reads back");
    let (lo, hi) = ((4 << 20) - 10, (4 << 20) + 10);
    let (_, data) = store.get_object("photos", "big", Some((lo as u64, hi as u64))).await?;
    assert!(read_all(data).await? == big[lo..hi], "a range across two pieces");
    let other = ObjectStore::new(c.client()?, StoreConfig::new(2, "node2"));
    let (_, data) = other.get_object("photos", "big", Some((0, 5))).await?;
    assert_eq!(read_all(data).await?, big[..5].to_vec(), "any gateway reads any data volume");
    other.put_object("photos", "from-node2", PutOptions::default(), body(b"two", 3)).await?;
    let (_, data) = store.get_object("photos", "from-node2", None).await?;
    assert_eq!(read_all(data).await?, b"two".to_vec());

    // Listings: prefixes, delimiters, pagination, start-after, unicode.
    for name in ["a/1", "a/2", "a/x/3", "b/1", "c", "é/1", "zz"] {
        store.put_object("photos", name, PutOptions::default(), body(name.as_bytes(), 4)).await?;
    }
    let all = ["a/1", "a/2", "a/x/3", "b/1", "big", "c", "from-node2", "greeting", "zz", "é/1"];
    for page in [1, 2, 3, 1000] {
        assert_eq!(listing(&store, "photos", "", None, page).await?, all, "flat listing, pages of {page}");
        assert_eq!(
            listing(&store, "photos", "", Some("/"), page).await?,
            ["a/", "b/", "big", "c", "from-node2", "greeting", "zz", "é/"],
            "delimited listing, pages of {page}"
        );
        assert_eq!(listing(&store, "photos", "a/", Some("/"), page).await?, ["a/1", "a/2", "a/x/"]);
    }
    let q = ListQuery { prefix: String::new(), delimiter: Some("/".into()), start_after: Some("a/2".into()), max_keys: 2 };
    let p = store.list_objects("photos", &q).await?;
    assert_eq!((p.common_prefixes.clone(), p.truncated), (vec!["b/".to_string()], true), "{p:?}");
    assert_eq!(p.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["big"]);

    // Overwrites and deletes queue the old data; the collector trims it.
    store.put_object("photos", "c", PutOptions::default(), body(b"new c", 2)).await?;
    let (_, data) = store.get_object("photos", "c", None).await?;
    assert_eq!(read_all(data).await?, b"new c".to_vec());
    store.delete_object("photos", "greeting").await?;
    store.delete_object("photos", "greeting").await?;
    assert!(matches!(store.head_object("photos", "greeting").await, Err(Error::NoSuchKey)));
    let trimmed = store.collect_garbage().await?;
    assert!(trimmed >= 2, "trimmed {trimmed} extents");
    assert_eq!(store.collect_garbage().await?, 0, "garbage is trimmed once");

    // Multipart: parts in any order, a part uploaded again, limits, completion without
    // copying data, abort.
    let parts: Vec<Vec<u8>> = vec![random(6 << 20, 11), random(5 << 20, 12), random(1000, 13)];
    let up = store.create_upload(&alice, "photos", "multi", PutOptions { content_type: Some("video/mp4".into()), ..Default::default() }).await?;
    let mut etags = vec![String::new(); 3];
    for i in [2usize, 0, 1] {
        let n = i as u32 + 1;
        let p = store.upload_part("photos", "multi", &up.id, n, PutOptions::default(), body(&parts[i], 1 << 20)).await?;
        etags[i] = p.etag;
    }
    let first = store.upload_part("photos", "multi", &up.id, 2, PutOptions::default(), body(b"replaced later", 3)).await?;
    let again = store.upload_part("photos", "multi", &up.id, 2, PutOptions::default(), body(&parts[1], 1 << 20)).await?;
    assert_ne!(first.etag, again.etag);
    let (_, listed, more) = store.list_parts("photos", "multi", &up.id, 0, 2).await?;
    assert_eq!((listed.iter().map(|p| p.number).collect::<Vec<_>>(), more), (vec![1, 2], true));
    let (uploads, _) = store.list_uploads("photos", "mu", None, 100).await?;
    assert_eq!(uploads.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(), [up.id.as_str()]);
    let cp = |n: u32, etag: &str| basalt_s3gw::backend::CompletedPart { number: n, etag: format!("\"{etag}\"") };
    assert!(matches!(
        store.complete_upload("photos", "multi", &up.id, &[cp(1, &etags[0]), cp(2, "00")]).await,
        Err(Error::InvalidPart(2))
    ));
    assert!(matches!(
        store.complete_upload("photos", "multi", &up.id, &[cp(2, &etags[1]), cp(1, &etags[0])]).await,
        Err(Error::InvalidPartOrder)
    ));
    assert!(matches!(
        store.complete_upload("photos", "multi", &up.id, &[cp(1, &etags[0]), cp(4, &etags[2])]).await,
        Err(Error::InvalidPart(4))
    ));
    let done = store
        .complete_upload("photos", "multi", &up.id, &[cp(1, &etags[0]), cp(2, &etags[1]), cp(3, &etags[2])])
        .await?;
    assert!(done.etag.ends_with("-3"), "{}", done.etag);
    let whole: Vec<u8> = parts.concat();
    let (info, data) = store.get_object("photos", "multi", None).await?;
    assert_eq!((info.size, info.content_type.as_deref()), (whole.len() as u64, Some("video/mp4")));
    assert!(read_all(data).await? == whole, "the multipart object reads back");
    assert!(matches!(store.list_parts("photos", "multi", &up.id, 0, 10).await, Err(Error::NoSuchUpload)));
    let small = store.create_upload(&alice, "photos", "small-parts", PutOptions::default()).await?;
    let a = store.upload_part("photos", "small-parts", &small.id, 1, PutOptions::default(), body(b"tiny", 4)).await?;
    let b = store.upload_part("photos", "small-parts", &small.id, 2, PutOptions::default(), body(b"end", 3)).await?;
    assert!(matches!(
        store.complete_upload("photos", "small-parts", &small.id, &[cp(1, &a.etag), cp(2, &b.etag)]).await,
        Err(Error::EntityTooSmall(1))
    ));
    store.abort_upload("photos", "small-parts", &small.id).await?;
    assert!(matches!(store.abort_upload("photos", "small-parts", &small.id).await, Err(Error::NoSuchUpload)));
    assert!(matches!(
        store.upload_part("photos", "small-parts", &small.id, 3, PutOptions::default(), body(b"late", 4)).await,
        Err(Error::NoSuchUpload)
    ));
    assert!(store.list_uploads("photos", "", None, 100).await?.0.is_empty());
    assert!(store.collect_garbage().await? >= 3, "the replaced part, the aborted parts");

    // Versioning: a null version from before, versions, delete markers, suspension.
    store.create_bucket(&alice, "v", "basalt").await?;
    let put = |data: &'static [u8]| store.put_object("v", "k", PutOptions::default(), body(data, 3));
    assert_eq!(put(b"original").await?.version_id, None, "no version ids before versioning");
    store.set_versioning("v", Versioning::Enabled).await?;
    let v1 = put(b"first").await?.version_id.context("a version id")?;
    let v2 = put(b"second").await?.version_id.context("a version id")?;
    assert!(v1 != v2 && v1 != "null");
    let versions = |store: &Arc<ObjectStore>| {
        let store = store.clone();
        async move {
            let q = ListQuery { max_keys: 1000, ..Default::default() };
            let page = store.list_versions("v", &q, None, None).await?;
            anyhow::Ok(page.versions.iter().map(|v| (v.version_id.clone(), v.is_latest, v.delete_marker)).collect::<Vec<_>>())
        }
    };
    assert_eq!(
        versions(&store).await?,
        vec![(v2.clone(), true, false), (v1.clone(), false, false), ("null".into(), false, false)]
    );
    let (_, data) = store.get_version("v", "k", "null", None).await?;
    assert_eq!(read_all(data).await?, b"original".to_vec());
    let (_, data) = store.get_object("v", "k", None).await?;
    assert_eq!(read_all(data).await?, b"second".to_vec());
    let marker = store.delete_current("v", "k").await?;
    assert!(marker.delete_marker);
    assert!(matches!(store.head_object("v", "k").await, Err(Error::NoSuchKey)));
    assert!(store.list_objects("v", &ListQuery { max_keys: 10, ..Default::default() }).await?.objects.is_empty());
    let marker_id = marker.version_id.context("the marker's version")?;
    assert!(matches!(store.head_version("v", "k", &marker_id).await, Err(Error::MethodNotAllowed)));
    assert_eq!(versions(&store).await?.first(), Some(&(marker_id.clone(), true, true)));
    // Removing the marker brings the object back; removing a version forgets it.
    store.delete_version("v", "k", &marker_id).await?;
    let (_, data) = store.get_object("v", "k", None).await?;
    assert_eq!(read_all(data).await?, b"second".to_vec());
    store.delete_version("v", "k", &v1).await?;
    assert!(matches!(store.get_version("v", "k", &v1, None).await, Err(Error::NoSuchVersion)));
    // Suspended: writes replace the null version.
    store.set_versioning("v", Versioning::Suspended).await?;
    assert_eq!(put(b"null again").await?.version_id.as_deref(), Some("null"));
    assert_eq!(versions(&store).await?, vec![("null".into(), true, false), (v2.clone(), false, false)]);
    // Pages of one version, going on from the markers.
    let mut seen = Vec::new();
    let (mut km, mut vm) = (None::<String>, None::<String>);
    loop {
        let q = ListQuery { max_keys: 1, ..Default::default() };
        let page = store.list_versions("v", &q, km.as_deref(), vm.as_deref()).await?;
        seen.extend(page.versions.iter().map(|v| (v.version_id.clone(), v.is_latest)));
        match page.next {
            Some((k, v)) if page.truncated => (km, vm) = (Some(k), Some(v)),
            _ => break,
        }
    }
    assert_eq!(seen, vec![("null".into(), true), (v2.clone(), false)]);
    assert!(matches!(store.delete_bucket("v").await, Err(Error::BucketNotEmpty(_))));
    store.delete_version("v", "k", "null").await?;
    store.delete_version("v", "k", &v2).await?;
    assert!(matches!(store.head_object("v", "k").await, Err(Error::NoSuchKey)));
    store.delete_bucket("v").await?;

    // Quotas and usage: every version counts, deletes give room back.
    store.create_bucket(&alice, "q", "basalt").await?;
    store.set_quota("q", Quota { max_bytes: Some(10_000), max_objects: Some(3) }).await?;
    let sized = |n: usize| PutOptions { length: Some(n as u64), ..Default::default() };
    let blob = vec![7u8; 4000];
    store.put_object("q", "a", sized(4000), body(&blob, 1000)).await?;
    store.put_object("q", "b", sized(4000), body(&blob, 1000)).await?;
    assert!(matches!(store.put_object("q", "c", sized(4000), body(&blob, 1000)).await, Err(Error::QuotaExceeded)));
    assert!(matches!(store.put_object("q", "c", PutOptions::default(), body(&blob, 1000)).await, Err(Error::QuotaExceeded)));
    assert_eq!(store.usage("q").await?, Usage { bytes: 8000, objects: 2 });
    store.put_object("q", "c", sized(10), body(&blob[..10], 5)).await?;
    assert!(matches!(store.put_object("q", "d", sized(1), body(b"x", 1)).await, Err(Error::QuotaExceeded)));
    store.delete_object("q", "a").await?;
    assert_eq!(store.usage("q").await?, Usage { bytes: 4010, objects: 2 });
    store.put_object("q", "d", sized(1), body(b"x", 1)).await?;
    for k in ["b", "c", "d"] {
        store.delete_object("q", k).await?;
    }
    assert_eq!(store.usage("q").await?, Usage::default());
    store.delete_bucket("q").await?;

    // Lifecycle: expiration by prefix, noncurrent versions, lone delete markers, stale
    // uploads. A "day" is a millisecond here, and the pass runs as of a second from now.
    let mut quick = StoreConfig::new(1, "node1");
    quick.lifecycle_day = Duration::from_millis(1);
    let life = ObjectStore::new(c.client()?, quick);
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 + 1000;
    store.create_bucket(&alice, "life", "basalt").await?;
    for k in ["logs/1", "logs/2", "keep/1"] {
        store.put_object("life", k, PutOptions::default(), body(b"x", 1)).await?;
    }
    let stale = store.create_upload(&alice, "life", "logs/big", PutOptions::default()).await?;
    let rule = |prefix: &str| LifecycleRule { id: "r".into(), enabled: true, prefix: prefix.into(), ..Default::default() };
    life.set_lifecycle("life", vec![LifecycleRule { expiration_days: Some(1), abort_multipart_days: Some(1), ..rule("logs/") }]).await?;
    let report = life.run_lifecycle(later, |_| true).await?;
    assert_eq!((report.expired, report.uploads_aborted), (2, 1), "{report:?}");
    assert_eq!(listing(&store, "life", "", None, 100).await?, ["keep/1"]);
    assert!(matches!(store.list_parts("life", "logs/big", &stale.id, 0, 1).await, Err(Error::NoSuchUpload)));
    store.set_versioning("life", Versioning::Enabled).await?;
    store.put_object("life", "keep/1", PutOptions::default(), body(b"y", 1)).await?;
    store.delete_object("life", "keep/1").await?;
    life.set_lifecycle("life", vec![LifecycleRule { noncurrent_days: Some(1), expired_delete_markers: true, ..rule("") }]).await?;
    let report = life.run_lifecycle(later, |_| true).await?;
    assert_eq!((report.noncurrent_removed, report.markers_removed), (2, 1), "{report:?}");
    let q = ListQuery { max_keys: 100, ..Default::default() };
    assert!(store.list_versions("life", &q, None, None).await?.versions.is_empty());
    store.delete_bucket("life").await?;

    // A bucket is deleted only when empty.
    assert!(matches!(store.delete_bucket("photos").await, Err(Error::BucketNotEmpty(_))));
    store.put_object("photos", "after-refused-delete", PutOptions::default(), body(b"x", 1)).await?;
    for name in listing(&store, "photos", "", None, 1000).await? {
        store.delete_object("photos", &name).await?;
    }
    // An upload in progress does not keep a bucket alive; its parts go with it.
    let pending = store.create_upload(&alice, "photos", "pending", PutOptions::default()).await?;
    store.upload_part("photos", "pending", &pending.id, 1, PutOptions::default(), body(b"orphan?", 7)).await?;
    store.collect_garbage().await?;
    store.delete_bucket("photos").await?;
    assert_eq!(store.collect_garbage().await?, 1, "the pending upload's part is garbage once the bucket is gone");
    store.create_bucket(&alice, "photos", "basalt").await?;
    assert!(store.list_uploads("photos", "", None, 100).await?.0.is_empty(), "an upload outlived its bucket");
    store.delete_bucket("photos").await?;
    assert!(matches!(store.bucket("photos").await, Err(Error::NoSuchBucket(_))));
    assert!(matches!(
        store.put_object("photos", "k", PutOptions::default(), body(b"x", 1)).await,
        Err(Error::NoSuchBucket(_))
    ));
    c.passed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_fences_and_sweeps_what_its_dead_run_left() -> Result<()> {
    init_tracing();
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let mut cfg = StoreConfig::new(3, "node3");
    cfg.garbage_grace = Duration::ZERO;
    let first = ObjectStore::new(c.client()?, cfg.clone());
    let (alice, _) = first.create_account("alice").await?;
    first.create_bucket(&alice, "b", "basalt").await?;
    let kept = random(100_000, 1);
    first.put_object("b", "kept", PutOptions::default(), body(&kept, 10_000)).await?;

    // A run that dies in the middle of a PUT: its runtime goes away with the body half sent,
    // as a killed process would (no cleanup of any kind runs).
    let lost = random(5 << 20, 2);
    let dying = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let doomed = first.clone();
    let sent = body(&lost, 1 << 20).chain(futures::stream::pending());
    dying.spawn(async move { doomed.put_object("b", "lost", PutOptions::default(), Box::pin(sent)).await });
    // Its first 4 MiB piece lands right after "kept" (4 KiB-aligned, 100000 -> 102400).
    let reader = c.client()?.open_volume("s3data-node3", basalt_storaged_client::VolumeOptions::reader()).await?;
    let start = 102_400u64;
    let landed = wait_for("the dying PUT's first piece", Duration::from_secs(30), || {
        let reader = reader.clone();
        let want = lost[..4 << 20].to_vec();
        async move { Ok(reader.read(start, 4 << 20).await.ok().filter(|d| d[..] == want[..]).map(|_| ())) }
    })
    .await;
    // (A runtime may not be dropped inside another one: let it go in the background.)
    dying.shutdown_background();
    landed?;

    // The next run fences the old one: the first run's handle can no longer commit.
    let second = ObjectStore::new(c.client()?, cfg);
    second.put_object("b", "new", PutOptions::default(), body(b"after restart", 4)).await?;
    let refused = first.put_object("b", "stale", PutOptions::default(), body(b"from the old run", 4)).await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");

    // Its first collection sweeps the dead run's unreferenced space, and only that.
    second.collect_garbage().await?;
    let after = reader.read(start, 4 << 20).await?;
    assert!(after.iter().all(|&b| b == 0), "the orphaned piece is trimmed");
    let (_, data) = second.get_object("b", "kept", None).await?;
    assert!(read_all(data).await? == kept, "referenced data survives the sweep");
    let (_, data) = second.get_object("b", "new", None).await?;
    assert_eq!(read_all(data).await?, b"after restart".to_vec());
    assert!(matches!(second.head_object("b", "lost").await, Err(Error::NoSuchKey)));
    assert!(matches!(second.head_object("b", "stale").await, Err(Error::NoSuchKey)));
    c.passed()
}
