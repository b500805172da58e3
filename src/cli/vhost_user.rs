//! `add --vhost-user-blk` in the foreground: the device process of a disk
//! served to VMs over a vhost-user socket.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use async_trait::async_trait;
use tokio::net::UnixListener;

use super::device::{
    engine_options, ensure_run_dir, list_devices, open_engine, say_ready, serve_metrics,
    serve_until_stopped, AddArgs, Detach, EngineControl, Opened,
};
use crate::daemon::{self, DeviceRecord, FrontendKind};
use crate::frontend::vhost_user::{BlkOptions, VhostUserBlk};

/// Queues when `--queues` is not given: what a VM gets without
/// `num-queues` on QEMU's command line.
const DEFAULT_QUEUES: u16 = 1;

#[async_trait]
impl Detach for Arc<VhostUserBlk> {
    async fn detach(&self, force: bool) -> Result<(), String> {
        self.stop(force)
    }
}

pub(super) async fn serve(args: &AddArgs, socket: &Path) -> anyhow::Result<()> {
    let Opened {
        engine,
        store,
        recorder,
    } = open_engine(
        &args.image,
        &args.host_cache,
        &args.cache_dir,
        engine_options(args.read_only, args.readahead_chunks, args.fetch_timeout),
        &args.trace,
    )
    .await?;
    let name = &args.image.name;
    let socket =
        std::path::absolute(socket).with_context(|| format!("socket {}", socket.display()))?;

    // Before binding, which would take the socket from a live device.
    let run_dir = ensure_run_dir()?;
    if let Some(other) = list_devices(&run_dir)
        .await?
        .into_iter()
        .find(|d| d.record.target == socket)
    {
        bail!(
            "device {} already serves {:?} on {}",
            other.record.pid,
            other.record.name,
            socket.display()
        );
    }
    let pid = std::process::id();
    let control_socket = DeviceRecord::socket_path(&run_dir, pid);
    let _ = std::fs::remove_file(&control_socket);
    let listener = UnixListener::bind(&control_socket)
        .with_context(|| format!("bind {}", control_socket.display()))?;
    let metrics = serve_metrics(&engine, &store, name, args.metrics).await?;
    let device = Arc::new(VhostUserBlk::bind(&socket)?);
    let record = DeviceRecord {
        pid,
        frontend: FrontendKind::VhostUserBlk,
        target: socket.clone(),
        name: name.clone(),
        store: store.describe(),
        cache_dir: std::path::absolute(&args.cache_dir).unwrap_or(args.cache_dir.clone()),
        read_only: args.read_only,
        metrics,
        ublk: None,
    };
    if let Err(e) = record.publish(&run_dir) {
        DeviceRecord::remove(&run_dir, pid);
        return Err(e).with_context(|| format!("write device record in {}", run_dir.display()));
    }
    let control = Arc::new(EngineControl {
        engine: engine.clone(),
        store: store.clone(),
        frontend: device.clone(),
    });
    let control_task = tokio::spawn(daemon::serve_control(listener, control.clone()));
    tracing::info!(name, socket = %socket.display(), "device ready");
    say_ready(&format!("{} ready", socket.display()))?;

    let options = BlkOptions {
        serial: name.clone(),
        queues: args.queues.unwrap_or(DEFAULT_QUEUES),
    };
    let (serving_device, serving_engine, runtime) = (
        device.clone(),
        engine.clone(),
        tokio::runtime::Handle::current(),
    );
    let session =
        tokio::task::spawn_blocking(move || serving_device.serve(serving_engine, runtime, options));
    let (session_result, flushed) = serve_until_stopped(
        &engine,
        recorder.as_ref(),
        control,
        control_task,
        &run_dir,
        session,
    )
    .await?;
    session_result
        .context("vhost-user-blk task")?
        .context("vhost-user-blk")?;
    flushed.context("final flush")?;
    Ok(())
}
