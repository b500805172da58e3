//! Binding the Unix sockets a device process listens on: its control
//! socket, an NBD listener, a vhost-user socket.
//!
//! A socket file at the path is taken over only when no process listens
//! there any more (connecting is refused): one left by a process that died.
//! A live one is refused, and so is a file that is not a socket, so binding
//! never silently steals a listener or deletes someone's data. The socket
//! is made private: whoever can connect to any of them reads the image's
//! plaintext or stops the device.

#![forbid(unsafe_code)]

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Binds `path` with `bind` (the caller's listener type), replacing a stale
/// socket file there, then makes the socket the owner's alone.
pub fn bind_replacing_stale<'a, L>(
    path: &'a Path,
    bind: impl FnOnce(&'a Path) -> io::Result<L>,
) -> io::Result<L> {
    remove_stale(path)?;
    let listener = bind(path)?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(crate::private::FILE_MODE),
    )?;
    Ok(listener)
}

/// Removes a socket file no process listens on; refuses a live socket or
/// anything that is not a socket. A missing path is fine.
fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket: left alone",
            ))
        }
        Ok(_) => {}
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process listens on this socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_stale_socket_is_replaced_and_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file");
        let listener = bind_replacing_stale(&path, UnixListener::bind).unwrap();
        UnixStream::connect(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, crate::private::FILE_MODE);
        drop(listener);
    }

    #[test]
    fn a_live_socket_is_refused_and_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let live = UnixListener::bind(&path).unwrap();
        let err = bind_replacing_stale(&path, UnixListener::bind).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        UnixStream::connect(&path).unwrap();
        drop(live);
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"keep me").unwrap();
        let err = bind_replacing_stale(&path, UnixListener::bind).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn a_missing_path_is_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let _listener = bind_replacing_stale(&path, UnixListener::bind).unwrap();
        UnixStream::connect(&path).unwrap();
    }
}
