//! A minimal iSCSI initiator for what the real initiators in the test suite cannot do:
//! REPORT TARGET PORT GROUPS (ALUA states of each path). It logs in without CHAP, sends one
//! command and logs out. It uses our PDU codec, but the states it checks come from the
//! target's ALUA logic, which libiscsi and QEMU cannot show us.

use anyhow::{bail, Context, Result};
use basalt_iscsi::pdu::{self, Digests, Header, LoginRequest, Pdu, ScsiCommand};
use basalt_iscsi::text;
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

const INITIATOR: &str = "iqn.2026-11.io.basalt:test-initiator";

/// One target port group as REPORT TARGET PORT GROUPS reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedGroup {
    pub id: u16,
    /// ASYMMETRIC ACCESS STATE: 0 active/optimised, 1 active/non-optimised, 2 standby,
    /// 3 unavailable, 0xf transitioning.
    pub state: u8,
    pub ports: Vec<u16>,
}

async fn recv(s: &mut TcpStream) -> Result<Pdu> {
    tokio::time::timeout(Duration::from_secs(30), pdu::read_pdu(s, Digests::default(), 1 << 20))
        .await
        .context("no answer from the target in 30 s")??
        .context("the target closed the connection")
}

/// Logs in to `target` at `portal` and returns the port groups of LUN `lun`.
pub async fn report_target_port_groups(portal: SocketAddr, target: &str, lun: u64) -> Result<Vec<ReportedGroup>> {
    let mut s = TcpStream::connect(portal).await.with_context(|| format!("connecting to {portal}"))?;
    let keys: Vec<(String, String)> = [
        ("InitiatorName", INITIATOR),
        ("TargetName", target),
        ("SessionType", "Normal"),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxRecvDataSegmentLength", "262144"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let login = LoginRequest {
        transit: true,
        cont: false,
        csg: 1,
        nsg: 3,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a],
        tsih: 0,
        itt: 1,
        cid: 1,
        cmdsn: 1,
        exp_statsn: 0,
    };
    pdu::write_pdu(&mut s, &Pdu::with_data(Header::LoginRequest(login), text::encode(&keys)), Digests::default()).await?;
    let answer = recv(&mut s).await?;
    let Header::LoginResponse(r) = answer.header else { bail!("not a login response: {answer:?}") };
    if r.status_class != 0 {
        bail!("login refused: class {} detail {}", r.status_class, r.status_detail);
    }
    let mut cdb = [0u8; 16];
    cdb[0] = 0xA3; // MAINTENANCE IN
    cdb[1] = 0x0A; // REPORT TARGET PORT GROUPS
    cdb[6..10].copy_from_slice(&4096u32.to_be_bytes());
    let cmd = ScsiCommand {
        immediate: false,
        final_: true,
        read: true,
        write: false,
        attr: 1,
        lun: pdu::encode_lun(lun),
        itt: 2,
        expected_len: 4096,
        cmdsn: 1,
        exp_statsn: r.statsn.wrapping_add(1),
        cdb,
    };
    pdu::write_pdu(&mut s, &Pdu::with_data(Header::ScsiCommand(cmd), Bytes::new()), Digests::default()).await?;
    let mut data = Vec::new();
    loop {
        let p = recv(&mut s).await?;
        match &p.header {
            Header::DataIn(d) => {
                data.extend_from_slice(&p.data);
                if d.has_status {
                    if d.status != 0 {
                        bail!("REPORT TARGET PORT GROUPS status {:#x}", d.status);
                    }
                    break;
                }
            }
            Header::ScsiResponse(r) if r.status == 0 => break,
            Header::ScsiResponse(r) => bail!("REPORT TARGET PORT GROUPS status {:#x}, sense {:?}", r.status, p.data),
            other => bail!("unexpected PDU {other:?}"),
        }
    }
    parse_rtpg(&data)
}

fn parse_rtpg(data: &[u8]) -> Result<Vec<ReportedGroup>> {
    if data.len() < 4 {
        bail!("RTPG answer of {} bytes", data.len());
    }
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let body = data.get(4..4 + len).context("RTPG answer shorter than its length")?;
    let mut groups = Vec::new();
    let mut at = 0;
    while at + 8 <= body.len() {
        let d = &body[at..];
        let count = d[7] as usize;
        let ports = (0..count)
            .map(|i| d.get(8 + 4 * i + 2..8 + 4 * i + 4).map(|p| u16::from_be_bytes([p[0], p[1]])))
            .collect::<Option<Vec<u16>>>()
            .context("truncated port list")?;
        groups.push(ReportedGroup { id: u16::from_be_bytes([d[2], d[3]]), state: d[0] & 0x0f, ports });
        at += 8 + 4 * count;
    }
    Ok(groups)
}
