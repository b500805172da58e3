//! Chunk uploads, hashed as their bodies arrive: only a whole body whose
//! SHA-256 is its name is stored, however it is cut into pieces, and a
//! refused one leaves nothing behind.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tests::{dir_store, options, Running};
use super::Handler;
use crate::chunk::ChunkId;
use crate::metrics::Registry;
use crate::store::{ChunkStore, MAX_ENVELOPE_SIZE};

const WRITE: &str = "write-secret";

fn envelope(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect::<Vec<u8>>()
        .into()
}

async fn stored(store: &Arc<dyn ChunkStore>, id: &ChunkId) -> bool {
    store.missing(&[*id]).await.unwrap().is_empty()
}

/// Sends `head` and then `body` in pieces of `piece` bytes on one
/// connection and returns the whole answer; with `hang_up`, closes the
/// sending side after the body.
async fn exchange(
    server: &Running,
    head: String,
    body: &[u8],
    piece: usize,
    hang_up: bool,
) -> String {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    for part in body.chunks(piece) {
        stream.write_all(part).await.unwrap();
    }
    if hang_up {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

fn put_head(id: &ChunkId, length: &str) -> String {
    format!(
        "PUT /v1/chunks/{id} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {WRITE}\r\n{length}connection: close\r\n\r\n"
    )
}

/// Chunked transfer encoding: `body` in pieces of `piece` bytes.
fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A server over a directory store in `dir` that takes writes with
/// [`WRITE`], and that store.
async fn writable_server(dir: &tempfile::TempDir) -> (Arc<dyn ChunkStore>, Running) {
    let store = dir_store(dir);
    let server = Running::start(
        Arc::clone(&store),
        "127.0.0.1:0".parse().unwrap(),
        options(None, Some(WRITE)),
    )
    .await;
    (store, server)
}

#[tokio::test]
async fn a_body_in_many_pieces_is_stored_whole_with_or_without_a_length() {
    let dir = tempfile::tempdir().unwrap();
    let (store, server) = writable_server(&dir).await;
    let with_length = envelope(300_001);
    let id = ChunkId::of_envelope(&with_length);
    let head = put_head(&id, &format!("content-length: {}\r\n", with_length.len()));
    let answer = exchange(&server, head, &with_length, 997, false).await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert_eq!(store.get(&id).await.unwrap(), with_length);

    // No declared length: the buffer grows as the pieces come.
    let without_length = envelope(200_003).slice(3..);
    let id = ChunkId::of_envelope(&without_length);
    let head = put_head(&id, "transfer-encoding: chunked\r\n");
    let answer = exchange(
        &server,
        head,
        &chunked(&without_length, 4099),
        1 << 16,
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert_eq!(store.get(&id).await.unwrap(), without_length);
}

#[tokio::test]
async fn a_body_that_is_not_its_name_or_not_whole_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (store, server) = writable_server(&dir).await;
    let body = envelope(100_000);
    let id = ChunkId::of_envelope(&body);

    // One byte changed in the last piece.
    let mut altered = body.to_vec();
    altered[99_999] ^= 1;
    let head = put_head(&id, &format!("content-length: {}\r\n", altered.len()));
    let answer = exchange(&server, head, &altered, 1000, false).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("SHA-256"), "{answer}");
    assert!(!stored(&store, &id).await);

    // The sender stops halfway and closes its side.
    let head = put_head(&id, &format!("content-length: {}\r\n", body.len()));
    let answer = exchange(&server, head, &body[..50_000], 1000, true).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert!(!stored(&store, &id).await);

    // Refusals leave no temp file behind either.
    let leftovers: Vec<_> = walk(&dir.path().join("store/chunks"));
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[tokio::test]
async fn a_body_other_than_its_declared_length_or_past_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir_store(&dir);
    // Handed in directly, a body need not match its header, as it must
    // on a connection.
    let handler = Handler::new(
        Arc::clone(&store),
        options(None, Some(WRITE)),
        Registry::new(),
    );
    let body = envelope(10_000);
    let id = ChunkId::of_envelope(&body);
    for declared in [9_999, 10_001] {
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("/v1/chunks/{id}"))
            .header(header::AUTHORIZATION, format!("Bearer {WRITE}"))
            .header(header::CONTENT_LENGTH, declared)
            .body(Full::new(body.clone()))
            .unwrap();
        let answer = handler.answer(request).await;
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "{declared}");
        let reason = answer.into_body().collect().await.unwrap().to_bytes();
        let reason = String::from_utf8_lossy(&reason);
        assert!(reason.contains("Content-Length says"), "{reason}");
        assert!(!stored(&store, &id).await);
    }
    // With no length to refuse it by before it is read, a body past the
    // size limit is refused as it arrives.
    let big = envelope(MAX_ENVELOPE_SIZE + 1);
    let id = ChunkId::of_envelope(&big);
    let request = Request::builder()
        .method(Method::PUT)
        .uri(format!("/v1/chunks/{id}"))
        .header(header::AUTHORIZATION, format!("Bearer {WRITE}"))
        .body(Full::new(big))
        .unwrap();
    let answer = handler.answer(request).await;
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!stored(&store, &id).await);
}
