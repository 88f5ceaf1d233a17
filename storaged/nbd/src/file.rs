//! `FileBackend`: a local file (or block device) served with positional I/O on the blocking pool.
//! Flush and FUA use fdatasync; trim and zeroing punch holes where the filesystem can, and the
//! allocation map comes from `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use crate::backend::{BackendError, BlockBackend, Extent};

/// A file-backed export. The size is fixed when the backend is opened.
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Opens an existing file; its current length is the export size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file: Arc::new(file), size, read_only })
    }

    /// Creates (or truncates) a sparse file of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64) -> std::io::Result<Self> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        Ok(Self { file: Arc::new(file), size, read_only: false })
    }

    /// Runs blocking file I/O off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|e| BackendError::Io(format!("file I/O task failed: {e}")))?
    }

    fn writable(&self) -> Result<(), BackendError> {
        if self.read_only {
            Err(BackendError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

fn to_off(v: u64) -> Result<i64, BackendError> {
    i64::try_from(v).map_err(|_| BackendError::InvalidArgument(format!("offset {v} too large")))
}

fn errno_err(e: Errno) -> BackendError {
    BackendError::from(std::io::Error::from(e))
}

/// Zeroes by writing zero buffers, for filesystems without fallocate modes.
fn write_zero_buffers(file: &File, offset: u64, len: u64) -> Result<(), BackendError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = CHUNK.min(end - pos) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn punch_hole(file: &File, offset: u64, len: u64) -> Result<bool, BackendError> {
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file.as_raw_fd(), flags, to_off(offset)?, to_off(len)?) {
        Ok(()) => Ok(true),
        Err(Errno::EOPNOTSUPP) | Err(Errno::ENOSYS) => Ok(false),
        Err(e) => Err(errno_err(e)),
    }
}

#[async_trait]
impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.blocking(move |file| {
            let mut buf = BytesMut::zeroed(len as usize);
            let mut done = 0usize;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    // The file shrank under us: the rest reads as zeroes, like a hole.
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(buf.freeze())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        self.writable()?;
        self.blocking(move |file| {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.blocking(|file| Ok(file.sync_data()?)).await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        self.writable()?;
        // Trim is advisory: if the filesystem cannot punch holes, doing nothing is correct.
        self.blocking(move |file| punch_hole(file, offset, u64::from(len)).map(drop)).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> Result<(), BackendError> {
        self.writable()?;
        self.blocking(move |file| {
            let len = u64::from(len);
            if may_trim && punch_hole(file, offset, len)? {
                return Ok(());
            }
            let flags = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(file.as_raw_fd(), flags, to_off(offset)?, to_off(len)?) {
                Ok(()) => Ok(()),
                Err(Errno::EOPNOTSUPP) | Err(Errno::ENOSYS) | Err(Errno::EINVAL) => {
                    write_zero_buffers(file, offset, len)
                }
                Err(e) => Err(errno_err(e)),
            }
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, BackendError> {
        let end = offset.saturating_add(u64::from(len)).min(self.size);
        self.blocking(move |file| {
            let fd = file.as_raw_fd();
            let mut extents = Vec::new();
            let mut pos = offset;
            // lseek moves the shared file offset, which nothing else uses (all I/O is
            // positional), and returns the result atomically, so concurrent calls are safe.
            while pos < end {
                let data = match lseek(fd, to_off(pos)?, Whence::SeekData) {
                    Ok(d) => u64::try_from(d).unwrap_or(end),
                    // No data after pos: the rest of the file is a hole.
                    Err(Errno::ENXIO) => end,
                    // SEEK_DATA unsupported: report the rest as data, always correct.
                    Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
                        extents.push(Extent::data(end - pos));
                        break;
                    }
                    Err(e) => return Err(errno_err(e)),
                };
                if data > pos {
                    let hole_end = data.min(end);
                    extents.push(Extent::hole(hole_end - pos));
                    pos = hole_end;
                    continue;
                }
                let hole = match lseek(fd, to_off(pos)?, Whence::SeekHole) {
                    Ok(h) => u64::try_from(h).unwrap_or(end),
                    Err(Errno::ENXIO) => end,
                    Err(e) => return Err(errno_err(e)),
                };
                // A hole at pos right after SEEK_DATA returned pos means the file changed
                // between the calls; report one block as data to guarantee progress.
                let data_end = if hole > pos { hole.min(end) } else { (pos + 4096).min(end) };
                extents.push(Extent::data(data_end - pos));
                pos = data_end;
            }
            Ok(extents)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_round_trip_flush_and_zeroing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        let f = FileBackend::create(&path, 1 << 20).expect("create");
        assert_eq!(f.size(), 1 << 20);
        let data = Bytes::from(vec![0x5au8; 64 * 1024]);
        f.write(128 * 1024, data.clone(), true).await.expect("write");
        f.flush().await.expect("flush");
        assert_eq!(f.read(128 * 1024, 64 * 1024).await.expect("read"), data);
        f.write_zeroes(128 * 1024, 4096, false).await.expect("zero");
        f.trim(132 * 1024, 4096).await.expect("trim");
        let got = f.read(128 * 1024, 12 * 1024).await.expect("read");
        assert!(got[..8192].iter().all(|&b| b == 0));
        assert!(got[8192..].iter().all(|&b| b == 0x5a));
        let reopened = FileBackend::open(&path, true).expect("open");
        assert!(reopened.read_only());
        assert_eq!(reopened.write(0, data, false).await, Err(BackendError::ReadOnly));
    }

    #[tokio::test]
    async fn block_status_covers_the_range_and_finds_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = FileBackend::create(dir.path().join("d.img"), 4 << 20).expect("create");
        f.write(1 << 20, Bytes::from(vec![1u8; 1 << 20]), false).await.expect("write");
        let st = f.block_status(0, 4 << 20).await.expect("status");
        assert_eq!(st.iter().map(|e| e.length).sum::<u64>(), 4 << 20);
        // Whatever the filesystem's hole granularity, the written MiB must be reported as data.
        let mut pos = 0u64;
        for e in &st {
            if pos < (2 << 20) && pos + e.length > (1 << 20) {
                assert!(e.allocated, "written range reported as hole: {st:?}");
            }
            pos += e.length;
        }
    }
}
