//! The gateway as boto3 (the AWS SDK for Python, with its default checksum behaviour) sees
//! it, multipart uploads included. boto3 comes from the project's install-deps; without it
//! this test fails.

mod common;

use common::Gateway;
use std::process::Command;

const SCRIPT: &str = r#"
import os, sys, io, urllib.request
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["ENDPOINT"],
    aws_access_key_id="AKALICE",
    aws_secret_access_key="alice-secret",
    region_name=os.environ["REGION"],
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
)

def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"expected {code}, got {got}: {e}"
        return
    raise AssertionError(f"expected {code}, the call succeeded")

s3.create_bucket(Bucket="boto", CreateBucketConfiguration={"LocationConstraint": os.environ["REGION"]})
assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["boto"]
assert s3.get_bucket_location(Bucket="boto")["LocationConstraint"] == os.environ["REGION"]

data = bytes(range(256)) * 4096  # 1 MiB
put = s3.put_object(Bucket="boto", Key="dir/blob.bin", Body=data, ContentType="application/x-test",
                    Metadata={"origin": "boto3"})
head = s3.head_object(Bucket="boto", Key="dir/blob.bin")
assert head["ContentLength"] == len(data)
assert head["ETag"] == put["ETag"]
assert head["Metadata"] == {"origin": "boto3"}, head["Metadata"]
assert head["ContentType"] == "application/x-test"
got = s3.get_object(Bucket="boto", Key="dir/blob.bin")["Body"].read()
assert got == data
part = s3.get_object(Bucket="boto", Key="dir/blob.bin", Range="bytes=-10")
assert part["Body"].read() == data[-10:] and part["ContentRange"] == f"bytes {len(data)-10}-{len(data)-1}/{len(data)}"

# An explicit checksum, returned with ChecksumMode.
s3.put_object(Bucket="boto", Key="sha", Body=b"abc", ChecksumAlgorithm="SHA256")
h = s3.head_object(Bucket="boto", Key="sha", ChecksumMode="ENABLED")
assert h.get("ChecksumSHA256") == "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=", h

s3.upload_fileobj(io.BytesIO(b"streamed"), "boto", "dir/up.txt")
assert s3.get_object(Bucket="boto", Key="dir/up.txt")["Body"].read() == b"streamed"

for i in range(25):
    s3.put_object(Bucket="boto", Key=f"many/{i:02}", Body=b"x")
keys = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="boto", Prefix="many/", PaginationConfig={"PageSize": 7}):
    keys += [o["Key"] for o in page.get("Contents", [])]
assert keys == [f"many/{i:02}" for i in range(25)], keys
top = s3.list_objects_v2(Bucket="boto", Delimiter="/")
assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["dir/", "many/"]
assert [o["Key"] for o in top["Contents"]] == ["sha"]
v1 = []
for page in s3.get_paginator("list_objects").paginate(Bucket="boto", Prefix="many/", PaginationConfig={"PageSize": 10}):
    v1 += [o["Key"] for o in page.get("Contents", [])]
assert v1 == keys

s3.copy_object(Bucket="boto", Key="copy.bin", CopySource={"Bucket": "boto", "Key": "dir/blob.bin"})
assert s3.get_object(Bucket="boto", Key="copy.bin")["Body"].read() == data

url = s3.generate_presigned_url("get_object", Params={"Bucket": "boto", "Key": "dir/up.txt"}, ExpiresIn=60)
assert urllib.request.urlopen(url).read() == b"streamed"

expect_error("NoSuchKey", s3.get_object, Bucket="boto", Key="missing")
expect_error("BucketNotEmpty", s3.delete_bucket, Bucket="boto")
expect_error("PreconditionFailed", s3.get_object, Bucket="boto", Key="sha", IfMatch='"nope"')

# Multipart: upload_file splits 12 MiB into 5 MiB parts (with the SDK's part checksums).
from boto3.s3.transfer import TransferConfig
big = bytes(range(251)) * (12 * 1024 * 1024 // 251 + 1)
big = big[: 12 * 1024 * 1024 + 17]
mib = 1024 * 1024
cfg = TransferConfig(multipart_threshold=5 * mib, multipart_chunksize=5 * mib, max_concurrency=3)
s3.upload_fileobj(io.BytesIO(big), "boto", "multi.bin", Config=cfg)
h = s3.head_object(Bucket="boto", Key="multi.bin")
assert h["ContentLength"] == len(big) and h["ETag"].endswith('-3"'), h
assert s3.get_object(Bucket="boto", Key="multi.bin")["Body"].read() == big
out = io.BytesIO()
s3.download_fileobj("boto", "multi.bin", out, Config=cfg)
assert out.getvalue() == big

# The low-level calls: parts listed in pages, uploads listed, a part copied from a range,
# completion errors, abort.
up = s3.create_multipart_upload(Bucket="boto", Key="manual", ContentType="text/x-parts")["UploadId"]
p1 = s3.upload_part(Bucket="boto", Key="manual", UploadId=up, PartNumber=1, Body=big[: 5 * mib])
p2 = s3.upload_part_copy(Bucket="boto", Key="manual", UploadId=up, PartNumber=2,
                         CopySource={"Bucket": "boto", "Key": "multi.bin"}, CopySourceRange=f"bytes={5 * mib}-{10 * mib - 1}")
p3 = s3.upload_part(Bucket="boto", Key="manual", UploadId=up, PartNumber=3, Body=b"the end")
numbers = []
for page in s3.get_paginator("list_parts").paginate(Bucket="boto", Key="manual", UploadId=up, PaginationConfig={"PageSize": 2}):
    numbers += [p["PartNumber"] for p in page.get("Parts", [])]
assert numbers == [1, 2, 3], numbers
other = s3.create_multipart_upload(Bucket="boto", Key="other")["UploadId"]
ups = s3.list_multipart_uploads(Bucket="boto")["Uploads"]
assert [(u["Key"], u["UploadId"]) for u in ups] == [("manual", up), ("other", other)], ups
parts = [{"PartNumber": 1, "ETag": p1["ETag"]}, {"PartNumber": 2, "ETag": p2["CopyPartResult"]["ETag"]},
         {"PartNumber": 3, "ETag": p3["ETag"]}]
expect_error("InvalidPart", s3.complete_multipart_upload, Bucket="boto", Key="manual", UploadId=up,
             MultipartUpload={"Parts": parts[:2] + [{"PartNumber": 3, "ETag": p1["ETag"]}]})
expect_error("InvalidPartOrder", s3.complete_multipart_upload, Bucket="boto", Key="manual", UploadId=up,
             MultipartUpload={"Parts": [parts[1], parts[0], parts[2]]})
expect_error("EntityTooSmall", s3.complete_multipart_upload, Bucket="boto", Key="manual", UploadId=up,
             MultipartUpload={"Parts": [parts[0], parts[2], {"PartNumber": 4, "ETag": p1["ETag"]}]})
done = s3.complete_multipart_upload(Bucket="boto", Key="manual", UploadId=up, MultipartUpload={"Parts": parts})
assert done["ETag"].endswith('-3"'), done
got = s3.get_object(Bucket="boto", Key="manual")
assert got["Body"].read() == big[: 10 * mib] + b"the end" and got["ContentType"] == "text/x-parts"
s3.abort_multipart_upload(Bucket="boto", Key="other", UploadId=other)
expect_error("NoSuchUpload", s3.list_parts, Bucket="boto", Key="other", UploadId=other)
assert s3.list_multipart_uploads(Bucket="boto").get("Uploads", []) == []
s3.delete_object(Bucket="boto", Key="multi.bin")
s3.delete_object(Bucket="boto", Key="manual")

res = s3.delete_objects(Bucket="boto", Delete={"Objects": [{"Key": k} for k in keys]})
assert sorted(d["Key"] for d in res["Deleted"]) == keys
left = [o["Key"] for o in s3.list_objects_v2(Bucket="boto")["Contents"]]
assert left == ["copy.bin", "dir/blob.bin", "dir/up.txt", "sha"], left
for k in left:
    s3.delete_object(Bucket="boto", Key=k)
s3.delete_bucket(Bucket="boto")
print("boto3 ok")
"#;

#[tokio::test]
async fn boto3_drives_the_gateway() {
    let gw = Gateway::start().await;
    let endpoint = format!("http://{}", gw.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .env("ENDPOINT", endpoint)
            .env("REGION", common::REGION)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs (install-deps installs python3 and boto3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.contains("boto3 ok"), "boto3 script failed:\n{stdout}\n{stderr}");
    gw.stop().await;
}
