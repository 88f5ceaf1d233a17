//! CDB decoding: big-endian fields, and the LBA/length layout shared by the READ, WRITE,
//! VERIFY, WRITE SAME and SYNCHRONIZE CACHE families.
//!
//! Every accessor is bounds-checked: the dispatcher already made sure the CDB is as long as
//! its opcode's table entry says, but a short CDB must never panic the target.

use super::sense::{CmdResult, Sense};

/// A CDB whose length the dispatcher has checked against the opcode table.
#[derive(Clone, Copy, Debug)]
pub struct Cdb<'a>(pub &'a [u8]);

impl<'a> Cdb<'a> {
    pub fn op(&self) -> u8 {
        self.u8(0)
    }
    pub fn u8(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }
    /// `width` bytes from `at`, big-endian (missing bytes read as zero).
    fn be(&self, at: usize, width: usize) -> u64 {
        (at..at + width).fold(0u64, |acc, i| (acc << 8) | u64::from(self.u8(i)))
    }
    pub fn u16(&self, at: usize) -> u16 {
        self.be(at, 2) as u16
    }
    pub fn u24(&self, at: usize) -> u32 {
        self.be(at, 3) as u32
    }
    pub fn u32(&self, at: usize) -> u32 {
        self.be(at, 4) as u32
    }
    pub fn u64(&self, at: usize) -> u64 {
        self.be(at, 8)
    }
    /// The service action, bits 4..0 of byte 1, for opcodes that have one.
    pub fn service_action(&self) -> u8 {
        self.u8(1) & 0x1F
    }
}

/// Big-endian readers for parameter lists (data-out), which carry their own lengths.
pub fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}
pub fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}
pub fn be64(b: &[u8], at: usize) -> u64 {
    match b.get(at..at + 8) {
        Some(s) => u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
        None => 0,
    }
}

/// Where the LBA, the transfer length and the flags byte sit in a block command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub lba: u64,
    /// In logical blocks, after the command's own zero rule (READ(6) 0 = 256).
    pub blocks: u64,
    /// Byte 1 (protection field, DPO, FUA, BYTCHK, UNMAP…); 0 for the 6-byte forms.
    pub flags: u8,
}

/// Decodes LBA and length by CDB size: 6 (21-bit LBA, 8-bit length), 10 (32/16), 12 (32/32)
/// and 16 (64/32) bytes. The length field position is the same for every command of a size
/// except COMPARE AND WRITE (its own decoder).
pub fn block_range(cdb: Cdb<'_>, zero_len_is_256: bool) -> BlockRange {
    match cdb.op() >> 5 {
        0 => {
            let lba = u64::from(cdb.u24(1) & 0x1F_FFFF);
            let n = u64::from(cdb.u8(4));
            let blocks = if n == 0 && zero_len_is_256 { 256 } else { n };
            BlockRange { lba, blocks, flags: 0 }
        }
        1 | 2 => BlockRange {
            lba: u64::from(cdb.u32(2)),
            blocks: u64::from(cdb.u16(7)),
            flags: cdb.u8(1),
        },
        5 => BlockRange {
            lba: u64::from(cdb.u32(2)),
            blocks: u64::from(cdb.u32(6)),
            flags: cdb.u8(1),
        },
        _ => BlockRange { lba: cdb.u64(2), blocks: u64::from(cdb.u32(10)), flags: cdb.u8(1) },
    }
}

/// Rejects a non-zero RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT field (bits 7..5 of byte
/// 1): the unit has no protection information (PROTECT = 0 in INQUIRY), and SBC-3 says such
/// a unit terminates those commands with INVALID FIELD IN CDB.
pub fn no_protection(r: &BlockRange) -> CmdResult<()> {
    if r.flags & 0xE0 != 0 {
        return Err(Sense::invalid_cdb(1, Some(7)).into());
    }
    Ok(())
}

/// Checks that `[lba, lba + blocks)` lies on a unit of `capacity` blocks, overflow included.
pub fn check_range(lba: u64, blocks: u64, capacity: u64) -> CmdResult<()> {
    match lba.checked_add(blocks) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Sense::lba_out_of_range().into()),
    }
}

/// Truncates response data to the CDB's ALLOCATION LENGTH: a short allocation length is
/// never an error (SPC-4 4.2.5.6), the initiator just gets the first bytes.
pub fn truncate(mut data: Vec<u8>, alloc: usize) -> bytes::Bytes {
    data.truncate(alloc);
    data.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read6_zero_length_means_256_blocks_and_lba_is_21_bits() {
        let cdb = [0x08, 0xFF, 0x12, 0x34, 0, 0];
        let r = block_range(Cdb(&cdb), true);
        assert_eq!(r.lba, 0x1F_1234);
        assert_eq!(r.blocks, 256);
        let r = block_range(Cdb(&cdb), false);
        assert_eq!(r.blocks, 0);
    }

    #[test]
    fn sixteen_byte_layout() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[1] = 0x08;
        cdb[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&9u32.to_be_bytes());
        let r = block_range(Cdb(&cdb), false);
        assert_eq!((r.lba, r.blocks, r.flags), (0x0102_0304_0506_0708, 9, 0x08));
    }

    #[test]
    fn range_overflow_is_out_of_range() {
        assert!(check_range(u64::MAX, 2, 100).is_err());
        assert!(check_range(99, 1, 100).is_ok());
        assert!(check_range(100, 0, 100).is_ok());
        assert!(check_range(101, 0, 100).is_err());
    }
}
