//! The end of a layer: inode numbers for the layer's new nodes, then the
//! attribute, slow-symlink and directory blocks it changed, written at the
//! cursor in path order.

use sha2::{Digest, Sha256};

use super::tree::{Body, Extents, Node, NodeId, TreeBlocks, ROOT};
use super::{FlattenError, Flattener, ImageSink};
use crate::ext4::extent::{self, Extent};
use crate::ext4::layout::MAX_GROUPS;
use crate::ext4::xattr::{self, Placement};
use crate::ext4::{dir, Ext4Error, BLOCK_SIZE, INODES_PER_GROUP};

/// The name e2fsck looks for in the root.
pub(super) const LOST_FOUND: &[u8] = b"lost+found";

/// Symlink targets this long or longer need a data block.
pub(super) const FAST_SYMLINK_MAX: usize = 59;

/// Sixteen bytes derived from the content digest under a purpose label.
pub(super) fn derive16(label: &[u8], chain: &[u8; 32]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(label);
    h.update(chain);
    let d = h.finalize();
    d[..16].try_into().expect("16 bytes")
}

impl<S: ImageSink> Flattener<S> {
    fn layer_error(&self, source: Ext4Error) -> FlattenError {
        FlattenError::EncodeLayer {
            layer: self.layer_name(),
            source,
        }
    }

    /// Writes `blocks` at the cursor; the extents they landed in.
    fn write_new(&mut self, blocks: &[Vec<u8>]) -> Result<(Extents, TreeBlocks), FlattenError> {
        let runs = self
            .alloc
            .alloc_runs(blocks.len() as u64)
            .map_err(|e| self.layer_error(e))?;
        let mut extents = Vec::new();
        let mut logical = 0u32;
        let mut images = blocks.iter();
        for run in runs {
            for b in 0..u64::from(run.len) {
                let img = images.next().expect("one run block per image");
                self.sink
                    .write_block(run.start + b, img)
                    .map_err(FlattenError::WriteImage)?;
                extent::push_block(&mut extents, logical, run.start + b);
                logical += 1;
            }
        }
        let tree_blocks = self.write_extent_tree(&extents, Self::layer_error)?;
        Ok((extents.into(), tree_blocks.into()))
    }

    /// Allocates and writes the extent-tree blocks `extents` need beyond
    /// the inode's own four slots (none for most files); their numbers.
    /// `alloc_error` names what was being written when allocation fails.
    pub(super) fn write_extent_tree(
        &mut self,
        extents: &[Extent],
        alloc_error: impl Fn(&Self, Ext4Error) -> FlattenError,
    ) -> Result<Vec<u64>, FlattenError> {
        let needed = extent::tree_blocks_needed(extents.len());
        let mut tree_blocks = Vec::with_capacity(needed);
        if needed > 0 {
            let runs = self
                .alloc
                .alloc_runs(needed as u64)
                .map_err(|e| alloc_error(self, e))?;
            for r in runs {
                tree_blocks.extend(r.start..r.start + u64::from(r.len));
            }
            let (_, images) = extent::build(extents, &tree_blocks);
            for (b, img) in tree_blocks.iter().zip(images) {
                self.sink
                    .write_block(*b, &img)
                    .map_err(FlattenError::WriteImage)?;
            }
        }
        Ok(tree_blocks)
    }

    pub(super) fn emit(&mut self) -> Result<(), FlattenError> {
        let chain = self.chain;
        let seed_bytes = *self.seed.get_or_insert_with(|| {
            let b = derive16(b"lazyblk ext4 hash seed", &chain);
            std::array::from_fn(|i| {
                u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"))
            })
        });
        self.restore_lost_found();
        let order = self.tree.walk();
        for &id in &order {
            if self.tree.node(id).ino == 0 {
                if u64::from(self.next_ino) > u64::from(MAX_GROUPS) * u64::from(INODES_PER_GROUP) {
                    return Err(self.layer_error(Ext4Error::TooManyGroups {
                        groups: u64::from(MAX_GROUPS) + 1,
                        max: u64::from(MAX_GROUPS),
                    }));
                }
                self.tree.node_mut(id).ino = self.next_ino;
                self.next_ino += 1;
            }
        }
        for &id in &order {
            self.emit_node(id, &seed_bytes)?;
        }
        self.sink.flush().map_err(FlattenError::WriteImage)
    }

    /// A layer may replace `/lost+found` with a non-directory (the layer
    /// wins) and a later one white that out: the name is free again, and
    /// the image's own empty directory comes back at its inode, which
    /// nothing else takes (numbering starts after it).
    fn restore_lost_found(&mut self) {
        if self.tree.child(ROOT, LOST_FOUND).is_none() {
            let id = self.tree.add(Node::lost_found());
            self.tree.link(ROOT, LOST_FOUND, id, 0);
        }
    }

    fn emit_node(&mut self, id: NodeId, seed: &[u32; 4]) -> Result<(), FlattenError> {
        if self.tree.node(id).xattr_dirty {
            let node = self.tree.node_mut(id);
            node.xattr_dirty = false;
            if node.xattr_block != 0 {
                self.alloc.free(crate::ext4::layout::Run {
                    start: node.xattr_block,
                    len: 1,
                });
                node.xattr_block = 0;
            }
            let attrs = xattr::to_disk(&node.meta.xattrs).map_err(|e| self.layer_error(e))?;
            if let Placement::Block(img) = xattr::place(&attrs).map_err(|e| self.layer_error(e))? {
                let (extents, _) = self.write_new(&[img])?;
                self.tree.node_mut(id).xattr_block = extents[0].start();
            }
        }
        let node = self.tree.node(id);
        match &node.body {
            Body::Symlink(target) if target.len() > FAST_SYMLINK_MAX && node.extents.is_empty() => {
                let mut img = vec![0u8; BLOCK_SIZE];
                img[..target.len()].copy_from_slice(target);
                let (extents, _) = self.write_new(&[img])?;
                self.tree.node_mut(id).extents = extents;
            }
            Body::Dir(d) if d.dirty => {
                let entries: Vec<dir::Entry<'_>> = d
                    .children
                    .iter()
                    .map(|(name, c)| {
                        let child = self.tree.node(c.id);
                        dir::Entry {
                            name,
                            ino: child.ino,
                            file_type: child.body.file_type(),
                        }
                    })
                    .collect();
                let parent_ino = self.tree.node(d.parent).ino;
                let (blocks, indexed) = dir::build(node.ino, parent_ino, entries, seed)
                    .map_err(|e| self.layer_error(e))?;
                self.tree.node_mut(id).free_data(&mut self.alloc);
                let (extents, tree_blocks) = self.write_new(&blocks)?;
                let node = self.tree.node_mut(id);
                node.extents = extents;
                node.tree_blocks = tree_blocks;
                let d = node.dir_mut().expect("a directory");
                d.dirty = false;
                d.indexed = indexed;
                d.children.shrink_to_fit();
            }
            _ => {}
        }
        Ok(())
    }
}
