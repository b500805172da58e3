//! Chunk envelopes: arbitrary (envelope, id, key) triples as fetched from a
//! store, and arbitrary plaintext sealed and opened again.
//!
//! Properties: `open_chunk` never panics, never succeeds unless the id is
//! SHA-256 of the envelope, and refuses for the first check that fails (id,
//! then length, then tag); the in-place variant agrees. seal → open returns
//! the plaintext, the id names the envelope, the key is the convergent key,
//! and a flipped bit or another key is refused.
#![no_main]

use arbitrary::Arbitrary;
use lazyblk::chunk::{
    chunk_key, open_chunk, open_chunk_in_place, seal_chunk, seal_chunk_in_place, ChunkError,
    ChunkId, ChunkKey, Salt, ENVELOPE_OVERHEAD,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Name the envelope by its own hash, so the fuzzer reaches the
    /// decryption behind the id check; otherwise use `id` as given.
    self_named: bool,
    id: [u8; 32],
    key: [u8; 32],
    envelope: Vec<u8>,
    salt: [u8; 32],
    /// Which bit of the sealed envelope to flip (modulo its length).
    flip: u32,
    plaintext: Vec<u8>,
}

fuzz_target!(|input: Input| {
    check_open(&input);
    check_round_trip(&input);
});

fn check_open(input: &Input) {
    let actual = ChunkId::of_envelope(&input.envelope);
    let id = if input.self_named {
        actual
    } else {
        ChunkId(input.id)
    };
    let key = ChunkKey(input.key);
    let result = open_chunk(&id, &key, input.envelope.clone());
    let mut buffer = input.envelope.clone();
    let in_place = open_chunk_in_place(&id, &key, &mut buffer).map(|p| p.to_vec());
    match (&result, &in_place) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "in-place open disagrees"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("open_chunk and open_chunk_in_place disagree: {result:?} vs {in_place:?}"),
    }
    match result {
        Ok(plaintext) => {
            assert_eq!(
                actual, id,
                "opened an envelope that does not hash to its id"
            );
            assert_eq!(plaintext.len() + ENVELOPE_OVERHEAD, input.envelope.len());
        }
        Err(ChunkError::IdMismatch {
            expected,
            actual: reported,
        }) => {
            assert_ne!(actual, id, "refused an envelope whose id matches");
            assert_eq!((expected, reported), (id, actual));
        }
        Err(ChunkError::Truncated { len, .. }) => {
            assert_eq!(actual, id);
            assert!(len < ENVELOPE_OVERHEAD && len == input.envelope.len());
        }
        Err(ChunkError::Authentication { .. }) => {
            assert_eq!(actual, id);
            assert!(input.envelope.len() >= ENVELOPE_OVERHEAD);
        }
    }
}

fn check_round_trip(input: &Input) {
    let salt = Salt(input.salt);
    let sealed = seal_chunk(&salt, &input.plaintext);
    assert_eq!(
        sealed.envelope.len(),
        input.plaintext.len() + ENVELOPE_OVERHEAD
    );
    assert_eq!(sealed.id, ChunkId::of_envelope(&sealed.envelope));
    assert!(sealed.key == chunk_key(&salt, &input.plaintext));

    let mut body = input.plaintext.clone();
    let mut tag = [0; ENVELOPE_OVERHEAD];
    let (id, key) = seal_chunk_in_place(&salt, &mut body, &mut tag);
    assert!(id == sealed.id && key == sealed.key);
    assert_eq!([&body[..], &tag[..]].concat(), sealed.envelope);

    let opened =
        open_chunk(&sealed.id, &sealed.key, sealed.envelope.clone()).expect("a sealed chunk opens");
    assert_eq!(opened, input.plaintext);

    let bit = input.flip as usize % (sealed.envelope.len() * 8);
    let mut flipped = sealed.envelope.clone();
    flipped[bit / 8] ^= 1 << (bit % 8);
    assert!(matches!(
        open_chunk(&sealed.id, &sealed.key, flipped),
        Err(ChunkError::IdMismatch { .. })
    ));

    let mut other = sealed.key.0;
    other[bit % 32] ^= 1 << (bit % 8);
    assert!(matches!(
        open_chunk(&sealed.id, &ChunkKey(other), sealed.envelope.clone()),
        Err(ChunkError::Authentication { .. })
    ));
}
