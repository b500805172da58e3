//! Verification: every chunk's name against its bytes, and repair from a
//! second store.
//!
//! A chunk is good when the SHA-256 of what the store returns is its id:
//! the same check every reader makes, so a chunk verify calls good is one
//! a reader accepts (its tag is checked again when a tenant opens it). A
//! replacement from the repair store passes the same check before it is
//! written.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::{
    chunks_of, manifest_names, referenced_chunks, Progress, ReadManifestError, CONCURRENCY,
};
use crate::chunk::ChunkId;
use crate::error::ErrorKind;
use crate::store::{ChunkStore, StoreError};

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Check only the chunks this manifest references; without it, every
    /// chunk in the store and every chunk any manifest references.
    pub name: Option<String>,
    /// Replace bad and missing chunks from this store.
    pub repair_from: Option<Arc<dyn ChunkStore>>,
}

/// What a run found and did. Serialises to `lazyblk verify --json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub chunks_good: u64,
    pub bytes_checked: u64,
    /// Chunks whose bytes do not hash to their id.
    pub bad: Vec<String>,
    /// Chunks a manifest references that the store lacks.
    pub missing: Vec<String>,
    /// Bad or missing chunks replaced from the repair store.
    pub repaired: Vec<String>,
    /// Bad or missing chunks the repair store could not supply, and why.
    pub unrepaired: Vec<Unrepaired>,
    #[serde(skip)]
    pub elapsed_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unrepaired {
    pub id: String,
    pub reason: String,
}

impl VerifyReport {
    /// Whether the store now holds every chunk it should, intact.
    pub fn is_sound(&self) -> bool {
        self.bad.len() + self.missing.len() == self.repaired.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("list chunks")]
    ListChunks(#[source] StoreError),
    #[error(transparent)]
    ReadManifests(#[from] ReadManifestError),
    #[error("read chunk {id}")]
    ReadChunk {
        id: ChunkId,
        #[source]
        source: StoreError,
    },
    #[error("replace chunk {id}")]
    WriteChunk {
        id: ChunkId,
        #[source]
        source: StoreError,
    },
}

/// How one chunk fared.
enum Checked {
    Good(u64),
    Bad,
    Missing,
}

/// Checks the chunks of `store` that `opts` selects, repairing what it can.
pub async fn verify(
    store: &dyn ChunkStore,
    opts: &VerifyOptions,
    progress: Progress<'_>,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let ids = match &opts.name {
        Some(name) => chunks_of(store, name).await?,
        None => {
            progress("listing chunks", 0, 0);
            let mut ids: Vec<ChunkId> = store
                .list()
                .await
                .map_err(VerifyError::ListChunks)?
                .into_iter()
                .map(|c| c.id)
                .collect();
            let names = manifest_names(store)
                .await
                .map_err(ReadManifestError::List)?;
            let listed: HashSet<ChunkId> = ids.iter().copied().collect();
            let referenced = referenced_chunks(store, names, progress).await?;
            // Referenced but not listed: checked, and found missing, by the
            // same path as the rest.
            ids.extend(referenced.difference(&listed).copied());
            ids
        }
    };

    let mut report = VerifyReport::default();
    let mut broken = Vec::new();
    let total = ids.len() as u64;
    progress("checking chunks", 0, total);
    let mut checks = futures::stream::iter(ids)
        .map(|id| async move { check(store, id).await.map(|checked| (id, checked)) })
        .buffer_unordered(CONCURRENCY);
    while let Some((id, checked)) = checks.try_next().await? {
        report.chunks_checked += 1;
        match checked {
            Checked::Good(len) => {
                report.chunks_good += 1;
                report.bytes_checked += len;
            }
            Checked::Bad => {
                report.bad.push(id.to_hex());
                broken.push((id, true));
            }
            Checked::Missing => {
                report.missing.push(id.to_hex());
                broken.push((id, false));
            }
        }
        progress("checking chunks", report.chunks_checked, total);
    }
    drop(checks);

    if let Some(source) = &opts.repair_from {
        let total = broken.len() as u64;
        progress("repairing chunks", 0, total);
        let mut done = 0;
        let mut repairs = futures::stream::iter(broken)
            .map(|(id, present)| async move {
                repair(store, &**source, id, present)
                    .await
                    .map(|outcome| (id, outcome))
            })
            .buffer_unordered(CONCURRENCY);
        while let Some((id, outcome)) = repairs.try_next().await? {
            match outcome {
                Ok(()) => report.repaired.push(id.to_hex()),
                Err(reason) => report.unrepaired.push(Unrepaired {
                    id: id.to_hex(),
                    reason,
                }),
            }
            done += 1;
            progress("repairing chunks", done, total);
        }
    }
    for list in [&mut report.bad, &mut report.missing, &mut report.repaired] {
        list.sort();
    }
    report.unrepaired.sort_by(|a, b| a.id.cmp(&b.id));
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn check(store: &dyn ChunkStore, id: ChunkId) -> Result<Checked, VerifyError> {
    match store.get(&id).await {
        Ok(envelope) => {
            let len = envelope.len() as u64;
            Ok(if ChunkId::of_envelope_off_runtime(envelope).await == id {
                Checked::Good(len)
            } else {
                Checked::Bad
            })
        }
        Err(StoreError::ChunkNotFound { .. }) => Ok(Checked::Missing),
        // A store that checks what it serves refuses a bad chunk rather than
        // hand it over: that is the finding, not a reason to stop.
        Err(source) if source.kind() == ErrorKind::Integrity => Ok(Checked::Bad),
        Err(source) => Err(VerifyError::ReadChunk { id, source }),
    }
}

/// Replaces chunk `id` in `store` with a verified copy from `source`.
/// `Ok(Err(reason))` when the source cannot supply a good copy; `Err` when
/// writing to `store` fails.
async fn repair(
    store: &dyn ChunkStore,
    source: &dyn ChunkStore,
    id: ChunkId,
    present: bool,
) -> Result<Result<(), String>, VerifyError> {
    let envelope = match source.get(&id).await {
        Ok(envelope) => envelope,
        Err(e) => return Ok(Err(error_chain(&e))),
    };
    if ChunkId::of_envelope_off_runtime(envelope.clone()).await != id {
        return Ok(Err(format!(
            "the copy in {} is damaged as well",
            source.describe()
        )));
    }
    let write_err = |source| VerifyError::WriteChunk { id, source };
    // A put keeps an existing chunk's bytes, so the damaged one goes first.
    if present {
        store.delete(&id).await.map_err(write_err)?;
    }
    store.put(&id, envelope).await.map_err(write_err)?;
    Ok(Ok(()))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
