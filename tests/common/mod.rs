//! Shared fixtures for the kernel-facing integration tests: the real
//! `lazyblk` binary, real ext4 images from `mkfs.ext4 -d`, FUSE and loop mounts.
//!
//! These tests need root, /dev/fuse, loop devices, `fusermount3` and
//! e2fsprogs (`scripts/install-deps.sh` installs them). A missing
//! prerequisite fails the test with a message saying what is missing.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

pub mod fault_proxy;
pub mod layout;
pub mod nbd;
pub mod seaweedfs;
pub mod serve;
pub mod tls;

pub const MARKER: &str = "LAZYBLK-PLAINTEXT-MARKER-6b1f0c2e";

/// Panics with a clear message unless this host can run the kernel tests.
pub fn require_kernel_prerequisites() {
    let euid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    assert_eq!(euid, 0, "kernel integration tests need root (loop mounts)");
    for path in ["/dev/fuse", "/dev/loop-control"] {
        assert!(
            Path::new(path).exists(),
            "kernel integration tests need {path}"
        );
    }
    for tool in ["fusermount3", "mkfs.ext4", "e2fsck", "mount", "umount"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "kernel integration tests need `{tool}` (run scripts/install-deps.sh)"
        );
    }
}

/// The binary under test: `LAZYBLK_BIN` when set (a test binary run away
/// from its build tree, as in the VM), else the one cargo built with the tests.
pub fn lazyblk_bin() -> PathBuf {
    std::env::var_os("LAZYBLK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lazyblk")))
}

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a command that must fail, and checks that its error says `needle`.
pub fn run_failing(cmd: &mut Command, needle: &str) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{cmd:?} succeeded");
    assert!(
        stderr.contains(needle),
        "{cmd:?}: no {needle:?} in: {stderr}"
    );
}

/// One test's world: its own store, key, run directory and mounts, torn
/// down on drop even when the test fails.
pub struct World {
    pub dir: TempDir,
    mounts: std::cell::RefCell<Vec<PathBuf>>,
    /// The `--store` commands get, when not the world's directory store.
    store_spec: std::cell::RefCell<Option<String>>,
}

impl World {
    pub fn new() -> World {
        require_kernel_prerequisites();
        let world = World {
            dir: tempfile::tempdir().expect("tempdir"),
            mounts: Default::default(),
            store_spec: Default::default(),
        };
        fs::create_dir_all(world.run_dir()).unwrap();
        run(world.lazyblk().args(["keygen", "--out"]).arg(world.key()));
        world
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn key(&self) -> PathBuf {
        self.path("tenant.key")
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path("run")
    }

    /// The binary under test, with this world's run directory.
    pub fn lazyblk(&self) -> Command {
        let mut cmd = Command::new(lazyblk_bin());
        cmd.env("LAZYBLK_RUN_DIR", self.run_dir());
        cmd
    }

    /// From now on, commands name `spec` as their store (a chunk server's
    /// URL, say) instead of the world's directory store.
    pub fn use_store(&self, spec: &str) {
        *self.store_spec.borrow_mut() = Some(spec.to_owned());
    }

    /// `lazyblk VERB --store STORE --key KEY`, for this world's store and key.
    pub fn with_store(&self, verb: &str) -> Command {
        let store = match &*self.store_spec.borrow() {
            Some(spec) => spec.into(),
            None => self.store().into_os_string(),
        };
        let mut cmd = self.lazyblk();
        cmd.arg(verb)
            .arg("--store")
            .arg(store)
            .arg("--key")
            .arg(self.key());
        cmd
    }

    pub fn push(&self, image: &Path, name: &str) -> serde_json::Value {
        let out = run(self
            .with_store("push")
            .arg(image)
            .args(["--name", name, "--json"]));
        serde_json::from_slice(&out.stdout).expect("push --json prints JSON")
    }

    /// `add --fuse` at a fresh mountpoint; returns the mountpoint.
    pub fn add(&self, name: &str, cache: &str, mountpoint: &str, read_only: bool) -> PathBuf {
        self.add_with(name, cache, mountpoint, read_only, &[])
    }

    /// [`World::add`] with extra `add` arguments.
    pub fn add_with(
        &self,
        name: &str,
        cache: &str,
        mountpoint: &str,
        read_only: bool,
        extra: &[&str],
    ) -> PathBuf {
        let mnt = self.path(mountpoint);
        fs::create_dir_all(&mnt).unwrap();
        let mut cmd = self.with_store("add");
        cmd.args(["--name", name])
            .arg("--cache-dir")
            .arg(self.path(cache))
            .arg("--fuse")
            .arg(&mnt);
        if read_only {
            cmd.arg("--read-only");
        }
        cmd.args(extra);
        run(&mut cmd);
        self.mounts.borrow_mut().push(mnt.clone());
        mnt
    }

    pub fn del(&self, mnt: &Path) {
        run(self.lazyblk().arg("del").arg("--fuse").arg(mnt));
        self.mounts.borrow_mut().retain(|m| m != mnt);
    }

    /// The device at `mnt` as `lazyblk list --json` reports it.
    pub fn device(&self, mnt: &Path) -> serde_json::Value {
        let out = run(self.lazyblk().args(["list", "--json"]));
        let devices: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("list --json prints JSON");
        let mnt = mnt.canonicalize().unwrap();
        devices
            .as_array()
            .expect("an array")
            .iter()
            .find(|d| d["target"].as_str() == Some(mnt.to_str().unwrap()))
            .unwrap_or_else(|| panic!("no device at {} in {devices}", mnt.display()))
            .clone()
    }

    /// SIGKILLs the device at `mnt`, waits for it to die and detaches its
    /// dead FUSE mount.
    pub fn kill_device(&self, mnt: &Path) {
        let pid = self.device(mnt)["pid"]
            .as_u64()
            .expect("a device has a pid");
        run(Command::new("kill").args(["-KILL", &pid.to_string()]));
        while Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.forget_mount(mnt);
    }

    /// Detaches the FUSE mount at `mnt`, whose device process is dead.
    pub fn forget_mount(&self, mnt: &Path) {
        run(Command::new("umount").arg("-l").arg(mnt));
        self.mounts.borrow_mut().retain(|m| m != mnt);
    }

    /// Loop-mounts `MNT/disk` at a fresh directory.
    pub fn mount_loop(&self, fuse_mnt: &Path, at: &str, read_only: bool) -> PathBuf {
        self.mount_image(&fuse_mnt.join("disk"), at, read_only)
    }

    /// Loop-mounts the image file `image` at a fresh directory, unmounted
    /// when the world ends if not before.
    pub fn mount_image(&self, image: &Path, at: &str, read_only: bool) -> PathBuf {
        let target = self.path(at);
        fs::create_dir_all(&target).unwrap();
        let options = if read_only { "loop,ro" } else { "loop" };
        run(Command::new("mount")
            .args(["-o", options])
            .arg(image)
            .arg(&target));
        self.mounts.borrow_mut().push(target.clone());
        target
    }

    pub fn umount(&self, target: &Path) {
        run(Command::new("umount").arg(target));
        self.mounts.borrow_mut().retain(|m| m != target);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Innermost mounts first: loop-mounted filesystems, then FUSE.
        for mnt in self.mounts.borrow().iter().rev() {
            let _ = Command::new("umount").arg(mnt).output();
            let _ = Command::new(lazyblk_bin())
                .env("LAZYBLK_RUN_DIR", self.run_dir())
                .arg("del")
                .arg("--fuse")
                .arg(mnt)
                .output();
            let _ = Command::new("umount").arg("-l").arg(mnt).output();
        }
    }
}

/// A deterministic byte stream, so failures reproduce.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A tree of a few hundred files of assorted sizes, nested directories,
/// symlinks, a large file and the plaintext marker.
pub fn make_tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    for d in 0..12 {
        let dir = root.join(format!("dir{d:02}/sub{}", d % 3));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..25 {
            let size = [0, 1, 100, 4095, 4096, 5000, 70_000, 300_000][(d + f) % 8];
            let path = dir.join(format!("file{f:03}.bin"));
            fs::write(&path, pseudo_random((d * 100 + f) as u64, size)).unwrap();
            fs::set_permissions(
                &path,
                fs::Permissions::from_mode([0o644, 0o600, 0o755, 0o640][f % 4]),
            )
            .unwrap();
        }
        symlink(
            format!("sub{}/file000.bin", d % 3),
            root.join(format!("dir{d:02}/link")),
        )
        .unwrap();
    }
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::write(root.join("large.bin"), pseudo_random(7, 24 << 20)).unwrap();
    fs::write(root.join("marker.txt"), MARKER.repeat(64)).unwrap();
}

/// `mkfs.ext4 -d tree` into an image of `size_mib`.
pub fn make_ext4(tree: &Path, image: &Path, size_mib: u64) {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(tree)
        .arg(image)
        .arg(format!("{size_mib}M")));
}

/// Asserts that every entry of `expected` is in `actual` with the same
/// type, permissions, owner, size, mtime, bytes or link target; returns how
/// many entries were compared.
pub fn assert_same_tree(expected: &Path, actual: &Path) -> usize {
    compare_trees(expected, actual, false)
}

/// Asserts that `expected` and `actual` hold the same entries, no more and
/// no fewer (a `lost+found` at the root of `actual` aside), each with the
/// same type, permissions, owner, mtime to the nanosecond, link count,
/// device number, extended attributes and bytes or link target. Returns how
/// many entries were compared.
pub fn assert_identical_trees(expected: &Path, actual: &Path) -> usize {
    compare_trees(expected, actual, true)
}

/// The walk behind both: `identical` asks for the same entry lists and the
/// metadata only a faithful copy keeps.
fn compare_trees(expected: &Path, actual: &Path, identical: bool) -> usize {
    let names = |dir: &Path| -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
            .map(|entry| entry.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let mut checked = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let expected_names = names(&expected.join(&rel));
        if identical {
            let mut actual_names = names(&actual.join(&rel));
            if rel.as_os_str().is_empty() {
                actual_names.retain(|name| name != "lost+found");
            }
            assert_eq!(
                expected_names,
                actual_names,
                "entries of /{}",
                rel.display()
            );
        }
        for name in expected_names {
            let rel = rel.join(name);
            let (e, a) = (expected.join(&rel), actual.join(&rel));
            let em = fs::symlink_metadata(&e).unwrap();
            let am =
                fs::symlink_metadata(&a).unwrap_or_else(|err| panic!("{}: {err}", a.display()));
            let what = rel.display();
            assert_eq!(em.file_type(), am.file_type(), "type of {what}");
            assert_eq!(em.mode(), am.mode(), "mode of {what}");
            assert_eq!(
                (em.uid(), em.gid()),
                (am.uid(), am.gid()),
                "owner of {what}"
            );
            if identical {
                assert_eq!(
                    (em.mtime(), em.mtime_nsec()),
                    (am.mtime(), am.mtime_nsec()),
                    "mtime of {what}"
                );
                assert_eq!(em.nlink(), am.nlink(), "link count of {what}");
                assert_eq!(em.rdev(), am.rdev(), "device number of {what}");
                assert_eq!(xattrs(&e), xattrs(&a), "xattrs of {what}");
            }
            if em.is_dir() {
                stack.push(rel);
            } else if em.file_type().is_symlink() {
                assert_eq!(
                    fs::read_link(&e).unwrap(),
                    fs::read_link(&a).unwrap(),
                    "{what}"
                );
            } else if em.is_file() {
                if !identical {
                    assert_eq!(em.len(), am.len(), "size of {what}");
                    assert_eq!(em.mtime(), am.mtime(), "mtime of {what}");
                }
                assert!(
                    fs::read(&e).unwrap() == fs::read(&a).unwrap(),
                    "bytes of {what}"
                );
            }
            checked += 1;
        }
    }
    checked
}

/// Every extended attribute of `path` (not following a symlink), sorted.
pub fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 64 << 10];
    let len = rustix::fs::llistxattr(path, &mut names[..]).unwrap();
    let mut all: Vec<_> = names[..len]
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let c_name = std::ffi::CString::new(name).unwrap();
            let mut value = vec![0u8; 64 << 10];
            let n = rustix::fs::lgetxattr(path, c_name.as_c_str(), &mut value[..]).unwrap();
            (name.to_vec(), value[..n].to_vec())
        })
        .collect();
    all.sort();
    all
}
