//! The server and the HTTP store together, over real connections on
//! 127.0.0.1, in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Server, ServerOptions, Tokens};
use crate::chunk::ChunkId;
use crate::metrics::Registry;
use crate::net::{HttpClient, Response};
use crate::store::dir::DirStore;
use crate::store::http::{HttpStore, HttpStoreTiming};
use crate::store::{ChunkStore, MAX_ENVELOPE_SIZE};

const WRITE: &str = "write-secret";
const READ: &str = "read-secret";

pub(super) struct Running {
    pub(super) addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    pub(super) registry: Arc<Registry>,
}

impl Running {
    pub(super) async fn start(
        store: Arc<dyn ChunkStore>,
        addr: SocketAddr,
        options: ServerOptions,
    ) -> Running {
        let registry = Registry::new();
        let server = Server::bind(addr, store, options, Arc::clone(&registry))
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            stop: Some(stop),
            task,
            registry,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(super) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) fn dir_store(dir: &tempfile::TempDir) -> Arc<dyn ChunkStore> {
    Arc::new(DirStore::open(&dir.path().join("store")).unwrap())
}

pub(super) fn options(read: Option<&str>, write: Option<&str>) -> ServerOptions {
    ServerOptions {
        tokens: Tokens::new(read, write),
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    }
}

async fn start(dir: &tempfile::TempDir, options: ServerOptions) -> Running {
    Running::start(dir_store(dir), "127.0.0.1:0".parse().unwrap(), options).await
}

fn http_store(url: &str, token: Option<&str>) -> HttpStore {
    HttpStore::new(
        url,
        HttpClient::shared(false),
        token.map(str::to_owned),
        HttpStoreTiming::default(),
    )
    .unwrap()
}

async fn send(
    client: &HttpClient,
    method: Method,
    url: String,
    headers: &[(header::HeaderName, &str)],
    body: Bytes,
) -> Response {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    let request = request.body(Full::new(body)).unwrap();
    client
        .send(request, Duration::from_secs(10), 8 << 20)
        .await
        .unwrap()
}

fn bearer(token: &str) -> (header::HeaderName, String) {
    (header::AUTHORIZATION, format!("Bearer {token}"))
}

#[tokio::test]
async fn the_http_store_keeps_the_garbage_collection_contract() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, options(None, Some(WRITE))).await;
    let store = http_store(&server.url(), Some(WRITE));
    crate::store::contract::check_gc_contract(&store, Duration::from_millis(20)).await;
}

#[tokio::test]
async fn chunks_round_trip_with_cache_headers_ranges_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, options(None, Some(WRITE))).await;
    let store = http_store(&server.url(), Some(WRITE));
    let envelopes: Vec<Bytes> = (0..5u8)
        .map(|n| Bytes::from(vec![n; 1000 + n as usize]))
        .collect();
    let ids: Vec<ChunkId> = envelopes.iter().map(|e| ChunkId::of_envelope(e)).collect();
    assert_eq!(store.missing(&ids).await.unwrap(), ids);
    for (id, envelope) in ids.iter().zip(&envelopes) {
        store.put(id, envelope.clone()).await.unwrap();
    }
    assert!(store.missing(&ids).await.unwrap().is_empty());
    assert_eq!(store.get(&ids[2]).await.unwrap(), envelopes[2]);
    let absent = ChunkId::of_envelope(b"absent");
    assert_eq!(
        store.get(&absent).await.unwrap_err().kind(),
        crate::error::ErrorKind::NotFound
    );
    store
        .put_manifest("app", Bytes::from_static(b"sealed"))
        .await
        .unwrap();
    assert_eq!(store.get_manifest("app").await.unwrap(), &b"sealed"[..]);
    assert_eq!(store.list_manifests().await.unwrap(), ["app"]);

    let client = HttpClient::new(false);
    let url = format!("{}/v1/chunks/{}", server.url(), ids[1]);
    let whole = send(&client, Method::GET, url.clone(), &[], Bytes::new()).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.headers[header::ETAG], format!("\"{}\"", ids[1]));
    assert_eq!(
        whole.headers[header::CACHE_CONTROL],
        "public, max-age=31536000, immutable"
    );
    let part = send(
        &client,
        Method::GET,
        url.clone(),
        &[(header::RANGE, "bytes=10-19")],
        Bytes::new(),
    )
    .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, envelopes[1].slice(10..20));
    assert_eq!(part.headers[header::CONTENT_RANGE], "bytes 10-19/1001");
    let beyond = send(
        &client,
        Method::GET,
        url.clone(),
        &[(header::RANGE, "bytes=5000-")],
        Bytes::new(),
    )
    .await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.headers[header::CONTENT_RANGE], "bytes */1001");
    let head = send(&client, Method::HEAD, url.clone(), &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers[header::CONTENT_LENGTH], "1001");
    assert!(head.body.is_empty());
    let etag = format!("\"{}\"", ids[1]);
    let cached = send(
        &client,
        Method::GET,
        url,
        &[(header::IF_NONE_MATCH, &etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);

    // Pages in id order that together hold every chunk once.
    let mut sorted = ids.clone();
    sorted.sort();
    let mut after = String::new();
    let mut listed = Vec::new();
    loop {
        let query = match after.as_str() {
            "" => "limit=2".to_owned(),
            after => format!("limit=2&after={after}"),
        };
        let page = send(
            &client,
            Method::GET,
            format!("{}/v1/chunks?{query}", server.url()),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        let page: crate::net::protocol::ChunkPage = serde_json::from_slice(&page.body).unwrap();
        assert!(page.chunks.len() <= 2);
        listed.extend(page.chunks.iter().map(|c| c.id.parse::<ChunkId>().unwrap()));
        if listed.len() == 2 {
            // A chunk written mid-walk joins the next walk, not this one.
            let late = Bytes::from_static(b"late");
            store.put(&ChunkId::of_envelope(&late), late).await.unwrap();
        }
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(listed, sorted);
    let all = store.list().await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all.iter().filter(|c| c.size >= 1000).count(), 5);

    let metrics = server.registry.render();
    assert!(
        metrics.contains("lazyblk_http_requests_total{route=\"chunk_put\",status=\"204\"} 6"),
        "{metrics}"
    );
    assert!(metrics.contains("lazyblk_http_request_duration_seconds_bucket{route=\"chunk_get\""));
    assert!(
        metrics.contains("lazyblk_http_open_connections "),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_requests_get_a_4xx_and_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, options(None, Some(WRITE))).await;
    let client = HttpClient::new(false);
    let (auth, token) = bearer(WRITE);
    let with_token = [(auth, token.as_str())];
    let base = server.url();
    let expect = |response: Response, status: StatusCode, needle: &str| {
        assert_eq!(response.status, status, "{:?}", response.body);
        let text = String::from_utf8_lossy(&response.body).into_owned();
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    };

    let bad_id = send(
        &client,
        Method::GET,
        format!("{base}/v1/chunks/xyz"),
        &[],
        Bytes::new(),
    )
    .await;
    expect(bad_id, StatusCode::BAD_REQUEST, "malformed chunk id");
    let id = ChunkId::of_envelope(b"right");
    let wrong_hash = send(
        &client,
        Method::PUT,
        format!("{base}/v1/chunks/{id}"),
        &with_token,
        Bytes::from_static(b"wrong"),
    )
    .await;
    expect(wrong_hash, StatusCode::BAD_REQUEST, "SHA-256");
    let big = Bytes::from(vec![0u8; MAX_ENVELOPE_SIZE + 1]);
    let oversized = send(
        &client,
        Method::PUT,
        format!("{base}/v1/chunks/{}", ChunkId::of_envelope(&big)),
        &with_token,
        big,
    )
    .await;
    expect(oversized, StatusCode::PAYLOAD_TOO_LARGE, "larger than");
    let unknown = send(
        &client,
        Method::GET,
        format!("{base}/v2/anything"),
        &[],
        Bytes::new(),
    )
    .await;
    expect(unknown, StatusCode::NOT_FOUND, "no such route");
    let wrong_method = send(
        &client,
        Method::POST,
        format!("{base}/v1/chunks/{id}"),
        &with_token,
        Bytes::new(),
    )
    .await;
    assert_eq!(
        wrong_method.headers[header::ALLOW],
        "GET, HEAD, PUT, DELETE"
    );
    expect(wrong_method, StatusCode::METHOD_NOT_ALLOWED, "takes");
    let bad_json = send(
        &client,
        Method::POST,
        format!("{base}/v1/chunks/missing"),
        &with_token,
        Bytes::from_static(b"[1,2]"),
    )
    .await;
    expect(bad_json, StatusCode::BAD_REQUEST, "ids");
    let too_many =
        serde_json::to_vec(&serde_json::json!({"ids": vec![id.to_hex(); 10_001]})).unwrap();
    let too_many = send(
        &client,
        Method::POST,
        format!("{base}/v1/chunks/missing"),
        &with_token,
        too_many.into(),
    )
    .await;
    expect(too_many, StatusCode::PAYLOAD_TOO_LARGE, "at most 10000 ids");
    let bad_name = send(
        &client,
        Method::GET,
        format!("{base}/v1/manifests/.hidden"),
        &[],
        Bytes::new(),
    )
    .await;
    expect(bad_name, StatusCode::BAD_REQUEST, "invalid name");
    let bad_limit = send(
        &client,
        Method::GET,
        format!("{base}/v1/chunks?limit=0"),
        &[],
        Bytes::new(),
    )
    .await;
    expect(bad_limit, StatusCode::BAD_REQUEST, "limit");
    let absent = send(
        &client,
        Method::GET,
        format!("{base}/v1/manifests/none"),
        &[],
        Bytes::new(),
    )
    .await;
    expect(absent, StatusCode::NOT_FOUND, "not found");
}

#[tokio::test]
async fn writes_need_the_write_token_and_reads_the_read_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, options(Some(READ), Some(WRITE))).await;
    let envelope = Bytes::from_static(b"chunk");
    let id = ChunkId::of_envelope(&envelope);
    for token in [None, Some(READ), Some("guess")] {
        let error = http_store(&server.url(), token)
            .put(&id, envelope.clone())
            .await
            .unwrap_err();
        assert!(
            crate::error::chain(&error).contains("401"),
            "{token:?}: {error}"
        );
    }
    http_store(&server.url(), Some(WRITE))
        .put(&id, envelope.clone())
        .await
        .unwrap();
    let error = http_store(&server.url(), None).get(&id).await.unwrap_err();
    assert!(
        crate::error::chain(&error).contains("401 Unauthorized: this needs a bearer token"),
        "{error}"
    );
    assert_eq!(
        http_store(&server.url(), Some(READ))
            .get(&id)
            .await
            .unwrap(),
        envelope
    );
    assert_eq!(
        http_store(&server.url(), Some(WRITE))
            .get(&id)
            .await
            .unwrap(),
        envelope
    );
    // Removing a trace is a write, and an image's manifest is never removed.
    let manifests = http_store(&server.url(), Some(WRITE));
    let trace = crate::store::trace_name("app");
    for name in ["app", trace.as_str()] {
        manifests
            .put_manifest(name, Bytes::from_static(b"m"))
            .await
            .unwrap();
    }
    let error = http_store(&server.url(), Some(READ))
        .delete_manifest(&trace)
        .await
        .unwrap_err();
    assert!(crate::error::chain(&error).contains("401"), "{error}");
    let error = manifests.delete_manifest("app").await.unwrap_err();
    let message = crate::error::chain(&error);
    assert!(
        message.contains("403") && message.contains("not a trace or trace run"),
        "{message}"
    );
    assert_eq!(manifests.list_manifests().await.unwrap(), ["app", &trace]);
    manifests.delete_manifest(&trace).await.unwrap();
    assert_eq!(manifests.list_manifests().await.unwrap(), ["app"]);

    // A server without a write token takes no writes at all.
    let read_only = start(&dir, options(None, None)).await;
    let error = http_store(&read_only.url(), Some(WRITE))
        .put(&id, envelope.clone())
        .await
        .unwrap_err();
    assert!(crate::error::chain(&error).contains("403"), "{error}");
    assert_eq!(
        http_store(&read_only.url(), None).get(&id).await.unwrap(),
        envelope
    );
}

#[tokio::test]
async fn h2c_by_prior_knowledge_serves_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, options(None, Some(WRITE))).await;
    let envelope = Bytes::from(vec![7u8; 600_000]);
    let id = ChunkId::of_envelope(&envelope);
    let h2 = HttpStore::new(
        &server.url(),
        HttpClient::new(true),
        Some(WRITE.into()),
        HttpStoreTiming::default(),
    )
    .unwrap();
    h2.put(&id, envelope.clone()).await.unwrap();
    let fetches = (0..8).map(|_| h2.get(&id));
    for got in futures::future::join_all(fetches).await {
        assert_eq!(got.unwrap(), envelope);
    }
    let client = HttpClient::new(true);
    let response = send(
        &client,
        Method::GET,
        format!("{}/v1/chunks/{id}", server.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(response.version, http::Version::HTTP_2);
    assert_eq!(response.body, envelope);
}

/// Reads until the server closes the connection; how long that took.
async fn until_closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept a stalled connection open for 5 s"),
        }
    }
}

#[tokio::test]
async fn stalled_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, options(None, Some(WRITE))).await;
    for partial in [&b""[..], b"GET /v1/chunks/", b"PRI * HTTP/2.0\r\n"] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(partial).await.unwrap();
        let held = until_closed(&mut stream).await;
        assert!(held < Duration::from_secs(3), "{partial:?} held {held:?}");
    }
    // A body that stops halfway gets 408 once the body deadline passes.
    let id = ChunkId::of_envelope(b"0123456789");
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "PUT /v1/chunks/{id} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {WRITE}\r\ncontent-length: 10\r\n\r\n01234"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn the_store_retries_through_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, options(None, Some(WRITE))).await;
    let addr = server.addr;
    let envelope = Bytes::from_static(b"survives a restart");
    let id = ChunkId::of_envelope(&envelope);
    let store = http_store(&server.url(), Some(WRITE));
    store.put(&id, envelope.clone()).await.unwrap();
    server.stop().await;

    let fetch = tokio::spawn({
        let store = store.clone();
        async move { store.get(&id).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !fetch.is_finished(),
        "the fetch gave up while the server was down"
    );
    let again = Running::start(dir_store(&dir), addr, options(None, Some(WRITE))).await;
    assert_eq!(fetch.await.unwrap().unwrap(), envelope);
    again.stop().await;

    // Nothing listening for the whole deadline: a transient failure, in time.
    // A pool of its own: none of the connections above to reuse.
    let nowhere = HttpStore::new(
        &format!("http://{addr}"),
        HttpClient::new(false),
        None,
        HttpStoreTiming {
            request_timeout: Duration::from_millis(200),
            retry: crate::retry::RetryPolicy {
                deadline: Duration::from_millis(500),
                ..HttpStoreTiming::default().retry
            },
        },
    )
    .unwrap();
    let started = Instant::now();
    let error = nowhere.get(&id).await.unwrap_err();
    assert_eq!(error.kind(), crate::error::ErrorKind::Transient, "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_rate_capped_server_sends_whole_chunks_one_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        &dir,
        ServerOptions {
            chunk_rate: Some(1_000_000),
            ..options(None, Some(WRITE))
        },
    )
    .await;
    let store = Arc::new(http_store(&server.url(), Some(WRITE)));
    let envelopes: Vec<Bytes> = (0..4u8).map(|n| Bytes::from(vec![n; 50_000])).collect();
    for envelope in &envelopes {
        store
            .put(&ChunkId::of_envelope(envelope), envelope.clone())
            .await
            .unwrap();
    }
    let started = Instant::now();
    let gets: Vec<_> = envelopes
        .iter()
        .map(|envelope| {
            let (store, id) = (store.clone(), ChunkId::of_envelope(envelope));
            tokio::spawn(async move { store.get(&id).await })
        })
        .collect();
    for (get, envelope) in gets.into_iter().zip(&envelopes) {
        assert_eq!(&get.await.unwrap().unwrap(), envelope);
    }
    // 200 kB at 1 MB/s share one link: never sooner than 0.2 s.
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.stop().await;
}

#[tokio::test]
async fn a_handler_answers_requests_handed_to_it_without_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let handler = super::Handler::new(dir_store(&dir), options(None, Some(WRITE)), Registry::new());
    let request = |method: Method, path: &str, token: Option<&str>, body: &'static [u8]| {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        builder.body(Full::new(Bytes::from_static(body))).unwrap()
    };
    let id = ChunkId::of_envelope(b"handed in");
    let path = format!("/v1/chunks/{}", id.to_hex());
    let put = handler.answer(request(Method::PUT, &path, Some(WRITE), b"handed in"));
    assert_eq!(put.await.status(), StatusCode::NO_CONTENT);
    let get = handler.answer(request(Method::GET, &path, None, b"")).await;
    assert_eq!(get.status(), StatusCode::OK);
    let unknown = handler
        .answer(request(Method::GET, "/v2/x", None, b""))
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let refused = handler
        .answer(request(Method::PUT, &path, None, b"x"))
        .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}
