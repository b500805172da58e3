//! Several stores read as one, fastest first: host cache, cache fleet,
//! origin.
//!
//! A `get` asks each tier in turn and takes the first envelope that hashes
//! to its id. A tier that misses, fails, hands back other bytes, or does not
//! answer within its deadline is passed over; corrupt bytes are never
//! served, and are logged and counted. The envelope then fills every tier
//! above the one that had it, in the background: a fill never delays the
//! reader, and at most [`MAX_FILLS_IN_FLIGHT`] run at once (more are
//! dropped and counted: a later read fills again).
//!
//! Everything else (`put`, `missing`, `list`, `delete`, manifests) goes to
//! the origin, the last tier: it is the store of record. Upper tiers are
//! caches filled by reads; a chunk put only into a cache would be reported
//! present by `missing` while the origin lacks it, and a manifest cached
//! above the origin could outlive its replacement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{ChunkStore, ListedChunk, StoreError};
use crate::chunk::{verify_envelope_off_runtime, ChunkId};
use crate::error::ErrorKind;

/// How long an upper tier may take to answer before the read moves on.
///
/// A hit in a host cache is a local file read (well under a millisecond in
/// the page cache, a few on a busy disk) and one in a cache fleet about half
/// a millisecond (the paper's median); a tier that has not answered in a
/// second is stalled, not slow. One second per tier keeps a host cache and a
/// fleet that both hang within a fifth of the engine's 10 s fetch deadline,
/// leaving the origin the rest, retries included.
pub const DEFAULT_TIER_DEADLINE: Duration = Duration::from_secs(1);

/// Most background fills of upper tiers at once.
pub const MAX_FILLS_IN_FLIGHT: usize = 64;

/// Puts into faster tiers in the background, at most
/// [`MAX_FILLS_IN_FLIGHT`] at once: a fill beyond that is dropped and
/// counted (a later read fills again), so a burst of misses never queues
/// envelopes without bound.
#[derive(Debug)]
pub(super) struct BackgroundFills(Arc<Semaphore>);

impl BackgroundFills {
    pub(super) fn new() -> BackgroundFills {
        BackgroundFills(Arc::new(Semaphore::new(MAX_FILLS_IN_FLIGHT)))
    }

    /// Runs `fill` of chunk `id` into the tier counted by `stats`.
    pub(super) fn spawn(
        &self,
        stats: &Arc<TierStats>,
        id: ChunkId,
        fill: impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
    ) {
        let Ok(permit) = self.0.clone().try_acquire_owned() else {
            stats.add(&stats.fills_dropped);
            return;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match fill.await {
                Ok(()) => stats.fill(),
                Err(e) => {
                    stats.add(&stats.fill_errors);
                    tracing::debug!(tier = %stats.name, id = %id, error = %crate::error::chain(&e), "fill failed");
                }
            }
        });
    }

    /// Waits until no fill is in flight.
    pub(super) async fn settle(&self) {
        // Every permit free means every fill has finished.
        let all = u32::try_from(MAX_FILLS_IN_FLIGHT).expect("a small number");
        if let Ok(permits) = self.0.acquire_many(all).await {
            drop(permits);
        }
    }
}

/// Stores read in order, written at the last.
#[derive(Debug)]
pub struct TieredStore {
    tiers: Vec<Tier>,
    fills: BackgroundFills,
}

#[derive(Debug)]
struct Tier {
    store: Arc<dyn ChunkStore>,
    /// `None` for the origin: the engine's fetch deadline bounds it.
    deadline: Option<Duration>,
    stats: Arc<TierStats>,
}

impl TieredStore {
    /// Tiers fastest first; the last is the origin. Every tier but the last
    /// gets [`DEFAULT_TIER_DEADLINE`].
    pub fn new(stores: Vec<Arc<dyn ChunkStore>>) -> Result<TieredStore, StoreError> {
        if stores.is_empty() {
            return Err(StoreError::InvalidSpec {
                spec: String::new(),
                reason: "a tiered store needs at least one store".into(),
            });
        }
        let last = stores.len() - 1;
        let tiers = stores
            .into_iter()
            .enumerate()
            .map(|(index, store)| Tier {
                stats: Arc::new(TierStats::new(store.describe())),
                store,
                deadline: (index < last).then_some(DEFAULT_TIER_DEADLINE),
            })
            .collect();
        Ok(TieredStore {
            tiers,
            fills: BackgroundFills::new(),
        })
    }

    /// Sets the deadline of tier `index` (`None`: no deadline of its own).
    pub fn with_deadline(mut self, index: usize, deadline: Option<Duration>) -> TieredStore {
        if let Some(tier) = self.tiers.get_mut(index) {
            tier.deadline = deadline;
        }
        self
    }

    /// Waits until no fill is in flight.
    pub async fn settle(&self) {
        self.fills.settle().await
    }

    /// The counters of each tier, fastest first.
    pub fn stats(&self) -> Vec<TierSnapshot> {
        self.tiers.iter().map(|t| t.stats.snapshot()).collect()
    }

    fn origin(&self) -> &dyn ChunkStore {
        &*self.tiers.last().expect("at least one tier").store
    }

    /// One tier's answer, bounded by its deadline.
    async fn get_from(&self, tier: &Tier, id: &ChunkId) -> Result<Bytes, StoreError> {
        let Some(deadline) = tier.deadline else {
            return tier.store.get(id).await;
        };
        match tokio::time::timeout(deadline, tier.store.get(id)).await {
            Ok(answer) => answer,
            Err(_) => {
                tier.stats.timeout();
                Err(StoreError::Unavailable {
                    op: "get",
                    store: tier.store.describe(),
                    object: format!("chunk {id}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {deadline:?}"),
                    ),
                })
            }
        }
    }

    /// Puts `envelope` into each tier in `targets` in the background,
    /// deleting a corrupt copy first where one was found.
    fn fill(&self, targets: Vec<(usize, bool)>, id: ChunkId, envelope: &Bytes) {
        for (index, corrupt) in targets {
            let tier = &self.tiers[index];
            let (store, envelope) = (tier.store.clone(), envelope.clone());
            self.fills.spawn(&tier.stats, id, async move {
                if corrupt {
                    store.delete(&id).await?;
                }
                store.put(&id, envelope).await
            });
        }
    }
}

#[async_trait]
impl ChunkStore for TieredStore {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        // Tiers passed over, and whether each had a corrupt copy.
        let mut passed = Vec::new();
        let mut last_error = None;
        for (index, tier) in self.tiers.iter().enumerate() {
            let stats = &tier.stats;
            let started = Instant::now();
            let answer = self.get_from(tier, id).await;
            let error = match answer {
                Ok(envelope) => match verify_envelope_off_runtime(id, &envelope).await {
                    Ok(()) => {
                        stats.hit(envelope.len(), started.elapsed());
                        self.fill(passed, *id, &envelope);
                        return Ok(envelope);
                    }
                    Err(source) => {
                        stats.integrity_failure();
                        tracing::warn!(tier = %stats.name, id = %id, error = %source, "corrupt chunk passed over");
                        passed.push((index, true));
                        StoreError::CorruptChunk {
                            store: tier.store.describe(),
                            id: *id,
                            source: Box::new(source),
                        }
                    }
                },
                Err(error) => {
                    if error.kind() == ErrorKind::NotFound {
                        stats.miss();
                    } else {
                        stats.error();
                        tracing::debug!(tier = %stats.name, id = %id, error = %crate::error::chain(&error), "tier failed, trying the next");
                    }
                    passed.push((index, false));
                    error
                }
            };
            last_error = Some(error);
        }
        // The origin's answer is the one that counts: a miss or failure
        // above it only sent the read down.
        Err(last_error.expect("at least one tier"))
    }

    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        self.origin().put(id, envelope).await
    }

    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        self.origin().missing(ids).await
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        self.origin().list().await
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        self.origin().delete(id).await
    }

    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        self.origin().delete_if_older(id, cutoff).await
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        self.origin().list_manifests().await
    }

    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        self.origin().put_manifest(name, manifest).await
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        self.origin().get_manifest(name).await
    }

    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        self.origin().delete_manifest(name).await
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self.tiers.iter().map(|t| t.store.describe()).collect();
        names.join(" > ")
    }

    fn tier_stats(&self) -> Vec<TierSnapshot> {
        self.stats()
    }

    /// The origin's answer is the one a reader gets (a failure above it
    /// only sends the read down), so the origin's retries are the ones that
    /// count.
    fn retries_transient_failures(&self) -> bool {
        self.origin().retries_transient_failures()
    }

    fn fleet_stats(&self) -> Option<super::ec::FleetStatsSnapshot> {
        self.tiers.iter().find_map(|tier| tier.store.fleet_stats())
    }
}

/// One tier's live counters.
#[derive(Debug)]
pub struct TierStats {
    name: String,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    integrity_failures: AtomicU64,
    bytes: AtomicU64,
    fills: AtomicU64,
    fills_dropped: AtomicU64,
    fill_errors: AtomicU64,
    /// Microseconds per hit.
    latency: Mutex<Histogram<u64>>,
}

/// A snapshot of one tier's counters, as `list` and metrics show them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierSnapshot {
    /// The tier's store, as named by the user.
    pub name: String,
    /// Reads this tier answered with a verified envelope.
    pub hits: u64,
    /// Reads it did not have.
    pub misses: u64,
    /// Reads it failed (deadlines included).
    pub errors: u64,
    /// Reads it did not answer within its deadline.
    pub timeouts: u64,
    /// Envelopes it returned that did not hash to their id (never served).
    pub integrity_failures: u64,
    /// Envelope bytes of its hits.
    pub bytes: u64,
    /// Envelopes copied into it after a lower tier had them.
    pub fills: u64,
    /// Fills skipped because too many were in flight.
    pub fills_dropped: u64,
    /// Fills the tier refused.
    pub fill_errors: u64,
    pub hit_latency_p50_us: u64,
    pub hit_latency_p99_us: u64,
}

impl TierStats {
    pub fn new(name: String) -> TierStats {
        TierStats {
            name,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            integrity_failures: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            fills: AtomicU64::new(0),
            fills_dropped: AtomicU64::new(0),
            fill_errors: AtomicU64::new(0),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds"),
            ),
        }
    }

    fn add(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A verified envelope of `bytes` served after `elapsed`.
    pub fn hit(&self, bytes: usize, elapsed: Duration) {
        self.add(&self.hits);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut histogram = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        histogram.saturating_record(micros);
    }

    pub fn miss(&self) {
        self.add(&self.misses);
    }

    /// A failed read (a deadline that passed counts here and in `timeout`).
    pub fn error(&self) {
        self.add(&self.errors);
    }

    pub fn timeout(&self) {
        self.add(&self.timeouts);
    }

    pub fn integrity_failure(&self) {
        self.add(&self.integrity_failures);
    }

    /// An envelope copied into this tier.
    pub fn fill(&self) {
        self.add(&self.fills);
    }

    pub fn snapshot(&self) -> TierSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let histogram = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        TierSnapshot {
            name: self.name.clone(),
            hits: get(&self.hits),
            misses: get(&self.misses),
            errors: get(&self.errors),
            timeouts: get(&self.timeouts),
            integrity_failures: get(&self.integrity_failures),
            bytes: get(&self.bytes),
            fills: get(&self.fills),
            fills_dropped: get(&self.fills_dropped),
            fill_errors: get(&self.fill_errors),
            hit_latency_p50_us: histogram.value_at_quantile(0.5),
            hit_latency_p99_us: histogram.value_at_quantile(0.99),
        }
    }
}
