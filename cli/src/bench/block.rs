//! `basalt bench block`: block I/O through NBD on a real 3-replica cluster, side by side with
//! the same fio jobs on a plain local file on the same disk, so every figure comes with the
//! physical limit it should be judged against.
//!
//! This module owns running fio and parsing its JSON, and the block report (table or JSON);
//! the workload table, CPU accounting and goal arithmetic are shared ([`super`]).
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

use super::{
    fmt_latency, fmt_rate, fmt_ratio, fmt_verdict, interruptible, limit, progress, push_line, ratio, running_pids,
    scratch_dir, table_row, verdict, CpuProbe, CpuWindow, MachineCpu, Direction, FreshCluster, JobResult,
    ProcessCpu, Verdict, Workload, DEFAULT_CHUNK_SIZE, DEFAULT_RAMP, WORKLOADS,
};
use super::qemu_nbd::QemuNbd;
use crate::dev::{self, ClusterFile};
use crate::sizes::human;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Queue depth of the untimed sequential pre-fill.
const PREFILL_IODEPTH: u32 = 8;

/// Parse fio's `--output-format=json` output for a single job. Text that fio sometimes
/// prints before the JSON (warnings) is skipped.
pub fn parse_fio(output: &str, direction: Direction) -> Result<JobResult> {
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
    Ok(JobResult {
        iops: num(d, "iops")?,
        bw_bytes: num(d, "bw_bytes")?,
        ios,
        p50_us: percentile(50.0)?,
        p99_us: percentile(99.0)?,
        runtime_ms,
        client_cpu_us_per_io: cpu_pct / 100.0 * runtime_ms as f64 * 1000.0 / ios as f64,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub workload: Workload,
    pub basalt: JobResult,
    pub cluster_cpu: ProcessCpu,
    /// Local file with `O_DIRECT`, and for writes `O_DSYNC` (durable): the baseline.
    pub local: JobResult,
    /// Local writes with `O_DIRECT` only (not durable); None for reads.
    pub local_no_sync: Option<JobResult>,
    /// In the workload's metric.
    pub limit: f64,
    pub ratio: Option<f64>,
    pub verdict: Verdict,
    /// The job through qemu-nbd serving the local file; None when qemu-nbd is not installed.
    pub nbd_reference: Option<NbdReference>,
}

/// A job through fio's NBD engine against `qemu-nbd` serving the local file with the same
/// durability as our export and no replication: what QEMU's own NBD server keeps of the disk here (see
/// [`super::qemu_nbd`]).
#[derive(Clone, Debug, Serialize)]
pub struct NbdReference {
    pub result: JobResult,
    /// qemu-nbd's own CPU.
    pub cpu: ProcessCpu,
    /// Its rate over the local file's.
    pub of_local: Option<f64>,
    /// Basalt's rate over its own, writes divided by the replica count as for the local file.
    pub basalt_ratio: Option<f64>,
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
    /// How the NBD reference was served, or why there is none.
    pub nbd_reference: String,
    /// The NBD client's own round trip (see [`NbdFloor`]); None without qemu-nbd or tmpfs.
    pub nbd_floor: Option<NbdFloor>,
}

/// A 4 KiB QD1 random read through fio's NBD engine from `qemu-nbd` serving a file held in
/// memory: the client's and the socket's share of every QD1 figure, with no disk behind it.
#[derive(Clone, Debug, Serialize)]
pub struct NbdFloor {
    pub result: JobResult,
    /// Where the in-memory file was.
    pub file: PathBuf,
}

#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// An existing cluster to use; None starts a fresh one under [`super::FRESH_CLUSTER_PARENT`]
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
    pub transport: NbdTransport,
}

/// How fio reaches the node's NBD export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NbdTransport {
    /// The node's unix socket: how a client on the node itself (a local VM's QEMU) attaches,
    /// and the fair match for a local-file baseline on the same machine.
    Unix,
    /// The node's TCP port (loopback here): how a client on another host attaches.
    Tcp,
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
            transport: NbdTransport::Unix,
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
            interruptible(owned.start(opts.nodes, &opts.storaged_bin)).await?
        }
    };
    // `fresh` (if any) stops the cluster and deletes its directory when dropped, including
    // on errors and Ctrl-C below.
    let result = interruptible(bench_cluster(&cluster, opts)).await;
    drop(fresh);
    result
}

async fn bench_cluster(cluster: &ClusterFile, opts: &BlockOptions) -> Result<BlockReport> {
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.pid.is_some_and(dev::pid_alive))
        .ok_or_else(|| anyhow!("no node of the cluster in {} is running", cluster.dir.display()))?;
    let pids = running_pids(cluster);
    let replicas = basalt_types::REPLICAS.min(pids.len());
    let probe = CpuProbe::new("storaged", pids)?;
    let local_dir = opts.local_dir.clone().unwrap_or_else(|| cluster.dir.clone());
    let scratch = scratch_dir(&local_dir)?;

    let client = cluster.client()?;
    let volume = format!("bench-{:08x}", rand::random::<u32>());
    let info = client
        .create_volume(&volume, opts.size, Some(opts.chunk_size))
        .await
        .with_context(|| format!("creating volume {volume}"))?;
    let uri = match opts.transport {
        NbdTransport::Tcp => format!("{}/{}", node.nbd_uri, volume),
        NbdTransport::Unix => unix_uri(&node.nbd_socket, &volume),
    };
    let result = bench_volume(opts, &uri, &probe, scratch.path(), replicas).await;
    // A benchmark volume left behind would hold 3x its size of disk; remove it even after
    // a failure (a fresh cluster goes away as a whole anyway).
    if opts.cluster_dir.is_some() {
        if let Err(e) = client.delete_volume(&volume).await {
            warn!(volume = %volume, error = %e, "could not delete the benchmark volume");
        }
    }
    let (rows, nbd_reference, nbd_floor) = result?;
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
        nbd_reference,
        nbd_floor,
    })
}

const LOCAL_FILE: &str = "local.dat";

/// An NBD URI for `export` on a unix socket (the `nbd+unix` scheme of the NBD URI spec, which
/// libnbd, QEMU and fio's nbd engine read).
pub(crate) fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

async fn bench_volume(
    opts: &BlockOptions,
    uri: &str,
    probe: &CpuProbe,
    scratch: &Path,
    replicas: usize,
) -> Result<(Vec<Row>, String, Option<NbdFloor>)> {
    let nbd = Target::Nbd { uri: uri.to_string() };
    let local_path = scratch.join(LOCAL_FILE);
    let timing = Timing { runtime: opts.runtime, ramp: opts.ramp };

    progress(&format!("pre-filling {uri} ({}), untimed", human(opts.size)));
    run_fio(&prefill_args(&nbd, scratch)).await.context("pre-filling the volume")?;
    progress(&format!("pre-filling the local file {} ({}), untimed", local_path.display(), human(opts.size)));
    let local = Target::Local { path: local_path.clone(), size: opts.size, durable: true };
    run_fio(&prefill_args(&local, scratch)).await.context("pre-filling the local file")?;

    let mut basalt = Vec::new();
    for w in &WORKLOADS {
        progress(&format!("Basalt: {} for {}", w.label, humantime::format_duration(opts.runtime)));
        let (r, cpu) = run_measured_job(w, &nbd, probe, &timing, scratch, "Basalt").await?;
        info!(workload = w.id, iops = r.iops, cpu_us_per_io = cpu.cpu_us_per_io, "cluster job done");
        basalt.push((r, cpu));
    }

    let qemu = QemuNbd::start(&local_path, scratch).await.context("starting qemu-nbd for the NBD reference")?;
    let described = match &qemu {
        Some(q) => format!("qemu-nbd --cache=directsync --aio=native serving the local file ({})", q.uri()),
        None => "none: qemu-nbd is not installed (apt-get install qemu-utils)".to_string(),
    };
    let rows = local_rows(opts, basalt, &local_path, qemu.as_ref(), &timing, scratch, replicas).await;
    let installed = qemu.is_some();
    if let Some(q) = qemu {
        q.stop().await;
    }
    let rows = rows?;
    let floor = if installed { nbd_floor(&timing, scratch).await? } else { None };
    Ok((rows, described, floor))
}

/// Size of the in-memory file of [`nbd_floor`]: reads of it never reach a disk.
const FLOOR_FILE_SIZE: usize = 64 << 20;
/// Where that file goes: tmpfs on Debian.
const MEMORY_DIR: &str = "/dev/shm";

/// Measures [`NbdFloor`]; None (with a note on stderr) when there is no tmpfs at
/// [`MEMORY_DIR`].
async fn nbd_floor(timing: &Timing, scratch: &Path) -> Result<Option<NbdFloor>> {
    let Some(w) = WORKLOADS.iter().find(|w| w.id == "randread-4k-qd1") else { return Ok(None) };
    let dir = Path::new(MEMORY_DIR);
    if !dir.is_dir() {
        progress(&format!("no {MEMORY_DIR}: the NBD client's round trip is not measured"));
        return Ok(None);
    }
    let file = tempfile::Builder::new().prefix("basalt-bench-floor-").tempfile_in(dir).context("creating the in-memory file")?;
    // Data, not a hole: qemu-nbd answers holes with a short reply that skips the copy.
    let data: Vec<u8> = (0..FLOOR_FILE_SIZE).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(file.path(), &data).with_context(|| format!("filling {}", file.path().display()))?;
    let Some(q) = QemuNbd::start_in_memory(file.path(), scratch).await.context("starting qemu-nbd from memory")? else {
        return Ok(None);
    };
    progress(&format!("NBD client round trip (qemu-nbd from memory): {}", w.label));
    let result = run_job(w, &Target::Nbd { uri: q.uri() }, timing, scratch).await;
    q.stop().await;
    Ok(Some(NbdFloor { result: result?, file: file.path().to_path_buf() }))
}

/// The local file's jobs (and the NBD reference's), paired with Basalt's.
async fn local_rows(
    opts: &BlockOptions,
    basalt: Vec<(JobResult, ProcessCpu)>,
    local_path: &Path,
    qemu: Option<&QemuNbd>,
    timing: &Timing,
    scratch: &Path,
    replicas: usize,
) -> Result<Vec<Row>> {
    let local = |durable| Target::Local { path: local_path.to_path_buf(), size: opts.size, durable };
    let mut rows = Vec::new();
    for (w, (b, cpu)) in WORKLOADS.iter().zip(basalt) {
        progress(&format!("local file: {}", w.label));
        let local_r = run_job(w, &local(true), timing, scratch).await?;
        let local_no_sync = match w.direction {
            Direction::Write => {
                progress(&format!("local file without O_DSYNC: {}", w.label));
                Some(run_job(w, &local(false), timing, scratch).await?)
            }
            Direction::Read => None,
        };
        let local_rate = local_r.rate(w.metric);
        let nbd_reference = match qemu {
            Some(q) => {
                progress(&format!("local file through qemu-nbd: {}", w.label));
                let probe = CpuProbe::new("qemu-nbd", vec![q.pid()])?;
                let target = Target::Nbd { uri: q.uri() };
                let (result, cpu) = run_measured_job(w, &target, &probe, timing, scratch, "qemu-nbd").await?;
                let rate = result.rate(w.metric);
                Some(NbdReference {
                    cpu,
                    of_local: (local_rate > 0.0).then(|| rate / local_rate),
                    basalt_ratio: ratio(w.direction, b.rate(w.metric), rate, replicas),
                    result,
                })
            }
            None => None,
        };
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
            nbd_reference,
        });
    }
    Ok(rows)
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

async fn run_job(w: &Workload, target: &Target, t: &Timing, scratch: &Path) -> Result<JobResult> {
    let json = run_fio(&job_args(w, target, t, scratch)).await?;
    parse_fio(&json, w.direction).with_context(|| format!("local {}", w.label))
}

/// One workload's job against `target`, with the CPU of `probe`'s processes per I/O;
/// `what` names the target in errors.
async fn run_measured_job(
    w: &Workload,
    target: &Target,
    probe: &CpuProbe,
    timing: &Timing,
    scratch: &Path,
    what: &str,
) -> Result<(JobResult, ProcessCpu)> {
    let (json, window) = run_fio_measured(&job_args(w, target, timing, scratch), probe, timing.ramp).await?;
    let r = parse_fio(&json, w.direction).with_context(|| format!("{what} {}", w.label))?;
    let cpu = window.per_io(r.ios);
    Ok((r, cpu))
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
    let machine = MachineCpu::sample();
    let t0 = Instant::now();
    let status = child.wait().await.context("waiting for fio")?;
    let steal_percent = machine.zip(MachineCpu::sample()).and_then(|(a, b)| a.steal_percent(&b));
    let window =
        CpuWindow { cpu_seconds: probe.sample()? - start, wall_seconds: t0.elapsed().as_secs_f64(), steal_percent };
    let stderr = stderr_task.await.unwrap_or_default();
    let json = read_output(args, status, &stderr)?;
    Ok((json, window))
}

// ---- report -------------------------------------------------------------------------------

/// Steal above this (percent of the machine's CPU during a job) gets a warning in the report.
const STEAL_WARN_PERCENT: f64 = 5.0;

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
    let line = |out: &mut String, s: String| push_line(out, &s);
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
    let row = |cells: [String; 12]| table_row(&cells, &widths, |i| i == 0 || i >= 10);
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
                format!("{:.0} µs", x.local.client_cpu_us_per_io),
                fmt_ratio(x.ratio),
                fmt_goal(w),
                fmt_verdict(x.verdict).to_string(),
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
    render_reference(&mut out, r);
    render_floor(&mut out, r);
    if let Some(worst) = r.rows.iter().filter_map(|x| x.cluster_cpu.steal_percent).reduce(f64::max) {
        let warn = if worst > STEAL_WARN_PERCENT {
            " — the host was busy: these figures understate the software and vary from run to run"
        } else {
            ""
        };
        line(&mut out, format!("CPU taken by the hypervisor (steal) during the Basalt jobs: up to {worst:.1}%{warn}."));
    }
    line(
        &mut out,
        "Local writes use O_DSYNC because Basalt acknowledges a write only when it is durable on every replica."
            .to_string(),
    );
    out
}

/// The NBD client's round trip, and what it leaves of the QD1 read goal: the client's p50
/// plus the local file's is the least a QD1 read through this client can take here.
fn render_floor(out: &mut String, r: &BlockReport) {
    let Some(f) = &r.nbd_floor else { return };
    push_line(
        out,
        &format!(
            "NBD client round trip (qemu-nbd answering rand read 4K QD1 from memory, {}): {:.0} IOPS, p50 {}.",
            f.file.display(),
            f.result.iops,
            fmt_latency(f.result.p50_us)
        ),
    );
    let Some(x) = r.rows.iter().find(|x| x.workload.id == "randread-4k-qd1") else { return };
    let least = f.result.p50_us + x.local.p50_us;
    if least <= 0.0 || x.local.iops <= 0.0 {
        return;
    }
    push_line(
        out,
        &format!(
            "With the local file's p50 ({}) that is {} per QD1 read before any server work: at most about {:.0} IOPS, {:.2}x of the local file. Basalt's p50 ({}) is {} above it.",
            fmt_latency(x.local.p50_us),
            fmt_latency(least),
            1e6 / least,
            1e6 / least / x.local.iops,
            fmt_latency(x.basalt.p50_us),
            fmt_latency(x.basalt.p50_us - least),
        ),
    );
}

/// The NBD reference's table: what the same NBD client gets from a local file with no
/// replication, and Basalt against it.
fn render_reference(out: &mut String, r: &BlockReport) {
    out.push('\n');
    push_line(out, &format!("NBD reference (same fio NBD engine, no replication): {}", r.nbd_reference));
    if r.rows.iter().all(|x| x.nbd_reference.is_none()) {
        return;
    }
    let widths = [20, 12, 9, 9, 9, 9, 12];
    let row = |cells: [String; 7]| table_row(&cells, &widths, |i| i == 0);
    push_line(out, &row(["workload", "rate", "p50", "p99", "CPU/IO", "of local", "Basalt vs it"].map(String::from)));
    for x in &r.rows {
        let Some(n) = &x.nbd_reference else { continue };
        let w = &x.workload;
        push_line(
            out,
            &row([
                w.label.to_string(),
                fmt_rate(w.metric, &n.result),
                fmt_latency(n.result.p50_us),
                fmt_latency(n.result.p99_us),
                format!("{:.0} µs", n.cpu.cpu_us_per_io),
                fmt_ratio(n.of_local),
                fmt_ratio(n.basalt_ratio),
            ]),
        );
    }
    push_line(
        out,
        &format!(
            "of local = its rate / the local file's (what NBD through this client keeps of the disk); Basalt vs it: writes against its rate / {}.",
            r.replicas
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Metric;

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
        let r = parse_fio(SAMPLE, Direction::Write).expect("parse");
        assert_eq!(r.iops, 44000.5);
        assert_eq!(r.bw_bytes, 180224000.0);
        assert_eq!(r.ios, 132000);
        assert!((r.p50_us - 505.856).abs() < 1e-9);
        assert!((r.p99_us - 2342.912).abs() < 1e-9);
        assert_eq!(r.runtime_ms, 3000);
        // 40% of 3 s = 1.2 s of CPU over 132000 I/Os.
        assert!((r.client_cpu_us_per_io - 1.2e6 / 132000.0).abs() < 1e-9);
        assert!((r.rate(Metric::MibPerSec) - 180224000.0 / 1048576.0).abs() < 1e-9);
    }

    #[test]
    fn fio_json_without_io_in_the_direction_is_an_error() {
        let err = parse_fio(SAMPLE, Direction::Read).expect_err("no reads were done");
        assert!(err.to_string().contains("no read I/O"), "{err}");
    }

    #[test]
    fn fio_json_with_a_job_error_is_an_error() {
        let failed = SAMPLE.replace(r#""error" : 0"#, r#""error" : 5"#);
        let err = parse_fio(&failed, Direction::Write).expect_err("job failed");
        assert!(err.to_string().contains("error 5"), "{err}");
        assert!(parse_fio("fio: engine nbd not loadable", Direction::Write).is_err());
    }

    fn result(iops: f64, bs: u64) -> JobResult {
        JobResult {
            iops,
            bw_bytes: iops * bs as f64,
            ios: (iops * 5.0) as u64,
            p50_us: 250.0,
            p99_us: 1500.0,
            runtime_ms: 5000,
            client_cpu_us_per_io: 3.0,
        }
    }

    #[test]
    fn table_shows_ratios_goals_and_verdicts() {
        let row = |w: Workload, basalt: f64, local: f64, reference: f64| {
            let ratio = ratio(w.direction, basalt, local, 3);
            let cpu = ProcessCpu { cpu_seconds: 1.0, wall_seconds: 5.0, cpu_us_per_io: 7.0, steal_percent: None };
            let nbd_reference = Some(NbdReference {
                result: result(reference, w.block_size),
                cpu,
                of_local: Some(reference / local),
                basalt_ratio: super::ratio(w.direction, basalt, reference, 3),
            });
            Row {
                workload: w,
                basalt: result(basalt, w.block_size),
                cluster_cpu: ProcessCpu { cpu_seconds: 1.0, wall_seconds: 5.0, cpu_us_per_io: 42.0, steal_percent: Some(2.0) },
                local: result(local, w.block_size),
                local_no_sync: (w.direction == Direction::Write).then(|| result(local * 2.0, w.block_size)),
                limit: limit(w.direction, local, 3),
                ratio,
                verdict: verdict(w.goal, ratio),
                nbd_reference,
            }
        };
        let mut qd1_read = row(WORKLOADS[2], 8000.0, 19000.0, 8500.0);
        qd1_read.local.p50_us = 60.0;
        qd1_read.basalt.p50_us = 150.0;
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
            rows: vec![row(WORKLOADS[1], 600.0, 3000.0, 2400.0), row(WORKLOADS[5], 100.0, 400.0, 200.0), qd1_read],
            nbd_reference: "qemu-nbd serving the local file".into(),
            nbd_floor: Some(NbdFloor { result: JobResult { p50_us: 40.0, ..result(20000.0, 4096) }, file: "/dev/shm/f".into() }),
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
        assert!(table.contains("(steal) during the Basalt jobs: up to 2.0%."), "{table}");
        assert!(!table.contains("host was busy"), "2% steal is below the warning: {table}");
        // The client's round trip (40 µs) plus the local read (60 µs): 100 µs, 10000 IOPS,
        // 0.53x of the local 19000; Basalt's 150 µs is 50 µs above.
        assert!(table.contains("from memory, /dev/shm/f): 20000 IOPS, p50 40 µs."), "{table}");
        assert!(table.contains("that is 100 µs per QD1 read before any server work: at most about 10000 IOPS, 0.53x"), "{table}");
        assert!(table.contains("Basalt's p50 (150 µs) is 50 µs above it."), "{table}");
        assert_eq!(json["rows"][0]["cluster_cpu"]["steal_percent"], 2.0);
        // The NBD reference: its rate, its share of the local file, Basalt against it
        // (writes against its rate / 3).
        let reference = table.split("NBD reference").nth(1).expect("reference table");
        let line = |label: &str| reference.lines().find(|l| l.starts_with(label)).expect(label).to_string();
        let qd32 = line("rand write 4K QD32");
        assert!(qd32.contains("2400 IOPS") && qd32.contains("0.80x") && qd32.contains("0.75x"), "{qd32}");
        let seq = line("seq read 1M QD8");
        assert!(seq.contains("200.0 MiB/s") && seq.contains("0.50x"), "{seq}");
        assert_eq!(json["rows"][1]["nbd_reference"]["basalt_ratio"], 0.5);
    }

    #[test]
    fn unix_socket_uris_follow_the_nbd_uri_scheme() {
        assert_eq!(
            unix_uri(Path::new("/var/tmp/c/node1/nbd.sock"), "bench-1"),
            "nbd+unix:///bench-1?socket=/var/tmp/c/node1/nbd.sock"
        );
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
