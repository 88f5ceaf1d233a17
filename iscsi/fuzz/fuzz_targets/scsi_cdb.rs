#![no_main]
//! See `basalt_iscsi::fuzzing::scsi_cdb` for the input layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_iscsi::fuzzing::scsi_cdb(data));
