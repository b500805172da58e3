//! A byte-bounded map of shared buffers in memory, evicting by the caches'
//! [`DefaultPolicy`]: the memory layer of the chunk server's read-through
//! cache, and any other holder of immutable blobs by key.
//!
//! One mutex guards the map and the policy: a hit costs a hash lookup and a
//! reference count, far less than the 512 KiB copy any reader makes next.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use super::policy::{default_policy, CacheKey, DefaultPolicy, EvictionPolicy};

/// Immutable values by key, at most `capacity` bytes of them.
#[derive(Debug)]
pub struct BoundedCache<K: CacheKey> {
    capacity: u64,
    inner: Mutex<Inner<K>>,
}

#[derive(Debug)]
struct Inner<K: CacheKey> {
    values: HashMap<K, Bytes>,
    policy: DefaultPolicy<K>,
}

impl<K: CacheKey> BoundedCache<K> {
    pub fn new(capacity: u64) -> BoundedCache<K> {
        BoundedCache {
            capacity,
            inner: Mutex::new(Inner {
                values: HashMap::new(),
                policy: default_policy(capacity),
            }),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The value under `key`, counted as a read.
    pub fn get(&self, key: &K) -> Option<Bytes> {
        let mut inner = self.lock();
        let value = inner.values.get(key)?.clone();
        inner.policy.touch(key);
        Some(value)
    }

    /// Keeps `value` under `key`, evicting what the policy picks until the
    /// cache fits. A value larger than the whole cache is not kept.
    pub fn insert(&self, key: K, value: Bytes) {
        let weight = value.len() as u64;
        if weight > self.capacity {
            return;
        }
        let mut inner = self.lock();
        if inner.values.contains_key(&key) {
            inner.policy.touch(&key);
            return;
        }
        inner.values.insert(key.clone(), value);
        inner.policy.insert(key, weight);
        for (victim, _) in inner.policy.evict_to(self.capacity) {
            inner.values.remove(&victim);
        }
    }

    pub fn remove(&self, key: &K) -> Option<Bytes> {
        let mut inner = self.lock();
        inner.policy.remove(key);
        inner.values.remove(key)
    }

    /// Bytes held.
    pub fn weight(&self) -> u64 {
        self.lock().policy.weight()
    }

    pub fn len(&self) -> usize {
        self.lock().values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K>> {
        // The map and policy are updated together under the lock and never
        // left half-changed by a panic of ours, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_capacity_and_keeps_what_is_read() {
        let cache = BoundedCache::new(1000);
        cache.insert(0u32, Bytes::from(vec![0; 100]));
        cache.get(&0).unwrap();
        for key in 1..100 {
            cache.insert(key, Bytes::from(vec![1; 100]));
            assert!(cache.weight() <= 1000);
        }
        assert_eq!(cache.get(&0).unwrap().len(), 100);
        assert_eq!(cache.len(), 10);
        cache.insert(500, Bytes::from(vec![2; 1001]));
        assert!(cache.get(&500).is_none());
        assert_eq!(cache.remove(&0).unwrap().len(), 100);
        assert_eq!(cache.weight(), 900);
    }
}
