//! The paper's figures, computed on a corpus of images in a store and on
//! the results of the cold-start benchmark (`lazyblk report`):
//!
//! * [`dedup`]: what each push of a version series adds to a store that
//!   holds everything pushed before it (the paper's "uploads with no unique
//!   chunk");
//! * [`sharing`]: how much of a base image each image built on it reuses;
//! * [`results`]: the benchmark's starts, the sparsity of each workload;
//! * [`tiers`]: the tier hit table of many starts replayed through host
//!   caches and a fleet;
//! * [`plot`]: SVG plots of the above.
//!
//! Everything here works on manifests' public parts (chunk ids; no key
//! needed) and on parsed results: pure, no I/O but the plots' files.

#![forbid(unsafe_code)]

use std::collections::HashSet;

use serde::Serialize;

use crate::chunk::{ChunkId, PublicManifest};

pub mod plot;
pub mod results;
pub mod tiers;

/// An image as the report sees it: its name and the id of each chunk
/// (`None` for all-zero chunks, which are never stored).
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub chunk_ids: Vec<Option<ChunkId>>,
}

impl Image {
    pub fn from_manifest(name: &str, manifest: &PublicManifest) -> Image {
        Image {
            name: name.to_owned(),
            chunk_ids: manifest.chunk_ids.clone(),
        }
    }

    /// The distinct ids of its stored chunks.
    pub fn distinct(&self) -> HashSet<ChunkId> {
        self.chunk_ids.iter().flatten().copied().collect()
    }
}

/// What one push added to the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushAdded {
    pub name: String,
    /// Distinct stored chunks of the image.
    pub chunks_distinct: u64,
    /// Those the store did not hold yet: what the push uploaded.
    pub chunks_new: u64,
}

impl PushAdded {
    pub fn percent_new(&self) -> f64 {
        percent(self.chunks_new, self.chunks_distinct)
    }
}

/// The dedup figures of a series of pushes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dedup {
    pub pushes: Vec<PushAdded>,
    /// Share (%) of pushes that uploaded no chunk at all.
    pub zero_new_percent: f64,
    /// Mean and median of the pushes' % of new chunks.
    pub mean_new_percent: f64,
    pub median_new_percent: f64,
}

/// Replays pushes of `already` (in order, into an empty store) then of
/// `series`, and reports what each push of `series` uploaded: the chunks
/// of its image that no earlier push stored.
pub fn dedup(already: &[Image], series: &[Image]) -> Dedup {
    let mut stored: HashSet<ChunkId> = already.iter().flat_map(Image::distinct).collect();
    let pushes: Vec<PushAdded> = series
        .iter()
        .map(|image| {
            let distinct = image.distinct();
            let new = distinct.difference(&stored).count() as u64;
            stored.extend(distinct.iter().copied());
            PushAdded {
                name: image.name.clone(),
                chunks_distinct: distinct.len() as u64,
                chunks_new: new,
            }
        })
        .collect();
    let shares: Vec<f64> = pushes.iter().map(PushAdded::percent_new).collect();
    let zero = pushes.iter().filter(|p| p.chunks_new == 0).count() as u64;
    Dedup {
        zero_new_percent: percent(zero, pushes.len() as u64),
        mean_new_percent: mean(&shares),
        median_new_percent: median(&shares),
        pushes,
    }
}

/// How much of a base image one image reuses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sharing {
    pub name: String,
    /// Distinct stored chunks of the base image.
    pub base_chunks: u64,
    /// Those the image holds too.
    pub reused: u64,
    /// Distinct stored chunks of the image.
    pub image_chunks: u64,
}

impl Sharing {
    /// Share (%) of the base's chunks the image reuses.
    pub fn percent_of_base(&self) -> f64 {
        percent(self.reused, self.base_chunks)
    }

    /// Share (%) of the image's chunks that come from the base.
    pub fn percent_of_image(&self) -> f64 {
        percent(self.reused, self.image_chunks)
    }
}

/// For each image, the base's chunks it reuses, by chunk id.
pub fn sharing(base: &Image, images: &[Image]) -> Vec<Sharing> {
    let base_ids = base.distinct();
    images
        .iter()
        .map(|image| {
            let ids = image.distinct();
            Sharing {
                name: image.name.clone(),
                base_chunks: base_ids.len() as u64,
                reused: ids.intersection(&base_ids).count() as u64,
                image_chunks: ids.len() as u64,
            }
        })
        .collect()
}

/// `part` as a percentage of `whole`; 0 when `whole` is 0.
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests;
