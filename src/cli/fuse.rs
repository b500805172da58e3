//! `add --fuse` in the foreground: the device process of a FUSE device.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use async_trait::async_trait;

use super::device::{serve_device, AddArgs, Detach, Frontend};
use crate::daemon::FrontendKind;
use crate::frontend::fuse::{FuseDevice, DISK_FILE_NAME};

#[async_trait]
impl Detach for Arc<FuseDevice> {
    /// `force` changes nothing: the unmount itself refuses while the disk
    /// file is in use, and a lazy unmount would leave the device serving.
    async fn detach(&self, _force: bool) -> Result<(), String> {
        self.unmount().map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Frontend for Arc<FuseDevice> {
    type Detach = Self;
    const KIND: FrontendKind = FrontendKind::Fuse;

    fn target(&self) -> PathBuf {
        self.mountpoint().to_owned()
    }

    fn ready(&self) -> String {
        format!("{} ready", self.mountpoint().join(DISK_FILE_NAME).display())
    }

    fn detacher(&self) -> Self {
        self.clone()
    }

    async fn abandon(self) {
        let _ = self.unmount();
    }

    async fn serve(self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || self.wait())
            .await
            .map_err(|e| anyhow!("FUSE session task: {e}"))?
            .context("FUSE session")
    }
}

pub(super) async fn serve(args: &AddArgs, mountpoint: &Path) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    serve_device(&args.device_spec(), Some(&mountpoint), |engine| async {
        Ok(Arc::new(FuseDevice::mount(
            engine,
            tokio::runtime::Handle::current(),
            &mountpoint,
        )?))
    })
    .await
}
