//! The one HTTP client every network store shares.
//!
//! A pooled hyper client over rustls (ring; webpki roots, or only the CA a
//! user names with `--tls-ca`, see [`tls`]): `http://` and `https://` alike, HTTP/2 where the server offers it through ALPN, or h2c
//! by prior knowledge when asked. Each exchange has a deadline for the whole
//! of it (headers and body), and a response body is read only up to a cap
//! the caller gives, so a misbehaving server can neither hang a read nor
//! make us buffer without bound. Failures come back as [`HttpError`], which
//! tells a transient failure (worth retrying) from a permanent one.

#![forbid(unsafe_code)]

mod error;
pub mod protocol;
pub mod tls;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use error::{is_transient_status, HttpError};
pub use tls::TlsError;

/// How long a connection attempt may take before it counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A chunk is up to 4 MiB: a stream window that holds a whole one keeps a
/// single HTTP/2 fetch from stalling on window updates.
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 32 << 20;

/// A cheaply cloned handle on a connection pool.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// A response read whole.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpClient {
    /// A new pool. With `h2c_prior_knowledge`, `http://` URLs speak HTTP/2
    /// from the first byte (the server must support h2c); otherwise they
    /// speak HTTP/1.1 and `https://` negotiates HTTP/2 where offered.
    pub fn new(h2c_prior_knowledge: bool) -> HttpClient {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            // The ring provider supports TLS 1.2 and 1.3, the only versions asked for.
            .expect("ring supports the default protocol versions");
        HttpClient::build(builder, h2c_prior_knowledge)
    }

    /// A new pool whose `https://` connections trust `tls` alone (see
    /// [`tls::client_config_trusting`]); ALPN is set here.
    pub fn with_tls(h2c_prior_knowledge: bool, tls: rustls::ClientConfig) -> HttpClient {
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        HttpClient::build(builder, h2c_prior_knowledge)
    }

    fn build(
        builder: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
        h2c_prior_knowledge: bool,
    ) -> HttpClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let builder = builder.https_or_http();
        let https = if h2c_prior_knowledge {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_all_versions().wrap_connector(http)
        };
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(h2c_prior_knowledge)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .build(https);
        HttpClient { inner }
    }

    /// The process-wide pool for this protocol choice and trust: webpki's
    /// roots without `ca`, else only the CA certificates in the PEM file
    /// `ca` (read once per process).
    pub fn shared_trusting(
        h2c_prior_knowledge: bool,
        ca: Option<&Path>,
    ) -> Result<HttpClient, TlsError> {
        let Some(ca) = ca else {
            return Ok(HttpClient::shared(h2c_prior_knowledge));
        };
        static TRUSTING: OnceLock<Mutex<HashMap<(bool, PathBuf), HttpClient>>> = OnceLock::new();
        let mut pools = TRUSTING
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (h2c_prior_knowledge, ca.to_owned());
        if let Some(client) = pools.get(&key) {
            return Ok(client.clone());
        }
        let client = HttpClient::with_tls(h2c_prior_knowledge, tls::client_config_trusting(ca)?);
        pools.insert(key, client.clone());
        Ok(client)
    }

    /// The process-wide pool for the given protocol choice: every store
    /// opened in one process shares its connections.
    pub fn shared(h2c_prior_knowledge: bool) -> HttpClient {
        static HTTP1: OnceLock<HttpClient> = OnceLock::new();
        static H2C: OnceLock<HttpClient> = OnceLock::new();
        let cell = if h2c_prior_knowledge { &H2C } else { &HTTP1 };
        cell.get_or_init(|| HttpClient::new(h2c_prior_knowledge))
            .clone()
    }

    /// Sends `request` and reads its response, whatever the status, within
    /// `timeout`; a body longer than `max_body` bytes is an error and is
    /// not read further.
    ///
    /// # Cancel safety
    /// Dropping the future drops the exchange; the connection is not reused.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response, HttpError> {
        let method = request.method().clone();
        let url = request.uri().to_string();
        let exchange = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|source| HttpError::transport(method.clone(), url.clone(), source))?;
            let (parts, body) = response.into_parts();
            let declared = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            // A HEAD answer's length describes the body a GET would get,
            // and it carries none, so there is nothing to bound.
            let carries_body = method != http::Method::HEAD;
            if carries_body && declared.is_some_and(|len| len > max_body as u64) {
                return Err(HttpError::BodyTooLarge {
                    method: method.clone(),
                    url: url.clone(),
                    limit: max_body,
                });
            }
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|source| {
                    if source.is::<LengthLimitError>() {
                        HttpError::BodyTooLarge {
                            method: method.clone(),
                            url: url.clone(),
                            limit: max_body,
                        }
                    } else {
                        HttpError::body(method.clone(), url.clone(), source)
                    }
                })?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                method,
                url,
                after: timeout,
            }),
        }
    }
}

impl Response {
    /// The response if its status is a success, else a [`HttpError::Status`]
    /// carrying the start of the body (servers put their reason there).
    pub fn success(self, method: &http::Method, url: &str) -> Result<Response, HttpError> {
        if self.status.is_success() {
            return Ok(self);
        }
        Err(HttpError::Status {
            method: method.clone(),
            url: url.to_owned(),
            status: self.status,
            reason: error::reason_text(&self.body),
        })
    }
}
