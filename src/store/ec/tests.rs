//! The fleet over in-process nodes: losses, slow nodes, bad shards.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};

use super::*;
use crate::chunk::ChunkId;
use crate::error::ErrorKind;
use crate::store::ChunkStore;

fn fleet(nodes: usize, scheme: Scheme) -> (EcFleetStore, Vec<Arc<LocalNode>>) {
    let local: Vec<Arc<LocalNode>> = (0..nodes)
        .map(|i| Arc::new(LocalNode::new(&format!("mem://node{i}"), 1 << 30)))
        .collect();
    let as_nodes = local
        .iter()
        .map(|n| n.clone() as Arc<dyn ShardNode>)
        .collect();
    (EcFleetStore::new(as_nodes, scheme).unwrap(), local)
}

fn envelopes(count: usize, seed: u64) -> Vec<(ChunkId, Bytes)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let len = rng.gen_range(1..200_000);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            (ChunkId::of_envelope(&bytes), Bytes::from(bytes))
        })
        .collect()
}

async fn fill(store: &EcFleetStore, chunks: &[(ChunkId, Bytes)]) {
    for (id, envelope) in chunks {
        store.put(id, envelope.clone()).await.unwrap();
    }
}

async fn read_all(store: &EcFleetStore, chunks: &[(ChunkId, Bytes)]) {
    for (id, envelope) in chunks {
        let got = store.get(id).await.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(got, envelope);
    }
}

#[tokio::test]
async fn chunks_round_trip_and_spread_over_all_nodes() {
    let (store, nodes) = fleet(7, Scheme::DEFAULT);
    let chunks = envelopes(40, 1);
    fill(&store, &chunks).await;
    read_all(&store, &chunks).await;
    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses), (40, 0));
    assert_eq!(stats.shards_written, 40 * 5);
    assert!(nodes.iter().all(|n| n.cache().bytes() > 0));
    let unknown = ChunkId::of_envelope(b"never stored");
    let err = store.get(&unknown).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn losing_up_to_m_nodes_loses_no_hit() {
    for (scheme, down) in [
        (Scheme::DEFAULT, vec![2]),
        (Scheme::new(4, 2).unwrap(), vec![0, 4]),
    ] {
        let (store, nodes) = fleet(6, scheme);
        let chunks = envelopes(30, 2);
        fill(&store, &chunks).await;
        for &node in &down {
            nodes[node].set_down(true);
        }
        read_all(&store, &chunks).await;
        let stats = store.stats();
        assert_eq!(stats.misses, 0, "{scheme}");
        assert!(
            stats.replacements > 0 || stats.reconstructed > 0,
            "{stats:?}"
        );
        // One node more than m down: some chunks have fewer than k shards.
        nodes[1].set_down(true);
        nodes[3].set_down(true);
        let mut missed = 0;
        for (id, _) in &chunks {
            missed += store.get(id).await.is_err() as usize;
        }
        assert!(missed > 0, "{scheme}");
    }
}

#[tokio::test]
async fn a_slow_node_is_hedged_then_avoided() {
    let (store, nodes) = fleet(5, Scheme::DEFAULT);
    let chunks = envelopes(60, 3);
    fill(&store, &chunks).await;
    read_all(&store, &chunks[..20]).await;
    nodes[1].set_delay(Duration::from_millis(200));
    let gets_before = nodes[1].gets();
    read_all(&store, &chunks[20..]).await;
    let stats = store.stats();
    assert_eq!(stats.misses, 0);
    assert!(stats.hedges >= 1, "{stats:?}");
    assert!(stats.reconstructed >= 30, "{stats:?}");
    // Once measured, the slow node is asked only by probes.
    let asked_slow = nodes[1].gets() - gets_before;
    assert!(asked_slow <= 8, "slow node asked {asked_slow} times");

    // Recovered, it is probed once it has gone unmeasured for a while, and
    // then asked for its shards again.
    // A hedge sent just before the delay was lifted still answers late and
    // counts as a fresh measurement, so on a loaded host the node may need
    // more than one recheck period to go stale; a few rounds allow for it.
    nodes[1].set_delay(Duration::ZERO);
    let mut probed = store.stats();
    for _ in 0..5 {
        tokio::time::sleep(hedge::NODE_RECHECK + Duration::from_millis(100)).await;
        read_all(&store, &chunks[..20]).await;
        probed = store.stats();
        if probed.probes >= 1 {
            break;
        }
    }
    assert!(probed.probes >= 1, "{probed:?}");
    let gets_before = nodes[1].gets();
    read_all(&store, &chunks[20..]).await;
    // It holds a data shard of about 32 of these 40 chunks.
    let asked_again = nodes[1].gets() - gets_before;
    assert!(
        asked_again >= 16,
        "recovered node asked {asked_again} times"
    );
}

#[tokio::test]
async fn bad_shards_are_discarded_and_a_lying_fleet_is_a_miss() {
    let (store, nodes) = fleet(5, Scheme::DEFAULT);
    let chunks = envelopes(10, 4);
    fill(&store, &chunks).await;
    // A node that returns some other chunk's shard for every request.
    let (other_id, other) = &envelopes(1, 5)[0];
    store.put(other_id, other.clone()).await.unwrap();
    let placed = store_placement(&store, other_id);
    let impostor = nodes[placed[0] as usize].cache().get(other_id, 0).unwrap();
    let (id, envelope) = &chunks[0];
    let placed = store_placement(&store, id);
    let victim = &nodes[placed[0] as usize];
    victim.cache().put(other_id, 0, impostor).unwrap();
    assert_eq!(store.get(id).await.unwrap(), envelope);

    // Shards that all check out but rebuild another envelope: never served.
    let forged = Scheme::DEFAULT.encode(other);
    for (index, data) in forged.iter().enumerate() {
        let header = shard::ShardHeader {
            id: *id,
            index: index as u8,
            scheme: Scheme::DEFAULT,
            envelope_len: other.len() as u32,
        };
        nodes[placed[index] as usize]
            .cache()
            .put(id, index as u8, header.seal(data))
            .unwrap();
    }
    let err = store.get(id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(store.stats().integrity_failures >= 1);
    // A fill from the tier below repairs it.
    store.put(id, envelope.clone()).await.unwrap();
    assert_eq!(store.get(id).await.unwrap(), envelope);
}

#[tokio::test]
async fn a_write_needs_k_nodes_and_a_cache_holds_no_manifests() {
    let (store, nodes) = fleet(5, Scheme::DEFAULT);
    let (id, envelope) = &envelopes(1, 6)[0];
    nodes[0].set_down(true);
    store.put(id, envelope.clone()).await.unwrap();
    nodes[1].set_down(true);
    let err = store.put(id, envelope.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    let err = store.get_manifest("app").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(store.put_manifest("app", Bytes::new()).await.is_err());
    assert_eq!(store.missing(&[*id]).await.unwrap(), vec![*id]);
}

#[test]
fn a_fleet_smaller_than_a_chunks_shards_is_refused() {
    let nodes: Vec<Arc<dyn ShardNode>> = (0..4)
        .map(|i| Arc::new(LocalNode::new(&format!("mem://{i}"), 1)) as Arc<dyn ShardNode>)
        .collect();
    let err = EcFleetStore::new(nodes, Scheme::DEFAULT).unwrap_err();
    assert!(
        err.to_string()
            .contains("4 cache nodes cannot hold 5 shards"),
        "{err}"
    );
}

fn store_placement(store: &EcFleetStore, id: &ChunkId) -> Vec<u16> {
    store.placement().nodes_for(id).to_vec()
}
