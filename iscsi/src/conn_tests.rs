//! Connection state machine tests: a scripted initiator talks to `serve_connection` over an
//! in-memory duplex stream.

use super::*;
use crate::lu::{Chap, Portal};
use crate::pdu::{read_pdu, DataOut, LoginRequest, NopOut, ScsiCommand, TaskMgmtRequest};
use std::sync::atomic::Ordering as O;
use tokio::io::DuplexStream;

#[allow(dead_code, clippy::unwrap_used)]
mod fake {
    use crate as basalt_iscsi;
    include!("../tests/common/fake_target.rs");
}
use fake::{FakeRegistry, FakeTarget, HANG};

const T1: &str = "iqn.2024-01.io.basalt:t1";
const T2: &str = "iqn.2024-01.io.basalt:t2";
const INI: &str = "iqn.2024-01.org.example:host1";

struct Setup {
    ctx: Context,
    reg: Arc<FakeRegistry>,
    t1: Arc<FakeTarget>,
}

fn setup(chap: Option<Chap>, acl: Vec<String>, config: Config) -> Setup {
    let t1 = FakeTarget::new(1 << 20);
    let t2 = FakeTarget::new(1 << 20);
    let reg = FakeRegistry {
        targets: vec![
            (
                TargetAccess { name: T1.into(), alias: Some("one".into()), chap, initiators: acl, ..Default::default() },
                t1.clone() as Arc<dyn ScsiTarget>,
            ),
            (TargetAccess { name: T2.into(), ..Default::default() }, t2 as Arc<dyn ScsiTarget>),
        ],
        portals: Mutex::new(vec![
            Portal { addr: "10.0.0.1:3260".parse().expect("addr"), tpgt: 1 },
            Portal { addr: "[fd00::2]:3260".parse().expect("addr"), tpgt: 2 },
        ]),
    };
    let reg = Arc::new(reg);
    let ctx = Context {
        registry: reg.clone(),
        sessions: Sessions::new(),
        config: Arc::new(config),
        shutdown: CancellationToken::new(),
    };
    Setup { ctx, reg, t1 }
}

struct Client {
    s: DuplexStream,
    digests: Digests,
    cmdsn: u32,
    itt: u32,
    isid: [u8; 6],
    server: tokio::task::JoinHandle<Result<()>>,
}

fn connect(ctx: &Context) -> Client {
    let (a, b) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(serve_connection(b, ctx.clone()));
    Client { s: a, digests: Digests::default(), cmdsn: 100, itt: 1, isid: [0x80, 0, 0, 0, 0, 1], server }
}

fn kv(s: &[(&str, &str)]) -> Vec<(String, String)> {
    s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Client {
    async fn send(&mut self, p: Pdu) {
        pdu::write_pdu(&mut self.s, &p, self.digests).await.expect("send");
    }

    async fn recv(&mut self) -> Pdu {
        tokio::time::timeout(Duration::from_secs(5), read_pdu(&mut self.s, self.digests, 1 << 24))
            .await
            .expect("response in time")
            .expect("well-formed response")
            .expect("a PDU, not EOF")
    }

    /// True when the target closes the connection (EOF or reset) within 5 s.
    async fn closed(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, read_pdu(&mut self.s, self.digests, 1 << 24)).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(_) => return true,
            }
        }
    }

    async fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, keys: &[(&str, &str)]) -> (LoginResponse, Vec<(String, String)>) {
        let h = LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: self.isid,
            tsih: 0,
            itt: self.itt,
            cid: 1,
            cmdsn: self.cmdsn,
            exp_statsn: 0,
        };
        self.send(Pdu::with_data(Header::LoginRequest(h), text::encode(&kv(keys)))).await;
        let r = self.recv().await;
        let Header::LoginResponse(h) = r.header else { panic!("not a login response: {r:?}") };
        (h, text::parse(&r.data).expect("text"))
    }

    /// One-step operational login to `target` (no security stage).
    async fn login(&mut self, target: &str, extra: &[(&str, &str)]) -> (LoginResponse, Vec<(String, String)>) {
        let mut keys = vec![("InitiatorName", INI), ("TargetName", target), ("SessionType", "Normal")];
        keys.extend_from_slice(extra);
        let r = self.login_pdu(1, 3, true, &keys).await;
        assert_eq!((r.0.status_class, r.0.status_detail), (0, 0), "login failed: {r:?}");
        r
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    async fn command(&mut self, cdb: &[u8], read: bool, write: bool, edtl: u32, imm: Bytes, final_: bool) -> u32 {
        let itt = self.next_itt();
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let h = ScsiCommand {
            immediate: false,
            final_,
            read,
            write,
            attr: 1,
            lun: [0; 8],
            itt,
            expected_len: edtl,
            cmdsn: self.cmdsn,
            exp_statsn: 0,
            cdb: c,
        };
        self.cmdsn += 1;
        self.send(Pdu::with_data(Header::ScsiCommand(h), imm)).await;
        itt
    }

    async fn data_out(&mut self, itt: u32, ttt: u32, datasn: u32, offset: u32, data: Bytes, final_: bool) {
        let h = DataOut { final_, lun: [0; 8], itt, ttt, exp_statsn: 0, datasn, offset };
        self.send(Pdu::with_data(Header::DataOut(h), data)).await;
    }

    /// Reads Data-In until the status arrives; returns data, status and the final PDU.
    async fn read_result(&mut self) -> (Vec<u8>, u8, Pdu, Vec<DataIn>) {
        let mut data = Vec::new();
        let mut dins = Vec::new();
        loop {
            let p = self.recv().await;
            match &p.header {
                Header::DataIn(d) => {
                    assert_eq!(d.offset as usize, data.len(), "Data-In in order");
                    data.extend_from_slice(&p.data);
                    dins.push(d.clone());
                    if d.has_status {
                        return (data, d.status, p.clone(), dins);
                    }
                }
                Header::ScsiResponse(r) => return (data, r.status, p.clone(), dins),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x2a, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = write10(lba, blocks);
    c[0] = 0x28;
    c
}

fn pattern(n: usize, seed: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
}

fn answer<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
    keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn login_negotiates_and_a_write_goes_through_r2ts_then_reads_back() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    let (h, keys) = c
        .login(
            T1,
            &[
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
                ("MaxBurstLength", "4096"),
                ("FirstBurstLength", "1024"),
                ("MaxRecvDataSegmentLength", "1024"),
                ("MaxOutstandingR2T", "2"),
                ("HeaderDigest", "None"),
            ],
        )
        .await;
    assert!(h.transit && h.csg == 1 && h.nsg == 3);
    assert_ne!(h.tsih, 0, "TSIH allocated on the final response");
    assert_eq!(h.exp_cmdsn, 100);
    assert_eq!(answer(&keys, "TargetPortalGroupTag"), Some("1"));
    assert_eq!(answer(&keys, "TargetAlias"), Some("one"));
    assert_eq!(answer(&keys, "MaxRecvDataSegmentLength"), Some("262144"));
    assert_eq!(answer(&keys, "MaxBurstLength"), Some("4096"));
    let login_statsn = h.statsn;

    // WRITE(10) of 16 blocks: 512 bytes immediate, the rest solicited in two bursts.
    let data = pattern(8192, 7);
    let itt = c.command(&write10(4, 16), false, true, 8192, data.slice(..512), true).await;
    let mut r2ts = Vec::new();
    for _ in 0..2 {
        let p = c.recv().await;
        let Header::R2t(r) = p.header else { panic!("expected R2T, got {p:?}") };
        r2ts.push(r);
    }
    assert_eq!((r2ts[0].offset, r2ts[0].desired_len, r2ts[0].r2tsn), (512, 4096, 0));
    assert_eq!((r2ts[1].offset, r2ts[1].desired_len, r2ts[1].r2tsn), (4608, 3584, 1));
    for r in &r2ts {
        let mut off = r.offset;
        let mut sn = 0;
        while off < r.offset + r.desired_len {
            let n = 1024.min(r.offset + r.desired_len - off);
            let last = off + n == r.offset + r.desired_len;
            c.data_out(itt, r.ttt, sn, off, data.slice(off as usize..(off + n) as usize), last).await;
            off += n;
            sn += 1;
        }
    }
    let (_, status, p, _) = c.read_result().await;
    assert_eq!(status, 0);
    let Header::ScsiResponse(resp) = p.header else { panic!() };
    assert_eq!(resp.itt, itt);
    assert_eq!(resp.statsn, login_statsn.wrapping_add(1), "StatSN continues from login");
    assert_eq!(resp.exp_cmdsn, 101);

    // READ it back: Data-In of at most 1024 bytes, F at each 4096-byte burst, S on the last.
    c.command(&read10(4, 16), true, false, 8192, Bytes::new(), true).await;
    let (got, status, _, dins) = c.read_result().await;
    assert_eq!(status, 0);
    assert_eq!(got, data.to_vec());
    assert_eq!(dins.len(), 8);
    assert!(dins.iter().enumerate().all(|(i, d)| d.datasn == i as u32));
    assert_eq!(dins.iter().filter(|d| d.final_).count(), 2);
    assert!(dins[7].has_status && dins[7].final_ && !dins[7].underflow);
    assert_eq!(dins[7].statsn, resp.statsn.wrapping_add(1));
}

#[tokio::test]
async fn unsolicited_data_out_up_to_first_burst_then_r2t_for_the_rest() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[("InitialR2T", "No"), ("FirstBurstLength", "2048"), ("MaxRecvDataSegmentLength", "65536")]).await;
    let data = pattern(4096, 3);
    let itt = c.command(&write10(0, 8), false, true, 4096, data.slice(..1024), false).await;
    c.data_out(itt, RESERVED_TAG, 0, 1024, data.slice(1024..2048), true).await;
    let p = c.recv().await;
    let Header::R2t(r) = p.header else { panic!("expected R2T, got {p:?}") };
    assert_eq!((r.offset, r.desired_len), (2048, 2048));
    c.data_out(itt, r.ttt, 0, 2048, data.slice(2048..), true).await;
    assert_eq!(c.read_result().await.1, 0);
    c.command(&read10(0, 8), true, false, 4096, Bytes::new(), true).await;
    assert_eq!(c.read_result().await.0, data.to_vec());
}

#[tokio::test]
async fn residuals_and_sense_are_reported() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[]).await;
    // READ CAPACITY(10) returns 8 bytes; the initiator asked for 16.
    c.command(&[0x25], true, false, 16, Bytes::new(), true).await;
    let (d, status, _, dins) = c.read_result().await;
    assert_eq!((d.len(), status), (8, 0));
    let last = dins.last().expect("data-in");
    assert!(last.underflow && last.residual == 8);
    // ... and INQUIRY with a too-small EDTL: overflow.
    c.command(&[0x12, 0, 0, 0, 36, 0], true, false, 20, Bytes::new(), true).await;
    let (d, _, _, dins) = c.read_result().await;
    assert_eq!(d.len(), 20);
    assert!(dins[0].overflow && dins[0].residual == 16);
    // An unknown opcode: CHECK CONDITION with sense behind a 2-byte length.
    c.command(&[0xee], true, false, 0, Bytes::new(), true).await;
    let (_, status, p, _) = c.read_result().await;
    assert_eq!(status, 2);
    assert_eq!(&p.data[..2], &[0, 18]);
    assert_eq!(p.data[2 + 2] & 0x0f, 0x05, "ILLEGAL REQUEST");
}

fn chap_cfg(mutual: bool) -> Chap {
    Chap {
        user: "alice".into(),
        secret: "alice-secret-12".into(),
        mutual: mutual.then(|| ("t1".into(), "target-secret-1".into())),
    }
}

/// Runs the CHAP exchange; returns the final security-stage response.
async fn chap_login(c: &mut Client, secret: &str, mutual: Option<&[u8]>) -> (LoginResponse, Vec<(String, String)>) {
    let (h, keys) = c
        .login_pdu(0, 1, true, &[("InitiatorName", INI), ("TargetName", T1), ("AuthMethod", "CHAP,None")])
        .await;
    assert_eq!((h.status_class, h.transit), (0, false));
    assert_eq!(answer(&keys, "AuthMethod"), Some("CHAP"));
    let (h, keys) = c.login_pdu(0, 1, false, &[("CHAP_A", "5")]).await;
    assert_eq!(h.status_class, 0);
    let id: u8 = answer(&keys, "CHAP_I").expect("CHAP_I").parse().expect("id");
    let ch = chap::decode_binary(answer(&keys, "CHAP_C").expect("CHAP_C")).expect("hex");
    assert!(ch.len() >= 16);
    let r = chap::encode_hex(&chap::response(id, secret.as_bytes(), &ch));
    let mut k = vec![("CHAP_N", "alice".to_string()), ("CHAP_R", r)];
    if let Some(m) = mutual {
        k.push(("CHAP_I", "9".into()));
        k.push(("CHAP_C", chap::encode_hex(m)));
    }
    let k: Vec<(&str, &str)> = k.iter().map(|(a, b)| (*a, b.as_str())).collect();
    c.login_pdu(0, 1, true, &k).await
}

#[tokio::test]
async fn chap_one_way_and_mutual_logins_succeed_with_the_right_secrets() {
    let s = setup(Some(chap_cfg(true)), vec![], Config::default());
    let mut c = connect(&s.ctx);
    let (h, _) = chap_login(&mut c, "alice-secret-12", None).await;
    assert_eq!((h.status_class, h.transit, h.csg, h.nsg), (0, true, 0, 1));
    let (h, _) = c.login_pdu(1, 3, true, &[("MaxRecvDataSegmentLength", "8192")]).await;
    assert_eq!((h.status_class, h.transit, h.nsg), (0, true, 3));

    let mut c = connect(&s.ctx);
    c.isid[5] = 2;
    let theirs: Vec<u8> = (1..=32).collect();
    let (h, keys) = chap_login(&mut c, "alice-secret-12", Some(&theirs)).await;
    assert_eq!(h.status_class, 0);
    assert_eq!(answer(&keys, "CHAP_N"), Some("t1"));
    let want = chap::encode_hex(&chap::response(9, b"target-secret-1", &theirs));
    assert_eq!(answer(&keys, "CHAP_R"), Some(want.as_str()));
}

#[tokio::test]
async fn chap_failures_are_authentication_failures() {
    let s = setup(Some(chap_cfg(false)), vec![], Config::default());
    // Wrong secret.
    let mut c = connect(&s.ctx);
    let (h, _) = chap_login(&mut c, "not-the-secret1", None).await;
    assert_eq!((h.status_class, h.status_detail), (2, 1));
    assert!(c.closed().await);
    // AuthMethod=None when the target requires CHAP.
    let mut c = connect(&s.ctx);
    let (h, _) = c.login_pdu(0, 1, true, &[("InitiatorName", INI), ("TargetName", T1), ("AuthMethod", "None")]).await;
    assert_eq!((h.status_class, h.status_detail), (2, 1));
    // Skipping the security stage.
    let mut c = connect(&s.ctx);
    let (h, _) = c.login_pdu(1, 3, true, &[("InitiatorName", INI), ("TargetName", T1)]).await;
    assert_eq!((h.status_class, h.status_detail), (2, 1));
    // Mutual CHAP asked of a target without a mutual secret.
    let mut c = connect(&s.ctx);
    let (h, _) = chap_login(&mut c, "alice-secret-12", Some(&[5u8; 16])).await;
    assert_eq!((h.status_class, h.status_detail), (2, 1));
}

#[tokio::test]
async fn login_errors_carry_the_right_status() {
    let s = setup(None, vec!["iqn.2024-01.org.example:other".into()], Config::default());
    type Case<'a> = (Vec<(&'a str, &'a str)>, (u8, u8));
    let cases: Vec<Case> = vec![
        (vec![("InitiatorName", INI), ("TargetName", "iqn.nope")], (2, 3)),
        (vec![("InitiatorName", INI), ("TargetName", T1)], (2, 2)),
        (vec![("TargetName", T2)], (2, 7)),
        (vec![("InitiatorName", INI)], (2, 7)),
        (vec![("InitiatorName", INI), ("TargetName", T2), ("SessionType", "Bogus")], (2, 9)),
    ];
    for (keys, want) in cases {
        let mut c = connect(&s.ctx);
        let (h, _) = c.login_pdu(1, 3, true, &keys).await;
        assert_eq!((h.status_class, h.status_detail), want, "{keys:?}");
        assert!(c.closed().await);
    }
    // Unsupported version.
    let mut c = connect(&s.ctx);
    let h = LoginRequest {
        transit: true,
        cont: false,
        csg: 1,
        nsg: 3,
        version_max: 2,
        version_min: 1,
        isid: c.isid,
        tsih: 0,
        itt: 1,
        cid: 0,
        cmdsn: 0,
        exp_statsn: 0,
    };
    c.send(Pdu::with_data(Header::LoginRequest(h), text::encode(&kv(&[("InitiatorName", INI)])))).await;
    let Header::LoginResponse(r) = c.recv().await.header else { panic!() };
    assert_eq!((r.status_class, r.status_detail), (2, 5));
}

#[tokio::test]
async fn discovery_lists_every_target_and_portal_and_refuses_scsi_commands() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    let (h, keys) = c
        .login_pdu(1, 3, true, &[("InitiatorName", INI), ("SessionType", "Discovery"), ("MaxBurstLength", "4096")])
        .await;
    assert_eq!((h.status_class, h.nsg), (0, 3));
    assert_eq!(answer(&keys, "MaxBurstLength"), Some("Irrelevant"));
    let itt = c.next_itt();
    let t = pdu::TextRequest {
        immediate: true,
        final_: true,
        cont: false,
        lun: [0; 8],
        itt,
        ttt: RESERVED_TAG,
        cmdsn: c.cmdsn,
        exp_statsn: 0,
    };
    c.send(Pdu::with_data(Header::TextRequest(t), text::encode(&kv(&[("SendTargets", "All")])))).await;
    let p = c.recv().await;
    let Header::TextResponse(r) = &p.header else { panic!("{p:?}") };
    assert!(r.final_ && !r.cont && r.itt == itt);
    let got = text::parse(&p.data).expect("text");
    assert_eq!(
        got,
        kv(&[
            ("TargetName", T1),
            ("TargetAddress", "10.0.0.1:3260,1"),
            ("TargetAddress", "[fd00::2]:3260,2"),
            ("TargetName", T2),
            ("TargetAddress", "10.0.0.1:3260,1"),
            ("TargetAddress", "[fd00::2]:3260,2"),
        ])
    );
    c.command(&[0x12, 0, 0, 0, 36, 0], true, false, 36, Bytes::new(), true).await;
    let Header::Reject(r) = c.recv().await.header else { panic!("expected Reject") };
    assert_eq!(r.reason, reject::PROTOCOL_ERROR);
}

#[tokio::test]
async fn long_send_targets_answers_are_split_with_the_c_bit() {
    let s = setup(None, vec![], Config::default());
    let many: Vec<Portal> =
        (0..200).map(|i| Portal { addr: format!("10.0.{}.{}:3260", i / 250, i % 250 + 1).parse().expect("a"), tpgt: 1 }).collect();
    s.reg.set_portals(many);
    let mut c = connect(&s.ctx);
    c.login_pdu(1, 3, true, &[("InitiatorName", INI), ("SessionType", "Discovery"), ("MaxRecvDataSegmentLength", "512")])
        .await;
    let t = |ttt| pdu::TextRequest {
        immediate: true,
        final_: true,
        cont: false,
        lun: [0; 8],
        itt: 5,
        ttt,
        cmdsn: 100,
        exp_statsn: 0,
    };
    c.send(Pdu::with_data(Header::TextRequest(t(RESERVED_TAG)), text::encode(&kv(&[("SendTargets", "All")])))).await;
    let mut all = Vec::new();
    loop {
        let p = c.recv().await;
        let Header::TextResponse(r) = p.header else { panic!() };
        assert!(p.data.len() <= 512);
        all.extend_from_slice(&p.data);
        if r.final_ {
            break;
        }
        assert!(r.cont && r.ttt != RESERVED_TAG);
        c.send(Pdu::new(Header::TextRequest(t(r.ttt)))).await;
    }
    let got = text::parse(&all).expect("text");
    assert_eq!(got.iter().filter(|(k, _)| k == "TargetAddress").count(), 400);
}

#[tokio::test]
async fn abort_task_drops_the_running_command_and_lun_reset_reaches_the_unit() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[]).await;
    let started = s.t1.started.clone();
    let hung = c.command(&[HANG], false, false, 0, Bytes::new(), true).await;
    tokio::time::timeout(Duration::from_secs(5), started.notified()).await.expect("command started");
    let tmf = |c: &mut Client, function, reft| TaskMgmtRequest {
        immediate: true,
        function,
        lun: [0; 8],
        itt: c.next_itt(),
        ref_task_tag: reft,
        cmdsn: c.cmdsn,
        exp_statsn: 0,
        ref_cmdsn: 0,
        exp_datasn: 0,
    };
    let h = tmf(&mut c, 1, hung);
    c.send(Pdu::new(Header::TaskMgmtRequest(h))).await;
    let Header::TaskMgmtResponse(r) = c.recv().await.header else { panic!() };
    assert_eq!(r.response, 0, "Function Complete");
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.t1.dropped.load(O::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the aborted command's future was not dropped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let h = tmf(&mut c, 1, 0xdead);
    c.send(Pdu::new(Header::TaskMgmtRequest(h))).await;
    let Header::TaskMgmtResponse(r) = c.recv().await.header else { panic!() };
    assert_eq!(r.response, 1, "Task Does Not Exist");
    // LUN RESET aborts the LUN's tasks, then tells the unit.
    c.command(&[HANG], false, false, 0, Bytes::new(), true).await;
    tokio::time::timeout(Duration::from_secs(5), started.notified()).await.expect("command started");
    let h = tmf(&mut c, 5, RESERVED_TAG);
    c.send(Pdu::new(Header::TaskMgmtRequest(h))).await;
    let Header::TaskMgmtResponse(r) = c.recv().await.header else { panic!() };
    assert_eq!(r.response, 0);
    assert_eq!(s.t1.tmfs.lock().expect("lock").as_slice(), &[(TaskManagement::LogicalUnitReset, 0)]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.t1.dropped.load(O::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "LUN reset left the command running");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The session still works afterwards.
    c.command(&[0x00], false, false, 0, Bytes::new(), true).await;
    assert_eq!(c.read_result().await.1, 0);
}

#[tokio::test]
async fn nop_out_is_echoed_and_a_silent_initiator_is_pinged_then_dropped() {
    let config = Config { nop_interval: Duration::from_millis(200), nop_timeout: Duration::from_millis(300), ..Default::default() };
    let s = setup(None, vec![], config);
    let mut c = connect(&s.ctx);
    c.login(T1, &[]).await;
    let itt = c.next_itt();
    let h = NopOut { immediate: true, lun: [0; 8], itt, ttt: RESERVED_TAG, cmdsn: c.cmdsn, exp_statsn: 0 };
    c.send(Pdu::with_data(Header::NopOut(h), Bytes::from_static(b"are you there"))).await;
    let p = c.recv().await;
    let Header::NopIn(n) = &p.header else { panic!("{p:?}") };
    assert_eq!((n.itt, n.ttt), (itt, RESERVED_TAG));
    assert_eq!(&p.data[..], b"are you there");
    // Idle: the target pings with a TTT; answer once, then go silent.
    let p = c.recv().await;
    let Header::NopIn(n) = p.header else { panic!() };
    assert!(n.itt == RESERVED_TAG && n.ttt != RESERVED_TAG);
    let h = NopOut { immediate: true, lun: [0; 8], itt: RESERVED_TAG, ttt: n.ttt, cmdsn: c.cmdsn, exp_statsn: 0 };
    c.send(Pdu::new(Header::NopOut(h))).await;
    let p = c.recv().await;
    assert!(matches!(p.header, Header::NopIn(_)), "pinged again after the next idle period");
    assert!(c.closed().await, "dead initiator dropped");
    let r = c.server.await.expect("join");
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert_eq!(s.t1.gone.load(O::SeqCst), 1);
}

#[tokio::test]
async fn out_of_order_commands_wait_for_the_gap() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[]).await;
    c.cmdsn = 101;
    let second = c.command(&[0x00], false, false, 0, Bytes::new(), true).await;
    // Nothing may come back before CmdSN 100 arrives.
    let early = tokio::time::timeout(Duration::from_millis(200), read_pdu(&mut c.s, c.digests, 1 << 20)).await;
    assert!(early.is_err(), "CmdSN 101 executed before 100: {early:?}");
    c.cmdsn = 100;
    let first = c.command(&[0x00], false, false, 0, Bytes::new(), true).await;
    let mut itts = vec![];
    let mut last_exp = 0;
    for _ in 0..2 {
        let Header::ScsiResponse(r) = c.recv().await.header else { panic!() };
        itts.push(r.itt);
        last_exp = r.exp_cmdsn;
    }
    itts.sort();
    assert_eq!(itts, vec![second, first].into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>());
    assert_eq!(last_exp, 102);
    // Outside the window (behind ExpCmdSN): dropped silently.
    c.cmdsn = 50;
    c.command(&[0x00], false, false, 0, Bytes::new(), true).await;
    let r = tokio::time::timeout(Duration::from_millis(200), read_pdu(&mut c.s, c.digests, 1 << 20)).await;
    assert!(r.is_err(), "stale CmdSN answered");
}

#[tokio::test]
async fn a_second_login_with_the_same_isid_reinstates_the_session() {
    let s = setup(None, vec![], Config::default());
    let mut a = connect(&s.ctx);
    let (ha, _) = a.login(T1, &[]).await;
    let mut b = connect(&s.ctx);
    let (hb, _) = b.login(T1, &[]).await;
    assert_ne!(ha.tsih, hb.tsih);
    assert!(a.closed().await, "old session closed");
    b.command(&[0x00], false, false, 0, Bytes::new(), true).await;
    assert_eq!(b.read_result().await.1, 0);
    assert_eq!(s.ctx.sessions.len(), 1);
}

#[tokio::test]
async fn bad_data_out_and_garbage_close_the_connection() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[("InitialR2T", "Yes")]).await;
    let itt = c.command(&write10(0, 2), false, true, 1024, Bytes::new(), true).await;
    let Header::R2t(r) = c.recv().await.header else { panic!() };
    c.data_out(itt, r.ttt, 0, 512, pattern(512, 1), true).await;
    assert!(c.closed().await);
    assert!(matches!(c.server.await.expect("join"), Err(Error::Protocol(_))));

    let mut c = connect(&s.ctx);
    c.login(T1, &[]).await;
    // 0x3f from an initiator is a target opcode: Reject, the connection stays.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x3f;
    c.s.write_all(&bhs).await.expect("write");
    let p = c.recv().await;
    assert!(matches!(p.header, Header::Reject(_)), "{p:?}");
    // An AHS whose length runs past TotalAHSLength: framing is lost, the connection ends.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x01;
    bhs[4] = 1;
    c.s.write_all(&bhs).await.expect("write");
    c.s.write_all(&[0, 40, 1, 0]).await.expect("write");
    assert!(c.closed().await);
    assert!(matches!(c.server.await.expect("join"), Err(Error::Ahs(_))));
}

/// The sense of a SCSI Response PDU: (key, ASC, ASCQ).
fn sense_of(p: &Pdu) -> (u8, u8, u8) {
    let d = &p.data[2..];
    (d[2] & 0x0f, d[12], d[13])
}

#[tokio::test]
async fn a_data_sn_gap_fails_only_its_command_and_the_session_goes_on() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[("InitialR2T", "No"), ("ImmediateData", "No")]).await;
    let old = pattern(1024, 1);
    let itt = c.command(&write10(0, 2), false, true, 1024, Bytes::new(), false).await;
    c.data_out(itt, RESERVED_TAG, 0, 0, old.slice(..512), false).await;
    c.data_out(itt, RESERVED_TAG, 1, 512, old.slice(512..), true).await;
    assert_eq!(c.read_result().await.1, 0);
    // Unsolicited data: DataSN 0 twice (the one between was "lost").
    let new = pattern(1024, 2);
    let itt = c.command(&write10(0, 2), false, true, 1024, Bytes::new(), false).await;
    c.data_out(itt, RESERVED_TAG, 0, 0, new.slice(..512), false).await;
    c.data_out(itt, RESERVED_TAG, 0, 512, new.slice(512..), true).await;
    let (_, status, p, _) = c.read_result().await;
    assert_eq!((status, sense_of(&p)), (2, (0x0b, 0x47, 0x05)), "ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR");
    // Solicited data: DataSN 27 for the first Data-Out of an R2T.
    let itt = c.command(&write10(0, 2), false, true, 1024, Bytes::new(), true).await;
    let Header::R2t(r) = c.recv().await.header else { panic!("expected R2T") };
    c.data_out(itt, r.ttt, 27, 0, new.clone(), true).await;
    let (_, status, p, _) = c.read_result().await;
    assert_eq!((status, sense_of(&p)), (2, (0x0b, 0x47, 0x05)));
    // Neither failed write reached the unit, and the session still works.
    c.command(&read10(0, 2), true, false, 1024, Bytes::new(), true).await;
    assert_eq!(c.read_result().await.0, old.to_vec());
    let itt = c.command(&write10(0, 2), false, true, 1024, Bytes::new(), true).await;
    let Header::R2t(r) = c.recv().await.header else { panic!("expected R2T") };
    c.data_out(itt, r.ttt, 0, 0, new.clone(), true).await;
    assert_eq!(c.read_result().await.1, 0);
    c.command(&read10(0, 2), true, false, 1024, Bytes::new(), true).await;
    assert_eq!(c.read_result().await.0, new.to_vec());
}

#[tokio::test]
async fn a_data_out_failing_its_digest_is_rejected_and_fails_its_command() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"), ("InitialR2T", "Yes")]).await;
    c.digests = Digests { header: true, data: true };
    let data = pattern(1024, 3);
    let itt = c.command(&write10(0, 2), false, true, 1024, Bytes::new(), true).await;
    let Header::R2t(r) = c.recv().await.header else { panic!("expected R2T") };
    let h = DataOut { final_: false, lun: [0; 8], itt, ttt: r.ttt, exp_statsn: 0, datasn: 0, offset: 0 };
    let mut wire = pdu::encode(&Pdu::with_data(Header::DataOut(h), data.slice(..512)), c.digests).expect("encode").to_vec();
    wire[48 + 4 + 100] ^= 0x10;
    c.s.write_all(&wire).await.expect("write");
    let p = c.recv().await;
    let Header::Reject(rj) = &p.header else { panic!("expected Reject, got {p:?}") };
    assert_eq!(rj.reason, reject::DATA_DIGEST);
    assert_eq!(&p.data[..4], &wire[..4], "the Reject carries the rejected header");
    // The rest of the data still comes; then the command ends with CHECK CONDITION.
    c.data_out(itt, r.ttt, 1, 512, data.slice(512..), true).await;
    let (_, status, p, _) = c.read_result().await;
    assert_eq!((status, sense_of(&p)), (2, (0x0b, 0x47, 0x05)));
    c.command(&read10(0, 2), true, false, 1024, Bytes::new(), true).await;
    assert_eq!(c.read_result().await.0, vec![0u8; 1024], "nothing was written");
    // Bad data in any other PDU still ends the connection (ERL 0).
    let h = NopOut { immediate: true, lun: [0; 8], itt: 99, ttt: RESERVED_TAG, cmdsn: c.cmdsn, exp_statsn: 0 };
    let mut wire = pdu::encode(&Pdu::with_data(Header::NopOut(h), pattern(8, 1)), c.digests).expect("encode").to_vec();
    wire[48 + 4 + 1] ^= 1;
    c.s.write_all(&wire).await.expect("write");
    assert!(c.closed().await);
    assert!(matches!(c.server.await.expect("join"), Err(Error::DataDigest { .. })));
}

#[tokio::test]
async fn logout_ends_the_session_and_releases_the_nexus() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[("DefaultTime2Wait", "5")]).await;
    let itt = c.next_itt();
    let h = pdu::LogoutRequest { immediate: true, reason: 0, itt, cid: 1, cmdsn: c.cmdsn, exp_statsn: 0 };
    c.send(Pdu::new(Header::LogoutRequest(h))).await;
    let Header::LogoutResponse(r) = c.recv().await.header else { panic!() };
    assert_eq!((r.response, r.itt, r.time2wait), (0, itt, 5));
    assert!(c.closed().await);
    assert!(c.server.await.expect("join").is_ok());
    assert_eq!(s.t1.gone.load(O::SeqCst), 1);
    assert!(s.ctx.sessions.is_empty());
}

#[tokio::test]
async fn digests_protect_the_full_feature_phase() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    let (_, keys) = c.login(T1, &[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")]).await;
    assert_eq!(answer(&keys, "HeaderDigest"), Some("CRC32C"));
    assert_eq!(answer(&keys, "DataDigest"), Some("CRC32C"));
    c.digests = Digests { header: true, data: true };
    c.command(&read10(0, 1), true, false, 512, Bytes::new(), true).await;
    assert_eq!(c.read_result().await.0.len(), 512);
    // A corrupted header digest ends the connection (ERL 0).
    let h = NopOut { immediate: true, lun: [0; 8], itt: 77, ttt: RESERVED_TAG, cmdsn: c.cmdsn, exp_statsn: 0 };
    let mut wire = pdu::encode(&Pdu::new(Header::NopOut(h)), c.digests).expect("encode").to_vec();
    wire[48] ^= 0xff;
    c.s.write_all(&wire).await.expect("write");
    assert!(c.closed().await);
    assert!(matches!(c.server.await.expect("join"), Err(Error::HeaderDigest { .. })));
}

#[tokio::test]
async fn shutdown_closes_logged_in_connections_with_an_async_message() {
    let s = setup(None, vec![], Config::default());
    let mut c = connect(&s.ctx);
    c.login(T1, &[]).await;
    s.ctx.shutdown.cancel();
    let p = c.recv().await;
    let Header::AsyncMessage(m) = p.header else { panic!("{p:?}") };
    assert_eq!(m.event, 3);
    assert!(c.closed().await);
}

#[test]
fn bidirectional_residuals_go_in_the_bidi_fields() {
    let info = ResponseInfo {
        itt: 1,
        lun_raw: [0; 8],
        read: true,
        bidi: true,
        expected_in: 100,
        expected_out: 0,
        r2ts: 2,
        max_data: 8192,
        max_burst: 262_144,
    };
    let sense = Some(Bytes::from_static(&[0x70, 0, 5]));
    let out = response_pdus(&info, lu::ScsiResponse { status: 2, sense, data_in: Bytes::from(vec![1u8; 60]), ..Default::default() });
    assert_eq!(out.len(), 2, "data-in then a response carrying the sense");
    let Header::ScsiResponse(r) = &out[1].header else { panic!() };
    assert!(r.bidi_underflow && r.bidi_residual == 40 && !r.underflow);
    assert_eq!(r.exp_datasn, 3);
    assert_eq!(&out[1].data[..], &[0, 3, 0x70, 0, 5]);
}

#[test]
fn write_residuals_compare_the_cdb_length_with_the_expected_length() {
    let info = |expected_out| ResponseInfo {
        itt: 1,
        lun_raw: [0; 8],
        read: false,
        bidi: false,
        expected_in: 0,
        expected_out,
        r2ts: 0,
        max_data: 8192,
        max_burst: 262_144,
    };
    let wrote = |want| lu::ScsiResponse { status: 0, data_out_len: Some(want), ..Default::default() };
    let response = |out: Vec<Pdu>| match out.as_slice() {
        [Pdu { header: Header::ScsiResponse(r), .. }] => (r.overflow, r.underflow, r.residual),
        other => panic!("{other:?}"),
    };
    assert_eq!(response(response_pdus(&info(0), wrote(512))), (true, false, 512));
    assert_eq!(response(response_pdus(&info(10_000), wrote(512))), (false, true, 10_000 - 512));
    assert_eq!(response(response_pdus(&info(1024), wrote(1024))), (false, false, 0));
    let none = lu::ScsiResponse::default();
    assert_eq!(response(response_pdus(&info(1024), none)), (false, false, 0));
}

#[test]
fn a_session_keeps_its_target_only_while_a_new_login_would_pass() {
    let chap = |user: &str, secret: &str| Some(Chap { user: user.into(), secret: secret.into(), mutual: None });
    let login = TargetAccess {
        name: T1.into(),
        chap: chap("u", "secret-one-two"),
        initiators: vec![INI.into()],
        luns: vec![(0, "v0".into()), (1, "v1".into())],
        ..Default::default()
    };
    let same = login.clone();
    assert_eq!(withdrawn(&login, &same, INI), None);
    // Widening access or adding a LUN takes nothing away.
    let wider = TargetAccess { chap: None, initiators: vec![], luns: vec![(0, "v0".into()), (1, "v1".into()), (2, "v2".into())], ..same.clone() };
    assert_eq!(withdrawn(&login, &wider, INI), None);
    let mutual = TargetAccess { chap: Some(Chap { mutual: Some(("t".into(), "target-secret-1".into())), ..chap("u", "secret-one-two").expect("chap") }), ..same.clone() };
    assert_eq!(withdrawn(&login, &mutual, INI), None, "the target's own credentials are not the initiator's");
    let acl = TargetAccess { initiators: vec!["iqn.2024-01.org.example:other".into()], ..same.clone() };
    assert!(withdrawn(&login, &acl, INI).expect("withdrawn").contains("ACL"));
    let secret = TargetAccess { chap: chap("u", "secret-three-four"), ..same.clone() };
    assert!(withdrawn(&login, &secret, INI).expect("withdrawn").contains("CHAP"));
    let open = TargetAccess { chap: None, ..login.clone() };
    assert!(withdrawn(&open, &same, INI).expect("withdrawn").contains("requires CHAP"));
    // A LUN removed is taken from the live session (the session stays); one that now
    // stands for another volume ends it.
    let removed = TargetAccess { luns: vec![(0, "v0".into())], ..same.clone() };
    assert_eq!(withdrawn(&login, &removed, INI), None);
    let remapped = TargetAccess { luns: vec![(0, "v0".into()), (1, "v9".into())], ..same.clone() };
    assert!(withdrawn(&login, &remapped, INI).expect("withdrawn").contains("LUN 1 now stands for volume v9"));
    // So does a LUN turned read-only, or writable again; a read-only LUN removed does not.
    let read_only = TargetAccess { read_only: vec![1], ..same.clone() };
    assert!(withdrawn(&login, &read_only, INI).expect("withdrawn").contains("LUN 1 is now read-only"));
    assert!(withdrawn(&read_only, &same, INI).expect("withdrawn").contains("LUN 1 is now writable"));
    let gone = TargetAccess { luns: vec![(0, "v0".into())], ..same.clone() };
    assert_eq!(withdrawn(&read_only, &gone, INI), None);
}

#[tokio::test]
async fn a_target_change_closes_the_sessions_it_shuts_out_and_only_those() {
    let s = setup(None, vec![], Config::default());
    let mut a = connect(&s.ctx);
    a.login(T1, &[]).await;
    let mut b = connect(&s.ctx);
    b.isid = [0x80, 0, 0, 0, 0, 2];
    b.login(T2, &[]).await;
    assert_eq!(s.ctx.sessions.targets(), vec![T1.to_string(), T2.to_string()]);
    let listed: Vec<(String, String, [u8; 6], bool)> =
        s.ctx.sessions.list().into_iter().map(|i| (i.target, i.initiator, i.isid, i.peer.is_none())).collect();
    assert_eq!(
        listed,
        vec![(T1.into(), INI.into(), [0x80, 0, 0, 0, 0, 1], true), (T2.into(), INI.into(), [0x80, 0, 0, 0, 0, 2], true)]
    );

    // A change that keeps this initiator in: nothing happens.
    let keeps = TargetAccess { name: T1.into(), initiators: vec![INI.into()], ..Default::default() };
    assert_eq!(s.ctx.sessions.revalidate(T1, Some(&keeps)), 0);
    a.command(&[0x00], false, false, 0, Bytes::new(), true).await;
    assert_eq!(a.read_result().await.1, 0);

    // The ACL now names someone else: the T1 session is told (event 3) and closed.
    let shuts_out = TargetAccess { initiators: vec!["iqn.2024-01.org.example:other".into()], ..keeps };
    assert_eq!(s.ctx.sessions.revalidate(T1, Some(&shuts_out)), 1);
    let p = a.recv().await;
    let Header::AsyncMessage(m) = p.header else { panic!("{p:?}") };
    assert_eq!(m.event, 3);
    assert!(a.closed().await, "session closed");
    let r = a.server.await.expect("join");
    assert!(matches!(&r, Err(Error::AccessWithdrawn(why)) if why.contains("ACL")), "{r:?}");
    assert_eq!(s.ctx.sessions.targets(), vec![T2.to_string()]);

    // The other target's session goes on; deleting that target closes it too.
    b.command(&[0x00], false, false, 0, Bytes::new(), true).await;
    assert_eq!(b.read_result().await.1, 0);
    assert_eq!(s.ctx.sessions.revalidate(T2, None), 1);
    assert!(b.closed().await);
    assert!(s.ctx.sessions.is_empty());
}
