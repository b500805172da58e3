//! Damaged cache files are repaired on open, never trusted; written chunks
//! are told from fetched ones; a cache is checked against its manifest.

use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::bitmap::{decode, encode, Geometry, HEADER_LEN, VERSION_PRESENT_ONLY};
use super::check::check_chunks;
use super::*;
use crate::engine::testing::{fixture, idle, open_engine, EngineExt, CS, CSU};
use crate::engine::EngineOptions;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `image`'s fixture from `dir` and reads the whole image.
fn read_all(
    fx: &crate::engine::testing::Fixture,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
) -> Vec<u8> {
    let _entered = rt.enter();
    let engine = open_engine(fx, dir, EngineOptions::default()).unwrap();
    let size = engine.size() as usize;
    let got = rt.block_on(engine.read(0, size)).unwrap();
    rt.block_on(idle(&engine));
    rt.block_on(engine.flush()).unwrap();
    got
}

/// A cache of the fixture with every chunk fetched and chunk 0 overwritten
/// by the device; returns the image as the device sees it.
fn warm_cache(
    fx: &crate::engine::testing::Fixture,
    image: &[u8],
    dir: &Path,
    rt: &tokio::runtime::Runtime,
) -> Vec<u8> {
    let _entered = rt.enter();
    let engine = open_engine(fx, dir, EngineOptions::default()).unwrap();
    let mut expected = image.to_vec();
    assert_eq!(rt.block_on(engine.read(0, image.len())).unwrap(), image);
    rt.block_on(engine.write(100, b"the user's bytes")).unwrap();
    expected[100..116].copy_from_slice(b"the user's bytes");
    rt.block_on(idle(&engine));
    rt.block_on(engine.flush()).unwrap();
    expected
}

fn open_fx(fx: &crate::engine::testing::Fixture, dir: &Path) -> CacheDir {
    CacheDir::open_or_create(dir, fx.digest, fx.manifest.image_size, CS).unwrap()
}

#[test]
fn a_damaged_bitmap_is_dropped_whole_and_the_device_fetches_again() {
    let (image, fx) = fixture();
    let rt = runtime();
    let path = |dir: &Path| dir.join(BITMAP_FILE);
    for damage in 0..4 {
        let tmp = crate::private::test_dir();
        warm_cache(&fx, &image, tmp.path(), &rt);
        let good = fs::read(path(tmp.path())).unwrap();
        let bad = match damage {
            0 => {
                let mut flipped = good.clone();
                flipped[HEADER_LEN] ^= 0x04;
                flipped
            }
            1 => good[..good.len() - 1].to_vec(),
            2 => Vec::new(),
            _ => b"not a bitmap at all".repeat(8),
        };
        fs::write(path(tmp.path()), &bad).unwrap();
        // Stale bytes where the fetched chunks were must not be served as
        // the image: make them wrong.
        fs::write(tmp.path().join(DATA_FILE), vec![0xEE; image.len()]).unwrap();
        {
            let cache = open_fx(&fx, tmp.path());
            assert_eq!(cache.present_count(), 0, "damage {damage}");
            assert!(
                matches!(
                    cache.repairs(),
                    [Repair {
                        damage: Damage::Bitmap(_),
                        ..
                    }]
                ),
                "{:?}",
                cache.repairs()
            );
            assert!(cache.repairs()[0].to_string().contains("damaged"));
        }
        // The repaired bitmap is sound, and the device serves the image.
        decode(&fs::read(path(tmp.path())).unwrap()).unwrap();
        let served = fx.store.served();
        assert_eq!(read_all(&fx, tmp.path(), &rt), image, "damage {damage}");
        assert!(fx.store.served() > served, "nothing was fetched again");
    }
}

#[test]
fn a_missing_bitmap_or_data_file_starts_the_cache_afresh() {
    let (image, fx) = fixture();
    let rt = runtime();

    let tmp = crate::private::test_dir();
    warm_cache(&fx, &image, tmp.path(), &rt);
    fs::remove_file(tmp.path().join(BITMAP_FILE)).unwrap();
    fs::write(tmp.path().join(DATA_FILE), vec![0xEE; image.len()]).unwrap();
    {
        let cache = open_fx(&fx, tmp.path());
        assert_eq!(cache.repairs()[0].damage, Damage::BitmapMissing);
        assert_eq!(cache.present_count(), 0);
    }
    assert_eq!(read_all(&fx, tmp.path(), &rt), image);

    let tmp = crate::private::test_dir();
    warm_cache(&fx, &image, tmp.path(), &rt);
    fs::remove_file(tmp.path().join(DATA_FILE)).unwrap();
    {
        let cache = open_fx(&fx, tmp.path());
        let [repair] = cache.repairs() else {
            panic!("{:?}", cache.repairs())
        };
        assert_eq!(repair.damage, Damage::DataMissing);
        assert!(repair.dropped.contains(&0) && repair.dropped.contains(&3));
        assert_eq!(cache.present_count(), 0);
        assert_eq!(
            fs::metadata(tmp.path().join(DATA_FILE)).unwrap().len(),
            image.len() as u64
        );
    }
    assert_eq!(read_all(&fx, tmp.path(), &rt), image);
}

#[test]
fn a_truncated_data_file_loses_the_chunks_past_its_end_only() {
    let (image, fx) = fixture();
    let rt = runtime();
    let tmp = crate::private::test_dir();
    let expected = warm_cache(&fx, &image, tmp.path(), &rt);
    let data = fs::OpenOptions::new()
        .write(true)
        .open(tmp.path().join(DATA_FILE))
        .unwrap();
    // Into chunk 4: chunks 0 to 3 survive whole.
    data.set_len(4 * CS as u64 + 10).unwrap();
    drop(data);
    {
        let cache = open_fx(&fx, tmp.path());
        let [repair] = cache.repairs() else {
            panic!("{:?}", cache.repairs())
        };
        assert_eq!(
            repair.damage,
            Damage::DataSize {
                actual: 4 * CS as u64 + 10
            }
        );
        // Chunks 5 and 1 are zero chunks: never present, never dropped.
        assert_eq!(repair.dropped, vec![4, 6, 7, 8]);
        assert!(cache.is_present(0) && cache.is_written(0) && cache.is_present(3));
    }
    assert_eq!(read_all(&fx, tmp.path(), &rt), expected);

    // Longer than the image: nothing is lost, the file is cut back.
    let data = fs::OpenOptions::new()
        .write(true)
        .open(tmp.path().join(DATA_FILE))
        .unwrap();
    data.set_len(image.len() as u64 + 4096).unwrap();
    drop(data);
    {
        let cache = open_fx(&fx, tmp.path());
        assert!(cache.repairs()[0].dropped.is_empty());
        assert_eq!(
            fs::metadata(tmp.path().join(DATA_FILE)).unwrap().len(),
            image.len() as u64
        );
    }
    assert_eq!(read_all(&fx, tmp.path(), &rt), expected);
}

#[test]
fn a_fetched_chunk_that_is_a_hole_is_fetched_again_but_a_discarded_one_is_kept() {
    let (image, fx) = fixture();
    let rt = runtime();
    let tmp = crate::private::test_dir();
    let mut expected = warm_cache(&fx, &image, tmp.path(), &rt);
    {
        let _entered = rt.enter();
        let engine = open_engine(&fx, tmp.path(), EngineOptions::default()).unwrap();
        rt.block_on(engine.discard(6 * CS as u64, CS as u64))
            .unwrap();
        rt.block_on(engine.flush()).unwrap();
        expected[6 * CSU..7 * CSU].fill(0);
    }
    let data = fs::OpenOptions::new()
        .write(true)
        .open(tmp.path().join(DATA_FILE))
        .unwrap();
    io::punch_hole(&data, 3 * CS as u64, CS as u64).unwrap();
    drop(data);
    {
        let cache = open_fx(&fx, tmp.path());
        let [repair] = cache.repairs() else {
            panic!("{:?}", cache.repairs())
        };
        assert_eq!(repair.damage, Damage::Holes);
        assert_eq!(repair.dropped, vec![3]);
        assert!(cache.is_present(6) && cache.is_written(6));
    }
    assert_eq!(read_all(&fx, tmp.path(), &rt), expected);
}

#[test]
fn a_bitmap_of_an_unknown_version_is_refused_and_kept() {
    let tmp = crate::private::test_dir();
    let geometry = Geometry::new([1; 32], 4 * u64::from(CS), CS).unwrap();
    drop(CacheDir::open_or_create(tmp.path(), [1; 32], 4 * u64::from(CS), CS).unwrap());
    let mut bytes = encode(&geometry, &[0], &[0]);
    bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
    let body = bytes.len() - 32;
    let checksum = Sha256::digest(&bytes[..body]);
    bytes[body..].copy_from_slice(&checksum);
    fs::write(tmp.path().join(BITMAP_FILE), &bytes).unwrap();
    let err = CacheDir::open_or_create(tmp.path(), [1; 32], 4 * u64::from(CS), CS).unwrap_err();
    assert!(matches!(err, CacheError::UnsupportedBitmap { .. }), "{err}");
    assert_eq!(fs::read(tmp.path().join(BITMAP_FILE)).unwrap(), bytes);
}

#[test]
fn a_first_version_bitmap_counts_every_present_chunk_as_written() {
    let tmp = crate::private::test_dir();
    let size = 4 * u64::from(CS);
    let geometry = Geometry::new([1; 32], size, CS).unwrap();
    drop(CacheDir::open_or_create(tmp.path(), [1; 32], size, CS).unwrap());
    // Version 1: the header, the present bits, the checksum.
    let mut bytes = encode(&geometry, &[0b0101], &[0]);
    bytes[8..12].copy_from_slice(&VERSION_PRESENT_ONLY.to_le_bytes());
    bytes.truncate(HEADER_LEN + 1);
    let checksum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&checksum);
    fs::write(tmp.path().join(BITMAP_FILE), &bytes).unwrap();
    let cache = CacheDir::open_or_create(tmp.path(), [1; 32], size, CS).unwrap();
    assert!(cache.repairs().is_empty());
    assert!(cache.is_present(0) && cache.is_written(0));
    assert!(cache.is_present(2) && cache.is_written(2));
    assert!(!cache.is_present(1) && !cache.is_written(1));
}

#[test]
fn a_write_to_a_persisted_chunk_is_recorded_before_the_bytes_change() {
    let (image, fx) = fixture();
    let rt = runtime();
    let tmp = crate::private::test_dir();
    {
        let _entered = rt.enter();
        let engine = open_engine(&fx, tmp.path(), EngineOptions::default()).unwrap();
        rt.block_on(engine.read(3 * CS as u64, 10)).unwrap();
        rt.block_on(idle(&engine));
        rt.block_on(engine.flush()).unwrap();
        // Written, never flushed: a crash now must not leave chunk 3
        // listed as the manifest's.
        rt.block_on(engine.write(3 * CS as u64 + 5, b"unflushed"))
            .unwrap();
        rt.block_on(idle(&engine));
        // Dropped without a flush, as a killed process would.
    }
    let bits = decode(&fs::read(tmp.path().join(BITMAP_FILE)).unwrap()).unwrap();
    assert_eq!(bits.written[0] & (1 << 3), 0, "recorded by the log alone");
    assert_eq!(
        fs::read(tmp.path().join(WRITTEN_LOG)).unwrap(),
        3u64.to_le_bytes()
    );
    let cache = open_fx(&fx, tmp.path());
    assert!(cache.is_written(3));
    let report = check_chunks(&cache, &fx.manifest).unwrap();
    assert!(report.mismatched.is_empty(), "{report:?}");
    assert!(report.chunks_written >= 1, "{report:?}");
    let mut got = vec![0; 9];
    cache.read_at(&mut got, 3 * CS as u64 + 5).unwrap();
    assert_eq!(&got, b"unflushed");
    // A flush moves the bit into `present` and empties the log.
    cache.flush().unwrap();
    assert!(fs::read(tmp.path().join(WRITTEN_LOG)).unwrap().is_empty());
    drop(cache);
    let bits = decode(&fs::read(tmp.path().join(BITMAP_FILE)).unwrap()).unwrap();
    assert_eq!(bits.written[0] & (1 << 3), 1 << 3);
    drop(image);
}

#[test]
fn a_check_finds_changed_bytes_in_fetched_chunks_and_a_repair_refetches_them() {
    let (image, fx) = fixture();
    let rt = runtime();
    let tmp = crate::private::test_dir();
    let expected = warm_cache(&fx, &image, tmp.path(), &rt);
    {
        let cache = open_fx(&fx, tmp.path());
        let report = check_chunks(&cache, &fx.manifest).unwrap();
        assert_eq!(report.mismatched, Vec::<u64>::new());
        assert_eq!(report.chunks_written, 1, "{report:?}");
        // Every stored chunk but the written one was checked.
        assert_eq!(report.chunks_checked, 6, "{report:?}");
        // A byte changed behind the cache's back in chunks 2 and 7, and in
        // chunk 0, which the device wrote (so its bytes are the user's).
        cache.write_at(&[0x5A], 2 * CS as u64 + 77).unwrap();
        cache.write_at(&[0x5A], 7 * CS as u64).unwrap();
        cache.write_at(&[0x5A], 9).unwrap();
        cache.flush().unwrap();
    }
    let mut expected_after = expected.clone();
    expected_after[9] = 0x5A;
    {
        let cache = open_fx(&fx, tmp.path());
        let report = check_chunks(&cache, &fx.manifest).unwrap();
        assert_eq!(report.mismatched, vec![2, 7]);
        cache.drop_chunks(&report.mismatched).unwrap();
    }
    {
        let cache = open_fx(&fx, tmp.path());
        assert!(!cache.is_present(2) && !cache.is_present(7) && cache.is_present(3));
        assert!(check_chunks(&cache, &fx.manifest)
            .unwrap()
            .mismatched
            .is_empty());
    }
    assert_eq!(read_all(&fx, tmp.path(), &rt), expected_after);
}
