//! One tar member, as its headers wrote it, turned into a [`LayerEntry`].
//!
//! [`super::layer`] walks the stream and collects, for each member, its
//! 512-byte header plus the GNU long name/link before it and the PAX records
//! in force ([`GlobalPax`]: global headers' records, then the member's own);
//! [`classify`] reads every field through the `tar` crate's header parsers,
//! lets PAX records override the header (path, linkpath, uid, gid, mtime
//! with nanoseconds), gathers attributes (`SCHILY.xattr.*` and bsdtar's
//! `LIBARCHIVE.xattr.*`), and recognises the OCI whiteouts. `GNU.sparse.*`
//! records are collected for [`super::sparse`]. Nothing here decides which entry wins: that is the
//! flattener's. Every check that can fail names what was wrong in an
//! [`EntryError`]; no input panics.

use std::collections::BTreeMap;
use std::io;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use tar::{EntryType, Header, PaxExtensions};

use super::entry::{EntryKind, EntryMeta, EntryPath, LayerEntry, PathError, Timestamp};
use super::layer_error::MAX_METADATA_LEN;
use super::sparse::{SparseKind, SparsePax};

/// Prefix of a whiteout's file name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix the spec reserves for whiteout metadata (AUFS wrote `.wh..wh.plnk`).
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
/// The opaque-directory marker's file name.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
const LIBARCHIVE_XATTR_PREFIX: &[u8] = b"LIBARCHIVE.xattr.";
/// libarchive writes base64 without padding; accept it either way.
const LIBARCHIVE_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// Linux's limit on a symlink target (PATH_MAX less the terminating NUL).
pub const MAX_SYMLINK_LEN: usize = 4095;
/// Linux's limits on an extended attribute's name and value.
pub const MAX_XATTR_NAME_LEN: usize = 255;
pub const MAX_XATTR_VALUE_LEN: usize = 65536;

/// What is wrong with one member of a layer.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("invalid path")]
    Path(#[source] PathError),
    #[error("invalid hard-link target {target:?}")]
    LinkTarget {
        target: String,
        #[source]
        source: PathError,
    },
    #[error("a hard link without a target")]
    MissingLinkTarget,
    #[error("a hard link to the root directory")]
    LinkToRoot,
    #[error("symlink target is empty")]
    EmptySymlink,
    #[error("symlink target contains a NUL byte")]
    SymlinkNul,
    #[error("symlink target is {len} bytes, more than the {MAX_SYMLINK_LEN} Linux allows")]
    SymlinkTooLong { len: usize },
    #[error("the root directory cannot be a {kind}")]
    RootNotDirectory { kind: &'static str },
    #[error("a whiteout must name a file: `.wh.` alone names nothing")]
    EmptyWhiteout,
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    #[error("unsupported GNU sparse file ({0})")]
    UnsupportedSparse(String),
    #[error("GNU sparse map: {problem}")]
    SparseMap { problem: String },
    #[error("PAX global headers hold {held} bytes of attributes, more than {MAX_METADATA_LEN}")]
    GlobalTooLarge { held: usize },
    #[error("reading the header's {field} field")]
    Field {
        field: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("PAX record {key}: {problem}")]
    Pax { key: String, problem: String },
    #[error("malformed PAX extended header")]
    PaxSyntax(#[source] io::Error),
    #[error("{field} {value} does not fit in 32 bits")]
    OutOfRange { field: &'static str, value: u64 },
    #[error("extended attribute {name:?}: {problem}")]
    Xattr { name: String, problem: &'static str },
}

/// A member's headers: the ustar/GNU header and what preceded it.
pub struct RawMember<'a> {
    pub header: &'a Header,
    pub long_name: Option<&'a [u8]>,
    pub long_link: Option<&'a [u8]>,
    /// The PAX records in force (global and the member's own).
    pub pax: &'a Pax,
}

/// What a member turned into.
#[derive(Debug)]
pub enum Classified {
    Entry(LayerEntry),
    /// AUFS whiteout metadata (`.wh..wh.plnk` and the like): no content.
    Skip,
}

/// PAX records this reader acts on, decoded: those in force from global
/// headers, overridden by the member's own.
#[derive(Clone, Default)]
pub struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<Timestamp>,
    size: Option<u64>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    sparse: SparsePax,
}

/// Where a PAX header came from: keys that name one member (`path`,
/// `linkpath`, `GNU.sparse.*`) mean nothing in a global header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Global,
    Member,
}

/// The attributes global headers (typeflag `g`) set for every member that
/// follows, until another global header changes them.
#[derive(Default)]
pub struct GlobalPax {
    pax: Pax,
}

impl GlobalPax {
    /// Applies one global header's records over the earlier ones. What
    /// they hold together stays within [`MAX_METADATA_LEN`].
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), EntryError> {
        let mut next = self.pax.clone();
        next.apply(bytes, Scope::Global)?;
        let held: usize = next.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        if held as u64 > MAX_METADATA_LEN {
            return Err(EntryError::GlobalTooLarge { held });
        }
        self.pax = next;
        Ok(())
    }

    /// The records in force for a member with PAX header `own`, if any.
    pub fn resolve(&self, own: Option<&[u8]>) -> Result<Pax, EntryError> {
        let mut pax = self.pax.clone();
        if let Some(bytes) = own {
            pax.apply(bytes, Scope::Member)?;
        }
        Ok(pax)
    }
}

/// `%XX` escapes decoded, as libarchive writes attribute names.
fn url_decode(name: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        if name[i] == b'%' {
            let hex = std::str::from_utf8(name.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(name[i]);
            i += 1;
        }
    }
    Some(out)
}

fn pax_error(key: &[u8], problem: String) -> EntryError {
    EntryError::Pax {
        key: lossy(key),
        problem,
    }
}

impl Pax {
    /// Applies one header's records in order: a later record for the same
    /// key wins, and an empty value for a field removes what was in force,
    /// so the ustar header's own field counts again (POSIX).
    ///
    /// Attributes come as `SCHILY.xattr.NAME=VALUE` (GNU tar, star) or as
    /// `LIBARCHIVE.xattr.NAME=BASE64` with NAME percent-encoded (bsdtar).
    /// bsdtar writes each attribute both ways, its SCHILY name encoded
    /// the same way; the LIBARCHIVE record is then the authoritative one and
    /// a SCHILY record spelled like one of the header's LIBARCHIVE names is
    /// dropped, whatever the order. Otherwise, when two records of a header
    /// name the same attribute, the later wins.
    fn apply(&mut self, bytes: &[u8], scope: Scope) -> Result<(), EntryError> {
        let mut schily: Vec<(&[u8], &[u8])> = Vec::new();
        let mut libarchive: Vec<(&[u8], Vec<u8>, Vec<u8>)> = Vec::new();
        let mut order: Vec<(bool, usize)> = Vec::new();
        for record in PaxExtensions::new(bytes) {
            let record = record.map_err(EntryError::PaxSyntax)?;
            let key = record.key_bytes();
            let value = record.value_bytes();
            let number = || -> Result<Option<u64>, EntryError> {
                if value.is_empty() {
                    return Ok(None);
                }
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Some)
                    .ok_or_else(|| {
                        pax_error(key, format!("{:?} is not a decimal number", lossy(value)))
                    })
            };
            let text = || (!value.is_empty()).then(|| value.to_vec());
            match key {
                b"path" if scope == Scope::Member => self.path = text(),
                b"linkpath" if scope == Scope::Member => self.linkpath = text(),
                b"uid" => self.uid = number()?,
                b"gid" => self.gid = number()?,
                b"size" => self.size = number()?,
                b"mtime" if value.is_empty() => self.mtime = None,
                b"mtime" => {
                    self.mtime = Some(parse_pax_time(value).ok_or_else(|| {
                        pax_error(key, format!("{:?} is not a time", lossy(value)))
                    })?)
                }
                _ if key.starts_with(XATTR_PREFIX) => {
                    order.push((true, schily.len()));
                    schily.push((&key[XATTR_PREFIX.len()..], value));
                }
                _ if key.starts_with(LIBARCHIVE_XATTR_PREFIX) => {
                    let raw = &key[LIBARCHIVE_XATTR_PREFIX.len()..];
                    let name = url_decode(raw).ok_or_else(|| {
                        pax_error(key, "the name is not validly percent-encoded".into())
                    })?;
                    let value = LIBARCHIVE_BASE64
                        .decode(value)
                        .map_err(|e| pax_error(key, format!("the value is not base64: {e}")))?;
                    order.push((false, libarchive.len()));
                    libarchive.push((raw, name, value));
                }
                _ if scope == Scope::Member && self.sparse.record(key, value)? => {}
                // atime, ctime, uname, gname (an image keeps numeric ids),
                // comments, charset, vendor records; and in a global header
                // the keys that name one member: nothing an image keeps.
                _ => {}
            }
        }
        for (is_schily, i) in order {
            let (name, value) = if is_schily {
                let (name, value) = schily[i];
                if libarchive.iter().any(|(raw, _, _)| *raw == name) {
                    continue;
                }
                (name.to_vec(), value.to_vec())
            } else {
                let (_, name, value) = &libarchive[i];
                (name.clone(), value.clone())
            };
            check_xattr(&name, &value)?;
            self.xattrs.insert(name, value);
        }
        Ok(())
    }

    /// How a sparse member's map is found, if the records make it one.
    pub fn sparse(&self) -> Result<Option<SparseKind>, EntryError> {
        self.sparse.kind()
    }
}

fn check_xattr(name: &[u8], value: &[u8]) -> Result<(), EntryError> {
    let problem = if name.is_empty() {
        "empty name"
    } else if name.contains(&0) {
        "name contains a NUL byte"
    } else if name.len() > MAX_XATTR_NAME_LEN {
        "name is longer than 255 bytes"
    } else if value.len() > MAX_XATTR_VALUE_LEN {
        "value is larger than 64 KiB"
    } else {
        return Ok(());
    };
    Err(EntryError::Xattr {
        name: lossy(name),
        problem,
    })
}

/// `SECONDS[.FRACTION]`, possibly negative, as PAX writes times. Digits of
/// the fraction past nanoseconds are dropped (truncation, as GNU tar does).
pub fn parse_pax_time(value: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(digit - b'0') * 10u32.pow(8 - i as u32);
    }
    if !negative {
        return Some(Timestamp { secs, nanos });
    }
    // -1.25 is 1.25 s before the epoch: secs -2, nanos 750,000,000.
    if nanos == 0 {
        Some(Timestamp {
            secs: secs.checked_neg()?,
            nanos: 0,
        })
    } else {
        Some(Timestamp {
            secs: secs.checked_neg()?.checked_sub(1)?,
            nanos: 1_000_000_000 - nanos,
        })
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Byte ranges of the numeric header fields, for [`numeric`].
const MODE: (usize, usize) = (100, 108);
const UID: (usize, usize) = (108, 116);
const GID: (usize, usize) = (116, 124);
const SIZE: (usize, usize) = (124, 136);
const MTIME: (usize, usize) = (136, 148);
const DEV_MAJOR: (usize, usize) = (329, 337);
const DEV_MINOR: (usize, usize) = (337, 345);

/// A numeric header field as the `tar` crate parsed it, except that a field
/// left blank (all NUL or spaces) reads as 0, as GNU tar and Go read it:
/// some writers leave uid, gid or device numbers empty.
fn numeric<T: Default>(
    header: &Header,
    name: &'static str,
    range: (usize, usize),
    value: io::Result<T>,
) -> Result<T, EntryError> {
    value.or_else(|source| {
        let raw = &header.as_bytes()[range.0..range.1];
        if raw.iter().all(|&b| b == 0 || b == b' ') {
            Ok(T::default())
        } else {
            Err(EntryError::Field {
                field: name,
                source,
            })
        }
    })
}

fn to_u32(field: &'static str, value: u64) -> Result<u32, EntryError> {
    u32::try_from(value).map_err(|_| EntryError::OutOfRange { field, value })
}

impl RawMember<'_> {
    /// The member's path exactly as its headers spell it (for messages).
    pub fn raw_path(&self) -> Vec<u8> {
        if let Some(name) = self.pax.sparse.name.as_ref().or(self.pax.path.as_ref()) {
            return name.clone();
        }
        match self.long_name {
            Some(name) => trim_nul(name).to_vec(),
            None => self.header.path_bytes().into_owned(),
        }
    }

    /// The size of the member's data in the stream, PAX `size` taking
    /// precedence.
    pub fn size(&self) -> Result<u64, EntryError> {
        match self.pax.size {
            Some(size) => Ok(size),
            None => numeric(self.header, "size", SIZE, self.header.entry_size()),
        }
    }
}

/// GNU long names carry a terminating NUL; any other NUL is the name's own.
fn trim_nul(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(&[0]).unwrap_or(bytes)
}

/// Validates one member and says what it is. `size` is a regular file's
/// length as its reader will yield it (a sparse file's real size).
pub fn classify(member: &RawMember<'_>, size: u64) -> Result<Classified, EntryError> {
    let header = member.header;
    let pax = member.pax;
    let raw_path = member.raw_path();
    let mut path = EntryPath::parse(&raw_path).map_err(EntryError::Path)?;

    let raw_link: Option<Vec<u8>> = match (&pax.linkpath, member.long_link) {
        (Some(link), _) => Some(link.clone()),
        (None, Some(link)) => Some(trim_nul(link).to_vec()),
        (None, None) => header.link_name_bytes().map(|l| l.into_owned()),
    };

    let entry_type = header.entry_type();
    let mut kind = match entry_type {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            // Pre-POSIX tars mark directories by a trailing slash only.
            if raw_path.ends_with(b"/") && size == 0 {
                EntryKind::Directory
            } else {
                EntryKind::Regular { size }
            }
        }
        EntryType::Directory => EntryKind::Directory,
        EntryType::Symlink => {
            let target = raw_link.unwrap_or_default();
            if target.is_empty() {
                return Err(EntryError::EmptySymlink);
            }
            if target.contains(&0) {
                return Err(EntryError::SymlinkNul);
            }
            if target.len() > MAX_SYMLINK_LEN {
                return Err(EntryError::SymlinkTooLong { len: target.len() });
            }
            EntryKind::Symlink { target }
        }
        EntryType::Link => {
            let raw = raw_link
                .filter(|l| !l.is_empty())
                .ok_or(EntryError::MissingLinkTarget)?;
            let target = EntryPath::parse(&raw).map_err(|source| EntryError::LinkTarget {
                target: lossy(&raw),
                source,
            })?;
            if target.is_root() {
                return Err(EntryError::LinkToRoot);
            }
            EntryKind::HardLink { target }
        }
        EntryType::Char | EntryType::Block => {
            let major =
                numeric(header, "device major", DEV_MAJOR, header.device_major())?.unwrap_or(0);
            let minor =
                numeric(header, "device minor", DEV_MINOR, header.device_minor())?.unwrap_or(0);
            if entry_type == EntryType::Char {
                EntryKind::CharDevice { major, minor }
            } else {
                EntryKind::BlockDevice { major, minor }
            }
        }
        EntryType::Fifo => EntryKind::Fifo,
        other => return Err(EntryError::UnsupportedType(other.as_byte() as char)),
    };

    if let Some(name) = path.file_name() {
        if name == OPAQUE_MARKER {
            path = path.parent().unwrap_or_else(EntryPath::root);
            kind = EntryKind::OpaqueDirectory;
        } else if name.starts_with(WHITEOUT_META_PREFIX) {
            return Ok(Classified::Skip);
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            // `.wh..` would whiteout the parent and `.wh..` followed by
            // nothing is caught by the meta prefix; `..`/`.` never reach
            // here because parse() drops them.
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(EntryError::EmptyWhiteout);
            }
            let hidden = hidden.to_vec();
            path = path.parent().unwrap_or_else(EntryPath::root).join(&hidden);
            kind = EntryKind::Whiteout;
        }
    }
    // Entries inside AUFS metadata directories (`.wh..wh.plnk/123`).
    if path
        .components()
        .iter()
        .any(|c| c.starts_with(WHITEOUT_META_PREFIX))
    {
        return Ok(Classified::Skip);
    }
    if path.is_root() {
        let what = match kind {
            EntryKind::Directory | EntryKind::OpaqueDirectory => None,
            EntryKind::Regular { .. } => Some("regular file"),
            EntryKind::Symlink { .. } => Some("symlink"),
            EntryKind::HardLink { .. } => Some("hard link"),
            EntryKind::CharDevice { .. } => Some("character device"),
            EntryKind::BlockDevice { .. } => Some("block device"),
            EntryKind::Fifo => Some("fifo"),
            EntryKind::Whiteout => Some("whiteout"),
        };
        if let Some(kind) = what {
            return Err(EntryError::RootNotDirectory { kind });
        }
    }

    let uid = match pax.uid {
        Some(uid) => uid,
        None => numeric(header, "uid", UID, header.uid())?,
    };
    let gid = match pax.gid {
        Some(gid) => gid,
        None => numeric(header, "gid", GID, header.gid())?,
    };
    let mtime = match pax.mtime {
        Some(time) => time,
        None => {
            let secs = numeric(header, "mtime", MTIME, header.mtime())?;
            Timestamp {
                secs: i64::try_from(secs).map_err(|_| EntryError::OutOfRange {
                    field: "mtime",
                    value: secs,
                })?,
                nanos: 0,
            }
        }
    };
    let meta = EntryMeta {
        mode: numeric(header, "mode", MODE, header.mode())? & 0o7777,
        uid: to_u32("uid", uid)?,
        gid: to_u32("gid", gid)?,
        mtime,
        xattrs: pax
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    Ok(Classified::Entry(LayerEntry { path, kind, meta }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_keep_nanoseconds_and_sign() {
        let t = |s: &str| parse_pax_time(s.as_bytes());
        assert_eq!(
            t("1700000000.123456789"),
            Some(Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789
            })
        );
        assert_eq!(
            t("12.5"),
            Some(Timestamp {
                secs: 12,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            t("-1.25"),
            Some(Timestamp {
                secs: -2,
                nanos: 750_000_000
            })
        );
        assert_eq!(t("-3"), Some(Timestamp { secs: -3, nanos: 0 }));
        assert_eq!(
            t("1.1234567891"),
            Some(Timestamp {
                secs: 1,
                nanos: 123_456_789
            })
        );
        for bad in ["", ".5", "1.2.3", "abc", "1e3", "-", "99999999999999999999"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }
}
