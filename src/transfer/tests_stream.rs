//! Streamed push: chunks handed over out of order by a producer thread give
//! the same manifest and store as a push of the image file; a producer that
//! stops early, or a store that fails, leaves no manifest.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::push::WINDOW_BYTES;
use super::tests::{options, sample_image, Fixture, Spy, CS};
use super::*;
use crate::flatten::ChunkConsumer;
use crate::store::{ChunkStore, StoreError};

/// Hands `image`'s chunks to `writer` in `order`, then finishes it unless
/// `finish` is false. Runs on a thread: the writer blocks.
fn produce(
    mut writer: ChunkWriter,
    image: Vec<u8>,
    order: Vec<u64>,
    finish: bool,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        for index in order {
            let start = index as usize * CS;
            let bytes = &image[start..(start + CS).min(image.len())];
            let mut chunk = writer.take();
            chunk.as_mut()[..bytes.len()].copy_from_slice(bytes);
            writer.put(index, chunk, bytes.len())?;
        }
        if finish {
            writer.finish(image.len() as u64)?;
        }
        Ok(())
    })
}

async fn stream(
    fx: &Fixture,
    store: Arc<dyn ChunkStore>,
    image: Vec<u8>,
    order: Vec<u64>,
    finish: bool,
) -> (Result<PushReport, TransferError>, std::io::Result<()>) {
    let (writer, pushing) =
        push_stream(store, fx.tenant.clone(), fx.salt.clone(), options("app")).unwrap();
    let producer = produce(writer, image, order, finish);
    let pushed = pushing.await;
    (pushed, producer.join().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunks_in_any_order_match_a_file_push() {
    let image = sample_image();
    let file = Fixture::new();
    let path = file.write_image("image", &image);
    let from_file = file.push_with(&path, file.shared(), 4).await.unwrap();

    let fx = Fixture::new();
    // Zero chunks 3 and 4 never come; the others out of order.
    let (pushed, produced) = stream(
        &fx,
        fx.shared(),
        image.clone(),
        vec![9, 0, 7, 2, 8, 1, 6, 5],
        true,
    )
    .await;
    produced.unwrap();
    let report = pushed.unwrap();
    assert_eq!(
        report,
        PushReport {
            elapsed_secs: report.elapsed_secs,
            // The zero chunks never handed over are never read.
            bytes_read: from_file.bytes_read - 2 * CS as u64,
            ..from_file
        }
    );
    assert_eq!(fx.manifest().await, file.manifest().await);
    let out = fx.dir.path().join("out");
    fx.export_to(&out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_manifest_unless_the_producer_finishes() {
    let fx = Fixture::new();
    let (pushed, produced) = stream(&fx, fx.shared(), sample_image(), vec![0, 1, 2], false).await;
    produced.unwrap();
    let err = pushed.unwrap_err();
    assert!(matches!(err, TransferError::ImageIncomplete), "{err:?}");
    let err = fx.store.get_manifest("app").await.unwrap_err();
    assert!(matches!(err, StoreError::ManifestNotFound { .. }), "{err}");

    // A chunk past the end the producer declares is refused the same way.
    let image = sample_image();
    let order = vec![0, 9];
    let (writer, pushing) = push_stream(
        fx.shared(),
        fx.tenant.clone(),
        fx.salt.clone(),
        options("app"),
    )
    .unwrap();
    let producer = std::thread::spawn(move || {
        let mut writer = writer;
        for index in order {
            let chunk = writer.take();
            writer.put(index, chunk, 10)?;
        }
        writer.finish(image.len() as u64 - 2000)
    });
    let err = pushing.await.unwrap_err();
    producer.join().unwrap().unwrap();
    assert!(
        matches!(err, TransferError::ChunkPastEnd { index: 9, .. }),
        "{err:?}"
    );
    assert!(fx.store.get_manifest("app").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_stops_the_producer_and_stores_no_manifest() {
    let fx = Fixture::new();
    let spy = Arc::new(Spy {
        inner: fx.store.clone(),
        missing_calls: AtomicUsize::new(0),
        puts: AtomicUsize::new(0),
        fail_after_puts: 0,
    });
    // More than three batches: the producer is still handing chunks over
    // when the first upload fails.
    let chunks = 3 * (WINDOW_BYTES as usize / CS) + 64;
    let mut image = vec![1u8; CS * chunks];
    for (i, chunk) in image.chunks_mut(CS).enumerate() {
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    let order = (0..chunks as u64).collect();
    let (pushed, produced) = stream(&fx, spy, image, order, true).await;
    let err = pushed.unwrap_err();
    assert!(matches!(err, TransferError::UploadChunk(_)), "{err:?}");
    let stopped = produced.unwrap_err();
    assert_eq!(stopped.kind(), std::io::ErrorKind::BrokenPipe, "{stopped}");
    assert!(fx.store.get_manifest("app").await.is_err());
}
