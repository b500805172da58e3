//! Trace recording and prefetch: what is recorded, what a trace fetches,
//! that readers see the same bytes, and that demand reads go first.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::testing::{
    eventually, idle, open_engine, sample_image, seal_image, within, EngineExt, Fixture, MemStore,
    CS, CSU,
};
use super::*;
use crate::chunk::{manifest_digest, seal_chunk, ManifestEntry, Salt, TenantKey};

fn open(fx: &Fixture, dir: &Path, record_trace: bool, prefetch_chunks: usize) -> Arc<Engine> {
    let opts = EngineOptions {
        readahead_chunks: 0,
        record_trace,
        prefetch_chunks,
        ..EngineOptions::default()
    };
    open_engine(fx, dir, opts).unwrap()
}

async fn read_chunk(engine: &Arc<Engine>, image: &[u8], index: usize) {
    let at = index * CSU;
    let len = CSU.min(image.len() - at);
    let got = within(engine.read(at as u64, len)).await.unwrap();
    assert!(got == image[at..at + len], "chunk {index}");
}

async fn prefetch_done(engine: &Arc<Engine>) {
    eventually(|| engine.stats().prefetch_remaining == 0).await;
    idle(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_trace_is_the_first_reads_by_id_and_prefetches_exactly_those() {
    // 24 chunks: every fourth from 1 is zero, and 7, 11, 15, … repeat
    // chunk 3, so ids and indices differ.
    let image = sample_image(24, 0, CS, 3);
    let fx = seal_image(&image, CS);
    assert_eq!(fx.id(11), fx.id(3));
    let recording = crate::private::test_dir();
    let engine = open(&fx, recording.path(), true, 4);
    // A zero chunk (not recorded), repeats, and a chunk whose id was
    // recorded already (11, as 3).
    let order = [10usize, 2, 3, 5, 2, 10, 0, 11];
    for &index in &order {
        read_chunk(&engine, &image, index).await;
    }
    let trace = engine.recorded_trace().unwrap();
    let expected: Vec<_> = [10usize, 2, 3, 0].iter().map(|&i| fx.id(i)).collect();
    assert_eq!(trace, expected);
    assert!(open(&fx, crate::private::test_dir().path(), false, 4)
        .recorded_trace()
        .is_none());
    idle(&engine).await;
    drop(engine);

    let fresh = crate::private::test_dir();
    let gets_before = fx.store.gets() as usize;
    let engine = open(&fx, fresh.path(), true, 1);
    // Chunk 3's id is held at six indices: each is a chunk to fill.
    assert_eq!(engine.prefetch(&trace), 9);
    prefetch_done(&engine).await;
    let stats = engine.stats();
    assert_eq!(
        (stats.prefetch_planned, stats.chunks_prefetched),
        (9, 9),
        "{stats:?}"
    );
    // One at a time, in the trace's order.
    let mut in_order = vec![fx.id(10), fx.id(2)];
    in_order.extend([fx.id(3); 6]);
    in_order.push(fx.id(0));
    assert_eq!(fx.store.get_order()[gets_before..], in_order);
    assert_eq!(
        engine.recorded_trace().unwrap(),
        [],
        "prefetch is not a read"
    );
    for &index in &order {
        read_chunk(&engine, &image, index).await;
    }
    let stats = engine.stats();
    // 10, 2, 3, 0 and 11 were prefetched and read; nothing was missed.
    assert_eq!(stats.prefetched_chunks_read, 5, "{stats:?}");
    assert_eq!(stats.demand_fetches, 0, "{stats:?}");
    assert_eq!(fx.store.gets() as usize - gets_before, 9);
    // Recorded again with prefetch on: the same trace.
    assert_eq!(engine.recorded_trace().unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_never_changes_what_a_reader_sees() {
    let image = sample_image(40, 777, CS, 9);
    let fx = seal_image(&image, CS);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut order: Vec<usize> = (0..41).collect();
    order.shuffle(&mut rng);
    let ids: Vec<_> = order
        .iter()
        .filter(|&&i| !fx.manifest.entries[i].eq(&ManifestEntry::Zero))
        .map(|&i| fx.id(i))
        .collect();
    for with_prefetch in [false, true] {
        let dir = crate::private::test_dir();
        let engine = open(&fx, dir.path(), false, 3);
        if with_prefetch {
            assert!(engine.prefetch(&ids) > 0);
        }
        // Reads of odd sizes and offsets race the prefetch.
        let mut at = 0usize;
        let mut got = Vec::new();
        while at < image.len() {
            let len = (CSU / 3 + at % 5000).min(image.len() - at);
            got.extend(within(engine.read(at as u64, len)).await.unwrap());
            at += len;
        }
        assert!(got == image, "with prefetch: {with_prefetch}");
        prefetch_done(&engine).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_of_an_earlier_version_prefetches_the_chunks_that_remain() {
    let image = sample_image(16, 0, CS, 11);
    let old = seal_image(&image, CS);
    // The rebuild inserts a chunk at the front: every index shifts by one,
    // every id but the new one stays.
    let mut rebuilt = vec![0x5a; CSU];
    rebuilt.extend_from_slice(&image);
    let new = seal_image(&rebuilt, CS);
    let trace: Vec<_> = [4usize, 8, 0].iter().map(|&i| old.id(i)).collect();
    let dir = crate::private::test_dir();
    let engine = open(&new, dir.path(), false, 2);
    assert_eq!(engine.prefetch(&trace), 3);
    prefetch_done(&engine).await;
    for index in [5, 9, 1] {
        assert!(engine.servable_now((index * CSU) as u64, CSU as u64));
    }
    assert_eq!(engine.stats().chunks_present, 3);
}

/// An image of `count` chunks that all hold the same bytes but the last,
/// so a plan of thousands of chunks costs one sealed envelope.
async fn repeated_image(count: usize) -> (Fixture, ChunkId, ChunkId) {
    let salt = Salt([7; 32]);
    let common = seal_chunk(&salt, &vec![1u8; CSU]);
    let last = seal_chunk(&salt, &vec![2u8; CSU]);
    let store = MemStore::default();
    let (common_id, last_id) = (common.id, last.id);
    for sealed in [&common, &last] {
        store
            .put(&sealed.id, Bytes::from(sealed.envelope.clone()))
            .await
            .unwrap();
    }
    let mut entries = vec![
        ManifestEntry::Chunk {
            id: common.id,
            key: common.key.clone(),
        };
        count - 1
    ];
    entries.push(ManifestEntry::Chunk {
        id: last.id,
        key: last.key.clone(),
    });
    let manifest = crate::chunk::Manifest {
        image_size: count as u64 * CSU as u64,
        chunk_size: CS,
        salt_domain: "test".into(),
        source_digest: [0; 32],
        entries,
    };
    let digest = manifest_digest(&manifest.seal(&TenantKey([1; 32])));
    let fx = Fixture {
        manifest,
        digest,
        store: Arc::new(store),
    };
    (fx, common_id, last_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demand_read_is_served_before_a_prefetch_of_ten_thousand_chunks_drains() {
    const COUNT: usize = 10_000;
    let (fx, common, _) = repeated_image(COUNT + 1).await;
    // Every prefetch get hangs until the test lets one through.
    let gate = fx.store.gate(common);
    for (max_fetches, prefetch_chunks, releases) in [(8, 4, 0), (4, 4, 1)] {
        let dir = crate::private::test_dir();
        let opts = EngineOptions {
            readahead_chunks: 0,
            max_fetches,
            prefetch_chunks,
            ..EngineOptions::default()
        };
        let engine = open_engine(&fx, dir.path(), opts).unwrap();
        let gets_before = fx.store.gets_of(&common);
        assert_eq!(engine.prefetch(&[common]), COUNT as u64);
        eventually(|| fx.store.gets_of(&common) >= gets_before + prefetch_chunks as u64).await;
        let last_chunk = (COUNT * CSU) as u64;
        let read = tokio::spawn({
            let engine = Arc::clone(&engine);
            async move { engine.read(last_chunk, CSU).await }
        });
        // With slots to spare the read needs nothing; with every slot held
        // by prefetch, the first slot to free goes to it, not to the
        // prefetch queue.
        if releases > 0 {
            eventually(|| engine.fetches_waiting(Priority::Demand) == 1).await;
        }
        for _ in 0..releases {
            gate.notify_one();
        }
        let got = within(read).await.unwrap().unwrap();
        assert!(got.iter().all(|&b| b == 2));
        let stats = engine.stats();
        assert!(
            stats.prefetch_remaining >= (COUNT - prefetch_chunks - releases) as u64,
            "{stats:?}"
        );
        assert_eq!(stats.demand_fetches, 1);
        engine.stop_prefetch();
        // Let the hung prefetches finish so the engine goes idle.
        for _ in 0..prefetch_chunks {
            gate.notify_one();
        }
        idle(&engine).await;
        let stats = engine.stats();
        assert!(
            stats.chunks_prefetched <= (prefetch_chunks + releases + 1) as u64,
            "stopped: {stats:?}"
        );
        // The chunks a stopped prefetch will never fetch are not left
        // counted as remaining.
        eventually(|| engine.stats().prefetch_remaining == 0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_waits_while_a_prefetch_runs_and_resumes_after() {
    let image = sample_image(64, 0, CS, 0);
    let fx = seal_image(&image, CS);
    let dir = crate::private::test_dir();
    let opts = EngineOptions {
        readahead_chunks: 8,
        adaptive_readahead: false,
        prefetch_chunks: 1,
        ..EngineOptions::default()
    };
    let engine = open_engine(&fx, dir.path(), opts).unwrap();
    // The prefetch's one chunk hangs until the test lets it through.
    let gate = fx.store.gate(fx.id(60));
    assert_eq!(engine.prefetch(&[fx.id(60)]), 1);
    eventually(|| fx.store.gets_of(&fx.id(60)) == 1).await;
    // A sequential stream and two misses close together: each would
    // fetch ahead without a prefetch running.
    for index in [10, 11, 12, 13, 30, 34] {
        read_chunk(&engine, &image, index).await;
    }
    assert_eq!(engine.stats().chunks_readahead, 0, "{:?}", engine.stats());
    gate.notify_one();
    prefetch_done(&engine).await;
    for index in [40, 41, 42] {
        read_chunk(&engine, &image, index).await;
    }
    idle(&engine).await;
    assert!(engine.stats().chunks_readahead > 0, "{:?}", engine.stats());
}
