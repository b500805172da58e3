//! The host cache on real files; two `HostCache`s on one directory stand for
//! two processes (each has its own replica of the log, as a process does).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use bytes::Bytes;

use super::HostCache;
use crate::chunk::{verify_envelope, ChunkId};
use crate::store::ChunkStore;

const SIZE: usize = 1000;

fn chunk(n: u32) -> (ChunkId, Bytes) {
    let mut envelope = vec![0u8; SIZE];
    envelope[..4].copy_from_slice(&n.to_le_bytes());
    let envelope = Bytes::from(envelope);
    (ChunkId::of_envelope(&envelope), envelope)
}

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Chunk files on disk and their total size.
fn on_disk(cache: &HostCache) -> (usize, u64) {
    let files = cache.inner.files().unwrap();
    (files.len(), files.iter().map(|f| f.size).sum())
}

#[tokio::test]
async fn round_trip_with_private_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("hc");
    let cache = HostCache::open(&root, 100 * SIZE as u64).unwrap();
    let (id, envelope) = chunk(1);
    let err = cache.get(&id).await.unwrap_err();
    assert_eq!(err.kind(), crate::error::ErrorKind::NotFound);
    cache.put(&id, envelope.clone()).await.unwrap();
    assert_eq!(cache.get(&id).await.unwrap(), envelope);
    assert_eq!(
        cache.missing(&[id, chunk(2).0]).await.unwrap(),
        [chunk(2).0]
    );
    let listed = cache.list().await.unwrap();
    assert_eq!(
        (listed.len(), listed[0].id, listed[0].size),
        (1, id, SIZE as u64)
    );
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("chunks")), 0o700);
    assert_eq!(mode(cache.chunk_path(&id).parent().unwrap()), 0o700);
    assert_eq!(mode(&cache.chunk_path(&id)), 0o600);
    assert_eq!(mode(&root.join("access.log")), 0o600);
    assert!(cache.get_manifest("m").await.is_err());
    cache.delete(&id).await.unwrap();
    assert_eq!((on_disk(&cache), cache.weight()), ((0, 0), 0));
}

#[tokio::test]
async fn stays_within_its_size_and_keeps_what_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let cache = HostCache::open(dir.path(), 20 * SIZE as u64).unwrap();
    let (hot, hot_envelope) = chunk(0);
    cache.put(&hot, hot_envelope).await.unwrap();
    for n in 1..200 {
        cache.get(&hot).await.unwrap();
        let (id, envelope) = chunk(n);
        cache.put(&id, envelope).await.unwrap();
        let (files, bytes) = on_disk(&cache);
        assert!(bytes <= 20 * SIZE as u64, "{files} files, {bytes} bytes");
    }
    assert_eq!(cache.weight(), on_disk(&cache).1);
    assert!(
        cache.get(&hot).await.is_ok(),
        "the chunk read all along was evicted"
    );
}

#[tokio::test]
async fn survives_a_restart_and_a_lost_log() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 20 * SIZE as u64;
    {
        let cache = HostCache::open(dir.path(), capacity).unwrap();
        for n in 0..10 {
            let (id, envelope) = chunk(n);
            cache.put(&id, envelope).await.unwrap();
        }
        cache.get(&chunk(0).0).await.unwrap();
    }
    let cache = HostCache::open(dir.path(), capacity).unwrap();
    assert_eq!(cache.weight(), 10 * SIZE as u64);
    // The read before the restart still protects chunk 0 from a burst.
    for n in 100..130 {
        let (id, envelope) = chunk(n);
        cache.put(&id, envelope).await.unwrap();
    }
    assert!(cache.get(&chunk(0).0).await.is_ok());
    drop(cache);

    fs::remove_file(dir.path().join("access.log")).unwrap();
    let cache = HostCache::open(dir.path(), 5 * SIZE as u64).unwrap();
    // Rebuilt from the files, and cut to the new size.
    assert_eq!(on_disk(&cache), (5, 5 * SIZE as u64));
    assert_eq!(cache.weight(), 5 * SIZE as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_share_chunks_and_one_bound() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 30 * SIZE as u64;
    let first = HostCache::open(dir.path(), capacity).unwrap();
    let second = HostCache::open(dir.path(), capacity).unwrap();
    let (id, envelope) = chunk(7);
    first.put(&id, envelope.clone()).await.unwrap();
    assert_eq!(second.get(&id).await.unwrap(), envelope);
    for n in 0..100 {
        let (id, envelope) = chunk(1000 + n);
        let cache = if n % 2 == 0 { &first } else { &second };
        cache.put(&id, envelope).await.unwrap();
    }
    let (_, bytes) = on_disk(&first);
    assert!(bytes <= capacity, "{bytes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_the_same_chunks_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 1000 * SIZE as u64;
    let caches: Vec<Arc<HostCache>> = (0..2)
        .map(|_| Arc::new(HostCache::open(dir.path(), capacity).unwrap()))
        .collect();
    let mut writers = Vec::new();
    for writer in 0..8 {
        let cache = caches[writer % 2].clone();
        writers.push(tokio::spawn(async move {
            for n in 0..50 {
                let (id, envelope) = chunk(n);
                cache.put(&id, envelope).await.unwrap();
                let read = cache.get(&id).await.unwrap();
                verify_envelope(&id, &read).unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for cache in &caches {
        let files = cache.inner.files().unwrap();
        assert_eq!(files.len(), 50);
        for crate::store::ListedChunk { id, .. } in files {
            verify_envelope(&id, &fs::read(cache.chunk_path(&id)).unwrap()).unwrap();
        }
        cache.inner.lock_log().catch_up().unwrap();
        assert_eq!(cache.weight(), 50 * SIZE as u64);
    }
    // No temp file was left behind.
    let names = crate::store::dir::all_files(dir.path());
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn refuses_foreign_directories_and_a_zero_size() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes"), b"mine").unwrap();
    let err = HostCache::open(dir.path(), 1 << 20).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    let err = HostCache::open(&dir.path().join("new"), 0).unwrap_err();
    assert!(err.to_string().contains("more than 0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_while_another_process_holds_the_eviction_lock() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("hc");
    let cache = Arc::new(HostCache::open(&root, 2 * SIZE as u64).unwrap());
    let (kept, envelope) = chunk(1);
    cache.put(&kept, envelope.clone()).await.unwrap();
    cache.put(&chunk(2).0, chunk(2).1).await.unwrap();

    // Another process, in the middle of a long eviction.
    let other = super::log::lock_dir(&root).unwrap();
    // A put over the bound, which must wait for that eviction to finish.
    let putting = tokio::spawn({
        let cache = cache.clone();
        async move { cache.put(&chunk(3).0, chunk(3).1).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!putting.is_finished(), "the put did not wait for the lock");

    // A hit logs under the log's mutex: it must not wait behind the put.
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), cache.get(&kept)).await;
    assert_eq!(
        read.expect("a read waited for another process's eviction")
            .unwrap(),
        envelope
    );
    drop(other);
    putting.await.unwrap().unwrap();
    assert!(on_disk(&cache).1 <= 2 * SIZE as u64);
}

/// One process logs a read of every chunk while another compacts the log
/// over and over: each read must still protect its chunk afterwards (a lost
/// `H` line is never put back, unlike an `I` line a later listing finds).
#[test]
fn no_line_is_lost_to_a_compaction_running_at_the_same_time() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::log::{lock_dir, AccessLog, Record};
    use crate::store::policy::EvictionPolicy;

    const CHUNKS: u32 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let capacity = 1 << 40;
    let present: Vec<(ChunkId, u64)> = (0..CHUNKS)
        .map(|n| (ChunkId::of_envelope(&n.to_le_bytes()), SIZE as u64))
        .collect();
    let mut reader = AccessLog::open(root, capacity).unwrap();
    for &(id, bytes) in &present {
        reader.append(Record::Insert(id, bytes)).unwrap();
    }

    let stop = AtomicBool::new(false);
    let compactions = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let compactor = scope.spawn(|| {
            let mut log = AccessLog::open(root, capacity).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let held = lock_dir(root).unwrap();
                let evicted = log
                    .evict_and_compact(&held, true, |_| Ok(()), || Ok(present.clone()))
                    .unwrap();
                assert!(evicted.is_empty());
                compactions.fetch_add(1, Ordering::Relaxed);
            }
        });
        while compactions.load(Ordering::Relaxed) == 0 {
            assert!(!compactor.is_finished(), "the compactor stopped");
            std::thread::yield_now();
        }
        for &(id, _) in &present {
            reader.append(Record::Hit(id)).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });

    let replayed = AccessLog::open(root, capacity).unwrap();
    let policy = replayed.policy();
    assert_eq!(policy.len(), present.len());
    let lost = present
        .iter()
        .filter(|(id, _)| !policy.is_protected(id))
        .count();
    assert_eq!(
        lost,
        0,
        "reads lost with {} compactions running",
        compactions.load(Ordering::Relaxed)
    );
}
