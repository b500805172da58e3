//! `add`, `del` and `list`: starting, stopping and watching device processes.
//!
//! `add` re-runs itself with `--foreground` as a detached child and returns
//! once the child says the device is ready (one line on its stdout); the
//! child logs to `CACHE_DIR/daemon.log`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use clap::Args;
use tokio::net::UnixListener;

use super::keys::load_key;
use super::ImageArgs;
use crate::chunk::{manifest_digest, Manifest};
use crate::daemon::{self, ControlRequest, ControlResponse, DeviceControl, DeviceRecord};
use crate::engine::{Engine, EngineOptions, EngineStats, DEFAULT_READAHEAD_CHUNKS};
use crate::frontend::fuse::{FuseDevice, DISK_FILE_NAME};
use crate::store::open_store;

const READY_LINE: &str = "ready";
const LOG_FILE_NAME: &str = "daemon.log";
/// How often fetched chunks are recorded in the cache's bitmap, bounding
/// what a crash makes the device fetch again.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// The device's cache directory (sparse data file and present-bitmap);
    /// re-using it after a restart keeps every chunk already there.
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Serve the image as MOUNTPOINT/disk through FUSE.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub fuse: PathBuf,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Most chunks fetched ahead of a sequential reader at once; 0 turns
    /// readahead off (random-access workloads then fetch only what they read).
    #[arg(long, default_value_t = DEFAULT_READAHEAD_CHUNKS)]
    pub readahead_chunks: u32,
    /// Stay in the foreground instead of returning once the device is ready.
    #[arg(long)]
    pub foreground: bool,
}

#[derive(Debug, Args)]
pub struct DelArgs {
    /// The FUSE mountpoint the device was added at.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub fuse: PathBuf,
}

pub fn add(args: AddArgs) -> anyhow::Result<()> {
    if args.foreground {
        return super::runtime()?.block_on(serve(args));
    }
    std::fs::create_dir_all(&args.cache_dir)
        .with_context(|| format!("create cache directory {}", args.cache_dir.display()))?;
    let log_path = args.cache_dir.join(LOG_FILE_NAME);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open log {}", log_path.display()))?;
    // The log is appended to across runs; on failure show only this run's lines.
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut child =
        std::process::Command::new(std::env::current_exe().context("find own executable")?)
            .args(std::env::args_os().skip(1))
            .arg("--foreground")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the shell must not stop the device.
            .process_group(0)
            .spawn()
            .context("start device process")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("wait for the device process")?;
    if line.trim_end() == READY_LINE {
        println!(
            "{} ready (pid {}, log {})",
            args.fuse.join(DISK_FILE_NAME).display(),
            child.id(),
            log_path.display()
        );
        return Ok(());
    }
    let status = child.wait().context("wait for the device process")?;
    let log_text = std::fs::read(&log_path).unwrap_or_default();
    let log_text = String::from_utf8_lossy(log_text.get(log_start as usize..).unwrap_or_default());
    let tail: Vec<&str> = log_text.lines().rev().take(10).collect();
    bail!(
        "device process exited ({status}) before it was ready; last log lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Glue between the control socket and a FUSE device.
struct FuseControl {
    engine: Arc<Engine>,
    device: Arc<FuseDevice>,
}

#[async_trait]
impl DeviceControl for FuseControl {
    fn stats(&self) -> EngineStats {
        self.engine.stats()
    }

    async fn stop(&self) -> Result<(), String> {
        self.engine
            .flush()
            .await
            .map_err(|e| format!("flush: {e}"))?;
        self.device.unmount().map_err(|e| e.to_string())
    }
}

async fn serve(args: AddArgs) -> anyhow::Result<()> {
    let tenant = load_key(&args.image.key)?;
    let store = open_store(&args.image.store)?;
    let name = &args.image.name;
    let sealed = store.get_manifest(name).await?;
    let manifest = Manifest::open(name, &sealed, &tenant)?;
    let engine = Engine::open(
        manifest,
        manifest_digest(&sealed),
        store.clone(),
        &args.cache_dir,
        EngineOptions {
            read_only: args.read_only,
            readahead_chunks: args.readahead_chunks,
        },
    )
    .with_context(|| format!("open cache {}", args.cache_dir.display()))?;
    let mountpoint = args
        .fuse
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.fuse.display()))?;

    // Everything that can fail comes before the mount, so a failed start
    // never leaves a mount behind.
    let run_dir = daemon::run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("create run directory {}", run_dir.display()))?;
    if let Some(other) = daemon::list_devices(&run_dir)
        .await
        .with_context(|| format!("read run directory {}", run_dir.display()))?
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
    let record = DeviceRecord {
        pid,
        frontend: "fuse".into(),
        target: mountpoint.clone(),
        name: name.clone(),
        store: store.describe(),
        cache_dir: std::path::absolute(&args.cache_dir).unwrap_or(args.cache_dir.clone()),
        read_only: args.read_only,
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
    let control = Arc::new(FuseControl {
        engine: engine.clone(),
        device: device.clone(),
    });
    let control_task = tokio::spawn(daemon::serve_control(listener, control.clone()));
    tracing::info!(name, mountpoint = %mountpoint.display(), "device ready");
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{READY_LINE}").and_then(|()| stdout.flush())?;
    }

    let checkpoints = tokio::spawn(checkpoint_every(engine.clone(), CHECKPOINT_INTERVAL));
    let session_device = device.clone();
    let mut session = tokio::task::spawn_blocking(move || session_device.wait());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let session_result = loop {
        tokio::select! {
            result = &mut session => break result,
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received: flushing and unmounting");
        if let Err(e) = control.stop().await {
            tracing::error!("cannot stop yet: {e}");
        }
    };
    control_task.abort();
    checkpoints.abort();
    let flushed = engine.flush().await;
    DeviceRecord::remove(&run_dir, pid);
    tracing::info!(stats = ?engine.stats(), "device stopped");
    session_result
        .map_err(|e| anyhow!("FUSE session task: {e}"))?
        .context("FUSE session")?;
    flushed.context("final flush")?;
    Ok(())
}

async fn checkpoint_every(engine: Arc<Engine>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = engine.checkpoint().await {
            tracing::warn!("checkpoint of the cache: {e}");
        }
    }
}

pub async fn del(args: DelArgs) -> anyhow::Result<()> {
    let mountpoint = args
        .fuse
        .canonicalize()
        .with_context(|| format!("mountpoint {}", args.fuse.display()))?;
    let run_dir = daemon::run_dir();
    let device = daemon::list_devices(&run_dir)
        .await
        .with_context(|| format!("read run directory {}", run_dir.display()))?
        .into_iter()
        .find(|d| d.record.frontend == "fuse" && d.record.target == mountpoint)
        .ok_or_else(|| anyhow!("no lazyblk device is mounted at {}", mountpoint.display()))?;
    let pid = device.record.pid;
    let socket = DeviceRecord::socket_path(&run_dir, pid);
    match daemon::request(&socket, &ControlRequest::Stop).await? {
        ControlResponse::Stopping => {}
        ControlResponse::Error(e) => bail!("device {pid} at {}: {e}", mountpoint.display()),
        other => bail!("device {pid} answered {other:?} to stop"),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("device {pid} unmounted but has not exited after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("stopped device {pid} at {}", mountpoint.display());
    Ok(())
}

pub async fn list(json: bool) -> anyhow::Result<()> {
    let run_dir = daemon::run_dir();
    let devices = daemon::list_devices(&run_dir)
        .await
        .with_context(|| format!("read run directory {}", run_dir.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    if devices.is_empty() {
        println!("no devices");
        return Ok(());
    }
    println!(
        "{:>7} {:<5} {:<28} {:<16} {:>13} {:>10} {:>8} {:>8} {:>9} {:>9} {:>6}",
        "PID",
        "FRONT",
        "TARGET",
        "NAME",
        "PRESENT",
        "FETCHED",
        "HITS",
        "MISSES",
        "P50(us)",
        "P99(us)",
        "BAD"
    );
    for d in devices {
        let s = &d.stats;
        println!(
            "{:>7} {:<5} {:<28} {:<16} {:>13} {:>9.1}M {:>8} {:>8} {:>9} {:>9} {:>6}",
            d.record.pid,
            d.record.frontend,
            d.record.target.display(),
            d.record.name,
            format!("{}/{}", s.chunks_present, s.chunks_total),
            s.bytes_fetched as f64 / (1024.0 * 1024.0),
            s.cache_hits,
            s.cache_misses,
            s.fetch_latency_p50_us,
            s.fetch_latency_p99_us,
            s.integrity_failures
        );
    }
    Ok(())
}
