//! Crashes through the real kernel: a device process SIGKILLed in the middle
//! of writes and flushes keeps every flushed write, its cache checks clean
//! against the manifest (`verify-cache`), and two processes never share a
//! cache directory.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use common::*;

/// 64 KiB chunks, so a small image has many.
const CHUNK: usize = 64 << 10;
const IMAGE: usize = 128 * CHUNK;

/// A raw image of random chunks with zero chunks among them, pushed as `raw`.
fn push_image(world: &World) -> Vec<u8> {
    let mut bytes = pseudo_random(11, IMAGE);
    for zero in [3, 4, 40, 90, 127] {
        bytes[zero * CHUNK..][..CHUNK].fill(0);
    }
    let image = world.path("image.raw");
    fs::write(&image, &bytes).unwrap();
    run(world.with_store("push").arg(&image).args([
        "--name",
        "raw",
        "--chunk-size",
        &CHUNK.to_string(),
    ]));
    bytes
}

fn device_pid(world: &World, mnt: &Path) -> u32 {
    world.device(mnt)["pid"]
        .as_u64()
        .expect("a device has a pid") as u32
}

/// `verify-cache --json` on `cache`, which must pass; returns its report.
fn verify_cache(world: &World, cache: &Path) -> serde_json::Value {
    let out = run(world
        .with_store("verify-cache")
        .args(["--name", "raw", "--json"])
        .arg("--cache-dir")
        .arg(cache));
    serde_json::from_slice(&out.stdout).expect("verify-cache --json prints JSON")
}

#[test]
fn a_second_device_on_a_cache_in_use_is_refused_naming_the_holder() {
    let world = World::new();
    push_image(&world);
    let first = world.add("raw", "cache", "first", true);
    let pid = device_pid(&world, &first);
    fs::create_dir_all(world.path("second")).unwrap();
    run_failing(
        world
            .with_store("add")
            .args(["--name", "raw", "--read-only"])
            .arg("--cache-dir")
            .arg(world.path("cache"))
            .arg("--fuse")
            .arg(world.path("second")),
        &format!("in use by process {pid}"),
    );
    // verify-cache keeps out of a live device's cache too.
    run_failing(
        world
            .with_store("verify-cache")
            .args(["--name", "raw"])
            .arg("--cache-dir")
            .arg(world.path("cache")),
        &format!("in use by process {pid}"),
    );
    // The lock dies with its holder, even by SIGKILL.
    world.kill_device(&first);
    let second = world.add("raw", "cache", "second", true);
    world.del(&second);
    let third = world.add("raw", "cache", "third", true);
    world.del(&third);
}

#[test]
fn a_damaged_cache_is_repaired_on_add_logged_and_served_right() {
    let world = World::new();
    let image = push_image(&world);
    let cache = world.path("cache");
    let mnt = world.add("raw", "cache", "warm", false);
    let disk = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk"))
        .unwrap();
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), image);
    disk.write_all_at(b"kept", 5).unwrap();
    disk.sync_all().unwrap();
    drop(disk);
    world.del(&mnt);
    let mut expected = image.clone();
    expected[5..9].copy_from_slice(b"kept");

    // Chunks 10 and 11 lost from the data file, and stale bytes there
    // that must not be served.
    let data = fs::OpenOptions::new()
        .write(true)
        .open(cache.join("data"))
        .unwrap();
    lazyblk::cache::io::punch_hole(&data, 10 * CHUNK as u64, 2 * CHUNK as u64).unwrap();
    drop(data);
    let mnt = world.add("raw", "cache", "holes", true);
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), expected);
    world.del(&mnt);
    let log = fs::read_to_string(cache.join("daemon.log")).unwrap();
    assert!(
        log.contains("cache repaired on open") && log.contains("dropped 2 chunk(s): 10, 11"),
        "{log}"
    );

    // A torn bitmap: every chunk is fetched again, the write is lost.
    let present = fs::read(cache.join("present")).unwrap();
    fs::write(cache.join("present"), &present[..present.len() / 2]).unwrap();
    let report = world
        .with_store("verify-cache")
        .args(["--name", "raw"])
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        !report.status.success(),
        "verify-cache passed a torn bitmap"
    );
    assert!(
        String::from_utf8_lossy(&report.stderr).contains("is damaged"),
        "{report:?}"
    );
    let mnt = world.add("raw", "cache", "torn", true);
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), image);
    world.del(&mnt);
    verify_cache(&world, &cache);
}

/// Every file of `dir` with its bytes and modification time.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let path = entry.path();
            let modified = entry.metadata().unwrap().modified().unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                fs::read(&path).unwrap(),
                modified,
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn verify_cache_without_repair_reports_damage_and_changes_nothing() {
    let world = World::new();
    let image = push_image(&world);
    let cache = world.path("cache");
    let mnt = world.add("raw", "cache", "warm", true);
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), image);
    world.del(&mnt);

    // Chunk 10 lost from the data file (damage opening repairs) and chunk
    // 20 holding other bytes (a mismatch only the check finds).
    let data = fs::OpenOptions::new()
        .write(true)
        .open(cache.join("data"))
        .unwrap();
    lazyblk::cache::io::punch_hole(&data, 10 * CHUNK as u64, CHUNK as u64).unwrap();
    data.write_all_at(b"not the image", 20 * CHUNK as u64 + 7)
        .unwrap();
    data.sync_all().unwrap();
    drop(data);
    let before = snapshot(&cache);

    let check = world
        .with_store("verify-cache")
        .args(["--name", "raw"])
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!check.status.success(), "{said}");
    assert!(
        said.contains("are holes") && said.contains(": 10"),
        "{said}"
    );
    assert!(said.contains("1 mismatched"), "{said}");
    assert!(
        snapshot(&cache) == before,
        "verify-cache without --repair changed the cache: {said}"
    );

    let out = run(world
        .with_store("verify-cache")
        .args(["--name", "raw", "--repair"])
        .arg("--cache-dir")
        .arg(&cache));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("repaired on open"), "{said}");
    assert!(
        said.contains("dropped 1 chunk(s), to be fetched again: 20"),
        "{said}"
    );
    assert!(snapshot(&cache) != before);
    let report = verify_cache(&world, &cache);
    assert_eq!(report["mismatched"], serde_json::json!([]), "{report}");
    let mnt = world.add("raw", "cache", "repaired", true);
    assert_eq!(fs::read(mnt.join("disk")).unwrap(), image);
    world.del(&mnt);
}

/// What the writer knows: the image as of its last completed fsync, and
/// the writes since (any of which the device may or may not have kept).
struct Written {
    flushed: Vec<u8>,
    unflushed: Vec<(usize, Vec<u8>)>,
    flushes: u64,
}

/// Writes random blocks to `disk` and fsyncs now and then until a write or
/// fsync fails (the device died) or `stop` is set.
fn write_until_killed(disk: &Path, seed: u64, state: &Mutex<Written>, stop: &AtomicBool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let file = fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut until_fsync = rng.gen_range(1..8);
    while !stop.load(Ordering::Relaxed) {
        let len = 4096 * rng.gen_range(1..=20);
        let at = 4096 * rng.gen_range(0..(IMAGE - len) / 4096);
        let data = pseudo_random(rng.gen(), len);
        // Recorded before the write: a write cut short by the kill may
        // still have reached the device.
        state.lock().unwrap().unflushed.push((at, data.clone()));
        if file.write_all_at(&data, at as u64).is_err() {
            return;
        }
        until_fsync -= 1;
        if until_fsync == 0 {
            until_fsync = rng.gen_range(1..8);
            let mut state = state.lock().unwrap();
            if file.sync_all().is_err() {
                return;
            }
            let Written {
                flushed, unflushed, ..
            } = &mut *state;
            for (at, data) in unflushed.drain(..) {
                flushed[at..at + data.len()].copy_from_slice(&data);
            }
            state.flushes += 1;
        }
    }
}

/// Checks what the device serves after a crash: each byte holds its flushed
/// value or a value an unflushed write put there.
fn check_after_crash(got: &[u8], written: &Written, round: usize) {
    for (pos, (&byte, &flushed)) in got.iter().zip(&written.flushed).enumerate() {
        if byte == flushed {
            continue;
        }
        let by_unflushed = written
            .unflushed
            .iter()
            .any(|(at, data)| (*at..at + data.len()).contains(&pos) && data[pos - at] == byte);
        assert!(
            by_unflushed,
            "round {round}: byte {pos} reads {byte:#x}; flushed {flushed:#x}, and no unflushed write put it there"
        );
    }
}

#[test]
fn flushed_writes_survive_sigkill_and_the_cache_checks_clean() {
    let world = World::new();
    let image = push_image(&world);
    let cache = world.path("cache");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC4A5);
    let mut written = Written {
        flushed: image,
        unflushed: Vec::new(),
        flushes: 0,
    };
    let mut checked_written = 0;
    for round in 0..20 {
        let mnt = world.add_with("raw", "cache", &format!("mnt{round}"), false, &[]);
        let disk = mnt.join("disk");
        // What survived the last crash is the device's now: read it, check
        // it, and flush it so it is the new baseline.
        let got = fs::read(&disk).unwrap();
        check_after_crash(&got, &written, round);
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .sync_all()
            .unwrap();
        written.flushed = got;
        written.unflushed.clear();

        let pid = device_pid(&world, &mnt);
        let state = Arc::new(Mutex::new(written));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (state, stop, seed) = (state.clone(), stop.clone(), rng.gen());
            std::thread::spawn(move || write_until_killed(&disk, seed, &state, &stop))
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..300)));
        run(Command::new("kill").args(["-KILL", &pid.to_string()]));
        while Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        world.forget_mount(&mnt);
        written = Arc::try_unwrap(state)
            .ok()
            .expect("the writer is done")
            .into_inner()
            .unwrap();

        let report = verify_cache(&world, &cache);
        assert_eq!(report["mismatched"], serde_json::json!([]), "{report}");
        assert_eq!(
            report["repaired_on_open"],
            serde_json::json!([]),
            "{report}"
        );
        checked_written += report["chunks_written"].as_u64().unwrap();
    }
    assert!(written.flushes > 0, "no fsync completed in any round");
    assert!(checked_written > 0, "no round wrote to the cache");

    let mnt = world.add("raw", "cache", "last", false);
    check_after_crash(&fs::read(mnt.join("disk")).unwrap(), &written, 20);
    world.del(&mnt);
}
