#![no_main]
//! See `basalt_s3gw_fuzz::headers` for the input layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_s3gw_fuzz::headers::headers(data));
