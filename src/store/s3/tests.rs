//! The S3 store against a SeaweedFS cluster on loopback (the promises every
//! engine keeps), and against a scripted loopback server (what is retried
//! and what is not). tests/s3_store.rs covers the commands.

use std::time::Duration;

use super::{S3Options, S3Store};
use crate::store::contract::check_gc_contract;

// The cluster guard the integration tests use, compiled here too so the
// crate-private contract checks can run against the real server.
#[path = "../../../tests/common/seaweedfs.rs"]
#[allow(dead_code)]
mod seaweedfs;

#[tokio::test(flavor = "multi_thread")]
async fn keeps_the_garbage_collection_contract_on_seaweedfs() {
    let cluster = tokio::task::spawn_blocking(seaweedfs::Cluster::start)
        .await
        .unwrap();
    let env = cluster.env();
    let store = S3Store::with_env(&cluster.store("contract"), &S3Options::default(), |name| {
        env.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
    })
    .unwrap();
    // Last-Modified has a resolution of one second.
    check_gc_contract(&store, Duration::from_secs(1)).await;
}

/// A loopback server that answers each request with the next of
/// `answers` (status, body) and counts what it was asked.
async fn scripted_server(
    answers: Vec<(u16, &'static str)>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && socket.read(&mut byte).await.unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let (status, body) = answers[n.min(answers.len() - 1)];
            let response = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (endpoint, asked)
}

fn store_at(endpoint: &str) -> S3Store {
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKID"),
        ("AWS_SECRET_ACCESS_KEY", "SECRET"),
        ("AWS_ENDPOINT_URL", endpoint),
    ];
    S3Store::with_env("s3://bucket/p", &S3Options::default(), |name| {
        env.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap()
}

#[tokio::test]
async fn busy_servers_are_retried_and_refusals_are_not() {
    use crate::error::ErrorKind;
    use crate::store::ChunkStore;
    use std::sync::atomic::Ordering;

    let id = crate::chunk::ChunkId::of_envelope(b"x");
    let slow_down = "<Error><Code>SlowDown</Code><Message>reduce your rate</Message></Error>";
    let (endpoint, asked) = scripted_server(vec![(503, slow_down), (500, ""), (200, "x")]).await;
    let got = store_at(&endpoint).get(&id).await.unwrap();
    assert_eq!(&got[..], b"x");
    assert_eq!(asked.load(Ordering::SeqCst), 3);

    let denied = "<Error><Code>SignatureDoesNotMatch</Code><Message>no</Message></Error>";
    let (endpoint, asked) = scripted_server(vec![(403, denied)]).await;
    let error = store_at(&endpoint).get(&id).await.unwrap_err();
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(error.kind(), ErrorKind::Io);
    let message = crate::error::chain(&error);
    assert!(
        message.contains("access to bucket \"bucket\" denied"),
        "{message}"
    );
    assert!(!message.contains("X-Amz-Signature"), "{message}");

    // A server that stays busy fails the operation as transient, in time.
    let (endpoint, _) = scripted_server(vec![(503, slow_down)]).await;
    let started = std::time::Instant::now();
    let error = store_at(&endpoint).get(&id).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transient);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    assert!(crate::error::chain(&error).contains("SlowDown"), "{error}");
}
