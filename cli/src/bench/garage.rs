//! Garage, the peer `bench s3` measures our gateway against: finding (or building) the
//! `garage` binary, and a private cluster of it on this machine — 3 nodes on loopback, each in
//! its own zone, `replication_factor = 3` — with a bucket and a key, stopped and deleted on drop.
//!
//! Everything is driven through the `garage` command (v2): `json-api <Endpoint> <json>` calls
//! the admin API over the nodes' RPC, so no admin token or HTTP admin port is needed and the
//! answers are JSON rather than tables meant for people.
//!
//! Durability. Garage's defaults do not fsync (`data_fsync` and `metadata_fsync` are off),
//! while our gateway acknowledges a PUT only once its data and index entry are durable on
//! every replica. By default we turn both on, so the two are compared under the same contract;
//! [`GarageOptions::fsync`] off measures Garage as shipped. The scrubber is disabled (as our
//! cluster's is) so it does not compete with the measured I/O.

use super::progress;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tracing::warn;

/// Where `bench s3` installs Garage when it is not on PATH (a one-time build).
pub const INSTALL_ROOT: &str = "/var/tmp/garage";
/// Capacity each node declares in the layout. With 3 nodes in 3 zones and 3 replicas every
/// node holds every partition, so the figure only has to be equal across nodes.
const NODE_CAPACITY: u64 = 100 << 30;
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `garage` on PATH, else the one `bench s3` installed earlier.
pub fn find_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("garage")).find(|p| p.is_file()));
    on_path.or_else(|| {
        let installed = Path::new(INSTALL_ROOT).join("bin/garage");
        installed.is_file().then_some(installed)
    })
}

/// [`find_binary`], else build Garage from crates.io into [`INSTALL_ROOT`] (20+ minutes on a
/// 2-core machine, once).
pub async fn find_or_install() -> Result<PathBuf> {
    if let Some(bin) = find_binary() {
        return Ok(bin);
    }
    progress(&format!(
        "garage is not installed: running `cargo install --locked garage --root {INSTALL_ROOT}` \
         (a one-time build of 20+ minutes on 2 cores; later runs reuse it)"
    ));
    let status = tokio::process::Command::new("cargo")
        .args(["install", "--locked", "garage", "--root", INSTALL_ROOT])
        .stdin(Stdio::null())
        .status()
        .await
        .context("running cargo install garage")?;
    if !status.success() {
        bail!("cargo install garage failed ({status})");
    }
    find_binary().ok_or_else(|| anyhow!("cargo install succeeded but {INSTALL_ROOT}/bin/garage is missing"))
}

/// The first line of `garage --version`, e.g. "garage v2.5.0 [features: ...]".
pub async fn version(bin: &Path) -> Result<String> {
    let out = tokio::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("garage (unknown version)").trim().to_string())
}

#[derive(Clone, Debug)]
pub struct GarageOptions {
    pub bin: PathBuf,
    /// Where the cluster's directory is created (a disk, not tmpfs).
    pub parent: PathBuf,
    pub nodes: usize,
    /// `data_fsync` and `metadata_fsync` (see the module doc).
    pub fsync: bool,
    /// The region the S3 API signs for.
    pub region: String,
}

/// One node's configuration file (TOML). Only the S3 API is served; the CLI reaches the admin
/// API over RPC.
pub fn config_toml(node_dir: &Path, rpc: SocketAddr, s3: SocketAddr, rpc_secret: &str, fsync: bool, region: &str) -> String {
    format!(
        r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "lmdb"
replication_factor = 3
metadata_fsync = {fsync}
data_fsync = {fsync}
disable_scrub = true

rpc_bind_addr = "{rpc}"
rpc_public_addr = "{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "{s3}"
root_domain = ".s3.garage.localhost"
"#,
        dir = node_dir.display(),
    )
}

pub struct GarageNode {
    pub name: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub rpc_addr: SocketAddr,
    pub s3_addr: SocketAddr,
    child: Child,
}

impl GarageNode {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A running Garage cluster; dropping it stops every node (SIGTERM to each node's process
/// group, SIGKILL after a grace period) and deletes its directory.
pub struct GarageCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub nodes: Vec<GarageNode>,
}

impl GarageCluster {
    /// Start the nodes, connect them, lay out 3 zones and wait until the cluster is healthy.
    pub async fn start(opts: &GarageOptions) -> Result<GarageCluster> {
        if opts.nodes == 0 {
            bail!("a Garage cluster needs at least one node");
        }
        let dir = tempfile::Builder::new()
            .prefix("basalt-bench-garage-")
            .tempdir_in(&opts.parent)
            .with_context(|| format!("creating a Garage directory in {}", opts.parent.display()))?;
        let mut cluster = GarageCluster { bin: opts.bin.clone(), dir, nodes: Vec::new() };
        let secret: [u8; 32] = rand::random();
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let ports = free_ports(2 * opts.nodes)?;
        for i in 0..opts.nodes {
            let name = format!("garage{}", i + 1);
            let node_dir = cluster.dir.path().join(&name);
            std::fs::create_dir_all(&node_dir).with_context(|| format!("creating {}", node_dir.display()))?;
            let (rpc_addr, s3_addr) = (ports[2 * i], ports[2 * i + 1]);
            let config = node_dir.join("garage.toml");
            std::fs::write(&config, config_toml(&node_dir, rpc_addr, s3_addr, &secret, opts.fsync, &opts.region))
                .with_context(|| format!("writing {}", config.display()))?;
            let log = node_dir.join("garage.log");
            let child = spawn_server(&opts.bin, &config, &log)?;
            // Pushed at once, so a later failure still stops this node on drop.
            cluster.nodes.push(GarageNode { name, config, log, rpc_addr, s3_addr, child });
        }
        cluster.connect_and_lay_out().await?;
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(GarageNode::pid).collect()
    }

    /// Create a key and a bucket and give the key every right on it; returns the access key
    /// id and its secret.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(String, String)> {
        let key = self.json_api("CreateKey", json!({ "name": "basalt-bench" })).await?;
        let access = str_field(&key, "accessKeyId")?;
        let secret = str_field(&key, "secretAccessKey")?;
        let created = self.json_api("CreateBucket", json!({ "globalAlias": bucket })).await?;
        let bucket_id = str_field(&created, "id")?;
        self.json_api(
            "AllowBucketKey",
            json!({
                "bucketId": bucket_id,
                "accessKeyId": access,
                "permissions": { "read": true, "write": true, "owner": true },
            }),
        )
        .await?;
        Ok((access, secret))
    }

    async fn connect_and_lay_out(&mut self) -> Result<()> {
        let mut ids = Vec::new();
        for i in 0..self.nodes.len() {
            ids.push(self.wait_node(i).await?);
        }
        // "<hex id>@<addr>": node 1 connects to the others; gossip does the rest.
        let peers: Vec<&String> = ids.iter().skip(1).collect();
        if !peers.is_empty() {
            let answers = self.json_api("ConnectClusterNodes", json!(peers)).await?;
            for (peer, a) in peers.iter().zip(answers.as_array().into_iter().flatten()) {
                if a.get("success").and_then(Value::as_bool) != Some(true) {
                    bail!("Garage could not connect to {peer}: {}", a.get("error").unwrap_or(&Value::Null));
                }
            }
        }
        let roles: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let hex = id.split('@').next().unwrap_or(id);
                json!({ "id": hex, "zone": format!("z{}", i + 1), "capacity": NODE_CAPACITY, "tags": [] })
            })
            .collect();
        let staged = self.json_api("UpdateClusterLayout", json!({ "roles": roles })).await?;
        let version = staged.get("version").and_then(Value::as_u64).ok_or_else(|| anyhow!("UpdateClusterLayout: no version in {staged}"))?;
        self.json_api("ApplyClusterLayout", json!({ "version": version + 1 })).await?;
        self.wait_healthy().await
    }

    /// Wait until node `i` answers over RPC; returns its "<id>@<addr>".
    async fn wait_node(&mut self, i: usize) -> Result<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let node = &mut self.nodes[i];
            if let Some(status) = node.child.try_wait().context("checking a Garage node")? {
                bail!("{} exited ({status}) during start-up; see {}", node.name, node.log.display());
            }
            let id = garage_cmd(&self.bin, &self.nodes[i].config, &["node", "id", "-q"]).await;
            let health = garage_cmd(&self.bin, &self.nodes[i].config, &["json-api", "GetClusterHealth"]).await;
            match (id, health) {
                (Ok(id), Ok(_)) => return Ok(id.trim().to_string()),
                (Err(e), _) | (_, Err(e)) if Instant::now() >= deadline => {
                    return Err(e.context(format!("{} did not start within {START_TIMEOUT:?}", self.nodes[i].name)))
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    async fn wait_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let health = self.json_api("GetClusterHealth", Value::Null).await?;
            if health.get("status").and_then(Value::as_str) == Some("healthy") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the Garage cluster is not healthy after {START_TIMEOUT:?}: {health}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// `garage json-api ENDPOINT PAYLOAD` through node 1 (Null: an endpoint without payload).
    async fn json_api(&self, endpoint: &str, payload: Value) -> Result<Value> {
        let node = self.nodes.first().ok_or_else(|| anyhow!("the Garage cluster has no node"))?;
        let payload = payload.to_string();
        let mut args = vec!["json-api", endpoint];
        if payload != "null" {
            args.push(&payload);
        }
        let out = garage_cmd(&self.bin, &node.config, &args).await?;
        serde_json::from_str(&out).with_context(|| format!("garage json-api {endpoint} printed no JSON: {out}"))
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        for n in &self.nodes {
            // Each node leads its own process group (see `spawn_server`).
            let _ = killpg(Pid::from_raw(n.pid() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in &mut self.nodes {
            loop {
                match n.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    _ => {
                        let _ = killpg(Pid::from_raw(n.child.id() as i32), Signal::SIGKILL);
                        if let Err(e) = n.child.wait() {
                            warn!(node = %n.name, error = %e, "waiting for a killed Garage node");
                        }
                        break;
                    }
                }
            }
        }
        // The TempDir deletes the data when it drops, after this.
    }
}

fn spawn_server(bin: &Path, config: &Path, log: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    std::process::Command::new(bin)
        .arg("-c")
        .arg(config)
        .arg("server")
        // Garage logs every request at INFO; at thousands of requests a second that is CPU
        // our gateway (which does not) would not be spending.
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} server", bin.display()))
}

/// Run the `garage` command against one node's configuration; its stdout on success.
async fn garage_cmd(bin: &Path, config: &Path, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("garage {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("garage {} printed non-UTF-8", args.join(" ")))
}

fn str_field(v: &Value, field: &str) -> Result<String> {
    v.get(field).and_then(Value::as_str).map(str::to_string).ok_or_else(|| anyhow!("no {field} in Garage's answer {v}"))
}

/// `n` distinct free loopback ports (bound together, then released for the nodes to take).
fn free_ports(n: usize) -> Result<Vec<SocketAddr>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("picking free loopback ports")?;
    listeners.iter().map(|l| l.local_addr().context("reading a bound port")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_replicates_three_times_and_fsyncs_only_when_asked() {
        let rpc: SocketAddr = "127.0.0.1:4001".parse().expect("addr");
        let s3: SocketAddr = "127.0.0.1:4002".parse().expect("addr");
        let durable = config_toml(Path::new("/v/g1"), rpc, s3, "ab12", true, "us-east-1");
        assert!(durable.contains("replication_factor = 3\n"), "{durable}");
        assert!(durable.contains("data_fsync = true\n") && durable.contains("metadata_fsync = true\n"), "{durable}");
        assert!(durable.contains(r#"metadata_dir = "/v/g1/meta""#), "{durable}");
        assert!(durable.contains(r#"api_bind_addr = "127.0.0.1:4002""#), "{durable}");
        assert!(durable.contains(r#"rpc_public_addr = "127.0.0.1:4001""#), "{durable}");
        assert!(durable.contains(r#"s3_region = "us-east-1""#), "{durable}");
        let shipped = config_toml(Path::new("/v/g1"), rpc, s3, "ab12", false, "us-east-1");
        assert!(shipped.contains("data_fsync = false\n"), "{shipped}");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(6).expect("ports");
        let mut unique: Vec<u16> = ports.iter().map(SocketAddr::port).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 6);
    }
}
