//! [`EcFleetStore`]: a chunk store spread as erasure-coded shards over a
//! fleet of cache nodes.
//!
//! A read asks the `k` nodes expected fastest for their shards (data
//! shards first among equals: they need no decoding), replaces a shard at
//! once when its request fails or it is bad, hedges one more node after
//! the fleet's p95 when tokens allow, and finishes on the first `k` valid
//! shards. The rebuilt envelope is checked against the chunk id, so no
//! node is trusted. Fewer than `k` shards is a miss: the tier below serves
//! the chunk and fills the fleet again through [`ChunkStore::put`].
//!
//! Shard requests run as their own tasks and finish even after the read is
//! done, so every answer, late ones too, feeds the latency estimates.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::codec::Scheme;
use super::hedge::{LatencyWindow, NodeHealth, TokenBucket};
use super::node::ShardNode;
use super::placement::{Placement, DEFAULT_EPSILON};
use super::shard::ShardHeader;
use super::stats::{FleetStats, FleetStatsSnapshot};
use crate::chunk::ChunkId;
use crate::store::{ChunkStore, ListedChunk, StoreError};

/// Longest a shard read may take: past this the node counts as failed and
/// the shard is replaced. A shard is a few hundred KiB from a nearby node,
/// answered in about a millisecond; half a second leaves a read time to
/// replace it within the tiered store's one-second deadline per tier.
pub const SHARD_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest a shard upload may take; uploads are fills, off any reader's path.
pub const SHARD_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A chunk store over a fleet of erasure-coded cache nodes.
#[derive(Debug)]
pub struct EcFleetStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    nodes: Vec<Arc<dyn ShardNode>>,
    scheme: Scheme,
    placement: Placement,
    health: NodeHealth,
    window: LatencyWindow,
    tokens: TokenBucket,
    stats: FleetStats,
}

/// One shard request's outcome, as its task reports it.
struct Answer {
    index: usize,
    shard: Option<(ShardHeader, Bytes)>,
}

impl EcFleetStore {
    /// A fleet of `nodes` storing each chunk as `scheme`'s shards.
    pub fn new(nodes: Vec<Arc<dyn ShardNode>>, scheme: Scheme) -> Result<EcFleetStore, StoreError> {
        let urls: Vec<String> = nodes.iter().map(|n| n.url().to_owned()).collect();
        let placement =
            Placement::new(&urls, scheme.total_shards(), DEFAULT_EPSILON).map_err(|e| {
                StoreError::InvalidSpec {
                    spec: urls.join(","),
                    reason: e.to_string(),
                }
            })?;
        Ok(EcFleetStore {
            shared: Arc::new(Shared {
                health: NodeHealth::new(nodes.len()),
                nodes,
                scheme,
                placement,
                window: LatencyWindow::default(),
                tokens: TokenBucket::default(),
                stats: FleetStats::default(),
            }),
        })
    }

    pub fn scheme(&self) -> Scheme {
        self.shared.scheme
    }

    /// Where this fleet puts each chunk's shards.
    pub fn placement(&self) -> &Placement {
        &self.shared.placement
    }

    pub fn stats(&self) -> FleetStatsSnapshot {
        self.shared.stats.snapshot()
    }

    fn miss(&self, id: &ChunkId) -> StoreError {
        StoreError::ChunkNotFound {
            store: self.describe(),
            id: *id,
        }
    }

    fn unsupported(&self, op: &'static str, object: String) -> StoreError {
        StoreError::Io {
            op,
            store: self.describe(),
            object,
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a cache fleet holds chunks only, as shards it may evict",
            ),
        }
    }
}

impl Shared {
    /// The order to ask for a chunk's shards in: working nodes before
    /// failing ones, then by expected latency, where a node counts as slow
    /// only when clearly slower than the chunk's typical node; among equals,
    /// data shards before parity.
    fn ask_order(&self, nodes_of_chunk: &[u16]) -> (Vec<usize>, Vec<usize>) {
        let ranks = self.health.rank(nodes_of_chunk);
        let mut measured: Vec<f64> = ranks.iter().map(|r| r.expected_micros).collect();
        measured.sort_by(f64::total_cmp);
        let typical = measured[measured.len() / 2];
        // Twice the typical node and 2 ms more: scheduling noise on a busy
        // host does not make a node slow, a node answering late does.
        let slow = |micros: f64| micros > 2.0 * typical + 2000.0;
        let mut order: Vec<usize> = (0..nodes_of_chunk.len()).collect();
        order.sort_by_key(|&i| (ranks[i].failing, slow(ranks[i].expected_micros), i));
        // Avoided nodes go unmeasured; one that has not been for a while is
        // probed (one request at a time), so a node that recovered is asked
        // again.
        let probes = order
            .iter()
            .skip(self.scheme.data_shards())
            .copied()
            .filter(|&i| {
                ranks[i].stale && ranks[i].in_flight == 0 && slow(ranks[i].expected_micros)
            })
            .collect();
        (order, probes)
    }

    fn launch(
        self: &Arc<Self>,
        id: ChunkId,
        index: usize,
        node: usize,
        answers: mpsc::Sender<Answer>,
    ) {
        let shared = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let ticket = shared.health.begin(node);
            let request = shared.nodes[node].get_shard(&id, index as u8);
            let result = tokio::time::timeout(SHARD_READ_TIMEOUT, request).await;
            let shard = match result {
                Ok(Ok(Some(object))) => {
                    let latency = started.elapsed();
                    shared.health.record_success(ticket, latency);
                    shared.window.record(latency);
                    match ShardHeader::open(&object).and_then(|(h, d)| {
                        h.expect(&id, index as u8, Some(shared.scheme))
                            .map(|()| (h, d))
                    }) {
                        Ok(shard) => Some(shard),
                        Err(error) => {
                            shared.stats.add_bad_shard();
                            tracing::warn!(node = shared.nodes[node].url(), %id, index, %error, "bad shard discarded");
                            None
                        }
                    }
                }
                Ok(Ok(None)) => {
                    shared.health.record_success(ticket, started.elapsed());
                    None
                }
                Ok(Err(error)) => {
                    shared.health.record_failure(ticket);
                    shared.stats.add_node_error();
                    tracing::debug!(%error, "shard request failed");
                    None
                }
                Err(_) => {
                    shared.health.record_failure(ticket);
                    shared.stats.add_node_error();
                    None
                }
            };
            // The reader may be done already; then nobody listens.
            let _ = answers.send(Answer { index, shard }).await;
        });
    }

    async fn read(self: &Arc<Self>, id: &ChunkId) -> Option<Bytes> {
        let nodes_of_chunk = self.placement.nodes_for(id);
        let (k, total) = (self.scheme.data_shards(), self.scheme.total_shards());
        let (order, probes) = self.ask_order(nodes_of_chunk);
        let (sender, mut answers) = mpsc::channel(total);
        let launch = |index: usize| {
            self.launch(*id, index, nodes_of_chunk[index] as usize, sender.clone());
        };
        let mut waiting: VecDeque<usize> = order.into();
        for index in waiting.drain(..k).collect::<Vec<_>>() {
            launch(index);
        }
        let mut outstanding = k;
        for index in probes {
            if self.tokens.try_spend() {
                self.stats.add_probe();
                waiting.retain(|&i| i != index);
                launch(index);
                outstanding += 1;
            }
        }
        self.tokens.earn();
        let mut ask_one_more = |reason: Extra| -> bool {
            let Some(&index) = waiting.front() else {
                return false;
            };
            match reason {
                Extra::Hedge if !self.tokens.try_spend() => {
                    self.stats.add_hedge_denied();
                    return false;
                }
                Extra::Hedge => self.stats.add_hedge(),
                Extra::Replacement => self.stats.add_replacement(),
            }
            waiting.pop_front();
            launch(index);
            true
        };

        let mut shards: Vec<Option<Bytes>> = vec![None; total];
        let mut envelope_len = None;
        let mut valid = 0;
        let hedge_at = tokio::time::Instant::now() + self.window.hedge_delay();
        let mut hedged = false;
        while outstanding > 0 {
            let answer = tokio::select! {
                answer = answers.recv() => answer,
                () = tokio::time::sleep_until(hedge_at), if !hedged => {
                    hedged = true;
                    if ask_one_more(Extra::Hedge) {
                        outstanding += 1;
                    }
                    continue;
                }
            };
            let Some(Answer { index, shard }) = answer else {
                break;
            };
            outstanding -= 1;
            let usable = shard.filter(|(header, _)| {
                // Shards of one chunk agree on its length; the first decides,
                // and the end-to-end check catches a first one that lied.
                *envelope_len.get_or_insert(header.envelope_len) == header.envelope_len
            });
            match usable {
                Some((_, data)) => {
                    shards[index] = Some(data);
                    valid += 1;
                    if valid == k {
                        break;
                    }
                }
                None => {
                    if ask_one_more(Extra::Replacement) {
                        outstanding += 1;
                    }
                }
            }
        }
        if valid < k {
            return None;
        }
        let envelope_len = envelope_len.expect("set by the first valid shard") as usize;
        if shards[..k].iter().any(Option::is_none) {
            self.stats.add_reconstructed();
        }
        let envelope = match self.scheme.decode(&shards, envelope_len) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(%id, %error, "shards did not decode");
                self.stats.add_integrity_failure();
                return None;
            }
        };
        if ChunkId::of_envelope_off_runtime(envelope.clone()).await != *id {
            tracing::warn!(%id, "shards rebuilt an envelope that does not match the chunk id");
            self.stats.add_integrity_failure();
            return None;
        }
        Some(envelope)
    }

    async fn write(&self, id: &ChunkId, envelope: &Bytes) -> usize {
        let Ok(envelope_len) = u32::try_from(envelope.len()) else {
            return 0;
        };
        let shards = self.scheme.encode(envelope);
        let nodes_of_chunk = self.placement.nodes_for(id);
        let puts = shards.iter().enumerate().map(|(index, data)| {
            let header = ShardHeader {
                id: *id,
                index: index as u8,
                scheme: self.scheme,
                envelope_len,
            };
            let node = &self.nodes[nodes_of_chunk[index] as usize];
            let object = header.seal(data);
            async move {
                match tokio::time::timeout(
                    SHARD_WRITE_TIMEOUT,
                    node.put_shard(id, index as u8, object),
                )
                .await
                {
                    Ok(Ok(())) => true,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "shard upload failed");
                        false
                    }
                    Err(_) => false,
                }
            }
        });
        futures::future::join_all(puts)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count()
    }
}

#[derive(Clone, Copy)]
enum Extra {
    /// The first `k` are slow: costs a token.
    Hedge,
    /// A shard request failed or its shard was bad: free, and bounded by `k + m`.
    Replacement,
}

#[async_trait]
impl ChunkStore for EcFleetStore {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        self.shared.stats.add_read();
        match self.shared.read(id).await {
            Some(envelope) => {
                self.shared.stats.add_hit();
                Ok(envelope)
            }
            None => {
                self.shared.stats.add_miss();
                Err(self.miss(id))
            }
        }
    }

    /// Encodes the envelope and uploads its shards; succeeds when at least
    /// `k` are stored (the chunk is readable), since the fleet is a cache.
    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        let stored = self.shared.write(id, &envelope).await;
        self.shared.stats.add_shards_written(stored as u64);
        if stored >= self.shared.scheme.data_shards() {
            return Ok(());
        }
        Err(StoreError::Unavailable {
            op: "put",
            store: self.describe(),
            object: format!("chunk {id}"),
            source: std::io::Error::other(format!(
                "{stored} of {} shards stored, {} needed",
                self.shared.scheme.total_shards(),
                self.shared.scheme.data_shards()
            )),
        })
    }

    /// Every id: the fleet promises to hold nothing, so a push through it
    /// asks the tier below.
    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        Ok(ids.to_vec())
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        Err(self.unsupported("list", "chunks".into()))
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        Err(self.unsupported("delete", format!("chunk {id}")))
    }

    async fn delete_if_older(&self, id: &ChunkId, _cutoff: SystemTime) -> Result<bool, StoreError> {
        Err(self.unsupported("delete", format!("chunk {id}")))
    }

    async fn put_manifest(&self, name: &str, _manifest: Bytes) -> Result<(), StoreError> {
        Err(self.unsupported("put", format!("manifest {name:?}")))
    }

    /// A miss: the fleet never holds manifests.
    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        Err(StoreError::ManifestNotFound {
            store: self.describe(),
            name: name.to_owned(),
        })
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// Nothing to remove: the fleet never holds manifests.
    async fn delete_manifest(&self, _name: &str) -> Result<(), StoreError> {
        Ok(())
    }

    fn describe(&self) -> String {
        let urls: Vec<&str> = self.shared.nodes.iter().map(|n| n.url()).collect();
        format!("ec-cache {} ({})", urls.join(","), self.shared.scheme)
    }

    fn fleet_stats(&self) -> Option<FleetStatsSnapshot> {
        Some(self.stats())
    }
}
