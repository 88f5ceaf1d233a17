//! Fuzzing entry points: one function per cargo-fuzz target in `iscsi/fuzz/`, shared with
//! `tests/fuzz_corpus.rs`, which replays the checked-in corpus on stable so every test run
//! exercises the same code without nightly.
//!
//! Each entry point takes arbitrary bytes, drives the parsers the way the connection does,
//! and panics (through `assert!`) when an invariant breaks; an `Err` from a parser is an
//! expected outcome, never a failure.
//!
//! Input layouts (so corpus files can be written by hand):
//! - [`pdu`]: byte 0 selects digests (bit 0 header, bit 1 data) and the data limit (bit 2:
//!   the 8 KiB login limit); the rest is a byte stream of PDUs.
//! - [`login_keys`]: a sequence of steps, each `flags: u8, len: u16 BE, text[len]`. Flags:
//!   0x80 T, 0x40 C, bits 3..2 CSG, bits 1..0 NSG; 0x20 sends the step as a full-feature
//!   Text Request instead of a Login Request.
//! - [`scsi_cdb`]: a sequence of commands, each `lun: u8, cdb_len: u8, cdb[cdb_len],
//!   data_len: u16 BE, data_out[data_len]`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::chap::{self, Challenge};
use crate::conn::{self, Context, Sessions};
use crate::lu::memory::{MemoryDevice, MemoryReservations, SinglePath};
use crate::lu::{self, status, Chap, Nexus, Portal, ScsiTarget, TargetAccess, TargetRegistry};
use crate::pdu::{self, Digests, Header, Pdu, LOGIN_MAX_DATA, RESERVED_TAG};
use crate::scsi::{self, cdb, Identity};
use crate::text::{self, Negotiator, TargetLimits};

/// Target names the fuzzing registry serves (seed inputs use them to get past login).
pub const OPEN_TARGET: &str = "iqn.2024-01.io.basalt:fuzz";
pub const CHAP_TARGET: &str = "iqn.2024-01.io.basalt:chap";
/// Size of the logical units: small, so a whole-unit command stays cheap.
const UNIT_BYTES: u64 = 64 * 1024;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

// ---------------------------------------------------------------------------------------
// PDU codec
// ---------------------------------------------------------------------------------------

/// Reads PDUs from arbitrary bytes until the stream ends or a PDU is refused; everything
/// that decodes must encode again and decode to the same PDU (with and without digests).
pub fn pdu(data: &[u8]) {
    let Some((&sel, stream)) = data.split_first() else { return };
    let digests = Digests { header: sel & 1 != 0, data: sel & 2 != 0 };
    let max_data = if sel & 4 != 0 { LOGIN_MAX_DATA } else { 1 << 24 };
    if let Ok(bhs) = <&[u8; pdu::BHS_LEN]>::try_from(stream.get(..pdu::BHS_LEN).unwrap_or(&[])) {
        // The BHS decoder on its own is total.
        let _ = Header::decode(bhs);
    }
    let _ = pdu::decode_ahs(stream);
    block_on(async {
        // Both readers: the connection's (reads ahead) and the exact one.
        let total = stream.len();
        let mut rd = if sel & 8 != 0 { pdu::PduReader::new(stream) } else { pdu::PduReader::exact(stream) };
        let mut consumed = 0;
        loop {
            match rd.read(digests, max_data).await {
                Ok(Some(p)) => {
                    let now = total - rd.get_ref().len() - rd.buffered();
                    assert!(now > consumed, "a PDU consumed no input");
                    consumed = now;
                    assert!(p.data.len() <= max_data as usize, "data segment over the limit");
                    round_trip(&p).await;
                }
                // A Data-Out with damaged data leaves the stream in step: reading goes on.
                Err(pdu::Error::DataOutDigest { pdu: p, .. }) => {
                    let now = total - rd.get_ref().len() - rd.buffered();
                    assert!(now > consumed, "a damaged Data-Out consumed no input");
                    consumed = now;
                    assert!(matches!(p.header, Header::DataOut(_)), "only Data-Out is handed back damaged");
                    assert!(p.data.len() <= max_data as usize, "data segment over the limit");
                }
                Ok(None) | Err(_) => break,
            }
        }
    });
}

async fn round_trip(p: &Pdu) {
    for digests in [Digests::default(), Digests { header: true, data: true }] {
        let wire = pdu::encode(p, digests).expect("a decoded PDU encodes");
        assert_eq!(wire.len() % 4, 0, "PDUs end on a 4-byte boundary");
        let back = pdu::read_pdu(&mut &wire[..], digests, 1 << 24)
            .await
            .expect("an encoded PDU decodes")
            .expect("an encoded PDU is not end of stream");
        assert_eq!(&back, p, "decode(encode(pdu)) differs");
    }
}

// ---------------------------------------------------------------------------------------
// Login and text keys
// ---------------------------------------------------------------------------------------

/// One request of a [`login_keys`] input.
struct Step<'a> {
    flags: u8,
    text: &'a [u8],
}

fn steps(mut data: &[u8]) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    while let [flags, hi, lo, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        out.push(Step { flags: *flags, text: &rest[..len] });
        data = &rest[len..];
    }
    out
}

/// Parses each step's text and negotiates it (login keys, CHAP values, full-feature text
/// keys), then replays the whole sequence against a real connection over an in-memory
/// stream, as an initiator would send it.
pub fn login_keys(data: &[u8]) {
    let steps = steps(data);
    if steps.is_empty() {
        return;
    }
    let mut neg = Negotiator::new(TargetLimits::default());
    let mut ffp = Negotiator::new(TargetLimits::default());
    for s in &steps {
        let Ok(pairs) = text::parse(s.text) else { continue };
        check_text_round_trip(&pairs);
        match neg.login_keys(&pairs) {
            Ok(answers) => check_answers(&pairs, &answers),
            Err(_) => neg = Negotiator::new(TargetLimits::default()),
        }
        let answers = ffp.text_keys(&pairs);
        check_answers(&pairs, &answers);
        chap_values(&pairs);
    }
    neg.finish();
    check_params(&neg);
    check_params(&ffp);
    block_on(drive_connection(&steps));
}

fn check_text_round_trip(pairs: &[(String, String)]) {
    let back = text::parse(&text::encode(pairs)).expect("encoded keys parse");
    assert_eq!(back, pairs, "parse(encode(keys)) differs");
}

/// Every answer names a key that was offered (or is our MaxRecvDataSegmentLength
/// declaration) and the answer text is itself valid.
fn check_answers(offered: &[(String, String)], answers: &[(String, String)]) {
    for (k, _) in answers {
        assert!(
            k == "MaxRecvDataSegmentLength" || offered.iter().any(|(o, _)| o == k),
            "answer to a key never offered: {k}"
        );
    }
    check_text_round_trip(answers);
}

fn check_params(neg: &Negotiator) {
    let (p, l) = (&neg.params, &neg.limits);
    assert!(p.max_burst_length <= l.max_burst_length.max(262_144));
    assert!(p.first_burst_length <= l.first_burst_length.max(65_536));
    assert!((1..=l.max_outstanding_r2t.max(1)).contains(&p.max_outstanding_r2t));
    assert!((512..=0x00ff_ffff).contains(&p.initiator_max_recv_dsl));
    assert!(p.default_time2retain <= l.default_time2retain.max(20));
    assert!(p.error_recovery_level == 0 && p.max_connections == 1);
}

fn chap_target() -> Chap {
    Chap {
        user: "fuzz-user".into(),
        secret: "fuzz-secret-123".into(),
        mutual: Some(("fuzz-target".into(), "target-secret-12".into())),
    }
}

/// CHAP values: binary decoding is checked against the RFC 7143 grammar, and the whole
/// CHAP step runs against a fixed challenge.
fn chap_values(pairs: &[(String, String)]) {
    for (k, v) in pairs {
        if k.starts_with("CHAP_") {
            if let Some(bytes) = chap::decode_binary(v) {
                check_binary(v, &bytes);
            }
        }
        if k == "CHAP_A" {
            let _ = chap::select_algorithm(v);
        }
        if k == "AuthMethod" {
            let _ = text::select_auth_method(v, true);
            let _ = text::select_auth_method(v, false);
        }
    }
    let c = Challenge { id: 7, value: (0..32).collect() };
    if let Ok(answer) = c.verify(&chap_target(), pairs) {
        check_text_round_trip(&answer);
    }
}

/// A decoded binary value must come from a well-formed `0x` hex or `0b` base64 constant.
fn check_binary(v: &str, bytes: &[u8]) {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        assert!(h.bytes().all(|c| c.is_ascii_hexdigit()), "hex value with non-digits accepted: {v:?}");
        assert_eq!(bytes.len(), h.len().div_ceil(2));
        assert_eq!(chap::encode_hex(bytes)[2..], format!("{:0>w$}", h.to_lowercase(), w = 2 * bytes.len()));
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        let body = b.trim_end_matches('=');
        assert!(body.len() % 4 != 1, "base64 value with a dangling character accepted: {v:?}");
        assert_eq!(bytes.len(), body.len() * 3 / 4);
    } else {
        panic!("binary value without 0x/0b accepted: {v:?}");
    }
}

struct FuzzRegistry {
    targets: Vec<(TargetAccess, Arc<dyn ScsiTarget>)>,
}

impl FuzzRegistry {
    fn new() -> Self {
        let open = TargetAccess { name: OPEN_TARGET.into(), alias: Some("fuzz".into()), ..Default::default() };
        let chap = TargetAccess { name: CHAP_TARGET.into(), chap: Some(chap_target()), ..Default::default() };
        FuzzRegistry { targets: vec![(open, small_target(OPEN_TARGET)), (chap, small_target(CHAP_TARGET))] }
    }
}

#[async_trait]
impl TargetRegistry for FuzzRegistry {
    async fn discover(&self) -> Vec<(TargetAccess, Vec<Portal>)> {
        let portal = Portal { addr: std::net::SocketAddr::from(([127, 0, 0, 1], 3260)), tpgt: 1 };
        self.targets.iter().map(|(a, _)| (a.clone(), vec![portal.clone()])).collect()
    }
    async fn open(&self, name: &str) -> Option<(TargetAccess, Arc<dyn ScsiTarget>)> {
        self.targets.iter().find(|(a, _)| a.name == name).cloned()
    }
    fn local_port(&self) -> (u16, u16) {
        (1, 1)
    }
}

fn small_target(name: &str) -> Arc<scsi::Target> {
    let unit = scsi::LogicalUnit::new(
        Arc::new(MemoryDevice::new(UNIT_BYTES)),
        Arc::new(SinglePath),
        Arc::new(MemoryReservations::default()),
        Identity::for_volume(0xf022, "Fuzz", "0001"),
    );
    Arc::new(scsi::Target::new(name).with_lun(0, Arc::new(unit)))
}

async fn drive_connection(steps: &[Step<'_>]) {
    let ctx = Context {
        registry: Arc::new(FuzzRegistry::new()),
        sessions: Sessions::new(),
        config: Arc::new(conn::Config::default()),
        shutdown: CancellationToken::new(),
    };
    let (client, server) = tokio::io::duplex(1 << 20);
    let served = tokio::spawn(conn::serve_connection(server, ctx));
    let (mut rd, mut wr) = tokio::io::split(client);
    // Send everything, then close: the target must answer what it can and end the
    // connection on end of stream, whatever state the login is in.
    let writer = async {
        for (i, s) in steps.iter().enumerate() {
            let itt = i as u32;
            let header = if s.flags & 0x20 != 0 {
                Header::TextRequest(pdu::TextRequest {
                    immediate: true,
                    final_: s.flags & 0x40 == 0,
                    cont: s.flags & 0x40 != 0,
                    lun: [0; 8],
                    itt,
                    ttt: RESERVED_TAG,
                    cmdsn: 1,
                    exp_statsn: 0,
                })
            } else {
                Header::LoginRequest(pdu::LoginRequest {
                    transit: s.flags & 0x80 != 0,
                    cont: s.flags & 0x40 != 0,
                    csg: (s.flags >> 2) & 3,
                    nsg: s.flags & 3,
                    version_max: 0,
                    version_min: 0,
                    isid: [0x80, 0, 0, 0, 0, 1],
                    tsih: 0,
                    itt,
                    cid: 1,
                    cmdsn: 1,
                    exp_statsn: 0,
                })
            };
            let p = Pdu::with_data(header, Bytes::copy_from_slice(s.text));
            if pdu::write_pdu(&mut wr, &p, Digests::default()).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        let mut logging_in = true;
        // The target switches to the negotiated digests once the login completes.
        let (mut digests, mut negotiated) = (Digests::default(), Digests::default());
        while let Ok(Some(p)) = pdu::read_pdu(&mut rd, digests, 1 << 24).await {
            match &p.header {
                Header::LoginResponse(h) => {
                    assert!(logging_in, "login response after the login phase");
                    assert!(p.data.len() <= LOGIN_MAX_DATA as usize, "login response over 8 KiB");
                    if h.status_class == 0 {
                        let keys = text::parse(&p.data).expect("login response keys parse");
                        check_text_round_trip(&keys);
                        for (k, v) in &keys {
                            match k.as_str() {
                                "HeaderDigest" => negotiated.header = v == "CRC32C",
                                "DataDigest" => negotiated.data = v == "CRC32C",
                                _ => {}
                            }
                        }
                    }
                    if h.transit && h.nsg == 3 && h.status_class == 0 {
                        logging_in = false;
                        digests = negotiated;
                    }
                }
                Header::TextResponse(_) => {
                    assert!(!logging_in, "text response during login");
                    let keys = text::parse(&p.data).expect("text response keys parse");
                    check_text_round_trip(&keys);
                }
                Header::Reject(_) | Header::NopIn(_) | Header::AsyncMessage(_) => {}
                other => panic!("unexpected response {other:?}"),
            }
        }
    };
    tokio::join!(writer, reader);
    match served.await {
        Ok(_) => {}
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("connection task: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// SCSI CDBs
// ---------------------------------------------------------------------------------------

/// Executes a sequence of CDBs with their Data-Out against one small unit (state such as
/// reservations and unit attentions carries over between them), checking that the target
/// never sends more data than the CDB asked for and that failures carry well-formed sense.
pub fn scsi_cdb(data: &[u8]) {
    let target = small_target(OPEN_TARGET);
    let nexus = Nexus {
        initiator_name: "iqn.2024-01.org.example:fuzz".into(),
        isid: [0x80, 0, 0, 0, 0, 1],
        relative_port: 1,
        tpgt: 1,
    };
    let mut rest = data;
    block_on(async {
        for _ in 0..32 {
            let [lun, cdb_len, tail @ ..] = rest else { return };
            let cdb_len = usize::from(*cdb_len).min(260).min(tail.len());
            let (cdb_bytes, tail) = tail.split_at(cdb_len);
            let (data_out, tail) = match tail {
                [hi, lo, t @ ..] => {
                    let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(t.len());
                    t.split_at(n)
                }
                _ => (&[][..], &[][..]),
            };
            rest = tail;
            // The transport always hands over at least the 16 CDB bytes of the BHS.
            let mut c = cdb_bytes.to_vec();
            if c.len() < 16 {
                c.resize(16, 0);
            }
            let cmd = lu::ScsiCommand {
                lun: u64::from(*lun & 0x03),
                cdb: Bytes::from(c.clone()),
                data_out: Bytes::copy_from_slice(data_out),
                expected_in: 1 << 20,
                attr: lu::TaskAttr::Simple,
                nexus: nexus.clone(),
            };
            let resp = target.execute(cmd).await;
            check_response(&c, &resp);
        }
    });
}

/// What a CDB allows the target to return: its ALLOCATION LENGTH, or for a READ the
/// blocks it names; nothing for commands without data-in.
pub fn data_in_limit(c: &[u8]) -> u64 {
    let cdb = cdb::Cdb(c);
    let sa = cdb.service_action();
    match cdb.op() {
        0x03 | 0x1A => u64::from(cdb.u8(4)),
        0x12 => u64::from(cdb.u16(3)),
        0x25 => 8,
        0x5A | 0x5E | 0x37 => u64::from(cdb.u16(7)),
        0xB7 => u64::from(cdb.u32(6)),
        0x84 => u64::from(cdb.u32(10)),
        0x9E if sa == 0x10 || sa == 0x12 => u64::from(cdb.u32(10)),
        0xA0 => u64::from(cdb.u32(6)),
        0xA3 if matches!(sa, 0x0A | 0x0C | 0x0D) => u64::from(cdb.u32(6)),
        0x08 | 0x28 | 0xA8 | 0x88 => cdb::block_range(cdb, true).blocks * scsi::BLOCK_SIZE,
        _ => 0,
    }
}

fn check_response(c: &[u8], r: &lu::ScsiResponse) {
    let limit = data_in_limit(c);
    assert!(
        r.data_in.len() as u64 <= limit,
        "CDB {c:02x?}: {} bytes of data-in, the CDB allows {limit}",
        r.data_in.len()
    );
    match r.status {
        status::GOOD => assert!(r.sense.is_none(), "GOOD with sense"),
        status::CHECK_CONDITION => {
            assert!(r.data_in.is_empty(), "CHECK CONDITION with data-in");
            let s = r.sense.as_ref().expect("CHECK CONDITION without sense");
            assert_eq!(s.len(), 18, "fixed-format sense is 18 bytes");
            assert_eq!(s[0] & 0x7f, 0x70, "sense response code");
            assert_eq!(usize::from(s[7]), s.len() - 8, "additional sense length");
            assert_ne!(s[2] & 0x0f, 0, "CHECK CONDITION with NO SENSE");
            assert_eq!(s[2] & 0xf0, 0, "reserved bits of the sense key byte");
        }
        status::RESERVATION_CONFLICT | status::CONDITION_MET => {
            assert!(r.sense.is_none() && r.data_in.is_empty(), "status {:#x} with payload", r.status)
        }
        other => panic!("unexpected status {other:#x}"),
    }
}
