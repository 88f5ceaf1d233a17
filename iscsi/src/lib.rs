//! `basalt-iscsi`: an iSCSI target (RFC 7143) that serves Basalt volumes as SCSI block
//! devices (SBC-4) to initiators outside the cluster.
//!
//! Layers, bottom up:
//! - [`lu`]: the contract between the transport and the SCSI layer ([`lu::ScsiCommand`],
//!   [`lu::ScsiResponse`], the [`lu::BlockDevice`] a logical unit stores its blocks on);
//! - [`scsi`]: SCSI command emulation for one logical unit (INQUIRY/VPD, READ/WRITE, UNMAP,
//!   persistent reservations, ALUA reports, sense data) over a `BlockDevice`;
//! - [`pdu`], [`text`], [`chap`]: iSCSI wire format, login/text key negotiation, CHAP;
//! - [`conn`]: one iSCSI connection/session state machine (login, full feature phase,
//!   R2T/Data-Out, command windows, task management, NOP, logout);
//! - [`portal`]: the TCP listener and the target registry sessions log in to;
//! - [`fuzzing`]: entry points the fuzz targets and the corpus replay test share;
//! - [`cluster`]: the Basalt side: targets in metadata records, volumes as devices, ALUA
//!   states from write leases, reservations in metadata.

pub mod chap;
pub mod conn;
pub mod fuzzing;
pub mod lu;
pub mod pdu;
pub mod portal;
pub mod scsi;
pub mod text;

pub use conn::Config;
pub use pdu::{Error, Result};
pub mod cluster;
