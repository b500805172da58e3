//! The end of the image: size and group count, inode tables, bitmaps,
//! descriptors and superblock, the file's length, and its digest.

use super::emit::{derive16, FAST_SYMLINK_MAX};
use super::tree::{Body, Node};
use super::{FlattenError, FlattenReport, Flattener, ImageSink};
use crate::ext4::inode::{self, Inode, EXTENTS_FL, INDEX_FL};
use crate::ext4::layout::{self, DESC_SIZE, MAX_GROUPS};
use crate::ext4::superblock::{self, GroupCounts, Summary};
use crate::ext4::xattr::{self, Placement};
use crate::ext4::{
    extent, Ext4Error, BLOCKS_PER_GROUP, BLOCK_SIZE, INODES_PER_GROUP, INODE_SIZE, LOST_FOUND_INO,
};

/// The smallest last group: its metadata and some room.
const MIN_LAST_GROUP: u64 = 1024;
/// The kernel's largest directory link count; past it, 1 means "many".
const DIR_LINK_MAX: u32 = 65000;
/// Linux creates every symlink 0777 and never changes it (permission checks
/// ignore a link's own bits), so `tar -x`, `umoci unpack` and Docker all show
/// 0777 whatever the layer's header says; the image must too.
const SYMLINK_PERMISSIONS: u16 = 0o777;

impl<S: ImageSink> Flattener<S> {
    fn encode_inode(&self, node: &Node) -> Result<[u8; INODE_SIZE], Ext4Error> {
        let root = || extent::build(&node.extents, &node.tree_blocks).0;
        let mut links = node.links;
        let (kind, size, flags, block) = match &node.body {
            Body::Dir(d) => {
                let subdirs = d
                    .children
                    .values()
                    .filter(|c| self.tree.node(c.id).body.is_dir())
                    .count() as u32;
                links = 2 + subdirs;
                if links > DIR_LINK_MAX {
                    links = 1;
                }
                let blocks: u64 = node.extents.iter().map(|e| u64::from(e.len)).sum();
                let flags = EXTENTS_FL | if d.indexed { INDEX_FL } else { 0 };
                (inode::S_IFDIR, blocks * BLOCK_SIZE as u64, flags, root())
            }
            Body::File { size } => (inode::S_IFREG, *size, EXTENTS_FL, root()),
            Body::Symlink(t) if t.len() <= FAST_SYMLINK_MAX => {
                let mut b = [0u8; 60];
                b[..t.len()].copy_from_slice(t);
                (inode::S_IFLNK, t.len() as u64, 0, b)
            }
            Body::Symlink(t) => (inode::S_IFLNK, t.len() as u64, EXTENTS_FL, root()),
            Body::CharDevice(ma, mi) => (inode::S_IFCHR, 0, 0, inode::encode_device(*ma, *mi)),
            Body::BlockDevice(ma, mi) => (inode::S_IFBLK, 0, 0, inode::encode_device(*ma, *mi)),
            Body::Fifo => (inode::S_IFIFO, 0, 0, [0u8; 60]),
        };
        let owned: u64 = node.extents.iter().map(|e| u64::from(e.len)).sum::<u64>()
            + node.tree_blocks.len() as u64
            + u64::from(node.xattr_block != 0);
        let ibody_xattrs = match xattr::place(&xattr::to_disk(&node.meta.xattrs)?)? {
            Placement::Inode(area) => Some(area),
            _ => None,
        };
        let permissions = match node.body {
            Body::Symlink(_) => SYMLINK_PERMISSIONS,
            _ => node.meta.mode,
        };
        Ok(Inode {
            mode: kind | permissions,
            uid: node.meta.uid,
            gid: node.meta.gid,
            size,
            links: links as u16,
            sectors: owned * (BLOCK_SIZE as u64 / 512),
            flags,
            block,
            file_acl: node.xattr_block,
            secs: node.meta.mtime.secs,
            nanos: node.meta.mtime.nanos,
            ibody_xattrs,
        }
        .encode())
    }

    pub(super) fn write_tables(mut self) -> Result<FlattenReport, FlattenError> {
        let bpg = u64::from(BLOCKS_PER_GROUP);
        let ipg = INODES_PER_GROUP;
        let max_ino = self.next_ino - 1;
        let mut blocks = self.alloc.cursor() + self.opts.free_space.div_ceil(BLOCK_SIZE as u64);
        let groups = blocks.div_ceil(bpg).max(u64::from(max_ino.div_ceil(ipg)));
        if groups > u64::from(MAX_GROUPS) {
            return Err(FlattenError::Encode(Ext4Error::TooManyGroups {
                groups,
                max: u64::from(MAX_GROUPS),
            }));
        }
        let groups = groups as u32;
        blocks = blocks.max((u64::from(groups) - 1) * bpg + MIN_LAST_GROUP);
        let gdt_blocks = (groups as usize * DESC_SIZE).div_ceil(BLOCK_SIZE) as u64;
        let mut counts = vec![GroupCounts::default(); groups as usize];

        // Group by group, so a sink that hands on chunks can let each
        // group's metadata go before the next is built: the inode table
        // block by block (blocks with no inode in use stay holes), then the
        // bitmaps.
        let mut by_ino: Vec<(u32, u32)> = self.tree.iter().map(|(id, n)| (n.ino, id)).collect();
        by_ino.sort_unstable();
        let mut by_ino = by_ino.into_iter().peekable();
        let per_block = (BLOCK_SIZE / INODE_SIZE) as u32;
        let mut free_blocks_total = 0u64;
        let mut free_inodes_total = 0u64;
        for g in 0..groups {
            let mut used_inodes = vec![false; ipg as usize];
            if g == 0 {
                used_inodes[..LOST_FOUND_INO as usize - 1].fill(true);
            }
            let group_inodes = g * ipg + 1..(g + 1) * ipg + 1;
            while let Some(&(ino, _)) = by_ino.peek() {
                if !group_inodes.contains(&ino) {
                    break;
                }
                let table_block = (ino - 1) / per_block;
                let mut img = vec![0u8; BLOCK_SIZE];
                while let Some(&(ino, id)) = by_ino.peek() {
                    if (ino - 1) / per_block != table_block {
                        break;
                    }
                    by_ino.next();
                    let node = self.tree.node(id);
                    let raw = self.encode_inode(node).map_err(FlattenError::Encode)?;
                    let slot = ((ino - 1) % per_block) as usize * INODE_SIZE;
                    img[slot..slot + INODE_SIZE].copy_from_slice(&raw);
                    used_inodes[((ino - 1) % ipg) as usize] = true;
                    if node.body.is_dir() {
                        counts[g as usize].dirs += 1;
                    }
                }
                let at = layout::inode_table(g) + u64::from(table_block % (ipg / per_block));
                self.sink
                    .write_block(at, &img)
                    .map_err(FlattenError::WriteImage)?;
            }

            let mut ib = vec![0xffu8; BLOCK_SIZE];
            ib[..(ipg / 8) as usize].fill(0);
            let mut free_inodes = 0;
            for (k, used) in used_inodes.iter().enumerate() {
                if *used {
                    ib[k / 8] |= 1 << (k % 8);
                } else {
                    free_inodes += 1;
                }
            }
            self.sink
                .write_block(layout::inode_bitmap(g), &ib)
                .map_err(FlattenError::WriteImage)?;

            let start = u64::from(g) * bpg;
            let mut bb = vec![0u8; BLOCK_SIZE];
            let mut free_blocks = 0;
            for k in 0..bpg {
                let b = start + k;
                let used = b >= blocks
                    || (g == 0 && b <= gdt_blocks)
                    || layout::is_meta(b) && (g != 0 || b >= layout::meta_start(0))
                    || self.alloc.is_used(b);
                if used {
                    bb[(k / 8) as usize] |= 1 << (k % 8);
                } else {
                    free_blocks += 1;
                }
            }
            self.sink
                .write_block(layout::block_bitmap(g), &bb)
                .map_err(FlattenError::WriteImage)?;
            self.sink.group_done(g).map_err(FlattenError::WriteImage)?;
            counts[g as usize].free_inodes = free_inodes;
            counts[g as usize].free_blocks = free_blocks;
            free_blocks_total += u64::from(free_blocks);
            free_inodes_total += u64::from(free_inodes);
        }

        let gdt = superblock::encode_gdt(&counts);
        self.sink
            .write_block(1, &gdt)
            .map_err(FlattenError::WriteImage)?;
        let mut uuid = derive16(b"lazyblk ext4 uuid", &self.chain);
        uuid[6] = (uuid[6] & 0x0f) | 0x50;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let summary = Summary {
            blocks,
            groups,
            free_blocks: free_blocks_total,
            free_inodes: free_inodes_total as u32,
            uuid,
            hash_seed: self.seed.expect("set by emit"),
            time: 0,
        };
        self.sink
            .write_at(1024, &superblock::encode_superblock(&summary))
            .map_err(FlattenError::WriteImage)?;
        let image_size = blocks * BLOCK_SIZE as u64;
        let files = self.tree.iter().count() as u64;
        let digest = self
            .sink
            .finish(image_size)
            .map_err(FlattenError::FinishImage)?;
        Ok(FlattenReport {
            layers: self.layer,
            entries: self.entries,
            files,
            bytes: self.bytes,
            image_size,
            digest: digest.map(|d| format!("sha256:{}", hex::encode(d))),
        })
    }
}
