//! `add --fuse` in the foreground: the device process of a FUSE device.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use tokio::net::UnixListener;

use super::device::{
    engine_options, ensure_run_dir, list_devices, open_engine, say_ready, serve_metrics,
    serve_until_stopped, AddArgs, Detach, EngineControl, Opened,
};
use crate::daemon::{self, DeviceRecord, FrontendKind};
use crate::frontend::fuse::{FuseDevice, DISK_FILE_NAME};

#[async_trait]
impl Detach for Arc<FuseDevice> {
    /// `force` changes nothing: the unmount itself refuses while the disk
    /// file is in use, and a lazy unmount would leave the device serving.
    async fn detach(&self, _force: bool) -> Result<(), String> {
        self.unmount().map_err(|e| e.to_string())
    }
}

pub(super) async fn serve(args: &AddArgs, mountpoint: &Path) -> anyhow::Result<()> {
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
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;

    // Everything that can fail comes before the mount, so a failed start
    // never leaves a mount behind.
    let run_dir = ensure_run_dir()?;
    if let Some(other) = list_devices(&run_dir)
        .await?
        .into_iter()
        .find(|d| d.record.target == mountpoint)
    {
        bail!(
            "device {} already serves {:?} at {}",
            other.record.pid,
            other.record.name,
            mountpoint.display()
        );
    }
    let pid = std::process::id();
    let socket = DeviceRecord::socket_path(&run_dir, pid);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("bind {}", socket.display()))?;
    let metrics = serve_metrics(&engine, &store, name, args.metrics).await?;
    let record = DeviceRecord {
        pid,
        frontend: FrontendKind::Fuse,
        target: mountpoint.clone(),
        name: name.clone(),
        store: store.describe(),
        cache_dir: std::path::absolute(&args.cache_dir).unwrap_or(args.cache_dir.clone()),
        read_only: args.read_only,
        metrics,
        ublk: None,
    };

    let device = Arc::new(FuseDevice::mount(
        engine.clone(),
        tokio::runtime::Handle::current(),
        &mountpoint,
    )?);
    if let Err(e) = record.publish(&run_dir) {
        let _ = device.unmount();
        DeviceRecord::remove(&run_dir, pid);
        return Err(e).with_context(|| format!("write device record in {}", run_dir.display()));
    }
    let control = Arc::new(EngineControl {
        engine: engine.clone(),
        store: store.clone(),
        frontend: device.clone(),
    });
    let control_task = tokio::spawn(daemon::serve_control(listener, control.clone()));
    tracing::info!(name, mountpoint = %mountpoint.display(), "device ready");
    say_ready(&format!(
        "{} ready",
        mountpoint.join(DISK_FILE_NAME).display()
    ))?;

    let session_device = device.clone();
    let session = tokio::task::spawn_blocking(move || session_device.wait());
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
        .map_err(|e| anyhow!("FUSE session task: {e}"))?
        .context("FUSE session")?;
    flushed.context("final flush")?;
    Ok(())
}
