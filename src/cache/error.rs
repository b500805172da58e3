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
    #[error("cache directory {} is in use by another process", dir.display())]
    InUse { dir: PathBuf },
    #[error("read present-bitmap {}", path.display())]
    ReadBitmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "present-bitmap {} is corrupt; delete the cache directory {} to start it afresh",
        path.display(),
        dir.display()
    )]
    CorruptBitmap {
        path: PathBuf,
        dir: PathBuf,
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
    #[error(
        "cache directory {} has a data file but no present-bitmap; delete the directory to start it afresh",
        dir.display()
    )]
    BitmapMissing { dir: PathBuf },
    #[error(
        "cache directory {} lists {present} chunks present but has no data file; delete the directory to start it afresh",
        dir.display()
    )]
    DataMissing { dir: PathBuf, present: u64 },
    #[error(
        "cache directory {} has a data file of {actual} bytes, not the image's {expected}; delete the directory to start it afresh",
        dir.display()
    )]
    DataSize {
        dir: PathBuf,
        expected: u64,
        actual: u64,
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
            CacheError::CorruptBitmap { .. }
            | CacheError::BitmapMissing { .. }
            | CacheError::DataMissing { .. }
            | CacheError::DataSize { .. } => ErrorKind::Integrity,
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
            | CacheError::PersistBitmap { .. } => ErrorKind::Io,
        }
    }
}
