//! The in-memory image tree and the layer-application rules of the OCI
//! image spec.
//!
//! Nodes live in an arena; a directory maps names to nodes, so a hard link
//! is two names for one node. Each name remembers the layer that last set it
//! explicitly and each directory the last layer that created something under
//! it: that is what lets whiteouts and opaque markers hide only lower
//! layers' entries, whatever their position within their own layer.
//!
//! Invariants: every live node is reachable from the root; `links` counts
//! the names of a node; a directory has exactly one name (no hard links to
//! directories); blocks of a node that dies go back to the allocator.
//!
//! Memory: the tree is all the flattener keeps per file, so a node is kept
//! near 100 bytes and a name near 16 bytes plus its own; whatever most
//! nodes lack (attributes, extent trees, directory contents, symlink
//! targets) sits behind one pointer.

mod children;
mod parts;

pub use children::Children;
pub use parts::{Extents, Mtime, TreeBlocks, Xattrs};

use crate::ext4::layout::{Allocator, Run};
use crate::oci::entry::{EntryMeta, EntryPath};

pub type NodeId = u32;
pub const ROOT: NodeId = 0;

/// Ownership, permissions, time and attributes of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (`0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Mtime,
    pub xattrs: Xattrs,
}

impl Meta {
    /// What a directory created only as some entry's parent gets: 0755,
    /// root:root, the epoch.
    pub fn implicit() -> Meta {
        Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Mtime::default(),
            xattrs: Xattrs::default(),
        }
    }

    /// What the image's own `/lost+found` gets: 0700, root:root, the epoch.
    pub fn lost_found() -> Meta {
        Meta {
            mode: 0o700,
            ..Meta::implicit()
        }
    }

    pub fn from_entry(m: &EntryMeta) -> Meta {
        Meta {
            mode: (m.mode & 0o7777) as u16,
            uid: m.uid,
            gid: m.gid,
            mtime: m.mtime.into(),
            xattrs: m.xattrs.clone().into(),
        }
    }
}

/// A directory's names.
#[derive(Debug, Default)]
pub struct Dir {
    pub children: Children,
    pub parent: NodeId,
    /// Its entries changed since its blocks were last written.
    pub dirty: bool,
    /// Its blocks form a hashed index.
    pub indexed: bool,
    /// The last layer that created or replaced something below it.
    pub traversed: u32,
}

/// One name in a directory.
#[derive(Debug, Clone, Copy)]
pub struct Child {
    pub id: NodeId,
    /// The layer whose entry last set this name (0: created implicitly).
    pub layer: u32,
}

#[derive(Debug)]
pub enum Body {
    /// Boxed: most nodes are not directories, and the box keeps every node
    /// small.
    Dir(Box<Dir>),
    File {
        size: u64,
    },
    /// Doubly boxed: a thin pointer keeps every body one word.
    Symlink(Box<Box<[u8]>>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

impl Body {
    pub fn is_dir(&self) -> bool {
        matches!(self, Body::Dir(_))
    }

    /// The directory-entry file type.
    pub fn file_type(&self) -> u8 {
        use crate::ext4::dir::*;
        match self {
            Body::Dir(_) => FT_DIR,
            Body::File { .. } => FT_REG,
            Body::Symlink(_) => FT_SYMLINK,
            Body::CharDevice(..) => FT_CHR,
            Body::BlockDevice(..) => FT_BLK,
            Body::Fifo => FT_FIFO,
        }
    }
}

#[derive(Debug)]
pub struct Node {
    pub body: Body,
    pub meta: Meta,
    pub links: u32,
    /// 0 until the end of the layer that created it.
    pub ino: u32,
    /// Data blocks (files, slow symlinks) or directory blocks.
    pub extents: Extents,
    /// Extent tree blocks, leaves first.
    pub tree_blocks: TreeBlocks,
    /// External attribute block, or 0.
    pub xattr_block: u64,
    /// Attributes changed since their placement was last decided.
    pub xattr_dirty: bool,
    /// The layer that created the node (its inode number, if it has one,
    /// dates from then).
    pub born: u32,
}

impl Node {
    pub fn new(body: Body, meta: Meta) -> Node {
        let xattr_dirty = !meta.xattrs.is_empty();
        Node {
            body,
            meta,
            links: 0,
            ino: 0,
            extents: Extents::None,
            tree_blocks: TreeBlocks::default(),
            xattr_block: 0,
            xattr_dirty,
            born: 0,
        }
    }

    /// The image's own empty `/lost+found`, at the inode e2fsck expects.
    pub fn lost_found() -> Node {
        let mut node = Node::new(
            Body::Dir(Box::new(Dir {
                dirty: true,
                ..Dir::default()
            })),
            Meta::lost_found(),
        );
        node.ino = crate::ext4::LOST_FOUND_INO;
        node
    }

    pub fn dir(&self) -> Option<&Dir> {
        match &self.body {
            Body::Dir(d) => Some(d),
            _ => None,
        }
    }

    pub fn dir_mut(&mut self) -> Option<&mut Dir> {
        match &mut self.body {
            Body::Dir(d) => Some(d),
            _ => None,
        }
    }

    /// Gives back every block the node owns.
    pub fn free_blocks(&mut self, alloc: &mut Allocator) {
        self.free_data(alloc);
        if self.xattr_block != 0 {
            alloc.free(Run {
                start: self.xattr_block,
                len: 1,
            });
            self.xattr_block = 0;
        }
    }

    /// Gives back the data (or directory) blocks and the extent tree.
    pub fn free_data(&mut self, alloc: &mut Allocator) {
        for e in self.extents.iter() {
            alloc.free(Run {
                start: e.start(),
                len: u32::from(e.len),
            });
        }
        for &b in self.tree_blocks.iter() {
            alloc.free(Run { start: b, len: 1 });
        }
        self.extents = Extents::None;
        self.tree_blocks = TreeBlocks::default();
    }

    /// Replaces the metadata, noting whether the attributes need placing.
    pub fn set_meta(&mut self, meta: Meta) {
        if meta.xattrs != self.meta.xattrs {
            self.xattr_dirty = true;
        }
        self.meta = meta;
    }
}

/// A path that needs a directory where a non-directory stands.
#[derive(Debug)]
pub struct NotADirectory(pub EntryPath);

#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Option<Node>>,
    free_ids: Vec<NodeId>,
    /// The layer being applied.
    pub layer: u32,
    /// The directory that last gained a name. Its spare room is given back
    /// when another one does: tar writers keep a directory's entries
    /// together, so the spare room of all but one directory is freed early.
    growing: NodeId,
}

impl Tree {
    /// A tree holding only the root directory.
    pub fn new() -> Tree {
        let root = Node::new(
            Body::Dir(Box::new(Dir {
                dirty: true,
                ..Dir::default()
            })),
            Meta::implicit(),
        );
        let mut t = Tree {
            nodes: vec![Some(root)],
            free_ids: Vec::new(),
            layer: 0,
            growing: ROOT,
        };
        t.node_mut(ROOT).links = 1;
        t
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[id as usize].as_ref().expect("live node")
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id as usize].as_mut().expect("live node")
    }

    pub fn dir_mut(&mut self, id: NodeId) -> &mut Dir {
        self.node_mut(id).dir_mut().expect("a directory")
    }

    pub fn add(&mut self, mut node: Node) -> NodeId {
        node.born = self.layer;
        match self.free_ids.pop() {
            Some(id) => {
                self.nodes[id as usize] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                (self.nodes.len() - 1) as NodeId
            }
        }
    }

    /// The node at `path`, if every component exists.
    pub fn lookup(&self, path: &EntryPath) -> Option<NodeId> {
        let mut id = ROOT;
        for c in path.components() {
            id = self.node(id).dir()?.children.get(c)?.id;
        }
        Some(id)
    }

    /// The directory `path` names, created (0755 root:root) where missing;
    /// every directory on the way is marked as traversed by `layer`.
    pub fn make_dirs(&mut self, path: &EntryPath, layer: u32) -> Result<NodeId, NotADirectory> {
        let mut id = ROOT;
        self.dir_mut(ROOT).traversed = layer;
        for (depth, c) in path.components().iter().enumerate() {
            let next = self
                .node(id)
                .dir()
                .expect("walked directories only")
                .children
                .get(c);
            let child = match next {
                Some(child) => {
                    if !self.node(child.id).body.is_dir() {
                        let at = path.components()[..=depth]
                            .iter()
                            .fold(EntryPath::root(), |p, c| p.join(c));
                        return Err(NotADirectory(at));
                    }
                    child.id
                }
                None => {
                    let dir = Dir {
                        parent: id,
                        dirty: true,
                        ..Dir::default()
                    };
                    let new = self.add(Node::new(Body::Dir(Box::new(dir)), Meta::implicit()));
                    self.link(id, c, new, 0);
                    new
                }
            };
            self.dir_mut(child).traversed = layer;
            id = child;
        }
        Ok(id)
    }

    /// The entry `name` in the directory `dir`, if any.
    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<Child> {
        self.node(dir).dir()?.children.get(name)
    }

    /// Records that `layer`'s entry set the existing name `name` in `dir`.
    pub fn claim(&mut self, dir: NodeId, name: &[u8], layer: u32) {
        if let Some(child) = self.dir_mut(dir).children.get_mut(name) {
            child.layer = layer;
        }
    }

    /// Adds the name `name` in `dir` for `id`.
    pub fn link(&mut self, dir: NodeId, name: &[u8], id: NodeId, layer: u32) {
        self.node_mut(id).links += 1;
        if let Body::Dir(d) = &mut self.node_mut(id).body {
            d.parent = dir;
        }
        if dir != self.growing {
            // It may have died since, and its id gone to another node.
            if let Some(Some(node)) = self.nodes.get_mut(self.growing as usize) {
                if let Some(d) = node.dir_mut() {
                    d.children.shrink_to_fit();
                }
            }
            self.growing = dir;
        }
        let d = self.dir_mut(dir);
        d.children.insert(name, Child { id, layer });
        d.dirty = true;
    }

    /// Removes the name `name` from `dir`; the node dies with its last name,
    /// a directory with everything under it.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8], alloc: &mut Allocator) {
        let d = self.dir_mut(dir);
        if let Some(child) = d.children.remove(name) {
            d.dirty = true;
            self.release(child.id, alloc);
        }
    }

    fn release(&mut self, id: NodeId, alloc: &mut Allocator) {
        let node = self.node_mut(id);
        node.links -= 1;
        if node.links > 0 {
            return;
        }
        let mut node = self.nodes[id as usize].take().expect("live node");
        self.free_ids.push(id);
        node.free_blocks(alloc);
        if let Body::Dir(d) = node.body {
            for child in d.children.values() {
                self.release(child.id, alloc);
            }
        }
    }

    /// Removes from under `dir` everything that layer `layer` did not put
    /// there: names it did not set, and directories it did not create or
    /// replace anything in. A directory kept only because `layer` created
    /// something below it gets the metadata of an implicit parent, as if it
    /// had been removed and created again.
    pub fn prune_lower(&mut self, dir: NodeId, layer: u32, alloc: &mut Allocator) {
        let children: Vec<(Box<[u8]>, Child)> = self
            .node(dir)
            .dir()
            .expect("a directory")
            .children
            .iter()
            .map(|(n, c)| (n.into(), c))
            .collect();
        for (name, child) in children {
            if dir == ROOT && self.node(child.id).ino == crate::ext4::LOST_FOUND_INO {
                self.hide_lower_lost_found(child, layer, alloc);
            } else {
                self.hide_lower(dir, &name, child, layer, alloc);
            }
        }
    }

    /// What hiding lower layers leaves of the name `name` in `dir`: nothing,
    /// unless `layer` set the name or created something below it. What stays
    /// is renewed (a new inode number) when it dates from a lower layer, as
    /// if it had been removed and created again.
    pub fn hide_lower(
        &mut self,
        dir: NodeId,
        name: &[u8],
        child: Child,
        layer: u32,
        alloc: &mut Allocator,
    ) {
        let traversed = self.node(child.id).dir().map(|d| d.traversed);
        if child.layer == layer {
            self.renew(dir, child.id);
            if traversed.is_some() {
                self.prune_lower(child.id, layer, alloc);
            }
        } else if traversed == Some(layer) {
            self.renew(dir, child.id);
            self.node_mut(child.id).set_meta(Meta::implicit());
            self.prune_lower(child.id, layer, alloc);
        } else {
            self.unlink(dir, name, alloc);
        }
    }

    /// Hiding lower layers from the image's own `/lost+found` (a whiteout
    /// of it, an opaque root): what they put in it goes, and its metadata
    /// goes back to its own unless `layer` set it, but the directory stays
    /// at its inode: the image is not a layer's, and fsck wants it.
    pub fn hide_lower_lost_found(&mut self, child: Child, layer: u32, alloc: &mut Allocator) {
        self.prune_lower(child.id, layer, alloc);
        if child.layer != layer && self.node(child.id).meta != Meta::lost_found() {
            self.node_mut(child.id).set_meta(Meta::lost_found());
        }
    }

    /// Gives a single-named node of a lower layer, named in `parent`, a new
    /// identity. Every directory block naming its inode number is rewritten:
    /// the parent's, its own (`.`) and its subdirectories' (`..`).
    fn renew(&mut self, parent: NodeId, id: NodeId) {
        let layer = self.layer;
        let node = self.node_mut(id);
        if node.born >= layer || node.links != 1 {
            return;
        }
        node.born = layer;
        node.ino = 0;
        self.dir_mut(parent).dirty = true;
        if let Some(d) = self.node(id).dir() {
            let subdirs: Vec<NodeId> = d
                .children
                .values()
                .map(|c| c.id)
                .filter(|&c| self.node(c).body.is_dir())
                .collect();
            self.dir_mut(id).dirty = true;
            for s in subdirs {
                self.dir_mut(s).dirty = true;
            }
        }
    }

    /// Live nodes with their ids, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i as NodeId, n)))
    }

    /// Directories first to last in name order, depth first, with every
    /// node found on the way: the order inode numbers and blocks follow.
    pub fn walk(&self) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            out.push(id);
            if let Some(d) = self.node(id).dir() {
                for child in d.children.values().rev() {
                    stack.push(child.id);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-file memory budget rests on these sizes.
    #[test]
    fn nodes_stay_small() {
        assert!(std::mem::size_of::<Option<Node>>() <= 96);
        assert!(std::mem::size_of::<Body>() <= 16);
        assert!(std::mem::size_of::<Meta>() <= 32);
    }
}
