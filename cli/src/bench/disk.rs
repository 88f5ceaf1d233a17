//! What the disk under a benchmark did during a measured window, from `/proc/diskstats`:
//! requests (writes, cache flushes, reads) and bytes, per I/O of the job.
//!
//! CPU per I/O says what a target costs the processor; this says what it costs the disk. Two
//! targets can serve the same durable 4 KiB write with one data write and one cache flush
//! (a plain file opened `O_SYNC`) or with more: a journal write beside the data write, or a
//! metadata write of the file system. On a disk whose every request is a round trip through a
//! hypervisor, that difference is latency, and no amount of CPU work on the target shows it.
//!
//! The counters are the whole disk's, so anything else writing to it during the window is
//! counted too; the benchmarks run one job at a time, on an otherwise idle machine.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

/// Cumulative counters of one disk (a line of `/proc/diskstats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub reads: u64,
    pub sectors_read: u64,
    pub writes: u64,
    pub sectors_written: u64,
    /// Cache flushes completed; kernels before 5.5 do not count them (None).
    pub flushes: Option<u64>,
}

/// A job's disk traffic, per I/O of the job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceIo {
    pub writes_per_io: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flushes_per_io: Option<f64>,
    pub reads_per_io: f64,
    pub kib_written_per_io: f64,
    pub kib_read_per_io: f64,
}

impl DeviceIo {
    /// The traffic between two samples, per I/O of the `ios` (at least one) done meanwhile.
    pub fn between(before: &DiskCounters, after: &DiskCounters, ios: u64) -> DeviceIo {
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64;
        let n = ios.max(1) as f64;
        DeviceIo {
            writes_per_io: d(before.writes, after.writes) / n,
            flushes_per_io: before.flushes.zip(after.flushes).map(|(a, b)| d(a, b) / n),
            reads_per_io: d(before.reads, after.reads) / n,
            // Sectors of /proc/diskstats are 512 bytes whatever the disk's block size.
            kib_written_per_io: d(before.sectors_written, after.sectors_written) / 2.0 / n,
            kib_read_per_io: d(before.sectors_read, after.sectors_read) / 2.0 / n,
        }
    }

    /// "2.00 W + 1.00 F, 12.0 KiB" for writes; reads are added when there are any.
    pub fn describe(&self) -> String {
        let mut s = format!("{:.2} W", self.writes_per_io);
        if let Some(f) = self.flushes_per_io {
            s += &format!(" + {f:.2} F");
        }
        s += &format!(", {:.1} KiB", self.kib_written_per_io);
        if self.reads_per_io >= 0.005 {
            s += &format!("; {:.2} R, {:.1} KiB", self.reads_per_io, self.kib_read_per_io);
        }
        s
    }
}

/// Reads the counters of the disk holding a directory.
#[derive(Clone, Debug)]
pub struct DiskProbe {
    disk: String,
}

impl DiskProbe {
    /// The whole disk under `dir` (not its partition: the disk is what serves the requests,
    /// and what `/sys/block` describes). None where `dir` is on no block device (tmpfs,
    /// overlay): there is no disk to account then.
    pub fn for_dir(dir: &Path) -> Result<Option<DiskProbe>> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        if major == 0 {
            return Ok(None);
        }
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let Ok(real) = std::fs::canonicalize(&sys) else { return Ok(None) };
        // A partition's directory sits inside its disk's and has a `partition` file.
        let disk_dir = if real.join("partition").exists() { real.parent().map(Path::to_path_buf) } else { Some(real) };
        let Some(disk) = disk_dir.and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned())) else {
            return Ok(None);
        };
        let probe = DiskProbe { disk };
        // Fails now rather than at the first measured window if the disk is not listed.
        probe.sample()?;
        Ok(Some(probe))
    }

    pub fn disk(&self) -> &str {
        &self.disk
    }

    pub fn sample(&self) -> Result<DiskCounters> {
        let text = std::fs::read_to_string("/proc/diskstats").context("reading /proc/diskstats")?;
        parse_diskstats(&text, &self.disk).ok_or_else(|| anyhow!("/proc/diskstats has no line for {}", self.disk))
    }
}

/// Whether a durable write on `disk` costs a cache flush: its write cache is volatile ("write
/// back") and it has no FUA writes to make one write durable by itself. Then every write a
/// target acknowledges at queue depth 1 as durable shows as a flush. None where `/sys` does
/// not say.
pub fn flushes_each_durable_write(disk: &str) -> Option<bool> {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/block/{disk}/queue/{f}")).ok();
    let cache = read("write_cache")?;
    let fua = read("fua")?;
    Some(cache.trim() == "write back" && fua.trim() == "0")
}

/// The counters of `disk` in a `/proc/diskstats` text: after major, minor and name come reads
/// completed, merged, sectors read, ms reading, writes completed, merged, sectors written, ms
/// writing, in flight, ms doing I/O, weighted ms; then (4.18+) four discard fields; then
/// (5.5+) flushes completed and ms flushing.
pub fn parse_diskstats(text: &str, disk: &str) -> Option<DiskCounters> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(2) != Some(&disk) {
            return None;
        }
        let n = |i: usize| f.get(3 + i).and_then(|v| v.parse::<u64>().ok());
        Some(DiskCounters {
            reads: n(0)?,
            sectors_read: n(2)?,
            writes: n(4)?,
            sectors_written: n(6)?,
            flushes: n(15),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "\
 254       0 vda 1000 10 80000 500 2000 20 48000 900 0 1200 1400 5 0 40 1 700 30
 254       1 vda1 900 10 70000 400 1900 20 47000 800 0 1100 1300 5 0 40 1 0 0
   7       0 loop0 3 0 24 0 0 0 0 0 0 4 0
";

    #[test]
    fn diskstats_lines_are_read_by_name_with_flushes_where_the_kernel_counts_them() {
        let vda = parse_diskstats(STATS, "vda").expect("vda listed");
        assert_eq!(vda, DiskCounters { reads: 1000, sectors_read: 80000, writes: 2000, sectors_written: 48000, flushes: Some(700) });
        // An old kernel's short line: no flush counter, the rest still read.
        let loop0 = parse_diskstats(STATS, "loop0").expect("loop0 listed");
        assert_eq!(loop0.flushes, None);
        assert_eq!(loop0.reads, 3);
        // Names are matched whole: "vd" is no disk here.
        assert!(parse_diskstats(STATS, "vd").is_none());
        assert!(parse_diskstats(" 254 0 vda x y\n", "vda").is_none(), "unparsable counters");
    }

    #[test]
    fn traffic_is_divided_by_the_jobs_ios() {
        let a = DiskCounters { reads: 10, sectors_read: 80, writes: 100, sectors_written: 800, flushes: Some(50) };
        let b = DiskCounters { reads: 10, sectors_read: 80, writes: 300, sectors_written: 3200, flushes: Some(150) };
        let io = DeviceIo::between(&a, &b, 100);
        assert_eq!(io.writes_per_io, 2.0);
        assert_eq!(io.flushes_per_io, Some(1.0));
        assert_eq!(io.kib_written_per_io, 12.0);
        assert_eq!(io.reads_per_io, 0.0);
        assert_eq!(io.describe(), "2.00 W + 1.00 F, 12.0 KiB");
        let reads = DiskCounters { reads: 110, sectors_read: 880, ..b };
        assert_eq!(DeviceIo::between(&b, &reads, 100).describe(), "0.00 W + 0.00 F, 0.0 KiB; 1.00 R, 4.0 KiB");
        // No flush counter on either side: not shown rather than shown as zero.
        let old = DiskCounters { flushes: None, ..a };
        assert_eq!(DeviceIo::between(&old, &DiskCounters { flushes: None, ..b }, 100).flushes_per_io, None);
    }

    #[test]
    fn the_disk_under_a_directory_is_found_or_none_off_block_devices() {
        // /proc is on no block device.
        assert!(DiskProbe::for_dir(Path::new("/proc")).expect("/proc can be stat-ed").is_none());
        // A directory on a disk resolves to a disk /proc/diskstats lists (where this machine
        // has one under /var/tmp; containers may not).
        if let Some(p) = DiskProbe::for_dir(Path::new(crate::bench::FRESH_CLUSTER_PARENT)).expect("the work directory") {
            let c = p.sample().expect("its counters");
            assert!(c.writes > 0 || c.reads > 0, "{} has done no I/O at all", p.disk());
        }
    }
}
