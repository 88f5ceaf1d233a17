//! [`Outbox`]: the small frames (requests or responses) of one connection, written together.
//!
//! quinn builds and sends packets in its connection driver, a task that every stream write
//! wakes. Calls are separate tasks, and the runtime runs a task just woken right after the
//! one that woke it, so each call's write would be sent on its own, one UDP datagram and
//! one `sendmsg` per 4 KiB request, although a burst of calls to the same peer is usually
//! ready at once (an initiator's queue, a journal commit answering several writes). The
//! kernel's UDP path is per datagram on both ends, and it was the largest single cost of a
//! random write at QD32.
//!
//! So small frames go through the connection's outbox: a caller queues its request and goes
//! on to wait for the response, a served call queues its response; one writer task per
//! connection takes everything queued and writes it in a single poll, and the driver then
//! sends it all in as few packets as fit. The writer first yields when other calls on the
//! connection are in flight, which lets the other calls of this round queue theirs. A lone
//! call, and a frame too large to share packets, is written by its own task.
//!
//! Closing a connection discards the stream data quinn has not sent yet. So a response
//! written once the server is shutting down is followed until the peer acknowledges it
//! ([`acknowledged`]), and the connection is closed only after that.

use crate::frame;
use bytes::Bytes;
use quinn::{Connection, SendStream, VarInt};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How long a shutting-down server waits for the peer to acknowledge the responses it has
/// just written. A peer that has gone silent must not hold up the shutdown.
const ACKNOWLEDGE_WAIT: Duration = Duration::from_secs(2);

/// Waits until the peer has acknowledged every byte of the finished streams whose
/// `SendStream::stopped` futures are given (or stopped them, or the connection is lost);
/// at most [`ACKNOWLEDGE_WAIT`].
pub(crate) async fn acknowledged<F: Future>(stopped: impl IntoIterator<Item = F>, peer: SocketAddr) {
    let all = async {
        for s in stopped {
            let _ = s.await;
        }
    };
    if tokio::time::timeout(ACKNOWLEDGE_WAIT, all).await.is_err() {
        debug!(peer = %peer, "responses not acknowledged before the shutdown");
    }
}

/// Frames up to this many data bytes go through the outbox; larger ones fill packets on
/// their own and are written by their call's task.
pub(crate) const MAX_QUEUED_DATA: usize = 64 << 10;

struct Queued {
    send: SendStream,
    header: Bytes,
    data: Bytes,
}

/// The frames waiting to be written to one connection.
pub(crate) struct Outbox {
    queue: Mutex<Vec<Queued>>,
    ready: Notify,
    /// Calls on the connection that may still queue a frame.
    in_flight: AtomicUsize,
    /// Set when the last [`OutboxHandle`] goes: the writer exits once the queue is empty.
    finishing: AtomicBool,
}

/// What the users of an outbox hold. When the last handle is dropped, the writer writes
/// what is queued and exits, releasing its handle on the connection (which quinn closes
/// once no handle is left).
pub(crate) struct OutboxHandle(Arc<Outbox>);

impl std::ops::Deref for OutboxHandle {
    type Target = Arc<Outbox>;

    fn deref(&self) -> &Arc<Outbox> {
        &self.0
    }
}

impl Drop for OutboxHandle {
    fn drop(&mut self) {
        self.0.finishing.store(true, Ordering::Release);
        self.0.ready.notify_one();
    }
}

/// Counts a call as in flight until dropped.
pub(crate) struct InFlight(Arc<Outbox>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Outbox {
    /// An outbox for `conn`, and its writer task, which ends when the connection closes or
    /// after the handle is dropped.
    /// Once `shutdown` is cancelled, the writer waits for the peer to acknowledge the frames
    /// it writes before it ends.
    pub(crate) fn start(
        conn: Connection,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> (OutboxHandle, JoinHandle<()>) {
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Vec::new()),
            ready: Notify::new(),
            in_flight: AtomicUsize::new(0),
            finishing: AtomicBool::new(false),
        });
        let writer = tokio::spawn(write_loop(outbox.clone(), conn, peer, shutdown));
        (OutboxHandle(outbox), writer)
    }

    pub(crate) fn call_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether at most one call is in flight on the connection: a lone call writes its frame
    /// itself, sooner than a hop through the writer task would, and the writer does not
    /// wait for other calls' frames.
    pub(crate) fn alone(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) <= 1
    }

    /// Queues a frame for the writer, which finishes the stream after it. A frame still
    /// queued when the connection closes is dropped with it (a caller then sees the
    /// connection's error when it reads the response).
    pub(crate) fn push(&self, send: SendStream, header: Bytes, data: Bytes) {
        self.lock().push(Queued { send, header, data });
        self.ready.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        // A panic cannot leave the queue half-changed: push and take are single calls.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn write_loop(outbox: Arc<Outbox>, conn: Connection, peer: SocketAddr, shutdown: CancellationToken) {
    let mut unacknowledged = Vec::new();
    loop {
        tokio::select! {
            _ = conn.closed() => break,
            _ = outbox.ready.notified() => {}
        }
        if !outbox.alone() {
            tokio::task::yield_now().await;
        }
        let batch = std::mem::take(&mut *outbox.lock());
        for mut q in batch {
            // With the flow-control windows we set, a small frame is taken without waiting;
            // when a window is full every stream of the connection waits for it anyway.
            if let Err(e) = frame::write(&mut q.send, peer, q.header, q.data).await {
                debug!(peer = %peer, error = %e, "queued frame not sent");
                let _ = q.send.reset(VarInt::from_u32(crate::error::code::CANCELLED));
            } else if shutdown.is_cancelled() {
                unacknowledged.push(q.send.stopped());
            }
        }
        if outbox.finishing.load(Ordering::Acquire) && outbox.lock().is_empty() {
            break;
        }
    }
    acknowledged(unacknowledged, peer).await;
}
