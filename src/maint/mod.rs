//! Store upkeep: [`gc`] deletes chunks no manifest references, [`verify`](mod@verify)
//! checks chunks against their names and repairs them from another store.
//!
//! Both read manifests through their public part
//! ([`crate::chunk::PublicManifest`]): chunk ids are readable without any
//! tenant key, so an operator runs them without holding tenants' keys.
//! Both work through the [`ChunkStore`] trait only, so they run the same on
//! every engine.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};

use crate::chunk::{ChunkId, ManifestError, PublicManifest};
use crate::store::{ChunkStore, StoreError};

pub mod gc;
#[cfg(test)]
pub(crate) mod testing;
pub mod verify;

pub use gc::{collect_garbage, GcError, GcOptions, GcReport};
pub use verify::{verify, VerifyError, VerifyOptions, VerifyReport};

/// Store requests in flight at once: enough to hide a remote store's
/// latency, few enough to bound memory (a chunk each, for verify).
const CONCURRENCY: usize = 16;

/// Called with (phase, done, total) as a long run advances.
pub type Progress<'a> = &'a (dyn Fn(&'static str, u64, u64) + Send + Sync);

/// A manifest that could not be read: its name and why.
#[derive(Debug, thiserror::Error)]
pub enum ReadManifestError {
    #[error("list manifests")]
    List(#[source] StoreError),
    #[error("fetch manifest {name:?}")]
    Fetch {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("parse manifest {name:?}")]
    Parse {
        name: String,
        #[source]
        source: ManifestError,
    },
}

/// The names of the store's manifests, leaving out the traces stored
/// beside them (they reference no chunk a collection must keep).
async fn manifest_names(store: &dyn ChunkStore) -> Result<Vec<String>, StoreError> {
    let mut names = store.list_manifests().await?;
    names.retain(|name| !crate::store::is_trace_name(name));
    Ok(names)
}

/// Every chunk id that the manifests named `names` reference. A manifest
/// that vanished since it was listed references nothing; one that cannot
/// be fetched or parsed fails the whole call, naming it, since a partial
/// answer would read as "unreferenced".
async fn referenced_chunks(
    store: &dyn ChunkStore,
    names: Vec<String>,
    progress: Progress<'_>,
) -> Result<HashSet<ChunkId>, ReadManifestError> {
    let total = names.len() as u64;
    let mut done = 0;
    let mut referenced = HashSet::new();
    progress("reading manifests", 0, total);
    let mut manifests = futures::stream::iter(names)
        .map(|name| async move {
            match store.get_manifest(&name).await {
                Ok(sealed) => PublicManifest::parse(&name, &sealed)
                    .map(Some)
                    .map_err(|source| ReadManifestError::Parse { name, source }),
                Err(StoreError::ManifestNotFound { .. }) => Ok(None),
                Err(source) => Err(ReadManifestError::Fetch { name, source }),
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(manifest) = manifests.try_next().await? {
        referenced.extend(manifest.into_iter().flat_map(|m| m.chunk_ids).flatten());
        done += 1;
        progress("reading manifests", done, total);
    }
    Ok(referenced)
}

/// The ids the named manifest references, in order, without repeats.
async fn chunks_of(store: &dyn ChunkStore, name: &str) -> Result<Vec<ChunkId>, ReadManifestError> {
    let sealed = store
        .get_manifest(name)
        .await
        .map_err(|source| ReadManifestError::Fetch {
            name: name.to_owned(),
            source,
        })?;
    let manifest =
        PublicManifest::parse(name, &sealed).map_err(|source| ReadManifestError::Parse {
            name: name.to_owned(),
            source,
        })?;
    let mut seen = HashSet::new();
    Ok(manifest
        .chunk_ids
        .into_iter()
        .flatten()
        .filter(|id| seen.insert(*id))
        .collect())
}
