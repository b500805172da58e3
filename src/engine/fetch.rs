//! Making a chunk present: single-flight fetches and the per-chunk fill lock.
//!
//! `Engine::inflight` maps a chunk index to a shared future that completes
//! when whoever is filling that chunk is done. Two kinds of fill take an
//! entry:
//! * a fetch: a spawned task that gets the envelope, verifies and decrypts it
//!   on a blocking thread, writes it to the cache and marks it present,
//!   started by a request that needs the chunk (a demand fetch) or by
//!   readahead (see `readahead.rs`);
//! * a direct fill by a write that covers the whole chunk or starts a zero
//!   chunk (see `request.rs`).
//!
//! Whoever inserts an entry removes it, and only after marking the chunk
//! present (on success). So a request that finds no entry and no present bit
//! may start a fill itself; it re-checks the bit under the map's shard lock
//! to close the race with a fill that has just finished.

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::stats::add;
use super::{Engine, EngineError};
use crate::chunk::{open_chunk_in_place, ChunkId, ChunkKey, ManifestEntry};

/// Completes when a fill of one chunk ends. `Ok` means only "go and look
/// again": the caller re-checks the present bit.
pub(super) type Fill = Shared<BoxFuture<'static, Result<(), EngineError>>>;

/// Held by a write that fills a chunk itself; while it lives, no fetch or
/// other fill of that chunk starts.
pub(super) struct FillGuard<'a> {
    engine: &'a Engine,
    index: u64,
    // Dropped after `drop` has removed the map entry: waiters wake to find
    // the entry gone and the bit set.
    _done: oneshot::Sender<()>,
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        self.engine.inflight.remove(&self.index);
    }
}

/// Removes a fetch's map entry when its task ends, even by panic.
struct FetchDone {
    engine: Arc<Engine>,
    index: u64,
}

impl Drop for FetchDone {
    fn drop(&mut self) {
        self.engine.inflight.remove(&self.index);
    }
}

impl Engine {
    /// Returns once chunk `index` is present in the cache, fetching it if
    /// no one else is. A zero chunk returns at once: it needs no fetch.
    pub(super) async fn ensure_present(self: &Arc<Self>, index: u64) -> Result<(), EngineError> {
        loop {
            if self.cache.is_present(index) {
                return Ok(());
            }
            let fill = match self.inflight.entry(index) {
                Entry::Occupied(entry) => entry.get().clone(),
                Entry::Vacant(entry) => {
                    if self.cache.is_present(index) {
                        return Ok(());
                    }
                    let (id, key) = match self.entry(index) {
                        Some(ManifestEntry::Chunk { id, key }) => (*id, key.clone()),
                        Some(ManifestEntry::Zero) => return Ok(()),
                        None => return Err(EngineError::ChunkNotPresent { index }),
                    };
                    let fill = self.start_fetch(index, id, key, None);
                    entry.insert(fill.clone());
                    fill
                }
            };
            fill.await?;
        }
    }

    /// Takes the fill lock of chunk `index`, or hands back the fill to wait
    /// for when someone else holds it.
    pub(super) fn try_lock_fill(&self, index: u64) -> Result<FillGuard<'_>, Fill> {
        match self.inflight.entry(index) {
            Entry::Occupied(entry) => Err(entry.get().clone()),
            Entry::Vacant(entry) => {
                let (done, waiters) = oneshot::channel::<()>();
                // The sender is only ever dropped, never used: that is the signal.
                entry.insert(waiters.map(|_| Ok(())).boxed().shared());
                Ok(FillGuard {
                    engine: self,
                    index,
                    _done: done,
                })
            }
        }
    }

    /// Spawns the fetch of chunk `index`. Called with the map's shard lock
    /// held; the task's removal of its entry waits for that lock, so it
    /// cannot run before the entry is inserted.
    ///
    /// A readahead fetch carries its permit, released when the fetch ends,
    /// and then lets the streams start their next fetches; its fill never
    /// hands waiters the fetch's error: they find the chunk still missing
    /// and fetch it themselves.
    pub(super) fn start_fetch(
        self: &Arc<Self>,
        index: u64,
        id: ChunkId,
        key: ChunkKey,
        readahead: Option<OwnedSemaphorePermit>,
    ) -> Fill {
        let engine = Arc::clone(self);
        let ahead = readahead.is_some();
        let task = tokio::spawn(async move {
            let fetched = {
                let done = FetchDone {
                    engine: Arc::clone(&engine),
                    index,
                };
                done.engine.fetch(index, id, key, ahead).await
            };
            // Entry gone and permit free: the streams can start the next.
            drop(readahead);
            if ahead && fetched.is_ok() {
                engine.readahead_done();
            }
            fetched
        });
        async move {
            match task.await {
                Ok(Err(_)) if ahead => Ok(()),
                Ok(fetched) => fetched,
                Err(e) => Err(EngineError::TaskFailed {
                    task: format!("fetch of chunk {index}"),
                    reason: e.to_string(),
                }),
            }
        }
        .boxed()
        .shared()
    }

    async fn fetch(
        self: &Arc<Self>,
        index: u64,
        id: ChunkId,
        key: ChunkKey,
        readahead: bool,
    ) -> Result<(), EngineError> {
        let started = Instant::now();
        let envelope = match self.store.get(&id).await {
            Ok(envelope) => envelope,
            Err(source) => {
                add(&self.counters.fetch_errors, 1);
                let error = EngineError::FetchChunk {
                    index,
                    id,
                    source: Arc::new(source),
                };
                if readahead {
                    // Speculative: a request that needs the chunk retries.
                    tracing::debug!(chunk = index, id = %id, error = %chain(&error), "readahead fetch failed");
                } else {
                    tracing::warn!(chunk = index, id = %id, error = %chain(&error), "chunk fetch failed");
                }
                return Err(error);
            }
        };
        add(&self.counters.bytes_fetched, envelope.len() as u64);
        let engine = Arc::clone(self);
        // SHA-256 and AES-GCM of a whole chunk take a few hundred
        // microseconds: off the async workers, so present chunks keep flowing.
        let filled = tokio::task::spawn_blocking(move || {
            engine.fill_from_envelope(index, &id, &key, envelope)
        })
        .await
        .unwrap_or_else(|e| {
            Err(EngineError::TaskFailed {
                task: format!("verification of chunk {index}"),
                reason: e.to_string(),
            })
        });
        match &filled {
            Ok(()) => {
                add(&self.counters.chunks_fetched, 1);
                self.counters.record_fetch_latency(started.elapsed());
            }
            // A bad chunk in the store is worth an error whoever fetched it.
            Err(error) if error.kind() == crate::error::ErrorKind::Integrity => {
                add(&self.counters.integrity_failures, 1);
                tracing::error!(chunk = index, id = %id, readahead, error = %chain(error), "fetched chunk failed verification");
            }
            Err(error) if readahead => {
                tracing::debug!(chunk = index, id = %id, error = %chain(error), "storing a chunk fetched ahead failed");
            }
            Err(error) => {
                tracing::error!(chunk = index, id = %id, error = %chain(error), "storing fetched chunk failed");
            }
        }
        filled
    }

    /// Verifies and decrypts an envelope, writes it into the cache and marks
    /// it present. Runs on a blocking thread.
    fn fill_from_envelope(
        &self,
        index: u64,
        id: &ChunkId,
        key: &ChunkKey,
        envelope: Bytes,
    ) -> Result<(), EngineError> {
        // Decrypt in the store's own buffer when no one else holds it (the
        // directory store hands out aligned, unshared buffers): no copy.
        let mut envelope = envelope
            .try_into_mut()
            .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
        let plaintext = open_chunk_in_place(id, key, &mut envelope).map_err(|source| {
            EngineError::VerifyChunk {
                index,
                source: Arc::new(source),
            }
        })?;
        let expected = self.chunk_len(index);
        if plaintext.len() != expected {
            return Err(EngineError::ChunkLength {
                index,
                id: *id,
                expected,
                actual: plaintext.len(),
            });
        }
        self.cache
            .write_at(plaintext, index * self.chunk_size())
            .map_err(|source| EngineError::FillCache {
                index,
                source: Arc::new(source),
            })?;
        self.cache.mark_present(index);
        Ok(())
    }
}

/// An error and its causes on one line, for logs.
pub(super) fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
