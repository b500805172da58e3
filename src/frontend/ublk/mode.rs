//! How request data moves between the kernel and the engine, decided once
//! per device at ADD_DEV from what the driver offers (GET_FEATURES).
//!
//! * [`CopyMode::Copy`]: each tag has a buffer; the driver copies a write's
//!   data into it before handing over the request, and a read's data out of
//!   it at commit. A warm read costs two copies (cache file → buffer →
//!   request pages). Every ublk kernel.
//! * [`CopyMode::ZeroCopy`]: `UBLK_F_AUTO_BUF_REG` (Linux 6.16): the driver
//!   registers the request's pages as a fixed buffer of the queue's
//!   io_uring, and the engine's cache I/O reads and writes them with
//!   `ReadFixed`/`WriteFixed`. A warm read is one copy (cache file →
//!   request pages), as in the loop driver; a miss still decrypts in memory
//!   and then reads the chunk back from the page cache.
//!
//! A device keeps its mode for life: recovery takes over the flags it was
//! added with.

use libublk::sys;

/// The data path of one ublk device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Per-tag buffers the driver copies to and from.
    Copy,
    /// The request's pages, registered in the queue's ring (`AUTO_BUF_REG`).
    ZeroCopy,
}

impl CopyMode {
    /// The mode a device added now gets: zero copy when `wanted` and the
    /// driver's feature mask (`None`: GET_FEATURES failed, a kernel before
    /// 6.5) has `AUTO_BUF_REG`.
    pub fn choose(features: Option<u64>, wanted: bool) -> CopyMode {
        match features {
            Some(bits) if wanted && bits & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0 => {
                CopyMode::ZeroCopy
            }
            _ => CopyMode::Copy,
        }
    }

    /// The mode of a device created with control `flags`.
    pub fn of_flags(flags: u64) -> CopyMode {
        if flags & u64::from(sys::UBLK_F_AUTO_BUF_REG) != 0 {
            CopyMode::ZeroCopy
        } else {
            CopyMode::Copy
        }
    }

    /// The control flags ADD_DEV needs for this mode.
    pub fn ctrl_flags(self) -> u64 {
        match self {
            CopyMode::Copy => 0,
            CopyMode::ZeroCopy => u64::from(sys::UBLK_F_AUTO_BUF_REG),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Copy => "copy",
            CopyMode::ZeroCopy => "zero-copy",
        }
    }
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET_FEATURES masks read in the VM guests (kernel-notes/vm-harness.md).
    const MASK_6_12: u64 = 0x1fe;
    const MASK_7_3: u64 = 0x1f_ffff;

    #[test]
    fn zero_copy_only_where_the_driver_offers_auto_buf_reg() {
        assert_eq!(CopyMode::choose(Some(MASK_6_12), true), CopyMode::Copy);
        assert_eq!(CopyMode::choose(Some(MASK_7_3), true), CopyMode::ZeroCopy);
        assert_eq!(CopyMode::choose(Some(MASK_7_3), false), CopyMode::Copy);
        assert_eq!(CopyMode::choose(None, true), CopyMode::Copy);
    }

    #[test]
    fn the_mode_round_trips_through_the_device_flags() {
        for mode in [CopyMode::Copy, CopyMode::ZeroCopy] {
            let flags = mode.ctrl_flags() | u64::from(sys::UBLK_F_USER_RECOVERY);
            assert_eq!(CopyMode::of_flags(flags), mode);
        }
        assert_eq!(
            serde_json::to_string(&CopyMode::ZeroCopy).unwrap(),
            "\"zero-copy\""
        );
    }
}
