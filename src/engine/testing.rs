//! Test helpers shared by the engine's and the frontends' unit tests: an
//! in-memory chunk store that counts, delays, blocks, fails and corrupts
//! gets on demand, and sealed test images built with the real chunk code.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use crate::cache::CacheError;
use crate::chunk::{
    is_zero, manifest_digest, seal_chunk, ChunkId, Manifest, ManifestEntry, Salt, TenantKey,
};
use crate::engine::testing_registered::RegisteredIo;
use crate::engine::{Engine, EngineError, EngineOptions, ReadBuf, Request, SyncIo, WriteBuf};
use crate::store::{ChunkStore, ListedChunk, StoreError};
use futures::future::BoxFuture;
use futures::FutureExt;

/// A chunk store in memory with knobs for misbehaving.
#[derive(Debug, Default)]
pub(crate) struct MemStore {
    chunks: Mutex<HashMap<ChunkId, Bytes>>,
    /// When each chunk was last written or refreshed.
    modified: Mutex<HashMap<ChunkId, SystemTime>>,
    manifests: Mutex<HashMap<String, Bytes>>,
    gets: AtomicU64,
    served: AtomicU64,
    gets_by_id: Mutex<HashMap<ChunkId, u64>>,
    get_order: Mutex<Vec<ChunkId>>,
    delay: Mutex<Option<Duration>>,
    corrupt: Mutex<HashSet<ChunkId>>,
    failing: Mutex<HashSet<ChunkId>>,
    transient: Mutex<HashMap<ChunkId, u64>>,
    gates: Mutex<HashMap<ChunkId, Arc<Notify>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemStore {
    /// Gets of any chunk so far.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    /// Gets that answered with an envelope (corrupt ones included).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Gets of `id` so far.
    pub fn gets_of(&self, id: &ChunkId) -> u64 {
        lock(&self.gets_by_id).get(id).copied().unwrap_or(0)
    }

    /// The ids asked for, in the order the gets started.
    pub fn get_order(&self) -> Vec<ChunkId> {
        lock(&self.get_order).clone()
    }

    /// Every get sleeps this long before answering.
    pub fn set_delay(&self, delay: Option<Duration>) {
        *lock(&self.delay) = delay;
    }

    /// Gets of `id` answer with one bit flipped while `on`.
    pub fn set_corrupt(&self, id: ChunkId, on: bool) {
        toggle(&self.corrupt, id, on);
    }

    /// Gets of `id` fail with "not found" while `on`.
    pub fn set_failing(&self, id: ChunkId, on: bool) {
        toggle(&self.failing, id, on);
    }

    /// The next `failures` gets of `id` fail with a transient error.
    pub fn set_transient(&self, id: ChunkId, failures: u64) {
        lock(&self.transient).insert(id, failures);
    }

    /// Sets chunk `id`'s modification time, as if written at `time`.
    pub fn set_modified(&self, id: ChunkId, time: SystemTime) {
        lock(&self.modified).insert(id, time);
    }

    /// Removes manifest `name`, as an operator deleting an image would.
    pub fn remove_manifest(&self, name: &str) {
        lock(&self.manifests).remove(name);
    }

    /// Gets of `id` no longer wait for a gate.
    pub fn ungate(&self, id: &ChunkId) {
        lock(&self.gates).remove(id);
    }

    /// Gets of `id` wait until the returned `Notify` is notified (once per
    /// get); never notified, they hang.
    pub fn gate(&self, id: ChunkId) -> Arc<Notify> {
        Arc::clone(lock(&self.gates).entry(id).or_default())
    }
}

fn toggle(set: &Mutex<HashSet<ChunkId>>, id: ChunkId, on: bool) {
    if on {
        lock(set).insert(id);
    } else {
        lock(set).remove(&id);
    }
}

#[async_trait]
impl ChunkStore for MemStore {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        *lock(&self.gets_by_id).entry(*id).or_default() += 1;
        lock(&self.get_order).push(*id);
        let delay = *lock(&self.delay);
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let gate = lock(&self.gates).get(id).cloned();
        if let Some(gate) = gate {
            gate.notified().await;
        }
        let not_found = || StoreError::ChunkNotFound {
            store: self.describe(),
            id: *id,
        };
        if lock(&self.failing).contains(id) {
            return Err(not_found());
        }
        if let Some(left) = lock(&self.transient).get_mut(id).filter(|n| **n > 0) {
            *left -= 1;
            return Err(StoreError::Unavailable {
                op: "get",
                store: self.describe(),
                object: id.to_string(),
                source: std::io::ErrorKind::ConnectionReset.into(),
            });
        }
        let envelope = lock(&self.chunks).get(id).cloned().ok_or_else(not_found)?;
        self.served.fetch_add(1, Ordering::SeqCst);
        if lock(&self.corrupt).contains(id) {
            let mut bad = envelope.to_vec();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x10;
            return Ok(Bytes::from(bad));
        }
        Ok(envelope)
    }

    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        let mut chunks = lock(&self.chunks);
        chunks.entry(*id).or_insert(envelope);
        lock(&self.modified).insert(*id, SystemTime::now());
        Ok(())
    }

    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let chunks = lock(&self.chunks);
        let mut modified = lock(&self.modified);
        let now = SystemTime::now();
        let mut missing = Vec::new();
        for id in ids {
            if chunks.contains_key(id) {
                modified.insert(*id, now);
            } else {
                missing.push(*id);
            }
        }
        Ok(missing)
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        let chunks = lock(&self.chunks);
        let modified = lock(&self.modified);
        Ok(chunks
            .iter()
            .map(|(id, envelope)| ListedChunk {
                id: *id,
                modified: modified.get(id).copied().unwrap_or(SystemTime::UNIX_EPOCH),
                size: envelope.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        lock(&self.chunks).remove(id);
        lock(&self.modified).remove(id);
        Ok(())
    }

    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        let mut chunks = lock(&self.chunks);
        let mut modified = lock(&self.modified);
        let old = chunks.contains_key(id) && modified.get(id).is_none_or(|time| *time < cutoff);
        if old {
            chunks.remove(id);
            modified.remove(id);
        }
        Ok(old)
    }

    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        lock(&self.manifests).insert(name.to_owned(), manifest);
        Ok(())
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        lock(&self.manifests)
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::ManifestNotFound {
                store: self.describe(),
                name: name.to_owned(),
            })
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        Ok(lock(&self.manifests).keys().cloned().collect())
    }

    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        lock(&self.manifests).remove(name);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory store".into()
    }
}

/// Awaits `future`, failing the test instead of hanging if it takes more
/// than ten seconds (a gated fetch that is never released, say).
pub(crate) async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("timed out: something waits on a fetch that will never finish")
}

/// [`Engine::open`], retrying for up to two seconds while the cache is in
/// use. The lock is an `flock`, which belongs to the open file: a test that
/// starts a child process (`acknowledged_writes_survive_sigkill`) lends the
/// child every open file between its fork and its exec, so a cache closed
/// and reopened in that window is briefly still locked.
pub(crate) fn open_engine(
    fx: &Fixture,
    dir: &Path,
    opts: EngineOptions,
) -> Result<Arc<Engine>, EngineError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let runtime = tokio::runtime::Handle::current();
        match Engine::open(
            fx.manifest.clone(),
            fx.digest,
            fx.store.clone(),
            dir,
            opts,
            runtime,
        ) {
            Err(EngineError::OpenCache { source })
                if matches!(*source, CacheError::InUse { .. }) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            opened => return opened,
        }
    }
}

/// Waits until `done` holds, failing the test after ten seconds.
pub(crate) async fn eventually(mut done: impl FnMut() -> bool) {
    within(async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

/// Waits until no fetch, readahead included, is still running. Reopening
/// a cache needs it, since a running fetch keeps the cache, and so its
/// lock, alive.
pub(crate) async fn idle(engine: &Arc<Engine>) {
    eventually(|| engine.is_idle()).await
}

/// The engine's request API in the shapes tests use most.
pub(crate) trait EngineExt {
    /// A read of `len` bytes into a fresh buffer.
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'static, Result<Vec<u8>, EngineError>>;
    fn write<'a>(&self, offset: u64, data: &'a [u8]) -> BoxFuture<'a, Result<(), EngineError>>;
    fn flush(&self) -> BoxFuture<'static, Result<(), EngineError>>;
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), EngineError>>;
    fn write_zeroes(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), EngineError>>;
    /// A read that needs no fetch, served in its first poll; `None` (and
    /// nothing started) if it would need one.
    fn try_read_now(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), EngineError>>;
    /// A read into a registered buffer ([`RegisteredIo`]), as ublk's
    /// zero-copy mode sends it.
    fn read_registered(
        &self,
        offset: u64,
        len: usize,
    ) -> BoxFuture<'static, Result<Vec<u8>, EngineError>>;
    /// A write from a registered buffer holding `data`.
    fn write_registered(
        &self,
        offset: u64,
        data: &[u8],
    ) -> BoxFuture<'static, Result<(), EngineError>>;
}

impl EngineExt for Arc<Engine> {
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'static, Result<Vec<u8>, EngineError>> {
        let engine = Arc::clone(self);
        async move {
            let mut buf = vec![0xA5; len];
            let read = Request::Read {
                offset,
                buf: (&mut buf).into(),
            };
            engine.submit(&SyncIo, read).await.map(|()| buf)
        }
        .boxed()
    }

    fn write<'a>(&self, offset: u64, data: &'a [u8]) -> BoxFuture<'a, Result<(), EngineError>> {
        let engine = Arc::clone(self);
        async move {
            engine
                .submit(
                    &SyncIo,
                    Request::Write {
                        offset,
                        data: data.into(),
                    },
                )
                .await
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), EngineError>> {
        let engine = Arc::clone(self);
        async move { engine.submit(&SyncIo, Request::Flush).await }.boxed()
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), EngineError>> {
        let engine = Arc::clone(self);
        async move {
            engine
                .submit(&SyncIo, Request::Discard { offset, len })
                .await
        }
        .boxed()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<(), EngineError>> {
        let engine = Arc::clone(self);
        async move {
            engine
                .submit(&SyncIo, Request::WriteZeroes { offset, len })
                .await
        }
        .boxed()
    }

    fn try_read_now(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), EngineError>> {
        if !self.servable_now(offset, buf.len() as u64) {
            return None;
        }
        let read = Request::Read {
            offset,
            buf: buf.into(),
        };
        self.submit(&SyncIo, read).now_or_never()
    }

    fn read_registered(
        &self,
        offset: u64,
        len: usize,
    ) -> BoxFuture<'static, Result<Vec<u8>, EngineError>> {
        let engine = Arc::clone(self);
        async move {
            let (io, fixed) = RegisteredIo::for_read(len);
            let read = Request::Read {
                offset,
                buf: ReadBuf::Fixed(fixed),
            };
            engine.submit(&io, read).await?;
            Ok(io.into_bytes())
        }
        .boxed()
    }

    fn write_registered(
        &self,
        offset: u64,
        data: &[u8],
    ) -> BoxFuture<'static, Result<(), EngineError>> {
        let engine = Arc::clone(self);
        let (io, fixed) = RegisteredIo::for_write(data);
        async move {
            let write = Request::Write {
                offset,
                data: WriteBuf::Fixed(fixed),
            };
            engine.submit(&io, write).await
        }
        .boxed()
    }
}

/// A sealed image: its manifest, the manifest's digest and a store holding
/// its chunks.
pub(crate) struct Fixture {
    pub manifest: Manifest,
    pub digest: [u8; 32],
    pub store: Arc<MemStore>,
}

impl Fixture {
    /// The id of chunk `index`; panics on a zero chunk.
    pub fn id(&self, index: usize) -> ChunkId {
        match &self.manifest.entries[index] {
            ManifestEntry::Chunk { id, .. } => *id,
            ManifestEntry::Zero => panic!("chunk {index} is a zero chunk"),
        }
    }
}

/// Cuts `image` into chunks, seals them into a fresh [`MemStore`] and
/// builds the manifest, as a push would.
pub(crate) fn seal_image(image: &[u8], chunk_size: u32) -> Fixture {
    let salt = Salt([7; 32]);
    let store = MemStore::default();
    let mut entries = Vec::new();
    for plaintext in image.chunks(chunk_size as usize) {
        if is_zero(plaintext) {
            entries.push(ManifestEntry::Zero);
            continue;
        }
        let sealed = seal_chunk(&salt, plaintext);
        lock(&store.chunks).insert(sealed.id, Bytes::from(sealed.envelope));
        entries.push(ManifestEntry::Chunk {
            id: sealed.id,
            key: sealed.key,
        });
    }
    let manifest = Manifest {
        image_size: image.len() as u64,
        chunk_size,
        salt_domain: "test".into(),
        source_digest: [0; 32],
        entries,
    };
    let digest = manifest_digest(&manifest.seal(&TenantKey([1; 32])));
    Fixture {
        manifest,
        digest,
        store: Arc::new(store),
    }
}

/// An image of `chunks` whole chunks plus `tail` bytes: a mix of random
/// chunks, all-zero chunks and repeats of earlier chunks, so zero elision
/// and deduplication are both exercised.
pub(crate) fn sample_image(chunks: usize, tail: usize, chunk_size: u32, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cs = chunk_size as usize;
    let mut image = vec![0u8; chunks * cs + tail];
    for i in 0..image.len().div_ceil(cs) {
        let start = i * cs;
        let end = (start + cs).min(image.len());
        match i % 4 {
            1 => {} // all zero
            2 => {
                // Mostly zero, with a few bytes set.
                for _ in 0..8 {
                    let at = rng.gen_range(start..end);
                    image[at] = rng.gen_range(1..=255);
                }
            }
            3 if i >= 4 && end - start == cs => {
                let (before, rest) = image.split_at_mut(start);
                rest[..cs].copy_from_slice(&before[start - 4 * cs..][..cs]);
            }
            _ => rng.fill(&mut image[start..end]),
        }
    }
    image
}

/// The chunk size engine tests use: small, so images stay small.
pub(crate) const CS: u32 = 64 * 1024;
/// [`CS`] as a length.
pub(crate) const CSU: usize = CS as usize;

/// 8 whole chunks and a short tail: chunks 1 and 5 are zero, 2 and 6 mostly
/// zero, 7 repeats 3, 8 is the short tail.
pub(crate) fn fixture() -> (Vec<u8>, Fixture) {
    let image = sample_image(8, 1000, CS, 42);
    let fx = seal_image(&image, CS);
    (image, fx)
}

#[tokio::test]
async fn mem_store_keeps_the_store_contract() {
    let store = MemStore::default();
    crate::store::contract::check_gc_contract(&store, Duration::ZERO).await;
    // Backdating makes a chunk collectable.
    let id = ChunkId::of_envelope(&[2]);
    let cutoff = SystemTime::now();
    store.set_modified(id, cutoff - Duration::from_secs(60));
    assert!(store.delete_if_older(&id, cutoff).await.unwrap());
}
