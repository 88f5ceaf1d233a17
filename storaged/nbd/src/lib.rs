//! `basalt-nbd`: an NBD server (fixed newstyle handshake, simple and structured replies,
//! `base:allocation` block status) over any [`BlockBackend`], for QEMU, the kernel client,
//! libnbd tools and fio.
//!
//! The crate owns the wire protocol only. What an export *is* comes from an [`ExportProvider`]:
//! it lists exports and opens one backend handle per connection (the hook for per-client write
//! leases), which the server closes with [`BlockBackend::close`] when the connection ends.
//!
//! Requests on a connection are pipelined: one task reads requests, each request runs as its own
//! task against the backend (bounded by [`Config::max_in_flight`] and
//! [`Config::max_buffered_bytes`]), and one task writes replies in completion order.
//!
//! The caller binds the listeners ([`serve_tcp`], [`serve_unix`] or [`NbdServer`]), so tests can
//! use port 0 and daemons decide their own addresses.

mod backend;
mod file;
mod handshake;
mod mem;
mod proto;
mod server;
mod transmission;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use backend::{BackendError, BlockBackend, ExportInfo, ExportProvider, Extent, StaticExports};
pub use file::FileBackend;
pub use mem::MemBackend;
pub use server::{serve_tcp, serve_unix, NbdServer};

/// Why a connection was dropped (or a server could not be built).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol (bad magic, unknown flags); the connection is closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    /// `NBD_OPT_EXPORT_NAME` named an export that could not be opened; that option has no error
    /// reply, so the connection is closed.
    #[error("export {name:?} refused: {source}")]
    ExportRefused { name: String, source: BackendError },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Server limits. Block sizes are advertised with `NBD_INFO_BLOCK_SIZE`; the server itself
/// accepts any alignment and leaves stricter needs to the backend.
#[derive(Debug, Clone)]
pub struct Config {
    /// Whole handshake (greeting to `NBD_OPT_GO`) must finish within this, so idle sockets do
    /// not pin connection slots.
    pub handshake_timeout: Duration,
    /// Requests of one connection being processed or waiting for their reply to be written.
    pub max_in_flight: usize,
    /// Write payloads and read results held in memory per connection.
    pub max_buffered_bytes: u64,
    /// Largest READ/WRITE length accepted; larger ones get `NBD_EINVAL`.
    pub max_payload: u32,
    pub min_block_size: u32,
    pub preferred_block_size: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            max_in_flight: 128,
            max_buffered_bytes: 256 << 20,
            max_payload: 32 << 20,
            min_block_size: 512,
            preferred_block_size: 4096,
        }
    }
}

impl Config {
    /// Checks the constraints the protocol puts on advertised sizes.
    pub fn validate(&self) -> Result<()> {
        let pow2 = |v: u32| v.is_power_of_two();
        if !pow2(self.min_block_size) || self.min_block_size > 65536 {
            return Err(Error::Config("min_block_size must be a power of two ≤ 64 KiB".into()));
        }
        if !pow2(self.preferred_block_size)
            || self.preferred_block_size < self.min_block_size.max(512)
        {
            return Err(Error::Config(
                "preferred_block_size must be a power of two ≥ max(min_block_size, 512)".into(),
            ));
        }
        if self.max_payload < self.preferred_block_size
            // min_block_size is a power of two (checked above).
            || self.max_payload & (self.min_block_size - 1) != 0
            || self.max_payload > u32::MAX - 64
        {
            return Err(Error::Config(
                "max_payload must be a multiple of min_block_size, ≥ preferred_block_size".into(),
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1 << 20 {
            return Err(Error::Config("max_in_flight must be in 1..=1048576".into()));
        }
        if self.max_buffered_bytes < u64::from(self.max_payload) {
            return Err(Error::Config("max_buffered_bytes must hold at least one max_payload".into()));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Error::Config("handshake_timeout must be positive".into()));
        }
        Ok(())
    }
}
