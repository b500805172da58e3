//! The tier hit table (host cache / fleet / origin) on a replay of many
//! starts: each start of a workload reads that workload's chunks on a host
//! picked at random; every host has its own host cache, all hosts share one
//! fleet, both evict with the caches' own policy
//! ([`default_policy`]), and a read goes the way the tiered store sends
//! it: host cache, then fleet, then origin, filling the tiers above the one
//! that answered.
//!
//! A workload's chunks are a model, not a recording: the measured fraction
//! of the image it reads, taken as that share of its chunks whose ids hash
//! lowest. A chunk shared by two images (the same id) is thus read by
//! both, as a shared library would be.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{percent, Image};
use crate::chunk::ChunkId;
use crate::store::policy::{default_policy, DefaultPolicy, EvictionPolicy};

/// The replay's shape.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub starts: usize,
    pub hosts: usize,
    pub host_cache_bytes: u64,
    pub fleet_bytes: u64,
    /// The weight of one chunk in the caches.
    pub chunk_bytes: u64,
    pub seed: u64,
}

/// Reads served by each tier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TierTable {
    pub host: u64,
    pub fleet: u64,
    pub origin: u64,
}

impl TierTable {
    pub fn reads(&self) -> u64 {
        self.host + self.fleet + self.origin
    }

    /// Host cache, fleet and origin shares, in percent.
    pub fn percents(&self) -> [f64; 3] {
        let reads = self.reads();
        [self.host, self.fleet, self.origin].map(|n| percent(n, reads))
    }
}

/// The chunks a start of `image` reads when it reads `fraction` of them:
/// of its distinct stored chunks, that fraction (rounded, and at least one
/// when the fraction is not zero) whose ids hash lowest, in image order.
/// Taking the lowest rather than those below a threshold keeps a small
/// image's set from coming out empty by chance.
pub fn read_set(image: &Image, fraction: f64) -> Vec<ChunkId> {
    let position = |id: &ChunkId| u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
    let mut seen = HashSet::new();
    let distinct: Vec<ChunkId> = image
        .chunk_ids
        .iter()
        .flatten()
        .filter(|id| seen.insert(**id))
        .copied()
        .collect();
    let fraction = fraction.clamp(0.0, 1.0);
    let count = ((fraction * distinct.len() as f64).round() as usize)
        .max(usize::from(fraction > 0.0))
        .min(distinct.len());
    let mut by_position: Vec<u64> = distinct.iter().map(position).collect();
    by_position.sort_unstable();
    let Some(&cut) = count.checked_sub(1).and_then(|last| by_position.get(last)) else {
        return Vec::new();
    };
    distinct
        .into_iter()
        .filter(|id| position(id) <= cut)
        .collect()
}

/// A byte-bounded cache of chunk ids under the caches' policy.
struct Cache {
    policy: DefaultPolicy<ChunkId>,
    capacity: u64,
}

impl Cache {
    fn new(capacity: u64) -> Cache {
        Cache {
            policy: default_policy(capacity),
            capacity,
        }
    }

    fn fill(&mut self, id: ChunkId, weight: u64) {
        self.policy.insert(id, weight);
        self.policy.evict_to(self.capacity);
    }
}

/// Replays `options.starts` starts of the workloads (each a read set),
/// picked with Zipf popularity in the order given (the first most
/// popular), and counts where each read was served.
pub fn replay(workloads: &[Vec<ChunkId>], options: &ReplayOptions) -> TierTable {
    let mut table = TierTable::default();
    if workloads.is_empty() || options.hosts == 0 {
        return table;
    }
    let mut rng = StdRng::seed_from_u64(options.seed);
    let cumulative: Vec<f64> = (1..=workloads.len())
        .scan(0.0, |sum, rank| {
            *sum += 1.0 / rank as f64;
            Some(*sum)
        })
        .collect();
    let total = cumulative[cumulative.len() - 1];
    let mut hosts: Vec<Cache> = (0..options.hosts)
        .map(|_| Cache::new(options.host_cache_bytes))
        .collect();
    let mut fleet = Cache::new(options.fleet_bytes);
    let weight = options.chunk_bytes;
    for _ in 0..options.starts {
        let x = rng.gen::<f64>() * total;
        let workload = &workloads[cumulative
            .partition_point(|&c| c < x)
            .min(workloads.len() - 1)];
        let host = &mut hosts[rng.gen_range(0..options.hosts)];
        for &id in workload {
            if host.policy.touch(&id) {
                table.host += 1;
            } else if fleet.policy.touch(&id) {
                host.fill(id, weight);
                table.fleet += 1;
            } else {
                fleet.fill(id, weight);
                host.fill(id, weight);
                table.origin += 1;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(ids: impl Iterator<Item = u8>) -> Image {
        Image {
            name: "i".into(),
            chunk_ids: ids.map(|n| Some(ChunkId([n; 32]))).collect(),
        }
    }

    fn options(starts: usize, hosts: usize, host_chunks: u64, fleet_chunks: u64) -> ReplayOptions {
        ReplayOptions {
            starts,
            hosts,
            host_cache_bytes: host_chunks * 10,
            fleet_bytes: fleet_chunks * 10,
            chunk_bytes: 10,
            seed: 1,
        }
    }

    #[test]
    fn the_read_set_takes_the_lowest_ids_once_each() {
        // First id bytes 0, 64, 128, 192, and 64 again.
        let image = image([0u8, 64, 128, 192, 64].into_iter());
        assert_eq!(read_set(&image, 0.0).len(), 0);
        assert_eq!(
            read_set(&image, 0.5),
            vec![ChunkId([0; 32]), ChunkId([64; 32])]
        );
        assert_eq!(read_set(&image, 1.0).len(), 4);
    }

    #[test]
    fn one_host_reads_from_the_origin_once_then_from_its_cache() {
        let set: Vec<ChunkId> = (1..=10).map(|n| ChunkId([n; 32])).collect();
        let table = replay(&[set], &options(5, 1, 100, 100));
        assert_eq!(
            table,
            TierTable {
                host: 40,
                fleet: 0,
                origin: 10
            }
        );
        assert_eq!(table.percents(), [80.0, 0.0, 20.0]);
    }

    #[test]
    fn a_second_host_gets_from_the_fleet_what_the_first_fetched() {
        let set: Vec<ChunkId> = (1..=10).map(|n| ChunkId([n; 32])).collect();
        let table = replay(&[set], &options(200, 2, 100, 100));
        // Each chunk comes from the origin once and into the other host
        // from the fleet once; every other read is a host hit.
        assert_eq!(table.origin, 10);
        assert_eq!(table.fleet, 10);
        assert_eq!(table.host, 2000 - 20);
    }

    #[test]
    fn caches_too_small_for_a_start_send_reads_down() {
        let set: Vec<ChunkId> = (1..=10).map(|n| ChunkId([n; 32])).collect();
        let table = replay(&[set], &options(3, 1, 2, 2));
        assert_eq!(table.reads(), 30);
        assert!(table.origin > 10, "{table:?}");
    }
}
