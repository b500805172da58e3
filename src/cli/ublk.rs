//! `add` (without `--fuse`), `recover` and `features`: the device process
//! of a ublk device and what the kernel's driver offers.
//!
//! The device process runs [`ublk::serve`] on a blocking thread (it spawns
//! the queue threads and blocks until they stop); fetches, the control
//! socket and checkpoints run on the tokio runtime. Its record carries
//! everything `recover` needs to serve the device again if it dies.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use async_trait::async_trait;
use clap::Args;
use tokio::net::UnixListener;

use super::device::{
    daemonize, engine_options, ensure_run_dir, list_devices, open_engine, say_ready, serve_metrics,
    serve_until_stopped, AddArgs, Detach, EngineControl, Opened,
};
use super::trace::TraceArgs;
use super::{HostCacheArgs, ImageArgs, StoreArgs};
use crate::daemon::{self, DeviceControl, DeviceRecord, DeviceState, FrontendKind, UblkRecord};
use crate::frontend::ublk::{self, DeviceInfo, DeviceOptions, Start};

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The orphaned ublk device to serve again (/dev/ublkbID).
    #[arg(short = 'n', long = "number", value_name = "ID")]
    pub id: u32,
    /// Stay in the foreground instead of returning once the device is live.
    #[arg(long)]
    pub foreground: bool,
}

/// What a device process serves, whether it adds or recovers the device.
struct Spec {
    image: ImageArgs,
    host_cache: HostCacheArgs,
    cache_dir: PathBuf,
    read_only: bool,
    readahead_chunks: u32,
    fetch_timeout: f64,
    metrics: Option<std::net::SocketAddr>,
    trace: TraceArgs,
    start: Start,
    /// The record of the process that died, replaced once the device is live.
    replaces: Option<u32>,
}

pub(super) async fn serve_add(args: &AddArgs) -> anyhow::Result<()> {
    serve(Spec {
        image: args.image.clone(),
        host_cache: args.host_cache.clone(),
        cache_dir: args.cache_dir.clone(),
        read_only: args.read_only,
        readahead_chunks: args.readahead_chunks,
        fetch_timeout: args.fetch_timeout,
        metrics: args.metrics,
        trace: args.trace.clone(),
        start: Start::Add(DeviceOptions {
            id: args.id,
            queues: args.queues.unwrap_or_else(ublk::default_queues),
            depth: args.depth,
            recoverable: args.recoverable,
            zero_copy: !args.no_zero_copy,
        }),
        replaces: None,
    })
    .await
}

pub fn recover(args: RecoverArgs) -> anyhow::Result<()> {
    ublk::require_driver()?;
    if args.foreground {
        // Before the runtime starts any thread.
        ublk::isolate_mounts()?;
    }
    let runtime = super::runtime()?;
    let run_dir = ensure_run_dir()?;
    let orphan = runtime
        .block_on(list_devices(&run_dir))?
        .into_iter()
        .find(|d| d.record.ublk.as_ref().is_some_and(|u| u.id == args.id));
    let Some(orphan) = orphan else {
        bail!(
            "no record of ublk device {} in {}: only devices added by lazyblk can be recovered",
            args.id,
            run_dir.display()
        );
    };
    if orphan.state == DeviceState::Live {
        bail!(
            "ublk device {} is served by process {}: nothing to recover",
            args.id,
            orphan.record.pid
        );
    }
    let ublk = match (orphan.record.frontend, orphan.record.ublk.clone()) {
        (FrontendKind::Ublk, Some(ublk)) => ublk,
        (FrontendKind::Ublk, None) => {
            bail!("the record of device {} names no ublk device", args.id)
        }
        (other @ (FrontendKind::Fuse | FrontendKind::VhostUserBlk | FrontendKind::Nbd), _) => {
            bail!(
                "device {} is served through {other}: only ublk devices can be recovered",
                orphan.record.pid
            )
        }
    };
    if !ublk.recoverable {
        bail!(
            "ublk device {} was not added with --recoverable; remove it with `lazyblk del -n {}`",
            args.id,
            args.id
        );
    }
    if !args.foreground {
        return daemonize(&orphan.record.cache_dir);
    }
    runtime.block_on(serve(Spec {
        image: ImageArgs {
            store: StoreArgs {
                specs: ublk.store_specs(),
                token_file: ublk.token_file.clone(),
                http2_prior_knowledge: ublk.http2_prior_knowledge,
                tls_ca: ublk.tls_ca.clone(),
                s3_endpoint: ublk.s3_endpoint.clone(),
                s3_path_style: ublk.s3_path_style,
                ec_cache: ublk.ec_cache.clone(),
                ec_shards: ublk.ec_shards.unwrap_or_default(),
            },
            key: ublk.key.clone(),
            name: orphan.record.name.clone(),
        },
        host_cache: HostCacheArgs {
            host_cache: ublk.host_cache.clone(),
            host_cache_size: ublk.host_cache_size,
        },
        cache_dir: orphan.record.cache_dir.clone(),
        read_only: orphan.record.read_only,
        readahead_chunks: ublk.readahead_chunks,
        fetch_timeout: ublk.fetch_timeout_secs,
        metrics: ublk.metrics,
        // The cache holds what the device read before it died: no
        // prefetch, and no run recorded from a device that started midway.
        trace: TraceArgs {
            no_prefetch: true,
            ..TraceArgs::default()
        },
        start: Start::Recover { id: args.id },
        replaces: Some(orphan.record.pid),
    }))
}

/// A ublk device by its id, as the control socket stops it.
struct UblkDevice(u32);

#[async_trait]
impl Detach for UblkDevice {
    async fn detach(&self, force: bool) -> Result<(), String> {
        let id = self.0;
        tokio::task::spawn_blocking(move || ublk::stop(id, force))
            .await
            .map_err(|e| format!("stop task: {e}"))?
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
    }
}

async fn serve(spec: Spec) -> anyhow::Result<()> {
    let Opened {
        engine,
        store,
        recorder,
    } = open_engine(
        &spec.image,
        &spec.host_cache,
        &spec.cache_dir,
        engine_options(spec.read_only, spec.readahead_chunks, spec.fetch_timeout),
        &spec.trace,
    )
    .await?;
    let metrics = serve_metrics(&engine, &store, &spec.image.name, spec.metrics).await?;
    let run_dir = ensure_run_dir()?;
    let pid = std::process::id();
    let socket = DeviceRecord::socket_path(&run_dir, pid);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("bind {}", socket.display()))?;

    let (live_tx, live_rx) = tokio::sync::oneshot::channel::<DeviceInfo>();
    let runtime = tokio::runtime::Handle::current();
    let device_engine = engine.clone();
    let start = spec.start;
    let mut device = tokio::task::spawn_blocking(move || {
        ublk::serve(device_engine, runtime, start, move |info| {
            let _ = live_tx.send(info);
        })
    });
    let info = tokio::select! {
        info = live_rx => info.ok(),
        ended = &mut device => {
            ended.context("ublk device task")??;
            None
        }
    };
    let Some(info) = info else {
        let _ = std::fs::remove_file(&socket);
        bail!("the ublk device stopped before it was live");
    };

    let record = DeviceRecord {
        pid,
        frontend: FrontendKind::Ublk,
        target: info.path.clone(),
        name: spec.image.name.clone(),
        store: store.describe(),
        cache_dir: std::path::absolute(&spec.cache_dir).unwrap_or(spec.cache_dir.clone()),
        read_only: spec.read_only,
        metrics,
        ublk: Some(UblkRecord {
            id: info.id,
            queues: info.queues,
            depth: info.depth,
            recoverable: info.recoverable,
            copy_mode: info.mode,
            store_spec: spec.image.store.origin().to_owned(),
            stores: spec.image.store.specs.clone(),
            host_cache: spec
                .host_cache
                .host_cache
                .as_ref()
                .map(|path| std::path::absolute(path).unwrap_or(path.clone())),
            host_cache_size: spec.host_cache.host_cache_size,
            token_file: spec
                .image
                .store
                .token_file
                .as_ref()
                .map(|path| std::path::absolute(path).unwrap_or(path.clone())),
            http2_prior_knowledge: spec.image.store.http2_prior_knowledge,
            tls_ca: spec
                .image
                .store
                .tls_ca
                .as_ref()
                .map(|path| std::path::absolute(path).unwrap_or(path.clone())),
            s3_endpoint: spec.image.store.s3_endpoint.clone(),
            s3_path_style: spec.image.store.s3_path_style,
            ec_cache: spec.image.store.ec_cache.clone(),
            ec_shards: spec
                .image
                .store
                .ec_cache
                .as_ref()
                .map(|_| spec.image.store.ec_shards),
            metrics: spec.metrics,
            key: std::path::absolute(&spec.image.key).unwrap_or(spec.image.key.clone()),
            readahead_chunks: spec.readahead_chunks,
            fetch_timeout_secs: spec.fetch_timeout,
            flags: info.flags,
        }),
    };
    let control = Arc::new(EngineControl {
        engine: engine.clone(),
        store: store.clone(),
        frontend: UblkDevice(info.id),
    });
    if let Err(e) = record.publish(&run_dir) {
        // Without a record no one could find the device: take it down.
        let _ = control.stop(true).await;
        let _ = device.await;
        DeviceRecord::remove(&run_dir, pid);
        return Err(e).with_context(|| format!("write device record in {}", run_dir.display()));
    }
    if let Some(old) = spec.replaces {
        DeviceRecord::remove(&run_dir, old);
    }
    let control_task = tokio::spawn(daemon::serve_control(listener, control.clone()));
    tracing::info!(
        name = spec.image.name,
        path = %info.path.display(),
        queues = info.queues,
        depth = info.depth,
        mode = %info.mode,
        "device live"
    );
    say_ready(&format!("{} id {}", info.path.display(), info.id))?;

    let (ended, flushed) = serve_until_stopped(
        &engine,
        recorder.as_ref(),
        control,
        control_task,
        &run_dir,
        &mut device,
    )
    .await?;
    ended.context("ublk device task")??;
    flushed.context("final flush")?;
    Ok(())
}

pub fn features(json: bool) -> anyhow::Result<()> {
    let features = ublk::features()?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&features)?);
        return Ok(());
    }
    let auto_buf_reg = features
        .iter()
        .any(|f| f.name == "AUTO_BUF_REG" && f.supported);
    for f in features {
        outln!(
            "{:<24} {:<3} (since {:<5}) {}",
            f.name,
            if f.supported { "yes" } else { "no" },
            f.since,
            f.what
        );
    }
    let mode = if auto_buf_reg {
        ublk::CopyMode::ZeroCopy
    } else {
        ublk::CopyMode::Copy
    };
    outln!("a new device runs in {mode} mode (`add --no-zero-copy` keeps it in copy mode)");
    Ok(())
}
