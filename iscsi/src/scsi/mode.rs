//! MODE SENSE and MODE SELECT (SPC-4 6.11-6.14, 7.5; SBC-3 6.5).
//!
//! One field can change: SWP (software write protect) in the Control page, the unit's
//! write protection that `sdparm --set SWP` and libiscsi's `iscsi-swp` turn on and off.
//! It lives with the reservations in the unit's shared record, so it is one value on
//! every node serving the unit. It stays set across unit resets and restarts until a MODE
//! SELECT clears it, as tgt's does: multipath initiators reset units when they fail over,
//! and a write protection an administrator set must not drop with that. Everything else is fixed: the
//! changeable mask is zero elsewhere, defaults equal the values with SWP clear, and there
//! are no saved pages. MODE SELECT accepts a page when it repeats the current values in
//! every field that cannot change, which is what `sdparm --set` round trips and the Linux
//! sd driver's cache-type probe need.

use super::cdb::{be16, be32, be64, truncate};
use super::sense::{CmdResult, Sense};
use super::*;

/// The pages we have, in ascending page code order (how "all pages" lists them).
const PAGE_CODES: [u8; 4] = [0x01, 0x08, 0x0A, 0x1C];

/// Byte and bit of SWP in the Control page (SPC-4 7.5.8).
const SWP_BYTE: usize = 4;
const SWP_BIT: u8 = 0x08;

/// Current contents of a page, header included, with SWP as given (the defaults have it
/// clear).
fn page(code: u8, swp: bool) -> Option<Vec<u8>> {
    let p = match code {
        // Read-write error recovery: no retries to tune; all zeros.
        0x01 => {
            let mut p = vec![0u8; 12];
            p[0] = 0x01;
            p[1] = 0x0A;
            p
        }
        // Caching: WCE = 0 (every acknowledged write is durable), read cache allowed.
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            p
        }
        // Control: QUEUE ALGORITHM MODIFIER 1 (commands run concurrently, unordered),
        // fixed-format sense (D_SENSE 0), no ACA; SWP as the unit has it.
        0x0A => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0A;
            p[1] = 0x0A;
            p[3] = 0x10;
            if swp {
                p[SWP_BYTE] |= SWP_BIT;
            }
            p
        }
        // Informational exceptions control: DEXCPT, we never report failure predictions.
        0x1C => {
            let mut p = vec![0u8; 12];
            p[0] = 0x1C;
            p[1] = 0x0A;
            p[2] = 0x08;
            p
        }
        _ => return None,
    };
    Some(p)
}

/// The changeable-values mask of a page: header, then zeros but for SWP.
fn changeable(code: u8) -> Option<Vec<u8>> {
    page(code, false).map(|mut p| {
        p[2..].fill(0);
        if code == 0x0A {
            p[SWP_BYTE] = SWP_BIT;
        }
        p
    })
}

/// DEVICE-SPECIFIC PARAMETER: DPOFUA = 1 (DPO and FUA are accepted on reads and writes;
/// libiscsi checks the two agree), and WP (bit 7) while SWP is set (SBC-3 6.5.2).
const DEVICE_SPECIFIC: u8 = 0x10;
const WP: u8 = 0x80;

impl LogicalUnit {
    pub(super) async fn mode_sense(&self, ctx: &Ctx<'_>) -> CmdResult {
        let cdb = ctx.cdb;
        let ten = cdb.op() == 0x5A;
        let dbd = cdb.u8(1) & 0x08 != 0;
        let llbaa = ten && cdb.u8(1) & 0x10 != 0;
        let pc = cdb.u8(2) >> 6;
        let code = cdb.u8(2) & 0x3F;
        let subpage = cdb.u8(3);
        let alloc = if ten { usize::from(cdb.u16(7)) } else { usize::from(cdb.u8(4)) };
        if pc == 3 {
            return Err(Sense::saving_not_supported().into());
        }
        // We have no subpages; 0xFF ("all subpages") is valid with "all pages" only.
        if subpage != 0 && !(code == 0x3F && subpage == 0xFF) {
            return Err(Sense::invalid_cdb(3, None).into());
        }
        let swp = self.load_reservations().await?.0.software_write_protect;
        // Defaults (PC 2) have SWP clear; current values (PC 0) show it as set.
        let get = |c: u8| match pc {
            1 => changeable(c),
            2 => page(c, false),
            _ => page(c, swp),
        };
        // WP: write protected by SWP, or by a read-only LUN.
        let device_specific = if swp || ctx.read_only { DEVICE_SPECIFIC | WP } else { DEVICE_SPECIFIC };
        let mut pages = Vec::new();
        if code == 0x3F {
            for c in PAGE_CODES {
                pages.extend(get(c).unwrap_or_default());
            }
        } else {
            pages.extend(get(code).ok_or(Sense::invalid_cdb(2, Some(5)))?);
        }

        let blocks = self.blocks();
        let descriptor = if dbd {
            Vec::new()
        } else if llbaa {
            let mut d = vec![0u8; 16];
            d[0..8].copy_from_slice(&blocks.to_be_bytes());
            d[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
            d
        } else {
            // Short descriptor: FFFFFFFFh blocks means "too many to say here".
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            d[5..8].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes()[1..]);
            d
        };

        let mut out = if ten {
            let mut h = vec![0u8; 8];
            h[3] = device_specific;
            h[4] = u8::from(llbaa && !dbd);
            h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, device_specific, descriptor.len() as u8]
        };
        out.extend(descriptor);
        out.extend(pages);
        // MODE DATA LENGTH excludes itself.
        if ten {
            let n = (out.len() - 2) as u16;
            out[0..2].copy_from_slice(&n.to_be_bytes());
        } else {
            out[0] = (out.len() - 1) as u8;
        }
        Ok(truncate(out, alloc))
    }

    /// MODE SELECT: validated against the current values; SWP may change (stored, then
    /// MODE PARAMETERS CHANGED for every other nexus, SPC-4 7.5.2).
    pub(super) async fn mode_select(&self, ctx: &Ctx<'_>) -> CmdResult {
        let cdb = ctx.cdb;
        let ten = cdb.op() == 0x55;
        if cdb.u8(1) & 0x01 != 0 {
            return Err(Sense::invalid_cdb(1, Some(0)).into()); // SP: nothing to save
        }
        let plen = if ten { usize::from(cdb.u16(7)) } else { usize::from(cdb.u8(4)) };
        if plen == 0 {
            return Ok(bytes::Bytes::new());
        }
        let header = if ten { 8 } else { 4 };
        if plen < header || ctx.cmd.data_out.len() < plen {
            return Err(Sense::param_list_length().into());
        }
        let list = &ctx.cmd.data_out[..plen];
        let (medium, bdl) = if ten {
            (list[2], usize::from(be16(list, 6)))
        } else {
            (list[1], usize::from(list[3]))
        };
        if medium != 0 {
            return Err(Sense::invalid_param(if ten { 2 } else { 1 }, None).into());
        }
        let long = ten && list[4] & 0x01 != 0;
        if header + bdl > plen {
            return Err(Sense::param_list_length().into());
        }
        // Block descriptors may only restate the block size (and 0 or the real count).
        let desc_len = if long { 16 } else { 8 };
        if bdl % desc_len != 0 {
            return Err(Sense::invalid_param(if ten { 6 } else { 3 }, None).into());
        }
        for at in (header..header + bdl).step_by(desc_len) {
            let d = &list[at..at + desc_len];
            let (count, size) = if long {
                (be64(d, 0), be32(d, 12))
            } else {
                (u64::from(be32(d, 0)), be32(d, 4) & 0x00FF_FFFF)
            };
            if size != BLOCK_SIZE as u32 {
                return Err(Sense::invalid_param((at + desc_len - 3) as u16, None).into());
            }
            let blocks = self.blocks();
            let short_max = u64::from(u32::MAX);
            if count != 0 && count != blocks && !(!long && count == short_max && blocks >= short_max) {
                return Err(Sense::invalid_param(at as u16, None).into());
            }
        }
        let swp_now = self.load_reservations().await?.0.software_write_protect;
        let mut swp_wanted = None;
        let mut at = header + bdl;
        while at < plen {
            if at + 2 > plen {
                return Err(Sense::param_list_length().into());
            }
            if list[at] & 0x40 != 0 {
                return Err(Sense::invalid_param(at as u16, Some(6)).into()); // SPF: no subpages
            }
            let code = list[at] & 0x3F;
            let current = page(code, swp_now).ok_or(Sense::invalid_param(at as u16, Some(5)))?;
            let mask = changeable(code).unwrap_or_default();
            let len = usize::from(list[at + 1]) + 2;
            if len != current.len() {
                return Err(Sense::invalid_param(at as u16 + 1, None).into());
            }
            if at + len > plen {
                return Err(Sense::param_list_length().into());
            }
            // PS (bit 7 of byte 0) is reserved in MODE SELECT: compare the rest, but for
            // the bits that may change.
            if let Some(i) = (2..len).find(|&i| (list[at + i] ^ current[i]) & !mask[i] != 0) {
                return Err(Sense::invalid_param((at + i) as u16, None).into());
            }
            if code == 0x0A {
                swp_wanted = Some(list[at + SWP_BYTE] & SWP_BIT != 0);
            }
            at += len;
        }
        // Applied once the whole list passed: a list with a bad page changes nothing. A
        // read-only LUN may not change what writers through other LUNs see.
        if swp_wanted.is_some_and(|w| w != swp_now) && ctx.read_only {
            return Err(Sense::write_protected().into());
        }
        if let Some(wanted) = swp_wanted {
            let changed = self
                .update_reservations(|st| {
                    if st.software_write_protect == wanted {
                        return Ok(None);
                    }
                    st.software_write_protect = wanted;
                    Ok(Some(()))
                })
                .await?;
            if changed.is_some() {
                tracing::info!(naa = ?self.identity.naa, swp = wanted, "software write protect changed by MODE SELECT");
                self.post_attention(Sense::mode_parameters_changed(), &[], |k| k != ctx.key);
                if let Some(events) = &self.events {
                    events.mode_changed().await;
                }
            }
        }
        Ok(bytes::Bytes::new())
    }
}
