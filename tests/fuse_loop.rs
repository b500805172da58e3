//! End to end through the real kernel: push an ext4 image, serve it with
//! `add --fuse`, loop-mount it and read, write, restart and export.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::process::Command;

use common::*;

fn stat_u64(device: &serde_json::Value, key: &str) -> u64 {
    device["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {device}"))
}

#[test]
fn read_only_mount_serves_the_tree_lazily_and_export_round_trips() {
    let world = World::new();
    let tree = world.path("tree");
    make_tree(&tree);
    let image = world.path("image.ext4");
    make_ext4(&tree, &image, 160);

    let report = world.push(&image, "app");
    let chunks_total = report["chunks_total"].as_u64().unwrap();
    let chunks_zero = report["chunks_zero"].as_u64().unwrap();
    assert_eq!(report["image_bytes"].as_u64().unwrap(), 160 << 20);
    assert_eq!(chunks_total, 320);
    assert!(chunks_zero > 0, "{report}");
    assert!(report["chunks_uploaded"].as_u64().unwrap() > 0);

    let again = world.push(&image, "app");
    assert_eq!(again["chunks_uploaded"], 0, "second push uploaded: {again}");
    assert_eq!(again["bytes_uploaded"], 0);

    // The store holds ciphertext only.
    let marker = MARKER.as_bytes();
    let mut chunk_files = 0;
    for dir in fs::read_dir(world.store().join("chunks")).unwrap() {
        for file in fs::read_dir(dir.unwrap().path()).unwrap() {
            let bytes = fs::read(file.unwrap().path()).unwrap();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "plaintext marker found in a chunk"
            );
            chunk_files += 1;
        }
    }
    assert!(chunk_files > 0);
    assert!(
        fs::read(&image)
            .unwrap()
            .windows(marker.len())
            .any(|w| w == marker),
        "marker not planted"
    );

    let fuse = world.add("app", "cache", "fuse", true);
    let root = world.mount_loop(&fuse, "root", true);
    let one_file = fs::read(root.join("dir03/sub0/file001.bin")).unwrap();
    assert_eq!(
        one_file,
        fs::read(tree.join("dir03/sub0/file001.bin")).unwrap()
    );
    let device = world.device(&fuse);
    let fetched = stat_u64(&device, "chunks_fetched");
    assert!(fetched > 0, "{device}");
    assert!(
        fetched < chunks_total - chunks_zero,
        "reading one file fetched {fetched} of {} stored chunks",
        chunks_total - chunks_zero
    );

    let compared = assert_same_tree(&tree, &root);
    assert!(compared > 300, "only {compared} entries compared");
    let device = world.device(&fuse);
    assert_eq!(stat_u64(&device, "integrity_failures"), 0);
    assert!(stat_u64(&device, "chunks_fetched") <= chunks_total - chunks_zero);
    assert!(stat_u64(&device, "cache_hits") > 0);

    // Writes are refused on a read-only device.
    let write = fs::OpenOptions::new().write(true).open(fuse.join("disk"));
    assert!(write.is_err(), "read-only disk opened for writing");

    world.umount(&root);
    world.del(&fuse);

    let exported = world.path("exported.ext4");
    run(world
        .with_store("export")
        .args(["--name", "app", "--out"])
        .arg(&exported));
    run(Command::new("cmp").arg(&image).arg(&exported));
}

#[test]
fn writes_survive_del_and_sigkill_and_are_not_fetched_again() {
    let world = World::new();
    let tree = world.path("tree");
    make_tree(&tree);
    let image = world.path("image.ext4");
    make_ext4(&tree, &image, 96);
    world.push(&image, "rw");

    let fuse = world.add("rw", "cache", "fuse", false);
    let root = world.mount_loop(&fuse, "root", false);
    let written = pseudo_random(99, 3 << 20);
    fs::write(root.join("new.bin"), &written).unwrap();
    fs::write(root.join("dir01/sub1/file000.bin"), b"overwritten").unwrap();
    run(&mut Command::new("sync"));
    world.umount(&root);
    world.del(&fuse);

    // Clean restart: the writes are there, served from the cache.
    let fuse = world.add("rw", "cache", "fuse", false);
    let root = world.mount_loop(&fuse, "root", false);
    assert!(fs::read(root.join("new.bin")).unwrap() == written);
    assert_eq!(
        fs::read(root.join("dir01/sub1/file000.bin")).unwrap(),
        b"overwritten"
    );
    let second = pseudo_random(100, 1 << 20);
    fs::write(root.join("second.bin"), &second).unwrap();
    run(&mut Command::new("sync"));
    world.umount(&root);

    // Hard stop: SIGKILL after the flush; nothing acknowledged may be lost.
    world.kill_device(&fuse);

    let fuse = world.add("rw", "cache", "fuse2", false);
    run(Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(fuse.join("disk")));
    let root = world.mount_loop(&fuse, "root2", true);
    assert!(fs::read(root.join("second.bin")).unwrap() == second);
    assert!(fs::read(root.join("new.bin")).unwrap() == written);
    assert!(assert_same_tree(&tree.join("dir05"), &root.join("dir05")) > 20);
    world.umount(&root);
    world.del(&fuse);
}

#[test]
fn a_corrupted_chunk_fails_the_read_and_is_counted() {
    let world = World::new();
    let image = world.path("image.raw");
    let mut bytes = pseudo_random(5, 4 << 20);
    bytes[(1 << 20)..(2 << 20)].fill(0);
    fs::write(&image, &bytes).unwrap();
    world.push(&image, "raw");

    // Flip one bit in the chunk holding the image's last 512 KiB.
    let sealed = fs::read(world.store().join("manifests/raw")).unwrap();
    let manifest = lazyblk::chunk::PublicManifest::parse("raw", &sealed).unwrap();
    let last = manifest.chunk_ids.last().unwrap().unwrap().to_hex();
    let chunk_path = world.store().join("chunks").join(&last[..2]).join(&last);
    let mut envelope = fs::read(&chunk_path).unwrap();
    envelope[1000] ^= 1;
    fs::write(&chunk_path, envelope).unwrap();

    let fuse = world.add("raw", "cache", "fuse", true);
    let mut disk = fs::File::open(fuse.join("disk")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    disk.read_exact(&mut head).unwrap();
    assert!(head == bytes[..1 << 20]);
    let mut tail = vec![0u8; 4096];
    disk.seek(SeekFrom::Start((4 << 20) - 4096)).unwrap();
    let err = disk.read_exact(&mut tail).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(disk);

    let device = world.device(&fuse);
    assert!(stat_u64(&device, "integrity_failures") >= 1, "{device}");

    // A second device at the same mountpoint is refused.
    run_failing(
        world
            .with_store("add")
            .args(["--name", "raw", "--cache-dir"])
            .arg(world.path("cache2"))
            .arg("--fuse")
            .arg(&fuse),
        "already serves",
    );
    world.del(&fuse);
}

#[test]
fn a_key_readable_by_others_is_refused() {
    let world = World::new();
    let image = world.path("small.raw");
    fs::write(&image, pseudo_random(1, 100_000)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(world.key(), fs::Permissions::from_mode(0o644)).unwrap();
    let key = world.key().display().to_string();
    run_failing(
        world
            .lazyblk()
            .arg("push")
            .arg(&image)
            .arg("--store")
            .arg(world.store())
            .args(["--key", &key, "--name", "x"]),
        &format!("key file {key} has mode 0644"),
    );
}

#[test]
fn fetched_chunks_are_checkpointed_and_survive_sigkill() {
    let world = World::new();
    let image = world.path("image.raw");
    let bytes = pseudo_random(11, 4 << 20);
    fs::write(&image, &bytes).unwrap();
    world.push(&image, "ro");

    // Readahead off: what is fetched is what the kernel asked for.
    let fuse = world.add_with("ro", "cache", "fuse", true, &["--readahead-chunks", "0"]);
    let bitmap = world.path("cache").join("present");
    let mut disk = fs::File::open(fuse.join("disk")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    disk.read_exact(&mut head).unwrap();
    drop(disk);
    assert!(head == bytes[..1 << 20]);
    let device = world.device(&fuse);
    assert!(stat_u64(&device, "chunks_fetched") >= 2, "{device}");
    assert_eq!(stat_u64(&device, "chunks_readahead"), 0, "{device}");

    // A read-only device never flushes; its periodic checkpoint records the
    // fetches. A checkpoint taken between the two fetches records only one,
    // so wait for one that holds both.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while checkpointed_chunks(&bitmap) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of both chunks within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    world.kill_device(&fuse);

    let fuse = world.add("ro", "cache", "fuse2", true);
    let device = world.device(&fuse);
    assert!(stat_u64(&device, "chunks_present") >= 2, "{device}");
    let mut disk = fs::File::open(fuse.join("disk")).unwrap();
    disk.read_exact(&mut head).unwrap();
    assert!(head == bytes[..1 << 20]);
    assert_eq!(stat_u64(&world.device(&fuse), "chunks_fetched"), 0);

    // An open file keeps the device busy: del refuses and the device stays up.
    run_failing(world.lazyblk().arg("del").arg("--fuse").arg(&fuse), "busy");
    drop(disk);
    world.del(&fuse);
}

/// How many chunks the cache's persisted bitmap records as present.
fn checkpointed_chunks(bitmap: &std::path::Path) -> u32 {
    let bytes = fs::read(bitmap).unwrap();
    let file = lazyblk::cache::bitmap::decode(&bytes).unwrap();
    file.present.iter().map(|word| word.count_ones()).sum()
}

#[test]
fn fstrim_through_loop_frees_chunks_without_fetching_them() {
    let world = World::new();
    let tree = world.path("tree");
    make_tree(&tree);
    let image = world.path("image.ext4");
    make_ext4(&tree, &image, 96);
    world.push(&image, "trim");

    let fuse = world.add("trim", "cache", "fuse", false);
    let root = world.mount_loop(&fuse, "root", false);
    // Files never read: their chunks are not in the cache.
    let gone = ["dir02", "dir03", "dir04"];
    for dir in gone {
        fs::remove_dir_all(root.join(dir)).unwrap();
    }
    let written = pseudo_random(7, 2 << 20);
    fs::write(root.join("kept.bin"), &written).unwrap();
    run(&mut Command::new("sync"));
    let before = world.device(&fuse);
    run(Command::new("fstrim").arg(&root));
    let after = world.device(&fuse);
    assert!(
        stat_u64(&after, "discard_requests") > stat_u64(&before, "discard_requests"),
        "fstrim sent no discard through loop and FUSE: {after}"
    );
    assert!(stat_u64(&after, "chunks_punched") > 0, "{after}");
    assert_eq!(
        stat_u64(&after, "chunks_fetched"),
        stat_u64(&before, "chunks_fetched"),
        "a discard fetched a chunk"
    );
    world.umount(&root);
    run(Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(fuse.join("disk")));
    let root = world.mount_loop(&fuse, "root2", true);
    assert!(fs::read(root.join("kept.bin")).unwrap() == written);
    assert!(assert_same_tree(&tree.join("dir05"), &root.join("dir05")) > 20);
    for dir in gone {
        assert!(!root.join(dir).exists());
    }
    world.umount(&root);
    world.del(&fuse);
}
