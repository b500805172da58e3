//! Discard and write-zeroes: whole chunks become holes without a fetch,
//! partial ranges follow the block layer's rules.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::testing::{fixture, idle, open_engine, within, EngineExt, Fixture, CS, CSU};
use super::*;

fn open(fx: &Fixture, dir: &Path) -> Arc<Engine> {
    open_engine(fx, dir, EngineOptions::default()).unwrap()
}

fn allocated_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("data")).unwrap().blocks() * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_absent_chunks_fetches_nothing_and_reads_zeros() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    // Chunks 2..=4 whole, from the middle of chunk 1 to the middle of 5.
    let (start, end) = (CS as u64 + 100, 5 * CS as u64 + 100);
    engine.discard(start, end - start).await.unwrap();
    assert_eq!(fx.store.gets(), 0, "a discard fetched");
    let stats = engine.stats();
    assert_eq!(stats.discard_requests, 1);
    assert_eq!(stats.chunks_fetched, 0);
    // Chunks 2, 3 and 4 are holes now; the partial pieces of 1 and 5 are
    // zero chunks in the manifest anyway.
    assert_eq!(stats.chunks_punched, 3);
    let got = engine.read(2 * CS as u64, 3 * CSU).await.unwrap();
    assert!(
        got.iter().all(|&b| b == 0),
        "discarded chunks read as zeros"
    );
    assert_eq!(fx.store.gets(), 0);
    // Everything else is as it was.
    let got = engine
        .read(6 * CS as u64, image.len() - 6 * CSU)
        .await
        .unwrap();
    assert!(got == image[6 * CSU..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_discard_of_an_absent_chunk_leaves_it_alone_and_fetches_nothing() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    engine.discard(3 * CS as u64 + 10, 100).await.unwrap();
    assert_eq!(fx.store.gets(), 0);
    // A discard promises nothing: the old bytes may stay, and here they do.
    let got = engine.read(3 * CS as u64, CSU).await.unwrap();
    assert!(got == image[3 * CSU..4 * CSU]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_discards_and_write_zeroes_of_present_chunks_zero_the_range() {
    let (mut model, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    engine.read(0, model.len()).await.unwrap();
    let gets = fx.store.gets();
    engine.discard(3 * CS as u64 + 10, 100).await.unwrap();
    model[3 * CSU + 10..3 * CSU + 110].fill(0);
    engine.write_zeroes(4 * CS as u64 - 7, 20).await.unwrap();
    model[4 * CSU - 7..4 * CSU + 13].fill(0);
    assert!(engine.read(0, model.len()).await.unwrap() == model);
    assert_eq!(fx.store.gets(), gets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_write_zeroes_of_an_absent_chunk_keeps_the_rest_of_it() {
    let (mut model, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    engine.write_zeroes(3 * CS as u64 + 10, 100).await.unwrap();
    model[3 * CSU + 10..3 * CSU + 110].fill(0);
    assert_eq!(
        fx.store.gets_of(&fx.id(3)),
        1,
        "the kept bytes had to be fetched"
    );
    assert!(engine.read(3 * CS as u64, CSU).await.unwrap() == model[3 * CSU..4 * CSU]);
    // Whole chunks: no fetch.
    engine
        .write_zeroes(4 * CS as u64, 2 * CS as u64)
        .await
        .unwrap();
    assert_eq!(fx.store.gets_of(&fx.id(4)), 0);
    model[4 * CSU..6 * CSU].fill(0);
    assert!(engine.read(0, model.len()).await.unwrap() == model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_chunks_free_cache_space_and_stay_zero_after_a_restart() {
    let (mut model, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    engine.read(0, model.len()).await.unwrap();
    engine.flush().await.unwrap();
    let before = allocated_bytes(tmp.path());
    engine.discard(2 * CS as u64, 3 * CS as u64).await.unwrap();
    model[2 * CSU..5 * CSU].fill(0);
    engine.flush().await.unwrap();
    let after = allocated_bytes(tmp.path());
    assert!(
        after + 2 * CS as u64 <= before,
        "discard freed too little: {before} -> {after} bytes"
    );
    within(idle(&engine)).await;
    drop(engine);
    let engine = open(&fx, tmp.path());
    let gets = fx.store.gets();
    assert!(engine.read(0, model.len()).await.unwrap() == model);
    assert_eq!(
        fx.store.gets(),
        gets,
        "a discarded chunk was fetched after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_device_refuses_discards() {
    let (_, fx) = fixture();
    let tmp = crate::private::test_dir();
    let opts = EngineOptions {
        read_only: true,
        ..EngineOptions::default()
    };
    let engine = open_engine(&fx, tmp.path(), opts).unwrap();
    for result in [
        engine.discard(0, CS as u64).await,
        engine.write_zeroes(0, CS as u64).await,
    ] {
        assert_eq!(
            result.unwrap_err().kind(),
            crate::error::ErrorKind::ReadOnly
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discards_past_the_end_are_invalid() {
    let (_, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    for (offset, len) in [(0, u64::MAX), (u64::MAX, 1), (engine.size(), 1)] {
        let err = engine.discard(offset, len).await.unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange { .. }), "{err}");
    }
    assert_eq!(fx.store.gets(), 0);
}
