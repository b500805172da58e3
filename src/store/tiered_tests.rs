//! The tiered store against in-memory tiers that miss, fail, corrupt and hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::tiered::{TieredStore, DEFAULT_TIER_DEADLINE};
use super::{ChunkStore, StoreError};
use crate::chunk::ChunkId;
use crate::engine::testing::MemStore;
use crate::error::ErrorKind;

fn chunk(n: u8) -> (ChunkId, Bytes) {
    let envelope = Bytes::from(vec![n; 1000 + usize::from(n)]);
    (ChunkId::of_envelope(&envelope), envelope)
}

fn tiers(n: usize) -> (Vec<Arc<MemStore>>, TieredStore) {
    let stores: Vec<Arc<MemStore>> = (0..n).map(|_| Arc::new(MemStore::default())).collect();
    let dyns = stores
        .iter()
        .map(|s| s.clone() as Arc<dyn ChunkStore>)
        .collect();
    (stores, TieredStore::new(dyns).unwrap())
}

/// Waits until the background fills of `id` reached every store in `stores`.
async fn filled(stores: &[Arc<MemStore>], id: &ChunkId) -> bool {
    for _ in 0..200 {
        let mut all = true;
        for store in stores {
            all &= store.missing(&[*id]).await.unwrap().is_empty();
        }
        if all {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test]
async fn a_miss_falls_through_to_the_origin_and_fills_every_tier_above() {
    let (stores, tiered) = tiers(3);
    let (id, envelope) = chunk(1);
    stores[2].put(&id, envelope.clone()).await.unwrap();
    assert_eq!(tiered.get(&id).await.unwrap(), envelope);
    assert!(filled(&stores[..2], &id).await);
    // Now the first tier has it: the others are not asked.
    assert_eq!(tiered.get(&id).await.unwrap(), envelope);
    assert_eq!(
        [stores[0].gets(), stores[1].gets(), stores[2].gets()],
        [2, 1, 1]
    );
    let stats = tiered.stats();
    assert_eq!([stats[0].hits, stats[1].hits, stats[2].hits], [1, 0, 1]);
    assert_eq!([stats[0].misses, stats[1].misses], [1, 1]);
    assert_eq!([stats[0].fills, stats[1].fills, stats[2].fills], [1, 1, 0]);
    assert_eq!(stats[0].bytes, envelope.len() as u64);
    assert_eq!(tiered.tier_stats(), tiered.stats());
}

#[tokio::test]
async fn a_failing_tier_is_passed_over_and_counted() {
    let (stores, tiered) = tiers(2);
    let (id, envelope) = chunk(2);
    for store in &stores {
        store.put(&id, envelope.clone()).await.unwrap();
    }
    stores[0].set_transient(id, 1);
    assert_eq!(tiered.get(&id).await.unwrap(), envelope);
    let stats = tiered.stats();
    assert_eq!((stats[0].errors, stats[0].hits, stats[1].hits), (1, 0, 1));
}

#[tokio::test]
async fn corrupt_bytes_are_never_served_reported_and_replaced() {
    let (stores, tiered) = tiers(2);
    let (id, envelope) = chunk(3);
    for store in &stores {
        store.put(&id, envelope.clone()).await.unwrap();
    }
    stores[0].set_corrupt(id, true);
    assert_eq!(tiered.get(&id).await.unwrap(), envelope);
    let stats = tiered.stats();
    assert_eq!((stats[0].integrity_failures, stats[1].hits), (1, 1));
    // The fill put good bytes back in place of the corrupt copy.
    stores[0].set_corrupt(id, false);
    for _ in 0..200 {
        if tiered.stats()[0].fills == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stores[0].get(&id).await.unwrap(), envelope);

    // An origin with bad bytes fails the read as an integrity error.
    stores[0].delete(&id).await.unwrap();
    stores[1].set_corrupt(id, true);
    let err = tiered.get(&id).await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptChunk { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(
        crate::error::chain(&err).contains("hashes to"),
        "{}",
        crate::error::chain(&err)
    );
}

#[tokio::test]
async fn a_hanging_tier_fails_over_at_its_deadline() {
    let (stores, tiered) = tiers(2);
    let tiered = tiered.with_deadline(0, Some(Duration::from_millis(100)));
    let (id, envelope) = chunk(4);
    for store in &stores {
        store.put(&id, envelope.clone()).await.unwrap();
    }
    let _hang = stores[0].gate(id);
    let started = Instant::now();
    assert_eq!(tiered.get(&id).await.unwrap(), envelope);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let stats = tiered.stats();
    assert_eq!(
        (stats[0].timeouts, stats[0].errors, stats[1].hits),
        (1, 1, 1)
    );
    assert!(DEFAULT_TIER_DEADLINE < crate::engine::DEFAULT_FETCH_TIMEOUT / 4);
}

#[tokio::test]
async fn the_origins_answer_is_the_error_and_writes_go_to_the_origin() {
    let (stores, tiered) = tiers(2);
    let (id, envelope) = chunk(5);
    let err = tiered.get(&id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    stores[1].set_transient(id, 1);
    let err = tiered.get(&id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);

    tiered.put(&id, envelope.clone()).await.unwrap();
    assert_eq!(stores[0].missing(&[id]).await.unwrap(), [id]);
    assert!(stores[1].missing(&[id]).await.unwrap().is_empty());
    // A cache that holds a chunk the origin lacks does not make it present.
    let (other, other_envelope) = chunk(6);
    stores[0].put(&other, other_envelope).await.unwrap();
    assert_eq!(tiered.missing(&[id, other]).await.unwrap(), [other]);
    let listed = tiered.list().await.unwrap();
    assert_eq!(listed.iter().map(|c| c.id).collect::<Vec<_>>(), [id]);
    assert!(tiered.list_manifests().await.unwrap().is_empty());
    tiered
        .put_manifest("m", Bytes::from_static(b"sealed"))
        .await
        .unwrap();
    assert_eq!(stores[1].get_manifest("m").await.unwrap(), &b"sealed"[..]);
    assert!(stores[0].get_manifest("m").await.is_err());
    tiered.delete(&id).await.unwrap();
    assert_eq!(stores[1].missing(&[id]).await.unwrap(), [id]);
    assert!(TieredStore::new(Vec::new()).is_err());
}

#[tokio::test]
async fn keeps_the_garbage_collection_contract_of_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let cache = super::HostCache::open(&dir.path().join("cache"), 1 << 20).unwrap();
    let origin = super::dir::DirStore::open(&dir.path().join("origin")).unwrap();
    let tiered = TieredStore::new(vec![Arc::new(cache), Arc::new(origin)]).unwrap();
    super::contract::check_gc_contract(&tiered, Duration::from_millis(20)).await;
}
