//! The block engine: serves block requests at byte offsets of one image.
//!
//! A request travels one way:
//!
//! ```text
//! frontend ── Request (read, write, flush, discard, write-zeroes) ──▶ Engine::submit
//!   (ublk tag, FUSE op, …)        │ split into chunk pieces once; readahead told once
//!                                 ├─ present pieces ──▶ CacheIo (the frontend's: sync or its ring)
//!                                 ├─ zero pieces ────▶ zeros (no I/O into memory)
//!                                 └─ missing pieces ─▶ Fetcher: one flight per chunk, priorities,
//!                                                      deadline ─▶ ChunkStore ─▶ verify, decrypt,
//!                                                      fill the cache ─▶ plaintext to every waiter
//! ```
//!
//! Each part is one type in its own file: [`Layout`](layout.rs) (offsets to
//! chunks, what the manifest says), `Fetcher` (fetcher.rs, with its
//! priority `Slots` and the store side in retrieve.rs), `Readahead`
//! (readahead.rs), the trace walk of prefetch (prefetch.rs), `Access`
//! (access.rs: the recorded trace, speculative precision), `Counters`
//! (stats.rs). The engine wires them and holds the request logic below.
//!
//! Invariants:
//! * no byte reaches a reader unless it came from the cache (whose chunks
//!   were verified against their ids or written by the user), from a
//!   verified fetch, or from a manifest zero: a failed check fails the
//!   request;
//! * one fetch per missing chunk however many requests wait on it, run in
//!   its own task so a cancelled requester does not cancel it for the
//!   others;
//! * a chunk is marked present only after its bytes are in the data file, and
//!   a bit is never persisted before those bytes are durable (see
//!   [`crate::cache`]);
//! * nothing that replaces a whole chunk (a fetch, a whole-chunk write or
//!   discard, the first write to a zero chunk) runs concurrently with
//!   another fill of the same chunk: the in-flight map doubles as a
//!   per-chunk fill lock;
//! * discards and write-zeroes of whole chunks never fetch.
//!
//! # Registered buffers
//! A request's buffer is memory ([`ReadBuf::Memory`], [`WriteBuf::Memory`])
//! or a buffer registered with the frontend's I/O ([`ReadBuf::Fixed`],
//! [`WriteBuf::Fixed`]: ublk's zero-copy mode, the request's own pages),
//! whose bytes only the request's [`CacheIo`] can move. The logic is the
//! same for both; only the last step differs. Present pieces are one cache
//! read either way. Zero pieces are filled in memory or by
//! [`CacheIo::zero_fixed`]. A fetched chunk's plaintext is copied into
//! memory, or read back from the cache file into a registered buffer: the
//! fetcher wrote it there before handing it over, so the read is a page-cache
//! copy. The first partial write to a zero chunk writes the whole chunk from
//! memory, or for a registered source zeros first and then the piece.
//!
//! # Threads
//! A request runs where its frontend polls it. With [`SyncIo`] a request
//! whose chunks are all present or zero completes in its first poll, on
//! the caller's thread; only a fetch or a flush makes it wait. Fetches run
//! on the engine's tokio runtime, their verification, decryption and cache
//! fill on its blocking pool; no cache file I/O runs on an async worker.
//!
//! # Cancel safety
//! Dropping a [`Engine::submit`] future never leaves a chunk half-filled or
//! wrongly marked: fetches run in their own tasks, and a request holds a
//! chunk's fill lock only while it writes that chunk. A dropped write may
//! have been applied in part, as with any block device.

use std::path::Path;
use std::sync::Arc;

use tokio::runtime::Handle;

use crate::cache::io::CacheIo;
use crate::cache::CacheDir;
use crate::chunk::{ChunkId, Manifest};
use crate::store::ChunkStore;

mod access;
mod budget;
mod error;
mod fetcher;
mod files;
mod layout;
mod neighbourhood;
mod prefetch;
mod readahead;
mod request;
mod retrieve;
mod slots;
mod stats;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
pub(crate) mod testing_registered;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_discard;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_files;
#[cfg(test)]
mod tests_model;
#[cfg(test)]
mod tests_prefetch;
#[cfg(test)]
mod tests_readahead;
#[cfg(test)]
mod tests_registered;
#[cfg(test)]
mod tests_write;

pub use crate::cache::io::FixedBuf;
pub use crate::cache::io::{NowaitReadIo, SyncIo};
pub use error::EngineError;
pub use request::{ReadBuf, Request, WriteBuf};
pub use retrieve::{get_envelope, open_envelope, FetchPolicy, DEFAULT_FETCH_TIMEOUT};
pub use slots::Priority;
pub use stats::EngineStats;

use access::Access;
use fetcher::{Fetcher, Fill, Filled};
use layout::{Layout, Piece};
use prefetch::StopFlag;
use readahead::Readahead;
use stats::{add, Counters};

/// The default of [`EngineOptions::readahead_chunks`]: with 512 KiB chunks,
/// up to 4 MiB in flight and 8 MiB ahead of a long sequential reader.
pub const DEFAULT_READAHEAD_CHUNKS: u32 = 8;
/// The default of [`EngineOptions::max_fetches`].
pub const DEFAULT_MAX_FETCHES: usize = 64;
/// The default of [`EngineOptions::prefetch_chunks`]: a quarter of the
/// default store slots, so demand and readahead always find slots free.
pub const DEFAULT_PREFETCH_CHUNKS: usize = 16;

/// How a device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Refuse every write, discard and write-zeroes with
    /// [`crate::error::ErrorKind::ReadOnly`].
    pub read_only: bool,
    /// Most readahead fetches one sequential reader keeps in flight (its
    /// window starts at 2 and doubles, each time the reader gets as many
    /// chunks further, up to this), and most in flight over
    /// all readers. A reader with a window of w is fetched for at most
    /// w²/2 non-zero chunks ahead (never fewer than w nor more than 2w).
    /// 0 turns readahead off.
    pub readahead_chunks: u32,
    /// Lower that bound while speculative fetches slow the store's answers
    /// (a link short of bandwidth), and raise it back as they keep pace
    /// (budget.rs); off, it stays at `readahead_chunks`.
    pub adaptive_readahead: bool,
    /// Deadline and retries of each fetch.
    pub fetch: FetchPolicy,
    /// Most requests to the store at once; more wait in line, demand
    /// fetches before readahead before prefetch.
    pub max_fetches: usize,
    /// Most prefetch fetches ([`Engine::prefetch`]) in flight at once.
    /// Below `max_fetches`, a demand fetch never waits for prefetch beyond
    /// one fetch's time.
    pub prefetch_chunks: usize,
    /// Record the order in which requests first read each chunk
    /// ([`Engine::recorded_trace`]).
    pub record_trace: bool,
    /// Acknowledge a write, discard or write-zeroes that changes a chunk
    /// only once the `present` file lists that chunk (a flush of the cache
    /// first, if it does not yet), so an engine opened on the cache after
    /// this process dies keeps every acknowledged change rather than
    /// fetching the chunk again over it. For a device whose users never
    /// see the process die (ublk user recovery re-issues their requests to
    /// the next process), where a flush after the death must still cover
    /// the writes acknowledged before it. Costs one flush for the first
    /// change of each chunk since it became present.
    pub changes_outlive_process: bool,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            read_only: false,
            readahead_chunks: DEFAULT_READAHEAD_CHUNKS,
            adaptive_readahead: true,
            fetch: FetchPolicy::default(),
            max_fetches: DEFAULT_MAX_FETCHES,
            prefetch_chunks: DEFAULT_PREFETCH_CHUNKS,
            record_trace: false,
            changes_outlive_process: false,
        }
    }
}

/// Serves one image: reads fetch on demand, writes stay in the local cache.
#[derive(Debug)]
pub struct Engine {
    layout: Arc<Layout>,
    cache: Arc<CacheDir>,
    fetcher: Arc<Fetcher>,
    readahead: Arc<Readahead>,
    counters: Arc<Counters>,
    access: Arc<Access>,
    prefetch_stop: Arc<StopFlag>,
    prefetch_chunks: usize,
    read_only: bool,
    changes_outlive_process: bool,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.prefetch_stop.stop();
    }
}

impl Engine {
    /// Opens the cache in `cache_dir` for `manifest` (creating it if absent)
    /// and serves the image from it, fetching misses from `store` on
    /// `runtime`.
    ///
    /// `manifest_digest` is [`crate::chunk::manifest_digest`] of the sealed
    /// manifest; a cache made for another digest is refused. Blocks on file
    /// I/O: call it from a blocking context (`spawn_blocking`), not from
    /// an async task.
    pub fn open(
        manifest: Manifest,
        manifest_digest: [u8; 32],
        store: Arc<dyn ChunkStore>,
        cache_dir: &Path,
        opts: EngineOptions,
        runtime: Handle,
    ) -> Result<Arc<Engine>, EngineError> {
        let layout = Arc::new(Layout::new(manifest)?);
        let cache = CacheDir::open_or_create(
            cache_dir,
            manifest_digest,
            layout.image_size(),
            layout.chunk_size() as u32,
        )
        .map_err(|source| EngineError::OpenCache {
            source: Arc::new(source),
        })?;
        let cache = Arc::new(cache);
        let counters = Arc::new(Counters::new());
        let access = Arc::new(Access::new(layout.chunk_count(), opts.record_trace));
        let fetcher = Arc::new(Fetcher::new(
            store,
            Arc::clone(&cache),
            Arc::clone(&layout),
            runtime,
            &opts,
            Arc::clone(&counters),
            Arc::clone(&access),
        ));
        let readahead = Arc::new(Readahead::new(
            opts.readahead_chunks,
            Arc::clone(&fetcher),
            Arc::clone(&layout),
            Arc::clone(&counters),
        ));
        fetcher.set_readahead(&readahead);
        if opts.readahead_chunks > 0 {
            fetcher.files().learn_from_cache(&cache);
        }
        Ok(Arc::new(Engine {
            layout,
            cache,
            fetcher,
            readahead,
            counters,
            access,
            prefetch_stop: Arc::default(),
            prefetch_chunks: opts.prefetch_chunks,
            read_only: opts.read_only,
            changes_outlive_process: opts.changes_outlive_process,
        }))
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.layout.image_size()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Counts every later successful fetch's latency in `buckets` as well
    /// (a metrics endpoint's histogram); only the first call takes effect.
    pub fn export_fetch_latency(&self, buckets: Arc<crate::metrics::Histogram>) {
        self.counters.export_fetch_latency(buckets);
    }

    /// The device's counters now.
    pub fn stats(&self) -> EngineStats {
        let mut stats = EngineStats {
            image_bytes: self.layout.image_size(),
            chunk_size: self.layout.chunk_size() as u32,
            chunks_total: self.layout.chunk_count(),
            chunks_zero: self.layout.chunks_zero(),
            chunks_present: self.cache.present_count(),
            ..EngineStats::default()
        };
        self.counters.fill(&mut stats);
        stats
    }

    /// Starts fetching, in the order given, the chunks `ids` name (a trace
    /// recorded on this image or an earlier version of it), in the
    /// background at [`Priority::Prefetch`], and returns how many chunks
    /// that plans. An id the image holds at several indices is fetched for
    /// each; ids the image lacks are skipped. See prefetch.rs for how it
    /// yields to demand reads; it stops when the engine is dropped or
    /// [`Engine::stop_prefetch`] is called.
    pub fn prefetch(&self, ids: &[ChunkId]) -> u64 {
        let plan = self.layout.indices_of(ids);
        let planned = plan.len() as u64;
        if !plan.is_empty() {
            prefetch::spawn(
                Arc::clone(&self.fetcher),
                plan,
                self.prefetch_chunks,
                Arc::clone(&self.counters),
                Arc::clone(&self.prefetch_stop),
            );
        }
        planned
    }

    /// Stops any prefetch: no new prefetch fetch starts; those in flight
    /// finish.
    pub fn stop_prefetch(&self) {
        self.prefetch_stop.stop();
    }

    /// The chunks requests have read so far, by id, first read first and
    /// each once; `None` unless the engine was opened with
    /// [`EngineOptions::record_trace`].
    pub fn recorded_trace(&self) -> Option<Vec<ChunkId>> {
        let indices = self.access.recorded()?;
        let mut seen = std::collections::HashSet::new();
        Some(
            indices
                .into_iter()
                .filter_map(|index| match self.layout.content(index) {
                    Some(layout::Content::Sealed { id, .. }) => Some(*id),
                    _ => None,
                })
                .filter(|id| seen.insert(*id))
                .collect(),
        )
    }

    /// Serves `request`, doing its cache I/O through `io`. Completes whole
    /// or fails, never short: out of range, a failed fetch or a chunk that
    /// fails verification fails the request.
    ///
    /// With [`SyncIo`], a request that needs no fetch and no flush is
    /// complete after the future's first poll.
    pub async fn submit<I: CacheIo>(
        &self,
        io: &I,
        request: Request<'_>,
    ) -> Result<(), EngineError> {
        match request {
            Request::Read { offset, buf } => self.serve_read(io, offset, buf).await,
            Request::Write { offset, data } => self.serve_write(io, offset, data).await,
            Request::Flush => {
                self.persist().await?;
                add(&self.counters.flushes, 1);
                Ok(())
            }
            Request::Discard { offset, len } => {
                add(&self.counters.discard_requests, 1);
                self.zero_range(io, offset, len, false).await
            }
            Request::WriteZeroes { offset, len } => {
                add(&self.counters.write_zeroes_requests, 1);
                self.zero_range(io, offset, len, true).await
            }
        }
    }

    /// What a flush does, without counting as a flush the device was asked
    /// for: a device process calls it now and then so that chunks fetched
    /// by a read-only device survive a crash too, and once when it stops.
    pub async fn checkpoint(&self) -> Result<(), EngineError> {
        self.persist().await
    }

    async fn serve_read<I: CacheIo>(
        &self,
        io: &I,
        offset: u64,
        mut buf: ReadBuf<'_>,
    ) -> Result<(), EngineError> {
        let buf = &mut buf;
        add(&self.counters.read_requests, 1);
        let len = buf.len() as u64;
        self.layout.check_range(offset, len)?;
        let Some((first, last)) = self.layout.chunk_span(offset, len) else {
            return Ok(());
        };
        // Every fetch starts before any waiting, so a request's misses are
        // fetched in parallel.
        let mut waits: Vec<(Piece, Fill)> = Vec::new();
        for piece in self.layout.pieces(offset, len) {
            let zero = self.layout.is_zero(piece.index);
            if !zero {
                self.access.note_read(piece.index, &self.counters);
            }
            if zero || self.cache.is_present(piece.index) {
                add(&self.counters.cache_hits, 1);
            } else {
                add(&self.counters.cache_misses, 1);
                if let Some(fill) = self.fetcher.fetch(piece.index, Priority::Demand) {
                    waits.push((piece, fill));
                }
            }
        }
        self.readahead.note_read(first, last, !waits.is_empty());

        // Then what is here already, adjacent cached pieces in one read.
        let mut run: Option<(u64, usize, usize)> = None;
        for piece in self.layout.pieces(offset, len) {
            let waiting = waits.iter().any(|(p, _)| p.index == piece.index);
            if !waiting && self.cache.is_present(piece.index) {
                run = match run {
                    Some((at, in_buf, n)) if in_buf + n == piece.in_buf => {
                        Some((at, in_buf, n + piece.len))
                    }
                    other => {
                        if let Some((at, in_buf, n)) = other {
                            self.read_cache(io, buf, in_buf, n, at).await?;
                        }
                        Some((piece.offset, piece.in_buf, piece.len))
                    }
                };
            } else if !waiting && self.layout.is_zero(piece.index) {
                self.zero_fill(io, buf, piece.in_buf, piece.len).await?;
            } else if !waiting {
                // Became present or lost between the passes: rare.
                self.serve_unfilled(io, &piece, buf).await?;
            }
        }
        if let Some((at, in_buf, n)) = run {
            self.read_cache(io, buf, in_buf, n, at).await?;
        }

        for (piece, fill) in waits {
            self.serve_filled(io, &piece, fill, buf).await?;
        }
        add(&self.counters.read_bytes, len);
        Ok(())
    }

    /// Serves a piece whose chunk was not present when looked at: zeros for
    /// a zero chunk, else whatever fills it now.
    async fn serve_unfilled<I: CacheIo>(
        &self,
        io: &I,
        piece: &Piece,
        buf: &mut ReadBuf<'_>,
    ) -> Result<(), EngineError> {
        match self.fetcher.fetch(piece.index, Priority::Demand) {
            Some(fill) => self.serve_filled(io, piece, fill, buf).await,
            // Present first: a zero chunk that was written to is present.
            None if self.cache.is_present(piece.index) => {
                self.read_cache(io, buf, piece.in_buf, piece.len, piece.offset)
                    .await
            }
            None if self.layout.is_zero(piece.index) => {
                self.zero_fill(io, buf, piece.in_buf, piece.len).await
            }
            None => Err(EngineError::ChunkNotPresent { index: piece.index }),
        }
    }

    /// Waits for `fill` and serves the piece from the plaintext it hands
    /// over, or, if it says to look again, from the cache or a new fill.
    async fn serve_filled<I: CacheIo>(
        &self,
        io: &I,
        piece: &Piece,
        mut fill: Fill,
        buf: &mut ReadBuf<'_>,
    ) -> Result<(), EngineError> {
        loop {
            match fill.await? {
                Filled::Plaintext(plaintext) => {
                    return match buf {
                        ReadBuf::Memory(buf) => {
                            buf[piece.in_buf..][..piece.len]
                                .copy_from_slice(&plaintext[piece.in_chunk..][..piece.len]);
                            Ok(())
                        }
                        // Out of reach of the CPU; the fill put the same
                        // bytes in the cache file (page cache) first.
                        ReadBuf::Fixed(_) => {
                            self.read_cache(io, buf, piece.in_buf, piece.len, piece.offset)
                                .await
                        }
                    };
                }
                Filled::LookAgain => match self.fetcher.fetch(piece.index, Priority::Demand) {
                    Some(next) => fill = next,
                    None => return Box::pin(self.serve_unfilled(io, piece, buf)).await,
                },
            }
        }
    }

    /// Writes `data` at `offset`. Chunks the write only partly covers are
    /// fetched first (all at once); chunks it covers whole, and zero
    /// chunks, are not fetched.
    async fn serve_write<I: CacheIo>(
        &self,
        io: &I,
        offset: u64,
        data: WriteBuf<'_>,
    ) -> Result<(), EngineError> {
        add(&self.counters.write_requests, 1);
        if self.read_only {
            return Err(EngineError::ReadOnly);
        }
        self.layout.check_range(offset, data.len() as u64)?;
        let mut waits = Vec::new();
        for piece in self.layout.pieces(offset, data.len() as u64) {
            if self.layout.is_whole(&piece) || self.layout.is_zero(piece.index) {
                continue;
            }
            if self.cache.is_present(piece.index) {
                add(&self.counters.cache_hits, 1);
            } else {
                add(&self.counters.cache_misses, 1);
                waits.extend(self.fetcher.fetch(piece.index, Priority::Demand));
            }
        }
        for fill in waits {
            fill.await?;
        }
        for piece in self.layout.pieces(offset, data.len() as u64) {
            self.write_piece(io, &piece, data.range(piece.in_buf, piece.len))
                .await?;
        }
        add(&self.counters.write_bytes, data.len() as u64);
        Ok(())
    }

    async fn write_piece<I: CacheIo>(
        &self,
        io: &I,
        piece: &Piece,
        data: WriteBuf<'_>,
    ) -> Result<(), EngineError> {
        let whole = self.layout.is_whole(piece);
        loop {
            if self.cache.is_present(piece.index) {
                self.note_written(piece.index).await?;
                self.keep_present_across_death(piece.index).await?;
                return self.write_cache(io, data, piece.offset).await;
            }
            if !whole && !self.layout.is_zero(piece.index) {
                // Normally fetched already by `write`; a chunk is never
                // unmarked, so this loops at most once more.
                self.ensure_present(piece.index).await?;
                continue;
            }
            let _guard = match self.fetcher.try_lock_fill(piece.index) {
                Ok(guard) => guard,
                Err(fill) => {
                    // A fetch or another fill is running; its outcome does
                    // not matter, only the bit afterwards.
                    let _ = fill.await;
                    continue;
                }
            };
            if self.cache.is_present(piece.index) {
                self.note_written(piece.index).await?;
                self.keep_present_across_death(piece.index).await?;
                return self.write_cache(io, data, piece.offset).await;
            }
            self.note_written(piece.index).await?;
            let chunk_start = self.layout.chunk_start(piece.index);
            if whole {
                self.write_cache(io, data, chunk_start).await?;
            } else {
                // A zero chunk. The data file may hold stale bytes where no
                // bit is set (a write acknowledged but not flushed before a
                // crash), so write the whole chunk rather than trust it.
                let mut chunk = vec![0; self.layout.chunk_len(piece.index)];
                match data {
                    WriteBuf::Memory(data) => {
                        chunk[piece.in_chunk..][..piece.len].copy_from_slice(data);
                        self.write_cache(io, WriteBuf::Memory(&chunk), chunk_start)
                            .await?;
                    }
                    // Zeros from memory (a hole punch would do, but not on
                    // every file system), then the piece over them. Both run
                    // in order: each completes before the next starts.
                    WriteBuf::Fixed(_) => {
                        self.write_cache(io, WriteBuf::Memory(&chunk), chunk_start)
                            .await?;
                        self.write_cache(io, data, piece.offset).await?;
                    }
                }
            }
            self.cache.mark_present(piece.index);
            return self.keep_present_across_death(piece.index).await;
        }
    }

    /// Discard (`must_zero` false) and write-zeroes (true) of a range.
    async fn zero_range<I: CacheIo>(
        &self,
        io: &I,
        offset: u64,
        len: u64,
        must_zero: bool,
    ) -> Result<(), EngineError> {
        if self.read_only {
            return Err(EngineError::ReadOnly);
        }
        self.layout.check_range(offset, len)?;
        for piece in self.layout.pieces(offset, len) {
            if self.layout.is_whole(&piece) {
                self.punch_chunk(io, piece.index).await?;
            } else if self.cache.is_present(piece.index) {
                self.note_written(piece.index).await?;
                self.keep_present_across_death(piece.index).await?;
                self.punch(io, piece.offset, piece.len as u64).await?;
            } else if must_zero && !self.layout.is_zero(piece.index) {
                // The rest of the chunk must keep its bytes: fetch them.
                self.ensure_present(piece.index).await?;
                self.note_written(piece.index).await?;
                self.keep_present_across_death(piece.index).await?;
                self.punch(io, piece.offset, piece.len as u64).await?;
            }
            // Otherwise the range reads as zeros (a zero chunk) or may keep
            // its old bytes (a discard of a chunk the cache lacks).
        }
        Ok(())
    }

    /// Makes chunk `index` a hole that reads as zeros, without fetching it.
    async fn punch_chunk<I: CacheIo>(&self, io: &I, index: u64) -> Result<(), EngineError> {
        let (start, len) = (
            self.layout.chunk_start(index),
            self.layout.chunk_len(index) as u64,
        );
        loop {
            if self.cache.is_present(index) {
                self.note_written(index).await?;
                self.keep_present_across_death(index).await?;
                self.punch(io, start, len).await?;
                add(&self.counters.chunks_punched, 1);
                return Ok(());
            }
            if self.layout.is_zero(index) {
                return Ok(());
            }
            let _guard = match self.fetcher.try_lock_fill(index) {
                Ok(guard) => guard,
                Err(fill) => {
                    let _ = fill.await;
                    continue;
                }
            };
            // Stale bytes may sit where no bit is set: the hole clears them.
            self.note_written(index).await?;
            self.punch(io, start, len).await?;
            self.cache.mark_present(index);
            add(&self.counters.chunks_punched, 1);
            return self.keep_present_across_death(index).await;
        }
    }

    /// Returns once chunk `index` is present (or zero), fetching it if no
    /// one else is.
    async fn ensure_present(&self, index: u64) -> Result<(), EngineError> {
        while let Some(fill) = self.fetcher.fetch(index, Priority::Demand) {
            fill.await?;
        }
        Ok(())
    }

    /// Records, before its bytes change, that the device wrote to chunk
    /// `index` (see [`CacheDir::record_written`]): at once if it is known,
    /// else on the blocking pool, as it may persist the bitmap.
    async fn note_written(&self, index: u64) -> Result<(), EngineError> {
        if self.cache.is_written(index) {
            return Ok(());
        }
        self.on_blocking_pool("record a written chunk", move |cache| {
            cache.record_written(index)
        })
        .await?
        .map_err(|source| EngineError::WriteCache {
            source: Arc::new(source),
        })
    }

    /// With [`EngineOptions::changes_outlive_process`], makes sure the
    /// `present` file lists chunk `index` (present in memory, its bytes in
    /// the data file) before a change to it is acknowledged. A change to a
    /// present chunk may be written before or after: a flush persists its
    /// written bit along with its present bit.
    async fn keep_present_across_death(&self, index: u64) -> Result<(), EngineError> {
        if !self.changes_outlive_process || self.cache.is_present_on_disk_now(index) == Some(true) {
            return Ok(());
        }
        self.on_blocking_pool("persist a changed chunk", move |cache| {
            cache.persist_present(index)
        })
        .await?
        .map_err(|source| EngineError::Flush {
            source: Arc::new(source),
        })
    }

    /// `fdatasync` of the data file, then the present-bitmap, on the
    /// blocking pool.
    async fn persist(&self) -> Result<(), EngineError> {
        self.on_blocking_pool("flush", |cache| cache.flush())
            .await?
            .map_err(|source| EngineError::Flush {
                source: Arc::new(source),
            })
    }

    /// Runs `work` on the cache on the blocking pool, as anything that may
    /// `fdatasync` must; `task` names it should the task itself fail.
    async fn on_blocking_pool<T: Send + 'static>(
        &self,
        task: &str,
        work: impl FnOnce(&CacheDir) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let cache = Arc::clone(&self.cache);
        self.fetcher
            .runtime()
            .spawn_blocking(move || work(&cache))
            .await
            .map_err(|e| EngineError::TaskFailed {
                task: task.into(),
                reason: e.to_string(),
            })
    }

    /// Reads `len` bytes of the data file at `offset` into `buf` at `in_buf`.
    async fn read_cache<I: CacheIo>(
        &self,
        io: &I,
        buf: &mut ReadBuf<'_>,
        in_buf: usize,
        len: usize,
        offset: u64,
    ) -> Result<(), EngineError> {
        let file = self.cache.data_file();
        let read = match buf {
            ReadBuf::Memory(buf) => io.read_at(file, &mut buf[in_buf..][..len], offset).await,
            ReadBuf::Fixed(fixed) => io.read_fixed(file, fixed.range(in_buf, len), offset).await,
        };
        read.map_err(|source| EngineError::ReadCache {
            source: Arc::new(self.cache.read_error(offset, len, source)),
        })
    }

    /// Zeros `len` bytes of `buf` at `in_buf`.
    async fn zero_fill<I: CacheIo>(
        &self,
        io: &I,
        buf: &mut ReadBuf<'_>,
        in_buf: usize,
        len: usize,
    ) -> Result<(), EngineError> {
        match buf {
            ReadBuf::Memory(buf) => {
                buf[in_buf..][..len].fill(0);
                Ok(())
            }
            ReadBuf::Fixed(fixed) => {
                io.zero_fixed(fixed.range(in_buf, len))
                    .await
                    .map_err(|source| EngineError::ZeroFill {
                        len,
                        source: Arc::new(source),
                    })
            }
        }
    }

    async fn write_cache<I: CacheIo>(
        &self,
        io: &I,
        data: WriteBuf<'_>,
        offset: u64,
    ) -> Result<(), EngineError> {
        let file = self.cache.data_file();
        let written = match data {
            WriteBuf::Memory(data) => io.write_at(file, data, offset).await,
            WriteBuf::Fixed(fixed) => io.write_fixed(file, fixed, offset).await,
        };
        written.map_err(|source| EngineError::WriteCache {
            source: Arc::new(self.cache.write_error(offset, data.len(), source)),
        })
    }

    async fn punch<I: CacheIo>(&self, io: &I, offset: u64, len: u64) -> Result<(), EngineError> {
        io.punch_hole(self.cache.data_file(), offset, len)
            .await
            .map_err(|source| EngineError::WriteCache {
                source: Arc::new(self.cache.punch_error(offset, len, source)),
            })
    }

    /// Whether a read of the range would need no fetch (or fail at once,
    /// being out of range).
    #[cfg(test)]
    pub(crate) fn servable_now(&self, offset: u64, len: u64) -> bool {
        self.layout.check_range(offset, len).is_err()
            || self
                .layout
                .pieces(offset, len)
                .all(|p| self.cache.is_present(p.index) || self.layout.is_zero(p.index))
    }

    /// Fetches waiting for a store slot at `priority`.
    #[cfg(test)]
    pub(crate) fn fetches_waiting(&self, priority: Priority) -> usize {
        self.fetcher.waiting(priority)
    }

    /// The run of one file's chunks known to hold chunk `index`.
    #[cfg(test)]
    pub(crate) fn file_run_of(&self, index: u64) -> Option<std::ops::RangeInclusive<u64>> {
        self.fetcher.files().span_of(index)
    }

    /// Whether no fetch, readahead included, still holds the cache: a test
    /// that reopens the cache waits for this.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        // The fetcher is held by the engine and the readahead; a running
        // prefetch walk holds a third handle.
        Arc::strong_count(&self.fetcher) == 2 && Arc::strong_count(&self.readahead) == 1
    }
}
