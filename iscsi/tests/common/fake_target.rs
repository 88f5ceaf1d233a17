// A minimal SCSI target for transport tests: INQUIRY (standard and a few VPD pages),
// READ CAPACITY 10/16, REPORT LUNS, TEST UNIT READY, MODE SENSE, READ/WRITE 10/16 and
// SYNCHRONIZE CACHE over a `MemoryDevice`, plus a vendor opcode (0xC0) that never
// completes, for abort tests. Shared by the unit tests (`#[path]`) and the end-to-end test.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use basalt_iscsi::lu::memory::MemoryDevice;
use basalt_iscsi::lu::{
    status, BlockDevice, Nexus, Portal, ScsiCommand, ScsiResponse, ScsiTarget, TargetAccess, TargetRegistry,
    TaskManagement, TmfOutcome,
};
use bytes::Bytes;

pub const BLOCK: u64 = 512;
/// Opcode of the command that hangs until aborted.
pub const HANG: u8 = 0xc0;

pub struct FakeTarget {
    pub dev: MemoryDevice,
    pub tmfs: Mutex<Vec<(TaskManagement, u64)>>,
    pub gone: AtomicUsize,
    /// Hanging commands whose futures have been dropped.
    pub dropped: Arc<AtomicUsize>,
    pub started: Arc<tokio::sync::Notify>,
}

impl FakeTarget {
    pub fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            dev: MemoryDevice::new(size),
            tmfs: Mutex::new(Vec::new()),
            gone: AtomicUsize::new(0),
            dropped: Arc::new(AtomicUsize::new(0)),
            started: Arc::new(tokio::sync::Notify::new()),
        })
    }
}

fn check(key: u8, asc: u8, ascq: u8) -> ScsiResponse {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    ScsiResponse { status: status::CHECK_CONDITION, sense: Some(Bytes::from(s)), ..Default::default() }
}

fn good(data: Vec<u8>) -> ScsiResponse {
    ScsiResponse { status: status::GOOD, data_in: Bytes::from(data), ..Default::default() }
}

fn be(c: &[u8], from: usize, n: usize) -> u64 {
    c.get(from..from + n).unwrap_or(&[]).iter().fold(0u64, |a, b| (a << 8) | u64::from(*b))
}

struct DropCounter(Arc<AtomicUsize>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl ScsiTarget for FakeTarget {
    async fn execute(&self, cmd: ScsiCommand) -> ScsiResponse {
        let c = &cmd.cdb[..];
        let op = c.first().copied().unwrap_or(0xff);
        if cmd.lun != 0 && op != 0xa0 && op != 0x12 {
            return check(0x05, 0x25, 0x00);
        }
        let blocks = self.dev.size() / BLOCK;
        match op {
            0x00 => good(vec![]),
            0x12 => {
                let alloc = be(c, 3, 2) as usize;
                let mut d = if c[1] & 1 == 1 {
                    match c[2] {
                        0x00 => vec![0, 0, 0, 3, 0x00, 0x80, 0x83],
                        0x80 => {
                            let mut v = vec![0, 0x80, 0, 8];
                            v.extend_from_slice(b"FAKE0001");
                            v
                        }
                        0x83 => {
                            // One NAA-5 designator.
                            let mut v = vec![0, 0x83, 0, 12, 0x01, 0x03, 0, 8];
                            v.extend_from_slice(&[0x50, 0x01, 0x40, 0x50, 0, 0, 0, 1]);
                            v
                        }
                        _ => return check(0x05, 0x24, 0x00),
                    }
                } else {
                    let mut v = vec![0u8; 36];
                    v[0] = if cmd.lun == 0 { 0 } else { 0x7f };
                    v[2] = 6;
                    v[3] = 2;
                    v[4] = 31;
                    v[7] = 0x02; // CmdQue
                    v[8..16].copy_from_slice(b"BASALT  ");
                    v[16..32].copy_from_slice(b"FAKE LU         ");
                    v[32..36].copy_from_slice(b"0001");
                    v
                };
                d.truncate(alloc);
                good(d)
            }
            0x25 => {
                let mut d = vec![0u8; 8];
                d[0..4].copy_from_slice(&((blocks - 1).min(0xffff_ffff) as u32).to_be_bytes());
                d[4..8].copy_from_slice(&(BLOCK as u32).to_be_bytes());
                good(d)
            }
            0x9e if c[1] & 0x1f == 0x10 => {
                let mut d = vec![0u8; 32];
                d[0..8].copy_from_slice(&(blocks - 1).to_be_bytes());
                d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
                d.truncate(be(c, 10, 4) as usize);
                good(d)
            }
            0xa0 => {
                let mut d = vec![0, 0, 0, 8, 0, 0, 0, 0];
                d.extend_from_slice(&[0u8; 8]);
                d.truncate(be(c, 6, 4) as usize);
                good(d)
            }
            0x1a => good(vec![3, 0, 0, 0]),
            0x5a => good(vec![0, 6, 0, 0, 0, 0, 0, 0]),
            0x35 | 0x91 => good(vec![]),
            0x28 | 0x88 | 0x2a | 0x8a => {
                let (lba, n) = if op == 0x28 || op == 0x2a { (be(c, 2, 4), be(c, 7, 2)) } else { (be(c, 2, 8), be(c, 10, 4)) };
                if lba + n > blocks {
                    return check(0x05, 0x21, 0x00);
                }
                if op == 0x28 || op == 0x88 {
                    match self.dev.read(lba * BLOCK, n * BLOCK).await {
                        Ok(d) => ScsiResponse { status: status::GOOD, data_in: d, ..Default::default() },
                        Err(_) => check(0x03, 0x11, 0x00),
                    }
                } else {
                    if cmd.data_out.len() as u64 != n * BLOCK {
                        return check(0x05, 0x24, 0x00);
                    }
                    match self.dev.write(lba * BLOCK, cmd.data_out.clone()).await {
                        Ok(()) => good(vec![]),
                        Err(_) => check(0x03, 0x0c, 0x00),
                    }
                }
            }
            HANG => {
                let _guard = DropCounter(self.dropped.clone());
                self.started.notify_one();
                std::future::pending::<()>().await;
                good(vec![])
            }
            _ => check(0x05, 0x20, 0x00),
        }
    }

    async fn task_management(&self, tmf: TaskManagement, lun: u64, _nexus: &Nexus) -> TmfOutcome {
        self.tmfs.lock().unwrap_or_else(|p| p.into_inner()).push((tmf, lun));
        if lun != 0 && matches!(tmf, TaskManagement::LogicalUnitReset) {
            return TmfOutcome::NoSuchLun;
        }
        TmfOutcome::Complete
    }

    async fn nexus_gone(&self, _nexus: &Nexus) {
        self.gone.fetch_add(1, Ordering::SeqCst);
    }
}

/// A registry over a fixed list of targets, all reachable at the same portals.
pub struct FakeRegistry {
    pub targets: Vec<(TargetAccess, Arc<dyn ScsiTarget>)>,
    pub portals: Mutex<Vec<Portal>>,
}

impl FakeRegistry {
    pub fn set_portals(&self, p: Vec<Portal>) {
        *self.portals.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

#[async_trait]
impl TargetRegistry for FakeRegistry {
    async fn discover(&self) -> Vec<(TargetAccess, Vec<Portal>)> {
        let p = self.portals.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.targets.iter().map(|(a, _)| (a.clone(), p.clone())).collect()
    }
    async fn open(&self, name: &str) -> Option<(TargetAccess, Arc<dyn ScsiTarget>)> {
        self.targets.iter().find(|(a, _)| a.name == name).cloned()
    }
    fn local_port(&self) -> (u16, u16) {
        (1, 1)
    }
}
