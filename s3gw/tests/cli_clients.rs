//! Multipart uploads as s3cmd and rclone make them (their own part sizes, checksums and
//! listings), against a gateway over `MemBackend`. Both come from the project's
//! install-deps; without them this test fails.

mod common;

use common::Gateway;
use std::path::Path;
use std::process::{Command, Output};

fn run(what: &str, cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run ({e}); scripts/install-deps.sh installs it"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect()
}

fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).expect("read"), std::fs::read(b).expect("read"));
    assert!(x.len() == y.len() && x == y, "{} and {} differ", a.display(), b.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3cmd_and_rclone_upload_in_parts() {
    let gw = Gateway::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let big = dir.path().join("big.bin");
    std::fs::write(&big, data(17 << 20)).expect("write");
    let host = gw.addr.to_string();
    let alice = gw.alice();
    alice.create_bucket("tools").await.expect_status(200);

    let cfg = dir.path().join("s3cfg");
    std::fs::write(
        &cfg,
        format!(
            "[default]\naccess_key = AKALICE\nsecret_key = alice-secret\nhost_base = {host}\nhost_bucket = {host}\n\
             use_https = False\nsignature_v2 = False\nbucket_location = {}\n",
            common::REGION
        ),
    )
    .expect("s3cmd config");
    let s3cmd = |args: &[&str]| {
        let mut c = Command::new("s3cmd");
        c.arg("-c").arg(&cfg).args(args);
        c
    };
    let (big_s, back) = (big.to_string_lossy().into_owned(), dir.path().join("back.bin"));
    run("s3cmd put", &mut s3cmd(&["put", "--multipart-chunk-size-mb=5", &big_s, "s3://tools/s3cmd.bin"]));
    run("s3cmd get", &mut s3cmd(&["get", "--force", "s3://tools/s3cmd.bin", &back.to_string_lossy()]));
    same_file(&big, &back);
    let head = alice.request("HEAD", "/tools/s3cmd.bin").send().await;
    head.expect_status(200);
    assert!(head.header("etag").is_some_and(|t| t.ends_with("-4\"")), "4 parts of 5 MiB: {:?}", head.header("etag"));
    run("s3cmd ls", &mut s3cmd(&["ls", "s3://tools/"]));

    let remote = ":s3:tools";
    let rclone = |args: &[&str]| {
        let mut c = Command::new("rclone");
        // rclone 1.60's AWS SDK fails on any AWS_CA_BUNDLE (some machines set one), even for http.
        c.env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_S3_PROVIDER", "Other")
            .env("RCLONE_S3_ACCESS_KEY_ID", "AKALICE")
            .env("RCLONE_S3_SECRET_ACCESS_KEY", "alice-secret")
            .env("RCLONE_S3_ENDPOINT", format!("http://{host}"))
            .env("RCLONE_S3_REGION", common::REGION);
        c.args(["--config", "/dev/null", "--retries", "1", "--low-level-retries", "1"])
            .args(["--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M"])
            .args(args);
        c
    };
    run("rclone copyto", &mut rclone(&["copyto", &big_s, &format!("{remote}/rclone.bin")]));
    let back2 = dir.path().join("back2.bin");
    run("rclone copyto back", &mut rclone(&["copyto", &format!("{remote}/rclone.bin"), &back2.to_string_lossy()]));
    same_file(&big, &back2);
    let listed = run("rclone lsl", &mut rclone(&["lsl", remote]));
    assert!(listed.contains(&format!("{} ", 17 << 20)) && listed.contains("rclone.bin"), "{listed}");
    let head = alice.request("HEAD", "/tools/rclone.bin").send().await;
    head.expect_status(200);
    assert!(head.header("etag").is_some_and(|t| t.ends_with("-4\"")), "a multipart ETag: {:?}", head.header("etag"));
    // Nothing left half-done.
    let r = alice.request("GET", "/tools").query("uploads", "").send().await;
    assert!(common::xml_values(&r.text(), "UploadId").is_empty(), "{}", r.text());
    gw.stop().await;
}
