//! Control commands on `/dev/ublk-control`: each one bounded in time, and
//! the two that libublk 0.4.8 cannot send.
//!
//! libublk's control calls block in `io_uring_enter` until the driver
//! answers, and some kernels never answer (ADD_DEV has hung on 6.17). So
//! every command runs on a helper thread through [`bounded`], which waits at
//! most a given time and then reports which command hung. The hung thread
//! is left behind: it sits in the kernel, holding only its own ring and the
//! command's buffer, until the process exits (the caller's error ends it).
//! What the hung command leaves in the driver depends on where it hung: an
//! ADD_DEV may or may not have created `/dev/ublkcN` (`lazyblk list` shows
//! no record for it; `lazyblk del -n N` removes it).
//!
//! libublk refuses `ctrl_flags` it does not know (it predates
//! `UBLK_F_NO_AUTO_PART_SCAN`) and has no call for `UBLK_U_CMD_TRY_STOP_DEV`;
//! [`add_dev`] and [`try_stop_dev`] send those commands themselves. Both
//! need the driver's ioctl-encoded opcodes (6.2+), which every driver with
//! the newer flags has.
#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use libublk::sys;

use super::{UblkFrontendError, CONTROL_PATH};

/// How long any control command may take before we give up on it. START_DEV
/// includes the kernel's partition scan (reads through the engine), so this
/// leaves room for a slow store.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `command` (a control command named `name`) on a helper thread and
/// waits at most `timeout` for it. libublk keeps its control ring per
/// thread, so the helper makes its own before `command` runs.
pub fn bounded<T, F>(
    name: &'static str,
    timeout: Duration,
    command: F,
) -> Result<T, UblkFrontendError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, UblkFrontendError> + Send + 'static,
{
    let (done, result) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("ublk-{}", name.to_ascii_lowercase()))
        .spawn(move || {
            let outcome = init_thread_ring().and_then(|()| command());
            // The caller may have given up: nobody to tell then.
            let _ = done.send(outcome);
        })
        .map_err(|source| UblkFrontendError::Control {
            command: name,
            source,
        })?;
    match result.recv_timeout(timeout) {
        Ok(outcome) => outcome,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(UblkFrontendError::Timeout {
            command: name,
            timeout,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(UblkFrontendError::Control {
            command: name,
            source: std::io::Error::other("the control thread panicked"),
        }),
    }
}

/// libublk sends control commands on a ring kept per thread and panics
/// where there is none.
fn init_thread_ring() -> Result<(), UblkFrontendError> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                IoUring::<squeue::Entry128>::builder()
                    .build(4)
                    .map_err(libublk::UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| UblkFrontendError::Control {
        command: "control ring setup",
        source: super::os_error(e),
    })
}

/// What ADD_DEV is asked for (`struct ublksrv_ctrl_dev_info`'s inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddRequest {
    /// `None` lets the driver pick.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    pub max_io_buf_bytes: u32,
    pub flags: u64,
}

/// Sends ADD_DEV and returns the device id the driver gave.
pub fn add_dev(request: AddRequest) -> std::io::Result<u32> {
    let mut info = [0u8; DEV_INFO_LEN];
    info[0..2].copy_from_slice(&request.queues.to_le_bytes());
    info[2..4].copy_from_slice(&request.depth.to_le_bytes());
    info[8..12].copy_from_slice(&request.max_io_buf_bytes.to_le_bytes());
    info[12..16].copy_from_slice(&request.id.unwrap_or(u32::MAX).to_le_bytes());
    info[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    info[24..32].copy_from_slice(&request.flags.to_le_bytes());
    let dev_id = request.id.unwrap_or(u32::MAX);
    command(sys::UBLK_U_CMD_ADD_DEV, dev_id, Some(&mut info))?;
    Ok(u32::from_le_bytes(
        info[12..16].try_into().expect("4 bytes"),
    ))
}

/// Sends TRY_STOP_DEV: stops device `id` like STOP_DEV, unless its block
/// device is open (EBUSY), e.g. mounted.
pub fn try_stop_dev(id: u32) -> std::io::Result<()> {
    command(sys::UBLK_U_CMD_TRY_STOP_DEV, id, None).map(|_| ())
}

/// `sizeof(struct ublksrv_ctrl_dev_info)`.
const DEV_INFO_LEN: usize = 64;

/// One control command on a ring of its own. `buffer` is the command's
/// in/out buffer (`addr`, `len` of `struct ublksrv_ctrl_cmd`).
fn command(op: u32, dev_id: u32, buffer: Option<&mut [u8; DEV_INFO_LEN]>) -> std::io::Result<i32> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL_PATH)?;
    let (addr, len) = match buffer {
        Some(buffer) => (buffer.as_mut_ptr() as u64, DEV_INFO_LEN as u16),
        None => (0, 0),
    };
    // struct ublksrv_ctrl_cmd: dev_id, queue_id (-1: not for a queue), len,
    // addr, data[1], dev_path_len, pad, reserved.
    let mut cmd = [0u8; 80];
    cmd[0..4].copy_from_slice(&dev_id.to_le_bytes());
    cmd[4..6].copy_from_slice(&u16::MAX.to_le_bytes());
    cmd[6..8].copy_from_slice(&len.to_le_bytes());
    cmd[8..16].copy_from_slice(&addr.to_le_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(control.as_raw_fd()), op)
        .cmd(cmd)
        .build()
        .user_data(1);
    let mut ring = IoUring::<squeue::Entry128>::builder().build(2)?;
    // SAFETY: the SQE names `buffer` (through `addr`), which the caller
    // borrows mutably for this whole call. The driver runs control commands
    // to completion inside io_uring_enter (none is queued for later), and
    // we return only after reaping the completion below, so the kernel is
    // done with the buffer before the borrow ends.
    unsafe { ring.submission().push(&sqe) }.map_err(std::io::Error::other)?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Some(cqe) = ring.completion().next() {
            return match cqe.result() {
                res if res < 0 => Err(std::io::Error::from_raw_os_error(-res)),
                res => Ok(res),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_command_that_never_returns_is_reported_with_its_name_and_limit() {
        let started = Instant::now();
        let outcome: Result<(), _> = bounded("ADD_DEV", Duration::from_millis(100), || {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(())
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        let error = outcome.expect_err("the stand-in never returns");
        assert!(matches!(
            error,
            UblkFrontendError::Timeout {
                command: "ADD_DEV",
                ..
            }
        ));
        let message = error.to_string();
        for needle in ["ADD_DEV", "100ms"] {
            assert!(
                message.contains(needle),
                "{needle:?} missing from {message}"
            );
        }
    }

    #[test]
    fn a_command_that_returns_in_time_gives_its_result() {
        let outcome = bounded("GET_DEV_INFO", Duration::from_secs(10), || Ok(7u32));
        assert_eq!(outcome.unwrap(), 7);
        let failed: Result<(), _> = bounded("STOP_DEV", Duration::from_secs(10), || {
            Err(UblkFrontendError::Stop {
                id: 3,
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            })
        });
        assert!(matches!(failed, Err(UblkFrontendError::Stop { id: 3, .. })));
    }
}
