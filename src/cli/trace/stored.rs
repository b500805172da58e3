//! An image's trace as a store holds it: `NAME.trace`, which `trace merge`
//! writes, and one object per recorded run beside it.
//!
//! Stores have no compare-and-swap, so a shared object that every recorder
//! read, extended and wrote back would lose a run whenever two devices
//! stopped at once; each recorder writes a run object of its own
//! ([`trace_run_name`]) and runs are merged on read instead. A merge names
//! the run objects it folded in `NAME.trace` and only then removes them:
//! should it stop midway, readers still skip what it folded, and a run
//! stored while it ran is neither folded nor removed. A reader takes the
//! runs `NAME.trace` does not name, the newest [`MAX_TRACE_RUNS`]; the
//! others are stale, read by no one, and whoever may write removes them.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;

use crate::chunk::{RunStamp, TenantKey, Trace, TraceRun, MAX_TRACE_RUNS};
use crate::store::{trace_name, trace_run_name, trace_run_stamp, ChunkStore, StoreError};

/// Run objects removed at once.
const REMOVALS_IN_FLIGHT: usize = 16;

/// One run object in the store.
pub(super) type RunObject = (RunStamp, String);

/// What a reader found of an image's trace.
#[derive(Debug, Default)]
pub(super) struct Stored {
    /// `NAME.trace` with the runs read beside it; `None` if there is
    /// neither.
    pub trace: Option<Trace>,
    /// The run objects whose runs are in `trace`.
    pub read: Vec<RunObject>,
    /// Run objects no reader takes: folded by the stored merge, or older
    /// than the newest [`MAX_TRACE_RUNS`] the others.
    pub stale: Vec<RunObject>,
}

/// The stored trace of image `name`. An object that does not open (a wrong
/// key, damage) is skipped with a warning: it holds no other run hostage,
/// and the next merge replaces it.
pub(super) async fn load(
    store: &dyn ChunkStore,
    name: &str,
    tenant: &TenantKey,
) -> anyhow::Result<Stored> {
    let object = trace_name(name);
    let merged = match store.get_manifest(&object).await {
        Ok(sealed) => match Trace::open(&object, &sealed, tenant) {
            Ok(trace) => Some(trace),
            Err(e) => {
                tracing::warn!(trace = object, "skipping a trace that does not open: {e}");
                None
            }
        },
        Err(StoreError::ManifestNotFound { .. }) => None,
        Err(e) => return Err(e).with_context(|| format!("fetch trace {object:?}")),
    };
    let covered = Covered::by(merged.as_ref());
    let mut runs: Vec<RunObject> = store
        .list_manifests()
        .await
        .with_context(|| format!("list the runs of trace {object:?}"))?
        .into_iter()
        .filter_map(|run| Some((trace_run_stamp(name, &run)?, run)))
        .collect();
    runs.sort();
    let (mut stale, mut fresh) = (Vec::new(), Vec::new());
    for run in runs {
        match covered.covers(&run.0) {
            Cover::Listed => stale.push(run),
            // A `NAME.trace` of version 1 (which names no runs) seems to
            // hold it, judged by its time: it is not read, but never
            // removed on the strength of that guess, which a merging host
            // with a fast clock makes wrong. A merge does not name it, so
            // the merge after that one reads and folds it.
            Cover::ByTime => {}
            Cover::No => fresh.push(run),
        }
    }
    let too_old = fresh.len().saturating_sub(MAX_TRACE_RUNS);
    stale.extend(fresh.drain(..too_old));

    let mut stored = Stored {
        trace: merged,
        read: Vec::new(),
        stale,
    };
    for (stamp, run) in fresh {
        let sealed = match store.get_manifest(&run).await {
            Ok(sealed) => sealed,
            // Removed since the listing, by a merge that folded it or a
            // reader that found it stale: either way it is not ours to use.
            Err(StoreError::ManifestNotFound { .. }) => continue,
            Err(e) => return Err(e).with_context(|| format!("fetch trace run {run:?}")),
        };
        match Trace::open(&run, &sealed, tenant) {
            Ok(recorded) if recorded.image == name => {
                let trace = stored.trace.get_or_insert_with(|| Trace {
                    image: name.to_owned(),
                    runs: Vec::new(),
                    folded: None,
                });
                for one in recorded.runs {
                    trace.push_run(one);
                }
                stored.read.push((stamp, run));
            }
            Ok(recorded) => tracing::warn!(
                run,
                "skipping a trace run recorded for image {:?}",
                recorded.image
            ),
            Err(e) => tracing::warn!(run, "skipping a trace run that does not open: {e}"),
        }
    }
    Ok(stored)
}

/// Which run objects a stored merge stands for.
enum Covered {
    Nothing,
    /// The runs its list names.
    Listed(HashSet<RunStamp>),
    /// A merge written before merges listed their runs stands for every run
    /// stored up to the second of its newest run.
    UpTo(u64),
}

impl Covered {
    fn by(merged: Option<&Trace>) -> Covered {
        let Some(merged) = merged else {
            return Covered::Nothing;
        };
        match &merged.folded {
            Some(folded) => Covered::Listed(folded.iter().copied().collect()),
            None => match merged.runs.iter().map(|r| r.recorded_at).max() {
                Some(newest) => Covered::UpTo(newest),
                None => Covered::Nothing,
            },
        }
    }

    fn covers(&self, stamp: &RunStamp) -> Cover {
        match self {
            Covered::Listed(folded) if folded.contains(stamp) => Cover::Listed,
            Covered::UpTo(secs) if stamp.unix_nanos() / 1_000_000_000 <= *secs => Cover::ByTime,
            _ => Cover::No,
        }
    }
}

/// Whether a stored merge stands for a run object, and how it is known.
enum Cover {
    No,
    /// The merge names it.
    Listed,
    /// The merge is of version 1 and its newest run is no older.
    ByTime,
}

/// Stores `run` of image `image` in an object of its own (see the module
/// docs), so that recorders never overwrite each other.
pub(super) async fn record_run(
    store: &dyn ChunkStore,
    image: &str,
    tenant: &TenantKey,
    run: TraceRun,
) -> anyhow::Result<String> {
    let stored_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let object = trace_run_name(image, RunStamp::new(stored_at, rand::random()));
    let trace = Trace {
        image: image.to_owned(),
        runs: vec![run],
        folded: None,
    };
    store
        .put_manifest(&object, Bytes::from(trace.seal(tenant)))
        .await
        .with_context(|| format!("store trace run {object:?}"))?;
    Ok(object)
}

/// Writes `trace` as its image's `NAME.trace`; the stores' manifest writes
/// are durable when they return.
pub(super) async fn save(
    store: &dyn ChunkStore,
    trace: &Trace,
    tenant: &TenantKey,
) -> anyhow::Result<()> {
    let object = trace_name(&trace.image);
    store
        .put_manifest(&object, Bytes::from(trace.seal(tenant)))
        .await
        .with_context(|| format!("store trace {object:?}"))
}

/// Removes run objects no reader takes any more (see the module docs).
/// Returns how many went and the failures, each naming its object.
pub(super) async fn remove_runs(
    store: &dyn ChunkStore,
    runs: &[RunObject],
) -> (usize, Vec<anyhow::Error>) {
    // Built before they are streamed, and boxed: a stream that maps with
    // a closure borrowing `store` defeats the proof that a spawned task
    // holding it is Send.
    let removals: Vec<BoxFuture<'_, anyhow::Result<()>>> = runs
        .iter()
        .map(|(_, run)| -> BoxFuture<'_, anyhow::Result<()>> {
            Box::pin(async move {
                store
                    .delete_manifest(run)
                    .await
                    .with_context(|| format!("remove trace run {run:?}"))
            })
        })
        .collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(removals)
        .buffer_unordered(REMOVALS_IN_FLIGHT)
        .collect()
        .await;
    let removed = results.iter().filter(|r| r.is_ok()).count();
    (
        removed,
        results.into_iter().filter_map(Result::err).collect(),
    )
}
