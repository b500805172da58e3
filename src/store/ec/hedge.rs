//! What a fleet reader learns from its own requests: each node's recent
//! latency and failures (to ask the nodes expected fastest first), the
//! fleet's recent shard latency (the hedge delay is its p95), and a token
//! bucket that caps extra requests at a share of reads.
//!
//! The cap follows Brooker ("Fixing retries with token buckets and circuit
//! breakers"): every read earns [`HEDGE_SHARE`] of a token, a hedge or a
//! probe spends one, so at most about 5% more requests reach the fleet
//! than reads need, and a fleet that is slow everywhere is not made slower
//! by a storm of hedges. Replacing a shard whose request *failed* spends no
//! token: it keeps a read at `k + m` requests at most, and it is what lets
//! a fleet missing `m` nodes keep every hit.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tokens a read earns for extra requests: 5% of one request.
pub const HEDGE_SHARE: f64 = 0.05;
/// Most tokens saved up, so a burst of slowness can still be hedged.
pub const HEDGE_BURST: f64 = 20.0;
/// The hedge delay before the fleet has been measured.
const INITIAL_HEDGE_DELAY: Duration = Duration::from_millis(10);
/// Below this a hedge costs more than it saves, even on loopback.
const MIN_HEDGE_DELAY: Duration = Duration::from_micros(500);
/// Recent shard latencies kept for the p95.
const WINDOW: usize = 512;
/// How long a node that failed is asked last, and an avoided node goes
/// unmeasured before a probe asks it again.
pub const NODE_RECHECK: Duration = Duration::from_secs(1);
/// Weight of the newest sample in a node's latency average.
const EWMA_WEIGHT: f64 = 0.2;

/// A token bucket: reads fill it, extra requests drain it.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: Mutex<f64>,
}

impl Default for TokenBucket {
    fn default() -> TokenBucket {
        // Full at start: the first reads hedge while latencies are unknown.
        TokenBucket {
            tokens: Mutex::new(HEDGE_BURST),
        }
    }
}

impl TokenBucket {
    pub fn earn(&self) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *tokens = (*tokens + HEDGE_SHARE).min(HEDGE_BURST);
    }

    /// Spends a token if there is one.
    pub fn try_spend(&self) -> bool {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Recent shard latencies across the fleet.
#[derive(Debug, Default)]
pub struct LatencyWindow {
    samples: Mutex<VecDeque<Duration>>,
}

impl LatencyWindow {
    pub fn record(&self, latency: Duration) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == WINDOW {
            samples.pop_front();
        }
        samples.push_back(latency);
    }

    /// How long to wait for the first `k` shards before hedging: the p95
    /// of recent shard latencies, so about one read in twenty hedges when
    /// nothing is wrong (and the token bucket bounds it anyway).
    pub fn hedge_delay(&self) -> Duration {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < 20 {
            return INITIAL_HEDGE_DELAY;
        }
        let mut sorted: Vec<Duration> = samples.iter().copied().collect();
        drop(samples);
        let rank = sorted.len() * 95 / 100;
        let (_, p95, _) = sorted.select_nth_unstable(rank);
        (*p95).max(MIN_HEDGE_DELAY)
    }
}

/// One node's standing with this reader.
#[derive(Debug, Default, Clone)]
struct Standing {
    /// Start times of requests not yet answered, by ticket. Their age is a
    /// lower bound on the node's latency that is known before any answer,
    /// so a node that stopped answering is avoided at once, not after its
    /// first late reply.
    in_flight: Vec<(u64, Instant)>,
    /// Exponentially weighted mean latency in µs; 0 until measured.
    mean_micros: f64,
    last_sample: Option<Instant>,
    last_failure: Option<Instant>,
}

/// What the reader knows of every node, by node index.
#[derive(Debug)]
pub struct NodeHealth {
    nodes: Mutex<Vec<Standing>>,
    tickets: std::sync::atomic::AtomicU64,
}

/// A request in flight to one node; hand it back with its outcome.
#[derive(Debug)]
pub struct Ticket {
    node: usize,
    number: u64,
}

/// How a node ranks for the next read.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Rank {
    /// Failed within [`NODE_RECHECK`]: asked only when nothing else is left.
    pub failing: bool,
    /// Expected latency in µs.
    pub expected_micros: f64,
    /// Not measured within [`NODE_RECHECK`].
    pub stale: bool,
    /// Requests sent and not yet answered.
    pub in_flight: usize,
}

impl NodeHealth {
    pub fn new(nodes: usize) -> NodeHealth {
        NodeHealth {
            nodes: Mutex::new(vec![Standing::default(); nodes]),
            tickets: Default::default(),
        }
    }

    /// Notes a request to `node` starting now.
    pub fn begin(&self, node: usize) -> Ticket {
        let number = self
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes[node].in_flight.push((number, Instant::now()));
        Ticket { node, number }
    }

    fn finish<'a>(nodes: &'a mut [Standing], ticket: &Ticket) -> &'a mut Standing {
        let standing = &mut nodes[ticket.node];
        standing
            .in_flight
            .retain(|(number, _)| *number != ticket.number);
        standing
    }

    pub fn record_success(&self, ticket: Ticket, latency: Duration) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let standing = Self::finish(&mut nodes, &ticket);
        let micros = latency.as_secs_f64() * 1e6;
        // A node unmeasured for a while starts afresh: what it did then
        // says little about now, and a probe must be able to clear it.
        let stale = standing
            .last_sample
            .is_none_or(|at| at.elapsed() >= NODE_RECHECK);
        standing.mean_micros = if stale {
            micros
        } else {
            standing.mean_micros + EWMA_WEIGHT * (micros - standing.mean_micros)
        };
        standing.last_sample = Some(Instant::now());
        standing.last_failure = None;
    }

    pub fn record_failure(&self, ticket: Ticket) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        Self::finish(&mut nodes, &ticket).last_failure = Some(Instant::now());
    }

    pub fn rank(&self, nodes_of_chunk: &[u16]) -> Vec<Rank> {
        let now = Instant::now();
        let recent =
            |at: Option<Instant>| at.is_some_and(|at| now.duration_since(at) < NODE_RECHECK);
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes_of_chunk
            .iter()
            .map(|&node| {
                let standing = &nodes[node as usize];
                let oldest_in_flight = standing
                    .in_flight
                    .iter()
                    .map(|(_, started)| now.duration_since(*started).as_secs_f64() * 1e6)
                    .fold(0.0, f64::max);
                Rank {
                    failing: recent(standing.last_failure),
                    expected_micros: standing.mean_micros.max(oldest_in_flight),
                    stale: !recent(standing.last_sample),
                    in_flight: standing.in_flight.len(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_about_five_percent_after_its_burst() {
        let bucket = TokenBucket::default();
        let mut spent = 0;
        for _ in 0..10_000 {
            bucket.earn();
            if bucket.try_spend() {
                spent += 1;
            }
        }
        let expected = HEDGE_BURST + 10_000.0 * HEDGE_SHARE;
        assert!((spent as f64 - expected).abs() <= 2.0, "{spent}");
    }

    #[test]
    fn the_hedge_delay_is_the_p95_with_a_floor() {
        let window = LatencyWindow::default();
        assert_eq!(window.hedge_delay(), INITIAL_HEDGE_DELAY);
        for ms in 1..=100 {
            window.record(Duration::from_millis(ms));
        }
        assert_eq!(window.hedge_delay(), Duration::from_millis(96));
        for _ in 0..WINDOW {
            window.record(Duration::from_micros(10));
        }
        assert_eq!(window.hedge_delay(), MIN_HEDGE_DELAY);
    }

    #[test]
    fn failing_nodes_rank_last_and_latency_is_averaged() {
        let health = NodeHealth::new(4);
        health.record_success(health.begin(0), Duration::from_millis(1));
        health.record_success(health.begin(0), Duration::from_millis(6));
        health.record_failure(health.begin(1));
        let _unanswered = health.begin(3);
        std::thread::sleep(Duration::from_millis(5));
        let ranks = health.rank(&[0, 1, 2, 3]);
        assert!((ranks[0].expected_micros - 2000.0).abs() < 1.0);
        assert!(!ranks[0].failing && !ranks[0].stale);
        assert!(ranks[1].failing);
        assert!(ranks[2].stale && !ranks[2].failing);
        assert!(ranks[3].expected_micros >= 5000.0, "{:?}", ranks[3]);
    }
}
