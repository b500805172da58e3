//! Counters of one fleet reader: what tests assert on and what metrics show.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident => $add:ident, $help:literal;)*) => {
        /// Live counters, updated by reads and writes.
        #[derive(Debug, Default)]
        pub struct FleetStats {
            $($name: AtomicU64,)*
        }

        /// The counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        pub struct FleetStatsSnapshot {
            $(#[doc = $help] pub $name: u64,)*
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

        impl FleetStatsSnapshot {
            /// Every counter as `(name, help, value)`, in declaration order:
            /// what metrics export, so a new counter is exported too.
            pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name),)*]
            }
        }
    };
}

counters! {
    reads => add_read,
        "Chunk reads asked of the fleet.";
    hits => add_hit,
        "Reads that returned a verified envelope.";
    misses => add_miss,
        "Reads that found fewer than `k` valid shards, or shards that did not rebuild the chunk.";
    hedges => add_hedge,
        "Extra requests sent because the first `k` were slow (each spent a token).";
    hedges_denied => add_hedge_denied,
        "Hedges the token bucket refused.";
    replacements => add_replacement,
        "Requests that replaced a failed request or a bad or absent shard.";
    probes => add_probe,
        "Requests to an avoided node, to measure it again (each spent a token).";
    reconstructed => add_reconstructed,
        "Hits rebuilt with parity because a data shard was not among the first `k`.";
    node_errors => add_node_error,
        "Shard requests that failed or timed out.";
    bad_shards => add_bad_shard,
        "Shards refused by their header or checksum.";
    integrity_failures => add_integrity_failure,
        "Rebuilt envelopes that did not match their chunk id (never served).";
    shards_written => add_shard_written,
        "Shards stored by writes.";
}

impl FleetStats {
    pub fn add_shards_written(&self, count: u64) {
        self.shards_written.fetch_add(count, Ordering::Relaxed);
    }
}
