//! Node configuration: a serde file format with documented defaults, validated once into
//! [`Config`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The on-disk form (JSON) of a node's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Unique id of this node in the cluster (> 0).
    pub node_id: u64,
    /// Human name, also the CN of the node certificate (`<certs_dir>/<name>.pem`).
    pub name: String,
    /// Directory with `ca.pem`, `<name>.pem` and `<name>.key`.
    pub certs_dir: PathBuf,
    /// UDP address for QUIC node-to-node RPC.
    pub rpc_listen: SocketAddr,
    /// Address other nodes use to reach `rpc_listen` (default: `rpc_listen`).
    #[serde(default)]
    pub rpc_advertise: Option<SocketAddr>,
    /// TCP address of the NBD export.
    pub nbd_listen: SocketAddr,
    /// Unix socket of the NBD export (optional).
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    /// TCP address of the iSCSI target portal (optional; 3260 is the standard port). It is
    /// published to the cluster, so use an address initiators can reach.
    #[serde(default)]
    pub iscsi_listen: Option<SocketAddr>,
    /// TCP address of the S3 gateway (optional; plain HTTP).
    #[serde(default)]
    pub s3_listen: Option<SocketAddr>,
    /// TCP address of the S3 gateway over HTTPS (optional; needs `s3_tls_cert` and
    /// `s3_tls_key`).
    #[serde(default)]
    pub s3_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain the HTTPS gateway presents.
    #[serde(default)]
    pub s3_tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[serde(default)]
    pub s3_tls_key: Option<PathBuf>,
    /// The region S3 clients sign requests for.
    #[serde(default = "default_s3_region")]
    pub s3_region: String,
    /// Host names under which buckets are addressed virtual-hosted style
    /// (`bucket.<domain>`); path-style requests work on any host name.
    #[serde(default)]
    pub s3_domains: Vec<String>,
    /// Data directories, one per disk: chunk replicas live here.
    pub data_dirs: Vec<PathBuf>,
    /// RocksDB directory of the metadata replica.
    pub meta_dir: PathBuf,
    /// Voters of a new cluster (node id → RPC address). The lowest id bootstraps the group
    /// the first time; later starts ignore this.
    #[serde(default)]
    pub initial_voters: BTreeMap<u64, SocketAddr>,
    /// RPC addresses of existing nodes to register with (any subset of the cluster).
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// A node silent for this long is declared dead and its replicas re-replicated.
    #[serde(default = "default_dead_timeout", with = "humantime_serde")]
    pub dead_timeout: Duration,
    /// Writes are never acknowledged by fewer replicas than this.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Re-replication and repair traffic per node, bytes per second.
    #[serde(default = "default_repair_rate")]
    pub repair_bytes_per_sec: u64,
    /// Background verification of every replica, bytes per second (0 = off).
    #[serde(default = "default_scrub_rate")]
    pub scrub_bytes_per_sec: u64,
    /// Pause between two scrub passes.
    #[serde(default = "default_scrub_interval", with = "humantime_serde")]
    pub scrub_interval: Duration,
    /// How often replicas of deleted volumes (missed while this node was down) are looked for.
    #[serde(default = "default_gc_interval", with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Size of each data directory's journal ring, bytes (8 MiB..=1 GiB). Only used when the
    /// journal is created; an existing one keeps its size.
    #[serde(default = "default_journal_bytes")]
    pub journal_bytes: u64,
    /// Replica data I/O through io_uring (default true). False uses the blocking thread pool,
    /// as does a kernel that refuses io_uring (logged at start).
    #[serde(default = "default_true")]
    pub io_uring: bool,
    /// Threads running the node's async tasks (default: one per CPU). Set it lower when
    /// several nodes share one machine (`basalt dev up` gives each node its share of the
    /// CPUs): more runnable threads than CPUs only adds wake-ups and context switches to
    /// every I/O. Disk hashing, fsyncs and RocksDB run on a separate blocking pool either way.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Run every thread of the node under `SCHED_BATCH` (default false): its wake-ups no
    /// longer preempt the thread running on the CPU they land on. For nodes that share a
    /// machine's CPUs with each other (`basalt dev up` with several nodes): there a replica
    /// waking on a packet or a disk completion preempted another node's thread in the
    /// middle of its work, ~1.1 involuntary context switches per 4 KiB write at QD32; with
    /// it, random writes at QD32 on a 3-node dev cluster went 10.6k -> 11.5k IOPS and CPU per
    /// write 129 -> 122 µs, QD1 unchanged. Not for a host that also runs VMs: there the
    /// node's wake-ups should preempt guest vCPUs, or guests wait longer for their I/O.
    #[serde(default)]
    pub sched_batch: bool,
}

fn default_s3_region() -> String {
    "us-east-1".into()
}

fn default_true() -> bool {
    true
}

fn default_dead_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_min_replicas() -> u32 {
    2
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}
fn default_repair_rate() -> u64 {
    200 << 20
}
fn default_scrub_rate() -> u64 {
    32 << 20
}
fn default_gc_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_journal_bytes() -> u64 {
    basalt_chunkstore::DEFAULT_JOURNAL_BYTES
}
fn default_scrub_interval() -> Duration {
    Duration::from_secs(600)
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub file: ConfigFile,
    pub rpc_advertise: SocketAddr,
    /// The HTTPS gateway's certificate and key, loaded (with `s3_tls_listen`).
    pub s3_tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let file: ConfigFile =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        Config::validate(file)
    }

    pub fn validate(file: ConfigFile) -> Result<Config, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if file.node_id == 0 {
            return bad("node_id must be > 0".into());
        }
        if file.name.is_empty() || !file.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return bad(format!("node name {:?} must be non-empty [A-Za-z0-9_-]", file.name));
        }
        if file.data_dirs.is_empty() {
            return bad("at least one data_dir is needed".into());
        }
        if file.min_replicas == 0 || file.min_replicas as usize > basalt_types::REPLICAS {
            return bad(format!("min_replicas must be 1..={}", basalt_types::REPLICAS));
        }
        if file.dead_timeout < file.heartbeat_interval * 3 {
            return bad("dead_timeout must be at least 3 heartbeat intervals".into());
        }
        if file.initial_voters.is_empty() && file.seeds.is_empty() {
            return bad("either initial_voters (new cluster) or seeds (join) is needed".into());
        }
        let journal = basalt_chunkstore::MIN_JOURNAL_BYTES..=basalt_chunkstore::MAX_JOURNAL_BYTES;
        if !journal.contains(&file.journal_bytes) {
            return bad(format!(
                "journal_bytes must be {}..={} (got {})",
                journal.start(),
                journal.end(),
                file.journal_bytes
            ));
        }
        if file.s3_region.is_empty() || !file.s3_region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return bad(format!("s3_region {:?} must be non-empty [A-Za-z0-9-]", file.s3_region));
        }
        if let Some(n) = file.worker_threads {
            if !(1..=1024).contains(&n) {
                return bad(format!("worker_threads must be 1..=1024 (got {n})"));
            }
        }
        let rpc_advertise = file.rpc_advertise.unwrap_or(file.rpc_listen);
        if rpc_advertise.ip().is_unspecified() {
            return bad("rpc_advertise must be a concrete address when rpc_listen is 0.0.0.0".into());
        }
        let s3_tls = match (&file.s3_tls_listen, &file.s3_tls_cert, &file.s3_tls_key) {
            (None, None, None) => None,
            (Some(_), Some(cert), Some(key)) => {
                let read = |p: &PathBuf| std::fs::read(p).map_err(|source| ConfigError::Read { path: p.clone(), source });
                let tls = basalt_s3gw::server::tls_config(&read(cert)?, &read(key)?)
                    .map_err(|e| ConfigError::Invalid(format!("s3_tls_cert/s3_tls_key: {e}")))?;
                Some(tls)
            }
            _ => return bad("s3_tls_listen, s3_tls_cert and s3_tls_key go together".into()),
        };
        Ok(Config { file, rpc_advertise, s3_tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(extra: serde_json::Value) -> ConfigFile {
        let mut v = serde_json::json!({
            "node_id": 1, "name": "n1", "certs_dir": "/nonexistent",
            "rpc_listen": "127.0.0.1:1", "nbd_listen": "127.0.0.1:2",
            "data_dirs": ["/tmp/d"], "meta_dir": "/tmp/m",
            "initial_voters": {"1": "127.0.0.1:1"},
        });
        if let (Some(base), Some(more)) = (v.as_object_mut(), extra.as_object()) {
            base.extend(more.clone());
        }
        serde_json::from_value(v).expect("a config file")
    }

    #[test]
    fn worker_threads_must_be_positive() {
        assert_eq!(Config::validate(file(serde_json::json!({"worker_threads": 1}))).expect("one").file.worker_threads, Some(1));
        let zero = file(serde_json::json!({"worker_threads": 0}));
        assert!(matches!(Config::validate(zero), Err(ConfigError::Invalid(m)) if m.contains("worker_threads")));
    }

    #[test]
    fn https_needs_its_certificate_and_key_and_they_must_load() {
        assert!(Config::validate(file(serde_json::json!({}))).expect("plain config").s3_tls.is_none());
        let half = file(serde_json::json!({"s3_tls_listen": "127.0.0.1:3", "s3_tls_cert": "/x.pem"}));
        assert!(matches!(Config::validate(half), Err(ConfigError::Invalid(m)) if m.contains("go together")));
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = basalt_rpc::ClusterCa::generate("t").expect("ca");
        ca.issue_server("n1-s3", &["localhost".into(), "127.0.0.1".into()]).expect("cert").save(dir.path(), "n1-s3").expect("save");
        let (cert, key) = (dir.path().join("n1-s3.pem"), dir.path().join("n1-s3.key"));
        let good = file(serde_json::json!({"s3_tls_listen": "127.0.0.1:3", "s3_tls_cert": cert, "s3_tls_key": key}));
        assert!(Config::validate(good).expect("https config").s3_tls.is_some());
        // A key file that holds a certificate is refused at start-up, not at the first client.
        let swapped = file(serde_json::json!({"s3_tls_listen": "127.0.0.1:3", "s3_tls_cert": cert, "s3_tls_key": cert}));
        assert!(matches!(Config::validate(swapped), Err(ConfigError::Invalid(m)) if m.contains("private key")));
    }
}
