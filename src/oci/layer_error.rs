//! What reading a layer reports: the image's budget ([`LayerLimits`]), what
//! a layer held ([`LayerStats`]) and why it could not be read
//! ([`LayerError`], with an [`ErrorKind`] for callers that branch).

use std::error::Error as StdError;
use std::io;

use super::compress::DecompressError;
use super::header::EntryError;
use super::verify::BlobError;
use crate::error::ErrorKind;

/// Largest GNU long name, long link or PAX header accepted (each is held in
/// memory while its member is read).
pub const MAX_METADATA_LEN: u64 = 1 << 20;

/// What the `apply` callback may fail with.
pub type ApplyError = Box<dyn StdError + Send + Sync>;

/// The budget of one image, spent across its layers: expanded (tar) bytes
/// and entries. It protects against decompression bombs, so it counts what
/// is read, not what the headers claim; the holes of sparse files count
/// too, since a few bytes of map can claim terabytes of them.
#[derive(Debug, Clone)]
pub struct LayerLimits {
    pub max_bytes: u64,
    pub max_entries: u64,
    pub(super) bytes: u64,
    /// Zeros of sparse files' holes handed out (not read).
    pub(super) holes: u64,
    pub(super) entries: u64,
    pub(super) exceeded: Option<Limit>,
}

/// Which limit an image ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    #[error("the image's layers expand to more than {0} bytes (the limit)")]
    Bytes(u64),
    #[error("the image's layers hold more than {0} entries (the limit)")]
    Entries(u64),
}

impl Default for LayerLimits {
    /// 64 GiB of tar and 10 million entries: far beyond real images.
    fn default() -> Self {
        LayerLimits::new(64 << 30, 10_000_000)
    }
}

impl LayerLimits {
    pub fn new(max_bytes: u64, max_entries: u64) -> Self {
        LayerLimits {
            max_bytes,
            max_entries,
            bytes: 0,
            holes: 0,
            entries: 0,
            exceeded: None,
        }
    }

    /// Expanded bytes read so far, over all layers, sparse holes included.
    pub fn bytes_used(&self) -> u64 {
        self.bytes + self.holes
    }

    /// Entries read so far, over all layers.
    pub fn entries_used(&self) -> u64 {
        self.entries
    }
}

/// What one layer held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries handed to `apply`.
    pub entries: u64,
    /// Members with no meaning for the image (AUFS whiteout metadata, PAX
    /// global headers).
    pub skipped: u64,
    /// Regular-file data bytes.
    pub data_bytes: u64,
    /// Every byte of the tar stream, padding and trailer included.
    pub tar_bytes: u64,
}

/// Why a layer could not be read. Each names the layer and, where one was
/// being read, the member by its path as written.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer}: reading the tar header at byte {offset} (after {previous:?})")]
    ReadHeader {
        layer: String,
        offset: u64,
        previous: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "layer {layer}: tar header of {entry:?} at byte {offset} is corrupt: \
         checksum {stored} recorded, {computed} computed"
    )]
    Checksum {
        layer: String,
        entry: String,
        offset: u64,
        stored: String,
        computed: u32,
    },
    #[error("layer {layer}: entry {entry:?}")]
    Entry {
        layer: String,
        entry: String,
        #[source]
        source: EntryError,
    },
    #[error("layer {layer}: entry {entry:?}: {what} is {len} bytes, more than {MAX_METADATA_LEN}")]
    MetadataTooLarge {
        layer: String,
        entry: String,
        what: &'static str,
        len: u64,
    },
    #[error("layer {layer}: {what} at byte {offset} describes no member: the stream ends")]
    DanglingExtension {
        layer: String,
        what: &'static str,
        offset: u64,
    },
    #[error("layer {layer}: entry {entry:?}: reading its data")]
    ReadData {
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: entry {entry:?}: applying it")]
    Apply {
        layer: String,
        entry: String,
        #[source]
        source: ApplyError,
    },
    #[error("layer {layer}: entry {entry:?}")]
    LimitExceeded {
        layer: String,
        entry: String,
        #[source]
        limit: Limit,
    },
    #[error("layer {layer}: reading past the end-of-archive marker")]
    ReadTrailer {
        layer: String,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            LayerError::Entry {
                source: EntryError::UnsupportedType(_) | EntryError::UnsupportedSparse(_),
                ..
            } => ErrorKind::Unsupported,
            LayerError::Checksum { .. }
            | LayerError::Entry { .. }
            | LayerError::MetadataTooLarge { .. }
            | LayerError::DanglingExtension { .. }
            | LayerError::LimitExceeded { .. } => ErrorKind::Invalid,
            LayerError::ReadHeader { .. }
            | LayerError::ReadData { .. }
            | LayerError::ReadTrailer { .. }
            | LayerError::Apply { .. } => {
                if find_in_chain::<BlobError>(self).is_some() {
                    ErrorKind::Integrity
                } else if find_in_chain::<Truncated>(self).is_some()
                    || find_in_chain::<DecompressError>(self).is_some()
                {
                    ErrorKind::Invalid
                } else {
                    ErrorKind::Io
                }
            }
        }
    }
}

/// The first error of type `T` in `err`'s chain, looking inside
/// `io::Error`s too (their `source()` skips the error they wrap).
pub fn find_in_chain<'a, T: StdError + 'static>(
    err: &'a (dyn StdError + 'static),
) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = find_in_chain::<T>(inner) {
                return Some(found);
            }
        }
        next = e.source();
    }
    None
}

/// The tar stream ended inside a header or an entry's data.
#[derive(Debug, thiserror::Error)]
#[error("the tar stream ends {missing} bytes early, inside {inside}")]
pub struct Truncated {
    pub missing: u64,
    pub inside: &'static str,
}

pub(super) fn truncated(missing: u64, inside: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, Truncated { missing, inside })
}
