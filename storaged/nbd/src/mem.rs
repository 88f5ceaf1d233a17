//! `MemBackend`: a sparse in-memory block device for tests and benchmarks. Storage is allocated
//! per 4 KiB page on first write, so a large export costs only what is written, and the
//! allocation map doubles as an exact `block_status` answer.

use std::collections::BTreeMap;
use std::sync::RwLock;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::backend::{BackendError, BlockBackend, Extent};

const PAGE: u64 = 4096;
const PAGE_USIZE: usize = PAGE as usize;

type Page = Box<[u8; PAGE_USIZE]>;

/// Sparse in-memory block device. Cheap to share between connections behind an `Arc`.
pub struct MemBackend {
    size: u64,
    read_only: bool,
    // A std lock is fine: critical sections are memcpys and never await.
    pages: RwLock<BTreeMap<u64, Page>>,
}

impl MemBackend {
    pub fn new(size: u64) -> Self {
        Self { size, read_only: false, pages: RwLock::new(BTreeMap::new()) }
    }

    /// Makes the export read-only (the server then refuses writes with `NBD_EPERM`).
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Bytes of storage currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.pages.read().map(|p| p.len() as u64 * PAGE).unwrap_or(0)
    }

    /// Writes directly, bypassing the read-only flag (to seed test data).
    pub fn fill(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.check(offset, data.len() as u64)?;
        let mut pages = self.lock_write()?;
        for_each_page(offset, data.len() as u64, |page, in_page, buf_pos, n| {
            let p = pages.entry(page).or_insert_with(zero_page);
            p[in_page..in_page + n].copy_from_slice(&data[buf_pos..buf_pos + n]);
        });
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::InvalidArgument(format!(
                "range {offset}+{len} is outside the {} byte device",
                self.size
            ))),
        }
    }

    fn lock_write(
        &self,
    ) -> Result<std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Page>>, BackendError> {
        self.pages.write().map_err(|_| BackendError::Io("memory backend lock poisoned".into()))
    }

    fn zero_range(&self, offset: u64, len: u64, deallocate: bool) -> Result<(), BackendError> {
        self.check(offset, len)?;
        let mut pages = self.lock_write()?;
        for_each_page(offset, len, |page, in_page, _, n| {
            if n == PAGE_USIZE && deallocate {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                p[in_page..in_page + n].fill(0);
            } else if !deallocate {
                // NO_HOLE: the range must end up allocated.
                pages.insert(page, zero_page());
            }
        });
        Ok(())
    }
}

fn zero_page() -> Page {
    Box::new([0u8; PAGE_USIZE])
}

/// Calls `f(page_index, offset_in_page, offset_in_range, len)` for each page piece of a range.
fn for_each_page(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let in_page = pos % PAGE;
        let n = (PAGE - in_page).min(end - pos);
        // Both values are below PAGE (4096), and the range position is below a u32 length.
        f(pos / PAGE, in_page as usize, (pos - offset) as usize, n as usize);
        pos += n;
    }
}

#[async_trait]
impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.check(offset, u64::from(len))?;
        let mut out = BytesMut::zeroed(len as usize);
        let pages =
            self.pages.read().map_err(|_| BackendError::Io("memory backend lock poisoned".into()))?;
        for_each_page(offset, u64::from(len), |page, in_page, buf_pos, n| {
            if let Some(p) = pages.get(&page) {
                out[buf_pos..buf_pos + n].copy_from_slice(&p[in_page..in_page + n]);
            }
        });
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.fill(offset, &data)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.zero_range(offset, u64::from(len), true)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.zero_range(offset, u64::from(len), may_trim)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BackendError> {
        self.check(offset, u64::from(len))?;
        let end = offset + u64::from(len);
        let pages =
            self.pages.read().map_err(|_| BackendError::Io("memory backend lock poisoned".into()))?;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |length: u64, allocated: bool| match extents.last_mut() {
            Some(last) if last.allocated == allocated => last.length += length,
            _ => extents.push(if allocated { Extent::data(length) } else { Extent::hole(length) }),
        };
        let mut pos = offset;
        for (&page, _) in pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let start = (page * PAGE).max(offset);
            if start > pos {
                push(start - pos, false);
            }
            let stop = ((page + 1) * PAGE).min(end);
            push(stop - start, true);
            pos = stop;
        }
        if pos < end {
            push(end - pos, false);
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unwritten_space_reads_as_zero_and_is_a_hole() {
        let m = MemBackend::new(1 << 20);
        assert_eq!(m.read(1000, 5000).await.expect("read"), vec![0u8; 5000]);
        assert_eq!(m.block_status(0, 1 << 20).await.expect("status"), vec![Extent::hole(1 << 20)]);
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[tokio::test]
    async fn unaligned_write_round_trips_and_allocates_touched_pages() {
        let m = MemBackend::new(1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        m.write(4000, Bytes::from(data.clone()), false).await.expect("write");
        assert_eq!(m.read(4000, 10_000).await.expect("read"), data);
        // Pages 0..=3 are touched (4000..14000).
        assert_eq!(m.allocated_bytes(), 4 * PAGE);
        let st = m.block_status(0, 32768).await.expect("status");
        assert_eq!(st, vec![Extent::data(16384), Extent::hole(16384)]);
        let st = m.block_status(100, 1000).await.expect("status");
        assert_eq!(st, vec![Extent::data(1000)]);
    }

    #[tokio::test]
    async fn trim_frees_whole_pages_and_zeroes_partial_ones() {
        let m = MemBackend::new(1 << 20);
        m.write(0, Bytes::from(vec![0xffu8; 3 * PAGE_USIZE]), false).await.expect("write");
        m.trim(100, 2 * PAGE as u32).await.expect("trim");
        let got = m.read(0, 3 * PAGE as u32).await.expect("read");
        assert!(got[..100].iter().all(|&b| b == 0xff));
        assert!(got[100..100 + 2 * PAGE_USIZE].iter().all(|&b| b == 0));
        assert!(got[100 + 2 * PAGE_USIZE..].iter().all(|&b| b == 0xff));
        assert_eq!(m.allocated_bytes(), 2 * PAGE, "page 1 was wholly trimmed");
    }

    #[tokio::test]
    async fn write_zeroes_without_trim_allocates() {
        let m = MemBackend::new(1 << 20);
        m.write_zeroes(0, 2 * PAGE as u32, false).await.expect("zero");
        assert_eq!(m.allocated_bytes(), 2 * PAGE);
        m.write_zeroes(0, 2 * PAGE as u32, true).await.expect("zero");
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[tokio::test]
    async fn out_of_range_and_read_only_are_refused() {
        let m = MemBackend::new(8192);
        assert!(matches!(m.read(8000, 500).await, Err(BackendError::InvalidArgument(_))));
        let ro = MemBackend::new(8192).into_read_only();
        assert_eq!(ro.write(0, Bytes::from_static(b"x"), false).await, Err(BackendError::ReadOnly));
    }
}
