//! Sequential readahead: fetching the chunks a sequential reader will ask for
//! next, before it asks.
//!
//! Reads through FUSE + loop reach the engine a chunk or two ahead of the
//! reader at most, so a cold sequential scan would wait for one fetch after
//! another. Readahead sits beside the request path: every read reports the
//! chunks it touched ([`Readahead::note_read`], once per request) and readahead may start fetches
//! that nobody awaits.
//!
//! **Detection.** The engine remembers the last chunk of a few recent access
//! streams. A read that misses and continues no stream starts a *candidate*;
//! a read that misses the chunk right after a candidate's last confirms it as
//! a sequential stream with a window of [`FIRST_WINDOW`] fetches, and the
//! window doubles each time the reader (hit or miss) gets as many chunks
//! further as the window holds, up to `EngineOptions::readahead_chunks`: a
//! stream earns its window by being read. Hits move candidates on too (a reader
//! crossing a zero or cached chunk is still sequential) but never start or
//! confirm one. Random reads seldom continue a candidate, so they seldom
//! fetch anything extra.
//!
//! **Window.** A stream keeps up to `window` fetches in flight among the
//! next [`horizon`]`(window)` non-zero chunks after its last chunk (zero
//! chunks need no fetch and are skipped, up to [`MAX_SCAN`] of them); it
//! stops at the end of the image. The window counts fetches, not chunks
//! ahead: the reader waits on the oldest fetch while younger ones finish, and
//! finished chunks waiting to be read must not hold the pipeline's slots.
//! The horizon grows faster than the window (2, 8, 16 chunks for windows of
//! 2, 4, 8), so a short stream, such as one small file, costs little, and a
//! long one may run further ahead; it bounds what a reader that stops has
//! cost. Scans run on every read of a stream and whenever one of its fetches
//! succeeds, so a stream stays full while its reader waits.
//!
//! Invariants:
//! * a readahead fetch is an ordinary fetch in the in-flight map: single
//!   flight, the fill lock against whole-chunk writes, verification, and the
//!   present bit only after the bytes, all as for a demand fetch;
//! * at most `readahead_chunks` readahead fetches are in flight at once over
//!   all streams, fewer while they slow the store (the fetcher's
//!   [`Budget`](super::budget)); readahead that finds no permit leaves the
//!   chunk for a later scan. Demand fetches take no permit, so readahead
//!   never holds one up beyond the one chunk it may be fetching already;
//! * a stream starts each chunk at most once (`Stream::until`), so a chunk
//!   whose fetch failed is left to the readers and never retried in a loop;
//! * a failed readahead fetch fails no request: it is counted and logged like
//!   any fetch, and its fill tells waiters only to look again, so a request
//!   that needs the chunk fetches it itself.
//!
//! **Prefetch first.** While a trace's prefetch runs, readahead starts
//! nothing and learns nothing: the trace already names the chunks this start
//! reads, and at an origin short of bandwidth guessed chunks would delay
//! them. Readahead resumes when the prefetch ends.
//!
//! **Neighbourhoods.** A miss no stream takes may pair with a recent one
//! nearby; the region around them is then fetched too (see
//! [`super::neighbourhood`]), under the same in-flight bound and counters.
//!
//! **Files and metadata.** Once the image's superblock is filled, the
//! fetcher learns where its inode tables, directories and files lie
//! ([`super::files`]). The inode tables and directories are fetched here
//! ahead of the lookups that will read them, and a miss inside a run of a
//! file's chunks makes a neighbourhood of that run at once.
//!
//! # Cancel safety
//! Readahead fetches run in their own tasks, holding the fetcher (and so the
//! cache); nothing awaits them but requests for their chunks. Dropping a
//! request does not stop them, and dropping the last handle to the engine
//! leaves the cache locked until they end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::fetcher::{Fetcher, Filled};
use super::layout::Layout;
use super::neighbourhood::{Neighbourhood, Neighbourhoods, Reach, WHOLE_RUN};
use super::slots::Priority;
use super::stats::{add, Counters};

/// Window of a newly confirmed stream, in fetches.
pub(super) const FIRST_WINDOW: u64 = 2;
/// The most non-zero chunks ahead of its reader a stream may fetch, per
/// fetch of its window.
pub(super) const HORIZON: u64 = 2;
/// Streams remembered at once; the least recently used is forgotten first.
const STREAMS: usize = 8;
/// A read this many chunks behind a stream's last chunk still belongs to it:
/// requests sent in parallel reach the engine slightly out of order.
const REORDER: u64 = 2;
/// Most chunk indices one window looks through, so a long zero run costs a
/// bounded scan.
pub(super) const MAX_SCAN: u64 = 1024;

/// How many non-zero chunks after its reader's last a stream with `window`
/// fetches in flight may fetch: `window² / 2`, at least `window` and at most
/// [`HORIZON`]` × window`.
pub(super) fn horizon(window: u64) -> u64 {
    (window * window / 2).clamp(window, HORIZON * window)
}

/// One remembered access stream.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Highest chunk the stream has read.
    last: u64,
    /// Fetches to keep in flight ahead of `last`; 0 for a candidate.
    window: u64,
    /// `last` when the window was last set.
    grown_at: u64,
    /// Every chunk below this was started, or found present, already.
    until: u64,
    /// Tick of the last read that touched the stream.
    used: u64,
}

#[derive(Debug, Default)]
struct Streams {
    streams: Vec<Stream>,
    tick: u64,
    neighbourhoods: Neighbourhoods,
    /// Chunks of the file system's metadata to fetch, in the order they
    /// were learnt of (`Files::take_wanted`).
    metadata: VecDeque<u64>,
}

/// Readahead state of one engine.
#[derive(Debug)]
pub(super) struct Readahead {
    fetcher: Arc<Fetcher>,
    layout: Arc<Layout>,
    counters: Arc<Counters>,
    /// Largest window, and the most readahead fetches in flight over all
    /// streams (the fetcher's budget may allow fewer); 0 turns readahead
    /// off.
    max: u64,
    streams: Mutex<Streams>,
    /// Whether any read ever missed: until then there is no stream for a
    /// hit to move on, and hits skip the lock.
    tracking: AtomicBool,
}

/// What readahead found or did for one chunk.
enum Outcome {
    /// A fetch of it is running (just started or not).
    Busy,
    /// Present, or gone from the manifest: nothing to do.
    Done,
    NoPermit,
}

impl Readahead {
    pub fn new(
        max_chunks: u32,
        fetcher: Arc<Fetcher>,
        layout: Arc<Layout>,
        counters: Arc<Counters>,
    ) -> Readahead {
        Readahead {
            fetcher,
            layout,
            counters,
            max: u64::from(max_chunks),
            streams: Mutex::new(Streams::default()),
            tracking: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Streams {
    /// Records a read of chunks `first..=last` and returns the stream it
    /// belongs to if that stream is confirmed.
    fn access(&mut self, first: u64, last: u64, missed: bool, max: u64) -> Option<usize> {
        self.tick += 1;
        let tick = self.tick;
        let found = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| first <= s.last.saturating_add(1) && last + REORDER >= s.last)
            .max_by_key(|(_, s)| (s.window, s.used))
            .map(|(i, _)| i);
        let Some(i) = found else {
            if missed {
                let stream = Stream {
                    last,
                    window: 0,
                    grown_at: last,
                    until: last.saturating_add(1),
                    used: tick,
                };
                if self.streams.len() < STREAMS {
                    self.streams.push(stream);
                } else if let Some(oldest) = self.streams.iter_mut().min_by_key(|s| s.used) {
                    *oldest = stream;
                }
            }
            return None;
        };
        let stream = &mut self.streams[i];
        stream.used = tick;
        if last > stream.last {
            stream.last = last;
            if stream.window > 0 {
                if last >= stream.grown_at + stream.window {
                    stream.window = (stream.window * 2).min(max);
                    stream.grown_at = last;
                }
            } else if missed {
                stream.window = FIRST_WINDOW.min(max);
                stream.grown_at = last;
            }
        }
        (stream.window > 0).then_some(i)
    }
}

impl Readahead {
    /// Tells readahead that a request touched chunks `first..=last`,
    /// `missed` when some of them were neither present nor zero. Starts the
    /// fetches the request's stream calls for; never waits for one.
    pub fn note_read(self: &Arc<Self>, first: u64, last: u64, missed: bool) {
        // While a trace's prefetch runs, the trace names what this start
        // reads: chunks guessed beside it would only take the origin's
        // bandwidth from the named ones.
        if self.max == 0 || self.counters.prefetch_remaining.load(Ordering::Relaxed) > 0 {
            return;
        }
        if missed {
            self.tracking.store(true, Ordering::Relaxed);
        } else if !self.tracking.load(Ordering::Relaxed) {
            return;
        }
        let mut streams = self.lock();
        match streams.access(first, last, missed, self.max) {
            Some(i) => self.fill_window(&mut streams.streams[i]),
            None if missed => {
                let neighbourhoods = &mut streams.neighbourhoods;
                // What the file system says is a guess like any other: not
                // on a link short of bandwidth.
                let files = Some(self.fetcher.files())
                    .filter(|files| files.knows_layout() && self.fetcher.budget().has_room());
                let file = files.and_then(|files| files.span_of(first));
                // A large file read at random (a database) must not pair
                // misses from as far as a program's modules do.
                let reach = match (files, &file) {
                    (Some(_), Some(run)) if run.end() - run.start() + 1 > WHOLE_RUN => {
                        Reach::Narrow
                    }
                    (Some(_), _) => Reach::AmongFiles,
                    (None, _) => Reach::Narrow,
                };
                if let Some(n) = neighbourhoods.note_miss(first, last, reach) {
                    self.fill_neighbourhood(neighbourhoods.get_mut(n));
                }
                if let Some(file) = file {
                    if let Some(n) = neighbourhoods.note_file_miss(first, last, file) {
                        self.fill_neighbourhood(neighbourhoods.get_file_mut(n));
                    }
                }
            }
            None => {}
        }
        // After the request's own stream or neighbourhood: metadata is a
        // guess about later lookups, they about this reader's next chunk.
        self.fill_metadata(&mut streams);
    }

    /// Called by a readahead fetch that succeeded, once its permit is free:
    /// every stream may start another fetch now.
    fn fetch_done(self: &Arc<Self>) {
        let mut streams = self.lock();
        for stream in streams.streams.iter_mut().filter(|s| s.window > 0) {
            self.fill_window(stream);
        }
        let end = self.layout.chunk_count();
        for neighbourhood in streams.neighbourhoods.iter_mut() {
            if !neighbourhood.is_done(end) {
                self.fill_neighbourhood(neighbourhood);
            }
        }
        self.fill_metadata(&mut streams);
    }

    /// Starts fetches of the file system's metadata learnt of since the
    /// last read (see `Fetcher::set_readahead`).
    pub fn fetch_metadata(self: &Arc<Self>) {
        if self.max == 0 || self.counters.prefetch_remaining.load(Ordering::Relaxed) > 0 {
            return;
        }
        self.fill_metadata(&mut self.lock());
    }

    /// Starts fetches of the file system's metadata learnt of so far, in
    /// order, until the permits run out.
    fn fill_metadata(self: &Arc<Self>, streams: &mut Streams) {
        let wanted = self.fetcher.files().take_wanted();
        // A trace names the metadata its start reads: once one is
        // prefetched, the rest would be guesses beside it.
        if self.counters.prefetch_planned.load(Ordering::Relaxed) > 0 {
            streams.metadata.clear();
            return;
        }
        streams.metadata.extend(wanted);
        // On a link short of bandwidth, later lookups can wait their turn.
        if !self.fetcher.budget().has_room() {
            return;
        }
        while let Some(index) = streams.metadata.pop_front() {
            if self.layout.is_zero(index) {
                continue;
            }
            if let Outcome::NoPermit = self.start(index) {
                streams.metadata.push_front(index);
                return;
            }
        }
    }

    /// Starts fetches of the chunks `neighbourhood` covers, nearest its
    /// latest miss first, until the permits run out.
    fn fill_neighbourhood(self: &Arc<Self>, neighbourhood: &mut Neighbourhood) {
        let todo: Vec<u64> = neighbourhood.unstarted(self.layout.chunk_count()).collect();
        for index in todo {
            if !self.layout.is_zero(index) {
                if let Outcome::NoPermit = self.start(index) {
                    return;
                }
            }
            neighbourhood.mark_started(index);
        }
    }

    /// Starts fetches until `stream` has `window` in flight, within its
    /// horizon.
    fn fill_window(self: &Arc<Self>, stream: &mut Stream) {
        let end = self.layout.chunk_count();
        let horizon = horizon(stream.window);
        let (mut index, mut ahead, mut busy, mut scanned) = (stream.last + 1, 0, 0, 0);
        while busy < stream.window && ahead < horizon && index < end && scanned < MAX_SCAN {
            if !self.layout.is_zero(index) {
                ahead += 1;
                if index < stream.until {
                    // Started once already: count it, never restart it.
                    if self.fetcher.is_busy(index) {
                        busy += 1;
                    }
                } else {
                    match self.start(index) {
                        Outcome::Busy => busy += 1,
                        Outcome::Done => {}
                        Outcome::NoPermit => break,
                    }
                    stream.until = index + 1;
                }
            }
            index += 1;
            scanned += 1;
        }
    }

    /// Starts a detached fetch of chunk `index` unless it is present or
    /// being filled, or all readahead permits are taken.
    fn start(self: &Arc<Self>, index: u64) -> Outcome {
        if self.fetcher.is_busy(index) {
            return Outcome::Busy;
        }
        let Some(permit) = self.fetcher.budget().try_acquire() else {
            return Outcome::NoPermit;
        };
        let Some(fill) = self.fetcher.fetch(index, Priority::Readahead) else {
            return Outcome::Done;
        };
        add(&self.counters.chunks_readahead, 1);
        let readahead = Arc::clone(self);
        self.fetcher.runtime().spawn(async move {
            let fetched = matches!(fill.await, Ok(Filled::Plaintext(_)));
            // Permit free first: the streams can start the next.
            drop(permit);
            if fetched {
                readahead.fetch_done();
            }
        });
        Outcome::Busy
    }
}
