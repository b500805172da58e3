//! The 256-byte inode: ownership, times with nanoseconds, sizes, the
//! 60-byte `i_block` area (extent root, fast symlink target or device
//! number) and the in-inode extended attributes after `i_extra_isize`.

use super::{put16, put32, EXTRA_ISIZE, INODE_SIZE};

pub const S_IFIFO: u16 = 0o010000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFLNK: u16 = 0o120000;

/// `i_flags`: the inode maps its blocks with an extent tree.
pub const EXTENTS_FL: u32 = 0x0008_0000;
/// `i_flags`: the directory carries a hashed index.
pub const INDEX_FL: u32 = 0x0000_1000;

/// Offset of the in-inode extended attribute area.
pub const IBODY_XATTR_OFFSET: usize = 128 + EXTRA_ISIZE as usize;
/// Bytes of in-inode extended attribute area (magic included).
pub const IBODY_XATTR_SIZE: usize = INODE_SIZE - IBODY_XATTR_OFFSET;

/// Everything an inode records, already resolved to on-disk values.
#[derive(Debug, Clone)]
pub struct Inode {
    /// File type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    /// Blocks in 512-byte units, data, tree and attribute blocks together.
    pub sectors: u64,
    pub flags: u32,
    pub block: [u8; 60],
    /// The external attribute block, or 0.
    pub file_acl: u64,
    pub secs: i64,
    pub nanos: u32,
    /// The in-inode attribute area ([`IBODY_XATTR_SIZE`] bytes), if any.
    pub ibody_xattrs: Option<Vec<u8>>,
}

/// Splits a time into the 32-bit seconds field and the `_extra` field
/// (two epoch bits extending the range past 2038, then nanoseconds).
pub fn encode_time(secs: i64, nanos: u32) -> (u32, u32) {
    let low = secs as i32;
    let epoch = ((secs - i64::from(low)) >> 32) as u32 & 3;
    (low as u32, epoch | (nanos << 2))
}

/// The `i_block` area of a character or block device, in the encoding the
/// kernel writes: the old 16-bit form when both numbers fit a byte.
pub fn encode_device(major: u32, minor: u32) -> [u8; 60] {
    let mut block = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut block, 0, (major << 8) | minor);
    } else {
        put32(
            &mut block,
            4,
            (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
        );
    }
    block
}

impl Inode {
    pub fn encode(&self) -> [u8; INODE_SIZE] {
        let mut b = [0u8; INODE_SIZE];
        let (t, extra) = encode_time(self.secs, self.nanos);
        put16(&mut b, 0, self.mode);
        put16(&mut b, 2, self.uid as u16);
        put32(&mut b, 4, self.size as u32);
        put32(&mut b, 8, t); // atime
        put32(&mut b, 12, t); // ctime
        put32(&mut b, 16, t); // mtime
        put16(&mut b, 24, self.gid as u16);
        put16(&mut b, 26, self.links);
        put32(&mut b, 28, self.sectors as u32);
        put32(&mut b, 32, self.flags);
        b[40..100].copy_from_slice(&self.block);
        put32(&mut b, 104, self.file_acl as u32);
        put32(&mut b, 108, (self.size >> 32) as u32);
        put16(&mut b, 116, (self.sectors >> 32) as u16);
        put16(&mut b, 118, (self.file_acl >> 32) as u16);
        put16(&mut b, 120, (self.uid >> 16) as u16);
        put16(&mut b, 122, (self.gid >> 16) as u16);
        put16(&mut b, 128, EXTRA_ISIZE);
        put32(&mut b, 132, extra); // ctime
        put32(&mut b, 136, extra); // mtime
        put32(&mut b, 140, extra); // atime
        put32(&mut b, 144, t); // crtime
        put32(&mut b, 148, extra);
        if let Some(area) = &self.ibody_xattrs {
            b[IBODY_XATTR_OFFSET..IBODY_XATTR_OFFSET + area.len()].copy_from_slice(area);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_2038_and_before_1970_round_trip() {
        for (secs, nanos) in [
            (0i64, 0u32),
            (-1, 5),
            (1 << 31, 999_999_999),
            (-(1 << 31), 1),
            (3 << 32, 7),
        ] {
            let (lo, extra) = encode_time(secs, nanos);
            let back = i64::from(lo as i32) + (i64::from(extra & 3) << 32);
            assert_eq!(back, secs, "secs {secs}");
            assert_eq!(extra >> 2, nanos);
        }
    }

    #[test]
    fn devices_use_the_kernel_encodings() {
        let old = encode_device(8, 1);
        assert_eq!(u32::from_le_bytes(old[0..4].try_into().unwrap()), 0x801);
        let new = encode_device(259, 300);
        assert_eq!(u32::from_le_bytes(new[0..4].try_into().unwrap()), 0);
        assert_eq!(
            u32::from_le_bytes(new[4..8].try_into().unwrap()),
            (300 & 0xff) | (259 << 8) | ((300 & !0xff) << 12)
        );
    }
}
