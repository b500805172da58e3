//! One entry applied to the tree, a regular file's bytes streamed to the
//! image as they are read.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use super::tree::{Body, Dir, Meta, Node, NodeId, NotADirectory, ROOT};
use super::{FlattenError, Flattener, ImageSink};
use crate::ext4::extent::push_block;
use crate::ext4::{xattr, Ext4Error, BLOCK_SIZE};
use crate::oci::entry::{EntryKind, EntryPath, LayerEntry};

/// The kernel's limit on names per inode.
const LINK_MAX: u32 = 65000;
/// Within a layer, a file whose path hashes to 0 modulo this starts a new
/// chunk, provided the last such start is [`RESYNC_MIN_BLOCKS`] behind: a
/// file that grows by a block shifts the files after it only up to the next
/// such start, and the padding costs at most one chunk in eight.
const RESYNC_EVERY: u32 = 16;
const RESYNC_MIN_BLOCKS: u64 = 8 * crate::ext4::layout::CHUNK_BLOCKS;
/// Bytes read from a layer at a time.
const READ_CHUNK: usize = 1 << 20;

/// Feeds length-prefixed fields to the entry digest.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn digest_header(h: &mut Sha256, e: &LayerEntry) {
    for c in e.path.components() {
        field(h, c);
    }
    field(h, format!("{:?}", e.kind).as_bytes());
    let m = &e.meta;
    field(
        h,
        format!(
            "{} {} {} {} {}",
            m.mode, m.uid, m.gid, m.mtime.secs, m.mtime.nanos
        )
        .as_bytes(),
    );
    for (k, v) in &m.xattrs {
        field(h, k);
        field(h, v);
    }
}

/// Reads until `buf` is full; the count read, short only at end of input.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<S: ImageSink> Flattener<S> {
    pub(super) fn layer_name(&self) -> String {
        if self.label.is_empty() {
            format!("#{}", self.layer)
        } else {
            self.label.clone()
        }
    }

    fn not_a_dir(&self, path: &EntryPath, e: NotADirectory) -> FlattenError {
        FlattenError::NotADirectory {
            layer: self.layer_name(),
            path: path.clone(),
            at: e.0,
        }
    }

    pub(super) fn apply_entry(
        &mut self,
        entry: LayerEntry,
        data: &mut dyn Read,
    ) -> Result<(), FlattenError> {
        let mut h = Sha256::new();
        digest_header(&mut h, &entry);
        self.entries += 1;
        let layer = self.layer;
        let LayerEntry { path, kind, meta } = entry;
        let meta = Meta::from_entry(&meta);
        if let Err(source) = xattr::to_disk(&meta.xattrs).and_then(|a| xattr::place(&a)) {
            return Err(FlattenError::EncodeEntry {
                layer: self.layer_name(),
                path,
                source,
            });
        }

        let Some(name) = path.file_name().map(<[u8]>::to_vec) else {
            return match kind {
                EntryKind::Directory => {
                    self.tree.node_mut(ROOT).set_meta(meta);
                    self.entry_digests.push(h.finalize().into());
                    Ok(())
                }
                // `.wh..wh..opq` at the top of a layer.
                EntryKind::OpaqueDirectory => {
                    self.tree.dir_mut(ROOT).traversed = layer;
                    self.tree.prune_lower(ROOT, layer, &mut self.alloc);
                    self.entry_digests.push(h.finalize().into());
                    Ok(())
                }
                _ => Err(FlattenError::RootNotDirectory {
                    layer: self.layer_name(),
                    path,
                }),
            };
        };
        let parent_path = path.parent().expect("not the root");

        match kind {
            EntryKind::Whiteout => {
                if let Some(parent) = self.tree.lookup(&parent_path) {
                    self.whiteout(parent, &name);
                }
            }
            EntryKind::OpaqueDirectory => {
                let dir = self
                    .tree
                    .make_dirs(&path, layer)
                    .map_err(|e| self.not_a_dir(&path, e))?;
                self.tree.prune_lower(dir, layer, &mut self.alloc);
            }
            EntryKind::Directory => {
                let parent = self
                    .tree
                    .make_dirs(&parent_path, layer)
                    .map_err(|e| self.not_a_dir(&path, e))?;
                let existing = self.tree.child(parent, &name);
                match existing {
                    Some(child) if self.tree.node(child.id).body.is_dir() => {
                        self.tree.node_mut(child.id).set_meta(meta);
                        self.tree.claim(parent, &name, layer);
                    }
                    _ => {
                        self.tree.unlink(parent, &name, &mut self.alloc);
                        let dir = Dir {
                            parent,
                            dirty: true,
                            ..Dir::default()
                        };
                        let id = self.tree.add(Node::new(Body::Dir(Box::new(dir)), meta));
                        self.tree.link(parent, &name, id, layer);
                    }
                }
            }
            EntryKind::HardLink { target } => {
                let layer_name = self.layer_name();
                let Some(target_id) = self.tree.lookup(&target) else {
                    return Err(FlattenError::LinkTargetMissing {
                        layer: layer_name,
                        path,
                        target,
                    });
                };
                if self.tree.node(target_id).body.is_dir() {
                    return Err(FlattenError::LinkToDirectory {
                        layer: layer_name,
                        path,
                        target,
                    });
                }
                let parent = self
                    .tree
                    .make_dirs(&parent_path, layer)
                    .map_err(|e| self.not_a_dir(&path, e))?;
                let existing = self.tree.child(parent, &name);
                if existing.map(|c| c.id) == Some(target_id) {
                    self.tree.claim(parent, &name, layer);
                } else {
                    if self.tree.node(target_id).links >= LINK_MAX {
                        return Err(FlattenError::TooManyLinks {
                            layer: layer_name,
                            path,
                        });
                    }
                    self.tree.unlink(parent, &name, &mut self.alloc);
                    self.tree.link(parent, &name, target_id, layer);
                }
            }
            EntryKind::Regular { size } => {
                if size > 0
                    && self.alloc.cursor() >= self.last_align + RESYNC_MIN_BLOCKS
                    && path_hash(&path) % RESYNC_EVERY == 0
                {
                    self.alloc.align_to_chunk();
                    self.last_align = self.alloc.cursor();
                }
                let id = self.place(&path, &parent_path, &name, Body::File { size }, meta)?;
                self.stream(id, size, data, &mut h, &path)?;
                self.bytes += size;
            }
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.len() >= BLOCK_SIZE {
                    let source = Ext4Error::SymlinkTarget { len: target.len() };
                    return Err(FlattenError::EncodeEntry {
                        layer: self.layer_name(),
                        path,
                        source,
                    });
                }
                self.place(
                    &path,
                    &parent_path,
                    &name,
                    Body::Symlink(Box::new(target.into())),
                    meta,
                )?;
            }
            EntryKind::CharDevice { major, minor } => {
                self.place(
                    &path,
                    &parent_path,
                    &name,
                    Body::CharDevice(major, minor),
                    meta,
                )?;
            }
            EntryKind::BlockDevice { major, minor } => {
                self.place(
                    &path,
                    &parent_path,
                    &name,
                    Body::BlockDevice(major, minor),
                    meta,
                )?;
            }
            EntryKind::Fifo => {
                self.place(&path, &parent_path, &name, Body::Fifo, meta)?;
            }
        }
        self.entry_digests.push(h.finalize().into());
        Ok(())
    }

    /// A whiteout of `name` in `parent`: removes what lower layers put
    /// there, keeps what this layer put there.
    fn whiteout(&mut self, parent: NodeId, name: &[u8]) {
        let Some(child) = self.tree.child(parent, name) else {
            return;
        };
        if parent == ROOT && self.tree.node(child.id).ino == crate::ext4::LOST_FOUND_INO {
            self.tree
                .hide_lower_lost_found(child, self.layer, &mut self.alloc);
        } else {
            self.tree
                .hide_lower(parent, name, child, self.layer, &mut self.alloc);
        }
    }

    /// Puts a non-directory at `path`. A file with no other name keeps its
    /// node (and so its inode number); anything else is replaced.
    fn place(
        &mut self,
        path: &EntryPath,
        parent_path: &EntryPath,
        name: &[u8],
        body: Body,
        meta: Meta,
    ) -> Result<NodeId, FlattenError> {
        let layer = self.layer;
        let parent = self
            .tree
            .make_dirs(parent_path, layer)
            .map_err(|e| self.not_a_dir(path, e))?;
        let existing = self
            .tree
            .node(parent)
            .dir()
            .expect("a directory")
            .children
            .get(name);
        if let Some(child) = existing {
            let node = self.tree.node(child.id);
            if !node.body.is_dir() && node.links == 1 {
                let type_changed = node.body.file_type() != body.file_type();
                let node = self.tree.node_mut(child.id);
                node.free_data(&mut self.alloc);
                node.set_meta(meta);
                node.body = body;
                let d = self.tree.dir_mut(parent);
                d.children.get_mut(name).expect("present").layer = layer;
                d.dirty |= type_changed;
                return Ok(child.id);
            }
            self.tree.unlink(parent, name, &mut self.alloc);
        }
        let id = self.tree.add(Node::new(body, meta));
        self.tree.link(parent, name, id, layer);
        Ok(id)
    }

    /// Streams `size` bytes of file data into the image at the cursor; runs
    /// of zero blocks become holes.
    fn stream(
        &mut self,
        id: NodeId,
        size: u64,
        data: &mut dyn Read,
        h: &mut Sha256,
        path: &EntryPath,
    ) -> Result<(), FlattenError> {
        let blocks = size.div_ceil(BLOCK_SIZE as u64);
        if blocks > u64::from(u32::MAX) {
            return Err(FlattenError::EncodeEntry {
                layer: self.layer_name(),
                path: path.clone(),
                source: Ext4Error::FileTooLarge { bytes: size },
            });
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(READ_CHUNK, 0);
        let mut extents = Vec::new();
        let mut done: u64 = 0;
        let result = (|| {
            while done < size {
                let want = (size - done).min(READ_CHUNK as u64) as usize;
                let got =
                    read_full(data, &mut buf[..want]).map_err(|source| FlattenError::ReadData {
                        layer: self.layer_name(),
                        path: path.clone(),
                        source,
                    })?;
                if got < want {
                    return Err(FlattenError::ShortData {
                        layer: self.layer_name(),
                        path: path.clone(),
                        got: done + got as u64,
                        size,
                    });
                }
                h.update(&buf[..want]);
                let padded = want.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                buf[want..padded].fill(0);
                let first_logical = done / BLOCK_SIZE as u64;
                let mut i = 0;
                let nblocks = padded / BLOCK_SIZE;
                while i < nblocks {
                    if is_zero(&buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < nblocks && !is_zero(&buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE]) {
                        j += 1;
                    }
                    let runs = self.alloc.alloc_runs((j - i) as u64).map_err(|source| {
                        FlattenError::EncodeEntry {
                            layer: self.layer_name(),
                            path: path.clone(),
                            source,
                        }
                    })?;
                    let mut k = i;
                    for run in runs {
                        let bytes = &buf[k * BLOCK_SIZE..(k + run.len as usize) * BLOCK_SIZE];
                        self.sink
                            .write_block(run.start, bytes)
                            .map_err(FlattenError::WriteImage)?;
                        for b in 0..run.len as usize {
                            push_block(
                                &mut extents,
                                (first_logical + (k + b) as u64) as u32,
                                run.start + b as u64,
                            );
                        }
                        k += run.len as usize;
                    }
                    i = j;
                }
                done += want as u64;
            }
            Ok(())
        })();
        self.buf = buf;
        result?;
        let tree_blocks =
            self.write_extent_tree(&extents, |f, source| FlattenError::EncodeEntry {
                layer: f.layer_name(),
                path: path.clone(),
                source,
            })?;
        let node = self.tree.node_mut(id);
        node.extents = extents.into();
        node.tree_blocks = tree_blocks.into();
        Ok(())
    }
}

/// FNV-1a over the path's components: stable across builds and machines.
fn path_hash(path: &EntryPath) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for c in path.components() {
        for &b in c.iter().chain(b"/") {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn is_zero(block: &[u8]) -> bool {
    static ZERO: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
    block == &ZERO[..block.len()]
}
