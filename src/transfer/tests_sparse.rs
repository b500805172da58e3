//! Push of sparse images: holes are skipped unread, and what comes back is
//! the same image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::holes::data_ranges;
use super::tests::{Fixture, CS};

const GIB: u64 = 1 << 30;

/// Asserts two files hold the same bytes, reading only where either has
/// data: elsewhere both read as zeros.
fn assert_same_bytes(a: &Path, b: &Path) {
    let (a, b) = (File::open(a).unwrap(), File::open(b).unwrap());
    let len = a.metadata().unwrap().len();
    assert_eq!(len, b.metadata().unwrap().len());
    let mut ranges = data_ranges(&a, 0..len);
    ranges.extend(data_ranges(&b, 0..len));
    let (mut x, mut y) = (vec![0; 1 << 20], vec![0; 1 << 20]);
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(x.len() as u64) as usize;
            a.read_exact_at(&mut x[..n], at).unwrap();
            b.read_exact_at(&mut y[..n], at).unwrap();
            assert!(
                x[..n] == y[..n],
                "the files differ within {at}..{}",
                at + n as u64
            );
            at += n as u64;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_image_reads_only_its_data_and_exports_identical() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("sparse.img");
    let file = File::create(&path).unwrap();
    // 16 GiB and a bit: the last chunk is short.
    let size = 16 * GIB + 1000;
    file.set_len(size).unwrap();
    let writes: [(u64, u8, usize); 5] = [
        (0, 1, 4096),                   // the first block
        (3 * GIB + 12_345, 2, 200_000), // across chunk boundaries
        (7 * GIB, 3, CS),               // exactly one chunk
        (9 * GIB + 5, 0, 8192),         // data the file system stores, all zeros
        (16 * GIB + 10, 4, 900),        // in the short last chunk
    ];
    for (at, byte, len) in writes {
        file.write_all_at(&vec![byte; len], at).unwrap();
    }
    drop(file);

    let report = fx.push_with(&path, fx.shared(), 64).await.unwrap();
    assert_eq!(report.image_bytes, size);
    assert_eq!(report.chunks_total, size.div_ceil(CS as u64));
    // Each write lies within a chunk or two (plus the file system's block
    // rounding); nothing like the image's size is read.
    assert!(
        report.bytes_read <= 8 * CS as u64,
        "read {} bytes",
        report.bytes_read
    );
    assert!(report.bytes_read >= (200_000 + 4096 + CS + 900) as u64);
    // The zeros that were written are found by content.
    assert_eq!(report.chunks_distinct, 6);
    assert_eq!(report.chunks_total - report.chunks_zero, 7);

    let out = fx.dir.path().join("out.img");
    fx.export_to(&out).await.unwrap();
    assert_same_bytes(&path, &out);
}
