//! Serialises overlapping writes of one volume.
//!
//! Replicas apply writes in the order they arrive; two overlapping writes in flight at once
//! could reach two replicas in opposite orders and leave them different. NBD lets a client
//! have overlapping writes in flight, so the volume holds a block-aligned range lock for the
//! duration of each write. Non-overlapping writes (the common case) never wait.

use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>, // (start, end, ticket)
    released: Notify,
    next: std::sync::atomic::AtomicU64,
}

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl RangeLock {
    /// Wait until no held range overlaps `[start, end)`, then hold it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let ticket = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register interest before checking, so a release in between is not missed.
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                if !held.iter().any(|&(s, e, _)| s < end && start < e) {
                    held.push((start, end, ticket));
                    return RangeGuard { lock: self, ticket };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|&(_, _, t)| t != self.ticket);
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(0, 4096).await;
        // Disjoint: immediate.
        let g2 = tokio::time::timeout(Duration::from_millis(100), lock.lock(4096, 8192)).await;
        assert!(g2.is_ok());
        drop(g2);
        // Overlapping: waits until the first is released.
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(100, 200).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("released").expect("join");
    }
}
