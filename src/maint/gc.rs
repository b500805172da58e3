//! Garbage collection: delete the chunks no manifest references.
//!
//! Safety against pushes running meanwhile rests on the order of the steps
//! and on the store's garbage collection contract ([`ChunkStore`]):
//!
//! 1. the cutoff is fixed first: now less the grace period;
//! 2. chunks are listed, then manifests are listed and read. A manifest
//!    stored after its chunks were listed protects them, since it is read;
//!    a chunk uploaded after the listing is not a candidate at all;
//! 3. a candidate is unreferenced and last modified before the cutoff, and
//!    is deleted with [`ChunkStore::delete_if_older`], which re-checks its
//!    time: a push that found it present (its `missing` call refreshed it)
//!    after the listing keeps it.
//!
//! What remains is a push that checked a chunk more than the grace period
//! ago and has not stored its manifest yet: the grace period must exceed
//! the longest push. A manifest that cannot be read stops the run before
//! anything is deleted.

use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::{manifest_names, referenced_chunks, Progress, ReadManifestError, CONCURRENCY};
use crate::chunk::ChunkId;
use crate::store::{ChunkStore, StoreError};

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Chunks modified more recently than this are never deleted.
    pub grace: Duration,
    /// Count what would be deleted; delete nothing.
    pub dry_run: bool,
}

/// What a run found and did. Serialises to `lazyblk gc --json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub manifests: u64,
    pub chunks_listed: u64,
    /// Kept: some manifest references them.
    pub chunks_referenced: u64,
    /// Kept: unreferenced but modified within the grace period, or
    /// refreshed by a push (or deleted by another run) while this one went on.
    pub chunks_recent: u64,
    /// Deleted (with `dry_run`, would have been).
    pub chunks_deleted: u64,
    /// Envelope bytes of the deleted chunks.
    pub bytes_freed: u64,
    pub dry_run: bool,
    #[serde(skip)]
    pub elapsed_secs: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("list chunks")]
    ListChunks(#[source] StoreError),
    #[error("no chunk was deleted: a manifest could not be read, so which chunks are referenced is unknown")]
    ReadManifests(#[source] ReadManifestError),
    #[error("delete chunk {id}")]
    DeleteChunk {
        id: ChunkId,
        #[source]
        source: StoreError,
    },
    #[error("the grace period {0:?} is longer than the system clock can count back")]
    Grace(Duration),
}

/// Deletes from `store` every chunk that no manifest references and that
/// was last modified more than `opts.grace` ago.
pub async fn collect_garbage(
    store: &dyn ChunkStore,
    opts: &GcOptions,
    progress: Progress<'_>,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let cutoff = SystemTime::now()
        .checked_sub(opts.grace)
        .ok_or(GcError::Grace(opts.grace))?;

    progress("listing chunks", 0, 0);
    let chunks = store.list().await.map_err(GcError::ListChunks)?;
    let names = manifest_names(store)
        .await
        .map_err(|e| GcError::ReadManifests(ReadManifestError::List(e)))?;
    let mut report = GcReport {
        manifests: names.len() as u64,
        chunks_listed: chunks.len() as u64,
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    let referenced = referenced_chunks(store, names, progress)
        .await
        .map_err(GcError::ReadManifests)?;

    let mut candidates = Vec::new();
    for chunk in chunks {
        if referenced.contains(&chunk.id) {
            report.chunks_referenced += 1;
        } else if chunk.modified >= cutoff {
            report.chunks_recent += 1;
        } else {
            candidates.push(chunk);
        }
    }

    if opts.dry_run {
        report.chunks_deleted = candidates.len() as u64;
        report.bytes_freed = candidates.iter().map(|c| c.size).sum();
        report.elapsed_secs = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    let total = candidates.len() as u64;
    progress("deleting chunks", 0, total);
    let mut done = 0;
    let mut deletions = futures::stream::iter(candidates)
        .map(|chunk| async move {
            store
                .delete_if_older(&chunk.id, cutoff)
                .await
                .map(|deleted| (chunk, deleted))
                .map_err(|source| GcError::DeleteChunk {
                    id: chunk.id,
                    source,
                })
        })
        .buffer_unordered(CONCURRENCY);
    while let Some((chunk, deleted)) = deletions.try_next().await? {
        if deleted {
            report.chunks_deleted += 1;
            report.bytes_freed += chunk.size;
        } else {
            report.chunks_recent += 1;
        }
        done += 1;
        progress("deleting chunks", done, total);
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
#[path = "gc_tests.rs"]
mod tests;
