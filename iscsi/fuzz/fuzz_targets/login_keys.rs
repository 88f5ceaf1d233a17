#![no_main]
//! See `basalt_iscsi::fuzzing::login_keys` for the input layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_iscsi::fuzzing::login_keys(data));
