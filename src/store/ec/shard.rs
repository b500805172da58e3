//! The shard object: one erasure-coded piece of a chunk envelope as a cache
//! node stores it, with a header that lets the node refuse malformed or
//! truncated uploads and a reader discard a bad shard on its own.
//!
//! A shard cannot be named by the SHA-256 of its bytes the way a chunk is
//! (a reader knows only the chunk id), so shards live in their own
//! namespace, `(chunk id, shard index)`. The header is not trusted: the
//! reader still checks the rebuilt envelope against the chunk id. Layout
//! (docs/FORMAT.md, "Erasure-coded shard"):
//!
//! ```text
//! 0   4  magic "LBSH"
//! 4   1  version (1)
//! 5   1  k, data shards
//! 6   1  m, parity shards
//! 7   1  index of this shard, 0..k+m (data shards first)
//! 8   4  envelope length, u32 little-endian
//! 12 32  chunk id
//! 44 32  SHA-256 of bytes 0..44 followed by the shard data
//! 76  …  shard data, exactly Scheme::shard_len(envelope length) bytes
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::codec::Scheme;
use crate::chunk::ChunkId;
use crate::store::MAX_ENVELOPE_SIZE;

const MAGIC: &[u8; 4] = b"LBSH";
const VERSION: u8 = 1;
/// Bytes before the shard data.
pub const SHARD_HEADER_LEN: usize = 76;
/// The covered part of the header: everything but the checksum.
const COVERED: usize = 44;

/// What a shard says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    pub id: ChunkId,
    pub index: u8,
    pub scheme: Scheme,
    pub envelope_len: u32,
}

/// Why a shard object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("shard object of {0} bytes is shorter than its header")]
    Truncated(usize),
    #[error("not a shard object (bad magic or version {0})")]
    NotAShard(u8),
    #[error("shard header: {0}")]
    BadHeader(String),
    #[error("shard data holds {actual} bytes, its header implies {expected}")]
    DataLength { expected: usize, actual: usize },
    #[error("shard checksum does not match its contents")]
    Checksum,
    #[error("shard is {found}, expected {expected}")]
    Mismatch { expected: String, found: String },
}

impl ShardHeader {
    /// Header and data as one object.
    pub fn seal(&self, data: &[u8]) -> Bytes {
        let mut object = BytesMut::with_capacity(SHARD_HEADER_LEN + data.len());
        object.put_slice(MAGIC);
        object.put_u8(VERSION);
        object.put_u8(self.scheme.data_shards() as u8);
        object.put_u8(self.scheme.parity_shards() as u8);
        object.put_u8(self.index);
        object.put_u32_le(self.envelope_len);
        object.put_slice(&self.id.0);
        let checksum = checksum(&object[..COVERED], data);
        object.put_slice(&checksum);
        object.put_slice(data);
        object.freeze()
    }

    /// Parses and checks a whole shard object; returns its header and data.
    pub fn open(object: &Bytes) -> Result<(ShardHeader, Bytes), ShardError> {
        if object.len() < SHARD_HEADER_LEN {
            return Err(ShardError::Truncated(object.len()));
        }
        if &object[..4] != MAGIC || object[4] != VERSION {
            return Err(ShardError::NotAShard(object[4]));
        }
        let scheme = Scheme::new(object[5] as usize, object[6] as usize)
            .map_err(|e| ShardError::BadHeader(e.to_string()))?;
        let index = object[7];
        if index as usize >= scheme.total_shards() {
            return Err(ShardError::BadHeader(format!(
                "index {index} out of range for {scheme}"
            )));
        }
        let envelope_len = u32::from_le_bytes(object[8..12].try_into().expect("4 bytes"));
        if envelope_len as usize > MAX_ENVELOPE_SIZE {
            return Err(ShardError::BadHeader(format!(
                "envelope length {envelope_len} exceeds {MAX_ENVELOPE_SIZE}"
            )));
        }
        let id = ChunkId(object[12..44].try_into().expect("32 bytes"));
        let data = object.slice(SHARD_HEADER_LEN..);
        let expected = scheme.shard_len(envelope_len as usize);
        if data.len() != expected {
            return Err(ShardError::DataLength {
                expected,
                actual: data.len(),
            });
        }
        if checksum(&object[..COVERED], &data) != object[COVERED..SHARD_HEADER_LEN] {
            return Err(ShardError::Checksum);
        }
        let header = ShardHeader {
            id,
            index,
            scheme,
            envelope_len,
        };
        Ok((header, data))
    }

    /// Checks that this is shard `index` of chunk `id` (and, when given,
    /// coded with `scheme`): a node must not file a shard under another
    /// name, and a reader must not mix shards of different codings.
    pub fn expect(
        &self,
        id: &ChunkId,
        index: u8,
        scheme: Option<Scheme>,
    ) -> Result<(), ShardError> {
        let same_scheme = scheme.is_none_or(|s| s == self.scheme);
        if self.id == *id && self.index == index && same_scheme {
            return Ok(());
        }
        let expected_scheme = scheme.map(|s| format!(" ({s})")).unwrap_or_default();
        Err(ShardError::Mismatch {
            expected: format!("{id}/{index}{expected_scheme}"),
            found: format!("{}/{} ({})", self.id, self.index, self.scheme),
        })
    }
}

fn checksum(covered_header: &[u8], data: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(covered_header);
    hash.update(data);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (ShardHeader, Vec<u8>) {
        let scheme = Scheme::new(4, 2).unwrap();
        let header = ShardHeader {
            id: ChunkId([9; 32]),
            index: 5,
            scheme,
            envelope_len: 1000,
        };
        (header, vec![0xab; scheme.shard_len(1000)])
    }

    #[test]
    fn a_sealed_shard_opens_to_what_was_sealed() {
        let (header, data) = sample();
        let object = header.seal(&data);
        assert_eq!(object.len(), SHARD_HEADER_LEN + data.len());
        let (opened, opened_data) = ShardHeader::open(&object).unwrap();
        assert_eq!(opened, header);
        assert_eq!(&opened_data[..], &data[..]);
        opened.expect(&header.id, 5, Some(header.scheme)).unwrap();
        assert!(opened.expect(&header.id, 4, None).is_err());
        assert!(opened.expect(&header.id, 5, Some(Scheme::DEFAULT)).is_err());
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_refused() {
        let (header, data) = sample();
        let object = header.seal(&data).to_vec();
        for byte in (0..object.len()).step_by(7) {
            let mut bad = object.clone();
            bad[byte] ^= 1 << (byte % 8);
            assert!(ShardHeader::open(&Bytes::from(bad)).is_err(), "byte {byte}");
        }
        for len in [0, 10, SHARD_HEADER_LEN, object.len() - 1] {
            assert!(ShardHeader::open(&Bytes::copy_from_slice(&object[..len])).is_err());
        }
        let mut longer = object.clone();
        longer.push(0);
        assert!(matches!(
            ShardHeader::open(&Bytes::from(longer)),
            Err(ShardError::DataLength { .. })
        ));
    }
}
