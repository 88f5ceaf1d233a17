//! What the NBD server serves: the `BlockBackend` trait (one handle per client connection), the
//! `ExportProvider` trait that names and opens exports, their error type, and `StaticExports`, a
//! fixed name → backend table for tests, benchmarks and simple deployments.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::proto;

/// Why a backend operation or an export lookup failed. Each variant maps to one NBD error value
/// (see [`BackendError::errno`]) and, during the handshake, to one option error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The export does not exist (handshake: `NBD_REP_ERR_UNKNOWN`).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is malformed for this backend (`NBD_EINVAL`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Out of space or quota (`NBD_ENOSPC`).
    #[error("no space left on device")]
    NoSpace,
    /// The backend refuses writes (`NBD_EPERM`).
    #[error("export is read-only")]
    ReadOnly,
    /// Another holder took over the volume's write lease (`NBD_EPERM`); this handle must not
    /// write again.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Anything else (`NBD_EIO`).
    #[error("I/O error: {0}")]
    Io(String),
}

impl BackendError {
    /// The NBD error value sent to the client for this error.
    pub fn errno(&self) -> u32 {
        match self {
            BackendError::NotFound(_) | BackendError::Io(_) => proto::EIO,
            BackendError::InvalidArgument(_) => proto::EINVAL,
            BackendError::NoSpace => proto::ENOSPC,
            BackendError::ReadOnly | BackendError::Fenced(_) => proto::EPERM,
        }
    }
}

impl From<std::io::Error> for BackendError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::NotFound => BackendError::NotFound(e.to_string()),
            ErrorKind::InvalidInput => BackendError::InvalidArgument(e.to_string()),
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                BackendError::NoSpace
            }
            ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied => BackendError::ReadOnly,
            _ => BackendError::Io(e.to_string()),
        }
    }
}

/// One run of bytes with the same allocation state, as reported by
/// [`BlockBackend::block_status`]. Extents are consecutive, starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// False if the range is not allocated in the backing store (`NBD_STATE_HOLE`).
    pub allocated: bool,
    /// True if the range is known to read as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    pub fn data(length: u64) -> Self {
        Self { length, allocated: true, zero: false }
    }

    pub fn hole(length: u64) -> Self {
        Self { length, allocated: false, zero: true }
    }
}

/// A block device as seen by one NBD connection. The server calls the methods concurrently
/// (requests are pipelined), only with ranges inside `[0, size())`, never with a zero length,
/// and never with a `read`/`write` longer than the negotiated maximum payload.
#[async_trait]
pub trait BlockBackend: Send + Sync + 'static {
    /// Export size in bytes; must not change while a connection is open.
    fn size(&self) -> u64;

    /// A read-only backend gets `NBD_FLAG_READ_ONLY`, and writes are refused with `NBD_EPERM`
    /// before they reach it.
    fn read_only(&self) -> bool {
        false
    }

    /// Whether a flush on one connection also makes writes completed on other connections to
    /// the same export durable (`NBD_FLAG_CAN_MULTI_CONN`). True for anything whose flush is
    /// global to the export, such as fdatasync on a shared file or a write path that is durable
    /// at acknowledgement.
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Returns exactly `len` bytes.
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError>;

    /// With `fua`, the data must be durable when this returns.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError>;

    /// Makes every write that has completed so far durable.
    async fn flush(&self) -> Result<(), BackendError>;

    /// Advisory discard; the range's contents become unspecified (usually zero).
    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError>;

    /// Zeroes the range; `may_trim` allows deallocating it instead of writing zeroes.
    async fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> Result<(), BackendError>;

    /// Allocation map of `[offset, offset + len)`. The default reports everything as allocated
    /// data, which is always correct if the backend cannot tell.
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BackendError> {
        let _ = offset;
        Ok(vec![Extent::data(u64::from(len))])
    }

    /// Called once when the connection that opened this handle ends (release leases, flush
    /// caches). Errors are logged by the server, nothing more can be done with them.
    async fn close(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// An export as listed by `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
}

/// Names and opens exports. `open` is called once per connection that selects an export, so a
/// provider can take a per-client write lease there and release it in [`BlockBackend::close`].
#[async_trait]
pub trait ExportProvider: Send + Sync + 'static {
    async fn list(&self) -> Result<Vec<ExportInfo>, BackendError>;

    /// `Err(BackendError::NotFound)` for an unknown name; the client then gets
    /// `NBD_REP_ERR_UNKNOWN`. The empty name is the client's "default export".
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockBackend>, BackendError>;

    /// Description of one export for `NBD_INFO_DESCRIPTION`; the default looks it up in `list`.
    async fn description(&self, name: &str) -> Result<Option<String>, BackendError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
            .filter(|d| !d.is_empty()))
    }
}

/// A fixed table of exports sharing their backends between connections.
#[derive(Default, Clone)]
pub struct StaticExports {
    exports: BTreeMap<String, (String, Arc<dyn BlockBackend>)>,
}

impl StaticExports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the export `name`.
    pub fn with_export(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        backend: Arc<dyn BlockBackend>,
    ) -> Self {
        self.exports.insert(name.into(), (description.into(), backend));
        self
    }
}

#[async_trait]
impl ExportProvider for StaticExports {
    async fn list(&self) -> Result<Vec<ExportInfo>, BackendError> {
        Ok(self
            .exports
            .iter()
            .map(|(name, (description, _))| ExportInfo {
                name: name.clone(),
                description: description.clone(),
            })
            .collect())
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn BlockBackend>, BackendError> {
        self.exports
            .get(name)
            .map(|(_, b)| Arc::clone(b))
            .ok_or_else(|| BackendError::NotFound(format!("no export named {name:?}")))
    }
}
