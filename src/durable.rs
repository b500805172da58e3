//! Durable file replacement: a file under its final name is either the old
//! one or the new one whole, and once the write returns the new one
//! survives a crash.
//!
//! The recipe: write a temp file in the target's own directory (a rename
//! is atomic only within one file system), `sync_all` it, rename it over
//! the target, then fsync the directory so the rename itself is on disk.
//! Temp names start with `.`, which no chunk id, manifest name or device
//! record starts with, so whoever lists the directory never takes one for
//! an object. A temp file that was not renamed into place is removed when
//! its [`TempFile`] drops, whatever failed.
//!
//! [`write()`] does it all for bytes in memory; [`TempFile`] serves a writer
//! that fills the file itself (in pieces, from several threads) before
//! [`TempFile::commit`].

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes`, atomically and durably.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with_mode(path, bytes, 0o666)
}

/// [`write()`] of a file created with permission bits `mode` (before the
/// umask): 0o600 for a file only its owner may read.
pub fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (temp, mut file) = TempFile::create_with_mode(path, mode)?;
    file.write_all(bytes)?;
    temp.commit(&file)
}

/// A temp file beside its target, removed on drop unless committed.
///
/// The caller owns the open [`File`] (to share it between writers, say) and
/// hands it back to [`commit`](TempFile::commit) to be synced.
#[derive(Debug)]
pub struct TempFile {
    /// `None` once renamed into place: then there is nothing to remove.
    temp: Option<PathBuf>,
    target: PathBuf,
}

impl TempFile {
    /// Creates an empty temp file in `target`'s directory.
    pub fn create(target: &Path) -> io::Result<(TempFile, File)> {
        TempFile::create_with_mode(target, 0o666)
    }

    /// [`create`](TempFile::create) with permission bits `mode`.
    pub fn create_with_mode(target: &Path, mode: u32) -> io::Result<(TempFile, File)> {
        let Some(name) = target.file_name() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", target.display()),
            ));
        };
        let dir = parent_dir(target);
        loop {
            let mut temp_name = OsString::from(".");
            temp_name.push(name);
            temp_name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
            let temp = dir.join(temp_name);
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&temp);
            match opened {
                Ok(file) => {
                    let guard = TempFile {
                        temp: Some(temp),
                        target: target.to_owned(),
                    };
                    return Ok((guard, file));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Where the file is while it is written, for messages.
    pub fn path(&self) -> &Path {
        self.temp.as_deref().expect("set until commit consumes it")
    }

    /// Syncs `file` (the one [`create`](TempFile::create) opened), renames
    /// it over the target and syncs the directory.
    pub fn commit(mut self, file: &File) -> io::Result<()> {
        file.sync_all()?;
        fs::rename(self.path(), &self.target)?;
        self.temp = None;
        sync_dir(&parent_dir(&self.target))
    }
}

impl TempFile {
    /// Renames the file over the target and syncs nothing, for a caller
    /// that must not hold others up through the syncs: it syncs what must
    /// survive a crash before, and the rest and the directory
    /// ([`sync_dir`]) after, and accepts that a crash in between keeps the
    /// old target, or the new one without what was not synced yet.
    pub fn rename_unsynced(mut self) -> io::Result<()> {
        fs::rename(self.path(), &self.target)?;
        self.temp = None;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            // Best effort: the error that brought us here is the one to
            // report, and a leftover dot-file is never read as an object.
            let _ = fs::remove_file(temp);
        }
    }
}

/// Makes a directory's entries (a rename, a new file, a removal) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path`; `.` for a bare file name.
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_creates_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record");
        write(&path, b"hello").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert_eq!(names(dir.path()), ["record"]);
    }

    #[test]
    fn an_existing_file_is_replaced_by_a_new_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("present");
        write(&path, b"old bytes, longer than the new").unwrap();
        // A reader that opened the old file keeps reading it whole: the
        // new bytes arrive by rename, never by rewriting the old file.
        let mut old = File::open(&path).unwrap();
        write(&path, b"new").unwrap();
        let mut seen = String::new();
        old.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "old bytes, longer than the new");
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["present"]);
    }

    #[test]
    fn a_failed_rename_leaves_no_temp_file_and_the_target_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory under the target's name: the temp file is
        // created and written, and only the rename fails.
        let target = dir.path().join("m");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"kept").unwrap();
        let err = write(&target, b"data").unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert_eq!(names(dir.path()), ["m"]);
        assert_eq!(fs::read(target.join("x")).unwrap(), b"kept");
    }

    #[test]
    fn a_temp_file_is_a_dot_file_beside_its_target_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("image");
        let (temp, file) = TempFile::create(&target).unwrap();
        file.set_len(4096).unwrap();
        assert_eq!(temp.path().parent(), Some(dir.path()));
        let name = temp.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".image."), "{name}");
        assert_eq!(names(dir.path()), [name]);
        drop(temp);
        assert!(names(dir.path()).is_empty());
        assert!(!target.exists());
    }

    #[test]
    fn a_committed_temp_file_becomes_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("image");
        let (temp, file) = TempFile::create(&target).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, b"tail", 8).unwrap();
        temp.commit(&file).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"\0\0\0\0\0\0\0\0tail");
        assert_eq!(names(dir.path()), ["image"]);
    }

    #[test]
    fn a_path_without_a_file_name_or_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(Path::new("/"), b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        let missing = dir.path().join("no-such-dir/file");
        let err = write(&missing, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn write_with_mode_sets_the_permission_bits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private");
        write_with_mode(&path, b"secret", 0o600).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_bare_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("out.ext4")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/out.ext4")), Path::new("a"));
    }
}
