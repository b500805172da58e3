//! Checks every store engine runs in its tests: the promises of
//! [`ChunkStore`] that callers other than reads depend on (listing, the
//! garbage collection contract, and removing manifests).

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::ChunkStore;
use crate::chunk::ChunkId;

/// Runs the garbage collection contract against an empty `store`.
/// `resolution` is the granularity of the store's modification times (a
/// second for S3's `LastModified`, a few milliseconds for files): the check
/// waits that long on each side of its cutoff so that the times compare.
pub(crate) async fn check_gc_contract(store: &dyn ChunkStore, resolution: Duration) {
    let id = |n: u8| ChunkId::of_envelope(&[n]);
    let wait = resolution + Duration::from_millis(20);
    // A trace: the one kind of manifest every store, the chunk server's
    // included, lets a client remove.
    let trace = super::trace_name("gc-contract");
    for n in [1, 2, 3] {
        store.put(&id(n), Bytes::from(vec![n])).await.unwrap();
    }
    store
        .put_manifest(&trace, Bytes::from_static(b"m"))
        .await
        .unwrap();
    tokio::time::sleep(wait).await;
    let cutoff = SystemTime::now();
    tokio::time::sleep(wait).await;

    let mut listed = store.list().await.unwrap();
    listed.sort_by_key(|c| c.id);
    let mut ids: Vec<ChunkId> = listed.iter().map(|c| c.id).collect();
    let mut expected = vec![id(1), id(2), id(3)];
    expected.sort();
    ids.sort();
    assert_eq!(ids, expected);
    assert!(listed.iter().all(|c| c.size == 1 && c.modified < cutoff));
    assert_eq!(store.list_manifests().await.unwrap(), [trace.as_str()]);

    // A push relies on chunk 2 (present, not uploaded) and re-puts chunk 3.
    assert_eq!(store.missing(&[id(2), id(4)]).await.unwrap(), [id(4)]);
    store.put(&id(3), Bytes::from(vec![3])).await.unwrap();

    assert!(store.delete_if_older(&id(1), cutoff).await.unwrap());
    assert!(!store.delete_if_older(&id(2), cutoff).await.unwrap());
    assert!(!store.delete_if_older(&id(3), cutoff).await.unwrap());
    assert!(!store.delete_if_older(&id(1), cutoff).await.unwrap());
    let left = store.missing(&[id(1), id(2), id(3)]).await.unwrap();
    assert_eq!(left, [id(1)]);

    // A deleted manifest is gone; deleting it again is no error.
    store.delete_manifest(&trace).await.unwrap();
    assert!(store.list_manifests().await.unwrap().is_empty());
    let gone = store.get_manifest(&trace).await.unwrap_err();
    assert!(
        matches!(gone, super::StoreError::ManifestNotFound { .. }),
        "{gone}"
    );
    store.delete_manifest(&trace).await.unwrap();
}
