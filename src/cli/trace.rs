//! Access traces from the command line: `add --record-trace` stores a run
//! when the device is removed, `add` prefetches what the stored runs agree
//! on, `trace merge` and `trace show` look after them.
//!
//! A manifest's trace lives in the store beside it, sealed with the tenant
//! key: [`trace_name`]`(NAME)` holds what `trace merge` wrote, and each
//! recording device stores its run in an object of its own,
//! [`trace_run_name`]. Stores have no compare-and-swap, so a shared object
//! that every recorder read, extended and wrote back would lose a run
//! whenever two devices stopped at once; runs are merged on read instead.
//! Reading takes the runs recorded after the newest run of `NAME.trace`
//! (a merge folds the older ones in), the newest [`MAX_TRACE_RUNS`] in
//! all; `add` prefetches the majority merge of them, so one recorded
//! start is enough, and more starts make the plan sturdier.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};

use super::keys::load_key;
use super::ImageArgs;
use crate::chunk::{
    manifest_digest, merge_trace_runs, ChunkId, TenantKey, Trace, TraceRun,
    DEFAULT_MERGE_THRESHOLD, MAX_TRACE_RUNS,
};
use crate::engine::{Engine, DEFAULT_PREFETCH_CHUNKS};
use crate::store::{trace_name, trace_run_name, trace_run_time, ChunkStore, StoreError};

/// What `add` does with access traces.
#[derive(Debug, Clone, Default, Args)]
pub struct TraceArgs {
    /// Record the order in which readers first read each chunk and, when
    /// the device is removed (`del`, SIGTERM), add that run to the image's
    /// trace in the store (NAME.trace, sealed with the tenant key), where
    /// the next `add` finds it.
    #[arg(long)]
    pub record_trace: bool,
    /// Do not prefetch the chunks the image's trace names.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Most prefetch fetches in flight at once (they always yield to
    /// demand reads and readahead).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PREFETCH_CHUNKS, value_parser = parse_prefetch_chunks)]
    pub prefetch_chunks: usize,
}

fn parse_prefetch_chunks(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number from 1 to 1024")),
    }
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Replace an image's trace by one run: the chunks read by more than
    /// THRESHOLD of its runs (and of the runs of the images named after
    /// it), in their median first-access order.
    Merge(MergeArgs),
    /// Print an image's trace: its runs and what `add` would prefetch.
    Show {
        #[command(flatten)]
        image: ImageArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Keep a chunk when more than this share of the runs read it (0 keeps
    /// every chunk any run read; 0.5, the default, a strict majority).
    #[arg(long, default_value_t = DEFAULT_MERGE_THRESHOLD, value_parser = parse_threshold)]
    pub threshold: f64,
    /// Other images (e.g. earlier versions) whose recorded runs join the
    /// merge.
    #[arg(value_name = "TRACE")]
    pub from: Vec<String>,
}

fn parse_threshold(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if (0.0..1.0).contains(&t) => Ok(t),
        _ => Err(format!(
            "{text:?} is not a share from 0 up to (not including) 1"
        )),
    }
}

pub async fn run(command: TraceCommand) -> anyhow::Result<()> {
    match command {
        TraceCommand::Merge(args) => merge(args).await,
        TraceCommand::Show { image, json } => show(image, json).await,
    }
}

/// The stored trace of image `name` with its recorded runs, if there is
/// any. An object that does not open (a wrong key, damage) is skipped with
/// a warning: it holds no other run hostage, and the next merge replaces
/// it.
async fn load(
    store: &dyn ChunkStore,
    name: &str,
    tenant: &TenantKey,
) -> anyhow::Result<Option<Trace>> {
    let object = trace_name(name);
    let mut trace = match store.get_manifest(&object).await {
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
    let merged_at = trace
        .as_ref()
        .and_then(|t| t.runs.iter().map(|r| r.recorded_at).max());
    let mut runs: Vec<(u64, String)> = store
        .list_manifests()
        .await
        .with_context(|| format!("list the runs of trace {object:?}"))?
        .into_iter()
        .filter_map(|run| Some((trace_run_time(name, &run)?, run)))
        .filter(|(at, _)| merged_at.is_none_or(|merged| at / 1_000_000_000 > merged))
        .collect();
    runs.sort();
    let newest = &runs[runs.len().saturating_sub(MAX_TRACE_RUNS)..];
    for (_, run) in newest {
        let sealed = match store.get_manifest(run).await {
            Ok(sealed) => sealed,
            Err(e) => return Err(e).with_context(|| format!("fetch trace run {run:?}")),
        };
        match Trace::open(run, &sealed, tenant) {
            Ok(recorded) if recorded.image == name => {
                let trace = trace.get_or_insert_with(|| Trace {
                    image: name.to_owned(),
                    runs: Vec::new(),
                });
                for one in recorded.runs {
                    trace.push_run(one);
                }
            }
            Ok(recorded) => tracing::warn!(
                run,
                "skipping a trace run recorded for image {:?}",
                recorded.image
            ),
            Err(e) => tracing::warn!(run, "skipping a trace run that does not open: {e}"),
        }
    }
    Ok(trace)
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
    let object = trace_run_name(image, stored_at, rand::random());
    let trace = Trace {
        image: image.to_owned(),
        runs: vec![run],
    };
    store
        .put_manifest(&object, Bytes::from(trace.seal(tenant)))
        .await
        .with_context(|| format!("store trace run {object:?}"))?;
    Ok(object)
}

async fn save(store: &dyn ChunkStore, trace: &Trace, tenant: &TenantKey) -> anyhow::Result<()> {
    let object = trace_name(&trace.image);
    store
        .put_manifest(&object, Bytes::from(trace.seal(tenant)))
        .await
        .with_context(|| format!("store trace {object:?}"))
}

/// Starts prefetching what the image's stored trace names, unless told
/// not to. A trace of another image is refused
/// with an error (`--no-prefetch` attaches without it).
pub(super) async fn start_prefetch(
    engine: &Arc<Engine>,
    store: &dyn ChunkStore,
    image: &ImageArgs,
    tenant: &TenantKey,
    digest: &[u8; 32],
    args: &TraceArgs,
) -> anyhow::Result<()> {
    if args.no_prefetch {
        return Ok(());
    }
    let hint = "(--no-prefetch attaches without it; `trace merge` replaces it)";
    let trace = match load(store, &image.name, tenant).await {
        Ok(Some(trace)) => trace,
        Ok(None) => return Ok(()),
        Err(e) => return Err(e.context(hint)),
    };
    let object = trace_name(&image.name);
    let runs = trace.runs_for(&object, &image.name, digest).context(hint)?;
    let ids = merge_trace_runs(&runs, DEFAULT_MERGE_THRESHOLD);
    let planned = engine.prefetch(&ids);
    if !ids.is_empty() && planned == 0 {
        bail!(
            "trace {object:?}: none of its {} chunks is in image {:?}; it belongs to another image {hint}",
            ids.len(),
            image.name
        );
    }
    tracing::info!(
        trace = object,
        runs = runs.len(),
        chunks = ids.len(),
        planned,
        "prefetching from the trace"
    );
    Ok(())
}

/// What a recording device stores when it stops.
pub(super) struct Recorder {
    pub store: Arc<dyn ChunkStore>,
    pub image: String,
    pub tenant: TenantKey,
    pub digest: [u8; 32],
}

impl Recorder {
    /// Stores the engine's recorded run beside the image's trace.
    pub async fn save(&self, engine: &Engine) -> anyhow::Result<()> {
        let Some(ids) = engine.recorded_trace() else {
            return Ok(());
        };
        if ids.is_empty() {
            tracing::info!("nothing was read: no trace run to record");
            return Ok(());
        }
        let chunks = ids.len();
        let run = TraceRun {
            manifest_digest: self.digest,
            recorded_at: now(),
            ids,
        };
        let object = record_run(&*self.store, &self.image, &self.tenant, run).await?;
        tracing::info!(trace = object, chunks, "trace run recorded");
        Ok(())
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The image's manifest digest, to bind the merged run to.
async fn digest_of(store: &dyn ChunkStore, name: &str) -> anyhow::Result<[u8; 32]> {
    let sealed = store
        .get_manifest(name)
        .await
        .with_context(|| format!("fetch manifest {name:?}"))?;
    Ok(manifest_digest(&sealed))
}

async fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let tenant = load_key(&args.image.key)?;
    let store = args.image.store.open()?;
    let name = &args.image.name;
    let digest = digest_of(&*store, name).await?;
    let mut runs: Vec<TraceRun> = Vec::new();
    for source in std::iter::once(name).chain(&args.from) {
        match load(&*store, source, &tenant).await? {
            Some(trace) => runs.extend(trace.runs),
            None if source == name => {}
            None => bail!("image {source:?} has no trace ({:?})", trace_name(source)),
        }
    }
    if runs.is_empty() {
        bail!("there are no runs to merge: {name:?} has no trace and no other was named");
    }
    let lists: Vec<&[ChunkId]> = runs.iter().map(|r| &r.ids[..]).collect();
    let merged = merge_trace_runs(&lists, args.threshold);
    let distinct: std::collections::HashSet<&ChunkId> = lists.iter().flat_map(|r| *r).collect();
    let trace = Trace {
        image: name.clone(),
        runs: vec![TraceRun {
            manifest_digest: digest,
            recorded_at: now(),
            ids: merged,
        }],
    };
    save(&*store, &trace, &tenant).await?;
    outln!(
        "merged {} runs into {:?}: kept {} of {} chunks read by more than {} of them",
        runs.len(),
        trace_name(name),
        trace.runs[0].ids.len(),
        distinct.len(),
        args.threshold
    );
    Ok(())
}

#[derive(serde::Serialize)]
struct Shown {
    trace: String,
    image: String,
    runs: Vec<ShownRun>,
    /// Chunk ids `add` would prefetch (the majority merge), in order.
    prefetch: Vec<String>,
    max_runs: usize,
}

#[derive(serde::Serialize)]
struct ShownRun {
    manifest_digest: String,
    recorded_at: u64,
    chunks: usize,
}

async fn show(image: ImageArgs, json: bool) -> anyhow::Result<()> {
    let tenant = load_key(&image.key)?;
    let store = image.store.open()?;
    let object = trace_name(&image.name);
    let Some(trace) = load(&*store, &image.name, &tenant).await? else {
        bail!("image {:?} has no trace ({object:?})", image.name);
    };
    let lists: Vec<&[ChunkId]> = trace.runs.iter().map(|r| &r.ids[..]).collect();
    let shown = Shown {
        trace: object,
        image: trace.image.clone(),
        runs: trace
            .runs
            .iter()
            .map(|r| ShownRun {
                manifest_digest: hex::encode(r.manifest_digest),
                recorded_at: r.recorded_at,
                chunks: r.ids.len(),
            })
            .collect(),
        prefetch: merge_trace_runs(&lists, DEFAULT_MERGE_THRESHOLD)
            .iter()
            .map(ChunkId::to_hex)
            .collect(),
        max_runs: MAX_TRACE_RUNS,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    outln!(
        "{} (image {:?}): {} runs, {} chunks to prefetch",
        shown.trace,
        shown.image,
        shown.runs.len(),
        shown.prefetch.len()
    );
    for run in &shown.runs {
        outln!(
            "  run recorded at {} on manifest {}: {} chunks",
            run.recorded_at,
            &run.manifest_digest[..16],
            run.chunks
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::dir::DirStore;

    fn run(seed: u8, recorded_at: u64) -> TraceRun {
        TraceRun {
            manifest_digest: [7; 32],
            recorded_at,
            ids: (0..4)
                .map(|i| ChunkId([seed.wrapping_add(i); 32]))
                .collect(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn runs_recorded_at_once_all_survive_and_a_merge_folds_them_in() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(DirStore::open(dir.path()).unwrap());
        let tenant = TenantKey([3; 32]);
        const RECORDERS: u8 = 8;
        let recorders: Vec<_> = (0..RECORDERS)
            .map(|seed| {
                let (store, tenant) = (Arc::clone(&store), tenant.clone());
                tokio::spawn(async move {
                    record_run(
                        &*store,
                        "app",
                        &tenant,
                        run(seed * 16, 1_000 + u64::from(seed)),
                    )
                    .await
                })
            })
            .collect();
        for recorder in recorders {
            recorder.await.unwrap().unwrap();
        }
        let trace = load(&*store, "app", &tenant).await.unwrap().unwrap();
        let mut got: Vec<TraceRun> = trace.runs.clone();
        got.sort_by_key(|r| r.recorded_at);
        let expected: Vec<TraceRun> = (0..RECORDERS)
            .map(|seed| run(seed * 16, 1_000 + u64::from(seed)))
            .collect();
        assert_eq!(got, expected, "a run recorded at the same time was lost");
        // Gc and verify skip every object a trace uses.
        let names = store.list_manifests().await.unwrap();
        assert_eq!(names.len(), usize::from(RECORDERS));
        assert!(names.iter().all(|name| crate::store::is_trace_name(name)));

        // A merge (stored as NAME.trace) replaces the runs recorded before
        // it; a run recorded after it joins it.
        let merged = Trace {
            image: "app".into(),
            runs: vec![run(200, now())],
        };
        save(&*store, &merged, &tenant).await.unwrap();
        assert_eq!(
            load(&*store, "app", &tenant).await.unwrap().unwrap(),
            merged
        );
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        record_run(&*store, "app", &tenant, run(100, now()))
            .await
            .unwrap();
        let trace = load(&*store, "app", &tenant).await.unwrap().unwrap();
        assert_eq!(trace.runs.len(), 2, "{trace:?}");
        assert_eq!(trace.runs[1].ids, run(100, 0).ids);
        // Another image's runs are not this one's.
        assert!(load(&*store, "ap", &tenant).await.unwrap().is_none());
    }
}
