//! Fuzzing entry points of the S3 gateway, one module per cargo-fuzz target in
//! `fuzz_targets/`. `s3gw/tests/fuzz_corpus.rs` includes the same files with `#[path]` and
//! replays `corpus/<target>/` on stable, so every test run checks the same invariants.

pub mod headers;
pub mod request;
