//! The load generator of `basalt bench iscsi`: an iSCSI initiator (RFC 7143) that logs in,
//! keeps N READ(16) or WRITE(16) tasks outstanding on one connection for a timed window and
//! measures rate, latency and its own CPU. It owns the initiator side of the login
//! negotiation ([`negotiate`]), the write data plan (immediate data, unsolicited Data-Out up
//! to FirstBurstLength, Data-Out answering each R2T: [`unsolicited_plan`],
//! [`solicited_plan`]) and the command window (CmdSN against MaxCmdSN).
//!
//! Why our own initiator rather than libiscsi. There is no kernel initiator here, Debian's
//! fio has no libiscsi engine and `iscsi-perf` only reads, so a real initiator could only be
//! reached through `qemu-nbd --image-opts driver=iscsi` bridged to fio's NBD engine. That
//! bridge puts two more processes and a second protocol on every I/O, on a machine with 2
//! cores shared by the initiator, the target and the disk: at QD32 the bridge, not the
//! target, would set the pace and hide the very difference the benchmark is after. One
//! in-process initiator sends both targets the same PDUs (same negotiated limits, same
//! pipelining) and costs a few microseconds of CPU per I/O, which the report shows. What it
//! does not do is what no benchmark needs: digests, CHAP, several connections, error
//! recovery, data verification.

use super::disk::{DeviceIo, DiskCounters, DiskProbe};
use super::{CpuProbe, Direction, JobResult, ProcessCpu};
use anyhow::{anyhow, bail, Context, Result};
use basalt_iscsi::pdu::{
    self, DataOut, Digests, Header, LoginRequest, LogoutRequest, NopOut, Pdu, R2t, ScsiCommand, RESERVED_TAG,
};
use basalt_iscsi::text;
use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const INITIATOR_NAME: &str = "iqn.2026-11.io.basalt:bench";
/// How long the target may stay silent while we wait for it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What we offer at login. The defaults match what our target offers, and `bench iscsi`
/// configures tgt the same way, so both sessions run with the same limits.
#[derive(Clone, Debug, Serialize)]
pub struct Proposal {
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u16,
}

impl Default for Proposal {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 256 << 10,
            max_burst_length: 1 << 20,
            first_burst_length: 256 << 10,
            initial_r2t: false,
            immediate_data: true,
            max_outstanding_r2t: 8,
        }
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl Proposal {
    /// The operational-stage keys we offer.
    pub fn keys(&self) -> Vec<(String, String)> {
        [
            ("HeaderDigest", "None".to_string()),
            ("DataDigest", "None".to_string()),
            ("MaxConnections", "1".to_string()),
            ("InitialR2T", yes_no(self.initial_r2t)),
            ("ImmediateData", yes_no(self.immediate_data)),
            ("MaxRecvDataSegmentLength", self.max_recv_data_segment_length.to_string()),
            ("MaxBurstLength", self.max_burst_length.to_string()),
            ("FirstBurstLength", self.first_burst_length.to_string()),
            ("MaxOutstandingR2T", self.max_outstanding_r2t.to_string()),
            ("DefaultTime2Wait", "0".to_string()),
            ("DefaultTime2Retain", "0".to_string()),
            ("DataPDUInOrder", "Yes".to_string()),
            ("DataSequenceInOrder", "Yes".to_string()),
            ("ErrorRecoveryLevel", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The operational parameters a session ended up with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Negotiated {
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u16,
    /// What the target declared it accepts per PDU: the most immediate data or Data-Out
    /// data we may send in one PDU (8 KiB if it declares nothing).
    pub target_max_recv_dsl: u32,
    /// What we declared: the largest Data-In the target may send us.
    pub initiator_max_recv_dsl: u32,
}

/// The session parameters from our offer and the target's answers (RFC 7143 13: InitialR2T
/// is OR, ImmediateData AND, the lengths and MaxOutstandingR2T the minimum; a key the
/// target did not answer, or answered Reject/Irrelevant/NotUnderstood, keeps its default).
pub fn negotiate(offer: &Proposal, answers: &[(String, String)]) -> Result<Negotiated> {
    let mut n = Negotiated {
        initial_r2t: true,
        immediate_data: true,
        first_burst_length: 65_536,
        max_burst_length: 262_144,
        max_outstanding_r2t: 1,
        target_max_recv_dsl: 8192,
        initiator_max_recv_dsl: offer.max_recv_data_segment_length,
    };
    let bool_of = |v: &str| match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    };
    let num_of = |k: &str, v: &str, lo: u32, hi: u32| -> Result<Option<u32>> {
        if matches!(v, "Reject" | "Irrelevant" | "NotUnderstood") {
            return Ok(None);
        }
        match v.parse::<u32>() {
            Ok(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => bail!("the target answered {k}={v}"),
        }
    };
    const MAX_LEN: u32 = 0x00ff_ffff;
    for (k, v) in answers {
        match k.as_str() {
            "HeaderDigest" | "DataDigest" if v != "None" => bail!("the target insists on {k}={v}; we send no digests"),
            "InitialR2T" => {
                if let Some(b) = bool_of(v) {
                    n.initial_r2t = b || offer.initial_r2t;
                }
            }
            "ImmediateData" => {
                if let Some(b) = bool_of(v) {
                    n.immediate_data = b && offer.immediate_data;
                }
            }
            "FirstBurstLength" => {
                if let Some(x) = num_of(k, v, 512, MAX_LEN)? {
                    n.first_burst_length = x.min(offer.first_burst_length);
                }
            }
            "MaxBurstLength" => {
                if let Some(x) = num_of(k, v, 512, MAX_LEN)? {
                    n.max_burst_length = x.min(offer.max_burst_length);
                }
            }
            "MaxOutstandingR2T" => {
                if let Some(x) = num_of(k, v, 1, 65535)? {
                    n.max_outstanding_r2t = (x as u16).min(offer.max_outstanding_r2t);
                }
            }
            "MaxRecvDataSegmentLength" => {
                if let Some(x) = num_of(k, v, 512, MAX_LEN)? {
                    n.target_max_recv_dsl = x;
                }
            }
            _ => {}
        }
    }
    // RFC 7143 13.14: FirstBurstLength never exceeds MaxBurstLength.
    n.first_burst_length = n.first_burst_length.min(n.max_burst_length);
    Ok(n)
}

/// A piece of a write's data in one PDU: offset into the write, length, and its place in
/// its data sequence (DataSN from 0, F bit on the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u32,
    pub len: u32,
    pub datasn: u32,
    pub final_: bool,
}

/// One data sequence from `offset`, `len` bytes, in PDUs of at most `max_pdu` bytes.
fn sequence(offset: u32, len: u32, max_pdu: u32) -> Vec<Segment> {
    let max_pdu = max_pdu.max(1);
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let n = max_pdu.min(len - at);
        out.push(Segment { offset: offset + at, len: n, datasn: out.len() as u32, final_: at + n == len });
        at += n;
    }
    out
}

/// What a write of `len` bytes sends before any R2T: the bytes riding in the SCSI Command
/// PDU itself (immediate data), then the unsolicited Data-Out PDUs (only with
/// InitialR2T=No), all within FirstBurstLength. The rest is sent as R2Ts ask for it.
pub fn unsolicited_plan(n: &Negotiated, len: u32) -> (u32, Vec<Segment>) {
    let unsolicited = if n.initial_r2t && !n.immediate_data { 0 } else { len.min(n.first_burst_length) };
    let immediate = if n.immediate_data { unsolicited.min(n.target_max_recv_dsl) } else { 0 };
    let data_out =
        if n.initial_r2t { Vec::new() } else { sequence(immediate, unsolicited - immediate, n.target_max_recv_dsl) };
    (immediate, data_out)
}

/// The Data-Out PDUs answering one R2T (a sequence of its own).
pub fn solicited_plan(n: &Negotiated, offset: u32, desired_len: u32) -> Vec<Segment> {
    sequence(offset, desired_len, n.target_max_recv_dsl)
}

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers: is `a` before `b`?
fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

fn cdb_rw16(write: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = if write { 0x8A } else { 0x88 };
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// The sense key and additional sense code of a SCSI Response's data segment (a 2-byte
/// length, then fixed or descriptor format sense data), for error messages.
fn describe_sense(data: &[u8]) -> String {
    let Some(sense) = data.get(2..) else { return "no sense data".into() };
    match sense.first().map(|b| b & 0x7f) {
        Some(0x70 | 0x71) if sense.len() >= 14 => {
            format!("sense key {:#x}, ASC/ASCQ {:#04x}/{:#04x}", sense[2] & 0x0f, sense[12], sense[13])
        }
        Some(0x72 | 0x73) if sense.len() >= 4 => {
            format!("sense key {:#x}, ASC/ASCQ {:#04x}/{:#04x}", sense[1] & 0x0f, sense[2], sense[3])
        }
        _ => "no sense data".into(),
    }
}

/// Completion latencies → the p-th percentile (nearest rank), in microseconds.
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_ns.len() as f64).ceil() as usize;
    sorted_ns[rank.clamp(1, sorted_ns.len()) - 1] as f64 / 1000.0
}

/// One job: a workload's shape against `span` bytes of the LUN.
#[derive(Clone, Debug)]
pub struct Job {
    pub direction: Direction,
    pub random: bool,
    pub block_size: u32,
    pub iodepth: u32,
    /// Bytes of the LUN the offsets fall in (from 0).
    pub span: u64,
    pub limit: JobLimit,
}

#[derive(Clone, Copy, Debug)]
pub enum JobLimit {
    /// Run for `ramp + runtime`, measuring only `runtime`.
    Timed { ramp: Duration, runtime: Duration },
    /// Sequential, each block of the span once (the untimed pre-fill).
    OnePass,
}

/// What a measured job yields: the load generator's figures, the target's CPU and, where
/// the disk was given, its traffic.
#[derive(Clone, Debug)]
pub struct Measured {
    pub result: JobResult,
    pub target_cpu: ProcessCpu,
    pub device: Option<DeviceIo>,
}

/// A command in flight.
struct Task {
    start: Instant,
    /// A write's data, kept to answer R2Ts.
    data: Option<Bytes>,
    expected: u32,
    received: u32,
}

/// A logged-in session on one connection, talking to one LUN.
pub struct Session {
    wr: OwnedWriteHalf,
    /// PDUs from the reader task (which keeps draining the socket while we write, so
    /// neither side can block the other).
    rx: mpsc::Receiver<Result<Pdu, String>>,
    reader: tokio::task::JoinHandle<()>,
    pub negotiated: Negotiated,
    lun: [u8; 8],
    cmdsn: u32,
    max_cmdsn: u32,
    exp_statsn: u32,
    next_itt: u32,
    /// Logical block length and capacity of the LUN (READ CAPACITY(16)).
    pub block_len: u32,
    pub capacity: u64,
    out: BytesMut,
}

impl Session {
    /// Connects, logs in to `target` (no CHAP) and reads the capacity of `lun`.
    pub async fn login(portal: SocketAddr, target: &str, lun: u64, offer: &Proposal) -> Result<Session> {
        let stream = TcpStream::connect(portal).await.with_context(|| format!("connecting to {portal}"))?;
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let isid = {
            let r: [u8; 5] = rand::rng().random();
            // Type 2 (random) ISID.
            [0x80, r[0], r[1], r[2], r[3], r[4]]
        };
        let security: Vec<(String, String)> = [
            ("InitiatorName", INITIATOR_NAME),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut stage = 0u8;
        let mut keys = security;
        let mut answers = Vec::new();
        let mut exp_statsn = 0u32;
        let cmdsn = 1u32;
        let mut max_cmdsn = cmdsn;
        let mut logged_in = false;
        // A few rounds at most: one per stage, plus any the target asks for.
        for _ in 0..8 {
            let req = LoginRequest {
                transit: true,
                cont: false,
                csg: stage,
                nsg: if stage == 0 { 1 } else { 3 },
                version_max: 0,
                version_min: 0,
                isid,
                tsih: 0,
                itt: 0,
                cid: 0,
                cmdsn,
                exp_statsn,
            };
            pdu::write_pdu(&mut wr, &Pdu::with_data(Header::LoginRequest(req), text::encode(&keys)), Digests::default())
                .await?;
            let answer = tokio::time::timeout(
                ANSWER_TIMEOUT,
                pdu::read_pdu(&mut rd, Digests::default(), pdu::LOGIN_MAX_DATA),
            )
            .await
            .context("no login response")??
            .ok_or_else(|| anyhow!("the target closed the connection during login"))?;
            let Header::LoginResponse(r) = answer.header else { bail!("not a login response: {:?}", answer.header) };
            if r.status_class != 0 {
                bail!("login to {target} refused: status class {:#x}, detail {:#x}", r.status_class, r.status_detail);
            }
            if r.cont {
                bail!("the target split its login answer over several PDUs (not supported here)");
            }
            exp_statsn = r.statsn.wrapping_add(1);
            if !serial_lt(r.max_cmdsn, r.exp_cmdsn.wrapping_sub(1)) {
                max_cmdsn = r.max_cmdsn;
            }
            let pairs = text::parse(&answer.data).map_err(|e| anyhow!("login answer: {e}"))?;
            if stage == 1 {
                answers.extend(pairs);
            }
            keys = Vec::new();
            if r.transit && r.nsg == 3 {
                logged_in = true;
                break;
            }
            if r.transit && r.nsg == 1 && stage == 0 {
                stage = 1;
                keys = offer.keys();
            }
        }
        if !logged_in {
            bail!("login to {target} did not reach the full feature phase");
        }
        let negotiated = negotiate(offer, &answers)?;
        let (tx, rx) = mpsc::channel(256);
        let max_data = negotiated.initiator_max_recv_dsl;
        let reader = tokio::spawn(async move {
            loop {
                let item = match pdu::read_pdu(&mut rd, Digests::default(), max_data).await {
                    Ok(Some(p)) => Ok(p),
                    Ok(None) => Err("the target closed the connection".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        let mut s = Session {
            wr,
            rx,
            reader,
            negotiated,
            lun: pdu::encode_lun(lun),
            cmdsn,
            max_cmdsn,
            exp_statsn,
            next_itt: 1,
            block_len: 0,
            capacity: 0,
            out: BytesMut::new(),
        };
        s.read_capacity().await?;
        Ok(s)
    }

    /// TEST UNIT READY until the unit attentions of a new nexus are consumed, then READ
    /// CAPACITY(16).
    async fn read_capacity(&mut self) -> Result<()> {
        let mut ready = false;
        for _ in 0..8 {
            let (status, _) = self.single([0; 16], 0).await?;
            if status == 0 {
                ready = true;
                break;
            }
        }
        if !ready {
            bail!("the LUN never became ready (TEST UNIT READY kept failing)");
        }
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9E;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let (status, data) = self.single(cdb, 32).await?;
        if status != 0 || data.len() < 12 {
            bail!("READ CAPACITY(16) failed (status {status:#x}, {} bytes)", data.len());
        }
        let last_lba = u64::from_be_bytes([data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7]]);
        self.block_len = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
        if self.block_len == 0 || !self.block_len.is_power_of_two() {
            bail!("the LUN reports a block length of {}", self.block_len);
        }
        self.capacity = (last_lba + 1) * u64::from(self.block_len);
        Ok(())
    }

    /// One command without data-out, alone in flight: its status and data.
    async fn single(&mut self, cdb: [u8; 16], read_len: u32) -> Result<(u8, Bytes)> {
        let itt = self.take_itt();
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: read_len > 0,
            write: false,
            attr: 1,
            lun: self.lun,
            itt,
            expected_len: read_len,
            cmdsn: self.cmdsn,
            exp_statsn: self.exp_statsn,
            cdb,
        };
        self.cmdsn = self.cmdsn.wrapping_add(1);
        pdu::write_pdu(&mut self.wr, &Pdu::new(Header::ScsiCommand(cmd)), Digests::default()).await?;
        let mut data = BytesMut::new();
        loop {
            let p = self.next_pdu().await?;
            match &p.header {
                Header::DataIn(d) if d.itt == itt => {
                    self.window(d.exp_cmdsn, d.max_cmdsn);
                    data.extend_from_slice(&p.data);
                    if d.has_status {
                        self.saw_statsn(d.statsn);
                        return Ok((d.status, data.freeze()));
                    }
                }
                Header::ScsiResponse(r) if r.itt == itt => {
                    self.window(r.exp_cmdsn, r.max_cmdsn);
                    self.saw_statsn(r.statsn);
                    return Ok((r.status, data.freeze()));
                }
                _ => self.housekeeping(p)?,
            }
        }
    }

    fn take_itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == RESERVED_TAG {
            self.next_itt = 1;
        }
        itt
    }

    async fn next_pdu(&mut self) -> Result<Pdu> {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.rx.recv()).await {
            Err(_) => bail!("the target sent nothing for {ANSWER_TIMEOUT:?}"),
            Ok(None) => bail!("the connection's reader stopped"),
            Ok(Some(Err(e))) => bail!("connection lost: {e}"),
            Ok(Some(Ok(p))) => Ok(p),
        }
    }

    /// ExpCmdSN/MaxCmdSN from a target PDU (RFC 7143 4.2.2.1: MaxCmdSN only moves forward,
    /// and a MaxCmdSN below ExpCmdSN - 1 is invalid and ignored).
    fn window(&mut self, exp_cmdsn: u32, max_cmdsn: u32) {
        if serial_lt(max_cmdsn, exp_cmdsn.wrapping_sub(1)) {
            return;
        }
        if serial_lt(self.max_cmdsn, max_cmdsn) {
            self.max_cmdsn = max_cmdsn;
        }
    }

    fn window_open(&self) -> bool {
        !serial_lt(self.max_cmdsn, self.cmdsn)
    }

    fn saw_statsn(&mut self, statsn: u32) {
        if !serial_lt(statsn, self.exp_statsn) {
            self.exp_statsn = statsn.wrapping_add(1);
        }
    }

    /// PDUs that belong to no task: NOP-In pings are answered, anything else ends the run.
    fn housekeeping(&mut self, p: Pdu) -> Result<()> {
        match p.header {
            Header::NopIn(n) => {
                self.window(n.exp_cmdsn, n.max_cmdsn);
                if n.ttt != RESERVED_TAG {
                    let out = NopOut {
                        immediate: true,
                        lun: n.lun,
                        itt: RESERVED_TAG,
                        ttt: n.ttt,
                        cmdsn: self.cmdsn,
                        exp_statsn: self.exp_statsn,
                    };
                    self.queue(&Pdu::new(Header::NopOut(out)))?;
                }
                Ok(())
            }
            Header::AsyncMessage(a) => bail!("the target sent an asynchronous event {} ({a:?})", a.event),
            Header::Reject(r) => bail!("the target rejected a PDU (reason {:#x})", r.reason),
            other => bail!("unexpected PDU from the target: {other:?}"),
        }
    }

    /// Appends a PDU (no AHS, no digests) to the output: header, data, padding, with the
    /// data copied once (`pdu::encode` would copy it a second time on its way here).
    fn queue(&mut self, p: &Pdu) -> Result<()> {
        let len = p.data.len();
        let data = u32::try_from(len).map_err(|_| anyhow!("a {len}-byte data segment"))?;
        let bhs = p.header.encode(pdu::Lengths { ahs: 0, data })?;
        self.out.extend_from_slice(&bhs);
        self.out.extend_from_slice(&p.data);
        self.out.resize(self.out.len() + pdu::padded(len) - len, 0);
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Queues a READ(16) or WRITE(16) of `data.len()` (or `len`) bytes at `offset`.
    fn issue(&mut self, tasks: &mut HashMap<u32, Task>, offset: u64, len: u32, data: Option<&Bytes>) -> Result<()> {
        let itt = self.take_itt();
        let lba = offset / u64::from(self.block_len);
        let blocks = len / self.block_len;
        let write = data.is_some();
        let (immediate, data_out) = match data {
            Some(_) => unsolicited_plan(&self.negotiated, len),
            None => (0, Vec::new()),
        };
        let cmd = ScsiCommand {
            immediate: false,
            final_: data_out.is_empty(),
            read: !write,
            write,
            attr: 1,
            lun: self.lun,
            itt,
            expected_len: len,
            cmdsn: self.cmdsn,
            exp_statsn: self.exp_statsn,
            cdb: cdb_rw16(write, lba, blocks),
        };
        self.cmdsn = self.cmdsn.wrapping_add(1);
        let imm = data.map(|d| d.slice(..immediate as usize)).unwrap_or_default();
        self.queue(&Pdu::with_data(Header::ScsiCommand(cmd), imm))?;
        if let Some(d) = data {
            self.queue_data_out(itt, RESERVED_TAG, d, &data_out)?;
        }
        tasks.insert(itt, Task { start: Instant::now(), data: data.cloned(), expected: len, received: 0 });
        Ok(())
    }

    fn queue_data_out(&mut self, itt: u32, ttt: u32, data: &Bytes, segments: &[Segment]) -> Result<()> {
        for s in segments {
            let end = s.offset as usize + s.len as usize;
            if end > data.len() {
                bail!("the target asked for bytes {}..{end} of a {}-byte write", s.offset, data.len());
            }
            let h = DataOut {
                final_: s.final_,
                lun: self.lun,
                itt,
                ttt,
                exp_statsn: self.exp_statsn,
                datasn: s.datasn,
                offset: s.offset,
            };
            self.queue(&Pdu::with_data(Header::DataOut(h), data.slice(s.offset as usize..end)))?;
        }
        Ok(())
    }

    fn answer_r2t(&mut self, tasks: &HashMap<u32, Task>, r: &R2t) -> Result<()> {
        self.window(r.exp_cmdsn, r.max_cmdsn);
        let data = tasks
            .get(&r.itt)
            .and_then(|t| t.data.clone())
            .ok_or_else(|| anyhow!("R2T for task {:#x}, which is no write in flight", r.itt))?;
        let plan = solicited_plan(&self.negotiated, r.offset, r.desired_len);
        self.queue_data_out(r.itt, r.ttt, &data, &plan)
    }

    /// Runs one job. `target` is sampled at the start and end of the measured window, as are
    /// this process (the load generator's own CPU) and `disk`.
    pub async fn run(&mut self, job: &Job, target: &CpuProbe, disk: Option<&DiskProbe>) -> Result<Measured> {
        let bs = job.block_size;
        if bs == 0 || bs % self.block_len != 0 {
            bail!("block size {bs} is not a multiple of the LUN's {}-byte blocks", self.block_len);
        }
        let slots = job.span.min(self.capacity) / u64::from(bs);
        if slots == 0 {
            bail!("the LUN ({} bytes) is smaller than one {bs}-byte I/O", self.capacity);
        }
        let me = CpuProbe::new("basalt bench", vec![std::process::id()])?;
        let data = (job.direction == Direction::Write).then(|| {
            let mut b = vec![0u8; bs as usize];
            rand::rng().fill(&mut b[..]);
            Bytes::from(b)
        });
        let (ramp, runtime, one_pass) = match job.limit {
            JobLimit::Timed { ramp, runtime } => (ramp, runtime, false),
            JobLimit::OnePass => (Duration::ZERO, Duration::MAX, true),
        };
        let t0 = Instant::now();
        let window_start = t0 + ramp;
        let window_end = window_start.checked_add(runtime);
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let mut issued = 0u64;
        let mut tasks: HashMap<u32, Task> = HashMap::new();
        let mut latencies: Vec<u64> = Vec::new();
        // (target CPU, own CPU, disk, instant) at each edge of the measured window.
        let edge = |now: Instant| -> Result<(f64, f64, Option<DiskCounters>, Instant)> {
            Ok((target.sample()?, me.sample()?, disk.map(DiskProbe::sample).transpose()?, now))
        };
        let mut start = None;
        let mut end = None;
        loop {
            let now = Instant::now();
            if start.is_none() && now >= window_start {
                start = Some(edge(now)?);
            }
            if end.is_none() && window_end.is_some_and(|e| now >= e) {
                end = Some(edge(now)?);
            }
            let issuing = end.is_none() && !(one_pass && issued >= slots);
            while issuing && tasks.len() < job.iodepth as usize && self.window_open() {
                if one_pass && issued >= slots {
                    break;
                }
                let slot = if job.random && !one_pass { rng.random_range(0..slots) } else { issued % slots };
                issued += 1;
                self.issue(&mut tasks, slot * u64::from(bs), bs, data.as_ref())?;
            }
            self.flush().await?;
            if tasks.is_empty() {
                if issuing {
                    // Only a closed command window can leave nothing in flight: wait for the
                    // target to open it (a NOP-In or any PDU).
                    let p = self.next_pdu().await?;
                    self.housekeeping(p)?;
                    continue;
                }
                break;
            }
            let p = self.next_pdu().await?;
            let done = match &p.header {
                Header::DataIn(d) => {
                    self.window(d.exp_cmdsn, d.max_cmdsn);
                    let t = tasks.get_mut(&d.itt).ok_or_else(|| anyhow!("Data-In for unknown task {:#x}", d.itt))?;
                    t.received += p.data.len() as u32;
                    if d.has_status {
                        self.saw_statsn(d.statsn);
                        Some((d.itt, d.status, Bytes::new()))
                    } else {
                        None
                    }
                }
                Header::ScsiResponse(r) => {
                    self.window(r.exp_cmdsn, r.max_cmdsn);
                    self.saw_statsn(r.statsn);
                    if r.response != 0 {
                        bail!("the target failed task {:#x} (iSCSI response {:#x})", r.itt, r.response);
                    }
                    Some((r.itt, r.status, p.data.clone()))
                }
                Header::R2t(r) => {
                    self.answer_r2t(&tasks, r)?;
                    None
                }
                _ => {
                    self.housekeeping(p)?;
                    None
                }
            };
            if let Some((itt, status, sense)) = done {
                let t = tasks.remove(&itt).ok_or_else(|| anyhow!("status for unknown task {itt:#x}"))?;
                let op = if t.data.is_some() { "WRITE(16)" } else { "READ(16)" };
                if status != 0 {
                    bail!("{op} of {} bytes ended with SCSI status {status:#x}, {}", t.expected, describe_sense(&sense));
                }
                if t.data.is_none() && t.received != t.expected {
                    bail!("READ(16) of {} bytes returned {}", t.expected, t.received);
                }
                if start.is_some() && end.is_none() {
                    latencies.push(t.start.elapsed().as_nanos() as u64);
                }
            }
        }
        let now = Instant::now();
        let (c0, m0, d0, i0) = match start {
            Some(s) => s,
            None => edge(t0)?,
        };
        let (c1, m1, d1, i1) = match end {
            Some(e) => e,
            None => edge(now)?,
        };
        let secs = i1.duration_since(i0).as_secs_f64().max(1e-9);
        let ios = latencies.len() as u64;
        latencies.sort_unstable();
        let per_io = |cpu: f64| if ios == 0 { 0.0 } else { cpu * 1e6 / ios as f64 };
        Ok(Measured {
            result: JobResult {
                iops: ios as f64 / secs,
                bw_bytes: (ios * u64::from(bs)) as f64 / secs,
                ios,
                p50_us: percentile_us(&latencies, 50.0),
                p99_us: percentile_us(&latencies, 99.0),
                runtime_ms: (secs * 1000.0).round() as u64,
                client_cpu_us_per_io: per_io(m1 - m0),
            },
            target_cpu: ProcessCpu {
                cpu_seconds: c1 - c0,
                wall_seconds: secs,
                cpu_us_per_io: per_io(c1 - c0),
                steal_percent: None,
            },
            // Per I/O of nothing says nothing.
            device: d0.zip(d1).filter(|_| ios > 0).map(|(a, b)| DeviceIo::between(&a, &b, ios)),
        })
    }

    /// Logs out (closing the session) and drops the connection.
    pub async fn logout(mut self) -> Result<()> {
        let itt = self.take_itt();
        let req = LogoutRequest { immediate: true, reason: 0, itt, cid: 0, cmdsn: self.cmdsn, exp_statsn: self.exp_statsn };
        pdu::write_pdu(&mut self.wr, &Pdu::new(Header::LogoutRequest(req)), Digests::default()).await?;
        loop {
            let p = self.next_pdu().await?;
            match p.header {
                Header::LogoutResponse(r) if r.itt == itt => {
                    if r.response != 0 {
                        bail!("logout refused (response {})", r.response);
                    }
                    break;
                }
                _ => self.housekeeping(p)?,
            }
        }
        self.reader.abort();
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiated(initial_r2t: bool, immediate_data: bool, first_burst: u32, mrdsl: u32) -> Negotiated {
        Negotiated {
            initial_r2t,
            immediate_data,
            first_burst_length: first_burst,
            max_burst_length: 1 << 20,
            max_outstanding_r2t: 8,
            target_max_recv_dsl: mrdsl,
            initiator_max_recv_dsl: 256 << 10,
        }
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn negotiation_takes_the_minimum_of_lengths_and_or_and_of_the_booleans() {
        let offer = Proposal::default();
        let n = negotiate(
            &offer,
            &pairs(&[
                ("HeaderDigest", "None"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
                ("FirstBurstLength", "65536"),
                ("MaxBurstLength", "4194304"),
                ("MaxOutstandingR2T", "1"),
                ("MaxRecvDataSegmentLength", "8192"),
                ("TargetPortalGroupTag", "1"),
            ]),
        )
        .expect("negotiates");
        assert_eq!(n, negotiated(true, true, 65536, 8192).with_outstanding(1));
        // An answer above our offer is clamped to it; No AND Yes is No.
        let n = negotiate(&offer, &pairs(&[("ImmediateData", "No"), ("InitialR2T", "No"), ("FirstBurstLength", "999999")]))
            .expect("negotiates");
        assert!(!n.immediate_data && !n.initial_r2t);
        assert_eq!(n.first_burst_length, offer.first_burst_length);
    }

    #[test]
    fn unanswered_or_rejected_keys_keep_the_rfc_defaults() {
        let n = negotiate(&Proposal::default(), &pairs(&[("MaxBurstLength", "Reject")])).expect("negotiates");
        assert_eq!(n, negotiated(true, true, 65536, 8192).with_burst(262_144).with_outstanding(1));
        assert!(negotiate(&Proposal::default(), &pairs(&[("DataDigest", "CRC32C")])).is_err());
        assert!(negotiate(&Proposal::default(), &pairs(&[("FirstBurstLength", "12x")])).is_err());
        // FirstBurstLength never ends above MaxBurstLength.
        let n = negotiate(&Proposal::default(), &pairs(&[("MaxBurstLength", "16384"), ("FirstBurstLength", "65536")]))
            .expect("negotiates");
        assert_eq!((n.first_burst_length, n.max_burst_length), (16384, 16384));
    }

    impl Negotiated {
        fn with_outstanding(mut self, n: u16) -> Self {
            self.max_outstanding_r2t = n;
            self
        }
        fn with_burst(mut self, n: u32) -> Self {
            self.max_burst_length = n;
            self
        }
    }

    #[test]
    fn a_small_write_rides_entirely_in_the_command() {
        let n = negotiated(false, true, 256 << 10, 256 << 10);
        assert_eq!(unsolicited_plan(&n, 4096), (4096, vec![]));
        // With InitialR2T=Yes too: immediate data needs no R2T.
        assert_eq!(unsolicited_plan(&negotiated(true, true, 65536, 8192), 4096), (4096, vec![]));
    }

    #[test]
    fn a_large_write_sends_immediate_then_unsolicited_data_up_to_first_burst() {
        // 1 MiB, FirstBurstLength 256 KiB, the target takes 64 KiB per PDU.
        let n = negotiated(false, true, 256 << 10, 64 << 10);
        let (imm, outs) = unsolicited_plan(&n, 1 << 20);
        assert_eq!(imm, 64 << 10);
        let k = 64 << 10;
        assert_eq!(
            outs,
            vec![
                Segment { offset: k, len: k, datasn: 0, final_: false },
                Segment { offset: 2 * k, len: k, datasn: 1, final_: false },
                Segment { offset: 3 * k, len: k, datasn: 2, final_: true },
            ]
        );
        // The rest comes from R2Ts; each one is a sequence of its own from DataSN 0.
        let r2t = solicited_plan(&n, 256 << 10, 160 << 10);
        assert_eq!(
            r2t,
            vec![
                Segment { offset: 4 * k, len: k, datasn: 0, final_: false },
                Segment { offset: 5 * k, len: k, datasn: 1, final_: false },
                Segment { offset: 6 * k, len: 32 << 10, datasn: 2, final_: true },
            ]
        );
    }

    #[test]
    fn without_immediate_data_or_with_initial_r2t_the_data_waits_for_r2ts() {
        // InitialR2T=Yes and no immediate data: nothing before the first R2T.
        assert_eq!(unsolicited_plan(&negotiated(true, false, 65536, 8192), 1 << 20), (0, vec![]));
        // InitialR2T=Yes with immediate data: the command carries what fits, nothing else.
        assert_eq!(unsolicited_plan(&negotiated(true, true, 65536, 8192), 1 << 20), (8192, vec![]));
        // InitialR2T=No without immediate data: Data-Out PDUs from offset 0.
        let (imm, outs) = unsolicited_plan(&negotiated(false, false, 16384, 8192), 1 << 20);
        assert_eq!(imm, 0);
        assert_eq!(outs.iter().map(|s| (s.offset, s.len, s.datasn, s.final_)).collect::<Vec<_>>(), vec![
            (0, 8192, 0, false),
            (8192, 8192, 1, true)
        ]);
    }

    #[test]
    fn serial_numbers_wrap() {
        assert!(serial_lt(1, 2));
        assert!(!serial_lt(2, 2));
        assert!(serial_lt(u32::MAX, 0));
        assert!(!serial_lt(0, u32::MAX));
    }

    #[test]
    fn read_and_write_cdbs_carry_lba_and_length() {
        let c = cdb_rw16(true, 0x0102_0304_0506_0708, 8);
        assert_eq!(c[0], 0x8A);
        assert_eq!(&c[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&c[10..14], &[0, 0, 0, 8]);
        assert_eq!(cdb_rw16(false, 0, 1)[0], 0x88);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&ns, 50.0), 50.0);
        assert_eq!(percentile_us(&ns, 99.0), 99.0);
        assert_eq!(percentile_us(&[7000], 99.0), 7.0);
        assert_eq!(percentile_us(&[], 50.0), 0.0);
    }

    #[test]
    fn sense_data_is_described_in_both_formats() {
        let mut fixed = vec![0, 18, 0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0x00];
        fixed.extend([0u8; 4]);
        assert_eq!(describe_sense(&fixed), "sense key 0x6, ASC/ASCQ 0x29/0x00");
        assert_eq!(describe_sense(&[0, 8, 0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0]), "sense key 0x5, ASC/ASCQ 0x24/0x00");
        assert_eq!(describe_sense(&[]), "no sense data");
    }
}
