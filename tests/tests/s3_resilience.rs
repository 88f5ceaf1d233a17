//! The S3 gateway under failure and at size, with real clients against a `basalt dev up`
//! cluster: a node killed during a stream of PUTs and GETs loses no acknowledged object, and
//! a 5 GiB object goes up and comes back through bounded gateway memory.

use anyhow::{bail, Context, Result};
use basalt_tests::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A client that does what S3 clients do when a gateway goes away: retry, on the next
/// gateway. It PUTs objects of known content (sizes from 1 KiB to 48 MiB, so most span
/// several 4 MiB pieces), GETs an earlier acknowledged one after each PUT and checks it,
/// records progress in a file, and at the end reads back every acknowledged object.
const RETRYING_CLIENT: &str = r#"
import boto3, botocore, hashlib, random, sys, time
eps, region, ak, sk, progress, total = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
cfg = botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=30)
clients = [boto3.client("s3", endpoint_url=e, region_name=region, aws_access_key_id=ak,
                        aws_secret_access_key=sk, config=cfg) for e in eps]
cur = 0
def call(what, fn):
    global cur
    deadline = time.time() + 120
    while True:
        try:
            return fn(clients[cur])
        except botocore.exceptions.ClientError as e:
            code = e.response["Error"]["Code"]
            if code in ("NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidArgument"):
                raise
            err = e
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as e:
            err = e
        if time.time() > deadline:
            sys.exit(f"{what}: no gateway answered for 120 s: {err}")
        print(f"{what} on {eps[cur]} failed ({err}); retrying on the next gateway", flush=True)
        cur = (cur + 1) % len(clients)
        time.sleep(0.2)
def content(i):
    r = random.Random(i)
    # The test kills a node once 20 objects are acknowledged: the 21st is big, so the kill
    # most likely lands in the middle of its upload.
    return r.randbytes(48 << 20 if i == 20 else r.choice([1024, 4096, 100_000, 1 << 20, 5 << 20, 9 << 20]))
def get(c, k):
    return c.get_object(Bucket="fail", Key=k)["Body"].read()
try:
    clients[0].create_bucket(Bucket="fail")
except clients[0].exceptions.BucketAlreadyOwnedByYou:
    pass
acked = []
for i in range(total):
    data = content(i)
    call(f"put {i}", lambda c: c.put_object(Bucket="fail", Key=f"obj/{i:04d}", Body=data))
    acked.append(i)
    j = random.Random(-i).choice(acked)
    got = call(f"get {j}", lambda c: get(c, f"obj/{j:04d}"))
    if got != content(j):
        sys.exit(f"obj/{j:04d} read back {len(got)} bytes that differ from what was acknowledged")
    with open(progress, "w") as f:
        f.write(str(len(acked)))
last = clients[-1]
for i in acked:
    got = get(last, f"obj/{i:04d}")
    if hashlib.md5(got).digest() != hashlib.md5(content(i)).digest():
        sys.exit(f"obj/{i:04d} lost or corrupted after the kill")
keys = []
for page in last.get_paginator("list_objects_v2").paginate(Bucket="fail", Prefix="obj/"):
    keys += [o["Key"] for o in page.get("Contents", [])]
if keys != [f"obj/{i:04d}" for i in acked]:
    sys.exit(f"listing after the kill: {len(keys)} keys, {len(acked)} acknowledged")
print(f"ok {len(acked)}")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_puts_and_gets_loses_no_acknowledged_object() -> Result<()> {
    require("python3")?;
    let mut c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let e = c.s3()?;
    let progress = c.dir().join("progress");
    let total = 80;
    let mut client = Command::new("python3")
        .args(["-c", RETRYING_CLIENT, &e.endpoints.join(","), &e.region, &e.access_key, &e.secret_key])
        .arg(&progress)
        .arg(total.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let acked = || std::fs::read_to_string(&progress).ok().and_then(|s| s.trim().parse::<usize>().ok()).unwrap_or(0);
    wait_for("the client to store 20 objects", Duration::from_secs(120), || {
        let exited = client.try_wait();
        let n = acked();
        async move {
            if let Ok(Some(status)) = exited {
                bail!("the client exited early: {status}");
            }
            Ok((n >= 20).then_some(()))
        }
    })
    .await?;
    // node1's gateway is the one the client talks to.
    c.kill("node1")?;
    let at_kill = acked();
    let out = tokio::task::spawn_blocking(move || client.wait_with_output()).await??;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("the retrying client failed: {said}");
    }
    assert!(said.contains(&format!("ok {total}")), "{said}");
    eprintln!("the client, {at_kill} objects acknowledged at the kill:\n{said}");
    assert!(said.contains("retrying on the next gateway"), "the client never saw the kill (acked {at_kill} at the kill): {said}");
    c.passed()
}

const GIB: u64 = 1 << 30;

/// Peak resident memory of a process since the last reset (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kib << 10)
}

fn sh(what: &str, script: &str, env: &[(&str, &str)]) -> Result<String> {
    let mut cmd = Command::new("bash");
    cmd.args(["-o", "pipefail", "-c", script]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// 5 GiB up with the aws cli (multipart from a pipe) and down as one presigned GET with
/// curl, neither side holding a file: what went up is what came down (MD5 of the streams),
/// and the gateway's node never held more than a fraction of it in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5_gib_object_streams_through_bounded_gateway_memory() -> Result<()> {
    for tool in ["aws", "python3", "curl", "md5sum"] {
        require(tool)?;
    }
    let c = TestCluster::start(3, Duration::from_secs(60)).await?;
    let e = c.s3()?;
    let pid = c.file.node("node1")?.pid.context("node1 is not running")?;
    // Start the peak over from here (clear_refs 5 resets VmHWM).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    let before = peak_rss(pid)?;
    let size = 5 * GIB;
    let env = [
        ("AWS_ACCESS_KEY_ID", e.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", e.secret_key.as_str()),
        ("AWS_DEFAULT_REGION", e.region.as_str()),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ("EP", e.endpoints[0].as_str()),
    ];
    sh("aws s3 mb", "aws --endpoint-url $EP s3 mb s3://large", &env)?;
    let gen = format!(
        "python3 -c 'import random,sys\nr=random.Random(5)\nfor _ in range({}): sys.stdout.buffer.write(r.randbytes(1<<20))'",
        size >> 20
    );
    let md5_file = c.dir().join("up.md5");
    let up = format!(
        "{gen} | tee >(md5sum > {}) | aws --endpoint-url $EP s3 cp - s3://large/five --expected-size {size}",
        md5_file.display()
    );
    sh("upload", &up, &env)?;
    let head = sh("head-object", "aws --endpoint-url $EP s3api head-object --bucket large --key five", &env)?;
    let head: serde_json::Value = serde_json::from_str(&head)?;
    assert_eq!(head["ContentLength"].as_u64(), Some(size), "{head}");
    let peak_up = peak_rss(pid)?;
    let url = sh("presign", "aws --endpoint-url $EP s3 presign s3://large/five --expires-in 3600", &env)?;
    let down = sh("download", &format!("curl -sf '{}' | md5sum", url.trim()), &env)?;
    let peak = peak_rss(pid)?;
    // tee's process substitution may still be writing when the pipeline ends: wait for it.
    let up_md5 = wait_for("the upload's MD5", Duration::from_secs(60), || async {
        Ok(std::fs::read_to_string(&md5_file).ok().filter(|s| s.len() >= 32))
    })
    .await?;
    assert_eq!(down.get(..32), up_md5.get(..32), "what came down is not what went up");
    eprintln!(
        "5 GiB object: node1 (storaged with its S3 gateway) peak RSS {} MiB at start, {} MiB after the upload, {} MiB after the download",
        before >> 20,
        peak_up >> 20,
        peak >> 20
    );
    // Bounded means independent of the object's size: far below it, not just below it.
    assert!(peak < GIB, "node1's peak RSS reached {} MiB for a 5 GiB object", peak >> 20);
    c.passed()
}
