//! Wire constants of the NBD protocol (fixed newstyle handshake, simple and structured replies) and
//! the small encoders/decoders shared by the handshake and the transmission phase.
//!
//! Values come from the protocol description in the NBD project's `doc/proto.md`; names keep the
//! spec's spelling (minus the `NBD_` prefix) so they can be grepped against it.

use bytes::{BufMut, Bytes, BytesMut};

/// "NBDMAGIC", first thing the server sends.
pub const INIT_PASSWD: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// NBD_INFO types carried in NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Error values (the protocol's fixed subset of errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// The only metadata context we implement.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context id we hand out for `base:allocation`; ids are opaque to clients and per connection.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, message, context name) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Size of a request header in the transmission phase.
pub const REQUEST_HEADER_LEN: usize = 28;

/// Name of an option for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        4 => "PEEK_EXPORT",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        11 => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// Name of a command for logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// One option reply: header plus payload, as one buffer.
pub fn option_reply(opt: u32, reply_type: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + payload.len());
    b.put_u64(REPLY_MAGIC);
    b.put_u32(opt);
    b.put_u32(reply_type);
    // Payloads are built by us from bounded pieces (names, messages ≤ 4 KiB, export lists), so
    // saturating here only guards against an absurd export list, which the caller caps anyway.
    b.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    b.put_slice(payload);
    b.freeze()
}

/// Cut `msg` to at most `MAX_STRING_LEN` bytes on a character boundary.
pub fn bounded_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING_LEN {
        return msg;
    }
    let mut end = MAX_STRING_LEN;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// Simple reply header (16 bytes); the read payload, if any, follows separately.
pub fn simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    b.freeze()
}

/// Header of one structured reply chunk (20 bytes).
pub fn structured_header(b: &mut BytesMut, cookie: u64, flags: u16, ty: u16, len: u32) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(ty);
    b.put_u64(cookie);
    b.put_u32(len);
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk carrying a human-readable message.
pub fn structured_error(cookie: u64, error: u32, msg: &str) -> Bytes {
    let msg = bounded_message(msg).as_bytes();
    // bounded_message keeps msg ≤ 4096 bytes, which fits both u16 and u32.
    let msg_len = msg.len() as u16;
    let mut b = BytesMut::with_capacity(20 + 6 + msg.len());
    structured_header(&mut b, cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + u32::from(msg_len));
    b.put_u32(error);
    b.put_u16(msg_len);
    b.put_slice(msg);
    b.freeze()
}

/// Bounds-checked big-endian reader over option data. `bytes::Buf` getters panic on short input,
/// and option data comes straight from the client.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).and_then(|b| b.try_into().ok()).map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes)
    }

    /// A length-prefixed (u32) UTF-8 string of at most `MAX_STRING_LEN` bytes.
    pub fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING_LEN {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes a 28-byte header; `Err(magic)` if the magic is wrong.
    pub fn decode(h: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, u32> {
        let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
        let magic = be32(0);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self { flags: be16(4), command: be16(6), cookie: be64(8), offset: be64(16), length: be32(24) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_rejects_short_and_oversized_input() {
        let mut c = Cursor::new(&[0, 0, 0, 5, b'a']);
        assert_eq!(c.string(), None);
        let mut c = Cursor::new(&[0, 1]);
        assert_eq!(c.u32(), None);
        let mut big = vec![0u8, 0, 0x10, 0x01];
        big.extend(std::iter::repeat_n(b'x', 4097));
        assert_eq!(Cursor::new(&big).string(), None);
        let mut c = Cursor::new(&[0, 0, 0, 2, b'h', b'i', 0, 7]);
        assert_eq!(c.string(), Some("hi"));
        assert_eq!(c.u16(), Some(7));
        assert_eq!(c.remaining(), 0);
    }

    #[test]
    fn request_decode_checks_magic() {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        h[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        h[16..24].copy_from_slice(&4096u64.to_be_bytes());
        h[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::decode(&h).expect("valid header");
        assert_eq!(r.command, CMD_WRITE);
        assert_eq!(r.cookie, 0x1122_3344_5566_7788);
        assert_eq!(r.offset, 4096);
        assert_eq!(r.length, 512);
        h[0] = 0;
        assert!(Request::decode(&h).is_err());
    }

    #[test]
    fn messages_are_cut_on_char_boundaries() {
        let long = "é".repeat(3000);
        let cut = bounded_message(&long);
        assert!(cut.len() <= MAX_STRING_LEN);
        assert!(cut.len() >= MAX_STRING_LEN - 1);
    }
}
