//! The erasure-coded cache fleet: chunks cut into `k` data and `m` parity
//! shards spread over N cache nodes, read back from the first `k` to answer.
//!
//! * [`codec`]: the coding (XOR for `m = 1`, Reed-Solomon beyond);
//! * [`shard`]: the shard object a node stores, with its checked header;
//! * [`placement`]: which node holds which shard (consistent hashing with
//!   bounded loads);
//! * [`hedge`]: latency estimates, the hedge delay and the token bucket;
//! * [`node`]: the node transport seam and a node's bounded shard storage;
//! * [`fleet`]: [`EcFleetStore`], the [`super::ChunkStore`] over all of it.
//!
//! A fleet is a cache: shards are evicted by nodes, a chunk with fewer than
//! `k` shards left is a miss, and nothing a node returns is trusted (the
//! rebuilt envelope is checked against its chunk id).
#![forbid(unsafe_code)]

pub mod codec;
pub mod fleet;
pub mod hedge;
pub mod http_node;
pub mod node;
pub mod placement;
pub mod shard;
pub mod stats;
#[cfg(test)]
mod tests;

pub use codec::Scheme;
pub use codec::MAX_SHARDS;
pub use fleet::EcFleetStore;
pub use http_node::{open_fleet, HttpShardNode, MAX_SHARD_OBJECT};
pub use node::{LocalNode, ShardCache, ShardNode};
pub use stats::FleetStatsSnapshot;
