//! The `basalt` command's library: the local development cluster (also used by the test
//! harness and benchmarks) and command-line helpers.

pub mod bench;
pub mod dev;
pub mod iscsi;
pub mod s3;
pub mod sizes;
