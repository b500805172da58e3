//! Access traces from the command line: `add --record-trace` stores a run
//! when the device is removed, `add` prefetches what the stored runs agree
//! on, `trace merge` and `trace show` look after them.
//!
//! How a trace is kept in a store, a merged object and one object per
//! recorded run, is [`stored`]'s business. `add` prefetches the majority
//! merge of the newest [`MAX_TRACE_RUNS`] runs, so one recorded start is
//! enough, and more starts make the plan sturdier.

mod stored;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::keys::load_key;
use super::ImageArgs;
use crate::chunk::{
    manifest_digest, merge_trace_runs, ChunkId, TenantKey, Trace, TraceRun,
    DEFAULT_MERGE_THRESHOLD, MAX_TRACE_RUNS,
};
use crate::engine::{Engine, DEFAULT_PREFETCH_CHUNKS};
use crate::store::{trace_name, ChunkStore};
use stored::{load, record_run, remove_runs, save};

/// What `add` does with access traces.
#[derive(Debug, Clone, Default, Args)]
pub struct TraceArgs {
    /// Record the order in which readers first read each chunk and, when
    /// the device is removed (`del`, SIGTERM), add that run to the image's
    /// trace in the store (NAME.trace, sealed with the tenant key), where
    /// the next `add` finds it. Should the store refuse the run, `del`
    /// says so and fails once the device is gone.
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
    /// it), in their median first-access order. The image's run objects it
    /// folded are then removed from the store.
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

/// Starts prefetching what the image's stored trace names, unless told
/// not to. A trace of another image is refused
/// with an error (`--no-prefetch` attaches without it). Stale run objects
/// the reading found are removed in the background.
pub(super) async fn start_prefetch(
    engine: &Arc<Engine>,
    store: &Arc<dyn ChunkStore>,
    image: &ImageArgs,
    tenant: &TenantKey,
    digest: &[u8; 32],
    args: &TraceArgs,
) -> anyhow::Result<()> {
    if args.no_prefetch {
        return Ok(());
    }
    let hint = "(--no-prefetch attaches without it; `trace merge` replaces it)";
    let stored = load(&**store, &image.name, tenant)
        .await
        .map_err(|e| e.context(hint))?;
    remove_stale_in_background(store, stored.stale);
    let Some(trace) = stored.trace else {
        return Ok(());
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

/// Removes run objects no reader takes, without holding up the start. A
/// store that refuses (a chunk server without the write token) only costs
/// their space until a `trace merge` with the token.
fn remove_stale_in_background(store: &Arc<dyn ChunkStore>, stale: Vec<stored::RunObject>) {
    if stale.is_empty() {
        return;
    }
    let store = Arc::clone(store);
    tokio::spawn(async move {
        let (removed, failed) = remove_runs(&*store, &stale).await;
        match failed.first() {
            None => tracing::info!(removed, "removed stale trace runs"),
            Some(e) => tracing::info!(
                removed,
                left = failed.len(),
                "stale trace runs left in the store (`trace merge` removes them): {e:#}"
            ),
        }
    });
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
    let folded = fold(&*store, &tenant, name, &args.from, args.threshold).await?;
    outln!(
        "merged {} runs into {:?}: kept {} of {} chunks read by more than {} of them; \
         removed {} of {} run objects folded",
        folded.runs,
        trace_name(name),
        folded.kept,
        folded.distinct,
        args.threshold,
        folded.removed,
        folded.objects
    );
    if let Some(first) = folded.failed.into_iter().next() {
        return Err(left_behind(folded.objects - folded.removed, first));
    }
    Ok(())
}

/// The error of a merge that left `left` folded run objects in the store,
/// the first failure to remove one being `first`.
fn left_behind(left: usize, first: anyhow::Error) -> anyhow::Error {
    let unsupported = first.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::Unsupported)
    });
    let after = if unsupported {
        "the store does not support removing manifests, so they stay"
    } else {
        "the next merge removes them"
    };
    first.context(format!(
        "{left} folded run objects are left in the store; readers skip them and {after}"
    ))
}

/// What [`fold`] did.
#[derive(Debug)]
struct Folded {
    /// Runs merged.
    runs: usize,
    /// Chunks the merged run keeps, of the `distinct` chunks the runs read.
    kept: usize,
    distinct: usize,
    /// Run objects of the image the merged trace stands for, and how many
    /// of them were removed; `failed` says why the others were not.
    objects: usize,
    removed: usize,
    failed: Vec<anyhow::Error>,
}

/// Replaces image `name`'s trace by the merge of its runs and those of the
/// images `from`, and removes the run objects of `name` it folded.
async fn fold(
    store: &dyn ChunkStore,
    tenant: &TenantKey,
    name: &str,
    from: &[String],
    threshold: f64,
) -> anyhow::Result<Folded> {
    let digest = digest_of(store, name).await?;
    let own = load(store, name, tenant).await?;
    let mut runs: Vec<TraceRun> = own.trace.map(|t| t.runs).unwrap_or_default();
    for source in from {
        match load(store, source, tenant).await?.trace {
            Some(trace) => runs.extend(trace.runs),
            None => bail!("image {source:?} has no trace ({:?})", trace_name(source)),
        }
    }
    if runs.is_empty() {
        bail!("there are no runs to merge: {name:?} has no trace and no other was named");
    }
    let lists: Vec<&[ChunkId]> = runs.iter().map(|r| &r.ids[..]).collect();
    let merged = merge_trace_runs(&lists, threshold);
    let distinct: std::collections::HashSet<&ChunkId> = lists.iter().flat_map(|r| *r).collect();
    // Only this image's own run objects are folded: those of the images
    // named after it keep serving their own image.
    let folded: Vec<stored::RunObject> = own.read.into_iter().chain(own.stale).collect();
    let trace = Trace {
        image: name.to_owned(),
        runs: vec![TraceRun {
            manifest_digest: digest,
            recorded_at: now(),
            ids: merged,
        }],
        folded: Some(folded.iter().map(|(stamp, _)| *stamp).collect()),
    };
    // The merged trace names what it folded before any of it goes, so a
    // merge stopped midway leaves readers a whole trace, and no run twice.
    save(store, &trace, tenant).await?;
    let (removed, failed) = remove_runs(store, &folded).await;
    Ok(Folded {
        runs: runs.len(),
        kept: trace.runs[0].ids.len(),
        distinct: distinct.len(),
        objects: folded.len(),
        removed,
        failed,
    })
}

#[derive(serde::Serialize)]
struct Shown {
    trace: String,
    image: String,
    runs: Vec<ShownRun>,
    /// Chunk ids `add` would prefetch (the majority merge), in order.
    prefetch: Vec<String>,
    max_runs: usize,
    /// Run objects read beside the merged trace.
    run_objects: usize,
    /// Run objects no reader takes any more (`trace merge` removes them).
    stale_run_objects: usize,
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
    let stored = load(&*store, &image.name, &tenant).await?;
    let Some(trace) = stored.trace else {
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
        run_objects: stored.read.len(),
        stale_run_objects: stored.stale.len(),
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    outln!(
        "{} (image {:?}): {} runs ({} stored alone, {} stale), {} chunks to prefetch",
        shown.trace,
        shown.image,
        shown.runs.len(),
        shown.run_objects,
        shown.stale_run_objects,
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
