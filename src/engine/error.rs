//! Failures of the block engine.
//!
//! Errors are `Clone` (causes behind `Arc`) because one failed fetch is
//! handed to every request that waited on it.

use std::sync::Arc;

use crate::cache::CacheError;
use crate::chunk::{ChunkError, ChunkId};
use crate::error::ErrorKind;
use crate::store::StoreError;

/// A failed engine operation, naming the chunk or range involved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("invalid manifest: {reason}")]
    InvalidManifest { reason: String },
    #[error("open the cache")]
    OpenCache {
        #[source]
        source: Arc<CacheError>,
    },
    #[error("{len} bytes at offset {offset} lie beyond the end of the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("fetch chunk {index} ({id}), {attempts} attempt(s)")]
    FetchChunk {
        index: u64,
        id: ChunkId,
        attempts: u32,
        #[source]
        source: Arc<StoreError>,
    },
    /// The store did not deliver within the chunk's deadline
    /// (`--fetch-timeout`), retries included.
    #[error("fetch chunk {index} ({id}): no answer within {after:?} ({attempts} attempt(s))")]
    FetchTimeout {
        index: u64,
        id: ChunkId,
        after: std::time::Duration,
        attempts: u32,
    },
    #[error("verify chunk {index}")]
    VerifyChunk {
        index: u64,
        #[source]
        source: Arc<ChunkError>,
    },
    #[error(
        "chunk {index} ({id}) opened to {actual} bytes where the manifest calls for {expected}"
    )]
    ChunkLength {
        index: u64,
        id: ChunkId,
        expected: usize,
        actual: usize,
    },
    #[error("store chunk {index} in the cache")]
    FillCache {
        index: u64,
        #[source]
        source: Arc<CacheError>,
    },
    #[error("read from the cache")]
    ReadCache {
        #[source]
        source: Arc<CacheError>,
    },
    #[error("write to the cache")]
    WriteCache {
        #[source]
        source: Arc<CacheError>,
    },
    #[error("fill {len} bytes of the request's registered buffer with zeros")]
    ZeroFill {
        len: usize,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("flush the cache")]
    Flush {
        #[source]
        source: Arc<CacheError>,
    },
    /// A background task (fetch, decrypt, sync) panicked or was cancelled
    /// by a runtime shutting down.
    #[error("{task} did not finish: {reason}")]
    TaskFailed { task: String, reason: String },
    /// Defensive: a chunk that was neither zero nor in the cache after the
    /// engine made it present. Bits are never cleared, so this means a bug;
    /// it fails the request rather than serve wrong bytes.
    #[error("chunk {index} is neither zero nor in the cache after it was fetched")]
    ChunkNotPresent { index: u64 },
}

impl EngineError {
    /// What the caller can do about it; [`ErrorKind::errno`] gives the
    /// errno a frontend completes the request with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::InvalidManifest { .. } | EngineError::OutOfRange { .. } => {
                ErrorKind::Invalid
            }
            EngineError::OpenCache { source } => source.kind(),
            EngineError::ReadOnly => ErrorKind::ReadOnly,
            // A store's complaint about its own configuration is, to the
            // reader of a block, just a failed backend.
            EngineError::FetchChunk { source, .. } => match source.kind() {
                ErrorKind::Invalid | ErrorKind::Unsupported | ErrorKind::ReadOnly => ErrorKind::Io,
                kind => kind,
            },
            EngineError::FetchTimeout { .. } => ErrorKind::Transient,
            EngineError::VerifyChunk { .. } | EngineError::ChunkLength { .. } => {
                ErrorKind::Integrity
            }
            EngineError::FillCache { .. }
            | EngineError::ReadCache { .. }
            | EngineError::WriteCache { .. }
            | EngineError::ZeroFill { .. }
            | EngineError::Flush { .. }
            | EngineError::TaskFailed { .. }
            | EngineError::ChunkNotPresent { .. } => ErrorKind::Io,
        }
    }
}
