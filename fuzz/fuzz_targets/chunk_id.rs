//! Arbitrary strings as chunk names (store listings, URLs, command lines).
//!
//! Properties: `ChunkId::from_str` accepts exactly 64 lowercase hex digits,
//! decodes them to the bytes they spell, and Display gives the string back;
//! any 32 bytes shown and parsed again give the same id.
#![no_main]

use lazyblk::chunk::ChunkId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_parse(text);
    }
    if let Some(bytes) = data.first_chunk::<32>() {
        let id = ChunkId(*bytes);
        let shown = id.to_string();
        assert_eq!(shown, id.to_hex());
        assert_eq!(shown.parse::<ChunkId>().expect("a shown id parses"), id);
    }
});

fn check_parse(text: &str) {
    let lowercase_hex = text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match text.parse::<ChunkId>() {
        Ok(id) => {
            assert!(lowercase_hex, "accepted {text:?}");
            assert_eq!(id.to_string(), text);
            for (i, byte) in id.0.iter().enumerate() {
                let pair = &text[2 * i..2 * i + 2];
                assert_eq!(Ok(*byte), u8::from_str_radix(pair, 16), "byte {i}");
            }
        }
        Err(error) => {
            assert!(!lowercase_hex, "refused {text:?}");
            assert_eq!(error.0, text);
        }
    }
}
