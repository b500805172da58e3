use bytes::Bytes;

use super::*;
use crate::engine::testing::MemStore;
use crate::maint::testing::{no_progress, put_image};

/// `store`'s copy of `id` with one byte flipped.
async fn corrupt(store: &MemStore, id: &ChunkId) {
    let mut bytes = store.get(id).await.unwrap().to_vec();
    bytes[100] ^= 1;
    store.delete(id).await.unwrap();
    store.put(id, Bytes::from(bytes)).await.unwrap();
}

#[tokio::test]
async fn finds_bad_and_missing_chunks_and_repairs_them() {
    let store = MemStore::default();
    let app = put_image(&store, "app", &[1, 2, 3, 2]).await;
    let other = put_image(&store, "other", &[7]).await;
    let replica = Arc::new(MemStore::default());
    put_image(&replica, "app", &[1, 2, 3]).await;

    let clean = verify(&store, &VerifyOptions::default(), &no_progress)
        .await
        .unwrap();
    assert_eq!((clean.chunks_checked, clean.chunks_good), (4, 4));
    assert!(clean.is_sound());

    corrupt(&store, &app[0]).await;
    store.delete(&app[2]).await.unwrap();
    let found = verify(&store, &VerifyOptions::default(), &no_progress)
        .await
        .unwrap();
    assert_eq!(found.bad, [app[0].to_hex()]);
    assert_eq!(found.missing, [app[2].to_hex()]);
    assert_eq!(found.chunks_good, 2);
    assert!(!found.is_sound());

    // One manifest's chunks only.
    let named = VerifyOptions {
        name: Some("other".into()),
        repair_from: None,
    };
    let only = verify(&store, &named, &no_progress).await.unwrap();
    assert_eq!((only.chunks_checked, only.chunks_good), (1, 1));

    let repairing = VerifyOptions {
        name: Some("app".into()),
        repair_from: Some(replica.clone()),
    };
    let repaired = verify(&store, &repairing, &no_progress).await.unwrap();
    let mut both = vec![app[0].to_hex(), app[2].to_hex()];
    both.sort();
    assert_eq!(repaired.repaired, both);
    assert!(repaired.is_sound());
    let again = verify(&store, &VerifyOptions::default(), &no_progress)
        .await
        .unwrap();
    assert!(
        again.bad.is_empty() && again.missing.is_empty(),
        "{again:?}"
    );
    assert_eq!(again.chunks_good, 4);
    assert!(!other.is_empty());
}

#[tokio::test]
async fn a_damaged_or_absent_replacement_is_never_written() {
    let store = MemStore::default();
    let app = put_image(&store, "app", &[1, 2]).await;
    let replica = Arc::new(MemStore::default());
    put_image(&replica, "app", &[1]).await;
    corrupt(&replica, &app[0]).await;
    corrupt(&store, &app[0]).await;
    store.delete(&app[1]).await.unwrap();

    let opts = VerifyOptions {
        name: None,
        repair_from: Some(replica),
    };
    let report = verify(&store, &opts, &no_progress).await.unwrap();
    assert!(report.repaired.is_empty());
    assert_eq!(report.unrepaired.len(), 2);
    let reasons: Vec<&str> = report
        .unrepaired
        .iter()
        .map(|u| u.reason.as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("damaged as well")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not found")),
        "{reasons:?}"
    );
    assert!(!report.is_sound());
    // The store's damaged copy is still there, not replaced by another.
    assert!(store.missing(&[app[0]]).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_unknown_name_is_an_error_naming_it() {
    let store = MemStore::default();
    let opts = VerifyOptions {
        name: Some("nope".into()),
        repair_from: None,
    };
    let err = verify(&store, &opts, &no_progress).await.unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("\"nope\""), "{chain}");
}
