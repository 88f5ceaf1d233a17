//! The contract between the iSCSI transport and the SCSI layer, and what a logical unit
//! needs from the rest of Basalt.
//!
//! The transport ([`crate::conn`]) turns SCSI Command PDUs plus their Data-Out into one
//! [`ScsiCommand`], hands it to a [`crate::scsi::Target`], and turns the [`ScsiResponse`] into
//! Data-In and SCSI Response PDUs (residuals, status, sense). The SCSI layer knows nothing of
//! PDUs; the transport knows nothing of CDBs.
//!
//! A logical unit stores its blocks on a [`BlockDevice`] (a Basalt volume through the storaged
//! client, or memory in tests), asks an [`AluaStates`] which of its target port groups is
//! optimised, and keeps persistent reservations in a [`ReservationStore`] shared by every node
//! serving the unit (cluster metadata), so a clustered initiator sees one reservation whatever
//! path it uses.

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The I_T nexus a command arrived on: who sent it and through which target port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Nexus {
    /// iSCSI initiator name (`iqn.…`), as logged in.
    pub initiator_name: String,
    /// Initiator session id (6 bytes); with the name it identifies the initiator port.
    pub isid: [u8; 6],
    /// Relative target port identifier of the portal group the session uses (1-based; one
    /// per node in Basalt).
    pub relative_port: u16,
    /// Target portal group tag of that port.
    pub tpgt: u16,
}

impl Nexus {
    /// The initiator port name used in TransportIDs: `<name>,i,0x<isid hex>`.
    pub fn initiator_port(&self) -> String {
        // Built on every command (it keys unit attentions and reservations): one allocation.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(self.initiator_name.len() + 5 + 2 * self.isid.len());
        s.push_str(&self.initiator_name);
        s.push_str(",i,0x");
        for b in self.isid {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        s
    }
}

/// SAM task attribute of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAttr {
    Untagged,
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// One SCSI command with all its write data gathered.
#[derive(Clone, Debug)]
pub struct ScsiCommand {
    /// The LUN, decoded from the 8-byte SAM LUN field (peripheral or flat addressing).
    pub lun: u64,
    /// The CDB (16 bytes from the BHS, longer with an extended-CDB AHS), trailing bytes of
    /// the BHS field included: the SCSI layer uses the length its opcode defines.
    pub cdb: Bytes,
    /// Write data (immediate, unsolicited and solicited Data-Out together); empty for reads.
    pub data_out: Bytes,
    /// Expected Data Transfer Length for data-in: the SCSI layer may return more or less;
    /// the transport truncates and reports the residual.
    pub expected_in: u32,
    pub attr: TaskAttr,
    pub nexus: Nexus,
}

/// SAM status codes used by the target.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// The outcome of a command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScsiResponse {
    pub status: u8,
    /// Sense data (fixed format, as REQUEST SENSE would return it), with CHECK CONDITION.
    pub sense: Option<Bytes>,
    pub data_in: Bytes,
    /// Data-Out bytes the CDB called for, for commands that take Data-Out: the transport
    /// reports its difference from the Expected Data Transfer Length as the residual.
    pub data_out_len: Option<u32>,
}

/// Task management functions the transport forwards (RFC 7143 11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskManagement {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
}

/// What a logical unit's blocks are stored on.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes (a multiple of 4096).
    fn size(&self) -> u64;
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError>;
    /// Durable when it returns: Basalt acknowledges only writes that every replica made
    /// durable, so the unit reports no volatile write cache.
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), DeviceError>;
    async fn flush(&self) -> Result<(), DeviceError>;
    /// Deallocates the range: it reads as zeros afterwards.
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// Which parts of `[offset, offset + len)` are allocated, as extents covering the range
    /// in ascending order (GET LBA STATUS). `None`: the device cannot tell, and the whole
    /// range is reported mapped (allowed: a mapped block may read as anything, zeros too).
    async fn allocation(&self, offset: u64, len: u64) -> Result<Option<Vec<Extent>>, DeviceError> {
        let _ = (offset, len);
        Ok(None)
    }
}

/// A byte range of a device and whether it holds data (`mapped`) or is deallocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub mapped: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The data could not be read or written (MEDIUM ERROR / HARDWARE ERROR).
    #[error("I/O error: {0}")]
    Io(String),
    /// Another node took the volume over (or is taking it): this path is not usable right
    /// now; the initiator should retry, possibly on another path (NOT READY, ALUA
    /// transition).
    #[error("path not active: {0}")]
    Transitioning(String),
    /// The storage is temporarily unable to serve (too few replicas, no metadata leader).
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("out of range")]
    OutOfRange,
}

/// Asymmetric access state of a target port group (SPC-4 table "ASYMMETRIC ACCESS STATE").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessState {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Transitioning,
}

/// One target port group as REPORT TARGET PORT GROUPS lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroup {
    pub id: u16,
    pub state: AccessState,
    /// Relative target port identifiers in the group.
    pub ports: Vec<u16>,
}

/// Which port group currently serves a unit best (in Basalt: the node holding the volume's
/// write lease is optimised, the others non-optimised).
#[async_trait]
pub trait AluaStates: Send + Sync + 'static {
    async fn port_groups(&self) -> Vec<PortGroup>;
}

/// Persistent reservation state of one logical unit, as stored (opaque to the store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservations {
    /// Incremented by every PERSISTENT RESERVE OUT that changes registrations (PRgeneration).
    pub generation: u32,
    /// Registered I_T nexuses (initiator port + relative target port) and their keys.
    pub registrations: Vec<Registration>,
    pub holder: Option<Reservation>,
    /// Activate Persist Through Power Loss, as last set by REGISTER.
    pub aptpl: bool,
    /// The SPC-2 reservation (RESERVE(6)/(10)) of the whole unit: the I_T nexus holding it.
    /// Kept beside the persistent ones so every node serving the unit sees it too; records
    /// written before it existed read as unreserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_by: Option<ReservedBy>,
    /// The Control mode page's SWP (software write protect) bit, set and cleared by MODE
    /// SELECT: while set, commands that would write the medium fail with DATA PROTECT.
    /// Kept here for the same reason as `reserved_by`: a mode page is the unit's, so every
    /// node serving it must see one value. Records written before it existed read as clear.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub software_write_protect: bool,
}

/// The I_T nexus holding an SPC-2 reservation (initiator port + relative target port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedBy {
    pub initiator_port: String,
    pub relative_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub initiator_port: String,
    pub relative_port: u16,
    pub key: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The registration holding it (for all-registrants types: any, see `kind`).
    pub initiator_port: String,
    pub relative_port: u16,
    pub key: u64,
    /// SPC TYPE code: 1 write exclusive, 3 exclusive access, 5/6 registrants only,
    /// 7/8 all registrants.
    pub kind: u8,
}

/// Where a unit's reservations live. Updates are compare-and-swap on a version the store
/// keeps (not the PRgeneration, which only counts registration changes). Storing is all it
/// does: telling the other nodes is [`UnitEvents::reservations_changed`].
#[async_trait]
pub trait ReservationStore: Send + Sync + 'static {
    /// The current state and its store version.
    async fn load(&self) -> Result<(Reservations, u64), DeviceError>;
    /// Replaces the state if the store is still at `version`; `Ok(false)` if someone else
    /// changed it first (load again and redo the change).
    async fn store(&self, state: &Reservations, version: u64) -> Result<bool, DeviceError>;
}

/// A unit attention for one I_T nexus, named as reservations name it (initiator port and
/// relative target port), with its sense key, ASC and ASCQ. The same record crosses nodes.
pub use basalt_types::NexusAttention;

/// Events of a logical unit that other nodes serving it must see (a unit served through
/// several nodes is still one unit to its initiators).
#[async_trait]
pub trait UnitEvents: Send + Sync + 'static {
    /// The unit was reset here; the other nodes establish the reset unit attention for the
    /// nexuses they serve.
    async fn reset(&self);
    /// The unit's persistent reservations changed here (the new state is stored). The other
    /// nodes drop what they cached of them and establish each of `attentions` if they serve
    /// its nexus. Returns when they did or a timeout passed: the PERSISTENT RESERVE OUT
    /// completes only then.
    async fn reservations_changed(&self, attentions: &[NexusAttention]);
    /// A MODE SELECT changed the unit's mode parameters here (the new values are stored).
    /// The other nodes drop what they cached of them and establish MODE PARAMETERS CHANGED
    /// for every nexus they serve. Returns when they did or a timeout passed.
    async fn mode_changed(&self);
}

/// How a task management function ended (RFC 7143 11.6.1 response codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmfOutcome {
    Complete,
    NoSuchTask,
    NoSuchLun,
    NotSupported,
    Rejected,
}

/// The SCSI side of one iSCSI target: its logical units. Implemented by
/// [`crate::scsi::Target`]. Must be cancellation-safe: the transport drops the future of an
/// aborted command.
#[async_trait]
pub trait ScsiTarget: Send + Sync + 'static {
    /// Executes one command, including REPORT LUNS and commands to LUNs that do not exist.
    async fn execute(&self, cmd: ScsiCommand) -> ScsiResponse;
    /// Unit-level side of a task management function (unit attentions, SPC-2 releases).
    /// Aborting the tasks themselves is the transport's job (it owns them); it calls this
    /// after they are gone.
    async fn task_management(&self, tmf: TaskManagement, lun: u64, nexus: &Nexus) -> TmfOutcome;
    /// The nexus logged out or its session was dropped.
    async fn nexus_gone(&self, nexus: &Nexus);
}

/// CHAP secrets of a target (RFC 7143 12.1.3). Secrets are 12-16 bytes or longer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chap {
    /// What the initiator must answer as (CHAP_N) and with (the secret behind CHAP_R).
    pub user: String,
    pub secret: String,
    /// Mutual CHAP: the name and secret the target answers the initiator's challenge with.
    pub mutual: Option<(String, String)>,
}

/// How a target may be logged in to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetAccess {
    /// Target name (`iqn.…`).
    pub name: String,
    pub alias: Option<String>,
    /// When set, normal sessions must authenticate with CHAP (no AuthMethod=None).
    pub chap: Option<Chap>,
    /// Initiator names allowed to log in; empty = any.
    pub initiators: Vec<String>,
    /// The LUNs and what backs each (a volume name), as a login sees them. A live session
    /// whose LUN goes away or is backed by something else is closed (see
    /// `conn::Sessions::revalidate`); empty where the registry does not say.
    #[serde(default)]
    pub luns: Vec<(u64, String)>,
    /// The LUNs that give their volume read-only. A live session whose LUN changes between
    /// read-only and writable is closed too: its initiator learns the new mode at its next
    /// login.
    #[serde(default)]
    pub read_only: Vec<u64>,
}

impl TargetAccess {
    /// The ACL lets `initiator` in (an empty ACL lets anyone in).
    pub fn admits(&self, initiator: &str) -> bool {
        self.initiators.is_empty() || self.initiators.iter().any(|i| i == initiator)
    }
}

/// A network portal of a target (for SendTargets): address and portal group tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Portal {
    pub addr: std::net::SocketAddr,
    pub tpgt: u16,
}

/// The targets a portal serves, as discovery and login see them.
#[async_trait]
pub trait TargetRegistry: Send + Sync + 'static {
    /// Every target with every portal it can be reached at (all nodes: multipath).
    async fn discover(&self) -> Vec<(TargetAccess, Vec<Portal>)>;
    /// A target by name, with its SCSI side, for a login on this portal.
    async fn open(&self, name: &str) -> Option<(TargetAccess, std::sync::Arc<dyn ScsiTarget>)>;
    /// The relative target port id and portal group tag of this node's portal.
    fn local_port(&self) -> (u16, u16);
}

/// In-memory stores and devices for tests and single-node use.
pub mod memory {
    use super::*;
    use std::sync::Mutex;

    /// A reservation store in memory (one process only).
    #[derive(Default)]
    pub struct MemoryReservations(Mutex<(Reservations, u64)>);

    #[async_trait]
    impl ReservationStore for MemoryReservations {
        async fn load(&self) -> Result<(Reservations, u64), DeviceError> {
            Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
        }
        async fn store(&self, state: &Reservations, version: u64) -> Result<bool, DeviceError> {
            let mut cur = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if cur.1 != version {
                return Ok(false);
            }
            *cur = (state.clone(), version + 1);
            Ok(true)
        }
    }

    /// A block device in memory. Allocation is tracked per 4 KiB page, Basalt's physical
    /// block: a write maps the pages it touches, an unmap deallocates the pages it covers
    /// whole (partly covered ones are zeroed and stay mapped).
    pub struct MemoryDevice(Mutex<Pages>);

    struct Pages {
        bytes: Vec<u8>,
        mapped: Vec<bool>,
    }

    /// Allocation granularity of [`MemoryDevice`].
    pub const PAGE: u64 = 4096;

    impl MemoryDevice {
        pub fn new(size: u64) -> Self {
            let pages = size.div_ceil(PAGE) as usize;
            Self(Mutex::new(Pages { bytes: vec![0; size as usize], mapped: vec![false; pages] }))
        }
        /// Grows (with zeros) or shrinks the device, as a volume resize does.
        pub fn resize(&self, size: u64) {
            let mut p = self.pages();
            p.bytes.resize(size as usize, 0);
            p.mapped.resize(size.div_ceil(PAGE) as usize, false);
        }
        fn pages(&self) -> std::sync::MutexGuard<'_, Pages> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
        fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, DeviceError> {
            let end = offset.checked_add(len).ok_or(DeviceError::OutOfRange)?;
            if end > self.size() {
                return Err(DeviceError::OutOfRange);
            }
            Ok(offset as usize..end as usize)
        }
    }

    #[async_trait]
    impl BlockDevice for MemoryDevice {
        fn size(&self) -> u64 {
            self.pages().bytes.len() as u64
        }
        async fn read(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError> {
            let r = self.range(offset, len)?;
            Ok(Bytes::copy_from_slice(&self.pages().bytes[r]))
        }
        async fn write(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
            let r = self.range(offset, data.len() as u64)?;
            let mut p = self.pages();
            if !r.is_empty() {
                let touched = r.start / PAGE as usize..=(r.end - 1) / PAGE as usize;
                p.mapped[touched].fill(true);
            }
            p.bytes[r].copy_from_slice(&data);
            Ok(())
        }
        async fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
            let r = self.range(offset, len)?;
            let mut p = self.pages();
            let whole = r.start.div_ceil(PAGE as usize)..r.end / PAGE as usize;
            if whole.start < whole.end {
                p.mapped[whole].fill(false);
            }
            p.bytes[r].fill(0);
            Ok(())
        }
        async fn allocation(&self, offset: u64, len: u64) -> Result<Option<Vec<Extent>>, DeviceError> {
            let r = self.range(offset, len)?;
            let p = self.pages();
            let mut extents: Vec<Extent> = Vec::new();
            let mut at = r.start as u64;
            while at < r.end as u64 {
                let next = ((at / PAGE + 1) * PAGE).min(r.end as u64);
                let mapped = p.mapped[(at / PAGE) as usize];
                match extents.last_mut() {
                    Some(e) if e.mapped == mapped => e.len += next - at,
                    _ => extents.push(Extent { offset: at, len: next - at, mapped }),
                }
                at = next;
            }
            Ok(Some(extents))
        }
    }

    /// One port group, always active/optimised.
    pub struct SinglePath;

    #[async_trait]
    impl AluaStates for SinglePath {
        async fn port_groups(&self) -> Vec<PortGroup> {
            vec![PortGroup { id: 1, state: AccessState::ActiveOptimized, ports: vec![1] }]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Nexus;

    #[test]
    fn the_initiator_port_name_is_the_name_then_the_isid_in_lower_case_hex() {
        let n = Nexus { initiator_name: "iqn.2024-01.org.example:h1".into(), isid: [0x80, 0, 0x12, 0xab, 0x0f, 1], relative_port: 1, tpgt: 1 };
        assert_eq!(n.initiator_port(), "iqn.2024-01.org.example:h1,i,0x800012ab0f01");
    }
}
