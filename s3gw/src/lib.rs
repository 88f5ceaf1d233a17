//! `s3gw`: the S3 gateway over Basalt storage.
//!
//! - [`backend`]: the interface between the S3 protocol layer and the object store.
//! - [`store`]: the object store on Basalt volumes and the metadata index.
//! - [`s3`]: the S3 protocol layer on `s3s` (operations, authentication, error codes).
//! - [`server`]: the HTTP server that serves it.
//! - [`mem`]: an in-memory backend, a test double for the protocol layer's tests.

pub mod backend;
pub mod mem;
pub mod s3;
pub mod server;
pub mod store;

pub use server::{serve, ServeOptions};
