use std::collections::HashSet;
use std::fs;

use proptest::prelude::*;
use sha2::Digest;

use super::bitmap::{decode, encode, PresentBits, CHECKSUM_LEN, HEADER_LEN};
use super::*;
use crate::error::ErrorKind;

const CHUNK: u32 = 64 * 1024;

fn digest(b: u8) -> [u8; 32] {
    [b; 32]
}

fn open(dir: &Path, d: u8, image_size: u64) -> Result<CacheDir, CacheError> {
    CacheDir::open_or_create(dir, digest(d), image_size, CHUNK)
}

/// Puts a byte in chunk `index` and marks it present, as a fetch would
/// (a present chunk that is a hole is dropped on open).
fn fill(cache: &CacheDir, index: u64) -> bool {
    cache.write_at(&[0xA5], index * u64::from(CHUNK)).unwrap();
    cache.mark_present(index)
}

#[test]
fn fresh_cache_is_sparse_and_empty() {
    let tmp = crate::private::test_dir();
    let size = 10 * u64::from(CHUNK) + 123;
    let cache = open(tmp.path(), 1, size).unwrap();
    assert_eq!(cache.geometry().chunk_count, 11);
    assert_eq!(cache.present_count(), 0);
    assert!((0..11).all(|i| !cache.is_present(i)));
    let meta = fs::metadata(tmp.path().join("data")).unwrap();
    assert_eq!(meta.len(), size);
    let mut buf = vec![1u8; 200];
    cache.read_at(&mut buf, size - 200).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn data_and_bits_survive_flush_and_reopen() {
    let tmp = crate::private::test_dir();
    let size = 4 * u64::from(CHUNK);
    {
        let cache = open(tmp.path(), 1, size).unwrap();
        cache.write_at(b"hello", u64::from(CHUNK) + 7).unwrap();
        assert!(cache.mark_present(1));
        assert!(!cache.mark_present(1));
        cache.flush().unwrap();
    }
    let cache = open(tmp.path(), 1, size).unwrap();
    assert!(cache.is_present(1));
    assert_eq!(cache.present_count(), 1);
    let mut buf = [0u8; 5];
    cache.read_at(&mut buf, u64::from(CHUNK) + 7).unwrap();
    assert_eq!(&buf, b"hello");
}

#[test]
fn bits_not_flushed_are_not_persisted() {
    let tmp = crate::private::test_dir();
    {
        let cache = open(tmp.path(), 1, 3 * u64::from(CHUNK)).unwrap();
        fill(&cache, 0);
        cache.flush().unwrap();
        fill(&cache, 2);
    }
    let cache = open(tmp.path(), 1, 3 * u64::from(CHUNK)).unwrap();
    assert!(cache.is_present(0));
    assert!(!cache.is_present(2));
}

#[test]
fn cache_for_another_manifest_is_refused_and_kept() {
    let tmp = crate::private::test_dir();
    let size = 2 * u64::from(CHUNK);
    {
        let cache = open(tmp.path(), 1, size).unwrap();
        fill(&cache, 0);
        cache.flush().unwrap();
    }
    let before = fs::read(tmp.path().join("present")).unwrap();
    let err = open(tmp.path(), 2, size).unwrap_err();
    assert!(matches!(err, CacheError::WrongManifest { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let msg = err.to_string();
    assert!(msg.contains(&hex::encode(digest(1))), "{msg}");
    assert!(msg.contains(&hex::encode(digest(2))), "{msg}");
    // Another chunk size or image size is refused the same way.
    let err = CacheDir::open_or_create(tmp.path(), digest(1), size, CHUNK * 2).unwrap_err();
    assert!(matches!(err, CacheError::WrongManifest { .. }), "{err}");
    let err = open(tmp.path(), 1, size + 1).unwrap_err();
    assert!(matches!(err, CacheError::WrongManifest { .. }), "{err}");
    // Nothing was wiped.
    assert_eq!(fs::read(tmp.path().join("present")).unwrap(), before);
    assert!(open(tmp.path(), 1, size).unwrap().is_present(0));
}

#[test]
fn interrupted_creation_is_finished() {
    // A crash after the bitmap was written but before the data file existed.
    let tmp = crate::private::test_dir();
    let size = 3 * u64::from(CHUNK);
    drop(open(tmp.path(), 1, size).unwrap());
    fs::remove_file(tmp.path().join("data")).unwrap();
    let cache = open(tmp.path(), 1, size).unwrap();
    assert_eq!(cache.present_count(), 0);
    assert_eq!(fs::metadata(tmp.path().join("data")).unwrap().len(), size);
}

#[test]
fn second_open_of_same_directory_is_refused() {
    let tmp = crate::private::test_dir();
    let first = open(tmp.path(), 1, u64::from(CHUNK)).unwrap();
    let err = open(tmp.path(), 1, u64::from(CHUNK)).unwrap_err();
    let me = std::process::id();
    assert!(
        matches!(err, CacheError::InUse { holder: Some(pid), .. } if pid == me),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("process {me}")), "{err}");
    drop(first);
    open(tmp.path(), 1, u64::from(CHUNK)).unwrap();
}

#[test]
fn access_past_the_end_is_refused() {
    let tmp = crate::private::test_dir();
    let size = u64::from(CHUNK) + 10;
    let cache = open(tmp.path(), 1, size).unwrap();
    let err = cache.write_at(b"abc", size - 2).unwrap_err();
    assert!(matches!(err, CacheError::OutOfRange { .. }), "{err}");
    let mut buf = [0u8; 4];
    assert!(cache.read_at(&mut buf, u64::MAX - 1).is_err());
    assert_eq!(fs::metadata(tmp.path().join("data")).unwrap().len(), size);
    assert!(!cache.mark_present(2));
    assert!(!cache.is_present(2));
}

#[test]
fn empty_image_has_an_empty_bitmap() {
    let tmp = crate::private::test_dir();
    let cache = open(tmp.path(), 1, 0).unwrap();
    cache.flush().unwrap();
    drop(cache);
    assert_eq!(open(tmp.path(), 1, 0).unwrap().present_count(), 0);
}

#[test]
fn stray_bits_past_the_last_chunk_are_refused() {
    let geometry = Geometry::new(digest(1), 3 * u64::from(CHUNK), CHUNK).unwrap();
    let bytes = encode(&geometry, &[0b1000], &[0]);
    assert!(matches!(
        decode(&bytes),
        Err(DecodeError::StrayBits { chunk_count: 3 })
    ));
    let bytes = encode(&geometry, &[0b101], &[0b100]);
    assert_eq!(bytes.len(), HEADER_LEN + 2 + CHECKSUM_LEN);
    assert_eq!(bytes[HEADER_LEN], 0b101);
    assert_eq!(bytes[HEADER_LEN + 1], 0b100);
    let file = decode(&bytes).unwrap();
    assert_eq!(
        (file.geometry, file.present, file.written),
        (geometry, vec![0b101], vec![0b100])
    );
    // Written but not present means nothing, and is never written.
    assert_eq!(
        decode(&encode(&geometry, &[0b001], &[0b011]))
            .unwrap()
            .written,
        vec![0b001]
    );
    let mut bytes = encode(&geometry, &[0b001], &[0b001]);
    bytes[HEADER_LEN + 1] = 0b011;
    let body = bytes.len() - CHECKSUM_LEN;
    let checksum = sha2::Sha256::digest(&bytes[..body]);
    bytes[body..].copy_from_slice(&checksum);
    assert_eq!(decode(&bytes), Err(DecodeError::WrittenNotPresent));
}

proptest! {
    #[test]
    fn encode_decode_round_trip(
        chunk_count in 0u64..300,
        seed in any::<u64>(),
        d in any::<u8>(),
    ) {
        let geometry = Geometry::new(digest(d), chunk_count * u64::from(CHUNK), CHUNK).unwrap();
        let bits = PresentBits::empty(chunk_count);
        let mut rng = seed;
        for i in 0..chunk_count {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if rng >> 63 == 1 {
                bits.set(i);
            }
        }
        let words = bits.snapshot();
        // Every other present chunk counts as written.
        let written: Vec<u64> = words.iter().map(|w| w & 0x5555_5555_5555_5555).collect();
        let file = decode(&encode(&geometry, &words, &written)).unwrap();
        prop_assert_eq!(file.geometry, geometry);
        prop_assert_eq!(file.present, words);
        prop_assert_eq!(file.written, written);
    }

    #[test]
    fn any_flipped_bit_in_the_file_is_refused(chunk_count in 1u64..200, bit in any::<proptest::sample::Index>()) {
        let geometry = Geometry::new(digest(3), chunk_count * u64::from(CHUNK), CHUNK).unwrap();
        let words = PresentBits::empty(chunk_count).snapshot();
        let mut bytes = encode(&geometry, &words, &words);
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&bytes).is_err());
    }

}

proptest! {
    // Each case syncs files many times: fewer cases keep the suite quick.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The cache agrees with a model under random set / flush / reopen
    /// sequences: after a reopen exactly the bits of the last flush remain.
    #[test]
    fn bitmap_agrees_with_model(
        chunk_count in 1u64..150,
        ops in proptest::collection::vec((0u8..10, any::<proptest::sample::Index>()), 1..80),
    ) {
        let tmp = crate::private::test_dir();
        let size = chunk_count * u64::from(CHUNK) - 1;
        let mut cache = open(tmp.path(), 9, size).unwrap();
        let mut live = HashSet::new();
        let mut durable = HashSet::new();
        for (op, index) in ops {
            let i = index.index(chunk_count as usize) as u64;
            match op {
                0..=6 => prop_assert_eq!(fill(&cache, i), live.insert(i)),
                7 | 8 => {
                    cache.flush().unwrap();
                    durable = live.clone();
                }
                _ => {
                    drop(cache);
                    cache = open(tmp.path(), 9, size).unwrap();
                    live = durable.clone();
                }
            }
            prop_assert_eq!(cache.present_count(), live.len() as u64);
            for j in 0..chunk_count {
                prop_assert_eq!(cache.is_present(j), live.contains(&j));
            }
        }
    }
}

#[test]
fn a_new_cache_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = crate::private::test_dir();
    let dir = tmp.path().join("new/cache");
    let cache = open(&dir, 1, 3 * u64::from(CHUNK)).unwrap();
    cache.write_at(b"secret", 0).unwrap();
    cache.mark_present(0);
    cache.flush().unwrap();
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let mut files = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert_eq!(files, 4, "data, present, written.log and lock");
}

#[test]
fn a_cache_directory_others_may_read_is_refused_and_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = crate::private::test_dir();
    let dir = tmp.path().join("cache");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let err = open(&dir, 1, u64::from(CHUNK)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let text = err.to_string();
    assert!(
        text.contains(&format!("{} has mode 0755", dir.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("chmod 700 {}", dir.display())),
        "{text}"
    );
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing written");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    open(&dir, 1, u64::from(CHUNK)).unwrap();
}
