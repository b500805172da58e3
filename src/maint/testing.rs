//! Test helpers for store upkeep: images pushed into a memory store.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::chunk::{seal_chunk, ChunkId, Manifest, ManifestEntry, Salt, TenantKey};
use crate::engine::testing::MemStore;
use crate::store::ChunkStore;

pub(crate) const CHUNK: u32 = 64 * 1024;
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

/// Stores one chunk per seed (its plaintext the seed repeated) and a
/// manifest `name` naming them, then returns their ids.
pub(crate) async fn put_image(store: &MemStore, name: &str, seeds: &[u8]) -> Vec<ChunkId> {
    let salt = Salt([3; 32]);
    let mut entries = Vec::new();
    let mut ids = Vec::new();
    for &seed in seeds {
        let sealed = seal_chunk(&salt, &vec![seed; CHUNK as usize]);
        store
            .put(&sealed.id, Bytes::from(sealed.envelope))
            .await
            .unwrap();
        ids.push(sealed.id);
        entries.push(ManifestEntry::Chunk {
            id: sealed.id,
            key: sealed.key,
        });
    }
    entries.push(ManifestEntry::Zero);
    let manifest = Manifest {
        image_size: u64::from(CHUNK) * entries.len() as u64,
        chunk_size: CHUNK,
        salt_domain: "test".into(),
        source_digest: [0; 32],
        entries,
    };
    let sealed = manifest.seal(&TenantKey([4; 32]));
    store.put_manifest(name, Bytes::from(sealed)).await.unwrap();
    ids
}

/// Makes every chunk in `store` look `age` old.
pub(crate) async fn age_all(store: &MemStore, age: Duration) {
    for chunk in store.list().await.unwrap() {
        store.set_modified(chunk.id, SystemTime::now() - age);
    }
}

pub(crate) fn no_progress(_: &'static str, _: u64, _: u64) {}
