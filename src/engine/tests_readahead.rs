//! Sequential readahead: what it fetches, what it leaves alone, and that it
//! keeps the engine's invariants.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::testing::{
    eventually, idle, open_engine, seal_image, within, EngineExt, Fixture, CS, CSU,
};
use super::*;

/// `chunks` random chunks plus `tail` bytes, with the chunks in `zeros` all
/// zero.
fn image(chunks: usize, tail: usize, zeros: &[usize]) -> (Vec<u8>, Fixture) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut image = vec![0u8; chunks * CSU + tail];
    rng.fill(&mut image[..]);
    for &z in zeros {
        image[z * CSU..(z + 1) * CSU].fill(0);
    }
    let fx = seal_image(&image, CS);
    (image, fx)
}

fn open(fx: &Fixture, dir: &Path, readahead_chunks: u32) -> Arc<Engine> {
    let opts = EngineOptions {
        readahead_chunks,
        // A fixed bound: the counts below must not follow the host's load.
        adaptive_readahead: false,
        ..EngineOptions::default()
    };
    open_engine(fx, dir, opts).unwrap()
}

/// Reads chunk `index` whole and checks it against the image.
async fn read_chunk(engine: &Arc<Engine>, image: &[u8], index: usize) {
    let at = index * CSU;
    let len = CSU.min(image.len() - at);
    let got = within(engine.read(at as u64, len)).await.unwrap();
    assert!(got == image[at..at + len], "chunk {index}");
}

fn readahead(engine: &Engine) -> u64 {
    engine.stats().chunks_readahead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_sequential_scan_fetches_ahead_of_the_reader() {
    let (image, fx) = image(64, 0, &[]);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    // Each step waits for the fetches ahead to end, so the counts do not
    // depend on timing. A stream with a window of w fetches fills its
    // horizon, w²/2 chunks but at most 2w (2, 8, 16), after its reader's
    // last one, fetching on as earlier fetches end; the window doubles each
    // time the reader gets w chunks further.
    let steps = [
        (0, 0, "one miss is no stream yet"),
        (1, 2, "the second confirms it: a window of 2"),
        (2, 3, "still 2"),
        (3, 10, "4"),
        (4, 11, "4"),
        (5, 12, "4"),
        (6, 13, "4"),
        (7, 22, "8, the cap"),
        (8, 23, "8"),
    ];
    for (index, fetched_ahead, window) in steps {
        read_chunk(&engine, &image, index).await;
        idle(&engine).await;
        assert_eq!(
            readahead(&engine),
            fetched_ahead,
            "after chunk {index}: {window}"
        );
        // Readahead fetched chunks 2 and on, and nothing further.
        let next = 2 + fetched_ahead as usize;
        assert_eq!(fx.store.gets_of(&fx.id(next)), 0, "after chunk {index}");
    }
    for index in 9..64 {
        // Fetched before the reader got there.
        eventually(|| fx.store.gets_of(&fx.id(index)) == 1).await;
        read_chunk(&engine, &image, index).await;
    }
    idle(&engine).await;
    for index in 0..64 {
        assert_eq!(fx.store.gets_of(&fx.id(index)), 1, "chunk {index}");
    }
    let stats = engine.stats();
    assert_eq!(stats.chunks_readahead, 62);
    // Every chunk read ahead was then read: precision 1.
    assert_eq!(stats.readahead_chunks_read, 62);
    assert_eq!(stats.demand_fetches, 2);
    assert_eq!(stats.chunks_fetched, 64);
    assert_eq!(stats.chunks_present, 64);
    // Chunks 0 and 1, and any the reader caught still in flight.
    assert!(stats.cache_misses >= 2, "{stats:?}");
    assert_eq!(stats.cache_hits + stats.cache_misses, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_precision_counts_what_the_reader_then_read() {
    let (image, fx) = image(32, 0, &[]);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    // A short stream: chunks 0 to 3, then the reader stops. The window
    // grew to 4 at chunk 3, so readahead fetched chunks 2 to 11.
    for index in 0..4 {
        read_chunk(&engine, &image, index).await;
        idle(&engine).await;
    }
    let stats = engine.stats();
    assert_eq!(
        (stats.chunks_readahead, stats.readahead_chunks_read),
        (10, 2),
        "{stats:?}"
    );
    // Reading one more of them counts once, however often it is read.
    read_chunk(&engine, &image, 7).await;
    read_chunk(&engine, &image, 7).await;
    assert_eq!(engine.stats().readahead_chunks_read, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_fetch_nothing_ahead() {
    let (image, fx) = image(128, 0, &[]);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    // No read lands within a neighbourhood's reach of an earlier one.
    let order = [80, 12, 108, 36, 56, 0, 124, 96, 24, 68];
    for index in order {
        let at = index * CSU + 1000;
        let got = engine.read(at as u64, 4096).await.unwrap();
        assert!(got == image[at..at + 4096]);
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(readahead(&engine), 0);
    assert_eq!(fx.store.gets(), order.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_jumping_about_a_region_fetch_the_region() {
    let (image, fx) = image(128, 0, &[]);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    // A loader's pattern: out of order, no two reads adjacent and rising.
    // 70 and 64 pair up and cover 62..=72, so 66 and 68 are fetched ahead.
    for index in [70, 64] {
        read_chunk(&engine, &image, index).await;
        idle(&engine).await;
    }
    assert_eq!(readahead(&engine), 9, "{:?}", engine.stats());
    let gets = fx.store.gets();
    for index in [66, 68] {
        read_chunk(&engine, &image, index).await;
    }
    assert_eq!(fx.store.gets(), gets, "66 and 68 were fetched ahead");
    assert_eq!(engine.stats().readahead_chunks_read, 2);
    // A third miss near them (74) doubles the margin: 60..=78, so 60, 61,
    // 73 and 75..=78 are fetched too.
    read_chunk(&engine, &image, 74).await;
    idle(&engine).await;
    assert_eq!(readahead(&engine), 9 + 7, "{:?}", engine.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_chunks_zero_turns_it_off() {
    let (image, fx) = image(12, 0, &[]);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 0);
    // Reads that straddle chunk boundaries, as a file system's would.
    let mut at = 0;
    while at < image.len() {
        let len = 20_000.min(image.len() - at);
        let last = (at + len - 1) / CSU;
        assert_eq!(fx.store.gets(), at.div_ceil(CSU) as u64, "before {at}");
        let got = engine.read(at as u64, len).await.unwrap();
        assert!(got == image[at..at + len]);
        assert_eq!(fx.store.gets(), last as u64 + 1, "after {at}");
        at += len;
    }
    let stats = engine.stats();
    assert_eq!(stats.chunks_readahead, 0);
    assert_eq!(stats.chunks_fetched, 12);
    assert_eq!(stats.cache_misses, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_skips_zero_chunks_and_stops_at_the_end() {
    // Chunks 3, 4 and 10 are zero; chunk 12 is a short tail.
    let (image, fx) = image(12, 1000, &[3, 4, 10]);
    // Held at the store, so the window does not move on.
    let gates = [fx.store.gate(fx.id(2)), fx.store.gate(fx.id(5))];
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    read_chunk(&engine, &image, 0).await;
    read_chunk(&engine, &image, 1).await;
    // A window of two fetches: chunks 2 and 5, past the zero chunks.
    assert_eq!(readahead(&engine), 2);
    eventually(|| fx.store.gets_of(&fx.id(5)) == 1).await;
    assert_eq!(fx.store.gets_of(&fx.id(6)), 0);
    for gate in &gates {
        gate.notify_one();
    }
    idle(&engine).await;
    assert_eq!(readahead(&engine), 2, "a horizon of 2");
    // Reading on through a zero chunk grows the window to 4, whose horizon
    // of 8 non-zero chunks after chunk 3 would reach past the image's last
    // chunk, 12.
    read_chunk(&engine, &image, 2).await;
    read_chunk(&engine, &image, 3).await;
    idle(&engine).await;
    assert_eq!(readahead(&engine), 8);
    // Reads further on, zero chunks included, find nothing left to fetch.
    for index in 2..13 {
        read_chunk(&engine, &image, index).await;
    }
    idle(&engine).await;
    let stored = [0, 1, 2, 5, 6, 7, 8, 9, 11, 12];
    for index in stored {
        assert_eq!(fx.store.gets_of(&fx.id(index)), 1, "chunk {index}");
    }
    let stats = engine.stats();
    assert_eq!(stats.chunks_readahead, 8);
    assert_eq!(fx.store.gets(), stored.len() as u64);
    assert_eq!(stats.chunks_present, stored.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_readahead_fetches_fail_no_request() {
    let (image, fx) = image(8, 0, &[]);
    fx.store.set_corrupt(fx.id(2), true);
    fx.store.set_failing(fx.id(3), true);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    read_chunk(&engine, &image, 0).await;
    read_chunk(&engine, &image, 1).await;
    assert_eq!(readahead(&engine), 2);
    eventually(|| {
        let stats = engine.stats();
        stats.integrity_failures == 1 && stats.fetch_errors == 1
    })
    .await;
    idle(&engine).await;
    // Neither chunk was kept.
    assert_eq!(engine.stats().chunks_present, 2);
    let mut buf = vec![0; 10];
    assert!(engine.try_read_now(2 * CS as u64, &mut buf).is_none());
    assert!(engine.try_read_now(3 * CS as u64, &mut buf).is_none());
    // Once the store behaves, readers fetch the chunks themselves.
    fx.store.set_corrupt(fx.id(2), false);
    fx.store.set_failing(fx.id(3), false);
    read_chunk(&engine, &image, 2).await;
    read_chunk(&engine, &image, 3).await;
    assert_eq!(fx.store.gets_of(&fx.id(2)), 2);
    assert_eq!(fx.store.gets_of(&fx.id(3)), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waiting_on_a_failed_readahead_fetch_fetches_the_chunk_itself() {
    let (image, fx) = image(8, 0, &[]);
    let gate = fx.store.gate(fx.id(2));
    fx.store.set_failing(fx.id(2), true);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    read_chunk(&engine, &image, 0).await;
    read_chunk(&engine, &image, 1).await;
    eventually(|| fx.store.gets_of(&fx.id(2)) == 1).await;
    let reader = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.read(2 * CS as u64, CSU).await })
    };
    // The reader joins the readahead fetch, which then fails.
    eventually(|| engine.stats().cache_misses == 3).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.notify_one();
    // The reader's own fetch: held at the gate until the store recovers.
    eventually(|| fx.store.gets_of(&fx.id(2)) == 2).await;
    assert_eq!(engine.stats().fetch_errors, 1);
    fx.store.set_failing(fx.id(2), false);
    gate.notify_one();
    let got = within(reader).await.unwrap().unwrap();
    assert!(got == image[2 * CSU..3 * CSU]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_in_flight_is_bounded_and_never_holds_up_demand_fetches() {
    let (image, fx) = image(16, 0, &[]);
    let gates = [fx.store.gate(fx.id(2)), fx.store.gate(fx.id(3))];
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 2);
    read_chunk(&engine, &image, 0).await;
    read_chunk(&engine, &image, 1).await;
    // Both permits are held by fetches stuck at the store.
    assert_eq!(readahead(&engine), 2);
    read_chunk(&engine, &image, 12).await;
    // Moving the stream on (its window stays 2, the cap) wants chunk 4
    // fetched, but both permits are taken.
    let reader = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.read(2 * CS as u64, 10).await })
    };
    eventually(|| engine.stats().cache_misses == 4).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(readahead(&engine), 2);
    assert_eq!(fx.store.gets_of(&fx.id(4)), 0);
    // Once they end, the stream fetches on by itself, to its horizon: 2
    // non-zero chunks after chunk 2.
    for gate in &gates {
        gate.notify_one();
    }
    assert!(within(reader).await.unwrap().unwrap() == image[2 * CSU..2 * CSU + 10]);
    idle(&engine).await;
    assert_eq!(readahead(&engine), 3, "chunks 2..=4");
    assert_eq!(fx.store.gets_of(&fx.id(5)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_outside_the_runtime_keep_a_stream_going() {
    let (image, fx) = image(32, 0, &[]);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    read_chunk(&engine, &image, 0).await;
    read_chunk(&engine, &image, 1).await;
    idle(&engine).await;
    // A frontend's own thread serves the hit, as FUSE's session thread does.
    let served = {
        let engine = Arc::clone(&engine);
        std::thread::spawn(move || {
            let mut buf = vec![0; CSU];
            engine
                .try_read_now(2 * CS as u64, &mut buf)
                .map(|r| r.map(|()| buf))
        })
        .join()
        .unwrap()
    };
    assert!(served.unwrap().unwrap() == image[2 * CSU..3 * CSU]);
    // The stream moved on: 2 chunks after chunk 2.
    idle(&engine).await;
    assert_eq!(readahead(&engine), 3, "chunks 2..=4");
    assert_eq!(fx.store.gets_of(&fx.id(5)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_respects_written_chunks_and_the_fill_lock() {
    let (image, fx) = image(8, 0, &[]);
    let gate = fx.store.gate(fx.id(3));
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path(), 8);
    let written = vec![0x5a; CSU];
    engine.write(2 * CS as u64, &written).await.unwrap();
    read_chunk(&engine, &image, 0).await;
    read_chunk(&engine, &image, 1).await;
    // Chunk 2 is present (written), so readahead starts at chunk 3.
    eventually(|| fx.store.gets_of(&fx.id(3)) == 1).await;
    // A whole-chunk write waits for the readahead fetch, then lands on top.
    let writer = {
        let engine = Arc::clone(&engine);
        let data = vec![0xa5; CSU];
        tokio::spawn(async move { engine.write(3 * CS as u64, &data).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!writer.is_finished(), "the write did not wait for the fill");
    gate.notify_one();
    within(writer).await.unwrap().unwrap();
    let got = engine.read(2 * CS as u64, 2 * CSU).await.unwrap();
    assert!(got[..CSU] == written[..]);
    assert!(got[CSU..].iter().all(|&b| b == 0xa5));
    idle(&engine).await;
    assert_eq!(fx.store.gets_of(&fx.id(2)), 0);
    assert_eq!(fx.store.gets_of(&fx.id(3)), 1);
    // Chunks 3..=7: the whole image after the written chunk.
    assert_eq!(readahead(&engine), 5);
}
