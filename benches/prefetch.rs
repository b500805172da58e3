//! Demand reads while a trace prefetch runs: the latency a reader sees with
//! a prefetch of 10,000 chunks in flight, against the same reads on an idle
//! engine, as a ratio.
//!
//! `cargo bench --bench prefetch` serves an image from a store in memory
//! whose every get takes `LAZYBLK_BENCH_LATENCY_MS` (default 2 ms, a nearby
//! network store). The image holds `LAZYBLK_BENCH_PREFETCH_CHUNKS` (default
//! 10,000) chunks for the prefetch and 200 others that a reader then reads
//! one after another, each a miss, readahead off:
//!
//! * `idle_p50_us`, `idle_p99_us`: those reads on a fresh engine alone;
//! * `busy_p50_us`, `busy_p99_us`: the same reads on a fresh engine just
//!   after `Engine::prefetch` of the 10,000 chunks started;
//! * `p50_ratio`, `p99_ratio`: busy over idle;
//! * `prefetched_meanwhile`, `prefetch_remaining`: how far the prefetch got
//!   while the reads ran (it must still be running for the figure to mean
//!   anything).
//!
//! Chunks are 64 KiB so that 10,000 of them cost seconds, not minutes, of
//! this machine's cores. Under `cargo test` it runs a few of each once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use lazyblk::chunk::{
    manifest_digest, seal_chunk, ChunkId, Manifest, ManifestEntry, Salt, TenantKey, MIN_CHUNK_SIZE,
};
use lazyblk::engine::{Engine, EngineOptions, Request, SyncIo};
use lazyblk::store::{ChunkStore, ListedChunk, StoreError};

const CHUNK: usize = MIN_CHUNK_SIZE as usize;

/// Chunks in memory; every get waits `latency` first.
#[derive(Debug)]
struct SlowStore {
    chunks: Mutex<HashMap<ChunkId, Bytes>>,
    latency: Duration,
}

impl SlowStore {
    fn chunks(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkId, Bytes>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ChunkStore for SlowStore {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        tokio::time::sleep(self.latency).await;
        self.chunks()
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::ChunkNotFound {
                store: self.describe(),
                id: *id,
            })
    }
    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        self.chunks().insert(*id, envelope);
        Ok(())
    }
    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let chunks = self.chunks();
        Ok(ids
            .iter()
            .filter(|id| !chunks.contains_key(id))
            .copied()
            .collect())
    }
    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        Ok(self
            .chunks()
            .iter()
            .map(|(id, envelope)| ListedChunk {
                id: *id,
                modified: SystemTime::UNIX_EPOCH,
                size: envelope.len() as u64,
            })
            .collect())
    }
    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        self.chunks().remove(id);
        Ok(())
    }
    async fn delete_if_older(&self, _: &ChunkId, _: SystemTime) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn put_manifest(&self, name: &str, _: Bytes) -> Result<(), StoreError> {
        Err(StoreError::ManifestNotFound {
            store: self.describe(),
            name: name.to_owned(),
        })
    }
    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        Err(StoreError::ManifestNotFound {
            store: self.describe(),
            name: name.to_owned(),
        })
    }
    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
    async fn delete_manifest(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn describe(&self) -> String {
        format!("memory store with {:?} per get", self.latency)
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("{name}={text:?} is not a number");
            std::process::exit(2);
        }),
        Err(_) => default,
    }
}

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let (prefetch_chunks, demand_chunks) = if benchmarking {
        (
            env_number("LAZYBLK_BENCH_PREFETCH_CHUNKS", 10_000) as usize,
            200,
        )
    } else {
        (64, 4)
    };
    let latency = Duration::from_millis(env_number("LAZYBLK_BENCH_LATENCY_MS", 2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build a runtime");
    let work = tempfile::tempdir().expect("create the bench directory");

    // The prefetched chunks share one plaintext, so sealing costs nothing;
    // every one is still fetched, verified, decrypted and cached on its own.
    let salt = Salt([3; 32]);
    let store = Arc::new(SlowStore {
        chunks: Mutex::new(HashMap::new()),
        latency,
    });
    let common = seal_chunk(&salt, &vec![1u8; CHUNK]);
    let mut entries = vec![
        ManifestEntry::Chunk {
            id: common.id,
            key: common.key.clone(),
        };
        prefetch_chunks
    ];
    store
        .chunks()
        .insert(common.id, Bytes::from(common.envelope.clone()));
    for n in 0..demand_chunks {
        let mut plaintext = vec![2u8; CHUNK];
        plaintext[..8].copy_from_slice(&(n as u64).to_le_bytes());
        let sealed = seal_chunk(&salt, &plaintext);
        store
            .chunks()
            .insert(sealed.id, Bytes::from(sealed.envelope));
        entries.push(ManifestEntry::Chunk {
            id: sealed.id,
            key: sealed.key,
        });
    }
    let manifest = Manifest {
        image_size: (entries.len() * CHUNK) as u64,
        chunk_size: MIN_CHUNK_SIZE,
        salt_domain: "bench".into(),
        source_digest: [0; 32],
        entries,
    };
    let digest = manifest_digest(&manifest.seal(&TenantKey([1; 32])));
    let opts = EngineOptions {
        readahead_chunks: 0,
        ..EngineOptions::default()
    };

    let mut results = Vec::new();
    for (label, prefetch) in [("idle", false), ("busy", true)] {
        let cache = work.path().join(label);
        std::fs::create_dir(&cache).expect("create a cache directory");
        std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("make the cache directory private");
        let engine = Engine::open(
            manifest.clone(),
            digest,
            store.clone(),
            &cache,
            opts,
            runtime.handle().clone(),
        )
        .expect("open the engine");
        if prefetch {
            let planned = engine.prefetch(&[common.id]);
            assert_eq!(planned, prefetch_chunks as u64);
            // Let it fill its slots before the first read.
            std::thread::sleep(latency);
        }
        let mut micros = runtime.block_on(read_demand(&engine, prefetch_chunks, demand_chunks));
        let stats = engine.stats();
        micros.sort_unstable();
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
        results.push((label, at(0.5), at(0.99), stats));
        engine.stop_prefetch();
        drop(engine);
    }
    let (_, idle_p50, idle_p99, _) = &results[0];
    let (_, busy_p50, busy_p99, busy) = &results[1];
    println!("latency_per_get_ms={}", latency.as_millis());
    println!("prefetch_chunks={prefetch_chunks}");
    println!("demand_reads={demand_chunks}");
    println!("idle_p50_us={idle_p50}");
    println!("idle_p99_us={idle_p99}");
    println!("busy_p50_us={busy_p50}");
    println!("busy_p99_us={busy_p99}");
    println!("p50_ratio={:.2}", *busy_p50 as f64 / *idle_p50 as f64);
    println!("p99_ratio={:.2}", *busy_p99 as f64 / *idle_p99 as f64);
    println!("prefetched_meanwhile={}", busy.chunks_prefetched);
    println!("prefetch_remaining={}", busy.prefetch_remaining);
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "loadavg={}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

/// Reads the demand chunks (after the prefetched ones) one at a time and
/// returns each read's latency in microseconds.
async fn read_demand(engine: &Arc<Engine>, first: usize, count: usize) -> Vec<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut micros = Vec::with_capacity(count);
    for n in 0..count {
        let started = Instant::now();
        let read = Request::Read {
            offset: ((first + n) * CHUNK) as u64,
            buf: (&mut buf).into(),
        };
        engine.submit(&SyncIo, read).await.expect("read a chunk");
        micros.push(started.elapsed().as_micros() as u64);
        assert_eq!(buf[..8], (n as u64).to_le_bytes(), "demand chunk {n}");
    }
    micros
}
