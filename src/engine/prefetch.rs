//! Prefetch: fetching, in a recorded trace's order, the chunks a start is
//! expected to read, before it reads them.
//!
//! One task walks the plan and keeps at most `prefetch_chunks` fetches in
//! flight. Its fetches are ordinary fetches at [`Priority::Prefetch`]: they
//! wait behind every demand and readahead fetch for a store slot, and a
//! reader that needs a chunk still waiting in line raises that fetch to
//! demand. Because the walker starts a fetch only when one of its own ends,
//! the prefetch line never holds more than `prefetch_chunks` tickets, and
//! with fewer of those than store slots a demand fetch finds a free slot or
//! is next in line: prefetch never delays a demand read by more than the
//! one fetch a slot is busy with.
//!
//! Chunks already present (read or fetched meanwhile) are skipped without
//! a fetch. A failed prefetch fails no request: readers fetch the chunk
//! themselves. The walk stops when the engine is dropped or told to stop
//! (the device is being removed); fetches already started finish.
//! However it ends, `prefetch_remaining` then counts none of its chunks:
//! a chunk leaves the count when its fetch ends or, never started, when
//! the walk ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::fetcher::Fetcher;
use super::slots::Priority;
use super::stats::{add, sub, Counters};

/// Tells a running prefetch to stop.
#[derive(Debug, Default)]
pub(super) struct StopFlag(AtomicBool);

impl StopFlag {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Spawns the walk of `plan` (chunk indices, in order) on the fetcher's
/// runtime.
pub(super) fn spawn(
    fetcher: Arc<Fetcher>,
    plan: Vec<u64>,
    in_flight: usize,
    counters: Arc<Counters>,
    stop: Arc<StopFlag>,
) {
    add(&counters.prefetch_planned, plan.len() as u64);
    add(&counters.prefetch_remaining, plan.len() as u64);
    let runtime = fetcher.runtime().clone();
    runtime.spawn(walk(fetcher, plan, in_flight.max(1), counters, stop));
}

async fn walk(
    fetcher: Arc<Fetcher>,
    plan: Vec<u64>,
    in_flight: usize,
    counters: Arc<Counters>,
    stop: Arc<StopFlag>,
) {
    let permits = Arc::new(Semaphore::new(in_flight));
    // Dropped with the walk, returned or cancelled (the runtime shutting
    // down drops it mid-await).
    let mut unwalked = Remaining {
        counters: Arc::clone(&counters),
        chunks: plan.len() as u64,
    };
    for index in plan {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        if stop.stopped() {
            tracing::debug!("prefetch stopped");
            return;
        }
        let fetching = unwalked.take_one();
        let Some(fill) = fetcher.start_fetch(index, Priority::Prefetch) else {
            // Present, zero, or being filled by someone else already.
            continue;
        };
        add(&counters.chunks_prefetched, 1);
        fetcher.runtime().spawn(async move {
            let _fetching = fetching;
            // Its outcome is the readers' business; only the slot matters.
            let _ = fill.await;
            drop(permit);
        });
    }
    // Hold on until the last fetch ends, so an idle engine has no prefetch.
    let _ = permits.acquire_many(in_flight as u32).await;
}

/// Chunks counted in `prefetch_remaining` until this is dropped.
struct Remaining {
    counters: Arc<Counters>,
    chunks: u64,
}

impl Remaining {
    /// Moves one chunk out into a count of its own.
    fn take_one(&mut self) -> Remaining {
        self.chunks -= 1;
        Remaining {
            counters: Arc::clone(&self.counters),
            chunks: 1,
        }
    }
}

impl Drop for Remaining {
    fn drop(&mut self) {
        sub(&self.counters.prefetch_remaining, self.chunks);
    }
}
