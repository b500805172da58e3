//! LRU against S3-FIFO on a synthetic host's chunk reads, at several cache
//! sizes: the hit ratio each policy gets from the same trace.
//!
//! `cargo bench --bench eviction` replays the synthetic trace of
//! benches/common (popular images, cron herds, one-pass scans).
//!
//! It prints, per cache size (as a share of the chunks the trace touches),
//! each policy's hit ratio and S3-FIFO's over LRU's. `LAZYBLK_BENCH_HOURS`
//! sets the trace length (default 48). Under `cargo test` (no `--bench`
//! argument) it runs two hours at one size.

mod common;

use std::collections::HashSet;

use common::{generate, Trace, CHUNK};
use lazyblk::store::policy::{EvictionPolicy, Lru, S3Fifo};

fn hit_ratio(policy: &mut dyn EvictionPolicy<u64>, capacity: u64, trace: &Trace) -> f64 {
    let (mut hits, mut reads) = (0u64, 0u64);
    for id in trace.reads() {
        reads += 1;
        if policy.touch(&id) {
            hits += 1;
        } else {
            policy.insert(id, CHUNK);
            policy.evict_to(capacity);
        }
    }
    hits as f64 / reads as f64
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let hours = match std::env::var("LAZYBLK_BENCH_HOURS") {
        Ok(text) => text
            .parse()
            .expect("LAZYBLK_BENCH_HOURS is a number of hours"),
        Err(_) if benching => 48,
        Err(_) => 2,
    };
    let trace = generate(hours, 0x5eed);
    let distinct = trace.reads().collect::<HashSet<_>>().len() as u64;
    println!(
        "trace: {hours} h, {} chunk reads, {} distinct chunks ({:.1} GiB)",
        trace.reads().count(),
        distinct,
        (distinct * CHUNK) as f64 / (1u64 << 30) as f64
    );
    let shares: &[f64] = if benching {
        &[0.01, 0.02, 0.05, 0.10, 0.20]
    } else {
        &[0.05]
    };
    println!("| cache (share of distinct) | cache GiB | LRU hit ratio | S3-FIFO hit ratio | S3-FIFO / LRU |");
    println!("|---|---|---|---|---|");
    for &share in shares {
        let capacity = ((distinct as f64 * share) as u64).max(1) * CHUNK;
        let lru = hit_ratio(&mut Lru::new(), capacity, &trace);
        let fifo = hit_ratio(&mut S3Fifo::new(capacity), capacity, &trace);
        println!(
            "| {:.0}% | {:.2} | {:.3} | {:.3} | {:.2} |",
            share * 100.0,
            capacity as f64 / (1u64 << 30) as f64,
            lru,
            fifo,
            fifo / lru.max(1e-9)
        );
    }
}
