//! The frame: one per direction on each QUIC stream.
//!
//! ```text
//! u32 magic (includes the format version) | u32 header_len | u64 data_len   (little endian)
//! header: header_len bytes of bincode 2 (serde, standard config)
//! data:   data_len raw bytes
//! ```
//!
//! The bulk data part (chunk blocks, up to 64 MiB) never goes through serde: it is written
//! from the caller's `Bytes` as is and read straight into one buffer sized from the length.

use crate::error::{Result, RpcError};
use bytes::{Bytes, BytesMut};
use quinn::{ReadError, ReadExactError, RecvStream, SendStream, WriteError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::net::SocketAddr;

/// "BSR" and format version 1.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BSR\x01");
/// Largest header accepted (a serialized request or response without its data part).
pub const MAX_HEADER_LEN: usize = 4 << 20;
/// Largest data part accepted.
pub const MAX_DATA_LEN: u64 = 128 << 20;

const PREFIX_LEN: usize = 16;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Serializes `header` into a buffer that starts with the frame prefix, ready to be sent
/// before the data part. One allocation per frame.
pub(crate) fn encode<T: Serialize + ?Sized>(header: &T, data_len: usize) -> Result<Bytes> {
    let data_len = data_len as u64;
    if data_len > MAX_DATA_LEN {
        return Err(RpcError::FrameTooLarge { part: "data", len: data_len, max: MAX_DATA_LEN });
    }
    let mut buf = Vec::with_capacity(PREFIX_LEN + 128);
    buf.extend_from_slice(&[0; PREFIX_LEN]);
    bincode::serde::encode_into_std_write(header, &mut buf, config())?;
    let header_len = buf.len() - PREFIX_LEN;
    if header_len > MAX_HEADER_LEN {
        return Err(RpcError::FrameTooLarge {
            part: "header",
            len: header_len as u64,
            max: MAX_HEADER_LEN as u64,
        });
    }
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    // Cannot truncate: header_len <= MAX_HEADER_LEN < u32::MAX.
    buf[4..8].copy_from_slice(&(header_len as u32).to_le_bytes());
    buf[8..16].copy_from_slice(&data_len.to_le_bytes());
    Ok(Bytes::from(buf))
}

/// Sends a frame (prefix and header from [`encode`], then the data) and finishes the stream.
pub(crate) async fn write(
    send: &mut SendStream,
    peer: SocketAddr,
    header: Bytes,
    data: Bytes,
) -> Result<()> {
    let mut chunks = [header, data];
    send.write_all_chunks(&mut chunks).await.map_err(|e| write_error(peer, e))?;
    // Only fails if the stream was already finished or reset, which we never do before.
    send.finish().map_err(|_| RpcError::StreamReset { addr: peer, code: 0 })
}

/// Reads one frame and checks that the stream ends right after it.
pub(crate) async fn read<T: DeserializeOwned>(
    recv: &mut RecvStream,
    peer: SocketAddr,
) -> Result<(T, Bytes)> {
    let mut prefix = [0u8; PREFIX_LEN];
    read_exact(recv, peer, &mut prefix, "prefix").await?;
    let (magic, header_len, data_len) = split_prefix(&prefix);
    if magic != MAGIC {
        return Err(RpcError::Decode(format!("bad magic {magic:#010x} (expected {MAGIC:#010x})")));
    }
    if header_len > MAX_HEADER_LEN as u64 {
        return Err(RpcError::FrameTooLarge {
            part: "header",
            len: header_len,
            max: MAX_HEADER_LEN as u64,
        });
    }
    if data_len > MAX_DATA_LEN {
        return Err(RpcError::FrameTooLarge { part: "data", len: data_len, max: MAX_DATA_LEN });
    }
    // Both lengths are bounded above, so the casts cannot truncate.
    let mut header_buf = vec![0u8; header_len as usize];
    read_exact(recv, peer, &mut header_buf, "header").await?;
    let (header, used) = bincode::serde::decode_from_slice::<T, _>(&header_buf, config())
        .map_err(|e| RpcError::Decode(format!("undecodable header: {e}")))?;
    if used != header_buf.len() {
        return Err(RpcError::Decode(format!(
            "header has {} trailing bytes",
            header_buf.len() - used
        )));
    }
    let data = read_data(recv, peer, data_len as usize).await?;
    match recv.read_chunk(1, true).await.map_err(|e| read_error(peer, e))? {
        None => Ok((header, data)),
        Some(_) => Err(RpcError::Decode("bytes after the end of the frame".into())),
    }
}

fn split_prefix(prefix: &[u8; PREFIX_LEN]) -> (u32, u64, u64) {
    let mut magic = [0; 4];
    let mut header_len = [0; 4];
    let mut data_len = [0; 8];
    magic.copy_from_slice(&prefix[0..4]);
    header_len.copy_from_slice(&prefix[4..8]);
    data_len.copy_from_slice(&prefix[8..16]);
    (
        u32::from_le_bytes(magic),
        u64::from(u32::from_le_bytes(header_len)),
        u64::from_le_bytes(data_len),
    )
}

async fn read_exact(
    recv: &mut RecvStream,
    peer: SocketAddr,
    buf: &mut [u8],
    part: &str,
) -> Result<()> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(ReadExactError::FinishedEarly(got)) => Err(RpcError::Decode(format!(
            "truncated frame: {part} has {got} of {} bytes",
            buf.len()
        ))),
        Err(ReadExactError::ReadError(e)) => Err(read_error(peer, e)),
    }
}

/// Data parts at least this long are received into page-aligned buffers, so block data can go
/// to an `O_DIRECT` file without another copy.
const ALIGNED_DATA: usize = basalt_iobuf::ALIGN;

/// Reads `len` bytes with a single copy out of QUIC's receive buffers (no zero-fill). Block-
/// sized parts land in a pooled page-aligned buffer; a small part that arrives in one piece
/// is handed over without copying at all.
async fn read_data(recv: &mut RecvStream, peer: SocketAddr, len: usize) -> Result<Bytes> {
    let mut small: Option<BytesMut> = None;
    let mut aligned = (len >= ALIGNED_DATA).then(|| basalt_iobuf::AlignedBuf::filled_later(len));
    let mut got = 0;
    while got < len {
        let chunk = recv
            .read_chunk(len - got, true)
            .await
            .map_err(|e| read_error(peer, e))?
            .ok_or_else(|| {
                RpcError::Decode(format!("truncated frame: data has {got} of {len} bytes"))
            })?;
        let n = chunk.bytes.len();
        match &mut aligned {
            Some(buf) => buf.as_mut()[got..got + n].copy_from_slice(&chunk.bytes),
            None if got == 0 && n == len => return Ok(chunk.bytes),
            None => small.get_or_insert_with(|| BytesMut::with_capacity(len)).extend_from_slice(&chunk.bytes),
        }
        got += n;
    }
    Ok(match (aligned, small) {
        (Some(buf), _) => buf.into_bytes(),
        (None, Some(buf)) => buf.freeze(),
        (None, None) => Bytes::new(),
    })
}

pub(crate) fn read_error(peer: SocketAddr, err: ReadError) -> RpcError {
    match err {
        ReadError::Reset(code) => RpcError::StreamReset { addr: peer, code: code.into_inner() },
        ReadError::ConnectionLost(e) => RpcError::from_connection(peer, e, false),
        // We never read a stream we stopped, never read out of order and never use 0-RTT.
        other @ (ReadError::ClosedStream
        | ReadError::IllegalOrderedRead
        | ReadError::ZeroRttRejected) => {
            RpcError::ConnectionLost { addr: peer, reason: other.to_string() }
        }
    }
}

pub(crate) fn write_error(peer: SocketAddr, err: WriteError) -> RpcError {
    match err {
        WriteError::Stopped(code) => RpcError::StreamReset { addr: peer, code: code.into_inner() },
        WriteError::ConnectionLost(e) => RpcError::from_connection(peer, e, false),
        other @ (WriteError::ClosedStream | WriteError::ZeroRttRejected) => {
            RpcError::ConnectionLost { addr: peer, reason: other.to_string() }
        }
    }
}
