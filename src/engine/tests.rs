use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use super::testing::{fixture, idle, open_engine, within, EngineExt, Fixture, CS, CSU};
use super::*;
use crate::chunk::ManifestEntry;
use crate::error::ErrorKind;

fn open(fx: &Fixture, dir: &Path, read_only: bool) -> Result<Arc<Engine>, EngineError> {
    let opts = EngineOptions {
        read_only,
        ..EngineOptions::default()
    };
    open_engine(fx, dir, opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_equal_the_image_and_fetch_each_chunk_once() {
    scan_and_check(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_readahead_reads_equal_the_image_and_fetch_each_chunk_once() {
    scan_and_check(DEFAULT_READAHEAD_CHUNKS).await;
}

/// Reads the whole image in odd-sized pieces, then at once, and checks the
/// bytes and the counters.
async fn scan_and_check(readahead_chunks: u32) {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let opts = EngineOptions {
        readahead_chunks,
        ..EngineOptions::default()
    };
    let engine = open_engine(&fx, tmp.path(), opts).unwrap();
    assert_eq!(engine.size(), image.len() as u64);
    // Odd-sized reads that straddle chunk boundaries, then the whole image.
    let mut at = 0usize;
    let mut reads = 1;
    while at < image.len() {
        reads += 1;
        let len = 40_000.min(image.len() - at);
        let got = engine.read(at as u64, len).await.unwrap();
        assert!(got == image[at..at + len], "read at {at}");
        at += len;
    }
    assert!(engine.read(0, image.len()).await.unwrap() == image);
    // A fetch counts itself just after it marks its chunk present.
    idle(&engine).await;
    let non_zero = fx
        .manifest
        .entries
        .iter()
        .filter(|e| matches!(e, ManifestEntry::Chunk { .. }))
        .count() as u64;
    let stats = engine.stats();
    assert_eq!(fx.store.gets(), non_zero);
    assert_eq!(stats.chunks_fetched, non_zero);
    assert_eq!(stats.chunks_present, non_zero);
    assert_eq!(stats.chunks_total, 9);
    assert_eq!(stats.chunks_zero, 2);
    assert_eq!(stats.read_requests, reads);
    assert_eq!(stats.read_bytes, 2 * image.len() as u64);
    if readahead_chunks == 0 {
        assert_eq!(stats.chunks_readahead, 0);
        assert_eq!(stats.cache_misses, non_zero);
    } else {
        // Each chunk was fetched ahead or missed by the one read that
        // fetched it (reads here wait for each other).
        assert!(stats.chunks_readahead > 0, "{stats:?}");
        assert!(stats.cache_misses <= non_zero, "{stats:?}");
        assert!(stats.cache_misses + stats.chunks_readahead >= non_zero);
    }
    // Every stored chunk's envelope: plaintext plus its 16-byte tag.
    let envelopes = image.len() as u64 - 2 * CS as u64 + 16 * non_zero;
    assert_eq!(stats.bytes_fetched, envelopes);
    assert!(stats.fetch_latency_p99_us >= stats.fetch_latency_p50_us);
    assert!(stats.fetch_latency_p50_us > 0);
    // Everything is present now: the fast path serves any range.
    let mut buf = vec![0u8; 3 * CSU];
    engine.try_read_now(100, &mut buf).unwrap().unwrap();
    assert!(buf == image[100..100 + 3 * CSU]);
}

#[tokio::test]
async fn zero_chunks_are_served_without_a_fetch() {
    let (_, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), false).unwrap();
    let mut buf = vec![7u8; 1000];
    engine
        .try_read_now(CS as u64 + 5, &mut buf)
        .unwrap()
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let got = engine.read(5 * CS as u64, CSU).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    // A missing non-zero chunk is not served by the fast path.
    assert!(engine.try_read_now(0, &mut buf).is_none());
    assert_eq!(fx.store.gets(), 0);
    assert_eq!(engine.stats().cache_hits, 2);
}

#[tokio::test]
async fn requests_out_of_range_are_invalid() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), false).unwrap();
    let size = image.len() as u64;
    for (offset, len) in [
        (size - 1, 2),
        (size + 1, 0),
        (u64::MAX, 1),
        (0, image.len() + 1),
    ] {
        let err = engine.read(offset, len).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        let mut buf = vec![0; len];
        let err = engine.try_read_now(offset, &mut buf).unwrap().unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange { .. }), "{err}");
        let err = engine.write(offset, &buf).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    }
    assert_eq!(engine.read(size, 0).await.unwrap(), Vec::<u8>::new());
    assert_eq!(fx.store.gets(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_cold_chunk_share_one_fetch() {
    let (image, fx) = fixture();
    fx.store.set_delay(Some(Duration::from_millis(100)));
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), false).unwrap();
    let readers = (0..16u64).map(|i| {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.read(3 * CS as u64 + i * 1000, 4096).await })
    });
    for (i, result) in within(join_all(readers)).await.into_iter().enumerate() {
        let at = 3 * CSU + i * 1000;
        assert!(result.unwrap().unwrap() == image[at..at + 4096]);
    }
    assert_eq!(fx.store.gets(), 1);
    let stats = engine.stats();
    assert_eq!(stats.chunks_fetched, 1);
    assert_eq!(stats.cache_misses, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_reader_does_not_cancel_the_fetch() {
    let (image, fx) = fixture();
    let gate = fx.store.gate(fx.id(0));
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), false).unwrap();
    let first = tokio::time::timeout(Duration::from_millis(50), engine.read(0, 10)).await;
    assert!(first.is_err(), "the gated read should have timed out");
    gate.notify_one();
    assert!(within(engine.read(0, 10)).await.unwrap() == image[..10]);
    assert_eq!(fx.store.gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn present_chunks_are_served_while_another_fetch_is_blocked() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), false).unwrap();
    engine.read(0, 10).await.unwrap();
    let gate = fx.store.gate(fx.id(4));
    let blocked = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.read(4 * CS as u64, CSU).await })
    };
    within(async {
        while fx.store.gets_of(&fx.id(4)) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let quick = tokio::time::timeout(Duration::from_secs(2), engine.read(100, 5000))
        .await
        .expect("a present chunk waited behind a blocked fetch")
        .unwrap();
    assert!(quick == image[100..5100]);
    let mut buf = vec![0u8; 100];
    engine
        .try_read_now(CS as u64 - 50, &mut buf)
        .unwrap()
        .unwrap();
    assert!(buf == image[CSU - 50..CSU + 50]);
    assert!(!blocked.is_finished());
    gate.notify_one();
    assert!(within(blocked).await.unwrap().unwrap() == image[4 * CSU..5 * CSU]);
}

#[tokio::test]
async fn a_corrupted_chunk_fails_the_read_and_is_not_kept() {
    let (image, fx) = fixture();
    fx.store.set_corrupt(fx.id(3), true);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), false).unwrap();
    let err = engine.read(3 * CS as u64 + 10, 20).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert_eq!(err.kind().errno(), libc::EIO);
    assert!(
        matches!(err, EngineError::VerifyChunk { index: 3, .. }),
        "{err}"
    );
    let stats = engine.stats();
    assert_eq!(stats.integrity_failures, 1);
    assert_eq!(stats.chunks_fetched, 0);
    assert_eq!(stats.chunks_present, 0);
    assert_eq!(stats.read_bytes, 0);
    let mut buf = [0u8; 20];
    assert!(engine.try_read_now(3 * CS as u64 + 10, &mut buf).is_none());
    // A partial write to it fails the same way and writes nothing.
    let err = engine.write(3 * CS as u64, b"x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    // Once the store serves good bytes, a later read retries and succeeds.
    fx.store.set_corrupt(fx.id(3), false);
    assert!(
        engine.read(3 * CS as u64 + 10, 20).await.unwrap() == image[3 * CSU + 10..3 * CSU + 30]
    );
    assert_eq!(fx.store.gets_of(&fx.id(3)), 3);
    assert_eq!(engine.stats().integrity_failures, 2);
}

#[tokio::test]
async fn a_failed_fetch_is_reported_and_retried() {
    let (image, fx) = fixture();
    fx.store.set_failing(fx.id(0), true);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), false).unwrap();
    let err = engine.read(0, 10).await.unwrap_err();
    assert!(
        matches!(err, EngineError::FetchChunk { index: 0, .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(engine.stats().fetch_errors, 1);
    assert_eq!(engine.stats().chunks_present, 0);
    fx.store.set_failing(fx.id(0), false);
    assert!(engine.read(0, 10).await.unwrap() == image[..10]);
}

#[tokio::test]
async fn a_read_only_device_refuses_writes() {
    let (image, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), true).unwrap();
    assert!(engine.read_only());
    let err = engine.write(0, b"hello").await.unwrap_err();
    assert!(matches!(err, EngineError::ReadOnly), "{err}");
    assert_eq!(err.kind().errno(), libc::EROFS);
    assert!(engine.read(0, 5).await.unwrap() == image[..5]);
    assert_eq!(engine.stats().write_bytes, 0);
    // Flushing a read-only device still records fetched chunks.
    engine.flush().await.unwrap();
    drop(engine);
    let engine = open(&fx, tmp.path(), true).unwrap();
    assert_eq!(engine.stats().chunks_present, 1);
}
