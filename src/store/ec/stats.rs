//! Counters of one fleet reader: what tests assert on and what metrics show.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident => $add:ident;)*) => {
        /// Live counters, updated by reads and writes.
        #[derive(Debug, Default)]
        pub struct FleetStats {
            $($name: AtomicU64,)*
        }

        /// The counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct FleetStatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl FleetStats {
            $(pub fn $add(&self) {
                self.$name.fetch_add(1, Ordering::Relaxed);
            })*

            pub fn snapshot(&self) -> FleetStatsSnapshot {
                FleetStatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Chunk reads asked of the fleet.
    reads => add_read;
    /// Reads that returned a verified envelope.
    hits => add_hit;
    /// Reads that found fewer than `k` valid shards, or shards that did
    /// not rebuild the chunk.
    misses => add_miss;
    /// Extra requests sent because the first `k` were slow (each spent a token).
    hedges => add_hedge;
    /// Hedges the token bucket refused.
    hedges_denied => add_hedge_denied;
    /// Requests that replaced a failed request or a bad or absent shard.
    replacements => add_replacement;
    /// Requests to an avoided node, to measure it again (each spent a token).
    probes => add_probe;
    /// Hits rebuilt with parity because a data shard was not among the first `k`.
    reconstructed => add_reconstructed;
    /// Shard requests that failed or timed out.
    node_errors => add_node_error;
    /// Shards refused by their header or checksum.
    bad_shards => add_bad_shard;
    /// Rebuilt envelopes that did not match their chunk id (never served).
    integrity_failures => add_integrity_failure;
    /// Shards stored by writes.
    shards_written => add_shard_written;
}

impl FleetStats {
    pub fn add_shards_written(&self, count: u64) {
        self.shards_written.fetch_add(count, Ordering::Relaxed);
    }
}
