//! `lazyblk features`: the driver's `UBLK_F_*` bits by name, with the
//! kernel that brought each.

use libublk::sys;

use super::{
    driver_features, require_driver, UblkFrontendError, UBLK_F_IO_DESC_SIZE,
    UBLK_F_NO_AUTO_PART_SCAN, UBLK_F_SAFE_STOP_DEV,
};

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
const KNOWN_FEATURES: &[(u64, &str, &str, &str)] = &[
    (
        sys::UBLK_F_SUPPORT_ZERO_COPY as u64,
        "SUPPORT_ZERO_COPY",
        "6.15",
        "zero copy with explicit buffer registration (defined since 6.0, working since 6.15)",
    ),
    (
        sys::UBLK_F_URING_CMD_COMP_IN_TASK as u64,
        "URING_CMD_COMP_IN_TASK",
        "6.0",
        "complete commands in task context",
    ),
    (
        sys::UBLK_F_NEED_GET_DATA as u64,
        "NEED_GET_DATA",
        "6.0",
        "server supplies write buffers late",
    ),
    (
        sys::UBLK_F_USER_RECOVERY as u64,
        "USER_RECOVERY",
        "6.0",
        "device survives its server's death (`--recoverable`)",
    ),
    (
        sys::UBLK_F_USER_RECOVERY_REISSUE as u64,
        "USER_RECOVERY_REISSUE",
        "6.0",
        "held requests re-issued after recovery",
    ),
    (
        sys::UBLK_F_UNPRIVILEGED_DEV as u64,
        "UNPRIVILEGED_DEV",
        "6.2",
        "devices for unprivileged users",
    ),
    (
        sys::UBLK_F_CMD_IOCTL_ENCODE as u64,
        "CMD_IOCTL_ENCODE",
        "6.2",
        "ioctl-encoded command opcodes",
    ),
    (
        sys::UBLK_F_USER_COPY as u64,
        "USER_COPY",
        "6.5",
        "server copies data with pread/pwrite on /dev/ublkcN",
    ),
    (
        sys::UBLK_F_ZONED as u64,
        "ZONED",
        "6.6",
        "zoned block devices",
    ),
    (
        sys::UBLK_F_USER_RECOVERY_FAIL_IO as u64,
        "USER_RECOVERY_FAIL_IO",
        "6.13",
        "fail I/O while waiting for recovery",
    ),
    (
        sys::UBLK_F_UPDATE_SIZE as u64,
        "UPDATE_SIZE",
        "6.16",
        "resize a live device",
    ),
    (
        sys::UBLK_F_AUTO_BUF_REG as u64,
        "AUTO_BUF_REG",
        "6.16",
        "automatic zero-copy buffer registration",
    ),
    (
        sys::UBLK_F_QUIESCE as u64,
        "QUIESCE",
        "6.16",
        "quiesce a live device for hand-over",
    ),
    (
        sys::UBLK_F_PER_IO_DAEMON as u64,
        "PER_IO_DAEMON",
        "6.16",
        "several threads per queue",
    ),
    (
        sys::UBLK_F_BUF_REG_OFF_DAEMON as u64,
        "BUF_REG_OFF_DAEMON",
        "6.16",
        "register buffers off the queue thread",
    ),
    (
        sys::UBLK_F_BATCH_IO as u64,
        "BATCH_IO",
        "7.0",
        "fetch and commit many requests per command",
    ),
    (
        sys::UBLK_F_INTEGRITY as u64,
        "INTEGRITY",
        "7.0",
        "integrity (PI) metadata with each request",
    ),
    (
        UBLK_F_SAFE_STOP_DEV,
        "SAFE_STOP_DEV",
        "7.0",
        "stop refused while the disk is open (`del` without `--force`)",
    ),
    (
        UBLK_F_NO_AUTO_PART_SCAN,
        "NO_AUTO_PART_SCAN",
        "7.0",
        "no partition scan at start (set on every device)",
    ),
    (
        sys::UBLK_F_SHMEM_ZC as u64,
        "SHMEM_ZC",
        "7.1",
        "zero-copy through registered shared memory",
    ),
    (
        UBLK_F_IO_DESC_SIZE,
        "IO_DESC_SIZE",
        "7.3",
        "per-device I/O descriptor size",
    ),
];

/// What the running kernel's ublk driver supports (GET_FEATURES, 6.5+).
pub fn features() -> Result<Vec<Feature>, UblkFrontendError> {
    require_driver()?;
    let bits = driver_features()?.ok_or(UblkFrontendError::Features)?;
    Ok(KNOWN_FEATURES
        .iter()
        .map(|&(bit, name, since, what)| Feature {
            name,
            supported: bits & bit != 0,
            since,
            what,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_bit_is_listed_once_with_a_version() {
        let mut seen = 0u64;
        for &(bit, name, since, _) in KNOWN_FEATURES {
            assert_eq!(bit.count_ones(), 1, "{name}");
            assert_eq!(seen & bit, 0, "{name} listed twice");
            seen |= bit;
            assert!(
                since.split('.').all(|n| n.parse::<u32>().is_ok()),
                "{name}: {since}"
            );
        }
        // Every UBLK_F_* bit of the 7.3 uapi header, 0 through 20.
        assert_eq!(seen, (1 << 21) - 1);
    }
}
