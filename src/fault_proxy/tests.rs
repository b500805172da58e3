//! The proxy in front of a real chunk server on 127.0.0.1, each fault seen
//! by a real client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use super::{FaultCounts, FaultProxy, FaultProxyError, FaultRates};
use crate::chunk::{seal_chunk, Salt};
use crate::metrics::Registry;
use crate::net::{HttpClient, HttpError, Response};
use crate::server::{Server, ServerOptions};
use crate::store::dir::DirStore;
use crate::store::ChunkStore;

struct Setup {
    _dir: tempfile::TempDir,
    proxy: String,
    path: String,
    envelope: Vec<u8>,
    client: HttpClient,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn setup(rates: FaultRates) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DirStore::open(&dir.path().join("store")).unwrap());
    let sealed = seal_chunk(&Salt([3; 32]), &[7u8; 4096]);
    store
        .put(&sealed.id, Bytes::from(sealed.envelope.clone()))
        .await
        .unwrap();
    let local = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(local, store, ServerOptions::default(), Registry::new())
        .await
        .unwrap();
    let upstream = format!("http://{}", server.local_addr().unwrap());
    let serving = tokio::spawn(server.run(std::future::pending()));
    let proxy = FaultProxy::bind(local, &upstream, rates, 1).await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxying = tokio::spawn(proxy.run());
    Setup {
        _dir: dir,
        proxy: proxy_url,
        path: format!("/v1/chunks/{}", sealed.id.to_hex()),
        envelope: sealed.envelope,
        client: HttpClient::new(false),
        tasks: vec![serving, proxying],
    }
}

impl Setup {
    async fn send(&self, method: Method, path: &str, body: &str) -> Result<Response, HttpError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.proxy))
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        self.client
            .send(request, Duration::from_secs(5), 8 << 20)
            .await
    }

    async fn get_chunk(&self) -> Result<Response, HttpError> {
        self.send(Method::GET, &self.path, "").await
    }

    async fn counts(&self) -> FaultCounts {
        let answer = self
            .send(Method::GET, "/_fault-proxy/stats", "")
            .await
            .unwrap();
        serde_json::from_slice(&answer.body).unwrap()
    }

    async fn set_rates(&self, rates: FaultRates) {
        let body = serde_json::to_string(&rates).unwrap();
        let answer = self
            .send(Method::PUT, "/_fault-proxy/rates", &body)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn clean_requests_pass_through_unchanged_and_are_counted_by_path() {
    let setup = setup(FaultRates::default()).await;
    for _ in 0..3 {
        let answer = setup.get_chunk().await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.body[..] == setup.envelope[..]);
    }
    let head = setup.send(Method::HEAD, &setup.path, "").await.unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.headers[http::header::CONTENT_LENGTH],
        setup.envelope.len().to_string().as_str()
    );
    let counts = setup.counts().await;
    assert_eq!((counts.requests, counts.forwarded), (4, 4));
    assert_eq!(counts.gets_by_path[&setup.path], 3);
}

#[tokio::test]
async fn errors_resets_flips_and_truncations_happen_as_configured() {
    let only = |pick: fn(&mut FaultRates)| {
        let mut rates = FaultRates::default();
        pick(&mut rates);
        rates
    };
    let setup = setup(only(|r| r.error_rate = 1.0)).await;
    let answer = setup.get_chunk().await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);

    setup.set_rates(only(|r| r.reset_rate = 1.0)).await;
    let error = setup.get_chunk().await.unwrap_err();
    assert!(error.is_transient(), "{error}");

    setup.set_rates(only(|r| r.flip_rate = 1.0)).await;
    let answer = setup.get_chunk().await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), setup.envelope.len());
    let flipped_bits: u32 = answer
        .body
        .iter()
        .zip(&setup.envelope)
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    assert_eq!(flipped_bits, 1);

    setup.set_rates(only(|r| r.truncate_rate = 1.0)).await;
    let answer = setup.get_chunk().await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body.len() < setup.envelope.len());
    assert!(setup.envelope.starts_with(&answer.body));

    // Uploads, listings and other methods are never harmed.
    setup.set_rates(only(|r| r.error_rate = 1.0)).await;
    let head = setup.send(Method::HEAD, &setup.path, "");
    assert_eq!(head.await.unwrap().status, StatusCode::OK);

    let counts = setup.counts().await;
    assert_eq!(
        (
            counts.errors,
            counts.resets,
            counts.flips,
            counts.truncations
        ),
        (1, 1, 1, 1)
    );
}

#[tokio::test]
async fn a_stalled_request_is_released_when_the_rates_change() {
    let stall = FaultRates {
        stall_rate: 1.0,
        ..FaultRates::default()
    };
    let setup = setup(stall).await;
    let request = Request::get(format!("{}{}", setup.proxy, setup.path))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let timed_out = setup
        .client
        .send(request, Duration::from_millis(300), 8 << 20)
        .await
        .unwrap_err();
    assert!(
        matches!(timed_out, HttpError::Timeout { .. }),
        "{timed_out}"
    );

    let client = setup.client.clone();
    let url = format!("{}{}", setup.proxy, setup.path);
    let waiting = tokio::spawn(async move {
        let request = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        client.send(request, Duration::from_secs(20), 8 << 20).await
    });
    // Released only once the stall is in place: wait for the proxy to see it.
    while setup.counts().await.stalls < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    setup.set_rates(FaultRates::default()).await;
    let answer = waiting.await.unwrap().unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body[..] == setup.envelope[..]);
}

#[tokio::test]
async fn only_loopback_and_valid_rates_are_accepted() {
    let anywhere = "0.0.0.0:0".parse().unwrap();
    let local = "127.0.0.1:0".parse().unwrap();
    let rates = FaultRates::default();
    let refused = FaultProxy::bind(anywhere, "http://127.0.0.1:1", rates.clone(), 0).await;
    assert!(matches!(
        refused,
        Err(FaultProxyError::ListenNotLoopback(_))
    ));
    for upstream in ["http://example.com", "https://127.0.0.1:1", "not a url"] {
        let refused = FaultProxy::bind(local, upstream, rates.clone(), 0).await;
        assert!(
            matches!(refused, Err(FaultProxyError::Upstream { .. })),
            "{upstream}"
        );
    }
    let bad = FaultRates {
        flip_rate: 2.0,
        ..rates
    };
    let refused = FaultProxy::bind(local, "http://localhost:1", bad, 0).await;
    assert!(matches!(refused, Err(FaultProxyError::Rates(_))));
}
