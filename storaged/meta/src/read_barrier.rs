//! Linearizable reads that share their leadership checks.
//!
//! A linearizable read on the leader must first confirm that it is still the leader (a
//! heartbeat round acknowledged by a quorum, openraft's `ensure_linearizable`) and that
//! its state machine has applied everything committed when the read arrived. One round per
//! read costs a round trip to every follower per read; under load the leader then spends
//! its time on heartbeats. Here reads queue for the next round instead: a round started
//! after a read arrived proves leadership at a moment after the read arrived, which is all
//! that read needs (etcd batches its ReadIndex requests the same way), so one round serves
//! every read that arrived before it began, and at most one round is in flight.

use basalt_types::RemoteError;
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// One leadership check (with the wait for the state machine to catch up).
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), RemoteError>> + Send + Sync>;

pub struct ReadBarrier {
    check: Check,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// A round is in flight (its driver task runs).
    running: bool,
    /// Reads waiting for a round that has not started yet.
    queued: Vec<oneshot::Sender<Result<(), RemoteError>>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // The state is two plain fields changed together; a panic cannot leave it half-changed.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ReadBarrier {
    pub fn new(check: Check) -> Self {
        ReadBarrier { check, state: Arc::new(Mutex::new(State::default())) }
    }

    /// Returns once a leadership check that began after this call has succeeded (or with
    /// that check's error).
    pub async fn wait(&self) -> Result<(), RemoteError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = lock(&self.state);
            s.queued.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            // A task of its own, so a read that is given up (its request dropped) never
            // strands the others queued behind it.
            tokio::spawn(drive(Arc::clone(&self.check), Arc::clone(&self.state)));
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(RemoteError::new(basalt_types::ErrorCode::Unavailable, "metadata read check stopped; retry")),
        }
    }
}

/// Runs rounds while reads are queued: each round serves the reads queued before it began.
async fn drive(check: Check, state: Arc<Mutex<State>>) {
    loop {
        let batch = {
            let mut s = lock(&state);
            if s.queued.is_empty() {
                s.running = false;
                return;
            }
            std::mem::take(&mut s.queued)
        };
        let result = check().await;
        for tx in batch {
            let _ = tx.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A check that counts its rounds and takes `delay`.
    fn counting(delay: Duration) -> (Check, Arc<AtomicUsize>) {
        let rounds = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&rounds);
        let check: Check = Arc::new(move || {
            let r = Arc::clone(&r);
            Box::pin(async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Ok(())
            })
        });
        (check, rounds)
    }

    #[tokio::test]
    async fn concurrent_reads_share_rounds() {
        let (check, rounds) = counting(Duration::from_millis(20));
        let barrier = Arc::new(ReadBarrier::new(check));
        let reads: Vec<_> = (0..200)
            .map(|_| {
                let b = Arc::clone(&barrier);
                tokio::spawn(async move { b.wait().await })
            })
            .collect();
        for r in reads {
            r.await.expect("read task").expect("read");
        }
        // The first read's round, then one round for everything queued behind it.
        let n = rounds.load(Ordering::SeqCst);
        assert!((1..=3).contains(&n), "{n} rounds for 200 concurrent reads");
        // Alone, every read still gets a round of its own.
        barrier.wait().await.expect("read");
        barrier.wait().await.expect("read");
        assert_eq!(rounds.load(Ordering::SeqCst), n + 2);
    }

    /// A read that arrives while a round is in flight is not served by that round.
    #[tokio::test]
    async fn a_read_waits_for_a_round_that_began_after_it() {
        let started = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (s, rel) = (Arc::clone(&started), Arc::clone(&release));
        let check: Check = Arc::new(move || {
            let (s, rel) = (Arc::clone(&s), Arc::clone(&rel));
            Box::pin(async move {
                s.fetch_add(1, Ordering::SeqCst);
                rel.acquire().await.expect("semaphore").forget();
                Ok(())
            })
        });
        let barrier = Arc::new(ReadBarrier::new(check));
        let b = Arc::clone(&barrier);
        let first = tokio::spawn(async move { b.wait().await });
        while started.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        let b = Arc::clone(&barrier);
        let second = tokio::spawn(async move { b.wait().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.add_permits(1); // round 1 ends
        first.await.expect("task").expect("first read");
        while started.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished(), "the second read was served by a round that began before it");
        release.add_permits(1);
        second.await.expect("task").expect("second read");
    }

    #[tokio::test]
    async fn a_failed_round_fails_its_reads_only() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = Arc::clone(&fail);
        let check: Check = Arc::new(move || {
            let f = Arc::clone(&f);
            Box::pin(async move {
                if f.load(Ordering::SeqCst) {
                    Err(RemoteError::new(basalt_types::ErrorCode::Unavailable, "not leader"))
                } else {
                    Ok(())
                }
            })
        });
        let barrier = ReadBarrier::new(check);
        assert!(barrier.wait().await.is_err());
        fail.store(false, Ordering::SeqCst);
        barrier.wait().await.expect("the next round succeeds");
    }
}
