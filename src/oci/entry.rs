//! The entries of a layer, as the flattener applies them.
//!
//! The layer reader ([`super`]) turns a tar stream into [`LayerEntry`] values
//! and the flattener applies them in order. Everything here is already
//! validated: a path is relative, normalized and made of legal ext4 names, a
//! whiteout is recognised and stripped of its `.wh.` prefix, and a hard link
//! names its target by the same rules. Applying an entry never has to look at
//! tar again.

use std::fmt;

/// The longest name ext4 stores in one directory entry.
pub const MAX_NAME_LEN: usize = 255;

/// A path inside the image: one or more components, none empty, `.` or `..`,
/// none containing `/` or NUL, each at most [`MAX_NAME_LEN`] bytes. The root
/// itself has no components.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryPath(Vec<Vec<u8>>);

/// Why a path cannot name anything inside the image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path component {component:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong { component: String },
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path escapes the image root through `..`")]
    EscapesRoot,
}

impl EntryPath {
    /// The root directory.
    pub fn root() -> Self {
        EntryPath(Vec::new())
    }

    /// Parses a path as tar writes it. Leading `/` and `./`, repeated and
    /// trailing slashes and `.` components are dropped, as every tar reader
    /// does; `..` is resolved lexically and refused when it climbs above the
    /// root.
    pub fn parse(raw: &[u8]) -> Result<Self, PathError> {
        if raw.contains(&0) {
            return Err(PathError::Nul);
        }
        let mut components: Vec<Vec<u8>> = Vec::new();
        for part in raw.split(|&b| b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    if components.pop().is_none() {
                        return Err(PathError::EscapesRoot);
                    }
                }
                name if name.len() > MAX_NAME_LEN => {
                    return Err(PathError::NameTooLong {
                        component: String::from_utf8_lossy(name).into_owned(),
                    })
                }
                name => components.push(name.to_vec()),
            }
        }
        Ok(EntryPath(components))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn components(&self) -> &[Vec<u8>] {
        &self.0
    }

    /// The last component, or `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        self.0.last().map(Vec::as_slice)
    }

    /// The containing directory, or `None` for the root.
    pub fn parent(&self) -> Option<EntryPath> {
        let (_, parent) = self.0.split_last()?;
        Some(EntryPath(parent.to_vec()))
    }

    /// This path with one more component; `name` must already be a legal
    /// component (as [`EntryPath::file_name`] returns).
    pub fn join(&self, name: &[u8]) -> EntryPath {
        let mut components = self.0.clone();
        components.push(name.to_vec());
        EntryPath(components)
    }
}

impl fmt::Display for EntryPath {
    /// `/a/b`, lossily decoded: for messages, never for lookups.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for component in &self.0 {
            write!(f, "/{}", String::from_utf8_lossy(component))?;
        }
        Ok(())
    }
}

impl fmt::Debug for EntryPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryPath({self})")
    }
}

/// A point in time with nanoseconds, as PAX `mtime` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    pub secs: i64,
    /// Always below 1,000,000,000.
    pub nanos: u32,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file whose `size` bytes follow in the entry's data reader.
    Regular {
        size: u64,
    },
    Directory,
    Symlink {
        target: Vec<u8>,
    },
    /// Another name for `target`, which an earlier entry (this layer or a
    /// lower one) created.
    HardLink {
        target: EntryPath,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// `.wh.NAME`: the entry's path (without the prefix) is removed, with
    /// everything under it. A whiteout of a missing path is not an error.
    Whiteout,
    /// `.wh..wh..opq`: the entry's path is the directory whose contents from
    /// lower layers are hidden; entries of this layer under it stay.
    OpaqueDirectory,
}

/// Ownership, permissions, time and extended attributes of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryMeta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`);
    /// the file type is in [`EntryKind`].
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    /// Full names (`user.x`, `security.capability`) with their values,
    /// sorted by name, no name twice.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One entry of a layer. For [`EntryKind::Regular`] the data is handed over
/// alongside, as a reader of exactly `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    pub path: EntryPath,
    pub kind: EntryKind,
    /// Meaningless for whiteouts and hard links (a hard link shares its
    /// target's inode).
    pub meta: EntryMeta,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_normalizes_like_tar() {
        let p = EntryPath::parse(b"./usr//lib/./x/").unwrap();
        assert_eq!(p.to_string(), "/usr/lib/x");
        assert_eq!(
            EntryPath::parse(b"/etc/../bin").unwrap().to_string(),
            "/bin"
        );
        assert!(EntryPath::parse(b"./").unwrap().is_root());
    }

    #[test]
    fn parse_refuses_escapes_nul_and_long_names() {
        assert_eq!(
            EntryPath::parse(b"a/../../etc"),
            Err(PathError::EscapesRoot)
        );
        assert_eq!(EntryPath::parse(b"a\0b"), Err(PathError::Nul));
        let long = vec![b'x'; 256];
        assert!(matches!(
            EntryPath::parse(&long),
            Err(PathError::NameTooLong { .. })
        ));
        assert!(EntryPath::parse(&long[..255]).is_ok());
    }

    #[test]
    fn parent_and_join_round_trip() {
        let p = EntryPath::parse(b"a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().join(p.file_name().unwrap()), p);
        assert_eq!(EntryPath::root().parent(), None);
    }
}
