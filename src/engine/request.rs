//! The request paths: read, write, flush.

use std::sync::Arc;

use futures::future::try_join_all;

use super::stats::add;
use super::{Engine, EngineError, Piece};

impl Engine {
    /// Serves a read at once if no byte of it needs a fetch: `None` when
    /// some chunk in range is missing (call [`Engine::read`] then), else the
    /// outcome with `buf` filled. Never awaits, so a frontend can answer
    /// cached reads on its own thread.
    ///
    /// An out-of-range request is answered at once with
    /// [`EngineError::OutOfRange`].
    ///
    /// Either way the read counts for sequential readahead, which may start
    /// fetches in the background (on the runtime earlier reads ran on, when
    /// called outside one).
    pub fn try_read_now(
        self: &Arc<Self>,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<(), EngineError>> {
        let plan = match self.try_plan_read(offset, buf.len())? {
            Ok(plan) => plan,
            Err(error) => return Some(Err(error)),
        };
        let served = self.serve_plan(&plan, buf);
        if served.is_ok() {
            self.planned_read_done(buf.len());
        }
        Some(served)
    }

    /// Reads `len` bytes at `offset`, fetching missing chunks (all of them
    /// at once). Fails whole, never short: out of range, a failed fetch or a
    /// chunk that fails verification fails the request.
    ///
    /// The read counts for sequential readahead, which may start fetches of
    /// the chunks after it; the read never waits for those.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> Result<Vec<u8>, EngineError> {
        add(&self.counters.read_requests, 1);
        self.check_range(offset, len)?;
        let mut misses = Vec::new();
        for piece in self.pieces(offset, len) {
            if self.servable(piece.index) {
                add(&self.counters.cache_hits, 1);
            } else {
                add(&self.counters.cache_misses, 1);
                misses.push(self.ensure_present(piece.index));
            }
        }
        self.note_request(offset, len, !misses.is_empty());
        try_join_all(misses).await?;
        let mut buf = vec![0; len];
        self.serve(offset, &mut buf)?;
        add(&self.counters.read_bytes, len as u64);
        Ok(buf)
    }

    /// Reports an in-range read to readahead.
    pub(super) fn note_request(self: &Arc<Self>, offset: u64, len: usize, missed: bool) {
        if len > 0 {
            let first = offset / self.chunk_size();
            let last = (offset + len as u64 - 1) / self.chunk_size();
            self.note_read(first, last, missed);
        }
    }

    /// Writes `data` at `offset`. Refused on a read-only device. Chunks the
    /// write only partly covers are fetched first (all at once); chunks it
    /// covers whole, and zero chunks, are not fetched.
    pub async fn write(self: &Arc<Self>, offset: u64, data: &[u8]) -> Result<(), EngineError> {
        add(&self.counters.write_requests, 1);
        if self.read_only {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(offset, data.len())?;
        let pieces: Vec<Piece> = self.pieces(offset, data.len()).collect();
        let mut misses = Vec::new();
        for piece in &pieces {
            if piece.len == self.chunk_len(piece.index) || self.is_zero(piece.index) {
                continue;
            }
            if self.cache.is_present(piece.index) {
                add(&self.counters.cache_hits, 1);
            } else {
                add(&self.counters.cache_misses, 1);
                misses.push(self.ensure_present(piece.index));
            }
        }
        try_join_all(misses).await?;
        for piece in &pieces {
            self.write_piece(piece, &data[piece.in_buf..][..piece.len])
                .await?;
        }
        add(&self.counters.write_bytes, data.len() as u64);
        Ok(())
    }

    /// Makes every write acknowledged before this call durable, and records
    /// every chunk present before this call so a restart does not fetch it
    /// again: `fdatasync` of the data file, then the present-bitmap.
    pub async fn flush(&self) -> Result<(), EngineError> {
        self.persist().await?;
        add(&self.counters.flushes, 1);
        Ok(())
    }

    /// What [`Engine::flush`] does, without counting as a flush the device
    /// was asked for: a device process calls it now and then so that chunks
    /// fetched by a read-only device survive a crash too.
    pub async fn checkpoint(&self) -> Result<(), EngineError> {
        self.persist().await
    }

    async fn persist(&self) -> Result<(), EngineError> {
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || cache.flush())
            .await
            .map_err(|e| EngineError::TaskFailed {
                task: "flush".into(),
                reason: e.to_string(),
            })?
            .map_err(|source| EngineError::Flush {
                source: Arc::new(source),
            })
    }

    /// Copies the range into `buf`; every chunk in it must be servable.
    fn serve(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        for piece in self.pieces(offset, buf.len()) {
            let out = &mut buf[piece.in_buf..][..piece.len];
            // Present first: a zero chunk that was written to is present.
            if self.cache.is_present(piece.index) {
                self.cache
                    .read_at(out, piece.offset)
                    .map_err(|source| EngineError::ReadCache {
                        source: Arc::new(source),
                    })?;
            } else if self.is_zero(piece.index) {
                out.fill(0);
            } else {
                return Err(EngineError::ChunkNotPresent { index: piece.index });
            }
        }
        Ok(())
    }

    async fn write_piece(self: &Arc<Self>, piece: &Piece, data: &[u8]) -> Result<(), EngineError> {
        let chunk_len = self.chunk_len(piece.index);
        loop {
            if self.cache.is_present(piece.index) {
                return self.write_cache(data, piece.offset);
            }
            if piece.len < chunk_len && !self.is_zero(piece.index) {
                // Normally fetched already by `write`; a chunk is never
                // unmarked, so this loops at most once more.
                self.ensure_present(piece.index).await?;
                continue;
            }
            let _guard = match self.try_lock_fill(piece.index) {
                Ok(guard) => guard,
                Err(fill) => {
                    // A fetch or another write is filling the chunk; its
                    // outcome does not matter, only the bit afterwards.
                    let _ = fill.await;
                    continue;
                }
            };
            if self.cache.is_present(piece.index) {
                return self.write_cache(data, piece.offset);
            }
            let chunk_start = piece.index * self.chunk_size();
            if piece.len == chunk_len {
                self.write_cache(data, chunk_start)?;
            } else {
                // A zero chunk. The data file may hold stale bytes where no
                // bit is set (a write acknowledged but not flushed before a
                // crash), so write the whole chunk rather than trust it.
                let mut chunk = vec![0; chunk_len];
                chunk[piece.in_chunk..][..piece.len].copy_from_slice(data);
                self.write_cache(&chunk, chunk_start)?;
            }
            self.cache.mark_present(piece.index);
            return Ok(());
        }
    }

    fn write_cache(&self, data: &[u8], offset: u64) -> Result<(), EngineError> {
        self.cache
            .write_at(data, offset)
            .map_err(|source| EngineError::WriteCache {
                source: Arc::new(source),
            })
    }
}
