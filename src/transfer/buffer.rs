//! Reused, aligned chunk buffers for push.
//!
//! Two costs dominated push after the crypto, both measured on a 1 GiB image:
//! a fresh allocation per chunk cost 1.1 s of page faults (against 1.6 s of
//! crypto), and reading into a buffer 16 bytes off a cache line, as a large
//! `Vec` from malloc is, made the kernel's copy out of the page cache five
//! times slower (1.9 against 8–10 GB/s). So each chunk is read into a
//! 64-byte-aligned place in an allocation that goes back to its pool
//! when the last reference to the chunk, wherever it is, is dropped.

use std::sync::{Arc, Mutex, PoisonError};

use crate::chunk::ENVELOPE_OVERHEAD;

/// Where a chunk starts within its allocation.
const ALIGN: usize = 64;

/// Allocations big enough for one envelope at an aligned offset.
#[derive(Clone)]
pub(super) struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Bytes of each allocation: room for the largest envelope plus the
    /// alignment shift.
    size: usize,
}

impl BufferPool {
    pub(super) fn new(chunk_size: usize) -> BufferPool {
        BufferPool {
            free: Arc::default(),
            size: chunk_size + ENVELOPE_OVERHEAD + ALIGN,
        }
    }

    /// A buffer holding `len` bytes of chunk (`len` ≤ the chunk size).
    /// Its contents are left over from earlier use: the caller overwrites them.
    pub(super) fn take(&self, len: usize) -> ChunkBuffer {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let data = reused.unwrap_or_else(|| vec![0; self.size]);
        let start = (ALIGN - data.as_ptr() as usize % ALIGN) % ALIGN;
        ChunkBuffer {
            data,
            start,
            len,
            pool: self.clone(),
        }
    }
}

/// One chunk's bytes inside a pooled allocation: the plaintext as read,
/// then, once sealed, the envelope.
pub struct ChunkBuffer {
    data: Vec<u8>,
    start: usize,
    len: usize,
    pool: BufferPool,
}

impl ChunkBuffer {
    /// Keeps the first `len` bytes (no more than it holds).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The plaintext and the room after it for the tag. The buffer then
    /// holds the envelope: `plaintext ‖ tag`.
    pub(super) fn seal_parts(&mut self) -> (&mut [u8], &mut [u8; ENVELOPE_OVERHEAD]) {
        let end = self.start + self.len;
        self.len += ENVELOPE_OVERHEAD;
        let (body, rest) = self.data[self.start..].split_at_mut(end - self.start);
        let tag = rest
            .first_chunk_mut()
            .expect("the pool sizes buffers for a whole envelope");
        (body, tag)
    }
}

impl AsMut<[u8]> for ChunkBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for ChunkBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }
}

impl Drop for ChunkBuffer {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        let mut free = self
            .pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        free.push(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_come_back() {
        let pool = BufferPool::new(1000);
        let mut a = pool.take(1000);
        assert_eq!(a.as_mut().as_ptr() as usize % ALIGN, 0);
        a.as_mut().fill(7);
        let (body, tag) = a.seal_parts();
        assert_eq!(body.len(), 1000);
        tag.fill(9);
        assert_eq!(a.as_ref().len(), 1000 + ENVELOPE_OVERHEAD);
        assert_eq!(a.as_ref()[1000..], [9; ENVELOPE_OVERHEAD]);
        let ptr = a.as_ref().as_ptr();
        drop(a);
        let b = pool.take(10);
        assert_eq!(b.as_ref().as_ptr(), ptr);
        assert_eq!(b.as_ref().len(), 10);
    }
}
