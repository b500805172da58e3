//! The chunk server's read-through cache (`lazyblk serve --origin`): hits
//! from memory, then from disk, and misses fetched from the origin once
//! however many clients ask at the same moment.
//!
//! Memory is a [`BoundedCache`] of a small share of the size; disk is a
//! [`HostCache`], so the server's cache survives restarts and evicts by the
//! same policy. Every envelope is checked against its id before it is kept
//! or served, whichever layer it came from. Writes, `missing`, listings and
//! manifests go to the origin, the store of record (as in
//! [`TieredStore`](super::TieredStore)).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::OnceCell;

use super::bounded::BoundedCache;
use super::tiered::{BackgroundFills, TierStats};
use super::{ChunkStore, HostCache, ListedChunk, StoreError, TierSnapshot};
use crate::chunk::{verify_envelope_off_runtime, ChunkError, ChunkId};

/// Memory's share of the cache size, and its most.
const MEMORY_SHARE: u64 = 8;
const MEMORY_MAX: u64 = 2 << 30;

/// What one fetch from the origin gave every reader waiting on it.
type Flight = Arc<OnceCell<Result<Bytes, Arc<StoreError>>>>;

/// An origin behind a memory and a disk cache.
#[derive(Debug)]
pub struct ReadThrough {
    memory: BoundedCache<ChunkId>,
    disk: HostCache,
    origin: Arc<dyn ChunkStore>,
    flights: Mutex<HashMap<ChunkId, Flight>>,
    disk_fills: BackgroundFills,
    /// memory, disk, origin.
    stats: [Arc<TierStats>; 3],
}

impl ReadThrough {
    /// Caches `origin` in `cache_dir`, keeping at most `size` bytes on disk
    /// and an eighth of it (up to 2 GiB) in memory.
    pub fn open(
        origin: Arc<dyn ChunkStore>,
        cache_dir: &Path,
        size: u64,
    ) -> Result<ReadThrough, StoreError> {
        let disk = HostCache::open(cache_dir, size)?;
        let memory = BoundedCache::new((size / MEMORY_SHARE).min(MEMORY_MAX));
        let stats = [
            Arc::new(TierStats::new("memory".into())),
            Arc::new(TierStats::new(disk.describe())),
            Arc::new(TierStats::new(origin.describe())),
        ];
        Ok(ReadThrough {
            memory,
            disk,
            origin,
            flights: Mutex::new(HashMap::new()),
            disk_fills: BackgroundFills::new(),
            stats,
        })
    }

    /// From disk, if there and sound; a corrupt copy is removed.
    async fn read_disk(&self, id: &ChunkId) -> Option<Bytes> {
        let started = Instant::now();
        let stats = &self.stats[1];
        match self.disk.get(id).await {
            Ok(envelope) => match verify_envelope_off_runtime(id, &envelope).await {
                Ok(()) => {
                    stats.hit(envelope.len(), started.elapsed());
                    Some(envelope)
                }
                Err(e) => {
                    stats.integrity_failure();
                    tracing::warn!(id = %id, error = %e, "corrupt chunk in the cache passed over");
                    if let Err(e) = self.disk.delete(id).await {
                        tracing::warn!(id = %id, error = %crate::error::chain(&e), "cannot remove a corrupt chunk");
                    }
                    None
                }
            },
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => {
                stats.miss();
                None
            }
            Err(e) => {
                stats.error();
                tracing::warn!(id = %id, error = %crate::error::chain(&e), "cache read failed");
                None
            }
        }
    }

    /// The one fetch from the origin of a flight: verified, then kept in
    /// memory at once and on disk in the background.
    async fn fetch_origin(&self, id: &ChunkId) -> Result<Bytes, Arc<StoreError>> {
        // A flight that ended while this reader looked at memory and disk
        // left the chunk in memory.
        if let Some(envelope) = self.memory.get(id) {
            return Ok(envelope);
        }
        let started = Instant::now();
        let stats = &self.stats[2];
        let envelope = self.origin.get(id).await.map_err(|e| {
            match e.kind() {
                crate::error::ErrorKind::NotFound => stats.miss(),
                _ => stats.error(),
            }
            Arc::new(e)
        })?;
        if let Err(source) = verify_envelope_off_runtime(id, &envelope).await {
            stats.integrity_failure();
            tracing::warn!(id = %id, error = %source, "corrupt chunk from the origin refused");
            return Err(Arc::new(StoreError::CorruptChunk {
                store: self.origin.describe(),
                id: *id,
                source: Box::new(source),
            }));
        }
        stats.hit(envelope.len(), started.elapsed());
        self.memory.insert(*id, envelope.clone());
        let (disk, id, kept) = (self.disk.clone(), *id, envelope.clone());
        self.disk_fills
            .spawn(&self.stats[1], id, async move { disk.put(&id, kept).await });
        Ok(envelope)
    }
}

/// A caller's own copy of the error its flight ended with.
fn own_error(error: &StoreError) -> StoreError {
    let copy_io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
    match error {
        StoreError::ChunkNotFound { store, id } => StoreError::ChunkNotFound {
            store: store.clone(),
            id: *id,
        },
        StoreError::Unavailable {
            op,
            store,
            object,
            source,
        } => StoreError::Unavailable {
            op,
            store: store.clone(),
            object: object.clone(),
            source: copy_io(source),
        },
        StoreError::CorruptChunk { store, id, source } => {
            let source = match **source {
                ChunkError::IdMismatch { expected, actual } => {
                    ChunkError::IdMismatch { expected, actual }
                }
                // Only the id check runs here.
                _ => ChunkError::IdMismatch {
                    expected: *id,
                    actual: ChunkId([0; 32]),
                },
            };
            StoreError::CorruptChunk {
                store: store.clone(),
                id: *id,
                source: Box::new(source),
            }
        }
        other => StoreError::Io {
            op: "get",
            store: String::new(),
            object: "chunk".into(),
            source: io::Error::other(crate::error::chain(other)),
        },
    }
}

#[async_trait]
impl ChunkStore for ReadThrough {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        let started = Instant::now();
        if let Some(envelope) = self.memory.get(id) {
            self.stats[0].hit(envelope.len(), started.elapsed());
            return Ok(envelope);
        }
        self.stats[0].miss();
        if let Some(envelope) = self.read_disk(id).await {
            self.memory.insert(*id, envelope.clone());
            return Ok(envelope);
        }
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(*id).or_default().clone()
        };
        // A reader that goes away mid-fetch hands the fetch to the next
        // waiter (OnceCell runs the next one's init).
        let outcome = flight.get_or_init(|| self.fetch_origin(id)).await.clone();
        {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            if flights.get(id).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(id);
            }
        }
        outcome.map_err(|e| own_error(&e))
    }

    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        self.origin.put(id, envelope).await
    }

    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        self.origin.missing(ids).await
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        self.origin.list().await
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        self.memory.remove(id);
        self.origin.delete(id).await
    }

    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        self.origin.delete_if_older(id, cutoff).await
    }

    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        self.origin.put_manifest(name, manifest).await
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        self.origin.get_manifest(name).await
    }

    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        self.origin.delete_manifest(name).await
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        self.origin.list_manifests().await
    }

    fn describe(&self) -> String {
        format!(
            "{} cached in {}",
            self.origin.describe(),
            self.disk.describe()
        )
    }

    fn tier_stats(&self) -> Vec<TierSnapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::testing::MemStore;

    fn chunk(n: u8) -> (ChunkId, Bytes) {
        let envelope = Bytes::from(vec![n; 4096]);
        (ChunkId::of_envelope(&envelope), envelope)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_fetch_once_then_hit_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Arc::new(MemStore::default());
        let (id, envelope) = chunk(1);
        origin.put(&id, envelope.clone()).await.unwrap();
        origin.set_delay(Some(Duration::from_millis(100)));
        let cache = Arc::new(ReadThrough::open(origin.clone(), dir.path(), 1 << 20).unwrap());
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&id).await.unwrap() })
            })
            .collect();
        for reader in readers {
            assert_eq!(reader.await.unwrap(), envelope);
        }
        assert_eq!(origin.gets(), 1);
        assert_eq!(cache.get(&id).await.unwrap(), envelope);
        let stats = cache.tier_stats();
        assert_eq!((stats[0].hits, stats[2].hits), (1, 1));

        // A new server on the same directory has it on disk.
        for _ in 0..100 {
            if cache.disk.weight() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reopened = ReadThrough::open(origin.clone(), dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.get(&id).await.unwrap(), envelope);
        assert_eq!(reopened.tier_stats()[1].hits, 1);
        assert_eq!(origin.gets(), 1);
    }

    #[tokio::test]
    async fn errors_reach_every_waiter_and_corrupt_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Arc::new(MemStore::default());
        let cache = ReadThrough::open(origin.clone(), dir.path(), 1 << 20).unwrap();
        let (id, envelope) = chunk(2);
        let err = cache.get(&id).await.unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::NotFound);
        origin.put(&id, envelope).await.unwrap();
        origin.set_corrupt(id, true);
        let err = cache.get(&id).await.unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Integrity);
        assert_eq!(cache.tier_stats()[2].integrity_failures, 1);
        origin.set_transient(id, 1);
        let err = cache.get(&id).await.unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Transient);
        // Nothing bad was kept: the next read goes to the origin again.
        origin.set_corrupt(id, false);
        assert!(cache.get(&id).await.is_ok());
    }
}
