//! A cache node reached over HTTP: `lazyblk serve` in cache mode, through
//! the process's shared [`HttpClient`].
//!
//! Routes: `GET /v1/shards/{chunk id}/{index}` (404 when the node does not
//! hold the shard) and `PUT /v1/shards/{chunk id}/{index}` with the shard
//! object as body. A request is tried once: the fleet replaces a shard
//! whose request failed with another node's, which is faster than a retry.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::Full;

use super::codec::Scheme;
use super::fleet::{EcFleetStore, SHARD_WRITE_TIMEOUT};
use super::node::ShardNode;
use super::shard::SHARD_HEADER_LEN;
use crate::chunk::ChunkId;
use crate::net::{HttpClient, HttpError};
use crate::store::{StoreError, StoreOptions, MAX_ENVELOPE_SIZE};

/// The largest shard object: a whole envelope in one data shard, padded.
pub const MAX_SHARD_OBJECT: usize = SHARD_HEADER_LEN + MAX_ENVELOPE_SIZE + 64;

/// One `lazyblk serve` cache node.
#[derive(Clone)]
pub struct HttpShardNode {
    client: HttpClient,
    /// The URL as given, without a trailing `/`.
    base: String,
    token: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for HttpShardNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpShardNode")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HttpShardNode {
    pub fn new(
        url: &str,
        client: HttpClient,
        token: Option<String>,
    ) -> Result<HttpShardNode, StoreError> {
        let invalid = |reason: &str| StoreError::InvalidSpec {
            spec: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https")
            || parsed.host_str().is_none_or(str::is_empty)
        {
            return Err(invalid(
                "a cache node is http://HOST:PORT or https://HOST:PORT",
            ));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty()
        {
            return Err(invalid(
                "a cache node URL has no query, fragment or credentials",
            ));
        }
        Ok(HttpShardNode {
            client,
            base: parsed.as_str().trim_end_matches('/').to_owned(),
            token,
            // The fleet bounds reads tighter itself.
            timeout: SHARD_WRITE_TIMEOUT,
        })
    }

    fn shard_url(&self, id: &ChunkId, index: u8) -> String {
        format!("{}/v1/shards/{}/{index}", self.base, id.to_hex())
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
        max_body: usize,
    ) -> Result<Option<Bytes>, HttpError> {
        let mut builder = Request::builder().method(method.clone()).uri(url);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = builder
            .header(header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .map_err(|source| HttpError::InvalidRequest {
                method: method.clone(),
                url: url.to_owned(),
                source,
            })?;
        let response = self.client.send(request, self.timeout, max_body).await?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(response.success(&method, url)?.body))
    }
}

#[async_trait]
impl ShardNode for HttpShardNode {
    async fn get_shard(&self, id: &ChunkId, index: u8) -> Result<Option<Bytes>, StoreError> {
        let url = self.shard_url(id, index);
        self.send(Method::GET, &url, Bytes::new(), MAX_SHARD_OBJECT)
            .await
            .map_err(|e| e.into_store_error("read", &self.base, format!("shard {id}/{index}")))
    }

    async fn put_shard(&self, id: &ChunkId, index: u8, object: Bytes) -> Result<(), StoreError> {
        let url = self.shard_url(id, index);
        let object_name = || format!("shard {id}/{index}");
        match self.send(Method::PUT, &url, object, 4096).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(StoreError::Io {
                op: "write",
                store: self.base.clone(),
                object: object_name(),
                source: std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "no shard route (404): is the node a `lazyblk serve` cache node?",
                ),
            }),
            Err(e) => Err(e.into_store_error("write", &self.base, object_name())),
        }
    }

    fn url(&self) -> &str {
        &self.base
    }
}

/// The fleet named on the command line: comma-separated node URLs, each a
/// `lazyblk serve` cache node, coded as `scheme`.
pub fn open_fleet(
    urls: &str,
    scheme: Scheme,
    options: &StoreOptions,
) -> Result<EcFleetStore, StoreError> {
    let client = options.http_client(urls, options.http2_prior_knowledge)?;
    let nodes = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            HttpShardNode::new(url, client.clone(), options.token.clone())
                .map(|node| Arc::new(node) as Arc<dyn ShardNode>)
        })
        .collect::<Result<Vec<_>, _>>()?;
    EcFleetStore::new(nodes, scheme)
}
