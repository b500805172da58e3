//! Checking a cache's bytes against its manifest, without the store.
//!
//! A present chunk the device never wrote to must hold exactly the
//! manifest's plaintext. The manifest names each chunk by its envelope's
//! hash and holds its key, and sealing is deterministic under the key, so
//! re-sealing the cached bytes and hashing them checks them (see
//! [`crate::chunk::plaintext_matches`]); a zero chunk must be all zeros.
//! Chunks the device wrote to hold the user's bytes and are not checked.
//!
//! A check must not change what it checks: [`ReadOnlyCache`] opens a cache
//! without writing to any of its files, finding the damage that opening a
//! [`CacheDir`] would repair, and repairing none of it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::chunk::{is_zero, plaintext_matches, Manifest, ManifestEntry};

use super::attach::{load, Access, Loaded};
use super::bitmap::PresentBits;
use super::{take_lock_read_only, CacheDir, CacheError, Geometry, Repair, DATA_FILE};

/// A cache whose chunks can be checked.
pub trait CachedChunks {
    fn geometry(&self) -> &Geometry;
    fn is_present(&self, index: u64) -> bool;
    fn is_written(&self, index: u64) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CacheError>;
}

impl CachedChunks for CacheDir {
    fn geometry(&self) -> &Geometry {
        CacheDir::geometry(self)
    }
    fn is_present(&self, index: u64) -> bool {
        CacheDir::is_present(self, index)
    }
    fn is_written(&self, index: u64) -> bool {
        CacheDir::is_written(self, index)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CacheError> {
        CacheDir::read_at(self, buf, offset)
    }
}

/// A cache directory opened to be looked at: nothing on disk changes, not
/// even the lock file's pid. Devices are kept out while it is open.
#[derive(Debug)]
pub struct ReadOnlyCache {
    dir: PathBuf,
    geometry: Geometry,
    /// `None` when the data file is missing (then no chunk is present).
    data: Option<File>,
    present: PresentBits,
    written: PresentBits,
    damage: Vec<Repair>,
    _lock: Option<File>,
}

impl ReadOnlyCache {
    /// Opens the existing cache in `dir` made for the manifest with digest
    /// `manifest_digest`; refused like [`CacheDir::open_or_create`] refuses.
    pub fn open(
        dir: &Path,
        manifest_digest: [u8; 32],
        image_size: u64,
        chunk_size: u32,
    ) -> Result<ReadOnlyCache, CacheError> {
        let geometry = Geometry::new(manifest_digest, image_size, chunk_size).ok_or_else(|| {
            CacheError::InvalidGeometry {
                reason: "chunk size is zero".into(),
            }
        })?;
        crate::private::check_dir(dir, crate::private::CACHE_DIR)?;
        let lock = take_lock_read_only(dir)?;
        let Loaded {
            data,
            present,
            written,
            repairs,
            logged,
            ..
        } = load(dir, &geometry, Access::ReadOnly)?;
        for index in logged {
            written.set(index);
        }
        Ok(ReadOnlyCache {
            dir: dir.to_owned(),
            geometry,
            data,
            present,
            written,
            damage: repairs,
            _lock: lock,
        })
    }

    /// The damage opening to repair would find, and the bits it would drop.
    pub fn damage(&self) -> &[Repair] {
        &self.damage
    }
}

impl CachedChunks for ReadOnlyCache {
    fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    fn is_present(&self, index: u64) -> bool {
        self.present.get(index)
    }
    fn is_written(&self, index: u64) -> bool {
        self.written.get(index)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CacheError> {
        let len = buf.len();
        let read_err = |source| CacheError::ReadData {
            path: self.dir.join(DATA_FILE),
            offset,
            len,
            source,
        };
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| read_err(std::io::ErrorKind::NotFound.into()))?;
        data.read_exact_at(buf, offset).map_err(read_err)
    }
}

/// What a check of a cache found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Chunks in the image.
    pub chunks_total: u64,
    /// Present chunks whose bytes were compared with the manifest.
    pub chunks_checked: u64,
    /// Present chunks the device wrote to: the user's bytes, not checked.
    pub chunks_written: u64,
    /// Checked chunks whose bytes are not the manifest's, ascending.
    pub mismatched: Vec<u64>,
}

/// Checks every present, unwritten chunk of `cache` against `manifest`
/// (which must be the manifest the cache was opened for).
pub fn check_chunks(
    cache: &impl CachedChunks,
    manifest: &Manifest,
) -> Result<CheckReport, CacheError> {
    let geometry = cache.geometry();
    if manifest.chunk_count() != geometry.chunk_count
        || manifest.chunk_size != geometry.chunk_size
        || manifest.image_size != geometry.image_size
    {
        return Err(CacheError::InvalidGeometry {
            reason: format!(
                "the manifest has {} chunks of {} bytes for {} bytes, the cache {} of {} for {}",
                manifest.chunk_count(),
                manifest.chunk_size,
                manifest.image_size,
                geometry.chunk_count,
                geometry.chunk_size,
                geometry.image_size
            ),
        });
    }
    let mut report = CheckReport {
        chunks_total: geometry.chunk_count,
        ..CheckReport::default()
    };
    let mut buf = vec![0; geometry.chunk_size as usize];
    for (index, entry) in (0..).zip(&manifest.entries) {
        if !cache.is_present(index) {
            continue;
        }
        if cache.is_written(index) {
            report.chunks_written += 1;
            continue;
        }
        let plaintext = &mut buf[..manifest.chunk_len(index)];
        cache.read_at(plaintext, index * u64::from(geometry.chunk_size))?;
        let matches = match entry {
            ManifestEntry::Zero => is_zero(plaintext),
            ManifestEntry::Chunk { id, key } => plaintext_matches(id, key, plaintext),
        };
        report.chunks_checked += 1;
        if !matches {
            report.mismatched.push(index);
        }
    }
    Ok(report)
}
