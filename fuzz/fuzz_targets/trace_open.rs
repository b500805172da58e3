//! Arbitrary bytes as a sealed trace fetched from a store, and traces built
//! from fuzzer bytes sealed and merged.
//!
//! Properties: `Trace::open` never panics and every refusal names the trace;
//! a trace that opens re-seals to exactly the input (the nonce is derived
//! from the content, so there is one encoding); a built trace survives
//! sealing and opening unchanged; `merge` keeps only ids some run read, each
//! once, and with a threshold of 0 keeps every id any run read.
#![no_main]

use std::collections::HashSet;

use arbitrary::{Arbitrary, Unstructured};
use lazyblk::chunk::{merge_trace_runs, ChunkId, RunStamp, Trace, TraceRun};
use lazyblk_fuzz::tenant;
use libfuzzer_sys::fuzz_target;

const NAME: &str = "fuzz.trace";

fuzz_target!(|data: &[u8]| {
    let tenant = tenant();
    match Trace::open(NAME, data, &tenant) {
        Ok(trace) => assert!(
            trace.seal(&tenant) == data,
            "an opened trace does not re-seal to its own bytes"
        ),
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.contains(NAME),
                "error does not name the trace: {message}"
            );
        }
    }

    let Ok(trace) = built(&mut Unstructured::new(data)) else {
        return;
    };
    let reopened = Trace::open(NAME, &trace.seal(&tenant), &tenant)
        .expect("a trace sealed with the tenant key opens");
    assert_eq!(reopened, trace);

    let runs: Vec<&[ChunkId]> = trace.runs.iter().map(|r| &r.ids[..]).collect();
    let read: HashSet<ChunkId> = runs.iter().flat_map(|r| r.iter().copied()).collect();
    for threshold in [0.0, 0.5, 1.0] {
        let merged = merge_trace_runs(&runs, threshold);
        let distinct: HashSet<ChunkId> = merged.iter().copied().collect();
        assert_eq!(distinct.len(), merged.len(), "merge repeats an id");
        assert!(distinct.is_subset(&read), "merge invents an id");
        if threshold == 0.0 {
            assert_eq!(distinct, read, "a threshold of 0 drops an id some run read");
        }
    }
});

/// A trace within the format's limits; ids from a small alphabet so runs
/// share some.
fn built(u: &mut Unstructured<'_>) -> arbitrary::Result<Trace> {
    let name_len = u.int_in_range(0..=40)?;
    let image: String = (0..name_len)
        .map(|_| u.choose(b"abcdefghij-._").map(|&b| b as char))
        .collect::<arbitrary::Result<_>>()?;
    let mut runs = Vec::new();
    for _ in 0..u.int_in_range(0..=6)? {
        let mut ids = Vec::new();
        for _ in 0..u.int_in_range(0..=24)? {
            ids.push(ChunkId([u.int_in_range(0..=15)?; 32]));
        }
        runs.push(TraceRun {
            manifest_digest: <[u8; 32]>::arbitrary(u)?,
            recorded_at: u64::arbitrary(u)?,
            ids,
        });
    }
    let folded = if bool::arbitrary(u)? {
        let count = u.int_in_range(0..=8)?;
        let stamps = (0..count)
            .map(|_| <[u8; 12]>::arbitrary(u).map(RunStamp))
            .collect::<arbitrary::Result<_>>()?;
        Some(stamps)
    } else {
        None
    };
    Ok(Trace {
        image,
        runs,
        folded,
    })
}
