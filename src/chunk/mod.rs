//! Chunks: cutting an image into fixed-size pieces, convergent encryption,
//! chunk names and the sealed manifest.
//!
//! Everything here is pure (no I/O) so it stays deterministic and fuzzable.
//!
//! Invariants:
//! * a chunk's key is SHA-256(salt ‖ plaintext), so identical plaintext under
//!   the same salt gives the identical sealed object (stored once);
//! * a chunk's name ([`ChunkId`]) is SHA-256 of its sealed envelope, checked on
//!   every open before any decryption;
//! * an all-zero chunk is never sealed: the manifest marks it zero.

mod id;
mod keys;
mod manifest;
mod seal;
mod trace;

pub use id::{ChunkId, ParseChunkIdError};
pub use keys::{derive_salt, validate_salt_domain, KeyFileError, Salt, TenantKey};
pub use manifest::{manifest_digest, Manifest, ManifestEntry, ManifestError, PublicManifest};
pub use seal::{
    chunk_key, open_chunk, open_chunk_in_place, plaintext_matches, seal_chunk, seal_chunk_in_place,
    verify_envelope, verify_envelope_off_runtime, ChunkError, ChunkKey, SealedChunk,
    ENVELOPE_OVERHEAD,
};
pub use trace::{
    merge as merge_trace_runs, RunStamp, Trace, TraceError, TraceRun, DEFAULT_MERGE_THRESHOLD,
    MAX_TRACE_RUNS,
};

/// The default chunk size: 512 KiB, as in the paper.
pub const DEFAULT_CHUNK_SIZE: u32 = 512 * 1024;
/// The smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// The largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;

/// Checks that `size` is a power of two in [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
pub fn validate_chunk_size(size: u32) -> Result<(), String> {
    if size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "chunk size {size} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        ))
    }
}

/// Whether every byte of `data` is zero. Such a chunk is elided.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed blocks vectorises; `iter().all` stops per byte and does not.
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
