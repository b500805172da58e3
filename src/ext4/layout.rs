//! The fixed geometry and the forward-only block allocator.
//!
//! Every group of [`BLOCKS_PER_GROUP`] blocks starts with its block bitmap,
//! its inode bitmap and its inode table, in that order. Group 0 first holds
//! the superblock (block 0) and [`GDT_BLOCKS`] blocks reserved for group
//! descriptors, of which only as many as the image needs are written; the
//! rest stay free and zero. None of these positions depend on the image's
//! size or content, so data placed after them never moves.
//!
//! The allocator only moves forward: a block, once handed out and then freed,
//! keeps its bytes and is never handed out again by this writer (the kernel
//! may reuse it after mounting). That keeps a lower layer's bytes where a
//! lower layer put them.

use super::{Ext4Error, BLOCKS_PER_GROUP, INODE_TABLE_BLOCKS};

/// Blocks after the superblock reserved for group descriptors: 64 blocks of
/// 128 descriptors each.
pub const GDT_BLOCKS: u32 = 64;
/// Bytes per group descriptor (no `64bit` feature).
pub const DESC_SIZE: usize = 32;
/// The most groups this layout describes (1 TiB of 4 KiB blocks).
pub const MAX_GROUPS: u32 = GDT_BLOCKS * (super::BLOCK_SIZE / DESC_SIZE) as u32;
/// Blocks per 512 KiB chunk, the unit the chunker cuts images into.
pub const CHUNK_BLOCKS: u64 = 128;
/// Blocks of bitmaps and inode table at the start of every group.
pub const GROUP_META_BLOCKS: u32 = 2 + INODE_TABLE_BLOCKS;

/// The first block of group `g`'s own metadata (its block bitmap).
pub fn meta_start(g: u32) -> u64 {
    u64::from(g) * u64::from(BLOCKS_PER_GROUP) + if g == 0 { 1 + u64::from(GDT_BLOCKS) } else { 0 }
}

pub fn block_bitmap(g: u32) -> u64 {
    meta_start(g)
}

pub fn inode_bitmap(g: u32) -> u64 {
    meta_start(g) + 1
}

pub fn inode_table(g: u32) -> u64 {
    meta_start(g) + 2
}

/// The first block of group `g` free for data.
pub fn data_start(g: u32) -> u64 {
    meta_start(g) + u64::from(GROUP_META_BLOCKS)
}

/// Whether `block` belongs to a group's fixed metadata (superblock,
/// descriptor area, bitmaps, inode table).
pub fn is_meta(block: u64) -> bool {
    let g = (block / u64::from(BLOCKS_PER_GROUP)) as u32;
    let group_start = u64::from(g) * u64::from(BLOCKS_PER_GROUP);
    block >= group_start && block < data_start(g)
}

/// A run of physical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u32,
}

/// Hands out blocks in increasing order and remembers which are in use.
#[derive(Debug, Default)]
pub struct Allocator {
    cursor: u64,
    /// One bit per block below the cursor: set while some inode owns it.
    used: Vec<u64>,
    used_count: u64,
}

impl Allocator {
    pub fn new() -> Self {
        Allocator {
            cursor: data_start(0),
            used: Vec::new(),
            used_count: 0,
        }
    }

    /// The next block the allocator would hand out, after skipping metadata.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    fn skip_meta(&mut self) {
        if is_meta(self.cursor) {
            let g = (self.cursor / u64::from(BLOCKS_PER_GROUP)) as u32;
            self.cursor = data_start(g);
        }
    }

    /// Moves the cursor to the next chunk boundary in a data area, so the
    /// next layer's bytes start a chunk of their own.
    pub fn align_to_chunk(&mut self) {
        self.skip_meta();
        self.cursor = self.cursor.div_ceil(CHUNK_BLOCKS) * CHUNK_BLOCKS;
        self.skip_meta();
        self.cursor = self.cursor.div_ceil(CHUNK_BLOCKS) * CHUNK_BLOCKS;
    }

    /// Up to `max` contiguous blocks at the cursor (at least one).
    pub fn alloc(&mut self, max: u32) -> Result<Run, Ext4Error> {
        self.skip_meta();
        let g = self.cursor / u64::from(BLOCKS_PER_GROUP);
        if g >= u64::from(MAX_GROUPS) {
            return Err(Ext4Error::TooManyGroups {
                groups: g + 1,
                max: u64::from(MAX_GROUPS),
            });
        }
        let group_end = (g + 1) * u64::from(BLOCKS_PER_GROUP);
        let len = (group_end - self.cursor).min(u64::from(max.max(1))) as u32;
        let run = Run {
            start: self.cursor,
            len,
        };
        self.cursor += u64::from(len);
        for b in run.start..run.start + u64::from(len) {
            self.set(b, true);
        }
        Ok(run)
    }

    /// Exactly `count` blocks, as few runs as the group boundaries allow.
    pub fn alloc_runs(&mut self, mut count: u64) -> Result<Vec<Run>, Ext4Error> {
        let mut runs: Vec<Run> = Vec::new();
        while count > 0 {
            let run = self.alloc(count.min(u64::from(u32::MAX)) as u32)?;
            count -= u64::from(run.len);
            runs.push(run);
        }
        Ok(runs)
    }

    /// Gives blocks back. Their bytes stay in the image; only the bitmap
    /// changes.
    pub fn free(&mut self, run: Run) {
        for b in run.start..run.start + u64::from(run.len) {
            self.set(b, false);
        }
    }

    fn set(&mut self, block: u64, on: bool) {
        let word = (block / 64) as usize;
        if word >= self.used.len() {
            self.used.resize(word + 1, 0);
        }
        let bit = 1u64 << (block % 64);
        let was = self.used[word] & bit != 0;
        if on && !was {
            self.used[word] |= bit;
            self.used_count += 1;
        } else if !on && was {
            self.used[word] &= !bit;
            self.used_count -= 1;
        }
    }

    pub fn is_used(&self, block: u64) -> bool {
        self.used
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1u64 << (block % 64)) != 0)
    }

    /// Blocks owned by inodes (not counting fixed metadata).
    pub fn used_count(&self) -> u64 {
        self.used_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_group_metadata_and_aligns_to_chunks() {
        let mut a = Allocator::new();
        a.align_to_chunk();
        assert_eq!(a.cursor() % CHUNK_BLOCKS, 0);
        assert!(a.cursor() >= data_start(0));
        let runs = a.alloc_runs(u64::from(BLOCKS_PER_GROUP)).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].start, data_start(1));
        for r in &runs {
            assert!(!is_meta(r.start) && !is_meta(r.start + u64::from(r.len) - 1));
        }
        assert_eq!(a.used_count(), u64::from(BLOCKS_PER_GROUP));
        a.free(runs[0]);
        assert!(!a.is_used(runs[0].start));
        assert!(a.is_used(runs[1].start));
    }
}
