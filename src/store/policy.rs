//! Eviction policies for the byte-bounded caches: the host chunk cache, the
//! chunk server's read-through cache and a cache fleet node's shards.
//!
//! A policy only orders keys; the cache that owns the bytes asks it for
//! victims until what it holds fits. Weights are bytes, so a policy bounds
//! bytes, not entries.
//!
//! Two policies sit side by side so they can be compared on the same trace
//! (`cargo bench --bench eviction`): [`Lru`], and [`S3Fifo`], which is
//! scan-resistant. [`DefaultPolicy`] is the one every cache uses; see
//! docs/DESIGN.md for why.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;

/// What a cache key must be.
pub trait CacheKey: Clone + Eq + Hash + Send + Debug + 'static {}
impl<K: Clone + Eq + Hash + Send + Debug + 'static> CacheKey for K {}

/// An order in which to give up cached entries.
pub trait EvictionPolicy<K: CacheKey>: Send + Debug {
    /// A read of `key`; whether the policy tracks it.
    fn touch(&mut self, key: &K) -> bool;
    /// Starts tracking `key`, which weighs `weight` bytes. A key already
    /// tracked counts as a read.
    fn insert(&mut self, key: K, weight: u64);
    /// Stops tracking `key` (removed by someone else); its weight if tracked.
    fn remove(&mut self, key: &K) -> Option<u64>;
    /// The next victim, no longer tracked, with its weight.
    fn evict(&mut self) -> Option<(K, u64)>;
    /// Bytes tracked.
    fn weight(&self) -> u64;
    /// Entries tracked.
    fn len(&self) -> usize;
    fn contains(&self, key: &K) -> bool;
    /// Every tracked key and weight, roughly the next victims first.
    fn entries(&self) -> Vec<(K, u64)>;

    /// Whether the policy would keep `key` through a burst of new keys (it
    /// was read again since it came in): what a replay must restore.
    fn is_protected(&self, _key: &K) -> bool {
        false
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evicts until at most `capacity` bytes are tracked; the victims.
    fn evict_to(&mut self, capacity: u64) -> Vec<(K, u64)> {
        let mut victims = Vec::new();
        while self.weight() > capacity {
            match self.evict() {
                Some(victim) => victims.push(victim),
                None => break,
            }
        }
        victims
    }
}

/// The policy the caches use.
pub type DefaultPolicy<K> = S3Fifo<K>;

/// The caches' policy for a cache of `capacity` bytes.
pub fn default_policy<K: CacheKey>(capacity: u64) -> DefaultPolicy<K> {
    S3Fifo::new(capacity)
}

/// Least recently used: every read moves a key to the back of the line.
#[derive(Debug)]
pub struct Lru<K> {
    /// key → (position in `order`, weight)
    entries: HashMap<K, (u64, u64)>,
    order: BTreeMap<u64, K>,
    next: u64,
    weight: u64,
}

impl<K: CacheKey> Lru<K> {
    pub fn new() -> Lru<K> {
        Lru {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            weight: 0,
        }
    }
}

impl<K: CacheKey> Default for Lru<K> {
    fn default() -> Self {
        Lru::new()
    }
}

impl<K: CacheKey> EvictionPolicy<K> for Lru<K> {
    fn touch(&mut self, key: &K) -> bool {
        let Some((position, _)) = self.entries.get_mut(key) else {
            return false;
        };
        let key = self.order.remove(position).expect("positions are in order");
        *position = self.next;
        self.order.insert(self.next, key);
        self.next += 1;
        true
    }

    fn insert(&mut self, key: K, weight: u64) {
        if self.touch(&key) {
            return;
        }
        self.entries.insert(key.clone(), (self.next, weight));
        self.order.insert(self.next, key);
        self.next += 1;
        self.weight += weight;
    }

    fn remove(&mut self, key: &K) -> Option<u64> {
        let (position, weight) = self.entries.remove(key)?;
        self.order.remove(&position);
        self.weight -= weight;
        Some(weight)
    }

    fn evict(&mut self) -> Option<(K, u64)> {
        let (_, key) = self.order.pop_first()?;
        let (_, weight) = self.entries.remove(&key).expect("ordered keys are tracked");
        self.weight -= weight;
        Some((key, weight))
    }

    fn weight(&self) -> u64 {
        self.weight
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    fn entries(&self) -> Vec<(K, u64)> {
        self.order
            .values()
            .map(|key| (key.clone(), self.entries[key].1))
            .collect()
    }
}

/// S3-FIFO (Yang et al., SOSP '23), weighted by bytes: new keys enter a
/// small FIFO (a tenth of the capacity); those read again before they reach
/// its end move to the main FIFO, the rest leave and are remembered in a
/// ghost FIFO of keys only. A key inserted while remembered goes straight to
/// main. Main gives each key leaving it one more lap per read (up to 3).
///
/// A one-pass scan, or a herd of starts of an image nobody runs again,
/// passes through the small FIFO and leaves without pushing out the
/// working set that lives in main.
#[derive(Debug)]
pub struct S3Fifo<K> {
    capacity: u64,
    entries: HashMap<K, Entry>,
    /// Keys in insertion order with the stamp they were queued with: a key
    /// removed, or queued again, leaves a stale slot that is skipped.
    small: VecDeque<(K, u64)>,
    main: VecDeque<(K, u64)>,
    small_weight: u64,
    main_weight: u64,
    ghost: VecDeque<(K, u64)>,
    /// Remembered key → (stamp, weight).
    ghost_entries: HashMap<K, (u64, u64)>,
    ghost_weight: u64,
    next_stamp: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    weight: u64,
    stamp: u64,
    in_main: bool,
    reads: u8,
}

const MAX_READS: u8 = 3;

impl<K: CacheKey> S3Fifo<K> {
    pub fn new(capacity: u64) -> S3Fifo<K> {
        S3Fifo {
            capacity,
            entries: HashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_weight: 0,
            main_weight: 0,
            ghost: VecDeque::new(),
            ghost_entries: HashMap::new(),
            ghost_weight: 0,
            next_stamp: 0,
        }
    }

    fn small_target(&self) -> u64 {
        self.capacity / 10
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    fn enqueue(&mut self, key: K, weight: u64, in_main: bool, reads: u8) {
        let stamp = self.stamp();
        let queue = if in_main {
            self.main_weight += weight;
            &mut self.main
        } else {
            self.small_weight += weight;
            &mut self.small
        };
        queue.push_back((key.clone(), stamp));
        self.entries.insert(
            key,
            Entry {
                weight,
                stamp,
                in_main,
                reads,
            },
        );
        self.drop_stale_slots();
    }

    /// The oldest live key of one queue, taken out of it (and of `entries`).
    fn pop_live(&mut self, from_main: bool) -> Option<(K, Entry)> {
        loop {
            let queue = if from_main {
                &mut self.main
            } else {
                &mut self.small
            };
            let (key, stamp) = queue.pop_front()?;
            match self.entries.get(&key) {
                Some(entry) if entry.stamp == stamp && entry.in_main == from_main => {
                    let entry = self.entries.remove(&key).expect("just seen");
                    if from_main {
                        self.main_weight -= entry.weight;
                    } else {
                        self.small_weight -= entry.weight;
                    }
                    return Some((key, entry));
                }
                _ => continue,
            }
        }
    }

    fn remember(&mut self, key: K, weight: u64) {
        let stamp = self.stamp();
        self.ghost.push_back((key.clone(), stamp));
        if let Some((_, old)) = self.ghost_entries.insert(key, (stamp, weight)) {
            self.ghost_weight -= old;
        }
        self.ghost_weight += weight;
        // The ghost remembers about as many bytes as main holds.
        while self.ghost_weight > self.capacity {
            let Some((key, stamp)) = self.ghost.pop_front() else {
                break;
            };
            if let Some(&(current, weight)) = self.ghost_entries.get(&key) {
                if current == stamp {
                    self.ghost_entries.remove(&key);
                    self.ghost_weight -= weight;
                }
            }
        }
    }

    fn forget(&mut self, key: &K) -> bool {
        match self.ghost_entries.remove(key) {
            Some((_, weight)) => {
                self.ghost_weight -= weight;
                true
            }
            None => false,
        }
    }

    /// Rebuilds the queues when stale slots outnumber live ones, so memory
    /// follows what is tracked, not how often keys were removed.
    fn drop_stale_slots(&mut self) {
        let live = self.entries.len();
        if self.small.len() + self.main.len() <= 2 * live + 1024 {
            return;
        }
        let entries = &self.entries;
        let keep = |(key, stamp): &(K, u64), main: bool| {
            entries
                .get(key)
                .is_some_and(|e| e.stamp == *stamp && e.in_main == main)
        };
        self.small.retain(|slot| keep(slot, false));
        self.main.retain(|slot| keep(slot, true));
        let ghosts = &self.ghost_entries;
        self.ghost
            .retain(|(key, stamp)| ghosts.get(key).is_some_and(|(s, _)| s == stamp));
    }
}

impl<K: CacheKey> EvictionPolicy<K> for S3Fifo<K> {
    fn touch(&mut self, key: &K) -> bool {
        match self.entries.get_mut(key) {
            Some(entry) => {
                entry.reads = (entry.reads + 1).min(MAX_READS);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, key: K, weight: u64) {
        if self.touch(&key) {
            return;
        }
        let seen_before = self.forget(&key);
        self.enqueue(key, weight, seen_before, 0);
    }

    fn remove(&mut self, key: &K) -> Option<u64> {
        self.forget(key);
        let entry = self.entries.remove(key)?;
        if entry.in_main {
            self.main_weight -= entry.weight;
        } else {
            self.small_weight -= entry.weight;
        }
        Some(entry.weight)
    }

    fn is_protected(&self, key: &K) -> bool {
        self.entries
            .get(key)
            .is_some_and(|e| e.in_main || e.reads > 0)
    }

    fn evict(&mut self) -> Option<(K, u64)> {
        loop {
            let from_small = self.small_weight > 0
                && (self.small_weight > self.small_target() || self.main_weight == 0);
            if from_small {
                let (key, entry) = self.pop_live(false)?;
                if entry.reads > 0 {
                    self.enqueue(key, entry.weight, true, 0);
                    continue;
                }
                self.remember(key.clone(), entry.weight);
                return Some((key, entry.weight));
            }
            let (key, entry) = self.pop_live(true)?;
            if entry.reads > 0 {
                self.enqueue(key, entry.weight, true, entry.reads - 1);
                continue;
            }
            return Some((key, entry.weight));
        }
    }

    fn weight(&self) -> u64 {
        self.small_weight + self.main_weight
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    fn entries(&self) -> Vec<(K, u64)> {
        let live = |main: bool| {
            let entries = &self.entries;
            move |(key, stamp): &(K, u64)| {
                entries
                    .get(key)
                    .filter(|e| e.stamp == *stamp && e.in_main == main)
                    .map(|e| (key.clone(), e.weight))
            }
        };
        self.small
            .iter()
            .filter_map(live(false))
            .chain(self.main.iter().filter_map(live(true)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bounded(policy: &mut dyn EvictionPolicy<u32>) {
        for key in 0..1000u32 {
            policy.insert(key, 10 + u64::from(key % 7));
            let victims = policy.evict_to(1000);
            for (victim, _) in &victims {
                assert!(!policy.contains(victim));
            }
            assert!(policy.weight() <= 1000);
        }
        let entries = policy.entries();
        assert_eq!(entries.len(), policy.len());
        assert_eq!(entries.iter().map(|e| e.1).sum::<u64>(), policy.weight());
        let tracked = entries[0].0;
        let weight = policy.remove(&tracked).unwrap();
        assert_eq!(
            policy.entries().iter().map(|e| e.1).sum::<u64>(),
            policy.weight()
        );
        assert!(policy.remove(&tracked).is_none());
        assert!(weight >= 10);
        while policy.evict().is_some() {}
        assert_eq!((policy.weight(), policy.len()), (0, 0));
    }

    #[test]
    fn both_policies_stay_within_their_bytes_and_account_exactly() {
        check_bounded(&mut Lru::new());
        check_bounded(&mut S3Fifo::new(1000));
    }

    #[test]
    fn lru_evicts_the_least_recently_read() {
        let mut lru = Lru::new();
        for key in 0..3u32 {
            lru.insert(key, 1);
        }
        lru.touch(&0);
        assert_eq!(lru.evict(), Some((1, 1)));
        assert_eq!(lru.evict(), Some((2, 1)));
        assert_eq!(lru.evict(), Some((0, 1)));
    }

    #[test]
    fn s3fifo_keeps_a_read_working_set_through_a_scan_that_lru_loses() {
        let (mut lru, mut fifo) = (Lru::new(), S3Fifo::new(100));
        let policies: [&mut dyn EvictionPolicy<u32>; 2] = [&mut lru, &mut fifo];
        let mut kept = Vec::new();
        for policy in policies {
            // A working set of 50 read twice, then a scan of 1000 once.
            for key in 0..50 {
                policy.insert(key, 1);
                policy.evict_to(100);
            }
            for key in 0..50 {
                policy.touch(&key);
            }
            for key in 1000..2000 {
                policy.insert(key, 1);
                policy.evict_to(100);
            }
            kept.push((0..50).filter(|k| policy.contains(k)).count());
        }
        assert_eq!(kept, [0, 50]);
    }

    #[test]
    fn s3fifo_admits_a_key_seen_recently_straight_to_main() {
        let mut fifo = S3Fifo::new(100);
        fifo.insert(7u32, 5);
        // Enough to push 7 out of small, too few to push it out of the ghost.
        for key in 100..125 {
            fifo.insert(key, 5);
            fifo.evict_to(100);
        }
        assert!(!fifo.contains(&7));
        fifo.insert(7, 5);
        assert!(fifo.entries[&7].in_main);
    }
}
