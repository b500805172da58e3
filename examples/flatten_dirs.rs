//! Flattens directory trees, one per layer, into an ext4 image: the driver
//! `scripts/bench-flatten.sh` measures the flattener with, on real files
//! without an OCI source. Entries are walked in name order; hard links
//! within a layer are kept.
//!
//! `cargo run --release --example flatten_dirs -- OUT.ext4 DIR [DIR...]`
//! prints the report as JSON.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use lazyblk::flatten::{FileSink, FlattenOptions, Flattener};
use lazyblk::oci::entry::{EntryKind, EntryMeta, EntryPath, LayerEntry, Timestamp};

fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let mut value = vec![0u8; 65536];
        let c = std::ffi::CString::new(name).expect("no NUL in a listed name");
        if let Ok(len) = rustix::fs::lgetxattr(path, c.as_c_str(), &mut value[..]) {
            value.truncate(len);
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    out
}

fn layer(f: &mut Flattener<FileSink<fs::File>>, root: &Path) -> Result<()> {
    let mut links: HashMap<(u64, u64), EntryPath> = HashMap::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(std::ffi::OsStr::from_bytes(&rel));
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("read {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(name.as_bytes());
            let full = dir.join(&name);
            let md = fs::symlink_metadata(&full)?;
            let path = EntryPath::parse(&r)?;
            let meta = EntryMeta {
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: Timestamp {
                    secs: md.mtime(),
                    nanos: md.mtime_nsec() as u32,
                },
                xattrs: xattrs(&full),
            };
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                subdirs.push(r.clone());
                EntryKind::Directory
            } else if ft.is_symlink() {
                EntryKind::Symlink {
                    target: fs::read_link(&full)?.as_os_str().as_bytes().to_vec(),
                }
            } else if ft.is_file() && md.nlink() > 1 && links.contains_key(&(md.dev(), md.ino())) {
                EntryKind::HardLink {
                    target: links[&(md.dev(), md.ino())].clone(),
                }
            } else if ft.is_file() {
                if md.nlink() > 1 {
                    links.insert((md.dev(), md.ino()), path.clone());
                }
                EntryKind::Regular { size: md.len() }
            } else if ft.is_char_device() || ft.is_block_device() {
                let (major, minor) = (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev()));
                if ft.is_char_device() {
                    EntryKind::CharDevice { major, minor }
                } else {
                    EntryKind::BlockDevice { major, minor }
                }
            } else if ft.is_fifo() {
                EntryKind::Fifo
            } else {
                continue;
            };
            let entry = LayerEntry { path, kind, meta };
            if matches!(entry.kind, EntryKind::Regular { .. }) {
                let mut file = fs::File::open(&full)?;
                f.apply(entry, &mut file)?;
            } else {
                f.apply(entry, &mut std::io::empty())?;
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: flatten_dirs OUT.ext4 DIR [DIR...]");
    }
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&args[0])?;
    let mut f = Flattener::new(out, FlattenOptions::default())?;
    for dir in &args[1..] {
        f.begin_layer(dir)?;
        layer(&mut f, Path::new(dir))?;
        f.end_layer()?;
    }
    let report = f.finish()?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
