//! A client that asks and never reads: over HTTP/2 it opens more streams
//! than allowed with a window that stays shut. The server holds at most one
//! body per allowed stream, serves other clients meanwhile, and closes the
//! connection at the send deadline, which frees everything it held.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::tests::{dir_store, options, Running};
use super::ServerOptions;
use crate::chunk::ChunkId;
use crate::net::HttpClient;

const STREAMS: u32 = 8;
const ASKED: usize = 3 * STREAMS as usize;
const BODY: usize = 1 << 20;

/// Polls `done` until it holds, for at most 30 s (a loaded machine is slow;
/// nothing here asserts speed).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < give_up, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_holds_one_body_per_stream_until_the_deadline_and_blocks_no_one()
{
    let dir = crate::private::test_dir();
    let store = dir_store(&dir);
    let envelope = Bytes::from(
        (0..BODY)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
            .collect::<Vec<u8>>(),
    );
    let id = ChunkId::of_envelope(&envelope);
    store.put(&id, envelope.clone()).await.unwrap();
    let server = Running::start(
        store,
        "127.0.0.1:0".parse().unwrap(),
        ServerOptions {
            h2_max_streams: STREAMS,
            send_timeout: Duration::from_secs(2),
            ..options(None, None)
        },
    )
    .await;
    let gauge = |name: &str| {
        server
            .registry
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let url = format!("http://{}/v1/chunks/{id}", server.addr);

    // HTTP/2 by prior knowledge with the smallest windows h2 allows, and a
    // body never polled, so the windows never reopen.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(1024)
        .adaptive_window(false)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut asked = Vec::new();
    for _ in 0..ASKED {
        let mut sender = sender.clone();
        let request = Request::get(&url).body(Empty::new()).unwrap();
        asked.push(tokio::spawn(async move {
            sender.ready().await?;
            sender.send_request(request).await
        }));
    }
    // Headers come back for the streams the server took; the bodies wait.
    eventually("bodies parked unread", || {
        gauge("lazyblk_http_unsent_bytes") > 0
    })
    .await;
    let parked = gauge("lazyblk_http_unsent_bytes");
    assert!(
        parked <= i64::from(STREAMS) * BODY as i64,
        "{parked} bytes parked for {ASKED} requests on {STREAMS} streams"
    );

    // Meanwhile another client is served whole.
    let client = HttpClient::new(false);
    let answer = client
        .send(
            Request::builder()
                .method(Method::GET)
                .uri(&url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
            Duration::from_secs(20),
            2 << 20,
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, envelope);

    // At the deadline the connection goes, and with it every parked body.
    eventually("the connection abandoned", || {
        gauge("lazyblk_http_abandoned_connections_total") == 1
    })
    .await;
    eventually("parked bodies freed", || {
        gauge("lazyblk_http_unsent_bytes") == 0
    })
    .await;
    eventually("the client's connection closed", || {
        connection.is_finished()
    })
    .await;
    let mut answered = 0;
    for ask in asked {
        if let Ok(Ok(response)) = ask.await {
            assert_eq!(response.status(), StatusCode::OK);
            answered += 1;
        }
    }
    assert!(
        (1..=STREAMS as usize).contains(&answered),
        "{answered} of {ASKED} requests were answered on {STREAMS} streams"
    );
    // The well-behaved client's response was freed too, and nothing else
    // was abandoned.
    assert_eq!(gauge("lazyblk_http_abandoned_connections_total"), 1);
    server.stop().await;
}

const SLOW_BODY: usize = 256 << 10;

/// A server whose send deadline is `deadline`, holding three chunks of
/// `SLOW_BODY` bytes (in the store under the returned directory), and an
/// HTTP/2 client connected to it whose windows open only as fast as it
/// reads; the chunks' URLs and bytes.
async fn slow_link(
    deadline: Duration,
) -> (
    Running,
    tempfile::TempDir,
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    Vec<(String, Bytes)>,
) {
    let dir = crate::private::test_dir();
    let store = dir_store(&dir);
    let mut chunks = Vec::new();
    for seed in 1..=3u32 {
        let envelope = Bytes::from(
            (0..SLOW_BODY as u32)
                .map(|i| (i ^ seed).wrapping_mul(2_654_435_761) as u8)
                .collect::<Vec<u8>>(),
        );
        let id = ChunkId::of_envelope(&envelope);
        store.put(&id, envelope.clone()).await.unwrap();
        chunks.push((id, envelope));
    }
    let server = Running::start(
        store,
        "127.0.0.1:0".parse().unwrap(),
        ServerOptions {
            send_timeout: deadline,
            ..options(None, None)
        },
    )
    .await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    // Small stream windows pace each body by its reader; the connection's
    // window holds every stream's, so the streams read later do not starve
    // the one read now.
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(32 << 10)
        .initial_connection_window_size(1 << 20)
        .adaptive_window(false)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let urls = chunks
        .into_iter()
        .map(|(id, bytes)| (format!("http://{}/v1/chunks/{id}", server.addr), bytes))
        .collect();
    (server, dir, sender, urls)
}

fn abandoned(server: &Running) -> i64 {
    server
        .registry
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("lazyblk_http_abandoned_connections_total "))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_steady_reader_gets_responses_queued_past_the_deadline_whole() {
    use http_body_util::BodyExt;

    let deadline = Duration::from_secs(2);
    let (server, _dir, sender, chunks) = slow_link(deadline).await;
    // All three asked at once, then read one after the other, a frame at a
    // time: the last is built at once but read long after the deadline,
    // while bytes keep flowing (a pause per frame far below the deadline).
    let mut responses = Vec::new();
    for (url, _) in &chunks {
        let mut sender = sender.clone();
        let request = Request::get(url).body(Empty::new()).unwrap();
        responses.push(tokio::spawn(async move {
            sender.ready().await?;
            sender.send_request(request).await
        }));
    }
    let started = Instant::now();
    for (response, (_, expected)) in responses.into_iter().zip(&chunks) {
        let mut body = response.await.unwrap().unwrap().into_body();
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the connection stays open while bytes flow");
            if let Some(data) = frame.data_ref() {
                got.extend_from_slice(data);
            }
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        assert!(got == expected[..], "a body came back altered");
    }
    // Not an assertion on speed: it says the test tested something.
    assert!(
        started.elapsed() > deadline,
        "the reader was not slower than the deadline"
    );
    assert_eq!(abandoned(&server), 0);
    drop(sender);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stalls_midway_loses_its_connection_at_the_deadline() {
    use http_body_util::BodyExt;

    let (server, _dir, mut sender, chunks) = slow_link(Duration::from_millis(500)).await;
    sender.ready().await.unwrap();
    let request = Request::get(&chunks[0].0).body(Empty::new()).unwrap();
    let mut body = sender.send_request(request).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|data| !data.is_empty()));
    // Then nothing is read: the window stays shut and the body stalls.
    eventually("the stalled connection abandoned", || {
        abandoned(&server) == 1
    })
    .await;
    let mut rest = Ok(());
    while let Some(frame) = body.frame().await {
        if let Err(error) = frame {
            rest = Err(error);
            break;
        }
    }
    assert!(rest.is_err(), "the stalled body came back whole");
    server.stop().await;
}
