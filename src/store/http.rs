//! The HTTP store: chunks and manifests on a `lazyblk serve` chunk server
//! (or anything that speaks its protocol, see [`crate::server`]).
//!
//! Every request goes through the process's shared [`HttpClient`] pool, so
//! many concurrent fetches share a few connections. Each request has its own
//! timeout; transient failures (refused or reset connections, timeouts,
//! 408/429/5xx) are retried on the shared schedule of [`crate::retry`]
//! within an overall deadline per operation. That deadline is well below
//! the engine's fetch deadline, so a slow server fails a chunk over to the
//! next tier rather than running out the kernel's I/O timeout.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::Full;

use super::{
    validate_manifest_name, ChunkStore, ListedChunk, StoreError, MAX_ENVELOPE_SIZE,
    MAX_MANIFEST_SIZE,
};
use crate::chunk::ChunkId;
use crate::net::protocol::{
    from_unix_ns, unix_ns, ChunkPage, Deleted, ManifestList, MissingRequest, MissingResponse,
    MAX_JSON_BODY, MAX_LIST_PAGE,
};
use crate::net::{HttpClient, HttpError};
use crate::retry::{GaveUp, RetryPolicy};

/// Most ids sent in one `missing` request (the server takes up to
/// [`crate::net::protocol::MAX_MISSING_IDS`]).
const MISSING_BATCH: usize = 1000;
/// How the HTTP store times its chunk reads, the requests a reader waits
/// on: short enough that a slow origin fails over within the engine's
/// fetch deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpStoreTiming {
    /// One request, from sending it to its last body byte.
    pub request_timeout: Duration,
    /// Retries of one operation, with its overall deadline.
    pub retry: RetryPolicy,
}

impl Default for HttpStoreTiming {
    fn default() -> HttpStoreTiming {
        HttpStoreTiming {
            request_timeout: Duration::from_secs(3),
            retry: RetryPolicy {
                deadline: Duration::from_secs(6),
                max_attempts: 5,
                first_backoff: Duration::from_millis(50),
            },
        }
    }
}

/// Uploads, manifests, listings and deletes: no reader waits on them, and a
/// chunk upload over a slow link, a large manifest or a listing the server
/// builds from a large origin may take far longer than a chunk read.
const BULK_TIMING: HttpStoreTiming = HttpStoreTiming {
    request_timeout: Duration::from_secs(60),
    retry: RetryPolicy {
        deadline: Duration::from_secs(180),
        max_attempts: 5,
        first_backoff: Duration::from_millis(200),
    },
};

/// A chunk store behind `http://HOST:PORT[/PREFIX]` or `https://…`.
#[derive(Clone)]
pub struct HttpStore {
    client: HttpClient,
    /// The URL as given, without a trailing `/`; routes are appended to it.
    base: String,
    token: Option<String>,
    timing: HttpStoreTiming,
}

impl fmt::Debug for HttpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpStore")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timing", &self.timing)
            .finish()
    }
}

impl HttpStore {
    /// A store at `url` (`http://` or `https://`, no query or fragment),
    /// presenting `token` as a bearer token if given. Nothing is sent yet.
    pub fn new(
        url: &str,
        client: HttpClient,
        token: Option<String>,
        timing: HttpStoreTiming,
    ) -> Result<HttpStore, StoreError> {
        let invalid = |reason: &str| StoreError::InvalidSpec {
            spec: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(
                "an HTTP store's URL starts with http:// or https://",
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid("the URL names no host"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(invalid("the URL must have no query or fragment"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid(
                "credentials do not belong in the URL; use --token-file or LAZYBLK_TOKEN",
            ));
        }
        Ok(HttpStore {
            client,
            base: parsed.as_str().trim_end_matches('/').to_owned(),
            token,
            timing,
        })
    }

    fn chunk_url(&self, id: &ChunkId) -> String {
        format!("{}/v1/chunks/{}", self.base, id.to_hex())
    }

    fn manifest_url(&self, name: &str) -> String {
        format!("{}/v1/manifests/{name}", self.base)
    }

    fn request(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, HttpError> {
        let mut builder = Request::builder().method(method.clone()).uri(url);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if !body.is_empty() {
            builder = builder.header(header::CONTENT_LENGTH, body.len());
        }
        builder
            .body(Full::new(body))
            .map_err(|source| HttpError::InvalidRequest {
                method,
                url: url.to_owned(),
                source,
            })
    }

    /// [`HttpStore::exchange_timed`] with the timing of bulk requests.
    async fn exchange(
        &self,
        op: &'static str,
        object: impl Fn() -> String,
        method: Method,
        url: &str,
        body: Bytes,
        max_body: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        self.exchange_timed(BULK_TIMING, op, object, method, url, body, max_body)
            .await
    }

    /// One exchange, retried while it fails transiently. A 404 comes back
    /// as `Ok(None)`; any other failure status is an error.
    #[allow(clippy::too_many_arguments)]
    async fn exchange_timed(
        &self,
        timing: HttpStoreTiming,
        op: &'static str,
        object: impl Fn() -> String,
        method: Method,
        url: &str,
        body: Bytes,
        max_body: usize,
    ) -> Result<Option<Bytes>, StoreError> {
        let attempt = || {
            let (method, body) = (method.clone(), body.clone());
            async move {
                let request = self.request(method.clone(), url, body)?;
                let response = self
                    .client
                    .send(request, timing.request_timeout, max_body)
                    .await?;
                if response.status == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                Ok(Some(response.success(&method, url)?.body))
            }
        };
        let result = timing
            .retry
            .run(attempt, HttpError::is_transient, |error: &HttpError, attempt| {
                tracing::debug!(store = %self.base, attempt, error = %crate::error::chain(error), "transient HTTP failure, retrying");
            })
            .await;
        result.map_err(|gave_up| match gave_up {
            GaveUp::Failed { error, .. } => error.into_store_error(op, &self.base, object()),
            GaveUp::TimedOut { attempts } => StoreError::Unavailable {
                op,
                store: self.base.clone(),
                object: object(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {:?} ({attempts} attempts)",
                        timing.retry.deadline
                    ),
                ),
            },
        })
    }

    fn protocol_error(&self, op: &'static str, object: String, what: String) -> StoreError {
        StoreError::Io {
            op,
            store: self.base.clone(),
            object,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
        }
    }

    /// A 404 where a chunk server has a route: the URL names something else.
    fn no_route(&self, op: &'static str, object: String) -> StoreError {
        self.protocol_error(
            op,
            object,
            "no such route (404): is the URL a chunk server?".into(),
        )
    }

    fn parse_id(&self, op: &'static str, hex: &str) -> Result<ChunkId, StoreError> {
        hex.parse::<ChunkId>().map_err(|e| {
            self.protocol_error(
                op,
                "chunk list".into(),
                format!("the server sent a bad chunk id: {e}"),
            )
        })
    }

    /// A JSON answer to a GET of a listing route.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        object: &str,
        url: &str,
    ) -> Result<T, StoreError> {
        let body = self
            .exchange(
                op,
                || object.to_owned(),
                Method::GET,
                url,
                Bytes::new(),
                MAX_JSON_BODY,
            )
            .await?
            .ok_or_else(|| self.no_route(op, object.to_owned()))?;
        serde_json::from_slice(&body)
            .map_err(|e| self.protocol_error(op, object.to_owned(), format!("bad answer: {e}")))
    }
}

fn chunk_object(id: &ChunkId) -> String {
    format!("chunk {id}")
}

fn manifest_object(name: &str) -> String {
    format!("manifest {name:?}")
}

#[async_trait]
impl ChunkStore for HttpStore {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        let url = self.chunk_url(id);
        let object = || chunk_object(id);
        match self
            .exchange_timed(
                self.timing,
                "read",
                object,
                Method::GET,
                &url,
                Bytes::new(),
                MAX_ENVELOPE_SIZE,
            )
            .await?
        {
            Some(envelope) => Ok(envelope),
            None => Err(StoreError::ChunkNotFound {
                store: self.base.clone(),
                id: *id,
            }),
        }
    }

    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        let url = self.chunk_url(id);
        let object = || chunk_object(id);
        match self
            .exchange("write", object, Method::PUT, &url, envelope, MAX_JSON_BODY)
            .await?
        {
            Some(_) => Ok(()),
            None => Err(self.no_route("write", chunk_object(id))),
        }
    }

    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let url = format!("{}/v1/chunks/missing", self.base);
        let mut missing = Vec::new();
        for batch in ids.chunks(MISSING_BATCH) {
            let request = MissingRequest {
                ids: batch.iter().map(ChunkId::to_hex).collect(),
            };
            let body = Bytes::from(serde_json::to_vec(&request).expect("ids serialize"));
            let object = || format!("{} chunk ids", batch.len());
            let answer = self
                .exchange("check", object, Method::POST, &url, body, MAX_JSON_BODY)
                .await?
                .ok_or_else(|| self.no_route("check", object()))?;
            let answer: MissingResponse = serde_json::from_slice(&answer)
                .map_err(|e| self.protocol_error("check", object(), format!("bad answer: {e}")))?;
            for hex in &answer.missing {
                missing.push(self.parse_id("check", hex)?);
            }
        }
        Ok(missing)
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        let mut chunks = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let url = match &after {
                Some(after) => format!(
                    "{}/v1/chunks?after={after}&limit={MAX_LIST_PAGE}",
                    self.base
                ),
                None => format!("{}/v1/chunks?limit={MAX_LIST_PAGE}", self.base),
            };
            let page: ChunkPage = self.get_json("list", "chunk list", &url).await?;
            for entry in page.chunks {
                chunks.push(ListedChunk {
                    id: self.parse_id("list", &entry.id)?,
                    modified: from_unix_ns(entry.modified_unix_ns),
                    size: entry.size,
                });
            }
            match page.next {
                // Ids come in increasing order: a server that repeats or
                // goes back to a page would loop us forever.
                Some(next) if after.as_ref().is_none_or(|after| next > *after) => {
                    after = Some(next)
                }
                Some(_) => {
                    return Err(self.protocol_error(
                        "list",
                        "chunk list".into(),
                        "the listing does not advance".into(),
                    ))
                }
                None => return Ok(chunks),
            }
        }
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        let url = self.chunk_url(id);
        let object = || chunk_object(id);
        // An absent chunk (404) is already deleted.
        self.exchange(
            "delete",
            object,
            Method::DELETE,
            &url,
            Bytes::new(),
            MAX_JSON_BODY,
        )
        .await
        .map(drop)
    }

    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        let url = format!(
            "{}?older_than_unix_ns={}",
            self.chunk_url(id),
            unix_ns(cutoff)
        );
        let object = || chunk_object(id);
        let Some(answer) = self
            .exchange(
                "delete",
                object,
                Method::DELETE,
                &url,
                Bytes::new(),
                MAX_JSON_BODY,
            )
            .await?
        else {
            return Ok(false);
        };
        let answer: Deleted = serde_json::from_slice(&answer)
            .map_err(|e| self.protocol_error("delete", object(), format!("bad answer: {e}")))?;
        Ok(answer.deleted)
    }

    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        validate_manifest_name(name)?;
        let url = self.manifest_url(name);
        let object = || manifest_object(name);
        match self
            .exchange("write", object, Method::PUT, &url, manifest, MAX_JSON_BODY)
            .await?
        {
            Some(_) => Ok(()),
            None => Err(self.no_route("write", manifest_object(name))),
        }
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        validate_manifest_name(name)?;
        let url = self.manifest_url(name);
        let object = || manifest_object(name);
        self.exchange(
            "read",
            object,
            Method::GET,
            &url,
            Bytes::new(),
            MAX_MANIFEST_SIZE,
        )
        .await?
        .ok_or_else(|| StoreError::ManifestNotFound {
            store: self.base.clone(),
            name: name.to_owned(),
        })
    }

    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        validate_manifest_name(name)?;
        let url = self.manifest_url(name);
        let object = || manifest_object(name);
        match self
            .exchange(
                "delete",
                object,
                Method::DELETE,
                &url,
                Bytes::new(),
                MAX_JSON_BODY,
            )
            .await
        {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(self.no_route("delete", manifest_object(name))),
            Err(e) if refused_method(&e) => Err(StoreError::Io {
                op: "delete",
                store: self.base.clone(),
                object: manifest_object(name),
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the chunk server does not support removing manifests (405): it is older \
                     than this client",
                ),
            }),
            Err(e) => Err(e),
        }
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        let url = format!("{}/v1/manifests", self.base);
        let list: ManifestList = self.get_json("list", "manifest list", &url).await?;
        for name in &list.manifests {
            validate_manifest_name(name)?;
        }
        Ok(list.manifests)
    }

    fn describe(&self) -> String {
        self.base.clone()
    }

    fn retries_transient_failures(&self) -> bool {
        true
    }
}

/// Whether the server answered that it has no such method for the route
/// (405): a server older than the route.
fn refused_method(error: &StoreError) -> bool {
    let StoreError::Io { source, .. } = error else {
        return false;
    };
    source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<HttpError>())
        .is_some_and(|http| {
            matches!(http, HttpError::Status { status, .. } if *status == StatusCode::METHOD_NOT_ALLOWED)
        })
}
