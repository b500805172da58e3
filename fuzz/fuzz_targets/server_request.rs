//! Arbitrary requests handed straight to the chunk server's request
//! handler over a directory store, without sockets. The input reads like
//! an HTTP/1.1 request: `METHOD TARGET`, header lines `Name: value`, an
//! empty line, the body (the server's tokens are `fuzz-read-token` and
//! `fuzz-write-token`).
//!
//! Properties: every request is answered, never with a panic or a 5xx (a
//! bad request is the client's fault: 4xx), and a chunk the server hands
//! out hashes to the id it was asked for.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use lazyblk::chunk::ChunkId;
use lazyblk::metrics::Registry;
use lazyblk::server::{Handler, ServerOptions, Tokens};
use lazyblk::store::dir::DirStore;
use libfuzzer_sys::fuzz_target;

const READ: &str = "fuzz-read-token";
const WRITE: &str = "fuzz-write-token";

struct World {
    runtime: tokio::runtime::Runtime,
    handler: Handler,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Arc::new(DirStore::open(&dir.path().join("store")).expect("a store"));
        let options = ServerOptions {
            tokens: Tokens::new(Some(READ), Some(WRITE)),
            ..ServerOptions::default()
        };
        World {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            handler: Handler::new(store, options, Registry::new()),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((method, request)) = request(data) else {
        return;
    };
    let path = request.uri().path().to_owned();
    let world = world();
    let answer = world.runtime.block_on(world.handler.answer(request));
    let status = answer.status();
    assert!(!status.is_server_error(), "{method} {path}: {status}");
    let body = world
        .runtime
        .block_on(answer.into_body().collect())
        .map_or_else(|never| match never {}, |c| c.to_bytes());
    if method == Method::GET && status == StatusCode::OK {
        if let Some(hex) = path.strip_prefix("/v1/chunks/") {
            if let Ok(id) = hex.parse::<ChunkId>() {
                assert_eq!(
                    ChunkId::of_envelope(&body),
                    id,
                    "GET {path} served other bytes"
                );
            }
        }
    }
});

/// The request `data` describes, if it is one hyper would hand over.
fn request(data: &[u8]) -> Option<(Method, Request<Full<Bytes>>)> {
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (head, body) = match split {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, target) = lines.next()?.split_once(' ')?;
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let target = target.strip_suffix(" HTTP/1.1").unwrap_or(target);
    let uri = target.parse::<http::Uri>().ok()?;
    let mut request = Request::builder().method(method.clone()).uri(uri);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let name = HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
        let value = HeaderValue::from_str(value.trim()).ok()?;
        request = request.header(name, value);
    }
    let request = request.body(Full::new(Bytes::copy_from_slice(body))).ok()?;
    Some((method, request))
}
