//! The S3 gateway over HTTP on loopback, driven with real SigV4-signed requests against
//! `MemBackend`.

mod common;

use common::{request_head, md5_b64, md5_hex, xml_values, Auth, Gateway, Payload};
use std::time::{Duration, SystemTime};

#[tokio::test]
async fn bucket_lifecycle_and_ownership() {
    let gw = Gateway::start().await;
    let (alice, bob) = (gw.alice(), gw.bob());

    alice.create_bucket("photos").await.expect_status(200);
    alice.create_bucket("photos").await.expect_error(409, "BucketAlreadyOwnedByYou");
    bob.create_bucket("photos").await.expect_error(409, "BucketAlreadyExists");
    bob.create_bucket("bobs-bucket").await.expect_status(200);

    let list = alice.request("GET", "/").send().await;
    list.expect_status(200);
    assert_eq!(xml_values(&list.text(), "Name"), vec!["photos".to_owned()]);
    assert_eq!(xml_values(&list.text(), "ID"), vec!["id-alice".to_owned()]);

    alice.request("HEAD", "/photos").send().await.expect_status(200);
    bob.request("HEAD", "/photos").send().await.expect_status(403);
    alice.request("HEAD", "/nothing-here").send().await.expect_status(404);

    let loc = alice.request("GET", "/photos").query("location", "").send().await;
    loc.expect_status(200);
    assert!(loc.text().contains(common::REGION), "{}", loc.text());

    alice.put_object("photos", "cat.jpg", b"meow").await.expect_status(200);
    alice.request("DELETE", "/photos").send().await.expect_error(409, "BucketNotEmpty");
    bob.request("DELETE", "/photos").send().await.expect_error(403, "AccessDenied");
    alice.request("DELETE", "/photos/cat.jpg").send().await.expect_status(204);
    alice.request("DELETE", "/photos").send().await.expect_status(204);
    alice.request("HEAD", "/photos").send().await.expect_status(404);
    alice.request("GET", "/photos").send().await.expect_error(404, "NoSuchBucket");

    // Names S3 refuses.
    for bad in ["ab", "Upper-Case", "192.168.0.1", "a..b", "-dash"] {
        let r = alice.create_bucket(bad).await;
        r.expect_error(400, "InvalidBucketName");
    }
    // A location constraint for another region.
    let body = "<CreateBucketConfiguration><LocationConstraint>eu-west-3</LocationConstraint></CreateBucketConfiguration>";
    alice.request("PUT", "/elsewhere").body(body).send().await.expect_error(400, "InvalidLocationConstraint");
    let body = format!("<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>", common::REGION);
    alice.request("PUT", "/here").body(body).send().await.expect_status(200);
    gw.stop().await;
}

#[tokio::test]
async fn objects_round_trip_with_metadata() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("docs").await.expect_status(200);
    let data = vec![7u8; 300_000];
    let put = alice
        .request("PUT", "/docs/report.pdf")
        .header("content-type", "application/pdf")
        .header("x-amz-meta-author", "Ada")
        .header("x-amz-meta-Project", "basalt")
        .header("cache-control", "max-age=60")
        .header("content-disposition", "attachment; filename=\"r.pdf\"")
        .header("content-encoding", "identity")
        .header("content-language", "en")
        .header("expires", "Wed, 21 Oct 2037 07:28:00 GMT")
        .header("content-md5", &md5_b64(&data))
        .body(data.clone())
        .send()
        .await;
    put.expect_status(200);
    let etag = format!("\"{}\"", md5_hex(&data));
    assert_eq!(put.header("etag"), Some(etag.clone()));

    for method in ["GET", "HEAD"] {
        let r = alice.request(method, "/docs/report.pdf").send().await;
        r.expect_status(200);
        assert_eq!(r.header("etag"), Some(etag.clone()));
        assert_eq!(r.header("content-type").as_deref(), Some("application/pdf"));
        assert_eq!(r.header("content-length").as_deref(), Some("300000"));
        assert_eq!(r.header("x-amz-meta-author").as_deref(), Some("Ada"));
        assert_eq!(r.header("x-amz-meta-project").as_deref(), Some("basalt"));
        assert_eq!(r.header("cache-control").as_deref(), Some("max-age=60"));
        assert_eq!(r.header("content-disposition").as_deref(), Some("attachment; filename=\"r.pdf\""));
        assert_eq!(r.header("content-encoding").as_deref(), Some("identity"));
        assert_eq!(r.header("content-language").as_deref(), Some("en"));
        assert_eq!(r.header("expires").as_deref(), Some("Wed, 21 Oct 2037 07:28:00 GMT"));
        assert!(r.header("last-modified").is_some());
        if method == "GET" {
            assert_eq!(r.body.as_ref(), data.as_slice());
        } else {
            assert!(r.body.is_empty());
        }
    }
    // response-* overrides.
    let r = alice.request("GET", "/docs/report.pdf").query("response-content-type", "text/plain").send().await;
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));

    // An empty object, stored without a type.
    alice.put_object("docs", "empty", b"").await.expect_status(200);
    let r = alice.get_object("docs", "empty").await;
    r.expect_status(200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-type").as_deref(), Some("binary/octet-stream"));
    assert_eq!(r.header("x-amz-request-id").map(|id| id.len()), Some(16));

    alice.request("DELETE", "/docs/report.pdf").send().await.expect_status(204);
    alice.request("DELETE", "/docs/report.pdf").send().await.expect_status(204);
    alice.get_object("docs", "report.pdf").await.expect_error(404, "NoSuchKey");
    alice.request("HEAD", "/docs/report.pdf").send().await.expect_status(404);
    gw.stop().await;
}

#[tokio::test]
async fn ranged_reads() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("ranges").await.expect_status(200);
    alice.put_object("ranges", "digits", b"0123456789").await.expect_status(200);
    let get = |range: &'static str| alice.request("GET", "/ranges/digits").header("range", range).send();

    let r = get("bytes=2-4").await;
    r.expect_status(206);
    assert_eq!(r.body.as_ref(), b"234");
    assert_eq!(r.header("content-range").as_deref(), Some("bytes 2-4/10"));
    assert_eq!(r.header("content-length").as_deref(), Some("3"));
    let r = get("bytes=-3").await;
    r.expect_status(206);
    assert_eq!(r.body.as_ref(), b"789");
    let r = get("bytes=7-").await;
    r.expect_status(206);
    assert_eq!(r.body.as_ref(), b"789");
    let r = get("bytes=8-100").await;
    assert_eq!(r.body.as_ref(), b"89");
    assert_eq!(r.header("content-range").as_deref(), Some("bytes 8-9/10"));
    let r = get("bytes=-100").await;
    assert_eq!(r.body.as_ref(), b"0123456789");
    let r = get("bytes=10-20").await;
    r.expect_error(416, "InvalidRange");
    assert_eq!(r.header("content-range").as_deref(), Some("bytes */10"));
    // Unparsable ranges are a client error, never a server one.
    for bad in ["bytes=abc", "bytes=5-2", "lines=1-2", "bytes=1-2,4-5"] {
        let r = get(bad).await;
        assert!((400..500).contains(&r.status) || r.status == 200, "{bad}: {} {}", r.status, r.text());
    }
    let r = alice.request("HEAD", "/ranges/digits").header("range", "bytes=0-0").send().await;
    r.expect_status(206);
    assert_eq!(r.header("content-length").as_deref(), Some("1"));
    gw.stop().await;
}

#[tokio::test]
async fn conditional_reads() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("cond").await.expect_status(200);
    let put = alice.put_object("cond", "k", b"v1").await;
    let etag = put.header("etag").expect("etag");
    let past = "Mon, 01 Jan 2001 00:00:00 GMT";
    let future = "Fri, 01 Jan 2100 00:00:00 GMT";

    for method in ["GET", "HEAD"] {
        let req = || alice.request(method, "/cond/k");
        req().header("if-match", &etag).send().await.expect_status(200);
        req().header("if-match", "\"nope\"").send().await.expect_status(412);
        req().header("if-match", "*").send().await.expect_status(200);
        let r = req().header("if-none-match", &etag).send().await;
        r.expect_status(304);
        assert_eq!(r.header("etag"), Some(etag.clone()));
        assert!(r.body.is_empty());
        req().header("if-none-match", "\"other\"").send().await.expect_status(200);
        req().header("if-modified-since", future).send().await.expect_status(304);
        req().header("if-modified-since", past).send().await.expect_status(200);
        req().header("if-unmodified-since", past).send().await.expect_status(412);
        req().header("if-unmodified-since", future).send().await.expect_status(200);
        // If-Match holds, so a failing If-Unmodified-Since does not count.
        req().header("if-match", &etag).header("if-unmodified-since", past).send().await.expect_status(200);
        // If-None-Match fails (the tag matches), If-Modified-Since holds: 304.
        req().header("if-none-match", &etag).header("if-modified-since", past).send().await.expect_status(304);
        // 412 wins over 304.
        req().header("if-match", "\"nope\"").header("if-none-match", &etag).send().await.expect_status(412);
    }
    let r = alice.request("GET", "/cond/k").header("if-match", "\"nope\"").send().await;
    r.expect_error(412, "PreconditionFailed");
    gw.stop().await;
}

#[tokio::test]
async fn digests_and_checksums() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("sums").await.expect_status(200);

    let r = alice.request("PUT", "/sums/a").header("content-md5", &md5_b64(b"other")).body("data").send().await;
    r.expect_error(400, "BadDigest");
    let r = alice.request("PUT", "/sums/a").header("content-md5", "not base64!").body("data").send().await;
    r.expect_error(400, "InvalidDigest");
    assert_eq!(gw.backend.object_count("sums"), 0);

    // CRC32("hello world") = 0x0d4a1185 → "DUoRhQ==".
    let r = alice.request("PUT", "/sums/crc").header("x-amz-checksum-crc32", "DUoRhQ==").body("hello world").send().await;
    r.expect_status(200);
    assert_eq!(r.header("x-amz-checksum-crc32").as_deref(), Some("DUoRhQ=="));
    let r = alice.request("PUT", "/sums/bad").header("x-amz-checksum-crc32", "AAAAAA==").body("hello world").send().await;
    r.expect_error(400, "BadDigest");
    assert_eq!(gw.backend.object_count("sums"), 1);

    let r = alice.request("GET", "/sums/crc").header("x-amz-checksum-mode", "ENABLED").send().await;
    assert_eq!(r.header("x-amz-checksum-crc32").as_deref(), Some("DUoRhQ=="));
    let r = alice.request("HEAD", "/sums/crc").header("x-amz-checksum-mode", "ENABLED").send().await;
    assert_eq!(r.header("x-amz-checksum-crc32").as_deref(), Some("DUoRhQ=="));
    let r = alice.request("GET", "/sums/crc").send().await;
    assert_eq!(r.header("x-amz-checksum-crc32"), None);

    // Only the algorithm named: the gateway computes it. SHA-256("abc").
    let r = alice.request("PUT", "/sums/sha").header("x-amz-sdk-checksum-algorithm", "SHA256").body("abc").send().await;
    r.expect_status(200);
    assert_eq!(r.header("x-amz-checksum-sha256").as_deref(), Some("ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="));

    // A body that does not hash to the signed x-amz-content-sha256.
    let r = alice
        .request("PUT", "/sums/tampered")
        .payload(Payload::Signed(bytes::Bytes::from_static(b"what was signed")))
        .body("what was sent!!")
        .send()
        .await;
    r.expect_error(400, "XAmzContentSHA256Mismatch");
    // The same for the bodies `s3s` reads whole (it answered those 500), and nothing is done.
    let delete = "<Delete><Object><Key>crc</Key></Object></Delete>";
    let tampered: [(&str, &str, &'static [u8], &str); 2] = [
        ("POST", "/sums?delete", b"<Delete><Object><Key>sha</Key></Object></Delete>", delete),
        (
            "PUT",
            "/sums/crc?tagging",
            b"<Tagging><TagSet></TagSet></Tagging>",
            "<Tagging><TagSet><Tag><Key>k</Key><Value>v</Value></Tag></TagSet></Tagging>",
        ),
    ];
    for (method, path, signed, sent) in tampered {
        let r = alice.request(method, path).payload(Payload::Signed(bytes::Bytes::from_static(signed))).body(sent).send().await;
        r.expect_error(400, "XAmzContentSHA256Mismatch");
    }
    let r = alice.request("GET", "/sums/crc?tagging").send().await;
    r.expect_status(200);
    assert!(!String::from_utf8_lossy(&r.body).contains("<Key>k</Key>"), "tags were set");
    assert_eq!(gw.backend.object_count("sums"), 2);
    // Signed right, they are done.
    let r = alice.request("POST", "/sums?delete").body(delete).send().await;
    r.expect_status(200);
    assert_eq!(gw.backend.object_count("sums"), 1);
    // Unsigned payloads are accepted as such.
    alice.request("PUT", "/sums/unsigned").payload(Payload::Unsigned).body("free").send().await.expect_status(200);
    assert_eq!(alice.get_object("sums", "unsigned").await.body.as_ref(), b"free");
    assert_eq!(gw.backend.object_count("sums"), 2);
    gw.stop().await;
}

#[tokio::test]
async fn signatures_are_checked() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("sig").await.expect_status(200);
    alice.put_object("sig", "k", b"secret stuff").await.expect_status(200);

    gw.client("AKALICE", "wrong-secret").get_object("sig", "k").await.expect_error(403, "SignatureDoesNotMatch");
    gw.client("AKNOBODY", "x").get_object("sig", "k").await.expect_error(403, "InvalidAccessKeyId");
    alice.request("GET", "/sig/k").tamper_signature().send().await.expect_error(403, "SignatureDoesNotMatch");
    alice.request("GET", "/sig/k").auth(Auth::Anonymous).send().await.expect_error(403, "AccessDenied");
    alice.request("GET", "/").auth(Auth::Anonymous).send().await.expect_error(403, "AccessDenied");

    // 20 minutes off is beyond the 15 minutes S3 allows, either way.
    let skewed = SystemTime::now() - Duration::from_secs(20 * 60);
    alice.request("GET", "/sig/k").at(skewed).send().await.expect_error(403, "RequestTimeTooSkewed");
    let ahead = SystemTime::now() + Duration::from_secs(20 * 60);
    alice.request("GET", "/sig/k").at(ahead).send().await.expect_error(403, "RequestTimeTooSkewed");
    let close = SystemTime::now() - Duration::from_secs(5 * 60);
    alice.request("GET", "/sig/k").at(close).send().await.expect_status(200);

    // A removed key stops working at once.
    gw.backend.remove_key("AKALICE");
    alice.get_object("sig", "k").await.expect_error(403, "InvalidAccessKeyId");
    gw.stop().await;
}

#[tokio::test]
async fn presigned_urls_expire() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("pre").await.expect_status(200);
    alice.put_object("pre", "k", b"shared").await.expect_status(200);

    let r = alice.request("GET", "/pre/k").auth(Auth::Presign(Duration::from_secs(60))).send().await;
    r.expect_status(200);
    assert_eq!(r.body.as_ref(), b"shared");
    // Signed two minutes ago for one minute.
    let r = alice
        .request("GET", "/pre/k")
        .auth(Auth::Presign(Duration::from_secs(60)))
        .at(SystemTime::now() - Duration::from_secs(120))
        .send()
        .await;
    r.expect_error(403, "AccessDenied");
    assert!(r.text().contains("expired"), "{}", r.text());
    let r = alice.request("GET", "/pre/k").auth(Auth::Presign(Duration::from_secs(60))).tamper_signature().send().await;
    r.expect_error(403, "SignatureDoesNotMatch");
    // A presigned PUT.
    let r = alice.request("PUT", "/pre/up").auth(Auth::Presign(Duration::from_secs(60))).body("uploaded").send().await;
    r.expect_status(200);
    assert_eq!(alice.get_object("pre", "up").await.body.as_ref(), b"uploaded");
    gw.stop().await;
}

#[tokio::test]
async fn signed_aws_chunked_uploads() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("chunks").await.expect_status(200);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();

    let r = alice.request("PUT", "/chunks/big").send_chunked(&data, 64 * 1024, false).await;
    r.expect_status(200);
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", md5_hex(&data))));
    let got = alice.get_object("chunks", "big").await;
    assert_eq!(got.body.as_ref(), data.as_slice());

    let r = alice.request("PUT", "/chunks/corrupt").send_chunked(&data, 64 * 1024, true).await;
    r.expect_error(403, "SignatureDoesNotMatch");
    assert_eq!(gw.backend.object_count("chunks"), 1);

    // Unsigned chunks with a trailing checksum. CRC32("hello world") = "DUoRhQ==".
    let r = alice.request("PUT", "/chunks/trailer").send_unsigned_trailer(b"hello world", 4, "DUoRhQ==").await;
    r.expect_status(200);
    assert_eq!(r.header("x-amz-checksum-crc32").as_deref(), Some("DUoRhQ=="));
    assert_eq!(alice.get_object("chunks", "trailer").await.body.as_ref(), b"hello world");
    let r = alice.request("PUT", "/chunks/bad-trailer").send_unsigned_trailer(b"hello world", 4, "AAAAAA==").await;
    r.expect_error(400, "XAmzContentChecksumMismatch");
    assert_eq!(gw.backend.object_count("chunks"), 2);
    gw.stop().await;
}

#[tokio::test]
async fn listing_300_keys_with_delimiter_and_pages() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("many").await.expect_status(200);
    let mut keys = Vec::new();
    for d in 0..3 {
        for i in 0..90 {
            keys.push(format!("dir{d}/file{i:03}"));
        }
    }
    for i in 0..30 {
        keys.push(format!("top{i:02}"));
    }
    for k in &keys {
        alice.put_object("many", k, k.as_bytes()).await.expect_status(200);
    }
    keys.sort();

    // Everything, 100 at a time.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut req = alice.request("GET", "/many").query("list-type", "2").query("max-keys", "100");
        if let Some(t) = &token {
            req = req.query("continuation-token", t);
        }
        let r = req.send().await;
        r.expect_status(200);
        let text = r.text();
        let page = xml_values(&text, "Key");
        assert_eq!(xml_values(&text, "KeyCount"), vec![page.len().to_string()]);
        seen.extend(page);
        pages += 1;
        match xml_values(&text, "IsTruncated").first().map(String::as_str) {
            Some("true") => token = xml_values(&text, "NextContinuationToken").into_iter().next(),
            _ => break,
        }
        assert!(token.is_some());
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, keys);

    // With a delimiter: 3 common prefixes and 30 keys, in pages of 10.
    let mut prefixes = Vec::new();
    let mut top = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut req =
            alice.request("GET", "/many").query("list-type", "2").query("delimiter", "/").query("max-keys", "10");
        if let Some(t) = &token {
            req = req.query("continuation-token", t);
        }
        let text = req.send().await.text();
        prefixes.extend(xml_values(&text, "Prefix").into_iter().filter(|p| !p.is_empty()));
        top.extend(xml_values(&text, "Key"));
        match xml_values(&text, "IsTruncated").first().map(String::as_str) {
            Some("true") => token = xml_values(&text, "NextContinuationToken").into_iter().next(),
            _ => break,
        }
    }
    assert_eq!(prefixes, vec!["dir0/", "dir1/", "dir2/"]);
    assert_eq!(top.len(), 30);

    // A prefix, start-after and fetch-owner.
    let text = alice
        .request("GET", "/many")
        .query("list-type", "2")
        .query("prefix", "dir1/")
        .query("start-after", "dir1/file087")
        .query("fetch-owner", "true")
        .send()
        .await
        .text();
    assert_eq!(xml_values(&text, "Key"), vec!["dir1/file088", "dir1/file089"]);
    assert_eq!(xml_values(&text, "ID"), vec!["id-alice", "id-alice"]);
    assert_eq!(xml_values(&text, "ETag")[0], format!("\"{}\"", md5_hex(b"dir1/file088")));

    // ListObjects v1 with markers.
    let text = alice.request("GET", "/many").query("delimiter", "/").query("max-keys", "2").send().await.text();
    assert_eq!(xml_values(&text, "IsTruncated"), vec!["true"]);
    assert_eq!(xml_values(&text, "NextMarker"), vec!["dir1/"]);
    let text = alice
        .request("GET", "/many")
        .query("delimiter", "/")
        .query("marker", "dir1/")
        .query("max-keys", "2")
        .send()
        .await
        .text();
    assert_eq!(xml_values(&text, "Prefix").into_iter().filter(|p| !p.is_empty()).collect::<Vec<_>>(), vec!["dir2/"]);
    assert_eq!(xml_values(&text, "Key"), vec!["top00"]);
    let text = alice.request("GET", "/many").query("prefix", "top2").query("max-keys", "1000").send().await.text();
    assert_eq!(xml_values(&text, "Key").len(), 10);
    assert_eq!(xml_values(&text, "IsTruncated"), vec!["false"]);

    // Bad arguments.
    alice.request("GET", "/many").query("list-type", "2").query("continuation-token", "!!!").send().await.expect_status(400);
    alice.request("GET", "/many").query("max-keys", "-1").send().await.expect_status(400);
    alice.request("GET", "/many").query("encoding-type", "base64").send().await.expect_status(400);
    gw.stop().await;
}

#[tokio::test]
async fn url_encoded_listings() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("enc").await.expect_status(200);
    for k in ["a b/c+d", "ü/x", "plain"] {
        alice.put_object("enc", k, b"x").await.expect_status(200);
    }
    let text = alice.request("GET", "/enc").query("list-type", "2").query("encoding-type", "url").send().await.text();
    assert_eq!(xml_values(&text, "Key"), vec!["a%20b/c%2Bd", "plain", "%C3%BC/x"]);
    assert_eq!(xml_values(&text, "EncodingType"), vec!["url"]);
    let text =
        alice.request("GET", "/enc").query("list-type", "2").query("delimiter", "/").query("encoding-type", "url").send().await.text();
    assert_eq!(xml_values(&text, "Prefix").into_iter().filter(|p| !p.is_empty()).collect::<Vec<_>>(), vec!["a%20b/", "%C3%BC/"]);
    gw.stop().await;
}

#[tokio::test]
async fn other_accounts_are_denied() {
    let gw = Gateway::start().await;
    let (alice, bob) = (gw.alice(), gw.bob());
    alice.create_bucket("private").await.expect_status(200);
    alice.put_object("private", "k", b"mine").await.expect_status(200);
    bob.create_bucket("bobs").await.expect_status(200);

    bob.get_object("private", "k").await.expect_error(403, "AccessDenied");
    bob.request("HEAD", "/private/k").send().await.expect_status(403);
    bob.put_object("private", "k2", b"x").await.expect_error(403, "AccessDenied");
    bob.request("DELETE", "/private/k").send().await.expect_error(403, "AccessDenied");
    bob.request("GET", "/private").query("list-type", "2").send().await.expect_error(403, "AccessDenied");
    bob.request("GET", "/private").query("location", "").send().await.expect_error(403, "AccessDenied");
    // Copying out of someone else's bucket, or into it.
    bob.request("PUT", "/bobs/stolen").header("x-amz-copy-source", "/private/k").send().await.expect_error(403, "AccessDenied");
    alice.request("PUT", "/bobs/gift").header("x-amz-copy-source", "/private/k").send().await.expect_error(403, "AccessDenied");
    let list = bob.request("GET", "/").send().await;
    assert_eq!(xml_values(&list.text(), "Name"), vec!["bobs".to_owned()]);
    // x-amz-expected-bucket-owner guards against writing into the wrong account's bucket.
    let r = alice.request("PUT", "/private/guarded").header("x-amz-expected-bucket-owner", "id-bob").body("x").send().await;
    r.expect_error(403, "AccessDenied");
    let r = alice.request("PUT", "/private/guarded").header("x-amz-expected-bucket-owner", "id-alice").body("x").send().await;
    r.expect_status(200);
    alice.request("DELETE", "/private/guarded").send().await.expect_status(204);
    assert_eq!(gw.backend.object_count("private"), 1);
    assert_eq!(gw.backend.object_count("bobs"), 0);
    gw.stop().await;
}

#[tokio::test]
async fn copies_within_and_between_buckets() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("src").await.expect_status(200);
    alice.create_bucket("dst").await.expect_status(200);
    let data = vec![42u8; 150_000];
    let put = alice
        .request("PUT", "/src/orig")
        .header("content-type", "image/png")
        .header("x-amz-meta-color", "red")
        .header("x-amz-checksum-crc32c", "placeholder")
        .body(data.clone())
        .send()
        .await;
    // The placeholder checksum is wrong: refused.
    put.expect_error(400, "BadDigest");
    let put = alice
        .request("PUT", "/src/orig")
        .header("content-type", "image/png")
        .header("x-amz-meta-color", "red")
        .header("x-amz-sdk-checksum-algorithm", "SHA1")
        .body(data.clone())
        .send()
        .await;
    put.expect_status(200);
    let etag = put.header("etag").expect("etag");

    // COPY keeps the metadata.
    let r = alice.request("PUT", "/dst/copy").header("x-amz-copy-source", "/src/orig").send().await;
    r.expect_status(200);
    assert_eq!(xml_values(&r.text(), "ETag"), vec![etag.clone()]);
    let got = alice.get_object("dst", "copy").await;
    assert_eq!(got.body.as_ref(), data.as_slice());
    assert_eq!(got.header("content-type").as_deref(), Some("image/png"));
    assert_eq!(got.header("x-amz-meta-color").as_deref(), Some("red"));

    // REPLACE takes the request's metadata; the source may be URL-encoded.
    let r = alice
        .request("PUT", "/src/replaced")
        .header("x-amz-copy-source", "src/%6Frig")
        .header("x-amz-metadata-directive", "REPLACE")
        .header("content-type", "text/plain")
        .header("x-amz-meta-shape", "round")
        .send()
        .await;
    r.expect_status(200);
    let got = alice.request("HEAD", "/src/replaced").send().await;
    assert_eq!(got.header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(got.header("x-amz-meta-shape").as_deref(), Some("round"));
    assert_eq!(got.header("x-amz-meta-color"), None);

    // Copy-source conditions.
    let copy = |cond: &'static str, value: String| {
        alice.request("PUT", "/dst/cond").header("x-amz-copy-source", "/src/orig").header(cond, &value).send()
    };
    copy("x-amz-copy-source-if-match", etag.clone()).await.expect_status(200);
    copy("x-amz-copy-source-if-match", "\"nope\"".into()).await.expect_error(412, "PreconditionFailed");
    copy("x-amz-copy-source-if-none-match", etag.clone()).await.expect_error(412, "PreconditionFailed");
    copy("x-amz-copy-source-if-unmodified-since", "Mon, 01 Jan 2001 00:00:00 GMT".into())
        .await
        .expect_error(412, "PreconditionFailed");
    copy("x-amz-copy-source-if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT".into())
        .await
        .expect_error(412, "PreconditionFailed");

    // Onto itself without changes is refused; with REPLACE it is fine.
    alice.request("PUT", "/src/orig").header("x-amz-copy-source", "/src/orig").send().await.expect_error(400, "InvalidRequest");
    alice
        .request("PUT", "/src/orig")
        .header("x-amz-copy-source", "/src/orig")
        .header("x-amz-metadata-directive", "REPLACE")
        .send()
        .await
        .expect_status(200);
    alice.request("PUT", "/dst/x").header("x-amz-copy-source", "/src/missing").send().await.expect_error(404, "NoSuchKey");
    alice.request("PUT", "/dst/x").header("x-amz-copy-source", "/nobucket/k").send().await.expect_error(404, "NoSuchBucket");
    gw.stop().await;
}

#[tokio::test]
async fn batch_deletes() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("batch").await.expect_status(200);
    for k in ["a", "b", "c"] {
        alice.put_object("batch", k, b"x").await.expect_status(200);
    }
    let xml = |quiet: bool, keys: &[&str]| {
        let objects: String = keys.iter().map(|k| format!("<Object><Key>{k}</Key></Object>")).collect();
        format!("<Delete><Quiet>{quiet}</Quiet>{objects}</Delete>")
    };
    let body = xml(false, &["a", "missing"]);
    let r = alice.request("POST", "/batch").query("delete", "").header("content-md5", &md5_b64(body.as_bytes())).body(body).send().await;
    r.expect_status(200);
    assert_eq!(xml_values(&r.text(), "Key"), vec!["a", "missing"]);
    let body = xml(true, &["b", &"k".repeat(1025)]);
    let r = alice.request("POST", "/batch").query("delete", "").body(body).send().await;
    r.expect_status(200);
    // Quiet: only the failure is listed.
    assert_eq!(xml_values(&r.text(), "Code"), vec!["KeyTooLongError"]);
    assert!(xml_values(&r.text(), "Deleted").is_empty());
    assert_eq!(gw.backend.object_count("batch"), 1);

    for bad in ["<Delete><Object><Key>c</Key>", "not xml at all", "<Delete></Delete>"] {
        let r = alice.request("POST", "/batch").query("delete", "").body(bad).send().await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.code().as_deref(), Some("MalformedXML"), "{bad}: {}", r.text());
    }
    let too_many: Vec<String> = (0..1001).map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    alice.request("POST", "/batch").query("delete", "").body(xml(false, &refs)).send().await.expect_error(400, "MalformedXML");
    assert_eq!(gw.backend.object_count("batch"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn odd_keys_and_bad_input_get_s3_errors() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("odd").await.expect_status(200);
    for key in ["../../etc/passwd", "a/../b", "ünïcødé/ключ/鍵", "with space", "plus+sign", "q?mark", "hash#tag", "a//b", "trailing/"] {
        alice.put_object("odd", key, key.as_bytes()).await.expect_status(200);
        let r = alice.get_object("odd", key).await;
        r.expect_status(200);
        assert_eq!(r.body.as_ref(), key.as_bytes(), "{key}");
    }
    let text = alice.request("GET", "/odd").query("list-type", "2").send().await.text();
    assert!(xml_values(&text, "Key").contains(&"../../etc/passwd".to_owned()));

    let long = "k".repeat(1025);
    alice.put_object("odd", &long, b"x").await.expect_error(400, "KeyTooLongError");
    alice.put_object("odd", &"k".repeat(1024), b"x").await.expect_status(200);
    // An encoded slash in the path: a key with a slash, or an error, but an S3 answer.
    let r = alice.request("PUT", "/odd/a%2Fb").body("slash").send().await;
    assert!(r.status == 200 || r.code().is_some(), "{} {}", r.status, r.text());
    let r = alice.request("PUT", "/odd/bad%ZZescape").body("x").send().await;
    assert!((400..500).contains(&r.status), "{} {}", r.status, r.text());
    // Metadata beyond 2 KiB.
    let r = alice.request("PUT", "/odd/meta").header("x-amz-meta-big", &"v".repeat(2100)).body("x").send().await;
    r.expect_error(400, "MetadataTooLarge");
    // Unsupported features are refused, not ignored.
    alice.request("GET", "/odd/plus+sign").query("versionId", "v1").send().await.expect_error(501, "NotImplemented");
    // ACLs are off, as on S3 buckets with "bucket owner enforced" ownership.
    let r = alice.request("PUT", "/odd/x").header("x-amz-acl", "public-read").body("x").send().await;
    r.expect_error(400, "AccessControlListNotSupported");
    // The server is still there.
    alice.request("GET", "/").send().await.expect_status(200);
    gw.stop().await;
}

#[tokio::test]
async fn virtual_hosted_style_addressing() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("vhost").await.expect_status(200);
    let port = gw.addr.port();
    let r = alice.request("PUT", "/dir/obj").host(&format!("vhost.localhost:{port}")).body("via host").send().await;
    r.expect_status(200);
    assert_eq!(alice.get_object("vhost", "dir/obj").await.body.as_ref(), b"via host");
    let r = alice.request("GET", "/").host(&format!("vhost.s3.basalt.test:{port}")).query("list-type", "2").send().await;
    r.expect_status(200);
    assert_eq!(xml_values(&r.text(), "Key"), vec!["dir/obj"]);
    // The bare domain is path-style.
    let r = alice.request("GET", "/vhost/dir/obj").host(&format!("localhost:{port}")).send().await;
    assert_eq!(r.body.as_ref(), b"via host");
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("drain").await.expect_status(200);
    let addr = gw.addr;
    gw.stop().await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the listener is closed after shutdown");
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("drain").await.expect_status(200);
    let (req, _) = alice
        .request("PUT", "/drain/slow")
        .header("content-length", "10")
        .payload(Payload::Unsigned)
        .body("0123456789")
        .build();
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    conn.write_all(&request_head(&req)).await.expect("head");
    conn.write_all(b"01234").await.expect("first half");
    // Wait until the backend is reading the body.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while gw.backend.puts_in_progress() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the PUT reaches the backend");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.begin_stop();
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the listener closes on shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!gw.stopped(), "the server waits for the request in flight");
    conn.write_all(b"56789").await.expect("second half");
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.expect("response, then close");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(gw.backend.object_count("drain"), 1);
    gw.stop().await;
}

// ---- multipart uploads ----

fn complete_xml(parts: &[(u32, &str)]) -> String {
    let parts: String =
        parts.iter().map(|(n, etag)| format!("<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>")).collect();
    format!("<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>")
}

async fn create_upload(client: &common::Client, bucket: &str, key: &str) -> String {
    let r = client.request("POST", &format!("/{bucket}/{key}")).query("uploads", "").send().await;
    r.expect_status(200);
    let ids = xml_values(&r.text(), "UploadId");
    assert_eq!(ids.len(), 1, "{}", r.text());
    ids[0].clone()
}

async fn upload_part(client: &common::Client, bucket: &str, key: &str, id: &str, n: u32, data: &[u8]) -> String {
    let r = client
        .request("PUT", &format!("/{bucket}/{key}"))
        .query("partNumber", &n.to_string())
        .query("uploadId", id)
        .body(data.to_vec())
        .send()
        .await;
    r.expect_status(200);
    let etag = r.header("etag").expect("a part's ETag");
    assert_eq!(etag, format!("\"{}\"", md5_hex(data)));
    etag
}

/// S3's ETag of a multipart object: the MD5 of the parts' MD5s, then `-` and their count.
fn multipart_etag(parts: &[&[u8]]) -> String {
    use md5::Digest;
    let mut all = md5::Md5::new();
    for p in parts {
        all.update(md5::Md5::digest(p));
    }
    let hex: String = all.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}-{}\"", parts.len())
}

fn common_prefixes(xml: &str) -> Vec<String> {
    xml_values(xml, "CommonPrefixes").iter().flat_map(|c| xml_values(c, "Prefix")).collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test]
async fn multipart_uploads_complete_into_one_object() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("mpu").await.expect_status(200);
    let r = alice
        .request("POST", "/mpu/video.mp4")
        .query("uploads", "")
        .header("content-type", "video/mp4")
        .header("x-amz-meta-camera", "front")
        .header("cache-control", "no-cache")
        .send()
        .await;
    r.expect_status(200);
    let id = xml_values(&r.text(), "UploadId").pop().expect("an upload id");
    assert_eq!(xml_values(&r.text(), "Key"), vec!["video.mp4".to_owned()]);
    assert_eq!(xml_values(&r.text(), "Bucket"), vec!["mpu".to_owned()]);

    let parts = [pattern(5 << 20, 1), pattern(5 << 20, 2), pattern(1000, 3)];
    // Out of order, and part 2 uploaded twice: the later upload counts.
    let e3 = upload_part(&alice, "mpu", "video.mp4", &id, 3, &parts[2]).await;
    upload_part(&alice, "mpu", "video.mp4", &id, 2, b"not this one").await;
    let e1 = upload_part(&alice, "mpu", "video.mp4", &id, 1, &parts[0]).await;
    let e2 = upload_part(&alice, "mpu", "video.mp4", &id, 2, &parts[1]).await;
    assert_eq!(gw.backend.object_count("mpu"), 0, "nothing is visible before completion");
    alice.get_object("mpu", "video.mp4").await.expect_error(404, "NoSuchKey");

    // ListParts, two at a time.
    let r = alice.request("GET", "/mpu/video.mp4").query("uploadId", &id).query("max-parts", "2").send().await;
    r.expect_status(200);
    assert_eq!(xml_values(&r.text(), "PartNumber"), vec!["1", "2"]);
    assert_eq!(xml_values(&r.text(), "ETag"), vec![e1.clone(), e2.clone()]);
    assert_eq!(xml_values(&r.text(), "Size"), vec![(5 << 20).to_string(), (5 << 20).to_string()]);
    assert_eq!(xml_values(&r.text(), "IsTruncated"), vec!["true"]);
    assert_eq!(xml_values(&r.text(), "NextPartNumberMarker"), vec!["2"]);
    let r = alice
        .request("GET", "/mpu/video.mp4")
        .query("uploadId", &id)
        .query("max-parts", "2")
        .query("part-number-marker", "2")
        .send()
        .await;
    assert_eq!(xml_values(&r.text(), "PartNumber"), vec!["3"]);
    assert_eq!(xml_values(&r.text(), "IsTruncated"), vec!["false"]);

    let body = complete_xml(&[(1, &e1), (2, &e2), (3, &e3)]);
    let r = alice.request("POST", "/mpu/video.mp4").query("uploadId", &id).body(body.clone()).send().await;
    r.expect_status(200);
    let want = multipart_etag(&[&parts[0], &parts[1], &parts[2]]);
    assert_eq!(xml_values(&r.text(), "ETag"), vec![want.clone()], "{}", r.text());
    assert_eq!(xml_values(&r.text(), "Key"), vec!["video.mp4".to_owned()]);
    assert_eq!(xml_values(&r.text(), "Location"), vec![format!("http://{}/mpu/video.mp4", gw.addr)]);
    assert_eq!(r.header("x-amz-version-id"), None, "no versions in an unversioned bucket");

    let r = alice.get_object("mpu", "video.mp4").await;
    r.expect_status(200);
    assert!(r.body.as_ref() == parts.concat().as_slice(), "the object is the parts in order");
    assert_eq!(r.header("etag"), Some(want));
    assert_eq!(r.header("content-type").as_deref(), Some("video/mp4"));
    assert_eq!(r.header("x-amz-meta-camera").as_deref(), Some("front"));
    assert_eq!(r.header("cache-control").as_deref(), Some("no-cache"));
    // A range across the first two parts.
    let r = alice.request("GET", "/mpu/video.mp4").header("range", &format!("bytes={}-{}", (5 << 20) - 2, (5 << 20) + 1)).send().await;
    r.expect_status(206);
    assert_eq!(r.body.as_ref(), &parts.concat()[(5 << 20) - 2..(5 << 20) + 2]);

    // The upload is gone: listing its parts, completing it again or aborting it is NoSuchUpload.
    alice.request("GET", "/mpu/video.mp4").query("uploadId", &id).send().await.expect_error(404, "NoSuchUpload");
    alice.request("POST", "/mpu/video.mp4").query("uploadId", &id).body(body).send().await.expect_error(404, "NoSuchUpload");
    alice.request("DELETE", "/mpu/video.mp4").query("uploadId", &id).send().await.expect_error(404, "NoSuchUpload");
    let r = alice.request("GET", "/mpu").query("uploads", "").send().await;
    r.expect_status(200);
    assert!(xml_values(&r.text(), "UploadId").is_empty(), "{}", r.text());
    assert_eq!(gw.backend.part_count("mpu"), 0);
    gw.stop().await;
}

#[tokio::test]
async fn multipart_completion_checks_parts_like_s3() {
    let gw = Gateway::start().await;
    let (alice, bob) = (gw.alice(), gw.bob());
    alice.create_bucket("mpu").await.expect_status(200);
    let id = create_upload(&alice, "mpu", "k").await;
    let (big, small, last) = (pattern(5 << 20, 9), pattern(100, 8), pattern(10, 7));
    let e1 = upload_part(&alice, "mpu", "k", &id, 1, &small).await;
    let e2 = upload_part(&alice, "mpu", "k", &id, 2, &big).await;
    let e3 = upload_part(&alice, "mpu", "k", &id, 3, &last).await;
    let complete = |parts: Vec<(u32, &str)>| {
        alice.request("POST", "/mpu/k").query("uploadId", &id).body(complete_xml(&parts))
    };
    // A wrong ETag, a part never uploaded, parts out of order or repeated, a small part
    // that is not the last, no parts at all.
    complete(vec![(2, &e2), (3, "\"0123456789abcdef0123456789abcdef\"")]).send().await.expect_error(400, "InvalidPart");
    complete(vec![(2, &e2), (4, &e3)]).send().await.expect_error(400, "InvalidPart");
    complete(vec![(2, &e2), (1, &e1)]).send().await.expect_error(400, "InvalidPartOrder");
    complete(vec![(2, &e2), (2, &e2)]).send().await.expect_error(400, "InvalidPartOrder");
    complete(vec![(1, &e1), (2, &e2)]).send().await.expect_error(400, "EntityTooSmall");
    complete(vec![]).send().await.expect_error(400, "MalformedXML");
    // Another account may not touch it; an unknown upload id is NoSuchUpload.
    bob.request("POST", "/mpu/k").query("uploadId", &id).body(complete_xml(&[(2, &e2)])).send().await.expect_error(403, "AccessDenied");
    let r = alice.request("POST", "/mpu/k").query("uploadId", "00000000000000000000000000000000").body(complete_xml(&[(2, &e2)])).send().await;
    r.expect_error(404, "NoSuchUpload");
    // The same upload id under another key is not the upload.
    alice.request("POST", "/mpu/other").query("uploadId", &id).body(complete_xml(&[(2, &e2)])).send().await.expect_error(404, "NoSuchUpload");
    // Part numbers are 1 to 10000.
    for n in ["0", "10001"] {
        let r = alice.request("PUT", "/mpu/k").query("partNumber", n).query("uploadId", &id).body("x").send().await;
        r.expect_error(400, "InvalidArgument");
    }
    assert_eq!(gw.backend.object_count("mpu"), 0, "failed completions store nothing");

    // The upload survived every refusal: parts 2 and 3 make a valid object (part 1 dropped).
    let r = complete(vec![(2, &e2), (3, &e3)]).send().await;
    r.expect_status(200);
    assert_eq!(xml_values(&r.text(), "ETag"), vec![multipart_etag(&[&big, &last])]);
    assert_eq!(alice.get_object("mpu", "k").await.body.len(), big.len() + last.len());

    // Abort: parts go, the upload id is unknown from then on.
    let id = create_upload(&alice, "mpu", "aborted").await;
    upload_part(&alice, "mpu", "aborted", &id, 1, b"some data").await;
    assert_eq!(gw.backend.part_count("mpu"), 1);
    alice.request("DELETE", "/mpu/aborted").query("uploadId", &id).send().await.expect_status(204);
    assert_eq!(gw.backend.part_count("mpu"), 0);
    alice.request("GET", "/mpu/aborted").query("uploadId", &id).send().await.expect_error(404, "NoSuchUpload");
    let r = alice.request("PUT", "/mpu/aborted").query("partNumber", "2").query("uploadId", &id).body("late").send().await;
    r.expect_error(404, "NoSuchUpload");
    alice.get_object("mpu", "aborted").await.expect_error(404, "NoSuchKey");
    gw.stop().await;
}

#[tokio::test]
async fn part_digests_and_checksums_are_verified_and_a_mismatch_stores_nothing() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("sums").await.expect_status(200);
    let id = create_upload(&alice, "sums", "k").await;
    let part = |n: &str| alice.request("PUT", "/sums/k").query("partNumber", n).query("uploadId", &id);
    // CRC32("hello world") = "DUoRhQ==".
    let r = part("1").header("x-amz-checksum-crc32", "AAAAAA==").body("hello world").send().await;
    r.expect_error(400, "BadDigest");
    let r = part("1").header("content-md5", &md5_b64(b"something else")).body("hello world").send().await;
    r.expect_error(400, "BadDigest");
    let r = part("1").send_unsigned_trailer(b"hello world", 4, "AAAAAA==").await;
    r.expect_error(400, "XAmzContentChecksumMismatch");
    assert_eq!(gw.backend.part_count("sums"), 0, "a refused part stores nothing");
    let r = alice.request("GET", "/sums/k").query("uploadId", &id).send().await;
    assert!(xml_values(&r.text(), "PartNumber").is_empty(), "{}", r.text());

    let r = part("1").header("x-amz-checksum-crc32", "DUoRhQ==").header("content-md5", &md5_b64(b"hello world")).body("hello world").send().await;
    r.expect_status(200);
    assert_eq!(r.header("x-amz-checksum-crc32").as_deref(), Some("DUoRhQ=="));
    let r = part("2").header("x-amz-sdk-checksum-algorithm", "SHA256").body("abc").send().await;
    r.expect_status(200);
    assert_eq!(r.header("x-amz-checksum-sha256").as_deref(), Some("ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="));
    let r = part("3").send_unsigned_trailer(b"hello world", 4, "DUoRhQ==").await;
    r.expect_status(200);
    let r = part("4").send_chunked(b"signed chunks", 5, false).await;
    r.expect_status(200);
    let r = part("5").send_chunked(b"signed chunks", 5, true).await;
    r.expect_error(403, "SignatureDoesNotMatch");
    assert_eq!(gw.backend.part_count("sums"), 4);
    // A whole-object checksum of a multipart upload cannot be honoured: refused, not ignored.
    let r = alice.request("POST", "/sums/full").query("uploads", "").header("x-amz-checksum-type", "FULL_OBJECT").send().await;
    r.expect_error(501, "NotImplemented");
    gw.stop().await;
}

#[tokio::test]
async fn upload_listings_page_by_key_and_upload_id() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("ups").await.expect_status(200);
    let mut ids = Vec::new();
    for key in ["a", "b/1", "b/2", "c", "c", "d/x/1"] {
        ids.push((key, create_upload(&alice, "ups", key).await));
    }
    let list = |q: &[(&str, &str)]| {
        let mut r = alice.request("GET", "/ups").query("uploads", "");
        for (k, v) in q {
            r = r.query(k, v);
        }
        r.send()
    };
    let r = list(&[]).await;
    r.expect_status(200);
    assert_eq!(xml_values(&r.text(), "Key"), vec!["a", "b/1", "b/2", "c", "c", "d/x/1"]);
    // c's two uploads in the order they were started.
    let c_ids: Vec<String> = ids.iter().filter(|(k, _)| *k == "c").map(|(_, id)| id.clone()).collect();
    assert_eq!(xml_values(&r.text(), "UploadId")[3..5].to_vec(), c_ids);
    assert_eq!(xml_values(&r.text(), "ID")[0], "id-alice");

    // Pages of two, going on from the markers; one of them ends between c's uploads.
    let mut seen = Vec::new();
    let (mut km, mut um) = (String::new(), String::new());
    for _ in 0..10 {
        let r = list(&[("max-uploads", "2"), ("key-marker", &km), ("upload-id-marker", &um)]).await;
        r.expect_status(200);
        let keys = xml_values(&r.text(), "Key");
        assert!(keys.len() <= 2, "{}", r.text());
        seen.extend(keys.into_iter().zip(xml_values(&r.text(), "UploadId")));
        if xml_values(&r.text(), "IsTruncated") != vec!["true"] {
            break;
        }
        km = xml_values(&r.text(), "NextKeyMarker").pop().expect("NextKeyMarker");
        um = xml_values(&r.text(), "NextUploadIdMarker").pop().expect("NextUploadIdMarker");
    }
    let want: Vec<(String, String)> = ids.iter().map(|(k, id)| ((*k).to_owned(), id.clone())).collect();
    assert_eq!(seen, want);

    // A key marker alone: keys after it.
    let r = list(&[("key-marker", "c")]).await;
    assert_eq!(xml_values(&r.text(), "Key"), vec!["d/x/1"]);
    // Prefix and delimiter: uploads under b/ and d/ roll up into common prefixes.
    let r = list(&[("delimiter", "/")]).await;
    assert_eq!(xml_values(&r.text(), "Key"), vec!["a", "c", "c"]);
    assert_eq!(common_prefixes(&r.text()), vec!["b/", "d/"]);
    let r = list(&[("delimiter", "/"), ("max-uploads", "2")]).await;
    assert_eq!(xml_values(&r.text(), "Key"), vec!["a"]);
    assert_eq!(xml_values(&r.text(), "NextKeyMarker"), vec!["b/"]);
    let r = list(&[("delimiter", "/"), ("max-uploads", "2"), ("key-marker", "b/")]).await;
    assert_eq!(xml_values(&r.text(), "Key"), vec!["c", "c"]);
    let r = list(&[("prefix", "d/"), ("delimiter", "/")]).await;
    assert!(xml_values(&r.text(), "Key").is_empty());
    assert_eq!(common_prefixes(&r.text()), vec!["d/x/"]);
    let r = list(&[("prefix", "b/")]).await;
    assert_eq!(xml_values(&r.text(), "Key"), vec!["b/1", "b/2"]);
    gw.stop().await;
}

#[tokio::test]
async fn part_copies_take_a_range_of_another_object() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("src").await.expect_status(200);
    alice.create_bucket("dst").await.expect_status(200);
    let source = pattern((10 << 20) + 5, 4);
    alice.put_object("src", "big", &source).await.expect_status(200);
    alice.put_object("src", "small", b"tail end").await.expect_status(200);
    let id = create_upload(&alice, "dst", "joined").await;
    let copy = |n: &str, from: &str| {
        alice.request("PUT", "/dst/joined").query("partNumber", n).query("uploadId", &id).header("x-amz-copy-source", from)
    };
    let r = copy("1", "/src/big").header("x-amz-copy-source-range", &format!("bytes=0-{}", (5 << 20) - 1)).send().await;
    r.expect_status(200);
    let e1 = xml_values(&r.text(), "ETag").pop().expect("CopyPartResult ETag");
    assert_eq!(e1, format!("\"{}\"", md5_hex(&source[..5 << 20])));
    assert_eq!(xml_values(&r.text(), "LastModified").len(), 1);
    let r = copy("2", "/src/big").header("x-amz-copy-source-range", &format!("bytes={}-{}", 5 << 20, source.len() - 1)).send().await;
    r.expect_status(200);
    let e2 = xml_values(&r.text(), "ETag").pop().expect("CopyPartResult ETag");
    let r = copy("3", "src/small").send().await;
    r.expect_status(200);
    let e3 = xml_values(&r.text(), "ETag").pop().expect("CopyPartResult ETag");
    // Ranges outside the source, malformed ranges, missing sources, unmet conditions.
    for bad in [format!("bytes=0-{}", source.len()), "bytes=5-1".to_owned(), "bytes=-10".to_owned(), "0-10".to_owned()] {
        copy("4", "/src/big").header("x-amz-copy-source-range", &bad).send().await.expect_error(400, "InvalidArgument");
    }
    copy("4", "/src/missing").send().await.expect_error(404, "NoSuchKey");
    copy("4", "/src/big").header("x-amz-copy-source-if-match", "\"nope\"").send().await.expect_error(412, "PreconditionFailed");
    gw.bob().request("PUT", "/dst/joined").query("partNumber", "4").query("uploadId", &id).header("x-amz-copy-source", "/src/big").send().await.expect_error(403, "AccessDenied");

    let r = alice.request("POST", "/dst/joined").query("uploadId", &id).body(complete_xml(&[(1, &e1), (2, &e2), (3, &e3)])).send().await;
    r.expect_status(200);
    let r = alice.get_object("dst", "joined").await;
    let mut want = source.clone();
    want.extend_from_slice(b"tail end");
    assert!(r.body.as_ref() == want.as_slice(), "the copied parts make the object");
    gw.stop().await;
}

#[tokio::test]
async fn versioning_and_lifecycle_are_refused_by_a_backend_without_them() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("plain").await.expect_status(200);
    alice.put_object("plain", "k", b"data").await.expect_status(200);
    // A bucket that was never versioned says so.
    let r = alice.request("GET", "/plain").query("versioning", "").send().await;
    r.expect_status(200);
    assert!(xml_values(&r.text(), "Status").is_empty(), "{}", r.text());
    let body = "<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>";
    alice.request("PUT", "/plain").query("versioning", "").body(body).send().await.expect_error(501, "NotImplemented");
    alice.request("GET", "/plain/k").query("versionId", "null").send().await.expect_error(501, "NotImplemented");
    alice.request("HEAD", "/plain/k").query("versionId", "null").send().await.expect_status(501);
    alice.request("DELETE", "/plain/k").query("versionId", "null").send().await.expect_error(501, "NotImplemented");
    alice.request("GET", "/plain").query("versions", "").send().await.expect_error(501, "NotImplemented");
    let lifecycle = "<LifecycleConfiguration><Rule><ID>r</ID><Filter><Prefix>logs/</Prefix></Filter><Status>Enabled</Status><Expiration><Days>1</Days></Expiration></Rule></LifecycleConfiguration>";
    let r = alice.request("PUT", "/plain").query("lifecycle", "").header("content-md5", &md5_b64(lifecycle.as_bytes())).body(lifecycle).send().await;
    r.expect_error(501, "NotImplemented");
    // What no backend can do is refused before the backend is asked.
    let transition = "<LifecycleConfiguration><Rule><ID>r</ID><Filter><Prefix></Prefix></Filter><Status>Enabled</Status><Transition><Days>30</Days><StorageClass>GLACIER</StorageClass></Transition></Rule></LifecycleConfiguration>";
    let r = alice.request("PUT", "/plain").query("lifecycle", "").header("content-md5", &md5_b64(transition.as_bytes())).body(transition).send().await;
    r.expect_error(501, "NotImplemented");
    assert!(r.text().contains("transition"), "{}", r.text());
    assert_eq!(alice.get_object("plain", "k").await.body.as_ref(), b"data");
    gw.stop().await;
}

/// A bucket is private until its owner puts a policy opening it; what the policy grants,
/// and nothing more, is then allowed to others and to unsigned requests.
#[tokio::test]
async fn bucket_policies_open_buckets_on_purpose() {
    let gw = Gateway::start().await;
    let (alice, bob) = (gw.alice(), gw.bob());
    let anon = |method: &str, path: &str| alice.request(method, path).auth(Auth::Anonymous);
    alice.create_bucket("pub").await.expect_status(200);
    alice.put_object("pub", "a/hello.txt", b"hello world").await.expect_status(200);
    alice.put_object("pub", "keep/x", b"kept").await.expect_status(200);

    // Private: anonymous and other accounts are refused, whatever they ask.
    anon("GET", "/pub/a/hello.txt").send().await.expect_error(403, "AccessDenied");
    anon("HEAD", "/pub/a/hello.txt").send().await.expect_status(403);
    anon("GET", "/pub").send().await.expect_error(403, "AccessDenied");
    anon("PUT", "/pub/new").body("x").send().await.expect_error(403, "AccessDenied");
    bob.get_object("pub", "a/hello.txt").await.expect_error(403, "AccessDenied");
    anon("GET", "/nothing-here/k").send().await.expect_error(404, "NoSuchBucket");
    alice.request("GET", "/pub").query("policy", "").send().await.expect_error(404, "NoSuchBucketPolicy");

    // Only the owner manages the policy; bad and unsupported policies are refused.
    let public_read = r#"{"Version":"2012-10-17","Statement":[{"Sid":"PublicRead","Effect":"Allow","Principal":"*","Action":"s3:GetObject","Resource":"arn:aws:s3:::pub/*"}]}"#;
    bob.request("PUT", "/pub").query("policy", "").body(public_read).send().await.expect_error(403, "AccessDenied");
    anon("PUT", "/pub").query("policy", "").body(public_read).send().await.expect_error(403, "AccessDenied");
    alice.request("PUT", "/pub").query("policy", "").body("{not json").send().await.expect_error(400, "MalformedPolicy");
    let elsewhere = public_read.replace("pub/*", "other/*");
    alice.request("PUT", "/pub").query("policy", "").body(elsewhere).send().await.expect_error(400, "MalformedPolicy");
    let conditional = public_read.replace(r#""Resource""#, r#""Condition":{"IpAddress":{"aws:SourceIp":"10.0.0.0/8"}},"Resource""#);
    alice.request("PUT", "/pub").query("policy", "").body(conditional).send().await.expect_error(501, "NotImplemented");
    anon("GET", "/pub/a/hello.txt").send().await.expect_error(403, "AccessDenied");

    alice.request("PUT", "/pub").query("policy", "").body(public_read).send().await.expect_status(204);
    let got = alice.request("GET", "/pub").query("policy", "").send().await;
    got.expect_status(200);
    assert_eq!(got.text(), public_read);
    bob.request("GET", "/pub").query("policy", "").send().await.expect_error(403, "AccessDenied");
    let status = alice.request("GET", "/pub").query("policyStatus", "").send().await;
    status.expect_status(200);
    assert_eq!(xml_values(&status.text(), "IsPublic"), vec!["true".to_owned()]);

    // Public read: objects to anyone, nothing else.
    let r = anon("GET", "/pub/a/hello.txt").send().await;
    r.expect_status(200);
    assert_eq!(r.body.as_ref(), b"hello world");
    anon("HEAD", "/pub/a/hello.txt").send().await.expect_status(200);
    anon("GET", "/pub/a/missing").send().await.expect_error(404, "NoSuchKey");
    let r = alice.request("GET", "/pub/a/hello.txt").auth(Auth::Anonymous).header("range", "bytes=0-4").send().await;
    r.expect_status(206);
    assert_eq!(r.body.as_ref(), b"hello");
    let r = bob.get_object("pub", "a/hello.txt").await;
    r.expect_status(200);
    anon("GET", "/pub").send().await.expect_error(403, "AccessDenied");
    anon("PUT", "/pub/a/hello.txt").body("defaced").send().await.expect_error(403, "AccessDenied");
    anon("DELETE", "/pub/a/hello.txt").send().await.expect_error(403, "AccessDenied");
    bob.put_object("pub", "mine", b"x").await.expect_error(403, "AccessDenied");
    // Unsigned aws-chunked bodies are never taken as such.
    let r = anon("PUT", "/pub/chunked").header("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER").body("x").send().await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Copying out of a public bucket into one's own works; into it does not.
    bob.create_bucket("bobs").await.expect_status(200);
    let r = bob.request("PUT", "/bobs/copy").header("x-amz-copy-source", "/pub/a/hello.txt").send().await;
    r.expect_status(200);
    assert_eq!(bob.get_object("bobs", "copy").await.body.as_ref(), b"hello world");
    let r = bob.request("PUT", "/pub/copy").header("x-amz-copy-source", "/bobs/copy").send().await;
    r.expect_error(403, "AccessDenied");
    // Other buckets stay private.
    anon("GET", "/bobs/copy").send().await.expect_error(403, "AccessDenied");

    // Grants to one account, and a Deny that binds the owner too.
    let shared = r#"{"Statement":[
        {"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::id-bob:root"},"Action":["s3:ListBucket","s3:PutObject","s3:Get*"],"Resource":["arn:aws:s3:::pub","arn:aws:s3:::pub/*"]},
        {"Effect":"Deny","Principal":"*","Action":"s3:DeleteObject","Resource":"arn:aws:s3:::pub/keep/*"}]}"#;
    alice.request("PUT", "/pub").query("policy", "").body(shared).send().await.expect_status(204);
    let status = alice.request("GET", "/pub").query("policyStatus", "").send().await;
    assert_eq!(xml_values(&status.text(), "IsPublic"), vec!["false".to_owned()]);
    anon("GET", "/pub/a/hello.txt").send().await.expect_error(403, "AccessDenied");
    let list = bob.request("GET", "/pub").query("list-type", "2").send().await;
    list.expect_status(200);
    assert_eq!(xml_values(&list.text(), "Key"), vec!["a/hello.txt".to_owned(), "keep/x".to_owned()]);
    bob.put_object("pub", "from-bob", b"bob was here").await.expect_status(200);
    assert_eq!(alice.get_object("pub", "from-bob").await.body.as_ref(), b"bob was here");
    bob.request("DELETE", "/pub/from-bob").send().await.expect_error(403, "AccessDenied");
    alice.request("DELETE", "/pub/keep/x").send().await.expect_error(403, "AccessDenied");
    // DeleteObjects answers each key on its own.
    let body = "<Delete><Object><Key>keep/x</Key></Object><Object><Key>from-bob</Key></Object></Delete>";
    let r = alice.request("POST", "/pub").query("delete", "").header("content-md5", &md5_b64(body.as_bytes())).body(body).send().await;
    r.expect_status(200);
    assert_eq!(xml_values(&r.text(), "Code"), vec!["AccessDenied".to_owned()]);
    assert_eq!(xml_values(&r.text(), "Key"), vec!["from-bob".to_owned(), "keep/x".to_owned()]);
    // Bucket settings stay the owner's.
    bob.request("DELETE", "/pub").query("policy", "").send().await.expect_error(403, "AccessDenied");
    bob.request("DELETE", "/pub").send().await.expect_error(403, "AccessDenied");

    // The owner can always take the policy away, even one that denies it things.
    alice.request("DELETE", "/pub").query("policy", "").send().await.expect_status(204);
    alice.request("GET", "/pub").query("policy", "").send().await.expect_error(404, "NoSuchBucketPolicy");
    bob.get_object("pub", "a/hello.txt").await.expect_error(403, "AccessDenied");
    alice.request("DELETE", "/pub/keep/x").send().await.expect_status(204);

    // ACLs show the owner's full control and grant nothing else.
    let acl = alice.request("GET", "/pub").query("acl", "").send().await;
    acl.expect_status(200);
    assert_eq!(xml_values(&acl.text(), "Permission"), vec!["FULL_CONTROL".to_owned()]);
    assert_eq!(xml_values(&acl.text(), "ID"), vec!["id-alice".to_owned(), "id-alice".to_owned()]);
    let acl = alice.request("GET", "/pub/a/hello.txt").query("acl", "").send().await;
    acl.expect_status(200);
    assert_eq!(xml_values(&acl.text(), "Permission"), vec!["FULL_CONTROL".to_owned()]);
    alice.request("GET", "/pub/missing").query("acl", "").send().await.expect_error(404, "NoSuchKey");
    let r = alice.request("PUT", "/pub").query("acl", "").header("x-amz-acl", "public-read").send().await;
    r.expect_error(400, "AccessControlListNotSupported");
    alice.request("PUT", "/pub").query("acl", "").header("x-amz-acl", "private").send().await.expect_status(200);
    let r = alice.request("PUT", "/pub/a/hello.txt").query("acl", "").header("x-amz-acl", "public-read").send().await;
    r.expect_error(400, "AccessControlListNotSupported");
    let r = alice.request("PUT", "/open").header("x-amz-acl", "public-read").send().await;
    r.expect_error(400, "InvalidBucketAclWithObjectOwnership");
    let own = alice.request("GET", "/pub").query("ownershipControls", "").send().await;
    own.expect_status(200);
    assert_eq!(xml_values(&own.text(), "ObjectOwnership"), vec!["BucketOwnerEnforced".to_owned()]);
    gw.stop().await;
}

fn tagging_xml(tags: &[(&str, &str)]) -> String {
    let tags: String = tags.iter().map(|(k, v)| format!("<Tag><Key>{k}</Key><Value>{v}</Value></Tag>")).collect();
    format!("<Tagging><TagSet>{tags}</TagSet></Tagging>")
}

/// The (Key, Value) pairs of a GetObjectTagging answer, in order.
fn tag_pairs(xml: &str) -> Vec<(String, String)> {
    xml_values(xml, "Tag")
        .iter()
        .map(|t| (xml_values(t, "Key").pop().unwrap_or_default(), xml_values(t, "Value").pop().unwrap_or_default()))
        .collect()
}

fn pairs(tags: &[(&str, &str)]) -> Vec<(String, String)> {
    tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test]
async fn object_tags_are_stored_replaced_copied_and_checked() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("tags").await.expect_status(200);
    // Tags given with the PUT, in the header's order (not sorted).
    alice
        .request("PUT", "/tags/a")
        .header("x-amz-tagging", "zone=eu%20west&Project=x&empty=")
        .body(&b"data"[..])
        .send()
        .await
        .expect_status(200);
    let r = alice.request("GET", "/tags/a").query("tagging", "").send().await;
    r.expect_status(200);
    assert_eq!(tag_pairs(&r.text()), pairs(&[("zone", "eu west"), ("Project", "x"), ("empty", "")]), "{}", r.text());
    let r = alice.get_object("tags", "a").await;
    assert_eq!(r.header("x-amz-tagging-count").as_deref(), Some("3"));
    let r = alice.request("HEAD", "/tags/a").send().await;
    assert_eq!(r.header("x-amz-tagging-count").as_deref(), Some("3"));

    // PutObjectTagging replaces the whole set; the data and ETag stay.
    let r = alice.request("PUT", "/tags/a").query("tagging", "").body(tagging_xml(&[("k", "v")])).send().await;
    r.expect_status(200);
    let r = alice.request("GET", "/tags/a").query("tagging", "").send().await;
    assert_eq!(tag_pairs(&r.text()), pairs(&[("k", "v")]));
    let r = alice.get_object("tags", "a").await;
    assert_eq!((r.body.as_ref(), r.header("etag")), (&b"data"[..], Some(format!("\"{}\"", md5_hex(b"data")))));

    // S3's limits: refused whole, nothing changes.
    let eleven: Vec<(String, String)> = (0..11).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let eleven: Vec<(&str, &str)> = eleven.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let long_key = "k".repeat(129);
    let long_value = "v".repeat(257);
    for bad in [eleven.clone(), vec![(long_key.as_str(), "v")], vec![("k", long_value.as_str())], vec![("d", "1"), ("d", "2")], vec![("aws:x", "1")]] {
        let r = alice.request("PUT", "/tags/a").query("tagging", "").body(tagging_xml(&bad)).send().await;
        r.expect_error(400, "InvalidTag");
    }
    let max: Vec<(String, String)> = (0..10).map(|i| (format!("{i}").repeat(128), "v".repeat(256))).collect();
    let max: Vec<(&str, &str)> = max.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    alice.request("PUT", "/tags/a").query("tagging", "").body(tagging_xml(&max)).send().await.expect_status(200);
    let r = alice.request("GET", "/tags/a").query("tagging", "").send().await;
    assert_eq!(tag_pairs(&r.text()).len(), 10);
    alice.request("PUT", "/tags/b").header("x-amz-tagging", &format!("{}=1", long_key)).body(&b"x"[..]).send().await.expect_error(400, "InvalidTag");
    alice.get_object("tags", "b").await.expect_error(404, "NoSuchKey");

    // DeleteObjectTagging: 204, and an empty set after.
    alice.request("DELETE", "/tags/a").query("tagging", "").send().await.expect_status(204);
    let r = alice.request("GET", "/tags/a").query("tagging", "").send().await;
    r.expect_status(200);
    assert!(tag_pairs(&r.text()).is_empty(), "{}", r.text());
    assert_eq!(alice.get_object("tags", "a").await.header("x-amz-tagging-count"), None);

    // Copies take the source's tags, or new ones with the REPLACE directive.
    alice.request("PUT", "/tags/a").query("tagging", "").body(tagging_xml(&[("src", "1")])).send().await.expect_status(200);
    alice.request("PUT", "/tags/c1").header("x-amz-copy-source", "/tags/a").send().await.expect_status(200);
    let r = alice.request("GET", "/tags/c1").query("tagging", "").send().await;
    assert_eq!(tag_pairs(&r.text()), pairs(&[("src", "1")]));
    alice
        .request("PUT", "/tags/c2")
        .header("x-amz-copy-source", "/tags/a")
        .header("x-amz-tagging-directive", "REPLACE")
        .header("x-amz-tagging", "new=2")
        .send()
        .await
        .expect_status(200);
    let r = alice.request("GET", "/tags/c2").query("tagging", "").send().await;
    assert_eq!(tag_pairs(&r.text()), pairs(&[("new", "2")]));

    // Missing keys, and other accounts.
    alice.request("GET", "/tags/none").query("tagging", "").send().await.expect_error(404, "NoSuchKey");
    alice.request("PUT", "/tags/none").query("tagging", "").body(tagging_xml(&[("k", "v")])).send().await.expect_error(404, "NoSuchKey");
    let bob = gw.bob();
    bob.request("GET", "/tags/a").query("tagging", "").send().await.expect_error(403, "AccessDenied");
    bob.request("PUT", "/tags/a").query("tagging", "").body(tagging_xml(&[("k", "v")])).send().await.expect_error(403, "AccessDenied");
    bob.request("DELETE", "/tags/a").query("tagging", "").send().await.expect_error(403, "AccessDenied");
    let r = alice.request("GET", "/tags/a").query("tagging", "").send().await;
    assert_eq!(tag_pairs(&r.text()), pairs(&[("src", "1")]), "others changed nothing");
    gw.stop().await;
}

#[tokio::test]
async fn part_numbers_read_one_part_of_a_multipart_object() {
    let gw = Gateway::start().await;
    let alice = gw.alice();
    alice.create_bucket("parts").await.expect_status(200);
    let r = alice.request("POST", "/parts/big").query("uploads", "").header("x-amz-tagging", "mpu=yes").send().await;
    r.expect_status(200);
    let id = xml_values(&r.text(), "UploadId").pop().expect("an upload id");
    let parts = [pattern(5 << 20, 1), pattern(5 << 20, 2), pattern(1000, 3)];
    let mut etags = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        etags.push(upload_part(&alice, "parts", "big", &id, i as u32 + 1, p).await);
    }
    let list: Vec<(u32, &str)> = etags.iter().enumerate().map(|(i, e)| (i as u32 + 1, e.as_str())).collect();
    alice.request("POST", "/parts/big").query("uploadId", &id).body(complete_xml(&list)).send().await.expect_status(200);
    let etag = multipart_etag(&[&parts[0], &parts[1], &parts[2]]);
    let r = alice.request("GET", "/parts/big").query("tagging", "").send().await;
    assert_eq!(tag_pairs(&r.text()), pairs(&[("mpu", "yes")]), "tags given at creation");

    let mut start = 0usize;
    for (i, p) in parts.iter().enumerate() {
        let n = (i + 1).to_string();
        let r = alice.request("HEAD", "/parts/big").query("partNumber", &n).send().await;
        r.expect_status(206);
        assert_eq!(r.header("x-amz-mp-parts-count").as_deref(), Some("3"));
        assert_eq!(r.header("content-length"), Some(p.len().to_string()));
        assert_eq!(r.header("etag"), Some(etag.clone()));
        let r = alice.request("GET", "/parts/big").query("partNumber", &n).send().await;
        r.expect_status(206);
        assert!(r.body.as_ref() == p.as_slice(), "part {n} reads back");
        assert_eq!(r.header("x-amz-mp-parts-count").as_deref(), Some("3"));
        let total: usize = parts.iter().map(Vec::len).sum();
        assert_eq!(r.header("content-range"), Some(format!("bytes {}-{}/{total}", start, start + p.len() - 1)));
        start += p.len();
    }
    alice.request("GET", "/parts/big").query("partNumber", "4").send().await.expect_error(400, "InvalidPart");
    alice.request("GET", "/parts/big").query("partNumber", "0").send().await.expect_error(400, "InvalidArgument");
    alice
        .request("GET", "/parts/big")
        .query("partNumber", "1")
        .header("range", "bytes=0-1")
        .send()
        .await
        .expect_error(400, "InvalidRequest");

    // An object stored in one piece is its own part 1.
    alice.put_object("parts", "small", b"body").await.expect_status(200);
    let r = alice.request("GET", "/parts/small").query("partNumber", "1").send().await;
    r.expect_status(200);
    assert_eq!(r.body.as_ref(), b"body");
    assert_eq!(r.header("x-amz-mp-parts-count"), None);
    alice.request("GET", "/parts/small").query("partNumber", "2").send().await.expect_error(400, "InvalidPart");
    alice.request("GET", "/parts/none").query("partNumber", "1").send().await.expect_error(404, "NoSuchKey");
    gw.stop().await;
}
