//! A device process's Prometheus endpoint (`add --metrics ADDR`): the
//! counters `lazyblk list` shows, and the engine's fetch latency histogram.
//!
//! The engine keeps its counters in its own atomics (see
//! [`crate::engine::EngineStats`]); they are copied into the registry only
//! when it is scraped, so the I/O path pays nothing for the endpoint. The
//! latency histogram is the one exception: the fetcher observes it directly
//! (a few relaxed atomic adds per fetch), since fixed buckets cannot be
//! rebuilt from a snapshot.
//!
//! Every series carries the label `name` (the manifest the device serves);
//! a store made of tiers adds `lazyblk_device_tier_*` families with a
//! `tier` label, and a cache fleet `lazyblk_device_fleet_*` families, from
//! the store's own counters (see [`crate::store::metrics`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use crate::engine::{Engine, EngineStats};
use crate::metrics::{Registry, LATENCY_BUCKETS};
use crate::store::ChunkStore;

/// The histogram family the fetcher observes.
const FETCH_SECONDS: &str = "lazyblk_device_fetch_seconds";

/// Serves the metrics of `engine` and of `store`'s tiers at
/// `http://addr/metrics`, labelled with the manifest `name`, until the
/// runtime stops; returns the bound address (`addr` may ask for port 0).
/// Call it before the device goes live, so that the latency histogram sees
/// every fetch.
pub async fn serve(
    engine: &Arc<Engine>,
    store: Arc<dyn ChunkStore>,
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let registry = Registry::new();
    let labels = [("name", name)];
    engine.export_fetch_latency(registry.histogram(
        FETCH_SECONDS,
        "Time of successful chunk fetches: store get, verification, decryption, cache write.",
        &labels,
        LATENCY_BUCKETS,
    ));
    // Weak: the endpoint must not keep a stopped device's engine (and its
    // cache file lock) alive.
    let weak = Arc::downgrade(engine);
    let last = Mutex::new(EngineStats::default());
    let name = name.to_owned();
    registry.on_render(move |registry| refresh(registry, &name, &weak, &last));
    crate::store::metrics::export(&registry, "lazyblk_device", &labels, store);
    crate::metrics::serve(registry, addr).await
}

/// Counters: `(suffix, help, value)`; the family is
/// `lazyblk_device_<suffix>_total`.
fn counters(stats: &EngineStats) -> [(&'static str, &'static str, u64); 22] {
    [
        (
            "read_requests",
            "Read requests received.",
            stats.read_requests,
        ),
        (
            "read_bytes",
            "Bytes returned by successful reads.",
            stats.read_bytes,
        ),
        (
            "write_requests",
            "Write requests received.",
            stats.write_requests,
        ),
        (
            "write_bytes",
            "Bytes of successful writes.",
            stats.write_bytes,
        ),
        ("flushes", "Successful flushes.", stats.flushes),
        (
            "cache_hits",
            "Request pieces served without waiting for a fetch.",
            stats.cache_hits,
        ),
        (
            "cache_misses",
            "Request pieces that waited for a fetch.",
            stats.cache_misses,
        ),
        (
            "chunks_fetched",
            "Chunks fetched, verified and cached.",
            stats.chunks_fetched,
        ),
        (
            "chunks_readahead",
            "Fetches started by sequential readahead.",
            stats.chunks_readahead,
        ),
        (
            "readahead_chunks_read",
            "Chunks fetched by readahead that a request then read.",
            stats.readahead_chunks_read,
        ),
        (
            "demand_fetches",
            "Fetches started by a request that needed the chunk.",
            stats.demand_fetches,
        ),
        (
            "prefetch_planned",
            "Chunks the prefetch plan of a recorded trace named.",
            stats.prefetch_planned,
        ),
        (
            "chunks_prefetched",
            "Fetches started by prefetch from a recorded trace.",
            stats.chunks_prefetched,
        ),
        (
            "prefetched_chunks_read",
            "Chunks fetched by prefetch that a request then read.",
            stats.prefetched_chunks_read,
        ),
        (
            "fetched_bytes",
            "Envelope bytes received from the store.",
            stats.bytes_fetched,
        ),
        (
            "fetch_errors",
            "Fetches the store failed.",
            stats.fetch_errors,
        ),
        (
            "fetch_retries",
            "Store requests retried after a transient failure.",
            stats.fetch_retries,
        ),
        (
            "fetch_timeouts",
            "Fetches that passed their deadline.",
            stats.fetch_timeouts,
        ),
        (
            "discard_requests",
            "Discard requests received.",
            stats.discard_requests,
        ),
        (
            "write_zeroes_requests",
            "Write-zeroes requests received.",
            stats.write_zeroes_requests,
        ),
        (
            "chunks_punched",
            "Whole chunks freed by discards and write-zeroes.",
            stats.chunks_punched,
        ),
        (
            "integrity_failures",
            "Fetched envelopes that failed verification.",
            stats.integrity_failures,
        ),
    ]
}

fn refresh(registry: &Registry, name: &str, engine: &Weak<Engine>, last: &Mutex<EngineStats>) {
    let Some(engine) = engine.upgrade() else {
        return;
    };
    let stats = engine.stats();
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    let labels = [("name", name)];
    for ((suffix, help, now), (_, _, before)) in counters(&stats).into_iter().zip(counters(&last)) {
        let family = format!("lazyblk_device_{suffix}_total");
        // Counters only go up; the engine's do too, so the difference is
        // what happened since the last scrape.
        registry
            .counter(&family, help, &labels)
            .add(now.saturating_sub(before));
    }
    let gauges = [
        (
            "image_bytes",
            "Size of the image in bytes.",
            stats.image_bytes,
        ),
        ("chunks", "Chunks in the image.", stats.chunks_total),
        (
            "chunks_zero",
            "Chunks the manifest marks all-zero.",
            stats.chunks_zero,
        ),
        (
            "chunks_present",
            "Chunks held in the local cache.",
            stats.chunks_present,
        ),
        (
            "prefetch_remaining",
            "Planned prefetch chunks not yet done.",
            stats.prefetch_remaining,
        ),
    ];
    for (suffix, help, value) in gauges {
        registry
            .gauge(&format!("lazyblk_device_{suffix}"), help, &labels)
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }
    *last = stats;
}
