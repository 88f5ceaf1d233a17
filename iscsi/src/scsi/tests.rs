//! Command-level tests of the SCSI layer: hand-built CDBs through [`Target`], checking
//! data-in bytes, status and sense as an initiator would see them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::sense::key;
use super::*;
use crate::lu::memory::{MemoryDevice, MemoryReservations, SinglePath};
use crate::lu::{
    DeviceError, PortGroup, Reservations, ScsiCommand, ScsiResponse, ScsiTarget, TaskAttr,
};

/// 1 MiB unit: 2048 blocks.
const BLOCKS: u64 = 2048;
const BS: usize = 512;

struct Fixture {
    target: Target,
    dev: Arc<MemoryDevice>,
}

fn nexus(name: &str, port: u16) -> Nexus {
    Nexus {
        initiator_name: format!("iqn.2024-01.test:{name}"),
        isid: [0x80, 0, 0, 0, 0, 1],
        relative_port: port,
        tpgt: port,
    }
}

fn unit(
    dev: Arc<dyn BlockDevice>,
    alua: Arc<dyn AluaStates>,
    res: Arc<dyn ReservationStore>,
) -> Arc<LogicalUnit> {
    Arc::new(LogicalUnit::new(dev, alua, res, Identity::for_volume(0x1234, "Volume", "0001")))
}

/// A unit of its own (a fresh in-memory device, one path, no reservations).
fn memory_unit() -> Arc<LogicalUnit> {
    let dev = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    unit(dev, Arc::new(SinglePath), Arc::new(MemoryReservations::default()))
}

fn fixture() -> Fixture {
    fixture_with(Arc::new(SinglePath))
}

fn fixture_with(alua: Arc<dyn AluaStates>) -> Fixture {
    let dev = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    let lu = unit(dev.clone(), alua, Arc::new(MemoryReservations::default()));
    Fixture { target: Target::new("iqn.2024-01.basalt:vol").with_lun(0, lu), dev }
}

/// One command through the target, the CDB padded to 16 bytes (also used by `xcopy`'s tests).
pub(super) async fn exec_lun(t: &Target, lun: u64, n: &Nexus, cdb: &[u8], data: &[u8]) -> ScsiResponse {
    let mut c = cdb.to_vec();
    c.resize(16.max(cdb.len()), 0);
    t.execute(ScsiCommand {
        lun,
        cdb: Bytes::from(c),
        data_out: Bytes::copy_from_slice(data),
        expected_in: 1 << 20,
        attr: TaskAttr::Simple,
        nexus: n.clone(),
    })
    .await
}

impl Fixture {
    async fn run(&self, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        exec_lun(&self.target, 0, &nexus("a", 1), cdb, data).await
    }
    async fn run_as(&self, n: &Nexus, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        exec_lun(&self.target, 0, n, cdb, data).await
    }
    async fn block(&self, lba: u64, n: u64) -> Vec<u8> {
        self.dev.read(lba * 512, n * 512).await.expect("device read").to_vec()
    }
}

#[track_caller]
fn good(r: &ScsiResponse) -> &[u8] {
    assert_eq!(r.status, status::GOOD, "sense {:02x?}", r.sense);
    &r.data_in
}

/// (sense key, ASC, ASCQ) of a CHECK CONDITION.
#[track_caller]
fn check(r: &ScsiResponse) -> (u8, u8, u8) {
    assert_eq!(r.status, status::CHECK_CONDITION, "data {:02x?}", r.data_in);
    let s = r.sense.as_ref().expect("sense with CHECK CONDITION");
    assert_eq!(s[0] & 0x7F, 0x70);
    (s[2] & 0x0F, s[12], s[13])
}

const INVALID_FIELD: (u8, u8, u8) = (key::ILLEGAL_REQUEST, 0x24, 0);
const LBA_RANGE: (u8, u8, u8) = (key::ILLEGAL_REQUEST, 0x21, 0);
const PARAM_LEN: (u8, u8, u8) = (key::ILLEGAL_REQUEST, 0x1A, 0);
const INVALID_PARAM: (u8, u8, u8) = (key::ILLEGAL_REQUEST, 0x26, 0);

// ---- CDB builders -------------------------------------------------------------------

fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x12, u8::from(evpd), page, a[0], a[1], 0]
}

fn rw10(op: u8, lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![op, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn rw16(op: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

fn rw12(op: u8, lba: u32, n: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&n.to_be_bytes());
    c
}

fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BS).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
}

fn maint_in(sa: u8, b2: u8, op: u8, req_sa: u16, alloc: u32) -> Vec<u8> {
    let mut c = vec![0xA3, sa, b2, op, 0, 0, 0, 0, 0, 0, 0, 0];
    c[4..6].copy_from_slice(&req_sa.to_be_bytes());
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

// ---- INQUIRY ------------------------------------------------------------------------

#[tokio::test]
async fn inquiry_standard_data_reports_spc4_alua_and_identity() {
    let f = fixture();
    let r = f.run(&inquiry(false, 0, 255), &[]).await;
    let d = good(&r);
    assert_eq!(d[0], 0x00, "direct access block device, connected");
    assert_eq!(d[2], 0x06, "SPC-4");
    assert_eq!(d[3], 0x12, "HiSup + response data format 2");
    assert_eq!(usize::from(d[4]), d.len() - 5, "additional length");
    assert_eq!(d[5] & 0x30, 0x10, "TPGS implicit");
    assert_eq!(&d[8..16], b"BASALT  ");
    assert_eq!(&d[16..32], b"Volume          ");
    assert_eq!(&d[32..36], b"0001");
}

#[tokio::test]
async fn inquiry_truncates_to_allocation_length() {
    let f = fixture();
    assert_eq!(good(&f.run(&inquiry(false, 0, 5), &[]).await).len(), 5);
    assert_eq!(good(&f.run(&inquiry(false, 0, 0), &[]).await).len(), 0);
    assert_eq!(good(&f.run(&inquiry(true, 0x83, 4), &[]).await).len(), 4);
}

#[tokio::test]
async fn inquiry_page_code_without_evpd_points_at_byte_2() {
    let f = fixture();
    let r = f.run(&inquiry(false, 0x80, 255), &[]).await;
    assert_eq!(check(&r), INVALID_FIELD);
    let s = r.sense.as_ref().expect("sense");
    assert_eq!(s[15] & 0xC0, 0xC0, "SKSV and C/D");
    assert_eq!(&s[16..18], &[0, 2]);
    assert_eq!(check(&f.run(&inquiry(true, 0x42, 255), &[]).await), INVALID_FIELD);
}

#[tokio::test]
async fn vpd_supported_pages_and_serial() {
    let f = fixture();
    let r = f.run(&inquiry(true, 0, 255), &[]).await;
    assert_eq!(good(&r), &[0, 0, 0, 7, 0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2]);
    let r = f.run(&inquiry(true, 0x80, 255), &[]).await;
    let d = good(&r);
    assert_eq!(d[1], 0x80);
    assert_eq!(&d[4..], b"0000000000001234");
    assert_eq!(usize::from(d[3]), d.len() - 4);
}

/// Walks the designators of VPD 0x83: (code set byte, association/type byte, value).
fn designators(d: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 4;
    while at + 4 <= d.len() {
        let len = usize::from(d[at + 3]);
        out.push((d[at], d[at + 1], d[at + 4..at + 4 + len].to_vec()));
        at += 4 + len;
    }
    out
}

struct TwoGroups(AccessState, AccessState);

#[async_trait]
impl AluaStates for TwoGroups {
    async fn port_groups(&self) -> Vec<PortGroup> {
        vec![
            PortGroup { id: 10, state: self.0, ports: vec![1] },
            PortGroup { id: 20, state: self.1, ports: vec![2, 3] },
        ]
    }
}

#[tokio::test]
async fn vpd_device_identification_names_unit_port_and_its_group() {
    let f = fixture_with(Arc::new(TwoGroups(
        AccessState::ActiveOptimized,
        AccessState::ActiveNonOptimized,
    )));
    let r = f.run_as(&nexus("a", 3), &inquiry(true, 0x83, 1024), &[]).await;
    let d = good(&r);
    assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - 4);
    let ds = designators(d);
    let naa = ds.iter().find(|x| x.1 == 0x03).expect("NAA designator");
    assert_eq!(naa.2.len(), 8);
    assert_eq!(naa.2[0] >> 4, 6, "NAA IEEE registered");
    assert_eq!(naa.2, Identity::naa_for_volume(0x1234).to_vec());
    let rtp = ds.iter().find(|x| x.1 & 0x3F == 0x14).expect("relative port");
    assert_eq!(rtp.2, vec![0, 0, 0, 3]);
    let tpg = ds.iter().find(|x| x.1 & 0x3F == 0x15).expect("port group");
    assert_eq!(tpg.2, vec![0, 0, 0, 20]);
    let name = ds.iter().find(|x| x.1 & 0x3F == 0x18).expect("port name");
    assert!(name.2.starts_with(b"iqn.2024-01.basalt:vol,t,0x0003\0"));
    assert_eq!(name.2.len() % 4, 0);
}

#[test]
fn naa_ids_are_stable_and_distinct() {
    let a = Identity::naa_for_volume(1);
    assert_eq!(a, Identity::naa_for_volume(1));
    assert_ne!(a, Identity::naa_for_volume(2));
    assert_eq!(a[0] >> 4, 6);
}

#[tokio::test]
async fn vpd_block_limits_and_provisioning() {
    let f = fixture();
    let r = f.run(&inquiry(true, 0xB0, 255), &[]).await;
    let d = good(&r);
    assert_eq!(d.len(), 64);
    assert_eq!(d[3], 0x3C);
    assert_eq!(d[5], MAX_COMPARE_AND_WRITE_BLOCKS as u8);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 8);
    let be32 = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    assert_eq!(u64::from(be32(8)), MAX_TRANSFER_BLOCKS);
    assert_eq!(u64::from(be32(20)), MAX_UNMAP_BLOCKS);
    assert_eq!(be32(24) as usize, MAX_UNMAP_DESCRIPTORS);
    assert_eq!(be32(28), 8, "unmap granularity");
    assert_eq!(be32(32), 0x8000_0000, "UGAVALID");
    assert_eq!(u64::from_be_bytes(d[36..44].try_into().expect("8")), MAX_WRITE_SAME_BLOCKS);
    let r = f.run(&inquiry(true, 0xB1, 255), &[]).await;
    assert_eq!(&good(&r)[4..6], &[0, 1], "non-rotating");
    let r = f.run(&inquiry(true, 0xB2, 255), &[]).await;
    let d = good(&r);
    assert_eq!(d[5] & 0xE4, 0xE4, "LBPU LBPWS LBPWS10 LBPRZ");
    assert_eq!(d[6] & 0x07, 0x02, "thin");
}

// ---- LUN addressing -------------------------------------------------------------------

#[tokio::test]
async fn absent_lun_inquiry_says_no_device_and_other_commands_fail() {
    let f = fixture();
    let n = nexus("a", 1);
    let r = exec_lun(&f.target, 7, &n, &inquiry(false, 0, 96), &[]).await;
    assert_eq!(good(&r)[0], 0x7F);
    let r = exec_lun(&f.target, 7, &n, &[0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(check(&r), (key::ILLEGAL_REQUEST, 0x25, 0));
    let r = exec_lun(&f.target, 7, &n, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    let d = good(&r);
    assert_eq!((d[12], d[13]), (0x25, 0));
}

#[tokio::test]
async fn report_luns_from_any_lun_with_select_report() {
    let dev = Arc::new(MemoryDevice::new(1 << 20));
    let mk = || unit(dev.clone(), Arc::new(SinglePath), Arc::new(MemoryReservations::default()));
    let t = Target::new("t").with_lun(1, mk()).with_lun(300, mk());
    let n = nexus("a", 1);
    let rl = |sel: u8, alloc: u32| {
        let mut c = vec![0xA0, 0, sel, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        c
    };
    // LUN 0 does not exist and still answers.
    let r = exec_lun(&t, 0, &n, &rl(0, 64), &[]).await;
    assert_eq!(good(&r), &[0, 0, 0, 16, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    let r = exec_lun(&t, 0, &n, &rl(2, 64), &[]).await;
    assert_eq!(good(&r).len(), 24);
    let r = exec_lun(&t, 0, &n, &rl(1, 64), &[]).await;
    assert_eq!(good(&r), &[0, 0, 0, 0, 0, 0, 0, 0]);
    let r = exec_lun(&t, 0, &n, &rl(0, 8), &[]).await;
    assert_eq!(good(&r), &[0, 0, 0, 16, 0, 0, 0, 0], "truncated, full length reported");
    assert_eq!(check(&exec_lun(&t, 0, &n, &rl(3, 64), &[]).await), INVALID_FIELD);
}

#[tokio::test]
async fn unknown_opcode_bad_service_action_and_naca() {
    let f = fixture();
    assert_eq!(check(&f.run(&[0xC7, 0, 0, 0, 0, 0], &[]).await), (key::ILLEGAL_REQUEST, 0x20, 0));
    // FORMAT UNIT is not supported.
    assert_eq!(check(&f.run(&[0x04, 0, 0, 0, 0, 0], &[]).await), (key::ILLEGAL_REQUEST, 0x20, 0));
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x05;
    assert_eq!(check(&f.run(&c, &[]).await), INVALID_FIELD);
    assert_eq!(check(&f.run(&[0, 0, 0, 0, 0, 0x04], &[]).await), INVALID_FIELD);
}

// ---- capacity ----------------------------------------------------------------------

#[tokio::test]
async fn read_capacity_10_and_16() {
    let f = fixture();
    let r = f.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(good(&r), &[0, 0, 0x07, 0xFF, 0, 0, 2, 0]);
    let r = f.run(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]).await;
    assert_eq!(check(&r), INVALID_FIELD, "LBA without PMI");
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let r = f.run(&c, &[]).await;
    let d = good(&r);
    assert_eq!(d.len(), 32);
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().expect("8")), BLOCKS - 1);
    assert_eq!(&d[8..12], &[0, 0, 2, 0]);
    assert_eq!(d[13] & 0x0F, 3, "LBPPBE");
    assert_eq!(d[14] & 0xC0, 0xC0, "LBPME LBPRZ");
    c[13] = 12;
    assert_eq!(good(&f.run(&c, &[]).await).len(), 12);
}

#[tokio::test]
async fn read_capacity10_saturates_for_huge_units() {
    struct Huge;
    #[async_trait]
    impl BlockDevice for Huge {
        fn size(&self) -> u64 {
            1 << 42
        }
        async fn read(&self, _: u64, len: u64) -> Result<Bytes, DeviceError> {
            Ok(Bytes::from(vec![0; len as usize]))
        }
        async fn write(&self, _: u64, _: Bytes) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn flush(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn unmap(&self, _: u64, _: u64) -> Result<(), DeviceError> {
            Ok(())
        }
    }
    let lu = unit(Arc::new(Huge), Arc::new(SinglePath), Arc::new(MemoryReservations::default()));
    let t = Target::new("t").with_lun(0, lu);
    let r = exec_lun(&t, 0, &nexus("a", 1), &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&good(&r)[0..4], &[0xFF; 4]);
}

// ---- READ / WRITE --------------------------------------------------------------------

#[tokio::test]
async fn write_and_read_back_in_every_cdb_size() {
    let f = fixture();
    let data = pattern(2, 1);
    good(&f.run(&rw10(0x2A, 10, 2), &data).await);
    assert_eq!(good(&f.run(&rw10(0x28, 10, 2), &[]).await), &data[..]);
    assert_eq!(good(&f.run(&rw16(0x88, 10, 2), &[]).await), &data[..]);
    assert_eq!(good(&f.run(&rw12(0xA8, 10, 2), &[]).await), &data[..]);
    let data = pattern(1, 9);
    good(&f.run(&rw16(0x8A, 100, 1), &data).await);
    good(&f.run(&rw12(0xAA, 101, 1), &data).await);
    good(&f.run(&[0x0A, 0, 0, 102, 1, 0], &data).await);
    assert_eq!(good(&f.run(&[0x08, 0, 0, 100, 3, 0], &[]).await), [&data[..], &data, &data].concat());
    // FUA and DPO are accepted.
    let mut c = rw10(0x2A, 5, 1);
    c[1] = 0x18;
    good(&f.run(&c, &data).await);
    // Extra Data-Out beyond the CDB length is ignored.
    good(&f.run(&rw10(0x2A, 6, 1), &pattern(2, 3)).await);
    assert_eq!(f.block(6, 1).await, pattern(1, 3));
    assert_eq!(f.block(7, 1).await, vec![0; BS]);
}

#[tokio::test]
async fn read6_length_zero_means_256_blocks() {
    let f = fixture();
    let r = f.run(&[0x08, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(good(&r).len(), 256 * BS);
    // READ(10) with zero blocks transfers nothing.
    assert_eq!(good(&f.run(&rw10(0x28, 0, 0), &[]).await).len(), 0);
}

#[tokio::test]
async fn out_of_range_and_overflowing_ranges_fail() {
    let f = fixture();
    assert_eq!(check(&f.run(&rw10(0x28, BLOCKS as u32 - 1, 2), &[]).await), LBA_RANGE);
    assert_eq!(check(&f.run(&rw16(0x88, u64::MAX - 1, 4), &[]).await), LBA_RANGE);
    assert_eq!(check(&f.run(&rw16(0x8A, u64::MAX, 1), &pattern(1, 0)).await), LBA_RANGE);
    // Zero blocks at the end is fine, one past it is not.
    good(&f.run(&rw10(0x28, BLOCKS as u32, 0), &[]).await);
    assert_eq!(check(&f.run(&rw10(0x28, BLOCKS as u32 + 1, 0), &[]).await), LBA_RANGE);
}

#[tokio::test]
async fn transfers_over_the_maximum_are_refused() {
    let dev = Arc::new(MemoryDevice::new(2 * MAX_TRANSFER_BLOCKS * 512));
    let lu = unit(dev, Arc::new(SinglePath), Arc::new(MemoryReservations::default()));
    let t = Target::new("t").with_lun(0, lu);
    let r = exec_lun(&t, 0, &nexus("a", 1), &rw16(0x88, 0, MAX_TRANSFER_BLOCKS as u32 + 1), &[]).await;
    assert_eq!(check(&r), INVALID_FIELD);
}

#[tokio::test]
async fn short_data_out_writes_the_whole_blocks_sent() {
    let f = fixture();
    let r = f.run(&rw10(0x2A, 0, 2), &pattern(1, 5)).await;
    good(&r);
    assert_eq!(r.data_out_len, Some(2 * BS as u32), "the transport reports the overflow");
    assert_eq!(f.block(0, 2).await, [pattern(1, 5), vec![0; BS]].concat());
    // No data at all: nothing written.
    good(&f.run(&rw10(0x2A, 4, 1), &[]).await);
    assert_eq!(f.block(4, 1).await, vec![0; BS]);
}

#[tokio::test]
async fn short_data_out_of_a_partial_block_fails_and_writes_nothing() {
    let f = fixture();
    let r = f.run(&rw16(0x8E, 0, 2), &pattern(2, 5)[..BS + 200]).await;
    assert_eq!(check(&r), (key::ILLEGAL_REQUEST, 0x0E, 0x03));
    assert_eq!(r.data_out_len, Some(2 * BS as u32));
    assert_eq!(f.block(0, 2).await, vec![0; 2 * BS]);
}

#[tokio::test]
async fn extra_data_out_is_ignored_and_its_length_reported() {
    let f = fixture();
    let r = f.run(&rw10(0x2A, 0, 1), &pattern(2, 5)).await;
    good(&r);
    assert_eq!(r.data_out_len, Some(BS as u32));
    assert_eq!(f.block(0, 2).await, [pattern(2, 5)[..BS].to_vec(), vec![0; BS]].concat());
    assert_eq!(f.run(&rw10(0x28, 0, 1), &[]).await.data_out_len, None);
}

#[tokio::test]
async fn protection_fields_are_refused() {
    let f = fixture();
    let mut c = rw10(0x28, 0, 1);
    c[1] = 0x20;
    assert_eq!(check(&f.run(&c, &[]).await), INVALID_FIELD);
    let mut c = rw16(0x8A, 0, 1);
    c[1] = 0x40;
    assert_eq!(check(&f.run(&c, &pattern(1, 0)).await), INVALID_FIELD);
}

/// A device that fails every call with the given error.
struct Failing(DeviceError);

#[async_trait]
impl BlockDevice for Failing {
    fn size(&self) -> u64 {
        1 << 20
    }
    async fn read(&self, _: u64, _: u64) -> Result<Bytes, DeviceError> {
        Err(self.0.clone())
    }
    async fn write(&self, _: u64, _: Bytes) -> Result<(), DeviceError> {
        Err(self.0.clone())
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Err(self.0.clone())
    }
    async fn unmap(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Err(self.0.clone())
    }
}

#[tokio::test]
async fn device_errors_map_to_sense() {
    let run = |e: DeviceError, cdb: Vec<u8>, data: Vec<u8>| async move {
        let lu = unit(Arc::new(Failing(e)), Arc::new(SinglePath), Arc::new(MemoryReservations::default()));
        let t = Target::new("t").with_lun(0, lu);
        check(&exec_lun(&t, 0, &nexus("a", 1), &cdb, &data).await)
    };
    let io = || DeviceError::Io("disk on fire".into());
    assert_eq!(run(io(), rw10(0x28, 0, 1), vec![]).await, (key::MEDIUM_ERROR, 0x11, 0));
    assert_eq!(run(io(), rw10(0x2A, 0, 1), pattern(1, 0)).await, (key::MEDIUM_ERROR, 0x0C, 0));
    let tr = DeviceError::Transitioning("moving".into());
    assert_eq!(run(tr, rw10(0x28, 0, 1), vec![]).await, (key::NOT_READY, 0x04, 0x0A));
    let un = DeviceError::Unavailable("no quorum".into());
    assert_eq!(run(un, rw10(0x2A, 0, 1), pattern(1, 0)).await, (key::NOT_READY, 0x04, 0x01));
}

#[tokio::test]
async fn alua_standby_port_refuses_io_but_answers_inquiry() {
    let f = fixture_with(Arc::new(TwoGroups(AccessState::ActiveOptimized, AccessState::Standby)));
    let n = nexus("a", 2);
    assert_eq!(check(&f.run_as(&n, &rw10(0x28, 0, 1), &[]).await), (key::NOT_READY, 0x04, 0x0B));
    good(&f.run_as(&n, &inquiry(false, 0, 96), &[]).await);
    good(&f.run_as(&nexus("a", 1), &rw10(0x28, 0, 1), &[]).await);
}

// ---- VERIFY, SYNCHRONIZE CACHE, GET LBA STATUS ------------------------------------------

#[tokio::test]
async fn verify_checks_readability_and_compares_with_miscompare_offset() {
    let f = fixture();
    let data = pattern(2, 4);
    good(&f.run(&rw10(0x2A, 20, 2), &data).await);
    good(&f.run(&rw10(0x2F, 20, 2), &[]).await); // BYTCHK 0
    let mut c = rw10(0x2F, 20, 2);
    c[1] = 0x02; // BYTCHK 01b
    good(&f.run(&c, &data).await);
    let mut other = data.clone();
    other[700] ^= 0xFF;
    let r = f.run(&c, &other).await;
    assert_eq!(check(&r), (key::MISCOMPARE, 0x1D, 0));
    let s = r.sense.as_ref().expect("sense");
    assert_eq!(s[0], 0xF0, "VALID");
    assert_eq!(&s[3..7], &700u32.to_be_bytes());
    // BYTCHK 11b: one block compared against every block.
    let one = pattern(1, 8);
    good(&f.run(&rw10(0x2A, 30, 1), &one).await);
    good(&f.run(&rw10(0x2A, 31, 1), &one).await);
    let mut c = rw16(0x8F, 30, 2);
    c[1] = 0x06;
    good(&f.run(&c, &one).await);
    assert_eq!(check(&f.run(&rw10(0x2F, BLOCKS as u32, 1), &[]).await), LBA_RANGE);
}

#[tokio::test]
async fn twelve_byte_write_and_verify_and_verify() {
    let f = fixture();
    let data = pattern(3, 5);
    good(&f.run(&rw12(0xAE, 40, 3), &data).await); // WRITE AND VERIFY(12)
    assert_eq!(f.block(40, 3).await, data);
    good(&f.run(&rw12(0xAF, 40, 3), &[]).await); // VERIFY(12), BYTCHK 0
    let mut c = rw12(0xAF, 40, 3);
    c[1] = 0x02; // BYTCHK 01b
    good(&f.run(&c, &data).await);
    let mut other = data.clone();
    other[1025] ^= 1;
    let r = f.run(&c, &other).await;
    assert_eq!(check(&r), (key::MISCOMPARE, 0x1D, 0));
    assert_eq!(&r.sense.as_ref().expect("sense")[3..7], &1025u32.to_be_bytes());
    assert_eq!(check(&f.run(&rw12(0xAF, BLOCKS as u32 - 1, 2), &[]).await), LBA_RANGE);
    assert_eq!(check(&f.run(&rw12(0xAE, BLOCKS as u32, 1), &pattern(1, 0)).await), LBA_RANGE);
    let mut c = rw12(0xAE, 0, 1);
    c[1] = 0x20; // WRPROTECT
    assert_eq!(check(&f.run(&c, &pattern(1, 0)).await), INVALID_FIELD);
}

#[tokio::test]
async fn pre_fetch_checks_the_range_and_is_good() {
    let f = fixture();
    good(&f.run(&rw10(0x34, 0, 256), &[]).await);
    good(&f.run(&rw16(0x90, BLOCKS - 1, 1), &[]).await);
    good(&f.run(&rw10(0x34, BLOCKS as u32, 0), &[]).await);
    let mut c = rw10(0x34, 0, 1);
    c[1] = 0x02; // IMMED
    good(&f.run(&c, &[]).await);
    assert_eq!(check(&f.run(&rw10(0x34, BLOCKS as u32 + 1, 0), &[]).await), LBA_RANGE);
    assert_eq!(check(&f.run(&rw10(0x34, BLOCKS as u32 - 1, 2), &[]).await), LBA_RANGE);
    assert_eq!(check(&f.run(&rw16(0x90, u64::MAX, 1), &[]).await), LBA_RANGE);
}

#[tokio::test]
async fn read_defect_data_is_an_empty_list_in_the_format_asked_for() {
    let f = fixture();
    // (10): REQ_PLIST | REQ_GLIST, format 5 (physical sector), allocation 32.
    let d = good(&f.run(&[0x37, 0, 0x18 | 0x05, 0, 0, 0, 0, 0, 32, 0], &[]).await).to_vec();
    assert_eq!(d, vec![0, 0x1D, 0, 0]);
    // (12): the request in byte 1, an 8-byte header.
    let mut c = vec![0u8; 12];
    c[0] = 0xB7;
    c[1] = 0x08 | 0x04;
    c[9] = 32;
    assert_eq!(good(&f.run(&c, &[]).await), &[0, 0x0C, 0, 0, 0, 0, 0, 0]);
    // The allocation length truncates.
    assert_eq!(good(&f.run(&[0x37, 0, 0x10, 0, 0, 0, 0, 0, 2, 0], &[]).await), &[0, 0x10]);
}

#[tokio::test]
async fn orwrite_ors_the_data_out_into_the_blocks() {
    let f = fixture();
    good(&f.run(&rw10(0x2A, 50, 2), &vec![0x0F; 2 * BS]).await);
    good(&f.run(&rw16(0x8B, 50, 2), &vec![0xA0; 2 * BS]).await);
    assert_eq!(f.block(50, 2).await, vec![0xAF; 2 * BS]);
    // The block after the range is untouched.
    assert_eq!(f.block(52, 1).await, vec![0; BS]);
    good(&f.run(&rw16(0x8B, 0, 0), &[]).await);
    assert_eq!(check(&f.run(&rw16(0x8B, BLOCKS + 1, 0), &[]).await), LBA_RANGE);
    assert_eq!(check(&f.run(&rw16(0x8B, BLOCKS - 1, 2), &vec![1; 2 * BS]).await), LBA_RANGE);
    let mut c = rw16(0x8B, 0, 1);
    c[1] = 0x40; // ORPROTECT
    assert_eq!(check(&f.run(&c, &vec![1; BS]).await), INVALID_FIELD);
    // Too little Data-Out changes nothing.
    assert_ne!(f.run(&rw16(0x8B, 50, 2), &vec![0xFF; BS]).await.status, status::GOOD);
    assert_eq!(f.block(50, 2).await, vec![0xAF; 2 * BS]);
}

#[tokio::test]
async fn synchronize_cache_checks_range() {
    let f = fixture();
    good(&f.run(&rw10(0x35, 0, 0), &[]).await);
    good(&f.run(&rw16(0x91, 0, BLOCKS as u32), &[]).await);
    assert_eq!(check(&f.run(&rw10(0x35, BLOCKS as u32, 1), &[]).await), LBA_RANGE);
}

fn get_lba_status(lba: u64, alloc: u32) -> Vec<u8> {
    let mut c = rw16(0x9E, lba, alloc);
    c[1] = 0x12;
    c
}

/// (LBA, blocks, provisioning status) of each descriptor in GET LBA STATUS data.
fn lba_status(d: &[u8]) -> Vec<(u64, u64, u8)> {
    let len = u32::from_be_bytes(d[0..4].try_into().expect("4")) as usize;
    assert_eq!(len + 4, d.len(), "parameter data length");
    d[8..]
        .chunks(16)
        .map(|c| {
            let lba = u64::from_be_bytes(c[0..8].try_into().expect("8"));
            (lba, u64::from(u32::from_be_bytes(c[8..12].try_into().expect("4"))), c[12] & 0x0F)
        })
        .collect()
}

#[tokio::test]
async fn get_lba_status_reports_what_is_allocated_from_the_starting_lba() {
    let f = fixture();
    good(&f.run(&rw10(0x2A, 0, 24), &pattern(24, 1)).await);
    let l = unmap_list(&[(0, 8), (16, 4)]);
    good(&f.run(&unmap_cdb(l.len() as u16), &l).await);
    let r = f.run(&get_lba_status(0, 1024), &[]).await;
    // Blocks 16..20 are half a 4 KiB page: zeroed but still mapped.
    assert_eq!(lba_status(good(&r)), vec![(0, 8, 1), (8, 16, 0), (24, BLOCKS - 24, 1)]);
    // The first descriptor starts at the starting LBA, even inside an extent.
    let r = f.run(&get_lba_status(9, 1024), &[]).await;
    assert_eq!(lba_status(good(&r)), vec![(9, 15, 0), (24, BLOCKS - 24, 1)]);
    let r = f.run(&get_lba_status(3, 1024), &[]).await;
    assert_eq!(lba_status(good(&r))[0], (3, 5, 1));
    // As many descriptors as the allocation length holds.
    let r = f.run(&get_lba_status(0, 24), &[]).await;
    assert_eq!(lba_status(good(&r)), vec![(0, 8, 1)]);
    assert_eq!(check(&f.run(&get_lba_status(BLOCKS, 24), &[]).await), LBA_RANGE);
}

#[tokio::test]
async fn get_lba_status_reports_mapped_when_the_device_cannot_tell() {
    let lu = unit(
        Arc::new(Slow(MemoryDevice::new(BLOCKS * BS as u64))),
        Arc::new(SinglePath),
        Arc::new(MemoryReservations::default()),
    );
    let t = Target::new("t").with_lun(0, lu);
    let r = exec_lun(&t, 0, &nexus("a", 1), &get_lba_status(100, 24), &[]).await;
    assert_eq!(lba_status(good(&r)), vec![(100, BLOCKS - 100, 0)]);
}

// ---- WRITE SAME, UNMAP ---------------------------------------------------------------

#[tokio::test]
async fn write_same_replicates_one_block() {
    let f = fixture();
    let one = pattern(1, 3);
    good(&f.run(&rw10(0x41, 8, 5), &one).await);
    assert_eq!(f.block(8, 5).await, one.repeat(5));
    assert_eq!(f.block(13, 1).await, vec![0; BS]);
    good(&f.run(&rw16(0x93, 40, 3), &one).await);
    assert_eq!(f.block(40, 3).await, one.repeat(3));
}

#[tokio::test]
async fn write_same_unmap_ndob_and_zero_length() {
    let f = fixture();
    good(&f.run(&rw10(0x2A, 0, 4), &pattern(4, 1)).await);
    let mut c = rw10(0x41, 0, 2);
    c[1] = 0x08; // UNMAP
    good(&f.run(&c, &[0; BS]).await);
    assert_eq!(f.block(0, 2).await, vec![0; 2 * BS]);
    // UNMAP deallocates whatever the block holds: deallocated blocks read as zeros.
    good(&f.run(&rw10(0x2A, 0, 4), &pattern(4, 1)).await);
    good(&f.run(&c, &pattern(1, 2)).await);
    assert_eq!(f.block(0, 2).await, vec![0; 2 * BS]);
    assert_eq!(f.block(2, 2).await, pattern(4, 1)[2 * BS..].to_vec());
    // NDOB: zeros without Data-Out.
    let mut c = rw16(0x93, 2, 2);
    c[1] = 0x09;
    good(&f.run(&c, &[]).await);
    assert_eq!(f.block(2, 2).await, vec![0; 2 * BS]);
    // Zero length: to the end of the unit.
    let one = pattern(1, 6);
    good(&f.run(&rw10(0x41, BLOCKS as u32 - 3, 0), &one).await);
    assert_eq!(f.block(BLOCKS - 3, 3).await, one.repeat(3));
    assert_eq!(check(&f.run(&rw10(0x41, BLOCKS as u32 + 1, 0), &one).await), LBA_RANGE);
}

#[tokio::test]
async fn write_same_refuses_wrong_data_size_and_excess_length() {
    let f = fixture();
    assert_eq!(check(&f.run(&rw10(0x41, 0, 1), &[0; 256]).await).0, key::ILLEGAL_REQUEST);
    assert_eq!(check(&f.run(&rw10(0x41, 0, 1), &[0; 1024]).await).0, key::ILLEGAL_REQUEST);
    let r = f.run(&rw16(0x93, 0, MAX_WRITE_SAME_BLOCKS as u32 + 1), &[0; BS]).await;
    assert_eq!(check(&r), INVALID_FIELD);
    // Never longer than one WRITE: initiators read back what they wrote the same way.
    let r = f.run(&rw16(0x93, 0, MAX_TRANSFER_BLOCKS as u32 + 1), &[0; BS]).await;
    assert_eq!(check(&r), INVALID_FIELD);
    assert_eq!(check(&f.run(&rw10(0x41, BLOCKS as u32 - 1, 2), &[0; BS]).await), LBA_RANGE);
}

fn unmap_cdb(len: u16) -> Vec<u8> {
    let mut c = vec![0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut l = vec![0u8; 8];
    for (lba, n) in ranges {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&n.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    let bd = (l.len() - 8) as u16;
    let ud = l.len() as u16 - 2;
    l[0..2].copy_from_slice(&ud.to_be_bytes());
    l[2..4].copy_from_slice(&bd.to_be_bytes());
    l
}

#[tokio::test]
async fn unmap_deallocates_listed_ranges() {
    let f = fixture();
    good(&f.run(&rw10(0x2A, 0, 16), &pattern(16, 1)).await);
    let l = unmap_list(&[(0, 8), (12, 2), (15, 0)]);
    good(&f.run(&unmap_cdb(l.len() as u16), &l).await);
    assert_eq!(f.block(0, 8).await, vec![0; 8 * BS]);
    assert_eq!(f.block(8, 4).await, pattern(16, 1)[8 * BS..12 * BS].to_vec());
    assert_eq!(f.block(12, 2).await, vec![0; 2 * BS]);
    good(&f.run(&unmap_cdb(0), &[]).await);
    let l = unmap_list(&[]);
    good(&f.run(&unmap_cdb(8), &l).await);
}

#[tokio::test]
async fn unmap_parameter_list_errors_change_nothing() {
    let f = fixture();
    good(&f.run(&rw10(0x2A, 0, 2), &pattern(2, 1)).await);
    assert_eq!(check(&f.run(&unmap_cdb(4), &[0; 4]).await), PARAM_LEN);
    // Block descriptor length claims more than the list holds.
    let mut l = unmap_list(&[(0, 1)]);
    l[2..4].copy_from_slice(&32u16.to_be_bytes());
    assert_eq!(check(&f.run(&unmap_cdb(l.len() as u16), &l).await), PARAM_LEN);
    // A good descriptor followed by one past the end: nothing is unmapped.
    let l = unmap_list(&[(0, 1), (BLOCKS - 1, 2)]);
    assert_eq!(check(&f.run(&unmap_cdb(l.len() as u16), &l).await), LBA_RANGE);
    assert_eq!(f.block(0, 2).await, pattern(2, 1));
    let l = unmap_list(&[(0, MAX_UNMAP_BLOCKS as u32 + 1)]);
    assert_eq!(check(&f.run(&unmap_cdb(l.len() as u16), &l).await), INVALID_PARAM);
    let many: Vec<(u64, u32)> = (0..=MAX_UNMAP_DESCRIPTORS as u64).map(|i| (i, 1)).collect();
    let l = unmap_list(&many);
    assert_eq!(check(&f.run(&unmap_cdb(l.len() as u16), &l).await), INVALID_PARAM);
    assert_eq!(f.block(0, 2).await, pattern(2, 1));
    // ANCHOR is not supported.
    let mut c = unmap_cdb(24);
    c[1] = 1;
    assert_eq!(check(&f.run(&c, &unmap_list(&[(0, 1)])).await), INVALID_FIELD);
}

// ---- COMPARE AND WRITE ---------------------------------------------------------------

fn caw(lba: u64, n: u8) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = n;
    c
}

#[tokio::test]
async fn compare_and_write_writes_on_match_and_reports_miscompare_offset() {
    let f = fixture();
    let old = pattern(2, 1);
    let new = pattern(2, 2);
    good(&f.run(&rw10(0x2A, 50, 2), &old).await);
    good(&f.run(&caw(50, 2), &[old.clone(), new.clone()].concat()).await);
    assert_eq!(f.block(50, 2).await, new);
    // Compare against stale data: miscompare at the first differing byte, no write.
    let mut stale = new.clone();
    stale[600] ^= 1;
    let r = f.run(&caw(50, 2), &[stale, old.clone()].concat()).await;
    assert_eq!(check(&r), (key::MISCOMPARE, 0x1D, 0));
    let s = r.sense.as_ref().expect("sense");
    assert_eq!(&s[3..7], &600u32.to_be_bytes());
    assert_eq!(f.block(50, 2).await, new);
}

#[tokio::test]
async fn compare_and_write_edge_cases() {
    let f = fixture();
    good(&f.run(&caw(0, 0), &[]).await);
    // Zero blocks with Data-Out: a length that wrapped (256 blocks), nothing is written.
    good(&f.run(&rw10(0x2A, 0, 1), &pattern(1, 1)).await);
    let r = f.run(&caw(0, 0), &[pattern(1, 1), pattern(1, 2)].concat()).await;
    assert_eq!(check(&r), INVALID_FIELD);
    assert_eq!(f.block(0, 1).await, pattern(1, 1));
    let r = f.run(&caw(0, MAX_COMPARE_AND_WRITE_BLOCKS as u8 + 1), &[]).await;
    assert_eq!(check(&r), INVALID_FIELD);
    assert_eq!(check(&f.run(&caw(BLOCKS, 1), &[0; 2 * BS]).await), LBA_RANGE);
    // Data-Out must be exactly 2 × N blocks.
    assert_eq!(check(&f.run(&caw(0, 1), &[0; 4 * BS]).await).0, key::ILLEGAL_REQUEST);
    assert_eq!(check(&f.run(&caw(0, 3), &[0; 4 * BS]).await).0, key::ILLEGAL_REQUEST);
}

/// A device whose reads yield to the scheduler, so concurrent commands interleave.
struct Slow(MemoryDevice);

#[async_trait]
impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read(&self, o: u64, l: u64) -> Result<Bytes, DeviceError> {
        let d = self.0.read(o, l).await;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        d
    }
    async fn write(&self, o: u64, d: Bytes) -> Result<(), DeviceError> {
        tokio::task::yield_now().await;
        self.0.write(o, d).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn unmap(&self, o: u64, l: u64) -> Result<(), DeviceError> {
        self.0.unmap(o, l).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_compare_and_writes_never_both_succeed() {
    // Every task tries to move the block from value 0 to its own value; with a real
    // read-compare-write lock exactly one wins, the others miscompare.
    let lu = unit(
        Arc::new(Slow(MemoryDevice::new(1 << 20))),
        Arc::new(SinglePath),
        Arc::new(MemoryReservations::default()),
    );
    let t = Arc::new(Target::new("t").with_lun(0, lu));
    let wins = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 1..=8u8 {
        let (t, wins) = (t.clone(), wins.clone());
        tasks.push(tokio::spawn(async move {
            let data = [vec![0u8; BS], vec![i; BS]].concat();
            let r = exec_lun(&t, 0, &nexus("a", 1), &caw(0, 1), &data).await;
            if r.status == status::GOOD {
                wins.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(wins.load(Ordering::SeqCst), 1);
}

// ---- MODE SENSE / SELECT ---------------------------------------------------------------

/// Splits MODE SENSE(6) data into (header, block descriptors, pages by code).
fn mode6_pages(d: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut at = 4 + usize::from(d[3]);
    let mut out = Vec::new();
    while at + 2 <= d.len() {
        let len = usize::from(d[at + 1]) + 2;
        out.push((d[at] & 0x3F, d[at..at + len].to_vec()));
        at += len;
    }
    out
}

#[tokio::test]
async fn mode_sense6_all_pages_with_block_descriptor() {
    let f = fixture();
    let r = f.run(&[0x1A, 0, 0x3F, 0, 255, 0], &[]).await;
    let d = good(&r);
    assert_eq!(usize::from(d[0]), d.len() - 1, "mode data length");
    assert_eq!(d[2] & 0x90, 0x10, "WP 0, DPOFUA 1");
    assert_eq!(d[3], 8);
    assert_eq!(&d[4..8], &(BLOCKS as u32).to_be_bytes());
    assert_eq!(&d[9..12], &[0, 2, 0]);
    let pages = mode6_pages(d);
    let codes: Vec<u8> = pages.iter().map(|p| p.0).collect();
    assert_eq!(codes, vec![0x01, 0x08, 0x0A, 0x1C]);
    let caching = &pages[1].1;
    assert_eq!(caching[1], 0x12);
    assert_eq!(caching[2] & 0x04, 0, "WCE = 0");
    // DBD: no descriptor.
    let r = f.run(&[0x1A, 0x08, 0x08, 0, 255, 0], &[]).await;
    let d = good(&r);
    assert_eq!(d[3], 0);
    assert_eq!(d[4], 0x08);
    assert_eq!(d.len(), 4 + 20);
    // Truncation keeps the full mode data length.
    let r = f.run(&[0x1A, 0, 0x3F, 0, 4, 0], &[]).await;
    let d = good(&r);
    assert_eq!(d.len(), 4);
    assert!(usize::from(d[0]) > 3);
}

#[tokio::test]
async fn mode_sense_page_control_and_errors() {
    let f = fixture();
    // Changeable values: nothing is.
    let r = f.run(&[0x1A, 0x08, 0x48, 0, 255, 0], &[]).await;
    let d = good(&r);
    assert!(d[6..].iter().all(|&b| b == 0), "{d:02x?}");
    // Default = current.
    let cur = f.run(&[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await;
    let def = f.run(&[0x1A, 0x08, 0x8A, 0, 255, 0], &[]).await;
    assert_eq!(good(&cur), good(&def));
    assert_eq!(check(&f.run(&[0x1A, 0, 0xC8, 0, 255, 0], &[]).await), (key::ILLEGAL_REQUEST, 0x39, 0));
    assert_eq!(check(&f.run(&[0x1A, 0, 0x19, 0, 255, 0], &[]).await), INVALID_FIELD);
    assert_eq!(check(&f.run(&[0x1A, 0, 0x08, 1, 255, 0], &[]).await), INVALID_FIELD);
    good(&f.run(&[0x1A, 0, 0x3F, 0xFF, 255, 0], &[]).await);
}

#[tokio::test]
async fn mode_sense10_long_lba_descriptor() {
    let f = fixture();
    let r = f.run(&[0x5A, 0x10, 0x08, 0, 0, 0, 0, 0x01, 0x00, 0], &[]).await;
    let d = good(&r);
    assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])), d.len() - 2);
    assert_eq!(d[4] & 1, 1, "LONGLBA");
    assert_eq!(&d[6..8], &[0, 16]);
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().expect("8")), BLOCKS);
    assert_eq!(&d[20..24], &[0, 0, 2, 0]);
    assert_eq!(d[24], 0x08);
}

#[tokio::test]
async fn mode_select_accepts_current_values_only() {
    let f = fixture();
    let r = f.run(&[0x1A, 0, 0x08, 0, 255, 0], &[]).await;
    let mut list = good(&r).to_vec();
    list[0] = 0; // mode data length is reserved in MODE SELECT
    let sel = |len: usize| vec![0x15, 0x10, 0, 0, len as u8, 0];
    good(&f.run(&sel(list.len()), &list).await);
    // Turning the write cache on is refused.
    let wce = 4 + 8 + 2;
    list[wce] |= 0x04;
    let r = f.run(&sel(list.len()), &list).await;
    assert_eq!(check(&r), INVALID_PARAM);
    let s = r.sense.as_ref().expect("sense");
    assert_eq!(s[15] & 0xC0, 0x80, "SKSV, pointer into the parameter list");
    assert_eq!(&s[16..18], &(wce as u16).to_be_bytes());
    assert_eq!(check(&f.run(&sel(3), &list[..3]).await), PARAM_LEN);
    good(&f.run(&sel(0), &[]).await);
    // Saving pages is not supported.
    assert_eq!(check(&f.run(&[0x15, 0x11, 0, 0, 4, 0], &[0; 4]).await), INVALID_FIELD);
}

/// The Control page through MODE SENSE(6), current values: (WP bit of the header, page).
async fn control_page(t: &Target, n: &Nexus) -> (bool, Vec<u8>) {
    let r = exec_lun(t, 0, n, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await;
    let d = good(&r).to_vec();
    (d[2] & 0x80 != 0, d[4..].to_vec())
}

/// MODE SELECT(6) of the Control page with SWP as given.
async fn select_swp(t: &Target, n: &Nexus, on: bool) -> ScsiResponse {
    let mut list = vec![0u8; 4];
    let mut page = control_page(t, n).await.1;
    page[4] = if on { page[4] | 0x08 } else { page[4] & !0x08 };
    list.extend(page);
    exec_lun(t, 0, n, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list).await
}

const SOFTWARE_WRITE_PROTECTED: (u8, u8, u8) = (key::DATA_PROTECT, 0x27, 0x02);
const MODE_PARAMETERS_CHANGED: (u8, u8, u8) = (key::UNIT_ATTENTION, 0x2A, 0x01);

/// SWP is the one changeable mode field. Set through one node, it shows (with WP) and is
/// enforced on every node serving the unit (they share the reservation record), every
/// other nexus is told MODE PARAMETERS CHANGED, and clearing it lets writes through again.
#[tokio::test]
async fn software_write_protect_is_set_by_mode_select_and_enforced_on_every_path() {
    let dev = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    let store = Arc::new(MemoryReservations::default());
    let events = Arc::new(CountResets::default());
    let identity = || Identity::for_volume(7, "Volume", "0001");
    let here = Arc::new(LogicalUnit::new(dev.clone(), Arc::new(SinglePath), store.clone(), identity()).with_events(events.clone()));
    let there = Arc::new(LogicalUnit::new(dev, Arc::new(SinglePath), store, identity()));
    let (t1, t2) = (Target::new("iqn.2024-01.basalt:vol").with_lun(0, here), Target::new("iqn.2024-01.basalt:vol").with_lun(0, there.clone()));
    let (a, b, c) = (nexus("a", 1), nexus("b", 1), nexus("c", 2));
    let tur = [0u8, 0, 0, 0, 0, 0];
    good(&exec_lun(&t1, 0, &b, &tur, &[]).await);
    good(&exec_lun(&t2, 0, &c, &tur, &[]).await);

    // Changeable: only SWP, in byte 4 of the Control page.
    let r = exec_lun(&t1, 0, &a, &[0x1A, 0x08, 0x4A, 0, 255, 0], &[]).await;
    assert_eq!(&good(&r)[4..], &[0x0A, 0x0A, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(control_page(&t1, &a).await, (false, vec![0x0A, 0x0A, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]));

    good(&select_swp(&t1, &a, true).await);
    assert_eq!(events.2.load(std::sync::atomic::Ordering::SeqCst), 1, "the change was not announced");
    let (wp, page) = control_page(&t1, &a).await;
    assert!(wp && page[4] & 0x08 != 0, "SWP not shown as set: {wp} {page:02x?}");
    // The defaults keep SWP clear.
    let r = exec_lun(&t1, 0, &a, &[0x1A, 0x08, 0x8A, 0, 255, 0], &[]).await;
    assert_eq!(good(&r)[4 + 4], 0);
    let w10 = |lba: u8| [0x2A, 0, 0, 0, 0, lba, 0, 0, 1, 0];
    let block = vec![0xA5u8; BS];
    assert_eq!(check(&exec_lun(&t1, 0, &a, &w10(3), &block).await), SOFTWARE_WRITE_PROTECTED);
    for (cdb, data) in [
        (vec![0x41, 0x08, 0, 0, 0, 3, 0, 0, 1, 0], vec![0u8; BS]), // WRITE SAME(10) UNMAP
        (vec![0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap_list(&[(3, 1)])),
        (vec![0x2E, 0, 0, 0, 0, 3, 0, 0, 1, 0], block.clone()), // WRITE AND VERIFY(10)
        (vec![0x89, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0], vec![0u8; 2 * BS]),
    ] {
        assert_eq!(check(&exec_lun(&t1, 0, &a, &cdb, &data).await), SOFTWARE_WRITE_PROTECTED, "{cdb:02x?}");
    }
    // Reads and cache flushes go on.
    good(&exec_lun(&t1, 0, &a, &[0x28, 0, 0, 0, 0, 3, 0, 0, 1, 0], &[]).await);
    good(&exec_lun(&t1, 0, &a, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    // The other nexus of this node is told, then is refused too; so is the other node's.
    assert_eq!(check(&exec_lun(&t1, 0, &b, &w10(3), &block).await), MODE_PARAMETERS_CHANGED);
    assert_eq!(check(&exec_lun(&t1, 0, &b, &w10(3), &block).await), SOFTWARE_WRITE_PROTECTED);
    there.mode_changed_elsewhere();
    assert_eq!(check(&exec_lun(&t2, 0, &c, &w10(3), &block).await), MODE_PARAMETERS_CHANGED);
    assert_eq!(check(&exec_lun(&t2, 0, &c, &w10(3), &block).await), SOFTWARE_WRITE_PROTECTED);
    assert!(control_page(&t2, &c).await.0, "WP not shown on the other node");

    // Anything else in the page must still repeat the current values.
    let mut list = vec![0u8; 4];
    list.extend(control_page(&t1, &a).await.1);
    list[4 + 3] = 0;
    assert_eq!(check(&exec_lun(&t1, 0, &a, &[0x15, 0x10, 0, 0, 16, 0], &list).await), INVALID_PARAM);
    assert!(control_page(&t1, &a).await.0, "a refused MODE SELECT changed SWP");

    // Cleared from the other node: writes pass everywhere.
    good(&select_swp(&t2, &c, false).await);
    assert!(!control_page(&t1, &a).await.0);
    good(&exec_lun(&t1, 0, &a, &w10(3), &block).await);
    // Selecting the value it already has changes (and announces) nothing.
    good(&select_swp(&t1, &a, false).await);
    assert_eq!(events.2.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A LUN that gives its unit read-only: reported write protected, every write refused with
/// WRITE PROTECTED (after the reservation checks) and reads served, while the same unit
/// through a writable LUN takes writes; through it, MODE SELECT may not set SWP either.
#[tokio::test]
async fn a_read_only_lun_reports_write_protect_and_refuses_every_write() {
    let unit = memory_unit();
    let target = Target::new("iqn.2024-01.basalt:vol");
    target.change_luns(vec![Lun::new(0, unit.clone()), Lun::read_only(1, unit)], &[], &[]);
    let a = nexus("a", 1);
    let wp = |r: ScsiResponse| good(&r)[2] & 0x80 != 0;
    assert!(!wp(exec_lun(&target, 0, &a, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await));
    assert!(wp(exec_lun(&target, 1, &a, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await));
    const PROTECTED: (u8, u8, u8) = (key::DATA_PROTECT, 0x27, 0x00);
    let block = vec![0x5Au8; BS];
    let w10 = [0x2A, 0, 0, 0, 0, 3, 0, 0, 1, 0];
    for (cdb, data) in [
        (w10.to_vec(), block.clone()),
        (vec![0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0], block.clone()), // WRITE(16)
        (vec![0x41, 0x08, 0, 0, 0, 3, 0, 0, 1, 0], vec![0u8; BS]),               // WRITE SAME(10) UNMAP
        (vec![0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap_list(&[(3, 1)])),
        (vec![0xAE, 0, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0], block.clone()), // WRITE AND VERIFY(12)
        (vec![0x89, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0], vec![0u8; 2 * BS]),
        (vec![0x8B, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0], block.clone()), // ORWRITE
    ] {
        assert_eq!(check(&exec_lun(&target, 1, &a, &cdb, &data).await), PROTECTED, "{cdb:02x?}");
    }
    // The writable LUN writes; the read-only one reads what it wrote.
    good(&exec_lun(&target, 0, &a, &w10, &block).await);
    let r = exec_lun(&target, 1, &a, &[0x28, 0, 0, 0, 0, 3, 0, 0, 1, 0], &[]).await;
    assert_eq!(good(&r), &block[..]);
    good(&exec_lun(&target, 1, &a, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    // SWP cannot be set through it (a repeat of the current page is fine).
    let mut list = vec![0u8; 4];
    list.extend(control_page(&target, &a).await.1);
    good(&exec_lun(&target, 1, &a, &[0x15, 0x10, 0, 0, 16, 0], &list).await);
    list[4 + 4] |= 0x08;
    assert_eq!(check(&exec_lun(&target, 1, &a, &[0x15, 0x10, 0, 0, 16, 0], &list).await), PROTECTED);
    assert!(!control_page(&target, &a).await.0, "SWP was set through a read-only LUN");
    // A reservation conflict still comes first.
    let b = nexus("b", 1);
    good(&exec_lun(&target, 0, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    assert_eq!(exec_lun(&target, 1, &a, &w10, &block).await.status, status::RESERVATION_CONFLICT);
}

// ---- unit attentions ---------------------------------------------------------------------

#[tokio::test]
async fn lun_reset_posts_unit_attention_to_every_nexus() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    good(&f.run_as(&a, &[0, 0, 0, 0, 0, 0], &[]).await);
    good(&f.run_as(&b, &[0, 0, 0, 0, 0, 0], &[]).await);
    let out = f.target.task_management(TaskManagement::LogicalUnitReset, 0, &a).await;
    assert_eq!(out, TmfOutcome::Complete);
    // The requester sees it too (SAM-5 6.3.3), once.
    assert_eq!(check(&f.run_as(&a, &[0, 0, 0, 0, 0, 0], &[]).await), (key::UNIT_ATTENTION, 0x29, 0));
    good(&f.run_as(&a, &[0, 0, 0, 0, 0, 0], &[]).await);
    // INQUIRY neither reports nor clears it.
    good(&f.run_as(&b, &inquiry(false, 0, 36), &[]).await);
    assert_eq!(check(&f.run_as(&b, &[0, 0, 0, 0, 0, 0], &[]).await), (key::UNIT_ATTENTION, 0x29, 0));
    good(&f.run_as(&b, &[0, 0, 0, 0, 0, 0], &[]).await);
    assert_eq!(
        f.target.task_management(TaskManagement::LogicalUnitReset, 9, &a).await,
        TmfOutcome::NoSuchLun
    );
}

#[tokio::test]
async fn request_sense_returns_and_clears_pending_attention() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    good(&f.run_as(&b, &[0, 0, 0, 0, 0, 0], &[]).await);
    f.target.task_management(TaskManagement::TargetWarmReset, 0, &a).await;
    let r = f.run_as(&b, &[0x03, 0, 0, 0, 252, 0], &[]).await;
    let d = good(&r);
    assert_eq!(d.len(), 18);
    assert_eq!((d[2] & 0x0F, d[12], d[13]), (key::UNIT_ATTENTION, 0x29, 0));
    let r = f.run_as(&b, &[0x03, 0, 0, 0, 252, 0], &[]).await;
    let d = good(&r);
    assert_eq!((d[2] & 0x0F, d[12], d[13]), (key::NO_SENSE, 0, 0));
}

// ---- persistent reservations -------------------------------------------------------------

fn prout(sa: u8, kind: u8, key: u64, sa_key: u64) -> (Vec<u8>, Vec<u8>) {
    // `kind` is the whole byte 2: scope in the high nibble, type in the low one.
    let c = vec![0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (c, p)
}

fn prin(sa: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x5E, sa, 0, 0, 0, 0, 0, a[0], a[1], 0]
}

impl Fixture {
    async fn pr(&self, n: &Nexus, sa: u8, kind: u8, key: u64, sa_key: u64) -> ScsiResponse {
        let (c, p) = prout(sa, kind, key, sa_key);
        self.run_as(n, &c, &p).await
    }
    /// READ KEYS from a nexus of its own, so it never consumes another's unit attention.
    async fn keys(&self) -> Vec<u64> {
        let r = self.run_as(&nexus("reader", 7), &prin(0, 1024), &[]).await;
        good(&r)[8..].chunks(8).map(|c| u64::from_be_bytes(c.try_into().expect("8"))).collect()
    }
}

const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const CLEAR: u8 = 3;
const PREEMPT: u8 = 4;
const REGISTER_IGNORE: u8 = 6;

#[tokio::test]
async fn register_read_keys_and_generation() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&b, REGISTER, 0, 0, 0xB).await);
    assert_eq!(f.keys().await, vec![0xA, 0xB]);
    let r = f.run(&prin(0, 1024), &[]).await;
    assert_eq!(&good(&r)[0..4], &2u32.to_be_bytes(), "PRgeneration");
    // Wrong current key: conflict; REGISTER AND IGNORE does not care.
    assert_eq!(f.pr(&a, REGISTER, 0, 0x99, 0xC).await.status, status::RESERVATION_CONFLICT);
    // Unregistered nexus with a non-zero key: conflict.
    let c = nexus("c", 1);
    assert_eq!(f.pr(&c, REGISTER, 0, 0x5, 0xC).await.status, status::RESERVATION_CONFLICT);
    good(&f.pr(&a, REGISTER_IGNORE, 0, 0, 0xAA).await);
    assert_eq!(f.keys().await, vec![0xAA, 0xB]);
    // Key 0 unregisters.
    good(&f.pr(&a, REGISTER, 0, 0xAA, 0).await);
    assert_eq!(f.keys().await, vec![0xB]);
    // READ KEYS truncates but reports the full length.
    let r = f.run(&prin(0, 8), &[]).await;
    assert_eq!(good(&r), &[0, 0, 0, 4, 0, 0, 0, 8]);
}

#[tokio::test]
async fn reserve_release_and_read_reservation() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&b, REGISTER, 0, 0, 0xB).await);
    // Not registered or wrong key: conflict.
    assert_eq!(f.pr(&nexus("c", 1), RESERVE, 1, 0xC, 0).await.status, status::RESERVATION_CONFLICT);
    assert_eq!(f.pr(&a, RESERVE, 1, 0xB, 0).await.status, status::RESERVATION_CONFLICT);
    good(&f.pr(&a, RESERVE, 1, 0xA, 0).await);
    good(&f.pr(&a, RESERVE, 1, 0xA, 0).await); // again: no-op
    assert_eq!(f.pr(&b, RESERVE, 1, 0xB, 0).await.status, status::RESERVATION_CONFLICT);
    let r = f.run(&prin(1, 64), &[]).await;
    let d = good(&r);
    assert_eq!(&d[4..8], &16u32.to_be_bytes());
    assert_eq!(&d[8..16], &0xAu64.to_be_bytes());
    assert_eq!(d[21], 1);
    // Release by a non-holder does nothing; the holder with the wrong type is refused.
    good(&f.pr(&b, RELEASE, 1, 0xB, 0).await);
    assert_eq!(check(&f.pr(&a, RELEASE, 3, 0xA, 0).await), (key::ILLEGAL_REQUEST, 0x26, 0x04));
    good(&f.pr(&a, RELEASE, 1, 0xA, 0).await);
    let r = f.run(&prin(1, 64), &[]).await;
    assert_eq!(&good(&r)[4..8], &[0; 4]);
    // Invalid type and scope.
    assert_eq!(check(&f.pr(&a, RESERVE, 2, 0xA, 0).await), INVALID_FIELD);
    assert_eq!(check(&f.pr(&a, RESERVE, 0x11, 0xA, 0).await), INVALID_FIELD);
}

/// The conflict matrix: for each type, what a registered non-holder and an unregistered
/// nexus may do (read, write), and that the holder may do both.
#[tokio::test]
async fn reservation_conflict_matrix() {
    // (type, registered may read, registered may write, other may read, other may write)
    let cases = [
        (1u8, true, false, true, false),
        (3, false, false, false, false),
        (5, true, true, true, false),
        (6, true, true, false, false),
        (7, true, true, true, false),
        (8, true, true, false, false),
    ];
    for (kind, reg_r, reg_w, oth_r, oth_w) in cases {
        let f = fixture();
        let (holder, reg, other) = (nexus("h", 1), nexus("r", 1), nexus("o", 2));
        good(&f.pr(&holder, REGISTER, 0, 0, 1).await);
        good(&f.pr(&reg, REGISTER, 0, 0, 2).await);
        good(&f.pr(&holder, RESERVE, kind, 1, 0).await);
        let allowed = |r: ScsiResponse| match r.status {
            status::GOOD => true,
            status::RESERVATION_CONFLICT => false,
            s => panic!("type {kind}: status {s:#x}"),
        };
        let read = rw10(0x28, 0, 1);
        let write = rw10(0x2A, 0, 1);
        let data = pattern(1, 0);
        assert!(allowed(f.run_as(&holder, &read, &[]).await), "type {kind} holder read");
        assert!(allowed(f.run_as(&holder, &write, &data).await), "type {kind} holder write");
        assert_eq!(allowed(f.run_as(&reg, &read, &[]).await), reg_r, "type {kind} registrant read");
        assert_eq!(allowed(f.run_as(&reg, &write, &data).await), reg_w, "type {kind} registrant write");
        assert_eq!(allowed(f.run_as(&other, &read, &[]).await), oth_r, "type {kind} other read");
        assert_eq!(allowed(f.run_as(&other, &write, &data).await), oth_w, "type {kind} other write");
        // Always allowed, whatever the type.
        for cdb in [inquiry(false, 0, 36), vec![0, 0, 0, 0, 0, 0], prin(0, 64), vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]] {
            assert!(allowed(f.run_as(&other, &cdb, &[]).await), "type {kind} {:#x}", cdb[0]);
        }
        // UNMAP and SYNCHRONIZE CACHE are writes.
        let l = unmap_list(&[(0, 1)]);
        assert_eq!(allowed(f.run_as(&other, &unmap_cdb(24), &l).await), oth_w, "type {kind} unmap");
        assert_eq!(allowed(f.run_as(&other, &rw10(0x35, 0, 0), &[]).await), oth_w, "type {kind} sync");
    }
}

#[tokio::test]
async fn unregistering_the_holder_releases_and_all_registrants_survive_one() {
    let f = fixture();
    let (a, b, o) = (nexus("a", 1), nexus("b", 1), nexus("o", 1));
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&b, REGISTER, 0, 0, 0xB).await);
    good(&f.pr(&a, RESERVE, 5, 0xA, 0).await);
    good(&f.pr(&a, REGISTER, 0, 0xA, 0).await);
    // Registrants-only reservation released by unregistering: others are told.
    assert_eq!(check(&f.run_as(&b, &[0, 0, 0, 0, 0, 0], &[]).await), (key::UNIT_ATTENTION, 0x2A, 0x04));
    good(&f.run_as(&o, &rw10(0x2A, 0, 1), &pattern(1, 0)).await);
    // All registrants: the reservation stays while one registrant is left.
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&a, RESERVE, 8, 0xA, 0).await);
    good(&f.pr(&a, REGISTER, 0, 0xA, 0).await);
    assert_eq!(f.run_as(&o, &rw10(0x28, 0, 1), &[]).await.status, status::RESERVATION_CONFLICT);
    let r = f.run(&prin(1, 64), &[]).await;
    let d = good(&r);
    assert_eq!(d[21], 8);
    assert_eq!(&d[8..16], &[0; 8], "all-registrants reservation key is 0");
    good(&f.pr(&b, REGISTER, 0, 0xB, 0).await);
    good(&f.run_as(&o, &rw10(0x28, 0, 1), &[]).await);
}

#[tokio::test]
async fn preempt_takes_over_and_tells_the_preempted() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 2));
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&b, REGISTER, 0, 0, 0xB).await);
    good(&f.pr(&a, RESERVE, 3, 0xA, 0).await);
    assert_eq!(f.run_as(&b, &rw10(0x28, 0, 1), &[]).await.status, status::RESERVATION_CONFLICT);
    // Preempting a key nobody has: conflict. SARK 0 without naming the holder: invalid.
    assert_eq!(f.pr(&b, PREEMPT, 3, 0xB, 0x77).await.status, status::RESERVATION_CONFLICT);
    assert_eq!(check(&f.pr(&b, PREEMPT, 3, 0xB, 0).await), INVALID_PARAM);
    good(&f.pr(&b, PREEMPT, 1, 0xB, 0xA).await);
    assert_eq!(f.keys().await, vec![0xB]);
    let r = f.run_as(&b, &prin(1, 64), &[]).await;
    let d = good(&r);
    assert_eq!((&d[8..16], d[21]), (&0xBu64.to_be_bytes()[..], 1));
    assert_eq!(check(&f.run_as(&a, &[0, 0, 0, 0, 0, 0], &[]).await), (key::UNIT_ATTENTION, 0x2A, 0x03));
    // a is no longer registered: may read (Write Exclusive) but not write.
    good(&f.run_as(&a, &rw10(0x28, 0, 1), &[]).await);
    assert_eq!(f.run_as(&a, &rw10(0x2A, 0, 1), &pattern(1, 0)).await.status, status::RESERVATION_CONFLICT);
}

#[tokio::test]
async fn clear_removes_everything_and_posts_attention() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&b, REGISTER, 0, 0, 0xB).await);
    good(&f.pr(&a, RESERVE, 6, 0xA, 0).await);
    assert_eq!(f.pr(&nexus("c", 1), CLEAR, 0, 0xC, 0).await.status, status::RESERVATION_CONFLICT);
    good(&f.pr(&a, CLEAR, 0, 0xA, 0).await);
    assert!(f.keys().await.is_empty());
    assert_eq!(check(&f.run_as(&b, &[0, 0, 0, 0, 0, 0], &[]).await), (key::UNIT_ATTENTION, 0x2A, 0x03));
    good(&f.run_as(&b, &rw10(0x2A, 0, 1), &pattern(1, 0)).await);
}

#[tokio::test]
async fn report_capabilities_and_full_status() {
    let f = fixture();
    let a = nexus("a", 1);
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&a, RESERVE, 1, 0xA, 0).await);
    let r = f.run(&prin(2, 64), &[]).await;
    let d = good(&r);
    assert_eq!(d.len(), 8);
    assert_eq!(&d[0..2], &[0, 8]);
    assert_eq!(d[2] & 0x0C, 0, "no SIP_C, no ATP_C");
    assert_eq!(d[3] & 0x80, 0x80, "TMV");
    assert_eq!((d[4], d[5]), (0xEA, 0x01));
    let r = f.run(&prin(3, 1024), &[]).await;
    let d = good(&r);
    let len = u32::from_be_bytes(d[4..8].try_into().expect("4")) as usize;
    assert_eq!(len, d.len() - 8);
    let desc = &d[8..];
    assert_eq!(&desc[0..8], &0xAu64.to_be_bytes());
    assert_eq!(desc[12] & 0x01, 1, "R_HOLDER");
    assert_eq!(desc[13], 1);
    assert_eq!(&desc[18..20], &[0, 1], "relative target port");
    let tid_len = u32::from_be_bytes(desc[20..24].try_into().expect("4")) as usize;
    let tid = &desc[24..24 + tid_len];
    assert_eq!(tid[0], 0x45);
    assert!(tid[4..].starts_with(a.initiator_port().as_bytes()));
    assert_eq!(tid_len % 4, 0);
    assert_eq!(check(&f.run(&prin(4, 64), &[]).await), INVALID_FIELD);
}

#[tokio::test]
async fn prout_parameter_list_checks() {
    let f = fixture();
    let (mut c, p) = prout(REGISTER, 0, 0, 1);
    c[8] = 20;
    assert_eq!(check(&f.run(&c, &p[..20]).await), PARAM_LEN);
    let (c, mut p) = prout(REGISTER, 0, 0, 1);
    p[20] = 0x04; // ALL_TG_PT
    assert_eq!(check(&f.run(&c, &p).await), INVALID_PARAM);
    // REGISTER AND MOVE is not supported.
    let (c, p) = prout(7, 1, 0, 1);
    assert_eq!(check(&f.run(&c, &p).await), INVALID_FIELD);
}

#[tokio::test]
async fn registrations_survive_nexus_loss_and_resets() {
    let f = fixture();
    let a = nexus("a", 1);
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    good(&f.pr(&a, RESERVE, 3, 0xA, 0).await);
    f.target.nexus_gone(&a).await;
    f.target.task_management(TaskManagement::TargetColdReset, 0, &nexus("b", 1)).await;
    assert_eq!(f.keys().await, vec![0xA]);
    // b gets the reset attention first (TEST UNIT READY is allowed under the reservation).
    assert_eq!(check(&f.run_as(&nexus("b", 1), &[0, 0, 0, 0, 0, 0], &[]).await).0, key::UNIT_ATTENTION);
    assert_eq!(f.run_as(&nexus("b", 1), &rw10(0x28, 0, 1), &[]).await.status, status::RESERVATION_CONFLICT);
}

// ---- SPC-2 RESERVE / RELEASE ----------------------------------------------------------

const RESERVE6: [u8; 6] = [0x16, 0, 0, 0, 0, 0];
const RELEASE6: [u8; 6] = [0x17, 0, 0, 0, 0, 0];
const RESERVE10: [u8; 10] = [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const RELEASE10: [u8; 10] = [0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const TUR: [u8; 6] = [0, 0, 0, 0, 0, 0];

#[tokio::test]
async fn spc2_reservation_excludes_other_nexuses_until_released() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    good(&f.run_as(&a, &RESERVE6, &[]).await);
    good(&f.run_as(&a, &RESERVE6, &[]).await); // again: GOOD
    good(&f.run_as(&a, &rw10(0x2A, 0, 1), &pattern(1, 1)).await);
    for cdb in [&RESERVE6[..], &RESERVE10, &TUR, &rw10(0x28, 0, 1), &[0x1A, 0, 0x3F, 0, 255, 0], &read_capacity16()] {
        assert_eq!(f.run_as(&b, cdb, &[]).await.status, status::RESERVATION_CONFLICT, "{cdb:02x?}");
    }
    // What a reservation never blocks; RELEASE from a non-holder is GOOD and changes nothing.
    good(&f.run_as(&b, &inquiry(false, 0, 36), &[]).await);
    good(&f.run_as(&b, &[0x03, 0, 0, 0, 18, 0], &[]).await);
    good(&f.run_as(&b, &RELEASE6, &[]).await);
    assert_eq!(f.run_as(&b, &TUR, &[]).await.status, status::RESERVATION_CONFLICT);
    good(&f.run_as(&a, &RELEASE10, &[]).await);
    good(&f.run_as(&b, &RESERVE10, &[]).await);
    assert_eq!(f.run_as(&a, &TUR, &[]).await.status, status::RESERVATION_CONFLICT);
    good(&f.run_as(&b, &RELEASE6, &[]).await);
    good(&f.run_as(&a, &TUR, &[]).await);
}

#[tokio::test]
async fn spc2_reservation_goes_with_its_nexus_and_with_resets() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    good(&f.run_as(&a, &RESERVE6, &[]).await);
    f.target.nexus_gone(&b).await; // someone else leaving changes nothing
    assert_eq!(f.run_as(&b, &RESERVE6, &[]).await.status, status::RESERVATION_CONFLICT);
    f.target.nexus_gone(&a).await;
    good(&f.run_as(&b, &RESERVE6, &[]).await);
    // A LUN reset from anyone releases it (b first gets the reset's unit attention).
    f.target.task_management(TaskManagement::LogicalUnitReset, 0, &a).await;
    assert_eq!(check(&f.run_as(&a, &RESERVE6, &[]).await).0, key::UNIT_ATTENTION);
    good(&f.run_as(&a, &RESERVE6, &[]).await);
    f.target.task_management(TaskManagement::TargetWarmReset, 0, &b).await;
    assert_eq!(check(&f.run_as(&b, &RESERVE6, &[]).await).0, key::UNIT_ATTENTION);
    good(&f.run_as(&b, &RESERVE6, &[]).await);
}

#[tokio::test]
async fn spc2_and_persistent_reservations_exclude_each_other() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    // Reserved: PR commands conflict for every nexus, the holder included.
    good(&f.run_as(&a, &RESERVE6, &[]).await);
    assert_eq!(f.pr(&a, REGISTER, 0, 0, 0xA).await.status, status::RESERVATION_CONFLICT);
    assert_eq!(f.run_as(&b, &prin(0, 64), &[]).await.status, status::RESERVATION_CONFLICT);
    good(&f.run_as(&a, &RELEASE6, &[]).await);
    // Registered: RESERVE and RELEASE conflict for every nexus, the registrant included.
    good(&f.pr(&a, REGISTER, 0, 0, 0xA).await);
    assert_eq!(f.run_as(&a, &RESERVE6, &[]).await.status, status::RESERVATION_CONFLICT);
    assert_eq!(f.run_as(&b, &RELEASE10, &[]).await.status, status::RESERVATION_CONFLICT);
    good(&f.pr(&a, REGISTER, 0, 0xA, 0).await);
    good(&f.run_as(&b, &RESERVE10, &[]).await);
}

#[tokio::test]
async fn reserve_and_release_refuse_third_party_and_extents() {
    let f = fixture();
    for (cdb, field) in [
        (vec![0x16, 0x10, 0, 0, 0, 0], 4), // 3RDPTY
        (vec![0x16, 0x01, 0, 0, 0, 0], 0), // EXTENT
        (vec![0x57, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], 1), // LONGID
    ] {
        let r = f.run(&cdb, &[]).await;
        assert_eq!(check(&r), INVALID_FIELD, "{cdb:02x?}");
        let s = r.sense.as_ref().expect("sense");
        assert_eq!((s[15], s[16], s[17]), (0xC8 | field, 0, 1), "field pointer of {cdb:02x?}");
    }
    // Nothing was reserved by the refused commands.
    good(&f.run_as(&nexus("b", 1), &RESERVE6, &[]).await);
}

/// Port groups that can lose a port, as when a node leaves the cluster.
struct LivePorts(std::sync::Mutex<Vec<u16>>);

#[async_trait]
impl AluaStates for LivePorts {
    async fn port_groups(&self) -> Vec<PortGroup> {
        let ports = self.0.lock().expect("ports").clone();
        ports.into_iter().map(|p| PortGroup { id: p, state: AccessState::ActiveOptimized, ports: vec![p] }).collect()
    }
}

#[tokio::test]
async fn spc2_reservation_through_a_port_that_left_is_void() {
    let ports = Arc::new(LivePorts(std::sync::Mutex::new(vec![1, 2])));
    let f = fixture_with(ports.clone());
    let (a, b) = (nexus("a", 1), nexus("b", 2));
    good(&f.run_as(&b, &RESERVE6, &[]).await);
    assert_eq!(f.run_as(&a, &TUR, &[]).await.status, status::RESERVATION_CONFLICT);
    // No port groups known (a metadata hiccup) is not "every port left".
    ports.0.lock().expect("ports").clear();
    assert_eq!(f.run_as(&a, &TUR, &[]).await.status, status::RESERVATION_CONFLICT);
    // b's node leaves: its nexus is gone, and the reservation with it, for good.
    *ports.0.lock().expect("ports") = vec![1];
    good(&f.run_as(&a, &TUR, &[]).await);
    *ports.0.lock().expect("ports") = vec![1, 2];
    good(&f.run_as(&a, &RESERVE6, &[]).await);
    assert_eq!(f.run_as(&b, &TUR, &[]).await.status, status::RESERVATION_CONFLICT);
}

/// A store that loses the first compare-and-swap, as when another node wrote in between.
struct Racy {
    inner: MemoryReservations,
    lost: AtomicUsize,
}

#[async_trait]
impl ReservationStore for Racy {
    async fn load(&self) -> Result<(Reservations, u64), DeviceError> {
        self.inner.load().await
    }
    async fn store(&self, state: &Reservations, version: u64) -> Result<bool, DeviceError> {
        if self.lost.fetch_add(1, Ordering::SeqCst) == 0 {
            // Someone else registers first.
            let (mut other, v) = self.inner.load().await?;
            other.registrations.push(crate::lu::Registration {
                initiator_port: "iqn.other,i,0x000000000000".into(),
                relative_port: 9,
                key: 0x99,
            });
            assert!(self.inner.store(&other, v).await?);
            return Ok(false);
        }
        self.inner.store(state, version).await
    }
}

#[tokio::test]
async fn prout_retries_a_lost_compare_and_swap_without_losing_the_other_change() {
    let store = Arc::new(Racy { inner: MemoryReservations::default(), lost: AtomicUsize::new(0) });
    let lu = unit(Arc::new(MemoryDevice::new(1 << 20)), Arc::new(SinglePath), store.clone());
    let f = Fixture { target: Target::new("t").with_lun(0, lu), dev: Arc::new(MemoryDevice::new(0)) };
    good(&f.pr(&nexus("a", 1), REGISTER, 0, 0, 0xA).await);
    let (st, _) = store.load().await.expect("load");
    let keys: Vec<u64> = st.registrations.iter().map(|r| r.key).collect();
    assert_eq!(keys, vec![0x99, 0xA]);
}

// ---- maintenance in ---------------------------------------------------------------------

#[tokio::test]
async fn rtpg_reports_groups_states_and_ports() {
    let f = fixture_with(Arc::new(TwoGroups(AccessState::ActiveOptimized, AccessState::Transitioning)));
    let r = f.run(&maint_in(0x0A, 0, 0, 0, 1024), &[]).await;
    let d = good(&r);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().expect("4")) as usize, d.len() - 4);
    // Group 10: AO, one port (1). Group 20: transitioning, ports 2 and 3.
    assert_eq!(&d[4..16], &[0x00, 0x8F, 0, 10, 0, 0, 0, 1, 0, 0, 0, 1]);
    assert_eq!(&d[16..24], &[0x0F, 0x8F, 0, 20, 0, 0, 0, 2]);
    assert_eq!(&d[24..32], &[0, 0, 0, 2, 0, 0, 0, 3]);
    // Extended header.
    let r = f.run(&maint_in(0x2A, 0, 0, 0, 1024), &[]).await;
    let d = good(&r);
    assert_eq!(d[4], 0x10);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().expect("4")) as usize, d.len() - 4);
    assert_eq!(&d[8..12], &[0x00, 0x8F, 0, 10]);
    // Allocation length truncates.
    assert_eq!(good(&f.run(&maint_in(0x0A, 0, 0, 0, 6), &[]).await).len(), 6);
    assert_eq!(check(&f.run(&maint_in(0x4A, 0, 0, 0, 64), &[]).await), INVALID_FIELD);
}

#[tokio::test]
async fn rsoc_lists_all_commands_and_one_command_usage() {
    let f = fixture();
    let r = f.run(&maint_in(0x0C, 0, 0, 0, 65535), &[]).await;
    let d = good(&r);
    let len = u32::from_be_bytes(d[0..4].try_into().expect("4")) as usize;
    assert_eq!(len, d.len() - 4);
    assert_eq!(len, 8 * opcodes::OPS.len());
    let descs: Vec<&[u8]> = d[4..].chunks(8).collect();
    assert!(descs.iter().any(|x| x[0] == 0x28 && x[5] == 0 && x[7] == 10));
    assert!(descs.iter().any(|x| x[0] == 0x9E && x[3] == 0x10 && x[5] & 1 == 1 && x[7] == 16));
    // With timeouts: 20-byte descriptors, CTDP set, descriptor length 0x0A.
    let r = f.run(&maint_in(0x0C, 0x80, 0, 0, 65535), &[]).await;
    let d = good(&r);
    assert_eq!(d.len() - 4, 20 * opcodes::OPS.len());
    for x in d[4..].chunks(20) {
        assert_eq!(x[5] & 0x02, 0x02);
        assert_eq!(&x[8..10], &[0, 0x0A]);
    }
    // One command without service action.
    let r = f.run(&maint_in(0x0C, 0x01, 0x28, 0, 64), &[]).await;
    let d = good(&r);
    assert_eq!(d[1] & 0x07, 0x03, "supported");
    assert_eq!(&d[2..4], &[0, 10]);
    assert_eq!(d[4], 0x28);
    assert_eq!(d[5] & 0x18, 0x18, "DPO and FUA evaluated");
    // Wrong reporting option for the opcode kind.
    assert_eq!(check(&f.run(&maint_in(0x0C, 0x01, 0x9E, 0x10, 64), &[]).await), INVALID_FIELD);
    assert_eq!(check(&f.run(&maint_in(0x0C, 0x02, 0x28, 0, 64), &[]).await), INVALID_FIELD);
    let r = f.run(&maint_in(0x0C, 0x82, 0x9E, 0x10, 64), &[]).await;
    let d = good(&r);
    assert_eq!(d[1], 0x83, "CTDP + supported");
    assert_eq!((d[4], d[5]), (0x9E, 0x10));
    assert_eq!(&d[20..22], &[0, 0x0A]);
    // Unsupported opcode / service action.
    assert_eq!(good(&f.run(&maint_in(0x0C, 0x01, 0xC7, 0, 64), &[]).await)[1] & 7, 1);
    assert_eq!(good(&f.run(&maint_in(0x0C, 0x02, 0x9E, 0x1F, 64), &[]).await)[1] & 7, 1);
    assert_eq!(check(&f.run(&maint_in(0x0C, 0x05, 0, 0, 64), &[]).await), INVALID_FIELD);
}

#[tokio::test]
async fn rsoc_matches_what_the_dispatcher_accepts() {
    // Every listed command is known to the dispatcher (no INVALID COMMAND OPERATION CODE).
    let f = fixture();
    for o in opcodes::OPS {
        let mut c = o.usage.to_vec();
        c[1..].fill(0);
        if let Some(sa) = o.sa {
            c[1] = sa;
        }
        let r = f.run(&c, &[]).await;
        if r.status == status::CHECK_CONDITION {
            assert_ne!(check(&r), (key::ILLEGAL_REQUEST, 0x20, 0), "opcode {:#x}", o.op);
        }
    }
}

#[tokio::test]
async fn report_supported_tmfs() {
    let f = fixture();
    let r = f.run(&maint_in(0x0D, 0, 0, 0, 64), &[]).await;
    let d = good(&r);
    assert_eq!(d.len(), 4);
    assert_eq!(d[0] & 0x08, 0x08, "LU reset");
    let r = f.run(&maint_in(0x0D, 0x80, 0, 0, 64), &[]).await;
    assert_eq!(good(&r).len(), 16);
}

/// Records what a unit announces to the other nodes: resets (counted) and the attentions
/// of each reservation change.
#[derive(Default)]
struct CountResets(std::sync::atomic::AtomicUsize, std::sync::Mutex<Vec<Vec<NexusAttention>>>, std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl crate::lu::UnitEvents for CountResets {
    async fn reset(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    async fn reservations_changed(&self, attentions: &[NexusAttention]) {
        self.1.lock().expect("events").push(attentions.to_vec());
    }
    async fn mode_changed(&self) {
        self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl CountResets {
    fn changes(&self) -> Vec<Vec<NexusAttention>> {
        std::mem::take(&mut *self.1.lock().expect("events"))
    }
}

#[tokio::test]
async fn resets_are_announced_to_other_nodes_and_resets_from_them_reach_every_nexus() {
    let dev = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    let events = Arc::new(CountResets::default());
    let lu = Arc::new(
        LogicalUnit::new(dev, Arc::new(SinglePath), Arc::new(MemoryReservations::default()), Identity::for_volume(7, "Volume", "0001"))
            .with_events(events.clone()),
    );
    let target = Target::new("iqn.2024-01.basalt:vol").with_lun(0, lu.clone());
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    let tur = [0u8, 0, 0, 0, 0, 0];
    good(&exec_lun(&target, 0, &a, &tur, &[]).await);
    good(&exec_lun(&target, 0, &b, &tur, &[]).await);
    target.task_management(TaskManagement::LogicalUnitReset, 0, &a).await;
    assert_eq!(events.0.load(std::sync::atomic::Ordering::SeqCst), 1, "the reset was not announced");
    target.task_management(TaskManagement::TargetWarmReset, 0, &a).await;
    assert_eq!(events.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Drain the attentions from those, then a reset from another node reaches a and b.
    for n in [&a, &b] {
        while exec_lun(&target, 0, n, &tur, &[]).await.status != status::GOOD {}
    }
    lu.reset_elsewhere();
    assert_eq!(check(&exec_lun(&target, 0, &a, &tur, &[]).await), (key::UNIT_ATTENTION, 0x29, 0));
    assert_eq!(check(&exec_lun(&target, 0, &b, &tur, &[]).await), (key::UNIT_ATTENTION, 0x29, 0));
}

fn attention(n: &Nexus, (sense_key, asc, ascq): (u8, u8, u8)) -> NexusAttention {
    NexusAttention { initiator_port: n.initiator_port(), relative_port: n.relative_port, sense_key, asc, ascq }
}

const REGISTRATIONS_PREEMPTED: (u8, u8, u8) = (key::UNIT_ATTENTION, 0x2A, 0x05);

#[tokio::test]
async fn reservation_changes_carry_their_attentions_to_the_other_nodes() {
    let dev = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    let store = Arc::new(MemoryReservations::default());
    let events = Arc::new(CountResets::default());
    let lu = Arc::new(
        LogicalUnit::new(dev, Arc::new(SinglePath), store.clone(), Identity::for_volume(7, "Volume", "0001"))
            .with_events(events.clone()),
    );
    let target = Target::new("iqn.2024-01.basalt:vol").with_lun(0, lu.clone());
    // `a` is served here (port 1); `far` registered through another node (port 2), so it
    // is in the store but has never sent this node a command.
    let (a, far) = (nexus("a", 1), nexus("far", 2));
    let (c, p) = prout(REGISTER, 0, 0, 0xA);
    good(&exec_lun(&target, 0, &a, &c, &p).await);
    assert_eq!(events.changes(), vec![vec![]], "a registration is announced, raising nothing");
    let (mut st, v) = store.load().await.expect("load");
    st.registrations.push(crate::lu::Registration { initiator_port: far.initiator_port(), relative_port: 2, key: 0xF });
    assert!(store.store(&st, v).await.expect("store"));

    // PREEMPT with no reservation removes far's registration: REGISTRATIONS PREEMPTED for
    // far, which only its own node can deliver.
    let (c, p) = prout(PREEMPT, 1, 0xA, 0xF);
    good(&exec_lun(&target, 0, &a, &c, &p).await);
    assert_eq!(events.changes(), vec![vec![attention(&far, REGISTRATIONS_PREEMPTED)]]);
    assert!(
        !lu.attentions().contains_key(&nexus_key(&far)),
        "a nexus of another node's port must not be queued here"
    );
    // Nothing for a, and nothing announced for a change that changes nothing.
    good(&exec_lun(&target, 0, &a, &[0, 0, 0, 0, 0, 0], &[]).await);
    let (c, p) = prout(RELEASE, 1, 0xA, 0);
    good(&exec_lun(&target, 0, &a, &c, &p).await);
    assert!(events.changes().is_empty());
}

#[tokio::test]
async fn attentions_from_other_nodes_reach_their_nexus_once_even_after_it_logged_out() {
    let f = fixture();
    let lu = f.target.lun(0).expect("lun 0").clone();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    let tur = [0u8, 0, 0, 0, 0, 0];
    good(&f.run_as(&a, &tur, &[]).await);
    good(&f.run_as(&b, &tur, &[]).await);
    f.target.nexus_gone(&b).await;
    lu.attentions_from_elsewhere(&[attention(&b, REGISTRATIONS_PREEMPTED)]);
    assert_eq!(check(&f.run_as(&b, &tur, &[]).await), REGISTRATIONS_PREEMPTED);
    good(&f.run_as(&b, &tur, &[]).await);
    good(&f.run_as(&a, &tur, &[]).await);
}

fn read_capacity16() -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    c
}

/// Last LBA as READ CAPACITY 16 reports it.
#[track_caller]
fn last_lba(r: &ScsiResponse) -> u64 {
    u64::from_be_bytes(good(r)[0..8].try_into().expect("8"))
}

const CAPACITY_CHANGED: (u8, u8, u8) = (key::UNIT_ATTENTION, 0x2A, 0x09);

#[tokio::test]
async fn a_resized_device_raises_capacity_changed_once_per_nexus_and_io_follows_the_new_end() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 2));
    let tur = [0u8, 0, 0, 0, 0, 0];
    good(&f.run_as(&a, &tur, &[]).await);
    good(&f.run_as(&b, &tur, &[]).await);
    assert_eq!(last_lba(&f.run_as(&a, &read_capacity16(), &[]).await), BLOCKS - 1);

    f.dev.resize(2 * BLOCKS * BS as u64);
    assert_eq!(check(&f.run_as(&a, &read_capacity16(), &[]).await), CAPACITY_CHANGED);
    assert_eq!(last_lba(&f.run_as(&a, &read_capacity16(), &[]).await), 2 * BLOCKS - 1);
    good(&f.run_as(&a, &tur, &[]).await);
    // INQUIRY leaves it pending; the next command reports it, once.
    good(&f.run_as(&b, &inquiry(false, 0, 36), &[]).await);
    assert_eq!(check(&f.run_as(&b, &tur, &[]).await), CAPACITY_CHANGED);
    good(&f.run_as(&b, &tur, &[]).await);
    // The new blocks up to the new end are usable.
    let data = pattern(1, 3);
    good(&f.run_as(&b, &rw16(0x8A, 2 * BLOCKS - 1, 1), &data).await);
    assert_eq!(good(&f.run_as(&a, &rw16(0x88, 2 * BLOCKS - 1, 1), &[]).await), &data[..]);
    assert_eq!(check(&f.run_as(&a, &rw16(0x88, 2 * BLOCKS, 1), &[]).await), LBA_RANGE);

    // Shrinking: reported the same way, and nothing past the new end is reachable.
    f.dev.resize(BLOCKS * BS as u64 / 2);
    assert_eq!(check(&f.run_as(&a, &rw16(0x88, BLOCKS - 1, 1), &[]).await), CAPACITY_CHANGED);
    assert_eq!(check(&f.run_as(&a, &rw16(0x88, BLOCKS - 1, 1), &[]).await), LBA_RANGE);
    assert_eq!(check(&f.run_as(&b, &rw16(0x8A, BLOCKS / 2, 1), &data).await), CAPACITY_CHANGED);
    assert_eq!(check(&f.run_as(&b, &rw16(0x8A, BLOCKS / 2, 1), &data).await), LBA_RANGE);
    let r = f.run_as(&b, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&good(&r)[0..4], &(BLOCKS as u32 / 2 - 1).to_be_bytes());
    // A unit told of the resize reports it before any command (same attention, not twice).
    f.dev.resize(BLOCKS * BS as u64);
    f.target.lun(0).expect("lun 0").check_capacity();
    assert_eq!(check(&f.run_as(&a, &tur, &[]).await), CAPACITY_CHANGED);
    good(&f.run_as(&a, &tur, &[]).await);
}

const REPORTED_LUNS_CHANGED: (u8, u8, u8) = (key::UNIT_ATTENTION, 0x3F, 0x0E);

#[tokio::test]
async fn luns_added_to_a_live_target_are_served_and_announced_to_the_nexuses_told() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    let tur = [0u8, 0, 0, 0, 0, 0];
    let report_luns = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0];
    good(&f.run_as(&a, &tur, &[]).await);
    good(&f.run_as(&b, &tur, &[]).await);
    assert_eq!(check(&exec_lun(&f.target, 3, &a, &tur, &[]).await), (key::ILLEGAL_REQUEST, 0x25, 0x00), "LUN 3 not there yet");

    let lu3 = memory_unit();
    f.target.change_luns(vec![Lun::new(3, lu3)], &[], std::slice::from_ref(&a));
    assert_eq!(f.target.lun_numbers(), vec![0, 3]);
    // Only the nexus told gets the attention, once per unit (an I_T_L nexus each).
    assert_eq!(check(&f.run_as(&a, &tur, &[]).await), REPORTED_LUNS_CHANGED);
    good(&f.run_as(&a, &tur, &[]).await);
    assert_eq!(check(&exec_lun(&f.target, 3, &a, &tur, &[]).await), REPORTED_LUNS_CHANGED);
    good(&exec_lun(&f.target, 3, &a, &tur, &[]).await);
    good(&f.run_as(&b, &tur, &[]).await);

    // REPORT LUNS lists the new LUN and clears the attention on every unit.
    let lu5 = memory_unit();
    f.target.change_luns(vec![Lun::new(5, lu5)], &[], std::slice::from_ref(&b));
    let r = f.run_as(&b, &report_luns, &[]).await;
    let list = good(&r);
    assert_eq!(list.get(0..4), Some(&[0u8, 0, 0, 24][..]), "three LUNs: {list:02x?}");
    good(&f.run_as(&b, &tur, &[]).await);
    good(&exec_lun(&f.target, 5, &b, &tur, &[]).await);
}

#[tokio::test]
async fn luns_removed_from_a_live_target_stop_being_served_and_are_announced() {
    let f = fixture();
    let (a, b) = (nexus("a", 1), nexus("b", 1));
    let tur = [0u8, 0, 0, 0, 0, 0];
    let report_luns = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0];
    let lu3 = memory_unit();
    f.target.change_luns(vec![Lun::new(3, lu3.clone())], &[], &[]);
    good(&f.run_as(&a, &tur, &[]).await);
    good(&exec_lun(&f.target, 3, &a, &tur, &[]).await);
    good(&f.run_as(&b, &tur, &[]).await);

    // Nothing changes: nobody is told.
    assert!(!f.target.change_luns(vec![Lun::new(3, lu3.clone())], &[7], std::slice::from_ref(&a)));
    good(&f.run_as(&a, &tur, &[]).await);

    assert!(f.target.change_luns(vec![], &[3], std::slice::from_ref(&a)));
    assert_eq!(f.target.lun_numbers(), vec![0]);
    // The removed LUN is gone for everyone; the nexus told hears of it on the units left.
    assert_eq!(check(&exec_lun(&f.target, 3, &a, &tur, &[]).await), (key::ILLEGAL_REQUEST, 0x25, 0x00));
    assert_eq!(check(&exec_lun(&f.target, 3, &b, &tur, &[]).await), (key::ILLEGAL_REQUEST, 0x25, 0x00));
    assert_eq!(check(&f.run_as(&a, &tur, &[]).await), REPORTED_LUNS_CHANGED);
    good(&f.run_as(&b, &tur, &[]).await);
    let r = f.run_as(&a, &report_luns, &[]).await;
    let list = good(&r);
    assert_eq!(list.get(0..4), Some(&[0u8, 0, 0, 8][..]), "one LUN left: {list:02x?}");

    // A LUN given another unit is a change too.
    let other = memory_unit();
    assert!(f.target.change_luns(vec![Lun::new(0, other.clone())], &[], std::slice::from_ref(&b)));
    assert!(Arc::ptr_eq(&f.target.lun(0).expect("lun 0"), &other));
    assert_eq!(check(&f.run_as(&b, &tur, &[]).await), REPORTED_LUNS_CHANGED);
}
