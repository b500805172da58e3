//! The flattener against the real kernel and e2fsck: generated layers that
//! cover every entry kind and every layer rule are flattened, checked with
//! `e2fsck -fn`, loop-mounted read-only and compared path by path with an
//! independent model, mounted read-write and written to, and rebuilt in
//! another environment and order to the same bytes.
//!
//! Needs root, loop devices and e2fsprogs; a missing prerequisite fails.

mod common;
mod flatten_support;

use std::fs;
use std::process::Command;

use flatten_support::*;
use lazyblk::flatten::{FlattenError, FlattenOptions, Flattener};
use lazyblk::oci::entry::{EntryKind, LayerEntry};

fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Three layers exercising every kind and rule.
fn fixture() -> Layers {
    let t = 1_700_000_000;
    let mut l0 = vec![
        dir("", 0o755, t),
        dir("etc", 0o755, t + 1),
        file(
            "etc/hostname",
            b"base\n".to_vec(),
            meta(0o644, 0, 0, t, 123_456_789),
        ),
        file("etc/empty", Vec::new(), meta(0o600, 7, 8, t, 1)),
        file("etc/block", bytes(1, 4096), meta(0o644, 0, 0, t, 0)),
        file(
            "etc/odd",
            bytes(2, 70_001),
            meta(0o640, 1000, 1000, -86_400 * 365, 5),
        ),
        file(
            "etc/future",
            bytes(3, 10),
            meta(0o644, 0, 0, (1i64 << 32) + 77, 999_999_999),
        ),
        with_xattrs(
            file("bin/ping", bytes(4, 9000), meta(0o4755, 0, 0, t, 0)),
            vec![
                (
                    "security.capability",
                    vec![
                        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                ),
                ("user.small", b"v".to_vec()),
            ],
        ),
        with_xattrs(
            file("etc/bigattr", b"x".to_vec(), meta(0o644, 0, 0, t, 0)),
            vec![("user.big", bytes(5, 1500)), ("trusted.t", b"tt".to_vec())],
        ),
        with_xattrs(
            file("etc/acl", b"acl".to_vec(), meta(0o640, 0, 0, t, 0)),
            vec![(
                "system.posix_acl_access",
                acl(&[
                    (1, 6, u32::MAX),
                    (2, 4, 1000),
                    (4, 4, u32::MAX),
                    (0x10, 4, u32::MAX),
                    (0x20, 0, u32::MAX),
                ]),
            )],
        ),
        dir("tmp", 0o1777, t),
        ent(
            "usr/lib/deep/er/x",
            EntryKind::Symlink {
                target: b"../../../../etc/hostname".to_vec(),
            },
            meta(0o777, 0, 0, t, 0),
        ),
        ent(
            "usr/long",
            EntryKind::Symlink {
                target: vec![b'a'; 300],
            },
            meta(0o777, 5, 5, t, 0),
        ),
        ent(
            "usr/edge59",
            EntryKind::Symlink {
                target: vec![b'b'; 59],
            },
            meta(0o777, 0, 0, t, 0),
        ),
        ent(
            "usr/edge60",
            EntryKind::Symlink {
                target: vec![b'c'; 60],
            },
            meta(0o777, 0, 0, t, 0),
        ),
        ent(
            "usr/loop",
            EntryKind::Symlink {
                target: b"loop".to_vec(),
            },
            meta(0o777, 0, 0, t, 0),
        ),
        ent(
            "dev/null",
            EntryKind::CharDevice { major: 1, minor: 3 },
            meta(0o666, 0, 0, t, 0),
        ),
        ent(
            "dev/big",
            EntryKind::BlockDevice {
                major: 259,
                minor: 70_000,
            },
            meta(0o660, 0, 6, t, 0),
        ),
        ent("dev/fifo", EntryKind::Fifo, meta(0o600, 0, 0, t, 0)),
        sparse(
            "data/holes",
            3 << 20,
            vec![(0, bytes(6, 100)), (2 << 20, bytes(7, 5000))],
            meta(0o644, 0, 0, t, 0),
        ),
        file("data/zero", vec![0u8; 100_000], meta(0o644, 0, 0, t, 0)),
        file(
            "data/fragmented",
            (0..40)
                .flat_map(|i| {
                    if i % 2 == 0 {
                        bytes(i, 4096)
                    } else {
                        vec![0; 4096]
                    }
                })
                .collect(),
            meta(0o644, 0, 0, t, 0),
        ),
        file("old/a", b"a".to_vec(), meta(0o644, 0, 0, t, 0)),
        file("old/sub/b", b"b".to_vec(), meta(0o644, 0, 0, t, 0)),
        file("opq/lower", b"lower".to_vec(), meta(0o644, 0, 0, t, 0)),
        file("opq/keep/lower2", b"l2".to_vec(), meta(0o644, 0, 0, t, 0)),
        file("replace/me", b"v1".to_vec(), meta(0o644, 0, 0, t, 0)),
        file("replace/kind", b"file".to_vec(), meta(0o644, 0, 0, t, 0)),
        dir("replace/dir", 0o700, t),
        file("replace/dir/child", b"c".to_vec(), meta(0o644, 0, 0, t, 0)),
        ent(
            "links/one",
            EntryKind::HardLink {
                target: p("etc/hostname"),
            },
            meta(0, 0, 0, 0, 0),
        ),
        ent(
            "links/two",
            EntryKind::HardLink {
                target: p("etc/hostname"),
            },
            meta(0, 0, 0, 0, 0),
        ),
    ];
    // A directory big enough for a two-level hashed index.
    for i in 0..1500 {
        l0.push(ent(
            &format!("many/entry-with-a-longish-name-{i:06}"),
            EntryKind::Fifo,
            meta(0o644, 0, 0, t, 0),
        ));
    }
    let l1 = vec![
        ent("old", EntryKind::Whiteout, meta(0, 0, 0, 0, 0)),
        ent("missing", EntryKind::Whiteout, meta(0, 0, 0, 0, 0)),
        file("opq/new", b"new".to_vec(), meta(0o644, 0, 0, t, 0)),
        ent("opq", EntryKind::OpaqueDirectory, meta(0, 0, 0, 0, 0)),
        file("opq/keep/upper", b"u".to_vec(), meta(0o644, 0, 0, t, 0)),
        file(
            "replace/me",
            b"version two\n".to_vec(),
            meta(0o600, 1, 1, t + 5, 0),
        ),
        ent(
            "replace/kind",
            EntryKind::Symlink {
                target: b"me".to_vec(),
            },
            meta(0o777, 0, 0, t, 0),
        ),
        dir("replace/dir", 0o750, t + 9),
        ent(
            "links/cross",
            EntryKind::HardLink {
                target: p("etc/block"),
            },
            meta(0, 0, 0, 0, 0),
        ),
        ent("links/two", EntryKind::Whiteout, meta(0, 0, 0, 0, 0)),
        ent(
            "many/entry-with-a-longish-name-000007",
            EntryKind::Whiteout,
            meta(0, 0, 0, 0, 0),
        ),
        file("many/added", b"added".to_vec(), meta(0o644, 0, 0, t, 0)),
        file(
            "etc/hostname",
            b"changed\n".to_vec(),
            meta(0o644, 0, 0, t + 3, 0),
        ),
    ];
    let l2 = vec![
        file("late/file", bytes(9, 5000), meta(0o644, 0, 0, t, 0)),
        ent("late/file", EntryKind::Whiteout, meta(0, 0, 0, 0, 0)),
        dir("etc", 0o700, t + 100),
        ent(
            "links/three",
            EntryKind::HardLink {
                target: p("links/cross"),
            },
            meta(0, 0, 0, 0, 0),
        ),
    ];
    vec![l0, l1, l2]
}

#[test]
fn every_kind_and_rule_mounts_and_matches_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.ext4");
    let layers = fixture();
    let report = build_with(
        &layers,
        &image,
        FlattenOptions {
            free_space: 64 << 20,
        },
    );
    assert_eq!(report.layers, 3);
    fsck(&image);
    let model = Model::of(&layers);
    assert!(
        model
            .paths
            .contains_key(&vec![b"late".to_vec(), b"file".to_vec()]),
        "a same-layer whiteout hides nothing"
    );
    {
        let m = Mount::new(&image, true);
        let n = check(m.path(), &model);
        assert!(n > 1500, "compared {n} paths");
    }
    // Read-write: the kernel changes the image, e2fsck still finds it clean.
    {
        let m = Mount::new(&image, false);
        let root = m.path();
        fs::write(root.join("etc/new"), bytes(10, 3 << 20)).unwrap();
        fs::write(root.join("replace/me"), b"rewritten").unwrap();
        fs::remove_dir_all(root.join("opq")).unwrap();
        fs::create_dir(root.join("grow")).unwrap();
        for i in 0..3000 {
            fs::write(root.join(format!("grow/f{i}")), b"x").unwrap();
        }
        for i in 0..200 {
            fs::write(root.join(format!("many/more-{i}")), b"y").unwrap();
        }
        fs::remove_file(root.join("many/entry-with-a-longish-name-000100")).unwrap();
        fs::rename(root.join("etc/odd"), root.join("tmp/odd")).unwrap();
        rustix::fs::lsetxattr(
            root.join("etc/bigattr"),
            "user.more",
            &[1u8; 300],
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        assert_eq!(fs::read(root.join("many/added")).unwrap(), b"added");
        assert!(fs::symlink_metadata(root.join("many/entry-with-a-longish-name-000007")).is_err());
    }
    fsck(&image);
}

#[test]
fn rebuilds_are_byte_identical_across_environments_and_entry_orders() {
    if let Ok(out) = std::env::var("LAZYBLK_FLATTEN_CHILD_OUT") {
        // The child: another umask, time zone and locale, entries in
        // another order where the spec says order does not matter.
        let mut layers = fixture();
        for layer in &mut layers {
            let (data, mut rest): (Vec<In>, Vec<In>) =
                layer.drain(..).partition(|i| i.data.is_some());
            let (links, mut others): (Vec<In>, Vec<In>) = rest
                .drain(..)
                .partition(|i| matches!(i.entry.kind, EntryKind::HardLink { .. }));
            others.reverse();
            // Data keeps its order (it decides placement); everything else
            // moves: reversed, directories after their children, markers
            // after the entries they hide, links last.
            let mut merged = Vec::new();
            let mut o = others.into_iter();
            for d in data {
                merged.extend(o.next());
                merged.push(d);
            }
            merged.extend(o);
            merged.extend(links);
            *layer = merged;
        }
        build(&layers, std::path::Path::new(&out));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.ext4");
    let b = dir.path().join("b.ext4");
    let report = build(&fixture(), &a);
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg("umask 077; exec \"$0\" --exact rebuilds_are_byte_identical_across_environments_and_entry_orders --test-threads 1")
        .arg(exe)
        .env("LAZYBLK_FLATTEN_CHILD_OUT", &b)
        .env("TZ", "Pacific/Kiritimati")
        .env("LC_ALL", "tr_TR.UTF-8")
        .status()
        .unwrap();
    assert!(status.success(), "the child build failed");
    let (x, y) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
    assert_eq!(x.len(), y.len());
    let first = x.iter().zip(&y).position(|(p, q)| p != q);
    assert_eq!(first, None, "images differ first at byte {first:?}");
    assert_eq!(report.image_size, x.len() as u64);
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&x))
    );
    assert_eq!(report.digest, Some(digest));
}

#[test]
fn files_past_4_gib_keep_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.ext4");
    let size = (4u64 << 30) + 12_345;
    let layers = vec![vec![sparse(
        "big",
        size,
        vec![
            (0, bytes(1, 10_000)),
            (1 << 30, bytes(2, 4096)),
            ((4u64 << 30) - 100, bytes(3, 12_445)),
        ],
        meta(0o644, 0, 0, 1, 0),
    )]];
    let report = build_with(
        &layers,
        &image,
        FlattenOptions {
            free_space: 1 << 20,
        },
    );
    assert!(
        report.image_size < 64 << 20,
        "holes take no blocks: {}",
        report.image_size
    );
    fsck(&image);
    let m = Mount::new(&image, true);
    check(m.path(), &Model::of(&layers));
}

#[test]
fn bad_entries_fail_naming_layer_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("x"))
        .unwrap();
    let mut f = Flattener::new(out, FlattenOptions::default()).unwrap();
    f.begin_layer("sha256:abc").unwrap();
    let link = LayerEntry {
        path: p("a"),
        kind: EntryKind::HardLink {
            target: p("nowhere"),
        },
        meta: meta(0, 0, 0, 0, 0),
    };
    let err = f.apply(link, &mut std::io::empty()).unwrap_err();
    assert!(matches!(err, FlattenError::LinkTargetMissing { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("sha256:abc") && msg.contains("/a") && msg.contains("/nowhere"),
        "{msg}"
    );
    assert!(matches!(f.end_layer(), Err(FlattenError::Poisoned)));

    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("y"))
        .unwrap();
    let mut f = Flattener::new(out, FlattenOptions::default()).unwrap();
    f.begin_layer("l").unwrap();
    let short = LayerEntry {
        path: p("f"),
        kind: EntryKind::Regular { size: 10 },
        meta: meta(0o644, 0, 0, 0, 0),
    };
    let err = f.apply(short, &mut &b"12345"[..]).unwrap_err();
    assert!(
        matches!(
            err,
            FlattenError::ShortData {
                got: 5,
                size: 10,
                ..
            }
        ),
        "{err}"
    );

    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("z"))
        .unwrap();
    let mut f = Flattener::new(out, FlattenOptions::default()).unwrap();
    f.begin_layer("l").unwrap();
    f.apply(
        file("f", b"x".to_vec(), meta(0o644, 0, 0, 0, 0)).entry,
        &mut &b"x"[..],
    )
    .unwrap();
    let under_file = file("f/g", b"y".to_vec(), meta(0o644, 0, 0, 0, 0));
    let err = f.apply(under_file.entry, &mut &b"y"[..]).unwrap_err();
    assert!(err.to_string().contains("/f is not a directory"), "{err}");
    let mut bad_attr = file("h", Vec::new(), meta(0o644, 0, 0, 0, 0)).entry;
    bad_attr.meta.xattrs = vec![(b"weird.name".to_vec(), Vec::new())];
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("w"))
        .unwrap();
    let mut f = Flattener::new(out, FlattenOptions::default()).unwrap();
    f.begin_layer("l").unwrap();
    let err = f.apply(bad_attr, &mut std::io::empty()).unwrap_err();
    assert!(err.to_string().contains("/h"), "{err}");
}

/// Names long enough to need two index levels; every tenth has bytes past
/// 0x7f, where the signed and unsigned hash variants differ.
fn big_dir_name(i: usize) -> String {
    if i % 10 == 0 {
        format!("d/entr\u{e9}e-name-with-\u{fc}mlaut-{i:07}")
    } else {
        format!("d/entry-name-with-padding-{i:07}")
    }
}

#[test]
fn a_100k_entry_directory_gets_a_two_level_index_the_kernel_and_e2fsck_accept() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big-dir.ext4");
    let mut layer: Vec<In> = (0..100_000)
        .map(|i| ent(&big_dir_name(i), EntryKind::Fifo, meta(0o644, 0, 0, 1, 0)))
        .collect();
    layer.push(file("d/file", b"found".to_vec(), meta(0o644, 0, 0, 1, 0)));
    let mut upper: Vec<In> = (0..100_000)
        .step_by(3)
        .map(|i| ent(&big_dir_name(i), EntryKind::Whiteout, meta(0, 0, 0, 0, 0)))
        .collect();
    upper.push(file("d/late", b"late".to_vec(), meta(0o644, 0, 0, 1, 0)));
    let layers = vec![layer, upper];
    build(&layers, &image);
    fsck(&image);
    let out = Command::new("debugfs")
        .args(["-R", "htree_dump /d"])
        .arg(&image)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("Indirect levels: 1"),
        "expected a two-level index:\n{}",
        &dump[..dump.len().min(2000)]
    );
    let m = Mount::new(&image, true);
    assert_eq!(fs::read(m.path().join("d/file")).unwrap(), b"found");
    assert_eq!(fs::read(m.path().join("d/late")).unwrap(), b"late");
    for i in [1, 2, 4, 10, 20, 99_998, 50_000, 77_777, 99_990] {
        let path = m.path().join(big_dir_name(i));
        assert_eq!(
            fs::symlink_metadata(&path).is_ok(),
            i % 3 != 0,
            "{}",
            path.display()
        );
    }
    assert_eq!(
        fs::read_dir(m.path().join("d")).unwrap().count(),
        100_000 - 33_334 + 2
    );
}

#[test]
fn a_non_empty_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("used");
    fs::write(&path, b"old bytes").unwrap();
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let err = Flattener::new(out, FlattenOptions::default())
        .err()
        .expect("refused");
    assert!(
        matches!(err, FlattenError::OutputNotEmpty { len: 9 }),
        "{err}"
    );
}

/// Inode number, mode, and names (a directory) or bytes (a file).
type Seen = (u64, u32, Vec<String>);

/// `/lost+found` after a layer, as a mounted image shows it: its inode,
/// mode and names, or its file type and bytes.
fn lost_found(root: &std::path::Path) -> Seen {
    use std::os::unix::fs::MetadataExt;
    let path = root.join("lost+found");
    let md = fs::symlink_metadata(&path).unwrap();
    let names = if md.is_dir() {
        let mut n: Vec<String> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    } else {
        vec![String::from_utf8_lossy(&fs::read(&path).unwrap_or_default()).into_owned()]
    };
    (md.ino(), md.mode(), names)
}

#[test]
fn layers_that_replace_or_remove_lost_found_leave_clean_images() {
    let tmp = tempfile::tempdir().unwrap();
    let white = |path: &str| ent(path, EntryKind::Whiteout, meta(0, 0, 0, 0, 0));
    let f = |path: &str, data: &[u8]| file(path, data.to_vec(), meta(0o644, 0, 0, 1, 0));
    let cases: Vec<(&str, Layers, Seen)> = vec![
        (
            // What a lower layer put in it goes with a whiteout; the
            // directory stays the image's own.
            "whiteout",
            vec![
                vec![dir("lost+found", 0o755, 5), f("lost+found/kept", b"k")],
                vec![white("lost+found")],
            ],
            (11, 0o40700, vec![]),
        ),
        (
            "opaque root",
            vec![
                vec![f("a", b"a"), f("lost+found/x", b"x")],
                vec![
                    ent("", EntryKind::OpaqueDirectory, meta(0, 0, 0, 0, 0)),
                    f("b", b"b"),
                ],
            ],
            (11, 0o40700, vec![]),
        ),
        (
            // The layer wins: never lose its data.
            "replaced by a file",
            vec![vec![f("lost+found", b"mine")]],
            (12, 0o100644, vec!["mine".into()]),
        ),
        (
            "replaced, then whited out",
            vec![
                vec![ent(
                    "lost+found",
                    EntryKind::Symlink {
                        target: b"elsewhere".to_vec(),
                    },
                    meta(0o777, 0, 0, 1, 0),
                )],
                vec![white("lost+found")],
            ],
            (11, 0o40700, vec![]),
        ),
        (
            "taken over by a directory",
            vec![vec![dir("lost+found", 0o750, 5), f("lost+found/in", b"i")]],
            (11, 0o40750, vec!["in".into()]),
        ),
    ];
    for (i, (what, layers, want)) in cases.into_iter().enumerate() {
        let image = tmp.path().join(format!("case{i}.ext4"));
        build(&layers, &image);
        fsck(&image);
        {
            let m = Mount::new(&image, true);
            assert_eq!(lost_found(m.path()), want, "{what}");
            if what == "opaque root" {
                let mut top: Vec<_> = fs::read_dir(m.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                top.sort();
                assert_eq!(top, ["b", "lost+found"], "{what}");
            }
        }
        {
            let m = Mount::new(&image, false);
            fs::write(m.path().join("new"), b"n").unwrap();
        }
        fsck(&image);
    }
}

/// Runs a tool, failing with its output unless it succeeds.
fn tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("run the tool (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn gnu_tar_sparse_files_and_bsdtar_attributes_survive_flattening() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let sparse = src.join("sparse");
    tool(Command::new("truncate").args(["-s", "64M"]).arg(&sparse));
    for (seek, count) in [(0, 1), (5000, 3), (16383, 1)] {
        tool(
            Command::new("dd")
                .args(["if=/dev/urandom", "bs=4096", "conv=notrunc", "status=none"])
                .arg(format!("of={}", sparse.display()))
                .arg(format!("seek={seek}"))
                .arg(format!("count={count}")),
        );
    }
    let attrs = src.join("attrs");
    fs::write(&attrs, b"with attributes").unwrap();
    for (name, value) in [("user.plain", "0x0102ff"), ("user.sp ace=%", "0sAAEC")] {
        tool(
            Command::new("setfattr")
                .args(["-n", name, "-v", value])
                .arg(&attrs),
        );
    }
    let layers = [
        ("gnu", "tar", vec!["--sparse", "--format=gnu"], "sparse"),
        ("pax", "tar", vec!["--sparse", "--format=pax"], "sparse"),
        (
            "bsdtar",
            "bsdtar",
            vec!["--xattrs", "--format=pax"],
            "attrs",
        ),
    ];
    let image = tmp.path().join("image.ext4");
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&image)
        .unwrap();
    let mut f = Flattener::new(
        out,
        FlattenOptions {
            free_space: 1 << 20,
        },
    )
    .unwrap();
    let mut limits = lazyblk::oci::LayerLimits::default();
    for (label, cmd, args, name) in &layers {
        let tar = tmp.path().join(format!("{label}.tar"));
        tool(
            Command::new(cmd)
                .args(args)
                .arg("-cf")
                .arg(&tar)
                .arg("-C")
                .arg(&src)
                .args(if *cmd == "bsdtar" {
                    ["-s".to_string(), format!(",^,{label}/,")]
                } else {
                    ["--transform".to_string(), format!("s,^,{label}/,")]
                })
                .arg(name),
        );
        f.begin_layer(label).unwrap();
        lazyblk::oci::read_layer(
            fs::File::open(&tar).unwrap(),
            label,
            &mut limits,
            &mut |entry, data| Ok(f.apply(entry, data)?),
        )
        .unwrap();
        f.end_layer().unwrap();
    }
    let report = f.finish().unwrap();
    assert!(report.image_size < 16 << 20, "holes stay holes: {report:?}");
    fsck(&image);
    let m = Mount::new(&image, true);
    let want = fs::read(&sparse).unwrap();
    for label in ["gnu", "pax"] {
        let path = m.path().join(label).join("sparse");
        assert!(fs::read(&path).unwrap() == want, "{label}: bytes differ");
        let blocks = fs::metadata(&path).unwrap().blocks();
        assert!(blocks <= 5 * 8 + 8, "{label}: {blocks} sectors allocated");
    }
    let path = m.path().join("bsdtar/attrs");
    assert_eq!(fs::read(&path).unwrap(), b"with attributes");
    for (name, value) in [
        ("user.plain", &[1u8, 2, 0xff][..]),
        ("user.sp ace=%", &[0u8, 1, 2][..]),
    ] {
        let mut buf = [0u8; 16];
        let n = rustix::fs::lgetxattr(&path, name, &mut buf).unwrap();
        assert_eq!(&buf[..n], value, "{name}");
    }
    let mut list = [0u8; 256];
    let n = rustix::fs::llistxattr(&path, &mut list).unwrap();
    assert_eq!(
        list[..n]
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .count(),
        2,
        "no duplicate attributes"
    );
}
