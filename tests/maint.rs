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

/// Every chunk file in a directory store.
fn chunk_files(store: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for dir in fs::read_dir(store.join("chunks")).unwrap() {
        for file in fs::read_dir(dir.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files.sort();
    files
}

/// Makes every chunk file look `secs` old.
fn age_chunks(store: &Path, secs: u64) {
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    for path in chunk_files(store) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn store_cmd(world: &World, verb: &str, store: &Path) -> std::process::Command {
    let mut cmd = world.lazyblk();
    cmd.arg(verb).arg("--store").arg(store);
    cmd
}

fn gc(world: &World, args: &[&str]) -> serde_json::Value {
    json_of(&run(store_cmd(world, "gc", &world.store())
        .arg("--json")
        .args(args)))
}

/// Two 2 MiB images that share their second MiB (two 512 KiB chunks).
fn two_images(world: &World) -> (std::path::PathBuf, std::path::PathBuf) {
    let shared = pseudo_random(100, MIB as usize);
    let mut paths = Vec::new();
    for (name, seed) in [("a.img", 1), ("b.img", 2)] {
        let mut data = pseudo_random(seed, MIB as usize);
        data.extend_from_slice(&shared);
        let path = world.path(name);
        fs::write(&path, data).unwrap();
        paths.push(path);
    }
    (paths[0].clone(), paths[1].clone())
}

#[test]
fn gc_keeps_referenced_and_recent_chunks_and_deletes_old_orphans() {
    let world = World::new();
    let (a, b) = two_images(&world);
    world.push(&a, "a");
    world.push(&b, "b");
    assert_eq!(chunk_files(&world.store()).len(), 6);
    fs::remove_file(world.store().join("manifests/b")).unwrap();

    // b's own chunks are orphans now, but young.
    let report = gc(&world, &["--grace", "1h"]);
    assert_eq!(report["manifests"], 1, "{report}");
    assert_eq!(report["chunks_referenced"], 4, "{report}");
    assert_eq!(report["chunks_recent"], 2, "{report}");
    assert_eq!(report["chunks_deleted"], 0, "{report}");

    let report = gc(&world, &["--grace", "0s", "--dry-run"]);
    assert_eq!(report["chunks_deleted"], 2, "{report}");
    assert_eq!(report["dry_run"], true);
    assert_eq!(chunk_files(&world.store()).len(), 6, "a dry run deleted");

    age_chunks(&world.store(), 7200);
    let report = gc(&world, &["--grace", "1h"]);
    assert_eq!(report["chunks_deleted"], 2, "{report}");
    assert!(report["bytes_freed"].as_u64().unwrap() > MIB, "{report}");
    assert_eq!(chunk_files(&world.store()).len(), 4);

    // a, which shares chunks with the deleted b, is whole.
    let out = world.path("a.out");
    run(world
        .with_store("export")
        .args(["--name", "a", "--out"])
        .arg(&out));
    files_equal(&a, &out);

    // The summary names what it did.
    let text = run(&mut store_cmd(&world, "gc", &world.store()));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("deleted") && text.contains("referenced"),
        "{text}"
    );
}

#[test]
fn gc_refuses_to_run_on_an_unreadable_manifest() {
    let world = World::new();
    let (a, b) = two_images(&world);
    world.push(&a, "a");
    world.push(&b, "b");
    fs::remove_file(world.store().join("manifests/b")).unwrap();
    fs::write(world.store().join("manifests/broken"), b"LZBM garbage").unwrap();
    run_failing(
        store_cmd(&world, "gc", &world.store()).args(["--grace", "0s"]),
        "manifest \"broken\"",
    );
    assert_eq!(chunk_files(&world.store()).len(), 6);
    run_failing(
        store_cmd(&world, "gc", &world.store()).args(["--grace", "1y"]),
        "not a duration",
    );
}

#[test]
fn upkeep_refuses_cache_tiers_in_front_of_the_store() {
    let world = World::new();
    let (a, _) = two_images(&world);
    world.push(&a, "a");
    let cache = world.path("cache-tier");
    for verb in ["gc", "verify"] {
        run_failing(
            store_cmd(&world, verb, &cache)
                .arg("--store")
                .arg(world.store()),
            "the store of record",
        );
    }
    assert_eq!(chunk_files(&world.store()).len(), 4);
}

#[test]
fn verify_finds_a_flipped_byte_and_a_missing_chunk_and_repairs_them() {
    let world = World::new();
    let (a, _) = two_images(&world);
    world.push(&a, "a");
    let replica = world.path("replica");
    run(world
        .lazyblk()
        .args(["push", "--store"])
        .arg(&replica)
        .arg("--key")
        .arg(world.key())
        .arg(&a)
        .args(["--name", "a"]));

    let clean = json_of(&run(
        store_cmd(&world, "verify", &world.store()).arg("--json")
    ));
    assert_eq!(clean["chunks_checked"], 4, "{clean}");
    assert_eq!(clean["chunks_good"], 4, "{clean}");

    let files = chunk_files(&world.store());
    let mut bytes = fs::read(&files[0]).unwrap();
    bytes[1000] ^= 0x40;
    fs::write(&files[0], bytes).unwrap();
    fs::remove_file(&files[1]).unwrap();
    let name = |path: &Path| path.file_name().unwrap().to_str().unwrap().to_owned();

    let failed = store_cmd(&world, "verify", &world.store())
        .args(["--json", "--name", "a"])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let found = json_of(&failed);
    assert_eq!(
        found["bad"],
        serde_json::json!([name(&files[0])]),
        "{found}"
    );
    assert_eq!(
        found["missing"],
        serde_json::json!([name(&files[1])]),
        "{found}"
    );
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("1 bad and 1 missing"), "{stderr}");

    let repaired = json_of(&run(store_cmd(&world, "verify", &world.store())
        .arg("--json")
        .arg("--repair-from")
        .arg(&replica)));
    assert_eq!(
        repaired["repaired"].as_array().unwrap().len(),
        2,
        "{repaired}"
    );
    run(&mut store_cmd(&world, "verify", &world.store()));
    let out = world.path("a.out");
    run(world
        .with_store("export")
        .args(["--name", "a", "--out"])
        .arg(&out));
    files_equal(&a, &out);
}
