//! The engine against a model: a plain `Vec<u8>` holding the image.

use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::Index;

use super::testing::{idle, open_engine, sample_image, seal_image, EngineExt, CS, CSU};
use super::*;
use crate::chunk::ManifestEntry;

#[derive(Debug, Clone)]
enum Op {
    Read {
        at: Index,
        len: Index,
    },
    TryRead {
        at: Index,
        len: Index,
    },
    /// Consecutive reads of `step` bytes over `chunks` chunks, as a
    /// sequential reader sends them: the pattern readahead looks for.
    Scan {
        at: Index,
        chunks: usize,
        step: Index,
    },
    Write {
        at: Index,
        len: Index,
        fill: u8,
    },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<Index>(), any::<Index>()).prop_map(|(at, len)| Op::Read { at, len }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(at, len)| Op::TryRead { at, len }),
        4 => (any::<Index>(), 2usize..8, any::<Index>())
            .prop_map(|(at, chunks, step)| Op::Scan { at, chunks, step }),
        3 => (any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(at, len, fill)| Op::Write { at, len, fill }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// An in-range request: anywhere in the image, up to three chunks long,
/// biased towards chunk boundaries and whole chunks.
fn range(size: usize, at: &Index, len: &Index) -> (usize, usize) {
    let raw = at.index(size + 1);
    let at = match raw % 3 {
        0 => (raw / CSU) * CSU,
        _ => raw,
    }
    .min(size);
    let max = (size - at).min(3 * CSU);
    let len = match len.index(4) {
        0 => CSU.min(max),
        _ => len.index(max + 1),
    };
    (at, len)
}

fn pattern(len: usize, fill: u8, at: usize) -> Vec<u8> {
    (0..len)
        .map(|i| fill.wrapping_add((at + i) as u8).wrapping_mul(31) | 1)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Random reads, writes, flushes and restarts agree with the model, and
    /// no chunk is ever fetched twice (every restart here is clean), with
    /// readahead off or on.
    #[test]
    fn engine_agrees_with_a_plain_image(
        readahead_chunks in prop_oneof![Just(0u32), 1u32..=8],
        chunks in 1usize..16,
        tail in prop_oneof![Just(0usize), 1usize..CSU],
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut model = sample_image(chunks, tail, CS, seed);
        let fx = seal_image(&model, CS);
        let stored = fx.manifest.entries.iter()
            .filter(|e| matches!(e, ManifestEntry::Chunk { .. }))
            .count() as u64;
        let tmp = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _entered = rt.enter();
        let opts = EngineOptions { readahead_chunks, ..EngineOptions::default() };
        let open = || open_engine(&fx, tmp.path(), opts).unwrap();
        let mut engine: Arc<Engine> = open();
        let size = model.len();
        for op in &ops {
            match op {
                Op::Read { at, len } => {
                    let (at, len) = range(size, at, len);
                    let got = rt.block_on(engine.read(at as u64, len)).unwrap();
                    prop_assert!(got == model[at..at + len], "read {} at {}", len, at);
                }
                Op::TryRead { at, len } => {
                    let (at, len) = range(size, at, len);
                    let mut buf = vec![0xCC; len];
                    if let Some(result) = engine.try_read_now(at as u64, &mut buf) {
                        result.unwrap();
                        prop_assert!(buf == model[at..at + len], "try_read {} at {}", len, at);
                    }
                }
                Op::Scan { at, chunks, step } => {
                    // In the first half, so most scans have chunks ahead.
                    let at = at.index(size / 2 + 1);
                    let end = (at + chunks * CSU).min(size);
                    let step = 1 + step.index(CSU);
                    let mut pos = at;
                    while pos < end {
                        let len = step.min(end - pos);
                        let mut buf = vec![0xCC; len];
                        // The FUSE frontend's order: the fast path, then a read.
                        match engine.try_read_now(pos as u64, &mut buf) {
                            Some(result) => result.unwrap(),
                            None => buf = rt.block_on(engine.read(pos as u64, len)).unwrap(),
                        }
                        prop_assert!(buf == model[pos..pos + len], "scan {} at {}", len, pos);
                        pos += len;
                    }
                }
                Op::Write { at, len, fill } => {
                    let (at, len) = range(size, at, len);
                    let data = pattern(len, *fill, at);
                    rt.block_on(engine.write(at as u64, &data)).unwrap();
                    model[at..at + len].copy_from_slice(&data);
                }
                Op::Flush => rt.block_on(engine.flush()).unwrap(),
                Op::Reopen => {
                    rt.block_on(engine.flush()).unwrap();
                    // Fetches ahead may still run, holding the cache's lock.
                    rt.block_on(idle(&engine));
                    drop(engine);
                    engine = open();
                }
            }
            prop_assert!(fx.store.gets() <= stored, "a chunk was fetched twice");
        }
        prop_assert!(rt.block_on(engine.read(0, size)).unwrap() == model);
        // A clean stop: the device process flushes before it lets go.
        rt.block_on(engine.flush()).unwrap();
        rt.block_on(idle(&engine));
        drop(engine);
        let engine = open();
        prop_assert!(rt.block_on(engine.read(0, size)).unwrap() == model);
        prop_assert!(fx.store.gets() <= stored, "a chunk was fetched twice");
        let stats = engine.stats();
        prop_assert!(stats.chunks_present + stats.chunks_zero >= stats.chunks_total);
    }
}
