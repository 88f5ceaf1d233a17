//! Harness for end-to-end tests: real `storaged` processes started through the same code as
//! `basalt dev up`, each cluster in its own temporary directory, stopped when dropped.

pub mod initiator;

use anyhow::{bail, Context, Result};
use basalt_cli::dev::{self, ClusterFile, UpOptions};
use basalt_storaged_client::StorageClient;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct TestCluster {
    pub file: ClusterFile,
    pub opts: UpOptions,
    dir: tempfile::TempDir,
    passed: bool,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

impl TestCluster {
    /// Start an N-node cluster and wait until it is healthy.
    pub async fn start(nodes: usize, dead_timeout: Duration) -> Result<TestCluster> {
        init_tracing();
        let dir = tempfile::Builder::new().prefix("basalt-test-").tempdir()?;
        let mut opts = UpOptions::new(dir.path().join("cluster"), nodes);
        opts.dead_timeout = dead_timeout;
        // Each node writes its new journal in full once: the smallest ring keeps that short.
        opts.journal_bytes = Some(basalt_chunkstore::MIN_JOURNAL_BYTES);
        // BASALT_TEST_LOG overrides the nodes' log filter (e.g. "debug") when chasing a bug.
        let filter = std::env::var("BASALT_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn,quinn=warn".into());
        opts.env.push(("RUST_LOG".into(), filter));
        if !opts.storaged_bin.exists() {
            bail!(
                "storaged binary not found at {} — build it first (`cargo build -p basalt-storaged`)",
                opts.storaged_bin.display()
            );
        }
        let file = dev::up(&opts).await?;
        Ok(TestCluster { file, opts, dir, passed: false })
    }

    /// Marks the test as passed: its directory is removed when the cluster is dropped.
    /// Without this (an error returned or a panic), the nodes' logs are kept for inspection.
    pub fn passed(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn client(&self) -> Result<Arc<StorageClient>> {
        self.file.client()
    }

    pub fn kill(&mut self, node: &str) -> Result<()> {
        dev::kill_node(&mut self.file, node)
    }

    pub fn start_node(&mut self, node: &str) -> Result<()> {
        dev::start_node(&mut self.file, node, &self.opts).map(|_| ())
    }

    pub fn kill_all(&mut self) -> Result<()> {
        let names: Vec<String> =
            self.file.nodes.iter().filter(|n| n.pid.is_some_and(dev::pid_alive)).map(|n| n.name.clone()).collect();
        for n in names {
            self.kill(&n)?;
        }
        Ok(())
    }

    /// Start every stopped node and wait until the cluster is healthy.
    pub async fn restart_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.file.nodes.iter().map(|n| n.name.clone()).collect();
        for n in names {
            if !self.file.node(&n)?.pid.is_some_and(dev::pid_alive) {
                self.start_node(&n)?;
            }
        }
        dev::wait_healthy(&self.file, Duration::from_secs(90)).await
    }

    pub fn nbd_uri(&self, node: &str, volume: &str) -> Result<String> {
        Ok(format!("{}/{}", self.file.node(node)?.nbd_uri, volume))
    }

    /// Name of the node whose id is `id`.
    pub fn name_of(&self, id: u64) -> Result<String> {
        Ok(self.file.node(&id.to_string())?.name.clone())
    }

    /// Log of a node, for assertions on what it did.
    pub fn log(&self, node: &str) -> Result<String> {
        let path = &self.file.node(node)?.log;
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = dev::down(&mut self.file, Duration::from_secs(2));
        let keep_all = std::env::var_os("BASALT_KEEP_TEST_DIRS").is_some();
        if !self.passed || keep_all {
            // Keep the logs of a failed test for inspection; drop the bulky data unless asked.
            let kept = self.dir.path().to_path_buf();
            if !keep_all {
                remove_bulk(&kept);
            }
            if let Ok(dir) = tempfile::TempDir::new() {
                let _ = std::mem::replace(&mut self.dir, dir).keep();
                eprintln!("cluster directory kept (logs): {}", kept.display());
            }
        }
    }
}

/// Removes the test's data files (images, chunk replicas), keeping logs and metadata.
fn remove_bulk(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name.starts_with("disk") || name == "chunks" {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                remove_bulk(&path);
            }
        } else if name.ends_with(".img") {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Poll `check` until it returns Ok(Some(v)) or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The S3 gateways of a test cluster (`http://` endpoints, by node) and the admin key
/// `dev up` created, as S3 clients are given them.
pub struct S3Access {
    pub endpoints: Vec<String>,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

impl TestCluster {
    pub fn s3(&self) -> Result<S3Access> {
        let admin = self.file.s3_admin.clone().context("cluster.json has no S3 admin key")?;
        let endpoints = self
            .file
            .nodes
            .iter()
            .map(|n| n.s3_addr.map(|a| format!("http://{a}")).with_context(|| format!("{} has no S3 endpoint", n.name)))
            .collect::<Result<_>>()?;
        Ok(S3Access { endpoints, access_key: admin.access_key, secret_key: admin.secret_key, region: admin.region })
    }
}

/// Is a command available? Tests that need it fail loudly when it is not: the test script
/// installs it.
pub fn require(tool: &str) -> Result<()> {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output()?.status.success();
    if !ok {
        bail!("{tool} is not installed (scripts/install-deps.sh installs it)");
    }
    Ok(())
}

/// A file of random bytes.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Result<()> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    std::fs::write(path, &buf)?;
    Ok(())
}

/// Copy with `nbdcopy` (libnbd), failing with its stderr.
pub fn nbdcopy(src: &str, dst: &str) -> Result<()> {
    let out = Command::new("nbdcopy").arg(src).arg(dst).output().context("running nbdcopy")?;
    if !out.status.success() {
        bail!("nbdcopy {src} {dst} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Compare two files; on difference, say where.
pub fn assert_same_file(a: &Path, b: &Path) -> Result<()> {
    let x = std::fs::read(a)?;
    let y = std::fs::read(b)?;
    if x.len() != y.len() {
        bail!("{} is {} bytes, {} is {}", a.display(), x.len(), b.display(), y.len());
    }
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        bail!("{} and {} differ first at byte {i} (block {})", a.display(), b.display(), i / 4096);
    }
    Ok(())
}

pub fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
