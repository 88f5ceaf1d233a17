//! The S3 gateway of a real cluster over HTTP, driven by boto3: bucket versioning (version
//! ids, delete markers, versioned reads, copies and deletes, ListObjectVersions in pages),
//! multipart uploads in a versioned bucket, object tags per version and partNumber reads,
//! lifecycle configurations (stored, read back,
//! refused where the store cannot honour them, and applied by a lifecycle pass), and quotas
//! answered as 403 QuotaExceeded.

use anyhow::{bail, Context, Result};
use basalt_s3gw::store::{ObjectStore, Quota, StoreConfig};
use basalt_tests::*;
use std::process::Command;
use std::time::Duration;

const SCRIPT: &str = r#"
import io, os, sys
import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=os.environ["ACCESS_KEY"],
        aws_secret_access_key=os.environ["SECRET_KEY"],
        region_name=os.environ["REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )

s3 = client(os.environ["ENDPOINT"])
s3b = client(os.environ["ENDPOINT2"])
mib = 1024 * 1024

def expect_error(code, status, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ClientError as e:
        got = e.response["Error"]["Code"]
        got_status = e.response["ResponseMetadata"]["HTTPStatusCode"]
        assert (got, got_status) == (code, status), f"expected {code} {status}, got {got} {got_status}: {e}"
        return e.response
    raise AssertionError(f"expected {code}, the call succeeded")

def body(r):
    return r["Body"].read()

def phase1():
    # ---- versioning ----
    s3.create_bucket(Bucket="vers")
    assert "Status" not in s3.get_bucket_versioning(Bucket="vers")
    r = s3.put_object(Bucket="vers", Key="k", Body=b"v0")
    assert "VersionId" not in r, r
    s3.put_bucket_versioning(Bucket="vers", VersioningConfiguration={"Status": "Enabled"})
    assert s3.get_bucket_versioning(Bucket="vers")["Status"] == "Enabled"
    v1 = s3.put_object(Bucket="vers", Key="k", Body=b"one")["VersionId"]
    v2 = s3.put_object(Bucket="vers", Key="k", Body=b"two")["VersionId"]
    assert v1 != v2 and "null" not in (v1, v2)
    assert body(s3.get_object(Bucket="vers", Key="k")) == b"two"
    r = s3.get_object(Bucket="vers", Key="k", VersionId=v1)
    assert body(r) == b"one" and r["VersionId"] == v1
    assert body(s3b.get_object(Bucket="vers", Key="k", VersionId="null")) == b"v0"
    assert body(s3.get_object(Bucket="vers", Key="k", VersionId=v2, Range="bytes=1-")) == b"wo"
    assert s3.head_object(Bucket="vers", Key="k", VersionId=v1)["ContentLength"] == 3
    expect_error("NoSuchVersion", 404, s3.get_object, Bucket="vers", Key="k", VersionId="00000000000000ff")
    expect_error("InvalidArgument", 400, s3.get_object, Bucket="vers", Key="k", VersionId="not-a-version")

    d = s3.delete_object(Bucket="vers", Key="k")
    assert d["DeleteMarker"] is True, d
    marker = d["VersionId"]
    r = expect_error("NoSuchKey", 404, s3.get_object, Bucket="vers", Key="k")
    headers = r["ResponseMetadata"]["HTTPHeaders"]
    assert (headers.get("x-amz-delete-marker"), headers.get("x-amz-version-id")) == ("true", marker), headers
    r = expect_error("404", 404, s3.head_object, Bucket="vers", Key="k")
    assert r["ResponseMetadata"]["HTTPHeaders"].get("x-amz-delete-marker") == "true", r
    r = expect_error("MethodNotAllowed", 405, s3.get_object, Bucket="vers", Key="k", VersionId=marker)
    assert r["ResponseMetadata"]["HTTPHeaders"].get("x-amz-delete-marker") == "true", r
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="vers").get("Contents", [])] == []

    lv = s3.list_object_versions(Bucket="vers")
    assert [(v["VersionId"], v["IsLatest"]) for v in lv["Versions"]] == [(v2, False), (v1, False), ("null", False)], lv
    assert [(m["Key"], m["VersionId"], m["IsLatest"]) for m in lv["DeleteMarkers"]] == [("k", marker, True)], lv
    seen = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket="vers", PaginationConfig={"PageSize": 1}):
        seen += [v["VersionId"] for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    assert seen == [marker, v2, v1, "null"], seen

    # A copy of an older version; removing the marker brings the key back.
    c = s3.copy_object(Bucket="vers", Key="copied", CopySource={"Bucket": "vers", "Key": "k", "VersionId": v1})
    assert c["CopySourceVersionId"] == v1 and c["VersionId"], c
    assert body(s3.get_object(Bucket="vers", Key="copied")) == b"one"
    d = s3.delete_object(Bucket="vers", Key="k", VersionId=marker)
    assert d.get("DeleteMarker") is True and d["VersionId"] == marker, d
    assert body(s3b.get_object(Bucket="vers", Key="k")) == b"two"
    # Restoring an older version: copied onto its own key, it becomes the newest.
    r = s3.copy_object(Bucket="vers", Key="k", CopySource={"Bucket": "vers", "Key": "k", "VersionId": v1})
    assert r["VersionId"] not in (v1, v2) and body(s3.get_object(Bucket="vers", Key="k")) == b"one", r
    expect_error("InvalidRequest", 400, s3.copy_object, Bucket="vers", Key="k", CopySource={"Bucket": "vers", "Key": "k"})
    res = s3.delete_objects(Bucket="vers", Delete={"Objects": [{"Key": "k", "VersionId": v1}, {"Key": "copied"}]})
    got = sorted((x["Key"], x.get("VersionId"), x.get("DeleteMarker", False)) for x in res["Deleted"])
    assert got[0] == ("copied", None, True) and got[1] == ("k", v1, False), res
    assert [x for x in res["Deleted"] if x["Key"] == "copied"][0]["DeleteMarkerVersionId"]
    expect_error("404", 404, s3.head_object, Bucket="vers", Key="k", VersionId=v1)  # HEAD: no body, no code

    # Multipart in a versioned bucket: the completion names the new version.
    big = bytes(range(256)) * (11 * mib // 256) + b"tail"
    up = s3.create_multipart_upload(Bucket="vers", Key="dir/big")["UploadId"]
    e1 = s3.upload_part(Bucket="vers", Key="dir/big", UploadId=up, PartNumber=1, Body=big[:5 * mib])["ETag"]
    e2 = s3.upload_part(Bucket="vers", Key="dir/big", UploadId=up, PartNumber=2, Body=big[5 * mib:10 * mib])["ETag"]
    e3 = s3.upload_part_copy(Bucket="vers", Key="dir/big", UploadId=up, PartNumber=3,
                             CopySource={"Bucket": "vers", "Key": "k", "VersionId": v2},
                             CopySourceRange="bytes=0-1")["CopyPartResult"]["ETag"]
    e4 = s3.upload_part(Bucket="vers", Key="dir/big", UploadId=up, PartNumber=4, Body=big[10 * mib:])["ETag"]
    parts = [{"PartNumber": n, "ETag": e} for n, e in [(1, e1), (2, e2), (3, e3), (4, e4)]]
    expect_error("EntityTooSmall", 400, s3.complete_multipart_upload, Bucket="vers", Key="dir/big", UploadId=up,
                 MultipartUpload={"Parts": parts})
    done = s3.complete_multipart_upload(Bucket="vers", Key="dir/big", UploadId=up,
                                        MultipartUpload={"Parts": [parts[0], parts[1], parts[3]]})
    assert done["VersionId"] and done["ETag"].endswith('-3"'), done
    r = s3b.get_object(Bucket="vers", Key="dir/big")
    assert body(r) == big and r["VersionId"] == done["VersionId"]
    cfg = TransferConfig(multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    s3.upload_fileobj(io.BytesIO(big), "vers", "dir/big", Config=cfg)
    lv = s3.list_object_versions(Bucket="vers", Prefix="dir/")
    assert [v["IsLatest"] for v in lv["Versions"]] == [True, False], lv
    assert lv["Versions"][1]["VersionId"] == done["VersionId"]
    lv = s3.list_object_versions(Bucket="vers", Delimiter="/")
    assert [p["Prefix"] for p in lv["CommonPrefixes"]] == ["dir/"], lv
    assert sorted({v["Key"] for v in lv["Versions"]}) == ["copied", "k"], lv
    # The same in pages of one: the common prefix is listed once, then the markers go on past it.
    entries = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket="vers", Delimiter="/", PaginationConfig={"PageSize": 1}):
        entries += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        entries += [(v["Key"], v["VersionId"]) for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    keys = [e if e == "dir/" else e[0] for e in entries]
    assert keys == ["copied", "copied", "dir/", "k", "k", "k"], entries

    # Tags per version, changed in place (no new version), through either gateway.
    t1 = s3.put_object(Bucket="vers", Key="tagged", Body=b"t1", Tagging="a=1&b=2")["VersionId"]
    t2 = s3.put_object(Bucket="vers", Key="tagged", Body=b"t2")["VersionId"]
    assert s3b.get_object_tagging(Bucket="vers", Key="tagged")["TagSet"] == []
    r = s3b.get_object_tagging(Bucket="vers", Key="tagged", VersionId=t1)
    assert r["TagSet"] == [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}] and r["VersionId"] == t1, r
    assert s3.get_object(Bucket="vers", Key="tagged", VersionId=t1)["TagCount"] == 2
    r = s3.put_object_tagging(Bucket="vers", Key="tagged", Tagging={"TagSet": [{"Key": "cur", "Value": "x"}]})
    assert r["VersionId"] == t2, r
    s3.put_object_tagging(Bucket="vers", Key="tagged", VersionId=t1, Tagging={"TagSet": [{"Key": "old", "Value": "y"}]})
    assert s3b.get_object_tagging(Bucket="vers", Key="tagged")["TagSet"] == [{"Key": "cur", "Value": "x"}]
    assert s3b.get_object_tagging(Bucket="vers", Key="tagged", VersionId=t1)["TagSet"] == [{"Key": "old", "Value": "y"}]
    lv = s3.list_object_versions(Bucket="vers", Prefix="tagged")
    assert [v["VersionId"] for v in lv["Versions"]] == [t2, t1], lv
    assert body(s3.get_object(Bucket="vers", Key="tagged")) == b"t2"
    assert s3.delete_object_tagging(Bucket="vers", Key="tagged", VersionId=t1)["VersionId"] == t1
    assert s3.get_object_tagging(Bucket="vers", Key="tagged", VersionId=t1)["TagSet"] == []
    expect_error("InvalidTag", 400, s3.put_object_tagging, Bucket="vers", Key="tagged",
                 Tagging={"TagSet": [{"Key": str(i), "Value": "v"} for i in range(11)]})
    m = s3.delete_object(Bucket="vers", Key="tagged")["VersionId"]
    expect_error("NoSuchKey", 404, s3.get_object_tagging, Bucket="vers", Key="tagged")
    expect_error("MethodNotAllowed", 405, s3.put_object_tagging, Bucket="vers", Key="tagged", VersionId=m,
                 Tagging={"TagSet": []})
    # partNumber reads of the multipart version above (its parts: 5 MiB, 5 MiB, 1 MiB and 4 bytes).
    r = s3b.head_object(Bucket="vers", Key="dir/big", VersionId=done["VersionId"], PartNumber=2)
    assert (r["PartsCount"], r["ContentLength"], r["ETag"]) == (3, 5 * mib, done["ETag"]), r
    r = s3.get_object(Bucket="vers", Key="dir/big", VersionId=done["VersionId"], PartNumber=3)
    assert body(r) == big[10 * mib:] and r["PartsCount"] == 3, r
    expect_error("InvalidPart", 400, s3.get_object, Bucket="vers", Key="dir/big", VersionId=done["VersionId"], PartNumber=4)

    # Suspended: new writes are the null version.
    s3.put_bucket_versioning(Bucket="vers", VersioningConfiguration={"Status": "Suspended"})
    assert s3.get_bucket_versioning(Bucket="vers")["Status"] == "Suspended"
    assert s3.put_object(Bucket="vers", Key="k", Body=b"null again")["VersionId"] == "null"
    expect_error("IllegalVersioningConfigurationException", 400, s3.put_bucket_versioning, Bucket="vers",
                 VersioningConfiguration={})

    # ---- lifecycle configuration ----
    s3.create_bucket(Bucket="life")
    expect_error("NoSuchLifecycleConfiguration", 404, s3.get_bucket_lifecycle_configuration, Bucket="life")
    rules = [
        {"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 1},
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
        {"ID": "old-versions", "Filter": {"Prefix": ""}, "Status": "Disabled",
         "NoncurrentVersionExpiration": {"NoncurrentDays": 30}},
        {"ID": "markers", "Filter": {"Prefix": "tmp/"}, "Status": "Enabled",
         "Expiration": {"ExpiredObjectDeleteMarker": True}},
    ]
    s3.put_bucket_lifecycle_configuration(Bucket="life", LifecycleConfiguration={"Rules": rules})
    got = s3.get_bucket_lifecycle_configuration(Bucket="life")["Rules"]
    assert [r["ID"] for r in got] == ["logs", "old-versions", "markers"], got
    assert got[0]["Expiration"] == {"Days": 1} and got[0]["Filter"] == {"Prefix": "logs/"}, got[0]
    assert got[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}, got[0]
    assert got[1]["Status"] == "Disabled" and got[1]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30, got[1]
    assert got[2]["Expiration"] == {"ExpiredObjectDeleteMarker": True}, got[2]
    # What the store cannot honour is refused, and the stored configuration stays.
    for bad in [
        {"ID": "t", "Filter": {"Prefix": ""}, "Status": "Enabled", "Transitions": [{"Days": 30, "StorageClass": "GLACIER"}]},
        {"ID": "tag", "Filter": {"Tag": {"Key": "a", "Value": "b"}}, "Status": "Enabled", "Expiration": {"Days": 1}},
        {"ID": "date", "Filter": {"Prefix": ""}, "Status": "Enabled", "Expiration": {"Date": "2030-01-01T00:00:00Z"}},
    ]:
        expect_error("NotImplemented", 501, s3.put_bucket_lifecycle_configuration, Bucket="life",
                     LifecycleConfiguration={"Rules": [bad]})
    expect_error("InvalidArgument", 400, s3.put_bucket_lifecycle_configuration, Bucket="life",
                 LifecycleConfiguration={"Rules": [{"ID": "none", "Filter": {"Prefix": ""}, "Status": "Enabled"}]})
    assert len(s3b.get_bucket_lifecycle_configuration(Bucket="life")["Rules"]) == 3
    for k in ["logs/1", "logs/2", "keep/1"]:
        s3.put_object(Bucket="life", Key=k, Body=b"x")
    s3.create_multipart_upload(Bucket="life", Key="logs/stale")
    s3.create_bucket(Bucket="quota")
    s3.create_bucket(Bucket="gone")
    s3.put_bucket_lifecycle_configuration(Bucket="gone", LifecycleConfiguration={"Rules": rules[:1]})
    s3.delete_bucket_lifecycle(Bucket="gone")
    expect_error("NoSuchLifecycleConfiguration", 404, s3.get_bucket_lifecycle_configuration, Bucket="gone")

def phase2():
    # The lifecycle pass (run by the test) applied the rules set over HTTP.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="life").get("Contents", [])]
    assert keys == ["keep/1"], keys
    assert s3.list_multipart_uploads(Bucket="life").get("Uploads", []) == []
    # Quotas (set by the test: one object) answer 403 QuotaExceeded.
    s3.put_object(Bucket="quota", Key="a", Body=b"first")
    r = expect_error("QuotaExceeded", 403, s3.put_object, Bucket="quota", Key="b", Body=b"second")
    up = s3.create_multipart_upload(Bucket="quota", Key="c")["UploadId"]
    e = s3.upload_part(Bucket="quota", Key="c", UploadId=up, PartNumber=1, Body=b"part")["ETag"]
    expect_error("QuotaExceeded", 403, s3.complete_multipart_upload, Bucket="quota", Key="c", UploadId=up,
                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e}]})
    s3.abort_multipart_upload(Bucket="quota", Key="c", UploadId=up)

{"1": phase1, "2": phase2}[os.environ["PHASE"]]()
print("phase ok")
"#;

async fn run_phase(e: &S3Access, phase: &str) -> Result<()> {
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(SCRIPT)
        .env("PHASE", phase)
        .env("ENDPOINT", &e.endpoints[0])
        .env("ENDPOINT2", &e.endpoints[1])
        .env("ACCESS_KEY", &e.access_key)
        .env("SECRET_KEY", &e.secret_key)
        .env("REGION", &e.region)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    let out = tokio::task::spawn_blocking(move || cmd.output()).await?.context("running python3")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("phase ok") {
        bail!("boto3 phase {phase} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioning_lifecycle_and_multipart_work_over_http_on_a_cluster() -> Result<()> {
    require("python3")?;
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let e = c.s3()?;
    run_phase(&e, "1").await?;

    // A lifecycle pass as of a second from now, with millisecond "days", over the rules
    // phase 1 set over HTTP; and a quota of one object. (This store only changes index
    // records: it never opens a data volume, so it fences no gateway.)
    let mut cfg = StoreConfig::new(1, "node1");
    cfg.lifecycle_day = Duration::from_millis(1);
    let admin = ObjectStore::new(c.client()?, cfg);
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 + 1000;
    let report = admin.run_lifecycle(later, |b| b == "life").await?;
    assert_eq!((report.expired, report.uploads_aborted), (2, 1), "{report:?}");
    admin.set_quota("quota", Quota { max_bytes: None, max_objects: Some(1) }).await?;

    run_phase(&e, "2").await?;
    c.passed()
}
