//! Extent trees: a file's runs of blocks as the root in `i_block` (up to
//! four extents) or, past that, leaf blocks of 340 extents under as many
//! levels of index blocks as needed.

use super::{put16, put32, BLOCK_SIZE};

/// `eh_magic`: every extent tree node starts with it.
pub const MAGIC: u16 = 0xF30A;
/// Extents or index entries per tree block: (4096 - 12) / 12.
const PER_BLOCK: usize = (BLOCK_SIZE - 12) / 12;
const IN_ROOT: usize = 4;
/// The longest initialized extent.
pub const MAX_LEN: u32 = 32768;

/// `len` blocks of the file from `logical` on, stored from block
/// [`Extent::start`] on.
///
/// The 48-bit start is kept in two halves, as on disk: twelve bytes instead
/// of sixteen, for every file an image holds in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub len: u16,
    start_hi: u16,
    start_lo: u32,
}

impl Extent {
    /// `start` must be below 2^48, as every ext4 block number is.
    pub fn new(logical: u32, start: u64, len: u16) -> Extent {
        debug_assert!(start >> 48 == 0, "block {start} beyond 48 bits");
        Extent {
            logical,
            len,
            start_hi: (start >> 32) as u16,
            start_lo: start as u32,
        }
    }

    /// The first physical block.
    pub fn start(&self) -> u64 {
        u64::from(self.start_hi) << 32 | u64::from(self.start_lo)
    }
}

/// Appends one block at `logical` stored at `physical`, extending the last
/// extent when both continue it.
pub fn push_block(extents: &mut Vec<Extent>, logical: u32, physical: u64) {
    if let Some(last) = extents.last_mut() {
        let len = u32::from(last.len);
        if last.logical + len == logical
            && last.start() + u64::from(len) == physical
            && len < MAX_LEN - 1
        {
            last.len += 1;
            return;
        }
    }
    extents.push(Extent::new(logical, physical, 1));
}

/// Tree blocks needed to map `n` extents (0 when they fit the inode).
pub fn tree_blocks_needed(n: usize) -> usize {
    let mut total = 0;
    let mut level = n;
    while level > IN_ROOT {
        level = level.div_ceil(PER_BLOCK);
        total += level;
    }
    total
}

fn header(buf: &mut [u8], entries: usize, max: usize, depth: u16) {
    put16(buf, 0, MAGIC);
    put16(buf, 2, entries as u16);
    put16(buf, 4, max as u16);
    put16(buf, 6, depth);
}

fn put_leaf(buf: &mut [u8], off: usize, e: &Extent) {
    put32(buf, off, e.logical);
    put16(buf, off + 4, e.len);
    put16(buf, off + 6, e.start_hi);
    put32(buf, off + 8, e.start_lo);
}

fn put_index(buf: &mut [u8], off: usize, logical: u32, child: u64) {
    put32(buf, off, logical);
    put32(buf, off + 4, child as u32);
    put16(buf, off + 8, (child >> 32) as u16);
}

/// The tree over `extents` (sorted by logical block): the `i_block` root
/// and one block image per entry of `blocks`, which must hold exactly
/// [`tree_blocks_needed`] physical block numbers, leaves first.
pub fn build(extents: &[Extent], blocks: &[u64]) -> ([u8; 60], Vec<Vec<u8>>) {
    assert_eq!(
        blocks.len(),
        tree_blocks_needed(extents.len()),
        "caller allocates the tree"
    );
    let mut root = [0u8; 60];
    if extents.len() <= IN_ROOT {
        header(&mut root, extents.len(), IN_ROOT, 0);
        for (i, e) in extents.iter().enumerate() {
            put_leaf(&mut root, 12 + 12 * i, e);
        }
        return (root, Vec::new());
    }
    let mut images = Vec::with_capacity(blocks.len());
    let mut next_block = blocks.iter();
    // (first logical block, physical block) of each node of the level below.
    let mut level: Vec<(u32, u64)> = Vec::new();
    for group in extents.chunks(PER_BLOCK) {
        let mut buf = vec![0u8; BLOCK_SIZE];
        header(&mut buf, group.len(), PER_BLOCK, 0);
        for (i, e) in group.iter().enumerate() {
            put_leaf(&mut buf, 12 + 12 * i, e);
        }
        let phys = *next_block.next().expect("counted");
        level.push((group[0].logical, phys));
        images.push(buf);
    }
    let mut depth = 1u16;
    while level.len() > IN_ROOT {
        let mut upper = Vec::new();
        for group in level.chunks(PER_BLOCK) {
            let mut buf = vec![0u8; BLOCK_SIZE];
            header(&mut buf, group.len(), PER_BLOCK, depth);
            for (i, &(logical, child)) in group.iter().enumerate() {
                put_index(&mut buf, 12 + 12 * i, logical, child);
            }
            let phys = *next_block.next().expect("counted");
            upper.push((group[0].0, phys));
            images.push(buf);
        }
        level = upper;
        depth += 1;
    }
    header(&mut root, level.len(), IN_ROOT, depth);
    for (i, &(logical, child)) in level.iter().enumerate() {
        put_index(&mut root, 12 + 12 * i, logical, child);
    }
    (root, images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_grow_levels_only_when_needed() {
        assert_eq!(tree_blocks_needed(4), 0);
        assert_eq!(tree_blocks_needed(5), 1);
        assert_eq!(tree_blocks_needed(340 * 4), 4);
        assert_eq!(tree_blocks_needed(340 * 4 + 1), 5 + 1);
        let extents: Vec<Extent> = (0..2000)
            .map(|i| Extent::new(i * 2, 1000 + u64::from(i) * 2, 1))
            .collect();
        let blocks: Vec<u64> = (0..tree_blocks_needed(2000) as u64)
            .map(|b| 5000 + b)
            .collect();
        let (root, images) = build(&extents, &blocks);
        assert_eq!(u16::from_le_bytes([root[6], root[7]]), 2);
        assert_eq!(images.len(), blocks.len());
    }

    #[test]
    fn starts_keep_all_48_bits() {
        let e = Extent::new(7, 0xABCD_1234_5678, 3);
        assert_eq!(e.start(), 0xABCD_1234_5678);
        let mut leaf = [0u8; 12];
        put_leaf(&mut leaf, 0, &e);
        assert_eq!(leaf[6..8], [0xCD, 0xAB]);
        assert_eq!(leaf[8..12], [0x78, 0x56, 0x34, 0x12]);
        assert_eq!(std::mem::size_of::<Extent>(), 12);
    }

    #[test]
    fn push_block_merges_only_contiguous_runs() {
        let mut e = Vec::new();
        push_block(&mut e, 0, 10);
        push_block(&mut e, 1, 11);
        push_block(&mut e, 3, 12);
        assert_eq!(e, vec![Extent::new(0, 10, 2), Extent::new(3, 12, 1)]);
    }
}
