//! Unit tests of the layer reader's PAX extensions: global headers,
//! libarchive's attribute records, and GNU sparse members as GNU tar writes
//! them (archives made by the real `tar` where a writer is needed).

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use tar::EntryType;

use super::entry::{EntryKind, Timestamp};
use super::header::EntryError;
use super::layer::LayerError;
use super::layer_tests::{chain, header, pax_records as records, read_all, Tar};
use crate::error::ErrorKind;

impl Tar {
    fn global(&mut self, recs: &[(&str, &[u8])]) -> &mut Self {
        let data = records(recs);
        let mut h = header(EntryType::XGlobalHeader, data.len() as u64, 0o644);
        self.0
            .append_data(&mut h, "pax_global_header", &data[..])
            .unwrap();
        self
    }
}

fn xattrs(e: &super::entry::LayerEntry) -> Vec<(String, Vec<u8>)> {
    e.meta
        .xattrs
        .iter()
        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.clone()))
        .collect()
}

#[test]
fn libarchive_attribute_records_are_decoded_and_their_schily_twins_dropped() {
    // As bsdtar 3.6 writes them: both forms, both with the encoded name.
    let tar = Tar::new()
        .pax(&[
            ("LIBARCHIVE.xattr.user.we%20ird%3D%25%C3%A9", b"AAEC/w"),
            (
                "SCHILY.xattr.user.we%20ird%3D%25%C3%A9",
                b"\x00\x01\x02\xff",
            ),
            ("LIBARCHIVE.xattr.user.plain", b"aGVsbG8="),
            ("SCHILY.xattr.user.plain", b"hello"),
            ("SCHILY.xattr.user.only", b"s"),
        ])
        .file("f", b"x")
        .bytes();
    let (seen, _) = read_all(&tar).unwrap();
    assert_eq!(
        xattrs(&seen[0].0),
        vec![
            ("user.only".into(), b"s".to_vec()),
            ("user.plain".into(), b"hello".to_vec()),
            ("user.we ird=%\u{e9}".into(), vec![0, 1, 2, 0xff]),
        ]
    );
    // Same name spelled differently in the two forms: the later wins.
    for (first, second, want) in [
        (
            ("SCHILY.xattr.user.a%41", &b"schily"[..]),
            ("LIBARCHIVE.xattr.user.a%2541", &b"bGli"[..]),
            b"lib".to_vec(),
        ),
        (
            ("LIBARCHIVE.xattr.user.a%2541", &b"bGli"[..]),
            ("SCHILY.xattr.user.a%41", &b"schily"[..]),
            b"schily".to_vec(),
        ),
    ] {
        let tar = Tar::new().pax(&[first, second]).file("f", b"").bytes();
        let (seen, _) = read_all(&tar).unwrap();
        assert_eq!(xattrs(&seen[0].0), vec![("user.a%41".into(), want)]);
    }
    for (key, value, problem) in [
        ("LIBARCHIVE.xattr.user.x", &b"!!"[..], "base64"),
        ("LIBARCHIVE.xattr.user.%zz", &b"AA"[..], "percent"),
        ("LIBARCHIVE.xattr.user.%00", &b"AA"[..], "NUL"),
    ] {
        let tar = Tar::new().pax(&[(key, value)]).file("bad", b"").bytes();
        let text = chain(&read_all(&tar).unwrap_err());
        assert!(text.contains("\"bad\"") && text.contains(problem), "{text}");
    }
}

#[test]
fn global_headers_apply_to_every_later_member_until_overridden() {
    let tar = Tar::new()
        .file("before", b"")
        .global(&[
            ("uid", b"500"),
            ("gid", b"600"),
            ("mtime", b"1234.5"),
            ("SCHILY.xattr.user.g", b"global"),
            ("path", b"ignored-for-every-member"),
            ("uname", b"someone"),
        ])
        .file("a", b"1")
        .pax(&[("uid", b"7"), ("SCHILY.xattr.user.g", b"own")])
        .file("b", b"2")
        // An empty value gives back the header's own field.
        .pax(&[("mtime", b"")])
        .file("c", b"3")
        .global(&[("gid", b"601"), ("uid", b"")])
        .dir("d")
        .bytes();
    let (seen, stats) = read_all(&tar).unwrap();
    let got: Vec<_> = seen
        .iter()
        .map(|(e, _)| {
            (
                e.path.to_string(),
                e.meta.uid,
                e.meta.gid,
                e.meta.mtime,
                xattrs(e),
            )
        })
        .collect();
    let header_time = Timestamp {
        secs: 1_600_000_000,
        nanos: 0,
    };
    let global_time = Timestamp {
        secs: 1234,
        nanos: 500_000_000,
    };
    let g = |v: &[u8]| vec![("user.g".to_string(), v.to_vec())];
    assert_eq!(
        got,
        vec![
            ("/before".into(), 1000, 100, header_time, vec![]),
            ("/a".into(), 500, 600, global_time, g(b"global")),
            ("/b".into(), 7, 600, global_time, g(b"own")),
            ("/c".into(), 500, 600, header_time, g(b"global")),
            ("/d".into(), 1000, 601, global_time, g(b"global")),
        ]
    );
    assert_eq!(stats.skipped, 2);
    assert_eq!(seen[3].1, b"3");
}

#[test]
fn global_headers_stay_bounded() {
    let value = vec![b'v'; 60_000];
    let names: Vec<String> = (0..20).map(|i| format!("SCHILY.xattr.user.{i}")).collect();
    let recs: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &value[..])).collect();
    // Each header is under the metadata limit; together they are not.
    let tar = Tar::new()
        .global(&recs[..10])
        .global(&recs[10..])
        .file("f", b"")
        .bytes();
    let err = read_all(&tar).unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Entry {
                source: EntryError::GlobalTooLarge { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Invalid);
    // A bad record in a global header names it.
    let tar = Tar::new().global(&[("uid", b"x")]).file("f", b"").bytes();
    assert!(chain(&read_all(&tar).unwrap_err()).contains("pax_global_header"));
}

/// Sparse files made with truncate and dd, as `tar --sparse` finds them.
fn sparse_files(dir: &Path) -> Vec<(&'static str, Vec<u8>)> {
    let mut files = Vec::new();
    let mut make = |name: &'static str, size: u64, patches: &[(u64, &[u8])]| {
        let path = dir.join(name);
        let f = fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        for &(at, bytes) in patches {
            let status = Command::new("dd")
                .arg(format!("of={}", path.display()))
                .args(["bs=1", "conv=notrunc", "status=none"])
                .arg(format!("seek={at}"))
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    io::Write::write_all(&mut c.stdin.take().unwrap(), bytes)?;
                    c.wait()
                })
                .expect("run dd");
            assert!(status.success());
        }
        files.push((name, fs::read(&path).unwrap()));
    };
    make(
        "holes",
        10 << 20,
        &[(3_000_000, b"hello"), (9_000_000, b"tail")],
    );
    make("ends-in-data", 1 << 20, &[((1 << 20) - 3, b"end")]);
    make("all-hole", 5 << 20, &[]);
    // More regions than the old GNU header holds: extension blocks.
    let many: Vec<(u64, &[u8])> = (0..30u64)
        .map(|i| (i * 65536 + 7, &b"region"[..]))
        .collect();
    make("many", 30 * 65536, &many);
    files
}

fn gnu_tar(dir: &Path, format: &[&str], names: &[&str]) -> Vec<u8> {
    let out = Command::new("tar")
        .args(["--sparse", "-cf", "-", "-C"])
        .arg(dir)
        .args(format)
        .args(names)
        .output()
        .expect("run GNU tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

const FORMATS: [&[&str]; 4] = [
    &["--format=gnu"],
    &["--format=pax"],
    &["--format=pax", "--sparse-version=0.0"],
    &["--format=pax", "--sparse-version=0.1"],
];

#[test]
fn gnu_tar_sparse_members_expand_to_their_bytes_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let files = sparse_files(dir.path());
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    for format in FORMATS {
        let tar = gnu_tar(dir.path(), format, &names);
        let stored: usize = tar.len();
        let (seen, _) = read_all(&tar).unwrap_or_else(|e| panic!("{format:?}: {}", chain(&e)));
        assert_eq!(seen.len(), files.len(), "{format:?}");
        for ((entry, bytes), (name, want)) in seen.iter().zip(&files) {
            assert_eq!(entry.path.to_string(), format!("/{name}"), "{format:?}");
            assert_eq!(
                entry.kind,
                EntryKind::Regular {
                    size: want.len() as u64
                }
            );
            assert!(bytes == want, "{format:?}: {name} differs");
        }
        assert!(stored < 200 << 10, "{format:?}: stored sparsely ({stored})");
    }
}

/// Offset of the first header block whose name contains `name`.
fn header_of(tar: &[u8], name: &[u8]) -> usize {
    (0..tar.len())
        .step_by(512)
        .find(|&o| tar[o..o + 100].windows(name.len()).any(|w| w == name))
        .unwrap()
}

fn recompute_checksum(tar: &mut [u8], at: usize) {
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&tar[at..at + 512]);
    h.set_cksum();
    tar[at..at + 512].copy_from_slice(h.as_bytes());
}

fn sparse_problem(tar: &[u8]) -> String {
    let err = read_all(tar).unwrap_err();
    let text = chain(&err);
    assert!(text.contains("sha256:test"), "{text}");
    match err {
        LayerError::Entry {
            entry,
            source: EntryError::SparseMap { problem },
            ..
        } => format!("{entry}: {problem}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_sparse_maps_name_the_layer_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    sparse_files(dir.path());

    // Old GNU: the header's map at byte 386, 24 bytes an entry. Make the
    // second segment start inside the first.
    let good = gnu_tar(dir.path(), &["--format=gnu"], &["many"]);
    let at = header_of(&good, b"many");
    let mut tar = good.clone();
    tar[at + 386 + 24..at + 386 + 36].copy_from_slice(b"00000000010\0");
    recompute_checksum(&mut tar, at);
    assert!(sparse_problem(&tar).starts_with("many: segment 1"));
    // A real size smaller than the data.
    let mut tar = good.clone();
    tar[at + 483..at + 495].copy_from_slice(b"00000000100\0");
    recompute_checksum(&mut tar, at);
    assert!(sparse_problem(&tar).contains("past the real size"));
    // An extension block cut off.
    let err = read_all(&good[..at + 512 + 100]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err:?}");

    // PAX 1.0: the map leads the data; claim one byte more than stored.
    let good = gnu_tar(dir.path(), &["--format=pax"], &["holes"]);
    let at = header_of(&good, b"GNUSparseFile");
    let map = at + 512;
    let text = String::from_utf8_lossy(&good[map..map + 64]).into_owned();
    assert!(text.starts_with("3\n2998272\n4096\n"), "{text:?}");
    let mut tar = good.clone();
    tar[map..map + 15].copy_from_slice(b"3\n2998272\n4097\n");
    assert_eq!(
        sparse_problem(&tar),
        "holes: the segments hold 8193 bytes but the member stores 8192"
    );
    let mut tar = good.clone();
    tar[map] = b'x';
    assert!(sparse_problem(&tar).contains("byte 0x78"));

    // Versions we do not know are refused as unsupported.
    let tar = Tar::new()
        .pax(&[("GNU.sparse.major", b"2"), ("GNU.sparse.minor", b"0")])
        .file("s", b"")
        .bytes();
    let err = read_all(&tar).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(chain(&err).contains("2.0"));
    // 0.0 with unpaired records.
    let tar = Tar::new()
        .pax(&[("GNU.sparse.size", b"10"), ("GNU.sparse.offset", b"0")])
        .file("s", b"")
        .bytes();
    assert!(sparse_problem(&tar).contains("numbytes"));
}

#[test]
fn sparse_holes_count_against_the_byte_budget() {
    let sparse = |real: &str| {
        Tar::new()
            .pax(&[
                ("GNU.sparse.size", real.as_bytes()),
                ("GNU.sparse.map", b"0,1"),
            ])
            .file("bomb", b"x")
            .bytes()
    };
    // A terabyte of holes from a few hundred bytes of tar.
    let err = read_all(&sparse("1099511627776")).unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::LimitExceeded {
                limit: super::layer::Limit::Bytes(_),
                ref entry,
                ..
            } if entry == "bomb"
        ),
        "{err:?}"
    );
    let mut limits = super::layer::LayerLimits::default();
    let tar = sparse("1000000");
    super::layer_tests::read_with(&tar, &mut limits).unwrap();
    assert_eq!(limits.bytes_used(), tar.len() as u64 + 999_999);
}
