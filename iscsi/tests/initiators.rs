//! Black-box tests: real initiators (libiscsi's `iscsi-ls`, `iscsi-inq`,
//! `iscsi-readcapacity16`, and QEMU's iscsi block driver through `qemu-io`/`qemu-img`)
//! against `portal::serve` on loopback. Tools come from `scripts/install-deps.sh`
//! (Debian `libiscsi-bin`, `qemu-utils`, `qemu-block-extra`); a missing tool fails the test.

use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_iscsi::lu::{Chap, Portal, ScsiTarget, TargetAccess, TargetRegistry};
use tokio_util::sync::CancellationToken;

#[allow(dead_code, clippy::unwrap_used)]
mod fake {
    include!("common/fake_target.rs");
}
use fake::{FakeRegistry, FakeTarget};

const PLAIN: &str = "iqn.2024-01.io.basalt:plain";
const SECURE: &str = "iqn.2024-01.io.basalt:secure";
const SIZE: u64 = 64 << 20;

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("required tool `{name}` is not installed: run scripts/install-deps.sh (libiscsi-bin, qemu-utils, qemu-block-extra)");
}

struct Server {
    port: u16,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reg = FakeRegistry {
        targets: vec![
            (TargetAccess { name: PLAIN.into(), ..Default::default() }, FakeTarget::new(SIZE) as Arc<dyn ScsiTarget>),
            (
                TargetAccess {
                    name: SECURE.into(),
                    chap: Some(Chap { user: "alice".into(), secret: "alice-secret-12".into(), mutual: None }),
                    ..Default::default()
                },
                FakeTarget::new(SIZE) as Arc<dyn ScsiTarget>,
            ),
        ],
        portals: Mutex::new(vec![Portal { addr, tpgt: 1 }]),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(basalt_iscsi::portal::serve(
        listener,
        Arc::new(reg) as Arc<dyn TargetRegistry>,
        shutdown.clone(),
    ));
    Server { port: addr.port(), shutdown, task }
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task).await.expect("portal stops").expect("join");
    }
}

async fn run(tool_name: &str, args: &[&str]) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(tool(tool_name)).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{tool_name} {args:?} hung"))
    .expect("spawn");
    eprintln!(
        "$ {tool_name} {}\n[exit {:?}]\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn libiscsi_discovers_inquires_and_reads_capacity() {
    let s = start().await;
    let portal = format!("127.0.0.1:{}", s.port);

    // Discovery needs no CHAP; listing LUNs (-s) logs in to every target, so it needs the
    // secure target's secret (the plain target then negotiates AuthMethod=None).
    let o = run("iscsi-ls", &[&format!("iscsi://{portal}")]).await;
    assert!(o.status.success(), "iscsi-ls failed");
    let out = stdout(&o);
    assert!(out.contains(&format!("Target:{PLAIN} Portal:{portal},1")), "{out}");
    assert!(out.contains(&format!("Target:{SECURE} Portal:{portal},1")), "{out}");
    let o = run("iscsi-ls", &["-s", &format!("iscsi://alice%alice-secret-12@{portal}")]).await;
    assert!(o.status.success(), "iscsi-ls -s failed");
    let out = stdout(&o);
    assert_eq!(out.matches("Lun:0").count(), 2, "LUNs of both targets listed: {out}");

    let o = run("iscsi-inq", &[&format!("iscsi://{portal}/{PLAIN}/0")]).await;
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("BASALT"), "{out}");
    assert!(out.contains("FAKE LU"), "{out}");

    // Header and data digests (CRC32C) negotiated and checked on every PDU.
    let o = run("iscsi-inq", &[&format!("iscsi://{portal}/{PLAIN}/0?header_digest=crc32c&data_digest=crc32c")]).await;
    assert!(o.status.success(), "login with CRC32C digests failed");
    assert!(stdout(&o).contains("BASALT"));

    let o = run("iscsi-readcapacity16", &[&format!("iscsi://{portal}/{PLAIN}/0")]).await;
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains(&format!("Total size:{SIZE}")), "{out}");
    assert!(out.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{out}");
    assert!(out.contains(&format!("RETURNED LOGICAL BLOCK ADDRESS:{}", SIZE / 512 - 1)), "{out}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn libiscsi_chap_logins_need_the_right_secret() {
    let s = start().await;
    let portal = format!("127.0.0.1:{}", s.port);
    let o = run("iscsi-inq", &[&format!("iscsi://alice%alice-secret-12@{portal}/{SECURE}/0")]).await;
    assert!(o.status.success(), "CHAP with the right secret must log in");
    assert!(stdout(&o).contains("BASALT"));

    let o = run("iscsi-inq", &[&format!("iscsi://alice%wrong-secret-9@{portal}/{SECURE}/0")]).await;
    assert!(!o.status.success(), "CHAP with a wrong secret must fail");
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("auth"), "authentication failure reported: {err}");

    let o = run("iscsi-inq", &[&format!("iscsi://{portal}/{SECURE}/0")]).await;
    assert!(!o.status.success(), "no CHAP at all must fail on a CHAP target");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_writes_and_reads_back_through_its_iscsi_driver() {
    let help = std::process::Command::new(tool("qemu-img")).arg("--help").output().expect("qemu-img");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("iscsi"),
        "qemu-img lacks the iscsi block driver: install qemu-block-extra (scripts/install-deps.sh)"
    );
    let s = start().await;
    let url = format!("iscsi://127.0.0.1:{}/{PLAIN}/0", s.port);
    let o = run("qemu-img", &["info", "-f", "raw", &url]).await;
    assert!(o.status.success());
    assert!(stdout(&o).contains(&format!("{SIZE} bytes")) || stdout(&o).contains("64 MiB"), "size shown");

    // 1 MiB crosses R2T/burst boundaries; the pattern read back proves the data path.
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 4096 1M",
            "-c",
            "read -P 0x5a 4096 1M",
            "-c",
            "read -P 0 0 4096",
            "-c",
            "write -P 0xa5 33554432 12288",
            "-c",
            "read -P 0xa5 33554432 12288",
            &url,
        ],
    )
    .await;
    let out = stdout(&o);
    assert!(o.status.success(), "qemu-io failed");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");
    s.stop().await;
}

/// The same real initiators against the real SCSI layer (`scsi::Target` over a
/// `MemoryDevice`), not the fake.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_scsi_layer_serves_libiscsi_and_qemu() {
    use basalt_iscsi::lu::memory::{MemoryDevice, MemoryReservations, SinglePath};
    use basalt_iscsi::scsi::{Identity, LogicalUnit, Target};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let unit = LogicalUnit::new(
        Arc::new(MemoryDevice::new(SIZE)),
        Arc::new(SinglePath),
        Arc::new(MemoryReservations::default()),
        Identity {
            naa: Identity::naa_for_volume(42),
            serial: "VOL42".into(),
            vendor: "BASALT".into(),
            product: "VOLUME".into(),
            revision: "0001".into(),
        },
    );
    let target = Target::new(PLAIN).with_lun(0, Arc::new(unit));
    let reg = FakeRegistry {
        targets: vec![(TargetAccess { name: PLAIN.into(), ..Default::default() }, Arc::new(target) as Arc<dyn ScsiTarget>)],
        portals: Mutex::new(vec![Portal { addr, tpgt: 1 }]),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(basalt_iscsi::portal::serve(listener, Arc::new(reg), shutdown.clone()));
    let s = Server { port: addr.port(), shutdown, task };
    let url = format!("iscsi://127.0.0.1:{}/{PLAIN}/0", s.port);

    let o = run("iscsi-inq", &[&url]).await;
    assert!(o.status.success() && stdout(&o).contains("BASALT"), "iscsi-inq against scsi::Target");
    let o = run("iscsi-readcapacity16", &[&url]).await;
    assert!(o.status.success() && stdout(&o).contains(&format!("Total size:{SIZE}")));
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 65536 2M", "-c", "read -P 0x3c 65536 2M", "-c", "read -P 0 0 65536", &url],
    )
    .await;
    assert!(o.status.success(), "qemu-io against scsi::Target");
    assert!(!stdout(&o).contains("Pattern verification failed"), "{}", stdout(&o));
    assert_eq!(stdout(&o).matches("read ").count(), 2);
    s.stop().await;
}
