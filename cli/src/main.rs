//! `basalt`: run a local cluster, look at it, manage volumes.

use anyhow::{bail, Result};
use basalt_cli::bench;
use basalt_cli::dev::{self, ClusterFile, UpOptions};
use basalt_cli::sizes::{human, parse_duration, parse_size};
use basalt_types::{ClusterStatus, NodeState, VolumeInfo};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "basalt", version, about = "Basalt hyperconverged cluster: local cluster, status, volumes")]
struct Cli {
    /// Directory of the local cluster (holds cluster.json).
    #[arg(long, global = true, env = "BASALT_DIR", default_value = "basalt-dev")]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Local multi-node cluster on this machine.
    Dev {
        #[command(subcommand)]
        cmd: DevCmd,
    },
    /// Nodes, metadata leader, capacity and chunk health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Manage volumes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Metadata group membership (online).
    Meta {
        #[command(subcommand)]
        cmd: MetaCmd,
    },
    /// iSCSI targets, LUNs, CHAP and ACLs (served by every node).
    Iscsi {
        #[command(subcommand)]
        cmd: basalt_cli::iscsi::IscsiCmd,
    },
    /// S3 accounts and access keys (every node runs a gateway).
    S3 {
        #[command(subcommand)]
        cmd: basalt_cli::s3::S3Cmd,
    },
    /// Benchmarks against a local cluster.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// fio through NBD on a 3-replica cluster, side by side with fio on a plain local file on
    /// the same disk; prints the ratios to the physical limits and the goals.
    Block {
        /// Use the existing cluster in DIR; by default a fresh 3-node cluster is started
        /// under /var/tmp and torn down afterwards. (Not `--dir`: that global flag always has
        /// a value, so it cannot say "start a fresh one".)
        #[arg(long, value_name = "DIR")]
        cluster: Option<PathBuf>,
        /// Volume (and local file) size.
        #[arg(long, default_value = "1G")]
        size: String,
        /// Measured time per job (after a 2s ramp).
        #[arg(long, default_value = "15s")]
        runtime: String,
        /// Directory for the local-file baseline (default: the cluster's directory, same disk).
        #[arg(long)]
        local_dir: Option<PathBuf>,
        /// How fio reaches the NBD export: the node's unix socket (as a VM on that node
        /// attaches) or its TCP port (as a client on another host does).
        #[arg(long, value_enum, default_value = "unix")]
        nbd: bench::block::NbdTransport,
        #[arg(long)]
        json: bool,
    },
    /// 4K random and 1M sequential I/O through our iSCSI target on a 1-node (1 replica) and
    /// a 3-node cluster, and through Debian's tgt serving a plain file on the same disk;
    /// prints IOPS, MiB/s, the ratio to tgt and each target's CPU per I/O. Installs tgt if
    /// missing; starts and stops its own tgtd and clusters.
    Iscsi {
        /// LUN size (Basalt volume and tgt's file).
        #[arg(long, default_value = "1G")]
        size: String,
        /// Measured time per job (after the ramp).
        #[arg(long, default_value = "5s")]
        runtime: String,
        #[arg(long, default_value = "2s")]
        ramp: String,
        /// Where the clusters and tgt's file live: one disk-backed directory for all.
        #[arg(long, default_value = basalt_cli::bench::FRESH_CLUSTER_PARENT)]
        work_dir: PathBuf,
        /// Only these workloads, comma-separated ids (randwrite-4k-qd1, randwrite-4k-qd32,
        /// randread-4k-qd1, randread-4k-qd32, write-1m-qd8, read-1m-qd8); all by default.
        #[arg(long)]
        workloads: Option<String>,
        /// Times the whole series runs; each row reports the median round.
        #[arg(long, default_value_t = bench::iscsi::DEFAULT_ROUNDS)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
    /// Our S3 gateway on a fresh 3-node cluster against Garage (3 nodes in 3 zones,
    /// replication 3) on this machine, each alone, through one node's endpoint, by the same
    /// in-process load generator (one kept-alive HTTP/1.1 connection per worker, SigV4).
    ///
    /// Default run: for 4 KiB and 64 MiB objects at concurrency 1, 16 and 64, a PUT phase of
    /// new objects then a GET phase reading them back (length of every GET and every byte of
    /// a sample checked), then LIST (ListObjectsV2 pages of --list-keys keys) at each
    /// concurrency. Prints ops/s (small objects, LIST) or MiB/s (>= 1 MiB), p50/p90/p99/max
    /// latency, the servers' and the generator's CPU, then Basalt/Garage ratios per row
    /// (latency as Garage/Basalt, so > 1 favours Basalt) against the goal of >= 1.0.
    /// Garage is taken from PATH or /var/tmp/garage/bin, else built there once with
    /// `cargo install --locked garage` (20+ minutes on 2 cores). A run takes ~10 minutes.
    S3 {
        /// Measured time per row.
        #[arg(long, default_value = "10s")]
        runtime: String,
        /// Object sizes, comma-separated.
        #[arg(long, default_value = bench::s3::DEFAULT_SIZES)]
        sizes: String,
        /// Concurrent requests (one connection each), comma-separated.
        #[arg(long, default_value = bench::s3::DEFAULT_CONCURRENCY)]
        concurrency: String,
        /// Phases to run, comma-separated, from put, get, list.
        #[arg(long, default_value = bench::s3::DEFAULT_OPS, conflicts_with = "mix")]
        ops: String,
        /// Instead of phases, one mixed run per size and concurrency, e.g.
        /// `put=50,get=40,list=10` (GETs read objects PUT so far).
        #[arg(long)]
        mix: Option<String>,
        /// Keys under the listed prefix (one ListObjectsV2 page: at most 1000).
        #[arg(long, default_value_t = bench::s3::DEFAULT_LIST_KEYS)]
        list_keys: usize,
        /// Benchmark one system only.
        #[arg(long, value_enum)]
        only: Option<bench::s3::System>,
        /// Run Garage as shipped (no fsync) instead of with data_fsync and metadata_fsync,
        /// the durability our gateway gives every PUT.
        #[arg(long)]
        garage_no_fsync: bool,
        /// The garage binary (default: PATH, then /var/tmp/garage/bin/garage, else install).
        #[arg(long)]
        garage_bin: Option<PathBuf>,
        /// Where both clusters live: one disk-backed directory.
        #[arg(long, default_value = basalt_cli::bench::FRESH_CLUSTER_PARENT)]
        work_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Start a cluster (or restart the stopped nodes of an existing one) and wait until healthy.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Data directories (disks) per node.
        #[arg(long, default_value_t = 1)]
        disks: usize,
        /// Silence after which a node is declared dead and re-replication starts.
        #[arg(long, default_value = "30s")]
        dead_timeout: String,
    },
    /// SIGKILL one node (name like node2, or id).
    Kill { node: String },
    /// Start a stopped or killed node again.
    Start { node: String },
    /// Stop every node (data is kept; --purge deletes the cluster directory).
    Down {
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Subcommand)]
enum MetaCmd {
    /// Make a registered node a metadata voter (e.g. to replace a dead one).
    AddVoter { node: u64 },
    /// Remove a node from the metadata voters (it keeps a copy of the map as a learner).
    RemoveVoter { node: u64 },
}

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        name: String,
        /// Size, e.g. 10G.
        #[arg(long)]
        size: String,
        /// Chunk size (power of two, 1M..1G; default 64M).
        #[arg(long)]
        chunk_size: Option<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    Delete { name: String },
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Dev { cmd } => dev_cmd(&cli.dir, cmd).await,
        Cmd::Status { json } => {
            let cluster = ClusterFile::load(&cli.dir)?;
            let status = cluster.client()?.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Cmd::Volume { cmd } => volume_cmd(&cli.dir, cmd).await,
        Cmd::Meta { cmd } => {
            let client = ClusterFile::load(&cli.dir)?.client()?;
            let (req, what) = match cmd {
                MetaCmd::AddVoter { node } => (basalt_types::MetaRequest::AddVoter { node }, format!("node {node} is now a voter")),
                MetaCmd::RemoveVoter { node } => {
                    (basalt_types::MetaRequest::RemoveVoter { node }, format!("node {node} is no longer a voter"))
                }
            };
            client.meta(req).await?;
            println!("{what}");
            Ok(())
        }
        Cmd::Bench { cmd } => bench_cmd(&cli.dir, cmd).await,
        Cmd::Iscsi { cmd } => {
            let client = ClusterFile::load(&cli.dir)?.client()?;
            basalt_cli::iscsi::run(&client, cmd).await
        }
        Cmd::S3 { cmd } => {
            let client = ClusterFile::load(&cli.dir)?.client()?;
            basalt_cli::s3::run(client, cmd).await
        }
    }
}

async fn bench_cmd(dir: &std::path::Path, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Block { cluster, size, runtime, local_dir, nbd, json } => {
            if cluster.is_none() && dir.join(dev::CLUSTER_FILE).exists() {
                eprintln!(
                    "note: benchmarking a fresh cluster; to use the one in {} pass --cluster {0}",
                    dir.display()
                );
            }
            let mut opts = bench::block::BlockOptions::new(parse_size(&size)?, parse_duration(&runtime)?);
            opts.cluster_dir = cluster;
            opts.local_dir = local_dir;
            opts.transport = nbd;
            let report = bench::block::run_block(&opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::block::render_table(&report));
            }
            Ok(())
        }
        BenchCmd::Iscsi { size, runtime, ramp, work_dir, workloads, rounds, json } => {
            let mut opts = bench::iscsi::IscsiOptions::new(parse_size(&size)?, parse_duration(&runtime)?);
            opts.ramp = parse_duration(&ramp)?;
            opts.rounds = rounds;
            opts.work_dir = work_dir;
            if let Some(ids) = workloads {
                opts.workloads = bench::iscsi::select_workloads(&ids)?;
            }
            let report = bench::iscsi::run_iscsi(&opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::iscsi::render_table(&report));
            }
            Ok(())
        }
        BenchCmd::S3 {
            runtime,
            sizes,
            concurrency,
            ops,
            mix,
            list_keys,
            only,
            garage_no_fsync,
            garage_bin,
            work_dir,
            json,
        } => {
            use bench::s3;
            let mut opts = s3::S3Options::new(parse_duration(&runtime)?);
            opts.sizes = s3::parse_list(&sizes, "size", parse_size)?;
            opts.concurrencies = s3::parse_list(&concurrency, "concurrency", |c| Ok(c.parse::<usize>()?))?;
            opts.ops = s3::parse_list(&ops, "operation", s3::Op::parse)?;
            opts.mix = mix.as_deref().map(s3::Mix::parse).transpose()?;
            opts.list_keys = list_keys;
            opts.only = only;
            opts.garage_fsync = !garage_no_fsync;
            opts.garage_bin = garage_bin;
            opts.work_dir = work_dir;
            let report = s3::run_s3(&opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", s3::render_table(&report));
            }
            Ok(())
        }
    }
}

async fn dev_cmd(dir: &std::path::Path, cmd: DevCmd) -> Result<()> {
    match cmd {
        DevCmd::Up { nodes, disks, dead_timeout } => {
            let mut opts = UpOptions::new(dir, nodes);
            opts.disks_per_node = disks;
            opts.dead_timeout = parse_duration(&dead_timeout)?;
            let cluster = dev::up(&opts).await?;
            println!("Basalt dev cluster up in {} ({} nodes)", cluster.dir.display(), cluster.nodes.len());
            for n in &cluster.nodes {
                println!(
                    "  {:<7} pid {:<7} rpc {:<21} nbd {}/<volume>  iscsi {}  s3 {}{}",
                    n.name,
                    n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    n.rpc_addr,
                    n.nbd_uri,
                    n.iscsi_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                    n.s3_addr.map(|a| format!("http://{a}")).unwrap_or_else(|| "-".into()),
                    if n.voter { "  [metadata voter]" } else { "" }
                );
            }
            println!("Try: basalt --dir {} volume create vol1 --size 1G", cluster.dir.display());
            println!("     qemu-img info {}/vol1", cluster.nodes[0].nbd_uri);
            println!("     basalt --dir {} iscsi create iqn.2026-11.io.basalt:vol1", cluster.dir.display());
            println!("     basalt --dir {} iscsi lun-add iqn.2026-11.io.basalt:vol1 --lun 0 --volume vol1", cluster.dir.display());
            if let Some(a) = cluster.nodes[0].iscsi_addr {
                println!("     iscsi-ls -s iscsi://{a}");
            }
            if let (Some(a), Some(k)) = (cluster.nodes[0].s3_addr, &cluster.s3_admin) {
                println!(
                    "     AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} aws --endpoint-url http://{a} s3 mb s3://bucket1",
                    k.access_key, k.secret_key
                );
            }
            Ok(())
        }
        DevCmd::Kill { node } => {
            let mut cluster = ClusterFile::load(dir)?;
            dev::kill_node(&mut cluster, &node)?;
            cluster.save()?;
            println!("killed {node}");
            Ok(())
        }
        DevCmd::Start { node } => {
            let mut cluster = ClusterFile::load(dir)?;
            let opts = UpOptions::new(dir, cluster.nodes.len());
            let pid = dev::start_node(&mut cluster, &node, &opts)?;
            cluster.save()?;
            println!("started {node} (pid {pid})");
            Ok(())
        }
        DevCmd::Down { purge } => {
            let mut cluster = ClusterFile::load(dir)?;
            dev::down(&mut cluster, Duration::from_secs(10))?;
            cluster.save()?;
            if purge {
                std::fs::remove_dir_all(&cluster.dir)?;
                println!("cluster stopped and {} deleted", cluster.dir.display());
            } else {
                println!("cluster stopped; data kept in {}", cluster.dir.display());
            }
            Ok(())
        }
    }
}

async fn volume_cmd(dir: &std::path::Path, cmd: VolumeCmd) -> Result<()> {
    let cluster = ClusterFile::load(dir)?;
    let client = cluster.client()?;
    match cmd {
        VolumeCmd::Create { name, size, chunk_size } => {
            let chunk = chunk_size.as_deref().map(parse_size).transpose()?;
            let v = client.create_volume(&name, parse_size(&size)?, chunk).await?;
            println!("created {} ({}, chunk {})", v.name, human(v.size), human(v.chunk_size));
        }
        VolumeCmd::List { json } => {
            let vols = client.list_volumes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vols)?);
            } else {
                println!("{:<24} {:>12} {:>10} {:>8} {}", "NAME", "SIZE", "ALLOCATED", "EPOCH", "LEASE");
                for v in &vols {
                    print_volume_line(v);
                }
            }
        }
        VolumeCmd::Info { name, json } => {
            let v = client.volume(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("name:       {}", v.name);
                println!("id:         {}", v.id);
                println!("size:       {} ({} bytes)", human(v.size), v.size);
                println!("chunk size: {}", human(v.chunk_size));
                println!("allocated:  {} chunks ({})", v.allocated_chunks, human(v.allocated_chunks * v.chunk_size));
                println!("epoch:      {}", v.epoch);
                match &v.lease {
                    Some(l) => println!("lease:      {} on node {} (epoch {})", l.holder, l.node, l.epoch),
                    None => println!("lease:      none"),
                }
                for n in &cluster.nodes {
                    println!("nbd:        {}/{}", n.nbd_uri, v.name);
                }
            }
        }
        VolumeCmd::Delete { name } => {
            basalt_cli::iscsi::delete_volume_unless_exported(&client, &name).await?;
            println!("deleted {name}");
        }
        VolumeCmd::Resize { name, size } => {
            let size = parse_size(&size)?;
            if size == 0 {
                bail!("size must be > 0");
            }
            let v = client.resize_volume(&name, size).await?;
            println!("{} is now {}", v.name, human(v.size));
        }
    }
    Ok(())
}

fn print_volume_line(v: &VolumeInfo) {
    println!(
        "{:<24} {:>12} {:>10} {:>8} {}",
        v.name,
        human(v.size),
        human(v.allocated_chunks * v.chunk_size),
        v.epoch,
        v.lease.as_ref().map(|l| l.holder.as_str()).unwrap_or("-")
    );
}

fn print_status(s: &ClusterStatus) {
    println!(
        "metadata leader: {}   term {}",
        s.leader.map(|l| format!("node {l}")).unwrap_or_else(|| "none".into()),
        s.term
    );
    println!("capacity: {} total, {} free; {} volumes", human(s.capacity_bytes), human(s.free_bytes), s.volumes);
    println!(
        "chunks: {} total, {} degraded, {} under re-replication, {} unavailable",
        s.chunks.total, s.chunks.degraded, s.chunks.syncing, s.chunks.unavailable
    );
    println!("{:<4} {:<10} {:<6} {:<6} {:<22} {:>10} {:>12}", "ID", "NAME", "STATE", "VOTER", "RPC", "SEEN", "FREE");
    for n in &s.nodes {
        let free: u64 = n.disks.iter().map(|d| d.free_bytes).sum();
        println!(
            "{:<4} {:<10} {:<6} {:<6} {:<22} {:>10} {:>12}",
            n.info.id,
            n.info.name,
            match n.info.state {
                NodeState::Alive => "alive",
                NodeState::Dead => "dead",
            },
            if n.voter { "yes" } else { "no" },
            n.info.rpc_addr,
            n.last_seen_ms_ago.map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0)).unwrap_or_else(|| "-".into()),
            human(free)
        );
    }
}
