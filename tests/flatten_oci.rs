//! `lazyblk flatten` and `lazyblk push` on OCI layouts made by umoci, checked
//! against `umoci unpack` of the same layout (an independent implementation
//! of layer application), e2fsck, a read-only loop mount and, after a push,
//! the FUSE frontend.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    assert_identical_trees, pseudo_random, require_kernel_prerequisites, run, run_failing, World,
};

/// umoci on the layout at `layout`, tag `t`.
fn umoci(layout: &Path, verb: &str, bundle: &Path) {
    run(Command::new("umoci")
        .args([verb, "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(bundle));
}

/// A layout of two layers: a base with every kind umoci records (a large
/// file, setuid, a hard link, symlinks, a fifo, a device, xattrs incl.
/// `security.capability`, a fractional mtime) and a layer that deletes a
/// file and a directory's contents, adds files and links one across layers.
fn build_layout(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci")
        .args(["new", "--image"])
        .arg(format!("{}:t", layout.display())));

    umoci(&layout, "unpack", &bundle);
    let root = bundle.join("rootfs");
    for d in ["etc", "usr/bin", "var/lib/app"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("etc/hello"), "hello\n").unwrap();
    fs::hard_link(root.join("etc/hello"), root.join("etc/hello-hard")).unwrap();
    symlink("../etc/hello", root.join("usr/hello-link")).unwrap();
    symlink("/nonexistent/loop", root.join("usr/dangling")).unwrap();
    fs::write(root.join("usr/bin/tool"), pseudo_random(1, 5 << 20)).unwrap();
    fs::set_permissions(
        root.join("usr/bin/tool"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    run(Command::new("setfattr")
        .args([
            "-n",
            "security.capability",
            "-v",
            "0sAQAAAgAgAAAAAAAAAAAAAAAAAAA=",
        ])
        .arg(root.join("usr/bin/tool")));
    run(Command::new("setfattr")
        .args(["-n", "user.note", "-v", "a note"])
        .arg(root.join("etc/hello")));
    run(Command::new("mkfifo").arg(root.join("etc/fifo")));
    run(Command::new("mknod")
        .arg(root.join("etc/null"))
        .args(["c", "1", "3"]));
    for i in 0..300 {
        let size = [0, 10, 4096, 70_000][i % 4];
        fs::write(
            root.join(format!("var/lib/app/f{i:03}")),
            pseudo_random(i as u64, size),
        )
        .unwrap();
    }
    run(Command::new("touch")
        .args(["-h", "-d", "2020-01-02 03:04:05.123456789"])
        .arg(root.join("usr/hello-link")));
    umoci(&layout, "repack", &bundle);
    fs::remove_dir_all(&bundle).unwrap();

    umoci(&layout, "unpack", &bundle);
    let root = bundle.join("rootfs");
    fs::remove_file(root.join("etc/fifo")).unwrap();
    fs::remove_dir_all(root.join("var/lib/app")).unwrap();
    fs::create_dir(root.join("var/lib/app")).unwrap();
    fs::write(root.join("var/lib/app/fresh"), "fresh\n").unwrap();
    fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-again")).unwrap();
    umoci(&layout, "repack", &bundle);
    fs::remove_dir_all(&bundle).unwrap();
    layout
}

fn flatten(world: &World, source: &str, out: &Path) -> serde_json::Value {
    let output = run(world
        .lazyblk()
        .arg("flatten")
        .arg(source)
        .arg("-o")
        .arg(out)
        .args(["--free-space", "32M", "--json"]));
    serde_json::from_slice(&output.stdout).expect("flatten --json prints JSON")
}

fn fsck(image: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(image));
}

#[test]
fn oci_layout_flattens_like_umoci_unpack_and_serves_through_fuse() {
    require_kernel_prerequisites();
    let world = World::new();
    let layout = build_layout(&world.path("oci"));
    let source = format!("oci:{}:t", layout.display());
    let expected = world.path("unpacked");
    umoci(&layout, "unpack", &expected);
    let expected = expected.join("rootfs");

    let image = world.path("image.ext4");
    let report = flatten(&world, &source, &image);
    assert_eq!(report["layers"], 2, "{report}");
    fsck(&image);
    let mounted = world.mount_image(&image, "mnt", true);
    let compared = assert_identical_trees(&expected, &mounted);
    world.umount(&mounted);
    assert!(compared > 10, "compared only {compared} entries");

    // Same input, another umask, time zone and locale: the same bytes.
    let again = world.path("again.ext4");
    run(Command::new("sh")
        .arg("-c")
        .arg(r#"umask 077; exec "$0" flatten "$1" -o "$2" --free-space 32M"#)
        .arg(common::lazyblk_bin())
        .arg(&source)
        .arg(&again)
        .env("TZ", "Pacific/Kiritimati")
        .env("LC_ALL", "C.UTF-8"));
    assert!(
        fs::read(&image).unwrap() == fs::read(&again).unwrap(),
        "rebuild differs"
    );
    // An existing output is never replaced.
    run_failing(
        world
            .lazyblk()
            .arg("flatten")
            .arg(&source)
            .arg("-o")
            .arg(&again),
        "already exists",
    );
    assert!(fs::read(&image).unwrap() == fs::read(&again).unwrap());

    // push flattens the source itself, in one pass with no image file, and
    // records the image's digest; what it stores is the flattened image.
    let output = run(world.with_store("push").arg(&source).args([
        "--name",
        "app",
        "--free-space",
        "32M",
        "--json",
    ]));
    let pushed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(pushed["source_digest"], report["source_digest"], "{pushed}");
    assert_eq!(pushed["image_bytes"], report["image_size"], "{pushed}");
    let exported = world.path("exported.ext4");
    run(world
        .with_store("export")
        .args(["--name", "app", "--out"])
        .arg(&exported));
    assert!(
        fs::read(&image).unwrap() == fs::read(&exported).unwrap(),
        "the streamed push stored another image than flatten writes"
    );
    let from_file = world.push(&image, "from-file");
    assert_eq!(from_file["chunks_uploaded"], 0, "{from_file}");
    assert_eq!(
        from_file["chunks_zero"], pushed["chunks_zero"],
        "{from_file}"
    );

    let fuse = world.add("app", "cache", "fuse", true);
    let served = world.mount_loop(&fuse, "served", true);
    assert_identical_trees(&expected, &served);
    world.umount(&served);
    world.del(&fuse);
}

#[test]
fn a_tampered_layer_fails_naming_it_and_leaves_no_image() {
    require_kernel_prerequisites();
    let world = World::new();
    let layout = build_layout(&world.path("oci"));
    // Flip one byte in the middle of the largest blob (the base layer).
    let blob = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let digest = blob.file_name().unwrap().to_str().unwrap().to_owned();
    let mut bytes = fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&blob, bytes).unwrap();

    let out = world.path("image.ext4");
    run_failing(
        world
            .lazyblk()
            .arg("flatten")
            .arg(format!("oci:{}:t", layout.display()))
            .arg("-o")
            .arg(&out),
        &digest[..12],
    );
    assert!(!out.exists(), "a failed flatten left {}", out.display());
    let partial = world.path(".image.ext4.partial");
    assert!(
        !partial.exists(),
        "a failed flatten left {}",
        partial.display()
    );

    // A streamed push fails the same way and stores no manifest.
    run_failing(
        world
            .with_store("push")
            .arg(format!("oci:{}:t", layout.display()))
            .args(["--name", "app"]),
        &digest[..12],
    );
    run_failing(
        world
            .with_store("export")
            .args(["--name", "app", "--out"])
            .arg(world.path("out")),
        "not found",
    );
}

/// A layout written without umoci (as the VM tests do), whose second layer
/// deletes a file and a directory and replaces a file.
#[test]
fn a_written_layout_flattens_with_its_whiteouts_applied() {
    use common::layout::{write_layout, Item};
    require_kernel_prerequisites();
    let world = World::new();
    let layout = write_layout(
        &world.path("layout"),
        &[
            vec![
                Item::Dir("etc"),
                Item::File("etc/keep".into(), b"keep".to_vec(), 0o644),
                Item::File("etc/gone".into(), b"gone".to_vec(), 0o600),
                Item::Dir("data"),
                Item::File("data/big".into(), pseudo_random(3, 3 << 20), 0o755),
                Item::Symlink("etc/link", "keep", 0o777),
            ],
            vec![
                Item::Whiteout("etc/gone"),
                Item::Whiteout("data"),
                Item::File("etc/keep".into(), b"replaced".to_vec(), 0o640),
            ],
        ],
    );
    let image = world.path("image.ext4");
    flatten(&world, &format!("oci:{}:t", layout.display()), &image);
    fsck(&image);
    let mounted = world.mount_image(&image, "mnt", true);
    let etc: Vec<_> = fs::read_dir(mounted.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let keep = fs::read(mounted.join("etc/keep"));
    let mode = fs::metadata(mounted.join("etc/keep")).map(|m| m.permissions().mode());
    let data_exists = mounted.join("data").exists();
    world.umount(&mounted);
    let mut etc = etc;
    etc.sort();
    assert_eq!(etc, ["keep", "link"]);
    assert_eq!(keep.unwrap(), b"replaced");
    assert_eq!(mode.unwrap() & 0o7777, 0o640);
    assert!(!data_exists, "a whited-out directory survived");
}

/// A layer may give a symlink any mode in its header; Linux creates every
/// symlink 0777, and so do `umoci unpack`, `tar -x` and Docker. The image
/// must show what they show, for fast (in the inode) and slow (in a block)
/// symlinks alike, setuid bits included.
#[test]
fn symlinks_are_0777_whatever_the_header_says_like_umoci_unpack() {
    use common::layout::{write_layout, Item};
    use std::os::unix::fs::MetadataExt;
    require_kernel_prerequisites();
    let world = World::new();
    let slow_target: &'static str =
        "../etc/keep/././././././././././././././././././././././././././.";
    assert!(
        slow_target.len() > 60,
        "the slow link must not fit in the inode"
    );
    let layout = write_layout(
        &world.path("layout"),
        &[vec![
            Item::Dir("etc"),
            Item::File("etc/keep".into(), b"keep".to_vec(), 0o644),
            Item::Symlink("etc/fast", "keep", 0o644),
            Item::Symlink("etc/slow", slow_target, 0o4600),
        ]],
    );
    let expected = world.path("unpacked");
    umoci(&layout, "unpack", &expected);
    let expected = expected.join("rootfs");

    let image = world.path("image.ext4");
    flatten(&world, &format!("oci:{}:t", layout.display()), &image);
    fsck(&image);
    let mounted = world.mount_image(&image, "mnt", true);
    let modes: Vec<u32> = ["etc/fast", "etc/slow"]
        .iter()
        .map(|l| fs::symlink_metadata(mounted.join(l)).unwrap().mode())
        .collect();
    let compared = assert_identical_trees(&expected, &mounted);
    world.umount(&mounted);
    assert_eq!(compared, 4);
    assert_eq!(modes, [0o120777, 0o120777]);
}
