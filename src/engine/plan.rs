//! Reads that need no fetch, planned before they are served.
//!
//! [`Engine::try_plan_read`] says where each byte of such a read lies, so a
//! frontend with its own asynchronous file I/O (a ublk queue's io_uring) can
//! read the data file without a blocking syscall on its thread;
//! [`Engine::try_read_now`] serves the same plan with `pread`. Chunks are
//! never unmarked once present, so a plan stays valid after it is made.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::stats::add;
use super::{Engine, EngineError};

/// Where one part of a read that needs no fetch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedRange {
    /// `len` bytes of the data file ([`Engine::cache_file`]) at `offset`,
    /// which is also their offset in the image, for the request's buffer at
    /// `in_buf`.
    File {
        offset: u64,
        len: usize,
        in_buf: usize,
    },
    /// `len` zero bytes at `in_buf`: an all-zero chunk the cache does not hold.
    Zero { len: usize, in_buf: usize },
}

impl Engine {
    /// Plans a read of `len` bytes at `offset`: `None` when some chunk in
    /// range is missing (call [`Engine::read`] then), else the ranges in
    /// buffer order, adjacent file ranges merged. Counts as a request and
    /// for readahead as [`Engine::try_read_now`] does; report the bytes
    /// with [`Engine::planned_read_done`] once they are served.
    pub fn try_plan_read(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
    ) -> Option<Result<Vec<CachedRange>, EngineError>> {
        if let Err(error) = self.check_range(offset, len) {
            add(&self.counters.read_requests, 1);
            return Some(Err(error));
        }
        let mut plan: Vec<CachedRange> = Vec::new();
        for piece in self.pieces(offset, len) {
            // Present first: a zero chunk that was written to is present.
            let range = if self.cache.is_present(piece.index) {
                CachedRange::File {
                    offset: piece.offset,
                    len: piece.len,
                    in_buf: piece.in_buf,
                }
            } else if self.is_zero(piece.index) {
                CachedRange::Zero {
                    len: piece.len,
                    in_buf: piece.in_buf,
                }
            } else {
                self.note_request(offset, len, true);
                return None;
            };
            match (plan.last_mut(), range) {
                (Some(CachedRange::File { len: last, .. }), CachedRange::File { len, .. }) => {
                    *last += len
                }
                _ => plan.push(range),
            }
        }
        self.note_request(offset, len, false);
        add(&self.counters.read_requests, 1);
        add(
            &self.counters.cache_hits,
            self.pieces(offset, len).count() as u64,
        );
        Some(Ok(plan))
    }

    /// Serves `plan` into `buf` with a `pread` per file range.
    pub(super) fn serve_plan(
        &self,
        plan: &[CachedRange],
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        for range in plan {
            match *range {
                CachedRange::File {
                    offset,
                    len,
                    in_buf,
                } => self
                    .cache
                    .read_at(&mut buf[in_buf..][..len], offset)
                    .map_err(|source| EngineError::ReadCache {
                        source: Arc::new(source),
                    })?,
                CachedRange::Zero { len, in_buf } => buf[in_buf..][..len].fill(0),
            }
        }
        Ok(())
    }

    /// Counts the bytes of a planned read its caller served.
    pub fn planned_read_done(&self, len: usize) {
        add(&self.counters.read_bytes, len as u64);
    }

    /// The cache's data file, for the ranges of [`CachedRange::File`].
    pub fn cache_file(&self) -> &File {
        self.cache.data_file()
    }

    /// The error for a failed read of a [`CachedRange::File`] range.
    pub fn cache_read_failed(&self, offset: u64, len: usize, source: io::Error) -> EngineError {
        EngineError::ReadCache {
            source: Arc::new(self.cache.read_error(offset, len, source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{fixture, open_engine, CSU};
    use crate::engine::EngineOptions;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plans_serve_the_image_once_chunks_are_present() {
        let (image, fx) = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let engine = open_engine(&fx, tmp.path(), EngineOptions::default()).unwrap();
        let len = 3 * CSU / 2;
        // Cold: no plan until a read fetched the chunks.
        assert!(engine.try_plan_read(CSU as u64 / 2, len).is_none());
        engine.read(0, image.len()).await.unwrap();
        for offset in [0, 1, CSU as u64 / 2, image.len() as u64 - len as u64] {
            let plan = engine.try_plan_read(offset, len).unwrap().unwrap();
            let mut buf = vec![0xAA; len];
            engine.serve_plan(&plan, &mut buf).unwrap();
            assert!(buf == image[offset as usize..][..len], "at {offset}");
            let files = plan
                .iter()
                .filter(|r| matches!(r, CachedRange::File { .. }))
                .count();
            assert!(files <= 2, "adjacent file ranges not merged: {plan:?}");
        }
        let outside = engine.try_plan_read(image.len() as u64 - 1, 2);
        assert!(matches!(outside, Some(Err(EngineError::OutOfRange { .. }))));
    }
}
