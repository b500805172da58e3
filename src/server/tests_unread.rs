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
