//! Arbitrary bytes as a layer's tar stream (a registry or archive can hand
//! over anything that matches its digest).
//!
//! Each input is read twice: as it is, and with the checksum of every header
//! on the member chain recomputed, so the fuzzer reaches the PAX, long-name,
//! path and whiteout checks behind the checksum. Properties: `read_layer`
//! never panics; every entry it hands over has a legal path; a regular
//! file's reader yields exactly its size; a stream read whole counts every
//! byte; and a byte budget one short of the stream refuses it.
#![no_main]

use lazyblk::oci::entry::MAX_NAME_LEN;
use lazyblk::oci::{read_layer, EntryKind, LayerLimits};
use libfuzzer_sys::fuzz_target;
use tar::Header;

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&with_checksums(data));
});

fn check(bytes: &[u8]) {
    // Sparse members expand to zeros within the byte budget: keep it small
    // so one input cannot ask for gigabytes of them.
    let mut limits = LayerLimits::new(64 << 20, u64::MAX);
    let result = read_layer(bytes, "fuzz", &mut limits, &mut |entry, reader| {
        for component in entry.path.components() {
            assert!(!component.is_empty() && component.len() <= MAX_NAME_LEN);
            assert!(!component.contains(&b'/') && !component.contains(&0));
            assert!(component != b"." && component != b"..");
        }
        let got = std::io::copy(reader, &mut std::io::sink())?;
        let expected = match entry.kind {
            EntryKind::Regular { size } => size,
            _ => 0,
        };
        assert_eq!(got, expected, "data reader gave a wrong length");
        Ok(())
    });
    let Ok(stats) = result else {
        return;
    };
    assert_eq!(stats.tar_bytes, bytes.len() as u64);
    if bytes.is_empty() {
        return;
    }
    let mut tight = LayerLimits::new(bytes.len() as u64 - 1, u64::MAX);
    assert!(
        read_layer(bytes, "fuzz", &mut tight, &mut |_, _| Ok(())).is_err(),
        "a stream larger than the byte budget was accepted"
    );
}

/// The input with each header's checksum made right, following the member
/// chain as the reader does (sizes from the headers themselves).
fn with_checksums(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut offset = 0usize;
    while offset + 512 <= out.len() {
        let block = &mut out[offset..offset + 512];
        if block.iter().all(|&b| b == 0) {
            break;
        }
        let mut header = Header::new_old();
        header.as_mut_bytes().copy_from_slice(block);
        header.set_cksum();
        block.copy_from_slice(header.as_bytes());
        let Ok(size) = header.entry_size() else {
            break;
        };
        let Some(next) = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_add(511))
            .map(|s| s & !511)
            .and_then(|s| s.checked_add(offset + 512))
        else {
            break;
        };
        offset = next;
    }
    out
}
