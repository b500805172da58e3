//! LRU against S3-FIFO on a synthetic host's chunk reads, at several cache
//! sizes: the hit ratio each policy gets from the same trace.
//!
//! `cargo bench --bench eviction` generates a deterministic trace shaped
//! like the paper's fleet (Brooker et al., ATC '23):
//!
//! * a hot working set: starts of popular images (Zipf over 60 images that
//!   share 6 base images), each start reading the same ~6% of its image;
//! * cron herds: at the top of each hour, many starts of rarely used
//!   images (each started a few times within the herd, then not for hours);
//! * one-pass scans: now and then a large image read end to end once.
//!
//! It prints, per cache size (as a share of the chunks the trace touches),
//! each policy's hit ratio and S3-FIFO's over LRU's. `LAZYBLK_BENCH_HOURS`
//! sets the trace length (default 48). Under `cargo test` (no `--bench`
//! argument) it runs two hours at one size.

use std::collections::HashSet;

use lazyblk::store::policy::{EvictionPolicy, Lru, S3Fifo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHUNK: u64 = 512 * 1024;

/// An image: the chunks a start reads, in order.
struct Image {
    start_set: Vec<u64>,
}

struct Trace {
    reads: Vec<u64>,
}

/// Chunk ids are numbers; each image or base has its own range.
struct Ids(u64);

impl Ids {
    fn take(&mut self, n: u64) -> std::ops::Range<u64> {
        let range = self.0..self.0 + n;
        self.0 += n;
        range
    }
}

fn zipf_pick(rng: &mut StdRng, cumulative: &[f64]) -> usize {
    let x = rng.gen::<f64>() * cumulative.last().unwrap();
    cumulative.partition_point(|&c| c < x)
}

/// An image of `base` chunks shared with its base image and `own` of its
/// own; a start reads about 6% of it (a fixed subset: the same files every
/// time).
fn image(rng: &mut StdRng, base: &std::ops::Range<u64>, own: std::ops::Range<u64>) -> Image {
    let start_set = base
        .clone()
        .chain(own)
        .filter(|_| rng.gen::<f64>() < 0.064)
        .collect();
    Image { start_set }
}

fn generate(hours: usize, seed: u64) -> Trace {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Ids(0);
    // Six base images of 400 MiB, 60 popular images of 100 MiB own data.
    let bases: Vec<_> = (0..6).map(|_| ids.take(800)).collect();
    let popular: Vec<Image> = (0..60)
        .map(|i| {
            let own = ids.take(200);
            image(&mut rng, &bases[i % bases.len()], own)
        })
        .collect();
    let cumulative: Vec<f64> = (1..=popular.len())
        .scan(0.0, |sum, rank| {
            *sum += 1.0 / rank as f64;
            Some(*sum)
        })
        .collect();

    let mut reads = Vec::new();
    for _hour in 0..hours {
        // The herd at the top of the hour: 12 rare images (fresh ones, on
        // their own or on a base of their own), started 15 times each.
        for _ in 0..12 {
            let base = ids.take(600);
            let own = ids.take(300);
            let rare = image(&mut rng, &base, own);
            for _ in 0..15 {
                reads.extend(&rare.start_set);
            }
        }
        // The rest of the hour: 400 starts of popular images, and two scans
        // of 1 GiB each, at random moments.
        let scans: Vec<usize> = (0..2).map(|_| rng.gen_range(0..400)).collect();
        for start in 0..400 {
            let pick = zipf_pick(&mut rng, &cumulative);
            reads.extend(&popular[pick].start_set);
            if scans.contains(&start) {
                reads.extend(ids.take(2048));
            }
        }
    }
    Trace { reads }
}

fn hit_ratio(policy: &mut dyn EvictionPolicy<u64>, capacity: u64, trace: &Trace) -> f64 {
    let mut hits = 0u64;
    for &id in &trace.reads {
        if policy.touch(&id) {
            hits += 1;
        } else {
            policy.insert(id, CHUNK);
            policy.evict_to(capacity);
        }
    }
    hits as f64 / trace.reads.len() as f64
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
    let distinct = trace.reads.iter().collect::<HashSet<_>>().len() as u64;
    println!(
        "trace: {hours} h, {} chunk reads, {} distinct chunks ({:.1} GiB)",
        trace.reads.len(),
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
