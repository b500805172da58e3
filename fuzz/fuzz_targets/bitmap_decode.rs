//! Arbitrary bytes as a cache's `present` file (which a crash may have torn
//! or a disk damaged).
//!
//! Each input is decoded twice: as it is, and with a valid checksum appended,
//! so the fuzzer also reaches the header and bit checks behind the checksum.
//! Properties: `decode` never panics (nor allocates beyond what the file's
//! length justifies); a file that decodes re-encodes to exactly its bytes,
//! and the bits it yields are the ones in the file, none past the last chunk,
//! with every written chunk present.
#![no_main]

use lazyblk::cache::bitmap::{decode, encode, PresentBits, HEADER_LEN, VERSION};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut checksummed = data.to_vec();
    checksummed.extend_from_slice(&Sha256::digest(data));
    check(&checksummed);
});

fn check(bytes: &[u8]) {
    let Ok(file) = decode(bytes) else {
        return;
    };
    let (geometry, words) = (file.geometry, file.present.clone());
    if u32::from_le_bytes(bytes[8..12].try_into().unwrap()) == VERSION {
        assert!(
            encode(&geometry, &file.present, &file.written) == bytes,
            "a decoded bitmap does not re-encode to its own bytes"
        );
    }
    assert!(file
        .written
        .iter()
        .zip(&file.present)
        .all(|(w, p)| w & !p == 0));
    let chunks = geometry.chunk_count;
    assert_eq!(words.len() as u64, chunks.div_ceil(64));
    let bits = PresentBits::from_words(chunks, words);
    let mut count = 0;
    for index in 0..chunks {
        let byte = bytes[HEADER_LEN + (index / 8) as usize];
        let in_file = byte & (1 << (index % 8)) != 0;
        assert_eq!(bits.get(index), in_file, "bit {index}");
        count += u64::from(in_file);
    }
    assert_eq!(bits.count(), count);
    assert!(!bits.get(chunks), "a bit past the last chunk");
}
