//! Checking a cache's bytes against its manifest, without the store.
//!
//! A present chunk the device never wrote to must hold exactly the
//! manifest's plaintext. The manifest names each chunk by its envelope's
//! hash and holds its key, and sealing is deterministic under the key, so
//! re-sealing the cached bytes and hashing them checks them (see
//! [`crate::chunk::plaintext_matches`]); a zero chunk must be all zeros.
//! Chunks the device wrote to hold the user's bytes and are not checked.

use crate::chunk::{is_zero, plaintext_matches, Manifest, ManifestEntry};

use super::{CacheDir, CacheError};

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
pub fn check_chunks(cache: &CacheDir, manifest: &Manifest) -> Result<CheckReport, CacheError> {
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
