//! Shared pieces of the fuzz targets in `fuzz_targets/` and of the seed
//! generator in `examples/seeds.rs`: the fixed tenant key every target opens
//! with, and a structured manifest built from fuzzer bytes.
//!
//! The targets exercise the parsers of bytes that arrive from outside the
//! process: sealed manifests and chunk envelopes (from a store), the cache's
//! present-bitmap file (from disk, possibly torn), control-socket lines and
//! chunk names. Each asserts the properties its format promises, not only
//! that nothing panics.

use arbitrary::{Arbitrary, Result, Unstructured};
use lazyblk::chunk::{
    validate_chunk_size, ChunkId, ChunkKey, Manifest, ManifestEntry, TenantKey, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
};

/// The tenant key every manifest target seals and opens with. Fixed, so a
/// seed sealed by `examples/seeds.rs` opens in the targets.
pub fn tenant() -> TenantKey {
    TenantKey(*b"lazyblk fuzz tenant key, fixed!!")
}

/// Most chunks a generated manifest has: enough for zero maps spanning many
/// bytes, few enough that a run (seal twice, open four times) stays well
/// under a millisecond under AddressSanitizer.
pub const MAX_CHUNKS: u64 = 200;

/// Bytes a salt domain may be made of.
const DOMAIN_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";

/// A valid manifest (every field within the format's limits) built from
/// fuzzer input.
#[derive(Debug)]
pub struct ArbitraryManifest(pub Manifest);

impl<'a> Arbitrary<'a> for ArbitraryManifest {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let shifts = (MAX_CHUNK_SIZE / MIN_CHUNK_SIZE).trailing_zeros();
        let chunk_size = MIN_CHUNK_SIZE << u.int_in_range(0..=shifts)?;
        debug_assert!(validate_chunk_size(chunk_size).is_ok());
        let chunks = u.int_in_range(0..=MAX_CHUNKS)?;
        // The last chunk may be short: anywhere from 1 byte to a full chunk.
        let image_size = match chunks {
            0 => 0,
            n => (n - 1) * u64::from(chunk_size) + u.int_in_range(1..=u64::from(chunk_size))?,
        };
        let domain_len = u.int_in_range(1..=64)?;
        let salt_domain = (0..domain_len)
            .map(|_| u.choose(DOMAIN_ALPHABET).map(|&b| char::from(b)))
            .collect::<Result<String>>()?;
        let source_digest = u.arbitrary()?;
        let entries = (0..chunks)
            .map(|_| {
                Ok(if u.arbitrary()? {
                    ManifestEntry::Zero
                } else {
                    ManifestEntry::Chunk {
                        id: ChunkId(bytes32(u)),
                        key: ChunkKey(bytes32(u)),
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ArbitraryManifest(Manifest {
            image_size,
            chunk_size,
            salt_domain,
            source_digest,
            entries,
        }))
    }
}

/// The next 32 bytes of input, or zeros once it runs short (ids and keys may
/// repeat: identical chunks share both). `[u8; 32]::arbitrary` goes byte by
/// byte, which made generating a large manifest cost more than sealing it.
fn bytes32(u: &mut Unstructured<'_>) -> [u8; 32] {
    u.bytes(32)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .unwrap_or([0; 32])
}

/// The chunk ids of `manifest` as its public part lists them.
pub fn public_ids(manifest: &Manifest) -> Vec<Option<ChunkId>> {
    manifest
        .entries
        .iter()
        .map(|entry| match entry {
            ManifestEntry::Zero => None,
            ManifestEntry::Chunk { id, .. } => Some(*id),
        })
        .collect()
}
