//! EXTENDED COPY and RECEIVE COPY RESULTS through a [`Target`] of two in-memory units,
//! checking the bytes copied and the sense of every refusal as an initiator sees them.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::super::sense::key;
use super::*;
use crate::lu::memory::{MemoryDevice, MemoryReservations, SinglePath};
use crate::lu::{
    AccessState, DeviceError, PortGroup, Registration, Reservation, Reservations, ScsiResponse, ScsiTarget,
};

const BS: usize = 512;
/// 4 MiB units: several copy pieces fit.
const BLOCKS: u64 = 8192;
const VOL_A: u64 = 0x1234;
const VOL_B: u64 = 0x5678;

struct Fixture {
    target: Target,
    a: Arc<MemoryDevice>,
    b: Arc<MemoryDevice>,
    b_res: Arc<MemoryReservations>,
}

struct Standby;

#[async_trait]
impl AluaStates for Standby {
    async fn port_groups(&self) -> Vec<PortGroup> {
        vec![PortGroup { id: 1, state: AccessState::Standby, ports: vec![1] }]
    }
}

fn fixture() -> Fixture {
    fixture_with(Arc::new(SinglePath))
}

/// LUN 0 on volume A, LUN 1 on volume B (whose ALUA states are `b_alua`).
fn fixture_with(b_alua: Arc<dyn AluaStates>) -> Fixture {
    let a = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    let b = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    let b_res = Arc::new(MemoryReservations::default());
    let unit = |dev: Arc<MemoryDevice>, alua: Arc<dyn AluaStates>, res: Arc<MemoryReservations>, vol| {
        Arc::new(LogicalUnit::new(dev, alua, res, Identity::for_volume(vol, "Volume", "0001")))
    };
    let target = Target::new("iqn.2024-01.basalt:xcopy")
        .with_lun(0, unit(a.clone(), Arc::new(SinglePath), Arc::new(MemoryReservations::default()), VOL_A))
        .with_lun(1, unit(b.clone(), b_alua, b_res.clone(), VOL_B));
    Fixture { target, a, b, b_res }
}

fn nexus(name: &str) -> Nexus {
    Nexus {
        initiator_name: format!("iqn.2024-01.test:{name}"),
        isid: [0x80, 0, 0, 0, 0, 1],
        relative_port: 1,
        tpgt: 1,
    }
}

impl Fixture {
    async fn exec(&self, n: &Nexus, lun: u64, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        crate::scsi::tests::exec_lun(&self.target, lun, n, cdb, data).await
    }
    async fn run(&self, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        self.exec(&nexus("a"), 0, cdb, data).await
    }
    async fn xcopy(&self, list: &[u8]) -> ScsiResponse {
        self.run(&xcopy_cdb(list.len() as u32), list).await
    }
}

async fn bytes(dev: &MemoryDevice, at: u64, len: u64) -> Vec<u8> {
    dev.read(at, len).await.expect("device read").to_vec()
}

/// Bytes that differ from block to block (a shifted copy never matches by accident), none
/// of them zero.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len as u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 24) as u8 ^ seed) | 1).collect()
}

#[track_caller]
fn good(r: &ScsiResponse) -> &[u8] {
    assert_eq!(r.status, status::GOOD, "sense {:02x?}", r.sense);
    &r.data_in
}

/// (sense key, ASC, ASCQ) and the sense bytes of a CHECK CONDITION.
#[track_caller]
fn check(r: &ScsiResponse) -> ((u8, u8, u8), Bytes) {
    assert_eq!(r.status, status::CHECK_CONDITION, "data {:02x?}", r.data_in);
    let s = r.sense.clone().expect("sense with CHECK CONDITION");
    ((s[2] & 0x0F, s[12], s[13]), s)
}

/// The field pointer of a sense record, if SKSV is set: (C/D, byte).
fn pointer(s: &[u8]) -> Option<(bool, u16)> {
    (s[15] & 0x80 != 0).then(|| (s[15] & 0x40 != 0, u16::from_be_bytes([s[16], s[17]])))
}

// ---- parameter list builders -------------------------------------------------------

fn xcopy_cdb(len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

fn rcr_cdb(sa: u8, list_id: u8) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x84;
    c[1] = sa;
    c[2] = list_id;
    c[10..14].copy_from_slice(&1024u32.to_be_bytes());
    c
}

/// An identification CSCD descriptor naming `volume`'s NAA designator.
fn cscd(volume: u64) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0] = 0xE4;
    d[4] = 0x01; // binary
    d[5] = 0x03; // LU association, NAA
    d[7] = 8;
    d[8..16].copy_from_slice(&Identity::naa_for_volume(volume));
    d[29..32].copy_from_slice(&[0, 0x02, 0x00]); // 512-byte blocks
    d
}

fn b2b(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
    let mut d = vec![0u8; 28];
    d[0] = 0x02;
    d[2..4].copy_from_slice(&0x18u16.to_be_bytes());
    d[4..6].copy_from_slice(&src.to_be_bytes());
    d[6..8].copy_from_slice(&dst.to_be_bytes());
    d[10..12].copy_from_slice(&blocks.to_be_bytes());
    d[12..20].copy_from_slice(&src_lba.to_be_bytes());
    d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
    d
}

#[allow(clippy::too_many_arguments)]
fn b2b_offsets(src: u16, dst: u16, n: u32, src_lba: u64, dst_lba: u64, src_off: u16, dst_off: u16) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0] = 0x0A;
    d[2..4].copy_from_slice(&0x1Cu16.to_be_bytes());
    d[4..6].copy_from_slice(&src.to_be_bytes());
    d[6..8].copy_from_slice(&dst.to_be_bytes());
    d[8..12].copy_from_slice(&n.to_be_bytes());
    d[12..20].copy_from_slice(&src_lba.to_be_bytes());
    d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
    d[28..30].copy_from_slice(&src_off.to_be_bytes());
    d[30..32].copy_from_slice(&dst_off.to_be_bytes());
    d
}

/// Header (list id, LIST ID USAGE) + descriptors.
fn list(list_id: u8, usage: u8, cscds: &[Vec<u8>], segments: &[Vec<u8>]) -> Vec<u8> {
    let c: Vec<u8> = cscds.concat();
    let s: Vec<u8> = segments.concat();
    let mut l = vec![0u8; 16];
    l[0] = list_id;
    l[1] = usage << 3;
    l[2..4].copy_from_slice(&(c.len() as u16).to_be_bytes());
    l[8..12].copy_from_slice(&(s.len() as u32).to_be_bytes());
    l.extend(c);
    l.extend(s);
    l
}

const DISCARD: u8 = 0b10;
const NO_LIST_ID: u8 = 0b11;

// ---- copying ------------------------------------------------------------------------

#[tokio::test]
async fn extended_copy_copies_blocks_between_two_units_of_the_target() {
    let f = fixture();
    let data = pattern(40 * BS, 3);
    f.a.write(10 * BS as u64, Bytes::from(data.clone())).await.expect("seed");
    // Sent to LUN 0, copies from LUN 0 (descriptor 0) to LUN 1 (descriptor 1).
    let l = list(1, NO_LIST_ID, &[cscd(VOL_A), cscd(VOL_B)], &[b2b(0, 1, 40, 10, 100)]);
    good(&f.xcopy(&l).await);
    assert_eq!(bytes(&f.b, 100 * BS as u64, 40 * BS as u64).await, data);
    // Nothing around the destination range changed, the source is intact.
    assert!(bytes(&f.b, 99 * BS as u64, BS as u64).await.iter().all(|&b| b == 0));
    assert!(bytes(&f.b, 140 * BS as u64, BS as u64).await.iter().all(|&b| b == 0));
    assert_eq!(bytes(&f.a, 10 * BS as u64, 40 * BS as u64).await, data);
}

#[tokio::test]
async fn extended_copy_runs_every_segment_and_copies_large_ranges_in_pieces() {
    let f = fixture();
    // 5000 blocks: more than two pieces.
    let data = pattern(5000 * BS, 9);
    f.b.write(0, Bytes::from(data.clone())).await.expect("seed");
    let l = list(
        2,
        DISCARD,
        &[cscd(VOL_B), cscd(VOL_A)],
        &[b2b(0, 1, 5000, 0, 1000), b2b(0, 1, 1, 4999, 0)],
    );
    // Sent to LUN 0 although its unit is only the destination.
    good(&f.xcopy(&l).await);
    assert_eq!(bytes(&f.a, 1000 * BS as u64, 5000 * BS as u64).await, data);
    assert_eq!(bytes(&f.a, 0, BS as u64).await, data[4999 * BS..]);
}

#[tokio::test]
async fn overlapping_copy_within_one_unit_moves_like_memmove() {
    let f = fixture();
    let data = pattern(3000 * BS, 1);
    f.a.write(0, Bytes::from(data.clone())).await.expect("seed");
    // Destination after the source, overlapping over several pieces.
    let l = list(0, NO_LIST_ID, &[cscd(VOL_A)], &[b2b(0, 0, 3000, 0, 700)]);
    good(&f.xcopy(&l).await);
    assert_eq!(bytes(&f.a, 700 * BS as u64, 3000 * BS as u64).await, data);
    // And back: destination before the source.
    let l = list(0, NO_LIST_ID, &[cscd(VOL_A)], &[b2b(0, 0, 3000, 700, 0)]);
    good(&f.xcopy(&l).await);
    assert_eq!(bytes(&f.a, 0, 3000 * BS as u64).await, data);
}

#[tokio::test]
async fn byte_offset_segment_copies_exact_bytes_and_keeps_the_rest_of_partial_blocks() {
    let f = fixture();
    let src = pattern(4 * BS, 5);
    f.a.write(0, Bytes::from(src.clone())).await.expect("seed");
    let around = vec![0xEEu8; 8 * BS];
    f.b.write(48 * BS as u64, Bytes::from(around.clone())).await.expect("seed");
    // 1000 bytes from block 1 + 100 of A to block 50 + 300 of B.
    let l = list(0, NO_LIST_ID, &[cscd(VOL_A), cscd(VOL_B)], &[b2b_offsets(0, 1, 1000, 1, 50, 100, 300)]);
    good(&f.xcopy(&l).await);
    let got = bytes(&f.b, 48 * BS as u64, 8 * BS as u64).await;
    let start = 2 * BS + 300;
    assert_eq!(&got[start..start + 1000], &src[BS + 100..BS + 1100]);
    assert!(got[..start].iter().all(|&b| b == 0xEE), "bytes before the copy kept");
    assert!(got[start + 1000..].iter().all(|&b| b == 0xEE), "bytes after the copy kept");
}

#[tokio::test]
async fn zero_parameter_list_length_and_zero_blocks_copy_nothing() {
    let f = fixture();
    good(&f.run(&xcopy_cdb(0), &[]).await);
    good(&f.xcopy(&list(0, NO_LIST_ID, &[cscd(VOL_A)], &[b2b(0, 0, 0, 0, BLOCKS)])).await);
}

// ---- refusals -----------------------------------------------------------------------

#[tokio::test]
async fn truncated_parameter_lists_are_parameter_list_length_errors() {
    let f = fixture();
    let l = list(0, NO_LIST_ID, &[cscd(VOL_A)], &[b2b(0, 0, 8, 0, 16)]);
    for len in [8, 16 + 31, l.len() - 1] {
        let (s, _) = check(&f.xcopy(&l[..len]).await);
        assert_eq!(s, (key::ILLEGAL_REQUEST, 0x1A, 0), "length {len}");
    }
    // Descriptors longer than the maximum descriptor list length.
    let many: Vec<Vec<u8>> = (0..30).map(|_| b2b(0, 0, 1, 0, 1)).collect();
    let (s, _) = check(&f.xcopy(&list(0, NO_LIST_ID, &[cscd(VOL_A)], &many)).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x1A, 0));
}

#[tokio::test]
async fn descriptor_counts_beyond_the_limits_are_refused() {
    let f = fixture();
    let cscds: Vec<Vec<u8>> = (0..=MAX_CSCD_DESCRIPTORS).map(|_| cscd(VOL_A)).collect();
    let (s, sense) = check(&f.xcopy(&list(0, NO_LIST_ID, &cscds, &[b2b(0, 0, 1, 0, 1)])).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0x06), "TOO MANY TARGET DESCRIPTORS");
    assert_eq!(pointer(&sense), Some((false, 16 + 32 * MAX_CSCD_DESCRIPTORS)));
    let segs: Vec<Vec<u8>> = (0..=MAX_SEGMENT_DESCRIPTORS).map(|_| b2b(0, 0, 1, 0, 1)).collect();
    let (s, _) = check(&f.xcopy(&list(0, NO_LIST_ID, &[cscd(VOL_A)], &segs)).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0x08), "TOO MANY SEGMENT DESCRIPTORS");
}

#[tokio::test]
async fn unsupported_descriptor_types_are_named_with_a_pointer() {
    let f = fixture();
    let mut fc = cscd(VOL_A);
    fc[0] = 0xE0; // Fibre Channel N_Port_Name
    let (s, sense) = check(&f.xcopy(&list(0, NO_LIST_ID, &[fc], &[b2b(0, 0, 1, 0, 1)])).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0x07));
    assert_eq!(pointer(&sense), Some((false, 16)));
    let mut stream = b2b(0, 0, 1, 0, 1);
    stream[0] = 0x03; // stream → stream
    let (s, sense) = check(&f.xcopy(&list(0, NO_LIST_ID, &[cscd(VOL_A)], &[stream])).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0x09));
    assert_eq!(pointer(&sense), Some((false, 48)));
}

#[tokio::test]
async fn invalid_header_and_descriptor_fields_point_at_the_field() {
    let f = fixture();
    let ok = || list(0, NO_LIST_ID, &[cscd(VOL_A)], &[b2b(0, 0, 1, 0, 1)]);
    // LIST ID USAGE 01b is reserved.
    let mut l = ok();
    l[1] = 0b01 << 3;
    let (s, sense) = check(&f.xcopy(&l).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0));
    assert_eq!(pointer(&sense), Some((false, 1)));
    // Inline data: the maximum is 0.
    let mut l = ok();
    l[12..16].copy_from_slice(&4u32.to_be_bytes());
    l.extend([0u8; 4]);
    let (s, _) = check(&f.xcopy(&l).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0x0B));
    // A segment descriptor length that does not match its type.
    let mut l = ok();
    l[48 + 3] = 0x1C;
    let (s, sense) = check(&f.xcopy(&l).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0));
    assert_eq!(pointer(&sense), Some((false, 50)));
    // A disk block length other than the unit's.
    let mut l = ok();
    l[16 + 29..16 + 32].copy_from_slice(&[0, 0x10, 0]);
    let (s, sense) = check(&f.xcopy(&l).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x26, 0));
    assert_eq!(pointer(&sense), Some((false, 16 + 29)));
    // LU ID TYPE and NUL are ignored (SPC-4).
    let mut l = ok();
    l[17] = 0b10 << 6 | 0x20;
    good(&f.xcopy(&l).await);
}

#[tokio::test]
async fn unknown_designators_and_indexes_are_unreachable_copy_targets() {
    let f = fixture();
    // A volume no LUN of this target serves.
    let (s, sense) = check(&f.xcopy(&list(0, NO_LIST_ID, &[cscd(0x9999)], &[b2b(0, 0, 1, 0, 1)])).await);
    assert_eq!(s, (key::COPY_ABORTED, 0x0D, 0x02));
    assert_eq!(pointer(&sense), Some((false, 16)));
    // A destination index with no descriptor.
    let (s, sense) = check(&f.xcopy(&list(0, NO_LIST_ID, &[cscd(VOL_A)], &[b2b(0, 1, 1, 0, 1)])).await);
    assert_eq!(s, (key::COPY_ABORTED, 0x0D, 0x02));
    assert_eq!(pointer(&sense), Some((false, 48 + 6)));
    // Not a block device, says the descriptor.
    let mut tape = cscd(VOL_A);
    tape[1] = 0x01;
    let (s, _) = check(&f.xcopy(&list(0, NO_LIST_ID, &[tape], &[b2b(0, 0, 1, 0, 1)])).await);
    assert_eq!(s, (key::COPY_ABORTED, 0x0D, 0x03));
}

#[tokio::test]
async fn a_segment_past_the_end_aborts_before_anything_is_copied() {
    let f = fixture();
    f.a.write(0, Bytes::from(pattern(8 * BS, 2))).await.expect("seed");
    let l = list(
        0,
        NO_LIST_ID,
        &[cscd(VOL_A), cscd(VOL_B)],
        // The first segment is fine; the second reaches one block past B's end.
        &[b2b(0, 1, 8, 0, 0), b2b(0, 1, 8, 0, BLOCKS - 7)],
    );
    let (s, sense) = check(&f.xcopy(&l).await);
    assert_eq!(s.0, key::COPY_ABORTED);
    assert_eq!(pointer(&sense), Some((false, 16 + 64 + 28 + 20)), "the destination LBA field");
    assert!(bytes(&f.b, 0, 8 * BS as u64).await.iter().all(|&b| b == 0), "first segment not copied");
    // Source side, and a block count that wraps.
    let l = list(0, NO_LIST_ID, &[cscd(VOL_A), cscd(VOL_B)], &[b2b(0, 1, 2, u64::MAX, 0)]);
    let (s, sense) = check(&f.xcopy(&l).await);
    assert_eq!(s.0, key::COPY_ABORTED);
    assert_eq!(pointer(&sense), Some((false, 16 + 64 + 12)));
}

#[tokio::test]
async fn a_reservation_on_the_destination_conflicts_and_nothing_is_written() {
    let f = fixture();
    f.a.write(0, Bytes::from(pattern(4 * BS, 7))).await.expect("seed");
    let other = nexus("b");
    let port = other.initiator_port();
    let state = Reservations {
        generation: 1,
        registrations: vec![Registration { initiator_port: port.clone(), relative_port: 1, key: 9 }],
        holder: Some(Reservation { initiator_port: port, relative_port: 1, key: 9, kind: 1 }),
        ..Default::default()
    };
    assert!(f.b_res.store(&state, 0).await.expect("store"));
    let to_b = list(0, NO_LIST_ID, &[cscd(VOL_A), cscd(VOL_B)], &[b2b(0, 1, 4, 0, 0)]);
    let r = f.xcopy(&to_b).await;
    assert_eq!(r.status, status::RESERVATION_CONFLICT);
    assert!(bytes(&f.b, 0, 4 * BS as u64).await.iter().all(|&b| b == 0));
    // Write Exclusive lets others read: B may be the source.
    let from_b = list(0, NO_LIST_ID, &[cscd(VOL_B), cscd(VOL_A)], &[b2b(0, 1, 4, 0, 100)]);
    good(&f.xcopy(&from_b).await);
    // The holder itself copies into B.
    good(&f.exec(&other, 0, &xcopy_cdb(to_b.len() as u32), &to_b).await);
    assert_eq!(bytes(&f.b, 0, 4 * BS as u64).await, pattern(4 * BS, 7));
}

#[tokio::test]
async fn a_copy_target_in_standby_is_not_ready() {
    let f = fixture_with(Arc::new(Standby));
    let l = list(0, NO_LIST_ID, &[cscd(VOL_A), cscd(VOL_B)], &[b2b(0, 1, 4, 0, 0)]);
    let (s, _) = check(&f.xcopy(&l).await);
    assert_eq!(s, (key::NOT_READY, 0x04, 0x0B));
}

#[tokio::test]
async fn other_service_actions_of_extended_copy_are_invalid() {
    let f = fixture();
    let mut c = xcopy_cdb(0);
    c[1] = 0x01; // EXTENDED COPY (LID4)
    let (s, sense) = check(&f.run(&c, &[]).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x24, 0));
    assert_eq!(pointer(&sense), Some((true, 1)));
}

// ---- RECEIVE COPY RESULTS -------------------------------------------------------------

#[tokio::test]
async fn operating_parameters_report_the_limits_we_enforce() {
    let f = fixture();
    let r = f.run(&rcr_cdb(0x03, 0), &[]).await;
    let d = good(&r);
    assert_eq!(u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize, d.len() - 4);
    assert_eq!(u16::from_be_bytes([d[8], d[9]]), MAX_CSCD_DESCRIPTORS);
    assert_eq!(u16::from_be_bytes([d[10], d[11]]), MAX_SEGMENT_DESCRIPTORS);
    assert_eq!(u32::from_be_bytes([d[12], d[13], d[14], d[15]]), MAX_DESCRIPTOR_LIST_LENGTH);
    assert_eq!(u32::from_be_bytes([d[16], d[17], d[18], d[19]]), MAX_SEGMENT_BYTES);
    assert_eq!(&d[20..24], &[0, 0, 0, 0], "no inline data");
    assert_eq!(&d[43..], &[3, 0x02, 0x0A, 0xE4]);
    // The limits hold for lists that fill them.
    let cscds: Vec<Vec<u8>> = (0..MAX_CSCD_DESCRIPTORS).map(|_| cscd(VOL_A)).collect();
    let segs: Vec<Vec<u8>> = (0..MAX_SEGMENT_DESCRIPTORS).map(|_| b2b(0, 7, 1, 0, 1)).collect();
    good(&f.xcopy(&list(0, NO_LIST_ID, &cscds, &segs)).await);
}

#[tokio::test]
async fn copy_status_reports_a_finished_copy_of_this_nexus_only() {
    let f = fixture();
    let (s, sense) = check(&f.run(&rcr_cdb(0x00, 5), &[]).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x24, 0), "no copy with this list id yet");
    assert_eq!(pointer(&sense), Some((true, 2)));
    let l = list(5, DISCARD, &[cscd(VOL_A), cscd(VOL_B)], &[b2b(0, 1, 8, 0, 0), b2b(0, 1, 4, 8, 8)]);
    good(&f.xcopy(&l).await);
    let r = f.run(&rcr_cdb(0x00, 5), &[]).await;
    let d = good(&r);
    assert_eq!(&d[0..4], &[0, 0, 0, 8]);
    assert_eq!(d[4], 0x01, "completed without errors");
    assert_eq!(&d[5..7], &[0, 2], "segments processed");
    assert_eq!(d[7], 0x00, "bytes");
    assert_eq!(u32::from_be_bytes([d[8], d[9], d[10], d[11]]), 12 * BS as u32);
    // Another nexus, another list identifier space.
    let (s, _) = check(&f.exec(&nexus("b"), 0, &rcr_cdb(0x00, 5), &[]).await);
    assert_eq!(s, (key::ILLEGAL_REQUEST, 0x24, 0));
    // Without a list identifier nothing is kept.
    good(&f.xcopy(&list(6, NO_LIST_ID, &[cscd(VOL_A)], &[b2b(0, 0, 1, 0, 1)])).await);
    check(&f.run(&rcr_cdb(0x00, 6), &[]).await);
    // The nexus logs out: its copies are forgotten.
    f.target.nexus_gone(&nexus("a")).await;
    check(&f.run(&rcr_cdb(0x00, 5), &[]).await);
}

/// A device whose reads fail from `bad` bytes on.
struct FailingReads {
    inner: MemoryDevice,
    bad: u64,
}

#[async_trait]
impl BlockDevice for FailingReads {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError> {
        if offset + len > self.bad {
            return Err(DeviceError::Io("bad sector".into()));
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
        self.inner.write(offset, data).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.unmap(offset, len).await
    }
}

#[tokio::test]
async fn a_copy_failing_while_copying_reports_completed_with_errors() {
    let a = Arc::new(MemoryDevice::new(BLOCKS * BS as u64));
    let b = Arc::new(FailingReads { inner: MemoryDevice::new(BLOCKS * BS as u64), bad: 50 * BS as u64 });
    let unit = |dev: Arc<dyn BlockDevice>, vol| {
        let res = Arc::new(MemoryReservations::default());
        Arc::new(LogicalUnit::new(dev, Arc::new(SinglePath), res, Identity::for_volume(vol, "Volume", "0001")))
    };
    let f = Fixture {
        target: Target::new("iqn.2024-01.basalt:xcopy").with_lun(0, unit(a.clone(), VOL_A)).with_lun(1, unit(b, VOL_B)),
        a,
        b: Arc::new(MemoryDevice::new(0)),
        b_res: Arc::new(MemoryReservations::default()),
    };
    // The second segment reads blocks B cannot read.
    let l = list(3, 0b00, &[cscd(VOL_B), cscd(VOL_A)], &[b2b(0, 1, 1, 0, 0), b2b(0, 1, 8, 100, 8)]);
    let (s, _) = check(&f.xcopy(&l).await);
    assert_eq!(s, (key::COPY_ABORTED, 0x11, 0x00), "the read error, as a copy error");
    let r = f.run(&rcr_cdb(0x00, 3), &[]).await;
    let d = good(&r);
    assert_eq!(d[4], 0x02, "completed with errors");
    assert_eq!(&d[5..7], &[0, 1], "one segment processed");
    assert_eq!(u32::from_be_bytes([d[8], d[9], d[10], d[11]]), BS as u32);
}

#[test]
fn a_running_list_identifier_is_not_reused() {
    let records = CopyRecords::default();
    let key: NexusKey = ("i".into(), 1);
    records.start(&key, 1).expect("first");
    assert_eq!(records.start(&key, 1), Err(operation_in_progress()));
    records.start(&key, 2).expect("another id");
    {
        let t = Tracking { records: &records, key: &key, list_id: 1 };
        t.progress(512, true);
        drop(t); // the command was aborted
    }
    let r = records.get(&key, 1).expect("record");
    assert_eq!((r.progress, r.segments, r.bytes), (Progress::Failed, 1, 512));
    records.start(&key, 1).expect("a finished id may be reused");
}

// ---- VPD and REPORT SUPPORTED OPERATION CODES -------------------------------------------

#[tokio::test]
async fn third_party_copy_vpd_page_lists_the_commands_and_limits() {
    let f = fixture();
    let r = f.run(&[0x12, 0x01, 0x00, 0, 255, 0], &[]).await;
    assert!(good(&r)[4..].contains(&0x8F), "listed in VPD 0x00");
    let r = f.run(&[0x12, 0x01, 0x8F, 4, 0, 0], &[]).await;
    let d = good(&r);
    assert_eq!(d[1], 0x8F);
    assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - 4);
    // Walk the descriptors: each length a multiple of 4, all of them inside the page.
    let mut at = 4;
    let mut kinds = Vec::new();
    while at < d.len() {
        let kind = u16::from_be_bytes([d[at], d[at + 1]]);
        let len = usize::from(u16::from_be_bytes([d[at + 2], d[at + 3]]));
        assert_eq!(len % 4, 0, "descriptor {kind:#x}");
        let body = &d[at + 4..at + 4 + len];
        match kind {
            0x0001 => assert_eq!(&body[..8], &[7, 0x83, 1, 0x00, 0x84, 2, 0x00, 0x03]),
            0x0004 => {
                assert_eq!(u16::from_be_bytes([body[4], body[5]]), MAX_CSCD_DESCRIPTORS);
                assert_eq!(u16::from_be_bytes([body[6], body[7]]), MAX_SEGMENT_DESCRIPTORS);
            }
            0x0008 => assert_eq!(&body[..4], &[3, 0x02, 0x0A, 0xE4]),
            0x8001 => assert_eq!(
                u32::from_be_bytes([body[8], body[9], body[10], body[11]]),
                MAX_SEGMENT_BYTES
            ),
            _ => {}
        }
        kinds.push(kind);
        at += 4 + len;
    }
    assert_eq!(at, d.len());
    assert_eq!(kinds, [0x0001, 0x0004, 0x0008, 0x000C, 0x8001]);
}

#[tokio::test]
async fn rsoc_reports_extended_copy_and_receive_copy_results() {
    let f = fixture();
    // One command, service action form: EXTENDED COPY (LID1).
    let mut c = vec![0xA3, 0x0C, 0x02, 0x83, 0x00, 0x00, 0, 0, 4, 0, 0, 0];
    let r = f.run(&c, &[]).await;
    let d = good(&r);
    assert_eq!(d[1] & 0x07, 0x03, "supported");
    assert_eq!(&d[4..], &[0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x04]);
    c[3] = 0x84;
    c[5] = 0x03;
    let r = f.run(&c, &[]).await;
    assert_eq!(good(&r)[1] & 0x07, 0x03);
    c[5] = 0x01; // RECEIVE DATA: not supported
    let r = f.run(&c, &[]).await;
    assert_eq!(good(&r)[1] & 0x07, 0x01);
}

/// A unit the target maps read-only may be a copy source, never a destination: nothing
/// writes it through this target, the copy manager included.
#[tokio::test]
async fn a_read_only_lun_is_a_copy_source_but_never_a_destination() {
    let f = fixture();
    let b = f.target.lun(1).expect("lun 1");
    f.target.change_luns(vec![crate::scsi::Lun::read_only(1, b)], &[], &[]);
    let data = pattern(8 * BS, 5);
    f.b.write(0, Bytes::from(data.clone())).await.expect("seed");
    // B (read-only) to A: allowed.
    let l = list(1, NO_LIST_ID, &[cscd(VOL_A), cscd(VOL_B)], &[b2b(1, 0, 8, 0, 20)]);
    good(&f.xcopy(&l).await);
    assert_eq!(bytes(&f.a, 20 * BS as u64, 8 * BS as u64).await, data);
    // A to B: refused whole, B untouched.
    let l = list(1, NO_LIST_ID, &[cscd(VOL_A), cscd(VOL_B)], &[b2b(0, 1, 8, 20, 50)]);
    let r = f.xcopy(&l).await;
    assert_eq!(check(&r).0, (crate::scsi::sense::key::DATA_PROTECT, 0x27, 0x00));
    assert!(bytes(&f.b, 50 * BS as u64, 8 * BS as u64).await.iter().all(|&b| b == 0));
    // Sent to the read-only LUN itself, the same copy is refused too.
    let r = f.exec(&nexus("a"), 1, &xcopy_cdb(l.len() as u32), &l).await;
    assert_eq!(check(&r).0, (crate::scsi::sense::key::DATA_PROTECT, 0x27, 0x00));
}
