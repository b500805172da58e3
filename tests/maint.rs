//! Store upkeep through the real binary: push of sparse images, `gc` and
//! `verify` on a real directory store.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use common::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A sparse file of `size` bytes holding `data` bytes of pseudo-random data
/// in 4 MiB runs spread evenly across it.
fn sparse_image(path: &Path, size: u64, data: u64, seed: u64) {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let runs = data / (4 * MIB);
    for run in 0..runs {
        let at = run * (size / runs) / MIB * MIB;
        file.write_all_at(&pseudo_random(seed + run, 4 * MIB as usize), at)
            .unwrap();
    }
}

fn files_equal(a: &Path, b: &Path) {
    run(std::process::Command::new("cmp").arg(a).arg(b));
}

#[test]
fn push_of_a_sparse_image_reads_its_data_only_and_exports_identical() {
    let world = World::new();
    let image = world.path("sparse.img");
    sparse_image(&image, 64 * GIB, 32 * MIB, 1);

    let started = Instant::now();
    let report = world.push(&image, "sparse");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(report["image_bytes"], 64 * GIB);
    let read = report["bytes_read"].as_u64().unwrap();
    assert!((32 * MIB..=40 * MIB).contains(&read), "{report}");
    // Reading 64 GiB of zeros takes tens of seconds; the data alone well
    // under a second.
    assert!(secs < 15.0, "push of 32 MiB took {secs:.1} s: {report}");

    // Byte-identical, checked on a smaller image so that cmp, which reads
    // every zero, stays quick.
    let small = world.path("small.img");
    sparse_image(&small, 2 * GIB + 12345, 16 * MIB, 2);
    let report = world.push(&small, "small");
    assert!(
        report["bytes_read"].as_u64().unwrap() <= 20 * MIB,
        "{report}"
    );
    let out = world.path("small.out");
    run(world
        .with_store("export")
        .args(["--name", "small", "--out"])
        .arg(&out));
    files_equal(&small, &out);
}

#[test]
fn push_json_names_a_source_digest_only_when_there_is_one() {
    let world = World::new();
    let image = world.path("image");
    fs::write(&image, pseudo_random(3, MIB as usize)).unwrap();
    let report = world.push(&image, "plain");
    assert!(report.get("source_digest").is_none(), "{report}");

    let digest = format!("sha256:{}", "ab".repeat(32));
    let out = run(world.with_store("push").arg(&image).args([
        "--name",
        "named",
        "--json",
        "--source-digest",
        &digest,
    ]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["source_digest"], digest);
}
