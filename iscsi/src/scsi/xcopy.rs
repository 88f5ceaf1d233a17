//! Third-party copy (SPC-4 5.16, 6.4, 6.18, 7.8.17): the copy manager of a unit.
//!
//! EXTENDED COPY (LID1) copies blocks between the units of the same target without the
//! data passing through the initiator (VMware's VAAI "full copy"). Copy targets (CSCDs)
//! are named by identification descriptors (E4h) carrying a unit's NAA designator;
//! segments are block→block (02h, counted in blocks) and block→block with byte offsets
//! (0Ah). Only units of the target the command came through are reachable: a target's
//! access rules (CHAP, initiator list) are what allow a nexus to touch a volume, so a
//! designator naming a volume of another target is "not reachable", like an unknown one.
//!
//! The whole parameter list is checked and every copy target resolved, its reservations
//! and ALUA state checked as a read (source) or a write (destination) by the issuing
//! nexus, before any data moves; then each segment is copied in pieces of at most
//! [`PIECE_BYTES`] (read from the source device, write to the destination device).
//!
//! RECEIVE COPY RESULTS reports the copy manager's limits (OPERATING PARAMETERS) and the
//! status of a nexus's copies by list identifier (COPY STATUS). The unit keeps that status
//! per nexus in [`CopyRecords`], a few entries each, dropped when the nexus goes away.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::cdb::{be16, be32, be64, check_range, truncate};
use super::sense::{device_error, key, CmdResult, Failure, FieldPointer, Io, Sense};
use super::*;
use crate::lu::DeviceError;

/// CSCD descriptors one parameter list may carry.
pub const MAX_CSCD_DESCRIPTORS: u16 = 8;
/// Segment descriptors one parameter list may carry.
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 16;
/// Every CSCD descriptor we accept is 32 bytes, the longest segment descriptor (0Ah) too.
const CSCD_LEN: usize = 32;
/// Bytes of CSCD and segment descriptors together.
pub const MAX_DESCRIPTOR_LIST_LENGTH: u32 =
    (MAX_CSCD_DESCRIPTORS as u32 + MAX_SEGMENT_DESCRIPTORS as u32) * CSCD_LEN as u32;
/// Bytes one segment may copy (32 MiB): with [`MAX_SEGMENT_DESCRIPTORS`], a command copies
/// at most 512 MiB, which keeps it well within an initiator's command timeout.
pub const MAX_SEGMENT_BYTES: u32 = 32 << 20;
/// Bytes read and written at a time: bounds the memory one copy holds.
pub const PIECE_BYTES: u64 = 1 << 20;
/// Parameter list header length.
const HEADER: usize = 16;
/// Copy statuses kept per nexus; the oldest finished one goes first.
const MAX_RECORDS_PER_NEXUS: usize = 16;

/// Identification descriptor CSCD type code.
const CSCD_IDENTIFICATION: u8 = 0xE4;
/// Segment descriptor type codes we implement.
const SEG_BLOCK_TO_BLOCK: u8 = 0x02;
const SEG_BLOCK_TO_BLOCK_OFFSETS: u8 = 0x0A;

// ---- sense data ---------------------------------------------------------------------

/// Sense pointing at byte `at` of the parameter list (for COPY ABORTED, the segment
/// pointer with SD = 0, which has the same layout).
fn at_param(sense_key: u8, asc: u8, ascq: u8, at: usize) -> Failure {
    let field = FieldPointer { in_cdb: false, byte: at.min(usize::from(u16::MAX)) as u16, bit: None };
    Failure::Check(Sense { field: Some(field), ..Sense::new(sense_key, asc, ascq) })
}

fn illegal(asc: u8, ascq: u8, at: usize) -> Failure {
    at_param(key::ILLEGAL_REQUEST, asc, ascq, at)
}

fn too_many_cscds(at: usize) -> Failure {
    illegal(0x26, 0x06, at)
}
fn unsupported_cscd(at: usize) -> Failure {
    illegal(0x26, 0x07, at)
}
fn too_many_segments(at: usize) -> Failure {
    illegal(0x26, 0x08, at)
}
fn unsupported_segment(at: usize) -> Failure {
    illegal(0x26, 0x09, at)
}
fn inline_data_exceeded() -> Failure {
    illegal(0x26, 0x0B, 12)
}
fn invalid_param(at: usize) -> Failure {
    illegal(0x26, 0x00, at)
}
/// OPERATION IN PROGRESS: the list identifier belongs to a copy still running.
fn operation_in_progress() -> Failure {
    Failure::Check(Sense::new(key::ILLEGAL_REQUEST, 0x00, 0x16))
}

/// COPY ABORTED with a segment pointer to byte `at` of the parameter list.
fn copy_aborted(asc: u8, ascq: u8, at: usize) -> Failure {
    at_param(key::COPY_ABORTED, asc, ascq, at)
}
/// COPY TARGET DEVICE NOT REACHABLE: no such CSCD descriptor, or no unit we can reach
/// has its designator.
fn not_reachable(at: usize) -> Failure {
    copy_aborted(0x0D, 0x02, at)
}
/// INCORRECT COPY TARGET DEVICE TYPE: the descriptor says the unit is not a block device.
fn wrong_device_type(at: usize) -> Failure {
    copy_aborted(0x0D, 0x03, at)
}
/// A segment reaching past the end of its source or destination: the copy is aborted
/// before anything is copied, the segment pointer names the LBA field at fault.
fn segment_out_of_range(at: usize) -> Failure {
    copy_aborted(0x00, 0x00, at)
}

/// An error of a copy source or destination while copying: read and write errors and
/// range errors become COPY ABORTED with the same additional sense code (the copy
/// manager, not the initiator, issued the access); NOT READY (an ALUA transition, a
/// volume briefly unavailable) is passed on as is, so the initiator retries.
fn copy_error(e: &DeviceError, io: Io) -> Failure {
    match device_error(e, io) {
        Failure::Check(s) if s.key == key::MEDIUM_ERROR || s.key == key::ILLEGAL_REQUEST => {
            Failure::Check(Sense::new(key::COPY_ABORTED, s.asc, s.ascq))
        }
        other => other,
    }
}

// ---- the parameter list ---------------------------------------------------------------

/// LIST ID USAGE (byte 1 bits 4..3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListIdUsage {
    /// 00b and 10b: the list identifier names the copy for RECEIVE COPY RESULTS.
    Tracked,
    /// 11b: no list identifier; nothing is kept.
    Untracked,
}

/// An identification CSCD descriptor (E4h), at `at` in the parameter list.
#[derive(Debug)]
struct Cscd {
    at: usize,
    /// Code set, association and designator type, then the designator itself.
    code_set: u8,
    designator_type: u8,
    designator: Vec<u8>,
    device_type: u8,
    block_len: u32,
}

/// A segment as bytes: both segment types we implement reduce to this.
#[derive(Debug)]
struct Segment {
    at: usize,
    src: usize,
    dst: usize,
    src_lba: u64,
    dst_lba: u64,
    src_offset: u64,
    dst_offset: u64,
    bytes: u64,
}

/// Offsets inside a segment descriptor (SPC-4 6.4.6).
const SEG_SRC_INDEX: usize = 4;
const SEG_DST_INDEX: usize = 6;
const SEG_SRC_LBA: usize = 12;
const SEG_DST_LBA: usize = 20;

#[derive(Debug)]
struct ParameterList {
    list_id: u8,
    usage: ListIdUsage,
    cscds: Vec<Cscd>,
    segments: Vec<Segment>,
}

/// Checks the parameter list's structure, in the order SPC-4 lists the errors; nothing
/// here looks at the units yet.
fn parse(list: &[u8]) -> CmdResult<ParameterList> {
    let plen = list.len();
    if plen < HEADER {
        return Err(Sense::param_list_length().into());
    }
    let list_id = list[0];
    let usage = match (list[1] >> 3) & 0x03 {
        0b00 | 0b10 => ListIdUsage::Tracked,
        0b11 => ListIdUsage::Untracked,
        // 01b is reserved.
        _ => {
            let field = FieldPointer { in_cdb: false, byte: 1, bit: Some(4) };
            return Err(Sense { field: Some(field), ..Sense::new(key::ILLEGAL_REQUEST, 0x26, 0) }.into());
        }
    };
    let cscd_len = usize::from(be16(list, 2));
    let seg_len = be32(list, 8) as usize;
    let inline_len = be32(list, 12) as usize;
    let descriptors = cscd_len + seg_len;
    if HEADER + descriptors + inline_len > plen || descriptors > MAX_DESCRIPTOR_LIST_LENGTH as usize {
        return Err(Sense::param_list_length().into());
    }
    // No segment type we implement takes inline data (MAXIMUM INLINE DATA LENGTH 0).
    if inline_len > 0 {
        return Err(inline_data_exceeded());
    }

    let mut cscds = Vec::new();
    let mut at = HEADER;
    let cscd_end = HEADER + cscd_len;
    while at < cscd_end {
        if cscds.len() == usize::from(MAX_CSCD_DESCRIPTORS) {
            return Err(too_many_cscds(at));
        }
        if list[at] != CSCD_IDENTIFICATION {
            return Err(unsupported_cscd(at));
        }
        if at + CSCD_LEN > cscd_end {
            // The list length cuts the descriptor short.
            return Err(invalid_param(2));
        }
        cscds.push(parse_cscd(&list[at..at + CSCD_LEN], at)?);
        at += CSCD_LEN;
    }

    let mut segments = Vec::new();
    let seg_end = cscd_end + seg_len;
    while at < seg_end {
        if segments.len() == usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(too_many_segments(at));
        }
        let kind = list[at];
        if kind != SEG_BLOCK_TO_BLOCK && kind != SEG_BLOCK_TO_BLOCK_OFFSETS {
            return Err(unsupported_segment(at));
        }
        if at + 4 > seg_end {
            return Err(invalid_param(8));
        }
        let want = if kind == SEG_BLOCK_TO_BLOCK { 0x18 } else { 0x1C };
        if usize::from(be16(list, at + 2)) != want {
            return Err(invalid_param(at + 2));
        }
        if at + 4 + want > seg_end {
            return Err(invalid_param(8));
        }
        segments.push(parse_segment(&list[at..at + 4 + want], at)?);
        at += 4 + want;
    }
    Ok(ParameterList { list_id, usage, cscds, segments })
}

/// An E4h descriptor: byte 1 LU ID TYPE, NUL (both ignored: SPC-4 made them reserved and
/// obsolete) and PERIPHERAL DEVICE TYPE; bytes 4..28 a designation descriptor; for block
/// devices, bytes 28..32 PAD and DISK BLOCK LENGTH.
fn parse_cscd(d: &[u8], at: usize) -> CmdResult<Cscd> {
    let code_set = d[4] & 0x0F;
    let association = (d[5] >> 4) & 0x03;
    let designator_type = d[5] & 0x0F;
    let len = usize::from(d[7]);
    // The designator identifies a logical unit, in the 20 bytes the descriptor has room for.
    if association != 0 {
        return Err(invalid_param(at + 5));
    }
    if len > 20 {
        return Err(invalid_param(at + 7));
    }
    Ok(Cscd {
        at,
        code_set,
        designator_type,
        designator: d[8..8 + len].to_vec(),
        device_type: d[1] & 0x1F,
        block_len: u32::from(d[29]) << 16 | u32::from(d[30]) << 8 | u32::from(d[31]),
    })
}

/// 02h: bytes 10..12 NUMBER OF BLOCKS (DC says whose blocks; ours are all the same size, so
/// it and CAT change nothing); 0Ah: bytes 8..12 NUMBER OF BYTES, 28..30 and 30..32 the byte
/// offsets into the first source and destination blocks. Both: LBAs at 12 and 20.
fn parse_segment(d: &[u8], at: usize) -> CmdResult<Segment> {
    let (bytes, src_offset, dst_offset) = if d[0] == SEG_BLOCK_TO_BLOCK {
        (u64::from(be16(d, 10)) * BLOCK_SIZE, 0, 0)
    } else {
        let (s, t) = (u64::from(be16(d, 28)), u64::from(be16(d, 30)));
        if s >= BLOCK_SIZE {
            return Err(invalid_param(at + 28));
        }
        if t >= BLOCK_SIZE {
            return Err(invalid_param(at + 30));
        }
        (u64::from(be32(d, 8)), s, t)
    };
    if bytes > u64::from(MAX_SEGMENT_BYTES) {
        let field = if d[0] == SEG_BLOCK_TO_BLOCK { 10 } else { 8 };
        return Err(invalid_param(at + field));
    }
    Ok(Segment {
        at,
        src: usize::from(be16(d, SEG_SRC_INDEX)),
        dst: usize::from(be16(d, SEG_DST_INDEX)),
        src_lba: be64(d, SEG_SRC_LBA),
        dst_lba: be64(d, SEG_DST_LBA),
        src_offset,
        dst_offset,
        bytes,
    })
}

// ---- copy status ----------------------------------------------------------------------

/// COPY MANAGER STATUS of RECEIVE COPY RESULTS (LID1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    Running,
    Done,
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct CopyRecord {
    list_id: u8,
    progress: Progress,
    segments: u16,
    bytes: u64,
}

/// The copies each nexus sent with a list identifier, newest last. Never held across an
/// await.
#[derive(Default)]
pub struct CopyRecords(Mutex<HashMap<NexusKey, VecDeque<CopyRecord>>>);

impl CopyRecords {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<NexusKey, VecDeque<CopyRecord>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the copy `list_id` of `key`: a running one with the same identifier refuses
    /// it, a finished one is replaced.
    fn start(&self, key: &NexusKey, list_id: u8) -> CmdResult<()> {
        let mut map = self.map();
        let q = map.entry(key.clone()).or_default();
        if q.iter().any(|r| r.list_id == list_id && r.progress == Progress::Running) {
            return Err(operation_in_progress());
        }
        q.retain(|r| r.list_id != list_id);
        if q.len() >= MAX_RECORDS_PER_NEXUS {
            if let Some(i) = q.iter().position(|r| r.progress != Progress::Running) {
                q.remove(i);
            }
        }
        q.push_back(CopyRecord { list_id, progress: Progress::Running, segments: 0, bytes: 0 });
        Ok(())
    }

    fn update(&self, key: &NexusKey, list_id: u8, change: impl FnOnce(&mut CopyRecord)) {
        let mut map = self.map();
        let record = map
            .get_mut(key)
            .and_then(|q| q.iter_mut().find(|r| r.list_id == list_id && r.progress == Progress::Running));
        if let Some(r) = record {
            change(r);
        }
    }

    fn get(&self, key: &NexusKey, list_id: u8) -> Option<CopyRecord> {
        self.map().get(key).and_then(|q| q.iter().find(|r| r.list_id == list_id).copied())
    }

    /// The nexus is gone: its list identifiers mean nothing any more.
    pub fn forget(&self, key: &NexusKey) {
        self.map().remove(key);
    }
}

/// Marks a tracked copy failed unless it finished: a copy whose command was aborted (its
/// future dropped) must not stay "running" and block its list identifier.
struct Tracking<'a> {
    records: &'a CopyRecords,
    key: &'a NexusKey,
    list_id: u8,
}

impl Tracking<'_> {
    fn progress(&self, bytes: u64, segment_done: bool) {
        self.records.update(self.key, self.list_id, |r| {
            r.bytes += bytes;
            if segment_done {
                r.segments = r.segments.saturating_add(1);
            }
        });
    }
    fn finish(self, ok: bool) {
        // Drop then finds no running record to fail.
        self.records.update(self.key, self.list_id, |r| {
            r.progress = if ok { Progress::Done } else { Progress::Failed };
        });
    }
}

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        self.records.update(self.key, self.list_id, |r| r.progress = Progress::Failed);
    }
}

// ---- the copy manager -------------------------------------------------------------------

/// A copy target resolved to a unit, with what the copy does to it.
struct Resolved<'a> {
    unit: &'a LogicalUnit,
    reads: bool,
    writes: bool,
}

impl LogicalUnit {
    /// The unit of the target whose NAA designator the descriptor carries.
    fn find_copy_target<'a>(&'a self, ctx: &Ctx<'a>, c: &Cscd) -> Option<&'a LogicalUnit> {
        // Binary code set, NAA designator type: the one designator of ours that fits.
        if c.code_set != 0x01 || c.designator_type != 0x03 {
            return None;
        }
        std::iter::once(self)
            .chain(ctx.peers.values().map(|u| &**u))
            .find(|u| u.identity.naa[..] == c.designator[..])
    }

    /// The reservation and ALUA checks the dispatcher makes for a READ(16) (a copy source)
    /// or a WRITE(16) (a destination) from the nexus that sent the EXTENDED COPY: the copy
    /// manager may do to a unit only what the nexus itself could.
    async fn check_copy_access(&self, nexus: &Nexus, writes: bool) -> CmdResult<()> {
        let op = if writes { 0x8A } else { 0x88 };
        let opcodes::Lookup::Found(info) = opcodes::lookup(op, 0) else {
            // The table always has READ(16) and WRITE(16); fail closed all the same.
            return Err(Failure::Conflict);
        };
        self.check_reservation(info, Cdb(&[op]), nexus, &nexus_key(nexus)).await?;
        self.check_alua(nexus.relative_port).await
    }

    /// EXTENDED COPY (LID1), SPC-4 6.4.
    pub(super) async fn extended_copy<'a>(&'a self, ctx: &Ctx<'a>) -> CmdResult {
        let plen = ctx.cdb.u32(10) as usize;
        // Zero: nothing to copy, not an error (SPC-4 6.4.1).
        if plen == 0 {
            return Ok(Bytes::new());
        }
        if ctx.cmd.data_out.len() < plen {
            return Err(Sense::short_data_out().into());
        }
        let list = parse(&ctx.cmd.data_out[..plen])?;

        // Resolve the copy targets the segments use, and check every segment against them.
        let mut targets: Vec<Option<Resolved<'a>>> = list.cscds.iter().map(|_| None).collect();
        for s in &list.segments {
            for (index, at, writes) in [(s.src, SEG_SRC_INDEX, false), (s.dst, SEG_DST_INDEX, true)] {
                let Some(c) = list.cscds.get(index) else {
                    return Err(not_reachable(s.at + at));
                };
                if targets[index].is_none() {
                    let Some(unit) = self.find_copy_target(ctx, c) else {
                        return Err(not_reachable(c.at));
                    };
                    if c.device_type != 0x00 {
                        return Err(wrong_device_type(c.at + 1));
                    }
                    if u64::from(c.block_len) != BLOCK_SIZE {
                        return Err(invalid_param(c.at + 29));
                    }
                    targets[index] = Some(Resolved { unit, reads: false, writes: false });
                }
                if let Some(t) = targets[index].as_mut() {
                    if writes {
                        t.writes = true;
                    } else {
                        t.reads = true;
                    }
                }
            }
            let (Some(src), Some(dst)) = (&targets[s.src], &targets[s.dst]) else {
                continue; // both were resolved above
            };
            segment_in_range(s.src_lba, s.src_offset, s.bytes, src.unit.blocks())
                .map_err(|_| segment_out_of_range(s.at + SEG_SRC_LBA))?;
            segment_in_range(s.dst_lba, s.dst_offset, s.bytes, dst.unit.blocks())
                .map_err(|_| segment_out_of_range(s.at + SEG_DST_LBA))?;
        }

        // The same unit may stand behind several descriptors: check each unit once, as a
        // write if anything writes it.
        let mut units: Vec<(&LogicalUnit, bool)> = Vec::new();
        for t in targets.iter().flatten() {
            match units.iter_mut().find(|(u, _)| std::ptr::eq(*u, t.unit)) {
                Some((_, w)) => *w |= t.writes,
                None if t.reads || t.writes => units.push((t.unit, t.writes)),
                None => {}
            }
        }
        for (unit, writes) in &units {
            // A destination this target maps read-only (through the LUN the command came
            // to, or another) is not written through it.
            let mapped_read_only = (std::ptr::eq(*unit, self) && ctx.read_only) || ctx.peers.protects(unit);
            if *writes && mapped_read_only {
                return Err(Sense::write_protected().into());
            }
            unit.check_copy_access(&ctx.cmd.nexus, *writes).await?;
        }

        let tracking = match list.usage {
            ListIdUsage::Tracked => {
                self.copies.start(ctx.key, list.list_id)?;
                Some(Tracking { records: &self.copies, key: ctx.key, list_id: list.list_id })
            }
            ListIdUsage::Untracked => None,
        };
        let mut result = Ok(());
        for s in &list.segments {
            let (Some(src), Some(dst)) = (&targets[s.src], &targets[s.dst]) else {
                continue;
            };
            let from = s.src_lba * BLOCK_SIZE + s.src_offset;
            let to = s.dst_lba * BLOCK_SIZE + s.dst_offset;
            result = copy_bytes(src.unit, from, dst.unit, to, s.bytes, tracking.as_ref()).await;
            if result.is_err() {
                break;
            }
            if let Some(t) = &tracking {
                t.progress(0, true);
            }
        }
        if let Some(t) = tracking {
            t.finish(result.is_ok());
        }
        result.map(|()| Bytes::new())
    }

    /// RECEIVE COPY RESULTS: COPY STATUS (00h) and OPERATING PARAMETERS (03h).
    pub(super) fn receive_copy_results(&self, ctx: &Ctx<'_>) -> CmdResult {
        let alloc = ctx.cdb.u32(10) as usize;
        let d = match ctx.cdb.service_action() {
            0x00 => {
                let list_id = ctx.cdb.u8(2);
                // A list identifier this nexus has no copy under (SPC-4 6.18.2).
                let Some(r) = self.copies.get(ctx.key, list_id) else {
                    return Err(Sense::invalid_cdb(2, None).into());
                };
                copy_status(&r)
            }
            0x03 => operating_parameters(),
            _ => return Err(Sense::invalid_cdb(1, Some(4)).into()),
        };
        Ok(truncate(d, alloc))
    }
}

/// Whether `bytes` from byte `offset` of block `lba` lie on a unit of `capacity` blocks
/// (a zero-length segment may name the block just past the end, not beyond).
fn segment_in_range(lba: u64, offset: u64, bytes: u64, capacity: u64) -> CmdResult<()> {
    check_range(lba, (offset + bytes).div_ceil(BLOCK_SIZE), capacity)
}

/// Reads `len` bytes at byte `at` of `unit` (whole blocks are read, the rest dropped).
async fn read_bytes(unit: &LogicalUnit, at: u64, len: u64) -> CmdResult<Bytes> {
    let first = at / BLOCK_SIZE * BLOCK_SIZE;
    let end = (at + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let data = unit.device.read(first, end - first).await.map_err(|e| copy_error(&e, Io::Read))?;
    if data.len() as u64 != end - first {
        tracing::warn!(got = data.len(), want = end - first, "device returned a short read");
        return Err(copy_error(&DeviceError::Io("short read".into()), Io::Read));
    }
    Ok(data.slice((at - first) as usize..(at - first + len) as usize))
}

/// Writes `data` at byte `at` of `unit`; blocks the data covers only in part keep the rest
/// of their bytes (read, patched, written back).
async fn write_bytes(unit: &LogicalUnit, at: u64, data: Bytes) -> CmdResult<()> {
    let len = data.len() as u64;
    let first = at / BLOCK_SIZE * BLOCK_SIZE;
    let end = (at + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let _shared = unit.atomic.read().await;
    let whole = if first == at && end == at + len {
        data
    } else {
        let current = read_bytes(unit, first, end - first).await?;
        let mut b = BytesMut::from(&current[..]);
        b[(at - first) as usize..(at - first + len) as usize].copy_from_slice(&data);
        b.freeze()
    };
    unit.device.write(first, whole).await.map_err(|e| copy_error(&e, Io::Write))
}

/// Copies `len` bytes from byte `from` of `src` to byte `to` of `dst`, a piece at a time.
/// Overlapping ranges of one unit are copied from the end when the destination lies
/// after the source, so every byte is read before it is overwritten.
async fn copy_bytes(
    src: &LogicalUnit,
    from: u64,
    dst: &LogicalUnit,
    to: u64,
    len: u64,
    tracking: Option<&Tracking<'_>>,
) -> CmdResult<()> {
    let backwards = std::ptr::eq(src, dst) && to > from && to < from + len;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(PIECE_BYTES);
        let at = if backwards { len - done - n } else { done };
        let data = read_bytes(src, from + at, n).await?;
        write_bytes(dst, to + at, data).await?;
        done += n;
        if let Some(t) = tracking {
            t.progress(n, false);
        }
    }
    Ok(())
}

/// COPY STATUS parameter data (LID1): status, segments processed, transfer count in the
/// smallest binary unit its 32 bits hold.
fn copy_status(r: &CopyRecord) -> Vec<u8> {
    let mut d = vec![0u8; 12];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    d[4] = match r.progress {
        Progress::Running => 0x00,
        Progress::Done => 0x01,
        Progress::Failed => 0x02,
    }; // HDD = 0: no data is ever held
    d[5..7].copy_from_slice(&r.segments.to_be_bytes());
    let (mut units, mut count) = (0u8, r.bytes);
    while count > u64::from(u32::MAX) {
        units += 1; // 01h KiB, 02h MiB, …
        count >>= 10;
    }
    d[7] = units;
    d[8..12].copy_from_slice(&(count as u32).to_be_bytes());
    d
}

/// Descriptor type codes we implement, segments first (OPERATING PARAMETERS and the
/// third-party copy VPD page).
const IMPLEMENTED: [u8; 3] = [SEG_BLOCK_TO_BLOCK, SEG_BLOCK_TO_BLOCK_OFFSETS, CSCD_IDENTIFICATION];

/// OPERATING PARAMETERS parameter data (SPC-4 6.18.4).
fn operating_parameters() -> Vec<u8> {
    let mut d = vec![0u8; 44];
    d[8..10].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
    d[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
    // Inline data, held data, stream transfers: none (bytes 20..32 stay zero).
    // Concurrent copies: not limited by the copy manager (the session's command window
    // is what bounds them).
    d[34..36].copy_from_slice(&u16::MAX.to_be_bytes());
    d[36] = u8::MAX;
    // Granularities (log2): segments of any byte count (0Ah), no inline or held data.
    d[37] = 0;
    d[38] = 0;
    d[39] = 0;
    d[43] = IMPLEMENTED.len() as u8;
    d.extend_from_slice(&IMPLEMENTED);
    let available = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&available.to_be_bytes());
    d
}

/// One third-party copy descriptor: type, length, body padded to a multiple of 4 bytes.
fn tpc_descriptor(out: &mut Vec<u8>, kind: u16, mut body: Vec<u8>) {
    body.resize(body.len().div_ceil(4) * 4, 0);
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
}

/// The body of the Third-party Copy VPD page (8Fh, SPC-4 7.8.17) for a copy manager that
/// implements EXTENDED COPY (LID1): supported commands, parameter data, supported
/// descriptors, supported CSCD IDs and general copy operations.
pub(super) fn third_party_copy_page() -> Vec<u8> {
    let mut p = Vec::new();
    // Supported Commands (0001h): EXTENDED COPY (LID1); RECEIVE COPY RESULTS with COPY
    // STATUS and OPERATING PARAMETERS.
    let commands = [0x83, 1, 0x00, 0x84, 2, 0x00, 0x03];
    let mut body = vec![commands.len() as u8];
    body.extend_from_slice(&commands);
    tpc_descriptor(&mut p, 0x0001, body);
    // Parameter Data (0004h).
    let mut body = vec![0u8; 28];
    body[4..6].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
    body[6..8].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    body[8..12].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
    // MAXIMUM INLINE DATA LENGTH (body 12..16) 0.
    tpc_descriptor(&mut p, 0x0004, body);
    // Supported Descriptors (0008h).
    let mut body = vec![IMPLEMENTED.len() as u8];
    body.extend_from_slice(&IMPLEMENTED);
    tpc_descriptor(&mut p, 0x0008, body);
    // Supported CSCD IDs (000Ch): none besides indexes into the list.
    tpc_descriptor(&mut p, 0x000C, vec![0, 0]);
    // General Copy Operations (8001h).
    let mut body = vec![0u8; 32];
    body[0..4].copy_from_slice(&u32::from(u16::MAX).to_be_bytes()); // TOTAL CONCURRENT COPIES
    body[4..8].copy_from_slice(&u32::from(u8::MAX).to_be_bytes()); // MAX IDENTIFIED CONCURRENT COPIES
    body[8..12].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
    // DATA SEGMENT GRANULARITY and INLINE DATA GRANULARITY (log2) 0: any byte count.
    tpc_descriptor(&mut p, 0x8001, body);
    p
}

#[cfg(test)]
mod tests;
