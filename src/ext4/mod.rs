//! Deterministic ext4: the on-disk encodings and the fixed geometry.
//!
//! This module is pure format code. It knows where every structure of an
//! image lives and how each is encoded, and it never touches a file: the
//! flattener ([`crate::flatten`]) decides what the tree holds and writes the
//! bytes these functions return at the offsets [`layout`] gives.
//!
//! Invariants kept here:
//! * The geometry is fixed and independent of content ([`layout`]): only the
//!   number of groups varies between images, so the same block of the same
//!   file lands at the same offset whatever follows it.
//! * Every encoder is a pure function of its arguments: no clock, no
//!   randomness, no environment.
//! * No journal, no checksums (`metadata_csum` off), no backup superblocks
//!   (`sparse_super2` with none), no `resize_inode`: nothing in the image
//!   repeats or summarises bytes that live elsewhere, so a change stays local.

pub mod dir;
pub mod extent;
pub mod hash;
pub mod inode;
pub mod layout;
pub mod scan;
pub mod superblock;
pub mod xattr;

/// Bytes per block.
pub const BLOCK_SIZE: usize = 4096;
/// Blocks per group: a block bitmap of exactly one block.
pub const BLOCKS_PER_GROUP: u32 = 32768;
/// Inodes per group (one per 16 KiB of group, as mke2fs's default ratio).
pub const INODES_PER_GROUP: u32 = 8192;
/// Bytes per inode: room for nanosecond times and in-inode xattrs.
pub const INODE_SIZE: usize = 256;
/// `i_extra_isize`: the fields after the 128-byte base inode we fill.
pub const EXTRA_ISIZE: u16 = 32;
/// Blocks of inode table per group.
pub const INODE_TABLE_BLOCKS: u32 = INODES_PER_GROUP * INODE_SIZE as u32 / BLOCK_SIZE as u32;
/// The root directory's inode.
pub const ROOT_INO: u32 = 2;
/// `lost+found`, the first non-reserved inode, as mke2fs makes it.
pub const LOST_FOUND_INO: u32 = 11;
/// The first inode number for image content.
pub const FIRST_FREE_INO: u32 = 12;

/// Why an image cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("image needs {groups} block groups, more than the {max} this layout reserves descriptors for")]
    TooManyGroups { groups: u64, max: u64 },
    #[error("extended attribute {name:?} has a namespace ext4 cannot store")]
    XattrNamespace { name: String },
    #[error("extended attributes take {bytes} bytes, more than one block holds")]
    XattrTooLarge { bytes: usize },
    #[error("POSIX ACL in {name:?} is malformed")]
    AclMalformed { name: String },
    #[error("symlink target of {len} bytes is empty or longer than a block")]
    SymlinkTarget { len: usize },
    #[error("directory holds too many entries for a two-level hashed index")]
    DirectoryTooLarge,
    #[error("file of {bytes} bytes exceeds what this layout addresses")]
    FileTooLarge { bytes: u64 },
}

/// Writes `v` little-endian at `buf[off..]`.
pub(crate) fn put16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
