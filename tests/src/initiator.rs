//! A minimal iSCSI initiator for what the real initiators in the test suite cannot do:
//! REPORT TARGET PORT GROUPS (ALUA states of each path), and several sessions of distinct
//! initiators on distinct nodes at once whose unit attentions a test checks one command at
//! a time. It logs in without CHAP, sends one command at a time (write data only as
//! immediate data) and logs out. It uses our PDU codec, but what it checks comes from the
//! target's SCSI and cluster logic, which libiscsi and QEMU cannot show us.

use anyhow::{bail, Context, Result};
use basalt_iscsi::pdu::{self, Digests, Header, LoginRequest, LogoutRequest, NopOut, Pdu, ScsiCommand};
use basalt_iscsi::text;
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

const INITIATOR: &str = "iqn.2026-11.io.basalt:test-initiator";
/// Immediate data the target always takes: its default MaxRecvDataSegmentLength.
const MAX_IMMEDIATE: usize = 8192;
/// Target Transfer Tag of a NOP-In that asks for no answer.
const NO_TTT: u32 = 0xFFFF_FFFF;

/// One target port group as REPORT TARGET PORT GROUPS reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedGroup {
    pub id: u16,
    /// ASYMMETRIC ACCESS STATE: 0 active/optimised, 1 active/non-optimised, 2 standby,
    /// 3 unavailable, 0xf transitioning.
    pub state: u8,
    pub ports: Vec<u16>,
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// SAM status (0 GOOD, 2 CHECK CONDITION, 0x18 RESERVATION CONFLICT).
    pub status: u8,
    /// Sense key, ASC and ASCQ of a CHECK CONDITION.
    pub sense: Option<(u8, u8, u8)>,
    pub data: Vec<u8>,
}

impl Reply {
    /// The data of a command that must have succeeded.
    pub fn good(self, what: &str) -> Result<Vec<u8>> {
        if self.status != 0 {
            bail!("{what}: status {:#x}, sense {:02x?}", self.status, self.sense);
        }
        Ok(self.data)
    }
}

/// A logged-in normal session on one portal, one connection, one command at a time.
pub struct Session {
    stream: TcpStream,
    cmdsn: u32,
    exp_statsn: u32,
    itt: u32,
}

async fn recv(s: &mut TcpStream) -> Result<Pdu> {
    tokio::time::timeout(Duration::from_secs(30), pdu::read_pdu(s, Digests::default(), 1 << 20))
        .await
        .context("no answer from the target in 30 s")??
        .context("the target closed the connection")
}

impl Session {
    /// Logs in to `target` at `portal` as `initiator` with session id `isid` (together, the
    /// initiator port that reservations and unit attentions are kept for).
    pub async fn login(portal: SocketAddr, target: &str, initiator: &str, isid: [u8; 6]) -> Result<Session> {
        let mut stream = TcpStream::connect(portal).await.with_context(|| format!("connecting to {portal}"))?;
        let keys: Vec<(String, String)> = [
            ("InitiatorName", initiator),
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
            isid,
            tsih: 0,
            itt: 1,
            cid: 1,
            cmdsn: 1,
            exp_statsn: 0,
        };
        let request = Pdu::with_data(Header::LoginRequest(login), text::encode(&keys));
        pdu::write_pdu(&mut stream, &request, Digests::default()).await?;
        let answer = recv(&mut stream).await?;
        let Header::LoginResponse(r) = answer.header else { bail!("not a login response: {answer:?}") };
        if r.status_class != 0 {
            bail!("login refused: class {} detail {}", r.status_class, r.status_detail);
        }
        if !r.transit || r.nsg != 3 {
            bail!("the target did not go to full feature phase: {r:?}");
        }
        Ok(Session { stream, cmdsn: 1, exp_statsn: r.statsn.wrapping_add(1), itt: 1 })
    }

    /// Runs one command: `data_out` (at most 8 KiB) goes as immediate data; at most
    /// `expected_in` bytes come back.
    pub async fn command(&mut self, lun: u64, cdb: &[u8], data_out: &[u8], expected_in: u32) -> Result<Reply> {
        if cdb.len() > 16 {
            bail!("CDB of {} bytes needs an AHS", cdb.len());
        }
        if data_out.len() > MAX_IMMEDIATE {
            bail!("{} bytes of write data: only immediate data is supported", data_out.len());
        }
        if !data_out.is_empty() && expected_in > 0 {
            bail!("bidirectional commands are not supported");
        }
        let mut bytes = [0u8; 16];
        bytes[..cdb.len()].copy_from_slice(cdb);
        self.itt = self.itt.wrapping_add(1);
        let itt = self.itt;
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: expected_in > 0,
            write: !data_out.is_empty(),
            attr: 1,
            lun: pdu::encode_lun(lun),
            itt,
            expected_len: if data_out.is_empty() { expected_in } else { data_out.len() as u32 },
            cmdsn: self.cmdsn,
            exp_statsn: self.exp_statsn,
            cdb: bytes,
        };
        self.cmdsn = self.cmdsn.wrapping_add(1);
        let request = Pdu::with_data(Header::ScsiCommand(cmd), Bytes::copy_from_slice(data_out));
        pdu::write_pdu(&mut self.stream, &request, Digests::default()).await?;
        let mut data = Vec::new();
        loop {
            let p = recv(&mut self.stream).await?;
            match &p.header {
                Header::DataIn(d) if d.itt == itt => {
                    data.extend_from_slice(&p.data);
                    if d.has_status {
                        self.exp_statsn = d.statsn.wrapping_add(1);
                        return Ok(Reply { status: d.status, sense: None, data });
                    }
                }
                Header::ScsiResponse(r) if r.itt == itt => {
                    self.exp_statsn = r.statsn.wrapping_add(1);
                    if r.response != 0 {
                        bail!("target failure (iSCSI response {:#x})", r.response);
                    }
                    // The data segment of a response is the sense length (2 bytes), then
                    // fixed-format sense data.
                    let sense = p.data.get(2..).filter(|s| s.len() >= 14).map(|s| (s[2] & 0x0F, s[12], s[13]));
                    return Ok(Reply { status: r.status, sense, data });
                }
                Header::NopIn(n) => {
                    if n.ttt != NO_TTT {
                        let ping = NopOut {
                            immediate: true,
                            lun: n.lun,
                            itt: NO_TTT,
                            ttt: n.ttt,
                            cmdsn: self.cmdsn,
                            exp_statsn: self.exp_statsn,
                        };
                        pdu::write_pdu(&mut self.stream, &Pdu::new(Header::NopOut(ping)), Digests::default()).await?;
                    }
                }
                Header::R2t(_) => bail!("the target asked for solicited data, which this initiator does not send"),
                other => bail!("unexpected PDU {other:?}"),
            }
        }
    }

    /// Closes the session.
    pub async fn logout(mut self) -> Result<()> {
        let logout = LogoutRequest {
            immediate: true,
            reason: 0,
            itt: self.itt.wrapping_add(1),
            cid: 1,
            cmdsn: self.cmdsn,
            exp_statsn: self.exp_statsn,
        };
        pdu::write_pdu(&mut self.stream, &Pdu::new(Header::LogoutRequest(logout)), Digests::default()).await?;
        loop {
            match recv(&mut self.stream).await?.header {
                Header::LogoutResponse(_) => return Ok(()),
                Header::NopIn(_) => {}
                other => bail!("unexpected PDU {other:?} instead of a logout response"),
            }
        }
    }
}

/// Logs in to `target` at `portal` and returns the port groups of LUN `lun`.
pub async fn report_target_port_groups(portal: SocketAddr, target: &str, lun: u64) -> Result<Vec<ReportedGroup>> {
    let mut s = Session::login(portal, target, INITIATOR, [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]).await?;
    let mut cdb = [0u8; 12];
    cdb[0] = 0xA3; // MAINTENANCE IN
    cdb[1] = 0x0A; // REPORT TARGET PORT GROUPS
    cdb[6..10].copy_from_slice(&4096u32.to_be_bytes());
    let data = s.command(lun, &cdb, &[], 4096).await?.good("REPORT TARGET PORT GROUPS")?;
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
