//! Flattening: a stack of layers applied in order and written as one ext4
//! image, in a single streaming pass.
//!
//! The OCI layer reader pushes each layer's validated entries
//! ([`LayerEntry`]) into a [`Flattener`]: [`Flattener::begin_layer`], one
//! [`Flattener::apply`] per entry (a regular file's bytes come through the
//! reader handed alongside and go straight to the image), then
//! [`Flattener::end_layer`]; [`Flattener::finish`] writes the inode tables,
//! bitmaps, descriptors and superblock and reports the image's digest.
//!
//! Placement, which is what makes images that share a base share chunks:
//! * each layer starts at a chunk boundary; its file data is written at the
//!   allocator's cursor in entry order, all-zero blocks left as holes, and
//!   some files (chosen by a hash of their path, at most one per 4 MiB)
//!   start a new chunk, so a file that changes size shifts only the files
//!   up to the next such start;
//! * at the end of a layer, the attribute blocks, slow-symlink blocks and
//!   directory blocks the layer changed follow, in path order; a directory a
//!   later layer changes gets new blocks in that layer's region and its old
//!   blocks are only marked free, so lower layers' bytes never change;
//! * inode numbers are handed out at the end of each layer in path order and
//!   a path replaced by a later entry keeps its inode where it has no other
//!   names, so lower layers' inodes keep their slots;
//! * the hash seed comes from the first layer's content, the UUID from the
//!   whole content; nothing depends on the clock or the environment, and
//!   within a layer only file data follows the entries' order.
//!
//! Only metadata stays in memory. After any error the flattener refuses
//! further calls: the image is unusable.

mod apply;
mod emit;
mod finish;
mod sink;
mod source;
#[cfg(test)]
mod tests;
mod tree;

use std::io::{Read, Seek, Write};

use sha2::{Digest, Sha256};

use crate::ext4::layout::Allocator;
use crate::ext4::{Ext4Error, FIRST_FREE_INO, ROOT_INO};
use crate::oci::entry::{EntryPath, LayerEntry};
pub use sink::{ChunkConsumer, ChunkSink, FileSink, ImageSink};
pub use source::{flatten_source, FlattenProgress, FlattenSourceError};
use tree::{Node, Tree, ROOT};

/// Free space added after the content when nothing else is asked for.
pub const DEFAULT_FREE_SPACE: u64 = 256 << 20;

/// How the image is sized.
#[derive(Debug, Clone)]
pub struct FlattenOptions {
    /// Bytes of free space beyond content and metadata (rounded to blocks).
    pub free_space: u64,
}

impl Default for FlattenOptions {
    fn default() -> Self {
        FlattenOptions {
            free_space: DEFAULT_FREE_SPACE,
        }
    }
}

/// What a finished image holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FlattenReport {
    pub layers: u32,
    /// Entries applied, across all layers.
    pub entries: u64,
    /// Inodes in the image (every file, directory, link target and device).
    pub files: u64,
    /// Bytes of regular-file data read from the layers.
    pub bytes: u64,
    /// The image's size in bytes.
    pub image_size: u64,
    /// `sha256:` and the hex digest of the whole image, where the sink
    /// could compute it (a file, not a stream of chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Why flattening failed. Entry errors name the layer and the entry.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    #[error("layer {layer}: {path}: hard link target {target} does not exist (yet)")]
    LinkTargetMissing {
        layer: String,
        path: EntryPath,
        target: EntryPath,
    },
    #[error("layer {layer}: {path}: hard link target {target} is a directory")]
    LinkToDirectory {
        layer: String,
        path: EntryPath,
        target: EntryPath,
    },
    #[error("layer {layer}: {path}: more than 65000 names for one file")]
    TooManyLinks { layer: String, path: EntryPath },
    #[error("layer {layer}: {path}: {at} is not a directory")]
    NotADirectory {
        layer: String,
        path: EntryPath,
        at: EntryPath,
    },
    #[error("layer {layer}: {path}: the root can only be a directory")]
    RootNotDirectory { layer: String, path: EntryPath },
    #[error("layer {layer}: {path}: read file data")]
    ReadData {
        layer: String,
        path: EntryPath,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: {path}: data ended after {got} of {size} bytes")]
    ShortData {
        layer: String,
        path: EntryPath,
        got: u64,
        size: u64,
    },
    #[error("layer {layer}: {path}: encode")]
    EncodeEntry {
        layer: String,
        path: EntryPath,
        #[source]
        source: Ext4Error,
    },
    #[error("layer {layer}: lay out changed metadata")]
    EncodeLayer {
        layer: String,
        #[source]
        source: Ext4Error,
    },
    #[error("write image")]
    WriteImage(#[source] std::io::Error),
    #[error("complete image")]
    FinishImage(#[source] std::io::Error),
    #[error("{call} called out of order (a layer {state})")]
    Sequence {
        call: &'static str,
        state: &'static str,
    },
    #[error("the output already holds {len} bytes; the image needs an empty file")]
    OutputNotEmpty { len: u64 },
    #[error("an earlier error left the image unusable")]
    Poisoned,
    #[error("lay out image")]
    Encode(#[source] Ext4Error),
}

/// Builds one ext4 image from layers pushed in order.
pub struct Flattener<S> {
    sink: S,
    opts: FlattenOptions,
    alloc: Allocator,
    tree: Tree,
    /// Layers begun so far; the current layer's number while one is open.
    layer: u32,
    open: bool,
    label: String,
    /// Digests of the current layer's entries, combined order-free at its end.
    entry_digests: Vec<[u8; 32]>,
    chain: [u8; 32],
    seed: Option<[u32; 4]>,
    next_ino: u32,
    entries: u64,
    bytes: u64,
    poisoned: bool,
    buf: Vec<u8>,
    /// Where the open layer last started a chunk on purpose.
    last_align: u64,
}

impl<W: Read + Write + Seek> Flattener<FileSink<W>> {
    /// Starts an image written to `out`: an empty file opened read-write
    /// (blocks never written must read as zeros, and written ones are read
    /// back at the end for the digest).
    pub fn new(out: W, opts: FlattenOptions) -> Result<Self, FlattenError> {
        Ok(Flattener::with_sink(FileSink::new(out)?, opts))
    }
}

impl<S: ImageSink> Flattener<S> {
    /// Starts an image written to `sink`.
    pub fn with_sink(sink: S, opts: FlattenOptions) -> Self {
        let mut tree = Tree::new();
        tree.node_mut(ROOT).ino = ROOT_INO;
        let id = tree.add(Node::lost_found());
        tree.link(ROOT, emit::LOST_FOUND, id, 0);
        Flattener {
            sink,
            opts,
            alloc: Allocator::new(),
            tree,
            layer: 0,
            open: false,
            label: String::new(),
            entry_digests: Vec::new(),
            chain: [0; 32],
            seed: None,
            next_ino: FIRST_FREE_INO,
            entries: 0,
            bytes: 0,
            poisoned: false,
            buf: Vec::new(),
            last_align: 0,
        }
    }

    fn check(&self, call: &'static str, want_open: bool) -> Result<(), FlattenError> {
        if self.poisoned {
            return Err(FlattenError::Poisoned);
        }
        match (self.open, want_open) {
            (true, false) => Err(FlattenError::Sequence {
                call,
                state: "is open",
            }),
            (false, true) => Err(FlattenError::Sequence {
                call,
                state: "is not open",
            }),
            _ => Ok(()),
        }
    }

    /// Opens the next layer; `label` names it in errors (its digest, say).
    pub fn begin_layer(&mut self, label: &str) -> Result<(), FlattenError> {
        self.check("begin_layer", false)?;
        self.layer += 1;
        self.tree.layer = self.layer;
        self.open = true;
        self.label = label.to_owned();
        self.alloc.align_to_chunk();
        self.last_align = self.alloc.cursor();
        Ok(())
    }

    /// Applies one entry of the open layer. For a regular file, `data` must
    /// yield exactly its size in bytes; other kinds leave it unread.
    pub fn apply(&mut self, entry: LayerEntry, data: &mut dyn Read) -> Result<(), FlattenError> {
        self.check("apply", true)?;
        let result = self.apply_entry(entry, data);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Closes the open layer: numbers its new inodes and writes the
    /// directory, attribute and symlink blocks it changed.
    pub fn end_layer(&mut self) -> Result<(), FlattenError> {
        self.check("end_layer", true)?;
        self.entry_digests.sort_unstable();
        let mut h = Sha256::new();
        h.update(self.chain);
        // Taken, not drained: the next layer starts small, and the image's
        // last steps run without a digest's worth of memory per entry.
        for d in std::mem::take(&mut self.entry_digests) {
            h.update(d);
        }
        self.chain = h.finalize().into();
        let result = self.emit();
        self.open = false;
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Writes the remaining metadata and returns the report. Ends an open
    /// layer first.
    pub fn finish(mut self) -> Result<FlattenReport, FlattenError> {
        if self.open {
            self.end_layer()?;
        }
        self.check("finish", false)?;
        self.emit()?;
        self.write_tables()
    }
}
