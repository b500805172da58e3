//! What readers touched and who brought each chunk: the recorded trace, and
//! the precision of readahead and prefetch.
//!
//! One byte per chunk holds three bits: *read* (a request read the chunk),
//! *prefetched* and *read ahead* (a speculative fetch of that kind filled
//! it). Counting a speculative chunk as read needs both bits, whichever
//! comes second: a reader that joins a speculative fetch still in flight
//! sets *read* first. Each side sets its bit with one atomic `fetch_or` and
//! looks at what the other had set, so exactly one of them counts.
//!
//! When recording, the first read of each chunk also appends its index to
//! the trace: demand reads only, never readahead or prefetch fills, and a
//! read that finds its chunk already present (prefetched, or cached by an
//! earlier run) counts as much as a miss, so a run recorded with prefetch
//! on records what the workload read, not what it still missed.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use super::slots::Priority;
use super::stats::{add, Counters};

const READ: u8 = 1;
const PREFETCHED: u8 = 2;
const READ_AHEAD: u8 = 4;

/// Per-chunk access state of one engine.
#[derive(Debug)]
pub(super) struct Access {
    states: Vec<AtomicU8>,
    /// Chunk indices in the order of their first read, while recording.
    order: Option<Mutex<Vec<u64>>>,
}

impl Access {
    pub fn new(chunk_count: u64, record: bool) -> Access {
        Access {
            states: (0..chunk_count).map(|_| AtomicU8::new(0)).collect(),
            order: record.then(|| Mutex::new(Vec::new())),
        }
    }

    fn state(&self, index: u64) -> Option<&AtomicU8> {
        usize::try_from(index).ok().and_then(|i| self.states.get(i))
    }

    /// A request read (part of) chunk `index`, a non-zero chunk.
    pub fn note_read(&self, index: u64, counters: &Counters) {
        let Some(state) = self.state(index) else {
            return;
        };
        if state.load(Ordering::Relaxed) & READ != 0 {
            return;
        }
        let before = state.fetch_or(READ, Ordering::AcqRel);
        if before & READ != 0 {
            return;
        }
        if before & PREFETCHED != 0 {
            add(&counters.prefetched_chunks_read, 1);
        }
        if before & READ_AHEAD != 0 {
            add(&counters.readahead_chunks_read, 1);
        }
        if let Some(order) = &self.order {
            order.lock().unwrap_or_else(|e| e.into_inner()).push(index);
        }
    }

    /// A fetch started at `origin` filled chunk `index`.
    pub fn note_filled(&self, index: u64, origin: Priority, counters: &Counters) {
        let (bit, read_counter) = match origin {
            Priority::Demand => return,
            Priority::Readahead => (READ_AHEAD, &counters.readahead_chunks_read),
            Priority::Prefetch => (PREFETCHED, &counters.prefetched_chunks_read),
        };
        let Some(state) = self.state(index) else {
            return;
        };
        let before = state.fetch_or(bit, Ordering::AcqRel);
        if before & READ != 0 && before & bit == 0 {
            add(read_counter, 1);
        }
    }

    /// The indices read so far, first read first; `None` when not recording.
    pub fn recorded(&self) -> Option<Vec<u64>> {
        let order = self.order.as_ref()?;
        Some(order.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn a_speculative_chunk_counts_as_read_once_whichever_side_comes_second() {
        let counters = Counters::new();
        let access = Access::new(4, true);
        // Filled, then read twice.
        access.note_filled(0, Priority::Prefetch, &counters);
        access.note_read(0, &counters);
        access.note_read(0, &counters);
        // Read while the fetch was in flight, then filled.
        access.note_read(1, &counters);
        access.note_filled(1, Priority::Readahead, &counters);
        // Filled and never read; read and never speculated.
        access.note_filled(2, Priority::Prefetch, &counters);
        access.note_read(3, &counters);
        access.note_filled(3, Priority::Demand, &counters);
        assert_eq!(counters.prefetched_chunks_read.load(Relaxed), 1);
        assert_eq!(counters.readahead_chunks_read.load(Relaxed), 1);
        assert_eq!(access.recorded().unwrap(), [0, 1, 3]);
        assert!(Access::new(4, false).recorded().is_none());
    }
}
