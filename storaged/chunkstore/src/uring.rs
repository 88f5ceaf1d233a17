//! Replica data I/O through io_uring, completed on the tokio reactor.
//!
//! Why: a 4 KiB read through the blocking pool costs two extra thread wake-ups (worker →
//! blocking thread → worker) on top of the device read, which on a small machine is most of
//! the software cost of a read. Here the async task submits the read itself (one
//! `io_uring_enter`, no thread hand-off) and a driver task, woken when the ring's descriptor
//! polls readable (completions are waiting), completes it. `tokio-uring` needs its own
//! single-threaded runtime and cannot serve our multi-threaded one, so this uses the
//! low-level `io-uring` crate and does the small amount of bookkeeping itself.
//!
//! Safety rule: the kernel owns an operation's buffer from submission to completion. Each
//! operation's buffer (and the file it targets) is moved into the ring's table of pending
//! operations and only handed back when its completion arrives, whether or not the caller
//! still waits. Dropping the ring waits for every pending operation first.
#![allow(unsafe_code)]

use basalt_iobuf::AlignedBuf;
use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify, Semaphore};

/// Submission queue entries. Operations beyond this wait for a free slot (the semaphore),
/// so the completion queue (twice as large) can never overflow.
const ENTRIES: u32 = 256;

/// The `user_data` of the no-op that [`submit`] adds to a submission of two entries.
/// Never an operation's id in practice: ids count up from 0 by one per operation.
const PLUG_NOP: u64 = u64::MAX;

/// What a pending operation keeps alive until the kernel is done with it.
enum Held {
    /// A read's destination, handed back to the caller.
    Read(AlignedBuf),
    /// A write's source, and whatever must live until the write is over.
    Write(#[allow(dead_code)] Bytes, #[allow(dead_code)] Box<dyn Send + Sync>),
}

struct Pending {
    held: Held,
    /// The file the operation targets, kept open until it completes.
    _file: Arc<dyn AsRawFd + Send + Sync>,
    done: Done,
}

/// Who learns how an operation ended.
enum Done {
    /// A caller waiting for it (or that stopped waiting: the send then fails).
    Reply(oneshot::Sender<(i32, Held)>),
    /// Nobody waits ([`Uring::write_detached`]): called with the result, once.
    Call(Box<dyn FnOnce(i32) + Send>),
}

impl Done {
    fn finish(self, res: i32, held: Held) {
        match self {
            // A caller that stopped waiting drops the buffer here, after the kernel is done.
            Done::Reply(tx) => drop(tx.send((res, held))),
            Done::Call(f) => {
                f(res);
                drop(held);
            }
        }
    }
}

struct State {
    ring: IoUring,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    /// Pending operations nobody waits for ([`Uring::write_detached`]).
    detached: usize,
}

/// One ring shared by every disk of a store.
pub(crate) struct Uring {
    /// The ring's own descriptor, as the reactor watches it: it polls readable while
    /// completions wait in the queue. Declared before `state` (which holds the ring), so it
    /// is taken off the reactor before the ring closes the descriptor.
    ready: AsyncFd<BorrowedRaw>,
    state: Mutex<State>,
    slots: Semaphore,
    /// Set while the driver task runs; operations are refused (and callers fall back to the
    /// blocking pool) once it has stopped, for they would never complete.
    driving: AtomicBool,
    /// Set while some caller has queued entries and will submit them (see `submit`).
    flush_due: AtomicBool,
    /// Asks the driver task to submit what is queued (see [`Uring::write_detached`]).
    kick: Notify,
    stop: Notify,
}

/// Submits the queued entries when dropped: the submitting caller holds one across its
/// yield, so entries are submitted even if that caller's future is dropped there.
struct Flush<'a>(&'a Uring);

impl Drop for Flush<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        // Cleared under the lock before submitting: an entry pushed after this submit finds
        // the flag clear and submits it itself; one pushed before goes now.
        self.0.flush_due.store(false, Ordering::Release);
        if let Err(e) = submit(&mut st.ring) {
            // The entries stay queued and go with the next submission (`drain` also retries);
            // the completions still come. Only log: no operation is lost.
            tracing::warn!(error = %e, "io_uring submit failed; retried with the next one");
        }
        drop(st);
    }
}

/// Submits the queued entries. A submission of exactly two gets a no-op that posts no
/// completion. Why: io_uring plugs the block layer (`blk_start_plug`) only for a submission
/// of more than two entries (`io_submit_state_start`: `need_plug = max_ios > 2`, Linux 5.15
/// to 6.18 at least). Unplugged, each of two writes reaches the device by itself, one
/// doorbell each (ext4's direct I/O plugs only its own bio): `block:block_unplug` counts two
/// for a fast commit's pair (its journal commit and its data write). Plugged, the pair goes
/// in one batch with one doorbell, which on a virtual disk is one VM exit fewer.
fn submit(ring: &mut IoUring) -> io::Result<usize> {
    let mut sq = ring.submission();
    if sq.len() == 2 && sq.capacity() > 2 {
        // No completion on success (`IOSQE_CQE_SKIP_SUCCESS`). A kernel without that flag
        // fails the no-op instead, and `drain` ignores its completion (no operation has this
        // id); the completion queue has room for it: it is twice the submission queue, and
        // there is at most one no-op per two operations in flight.
        let nop = opcode::Nop::new().build().user_data(PLUG_NOP).flags(io_uring::squeue::Flags::SKIP_SUCCESS);
        // SAFETY: a no-op points at no memory; there is room (checked just above).
        let pushed = unsafe { sq.push(&nop) };
        debug_assert!(pushed.is_ok());
    }
    drop(sq);
    ring.submit()
}

/// Errors of a ring operation that say "use the blocking path instead", as opposed to an I/O
/// error of the operation itself.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unavailable {
    Stopped,
}

/// One write of [`Uring::write_two`].
pub(crate) struct WriteOp {
    pub(crate) file: Arc<dyn AsRawFd + Send + Sync>,
    pub(crate) data: Bytes,
    pub(crate) offset: u64,
    /// Dropped when the kernel is done with the write (not when the caller stops waiting).
    pub(crate) keep: Box<dyn Send + Sync>,
    /// `pwritev2` flags.
    pub(crate) flags: i32,
}

impl WriteOp {
    fn entry(self) -> Result<(io_uring::squeue::Entry, Held, Arc<dyn AsRawFd + Send + Sync>), Unavailable> {
        let len = u32::try_from(self.data.len()).map_err(|_| Unavailable::Stopped)?;
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), self.data.as_ptr(), len)
            .offset(self.offset)
            .rw_flags(self.flags)
            .build();
        Ok((entry, Held::Write(self.data, self.keep), self.file))
    }
}

impl State {
    /// Queues one operation under a new id. The caller checked there is room
    /// ([`Uring::state_with_room`]).
    fn push(&mut self, entry: io_uring::squeue::Entry, held: Held, file: Arc<dyn AsRawFd + Send + Sync>, done: Done) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let entry = entry.user_data(id);
        // SAFETY: the buffer `entry` points into and the descriptor it names are moved into
        // `pending` right below and stay there until the completion for `id` is reaped
        // (`drain`), or until `Drop` has waited for it. There is room (the caller checked,
        // under the same lock).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        debug_assert!(pushed.is_ok());
        if matches!(done, Done::Call(_)) {
            self.detached += 1;
        }
        self.pending.insert(id, Pending { held, _file: file, done });
    }
}

impl Uring {
    /// Sets up a ring and spawns its driver on the current tokio runtime.
    pub(crate) fn start() -> io::Result<Arc<Uring>> {
        let ring = IoUring::new(ENTRIES)?;
        // The reactor watches the ring itself rather than an eventfd it signals: no eventfd
        // read per wake-up (two system calls: the read and the EAGAIN that ends it).
        // SAFETY: the descriptor is the ring's, which `Uring` owns beside the `AsyncFd` and
        // drops after it (field order), so it stays open while registered.
        let ready = unsafe { AsyncFd::register_with_interest(BorrowedRaw(ring.as_raw_fd()), tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        let uring = Arc::new(Uring {
            ready,
            state: Mutex::new(State { ring, pending: HashMap::new(), next_id: 0, detached: 0 }),
            slots: Semaphore::new(ENTRIES as usize),
            driving: AtomicBool::new(true),
            flush_due: AtomicBool::new(false),
            kick: Notify::new(),
            stop: Notify::new(),
        });
        tokio::spawn(drive(uring.clone()));
        Ok(uring)
    }

    /// Asks the driver to stop; called when the store is dropped.
    pub(crate) fn stop(&self) {
        self.stop.notify_one();
    }

    /// Reads `buf.len()` bytes at `offset` of `file` into `buf`.
    pub(crate) async fn read_at(
        &self,
        file: Arc<dyn AsRawFd + Send + Sync>,
        mut buf: AlignedBuf,
        offset: u64,
    ) -> Result<(io::Result<usize>, AlignedBuf), Unavailable> {
        let len = u32::try_from(buf.len()).map_err(|_| Unavailable::Stopped)?;
        let entry = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut().as_mut_ptr(), len).offset(offset);
        let (res, held) = self.submit(entry.build(), Held::Read(buf), file).await?;
        match held {
            Held::Read(buf) => Ok((res, buf)),
            Held::Write(..) => Err(Unavailable::Stopped),
        }
    }

    /// Writes `data` at `offset` of `file`. `keep` is dropped when the write is over (not
    /// when the caller stops waiting).
    pub(crate) async fn write_at(
        &self,
        file: Arc<dyn AsRawFd + Send + Sync>,
        data: Bytes,
        offset: u64,
        keep: Box<dyn Send + Sync>,
    ) -> Result<io::Result<usize>, Unavailable> {
        self.write_at_flags(file, data, offset, keep, 0).await
    }

    /// [`write_at`](Self::write_at) with `pwritev2` flags (e.g. `RWF_DSYNC`).
    pub(crate) async fn write_at_flags(
        &self,
        file: Arc<dyn AsRawFd + Send + Sync>,
        data: Bytes,
        offset: u64,
        keep: Box<dyn Send + Sync>,
        flags: i32,
    ) -> Result<io::Result<usize>, Unavailable> {
        let (entry, held, file) = WriteOp { file, data, offset, keep, flags }.entry()?;
        Ok(self.submit(entry, held, file).await?.0)
    }

    /// Two writes (with their `pwritev2` flags, e.g. `RWF_DSYNC`: durable when it completes)
    /// handed to the kernel in one submission (one plugged batch, see [`submit`]), answered
    /// when both are over.
    pub(crate) async fn write_two(
        &self,
        a: WriteOp,
        b: WriteOp,
    ) -> Result<(io::Result<usize>, io::Result<usize>), Unavailable> {
        let (ea, eb) = (a.entry()?, b.entry()?);
        let [ra, rb] = self.queue([ea, eb]).await?;
        let (a, b) = tokio::join!(Self::outcome(ra), Self::outcome(rb));
        Ok((a?.0, b?.0))
    }

    /// Queues a write that nobody waits for: `done` is called with its result (a byte count,
    /// or a negated errno) when the kernel is done with it, from the driver task, or with
    /// `-ECANCELED` if the ring goes away without learning the result. The write is not
    /// submitted here but by the driver task, which this wakes: it runs after the tasks the
    /// caller wakes before it next yields (tokio runs the task woken last first), so a write
    /// queued on the way to an answer reaches the kernel after that answer was sent.
    pub(crate) async fn write_detached(&self, op: WriteOp, done: Box<dyn FnOnce(i32) + Send>) -> Result<(), Unavailable> {
        let (entry, held, file) = op.entry()?;
        let permit = self.slots.acquire().await.map_err(|_| Unavailable::Stopped)?;
        self.state_with_room(1)?.push(entry, held, file, Done::Call(done));
        permit.forget();
        // Whoever set the flag submits; if a caller already holds it, the entry goes with
        // theirs.
        if !self.flush_due.swap(true, Ordering::AcqRel) {
            self.kick.notify_one();
        }
        Ok(())
    }

    async fn outcome(rx: oneshot::Receiver<(i32, Held)>) -> Result<(io::Result<usize>, Held), Unavailable> {
        // The slot is given back when the completion is reaped (`drain`), whether or not we
        // are still here to receive it.
        let (res, held) = rx.await.map_err(|_| Unavailable::Stopped)?;
        let res = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
        Ok((res, held))
    }

    async fn submit(
        &self,
        entry: io_uring::squeue::Entry,
        held: Held,
        file: Arc<dyn AsRawFd + Send + Sync>,
    ) -> Result<(io::Result<usize>, Held), Unavailable> {
        let [rx] = self.queue([(entry, held, file)]).await?;
        Self::outcome(rx).await
    }

    /// Queues `N` operations together and sees them submitted; returns where each one's
    /// completion arrives.
    async fn queue<const N: usize>(
        &self,
        ops: [(io_uring::squeue::Entry, Held, Arc<dyn AsRawFd + Send + Sync>); N],
    ) -> Result<[oneshot::Receiver<(i32, Held)>; N], Unavailable> {
        let permit = self.slots.acquire_many(N as u32).await.map_err(|_| Unavailable::Stopped)?;
        let (rxs, busy) = {
            let mut st = self.state_with_room(N)?;
            let rxs = ops.map(|(entry, held, file)| {
                let (tx, rx) = oneshot::channel();
                st.push(entry, held, file, Done::Reply(tx));
                rx
            });
            // Only operations someone waits for say other tasks are at work and may queue
            // theirs right away: a detached write (the data write of a write already
            // answered, at queue depth 1) is no reason to yield.
            (rxs, st.pending.len() - st.detached > N)
        };
        permit.forget();
        // Submission is batched: each `io_uring_enter` costs a system call, and each batch
        // reaches the device with one notification (a VM exit under a hypervisor) instead of
        // one per operation. The first caller to queue an entry submits; when other
        // operations are in flight it first yields, so the tasks already runnable queue
        // theirs and go in the same call. Alone (queue depth 1) it submits at once.
        if !self.flush_due.swap(true, Ordering::AcqRel) {
            let flush = Flush(self);
            if busy {
                tokio::task::yield_now().await;
            }
            drop(flush);
        }
        Ok(rxs)
    }

    /// The state, locked, if the ring is driven and its submission queue has room for `n`
    /// more entries (it cannot lack room while the semaphore bounds the operations in
    /// flight; refused rather than risked: nothing is pushed unless all fit).
    fn state_with_room(&self, n: usize) -> Result<std::sync::MutexGuard<'_, State>, Unavailable> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !self.driving.load(Ordering::Acquire) {
            return Err(Unavailable::Stopped);
        }
        let room = {
            let sq = st.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < n {
            return Err(Unavailable::Stopped);
        }
        Ok(st)
    }

    /// Waits (blocking) for every pending operation and answers it. Needs no other task: safe
    /// on any thread, the runtime's included.
    pub(crate) fn finish_pending(&self) {
        loop {
            {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.pending.is_empty() {
                    return;
                }
                if let Err(e) = st.ring.submit_and_wait(1) {
                    if e.kind() != io::ErrorKind::Interrupted {
                        tracing::error!(error = %e, "io_uring wait failed while stopping");
                        return;
                    }
                }
            }
            self.drain();
        }
    }

    /// Reaps every completion posted so far and answers their operations.
    fn drain(&self) {
        let mut done = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let State { ring, pending, detached, .. } = &mut *st;
            for cqe in ring.completion() {
                if let Some(p) = pending.remove(&cqe.user_data()) {
                    if matches!(p.done, Done::Call(_)) {
                        *detached -= 1;
                    }
                    done.push((p, cqe.result()));
                }
            }
            // Entries left queued by a failed submit go now.
            if !ring.submission().is_empty() {
                let _ = submit(ring);
            }
        }
        self.slots.add_permits(done.len());
        for (p, res) in done {
            p.done.finish(res, p.held);
        }
    }
}

/// Waits for the ring to have completions and answers their operations until the ring is
/// stopped.
async fn drive(uring: Arc<Uring>) {
    struct Stopped<'a>(&'a Uring);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            // Also runs when the runtime drops this task: later operations use the blocking
            // pool instead of waiting for completions nobody would reap.
            let _st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
            self.0.driving.store(false, Ordering::Release);
        }
    }
    let _stopped = Stopped(&uring);
    loop {
        let readable = tokio::select! {
            r = uring.ready.readable() => r,
            _ = uring.kick.notified() => {
                drop(Flush(&uring));
                continue;
            }
            _ = uring.stop.notified() => break,
        };
        let Ok(mut guard) = readable else {
            tracing::error!("io_uring readiness failed; replica I/O falls back to the blocking pool");
            break;
        };
        // Clear before reaping: a completion posted after the reap makes the ring readable
        // again, and one posted before it is reaped now.
        guard.clear_ready();
        uring.drain();
    }
    // No operation starts any more (`driving` is false once `_stopped` is dropped, and it is
    // checked under the state lock); wait for those in flight, so none of their callers waits
    // forever for a completion nobody reaps.
    drop(_stopped);
    uring.finish_pending();
}

impl Drop for Uring {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        while !st.pending.is_empty() {
            if let Err(e) = st.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // Leaking the buffers is the only safe choice when we cannot learn that
                    // the kernel is done with them.
                    tracing::error!(error = %e, pending = st.pending.len(), "io_uring wait failed; leaking buffers");
                    for (_, p) in std::mem::take(&mut st.pending) {
                        if let Done::Call(f) = p.done {
                            f(-libc::ECANCELED);
                        }
                        std::mem::forget(p.held);
                        std::mem::forget(p._file);
                    }
                    return;
                }
            }
            let done: Vec<(u64, i32)> = st.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (id, res) in done {
                if let Some(p) = st.pending.remove(&id) {
                    p.done.finish(res, p.held);
                }
            }
        }
    }
}

/// Runs a future that must not stop half-way (it holds the journal, or a buffer the kernel
/// writes) in the caller's task, and hands what is left of it to a task of its own if the
/// caller stops waiting first. Spawning it up front would do the same, but would cost every
/// write a task and one more wake-up (the spawned task, then the caller it answers) for
/// the rare caller that goes away.
pub(crate) struct RunToEnd<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    fut: Option<Pin<Box<F>>>,
}

impl<F: Future + Send + 'static> RunToEnd<F>
where
    F::Output: Send + 'static,
{
    pub(crate) fn new(fut: F) -> Self {
        Self { fut: Some(Box::pin(fut)) }
    }
}

impl<F: Future + Send + 'static> Future for RunToEnd<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.fut.as_mut() else {
            // Only polled again after it answered: a caller's bug, not a state to recover.
            panic!("RunToEnd polled after it completed");
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(out)
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(fut);
                }
                // No runtime (it is shutting down): nothing could run the rest, as nothing
                // would run a task spawned earlier either.
                Err(_) => drop(fut),
            }
        }
    }
}

/// A raw descriptor wrapper for callers that own the file elsewhere (the ring's own
/// descriptor, tests).
pub(crate) struct BorrowedRaw(pub RawFd);

impl AsRawFd for BorrowedRaw {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_and_writes_round_trip_and_many_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        let file: Arc<dyn AsRawFd + Send + Sync> = Arc::new(f);
        let ring = match Uring::start() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("SKIPPED: io_uring is not available here ({e}); the store uses the blocking pool");
                return;
            }
        };
        let writes = (0..64u64).map(|i| {
            let ring = ring.clone();
            let file = file.clone();
            async move {
                let data = Bytes::from(vec![i as u8; 4096]);
                ring.write_at(file, data, i * 4096, Box::new(())).await.unwrap().unwrap()
            }
        });
        let written = futures_join(writes).await;
        assert!(written.iter().all(|&n| n == 4096));
        let reads = (0..64u64).map(|i| {
            let ring = ring.clone();
            let file = file.clone();
            async move {
                let (res, buf) = ring.read_at(file, AlignedBuf::filled_later(4096), i * 4096).await.unwrap();
                assert_eq!(res.unwrap(), 4096);
                assert!(buf.as_ref().iter().all(|&b| b == i as u8), "block {i}");
            }
        });
        futures_join(reads).await;
        // Reading past the end is a short read, not an error, as with pread.
        let (res, _) = ring.read_at(file.clone(), AlignedBuf::filled_later(8192), (1 << 20) - 4096).await.unwrap();
        assert_eq!(res.unwrap(), 4096);
        // A bad descriptor is the operation's error.
        let bad: Arc<dyn AsRawFd + Send + Sync> = Arc::new(BorrowedRaw(-1));
        let (res, _) = ring.read_at(bad, AlignedBuf::filled_later(4096), 0).await.unwrap();
        assert!(res.is_err());
        // A caller that stops waiting does not disturb the others.
        let abandoned = ring.read_at(file.clone(), AlignedBuf::filled_later(4096), 0);
        drop(tokio::time::timeout(std::time::Duration::from_nanos(1), abandoned).await);
        let (res, buf) = ring.read_at(file.clone(), AlignedBuf::filled_later(4096), 4096).await.unwrap();
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(buf.as_ref()[0], 1);
        assert_eq!(f_read(&path, 4096)[0], 1);
    }

    /// Callers that stop waiting at any point (before or after their completion is posted)
    /// give their slot back: afterwards more operations than there are slots still complete.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoned_operations_give_their_slots_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("f")).unwrap();
        f.set_len(1 << 20).unwrap();
        let file: Arc<dyn AsRawFd + Send + Sync> = Arc::new(f);
        let Ok(ring) = Uring::start() else { return };
        for i in 0..(4 * ENTRIES as u64) {
            let op = ring.read_at(file.clone(), AlignedBuf::filled_later(4096), (i % 256) * 4096);
            let wait = std::time::Duration::from_micros(i % 50);
            drop(tokio::time::timeout(wait, op).await);
        }
        let all = (0..(2 * ENTRIES as u64)).map(|i| {
            let (ring, file) = (ring.clone(), file.clone());
            async move { ring.read_at(file, AlignedBuf::filled_later(4096), (i % 256) * 4096).await.unwrap().0.unwrap() }
        });
        let done = tokio::time::timeout(std::time::Duration::from_secs(20), futures_join(all)).await;
        assert!(done.is_ok(), "operations hung: slots were lost");
    }

    /// Pairs of writes, many at once (a pair submitted alone gets the plug no-op): every
    /// write lands, and afterwards no slot and no pending entry is left over (the no-op holds
    /// neither, and on kernels that post its completion, that completion is ignored).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_pairs_land_and_give_every_slot_back() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let f = File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join(name)).unwrap();
            f.set_len(4 << 20).unwrap();
            Arc::new(f) as Arc<dyn AsRawFd + Send + Sync>
        };
        let (a, b) = (open("a"), open("b"));
        let Ok(ring) = Uring::start() else { return };
        let pairs = (0..(3 * ENTRIES as u64)).map(|i| {
            let (ring, a, b) = (ring.clone(), a.clone(), b.clone());
            async move {
                let op = |file, fill: u8| WriteOp {
                    file,
                    data: Bytes::from(vec![fill; 4096]),
                    offset: i * 4096,
                    keep: Box::new(()),
                    flags: 0,
                };
                let (ra, rb) = ring.write_two(op(a, i as u8), op(b, !(i as u8))).await.unwrap();
                assert_eq!((ra.unwrap(), rb.unwrap()), (4096, 4096));
            }
        });
        let done = tokio::time::timeout(std::time::Duration::from_secs(60), futures_join(pairs)).await;
        assert!(done.is_ok(), "write pairs hung");
        for i in [0u64, 7, 300, 3 * ENTRIES as u64 - 1] {
            assert_eq!(f_read(&dir.path().join("a"), i * 4096)[0], i as u8, "block {i} of a");
            assert_eq!(f_read(&dir.path().join("b"), i * 4096)[0], !(i as u8), "block {i} of b");
        }
        assert_eq!(ring.slots.available_permits(), ENTRIES as usize, "slots were lost");
        assert!(ring.state.lock().unwrap().pending.is_empty(), "operations left pending");
    }

    /// Writes nobody waits for are submitted by the driver, land, report their results once
    /// each, and are counted out of the pending table (which decides whether a submitting
    /// caller yields) whatever else runs beside them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn detached_writes_land_report_once_and_are_counted_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        let file: Arc<dyn AsRawFd + Send + Sync> = Arc::new(f);
        let Ok(ring) = Uring::start() else { return };
        let n = 3 * ENTRIES as u64;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let work = (0..n).map(|i| {
            let (ring, file, tx) = (ring.clone(), file.clone(), tx.clone());
            async move {
                let data = Bytes::from(vec![i as u8; 4096]);
                if i % 2 == 0 {
                    let op = WriteOp { file, data, offset: i * 4096, keep: Box::new(()), flags: 0 };
                    ring.write_detached(op, Box::new(move |res| { let _ = tx.send((i, res)); })).await.unwrap();
                } else {
                    assert_eq!(ring.write_at(file, data, i * 4096, Box::new(())).await.unwrap().unwrap(), 4096);
                }
            }
        });
        futures_join(work).await;
        drop(tx);
        let mut reported = Vec::new();
        let all = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(r) = rx.recv().await {
                reported.push(r);
            }
        });
        assert!(all.await.is_ok(), "detached writes never reported");
        reported.sort();
        let want: Vec<(u64, i32)> = (0..n).filter(|i| i % 2 == 0).map(|i| (i, 4096)).collect();
        assert_eq!(reported, want, "each detached write reports its result once");
        for i in [0u64, 2, 300, n - 2] {
            assert_eq!(f_read(&path, i * 4096)[0], i as u8, "block {i}");
        }
        let st = ring.state.lock().unwrap();
        assert!(st.pending.is_empty(), "operations left pending");
        assert_eq!(st.detached, 0, "detached writes not counted out");
        drop(st);
        assert_eq!(ring.slots.available_permits(), ENTRIES as usize, "slots were lost");
    }

    async fn futures_join<F: std::future::Future + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
    where
        F::Output: Send + 'static,
    {
        let handles: Vec<_> = fs.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    fn f_read(path: &std::path::Path, off: u64) -> Vec<u8> {
        let f = File::open(path).unwrap();
        let mut b = vec![0u8; 16];
        f.read_exact_at(&mut b, off).unwrap();
        b
    }

    /// The work goes on to its end when its caller stops waiting half-way, and answers in
    /// place when the caller waits.
    #[tokio::test]
    async fn run_to_end_finishes_the_work_its_caller_abandoned() {
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<&str>();
        let mut work = Box::pin(RunToEnd::new(async move {
            let _ = go_rx.await;
            let _ = done_tx.send("finished");
        }));
        // Polled once (it waits for `go`), then abandoned.
        assert!(futures_poll_once(work.as_mut()).await.is_none());
        drop(work);
        go_tx.send(()).unwrap();
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), done_rx).await;
        assert_eq!(done.expect("abandoned work never finished").unwrap(), "finished");
        assert_eq!(RunToEnd::new(async { 7 }).await, 7);
    }

    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(match Pin::new(&mut f).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }))
        .await
    }

    #[tokio::test]
    async fn a_stopped_ring_refuses_new_operations() {
        let Ok(ring) = Uring::start() else { return };
        ring.stop();
        for _ in 0..100 {
            if !ring.driving.load(Ordering::Acquire) {
                break;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let file: Arc<dyn AsRawFd + Send + Sync> = Arc::new(BorrowedRaw(-1));
        assert!(ring.read_at(file, AlignedBuf::filled_later(4096), 0).await.is_err());
    }
}
