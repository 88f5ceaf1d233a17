//! The transmission phase of one connection: a reader loop that parses requests and spawns one
//! task per request (so a deep client queue keeps the backend busy), and a single writer task
//! that serialises replies, in completion order, onto the socket. Memory is bounded by a cap on
//! requests in flight and a byte budget covering write payloads and read results until their
//! reply has been written.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::backend::{BackendError, BlockBackend, Extent};
use crate::handshake::Session;
use crate::proto::{self, Request};
use crate::{Config, Error, Result};

/// Unit of the byte budget semaphore.
const BUDGET_UNIT: u64 = 4096;
/// At most this many descriptors in one block status chunk (the spec's recommended cap).
const MAX_DESCRIPTORS: usize = 1 << 20;

/// What a request handler tells the writer.
struct Reply {
    header: Bytes,
    payload: Bytes,
    /// Held until the reply is on its way, so queued replies count against the limits.
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    /// No other request was in flight when this one completed: no other reply can join it
    /// in one write, so it goes out without waiting for the other ready tasks.
    alone: bool,
}

/// Per-connection context shared by request tasks.
struct Ctx {
    backend: Arc<dyn BlockBackend>,
    size: u64,
    read_only: bool,
    structured: bool,
    base_allocation: bool,
    max_payload: u32,
}

/// Successful result of a request, before encoding.
enum Done {
    Empty,
    Read(Bytes),
    BlockStatus(Vec<(u32, u32)>),
}

/// A failed request: NBD error value and a message for structured error chunks and logs.
struct Failure {
    errno: u32,
    message: String,
}

impl Failure {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        Self { errno, message: message.into() }
    }
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Self { errno: e.errno(), message: e.to_string() }
    }
}

/// Serves requests until the client disconnects, sends garbage, or `shutdown` fires; then waits
/// for in-flight requests, flushes their replies and closes the backend handle.
pub(crate) async fn run<R, W>(
    reader: R,
    writer: W,
    session: Session,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(Ctx {
        size: session.backend.size(),
        read_only: session.backend.read_only(),
        backend: session.backend,
        structured: session.structured,
        base_allocation: session.base_allocation,
        max_payload: config.max_payload,
    });
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_failed = CancellationToken::new();
    let writer_task =
        tokio::spawn(write_replies(writer, rx, writer_failed.clone()).in_current_span());
    let tracker = TaskTracker::new();

    let result = read_requests(reader, &ctx, config, &tx, &tracker, shutdown, &writer_failed).await;

    // Let every accepted request finish and its reply go out before closing.
    tracker.close();
    tracker.wait().await;
    drop(tx);
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "writing replies failed"),
        Err(e) => error!(error = %e, "reply writer task failed"),
    }
    if let Err(e) = ctx.backend.close().await {
        warn!(error = %e, "closing export failed");
    }
    result
}

async fn read_requests<R>(
    reader: R,
    ctx: &Arc<Ctx>,
    config: &Config,
    tx: &mpsc::UnboundedSender<Reply>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    writer_failed: &CancellationToken,
) -> Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
    let budget_units = config.max_buffered_bytes.div_ceil(BUDGET_UNIT).clamp(1, u64::from(u32::MAX >> 4));
    // budget_units is clamped well below u32::MAX, and Semaphore::MAX_PERMITS is usize::MAX >> 3.
    let budget = Arc::new(Semaphore::new(budget_units as usize));
    let units = |len: u32| -> u32 {
        (u64::from(len).div_ceil(BUDGET_UNIT).max(1).min(budget_units)) as u32
    };

    loop {
        let mut h = [0u8; proto::REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                info!("server shutting down, closing connection after in-flight requests");
                return Ok(());
            }
            _ = writer_failed.cancelled() => {
                return Err(Error::Io(std::io::Error::other("reply writer failed")));
            }
            r = reader.read_exact(&mut h) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    debug!("client closed the connection without NBD_CMD_DISC");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        }
        let req = match Request::decode(&h) {
            Ok(r) => r,
            // Without a valid header we cannot find the next one: the stream is lost. The
            // connection owner logs the reason.
            Err(magic) => return Err(Error::Protocol(format!("bad request magic {magic:#x}"))),
        };
        if req.command == proto::CMD_DISC {
            debug!("client sent NBD_CMD_DISC");
            return Ok(());
        }

        let permit = Arc::clone(&in_flight)
            .acquire_owned()
            .await
            .map_err(|_| Error::Io(std::io::Error::other("request limiter closed")))?;

        let mut payload = None;
        let mut bytes_permit = None;
        if req.command == proto::CMD_WRITE {
            if req.length > ctx.max_payload {
                // Skip the payload so the stream stays in sync, then fail just this request.
                let mut skipped = (&mut reader).take(u64::from(req.length));
                let mut sink = tokio::io::sink();
                let n = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    n = tokio::io::copy(&mut skipped, &mut sink) => n?,
                };
                if n != u64::from(req.length) {
                    debug!("client closed the connection inside a write payload");
                    return Ok(());
                }
            } else {
                bytes_permit = Some(acquire(&budget, units(req.length)).await?);
                // Page-aligned and pooled: the data can go to an O_DIRECT replica file as it is.
                let mut buf = basalt_iobuf::AlignedBuf::filled_later(req.length as usize);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = reader.read_exact(buf.as_mut()) => match r {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            debug!("client closed the connection inside a write payload");
                            return Ok(());
                        }
                        Err(e) => return Err(e.into()),
                    },
                }
                payload = Some(buf.into_bytes());
            }
        } else if req.command == proto::CMD_READ && req.length <= ctx.max_payload {
            bytes_permit = Some(acquire(&budget, units(req.length)).await?);
        }

        let ctx = Arc::clone(ctx);
        let tx = tx.clone();
        let in_flight = Arc::clone(&in_flight);
        let max_in_flight = config.max_in_flight;
        tracker.spawn(
            async move {
                let (header, body) = respond(&ctx, req, payload).await;
                // Our own permit is still held: all others free means nobody else is in flight.
                let alone = in_flight.available_permits() + 1 >= max_in_flight;
                // A send error means the writer is gone (socket dead): nothing to tell anyone.
                let _ = tx.send(Reply { header, payload: body, _permits: (permit, bytes_permit), alone });
            }
            .in_current_span(),
        );
    }
}

async fn acquire(sem: &Arc<Semaphore>, n: u32) -> Result<OwnedSemaphorePermit> {
    Arc::clone(sem)
        .acquire_many_owned(n)
        .await
        .map_err(|_| Error::Io(std::io::Error::other("byte budget closed")))
}

/// Runs one request and encodes its reply (header, payload).
async fn respond(ctx: &Ctx, req: Request, payload: Option<Bytes>) -> (Bytes, Bytes) {
    let outcome = match validate(ctx, &req) {
        Err(f) => {
            debug!(command = proto::command_name(req.command), offset = req.offset, length = req.length, error = %f.message, "request refused");
            Err(f)
        }
        Ok(()) => {
            // A panicking backend must not leave the client waiting forever for this cookie.
            match AssertUnwindSafe(execute(ctx, &req, payload)).catch_unwind().await {
                Ok(Ok(done)) => Ok(done),
                Ok(Err(f)) => {
                    warn!(command = proto::command_name(req.command), offset = req.offset, length = req.length, errno = f.errno, error = %f.message, "backend request failed");
                    Err(f)
                }
                Err(_) => {
                    error!(command = proto::command_name(req.command), offset = req.offset, length = req.length, "backend panicked");
                    Err(Failure::new(proto::EIO, "internal server error"))
                }
            }
        }
    };
    encode(ctx, &req, outcome)
}

fn range_end(req: &Request) -> Option<u64> {
    req.offset.checked_add(u64::from(req.length))
}

/// Checks a request against the export and the negotiated limits before it reaches the backend.
fn validate(ctx: &Ctx, req: &Request) -> std::result::Result<(), Failure> {
    let in_bounds = range_end(req).is_some_and(|end| end <= ctx.size);
    let past_end = || {
        format!("range {}+{} is past the end of the {} byte export", req.offset, req.length, ctx.size)
    };
    let writes = matches!(req.command, proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES);
    if writes && ctx.read_only {
        return Err(Failure::new(proto::EPERM, "export is read-only"));
    }
    match req.command {
        proto::CMD_FLUSH => return Ok(()),
        proto::CMD_READ
        | proto::CMD_WRITE
        | proto::CMD_TRIM
        | proto::CMD_WRITE_ZEROES
        | proto::CMD_CACHE
        | proto::CMD_BLOCK_STATUS => {}
        other => return Err(Failure::new(proto::EINVAL, format!("unknown command {other}"))),
    }
    if req.command == proto::CMD_BLOCK_STATUS && !ctx.base_allocation {
        return Err(Failure::new(proto::EINVAL, "no metadata context was negotiated"));
    }
    if req.length == 0 {
        return Err(Failure::new(proto::EINVAL, "zero-length request"));
    }
    // Only commands that carry data are limited by the maximum payload; TRIM and friends may
    // legitimately cover more (qemu sends discards of up to 2 GiB).
    if matches!(req.command, proto::CMD_READ | proto::CMD_WRITE) && req.length > ctx.max_payload {
        return Err(Failure::new(
            proto::EINVAL,
            format!("length {} exceeds the maximum payload {}", req.length, ctx.max_payload),
        ));
    }
    if !in_bounds {
        // Spec: ENOSPC for writes past the end, EINVAL for everything else.
        let errno = match req.command {
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => proto::ENOSPC,
            _ => proto::EINVAL,
        };
        return Err(Failure::new(errno, past_end()));
    }
    Ok(())
}

async fn execute(ctx: &Ctx, req: &Request, payload: Option<Bytes>) -> std::result::Result<Done, Failure> {
    let b = &ctx.backend;
    match req.command {
        proto::CMD_READ => {
            let data = b.read(req.offset, req.length).await?;
            if data.len() != req.length as usize {
                return Err(Failure::new(
                    proto::EIO,
                    format!("backend returned {} bytes for a {} byte read", data.len(), req.length),
                ));
            }
            Ok(Done::Read(data))
        }
        proto::CMD_WRITE => {
            let data = payload.ok_or_else(|| Failure::new(proto::EINVAL, "write without payload"))?;
            b.write(req.offset, data, req.flags & proto::CMD_FLAG_FUA != 0).await?;
            Ok(Done::Empty)
        }
        proto::CMD_FLUSH => {
            b.flush().await?;
            Ok(Done::Empty)
        }
        proto::CMD_TRIM => {
            b.trim(req.offset, req.length).await?;
            if req.flags & proto::CMD_FLAG_FUA != 0 {
                b.flush().await?;
            }
            Ok(Done::Empty)
        }
        proto::CMD_WRITE_ZEROES => {
            let may_trim = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
            b.write_zeroes(req.offset, req.length, may_trim).await?;
            if req.flags & proto::CMD_FLAG_FUA != 0 {
                b.flush().await?;
            }
            Ok(Done::Empty)
        }
        // Prefetching is only a hint; our backends have nothing useful to warm.
        proto::CMD_CACHE => Ok(Done::Empty),
        proto::CMD_BLOCK_STATUS => {
            let extents = b.block_status(req.offset, req.length).await?;
            Ok(Done::BlockStatus(descriptors(&extents, req.length, req.flags & proto::CMD_FLAG_REQ_ONE != 0)))
        }
        other => Err(Failure::new(proto::EINVAL, format!("unknown command {other}"))),
    }
}

/// Turns backend extents into `base:allocation` descriptors covering at most `len` bytes:
/// clipped, zero lengths dropped, equal neighbours merged. Never empty.
fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for e in extents {
        if left == 0 || out.len() >= MAX_DESCRIPTORS {
            break;
        }
        // Clipped to `left`, which is a u32.
        let n = e.length.min(u64::from(left)) as u32;
        if n == 0 {
            continue;
        }
        let flags = if e.allocated { 0 } else { proto::STATE_HOLE } | if e.zero { proto::STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += n,
            _ => out.push((n, flags)),
        }
        left -= n;
    }
    if out.is_empty() {
        // A backend that reports nothing gets the always-correct answer: allocated data.
        out.push((len, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

fn encode(ctx: &Ctx, req: &Request, outcome: std::result::Result<Done, Failure>) -> (Bytes, Bytes) {
    let cookie = req.cookie;
    match outcome {
        Err(f) if ctx.structured => (proto::structured_error(cookie, f.errno, &f.message), Bytes::new()),
        Err(f) => (proto::simple_reply(cookie, f.errno), Bytes::new()),
        Ok(Done::Empty) => (proto::simple_reply(cookie, 0), Bytes::new()),
        Ok(Done::Read(data)) if !ctx.structured => (proto::simple_reply(cookie, 0), data),
        Ok(Done::Read(data)) => {
            let mut h = BytesMut::with_capacity(32);
            // Whole-range holes are cheap to detect and save the wire (and nbdcopy) the zeroes.
            if data.iter().all(|&b| b == 0) {
                proto::structured_header(&mut h, cookie, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE, 12);
                h.put_u64(req.offset);
                h.put_u32(req.length);
                (h.freeze(), Bytes::new())
            } else {
                // data.len() == req.length ≤ max_payload, checked in execute and validate.
                proto::structured_header(&mut h, cookie, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u32);
                h.put_u64(req.offset);
                (h.freeze(), data)
            }
        }
        Ok(Done::BlockStatus(descs)) => {
            // At most MAX_DESCRIPTORS (2^20) entries of 8 bytes: fits u32.
            let len = 4 + 8 * descs.len() as u32;
            let mut h = BytesMut::with_capacity(20 + len as usize);
            proto::structured_header(&mut h, cookie, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, len);
            h.put_u32(proto::META_BASE_ALLOCATION_ID);
            for (l, f) in descs {
                h.put_u32(l);
                h.put_u32(f);
            }
            (h.freeze(), Bytes::new())
        }
    }
}

/// Sole owner of the socket's write half: replies never interleave. Flushes whenever the queue
/// runs dry (after letting the other ready tasks run), so pipelined replies share syscalls and
/// a lone reply is not delayed.
async fn write_replies<W>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    failed: CancellationToken,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, writer);
    let result = async {
        while let Some(reply) = rx.recv().await {
            w.write_all(&reply.header).await?;
            if !reply.payload.is_empty() {
                w.write_all(&reply.payload).await?;
            }
            let alone = reply.alone;
            drop(reply);
            if rx.is_empty() && alone {
                w.flush().await?;
            } else if rx.is_empty() {
                // Requests completing together (one batch of disk completions) each wake this
                // task first (tokio runs the task a task wakes next), so without this yield
                // every reply went out in its own system call. Once the other ready tasks have
                // run, their replies are queued and share one write.
                tokio::task::yield_now().await;
                if rx.is_empty() {
                    w.flush().await?;
                }
            }
        }
        w.flush().await?;
        w.shutdown().await
    }
    .await;
    if result.is_err() {
        failed.cancel();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_clip_merge_and_never_come_back_empty() {
        let ext = [Extent::data(100), Extent::data(50), Extent::hole(0), Extent::hole(1000)];
        assert_eq!(descriptors(&ext, 400, false), vec![(150, 0), (250, proto::STATE_HOLE | proto::STATE_ZERO)]);
        assert_eq!(descriptors(&ext, 400, true), vec![(150, 0)]);
        assert_eq!(descriptors(&[], 512, false), vec![(512, 0)]);
        assert_eq!(descriptors(&[Extent::data(1 << 40)], 4096, false), vec![(4096, 0)]);
    }
}
