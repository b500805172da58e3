//! End to end through the kernel's ublk driver: `add` images as
//! /dev/ublkbN, read them through ext4 and fio, write, restart, kill and
//! recover, corrupt the store, and remove everything.
//!
//! Every test needs /dev/ublk-control, so they are ignored by a plain
//! `cargo test`; scripts/vm-test.sh runs them with `--ignored` in a VM on a
//! kernel with ublk. There, a missing tool fails the test.

mod common;
// The SIGKILL and recover rounds under writes, in their own file.
#[path = "ublk/crash.rs"]
mod crash;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

/// A [`World`] that also owns ublk devices and the mounts on them, all
/// removed on drop even when the test fails.
struct UblkWorld {
    world: World,
    mounts: std::cell::RefCell<Vec<PathBuf>>,
}

impl Drop for UblkWorld {
    fn drop(&mut self) {
        for mnt in self.mounts.borrow().iter().rev() {
            let _ = Command::new("umount").arg(mnt).output();
        }
        let _ = self.world.lazyblk().args(["del", "--all"]).output();
    }
}

/// A device as `add` reported it.
struct Dev {
    id: u32,
    path: PathBuf,
}

impl UblkWorld {
    fn new() -> UblkWorld {
        assert!(
            Path::new("/dev/ublk-control").exists(),
            "no /dev/ublk-control: load ublk_drv"
        );
        for tool in ["fio", "dd"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(found, "the ublk tests need `{tool}`");
        }
        UblkWorld {
            world: World::new(),
            mounts: Default::default(),
        }
    }

    fn add(&self, name: &str, cache: &str, extra: &[&str]) -> Dev {
        let out = run(self
            .world
            .with_store("add")
            .args(["--name", name])
            .arg("--cache-dir")
            .arg(self.world.path(cache))
            .args(extra));
        let stdout = String::from_utf8_lossy(&out.stdout);
        // "/dev/ublkbN id N (pid P, log L)"
        let words: Vec<&str> = stdout.split_whitespace().collect();
        assert!(words.len() >= 3 && words[1] == "id", "add said: {stdout}");
        let dev = Dev {
            path: PathBuf::from(words[0]),
            id: words[2].parse().expect("a device id"),
        };
        assert_eq!(dev.path, PathBuf::from(format!("/dev/ublkb{}", dev.id)));
        assert!(dev.path.exists(), "{} is missing", dev.path.display());
        dev
    }

    fn del(&self, dev: &Dev) {
        run(self
            .world
            .lazyblk()
            .args(["del", "-n", &dev.id.to_string()]));
        assert!(!dev.path.exists(), "{} still exists", dev.path.display());
    }

    /// `lazyblk list --json`, the entry of device `id`.
    fn device(&self, id: u32) -> serde_json::Value {
        let out = run(self.world.lazyblk().args(["list", "--json"]));
        let devices: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        devices
            .as_array()
            .expect("an array")
            .iter()
            .find(|d| d["ublk"]["id"].as_u64() == Some(u64::from(id)))
            .unwrap_or_else(|| panic!("no ublk device {id} in {devices}"))
            .clone()
    }

    fn stat(&self, id: u32, key: &str) -> u64 {
        let device = self.device(id);
        device["stats"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in {device}"))
    }

    fn mount(&self, dev: &Dev, at: &str, options: &str) -> PathBuf {
        let target = self.world.path(at);
        fs::create_dir_all(&target).unwrap();
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", options])
            .arg(&dev.path)
            .arg(&target));
        self.mounts.borrow_mut().push(target.clone());
        target
    }

    fn umount(&self, target: &Path) {
        run(Command::new("umount").arg(target));
        self.mounts.borrow_mut().retain(|m| m != target);
    }

    /// A raw image of `size_mib`: its first half pseudo-random (distinct
    /// chunks), the rest zeros. Pushed as `name`; returns its path.
    fn raw_image(&self, name: &str, seed: u64, size_mib: usize) -> PathBuf {
        let image = self.world.path(&format!("{name}.img"));
        let mut bytes = pseudo_random(seed, (size_mib << 20) / 2);
        bytes.resize(size_mib << 20, 0);
        fs::write(&image, bytes).unwrap();
        self.world.push(&image, name);
        image
    }
}

fn sha256_file(path: &Path) -> String {
    let mut file = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

/// SHA-256 of every regular file under `root`, by relative path.
fn file_hashes(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut hashes = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                if rel != Path::new("lost+found") {
                    stack.push(rel);
                }
            } else if kind.is_file() {
                hashes.insert(rel.clone(), sha256_file(&root.join(&rel)));
            }
        }
    }
    hashes
}

/// fio against a block device with crc32c verification; panics on failure.
fn fio(dev: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=verify",
        "--ioengine=io_uring",
        "--direct=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--size=48M",
        "--bs=16k",
        "--iodepth=16",
        "--rw=randwrite",
    ])
    .arg(format!("--filename={}", dev.display()))
    .args(extra);
    cmd
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn ext4_image_reads_back_every_file_and_fetches_lazily() {
    let w = UblkWorld::new();
    let tree = w.world.path("tree");
    make_tree(&tree);
    fs::write(tree.join("huge.bin"), pseudo_random(64, 64 << 20)).unwrap();
    let image = w.world.path("image.ext4");
    make_ext4(&tree, &image, 200);
    let expected = file_hashes(&tree);
    assert!(expected.len() > 300, "only {} files", expected.len());
    let report = w.world.push(&image, "app");
    let stored = report["chunks_total"].as_u64().unwrap() - report["chunks_zero"].as_u64().unwrap();

    let dev = w.add("app", "cache", &["--read-only"]);
    let device = w.device(dev.id);
    assert_eq!(device["state"], "live", "{device}");
    assert_eq!(device["name"], "app");
    assert_eq!(device["read_only"], true);
    let root = w.mount(&dev, "root", "ro");
    assert_eq!(
        sha256_file(&root.join("dir03/sub0/file001.bin")),
        expected[Path::new("dir03/sub0/file001.bin")]
    );
    let fetched = w.stat(dev.id, "chunks_fetched");
    assert!(
        fetched > 0 && fetched < stored / 2,
        "mounting and reading one file fetched {fetched} of {stored} stored chunks"
    );

    let actual = file_hashes(&root);
    assert_eq!(actual.len(), expected.len());
    for (path, hash) in &expected {
        assert_eq!(actual.get(path), Some(hash), "{}", path.display());
    }
    assert_eq!(w.stat(dev.id, "integrity_failures"), 0);
    assert!(w.stat(dev.id, "chunks_fetched") <= stored);
    w.umount(&root);
    w.del(&dev);
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn fio_verified_writes_survive_del_and_re_add() {
    let w = UblkWorld::new();
    w.raw_image("rw", 2, 64);
    let dev = w.add("rw", "cache", &["-q", "2"]);
    run(&mut fio(&dev.path, &[]));
    assert!(w.stat(dev.id, "write_bytes") >= 48 << 20);
    w.del(&dev);

    let dev = w.add("rw", "cache", &[]);
    run(&mut fio(&dev.path, &["--verify_only"]));
    // The cache kept every written chunk: nothing was fetched again.
    assert_eq!(w.stat(dev.id, "chunks_fetched"), 0);
    w.del(&dev);
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(child: Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn recoverable_device_survives_sigkill_during_fio_verify() {
    let w = UblkWorld::new();
    w.raw_image("rec", 3, 64);
    let dev = w.add("rec", "cache", &["--recoverable"]);
    assert_eq!(w.device(dev.id)["ublk"]["recoverable"], true);
    // Written and flushed: what a recovered device must still have.
    run(&mut fio(&dev.path, &["--do_verify=0", "--end_fsync=1"]));

    // Verify slowly enough that the kill lands in the middle.
    let reader = fio(&dev.path, &["--verify_only", "--rate_iops=400"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let pid = w.device(dev.id)["pid"].as_u64().unwrap();
    run(Command::new("kill").args(["-KILL", &pid.to_string()]));
    wait_for("the device process to die", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(dev.path.exists(), "the device went away with its process");
    let orphan = w.device(dev.id);
    assert_eq!(orphan["state"], "orphaned", "{orphan}");
    assert!(orphan["stats"].is_null());

    let out = run(w
        .world
        .lazyblk()
        .args(["recover", "-n", &dev.id.to_string()]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&dev.path.display().to_string()),
        "{out:?}"
    );
    let fio_out = finish(reader, "fio verify across the kill");
    assert!(!fio_out.contains("verify: bad"), "{fio_out}");
    let device = w.device(dev.id);
    assert_eq!(device["state"], "live");
    assert_ne!(device["pid"].as_u64().unwrap(), pid);
    w.del(&dev);
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn corrupt_chunk_fails_only_the_reads_that_need_it() {
    let w = UblkWorld::new();
    let image = w.raw_image("bad", 4, 32);
    let chunks: Vec<PathBuf> = fs::read_dir(w.world.store().join("chunks"))
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect();
    assert!(chunks.len() >= 32, "{} chunks stored", chunks.len());
    let victim = &chunks[chunks.len() / 2];
    let mut bytes = fs::read(victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(victim, bytes).unwrap();

    let dev = w.add("bad", "cache", &["--read-only", "--readahead-chunks", "0"]);
    let expected = fs::read(&image).unwrap();
    let chunk = 512 << 10;
    let mut failed = Vec::new();
    for index in 0..expected.len() / chunk {
        let out = Command::new("dd")
            .arg(format!("if={}", dev.path.display()))
            .args(["bs=512k", "count=1", "iflag=direct", "status=none"])
            .arg(format!("skip={index}"))
            .output()
            .unwrap();
        if out.status.success() {
            assert!(
                out.stdout == expected[index * chunk..][..chunk],
                "chunk {index} read back wrong"
            );
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("Input/output error"),
                "chunk {index}: {stderr}"
            );
            failed.push(index);
        }
    }
    assert_eq!(failed.len(), 1, "failed chunks: {failed:?}");
    assert!(w.stat(dev.id, "integrity_failures") >= 1);
    w.del(&dev);
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn two_devices_of_two_images_at_once() {
    let w = UblkWorld::new();
    let images = [w.raw_image("one", 5, 16), w.raw_image("two", 6, 24)];
    let devs = [
        w.add("one", "cache1", &["--read-only"]),
        w.add("two", "cache2", &[]),
    ];
    assert_ne!(devs[0].id, devs[1].id);
    // Read both at once, so their requests interleave.
    let readers: Vec<_> = devs
        .iter()
        .map(|d| {
            let path = d.path.clone();
            std::thread::spawn(move || fs::read(path).unwrap())
        })
        .collect();
    for ((reader, image), dev) in readers.into_iter().zip(&images).zip(&devs) {
        let data = reader.join().unwrap();
        assert!(
            data == fs::read(image).unwrap(),
            "{} differs from {}",
            dev.path.display(),
            image.display()
        );
    }
    assert_eq!(w.device(devs[0].id)["name"], "one");
    assert_eq!(w.device(devs[1].id)["name"], "two");
    for dev in &devs {
        w.del(dev);
    }
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn del_all_leaves_no_device_behind() {
    let w = UblkWorld::new();
    w.raw_image("img", 7, 8);
    let devs = [
        w.add("img", "cache1", &["--read-only"]),
        w.add("img", "cache2", &[]),
        w.add("img", "cache3", &["--recoverable"]),
    ];
    // An orphan too: the recoverable device's process killed.
    let pid = w.device(devs[2].id)["pid"].as_u64().unwrap();
    run(Command::new("kill").args(["-KILL", &pid.to_string()]));
    wait_for("the device process to die", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert_eq!(w.device(devs[2].id)["state"], "orphaned");

    run(w.world.lazyblk().args(["del", "--all"]));
    for dev in &devs {
        assert!(!dev.path.exists(), "{} still exists", dev.path.display());
        assert!(
            !Path::new(&format!("/sys/class/ublk-char/ublkc{}", dev.id)).exists(),
            "ublkc{} still exists",
            dev.id
        );
    }
    let out = run(w.world.lazyblk().args(["list", "--json"]));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, serde_json::json!([]));
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn flattened_oci_image_serves_through_ublk() {
    use common::layout::{write_layout, Item};
    let w = UblkWorld::new();
    let files: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| {
            (
                format!("app/f{i:03}"),
                pseudo_random(i, [10, 5000, 70_000][i as usize % 3]),
            )
        })
        .collect();
    let mut base = vec![Item::Dir("app"), Item::Dir("etc")];
    base.extend(
        files
            .iter()
            .map(|(p, d)| Item::File(p.clone(), d.clone(), 0o644)),
    );
    base.push(Item::File("etc/gone".into(), b"gone".to_vec(), 0o644));
    base.push(Item::File(
        "etc/big".into(),
        pseudo_random(9, 8 << 20),
        0o755,
    ));
    let top = vec![
        Item::Whiteout("etc/gone"),
        Item::File("etc/config".into(), b"layer two\n".to_vec(), 0o600),
    ];
    let layout = write_layout(&w.world.path("layout"), &[base, top]);
    let out = run(w
        .world
        .with_store("push")
        .arg(format!("oci:{}:t", layout.display()))
        .args(["--name", "oci-app", "--free-space", "16M", "--json"]));
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(
        pushed["source_digest"],
        format!("sha256:{}", "0".repeat(64)),
        "{pushed}"
    );

    let dev = w.add("oci-app", "cache", &["--read-only"]);
    let root = w.mount(&dev, "root", "ro");
    for (path, data) in &files {
        assert!(
            fs::read(root.join(path)).unwrap() == *data,
            "bytes of {path}"
        );
    }
    assert_eq!(
        fs::read(root.join("etc/big")).unwrap(),
        pseudo_random(9, 8 << 20)
    );
    assert_eq!(fs::read(root.join("etc/config")).unwrap(), b"layer two\n");
    assert!(
        !root.join("etc/gone").exists(),
        "the whiteout was not applied"
    );
    assert_eq!(w.stat(dev.id, "integrity_failures"), 0);
    w.umount(&root);
    w.del(&dev);
}

/// Whether the running kernel's driver has feature `name`, as
/// `lazyblk features --json` reports it.
fn driver_has(w: &UblkWorld, name: &str) -> bool {
    let out = run(w.world.lazyblk().args(["features", "--json"]));
    let features: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    features
        .as_array()
        .expect("an array")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {features}"))["supported"]
        .as_bool()
        .expect("supported is a bool")
}

/// The mount points in a `/proc/PID/mountinfo`.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

/// A small ext4 image of the usual tree, pushed as `name`, and the tree.
fn ext4_image(w: &UblkWorld, name: &str) -> PathBuf {
    let tree = w.world.path(&format!("{name}-tree"));
    make_tree(&tree);
    let image = w.world.path(&format!("{name}.ext4"));
    make_ext4(&tree, &image, 96);
    w.world.push(&image, name);
    tree
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn del_refuses_a_mounted_device_where_the_kernel_can_and_force_stops_it() {
    let w = UblkWorld::new();
    let tree = ext4_image(&w, "busy");
    let dev = w.add("busy", "cache", &["--read-only"]);
    let root = w.mount(&dev, "root", "ro");
    let probe = Path::new("dir03/sub0/file001.bin");
    let id = dev.id.to_string();

    let refused = w.world.lazyblk().args(["del", "-n", &id]).output().unwrap();
    if driver_has(&w, "SAFE_STOP_DEV") {
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success(),
            "del of a mounted device: {refused:?}"
        );
        assert!(
            stderr.contains("--force") && stderr.contains("open"),
            "{stderr}"
        );
        assert!(dev.path.exists(), "a refused del removed the device");
        assert_eq!(w.device(dev.id)["state"], "live");
        // The device still serves its mount after the refusal.
        assert_eq!(
            sha256_file(&root.join(probe)),
            sha256_file(&tree.join(probe))
        );
        run(w.world.lazyblk().args(["del", "-n", &id, "--force"]));
    } else {
        // Without SAFE_STOP_DEV the driver cannot refuse: del stops it.
        assert!(
            refused.status.success(),
            "del without SAFE_STOP_DEV: {refused:?}"
        );
    }
    wait_for("the block device to go", Duration::from_secs(30), || {
        !dev.path.exists()
    });
    // The filesystem of a stopped device still unmounts.
    w.umount(&root);
    wait_for("the driver to free the id", Duration::from_secs(30), || {
        !Path::new(&format!("/sys/class/ublk-char/ublkc{}", dev.id)).exists()
    });
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn ublk_device_process_keeps_its_own_mounts_and_fuse_stays_in_the_hosts() {
    let w = UblkWorld::new();
    let tree = ext4_image(&w, "ns");
    let dev = w.add("ns", "cache", &["--read-only"]);
    let root = w.mount(&dev, "root", "ro");
    let device = w.device(dev.id);
    let pid = device["pid"].as_u64().unwrap();

    let ours = fs::read_link("/proc/self/ns/mnt").unwrap();
    let its = fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(
        its, ours,
        "the ublk device process shares our mount namespace"
    );
    let host_mounts = mount_points(&fs::read_to_string("/proc/self/mountinfo").unwrap());
    let its_mounts = mount_points(&fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap());
    assert!(
        host_mounts.contains(&root),
        "{} not mounted here",
        root.display()
    );
    assert!(
        !its_mounts.contains(&root),
        "the device process sees the mount of its own device"
    );
    // It serves that mount all the same.
    assert_eq!(file_hashes(&root), file_hashes(&tree));

    // Partition scans are skipped exactly where the driver can skip them.
    let flags = device["ublk"]["flags"]
        .as_u64()
        .expect("flags in the record");
    assert_eq!(
        flags & (1 << 18) != 0,
        driver_has(&w, "NO_AUTO_PART_SCAN"),
        "device flags {flags:#x}"
    );

    // A FUSE device's mount must be visible here, so it stays in our namespace.
    let fuse = w.world.add("ns", "fuse-cache", "fuse", true);
    let fuse_pid = w.world.device(&fuse)["pid"].as_u64().unwrap();
    assert_eq!(
        fs::read_link(format!("/proc/{fuse_pid}/ns/mnt")).unwrap(),
        ours
    );
    w.world.del(&fuse);

    w.umount(&root);
    w.del(&dev);
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn discards_free_chunks_without_fetching_them_and_read_back_as_zeros() {
    let w = UblkWorld::new();
    let image = w.raw_image("trim", 5, 64);
    let original = fs::read(&image).unwrap();
    let dev = w.add("trim", "cache", &[]);
    // A kernel without NO_AUTO_PART_SCAN reads the first sectors for a
    // partition table as the device appears, which fetches chunk 0.
    let before = w.stat(dev.id, "chunks_fetched");
    // The first 16 MiB: 32 whole chunks, at most one of them fetched yet.
    run(Command::new("blkdiscard")
        .args(["-o", "0", "-l", &(16u64 << 20).to_string()])
        .arg(&dev.path));
    assert!(w.stat(dev.id, "discard_requests") > 0);
    assert_eq!(
        w.stat(dev.id, "chunks_fetched"),
        before,
        "a discard fetched"
    );
    assert_eq!(w.stat(dev.id, "chunks_punched"), 32);
    let read = |dev: &Dev| {
        let mut bytes = vec![0u8; 32 << 20];
        fs::File::open(&dev.path)
            .unwrap()
            .read_exact(&mut bytes)
            .unwrap();
        bytes
    };
    let bytes = read(&dev);
    assert!(
        bytes[..16 << 20].iter().all(|&b| b == 0),
        "discarded chunks read back data"
    );
    assert!(bytes[16 << 20..] == original[16 << 20..32 << 20]);
    let fetched = w.stat(dev.id, "chunks_fetched");
    assert_eq!(
        fetched,
        before + 32,
        "only the chunks not discarded were fetched"
    );

    // After a restart on the same cache, still holes and still not fetched.
    w.del(&dev);
    let dev = w.add("trim", "cache", &[]);
    let again = read(&dev);
    assert!(again == bytes);
    assert_eq!(w.stat(dev.id, "chunks_fetched"), 0);
    w.del(&dev);
}

/// `len` bytes of `path` at `offset` with O_DIRECT: one request each (up to
/// the device's 512 KiB), straight to the driver, no page cache.
fn read_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // O_DIRECT wants an aligned buffer: the aligned part of a larger one.
    let mut raw = vec![0u8; len + 4096];
    let start = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[start..][..len];
    file.read_exact_at(buf, offset)
        .unwrap_or_else(|e| panic!("read {len} at {offset} of {}: {e}", path.display()));
    buf.to_vec()
}

fn drop_caches() {
    run(Command::new("sh").args(["-c", "sync; echo 3 >/proc/sys/vm/drop_caches"]));
}

#[test]
#[ignore = "needs /dev/ublk-control: run in the VM by scripts/vm-test.sh"]
fn warm_reads_are_zero_copy_where_the_driver_offers_it() {
    let w = UblkWorld::new();
    let auto_buf_reg = driver_has(&w, "AUTO_BUF_REG");
    let expected_mode = if auto_buf_reg { "zero-copy" } else { "copy" };

    // 16 MiB: 8 MiB of distinct chunks, then zero chunks.
    let image = w.raw_image("zc", 9, 16);
    let bytes = fs::read(&image).unwrap();
    let expected = sha256_file(&image);
    let dev = w.add("zc", "cache", &["--read-only"]);
    assert_eq!(
        w.device(dev.id)["ublk"]["copy_mode"],
        expected_mode,
        "{}",
        w.device(dev.id)
    );
    // Cold: every chunk fetched, served from the decrypted plaintext.
    assert_eq!(sha256_file(&dev.path), expected, "cold read");
    let fetched = w.stat(dev.id, "chunks_fetched");
    assert_eq!(fetched, 16, "the eight zero chunks are never fetched");
    // Warm, after the page cache of the block device is gone: every byte
    // comes from the cache file (in zero-copy mode straight into the
    // request's pages) or from zeros.
    drop_caches();
    let hits = w.stat(dev.id, "cache_hits");
    assert_eq!(sha256_file(&dev.path), expected, "warm read");
    assert_eq!(w.stat(dev.id, "chunks_fetched"), fetched);
    assert!(w.stat(dev.id, "cache_hits") > hits);
    // Requests that start inside a chunk and end in the next, so the
    // second piece lands mid-buffer; the last one from data into zeros.
    let chunk = 512 << 10;
    for (offset, len) in [
        (4096, 4096),
        (chunk - 4096, 8192),
        (3 * chunk + chunk / 2, chunk),
        (8 * (1 << 20) - chunk / 4, chunk / 2),
        (12 * (1 << 20) + 512, 3584),
    ] {
        let got = read_direct(&dev.path, offset as u64, len);
        assert!(
            got == bytes[offset..][..len],
            "{len} bytes at {offset} read back wrong"
        );
    }
    w.del(&dev);
}
