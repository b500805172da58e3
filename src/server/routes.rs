//! From a request to the handler of its route, and the metrics of each
//! answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};

use super::auth::{Access, Refusal};
use super::reply::{refuse, reply, Handled, Reply, RequestBody};
use super::{chunks, manifests, shards, State};
use crate::metrics::{Registry, LATENCY_BUCKETS};

/// Answers one request of a connection.
pub(super) async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Reply, Infallible> {
    Ok(answer(&state, request.map(BodyExt::boxed_unsync)).await)
}

/// Answers one request; every outcome, refusals included, is an answer.
pub(super) async fn answer(state: &State, request: Request<RequestBody>) -> Reply {
    let started = Instant::now();
    let received = request.body().size_hint().exact().unwrap_or(0);
    // Method and path only: headers carry the bearer token.
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let (route, reply) = dispatch(state, request).await;
    let reply = reply.unwrap_or_else(|refusal| refusal);
    let sent = reply.body().size_hint().exact().unwrap_or(0);
    tracing::debug!(%method, path, status = reply.status().as_u16(), sent, "answered");
    state
        .metrics
        .record(route, reply.status(), received, sent, started.elapsed());
    reply
}

async fn dispatch(state: &State, request: Request<RequestBody>) -> (&'static str, Handled) {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let method = &parts.method;
    match segments.as_slice() {
        ["metrics"] => match *method {
            Method::GET => ("metrics", Ok(metrics_text(&state.metrics.registry))),
            _ => ("metrics", Err(not_allowed("GET"))),
        },
        ["v1", "chunks"] => match *method {
            Method::GET => ("chunk_list", chunks::list(state, &parts).await),
            _ => ("chunk_list", Err(not_allowed("GET"))),
        },
        ["v1", "chunks", "missing"] => match *method {
            Method::POST => ("chunk_missing", chunks::missing(state, &parts, body).await),
            _ => ("chunk_missing", Err(not_allowed("POST"))),
        },
        ["v1", "chunks", id] => match *method {
            Method::GET => ("chunk_get", chunks::get(state, id, &parts, false).await),
            Method::HEAD => ("chunk_head", chunks::get(state, id, &parts, true).await),
            Method::PUT => ("chunk_put", chunks::put(state, id, &parts, body).await),
            Method::DELETE => ("chunk_delete", chunks::delete(state, id, &parts).await),
            _ => ("chunk", Err(not_allowed("GET, HEAD, PUT, DELETE"))),
        },
        ["v1", "manifests"] => match *method {
            Method::GET => ("manifest_list", manifests::list(state, &parts).await),
            _ => ("manifest_list", Err(not_allowed("GET"))),
        },
        ["v1", "manifests", name] => match *method {
            Method::GET => (
                "manifest_get",
                manifests::get(state, name, &parts, false).await,
            ),
            Method::HEAD => (
                "manifest_head",
                manifests::get(state, name, &parts, true).await,
            ),
            Method::PUT => (
                "manifest_put",
                manifests::put(state, name, &parts, body).await,
            ),
            Method::DELETE => (
                "manifest_delete",
                manifests::delete(state, name, &parts).await,
            ),
            _ => ("manifest", Err(not_allowed("GET, HEAD, PUT, DELETE"))),
        },
        ["v1", "shards", id, index] => match *method {
            Method::GET => ("shard_get", shards::get(state, id, index, &parts).await),
            Method::PUT => (
                "shard_put",
                shards::put(state, id, index, &parts, body).await,
            ),
            _ => ("shard", Err(not_allowed("GET, PUT"))),
        },
        _ => (
            "unknown",
            Err(refuse(
                StatusCode::NOT_FOUND,
                "no such route: chunks are at /v1/chunks/ID, manifests at /v1/manifests/NAME",
            )),
        ),
    }
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut reply = refuse(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this route takes {allow}"),
    );
    reply
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    reply
}

impl State {
    /// Lets the request through if its token grants `access`.
    pub(super) fn allow(&self, headers: &http::HeaderMap, access: Access) -> Result<(), Reply> {
        match self.options.tokens.check(headers, access) {
            Ok(()) => Ok(()),
            Err(Refusal::NoWrites) => Err(refuse(
                StatusCode::FORBIDDEN,
                "this server takes no writes (it has no write token)",
            )),
            Err(Refusal::Unauthorized(reason)) => {
                let mut reply = refuse(StatusCode::UNAUTHORIZED, reason);
                reply
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Err(reply)
            }
        }
    }
}

/// Requests, bytes and latencies per route.
#[derive(Debug)]
pub(super) struct Metrics {
    pub(super) registry: Arc<Registry>,
}

impl Metrics {
    pub(super) fn new(registry: Arc<Registry>) -> Metrics {
        Metrics { registry }
    }

    fn record(
        &self,
        route: &'static str,
        status: StatusCode,
        received: u64,
        sent: u64,
        elapsed: std::time::Duration,
    ) {
        let registry = &self.registry;
        let by_route = [("route", route)];
        registry
            .counter(
                "lazyblk_http_requests_total",
                "Requests answered, by route and status.",
                &[("route", route), ("status", status.as_str())],
            )
            .inc();
        registry
            .counter(
                "lazyblk_http_received_bytes_total",
                "Request body bytes received, by route.",
                &by_route,
            )
            .add(received);
        registry
            .counter(
                "lazyblk_http_sent_bytes_total",
                "Response body bytes sent, by route.",
                &by_route,
            )
            .add(sent);
        registry
            .histogram(
                "lazyblk_http_request_duration_seconds",
                "Time from a request's head to its answer, by route.",
                &by_route,
                LATENCY_BUCKETS,
            )
            .observe(elapsed);
    }
}

/// The Prometheus text of `registry`.
fn metrics_text(registry: &Registry) -> Reply {
    let mut response = reply(StatusCode::OK, registry.render());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}
