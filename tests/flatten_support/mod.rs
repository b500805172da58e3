//! Shared pieces of the flattener's kernel tests: layers of generated
//! entries, an independent model of the OCI layer rules, building an image,
//! `e2fsck`, loop mounts, and comparing a mounted tree with the model.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use lazyblk::flatten::{FlattenOptions, FlattenReport, Flattener};
use lazyblk::oci::entry::{EntryKind, EntryMeta, EntryPath, LayerEntry, Timestamp};

/// A file's bytes: literal, or mostly zeros with a few patches (so a file
/// past 4 GiB costs no memory).
#[derive(Clone, Debug)]
pub enum Data {
    Bytes(Vec<u8>),
    Sparse {
        size: u64,
        patches: Vec<(u64, Vec<u8>)>,
    },
}

impl Data {
    pub fn size(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Sparse { size, .. } => *size,
        }
    }

    pub fn reader(&self) -> DataReader<'_> {
        DataReader { data: self, pos: 0 }
    }
}

pub struct DataReader<'a> {
    data: &'a Data,
    pos: u64,
}

impl Read for DataReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.data.size();
        let n = (size - self.pos).min(buf.len() as u64) as usize;
        match self.data {
            Data::Bytes(b) => {
                buf[..n].copy_from_slice(&b[self.pos as usize..self.pos as usize + n])
            }
            Data::Sparse { patches, .. } => {
                buf[..n].fill(0);
                for (off, bytes) in patches {
                    let (lo, hi) = (
                        *off.max(&self.pos),
                        (off + bytes.len() as u64).min(self.pos + n as u64),
                    );
                    if lo < hi {
                        buf[(lo - self.pos) as usize..(hi - self.pos) as usize]
                            .copy_from_slice(&bytes[(lo - off) as usize..(hi - off) as usize]);
                    }
                }
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// One entry and, for a regular file, its bytes.
#[derive(Clone, Debug)]
pub struct In {
    pub entry: LayerEntry,
    pub data: Option<Data>,
}

pub type Layers = Vec<Vec<In>>;

pub fn p(s: &str) -> EntryPath {
    EntryPath::parse(s.as_bytes()).unwrap()
}

pub fn meta(mode: u32, uid: u32, gid: u32, secs: i64, nanos: u32) -> EntryMeta {
    EntryMeta {
        mode,
        uid,
        gid,
        mtime: Timestamp { secs, nanos },
        xattrs: Vec::new(),
    }
}

pub fn ent(path: &str, kind: EntryKind, m: EntryMeta) -> In {
    In {
        entry: LayerEntry {
            path: p(path),
            kind,
            meta: m,
        },
        data: None,
    }
}

pub fn dir(path: &str, mode: u32, secs: i64) -> In {
    ent(path, EntryKind::Directory, meta(mode, 0, 0, secs, 0))
}

pub fn file(path: &str, data: Vec<u8>, m: EntryMeta) -> In {
    let size = data.len() as u64;
    In {
        entry: LayerEntry {
            path: p(path),
            kind: EntryKind::Regular { size },
            meta: m,
        },
        data: Some(Data::Bytes(data)),
    }
}

pub fn sparse(path: &str, size: u64, patches: Vec<(u64, Vec<u8>)>, m: EntryMeta) -> In {
    In {
        entry: LayerEntry {
            path: p(path),
            kind: EntryKind::Regular { size },
            meta: m,
        },
        data: Some(Data::Sparse { size, patches }),
    }
}

pub fn with_xattrs(mut i: In, mut x: Vec<(&str, Vec<u8>)>) -> In {
    x.sort();
    i.entry.meta.xattrs = x
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v))
        .collect();
    i
}

pub fn build_with(layers: &Layers, image: &Path, opts: FlattenOptions) -> FlattenReport {
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(image)
        .unwrap();
    let mut f = Flattener::new(out, opts).unwrap();
    for (i, layer) in layers.iter().enumerate() {
        f.begin_layer(&format!("layer{i}")).unwrap();
        for e in layer {
            match &e.data {
                Some(d) => f.apply(e.entry.clone(), &mut d.reader()).unwrap(),
                None => f.apply(e.entry.clone(), &mut std::io::empty()).unwrap(),
            }
        }
        f.end_layer().unwrap();
    }
    f.finish().unwrap()
}

pub fn build(layers: &Layers, image: &Path) -> FlattenReport {
    build_with(
        layers,
        image,
        FlattenOptions {
            free_space: 8 << 20,
        },
    )
}

/// Runs `e2fsck -fn` and fails with its output unless the image is clean.
pub fn fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "e2fsck -fn {} failed ({}):\n{}{}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loop mount, unmounted on drop.
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn new(image: &Path, read_only: bool) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-o", if read_only { "loop,ro" } else { "loop" }])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let out = Command::new("umount")
            .arg(self.dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .output();
            if !std::thread::panicking() {
                panic!("umount: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}

/// What a path should be.
#[derive(Clone, Debug, PartialEq)]
pub enum MKind {
    Dir,
    File(Data),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Clone, Debug)]
pub struct MInode {
    pub kind: MKind,
    pub meta: EntryMeta,
}

impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        self.size() == other.size() && format!("{self:?}") == format!("{other:?}")
    }
}

/// The expected image: paths to inodes, straight from the spec's rules
/// (whiteouts and opaque markers hide lower layers only; later entries
/// replace earlier ones; a directory replacing a directory keeps its
/// children; missing parents are 0755 root:root at time 0; symlinks are
/// 0777).
#[derive(Default, Debug)]
pub struct Model {
    pub paths: BTreeMap<Vec<Vec<u8>>, usize>,
    pub inodes: Vec<MInode>,
    pub root_meta: Option<EntryMeta>,
}

impl Model {
    pub fn of(layers: &Layers) -> Model {
        let mut m = Model::default();
        for layer in layers {
            for i in layer {
                match &i.entry.kind {
                    EntryKind::OpaqueDirectory => m.remove_under(i.entry.path.components()),
                    EntryKind::Whiteout => {
                        m.remove_under(i.entry.path.components());
                        m.paths.remove(i.entry.path.components());
                    }
                    _ => {}
                }
            }
            for i in layer {
                m.apply(i);
            }
        }
        m
    }

    fn remove_under(&mut self, prefix: &[Vec<u8>]) {
        self.paths
            .retain(|k, _| !(k.len() > prefix.len() && k.starts_with(prefix)));
    }

    fn parents(&mut self, path: &[Vec<u8>]) {
        for d in 1..path.len() {
            let k = path[..d].to_vec();
            if !self.paths.contains_key(&k) {
                self.inodes.push(MInode {
                    kind: MKind::Dir,
                    meta: meta(0o755, 0, 0, 0, 0),
                });
                self.paths.insert(k, self.inodes.len() - 1);
            }
        }
    }

    fn apply(&mut self, i: &In) {
        let path = i.entry.path.components().to_vec();
        if path.is_empty() {
            self.root_meta = Some(i.entry.meta.clone());
            return;
        }
        let kind = match &i.entry.kind {
            EntryKind::Whiteout => return,
            EntryKind::OpaqueDirectory => {
                self.parents(&path);
                if !self.paths.contains_key(&path) {
                    self.inodes.push(MInode {
                        kind: MKind::Dir,
                        meta: meta(0o755, 0, 0, 0, 0),
                    });
                    self.paths.insert(path, self.inodes.len() - 1);
                }
                return;
            }
            EntryKind::HardLink { target } => {
                let id = self.paths[target.components()];
                self.parents(&path);
                self.remove_under(&path);
                self.paths.insert(path, id);
                return;
            }
            EntryKind::Directory => {
                self.parents(&path);
                if let Some(&id) = self.paths.get(&path) {
                    if self.inodes[id].kind == MKind::Dir {
                        self.inodes[id].meta = i.entry.meta.clone();
                        return;
                    }
                }
                MKind::Dir
            }
            EntryKind::Regular { .. } => MKind::File(i.data.clone().unwrap()),
            EntryKind::Symlink { target } => MKind::Symlink(target.clone()),
            EntryKind::CharDevice { major, minor } => MKind::Char(*major, *minor),
            EntryKind::BlockDevice { major, minor } => MKind::Block(*major, *minor),
            EntryKind::Fifo => MKind::Fifo,
        };
        let mut meta = i.entry.meta.clone();
        if matches!(kind, MKind::Symlink(_)) {
            // Linux shows every symlink 0777, whatever the header says.
            meta.mode = 0o777;
        }
        self.parents(&path);
        self.remove_under(&path);
        self.inodes.push(MInode { kind, meta });
        self.paths.insert(path, self.inodes.len() - 1);
    }
}

fn same_data(expected: &Data, actual: &Path) -> bool {
    let mut f = fs::File::open(actual).unwrap();
    let mut r = expected.reader();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = r.read(&mut a).unwrap();
        let mut got = 0;
        while got < n {
            let k = f.read(&mut b[got..n]).unwrap();
            if k == 0 {
                return false;
            }
            got += k;
        }
        if a[..n] != b[..n] {
            return false;
        }
        if n == 0 {
            return f.read(&mut b[..1]).unwrap() == 0;
        }
    }
}

/// Compares every path under `root` (but `/lost+found`) with the model:
/// type, permissions, owner, mtime to the nanosecond, bytes or target,
/// device numbers, link count and extended attributes. Returns how many
/// paths were compared.
pub fn check(root: &Path, model: &Model) -> usize {
    let mut seen = BTreeMap::new();
    let mut stack = vec![(PathBuf::new(), Vec::<Vec<u8>>::new())];
    while let Some((rel, comps)) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_encoded_bytes();
            if comps.is_empty() && name == b"lost+found" {
                continue;
            }
            let mut c = comps.clone();
            c.push(name);
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push((r.clone(), c.clone()));
            }
            seen.insert(c, r);
        }
    }
    let expected: Vec<&Vec<Vec<u8>>> = model.paths.keys().collect();
    let actual: Vec<&Vec<Vec<u8>>> = seen.keys().collect();
    assert_eq!(
        actual, expected,
        "the image's paths differ from the model's"
    );

    let mut links: BTreeMap<usize, u64> = BTreeMap::new();
    for &id in model.paths.values() {
        *links.entry(id).or_default() += 1;
    }
    for (comps, rel) in &seen {
        let id = model.paths[comps];
        let ino = &model.inodes[id];
        let full = root.join(rel);
        let md = fs::symlink_metadata(&full).unwrap();
        let what = rel.display();
        let m = &ino.meta;
        assert_eq!(md.mode() & 0o7777, m.mode & 0o7777, "mode of {what}");
        assert_eq!((md.uid(), md.gid()), (m.uid, m.gid), "owner of {what}");
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (m.mtime.secs, i64::from(m.mtime.nanos)),
            "mtime of {what}"
        );
        let expected_links = match ino.kind {
            MKind::Dir => {
                2 + model
                    .paths
                    .keys()
                    .filter(|k| {
                        k.len() == comps.len() + 1
                            && k.starts_with(comps)
                            && model.inodes[model.paths[*k]].kind == MKind::Dir
                    })
                    .count() as u64
            }
            _ => links[&id],
        };
        assert_eq!(md.nlink(), expected_links, "link count of {what}");
        let ft = md.file_type();
        match &ino.kind {
            MKind::Dir => assert!(ft.is_dir(), "{what} is a directory"),
            MKind::File(d) => {
                assert!(ft.is_file(), "{what} is a file");
                assert_eq!(md.len(), d.size(), "size of {what}");
                assert!(same_data(d, &full), "bytes of {what}");
            }
            MKind::Symlink(t) => {
                assert!(ft.is_symlink(), "{what} is a symlink");
                assert_eq!(
                    fs::read_link(&full)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                    *t,
                    "target of {what}"
                );
            }
            MKind::Char(ma, mi) | MKind::Block(ma, mi) => {
                assert!(
                    if matches!(ino.kind, MKind::Char(..)) {
                        ft.is_char_device()
                    } else {
                        ft.is_block_device()
                    },
                    "{what} device type"
                );
                assert_eq!(
                    (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev())),
                    (*ma, *mi),
                    "rdev of {what}"
                );
            }
            MKind::Fifo => assert!(ft.is_fifo(), "{what} is a fifo"),
        }
        assert_eq!(crate::common::xattrs(&full), m.xattrs, "xattrs of {what}");
    }
    if let Some(m) = &model.root_meta {
        let md = fs::symlink_metadata(root).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
            (m.mode, m.uid, m.gid, m.mtime.secs),
            "root"
        );
    }
    seen.len()
}

/// Pseudo-random bytes, reproducible from `seed`.
pub use crate::common::pseudo_random as bytes;
