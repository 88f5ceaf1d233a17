//! Target-level reports: REPORT LUNS (SPC-4 6.33), REPORT TARGET PORT GROUPS (6.36),
//! REPORT SUPPORTED OPERATION CODES (6.35) and REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS
//! (6.37).

use super::cdb::{truncate, Cdb};
use super::opcodes::{has_service_actions, OpInfo, OPS};
use super::sense::{CmdResult, Sense};
use super::*;

/// The 8-byte SAM LUN for `lun`: peripheral addressing below 256, flat space below
/// 16384, otherwise the value as is (it was decoded from such a field in the first place).
fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else if lun < 0x4000 {
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = lun as u8;
    } else {
        b = lun.to_be_bytes();
    }
    b
}

pub fn report_luns(cdb: &[u8], luns: impl Iterator<Item = u64>) -> CmdResult {
    let cdb = Cdb(cdb);
    if cdb.0.len() < 12 {
        return Err(Sense::invalid_cdb(0, None).into());
    }
    let alloc = cdb.u32(6) as usize;
    // 00h all, 02h all (we have no well-known LUNs, so 01h is empty), 10h-12h: the
    // administrative-LUN selections of SPC-5, all empty or "all" for a target without
    // administrative LUNs.
    let list: Vec<u64> = match cdb.u8(2) {
        0x00 | 0x02 | 0x12 => luns.collect(),
        0x01 | 0x10 | 0x11 => Vec::new(),
        _ => return Err(Sense::invalid_cdb(2, None).into()),
    };
    let mut d = Vec::with_capacity(8 + 8 * list.len());
    d.extend_from_slice(&((list.len() * 8) as u32).to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    for lun in list {
        d.extend_from_slice(&encode_lun(lun));
    }
    Ok(truncate(d, alloc))
}

fn state_code(s: AccessState) -> u8 {
    match s {
        AccessState::ActiveOptimized => 0x0,
        AccessState::ActiveNonOptimized => 0x1,
        AccessState::Standby => 0x2,
        AccessState::Unavailable => 0x3,
        AccessState::Transitioning => 0xF,
    }
}

/// Seconds an initiator should allow for an implicit transition (lease takeover).
const IMPLICIT_TRANSITION_SECS: u8 = 30;

impl LogicalUnit {
    pub(super) async fn report_target_port_groups(&self, ctx: &Ctx<'_>) -> CmdResult {
        let format = ctx.cdb.u8(1) >> 5;
        let alloc = ctx.cdb.u32(6) as usize;
        if format > 1 {
            return Err(Sense::invalid_cdb(1, Some(7)).into());
        }
        let mut d = vec![0u8; 4];
        if format == 1 {
            // Extended header: format type 1, implicit transition time.
            d.extend_from_slice(&[0x10, IMPLICIT_TRANSITION_SECS, 0, 0]);
        }
        for g in self.alua.port_groups().await {
            d.push(state_code(g.state)); // PREF = 0
            // Supported: T_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP.
            d.push(0x80 | 0x08 | 0x04 | 0x02 | 0x01);
            d.extend_from_slice(&g.id.to_be_bytes());
            d.push(0);
            d.push(0x00); // status: no reason given
            d.push(0);
            d.push(g.ports.len().min(255) as u8);
            for p in g.ports.iter().take(255) {
                d.extend_from_slice(&[0, 0]);
                d.extend_from_slice(&p.to_be_bytes());
            }
        }
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        Ok(truncate(d, alloc))
    }
}

/// Nominal and recommended timeouts (seconds) for the command timeouts descriptor: I/O
/// may wait for a lease takeover, everything else answers at once.
fn timeouts(o: &OpInfo) -> [u8; 12] {
    let (nominal, recommended): (u32, u32) = if o.medium { (1, 60) } else { (0, 10) };
    let mut t = [0u8; 12];
    t[0..2].copy_from_slice(&0x0Au16.to_be_bytes());
    t[4..8].copy_from_slice(&nominal.to_be_bytes());
    t[8..12].copy_from_slice(&recommended.to_be_bytes());
    t
}

pub fn report_supported_opcodes(cdb: Cdb<'_>) -> CmdResult {
    let rctd = cdb.u8(2) & 0x80 != 0;
    let options = cdb.u8(2) & 0x07;
    let op = cdb.u8(3);
    let sa = cdb.u16(4);
    let alloc = cdb.u32(6) as usize;
    let d = match options {
        0 => {
            let mut body = Vec::new();
            for o in OPS {
                body.push(o.op);
                body.push(0);
                body.extend_from_slice(&u16::from(o.sa.unwrap_or(0)).to_be_bytes());
                body.push(0);
                body.push(if rctd { 0x02 } else { 0 } | u8::from(o.sa.is_some()));
                body.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
                if rctd {
                    body.extend_from_slice(&timeouts(o));
                }
            }
            let mut d = (body.len() as u32).to_be_bytes().to_vec();
            d.extend(body);
            d
        }
        1..=3 => {
            let with_sa = has_service_actions(op);
            // 001b: opcode without service actions; 010b: opcode with them; 011b either.
            if (options == 1 && with_sa) || (options == 2 && !with_sa) {
                return Err(Sense::invalid_cdb(2, Some(2)).into());
            }
            let found = OPS.iter().find(|o| {
                o.op == op && (!with_sa || o.sa.map(u16::from) == Some(sa))
            });
            one_command(found, rctd)
        }
        _ => return Err(Sense::invalid_cdb(2, Some(2)).into()),
    };
    Ok(truncate(d, alloc))
}

/// The one-command parameter data: SUPPORT 011b with the usage map, or 001b.
fn one_command(found: Option<&OpInfo>, rctd: bool) -> Vec<u8> {
    let Some(o) = found else {
        return vec![0, 0x01, 0, 0];
    };
    let mut d = vec![0, if rctd { 0x80 } else { 0 } | 0x03];
    d.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
    d.extend_from_slice(o.usage);
    if rctd {
        d.extend_from_slice(&timeouts(o));
    }
    d
}

/// ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET (warm):
/// what the transport forwards and completes. No CLEAR ACA (no ACA), no QUERY TASK.
pub fn report_supported_tmfs(cdb: Cdb<'_>) -> CmdResult {
    let repd = cdb.u8(2) & 0x80 != 0;
    let alloc = cdb.u32(6) as usize;
    let mut d = vec![0u8; if repd { 16 } else { 4 }];
    d[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02; // ATS ATSS CTSS LURS TRS
    if repd {
        d[3] = 0x0C; // additional data length
    }
    Ok(truncate(d, alloc))
}
