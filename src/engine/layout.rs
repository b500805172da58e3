//! Where a byte offset falls among the image's chunks, and what the
//! manifest says each chunk is. Pure: no I/O, no state.

use crate::chunk::{validate_chunk_size, ChunkId, ChunkKey, Manifest, ManifestEntry};

use super::EngineError;

/// The image's chunk geometry and manifest entries.
#[derive(Debug)]
pub(super) struct Layout {
    manifest: Manifest,
    chunks_zero: u64,
}

/// The part of one request that falls in one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub index: u64,
    /// Offset of the piece in the image.
    pub offset: u64,
    /// Offset of the piece within its chunk.
    pub in_chunk: usize,
    /// Offset of the piece within the request's buffer.
    pub in_buf: usize,
    pub len: usize,
}

/// What the manifest says chunk `index` holds.
#[derive(Debug, Clone, Copy)]
pub(super) enum Content<'a> {
    /// All zeros: never stored, never fetched.
    Zero,
    Sealed {
        id: &'a ChunkId,
        key: &'a ChunkKey,
    },
}

impl Layout {
    /// Checks that `manifest` describes a whole image in chunks of a valid size.
    pub fn new(manifest: Manifest) -> Result<Layout, EngineError> {
        validate_chunk_size(manifest.chunk_size)
            .map_err(|reason| EngineError::InvalidManifest { reason })?;
        let expected = manifest.image_size.div_ceil(u64::from(manifest.chunk_size));
        if manifest.chunk_count() != expected {
            return Err(EngineError::InvalidManifest {
                reason: format!(
                    "{} entries for an image of {} bytes in chunks of {}, which needs {expected}",
                    manifest.chunk_count(),
                    manifest.image_size,
                    manifest.chunk_size
                ),
            });
        }
        let chunks_zero = manifest
            .entries
            .iter()
            .filter(|e| matches!(e, ManifestEntry::Zero))
            .count() as u64;
        Ok(Layout {
            manifest,
            chunks_zero,
        })
    }

    pub fn image_size(&self) -> u64 {
        self.manifest.image_size
    }

    pub fn chunk_size(&self) -> u64 {
        u64::from(self.manifest.chunk_size)
    }

    pub fn chunk_count(&self) -> u64 {
        self.manifest.chunk_count()
    }

    pub fn chunks_zero(&self) -> u64 {
        self.chunks_zero
    }

    /// Bytes in chunk `index` (the last chunk may be short).
    pub fn chunk_len(&self, index: u64) -> usize {
        self.manifest.chunk_len(index)
    }

    /// Offset of chunk `index` in the image.
    pub fn chunk_start(&self, index: u64) -> u64 {
        index * self.chunk_size()
    }

    /// `None` for an index past the end.
    pub fn content(&self, index: u64) -> Option<Content<'_>> {
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| self.manifest.entries.get(i))?;
        Some(match entry {
            ManifestEntry::Zero => Content::Zero,
            ManifestEntry::Chunk { id, key } => Content::Sealed { id, key },
        })
    }

    /// The indices holding `ids`, in the order of `ids` (an id held at
    /// several indices gives each, in index order), each once; ids the
    /// manifest lacks give none.
    pub fn indices_of(&self, ids: &[ChunkId]) -> Vec<u64> {
        let mut at: std::collections::HashMap<&ChunkId, Vec<u64>> =
            std::collections::HashMap::new();
        for (index, entry) in self.manifest.entries.iter().enumerate() {
            if let ManifestEntry::Chunk { id, .. } = entry {
                at.entry(id).or_default().push(index as u64);
            }
        }
        let mut plan = Vec::new();
        for id in ids {
            // Taking the list out makes a repeated id give nothing more.
            plan.extend(at.remove(id).unwrap_or_default());
        }
        plan
    }

    pub fn is_zero(&self, index: u64) -> bool {
        matches!(self.content(index), Some(Content::Zero))
    }

    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.image_size() => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.image_size(),
            }),
        }
    }

    /// The first and last chunk of a non-empty in-range request.
    pub fn chunk_span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        (len > 0).then(|| {
            (
                offset / self.chunk_size(),
                (offset + len - 1) / self.chunk_size(),
            )
        })
    }

    /// The pieces of an in-range request, in order. Lengths are `u64` so a
    /// discard larger than memory can be described; a piece is at most one
    /// chunk.
    pub fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let chunk_size = self.chunk_size();
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = offset + done;
            let in_chunk = at % chunk_size;
            let piece_len = (len - done).min(chunk_size - in_chunk);
            let piece = Piece {
                index: at / chunk_size,
                offset: at,
                in_chunk: in_chunk as usize,
                in_buf: done as usize,
                len: piece_len as usize,
            };
            done += piece_len;
            Some(piece)
        })
    }

    /// Whether `piece` covers its whole chunk.
    pub fn is_whole(&self, piece: &Piece) -> bool {
        piece.len == self.chunk_len(piece.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(image_size: u64) -> Layout {
        let chunk_size = 64 << 10;
        let count = image_size.div_ceil(chunk_size) as usize;
        Layout::new(Manifest {
            image_size,
            chunk_size: chunk_size as u32,
            salt_domain: "test".into(),
            source_digest: [0; 32],
            entries: vec![ManifestEntry::Zero; count],
        })
        .unwrap()
    }

    #[test]
    fn pieces_cover_the_request_once_and_stop_at_chunk_edges() {
        let layout = layout(5 * 65536 + 100);
        for (offset, len) in [(0, 1), (65535, 2), (100, 3 * 65536), (5 * 65536, 100)] {
            let pieces: Vec<Piece> = layout.pieces(offset, len).collect();
            assert_eq!(pieces.iter().map(|p| p.len as u64).sum::<u64>(), len);
            for pair in pieces.windows(2) {
                assert_eq!(pair[0].offset + pair[0].len as u64, pair[1].offset);
                assert_eq!(pair[1].in_chunk, 0);
            }
            let (first, last) = layout.chunk_span(offset, len).unwrap();
            assert_eq!(pieces[0].index, first);
            assert_eq!(pieces.last().unwrap().index, last);
        }
        let tail = layout.pieces(5 * 65536, 100).next().unwrap();
        assert!(
            layout.is_whole(&tail),
            "the short last chunk is whole at 100 bytes"
        );
        assert!(layout.check_range(5 * 65536, 101).is_err());
        assert!(layout.check_range(u64::MAX, 2).is_err());
    }
}
