//! The per-device cache: a sparse data file the size of the image and a
//! persistent present-bitmap.
//!
//! Sits between the engine and the disk: the engine decides what to fetch and
//! when; this module keeps the bytes and remembers which chunks it holds.
//!
//! A cache directory holds the image's plaintext, so it is private: created
//! 0700 with files 0600, and an existing one that group or others may use
//! is refused (see [`crate::private`]). It holds three files:
//! * `data`: the image's bytes at their own offsets, sparse where nothing has
//!   been fetched or written;
//! * `present`: the persistent present-bitmap (see [`bitmap`] and
//!   `docs/FORMAT.md`), naming the manifest digest and geometry it was made
//!   for, so a cache made for another image is refused, never reused;
//! * `lock`: held with an exclusive `flock` while the cache is open, so two
//!   daemons never serve one cache.
//!
//! Invariants:
//! * a bit is set in memory only after its chunk's bytes were written to
//!   `data` (callers keep this; [`CacheDir::mark_present`] says so);
//! * a bit reaches the `present` file only after its bytes were made durable:
//!   [`CacheDir::flush`] snapshots the bits, then `fdatasync`s `data`, then
//!   persists the snapshot;
//! * the `present` file is replaced atomically (temp file, fsync, rename,
//!   fsync directory), so a crash leaves the old or the new bitmap, whole.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub mod bitmap;
mod error;
pub mod io;
#[cfg(test)]
mod tests;

pub use bitmap::{DecodeError, Geometry};
pub use error::CacheError;

use bitmap::PresentBits;

const DATA_FILE: &str = "data";
const BITMAP_FILE: &str = "present";
const LOCK_FILE: &str = "lock";

/// One device's open cache directory.
#[derive(Debug)]
pub struct CacheDir {
    dir: PathBuf,
    geometry: Geometry,
    data: File,
    present: PresentBits,
    /// How many bits the `present` file on disk holds. The lock also keeps
    /// two flushes from interleaving, so an older snapshot never replaces a
    /// newer one.
    persisted: Mutex<u64>,
    /// Declared last so it is dropped last: the lock is released only after
    /// the data file is closed.
    _lock: File,
}

impl CacheDir {
    /// Opens the cache in `dir` for the image whose manifest has digest
    /// `manifest_digest`, creating the directory and files if absent.
    ///
    /// A cache made for another manifest, image size or chunk size is
    /// refused ([`CacheError::WrongManifest`]); a damaged bitmap is refused
    /// ([`CacheError::CorruptBitmap`]). Neither is ever wiped.
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
        let data_path = dir.join(DATA_FILE);
        let bitmap_path = dir.join(BITMAP_FILE);

        let bitmap = match fs::read(&bitmap_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(CacheError::ReadBitmap {
                    path: bitmap_path,
                    source,
                })
            }
        };
        let data_exists = data_path
            .try_exists()
            .map_err(|source| CacheError::OpenData {
                path: data_path.clone(),
                source,
            })?;

        let (present, persisted) = match bitmap {
            None if data_exists => {
                return Err(CacheError::BitmapMissing {
                    dir: dir.to_owned(),
                })
            }
            None => {
                // The bitmap is written before the data file exists, so a
                // crash between the two leaves an empty bitmap and no data:
                // the next open finishes the job below.
                let present = PresentBits::empty(geometry.chunk_count);
                write_bitmap(dir, &bitmap::encode(&geometry, &present.snapshot()))?;
                (present, 0)
            }
            Some(bytes) => {
                let (found, words) =
                    bitmap::decode(&bytes).map_err(|reason| CacheError::CorruptBitmap {
                        path: bitmap_path.clone(),
                        dir: dir.to_owned(),
                        reason,
                    })?;
                if found != geometry {
                    return Err(CacheError::WrongManifest {
                        dir: dir.to_owned(),
                        found: Box::new(found),
                        expected: Box::new(geometry),
                    });
                }
                let present = PresentBits::from_words(geometry.chunk_count, words);
                let count = present.count();
                if !data_exists && count > 0 {
                    return Err(CacheError::DataMissing {
                        dir: dir.to_owned(),
                        present: count,
                    });
                }
                (present, count)
            }
        };

        let data = open_data(dir, &data_path, image_size, data_exists)?;
        Ok(CacheDir {
            dir: dir.to_owned(),
            geometry,
            data,
            present,
            persisted: Mutex::new(persisted),
            _lock: lock,
        })
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

    /// How many chunks the data file holds.
    pub fn present_count(&self) -> u64 {
        self.present.count()
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
        // after the snapshot waits for the next flush.
        let words = self.present.snapshot();
        let count: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        self.data
            .sync_data()
            .map_err(|source| CacheError::SyncData {
                path: self.data_path(),
                source,
            })?;
        // Bits are only ever added, so an equal count is an equal set.
        if count != *persisted {
            write_bitmap(&self.dir, &bitmap::encode(&self.geometry, &words))?;
            *persisted = count;
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

fn take_lock(dir: &Path) -> Result<File, CacheError> {
    let path = dir.join(LOCK_FILE);
    let file = crate::private::file_options()
        .create(true)
        .truncate(false)
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
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(CacheError::InUse {
            dir: dir.to_owned(),
        }),
        Err(errno) => Err(CacheError::Lock {
            path,
            source: errno.into(),
        }),
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
    if exists {
        let actual = file.metadata().map_err(open_err)?.len();
        if actual != image_size {
            return Err(CacheError::DataSize {
                dir: dir.to_owned(),
                expected: image_size,
                actual,
            });
        }
    } else {
        // A fresh sparse file reads as zeros everywhere, which is what an
        // all-zero chunk must read as once written to.
        file.set_len(image_size).map_err(open_err)?;
        file.sync_all().map_err(open_err)?;
        crate::durable::sync_dir(dir).map_err(open_err)?;
    }
    Ok(file)
}

/// Replaces the `present` file atomically and durably.
fn write_bitmap(dir: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let path = dir.join(BITMAP_FILE);
    crate::durable::write_with_mode(&path, bytes, crate::private::FILE_MODE)
        .map_err(|source| CacheError::PersistBitmap { path, source })
}
