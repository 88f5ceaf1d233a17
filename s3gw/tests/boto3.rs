//! The gateway as boto3 (the AWS SDK for Python, with its default checksum behaviour) sees
//! it. boto3 comes from the project's install-deps; without it this test fails.

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
