//! The error type of this crate and the application codes carried by QUIC stream resets and
//! connection closes.

use std::net::SocketAddr;
use std::time::Duration;

/// Application error codes this crate puts on the wire (QUIC `RESET_STREAM`, `STOP_SENDING`
/// and `CONNECTION_CLOSE`). Peers of any version must agree on them, so never renumber.
pub mod code {
    /// Normal end (an endpoint or connection closed on purpose).
    pub const OK: u32 = 0;
    /// The frame on the stream was malformed: bad magic, truncated, undecodable header,
    /// trailing bytes.
    pub const MALFORMED: u32 = 1;
    /// The frame declared a header or data part above the limits.
    pub const TOO_LARGE: u32 = 2;
    /// The serving side failed to produce an answer (the service panicked or its response
    /// could not be encoded).
    pub const INTERNAL: u32 = 3;
    /// The calling side gave up (timeout or its future was dropped).
    pub const CANCELLED: u32 = 4;
    /// The serving side is shutting down; the request was not processed.
    pub const SHUTTING_DOWN: u32 = 5;

    /// A human name for a code, for messages.
    pub fn name(code: u64) -> &'static str {
        match code {
            0 => "ok",
            1 => "malformed frame",
            2 => "frame too large",
            3 => "internal error",
            4 => "cancelled",
            5 => "shutting down",
            _ => "unknown code",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("invalid address {0:?}")]
    InvalidAddress(String),
    #[error("invalid node name {0:?}: use 1-64 characters out of a-z, A-Z, 0-9, '-', '_' and '.'")]
    InvalidName(String),
    /// The peer could not be reached (no answer to the handshake, network error).
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The TLS handshake failed: one side does not trust the other's certificate, or the
    /// protocol versions do not match. Retrying does not help.
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    /// Our own certificate, key or TLS configuration is unusable.
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("call to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding the message header: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The peer sent a frame we cannot read: bad magic, truncated, undecodable header.
    #[error("malformed frame: {0}")]
    Decode(String),
    #[error("frame too large: {part} of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { part: &'static str, len: u64, max: u64 },
    /// The connection died (peer closed, restarted, stopped answering) during the call; the
    /// request may or may not have been processed.
    #[error("connection to {addr} lost: {reason}")]
    ConnectionLost { addr: SocketAddr, reason: String },
    /// The peer aborted this one call; `code` is one of [`code`].
    #[error("call to {addr} aborted by the peer: {} (code {code})", code::name(*.code))]
    StreamReset { addr: SocketAddr, code: u64 },
    /// This endpoint has been closed.
    #[error("endpoint closed")]
    Closed,
}

impl RpcError {
    /// Whether the same call may succeed if tried again later (possibly against another
    /// replica). Protocol and configuration errors are permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            RpcError::Connect { .. } | RpcError::Timeout { .. } | RpcError::ConnectionLost { .. } => {
                true
            }
            RpcError::StreamReset { code, .. } => {
                *code == u64::from(code::CANCELLED) || *code == u64::from(code::SHUTTING_DOWN)
            }
            RpcError::InvalidAddress(_)
            | RpcError::InvalidName(_)
            | RpcError::Handshake { .. }
            | RpcError::Tls(_)
            | RpcError::Certificate(_)
            | RpcError::Io(_)
            | RpcError::Encode(_)
            | RpcError::Decode(_)
            | RpcError::FrameTooLarge { .. }
            | RpcError::Closed => false,
        }
    }

    /// Classifies a connection-level failure. `handshaking` tells whether the connection had
    /// been established: a timeout before that means "unreachable", after it "lost".
    pub(crate) fn from_connection(
        addr: SocketAddr,
        err: quinn::ConnectionError,
        handshaking: bool,
    ) -> Self {
        use quinn::ConnectionError as E;
        let reason = err.to_string();
        match err {
            E::TransportError(ref e) if is_tls_alert(e.code) => RpcError::Handshake { addr, reason },
            E::ConnectionClosed(ref close) if is_tls_alert(close.error_code) => {
                RpcError::Handshake { addr, reason }
            }
            E::VersionMismatch => RpcError::Handshake { addr, reason },
            E::LocallyClosed => RpcError::Closed,
            E::TimedOut | E::CidsExhausted if handshaking => RpcError::Connect { addr, reason },
            _ => RpcError::ConnectionLost { addr, reason },
        }
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100-0x1ff (RFC 9001 section 4.8).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..=0x1ff).contains(&u64::from(code))
}

pub type Error = RpcError;
pub type Result<T, E = RpcError> = std::result::Result<T, E>;
