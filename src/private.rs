//! Files and directories only their owner may use: tenant keys, and the
//! device caches and logs that hold an image's plaintext.
//!
//! What we create is made private from the start (directories 0700, files
//! 0600, whatever the umask). What we are handed is checked: a key file,
//! cache directory or log that group or others may use, or that another
//! user owns (who may loosen its mode at any time, or read it as its
//! owner), is refused, never "fixed" behind the user's back, since whatever
//! leaked through the loose mode already has; the error names the path, its
//! mode or owner, and the command that makes it private.

#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Permission bits of a directory only its owner may list or enter.
pub const DIR_MODE: u32 = 0o700;
/// Permission bits of a file only its owner may read or write.
pub const FILE_MODE: u32 = 0o600;

/// A private path that is not, or could not be checked or made.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error(
        "{what} {} has mode {mode:04o}: group and others must have no access to it, \
         since it holds {holds} (chmod {fix:o} {})",
        path.display(),
        path.display()
    )]
    Exposed {
        what: &'static str,
        holds: &'static str,
        path: PathBuf,
        mode: u32,
        fix: u32,
    },
    #[error(
        "{what} {} is owned by uid {owner}, not by uid {expected} that runs lazyblk: its owner \
         may read it, and it holds {holds} (chown {expected} {})",
        path.display(),
        path.display()
    )]
    ForeignOwner {
        what: &'static str,
        holds: &'static str,
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("{what} {} is not a directory", path.display())]
    NotADirectory { what: &'static str, path: PathBuf },
    #[error("{op} {what} {}", path.display())]
    Io {
        op: &'static str,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl PrivacyError {
    /// The I/O failure behind this error, if one is.
    pub fn io_source(&self) -> Option<&io::Error> {
        match self {
            PrivacyError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What a private path is, for messages: e.g. `("key file", "a tenant key")`.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub what: &'static str,
    pub holds: &'static str,
}

/// A tenant key file.
pub const KEY_FILE: Kind = Kind {
    what: "key file",
    holds: "a tenant key",
};

/// A device's cache directory.
pub const CACHE_DIR: Kind = Kind {
    what: "cache directory",
    holds: "the image's decrypted contents",
};

/// A daemon's log, kept in its cache directory.
pub const LOG_FILE: Kind = Kind {
    what: "log file",
    holds: "a device's log",
};

/// Refuses `path` (followed through symlinks) if group or others have any
/// permission on it, or if another user owns it.
pub fn check(path: &Path, kind: Kind) -> Result<fs::Metadata, PrivacyError> {
    let meta = fs::metadata(path).map_err(|source| PrivacyError::Io {
        op: "read",
        what: kind.what,
        path: path.to_owned(),
        source,
    })?;
    check_metadata(path, &meta, kind)?;
    Ok(meta)
}

fn check_metadata(path: &Path, meta: &fs::Metadata, kind: Kind) -> Result<(), PrivacyError> {
    let expected = nix::unistd::geteuid().as_raw();
    if meta.uid() != expected {
        return Err(PrivacyError::ForeignOwner {
            what: kind.what,
            holds: kind.holds,
            path: path.to_owned(),
            owner: meta.uid(),
            expected,
        });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        let fix = if meta.is_dir() { DIR_MODE } else { FILE_MODE };
        return Err(PrivacyError::Exposed {
            what: kind.what,
            holds: kind.holds,
            path: path.to_owned(),
            mode,
            fix,
        });
    }
    Ok(())
}

/// Creates `dir` (and any missing parent) 0700, or checks that an existing
/// one is a directory only its owner may use.
pub fn ensure_dir(dir: &Path, kind: Kind) -> Result<(), PrivacyError> {
    create_dirs(dir).map_err(|source| PrivacyError::Io {
        op: "create",
        what: kind.what,
        path: dir.to_owned(),
        source,
    })?;
    check_dir(dir, kind)
}

/// Checks that an existing `dir` is a directory only its owner may use.
pub fn check_dir(dir: &Path, kind: Kind) -> Result<(), PrivacyError> {
    if !check(dir, kind)?.is_dir() {
        return Err(PrivacyError::NotADirectory {
            what: kind.what,
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// Creates `dir` and any missing parent 0700; an existing one is left as it is.
pub fn create_dirs(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// Options that open (and, with `.create(true)`, create) a file 0600.
pub fn file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Opens `path` for appending, creating it 0600 if absent; an existing
/// file is refused as [`check`] refuses it (checked on the open file, so it
/// cannot be swapped between the check and the open).
pub fn open_append(path: &Path, kind: Kind) -> Result<File, PrivacyError> {
    let io_err = |op| {
        move |source| PrivacyError::Io {
            op,
            what: kind.what,
            path: path.to_owned(),
            source,
        }
    };
    let file = file_options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("open"))?;
    let meta = file.metadata().map_err(io_err("read"))?;
    check_metadata(path, &meta, kind)?;
    Ok(file)
}

/// A temporary directory a test may use as a cache directory: private, as
/// the cache requires (a plain temp dir takes the umask's mode).
#[cfg(test)]
pub(crate) fn test_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(fs::Permissions::from_mode(DIR_MODE))
        .tempdir()
        .expect("create a private temp dir")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_directories_and_their_parents_are_private_whatever_the_umask_allows() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        ensure_dir(&dir, CACHE_DIR).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        // Again: an existing private directory is fine.
        ensure_dir(&dir, CACHE_DIR).unwrap();
        let file = dir.join("f");
        open_append(&file, LOG_FILE).unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn a_loose_file_opened_for_appending_is_refused_and_left_as_it_is() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("log");
        fs::write(&path, "earlier\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = open_append(&path, LOG_FILE).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, PrivacyError::Exposed { mode: 0o644, .. }),
            "{text}"
        );
        assert!(
            text.contains(&format!("chmod 600 {}", path.display())),
            "{text}"
        );
        assert_eq!(mode(&path), 0o644);
        assert_eq!(fs::read_to_string(&path).unwrap(), "earlier\n");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        open_append(&path, LOG_FILE).unwrap();
    }

    /// Gives `path` to a uid that is not ours (tests run as root, which may).
    fn give_away(path: &Path) -> u32 {
        let ours = nix::unistd::geteuid().as_raw();
        let other = if ours == 65534 { 65533 } else { 65534 };
        std::os::unix::fs::chown(path, Some(other), None)
            .expect("chown needs root: the tests run as root");
        other
    }

    #[test]
    fn a_directory_key_or_log_another_user_owns_is_refused_naming_both_owners() {
        let root = tempfile::tempdir().unwrap();
        let ours = nix::unistd::geteuid().as_raw();
        let dir = root.path().join("cache");
        ensure_dir(&dir, CACHE_DIR).unwrap();
        let key = root.path().join("key");
        file_options().create(true).write(true).open(&key).unwrap();
        let log = root.path().join("log");
        open_append(&log, LOG_FILE).unwrap();
        for path in [&dir, &key, &log] {
            let other = give_away(path);
            let err = match path {
                p if p == &dir => ensure_dir(p, CACHE_DIR).map(drop),
                p if p == &key => check(p, KEY_FILE).map(drop),
                p => open_append(p, LOG_FILE).map(drop),
            }
            .unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, PrivacyError::ForeignOwner { owner, expected, .. }
                    if owner == other && expected == ours),
                "{text}"
            );
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(
                text.contains(&format!("uid {other}")) && text.contains(&format!("uid {ours}")),
                "{text}"
            );
            // Refused, not taken back behind the owner's back.
            assert_eq!(fs::metadata(path).unwrap().uid(), other);
        }
    }

    #[test]
    fn an_existing_directory_others_may_use_is_refused_with_the_fix() {
        let root = tempfile::tempdir().unwrap();
        for loose in [0o755, 0o750, 0o701, 0o710, 0o702] {
            let dir = root.path().join(format!("d{loose:o}"));
            fs::create_dir(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(loose)).unwrap();
            let err = ensure_dir(&dir, CACHE_DIR).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, PrivacyError::Exposed { mode, .. } if mode == loose),
                "{text}"
            );
            assert!(text.contains(&dir.display().to_string()), "{text}");
            assert!(text.contains(&format!("{loose:04o}")), "{text}");
            assert!(
                text.contains(&format!("chmod 700 {}", dir.display())),
                "{text}"
            );
            // Refused, not repaired behind the user's back.
            assert_eq!(mode(&dir), loose);
        }
    }

    #[test]
    fn a_file_in_place_of_the_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("f");
        file_options().create(true).write(true).open(&path).unwrap();
        let err = ensure_dir(&path, CACHE_DIR).unwrap_err();
        assert!(
            matches!(
                err,
                PrivacyError::Io { .. } | PrivacyError::NotADirectory { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_loose_file_is_refused_with_chmod_600() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("key");
        fs::write(&path, "x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let text = check(&path, KEY_FILE).unwrap_err().to_string();
        assert!(
            text.contains(&format!("chmod 600 {}", path.display())),
            "{text}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        check(&path, KEY_FILE).unwrap();
    }
}
