use std::collections::HashSet;

use bytes::Bytes;

use super::*;
use crate::engine::testing::MemStore;
use crate::maint::testing::{age_all, no_progress, put_image, HOUR};

fn opts(grace: Duration, dry_run: bool) -> GcOptions {
    GcOptions { grace, dry_run }
}

async fn ids(store: &MemStore) -> HashSet<ChunkId> {
    store.list().await.unwrap().iter().map(|c| c.id).collect()
}

#[tokio::test]
async fn deletes_only_old_unreferenced_chunks() {
    let store = MemStore::default();
    let kept = put_image(&store, "app", &[1, 2, 3]).await;
    let orphans = put_image(&store, "gone", &[4, 5]).await;
    store.remove_manifest("gone");
    age_all(&store, 2 * HOUR).await;
    // A fresh orphan: an upload whose manifest is not stored yet.
    let young = put_image(&store, "tmp", &[6]).await;
    store.remove_manifest("tmp");

    let dry = collect_garbage(&store, &opts(HOUR, true), &no_progress)
        .await
        .unwrap();
    assert_eq!(dry.chunks_deleted, 2);
    assert_eq!(ids(&store).await.len(), 6, "a dry run deleted something");

    let report = collect_garbage(&store, &opts(HOUR, false), &no_progress)
        .await
        .unwrap();
    assert_eq!(
        (
            report.manifests,
            report.chunks_listed,
            report.chunks_referenced
        ),
        (1, 6, 3)
    );
    assert_eq!((report.chunks_recent, report.chunks_deleted), (1, 2));
    assert!(report.bytes_freed > 2 * u64::from(crate::maint::testing::CHUNK));
    assert_eq!(
        report,
        GcReport {
            dry_run: false,
            elapsed_secs: report.elapsed_secs,
            ..dry
        }
    );
    let left = ids(&store).await;
    assert!(kept.iter().chain(&young).all(|id| left.contains(id)));
    assert!(orphans.iter().all(|id| !left.contains(id)));

    // Without grace, the young orphan goes too.
    let report = collect_garbage(&store, &opts(Duration::ZERO, false), &no_progress)
        .await
        .unwrap();
    assert_eq!(report.chunks_deleted, 1);
    assert_eq!(ids(&store).await, kept.into_iter().collect());
}

#[tokio::test]
async fn a_chunk_a_push_relies_on_survives() {
    let store = MemStore::default();
    let shared = put_image(&store, "old", &[1]).await;
    store.remove_manifest("old");
    age_all(&store, 2 * HOUR).await;
    // A push finds the chunk present: the store refreshes it.
    assert!(store.missing(&shared).await.unwrap().is_empty());
    let report = collect_garbage(&store, &opts(HOUR, false), &no_progress)
        .await
        .unwrap();
    assert_eq!((report.chunks_deleted, report.chunks_recent), (0, 1));
}

#[tokio::test]
async fn an_unreadable_manifest_stops_before_any_deletion() {
    let store = MemStore::default();
    put_image(&store, "app", &[1]).await;
    put_image(&store, "orphan", &[2]).await;
    store.remove_manifest("orphan");
    store
        .put_manifest("broken", Bytes::from_static(b"not a manifest"))
        .await
        .unwrap();
    age_all(&store, 2 * HOUR).await;
    let err = collect_garbage(&store, &opts(HOUR, false), &no_progress)
        .await
        .unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("\"broken\""), "{chain}");
    assert!(chain.contains("no chunk was deleted"), "{chain}");
    assert_eq!(ids(&store).await.len(), 2);
}

#[tokio::test]
async fn an_absurd_grace_is_an_error() {
    let store = MemStore::default();
    let err = collect_garbage(&store, &opts(Duration::MAX, true), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, GcError::Grace(_)), "{err}");
}

#[tokio::test]
async fn a_trace_beside_a_manifest_is_no_manifest() {
    let store = MemStore::default();
    let kept = put_image(&store, "app", &[1]).await;
    let trace = crate::chunk::Trace {
        image: "app".into(),
        runs: vec![crate::chunk::TraceRun {
            manifest_digest: [0; 32],
            recorded_at: 0,
            ids: kept.clone(),
        }],
        folded: None,
    };
    // A recorded run (version 1) and a merge that lists the runs it folded
    // (version 2): neither is a manifest.
    let stamp = crate::chunk::RunStamp::new(5, 6);
    let merged = crate::chunk::Trace {
        folded: Some(vec![stamp]),
        ..trace.clone()
    };
    let tenant = crate::chunk::TenantKey([4; 32]);
    for (name, trace) in [
        (crate::store::trace_name("app"), merged),
        (crate::store::trace_run_name("app", stamp), trace),
    ] {
        store
            .put_manifest(&name, Bytes::from(trace.seal(&tenant)))
            .await
            .unwrap();
    }
    age_all(&store, 2 * HOUR).await;
    let report = collect_garbage(&store, &opts(HOUR, false), &no_progress)
        .await
        .unwrap();
    assert_eq!((report.manifests, report.chunks_referenced), (1, 1));
    let verified = crate::maint::verify(
        &store,
        &crate::maint::VerifyOptions::default(),
        &no_progress,
    )
    .await
    .unwrap();
    assert_eq!(verified.chunks_checked, 1);
}
