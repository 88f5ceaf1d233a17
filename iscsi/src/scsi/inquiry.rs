//! INQUIRY: standard data and the vital product data pages (SPC-4 6.6, 7.8; SBC-3 6.6).

use super::cdb::{truncate, Cdb};
use super::sense::{CmdResult, Sense};
use super::*;

/// VPD pages we serve, in ascending order as page 0x00 must list them.
const PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

/// Version descriptors: SAM-5, iSCSI (RFC 7143), SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];

fn padded(s: &str, n: usize) -> Vec<u8> {
    // Only printable ASCII is allowed in these fields (SPC-4 4.4.1).
    let mut v: Vec<u8> =
        s.bytes().filter(|b| (0x20..0x7F).contains(b)).take(n).collect();
    v.resize(n, b' ');
    v
}

fn standard(id: &Identity, peripheral: u8) -> Vec<u8> {
    let mut d = vec![0u8; 74];
    d[0] = peripheral;
    d[2] = 0x06; // SPC-4
    d[3] = 0x10 | 0x02; // HiSup, response data format 2
    d[5] = 0x10; // TPGS = 01b: implicit ALUA only
    d[6] = 0x10; // MultiP: one port per node
    d[7] = 0x02; // CmdQue
    d[8..16].copy_from_slice(&padded(&id.vendor, 8));
    d[16..32].copy_from_slice(&padded(&id.product, 16));
    d[32..36].copy_from_slice(&padded(&id.revision, 4));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d[4] = (d.len() - 5) as u8;
    d
}

/// Checks the CDB bits every INQUIRY shares: CMDDT is obsolete and refused, a page code
/// without EVPD is invalid.
fn check_cdb(cdb: Cdb<'_>) -> CmdResult<(bool, u8, usize)> {
    let evpd = cdb.u8(1) & 0x01 != 0;
    if cdb.u8(1) & 0xFE != 0 {
        return Err(Sense::invalid_cdb(1, Some(1)).into());
    }
    let page = cdb.u8(2);
    if !evpd && page != 0 {
        return Err(Sense::invalid_cdb(2, None).into());
    }
    Ok((evpd, page, usize::from(cdb.u16(3))))
}

/// INQUIRY to a LUN that does not exist: peripheral qualifier 011b, device type 1Fh
/// ("no device here"), which is how Linux's scan learns to skip it.
pub fn absent_lun(cdb: Cdb<'_>) -> CmdResult {
    let (evpd, _, alloc) = check_cdb(cdb)?;
    if evpd {
        return Err(Sense::lun_not_supported().into());
    }
    let id = Identity {
        naa: [0; 8],
        serial: String::new(),
        vendor: "BASALT".into(),
        product: String::new(),
        revision: String::new(),
    };
    Ok(truncate(standard(&id, 0x7F), alloc))
}

/// A designation descriptor (SPC-4 7.8.6.1).
fn designator(out: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, value: &[u8]) {
    out.extend_from_slice(&[proto_codeset, piv_assoc_type, 0, value.len() as u8]);
    out.extend_from_slice(value);
}

/// A SCSI name string: UTF-8, NUL terminated, padded to a multiple of 4 bytes.
fn name_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.truncate(251);
    v.push(0);
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

impl LogicalUnit {
    pub(super) async fn inquiry(&self, ctx: &Ctx<'_>) -> CmdResult {
        let (evpd, page, alloc) = check_cdb(ctx.cdb)?;
        if !evpd {
            return Ok(truncate(standard(&self.identity, 0x00), alloc));
        }
        let body = match page {
            0x00 => PAGES.to_vec(),
            0x80 => padded(&self.identity.serial, self.identity.serial.len().min(252)),
            0x83 => self.device_identification(ctx).await,
            0x8F => super::xcopy::third_party_copy_page(),
            0xB0 => self.block_limits(),
            0xB1 => {
                let mut p = vec![0u8; 0x3C];
                p[1] = 0x01; // MEDIUM ROTATION RATE 1: non-rotating medium
                p
            }
            0xB2 => {
                // LBPU, LBPWS, LBPWS10, LBPRZ (deallocated blocks read as zeros);
                // no anchored state; thin provisioned.
                vec![0x00, 0xE4, 0x02, 0x00]
            }
            _ => return Err(Sense::invalid_cdb(2, None).into()),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Ok(truncate(d, alloc))
    }

    /// VPD 0x83: the NAA id of the unit, a T10 vendor id, then the target port the command
    /// came through (relative port, its port group, its SCSI name) and the target device
    /// name. The port designators let multipath software group paths by port group.
    async fn device_identification(&self, ctx: &Ctx<'_>) -> Vec<u8> {
        let mut p = Vec::new();
        // Binary, LU association, NAA.
        designator(&mut p, 0x01, 0x03, &self.identity.naa);
        // ASCII, LU association, T10 vendor id: vendor (8 bytes) + serial.
        let mut t10 = padded(&self.identity.vendor, 8);
        t10.extend(self.identity.serial.bytes().filter(|b| (0x20..0x7F).contains(b)).take(64));
        designator(&mut p, 0x02, 0x01, &t10);
        let port = ctx.cmd.nexus.relative_port;
        // iSCSI protocol, binary, PIV, target port association: relative target port.
        let mut v = [0u8; 4];
        v[2..4].copy_from_slice(&port.to_be_bytes());
        designator(&mut p, 0x51, 0x94, &v);
        let groups = self.alua.port_groups().await;
        if let Some(g) = groups.iter().find(|g| g.ports.contains(&port)) {
            v[2..4].copy_from_slice(&g.id.to_be_bytes());
            designator(&mut p, 0x51, 0x95, &v);
        }
        if !ctx.target_name.is_empty() {
            // UTF-8, target port: "<name>,t,0x<tpgt>" (RFC 7143 13.3 port name).
            let port_name = format!("{},t,0x{:04x}", ctx.target_name, ctx.cmd.nexus.tpgt);
            designator(&mut p, 0x53, 0x98, &name_string(&port_name));
            // UTF-8, target device association: the target name.
            designator(&mut p, 0x53, 0xA8, &name_string(ctx.target_name));
        }
        p
    }

    /// VPD 0xB0, SBC-3 6.6.4 (page length 3Ch).
    fn block_limits(&self) -> Vec<u8> {
        let mut p = vec![0u8; 0x3C];
        // Offsets below are into the page after its 4-byte header (spec offset − 4).
        p[1] = MAX_COMPARE_AND_WRITE_BLOCKS as u8;
        p[2..4].copy_from_slice(&OPTIMAL_GRANULARITY_BLOCKS.to_be_bytes());
        p[4..8].copy_from_slice(&(MAX_TRANSFER_BLOCKS as u32).to_be_bytes());
        p[8..12].copy_from_slice(&OPTIMAL_TRANSFER_BLOCKS.to_be_bytes());
        p[16..20].copy_from_slice(&(MAX_UNMAP_BLOCKS as u32).to_be_bytes());
        p[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
        p[24..28].copy_from_slice(&UNMAP_GRANULARITY_BLOCKS.to_be_bytes());
        p[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
        p[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
        p
    }
}
