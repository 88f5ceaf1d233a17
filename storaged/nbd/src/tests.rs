//! Protocol tests with a hand-written client over an in-memory duplex pipe: handshake and option
//! parsing, request validation, reply encoding, pipelining and connection lifecycle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::proto::*;
use crate::{BackendError, BlockBackend, Config, Error, ExportProvider, Extent, MemBackend, NbdServer, StaticExports};

const DISK_SIZE: u64 = 1 << 20;
/// Generous bound on any single step; a hang is a failure, not a stuck test run.
const STEP: Duration = Duration::from_secs(5);

struct Client {
    s: DuplexStream,
    server: JoinHandle<crate::Result<()>>,
}

/// What one option reply looked like.
#[derive(Debug)]
struct OptReply {
    opt: u32,
    ty: u32,
    data: Vec<u8>,
}

/// One structured chunk.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    ty: u16,
    cookie: u64,
    payload: Vec<u8>,
}

fn exports() -> StaticExports {
    StaticExports::new()
        .with_export("disk", "scratch disk", Arc::new(MemBackend::new(DISK_SIZE)))
        .with_export("ro", "", Arc::new(MemBackend::new(DISK_SIZE).into_read_only()))
}

fn spawn_with(provider: Arc<dyn ExportProvider>, config: Config) -> Client {
    let server = NbdServer::new(provider, config).expect("valid config");
    let (c, s) = tokio::io::duplex(4 << 20);
    let (r, w) = tokio::io::split(s);
    let server = tokio::spawn(async move { server.serve_connection(r, w, CancellationToken::new()).await });
    Client { s: c, server }
}

fn spawn(provider: Arc<dyn ExportProvider>) -> Client {
    spawn_with(provider, Config::default())
}

impl Client {
    async fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tokio::time::timeout(STEP, self.s.read_exact(&mut b)).await.expect("server reply in time").expect("read");
        b
    }

    async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).await.try_into().expect("2 bytes"))
    }

    async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).await.try_into().expect("4 bytes"))
    }

    async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).await.try_into().expect("8 bytes"))
    }

    /// Reads the greeting and answers with `flags`.
    async fn greet(&mut self, flags: u32) {
        assert_eq!(self.u64().await, INIT_PASSWD);
        assert_eq!(self.u64().await, IHAVEOPT);
        assert_eq!(self.u16().await, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.s.write_all(&flags.to_be_bytes()).await.expect("send flags");
    }

    async fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(opt);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        self.s.write_all(&b).await.expect("send option");
    }

    async fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64().await, REPLY_MAGIC);
        let opt = self.u32().await;
        let ty = self.u32().await;
        let len = self.u32().await as usize;
        let data = self.read_n(len).await;
        OptReply { opt, ty, data }
    }

    /// Replies up to and including the first non-INFO/SERVER/META_CONTEXT one.
    async fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply().await;
            let last = !matches!(r.ty, REP_INFO | REP_SERVER | REP_META_CONTEXT);
            out.push(r);
            if last {
                return out;
            }
        }
    }

    async fn go(&mut self, name: &str, infos: &[u16]) -> Vec<OptReply> {
        self.send_opt(OPT_GO, &go_data(name, infos)).await;
        self.opt_replies().await
    }

    /// Standard connection: fixed newstyle, no zeroes, optional structured replies, GO.
    async fn connect(&mut self, name: &str, structured: bool) -> (u64, u16) {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        if structured {
            self.send_opt(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.opt_reply().await.ty, REP_ACK);
        }
        let replies = self.go(name, &[]).await;
        assert_eq!(replies.last().map(|r| r.ty), Some(REP_ACK), "GO failed: {replies:?}");
        export_info(&replies).expect("NBD_INFO_EXPORT")
    }

    async fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(flags);
        b.put_u16(cmd);
        b.put_u64(cookie);
        b.put_u64(offset);
        b.put_u32(len);
        b.put_slice(payload);
        self.s.write_all(&b).await.expect("send request");
    }

    /// (error, cookie) of a simple reply.
    async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32().await, SIMPLE_REPLY_MAGIC);
        let err = self.u32().await;
        (err, self.u64().await)
    }

    async fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32().await, STRUCTURED_REPLY_MAGIC);
        let flags = self.u16().await;
        let ty = self.u16().await;
        let cookie = self.u64().await;
        let len = self.u32().await as usize;
        let payload = self.read_n(len).await;
        Chunk { flags, ty, cookie, payload }
    }

    /// Asserts the server hung up, and returns how `serve_connection` ended.
    async fn expect_closed(mut self) -> crate::Result<()> {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(STEP, self.s.read(&mut b)).await.expect("close in time").unwrap_or(0);
        assert_eq!(n, 0, "connection still open");
        tokio::time::timeout(STEP, self.server).await.expect("server task ends").expect("no panic")
    }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(name.len() as u32);
    b.put_slice(name.as_bytes());
    b.put_u16(infos.len() as u16);
    for i in infos {
        b.put_u16(*i);
    }
    b.to_vec()
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(name.len() as u32);
    b.put_slice(name.as_bytes());
    b.put_u32(queries.len() as u32);
    for q in queries {
        b.put_u32(q.len() as u32);
        b.put_slice(q.as_bytes());
    }
    b.to_vec()
}

fn info_payload(replies: &[OptReply], info: u16) -> Option<Vec<u8>> {
    replies
        .iter()
        .filter(|r| r.ty == REP_INFO && r.data.len() >= 2)
        .find(|r| u16::from_be_bytes([r.data[0], r.data[1]]) == info)
        .map(|r| r.data[2..].to_vec())
}

fn export_info(replies: &[OptReply]) -> Option<(u64, u16)> {
    let p = info_payload(replies, INFO_EXPORT)?;
    Some((u64::from_be_bytes(p[0..8].try_into().ok()?), u16::from_be_bytes(p[8..10].try_into().ok()?)))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

#[tokio::test]
async fn go_reports_size_flags_block_sizes_name_and_description() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let replies = c.go("disk", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]).await;
    assert!(replies.iter().all(|r| r.opt == OPT_GO));
    assert_eq!(replies.last().map(|r| r.ty), Some(REP_ACK));
    let (size, flags) = export_info(&replies).expect("export info");
    assert_eq!(size, DISK_SIZE);
    for f in [FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_CAN_MULTI_CONN, FLAG_SEND_CACHE] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & (FLAG_READ_ONLY | FLAG_SEND_DF), 0, "no READ_ONLY, no DF without structured replies");
    let bs = info_payload(&replies, INFO_BLOCK_SIZE).expect("block size");
    assert_eq!((be32(&bs[0..]), be32(&bs[4..]), be32(&bs[8..])), (512, 4096, 32 << 20));
    assert_eq!(info_payload(&replies, INFO_NAME).as_deref(), Some(&b"disk"[..]));
    assert_eq!(info_payload(&replies, INFO_DESCRIPTION).as_deref(), Some(&b"scratch disk"[..]));
    // Transmission works right after the ACK (no zero padding after GO).
    c.request(0, CMD_FLUSH, 7, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 7));
}

#[tokio::test]
async fn export_name_without_no_zeroes_gets_padding_then_transmission() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.u64().await, DISK_SIZE);
    let flags = c.u16().await;
    assert_ne!(flags & FLAG_HAS_FLAGS, 0);
    assert_eq!(c.read_n(124).await, vec![0u8; 124]);
    c.request(0, CMD_READ, 1, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (0, 1));
    assert_eq!(c.read_n(512).await, vec![0u8; 512]);
}

#[tokio::test]
async fn client_without_fixed_newstyle_is_refused() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(0).await;
    assert!(matches!(c.expect_closed().await, Err(Error::Protocol(_))));
}

#[tokio::test]
async fn unknown_client_flags_are_refused() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | 0x100).await;
    assert!(matches!(c.expect_closed().await, Err(Error::Protocol(_))));
}

#[tokio::test]
async fn bad_option_magic_closes_the_connection() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let mut b = BytesMut::new();
    b.put_u64(0x1234_5678_9abc_def0);
    b.put_u32(OPT_GO);
    b.put_u32(0);
    c.s.write_all(&b).await.expect("send");
    match c.expect_closed().await {
        Err(Error::Protocol(msg)) => assert!(msg.contains("magic"), "{msg}"),
        other => panic!("expected protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_export_with_go_is_reported_and_negotiation_continues() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let replies = c.go("nope", &[]).await;
    assert_eq!(replies.len(), 1, "no INFO before an ERR_UNKNOWN: {replies:?}");
    assert_eq!(replies[0].ty, REP_ERR_UNKNOWN);
    let msg = String::from_utf8(replies[0].data.clone()).expect("utf8 message");
    assert!(msg.contains("nope"), "{msg}");
    c.send_opt(OPT_INFO, &go_data("nope", &[])).await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_UNKNOWN);
    // Still in negotiation: the right name works.
    let (size, _) = c.connect_after_greeting("disk").await;
    assert_eq!(size, DISK_SIZE);
}

impl Client {
    async fn connect_after_greeting(&mut self, name: &str) -> (u64, u16) {
        let replies = self.go(name, &[]).await;
        assert_eq!(replies.last().map(|r| r.ty), Some(REP_ACK));
        export_info(&replies).expect("export info")
    }
}

#[tokio::test]
async fn unknown_export_with_export_name_closes_the_connection() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.send_opt(OPT_EXPORT_NAME, b"missing").await;
    match c.expect_closed().await {
        Err(Error::ExportRefused { name, source: BackendError::NotFound(_) }) => assert_eq!(name, "missing"),
        other => panic!("expected ExportRefused, got {other:?}"),
    }
}

#[tokio::test]
async fn unsupported_options_starttls_list_and_abort() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.send_opt(11, &[]).await; // EXTENDED_HEADERS
    let r = c.opt_reply().await;
    assert_eq!((r.opt, r.ty), (11, REP_ERR_UNSUP));
    c.send_opt(9999, b"junk data").await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_UNSUP);
    c.send_opt(OPT_STARTTLS, &[]).await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_POLICY);
    c.send_opt(OPT_LIST, b"x").await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_INVALID);
    c.send_opt(OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_INVALID);
    c.send_opt(OPT_GO, &[0, 0, 0, 9, b'd']).await; // name length beyond the data
    assert_eq!(c.opt_reply().await.ty, REP_ERR_INVALID);

    c.send_opt(OPT_LIST, &[]).await;
    let replies = c.opt_replies().await;
    assert_eq!(replies.last().map(|r| r.ty), Some(REP_ACK));
    let listed: Vec<(String, String)> = replies
        .iter()
        .filter(|r| r.ty == REP_SERVER)
        .map(|r| {
            let n = be32(&r.data) as usize;
            (
                String::from_utf8(r.data[4..4 + n].to_vec()).expect("utf8"),
                String::from_utf8(r.data[4 + n..].to_vec()).expect("utf8"),
            )
        })
        .collect();
    assert_eq!(listed, vec![("disk".into(), "scratch disk".into()), ("ro".into(), String::new())]);

    c.send_opt(OPT_ABORT, &[]).await;
    assert_eq!(c.opt_reply().await.ty, REP_ACK);
    assert!(c.expect_closed().await.is_ok());
}

#[tokio::test]
async fn oversized_option_is_skipped_with_too_big() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.send_opt(OPT_LIST, &vec![0u8; 100_000]).await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_TOO_BIG);
    let (size, _) = c.connect_after_greeting("disk").await;
    assert_eq!(size, DISK_SIZE);
}

#[tokio::test]
async fn write_then_read_round_trips_with_simple_replies() {
    let mut c = spawn(Arc::new(exports()));
    c.connect("disk", false).await;
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
    c.request(CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 8192, &data).await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(0, CMD_READ, 2, 4096, 8192, &[]).await;
    assert_eq!(c.simple().await, (0, 2));
    assert_eq!(c.read_n(8192).await, data);
    c.request(0, CMD_TRIM, 3, 4096, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 3));
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 8192, 1024, &[]).await;
    assert_eq!(c.simple().await, (0, 4));
    c.request(0, CMD_CACHE, 5, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 5));
    c.request(0, CMD_READ, 6, 4096, 8192, &[]).await;
    assert_eq!(c.simple().await, (0, 6));
    let got = c.read_n(8192).await;
    assert!(got[..4096 + 1024].iter().all(|&b| b == 0));
    assert_eq!(&got[5120..], &data[5120..]);
    c.request(0, CMD_DISC, 7, 0, 0, &[]).await;
    assert!(c.expect_closed().await.is_ok());
}

#[tokio::test]
async fn invalid_reads_get_einval_and_the_connection_survives() {
    let mut c = spawn(Arc::new(exports()));
    c.connect("disk", false).await;
    c.request(0, CMD_READ, 1, DISK_SIZE - 512, 1024, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 1));
    c.request(0, CMD_READ, 2, u64::MAX - 10, 512, &[]).await; // offset + length overflows
    assert_eq!(c.simple().await, (EINVAL, 2));
    c.request(0, CMD_READ, 3, 0, (32 << 20) + 1, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 3));
    c.request(0, CMD_READ, 4, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 4));
    c.request(0, CMD_TRIM, 5, DISK_SIZE, 512, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 5));
    c.request(0, 42, 6, 0, 512, &[]).await; // unknown command
    assert_eq!(c.simple().await, (EINVAL, 6));
    c.request(0, CMD_BLOCK_STATUS, 7, 0, 512, &[]).await; // no meta context negotiated
    assert_eq!(c.simple().await, (EINVAL, 7));
    c.request(0, CMD_READ, 8, DISK_SIZE - 512, 512, &[]).await;
    assert_eq!(c.simple().await, (0, 8));
    assert_eq!(c.read_n(512).await, vec![0u8; 512]);
}

#[tokio::test]
async fn writes_past_the_end_get_enospc_and_oversized_payloads_are_skipped() {
    let mut c = spawn(Arc::new(exports()));
    c.connect("disk", false).await;
    c.request(0, CMD_WRITE, 1, DISK_SIZE - 512, 1024, &[0xee; 1024]).await;
    assert_eq!(c.simple().await, (ENOSPC, 1));
    c.request(0, CMD_WRITE_ZEROES, 2, DISK_SIZE, 512, &[]).await;
    assert_eq!(c.simple().await, (ENOSPC, 2));
    let big = vec![0xcd; (32 << 20) + 4096];
    c.request(0, CMD_WRITE, 3, 0, big.len() as u32, &big).await;
    assert_eq!(c.simple().await, (EINVAL, 3));
    // The payload was consumed: the next request parses fine and nothing was written.
    c.request(0, CMD_READ, 4, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 4));
    assert_eq!(c.read_n(4096).await, vec![0u8; 4096]);
}

#[tokio::test]
async fn bad_request_magic_closes_the_connection() {
    let mut c = spawn(Arc::new(exports()));
    c.connect("disk", false).await;
    c.s.write_all(&[0xffu8; REQUEST_HEADER_LEN]).await.expect("send");
    match c.expect_closed().await {
        Err(Error::Protocol(msg)) => assert!(msg.contains("magic"), "{msg}"),
        other => panic!("expected protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn structured_reads_use_data_hole_and_error_chunks() {
    let mut c = spawn(Arc::new(exports()));
    let (_, flags) = c.connect("disk", true).await;
    assert_ne!(flags & FLAG_SEND_DF, 0);
    c.request(0, CMD_WRITE, 1, 0, 4096, &[0x11; 4096]).await;
    assert_eq!(c.simple().await, (0, 1));

    c.request(0, CMD_READ, 2, 512, 1024, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.flags, ch.ty, ch.cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(be64(&ch.payload), 512);
    assert_eq!(&ch.payload[8..], &[0x11; 1024][..]);

    c.request(0, CMD_READ, 3, 65536, 8192, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.flags, ch.ty, ch.cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 3));
    assert_eq!((be64(&ch.payload), be32(&ch.payload[8..])), (65536, 8192));

    c.request(0, CMD_READ, 4, DISK_SIZE, 512, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.flags, ch.ty, ch.cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 4));
    assert_eq!(be32(&ch.payload), EINVAL);
    let msg_len = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert_eq!(ch.payload.len(), 6 + msg_len);
    assert!(String::from_utf8_lossy(&ch.payload[6..]).contains("past the end"));
}

#[tokio::test]
async fn meta_contexts_and_block_status() {
    let mem = Arc::new(MemBackend::new(DISK_SIZE));
    mem.fill(8192, &[1u8; 4096]).expect("seed");
    let mut c = spawn(Arc::new(StaticExports::new().with_export("disk", "", mem)));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    // Before structured replies, meta contexts are refused.
    c.send_opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:allocation"])).await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_INVALID);
    c.send_opt(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.ty, REP_ACK);

    c.send_opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])).await;
    let r = c.opt_replies().await;
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].ty, &r[0].data[4..]), (REP_META_CONTEXT, &b"base:allocation"[..]));
    c.send_opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &["qemu:dirty-bitmap:x"])).await;
    assert_eq!(c.opt_replies().await.len(), 1, "unknown namespace: only the ACK");
    c.send_opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["nocolon"])).await;
    assert_eq!(c.opt_reply().await.ty, REP_ERR_INVALID);

    c.send_opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:allocation", "qemu:foo"])).await;
    let r = c.opt_replies().await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].ty, REP_META_CONTEXT);
    let ctx_id = be32(&r[0].data);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    c.connect_after_greeting("disk").await;

    c.request(0, CMD_BLOCK_STATUS, 1, 0, 65536, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.flags, ch.ty, ch.cookie), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1));
    assert_eq!(be32(&ch.payload), ctx_id);
    let descs: Vec<(u32, u32)> =
        ch.payload[4..].chunks(8).map(|d| (be32(d), be32(&d[4..]))).collect();
    let hole = STATE_HOLE | STATE_ZERO;
    assert_eq!(descs, vec![(8192, hole), (4096, 0), (65536 - 12288, hole)]);

    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 2, 0, 65536, &[]).await;
    let ch = c.chunk().await;
    assert_eq!(ch.payload.len(), 12);
    assert_eq!((be32(&ch.payload[4..]), be32(&ch.payload[8..])), (8192, hole));

    c.request(0, CMD_BLOCK_STATUS, 3, DISK_SIZE - 512, 1024, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.ty, be32(&ch.payload)), (REPLY_TYPE_ERROR, EINVAL));
}

#[tokio::test]
async fn meta_context_for_another_export_is_not_kept() {
    let mut c = spawn(Arc::new(exports()));
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.send_opt(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.ty, REP_ACK);
    c.send_opt(OPT_SET_META_CONTEXT, &meta_data("ro", &["base:allocation"])).await;
    assert_eq!(c.opt_replies().await.len(), 2);
    c.connect_after_greeting("disk").await;
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[]).await;
    let ch = c.chunk().await;
    assert_eq!((ch.ty, be32(&ch.payload)), (REPLY_TYPE_ERROR, EINVAL));
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let mut c = spawn(Arc::new(exports()));
    let (_, flags) = c.connect("ro", false).await;
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FUA), 0);
    c.request(0, CMD_WRITE, 1, 0, 512, &[1; 512]).await;
    assert_eq!(c.simple().await, (EPERM, 1));
    c.request(0, CMD_TRIM, 2, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (EPERM, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (EPERM, 3));
    c.request(0, CMD_READ, 4, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (0, 4));
}

/// Fails each operation with a fixed error, counts `close` calls, or panics on reads.
struct Failing {
    error: Option<BackendError>,
    closed: Arc<AtomicUsize>,
}

#[async_trait]
impl BlockBackend for Failing {
    fn size(&self) -> u64 {
        DISK_SIZE
    }
    async fn read(&self, _: u64, len: u32) -> Result<Bytes, BackendError> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => panic!("read of {len} bytes"),
        }
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), BackendError> {
        self.error.clone().map_or(Ok(()), Err)
    }
    async fn flush(&self) -> Result<(), BackendError> {
        self.error.clone().map_or(Ok(()), Err)
    }
    async fn trim(&self, _: u64, _: u32) -> Result<(), BackendError> {
        self.error.clone().map_or(Ok(()), Err)
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> Result<(), BackendError> {
        self.error.clone().map_or(Ok(()), Err)
    }
    async fn close(&self) -> Result<(), BackendError> {
        self.closed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn backend_errors_map_to_nbd_errors() {
    let cases = [
        (BackendError::Fenced("epoch 3 < 4".into()), EPERM),
        (BackendError::ReadOnly, EPERM),
        (BackendError::NoSpace, ENOSPC),
        (BackendError::Io("disk on fire".into()), EIO),
        (BackendError::InvalidArgument("unaligned".into()), EINVAL),
    ];
    for (err, errno) in cases {
        let closed = Arc::new(AtomicUsize::new(0));
        let b = Arc::new(Failing { error: Some(err.clone()), closed: closed.clone() });
        let mut c = spawn(Arc::new(StaticExports::new().with_export("", "", b)));
        c.connect("", true).await;
        // With structured replies every error comes as an error chunk with a message.
        for (cookie, cmd, len) in [(1, CMD_WRITE, 512), (2, CMD_READ, 512), (3, CMD_FLUSH, 0)] {
            let payload = if cmd == CMD_WRITE { vec![0u8; 512] } else { Vec::new() };
            c.request(0, cmd, cookie, 0, len, &payload).await;
            let ch = c.chunk().await;
            assert_eq!((ch.flags, ch.ty, ch.cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie));
            assert_eq!(be32(&ch.payload), errno, "{err:?}");
            let msg = String::from_utf8_lossy(&ch.payload[6..]).into_owned();
            assert_eq!(msg, err.to_string());
        }
        c.request(0, CMD_DISC, 4, 0, 0, &[]).await;
        assert!(c.expect_closed().await.is_ok());
        assert_eq!(closed.load(Ordering::SeqCst), 1, "close hook runs once at disconnect");
    }
}

#[tokio::test]
async fn backend_panic_becomes_eio_not_a_hang() {
    let closed = Arc::new(AtomicUsize::new(0));
    let b = Arc::new(Failing { error: None, closed: closed.clone() });
    let mut c = spawn(Arc::new(StaticExports::new().with_export("", "", b)));
    c.connect("", false).await;
    c.request(0, CMD_READ, 9, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (EIO, 9));
    c.request(0, CMD_WRITE, 10, 0, 512, &[0; 512]).await;
    assert_eq!(c.simple().await, (0, 10));
    drop(c.s); // hard disconnect
    tokio::time::timeout(STEP, c.server).await.expect("ends").expect("no panic").expect("clean");
    assert_eq!(closed.load(Ordering::SeqCst), 1);
}

/// Reads block until `release` fires, except at offset 0 which answers at once; counts
/// concurrent readers.
struct Gate {
    release: CancellationToken,
    waiting: AtomicUsize,
}

#[async_trait]
impl BlockBackend for Gate {
    fn size(&self) -> u64 {
        DISK_SIZE
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        if offset != 0 {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.release.cancelled().await;
        }
        Ok(Bytes::from(vec![(offset / 4096) as u8; len as usize]))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), BackendError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32) -> Result<(), BackendError> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> Result<(), BackendError> {
        Ok(())
    }
}

#[tokio::test]
async fn pipelined_requests_run_concurrently_and_reply_out_of_order() {
    let gate = Arc::new(Gate { release: CancellationToken::new(), waiting: AtomicUsize::new(0) });
    let mut c = spawn(Arc::new(StaticExports::new().with_export("", "", gate.clone())));
    c.connect("", false).await;
    for i in 1..=32u64 {
        c.request(0, CMD_READ, i, i * 4096, 4096, &[]).await;
    }
    c.request(0, CMD_READ, 100, 0, 4096, &[]).await;
    // The unblocked read overtakes the 32 blocked ones.
    assert_eq!(c.simple().await, (0, 100));
    assert_eq!(c.read_n(4096).await, vec![0u8; 4096]);
    let deadline = tokio::time::Instant::now() + STEP;
    while gate.waiting.load(Ordering::SeqCst) < 32 {
        assert!(tokio::time::Instant::now() < deadline, "only {} reads in flight", gate.waiting.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.release.cancel();
    let mut seen = Vec::new();
    for _ in 0..32 {
        let (err, cookie) = c.simple().await;
        assert_eq!(err, 0);
        assert_eq!(c.read_n(4096).await, vec![cookie as u8; 4096], "payload belongs to its cookie");
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=32).collect::<Vec<_>>());
}

#[tokio::test]
async fn in_flight_limit_applies_backpressure() {
    let gate = Arc::new(Gate { release: CancellationToken::new(), waiting: AtomicUsize::new(0) });
    let config = Config { max_in_flight: 4, ..Config::default() };
    let mut c = spawn_with(Arc::new(StaticExports::new().with_export("", "", gate.clone())), config);
    c.connect("", false).await;
    for i in 1..=10u64 {
        c.request(0, CMD_READ, i, i * 4096, 512, &[]).await;
    }
    let deadline = tokio::time::Instant::now() + STEP;
    while gate.waiting.load(Ordering::SeqCst) < 4 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gate.waiting.load(Ordering::SeqCst), 4, "no more than max_in_flight at once");
    gate.release.cancel();
    for _ in 0..10 {
        assert_eq!(c.simple().await.0, 0);
        c.read_n(512).await;
    }
}

#[tokio::test]
async fn stalled_handshake_times_out() {
    let config = Config { handshake_timeout: Duration::from_millis(200), ..Config::default() };
    let mut c = spawn_with(Arc::new(exports()), config);
    c.read_n(18).await; // greeting; then say nothing
    match c.expect_closed().await {
        Err(Error::HandshakeTimeout(_)) => {}
        other => panic!("expected timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_ends_an_idle_connection() {
    let server = NbdServer::new(Arc::new(exports()), Config::default()).expect("server");
    let (client, s) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(s);
    let token = CancellationToken::new();
    let t = token.clone();
    let task = tokio::spawn(async move { server.serve_connection(r, w, t).await });
    let mut c = Client { s: client, server: task };
    c.connect("disk", false).await;
    token.cancel();
    assert!(c.expect_closed().await.is_ok());
}

#[test]
fn config_validation_rejects_nonsense() {
    assert!(Config::default().validate().is_ok());
    assert!(Config { min_block_size: 3, ..Config::default() }.validate().is_err());
    assert!(Config { preferred_block_size: 256, ..Config::default() }.validate().is_err());
    assert!(Config { max_in_flight: 0, ..Config::default() }.validate().is_err());
    assert!(Config { max_buffered_bytes: 1024, ..Config::default() }.validate().is_err());
    let provider: Arc<dyn ExportProvider> = Arc::new(exports());
    assert!(NbdServer::new(provider, Config { max_payload: 1000, ..Config::default() }).is_err());
}

#[test]
fn extent_constructors() {
    assert!(Extent::data(1).allocated && !Extent::data(1).zero);
    assert!(!Extent::hole(1).allocated && Extent::hole(1).zero);
}
