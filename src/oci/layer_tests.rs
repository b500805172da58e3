//! Unit tests of the layer reader on tar streams built in memory by the
//! `tar` crate (and by hand where a writer would refuse the bad input).

use std::io::{self, Read};

use tar::{EntryType, Header};

use super::entry::{EntryKind, EntryPath, LayerEntry, Timestamp};
use super::header::EntryError;
use super::layer::{find_in_chain, read_layer, LayerError, LayerLimits, LayerStats, Limit};
use crate::error::ErrorKind;

/// A tar under construction.
pub(super) struct Tar(pub(super) tar::Builder<Vec<u8>>);

pub(super) fn header(kind: EntryType, size: u64, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_mtime(1_600_000_000);
    h
}

impl Tar {
    pub(super) fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }

    pub(super) fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        let mut h = header(EntryType::Regular, data.len() as u64, 0o644);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub(super) fn dir(&mut self, path: &str) -> &mut Self {
        let mut h = header(EntryType::Directory, 0, 0o755);
        self.0.append_data(&mut h, path, io::empty()).unwrap();
        self
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = header(kind, 0, 0o777);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn device(&mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = header(kind, 0, 0o600);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, io::empty()).unwrap();
        self
    }

    /// A PAX header for the next member.
    pub(super) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let data = pax_records(records);
        let mut h = header(EntryType::XHeader, data.len() as u64, 0o644);
        self.0.append_data(&mut h, "PaxHeader", &data[..]).unwrap();
        self
    }

    /// A member whose name bytes go into the header unchecked.
    pub(super) fn raw(&mut self, name: &[u8], kind: EntryType, data: &[u8]) -> &mut Self {
        let mut h = header(kind, data.len() as u64, 0o644);
        h.as_old_mut().name = [0; 100];
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub(super) fn bytes(&mut self) -> Vec<u8> {
        self.0.finish().unwrap();
        self.0.get_ref().clone()
    }
}

pub(super) type Seen = Vec<(LayerEntry, Vec<u8>)>;

pub(super) fn read_all(tar: &[u8]) -> Result<(Seen, LayerStats), LayerError> {
    read_with(tar, &mut LayerLimits::default())
}

pub(super) fn read_with(
    tar: &[u8],
    limits: &mut LayerLimits,
) -> Result<(Seen, LayerStats), LayerError> {
    let mut seen = Vec::new();
    let stats = read_layer(tar, "sha256:test", limits, &mut |entry, data| {
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes)?;
        seen.push((entry, bytes));
        Ok(())
    })?;
    Ok((seen, stats))
}

pub(super) use crate::error::chain;

fn path(p: &str) -> EntryPath {
    EntryPath::parse(p.as_bytes()).unwrap()
}

#[test]
fn every_entry_kind_comes_through() {
    let tar = Tar::new()
        .dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .link(
            EntryType::Symlink,
            "etc/localtime",
            "/usr/share/zoneinfo/UTC",
        )
        .link(EntryType::Link, "etc/hosts2", "etc/hosts")
        .device(EntryType::Char, "dev/null", 1, 3)
        .device(EntryType::Block, "dev/sda", 8, 0)
        .device(EntryType::Fifo, "run/fifo", 0, 0)
        .bytes();
    let (seen, stats) = read_all(&tar).unwrap();
    let kinds: Vec<_> = seen
        .iter()
        .map(|(e, _)| (e.path.to_string(), e.kind.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("/etc".into(), EntryKind::Directory),
            ("/etc/hosts".into(), EntryKind::Regular { size: 20 }),
            (
                "/etc/localtime".into(),
                EntryKind::Symlink {
                    target: b"/usr/share/zoneinfo/UTC".to_vec()
                }
            ),
            (
                "/etc/hosts2".into(),
                EntryKind::HardLink {
                    target: path("etc/hosts")
                }
            ),
            (
                "/dev/null".into(),
                EntryKind::CharDevice { major: 1, minor: 3 }
            ),
            (
                "/dev/sda".into(),
                EntryKind::BlockDevice { major: 8, minor: 0 }
            ),
            ("/run/fifo".into(), EntryKind::Fifo),
        ]
    );
    assert_eq!(seen[1].1, b"127.0.0.1 localhost\n");
    assert!(seen
        .iter()
        .all(|(e, data)| e.path.to_string() == "/etc/hosts" || data.is_empty()));
    let meta = &seen[1].0.meta;
    assert_eq!((meta.mode, meta.uid, meta.gid), (0o644, 1000, 100));
    assert_eq!(meta.mtime.secs, 1_600_000_000);
    assert_eq!(stats.entries, 7);
    assert_eq!(stats.data_bytes, 20);
    assert_eq!(stats.tar_bytes, tar.len() as u64);
}

#[test]
fn setuid_and_sticky_bits_survive() {
    let mut t = Tar::new();
    let mut h = header(EntryType::Regular, 0, 0o4755);
    t.0.append_data(&mut h, "bin/su", io::empty()).unwrap();
    let mut h = header(EntryType::Directory, 0, 0o1777);
    t.0.append_data(&mut h, "tmp", io::empty()).unwrap();
    let (seen, _) = read_all(&t.bytes()).unwrap();
    assert_eq!(seen[0].0.meta.mode, 0o4755);
    assert_eq!(seen[1].0.meta.mode, 0o1777);
}

#[test]
fn pax_overrides_header_fields_and_carries_xattrs() {
    let long = format!("{}/{}", "d".repeat(200), "f".repeat(200));
    let capability = [
        1u8, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let tar = Tar::new()
        .pax(&[
            ("path", long.as_bytes()),
            ("mtime", b"1700000000.123456789"),
            ("uid", b"4000000000"),
            ("gid", b"70000"),
            ("SCHILY.xattr.security.capability", &capability),
            ("SCHILY.xattr.user.b", b"2"),
            ("SCHILY.xattr.user.a", b"1"),
            ("atime", b"1.5"),
        ])
        .file("short-name", b"data")
        .bytes();
    let (seen, _) = read_all(&tar).unwrap();
    let entry = &seen[0].0;
    assert_eq!(entry.path, path(&long));
    assert_eq!(
        entry.meta.mtime,
        Timestamp {
            secs: 1_700_000_000,
            nanos: 123_456_789
        }
    );
    assert_eq!((entry.meta.uid, entry.meta.gid), (4_000_000_000, 70000));
    let names: Vec<_> = entry.meta.xattrs.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        names,
        vec![
            b"security.capability".to_vec(),
            b"user.a".to_vec(),
            b"user.b".to_vec()
        ]
    );
    assert_eq!(entry.meta.xattrs[0].1, capability);
    assert_eq!(seen[0].1, b"data");
}

#[test]
fn gnu_long_names_and_links() {
    let name = format!("{}/{}", "n".repeat(150), "x".repeat(120));
    let target = format!("{}/{}", "t".repeat(150), "y".repeat(120));
    let tar = Tar::new()
        .file(&target, b"")
        .link(EntryType::Link, &name, &target)
        .link(EntryType::Symlink, "s", &target)
        .bytes();
    let (seen, _) = read_all(&tar).unwrap();
    assert_eq!(seen[1].0.path, path(&name));
    assert_eq!(
        seen[1].0.kind,
        EntryKind::HardLink {
            target: path(&target)
        }
    );
    assert_eq!(
        seen[2].0.kind,
        EntryKind::Symlink {
            target: target.into_bytes()
        }
    );
}

#[test]
fn whiteouts_and_opaque_directories() {
    let tar = Tar::new()
        .file("etc/.wh.passwd", b"")
        .file("var/cache/.wh..wh..opq", b"")
        .file(".wh..wh..opq", b"")
        .file(".wh..wh.plnk/123.45", b"")
        .dir(".wh..wh.plnk")
        .bytes();
    let (seen, stats) = read_all(&tar).unwrap();
    let got: Vec<_> = seen
        .iter()
        .map(|(e, _)| (e.path.to_string(), e.kind.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/etc/passwd".into(), EntryKind::Whiteout),
            ("/var/cache".into(), EntryKind::OpaqueDirectory),
            ("/".into(), EntryKind::OpaqueDirectory),
        ]
    );
    assert_eq!(stats.skipped, 2);
    let err = read_all(&Tar::new().file("a/.wh.", b"").bytes()).unwrap_err();
    assert!(matches!(
        err,
        LayerError::Entry {
            source: EntryError::EmptyWhiteout,
            ..
        }
    ));
}

#[test]
fn absolute_paths_become_relative_and_escapes_are_refused() {
    let tar = Tar::new().raw(b"/etc/x", EntryType::Regular, b"").bytes();
    assert_eq!(read_all(&tar).unwrap().0[0].0.path, path("etc/x"));

    let tar = Tar::new()
        .file("ok", b"")
        .raw(b"a/../../etc/passwd", EntryType::Regular, b"evil")
        .bytes();
    let err = read_all(&tar).unwrap_err();
    let text = chain(&err);
    assert!(text.contains("sha256:test"), "{text}");
    assert!(text.contains("a/../../etc/passwd"), "{text}");
    assert!(text.contains("escapes"), "{text}");
    assert_eq!(err.kind(), ErrorKind::Invalid);

    let tar = Tar::new().raw(b"x", EntryType::Link, b"").bytes();
    assert!(matches!(
        read_all(&tar).unwrap_err(),
        LayerError::Entry {
            source: EntryError::MissingLinkTarget,
            ..
        }
    ));
    let mut t = Tar::new();
    let mut h = header(EntryType::Link, 0, 0o644);
    h.as_old_mut().linkname[..5].copy_from_slice(b"../..");
    t.raw(b"y", EntryType::Regular, b"");
    t.0.append_data(&mut h, "z", io::empty()).unwrap();
    let err = read_all(&t.bytes()).unwrap_err();
    assert!(
        matches!(err, LayerError::Entry { source: EntryError::LinkTarget { .. }, ref entry, .. } if entry == "z"),
        "{err:?}"
    );
}

#[test]
fn nul_and_overlong_names_are_refused() {
    let tar = Tar::new().pax(&[("path", b"a\0b")]).file("x", b"").bytes();
    let err = read_all(&tar).unwrap_err();
    assert!(
        matches!(
            &err,
            LayerError::Entry {
                source: EntryError::Path(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        std::error::Error::source(&std::error::Error::source(&err).unwrap())
            .unwrap()
            .to_string()
            .contains("NUL")
    );

    let long = "n".repeat(256);
    let tar = Tar::new().file(&format!("dir/{long}"), b"").bytes();
    let err = read_all(&tar).unwrap_err();
    assert!(err.to_string().contains(&long), "{err}");
    assert!(matches!(
        err,
        LayerError::Entry {
            source: EntryError::Path(_),
            ..
        }
    ));
    let ok = "n".repeat(255);
    assert!(read_all(&Tar::new().file(&ok, b"").bytes()).is_ok());
}

#[test]
fn checksum_errors_name_the_entry() {
    let mut tar = Tar::new().file("good", b"x").file("bad-one", b"y").bytes();
    // Second header at 1024: corrupt its mode field.
    tar[1024 + 100] ^= 0x01;
    let err = read_all(&tar).unwrap_err();
    match &err {
        LayerError::Checksum { entry, offset, .. } => {
            assert_eq!((entry.as_str(), *offset), ("bad-one", 1024))
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("sha256:test"));
}

#[test]
fn truncated_streams_are_errors_not_short_files() {
    let tar = Tar::new().file("big", &[5u8; 3000]).bytes();
    for cut in [100, 512 + 1000, 512 + 3000] {
        let err = read_all(&tar[..cut]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{cut}: {err:?}");
        let text = chain(&err);
        assert!(text.contains("ends") && text.contains("early"), "{text}");
    }
    // Cut exactly after a member: like tar and Go, accepted as the end.
    assert_eq!(read_all(&tar[..512 + 3072]).unwrap().0.len(), 1);
}

#[test]
fn unread_data_is_skipped_and_short_reads_are_exact() {
    let tar = Tar::new()
        .file("a", &[1u8; 10_000])
        .file("b", b"second")
        .bytes();
    let mut seen = Vec::new();
    read_layer(
        &tar[..],
        "l",
        &mut LayerLimits::default(),
        &mut |entry, data| {
            let mut first = [0u8; 3];
            data.read_exact(&mut first)?;
            seen.push((entry.path.to_string(), first));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seen, vec![("/a".into(), [1; 3]), ("/b".into(), *b"sec")]);
}

#[test]
fn apply_errors_carry_layer_and_entry() {
    let tar = Tar::new().file("etc/conf", b"x").bytes();
    let err = read_layer(
        &tar[..],
        "sha256:abc",
        &mut LayerLimits::default(),
        &mut |_, _| Err("disk full".into()),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer sha256:abc: entry \"etc/conf\": applying it"
    );
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "disk full"
    );
}

#[test]
fn limits_span_layers() {
    let tar = Tar::new().file("a", &[0u8; 4096]).file("b", b"").bytes();
    let mut limits = LayerLimits::new(u64::MAX, 3);
    read_with(&tar, &mut limits).unwrap();
    assert_eq!(limits.entries_used(), 2);
    let err = read_with(&tar, &mut limits).unwrap_err();
    assert!(matches!(
        err,
        LayerError::LimitExceeded {
            limit: Limit::Entries(3),
            ..
        }
    ));

    let mut limits = LayerLimits::new(tar.len() as u64 + 1000, u64::MAX);
    read_with(&tar, &mut limits).unwrap();
    let err = read_with(&tar, &mut limits).unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::LimitExceeded {
                limit: Limit::Bytes(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn oversized_metadata_is_refused_before_it_is_read() {
    // A PAX header claiming 1 TiB: refused from its header alone.
    let mut h = header(EntryType::XHeader, 1 << 40, 0o644);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[b'x'; 4096]);
    let err = read_all(&tar).unwrap_err();
    assert!(
        matches!(err, LayerError::MetadataTooLarge { len, .. } if len == 1 << 40),
        "{err:?}"
    );
}

#[test]
fn unsupported_and_malformed_members() {
    let tar = Tar::new().raw(b"vol", EntryType::new(b'V'), b"").bytes();
    let err = read_all(&tar).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let tar = Tar::new()
        .pax(&[("GNU.sparse.major", b"1")])
        .file("s", b"")
        .bytes();
    assert_eq!(read_all(&tar).unwrap_err().kind(), ErrorKind::Unsupported);
    let tar = Tar::new().pax(&[("mtime", b"soon")]).file("t", b"").bytes();
    assert!(read_all(&tar).unwrap_err().to_string().contains("\"t\""));
    let tar = Tar::new().raw(b"", EntryType::Regular, b"x").bytes();
    assert!(matches!(
        read_all(&tar).unwrap_err(),
        LayerError::Entry {
            source: EntryError::RootNotDirectory { .. },
            ..
        }
    ));
    let tar = Tar::new().pax(&[("uid", b"1")]).bytes();
    assert!(matches!(
        read_all(&tar).unwrap_err(),
        LayerError::DanglingExtension { .. }
    ));
    let tar = Tar::new().raw(b"s", EntryType::Symlink, b"").bytes();
    assert!(matches!(
        read_all(&tar).unwrap_err(),
        LayerError::Entry {
            source: EntryError::EmptySymlink,
            ..
        }
    ));
}

#[test]
fn trailing_bytes_after_the_end_marker_are_read() {
    let mut tar = Tar::new().file("a", b"x").bytes();
    tar.extend_from_slice(&[0u8; 10240]);
    let (_, stats) = read_all(&tar).unwrap();
    assert_eq!(stats.tar_bytes, tar.len() as u64);
}

#[test]
fn blank_numeric_fields_read_as_zero() {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(2);
    // uid, gid, mtime and mode left as NULs, as some writers leave them.
    let mut t = Tar::new();
    t.0.append_data(&mut h, "f", &b"hi"[..]).unwrap();
    let (seen, _) = read_all(&t.bytes()).unwrap();
    let meta = &seen[0].0.meta;
    assert_eq!(
        (meta.uid, meta.gid, meta.mode, meta.mtime.secs),
        (0, 0, 0, 0)
    );
    // A field with garbage in it is still an error.
    let mut t = Tar::new();
    let mut h = header(EntryType::Regular, 0, 0o644);
    h.set_path("f").unwrap();
    h.as_old_mut().uid = *b"12x4567\0";
    h.set_cksum();
    t.0.append(&h, io::empty()).unwrap();
    assert!(matches!(
        read_all(&t.bytes()).unwrap_err(),
        LayerError::Entry {
            source: EntryError::Field { field: "uid", .. },
            ..
        }
    ));
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut e, data).unwrap();
    e.finish().unwrap()
}

fn through_gzip(blob: Vec<u8>, limits: &mut LayerLimits) -> Result<LayerStats, LayerError> {
    let stream = super::compress::decompressor(
        Box::new(io::Cursor::new(blob)),
        Some((super::compress::Compression::Gzip, "test+gzip")),
    )
    .unwrap();
    read_layer(stream, "sha256:bomb", limits, &mut |_, data| {
        io::copy(data, &mut io::sink())?;
        Ok(())
    })
}

#[test]
fn a_decompression_bomb_stops_at_the_limit() {
    // 8 MiB of zeros in one file: far less gzip.
    let mut t = Tar::new();
    let mut h = header(EntryType::Regular, 8 << 20, 0o644);
    t.0.append_data(&mut h, "zeros", io::repeat(0).take(8 << 20))
        .unwrap();
    let blob = gzip(&t.bytes());
    assert!(blob.len() < 1 << 20, "the blob alone fits in the budget");
    let mut limits = LayerLimits::new(1 << 20, u64::MAX);
    let err = through_gzip(blob, &mut limits).unwrap_err();
    assert!(
        matches!(err, LayerError::LimitExceeded { limit: Limit::Bytes(l), ref entry, .. } if l == 1 << 20 && entry == "zeros"),
        "{err:?}"
    );
    assert!(err.to_string().contains("sha256:bomb"));
    // It stopped at the limit, not after inflating everything.
    assert!(limits.bytes_used() < 2 << 20);
}

#[test]
fn a_truncated_gzip_layer_names_the_layer_and_entry() {
    let tar = Tar::new().file("etc/big", &[9u8; 200_000]).bytes();
    let mut blob = gzip(&tar);
    blob.truncate(blob.len() - 20);
    let err = through_gzip(blob, &mut LayerLimits::default()).unwrap_err();
    let text = chain(&err);
    assert!(text.contains("sha256:bomb"), "{text}");
    assert!(text.contains("gzip stream is truncated"), "{text}");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err:?}");
}

#[test]
fn sizes_beyond_4_gib_come_from_gnu_binary_and_pax_fields() {
    let huge = 5u64 << 30;
    // GNU base-256 size field, then the stream ends: the entry is announced
    // with its full size and the missing data is an error.
    let mut h = header(EntryType::Regular, huge, 0o644);
    h.set_path("big").unwrap();
    h.set_cksum();
    let gnu = h.as_bytes().to_vec();
    let mut pax_tar = Tar::new();
    pax_tar.pax(&[("size", huge.to_string().as_bytes())]);
    let mut h = header(EntryType::Regular, 0, 0o644);
    h.set_path("big").unwrap();
    h.set_cksum();
    let mut pax = pax_tar.0.get_ref().clone();
    pax.extend_from_slice(h.as_bytes());
    for stream in [gnu, pax] {
        let mut sizes = Vec::new();
        let err = read_layer(
            &stream[..],
            "l",
            &mut LayerLimits::default(),
            &mut |entry, _| {
                sizes.push(entry.kind);
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(sizes, vec![EntryKind::Regular { size: huge }]);
        assert!(
            matches!(find_in_chain::<super::layer::Truncated>(&err), Some(t) if t.missing == huge),
            "{err:?}"
        );
    }
}

/// PAX records as "LEN KEY=VALUE\n", LEN counting itself.
pub(super) fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3;
        let mut len = body + body.to_string().len();
        if len.to_string().len() != body.to_string().len() {
            len += 1;
        }
        data.extend_from_slice(format!("{len} {key}=").as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    data
}
