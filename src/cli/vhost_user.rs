//! `add --vhost-user-blk` in the foreground: the device process of a disk
//! served to VMs over a vhost-user socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;

use super::device::{serve_device, AddArgs, Detach, Frontend};
use crate::daemon::FrontendKind;
use crate::engine::Engine;
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

/// A bound vhost-user socket and what it will serve.
struct Bound {
    device: Arc<VhostUserBlk>,
    engine: Arc<Engine>,
    options: BlkOptions,
}

#[async_trait]
impl Frontend for Bound {
    type Detach = Arc<VhostUserBlk>;
    const KIND: FrontendKind = FrontendKind::VhostUserBlk;

    fn target(&self) -> PathBuf {
        self.device.socket().to_owned()
    }

    fn ready(&self) -> String {
        format!("{} ready", self.device.socket().display())
    }

    fn detacher(&self) -> Arc<VhostUserBlk> {
        self.device.clone()
    }

    async fn abandon(self) {}

    async fn serve(self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || self.device.serve(self.engine, runtime, self.options))
            .await
            .context("vhost-user-blk task")?
            .context("vhost-user-blk")
    }
}

pub(super) async fn serve(args: &AddArgs, socket: &Path) -> anyhow::Result<()> {
    let socket =
        std::path::absolute(socket).with_context(|| format!("socket {}", socket.display()))?;
    let options = BlkOptions {
        serial: args.image.name.clone(),
        queues: args.queues.unwrap_or(DEFAULT_QUEUES),
    };
    serve_device(&args.device_spec(), Some(&socket), |engine| async {
        Ok(Bound {
            device: Arc::new(VhostUserBlk::bind(&socket)?),
            engine,
            options,
        })
    })
    .await
}
