//! The per-device cache: a sparse data file the size of the image and a
//! persistent present-bitmap.
//!
//! Sits between the engine and the disk: the engine decides what to fetch and
//! when; this module keeps the bytes and remembers which chunks it holds.
//!
//! A cache directory holds the image's plaintext, so it is private: created
//! 0700 with files 0600, and an existing one that group or others may use
//! is refused (see [`crate::private`]). It holds four files:
//! * `data`: the image's bytes at their own offsets, sparse where nothing has
//!   been fetched or written;
//! * `present`: the persistent present-bitmap (see [`bitmap`] and
//!   `docs/FORMAT.md`), naming the manifest digest and geometry it was made
//!   for, so a cache made for another image is refused, never reused; it
//!   also records which present chunks the device wrote to, so a check
//!   (`verify-cache`, [`check`]) knows which chunks must still hold the
//!   manifest's bytes;
//! * `written.log`: chunks written since the last flush whose present bit
//!   was on disk already ([`CacheDir::record_written`]);
//! * `lock`: held with an exclusive `flock` while the cache is open, so two
//!   daemons never serve one cache; it names the holder's pid.
//!
//! Invariants:
//! * a present bit is set in memory only after its chunk's bytes were
//!   written to `data` (callers keep this; [`CacheDir::mark_present`] says
//!   so);
//! * a chunk's bytes are changed by a write only after its written bit is
//!   set, and, if its present bit may be on disk already, recorded in
//!   `written.log` ([`CacheDir::record_written`]): so on disk, a present chunk not marked
//!   written holds exactly the manifest's bytes, even after a crash;
//! * a bit reaches the `present` file only after its bytes were made durable:
//!   [`CacheDir::flush`] snapshots the bits, then `fdatasync`s `data`, then
//!   persists the snapshot;
//! * the `present` file is replaced atomically (temp file, fsync, rename,
//!   fsync directory), so a crash leaves the old or the new bitmap, whole;
//! * opening never trusts damaged files (`attach.rs`, [`Repair`]): bits it cannot vouch
//!   for are dropped and the chunks fetched again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod attach;
pub mod bitmap;
pub mod check;
mod error;
pub mod io;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_attach;

pub use attach::{list_indices, Damage, Repair};
pub use bitmap::{DecodeError, Geometry};
pub use error::CacheError;

use bitmap::PresentBits;

const DATA_FILE: &str = "data";
const BITMAP_FILE: &str = "present";
const LOCK_FILE: &str = "lock";
const WRITTEN_LOG: &str = "written.log";

/// One device's open cache directory.
#[derive(Debug)]
pub struct CacheDir {
    dir: PathBuf,
    geometry: Geometry,
    data: File,
    present: PresentBits,
    /// Present chunks whose bytes the device changed: they no longer match
    /// the manifest.
    written: PresentBits,
    /// The bits the `present` file on disk holds. The lock also keeps
    /// flushes and written-bit records from interleaving, so an older
    /// snapshot never replaces a newer one.
    persisted: Mutex<OnDisk>,
    /// Written bits of chunks whose present bit is on disk, recorded
    /// between flushes (see [`CacheDir::record_written`]).
    written_log: File,
    /// What opening found damaged and repaired.
    repairs: Vec<Repair>,
    /// Declared last so it is dropped last: the lock is released only after
    /// the data file is closed.
    _lock: File,
}

#[derive(Debug)]
struct OnDisk {
    present: Vec<u64>,
    written: Vec<u64>,
    /// Bytes of `written.log` in use.
    log_len: u64,
}

impl CacheDir {
    /// Opens the cache in `dir` for the image whose manifest has digest
    /// `manifest_digest`, creating the directory and files if absent.
    ///
    /// A cache made for another manifest, image size or chunk size is
    /// refused ([`CacheError::WrongManifest`]) and kept as it is. Damaged
    /// files are repaired by dropping the bits they can no longer vouch for
    /// (logged, and listed by [`CacheDir::repairs`]).
    pub fn open_or_create(
        dir: &Path,
        manifest_digest: [u8; 32],
        image_size: u64,
        chunk_size: u32,
    ) -> Result<CacheDir, CacheError> {
        let geometry = Geometry::new(manifest_digest, image_size, chunk_size).ok_or_else(|| {
            CacheError::InvalidGeometry {
                reason: "chunk size is zero".into(),
            }
        })?;
        crate::private::ensure_dir(dir, crate::private::CACHE_DIR)?;
        let lock = take_lock(dir)?;
        let attach::Loaded {
            data,
            present,
            written,
            repairs,
            written_log,
            logged,
            log_len,
        } = attach::load(dir, &geometry, attach::Access::Repair)?;
        // Opening to repair creates both files, so neither is ever absent.
        let absent = |name: &str| CacheError::OpenData {
            path: dir.join(name),
            source: std::io::ErrorKind::NotFound.into(),
        };
        let data = data.ok_or_else(|| absent(DATA_FILE))?;
        let written_log = written_log.ok_or_else(|| absent(WRITTEN_LOG))?;
        let persisted = OnDisk {
            present: present.snapshot(),
            written: written.snapshot(),
            log_len,
        };
        // Written bits only the log holds count from now on; the next flush
        // puts them in `present` and empties the log.
        for index in logged {
            written.set(index);
        }
        Ok(CacheDir {
            dir: dir.to_owned(),
            geometry,
            data,
            present,
            written,
            persisted: Mutex::new(persisted),
            written_log,
            repairs,
            _lock: lock,
        })
    }

    /// What opening found damaged and repaired; empty for a sound cache.
    pub fn repairs(&self) -> &[Repair] {
        &self.repairs
    }

    /// The directory this cache lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What this cache was made for.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Whether chunk `index` is in the data file. False for an index past
    /// the end.
    pub fn is_present(&self, index: u64) -> bool {
        self.present.get(index)
    }

    /// Records that chunk `index` is in the data file; true if it was not
    /// recorded before. Call only after the chunk's bytes were written with
    /// [`CacheDir::write_at`]. An index past the end is ignored.
    pub fn mark_present(&self, index: u64) -> bool {
        self.present.set(index)
    }

    /// Whether the `present` file on disk lists chunk `index` (so a
    /// process that dies now leaves it present for the next one), without
    /// waiting: `None` while a flush holds that state.
    pub fn is_present_on_disk_now(&self, index: u64) -> Option<bool> {
        let persisted = self.persisted.try_lock().ok()?;
        Some(bitmap::is_set(&persisted.present, index))
    }

    /// Makes the `present` file list chunk `index`, which must be present:
    /// a [`CacheDir::flush`] unless it does already.
    ///
    /// Blocks on `fdatasync`; call it from a blocking context.
    pub fn persist_present(&self, index: u64) -> Result<(), CacheError> {
        let listed = {
            let persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
            bitmap::is_set(&persisted.present, index)
        };
        if listed {
            return Ok(());
        }
        self.flush()
    }

    /// How many chunks the data file holds.
    pub fn present_count(&self) -> u64 {
        self.present.count()
    }

    /// Whether the device wrote to chunk `index` (its bytes are the user's).
    /// Once true, writes to the chunk need no further bookkeeping.
    pub fn is_written(&self, index: u64) -> bool {
        self.written.get(index)
    }

    /// Records that the device is about to change chunk `index`: call it
    /// before the bytes change (a write, a discard, write-zeroes), whether
    /// or not the chunk is present yet.
    ///
    /// If the `present` file on disk already lists the chunk, the chunk's
    /// index is appended to `written.log` before this returns, so a process
    /// that dies during the write never leaves a chunk listed as the
    /// manifest's whose bytes are not. The log is not synced: a power loss
    /// may lose the record, and then only a chunk whose every change since
    /// its fetch was unflushed, so a repair that refetches it restores what
    /// was flushed. The next flush moves the bits into `present` and
    /// empties the log.
    ///
    /// May wait for a flush in progress; call it from a blocking context
    /// unless [`CacheDir::is_written`] is already true.
    pub fn record_written(&self, index: u64) -> Result<(), CacheError> {
        if index >= self.geometry.chunk_count || self.written.get(index) {
            return Ok(());
        }
        let mut persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        if self.written.get(index) {
            return Ok(());
        }
        if bitmap::is_set(&persisted.present, index) {
            self.written_log
                .write_all_at(&index.to_le_bytes(), persisted.log_len)
                .map_err(|source| CacheError::RecordWritten {
                    path: self.dir.join(WRITTEN_LOG),
                    source,
                })?;
            persisted.log_len += 8;
        }
        // Set only now: whoever sees the bit may change the bytes at once.
        self.written.set(index);
        Ok(())
    }

    /// Forgets chunks `indices` (their bytes are not the manifest's, say),
    /// durably: they are fetched again by whoever opens the cache next.
    /// For a repair by a process that does not serve the cache.
    pub fn drop_chunks(&self, indices: &[u64]) -> Result<(), CacheError> {
        let mut persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        for &index in indices {
            self.present.clear(index);
            self.written.clear(index);
        }
        let present = self.present.snapshot();
        let written = only_present(self.written.snapshot(), &present);
        write_bitmap(
            &self.dir,
            &bitmap::encode(&self.geometry, &present, &written),
        )?;
        persisted.present = present;
        persisted.written = written;
        self.empty_written_log(&mut persisted)
    }

    /// Fills `buf` from the data file at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CacheError> {
        self.check_range(offset, buf.len())?;
        self.data
            .read_exact_at(buf, offset)
            .map_err(|source| CacheError::ReadData {
                path: self.data_path(),
                offset,
                len: buf.len(),
                source,
            })
    }

    /// The data file, for requests whose I/O goes through a
    /// [`io::CacheIo`]. Its offsets are the image's; only the ranges of
    /// present chunks hold image bytes.
    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// What a failed read of the data file through a [`io::CacheIo`] reports.
    pub fn read_error(&self, offset: u64, len: usize, source: std::io::Error) -> CacheError {
        CacheError::ReadData {
            path: self.data_path(),
            offset,
            len,
            source,
        }
    }

    /// What a failed write of the data file through a [`io::CacheIo`] reports.
    pub fn write_error(&self, offset: u64, len: usize, source: std::io::Error) -> CacheError {
        CacheError::WriteData {
            path: self.data_path(),
            offset,
            len,
            source,
        }
    }

    /// What a failed hole punch through a [`io::CacheIo`] reports.
    pub fn punch_error(&self, offset: u64, len: u64, source: std::io::Error) -> CacheError {
        CacheError::PunchData {
            path: self.data_path(),
            offset,
            len,
            source,
        }
    }

    /// Writes `data` into the data file at `offset`. Not durable until
    /// [`CacheDir::flush`].
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<(), CacheError> {
        self.check_range(offset, data.len())?;
        self.data
            .write_all_at(data, offset)
            .map_err(|source| CacheError::WriteData {
                path: self.data_path(),
                offset,
                len: data.len(),
                source,
            })
    }

    /// Makes every write that returned before this call durable, and then
    /// every chunk marked present before this call.
    ///
    /// Blocks on `fdatasync`; call it from a blocking context.
    pub fn flush(&self) -> Result<(), CacheError> {
        let mut persisted = self.persisted.lock().unwrap_or_else(|e| e.into_inner());
        // Snapshot first: every bit in it was set after its bytes were
        // written, so the fdatasync below covers those bytes. A bit set
        // after the snapshot waits for the next flush. Present before
        // written: a chunk a write makes present had its written bit set
        // before its present bit, so both are in the snapshot or neither.
        let present = self.present.snapshot();
        let written = only_present(self.written.snapshot(), &present);
        self.data
            .sync_data()
            .map_err(|source| CacheError::SyncData {
                path: self.data_path(),
                source,
            })?;
        if present != persisted.present || written != persisted.written {
            write_bitmap(
                &self.dir,
                &bitmap::encode(&self.geometry, &present, &written),
            )?;
            persisted.present = present;
            persisted.written = written;
        }
        // Every logged bit was set before the snapshot (both under the
        // lock), so `present` now holds it.
        self.empty_written_log(&mut persisted)
    }

    fn empty_written_log(&self, persisted: &mut OnDisk) -> Result<(), CacheError> {
        if persisted.log_len > 0 {
            self.written_log
                .set_len(0)
                .map_err(|source| CacheError::RecordWritten {
                    path: self.dir.join(WRITTEN_LOG),
                    source,
                })?;
            persisted.log_len = 0;
        }
        Ok(())
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), CacheError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.geometry.image_size => Ok(()),
            _ => Err(CacheError::OutOfRange {
                offset,
                len,
                image_size: self.geometry.image_size,
            }),
        }
    }
}

/// Takes the cache's lock and writes this process's pid into the lock
/// file, so whoever finds it taken can say who holds it.
fn take_lock(dir: &Path) -> Result<File, CacheError> {
    let path = dir.join(LOCK_FILE);
    let file = crate::private::file_options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| CacheError::Lock {
            path: path.clone(),
            source,
        })?;
    // flock, not fcntl locks: it belongs to this open file, so a second open
    // in the same process is refused too, and the kernel drops it when the
    // process dies, even by SIGKILL.
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
                .map_err(|source| CacheError::Lock {
                    path: path.clone(),
                    source,
                })?;
            Ok(file)
        }
        Err(rustix::io::Errno::WOULDBLOCK) => Err(in_use(dir, &file)),
        Err(errno) => Err(CacheError::Lock {
            path,
            source: errno.into(),
        }),
    }
}

/// Takes the cache's lock without writing to it, for a reader that must
/// change nothing; `None` if there is no lock file (no device has one open,
/// since a device creates it before any other file).
pub(super) fn take_lock_read_only(dir: &Path) -> Result<Option<File>, CacheError> {
    let path = dir.join(LOCK_FILE);
    let lock_err = |source| CacheError::Lock {
        path: path.clone(),
        source,
    };
    let file = match File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        opened => opened.map_err(lock_err)?,
    };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(in_use(dir, &file)),
        Err(errno) => Err(lock_err(errno.into())),
    }
}

/// The error for a lock another process holds, naming it from the lock file.
fn in_use(dir: &Path, lock: &File) -> CacheError {
    // The holder writes its pid just after it takes the lock: a reader
    // racing that write finds no pid, and says so.
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut &*lock, &mut text);
    CacheError::InUse {
        dir: dir.to_owned(),
        holder: text.trim().parse().ok(),
    }
}

fn open_data(dir: &Path, path: &Path, image_size: u64, exists: bool) -> Result<File, CacheError> {
    let open_err = |source| CacheError::OpenData {
        path: path.to_owned(),
        source,
    };
    let file = crate::private::file_options()
        .read(true)
        .write(true)
        .create(!exists)
        .truncate(false)
        .open(path)
        .map_err(open_err)?;
    // An existing file's size is checked by `attach`, which repairs it.
    if !exists {
        // A fresh sparse file reads as zeros everywhere, which is what an
        // all-zero chunk must read as once written to.
        file.set_len(image_size).map_err(open_err)?;
        file.sync_all().map_err(open_err)?;
        crate::durable::sync_dir(dir).map_err(open_err)?;
    }
    Ok(file)
}

/// The written bits of present chunks: what the `present` file holds.
fn only_present(mut written: Vec<u64>, present: &[u64]) -> Vec<u64> {
    for (w, p) in written.iter_mut().zip(present) {
        *w &= p;
    }
    written
}

/// Replaces the `present` file atomically and durably.
fn write_bitmap(dir: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let path = dir.join(BITMAP_FILE);
    crate::durable::write_with_mode(&path, bytes, crate::private::FILE_MODE)
        .map_err(|source| CacheError::PersistBitmap { path, source })
}
