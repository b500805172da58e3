//! The small error vocabulary shared by the layers that callers must branch
//! on (store → engine → frontend). Each layer keeps its own error enum and
//! maps it onto an [`ErrorKind`]; the frontend turns a kind into an errno in
//! exactly one place.

/// What a caller can do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ErrorKind {
    /// The object does not exist where it was looked for.
    NotFound,
    /// Data failed a hash or authentication check. Never retried from the
    /// same source.
    Integrity,
    /// A passing failure (timeout, connection reset): retry with back-off.
    Transient,
    /// A local I/O failure.
    Io,
    /// The request asks for something this component does not do
    /// (a store URL scheme not built in).
    Unsupported,
    /// A write to a device or store opened read-only.
    ReadOnly,
    /// The request itself is malformed (out of range, bad argument).
    Invalid,
}

impl ErrorKind {
    /// The errno a block frontend completes a failed request with.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::NotFound | ErrorKind::Integrity | ErrorKind::Transient | ErrorKind::Io => {
                libc::EIO
            }
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Invalid => libc::EINVAL,
        }
    }
}

/// An error and its causes on one line, for logs.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
