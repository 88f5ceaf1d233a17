//! `basalt bench ...`: benchmarks on real clusters started on this machine, each figure shown
//! beside the baseline it should be judged against.
//!
//! - [`block`]: fio through NBD on a 3-replica cluster against fio on a plain local file.
//! - [`iscsi`]: our iSCSI target (1 and 3 replicas) against Debian's `tgt` serving a file,
//!   both driven by the same load generator ([`initiator`]).
//!
//! This module owns what they share: the workload table, a measured job's figures
//! ([`JobResult`]), CPU accounting of target processes through `/proc/PID/stat`, fresh
//! clusters under `/var/tmp`, the ratio/goal arithmetic and the table formatting. A benchmark
//! is not a test: a missed goal is reported, never an error.

pub mod block;
pub mod disk;
pub mod garage;
pub mod initiator;
pub mod iscsi;
pub mod s3;
mod qemu_nbd;
mod tgt;

use crate::dev::{self, ClusterFile, UpOptions};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;
use tracing::warn;

/// Where a freshly started benchmark cluster lives (a disk-backed filesystem, unlike /tmp
/// which may be tmpfs and would make every figure meaningless).
pub const FRESH_CLUSTER_PARENT: &str = "/var/tmp";
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;
pub const DEFAULT_RAMP: Duration = Duration::from_secs(2);

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

/// What a workload should reach, as a fraction of its baseline (each benchmark says which).
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

impl Workload {
    /// Random offsets (else sequential).
    pub fn random(&self) -> bool {
        self.rw.starts_with("rand")
    }

    /// The same workload judged by another benchmark's goal.
    pub fn with_goal(self, goal: Option<Goal>) -> Workload {
        Workload { goal, ..self }
    }
}

/// The six workloads, with the goals of `bench block`: sequential write ≥ 0.8 and QD32
/// random write ≥ 0.5 of the 3-replica write limit, every read ≥ 0.5 of the local read. QD1
/// random write is latency-bound (the replicas write in parallel), so it has no throughput
/// goal. Other benchmarks reuse the shapes with their own goals ([`Workload::with_goal`]).
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

/// The figures of one measured job (one workload against one target), whoever generated
/// the load (fio, or our iSCSI initiator).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobResult {
    pub iops: f64,
    pub bw_bytes: f64,
    /// I/Os completed after the ramp.
    pub ios: u64,
    /// Completion latency percentiles.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Measured time after the ramp.
    pub runtime_ms: u64,
    /// The load generator's own CPU (user + system), in microseconds per I/O.
    pub client_cpu_us_per_io: f64,
}

impl JobResult {
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

/// CPU a set of processes spent during one measured window.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessCpu {
    /// User + system seconds of all the processes (all their threads).
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    pub cpu_us_per_io: f64,
    /// Hypervisor steal during the window (percent of the machine's CPU), where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steal_percent: Option<f64>,
}

pub(crate) struct CpuWindow {
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    /// Hypervisor steal over the window, percent of the machine's CPU time.
    pub steal_percent: Option<f64>,
}

impl CpuWindow {
    pub fn per_io(&self, ios: u64) -> ProcessCpu {
        ProcessCpu {
            cpu_seconds: self.cpu_seconds,
            wall_seconds: self.wall_seconds,
            cpu_us_per_io: if ios == 0 { 0.0 } else { self.cpu_seconds * 1e6 / ios as f64 },
            steal_percent: self.steal_percent,
        }
    }
}

/// The machine's CPU time taken by the hypervisor (steal) and in total, from `/proc/stat`,
/// in clock ticks. On a shared VM, steal makes every figure of a window slower and its CPU per
/// I/O higher; benchmarks report it so a run taken on a busy host can be recognised.
#[derive(Clone, Copy, Debug)]
pub struct MachineCpu {
    steal: u64,
    total: u64,
}

impl MachineCpu {
    /// None where `/proc/stat` is unreadable or has no steal field.
    pub fn sample() -> Option<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        parse_machine_cpu(&stat)
    }

    /// Percent of all CPU time in `[self, later]` that the hypervisor took.
    pub fn steal_percent(&self, later: &MachineCpu) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| steal as f64 * 100.0 / total as f64)
    }
}

/// The aggregate `cpu` line: user nice system idle iowait irq softirq steal [guest...];
/// guest time is already counted in user, so the total is the first eight fields.
fn parse_machine_cpu(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if fields.len() < 8 {
        return None;
    }
    Some(MachineCpu { steal: fields[7], total: fields.iter().sum() })
}

/// Reads the summed user + system CPU time of a set of processes (all their threads).
pub struct CpuProbe {
    /// What the processes are, for errors ("storaged", "tgtd").
    what: String,
    pids: Vec<u32>,
    ticks_per_sec: f64,
}

impl CpuProbe {
    pub fn new(what: &str, pids: Vec<u32>) -> Result<Self> {
        // SAFETY: sysconf only reads a configuration value.
        #[allow(unsafe_code)]
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 {
            bail!("sysconf(_SC_CLK_TCK) failed");
        }
        Ok(Self { what: what.to_string(), pids, ticks_per_sec: ticks as f64 })
    }

    pub fn sample(&self) -> Result<f64> {
        let mut ticks = 0u64;
        for pid in &self.pids {
            let path = format!("/proc/{pid}/stat");
            let stat = std::fs::read_to_string(&path)
                .with_context(|| format!("{} (pid {pid}) exited during the benchmark", self.what))?;
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

/// The pids of a cluster's running `storaged` processes.
pub(crate) fn running_pids(cluster: &ClusterFile) -> Vec<u32> {
    cluster.nodes.iter().filter_map(|n| n.pid.filter(|p| dev::pid_alive(*p))).collect()
}

/// A cluster started for one benchmark run, stopped and deleted on drop.
pub(crate) struct FreshCluster {
    dir: tempfile::TempDir,
}

impl FreshCluster {
    pub fn new() -> Result<Self> {
        Self::new_in(Path::new(FRESH_CLUSTER_PARENT))
    }

    pub fn new_in(parent: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("basalt-bench-cluster-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a cluster directory in {}", parent.display()))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub async fn start(&self, nodes: usize, storaged_bin: &Path) -> Result<ClusterFile> {
        let mut up = UpOptions::new(self.dir(), nodes);
        up.storaged_bin = storaged_bin.to_path_buf();
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

/// A scratch directory for a benchmark's files, deleted on drop.
pub(crate) fn scratch_dir(parent: &Path) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("basalt-bench-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))
}

/// Progress goes to stderr; stdout carries only the report.
pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// Runs `work` unless the process is told to stop first: Ctrl-C (SIGINT), or SIGTERM, which
/// `timeout`, `kill` and CI runners send. The caller's guards then clean up on drop: tgtd,
/// qemu-nbd and the clusters stop and their files go. (Before SIGTERM was caught here, it
/// killed the benchmark and left all of those running.)
pub(crate) async fn interruptible<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("watching for SIGTERM")?;
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow!("terminated (SIGTERM)")),
    }
}

// ---- report helpers -----------------------------------------------------------------------

pub(crate) fn fmt_rate(metric: Metric, r: &JobResult) -> String {
    match metric {
        Metric::Iops => format!("{:.0} IOPS", r.iops),
        Metric::MibPerSec => format!("{:.1} MiB/s", r.rate(metric)),
    }
}

pub(crate) fn fmt_latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

pub(crate) fn fmt_ratio(ratio: Option<f64>) -> String {
    ratio.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into())
}

pub(crate) fn fmt_verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Met => "met",
        Verdict::NotMet => "NOT met",
        Verdict::NoGoal => "",
    }
}

/// One table line: each cell padded to its width, right-aligned unless `left(column)`.
pub(crate) fn table_row(cells: &[String], widths: &[usize], left: impl Fn(usize) -> bool) -> String {
    let line = cells
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(i, (c, &w))| if left(i) { format!("{c:<w$}") } else { format!("{c:>w$}") })
        .collect::<Vec<_>>()
        .join("  ");
    line.trim_end().to_string()
}

/// Appends a line without trailing blanks.
pub(crate) fn push_line(out: &mut String, s: &str) {
    out.push_str(s.trim_end());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_steal_is_read_from_the_aggregate_cpu_line() {
        let a = parse_machine_cpu("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n").unwrap();
        let b = parse_machine_cpu("cpu  200 0 100 900 10 0 0 140 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n").unwrap();
        assert_eq!(a.steal_percent(&b), Some(100.0 * 100.0 / 350.0));
        assert_eq!(b.steal_percent(&a), None, "counters never go back");
        assert!(parse_machine_cpu("cpu  1 2 3\n").is_none(), "a line without steal");
        assert!(parse_machine_cpu("intr 5\n").is_none());
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
    fn workload_goals_match_the_block_issue() {
        let goal = |id: &str| WORKLOADS.iter().find(|w| w.id == id).and_then(|w| w.goal).map(|g| g.min_ratio);
        assert_eq!(goal("write-1m-qd8"), Some(0.8));
        assert_eq!(goal("randwrite-4k-qd32"), Some(0.5));
        assert_eq!(goal("randwrite-4k-qd1"), None);
        for w in WORKLOADS.iter().filter(|w| w.direction == Direction::Read) {
            assert_eq!(w.goal.map(|g| g.min_ratio), Some(0.5), "{}", w.id);
        }
        let other = WORKLOADS[0].with_goal(Some(Goal { min_ratio: 1.0 }));
        assert_eq!(other.goal, Some(Goal { min_ratio: 1.0 }));
        assert_eq!(other.id, WORKLOADS[0].id);
        assert!(WORKLOADS[0].random() && !WORKLOADS[4].random());
    }

    #[test]
    fn proc_stat_cpu_ticks_survive_odd_command_names() {
        let stat = "1234 (stor aged) x) S 1 1234 1234 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(200));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn table_rows_pad_and_align_their_cells() {
        let cells = ["a".to_string(), "1".into(), "x".into()];
        assert_eq!(table_row(&cells, &[3, 4, 2], |i| i != 1), "a       1  x");
    }

    /// SIGTERM ends the work like Ctrl-C: its future (and the guards it holds, which stop
    /// tgtd and the clusters) is dropped. Without the handler the signal kills this process.
    #[tokio::test]
    async fn sigterm_stops_the_work_and_drops_its_guards() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        struct Guard(Arc<AtomicBool>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = Guard(dropped.clone());
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let work = async move {
            let _guard = guard;
            let _ = started_tx.send(());
            std::future::pending::<Result<()>>().await
        };
        let task = tokio::spawn(interruptible(work));
        // The work is first polled after the handler is installed.
        started_rx.await.expect("the work started");
        nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM).expect("kill");
        let outcome = tokio::time::timeout(Duration::from_secs(30), task).await.expect("stopped in time").expect("task");
        let err = outcome.expect_err("the work cannot finish").to_string();
        assert!(err.contains("SIGTERM"), "{err}");
        assert!(dropped.load(Ordering::SeqCst), "the work's guards were not dropped");
    }
}
