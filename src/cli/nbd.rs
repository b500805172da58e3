//! `add --nbd` in the foreground: the device process of an NBD export.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;

use super::device::{serve_device, AddArgs, Detach, Frontend};
use crate::daemon::FrontendKind;
use crate::frontend::nbd::{tls_acceptor, Export, Listen, NbdHandle, NbdServer};

#[async_trait]
impl Detach for NbdHandle {
    /// Without `force`, refused while clients are connected.
    async fn detach(&self, force: bool) -> Result<(), String> {
        self.stop(force).map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Frontend for NbdServer {
    type Detach = NbdHandle;
    const KIND: FrontendKind = FrontendKind::Nbd;

    /// With port 0 resolved, so `del --nbd` can name it.
    fn target(&self) -> PathBuf {
        PathBuf::from(self.listen().to_string())
    }

    fn ready(&self) -> String {
        format!("{} ready", self.uri())
    }

    fn detacher(&self) -> NbdHandle {
        self.handle()
    }

    async fn abandon(self) {
        if let Listen::Unix(path) = self.listen() {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn serve(self) -> anyhow::Result<()> {
        tokio::spawn(self.run())
            .await
            .map_err(|e| anyhow!("NBD server task: {e}"))
    }
}

/// How a device record names the listener: a Unix path made absolute, so
/// `del --nbd` finds it from any directory.
pub(super) fn record_target(listen: &Listen) -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(absolute(listen)?.to_string()))
}

fn absolute(listen: &Listen) -> anyhow::Result<Listen> {
    Ok(match listen {
        Listen::Unix(path) => Listen::Unix(
            std::path::absolute(path).with_context(|| format!("socket path {}", path.display()))?,
        ),
        Listen::Tcp(addr) => Listen::Tcp(*addr),
    })
}

pub(super) async fn serve(args: &AddArgs) -> anyhow::Result<()> {
    let Some(listen) = &args.nbd else {
        bail!("an NBD device needs --nbd unix:PATH or --nbd tcp:ADDR:PORT");
    };
    let listen = absolute(listen)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key, args.tls_client_ca.as_deref())?),
        _ => None,
    };
    let claims = PathBuf::from(listen.to_string());
    let name = args.image.name.clone();
    serve_device(&args.device_spec(), Some(&claims), |engine| async {
        let export = Export { engine, name, tls };
        Ok(NbdServer::bind(&listen, export).await?)
    })
    .await
}
