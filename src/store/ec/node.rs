//! Cache nodes: the transport seam a fleet reader talks through, and the
//! bounded shard storage a node keeps.
//!
//! [`ShardNode`] is what the fleet needs of a node: get and put one shard
//! object. [`LocalNode`] is a node in the same process (tests, and the
//! storage behind `serve`'s shard routes is the same [`ShardCache`]);
//! the HTTP node speaks to `lazyblk serve` over the shared client.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::shard::{ShardError, ShardHeader};
use crate::chunk::ChunkId;
use crate::store::bounded::BoundedCache;
use crate::store::StoreError;

/// One cache node of a fleet, as a reader and writer see it.
#[async_trait]
pub trait ShardNode: Send + Sync + std::fmt::Debug {
    /// The shard object filed under (`id`, `index`), unverified, or `None`
    /// when the node does not hold it.
    async fn get_shard(&self, id: &ChunkId, index: u8) -> Result<Option<Bytes>, StoreError>;
    /// Files a sealed shard object (see [`ShardHeader::seal`]) under
    /// (`id`, `index`), replacing what was there.
    async fn put_shard(&self, id: &ChunkId, index: u8, object: Bytes) -> Result<(), StoreError>;
    /// The node's URL: its identity for placement and in messages.
    fn url(&self) -> &str;
}

/// A node's shard objects, bounded in bytes and evicted by the caches'
/// policy ([`BoundedCache`]): shards are a cache, never the store of record.
#[derive(Debug)]
pub struct ShardCache {
    objects: BoundedCache<(ChunkId, u8)>,
}

impl ShardCache {
    pub fn new(capacity: u64) -> ShardCache {
        ShardCache {
            objects: BoundedCache::new(capacity),
        }
    }

    /// Checks `object` is a whole shard filed under its own name, then
    /// keeps it, replacing what was there (a fill repairs a bad shard).
    /// The checks are the node's: a reader checks again.
    pub fn put(&self, id: &ChunkId, index: u8, object: Bytes) -> Result<(), ShardError> {
        let (header, _) = ShardHeader::open(&object)?;
        header.expect(id, index, None)?;
        let key = (*id, index);
        if self.objects.get(&key).as_ref() != Some(&object) {
            self.objects.remove(&key);
            self.objects.insert(key, object);
        }
        Ok(())
    }

    pub fn get(&self, id: &ChunkId, index: u8) -> Option<Bytes> {
        self.objects.get(&(*id, index))
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.objects.weight()
    }
}

/// A cache node inside this process, with faults to inject: a delay on
/// every request, or the node down (every request refused).
#[derive(Debug)]
pub struct LocalNode {
    url: String,
    cache: ShardCache,
    delay_micros: AtomicU64,
    down: AtomicBool,
    gets: AtomicU64,
}

impl LocalNode {
    pub fn new(url: &str, capacity: u64) -> LocalNode {
        LocalNode {
            url: url.to_owned(),
            cache: ShardCache::new(capacity),
            delay_micros: AtomicU64::new(0),
            down: AtomicBool::new(false),
            gets: AtomicU64::new(0),
        }
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_micros
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Shard reads this node has answered or refused.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }

    pub fn cache(&self) -> &ShardCache {
        &self.cache
    }

    async fn enter(&self, op: &'static str, id: &ChunkId, index: u8) -> Result<(), StoreError> {
        let delay = self.delay_micros.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        if self.down.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable {
                op,
                store: self.url.clone(),
                object: format!("shard {id}/{index}"),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ShardNode for LocalNode {
    async fn get_shard(&self, id: &ChunkId, index: u8) -> Result<Option<Bytes>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.enter("get", id, index).await?;
        Ok(self.cache.get(id, index))
    }

    async fn put_shard(&self, id: &ChunkId, index: u8, object: Bytes) -> Result<(), StoreError> {
        self.enter("put", id, index).await?;
        self.cache
            .put(id, index, object)
            .map_err(|e| StoreError::Io {
                op: "put",
                store: self.url.clone(),
                object: format!("shard {id}/{index}"),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
    }

    fn url(&self) -> &str {
        &self.url
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ec::codec::Scheme;

    fn shard(id: u8, index: u8, len: u32) -> (ChunkId, Bytes) {
        let scheme = Scheme::DEFAULT;
        let header = ShardHeader {
            id: ChunkId([id; 32]),
            index,
            scheme,
            envelope_len: len,
        };
        let data = vec![id; scheme.shard_len(len as usize)];
        (header.id, header.seal(&data))
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let (_, one) = shard(0, 0, 4000);
        let cache = ShardCache::new(3 * one.len() as u64);
        for id in 0..5u8 {
            let (chunk, object) = shard(id, 1, 4000);
            cache.put(&chunk, 1, object).unwrap();
            assert!(cache.bytes() <= 3 * one.len() as u64);
        }
        let held = (0..5u8)
            .filter(|id| cache.get(&ChunkId([*id; 32]), 1).is_some())
            .count();
        assert!((1..=3).contains(&held), "{held}");
        assert!(cache.get(&ChunkId([4; 32]), 1).is_some());
    }

    #[test]
    fn the_cache_refuses_a_shard_under_another_name_or_cut_short() {
        let cache = ShardCache::new(1 << 20);
        let (chunk, object) = shard(1, 2, 4000);
        assert!(matches!(
            cache.put(&chunk, 3, object.clone()),
            Err(ShardError::Mismatch { .. })
        ));
        assert!(cache
            .put(&chunk, 2, object.slice(..object.len() - 1))
            .is_err());
        assert_eq!(cache.bytes(), 0);
        cache.put(&chunk, 2, object).unwrap();
        assert!(cache.get(&chunk, 2).is_some());
    }
}
