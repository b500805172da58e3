//! A store's own counters as Prometheus series: its tiers' (one `tier`
//! label per tier, see [`ChunkStore::tier_stats`]) and its cache fleet's
//! (see [`ChunkStore::fleet_stats`]).
//!
//! Stores keep these counters in their own atomics; [`export`] copies them
//! into a registry only when it is scraped, so reads pay nothing for the
//! endpoint. A device (`add --metrics`) and `serve` export through here,
//! under their own family prefix.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ec::FleetStatsSnapshot;
use super::{ChunkStore, TierSnapshot};
use crate::metrics::Registry;

/// Copies `store`'s counters into `registry` before every render, as the
/// families `<prefix>_tier_*` and `<prefix>_fleet_*_total`, each series
/// labelled with `labels` (and `tier`). A store without tiers or fleet
/// adds no series.
pub fn export(
    registry: &Registry,
    prefix: &str,
    labels: &[(&str, &str)],
    store: Arc<dyn ChunkStore>,
) {
    let prefix = prefix.to_owned();
    let labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let last_tiers = Mutex::new(HashMap::new());
    let last_fleet = Mutex::new(FleetStatsSnapshot::default());
    registry.on_render(move |registry| {
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        refresh_tiers(registry, &prefix, &labels, &*store, &last_tiers);
        refresh_fleet(registry, &prefix, &labels, &*store, &last_fleet);
    });
}

/// Per-tier counters: `(suffix, help, value)`; the family is
/// `<prefix>_tier_<suffix>_total`.
fn tier_counters(tier: &TierSnapshot) -> [(&'static str, &'static str, u64); 9] {
    [
        (
            "hits",
            "Reads the tier answered with a verified envelope.",
            tier.hits,
        ),
        ("misses", "Reads the tier did not have.", tier.misses),
        (
            "errors",
            "Reads the tier failed, deadlines included.",
            tier.errors,
        ),
        (
            "timeouts",
            "Reads the tier did not answer within its deadline.",
            tier.timeouts,
        ),
        (
            "integrity_failures",
            "Envelopes from the tier that failed verification.",
            tier.integrity_failures,
        ),
        ("bytes", "Envelope bytes of the tier's hits.", tier.bytes),
        (
            "fills",
            "Envelopes copied into the tier from a lower one.",
            tier.fills,
        ),
        (
            "fills_dropped",
            "Fills skipped because too many were in flight.",
            tier.fills_dropped,
        ),
        ("fill_errors", "Fills the tier refused.", tier.fill_errors),
    ]
}

fn refresh_tiers(
    registry: &Registry,
    prefix: &str,
    labels: &[(&str, &str)],
    store: &dyn ChunkStore,
    last: &Mutex<HashMap<String, TierSnapshot>>,
) {
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    for tier in store.tier_stats() {
        let mut labels = labels.to_vec();
        labels.push(("tier", tier.name.as_str()));
        let before = last.get(&tier.name).cloned().unwrap_or_default();
        for ((suffix, help, now), (_, _, was)) in
            tier_counters(&tier).into_iter().zip(tier_counters(&before))
        {
            // Counters only go up; the tier's do too, so the difference is
            // what happened since the last scrape.
            registry
                .counter(&format!("{prefix}_tier_{suffix}_total"), help, &labels)
                .add(now.saturating_sub(was));
        }
        // The tiers keep latency as percentiles, not buckets.
        for (suffix, help, micros) in [
            (
                "p50",
                "Median time of a hit at the tier.",
                tier.hit_latency_p50_us,
            ),
            (
                "p99",
                "99th percentile time of a hit at the tier.",
                tier.hit_latency_p99_us,
            ),
        ] {
            registry
                .gauge(
                    &format!("{prefix}_tier_hit_latency_{suffix}_microseconds"),
                    help,
                    &labels,
                )
                .set(i64::try_from(micros).unwrap_or(i64::MAX));
        }
        last.insert(tier.name.clone(), tier);
    }
}

fn refresh_fleet(
    registry: &Registry,
    prefix: &str,
    labels: &[(&str, &str)],
    store: &dyn ChunkStore,
    last: &Mutex<FleetStatsSnapshot>,
) {
    let Some(now) = store.fleet_stats() else {
        return;
    };
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    for ((suffix, help, value), (_, _, was)) in now.counters().into_iter().zip(last.counters()) {
        registry
            .counter(
                &format!("{prefix}_fleet_{suffix}_total"),
                &format!("Cache fleet: {help}"),
                labels,
            )
            .add(value.saturating_sub(was));
    }
    *last = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::MemStore;
    use crate::store::ReadThrough;

    #[tokio::test]
    async fn tiers_are_exported_as_the_difference_since_the_last_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Arc::new(MemStore::default());
        let envelope = bytes::Bytes::from(vec![7u8; 4096]);
        let id = crate::chunk::ChunkId::of_envelope(&envelope);
        origin.put(&id, envelope).await.unwrap();
        let cache = Arc::new(ReadThrough::open(origin, dir.path(), 1 << 20).unwrap());
        let registry = Registry::new();
        export(&registry, "lazyblk_test", &[("name", "img")], cache.clone());
        cache.get(&id).await.unwrap();
        cache.get(&id).await.unwrap();
        let text = registry.render();
        let hits = |tier: &str| {
            let series = format!("lazyblk_test_tier_hits_total{{name=\"img\",tier=\"{tier}\"}} ");
            text.lines()
                .find_map(|line| line.strip_prefix(series.as_str()))
                .map(str::to_owned)
        };
        assert_eq!(hits("memory").as_deref(), Some("1"), "{text}");
        assert_eq!(hits("memory store").as_deref(), Some("1"), "{text}");
        // A second scrape adds nothing that did not happen.
        assert_eq!(registry.render(), text);
        assert!(!text.contains("lazyblk_test_fleet_"), "{text}");
    }
}
