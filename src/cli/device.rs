//! `add`, `del` and `list`: starting, stopping and watching device processes.
//!
//! `add` (and `recover`) re-run themselves with `--foreground` as a
//! detached child and return once the child says the device is ready (one
//! line on its stdout, `ready` and what to tell the user); the child logs to
//! `CACHE_DIR/daemon.log`. The child runs the device process of
//! [`process`], with the frontend of `fuse.rs`, `nbd.rs`, `ublk.rs` or
//! `vhost_user.rs`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;

use super::trace::TraceArgs;
use super::{HostCacheArgs, ImageArgs};
use crate::daemon::{
    self, ControlRequest, ControlResponse, DeviceRecord, DeviceState, FrontendKind, StopReport,
};
use crate::engine::{DEFAULT_FETCH_TIMEOUT, DEFAULT_READAHEAD_CHUNKS};
use crate::frontend::{nbd, ublk};

const READY_WORD: &str = "ready";
const LOG_FILE_NAME: &str = "daemon.log";
/// How long `del` waits for a device process to exit after it agreed to stop.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

mod process;
pub(super) use process::{serve_device, Detach, DeviceSpec, Frontend};

#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub host_cache: HostCacheArgs,
    /// The device's cache directory (sparse data file and present-bitmap);
    /// re-using it after a restart keeps every chunk already there.
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Serve the image as MOUNTPOINT/disk through FUSE instead of as a ublk
    /// block device (for kernels without ublk).
    #[arg(long, value_name = "MOUNTPOINT")]
    pub fuse: Option<PathBuf>,
    /// Serve the image to VMs as a virtio disk on the vhost-user socket
    /// SOCKET (QEMU's vhost-user-blk-pci, Cloud Hypervisor, Firecracker),
    /// one VM after another; `--queues` sets the queue count (default 1).
    #[arg(long, value_name = "SOCKET", conflicts_with = "fuse")]
    pub vhost_user_blk: Option<PathBuf>,
    /// Serve the image as an NBD export instead, at unix:PATH or
    /// tcp:ADDR:PORT (port 0 picks a free one); prints the export's URI.
    #[arg(long, value_name = "LISTENER", conflicts_with_all = ["fuse", "vhost_user_blk"])]
    pub nbd: Option<nbd::Listen>,
    /// With --nbd: the TLS certificate chain (PEM); clients must then
    /// upgrade with STARTTLS before anything else.
    #[arg(long, value_name = "PEM", requires_all = ["nbd", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// With --nbd: the TLS certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["nbd", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// With --nbd and --tls-cert: clients must present a certificate that
    /// chains to a CA certificate in this file (PEM), or the handshake
    /// fails. (--tls-ca is the CA of an https:// store.)
    #[arg(long, value_name = "PEM", requires_all = ["nbd", "tls_cert"])]
    pub tls_client_ca: Option<PathBuf>,
    /// The ublk device number wanted (/dev/ublkbID); by default the driver picks.
    #[arg(
        short = 'n',
        long = "number",
        value_name = "ID",
        conflicts_with_all = ["fuse", "vhost_user_blk", "nbd"]
    )]
    pub id: Option<u32>,
    /// ublk queues (one thread each); default: online CPUs, at most 8.
    /// With `--vhost-user-blk`, the virtqueues a VM may use.
    #[arg(short = 'q', long, conflicts_with_all = ["fuse", "nbd"], value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: Option<u16>,
    /// Requests in flight per ublk queue.
    #[arg(short = 'd', long, default_value_t = ublk::DEFAULT_DEPTH, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub depth: u16,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Let the ublk device outlive this process: if it dies, I/O waits
    /// until `lazyblk recover -n ID` serves the device again.
    #[arg(long, conflicts_with_all = ["fuse", "vhost_user_blk", "nbd"])]
    pub recoverable: bool,
    /// Keep the ublk device in copy mode even where the driver offers zero
    /// copy (AUTO_BUF_REG, Linux 6.16+); `lazyblk features` says which a
    /// device gets.
    #[arg(long, conflicts_with_all = ["fuse", "vhost_user_blk", "nbd"])]
    pub no_zero_copy: bool,
    /// Most chunks fetched ahead of a sequential reader at once; 0 turns
    /// readahead off, the file-system-guided kind too (random-access
    /// workloads then fetch only what they read).
    #[arg(long, default_value_t = DEFAULT_READAHEAD_CHUNKS)]
    pub readahead_chunks: u32,
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Most seconds a chunk's fetch may take, retries of transient store
    /// failures included; a read that needs it then fails with EIO, well
    /// before the kernel's 30 s I/O timeout, and a later read tries again.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_FETCH_TIMEOUT.as_secs_f64(), value_parser = parse_fetch_timeout)]
    pub fetch_timeout: f64,
    /// Serve Prometheus metrics (the counters `list` shows, and fetch
    /// latency histograms) at http://ADDR/metrics, e.g. 127.0.0.1:9101.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Stay in the foreground instead of returning once the device is ready.
    #[arg(long)]
    pub foreground: bool,
}

#[derive(Debug, Args)]
pub struct DelArgs {
    /// The FUSE mountpoint the device was added at.
    #[arg(long, value_name = "MOUNTPOINT", conflicts_with_all = ["id", "all"])]
    pub fuse: Option<PathBuf>,
    /// The vhost-user socket the device was added on.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["id", "all", "fuse"])]
    pub vhost_user_blk: Option<PathBuf>,
    /// The NBD listener the device was added at (unix:PATH, tcp:ADDR:PORT).
    #[arg(long, value_name = "LISTENER", conflicts_with_all = ["id", "all", "fuse", "vhost_user_blk"])]
    pub nbd: Option<nbd::Listen>,
    /// The ublk device number (/dev/ublkbID).
    #[arg(
        short = 'n',
        long = "number",
        value_name = "ID",
        conflicts_with = "all"
    )]
    pub id: Option<u32>,
    /// Every device in the run directory, whatever its frontend, orphans included.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Stop a ublk device even while it is open (e.g. mounted); its users
    /// then get I/O errors. Without it, kernels with SAFE_STOP_DEV (7.0+)
    /// refuse to stop an open device; older kernels stop it regardless.
    /// A vhost-user-blk device with a VM connected is stopped only with it
    /// (the VM's disk then stops answering), an NBD device with clients
    /// connected likewise (they are disconnected).
    #[arg(long)]
    pub force: bool,
}

impl AddArgs {
    /// What the device process serves, whatever the frontend.
    pub(super) fn device_spec(&self) -> DeviceSpec {
        DeviceSpec {
            image: self.image.clone(),
            host_cache: self.host_cache.clone(),
            cache_dir: self.cache_dir.clone(),
            read_only: self.read_only,
            readahead_chunks: self.readahead_chunks,
            fetch_timeout: self.fetch_timeout,
            metrics: self.metrics,
            trace: self.trace.clone(),
            replaces: None,
            changes_outlive_process: false,
        }
    }

    /// The frontend the options ask for.
    pub fn frontend(&self) -> FrontendKind {
        match (&self.fuse, &self.vhost_user_blk, &self.nbd) {
            (Some(_), _, _) => FrontendKind::Fuse,
            (None, Some(_), _) => FrontendKind::VhostUserBlk,
            (None, None, Some(_)) => FrontendKind::Nbd,
            (None, None, None) => FrontendKind::Ublk,
        }
    }
}

pub fn add(args: AddArgs) -> anyhow::Result<()> {
    let frontend = args.frontend();
    if frontend == FrontendKind::Ublk {
        // Before anything else: no point starting a process that cannot work.
        ublk::require_driver()?;
    }
    if !args.foreground {
        return daemonize(&args.cache_dir);
    }
    match (frontend, &args.fuse) {
        // A FUSE device stays in the host's mount namespace: its mount must
        // be visible there.
        (FrontendKind::Fuse, Some(mountpoint)) => {
            super::runtime()?.block_on(super::fuse::serve(&args, mountpoint))
        }
        (FrontendKind::Ublk, _) => {
            // Before the runtime starts any thread.
            ublk::isolate_mounts()?;
            super::runtime()?.block_on(super::ublk::serve_add(&args))
        }
        (FrontendKind::VhostUserBlk, _) => match &args.vhost_user_blk {
            Some(socket) => super::runtime()?.block_on(super::vhost_user::serve(&args, socket)),
            None => unreachable!("a vhost-user-blk device has a socket"),
        },
        (FrontendKind::Nbd, _) => super::runtime()?.block_on(super::nbd::serve(&args)),
        (FrontendKind::Fuse, None) => unreachable!("a FUSE device has a mountpoint"),
    }
}

/// Re-runs this command with `--foreground` as a detached child logging to
/// `cache_dir`, and returns once it is ready, printing what it said.
pub(super) fn daemonize(cache_dir: &Path) -> anyhow::Result<()> {
    // The log sits beside the cache's plaintext, under the same rule.
    crate::private::ensure_dir(cache_dir, crate::private::CACHE_DIR)?;
    let log_path = cache_dir.join(LOG_FILE_NAME);
    let log = crate::private::open_append(&log_path, crate::private::LOG_FILE)
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
    if let Some(said) = line.trim_end().strip_prefix(READY_WORD) {
        outln!(
            "{} (pid {}, log {})",
            said.trim(),
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

fn parse_fetch_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 3600.0 => Ok(secs),
        _ => Err(format!(
            "{text:?} is not a number of seconds between 0 and 3600"
        )),
    }
}

/// The run directory, created if needed.
pub(super) fn ensure_run_dir() -> anyhow::Result<PathBuf> {
    let run_dir = daemon::run_dir();
    // Records name key files, token files and stores: the owner's business.
    // An existing run directory is taken as it is (its mode is the admin's).
    crate::private::create_dirs(&run_dir)
        .with_context(|| format!("create run directory {}", run_dir.display()))?;
    Ok(run_dir)
}

pub(super) async fn list_devices(run_dir: &Path) -> anyhow::Result<Vec<daemon::DeviceStatus>> {
    daemon::list_devices(run_dir, ublk::device_exists)
        .await
        .with_context(|| format!("read run directory {}", run_dir.display()))
}

pub async fn del(args: DelArgs) -> anyhow::Result<()> {
    let run_dir = daemon::run_dir();
    let devices = list_devices(&run_dir).await?;
    if args.all {
        let mut failed = Vec::new();
        for device in devices {
            if let Err(e) = del_one(&run_dir, &device, args.force).await {
                failed.push(format!("{e:#}"));
            }
        }
        if !failed.is_empty() {
            bail!(
                "some devices were not removed, or not cleanly:\n{}",
                failed.join("\n")
            );
        }
        return Ok(());
    }
    if let Some(id) = args.id {
        let Some(device) = devices
            .iter()
            .find(|d| d.record.ublk.as_ref().is_some_and(|u| u.id == id))
        else {
            // Not ours (or its record is lost): still ublk's to delete.
            if ublk::device_exists(id) {
                tokio::task::spawn_blocking(move || ublk::delete(id)).await??;
                outln!("deleted {}", ublk::device_path(id).display());
                return Ok(());
            }
            bail!("there is no ublk device {id}");
        };
        return del_one(&run_dir, device, args.force).await;
    }
    if let Some(socket) = args.vhost_user_blk {
        let socket =
            std::path::absolute(&socket).with_context(|| format!("socket {}", socket.display()))?;
        let device = devices
            .iter()
            .find(|d| d.record.frontend == FrontendKind::VhostUserBlk && d.record.target == socket)
            .ok_or_else(|| anyhow!("no lazyblk device serves {}", socket.display()))?;
        return del_one(&run_dir, device, args.force).await;
    }
    if let Some(listen) = args.nbd {
        let target = super::nbd::record_target(&listen)?;
        let device = devices
            .iter()
            .find(|d| d.record.frontend == FrontendKind::Nbd && d.record.target == target)
            .ok_or_else(|| anyhow!("no lazyblk device serves NBD at {}", target.display()))?;
        return del_one(&run_dir, device, args.force).await;
    }
    let Some(fuse) = args.fuse else {
        bail!("say which device: -n ID, --all, --fuse MOUNTPOINT, --vhost-user-blk SOCKET or --nbd LISTENER");
    };
    let mountpoint = fuse
        .canonicalize()
        .with_context(|| format!("mountpoint {}", fuse.display()))?;
    let device = devices
        .iter()
        .find(|d| d.record.frontend == FrontendKind::Fuse && d.record.target == mountpoint)
        .ok_or_else(|| anyhow!("no lazyblk device is mounted at {}", mountpoint.display()))?;
    del_one(&run_dir, device, args.force).await
}

/// Stops a live device through its process, or deletes an orphan.
async fn del_one(run_dir: &Path, device: &daemon::DeviceStatus, force: bool) -> anyhow::Result<()> {
    let pid = device.record.pid;
    let target = device.record.target.display();
    if device.state == DeviceState::Orphaned {
        match device.record.frontend {
            FrontendKind::Ublk => {
                let Some(id) = device.record.ublk.as_ref().map(|u| u.id) else {
                    bail!("device record {pid} is orphaned but names no ublk device");
                };
                tokio::task::spawn_blocking(move || ublk::delete(id)).await??;
            }
            FrontendKind::Fuse | FrontendKind::VhostUserBlk | FrontendKind::Nbd => {
                bail!(
                    "{} device record {pid} cannot be orphaned",
                    device.record.frontend
                )
            }
        }
        DeviceRecord::remove(run_dir, pid);
        outln!("deleted orphaned {target}");
        return Ok(());
    }
    let socket = DeviceRecord::socket_path(run_dir, pid);
    match daemon::request(&socket, &ControlRequest::Stop { force }).await? {
        ControlResponse::Stopping => {}
        ControlResponse::Error(e) => bail!("device {pid} at {target}: {e}"),
        other => bail!("device {pid} answered {other:?} to stop"),
    }
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!(
                "device {pid} at {target} agreed to stop but has not exited after {} s",
                EXIT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    outln!("stopped device {pid} at {target}");
    let report = StopReport::take(run_dir, pid)
        .with_context(|| format!("read what device {pid} left in {}", run_dir.display()))?;
    if let Some(report) = report {
        bail!(
            "device {pid} at {target} was removed, but the trace run it recorded for image {:?} \
             was not stored: {}",
            report.name,
            report.trace_error
        );
    }
    Ok(())
}

pub async fn list(json: bool) -> anyhow::Result<()> {
    let run_dir = daemon::run_dir();
    let devices = list_devices(&run_dir).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    if devices.is_empty() {
        outln!("no devices");
        return Ok(());
    }
    outln!(
        "{:>4} {:>7} {:<5} {:<8} {:<24} {:<14} {:>3} {:<9} {:>11} {:>9} {:>8} {:>8} {:>8} {:>8} {:>4}  CACHE",
        "ID",
        "PID",
        "FRONT",
        "STATE",
        "TARGET",
        "NAME",
        "Q",
        "MODE",
        "PRESENT",
        "FETCHED",
        "HITS",
        "MISSES",
        "P50(us)",
        "P99(us)",
        "BAD"
    );
    for d in devices {
        let id = d
            .record
            .ublk
            .as_ref()
            .map_or("-".into(), |u| u.id.to_string());
        let queues = d
            .record
            .ublk
            .as_ref()
            .map_or("-".into(), |u| u.queues.to_string());
        let mode = d.record.ublk.as_ref().map_or("-", |u| u.copy_mode.as_str());
        let state = match d.state {
            DeviceState::Live => "live",
            DeviceState::Orphaned => "orphaned",
        };
        let counters = match &d.stats {
            Some(s) => format!(
                "{:>11} {:>8.1}M {:>8} {:>8} {:>8} {:>8} {:>4}",
                format!("{}/{}", s.chunks_present, s.chunks_total),
                s.bytes_fetched as f64 / (1024.0 * 1024.0),
                s.cache_hits,
                s.cache_misses,
                s.fetch_latency_p50_us,
                s.fetch_latency_p99_us,
                s.integrity_failures
            ),
            None => format!(
                "{:>11} {:>9} {:>8} {:>8} {:>8} {:>8} {:>4}",
                "-", "-", "-", "-", "-", "-", "-"
            ),
        };
        outln!(
            "{:>4} {:>7} {:<5} {:<8} {:<24} {:<14} {:>3} {:<9} {counters}  {}",
            id,
            d.record.pid,
            d.record.frontend,
            state,
            d.record.target.display(),
            d.record.name,
            queues,
            mode,
            d.record.cache_dir.display()
        );
        if let Some(s) = d
            .stats
            .as_ref()
            .filter(|s| s.prefetch_planned > 0 || s.chunks_readahead > 0)
        {
            outln!(
                "     prefetch: {} planned, {} fetched, {} then read, {} left; readahead: {} fetched, {} then read; {} demand fetches",
                s.prefetch_planned,
                s.chunks_prefetched,
                s.prefetched_chunks_read,
                s.prefetch_remaining,
                s.chunks_readahead,
                s.readahead_chunks_read,
                s.demand_fetches
            );
        }
        // A device reading through tiers: one line per tier under its row.
        for tier in d.stats.iter().flat_map(|s| &s.tiers) {
            outln!(
                "     tier {}: {} hits ({:.1}M, p50 {} us, p99 {} us), {} misses, {} errors ({} timeouts), {} bad, {} fills",
                tier.name,
                tier.hits,
                tier.bytes as f64 / (1024.0 * 1024.0),
                tier.hit_latency_p50_us,
                tier.hit_latency_p99_us,
                tier.misses,
                tier.errors,
                tier.timeouts,
                tier.integrity_failures,
                tier.fills
            );
        }
    }
    Ok(())
}
