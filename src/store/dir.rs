//! The directory store: the embedded default engine.
//!
//! Layout under the store root:
//!
//! ```text
//! lazyblk-store          marker: "lazyblk-store 1\n" (format version)
//! chunks/ab/abcd…(64)    one sealed envelope per file, fanned out by the id's first byte
//! manifests/<name>       one sealed manifest per file
//! ```
//!
//! Invariants:
//! * an object is visible whole or not at all, and survives a crash once
//!   `put` returns: every write goes through [`durable::write`], whose temp
//!   files start with `.`, which neither a chunk id nor a manifest name can,
//!   so they are never listed or read as objects;
//! * a directory that holds other things and no marker is never adopted as a
//!   store;
//! * a chunk file's modification time is when it was last written or
//!   refreshed (`put` or `missing` of a present chunk): the garbage
//!   collection contract of [`ChunkStore`]. Refreshing goes by path
//!   (`utimensat`), and [`ChunkStore::delete_if_older`] first renames the
//!   file aside and then checks its time, so a refresh either lands before
//!   the rename and is seen, or finds no file and reports the chunk missing.
//!
//! Blocking file I/O runs on tokio's blocking pool, never on its workers.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_manifest_name, ChunkStore, ListedChunk, StoreError};
use crate::chunk::ChunkId;
use crate::durable::{self, sync_dir};

/// The marker file's name and exact contents.
const MARKER: &str = "lazyblk-store";
const MARKER_TEXT: &str = "lazyblk-store 1\n";
const CHUNKS: &str = "chunks";
const MANIFESTS: &str = "manifests";

/// A chunk store in a local directory.
#[derive(Debug, Clone)]
pub struct DirStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// The root as the user named it, for messages.
    name: String,
}

impl DirStore {
    /// Opens the store at `path`, creating its layout if the directory is
    /// absent or empty. A non-empty directory without the marker is refused.
    pub fn open(path: &Path) -> Result<DirStore, StoreError> {
        let name = path.display().to_string();
        let io_err = |op: &'static str, object: &str| {
            let name = name.clone();
            let object = object.to_owned();
            move |source| StoreError::Io {
                op,
                store: name,
                object,
                source,
            }
        };
        let invalid = |reason: String| StoreError::InvalidSpec {
            spec: name.clone(),
            reason,
        };

        match fs::metadata(path) {
            Ok(meta) if !meta.is_dir() => {
                return Err(invalid("exists and is not a directory".into()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(path).map_err(io_err("create", "store directory"))?;
            }
            Err(e) => return Err(io_err("inspect", "store directory")(e)),
        }

        let marker = path.join(MARKER);
        match fs::read(&marker) {
            Ok(text) if text == MARKER_TEXT.as_bytes() => {}
            Ok(text) => {
                return Err(invalid(format!(
                    "its {MARKER} file holds {:?}, not {MARKER_TEXT:?}: a newer format or not a store",
                    String::from_utf8_lossy(&text[..text.len().min(64)])
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut entries = fs::read_dir(path).map_err(io_err("list", "store directory"))?;
                if entries.next().is_some() {
                    return Err(invalid(format!(
                        "the directory is not empty and has no {MARKER} file, so it is not a store; \
                         name an empty or new directory"
                    )));
                }
                for dir in [CHUNKS, MANIFESTS] {
                    fs::create_dir(path.join(dir)).map_err(io_err("create", dir))?;
                }
                // The marker goes last: a store with a marker has its layout.
                durable::write(&path.join(MARKER), MARKER_TEXT.as_bytes())
                    .map_err(io_err("create", MARKER))?;
            }
            Err(e) => return Err(io_err("read", MARKER)(e)),
        }
        for dir in [CHUNKS, MANIFESTS] {
            if !path.join(dir).is_dir() {
                return Err(invalid(format!("{dir}/ is missing: the store is damaged")));
            }
        }

        Ok(DirStore {
            inner: Arc::new(Inner {
                root: path.to_owned(),
                name,
            }),
        })
    }

    /// Where the store keeps its files.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The file that holds chunk `id`.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.inner.chunk_path(id)
    }

    /// Runs blocking file work off the runtime's worker threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        let name = inner.name.clone();
        match tokio::task::spawn_blocking(move || work(&inner)).await {
            Ok(result) => result,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Only a runtime shutting down cancels a blocking task.
            Err(join) => Err(StoreError::Io {
                op: "finish",
                store: name,
                object: "file operation".into(),
                source: io::Error::other(join),
            }),
        }
    }
}

impl Inner {
    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(CHUNKS).join(&hex[..2]).join(hex)
    }

    fn io(
        &self,
        op: &'static str,
        object: impl Into<String>,
    ) -> impl FnOnce(io::Error) -> StoreError {
        let store = self.name.clone();
        let object = object.into();
        move |source| StoreError::Io {
            op,
            store,
            object,
            source,
        }
    }
}

fn chunk_object(id: &ChunkId) -> String {
    format!("chunk {id}")
}

fn manifest_object(name: &str) -> String {
    format!("manifest {name:?}")
}

/// Where a chunk held in memory starts in its buffer.
const ALIGN: usize = 64;

/// An empty buffer for `capacity` bytes that will start on a cache line,
/// and the index they start at (fill it from there, then slice the bytes
/// from it). The kernel copies out of the page cache several times slower
/// into a buffer that does not (16 bytes off, as a large allocation from
/// malloc is), and so does every later copy of the chunk.
pub fn aligned_buffer(capacity: usize) -> (Vec<u8>, usize) {
    let mut data = Vec::with_capacity(capacity + ALIGN);
    let start = (ALIGN - data.as_ptr() as usize % ALIGN) % ALIGN;
    data.resize(start, 0);
    (data, start)
}

/// Reads a whole file into an [`aligned_buffer`]. The result converts to
/// `BytesMut` without a copy, for opening in place.
pub(super) fn read_aligned(path: &Path) -> io::Result<Bytes> {
    let mut file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(0);
    let (mut data, start) = aligned_buffer(len);
    file.read_to_end(&mut data)?;
    Ok(Bytes::from(data).slice(start..))
}

/// Sets `path`'s modification time to now; `false` if there is no such file.
fn touch(path: &Path) -> io::Result<bool> {
    use rustix::fs::{utimensat, AtFlags, Timestamps, CWD, UTIME_NOW, UTIME_OMIT};
    let times = Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
    };
    match utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Where `delete_if_older` sets a chunk aside while it judges it.
const SET_ASIDE_PREFIX: &str = ".gc-";

/// The chunk a set-aside file holds, if `name` is one.
fn set_aside_chunk(name: &std::ffi::OsStr) -> Option<ChunkId> {
    let rest = name.to_str()?.strip_prefix(SET_ASIDE_PREFIX)?;
    let (hex, _nonce) = rest.split_once('-')?;
    hex.parse().ok()
}

/// Puts back a chunk that a collection which died mid-judgement left aside
/// (its verdict is unknown, so the chunk stays until a later collection
/// judges it again), or drops the copy when the chunk was uploaded again
/// meanwhile. Whether the chunk is now in place.
fn restore_set_aside(aside: &Path, chunk: &Path) -> io::Result<bool> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    if exists(chunk)? {
        match fs::remove_file(aside) {
            Err(e) if !gone(&e) => return Err(e),
            _ => return Ok(true),
        }
    }
    match fs::rename(aside, chunk) {
        Ok(()) => {
            sync_dir(chunk.parent().expect("chunk paths have a parent"))?;
            Ok(true)
        }
        // A collection still running took it back or deleted it.
        Err(e) if gone(&e) => exists(chunk),
        Err(e) => Err(e),
    }
}

/// The modification time of `path`, or `None` if there is no such file.
fn modified(path: &Path) -> io::Result<Option<SystemTime>> {
    match fs::symlink_metadata(path) {
        Ok(meta) => meta.modified().map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn exists(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl ChunkStore for DirStore {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        let id = *id;
        self.blocking(move |inner| match read_aligned(&inner.chunk_path(&id)) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::ChunkNotFound {
                store: inner.name.clone(),
                id,
            }),
            Err(e) => Err(inner.io("read", chunk_object(&id))(e)),
        })
        .await
    }

    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        let id = *id;
        self.blocking(move |inner| {
            let path = inner.chunk_path(&id);
            let err = |op| inner.io(op, chunk_object(&id));
            if touch(&path).map_err(err("refresh"))? {
                return Ok(());
            }
            let dir = path.parent().expect("chunk paths have a parent");
            if !exists(dir).map_err(err("check"))? {
                match fs::create_dir(dir) {
                    Ok(()) => sync_dir(&inner.root.join(CHUNKS)).map_err(err("create"))?,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(err("create")(e)),
                }
            }
            durable::write(&path, &envelope).map_err(err("write"))
        })
        .await
    }

    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let ids = ids.to_vec();
        self.blocking(move |inner| {
            let mut missing = Vec::new();
            for id in ids {
                let present = touch(&inner.chunk_path(&id))
                    .map_err(inner.io("refresh", chunk_object(&id)))?;
                if !present {
                    missing.push(id);
                }
            }
            Ok(missing)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        self.blocking(|inner| {
            let chunks = inner.root.join(CHUNKS);
            let mut listed = Vec::new();
            for prefix in fs::read_dir(&chunks).map_err(inner.io("list", CHUNKS))? {
                let prefix = prefix.map_err(inner.io("list", CHUNKS))?;
                let prefix_name = prefix.file_name();
                let Some(prefix_name) = prefix_name.to_str() else {
                    continue;
                };
                if prefix_name.len() != 2 || !prefix.path().is_dir() {
                    continue;
                }
                let object = format!("{CHUNKS}/{prefix_name}");
                for entry in fs::read_dir(prefix.path()).map_err(inner.io("list", &*object))? {
                    let entry = entry.map_err(inner.io("list", &*object))?;
                    let id = if let Some(id) = set_aside_chunk(&entry.file_name()) {
                        if !restore_set_aside(&entry.path(), &inner.chunk_path(&id))
                            .map_err(inner.io("restore", chunk_object(&id)))?
                        {
                            continue;
                        }
                        id
                    } else {
                        // Temp files and strays fail to parse and are skipped.
                        let parsed = entry.file_name().to_str().map(str::parse::<ChunkId>);
                        let Some(Ok(id)) = parsed else { continue };
                        id
                    };
                    if !id.to_hex().starts_with(prefix_name) {
                        continue;
                    }
                    let meta = match fs::symlink_metadata(inner.chunk_path(&id)) {
                        Ok(meta) => meta,
                        // Deleted since the directory was read.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(inner.io("inspect", chunk_object(&id))(e)),
                    };
                    let modified = meta
                        .modified()
                        .map_err(inner.io("inspect", chunk_object(&id)))?;
                    listed.push(ListedChunk {
                        id,
                        modified,
                        size: meta.len(),
                    });
                }
            }
            // A restored chunk may also have been read under its own name.
            listed.sort_unstable_by_key(|chunk| chunk.id);
            listed.dedup_by_key(|chunk| chunk.id);
            Ok(listed)
        })
        .await
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        let id = *id;
        self.blocking(move |inner| {
            let path = inner.chunk_path(&id);
            match fs::remove_file(&path) {
                Ok(()) => {
                    let dir = path.parent().expect("chunk paths have a parent");
                    sync_dir(dir).map_err(inner.io("delete", chunk_object(&id)))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(inner.io("delete", chunk_object(&id))(e)),
            }
        })
        .await
    }

    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        let id = *id;
        self.blocking(move |inner| {
            let path = inner.chunk_path(&id);
            let err = |op| inner.io(op, chunk_object(&id));
            match modified(&path).map_err(err("inspect"))? {
                Some(time) if time < cutoff => {}
                _ => return Ok(false),
            }
            // Out of the way first, then judged: a refresh that reached the
            // file before the rename shows in its time, one after it finds
            // no file and makes the pusher upload the chunk again.
            let dir = path.parent().expect("chunk paths have a parent");
            let aside = dir.join(format!(
                "{SET_ASIDE_PREFIX}{}-{:016x}",
                id.to_hex(),
                rand::random::<u64>()
            ));
            match fs::rename(&path, &aside) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(err("delete")(e)),
            }
            match modified(&aside).map_err(err("inspect"))? {
                Some(time) if time < cutoff => {
                    fs::remove_file(&aside).map_err(err("delete"))?;
                    sync_dir(dir).map_err(err("delete"))?;
                    Ok(true)
                }
                // A listing restored it meanwhile.
                None => Ok(false),
                Some(_) => {
                    // Refreshed meanwhile: put it back. Should the chunk have
                    // been uploaded again since, the bytes are the same.
                    restore_set_aside(&aside, &path).map_err(err("restore"))?;
                    Ok(false)
                }
            }
        })
        .await
    }

    async fn put_manifest(&self, name: &str, manifest: Bytes) -> Result<(), StoreError> {
        validate_manifest_name(name)?;
        let name = name.to_owned();
        self.blocking(move |inner| {
            durable::write(&inner.root.join(MANIFESTS).join(&name), &manifest)
                .map_err(inner.io("write", manifest_object(&name)))
        })
        .await
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        validate_manifest_name(name)?;
        let name = name.to_owned();
        self.blocking(
            move |inner| match fs::read(inner.root.join(MANIFESTS).join(&name)) {
                Ok(data) => Ok(Bytes::from(data)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Err(StoreError::ManifestNotFound {
                        store: inner.name.clone(),
                        name,
                    })
                }
                Err(e) => Err(inner.io("read", manifest_object(&name))(e)),
            },
        )
        .await
    }

    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(|inner| {
            let dir = inner.root.join(MANIFESTS);
            let mut names = Vec::new();
            for entry in fs::read_dir(&dir).map_err(inner.io("list", MANIFESTS))? {
                let entry = entry.map_err(inner.io("list", MANIFESTS))?;
                // Temp files (leading '.') and strays are not valid names.
                if let Some(name) = entry.file_name().to_str() {
                    if validate_manifest_name(name).is_ok() {
                        names.push(name.to_owned());
                    }
                }
            }
            Ok(names)
        })
        .await
    }

    async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        validate_manifest_name(name)?;
        let name = name.to_owned();
        self.blocking(move |inner| {
            let dir = inner.root.join(MANIFESTS);
            match fs::remove_file(dir.join(&name)) {
                Ok(()) => durable::sync_dir(&dir),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
            .map_err(inner.io("delete", manifest_object(&name)))
        })
        .await
    }

    fn describe(&self) -> String {
        self.inner.name.clone()
    }
}

/// Every file under `root`, as sorted paths relative to it: what a test
/// sees of a store's layout.
#[cfg(test)]
pub(crate) fn all_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
#[path = "dir_tests.rs"]
mod tests;
