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
//!   store.
//!
//! Blocking file I/O runs on tokio's blocking pool, never on its workers.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_manifest_name, ChunkStore, StoreError};
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

/// Where a chunk read from disk starts in its buffer.
const ALIGN: usize = 64;

/// Reads a whole file into a buffer whose data starts on a cache line. The
/// kernel copies out of the page cache several times slower into a buffer
/// that does not (16 bytes off, as a large allocation from malloc is), and
/// so does every later copy of the chunk. The result converts to
/// `BytesMut` without a copy, for opening in place.
fn read_aligned(path: &Path) -> io::Result<Bytes> {
    let mut file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(0);
    let mut data = Vec::with_capacity(len + ALIGN);
    let start = (ALIGN - data.as_ptr() as usize % ALIGN) % ALIGN;
    data.resize(start, 0);
    file.read_to_end(&mut data)?;
    Ok(Bytes::from(data).slice(start..))
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
            if exists(&path).map_err(err("check"))? {
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
                let present =
                    exists(&inner.chunk_path(&id)).map_err(inner.io("check", chunk_object(&id)))?;
                if !present {
                    missing.push(id);
                }
            }
            Ok(missing)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ChunkId>, StoreError> {
        self.blocking(|inner| {
            let chunks = inner.root.join(CHUNKS);
            let mut ids = Vec::new();
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
                    // Temp files and strays fail to parse and are skipped.
                    let parsed = entry.file_name().to_str().map(str::parse::<ChunkId>);
                    if let Some(Ok(id)) = parsed {
                        if id.to_hex().starts_with(prefix_name) {
                            ids.push(id);
                        }
                    }
                }
            }
            Ok(ids)
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
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn id(n: u8) -> ChunkId {
        ChunkId::of_envelope(&[n])
    }

    fn store() -> (tempfile::TempDir, DirStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn put_get_round_trip_and_layout() {
        let (_dir, store) = store();
        store.put(&id(1), Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(store.get(&id(1)).await.unwrap(), &b"one"[..]);
        let hex = id(1).to_hex();
        assert!(store
            .root()
            .join("chunks")
            .join(&hex[..2])
            .join(&hex)
            .is_file());
        // A second put of the same id keeps the first bytes: content-addressed.
        store
            .put(&id(1), Bytes::from_static(b"other"))
            .await
            .unwrap();
        assert_eq!(store.get(&id(1)).await.unwrap(), &b"one"[..]);
    }

    #[tokio::test]
    async fn got_chunks_are_aligned_and_mutable_without_copy() {
        let (_dir, store) = store();
        let data = Bytes::from(vec![3u8; 600_000]);
        store.put(&id(1), data.clone()).await.unwrap();
        let got = store.get(&id(1)).await.unwrap();
        assert_eq!(got, data);
        let ptr = got.as_ptr();
        assert_eq!(ptr as usize % ALIGN, 0);
        let mutable = got.try_into_mut().unwrap();
        assert_eq!(mutable.as_ptr(), ptr);
    }

    #[tokio::test]
    async fn get_of_absent_chunk_is_not_found() {
        let (_dir, store) = store();
        let err = store.get(&id(9)).await.unwrap_err();
        assert!(matches!(err, StoreError::ChunkNotFound { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains(&id(9).to_hex()), "{err}");
    }

    #[tokio::test]
    async fn missing_keeps_order_and_list_and_delete() {
        let (_dir, store) = store();
        for n in [1, 3] {
            store.put(&id(n), Bytes::from(vec![n; 10])).await.unwrap();
        }
        let asked = [id(4), id(1), id(2), id(3), id(5)];
        assert_eq!(store.missing(&asked).await.unwrap(), [id(4), id(2), id(5)]);

        let mut listed = store.list().await.unwrap();
        listed.sort();
        let mut expected = vec![id(1), id(3)];
        expected.sort();
        assert_eq!(listed, expected);

        store.delete(&id(1)).await.unwrap();
        store.delete(&id(1)).await.unwrap(); // absent: not an error
        assert_eq!(store.list().await.unwrap(), [id(3)]);
        assert_eq!(store.missing(&[id(1)]).await.unwrap(), [id(1)]);
    }

    #[tokio::test]
    async fn list_skips_temp_and_stray_files() {
        let (_dir, store) = store();
        store.put(&id(1), Bytes::from_static(b"x")).await.unwrap();
        let hex = id(1).to_hex();
        let prefix = store.root().join("chunks").join(&hex[..2]);
        fs::write(prefix.join(format!(".tmp-{hex}-0000000000000000")), b"half").unwrap();
        fs::write(prefix.join("README"), b"stray").unwrap();
        // A valid id in the wrong prefix directory is not where get looks.
        let other = id(2).to_hex();
        let wrong = if other[..2] == hex[..2] { id(3) } else { id(2) };
        fs::write(prefix.join(wrong.to_hex()), b"misplaced").unwrap();
        assert_eq!(store.list().await.unwrap(), [id(1)]);
    }

    #[tokio::test]
    async fn manifest_put_get_replace() {
        let (_dir, store) = store();
        let err = store.get_manifest("app").await.unwrap_err();
        assert!(matches!(err, StoreError::ManifestNotFound { .. }), "{err}");
        store
            .put_manifest("app", Bytes::from_static(b"v1"))
            .await
            .unwrap();
        assert_eq!(store.get_manifest("app").await.unwrap(), &b"v1"[..]);
        store
            .put_manifest("app", Bytes::from_static(b"v2"))
            .await
            .unwrap();
        assert_eq!(store.get_manifest("app").await.unwrap(), &b"v2"[..]);
        // Manifests are not chunks.
        assert!(store.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn invalid_manifest_names_are_refused() {
        let (_dir, store) = store();
        let long = "a".repeat(129);
        for name in ["", ".hidden", "a/b", "../x", "sp ace", "é", long.as_str()] {
            let err = store
                .put_manifest(name, Bytes::from_static(b"m"))
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidName { .. }),
                "{name:?}: {err}"
            );
            let err = store.get_manifest(name).await.unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidName { .. }),
                "{name:?}: {err}"
            );
        }
        let ok = "a".repeat(128);
        for name in ["app-1.2_x", "A", ok.as_str()] {
            store
                .put_manifest(name, Bytes::from_static(b"m"))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn writes_leave_no_temp_files() {
        let (_dir, store) = store();
        for n in 0..20 {
            store.put(&id(n), Bytes::from(vec![n; 100])).await.unwrap();
        }
        store
            .put_manifest("m", Bytes::from_static(b"m"))
            .await
            .unwrap();
        let files = all_files(store.root());
        assert_eq!(files.len(), 20 + 1 + 1, "{files:?}");
        assert!(files.iter().all(|f| !f.contains(".tmp")), "{files:?}");
    }

    #[tokio::test]
    async fn failed_write_leaves_no_temp_file() {
        let (_dir, store) = store();
        // A directory where the manifest file should go makes the rename fail
        // after the temp file was written.
        fs::create_dir(store.root().join("manifests/m")).unwrap();
        fs::write(store.root().join("manifests/m/x"), b"").unwrap();
        let err = store
            .put_manifest("m", Bytes::from_static(b"data"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("write manifest \"m\""), "{err}");
        let files = all_files(&store.root().join("manifests"));
        assert_eq!(files, ["m/x"]);
    }

    #[test]
    fn reopen_and_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        // An empty existing directory is adopted, and reopens.
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        DirStore::open(&empty).unwrap();
        DirStore::open(&empty).unwrap();
        assert_eq!(fs::read_to_string(empty.join(MARKER)).unwrap(), MARKER_TEXT);

        let foreign = dir.path().join("home");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), b"mine").unwrap();
        let err = DirStore::open(&foreign).unwrap_err();
        assert!(matches!(err, StoreError::InvalidSpec { .. }), "{err}");
        assert!(err.to_string().contains("not empty"), "{err}");
        // Nothing was created in it.
        assert_eq!(all_files(&foreign), ["notes.txt"]);
        assert!(!foreign.join("chunks").exists());

        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(DirStore::open(&file).is_err());

        let future = dir.path().join("future");
        fs::create_dir(&future).unwrap();
        fs::write(future.join(MARKER), b"lazyblk-store 2\n").unwrap();
        let err = DirStore::open(&future).unwrap_err();
        assert!(err.to_string().contains("lazyblk-store 2"), "{err}");
    }

    #[tokio::test]
    async fn open_store_opens_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("s").display().to_string();
        let store = super::super::open_store(&spec).unwrap();
        store.put(&id(1), Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(store.describe(), spec);
        assert!(super::super::open_store("http://host/x").is_err());
    }
}
