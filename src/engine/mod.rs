//! The block engine: serves reads and writes at byte offsets of one image.
//!
//! It sits between a frontend (FUSE today; ublk and NBD later) and the
//! cache and store:
//!
//! ```text
//! frontend ── read/write(offset, len) ──▶ Engine ──▶ CacheDir (data + present)
//!                                           │
//!                                           └─ miss ─▶ ChunkStore::get ─▶ open_chunk
//! ```
//!
//! A request is cut into *pieces*, one per chunk it touches. A piece of a
//! chunk the cache holds is read from the data file; a piece of an all-zero
//! chunk the cache does not hold is zeros without I/O; any other piece waits
//! for its chunk to be fetched, verified, decrypted and written to the cache.
//!
//! Invariants:
//! * no byte reaches a reader unless it came from the cache (whose chunks
//!   were verified against their ids or written by the user) or from a
//!   manifest zero: a failed check fails the request;
//! * one fetch per missing chunk however many requests wait on it, run in its
//!   own task so a cancelled requester does not cancel it for the others;
//! * a chunk is marked present only after its bytes are in the data file, and
//!   a bit is never persisted before those bytes are durable (see
//!   [`crate::cache`]);
//! * nothing that fills a whole chunk (a fetch, a whole-chunk write, the
//!   first write to a zero chunk) runs concurrently with another fill of the
//!   same chunk: the in-flight map doubles as a per-chunk fill lock;
//! * sequential readahead (see `readahead.rs`) only starts ordinary fetches
//!   through that map, never awaited by the reader that prompted them, and
//!   a failed one fails no request.
//!
//! # Cancel safety
//! Dropping a [`Engine::read`] or [`Engine::write`] future never leaves a
//! chunk half-filled or wrongly marked: fetches run in their own tasks, and a
//! write holds a chunk's fill lock only across synchronous code. A dropped
//! write may have been applied in part, as with any block device.

use std::path::Path;
use std::sync::Arc;

use dashmap::DashMap;

use crate::cache::CacheDir;
use crate::chunk::{validate_chunk_size, Manifest, ManifestEntry};
use crate::store::ChunkStore;

mod error;
mod fetch;
mod plan;
mod readahead;
mod request;
mod stats;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_model;
#[cfg(test)]
mod tests_readahead;
#[cfg(test)]
mod tests_write;

pub use error::EngineError;
pub use plan::CachedRange;
pub use stats::EngineStats;

use fetch::Fill;
use readahead::Readahead;
use stats::Counters;

/// The default of [`EngineOptions::readahead_chunks`]: with 512 KiB chunks,
/// up to 4 MiB in flight and 8 MiB ahead of a long sequential reader.
pub const DEFAULT_READAHEAD_CHUNKS: u32 = 8;

/// How a device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Refuse every write with [`crate::error::ErrorKind::ReadOnly`].
    pub read_only: bool,
    /// Most readahead fetches one sequential reader keeps in flight (its
    /// window starts at 2 and doubles, each time the reader gets as many
    /// chunks further, up to this), and most in flight over
    /// all readers. A reader with a window of w is fetched for at most
    /// w²/2 non-zero chunks ahead (never fewer than w nor more than 2w).
    /// 0 turns readahead off.
    pub readahead_chunks: u32,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            read_only: false,
            readahead_chunks: DEFAULT_READAHEAD_CHUNKS,
        }
    }
}

/// Serves one image: reads fetch on demand, writes stay in the local cache.
#[derive(Debug)]
pub struct Engine {
    manifest: Manifest,
    store: Arc<dyn ChunkStore>,
    cache: Arc<CacheDir>,
    read_only: bool,
    chunks_zero: u64,
    /// Chunks being filled (fetched, or written whole) right now.
    inflight: DashMap<u64, Fill>,
    readahead: Readahead,
    counters: Counters,
}

/// The part of one request that falls in one chunk.
#[derive(Debug, Clone, Copy)]
struct Piece {
    index: u64,
    /// Offset of the piece in the image.
    offset: u64,
    /// Offset of the piece within its chunk.
    in_chunk: usize,
    /// Offset of the piece within the request's buffer.
    in_buf: usize,
    len: usize,
}

impl Engine {
    /// Opens the cache in `cache_dir` for `manifest` (creating it if absent)
    /// and serves the image from it, fetching misses from `store`.
    ///
    /// `manifest_digest` is [`crate::chunk::manifest_digest`] of the sealed
    /// manifest; a cache made for another digest is refused. Blocks on file
    /// I/O while opening the cache.
    pub fn open(
        manifest: Manifest,
        manifest_digest: [u8; 32],
        store: Arc<dyn ChunkStore>,
        cache_dir: &Path,
        opts: EngineOptions,
    ) -> Result<Arc<Engine>, EngineError> {
        validate_chunk_size(manifest.chunk_size)
            .map_err(|reason| EngineError::InvalidManifest { reason })?;
        let expected = manifest.image_size.div_ceil(u64::from(manifest.chunk_size));
        if manifest.chunk_count() != expected {
            return Err(EngineError::InvalidManifest {
                reason: format!(
                    "{} entries for an image of {} bytes in chunks of {}, which needs {expected}",
                    manifest.chunk_count(),
                    manifest.image_size,
                    manifest.chunk_size
                ),
            });
        }
        let cache = CacheDir::open_or_create(
            cache_dir,
            manifest_digest,
            manifest.image_size,
            manifest.chunk_size,
        )
        .map_err(|source| EngineError::OpenCache {
            source: Arc::new(source),
        })?;
        let chunks_zero = manifest
            .entries
            .iter()
            .filter(|e| matches!(e, ManifestEntry::Zero))
            .count() as u64;
        Ok(Arc::new(Engine {
            manifest,
            store,
            cache: Arc::new(cache),
            read_only: opts.read_only,
            chunks_zero,
            inflight: DashMap::new(),
            readahead: Readahead::new(opts.readahead_chunks),
            counters: Counters::new(),
        }))
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.image_size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device's counters now.
    pub fn stats(&self) -> EngineStats {
        let mut stats = EngineStats {
            image_bytes: self.manifest.image_size,
            chunk_size: self.manifest.chunk_size,
            chunks_total: self.manifest.chunk_count(),
            chunks_zero: self.chunks_zero,
            chunks_present: self.cache.present_count(),
            ..EngineStats::default()
        };
        self.counters.fill(&mut stats);
        stats
    }

    fn chunk_size(&self) -> u64 {
        u64::from(self.manifest.chunk_size)
    }

    /// Bytes in chunk `index` (the last chunk may be short).
    fn chunk_len(&self, index: u64) -> usize {
        let start = index * self.chunk_size();
        self.manifest
            .image_size
            .saturating_sub(start)
            .min(self.chunk_size()) as usize
    }

    fn entry(&self, index: u64) -> Option<&ManifestEntry> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.manifest.entries.get(i))
    }

    fn is_zero(&self, index: u64) -> bool {
        matches!(self.entry(index), Some(ManifestEntry::Zero))
    }

    /// Whether a piece of chunk `index` can be read without waiting.
    fn servable(&self, index: u64) -> bool {
        self.cache.is_present(index) || self.is_zero(index)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), EngineError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    /// The pieces of an in-range request, in order.
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = Piece> + '_ {
        let chunk_size = self.chunk_size();
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = offset + done as u64;
            let in_chunk = (at % chunk_size) as usize;
            let piece_len = (len - done).min(chunk_size as usize - in_chunk);
            let piece = Piece {
                index: at / chunk_size,
                offset: at,
                in_chunk,
                in_buf: done,
                len: piece_len,
            };
            done += piece_len;
            Some(piece)
        })
    }
}

impl Drop for Engine {
    /// Persists what the cache holds, so a clean stop never costs a
    /// refetch. Errors cannot be returned from here; they are logged.
    fn drop(&mut self) {
        if let Err(error) = self.cache.flush() {
            tracing::warn!(
                cache = %self.cache.dir().display(),
                error = %error,
                "final flush of the cache failed"
            );
        }
    }
}
