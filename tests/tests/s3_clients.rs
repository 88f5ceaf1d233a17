//! The S3 gateway with the clients tenants already have: aws cli (`s3` and `s3api`),
//! boto3, s3cmd and rclone, against a `basalt dev up` cluster.

use anyhow::{bail, Context, Result};
use basalt_tests::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The aws cli (`aws` on PATH: Debian's v2, or a v1 from pip) with our endpoint and keys.
fn aws(e: &S3Access, endpoint: &str, key: (&str, &str), args: &[&str]) -> Result<Output> {
    Command::new("aws")
        .args(["--endpoint-url", endpoint, "--region", &e.region])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", key.0)
        .env("AWS_SECRET_ACCESS_KEY", key.1)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_PAGER", "")
        .output()
        .context("running aws")
}

fn ok(what: &str, o: Output) -> Result<String> {
    if !o.status.success() {
        bail!("{what} failed: {}", text(&o));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn json(s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).with_context(|| format!("not JSON: {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_boto3_s3cmd_and_rclone_work_against_the_gateway() -> Result<()> {
    for tool in ["aws", "s3cmd", "rclone", "python3", "curl"] {
        require(tool)?;
    }
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let e = c.s3()?;
    let k = (e.access_key.as_str(), e.secret_key.as_str());
    let work = c.dir().join("s3-work");
    std::fs::create_dir_all(&work)?;

    // aws s3: bucket, a 200 MiB file (multipart), listing, download through another node.
    ok("mb", aws(&e, &e.endpoints[0], k, &["s3", "mb", "s3://alpha"])?)?;
    let big = work.join("big.bin");
    random_file(&big, 200 << 20, 42)?;
    ok("cp up", aws(&e, &e.endpoints[0], k, &["s3", "cp", path(&big)?, "s3://alpha/dir/big.bin"])?)?;
    let ls = ok("ls", aws(&e, &e.endpoints[0], k, &["s3", "ls", "s3://alpha/dir/"])?)?;
    assert!(ls.contains("209715200 big.bin"), "{ls}");
    let back = work.join("back.bin");
    ok("cp down", aws(&e, &e.endpoints[1], k, &["s3", "cp", "s3://alpha/dir/big.bin", path(&back)?])?)?;
    assert_same_file(&big, &back)?;
    let head = json(&ok("head", aws(&e, &e.endpoints[0], k, &["s3api", "head-object", "--bucket", "alpha", "--key", "dir/big.bin"])?)?)?;
    assert!(head["ETag"].as_str().is_some_and(|t| t.contains('-')), "a multipart ETag: {head}");

    // HTTPS: the same gateway with a certificate from the cluster CA; a client that does
    // not trust that CA refuses the connection.
    let https = format!("https://{}", c.file.nodes[0].s3_tls_addr.context("node1 has no HTTPS endpoint")?);
    let ca = c.file.certs_dir.join("ca.pem");
    let ls = ok("https ls", aws(&e, &https, k, &["--ca-bundle", path(&ca)?, "s3", "ls", "s3://alpha/dir/"])?)?;
    assert!(ls.contains("209715200 big.bin"), "{ls}");
    let over_tls = work.join("over-tls.bin");
    ok("https cp down", aws(&e, &https, k, &["--ca-bundle", path(&ca)?, "s3", "cp", "s3://alpha/dir/big.bin", path(&over_tls)?])?)?;
    assert_same_file(&big, &over_tls)?;
    std::fs::remove_file(&over_tls)?;
    let other_ca = work.join("other-ca");
    basalt_rpc::tls::ClusterCa::generate("other")?.save(&other_ca)?;
    let untrusted = aws(&e, &https, k, &["--ca-bundle", path(&other_ca.join("ca.pem"))?, "s3api", "list-buckets"])?;
    assert!(!untrusted.status.success() && text(&untrusted).contains("SSL"), "{}", text(&untrusted));

    // s3api: metadata, content type, ranged get, listing pages with delimiters.
    let small = work.join("small.txt");
    std::fs::write(&small, b"hello from basalt")?;
    ok(
        "put-object",
        aws(
            &e,
            &e.endpoints[0],
            k,
            &["s3api", "put-object", "--bucket", "alpha", "--key", "notes/é x.txt", "--body", path(&small)?,
              "--content-type", "text/plain", "--metadata", "colour=blue"],
        )?,
    )?;
    let head = json(&ok("head", aws(&e, &e.endpoints[1], k, &["s3api", "head-object", "--bucket", "alpha", "--key", "notes/é x.txt"])?)?)?;
    assert_eq!(head["ContentType"], "text/plain");
    assert_eq!(head["Metadata"]["colour"], "blue");
    let part = work.join("part");
    ok(
        "ranged get",
        aws(&e, &e.endpoints[0], k, &["s3api", "get-object", "--bucket", "alpha", "--key", "notes/é x.txt", "--range", "bytes=6-9", path(&part)?])?,
    )?;
    assert_eq!(std::fs::read(&part)?, b"from");
    for i in 0..30 {
        let key = format!("many/{}/{i:03}", i % 3);
        ok("put", aws(&e, &e.endpoints[0], k, &["s3api", "put-object", "--bucket", "alpha", "--key", &key])?)?;
    }
    let listed = json(&ok(
        "list-objects-v2",
        aws(&e, &e.endpoints[0], k, &["s3api", "list-objects-v2", "--bucket", "alpha", "--prefix", "many/", "--page-size", "7"])?,
    )?)?;
    assert_eq!(listed["Contents"].as_array().map(Vec::len), Some(30), "{listed}");
    let delimited = json(&ok(
        "list delimited",
        aws(&e, &e.endpoints[0], k, &["s3api", "list-objects-v2", "--bucket", "alpha", "--prefix", "many/", "--delimiter", "/"])?,
    )?)?;
    assert_eq!(delimited["CommonPrefixes"].as_array().map(Vec::len), Some(3), "{delimited}");

    // Versioning with s3api: two versions, a delete marker on top, the old version readable.
    ok("mb versioned", aws(&e, &e.endpoints[0], k, &["s3", "mb", "s3://vers"])?)?;
    ok(
        "put-bucket-versioning",
        aws(&e, &e.endpoints[0], k, &["s3api", "put-bucket-versioning", "--bucket", "vers", "--versioning-configuration", "Status=Enabled"])?,
    )?;
    let state = json(&ok("get-bucket-versioning", aws(&e, &e.endpoints[1], k, &["s3api", "get-bucket-versioning", "--bucket", "vers"])?)?)?;
    assert_eq!(state["Status"], "Enabled", "{state}");
    let v1 = json(&ok("put v1", aws(&e, &e.endpoints[0], k, &["s3api", "put-object", "--bucket", "vers", "--key", "doc", "--body", path(&small)?])?)?)?;
    let v1 = v1["VersionId"].as_str().context("no version id for a PUT into a versioned bucket")?.to_owned();
    ok("put v2", aws(&e, &e.endpoints[0], k, &["s3api", "put-object", "--bucket", "vers", "--key", "doc", "--body", path(&big)?])?)?;
    let del = json(&ok("delete", aws(&e, &e.endpoints[0], k, &["s3api", "delete-object", "--bucket", "vers", "--key", "doc"])?)?)?;
    assert_eq!(del["DeleteMarker"], true, "{del}");
    let gone = aws(&e, &e.endpoints[0], k, &["s3api", "head-object", "--bucket", "vers", "--key", "doc"])?;
    assert!(!gone.status.success() && text(&gone).contains("404"), "{}", text(&gone));
    let versions = json(&ok("list-object-versions", aws(&e, &e.endpoints[1], k, &["s3api", "list-object-versions", "--bucket", "vers"])?)?)?;
    assert_eq!(versions["Versions"].as_array().map(Vec::len), Some(2), "{versions}");
    assert_eq!(versions["DeleteMarkers"].as_array().map(Vec::len), Some(1), "{versions}");
    let old = work.join("old");
    ok(
        "get old version",
        aws(&e, &e.endpoints[1], k, &["s3api", "get-object", "--bucket", "vers", "--key", "doc", "--version-id", &v1, path(&old)?])?,
    )?;
    assert_eq!(std::fs::read(&old)?, b"hello from basalt");

    // Presigned GETs work without keys, and tampered or expired ones do not: aws cli v1
    // presigns with SigV2 query parameters by default, and with SigV4 when configured so.
    let v4_config = work.join("aws-sigv4.cfg");
    std::fs::write(&v4_config, "[default]\ns3 =\n    signature_version = s3v4\n")?;
    for (style, config) in [("SigV2", None), ("SigV4", Some(v4_config.as_path()))] {
        let presign = |expires: &str| -> Result<String> {
            let mut cmd = Command::new("aws");
            cmd.args(["--endpoint-url", &e.endpoints[0], "--region", &e.region])
                .args(["s3", "presign", "s3://alpha/notes/é x.txt", "--expires-in", expires])
                .env("AWS_ACCESS_KEY_ID", k.0)
                .env("AWS_SECRET_ACCESS_KEY", k.1)
                .env("AWS_CONFIG_FILE", config.map_or(Path::new("/dev/null"), |c| c))
                .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
            Ok(ok("presign", cmd.output()?)?.trim().to_owned())
        };
        let url = presign("300")?;
        assert_eq!(url.contains("X-Amz-Signature="), style == "SigV4", "{style}: {url}");
        let got = Command::new("curl").args(["-sf", &url]).output()?;
        assert_eq!(ok("curl presigned", got)?, "hello from basalt", "{style}");
        let status = |url: &str| -> Result<String> {
            let out = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url]).output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        // Another signature, or the same one for another key.
        let at = url.find("Signature=").context("no signature in the URL")? + "Signature=".len();
        let flipped = if url[at..].starts_with('0') { "1" } else { "0" };
        let tampered = format!("{}{flipped}{}", &url[..at], &url[at + 1..]);
        assert_eq!(status(&tampered)?, "403", "{style}: {tampered}");
        let other_key = url.replacen("notes/", "other/", 1);
        assert_eq!(status(&other_key)?, "403", "{style}: {other_key}");
        let expired = presign("1")?;
        wait_for("the presigned URL to expire", Duration::from_secs(10), || async {
            Ok((status(&expired)? == "403").then_some(()))
        })
        .await
        .with_context(|| format!("{style}: an expired presigned URL still works"))?;
    }

    // A bucket is public only when its owner says so, with a bucket policy; every
    // gateway then serves unsigned GETs of what it grants, and only that.
    let site = work.join("index.html");
    std::fs::write(&site, "<h1>public</h1>")?;
    ok("mb site", aws(&e, &e.endpoints[0], k, &["s3", "mb", "s3://site"])?)?;
    ok("cp site", aws(&e, &e.endpoints[0], k, &["s3", "cp", path(&site)?, "s3://site/www/index.html"])?)?;
    let anon_status = |endpoint: &str, method: &str, key: &str| -> Result<String> {
        let url = format!("{endpoint}/site/{key}");
        let out = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, &url]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(anon_status(&e.endpoints[1], "GET", "www/index.html")?, "403");
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Sid":"PublicRead","Effect":"Allow","Principal":"*","Action":"s3:GetObject","Resource":"arn:aws:s3:::site/www/*"}]}"#;
    ok("put-bucket-policy", aws(&e, &e.endpoints[0], k, &["s3api", "put-bucket-policy", "--bucket", "site", "--policy", policy])?)?;
    let got = json(&ok("get-bucket-policy", aws(&e, &e.endpoints[2], k, &["s3api", "get-bucket-policy", "--bucket", "site"])?)?)?;
    assert_eq!(got["Policy"].as_str(), Some(policy), "{got}");
    let status = json(&ok("policy status", aws(&e, &e.endpoints[0], k, &["s3api", "get-bucket-policy-status", "--bucket", "site"])?)?)?;
    assert_eq!(status["PolicyStatus"]["IsPublic"], serde_json::Value::Bool(true), "{status}");
    for endpoint in &e.endpoints {
        let body = Command::new("curl").args(["-sf", &format!("{endpoint}/site/www/index.html")]).output()?;
        assert_eq!(ok("anonymous curl", body)?, "<h1>public</h1>", "{endpoint}");
    }
    let fetched = work.join("fetched.html");
    ok("cp --no-sign-request", aws(&e, &e.endpoints[1], k, &["s3", "cp", "--no-sign-request", "s3://site/www/index.html", path(&fetched)?])?)?;
    assert_same_file(&site, &fetched)?;
    // Not granted: listing, writing, deleting, and keys outside www/.
    ok("cp secret", aws(&e, &e.endpoints[0], k, &["s3", "cp", path(&site)?, "s3://site/secret.html"])?)?;
    assert_eq!(anon_status(&e.endpoints[0], "GET", "secret.html")?, "403");
    assert_eq!(anon_status(&e.endpoints[0], "GET", "")?, "403");
    assert_eq!(anon_status(&e.endpoints[0], "PUT", "www/defaced.html")?, "403");
    assert_eq!(anon_status(&e.endpoints[0], "DELETE", "www/index.html")?, "403");
    let listing = aws(&e, &e.endpoints[0], k, &["s3", "ls", "--no-sign-request", "s3://site/"])?;
    assert!(!listing.status.success() && text(&listing).contains("AccessDenied"), "{}", text(&listing));
    // ACLs cannot open it (ACLs are off, as on new AWS buckets).
    let acl = aws(&e, &e.endpoints[0], k, &["s3api", "put-object-acl", "--bucket", "site", "--key", "secret.html", "--acl", "public-read"])?;
    assert!(!acl.status.success() && text(&acl).contains("AccessControlListNotSupported"), "{}", text(&acl));
    ok("delete-bucket-policy", aws(&e, &e.endpoints[0], k, &["s3api", "delete-bucket-policy", "--bucket", "site"])?)?;
    for endpoint in &e.endpoints {
        assert_eq!(anon_status(endpoint, "GET", "www/index.html")?, "403", "{endpoint}");
    }

    // Wrong keys are refused with S3's codes.
    let bad = aws(&e, &e.endpoints[0], (e.access_key.as_str(), "wrong-secret-wrong-secret-wrong-secret00"), &["s3api", "list-buckets"])?;
    assert!(!bad.status.success() && text(&bad).contains("SignatureDoesNotMatch"), "{}", text(&bad));
    let unknown = aws(&e, &e.endpoints[0], ("BKUNKNOWNKEY00000000", k.1), &["s3api", "list-buckets"])?;
    assert!(!unknown.status.success() && text(&unknown).contains("InvalidAccessKeyId"), "{}", text(&unknown));

    // boto3.
    let script = r#"
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name=sys.argv[2],
                  aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4])
s3.create_bucket(Bucket="beta")
s3.put_object(Bucket="beta", Key="k1", Body=b"x" * 100000, Metadata={"a": "b"})
assert s3.get_object(Bucket="beta", Key="k1")["Body"].read() == b"x" * 100000
s3.copy_object(Bucket="alpha", Key="copied", CopySource={"Bucket": "beta", "Key": "k1"})
assert s3.head_object(Bucket="alpha", Key="copied")["ContentLength"] == 100000
# 2,000 keys in 10 "directories", listed in pages with and without a delimiter (v1 and v2).
from concurrent.futures import ThreadPoolExecutor
names = [f"p/{i % 10}/{i:04d}" for i in range(2000)]
with ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda n: s3.put_object(Bucket="beta", Key=n, Body=n.encode()), names))
def listed(v2, **kw):
    op = "list_objects_v2" if v2 else "list_objects"
    keys, prefixes, pages = [], [], 0
    for page in s3.get_paginator(op).paginate(Bucket="beta", PaginationConfig={"PageSize": 333}, **kw):
        pages += 1
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    return keys, prefixes, pages
for v2 in (True, False):
    keys, prefixes, pages = listed(v2, Prefix="p/")
    assert keys == sorted(names) and prefixes == [] and pages == 7, (v2, len(keys), pages)
    keys, prefixes, _ = listed(v2, Prefix="p/", Delimiter="/")
    assert keys == [] and prefixes == [f"p/{d}/" for d in range(10)], (v2, keys[:3], prefixes)
    keys, prefixes, _ = listed(v2, Prefix="p/3/", Delimiter="/")
    assert keys == sorted(n for n in names if n.startswith("p/3/")) and len(keys) == 200, (v2, len(keys))
keys, _, _ = listed(True, Prefix="p/", StartAfter="p/9/1000")
assert keys == sorted(n for n in names if n > "p/9/1000"), len(keys)
for chunk in range(0, 2000, 1000):
    r = s3.delete_objects(Bucket="beta", Delete={"Objects": [{"Key": n} for n in names[chunk:chunk + 1000]]})
    assert len(r.get("Deleted", [])) == 1000 and not r.get("Errors"), r.get("Errors")
r = s3.delete_objects(Bucket="beta", Delete={"Objects": [{"Key": "k1"}]})
assert len(r.get("Deleted", [])) == 1, r
# Presigned PUT (SigV2 is botocore's default for presigned S3 URLs; SigV4 when configured):
# anyone with the URL may upload that one key, until it expires.
import http.client, urllib.parse
from botocore.config import Config
def put_url(url, body):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.netloc)
    conn.request("PUT", u.path + "?" + u.query, body=body)
    return conn.getresponse().status
for sig in ("s3", "s3v4"):
    signer = boto3.client("s3", endpoint_url=sys.argv[1], region_name=sys.argv[2], aws_access_key_id=sys.argv[3],
                          aws_secret_access_key=sys.argv[4], config=Config(signature_version=sig))
    url = signer.generate_presigned_url("put_object", Params={"Bucket": "alpha", "Key": "presigned-put"}, ExpiresIn=300)
    assert put_url(url, b"uploaded without keys " + sig.encode()) == 200, sig
    assert s3.get_object(Bucket="alpha", Key="presigned-put")["Body"].read() == b"uploaded without keys " + sig.encode()
    assert put_url(url.replace("presigned-put", "other-key"), b"x") == 403, sig
print("boto3 ok")
"#;
    let py = Command::new("python3")
        .args(["-c", script, &e.endpoints[0], &e.region, k.0, k.1])
        .output()?;
    assert!(ok("boto3", py)?.contains("boto3 ok"));

    // s3cmd (path-style through host_bucket without a bucket template).
    let cfg = work.join("s3cmd.cfg");
    let host = e.endpoints[0].trim_start_matches("http://");
    std::fs::write(
        &cfg,
        format!(
            "[default]\naccess_key = {}\nsecret_key = {}\nhost_base = {host}\nhost_bucket = {host}\nuse_https = False\nbucket_location = {}\nsignature_v2 = False\n",
            k.0, k.1, e.region
        ),
    )?;
    let s3cmd = |args: &[&str]| Command::new("s3cmd").arg("-c").arg(&cfg).args(args).output();
    ok("s3cmd mb", s3cmd(&["mb", "s3://gamma"])?)?;
    ok("s3cmd put", s3cmd(&["put", path(&small)?, "s3://gamma/s.txt"])?)?;
    let s3cmd_ls = ok("s3cmd ls", s3cmd(&["ls", "s3://gamma"])?)?;
    assert!(s3cmd_ls.contains("s3://gamma/s.txt"), "{s3cmd_ls}");

    // rclone: sync a directory up and check it.
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("sub"))?;
    for (name, len) in [("a.bin", 1000usize), ("sub/b.bin", 3 << 20)] {
        random_file(&tree.join(name), len, len as u64)?;
    }
    let rclone = |args: &[&str]| {
        Command::new("rclone")
            .args(args)
            // rclone 1.60's AWS SDK fails on any AWS_CA_BUNDLE (some machines set one); the
            // endpoint is plain HTTP anyway.
            .env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG", "/dev/null")
            .env("RCLONE_CONFIG_B_TYPE", "s3")
            .env("RCLONE_CONFIG_B_PROVIDER", "Other")
            .env("RCLONE_CONFIG_B_ACCESS_KEY_ID", k.0)
            .env("RCLONE_CONFIG_B_SECRET_ACCESS_KEY", k.1)
            .env("RCLONE_CONFIG_B_ENDPOINT", &e.endpoints[0])
            .env("RCLONE_CONFIG_B_REGION", &e.region)
            .output()
    };
    ok("rclone mkdir", rclone(&["mkdir", "b:delta"])?)?;
    ok("rclone sync", rclone(&["sync", path(&tree)?, "b:delta/tree"])?)?;
    ok("rclone check", rclone(&["check", path(&tree)?, "b:delta/tree"])?)?;
    c.passed()
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
