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
//! Teardown order: the kernel aborts every tag's command after STOP_DEV
//! (or when the device is deleted); each queue thread returns once all its
//! tags have seen that, dropping its buffers, then its ring; `run_target`
//! joins the threads and closes `/dev/ublkcN`; only then is the device
//! deleted, so the delete never waits on our own open file.
//!
//! With `recoverable`, the device is created with `UBLK_F_USER_RECOVERY`
//! and `UBLK_F_USER_RECOVERY_REISSUE`: if the process dies, the kernel
//! keeps the device and holds its I/O; [`Start::Recover`] in a new process
//! re-attaches and the held requests are issued again.

mod mode;
mod queue;
mod ring_io;

pub use mode::CopyMode;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use tokio::runtime::Handle;

use crate::engine::Engine;

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
/// flushes run on `runtime`, which must outlive the call.
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
    let ctrl = match start {
        Start::Add(opts) => {
            let mode = CopyMode::choose(UblkCtrl::get_features(), opts.zero_copy);
            let flags = if opts.recoverable { RECOVERY_FLAGS } else { 0 } | mode.ctrl_flags();
            UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(opts.id.map_or(-1, |id| id as i32))
                .nr_queues(opts.queues)
                .depth(opts.depth)
                .io_buf_bytes(MAX_IO_BYTES)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| UblkFrontendError::Add {
                    source: os_error(e),
                })?
        }
        Start::Recover { id } => {
            // The recovering control must be sized like the device it takes over.
            let old = open(id)?.dev_info();
            let ctrl = UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(id as i32)
                .nr_queues(old.nr_hw_queues)
                .depth(old.queue_depth)
                .io_buf_bytes(old.max_io_buf_bytes)
                .ctrl_flags(old.flags & RECOVERY_FLAGS | CopyMode::of_flags(old.flags).ctrl_flags())
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|e| UblkFrontendError::Recover {
                    id,
                    source: os_error(e),
                })?;
            ctrl.start_user_recover()
                .map_err(|e| UblkFrontendError::Recover {
                    id,
                    source: os_error(e),
                })?;
            ctrl
        }
    };
    let info = ctrl.dev_info();
    let read_only = engine.read_only();
    let set_params = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = device_params(size, dev.dev_info.max_io_buf_bytes, read_only);
        Ok(())
    };
    let queue_engine = engine.clone();
    let run_queue = move |qid: u16, dev: &UblkDev| {
        queue::run_queue(qid, dev, queue_engine, runtime);
    };
    let live = move |ctrl: &UblkCtrl| {
        let info = ctrl.dev_info();
        started(DeviceInfo {
            id: info.dev_id,
            path: device_path(info.dev_id),
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            recoverable: info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0,
            mode: CopyMode::of_flags(info.flags),
        });
    };
    let ran = ctrl
        .run_target(set_params, run_queue, live)
        .map_err(|e| UblkFrontendError::Run {
            source: os_error(e),
        });
    // The queues are down and /dev/ublkcN is closed: delete now (a device
    // added here would be deleted when `ctrl` drops, a recovered one not).
    if let Err(e) = ctrl.del_dev() {
        tracing::debug!(id = info.dev_id, "delete after stop: {e}");
    }
    ran.map(|_| ())
}

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
            max_discard_sectors: max_sectors,
            max_write_zeroes_sectors: max_sectors,
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    params
}

/// Stops device `id` (STOP_DEV): its queues abort and the process serving
/// it returns from [`serve`]. Flush first: requests in flight are failed.
pub fn stop(id: u32) -> Result<(), UblkFrontendError> {
    let ctrl = open(id)?;
    ctrl.kill_dev()
        .map(|_| ())
        .map_err(|e| UblkFrontendError::Stop {
            id,
            source: os_error(e),
        })
}

/// Deletes device `id` whose process is gone (an orphan).
pub fn delete(id: u32) -> Result<(), UblkFrontendError> {
    let ctrl = open(id)?;
    ctrl.del_dev()
        .map(|_| ())
        .map_err(|e| UblkFrontendError::Delete {
            id,
            source: os_error(e),
        })
}

fn open(id: u32) -> Result<UblkCtrl, UblkFrontendError> {
    require_driver()?;
    UblkCtrl::new_simple(id as i32).map_err(|e| UblkFrontendError::Open {
        id,
        source: os_error(e),
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

/// A driver feature flag and whether the running kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub supported: bool,
    /// The first kernel version that has it.
    pub since: &'static str,
    pub what: &'static str,
}

/// The feature flags this program knows, with the kernel that brought each.
const KNOWN_FEATURES: &[(u32, &str, &str, &str)] = &[
    (
        sys::UBLK_F_SUPPORT_ZERO_COPY,
        "SUPPORT_ZERO_COPY",
        "6.0",
        "zero-copy (never enabled by the driver)",
    ),
    (
        sys::UBLK_F_URING_CMD_COMP_IN_TASK,
        "URING_CMD_COMP_IN_TASK",
        "6.0",
        "complete commands in task context",
    ),
    (
        sys::UBLK_F_NEED_GET_DATA,
        "NEED_GET_DATA",
        "6.0",
        "server supplies write buffers late",
    ),
    (
        sys::UBLK_F_USER_RECOVERY,
        "USER_RECOVERY",
        "6.0",
        "device survives its server's death (`--recoverable`)",
    ),
    (
        sys::UBLK_F_USER_RECOVERY_REISSUE,
        "USER_RECOVERY_REISSUE",
        "6.0",
        "held requests re-issued after recovery",
    ),
    (
        sys::UBLK_F_UNPRIVILEGED_DEV,
        "UNPRIVILEGED_DEV",
        "6.2",
        "devices for unprivileged users",
    ),
    (
        sys::UBLK_F_CMD_IOCTL_ENCODE,
        "CMD_IOCTL_ENCODE",
        "6.2",
        "ioctl-encoded command opcodes",
    ),
    (
        sys::UBLK_F_USER_COPY,
        "USER_COPY",
        "6.5",
        "server copies data with pread/pwrite on /dev/ublkcN",
    ),
    (sys::UBLK_F_ZONED, "ZONED", "6.6", "zoned block devices"),
    (
        sys::UBLK_F_USER_RECOVERY_FAIL_IO,
        "USER_RECOVERY_FAIL_IO",
        "6.11",
        "fail I/O while waiting for recovery",
    ),
    (
        sys::UBLK_F_UPDATE_SIZE,
        "UPDATE_SIZE",
        "6.16",
        "resize a live device",
    ),
    (
        sys::UBLK_F_AUTO_BUF_REG,
        "AUTO_BUF_REG",
        "6.16",
        "automatic zero-copy buffer registration",
    ),
    (
        sys::UBLK_F_QUIESCE,
        "QUIESCE",
        "6.16",
        "quiesce a live device for hand-over",
    ),
    (
        sys::UBLK_F_PER_IO_DAEMON,
        "PER_IO_DAEMON",
        "6.16",
        "several threads per queue",
    ),
    (
        sys::UBLK_F_BUF_REG_OFF_DAEMON,
        "BUF_REG_OFF_DAEMON",
        "6.16",
        "register buffers off the queue thread",
    ),
];

/// What the running kernel's ublk driver supports (GET_FEATURES, 6.5+).
pub fn features() -> Result<Vec<Feature>, UblkFrontendError> {
    require_driver()?;
    let bits = UblkCtrl::get_features().ok_or(UblkFrontendError::Features)?;
    Ok(KNOWN_FEATURES
        .iter()
        .map(|&(bit, name, since, what)| Feature {
            name,
            supported: bits & u64::from(bit) != 0,
            since,
            what,
        })
        .collect())
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
