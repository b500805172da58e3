//! Convergent encryption of one chunk.
//!
//! The envelope is `ciphertext ‖ tag`: AES-256-GCM under the chunk key with
//! a fixed all-zero nonce. A fixed nonce is safe only because a key encrypts
//! exactly one plaintext: the key is SHA-256(salt ‖ plaintext).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{ChunkId, Salt};

/// Bytes an envelope adds to its plaintext (the GCM tag).
pub const ENVELOPE_OVERHEAD: usize = 16;

/// Bound into every chunk's authentication, so an envelope of another format
/// version never opens as this one.
const CHUNK_AAD: &[u8] = b"lazyblk chunk v1";

/// The key of one chunk: SHA-256(salt ‖ plaintext).
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ChunkKey(pub [u8; 32]);

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

/// A sealed chunk, ready to store under `id`.
#[derive(Debug)]
pub struct SealedChunk {
    pub id: ChunkId,
    pub key: ChunkKey,
    pub envelope: Vec<u8>,
}

/// Why an envelope was refused. Both variants are integrity failures: the
/// bytes are not the chunk the manifest names.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {expected}: content hashes to {actual}")]
    IdMismatch { expected: ChunkId, actual: ChunkId },
    #[error("chunk {id}: envelope of {len} bytes is shorter than its tag")]
    Truncated { id: ChunkId, len: usize },
    #[error("chunk {id}: authentication tag does not match its key")]
    Authentication { id: ChunkId },
}

fn aead_key(key: &ChunkKey) -> LessSafeKey {
    // A 32-byte slice is always a valid AES-256 key.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.0).expect("AES-256 key is 32 bytes"))
}

/// Derives the convergent key of `plaintext` under `salt`.
pub fn chunk_key(salt: &Salt, plaintext: &[u8]) -> ChunkKey {
    let mut hasher = Sha256::new();
    hasher.update(salt.0);
    hasher.update(plaintext);
    ChunkKey(hasher.finalize().into())
}

/// Seals `plaintext`: derives its key, encrypts, names the envelope.
pub fn seal_chunk(salt: &Salt, plaintext: &[u8]) -> SealedChunk {
    let mut envelope = Vec::with_capacity(plaintext.len() + ENVELOPE_OVERHEAD);
    envelope.extend_from_slice(plaintext);
    envelope.extend_from_slice(&[0; ENVELOPE_OVERHEAD]);
    let (body, tag) = envelope.split_at_mut(plaintext.len());
    let tag = <&mut [u8; ENVELOPE_OVERHEAD]>::try_from(tag).expect("the tail is the tag's size");
    let (id, key) = seal_chunk_in_place(salt, body, tag);
    SealedChunk { id, key, envelope }
}

/// Seals `plaintext` in place and writes its tag to `tag`; the envelope is
/// then `plaintext ‖ tag`. A caller that keeps its own (reused, aligned)
/// buffers seals without allocating or copying.
pub fn seal_chunk_in_place(
    salt: &Salt,
    plaintext: &mut [u8],
    tag: &mut [u8; ENVELOPE_OVERHEAD],
) -> (ChunkId, ChunkKey) {
    let key = chunk_key(salt, plaintext);
    let sealed_tag = aead_key(&key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(CHUNK_AAD),
            plaintext,
        )
        .expect("a chunk is far below the AES-GCM length limit");
    tag.copy_from_slice(sealed_tag.as_ref());
    let mut name = Sha256::new();
    name.update(&*plaintext);
    name.update(&tag[..]);
    (ChunkId(name.finalize().into()), key)
}

/// Opens an envelope fetched under `id`: checks that it hashes to `id`
/// before decrypting, then authenticates and decrypts with `key`.
///
/// The id check is what stops a forged chunk: anyone who knows a popular
/// chunk's plaintext knows its key and could make a valid tag for other bytes,
/// but not bytes that hash to the name in a manifest.
pub fn open_chunk(
    id: &ChunkId,
    key: &ChunkKey,
    mut envelope: Vec<u8>,
) -> Result<Vec<u8>, ChunkError> {
    let plaintext_len = open_chunk_in_place(id, key, &mut envelope)?.len();
    envelope.truncate(plaintext_len);
    Ok(envelope)
}

/// Checks that `envelope` hashes to `id`: what any holder of chunks (a
/// cache tier, a chunk server) can check without the chunk's key.
pub fn verify_envelope(id: &ChunkId, envelope: &[u8]) -> Result<(), ChunkError> {
    matches_id(id, ChunkId::of_envelope(envelope))
}

/// [`verify_envelope`] for async code: the hash runs off the runtime's
/// workers (see [`ChunkId::of_envelope_off_runtime`]).
pub async fn verify_envelope_off_runtime(
    id: &ChunkId,
    envelope: &bytes::Bytes,
) -> Result<(), ChunkError> {
    matches_id(id, ChunkId::of_envelope_off_runtime(envelope.clone()).await)
}

fn matches_id(id: &ChunkId, actual: ChunkId) -> Result<(), ChunkError> {
    if !bool::from(actual.0.ct_eq(&id.0)) {
        return Err(ChunkError::IdMismatch {
            expected: *id,
            actual,
        });
    }
    Ok(())
}

/// Whether `plaintext` is the chunk the manifest names by `id` and `key`:
/// sealing it under `key` must give back the envelope named `id`. The
/// encryption is deterministic (the key fixes it), so a holder of the
/// plaintext checks it without the store and without the salt.
pub fn plaintext_matches(id: &ChunkId, key: &ChunkKey, plaintext: &[u8]) -> bool {
    let mut body = plaintext.to_vec();
    let tag = aead_key(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(CHUNK_AAD),
            &mut body,
        )
        .expect("a chunk is far below the AES-GCM length limit");
    let mut name = Sha256::new();
    name.update(&body);
    name.update(tag.as_ref());
    let actual: [u8; 32] = name.finalize().into();
    bool::from(actual.ct_eq(&id.0))
}

/// [`open_chunk`] on a borrowed buffer: the plaintext is decrypted in place
/// and returned as the front of `envelope`. A caller that keeps its own
/// (aligned) buffers opens without allocating or copying.
pub fn open_chunk_in_place<'a>(
    id: &ChunkId,
    key: &ChunkKey,
    envelope: &'a mut [u8],
) -> Result<&'a mut [u8], ChunkError> {
    verify_envelope(id, envelope)?;
    if envelope.len() < ENVELOPE_OVERHEAD {
        return Err(ChunkError::Truncated {
            id: *id,
            len: envelope.len(),
        });
    }
    aead_key(key)
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(CHUNK_AAD),
            envelope,
        )
        .map_err(|_| ChunkError::Authentication { id: *id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn salt(b: u8) -> Salt {
        Salt([b; 32])
    }

    #[test]
    fn same_plaintext_same_salt_gives_same_object() {
        let a = seal_chunk(&salt(1), b"hello chunk");
        let b = seal_chunk(&salt(1), b"hello chunk");
        assert_eq!(a.id, b.id);
        assert_eq!(a.envelope, b.envelope);
        assert_eq!(a.key, b.key);
    }

    #[test]
    fn plaintext_is_checked_against_id_and_key_without_the_salt() {
        let sealed = seal_chunk(&salt(4), b"chunk plaintext");
        assert!(plaintext_matches(
            &sealed.id,
            &sealed.key,
            b"chunk plaintext"
        ));
        assert!(!plaintext_matches(
            &sealed.id,
            &sealed.key,
            b"chunk plaintexT"
        ));
        assert!(!plaintext_matches(
            &sealed.id,
            &sealed.key,
            b"chunk plaintext "
        ));
        let other = seal_chunk(&salt(5), b"chunk plaintext");
        assert!(!plaintext_matches(
            &other.id,
            &sealed.key,
            b"chunk plaintext"
        ));
    }

    #[test]
    fn sealing_in_place_matches_sealing_a_copy() {
        let mut body = *b"hello chunk";
        let mut tag = [0; ENVELOPE_OVERHEAD];
        let (id, key) = seal_chunk_in_place(&salt(1), &mut body, &mut tag);
        let copied = seal_chunk(&salt(1), b"hello chunk");
        assert_eq!([&body[..], &tag[..]].concat(), copied.envelope);
        assert_eq!((id, &key), (copied.id, &copied.key));
        assert_eq!(id, ChunkId::of_envelope(&copied.envelope));

        let mut envelope = copied.envelope.clone();
        let opened = open_chunk_in_place(&id, &key, &mut envelope).unwrap();
        assert_eq!(opened, b"hello chunk");
    }

    #[test]
    fn different_salt_gives_different_object() {
        let a = seal_chunk(&salt(1), b"hello chunk");
        let b = seal_chunk(&salt(2), b"hello chunk");
        assert_ne!(a.id, b.id);
        assert_ne!(a.key, b.key);
    }

    #[test]
    fn envelope_holds_no_plaintext() {
        let plaintext = b"MARKER-MARKER-MARKER-MARKER".repeat(100);
        let sealed = seal_chunk(&salt(3), &plaintext);
        assert!(!sealed.envelope.windows(27).any(|w| w == &plaintext[..27]));
    }

    #[test]
    fn wrong_key_is_refused() {
        let sealed = seal_chunk(&salt(1), b"data");
        let err = open_chunk(&sealed.id, &ChunkKey([9; 32]), sealed.envelope).unwrap_err();
        assert!(matches!(err, ChunkError::Authentication { .. }), "{err}");
    }

    #[test]
    fn forged_envelope_with_valid_tag_is_refused_by_name() {
        // Someone who knows the plaintext knows the key and can seal other
        // bytes under it; only the name check catches that.
        let genuine = seal_chunk(&salt(1), b"popular chunk");
        let mut forged = b"evil chunk!!!".to_vec();
        let tag = aead_key(&genuine.key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(CHUNK_AAD),
                &mut forged,
            )
            .unwrap();
        forged.extend_from_slice(tag.as_ref());
        let err = open_chunk(&genuine.id, &genuine.key, forged).unwrap_err();
        assert!(matches!(err, ChunkError::IdMismatch { .. }), "{err}");
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(data in proptest::collection::vec(any::<u8>(), 0..4096), s in any::<u8>()) {
            let sealed = seal_chunk(&salt(s), &data);
            prop_assert_eq!(sealed.envelope.len(), data.len() + ENVELOPE_OVERHEAD);
            let opened = open_chunk(&sealed.id, &sealed.key, sealed.envelope.clone()).unwrap();
            prop_assert_eq!(opened, data);
        }

        #[test]
        fn any_flipped_bit_is_rejected(data in proptest::collection::vec(any::<u8>(), 1..2048), bit in any::<proptest::sample::Index>()) {
            let sealed = seal_chunk(&salt(7), &data);
            let mut envelope = sealed.envelope.clone();
            let bit = bit.index(envelope.len() * 8);
            envelope[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(open_chunk(&sealed.id, &sealed.key, envelope).is_err());
        }
    }
}
