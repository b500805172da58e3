//! Per-device counters.
//!
//! Counters are relaxed atomics touched on every request; the latency
//! histogram sits behind a mutex because it is touched once per fetch, which
//! costs far more than the lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A snapshot of one device's counters, as `lazyblk list` prints them.
///
/// A *piece* is the part of one request that falls in one chunk: a 1 MiB
/// read over 512 KiB chunks has two or three pieces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Size of the image in bytes.
    pub image_bytes: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks in the image.
    pub chunks_total: u64,
    /// Chunks the manifest marks all-zero (never fetched).
    pub chunks_zero: u64,
    /// Chunks held in the cache's data file (fetched or written).
    pub chunks_present: u64,
    /// Read requests received (including ones that failed).
    pub read_requests: u64,
    /// Bytes returned by successful reads.
    pub read_bytes: u64,
    /// Write requests received (including refused or failed ones).
    pub write_requests: u64,
    /// Bytes of successful writes.
    pub write_bytes: u64,
    /// Successful flushes.
    pub flushes: u64,
    /// Pieces that needed a chunk's stored bytes (every read piece, and
    /// write pieces that keep part of a non-zero chunk) and found them
    /// without waiting: the chunk was in the cache or all-zero.
    pub cache_hits: u64,
    /// Such pieces that had to wait for a fetch, whether they started it or
    /// joined one already in flight.
    pub cache_misses: u64,
    /// Chunks fetched from the store, verified and stored in the cache, by
    /// demand fetches and readahead alike.
    pub chunks_fetched: u64,
    /// Fetches started by sequential readahead rather than by a request
    /// that needed the chunk (each also counts in `chunks_fetched` once it
    /// succeeds, or in `fetch_errors` or `integrity_failures` if it fails).
    /// A request that then needs a chunk still being fetched ahead waits
    /// for it and counts as a cache miss.
    #[serde(default)]
    pub chunks_readahead: u64,
    /// Chunks fetched by readahead that a request then read: with
    /// `chunks_readahead`, readahead's precision.
    #[serde(default)]
    pub readahead_chunks_read: u64,
    /// Fetches a request started because it needed the chunk and nothing
    /// had fetched it yet (readahead and prefetch did not, or not in
    /// time): the demand misses that remain.
    #[serde(default)]
    pub demand_fetches: u64,
    /// Chunks the prefetch plan named (a recorded trace's chunks that the
    /// image holds, as chunk indices).
    #[serde(default)]
    pub prefetch_planned: u64,
    /// Planned chunks the prefetch has not finished with yet (waiting or
    /// in flight); 0 once it is done, above 0 if it was stopped early.
    #[serde(default)]
    pub prefetch_remaining: u64,
    /// Fetches started by prefetch (chunks already present or being
    /// fetched are skipped and not counted). Each also counts in
    /// `chunks_fetched` once it succeeds.
    #[serde(default)]
    pub chunks_prefetched: u64,
    /// Chunks fetched by prefetch that a request then read: with
    /// `chunks_prefetched`, prefetch's precision.
    #[serde(default)]
    pub prefetched_chunks_read: u64,
    /// Envelope bytes received from the store (including any that then
    /// failed verification).
    pub bytes_fetched: u64,
    /// Fetches the store failed (not found, I/O, transient failures that
    /// outlasted their retries); deadlines are counted apart.
    pub fetch_errors: u64,
    /// Requests to the store retried after a transient failure.
    #[serde(default)]
    pub fetch_retries: u64,
    /// Fetches that failed because their deadline passed (the store hung or
    /// kept failing): each failed its readers with EIO.
    #[serde(default)]
    pub fetch_timeouts: u64,
    /// Discard requests received.
    #[serde(default)]
    pub discard_requests: u64,
    /// Write-zeroes requests received.
    #[serde(default)]
    pub write_zeroes_requests: u64,
    /// Whole chunks that discards and write-zeroes turned into holes in the
    /// cache, without fetching them.
    #[serde(default)]
    pub chunks_punched: u64,
    /// Fetched envelopes that failed their hash or authentication check.
    pub integrity_failures: u64,
    /// Median time of a successful fetch (store get, verify, decrypt,
    /// write to the cache), in microseconds; 0 before the first fetch.
    pub fetch_latency_p50_us: u64,
    /// 99th percentile of the same, in microseconds.
    pub fetch_latency_p99_us: u64,
    /// Per-tier counters when the store has tiers (fastest first); the
    /// device process fills them in from its store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<crate::store::TierSnapshot>,
}

/// The live counters behind [`EngineStats`].
#[derive(Debug)]
pub(crate) struct Counters {
    pub read_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_requests: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub chunks_readahead: AtomicU64,
    pub readahead_chunks_read: AtomicU64,
    pub demand_fetches: AtomicU64,
    pub prefetch_planned: AtomicU64,
    pub prefetch_remaining: AtomicU64,
    pub chunks_prefetched: AtomicU64,
    pub prefetched_chunks_read: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub fetch_retries: AtomicU64,
    pub fetch_timeouts: AtomicU64,
    pub discard_requests: AtomicU64,
    pub write_zeroes_requests: AtomicU64,
    pub chunks_punched: AtomicU64,
    pub integrity_failures: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    /// The same latencies in fixed buckets, once a metrics endpoint asks.
    latency_buckets: OnceLock<Arc<crate::metrics::Histogram>>,
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Takes `n` from a gauge.
pub(crate) fn sub(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Counters {
    pub fn new() -> Counters {
        Counters {
            read_requests: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_requests: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            chunks_readahead: AtomicU64::new(0),
            readahead_chunks_read: AtomicU64::new(0),
            demand_fetches: AtomicU64::new(0),
            prefetch_planned: AtomicU64::new(0),
            prefetch_remaining: AtomicU64::new(0),
            chunks_prefetched: AtomicU64::new(0),
            prefetched_chunks_read: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            fetch_retries: AtomicU64::new(0),
            fetch_timeouts: AtomicU64::new(0),
            discard_requests: AtomicU64::new(0),
            write_zeroes_requests: AtomicU64::new(0),
            chunks_punched: AtomicU64::new(0),
            integrity_failures: AtomicU64::new(0),
            // 1 µs to 1 hour at 3 significant digits: a few tens of KiB.
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("constant histogram bounds are valid"),
            ),
            latency_buckets: OnceLock::new(),
        }
    }

    pub fn record_fetch_latency(&self, elapsed: Duration) {
        if let Some(buckets) = self.latency_buckets.get() {
            buckets.observe(elapsed);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us.max(1));
    }

    /// Also counts later fetch latencies in `buckets`; the first call wins.
    pub fn export_fetch_latency(&self, buckets: Arc<crate::metrics::Histogram>) {
        let _ = self.latency_buckets.set(buckets);
    }

    /// Fills the counter fields of `stats`; the caller sets the geometry.
    pub fn fill(&self, stats: &mut EngineStats) {
        stats.read_requests = get(&self.read_requests);
        stats.read_bytes = get(&self.read_bytes);
        stats.write_requests = get(&self.write_requests);
        stats.write_bytes = get(&self.write_bytes);
        stats.flushes = get(&self.flushes);
        stats.cache_hits = get(&self.cache_hits);
        stats.cache_misses = get(&self.cache_misses);
        stats.chunks_fetched = get(&self.chunks_fetched);
        stats.chunks_readahead = get(&self.chunks_readahead);
        stats.readahead_chunks_read = get(&self.readahead_chunks_read);
        stats.demand_fetches = get(&self.demand_fetches);
        stats.prefetch_planned = get(&self.prefetch_planned);
        stats.prefetch_remaining = get(&self.prefetch_remaining);
        stats.chunks_prefetched = get(&self.chunks_prefetched);
        stats.prefetched_chunks_read = get(&self.prefetched_chunks_read);
        stats.bytes_fetched = get(&self.bytes_fetched);
        stats.fetch_errors = get(&self.fetch_errors);
        stats.fetch_retries = get(&self.fetch_retries);
        stats.fetch_timeouts = get(&self.fetch_timeouts);
        stats.discard_requests = get(&self.discard_requests);
        stats.write_zeroes_requests = get(&self.write_zeroes_requests);
        stats.chunks_punched = get(&self.chunks_punched);
        stats.integrity_failures = get(&self.integrity_failures);
        let latency = self.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        if !latency.is_empty() {
            stats.fetch_latency_p50_us = latency.value_at_quantile(0.5);
            stats.fetch_latency_p99_us = latency.value_at_quantile(0.99);
        }
    }
}
