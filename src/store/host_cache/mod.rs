//! The host cache: one content-addressed chunk cache per host, shared by
//! every device and daemon process on it, so a second image with the same
//! base fetches only its own chunks. It is a tier (the first of a
//! [`TieredStore`](super::TieredStore)), filled by reads that went below it.
//!
//! Layout under the cache directory (created 0700; files 0600: it holds
//! ciphertext only, but what a host runs is nobody else's business):
//!
//! ```text
//! lazyblk-host-cache     marker: "lazyblk-host-cache 1\n"
//! chunks/ab/abcd…(64)    one envelope per file, written by durable rename
//! access.log             what was put, read and evicted, by every process
//! lock                   flock'd by the process that evicts or compacts
//! ```
//!
//! Chunk files are immutable and named by their id, so processes never
//! coordinate to read or write them: a reader sees a whole file or none, and
//! two writers of one id write the same bytes. Only recency and size need
//! agreement; the access log (`log.rs`) keeps them, and one process at a
//! time evicts.
//!
//! The bound is in envelope bytes (file sizes, not blocks used). Processes
//! opening one directory should give it the same size; each evicts to the
//! size it was given.

mod log;
#[cfg(test)]
mod tests;

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use self::log::{AccessLog, Record};
use super::dir::read_aligned;
use super::policy::EvictionPolicy;
use super::{ChunkStore, ListedChunk, StoreError};
use crate::chunk::ChunkId;

const MARKER: &str = "lazyblk-host-cache";
const MARKER_TEXT: &str = "lazyblk-host-cache 1\n";
const CHUNKS: &str = "chunks";

/// A host-wide chunk cache in a directory, bounded in bytes.
#[derive(Debug, Clone)]
pub struct HostCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    name: String,
    capacity: u64,
    log: Mutex<AccessLog>,
}

impl HostCache {
    /// Opens the cache in `dir` (created if absent or empty), holding at
    /// most `capacity` bytes of envelopes.
    pub fn open(dir: &Path, capacity: u64) -> Result<HostCache, StoreError> {
        let name = format!("host cache {}", dir.display());
        let io_err = |op: &'static str, object: &str| {
            let (store, object) = (name.clone(), object.to_owned());
            move |source| StoreError::Io {
                op,
                store,
                object,
                source,
            }
        };
        let invalid = |reason: String| StoreError::InvalidSpec {
            spec: dir.display().to_string(),
            reason,
        };
        if capacity == 0 {
            return Err(invalid("the host cache size must be more than 0".into()));
        }
        private_dirs()
            .create(dir)
            .map_err(io_err("create", "cache directory"))?;
        if !dir.is_dir() {
            return Err(invalid("exists and is not a directory".into()));
        }
        match fs::read(dir.join(MARKER)) {
            Ok(text) if text == MARKER_TEXT.as_bytes() => {}
            Ok(_) => {
                return Err(invalid(format!(
                    "its {MARKER} file does not hold {MARKER_TEXT:?}: a newer format or not a host cache"
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Another process may be creating the layout right now: what
                // it leaves on the way is ours, anything else is not.
                let entries = fs::read_dir(dir).map_err(io_err("list", "cache directory"))?;
                let foreign = entries.filter_map(Result::ok).any(|entry| {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    ![CHUNKS, log::LOG, log::LOCK].contains(&&*name)
                        && !name.starts_with(&format!(".{MARKER}."))
                });
                if foreign {
                    return Err(invalid(format!(
                        "the directory is not empty and has no {MARKER} file, so it is not a host cache; \
                         name an empty or new directory"
                    )));
                }
                let _creating = log::lock_dir(dir).map_err(io_err("lock", log::LOCK))?;
                if !dir.join(MARKER).exists() {
                    private_dirs()
                        .create(dir.join(CHUNKS))
                        .map_err(io_err("create", CHUNKS))?;
                    // The marker goes last: a cache with a marker has its layout.
                    crate::durable::write_with_mode(
                        &dir.join(MARKER),
                        MARKER_TEXT.as_bytes(),
                        0o600,
                    )
                    .map_err(io_err("create", MARKER))?;
                }
            }
            Err(e) => return Err(io_err("read", MARKER)(e)),
        }
        let log = AccessLog::open(dir, capacity).map_err(io_err("open", log::LOG))?;
        let cache = HostCache {
            inner: Arc::new(Inner {
                root: dir.to_owned(),
                name: name.clone(),
                capacity,
                log: Mutex::new(log),
            }),
        };
        // A smaller size than last time, or chunk files the log lost to a
        // crash, are dealt with now rather than at the next fill.
        let lost_log = cache.inner.lock_log().policy().is_empty();
        if let Err(source) = cache.inner.evict(lost_log) {
            return Err(StoreError::Io {
                op: "evict",
                store: name,
                object: "chunks".into(),
                source,
            });
        }
        Ok(cache)
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Envelope bytes held, as the log says (this process's view, if the
    /// log cannot be read now).
    pub fn weight(&self) -> u64 {
        let mut log = self.inner.lock_log();
        if let Err(e) = log.catch_up() {
            tracing::debug!(cache = %self.inner.name, error = %e, "replay of the access log");
        }
        log.policy().weight()
    }

    /// The file that holds chunk `id`.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.inner.chunk_path(id)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        work: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        let joined = tokio::task::spawn_blocking(move || {
            let result = work(&inner);
            result.map_err(|source| (inner.name.clone(), source))
        })
        .await;
        match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err((store, source))) => Err(StoreError::Io {
                op,
                store,
                object: "chunk".into(),
                source,
            }),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(join) => Err(StoreError::Io {
                op,
                store: self.describe(),
                object: "chunk".into(),
                source: io::Error::other(join),
            }),
        }
    }
}

/// Directories only the owner may enter.
fn private_dirs() -> fs::DirBuilder {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder
}

impl Inner {
    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(CHUNKS).join(&hex[..2]).join(hex)
    }

    fn lock_log(&self) -> MutexGuard<'_, AccessLog> {
        // The replica is rebuilt from the log on any doubt; a panic while
        // it was held leaves nothing worse than a stale view.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, record: Record) -> io::Result<()> {
        self.lock_log().append(record)
    }

    /// Evicts until the cache fits (and compacts the log when due or
    /// `compact`).
    fn evict(&self, compact: bool) -> io::Result<()> {
        let remove = |id: &ChunkId| match fs::remove_file(self.chunk_path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let present = || {
            let files = self.files()?;
            Ok(files.into_iter().map(|f| (f.id, f.size)).collect())
        };
        if !self.lock_log().needs_upkeep(compact)? {
            return Ok(());
        }
        let held = log::lock_dir(&self.root)?;
        let evicted = self
            .lock_log()
            .evict_and_compact(&held, compact, remove, present)?;
        if !evicted.is_empty() {
            tracing::debug!(cache = %self.name, chunks = evicted.len(), "evicted");
        }
        Ok(())
    }

    /// Every chunk file.
    fn files(&self) -> io::Result<Vec<ListedChunk>> {
        let mut files = Vec::new();
        for prefix in fs::read_dir(self.root.join(CHUNKS))? {
            let prefix = prefix?;
            if !prefix.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(prefix.path())? {
                let entry = entry?;
                // Temp files and strays fail to parse and are skipped.
                let Some(Ok(id)) = entry.file_name().to_str().map(str::parse::<ChunkId>) else {
                    continue;
                };
                if entry.path() == self.chunk_path(&id) {
                    let meta = entry.metadata()?;
                    files.push(ListedChunk {
                        id,
                        modified: meta.modified()?,
                        size: meta.len(),
                    });
                }
            }
        }
        Ok(files)
    }
}

fn no_manifests(store: String) -> StoreError {
    StoreError::Io {
        op: "use",
        store,
        object: "manifests".into(),
        source: io::Error::new(
            io::ErrorKind::Unsupported,
            "a host cache keeps chunks only; manifests live in the origin store",
        ),
    }
}

#[async_trait]
impl ChunkStore for HostCache {
    async fn get(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        let id = *id;
        let found = self
            .blocking("read", move |inner| {
                match read_aligned(&inner.chunk_path(&id)) {
                    Ok(envelope) => {
                        inner.record(Record::Hit(id))?;
                        Ok(Some(envelope))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        found.ok_or_else(|| StoreError::ChunkNotFound {
            store: self.describe(),
            id,
        })
    }

    async fn put(&self, id: &ChunkId, envelope: Bytes) -> Result<(), StoreError> {
        let id = *id;
        self.blocking("write", move |inner| {
            let path = inner.chunk_path(&id);
            if path.exists() {
                return Ok(());
            }
            private_dirs().create(crate::durable::parent_dir(&path))?;
            crate::durable::write_with_mode(&path, &envelope, 0o600)?;
            inner.record(Record::Insert(id, envelope.len() as u64))?;
            inner.evict(false)
        })
        .await
    }

    async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let ids = ids.to_vec();
        self.blocking("check", move |inner| {
            Ok(ids
                .into_iter()
                .filter(|id| !inner.chunk_path(id).exists())
                .collect())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ListedChunk>, StoreError> {
        self.blocking("list", |inner| inner.files()).await
    }

    async fn delete(&self, id: &ChunkId) -> Result<(), StoreError> {
        let id = *id;
        self.blocking("delete", move |inner| {
            match fs::remove_file(inner.chunk_path(&id)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            inner.record(Record::Evict(id))
        })
        .await
    }

    /// A cache evicts on its own; this serves whoever empties it by age.
    async fn delete_if_older(&self, id: &ChunkId, cutoff: SystemTime) -> Result<bool, StoreError> {
        let id = *id;
        self.blocking("delete", move |inner| {
            let path = inner.chunk_path(&id);
            match fs::metadata(&path) {
                Ok(meta) if meta.modified()? < cutoff => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
            match fs::remove_file(&path) {
                Ok(()) => inner.record(Record::Evict(id)).map(|()| true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn put_manifest(&self, _name: &str, _manifest: Bytes) -> Result<(), StoreError> {
        Err(no_manifests(self.describe()))
    }

    async fn get_manifest(&self, name: &str) -> Result<Bytes, StoreError> {
        Err(StoreError::ManifestNotFound {
            store: self.describe(),
            name: name.to_owned(),
        })
    }

    /// None: a host cache keeps chunks only.
    async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    /// Nothing to remove: a host cache keeps chunks only.
    async fn delete_manifest(&self, _name: &str) -> Result<(), StoreError> {
        Ok(())
    }

    fn describe(&self) -> String {
        self.inner.name.clone()
    }
}
