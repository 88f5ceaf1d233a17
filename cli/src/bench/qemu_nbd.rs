//! QEMU's `qemu-nbd` serving the local baseline file: the NBD reference of `bench block`.
//!
//! fio's NBD engine (libnbd) adds a socket round trip and its own work to every I/O, on both
//! sides of the socket, whoever the server is. A local file served by `qemu-nbd` with the same
//! durability contract as our export (`--cache=directsync`: `O_DIRECT | O_DSYNC`, each write
//! durable when it completes) and no replication measures what NBD itself costs on this
//! machine, as reached by a mature single-node server, against which a goal stated relative
//! to the local file can be judged. (Its writes are no ceiling: at queue depth 32 it
//! reaches about a fifth of the local file's durable write rate here.)
//!
//! Served from memory instead ([`QemuNbd::start_in_memory`]: a file in tmpfs, through the
//! page cache), a QD1 read measures the NBD client's own round trip with no disk behind it:
//! the part of every QD1 figure through this client that no server can remove.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The export name qemu-nbd serves the file under.
const EXPORT: &str = "local";
/// How long qemu-nbd may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `qemu-nbd`; killed when dropped.
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    pid: u32,
}

impl QemuNbd {
    /// Serves `file` on a unix socket in `scratch`. `Ok(None)` when qemu-nbd is not
    /// installed (the report then has no NBD reference).
    pub async fn start(file: &Path, scratch: &Path) -> Result<Option<QemuNbd>> {
        Self::spawn(file, &scratch.join("qemu-nbd.sock"), &["--cache=directsync", "--aio=native"]).await
    }

    /// Serves `file`, which lives in memory (tmpfs), through the page cache, on a unix
    /// socket in `scratch`. `Ok(None)` when qemu-nbd is not installed.
    pub async fn start_in_memory(file: &Path, scratch: &Path) -> Result<Option<QemuNbd>> {
        Self::spawn(file, &scratch.join("qemu-nbd-memory.sock"), &["--cache=writeback"]).await
    }

    async fn spawn(file: &Path, socket: &Path, cache: &[&str]) -> Result<Option<QemuNbd>> {
        Self::spawn_program("qemu-nbd", file, socket, cache).await
    }

    async fn spawn_program(program: &str, file: &Path, socket: &Path, cache: &[&str]) -> Result<Option<QemuNbd>> {
        let socket = socket.to_path_buf();
        let _ = std::fs::remove_file(&socket);
        let spawned = Command::new(program)
            .arg("--persistent")
            .arg("--shared=8")
            .arg("--format=raw")
            .args(cache)
            .arg(format!("--export-name={EXPORT}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!("starting qemu-nbd: {e}")),
        };
        let pid = child.id().ok_or_else(|| anyhow!("qemu-nbd exited at once"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // qemu-nbd listens before it opens the file, and exits if it cannot: a connection
            // alone proves nothing. The greeting is sent only once the export is open.
            if let Ok(mut conn) = tokio::net::UnixStream::connect(&socket).await {
                let mut magic = [0u8; 8];
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, tokio::io::AsyncReadExt::read_exact(&mut conn, &mut magic)).await {
                    Ok(Ok(_)) if &magic == b"NBDMAGIC" => break,
                    Ok(Ok(_)) => bail!("qemu-nbd on {} greeted with {magic:?}, not NBDMAGIC", socket.display()),
                    // Closed without a greeting: it is exiting (seen below, or on a later turn).
                    Ok(Err(_)) => {}
                    Err(_) => bail!("qemu-nbd accepted on {} but sent no greeting within {START_TIMEOUT:?}", socket.display()),
                }
            }
            if let Some(status) = child.try_wait().context("waiting for qemu-nbd")? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await;
                }
                bail!("qemu-nbd exited ({status}) before listening: {}", err.trim());
            }
            if Instant::now() >= deadline {
                bail!("qemu-nbd did not listen on {} within {START_TIMEOUT:?}", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Some(QemuNbd { child, socket, pid }))
    }

    /// The NBD URI fio connects to.
    pub fn uri(&self) -> String {
        super::block::unix_uri(&self.socket, EXPORT)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops qemu-nbd and removes its socket.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the real qemu-nbd when installed: it serves the file's bytes under our export
    /// name, and stopping it removes the socket.
    #[tokio::test]
    async fn serves_the_file_under_its_export_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let mut data = vec![0u8; 1 << 20];
        data[4096..4100].copy_from_slice(b"abcd");
        std::fs::write(&file, &data).unwrap();
        let Some(q) = QemuNbd::start(&file, dir.path()).await.unwrap() else {
            eprintln!("SKIPPED: qemu-nbd is not installed (scripts/install-deps.sh installs qemu-utils)");
            return;
        };
        let uri = q.uri();
        assert!(uri.starts_with("nbd+unix:///local?socket="), "{uri}");
        // qemu-io comes in the same package as qemu-nbd; `read -v` dumps the bytes in hex.
        let dump = |offset: u64| {
            let out = std::process::Command::new("qemu-io")
                .args(["-r", "-f", "raw", "-c", &format!("read -v {offset} 4"), &uri])
                .output()
                .expect("qemu-io (installed with qemu-nbd)");
            assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert!(dump(4096).contains("61 62 63 64"), "{}", dump(4096));
        assert!(dump(0).contains("00 00 00 00"), "{}", dump(0));
        let socket = q.socket.clone();
        q.stop().await;
        assert!(!socket.exists());
    }

    /// qemu-nbd listens before it opens its file and exits when it cannot: a server that
    /// accepts a connection and then goes away is an error, not a server (this used to pass
    /// the start-up check whenever the connection won the race, failing the test below now
    /// and then). A stand-in does the same, slowly enough to lose no race.
    #[tokio::test]
    async fn a_server_that_listens_then_exits_is_not_taken_for_serving() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = dir.path().join("fake-qemu-nbd");
        let script = "#!/usr/bin/env python3\n\
import socket, sys, time\n\
path = [a for a in sys.argv if a.startswith('--socket=')][0].split('=', 1)[1]\n\
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)\n\
time.sleep(0.5)\n\
sys.stderr.write('fake: could not open the file\\n'); sys.exit(1)\n";
        std::fs::write(&fake, script).expect("script");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        if std::process::Command::new("python3").arg("-c").arg("pass").status().map_or(true, |s| !s.success()) {
            eprintln!("SKIPPED: python3 is needed for the stand-in server");
            return;
        }
        let socket = dir.path().join("s.sock");
        let started = QemuNbd::spawn_program(fake.to_str().expect("utf-8 path"), &dir.path().join("f"), &socket, &[]).await;
        match started {
            Ok(_) => panic!("a server that exited without serving was taken for running"),
            Err(e) => assert!(e.to_string().contains("could not open the file"), "{e}"),
        }
    }

    #[tokio::test]
    async fn a_missing_file_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        match QemuNbd::start(&dir.path().join("absent"), dir.path()).await {
            Ok(None) => eprintln!("SKIPPED: qemu-nbd is not installed"),
            Ok(Some(_)) => panic!("qemu-nbd served a file that does not exist"),
            Err(e) => assert!(e.to_string().contains("qemu-nbd exited"), "{e}"),
        }
    }
}
