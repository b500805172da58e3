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
    /// A read into a registered buffer (ublk zero copy).
    ReadRegistered {
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
    /// A write from a registered buffer (ublk zero copy).
    WriteRegistered {
        at: Index,
        len: Index,
        fill: u8,
    },
    Flush,
    Reopen,
    /// The device process dies: the engine is dropped without a flush.
    Crash,
    Discard {
        at: Index,
        len: Index,
    },
    WriteZeroes {
        at: Index,
        len: Index,
    },
    /// The store fails the next few gets of a chunk with transient errors.
    Transient {
        chunk: Index,
        failures: u64,
    },
    /// The store answers every get this many milliseconds late (0: on time).
    Delay {
        ms: u64,
    },
    /// The store hangs on a chunk while it is read whole: the read fails at
    /// the deadline unless the chunk needs no fetch.
    Hang {
        chunk: Index,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<Index>(), any::<Index>()).prop_map(|(at, len)| Op::Read { at, len }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(at, len)| Op::TryRead { at, len }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(at, len)| Op::ReadRegistered { at, len }),
        4 => (any::<Index>(), 2usize..8, any::<Index>())
            .prop_map(|(at, chunks, step)| Op::Scan { at, chunks, step }),
        3 => (any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(at, len, fill)| Op::Write { at, len, fill }),
        2 => (any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(at, len, fill)| Op::WriteRegistered { at, len, fill }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(at, len)| Op::Discard { at, len }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(at, len)| Op::WriteZeroes { at, len }),
        1 => (any::<Index>(), 1u64..4).prop_map(|(chunk, failures)| Op::Transient { chunk, failures }),
        1 => prop_oneof![Just(0u64), 1u64..4].prop_map(|ms| Op::Delay { ms }),
        1 => any::<Index>().prop_map(|chunk| Op::Hang { chunk }),
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

/// The deadline of fetches in the model test: a hung chunk costs this.
const HANG_DEADLINE: std::time::Duration = std::time::Duration::from_millis(150);

/// What a crash leaves uncertain: the image as of the last flush, and the
/// image after each change since, any of whose bytes may have survived.
#[derive(Default)]
struct Unflushed {
    flushed: Vec<u8>,
    since: Vec<Vec<u8>>,
    /// Bytes a crash left as any of the values above, until read.
    uncertain: Vec<bool>,
}

impl Unflushed {
    fn new(model: &[u8]) -> Unflushed {
        Unflushed {
            flushed: model.to_vec(),
            since: Vec::new(),
            uncertain: vec![false; model.len()],
        }
    }

    /// The model changed (a write, a discard): remember this state.
    fn changed(&mut self, model: &[u8], at: usize, len: usize) {
        self.since.push(model.to_vec());
        self.uncertain[at..at + len].fill(false);
    }

    fn flushed(&mut self, model: &[u8]) {
        assert!(!self.uncertain.contains(&true), "settle before a flush");
        self.flushed = model.to_vec();
        self.since.clear();
    }

    /// After a crash every byte changed since the flush is uncertain; the
    /// model takes the flushed value until a read settles it.
    fn crashed(&mut self, model: &mut [u8]) {
        for pos in 0..model.len() {
            if self.since.iter().any(|s| s[pos] != self.flushed[pos]) {
                self.uncertain[pos] = true;
                model[pos] = self.flushed[pos];
            }
        }
    }

    fn allows(&self, pos: usize, byte: u8) -> bool {
        self.uncertain[pos]
            && (self.flushed[pos] == byte || self.since.iter().any(|s| s[pos] == byte))
    }
}

/// Checks `got`, read at `at`, against the model. A byte a partial discard
/// may have zeroed matches either way, a byte a crash left uncertain
/// matches any value it held since the last flush, and either is then what
/// was read.
fn settle(
    model: &mut [u8],
    either_zero: &mut [bool],
    unflushed: &mut Unflushed,
    at: usize,
    got: &[u8],
) -> Result<(), TestCaseError> {
    for (i, &byte) in got.iter().enumerate() {
        let pos = at + i;
        let expected = model[pos];
        prop_assert!(
            byte == expected || (either_zero[pos] && byte == 0) || unflushed.allows(pos, byte),
            "byte {} reads {:#x}, expected {:#x}",
            pos,
            byte,
            expected
        );
        model[pos] = byte;
        either_zero[pos] = false;
        unflushed.uncertain[pos] = false;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Random reads and writes (into and from memory or registered
    /// buffers), flushes, discards, write-zeroes, clean restarts and
    /// crashes agree with the model over a store that is slow, fails
    /// transiently or hangs, with readahead off or on. A crash keeps every
    /// flushed write; an unflushed one may or may not survive, but no other
    /// byte changes, and the cache then checks clean against the manifest
    /// (what `verify-cache` checks). No chunk is delivered twice between
    /// crashes.
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
        let tmp = crate::private::test_dir();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _entered = rt.enter();
        let fetch = FetchPolicy {
            deadline: HANG_DEADLINE,
            first_backoff: std::time::Duration::from_millis(1),
            ..FetchPolicy::default()
        };
        let opts = EngineOptions { readahead_chunks, fetch, ..EngineOptions::default() };
        // Bytes a partial discard of a chunk the cache lacked may have left
        // as they were or zeroed; a read settles which.
        let mut either_zero = vec![false; model.len()];
        let mut unflushed = Unflushed::new(&model);
        // A crash loses the chunks fetched since the last flush: they may be
        // delivered again.
        let mut deliveries = stored;
        let open = || open_engine(&fx, tmp.path(), opts).unwrap();
        let mut engine: Arc<Engine> = open();
        let size = model.len();
        for op in &ops {
            match op {
                Op::Read { at, len } => {
                    let (at, len) = range(size, at, len);
                    let got = rt.block_on(engine.read(at as u64, len)).unwrap();
                    settle(&mut model, &mut either_zero, &mut unflushed, at, &got)?;
                }
                Op::ReadRegistered { at, len } => {
                    let (at, len) = range(size, at, len);
                    let got = rt.block_on(engine.read_registered(at as u64, len)).unwrap();
                    settle(&mut model, &mut either_zero, &mut unflushed, at, &got)?;
                }
                Op::TryRead { at, len } => {
                    let (at, len) = range(size, at, len);
                    let mut buf = vec![0xCC; len];
                    if let Some(result) = engine.try_read_now(at as u64, &mut buf) {
                        result.unwrap();
                        settle(&mut model, &mut either_zero, &mut unflushed, at, &buf)?;
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
                        settle(&mut model, &mut either_zero, &mut unflushed, pos, &buf)?;
                        pos += len;
                    }
                }
                Op::Write { at, len, fill } | Op::WriteRegistered { at, len, fill } => {
                    let (at, len) = range(size, at, len);
                    let data = pattern(len, *fill, at);
                    let write = if matches!(op, Op::Write { .. }) {
                        engine.write(at as u64, &data)
                    } else {
                        engine.write_registered(at as u64, &data)
                    };
                    rt.block_on(write).unwrap();
                    model[at..at + len].copy_from_slice(&data);
                    either_zero[at..at + len].fill(false);
                    unflushed.changed(&model, at, len);
                }
                Op::Flush | Op::Reopen => {
                    // What a crash left uncertain is made durable as it
                    // is: learn what that is first.
                    if unflushed.uncertain.contains(&true) {
                        let got = rt.block_on(engine.read(0, size)).unwrap();
                        settle(&mut model, &mut either_zero, &mut unflushed, 0, &got)?;
                    }
                    // Fetches ahead may still run, holding the cache's
                    // lock: wait for them, then flush what they fetched.
                    rt.block_on(idle(&engine));
                    rt.block_on(engine.flush()).unwrap();
                    unflushed.flushed(&model);
                    if matches!(op, Op::Reopen) {
                        drop(engine);
                        engine = open();
                    }
                }
                Op::Crash => {
                    // Fetches still running would hold the cache: a killed
                    // process has none.
                    rt.block_on(idle(&engine));
                    drop(engine);
                    engine = open();
                    unflushed.crashed(&mut model);
                    deliveries += stored;
                    let report = crate::cache::check::check_chunks(&*engine.cache, &fx.manifest).unwrap();
                    prop_assert!(report.mismatched.is_empty(), "after a crash: {:?}", report);
                }
                Op::Discard { at, len } | Op::WriteZeroes { at, len } => {
                    let (at, len) = range(size, at, len);
                    let discard = matches!(op, Op::Discard { .. });
                    // Before the request: what the cache holds decides what
                    // a partial discard does.
                    let partial_absent: Vec<usize> = (at..at + len)
                        .filter(|&i| {
                            let chunk = i / CSU;
                            let whole = at <= chunk * CSU && (chunk * CSU + CSU).min(size) <= at + len;
                            discard && !whole && !engine.servable_now((chunk * CSU) as u64, 1)
                        })
                        .collect();
                    let request = if discard {
                        engine.discard(at as u64, len as u64)
                    } else {
                        engine.write_zeroes(at as u64, len as u64)
                    };
                    rt.block_on(request).unwrap();
                    let kept: Vec<u8> = partial_absent.iter().map(|&i| model[i]).collect();
                    model[at..at + len].fill(0);
                    either_zero[at..at + len].fill(false);
                    unflushed.changed(&model, at, len);
                    for (&i, old) in partial_absent.iter().zip(kept) {
                        // Nothing was fetched for it: the engine may keep
                        // the old byte, which the model still knows.
                        model[i] = old;
                        either_zero[i] = true;
                    }
                }
                Op::Transient { chunk, failures } => {
                    let index = chunk.index(fx.manifest.entries.len());
                    if let ManifestEntry::Chunk { id, .. } = &fx.manifest.entries[index] {
                        fx.store.set_transient(*id, *failures);
                    }
                }
                Op::Delay { ms } => {
                    let delay = (*ms > 0).then(|| std::time::Duration::from_millis(*ms));
                    fx.store.set_delay(delay);
                }
                Op::Hang { chunk } => {
                    let index = chunk.index(fx.manifest.entries.len());
                    let (at, len) = (index * CSU, CSU.min(size - index * CSU));
                    let ManifestEntry::Chunk { id, .. } = fx.manifest.entries[index].clone() else {
                        continue;
                    };
                    let needs_fetch = !engine.servable_now(at as u64, len as u64);
                    let _gate = fx.store.gate(id);
                    match rt.block_on(engine.read(at as u64, len)) {
                        Ok(got) => settle(&mut model, &mut either_zero, &mut unflushed, at, &got)?,
                        // A fetch already running when the store hung may
                        // still deliver; otherwise the deadline fires.
                        Err(e) => prop_assert!(
                            needs_fetch && e.kind() == crate::error::ErrorKind::Transient,
                            "hung read of chunk {} failed: {}", index, e
                        ),
                    }
                    fx.store.ungate(&id);
                }
            }
            prop_assert!(fx.store.served() <= deliveries, "a chunk was delivered twice");
        }
        let got = rt.block_on(engine.read(0, size)).unwrap();
        settle(&mut model, &mut either_zero, &mut unflushed, 0, &got)?;
        // A clean stop: the device process flushes before it lets go.
        rt.block_on(idle(&engine));
        rt.block_on(engine.flush()).unwrap();
        drop(engine);
        let engine = open();
        prop_assert!(rt.block_on(engine.read(0, size)).unwrap() == model);
        prop_assert!(fx.store.served() <= deliveries, "a chunk was delivered twice");
        let stats = engine.stats();
        prop_assert!(stats.chunks_present + stats.chunks_zero >= stats.chunks_total);
    }
}
