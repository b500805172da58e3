//! The read path against a misbehaving network: a real chunk server behind
//! `lazyblk fault-proxy`, read by `export` and by FUSE devices. Damaged
//! bytes never reach a reader, a stalled tier is passed over before the
//! kernel's I/O timeout, and failing servers are retried a bounded number
//! of times.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fault_proxy::FaultProxy;
use common::serve::Served;
use common::*;
use serde_json::json;

const CHUNK: u64 = 512 << 10;
/// The kernel's default block I/O timeout: a read must end, one way or the
/// other, well within it.
const KERNEL_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A world with a raw image of `chunks` distinct chunks pushed to its
/// directory store as "img", and a chunk server over that store.
fn image_served(chunks: u64) -> (World, Vec<u8>, Served) {
    let world = World::new();
    let bytes = pseudo_random(11, (chunks * CHUNK) as usize);
    let image = world.path("image.raw");
    fs::write(&image, &bytes).unwrap();
    world.push(&image, "img");
    let served = Served::start([std::ffi::OsStr::new("--store"), world.store().as_os_str()]);
    (world, bytes, served)
}

/// `lazyblk VERB --store S… --key KEY --name img`.
fn with_stores(world: &World, verb: &str, stores: &[&str]) -> Command {
    let mut cmd = world.lazyblk();
    cmd.arg(verb);
    for store in stores {
        cmd.args(["--store", store]);
    }
    cmd.arg("--key").arg(world.key()).args(["--name", "img"]);
    cmd
}

/// Exports through `stores`; the command's output.
fn export(world: &World, stores: &[&str], out: &str) -> std::process::Output {
    with_stores(world, "export", stores)
        .arg("--out")
        .arg(world.path(out))
        .output()
        .unwrap()
}

/// The JSON report an export printed after its summary.
fn export_report(output: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no report in {text}"));
    serde_json::from_str(text[start..].trim()).unwrap()
}

/// A read-only FUSE device over `stores` without readahead, so every
/// chunk is fetched only when read.
fn add_device(world: &World, stores: &[&str], name: &str, extra: &[&str]) -> std::path::PathBuf {
    let mnt = world.path(name);
    fs::create_dir_all(&mnt).unwrap();
    run(with_stores(world, "add", stores)
        .arg("--cache-dir")
        .arg(world.path(&format!("{name}-cache")))
        .arg("--fuse")
        .arg(&mnt)
        .args(["--read-only", "--readahead-chunks", "0"])
        .args(extra));
    mnt
}

/// Reads 4 KiB at the start of chunk `index` of the device at `mnt`,
/// past the page cache, timing it.
fn read_chunk(mnt: &Path, index: u64) -> (std::io::Result<Vec<u8>>, Duration) {
    let mut disk = fs::File::open(mnt.join("disk")).unwrap();
    // Drop what the page cache holds, so the read reaches the device.
    rustix::fs::fadvise(disk.as_fd(), 0, None, rustix::fs::Advice::DontNeed).unwrap();
    disk.seek(SeekFrom::Start(index * CHUNK)).unwrap();
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    let result = disk.read_exact(&mut buf).map(|()| buf);
    (result, started.elapsed())
}

fn expect_chunk(mnt: &Path, index: u64, bytes: &[u8]) {
    let (read, took) = read_chunk(mnt, index);
    let read = read.unwrap_or_else(|e| panic!("chunk {index}: {e}"));
    let at = (index * CHUNK) as usize;
    assert!(
        read[..] == bytes[at..at + 4096],
        "chunk {index}: wrong bytes"
    );
    assert!(took < KERNEL_IO_TIMEOUT, "chunk {index} took {took:?}");
}

fn expect_eio(mnt: &Path, index: u64) {
    let (read, took) = read_chunk(mnt, index);
    let error = read.expect_err("a read with no store to answer succeeded");
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(
        took < KERNEL_IO_TIMEOUT,
        "chunk {index} failed after {took:?}"
    );
}

fn device_stats(world: &World, mnt: &Path) -> serde_json::Value {
    world.device(mnt)["stats"].clone()
}

#[test]
fn flipped_bits_and_truncated_bodies_never_reach_a_reader() {
    let (world, bytes, served) = image_served(8);
    // Every chunk GET is damaged, one way or the other.
    let proxy = FaultProxy::start(
        &served.url,
        &[
            "--flip-rate",
            "0.5",
            "--truncate-rate",
            "0.5",
            "--seed",
            "1",
        ],
    );
    let dir = world.store().display().to_string();

    // With nothing else to ask, the export fails, and no chunk is asked
    // for twice: damaged bytes are never retried from the same source.
    let alone = export(&world, &[&proxy.url], "alone.raw");
    assert!(!alone.status.success());
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert!(stderr.contains("verify chunk"), "{stderr}");
    assert_eq!(proxy.most_gets_per_chunk().0, 1);

    // With a tier below, every damaged chunk is read from it instead.
    let tiered = export(&world, &[&proxy.url, &dir], "tiered.raw");
    assert!(tiered.status.success(), "{tiered:?}");
    assert!(fs::read(world.path("tiered.raw")).unwrap() == bytes);
    let report = export_report(&tiered);
    assert_eq!(report["tiers"][0]["integrity_failures"], 8, "{report}");
    assert_eq!(report["tiers"][0]["hits"], 0, "{report}");
    assert_eq!(report["tiers"][1]["hits"], 8, "{report}");
    // The failed export's damaged chunk, then every chunk of this one.
    let injected = proxy.count("flips") + proxy.count("truncations");
    assert!(injected > 8, "{}", proxy.counts());

    // A device with no other tier fails the read with EIO and counts it;
    // once the network heals, the same device reads the chunk.
    let mnt = add_device(&world, &[&proxy.url], "fuse", &[]);
    expect_eio(&mnt, 3);
    let stats = device_stats(&world, &mnt);
    assert!(
        stats["integrity_failures"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    proxy.set_rates(json!({}));
    expect_chunk(&mnt, 3, &bytes);
    world.del(&mnt);
}

#[test]
fn a_stalled_tier_is_passed_over_and_a_stalled_sole_store_fails_cleanly() {
    let (world, bytes, served) = image_served(6);
    let proxy = FaultProxy::start(&served.url, &["--stall-rate", "1"]);
    let dir = world.store().display().to_string();

    // A stalled upper tier: each read waits out the tier's deadline, then
    // the origin answers.
    let tiered = add_device(&world, &[&proxy.url, &dir], "tiered", &[]);
    for index in 0..6 {
        expect_chunk(&tiered, index, &bytes);
    }
    let stats = device_stats(&world, &tiered);
    assert_eq!(stats["tiers"][0]["timeouts"], 6, "{stats}");
    assert_eq!(stats["tiers"][1]["hits"], 6, "{stats}");
    world.del(&tiered);

    // The proxy as the only store: cached chunks stay readable while it
    // stalls, the others fail with EIO within the fetch deadline, and read
    // again once it answers, on the same device.
    proxy.set_rates(json!({}));
    let sole = add_device(&world, &[&proxy.url], "sole", &["--fetch-timeout", "2"]);
    expect_chunk(&sole, 0, &bytes);
    proxy.set_rates(json!({"stall_rate": 1.0}));
    expect_chunk(&sole, 0, &bytes);
    expect_eio(&sole, 4);
    let stats = device_stats(&world, &sole);
    assert!(stats["fetch_timeouts"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["cache_hits"].as_u64().unwrap() >= 1, "{stats}");
    proxy.set_rates(json!({}));
    expect_chunk(&sole, 4, &bytes);
    world.del(&sole);
    assert!(proxy.count("stalls") >= 7, "{}", proxy.counts());
}

#[test]
fn failing_servers_are_retried_a_bounded_number_of_times() {
    let (world, bytes, served) = image_served(32);
    let max_attempts = lazyblk::store::http::HttpStoreTiming::default()
        .retry
        .max_attempts;

    // 5xx and resets, few enough that no chunk meets one on every attempt:
    // with this seed, 4 of the first 40 draws fail, one of each kind among
    // the first 12. Every chunk arrives, and none is asked for more often
    // than the HTTP store's attempts.
    let proxy = FaultProxy::start(
        &served.url,
        &["--error-rate", "0.1", "--reset-rate", "0.1", "--seed", "6"],
    );
    let output = export(&world, &[&proxy.url], "flaky.raw");
    assert!(output.status.success(), "{output:?}");
    assert!(fs::read(world.path("flaky.raw")).unwrap() == bytes);
    assert!(proxy.count("errors") >= 1, "{}", proxy.counts());
    assert!(proxy.count("resets") >= 1, "{}", proxy.counts());
    let (most, chunks) = proxy.most_gets_per_chunk();
    assert_eq!(chunks, 32);
    assert!((2..=u64::from(max_attempts)).contains(&most), "{most}");
    drop(proxy);

    // A server that always fails: a chunk gets the HTTP store's attempts
    // and not one more (the engine does not retry a store that retries
    // itself); the export fails naming the chunk.
    let down = FaultProxy::start(&served.url, &["--error-rate", "1"]);
    let output = export(&world, &[&down.url], "down.raw");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("fetch chunk"), "{stderr}");
    assert_eq!(down.most_gets_per_chunk().0, u64::from(max_attempts));

    // So does a device, whose read fails with EIO. The kernel may ask
    // again after a failed readahead: each fetch the device reports failed
    // cost the store's attempts, no more.
    down.set_rates(json!({}));
    let mnt = add_device(&world, &[&down.url], "down", &[]);
    down.set_rates(json!({"error_rate": 1.0}));
    let before = down.count("errors");
    expect_eio(&mnt, 1);
    let stats = device_stats(&world, &mnt);
    let failed = stats["fetch_errors"].as_u64().unwrap();
    assert!(failed >= 1, "{stats}");
    assert_eq!(stats["fetch_retries"], 0, "{stats}");
    assert_eq!(
        down.count("errors") - before,
        failed * u64::from(max_attempts),
        "{}",
        down.counts()
    );
    world.del(&mnt);
}
