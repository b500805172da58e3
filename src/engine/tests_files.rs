//! Readahead from file extents, on a real image made by the flattener: a
//! miss inside a large file fetches the rest of that file, and nothing of
//! the files beside it.

use std::io::Cursor;
use std::ops::RangeInclusive;
use std::sync::Arc;

use rand::{Rng, SeedableRng};

use super::neighbourhood::{NEAR, NEAR_AMONG_FILES};
use super::testing::{idle, open_engine, seal_image, within, EngineExt, Fixture, CS, CSU};
use super::*;
use crate::flatten::{FlattenOptions, Flattener};
use crate::oci::entry::{EntryKind, EntryMeta, EntryPath, LayerEntry};

/// Bytes of each large file: 12 chunks of the tests' size, a run short
/// enough to be fetched whole on its first miss.
const LARGE: usize = 12 * CSU;

struct Image {
    bytes: Vec<u8>,
    fx: Fixture,
    /// The chunks holding each large file's data.
    large: Vec<RangeInclusive<u64>>,
    /// The chunks holding the data of a sparse file of many extents, and
    /// the chunk holding the extent tree block that maps them.
    sparse: RangeInclusive<u64>,
    sparse_tree: u64,
}

/// A file of 256 blocks whose every eighth block is a hole: 32 extents,
/// more than an inode holds, so the flattener writes a tree block.
fn sparse_file(rng: &mut impl Rng) -> Vec<u8> {
    let block = crate::ext4::BLOCK_SIZE;
    let mut data = vec![0u8; 256 * block];
    for (i, b) in data.chunks_mut(block).enumerate() {
        if i % 8 != 7 {
            rng.fill(b);
        }
    }
    data
}

/// An ext4 image of `dirs` and `files` in one layer, as `flatten` writes
/// it.
fn flatten(dirs: &[&str], files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut flattener =
        Flattener::new(Cursor::new(&mut bytes), FlattenOptions { free_space: 0 }).unwrap();
    flattener.begin_layer("layer").unwrap();
    for dir in dirs {
        let entry = LayerEntry {
            path: EntryPath::parse(dir.as_bytes()).unwrap(),
            kind: EntryKind::Directory,
            meta: EntryMeta {
                mode: 0o755,
                ..EntryMeta::default()
            },
        };
        flattener.apply(entry, &mut &[][..]).unwrap();
    }
    for (path, data) in files {
        let entry = LayerEntry {
            path: EntryPath::parse(path.as_bytes()).unwrap(),
            kind: EntryKind::Regular {
                size: data.len() as u64,
            },
            meta: EntryMeta {
                mode: 0o644,
                ..EntryMeta::default()
            },
        };
        flattener.apply(entry, &mut &data[..]).unwrap();
    }
    flattener.end_layer().unwrap();
    flattener.finish().unwrap();
    bytes
}

/// An ext4 image of a few small files and three large ones of random bytes,
/// as `flatten` writes it.
fn image() -> Image {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..20 {
        files.push((format!("etc/small{i}"), vec![i as u8 + 1; 3000]));
    }
    let mut large = Vec::new();
    for name in ["lib/a.so", "lib/b.so", "lib/c.so"] {
        let mut data = vec![0u8; LARGE];
        rng.fill(&mut data[..]);
        large.push(data.clone());
        files.push((name.into(), data));
    }
    let sparse = sparse_file(&mut rng);
    files.push(("lib/sparse.so".into(), sparse.clone()));
    let bytes = flatten(&["etc", "lib"], &files);
    // Where each large file landed: its random bytes are found nowhere else.
    let large = large
        .iter()
        .map(|data| {
            let at = bytes
                .windows(64)
                .position(|w| w == &data[..64])
                .expect("the file's data is in the image");
            assert!(bytes[at..at + LARGE] == data[..], "stored contiguously");
            (at / CSU) as u64..=((at + LARGE - 1) / CSU) as u64
        })
        .collect();
    let block = crate::ext4::BLOCK_SIZE;
    let find = |needle: &[u8]| {
        let at = bytes.windows(64).position(|w| w == &needle[..64]);
        at.expect("the file's data is in the image")
    };
    let (first, last) = (find(&sparse[..block]), find(&sparse[254 * block..]));
    let sparse_range = (first / CSU) as u64..=((last + block - 1) / CSU) as u64;
    // A leaf of the extent tree: its magic, 32 entries, depth 0.
    let leaf = bytes
        .chunks(block)
        .position(|b| b[..8] == [0x0A, 0xF3, 32, 0, 0x54, 0x01, 0, 0])
        .expect("a tree block");
    let fx = seal_image(&bytes, CS);
    Image {
        sparse: sparse_range,
        sparse_tree: (leaf * block / CSU) as u64,
        bytes,
        fx,
        large,
    }
}

fn open(fx: &Fixture, dir: &std::path::Path) -> Arc<Engine> {
    let opts = EngineOptions {
        // Room for a whole file at once, and a bound that does not follow
        // the host's load.
        readahead_chunks: 32,
        adaptive_readahead: false,
        ..EngineOptions::default()
    };
    open_engine(fx, dir, opts).unwrap()
}

async fn read_chunk(engine: &Arc<Engine>, image: &[u8], index: u64) {
    let at = index as usize * CSU;
    let len = CSU.min(image.len() - at);
    let got = within(engine.read(at as u64, len)).await.unwrap();
    assert!(got == image[at..at + len], "chunk {index}");
}

/// Reads every chunk of `run` and checks none needed the store: the run was
/// fetched ahead, whole.
async fn assert_fetched_whole(engine: &Arc<Engine>, img: &Image, run: RangeInclusive<u64>) {
    let gets = img.fx.store.gets();
    for index in run.clone().rev() {
        read_chunk(engine, &img.bytes, index).await;
    }
    assert_eq!(img.fx.store.gets(), gets, "{run:?} was fetched whole");
}

/// The chunk holding the start of the inode table of group 0, where the
/// files' inodes are.
fn inode_chunk() -> u64 {
    crate::ext4::layout::inode_table(0) * crate::ext4::BLOCK_SIZE as u64 / u64::from(CS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_in_a_large_file_fetches_that_file_and_only_it() {
    let img = image();
    let tmp = crate::private::test_dir();
    let engine = open(&img.fx, tmp.path());
    // What mounting and opening the file read first: the superblock, then
    // the inode.
    for index in [0, inode_chunk()] {
        read_chunk(&engine, &img.bytes, index).await;
        idle(&engine).await;
    }
    let before = engine.stats().chunks_readahead;
    let (a, b) = (img.large[0].clone(), img.large[1].clone());
    // One read in the middle of the first large file...
    read_chunk(&engine, &img.bytes, a.start() + 5).await;
    idle(&engine).await;
    // ...and the rest of it is there, in any order.
    assert_fetched_whole(&engine, &img, a.clone()).await;
    let file_chunks = a.end() - a.start() + 1;
    let stats = engine.stats();
    assert_eq!(
        stats.chunks_readahead - before,
        file_chunks - 1,
        "{stats:?}"
    );
    // Nothing of the next file (beyond a chunk the two may share).
    for index in *b.start() + 1..=*b.end() {
        let id = img.fx.id(index as usize);
        assert_eq!(img.fx.store.gets_of(&id), 0, "chunk {index} of {b:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inode_chunks_filled_before_the_superblock_still_count() {
    let img = image();
    let tmp = crate::private::test_dir();
    let engine = open(&img.fx, tmp.path());
    for index in [inode_chunk(), 0] {
        read_chunk(&engine, &img.bytes, index).await;
        idle(&engine).await;
    }
    let c = img.large[2].clone();
    read_chunk(&engine, &img.bytes, *c.start()).await;
    idle(&engine).await;
    assert_fetched_whole(&engine, &img, c.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inode_tables_and_directories_are_fetched_once_the_superblock_is_read() {
    let img = image();
    let tmp = crate::private::test_dir();
    let engine = open(&img.fx, tmp.path());
    read_chunk(&engine, &img.bytes, 0).await;
    idle(&engine).await;
    let gets = img.fx.store.gets();
    // The inode table, and the directory holding the small files (its
    // entries name them).
    let directory = img
        .bytes
        .windows(7)
        .position(|w| w == b"small19")
        .expect("a directory entry");
    for index in [inode_chunk(), (directory / CSU) as u64] {
        read_chunk(&engine, &img.bytes, index).await;
    }
    assert_eq!(img.fx.store.gets(), gets, "{:?}", engine.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_readahead_off_only_what_is_read_is_fetched() {
    let img = image();
    let tmp = crate::private::test_dir();
    let opts = EngineOptions {
        readahead_chunks: 0,
        ..EngineOptions::default()
    };
    let engine = open_engine(&img.fx, tmp.path(), opts).unwrap();
    let reads = [0, inode_chunk(), img.sparse_tree, img.large[0].start() + 5];
    for index in reads {
        read_chunk(&engine, &img.bytes, index).await;
        idle(&engine).await;
    }
    assert_eq!(img.fx.store.gets(), reads.len() as u64);
    assert_eq!(engine.stats().chunks_readahead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_many_extents_is_known_once_its_tree_block_is_read() {
    let img = image();
    let tmp = crate::private::test_dir();
    let engine = open(&img.fx, tmp.path());
    // As the kernel reads it: superblock, inode, tree block, then data.
    for index in [0, inode_chunk(), img.sparse_tree] {
        read_chunk(&engine, &img.bytes, index).await;
        idle(&engine).await;
    }
    let s = img.sparse.clone();
    assert!(s.end() - s.start() >= 8, "{s:?}");
    read_chunk(&engine, &img.bytes, s.start() + 3).await;
    idle(&engine).await;
    assert_fetched_whole(&engine, &img, s.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_trace_prefetch_metadata_is_not_guessed() {
    let img = image();
    let tmp = crate::private::test_dir();
    let engine = open(&img.fx, tmp.path());
    // The trace of a start that read the superblock and one file's chunk.
    let file_chunk = img.large[0].start() + 1;
    let trace = [img.fx.id(0), img.fx.id(file_chunk as usize)];
    assert_eq!(engine.prefetch(&trace), 2);
    super::testing::eventually(|| engine.stats().prefetch_remaining == 0).await;
    read_chunk(&engine, &img.bytes, 0).await;
    read_chunk(&engine, &img.bytes, file_chunk).await;
    idle(&engine).await;
    let stats = engine.stats();
    assert_eq!(stats.chunks_fetched, 2, "{stats:?}");
    assert_eq!(stats.chunks_readahead, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_512_kib_chunks_the_superblock_chunk_holds_the_inodes() {
    const BIG: usize = 512 * 1024;
    let img = image();
    let fx = seal_image(&img.bytes, BIG as u32);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    let read = |index: usize| {
        let engine = Arc::clone(&engine);
        let len = BIG.min(img.bytes.len() - index * BIG);
        let expected = img.bytes[index * BIG..index * BIG + len].to_vec();
        async move {
            let got = within(engine.read((index * BIG) as u64, len))
                .await
                .unwrap();
            assert!(got == expected, "chunk {index}");
        }
    };
    // Chunk 0 holds the superblock and group 0's inode table both.
    read(0).await;
    idle(&engine).await;
    let a = &img.large[0];
    let (first, last) = (
        *a.start() as usize * CSU / BIG,
        (*a.end() as usize + 1) * CSU / BIG,
    );
    assert!(last > first, "the file spans two chunks of 512 KiB");
    read(last).await;
    idle(&engine).await;
    let gets = fx.store.gets();
    read(first).await;
    assert_eq!(fx.store.gets(), gets, "{:?}", engine.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_opened_on_a_cache_that_holds_the_inodes_knows_the_files() {
    let img = image();
    let tmp = crate::private::test_dir();
    let a = img.large[0].clone();
    {
        let engine = open(&img.fx, tmp.path());
        for index in [0, inode_chunk()] {
            read_chunk(&engine, &img.bytes, index).await;
        }
        idle(&engine).await;
        // Present bits reach the disk on a flush.
        within(engine.flush()).await.unwrap();
    }
    let engine = open(&img.fx, tmp.path());
    super::testing::eventually(|| engine.file_run_of(a.start() + 5) == Some(a.clone())).await;
    read_chunk(&engine, &img.bytes, a.start() + 5).await;
    idle(&engine).await;
    assert_fetched_whole(&engine, &img, a.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_superblock_costs_nothing_and_changes_no_byte() {
    let img = image();
    let mut bytes = img.bytes.clone();
    // A superblock claiming 2^31 blocks of huge groups, and a thousand
    // descriptors that all name the one inode table.
    bytes[1024 + 4..1024 + 8].copy_from_slice(&0x8000_0000u32.to_le_bytes());
    bytes[1024 + 40..1024 + 44].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
    let block = crate::ext4::BLOCK_SIZE;
    let first: [u8; 32] = bytes[block..block + 32].try_into().unwrap();
    for g in 1..1000 {
        bytes[block + 32 * g..block + 32 * (g + 1)].copy_from_slice(&first);
    }
    let fx = seal_image(&bytes, CS);
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    for index in [0, inode_chunk(), img.large[0].start() + 3] {
        read_chunk(&engine, &bytes, index).await;
        idle(&engine).await;
    }
    // Whatever it guessed, every chunk still reads as the image.
    for index in 0..(bytes.len() / CSU) as u64 {
        read_chunk(&engine, &bytes, index).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_among_small_files_pair_from_further_once_the_superblock_is_read() {
    // A package of modules: 80 small files of random bytes, 40 chunks of
    // data, none a run long enough to be fetched whole.
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let files: Vec<(String, Vec<u8>)> = (0..80)
        .map(|i| {
            let mut data = vec![0u8; CSU / 2];
            rng.fill(&mut data[..]);
            (format!("pkg/mod{i:02}.pyc"), data)
        })
        .collect();
    let bytes = flatten(&["pkg"], &files);
    let chunk_of = |data: &[u8]| {
        let at = bytes.windows(64).position(|w| w == &data[..64]).unwrap();
        (at / CSU) as u64
    };
    // Two modules 20 chunks apart, and one between them.
    let (a, b, between) = (
        chunk_of(&files[10].1),
        chunk_of(&files[50].1),
        chunk_of(&files[30].1),
    );
    assert!(b - a > NEAR && b - a <= NEAR_AMONG_FILES, "{a} {b}");
    let fx = seal_image(&bytes, CS);
    let gets_between = || fx.store.gets_of(&fx.id(between as usize));

    // Before the superblock is read, nothing says these are files: two
    // misses that far apart fetch nothing between them.
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    for index in [a, b] {
        read_chunk(&engine, &bytes, index).await;
        idle(&engine).await;
    }
    assert_eq!(gets_between(), 0);
    drop(engine);

    // Once it is (as mounting reads it), they make a neighbourhood.
    let tmp = crate::private::test_dir();
    let engine = open(&fx, tmp.path());
    for index in [0, inode_chunk(), a, b] {
        read_chunk(&engine, &bytes, index).await;
        idle(&engine).await;
    }
    assert_eq!(gets_between(), 1, "{:?}", engine.stats());
    let gets = fx.store.gets();
    for index in a..=b {
        read_chunk(&engine, &bytes, index).await;
    }
    assert_eq!(fx.store.gets(), gets, "{a}..={b} was fetched");
}
