//! A deterministic synthetic trace of chunk reads, shaped like the paper's
//! fleet (Brooker et al., ATC '23), shared by the benchmarks that replay it
//! through the real eviction policies (`eviction`, `tiers`):
//!
//! * a hot working set: starts of popular images (Zipf over 60 images that
//!   share 6 base images), each start reading the same ~6% of its image;
//! * cron herds: at the top of each hour, many starts of rarely used
//!   images (each started a few times within the herd, then not for hours);
//! * one-pass scans: now and then a large image read end to end once.
//!
//! Chunk ids are numbers; each image and base image has its own range.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes of a chunk: the weight of every cached entry.
pub const CHUNK: u64 = 512 * 1024;

/// The trace: one entry per image start or scan, in time order, each the
/// chunks it reads in order.
pub struct Trace {
    pub starts: Vec<Vec<u64>>,
}

impl Trace {
    /// Every chunk read, in order.
    pub fn reads(&self) -> impl Iterator<Item = u64> + '_ {
        self.starts.iter().flatten().copied()
    }
}

/// An image: the chunks a start reads, in order.
struct Image {
    start_set: Vec<u64>,
}

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

/// `hours` of the trace; the same `seed` gives the same trace.
pub fn generate(hours: usize, seed: u64) -> Trace {
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

    let mut starts = Vec::new();
    for _hour in 0..hours {
        // The herd at the top of the hour: 12 rare images (fresh ones, on
        // their own or on a base of their own), started 15 times each.
        for _ in 0..12 {
            let base = ids.take(600);
            let own = ids.take(300);
            let rare = image(&mut rng, &base, own);
            for _ in 0..15 {
                starts.push(rare.start_set.clone());
            }
        }
        // The rest of the hour: 400 starts of popular images, and two scans
        // of 1 GiB each, at random moments.
        let scans: Vec<usize> = (0..2).map(|_| rng.gen_range(0..400)).collect();
        for start in 0..400 {
            let pick = zipf_pick(&mut rng, &cumulative);
            starts.push(popular[pick].start_set.clone());
            if scans.contains(&start) {
                starts.push(ids.take(2048).collect());
            }
        }
    }
    Trace { starts }
}
