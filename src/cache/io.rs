//! The cache I/O seam: how the engine reads, writes and punches the data
//! file on behalf of a request.
//!
//! A request's cache I/O runs wherever its frontend runs it, so the
//! frontend chooses the implementation and hands it to
//! [`crate::engine::Engine::submit`]:
//! * [`SyncIo`] does the syscall inside the future's first poll: a warm
//!   request completes on the caller's thread without any runtime (the FUSE
//!   session thread; tests);
//! * [`NowaitReadIo`] is [`SyncIo`] for a caller on an async runtime's
//!   worker (NBD's connection task): a read the page cache holds completes
//!   in the first poll, one that would wait for the disk stays pending so
//!   the caller can finish it off the worker;
//! * the ublk frontend's ring implementation (`frontend/ublk/ring_io.rs`)
//!   submits the same operations to its queue's own io_uring, so a queue
//!   thread never blocks in a syscall and other tags run meanwhile. It lives
//!   beside the queue because the ring is the queue's.
//!
//! Fills by the fetcher do not go through this seam: they run on a blocking
//! thread that already holds the decrypted chunk, where a plain `pwrite` is
//! the cheapest thing to do.
//!
//! Every operation is whole or fails: a short read or write is retried
//! until done, and end of file where the image should be is an error.
//!
//! # Registered buffers
//! A frontend may hand the engine a request buffer it cannot touch itself:
//! ublk's zero-copy mode registers the request's own pages in the queue's
//! io_uring, reachable only by that ring's fixed-buffer operations. The
//! engine names such a buffer by a [`FixedBuf`] and moves its bytes with
//! [`CacheIo::read_fixed`], [`CacheIo::write_fixed`] and
//! [`CacheIo::zero_fixed`]. An implementation without registered buffers
//! (as [`SyncIo`]) keeps their defaults, which fail with
//! [`io::ErrorKind::Unsupported`]: a frontend that never hands out a
//! [`FixedBuf`] never meets them.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;

/// A range of a registered buffer: `len` bytes at `at` in buffer `index`
/// of the frontend's buffer table. Only [`CacheIo`] can reach its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedBuf {
    pub index: u16,
    pub at: usize,
    pub len: usize,
}

impl FixedBuf {
    /// The `len` bytes at `at` within this range.
    ///
    /// # Panics
    /// If they are not within it: the engine's pieces always are.
    pub fn range(self, at: usize, len: usize) -> FixedBuf {
        assert!(
            at + len <= self.len,
            "{len} bytes at {at} of a {}-byte buffer",
            self.len
        );
        FixedBuf {
            index: self.index,
            at: self.at + at,
            len,
        }
    }
}

fn no_fixed_buffers() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this cache I/O has no registered buffers",
    )
}

/// Reads, writes and hole punches on the cache's data file.
///
/// The futures are not required to be `Send`: an implementation bound to
/// one thread's ring is fine, as long as the caller polls the request there.
pub trait CacheIo {
    /// Fills `buf` from `file` at `offset`.
    fn read_at(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>>;
    /// Writes all of `data` to `file` at `offset`.
    fn write_at(
        &self,
        file: &File,
        data: &[u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>>;
    /// Deallocates `len` bytes at `offset`, keeping the file's size: the
    /// range reads as zeros afterwards.
    fn punch_hole(
        &self,
        file: &File,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>>;
    /// Fills the registered range `dst` from `file` at `offset`.
    fn read_fixed(
        &self,
        file: &File,
        dst: FixedBuf,
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let _ = (file, dst, offset);
        std::future::ready(Err(no_fixed_buffers()))
    }
    /// Writes all of the registered range `src` to `file` at `offset`.
    fn write_fixed(
        &self,
        file: &File,
        src: FixedBuf,
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let _ = (file, src, offset);
        std::future::ready(Err(no_fixed_buffers()))
    }
    /// Fills the registered range `dst` with zeros.
    fn zero_fixed(&self, dst: FixedBuf) -> impl Future<Output = io::Result<()>> {
        let _ = dst;
        std::future::ready(Err(no_fixed_buffers()))
    }
}

/// Cache I/O by plain syscalls, done in the future's first poll.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncIo;

impl CacheIo for SyncIo {
    fn read_at(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        std::future::ready(file.read_exact_at(buf, offset))
    }

    fn write_at(
        &self,
        file: &File,
        data: &[u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        std::future::ready(file.write_all_at(data, offset))
    }

    fn punch_hole(
        &self,
        file: &File,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> {
        std::future::ready(punch_hole(file, offset, len))
    }
}

/// [`SyncIo`], except that a read's first poll only takes what the page
/// cache holds (`preadv2` with `RWF_NOWAIT`): a read that would wait for
/// the disk is pending once (waking itself at once) and does the plain
/// read when polled again, by then where blocking is allowed. Writes and
/// punches are [`SyncIo`]'s: callers run those off the worker anyway. A
/// filesystem that offers no non-blocking reads (tmpfs, which never waits
/// for a disk) gets the plain read in the first poll, as with [`SyncIo`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NowaitReadIo;

impl CacheIo for NowaitReadIo {
    fn read_at(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let mut may_block = false;
        std::future::poll_fn(move |cx| {
            if !may_block {
                if let Some(done) = read_from_page_cache(file, buf, offset) {
                    return std::task::Poll::Ready(done);
                }
                may_block = true;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            std::task::Poll::Ready(file.read_exact_at(buf, offset))
        })
    }

    fn write_at(
        &self,
        file: &File,
        data: &[u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        SyncIo.write_at(file, data, offset)
    }

    fn punch_hole(
        &self,
        file: &File,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> {
        SyncIo.punch_hole(file, offset, len)
    }
}

/// The whole read done without waiting for a disk, or `None` if it would
/// have to wait (a page not cached: nothing read, or a short read).
fn read_from_page_cache(file: &File, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
    use rustix::io::{preadv2, Errno, ReadWriteFlags};
    let len = buf.len();
    match preadv2(
        file,
        &mut [io::IoSliceMut::new(buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(read) if read == len => Some(Ok(())),
        Ok(_) | Err(Errno::AGAIN) => None,
        Err(Errno::OPNOTSUPP) => Some(file.read_exact_at(buf, offset)),
        Err(e) => Some(Err(e.into())),
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the filesystem frees whole blocks
/// and zeroes the partial ones at either end.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    rustix::fs::fallocate(
        file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn nowait_reads_complete_at_once_from_the_page_cache_and_wait_only_for_the_disk() {
        use std::task::{Context, Poll};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mut back = vec![0; data.len()];
        NowaitReadIo
            .read_at(&file, &mut back, 0)
            .now_or_never()
            .expect("cached pages are read in the first poll")
            .unwrap();
        assert!(back == data);

        // Written back and dropped: the bytes are on the disk only. A drop
        // can miss pages the kernel still holds in a per-CPU batch, so it is
        // tried a few times: a read that is on the disk must never finish
        // in the first poll, and one attempt must find them gone.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .sync_all()
            .unwrap();
        let on_disk_only = rustix::fs::fstatfs(&file).unwrap().f_type == 0xEF53; // ext4
        let mut waited = false;
        for _ in 0..5 {
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
            back.fill(0);
            {
                let mut read = std::pin::pin!(NowaitReadIo.read_at(&file, &mut back, 0));
                let mut cx = Context::from_waker(futures::task::noop_waker_ref());
                match read.as_mut().poll(&mut cx) {
                    Poll::Ready(done) => done.unwrap(),
                    Poll::Pending => {
                        waited = true;
                        match read.as_mut().poll(&mut cx) {
                            Poll::Ready(done) => done.unwrap(),
                            Poll::Pending => panic!("the second poll must read, blocking"),
                        }
                    }
                }
            }
            assert!(back == data);
            if waited || !on_disk_only {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            waited || !on_disk_only,
            "a read from the disk was done in the first poll"
        );
        assert!(back == data);
        let past_end = NowaitReadIo.read_at(&file, &mut back, 1).now_or_never();
        assert!(matches!(past_end, Some(Err(_)) | None));
    }

    #[test]
    fn sync_io_completes_in_the_first_poll_and_punched_ranges_read_as_zeros() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 << 10).unwrap();
        let data = vec![0xAB; 64 << 10];
        SyncIo
            .write_at(&file, &data, 0)
            .now_or_never()
            .unwrap()
            .unwrap();
        SyncIo
            .punch_hole(&file, 4096, 8192)
            .now_or_never()
            .unwrap()
            .unwrap();
        let mut back = vec![0; 64 << 10];
        SyncIo
            .read_at(&file, &mut back, 0)
            .now_or_never()
            .unwrap()
            .unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xAB));
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert!(back[12288..].iter().all(|&b| b == 0xAB));
        let past_end = SyncIo.read_at(&file, &mut back, 1).now_or_never().unwrap();
        assert!(
            past_end.is_err(),
            "a read past the end must fail, not be short"
        );
    }

    #[test]
    fn sync_io_refuses_registered_buffers() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let fixed = FixedBuf {
            index: 0,
            at: 0,
            len: 4096,
        };
        let kinds = [
            SyncIo.read_fixed(&file, fixed, 0).now_or_never().unwrap(),
            SyncIo.write_fixed(&file, fixed, 0).now_or_never().unwrap(),
            SyncIo.zero_fixed(fixed).now_or_never().unwrap(),
        ]
        .map(|r| r.unwrap_err().kind());
        assert_eq!(kinds, [io::ErrorKind::Unsupported; 3]);
    }

    #[test]
    fn fixed_ranges_nest_and_stay_inside() {
        let whole = FixedBuf {
            index: 3,
            at: 0,
            len: 8192,
        };
        let inner = whole.range(4096, 4096).range(512, 1024);
        assert_eq!(
            inner,
            FixedBuf {
                index: 3,
                at: 4608,
                len: 1024
            }
        );
        assert!(std::panic::catch_unwind(|| whole.range(4096, 4097)).is_err());
    }
}
