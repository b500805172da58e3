//! The ublk frontend: the engine as `/dev/ublkbN`, through the kernel's
//! ublk driver (Linux ≥ 6.0, `CONFIG_BLK_DEV_UBLK`, module `ublk_drv`).
//!
//! ```text
//! reader ─▶ /dev/ublkbN ─▶ ublk_drv ─▶ queue thread (io_uring) ─▶ Engine::submit
//!                                          │  cache I/O on the queue's ring (RingIo)
//!                                          └─ waits for fetches and flushes on the runtime
//! ```
//!
//! [`serve`] adds (or recovers) a device and blocks while it runs: one
//! thread per queue (see `queue.rs`), each with one task per tag. Request
//! data moves through per-tag buffers the kernel copies into and out of, or,
//! where the driver offers `AUTO_BUF_REG`, straight between the cache file
//! and the request's pages ([`CopyMode`], `mode.rs`).
//!
//! Teardown order: the kernel aborts every tag's command after STOP_DEV or
//! TRY_STOP_DEV (or when the device is deleted); each queue thread returns
//! once all its tags have seen that, dropping its buffers, then its ring;
//! `run` joins the threads and drops the last `UblkDev`, closing
//! `/dev/ublkcN`; only then is the device deleted (DEL_DEV_ASYNC where the
//! driver has it), so the delete never waits on our own open file, nor on
//! a mount that outlived a forced stop.
//!
//! With `recoverable`, the device is created with `UBLK_F_USER_RECOVERY`
//! and `UBLK_F_USER_RECOVERY_REISSUE`: if the process dies, the kernel
//! keeps the device and holds its I/O; [`Start::Recover`] in a new process
//! re-attaches and the held requests are issued again. Where the driver has
//! it, a new device also gets `UBLK_F_NO_AUTO_PART_SCAN`, and [`stop`]
//! refuses an open device through `TRY_STOP_DEV` (`UBLK_F_SAFE_STOP_DEV`).
//!
//! Every control command is bounded in time (`control.rs`), and the device
//! process keeps a mount namespace of its own ([`isolate_mounts`]).
//!
//! `unsafe` is allowed only in `control.rs`, for the two control commands
//! libublk cannot send; the crate denies it everywhere else.

mod control;
mod features;
mod mode;
mod queue;
mod ring_io;

pub use features::{features, Feature};
pub use mode::CopyMode;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use tokio::runtime::Handle;

use crate::engine::Engine;
use control::{bounded, CONTROL_TIMEOUT};

/// The driver's control device; without it there is no ublk.
pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// Largest request the kernel sends (one chunk at the default chunk size).
pub const MAX_IO_BYTES: u32 = 512 << 10;
/// Default requests in flight per queue.
pub const DEFAULT_DEPTH: u16 = 128;
/// Most queues `add` picks by itself.
pub const MAX_DEFAULT_QUEUES: u16 = 8;
/// Recovery with the held requests issued again (our writes are idempotent).
const RECOVERY_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
/// Target name recorded in the driver's device info.
const TARGET_NAME: &str = "lazyblk";
/// TRY_STOP_DEV exists (7.0); the driver sets it on every device itself.
pub const UBLK_F_SAFE_STOP_DEV: u64 = sys::UBLK_F_SAFE_STOP_DEV as u64;
/// No partition scan at START_DEV (7.0); libublk 0.4.8's builder refuses it.
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = sys::UBLK_F_NO_AUTO_PART_SCAN as u64;
/// Of the flags we ask for, those libublk 0.4.8's builder rejects as
/// unknown; ADD_DEV with any of them is sent by `control.rs`.
const FLAGS_LIBUBLK_REFUSES: u64 = UBLK_F_NO_AUTO_PART_SCAN;
/// Per-device size of the I/O descriptors (7.3); newer than libublk's header.
const UBLK_F_IO_DESC_SIZE: u64 = 1 << 20;
/// START_USER_RECOVERY: libublk retries while the driver says EBUSY (it
/// has not yet noticed the old process died) for up to 30 s.
const RECOVERY_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(30).saturating_add(CONTROL_TIMEOUT);

#[derive(Debug, thiserror::Error)]
pub enum UblkFrontendError {
    #[error(
        "{CONTROL_PATH} does not exist: this kernel has no ublk driver loaded. \
         Load it with `modprobe ublk_drv` (needs Linux 6.0 or later built with \
         CONFIG_BLK_DEV_UBLK), or serve the image through FUSE with `--fuse MOUNTPOINT`"
    )]
    NoDriver,
    #[error("the image is {size} bytes, not a whole number of 512-byte sectors")]
    ImageSize { size: u64 },
    #[error("add ublk device")]
    Add {
        #[source]
        source: std::io::Error,
    },
    #[error("start user recovery of ublk device {id}")]
    Recover {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("run ublk device")]
    Run {
        #[source]
        source: std::io::Error,
    },
    #[error("open ublk device {id}")]
    Open {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("stop ublk device {id}")]
    Stop {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("delete ublk device {id}")]
    Delete {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the ublk driver did not report its features (kernel before 6.5?)")]
    Features,
    #[error(
        "ublk control command {command} did not complete within {timeout:?}: the driver \
         is stuck (see kernel-notes/ublk.md, control timeouts); this process gives up \
         and exits, a device it was adding may be left for `lazyblk del -n ID`"
    )]
    Timeout {
        command: &'static str,
        timeout: std::time::Duration,
    },
    #[error("ublk control command {command}")]
    Control {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "ublk device {id} is open (mounted, or held by a process): not stopped. \
         Unmount or close it first, or stop it anyway with `--force` (its users \
         then get I/O errors)"
    )]
    Busy { id: u32 },
    #[error("give the ublk device process its own mount namespace: {step}")]
    MountNamespace {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How a new device is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Device number wanted (`/dev/ublkbN`); `None` lets the driver pick.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Create with user recovery, so a dead process can be replaced.
    pub recoverable: bool,
    /// Use zero copy where the driver offers it (see [`CopyMode::choose`]).
    pub zero_copy: bool,
}

/// Whether [`serve`] makes a new device or takes over an orphaned one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Add(DeviceOptions),
    /// Re-attach to device `id`, whose process died, keeping its queues,
    /// depth and the I/O the kernel held.
    Recover {
        id: u32,
    },
}

/// A device that is live, as [`serve`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: u32,
    pub path: PathBuf,
    pub queues: u16,
    pub depth: u16,
    pub recoverable: bool,
    /// The device's `UBLK_F_*` flags as the driver reports them.
    pub flags: u64,
    pub mode: CopyMode,
}

/// Queues `add` uses by default: one per online CPU, at most
/// [`MAX_DEFAULT_QUEUES`].
pub fn default_queues() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(usize::from(MAX_DEFAULT_QUEUES)) as u16
}

/// Fails with [`UblkFrontendError::NoDriver`] unless the driver is loaded.
pub fn require_driver() -> Result<(), UblkFrontendError> {
    if Path::new(CONTROL_PATH).exists() {
        Ok(())
    } else {
        Err(UblkFrontendError::NoDriver)
    }
}

/// The block device path of device `id`.
pub fn device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Whether the driver still has device `id` (live, or waiting for
/// recovery).
pub fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
        || Path::new(&format!("/dev/ublkc{id}")).exists()
}

/// Adds (or recovers) a device serving `engine` and blocks until it stops.
/// `started` is called once the block device is live. Fetches, writes and
/// flushes run on `runtime`, which must outlive the call. Every control
/// command is bounded in time (30 s, `control.rs`); one that hangs fails the call
/// with [`UblkFrontendError::Timeout`], and the caller should then exit.
pub fn serve<F>(
    engine: Arc<Engine>,
    runtime: Handle,
    start: Start,
    started: F,
) -> Result<(), UblkFrontendError>
where
    F: FnOnce(DeviceInfo) + Send + Sync + 'static,
{
    require_driver()?;
    let size = engine.size();
    if size % 512 != 0 {
        return Err(UblkFrontendError::ImageSize { size });
    }
    let ctrl = Arc::new(match start {
        Start::Add(opts) => add(opts)?,
        Start::Recover { id } => recover(id)?,
    });
    let id = ctrl.dev_info().dev_id;
    if let Err(e) = run(&ctrl, engine, runtime, started) {
        // Queue threads may still hold /dev/ublkcN (a failed START_DEV), so
        // a delete now would wait on our own open file; after a timeout it
        // would wait on the same stuck driver. The process exit releases
        // the file, and `del` removes the device.
        tracing::error!(
            id,
            "device left in the driver: `lazyblk del -n {id}` removes it"
        );
        return Err(e);
    }
    // The queues are down and /dev/ublkcN is closed: delete now, or the
    // delete would wait on our own open file. DEL_DEV also waits until the
    // disk has no opener left (a device stopped while mounted); the async
    // form (6.9+) returns at once and the driver frees the id later.
    let deleting = ctrl.clone();
    if let Err(e) = bounded("DEL_DEV", CONTROL_TIMEOUT, move || {
        deleting
            .del_dev_async()
            .or_else(|_| deleting.del_dev())
            .map(|_| ())
            .map_err(|e| UblkFrontendError::Delete {
                id,
                source: os_error(e),
            })
    }) {
        tracing::warn!(id, "delete after stop: {e}");
    }
    Ok(())
}

/// ADD_DEV with the flags this driver has: through libublk when it knows
/// them all, else sent here and then opened with libublk.
fn add(opts: DeviceOptions) -> Result<UblkCtrl, UblkFrontendError> {
    let driver = driver_features()?;
    let mode = CopyMode::choose(driver, opts.zero_copy);
    let flags = add_flags(driver, opts.recoverable) | mode.ctrl_flags();
    let base = move || {
        UblkCtrlBuilder::default()
            .name(TARGET_NAME)
            .nr_queues(opts.queues)
            .depth(opts.depth)
            .io_buf_bytes(MAX_IO_BYTES)
    };
    let ctrl = if flags & FLAGS_LIBUBLK_REFUSES == 0 {
        bounded("ADD_DEV", CONTROL_TIMEOUT, move || {
            base()
                .id(opts.id.map_or(-1, |id| id as i32))
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| UblkFrontendError::Add {
                    source: os_error(e),
                })
        })?
    } else {
        let request = control::AddRequest {
            id: opts.id,
            queues: opts.queues,
            depth: opts.depth,
            max_io_buf_bytes: MAX_IO_BYTES,
            flags,
        };
        let id = bounded("ADD_DEV", CONTROL_TIMEOUT, move || {
            control::add_dev(request).map_err(|source| UblkFrontendError::Add { source })
        })?;
        let opened = bounded("GET_DEV_INFO", CONTROL_TIMEOUT, move || {
            base()
                .id(id as i32)
                .build()
                .map_err(|e| UblkFrontendError::Open {
                    id,
                    source: os_error(e),
                })
        });
        match opened {
            Ok(ctrl) => ctrl,
            Err(e) => {
                // Not started: nothing holds it, so the delete is prompt.
                let _ = delete(id);
                return Err(e);
            }
        }
    };
    // Deleting is ours (bounded, after the queues are down), never the
    // unbounded delete libublk would send when `ctrl` drops.
    ctrl.disown();
    Ok(ctrl)
}

/// START_USER_RECOVERY on device `id`, with a control sized like the
/// device it takes over.
fn recover(id: u32) -> Result<UblkCtrl, UblkFrontendError> {
    let old = open(id)?;
    bounded("START_USER_RECOVERY", RECOVERY_TIMEOUT, move || {
        let ctrl = UblkCtrlBuilder::default()
            .name(TARGET_NAME)
            .id(id as i32)
            .nr_queues(old.nr_hw_queues)
            .depth(old.queue_depth)
            .io_buf_bytes(old.max_io_buf_bytes)
            .ctrl_flags(old.flags & RECOVERY_FLAGS | CopyMode::of_flags(old.flags).ctrl_flags())
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
            .and_then(|ctrl| ctrl.start_user_recover().map(|_| ctrl))
            .map_err(|e| UblkFrontendError::Recover {
                id,
                source: os_error(e),
            })?;
        Ok(ctrl)
    })
}

/// Starts the queue threads and the device, and waits for the threads,
/// which end when the device stops. libublk's `run_target` does the same
/// but with START_DEV unbounded.
fn run<F>(
    ctrl: &Arc<UblkCtrl>,
    engine: Arc<Engine>,
    runtime: Handle,
    started: F,
) -> Result<(), UblkFrontendError>
where
    F: FnOnce(DeviceInfo) + Send + Sync + 'static,
{
    let run_error = |e| UblkFrontendError::Run {
        source: os_error(e),
    };
    let size = engine.size();
    let read_only = engine.read_only();
    let set_params = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = device_params(size, dev.dev_info.max_io_buf_bytes, read_only);
        Ok(())
    };
    let dev = Arc::new(UblkDev::new(TARGET_NAME.into(), set_params, ctrl).map_err(run_error)?);
    let queues = dev.dev_info.nr_hw_queues;
    let (tids, thread_ids) = std::sync::mpsc::channel();
    let threads: Vec<_> = (0..queues)
        .map(|qid| {
            let (dev, engine, runtime, tids) =
                (dev.clone(), engine.clone(), runtime.clone(), tids.clone());
            std::thread::spawn(move || {
                let _ = tids.send((qid, UblkCtrl::init_queue_thread()));
                queue::run_queue(qid, &dev, engine, runtime);
            })
        })
        .collect();
    drop(tids);
    let (configuring, configuring_dev) = (ctrl.clone(), dev.clone());
    bounded("GET_QUEUE_AFFINITY", CONTROL_TIMEOUT, move || {
        // Each queue thread's tid, for libublk's export. The threads are
        // not pinned to their queue's CPUs: the kernel maps a submitter's
        // CPU to the queue of that CPU, so a pinned queue thread shares its
        // CPU with the submitter, and each batch waits until the submitter
        // sleeps; unpinned, the scheduler runs it on an idle CPU alongside
        // (kernel-notes/ublk.md, "Queue threads and CPUs").
        for (qid, tid) in thread_ids.iter().take(usize::from(queues)) {
            configuring
                .configure_queue(&configuring_dev, qid, tid)
                .map_err(run_error)?;
        }
        Ok(())
    })?;
    let (starting, starting_dev) = (ctrl.clone(), dev.clone());
    bounded("START_DEV", CONTROL_TIMEOUT, move || {
        starting.start_dev(&starting_dev).map_err(run_error)
    })?;
    let info = ctrl.dev_info();
    started(DeviceInfo {
        id: info.dev_id,
        path: device_path(info.dev_id),
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        recoverable: info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0,
        flags: info.flags,
        mode: CopyMode::of_flags(info.flags),
    });
    for thread in threads {
        if thread.join().is_err() {
            tracing::error!(id = info.dev_id, "a queue thread panicked");
        }
    }
    Ok(())
}

/// The driver's features (GET_FEATURES, 6.5+); `None` on older drivers.
fn driver_features() -> Result<Option<u64>, UblkFrontendError> {
    bounded("GET_FEATURES", CONTROL_TIMEOUT, || {
        Ok(UblkCtrl::get_features())
    })
}

/// The flags a new device asks for: recovery if wanted, and no partition
/// scan where the driver can skip it (our images have no partition table,
/// and a scan of a disk whose server stalls hangs the start).
fn add_flags(driver: Option<u64>, recoverable: bool) -> u64 {
    let mut flags = if recoverable { RECOVERY_FLAGS } else { 0 };
    if driver.unwrap_or(0) & UBLK_F_NO_AUTO_PART_SCAN != 0 {
        flags |= UBLK_F_NO_AUTO_PART_SCAN;
    }
    flags
}

/// Largest discard or write-zeroes request, in sectors: 1 GiB. They carry
/// no data and whole chunks in them are only punched, so a large request
/// costs no more than a small one and spares the block layer the splitting.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// The block device's parameters: 512-byte logical blocks on 4 KiB
/// physical ones, requests up to `max_io_bytes`; a writable device has a
/// volatile cache (so flushes reach the engine) and takes discards.
fn device_params(size: u64, max_io_bytes: u32, read_only: bool) -> sys::ublk_params {
    let max_sectors = max_io_bytes >> 9;
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs: if read_only {
                sys::UBLK_ATTR_READ_ONLY
            } else {
                sys::UBLK_ATTR_VOLATILE_CACHE
            },
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if !read_only {
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_granularity: 4096,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    params
}

/// How [`stop`] takes a live device down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopCommand {
    /// TRY_STOP_DEV: refused while the block device is open.
    TryStop,
    /// STOP_DEV: the device goes away under whoever has it open.
    Stop,
}

/// Without `force`, a driver that has SAFE_STOP_DEV refuses to stop an
/// open device; older drivers have only STOP_DEV.
fn stop_command(driver: Option<u64>, force: bool) -> StopCommand {
    if !force && driver.unwrap_or(0) & UBLK_F_SAFE_STOP_DEV != 0 {
        StopCommand::TryStop
    } else {
        StopCommand::Stop
    }
}

/// Stops device `id`: its queues abort and the process serving it returns
/// from [`serve`]. Flush first: requests in flight are failed. Unless
/// `force`, a driver with SAFE_STOP_DEV refuses while the device is open
/// (mounted, or opened by any process) with [`UblkFrontendError::Busy`];
/// older drivers stop it regardless.
pub fn stop(id: u32, force: bool) -> Result<(), UblkFrontendError> {
    require_driver()?;
    match stop_command(driver_features()?, force) {
        StopCommand::TryStop => bounded("TRY_STOP_DEV", CONTROL_TIMEOUT, move || {
            control::try_stop_dev(id).map_err(|source| match source.raw_os_error() {
                Some(libc::EBUSY) => UblkFrontendError::Busy { id },
                _ => UblkFrontendError::Stop { id, source },
            })
        }),
        StopCommand::Stop => bounded("STOP_DEV", CONTROL_TIMEOUT, move || {
            let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| UblkFrontendError::Open {
                id,
                source: os_error(e),
            })?;
            ctrl.kill_dev()
                .map(|_| ())
                .map_err(|e| UblkFrontendError::Stop {
                    id,
                    source: os_error(e),
                })
        }),
    }
}

/// Deletes device `id` whose process is gone (an orphan).
pub fn delete(id: u32) -> Result<(), UblkFrontendError> {
    require_driver()?;
    bounded("DEL_DEV", CONTROL_TIMEOUT, move || {
        let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| UblkFrontendError::Open {
            id,
            source: os_error(e),
        })?;
        ctrl.del_dev()
            .map(|_| ())
            .map_err(|e| UblkFrontendError::Delete {
                id,
                source: os_error(e),
            })
    })
}

/// The info of device `id` (GET_DEV_INFO).
fn open(id: u32) -> Result<sys::ublksrv_ctrl_dev_info, UblkFrontendError> {
    require_driver()?;
    bounded("GET_DEV_INFO", CONTROL_TIMEOUT, move || {
        UblkCtrl::new_simple(id as i32)
            .map(|ctrl| ctrl.dev_info())
            .map_err(|e| UblkFrontendError::Open {
                id,
                source: os_error(e),
            })
    })
}

/// Makes this process's mounts its own: a private copy of the mount table
/// as it is now, receiving no later mount or unmount. The device process
/// must never hold a mount of its own device, or unmounting it could wait
/// on the process that serves it. Must run before the process starts any
/// thread (the kernel refuses a new mount namespace to a thread that
/// shares its filesystem context). Everything the process opens later
/// (cache, store, key, run directory, /dev) is reached through mounts that
/// existed when it started; mounts made afterwards are invisible to it,
/// and filesystems unmounted afterwards stay alive in its copy until it
/// exits.
pub fn isolate_mounts() -> Result<(), UblkFrontendError> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| {
        UblkFrontendError::MountNamespace {
            step: "unshare(CLONE_NEWNS)",
            source: e.into(),
        }
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| UblkFrontendError::MountNamespace {
        step: "make / private (mount --make-rprivate /)",
        source: e.into(),
    })
}

/// libublk reports most failures as a bare negative errno, which its
/// `Display` does not show: turn it into the OS error it stands for.
fn os_error(error: libublk::UblkError) -> std::io::Error {
    match error {
        libublk::UblkError::OtherError(code) | libublk::UblkError::UringIOError(code)
            if code < 0 =>
        {
            std::io::Error::from_raw_os_error(-code)
        }
        libublk::UblkError::IOError(e) => e,
        other => std::io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_devices_refuse_writes_and_take_no_discards() {
        let params = device_params(1 << 30, MAX_IO_BYTES, true);
        assert_eq!(params.basic.attrs, sys::UBLK_ATTR_READ_ONLY);
        assert_eq!(params.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(params.basic.dev_sectors, 1 << 21);
        assert_eq!(params.basic.max_sectors, 1024);
    }

    #[test]
    fn writable_devices_take_flushes_and_discards() {
        let params = device_params(1 << 30, MAX_IO_BYTES, false);
        assert_eq!(params.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE);
        assert_ne!(params.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        assert_eq!(
            (
                params.basic.logical_bs_shift,
                params.basic.physical_bs_shift
            ),
            (9, 12)
        );
    }

    #[test]
    fn new_devices_skip_the_partition_scan_only_where_the_driver_can() {
        let all_7_3 = (1 << 21) - 1;
        let recovery = RECOVERY_FLAGS;
        assert_eq!(add_flags(None, false), 0);
        assert_eq!(add_flags(None, true), recovery);
        // 6.12: features up to bit 9, and 6.16's up to bit 14.
        assert_eq!(add_flags(Some((1 << 10) - 1), true), recovery);
        assert_eq!(add_flags(Some((1 << 15) - 1), false), 0);
        assert_eq!(add_flags(Some(all_7_3), false), UBLK_F_NO_AUTO_PART_SCAN);
        assert_eq!(
            add_flags(Some(UBLK_F_NO_AUTO_PART_SCAN), true),
            recovery | UBLK_F_NO_AUTO_PART_SCAN
        );
        assert_eq!(
            add_flags(Some(all_7_3 & !UBLK_F_NO_AUTO_PART_SCAN), false),
            0
        );
        // The flag is bit 18 of the uapi header, and libublk cannot send it.
        assert_eq!(UBLK_F_NO_AUTO_PART_SCAN, 1 << 18);
        assert_ne!(add_flags(Some(all_7_3), false) & FLAGS_LIBUBLK_REFUSES, 0);
        assert_eq!(
            add_flags(Some(all_7_3 & !UBLK_F_NO_AUTO_PART_SCAN), true) & FLAGS_LIBUBLK_REFUSES,
            0
        );
    }

    #[test]
    fn stop_is_refused_on_open_devices_only_where_the_driver_can_and_not_forced() {
        assert_eq!(UBLK_F_SAFE_STOP_DEV, 1 << 17);
        let safe = Some(UBLK_F_SAFE_STOP_DEV | 0xff);
        assert_eq!(stop_command(safe, false), StopCommand::TryStop);
        assert_eq!(stop_command(safe, true), StopCommand::Stop);
        for older in [None, Some(0), Some((1 << 17) - 1)] {
            assert_eq!(stop_command(older, false), StopCommand::Stop);
            assert_eq!(stop_command(older, true), StopCommand::Stop);
        }
    }

    #[test]
    fn a_refused_stop_says_how_to_force_it() {
        let message = UblkFrontendError::Busy { id: 4 }.to_string();
        for needle in ["4", "open", "--force"] {
            assert!(
                message.contains(needle),
                "{needle:?} missing from {message}"
            );
        }
    }

    #[test]
    fn without_the_driver_the_error_says_how_to_fix_it() {
        let message = UblkFrontendError::NoDriver.to_string();
        for needle in ["modprobe ublk_drv", "CONFIG_BLK_DEV_UBLK", "6.0", "--fuse"] {
            assert!(
                message.contains(needle),
                "{needle:?} missing from {message}"
            );
        }
    }
}
