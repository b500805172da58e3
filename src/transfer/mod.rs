//! Moving images between a file and a store: [`push`] (image → sealed
//! chunks + manifest in a store), [`push_stream`] (the same for an image
//! handed over chunk by chunk as it is made) and [`export`] (store → image
//! file).
//!
//! Both sit between [`crate::chunk`] (pure sealing) and [`crate::store`]
//! (where envelopes live) and keep these invariants:
//! * a manifest is stored only after every chunk it names is stored, so no
//!   reader ever finds a name without its chunk;
//! * crypto runs on rayon's pool (push also reads each chunk there, right
//!   before sealing it) and other file I/O on tokio's blocking pool; the
//!   runtime's workers only orchestrate;
//! * push hashes each image byte twice and encrypts it once (the convergent
//!   key, the envelope's name, AES-GCM) and never seals an all-zero chunk;
//! * export checks every envelope against its name, then its tag, before a
//!   byte of it reaches the output, and the output appears under its name
//!   only whole, by a final rename.

use std::io;
use std::path::PathBuf;

use serde::Serialize;

use crate::chunk::ManifestError;
use crate::engine::EngineError;
use crate::error::ErrorKind;
use crate::store::StoreError;

mod buffer;
mod export;
mod holes;
mod push;
mod stream;

pub use buffer::ChunkBuffer;
pub use export::export;
pub use push::push;
pub use stream::{push_stream, ChunkWriter};

/// How many chunk uploads or fetches run at once: a push window's worth.
/// Enough to hide a remote store's latency; a directory store gains from
/// overlapping its fsyncs (a 1 GiB push to one took ~4.6 s at 64 against
/// ~5.5–7.6 s at 16).
const CONCURRENCY: usize = 64;

/// Called with (bytes done, total bytes) as a transfer advances.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// What to push and how to cut it.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The manifest's name in the store.
    pub name: String,
    /// The salt domain the caller derived the salt from; recorded in the
    /// manifest.
    pub salt_domain: String,
    /// Bytes per chunk: a power of two in the range
    /// [`crate::chunk::validate_chunk_size`] accepts.
    pub chunk_size: u32,
    /// The digest of what the image was made from, or all zeros.
    pub source_digest: [u8; 32],
}

/// What a push did. Serialises to the keys `lazyblk push --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PushReport {
    pub image_bytes: u64,
    pub chunk_size: u32,
    pub chunks_total: u64,
    /// All-zero chunks: in the manifest, not in the store.
    pub chunks_zero: u64,
    /// Image bytes read (or, streamed, handed over) and checked: holes in
    /// an image file are skipped unread.
    pub bytes_read: u64,
    /// Distinct non-zero chunk ids in the image.
    pub chunks_distinct: u64,
    /// Distinct ids the store already held.
    pub chunks_existing: u64,
    pub chunks_uploaded: u64,
    /// Envelope bytes uploaded (ciphertext and tags).
    pub bytes_uploaded: u64,
    pub name: String,
    #[serde(skip)]
    pub elapsed_secs: f64,
}

/// What an export did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportReport {
    pub image_bytes: u64,
    pub chunk_size: u32,
    pub chunks_total: u64,
    pub chunks_zero: u64,
    /// Distinct chunks fetched: a chunk that appears at several indices is
    /// fetched once and written to each.
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub name: String,
    #[serde(skip)]
    pub elapsed_secs: f64,
}

/// A failed push or export, with the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("invalid push options: {reason}")]
    InvalidOptions { reason: String },
    #[error("read image {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is a {found}, not a regular file or block device")]
    NotAnImage { path: PathBuf, found: &'static str },
    #[error("image {path} is empty: there is nothing to push")]
    EmptyImage { path: PathBuf },
    #[error("ask the store which chunks it lacks")]
    QueryMissing(#[source] StoreError),
    #[error("upload chunk")]
    UploadChunk(#[source] StoreError),
    #[error("store manifest {name:?}")]
    PutManifest {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("fetch manifest {name:?}")]
    GetManifest {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("open manifest")]
    OpenManifest(#[source] ManifestError),
    /// A chunk could not be fetched (after retries of transient failures,
    /// within its deadline), or failed verification.
    #[error("read chunk {index} (image offset {offset}) from the store")]
    ReadChunk {
        index: u64,
        offset: u64,
        #[source]
        source: EngineError,
    },
    #[error("write {path}")]
    WriteOutput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the image's producer stopped before completing it; no manifest was stored")]
    ImageIncomplete,
    #[error("chunk {index} lies past the end of the {image_size}-byte image")]
    ChunkPastEnd { index: u64, image_size: u64 },
    #[error("chunk index {index} is beyond any image")]
    ChunkIndex { index: u64 },
    #[error("{0} stopped before finishing (the runtime is shutting down)")]
    Cancelled(&'static str),
}

impl TransferError {
    /// What a caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        use TransferError::*;
        match self {
            InvalidOptions { .. }
            | NotAnImage { .. }
            | EmptyImage { .. }
            | ChunkPastEnd { .. }
            | ChunkIndex { .. } => ErrorKind::Invalid,
            ReadImage { .. } | WriteOutput { .. } | ImageIncomplete | Cancelled(_) => ErrorKind::Io,
            QueryMissing(source) | UploadChunk(source) => source.kind(),
            PutManifest { source, .. } | GetManifest { source, .. } => source.kind(),
            ReadChunk { source, .. } => source.kind(),
            OpenManifest(_) => ErrorKind::Integrity,
        }
    }
}

/// Runs blocking work (file I/O) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(TransferError::Cancelled(what)),
    }
}

/// Runs CPU-bound work (crypto) on rayon's pool, sized to the cores.
async fn on_rayon<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TransferError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        // The receiver is gone only if the transfer was dropped.
        let _ = tx.send(work());
    });
    rx.await.map_err(|_| TransferError::Cancelled(what))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_sparse;
#[cfg(test)]
mod tests_stream;
