//! `add --nbd` in the foreground: the device process of an NBD export.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use tokio::net::UnixListener;

use super::device::{
    engine_options, ensure_run_dir, list_devices, open_engine, say_ready, serve_metrics,
    serve_until_stopped, AddArgs, Detach, EngineControl, Opened,
};
use crate::daemon::{self, DeviceRecord, FrontendKind};
use crate::frontend::nbd::{tls_acceptor, Export, Listen, NbdHandle, NbdServer};

#[async_trait]
impl Detach for NbdHandle {
    /// Without `force`, refused while clients are connected.
    async fn detach(&self, force: bool) -> Result<(), String> {
        self.stop(force).map_err(|e| e.to_string())
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
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
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

    // Everything that can fail comes before clients can connect.
    let run_dir = ensure_run_dir()?;
    let wanted = PathBuf::from(listen.to_string());
    if let Some(other) = list_devices(&run_dir)
        .await?
        .into_iter()
        .find(|d| d.record.target == wanted)
    {
        bail!(
            "device {} already serves {:?} at {}",
            other.record.pid,
            other.record.name,
            listen
        );
    }
    let pid = std::process::id();
    let socket = DeviceRecord::socket_path(&run_dir, pid);
    let _ = std::fs::remove_file(&socket);
    let control_listener =
        UnixListener::bind(&socket).with_context(|| format!("bind {}", socket.display()))?;
    let metrics = serve_metrics(&engine, &store, name, args.metrics).await?;
    let server = NbdServer::bind(
        &listen,
        Export {
            engine: engine.clone(),
            name: name.clone(),
            tls,
        },
    )
    .await?;
    let record = DeviceRecord {
        pid,
        frontend: FrontendKind::Nbd,
        // With port 0 resolved, so `del --nbd` can name it.
        target: PathBuf::from(server.listen().to_string()),
        name: name.clone(),
        store: store.describe(),
        cache_dir: std::path::absolute(&args.cache_dir).unwrap_or(args.cache_dir.clone()),
        read_only: args.read_only,
        metrics,
        ublk: None,
    };
    if let Err(e) = record.publish(&run_dir) {
        if let Listen::Unix(path) = server.listen() {
            let _ = std::fs::remove_file(path);
        }
        DeviceRecord::remove(&run_dir, pid);
        return Err(e).with_context(|| format!("write device record in {}", run_dir.display()));
    }
    let control = Arc::new(EngineControl {
        engine: engine.clone(),
        store: store.clone(),
        frontend: server.handle(),
    });
    let control_task = tokio::spawn(daemon::serve_control(control_listener, control.clone()));
    let uri = server.uri();
    tracing::info!(name, listen = %server.listen(), uri, "device ready");
    say_ready(&format!("{uri} ready"))?;

    let running = tokio::spawn(server.run());
    let (ended, flushed) = serve_until_stopped(
        &engine,
        recorder.as_ref(),
        control,
        control_task,
        &run_dir,
        running,
    )
    .await?;
    ended.map_err(|e| anyhow!("NBD server task: {e}"))?;
    flushed.context("final flush")?;
    Ok(())
}
