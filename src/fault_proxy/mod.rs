//! A loopback HTTP proxy that injects faults between a client and an HTTP
//! store (a chunk server, an S3 endpoint): latency, 5xx answers, connection
//! resets, stalls, truncated bodies and flipped bits, at configured rates
//! (see [`plan`]), counting what it did.
//!
//! It exists to test the read path against a misbehaving network: tests
//! and `scripts/soak.sh` put it (`lazyblk fault-proxy`) between devices
//! and a chunk server. Both ends must be on loopback.
//!
//! Control routes, answered by the proxy itself and never forwarded:
//! `GET /_fault-proxy/stats` (the [`FaultCounts`] as JSON) and
//! `PUT /_fault-proxy/rates` (new [`FaultRates`] as JSON; requests stalled
//! until then are released and forwarded).

#![forbid(unsafe_code)]

pub mod plan;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use plan::Outcome;
pub use plan::{FaultCounts, FaultRates, Plan};

use crate::net::HttpClient;

/// The prefix of the proxy's own routes.
pub const CONTROL_PREFIX: &str = "/_fault-proxy/";
/// Most bytes of a request or response body passed through.
const MAX_BODY: usize = crate::store::MAX_MANIFEST_SIZE;
/// How long one forwarded exchange may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);
/// A stall ends after this long if neither the client nor a change of
/// rates ended it first, so stalled tasks never pile up without bound.
const MAX_STALL: Duration = Duration::from_secs(120);
/// Headers that describe one hop, not the message.
const HOP_HEADERS: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

type Reply = Response<Full<Bytes>>;

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FaultProxyError {
    #[error("the fault proxy listens on loopback only, not {0}")]
    ListenNotLoopback(SocketAddr),
    #[error("upstream {url:?}: {reason}")]
    Upstream { url: String, reason: String },
    #[error("invalid fault rates: {0}")]
    Rates(String),
    #[error("listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound, not yet serving, fault proxy.
#[derive(Debug)]
pub struct FaultProxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The upstream's base URL, without a trailing `/`.
    upstream: String,
    client: HttpClient,
    plan: Plan,
    /// Woken when the rates change: stalled requests go on.
    rates_changed: Notify,
}

impl FaultProxy {
    /// Binds `listen` (loopback; port 0 picks a free one) in front of
    /// `upstream` (`http://` on loopback).
    pub async fn bind(
        listen: SocketAddr,
        upstream: &str,
        rates: FaultRates,
        seed: u64,
    ) -> Result<FaultProxy, FaultProxyError> {
        if !listen.ip().is_loopback() {
            return Err(FaultProxyError::ListenNotLoopback(listen));
        }
        rates.validate().map_err(FaultProxyError::Rates)?;
        let upstream = loopback_upstream(upstream)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| FaultProxyError::Bind {
                addr: listen,
                source,
            })?;
        Ok(FaultProxy {
            listener,
            shared: Arc::new(Shared {
                upstream,
                client: HttpClient::new(false),
                plan: Plan::new(rates, seed),
                rates_changed: Notify::new(),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped. Each connection speaks HTTP/1.1.
    pub async fn run(self) {
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // A second handle on the socket lets a handler turn the close
            // hyper does on an error into a reset (SO_LINGER 0).
            let Ok(socket) = stream_handle(&stream) else {
                continue;
            };
            let socket = Arc::new(Mutex::new(Some(socket)));
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                let handle = Arc::clone(&socket);
                let service = hyper::service::service_fn(move |request| {
                    answer(Arc::clone(&shared), Arc::clone(&handle), request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(socket);
            });
        }
    }
}

fn stream_handle(stream: &tokio::net::TcpStream) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsFd;
    stream.as_fd().try_clone_to_owned()
}

/// The upstream URL, checked: `http://` to a loopback host.
fn loopback_upstream(url: &str) -> Result<String, FaultProxyError> {
    let invalid = |reason: &str| FaultProxyError::Upstream {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(&format!("not a URL: {e}")))?;
    if parsed.scheme() != "http" {
        return Err(invalid("the upstream is an http:// URL"));
    }
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    if !loopback {
        return Err(invalid("the upstream must be on loopback"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("the upstream URL has no query or fragment"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// The answer to one request; an `Err` makes hyper drop the connection,
/// which the reset outcome turns into an RST.
async fn answer(
    shared: Arc<Shared>,
    socket: Arc<Mutex<Option<OwnedFd>>>,
    request: Request<Incoming>,
) -> Result<Reply, ResetConnection> {
    if let Some(route) = request.uri().path().strip_prefix(CONTROL_PREFIX) {
        let route = route.to_owned();
        return Ok(control(&shared, &route, request).await);
    }
    let is_get = request.method() == Method::GET;
    let (outcome, latency) = shared.plan.draw(is_get, request.uri().path());
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match outcome {
        Outcome::Error => {
            shared.plan.record(outcome);
            return Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "fault proxy: injected error",
            ));
        }
        Outcome::Reset => {
            shared.plan.record(outcome);
            reset(&socket);
            return Err(ResetConnection);
        }
        Outcome::Stall => {
            shared.plan.record(outcome);
            let released = shared.rates_changed.notified();
            if tokio::time::timeout(MAX_STALL, released).await.is_err() {
                return Ok(text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "fault proxy: stalled request ended",
                ));
            }
        }
        _ => {}
    }
    let mut reply = match forward(&shared, request).await {
        Ok(reply) => reply,
        Err(reason) => {
            shared.plan.upstream_failed();
            return Ok(text(StatusCode::BAD_GATEWAY, &reason));
        }
    };
    if !matches!(outcome, Outcome::Truncate | Outcome::Flip) {
        shared.plan.record(Outcome::Forward);
        return Ok(reply);
    }
    let body = reply.body_mut();
    let bytes = body
        .collect()
        .await
        .map_or_else(|n| match n {}, |c| c.to_bytes());
    let damaged = (reply.status().is_success() && !bytes.is_empty())
        .then(|| damage(&shared.plan, outcome, &bytes));
    let bytes = match damaged {
        Some(damaged) => {
            shared.plan.record(outcome);
            damaged
        }
        None => {
            shared.plan.record(Outcome::Forward);
            bytes
        }
    };
    reply.headers_mut().remove(header::CONTENT_LENGTH);
    *reply.body_mut() = Full::new(bytes);
    Ok(reply)
}

/// `bytes` cut short or with one bit flipped.
fn damage(plan: &Plan, outcome: Outcome, bytes: &Bytes) -> Bytes {
    let at = plan.position(bytes.len());
    match outcome {
        Outcome::Truncate => bytes.slice(..at),
        _ => {
            let mut flipped = bytes.to_vec();
            flipped[at] ^= 1 << plan.position(8);
            Bytes::from(flipped)
        }
    }
}

/// Makes the coming close of `socket` a reset: no FIN, the peer reads
/// ECONNRESET.
fn reset(socket: &Mutex<Option<OwnedFd>>) {
    let mut socket = socket.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(fd) = socket.take() {
        if let Err(error) = rustix::net::sockopt::set_socket_linger(&fd, Some(Duration::ZERO)) {
            tracing::debug!(%error, "could not arm a reset; the connection closes instead");
        }
        // Dropping this handle leaves hyper's the last, so its close resets.
        drop(fd);
    }
}

/// The error that makes hyper drop a connection without an answer.
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault proxy: injected connection reset")
    }
}

impl std::error::Error for ResetConnection {}

/// Passes `request` to the upstream and its answer back.
async fn forward(shared: &Shared, request: Request<Incoming>) -> Result<Reply, String> {
    let (parts, body) = request.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("fault proxy: reading the request body: {e}"))?
        .to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", shared.upstream);
    let mut upstream = Request::builder()
        .method(parts.method.clone())
        .uri(&url)
        .body(Full::new(body))
        .map_err(|e| format!("fault proxy: bad request: {e}"))?;
    *upstream.headers_mut() = end_to_end(&parts.headers);
    upstream.headers_mut().remove(header::HOST);
    let answer = shared
        .client
        .send(upstream, UPSTREAM_TIMEOUT, MAX_BODY)
        .await
        .map_err(|e| format!("fault proxy: {}", crate::error::chain(&e)))?;
    let mut reply = Response::new(Full::new(answer.body));
    *reply.status_mut() = answer.status;
    let mut headers = end_to_end(&answer.headers);
    // A HEAD answer's length describes the body a GET would get; any
    // other answer's is set again from the body sent.
    if parts.method != Method::HEAD {
        headers.remove(header::CONTENT_LENGTH);
    }
    *reply.headers_mut() = headers;
    Ok(reply)
}

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    for name in &HOP_HEADERS {
        kept.remove(name);
    }
    kept.remove("keep-alive");
    kept
}

async fn control(shared: &Shared, route: &str, request: Request<Incoming>) -> Reply {
    match (request.method(), route) {
        (&Method::GET, "stats") => json(&shared.plan.counts()),
        (&Method::GET, "rates") => json(&shared.plan.rates()),
        (&Method::PUT, "rates") => {
            let body = match Limited::new(request.into_body(), 64 << 10).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            let rates: FaultRates = match serde_json::from_slice(&body) {
                Ok(rates) => rates,
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("not rates: {e}")),
            };
            if let Err(reason) = rates.validate() {
                return text(StatusCode::BAD_REQUEST, &reason);
            }
            shared.plan.set_rates(rates.clone());
            shared.rates_changed.notify_waiters();
            json(&rates)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "fault proxy routes: GET stats, GET rates, PUT rates",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *reply.status_mut() = status;
    reply
}

fn json(value: &impl serde::Serialize) -> Reply {
    let body = serde_json::to_vec(value).expect("counts and rates serialize");
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

#[cfg(test)]
mod tests;
