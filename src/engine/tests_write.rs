//! Writes, flush, restart and crash.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::testing::{
    fixture, open_engine, sample_image, seal_image, within, EngineExt, Fixture, CS, CSU,
};
use super::*;
use crate::cache::CacheError;
use crate::error::ErrorKind;

fn open(fx: &Fixture, dir: &Path) -> Arc<Engine> {
    open_engine(fx, dir, EngineOptions::default()).unwrap()
}

/// Applies a write to the engine and the model.
async fn write(engine: &Arc<Engine>, model: &mut [u8], offset: usize, data: &[u8]) {
    engine.write(offset as u64, data).await.unwrap();
    model[offset..offset + data.len()].copy_from_slice(data);
}

#[tokio::test]
async fn writes_fetch_only_what_they_keep() {
    let (mut model, fx) = fixture();
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    // A whole chunk: no fetch.
    write(&engine, &mut model, 0, &vec![0xAB; CSU]).await;
    assert_eq!(fx.store.gets(), 0);
    // Part of a zero chunk: no fetch.
    write(&engine, &mut model, CSU + 10, b"into a zero chunk").await;
    assert_eq!(fx.store.gets(), 0);
    // Part of a stored chunk: that chunk is fetched first.
    write(&engine, &mut model, 3 * CSU + 7, b"patch").await;
    assert_eq!(fx.store.gets_of(&fx.id(3)), 1);
    // Across two chunks, partly each: both ends fetched.
    write(&engine, &mut model, 5 * CSU - 3, &[1, 2, 3, 4, 5, 6]).await;
    assert_eq!(fx.store.gets_of(&fx.id(4)), 1);
    assert_eq!(
        fx.store.gets(),
        2,
        "chunk 5 is zero and must not be fetched"
    );
    // The short last chunk, whole.
    write(&engine, &mut model, 8 * CSU, &[9; 1000]).await;
    assert_eq!(fx.store.gets(), 2);
    assert!(engine.read(0, model.len()).await.unwrap() == model);
    let stats = engine.stats();
    assert_eq!(stats.write_requests, 5);
    assert_eq!(stats.write_bytes, (CSU + 17 + 5 + 6 + 1000) as u64);
    assert_eq!(
        stats.cache_misses,
        2 + 3,
        "two write pieces, then chunks 2, 6 and 7"
    );
}

#[tokio::test]
async fn writes_survive_flush_and_reopen_and_are_never_fetched() {
    let (mut model, fx) = fixture();
    let tmp = crate::private::test_dir();
    {
        let engine = open(&fx, tmp.path());
        write(&engine, &mut model, 2 * CSU + 100, b"partial write").await;
        write(&engine, &mut model, 6 * CSU, &vec![0x5A; CSU]).await;
        write(&engine, &mut model, 5 * CSU + 1, b"zero chunk").await;
        engine.read(4 * CSU as u64, 10).await.unwrap();
        engine.flush().await.unwrap();
        assert_eq!(engine.stats().flushes, 1);
    }
    let gets_before = fx.store.gets();
    let engine = open(&fx, tmp.path());
    assert_eq!(engine.stats().chunks_present, 4);
    for index in [2, 4, 5, 6] {
        let at = index * CSU;
        let mut buf = vec![0; CSU];
        engine.try_read_now(at as u64, &mut buf).unwrap().unwrap();
        assert!(buf == model[at..at + CSU], "chunk {index}");
    }
    assert_eq!(fx.store.gets(), gets_before);
    assert!(engine.read(0, model.len()).await.unwrap() == model);
}

#[tokio::test]
async fn a_cache_for_another_manifest_is_refused() {
    let (_, fx) = fixture();
    let other = seal_image(&sample_image(8, 1000, CS, 43), CS);
    let tmp = crate::private::test_dir();
    drop(open(&fx, tmp.path()));
    let err = open_engine(&other, tmp.path(), EngineOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    let EngineError::OpenCache { source } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(**source, CacheError::WrongManifest { .. }),
        "{source}"
    );
}

#[tokio::test]
async fn a_manifest_that_does_not_cover_the_image_is_refused() {
    let (_, mut fx) = fixture();
    fx.manifest.entries.pop();
    let tmp = crate::private::test_dir();
    let err = Engine::open(
        fx.manifest.clone(),
        fx.digest,
        fx.store.clone(),
        tmp.path(),
        EngineOptions::default(),
        tokio::runtime::Handle::current(),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::InvalidManifest { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_chunk_write_waits_for_a_fetch_in_flight() {
    // Otherwise the fetch could land after the write and undo it.
    let (mut model, fx) = fixture();
    let gate = fx.store.gate(fx.id(4));
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    let reader = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.read(4 * CS as u64, 10).await })
    };
    within(async {
        while fx.store.gets_of(&fx.id(4)) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let writer = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.write(4 * CS as u64, &vec![0xEE; CSU]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!writer.is_finished(), "the write overtook the fetch");
    gate.notify_one();
    within(reader).await.unwrap().unwrap();
    within(writer).await.unwrap().unwrap();
    model[4 * CSU..5 * CSU].fill(0xEE);
    assert!(within(engine.read(0, model.len())).await.unwrap() == model);
    assert_eq!(
        fx.store.gets(),
        7,
        "chunk 4 once, and the 6 other stored chunks"
    );
}

#[tokio::test]
async fn stale_bytes_under_a_zero_chunk_never_show() {
    // A write acknowledged but never flushed, then a crash, leaves bytes in
    // the data file under a chunk whose bit is clear.
    let (mut model, fx) = fixture();
    let tmp = crate::private::test_dir();
    {
        let cache = CacheDir::open_or_create(
            tmp.path(),
            fx.digest,
            fx.manifest.image_size,
            fx.manifest.chunk_size,
        )
        .unwrap();
        cache.write_at(&vec![0xFF; CSU], CS as u64).unwrap();
    }
    let engine = open(&fx, tmp.path());
    assert!(engine
        .read(CS as u64, CSU)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    write(&engine, &mut model, CSU + 100, b"small").await;
    assert!(engine.read(CS as u64, CSU).await.unwrap() == model[CSU..2 * CSU]);
}

const CRASH_DIR: &str = "LAZYBLK_ENGINE_CRASH_DIR";

/// The child half of `acknowledged_writes_survive_sigkill`: writes, flushes,
/// says so on stdout, then waits to be killed. Does nothing unless started
/// by that test.
#[tokio::test]
#[ignore = "helper process for acknowledged_writes_survive_sigkill"]
async fn sigkill_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR) else {
        return;
    };
    let (mut model, fx) = fixture();
    let engine = open(&fx, Path::new(&dir));
    write(&engine, &mut model, 2 * CSU + 100, b"flushed partial write").await;
    write(&engine, &mut model, 6 * CSU, &vec![0x5A; CSU]).await;
    engine.read(4 * CSU as u64, 10).await.unwrap();
    engine.flush().await.unwrap();
    println!("FLUSHED");
    // Killed long before this; the bound only keeps a lost child from
    // living on.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let tmp = crate::private::test_dir();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "engine::tests_write::sigkill_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_DIR, tmp.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let flushed = stdout.lines().map_while(Result::ok).any(|l| l == "FLUSHED");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(flushed, "the child never reported its flush");

    let (mut model, fx) = fixture();
    model[2 * CSU + 100..][..21].copy_from_slice(b"flushed partial write");
    model[6 * CSU..7 * CSU].fill(0x5A);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _entered = rt.enter();
    let engine = open(&fx, tmp.path());
    assert_eq!(engine.stats().chunks_present, 3);
    rt.block_on(async {
        for index in [2, 4, 6] {
            let at = index * CSU;
            assert!(engine.read(at as u64, CSU).await.unwrap() == model[at..at + CSU]);
        }
    });
    assert_eq!(fx.store.gets(), 0, "flushed chunks were fetched again");
}

const CHANGES_DIR: &str = "LAZYBLK_ENGINE_CHANGES_DIR";

/// The changes `changes_child` makes and never flushes: a partial write to
/// a fetched chunk, a whole chunk written, a zero chunk written into and a
/// chunk zeroed; applied to `model` too.
async fn unflushed_changes(engine: &Arc<Engine>, model: &mut [u8]) {
    write(engine, model, 3 * CSU + 7, b"acknowledged, never flushed").await;
    write(engine, model, 6 * CSU, &vec![0xC3; CSU]).await;
    write(engine, model, 5 * CSU + 1, b"into a zero chunk").await;
    engine.write_zeroes(7 * CS as u64, CS as u64).await.unwrap();
    model[7 * CSU..8 * CSU].fill(0);
}

/// The child half of `acknowledged_changes_outlive_a_killed_process`:
/// changes chunks with [`EngineOptions::changes_outlive_process`], says so
/// on stdout without flushing, then waits to be killed.
#[tokio::test]
#[ignore = "helper process for acknowledged_changes_outlive_a_killed_process"]
async fn changes_child() {
    let Some(dir) = std::env::var_os(CHANGES_DIR) else {
        return;
    };
    let (mut model, fx) = fixture();
    let opts = EngineOptions {
        changes_outlive_process: true,
        ..EngineOptions::default()
    };
    let engine = open_engine(&fx, Path::new(&dir), opts).unwrap();
    unflushed_changes(&engine, &mut model).await;
    println!("ACKNOWLEDGED");
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// Without a flush, the next engine on the cache would fetch the changed
/// chunks again over the changes, since their present bits never reached
/// the disk; a ublk device recovered after its process died would then
/// lose writes its users saw acknowledged, and flushed later.
#[test]
fn acknowledged_changes_outlive_a_killed_process() {
    let tmp = crate::private::test_dir();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "engine::tests_write::changes_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHANGES_DIR, tmp.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let acknowledged = stdout
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "ACKNOWLEDGED");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(acknowledged, "the child never reported its changes");

    let (mut model, fx) = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _entered = rt.enter();
    rt.block_on(async {
        // What the child did, on a throwaway cache: the expected bytes.
        let scratch = crate::private::test_dir();
        unflushed_changes(&open(&fx, scratch.path()), &mut model).await;
        let gets = fx.store.gets();
        let engine = open(&fx, tmp.path());
        assert!(engine.read(0, model.len()).await.unwrap() == model);
        for changed in [3, 5, 6, 7] {
            assert!(engine.cache.is_written(changed), "chunk {changed}");
        }
        // Only the chunks the child never touched were fetched.
        assert_eq!(fx.store.gets() - gets, 4, "chunks 0, 2, 4 and 8");
        let report = crate::cache::check::check_chunks(&*engine.cache, &fx.manifest).unwrap();
        assert_eq!(report.mismatched, Vec::<u64>::new());
        assert!(engine.cache.repairs().is_empty());
    });
}
