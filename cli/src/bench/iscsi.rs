//! `basalt bench iscsi`: 4 KiB random and 1 MiB sequential I/O through our iSCSI target on
//! a one-node cluster (one replica: the protocol and storage path without replication) and
//! on a three-node cluster (the replicated figure), and in the same run through Debian's
//! `tgt` serving a plain file on the same disk. Goal: the unreplicated path at least as fast
//! as tgt; the report gives the ratio and each target's CPU per I/O.
//!
//! This module owns the run, the export of a volume as a LUN, and the iSCSI report. All
//! three targets are up for the whole run and take turns workload by workload, so the
//! figures a row compares are taken within a minute of each other (this machine drifts by
//! 10-20% over the minutes a target's whole series takes; an idle 3-node cluster uses about
//! 0.5% of one CPU, measured, so the idle targets hardly disturb the one at work). Even so,
//! two consecutive jobs on one target differ by up to 10% at QD1, enough to flip a verdict
//! near parity, so the whole series runs in several rounds (3 by default) and a row reports
//! the median of the rounds' ratios, each taken from jobs run side by side, with the spread.
//! The load comes from [`super::initiator`] — the same initiator, negotiating the same
//! limits, for every target (its module doc says why it is not libiscsi behind qemu-nbd).
//!
//! What "1 replica" is. `basalt dev up --nodes 1` makes a cluster whose chunks have one
//! replica (`min_replicas` 1). It is the full product path minus replication: the target
//! hands each command to the storage client, which calls the node's own chunk service in
//! process (a replica on the local node is never reached through the network stack); the
//! chunk service checksums every block, writes with `O_DIRECT` and commits the block sums to
//! its journal with fdatasync before acknowledging. tgt does `pread`/`pwrite` on the file with
//! `O_DIRECT | O_SYNC`, so both acknowledge a write only once it is durable and both read
//! from the disk. Every target's LUN is written once (untimed) before it is measured, so no
//! read is answered from a hole.
//!
//! CPU per I/O is the user + system time of the target's processes during the measured
//! window over the I/Os in it: tgtd; the one storaged of the one-node cluster (target,
//! storage client, chunk service and metadata in one process); all three storaged of the
//! replicated cluster.

use super::disk::{DeviceIo, DiskProbe};
use super::initiator::{Job, JobLimit, Measured, Negotiated, Proposal, Session};
use super::tgt::{self, Tgt, TGT_IQN, TGT_LUN};
use super::{
    fmt_latency, fmt_rate, fmt_ratio, fmt_verdict, interruptible, progress, push_line, ratio, running_pids,
    scratch_dir, table_row, verdict, CpuProbe, FreshCluster, Goal, JobResult, ProcessCpu, Verdict, Workload,
    DEFAULT_CHUNK_SIZE, DEFAULT_RAMP, FRESH_CLUSTER_PARENT, WORKLOADS,
};
use crate::dev;
use crate::sizes::human;
use anyhow::{anyhow, bail, Context, Result};
use basalt_iscsi::cluster::{update_target, LunDef};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The goal of every workload: Basalt with one replica at least as fast as tgt.
pub const GOAL: Goal = Goal { min_ratio: 1.0 };
const BASALT_IQN: &str = "iqn.2026-11.io.basalt:bench";
const BASALT_LUN: u64 = 0;
/// The untimed pre-fill: sequential 1 MiB writes, 8 in flight.
const PREFILL_BLOCK: u32 = 1 << 20;
const PREFILL_IODEPTH: u32 = 8;
/// Rounds of the whole series (see the module doc).
pub const DEFAULT_ROUNDS: usize = 3;

/// The workloads of this benchmark: the shared shapes, each judged against tgt.
pub fn workloads() -> Vec<Workload> {
    WORKLOADS.iter().map(|w| w.with_goal(Some(GOAL))).collect()
}

/// The workloads named in `ids` (comma-separated workload ids, in the benchmark's order).
pub fn select_workloads(ids: &str) -> Result<Vec<Workload>> {
    let all = workloads();
    let wanted: Vec<&str> = ids.split(',').map(str::trim).filter(|id| !id.is_empty()).collect();
    if wanted.is_empty() {
        bail!("no workload named");
    }
    if let Some(unknown) = wanted.iter().find(|id| !all.iter().any(|w| w.id == **id)) {
        let known: Vec<&str> = all.iter().map(|w| w.id).collect();
        bail!("no workload {unknown:?}; the workloads are {}", known.join(", "));
    }
    Ok(all.into_iter().filter(|w| wanted.contains(&w.id)).collect())
}

#[derive(Clone, Debug)]
pub struct IscsiOptions {
    /// Where the clusters and tgt's file live (one disk for all; never tmpfs).
    pub work_dir: PathBuf,
    /// Volume and file size.
    pub size: u64,
    pub chunk_size: u64,
    pub runtime: Duration,
    pub ramp: Duration,
    /// Nodes of the replicated cluster.
    pub replicated_nodes: usize,
    pub storaged_bin: PathBuf,
    pub proposal: Proposal,
    /// What to measure (all of [`workloads`] by default).
    pub workloads: Vec<Workload>,
    /// How many times the whole series runs (see the module doc).
    pub rounds: usize,
}

impl IscsiOptions {
    pub fn new(size: u64, runtime: Duration) -> Self {
        Self {
            work_dir: PathBuf::from(FRESH_CLUSTER_PARENT),
            size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            runtime,
            ramp: DEFAULT_RAMP,
            replicated_nodes: 3,
            storaged_bin: dev::default_storaged_bin(),
            proposal: Proposal::default(),
            workloads: workloads(),
            rounds: DEFAULT_ROUNDS,
        }
    }
}

/// One target as benchmarked.
#[derive(Clone, Debug, Serialize)]
pub struct TargetRun {
    /// "tgt", "basalt-1" or "basalt-3".
    pub id: String,
    pub description: String,
    pub portal: SocketAddr,
    pub iqn: String,
    pub lun: u64,
    /// The processes whose CPU is counted, and how many.
    pub process: String,
    pub processes: usize,
    pub replicas: usize,
    pub block_len: u32,
    pub capacity: u64,
    pub negotiated: Negotiated,
    /// One per workload and round, round after round (each round in [`workloads`] order).
    pub jobs: Vec<JobRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JobRun {
    pub workload: &'static str,
    pub result: JobResult,
    pub target_cpu: ProcessCpu,
    /// The disk's traffic per I/O (where the work directory is on a disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceIo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub workload: Workload,
    /// Each target's median round (by rate).
    pub tgt: JobRun,
    pub basalt: JobRun,
    pub replicated: JobRun,
    /// Basalt (1 replica) / tgt of each round, in run order.
    pub round_ratios: Vec<Option<f64>>,
    /// The median of `round_ratios`: judged against the goal.
    pub ratio: Option<f64>,
    /// Basalt (replicated) / tgt, for information.
    pub replicated_ratio: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, Serialize)]
pub struct IscsiReport {
    pub size: u64,
    pub chunk_size: u64,
    pub runtime_s: f64,
    pub ramp_s: f64,
    pub rounds: usize,
    pub tgt_file: PathBuf,
    pub tgt_bsoflags: &'static str,
    /// The disk under the work directory, whose traffic each job reports (none off disks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    pub proposal: Proposal,
    pub targets: Vec<TargetRun>,
    pub rows: Vec<Row>,
}

/// tgt's target parameters for the limits we propose, so that tgt negotiates what our target
/// does (tgt's own defaults are InitialR2T=Yes, 8 KiB PDUs, one R2T at a time).
fn tgt_params(p: &Proposal) -> Vec<(&'static str, String)> {
    let yes_no = |b: bool| if b { "Yes" } else { "No" }.to_string();
    vec![
        ("MaxRecvDataSegmentLength", p.max_recv_data_segment_length.to_string()),
        ("MaxXmitDataSegmentLength", p.max_recv_data_segment_length.to_string()),
        ("MaxBurstLength", p.max_burst_length.to_string()),
        ("FirstBurstLength", p.first_burst_length.to_string()),
        ("InitialR2T", yes_no(p.initial_r2t)),
        ("ImmediateData", yes_no(p.immediate_data)),
        ("MaxOutstandingR2T", p.max_outstanding_r2t.to_string()),
    ]
}

/// Run the whole benchmark. Progress goes to stderr; the caller prints the report.
pub async fn run_iscsi(opts: &IscsiOptions) -> Result<IscsiReport> {
    if opts.size < 1 << 20 {
        bail!("the volume must be at least 1 MiB");
    }
    if opts.runtime < Duration::from_millis(100) {
        bail!("the runtime must be at least 100ms");
    }
    if opts.rounds == 0 {
        bail!("at least one round is needed");
    }
    if opts.replicated_nodes < 2 {
        bail!("the replicated cluster needs at least 2 nodes");
    }
    if !opts.storaged_bin.exists() {
        bail!("storaged binary not found at {} (build it, or set BASALT_STORAGED)", opts.storaged_bin.display());
    }
    tgt::ensure_installed().await?;
    let scratch = scratch_dir(&opts.work_dir)?;
    // tgt's file and both clusters live on this one disk.
    let disk = DiskProbe::for_dir(&opts.work_dir)?;

    // Every target stays up and the workloads take turns (see the module doc).
    progress(&format!("starting tgtd with a {} file in {}", human(opts.size), scratch.path().display()));
    // `tgt` stops tgtd on drop, the clusters stop on drop, also after an error or Ctrl-C.
    let tgt = interruptible(Tgt::start(scratch.path(), opts.size, &tgt_params(&opts.proposal))).await?;
    let tgt_target = Target {
        spec: TargetSpec {
            id: "tgt",
            description: format!("Debian tgt, plain file, {}", tgt::BSOFLAGS),
            portal: tgt.portal,
            iqn: TGT_IQN,
            lun: TGT_LUN,
            process: "tgtd",
            replicas: 1,
        },
        processes: 1,
        probe: CpuProbe::new("tgtd", vec![tgt.pid()])?,
    };
    let one = FreshCluster::new_in(&opts.work_dir)?;
    let one_target = interruptible(start_cluster(&one, 1, opts)).await?;
    let many = FreshCluster::new_in(&opts.work_dir)?;
    let many_target = interruptible(start_cluster(&many, opts.replicated_nodes, opts)).await?;
    let targets = [&tgt_target, &one_target, &many_target];
    let mut runs = Vec::new();
    for t in targets {
        runs.push(interruptible(prefill(t, opts)).await?);
    }
    if opts.workloads.is_empty() {
        bail!("no workload to measure");
    }
    for round in 1..=opts.rounds {
        progress(&format!("round {round} of {}", opts.rounds));
        for &w in &opts.workloads {
            for (t, run) in targets.iter().zip(runs.iter_mut()) {
                run.jobs.push(interruptible(run_workload(t, w, opts, disk.as_ref())).await?);
            }
        }
    }
    drop((tgt, one, many));
    let [tgt_run, basalt, replicated]: [TargetRun; 3] =
        runs.try_into().map_err(|_| anyhow!("expected three targets"))?;

    let rows = rows(&opts.workloads, opts.rounds, &tgt_run, &basalt, &replicated)?;
    Ok(IscsiReport {
        size: opts.size,
        chunk_size: opts.chunk_size,
        runtime_s: opts.runtime.as_secs_f64(),
        ramp_s: opts.ramp.as_secs_f64(),
        rounds: opts.rounds,
        tgt_file: scratch.path().join("tgt-lun1.dat"),
        tgt_bsoflags: tgt::BSOFLAGS,
        disk: disk.map(|d| d.disk().to_string()),
        proposal: opts.proposal.clone(),
        targets: vec![tgt_run, basalt, replicated],
        rows,
    })
}

/// Pairs the three targets' jobs by workload and round: a round's ratio compares jobs run
/// side by side; a row gives the median of the rounds' ratios and each target's median job.
fn rows(
    workloads: &[Workload],
    rounds: usize,
    tgt: &TargetRun,
    basalt: &TargetRun,
    replicated: &TargetRun,
) -> Result<Vec<Row>> {
    for t in [tgt, basalt, replicated] {
        if t.jobs.len() != workloads.len() * rounds {
            bail!("{} ran {} jobs, not {} workloads x {rounds} rounds", t.id, t.jobs.len(), workloads.len());
        }
    }
    workloads
        .iter()
        .copied()
        .enumerate()
        .map(|(i, w)| {
            let rate = |j: &JobRun| j.result.rate(w.metric);
            let series = |t: &TargetRun| -> Vec<JobRun> {
                (0..rounds).map(|r| t.jobs[r * workloads.len() + i].clone()).collect()
            };
            let (t, b, r) = (series(tgt), series(basalt), series(replicated));
            for (run, jobs) in [(tgt, &t), (basalt, &b), (replicated, &r)] {
                if let Some(j) = jobs.iter().find(|j| j.workload != w.id) {
                    bail!("{}: a {} job where {} was expected", run.id, j.workload, w.id);
                }
            }
            // One replica on each side: the ratio is Basalt's rate over tgt's.
            let round_ratios: Vec<Option<f64>> =
                t.iter().zip(&b).map(|(t, b)| ratio(w.direction, rate(b), rate(t), 1)).collect();
            let ratio = round_ratios.iter().copied().collect::<Option<Vec<f64>>>().and_then(|v| median_by(v, |x| *x));
            let typical = |jobs: Vec<JobRun>| median_by(jobs, rate).ok_or_else(|| anyhow!("no round of {}", w.id));
            let (t, b, r) = (typical(t)?, typical(b)?, typical(r)?);
            Ok(Row {
                workload: w,
                verdict: verdict(w.goal, ratio),
                round_ratios,
                ratio,
                replicated_ratio: super::ratio(w.direction, rate(&r), rate(&t), 1),
                tgt: t,
                basalt: b,
                replicated: r,
            })
        })
        .collect()
}

/// The item with the middle key (the lower of the two middle ones for an even count).
fn median_by<T>(mut items: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    items.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = items.len().checked_sub(1)? / 2;
    Some(items.swap_remove(middle))
}

/// What to benchmark at one portal.
struct TargetSpec<'a> {
    id: &'a str,
    description: String,
    portal: SocketAddr,
    iqn: &'a str,
    lun: u64,
    process: &'a str,
    replicas: usize,
}

/// A target being benchmarked: where it is and whose CPU counts.
struct Target<'a> {
    spec: TargetSpec<'a>,
    processes: usize,
    probe: CpuProbe,
}

/// Starts `fresh` as a cluster of `nodes` and exports a volume as a LUN, benchmarked through
/// node 1's portal.
async fn start_cluster(fresh: &FreshCluster, nodes: usize, opts: &IscsiOptions) -> Result<Target<'static>> {
    progress(&format!("starting a {nodes}-node cluster in {}", fresh.dir().display()));
    let cluster = fresh.start(nodes, &opts.storaged_bin).await?;
    let node = cluster.nodes.first().ok_or_else(|| anyhow!("the cluster has no node"))?;
    let portal = node.iscsi_addr.ok_or_else(|| anyhow!("{} serves no iSCSI portal", node.name))?;
    let pids = running_pids(&cluster);
    if pids.len() != nodes {
        bail!("{} of {nodes} nodes are running", pids.len());
    }
    let probe = CpuProbe::new("storaged", pids)?;
    let client = cluster.client()?;
    let volume = "bench";
    client.create_volume(volume, opts.size, Some(opts.chunk_size)).await.context("creating the volume")?;
    update_target(&client, BASALT_IQN, true, |t| {
        t.luns = vec![LunDef { lun: BASALT_LUN, volume: volume.into(), read_only: false }];
        Ok(())
    })
    .await
    .map_err(|e| anyhow!("exporting the volume: {e}"))?;
    let replicas = basalt_types::REPLICAS.min(nodes);
    let spec = TargetSpec {
        id: if nodes == 1 { "basalt-1" } else { "basalt-3" },
        description: if nodes == 1 {
            "Basalt, 1-node cluster (1 replica)".to_string()
        } else {
            format!("Basalt, {nodes}-node cluster ({replicas} replicas)")
        },
        portal,
        iqn: BASALT_IQN,
        lun: BASALT_LUN,
        process: "storaged",
        replicas,
    };
    Ok(Target { spec, processes: nodes, probe })
}

async fn login(t: &TargetSpec<'_>, opts: &IscsiOptions) -> Result<Session> {
    Session::login(t.portal, t.iqn, t.lun, &opts.proposal)
        .await
        .with_context(|| format!("{} at {}", t.description, t.portal))
}

/// Pre-fills the LUN (untimed); the run it returns has no jobs yet.
async fn prefill(target: &Target<'_>, opts: &IscsiOptions) -> Result<TargetRun> {
    let t = &target.spec;
    progress(&format!("{}: pre-filling {} (untimed)", t.id, human(opts.size)));
    let mut s = login(t, opts).await?;
    let (block_len, capacity, negotiated) = (s.block_len, s.capacity, s.negotiated.clone());
    if capacity < opts.size {
        bail!("{}: the LUN has {capacity} bytes, fewer than {}", t.id, opts.size);
    }
    let prefill = Job {
        direction: super::Direction::Write,
        random: false,
        block_size: opts.size.min(u64::from(PREFILL_BLOCK)) as u32,
        iodepth: PREFILL_IODEPTH,
        span: opts.size,
        limit: JobLimit::OnePass,
    };
    s.run(&prefill, &target.probe, None).await.with_context(|| format!("{}: pre-filling", t.id))?;
    s.logout().await?;
    Ok(TargetRun {
        id: t.id.to_string(),
        description: t.description.clone(),
        portal: t.portal,
        iqn: t.iqn.to_string(),
        lun: t.lun,
        process: t.process.to_string(),
        processes: target.processes,
        replicas: t.replicas,
        block_len,
        capacity,
        negotiated,
        jobs: Vec::new(),
    })
}

/// One workload on one target, in a session of its own.
async fn run_workload(target: &Target<'_>, w: Workload, opts: &IscsiOptions, disk: Option<&DiskProbe>) -> Result<JobRun> {
    let t = &target.spec;
    progress(&format!("{}: {} for {}", t.id, w.label, humantime::format_duration(opts.runtime)));
    let job = Job {
        direction: w.direction,
        random: w.random(),
        block_size: w.block_size as u32,
        iodepth: w.iodepth,
        span: opts.size,
        limit: JobLimit::Timed { ramp: opts.ramp, runtime: opts.runtime },
    };
    let mut s = login(t, opts).await?;
    let Measured { result, target_cpu, device } =
        s.run(&job, &target.probe, disk).await.with_context(|| format!("{}: {}", t.id, w.label))?;
    s.logout().await?;
    tracing::info!(target = t.id, workload = w.id, iops = result.iops, cpu_us_per_io = target_cpu.cpu_us_per_io, "job done");
    Ok(JobRun { workload: w.id, result, target_cpu, device })
}

// ---- report -------------------------------------------------------------------------------

fn fmt_cpu(j: &JobRun) -> String {
    format!("{:.0} µs", j.target_cpu.cpu_us_per_io)
}

fn describe_negotiated(n: &Negotiated) -> String {
    let yn = |b: bool| if b { "Yes" } else { "No" };
    format!(
        "ImmediateData={} InitialR2T={} FirstBurstLength={} MaxBurstLength={} MaxOutstandingR2T={} target MaxRecvDataSegmentLength={}",
        yn(n.immediate_data),
        yn(n.initial_r2t),
        human(u64::from(n.first_burst_length)),
        human(u64::from(n.max_burst_length)),
        n.max_outstanding_r2t,
        human(u64::from(n.target_max_recv_dsl)),
    )
}

/// The human-readable report.
pub fn render_table(r: &IscsiReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, s: &str| push_line(out, s);
    line(
        &mut out,
        &format!(
            "Basalt iSCSI benchmark: one initiator session per job (`basalt bench` load generator, the same for every \
             target), {} LUN written once before measuring, {}s per job after a {}s ramp, {}.",
            human(r.size),
            r.runtime_s,
            r.ramp_s,
            if r.rounds == 1 {
                "one round".to_string()
            } else {
                format!("{} rounds (a row shows each target's median round and the median of the rounds' ratios)", r.rounds)
            }
        ),
    );
    for t in &r.targets {
        line(&mut out, &format!("  {:<9} {} at {} (LUN {})", t.id, t.description, t.portal, t.lun));
    }
    let first = r.targets.first().map(|t| t.negotiated.clone());
    if r.targets.iter().all(|t| Some(&t.negotiated) == first.as_ref()) {
        if let Some(n) = &first {
            line(&mut out, &format!("  negotiated with every target: {}", describe_negotiated(n)));
        }
    } else {
        for t in &r.targets {
            line(&mut out, &format!("  negotiated with {}: {}", t.id, describe_negotiated(&t.negotiated)));
        }
    }
    out.push('\n');

    let cpu_of = |id: &str| {
        r.targets
            .iter()
            .find(|t| t.id == id)
            .map(|t| if t.processes == 1 { t.process.clone() } else { format!("{} {}x", t.process, t.processes) })
            .unwrap_or_default()
    };
    let widths = [20, 12, 12, 7, 12, 9, 12, 12, 12, 7];
    let left = |i: usize| i == 0 || i >= 8;
    let rate_w = widths[1..5].iter().sum::<usize>() + 6;
    line(&mut out, &format!("{:w0$}  {:<rate_w$}  CPU per I/O of the target", "", "rate", w0 = widths[0]));
    let head = [
        "workload".to_string(),
        "tgt".into(),
        "Basalt 1x".into(),
        "ratio".into(),
        "Basalt 3x".into(),
        cpu_of("tgt"),
        cpu_of("basalt-1"),
        cpu_of("basalt-3"),
        "goal".into(),
        "result".into(),
    ];
    line(&mut out, &table_row(&head, &widths, left));
    for x in &r.rows {
        let w = &x.workload;
        let cells = [
            w.label.to_string(),
            fmt_rate(w.metric, &x.tgt.result),
            fmt_rate(w.metric, &x.basalt.result),
            fmt_ratio(x.ratio),
            fmt_rate(w.metric, &x.replicated.result),
            fmt_cpu(&x.tgt),
            fmt_cpu(&x.basalt),
            fmt_cpu(&x.replicated),
            w.goal.map(|g| format!(">= {:.1}x tgt", g.min_ratio)).unwrap_or_else(|| "-".into()),
            fmt_verdict(x.verdict).to_string(),
        ];
        line(&mut out, &table_row(&cells, &widths, left));
    }
    out.push('\n');
    let lat_w = [20, 19, 19, 19, 22];
    let head = ["latency p50 / p99", "tgt", "Basalt 1x", "Basalt 3x", "initiator CPU per I/O"];
    line(&mut out, &table_row(&head.map(String::from), &lat_w, |i| i == 0));
    let lat = |j: &JobRun| format!("{} / {}", fmt_latency(j.result.p50_us), fmt_latency(j.result.p99_us));
    for x in &r.rows {
        let client = [&x.tgt, &x.basalt, &x.replicated]
            .map(|j| format!("{:.0}", j.result.client_cpu_us_per_io))
            .join(" / ");
        let cells = [x.workload.label.to_string(), lat(&x.tgt), lat(&x.basalt), lat(&x.replicated), format!("{client} µs")];
        line(&mut out, &table_row(&cells, &lat_w, |i| i == 0));
    }
    out.push('\n');
    if let Some(disk) = &r.disk {
        let head = [format!("{disk} requests per I/O"), "tgt".into(), "Basalt 1x".into(), "Basalt 3x".into()];
        let dev = |j: &JobRun| j.device.as_ref().map(DeviceIo::describe).unwrap_or_else(|| "-".into());
        let rows: Vec<[String; 4]> = r
            .rows
            .iter()
            .map(|x| [x.workload.label.to_string(), dev(&x.tgt), dev(&x.basalt), dev(&x.replicated)])
            .collect();
        // Cells vary in length (a read adds its own figures): each column as wide as its
        // widest cell keeps the columns aligned.
        let mut dev_w = [20usize; 4];
        for cells in std::iter::once(&head).chain(&rows) {
            for (w, c) in dev_w.iter_mut().zip(cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        line(&mut out, &table_row(&head, &dev_w, |i| i == 0));
        for cells in &rows {
            line(&mut out, &table_row(cells, &dev_w, |i| i == 0));
        }
        out.push('\n');
    }
    if r.rounds > 1 {
        line(&mut out, "ratio of each round (Basalt 1x / tgt, jobs run side by side), in run order");
        for x in &r.rows {
            let each: Vec<String> = x.round_ratios.iter().map(|q| fmt_ratio(*q)).collect();
            line(&mut out, &format!("{:<20}  {}", x.workload.label, each.join("  ")));
        }
        out.push('\n');
    }
    let met = r.rows.iter().filter(|x| x.verdict == Verdict::Met).count();
    line(
        &mut out,
        &format!("Goal (Basalt with 1 replica at least as fast as tgt): met in {met} of {} workloads.", r.rows.len()),
    );
    line(&mut out, "ratio = Basalt 1 replica / tgt; Basalt 3x is the replicated figure (3 replicas on this one disk).");
    line(
        &mut out,
        "CPU per I/O = user+system time of the target's processes (tgtd; the storaged of each cluster) per I/O.",
    );
    line(
        &mut out,
        "initiator CPU per I/O = this process (the load generator) per I/O, for tgt / Basalt 1x / Basalt 3x.",
    );
    if let Some(disk) = &r.disk {
        line(
            &mut out,
            &format!(
                "{disk} requests per I/O = writes (W) + cache flushes (F) and KiB written, reads (R) and KiB read, that \
                 the disk completed during the job (/proc/diskstats, whole disk), per I/O of the job. The kernel counts \
                 the empty write that carries an fsync's flush as a write too: one durable write through a file is \
                 2 W + 1 F."
            ),
        );
    }
    line(
        &mut out,
        &format!(
            "tgt serves {} with {} (O_DIRECT|O_SYNC): durable writes and disk reads, as Basalt's.",
            r.tgt_file.display(),
            r.tgt_bsoflags
        ),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Direction, Metric};

    fn job(w: &Workload, rate: f64, cpu: f64) -> JobRun {
        let iops = match w.metric {
            Metric::Iops => rate,
            Metric::MibPerSec => rate * (1 << 20) as f64 / w.block_size as f64,
        };
        JobRun {
            workload: w.id,
            result: JobResult {
                iops,
                bw_bytes: iops * w.block_size as f64,
                ios: (iops * 5.0) as u64,
                p50_us: 120.0,
                p99_us: 2500.0,
                runtime_ms: 5000,
                client_cpu_us_per_io: 4.0,
            },
            target_cpu: ProcessCpu { cpu_seconds: 1.0, wall_seconds: 5.0, cpu_us_per_io: cpu, steal_percent: None },
            device: None,
        }
    }

    fn target(id: &str, process: &str, processes: usize, rates: &[f64], cpu: f64) -> TargetRun {
        TargetRun {
            id: id.into(),
            description: id.into(),
            portal: "127.0.0.1:3260".parse().expect("addr"),
            iqn: "iqn.x".into(),
            lun: 0,
            process: process.into(),
            processes,
            replicas: processes,
            block_len: 512,
            capacity: 1 << 30,
            negotiated: crate::bench::initiator::negotiate(&Proposal::default(), &[]).expect("defaults"),
            jobs: workloads().iter().zip(rates).map(|(w, r)| job(w, *r, cpu)).collect(),
        }
    }

    fn report(rounds: usize, targets: Vec<TargetRun>, rows: Vec<Row>) -> IscsiReport {
        IscsiReport {
            size: 1 << 30,
            chunk_size: 64 << 20,
            runtime_s: 5.0,
            ramp_s: 1.0,
            rounds,
            tgt_file: "/var/tmp/b/tgt-lun1.dat".into(),
            tgt_bsoflags: tgt::BSOFLAGS,
            disk: None,
            proposal: Proposal::default(),
            targets,
            rows,
        }
    }

    #[test]
    fn every_workload_is_judged_against_tgt_at_ratio_one() {
        let w = workloads();
        assert_eq!(w.len(), 6);
        assert!(w.iter().all(|w| w.goal == Some(GOAL)));
        let shapes: Vec<(Direction, u64, u32)> = w.iter().map(|w| (w.direction, w.block_size, w.iodepth)).collect();
        for qd in [1, 32] {
            assert!(shapes.contains(&(Direction::Read, 4096, qd)) && shapes.contains(&(Direction::Write, 4096, qd)));
        }
        assert!(w.iter().any(|w| w.block_size == 1 << 20 && w.direction == Direction::Write && !w.random()));
        assert!(w.iter().any(|w| w.block_size == 1 << 20 && w.direction == Direction::Read && !w.random()));
    }

    #[test]
    fn tgt_is_configured_with_the_limits_we_propose() {
        let p = Proposal::default();
        let params = tgt_params(&p);
        let get = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).expect(k);
        assert_eq!(get("InitialR2T"), "No");
        assert_eq!(get("ImmediateData"), "Yes");
        assert_eq!(get("FirstBurstLength"), p.first_burst_length.to_string());
        assert_eq!(get("MaxBurstLength"), p.max_burst_length.to_string());
        assert_eq!(get("MaxRecvDataSegmentLength"), p.max_recv_data_segment_length.to_string());
        assert_eq!(get("MaxOutstandingR2T"), p.max_outstanding_r2t.to_string());
    }

    #[test]
    fn workloads_are_selected_by_id_in_the_benchmarks_order() {
        let ids = |ws: Vec<Workload>| ws.iter().map(|w| w.id).collect::<Vec<_>>();
        assert_eq!(ids(select_workloads("randread-4k-qd1, randwrite-4k-qd1").expect("known")), ["randwrite-4k-qd1", "randread-4k-qd1"]);
        assert!(select_workloads("randwrite-4k-qd1").expect("known").iter().all(|w| w.goal == Some(GOAL)));
        let err = select_workloads("randwrite-4k-qd1,qd64").expect_err("unknown").to_string();
        assert!(err.contains("\"qd64\"") && err.contains("read-1m-qd8"), "{err}");
        assert!(select_workloads(" , ").is_err());
    }

    #[test]
    fn rows_pair_the_targets_and_missed_goals_are_reported_not_errors() {
        // tgt 1000 IOPS on every job; Basalt faster on the first job, slower on the others.
        let tgt_run = target("tgt", "tgtd", 1, &[1000.0; 6], 30.0);
        let basalt = target("basalt-1", "storaged", 1, &[1500.0, 900.0, 1000.0, 500.0, 800.0, 1200.0], 55.0);
        let replicated = target("basalt-3", "storaged", 3, &[500.0; 6], 140.0);
        let rows = rows(&workloads(), 1, &tgt_run, &basalt, &replicated).expect("rows");
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0].ratio, Some(1.5));
        assert_eq!(rows[0].verdict, Verdict::Met);
        assert_eq!(rows[1].verdict, Verdict::NotMet);
        assert_eq!(rows[2].verdict, Verdict::Met, "equal to tgt meets 'at least as fast'");
        assert_eq!(rows[3].replicated_ratio, Some(0.5));
        let report = report(1, vec![tgt_run, basalt, replicated], rows);
        let table = render_table(&report);
        let line = |label: &str| table.lines().find(|l| l.starts_with(label)).expect(label).to_string();
        let qd1 = line("rand write 4K QD1");
        assert!(qd1.contains("1000 IOPS") && qd1.contains("1500 IOPS") && qd1.contains("1.50x"), "{qd1}");
        assert!(qd1.contains("30 µs") && qd1.contains("55 µs") && qd1.contains("140 µs"), "{qd1}");
        assert!(qd1.ends_with("met") && !qd1.contains("NOT"), "{qd1}");
        assert!(line("rand write 4K QD32").ends_with("NOT met"));
        let seq = line("seq read 1M QD8");
        assert!(seq.contains("1000.0 MiB/s") && seq.contains("1200.0 MiB/s"), "{seq}");
        assert!(table.contains("storaged 3x"), "{table}");
        assert!(table.contains("met in 3 of 6 workloads"), "{table}");
        assert!(table.contains("negotiated with every target"), "{table}");
        // The second table (latency, initiator CPU) repeats the labels.
        let lat = table.lines().filter(|l| l.starts_with("rand read 4K QD32")).last().expect("latency row");
        assert!(lat.contains("120 µs / 2.50 ms") && lat.ends_with("4 / 4 / 4 µs"), "{lat}");
        assert!(!table.contains("requests per I/O"), "no disk, no device table: {table}");
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["rows"][1]["verdict"], "not_met");
        assert_eq!(json["rows"][0]["workload"]["goal"]["min_ratio"], 1.0);
        assert_eq!(json["targets"][2]["processes"], 3);
    }

    #[test]
    fn each_targets_disk_traffic_per_io_is_shown_where_it_was_measured() {
        let tgt_run = target("tgt", "tgtd", 1, &[1000.0; 6], 30.0);
        let basalt = target("basalt-1", "storaged", 1, &[900.0; 6], 40.0);
        let replicated = target("basalt-3", "storaged", 3, &[500.0; 6], 140.0);
        let mut rows = rows(&workloads(), 1, &tgt_run, &basalt, &replicated).expect("rows");
        let io = |w: f64, f: f64, kib: f64| DeviceIo {
            writes_per_io: w,
            flushes_per_io: Some(f),
            reads_per_io: 0.0,
            kib_written_per_io: kib,
            kib_read_per_io: 0.0,
        };
        rows[0].tgt.device = Some(io(1.0, 1.0, 4.0));
        rows[0].basalt.device = Some(io(2.0, 1.0, 12.0));
        let mut report = report(1, vec![tgt_run, basalt, replicated], rows);
        report.disk = Some("vda".into());
        let table = render_table(&report);
        assert!(table.contains("vda requests per I/O"), "{table}");
        let row = table.lines().filter(|l| l.starts_with("rand write 4K QD1")).last().expect("device row");
        assert!(row.contains("1.00 W + 1.00 F, 4.0 KiB") && row.contains("2.00 W + 1.00 F, 12.0 KiB"), "{row}");
        assert!(row.trim_end().ends_with('-'), "the replicated job measured nothing: {row}");
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["disk"], "vda");
        assert_eq!(json["rows"][0]["basalt"]["device"]["writes_per_io"], 2.0);
        assert!(json["rows"][0]["replicated"].get("device").is_none());
    }

    #[test]
    fn rounds_are_paired_side_by_side_and_the_median_ratio_is_judged() {
        let w = workloads();
        // Three rounds: (tgt, Basalt) per round. The first workload's ratios are 0.9, 1.2,
        // 1.05 (median 1.05, met) though Basalt's median rate over tgt's would be 1.0; the
        // second's are 0.8, 0.95, 1.1 (median 0.95, not met).
        let series = |rates: [[f64; 2]; 3]| -> [Vec<f64>; 3] { rates.map(|r| vec![r[0], r[1], 1000.0, 1000.0, 1000.0, 1000.0]) };
        let tgt_rates = series([[1000.0, 1000.0], [800.0, 1000.0], [1200.0, 1000.0]]);
        let basalt_rates = series([[900.0, 800.0], [960.0, 950.0], [1260.0, 1100.0]]);
        let flat = |id: &str, process: &str, rounds: &[Vec<f64>; 3]| {
            let mut t = target(id, process, 1, &[], 30.0);
            t.jobs = rounds.iter().flat_map(|r| w.iter().zip(r).map(|(w, r)| job(w, *r, 30.0))).collect();
            t
        };
        let (t, b, r) = (flat("tgt", "tgtd", &tgt_rates), flat("basalt-1", "storaged", &basalt_rates), flat("basalt-3", "storaged", &tgt_rates));
        let rows = rows(&w, 3, &t, &b, &r).expect("rows");
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(rows[0].round_ratios.iter().zip([0.9, 1.2, 1.05]).all(|(a, b)| close(*a, b)), "{:?}", rows[0].round_ratios);
        assert!(close(rows[0].ratio, 1.05), "{:?}", rows[0].ratio);
        assert_eq!(rows[0].verdict, Verdict::Met);
        assert!(close(rows[1].ratio, 0.95), "{:?}", rows[1].ratio);
        assert_eq!(rows[1].verdict, Verdict::NotMet);
        // Each target's shown job is its median round.
        assert_eq!(rows[0].tgt.result.iops, 1000.0);
        assert_eq!(rows[0].basalt.result.iops, 960.0);
        let report = report(3, vec![t, b, r], rows);
        let table = render_table(&report);
        assert!(table.contains("3 rounds"), "{table}");
        let each = table.lines().rfind(|l| l.starts_with("rand write 4K QD1")).expect("per-round line").to_string();
        assert!(each.ends_with("0.90x  1.20x  1.05x"), "{each}");
    }

    #[test]
    fn a_target_missing_a_job_is_an_error() {
        let tgt_run = target("tgt", "tgtd", 1, &[1000.0; 5], 30.0);
        let b = target("basalt-1", "storaged", 1, &[1000.0; 6], 30.0);
        assert!(rows(&workloads(), 1, &tgt_run, &b, &b).is_err());
        // Two rounds need two jobs per workload.
        assert!(rows(&workloads(), 2, &b, &b, &b).is_err());
    }
}
