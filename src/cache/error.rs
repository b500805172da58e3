//! Failures of the cache layer.

use std::io;
use std::path::PathBuf;

use super::{DecodeError, Geometry};
use crate::error::ErrorKind;

/// A failed cache operation, naming the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid cache geometry: {reason}")]
    InvalidGeometry { reason: String },
    /// The directory could not be made, or others may read it.
    #[error(transparent)]
    Private(#[from] crate::private::PrivacyError),
    #[error("lock cache file {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cache directory {} is in use by {}; stop that device first (or use another cache directory)",
        dir.display(),
        match holder { Some(pid) => format!("process {pid}"), None => "another process".into() }
    )]
    InUse { dir: PathBuf, holder: Option<u32> },
    #[error("read present-bitmap {}", path.display())]
    ReadBitmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("present-bitmap {} was written by another version of lazyblk", path.display())]
    UnsupportedBitmap {
        path: PathBuf,
        #[source]
        reason: DecodeError,
    },
    #[error(
        "cache directory {} was made for manifest {} ({} bytes in chunks of {}), not for \
         manifest {} ({} bytes in chunks of {}); use another cache directory or delete this one",
        dir.display(),
        hex::encode(found.manifest_digest),
        found.image_size,
        found.chunk_size,
        hex::encode(expected.manifest_digest),
        expected.image_size,
        expected.chunk_size
    )]
    WrongManifest {
        dir: PathBuf,
        found: Box<Geometry>,
        expected: Box<Geometry>,
    },
    #[error("open cache data file {}", path.display())]
    OpenData {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{len} bytes at offset {offset} lie beyond the {image_size}-byte image")]
    OutOfRange {
        offset: u64,
        len: usize,
        image_size: u64,
    },
    #[error("read {len} bytes at offset {offset} of {}", path.display())]
    ReadData {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("write {len} bytes at offset {offset} of {}", path.display())]
    WriteData {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("punch {len} bytes at offset {offset} of {}", path.display())]
    PunchData {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("sync cache data file {}", path.display())]
    SyncData {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record a written chunk in {}", path.display())]
    RecordWritten {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("persist present-bitmap {}", path.display())]
    PersistBitmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CacheError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CacheError::InvalidGeometry { .. }
            | CacheError::WrongManifest { .. }
            | CacheError::OutOfRange { .. } => ErrorKind::Invalid,
            CacheError::UnsupportedBitmap { .. } => ErrorKind::Unsupported,
            CacheError::Private(e) if e.io_source().is_none() => ErrorKind::Invalid,
            CacheError::Private(_)
            | CacheError::Lock { .. }
            | CacheError::InUse { .. }
            | CacheError::ReadBitmap { .. }
            | CacheError::OpenData { .. }
            | CacheError::ReadData { .. }
            | CacheError::WriteData { .. }
            | CacheError::PunchData { .. }
            | CacheError::SyncData { .. }
            | CacheError::RecordWritten { .. }
            | CacheError::PersistBitmap { .. } => ErrorKind::Io,
        }
    }
}
