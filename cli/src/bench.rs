//! `basalt bench block`: block I/O through NBD on a real 3-replica cluster, side by side with
//! the same fio jobs on a plain local file on the same disk, so every figure comes with the
//! physical limit it should be judged against.
//!
//! This module owns the workload table, running fio and parsing its JSON, the CPU accounting
//! of the `storaged` processes, the ratio/goal arithmetic and the report (table or JSON).
//! It is a benchmark, not a test: a missed goal is reported, never an error.
//!
//! Fairness of the local baseline. The cluster acknowledges a write only once it is durable
//! on every replica (see `Volume::write` in the client library), so the local write jobs open
//! the file with `O_DIRECT | O_DSYNC` (`--direct=1 --sync=dsync`): each write is durable when
//! it completes, and writes still overlap up to the queue depth, exactly the contract of our
//! NBD export. We do not use `--fdatasync=1`: with libaio, fio drains the whole queue before
//! each sync (Linux has no asynchronous fsync), which turns QD32 into QD1 and would make the
//! baseline look slower than the disk is; it also leaves the sync out of the write latency.
//! The local writes are also run with plain `O_DIRECT` (durable only in the disk's volatile
//! cache) and shown for information; ratios use the durable figure. On one machine all
//! replicas share one disk, so the physical limit for replicated writes is the local figure
//! divided by the replica count; reads are served by one replica and compare to the local
//! figure directly.

use crate::dev::{self, ClusterFile, UpOptions};
use crate::sizes::human;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Where a freshly started benchmark cluster lives (a disk-backed filesystem, unlike /tmp
/// which may be tmpfs and would make every figure meaningless).
pub const FRESH_CLUSTER_PARENT: &str = "/var/tmp";
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
pub const DEFAULT_RAMP: Duration = Duration::from_secs(2);
/// Queue depth of the untimed sequential pre-fill.
const PREFILL_IODEPTH: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Read,
    Write,
}

/// How a workload's rate is best read: small blocks in I/Os per second, large ones in MiB/s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Iops,
    MibPerSec,
}

/// What a workload should reach, as a fraction of its physical limit (for writes the local
/// figure divided by the replica count, for reads the local figure).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Goal {
    pub min_ratio: f64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    /// Stable id, used as the fio job name and in JSON.
    pub id: &'static str,
    pub label: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    pub direction: Direction,
    pub block_size: u64,
    pub iodepth: u32,
    pub metric: Metric,
    pub goal: Option<Goal>,
}

/// The six jobs and the goals set for them: sequential write ≥ 0.8 and QD32 random write
/// ≥ 0.5 of the 3-replica write limit, every read ≥ 0.5 of the local read. QD1 random write
/// is latency-bound (the replicas write in parallel), so it has no throughput goal.
pub const WORKLOADS: [Workload; 6] = [
    Workload {
        id: "randwrite-4k-qd1",
        label: "rand write 4K QD1",
        rw: "randwrite",
        direction: Direction::Write,
        block_size: 4 << 10,
        iodepth: 1,
        metric: Metric::Iops,
        goal: None,
    },
    Workload {
        id: "randwrite-4k-qd32",
        label: "rand write 4K QD32",
        rw: "randwrite",
        direction: Direction::Write,
        block_size: 4 << 10,
        iodepth: 32,
        metric: Metric::Iops,
        goal: Some(Goal { min_ratio: 0.5 }),
    },
    Workload {
        id: "randread-4k-qd1",
        label: "rand read 4K QD1",
        rw: "randread",
        direction: Direction::Read,
        block_size: 4 << 10,
        iodepth: 1,
        metric: Metric::Iops,
        goal: Some(Goal { min_ratio: 0.5 }),
    },
    Workload {
        id: "randread-4k-qd32",
        label: "rand read 4K QD32",
        rw: "randread",
        direction: Direction::Read,
        block_size: 4 << 10,
        iodepth: 32,
        metric: Metric::Iops,
        goal: Some(Goal { min_ratio: 0.5 }),
    },
    Workload {
        id: "write-1m-qd8",
        label: "seq write 1M QD8",
        rw: "write",
        direction: Direction::Write,
        block_size: 1 << 20,
        iodepth: 8,
        metric: Metric::MibPerSec,
        goal: Some(Goal { min_ratio: 0.8 }),
    },
    Workload {
        id: "read-1m-qd8",
        label: "seq read 1M QD8",
        rw: "read",
        direction: Direction::Read,
        block_size: 1 << 20,
        iodepth: 8,
        metric: Metric::MibPerSec,
        goal: Some(Goal { min_ratio: 0.5 }),
    },
];

/// The figures we take from one fio run (one job, one direction).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FioResult {
    pub iops: f64,
    pub bw_bytes: f64,
    /// I/Os completed after the ramp.
    pub ios: u64,
    /// Completion latency percentiles.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Measured time after the ramp.
    pub runtime_ms: u64,
    /// fio's own CPU (user + system), in microseconds per I/O.
    pub fio_cpu_us_per_io: f64,
}

impl FioResult {
    /// Parse fio's `--output-format=json` output for a single job. Text that fio sometimes
    /// prints before the JSON (warnings) is skipped.
    pub fn parse(output: &str, direction: Direction) -> Result<FioResult> {
        let start = output.find('{').ok_or_else(|| anyhow!("fio printed no JSON"))?;
        let root: Value = serde_json::from_str(&output[start..]).context("fio's JSON output does not parse")?;
        let job = root
            .get("jobs")
            .and_then(|j| j.get(0))
            .ok_or_else(|| anyhow!("fio's JSON has no jobs"))?;
        let error = job.get("error").and_then(Value::as_i64).unwrap_or(0);
        if error != 0 {
            bail!("fio job failed with error {error} ({})", std::io::Error::from_raw_os_error(error as i32));
        }
        let key = match direction {
            Direction::Read => "read",
            Direction::Write => "write",
        };
        let d = job.get(key).ok_or_else(|| anyhow!("fio's JSON has no {key} section"))?;
        let num = |v: &Value, field: &str| -> Result<f64> {
            v.get(field).and_then(Value::as_f64).ok_or_else(|| anyhow!("fio's JSON lacks {key}.{field}"))
        };
        let ios = d.get("total_ios").and_then(Value::as_u64).ok_or_else(|| anyhow!("fio's JSON lacks {key}.total_ios"))?;
        if ios == 0 {
            bail!("fio completed no {key} I/O");
        }
        let percentiles = d
            .get("clat_ns")
            .and_then(|c| c.get("percentile"))
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("fio's JSON lacks {key}.clat_ns.percentile"))?;
        // Keys look like "99.000000"; compare numerically rather than by spelling.
        let percentile = |p: f64| -> Result<f64> {
            percentiles
                .iter()
                .find(|(k, _)| k.parse::<f64>().is_ok_and(|x| (x - p).abs() < 1e-6))
                .and_then(|(_, v)| v.as_f64())
                .map(|ns| ns / 1000.0)
                .ok_or_else(|| anyhow!("fio's JSON lacks the {p} percentile of {key} latency"))
        };
        let runtime_ms = job
            .get("job_runtime")
            .and_then(Value::as_u64)
            .or_else(|| d.get("runtime").and_then(Value::as_u64))
            .ok_or_else(|| anyhow!("fio's JSON lacks the job runtime"))?;
        let cpu_pct = num(job, "usr_cpu")? + num(job, "sys_cpu")?;
        Ok(FioResult {
            iops: num(d, "iops")?,
            bw_bytes: num(d, "bw_bytes")?,
            ios,
            p50_us: percentile(50.0)?,
            p99_us: percentile(99.0)?,
            runtime_ms,
            fio_cpu_us_per_io: cpu_pct / 100.0 * runtime_ms as f64 * 1000.0 / ios as f64,
        })
    }

    /// The workload's rate in its own unit (IOPS or MiB/s).
    pub fn rate(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Iops => self.iops,
            Metric::MibPerSec => self.bw_bytes / (1 << 20) as f64,
        }
    }
}

/// The physical limit for a workload, from the local figure: a replicated write lands on
/// every replica, and on one machine they all share the disk the local figure was taken on.
pub fn limit(direction: Direction, local_rate: f64, replicas: usize) -> f64 {
    match direction {
        Direction::Write => local_rate / replicas.max(1) as f64,
        Direction::Read => local_rate,
    }
}

/// Basalt's rate as a fraction of the limit (None when the baseline measured nothing).
pub fn ratio(direction: Direction, basalt_rate: f64, local_rate: f64, replicas: usize) -> Option<f64> {
    let limit = limit(direction, local_rate, replicas);
    (limit > 0.0 && limit.is_finite()).then(|| basalt_rate / limit)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    NotMet,
    NoGoal,
}

pub fn verdict(goal: Option<Goal>, ratio: Option<f64>) -> Verdict {
    match (goal, ratio) {
        (None, _) => Verdict::NoGoal,
        (Some(g), Some(r)) if r >= g.min_ratio => Verdict::Met,
        (Some(_), _) => Verdict::NotMet,
    }
}

/// CPU the cluster spent during one measured window.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterCpu {
    /// User + system seconds of all `storaged` processes.
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    pub cpu_us_per_io: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub workload: Workload,
    pub basalt: FioResult,
    pub cluster_cpu: ClusterCpu,
    /// Local file with `O_DIRECT`, and for writes `O_DSYNC` (durable): the baseline.
    pub local: FioResult,
    /// Local writes with `O_DIRECT` only (not durable); None for reads.
    pub local_no_sync: Option<FioResult>,
    /// In the workload's metric.
    pub limit: f64,
    pub ratio: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, Serialize)]
pub struct BlockReport {
    pub volume: String,
    pub size: u64,
    pub chunk_size: u64,
    pub replicas: usize,
    pub nodes: usize,
    pub nbd_uri: String,
    pub local_file: PathBuf,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub rows: Vec<Row>,
}

#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// An existing cluster to use; None starts a fresh one under [`FRESH_CLUSTER_PARENT`]
    /// and tears it down afterwards.
    pub cluster_dir: Option<PathBuf>,
    /// Nodes of a fresh cluster.
    pub nodes: usize,
    pub size: u64,
    pub chunk_size: u64,
    pub runtime: Duration,
    pub ramp: Duration,
    /// Directory for the local baseline file; None = the cluster's directory (same disk).
    pub local_dir: Option<PathBuf>,
    pub storaged_bin: PathBuf,
}

impl BlockOptions {
    pub fn new(size: u64, runtime: Duration) -> Self {
        Self {
            cluster_dir: None,
            nodes: 3,
            size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            runtime,
            ramp: DEFAULT_RAMP,
            local_dir: None,
            storaged_bin: dev::default_storaged_bin(),
        }
    }
}

/// Run the whole benchmark. Progress goes to stderr; the caller prints the report.
pub async fn run_block(opts: &BlockOptions) -> Result<BlockReport> {
    if opts.size < 1 << 20 {
        bail!("the volume must be at least 1 MiB");
    }
    if opts.runtime < Duration::from_secs(1) {
        bail!("the runtime must be at least 1s");
    }
    check_fio().await?;
    let mut fresh = None;
    let cluster = match &opts.cluster_dir {
        Some(dir) => ClusterFile::load(dir)?,
        None => {
            let owned = fresh.insert(FreshCluster::new()?);
            progress(&format!("starting a {}-node cluster in {}", opts.nodes, owned.dir().display()));
            tokio::select! {
                r = owned.start(opts) => r?,
                _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            }
        }
    };
    // `fresh` (if any) stops the cluster and deletes its directory when dropped, including
    // on errors and Ctrl-C below.
    let result = tokio::select! {
        r = bench_cluster(&cluster, opts) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    drop(fresh);
    result
}

async fn bench_cluster(cluster: &ClusterFile, opts: &BlockOptions) -> Result<BlockReport> {
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.pid.is_some_and(dev::pid_alive))
        .ok_or_else(|| anyhow!("no node of the cluster in {} is running", cluster.dir.display()))?;
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid.filter(|p| dev::pid_alive(*p))).collect();
    let replicas = basalt_types::REPLICAS.min(pids.len());
    let probe = CpuProbe::new(pids)?;
    let local_dir = opts.local_dir.clone().unwrap_or_else(|| cluster.dir.clone());
    let scratch = tempfile::Builder::new()
        .prefix("basalt-bench-")
        .tempdir_in(&local_dir)
        .with_context(|| format!("creating a scratch directory in {}", local_dir.display()))?;

    let client = cluster.client()?;
    let volume = format!("bench-{:08x}", rand::random::<u32>());
    let info = client
        .create_volume(&volume, opts.size, Some(opts.chunk_size))
        .await
        .with_context(|| format!("creating volume {volume}"))?;
    let uri = format!("{}/{}", node.nbd_uri, volume);
    let result = bench_volume(opts, &uri, &probe, scratch.path(), replicas).await;
    // A benchmark volume left behind would hold 3x its size of disk; remove it even after
    // a failure (a fresh cluster goes away as a whole anyway).
    if opts.cluster_dir.is_some() {
        if let Err(e) = client.delete_volume(&volume).await {
            warn!(volume = %volume, error = %e, "could not delete the benchmark volume");
        }
    }
    let rows = result?;
    Ok(BlockReport {
        volume,
        size: info.size,
        chunk_size: info.chunk_size,
        replicas,
        nodes: cluster.nodes.len(),
        nbd_uri: uri,
        local_file: scratch.path().join(LOCAL_FILE),
        runtime_s: opts.runtime.as_secs_f64(),
        ramp_s: opts.ramp.as_secs_f64(),
        rows,
    })
}

const LOCAL_FILE: &str = "local.dat";

async fn bench_volume(
    opts: &BlockOptions,
    uri: &str,
    probe: &CpuProbe,
    scratch: &Path,
    replicas: usize,
) -> Result<Vec<Row>> {
    let nbd = Target::Nbd { uri: uri.to_string() };
    let local_path = scratch.join(LOCAL_FILE);
    let local = |durable| Target::Local { path: local_path.clone(), size: opts.size, durable };
    let timing = Timing { runtime: opts.runtime, ramp: opts.ramp };

    progress(&format!("pre-filling {uri} ({}), untimed", human(opts.size)));
    run_fio(&prefill_args(&nbd, scratch)).await.context("pre-filling the volume")?;
    progress(&format!("pre-filling the local file {} ({}), untimed", local_path.display(), human(opts.size)));
    run_fio(&prefill_args(&local(true), scratch)).await.context("pre-filling the local file")?;

    let mut basalt = Vec::new();
    for w in &WORKLOADS {
        progress(&format!("Basalt: {} for {}", w.label, humantime::format_duration(opts.runtime)));
        let (json, cpu) = run_fio_measured(&job_args(w, &nbd, &timing, scratch), probe, opts.ramp).await?;
        let r = FioResult::parse(&json, w.direction).with_context(|| format!("Basalt {}", w.label))?;
        let cpu = cpu.per_io(r.ios);
        info!(workload = w.id, iops = r.iops, cpu_us_per_io = cpu.cpu_us_per_io, "cluster job done");
        basalt.push((r, cpu));
    }

    let mut rows = Vec::new();
    for (w, (b, cpu)) in WORKLOADS.iter().zip(basalt) {
        progress(&format!("local file: {}", w.label));
        let local_r = run_job(w, &local(true), &timing, scratch).await?;
        let local_no_sync = match w.direction {
            Direction::Write => {
                progress(&format!("local file without O_DSYNC: {}", w.label));
                Some(run_job(w, &local(false), &timing, scratch).await?)
            }
            Direction::Read => None,
        };
        let local_rate = local_r.rate(w.metric);
        let ratio = ratio(w.direction, b.rate(w.metric), local_rate, replicas);
        rows.push(Row {
            workload: *w,
            verdict: verdict(w.goal, ratio),
            limit: limit(w.direction, local_rate, replicas),
            ratio,
            basalt: b,
            cluster_cpu: cpu,
            local: local_r,
            local_no_sync,
        });
    }
    Ok(rows)
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// Fail early, with the fix, if fio or its NBD engine is missing.
async fn check_fio() -> Result<()> {
    let out = tokio::process::Command::new("fio")
        .arg("--enghelp=nbd")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow!("fio is not installed (run scripts/install-deps.sh, or apt-get install fio libnbd-bin)")
            }
            _ => anyhow!("running fio: {e}"),
        })?;
    if !out.status.success() {
        bail!(
            "this fio has no nbd engine ({}); install a fio built with libnbd (Debian/Ubuntu: apt-get install fio libnbd-bin)",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

enum Target {
    Nbd { uri: String },
    /// `durable`: open with O_DSYNC so writes complete only once on stable storage.
    Local { path: PathBuf, size: u64, durable: bool },
}

impl Target {
    fn args(&self) -> Vec<String> {
        match self {
            Target::Nbd { uri } => vec!["--ioengine=nbd".into(), format!("--uri={uri}")],
            Target::Local { path, size, durable } => {
                let mut a = vec![
                    "--ioengine=libaio".into(),
                    "--direct=1".into(),
                    format!("--filename={}", path.display()),
                    format!("--size={size}"),
                ];
                if *durable {
                    a.push("--sync=dsync".into());
                }
                a
            }
        }
    }
}

struct Timing {
    runtime: Duration,
    ramp: Duration,
}

/// fio writes its JSON to a file: its stdout can carry other notes.
fn output_path(scratch: &Path) -> PathBuf {
    scratch.join("fio.json")
}

fn job_args(w: &Workload, target: &Target, t: &Timing, scratch: &Path) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", w.id),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.block_size),
        format!("--iodepth={}", w.iodepth),
        "--time_based".into(),
        format!("--runtime={}ms", t.runtime.as_millis()),
        format!("--ramp_time={}ms", t.ramp.as_millis()),
        // The random map only matters for verification; tracking it costs fio CPU.
        "--norandommap".into(),
        "--output-format=json".into(),
        format!("--output={}", output_path(scratch).display()),
    ];
    a.extend(target.args());
    a
}

fn prefill_args(target: &Target, scratch: &Path) -> Vec<String> {
    let mut a = vec![
        "--name=prefill".into(),
        "--rw=write".into(),
        "--bs=1M".into(),
        format!("--iodepth={PREFILL_IODEPTH}"),
        "--end_fsync=1".into(),
        "--output-format=json".into(),
        format!("--output={}", output_path(scratch).display()),
    ];
    a.extend(target.args());
    a
}

fn fio_command(args: &[String]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("fio");
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd
}

fn read_output(args: &[String], status: std::process::ExitStatus, stderr: &[u8]) -> Result<String> {
    let stderr = String::from_utf8_lossy(stderr);
    if !status.success() {
        bail!("fio {} failed ({status}): {}", args.join(" "), stderr.trim());
    }
    let out = args
        .iter()
        .find_map(|a| a.strip_prefix("--output="))
        .ok_or_else(|| anyhow!("fio was run without --output"))?;
    std::fs::read_to_string(out).with_context(|| format!("reading fio's output {out}"))
}

async fn run_fio(args: &[String]) -> Result<String> {
    let out = fio_command(args).output().await.context("running fio")?;
    read_output(args, out.status, &out.stderr)
}

async fn run_job(w: &Workload, target: &Target, t: &Timing, scratch: &Path) -> Result<FioResult> {
    let json = run_fio(&job_args(w, target, t, scratch)).await?;
    FioResult::parse(&json, w.direction).with_context(|| format!("local {}", w.label))
}

/// Run fio and measure the cluster's CPU from the end of the ramp (when fio starts counting)
/// to fio's exit, so the CPU matches the I/Os fio reports.
async fn run_fio_measured(args: &[String], probe: &CpuProbe, ramp: Duration) -> Result<(String, CpuWindow)> {
    let mut child = fio_command(args).spawn().context("running fio")?;
    let mut stderr_pipe = child.stderr.take().ok_or_else(|| anyhow!("fio's stderr was not captured"))?;
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stderr_pipe, &mut buf).await;
        buf
    });
    // If fio exits during the ramp it failed; its status tells why.
    tokio::select! {
        s = child.wait() => {
            let status = s.context("waiting for fio")?;
            let stderr = stderr_task.await.unwrap_or_default();
            read_output(args, status, &stderr)?;
            bail!("fio finished before its ramp time was over");
        }
        _ = tokio::time::sleep(ramp) => {}
    }
    let start = probe.sample()?;
    let t0 = Instant::now();
    let status = child.wait().await.context("waiting for fio")?;
    let window = CpuWindow { cpu_seconds: probe.sample()? - start, wall_seconds: t0.elapsed().as_secs_f64() };
    let stderr = stderr_task.await.unwrap_or_default();
    let json = read_output(args, status, &stderr)?;
    Ok((json, window))
}

struct CpuWindow {
    cpu_seconds: f64,
    wall_seconds: f64,
}

impl CpuWindow {
    fn per_io(&self, ios: u64) -> ClusterCpu {
        ClusterCpu {
            cpu_seconds: self.cpu_seconds,
            wall_seconds: self.wall_seconds,
            cpu_us_per_io: if ios == 0 { 0.0 } else { self.cpu_seconds * 1e6 / ios as f64 },
        }
    }
}

/// Reads the summed user + system CPU time of a set of processes (all their threads).
struct CpuProbe {
    pids: Vec<u32>,
    ticks_per_sec: f64,
}

impl CpuProbe {
    fn new(pids: Vec<u32>) -> Result<Self> {
        // SAFETY: sysconf only reads a configuration value.
        #[allow(unsafe_code)]
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 {
            bail!("sysconf(_SC_CLK_TCK) failed");
        }
        Ok(Self { pids, ticks_per_sec: ticks as f64 })
    }

    fn sample(&self) -> Result<f64> {
        let mut ticks = 0u64;
        for pid in &self.pids {
            let path = format!("/proc/{pid}/stat");
            let stat = std::fs::read_to_string(&path)
                .with_context(|| format!("storaged (pid {pid}) exited during the benchmark"))?;
            ticks += parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("cannot parse {path}"))?;
        }
        Ok(ticks as f64 / self.ticks_per_sec)
    }
}

/// utime + stime (fields 14 and 15 of `/proc/PID/stat`) in clock ticks. The command name
/// (field 2) is in parentheses and may contain spaces, so count from the last ')'.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 (state) is index 0
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A cluster started for one benchmark run, stopped and deleted on drop.
struct FreshCluster {
    dir: tempfile::TempDir,
}

impl FreshCluster {
    fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("basalt-bench-cluster-")
            .tempdir_in(FRESH_CLUSTER_PARENT)
            .with_context(|| format!("creating a cluster directory in {FRESH_CLUSTER_PARENT}"))?;
        Ok(Self { dir })
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn start(&self, opts: &BlockOptions) -> Result<ClusterFile> {
        let mut up = UpOptions::new(self.dir(), opts.nodes);
        up.storaged_bin = opts.storaged_bin.clone();
        // The scrubber would compete with the measured I/O for the one disk.
        up.scrub_bytes_per_sec = 0;
        dev::up(&up).await
    }
}

impl Drop for FreshCluster {
    fn drop(&mut self) {
        // `dev::up` writes cluster.json before waiting for health, so even a cluster that
        // never became healthy is found and stopped here.
        match ClusterFile::load(self.dir()) {
            Ok(mut cluster) => {
                if let Err(e) = dev::down(&mut cluster, Duration::from_secs(10)) {
                    warn!(error = %e, dir = %self.dir().display(), "stopping the benchmark cluster failed");
                }
            }
            Err(e) => warn!(error = %e, "no benchmark cluster to stop"),
        }
    }
}

// ---- report -------------------------------------------------------------------------------

fn fmt_rate(metric: Metric, r: &FioResult) -> String {
    match metric {
        Metric::Iops => format!("{:.0} IOPS", r.iops),
        Metric::MibPerSec => format!("{:.1} MiB/s", r.rate(metric)),
    }
}

fn fmt_latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn fmt_goal(w: &Workload) -> String {
    match (w.goal, w.direction) {
        (None, _) => "-".into(),
        (Some(g), Direction::Write) => format!(">= {:.1}x limit", g.min_ratio),
        (Some(g), Direction::Read) => format!(">= {:.1}x local", g.min_ratio),
    }
}

/// The human-readable report.
pub fn render_table(r: &BlockReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, s: String| {
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(
        &mut out,
        format!(
            "Basalt block benchmark: volume {} ({}, chunk {}), {} replicas on {} nodes, fio over NBD ({})",
            r.volume,
            human(r.size),
            human(r.chunk_size),
            r.replicas,
            r.nodes,
            r.nbd_uri
        ),
    );
    line(
        &mut out,
        format!(
            "Local baseline: {} on the same disk, libaio O_DIRECT; writes also O_DSYNC. {}s per job after a {}s ramp.",
            r.local_file.display(),
            r.runtime_s,
            r.ramp_s
        ),
    );
    out.push('\n');
    let widths = [20, 12, 9, 9, 9, 12, 9, 9, 9, 7, 15, 7];
    let row = |cells: [String; 12]| -> String {
        cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| if i == 0 || i >= 10 { format!("{c:<w$}") } else { format!("{c:>w$}") })
            .collect::<Vec<_>>()
            .join("  ")
    };
    line(
        &mut out,
        format!(
            "{:w0$}  {:<wb$}  local file (durable)",
            "",
            format!("Basalt ({} replicas, NBD)", r.replicas),
            w0 = widths[0],
            wb = widths[1..5].iter().sum::<usize>() + 6
        ),
    );
    let head = ["workload", "rate", "p50", "p99", "CPU/IO", "rate", "p50", "p99", "CPU/IO", "ratio", "goal", "result"];
    line(&mut out, row(head.map(String::from)));
    for x in &r.rows {
        let w = &x.workload;
        line(
            &mut out,
            row([
                w.label.to_string(),
                fmt_rate(w.metric, &x.basalt),
                fmt_latency(x.basalt.p50_us),
                fmt_latency(x.basalt.p99_us),
                format!("{:.0} µs", x.cluster_cpu.cpu_us_per_io),
                fmt_rate(w.metric, &x.local),
                fmt_latency(x.local.p50_us),
                fmt_latency(x.local.p99_us),
                format!("{:.0} µs", x.local.fio_cpu_us_per_io),
                x.ratio.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into()),
                fmt_goal(w),
                match x.verdict {
                    Verdict::Met => "met",
                    Verdict::NotMet => "NOT met",
                    Verdict::NoGoal => "",
                }
                .to_string(),
            ]),
        );
    }
    out.push('\n');
    let no_sync: Vec<String> = r
        .rows
        .iter()
        .filter_map(|x| x.local_no_sync.as_ref().map(|l| format!("{} {}", x.workload.label, fmt_rate(x.workload.metric, l))))
        .collect();
    if !no_sync.is_empty() {
        line(&mut out, format!("Local writes with O_DIRECT only (in the disk cache, not durable): {}.", no_sync.join("; ")));
    }
    line(
        &mut out,
        format!(
            "ratio: writes = Basalt / (local / {}), since every replica writes to this one disk; reads = Basalt / local.",
            r.replicas
        ),
    );
    line(
        &mut out,
        "Basalt CPU/IO = user+system time of all storaged processes per I/O; local CPU/IO = fio's own.".to_string(),
    );
    line(
        &mut out,
        "Local writes use O_DSYNC because Basalt acknowledges a write only when it is durable on every replica."
            .to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from real `fio --output-format=json` output (fio 3.33, libaio randwrite).
    const SAMPLE: &str = r#"fio: note: a warning printed before the JSON
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "randwrite-4k-qd32",
      "error" : 0,
      "job_runtime" : 3000,
      "read" : {
        "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.000000, "runtime" : 0, "total_ios" : 0,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.000000, "stddev" : 0.000000, "N" : 0 }
      },
      "write" : {
        "io_bytes" : 540672000, "bw_bytes" : 180224000, "iops" : 44000.500000,
        "runtime" : 3000, "total_ios" : 132000,
        "clat_ns" : {
          "min" : 101000, "max" : 9000000, "mean" : 700000.0, "stddev" : 1000.0, "N" : 132000,
          "percentile" : {
            "1.000000" : 200704, "50.000000" : 505856, "99.000000" : 2342912, "99.900000" : 5000000
          }
        }
      },
      "usr_cpu" : 10.000000,
      "sys_cpu" : 30.000000
    }
  ]
}
"#;

    #[test]
    fn fio_json_yields_rates_latency_and_cpu() {
        let r = FioResult::parse(SAMPLE, Direction::Write).expect("parse");
        assert_eq!(r.iops, 44000.5);
        assert_eq!(r.bw_bytes, 180224000.0);
        assert_eq!(r.ios, 132000);
        assert!((r.p50_us - 505.856).abs() < 1e-9);
        assert!((r.p99_us - 2342.912).abs() < 1e-9);
        assert_eq!(r.runtime_ms, 3000);
        // 40% of 3 s = 1.2 s of CPU over 132000 I/Os.
        assert!((r.fio_cpu_us_per_io - 1.2e6 / 132000.0).abs() < 1e-9);
        assert!((r.rate(Metric::MibPerSec) - 180224000.0 / 1048576.0).abs() < 1e-9);
    }

    #[test]
    fn fio_json_without_io_in_the_direction_is_an_error() {
        let err = FioResult::parse(SAMPLE, Direction::Read).expect_err("no reads were done");
        assert!(err.to_string().contains("no read I/O"), "{err}");
    }

    #[test]
    fn fio_json_with_a_job_error_is_an_error() {
        let failed = SAMPLE.replace(r#""error" : 0"#, r#""error" : 5"#);
        let err = FioResult::parse(&failed, Direction::Write).expect_err("job failed");
        assert!(err.to_string().contains("error 5"), "{err}");
        assert!(FioResult::parse("fio: engine nbd not loadable", Direction::Write).is_err());
    }

    #[test]
    fn write_ratio_is_against_a_third_of_local_and_read_ratio_against_local() {
        assert_eq!(limit(Direction::Write, 300.0, 3), 100.0);
        assert_eq!(limit(Direction::Read, 300.0, 3), 300.0);
        assert_eq!(ratio(Direction::Write, 80.0, 300.0, 3), Some(0.8));
        assert_eq!(ratio(Direction::Read, 150.0, 300.0, 3), Some(0.5));
        // One node holds one replica, and a zero baseline gives no ratio.
        assert_eq!(ratio(Direction::Write, 50.0, 100.0, 1), Some(0.5));
        assert_eq!(ratio(Direction::Read, 50.0, 0.0, 3), None);
    }

    #[test]
    fn goals_are_met_at_or_above_their_ratio() {
        let g = Some(Goal { min_ratio: 0.8 });
        assert_eq!(verdict(g, Some(0.8)), Verdict::Met);
        assert_eq!(verdict(g, Some(0.79)), Verdict::NotMet);
        assert_eq!(verdict(g, None), Verdict::NotMet);
        assert_eq!(verdict(None, Some(0.1)), Verdict::NoGoal);
    }

    #[test]
    fn workload_goals_match_the_issue() {
        let goal = |id: &str| WORKLOADS.iter().find(|w| w.id == id).and_then(|w| w.goal).map(|g| g.min_ratio);
        assert_eq!(goal("write-1m-qd8"), Some(0.8));
        assert_eq!(goal("randwrite-4k-qd32"), Some(0.5));
        assert_eq!(goal("randwrite-4k-qd1"), None);
        for w in WORKLOADS.iter().filter(|w| w.direction == Direction::Read) {
            assert_eq!(w.goal.map(|g| g.min_ratio), Some(0.5), "{}", w.id);
        }
    }

    fn result(iops: f64, bs: u64) -> FioResult {
        FioResult {
            iops,
            bw_bytes: iops * bs as f64,
            ios: (iops * 5.0) as u64,
            p50_us: 250.0,
            p99_us: 1500.0,
            runtime_ms: 5000,
            fio_cpu_us_per_io: 3.0,
        }
    }

    #[test]
    fn table_shows_ratios_goals_and_verdicts() {
        let row = |w: Workload, basalt: f64, local: f64| {
            let ratio = ratio(w.direction, basalt, local, 3);
            Row {
                workload: w,
                basalt: result(basalt, w.block_size),
                cluster_cpu: ClusterCpu { cpu_seconds: 1.0, wall_seconds: 5.0, cpu_us_per_io: 42.0 },
                local: result(local, w.block_size),
                local_no_sync: (w.direction == Direction::Write).then(|| result(local * 2.0, w.block_size)),
                limit: limit(w.direction, local, 3),
                ratio,
                verdict: verdict(w.goal, ratio),
            }
        };
        let report = BlockReport {
            volume: "bench-1".into(),
            size: 256 << 20,
            chunk_size: 64 << 20,
            replicas: 3,
            nodes: 3,
            nbd_uri: "nbd://127.0.0.1:1/bench-1".into(),
            local_file: "/var/tmp/x/local.dat".into(),
            runtime_s: 5.0,
            ramp_s: 2.0,
            // QD32 write at 0.6 of local/3: met; seq read at 0.25 of local: not met.
            rows: vec![row(WORKLOADS[1], 600.0, 3000.0), row(WORKLOADS[5], 100.0, 400.0)],
        };
        let table = render_table(&report);
        let line = |label: &str| table.lines().find(|l| l.starts_with(label)).expect(label).to_string();
        let qd32 = line("rand write 4K QD32");
        assert!(qd32.contains("600 IOPS") && qd32.contains("0.60x") && qd32.trim_end().ends_with("met"), "{qd32}");
        assert!(!qd32.contains("NOT"), "{qd32}");
        let seq = line("seq read 1M QD8");
        assert!(seq.contains("100.0 MiB/s") && seq.contains("0.25x") && seq.contains("NOT met"), "{seq}");
        assert!(table.contains("rand write 4K QD32 6000 IOPS"), "{table}");
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["rows"][1]["verdict"], "not_met");
        assert_eq!(json["rows"][0]["workload"]["id"], "randwrite-4k-qd32");
    }

    #[test]
    fn proc_stat_cpu_ticks_survive_odd_command_names() {
        let stat = "1234 (stor aged) x) S 1 1234 1234 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(200));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn local_durable_jobs_open_with_o_dsync_and_nbd_jobs_use_the_uri() {
        let t = Timing { runtime: Duration::from_secs(5), ramp: Duration::from_secs(2) };
        let w = &WORKLOADS[1];
        let durable = job_args(w, &Target::Local { path: "/d/f".into(), size: 1 << 30, durable: true }, &t, Path::new("/s"));
        assert!(durable.contains(&"--sync=dsync".to_string()));
        assert!(durable.contains(&"--direct=1".to_string()));
        assert!(durable.contains(&"--iodepth=32".to_string()));
        assert!(durable.contains(&"--ramp_time=2000ms".to_string()));
        let raw = job_args(w, &Target::Local { path: "/d/f".into(), size: 1 << 30, durable: false }, &t, Path::new("/s"));
        assert!(!raw.iter().any(|a| a.starts_with("--sync")));
        let nbd = job_args(w, &Target::Nbd { uri: "nbd://127.0.0.1:1/v".into() }, &t, Path::new("/s"));
        assert!(nbd.contains(&"--ioengine=nbd".to_string()));
        assert!(nbd.contains(&"--uri=nbd://127.0.0.1:1/v".to_string()));
    }
}
