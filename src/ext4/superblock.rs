//! The superblock and the group descriptor table: counts, features and the
//! identity (UUID, hash seed) of an image.

use super::layout::{block_bitmap, inode_bitmap, inode_table, DESC_SIZE};
use super::{put16, put32, BLOCKS_PER_GROUP, BLOCK_SIZE, INODES_PER_GROUP, INODE_SIZE};

const COMPAT_EXT_ATTR: u32 = 0x0008;
const COMPAT_DIR_INDEX: u32 = 0x0020;
const COMPAT_SPARSE_SUPER2: u32 = 0x0200;
/// `s_magic`.
pub const MAGIC: u16 = 0xEF53;
const INCOMPAT_FILETYPE: u32 = 0x0002;
const INCOMPAT_EXTENTS: u32 = 0x0040;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;
/// `s_flags`: directory hashes treat names as unsigned bytes.
const FLAGS_UNSIGNED_HASH: u32 = 0x0002;

/// The image-wide facts the superblock records.
#[derive(Debug, Clone)]
pub struct Summary {
    pub blocks: u64,
    pub groups: u32,
    pub free_blocks: u64,
    pub free_inodes: u32,
    pub uuid: [u8; 16],
    pub hash_seed: [u32; 4],
    /// Creation and last-write time: fixed, never the clock.
    pub time: u32,
}

/// The 1024-byte superblock (it sits at byte 1024 of block 0).
pub fn encode_superblock(s: &Summary) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    put32(&mut b, 0, s.groups * INODES_PER_GROUP);
    put32(&mut b, 4, s.blocks as u32);
    put32(&mut b, 12, s.free_blocks as u32);
    put32(&mut b, 16, s.free_inodes);
    put32(&mut b, 20, 0); // s_first_data_block
    put32(&mut b, 24, 2); // 1024 << 2
    put32(&mut b, 28, 2);
    put32(&mut b, 32, BLOCKS_PER_GROUP);
    put32(&mut b, 36, BLOCKS_PER_GROUP);
    put32(&mut b, 40, INODES_PER_GROUP);
    put32(&mut b, 48, s.time); // s_wtime
    put16(&mut b, 54, 0xFFFF); // s_max_mnt_count: no forced checks
    put16(&mut b, 56, MAGIC);
    put16(&mut b, 58, 1); // clean
    put16(&mut b, 60, 1); // errors: continue
    put32(&mut b, 64, s.time); // s_lastcheck
    put32(&mut b, 76, 1); // dynamic revision
    put32(&mut b, 84, super::LOST_FOUND_INO); // s_first_ino
    put16(&mut b, 88, INODE_SIZE as u16);
    put32(
        &mut b,
        92,
        COMPAT_EXT_ATTR | COMPAT_DIR_INDEX | COMPAT_SPARSE_SUPER2,
    );
    put32(&mut b, 96, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS);
    put32(
        &mut b,
        100,
        RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE,
    );
    b[104..120].copy_from_slice(&s.uuid);
    for (i, w) in s.hash_seed.iter().enumerate() {
        put32(&mut b, 236 + 4 * i, *w);
    }
    b[252] = super::dir::HASH_HALF_MD4;
    put32(&mut b, 256, 0x000C); // default mount options: user_xattr, acl
    put32(&mut b, 264, s.time); // s_mkfs_time
    put32(&mut b, 336, (s.blocks >> 32) as u32);
    put32(&mut b, 344, (s.free_blocks >> 32) as u32);
    put16(&mut b, 348, super::EXTRA_ISIZE);
    put16(&mut b, 350, super::EXTRA_ISIZE);
    put32(&mut b, 352, FLAGS_UNSIGNED_HASH);
    b
}

/// One group's counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupCounts {
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub dirs: u32,
}

/// The descriptor table, padded to whole blocks.
pub fn encode_gdt(groups: &[GroupCounts]) -> Vec<u8> {
    let len = (groups.len() * DESC_SIZE).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let mut b = vec![0u8; len];
    for (g, c) in groups.iter().enumerate() {
        let off = g * DESC_SIZE;
        let gi = g as u32;
        put32(&mut b, off, block_bitmap(gi) as u32);
        put32(&mut b, off + 4, inode_bitmap(gi) as u32);
        put32(&mut b, off + 8, inode_table(gi) as u32);
        put16(&mut b, off + 12, c.free_blocks as u16);
        put16(&mut b, off + 14, c.free_inodes as u16);
        put16(&mut b, off + 16, c.dirs as u16);
    }
    b
}
