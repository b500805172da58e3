//! The io_uring implementation of the cache I/O seam: reads, writes and
//! hole punches of the cache's data file, submitted to the ring of the
//! ublk queue whose thread polls the request.
//!
//! The queue thread then never blocks in a syscall: while the kernel reads
//! the cache file, other tags' commands complete on the same ring.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;

use crate::cache::io::CacheIo;

/// Cache I/O on the current ublk queue thread's ring. Only a future polled
/// on a queue thread (inside libublk's event loop) may use it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RingIo;

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

impl CacheIo for RingIo {
    fn read_at(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        async move {
            let mut done = 0;
            while done < buf.len() {
                let dst = &mut buf[done..];
                let len = dst.len().min(MAX_TRANSFER) as u32;
                // The kernel writes into `dst` until this read completes.
                // It is part of a buffer the request's caller owns and keeps
                // until the request completes: a ublk tag's buffer, which
                // its task drops only once the queue is down (and never on
                // an error path where a command may be in flight, see
                // `queue.rs`), and which this future borrows until the
                // completion below arrives. The file stays open as long as
                // the engine, which the request borrows.
                let sqe = opcode::Read::new(fd, dst.as_mut_ptr(), len)
                    .offset(offset + done as u64)
                    .build();
                match submit(sqe).await? {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    n => done += n as usize,
                }
            }
            Ok(())
        }
    }

    fn write_at(
        &self,
        file: &File,
        data: &[u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        async move {
            let mut done = 0;
            while done < data.len() {
                let src = &data[done..];
                let len = src.len().min(MAX_TRANSFER) as u32;
                // The kernel reads `src` until this write completes; it is
                // borrowed from the request's caller as in `read_at`.
                let sqe = opcode::Write::new(fd, src.as_ptr(), len)
                    .offset(offset + done as u64)
                    .build();
                match submit(sqe).await? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => done += n as usize,
                }
            }
            Ok(())
        }
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
}
