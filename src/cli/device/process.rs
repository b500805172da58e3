//! The device process, whatever its frontend: opens the engine, sets the
//! frontend up, publishes the device's record, serves until stopped and
//! checkpoints meanwhile ([`serve_device`]). `add` and `recover` start it;
//! `fuse.rs`, `nbd.rs`, `ublk.rs` and `vhost_user.rs` give it a frontend.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;

use super::{ensure_run_dir, list_devices, READY_WORD};
use crate::chunk::{manifest_digest, Manifest};
use crate::cli::keys::load_key;
use crate::cli::trace::{start_prefetch, Recorder, TraceArgs};
use crate::cli::{tiers, HostCacheArgs, ImageArgs};
use crate::daemon::{self, DeviceRecord, FrontendKind, StopReport, UblkRecord};
use crate::engine::{Engine, EngineOptions, EngineStats, FetchPolicy};
use crate::store::ChunkStore;

/// How often fetched chunks are recorded in the cache's bitmap, bounding
/// what a crash makes the device fetch again.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stopping device tries to store its recorded trace run. Well
/// under [`super::EXIT_TIMEOUT`]: the store's own retries may take minutes, and
/// `del` must still see the device exit and pass on why the run was lost,
/// not give up waiting with the store's error unsaid.
const TRACE_SAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Tells the parent `add` (or a user in the foreground) that the device is
/// live and where.
fn say_ready(what: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{READY_WORD} {what}").and_then(|()| stdout.flush())?;
    Ok(())
}

/// The engine options of a device with these settings.
fn engine_options(
    read_only: bool,
    readahead_chunks: u32,
    fetch_timeout_secs: f64,
) -> EngineOptions {
    EngineOptions {
        read_only,
        readahead_chunks,
        fetch: FetchPolicy {
            deadline: Duration::from_secs_f64(fetch_timeout_secs),
            ..FetchPolicy::default()
        },
        ..EngineOptions::default()
    }
}

/// Starts the device's metrics endpoint, if one was asked for, and says
/// where it listens.
async fn serve_metrics(
    engine: &Arc<Engine>,
    store: &Arc<dyn ChunkStore>,
    name: &str,
    addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let bound = crate::daemon::metrics::serve(engine, Arc::clone(store), name, addr)
        .await
        .with_context(|| format!("serve metrics on {addr}"))?;
    tracing::info!(%bound, "metrics at http://{bound}/metrics");
    Ok(Some(bound))
}

/// An opened device engine, its store, and what it records.
struct Opened {
    pub engine: Arc<Engine>,
    pub store: Arc<dyn ChunkStore>,
    /// Stores the recorded trace run when the device stops
    /// (`--record-trace`).
    pub recorder: Option<Recorder>,
}

/// Opens the image's manifest and cache for serving and starts prefetching
/// from its trace (unless `trace` says not to).
async fn open_engine(
    image: &ImageArgs,
    host_cache: &HostCacheArgs,
    cache_dir: &Path,
    mut opts: EngineOptions,
    trace: &TraceArgs,
) -> anyhow::Result<Opened> {
    let tenant = load_key(&image.key)?;
    let store = tiers::open(&image.store, host_cache)?.store;
    let name = &image.name;
    let sealed = store.get_manifest(name).await?;
    let manifest = Manifest::open(name, &sealed, &tenant)?;
    let (runtime, engine_store, dir) = (
        tokio::runtime::Handle::current(),
        store.clone(),
        cache_dir.to_owned(),
    );
    let digest = manifest_digest(&sealed);
    opts.record_trace = trace.record_trace;
    opts.prefetch_chunks = trace.prefetch_chunks;
    let engine = tokio::task::spawn_blocking(move || {
        Engine::open(manifest, digest, engine_store, &dir, opts, runtime)
    })
    .await?
    .with_context(|| format!("open cache {}", cache_dir.display()))?;
    start_prefetch(&engine, &store, image, &tenant, &digest, trace).await?;
    let recorder = trace.record_trace.then(|| Recorder {
        store: store.clone(),
        image: name.clone(),
        tenant,
        digest,
    });
    Ok(Opened {
        engine,
        store,
        recorder,
    })
}

/// What a device process serves, whatever its frontend: the image, where
/// it is cached, and the engine's settings.
#[derive(Debug, Clone)]
pub(in crate::cli) struct DeviceSpec {
    pub image: ImageArgs,
    pub host_cache: HostCacheArgs,
    pub cache_dir: PathBuf,
    pub read_only: bool,
    pub readahead_chunks: u32,
    pub fetch_timeout: f64,
    pub metrics: Option<std::net::SocketAddr>,
    pub trace: TraceArgs,
    /// The record of a process that died, replaced once the device is live.
    pub replaces: Option<u32>,
    /// [`EngineOptions::changes_outlive_process`].
    pub changes_outlive_process: bool,
}

/// A frontend a device process has set up (mounted, bound, started) but
/// not yet served from: what [`serve_device`] needs of each.
#[async_trait]
pub(in crate::cli) trait Frontend: Send + Sized + 'static {
    /// How the control socket takes the frontend down.
    type Detach: Detach + 'static;
    const KIND: FrontendKind;
    /// Where users find the device: the target of its record.
    fn target(&self) -> PathBuf;
    /// What `add` prints once the device is ready.
    fn ready(&self) -> String;
    fn detacher(&self) -> Self::Detach;
    /// The ublk part of the device record.
    fn ublk_record(&self) -> Option<UblkRecord> {
        None
    }
    /// Takes the frontend down when its device cannot be published: no one
    /// could find it.
    async fn abandon(self);
    /// Serves until detached (or until the frontend ends by itself).
    async fn serve(self) -> anyhow::Result<()>;
}

/// The device process, whatever its frontend: opens the engine, makes sure
/// no other device serves `claims`, binds the control socket, sets the
/// frontend up with `start`, publishes the device record, says it is ready
/// and serves until stopped (see [`serve_until_stopped`]).
pub(in crate::cli) async fn serve_device<F, Start, Started>(
    spec: &DeviceSpec,
    claims: Option<&Path>,
    start: Start,
) -> anyhow::Result<()>
where
    F: Frontend,
    Start: FnOnce(Arc<Engine>) -> Started,
    Started: std::future::Future<Output = anyhow::Result<F>>,
{
    let Opened {
        engine,
        store,
        recorder,
    } = open_engine(
        &spec.image,
        &spec.host_cache,
        &spec.cache_dir,
        EngineOptions {
            changes_outlive_process: spec.changes_outlive_process,
            ..engine_options(spec.read_only, spec.readahead_chunks, spec.fetch_timeout)
        },
        &spec.trace,
    )
    .await?;
    let name = &spec.image.name;

    // Everything that can fail comes before the frontend starts, so a
    // failed start leaves no mount or listener behind, and no socket is
    // taken from a live device.
    let run_dir = ensure_run_dir()?;
    if let Some(claims) = claims {
        if let Some(other) = list_devices(&run_dir)
            .await?
            .into_iter()
            .find(|d| d.record.target == claims)
        {
            bail!(
                "device {} already serves {:?} at {}",
                other.record.pid,
                other.record.name,
                claims.display()
            );
        }
    }
    let pid = std::process::id();
    let socket = DeviceRecord::socket_path(&run_dir, pid);
    let control_listener =
        crate::socket::bind_replacing_stale(&socket, tokio::net::UnixListener::bind)
            .with_context(|| format!("bind {}", socket.display()))?;
    let started = match serve_metrics(&engine, &store, name, spec.metrics).await {
        Ok(metrics) => start(engine.clone()).await.map(|f| (metrics, f)),
        Err(e) => Err(e),
    };
    let (metrics, frontend) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let target = frontend.target();
    let record = DeviceRecord {
        pid,
        frontend: F::KIND,
        target: target.clone(),
        name: name.clone(),
        store: store.describe(),
        cache_dir: std::path::absolute(&spec.cache_dir).unwrap_or(spec.cache_dir.clone()),
        read_only: spec.read_only,
        metrics,
        ublk: frontend.ublk_record(),
    };
    // A report left by an earlier process with this pid is not ours.
    StopReport::clear(&run_dir, pid);
    if let Err(e) = record.publish(&run_dir) {
        frontend.abandon().await;
        DeviceRecord::remove(&run_dir, pid);
        return Err(e).with_context(|| format!("write device record in {}", run_dir.display()));
    }
    if let Some(old) = spec.replaces {
        DeviceRecord::remove(&run_dir, old);
    }
    let control = Arc::new(EngineControl {
        engine: engine.clone(),
        store: store.clone(),
        frontend: frontend.detacher(),
    });
    let control_task = tokio::spawn(daemon::serve_control(control_listener, control.clone()));
    tracing::info!(name, target = %target.display(), "device ready");
    say_ready(&frontend.ready())?;

    let (served, flushed) = serve_until_stopped(
        &engine,
        recorder.as_ref(),
        control,
        control_task,
        &run_dir,
        frontend.serve(),
    )
    .await?;
    served?;
    flushed.context("final flush")?;
    Ok(())
}

/// How a device process takes its frontend down; `force` detaches even a
/// device in use, where the frontend can tell.
#[async_trait]
pub(in crate::cli) trait Detach: Send + Sync {
    async fn detach(&self, force: bool) -> Result<(), String>;
}

/// Glue between the control socket and a device: its stats are the
/// engine's; stopping flushes the engine first, so no acknowledged write is
/// lost, then detaches the frontend.
pub(in crate::cli) struct EngineControl<F> {
    pub engine: Arc<Engine>,
    /// The engine's store, for its per-tier counters.
    pub store: Arc<dyn ChunkStore>,
    pub frontend: F,
}

#[async_trait]
impl<F: Detach> daemon::DeviceControl for EngineControl<F> {
    fn stats(&self) -> EngineStats {
        EngineStats {
            tiers: self.store.tier_stats(),
            ..self.engine.stats()
        }
    }

    async fn stop(&self, force: bool) -> Result<(), String> {
        self.engine.stop_prefetch();
        self.engine
            .checkpoint()
            .await
            .map_err(|e| format!("flush: {e}"))?;
        self.frontend.detach(force).await
    }
}

/// Serves until `device` (the frontend's session) ends, checkpointing
/// meanwhile. SIGTERM or Ctrl-C asks `control` to stop the device, which it
/// may refuse while the device is in use (it then keeps serving). Afterwards
/// the control socket and checkpoints end, the engine is flushed, a
/// recording device stores its trace run (a failure is left in a
/// [`StopReport`] for `del`), and the device record is removed.
/// Returns what `device` returned and the final flush's result.
async fn serve_until_stopped<T>(
    engine: &Arc<Engine>,
    recorder: Option<&Recorder>,
    control: Arc<dyn daemon::DeviceControl>,
    control_task: tokio::task::JoinHandle<()>,
    run_dir: &Path,
    device: impl std::future::Future<Output = T>,
) -> anyhow::Result<(T, Result<(), crate::engine::EngineError>)> {
    let checkpoints = tokio::spawn(checkpoint_every(engine.clone()));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::pin!(device);
    let ended = loop {
        tokio::select! {
            ended = &mut device => break ended,
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received: flushing and stopping");
        if let Err(e) = control.stop(false).await {
            tracing::error!("cannot stop yet: {e}");
        }
    };
    control_task.abort();
    checkpoints.abort();
    engine.stop_prefetch();
    let flushed = engine.checkpoint().await;
    if let Some(recorder) = recorder {
        // A lost run costs a later start its prefetch, never data: say so
        // (the user asked for the run, so to `del` too) and carry on
        // stopping.
        let saved = tokio::time::timeout(TRACE_SAVE_TIMEOUT, recorder.save(engine))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the store did not take it within {} s",
                    TRACE_SAVE_TIMEOUT.as_secs()
                ))
            });
        if let Err(e) = saved {
            tracing::error!("record the trace run: {e:#}");
            let report = StopReport {
                name: recorder.image.clone(),
                trace_error: format!("{e:#}"),
            };
            if let Err(e) = report.publish(run_dir, std::process::id()) {
                tracing::error!("leave the stop report in {}: {e}", run_dir.display());
            }
        }
    }
    DeviceRecord::remove(run_dir, std::process::id());
    tracing::info!(stats = ?engine.stats(), "device stopped");
    Ok((ended, flushed))
}

async fn checkpoint_every(engine: Arc<Engine>) {
    let mut ticks = tokio::time::interval(CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = engine.checkpoint().await {
            tracing::warn!("checkpoint of the cache: {e}");
        }
    }
}
