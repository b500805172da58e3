//! The S3 store: chunks and manifests as objects in a bucket of any S3 API
//! (AWS S3, SeaweedFS, MinIO, Garage, Ceph RGW).
//!
//! Layout under the store's prefix:
//!
//! ```text
//! PREFIX/chunks/<id>        one sealed envelope per object (64 hex digits)
//! PREFIX/manifests/<name>   one sealed manifest per object
//! ```
//!
//! Chunk keys are not fanned out: S3 has no directories to keep small, and
//! AWS partitions a bucket by key prefix, which the ids (uniform hashes)
//! already spread evenly right after `chunks/`. One flat prefix also lists
//! in one paginated walk.
//!
//! Requests are signed by rusty-s3 and sent through the process's shared
//! HTTP client ([`crate::net`]); failures that may pass (5xx, `SlowDown`,
//! resets, timeouts) are retried on the shared schedule ([`crate::retry`])
//! and surface as [`StoreError::Unavailable`]; a refusal of the credentials
//! is permanent and names the bucket and the variables to check.
//!
//! An upload carries `x-amz-checksum-sha256`, which for a chunk is its id:
//! the server rejects a body damaged on the way instead of storing it.

#![forbid(unsafe_code)]

mod config;
mod objects;
mod wire;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use config::S3Config;
pub use config::S3Options;
use objects::{Objects, BULK, QUICK};
use wire::S3Error;

use super::{
    validate_manifest_name, ChunkStore, ListedChunk, StoreError, MAX_ENVELOPE_SIZE,
    MAX_MANIFEST_SIZE,
};
use crate::chunk::ChunkId;
use crate::net::HttpClient;

const CHUNKS: &str = "chunks/";
const MANIFESTS: &str = "manifests/";
/// Concurrent requests of one `missing` call. The batches a push asks
/// about (its window, 64 chunks of 512 KiB) complete in a few round trips.
const MISSING_CONCURRENCY: usize = 32;

/// A chunk store in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    objects: Arc<Objects>,
    /// The store as the user named it, for messages.
    spec: String,
}

impl S3Store {
    /// Opens `s3://BUCKET[/PREFIX]`, configured by `options` and the
    /// standard AWS environment variables. Makes no request: a bucket that
    /// does not exist, or refuses the credentials, fails the first one.
    /// Requests go through `client` (which says whom `https://` trusts).
    pub fn open(
        spec: &str,
        options: &S3Options,
        client: HttpClient,
    ) -> Result<S3Store, StoreError> {
        S3Store::build(spec, options, |name| std::env::var(name).ok(), client)
    }

    /// [`S3Store::open`] with the environment read through `env`, through
    /// the shared client.
    pub fn with_env(
        spec: &str,
        options: &S3Options,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Store, StoreError> {
        S3Store::build(spec, options, env, HttpClient::shared(false))
    }

    fn build(
        spec: &str,
        options: &S3Options,
        env: impl Fn(&str) -> Option<String>,
        client: HttpClient,
    ) -> Result<S3Store, StoreError> {
        Ok(S3Store {
            objects: Arc::new(Objects {
                config: S3Config::new(spec, options, env)?,
                client,
            }),
            spec: spec.to_owned(),
        })
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}{name}", self.objects.config.prefix)
    }

    fn chunk_error(
        &self,
        op: &'static str,
        id: &ChunkId,
    ) -> impl FnOnce(S3Error) -> StoreError + '_ {
        let object = format!("chunk {id}");
        move |error| error.into_store_error(op, &self.spec, object)
    }

    fn manifest_error(
        &self,
        op: &'static str,
        name: &str,
    ) -> impl FnOnce(S3Error) -> StoreError + '_ {
        let object = format!("manifest {name:?}");
        move |error| error.into_store_error(op, &self.spec, object)
    }
}

#[async_trait]
impl ChunkStore for S3Store {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        self.objects
            .get_object(&self.key(CHUNKS, &id.to_hex()), QUICK, MAX_ENVELOPE_SIZE)
            .await
            .map_err(self.chunk_error("read", id))?
            .ok_or_else(|| StoreError::ChunkNotFound {
                store: self.spec.clone(),
                id: *id,
            })
    }

    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        // Always written, never checked first: a PUT is atomic, an existing
        // chunk gets the same bytes, and its modification time is refreshed.
        self.objects
            .put_object(&self.key(CHUNKS, &id.to_hex()), envelope, id.0)
            .await
            .map_err(self.chunk_error("write", id))
    }

    /// One server-side self-copy per id, a bounded number at a
    /// time: a copy both tells whether the chunk exists and refreshes it,
    /// where a HEAD would only tell. A listing would cost a request per
    /// 1000 chunks of the whole store, whatever the batch's size.
    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let present: Vec<bool> = futures::stream::iter(ids.iter().copied())
            .map(|id| async move {
                self.objects
                    .refresh_object(&self.key(CHUNKS, &id.to_hex()))
                    .await
                    .map_err(self.chunk_error("check", &id))
            })
            .buffered(MISSING_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(ids
            .iter()
            .zip(present)
            .filter(|(_, present)| !present)
            .map(|(id, _)| *id)
            .collect())
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        let listed = self
            .objects
            .list_objects(&self.key(CHUNKS, ""))
            .await
            .map_err(|error| error.into_store_error("list", &self.spec, "chunks".into()))?;
        // Strays (names that are not ids) are not chunks.
        Ok(listed
            .into_iter()
            .filter_map(|object| {
                Some(ListedChunk {
                    id: object.name.parse().ok()?,
                    modified: object.modified,
                    size: object.size,
                })
            })
            .collect())
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        self.objects
            .delete_object(&self.key(CHUNKS, &id.to_hex()))
            .await
            .map_err(self.chunk_error("delete", id))
    }

    /// A HEAD, then a DELETE if the chunk is old enough. S3 has no delete
    /// conditional on the modification time (SeaweedFS ignores AWS's
    /// `x-amz-if-match-last-modified-time`, and `If-Match` on the ETag
    /// cannot see a refresh, which keeps the bytes), so a refresh that
    /// lands within the one round trip between the two is lost; the grace
    /// period is what keeps a push clear of that window.
    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        let key = self.key(CHUNKS, &id.to_hex());
        let Some(modified) = self
            .objects
            .head_object(&key)
            .await
            .map_err(self.chunk_error("check", id))?
        else {
            return Ok(false);
        };
        // Last-Modified is cut to the second: the true time may be up to a
        // second later, and only a chunk older than the cutoff for certain goes.
        if modified + Duration::from_secs(1) > cutoff {
            return Ok(false);
        }
        self.objects
            .delete_object(&key)
            .await
            .map_err(self.chunk_error("delete", id))?;
        Ok(true)
    }

    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        validate_manifest_name(name)?;
        let sha256 = {
            use sha2::Digest;
            sha2::Sha256::digest(&manifest).into()
        };
        self.objects
            .put_object(&self.key(MANIFESTS, name), manifest, sha256)
            .await
            .map_err(self.manifest_error("write", name))
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        validate_manifest_name(name)?;
        self.objects
            .get_object(&self.key(MANIFESTS, name), BULK, MAX_MANIFEST_SIZE)
            .await
            .map_err(self.manifest_error("read", name))?
            .ok_or_else(|| StoreError::ManifestNotFound {
                store: self.spec.clone(),
                name: name.to_owned(),
            })
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        let listed = self
            .objects
            .list_objects(&self.key(MANIFESTS, ""))
            .await
            .map_err(|error| error.into_store_error("list", &self.spec, "manifests".into()))?;
        Ok(listed
            .into_iter()
            .map(|object| object.name)
            .filter(|name| validate_manifest_name(name).is_ok())
            .collect())
    }

    /// S3's DELETE of an absent key succeeds, as the contract asks.
    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        validate_manifest_name(name)?;
        self.objects
            .delete_object(&self.key(MANIFESTS, name))
            .await
            .map_err(self.manifest_error("delete", name))
    }

    fn describe(&self) -> String {
        self.spec.clone()
    }

    fn retries_transient_failures(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
