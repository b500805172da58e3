//! The io_uring implementation of the cache I/O seam: reads, writes and
//! hole punches of the cache's data file, submitted to the ring of the
//! ublk queue whose thread polls the request.
//!
//! The queue thread then never blocks in a syscall: while the kernel reads
//! the cache file, other tags' commands complete on the same ring.
//!
//! In zero-copy mode a request's pages are registered in this ring's buffer
//! table (see `queue.rs`), and [`FixedBuf`]s name them: `ReadFixed` and
//! `WriteFixed` move bytes between the cache file and those pages, one copy
//! as in the loop driver. The address such an op carries is an offset into
//! the registered buffer, since a buffer the driver registered from kernel
//! pages has no user address. Zeros come from reading a source of zeros
//! into the pages (`/dev/zero`, opened by the queue).

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;

use crate::cache::io::{CacheIo, FixedBuf};

/// Cache I/O on the current ublk queue thread's ring. Only a future polled
/// on a queue thread (inside libublk's event loop) may use it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RingIo<'a> {
    /// Where zeros for registered buffers come from; `None` outside
    /// zero-copy mode, where no registered buffer reaches us.
    pub zeros: Option<&'a File>,
}

/// Longest single transfer asked of the ring; longer ones loop.
const MAX_TRANSFER: usize = 1 << 30;

/// Submits `sqe` and waits for its completion on the queue's ring: the
/// result as the kernel gave it (bytes done, or a negative errno).
async fn submit(sqe: squeue::Entry) -> io::Result<u32> {
    let result = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
        .await
        .map_err(io::Error::other)?;
    u32::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result))
}

/// Submits `sqe_at(done, len)` until `total` bytes have moved: the
/// kernel may move fewer than asked. `eof` is the error for a transfer of 0.
async fn until_done(
    total: usize,
    eof: io::ErrorKind,
    mut sqe_at: impl FnMut(usize, u32) -> squeue::Entry,
) -> io::Result<()> {
    let mut done = 0;
    while done < total {
        let len = (total - done).min(MAX_TRANSFER) as u32;
        match submit(sqe_at(done, len)).await? {
            0 => return Err(eof.into()),
            n => done += n as usize,
        }
    }
    Ok(())
}

/// Reads (`write` false) or writes `fixed` from or to `fd` at `offset`.
async fn fixed_rw(
    fd: types::Fd,
    fixed: FixedBuf,
    offset: u64,
    write: bool,
    eof: io::ErrorKind,
) -> io::Result<()> {
    until_done(fixed.len, eof, |done, len| {
        // An offset into the registered buffer, not a pointer: nothing in
        // this process's memory is read or written. The kernel checks it
        // against the registered range and fails the op (-EFAULT) outside
        // it; the pages stay registered until this tag commits, which its
        // task does only after this op completed.
        let at = std::ptr::without_provenance_mut::<u8>(fixed.at + done);
        let pos = offset + done as u64;
        if write {
            opcode::WriteFixed::new(fd, at, len, fixed.index)
                .offset(pos)
                .build()
        } else {
            opcode::ReadFixed::new(fd, at, len, fixed.index)
                .offset(pos)
                .build()
        }
    })
    .await
}

impl CacheIo for RingIo<'_> {
    fn read_at(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        let (base, total) = (buf.as_mut_ptr(), buf.len());
        // The kernel writes into `buf` until each read completes. It is part
        // of a buffer the request's caller owns and keeps until the request
        // completes: a ublk tag's buffer, which its task drops only once the
        // queue is down (and never on an error path where a command may be
        // in flight, see `queue.rs`), and which this future borrows until
        // the last completion arrives. The file stays open as long as the
        // engine, which the request borrows.
        until_done(total, io::ErrorKind::UnexpectedEof, move |done, len| {
            opcode::Read::new(fd, base.wrapping_add(done), len)
                .offset(offset + done as u64)
                .build()
        })
    }

    fn write_at(
        &self,
        file: &File,
        data: &[u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        // The kernel reads `data` until each write completes; it is
        // borrowed from the request's caller as in `read_at`.
        until_done(data.len(), io::ErrorKind::WriteZero, move |done, len| {
            opcode::Write::new(fd, data[done..].as_ptr(), len)
                .offset(offset + done as u64)
                .build()
        })
    }

    fn punch_hole(
        &self,
        file: &File,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        async move {
            if len == 0 {
                return Ok(());
            }
            let sqe = opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build();
            submit(sqe).await.map(|_| ())
        }
    }

    fn read_fixed(
        &self,
        file: &File,
        dst: FixedBuf,
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        fixed_rw(fd, dst, offset, false, io::ErrorKind::UnexpectedEof)
    }

    fn write_fixed(
        &self,
        file: &File,
        src: FixedBuf,
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        fixed_rw(fd, src, offset, true, io::ErrorKind::WriteZero)
    }

    fn zero_fixed(&self, dst: FixedBuf) -> impl Future<Output = io::Result<()>> {
        let zeros = self.zeros.map(|file| types::Fd(file.as_raw_fd()));
        async move {
            let Some(fd) = zeros else {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no source of zeros outside zero-copy mode",
                ));
            };
            fixed_rw(fd, dst, 0, false, io::ErrorKind::UnexpectedEof).await
        }
    }
}
