//! Chunk names.

use std::fmt;
use std::str::FromStr;

/// A chunk's name: SHA-256 of its sealed envelope, shown as 64 lowercase hex
/// digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The name of a sealed envelope.
    pub fn of_envelope(envelope: &[u8]) -> ChunkId {
        use sha2::Digest;
        ChunkId(sha2::Sha256::digest(envelope).into())
    }

    /// [`ChunkId::of_envelope`] for async code: hashing half a megabyte
    /// takes long enough to hold up every task queued behind it on a
    /// runtime worker, so it runs on the blocking pool.
    pub async fn of_envelope_off_runtime(envelope: bytes::Bytes) -> ChunkId {
        match tokio::task::spawn_blocking(move || ChunkId::of_envelope(&envelope)).await {
            Ok(id) => id,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Lowercase hex, as used in store paths and URLs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// A string that is not 64 lowercase hex digits.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a chunk id (64 lowercase hex digits)")]
pub struct ParseChunkIdError(pub String);

impl FromStr for ChunkId {
    type Err = ParseChunkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lowercase_hex =
            s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut id = [0u8; 32];
        if !lowercase_hex || hex::decode_to_slice(s, &mut id).is_err() {
            return Err(ParseChunkIdError(s.to_owned()));
        }
        Ok(ChunkId(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of_envelope(b"abc");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert_eq!(
            id.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn rejects_uppercase_and_wrong_length() {
        assert!("AB".repeat(32).parse::<ChunkId>().is_err());
        assert!("ab".repeat(31).parse::<ChunkId>().is_err());
        assert!("zz".repeat(32).parse::<ChunkId>().is_err());
    }
}
