//! A store that fails: transient errors are retried within the deadline,
//! a hang fails the read with EIO when the deadline passes, and the device
//! keeps serving.

use std::path::Path;
use std::time::{Duration, Instant};

use super::testing::{fixture, open_engine, within, EngineExt, Fixture, CS};
use super::*;
use crate::error::ErrorKind;

fn open(fx: &Fixture, dir: &Path, deadline: Duration) -> Arc<Engine> {
    let opts = EngineOptions {
        readahead_chunks: 0,
        fetch: FetchPolicy {
            deadline,
            first_backoff: Duration::from_millis(2),
            ..FetchPolicy::default()
        },
        ..EngineOptions::default()
    };
    open_engine(fx, dir, opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_within_the_deadline() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), Duration::from_secs(5));
    fx.store.set_transient(fx.id(3), 3);
    let got = within(engine.read(3 * CS as u64, 100)).await.unwrap();
    assert!(got == image[3 * CS as usize..][..100]);
    assert_eq!(fx.store.gets_of(&fx.id(3)), 4);
    let stats = engine.stats();
    assert_eq!((stats.fetch_retries, stats.fetch_errors), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_and_other_failures_never_retried() {
    let (_, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), Duration::from_secs(30));
    let attempts = FetchPolicy::default().max_attempts;
    fx.store.set_transient(fx.id(3), 1000);
    let err = within(engine.read(3 * CS as u64, 100)).await.unwrap_err();
    assert!(
        matches!(err, EngineError::FetchChunk { attempts: a, .. } if a == attempts),
        "{err}"
    );
    assert_eq!(fx.store.gets_of(&fx.id(3)), u64::from(attempts));
    assert_eq!(err.kind().errno(), libc::EIO);

    fx.store.set_failing(fx.id(4), true);
    let err = within(engine.read(4 * CS as u64, 100)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(
        fx.store.gets_of(&fx.id(4)),
        1,
        "a missing chunk was asked for again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_store_fails_the_read_at_the_deadline_and_later_reads_succeed() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let deadline = Duration::from_millis(300);
    let engine = open(&fx, tmp.path(), deadline);
    engine.read(0, 10).await.unwrap();
    let gate = fx.store.gate(fx.id(3));
    let started = Instant::now();
    let err = within(engine.read(3 * CS as u64, 100)).await.unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, EngineError::FetchTimeout { .. }), "{err}");
    assert_eq!(err.kind().errno(), libc::EIO);
    assert!(waited >= deadline, "failed before the deadline: {waited:?}");
    assert_eq!(engine.stats().fetch_timeouts, 1);
    // Cached data is still served meanwhile.
    assert!(within(engine.read(0, 10)).await.unwrap() == image[..10]);
    // The store comes back: the next read fetches again and succeeds.
    gate.notify_one();
    let got = within(engine.read(3 * CS as u64, 100)).await.unwrap();
    assert!(got == image[3 * CS as usize..][..100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_fetches_go_before_readahead_when_fetches_are_bounded() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let opts = EngineOptions {
        readahead_chunks: 4,
        max_fetches: 1,
        ..EngineOptions::default()
    };
    let engine = open_engine(&fx, tmp.path(), opts).unwrap();
    let spawn_read = |index: u64| {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.read(index * CS as u64, 10).await })
    };
    // Hold the one slot with a demand fetch of chunk 0.
    let gate = fx.store.gate(fx.id(0));
    let mut readers = vec![spawn_read(0)];
    super::testing::eventually(|| fx.store.gets_of(&fx.id(0)) == 1).await;
    // Two sequential misses (chunks 2, 3) confirm a stream, whose readahead
    // (chunks 4 and 6; 5 is zero) queues behind them.
    for index in [2, 3] {
        readers.push(spawn_read(index));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    super::testing::eventually(|| engine.stats().chunks_readahead >= 1).await;
    // A reader of chunk 8 arrives last but goes before the readahead.
    readers.push(spawn_read(8));
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.notify_one();
    for reader in readers {
        within(reader).await.unwrap().unwrap();
    }
    within(super::testing::idle(&engine)).await;
    let order = fx.store.get_order();
    let position = |index: usize| order.iter().position(|id| *id == fx.id(index));
    let demand_last = position(8).expect("chunk 8 was fetched");
    for ahead in [4, 6] {
        if let Some(at) = position(ahead) {
            assert!(
                at > demand_last,
                "readahead of chunk {ahead} went first: {order:?}"
            );
        }
    }
    assert!(position(4).is_some(), "readahead never ran");
    assert!(within(engine.read(0, image.len())).await.unwrap() == image);
}
