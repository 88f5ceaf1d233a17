//! Debian's `tgt` as the baseline of `bench iscsi`: installs the package when it is missing,
//! runs a private `tgtd` in the foreground (its own control port and portal, no systemd, so
//! it never touches a tgt service the machine may run), exports a plain file as LUN 1 with
//! the same negotiation limits our target offers, and tears everything down on drop.
//!
//! The file is opened with `O_DIRECT | O_SYNC` (tgt's `--bsoflags sync:direct`): reads come
//! from the disk, not the page cache, as our chunk store's do, and a write completes only
//! once it is durable, which is the contract of every write our target acknowledges. With
//! tgt's defaults (page cache, write cache enabled) the comparison would be between RAM and
//! a disk.

use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tracing::warn;

pub const TGT_IQN: &str = "iqn.2026-11.io.basalt:bench-tgt";
/// tgt keeps LUN 0 for its controller; the file is LUN 1.
pub const TGT_LUN: u64 = 1;
pub const BSOFLAGS: &str = "sync:direct";
const TID: &str = "1";
/// Where tgtd puts its control sockets (`socket.N`, `socket.N.lock`).
const CONTROL_DIR: &str = "/var/run/tgtd";

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// Installs Debian's `tgt` unless `tgtd` and `tgtadm` are already there (as
/// scripts/install-deps.sh does for the other tools).
pub async fn ensure_installed() -> Result<()> {
    if on_path("tgtd") && on_path("tgtadm") {
        return Ok(());
    }
    super::progress("installing Debian's tgt (apt-get install tgt)");
    let install = || {
        tokio::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "tgt"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let mut out = install().await.context("running apt-get")?;
    if !out.status.success() {
        // A machine that never fetched the package lists knows no tgt yet.
        let update = tokio::process::Command::new("apt-get").args(["update", "-qq"]).stdin(Stdio::null()).output();
        update.await.context("running apt-get update")?;
        out = install().await.context("running apt-get")?;
    }
    if !out.status.success() || !on_path("tgtd") {
        bail!(
            "tgt is not installed and `apt-get install tgt` failed ({}); run scripts/install-deps.sh as root",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A running private tgtd exporting one file.
pub struct Tgt {
    child: Child,
    control_port: u16,
    pub portal: SocketAddr,
    pub file: PathBuf,
    log: PathBuf,
}

impl Tgt {
    /// Starts tgtd and exports a sparse `size`-byte file in `dir` as [`TGT_LUN`] of
    /// [`TGT_IQN`], with the session limits in `params` (tgt target parameter names).
    pub async fn start(dir: &Path, size: u64, params: &[(&str, String)]) -> Result<Tgt> {
        let file = dir.join("tgt-lun1.dat");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .with_context(|| format!("creating {}", file.display()))?;
        let portal = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let control_port = free_control_port()?;
        let log = dir.join("tgtd.log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new("tgtd");
        cmd.args(["-f", "-C", &control_port.to_string(), "--iscsi", &format!("portal={portal}")])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        {
            // Its own process group: a Ctrl-C meant for us must not kill it before we have
            // taken its target down.
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().context("starting tgtd")?;
        let mut tgt = Tgt { child, control_port, portal, file, log };
        tgt.wait_ready().await?;
        tgt.admin(&["--lld", "iscsi", "--mode", "target", "--op", "new", "--tid", TID, "--targetname", TGT_IQN])
            .await?;
        let file_arg = tgt.file.display().to_string();
        let lun = TGT_LUN.to_string();
        tgt.admin(&[
            "--lld",
            "iscsi",
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            TID,
            "--lun",
            &lun,
            "--backing-store",
            &file_arg,
            "--bsoflags",
            BSOFLAGS,
        ])
        .await?;
        tgt.admin(&["--lld", "iscsi", "--mode", "target", "--op", "bind", "--tid", TID, "--initiator-address", "ALL"])
            .await?;
        for (name, value) in params {
            tgt.admin(&["--lld", "iscsi", "--mode", "target", "--op", "update", "--tid", TID, "--name", name, "--value", value])
                .await?;
        }
        Ok(tgt)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls until tgtd answers on its control socket and its portal accepts connections.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("tgtd exited at start-up ({status}): {}", self.log_tail());
            }
            let admin_ok = self.tgtadm(&["--lld", "iscsi", "--mode", "target", "--op", "show"]).await.is_ok();
            if admin_ok && tokio::net::TcpStream::connect(self.portal).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("tgtd did not become ready within 15 s: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn tgtadm(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new("tgtadm")
            .arg("-C")
            .arg(self.control_port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("running tgtadm")?;
        if !out.status.success() {
            bail!("tgtadm {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn admin(&self, args: &[&str]) -> Result<()> {
        self.tgtadm(args).await.map(|_| ()).map_err(|e| anyhow!("{e} (tgtd log: {})", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Takes the target down and stops tgtd (SIGKILL if it does not stop by itself).
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let port = self.control_port.to_string();
            let admin = |args: &[&str]| {
                Command::new("tgtadm").arg("-C").arg(&port).args(args).stdin(Stdio::null()).output()
            };
            // tgtd ignores SIGTERM; it stops when told to, once it exports nothing.
            let _ = admin(&["--lld", "iscsi", "--mode", "target", "--op", "delete", "--force", "--tid", TID]);
            let _ = admin(&["--mode", "system", "--op", "delete"]);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                warn!(pid = self.child.id(), "tgtd did not stop; killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for f in [format!("socket.{}", self.control_port), format!("socket.{}.lock", self.control_port)] {
            let _ = std::fs::remove_file(Path::new(CONTROL_DIR).join(f));
        }
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A control port whose socket does not exist yet (tgtd's default, 0, may belong to the
/// machine's own tgt service). tgtd takes 0..=32767.
fn free_control_port() -> Result<u16> {
    for _ in 0..100 {
        let port = rand::random_range(1000..=32767u16);
        if !Path::new(CONTROL_DIR).join(format!("socket.{port}")).exists() {
            return Ok(port);
        }
    }
    bail!("no free tgtd control port found in {CONTROL_DIR}")
}
