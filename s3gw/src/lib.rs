//! `s3gw`: the S3 gateway over Basalt storage.
//!
//! - [`backend`]: the interface between the S3 protocol layer and the object store.
//! - [`store`]: the object store on Basalt volumes and the metadata index.

pub mod backend;
pub mod store;
