//! A token bucket limiting background traffic (re-replication, repair) in bytes per second.

use std::time::Duration;
use tokio::time::Instant;
use tokio::sync::Mutex;

pub struct Throttle {
    rate: u64,
    state: Mutex<(f64, Instant)>, // (available bytes, last refill)
}

impl Throttle {
    /// `rate` bytes per second; 0 means unlimited.
    pub fn new(rate: u64) -> Self {
        Self { rate, state: Mutex::new((rate as f64, Instant::now())) }
    }

    /// Wait until `bytes` may be sent. Requests larger than one second's worth borrow from
    /// the future (the bucket goes negative), so big batches are never starved.
    pub async fn take(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut st = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(st.1).as_secs_f64() * self.rate as f64;
            st.0 = (st.0 + refill).min(self.rate as f64);
            st.1 = now;
            st.0 -= bytes as f64;
            if st.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-st.0 / self.rate as f64)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttle_spreads_traffic_over_time() {
        let t = Throttle::new(1000);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.take(1000).await;
        }
        // The first second's worth is free, the next four each wait a second.
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn zero_rate_is_unlimited() {
        let t = Throttle::new(0);
        tokio::time::timeout(Duration::from_millis(100), t.take(u64::MAX)).await.expect("no wait");
    }
}
