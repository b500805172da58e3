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
mod wire;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::Method;
use rusty_s3::actions::{DeleteObject, GetObject, HeadObject, ListObjectsV2, PutObject, S3Action};

use config::S3Config;
pub use config::S3Options;
use wire::{check, redact, S3Error, Signed};

use super::{
    validate_manifest_name, ChunkStore, ListedChunk, StoreError, MAX_ENVELOPE_SIZE,
    MAX_MANIFEST_SIZE,
};
use crate::chunk::ChunkId;
use crate::net::{HttpClient, Response};
use crate::retry::{GaveUp, RetryPolicy};

const CHUNKS: &str = "chunks/";
const MANIFESTS: &str = "manifests/";
/// How long a signed URL stays valid: longer than any one request may take.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(300);
/// One request, from connecting to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A listing page of 1000 keys is well under this.
const MAX_LISTING: usize = 16 << 20;
/// Concurrent requests of one `missing` call. The batches a push asks
/// about (its window, 64 chunks of 512 KiB) complete in a few round trips.
const MISSING_CONCURRENCY: usize = 32;

/// A chunk store in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    config: Arc<S3Config>,
    client: HttpClient,
    retry: RetryPolicy,
    /// The store as the user named it, for messages.
    spec: String,
}

/// One object found by a listing, its key relative to the listed prefix.
#[derive(Debug)]
struct Listed {
    name: String,
    modified: SystemTime,
    size: u64,
}

impl S3Store {
    /// Opens `s3://BUCKET[/PREFIX]`, configured by `options` and the
    /// standard AWS environment variables. Makes no request: a bucket that
    /// does not exist, or refuses the credentials, fails the first one.
    pub fn open(spec: &str, options: &S3Options) -> Result<S3Store, StoreError> {
        S3Store::with_env(spec, options, |name| std::env::var(name).ok())
    }

    /// [`S3Store::open`] with the environment read through `env`.
    pub fn with_env(
        spec: &str,
        options: &S3Options,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Store, StoreError> {
        Ok(S3Store {
            config: Arc::new(S3Config::new(spec, options, env)?),
            client: HttpClient::shared(false),
            retry: RetryPolicy {
                deadline: Duration::from_secs(60),
                ..RetryPolicy::default()
            },
            spec: spec.to_owned(),
        })
    }

    /// Sends the request `sign` makes (signed afresh for every attempt),
    /// retrying transient failures, and returns the successful answer.
    async fn send(&self, max_body: usize, sign: impl Fn() -> Signed) -> Result<Response, S3Error> {
        let attempt = || async {
            let signed = sign();
            let (method, shown) = (signed.method.clone(), signed.shown_url());
            let request = signed.into_request()?;
            let response = self
                .client
                .send(request, REQUEST_TIMEOUT, max_body)
                .await
                .map_err(|error| redact(error, &shown))?;
            check(response, &method, shown, self.config.bucket.name())
        };
        let retried = |error: &S3Error, attempt: u32| {
            tracing::debug!(store = %self.spec, attempt, error = %error, "transient S3 failure, retrying");
        };
        match self
            .retry
            .run(attempt, S3Error::is_transient, retried)
            .await
        {
            Ok(response) => Ok(response),
            Err(GaveUp::Failed { error, .. }) => Err(error),
            Err(GaveUp::TimedOut { .. }) => {
                let probe = sign();
                Err(S3Error::Deadline {
                    method: probe.method.clone(),
                    url: probe.shown_url(),
                    after: self.retry.deadline,
                })
            }
        }
    }

    /// A signed request for `action` with `headers` (signed too) and `body`.
    fn signed<'a>(
        &'a self,
        mut action: impl S3Action<'a>,
        method: Method,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    ) -> Signed {
        for (name, value) in &headers {
            action.headers_mut().insert(*name, value.clone());
        }
        Signed {
            method,
            url: action.sign(SIGNATURE_LIFETIME),
            headers,
            body,
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}{name}", self.config.prefix)
    }

    fn credentials(&self) -> Option<&rusty_s3::Credentials> {
        Some(&self.config.credentials)
    }

    async fn get_object(&self, key: &str, max_body: usize) -> Result<Option<Bytes>, S3Error> {
        let bucket = &self.config.bucket;
        let sign = || {
            let action = GetObject::new(bucket, self.credentials(), key);
            self.signed(action, Method::GET, Vec::new(), Bytes::new())
        };
        match self.send(max_body, sign).await {
            Ok(response) => Ok(Some(response.body)),
            Err(error) if error.is_no_such_key() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn put_object(&self, key: &str, body: Bytes, sha256: [u8; 32]) -> Result<(), S3Error> {
        let checksum = base64::engine::general_purpose::STANDARD.encode(sha256);
        let sign = || {
            let action = PutObject::new(&self.config.bucket, self.credentials(), key);
            let headers = vec![("x-amz-checksum-sha256", checksum.clone())];
            self.signed(action, Method::PUT, headers, body.clone())
        };
        self.send(MAX_LISTING, sign).await.map(drop)
    }

    /// Rewrites an object onto itself, server side, which refreshes its
    /// modification time; `false` if it does not exist.
    async fn refresh_object(&self, key: &str) -> Result<bool, S3Error> {
        let source = format!("/{}/{key}", self.config.bucket.name());
        let sign = || {
            let action = PutObject::new(&self.config.bucket, self.credentials(), key);
            let headers = vec![
                ("x-amz-copy-source", source.clone()),
                // S3 refuses to copy an object onto itself unchanged.
                ("x-amz-metadata-directive", "REPLACE".to_owned()),
            ];
            self.signed(action, Method::PUT, headers, Bytes::new())
        };
        match self.send(MAX_LISTING, sign).await {
            Ok(_) => Ok(true),
            Err(error) if error.is_no_such_key() => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The object's modification time, or `None` if it does not exist.
    async fn head_object(&self, key: &str) -> Result<Option<SystemTime>, S3Error> {
        let sign = || {
            let action = HeadObject::new(&self.config.bucket, self.credentials(), key);
            self.signed(action, Method::HEAD, Vec::new(), Bytes::new())
        };
        // A HEAD answer declares the object's length but carries no body,
        // so no cap applies.
        match self.send(usize::MAX, sign).await {
            // No time given makes the object look new, so it is kept.
            Ok(response) => Ok(Some(
                response
                    .headers
                    .get(http::header::LAST_MODIFIED)
                    .and_then(|value| value.to_str().ok())
                    .and_then(wire::parse_http_date)
                    .unwrap_or_else(SystemTime::now),
            )),
            Err(error) if error.is_no_such_key() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        let sign = || {
            let action = DeleteObject::new(&self.config.bucket, self.credentials(), key);
            self.signed(action, Method::DELETE, Vec::new(), Bytes::new())
        };
        match self.send(MAX_LISTING, sign).await {
            Err(error) if error.is_no_such_key() => Ok(()),
            result => result.map(drop),
        }
    }

    /// Every object under `PREFIX/kind`, one ListObjectsV2 page after another.
    async fn list_objects(&self, kind: &str) -> Result<Vec<Listed>, S3Error> {
        let prefix = self.key(kind, "");
        let mut listed = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let sign = || {
                let mut action = ListObjectsV2::new(&self.config.bucket, self.credentials());
                action.with_prefix(prefix.as_str());
                action.with_max_keys(1000);
                if let Some(token) = &token {
                    action.with_continuation_token(token.as_str());
                }
                self.signed(action, Method::GET, Vec::new(), Bytes::new())
            };
            let response = self.send(MAX_LISTING, sign).await?;
            let page = std::str::from_utf8(&response.body)
                .ok()
                .and_then(|text| ListObjectsV2::parse_response(text).ok())
                .ok_or_else(|| {
                    let probe = sign();
                    S3Error::Status {
                        method: Method::GET,
                        url: probe.shown_url(),
                        status: response.status,
                        code: "MalformedListing".into(),
                        message: "the listing is not a ListBucketResult document".into(),
                    }
                })?;
            listed.extend(page.contents.into_iter().filter_map(|object| {
                Some(Listed {
                    name: object.key.strip_prefix(&prefix)?.to_owned(),
                    // A server that gives no time makes the object look new,
                    // so garbage collection keeps it.
                    modified: object
                        .last_modified
                        .as_deref()
                        .and_then(wire::parse_iso_time)
                        .unwrap_or_else(SystemTime::now),
                    size: object.size.unwrap_or(0),
                })
            }));
            match page.next_continuation_token {
                Some(next) => token = Some(next),
                None => return Ok(listed),
            }
        }
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
        self.get_object(&self.key(CHUNKS, &id.to_hex()), MAX_ENVELOPE_SIZE)
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
        self.put_object(&self.key(CHUNKS, &id.to_hex()), envelope, id.0)
            .await
            .map_err(self.chunk_error("write", id))
    }

    /// One server-side self-copy per id, [`MISSING_CONCURRENCY`] at a
    /// time: a copy both tells whether the chunk exists and refreshes it,
    /// where a HEAD would only tell. A listing would cost a request per
    /// 1000 chunks of the whole store, whatever the batch's size.
    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let present: Vec<bool> = futures::stream::iter(ids.iter().copied())
            .map(|id| async move {
                self.refresh_object(&self.key(CHUNKS, &id.to_hex()))
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
            .list_objects(CHUNKS)
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
        self.delete_object(&self.key(CHUNKS, &id.to_hex()))
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
        self.delete_object(&key)
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
        self.put_object(&self.key(MANIFESTS, name), manifest, sha256)
            .await
            .map_err(self.manifest_error("write", name))
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        validate_manifest_name(name)?;
        self.get_object(&self.key(MANIFESTS, name), MAX_MANIFEST_SIZE)
            .await
            .map_err(self.manifest_error("read", name))?
            .ok_or_else(|| StoreError::ManifestNotFound {
                store: self.spec.clone(),
                name: name.to_owned(),
            })
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        let listed = self
            .list_objects(MANIFESTS)
            .await
            .map_err(|error| error.into_store_error("list", &self.spec, "manifests".into()))?;
        Ok(listed
            .into_iter()
            .map(|object| object.name)
            .filter(|name| validate_manifest_name(name).is_ok())
            .collect())
    }

    fn describe(&self) -> String {
        self.spec.clone()
    }
}

#[cfg(test)]
mod tests;
