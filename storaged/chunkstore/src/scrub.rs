//! The background scrubber: walks every replica, verifying each block, at a bounded read rate
//! so client I/O keeps its share of the disks.

use crate::error::Error;
use crate::store::ChunkStore;
use basalt_types::ChunkId;
use std::time::Duration;
use tokio::time::Instant;

/// What one pass found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Replicas verified to the end.
    pub replicas: u64,
    /// Replicas with at least one bad block.
    pub bad_replicas: u64,
    pub bad_blocks: u64,
    /// Data bytes read (unwritten regions are not read).
    pub bytes_read: u64,
    /// Replicas that could not be verified because of an I/O error.
    pub errors: u64,
}

pub struct Scrubber {
    store: ChunkStore,
}

impl Scrubber {
    pub fn new(store: ChunkStore) -> Scrubber {
        Scrubber { store }
    }

    /// Verifies every replica once, reading at most `rate_limit_bytes_per_sec` on average
    /// (0: no limit), and calls `on_bad(disk, chunk, blocks)` for each replica with bad blocks.
    /// Replicas deleted during the pass are skipped. Dropping the future stops the pass.
    pub async fn scrub_all(&self, rate_limit_bytes_per_sec: u64, on_bad: impl Fn(u32, ChunkId, Vec<u64>)) -> ScrubReport {
        let mut report = ScrubReport::default();
        let start = Instant::now();
        for (disk, chunk, _) in self.store.list() {
            let mut bad = Vec::new();
            let mut first = 0;
            let finished = loop {
                let step = match self.store.scrub_step(disk, chunk, first).await {
                    Ok(step) => step,
                    Err(Error::NotFound { .. }) => break false,
                    Err(e) => {
                        tracing::error!(disk, %chunk, error = %e, "scrub could not verify replica");
                        report.errors += 1;
                        break false;
                    }
                };
                bad.extend(step.bad);
                report.bytes_read += step.bytes_read;
                if rate_limit_bytes_per_sec > 0 {
                    // Pace against the pass's start so short bursts even out.
                    let due = Duration::from_secs_f64(report.bytes_read as f64 / rate_limit_bytes_per_sec as f64);
                    let elapsed = start.elapsed();
                    if due > elapsed {
                        tokio::time::sleep(due - elapsed).await;
                    }
                }
                match step.next {
                    Some(next) => first = next,
                    None => break true,
                }
            };
            if finished {
                report.replicas += 1;
            }
            if !bad.is_empty() {
                tracing::warn!(disk, %chunk, blocks = ?bad, "scrub found bad blocks");
                report.bad_replicas += 1;
                report.bad_blocks += bad.len() as u64;
                on_bad(disk, chunk, bad);
            }
        }
        tracing::info!(?report, elapsed = ?start.elapsed(), "scrub pass done");
        report
    }
}
