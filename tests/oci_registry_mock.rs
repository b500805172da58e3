//! The registry source against a small HTTP server on 127.0.0.1 that plays
//! a registry with the behaviours a real one rarely shows on demand: bearer
//! tokens from a realm, a 503 to retry, a blob connection cut mid-stream,
//! a multi-platform index; and the bad ones: a wrong content type, a 401
//! that names no token endpoint, a token that does not work, a blob whose
//! bytes do not match its digest.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lazyblk::error::ErrorKind;
use lazyblk::oci::layer::find_in_chain;
use lazyblk::oci::{
    open_source, read_layer, BlobError, Digest, EntryKind, LayerLimits, SourceError, SourceOptions,
};

#[derive(Debug, Clone)]
struct Request {
    path: String,
    headers: HashMap<String, String>,
}

enum Reply {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Announces `body.len()` bytes, sends `send` of them, hangs up.
    Cut { body: Vec<u8>, send: usize },
}

fn reply(status: u16, content_type: &str, body: &[u8]) -> Reply {
    Reply::Full {
        status,
        headers: vec![("Content-Type".into(), content_type.into())],
        body: body.to_vec(),
    }
}

type Handler = dyn Fn(&Request, &[Request]) -> Reply + Send + Sync;

/// The server; stops accepting on drop.
struct Mock {
    port: u16,
    log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Mock {
    fn start(handler: Arc<Handler>) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = serve(stream, &*handler, &log2);
            }
        });
        Mock {
            port,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request per connection (`Connection: close`).
fn serve(stream: TcpStream, handler: &Handler, log: &Mutex<Vec<Request>>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((k, v)) = trimmed.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let request = Request { path, headers };
    let earlier = log.lock().unwrap().clone();
    let answer = handler(&request, &earlier);
    log.lock().unwrap().push(request);
    let mut out = stream;
    match answer {
        Reply::Full {
            status,
            headers,
            body,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                head += &format!("{k}: {v}\r\n");
            }
            head += "\r\n";
            out.write_all(head.as_bytes())?;
            out.write_all(&body)?;
        }
        Reply::Cut { body, send } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            out.write_all(head.as_bytes())?;
            out.write_all(&body[..send])?;
        }
    }
    out.flush()
}

/// A one-layer image behind a two-platform index.
struct Image {
    layer: Vec<u8>,
    config: Vec<u8>,
    manifest: Vec<u8>,
    index: Vec<u8>,
}

fn image() -> Image {
    let mut tar = tar::Builder::new(Vec::new());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    tar.append_data(&mut h, "srv/data.bin", &data[..]).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let diff = Digest::of(&tar);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff}"]}}}}"#
    )
    .into_bytes();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        Digest::of(&config),
        config.len(),
        Digest::of(&layer),
        layer.len()
    )
    .into_bytes();
    let other = Digest::of(b"some arm64 manifest");
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{other}","size":19,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        Digest::of(&manifest),
        manifest.len()
    )
    .into_bytes();
    Image {
        layer,
        config,
        manifest,
        index,
    }
}

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn opts() -> SourceOptions {
    SourceOptions {
        plain_http: true,
        retries: 2,
        retry_delay: Duration::from_millis(10),
        timeout: Duration::from_secs(5),
        ..SourceOptions::default()
    }
}

fn read_all_layers(
    source: &dyn lazyblk::oci::ImageSource,
) -> Result<Vec<(String, EntryKind, usize)>, lazyblk::oci::LayerError> {
    let mut seen = Vec::new();
    let mut limits = LayerLimits::default();
    for i in 0..source.layers().len() {
        let stream = source.open_layer(i).expect("open layer");
        read_layer(
            stream,
            &format!("layer {i}"),
            &mut limits,
            &mut |entry, data| {
                let mut bytes = Vec::new();
                data.read_to_end(&mut bytes)?;
                seen.push((entry.path.to_string(), entry.kind, bytes.len()));
                Ok(())
            },
        )?;
    }
    Ok(seen)
}

#[test]
fn bearer_tokens_retries_resumed_blobs_and_platforms() {
    let img = Arc::new(image());
    let port_cell = Arc::new(Mutex::new(0u16));
    let (img2, port2) = (img.clone(), port_cell.clone());
    let handler: Arc<Handler> = Arc::new(move |req: &Request, earlier: &[Request]| {
        let port = *port2.lock().unwrap();
        if req.path.starts_with("/token?") {
            assert!(
                req.path.contains("scope=repository%3Aapp%2Fweb%3Apull"),
                "{}",
                req.path
            );
            assert!(req.path.contains("service=mock"), "{}", req.path);
            return reply(200, "application/json", br#"{"token":"t0k3n"}"#);
        }
        if req.headers.get("authorization").map(String::as_str) != Some("Bearer t0k3n") {
            return Reply::Full {
                status: 401,
                headers: vec![(
                    "WWW-Authenticate".into(),
                    format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="mock",scope="repository:app/web:pull""#
                    ),
                )],
                body: Vec::new(),
            };
        }
        let manifest_path = format!("/v2/app/web/manifests/{}", Digest::of(&img2.manifest));
        let blob_path = format!("/v2/app/web/blobs/{}", Digest::of(&img2.layer));
        if req.path == "/v2/app/web/manifests/v1" {
            assert!(req.headers["accept"].contains(INDEX));
            return reply(200, INDEX, &img2.index);
        }
        if req.path == manifest_path {
            // The first time, a passing failure.
            if !earlier.iter().any(|r| r.path == manifest_path) {
                return reply(503, "text/plain", b"busy");
            }
            return reply(200, MANIFEST, &img2.manifest);
        }
        if req.path == blob_path {
            return match req.headers.get("range") {
                None => Reply::Cut {
                    body: img2.layer.clone(),
                    send: img2.layer.len() / 3,
                },
                Some(range) => {
                    let from: usize = range
                        .strip_prefix("bytes=")
                        .and_then(|r| r.strip_suffix('-'))
                        .and_then(|r| r.parse().ok())
                        .expect("an open range");
                    Reply::Full {
                        status: 206,
                        headers: vec![(
                            "Content-Range".into(),
                            format!("bytes {from}-{}/{}", img2.layer.len() - 1, img2.layer.len()),
                        )],
                        body: img2.layer[from..].to_vec(),
                    }
                }
            };
        }
        reply(
            404,
            "application/json",
            br#"{"errors":[{"code":"NOT_FOUND"}]}"#,
        )
    });
    let mock = Mock::start(handler);
    *port_cell.lock().unwrap() = mock.port;

    let source = open_source(
        &format!("docker://127.0.0.1:{}/app/web:v1", mock.port),
        &opts(),
    )
    .unwrap();
    assert_eq!(source.image_digest(), Digest::of(&img.manifest).0);
    assert_eq!(source.layers()[0].digest, Digest::of(&img.layer));
    let seen = read_all_layers(source.as_ref()).unwrap();
    assert_eq!(
        seen,
        vec![(
            "/srv/data.bin".into(),
            EntryKind::Regular { size: 300_000 },
            300_000
        )]
    );
    let requests = mock.requests();
    assert!(
        requests.iter().any(|r| r.headers.contains_key("range")),
        "no resumed blob"
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.path.starts_with("/token"))
            .count(),
        1
    );
    assert!(!img.config.is_empty());

    let arm = SourceOptions {
        platform: Some("linux/s390x".into()),
        ..opts()
    };
    let err = open_source(
        &format!("docker://127.0.0.1:{}/app/web:v1", mock.port),
        &arm,
    )
    .err()
    .unwrap();
    assert!(
        matches!(&err, SourceError::NoPlatform { available, .. } if available.len() == 2),
        "{err:?}"
    );
}

fn one_answer(answer: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Mock {
    Mock::start(Arc::new(move |req: &Request, _: &[Request]| answer(req)))
}

#[test]
fn a_wrong_content_type_is_refused() {
    let mock = one_answer(|_| reply(200, "text/html", b"<html>please log in</html>"));
    let err = open_source(&format!("docker://127.0.0.1:{}/a/b:c", mock.port), &opts())
        .err()
        .unwrap();
    assert!(
        matches!(err, SourceError::WrongContentType { ref content_type, .. } if content_type == "text/html"),
        "{err:?}"
    );
    assert!(err.to_string().contains("text/html"), "{err}");
}

#[test]
fn a_401_without_a_token_endpoint_says_so() {
    for challenge in [
        None,
        Some("Bearer service=\"x\""),
        Some("Basic realm=\"r\""),
    ] {
        let mock = one_answer(move |_| Reply::Full {
            status: 401,
            headers: challenge
                .map(|c| vec![("WWW-Authenticate".to_string(), c.to_string())])
                .unwrap_or_default(),
            body: Vec::new(),
        });
        let err = open_source(&format!("docker://127.0.0.1:{}/a/b:c", mock.port), &opts())
            .err()
            .unwrap();
        assert!(
            matches!(err, SourceError::NoTokenEndpoint { .. }),
            "{challenge:?}: {err:?}"
        );
        assert!(err.to_string().contains("no token endpoint"), "{err}");
    }
}

#[test]
fn a_token_that_does_not_work_is_an_error_not_a_loop() {
    let port_cell = Arc::new(Mutex::new(0u16));
    let port2 = port_cell.clone();
    let mock = one_answer(move |req| {
        if req.path.starts_with("/token") {
            return reply(200, "application/json", br#"{"access_token":"useless"}"#);
        }
        Reply::Full {
            status: 401,
            headers: vec![(
                "WWW-Authenticate".into(),
                format!(
                    "Bearer realm=\"http://127.0.0.1:{}/token\"",
                    port2.lock().unwrap()
                ),
            )],
            body: Vec::new(),
        }
    });
    *port_cell.lock().unwrap() = mock.port;
    let err = open_source(&format!("docker://127.0.0.1:{}/a/b:c", mock.port), &opts())
        .err()
        .unwrap();
    assert!(matches!(err, SourceError::Unauthorized { .. }), "{err:?}");
}

#[test]
fn a_blob_that_does_not_match_its_digest_fails_the_read() {
    let img = Arc::new(image());
    let img2 = img.clone();
    let mock = one_answer(move |req| {
        if req.path.contains("/manifests/") {
            return reply(200, MANIFEST, &img2.manifest);
        }
        // Same length, valid gzip, other bytes: the gzip header's mtime.
        let mut layer = img2.layer.clone();
        layer[4] ^= 0xff;
        reply(200, "application/octet-stream", &layer)
    });
    let source = open_source(&format!("docker://127.0.0.1:{}/a/b:v1", mock.port), &opts()).unwrap();
    let err = read_all_layers(source.as_ref()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
    assert!(matches!(
        find_in_chain::<BlobError>(&err),
        Some(BlobError::DigestMismatch { .. })
    ));
    assert!(err.to_string().contains("layer 0"), "{err}");

    // A manifest asked for by digest must hash to it.
    let wrong = Digest::of(b"not this manifest");
    let err = open_source(
        &format!("docker://127.0.0.1:{}/a/b@{wrong}", mock.port),
        &opts(),
    )
    .err()
    .unwrap();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
}
