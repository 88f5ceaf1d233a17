//! SCSI block device emulation (SPC-4/SBC-3) for the logical units of a target.
//!
//! [`Target`] implements [`ScsiTarget`]: REPORT LUNS and commands to absent LUNs are
//! answered here, everything else goes to the [`LogicalUnit`]'s dispatcher, which checks the
//! CDB against the opcode table ([`opcodes`]), reports pending unit attentions, applies the
//! persistent reservation conflict rules, the unit's software write protection (SWP) and
//! the port's ALUA state, then runs the handler:
//! [`inquiry`] (INQUIRY, VPD), [`rw`] (block I/O, UNMAP, WRITE SAME, COMPARE AND WRITE,
//! ORWRITE, PRE-FETCH, capacity, defect data), [`mode`] (MODE SENSE/SELECT), [`pr`]
//! (persistent reservations), [`reserve`] (SPC-2 RESERVE/RELEASE) and [`maint`]
//! (REPORT LUNS, REPORT TARGET PORT GROUPS, REPORT SUPPORTED OPERATION CODES/TMFs).
//!
//! State a unit keeps in this process: pending unit attentions per I_T nexus, the capacity
//! it last saw (a device that changes size raises CAPACITY DATA HAS CHANGED for every
//! nexus) and the lock that makes COMPARE AND WRITE atomic. Reservations and SWP live in
//! the [`ReservationStore`], so every node serving the unit sees the same ones; the attentions
//! a reservation or mode change raises for nexuses on other nodes go to them through
//! [`UnitEvents`].

pub mod cdb;
mod inquiry;
mod maint;
mod mode;
pub mod opcodes;
mod pr;
mod reserve;
mod rw;
pub mod sense;
#[cfg(test)]
mod tests;
mod xcopy;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use crate::lu::{
    status, AccessState, AluaStates, BlockDevice, Nexus, NexusAttention, ReservationStore,
    ScsiCommand, ScsiResponse, ScsiTarget, TaskManagement, TmfOutcome, UnitEvents,
};
use cdb::Cdb;
use opcodes::{Access, Cmd, Lookup, OpInfo};
use sense::{CmdResult, Failure, Sense};

/// Logical block size the units report.
pub const BLOCK_SIZE: u64 = 512;
/// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: 4096-byte physical blocks, Basalt's unit of
/// checksumming and replication.
pub const LBPPBE: u8 = 3;
/// Largest READ/WRITE we accept, in blocks (8 MiB): bounds the memory one command pins.
pub const MAX_TRANSFER_BLOCKS: u64 = 16 * 1024;
/// OPTIMAL TRANSFER LENGTH (1 MiB) and its granularity (one physical block).
pub const OPTIMAL_TRANSFER_BLOCKS: u32 = 2048;
pub const OPTIMAL_GRANULARITY_BLOCKS: u16 = 8;
/// UNMAP limits: 512 MiB per command, 256 descriptors; granularity one physical block.
pub const MAX_UNMAP_BLOCKS: u64 = 1 << 20;
pub const MAX_UNMAP_DESCRIPTORS: usize = 256;
pub const UNMAP_GRANULARITY_BLOCKS: u32 = 8;
/// WRITE SAME covers at most what one WRITE may: initiators (libiscsi's conformance
/// suite among them) write and read back a range of the largest length the unit allows
/// for WRITE SAME with single READ/WRITE commands.
pub const MAX_WRITE_SAME_BLOCKS: u64 = MAX_TRANSFER_BLOCKS;
/// COMPARE AND WRITE up to 64 blocks (VMware and Linux use 1).
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u64 = 64;

/// IEEE company id in the NAA designator. Placeholder until Basalt registers its own OUI:
/// what matters to initiators is that (company id, vendor specific id) never repeats.
pub const COMPANY_ID: u32 = 0x00_1D_AB;

/// What a unit tells initiators about itself. Must be stable for the life of the volume:
/// multipath and cluster software identify the disk by the NAA id and the serial number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// NAA IEEE Registered designator (type 6), see [`Identity::naa_for_volume`].
    pub naa: [u8; 8],
    /// UNIT SERIAL NUMBER (VPD 0x80), printable ASCII.
    pub serial: String,
    /// T10 vendor id, at most 8 characters ("BASALT").
    pub vendor: String,
    /// Product id, at most 16 characters.
    pub product: String,
    /// Product revision, at most 4 characters.
    pub revision: String,
}

impl Identity {
    /// The identity of a Basalt volume: NAA from its id, serial = the id in hex.
    pub fn for_volume(volume_id: u64, product: &str, revision: &str) -> Self {
        Identity {
            naa: Self::naa_for_volume(volume_id),
            serial: format!("{volume_id:016x}"),
            vendor: "BASALT".into(),
            product: product.into(),
            revision: revision.into(),
        }
    }

    /// NAA 6h: 4 bits NAA, 24 bits company id, 36 bits vendor specific. The volume id is
    /// folded into the 36 bits: ids below 2^36 map to themselves, so distinct volumes of
    /// any realistic cluster get distinct designators, and the mapping never changes.
    pub fn naa_for_volume(volume_id: u64) -> [u8; 8] {
        let vendor_specific = (volume_id ^ (volume_id >> 36)) & ((1 << 36) - 1);
        let v = (0x6u64 << 60) | (u64::from(COMPANY_ID & 0xFF_FFFF) << 36) | vendor_specific;
        v.to_be_bytes()
    }
}

/// Data-Out bytes a CDB calls for (write residuals), for the commands that take Data-Out;
/// `None` for the others and for commands whose length is not in the CDB.
fn data_out_len(cdb: Cdb<'_>) -> Option<u32> {
    let blocks = |n: u64| u32::try_from(n * BLOCK_SIZE).unwrap_or(u32::MAX);
    match cdb.op() {
        // WRITE (6/10/12/16), WRITE AND VERIFY (10/12/16), ORWRITE (16).
        0x0A | 0x2A | 0xAA | 0x8A | 0x2E | 0xAE | 0x8E | 0x8B => {
            Some(blocks(cdb::block_range(cdb, true).blocks))
        }
        // WRITE SAME (10/16): one block, none with NDOB.
        0x41 => Some(blocks(1)),
        0x93 => Some(if cdb.u8(1) & 0x01 != 0 { 0 } else { blocks(1) }),
        0x89 => Some(blocks(2 * u64::from(cdb.u8(13)))), // COMPARE AND WRITE
        0x42 => Some(u32::from(cdb.u16(7))),             // UNMAP
        0x5F => Some(cdb.u32(5)),                        // PERSISTENT RESERVE OUT
        0x83 => Some(cdb.u32(10)),                       // EXTENDED COPY
        _ => None,
    }
}

/// An I_T nexus as the unit tells them apart (initiator port, relative target port).
type NexusKey = (String, u16);

fn nexus_key(n: &Nexus) -> NexusKey {
    (n.initiator_port(), n.relative_port)
}

/// At most this many unit attentions wait per nexus; older ones are dropped (SAM-5 allows
/// reporting only the most important when the queue overflows).
const MAX_PENDING_ATTENTIONS: usize = 8;

/// One logical unit: a block device with identity, ALUA states and reservations.
pub struct LogicalUnit {
    device: Arc<dyn BlockDevice>,
    alua: Arc<dyn AluaStates>,
    reservations: Arc<dyn ReservationStore>,
    identity: Identity,
    /// COMPARE AND WRITE takes this exclusively for its read-compare-write; every other
    /// write takes it shared, so no write lands between the compare and the write. (Atomic
    /// among the commands this process serves; across nodes the volume's single writer
    /// lease serialises.) A tokio lock: it is held across device awaits, and dropping an
    /// aborted command's future releases it.
    atomic: tokio::sync::RwLock<()>,
    /// Pending unit attentions per I_T nexus; an entry exists for every nexus seen, so a
    /// reset can address "all other nexuses". Never held across an await.
    attentions: Mutex<HashMap<NexusKey, VecDeque<Sense>>>,
    /// The device size (bytes) this unit last saw; a different one means the volume was
    /// resized, which every nexus is told of once.
    capacity: AtomicU64,
    /// Who else must hear of resets and reservation changes (the other nodes serving the
    /// unit), if anyone.
    events: Option<Arc<dyn UnitEvents>>,
    /// Status of the EXTENDED COPY commands each nexus sent with a list identifier.
    copies: xcopy::CopyRecords,
}

impl LogicalUnit {
    pub fn new(
        device: Arc<dyn BlockDevice>,
        alua: Arc<dyn AluaStates>,
        reservations: Arc<dyn ReservationStore>,
        identity: Identity,
    ) -> Self {
        LogicalUnit {
            capacity: AtomicU64::new(device.size()),
            device,
            alua,
            reservations,
            identity,
            atomic: tokio::sync::RwLock::new(()),
            attentions: Mutex::new(HashMap::new()),
            events: None,
            copies: xcopy::CopyRecords::default(),
        }
    }

    /// Reports resets and reservation changes to `events` (the other nodes serving this
    /// unit).
    pub fn with_events(mut self, events: Arc<dyn UnitEvents>) -> Self {
        self.events = Some(events);
        self
    }

    /// Another node reset the unit: every nexus served here gets the reset unit attention.
    pub fn reset_elsewhere(&self) {
        self.post_attention(Sense::power_on_reset(), &[], |_| true);
    }

    async fn announce_reset(&self) {
        if let Some(events) = &self.events {
            events.reset().await;
        }
    }

    /// Another node changed the reservations and raised these attentions for nexuses this
    /// node serves (the caller picked those of its own target port): each is established,
    /// also for a nexus that has not sent this unit a command since it logged in again.
    pub fn attentions_from_elsewhere(&self, attentions: &[NexusAttention]) {
        for a in attentions {
            let who: NexusKey = (a.initiator_port.clone(), a.relative_port);
            let sense = Sense::new(a.sense_key, a.asc, a.ascq);
            self.post_attention(sense, std::slice::from_ref(&who), |k| *k == who);
        }
    }

    /// Another node changed the unit's mode parameters: every nexus served here gets MODE
    /// PARAMETERS CHANGED (the caller has dropped the cached parameters).
    pub fn mode_changed_elsewhere(&self) {
        self.post_attention(Sense::mode_parameters_changed(), &[], |_| true);
    }

    /// Establishes CAPACITY DATA HAS CHANGED (SBC-3 4.8) for every nexus seen if the
    /// device's size differs from the one this unit last saw. Runs before every command, so
    /// a resize is reported whichever way the device learnt of it.
    pub fn check_capacity(&self) {
        let now = self.device.size();
        // A plain load on the common path: no cache line bouncing between commands.
        if self.capacity.load(Ordering::Relaxed) == now {
            return;
        }
        let before = self.capacity.swap(now, Ordering::Relaxed);
        if before != now {
            tracing::info!(naa = ?self.identity.naa, old = before, new = now, "unit capacity changed");
            self.post_attention(Sense::capacity_changed(), &[], |_| true);
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Capacity in logical blocks.
    fn blocks(&self) -> u64 {
        self.device.size() / BLOCK_SIZE
    }

    fn attentions(&self) -> std::sync::MutexGuard<'_, HashMap<NexusKey, VecDeque<Sense>>> {
        self.attentions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `sense` for every nexus `to` selects among those seen plus `extra` (e.g.
    /// registrants of a reservation that have not sent us a command yet).
    fn post_attention(
        &self,
        sense: Sense,
        extra: &[NexusKey],
        mut to: impl FnMut(&NexusKey) -> bool,
    ) {
        let mut map = self.attentions();
        for k in extra {
            map.entry(k.clone()).or_default();
        }
        for (k, q) in map.iter_mut() {
            if to(k) && !q.contains(&sense) {
                if q.len() >= MAX_PENDING_ATTENTIONS {
                    q.pop_front();
                }
                q.push_back(sense);
            }
        }
    }

    /// Drops a pending `sense` of `key`, if any.
    fn clear_attention(&self, key: &NexusKey, sense: Sense) {
        if let Some(q) = self.attentions().get_mut(key) {
            q.retain(|s| *s != sense);
        }
    }

    /// Takes the oldest unit attention of `key`, registering the nexus if it is new.
    fn take_attention(&self, key: &NexusKey) -> Option<Sense> {
        // Every command asks: a known nexus (the usual case) costs no copy of its key.
        let mut map = self.attentions();
        if let Some(queue) = map.get_mut(key) {
            return queue.pop_front();
        }
        map.insert(key.clone(), VecDeque::new());
        None
    }

    /// Executes one command on this unit.
    pub async fn execute(&self, cmd: &ScsiCommand, target_name: &str) -> ScsiResponse {
        self.execute_mapped(cmd, target_name, &NO_PEERS, false).await
    }

    /// Executes one command on this unit, which `peers` (the units of its target) may serve
    /// as copy sources and destinations of EXTENDED COPY; `read_only` when the LUN it came
    /// to maps the unit read-only (then nothing through it writes the medium).
    pub async fn execute_mapped(&self, cmd: &ScsiCommand, target_name: &str, peers: &LunMap, read_only: bool) -> ScsiResponse {
        let resp = match self.run(cmd, target_name, peers, read_only).await {
            Ok(data_in) => ScsiResponse { status: status::GOOD, data_in, ..Default::default() },
            Err(f) => f.into_response(),
        };
        ScsiResponse { data_out_len: data_out_len(Cdb(&cmd.cdb)), ..resp }
    }

    async fn run(&self, cmd: &ScsiCommand, target_name: &str, peers: &LunMap, read_only: bool) -> CmdResult {
        let cdb = Cdb(&cmd.cdb);
        let info = match opcodes::lookup(cdb.op(), cdb.service_action()) {
            Lookup::Found(info) => info,
            Lookup::BadServiceAction => return Err(Sense::invalid_cdb(1, Some(4)).into()),
            Lookup::Unknown => return Err(Sense::invalid_opcode().into()),
        };
        let len = info.usage.len();
        if cmd.cdb.len() < len {
            return Err(Sense::invalid_cdb(0, None).into());
        }
        let cdb = Cdb(&cmd.cdb[..len]);
        // NormACA = 0 in INQUIRY: a CDB asking for ACA is refused (SAM-5 5.9.1.2).
        if cdb.u8(len - 1) & 0x04 != 0 {
            return Err(Sense::invalid_cdb(len as u16 - 1, Some(2)).into());
        }
        let key = nexus_key(&cmd.nexus);
        self.check_capacity();
        // SPC-4 7.9: INQUIRY, REPORT LUNS and REQUEST SENSE neither report nor clear a unit
        // attention (REQUEST SENSE returns it as its data instead).
        if !matches!(info.cmd, Cmd::Inquiry | Cmd::ReportLuns | Cmd::RequestSense) {
            if let Some(ua) = self.take_attention(&key) {
                return Err(ua.into());
            }
        }
        self.check_reservation(info, cdb, &cmd.nexus, &key).await?;
        // As SWP does, after the reservation checks.
        if read_only && info.cmd.writes_medium() {
            return Err(Sense::write_protected().into());
        }
        if info.medium {
            self.check_alua(cmd.nexus.relative_port).await?;
        }
        let ctx = Ctx { cdb, cmd, target_name, key: &key, peers, read_only };
        self.dispatch(info, &ctx).await
    }

    /// RESERVATION CONFLICT for a command another nexus's reservation excludes (SPC-2
    /// reservations first, see [`reserve`]; then the persistent ones).
    async fn check_reservation(&self, info: &OpInfo, cdb: Cdb<'_>, nexus: &Nexus, key: &NexusKey) -> CmdResult<()> {
        // No reservation of either kind affects these.
        if matches!(info.cmd, Cmd::Inquiry | Cmd::RequestSense | Cmd::ReportLuns) {
            return Ok(());
        }
        let (mut state, _) = self
            .reservations
            .load()
            .await
            .map_err(|e| sense::device_error(&e, sense::Io::Read))?;
        self.forget_departed_holder(&mut state).await;
        if reserve::conflicts(&state, info.cmd, key) {
            return Err(Failure::Conflict);
        }
        let access = match info.access {
            Access::Always | Access::PrOut => return Ok(()),
            Access::Read => pr::Want::Read,
            Access::Write => pr::Want::Write,
        };
        // START STOP UNIT with START = 1 is allowed; stopping conflicts (SBC-3 table 13).
        let access = if info.cmd == Cmd::StartStopUnit && cdb.u8(4) & 0x01 == 0 {
            pr::Want::Write
        } else {
            access
        };
        if pr::conflicts(&state, nexus, access) {
            return Err(Failure::Conflict);
        }
        // After the reservation checks: a conflict is reported before DATA PROTECT.
        if state.software_write_protect && info.cmd.writes_medium() {
            return Err(Sense::software_write_protected().into());
        }
        Ok(())
    }

    /// NOT READY when this port's target port group cannot access the medium now.
    async fn check_alua(&self, port: u16) -> CmdResult<()> {
        let groups = self.alua.port_groups().await;
        let state = groups.iter().find(|g| g.ports.contains(&port)).map(|g| g.state);
        match state {
            Some(AccessState::Standby) => Err(Sense::alua_standby().into()),
            Some(AccessState::Unavailable) => Err(Sense::alua_unavailable().into()),
            Some(AccessState::Transitioning) => Err(Sense::alua_transitioning().into()),
            // A port missing from the groups is served as active: the device itself
            // answers Transitioning if this node may not access the volume.
            _ => Ok(()),
        }
    }

    async fn dispatch(&self, info: &OpInfo, ctx: &Ctx<'_>) -> CmdResult {
        match info.cmd {
            Cmd::TestUnitReady => Ok(Bytes::new()),
            Cmd::RequestSense => Ok(self.request_sense(ctx)),
            Cmd::Inquiry => self.inquiry(ctx).await,
            Cmd::Read => self.read(ctx).await,
            Cmd::Write => self.write(ctx).await,
            Cmd::WriteAndVerify => self.write(ctx).await,
            Cmd::Verify => self.verify(ctx).await,
            Cmd::SynchronizeCache => self.synchronize_cache(ctx).await,
            Cmd::WriteSame => self.write_same(ctx).await,
            Cmd::Unmap => self.unmap(ctx).await,
            Cmd::CompareAndWrite => self.compare_and_write(ctx).await,
            Cmd::ReadCapacity10 => self.read_capacity10(ctx),
            Cmd::ReadCapacity16 => self.read_capacity16(ctx),
            Cmd::GetLbaStatus => self.get_lba_status(ctx).await,
            Cmd::ModeSense => self.mode_sense(ctx).await,
            Cmd::ModeSelect => self.mode_select(ctx).await,
            Cmd::PersistentReserveIn => self.persistent_reserve_in(ctx).await,
            Cmd::PersistentReserveOut => self.persistent_reserve_out(ctx).await,
            Cmd::ReportLuns => Err(Sense::invalid_opcode().into()), // answered by Target
            Cmd::ReportTargetPortGroups => self.report_target_port_groups(ctx).await,
            Cmd::ReportSupportedOpcodes => maint::report_supported_opcodes(ctx.cdb),
            Cmd::ReportSupportedTmfs => maint::report_supported_tmfs(ctx.cdb),
            // Nothing to spin up or down; the medium is always ready.
            Cmd::StartStopUnit => Ok(Bytes::new()),
            // Not removable (RMB = 0): there is nothing to lock, and SBC-3 lets a device
            // server without a removal mechanism accept the command.
            Cmd::PreventAllowMediumRemoval => Ok(Bytes::new()),
            Cmd::PreFetch => self.pre_fetch(ctx),
            Cmd::ReadDefectData => self.read_defect_data(ctx),
            Cmd::OrWrite => self.or_write(ctx).await,
            Cmd::Reserve => self.reserve(ctx).await,
            Cmd::Release => self.release(ctx).await,
            Cmd::ExtendedCopy => self.extended_copy(ctx).await,
            Cmd::ReceiveCopyResults => self.receive_copy_results(ctx),
        }
    }

    /// REQUEST SENSE: the pending unit attention if any (consumed), else NO SENSE. Sense of
    /// earlier failed commands is not kept: iSCSI delivers it with the failed command
    /// (autosense), which is all SAM-5 requires.
    fn request_sense(&self, ctx: &Ctx<'_>) -> Bytes {
        let sense = self.take_attention(ctx.key).unwrap_or(Sense::no_sense());
        cdb::truncate(sense.to_bytes().to_vec(), usize::from(ctx.cdb.u8(4)))
    }

    /// SAM-5 6.3.3: a logical unit reset establishes the reset unit attention for every
    /// I_T nexus, the one that asked for it included (multipath initiators count on seeing
    /// it on each path).
    fn reset(&self, requester: &NexusKey) {
        let mut map = self.attentions();
        map.entry(requester.clone()).or_default();
        drop(map);
        self.post_attention(Sense::power_on_reset(), &[], |_| true);
    }
}

/// What a handler needs besides the unit: the trimmed CDB and the command it came in.
pub(crate) struct Ctx<'a> {
    pub cdb: Cdb<'a>,
    pub cmd: &'a ScsiCommand,
    /// iSCSI target name, for the SCSI name string of the target port (VPD 0x83).
    pub target_name: &'a str,
    key: &'a NexusKey,
    /// The other units of the target, reachable as EXTENDED COPY sources and destinations.
    peers: &'a LunMap,
    /// The LUN the command came to maps the unit read-only.
    read_only: bool,
}

/// The peers of a unit executed outside a [`Target`].
static NO_PEERS: LunMap = LunMap { units: BTreeMap::new(), read_only: std::collections::BTreeSet::new() };

/// One LUN of a target: the unit it stands for, and whether it gives it read-only.
pub struct Lun {
    pub lun: u64,
    pub unit: Arc<LogicalUnit>,
    pub read_only: bool,
}

impl Lun {
    pub fn new(lun: u64, unit: Arc<LogicalUnit>) -> Lun {
        Lun { lun, unit, read_only: false }
    }

    pub fn read_only(lun: u64, unit: Arc<LogicalUnit>) -> Lun {
        Lun { lun, unit, read_only: true }
    }
}

/// The logical units of one iSCSI target.
pub struct Target {
    name: String,
    /// Replaced whole when LUNs are added to a live target; a command works on the map it
    /// started with.
    luns: std::sync::RwLock<Arc<LunMap>>,
}

/// The units a target serves, by LUN, and which LUNs map their unit read-only. Derefs to
/// the units.
#[derive(Clone, Default)]
pub struct LunMap {
    units: BTreeMap<u64, Arc<LogicalUnit>>,
    read_only: std::collections::BTreeSet<u64>,
}

impl LunMap {
    /// Whether `lun` maps its unit read-only.
    pub fn is_read_only(&self, lun: u64) -> bool {
        self.read_only.contains(&lun)
    }

    /// Whether some LUN of the map gives `unit` read-only (a copy manager must not write
    /// it through this target).
    fn protects(&self, unit: &LogicalUnit) -> bool {
        self.units.iter().any(|(lun, u)| std::ptr::eq(&**u, unit) && self.read_only.contains(lun))
    }
}

impl std::ops::Deref for LunMap {
    type Target = BTreeMap<u64, Arc<LogicalUnit>>;
    fn deref(&self) -> &Self::Target {
        &self.units
    }
}

impl Target {
    /// `name` is the iSCSI target name (`iqn.…`), reported in device identification.
    pub fn new(name: impl Into<String>) -> Self {
        Target { name: name.into(), luns: std::sync::RwLock::new(Arc::new(LunMap::default())) }
    }

    pub fn with_lun(self, lun: u64, unit: Arc<LogicalUnit>) -> Self {
        self.change_luns(vec![Lun::new(lun, unit)], &[], &[]);
        self
    }

    /// The units served, by LUN (a snapshot: a change swaps in a new map).
    pub fn luns(&self) -> Arc<LunMap> {
        self.luns.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn lun(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        self.luns().get(&lun).cloned()
    }

    /// The LUNs served, in order.
    pub fn lun_numbers(&self) -> Vec<u64> {
        self.luns().keys().copied().collect()
    }

    /// Changes the LUN map of a live target: `set` serves a unit at each LUN (replacing
    /// whatever was there), `removed` stops serving those LUNs (commands to them get LOGICAL
    /// UNIT NOT SUPPORTED; commands already running on them finish). When the map changed,
    /// each nexus in `told` gets REPORTED LUNS DATA HAS CHANGED on every unit the target
    /// still has (SPC-4 6.33, 7.9). Returns whether the map changed.
    pub fn change_luns(&self, set: Vec<Lun>, removed: &[u64], told: &[Nexus]) -> bool {
        let (changed, units): (bool, Vec<Arc<LogicalUnit>>) = {
            let mut luns = self.luns.write().unwrap_or_else(|p| p.into_inner());
            let map = Arc::make_mut(&mut luns);
            let mut changed = false;
            for lun in removed {
                changed |= map.units.remove(lun).is_some();
                map.read_only.remove(lun);
            }
            for Lun { lun, unit, read_only } in set {
                changed |= map.units.get(&lun).is_none_or(|old| !Arc::ptr_eq(old, &unit));
                changed |= map.read_only.contains(&lun) != read_only;
                map.units.insert(lun, unit);
                if read_only {
                    map.read_only.insert(lun);
                } else {
                    map.read_only.remove(&lun);
                }
            }
            (changed, map.units.values().cloned().collect())
        };
        let keys: Vec<NexusKey> = told.iter().map(nexus_key).collect();
        if changed && !keys.is_empty() {
            for unit in units {
                unit.post_attention(Sense::reported_luns_changed(), &keys, |k| keys.contains(k));
            }
        }
        changed
    }

    async fn run(&self, cmd: &ScsiCommand) -> ScsiResponse {
        let op = cmd.cdb.first().copied().unwrap_or(0xFF);
        let luns = self.luns();
        // REPORT LUNS goes to any LUN, LUN 0 included when it does not exist (SPC-4 6.33).
        if op == 0xA0 {
            return match maint::report_luns(&cmd.cdb, luns.keys().copied()) {
                Ok(data_in) => {
                    // The initiator has the new list: REPORTED LUNS DATA HAS CHANGED is
                    // cleared for its nexus (SPC-4 6.33).
                    let key = nexus_key(&cmd.nexus);
                    for unit in luns.values() {
                        unit.clear_attention(&key, Sense::reported_luns_changed());
                    }
                    ScsiResponse { status: status::GOOD, data_in, ..Default::default() }
                }
                Err(f) => f.into_response(),
            };
        }
        if let Some(unit) = luns.get(&cmd.lun) {
            return unit.execute_mapped(cmd, &self.name, &luns, luns.is_read_only(cmd.lun)).await;
        }
        match op {
            0x12 => match inquiry::absent_lun(Cdb(&cmd.cdb)) {
                Ok(data_in) => ScsiResponse { status: status::GOOD, data_in, ..Default::default() },
                Err(f) => f.into_response(),
            },
            // SPC-4 6.39: REQUEST SENSE to an absent LUN returns LOGICAL UNIT NOT SUPPORTED
            // as its parameter data, with GOOD status.
            0x03 => ScsiResponse {
                status: status::GOOD,
                data_in: cdb::truncate(
                    Sense::lun_not_supported().to_bytes().to_vec(),
                    usize::from(Cdb(&cmd.cdb).u8(4)),
                ),
                ..Default::default()
            },
            _ => Failure::Check(Sense::lun_not_supported()).into_response(),
        }
    }
}

#[async_trait]
impl ScsiTarget for Target {
    async fn execute(&self, cmd: ScsiCommand) -> ScsiResponse {
        self.run(&cmd).await
    }

    async fn task_management(&self, tmf: TaskManagement, lun: u64, nexus: &Nexus) -> TmfOutcome {
        let key = nexus_key(nexus);
        match tmf {
            // The transport aborts the tasks; the units keep no per-task state.
            TaskManagement::AbortTask
            | TaskManagement::AbortTaskSet
            | TaskManagement::ClearTaskSet
            | TaskManagement::ClearAca => TmfOutcome::Complete,
            // Persistent reservations survive resets (SPC-4 5.12.1); SPC-2 reservations
            // do not (SPC-2 5.5.1). The unit attention is established.
            TaskManagement::LogicalUnitReset => match self.luns().get(&lun) {
                Some(unit) => {
                    unit.reset(&key);
                    unit.drop_reserved(None).await;
                    unit.announce_reset().await;
                    TmfOutcome::Complete
                }
                None => TmfOutcome::NoSuchLun,
            },
            TaskManagement::TargetWarmReset | TaskManagement::TargetColdReset => {
                for unit in self.luns().values() {
                    unit.reset(&key);
                    unit.drop_reserved(None).await;
                    unit.announce_reset().await;
                }
                TmfOutcome::Complete
            }
        }
    }

    async fn nexus_gone(&self, nexus: &Nexus) {
        // Registrations and persistent reservations persist (they are the point of
        // *persistent* reservations); an SPC-2 reservation goes with its nexus. Otherwise
        // only the bookkeeping of a nexus with nothing pending is dropped, so the attention
        // map does not grow with every session ever seen.
        let key = nexus_key(nexus);
        let luns = self.luns();
        for unit in luns.values() {
            unit.drop_reserved(Some(&key)).await;
        }
        for unit in luns.values() {
            let mut map = unit.attentions();
            if map.get(&key).is_some_and(|q| q.is_empty()) {
                map.remove(&key);
            }
            drop(map);
            unit.copies.forget(&key);
        }
    }
}
