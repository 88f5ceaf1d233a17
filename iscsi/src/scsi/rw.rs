//! Block commands (SBC-3): READ, WRITE, WRITE AND VERIFY, VERIFY, SYNCHRONIZE CACHE,
//! PRE-FETCH, WRITE SAME, UNMAP, COMPARE AND WRITE, ORWRITE, READ CAPACITY, GET LBA STATUS
//! and READ DEFECT DATA.
//!
//! Every write path holds the unit's `atomic` lock shared, COMPARE AND WRITE and ORWRITE
//! hold it exclusively; reads do not take it (a read racing a write may see either, as on a disk).

use bytes::{Bytes, BytesMut};

use super::cdb::{be16, be32, be64, block_range, check_range, no_protection, truncate};
use super::sense::{device_error, CmdResult, Io, Sense};
use super::*;
use crate::lu::Extent;

/// Byte offset of the TRANSFER LENGTH field for each CDB size, for field pointers.
fn length_field(op: u8) -> u16 {
    match op >> 5 {
        0 => 4,
        1 | 2 => 7,
        5 => 6,
        _ => 10,
    }
}

/// The first `len` bytes of the Data-Out; fewer than the CDB implies is an error (extra
/// bytes are ignored: the transport reports them as residual).
fn data_out(ctx: &Ctx<'_>, len: u64) -> CmdResult<Bytes> {
    let len = usize::try_from(len).map_err(|_| Sense::short_data_out())?;
    if ctx.cmd.data_out.len() < len {
        return Err(Sense::short_data_out().into());
    }
    Ok(ctx.cmd.data_out.slice(..len))
}

/// Data-Out that must be exactly `len` bytes (WRITE SAME, COMPARE AND WRITE): a mismatch
/// means the initiator and we disagree about what the command is, so nothing is written.
fn exact_data_out(ctx: &Ctx<'_>, len: u64) -> CmdResult<Bytes> {
    if ctx.cmd.data_out.len() as u64 != len {
        return Err(Sense::short_data_out().into());
    }
    Ok(ctx.cmd.data_out.clone())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

impl LogicalUnit {
    /// Range check, then the MAXIMUM TRANSFER LENGTH we advertise in VPD 0xB0.
    fn check_transfer(&self, ctx: &Ctx<'_>, lba: u64, blocks: u64) -> CmdResult<()> {
        check_range(lba, blocks, self.blocks())?;
        if blocks > MAX_TRANSFER_BLOCKS {
            return Err(Sense::invalid_cdb(length_field(ctx.cdb.op()), None).into());
        }
        Ok(())
    }

    async fn read_blocks(&self, lba: u64, blocks: u64) -> CmdResult {
        let len = blocks * BLOCK_SIZE;
        let data = self
            .device
            .read(lba * BLOCK_SIZE, len)
            .await
            .map_err(|e| device_error(&e, Io::Read))?;
        if data.len() as u64 != len {
            tracing::warn!(got = data.len(), want = len, "device returned a short read");
            return Err(Sense::read_error().into());
        }
        Ok(data)
    }

    async fn write_blocks(&self, lba: u64, data: Bytes) -> CmdResult<()> {
        self.device.write(lba * BLOCK_SIZE, data).await.map_err(|e| device_error(&e, Io::Write))
    }

    /// READ(6/10/12/16). DPO and FUA need nothing: every read comes from durable storage.
    pub(super) async fn read(&self, ctx: &Ctx<'_>) -> CmdResult {
        let r = block_range(ctx.cdb, true);
        no_protection(&r)?;
        self.check_transfer(ctx, r.lba, r.blocks)?;
        if r.blocks == 0 {
            return Ok(Bytes::new());
        }
        self.read_blocks(r.lba, r.blocks).await
    }

    /// WRITE(6/10/12/16) and WRITE AND VERIFY(10/12/16). FUA is implied (no volatile cache);
    /// the verify step of WRITE AND VERIFY is the device's: a write it acknowledged is
    /// durable on every replica.
    ///
    /// An Expected Data Transfer Length below the CDB's length limits the write to the
    /// blocks the initiator sent (RFC 7143 11.4.5.1: the target transfers at most EDTL
    /// bytes; the transport reports the overflow residual); a partial block is refused.
    pub(super) async fn write(&self, ctx: &Ctx<'_>) -> CmdResult {
        let r = block_range(ctx.cdb, true);
        no_protection(&r)?;
        self.check_transfer(ctx, r.lba, r.blocks)?;
        let sent = ctx.cmd.data_out.len() as u64;
        let blocks = if sent < r.blocks * BLOCK_SIZE {
            if !sent.is_multiple_of(BLOCK_SIZE) {
                return Err(Sense::short_data_out().into());
            }
            sent / BLOCK_SIZE
        } else {
            r.blocks
        };
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        let data = data_out(ctx, blocks * BLOCK_SIZE)?;
        let _shared = self.atomic.read().await;
        self.write_blocks(r.lba, data).await?;
        Ok(Bytes::new())
    }

    /// VERIFY(10/12/16): BYTCHK 00b checks the blocks are readable, 01b compares them with the
    /// Data-Out, 11b compares each with the one block sent.
    pub(super) async fn verify(&self, ctx: &Ctx<'_>) -> CmdResult {
        let r = block_range(ctx.cdb, false);
        no_protection(&r)?;
        let bytchk = (r.flags >> 1) & 0x03;
        check_range(r.lba, r.blocks, self.blocks())?;
        if bytchk == 0b10 {
            return Err(Sense::invalid_cdb(1, Some(2)).into());
        }
        if r.blocks == 0 {
            return Ok(Bytes::new());
        }
        if bytchk == 0 {
            let mut lba = r.lba;
            let end = r.lba + r.blocks;
            while lba < end {
                let n = (end - lba).min(MAX_TRANSFER_BLOCKS);
                self.read_blocks(lba, n).await?;
                lba += n;
            }
            return Ok(Bytes::new());
        }
        if r.blocks > MAX_TRANSFER_BLOCKS {
            return Err(Sense::invalid_cdb(length_field(ctx.cdb.op()), None).into());
        }
        let expected = if bytchk == 0b01 {
            data_out(ctx, r.blocks * BLOCK_SIZE)?
        } else {
            let one = data_out(ctx, BLOCK_SIZE)?;
            let mut all = BytesMut::with_capacity((r.blocks * BLOCK_SIZE) as usize);
            for _ in 0..r.blocks {
                all.extend_from_slice(&one);
            }
            all.freeze()
        };
        let actual = self.read_blocks(r.lba, r.blocks).await?;
        if let Some(i) = first_difference(&actual, &expected) {
            return Err(Sense::miscompare(i as u64).into());
        }
        Ok(Bytes::new())
    }

    /// SYNCHRONIZE CACHE(10/16): nothing is cached here, but the device's flush is still
    /// called so a device that does buffer (a file, in tests) gets its barrier. IMMED is
    /// accepted and ignored: we answer when the flush is done.
    pub(super) async fn synchronize_cache(&self, ctx: &Ctx<'_>) -> CmdResult {
        let r = block_range(ctx.cdb, false);
        check_range(r.lba, r.blocks, self.blocks())?;
        self.device.flush().await.map_err(|e| device_error(&e, Io::Write))?;
        Ok(Bytes::new())
    }

    /// PRE-FETCH(10/16): there is no cache to load (every read comes from the replicas), so
    /// after the range check this is GOOD, which SBC-3 5.11 gives when the blocks will not
    /// be held in a cache (CONDITION MET would promise they are). IMMED changes nothing.
    pub(super) fn pre_fetch(&self, ctx: &Ctx<'_>) -> CmdResult {
        let r = block_range(ctx.cdb, false);
        check_range(r.lba, r.blocks, self.blocks())?;
        Ok(Bytes::new())
    }

    /// READ DEFECT DATA(10/12): a volume has no defects to list (bad replica blocks are
    /// repaired from the others, never remapped), so the answer is the header of an empty
    /// list in the format asked for, marked valid for the lists asked for. The 12-byte
    /// form's header adds a generation code (0: not supported) and a 4-byte length.
    pub(super) fn read_defect_data(&self, ctx: &Ctx<'_>) -> CmdResult {
        let cdb = ctx.cdb;
        let (flags, alloc, mut d) = if cdb.op() == 0x37 {
            (cdb.u8(2), usize::from(cdb.u16(7)), vec![0u8; 4])
        } else {
            (cdb.u8(1), cdb.u32(6) as usize, vec![0u8; 8])
        };
        // PLISTV and GLISTV echo REQ_PLIST and REQ_GLIST; the format echoes the request.
        d[1] = flags & 0x1F;
        Ok(truncate(d, alloc))
    }

    /// WRITE SAME(10/16): replicate one block, or deallocate when UNMAP is set, whatever
    /// the block holds (SBC-4 4.7.3.3: the device server may deallocate instead of writing;
    /// with LBPRZ = 1 the blocks then read as zeros, which initiators rely on). NDOB (16
    /// only) means a block of zeros without Data-Out.
    pub(super) async fn write_same(&self, ctx: &Ctx<'_>) -> CmdResult {
        let r = block_range(ctx.cdb, false);
        no_protection(&r)?;
        if r.flags & 0x10 != 0 {
            // ANCHOR: no anchored state (ANC_SUP = 0).
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        let unmap = r.flags & 0x08 != 0;
        let ndob = ctx.cdb.op() == 0x93 && r.flags & 0x01 != 0;
        let capacity = self.blocks();
        // WSNZ = 0: a length of zero means "to the end of the unit".
        let blocks = if r.blocks == 0 {
            capacity.checked_sub(r.lba).ok_or(Sense::lba_out_of_range())?
        } else {
            r.blocks
        };
        if blocks > MAX_WRITE_SAME_BLOCKS {
            return Err(Sense::invalid_cdb(length_field(ctx.cdb.op()), None).into());
        }
        check_range(r.lba, blocks, capacity)?;
        let block = if ndob {
            Bytes::from(vec![0u8; BLOCK_SIZE as usize])
        } else {
            exact_data_out(ctx, BLOCK_SIZE)?
        };
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        let _shared = self.atomic.read().await;
        if unmap {
            self.device
                .unmap(r.lba * BLOCK_SIZE, blocks * BLOCK_SIZE)
                .await
                .map_err(|e| device_error(&e, Io::Write))?;
            return Ok(Bytes::new());
        }
        let chunk_blocks = blocks.min(MAX_TRANSFER_BLOCKS);
        let mut chunk = BytesMut::with_capacity((chunk_blocks * BLOCK_SIZE) as usize);
        for _ in 0..chunk_blocks {
            chunk.extend_from_slice(&block);
        }
        let chunk = chunk.freeze();
        let mut lba = r.lba;
        let end = r.lba + blocks;
        while lba < end {
            let n = (end - lba).min(chunk_blocks);
            self.write_blocks(lba, chunk.slice(..(n * BLOCK_SIZE) as usize)).await?;
            lba += n;
        }
        Ok(Bytes::new())
    }

    /// UNMAP: every descriptor is validated before anything is deallocated, so a bad list
    /// changes nothing.
    pub(super) async fn unmap(&self, ctx: &Ctx<'_>) -> CmdResult {
        if ctx.cdb.u8(1) & 0x01 != 0 {
            return Err(Sense::invalid_cdb(1, Some(0)).into()); // ANCHOR
        }
        let plen = usize::from(ctx.cdb.u16(7));
        if plen == 0 {
            return Ok(Bytes::new());
        }
        if plen < 8 {
            return Err(Sense::param_list_length().into());
        }
        let list = data_out(ctx, plen as u64)?;
        let data_len = usize::from(be16(&list, 0));
        let desc_len = usize::from(be16(&list, 2));
        // Both lengths describe bytes that must actually follow in the list.
        if data_len + 2 > plen || desc_len + 8 > plen {
            return Err(Sense::param_list_length().into());
        }
        // A trailing partial descriptor is ignored (SBC-3 5.28.2).
        let count = desc_len / 16;
        if count > MAX_UNMAP_DESCRIPTORS {
            return Err(Sense::invalid_param(2, None).into());
        }
        let capacity = self.blocks();
        let mut ranges = Vec::with_capacity(count);
        let mut total = 0u64;
        for i in 0..count {
            let at = 8 + 16 * i;
            let lba = be64(&list, at);
            let n = u64::from(be32(&list, at + 8));
            total += n;
            if n > MAX_UNMAP_BLOCKS || total > MAX_UNMAP_BLOCKS {
                return Err(Sense::invalid_param((at + 8) as u16, None).into());
            }
            check_range(lba, n, capacity)?;
            if n > 0 {
                ranges.push((lba, n));
            }
        }
        let _shared = self.atomic.read().await;
        for (lba, n) in ranges {
            self.device
                .unmap(lba * BLOCK_SIZE, n * BLOCK_SIZE)
                .await
                .map_err(|e| device_error(&e, Io::Write))?;
        }
        Ok(Bytes::new())
    }

    /// COMPARE AND WRITE: Data-Out is the verify data then the write data, N blocks each.
    pub(super) async fn compare_and_write(&self, ctx: &Ctx<'_>) -> CmdResult {
        let flags = ctx.cdb.u8(1);
        if flags & 0xE0 != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)).into()); // WRPROTECT
        }
        let lba = ctx.cdb.u64(2);
        let blocks = u64::from(ctx.cdb.u8(13));
        if blocks > MAX_COMPARE_AND_WRITE_BLOCKS {
            return Err(Sense::invalid_cdb(13, None).into());
        }
        check_range(lba, blocks, self.blocks())?;
        // Zero blocks: nothing compared or written, not an error (SBC-3 5.2) — unless
        // Data-Out came with it: then the initiator meant more blocks than the 8-bit field
        // holds (256 wraps to 0), and the field is what is wrong.
        if blocks == 0 {
            if !ctx.cmd.data_out.is_empty() {
                return Err(Sense::invalid_cdb(13, None).into());
            }
            return Ok(Bytes::new());
        }
        let len = blocks * BLOCK_SIZE;
        let data = exact_data_out(ctx, 2 * len)?;
        let (verify, new) = (data.slice(..len as usize), data.slice(len as usize..));
        let _exclusive = self.atomic.write().await;
        let current = self.read_blocks(lba, blocks).await?;
        if let Some(i) = first_difference(&current, &verify) {
            return Err(Sense::miscompare(i as u64).into());
        }
        self.write_blocks(lba, new).await?;
        Ok(Bytes::new())
    }

    /// ORWRITE(16): each block becomes the bitwise OR of what it holds and the Data-Out
    /// (SBC-3 5.10), read and written under the exclusive lock, as COMPARE AND WRITE, so no
    /// other write lands between the two.
    pub(super) async fn or_write(&self, ctx: &Ctx<'_>) -> CmdResult {
        let r = block_range(ctx.cdb, false);
        no_protection(&r)?;
        self.check_transfer(ctx, r.lba, r.blocks)?;
        if r.blocks == 0 {
            return Ok(Bytes::new());
        }
        let operand = data_out(ctx, r.blocks * BLOCK_SIZE)?;
        let _exclusive = self.atomic.write().await;
        let current = self.read_blocks(r.lba, r.blocks).await?;
        let mut merged = BytesMut::from(&current[..]);
        for (m, o) in merged.iter_mut().zip(operand.iter()) {
            *m |= *o;
        }
        self.write_blocks(r.lba, merged.freeze()).await?;
        Ok(Bytes::new())
    }

    /// READ CAPACITY(10): FFFFFFFFh tells the initiator to use READ CAPACITY(16).
    pub(super) fn read_capacity10(&self, ctx: &Ctx<'_>) -> CmdResult {
        let pmi = ctx.cdb.u8(8) & 0x01 != 0;
        if !pmi && ctx.cdb.u32(2) != 0 {
            return Err(Sense::invalid_cdb(2, None).into());
        }
        let last = self.blocks().saturating_sub(1);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
        Ok(d.into())
    }

    /// READ CAPACITY(16): also reports the physical block exponent and thin provisioning
    /// (LBPME) with zeroed deallocated blocks (LBPRZ).
    pub(super) fn read_capacity16(&self, ctx: &Ctx<'_>) -> CmdResult {
        let alloc = ctx.cdb.u32(10) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
        d[13] = LBPPBE;
        d[14] = 0x80 | 0x40; // LBPME, LBPRZ; lowest aligned LBA 0
        Ok(truncate(d, alloc))
    }

    /// GET LBA STATUS: the allocation of up to [`LBA_STATUS_SPAN`] blocks from the starting
    /// LBA, as the device reports it (one mapped extent when it cannot tell). The first
    /// descriptor starts at the starting LBA (SBC-4 5.9.2); as many descriptors as the
    /// allocation length holds are returned.
    pub(super) async fn get_lba_status(&self, ctx: &Ctx<'_>) -> CmdResult {
        let lba = ctx.cdb.u64(2);
        let alloc = ctx.cdb.u32(10) as usize;
        let capacity = self.blocks();
        if lba >= capacity {
            return Err(Sense::lba_out_of_range().into());
        }
        let span = (capacity - lba).min(LBA_STATUS_SPAN);
        let extents = self
            .device
            .allocation(lba * BLOCK_SIZE, span * BLOCK_SIZE)
            .await
            .map_err(|e| device_error(&e, Io::Read))?;
        let extents = lba_extents(lba, span, extents.unwrap_or_default());
        let room = (alloc.saturating_sub(8) / 16).max(1);
        let mut d = vec![0u8; 8];
        for (start, n, mapped) in extents.into_iter().take(room) {
            let mut desc = [0u8; 16];
            desc[0..8].copy_from_slice(&start.to_be_bytes());
            desc[8..12].copy_from_slice(&(n as u32).to_be_bytes());
            desc[12] = if mapped { 0x00 } else { 0x01 }; // mapped / deallocated
            d.extend_from_slice(&desc);
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        Ok(truncate(d, alloc))
    }
}

/// Blocks one GET LBA STATUS looks at (512 MiB): bounds what it costs to answer.
const LBA_STATUS_SPAN: u64 = 1 << 20;

/// Device extents (bytes) as LBA status runs `(lba, blocks, mapped)` covering exactly
/// `[lba, lba + span)`: a block is deallocated only if the device says all of it is, gaps
/// and anything the device did not describe count as mapped, neighbours of the same
/// status merge.
fn lba_extents(lba: u64, span: u64, extents: Vec<Extent>) -> Vec<(u64, u64, bool)> {
    let end = lba + span;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |start: u64, stop: u64, mapped: bool| {
        if start >= stop {
            return;
        }
        match runs.last_mut() {
            Some(r) if r.2 == mapped && r.0 + r.1 == start => r.1 += stop - start,
            _ => runs.push((start, stop - start, mapped)),
        }
    };
    let mut at = lba;
    for e in extents {
        let e_end = e.offset.saturating_add(e.len);
        // Deallocated: only whole blocks; mapped: every block touched.
        let (first, last) = if e.mapped {
            (e.offset / BLOCK_SIZE, e_end.div_ceil(BLOCK_SIZE))
        } else {
            (e.offset.div_ceil(BLOCK_SIZE), e_end / BLOCK_SIZE)
        };
        let (first, last) = (first.max(at), last.min(end));
        if first >= last {
            continue;
        }
        push(at, first, true);
        push(first, last, e.mapped);
        at = last;
    }
    push(at, end, true);
    runs
}
