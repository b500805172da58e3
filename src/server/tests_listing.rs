//! What a listing costs the store: pages answered over real connections on
//! 127.0.0.1, with the store's own listings counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, StatusCode};

use super::chunks::{ListingSnapshot, Recency};
use super::tests::{dir_store, options, Running};
use super::ServerOptions;
use crate::chunk::ChunkId;
use crate::net::protocol::ChunkPage;
use crate::net::HttpClient;
use crate::store::http::{HttpStore, HttpStoreTiming};
use crate::store::{ChunkStore, ListedChunk, StoreError};

const WRITE: &str = "write-secret";

/// A store that counts how often it is listed.
#[derive(Debug)]
struct CountedListings {
    inner: Arc<dyn ChunkStore>,
    listings: AtomicUsize,
    /// How long each listing takes.
    list_delay: Duration,
}

#[async_trait]
impl ChunkStore for CountedListings {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        self.inner.get(id).await
    }
    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        self.inner.put(id, envelope).await
    }
    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        self.inner.missing(ids).await
    }
    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        self.listings.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.list_delay).await;
        self.inner.list().await
    }
    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        self.inner.delete(id).await
    }
    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        self.inner.delete_if_older(id, cutoff).await
    }
    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        self.inner.put_manifest(name, manifest).await
    }
    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        self.inner.get_manifest(name).await
    }
    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        self.inner.list_manifests().await
    }
    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete_manifest(name).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn chunk(n: u8) -> (ChunkId, Bytes) {
    let envelope = Bytes::from(vec![n; 100]);
    (ChunkId::of_envelope(&envelope), envelope)
}

/// The chunks on a first page asked with no token.
async fn first_page(client: &HttpClient, server: &Running) -> usize {
    let request = http::Request::builder()
        .method(Method::GET)
        .uri(format!("http://{}/v1/chunks", server.addr))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = client
        .send(request, Duration::from_secs(10), 8 << 20)
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    let page: ChunkPage = serde_json::from_slice(&response.body).unwrap();
    page.chunks.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_share_one_listing_and_a_writer_gets_one_begun_after_it_asked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CountedListings {
        inner: dir_store(&dir),
        listings: AtomicUsize::new(0),
        list_delay: Duration::ZERO,
    });
    for n in 0..3 {
        let (id, envelope) = chunk(n);
        store.put(&id, envelope).await.unwrap();
    }
    // Reuse for longer than the test can take, so that nothing here
    // depends on how fast it runs.
    let server = Running::start(
        store.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerOptions {
            listing_reuse: Duration::from_secs(3600),
            ..options(None, Some(WRITE))
        },
    )
    .await;
    let listings = || store.listings.load(Ordering::SeqCst);
    let client = HttpClient::new(false);

    assert_eq!(first_page(&client, &server).await, 3);
    assert_eq!(first_page(&client, &server).await, 3);
    assert_eq!(
        listings(),
        1,
        "two first pages in a row listed the store twice"
    );
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let url = server.addr;
            tokio::spawn(async move {
                let request = http::Request::builder()
                    .uri(format!("http://{url}/v1/chunks?limit=1"))
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                client
                    .send(request, Duration::from_secs(10), 1 << 20)
                    .await
                    .unwrap()
                    .status
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        listings(),
        1,
        "concurrent first pages listed the store again"
    );

    // Whoever may write sees its own writes: the store is listed anew.
    let writer = HttpStore::new(
        &format!("http://{}", server.addr),
        HttpClient::shared(false),
        Some(WRITE.to_owned()),
        HttpStoreTiming::default(),
    )
    .unwrap();
    let (id, envelope) = chunk(3);
    writer.put(&id, envelope).await.unwrap();
    assert_eq!(first_page(&client, &server).await, 3);
    assert_eq!(writer.list().await.unwrap().len(), 4);
    assert_eq!(listings(), 2);
    // And readers take that listing from then on.
    assert_eq!(first_page(&client, &server).await, 4);
    assert_eq!(listings(), 2);
    server.stop().await;
}

/// A store that takes longer to list than the reuse age is still listed
/// once per walk and once per reuse age, counted from when its listing
/// finished. The times asked are given, not read off the clock: a caller
/// that asked when the listing's time had passed since the first one asked
/// has asked no earlier than the listing finished, however slow this machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_listing_is_aged_from_when_it_finished() {
    let dir = tempfile::tempdir().unwrap();
    let list_delay = Duration::from_millis(600);
    let counted = Arc::new(CountedListings {
        inner: dir_store(&dir),
        listings: AtomicUsize::new(0),
        list_delay,
    });
    let (id, envelope) = chunk(0);
    counted.put(&id, envelope).await.unwrap();
    let store: Arc<dyn ChunkStore> = counted.clone();
    let listings = || counted.listings.load(Ordering::SeqCst);
    let snapshot = ListingSnapshot::default();
    let reuse = list_delay / 2;

    let asked = tokio::time::Instant::now();
    let first = snapshot
        .get(&store, asked, Recency::BegunAfterAsked)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(listings(), 1);
    // The walk's later pages, and readers' first pages, asked once the
    // listing's time has passed, take that listing.
    let after_it = asked + list_delay;
    for _ in 0..2 {
        snapshot
            .get(&store, after_it, Recency::FinishedWithin(reuse))
            .await
            .unwrap();
    }
    assert_eq!(
        listings(),
        1,
        "a listing longer than the reuse age was taken anew"
    );
    // A writer's first page asks for a listing begun after it asked.
    let (id, envelope) = chunk(1);
    counted.put(&id, envelope).await.unwrap();
    let listed = snapshot
        .get(
            &store,
            tokio::time::Instant::now(),
            Recency::BegunAfterAsked,
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listings(), 2);
}

/// A caller that hangs up while the store is listed does not abandon the
/// listing: the next caller takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_outlives_the_caller_that_began_it() {
    let dir = tempfile::tempdir().unwrap();
    let counted = Arc::new(CountedListings {
        inner: dir_store(&dir),
        listings: AtomicUsize::new(0),
        list_delay: Duration::from_millis(500),
    });
    let store: Arc<dyn ChunkStore> = counted.clone();
    let snapshot = ListingSnapshot::default();
    let asked = tokio::time::Instant::now();
    let hung_up = tokio::time::timeout(
        Duration::from_millis(50),
        snapshot.get(&store, asked, Recency::BegunAfterAsked),
    )
    .await;
    assert!(
        hung_up.is_err(),
        "the listing finished before its caller hung up"
    );
    snapshot
        .get(&store, asked, Recency::BegunAfterAsked)
        .await
        .unwrap();
    assert_eq!(counted.listings.load(Ordering::SeqCst), 1);
}
