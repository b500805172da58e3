//! A fake of the ublk ring's registered buffers, for engine tests: the
//! engine can reach a [`FixedBuf`]'s bytes only through the fixed-buffer
//! operations of [`CacheIo`], and, as the kernel does for a request's
//! pages, each buffer admits only its request's direction (a read's pages
//! are only filled, a write's only read).

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

use crate::cache::io::{CacheIo, FixedBuf, SyncIo};

/// Buffer index the fake registers at: not 0, so a mixed-up index is caught.
const INDEX: u16 = 5;

/// Cache I/O with one registered buffer at index [`INDEX`].
#[derive(Debug)]
pub(crate) struct RegisteredIo {
    bytes: Mutex<Vec<u8>>,
    /// Whether the buffer is a read request's (filled by the engine) or a
    /// write request's (read by it).
    for_read: bool,
}

impl RegisteredIo {
    /// A read request's buffer of `len` bytes, filled with garbage so a byte
    /// the engine forgets shows.
    pub(crate) fn for_read(len: usize) -> (RegisteredIo, FixedBuf) {
        let io = RegisteredIo {
            bytes: Mutex::new(vec![0xA5; len]),
            for_read: true,
        };
        (io, fixed(len))
    }

    /// A write request's buffer holding `data`.
    pub(crate) fn for_write(data: &[u8]) -> (RegisteredIo, FixedBuf) {
        let io = RegisteredIo {
            bytes: Mutex::new(data.to_vec()),
            for_read: false,
        };
        (io, fixed(data.len()))
    }

    /// The buffer's bytes, as the request's pages hold them now.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.bytes
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the bytes of `buf` if it names this buffer in range and
    /// in the direction `filling` (true: the engine writes into it).
    fn with(
        &self,
        buf: FixedBuf,
        filling: bool,
        f: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let in_range = buf.index == INDEX && buf.at + buf.len <= bytes.len();
        if !in_range || filling != self.for_read {
            // What the kernel answers for a bad index, range or direction.
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        f(&mut bytes[buf.at..][..buf.len])
    }
}

fn fixed(len: usize) -> FixedBuf {
    FixedBuf {
        index: INDEX,
        at: 0,
        len,
    }
}

impl CacheIo for RegisteredIo {
    fn read_at(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        SyncIo.read_at(file, buf, offset)
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

    fn read_fixed(
        &self,
        file: &File,
        dst: FixedBuf,
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        std::future::ready(self.with(dst, true, |bytes| file.read_exact_at(bytes, offset)))
    }

    fn write_fixed(
        &self,
        file: &File,
        src: FixedBuf,
        offset: u64,
    ) -> impl Future<Output = io::Result<()>> {
        std::future::ready(self.with(src, false, |bytes| file.write_all_at(bytes, offset)))
    }

    fn zero_fixed(&self, dst: FixedBuf) -> impl Future<Output = io::Result<()>> {
        std::future::ready(self.with(dst, true, |bytes| {
            bytes.fill(0);
            Ok(())
        }))
    }
}
