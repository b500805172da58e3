//! Arbitrary bytes as the chunk server's JSON bodies (src/net/protocol.rs):
//! a `missing` request as the server reads it, and the answers (missing
//! ids, listing pages, manifest lists, deletions) as the HTTP store reads
//! them.
//!
//! Properties: nothing panics, times and ids of a page convert without
//! panicking, and whatever parses serialises to JSON that parses to the
//! same value.
#![no_main]

use lazyblk::chunk::ChunkId;
use lazyblk::net::protocol::{
    from_unix_ns, unix_ns, ChunkPage, Deleted, ManifestList, MissingRequest, MissingResponse,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fuzz_target!(|data: &[u8]| {
    round_trip::<MissingRequest>(data);
    round_trip::<MissingResponse>(data);
    round_trip::<ManifestList>(data);
    round_trip::<Deleted>(data);
    if let Some(page) = round_trip::<ChunkPage>(data) {
        for entry in &page.chunks {
            let _ = entry.id.parse::<ChunkId>();
            assert_eq!(
                unix_ns(from_unix_ns(entry.modified_unix_ns)),
                entry.modified_unix_ns
            );
        }
    }
});

fn round_trip<T: Serialize + DeserializeOwned>(data: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&value).expect("parsed values serialise");
    let again: T = serde_json::from_slice(&json).expect("serialised values parse");
    let json_again = serde_json::to_vec(&again).expect("parsed values serialise");
    assert_eq!(json, json_again, "a body changed on a round trip");
    Some(value)
}
