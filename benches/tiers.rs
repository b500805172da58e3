//! The paper's tier table on a replayed workload: the share of chunk reads
//! served by the host cache, the cache fleet and the origin.
//!
//! `cargo bench --bench tiers` replays the synthetic trace of
//! benches/common (the region's image starts, in time order) over
//! `LAZYBLK_BENCH_HOSTS` simulated hosts (default 8): each start runs on a
//! host picked at random (seeded). Each host has its own host cache, all
//! hosts share one fleet cache, and both evict with the policy the real
//! caches use ([`default_policy`], S3-FIFO), bounded in bytes. A read goes
//! the way `TieredStore` sends it: the host cache, then the fleet, then the
//! origin, and fills every tier above the one that answered.
//!
//! This is a replay of a synthetic trace through the real eviction
//! policies, not a measurement of a production fleet: it shows how the
//! tiers split reads for this trace and these cache sizes. Cache sizes are
//! shares of the chunks the trace touches. `LAZYBLK_BENCH_HOURS` sets the
//! trace length (default 48). Under `cargo test` (no `--bench` argument)
//! it replays two hours with one configuration.

mod common;

use std::collections::HashSet;

use common::{generate, Trace, CHUNK};
use lazyblk::store::policy::{default_policy, DefaultPolicy, EvictionPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The paper's week in one region: host cache, fleet, origin (percent).
const PAPER: [f64; 3] = [67.0, 32.0, 0.06];

/// A byte-bounded cache of chunk ids under the caches' policy.
struct Cache {
    policy: DefaultPolicy<u64>,
    capacity: u64,
}

impl Cache {
    fn new(capacity: u64) -> Cache {
        Cache {
            policy: default_policy(capacity),
            capacity,
        }
    }

    fn read(&mut self, id: u64) -> bool {
        self.policy.touch(&id)
    }

    fn fill(&mut self, id: u64) {
        self.policy.insert(id, CHUNK);
        self.policy.evict_to(self.capacity);
    }
}

/// Reads served by the host caches, the fleet and the origin.
#[derive(Default)]
struct Served([u64; 3]);

impl Served {
    fn percent(&self, tier: usize) -> f64 {
        100.0 * self.0[tier] as f64 / self.0.iter().sum::<u64>().max(1) as f64
    }
}

fn replay(trace: &Trace, hosts: usize, host_bytes: u64, fleet_bytes: u64) -> Served {
    let mut rng = StdRng::seed_from_u64(0x7135);
    let mut host_caches: Vec<Cache> = (0..hosts).map(|_| Cache::new(host_bytes)).collect();
    let mut fleet = Cache::new(fleet_bytes);
    let mut served = Served::default();
    for start in &trace.starts {
        let host = &mut host_caches[rng.gen_range(0..hosts)];
        for &id in start {
            let tier = if host.read(id) {
                0
            } else if fleet.read(id) {
                host.fill(id);
                1
            } else {
                fleet.fill(id);
                host.fill(id);
                2
            };
            served.0[tier] += 1;
        }
    }
    served
}

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name} is a whole number, not {text:?}")),
        Err(_) => default,
    }
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let hours = env_number("LAZYBLK_BENCH_HOURS", if benching { 48 } else { 2 });
    let hosts = env_number("LAZYBLK_BENCH_HOSTS", 8).max(1);
    let trace = generate(hours, 0x5eed);
    let mut seen = HashSet::new();
    let (mut reads, mut first_reads) = (0u64, 0u64);
    for id in trace.reads() {
        reads += 1;
        if seen.insert(id) {
            first_reads += 1;
        }
    }
    let distinct = seen.len() as u64;
    println!(
        "trace: {hours} h, {} starts over {hosts} hosts, {reads} chunk reads, {distinct} distinct chunks ({:.1} GiB); first reads (no cache can serve them): {:.2}%",
        trace.starts.len(),
        (distinct * CHUNK) as f64 / (1u64 << 30) as f64,
        100.0 * first_reads as f64 / reads.max(1) as f64
    );
    // (host cache, fleet) as shares of the distinct chunks.
    let sizes: &[(f64, f64)] = if benching {
        &[(0.01, 0.05), (0.02, 0.10), (0.02, 0.20), (0.05, 0.20)]
    } else {
        &[(0.02, 0.10)]
    };
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    println!("| host cache GiB (share) | fleet GiB (share) | host cache | fleet | origin |");
    println!("|---|---|---|---|---|");
    for &(host_share, fleet_share) in sizes {
        let host_bytes = ((distinct as f64 * host_share) as u64).max(1) * CHUNK;
        let fleet_bytes = ((distinct as f64 * fleet_share) as u64).max(1) * CHUNK;
        let served = replay(&trace, hosts, host_bytes, fleet_bytes);
        println!(
            "| {:.2} ({:.0}%) | {:.2} ({:.0}%) | {:.1}% | {:.1}% | {:.2}% |",
            gib(host_bytes),
            host_share * 100.0,
            gib(fleet_bytes),
            fleet_share * 100.0,
            served.percent(0),
            served.percent(1),
            served.percent(2)
        );
    }
    println!(
        "| paper (one week, one region) | | {:.0}% | {:.0}% | {:.2}% |",
        PAPER[0], PAPER[1], PAPER[2]
    );
}
