//! Reading an image back, just far enough to know where its files lie: the
//! superblock and group descriptors (where the inode tables are) and the
//! extents of regular files in a piece of inode table.
//!
//! The engine uses this to guess which chunks a reader of one file will want
//! next (`engine::files`). The bytes come from an image a tenant made, so
//! every field is checked against the slice it is read from: a malformed
//! image yields fewer extents, never a panic. Any ext4 image is understood,
//! not only those this crate writes; an extent tree deeper than the inode's
//! own root is read a tree block at a time ([`Geometry::tree_node`]), as
//! the caller finds those blocks; inodes that use block maps are skipped.

use std::ops::Range;

use super::extent::MAGIC as EXTENT_MAGIC;
use super::inode::{EXTENTS_FL, S_IFDIR, S_IFREG};
use super::superblock::MAGIC;

const SUPERBLOCK_OFFSET: usize = 1024;
const INCOMPAT_64BIT: u32 = 0x80;
/// Where `i_block` starts in an inode, and its size.
const I_BLOCK: usize = 0x28;
const I_BLOCK_LEN: usize = 60;
/// Most groups whose descriptors are looked for: a bound on the work a
/// forged superblock can ask for.
const MAX_SCANNED_GROUPS: u64 = 1 << 20;

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Where an image's inode tables are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub inode_size: u64,
    /// Byte ranges of the image holding inode tables, of the groups whose
    /// descriptors were found, in the image's order and never
    /// overlapping (tables side by side make one range).
    pub inode_tables: Vec<Range<u64>>,
}

impl Geometry {
    /// Reads the superblock and as many group descriptors as `head`, the
    /// image's first bytes, holds. `None` if `head` holds no ext4
    /// superblock, or one whose sizes make no sense.
    pub fn parse(head: &[u8]) -> Option<Geometry> {
        let sb = head.get(SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + 1024)?;
        if le16(sb, 56)? != MAGIC {
            return None;
        }
        let log_block = le32(sb, 24)?;
        if log_block > 6 {
            return None;
        }
        let block_size = 1024u64 << log_block;
        let wide = le32(sb, 96)? & INCOMPAT_64BIT != 0;
        let blocks = u64::from(le32(sb, 4)?)
            | if wide {
                u64::from(le32(sb, 0x150)?) << 32
            } else {
                0
            };
        let first_data_block = u64::from(le32(sb, 20)?);
        let blocks_per_group = u64::from(le32(sb, 32)?);
        let inodes_per_group = u64::from(le32(sb, 40)?);
        let inode_size = u64::from(le16(sb, 88)?);
        let desc_size = if wide { u64::from(le16(sb, 254)?) } else { 32 };
        if blocks_per_group == 0
            || inodes_per_group == 0
            || !(128..=block_size).contains(&inode_size)
            || !inode_size.is_power_of_two()
            || !(32..=1024).contains(&desc_size)
        {
            return None;
        }
        let groups = blocks
            .saturating_sub(first_data_block)
            .div_ceil(blocks_per_group)
            .min(MAX_SCANNED_GROUPS);
        let image_bytes = blocks.saturating_mul(block_size);
        let table_bytes = inodes_per_group.checked_mul(inode_size)?;
        let gdt = (first_data_block + 1).checked_mul(block_size)?;
        let mut inode_tables = Vec::new();
        for g in 0..groups {
            let Some(at) = usize::try_from(gdt + g * desc_size).ok() else {
                break;
            };
            let Some(lo) = le32(head, at + 8) else {
                break;
            };
            let hi = if desc_size >= 64 {
                le32(head, at + 0x28).unwrap_or(0)
            } else {
                0
            };
            let block = u64::from(hi) << 32 | u64::from(lo);
            let Some(start) = block.checked_mul(block_size) else {
                continue;
            };
            let end = start.saturating_add(table_bytes).min(image_bytes);
            if start < end {
                inode_tables.push(start..end);
            }
        }
        // A forged table may list one table many times, or tables that
        // overlap: each byte of the image is read as an inode once.
        inode_tables.sort_by_key(|t| t.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(inode_tables.len());
        for table in inode_tables {
            match merged.last_mut() {
                Some(last) if table.start <= last.end => last.end = last.end.max(table.end),
                _ => merged.push(table),
            }
        }
        Some(Geometry {
            block_size,
            inode_size,
            inode_tables: merged,
        })
    }

    /// What the inodes of regular files lying in `bytes`, a piece of the
    /// image starting at byte `offset`, say about where their data is: one
    /// [`Node`] per file.
    pub fn files_in(&self, offset: u64, bytes: &[u8]) -> Vec<Node> {
        self.inodes_in(offset, bytes)
            .filter_map(|inode| self.tree_root(inode, S_IFREG))
            .collect()
    }

    /// Where the blocks of the directories whose inodes lie in `bytes` (as
    /// for [`Geometry::files_in`]) are, for those whose extents fit their
    /// inode, as nearly all do.
    pub fn directories_in(&self, offset: u64, bytes: &[u8]) -> Vec<Range<u64>> {
        self.inodes_in(offset, bytes)
            .filter_map(|inode| match self.tree_root(inode, S_IFDIR)? {
                Node::Extents(extents) => Some(extents),
                Node::Children(_) => None,
            })
            .flatten()
            .collect()
    }

    /// The whole inodes of every inode table that lie in `bytes`, a piece
    /// of the image starting at byte `offset`.
    fn inodes_in<'a>(&'a self, offset: u64, bytes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        let end = offset.saturating_add(bytes.len() as u64);
        self.inode_tables.iter().flat_map(move |table| {
            let (lo, hi) = (table.start.max(offset), table.end.min(end));
            // The first whole inode of the table within this piece.
            let first = (lo - table.start)
                .checked_next_multiple_of(self.inode_size)
                .and_then(|skip| skip.checked_add(table.start));
            let piece = match first {
                Some(first) if lo < hi => bytes
                    .get((first - offset) as usize..(hi - offset) as usize)
                    .unwrap_or_default(),
                _ => &[],
            };
            piece.chunks_exact(self.inode_size as usize)
        })
    }

    /// The extent tree root of an inode of file type `kind` in use.
    fn tree_root(&self, inode: &[u8], kind: u16) -> Option<Node> {
        let typed = le16(inode, 0)? & 0o170000 == kind;
        let linked = le16(inode, 0x1A)? > 0;
        let extents = le32(inode, 0x20)? & EXTENTS_FL != 0;
        if !(typed && linked && extents) {
            return None;
        }
        self.tree_node(inode.get(I_BLOCK..I_BLOCK + I_BLOCK_LEN)?)
    }

    /// Reads one node of an extent tree: the root in an inode's `i_block`
    /// or a whole tree block.
    pub fn tree_node(&self, node: &[u8]) -> Option<Node> {
        if le16(node, 0)? != EXTENT_MAGIC {
            return None;
        }
        let fit = node.len().saturating_sub(12) / 12;
        let entries = usize::from(le16(node, 2)?).min(fit);
        let depth = le16(node, 6)?;
        let entry = |e: usize| node.get(12 + 12 * e..24 + 12 * e);
        if depth == 0 {
            let extents = (0..entries)
                .filter_map(entry)
                .filter_map(|e| {
                    let len = le16(e, 4)?;
                    // Lengths past 32768 mark an unwritten extent: no data.
                    if len == 0 || len > 32768 {
                        return None;
                    }
                    let block = u64::from(le16(e, 6)?) << 32 | u64::from(le32(e, 8)?);
                    let start = block.checked_mul(self.block_size)?;
                    Some(start..start.checked_add(u64::from(len) * self.block_size)?)
                })
                .collect();
            return Some(Node::Extents(extents));
        }
        let children = (0..entries)
            .filter_map(entry)
            .filter_map(|e| {
                let block = u64::from(le16(e, 8)?) << 32 | u64::from(le32(e, 4)?);
                block.checked_mul(self.block_size)
            })
            .collect();
        Some(Node::Children(children))
    }
}

/// A node of one file's extent tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A leaf: the byte ranges of the image holding the file's data, in the
    /// file's order.
    Extents(Vec<Range<u64>>),
    /// An index: the byte offsets of the tree blocks below it, each
    /// [`Geometry::block_size`] long, to be read with [`Geometry::tree_node`].
    Children(Vec<u64>),
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::ext4::{BLOCK_SIZE, INODE_SIZE};

    /// An image's first 64 KiB as `flatten` writes them: the superblock,
    /// descriptors for `groups` groups, then nothing.
    fn head(groups: u32) -> Vec<u8> {
        use crate::ext4::superblock::{encode_gdt, encode_superblock, GroupCounts, Summary};
        let summary = Summary {
            groups,
            blocks: u64::from(groups) * u64::from(crate::ext4::BLOCKS_PER_GROUP),
            free_blocks: 0,
            free_inodes: 0,
            uuid: [0; 16],
            hash_seed: [0; 4],
            time: 0,
        };
        let mut head = vec![0u8; 64 * 1024];
        head[1024..2048].copy_from_slice(&encode_superblock(&summary));
        let gdt = encode_gdt(&vec![GroupCounts::default(); groups as usize]);
        head[BLOCK_SIZE..BLOCK_SIZE + gdt.len()].copy_from_slice(&gdt);
        head
    }

    fn file_inode(mode: u16, extents: &[(u64, u16)]) -> Vec<u8> {
        let mut inode = vec![0u8; INODE_SIZE];
        inode[0..2].copy_from_slice(&mode.to_le_bytes());
        inode[0x1A..0x1C].copy_from_slice(&1u16.to_le_bytes());
        inode[0x20..0x24].copy_from_slice(&EXTENTS_FL.to_le_bytes());
        let list: Vec<_> = extents
            .iter()
            .scan(0u32, |logical, &(start, len)| {
                let e = crate::ext4::extent::Extent::new(*logical, start, len);
                *logical += u32::from(len);
                Some(e)
            })
            .collect();
        let (root, spill) = crate::ext4::extent::build(&list, &[]);
        assert!(spill.is_empty());
        inode[I_BLOCK..I_BLOCK + I_BLOCK_LEN].copy_from_slice(&root);
        inode
    }

    #[test]
    fn finds_the_inode_tables_this_crate_writes() {
        use crate::ext4::layout::inode_table;
        let g = Geometry::parse(&head(3)).expect("an ext4 superblock");
        assert_eq!(g.block_size, BLOCK_SIZE as u64);
        assert_eq!(g.inode_size, INODE_SIZE as u64);
        let table = u64::from(crate::ext4::INODE_TABLE_BLOCKS) * BLOCK_SIZE as u64;
        let expected: Vec<_> = (0..3)
            .map(|g| inode_table(g) * BLOCK_SIZE as u64)
            .map(|start| start..start + table)
            .collect();
        assert_eq!(g.inode_tables, expected);
    }

    /// The bytes of blocks `lo..hi`.
    fn blocks(lo: u64, hi: u64) -> Range<u64> {
        lo * BLOCK_SIZE as u64..hi * BLOCK_SIZE as u64
    }

    #[test]
    fn reads_regular_files_extents_and_skips_the_rest() {
        let g = Geometry::parse(&head(1)).unwrap();
        let table = g.inode_tables[0].start;
        let mut piece = Vec::new();
        piece.extend(file_inode(S_IFREG | 0o644, &[(1000, 300), (5000, 8)]));
        piece.extend(file_inode(
            crate::ext4::inode::S_IFDIR | 0o755,
            &[(2000, 1)],
        ));
        piece.extend(vec![0u8; INODE_SIZE]);
        piece.extend(file_inode(S_IFREG | 0o600, &[(3000, 2)]));
        assert_eq!(
            g.files_in(table, &piece),
            [
                Node::Extents(vec![blocks(1000, 1300), blocks(5000, 5008)]),
                Node::Extents(vec![blocks(3000, 3002)])
            ]
        );
        // A piece that starts mid-inode skips to the next whole one.
        assert_eq!(
            g.files_in(table + 10, &piece[10..]),
            [Node::Extents(vec![blocks(3000, 3002)])]
        );
        assert_eq!(g.directories_in(table, &piece), [blocks(2000, 2001)]);
        // Bytes outside every inode table say nothing.
        assert!(g.files_in(0, &piece).is_empty());
    }

    #[test]
    fn a_deep_tree_is_read_a_block_at_a_time() {
        let g = Geometry::parse(&head(1)).unwrap();
        let bs = BLOCK_SIZE as u64;
        // Six extents do not fit the inode: one leaf block (at 900) holds them.
        let list: Vec<_> = (0..6u32)
            .map(|i| crate::ext4::extent::Extent::new(i * 10, 2000 + u64::from(i) * 20, 10))
            .collect();
        let (root, leaves) = crate::ext4::extent::build(&list, &[900]);
        let mut inode = file_inode(S_IFREG | 0o755, &[]);
        inode[I_BLOCK..I_BLOCK + I_BLOCK_LEN].copy_from_slice(&root);
        let table = g.inode_tables[0].start;
        assert_eq!(g.files_in(table, &inode), [Node::Children(vec![900 * bs])]);
        let expected: Vec<_> = (0..6u64)
            .map(|i| (2000 + i * 20) * bs..(2010 + i * 20) * bs)
            .collect();
        assert_eq!(g.tree_node(&leaves[0]), Some(Node::Extents(expected)));
    }

    #[test]
    fn garbage_yields_nothing_and_never_panics() {
        assert_eq!(Geometry::parse(&[]), None);
        assert_eq!(Geometry::parse(&[0u8; 4096]), None);
        let mut deep = 0;
        for round in 0..300 {
            let mut h = head(2);
            let mut n = vec![0u8; 64 * 1024];
            rand::rngs::StdRng::seed_from_u64(round).fill(&mut n[..]);
            // Each part of the superblock is kept sane in some rounds, so
            // parsing goes on to the descriptors and the inodes.
            if round % 2 == 1 {
                h[4096..8192].copy_from_slice(&n[4096..8192]);
            }
            if round % 3 == 0 {
                h[1024..1080].copy_from_slice(&n[..56]);
                h[1084..2048].copy_from_slice(&n[60..1024]);
                h[1048] = n[0] % 8; // s_log_block_size
            }
            let Some(g) = Geometry::parse(&h) else {
                continue;
            };
            for t in &g.inode_tables {
                assert!(t.start < t.end);
            }
            assert!(g.inode_tables.windows(2).all(|w| w[0].end < w[1].start));
            // Inodes of every type, most of them claiming extents, with
            // headers that hold the magic and random counts and depths.
            let mut inodes = n.clone();
            for (i, inode) in inodes.chunks_mut(INODE_SIZE).enumerate() {
                let mode = [S_IFREG, S_IFDIR, 0][i % 3] | 0o644;
                inode[0..2].copy_from_slice(&mode.to_le_bytes());
                inode[0x22] |= 0x08; // EXTENTS_FL
                inode[I_BLOCK..I_BLOCK + 2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
            }
            let table = g.inode_tables.first().map_or(0, |t| t.start);
            deep += g.files_in(table, &inodes).len();
            let _ = g.directories_in(table, &inodes);
            let _ = g.files_in(u64::MAX - 10, &inodes[..5]);
            let _ = g.files_in(table.saturating_sub(7), &inodes[..3000]);
            let mut block = n[..BLOCK_SIZE].to_vec();
            block[..2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
            let _ = g.tree_node(&block);
            let _ = g.tree_node(&block[..20]);
        }
        assert!(deep > 0, "no round reached the inodes");
    }
}
