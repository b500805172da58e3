//! The chunk server (`lazyblk serve`): a store's chunks and manifests over
//! HTTP/1.1 (keep-alive) and HTTP/2 (h2c), or over TLS with either chosen by
//! ALPN, the protocol [`crate::store::http`] speaks.
//!
//! Routes (see [`crate::net::protocol`]): `GET`/`HEAD /v1/chunks/{id}` (single Range),
//! `PUT`/`DELETE /v1/chunks/{id}`, `POST /v1/chunks/missing`,
//! `GET /v1/chunks?after=ID&limit=N`, `GET`/`PUT`/`DELETE /v1/manifests/{name}`,
//! `GET /v1/manifests`, `GET`/`PUT /v1/shards/{id}/{index}` (a cache
//! fleet node's shards, see `shards.rs`), and `GET /metrics`.
//!
//! The server trusts no client: every request body is bounded and read
//! within a deadline, a connection must finish its request head within a
//! deadline, connections are capped in number, and a malformed request is
//! answered with a 4xx status and a one-line reason, never a panic.
//! Writes need the write token; reads need the read token if one is set.

#![forbid(unsafe_code)]
// Handlers return `Result<Reply, Reply>`: a refusal is already the answer to
// send, built once on a path that is not hot, so boxing it buys nothing.
#![allow(clippy::result_large_err)]

mod auth;
mod chunks;
mod link;
mod manifests;
mod outgoing;
mod reply;
mod routes;
mod shards;
mod upload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

pub use auth::Tokens;

use crate::metrics::Registry;
use crate::store::ec::ShardCache;
use crate::store::ChunkStore;

/// How the server treats its clients.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub tokens: Tokens,
    /// Added before every chunk (and shard) GET is answered: a stand-in
    /// for a distant origin, or a slow fleet node, in benchmarks and tests.
    pub chunk_delay: Duration,
    /// Bytes a second all chunk answers share, sent one after another
    /// (after `chunk_delay`): a stand-in for a distant origin's link, in
    /// benchmarks. `None`: as fast as the connection goes.
    pub chunk_rate: Option<u64>,
    /// A connection must send a whole request head within this long.
    pub header_timeout: Duration,
    /// A request body must arrive whole within this long.
    pub body_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Bytes of erasure-coded shards kept in memory for a cache fleet
    /// (`/v1/shards`); `None`: the server is no fleet node.
    pub shard_cache_size: Option<u64>,
    /// Requests one HTTP/2 connection may have in flight at once.
    pub h2_max_streams: u32,
    /// A connection with responses to send that takes none of their bytes
    /// for this long is closed (see `outgoing.rs`).
    pub send_timeout: Duration,
    /// Serve HTTPS with these settings (see [`crate::net::tls`]) instead
    /// of plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A first listing page asked without the write token is cut from a
    /// listing of the store begun at most this long before it was asked,
    /// so readers cost the store at most one whole listing per this long
    /// (see `chunks::ListingSnapshot`).
    pub listing_reuse: Duration,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            tokens: Tokens::default(),
            chunk_delay: Duration::ZERO,
            chunk_rate: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
            shard_cache_size: None,
            h2_max_streams: 128,
            send_timeout: Duration::from_secs(60),
            tls: None,
            listing_reuse: Duration::from_secs(5),
        }
    }
}

/// What every request handler shares.
#[derive(Debug)]
struct State {
    store: Arc<dyn ChunkStore>,
    /// A fleet node's shards: a cache of their own, never in `store`.
    shards: Option<ShardCache>,
    options: ServerOptions,
    /// Where `chunk_rate` is kept.
    link: Option<link::Link>,
    metrics: routes::Metrics,
    listing: chunks::ListingSnapshot,
    /// The send deadline's settings and counters; each connection takes
    /// its own copy.
    send_deadline: outgoing::SendDeadline,
}

/// The server's request handling alone, without a listener: a request
/// handed to [`Handler::answer`] is answered as one from a connection
/// would be (tests and fuzzing drive it without sockets).
#[derive(Debug, Clone)]
pub struct Handler {
    state: Arc<State>,
}

impl Handler {
    /// `registry` receives the metrics of the requests answered.
    pub fn new(
        store: Arc<dyn ChunkStore>,
        options: ServerOptions,
        registry: Arc<Registry>,
    ) -> Handler {
        // A cache-mode store's layers (memory, disk, origin).
        crate::store::metrics::export(&registry, "lazyblk_store", &[], store.clone());
        let state = Arc::new(State {
            store,
            shards: options.shard_cache_size.map(ShardCache::new),
            link: options
                .chunk_rate
                .filter(|&rate| rate > 0)
                .map(link::Link::new),
            send_deadline: outgoing::SendDeadline::new(options.send_timeout, &registry),
            options,
            metrics: routes::Metrics::new(registry),
            listing: chunks::ListingSnapshot::default(),
        });
        Handler { state }
    }

    /// The answer to `request`, refusals included.
    pub async fn answer(&self, request: http::Request<Full<Bytes>>) -> http::Response<Full<Bytes>> {
        let request = request.map(|body| body.map_err(|never| match never {}).boxed_unsync());
        routes::answer(&self.state, request)
            .await
            .map(|body| Full::new(body.into_bytes()))
    }
}

/// A bound, not yet serving, chunk server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    state: Arc<State>,
}

/// The HTTP/2 connection preface; a connection whose first bytes are a
/// prefix of it may still turn out to speak HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Server {
    /// Binds `addr` (port 0 picks a free port); `registry` receives the
    /// server's metrics.
    pub async fn bind(
        addr: SocketAddr,
        store: Arc<dyn ChunkStore>,
        options: ServerOptions,
        registry: Arc<Registry>,
    ) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let Handler { state } = Handler::new(store, options, registry);
        Ok(Server { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets the
    /// requests in flight finish (up to the shutdown grace) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let options = &self.state.options;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_timeout)
            .max_buf_size(64 * 1024);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(options.h2_max_streams)
            // What h2 buffers per stream beyond what the client's window
            // lets out: the rest of a body waits in it, frame by frame.
            .max_send_buf_size(2 * outgoing::FRAME)
            .max_header_list_size(16 * 1024)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(256 * 1024)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let graceful = GracefulShutdown::new();
        let open = self.state.metrics.registry.gauge(
            "lazyblk_http_open_connections",
            "Client connections open now.",
            &[],
        );
        let permits = Arc::new(Semaphore::new(options.max_connections));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => permit.expect("never closed"),
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, most likely: pause, then go on.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let state = Arc::clone(&self.state);
            let builder = builder.clone();
            let watcher = graceful.watcher();
            let open = Arc::clone(&open);
            tokio::spawn(async move {
                let _permit = permit;
                open.add(1);
                let _closed = Closed(&open);
                let limit = state.options.header_timeout;
                let Some(tls) = state.options.tls.clone() else {
                    if !preface_arrives(&stream, limit).await {
                        tracing::debug!(%peer, "closed a connection that sent no request in time");
                        return;
                    }
                    serve_connection(builder, stream, state, watcher, peer).await;
                    return;
                };
                let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
                let stream = match tokio::time::timeout(limit, accept).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "closed a connection that did not finish its TLS handshake in time");
                        return;
                    }
                };
                // ALPN said which protocol follows: no sniffing, so no
                // partial preface can stall the connection.
                let builder = match stream.get_ref().1.alpn_protocol() {
                    Some(crate::net::tls::ALPN_H2) => builder.http2_only(),
                    _ => builder.http1_only(),
                };
                serve_connection(builder, stream, state, watcher, peer).await;
            });
        }
        drop(self.listener);
        let grace = self.state.options.shutdown_grace;
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("requests still in flight after {grace:?}; stopping anyway");
        }
    }
}

/// Serves requests on one accepted (and, with TLS, handshaken) connection
/// until it closes or the server shuts down.
async fn serve_connection<S>(
    builder: auto::Builder<TokioExecutor>,
    stream: S,
    state: Arc<State>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let deadline = state.send_deadline.for_connection();
    let replies_deadline = deadline.clone();
    let service = hyper::service::service_fn(move |request| {
        let (state, deadline) = (Arc::clone(&state), replies_deadline.clone());
        async move {
            let mut reply = routes::handle(state, request).await?;
            deadline.watch(reply.body_mut());
            Ok::<_, std::convert::Infallible>(reply)
        }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        ended = watcher.watch(connection.into_owned()) => {
            if let Err(error) = ended {
                tracing::debug!(%peer, error = %error, "connection ended");
            }
        }
        // Dropping the connection closes it and frees what it held.
        () = deadline.abandoned() => {
            tracing::info!(%peer, "closed a connection that took no response bytes for the send deadline");
        }
    }
}

/// Counts a connection closed however its task ends.
struct Closed<'a>(&'a crate::metrics::Gauge);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

/// Waits until the connection's first bytes tell HTTP/1 from HTTP/2, and
/// says whether they came within `limit`. The protocol sniffing that
/// follows has no deadline of its own, so without this a client that sends
/// part of the HTTP/2 preface and stalls would hold its connection forever.
async fn preface_arrives(stream: &TcpStream, limit: Duration) -> bool {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if n == buf.len() || buf[..n] != H2_PREFACE[..n] {
                return Some(());
            }
            // A partial preface: peek returns at once until more arrives.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    matches!(tokio::time::timeout(limit, sniff).await, Ok(Some(())))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_listing;
#[cfg(test)]
mod tests_tls;
#[cfg(test)]
mod tests_unread;
#[cfg(test)]
mod tests_upload;
