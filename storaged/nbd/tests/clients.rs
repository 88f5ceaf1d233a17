//! Black-box tests: the server on 127.0.0.1:0 and on a unix socket, driven by real NBD clients
//! (qemu-img, qemu-io, nbdinfo, nbdcopy, fio). A missing client binary makes its test print
//! "SKIPPED: <tool> not installed" to stderr and return.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use basalt_nbd::{serve_tcp, serve_unix, BlockBackend, MemBackend, StaticExports};
use rand::RngCore;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DISK_SIZE: u64 = 16 << 20;
/// Each client command must finish within this; the whole test stays under ~20 s.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

struct Harness {
    port: u16,
    socket: PathBuf,
    dir: tempfile::TempDir,
    disk: Arc<MemBackend>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Harness {
    async fn start() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "basalt_nbd=info".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = Arc::new(MemBackend::new(DISK_SIZE));
        let ro = MemBackend::new(DISK_SIZE).into_read_only();
        ro.fill(0, &[0x42; 4096]).expect("seed read-only disk");
        let exports = Arc::new(
            StaticExports::new()
                .with_export("disk", "test disk", disk.clone())
                .with_export("ro", "read-only disk", Arc::new(ro)),
        );
        let shutdown = CancellationToken::new();
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        let socket = dir.path().join("nbd.sock");
        let unix = UnixListener::bind(&socket).expect("bind unix");
        let tasks = vec![
            tokio::spawn(serve_tcp(tcp, exports.clone(), shutdown.clone())),
            tokio::spawn(serve_unix(unix, exports, shutdown.clone())),
        ];
        Self { port, socket, dir, disk, shutdown, tasks }
    }

    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("server stops after shutdown")
                .expect("server task did not panic");
        }
    }
}

/// True if `tool` runs; otherwise prints the SKIPPED line the test suite promises.
fn have(tool: &str) -> bool {
    match std::process::Command::new(tool).arg("--version").output() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: {tool} not installed");
            false
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

async fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{program} failed to start: {e}"));
    eprintln!(
        "$ {program} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args).await;
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    // Leave a zero MiB in the middle so sparse-aware copies take their hole path too.
    data[4 << 20..5 << 20].fill(0);
    std::fs::write(path, &data).expect("write source file");
    data
}

async fn disk_contents(disk: &MemBackend) -> Vec<u8> {
    let mut out = Vec::with_capacity(DISK_SIZE as usize);
    for off in (0..DISK_SIZE).step_by(4 << 20) {
        out.extend_from_slice(&disk.read(off, 4 << 20).await.expect("read disk"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_reports_the_export_over_tcp_and_unix() {
    if !have("qemu-img") {
        return;
    }
    let h = Harness::start().await;
    for uri in [h.tcp_uri("disk"), h.unix_uri("disk")] {
        let out = run_ok("qemu-img", &["info", "--output=json", &uri]).await;
        assert!(out.contains(&format!("\"virtual-size\": {DISK_SIZE}")), "{out}");
    }
    let out = run("qemu-img", &["info", &h.tcp_uri("no-such-export")]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-export"), "error should name the export: {err}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_verifies_patterns() {
    if !have("qemu-io") {
        return;
    }
    let h = Harness::start().await;
    let out = run_ok(
        "qemu-io",
        &[
            "-f", "raw",
            "-c", "write -P 0xab 0 1M",
            "-c", "read -P 0xab 0 1M",
            "-c", "write -f -P 0xcd 1M 64k",
            "-c", "write -z 2M 128k",
            "-c", "discard 3M 64k",
            "-c", "flush",
            "-c", "read -P 0xcd 1M 64k",
            "-c", "read -P 0 2M 128k",
            &h.unix_uri("disk"),
        ],
    )
    .await;
    assert!(!out.contains("failed"), "{out}");
    let disk = h.disk.read(0, 2 << 20).await.expect("read");
    assert!(disk[..1 << 20].iter().all(|&b| b == 0xab), "qemu-io's write reached the backend");
    assert!(disk[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0xcd));

    // Same over TCP; a pattern mismatch must be reported (proves the check can fail).
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 0x11 0 4k", &h.tcp_uri("disk")]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("Pattern verification failed"), "{text}");

    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &h.tcp_uri("ro")]).await;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() || text.contains("failed"), "write to read-only export: {text}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_round_trips_random_data() {
    if !have("qemu-img") {
        return;
    }
    let h = Harness::start().await;
    let src = h.path("src.raw");
    let data = random_file(&src, DISK_SIZE as usize);
    let src_s = src.to_string_lossy().into_owned();
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &src_s, &h.tcp_uri("disk")]).await;
    assert!(disk_contents(&h.disk).await == data, "backend holds what qemu-img wrote");
    let back = h.path("back.raw");
    let back_s = back.to_string_lossy().into_owned();
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &h.unix_uri("disk"), &back_s]).await;
    assert!(std::fs::read(&back).expect("read back") == data, "round trip differs");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_maps_allocation() {
    if !have("nbdinfo") {
        return;
    }
    let h = Harness::start().await;
    let out = run_ok("nbdinfo", &["--list", &h.tcp_uri("")]).await;
    for needle in ["export=\"disk\"", "export=\"ro\"", "test disk", "read-only disk"] {
        assert!(out.contains(needle), "missing {needle:?} in {out}");
    }
    let out = run_ok("nbdinfo", &[&h.unix_uri("ro")]).await;
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(out.contains("block_size_preferred: 4096"), "{out}");

    h.disk.write(1 << 20, bytes::Bytes::from(vec![7u8; 1 << 20]), false).await.expect("seed");
    let out = run_ok("nbdinfo", &["--map", &h.tcp_uri("disk")]).await;
    // nbdinfo prints "offset length type description" lines from base:allocation.
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(
        lines.iter().any(|l| l.len() >= 2 && l[0] == "1048576" && l[1] == "1048576" && out.contains("data")),
        "{out}"
    );
    assert!(lines.iter().any(|l| l.first() == Some(&"0") && l.iter().any(|w| w.contains("hole"))), "{out}");

    let out = run("nbdinfo", &[&h.tcp_uri("nope")]).await;
    assert!(!out.status.success());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_random_data() {
    if !have("nbdcopy") {
        return;
    }
    let h = Harness::start().await;
    let src = h.path("src.raw");
    let data = random_file(&src, DISK_SIZE as usize);
    let src_s = src.to_string_lossy().into_owned();
    run_ok("nbdcopy", &[&src_s, &h.tcp_uri("disk")]).await;
    assert!(disk_contents(&h.disk).await == data, "backend holds what nbdcopy wrote");
    let back = h.path("back.raw");
    let back_s = back.to_string_lossy().into_owned();
    run_ok("nbdcopy", &[&h.unix_uri("disk"), &back_s]).await;
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "nbdcopy round trip differs");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_at_queue_depth_32() {
    if !have("fio") {
        return;
    }
    let h = Harness::start().await;
    let uri = h.tcp_uri("disk");
    let out = run_ok(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    )
    .await;
    assert!(!out.contains("verify:"), "{out}");
    assert!(h.disk.allocated_bytes() >= 8 << 20, "fio's writes reached the backend");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_listeners_and_idle_connections() {
    let h = Harness::start().await;
    // A client stuck in the handshake must not keep the server alive past shutdown.
    let idle = tokio::net::TcpStream::connect(("127.0.0.1", h.port)).await.expect("connect");
    let idle_unix = tokio::net::UnixStream::connect(&h.socket).await.expect("connect");
    h.stop().await;
    drop((idle, idle_unix));
}
