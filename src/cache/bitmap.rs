//! The present-bitmap: which chunks of the image the data file holds, and
//! which of those the device has written to.
//!
//! In memory each set is a word array of atomics, so any number of readers
//! test bits without a lock while fetches and writes set them. A serving
//! cache only ever sets bits: a chunk once present stays present. Only a
//! repair (at open, or `verify-cache --repair`) clears them.
//!
//! On disk it is the `present` file described in `docs/FORMAT.md`
//! ("Cache present-bitmap"): a fixed header naming the manifest and geometry,
//! the present bits and the written bits LSB-first, and a SHA-256 of
//! everything before it so a torn or damaged file is refused rather than
//! trusted.

use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// The first eight bytes of every present-bitmap file.
pub const MAGIC: [u8; 8] = *b"LZBKPRES";
/// The format version this build writes.
pub const VERSION: u32 = 2;
/// The version before written bits, still read: it cannot tell written
/// chunks from fetched ones, so every present chunk counts as written.
pub const VERSION_PRESENT_ONLY: u32 = 1;
/// Bytes before the bits.
pub const HEADER_LEN: usize = 64;
/// Bytes of the trailing SHA-256.
pub const CHECKSUM_LEN: usize = 32;

/// What a cache directory was made for. Two caches are interchangeable only
/// if every field is equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub manifest_digest: [u8; 32],
    pub image_size: u64,
    pub chunk_size: u32,
    pub chunk_count: u64,
}

impl Geometry {
    /// The geometry of an image of `image_size` bytes cut into chunks of
    /// `chunk_size` (the last chunk may be short).
    pub fn new(manifest_digest: [u8; 32], image_size: u64, chunk_size: u32) -> Option<Geometry> {
        if chunk_size == 0 {
            return None;
        }
        Some(Geometry {
            manifest_digest,
            image_size,
            chunk_size,
            chunk_count: image_size.div_ceil(u64::from(chunk_size)),
        })
    }

    fn bitmap_bytes(&self) -> usize {
        // chunk_count ≤ image_size, which fits a file; the bitmap is 1/8 of that.
        (self.chunk_count.div_ceil(8)) as usize
    }
}

/// A set of chunk indices, readable and settable from many threads at once.
#[derive(Debug)]
pub struct PresentBits {
    words: Box<[AtomicU64]>,
    len: u64,
    count: AtomicU64,
}

impl PresentBits {
    /// A set over `0..len` holding the bits of `words` (which must have
    /// room for `len` bits and none set beyond).
    pub fn from_words(len: u64, words: Vec<u64>) -> PresentBits {
        debug_assert_eq!(words.len() as u64, len.div_ceil(64));
        let count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        PresentBits {
            words: words.into_iter().map(AtomicU64::new).collect(),
            len,
            count: AtomicU64::new(count),
        }
    }

    /// An empty set over `0..len`.
    pub fn empty(len: u64) -> PresentBits {
        PresentBits::from_words(len, vec![0; len.div_ceil(64) as usize])
    }

    /// Whether `index` is in the set; false for an index out of range.
    pub fn get(&self, index: u64) -> bool {
        if index >= self.len {
            return false;
        }
        let (word, bit) = word_and_bit(index);
        // Acquire pairs with the Release in `set`: whoever sees the bit also
        // sees everything done before it was set (the data written).
        self.words[word].load(Ordering::Acquire) & bit != 0
    }

    /// Adds `index`; true if it was not there before. An index out of range
    /// is ignored (false).
    pub fn set(&self, index: u64) -> bool {
        if index >= self.len {
            return false;
        }
        let (word, bit) = word_and_bit(index);
        let before = self.words[word].fetch_or(bit, Ordering::AcqRel);
        let added = before & bit == 0;
        if added {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        added
    }

    /// Removes `index`; true if it was there. For repairs only: a serving
    /// cache never forgets a chunk (readers test bits without a lock).
    pub fn clear(&self, index: u64) -> bool {
        if index >= self.len {
            return false;
        }
        let (word, bit) = word_and_bit(index);
        let before = self.words[word].fetch_and(!bit, Ordering::AcqRel);
        let removed = before & bit != 0;
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// How many indices are in the set.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The size of the universe `0..len`.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the universe is empty (an image of zero bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the words as they are now. Each bit seen set had its data
    /// written before this call began.
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// The indices in the set now, ascending.
    pub fn indices(&self) -> Vec<u64> {
        set_indices(&self.snapshot()).collect()
    }
}

/// Where chunk `index` sits in a set's words: the word, and its bit there.
fn word_and_bit(index: u64) -> (usize, u64) {
    ((index / 64) as usize, 1 << (index % 64))
}

/// Whether `index` is set in `words` (a snapshot); false past their end.
pub fn is_set(words: &[u64], index: u64) -> bool {
    let (word, bit) = word_and_bit(index);
    words.get(word).is_some_and(|w| w & bit != 0)
}

/// The indices set in `words` (a snapshot), ascending.
pub fn set_indices(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(i, &word)| {
        (0..64)
            .filter(move |bit| word & (1 << bit) != 0)
            .map(move |bit| i as u64 * 64 + bit)
    })
}

/// The contents of a bitmap file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapFile {
    pub geometry: Geometry,
    /// Chunks the data file holds, as words (bit `i % 64` of word `i / 64`).
    pub present: Vec<u64>,
    /// Chunks the device wrote to (written, discarded or zeroed): their
    /// bytes are the user's, not the manifest's.
    pub written: Vec<u64>,
}

/// Serialises a bitmap file for `geometry` holding the `present` and
/// `written` bits (as words); written bits of chunks not present are left
/// out.
pub fn encode(geometry: &Geometry, present: &[u64], written: &[u64]) -> Vec<u8> {
    let bitmap_bytes = geometry.bitmap_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + 2 * bitmap_bytes + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&geometry.chunk_size.to_le_bytes());
    out.extend_from_slice(&geometry.chunk_count.to_le_bytes());
    out.extend_from_slice(&geometry.image_size.to_le_bytes());
    out.extend_from_slice(&geometry.manifest_digest);
    debug_assert_eq!(out.len(), HEADER_LEN);
    // Little-endian words laid end to end are exactly the LSB-first byte
    // bitmap: bit i sits in byte i/8 at bit i%8.
    out.extend(
        present
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(bitmap_bytes),
    );
    // A written bit means nothing for a chunk that is not present (a
    // snapshot may catch a write that made a chunk present half done): it is
    // left out, so every file holds written bits of present chunks only.
    out.extend(
        written
            .iter()
            .zip(present)
            .flat_map(|(w, p)| (w & p).to_le_bytes())
            .take(bitmap_bytes),
    );
    let checksum: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&checksum);
    out
}

/// Why a bitmap file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{len} bytes is shorter than the {min}-byte minimum")]
    TooShort { len: usize, min: usize },
    #[error("it does not start with the present-bitmap magic")]
    BadMagic,
    #[error("its checksum does not match its contents (torn or damaged write)")]
    Checksum,
    #[error("format version {0} is not supported (this build reads versions {VERSION_PRESENT_ONLY} and {VERSION})")]
    Version(u32),
    #[error("its header says {chunk_count} chunks of {chunk_size} bytes for an image of {image_size} bytes")]
    Inconsistent {
        chunk_count: u64,
        chunk_size: u32,
        image_size: u64,
    },
    #[error("it is {actual} bytes but its header calls for {expected}")]
    Length { expected: usize, actual: usize },
    #[error("bits are set beyond chunk {chunk_count}")]
    StrayBits { chunk_count: u64 },
    #[error("it marks chunks written that it does not mark present")]
    WrittenNotPresent,
}

/// Parses and checks a bitmap file.
pub fn decode(bytes: &[u8]) -> Result<BitmapFile, DecodeError> {
    let min = HEADER_LEN + CHECKSUM_LEN;
    if bytes.len() < min {
        return Err(DecodeError::TooShort {
            len: bytes.len(),
            min,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if Sha256::digest(body).as_slice() != checksum {
        return Err(DecodeError::Checksum);
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    let bit_arrays = match version {
        VERSION => 2,
        VERSION_PRESENT_ONLY => 1,
        _ => return Err(DecodeError::Version(version)),
    };
    let (chunk_size, chunk_count, image_size) = (u32_at(12), u64_at(16), u64_at(24));
    let manifest_digest: [u8; 32] = body[32..64].try_into().expect("32 bytes");
    let geometry = Geometry::new(manifest_digest, image_size, chunk_size)
        .filter(|g| g.chunk_count == chunk_count)
        .ok_or(DecodeError::Inconsistent {
            chunk_count,
            chunk_size,
            image_size,
        })?;
    let bitmap_bytes = geometry.bitmap_bytes();
    let expected = HEADER_LEN + bit_arrays * bitmap_bytes + CHECKSUM_LEN;
    if bytes.len() != expected {
        return Err(DecodeError::Length {
            expected,
            actual: bytes.len(),
        });
    }
    let present = words_of(&body[HEADER_LEN..][..bitmap_bytes], chunk_count)?;
    let written = if bit_arrays == 2 {
        let written = words_of(&body[HEADER_LEN + bitmap_bytes..], chunk_count)?;
        // A written chunk the data file does not hold means nothing; a
        // writer never records one, so the file is not what it claims.
        if written.iter().zip(&present).any(|(w, p)| w & !p != 0) {
            return Err(DecodeError::WrittenNotPresent);
        }
        written
    } else {
        present.clone()
    };
    Ok(BitmapFile {
        geometry,
        present,
        written,
    })
}

/// The bits of `bytes` (LSB-first) as words, refusing any past `chunk_count`.
fn words_of(bytes: &[u8], chunk_count: u64) -> Result<Vec<u64>, DecodeError> {
    let mut words = vec![0u64; chunk_count.div_ceil(64) as usize];
    for (i, &byte) in bytes.iter().enumerate() {
        words[i / 8] |= u64::from(byte) << (8 * (i % 8));
    }
    if let Some(last) = words.last() {
        let used = chunk_count % 64;
        if used != 0 && last >> used != 0 {
            return Err(DecodeError::StrayBits { chunk_count });
        }
    }
    Ok(words)
}
