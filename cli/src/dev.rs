//! A real multi-node Basalt cluster on this machine, for development, tests, benchmarks and
//! demos: each node is a `storaged` process with its own data directories and addresses.
//!
//! The cluster lives in a directory: `cluster.json` (what runs where), `certs/` (the cluster CA
//! and one identity per node plus `admin`), and one `nodeN/` folder per node with its
//! `config.json`, data and metadata directories, NBD socket and log.

use crate::sizes::parse_duration;
use anyhow::{anyhow, bail, Context, Result};
use basalt_rpc::{ClusterCa, Identity, RpcEndpoint};
use basalt_storaged_client::{ClientConfig, StorageClient};
use basalt_types::NodeState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CLUSTER_FILE: &str = "cluster.json";
pub const ADMIN: &str = "admin";
/// The region local clusters' S3 gateways sign for (the AWS default, so clients need no
/// region setting).
pub const S3_REGION: &str = "us-east-1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub dir: PathBuf,
    pub certs_dir: PathBuf,
    /// Identity (in `certs_dir`) that the CLI and tests use to talk to the cluster.
    pub admin_identity: String,
    pub nodes: Vec<NodeEntry>,
    /// The S3 account `basalt dev up` creates for the admin, with its first key.
    #[serde(default)]
    pub s3_admin: Option<S3Credentials>,
}

/// An S3 access key, as `cluster.json` gives it to clients and tests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct S3Credentials {
    pub account: String,
    pub access_key: String,
    pub secret_key: String,
    /// The region the gateways sign for.
    pub region: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u64,
    pub name: String,
    /// Process id while running (None when stopped or killed).
    pub pid: Option<u32>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub data_dirs: Vec<PathBuf>,
    pub meta_dir: PathBuf,
    pub rpc_addr: SocketAddr,
    pub nbd_addr: SocketAddr,
    pub nbd_socket: PathBuf,
    /// `nbd://host:port` — append `/<volume>` for an export.
    pub nbd_uri: String,
    /// Whether this node is one of the initial metadata voters.
    pub voter: bool,
    /// iSCSI target portal of the node (every node serves every target: multipath).
    #[serde(default)]
    pub iscsi_addr: Option<SocketAddr>,
    /// S3 gateway endpoint of the node (`http://` + this); every node serves every bucket.
    #[serde(default)]
    pub s3_addr: Option<SocketAddr>,
    /// The same gateway over HTTPS (`https://` + this), its certificate issued by the
    /// cluster CA (`<certs_dir>/ca.pem`) for `localhost` and the address.
    #[serde(default)]
    pub s3_tls_addr: Option<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct UpOptions {
    pub dir: PathBuf,
    pub nodes: usize,
    pub disks_per_node: usize,
    /// Seconds of silence after which a node is dead and its chunks re-replicated.
    pub dead_timeout: Duration,
    pub storaged_bin: PathBuf,
    pub wait: Duration,
    /// Extra environment for the nodes (e.g. RUST_LOG).
    pub env: Vec<(String, String)>,
    /// Scrub rate per node in bytes/s (0 = off) and the pause between passes.
    pub scrub_bytes_per_sec: u64,
    pub scrub_interval: Duration,
    /// Fewest replicas a chunk may be allocated with or dropped to (storaged's
    /// `min_replicas`): 2, or 1 on a one-node cluster, whose chunks can only ever have one.
    pub min_replicas: u32,
    /// Journal ring per data directory (storaged's `journal_bytes`); None: storaged's default.
    /// Tests use the smallest, as each new journal is written in full once.
    pub journal_bytes: Option<u64>,
}

impl UpOptions {
    pub fn new(dir: impl Into<PathBuf>, nodes: usize) -> Self {
        Self {
            dir: dir.into(),
            nodes,
            disks_per_node: 1,
            dead_timeout: Duration::from_secs(30),
            storaged_bin: default_storaged_bin(),
            wait: Duration::from_secs(90),
            env: Vec::new(),
            scrub_bytes_per_sec: 32 << 20,
            scrub_interval: Duration::from_secs(600),
            min_replicas: nodes.clamp(1, 2) as u32,
            journal_bytes: None,
        }
    }
}

/// `$BASALT_STORAGED`, else `storaged` next to the running executable (or one directory up,
/// where cargo puts binaries relative to test executables in `deps/`).
pub fn default_storaged_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BASALT_STORAGED") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            for cand in [dir.join("storaged"), dir.join("../storaged")] {
                if cand.exists() {
                    return cand;
                }
            }
        }
    }
    PathBuf::from("storaged")
}

/// Picks free ports for a node's listeners. They come from below the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`): a port the kernel hands out for outgoing
/// connections could otherwise be taken by some client's socket while its node is down, and
/// `basalt dev start` would then fail with "address in use".
struct PortPicker {
    ip: String,
    range: std::ops::Range<u16>,
    taken: std::collections::HashSet<u16>,
}

impl PortPicker {
    /// Lowest port we hand out: clear of the well-known and commonly configured ones.
    const FLOOR: u16 = 10_000;

    fn new(ip: &str) -> PortPicker {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
            .unwrap_or(32_768);
        PortPicker { ip: ip.to_owned(), range: Self::FLOOR..ephemeral_low.max(Self::FLOOR), taken: Default::default() }
    }

    fn udp(&mut self) -> Result<SocketAddr> {
        self.pick(|addr| std::net::UdpSocket::bind(addr).and_then(|s| s.local_addr()))
    }

    fn tcp(&mut self) -> Result<SocketAddr> {
        self.pick(|addr| std::net::TcpListener::bind(addr).and_then(|s| s.local_addr()))
    }

    fn pick(&mut self, bind: impl Fn(SocketAddr) -> std::io::Result<SocketAddr>) -> Result<SocketAddr> {
        let ip: std::net::IpAddr = self.ip.parse().with_context(|| format!("bad address {:?}", self.ip))?;
        if self.range.len() > 100 {
            for _ in 0..200 {
                let port = rand::random_range(self.range.clone());
                if self.taken.contains(&port) {
                    continue;
                }
                if let Ok(addr) = bind(SocketAddr::new(ip, port)) {
                    self.taken.insert(port);
                    return Ok(addr);
                }
            }
        }
        // The range below the ephemeral ones is tiny or full: let the kernel choose.
        let addr = bind(SocketAddr::new(ip, 0))?;
        self.taken.insert(addr.port());
        Ok(addr)
    }
}

impl ClusterFile {
    pub fn load(dir: &Path) -> Result<ClusterFile> {
        let path = dir.join(CLUSTER_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("no cluster at {} (run `basalt dev up`)", dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self) -> Result<()> {
        let path = self.dir.join(CLUSTER_FILE);
        let tmp = self.dir.join(format!("{CLUSTER_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn node(&self, name_or_id: &str) -> Result<&NodeEntry> {
        self.nodes
            .iter()
            .find(|n| n.name == name_or_id || n.id.to_string() == name_or_id)
            .ok_or_else(|| anyhow!("no node {name_or_id:?} in this cluster"))
    }

    fn node_mut(&mut self, name_or_id: &str) -> Result<&mut NodeEntry> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name_or_id || n.id.to_string() == name_or_id)
            .ok_or_else(|| anyhow!("no node {name_or_id:?} in this cluster"))
    }

    /// A client speaking to the cluster with the admin identity.
    pub fn client(&self) -> Result<Arc<StorageClient>> {
        let identity = Identity::load(&self.certs_dir, &self.admin_identity)?;
        let rpc = RpcEndpoint::client_only(&identity)?;
        let seeds = self.nodes.iter().map(|n| n.rpc_addr).collect();
        Ok(StorageClient::new(rpc, ClientConfig::new(seeds)))
    }

    pub fn rpc_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.rpc_addr).collect()
    }
}

/// Is a process with this pid alive (and not a zombie)?
/// Whether process `pid` still runs (or is still exiting). A zombie counts as gone, but only
/// once all its threads are: the thread-group leader turns zombie as soon as it exits, while
/// other threads may still be tearing down (an io_uring waits for its I/O in flight), and
/// until the last one has, the process keeps its files, listening sockets included, so a
/// restarted node would find its ports in use.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| task_running(&t.path().join("stat")))
}

fn task_running(stat: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(stat) else { return false };
    // Field 3 (after the parenthesised command name) is the state; Z = zombie, X = dead.
    match stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) {
        Some("Z") | Some("X") | None => false,
        Some(_) => true,
    }
}

/// Create (or restart) a cluster and wait until it is healthy.
pub async fn up(opts: &UpOptions) -> Result<ClusterFile> {
    if opts.nodes == 0 {
        bail!("a cluster needs at least one node");
    }
    std::fs::create_dir_all(&opts.dir)?;
    let dir = std::fs::canonicalize(&opts.dir)?;
    if dir.join(CLUSTER_FILE).exists() {
        let mut cluster = ClusterFile::load(&dir)?;
        let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            let running = cluster.node(&name)?.pid.is_some_and(pid_alive);
            if !running {
                start_node(&mut cluster, &name, opts)?;
            }
        }
        cluster.save()?;
        wait_healthy(&cluster, opts.wait).await?;
        return Ok(cluster);
    }
    if !opts.storaged_bin.exists() && which(&opts.storaged_bin).is_none() {
        bail!("storaged binary not found at {} (build it, or set BASALT_STORAGED)", opts.storaged_bin.display());
    }
    let certs_dir = dir.join("certs");
    std::fs::create_dir_all(&certs_dir)?;
    let ca = ClusterCa::generate("basalt-dev")?;
    ca.save(&certs_dir)?;
    ca.issue(ADMIN)?.save(&certs_dir, ADMIN)?;

    let voters = opts.nodes.min(3);
    let mut nodes = Vec::new();
    let mut ports = PortPicker::new("127.0.0.1");
    for i in 1..=opts.nodes {
        let name = format!("node{i}");
        ca.issue(&name)?.save(&certs_dir, &name)?;
        let ndir = dir.join(&name);
        let data_dirs: Vec<PathBuf> = (0..opts.disks_per_node).map(|d| ndir.join(format!("disk{d}"))).collect();
        for d in &data_dirs {
            std::fs::create_dir_all(d)?;
        }
        let rpc_addr = ports.udp()?;
        let nbd_addr = ports.tcp()?;
        let iscsi_addr = ports.tcp()?;
        let s3_addr = ports.tcp()?;
        let s3_tls_addr = ports.tcp()?;
        let s3_sans = ["localhost".to_owned(), s3_tls_addr.ip().to_string()];
        ca.issue_server(&format!("{name}-s3"), &s3_sans)?.save(&certs_dir, &format!("{name}-s3"))?;
        nodes.push(NodeEntry {
            id: i as u64,
            name: name.clone(),
            pid: None,
            config: ndir.join("config.json"),
            log: ndir.join("storaged.log"),
            data_dirs,
            meta_dir: ndir.join("meta"),
            rpc_addr,
            nbd_addr,
            nbd_socket: ndir.join("nbd.sock"),
            nbd_uri: format!("nbd://{nbd_addr}"),
            voter: i <= voters,
            iscsi_addr: Some(iscsi_addr),
            s3_addr: Some(s3_addr),
            s3_tls_addr: Some(s3_tls_addr),
        });
    }
    let initial_voters: BTreeMap<u64, SocketAddr> =
        nodes.iter().filter(|n| n.voter).map(|n| (n.id, n.rpc_addr)).collect();
    let worker_threads = cpu_share(nodes.len());
    for n in &nodes {
        let config = serde_json::json!({
            "node_id": n.id,
            "name": n.name,
            "certs_dir": certs_dir,
            "rpc_listen": n.rpc_addr,
            "nbd_listen": n.nbd_addr,
            "nbd_socket": n.nbd_socket,
            "iscsi_listen": n.iscsi_addr,
            "s3_listen": n.s3_addr,
            "s3_tls_listen": n.s3_tls_addr,
            "s3_tls_cert": certs_dir.join(format!("{}-s3.pem", n.name)),
            "s3_tls_key": certs_dir.join(format!("{}-s3.key", n.name)),
            "s3_region": S3_REGION,
            "data_dirs": n.data_dirs,
            "meta_dir": n.meta_dir,
            "initial_voters": initial_voters,
            "seeds": nodes.iter().map(|m| m.rpc_addr).collect::<Vec<_>>(),
            "dead_timeout": humantime::format_duration(opts.dead_timeout).to_string(),
            "scrub_bytes_per_sec": opts.scrub_bytes_per_sec,
            "scrub_interval": humantime::format_duration(opts.scrub_interval).to_string(),
            "min_replicas": opts.min_replicas,
            "worker_threads": worker_threads,
            // Nodes of one machine share its CPUs: their wake-ups should not preempt each
            // other (see storaged's `sched_batch`).
            "sched_batch": nodes.len() > 1,
        });
        let mut config = config;
        if let (Some(bytes), Some(obj)) = (opts.journal_bytes, config.as_object_mut()) {
            obj.insert("journal_bytes".into(), bytes.into());
        }
        std::fs::write(&n.config, serde_json::to_vec_pretty(&config)?)?;
    }
    let mut cluster = ClusterFile { dir: dir.clone(), certs_dir, admin_identity: ADMIN.into(), nodes, s3_admin: None };
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for name in &names {
        start_node(&mut cluster, name, opts)?;
    }
    cluster.save()?;
    wait_healthy(&cluster, opts.wait).await?;
    let store = crate::s3::admin_store(cluster.client()?);
    let (account, key) = store.create_account(ADMIN).await.map_err(|e| anyhow!("creating the S3 admin account: {e}"))?;
    cluster.s3_admin = Some(S3Credentials {
        account: account.id,
        access_key: key.id,
        secret_key: key.secret,
        region: S3_REGION.into(),
    });
    cluster.save()?;
    Ok(cluster)
}

/// Async worker threads per node when `nodes` nodes share this machine: an equal share of
/// its CPUs but one, at least one. The CPU left over is for what the nodes serve on this same
/// machine (fio, initiators, VMs) and for the kernel's network and block work. Workers beyond
/// the CPUs actually free only add wake-ups: tokio wakes an idle worker to look for work each
/// time one is scheduled, so an idle second worker costs every I/O a futex round trip. On 2
/// CPUs, a 1-node cluster with 1 worker instead of 2 used 10-20% less CPU per I/O in `basalt
/// bench iscsi` (random reads at QD1: 102 instead of 114-140 µs).
fn cpu_share(nodes: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    worker_share(cpus, nodes)
}

fn worker_share(cpus: usize, nodes: usize) -> usize {
    (cpus.saturating_sub(1) / nodes.max(1)).max(1)
}

fn which(bin: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(bin)).find(|p| p.exists())
}

/// Start one node's process (detached from our process group, logging to its file).
pub fn start_node(cluster: &mut ClusterFile, name: &str, opts: &UpOptions) -> Result<u32> {
    let node = cluster.node_mut(name)?;
    if let Some(pid) = node.pid {
        if pid_alive(pid) {
            bail!("{} is already running (pid {pid})", node.name);
        }
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
    let mut cmd = std::process::Command::new(&opts.storaged_bin);
    cmd.arg("--config")
        .arg(&node.config)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", opts.storaged_bin.display()))?;
    let pid = child.id();
    // The child outlives us (the CLI exits); a reaper thread avoids zombies while we live.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    node.pid = Some(pid);
    Ok(pid)
}

/// SIGKILL a node (a crash, as far as the cluster can tell).
pub fn kill_node(cluster: &mut ClusterFile, name: &str) -> Result<()> {
    let node = cluster.node_mut(name)?;
    let pid = node.pid.filter(|p| pid_alive(*p)).ok_or_else(|| anyhow!("{} is not running", node.name))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    node.pid = None;
    Ok(())
}

/// Stop every node: SIGTERM, then SIGKILL after `grace`.
pub fn down(cluster: &mut ClusterFile, grace: Duration) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for n in &cluster.nodes {
        if let Some(pid) = n.pid.filter(|p| pid_alive(*p)) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && cluster.nodes.iter().any(|n| n.pid.is_some_and(pid_alive)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in &mut cluster.nodes {
        if let Some(pid) = n.pid.filter(|p| pid_alive(*p)) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        n.pid = None;
    }
    Ok(())
}

/// Wait until a leader exists and every running node is registered and alive, and every
/// running node's NBD port accepts connections.
pub async fn wait_healthy(cluster: &ClusterFile, timeout: Duration) -> Result<()> {
    let client = cluster.client()?;
    let deadline = Instant::now() + timeout;
    let running: Vec<&NodeEntry> = cluster.nodes.iter().filter(|n| n.pid.is_some_and(pid_alive)).collect();
    let mut last = String::from("no answer yet");
    loop {
        if Instant::now() >= deadline {
            bail!("cluster not healthy after {timeout:?}: {last} (logs in {})", cluster.dir.display());
        }
        for n in &running {
            if !n.pid.is_some_and(pid_alive) {
                bail!("{} exited during start-up; see {}", n.name, n.log.display());
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), client.status()).await {
            Ok(Ok(status)) => {
                let alive: Vec<u64> = status
                    .nodes
                    .iter()
                    .filter(|s| s.info.state == NodeState::Alive && s.last_seen_ms_ago.is_some_and(|ms| ms < 5000))
                    .map(|s| s.info.id)
                    .collect();
                let missing: Vec<&str> =
                    running.iter().filter(|n| !alive.contains(&n.id)).map(|n| n.name.as_str()).collect();
                if status.leader.is_some() && missing.is_empty() {
                    let nbd_ok = running.iter().all(|n| std::net::TcpStream::connect_timeout(&n.nbd_addr, Duration::from_secs(1)).is_ok());
                    if nbd_ok {
                        return Ok(());
                    }
                    last = "NBD ports not open yet".into();
                } else {
                    last = format!("leader {:?}, not yet alive: {missing:?}", status.leader);
                }
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "status timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Parse `--dead-timeout` style values ("10s", "1m").
pub fn duration_arg(s: &str) -> Result<Duration> {
    parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::worker_share;

    #[test]
    fn nodes_share_every_cpu_but_one_and_get_at_least_one_worker() {
        assert_eq!(worker_share(2, 1), 1);
        assert_eq!(worker_share(2, 3), 1);
        assert_eq!(worker_share(1, 1), 1);
        assert_eq!(worker_share(8, 3), 2);
        assert_eq!(worker_share(16, 1), 15);
        assert_eq!(worker_share(4, 0), 3, "no nodes is treated as one");
    }
}
