//! The manifest: which chunk holds each part of an image, and the keys to
//! open them.
//!
//! Its public part (image geometry, salt domain, source digest, the zero map
//! and every chunk id) stays readable without the tenant key, so garbage
//! collection and cache warmers can walk it. The key table is encrypted with
//! a subkey of the tenant key, with the public part as associated data, so
//! one tag authenticates the whole manifest. The byte layout is specified in
//! docs/FORMAT.md.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};

use super::keys::hmac_sha256;
use super::{validate_chunk_size, validate_salt_domain, ChunkId, ChunkKey, TenantKey};

const MAGIC: &[u8; 4] = b"LZBM";
const VERSION: u8 = 1;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;
const MANIFEST_KEY_LABEL: &str = "lazyblk manifest key v1";

/// What one chunk-sized piece of the image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestEntry {
    /// All zeros: not stored, read as zeros.
    Zero,
    /// A stored chunk and the key that opens it.
    Chunk { id: ChunkId, key: ChunkKey },
}

/// An opened manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub image_size: u64,
    pub chunk_size: u32,
    pub salt_domain: String,
    /// The digest of what the image was made from (an OCI image digest), or
    /// all zeros when the pusher named none.
    pub source_digest: [u8; 32],
    pub entries: Vec<ManifestEntry>,
}

/// The part of a manifest anyone holding it can read: no keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicManifest {
    pub image_size: u64,
    pub chunk_size: u32,
    pub salt_domain: String,
    pub source_digest: [u8; 32],
    /// Per chunk index: `None` for a zero chunk.
    pub chunk_ids: Vec<Option<ChunkId>>,
}

/// Why a manifest could not be read. Every message names the manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {name:?}: not a lazyblk manifest (bad magic)")]
    BadMagic { name: String },
    #[error("manifest {name:?}: format version {version} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion { name: String, version: u8 },
    #[error("manifest {name:?}: truncated: {len} bytes, the layout needs {needed}")]
    Truncated {
        name: String,
        len: usize,
        needed: usize,
    },
    #[error("manifest {name:?}: {len} bytes, {extra} more than the layout describes")]
    TrailingBytes {
        name: String,
        len: usize,
        extra: usize,
    },
    #[error("manifest {name:?}: invalid header: {reason}")]
    InvalidHeader { name: String, reason: String },
    #[error(
        "manifest {name:?}: authentication failed: wrong tenant key, or the manifest was altered"
    )]
    Authentication { name: String },
}

/// The digest that binds a cache to the manifest it was filled from.
pub fn manifest_digest(sealed: &[u8]) -> [u8; 32] {
    Sha256::digest(sealed).into()
}

/// Number of chunks an image of `image_size` bytes is cut into.
fn chunk_count(image_size: u64, chunk_size: u32) -> u64 {
    image_size.div_ceil(u64::from(chunk_size))
}

impl Manifest {
    pub fn chunk_count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Bytes in chunk `index`: the chunk size, less for the image's last chunk.
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index * u64::from(self.chunk_size);
        (self.image_size - start).min(u64::from(self.chunk_size)) as usize
    }

    /// Serialises and seals the manifest with `tenant`'s manifest subkey.
    ///
    /// The nonce is derived from the content, so sealing the same manifest
    /// twice gives the same bytes (and the same digest).
    pub fn seal(&self, tenant: &TenantKey) -> Vec<u8> {
        assert_eq!(
            self.entries.len() as u64,
            chunk_count(self.image_size, self.chunk_size),
            "manifest entries must cover the image"
        );
        let mut out = self.public_part();
        let public_len = out.len();
        let mut keys = Vec::new();
        for entry in &self.entries {
            if let ManifestEntry::Chunk { key, .. } = entry {
                keys.extend_from_slice(&key.0);
            }
        }
        let manifest_key = tenant.subkey(MANIFEST_KEY_LABEL);
        let mut nonce_input = out.clone();
        nonce_input.extend_from_slice(&keys);
        let nonce: [u8; NONCE_LEN] = hmac_sha256(&manifest_key, &nonce_input)[..NONCE_LEN]
            .try_into()
            .expect("HMAC output is longer than a nonce");
        let tag = aead(&manifest_key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&out[..public_len]),
                &mut keys,
            )
            .expect("a key table is far below the AES-GCM length limit");
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&keys);
        out.extend_from_slice(tag.as_ref());
        out
    }

    fn public_part(&self) -> Vec<u8> {
        let count = self.entries.len();
        let mut out =
            Vec::with_capacity(64 + self.salt_domain.len() + count.div_ceil(8) + count * 32);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.push(self.salt_domain.len() as u8);
        out.extend_from_slice(self.salt_domain.as_bytes());
        out.extend_from_slice(&self.source_digest);
        let mut zero_map = vec![0u8; count.div_ceil(8)];
        for (index, entry) in self.entries.iter().enumerate() {
            if *entry == ManifestEntry::Zero {
                zero_map[index / 8] |= 1 << (index % 8);
            }
        }
        out.extend_from_slice(&zero_map);
        for entry in &self.entries {
            if let ManifestEntry::Chunk { id, .. } = entry {
                out.extend_from_slice(&id.0);
            }
        }
        out
    }

    /// Authenticates and opens a sealed manifest stored under `name`.
    pub fn open(name: &str, sealed: &[u8], tenant: &TenantKey) -> Result<Manifest, ManifestError> {
        // Authenticate before expanding the chunk table: a forged header
        // must not make us allocate for chunks it only claims.
        let header = Header::parse(name, sealed)?;
        let public_len = header.public_len();
        let nonce: [u8; NONCE_LEN] = sealed[public_len..public_len + NONCE_LEN]
            .try_into()
            .expect("Header::parse checked the length");
        let mut keys = sealed[public_len + NONCE_LEN..].to_vec();
        let manifest_key = tenant.subkey(MANIFEST_KEY_LABEL);
        let plain_len = aead(&manifest_key)
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&sealed[..public_len]),
                &mut keys,
            )
            .map_err(|_| ManifestError::Authentication {
                name: name.to_owned(),
            })?
            .len();
        let mut key_table = keys[..plain_len].chunks_exact(KEY_LEN);
        let entries = header
            .chunk_ids(sealed)
            .map(|id| match id {
                None => ManifestEntry::Zero,
                Some(id) => ManifestEntry::Chunk {
                    id,
                    key: ChunkKey(
                        key_table
                            .next()
                            .expect("key table length was checked")
                            .try_into()
                            .expect("chunks_exact yields KEY_LEN"),
                    ),
                },
            })
            .collect();
        zeroize::Zeroize::zeroize(&mut keys);
        Ok(Manifest {
            image_size: header.image_size,
            chunk_size: header.chunk_size,
            salt_domain: header.salt_domain,
            source_digest: header.source_digest,
            entries,
        })
    }
}

fn aead(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("AES-256 key is 32 bytes"))
}

fn check_len(name: &str, len: usize, needed: usize) -> Result<(), ManifestError> {
    if len < needed {
        return Err(ManifestError::Truncated {
            name: name.to_owned(),
            len,
            needed,
        });
    }
    if len > needed {
        return Err(ManifestError::TrailingBytes {
            name: name.to_owned(),
            len,
            extra: len - needed,
        });
    }
    Ok(())
}

/// A cursor that reports truncation as a manifest error.
struct Reader<'a> {
    name: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| ManifestError::Truncated {
                name: self.name.to_owned(),
                len: self.bytes.len(),
                needed: self.pos.saturating_add(n),
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ManifestError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }
}

impl PublicManifest {
    /// Reads the public part of a sealed manifest without any key. It is not
    /// authenticated: use it only where a wrong id costs nothing but a miss
    /// (garbage collection, cache warming).
    pub fn parse(name: &str, sealed: &[u8]) -> Result<PublicManifest, ManifestError> {
        let header = Header::parse(name, sealed)?;
        let chunk_ids = header.chunk_ids(sealed).collect();
        Ok(PublicManifest {
            image_size: header.image_size,
            chunk_size: header.chunk_size,
            salt_domain: header.salt_domain,
            source_digest: header.source_digest,
            chunk_ids,
        })
    }
}

/// The fixed fields of a manifest and where its tables lie, checked against
/// the manifest's length but not yet expanded.
struct Header {
    image_size: u64,
    chunk_size: u32,
    salt_domain: String,
    source_digest: [u8; 32],
    count: usize,
    /// Offset of the zero map.
    zero_map: usize,
    /// Offset of the chunk names.
    ids: usize,
    /// Chunks that are not zero: names and keys stored.
    stored: usize,
}

impl Header {
    /// Parses the fixed fields and checks that the manifest is exactly as
    /// long as they say.
    fn parse(name: &str, sealed: &[u8]) -> Result<Header, ManifestError> {
        let mut r = Reader {
            name,
            bytes: sealed,
            pos: 0,
        };
        let invalid = |reason: String| ManifestError::InvalidHeader {
            name: name.to_owned(),
            reason,
        };
        if r.take(4).map_err(|_| ManifestError::BadMagic {
            name: name.to_owned(),
        })? != MAGIC
        {
            return Err(ManifestError::BadMagic {
                name: name.to_owned(),
            });
        }
        let [version] = r.array::<1>()?;
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion {
                name: name.to_owned(),
                version,
            });
        }
        if r.array::<3>()? != [0; 3] {
            return Err(invalid("reserved bytes are not zero".into()));
        }
        let image_size = u64::from_le_bytes(r.array()?);
        let chunk_size = u32::from_le_bytes(r.array()?);
        validate_chunk_size(chunk_size).map_err(invalid)?;
        let [domain_len] = r.array::<1>()?;
        let salt_domain = std::str::from_utf8(r.take(domain_len.into())?)
            .map_err(|_| invalid("salt domain is not UTF-8".into()))?
            .to_owned();
        validate_salt_domain(&salt_domain).map_err(invalid)?;
        let source_digest = r.array()?;
        let count = chunk_count(image_size, chunk_size);
        // The zero map alone needs count/8 bytes: a count the bytes cannot
        // hold is refused before any arithmetic on it.
        if count / 8 > sealed.len() as u64 {
            return Err(ManifestError::Truncated {
                name: name.to_owned(),
                len: sealed.len(),
                needed: usize::try_from(count / 8).unwrap_or(usize::MAX),
            });
        }
        let count = count as usize;
        let zero_map_at = r.pos;
        let zero_map = r.take(count.div_ceil(8))?;
        if count % 8 != 0 && zero_map[count / 8] >> (count % 8) != 0 {
            return Err(invalid("zero map has bits set past the last chunk".into()));
        }
        let zero: usize = zero_map.iter().map(|b| b.count_ones() as usize).sum();
        let header = Header {
            image_size,
            chunk_size,
            salt_domain,
            source_digest,
            count,
            zero_map: zero_map_at,
            ids: r.pos,
            stored: count - zero,
        };
        let needed = header.public_len() + NONCE_LEN + header.stored * KEY_LEN + TAG_LEN;
        check_len(name, sealed.len(), needed)?;
        Ok(header)
    }

    /// Length of the readable part: everything before the nonce.
    fn public_len(&self) -> usize {
        self.ids + self.stored * 32
    }

    /// Per chunk index, its name or `None` for a zero chunk.
    fn chunk_ids<'a>(&'a self, sealed: &'a [u8]) -> impl Iterator<Item = Option<ChunkId>> + 'a {
        let zero_map = &sealed[self.zero_map..self.ids];
        let mut names = sealed[self.ids..self.public_len()].chunks_exact(32);
        (0..self.count).map(move |index| {
            (zero_map[index / 8] & (1 << (index % 8)) == 0).then(|| {
                ChunkId(
                    names
                        .next()
                        .expect("one name per non-zero chunk was length-checked")
                        .try_into()
                        .expect("chunks_exact yields 32 bytes"),
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{derive_salt, seal_chunk};
    use proptest::prelude::*;

    fn sample(chunks: usize) -> Manifest {
        let salt = derive_salt(&[5; 32], "default");
        let chunk_size = 64 * 1024;
        let entries = (0..chunks)
            .map(|i| {
                if i % 3 == 1 {
                    ManifestEntry::Zero
                } else {
                    let sealed = seal_chunk(&salt, format!("chunk {i}").as_bytes());
                    ManifestEntry::Chunk {
                        id: sealed.id,
                        key: sealed.key,
                    }
                }
            })
            .collect();
        Manifest {
            image_size: chunks as u64 * chunk_size as u64 - 100,
            chunk_size,
            salt_domain: "default".into(),
            source_digest: [7; 32],
            entries,
        }
    }

    #[test]
    fn seal_open_round_trip_and_determinism() {
        let tenant = TenantKey([1; 32]);
        let manifest = sample(10);
        let sealed = manifest.seal(&tenant);
        assert_eq!(sealed, manifest.seal(&tenant));
        assert_eq!(Manifest::open("m", &sealed, &tenant).unwrap(), manifest);
        assert_eq!(manifest.chunk_len(9), 64 * 1024 - 100);
    }

    #[test]
    fn public_part_is_readable_without_key() {
        let manifest = sample(7);
        let public = PublicManifest::parse("m", &manifest.seal(&TenantKey([1; 32]))).unwrap();
        let ids: Vec<_> = manifest
            .entries
            .iter()
            .map(|e| match e {
                ManifestEntry::Zero => None,
                ManifestEntry::Chunk { id, .. } => Some(*id),
            })
            .collect();
        assert_eq!(public.chunk_ids, ids);
    }

    #[test]
    fn size_per_stored_chunk_is_compact() {
        let manifest = sample(3000);
        let stored = manifest
            .entries
            .iter()
            .filter(|e| **e != ManifestEntry::Zero)
            .count();
        let sealed = manifest.seal(&TenantKey([1; 32]));
        assert!(
            sealed.len() <= 200 + stored * 80,
            "{} bytes for {stored} chunks",
            sealed.len()
        );
    }

    #[test]
    fn wrong_key_names_the_manifest() {
        let sealed = sample(4).seal(&TenantKey([1; 32]));
        let err = Manifest::open("app-v1", &sealed, &TenantKey([2; 32])).unwrap_err();
        assert!(matches!(err, ManifestError::Authentication { .. }));
        assert!(err.to_string().contains("app-v1"), "{err}");
    }

    #[test]
    fn every_truncation_is_refused() {
        let tenant = TenantKey([1; 32]);
        let sealed = sample(5).seal(&tenant);
        for len in 0..sealed.len() {
            let err = Manifest::open("m", &sealed[..len], &tenant).unwrap_err();
            assert!(err.to_string().contains("\"m\""), "{err}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            Manifest::open("m", &longer, &tenant),
            Err(ManifestError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn absurd_chunk_count_is_refused_without_allocating() {
        let mut sealed = sample(2).seal(&TenantKey([1; 32]));
        sealed[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(PublicManifest::parse("m", &sealed).is_err());
    }

    proptest! {
        #[test]
        fn any_flipped_bit_is_rejected(bit in any::<proptest::sample::Index>()) {
            let tenant = TenantKey([1; 32]);
            let manifest = sample(6);
            let mut sealed = manifest.seal(&tenant);
            let bit = bit.index(sealed.len() * 8);
            sealed[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Manifest::open("m", &sealed, &tenant).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::open("m", &bytes, &TenantKey([1; 32]));
        }
    }
}
