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
use tokio::task::JoinHandle;

use super::device::{
    daemonize, ensure_run_dir, list_devices, serve_device, AddArgs, Detach, DeviceSpec, Frontend,
};
use super::trace::TraceArgs;
use super::{HostCacheArgs, ImageArgs, StoreArgs};
use crate::daemon::{DeviceState, FrontendKind, UblkRecord};
use crate::engine::Engine;
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

pub(super) async fn serve_add(args: &AddArgs) -> anyhow::Result<()> {
    let start = Start::Add(DeviceOptions {
        id: args.id,
        queues: args.queues.unwrap_or_else(ublk::default_queues),
        depth: args.depth,
        recoverable: args.recoverable,
        zero_copy: !args.no_zero_copy,
    });
    let spec = DeviceSpec {
        // The kernel hides the death of a recoverable device's process from
        // its users, so nothing they saw acknowledged may go with it.
        changes_outlive_process: args.recoverable,
        ..args.device_spec()
    };
    serve(spec, start).await
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
    let spec = DeviceSpec {
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
        replaces: Some(orphan.record.pid),
        changes_outlive_process: true,
    };
    runtime.block_on(serve(spec, Start::Recover { id: args.id }))
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

/// A live ublk device, served by the blocking task `device`.
struct Live {
    info: DeviceInfo,
    record: UblkRecord,
    engine: Arc<Engine>,
    device: JoinHandle<Result<(), ublk::UblkFrontendError>>,
}

#[async_trait]
impl Frontend for Live {
    type Detach = UblkDevice;
    const KIND: FrontendKind = FrontendKind::Ublk;

    fn target(&self) -> PathBuf {
        self.info.path.clone()
    }

    fn ready(&self) -> String {
        format!("{} id {}", self.info.path.display(), self.info.id)
    }

    fn detacher(&self) -> UblkDevice {
        UblkDevice(self.info.id)
    }

    fn ublk_record(&self) -> Option<UblkRecord> {
        Some(self.record.clone())
    }

    /// Flushes first, as a stop would: the device was live, and may have
    /// been written.
    async fn abandon(self) {
        self.engine.stop_prefetch();
        let _ = self.engine.checkpoint().await;
        let _ = UblkDevice(self.info.id).detach(true).await;
        let _ = self.device.await;
    }

    async fn serve(self) -> anyhow::Result<()> {
        Ok(self.device.await.context("ublk device task")??)
    }
}

async fn serve(spec: DeviceSpec, start: Start) -> anyhow::Result<()> {
    serve_device(&spec, None, |engine| async {
        let (live_tx, live_rx) = tokio::sync::oneshot::channel::<DeviceInfo>();
        let runtime = tokio::runtime::Handle::current();
        let device_engine = engine.clone();
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
            bail!("the ublk device stopped before it was live");
        };
        tracing::info!(
            name = spec.image.name,
            path = %info.path.display(),
            queues = info.queues,
            depth = info.depth,
            mode = %info.mode,
            "device live"
        );
        Ok(Live {
            record: ublk_record(&spec, &info),
            info,
            engine,
            device,
        })
    })
    .await
}

/// What `recover` needs to serve the device again.
fn ublk_record(spec: &DeviceSpec, info: &DeviceInfo) -> UblkRecord {
    let absolute = |path: &PathBuf| std::path::absolute(path).unwrap_or(path.clone());
    let store = &spec.image.store;
    UblkRecord {
        id: info.id,
        queues: info.queues,
        depth: info.depth,
        recoverable: info.recoverable,
        copy_mode: info.mode,
        store_spec: store.origin().to_owned(),
        stores: store.specs.clone(),
        host_cache: spec.host_cache.host_cache.as_ref().map(absolute),
        host_cache_size: spec.host_cache.host_cache_size,
        token_file: store.token_file.as_ref().map(absolute),
        http2_prior_knowledge: store.http2_prior_knowledge,
        tls_ca: store.tls_ca.as_ref().map(absolute),
        s3_endpoint: store.s3_endpoint.clone(),
        s3_path_style: store.s3_path_style,
        ec_cache: store.ec_cache.clone(),
        ec_shards: store.ec_cache.as_ref().map(|_| store.ec_shards),
        metrics: spec.metrics,
        key: absolute(&spec.image.key),
        readahead_chunks: spec.readahead_chunks,
        fetch_timeout_secs: spec.fetch_timeout,
        flags: info.flags,
    }
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
