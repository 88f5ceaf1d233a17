//! The table of supported commands: what each opcode (and service action) is, how a
//! persistent reservation restricts it, whether it touches the medium, and its CDB usage
//! map for REPORT SUPPORTED OPERATION CODES. The dispatcher and RSOC both read this table,
//! so what we report is exactly what we execute.

/// A command the unit executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    TestUnitReady,
    RequestSense,
    Read,
    Write,
    Inquiry,
    ModeSelect,
    ModeSense,
    StartStopUnit,
    PreventAllowMediumRemoval,
    ReadCapacity10,
    WriteAndVerify,
    Verify,
    SynchronizeCache,
    WriteSame,
    Unmap,
    PersistentReserveIn,
    PersistentReserveOut,
    CompareAndWrite,
    ReadCapacity16,
    GetLbaStatus,
    ReportLuns,
    ReportTargetPortGroups,
    ReportSupportedOpcodes,
    ReportSupportedTmfs,
    PreFetch,
    ReadDefectData,
    OrWrite,
    Reserve,
    Release,
    ExtendedCopy,
    ReceiveCopyResults,
}

impl Cmd {
    /// Whether the command writes the medium of the unit it is sent to (refused while the
    /// unit is software write protected). EXTENDED COPY writes only its destination, which
    /// the copy manager checks as a WRITE(16) from the same nexus.
    pub fn writes_medium(self) -> bool {
        matches!(self, Cmd::Write | Cmd::WriteAndVerify | Cmd::WriteSame | Cmd::Unmap | Cmd::CompareAndWrite | Cmd::OrWrite)
    }
}

/// How a command fares when another I_T nexus holds a persistent reservation (SPC-4
/// 5.12.2 table 62 and SBC-3 4.17 table 13, reduced to the commands we implement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed under every reservation (INQUIRY, REPORT LUNS, PR IN, …).
    Always,
    /// Allowed under the Write Exclusive types, conflicts under Exclusive Access ones.
    Read,
    /// Conflicts under every type unless the nexus may write.
    Write,
    /// PERSISTENT RESERVE OUT: its own rules (registration and key checks in `pr`).
    PrOut,
}

pub struct OpInfo {
    pub op: u8,
    /// Service action (byte 1 bits 4..0) for opcodes that have them.
    pub sa: Option<u8>,
    pub cmd: Cmd,
    pub access: Access,
    /// Accesses the medium: refused when the port's ALUA group is not active.
    pub medium: bool,
    /// CDB USAGE DATA (SPC-4 6.35.3): byte 0 the opcode, then a bit set for every CDB bit
    /// we evaluate; service action bits hold the service action itself. Its length is the
    /// CDB length.
    pub usage: &'static [u8],
}

const fn op(
    op: u8,
    sa: Option<u8>,
    cmd: Cmd,
    access: Access,
    medium: bool,
    usage: &'static [u8],
) -> OpInfo {
    OpInfo { op, sa, cmd, access, medium, usage }
}

use Access::{Always, PrOut, Read, Write};

/// NACA is the only CONTROL byte bit we look at (and refuse: no ACA support).
const C: u8 = 0x04;
const FF: u8 = 0xFF;

#[rustfmt::skip]
pub static OPS: &[OpInfo] = &[
    op(0x00, None, Cmd::TestUnitReady, Always, false, &[0x00, 0, 0, 0, 0, C]),
    op(0x03, None, Cmd::RequestSense, Always, false, &[0x03, 0x01, 0, 0, FF, C]),
    op(0x08, None, Cmd::Read, Read, true, &[0x08, 0x1F, FF, FF, FF, C]),
    op(0x0A, None, Cmd::Write, Write, true, &[0x0A, 0x1F, FF, FF, FF, C]),
    op(0x12, None, Cmd::Inquiry, Always, false, &[0x12, 0x01, FF, FF, FF, C]),
    op(0x15, None, Cmd::ModeSelect, Write, false, &[0x15, 0x11, 0, 0, FF, C]),
    op(0x16, None, Cmd::Reserve, Always, false, &[0x16, 0x11, 0, 0, 0, C]),
    op(0x17, None, Cmd::Release, Always, false, &[0x17, 0x11, 0, 0, 0, C]),
    op(0x1A, None, Cmd::ModeSense, Read, false, &[0x1A, 0x08, FF, FF, FF, C]),
    op(0x1B, None, Cmd::StartStopUnit, Always, false, &[0x1B, 0x01, 0, 0x0F, 0xF7, C]),
    op(0x1E, None, Cmd::PreventAllowMediumRemoval, Always, false, &[0x1E, 0, 0, 0, 0x03, C]),
    op(0x25, None, Cmd::ReadCapacity10, Always, false, &[0x25, 0, FF, FF, FF, FF, 0, 0, 0x01, C]),
    op(0x28, None, Cmd::Read, Read, true, &[0x28, 0xF8, FF, FF, FF, FF, 0, FF, FF, C]),
    op(0x2A, None, Cmd::Write, Write, true, &[0x2A, 0xF8, FF, FF, FF, FF, 0, FF, FF, C]),
    op(0x2E, None, Cmd::WriteAndVerify, Write, true, &[0x2E, 0xF6, FF, FF, FF, FF, 0, FF, FF, C]),
    op(0x2F, None, Cmd::Verify, Read, true, &[0x2F, 0xF6, FF, FF, FF, FF, 0, FF, FF, C]),
    op(0x34, None, Cmd::PreFetch, Read, true, &[0x34, 0x02, FF, FF, FF, FF, 0, FF, FF, C]),
    op(0x35, None, Cmd::SynchronizeCache, Write, true, &[0x35, 0x02, FF, FF, FF, FF, 0, FF, FF, C]),
    op(0x37, None, Cmd::ReadDefectData, Read, true, &[0x37, 0, 0x1F, 0, 0, 0, 0, FF, FF, C]),
    op(0x41, None, Cmd::WriteSame, Write, true, &[0x41, 0xF8, FF, FF, FF, FF, 0, FF, FF, C]),
    op(0x42, None, Cmd::Unmap, Write, true, &[0x42, 0x01, 0, 0, 0, 0, 0, FF, FF, C]),
    op(0x55, None, Cmd::ModeSelect, Write, false, &[0x55, 0x11, 0, 0, 0, 0, 0, FF, FF, C]),
    op(0x56, None, Cmd::Reserve, Always, false, &[0x56, 0x13, 0, 0, 0, 0, 0, 0, 0, C]),
    op(0x57, None, Cmd::Release, Always, false, &[0x57, 0x13, 0, 0, 0, 0, 0, 0, 0, C]),
    op(0x5A, None, Cmd::ModeSense, Read, false, &[0x5A, 0x18, FF, FF, 0, 0, 0, FF, FF, C]),
    op(0x5E, Some(0x00), Cmd::PersistentReserveIn, Always, false, &[0x5E, 0x00, 0, 0, 0, 0, 0, FF, FF, C]),
    op(0x5E, Some(0x01), Cmd::PersistentReserveIn, Always, false, &[0x5E, 0x01, 0, 0, 0, 0, 0, FF, FF, C]),
    op(0x5E, Some(0x02), Cmd::PersistentReserveIn, Always, false, &[0x5E, 0x02, 0, 0, 0, 0, 0, FF, FF, C]),
    op(0x5E, Some(0x03), Cmd::PersistentReserveIn, Always, false, &[0x5E, 0x03, 0, 0, 0, 0, 0, FF, FF, C]),
    op(0x5F, Some(0x00), Cmd::PersistentReserveOut, PrOut, false, &[0x5F, 0x00, FF, 0, 0, FF, FF, FF, FF, C]),
    op(0x5F, Some(0x01), Cmd::PersistentReserveOut, PrOut, false, &[0x5F, 0x01, FF, 0, 0, FF, FF, FF, FF, C]),
    op(0x5F, Some(0x02), Cmd::PersistentReserveOut, PrOut, false, &[0x5F, 0x02, FF, 0, 0, FF, FF, FF, FF, C]),
    op(0x5F, Some(0x03), Cmd::PersistentReserveOut, PrOut, false, &[0x5F, 0x03, FF, 0, 0, FF, FF, FF, FF, C]),
    op(0x5F, Some(0x04), Cmd::PersistentReserveOut, PrOut, false, &[0x5F, 0x04, FF, 0, 0, FF, FF, FF, FF, C]),
    op(0x5F, Some(0x05), Cmd::PersistentReserveOut, PrOut, false, &[0x5F, 0x05, FF, 0, 0, FF, FF, FF, FF, C]),
    op(0x5F, Some(0x06), Cmd::PersistentReserveOut, PrOut, false, &[0x5F, 0x06, FF, 0, 0, FF, FF, FF, FF, C]),
    // EXTENDED COPY (LID1): a write as far as reservations go on the unit it is sent to;
    // `xcopy` checks every copy source (read) and destination (write) the same way.
    op(0x83, Some(0x00), Cmd::ExtendedCopy, Write, true, &[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, C]),
    // RECEIVE COPY RESULTS: reports only the copy manager's limits and the nexus's own
    // copies, never medium data.
    op(0x84, Some(0x00), Cmd::ReceiveCopyResults, Always, false, &[0x84, 0x00, FF, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, C]),
    op(0x84, Some(0x03), Cmd::ReceiveCopyResults, Always, false, &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, C]),
    op(0x88, None, Cmd::Read, Read, true, &[0x88, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x89, None, Cmd::CompareAndWrite, Write, true, &[0x89, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, C]),
    op(0x8A, None, Cmd::Write, Write, true, &[0x8A, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x8B, None, Cmd::OrWrite, Write, true, &[0x8B, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x8E, None, Cmd::WriteAndVerify, Write, true, &[0x8E, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x8F, None, Cmd::Verify, Read, true, &[0x8F, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x90, None, Cmd::PreFetch, Read, true, &[0x90, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x91, None, Cmd::SynchronizeCache, Write, true, &[0x91, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x93, None, Cmd::WriteSame, Write, true, &[0x93, 0xF9, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0x9E, Some(0x10), Cmd::ReadCapacity16, Always, false, &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, C]),
    op(0x9E, Some(0x12), Cmd::GetLbaStatus, Read, true, &[0x9E, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0xA0, None, Cmd::ReportLuns, Always, false, &[0xA0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, C]),
    op(0xA3, Some(0x0A), Cmd::ReportTargetPortGroups, Always, false, &[0xA3, 0xEA, 0, 0, 0, 0, FF, FF, FF, FF, 0, C]),
    op(0xA3, Some(0x0C), Cmd::ReportSupportedOpcodes, Always, false, &[0xA3, 0x0C, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0xA3, Some(0x0D), Cmd::ReportSupportedTmfs, Always, false, &[0xA3, 0x0D, 0x80, 0, 0, 0, FF, FF, FF, FF, 0, C]),
    op(0xA8, None, Cmd::Read, Read, true, &[0xA8, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0xAA, None, Cmd::Write, Write, true, &[0xAA, 0xF8, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0xAE, None, Cmd::WriteAndVerify, Write, true, &[0xAE, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0xAF, None, Cmd::Verify, Read, true, &[0xAF, 0xF6, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
    op(0xB7, None, Cmd::ReadDefectData, Read, true, &[0xB7, 0x1F, FF, FF, FF, FF, FF, FF, FF, FF, 0, C]),
];

/// Whether `op` is an opcode whose commands are told apart by a service action.
pub fn has_service_actions(op: u8) -> bool {
    OPS.iter().any(|o| o.op == op && o.sa.is_some())
}

pub enum Lookup {
    Found(&'static OpInfo),
    /// The opcode exists but not with this service action: INVALID FIELD IN CDB on byte 1.
    BadServiceAction,
    Unknown,
}

pub fn lookup(op: u8, sa: u8) -> Lookup {
    if has_service_actions(op) {
        match OPS.iter().find(|o| o.op == op && o.sa == Some(sa)) {
            Some(o) => Lookup::Found(o),
            None => Lookup::BadServiceAction,
        }
    } else {
        match OPS.iter().find(|o| o.op == op) {
            Some(o) => Lookup::Found(o),
            None => Lookup::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_maps_are_well_formed() {
        for o in OPS {
            assert_eq!(o.usage[0], o.op, "opcode {:#x}", o.op);
            let want = match o.op >> 5 {
                0 => 6,
                1 | 2 => 10,
                4 => 16,
                5 => 12,
                g => panic!("group {g}"),
            };
            assert_eq!(o.usage.len(), want, "opcode {:#x}", o.op);
            if let Some(sa) = o.sa {
                assert_eq!(o.usage[1] & 0x1F, sa, "opcode {:#x}", o.op);
            }
        }
    }
}
