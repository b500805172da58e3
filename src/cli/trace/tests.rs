//! Traces in a real directory store: recorders at once, merges that fold
//! and remove run objects, runs stored while a merge runs, and merges that
//! stop midway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::stored::{load, record_run, remove_runs, save};
use super::*;
use crate::chunk::RunStamp;
use crate::store::dir::DirStore;
use crate::store::{trace_run_name, ListedChunk, StoreError};

const IMAGE: &str = "app";

fn tenant() -> TenantKey {
    TenantKey([3; 32])
}

fn id(n: u8) -> ChunkId {
    ChunkId([n; 32])
}

fn run(seed: u8, recorded_at: u64) -> TraceRun {
    TraceRun {
        manifest_digest: [7; 32],
        recorded_at,
        ids: (0..4).map(|i| id(seed.wrapping_add(i))).collect(),
    }
}

/// Run `n` of a series: chunks 1 to 4, in one of two orders, and one chunk
/// of its own, so the majority is 1..4 whatever the runs.
fn nth_run(n: u8) -> TraceRun {
    let ids = if n % 2 == 0 {
        vec![id(1), id(2), id(3), id(100 + n), id(4)]
    } else {
        vec![id(2), id(1), id(3), id(4), id(100 + n)]
    };
    TraceRun {
        manifest_digest: [7; 32],
        recorded_at: now(),
        ids,
    }
}

/// A directory store holding image `app`'s manifest (a merge binds its
/// run to the manifest's digest).
async fn store_with_image(dir: &tempfile::TempDir) -> Arc<DirStore> {
    let store = Arc::new(DirStore::open(dir.path()).unwrap());
    store
        .put_manifest(IMAGE, Bytes::from_static(b"the sealed manifest"))
        .await
        .unwrap();
    store
}

async fn names(store: &dyn ChunkStore) -> Vec<String> {
    let mut names = store.list_manifests().await.unwrap();
    names.sort();
    names
}

/// What `add` would prefetch from what a reader finds now.
async fn plan(store: &dyn ChunkStore) -> Vec<ChunkId> {
    let trace = load(store, IMAGE, &tenant()).await.unwrap().trace.unwrap();
    let lists: Vec<&[ChunkId]> = trace.runs.iter().map(|r| &r.ids[..]).collect();
    merge_trace_runs(&lists, DEFAULT_MERGE_THRESHOLD)
}

async fn fold_app(store: &dyn ChunkStore) -> Folded {
    fold(store, &tenant(), IMAGE, &[], DEFAULT_MERGE_THRESHOLD)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_recorded_at_once_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ChunkStore> = Arc::new(DirStore::open(dir.path()).unwrap());
    const RECORDERS: u8 = 8;
    let recorders: Vec<_> = (0..RECORDERS)
        .map(|seed| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let run = run(seed * 16, 1_000 + u64::from(seed));
                record_run(&*store, IMAGE, &tenant(), run).await
            })
        })
        .collect();
    for recorder in recorders {
        recorder.await.unwrap().unwrap();
    }
    let stored = load(&*store, IMAGE, &tenant()).await.unwrap();
    let mut got: Vec<TraceRun> = stored.trace.unwrap().runs;
    got.sort_by_key(|r| r.recorded_at);
    let expected: Vec<TraceRun> = (0..RECORDERS)
        .map(|seed| run(seed * 16, 1_000 + u64::from(seed)))
        .collect();
    assert_eq!(got, expected, "a run recorded at the same time was lost");
    assert_eq!(stored.read.len(), usize::from(RECORDERS));
    assert!(stored.stale.is_empty());
    // Gc and verify skip every object a trace uses.
    let names = names(&*store).await;
    assert_eq!(names.len(), usize::from(RECORDERS));
    assert!(names.iter().all(|name| crate::store::is_trace_name(name)));
    // Another image's runs are not this one's.
    assert!(load(&*store, "ap", &tenant())
        .await
        .unwrap()
        .trace
        .is_none());
}

#[tokio::test]
async fn a_merge_folds_every_run_into_one_object_and_keeps_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_image(&dir).await;
    for n in 0..20 {
        record_run(&*store, IMAGE, &tenant(), nth_run(n))
            .await
            .unwrap();
    }
    let before = load(&*store, IMAGE, &tenant()).await.unwrap();
    assert_eq!(before.read.len(), MAX_TRACE_RUNS);
    assert_eq!(
        before.stale.len(),
        20 - MAX_TRACE_RUNS,
        "the oldest are stale"
    );
    let planned = plan(&*store).await;
    assert_eq!(planned, [id(1), id(2), id(3), id(4)]);

    let folded = fold_app(&*store).await;
    assert_eq!(
        (folded.runs, folded.objects, folded.removed),
        (MAX_TRACE_RUNS, 20, 20),
        "{folded:?}"
    );
    assert!(folded.failed.is_empty());
    assert_eq!(names(&*store).await, [IMAGE, "app.trace"]);
    let after = load(&*store, IMAGE, &tenant()).await.unwrap();
    assert_eq!(after.trace.as_ref().unwrap().runs.len(), 1);
    assert!(after.read.is_empty() && after.stale.is_empty());
    assert_eq!(plan(&*store).await, planned, "the merge changed the plan");

    // A run recorded later joins the merged one, and the next merge folds
    // it in turn.
    record_run(&*store, IMAGE, &tenant(), nth_run(21))
        .await
        .unwrap();
    assert_eq!(
        load(&*store, IMAGE, &tenant())
            .await
            .unwrap()
            .trace
            .unwrap()
            .runs
            .len(),
        2
    );
    let folded = fold_app(&*store).await;
    assert_eq!((folded.runs, folded.objects, folded.removed), (2, 1, 1));
    assert_eq!(names(&*store).await, [IMAGE, "app.trace"]);
}

/// A directory store that stores two more runs of `app` right after
/// answering its first listing: runs recorded while a merge runs, between
/// its listing and its removals.
#[derive(Debug)]
struct RecordsWhileListed {
    inner: DirStore,
    listed: AtomicBool,
    recorded: Mutex<Vec<String>>,
}

/// A directory store whose manifest removals fail, as if it went down
/// after a merge stored its trace.
#[derive(Debug)]
struct RemovalsFail {
    inner: DirStore,
}

/// A store passing every operation to its directory store `inner` but
/// the listing and removal of manifests, which go to its own `listed` and
/// `deleted`.
macro_rules! dir_store_but {
    ($store:ty) => {
        #[async_trait]
        impl ChunkStore for $store {
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
                self.inner.list().await
            }
            async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
                self.inner.delete(id).await
            }
            async fn delete_if_older(
                &self,
                id: &ChunkId,
                cutoff: std::time::SystemTime,
            ) -> Result<bool, StoreError> {
                self.inner.delete_if_older(id, cutoff).await
            }
            async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
                self.inner.put_manifest(name, manifest).await
            }
            async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
                self.inner.get_manifest(name).await
            }
            async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
                self.listed().await
            }
            async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
                self.deleted(name).await
            }
            fn describe(&self) -> String {
                self.inner.describe()
            }
        }
    };
}

dir_store_but!(RecordsWhileListed);
dir_store_but!(RemovalsFail);

impl RecordsWhileListed {
    async fn listed(&self) -> Result<Vec<String>, StoreError> {
        let names = self.inner.list_manifests().await?;
        if !self.listed.swap(true, Ordering::SeqCst) {
            let now = record_run(&self.inner, IMAGE, &tenant(), nth_run(50))
                .await
                .unwrap();
            // And one from a host whose clock is far behind: a stamp older
            // than every run the merge folds must not hide it either.
            let behind = trace_run_name(IMAGE, RunStamp::new(1, 0));
            let trace = Trace {
                image: IMAGE.into(),
                runs: vec![nth_run(51)],
                folded: None,
            };
            self.inner
                .put_manifest(&behind, Bytes::from(trace.seal(&tenant())))
                .await
                .unwrap();
            self.recorded.lock().unwrap().extend([now, behind]);
        }
        Ok(names)
    }

    async fn deleted(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete_manifest(name).await
    }
}

impl RemovalsFail {
    async fn listed(&self) -> Result<Vec<String>, StoreError> {
        self.inner.list_manifests().await
    }

    async fn deleted(&self, name: &str) -> Result<(), StoreError> {
        Err(StoreError::Unavailable {
            op: "delete",
            store: self.describe(),
            object: name.to_owned(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        })
    }
}

#[tokio::test]
async fn a_run_stored_while_a_merge_runs_survives_it() {
    let dir = tempfile::tempdir().unwrap();
    let plain = store_with_image(&dir).await;
    for n in 0..3 {
        record_run(&*plain, IMAGE, &tenant(), nth_run(n))
            .await
            .unwrap();
    }
    let store = RecordsWhileListed {
        inner: DirStore::open(dir.path()).unwrap(),
        listed: AtomicBool::new(false),
        recorded: Mutex::new(Vec::new()),
    };
    let folded = fold_app(&store).await;
    assert_eq!((folded.runs, folded.objects, folded.removed), (3, 3, 3));
    let recorded = store.recorded.lock().unwrap().clone();
    assert_eq!(recorded.len(), 2);
    let mut expected: Vec<String> = [IMAGE.to_owned(), "app.trace".into()]
        .into_iter()
        .chain(recorded)
        .collect();
    expected.sort();
    assert_eq!(
        names(&*plain).await,
        expected,
        "a run stored meanwhile went"
    );
    // And readers take both beside the merged run.
    let after = load(&*plain, IMAGE, &tenant()).await.unwrap();
    let runs = after.trace.unwrap().runs;
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.contains(&nth_run(50)) && runs.contains(&nth_run(51)));
    assert_eq!(after.read.len(), 2);
}

#[tokio::test]
async fn a_merge_stopped_before_its_removals_leaves_a_whole_trace() {
    let dir = tempfile::tempdir().unwrap();
    let plain = store_with_image(&dir).await;
    for n in 0..5 {
        record_run(&*plain, IMAGE, &tenant(), nth_run(n))
            .await
            .unwrap();
    }
    let planned = plan(&*plain).await;
    let failing = RemovalsFail {
        inner: DirStore::open(dir.path()).unwrap(),
    };
    let folded = fold_app(&failing).await;
    assert_eq!((folded.objects, folded.removed), (5, 0));
    assert_eq!(folded.failed.len(), 5);
    let message = format!("{:#}", folded.failed[0]);
    assert!(
        message.contains("remove trace run \"app.trace."),
        "{message}"
    );

    // The run objects are still there, but readers take the merged trace
    // alone: no run counts twice.
    assert_eq!(names(&*plain).await.len(), 2 + 5);
    let stored = load(&*plain, IMAGE, &tenant()).await.unwrap();
    assert_eq!(stored.trace.unwrap().runs.len(), 1);
    assert_eq!((stored.read.len(), stored.stale.len()), (0, 5));
    assert_eq!(plan(&*plain).await, planned);

    // The next merge removes them, and still folds the one merged run.
    let folded = fold_app(&*plain).await;
    assert_eq!((folded.runs, folded.objects, folded.removed), (1, 5, 5));
    assert_eq!(names(&*plain).await, [IMAGE, "app.trace"]);
    assert_eq!(plan(&*plain).await, planned);
}

#[tokio::test]
async fn a_merge_written_before_merges_listed_their_runs_still_stands_for_older_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_image(&dir).await;
    for n in 0..3 {
        record_run(&*store, IMAGE, &tenant(), run(n * 16, now()))
            .await
            .unwrap();
    }
    // Such a merge was written in version 1, without a list.
    let merged = Trace {
        image: IMAGE.into(),
        runs: vec![run(200, now())],
        folded: None,
    };
    save(&*store, &merged, &tenant()).await.unwrap();
    let stored = load(&*store, IMAGE, &tenant()).await.unwrap();
    assert_eq!(stored.trace.unwrap(), merged);
    // Not read, but not stale either: a guess by time never removes a run.
    assert_eq!((stored.stale.len(), stored.read.len()), (0, 0));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    record_run(&*store, IMAGE, &tenant(), run(100, now()))
        .await
        .unwrap();
    let trace = load(&*store, IMAGE, &tenant())
        .await
        .unwrap()
        .trace
        .unwrap();
    assert_eq!(trace.runs.len(), 2, "{trace:?}");
    assert_eq!(trace.runs[1].ids, run(100, 0).ids);
    // A merge now folds the run it read into a trace with its list, and
    // leaves the three it did not read.
    let folded = fold_app(&*store).await;
    assert_eq!((folded.runs, folded.objects, folded.removed), (2, 1, 1));
    assert_eq!(names(&*store).await.len(), 2 + 3);
    // The merge after it reads those three and folds them.
    let folded = fold_app(&*store).await;
    assert_eq!((folded.runs, folded.objects, folded.removed), (4, 3, 3));
    assert_eq!(names(&*store).await, [IMAGE, "app.trace"]);
}

#[tokio::test]
async fn a_reader_removes_the_runs_it_found_stale() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ChunkStore> = store_with_image(&dir).await;
    for n in 0..18 {
        record_run(&*store, IMAGE, &tenant(), nth_run(n))
            .await
            .unwrap();
    }
    let stored = load(&*store, IMAGE, &tenant()).await.unwrap();
    let stale: Vec<String> = stored.stale.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(stale.len(), 2);
    let planned = plan(&*store).await;
    remove_stale_in_background(&store, stored.stale);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while names(&*store).await.len() > 1 + MAX_TRACE_RUNS {
        assert!(std::time::Instant::now() < deadline, "stale runs stayed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = names(&*store).await;
    assert!(stale.iter().all(|name| !left.contains(name)), "{left:?}");
    assert_eq!(plan(&*store).await, planned, "stale runs were in the plan");
    // Removing what is gone already is no error.
    let (removed, failed) = remove_runs(&*store, &load_stale(&stale)).await;
    assert_eq!((removed, failed.len()), (2, 0));
}

/// Run objects by name, for removal.
fn load_stale(names: &[String]) -> Vec<stored::RunObject> {
    names
        .iter()
        .map(|name| {
            (
                crate::store::trace_run_stamp(IMAGE, name).unwrap(),
                name.clone(),
            )
        })
        .collect()
}

/// A chunk server older than the route answers a manifest DELETE with 405:
/// the merge says the store does not remove manifests, not that the next
/// merge will.
#[tokio::test]
async fn a_server_without_manifest_removal_is_named_as_such() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        loop {
            let (mut connection, _) = listener.accept().await.unwrap();
            let mut request = [0; 4096];
            let _ = connection.read(&mut request).await;
            let _ = connection
                .write_all(
                    b"HTTP/1.1 405 Method Not Allowed\r\nallow: GET, HEAD, PUT\r\n\
                      content-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
        }
    });
    let store = crate::store::http::HttpStore::new(
        &url,
        crate::net::HttpClient::shared(false),
        Some("write-secret".to_owned()),
        crate::store::http::HttpStoreTiming::default(),
    )
    .unwrap();
    let stamp = RunStamp::new(1, 2);
    let runs = [(stamp, trace_run_name(IMAGE, stamp))];
    let (removed, mut failed) = remove_runs(&store, &runs).await;
    assert_eq!((removed, failed.len()), (0, 1));
    let message = format!("{:#}", left_behind(1, failed.remove(0)));
    assert!(
        message.contains("the store does not support removing manifests")
            && message.contains("405"),
        "{message}"
    );
    // Any other failure leaves them to the next merge.
    let message = format!("{:#}", left_behind(1, anyhow::anyhow!("refused")));
    assert!(message.contains("the next merge removes them"), "{message}");
    server.abort();
}
