//! Which cache node holds which shard: consistent hashing with bounded loads.
//!
//! Every reader and writer computes the same table from the node URLs
//! alone (their order does not matter), so no coordination is needed.
//! Chunk ids are uniform, so a chunk falls into one of [`BUCKETS`] buckets
//! by its first bytes, and the table assigns each bucket's `k + m` shard
//! indexes to distinct nodes:
//!
//! * each node sits at [`POINTS_PER_NODE`] points on a 64-bit ring;
//! * shard `i` of bucket `b` starts at hash(b, i) and walks clockwise to the
//!   first node that holds no other shard of the bucket and whose load is
//!   below the cap, ⌈(1 + ε) · average⌉ (Mirrokni, Thorup and Zadimoghaddam,
//!   "Consistent Hashing with Bounded Loads"), buckets taken in order.
//!
//! Adding or removing a node moves the shards it takes or held, plus the
//! few that the cap or the distinctness rule pushes along; the tests
//! measure how many.

use sha2::{Digest, Sha256};

use crate::chunk::ChunkId;

/// Buckets chunk ids fall into: enough that loads even out over a few
/// dozen nodes, few enough that the table is built in a millisecond.
pub const BUCKETS: usize = 4096;
/// Ring points per node: spreads a node's share over the ring.
pub const POINTS_PER_NODE: usize = 64;
/// The ε of the load cap: no node holds more than 1.25× the average.
pub const DEFAULT_EPSILON: f64 = 0.25;

/// The shard → node table of one fleet.
#[derive(Debug, Clone)]
pub struct Placement {
    shards: usize,
    /// `BUCKETS × shards` node indexes, bucket-major.
    table: Vec<u16>,
    loads: Vec<usize>,
}

/// Why a fleet cannot place shards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{nodes} cache nodes cannot hold {shards} shards of a chunk on distinct nodes")]
    TooFewNodes { nodes: usize, shards: usize },
    #[error("cache node {0:?} is named twice")]
    Duplicate(String),
}

impl Placement {
    /// The table for `nodes` (by URL) and `shards` shards per chunk.
    pub fn new(nodes: &[String], shards: usize, epsilon: f64) -> Result<Placement, PlacementError> {
        if nodes.len() < shards || shards == 0 || nodes.len() > u16::MAX as usize {
            return Err(PlacementError::TooFewNodes {
                nodes: nodes.len(),
                shards,
            });
        }
        let mut ring: Vec<(u64, u16)> = Vec::with_capacity(nodes.len() * POINTS_PER_NODE);
        for (node, url) in nodes.iter().enumerate() {
            if nodes[..node].contains(url) {
                return Err(PlacementError::Duplicate(url.clone()));
            }
            for point in 0..POINTS_PER_NODE {
                ring.push((
                    hash64(&[b"node", url.as_bytes(), &point.to_le_bytes()]),
                    node as u16,
                ));
            }
        }
        ring.sort_unstable();
        let average = (BUCKETS * shards) as f64 / nodes.len() as f64;
        let cap = ((1.0 + epsilon) * average).ceil() as usize;
        let mut loads = vec![0usize; nodes.len()];
        let mut table = Vec::with_capacity(BUCKETS * shards);
        for bucket in 0..BUCKETS {
            let chosen_from = table.len();
            for index in 0..shards {
                let start = hash64(&[b"shard", &bucket.to_le_bytes(), &index.to_le_bytes()]);
                let first = ring.partition_point(|&(point, _)| point < start);
                let walk = (0..ring.len()).map(|step| ring[(first + step) % ring.len()].1);
                let taken = |node: &u16| table[chosen_from..].contains(node);
                // Under the cap if any node is; otherwise (a cap below one
                // bucket per node) the first free node on the walk.
                let node = walk
                    .clone()
                    .find(|node| !taken(node) && loads[*node as usize] < cap)
                    .or_else(|| walk.clone().find(|node| !taken(node)))
                    .expect("at least `shards` distinct nodes");
                loads[node as usize] += 1;
                table.push(node);
            }
        }
        Ok(Placement {
            shards,
            table,
            loads,
        })
    }

    /// The node index of each shard of chunk `id`, shard 0 first.
    pub fn nodes_for(&self, id: &ChunkId) -> &[u16] {
        let bucket = u32::from_le_bytes(id.0[..4].try_into().expect("4 bytes")) as usize % BUCKETS;
        &self.table[bucket * self.shards..(bucket + 1) * self.shards]
    }

    /// Shards (in buckets) each node holds, by node index.
    pub fn loads(&self) -> &[usize] {
        &self.loads
    }

    /// The share of bucket shards placed on a different node in `other`,
    /// where nodes are matched by URL (`self_nodes`, `other_nodes`).
    pub fn moved_share(
        &self,
        self_nodes: &[String],
        other: &Placement,
        other_nodes: &[String],
    ) -> f64 {
        let moved = self
            .table
            .iter()
            .zip(&other.table)
            .filter(|(a, b)| self_nodes[**a as usize] != other_nodes[**b as usize])
            .count();
        moved as f64 / self.table.len() as f64
    }
}

fn hash64(parts: &[&[u8]]) -> u64 {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u32).to_le_bytes());
        hash.update(part);
    }
    u64::from_le_bytes(hash.finalize()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:7000")).collect()
    }

    fn check_distinct_and_bounded(placement: &Placement, nodes: usize, shards: usize) {
        for bucket in placement.table.chunks(shards) {
            let mut sorted = bucket.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), shards, "shards of one chunk share a node");
        }
        let average = (BUCKETS * shards) as f64 / nodes as f64;
        let max = *placement.loads().iter().max().unwrap() as f64;
        assert!(
            max <= ((1.0 + DEFAULT_EPSILON) * average).ceil(),
            "max {max}, avg {average}"
        );
    }

    #[test]
    fn shards_are_distinct_and_loads_bounded() {
        for (nodes, shards) in [(5, 5), (6, 5), (8, 5), (12, 6), (30, 5)] {
            let placement = Placement::new(&urls(nodes), shards, DEFAULT_EPSILON).unwrap();
            check_distinct_and_bounded(&placement, nodes, shards);
        }
    }

    #[test]
    fn node_order_does_not_matter() {
        let nodes = urls(9);
        let mut reversed = nodes.clone();
        reversed.reverse();
        let a = Placement::new(&nodes, 5, DEFAULT_EPSILON).unwrap();
        let b = Placement::new(&reversed, 5, DEFAULT_EPSILON).unwrap();
        assert_eq!(a.moved_share(&nodes, &b, &reversed), 0.0);
    }

    /// Adding or removing one of `n` nodes should move about the share the
    /// node holds (1 / n of all shards); bounded loads and distinctness add
    /// some, and that overhead is what this bounds.
    #[test]
    fn adding_or_removing_a_node_moves_few_shards() {
        let shards = 5;
        for n in [8, 12, 20] {
            let before = urls(n);
            let base = Placement::new(&before, shards, DEFAULT_EPSILON).unwrap();
            let ideal_removed = 1.0 / n as f64;
            let mut fewer = before.clone();
            fewer.remove(3);
            let removed = Placement::new(&fewer, shards, DEFAULT_EPSILON).unwrap();
            let moved_removed = base.moved_share(&before, &removed, &fewer);
            let more = urls(n + 1);
            let added = Placement::new(&more, shards, DEFAULT_EPSILON).unwrap();
            let moved_added = base.moved_share(&before, &added, &more);
            let ideal_added = 1.0 / (n + 1) as f64;
            eprintln!(
                "{n} nodes: remove one moves {moved_removed:.3} (ideal {ideal_removed:.3}), \
                 add one moves {moved_added:.3} (ideal {ideal_added:.3})"
            );
            // Everything the removed node held moves, and little else.
            let held = base.loads()[3] as f64 / (BUCKETS * shards) as f64;
            assert!(moved_removed >= held - 1e-9, "{moved_removed} < {held}");
            assert!(moved_removed <= ideal_removed * 1.5, "{moved_removed}");
            assert!(moved_added <= ideal_added * 1.5, "{moved_added}");
        }
    }

    #[test]
    fn too_few_or_repeated_nodes_are_refused() {
        assert!(matches!(
            Placement::new(&urls(4), 5, DEFAULT_EPSILON),
            Err(PlacementError::TooFewNodes {
                nodes: 4,
                shards: 5
            })
        ));
        let mut nodes = urls(5);
        nodes.push(nodes[0].clone());
        assert!(matches!(
            Placement::new(&nodes, 5, DEFAULT_EPSILON),
            Err(PlacementError::Duplicate(_))
        ));
    }
}
